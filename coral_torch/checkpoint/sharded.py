"""The layout of a sharded commit, and how its chunks become one full state dict.

A commit written through :mod:`coral_torch.dcp` stores one object per item torch.distributed.checkpoint
(DCP) writes: a chunk of a tensor (a whole tensor is one chunk at offset 0) or a pickled value
(DCP's ``BYTE_IO``). The manifest's ``layout`` is DCP's global metadata as plain JSON::

    {"kind": "dcp", "version": <DCP metadata version>,
     "items": {fqn: {"type": "tensor", "dtype": "float32", "size": [...], "requires_grad": false,
                     "chunks": [{"offsets": [...], "sizes": [...], "entry": <index into tensors>}]}
                | {"type": "bytes", "entry": <index>}},
     "paths": {fqn: [key, ...]} | null}    # DCP's flattening: fqn -> path in the nested state dict

JSON, not a pickle of DCP's ``Metadata``: reading a commit's layout never runs code, and a commit
can be consolidated (:func:`consolidate`) without torch.distributed. Pure functions of the manifest:
no repository, no process group.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import CatalogDamagedError, UnsafeCheckpointError
from ..format import dtypes
from ..format.manifest import Manifest

LAYOUT_KIND = "dcp"


def chunk_name(fqn: str, offsets: Sequence[int] | None) -> str:
    """The manifest entry name of a chunk (``fqn`` for a pickled value): the same chunk of the same
    tensor gets the same name in every commit, which is how delta bases are found."""
    if offsets is None:
        return fqn
    return f"{fqn}@{','.join(str(int(o)) for o in offsets)}"


def check_layout(manifest: Manifest) -> None:
    """Raise :class:`CatalogDamagedError` unless the layout is well-formed and agrees with the
    entries: every chunk lies inside its tensor, has its entry's shape and dtype, and the chunks of
    a tensor cover exactly its number of elements."""
    lay = manifest.layout
    n = len(manifest.tensors)

    def bad(why: str) -> CatalogDamagedError:
        return CatalogDamagedError(f"sharded commit has a malformed layout: {why}")

    if not isinstance(lay, dict) or lay.get("kind") != LAYOUT_KIND or not isinstance(lay.get("items"), dict):
        raise bad("not a DCP layout")
    paths = lay.get("paths")
    if paths is not None and not isinstance(paths, dict):
        raise bad("paths is not a mapping")
    for fqn, item in lay["items"].items():
        if not isinstance(item, dict):
            raise bad(f"{fqn} is not an object")
        if item.get("type") == "bytes":
            e = item.get("entry")
            if type(e) is not int or not 0 <= e < n or manifest.tensors[e].kind != "bytes":
                raise bad(f"{fqn} names no pickled value")
            continue
        if item.get("type") != "tensor":
            raise bad(f"{fqn} has type {item.get('type')!r}")
        size, chunks = item.get("size"), item.get("chunks")
        if not (isinstance(size, list) and all(type(d) is int and d >= 0 for d in size) and isinstance(chunks, list)):
            raise bad(f"{fqn} has a malformed size or chunk list")
        try:
            dtypes.itemsize(item["dtype"])  # a missing one raises KeyError: damage too
        except Exception:  # noqa: BLE001 - an unknown dtype name is damage here
            raise bad(f"{fqn} has dtype {item.get('dtype')!r}") from None
        covered = 0
        for c in chunks:
            e, off, sz = c.get("entry"), c.get("offsets"), c.get("sizes")
            if type(e) is not int or not 0 <= e < n:
                raise bad(f"a chunk of {fqn} names entry {e!r}")
            if not (
                isinstance(off, list)
                and isinstance(sz, list)
                and len(off) == len(sz) == len(size)
                and all(type(x) is int and x >= 0 for x in off + sz)
                and all(o + s <= d for o, s, d in zip(off, sz, size))
            ):
                raise bad(f"a chunk of {fqn} lies outside the tensor")
            ent = manifest.tensors[e]
            if list(ent.shape) != sz or ent.dtype != item["dtype"]:
                raise bad(f"a chunk of {fqn} is {ent.dtype}{list(ent.shape)}, the layout says {item['dtype']}{sz}")
            covered += _numel(sz)
        if covered != _numel(size):
            raise bad(f"the chunks of {fqn} hold {covered} elements, the tensor has {_numel(size)}")


def consolidate(manifest: Manifest, tensors: Sequence[torch.Tensor], *, weights_only: bool = True) -> dict:
    """The full, unsharded state dict of a sharded commit: every tensor assembled from its chunks,
    pickled values restored (``weights_only``: only what ``torch.load(weights_only=True)`` allows),
    and the nesting DCP flattened restored. ``tensors`` are the manifest's entries, in order."""
    check_layout(manifest)
    lay = manifest.layout
    assert lay is not None  # check_layout refuses a commit without one
    flat: dict[str, Any] = {}
    for fqn, item in lay["items"].items():
        if item["type"] == "bytes":
            flat[fqn] = load_value(tensors[item["entry"]], fqn, weights_only=weights_only)
            continue
        chunks = item["chunks"]
        size = item["size"]
        if len(chunks) == 1 and chunks[0]["sizes"] == size:
            full = tensors[chunks[0]["entry"]]
        else:
            full = torch.empty(size, dtype=dtypes.torch_dtype(item["dtype"]))
            for c in chunks:
                view = full
                for dim, (o, s) in enumerate(zip(c["offsets"], c["sizes"])):
                    view = view.narrow(dim, o, s)
                view.copy_(tensors[c["entry"]])
        if item.get("requires_grad"):
            full.requires_grad_(True)
        flat[fqn] = full
    return unflatten(flat, lay.get("paths"))


def load_value(t: torch.Tensor, fqn: str, *, weights_only: bool = True) -> Any:
    """A pickled value (DCP ``BYTE_IO``) restored from its stored bytes; with ``weights_only``
    nothing but what ``torch.load(weights_only=True)`` allows is rebuilt (no code runs)."""
    data = t.contiguous().view(torch.uint8).numpy().tobytes()
    try:
        return torch.load(io.BytesIO(data), weights_only=weights_only, map_location="cpu")
    except Exception as exc:
        if weights_only:
            raise UnsafeCheckpointError(
                f"the stored value {fqn!r} can only be rebuilt by running pickled code "
                f"({type(exc).__name__}); load with weights_only=False (trust_pickles=True) if you trust it"
            ) from exc
        raise


def unflatten(flat: dict[str, Any], paths: dict[str, list] | None) -> dict:
    """Put DCP-flattened values back at their paths (``{"model.w": ("model", "w")}``); a list
    index in a path makes a list, as DCP's own unflattening does."""
    if not paths:
        return dict(flat)
    out: dict = {}
    for fqn, value in flat.items():
        path = paths.get(fqn, [fqn])
        node: Any = out
        for key, nxt in zip(path[:-1], path[1:]):
            if isinstance(node, list):
                while len(node) <= key:
                    node.append(None)
                if node[key] is None:
                    node[key] = [] if type(nxt) is int else {}
                node = node[key]
            else:
                if key not in node:
                    node[key] = [] if type(nxt) is int else {}
                node = node[key]
        last = path[-1]
        if isinstance(node, list):
            while len(node) <= last:
                node.append(None)
        node[last] = value
    return out


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
