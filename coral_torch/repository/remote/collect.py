"""Garbage collection of a repository on an S3 remote: the commits no ref names and the objects no
live commit needs.

Live: the commits the intact ref documents (``refs/<name>.json``) name, and every object their
commit documents list, with each delta's base followed through its metadata
(``metadata/<hash>.delta.json``, ``reference_hash``). Garbage: the commit documents and objects
(payload and metadata) that are not live and whose listed ``LastModified`` is older than the grace
period, and payloads without metadata (interrupted uploads) as old. A save uploads its objects, then
its commit document, then moves its refs, so the grace period keeps what a save in flight wrote; a
commit document younger than it keeps its objects too (its ref may be about to move).

Never deleted on a guess: a damaged ref document stops gc (:class:`CorruptObjectError`, nothing
deleted); a live commit document or delta metadata that is missing or damaged is reported in the
stats' ``problems`` and nothing is deleted. Just before deleting, the refs are read again (and the
commit documents listed again): if a ref now names a commit found garbage, or a commit published
meanwhile needs an object found garbage, gc stops with :class:`ConcurrentChangeError`, nothing
deleted. What remains open is a save that found an old unreferenced object on the remote, skipped its
upload, and publishes its commit after that re-check (no grace period covers it: the object is old);
run a deleting gc while no save writes to the remote.

Order of deletion: commit documents first, then for each object its metadata (the object stops
existing) and then its payload; deltas before full weights. An interrupted gc is finished by running
it again (what is left is unreferenced, and old). Only keys of the layout are touched: anything else
under the prefix (``.coral-probe/``, files of other tools, keys that are not commit ids or object
keys) is left alone.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from ...errors import ConcurrentChangeError, CorruptObjectError, RepositoryError, StoreError
from ...format.objects import DELTAS, WEIGHTS
from ...storage.s3.client import RemoteEntry, S3Client
from ...storage.s3.objects import check_key, meta_key, payload_key
from .protocol import COMMITS, REFS, check_commit_doc, check_ref_doc, is_commit_id, json_names

log = logging.getLogger(__name__)

__all__ = ["collect_garbage"]

METADATA = "metadata/"
#: how metadata keys end, per group (".delta.json" first: it also ends in ".json")
_META_SUFFIXES = ((DELTAS, ".delta.json"), (WEIGHTS, ".json"))
_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass
class _Object:
    """One listed object: its metadata and payload entries (either may be missing)."""

    group: str
    key: str
    meta: RemoteEntry | None = None
    payload: RemoteEntry | None = None

    @property
    def parts(self) -> list[RemoteEntry]:
        return [e for e in (self.meta, self.payload) if e is not None]


def _parallel(client: S3Client, fn: Callable[[_T], _R], items: Iterable[_T]) -> list[_R]:
    """``fn`` over ``items`` on the client's concurrency, in order (the first error is raised)."""
    todo = list(items)
    if len(todo) <= 1:
        return [fn(x) for x in todo]
    with ThreadPoolExecutor(client.transfer.max_concurrency, thread_name_prefix="coral-gc") as pool:
        return list(pool.map(fn, todo))


def _line(exc: BaseException | str) -> str:
    """The first line of a message (stats and errors stay one line each)."""
    return (str(exc).splitlines() or ["?"])[0]


def _key_ok(key: str) -> bool:
    """Whether ``key`` is an object key of the layout (anything else is never touched)."""
    try:
        check_key(key)
        return True
    except StoreError:
        return False


def _list_objects(client: S3Client) -> dict[tuple[str, str], _Object]:
    """``{(group, key): _Object}`` of every object key of the layout (metadata and payloads)."""
    out: dict[tuple[str, str], _Object] = {}
    for name, entry in client.list_entries(METADATA).items():
        for group, suffix in _META_SUFFIXES:
            key = name[: -len(suffix)] if name.endswith(suffix) else ""
            if key and _key_ok(key) and meta_key(group, key) == METADATA + name:
                out[(group, key)] = _Object(group, key, meta=entry)
                break
    for group in (WEIGHTS, DELTAS):
        for key, entry in client.list_entries(payload_key(group, "")).items():
            if _key_ok(key):
                out.setdefault((group, key), _Object(group, key)).payload = entry
    return out


def _read_refs(client: S3Client) -> dict[str, str]:
    """``{ref name: commit id}`` of every ref document (one deleted since the listing keeps nothing).

    Raises:
        CorruptObjectError: a ref document is damaged (one line: nothing is deleted on a guess).
    """

    def one(name: str) -> str | None:
        try:
            doc = client.get_document(client.document_key(f"{REFS}{name}.json"), f"ref document {name}")
            return None if doc is None else check_ref_doc(doc if isinstance(doc, dict) else {}, name, client.url)[0]
        except CorruptObjectError as exc:
            raise CorruptObjectError(
                f"gc of {client.url} refused: {_line(exc)}; nothing was deleted. Rewrite that ref (push from "
                "a repository that holds it) or delete it, then run gc again"
            ) from None

    names = sorted(json_names(client.list_entries(REFS)))
    return {n: c for n, c in zip(names, _parallel(client, one, names)) if c is not None}


def _commit_hashes(client: S3Client, cids: Iterable[str]) -> tuple[set[str], list[str]]:
    """(every object hash the commit documents of ``cids`` list, problems: missing or damaged ones)."""
    todo = sorted(set(cids))

    def one(cid: str) -> list[str] | str:
        try:
            doc = client.get_document(f"{COMMITS}{cid}.json", f"commit document {cid}", key=cid)
            if doc is None:
                return f"commit {cid}, which must be kept, has no commit document"
            if not isinstance(doc, dict):
                return f"commit document {cid} is damaged: it is not an object"
            check_commit_doc(doc, cid, client.url)
        except (CorruptObjectError, RepositoryError) as exc:  # damaged, a bad run name, a newer format
            return _line(exc)
        return [o[1] for o in doc["objects"]]

    hashes: set[str] = set()
    problems: list[str] = []
    for got in _parallel(client, one, todo):
        if isinstance(got, str):
            problems.append(got)
        else:
            hashes.update(got)
    return hashes, problems


def _delta_base(client: S3Client, key: str) -> tuple[str | None, str | None]:
    """(the base the metadata of delta ``key`` names, None) or (None, what is wrong); (None, None)
    when it has no metadata."""
    try:
        doc = client.get_document(meta_key(DELTAS, key), f"metadata of delta {key}", key=key)
    except CorruptObjectError as exc:
        return None, _line(exc)
    if doc is None:
        return None, None
    base = doc.get("reference_hash") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or doc.get("key", key) != key or doc.get("kind", "delta") != "delta":
        return None, f"metadata of delta {key} at {client.url} describes another object"
    if not isinstance(base, str) or not _key_ok(base):
        return None, f"metadata of delta {key} at {client.url} names an invalid base {base!r}"
    return base, None


def _has_meta(objects: dict[tuple[str, str], _Object], group: str, key: str) -> bool:
    o = objects.get((group, key))
    return o is not None and o.meta is not None


def _closure(
    client: S3Client, start: set[str], known: set[str], objects: dict[tuple[str, str], _Object] | None
) -> tuple[set[str], list[str]]:
    """(``start`` and every delta base reached from it, outside ``known``; problems). With the
    listing ``objects``, the metadata of the hashes listed as deltas is read, and a hash listed
    with no metadata at all is a problem; without it (commits published since the listing), every
    hash's delta metadata is looked for, and one that has none is taken for a weight."""
    reached: set[str] = set()
    problems: list[str] = []
    todo = set(start) - known
    while todo:
        reached |= todo
        deltas = sorted(todo) if objects is None else [h for h in sorted(todo) if _has_meta(objects, DELTAS, h)]
        if objects is not None:
            problems += [
                f"object {h}, which a kept commit needs, has no metadata at {client.url}"
                for h in sorted(todo)
                if not _has_meta(objects, DELTAS, h) and not _has_meta(objects, WEIGHTS, h)
            ]
        nxt: set[str] = set()
        for h, (base, why) in zip(deltas, _parallel(client, lambda k: _delta_base(client, k), deltas)):
            if base is not None:
                nxt.add(base)
            elif why is not None or objects is not None:
                problems.append(why or f"metadata of delta {h}, which a kept commit needs, is missing")
        todo = nxt - reached - known
    return reached, problems


def _recheck(
    client: S3Client,
    roots: set[str],
    listed_commits: set[str],
    garbage_commits: set[str],
    garbage_keys: set[str],
) -> None:
    """Read the refs (and list the commit documents) again just before deleting.

    Raises:
        ConcurrentChangeError: a ref now names a commit found garbage, or a commit that appeared
            meanwhile needs an object found garbage (or cannot be read).
    """
    refs = _read_refs(client)
    back = sorted({cid for cid in refs.values() if cid in garbage_commits})
    if back:
        names = sorted(n for n, c in refs.items() if c in garbage_commits)
        raise ConcurrentChangeError(
            f"gc of {client.url} stopped, nothing was deleted: ref {names[0]} now names commit {back[0]}, "
            "which it had found unreferenced (a save or push ran meanwhile); run gc again",
            missing=tuple(back),
        )
    appeared = {c for c in json_names(client.list_entries(COMMITS)) if is_commit_id(c)} - listed_commits
    fresh = (set(refs.values()) | appeared) - roots
    if not fresh:
        return
    hashes, problems = _commit_hashes(client, fresh)
    if not problems:
        reached, more = _closure(client, hashes, set(), None)
        problems = [f"it needs object {h}, found unreferenced" for h in sorted(reached & garbage_keys)] + more
    if problems:
        raise ConcurrentChangeError(
            f"gc of {client.url} stopped, nothing was deleted: a commit was published meanwhile ({problems[0]}); "
            "run gc again",
            missing=tuple(sorted(fresh)),
        )


def _old(modified: float, cutoff: float) -> bool:
    """Whether something last written at ``modified`` is past the grace period (unknown: it is not)."""
    return 0.0 < modified <= cutoff


def collect_garbage(
    client: S3Client, *, dry_run: bool = True, grace_s: float = 3600.0, now: float | None = None
) -> dict[str, Any]:
    """Delete the commit documents no ref names and the objects no live commit needs from the
    repository under ``client``'s prefix (see the module docstring for what is live, what is kept and
    the order of deletion).

    Args:
        client: the remote.
        dry_run: only count what would be deleted (the default).
        grace_s: keep garbage written less than this many seconds ago (saves in flight).
        now: the time the grace period is counted back from (default: now).

    Returns:
        ``{"dry_run", "commits_removed", "objects_removed", "orphan_payloads_removed",
        "bytes_freed" (payload and metadata bytes of the objects removed), "kept_young" (garbage
        younger than ``grace_s``), "live_commits", "live_objects", "problems" (why nothing was
        deleted; empty when all is well)}``; with ``dry_run`` the counts of what would be removed.

    Raises:
        CorruptObjectError: a ref document is damaged; nothing was deleted.
        ConcurrentChangeError: the refs moved onto garbage while gc ran; nothing was deleted.
        RemoteError and subclasses: the remote failed (deletions part-way: run gc again).
    """
    grace = float(grace_s)
    if not math.isfinite(grace) or grace < 0:
        raise ValueError(f"grace_s must be a number of seconds >= 0, not {grace_s!r}")
    cutoff = (time.time() if now is None else float(now)) - grace
    # objects first and refs last: whatever a save publishes meanwhile is listed young, or referenced
    objects = _list_objects(client)
    commits = {c: e for c, e in json_names(client.list_entries(COMMITS)).items() if is_commit_id(c)}
    live_commits = set(_read_refs(client).values())
    young_commits = {c for c, e in commits.items() if c not in live_commits and not _old(e.modified, cutoff)}
    garbage_commits = {c: e for c, e in commits.items() if c not in live_commits and c not in young_commits}

    live_hashes, problems = _commit_hashes(client, live_commits)
    live, more = _closure(client, live_hashes, set(), objects)
    problems += more
    young_hashes, more = _commit_hashes(client, young_commits)  # a save about to move its ref
    problems += more
    protected, more = _closure(client, young_hashes, live, objects)
    problems += more

    unneeded = [o for (_, k), o in objects.items() if k not in live]
    garbage = [o for o in unneeded if o.key not in protected and _old(max(e.modified for e in o.parts), cutoff)]
    stats: dict[str, Any] = {
        "dry_run": bool(dry_run),
        "commits_removed": len(garbage_commits),
        "objects_removed": len(garbage),
        "orphan_payloads_removed": sum(1 for o in garbage if o.meta is None),
        "bytes_freed": sum(e.size for o in garbage for e in o.parts),
        "kept_young": len(young_commits) + len(unneeded) - len(garbage),
        "live_commits": len(live_commits),
        "live_objects": len(live),
        "problems": problems,
    }
    if problems:
        stats.update(commits_removed=0, objects_removed=0, orphan_payloads_removed=0, bytes_freed=0)
        log.warning("gc of %s deleted nothing: %d problem(s), first: %s", client.url, len(problems), problems[0])
        return stats
    if dry_run or not (garbage_commits or garbage):
        log.info("gc of %s%s: %s", client.url, " (dry run)" if dry_run else "", stats)
        return stats

    _recheck(client, live_commits | young_commits, set(commits), set(garbage_commits), {o.key for o in garbage})
    _parallel(client, lambda c: client.delete(f"{COMMITS}{c}.json"), sorted(garbage_commits))

    def delete(o: _Object) -> None:
        if o.meta is not None:  # the object stops existing first
            client.delete(meta_key(o.group, o.key))
        if o.payload is not None:
            client.delete(payload_key(o.group, o.key))

    for group in (DELTAS, WEIGHTS):  # deltas before the bases they may name
        _parallel(client, delete, sorted((o for o in garbage if o.group == group), key=lambda o: o.key))
    log.info("gc of %s: %s", client.url, stats)
    return stats
