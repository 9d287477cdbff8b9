"""Read a commit's tensors back and measure how much tensors changed between commits.

Shared by ``coral-torch diff`` and ``coral-torch stats --plot``. Uses public
:class:`~coral_torch.Repository` methods only; torch loads when a function first needs it, so
importing this module is cheap.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .repository import Repository

__all__ = ["tensor_index", "tensors_of", "tensor_change"]


def tensor_index(repo: Repository, ref: str) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """``name -> (content hash, dtype, shape)`` of every tensor in the commit ``ref`` names
    (read from the catalog alone: nothing is decoded). Raises
    :class:`~coral_torch.errors.RefNotFoundError` if ``ref`` matches no commit."""
    row = repo.get_commit(ref)
    return {e[0]: (e[1], e[2], tuple(e[3])) for e in row.manifest["tensors"]}


def tensors_of(repo: Repository, cid: str, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of commit ``cid`` (any ref :meth:`Repository.resolve` accepts) as CPU torch
    tensors, keyed by their flattened name (``state_dict/layer.weight``).

    Args:
        repo: the repository holding the commit.
        cid: commit id, hash prefix, tag, run, ``latest`` or ``best``.
        names: only these tensors (names the commit lacks are skipped); default: all of them.

    Raises :class:`~coral_torch.errors.CheckpointDamagedError` if a tensor cannot be rebuilt.
    """
    from .format.weight_tensor import WeightMetadata, WeightTensor

    row = repo.get_commit(cid)
    entries = row.manifest["tensors"]
    if names is not None:
        wanted = set(names)
        entries = [e for e in entries if e[0] in wanted]
    raws = repo.materialize([e[1] for e in entries], commit=row.id, names=[e[0] for e in entries])
    return {
        name: WeightTensor.from_raw(raws[h], WeightMetadata(name=name, shape=tuple(shape), dtype=dtype)).to_torch()
        for name, h, dtype, shape, *_ in entries
    }


def tensor_change(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """How much ``b`` differs from ``a``: ``(fraction of elements whose bits differ, relative L2
    change ||b - a|| / ||a||)``. Tensors of different shape or dtype count as fully changed
    (``(1.0, nan)``); for non-float tensors the second number is the changed fraction."""
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return 1.0, float("nan")
    if a.numel() == 0:
        return 0.0, 0.0
    ua = a.reshape(-1).view(torch.uint8).reshape(a.numel(), -1)
    ub = b.reshape(-1).view(torch.uint8).reshape(b.numel(), -1)
    changed = float((ua != ub).any(dim=1).float().mean())
    if a.is_floating_point() or a.is_complex():
        fa, fb = a.double(), b.double()
        denom = float(torch.linalg.vector_norm(fa))
        rel = float(torch.linalg.vector_norm(fb - fa)) / denom if denom > 0 else float(changed > 0)
    else:
        rel = changed
    return changed, rel
