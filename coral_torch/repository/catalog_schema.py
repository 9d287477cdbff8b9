"""The catalog's schema: its version, tables and indexes, and the statements that insert a commit or a ref.

What :class:`~.catalog.Catalog` creates in a new catalog, adds to an older one, and checks an open
one's tables against. Text only: the statements run in :mod:`.catalog`.
"""

from __future__ import annotations

#: the newest catalog schema this version reads and writes; a newer catalog is refused
SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS packs (
    name TEXT PRIMARY KEY, size INTEGER NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS objects (
    hash TEXT PRIMARY KEY,
    pack TEXT NOT NULL REFERENCES packs(name),
    kind TEXT NOT NULL,              -- 'full' | 'delta'
    base TEXT,                       -- delta reference object
    depth INTEGER NOT NULL,          -- deltas between this object and a full one
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,             -- JSON list
    nbytes INTEGER NOT NULL,         -- logical bytes
    stored_bytes INTEGER NOT NULL,   -- payload bytes on disk
    full_estimate INTEGER NOT NULL,  -- size of this tensor's own encoding (measured or inherited)
    lossless INTEGER NOT NULL DEFAULT 1,
    offset INTEGER,                  -- payload's byte offset in the pack file (contiguous datasets)
    length INTEGER                   -- payload's length: loads read it with pread, no HDF5 call
);
CREATE INDEX IF NOT EXISTS objects_pack ON objects(pack);
CREATE INDEX IF NOT EXISTS objects_base ON objects(base);
CREATE TABLE IF NOT EXISTS commits (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    parent TEXT,
    run TEXT NOT NULL,
    epoch INTEGER,
    step INTEGER,
    time REAL NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    metrics TEXT NOT NULL DEFAULT '{}',
    manifest TEXT NOT NULL,
    lossy INTEGER NOT NULL DEFAULT 0,
    logical_bytes INTEGER NOT NULL,
    new_bytes INTEGER NOT NULL,
    info TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS commit_objects (
    commit_id TEXT NOT NULL, name TEXT NOT NULL, hash TEXT NOT NULL, how TEXT NOT NULL,
    PRIMARY KEY (commit_id, name)
);
CREATE INDEX IF NOT EXISTS commit_objects_hash ON commit_objects(hash);
CREATE TABLE IF NOT EXISTS refs (
    name TEXT PRIMARY KEY, commit_id TEXT NOT NULL, updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS refs_commit ON refs(commit_id);
CREATE TABLE IF NOT EXISTS saves (
    token TEXT PRIMARY KEY, commit_id TEXT NOT NULL, time REAL NOT NULL
);
"""


#: a commit row, values in :meth:`NewCommit.values` order
INSERT_COMMIT = (
    "INSERT INTO commits(id, parent, run, epoch, step, time, message, metrics, manifest, lossy,"
    " logical_bytes, new_bytes, info) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
#: point ref ``name`` at a commit: values ``(name, commit id, updated)``
SET_REF = "INSERT OR REPLACE INTO refs(name, commit_id, updated) VALUES (?,?,?)"

#: indexes and tables added since schema 2, created (if missing) whenever a catalog opens writable
INDEXES = (
    "CREATE INDEX IF NOT EXISTS objects_base ON objects(base);"
    "CREATE TABLE IF NOT EXISTS saves (token TEXT PRIMARY KEY, commit_id TEXT NOT NULL, time REAL NOT NULL);"
)
