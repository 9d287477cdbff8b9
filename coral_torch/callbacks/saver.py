"""`CheckpointSaver`: does the saves that :class:`~coral_torch.callbacks.CoralCheckpoint` decides on.

It owns the repository handle and commits each checkpoint: snapshotted and written by the background
committer, inline, or sharded through the strategy (every rank writes its shards, one commit). It
shares a background failure with every rank at the next save point, holds the commit a run resumed
from, records per-commit stats (logged through the trainer's logger) and pushes to S3 at the end.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from ..errors import CoralCheckpointError, CoralError
from ..format.delta import DeltaConfig
from ..parallel import HelpBoard
from ..repository import CommitStats, Repository
from ..repository.handles import open_repository, repository_location
from ..repository.options import CommitOptions
from ..repository.retain import RetentionReport
from ..retention import KeepAll, KeepNone, Policy
from ..storage.s3_store import S3Config
from .background_sharded import BackgroundShardedSaves
from .snapshot import BackgroundCommitter, SnapshotBuffers

log = logging.getLogger(__name__)

OPTIMIZER_KEY = "optimizer_states"


@dataclass(frozen=True)
class SavePlan:
    """What the callback decided about one save: how to write it and what its commit records.

    ``keep``/``keep_optimizer``/``monitor``/``mode``: the run's retention policy; ``head``: move the
    run's latest ref; ``asynchronous``: write in the background; ``sharded``: every rank writes its
    shards through the strategy; ``resumed_from``: the commit the run resumed from (a delta parent).
    """

    run: str
    keep: Policy
    keep_optimizer: Policy
    monitor: str | None
    mode: str
    head: bool
    asynchronous: bool
    sharded: bool
    resumed_from: str | None


class CheckpointSaver:
    """Commits checkpoints into one repository, in the background or inline, and reports on them."""

    def __init__(self) -> None:
        self.repo: Repository | None = None
        self.repo_path: Path | None = None  # where the repository is, on ranks that do not open it
        self.last_commit: str | None = None
        self.retention: RetentionReport | None = None  # what the last save's retention did
        self.history: list[dict[str, Any]] = []  # per-commit stats, for users and benchmarks
        self.push_stats: dict[str, Any] | None = None
        self.committer: BackgroundCommitter | None = None
        self._commit_workers: int | None = None
        self._help = HelpBoard()  # the training thread joins a save it has to wait for
        self._buffers = SnapshotBuffers()
        self._pending_stats: list[dict[str, Any]] = []
        self._lease: str | None = None  # this process's hold on the commit it resumed from
        self._sharded_submitted: dict[str, Any] = {}  # what a background sharded save records

    # ------------------------------------------------------------------------------ set-up
    def open(
        self,
        location: str | os.PathLike | Repository | None,
        default: Path,
        *,
        here: bool,
        delta_config: DeltaConfig | None,
    ) -> None:
        """Use the repository at ``location`` (else ``default``); only opened where ``here``."""
        if self.repo is not None:
            return
        if isinstance(location, Repository):
            self.repo = location
            return
        where = repository_location(location if location is not None else default)
        if here:
            self.repo = open_repository(where, delta_config=delta_config)
        elif isinstance(where, Path):
            self.repo_path = where

    @property
    def location(self) -> Repository | Path | None:
        """The repository, or its path on a rank that does not open it."""
        return self.repo if self.repo is not None else self.repo_path

    def start(self, *, asynchronous: bool, nice: int | str, workers: int | None) -> None:
        """Start the background committer (once) and set a background save's encoder threads."""
        if self.committer is None and asynchronous:
            self.committer = BackgroundCommitter(nice=nice)
        self._commit_workers = workers

    # ---------------------------------------------------------------------------- lease
    def hold(self, resumed_from: str | None) -> None:
        """Hold the commit this run resumed from until :meth:`release`: no retention removes it."""
        if self.repo is None or self._lease is not None:
            return
        resumed = self.repo.last_loaded or resumed_from
        if resumed is not None and self.repo.catalog.get_commit(resumed) is not None:
            self._lease = self.repo.lease(resumed)

    def release(self, run: str | None, keep: Policy, keep_optimizer: Policy) -> None:
        """Let go of the resumed commit and apply the run's retention policy to it."""
        lease, self._lease = self._lease, None
        if lease is None or self.repo is None:
            return
        try:
            self.repo.end_lease(lease)
            if run:  # what the lease held may now be outside the policy
                self.repo.retain(run, keep, keep_optimizer=keep_optimizer)
        except CoralError as exc:
            log.warning("could not release the hold on the resumed commit (%s); `coral-torch gc` drops it", exc)

    # ----------------------------------------------------------------------------- errors
    def surface_errors(self, trainer: Any, *, log_stats: bool) -> None:
        """Raise a finished background save's failure here (single process)."""
        if self.committer is None:
            return
        try:
            if self.committer.check() is not None:
                self.flush_stats(trainer, log_stats=log_stats)
        except (CoralCheckpointError, KeyboardInterrupt):
            raise
        except BaseException as exc:
            raise CoralCheckpointError(f"background checkpoint save failed: {_reason(exc)}") from exc

    def sync_barrier(self, trainer: Any, *, wait: bool) -> None:
        """Finish/collect the in-flight save on rank 0 and share failure with every rank."""
        error: BaseException | None = None
        if self.committer is not None and trainer.is_global_zero:
            try:
                self.committer.wait(helper=self._help.help) if wait else self.committer.check()
            except KeyboardInterrupt:
                raise  # stays one: Lightning shuts down gracefully, on_exception reports the save
            except BaseException as exc:  # noqa: BLE001
                error = exc
        saves = background_saves(trainer)
        if saves is not None and saves.pending:  # on every rank: each has its part of the save
            try:
                self._collect_sharded(trainer, saves, saves.wait() if wait else saves.check())
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001
                error = error or exc
        failed = error is not None
        if trainer.world_size > 1:
            failed = bool(trainer.strategy.reduce_boolean_decision(failed, all=False))
        if isinstance(error, CoralCheckpointError):
            raise error  # (already says what failed)
        if failed:
            msg = (
                f"background checkpoint save failed: {_reason(error)}"
                if error
                else "checkpoint save failed on another rank"
            )
            raise CoralCheckpointError(msg) from error

    def poll_sharded(self, trainer: Any) -> None:
        """While a background sharded save is pending: one small collective tells every rank whether
        any rank's save failed (then every rank raises) or all finished (then it is collected)."""
        saves = background_saves(trainer)
        if saves is None or not saves.pending:  # the same on every rank: saves start and end together
            return
        flags = torch.tensor([float(saves.failed()), float(saves.running)], device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            flags = trainer.strategy.reduce(flags, reduce_op="sum")
        if flags[0].item() > 0 or flags[1].item() == 0:
            self.sync_barrier(trainer, wait=True)  # raises on every rank, or collects the commit

    def _collect_sharded(self, trainer: Any, saves: BackgroundShardedSaves, cid: str | None) -> None:
        if cid is None:
            return
        self.last_commit = cid
        info, self._sharded_submitted = self._sharded_submitted, {}
        if trainer.is_global_zero:
            self._pending_stats.append(
                dict(info, commit=cid, background_s=saves.last_seconds, staged_bytes=saves.staged_bytes)
            )

    # ------------------------------------------------------------------------------ save
    def save(self, trainer: Any, checkpoint: dict, plan: SavePlan, t0: float) -> None:
        """Commit ``checkpoint`` (dumped at ``t0``) as ``plan`` says; the caller waited for the last save."""
        if plan.sharded:
            self._commit_sharded(trainer, checkpoint, plan, t0)
            return
        if not trainer.is_global_zero:
            return
        if isinstance(plan.keep_optimizer, KeepNone) and OPTIMIZER_KEY in checkpoint:
            checkpoint[OPTIMIZER_KEY] = [_without_param_state(s) for s in checkpoint[OPTIMIZER_KEY]]
        metrics = _metrics(trainer)
        epoch, step = trainer.current_epoch, trainer.global_step
        if plan.asynchronous and self.committer is not None:
            snap = self._buffers.snapshot(checkpoint)
            del checkpoint
            stall = time.perf_counter() - t0
            self.committer.submit(lambda: self._commit(snap, plan, epoch, step, metrics, stall))
        else:
            stall_start = t0
            self._commit(checkpoint, plan, epoch, step, metrics, None)
            self._pending_stats[-1]["stall_s"] = time.perf_counter() - stall_start

    def _commit(
        self, checkpoint: dict, plan: SavePlan, epoch: int, step: int, metrics: dict[str, float], stall: float | None
    ) -> CommitStats:
        """Runs on the background thread (or inline when synchronous)."""
        repo = self.repo
        assert repo is not None
        t0 = time.perf_counter()
        background = stall is not None  # else a synchronous save: the caller waits for it
        cpu0 = time.thread_time()  # with one encoder thread (CPU trainers) all the work is here
        helped0 = self._help.items_helped
        # After a resume the loaded commit is the parent: its tensors are the cached delta bases.
        parent = self.last_commit or repo.last_loaded or plan.resumed_from
        stats = repo.commit(
            checkpoint,
            options=_options(
                plan, epoch, step, metrics, parent=parent, keep_optimizer=plan.keep_optimizer, head=plan.head
            ),
            # optimizer state that retention may strip later is stored whole: it is freed on its own
            no_delta_prefixes=() if isinstance(plan.keep_optimizer, KeepAll) else (f"{OPTIMIZER_KEY}/",),
            workers=self._commit_workers if background else None,
            help_board=self._help if background else None,
            direct_io=background,  # CPU time matters there, not latency
        )
        cid = stats.commit_id
        self.retention = stats.retention
        if stats.retention is not None and cid in stats.retention.stripped:
            cid = stats.retention.stripped[cid] or cid  # keep_optimizer rewrote the new commit itself
        self.last_commit = cid
        background_s = time.perf_counter() - t0
        self._pending_stats.append(
            {
                "commit": cid,
                "epoch": epoch,
                "step": step,
                "bytes_written": stats.written_bytes,
                "logical_bytes": stats.logical_bytes,
                "ratio": stats.ratio,
                "stall_s": stall,
                "background_s": background_s,
                "background_cpu_s": time.thread_time() - cpu0,
                # tensors the training thread encoded itself while it waited for this save
                "helped_items": self._help.items_helped - helped0,
                "new_full": stats.new_full,
                "new_delta": stats.new_delta,
                "deduplicated": stats.deduplicated,
            }
        )
        return stats

    def _commit_sharded(self, trainer: Any, checkpoint: dict, plan: SavePlan, t0: float) -> None:
        """Every rank writes its shards; one commit (see :class:`CoralModelParallelStrategy`)."""
        metrics = _metrics(trainer)
        epoch, step = trainer.current_epoch, trainer.global_step
        options = _options(plan, epoch, step, metrics)
        if plan.asynchronous:
            trainer.strategy.submit_sharded(checkpoint, options=options)
            self._sharded_submitted = {"epoch": epoch, "step": step, "stall_s": time.perf_counter() - t0}
            return
        cid = trainer.strategy.commit_sharded(checkpoint, options=options)
        self.last_commit = cid
        if trainer.is_global_zero:
            self._pending_stats.append(
                {"commit": cid, "epoch": epoch, "step": step, "stall_s": time.perf_counter() - t0}
            )

    # ------------------------------------------------------------------------- the end
    def finish(self, trainer: Any, *, tags: Sequence[str], s3: S3Config | None, log_stats: bool) -> None:
        """At the end of training (rank 0): tag the last commit, log the stats, push to ``s3``."""
        if tags and self.last_commit:
            assert self.repo is not None
            for t in tags:
                self.repo.tag(t, self.last_commit)
        self.flush_stats(trainer, log_stats=log_stats)
        if s3 is not None and self.last_commit:
            self.push(s3)

    def settle(self, trainer: Any, exception: BaseException) -> None:
        """Training stopped with ``exception``: wait for the in-flight save and say what became of it."""
        # The in-flight commit is atomic: let it finish (or fail) and say which, so a user who
        # pressed Ctrl-C knows whether the last checkpoint exists.
        saves = background_saves(trainer)
        if saves is not None and saves.pending:
            _settle("sharded ", exception, saves.wait)
        committer = self.committer
        if committer is not None and committer.pending:

            def wait() -> str | None:
                stats = committer.wait()
                return stats.commit_id if stats is not None else None

            _settle("", exception, wait)

    def close(self) -> None:
        """Wait for the in-flight save (re-raising its error) and stop the background committer."""
        if self.committer is not None:
            try:
                self.committer.wait()
            finally:
                self.committer.shutdown()
                self.committer = None

    def flush_stats(self, trainer: Any, *, log_stats: bool) -> None:
        """Move finished commits' stats into :attr:`history` (and the trainer's logger if ``log_stats``)."""
        pending, self._pending_stats = self._pending_stats, []
        for s in pending:
            self.history.append(s)
            if log_stats and trainer.logger is not None:
                values = {
                    f"coral/{k}": float(v)
                    for k, v in s.items()
                    if isinstance(v, (int, float)) and k not in ("epoch", "step") and v is not None
                }
                try:
                    trainer.logger.log_metrics(values, step=s["step"])
                except Exception as exc:  # noqa: BLE001 - stats must never break training
                    log.warning("could not log checkpoint stats: %s", exc)

    def push(self, s3: S3Config) -> None:
        """Push the repository to ``s3``; a failure is logged (with the command that retries it)."""
        assert self.repo is not None
        try:
            self.push_stats = self.repo.push(s3, progress=None)
            s = self.push_stats
            rank_zero_info(
                f"coral-torch: pushed {s['commits_uploaded']} commit(s) and {s['objects_uploaded']} object(s) "
                f"({s['object_bytes'] / 1e6:.1f} MB; {s['objects_skipped']} already there) to "
                f"{getattr(s3, 'url', s3)} in {s['seconds']:.1f}s"
            )
        except CoralError as exc:
            self.push_stats = {"error": str(exc)}
            log.error(
                "push to S3 failed: %s. Local checkpoints are intact; retry with `%s`",
                exc,
                _push_command(self.repo.path, s3),
            )


def _settle(kind: str, exception: BaseException, wait: Callable[[], str | None]) -> None:
    """Wait for the ``kind`` save in flight (``wait()``: its commit id) and say what became of it."""
    log.warning(
        "training stopped (%s) while a %scheckpoint save was in flight; waiting for it "
        "(Ctrl-C again abandons it: nothing half-written ever becomes visible)",
        type(exception).__name__,
        kind,
    )
    try:
        cid = wait()
        if cid is not None:
            log.warning("the in-flight %scheckpoint save finished: published as commit %s", kind, cid[:10])
    except KeyboardInterrupt:
        log.warning("the in-flight %scheckpoint save was abandoned: nothing of it was published", kind)
    except BaseException as exc:  # noqa: BLE001 - already failing; report, don't mask
        log.error("the in-flight %scheckpoint save failed (%s): nothing of it was published", kind, _reason(exc))


def background_saves(trainer: Any) -> BackgroundShardedSaves | None:
    """The trainer's strategy's background sharded saves (a ``CoralModelParallelStrategy``'s), if any."""
    saves = getattr(trainer.strategy, "background_saves", None)
    return saves if isinstance(saves, BackgroundShardedSaves) else None


def _options(plan: SavePlan, epoch: int, step: int, metrics: dict[str, float], **more: Any) -> CommitOptions:
    """What a commit of the callback records: the run's retention policy keeps it."""
    return CommitOptions(
        run=plan.run,
        epoch=epoch,
        step=step,
        metrics=metrics,
        keep=plan.keep,
        monitor=plan.monitor,
        mode=plan.mode,
        message=f"epoch {epoch} step {step}",
        **more,
    )


def _metrics(trainer: Any) -> dict[str, float]:
    """The trainer's logged metrics that are finite scalars."""
    scalars = {k: _scalar(v) for k, v in trainer.callback_metrics.items()}
    return {k: v for k, v in scalars.items() if v is not None}


def _reason(exc: BaseException) -> str:
    """An exception as a reason: its message, or its type when it has none."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _push_command(repo_path: Any, remote: Any) -> str:
    """The `coral-torch push` command line that retries a failed push (options as the CLI takes them)."""
    cfg = getattr(remote, "config", remote)  # an S3Store or an S3Config
    parts = ["coral-torch", "--repo", str(repo_path), "push", str(getattr(cfg, "url", "s3://BUCKET/PREFIX"))]
    if getattr(cfg, "endpoint_url", None):
        parts += ["--endpoint-url", str(cfg.endpoint_url)]
    if getattr(cfg, "region", None):
        parts += ["--region", str(cfg.region)]
    return " ".join(shlex.quote(p) for p in parts)


def _scalar(v: Any) -> float | None:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            return None
        v = v.detach().float().cpu().item()
    if isinstance(v, (int, float, np.floating, np.integer)):
        f = float(v)
        return f if np.isfinite(f) else None
    return None


def _without_param_state(opt_state: Any) -> Any:
    """An optimizer ``state_dict`` without its per-parameter state (``param_groups`` kept)."""
    return dict(opt_state, state={}) if isinstance(opt_state, dict) and "state" in opt_state else opt_state
