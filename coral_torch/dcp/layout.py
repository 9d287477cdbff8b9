"""DCP's global ``Metadata`` <-> the JSON layout a sharded commit stores (see :mod:`coral_torch.sharded`)."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from ..checkpoint.sharded import LAYOUT_KIND, chunk_name
from ..format import dtypes
from ..format.manifest import Manifest


def layout_of(metadata: Metadata, entry_of: dict[str, int]) -> dict[str, Any]:
    """The layout of ``metadata``; ``entry_of`` maps each item's :func:`chunk_name` to its entry."""
    items: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            items[fqn] = {"type": "bytes", "entry": entry_of[chunk_name(fqn, None)]}
            continue
        items[fqn] = {
            "type": "tensor",
            "dtype": dtypes.canonical_dtype(md.properties.dtype),
            "size": [int(d) for d in md.size],
            "requires_grad": bool(md.properties.requires_grad),
            "chunks": [
                {
                    "offsets": [int(o) for o in c.offsets],
                    "sizes": [int(s) for s in c.sizes],
                    "entry": entry_of[chunk_name(fqn, c.offsets)],
                }
                for c in md.chunks
            ],
        }
    return {"kind": LAYOUT_KIND, "version": metadata.version, "items": items, "paths": _paths(metadata.planner_data)}


def metadata_of(manifest: Manifest) -> Metadata:
    """DCP ``Metadata`` for a sharded commit; ``storage_data`` maps each item's index to its entry."""
    lay = manifest.layout
    assert lay is not None  # a sharded commit (checked by the caller)
    state: dict[str, Any] = {}
    storage: dict[MetadataIndex, int] = {}
    for fqn, item in lay["items"].items():
        if item["type"] == "bytes":
            state[fqn] = BytesStorageMetadata()
            storage[MetadataIndex(fqn)] = item["entry"]
            continue
        props = TensorProperties(dtype=dtypes.torch_dtype(item["dtype"]), requires_grad=bool(item.get("requires_grad")))
        chunks = []
        for c in item["chunks"]:
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(c["offsets"]), sizes=torch.Size(c["sizes"])))
            storage[MetadataIndex(fqn, c["offsets"])] = c["entry"]
        state[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(item["size"]), chunks=chunks)
    paths = lay.get("paths")
    planner_data = {k: tuple(v) for k, v in paths.items()} if paths else None
    md = Metadata(state_dict_metadata=state, planner_data=planner_data, storage_data=storage)
    if lay.get("version") is not None and hasattr(md, "version"):
        md.version = lay["version"]
    return md


def _paths(planner_data: Any) -> dict[str, list] | None:
    """DCP's flattening map (fqn -> path of str/int keys) as JSON, or None if it is something else."""
    if not isinstance(planner_data, dict):
        return None
    out: dict[str, list] = {}
    for k, v in planner_data.items():
        if not isinstance(k, str) or not isinstance(v, (tuple, list)):
            return None
        if not all(type(x) in (str, int) for x in v):
            return None
        out[k] = list(v)
    return out
