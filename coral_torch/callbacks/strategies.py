"""Lightning strategies whose sharded saves and loads go through the repository (via :mod:`coral_torch.dcp`).

Lightning's ``ModelParallelStrategy`` calls ``torch.distributed.checkpoint.save`` with the stock
file-system writer and never consults ``CheckpointIO``, so a sharded run cannot be redirected by a
plugin. :class:`CoralModelParallelStrategy` is the same strategy with three methods overridden:

- ``save_checkpoint(checkpoint, path)`` (what ``ModelCheckpoint`` and ``trainer.save_checkpoint``
  call): every rank writes its shards with :class:`~coral_torch.dcp.CoralStorageWriter`, one commit
  is published, and rank 0 writes a pointer file at ``path`` (so ``ModelCheckpoint``'s bookkeeping,
  top-k and ``last.ckpt`` work as with files);
- ``load_checkpoint(path)`` takes ``coral://<ref>`` or such a pointer file (anything else: the stock
  behaviour), loading the shards resharded to the current layout;
- ``remove_checkpoint(path)`` drops the pointer's ref with the file.

The non-tensor rest of a Lightning checkpoint (loops, callbacks, hyper-parameters) is stored in the
same commit as one ``torch.save`` value and restored ``weights_only`` unless the caller passes
``weights_only=False``. ``CoralCheckpoint`` uses :meth:`CoralModelParallelStrategy.commit_sharded`.

Not supported: Lightning's ``FSDPStrategy`` (FSDP1) and ``DeepSpeedStrategy``; ``CoralCheckpoint``
refuses them at set-up, naming this strategy.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from .. import dcp as coral_dcp
from ..api import open_repository
from ..errors import CoralError
from ..pointers import pointer_ref_name, read_pointer_file, write_pointer
from ..repository import Repository
from ..retention import Policy
from ..sharded import load_value
from .checkpoint_io import CORAL_SCHEME, run_name_from_path

log = logging.getLogger(__name__)

#: the DCP key under which the non-tensor rest of a Lightning checkpoint is stored
LIGHTNING_META = "lightning_meta"


class CoralModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` (FSDP2 / tensor parallel) that checkpoints into a coral-torch repository.

    Args:
        repo: repository directory (default: ``<trainer.default_root_dir>/.coral``); every rank must
            see it (one host, or a shared file system).
        run: run name for commits made through ``save_checkpoint`` (default: from the checkpoint path).
        keep: a retention policy (:mod:`coral_torch.retention`) for the run of commits made through
            ``save_checkpoint`` (``ModelCheckpoint``, ``trainer.save_checkpoint``), applied after each
            save besides the pointer files ``ModelCheckpoint`` manages; ``CoralCheckpoint`` passes its own.
        **kwargs: passed to ``ModelParallelStrategy``.
    """

    def __init__(self, repo: Union[str, os.PathLike, None] = None, *, run: Optional[str] = None,
                 keep: Optional[Policy] = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.repo = repo  #: the repository directory, or None for ``<default_root_dir>/.coral``
        self.run = run
        self.keep = keep

    @property
    def repo_path(self) -> Path:
        if self.repo is not None:
            return Path(self.repo).absolute()
        root = self.lightning_module.trainer.default_root_dir if self.lightning_module is not None else "."
        return (Path(root) / ".coral").absolute()

    # -- saving -------------------------------------------------------------------------------
    def commit_sharded(
        self,
        checkpoint: dict[str, Any],
        *,
        run: str,
        refs: Sequence[str] = (),
        message: str = "",
        metrics: Optional[dict[str, Any]] = None,
        monitor: Optional[str] = None,
        mode: str = "min",
        keep: Union[bool, Policy] = False,
    ) -> str:
        """Store a Lightning checkpoint dict (its ``state_dict`` and ``optimizer_states`` sharded) as
        one commit; every rank calls it and gets the commit id. ``checkpoint`` is consumed. ``keep``:
        as :class:`~coral_torch.dcp.CoralStorageWriter`'s (a policy is applied by the coordinator)."""
        state: dict[str, Any] = {"state_dict": checkpoint.pop("state_dict")}
        for i, optim_state in enumerate(checkpoint.pop("optimizer_states", [])):
            state[f"optimizer_{i}"] = optim_state
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        state[LIGHTNING_META] = buf.getvalue()
        return coral_dcp.save(
            state, repo=self.repo_path, run=run, refs=refs, message=message, metrics=metrics or {},
            epoch=checkpoint.get("epoch"), step=checkpoint.get("global_step"), monitor=monitor, mode=mode,
            keep=keep,
        )

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        path = Path(self.broadcast(str(filepath))).absolute()
        cid = self.commit_sharded(
            checkpoint, run=self.run or run_name_from_path(path), refs=[pointer_ref_name(path, self.repo_path)],
            message=f"checkpoint {path.name}", keep=self.keep if self.keep is not None else False,
        )
        if self.global_rank == 0:
            write_pointer(path, cid, self.repo_path)
        self.barrier("coral_save_checkpoint")

    # -- loading ------------------------------------------------------------------------------
    def _coral_ref(self, path: str) -> Optional[tuple[Path, str]]:
        """(repository, ref) for ``coral://<ref>`` or a pointer file; None for anything else."""
        if path.startswith(CORAL_SCHEME):
            return self.repo_path, path[len(CORAL_SCHEME):]
        p = Path(path)
        if p.is_file():
            pointer = read_pointer_file(p)
            if pointer is not None:
                return Path(self.repo).absolute() if self.repo is not None else Path(pointer.repo), pointer.commit
        return None

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = str(self.broadcast(str(checkpoint_path)))
        found = self._coral_ref(path)
        if found is None:
            return super().load_checkpoint(path, weights_only=weights_only)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        repo_path, ref = found
        module = self.model
        assert module is not None and self.lightning_module is not None
        repo = open_repository(repo_path, create=False)
        cid = repo.resolve(ref)  # every rank loads the same commit
        repo.last_loaded = cid  # the resumed run's parent (and what CoralCheckpoint holds while it runs)
        module_state = {"state_dict": get_model_state_dict(module)}
        coral_dcp.load(module_state, cid, repo=repo_path)
        module.load_state_dict(module_state["state_dict"], strict=self.lightning_module.strict_loading)
        for i, optim in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            optim_state = {key: get_optimizer_state_dict(module, optim)}
            coral_dcp.load(optim_state, cid, repo=repo_path)
            set_optimizer_state_dict(module, optim, optim_state_dict=optim_state[key],
                                     options=StateDictOptions(cpu_offload=True))
        return _lightning_meta(repo, cid, weights_only=weights_only is not False)

    def remove_checkpoint(self, filepath: Any) -> None:
        path = Path(filepath)
        if self.global_rank == 0 and path.is_file():
            try:
                pointer = read_pointer_file(path)
            except CoralError:
                pointer = None
            if pointer is not None:
                open_repository(self.repo_path, create=False).delete_ref(pointer_ref_name(path, self.repo_path))
                path.unlink(missing_ok=True)
                return
        super().remove_checkpoint(filepath)


def _lightning_meta(repo: Repository, cid: str, *, weights_only: bool) -> dict[str, Any]:
    """The non-tensor rest of a Lightning checkpoint stored by :meth:`CoralModelParallelStrategy.commit_sharded`."""
    manifest = repo.manifest(cid)
    item = manifest.layout["items"].get(LIGHTNING_META)
    if item is None or item.get("type") != "bytes":
        return {}
    entry = manifest.tensors[item["entry"]]
    raw = repo.materialize([entry.hash], commit=cid, names=[entry.name])[entry.hash]
    data = load_value(torch.from_numpy(raw), LIGHTNING_META, weights_only=True)  # a bytes object
    return torch.load(io.BytesIO(data), weights_only=weights_only, map_location="cpu")
