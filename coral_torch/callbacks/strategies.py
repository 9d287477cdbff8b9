"""Lightning strategies whose sharded saves and loads go through the repository (via :mod:`coral_torch.dcp`).

Lightning's ``ModelParallelStrategy`` calls ``torch.distributed.checkpoint.save`` with the stock
file-system writer and never consults ``CheckpointIO``, so a sharded run cannot be redirected by a
plugin. :class:`CoralModelParallelStrategy` is the same strategy with three methods overridden:

- ``save_checkpoint(checkpoint, path)`` (what ``ModelCheckpoint`` and ``trainer.save_checkpoint``
  call): every rank writes its shards with :class:`~coral_torch.dcp.CoralStorageWriter`, one commit
  is published, and rank 0 writes a pointer file at ``path`` (so ``ModelCheckpoint``'s bookkeeping,
  top-k and ``last.ckpt`` work as with files). While fitting this is asynchronous by default
  (``async_save``): every rank stages its shards into reusable host buffers and trains on, the save
  runs in the background (:mod:`~coral_torch.callbacks.background_sharded`), the pointer file appears
  once the commit is published, the next save waits for it, and a failure is raised on every rank at
  the next save or at the end of training;
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
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from .. import dcp as coral_dcp
from ..checkpoint.checkpoint_files import commit_with_pointer, forget_pointer, with_pointer_ref
from ..checkpoint.pointers import read_pointer_file, write_pointer
from ..checkpoint.sharded import load_value
from ..defaults import REPOSITORY_DIR
from ..errors import CoralError
from ..location import S3Location
from ..repository import Repository
from ..repository.handles import open_repository, repository_location
from ..repository.options import CommitOptions
from ..retention import Policy
from .background_sharded import BackgroundShardedSaves, Published
from .checkpoint_io import CORAL_SCHEME, run_name_from_path

log = logging.getLogger(__name__)

#: the DCP key under which the non-tensor rest of a Lightning checkpoint is stored
LIGHTNING_META = "lightning_meta"


class CoralModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` (FSDP2 / tensor parallel) that checkpoints into a coral-torch repository.

    Args:
        repo: repository: ``s3://bucket/prefix`` (every rank uploads its own shards; nothing else
            shared) or a directory every rank sees (one host, or a shared file system); default:
            ``<trainer.default_root_dir>/.coral``, as ``CoralCheckpoint``'s (before a trainer is
            attached, ``$CORAL_REPO`` or ``./.coral``).
        run: run name for commits made through ``save_checkpoint`` (default: from the checkpoint path).
        keep: a retention policy (:mod:`coral_torch.retention`) for the run of commits made through
            ``save_checkpoint`` (``ModelCheckpoint``, ``trainer.save_checkpoint``), applied after each
            save besides the pointer files ``ModelCheckpoint`` manages; ``CoralCheckpoint`` passes its own.
        async_save: ``save_checkpoint`` while fitting stages the shards and saves them in the
            background (default); False: every save blocks training until its commit is published.
            Outside ``fit`` saves are always synchronous.
        **kwargs: passed to ``ModelParallelStrategy``.
    """

    def __init__(
        self,
        repo: str | os.PathLike | None = None,
        *,
        run: str | None = None,
        keep: Policy | None = None,
        async_save: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.repo = repo  #: the repository directory, or None for the default (see :attr:`repo_path`)
        self.run = run
        self.keep = keep
        self.async_save = async_save
        #: the saves running in the background (``submit_sharded``); every rank has its own
        self.background_saves = BackgroundShardedSaves()
        self._in_flight_path: Path | None = None  # the pointer file the save in flight writes

    @property
    def repo_path(self) -> Path | S3Location:
        """Where the repository is: a directory, or an S3 location (every rank uploads its shards)."""
        if self.repo is not None or self.lightning_module is None:
            return repository_location(self.repo)
        return (Path(self.lightning_module.trainer.default_root_dir) / REPOSITORY_DIR).absolute()

    # -- saving -------------------------------------------------------------------------------
    def commit_sharded(
        self, checkpoint: dict[str, Any], options: CommitOptions | None = None, **option_kwargs: Any
    ) -> str:
        """Store a Lightning checkpoint dict (its ``state_dict`` and ``optimizer_states`` sharded) as
        one commit; every rank calls it and gets the commit id. ``checkpoint`` is consumed.
        ``options`` (a :class:`CommitOptions`) or its fields as keyword arguments (``run``, ``refs``,
        ``message``, ``metrics``, ``monitor``, ``mode``, ``keep``, ...) say what the commit records,
        as for :class:`~coral_torch.dcp.CoralStorageWriter` (a ``keep`` policy is applied by the
        coordinator); ``keep`` defaults to False here, ``epoch``/``step`` to the checkpoint's.
        A save still running in the background is waited for first."""
        self.wait_for_saves()
        state, options = _dcp_state(checkpoint, options, option_kwargs)
        return coral_dcp.save(state, repo=self.repo_path, options=options)

    def submit_sharded(
        self,
        checkpoint: dict[str, Any],
        options: CommitOptions | None = None,
        *,
        then: Published | None = None,
        **option_kwargs: Any,
    ) -> None:
        """:meth:`commit_sharded` in the background: every rank stages its shards and returns; the
        commit is published later (``then(commit_id)`` runs on the background thread when it is).
        :attr:`background_saves` says how it went (``check``/``wait`` on every rank)."""
        state, options = _dcp_state(checkpoint, options, option_kwargs)
        self.background_saves.submit(state, repo=self.repo_path, options=options, then=then)

    def wait_for_saves(self) -> str | None:
        """Wait for the save in flight on this rank; its commit id, or :class:`CoralCheckpointError`
        (every rank's save fails with any rank's failure, so every rank raises)."""
        try:
            return self.background_saves.wait()
        finally:
            self._in_flight_path = None

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        path = Path(self.broadcast(str(filepath))).absolute()
        options = CommitOptions(
            run=self.run or run_name_from_path(path),
            message=f"checkpoint {path.name}",
            keep=self.keep if self.keep is not None else False,
        )
        repo = open_repository(self.repo_path)
        if self.async_save and self._fitting():
            self.wait_for_saves()  # (its pointer file exists before the next save starts)
            write_file = self.global_rank == 0
            location = repo.location

            def publish_pointer(cid: str) -> None:
                if write_file:
                    write_pointer(path, cid, location)

            self.submit_sharded(checkpoint, options=with_pointer_ref(options, path, repo.path), then=publish_pointer)
            self._in_flight_path = path
            return
        commit_with_pointer(
            path,
            repo.path,
            options,
            lambda o: self.commit_sharded(checkpoint, options=o),
            write_file=self.global_rank == 0,
            location=repo.location,
        )  # every rank commits, one writes the file
        self.barrier("coral_save_checkpoint")

    def _fitting(self) -> bool:
        """Whether a ``fit`` is running (its saves may run in the background: teardown waits)."""
        from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus

        trainer = getattr(self.lightning_module, "_trainer", None) if self.lightning_module is not None else None
        return (
            trainer is not None
            and trainer.state.fn == TrainerFn.FITTING
            and trainer.state.status == TrainerStatus.RUNNING
        )

    def on_train_end(self) -> None:
        super().on_train_end()
        self.wait_for_saves()  # the last save's failure is raised here, on every rank

    # -- loading ------------------------------------------------------------------------------
    def _coral_ref(self, path: str) -> tuple[Path | S3Location, str] | None:
        """(repository, ref) for ``coral://<ref>`` or a pointer file; None for anything else."""
        if path.startswith(CORAL_SCHEME):
            return self.repo_path, path[len(CORAL_SCHEME) :]
        p = Path(path)
        if p.is_file():
            pointer = read_pointer_file(p)
            if pointer is not None:
                return (repository_location(self.repo) if self.repo is not None else pointer.repo), pointer.commit
        return None

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
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

        self.wait_for_saves()  # (it may be the commit asked for)
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
            set_optimizer_state_dict(
                module, optim, optim_state_dict=optim_state[key], options=StateDictOptions(cpu_offload=True)
            )
        return _lightning_meta(repo, cid, weights_only=weights_only is not False)

    def remove_checkpoint(self, filepath: Any) -> None:
        path = Path(filepath)
        if self._in_flight_path is not None and self._in_flight_path == path.absolute():
            self.wait_for_saves()  # the save in flight writes this very file
        if self.global_rank == 0 and path.is_file():
            try:
                pointer = read_pointer_file(path)
            except CoralError:
                pointer = None
            if pointer is not None:
                forget_pointer(path, open_repository(self.repo_path, create=False))
                return
        super().remove_checkpoint(filepath)

    # -- process-group shutdown (see _destroy_launched_process_group) -------------------------
    def setup_environment(self) -> None:
        import torch.distributed as dist

        initialized_before = dist.is_available() and dist.is_initialized()
        super().setup_environment()
        _note_process_group(launched=not initialized_before)

    def teardown(self) -> None:
        trainer = getattr(self.lightning_module, "_trainer", None) if self.lightning_module is not None else None
        if trainer is not None:
            from lightning.pytorch.trainer.states import TrainerStatus

            failed = trainer.state.status == TrainerStatus.INTERRUPTED  # set before teardown on an exception
        else:
            import sys

            failed = sys.exc_info()[0] is not None
        _exit_state["clean"] = not failed
        self.background_saves.close()  # waits for the save in flight (a failure is logged)
        self._in_flight_path = None
        super().teardown()


def _dcp_state(
    checkpoint: dict[str, Any], options: CommitOptions | None, option_kwargs: dict[str, Any]
) -> tuple[dict[str, Any], CommitOptions]:
    """The DCP state dict of a Lightning checkpoint (consumed) and the options of its commit."""
    if options is None:
        option_kwargs.setdefault("keep", False)
    options = CommitOptions.build(options, **option_kwargs)
    options = options.replace(
        epoch=checkpoint.get("epoch") if options.epoch is None else options.epoch,
        step=checkpoint.get("global_step") if options.step is None else options.step,
    )
    state: dict[str, Any] = {"state_dict": checkpoint.pop("state_dict")}
    for i, optim_state in enumerate(checkpoint.pop("optimizer_states", [])):
        state[f"optimizer_{i}"] = optim_state
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    state[LIGHTNING_META] = buf.getvalue()
    return state, options


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


# -- process-group shutdown ---------------------------------------------------------------------
# Lightning starts the default process group in ``setup_environment`` and never destroys a gloo one
# (it registers ``destroy_process_group`` at exit for NCCL only), so the gloo groups (worker threads
# "pt_gloo_runloop", transport "gloo_tcp_loop", rank 0's TCPStore server "pt_tcpstore_uv") were alive
# at interpreter exit. A gloo worker may still hold the last collective's work, with tensors that
# own a Python object; if it lets go of them once the interpreter is finalizing, taking the GIL ends
# the thread inside a C++ destructor: "terminate called without an active exception" (SIGABRT).
# The group cannot be destroyed in ``teardown``: the sharded module needs it after ``fit`` returns
# (``full_tensor()``, ``trainer.test``). So it is done at exit (atexit: every non-daemon thread has
# been joined, the interpreter is whole): a barrier (every rank is done with its collectives, and the
# round trip leaves the workers time to let go of the last ones while the GIL can still be taken),
# ``destroy_process_group`` and a collection, which frees the groups (joining their threads) unless
# something still holds them (a module-level FSDP2 model, DTensor's caches: torch then frees them,
# idle, during finalization). Only a group this strategy launched is touched.
_exit_state: dict[str, Any] = {"group": None, "clean": True, "registered": False}


def _note_process_group(*, launched: bool) -> None:
    """Remember the default group when the strategy's ``setup_environment`` created it."""
    import atexit
    import weakref

    import torch.distributed as dist

    if not launched or not (dist.is_available() and dist.is_initialized()):
        return  # the user's group (or one an earlier strategy launched, already noted)
    _exit_state["group"] = weakref.ref(dist.group.WORLD)  # no strong ref: it must not outlive its users
    _exit_state["clean"] = True
    if not _exit_state["registered"]:
        atexit.register(_destroy_launched_process_group)
        _exit_state["registered"] = True


def _destroy_launched_process_group() -> None:
    """atexit: barrier, then destroy the gloo default group a :class:`CoralModelParallelStrategy`
    launched, and collect (see above)."""
    import gc

    import torch.distributed as dist

    ref, _exit_state["group"] = _exit_state["group"], None
    if ref is None or not (dist.is_available() and dist.is_initialized()) or ref() is not dist.group.WORLD:
        return  # destroyed already, or replaced by a group of the user's
    if not _exit_state["clean"] or dist.get_backend() != "gloo":
        # after a failed fit a peer may be gone or stuck in a collective: exit as before. NCCL:
        # Lightning destroys it at exit itself.
        return
    try:
        # a gloo barrier is queued to the group's workers behind its pending works (the group's
        # timeout bounds the wait for a rank still busy after fit)
        dist.barrier()
    except Exception as exc:  # noqa: BLE001 - best effort: a peer exited early or timed out
        log.debug("barrier before destroying the process group at exit failed: %s", exc)
    try:
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - never turn a finished run into a failing exit
        log.debug("destroying the process group at exit failed: %s", exc)
    gc.collect()  # destroying only unregisters a gloo group: its threads stop when it is freed
