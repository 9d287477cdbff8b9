"""The load path: a commit's checkpoint rebuilt, exactly as saved, from its verified objects."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CatalogDamagedError, CheckpointDamagedError, CoralError
from ..format.manifest import Manifest
from ..format.weight_tensor import WeightMetadata, WeightTensor
from ..lazy import LazyModule

if TYPE_CHECKING:
    from ..checkpoint import adapters, sharded
else:
    # adapters and sharded import torch, seconds that catalog-only readers (coral-torch log) must not pay
    adapters = LazyModule("coral_torch.checkpoint.adapters")
    sharded = LazyModule("coral_torch.checkpoint.sharded")


def rebuild_checkpoint(
    cid: str,
    manifest: Manifest,
    materialize: Callable[..., dict[str, np.ndarray]],
    *,
    map_location: Any,
    weights_only: bool,
    where: Path,
) -> Any:
    """The checkpoint of commit ``cid`` (of the repository at ``where``) from its ``manifest``:
    ``materialize(hashes, commit=, names=)`` gives the verified raw bytes of its objects (see
    :meth:`Repository.materialize`); ``map_location`` and ``weights_only`` as in
    :meth:`Repository.load`. A manifest that disagrees with its objects or a malformed skeleton
    raises :class:`CheckpointDamagedError` / :class:`CatalogDamagedError`."""
    entries = manifest.tensors
    raws = materialize([e.hash for e in entries], commit=cid, names=[e.name for e in entries])
    tensors = []
    handed_out: set[str] = set()
    for e in entries:
        # Equal content in different slots (e.g. every param's `step` counter) must come back
        # as separate tensors: only slots that were the same tensor (tied) share memory.
        raw = raws[e.hash].copy() if e.hash in handed_out else raws[e.hash]
        handed_out.add(e.hash)
        try:
            w = WeightTensor.from_raw(raw, WeightMetadata(name=e.name, shape=e.shape, dtype=e.dtype))
        except CoralError as exc:  # the manifest entry disagrees with the object it names
            raise CheckpointDamagedError(
                f"checkpoint {cid[:10]} in {where} is damaged: tensor {e.name} ({exc})",
                commit=cid,
                tensors=[e.name],
            ) from exc
        tensors.append(adapters.apply_map_location(w.to_torch(), e.device, map_location))
    del raws
    try:
        if manifest.sharded:  # a DCP commit: its chunks consolidated into one full state dict
            obj = sharded.consolidate(manifest, tensors, weights_only=weights_only)
        else:
            obj = adapters.unflatten(manifest.skeleton, tensors, weights_only=weights_only)
    except CoralError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise CatalogDamagedError(
            f"checkpoint {cid[:10]} in {where} has a malformed skeleton ({type(exc).__name__}: {exc})"
        ) from exc
    return obj
