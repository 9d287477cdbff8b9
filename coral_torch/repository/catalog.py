"""The catalog: which object lives in which pack, commits, refs. SQLite, WAL, one writer.

SQLite gives atomic, durable transactions and concurrent readers with no server. Every change that
makes data visible (new objects + commit + refs, or gc's removals) is one transaction, so a process
killed at any instant leaves either all of it or none of it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import (
    CatalogDamagedError,
    ConcurrentChangeError,
    ReadOnlyRepositoryError,
    UnsupportedFormatError,
)
from ..format import refnames
from .catalog_connection import connect, drop_snapshot, wal_snapshot
from .catalog_schema import INDEXES, INSERT_COMMIT, SCHEMA, SCHEMA_VERSION, SET_REF
from .failures import catalog_error
from .rows import CommitRow, NewCommit, ObjectRow, commit_metrics, commit_object_rows, commit_row, object_row


class Catalog:
    """Thin typed layer over the SQLite catalog, and the only place that speaks SQL. One
    connection per thread.

    ``writable=False`` opens it read-only: for a repository on a read-only mount or without
    write permission. A leftover write-ahead log there is read through a private copy (SQLite
    cannot replay it in place without writing), so committed data in it is not missed.
    """

    def __init__(self, path: Path, *, create: bool, writable: bool = True):
        self.path = Path(path)
        self.writable = writable
        self._local = threading.local()
        self._snapshot = None if writable else wal_snapshot(self.path)
        try:
            version = self._schema_version()
            if version is None and create and writable:
                # executescript commits on its own; the script is one transaction
                self.conn.executescript(
                    "BEGIN IMMEDIATE;"
                    + SCHEMA
                    + f"INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', '{SCHEMA_VERSION}');COMMIT;"
                )
            elif version is not None and version > SCHEMA_VERSION:
                raise UnsupportedFormatError(
                    f"{self.path} was written by a newer coral-torch (catalog schema {version}, this one "
                    f"reads up to {SCHEMA_VERSION}): upgrade coral-torch to use this repository"
                )
            elif version is not None and writable:
                self.conn.executescript(INDEXES)  # indexes added since schema 2 (idempotent)
            elif version is None:
                raise CatalogDamagedError(f"{self.path} holds no coral-torch catalog (no schema table)")
        except sqlite3.Error as exc:
            self.close()
            raise catalog_error(exc, self.path) from exc
        except BaseException:
            self.close()
            raise

    def _schema_version(self) -> int | None:
        row = self.conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        if row is None:
            return None
        got = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        try:
            return int(got[0]) if got else None
        except (TypeError, ValueError):
            raise CatalogDamagedError(f"{self.path}: schema version {got[0]!r} is not a number") from None

    def structure_problems(self, limit: int = 10) -> list[str]:
        """Damage that reads of rows do not meet but gc and saves do: what SQLite's integrity check
        finds (pages, free list, indexes that disagree with their table) and tables whose columns
        are not the ones this version writes (a damaged schema). Empty when the catalog is intact."""
        problems = [str(r[0]) for r in self.conn.execute(f"PRAGMA integrity_check({int(limit)})") if r[0] != "ok"]
        want = sqlite3.connect(":memory:")
        try:
            want.executescript(SCHEMA + INDEXES)
            tables = want.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite%'")
            for (table,) in tables.fetchall():
                got = {(r[1], r[2]) for r in self.conn.execute(f"PRAGMA table_info({table})")}
                if not got:  # a table added since this catalog was written: its readers allow for that
                    continue
                missing = [
                    f"{n} {t}" for _, n, t, *_ in want.execute(f"PRAGMA table_info({table})") if (n, t) not in got
                ]
                if missing:
                    problems.append(f"table {table} lacks column(s) {', '.join(missing)}")
        finally:
            want.close()
        return problems

    # -- connections ----------------------------------------------------------------------
    @property
    def conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = connect(self.path, writable=self.writable, snapshot=self._snapshot)
            if self.writable:
                _set_wal(c)
                c.execute("PRAGMA synchronous=FULL")
                # keep the WAL small: a repository of small checkpoints would otherwise carry up to
                # 4 MB of log (SQLite's default checkpoint interval), more than its packs
                c.execute("PRAGMA wal_autocheckpoint=256")
                c.execute("PRAGMA journal_size_limit=1048576")
            c.execute("PRAGMA foreign_keys=OFF")
            self._local.conn = c
        return c

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None
        if self._snapshot is not None:
            drop_snapshot(self._snapshot)
            self._snapshot = None

    class _Txn:
        def __init__(self, conn: sqlite3.Connection):
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type, exc, tb) -> None:
            if exc_type is None:
                self.conn.execute("COMMIT")
            elif self.conn.in_transaction:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:  # keep the original error; SQLite rolls back on close anyway
                    pass

    def transaction(self) -> _Txn:
        if not self.writable:
            raise ReadOnlyRepositoryError(
                f"{self.path.parent} is read-only (read-only mount or no write permission): it can be "
                "loaded, listed and verified, not changed; copy or pull it somewhere writable"
            )
        return Catalog._Txn(self.conn)

    # -- changes: each one transaction -----------------------------------------------------
    def publish_commit(
        self,
        *,
        packs: Sequence[tuple[str, int]],
        objects: list[ObjectRow],
        commit: NewCommit,
        commit_objects: list[tuple[str, str, str, str]],
        refs: list[str],
        best: tuple[str, str, float, str] | None = None,
        replace: Iterable[str] = (),
        save_token: str | None = None,
    ) -> tuple[bool, set[str]]:
        """Make a commit visible in one transaction: its packs and new objects, the commit row and
        its ``commit_objects``, the refs (``refs`` now name it) and, with ``best`` = ``(ref,
        metric, value, mode)``, the best ref when the commit beats the one it names. Returns
        ``(the commit existed already, commits the moved refs named before)``.

        Objects were planned and written without the write lock, so before anything becomes
        visible this checks, inside the transaction, that every object the commit lists and every
        base of a new delta is in the catalog; if one is not (a concurrent gc removed it), it
        raises :class:`ConcurrentChangeError` and changes nothing.

        ``replace``: hashes whose existing rows are replaced by the new ones (the saver stored the
        exact bytes of a damaged object again: every commit sharing it is repaired).
        ``save_token``: recorded with the commit id in ``saves`` so that other ranks of a sharded
        save find the id (a record, not a ref: it keeps nothing alive)."""
        replace = set(replace)
        with self.transaction() as c:
            for name, size in packs:
                c.execute("INSERT INTO packs(name, size, created) VALUES (?,?,?)", (name, size, commit.time))
            _insert_objects(c, objects, replace)
            needed = {h for _, _, h, _ in commit_objects} | {r.base for r in objects if r.base}
            missing = needed - self._present(c, needed)
            if missing:
                raise ConcurrentChangeError(
                    f"{len(missing)} object(s) this commit uses were removed while it was written "
                    "(a concurrent gc?); save it again",
                    missing=tuple(sorted(missing)),
                )
            existed = c.execute("SELECT 1 FROM commits WHERE id=?", (commit.id,)).fetchone() is not None
            if not existed:
                c.execute(INSERT_COMMIT, commit.values())
                c.executemany("INSERT INTO commit_objects VALUES (?,?,?,?)", commit_objects)
            replaced = set(self.ref_targets(refs).values()) - {commit.id}
            c.executemany(SET_REF, [(n, commit.id, commit.time) for n in refs])
            if best is not None:
                name, metric, value, mode = best
                current = c.execute("SELECT commit_id FROM refs WHERE name=?", (name,)).fetchone()
                better = True
                if current is not None:
                    row = c.execute("SELECT metrics FROM commits WHERE id=?", (current[0],)).fetchone()
                    old = json.loads(row[0]).get(metric) if row else None
                    if old is not None:
                        better = value < old if mode == "min" else value > old
                if better:
                    replaced |= {current[0]} - {commit.id} if current is not None else set()
                    c.execute(SET_REF, (name, commit.id, commit.time))
            if save_token is not None:
                c.execute(
                    "INSERT OR REPLACE INTO saves(token, commit_id, time) VALUES (?,?,?)",
                    (save_token, commit.id, commit.time),
                )
        return existed, replaced

    @staticmethod
    def _present(c: sqlite3.Connection, hashes: Iterable[str]) -> set[str]:
        return {h for (h,) in _rows_in(c, "SELECT hash FROM objects WHERE hash IN ({})", hashes)}

    def add_derived_commit(
        self, commit: NewCommit, commit_objects: list[tuple[str, str, str, str]], replaces: str, now: float
    ) -> None:
        """Insert ``commit`` (if new) and move every ref of commit ``replaces`` onto it, in one
        transaction (``keep/<old>`` becomes ``keep/<new>``)."""
        with self.transaction() as c:
            if c.execute("SELECT 1 FROM commits WHERE id=?", (commit.id,)).fetchone() is None:
                c.execute(INSERT_COMMIT, commit.values())
                c.executemany("INSERT INTO commit_objects VALUES (?,?,?,?)", commit_objects)
            c.execute("UPDATE refs SET commit_id=?, updated=? WHERE commit_id=?", (commit.id, now, replaces))
            # refs named after the commit (keep/<id>, runs/<run>/keep/<id>) follow it
            old_names = [
                n
                for (n,) in c.execute(
                    "SELECT name FROM refs WHERE commit_id=? AND (name=? OR name LIKE ?)",
                    (commit.id, refnames.keep_ref(replaces), "%/" + refnames.keep_ref(replaces)),
                )
            ]
            for n in old_names:
                c.execute("UPDATE OR REPLACE refs SET name=? WHERE name=?", (n[: -len(replaces)] + commit.id, n))

    def set_ref(self, name: str, commit_id: str, now: float) -> str | None:
        """Point ``name`` at ``commit_id`` (which must exist); returns the commit it named before."""
        with self.transaction() as c:
            if c.execute("SELECT 1 FROM commits WHERE id=?", (commit_id,)).fetchone() is None:
                raise KeyError(commit_id)
            before = self.get_ref(name)
            c.execute(SET_REF, (name, commit_id, now))
        return before

    def update_refs(self, *, add: Sequence[tuple[str, str]] = (), drop: Iterable[str] = (), now: float) -> set[str]:
        """Add refs ``(name, commit id)`` (commits that no longer exist are skipped) and drop refs
        ``drop``, in one transaction; returns the commits the dropped refs named."""
        drop = list(dict.fromkeys(drop))
        with self.transaction() as c:
            released = set(self.ref_targets(drop).values())
            for name, cid in add:
                if c.execute("SELECT 1 FROM commits WHERE id=?", (cid,)).fetchone() is not None:
                    c.execute(SET_REF, (name, cid, now))
            c.executemany("DELETE FROM refs WHERE name=?", [(n,) for n in drop])
        return released

    def save_result(self, token: str) -> str | None:
        """The commit id a sharded save with ``token`` published, if it did."""
        try:
            r = self.conn.execute("SELECT commit_id FROM saves WHERE token=?", (token,)).fetchone()
        except sqlite3.OperationalError:  # a catalog of an older version, opened read-only: no table
            return None
        return r[0] if r else None

    def forget_saves(self, before: float) -> None:
        """Drop ``saves`` records older than ``before`` (they only tell ranks an id right after a save)."""
        with self.transaction() as c:
            c.execute("DELETE FROM saves WHERE time < ?", (before,))

    def run_commit_facts(self, run: str) -> list[tuple[str, float, int, int | None, int | None, dict[str, Any]]]:
        """``(id, time, seq, epoch, step, metrics)`` of every commit of ``run`` (no manifest parsed)."""
        out = []
        for cid, t, seq, epoch, step, metrics in self.conn.execute(
            "SELECT id, time, seq, epoch, step, metrics FROM commits WHERE run=? ORDER BY time, seq", (run,)
        ):
            out.append((cid, t, seq, epoch, step, commit_metrics(cid, metrics, self.path)))
        return out

    def delete_ref(self, name: str) -> str | None:
        """Remove ref ``name``; returns the commit it named, or None if there was no such ref."""
        with self.transaction() as c:
            before = self.get_ref(name)
            c.execute("DELETE FROM refs WHERE name=?", (name,))
        return before

    def apply_reclaim(
        self,
        *,
        new_packs: list[tuple[str, int, float]],
        moved: dict[str, tuple],
        dead_objects: Iterable[str],
        dead_commits: Iterable[str],
        dropped_packs: Iterable[str],
    ) -> None:
        """gc's one transaction: register rewritten packs, move their objects, delete what died."""
        with self.transaction() as c:
            c.executemany("INSERT INTO packs(name, size, created) VALUES (?,?,?)", new_packs)
            c.executemany(
                "UPDATE objects SET pack=?, offset=?, length=? WHERE hash=?",
                [(n, off, ln, h) for h, (n, off, ln) in moved.items()],
            )
            c.executemany("DELETE FROM objects WHERE hash=?", [(h,) for h in dead_objects])
            dead_commits = list(dead_commits)
            c.executemany("DELETE FROM commit_objects WHERE commit_id=?", [(x,) for x in dead_commits])
            c.executemany("DELETE FROM commits WHERE id=?", [(x,) for x in dead_commits])
            c.executemany("DELETE FROM packs WHERE name=?", [(p,) for p in dropped_packs])

    def add_objects(self, pack: tuple[str, int, float], objects: list[ObjectRow]) -> None:
        """Record objects of a pack already on disk (replacing rows of the same hashes)."""
        with self.transaction() as c:
            c.execute("INSERT OR IGNORE INTO packs(name, size, created) VALUES (?,?,?)", pack)
            c.executemany(
                "INSERT OR REPLACE INTO objects VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", [r.values() for r in objects]
            )

    def publish_pulled(
        self,
        *,
        pack: tuple[str, int, float] | None,
        objects: list[ObjectRow],
        replace: set[str],
        commits: list[tuple[NewCommit, list[tuple[str, str, str, str]]]],
        refs: dict[str, tuple[str, float]],
        now: float,
    ) -> None:
        """A pull's one transaction: its pack and objects (``replace``: hashes whose rows are
        replaced, e.g. damaged local copies), its commits, the remote's refs where newer than ours
        and naming a commit we have, and ``keep/<id>`` for a pulled commit no ref names."""
        with self.transaction() as c:
            if pack is not None:
                c.execute("INSERT INTO packs(name, size, created) VALUES (?,?,?)", pack)
                _insert_objects(c, objects, replace)
            for commit, rows in commits:
                c.execute(INSERT_COMMIT.replace("INSERT INTO", "INSERT OR IGNORE INTO"), commit.values())
                c.executemany("INSERT OR IGNORE INTO commit_objects VALUES (?,?,?,?)", rows)
            for name, (cid, updated) in refs.items():
                if c.execute("SELECT 1 FROM commits WHERE id=?", (cid,)).fetchone() is None:
                    continue
                cur = c.execute("SELECT updated FROM refs WHERE name=?", (name,)).fetchone()
                if cur is None or cur[0] < updated:
                    c.execute(SET_REF, (name, cid, updated))
            for commit, _ in commits:
                if c.execute("SELECT 1 FROM refs WHERE commit_id=?", (commit.id,)).fetchone() is None:
                    c.execute(SET_REF, (refnames.keep_ref(commit.id), commit.id, now))

    def drop_empty_packs(self, packs: Iterable[str]) -> list[str]:
        """Forget those of ``packs`` that hold no object any more; returns them."""
        empty = [
            p
            for p in dict.fromkeys(packs)
            if self.conn.execute("SELECT 1 FROM objects WHERE pack=? LIMIT 1", (p,)).fetchone() is None
        ]
        if empty:
            with self.transaction() as c:
                c.executemany("DELETE FROM packs WHERE name=?", [(p,) for p in empty])
        return empty

    def refs_of(self, commit_id: str) -> list[str]:
        """Names of the refs that name ``commit_id``."""
        return [r[0] for r in self.conn.execute("SELECT name FROM refs WHERE commit_id=? ORDER BY name", (commit_id,))]

    def ref_rows(self) -> list[tuple[str, str, float]]:
        """``(name, commit id, updated)`` of every ref."""
        return [
            (str(n), str(c), float(u)) for n, c, u in self.conn.execute("SELECT name, commit_id, updated FROM refs")
        ]

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the database file and truncate it."""
        if self.writable:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- totals ----------------------------------------------------------------------------
    def totals(self) -> dict[str, int]:
        """Commit count and logical bytes; object count, stored bytes and delta objects."""
        logical, commits = self.conn.execute("SELECT COALESCE(SUM(logical_bytes),0), COUNT(*) FROM commits").fetchone()
        objects, stored, deltas = self.conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(stored_bytes),0), COALESCE(SUM(kind='delta'),0) FROM objects"
        ).fetchone()
        return {
            "commits": commits,
            "logical_bytes": logical,
            "objects": objects,
            "stored_bytes": stored,
            "delta_objects": deltas,
        }

    def commit_ids(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT id FROM commits ORDER BY seq")]

    def commits_missing_objects(self) -> dict[str, list[str]]:
        """commit id -> names of its tensors whose objects the catalog does not have."""
        out: dict[str, list[str]] = {}
        for cid, name in self.conn.execute(
            "SELECT co.commit_id, co.name FROM commit_objects co LEFT JOIN objects o ON co.hash=o.hash"
            " WHERE o.hash IS NULL"
        ):
            out.setdefault(cid, []).append(name)
        return out

    # -- objects ---------------------------------------------------------------------------
    def get_object(self, h: str) -> ObjectRow | None:
        r = self.conn.execute("SELECT * FROM objects WHERE hash=?", (h,)).fetchone()
        return object_row(r) if r else None

    def known_hashes(self, hashes: Iterable[str]) -> set[str]:
        """Which of ``hashes`` the catalog holds."""
        return self._present(self.conn, hashes)

    def all_objects(self) -> list[ObjectRow]:
        return [object_row(r) for r in self.conn.execute("SELECT * FROM objects")]

    # -- commits ---------------------------------------------------------------------------
    def get_commit(self, cid: str) -> CommitRow | None:
        r = self.conn.execute("SELECT * FROM commits WHERE id=?", (cid,)).fetchone()
        return self._commit(r) if r else None

    def commits(self, run: str | None = None) -> list[CommitRow]:
        if run is None:
            rows = self.conn.execute("SELECT * FROM commits ORDER BY seq DESC").fetchall()
        else:
            rows = self.conn.execute("SELECT * FROM commits WHERE run=? ORDER BY seq DESC", (run,)).fetchall()
        return [self._commit(r) for r in rows]

    def newest_commit(self) -> tuple[str, str] | None:
        """``(id, run)`` of the newest checkpoint: the latest ``time`` (when its data was saved;
        a rewritten commit keeps its original's), newest insertion on ties."""
        r = self.conn.execute("SELECT id, run FROM commits ORDER BY time DESC, seq DESC LIMIT 1").fetchone()
        return (r[0], r[1]) if r else None

    def ref_targets(self, names: Iterable[str]) -> dict[str, str]:
        """``name -> commit id`` for those of ``names`` that exist."""
        return dict(_rows_in(self.conn, "SELECT name, commit_id FROM refs WHERE name IN ({})", names))

    def unreferenced(self, commit_ids: Iterable[str]) -> list[str]:
        """Those of ``commit_ids`` that exist and that no ref names."""
        return [
            c
            for c in dict.fromkeys(commit_ids)
            if self.conn.execute("SELECT 1 FROM commits WHERE id=?", (c,)).fetchone() is not None
            and self.conn.execute("SELECT 1 FROM refs WHERE commit_id=? LIMIT 1", (c,)).fetchone() is None
        ]

    def used_by_other_commits(self, h: str, excluding: Iterable[str]) -> bool:
        """True if a commit outside ``excluding`` lists object ``h``."""
        ex = list(excluding)
        q = (
            f"SELECT 1 FROM commit_objects WHERE hash=? AND commit_id NOT IN ({','.join('?' * len(ex))}) LIMIT 1"
            if ex
            else "SELECT 1 FROM commit_objects WHERE hash=? LIMIT 1"
        )
        return self.conn.execute(q, (h, *ex)).fetchone() is not None

    def delta_children(self, h: str) -> list[str]:
        """Objects stored as deltas against ``h``."""
        return [r[0] for r in self.conn.execute("SELECT hash FROM objects WHERE base=?", (h,))]

    def objects_in_packs(self, packs: Iterable[str]) -> list[ObjectRow]:
        out: list[ObjectRow] = []
        for p in dict.fromkeys(packs):
            out += [object_row(r) for r in self.conn.execute("SELECT * FROM objects WHERE pack=?", (p,))]
        return out

    def commits_with_tensor(self, run: str, pattern: str) -> list[str]:
        """Ids of ``run``'s commits holding a tensor whose name matches the glob ``pattern``."""
        return [
            r[0]
            for r in self.conn.execute(
                "SELECT DISTINCT c.id FROM commits c JOIN commit_objects o ON o.commit_id = c.id "
                "WHERE c.run = ? AND o.name GLOB ?",
                (run, pattern),
            )
        ]

    def rewrite_of(self, cid: str) -> str | None:
        """The commit that replaced ``cid`` when retention rewrote it (its ``info.derived_from``)."""
        r = self.conn.execute(
            "SELECT id FROM commits WHERE info LIKE ? LIMIT 1", (f'%"derived_from": "{cid}"%',)
        ).fetchone()
        return r[0] if r else None

    def commit_ids_with_prefix(self, prefix: str) -> list[str]:
        return [
            r[0]
            for r in self.conn.execute(
                "SELECT id FROM commits WHERE id >= ? AND id < ? ORDER BY id", (prefix, prefix + "\uffff")
            )
        ]

    def commit_objects(self, cid: str) -> list[tuple[str, str, str]]:
        return list(self.conn.execute("SELECT name, hash, how FROM commit_objects WHERE commit_id=?", (cid,)))

    def commits_using(self, hashes: Iterable[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for h in hashes:
            for cid, name in self.conn.execute("SELECT commit_id, name FROM commit_objects WHERE hash=?", (h,)):
                out.setdefault(cid, []).append(name)
        return out

    def _commit(self, r: sqlite3.Row) -> CommitRow:
        cols = [d[0] for d in self.conn.execute("SELECT * FROM commits LIMIT 0").description]
        d = dict(zip(cols, r))
        refs = [x[0] for x in self.conn.execute("SELECT name FROM refs WHERE commit_id=? ORDER BY name", (d["id"],))]
        return commit_row(d, refs, self.path)

    # -- refs ------------------------------------------------------------------------------
    def get_ref(self, name: str) -> str | None:
        r = self.conn.execute("SELECT commit_id FROM refs WHERE name=?", (name,)).fetchone()
        return r[0] if r else None

    def refs(self, prefix: str = "") -> dict[str, str]:
        return dict(
            self.conn.execute(
                "SELECT name, commit_id FROM refs WHERE name >= ? AND name < ? ORDER BY name",
                (prefix, prefix + "\uffff"),
            )
        )

    def packs(self) -> dict[str, int]:
        out = dict(self.conn.execute("SELECT name, size FROM packs"))
        if any(not isinstance(n, str) or not isinstance(v, int) for n, v in out.items()):
            raise CatalogDamagedError(
                f"the packs table of {self.path} is damaged (a row without a name or size); "
                "restore the catalog from a backup, or pull the repository again"
            )
        return out


def _set_wal(c: sqlite3.Connection, timeout: float = 60.0) -> None:
    """Switch to WAL. Changing the journal mode needs an exclusive lock and SQLite does not always
    wait for it (seen when several processes create one repository at once), so retry here."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            c.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


__all__ = ["Catalog", "CommitRow", "NewCommit", "ObjectRow", "SCHEMA_VERSION", "catalog_error", "commit_object_rows"]


def _insert_objects(c: sqlite3.Connection, objects: Sequence[ObjectRow], replace: set[str]) -> None:
    """Insert object rows; those whose hash is in ``replace`` replace the rows already there."""
    c.executemany(
        "INSERT OR IGNORE INTO objects VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
        [r.values() for r in objects if r.hash not in replace],
    )
    c.executemany(
        "INSERT OR REPLACE INTO objects VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
        [r.values() for r in objects if r.hash in replace],
    )


def _rows_in(c: sqlite3.Connection, query: str, values: Iterable[str]) -> Iterator[Any]:
    """The rows of ``query`` for ``values``, which go into its ``IN ({})`` 500 at a time (SQLite
    limits a statement's parameters)."""
    values = list(values)
    for i in range(0, len(values), 500):
        part = values[i : i + 500]
        yield from c.execute(query.format(",".join("?" * len(part))), part)
