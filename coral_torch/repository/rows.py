"""The catalog's rows as plain data: objects, commits, and a commit's object list.

No SQL here (that is :mod:`.catalog`); these travel between processes (a sharded save's ranks) and
modules (planner, reader, writer, maintenance).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CatalogDamagedError


@dataclass
class ObjectRow:
    hash: str
    pack: str
    kind: str
    base: str | None
    depth: int
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    stored_bytes: int
    full_estimate: int
    lossless: bool = True
    offset: int | None = None
    length: int | None = None

    def values(self) -> tuple:
        """The row as the objects table's columns, in order."""
        return (
            self.hash,
            self.pack,
            self.kind,
            self.base,
            self.depth,
            self.dtype,
            json.dumps(list(self.shape)),
            self.nbytes,
            self.stored_bytes,
            self.full_estimate,
            int(self.lossless),
            self.offset,
            self.length,
        )


@dataclass
class CommitRow:
    id: str
    seq: int
    parent: str | None
    run: str
    epoch: int | None
    step: int | None
    time: float
    message: str
    metrics: dict[str, Any]
    manifest: dict[str, Any]
    lossy: bool
    logical_bytes: int
    new_bytes: int
    info: dict[str, Any] = field(default_factory=dict)
    refs: list[str] = field(default_factory=list)
    manifest_json: str = ""  #: the manifest exactly as stored: the commit id is its hash

    @property
    def short_id(self) -> str:
        return self.id[:10]


@dataclass
class NewCommit:
    """A commit row to insert (see :meth:`Catalog.publish_commit`)."""

    id: str
    parent: str | None
    run: str
    epoch: int | None
    step: int | None
    time: float
    message: str
    metrics: dict[str, Any]
    manifest_json: str
    lossy: bool
    logical_bytes: int
    new_bytes: int
    info: dict[str, Any]

    def values(self) -> tuple:
        return (
            self.id,
            self.parent,
            self.run,
            self.epoch,
            self.step,
            self.time,
            self.message,
            json.dumps(self.metrics),
            self.manifest_json,
            int(self.lossy),
            self.logical_bytes,
            self.new_bytes,
            json.dumps(self.info),
        )


def commit_object_rows(
    cid: str, pairs: Iterable[tuple[str, str]], how: Callable[[str, str], str]
) -> list[tuple[str, str, str, str]]:
    """``commit_objects`` rows: one per distinct (name, hash). gc and verify find a commit's objects
    through these rows, so none may be lost: two different tensors whose paths flatten to the same
    name (keys ``1`` and ``"1"``, or ``"a/b"`` and ``["a"]["b"]``) get ``#1``, ``#2``... suffixes."""
    names: dict[str, str] = {}
    rows = []
    for name, h in pairs:
        key, n = name, 0
        while key in names and names[key] != h:
            n += 1
            key = f"{name}#{n}"
        if key in names:
            continue
        names[key] = h
        rows.append((cid, key, h, how(name, h)))
    return rows


def object_row(r: tuple) -> ObjectRow:
    try:
        h, pack, kind, base, depth, dtype, shape, nbytes, stored, full, lossless, offset, length = r
    except ValueError:  # a damaged schema: the table has other columns
        raise CatalogDamagedError(
            f"the catalog's objects table has {len(r)} columns, not 13: its schema is "
            "damaged; restore it from a backup, or pull the repository again"
        ) from None
    try:
        dims = json.loads(shape)
        if not isinstance(dims, list):
            raise ValueError("shape is not a list")
        return ObjectRow(
            h, pack, kind, base, depth, dtype, tuple(dims), nbytes, stored, full, bool(lossless), offset, length
        )
    except (ValueError, TypeError) as exc:
        raise CatalogDamagedError(f"the catalog row of object {str(h)[:12]} is damaged ({exc})") from None


def commit_row(d: dict[str, Any], refs: list[str], where: Path) -> CommitRow:
    """A :class:`CommitRow` from the commits table's columns ``d`` (by name) and the names of the
    refs that name it; damaged JSON in it raises :class:`CatalogDamagedError` naming the catalog
    file ``where``."""
    try:
        manifest = json.loads(d["manifest"])
        metrics, info = json.loads(d["metrics"]), json.loads(d["info"])
        if not isinstance(manifest, dict) or not isinstance(metrics, dict) or not isinstance(info, dict):
            raise ValueError("not a JSON object")
        return CommitRow(
            id=d["id"],
            seq=d["seq"],
            parent=d["parent"],
            run=d["run"],
            epoch=d["epoch"],
            step=d["step"],
            time=d["time"],
            message=d["message"],
            metrics=metrics,
            manifest=manifest,
            lossy=bool(d["lossy"]),
            logical_bytes=d["logical_bytes"],
            new_bytes=d["new_bytes"],
            info=info,
            refs=refs,
            manifest_json=d["manifest"],
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise CatalogDamagedError(
            f"commit {str(d.get('id'))[:12]} in {where} is damaged ({exc}); restore the catalog or "
            "pull the commit again from a remote"
        ) from None


def commit_metrics(cid: str, text: str, where: Path) -> dict[str, Any]:
    """The metrics of commit ``cid`` from their stored JSON ``text``; damaged ones raise
    :class:`CatalogDamagedError` naming the catalog file ``where``."""
    try:
        m = json.loads(text)
    except (ValueError, TypeError):
        m = None
    if not isinstance(m, dict):
        raise CatalogDamagedError(
            f"commit {str(cid)[:12]} in {where} has damaged metrics; restore the catalog or "
            "pull the commit again from a remote"
        )
    return m
