"""`CoralCheckpoint`: a Lightning callback that commits the full checkpoint every epoch.

The callback decides when to save, under which run and what retention its commits record; a
:class:`~.saver.CheckpointSaver` does the saving. It subclasses Lightning's ``Checkpoint`` marker,
so it runs after the other callbacks at epoch end (it sees the metrics they logged) and Lightning
adds no default ``ModelCheckpoint``. Saving is asynchronous by default: the training thread
snapshots tensors into reusable host buffers and a background thread hashes, delta-encodes,
compresses and writes (see :mod:`.snapshot`).

Under DDP every rank builds the checkpoint (as ``ModelCheckpoint`` does), only global rank 0
writes, and a writer failure is shared with all ranks at the next save point so none deadlocks.
With :class:`~coral_torch.callbacks.CoralModelParallelStrategy` (FSDP2 / tensor parallel) every
rank writes its own shards through torch.distributed.checkpoint into the repository and one commit
is published; asynchronously by default (every rank stages its shards and trains on, see
:mod:`.background_sharded`), a failure raised on every rank at the next batch. Other sharded strategies (FSDP1,
DeepSpeed, stock ModelParallel) write per-rank shards outside ``CheckpointIO`` and are refused at set-up.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.callbacks import Checkpoint

from ..defaults import REPOSITORY_DIR
from ..errors import CoralError
from ..format.delta import DeltaConfig
from ..format.refnames import best_ref, run_keep_prefix as keep_prefix
from ..repository import Repository
from ..repository.retain import RetentionReport
from ..retention import KeepAll, Policy, optimizer_policy, top_k_policy
from ..storage.s3_store import S3Config
from .checkpoint_io import CoralCheckpointIO
from .rng import capture_rng_state, flatten_loaders, loader_generators, restore_rng_state
from .saver import CheckpointSaver, SavePlan
from .snapshot import BackgroundCommitter

log = logging.getLogger(__name__)

_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


def _is_coral_sharded(strategy: Any) -> bool:
    return callable(getattr(strategy, "commit_sharded", None))


class CoralCheckpoint(Checkpoint):
    """Commit a checkpoint into a coral-torch repository every epoch (or every N epochs/steps).

    Args:
        repo: repository path or :class:`Repository` (default ``<default_root_dir>/.coral``).
        run: run name (default: continue the resumed run, else the logger's ``version_N``).
        monitor, mode: metric whose best value ``runs/<run>/best`` follows; ranks commits for top-k.
        keep: a retention policy (:mod:`coral_torch.retention`: ``LatestN``, ``BestN``,
            ``EveryNEpochs``, ``AnyOf``, ...) deciding which of the run's commits stay; evaluated
            from the repository after every save, so a resumed run (or another process) decides
            the same. Default: from ``save_top_k``.
        save_top_k: ``ModelCheckpoint``'s knob, mapped onto a policy: ``-1`` all (default), ``k`` the
            best k (``BestN`` by ``monitor``, else ``LatestN``), ``0`` none but the last.
        save_last: keep ``runs/<run>/latest`` on the newest commit.
        every_n_epochs, every_n_train_steps: when to commit (epochs by default).
        save_weights_only: commit the model weights only (no optimizer, loops, ...).
        keep_optimizer: which kept commits keep per-parameter optimizer state: ``"all"``;
            ``"last"`` (``LatestN(1)`` plus the best by ``monitor``); ``"none"`` (never stored); or
            any policy. The others are rewritten without it (``param_groups`` kept): such a commit
            still resumes, with fresh optimizer moments (exact for stateless optimizers such as
            plain SGD).
        tags: tags put on the last commit at the end of training.
        async_save: snapshot on the training thread and write in the background (default; with
            ``CoralModelParallelStrategy`` every rank stages its shards and saves in the background).
        s3: an :class:`~coral_torch.S3Config` (or S3Store) to push to at the end of training.
        delta_config: delta policy for a repository this callback opens.
        log_stats: log bytes/ratio/stall per commit through the trainer's logger.
        install_checkpoint_io: install :class:`CoralCheckpointIO` so ``ckpt_path="coral://..."`` works.
        background_nice: how much to lower the background save's CPU priority: a Linux nice
            increment (default 15; 0 keeps it equal to training) or ``"idle"`` for
            ``SCHED_IDLE`` (only cores nothing else wants; on a CPU-saturated trainer a save then
            often runs into the next checkpoint). A save that has not finished when the next
            checkpoint or the end of training comes is finished by the training thread itself, at
            its own priority, alongside the background thread.
        background_workers: encoder threads of a background save. Default: 1 when the model trains
            on CPU (the trainer already keeps every core busy: a second encoder thread only fights
            the training threads; README, "Limits"), else all cores up to 8.

    On a CPU-only trainer that keeps every core busy, background work slows the training threads
    even at low priority (see docs/benchmarks.md and ``bench/interference_bench.py``). On GPU
    trainers the CPU is mostly idle.
    """

    def __init__(
        self,
        repo: str | os.PathLike | Repository | None = None,
        *,
        run: str | None = None,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        keep: Policy | None = None,
        save_top_k: int = -1,
        save_last: bool = True,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        save_weights_only: bool = False,
        keep_optimizer: Literal["all", "last", "none"] | Policy = "all",
        tags: Sequence[str] = (),
        async_save: bool = True,
        s3: S3Config | None = None,
        delta_config: DeltaConfig | None = None,
        log_stats: bool = True,
        install_checkpoint_io: bool = True,
        background_nice: int | str = 15,
        background_workers: int | None = None,
    ):
        super().__init__()
        if mode not in ("min", "max"):
            raise CoralError(f"mode must be 'min' or 'max', not {mode!r}")
        if keep is not None and save_top_k != -1:
            raise CoralError("give keep=... or save_top_k=..., not both (save_top_k is a shorthand for a keep policy)")
        if keep is not None and not isinstance(keep, Policy):
            raise CoralError(f"keep must be a retention policy such as LatestN(3), not {keep!r}")
        self.policy = keep if keep is not None else top_k_policy(save_top_k, monitor, mode)
        self.optimizer_policy = optimizer_policy(keep_optimizer, monitor, mode)
        if every_n_train_steps is not None and every_n_epochs is not None:
            raise CoralError("give every_n_epochs or every_n_train_steps, not both")
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise CoralError("every_n_train_steps must be >= 1")
        if every_n_epochs is not None and every_n_epochs < 1:
            raise CoralError("every_n_epochs must be >= 1")
        self._repo_arg = repo
        self.run = run
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k
        self.save_last = save_last
        self.every_n_epochs = every_n_epochs if every_n_train_steps is None else None
        if self.every_n_epochs is None and every_n_train_steps is None:
            self.every_n_epochs = 1
        self.every_n_train_steps = every_n_train_steps
        self.save_weights_only = save_weights_only
        self.keep_optimizer = keep_optimizer
        self.tags = list(tags)
        self.async_save = async_save
        self.s3 = s3
        self.delta_config = delta_config
        self.log_stats = log_stats
        self.install_checkpoint_io = install_checkpoint_io
        self.background_nice = background_nice
        self.background_workers = background_workers
        self._saver = CheckpointSaver()  # the repository, the background committer, the stats
        self._resumed_from: str | None = None
        self._resumed_run: str | None = None
        self._sharded = False  # the strategy writes sharded commits (set up in setup())
        self._last_step_saved = -1
        self._trainer: Any = None
        self._at_epoch_end = False
        self._loader_rng_to_restore: list[Any] | None = None

    # -------------------------------------------------------------------- saver's state
    @property
    def repo(self) -> Repository | None:
        return self._saver.repo

    @repo.setter
    def repo(self, repo: Repository | None) -> None:
        self._saver.repo = repo

    @property
    def last_commit(self) -> str | None:
        return self._saver.last_commit

    @last_commit.setter
    def last_commit(self, cid: str | None) -> None:
        self._saver.last_commit = cid

    @property
    def retention(self) -> RetentionReport | None:
        """What the last save's retention did."""
        return self._saver.retention

    @property
    def history(self) -> list[dict[str, Any]]:
        """Per-commit stats (bytes, ratio, stall and background seconds), for users and benchmarks."""
        return self._saver.history

    @property
    def push_stats(self) -> dict[str, Any] | None:
        return self._saver.push_stats

    @property
    def _committer(self) -> BackgroundCommitter | None:
        return self._saver.committer

    # ------------------------------------------------------------------------------ set-up
    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    @property
    def best_model_path(self) -> str:
        cid = self._best_commit()
        return f"coral://{cid}" if cid else ""

    @property
    def last_model_path(self) -> str:
        return f"coral://{self.last_commit}" if self.last_commit else ""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._trainer = trainer
        name = type(trainer.strategy).__name__
        self._sharded = _is_coral_sharded(trainer.strategy)
        if name in _SHARDED and not self._sharded:
            raise CoralError(
                f"CoralCheckpoint does not support {name}: it writes per-rank shards outside CheckpointIO. "
                "Use coral_torch.callbacks.CoralModelParallelStrategy (FSDP2), DDP or a single device"
            )
        if self._sharded:
            if trainer.strategy.repo is None and self._repo_arg is not None:
                # one repository for the callback and the strategy
                trainer.strategy.repo = (
                    self._repo_arg.location if isinstance(self._repo_arg, Repository) else self._repo_arg
                )
            self._repo_arg = trainer.strategy.repo_path
            if not isinstance(self.optimizer_policy, KeepAll):
                raise CoralError(
                    "keep_optimizer is not supported with sharded (FSDP2) commits yet: their optimizer shards "
                    "cannot be stripped; use keep_optimizer='all' and keep=... to bound what is kept"
                )
        default = Path(trainer.default_root_dir) / REPOSITORY_DIR
        self._saver.open(self._repo_arg, default, here=trainer.is_global_zero, delta_config=self.delta_config)
        if (
            self.install_checkpoint_io
            and not self._sharded
            and not isinstance(trainer.strategy.checkpoint_io, CoralCheckpointIO)
        ):
            trainer.strategy.checkpoint_io = CoralCheckpointIO(self._saver.location)
        workers: int | None = None  # the repository's default (all cores, up to 8)
        if self.background_workers is not None:
            workers = max(1, int(self.background_workers))
        elif self.async_save and not self._sharded and trainer.strategy.root_device.type == "cpu":
            # a CPU trainer keeps every core busy: more encoder threads only fight its own threads
            workers = 1
        # (a sharded save runs in the background of every rank: the strategy's BackgroundShardedSaves)
        local_async = self.async_save and not self._sharded
        self._saver.start(asynchronous=local_async, nice=self.background_nice, workers=workers)

    def _run_name(self, trainer: Any) -> str:
        if self.run:
            return self.run
        if self._resumed_run:
            self.run = self._resumed_run
            return self.run
        version = getattr(trainer.logger, "version", None) if trainer.logger is not None else None
        if isinstance(version, int):
            self.run = f"version_{version}"
        elif isinstance(version, str) and version:
            self.run = "".join(c if c.isalnum() or c in "-_." else "_" for c in version)
        else:
            self.run = time.strftime("run-%Y%m%d-%H%M%S")
        return self.run

    # ------------------------------------------------------------------------------- hooks
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.world_size == 1:
            self._surface_errors(trainer)
        if self._sharded:
            self._saver.poll_sharded(trainer)  # a failed background save is raised on every rank
        n = self.every_n_train_steps
        if (
            n
            and trainer.global_step > 0
            and trainer.global_step % n == 0
            and trainer.global_step != self._last_step_saved
        ):
            self._last_step_saved = trainer.global_step
            self._save(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        n = self.every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0:
            # the loaders' generators have drawn this epoch's numbers: their state is the next
            # epoch's start (mid-epoch saves do not record it: a mid-epoch resume of a plain
            # DataLoader restarts the epoch's data in Lightning anyway)
            self._at_epoch_end = True
            try:
                self._save(trainer, pl_module)
            finally:
                self._at_epoch_end = False

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # a resumed run holds the commit it came from until it ends: no retention decision (this
        # process's, another's, `coral-torch prune`) removes it meanwhile
        if trainer.is_global_zero and trainer.ckpt_path:
            self._saver.hold(self._resumed_from)

    def _end_lease(self) -> None:
        self._saver.release(self.run, self.policy, self.optimizer_policy)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._sync_barrier(trainer, wait=True)
        if trainer.is_global_zero and self.repo is not None:
            self._end_lease()
            self._saver.finish(trainer, tags=self.tags, s3=self.s3, log_stats=self.log_stats)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._saver.settle(trainer, exception)  # says what became of a save in flight
        self._end_lease()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._end_lease()
        self._saver.close()

    # ------------------------------------------------------------------------------ save
    def _surface_errors(self, trainer: Any) -> None:
        self._saver.surface_errors(trainer, log_stats=self.log_stats)

    def _sync_barrier(self, trainer: Any, *, wait: bool) -> None:
        """Finish/collect the in-flight save on rank 0 and share failure with every rank."""
        self._saver.sync_barrier(trainer, wait=wait)

    def _save(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return
        t0 = time.perf_counter()
        self._sync_barrier(trainer, wait=True)  # at most one save in flight
        self._saver.flush_stats(trainer, log_stats=self.log_stats)
        run = self._run_name(trainer)  # before the dump: our state_dict records it
        plan = SavePlan(
            run=run,
            keep=self.policy,
            keep_optimizer=self.optimizer_policy,
            monitor=self.monitor,
            mode=self.mode,
            head=self.save_last,
            asynchronous=self.async_save,
            sharded=self._sharded,
            resumed_from=self._resumed_from,
        )
        # (no reference kept here: the saver drops the dumped checkpoint once it is snapshotted)
        self._saver.save(
            trainer, trainer._checkpoint_connector.dump_checkpoint(weights_only=self.save_weights_only), plan, t0
        )

    # -------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "last_commit": self.last_commit or self._resumed_from,
            "rng": capture_rng_state(),
            # the train loaders' own generators (DataLoader(generator=...), samplers): Lightning
            # does not save them, so a resumed run would reshuffle from their initial state
            "loader_rng": [g.get_state() for g in loader_generators(self._train_loaders())]
            if self._at_epoch_end
            else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed_run = state_dict.get("run")
        self._resumed_from = state_dict.get("last_commit")
        # (checkpoints of older versions also hold best_k/recent/full_commit: retention is now
        # decided from the repository, so they are not needed)
        if "rng" in state_dict:
            restore_rng_state(state_dict["rng"])
        # the train loaders may not exist yet: applied when the next epoch starts
        self._loader_rng_to_restore = state_dict.get("loader_rng") or None

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        pending, self._loader_rng_to_restore = self._loader_rng_to_restore, None
        if pending is None:
            return
        gens = loader_generators(self._train_loaders())
        if len(gens) != len(pending):
            log.warning(
                "the checkpoint has %d train-loader generator state(s), this run's loaders have %d: "
                "not restoring them (the data order will differ from the uninterrupted run)",
                len(pending),
                len(gens),
            )
            return
        for g, state in zip(gens, pending):
            g.set_state(state.cpu() if hasattr(state, "cpu") else state)
        # Lightning created this epoch's iterator before this hook (in FitLoop.setup_data; at later
        # epochs it does so after the hook), so it already drew its worker seed from the fresh
        # generator: create it again, as Lightning does at every later epoch, so that it draws
        # from the restored state. Stateful loaders restore themselves (Lightning saves them).
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if fetcher is not None and not any(hasattr(dl, "state_dict") for dl in self._train_loaders()):
            iter(fetcher)

    def _train_loaders(self) -> list[Any]:
        trainer = self._trainer
        loaders = getattr(trainer, "train_dataloader", None) if trainer is not None else None
        return flatten_loaders(loaders)

    @property
    def best_k(self) -> dict[str, float]:
        """commit id -> ``monitor`` value of the run's commits that retention keeps (as
        ``ModelCheckpoint.best_k_models``), read from the repository."""
        if self.repo is None or not self.run or not self.monitor:
            return {}
        kept = set(self.repo.refs(keep_prefix(self.run)).values())
        return {
            cid: metrics[self.monitor]
            for cid, _, _, _, _, metrics in self.repo.catalog.run_commit_facts(self.run)
            if cid in kept and isinstance(metrics.get(self.monitor), (int, float))
        }

    def _best_commit(self) -> str | None:
        if self.repo is not None and self.run and self.monitor:
            return self.repo.refs(best_ref(self.run)).get(best_ref(self.run)) or self.last_commit
        return self.last_commit
