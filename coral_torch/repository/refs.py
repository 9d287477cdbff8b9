"""Ref resolution: what a user types (a hash prefix, a tag, a run, ``latest``, ``best``, ``<ref>~N``)
to a commit id, from the catalog alone."""

from __future__ import annotations

from pathlib import Path

from ..errors import AmbiguousRefError, RefNotFoundError
from ..format import refnames
from .catalog import Catalog

_MIN_PREFIX = 4
_COMMIT_ID_LENGTH = 32
_HEX = set("0123456789abcdef")


def resolve_ref(cat: Catalog, ref: str, *, where: Path) -> str:
    """Full commit id for a hash prefix (>= 4 chars), tag, ``latest``, ``best``, ``<run>``,
    ``<run>/latest``, ``<run>/best`` or a full ref name. Accepts a ``coral://`` prefix. As in
    git, ``<ref>~N`` names the N-th parent of ``<ref>`` and ``<ref>^`` its parent."""
    if not isinstance(ref, str) or not ref:
        raise RefNotFoundError(f"a ref must be a non-empty string, not {ref!r}")
    ref = ref.removeprefix("coral://").strip()
    base, ups = _split_ancestry(ref)
    cid: str | None
    if ups:
        cid = resolve_ref(cat, base, where=where)
        for i in range(ups):
            row = cat.get_commit(cid)
            if row is None or row.parent is None or cat.get_commit(row.parent) is None:
                raise RefNotFoundError(
                    f"{ref!r}: {base} has only {i} ancestor(s) in {where}"
                    + (" (older commits were removed)" if row is not None and row.parent else "")
                )
            cid = row.parent
        return cid
    ref = base
    if ref in ("latest", "HEAD"):
        # the newest checkpoint by when it was saved: a commit that retention rewrote later
        # (e.g. keep_optimizer="last" stripping an older epoch) keeps its original's time
        newest = cat.newest_commit()
        if newest is None:
            raise RefNotFoundError(f"repository {where} has no commits yet")
        return newest[0]
    if ref == "best":
        newest = cat.newest_commit()
        cid = cat.get_ref("best") or (cat.get_ref(refnames.best_ref(newest[1])) if newest else None)
        if cid is None:
            raise RefNotFoundError(f"no 'best' commit in {where}: save with a monitored metric (monitor=...) first")
        return cid
    for candidate in (ref, refnames.tag_ref(ref, check=False), refnames.latest_ref(ref), refnames.run_ref(ref)):
        cid = cat.get_ref(candidate)
        if cid is not None:
            return cid
    low = ref.lower()
    if len(low) >= _MIN_PREFIX and set(low) <= _HEX:
        matches = cat.commit_ids_with_prefix(low)
        if len(matches) == 1:
            return matches[0]
        if not matches and len(low) == _COMMIT_ID_LENGTH:
            # a commit that retention rewrote (keep_optimizer) is still found by its old id, as a
            # pointer file or a log line written before the rewrite names it
            for _ in range(8):
                newer = cat.rewrite_of(low)
                if newer is None:
                    break
                if cat.get_commit(newer) is not None:
                    return newer
                low = newer
        if len(matches) > 1:
            raise AmbiguousRefError(
                f"hash prefix {ref!r} is ambiguous in {where}: it matches "
                + ", ".join(m[:12] for m in matches[:10])
                + ("..." if len(matches) > 10 else "")
                + "; give more characters",
                matches,
            )
    hints = sorted(
        {n.split("/")[1] for n in cat.refs(refnames.RUNS)} | {n[len(refnames.TAGS) :] for n in cat.refs(refnames.TAGS)}
    )
    raise RefNotFoundError(
        f"no commit matches {ref!r} in {where}"
        + (f"; known runs and tags: {', '.join(hints[:20])}" if hints else "")
        + ". Use a hash prefix of at least 4 characters, a tag, a run name, 'latest' or 'best'."
    )


def _split_ancestry(ref: str) -> tuple[str, int]:
    """``"latest~2^"`` -> ``("latest", 3)``: the ref and how many parents up from it."""
    ups = 0
    while True:
        if ref.endswith("^") and len(ref) > 1:
            ref, ups = ref[:-1], ups + 1
            continue
        head, sep, num = ref.rpartition("~")
        if sep and head and (num == "" or num.isdigit()):
            ref, ups = head, ups + (int(num) if num else 1)
            continue
        return ref, ups
