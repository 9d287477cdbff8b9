"""The node-local cache of an S3 repository: its directory, its byte budget and LRU eviction.

An :class:`~.s3_repository.S3Repository` works through a plain local repository, its cache (one
directory per endpoint, bucket and prefix: :func:`cache_path`), which holds the commits and refs of
the bucket and the objects this node wrote or read. :class:`CacheKeeper` keeps it to a byte budget
(``cache_bytes``; default ``$CORAL_CACHE_BYTES``, else 20 GiB: see :func:`cache_budget`) on its
pack files, and brings back from the bucket the objects a read needs that the cache lacks.

When a save, a shard written, a fetch or a read leaves the cache over budget, the least recently
used packs are evicted until it is under :data:`EVICT_TO` of it: their objects leave the cache's
catalog in one transaction, then the files go. Commits and refs stay, so ``log``, ``refs``,
``resolve`` and retention see every commit; a read fetches from the bucket, verified, the objects it
lacks (:meth:`CacheKeeper.restore`). Never evicted: what the current operation uses, the run heads
this node used last (a next save deltas against them) while they fit, and objects the bucket lacks.
Last use, per commit and per pack, and the packs an eviction is removing are kept in ``lru.json`` in
the cache directory (see :class:`CacheUse`): a crash at any point leaves a cache that opens and
verifies, and the files a crashed eviction left are removed when it is next opened.

Processes that share a cache directory share its budget and its ``lru.json``, safely: evictions,
the fetches that bring objects back and every update of ``lru.json`` hold the repository lock
(``flock``); packs being written are not in the catalog, so an eviction never takes them (and files
no catalog names are only removed after :data:`ORPHAN_GRACE_S`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

from ..defaults import CACHE_BYTES_ENV, DEFAULT_CACHE_BYTES, default_cache_dir
from ..errors import CoralError, CorruptObjectError, RemoteConfigError, SyncIncompleteError
from ..format import refnames
from ..format.objects import DELTAS, WEIGHTS
from ..location import S3Location
from ..storage.s3.store import S3Store
from .catalog import Catalog, ObjectRow
from .lock import RepositoryLock
from .packs import PACKS_DIR, fsync_path
from .read import ObjectReader
from .remote.pulling import MAX_PASSES, PackSink, download_objects
from .verify import VerifyReport

log = logging.getLogger(__name__)

__all__ = ["CacheKeeper", "CacheUse", "cache_budget", "cache_path", "LRU_FILE", "EVICT_TO", "ORPHAN_GRACE_S"]

#: the cache's record of use (see :class:`CacheUse`), in the cache directory
LRU_FILE = "lru.json"
#: an eviction goes on until the cache's packs take at most this fraction of its budget
EVICT_TO = 0.8
#: a file in the cache's ``packs/`` that its catalog does not name (a writer's pack not yet
#: published, or one a crashed writer left) is removed once it was not modified for this long
ORPHAN_GRACE_S = 3600.0
_SIZE = re.compile(r"(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def cache_budget(value: int | str | None = None) -> int:
    """The cache's byte budget: ``value`` (bytes, or a string such as ``"500M"`` or ``"20G"``: a K, M,
    G or T suffix counts powers of 1024), else ``$CORAL_CACHE_BYTES``, else
    :data:`~coral_torch.defaults.DEFAULT_CACHE_BYTES` (20 GiB).

    Raises:
        RemoteConfigError: the value (naming ``$CORAL_CACHE_BYTES`` when it came from there) is not a
            byte count.
    """
    what = "cache_bytes"
    if value is None:
        value = os.environ.get(CACHE_BYTES_ENV, "").strip()
        if not value:
            return DEFAULT_CACHE_BYTES
        what = f"${CACHE_BYTES_ENV}"
    n: float = -1
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())):
        n = float(m[1]) * 1024 ** " kmgt".index((m[2] or " ").lower())
    if n < 0 or not math.isfinite(n):
        raise RemoteConfigError(
            f"{what}={value!r} is not a byte count: give bytes, or a number with a K, M, G or T suffix "
            "(powers of 1024), e.g. 500M or 20G"
        )
    return int(n)


def cache_path(location: S3Location, endpoint: str | None, root: str | os.PathLike | None = None) -> Path:
    """The cache directory of an S3 repository: one per endpoint, bucket and prefix."""
    where = f"{endpoint or 'aws'}|{location.url}"
    tag = hashlib.sha256(where.encode()).hexdigest()[:16]
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{location.bucket}_{location.prefix}")[:80]
    return Path(root if root is not None else default_cache_dir()) / "s3" / f"{readable}-{tag}"


class CacheUse:
    """``lru.json`` in a cache directory: when this node last used each commit and pack (Unix time),
    and the packs an eviction is removing (its intent: files a crash left behind are removed the
    next time the cache opens). Hints only, never trusted for data: a damaged file starts afresh, and
    an ``evicting`` entry only removes a file the catalog does not name. Read and written under the
    repository lock; written atomically (temporary file, fsync, rename, fsync of the directory)."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / LRU_FILE
        self.commits: dict[str, float] = {}
        self.packs: dict[str, float] = {}
        self.evicting: list[str] = []

    @classmethod
    def read(cls, directory: Path) -> CacheUse:
        use = cls(directory)
        try:
            doc = json.loads(use.path.read_text())
        except FileNotFoundError:
            return use
        except (OSError, ValueError) as exc:
            log.warning("%s is unreadable (%s): the cache's record of use starts afresh", use.path, exc)
            return use
        if isinstance(doc, dict):
            use.commits = _times(doc.get("commits"))
            use.packs = _times(doc.get("packs"))
            names = doc.get("evicting")
            use.evicting = [n for n in names if _plain_name(n)] if isinstance(names, list) else []
        return use

    def write(self) -> None:
        tmp = self.path.with_name(f".{LRU_FILE}.tmp")
        doc = {"version": 1, "commits": self.commits, "packs": self.packs, "evicting": self.evicting}
        with open(tmp, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_path(self.path.parent)


class CacheKeeper:
    """Keeps the cache repository at ``path`` (its ``catalog``, ``reader`` and ``lock``) to ``budget``
    bytes of packs, and fetches from ``store`` (the bucket) the objects it lacks (see the module
    docstring). ``sink()`` gives a :class:`~.remote.pulling.PackSink` into the cache repository (one
    new pack); ``writable``: whether the cache directory may be written (else nothing is evicted or
    recorded)."""

    def __init__(
        self,
        path: Path,
        catalog: Catalog,
        reader: ObjectReader,
        lock: RepositoryLock,
        store: S3Store,
        budget: int,
        *,
        sink: Callable[[], PackSink],
        writable: bool = True,
    ):
        self.path = Path(path)
        self.catalog = catalog
        self.reader = reader
        self.lock = lock
        self.store = store
        self.budget = budget  #: bytes the cache's packs may take (see :meth:`evict`)
        self.sink = sink
        self.writable = writable

    def recover(self) -> None:
        """Remove the files an interrupted eviction left (when the cache is opened)."""
        if self.writable and CacheUse.read(self.path).evicting:
            with self.lock:
                self._finish_eviction(CacheUse.read(self.path))

    def usage(self) -> int:
        """Bytes the cache's ``packs/`` directory takes (every file in it): what the budget counts."""
        total = 0
        try:
            entries = list(os.scandir(self.path / PACKS_DIR))
        except FileNotFoundError:
            return 0
        for e in entries:
            try:
                total += e.stat(follow_symlinks=False).st_size
            except FileNotFoundError:  # published or removed meanwhile
                pass
        return total

    # ------------------------------------------------------------------------------ eviction
    def evict(self, keep: Collection[str] = ()) -> dict[str, Any] | None:
        """If the cache takes more than :attr:`budget` (see :meth:`usage`), evict the least recently
        used packs until it takes at most :data:`EVICT_TO` of it; returns what was evicted
        (``packs``, ``objects``, ``bytes_before``, ``bytes_after``, ``budget``; None: nothing).

        Never evicted: the packs holding ``keep`` (object hashes) and their delta bases; the run
        heads (``runs/<run>/latest``) this node used, most recent first, while they fit; packs with
        an object the bucket lacks (one listing of the bucket's objects tells). A pack goes with the
        packs holding deltas against it (a delta never outlives its base). The catalog forgets the
        packs and their objects in one transaction, then their files are removed; commits and refs
        stay (a read fetches their objects again, see :meth:`restore`). The packs are recorded in
        ``lru.json`` first, so files a crash leaves behind are removed when the cache next opens or
        evicts."""
        if not self.writable or self.usage() <= self.budget:
            return None
        with self.lock:
            use = CacheUse.read(self.path)
            self._finish_eviction(use)
            usage = self.usage()
            if usage <= self.budget:
                return None
            chosen, touched = self._eviction_plan(use, set(keep), usage, int(self.budget * EVICT_TO))
            if not chosen:
                log.warning(
                    "the cache %s takes %.1f MB, over its budget of %.1f MB, and nothing more can be evicted "
                    "(what the current operation uses, or objects the bucket lacks)",
                    self.path,
                    usage / 1e6,
                    self.budget / 1e6,
                )
                return None
            use.evicting = chosen
            use.write()
            dead = [r.hash for r in self.catalog.objects_in_packs(chosen)]
            self.catalog.apply_reclaim(new_packs=[], moved={}, dead_objects=dead, dead_commits=[], dropped_packs=chosen)
            self.reader.drop(chosen)  # closes this process's handles and removes the files
            use.evicting = []
            for name in chosen:
                use.packs.pop(name, None)
            use.commits = {c: t for c, t in use.commits.items() if c not in touched or touched[c]}
            known = self.catalog.packs()
            use.packs = {p: t for p, t in use.packs.items() if p in known}
            use.write()
            after = self.usage()
        return {
            "packs": len(chosen),
            "objects": len(dead),
            "bytes_before": usage,
            "bytes_after": after,
            "budget": self.budget,
        }

    def keep_budget(self, keep: Collection[str] = ()) -> dict[str, Any] | None:
        """:meth:`evict` after an operation, which has succeeded whatever the eviction meets (what
        it meets is logged, and nothing returned)."""
        try:
            return self.evict(keep)
        except (CoralError, OSError, sqlite3.Error) as exc:
            log.warning("the cache %s could not be brought under its budget: %s", self.path, exc)
            return None

    def _eviction_plan(
        self, use: CacheUse, keep: set[str], usage: int, target: int
    ) -> tuple[list[str], dict[str, bool]]:
        """(the packs to evict, oldest first; {commit recorded in ``use``: whether it keeps a pack})."""
        rows = {r.hash: r for r in self.catalog.all_objects()}
        packs_dir = self.path / PACKS_DIR
        size = {p: _file_size(packs_dir / p) for p in self.catalog.packs()}
        in_pack: dict[str, list[ObjectRow]] = {p: [] for p in size}
        dependents: dict[str, set[str]] = {}  # pack -> packs holding deltas against its objects
        for r in rows.values():
            in_pack.setdefault(r.pack, []).append(r)
            base = rows.get(r.base) if r.kind == "delta" and r.base else None
            if base is not None and base.pack != r.pack:
                dependents.setdefault(base.pack, set()).add(r.pack)

        def packs_of(hashes: Iterable[str]) -> set[str]:
            return {rows[h].pack for h in _closure(hashes, rows.get) if h in rows}

        # a pack was last used when it was, or a commit whose objects (or their bases) it holds was;
        # a base's pack as late as the packs of the deltas against it
        last = {p: use.packs.get(p, 0.0) for p in size}
        commit_packs = {c: packs_of(h for _, h, _ in self.catalog.commit_objects(c)) for c in use.commits}
        for c, ps in commit_packs.items():
            for p in ps & last.keys():
                last[p] = max(last[p], use.commits[c])
        changed = True
        while changed:
            changed = False
            for p, deps in dependents.items():
                t = max(last.get(q, 0.0) for q in deps)
                if t > last.get(p, 0.0):
                    last[p], changed = t, True
        protected = packs_of(keep)
        heads = {c for n, c in self.catalog.refs(refnames.RUNS).items() if n.endswith("/latest") and c in use.commits}
        for c in sorted(heads, key=lambda c: -use.commits[c]):
            more = commit_packs[c] - protected
            if sum(size.get(p, 0) for p in protected | more) <= target:
                protected |= more
        on_bucket: set[str] | None = None  # listed once, when a first pack could go
        chosen: list[str] = []
        gone: set[str] = set()
        freed = 0
        for p in sorted(size, key=lambda p: (last.get(p, 0.0), p)):
            if usage - freed <= target:
                break
            if p in gone or p in protected:
                continue
            group, todo = {p}, [p]
            while todo:
                for q in dependents.get(todo.pop(), ()):
                    if q not in group and q not in gone:
                        group.add(q)
                        todo.append(q)
            if group & protected:
                continue
            if on_bucket is None:
                present = self.store.objects.present()
                on_bucket = {f"{WEIGHTS}/{h}" for h in present.get(WEIGHTS, {})}
                on_bucket |= {f"{DELTAS}/{h}" for h in present.get(DELTAS, {})}
            if any(
                f"{DELTAS if r.kind == 'delta' else WEIGHTS}/{r.hash}" not in on_bucket
                for q in group
                for r in in_pack.get(q, [])
            ):
                continue
            chosen.extend(sorted(group))
            gone |= group
            freed += sum(size.get(q, 0) for q in group)
        return chosen, {c: bool(ps - gone) for c, ps in commit_packs.items()}

    def _finish_eviction(self, use: CacheUse) -> None:
        """Remove the files of packs an interrupted eviction took out of the catalog, and files in
        ``packs/`` the catalog does not name that were not modified for :data:`ORPHAN_GRACE_S`
        (caller holds the lock)."""
        known = self.catalog.packs()
        packs_dir = self.path / PACKS_DIR
        if use.evicting:
            gone = [n for n in use.evicting if n not in known]
            for name in gone:
                (packs_dir / name).unlink(missing_ok=True)
            log.info("removed %d file(s) of an interrupted eviction from %s", len(gone), packs_dir)
            use.evicting = []
            use.write()
        cutoff = time.time() - ORPHAN_GRACE_S
        for f in packs_dir.iterdir() if packs_dir.exists() else ():
            if f.name not in known and _mtime(f) <= cutoff:
                f.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------ use
    def use(self, *, commits: Iterable[str] = (), packs: Iterable[str] = ()) -> None:
        """Record in ``lru.json`` that this node uses ``commits`` and ``packs`` now."""
        commits, packs = list(commits), list(packs)
        if not self.writable or not (commits or packs):
            return
        now = time.time()
        with self.lock:
            use = CacheUse.read(self.path)
            use.commits.update(dict.fromkeys(commits, now))
            use.packs.update(dict.fromkeys(packs, now))
            use.write()

    def packs_of(self, hashes: Iterable[str]) -> set[str]:
        """The packs holding ``hashes`` and their delta bases (those the cache has)."""
        out = set()
        for h in _closure(hashes, self.catalog.get_object):
            row = self.catalog.get_object(h)
            if row is not None:
                out.add(row.pack)
        return out

    # ------------------------------------------------------------------------------ objects from the bucket
    def lacking(self, hashes: Iterable[str], extra: dict[str, ObjectRow] | None = None) -> set[str]:
        """Those of ``hashes`` and their delta bases the cache lacks (``extra``: rows on their way)."""

        def row(h: str) -> ObjectRow | None:
            return (extra.get(h) if extra else None) or self.catalog.get_object(h)

        return {h for h in _closure(hashes, row) if row(h) is None}

    def restore(self, hashes: Collection[str]) -> int:
        """Fetch from the bucket the objects of ``hashes`` (and their delta bases) that the cache
        lacks (never fetched, or evicted), into one new pack, recorded as used; returns how many.
        Each payload is checked against its metadata (size, checksum); content hashes are checked
        by every read of the cache, so weights are not decoded here as well.

        Raises:
            SyncIncompleteError: some of them are not on the bucket either (nothing is kept).
        """
        if not self.lacking(hashes):
            return 0
        with self.lock:
            missing = self.lacking(hashes)
            if not missing:
                return 0
            sink = self.sink()
            try:
                want, got = missing, 0
                listing = self.store.objects.list_metadata()  # one listing for every pass
                for _ in range(MAX_PASSES):  # a delta's base is known once its metadata arrived
                    # (content hashes are checked by every read of the cache: not here too)
                    stats = download_objects(self.store.objects, sink, False, want, listing=listing, decode=False)
                    got += stats["bytes_transferred"]
                    want = self.lacking(hashes, {r.hash: r for r in sink.rows})
                    if not want or not stats["downloaded"] + stats["deltas_downloaded"]:
                        break
                if want:
                    raise SyncIncompleteError(
                        f"{len(want)} object(s) missing from the cache {self.path} are not on "
                        f"{self.store.client.url} either (first: {min(want)}); `coral-torch verify` lists the "
                        "commits they break",
                        stats=None,
                        failures={h: "not on the bucket" for h in sorted(want)[:20]},
                    )
                rows = _with_depths(sink.rows, self.catalog.get_object)
                pack = sink.publish()
                if pack is None:
                    return 0
                self.catalog.add_objects((pack.name, pack.size, time.time()), rows)
            except BaseException:
                sink.discard()
                raise
            self.use(packs=[pack.name])
        log.info(
            "fetched %d object(s) (%.1f MB) the cache %s lacked from %s",
            len(rows),
            got / 1e6,
            self.path,
            self.store.client.url,
        )
        return len(rows)

    def only_on_bucket(self, report: VerifyReport) -> int:
        """Drop from ``report`` (a verify of the cache) the tensors of commits whose objects the cache
        lacks but the bucket holds (never fetched, or evicted: a read fetches them): only objects
        missing from both are damage. Returns how many commits have objects only on the bucket."""
        missing = self.catalog.commits_missing_objects()
        if not missing:
            return 0
        present = self.store.objects.present()
        on_bucket = set(present.get(WEIGHTS, {})) | set(present.get(DELTAS, {}))
        away_commits = 0
        for cid, names in missing.items():
            hashes = {n: h for n, h, _ in self.catalog.commit_objects(cid)}
            away = {n for n in names if hashes.get(n) in on_bucket}
            left = [n for n in report.damaged_commits.get(cid, []) if n not in away]
            if left:
                report.damaged_commits[cid] = left
            else:
                report.damaged_commits.pop(cid, None)
            away_commits += bool(away)
        return away_commits


def _closure(hashes: Iterable[str], row: Any) -> set[str]:
    """``hashes`` and the delta bases they are rebuilt from (``row(hash)``: its row, or None)."""
    out: set[str] = set()
    for h in hashes:
        cur: str | None = h
        while cur is not None and cur not in out:
            out.add(cur)
            r = row(cur)
            cur = r.base if r is not None and r.kind == "delta" else None
    return out


def _with_depths(rows: list[ObjectRow], known: Any) -> list[ObjectRow]:
    """``rows`` (downloaded: a delta's depth -1) with their delta depths, from one another and from
    ``known(hash)`` (the catalog's row of a base already here)."""
    new = {r.hash: r for r in rows}

    def depth(h: str, seen: int = 0) -> int:
        r = new.get(h)
        if r is None:
            k = known(h)
            if k is None:
                raise CorruptObjectError(f"object {h} is needed as a delta base and is not here", hash_key=h)
            return int(k.depth) if k.kind == "delta" else 0
        if r.kind == "full":
            return 0
        if r.depth < 0:
            if seen > 10_000:
                raise CorruptObjectError(f"the delta chain of object {h} loops", hash_key=h)
            r.depth = depth(r.base or "", seen + 1) + 1
        return r.depth

    for r in rows:
        depth(r.hash)
    return rows


def _times(value: Any) -> dict[str, float]:
    """The ``{name: time}`` entries of a value read from ``lru.json`` that are well-formed."""
    if not isinstance(value, dict):
        return {}
    return {
        k: float(v)
        for k, v in value.items()
        if isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def _plain_name(name: Any) -> bool:
    """A file name of ``packs/``, never a path or a temporary file."""
    return isinstance(name, str) and bool(name) and name == os.path.basename(name) and not name.startswith(".")


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")
