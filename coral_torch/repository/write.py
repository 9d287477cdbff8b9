"""`ObjectWriter`: the write path of a commit, plan -> encode -> pack, without the repository lock.

:class:`~.planner.DeltaPlanner` decides per tensor (new, duplicate, delta against the same tensor of
the parent); the writer encodes what is new (an XOR delta against a base streamed back from the
repository and hash-checked as it is read, or the tensor whole, whichever is smaller), writes it
into one new pack (:class:`~.packs.PackWriter`: temp -> fsync -> rename) on the repository's encoder
threads, and hands :class:`WrittenObjects` to :meth:`Repository.publish`. It also keeps the record of
which objects this process verified or wrote (:meth:`ObjectWriter.intact_objects`), so a save never
builds on damage without re-reading what it already trusts.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import CoralError, DiskFullError, IntegrityError
from ..format import codec, dtypes
from ..format.delta import Delta, DeltaConfig, DeltaEncoder, DeltaType
from ..format.weight_tensor import WeightMetadata, WeightTensor
from ..lazy import LazyModule
from ..parallel import HelpBoard, run_parallel
from . import streams
from .catalog import Catalog, ObjectRow
from .failures import is_disk_full
from .packs import PACKS_DIR, PackGone, PackWriter, WrittenPack
from .planner import DeltaPlanner, PlannedObject
from .read import ObjectReader

if TYPE_CHECKING:
    from ..storage import hdf5_store
    from ..storage.hdf5_store import HDF5Store, PreparedObject
else:
    hdf5_store = LazyModule("coral_torch.storage.hdf5_store")

log = logging.getLogger(__name__)


@dataclass
class WrittenObjects:
    """What :meth:`Repository.write_objects` stored and :meth:`Repository.publish` makes visible:
    the new packs, their objects' catalog rows and how each was stored (plain data: it can be
    pickled to the process that publishes)."""

    packs: list[WrittenPack]
    rows: list[ObjectRow]
    hows: dict[str, str]
    #: hashes the catalog already listed whose stored objects were damaged: these rows replace theirs
    replace: list[str] = field(default_factory=list)


class ObjectWriter:
    """Writes new objects into packs of the repository at ``path`` (see the module docstring).
    :meth:`configure` sets the delta policy, encoder and planner the repository uses."""

    def __init__(self, path: Path, catalog: Catalog, reader: ObjectReader):
        self.path = path
        self.catalog = catalog
        self.reader = reader
        self.delta_config = DeltaConfig()
        self.encoder = DeltaEncoder(self.delta_config)
        self.planner: DeltaPlanner | None = None
        # object hash -> (inode, size, mtime) of the packs of its chain when this process last
        # verified or wrote it: a save relies on it again without re-reading while they match
        self._trusted: dict[str, tuple] = {}

    def configure(self, config: DeltaConfig, encoder: DeltaEncoder, planner: DeltaPlanner) -> None:
        self.delta_config, self.encoder, self.planner = config, encoder, planner

    def discard(self, written: Sequence[WrittenObjects], *, unpublished: bool = False) -> None:
        """Remove packs written by :meth:`write_objects` that will not be published. A pack the
        catalog already names (published after all) is left alone, unless the caller knows its
        publish never committed (``unpublished``: the catalog may be unreadable then, e.g. a full disk)."""
        known = set() if unpublished else self.catalog.packs()
        for w in written:
            for p in w.packs:
                if p.name not in known:
                    (self.path / PACKS_DIR / p.name).unlink(missing_ok=True)

    def intact_objects(self, hashes: set[str]) -> set[str]:
        """Those of ``hashes`` (objects the catalog lists) that a new commit may rely on: every pack
        along the object's delta chain is present at its recorded size, and the object was verified
        (decoded, every step hash-checked) by this process since those packs last changed, or is
        verified now. What fails is stored again by the save (see :meth:`publish`)."""
        recorded = self.catalog.packs()
        sigs: dict[str, tuple | None] = {}
        ok: set[str] = set()
        for h in hashes:
            try:
                chain = self.reader.chain(h)
            except IntegrityError:
                continue
            key = self._chain_key(chain, sigs, recorded)
            if key is None:
                log.warning("object %s is in a pack that is missing or resized: this save stores it again", h[:12])
                continue
            if self._trusted.get(h) != key:
                try:
                    self.reader.verify_chain(chain)
                except (CoralError, OSError, KeyError, ValueError, RuntimeError, PackGone) as exc:
                    log.warning("object %s is damaged (%s): this save stores it again", h[:12], exc)
                    continue
                self._trusted[h] = key
            ok.add(h)
        return ok

    def trust_written(self, rows: Sequence[ObjectRow]) -> None:
        """Objects this process just wrote and published need no re-read while their packs stay as they are."""
        sigs: dict[str, tuple | None] = {}
        for row in rows:
            try:
                key = self._chain_key(self.reader.chain(row.hash), sigs)
            except IntegrityError:
                continue
            if key is not None:
                self._trusted[row.hash] = key

    def _chain_key(
        self, chain: Sequence[ObjectRow], sigs: dict[str, tuple | None], recorded: dict[str, int] | None = None
    ) -> tuple | None:
        """The packs' signatures along ``chain`` (``sigs`` caches them per call), or None if a pack is
        gone or, with ``recorded``, not at its recorded size."""
        key = []
        for r in chain:
            if r.pack not in sigs:
                sigs[r.pack] = _pack_signature(self.path / PACKS_DIR / r.pack)
            sig = sigs[r.pack]
            if sig is None or (recorded is not None and sig[1] != recorded.get(r.pack)):
                return None
            key.append(sig)
        return tuple(key)

    def _encode_one(self, store: HDF5Store, planned: PlannedObject) -> tuple[PreparedObject, ObjectRow, str]:
        """Encode one tensor as a delta against its planned base (when that pays) or whole; returns
        the prepared object, its catalog row and how the commit stored it (``commit_objects.how``).
        The payload is a segmented blob over this call's buffers: the caller writes it right away."""
        slot, base_row = planned.tensor, planned.base
        w = slot.weight
        h = w.compute_hash()
        cfg = self.delta_config
        lossless = cfg.delta_type.lossless
        # a lossless delta reads its base a chunk at a time (streams.BaseStream), hash-checked as read
        base_raw = self._read_base(base_row, streamed=lossless) if base_row is not None else None
        full: PreparedObject | None = None
        lost = False
        blob: codec.Blob | None = None
        planner = self.planner
        assert planner is not None  # configure() ran
        try:
            if base_raw is not None and lossless and not planner.delta_may_pay(w, base_raw):
                base_raw, lost = None, True
            if base_raw is not None and lossless:
                blob = codec.encode_blob(
                    w.raw, dtypes.itemsize(w.dtype), cfg.codec_level, base=base_raw, spill_dir=store.spill_dir
                )
        except (CoralError, OSError) as exc:  # the streamed base turned out unreadable or damaged
            assert base_row is not None  # only a read base fails
            log.warning("delta base %s is unreadable (%s); storing the tensor whole", base_row.hash[:12], exc)
            base_raw = None
        if base_raw is not None and not lossless:  # DeltaConfig(allow_lossy=True) only
            assert base_row is not None and isinstance(base_raw, np.ndarray)  # not streamed when lossy
            ref = WeightTensor.from_raw(base_raw, WeightMetadata(name=slot.name, shape=w.shape, dtype=w.dtype))
            delta = self.encoder.encode(w, ref)
            prep = store.prepare_delta(delta, h)
            prep.attrs["name"] = slot.name
            return prep, _delta_row(h, base_row, w, prep.stored_bytes, base_row.full_estimate, delta.lossless), "delta"
        base_raw = None  # a streamed base's buffers go before a full encode
        if blob is not None:
            assert base_row is not None  # a delta blob has a base
            if blob.nbytes > cfg.min_saving * base_row.full_estimate:
                full = store.prepare(_renamed(w, slot.name), segmented=True)
            if full is None or blob.nbytes < full.stored_bytes:
                estimate = full.stored_bytes if full is not None else base_row.full_estimate
                delta = Delta(
                    DeltaType.XOR,
                    b"",
                    w.shape,
                    w.dtype,
                    base_row.hash,
                    compression_ratio=blob.nbytes / max(w.nbytes, 1),
                )
                prep = hdf5_store.delta_object(delta, h, blob)
                prep.attrs["name"] = slot.name
                row = _delta_row(h, base_row, w, prep.stored_bytes, estimate, True)
                return prep, row, "delta"
            lost = True
        blob = None
        if full is None:
            full = store.prepare(_renamed(w, slot.name), segmented=True)
        row = ObjectRow(h, "", "full", None, 0, w.dtype, w.shape, w.nbytes, full.stored_bytes, full.stored_bytes, True)
        return full, row, planner.how_stored_whole(lost, planned.skip_left)

    def _read_base(self, row: ObjectRow, streamed: bool = False) -> np.ndarray | streams.BaseStream | None:
        """The bytes of a delta base, read back and verified (see :meth:`ObjectReader.read_base`);
        None (store the tensor whole) if they cannot be read. One tensor at a time: no copy of a
        checkpoint is kept."""
        try:
            return self.reader.read_base(self.reader.chain(row.hash), streamed=streamed)
        except (CoralError, OSError) as exc:
            log.warning("delta base %s is unreadable (%s); storing the tensor whole", row.hash[:12], exc)
            return None

    def write_pack(
        self,
        todo: dict[str, PlannedObject],
        workers: int,
        board: HelpBoard | None = None,
        direct_io: bool = False,
    ) -> WrittenObjects:
        if not todo:
            return WrittenObjects([], [], {})
        hows: dict[str, str] = {}
        writer: PackWriter | None = None

        def encode_and_write(item: PlannedObject) -> ObjectRow:
            assert writer is not None  # created before the workers start
            prep, row, how = self._encode_one(writer.store, item)
            location = writer.write(prep)
            row.pack = writer.name
            if location is not None:
                row.offset, row.length = location
            hows[row.hash] = how
            return row

        # Each worker encodes and writes its own tensors, largest first (see run_parallel), so the
        # threads finish together. A lone low-priority worker that a waiting thread may join later
        # goes smallest first instead: the many small objects are mostly Python and HDF5 calls under
        # the GIL, one thread's work anyway; the large ones (zstd, pwrite, GIL released) are what
        # two threads can share once the helper arrives.
        smallest_first = workers <= 1 and board is not None
        try:
            writer = PackWriter(self.path, codec_level=self.delta_config.codec_level, direct_io=direct_io)
            rows = run_parallel(
                encode_and_write,
                list(todo.values()),
                workers,
                name="coral-encode",
                board=board,
                cost=lambda it: -it.tensor.weight.nbytes if smallest_first else it.tensor.weight.nbytes,
            )
            pack = writer.finish()
        except BaseException as exc:
            if writer is not None:
                writer.abort()
            if is_disk_full(exc):
                packs = self.path / PACKS_DIR
                needed = sum(item.tensor.weight.nbytes for item in todo.values())
                free = shutil.disk_usage(packs).free
                raise DiskFullError(
                    f"no space left on the disk holding {packs}: this save needs up to {needed / 1e6:.1f} MB "
                    f"({free / 1e6:.1f} MB free); nothing was saved and earlier checkpoints are intact. "
                    "Free space (e.g. coral-torch gc --yes) and save again",
                    path=str(packs),
                    needed=needed,
                ) from exc
            raise
        # finished and renamed: gc's grace period for young orphans protects it until publish
        return WrittenObjects([pack], rows, hows, [h for h, item in todo.items() if item.replaces])


def _delta_row(h: str, base: ObjectRow, w: WeightTensor, stored: int, estimate: int, lossless: bool) -> ObjectRow:
    """The catalog row of a new delta of ``w`` against ``base`` (its pack and location set once written)."""
    return ObjectRow(h, "", "delta", base.hash, base.depth + 1, w.dtype, w.shape, w.nbytes, stored, estimate, lossless)


def _renamed(w: WeightTensor, name: str) -> WeightTensor:
    """The same bytes under a display name (metadata only, no copy)."""
    return WeightTensor.from_raw(
        w.raw, WeightMetadata(name=name, shape=w.shape, dtype=w.dtype), known_hash=w.compute_hash()
    )


def _pack_signature(path: Path) -> tuple[int, int, int] | None:
    """``(inode, size, mtime_ns)`` of a pack file, None if it is gone: any rewrite changes it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns
