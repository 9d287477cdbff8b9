"""`ObjectReader`: verified bytes of stored objects, and the one cache of pack handles.

Every load, every delta base a save streams, ``verify``, ``gc`` and ``push`` read objects through
here: a chain (a full object, then XOR deltas on top of it) is looked up in the catalog, every row's
claims are checked before anything is allocated for it, payloads are read with ``pread`` (objects
without a recorded location, and lossy deltas, through HDF5) and every level is checked against its
content hash. Pack files are opened once per reader (descriptors for ``pread``, HDF5 handles for
the rest) and closed by :meth:`ObjectReader.drop` when gc removes them.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from ..errors import CheckpointDamagedError, CoralError, CorruptObjectError, HashMismatchError, IntegrityError
from ..format import dtypes
from ..format.delta import DeltaEncoder
from ..format.manifest import Manifest
from ..format.weight_tensor import WeightMetadata, WeightTensor, content_hash
from ..lazy import LazyModule
from ..parallel import run_parallel
from . import streams
from .catalog import Catalog, CommitRow, ObjectRow
from .failures import CATALOG_NAME
from .packs import PACKS_DIR, PackGone

if TYPE_CHECKING:
    from ..storage import hdf5_store
    from ..storage.hdf5_store import HDF5Store
else:
    hdf5_store = LazyModule("coral_torch.storage.hdf5_store")  # h5py: only objects without a location need it

#: HDF5 handles kept open per reader (descriptors for pread are kept for every pack read)
OPEN_PACKS = 64


def _max_tensor_bytes() -> int:
    """The largest tensor a load will allocate: this machine's physical memory. A catalog row or
    pack that claims more is refused before any allocation."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
        return 1 << 40


class ObjectReader:
    """Reads and verifies the objects of the repository at ``path``. ``encoder()`` gives the delta
    encoder lossy deltas are rebuilt with (the repository's current one)."""

    def __init__(self, path: Path, catalog: Catalog, encoder: Callable[[], DeltaEncoder]):
        self.path = path
        self.catalog = catalog
        self.encoder = encoder
        self._packs: OrderedDict[str, HDF5Store] = OrderedDict()
        self._fds: dict[str, int] = {}  # pack -> read-only descriptor for pread

    def manifest(self, cid: str) -> tuple[CommitRow, Manifest] | None:
        """Commit ``cid``'s catalog row and its manifest, verified: the manifest must hash to the id
        (the catalog is not content-addressed on disk, so an edited or damaged row must not load),
        be of a format this version reads, and be well-formed."""
        row = self.catalog.get_commit(cid)
        if row is None:
            return None
        return row, Manifest.parse(row.manifest_json, cid, where=f"commit {cid[:12]} in {self.path / CATALOG_NAME}")

    def materialize(
        self,
        hashes: Sequence[str],
        *,
        workers: int,
        commit: str | None = None,
        names: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Raw bytes of objects (deltas rebuilt, every step verified) on ``workers`` threads. Damage
        raises :class:`CheckpointDamagedError` naming every affected tensor."""
        errors: dict[str, str] = {}
        unique = list(dict.fromkeys(hashes))
        # Catalog lookups happen here, on the calling thread; the workers only read and decode.
        chains: dict[str, list[ObjectRow]] = {}
        for h in unique:
            try:
                chains[h] = self.chain(h)
            except IntegrityError as exc:
                errors[h] = str(exc)
        todo = [h for h in unique if h in chains]

        def one(h: str) -> np.ndarray | None:
            try:
                try:
                    return self.build(chains[h])
                except PackGone:
                    # a concurrent gc moved the object to a new pack after we read its rows
                    return self.build(self.chain(h))
            except (CoralError, OSError, KeyError, ValueError, RuntimeError, TypeError, MemoryError) as exc:
                # whatever a damaged object makes the readers raise, it is damage to report
                errors[h] = str(exc) if isinstance(exc, CoralError) else f"{type(exc).__name__}: {exc}"
                return None

        built = run_parallel(one, todo, workers, cost=lambda h: sum(r.nbytes for r in chains[h]), name="coral-load")
        if errors:
            names = list(names) if names is not None else list(hashes)
            bad = [n for n, h in zip(names, hashes) if h in errors]
            first = next(iter(errors.values()))
            where = f"checkpoint {commit[:10]}" if commit else "the objects"
            raise CheckpointDamagedError(
                f"{where} in {self.path} is damaged: {len(bad)} tensor(s) cannot be restored: "
                f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''} (first error: {first}). "
                "Other checkpoints are unaffected unless `coral-torch verify` lists them.",
                commit=commit or "",
                tensors=bad,
            )
        return dict(zip(todo, cast("list[np.ndarray]", built)))  # no errors: nothing is None

    def chain(self, h: str) -> list[ObjectRow]:
        """The rows that rebuild ``h``: a full object first, then each delta on top of it."""
        chain: list[ObjectRow] = []
        cur: str | None = h
        while cur is not None:
            row = self.catalog.get_object(cur)
            if row is None:
                raise IntegrityError(f"object {cur} is missing from the catalog", hash_key=cur)
            chain.append(row)
            cur = row.base if row.kind == "delta" else None
            if len(chain) > 10_000:
                raise IntegrityError(f"delta chain of {h} loops", hash_key=h)
        chain.reverse()
        return chain

    def build(self, chain: list[ObjectRow], raw: np.ndarray | None = None) -> np.ndarray:
        """Decode the chain's full object, then XOR each delta into the same buffer, checking the
        content hash after every step (a damaged step is named, not just the end result).
        ``raw``: the bytes of the first row's base when the chain starts with a delta (modified)."""
        for row in chain:
            if row.offset is not None and row.length is not None and (row.kind == "full" or row.lossless):
                raw = self.read_object(row, raw)
                continue
            store = self.pack_store(row.pack)  # objects without a recorded location: through HDF5
            if row.kind == "full":
                w = store.load(row.hash)
                if w is None:
                    raise IntegrityError(f"object {row.hash} is missing from pack {row.pack}", hash_key=row.hash)
                raw = w.raw
            else:
                delta = store.load_delta(row.hash)
                if delta is None:
                    raise IntegrityError(f"delta {row.hash} is missing from pack {row.pack}", hash_key=row.hash)
                # a chain starts with a full object (or the caller gives its base): raw is set
                ref = WeightTensor.from_raw(
                    cast(np.ndarray, raw), WeightMetadata(name="", shape=row.shape, dtype=row.dtype)
                )
                w = self.encoder().reconstruct(delta, ref)
                actual = w.compute_hash()
                if row.lossless and actual != row.hash:  # a lossy delta is an approximation by design
                    raise IntegrityError(
                        f"object {row.hash} rebuilt from its delta hashes to {actual}: the delta or its "
                        "base is damaged",
                        hash_key=row.hash,
                    )
                raw = w.raw
        assert raw is not None
        return raw

    def read_object(self, row: ObjectRow, base: np.ndarray | None) -> np.ndarray:
        """Read one object straight from its pack with ``pread`` (no HDF5 call, no GIL held while
        reading) into this thread's reusable buffer, decode it (a delta: XORed into ``base`` in
        place), and check the content hash."""
        self.check_row(row)
        # a chunked blob is read a frame at a time into this thread's buffer, decoded into place
        reader = streams.open_stored(self.pack_fd(row.pack), row, where=row.pack)
        if row.kind == "delta":
            if base is None or base.size != row.nbytes:
                raise IntegrityError(f"delta {row.hash} does not fit its base {row.base}", hash_key=row.hash)
            raw = reader.decode_into(base, xor=True)
        else:
            raw = reader.decode_into(np.empty(row.nbytes, dtype=np.uint8))
        actual = content_hash(raw, row.dtype, row.shape)
        if actual != row.hash:
            raise HashMismatchError(
                f"object {row.hash} in pack {row.pack} is corrupt: its bytes hash to {actual}"
                + (" (the delta or its base is damaged)" if row.kind == "delta" else ""),
                hash_key=row.hash,
            )
        return raw

    def check_row(self, row: ObjectRow) -> None:
        """Refuse an object row whose claims cannot be true before anything is allocated for it."""
        try:
            itemsize = dtypes.itemsize(row.dtype)
        except CoralError as exc:
            raise CorruptObjectError(f"object {row.hash}: {exc}", hash_key=row.hash) from exc
        if not all(type(d) is int and d >= 0 for d in row.shape):
            raise CorruptObjectError(f"object {row.hash} has a malformed shape {row.shape}", hash_key=row.hash)
        n = 1
        for d in row.shape:
            n *= d
        if row.nbytes != n * itemsize:
            raise CorruptObjectError(
                f"object {row.hash}: catalog says {row.nbytes} bytes for {row.dtype}{list(row.shape)} "
                f"({n * itemsize}): the catalog is damaged",
                hash_key=row.hash,
            )
        if row.nbytes > _max_tensor_bytes():
            raise CorruptObjectError(
                f"object {row.hash} claims {row.nbytes / 2**30:.1f} GiB, more than this machine's memory: "
                "refused before allocating (a damaged or crafted catalog?)",
                hash_key=row.hash,
            )
        if row.kind not in ("full", "delta") or (row.kind == "delta") != bool(row.base):
            raise CorruptObjectError(
                f"object {row.hash} has a malformed kind/base ({row.kind}, {row.base})", hash_key=row.hash
            )

    def pack_fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            path = self.path / PACKS_DIR / name
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                if name not in self.catalog.packs():
                    raise PackGone(f"pack {name} was removed by gc") from None
                raise IntegrityError(f"pack {name} is missing from {self.path / PACKS_DIR}") from None
            kept = self._fds.setdefault(name, fd)  # another thread may have opened it meanwhile
            if kept != fd:
                os.close(fd)
            fd = kept
        return fd

    def pack_store(self, name: str) -> HDF5Store:
        store = self._packs.get(name)
        if store is None:
            path = self.path / PACKS_DIR / name
            if not path.exists():
                if name not in self.catalog.packs():
                    raise PackGone(f"pack {name} was removed by gc")
                raise IntegrityError(f"pack {name} is missing from {self.path / PACKS_DIR}")
            try:
                store = hdf5_store.HDF5Store(path, mode="r")
            except CoralError:
                raise
            except (OSError, RuntimeError, KeyError, ValueError) as exc:
                raise CorruptObjectError(f"pack {name} cannot be opened as HDF5 ({exc}): it is damaged") from exc
            self._packs[name] = store
            while len(self._packs) > 64:
                _, old = self._packs.popitem(last=False)
                old.close()
        else:
            self._packs.move_to_end(name)
        return store

    def verify_chain(self, chain: list[ObjectRow]) -> None:
        """Decode an object's chain and check every level's content hash, a chunk at a time where
        the chain allows it (a save's memory must not grow with the tensors it deduplicates)."""
        for r in chain:
            self.check_row(r)
        stream = streams.stream_base(chain, self.pack_fd)
        if stream is None:  # lossy or unlocated levels: through the whole-object decoder
            self.build(chain)
            return
        try:
            step = 8 << 20
            for start in range(0, len(stream), step):
                stream[start : start + step]
            if not stream.verified:
                raise IntegrityError(f"object {chain[-1].hash} could not be verified", hash_key=chain[-1].hash)
        finally:
            stream.release()

    def read_base(self, chain: list[ObjectRow], *, streamed: bool) -> np.ndarray | streams.BaseStream:
        """A delta base's bytes: a :class:`~.streams.BaseStream` where the chain allows (``streamed``;
        decoded a chunk at a time as the encoder reads it, each level hash-checked by the read that
        completes it), else the whole object, verified."""
        if streamed:
            for r in chain:
                self.check_row(r)
            stream = streams.stream_base(chain, self.pack_fd)
            if stream is not None:
                return stream
        return self.build(chain)

    def drop(self, names: Sequence[str], *, delete: bool = True) -> None:
        """Close this reader's handles of packs the catalog no longer lists, and delete the files
        (``delete``)."""
        for p in names:
            s = self._packs.pop(p, None)
            if s is not None:
                s.close()
            fd = self._fds.pop(p, None)
            if fd is not None:
                os.close(fd)
            if delete:
                (self.path / PACKS_DIR / p).unlink(missing_ok=True)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for s in self._packs.values():
            s.close()
        self._packs.clear()
