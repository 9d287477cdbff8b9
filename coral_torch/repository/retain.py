"""Applying a retention policy (:mod:`coral_torch.retention`) to one run of a repository.

The policy's decision comes from the catalog alone (see :mod:`coral_torch.retention`); applying it:

1. under the write lock, the run's retention refs (``runs/<run>/keep/<id>``; the ``top/`` refs of
   older versions are taken over) are made to name exactly the commits the policy keeps, in one
   catalog transaction; with ``release_files``, the pointer files (and their ``files/`` refs) of
   the commits it dropped go too, the file first, so a crash leaves a ref that gc drops;
2. commits no ref keeps any more are removed with whatever only they used (objects a kept commit
   needs, delta bases included, stay: liveness is decided per object, after the refs moved);
3. commits that survive but that ``keep_optimizer`` does not select are rewritten without their
   per-parameter optimizer state (:meth:`Repository.strip_commit`).

Other refs are never touched: ``latest``, ``best``, tags, ``keep/<id>``, leases (a running resume's
hold on its commit) keep their commits whatever the policy says. A process killed at any point
loses nothing kept: every step is one transaction, and removal follows the ref changes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..checkpoint.pointers import pointer_names, pointer_path_of_ref, write_pointer
from ..errors import CoralError
from ..format import refnames
from ..location import S3Location
from ..retention import CommitFacts, KeepAll, Policy
from .catalog import Catalog
from .lock import RepositoryLock


class RetainTarget(Protocol):
    """What applying retention needs of a repository (its :class:`Repository`, in practice)."""

    path: Path
    catalog: Catalog
    lock: RepositoryLock

    @property
    def location(self) -> Path | S3Location: ...

    def release_commits(
        self, candidates: Iterable[str], *, dry_run: bool = False, dropping: Iterable[str] = ()
    ) -> dict[str, Any] | None: ...

    def strip_commit(self, ref: str, empty: Sequence[Sequence[str]] = ...) -> str: ...

    def commits_with_tensor(self, run: str, pattern: str) -> list[str]: ...

    def stats(self) -> dict[str, Any]: ...


log = logging.getLogger(__name__)

#: what ``keep_optimizer`` empties in a Lightning checkpoint (``param_groups`` stay, so it resumes)
OPTIMIZER_STATE = ("optimizer_states", "*", "state")
#: catalog glob of the tensors that make a commit one "with optimizer state"
OPTIMIZER_GLOB = "optimizer_states/*/state/*"


@dataclass
class RetentionReport:
    """What applying a policy to a run did (or, in a dry run, would do)."""

    run: str
    dry_run: bool
    kept: list[str] = field(default_factory=list)  #: commits the policy keeps, oldest first
    dropped: list[str] = field(default_factory=list)  #: commits of the run it does not keep
    removed: list[str] = field(default_factory=list)  #: of those, removed (no other ref holds them)
    held: dict[str, list[str]] = field(default_factory=dict)  #: dropped but held by other refs
    stripped: dict[str, str] = field(default_factory=dict)  #: commit -> its rewrite without optimizer state
    files_removed: list[str] = field(default_factory=list)  #: pointer files deleted
    bytes_freed: int = 0  #: pack bytes reclaimed (a dry run: an estimate of the payload bytes)


def apply_retention(
    repo: RetainTarget,
    run: str,
    keep: Policy,
    *,
    keep_optimizer: Policy | None = None,
    release_files: bool = False,
    dry_run: bool = False,
) -> RetentionReport:
    """Apply ``keep`` (and ``keep_optimizer``) to ``run``; see the module docstring."""
    refnames.validate_component(run, "run")
    cat = repo.catalog
    report = RetentionReport(run, dry_run)
    with repo.lock:
        facts = [
            CommitFacts(cid, t, seq, epoch, step, metrics)
            for cid, t, seq, epoch, step, metrics in cat.run_commit_facts(run)
        ]
        ids = [f.id for f in facts]
        kept = keep.select(facts)
        report.kept = [c for c in ids if c in kept]
        report.dropped = [c for c in ids if c not in kept]
        dropped = set(report.dropped)

        owned = dict(cat.refs(refnames.run_keep_prefix(run)))
        owned.update(cat.refs(refnames.legacy_top_prefix(run)))
        want = {refnames.run_keep_ref(run, c): c for c in report.kept}
        add = [(n, c) for n, c in want.items() if owned.get(n) != c]
        drop = [n for n in owned if n not in want]
        files: list[tuple[str, str, Path]] = []  # (ref, commit, pointer file)
        if release_files and dropped:
            for name, cid in cat.refs(refnames.FILES).items():
                path = pointer_path_of_ref(name, repo.path)
                if cid in dropped and path is not None:
                    files.append((name, cid, path))
            drop += [n for n, _, _ in files]
        gone = set(drop)
        for c in report.dropped:
            others = [n for n in cat.refs_of(c) if n not in gone]
            if others:
                report.held[c] = others
        report.removed = [c for c in report.dropped if c not in report.held]
        strip = _to_strip(repo, run, facts, keep_optimizer, set(report.removed))

        if dry_run:
            stats = repo.release_commits(report.removed, dry_run=True, dropping=gone) if report.removed else None
            report.bytes_freed = stats["bytes_freed"] if stats else 0
            report.stripped = {c: "" for c in strip}
            report.files_removed = [str(p) for _, cid, p in files if pointer_names(p, cid, repo.location)]
            return report

        before = _packs_bytes(repo)
        for _, cid, path in files:  # the file first: a crash then leaves a dead ref, which gc drops
            if pointer_names(path, cid, repo.location):
                path.unlink(missing_ok=True)
                report.files_removed.append(str(path))
        if add or drop:
            cat.update_refs(add=add, drop=drop, now=time.time())
        if report.removed:
            repo.release_commits(report.removed)
        for c in strip:
            try:
                report.stripped[c] = new = repo.strip_commit(c, (OPTIMIZER_STATE,))
            except CoralError as exc:
                log.warning("commit %s keeps its optimizer state: %s", c[:10], exc)
                continue
            # pointer files of the rewritten commit name the new id (the old one still resolves to it)
            for name in cat.refs_of(new):
                path = pointer_path_of_ref(name, repo.path)
                if path is not None and pointer_names(path, c, repo.location):
                    write_pointer(path, new, repo.location)
        report.bytes_freed = max(0, before - _packs_bytes(repo))
    if report.removed or report.stripped:
        log.info(
            "retention of run %s: kept %d commit(s), removed %d, stripped %d of optimizer state, freed %.1f MB",
            run,
            len(report.kept),
            len(report.removed),
            len(report.stripped),
            report.bytes_freed / 1e6,
        )
    return report


def _to_strip(
    repo: RetainTarget, run: str, facts: list[CommitFacts], keep_optimizer: Policy | None, removed: set[str]
) -> list[str]:
    """Surviving commits holding per-parameter optimizer state that ``keep_optimizer`` does not select."""
    if keep_optimizer is None or isinstance(keep_optimizer, KeepAll):
        return []
    want = keep_optimizer.select(facts)
    holders = set(repo.commits_with_tensor(run, OPTIMIZER_GLOB))
    return [f.id for f in facts if f.id in holders and f.id not in want and f.id not in removed]


def _packs_bytes(repo: RetainTarget) -> int:
    return int(repo.stats()["disk_bytes"])


__all__ = ["OPTIMIZER_GLOB", "OPTIMIZER_STATE", "RetentionReport", "apply_retention"]
