"""`load_module_from_checkpoint`: ``LightningModule.load_from_checkpoint`` for coral-torch refs."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, cast

import torch

from .. import api
from ..repository import Repository

if TYPE_CHECKING:
    import lightning.pytorch as pl


def load_module_from_checkpoint(
    cls: type[pl.LightningModule] | type[pl.LightningDataModule],
    ref: str | os.PathLike,
    repo: str | os.PathLike | Repository | None = None,
    map_location: Any = None,
    strict: bool | None = True,
    **kwargs: Any,
) -> Any:
    """Build ``cls`` (a ``LightningModule`` or ``LightningDataModule`` subclass) from a checkpoint
    in a repository, like ``cls.load_from_checkpoint(path)``.

    ``ref`` is anything :func:`coral_torch.load` takes: a hash prefix, ``coral://...``, a tag, a run,
    ``latest``, ``best`` or a pointer file written by ``CoralCheckpointIO`` / ``coral_torch.save``.
    Hyper-parameters saved with ``save_hyperparameters()`` are passed to ``__init__`` (``kwargs``
    override them), then the weights are loaded (``strict`` as in ``load_state_dict``). Loading is
    ``weights_only``: nothing stored can run code. Without ``map_location`` tensors go where
    Lightning's ``load_from_checkpoint`` would put them (CUDA tensors to CPU when CUDA is missing).
    """
    import lightning.pytorch as pl
    from lightning.pytorch.core.saving import _default_map_location, _load_state

    checkpoint = api.load(ref, repo=repo, map_location=map_location or _default_map_location, weights_only=True)
    if not isinstance(checkpoint, dict):
        raise TypeError(f"{ref!r} is not a Lightning checkpoint (a {type(checkpoint).__name__}, not a dict)")
    checkpoint.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {})
    checkpoint[cls.CHECKPOINT_HYPER_PARAMS_KEY].update(kwargs)
    if issubclass(cls, pl.LightningDataModule):
        return _load_state(cls, checkpoint, **kwargs)
    if "state_dict" not in checkpoint:
        raise TypeError(f"{ref!r} is not a Lightning checkpoint (no 'state_dict' key)")
    model = cast("pl.LightningModule", _load_state(cls, checkpoint, strict=strict, **kwargs))
    state_dict = checkpoint["state_dict"]
    device = next((t for t in state_dict.values() if isinstance(t, torch.Tensor)), torch.tensor(0)).device
    return model.to(device)
