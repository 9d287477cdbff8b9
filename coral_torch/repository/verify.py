"""``verify``: re-read everything a load, gc or push reads, the way they read it, and report damage.

:class:`Verifier` reads through the repository's :class:`~.read.ObjectReader` (payloads, chains)
and its packs' HDF5 structure (what push and gc read), checks the catalog itself (SQLite's integrity
check, table columns, commit rows against their manifests) and says which commits each damaged object
breaks. It changes nothing.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CatalogDamagedError, CoralError
from ..format import refnames
from ..format.delta import DeltaType
from ..lazy import LazyModule
from .catalog import Catalog, ObjectRow
from .failures import named_errors
from .packs import PACKS_DIR, PackGone
from .read import ObjectReader

if TYPE_CHECKING:
    from ..checkpoint import adapters, sharded
    from ..storage import hdf5_store
else:
    adapters = LazyModule("coral_torch.checkpoint.adapters")
    sharded = LazyModule("coral_torch.checkpoint.sharded")
    hdf5_store = LazyModule("coral_torch.storage.hdf5_store")


@dataclass
class VerifyReport:
    """Result of :meth:`Repository.verify`. ``ok`` is True when nothing is damaged or missing."""

    objects_checked: int = 0
    commits_checked: int = 0
    damaged_objects: dict[str, str] = field(default_factory=dict)
    damaged_commits: dict[str, list[str]] = field(default_factory=dict)
    missing_packs: list[str] = field(default_factory=list)
    orphan_files: list[str] = field(default_factory=list)
    #: commit id -> why its catalog row cannot be trusted (manifest hash, format, structure)
    damaged_manifests: dict[str, str] = field(default_factory=dict)
    #: ref name -> the commit it names, which does not exist
    dangling_refs: dict[str, str] = field(default_factory=dict)
    #: pack -> why HDF5 (push, gc) cannot read it although its payloads may be intact
    unreadable_packs: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (
            self.damaged_objects
            or self.damaged_commits
            or self.missing_packs
            or self.damaged_manifests
            or self.dangling_refs
            or self.unreadable_packs
        )

    RECOVERY = (
        "to recover, pull the damaged commits again from a remote that has them (coral-torch pull "
        "s3://...), or restore the repository from a backup; undamaged commits load as they are"
    )


class Verifier:
    """Checks the repository at ``path`` (see the module docstring)."""

    def __init__(self, path: Path, catalog: Catalog, reader: ObjectReader):
        self.path = path
        self.catalog = catalog
        self.reader = reader

    # ============================================================================= verify
    @named_errors
    def verify(self, *, progress: bool = False) -> VerifyReport:
        """Re-read and re-hash every object; report damaged objects and the commits they break.
        Everything a load, gc or push reads is checked the way they read it.

        Raises:
            CatalogDamagedError: the catalog file itself is damaged (pages, indexes, schema).
        """
        report = VerifyReport()
        problems = self.catalog.structure_problems()
        if problems:
            raise CatalogDamagedError(
                f"the catalog {self.catalog.path} is damaged ({' '.join('; '.join(problems[:3]).split())}); "
                "restore it from a backup, or pull the repository again from its remote (coral-torch pull)"
            )
        rows = self.catalog.all_objects()
        by_hash = {r.hash: r for r in rows}
        children: dict[str, list[ObjectRow]] = {}
        for r in rows:
            if r.kind == "delta":
                children.setdefault(r.base or "", []).append(r)
        packs_dir = self.path / PACKS_DIR
        pack_sizes = self.catalog.packs()
        if not all(isinstance(p, str) and p and "/" not in p for p in pack_sizes):
            raise CatalogDamagedError(
                f"a pack name in the catalog {self.catalog.path} is damaged "
                f"({sorted(map(repr, pack_sizes))[:3]}); restore the catalog from a backup, "
                "or pull the repository again"
            )
        known_packs = set(pack_sizes)
        report.missing_packs = sorted(p for p in known_packs if not (packs_dir / p).exists())
        # a pack whose size changed since it was published was truncated or overwritten: even
        # objects whose own bytes survived are in a file HDF5 (gc, push) can no longer read
        resized: dict[str, str] = {}
        for p, size in pack_sizes.items():
            try:
                actual = (packs_dir / p).stat().st_size
            except FileNotFoundError:
                continue
            if size is not None and actual != size:
                resized[p] = f"pack {p} is {actual} bytes, {size} when written (truncated or overwritten)"
        # HDF5 never returns from decoding some damaged global heaps (where the objects' JSON
        # attributes live): such a pack is not handed to HDF5 here, and gc and push would hang on it
        hangs = {p: f"pack {p}: {why}" for p in pack_sizes if (why := _global_heap_problem(packs_dir / p))}
        report.orphan_files = (
            sorted(p.name for p in packs_dir.iterdir() if p.name not in known_packs) if packs_dir.exists() else []
        )

        def mark_damaged(r: ObjectRow, why: str) -> None:
            stack = [(r, why)]
            while stack:
                o, w = stack.pop()
                if o.hash in report.damaged_objects:
                    continue
                report.damaged_objects[o.hash] = w
                stack.extend((c, f"its delta base {o.hash[:12]} is damaged") for c in children.get(o.hash, []))

        def walk(r: ObjectRow) -> None:
            # depth-first along delta chains; memory holds one chain at a time. A delta is XORed
            # into its base's buffer in place, so siblings get copies, and the sibling that owns
            # the buffer is pushed first (popped last, after the others copied it).
            stack: list[tuple[ObjectRow, np.ndarray | None, bool]] = [(r, None, True)]
            while stack:
                o, braw, owned = stack.pop()
                report.objects_checked += 1
                if o.pack in resized or o.pack in hangs:
                    mark_damaged(o, resized.get(o.pack) or hangs[o.pack])
                    continue
                try:
                    if braw is not None and not owned:
                        braw = braw.copy()
                    raw = self.reader.build([o], braw) if o.kind == "delta" else self.reader.build([o])
                except (CoralError, OSError, KeyError, PackGone) as exc:
                    mark_damaged(o, str(exc))
                    continue
                kids = children.get(o.hash, [])
                stack.extend((c, raw, i == 0) for i, c in enumerate(kids))

        for r in rows:
            if r.kind == "full" or r.base not in by_hash:
                if r.kind == "delta":
                    mark_damaged(r, f"its delta base {r.base} is missing")
                    continue
                walk(r)
        # what push and gc read: every object through HDF5, where the catalog says it is
        for p in sorted(known_packs - set(report.missing_packs)):
            in_pack = [r for r in rows if r.pack == p]
            why, bad = (hangs[p], {}) if p in hangs else self._check_pack_structure(p, in_pack)
            if why is not None:
                report.unreadable_packs[p] = why
                bad = {r.hash: why for r in in_pack}
            for r in in_pack:
                if r.hash in bad:
                    mark_damaged(r, bad[r.hash])
        # every commit's catalog row: manifest hash = id, format, structure, entries vs objects
        for cid in self.catalog.commit_ids():
            report.commits_checked += 1
            try:
                got = self.reader.manifest(cid)
                if got is None:
                    continue
                manifest = got[1]
                for e in manifest.tensors:
                    o = by_hash.get(e.hash)
                    if o is not None and (o.dtype != e.dtype or tuple(o.shape) != e.shape):
                        raise CatalogDamagedError(
                            f"tensor {e.name}: manifest says {e.dtype}{list(e.shape)}, "
                            f"object row {o.dtype}{list(o.shape)}"
                        )
                if manifest.sharded:
                    sharded.check_layout(manifest)
                else:
                    adapters.check_skeleton(manifest.skeleton, len(manifest.tensors))
                # what gc trusts and push sends besides the manifest: the object list, the other fields
                if {h for _, h, _ in self.catalog.commit_objects(cid)} != {e.hash for e in manifest.tensors}:
                    raise CatalogDamagedError(
                        "its object list in the catalog is not its manifest's (gc would remove objects it needs)"
                    )
                row = got[0]
                refnames.validate_component(row.run, "run")
                if (
                    not (row.parent is None or (isinstance(row.parent, str) and len(row.parent) == 32))
                    or not all(
                        v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (row.epoch, row.step)
                    )
                    or not isinstance(row.time, (int, float))
                    or not math.isfinite(row.time)
                    or not all(isinstance(v, int) and v >= 0 for v in (row.logical_bytes, row.new_bytes))
                ):
                    raise CatalogDamagedError("its parent, epoch, step, time or sizes have the wrong type")
            except CoralError as exc:
                report.damaged_manifests[cid] = str(exc)
        try:
            ref_rows = self.catalog.ref_rows()
        except (ValueError, TypeError) as exc:  # push reads these
            raise CatalogDamagedError(
                f"a ref row of the catalog {self.catalog.path} is damaged ({exc}); restore "
                "the catalog from a backup, or pull the repository again"
            ) from None
        for name, cid, _ in ref_rows:
            if self.catalog.get_commit(cid) is None:
                report.dangling_refs[name] = cid
            try:
                refnames.validate_ref_name(name)
            except CoralError as exc:
                report.damaged_manifests.setdefault(
                    cid,
                    f"a ref naming it cannot be pushed ({exc}): the catalog "
                    "is damaged, or the ref is from an older coral-torch",
                )
        for cid, names in self.catalog.commits_using(report.damaged_objects).items():
            report.damaged_commits[cid] = sorted(names)
        # commits whose objects are missing from the catalog
        for cid, missing in self.catalog.commits_missing_objects().items():
            report.damaged_commits.setdefault(cid, []).extend(missing)
        return report

    def _check_pack_structure(self, name: str, objects: list[ObjectRow]) -> tuple[str | None, dict[str, str]]:
        """What push and gc would meet reading the pack through HDF5: ``(why the pack cannot be
        opened, or None; {object hash: why HDF5 cannot give it back as the catalog records it}``).

        The payload check reads each object where the catalog says it is (``pread``), not through
        HDF5; gc and push read it with :meth:`HDF5Store.read_prepared` (the dataset's object header,
        its JSON attribute, the group's index) and push then decodes the payload against that
        attribute. So here every object is read as they read it, its attribute must describe the
        catalog row (what push parses from it), and HDF5 must find the payload at the bytes the
        payload check verified: then push's decode of it is the payload check's, not done twice.
        Damage the payload check found already keeps its own reason."""
        try:
            store = self.reader.pack_store(name)
        except Exception as exc:  # noqa: BLE001 - any failure to open the pack is what we report
            return f"pack {name} cannot be opened through HDF5 ({type(exc).__name__}: {exc})", {}
        bad: dict[str, str] = {}
        for o in objects:
            group = "deltas" if o.kind == "delta" else "weights"
            try:
                prep = store.read_prepared(o.hash, group)
                if prep is None:
                    bad[o.hash] = f"missing from the HDF5 index of pack {name}"
                    continue
                why = _attrs_mismatch(o, prep.attrs)
                if why is None and o.offset is not None:
                    where = store.location(o.hash, group)
                    if where != (o.offset, o.length) or int(prep.payload.nbytes) != o.length:
                        why = (
                            f"HDF5 reads it at {where} in pack {name}, the catalog says {(o.offset, o.length)} "
                            "(the pack's HDF5 metadata is damaged)"
                        )
            except Exception as exc:  # noqa: BLE001 - whatever gc and push would meet
                why = f"HDF5 cannot read it from pack {name} ({type(exc).__name__}: {exc})"
            if why is not None:
                bad[o.hash] = why
        return None, bad


def _attrs_mismatch(o: ObjectRow, a: dict[str, Any]) -> str | None:
    """Why an object's HDF5 attribute (what push uploads as its description and decodes the
    payload against) does not describe catalog row ``o``; None when it does."""
    got: tuple[Any, ...]
    want: tuple[Any, ...]
    try:
        if o.kind == "delta":
            kind = DeltaType(str(a["delta_type"]))
            got = (
                tuple(int(x) for x in a["original_shape"]),
                str(a["original_dtype"]),
                str(a["reference_hash"]),
                kind.lossless,
            )
            float(a.get("compression_ratio", 1.0))
            want = (tuple(o.shape), o.dtype, o.base, o.lossless)
        else:
            got = (
                tuple(int(x) for x in np.asarray(a["shape"]).reshape(-1)),
                str(a["dtype"]),
                str(a.get("hash", o.hash)),
                int(a["nbytes"]),
                str(a.get("encoding", hdf5_store.ENCODING_VALUES)),
            )
            encoding = hdf5_store.ENCODING_CODEC if o.offset is not None else got[-1]
            want = (tuple(o.shape), o.dtype, o.hash, o.nbytes, encoding)
    except (KeyError, ValueError, TypeError, CoralError) as exc:
        return f"its HDF5 attribute is damaged ({type(exc).__name__}: {exc})"
    if got != want:
        return f"its HDF5 attribute says {got}, the catalog {want} (the attribute is damaged)"
    return None


def _global_heap_problem(path: Path) -> str | None:
    """Why HDF5 would loop forever reading the file at ``path``, or None. It decodes a global heap
    collection (signature ``GCOL``) object header by object header, and an index-0 header of size
    0 (a damaged size or index) does not move it on: it spins there, holding h5py's lock. The same
    walk here, over every collection found by its signature, stops at such a header."""
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            end_of_file = len(mm)
            at = mm.find(b"GCOL")
            while at >= 0:
                size = int.from_bytes(mm[at + 8 : at + 16], "little") if at + 16 <= end_of_file else 0
                if mm[at + 4 : at + 5] == b"\x01" and 16 < size and at + size <= end_of_file:
                    p, end = at + 16, at + size  # header: signature, version, 3 reserved, size
                    while p + 16 <= end:  # object: index (2), references (2), reserved (4), size (8), data
                        index = int.from_bytes(mm[p : p + 2], "little")
                        n = int.from_bytes(mm[p + 8 : p + 16], "little")
                        step = 16 + (n + 7) // 8 * 8 if index else n  # index 0: free space, size as is
                        if step == 0:
                            return (
                                f"its HDF5 global heap at byte {at} is damaged (object header at byte {p}); "
                                "HDF5 would not return reading it"
                            )
                        p += step
                at = mm.find(b"GCOL", at + 4)
    except (OSError, ValueError):  # unreadable or empty: the other checks name that
        return None
    return None
