"""Repository upkeep: ``gc``, the reclaim that ref moves trigger, and ``strip_commit``.

:class:`Maintenance` works on one repository through the parts it is given (catalog, lock, object
reader, ref resolution); the repository delegates its ``gc``, ``strip_commit`` and
``release_commits`` here, and calls :meth:`Maintenance.reclaim_released` after each transaction
that moved refs. ``verify`` is :mod:`.verify`. None of it is on the save or load path.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint.pointers import pointer_names, pointer_path_of_ref, read_pointer_file, same_repository
from ..errors import CoralError, IntegrityError, RefNotFoundError, RepositoryError
from ..format import refnames
from ..format.weight_tensor import WeightMetadata, WeightTensor
from ..lazy import LazyModule
from .catalog import Catalog, NewCommit, ObjectRow, commit_object_rows
from .failures import named_errors
from .lock import RepositoryLock
from .packs import PACKS_DIR, PackWriter, new_pack_name, publish_file
from .read import ObjectReader

#: a lease (``leases/<host>/<pid>/<token>``) older than this is dropped by gc even if its holder
#: cannot be checked (another host): the process that resumed from a commit saved long since
LEASE_TTL_S = 7 * 86400.0

if TYPE_CHECKING:
    from ..checkpoint import adapters, sharded
    from ..storage import hdf5_store
else:
    adapters = LazyModule("coral_torch.checkpoint.adapters")
    sharded = LazyModule("coral_torch.checkpoint.sharded")
    hdf5_store = LazyModule("coral_torch.storage.hdf5_store")

log = logging.getLogger(__name__)


class Maintenance:
    """``gc``, reclaim and ``strip_commit`` for the repository at ``path``."""

    def __init__(
        self,
        path: Path,
        catalog: Catalog,
        lock: RepositoryLock,
        reader: ObjectReader,
        resolve: Callable[[str], str],
        codec_level: Callable[[], int],
    ):
        self.path = path
        self.catalog = catalog
        self.lock = lock
        self.reader = reader
        self.resolve = resolve  #: the repository's ref resolution
        self.codec_level = codec_level  #: the repository's current codec level (packs gc writes)

    @named_errors
    def strip_commit(self, ref: str, empty: Sequence[Sequence[str]] = (("optimizer_states", "*", "state"),)) -> str:
        """Replace a commit by one whose containers at the ``empty`` paths are emptied (by
        default: the per-parameter optimizer state, keeping ``param_groups``, so the commit still
        resumes, with fresh optimizer moments). Paths are as in :func:`coral_torch.adapters.prune`.

        The new commit keeps the old one's run, parent, epoch, step, time and metrics and takes over
        all its refs; the old commit is then removed, with what only it used. Returns the new
        commit id (the same id if nothing was emptied).
        """
        cid = self.resolve(ref)
        with self.lock:
            got = self.reader.manifest(cid)
            if got is None:
                raise RefNotFoundError(f"commit {cid} no longer exists in {self.path}")
            row, manifest = got
            if manifest.sharded:
                raise RepositoryError(f"commit {cid[:12]} is sharded (DCP): stripping it is not supported")
            skeleton, kept = adapters.prune(manifest.skeleton, empty)
            if kept is None:
                return cid
            stripped = manifest.subset(skeleton, kept)
            new_id = stripped.commit_id()
            now = time.time()
            info = dict(row.info, derived_from=cid, emptied=["/".join(p) for p in empty])
            hows = {n: how for n, _, how in self.catalog.commit_objects(cid)}
            commit = NewCommit(
                new_id,
                row.parent,
                row.run,
                row.epoch,
                row.step,
                row.time,
                row.message,
                row.metrics,
                stripped.to_json(),
                row.lossy,
                stripped.nbytes,
                0,
                info,
            )
            self.catalog.add_derived_commit(
                commit,
                commit_object_rows(
                    new_id, [(e.name, e.hash) for e in stripped.tensors], lambda n, h: hows.get(n, "dedup")
                ),
                replaces=cid,
                now=now,
            )
            if new_id != cid:
                self.reclaim_released([cid])
            return new_id

    # ================================================================================= gc
    @named_errors
    def gc(
        self, *, dry_run: bool = False, repack_threshold: float = 0.3, orphan_grace_s: float = 3600.0
    ) -> dict[str, Any]:
        """Remove commits no ref points to, objects no remaining commit needs, and reclaim disk by
        deleting or rewriting packs (a pack is rewritten when >= ``repack_threshold`` of it is dead).

        Moving or deleting refs already does this for the commits it releases (see
        :meth:`delete_ref`); ``gc`` sweeps the whole repository: what older versions or interrupted
        runs left, and files in ``packs/`` the catalog does not know. Packs are written without the
        lock and published afterwards, so an unknown file is removed only once it was not modified
        for ``orphan_grace_s`` seconds (a file being written keeps a fresh mtime; a finished one
        waits for its publish)."""
        with self.lock:
            cat = self.catalog
            dead_refs = self._dead_refs(orphan_grace_s)
            if not dry_run and dead_refs:
                cat.update_refs(drop=dead_refs, now=time.time())
            live_commits = {cid for name, cid in cat.refs().items() if name not in dead_refs}
            all_commits = {r.id for r in cat.commits()}
            dead_commits = all_commits - live_commits
            rows = {r.hash: r for r in cat.all_objects()}
            live: set[str] = set()
            h: str | None
            for cid in live_commits:
                for _, h, _ in cat.commit_objects(cid):
                    while h is not None and h not in live:
                        live.add(h)
                        r = rows.get(h)
                        h = r.base if r is not None and r.kind == "delta" else None
            dead_objects = set(rows) - live
            packs_dir = self.path / PACKS_DIR
            known = cat.packs()
            unknown = [f for f in packs_dir.iterdir() if f.name not in known] if packs_dir.exists() else []
            cutoff = time.time() - orphan_grace_s
            orphans = [f for f in unknown if _mtime(f) <= cutoff]
            before = _dir_bytes(packs_dir)
            stats = self._reclaim(
                dead_commits, dead_objects, list(known), rows, dry_run=dry_run, repack_threshold=repack_threshold
            )
            stats.update(
                dead_refs=sorted(dead_refs),
                orphan_files_removed=len(orphans),
                orphan_files_kept=len(unknown) - len(orphans),
                bytes_before=before,
                bytes_reclaimable=stats["bytes_reclaimable"] + sum(_size(f) for f in orphans),
            )
            if dry_run:
                return stats
            for f in orphans:
                f.unlink(missing_ok=True)
            cat.checkpoint()
            after = _dir_bytes(packs_dir)
            stats["bytes_after"] = after
            stats["bytes_reclaimed"] = before - after
            return stats

    @named_errors
    def release_commits(
        self, candidates: Iterable[str], *, dry_run: bool = False, dropping: Iterable[str] = ()
    ) -> dict[str, Any] | None:
        """Remove those of ``candidates`` that no ref keeps (refs in ``dropping`` not counted: a
        dry run asks what dropping them would free), the objects only they needed, and the pack
        space those held; returns :meth:`gc`-style stats, or None when nothing would go."""
        with self.lock:
            if dry_run:
                gone = set(dropping)
                dead = [
                    c
                    for c in dict.fromkeys(candidates)
                    if self.catalog.get_commit(c) is not None and not (set(self.catalog.refs_of(c)) - gone)
                ]
                return self.reclaim_released(dead, dead_commits=dead, dry_run=True)
            return self.reclaim_released(candidates)

    def _dead_refs(self, grace_s: float) -> list[str]:
        """Refs that keep nothing a user can reach any more, older than ``grace_s`` (a save in
        flight publishes its ref before it writes the pointer file): ``files/`` refs whose pointer
        file is gone, damaged or now names another commit or repository; leases of processes that
        ended on this host or are older than :data:`LEASE_TTL_S`; and the ``saves/`` refs of older
        versions of the DCP writer."""
        now = time.time()
        host = socket.gethostname()
        dead = []
        for name, cid, updated in self.catalog.ref_rows():
            if name.startswith(refnames.LEGACY_SAVES):
                dead.append(name)
            elif name.startswith(refnames.LEASES):
                if now - updated > LEASE_TTL_S or not lease_alive(name[len(refnames.LEASES) :], host):
                    dead.append(name)
            elif name.startswith(refnames.FILES) and now - updated > grace_s:
                path = pointer_path_of_ref(name, self.path)
                if path is not None and not pointer_names(path, cid, self.path) and not self._names_rewrite(path, cid):
                    dead.append(name)
        return dead

    def _names_rewrite(self, path: Path, cid: str) -> bool:
        """True if the pointer file at ``path`` names a commit that retention rewrote into ``cid``."""
        try:
            p = read_pointer_file(path)
        except (OSError, CoralError):
            return False
        if p is None or not same_repository(p.repo, self.path):
            return False
        try:
            return self.resolve(p.commit) == cid
        except CoralError:
            return False

    def reclaim_released(
        self,
        candidates: Iterable[str],
        repack_threshold: float = 0.3,
        *,
        dead_commits: list[str] | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any] | None:
        """Remove those of ``candidates`` (commits a ref just moved away from) that no ref keeps now,
        the objects only they needed, and the pack space those held. Bounded by what was released:
        only these commits' objects and their delta bases are examined, and only their packs are
        rewritten. Called with the write lock held, after the transaction that moved the refs: a
        crash in between leaves unreferenced commits for :meth:`gc`, never a missing object.
        ``dead_commits``: the commits to treat as removed (a dry run's what-if)."""
        cat = self.catalog
        if dead_commits is None:
            dead_commits = cat.unreferenced(candidates)
        if not dead_commits:
            return None
        work = list(dict.fromkeys(h for c in dead_commits for _, h, _ in cat.commit_objects(c)))
        dead: set[str] = set()
        rows: dict[str, ObjectRow] = {}
        base_only: dict[str, ObjectRow] = {}  # listed by no remaining commit, kept as a delta base
        flattened = False
        moved_from: list[str] = []  # packs whose objects were stored whole elsewhere
        while True:
            while work:
                h = work.pop()
                if h in dead:
                    continue
                row = cat.get_object(h)
                if row is None:
                    continue
                # live while a remaining commit lists it or a live delta is stored against it
                if cat.used_by_other_commits(h, dead_commits):
                    continue
                if any(child not in dead for child in cat.delta_children(h)):
                    base_only[h] = row
                    continue
                base_only.pop(h, None)
                dead.add(h)
                rows[h] = row
                if row.kind == "delta" and row.base:
                    work.append(row.base)  # its base may have been kept alive by this delta only
            if dry_run or flattened or not base_only:
                break
            # kept commits whose delta bases were released: store those deltas whole where that
            # frees more than it costs, so the released chain goes too; then look again
            work, moved_from = self._flatten_chains(base_only, dead)
            flattened = True
        stats = self._reclaim(
            set(dead_commits),
            dead,
            [r.pack for r in rows.values()] + moved_from,
            None,
            dry_run=dry_run,
            repack_threshold=repack_threshold,
        )
        stats["bytes_freed"] = sum(r.stored_bytes for r in rows.values())
        if dry_run:
            return stats
        log.info(
            "released %d commit(s): %d object(s), %d pack(s) removed, %d rewritten",
            stats["commits_removed"],
            stats["objects_removed"],
            stats["packs_removed"],
            stats["packs_rewritten"],
        )
        return stats

    def _flatten_chains(self, base_only: dict[str, ObjectRow], dead: set[str]) -> tuple[list[str], list[str]]:
        """Released commits often leave objects that only delta chains of kept commits need (the
        previous keyframe of a run that keeps its latest N). Per group of such objects, store the
        kept deltas on top of it whole when the group's bytes exceed what that costs (their full
        encoding minus their delta); the group then has no live child left. Each rewritten object
        keeps its content hash, so every commit listing it is unchanged; its new row replaces the
        old one in one transaction after the new pack is durable (a crash before leaves an orphan
        pack file, after it objects that only gc still has to remove). Returns the group members,
        to be examined again, and the packs the rewritten objects left."""
        cat = self.catalog
        seen: set[str] = set()
        rewrite: dict[str, ObjectRow] = {}
        for start in base_only:
            if start in seen:
                continue
            group, tops, stack = set(), {}, [start]
            while stack:  # the connected group of base-only objects, and the live deltas on top
                h = stack.pop()
                if h in group:
                    continue
                group.add(h)
                row = base_only[h]
                if row.kind == "delta" and row.base in base_only:
                    stack.append(row.base)
                for child in cat.delta_children(h):
                    if child in base_only:
                        stack.append(child)
                    elif child not in dead and child not in tops:
                        crow = cat.get_object(child)
                        if crow is not None:
                            tops[child] = crow
            seen |= group
            freed = sum(base_only[h].stored_bytes for h in group)
            cost = sum(max(0, t.full_estimate - t.stored_bytes) for t in tops.values())
            if tops and freed > cost:
                rewrite.update(tops)
        if not rewrite:
            return [], []
        writer = PackWriter(self.path, codec_level=self.codec_level())
        new_rows = []
        try:
            for h, row in rewrite.items():
                try:
                    raw = self.reader.build(self.reader.chain(h))
                except (CoralError, OSError) as exc:  # damaged: leave its chain as it is
                    log.warning("not rewriting object %s whole: %s", h[:12], exc)
                    continue
                w = WeightTensor.from_raw(raw, WeightMetadata(name="", shape=row.shape, dtype=row.dtype))
                prep = writer.store.prepare(w, h)
                location = writer.write(prep)
                offset, length = location if location is not None else (None, None)
                new_rows.append(
                    ObjectRow(
                        h,
                        writer.name,
                        "full",
                        None,
                        0,
                        row.dtype,
                        row.shape,
                        row.nbytes,
                        prep.stored_bytes,
                        prep.stored_bytes,
                        True,
                        offset,
                        length,
                    )
                )
            if not new_rows:
                writer.abort()
                return [], []
            pack = writer.finish()
        except BaseException:
            writer.abort()
            raise
        cat.add_objects((pack.name, pack.size, time.time()), new_rows)
        log.info(
            "stored %d delta object(s) of kept commits whole (%.1f MB) to release their bases",
            len(new_rows),
            sum(r.stored_bytes for r in new_rows) / 1e6,
        )
        done = {r.hash for r in new_rows}
        return list(base_only), [row.pack for h, row in rewrite.items() if h in done]

    def _reclaim(
        self,
        dead_commits: set[str],
        dead_objects: set[str],
        packs: Iterable[str],
        rows: dict[str, ObjectRow] | None,
        *,
        dry_run: bool,
        repack_threshold: float,
    ) -> dict[str, Any]:
        """Delete ``dead_commits`` and ``dead_objects`` from the catalog and reclaim the space of
        ``packs``: a pack with nothing live is deleted, one with >= ``repack_threshold`` of its
        bytes dead is rewritten (temp -> fsync -> rename) with its live objects. ``rows``: every
        object row of those packs when the caller has them already."""
        cat = self.catalog
        packs = list(dict.fromkeys(packs))
        per_pack: dict[str, list[ObjectRow]] = {p: [] for p in packs}
        for r in rows.values() if rows is not None else cat.objects_in_packs(packs):
            if r.pack in per_pack:
                per_pack[r.pack].append(r)
        remove_packs, rewrite_packs = [], []
        reclaimable = 0
        sizes = cat.packs()
        for p in packs:
            objs = per_pack[p]
            dead = sum(o.stored_bytes for o in objs if o.hash in dead_objects)
            reclaimable += dead
            live = sum(o.stored_bytes for o in objs) - dead
            # the file's size, not the listed objects' sum: objects moved elsewhere (stored whole
            # again, healed) left their old bytes behind in it
            total = max(sizes.get(p) or 0, live + dead) or 1
            if all(o.hash in dead_objects for o in objs):
                remove_packs.append(p)
            elif (total - live) / total >= repack_threshold:
                rewrite_packs.append(p)
        stats = {
            "dry_run": dry_run,
            "commits_removed": len(dead_commits),
            "objects_removed": len(dead_objects),
            "packs_removed": len(remove_packs),
            "packs_rewritten": len(rewrite_packs),
            "bytes_reclaimable": reclaimable,
        }
        if dry_run:
            return stats
        packs_dir = self.path / PACKS_DIR
        moved: dict[str, tuple] = {}
        new_pack_rows = []
        written: list[Path] = []
        try:
            for p in rewrite_packs:
                keep = [o for o in per_pack[p] if o.hash not in dead_objects]
                name = new_pack_name()
                tmp = packs_dir / f".tmp-{name}"
                src = self.reader.pack_store(p)
                dst = hdf5_store.HDF5Store(tmp, mode="x")
                try:
                    for o in keep:
                        prep = src.read_prepared(o.hash, "deltas" if o.kind == "delta" else "weights")
                        if prep is None:
                            raise IntegrityError(f"object {o.hash} is missing from pack {p}", hash_key=o.hash)
                        dst.write_prepared(prep)
                        moved[o.hash] = (name, *(prep.location or (None, None)))
                    dst.close()
                    publish_file(tmp, packs_dir / name)
                    written.append(packs_dir / name)
                except BaseException:
                    dst.close()
                    tmp.unlink(missing_ok=True)
                    raise
                new_pack_rows.append((name, (packs_dir / name).stat().st_size, time.time()))
            cat.apply_reclaim(
                new_packs=new_pack_rows,
                moved=moved,
                dead_objects=dead_objects,
                dead_commits=dead_commits,
                dropped_packs=remove_packs + rewrite_packs,
            )
        except BaseException:
            for f in written:  # not published: the old packs still hold everything
                f.unlink(missing_ok=True)
            raise
        self.reader.drop(remove_packs + rewrite_packs)
        return stats


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # renamed or removed by a writer meanwhile (packs need no lock)
        return 0


def _dir_bytes(path: Path) -> int:
    return sum(_size(f) for f in path.iterdir()) if path.exists() else 0


def lease_holder(token: str) -> str:
    """The holder part of a lease ref for this process: ``<host>/<pid>/<token>``."""
    return f"{socket.gethostname()}/{os.getpid()}/{token}"


def lease_alive(holder: str, host: str) -> bool:
    """Whether the process a lease names may still run: True unless it ran on this host and its
    PID is gone (a lease from another host is trusted until it expires)."""
    parts = holder.split("/")
    if len(parts) != 3 or parts[0] != host:
        return parts[0] != host  # another host's lease; a malformed one of ours is dead
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True
