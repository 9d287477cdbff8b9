"""`HDF5PackFile`: the file mechanics under :class:`~coral_torch.storage.hdf5_store.HDF5Store`.

Opening or creating the store's HDF5 file (format check, page alignment for ``O_DIRECT``), writing
a prepared object (an HDF5 dataset with one JSON attribute; encoded payloads in a contiguous,
early-allocated dataset whose bytes are written with ``pwrite`` outside h5py), and reading one
object's stored payload and attributes back, checksum-verified but not decoded. What the objects
mean (tensors, deltas, their encoding) is the store's business, not this module's.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path
from typing import Any, cast

import h5py
import numpy as np

from ..errors import (
    CoralError,
    CorruptObjectError,
    NotAStoreError,
    ReadOnlyStoreError,
    StoreError,
    StoreNotFoundError,
)
from ..format import codec
from ..format.objects import (
    ENCODING_CODEC,
    ENCODING_VALUES,
    PreparedObject,
    as_text,
    delta_logical_bytes,
    jsonable,
    payload_checksum,
)
from .direct_io import MIN_DIRECT_BYTES, PAGE, PayloadWriter

FORMAT_NAME = "coral-torch-hdf5"
FORMAT_VERSION = 1
_MIN_FILTER_BYTES = 4096
META_ATTR = "coral"  # JSON metadata of each dataset
_PWRITE_MIN_BYTES = 1  # codec payloads are written with pwrite (see _create_for_pwrite)
# large datasets start on a page boundary, so their payload can be written with O_DIRECT
_ALIGNMENT = {"alignment_threshold": MIN_DIRECT_BYTES, "alignment_interval": PAGE}
_JSON_TYPE = h5py.h5t.py_create(h5py.string_dtype("utf-8"), logical=True)  # variable-length UTF-8

_READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def _read_only(path: Path, exc: OSError) -> ReadOnlyStoreError:
    """h5py's "cannot create/open" error (HDF5's flags and all) as one line; ``errno`` and
    ``filename`` are kept, so a repository can name its own read-only error."""
    assert exc.errno is not None  # one of _READ_ONLY_ERRNOS
    err = ReadOnlyStoreError(
        f"cannot write {path}: {os.strerror(exc.errno)} (read-only mount or no write permission); "
        "open it with mode='r' to read it, or write to a writable location"
    )
    err.errno, err.filename = exc.errno, str(path)
    return err


class HDF5PackFile:
    """One store file: its opening, the writing of prepared objects and the reading of stored ones.

    ``compression`` and ``compression_opts`` (already checked by the store) pick the HDF5 filter
    of datasets that hold values; ``mode``, ``direct_io`` and ``sync_every`` are those of
    :class:`~coral_torch.storage.hdf5_store.HDF5Store`.
    """

    def __init__(
        self,
        filepath: str | os.PathLike,
        mode: str,
        compression: str | None,
        compression_opts: Any,
        direct_io: bool = False,
        sync_every: int | None = None,
    ):
        self.filepath = Path(filepath)
        self.compression, self.compression_opts = compression, compression_opts
        if mode not in ("a", "r", "w", "x"):
            raise StoreError(f"mode must be 'a', 'r', 'w' or 'x', not {mode!r}")
        self.mode = mode
        self.direct_io = direct_io
        self.sync_every = sync_every
        self._writer: PayloadWriter | None = None  # payload bytes, outside h5py (see _create_for_pwrite)
        self._lock = threading.RLock()  # HDF5 calls of concurrent writers (see write_prepared)
        self._groups: dict[str, h5py.Group] = {}
        self._pwrite_dcpl: Any = None  # dataset creation property list of _create_for_pwrite
        self.file = self._open(mode)

    # ---------------------------------------------------------------------------------- set-up
    def _open(self, mode: str) -> h5py.File:
        path = self.filepath
        exists = path.exists()
        if mode == "r" and not exists:
            raise StoreNotFoundError(f"no store at {path}: the file does not exist (mode 'r' creates nothing)")
        if mode == "x" and exists:
            raise StoreError(f"{path} already exists; open it with mode='a' or choose another path")
        if exists and path.is_file() and path.stat().st_size == 0:
            # an empty file (touch, mkstemp, NamedTemporaryFile) holds nothing to protect
            if mode == "r":
                raise StoreNotFoundError(
                    f"no store at {path}: the file is empty (mode 'r' creates nothing); "
                    "open it with mode='a' to create a store in it"
                )
            exists = False
        if exists:
            if path.is_dir():
                raise NotAStoreError(f"{path} is a directory, not an HDF5 store file")
            if not h5py.is_hdf5(str(path)):
                raise NotAStoreError(
                    f"{path} exists but is not an HDF5 file; it was left untouched. Choose another path."
                )
            try:
                with h5py.File(path, "r") as probe:
                    self._check_format(probe)
            except OSError as exc:
                raise NotAStoreError(f"{path} is an HDF5 file that cannot be read: {exc}") from exc
        if mode in ("w", "x") or not exists:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                f = h5py.File(path, "w" if mode in ("w", "a") else "x", **self._alignment())
            except OSError as exc:
                if exc.errno not in _READ_ONLY_ERRNOS:
                    raise
                raise _read_only(path, exc) from exc
            f.attrs["coral_format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            for g in ("weights", "metadata", "deltas"):
                f.require_group(g)
            f.flush()
            return f
        try:
            return h5py.File(path, "r") if mode == "r" else h5py.File(path, "a", **self._alignment())
        except OSError as exc:
            if mode != "r" and exc.errno in _READ_ONLY_ERRNOS:
                raise _read_only(path, exc) from exc
            raise StoreError(
                f"cannot open {path} in mode {mode!r}: {exc}. Another process may hold it open for writing."
            ) from exc

    @property
    def spill_dir(self) -> Path:
        """Where an encoder of this store spills what does not fit its in-memory budget (see
        :func:`coral_torch.codec.encode_blob`): beside the file, so the copy into it stays in the kernel."""
        return self.filepath.parent

    def _alignment(self) -> dict[str, int]:
        """With direct I/O, large datasets start on a page boundary (O_DIRECT needs aligned
        offsets); otherwise HDF5 packs them back to back."""
        return _ALIGNMENT if self.direct_io else {}

    def _check_format(self, f: h5py.File) -> None:
        fmt = f.attrs.get("coral_format")
        if isinstance(fmt, bytes):
            fmt = fmt.decode()
        if fmt != FORMAT_NAME or not all(g in f for g in ("weights", "deltas")):
            raise NotAStoreError(f"{self.filepath} is an HDF5 file but not a coral-torch store; it was left untouched")
        version = int(f.attrs.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise NotAStoreError(
                f"{self.filepath} has store format {version}, newer than this coral-torch "
                f"understands ({FORMAT_VERSION}); upgrade coral-torch"
            )

    def writable_file(self) -> h5py.File:
        """The open file, for a change: a clear error if the store is closed or read-only."""
        if self.file is None or not self.file.id.valid:
            raise StoreError(f"store {self.filepath} is closed")
        if self.mode == "r":
            raise ReadOnlyStoreError(f"store {self.filepath} is open read-only (mode='r')")
        return self.file

    def readable_file(self) -> h5py.File:
        """The open file, for a read: a clear error if the store is closed."""
        if self.file is None or not self.file.id.valid:
            raise StoreError(f"store {self.filepath} is closed")
        return self.file

    # ------------------------------------------------------------------------------- write
    def write_prepared(self, obj: PreparedObject) -> bool:
        """Write a prepared object; ``False`` if the key was already present (nothing written).

        Thread-safe: HDF5 calls run under the store's lock, the payload bytes of large encoded
        objects are written after it is released (``pwrite``, no GIL), so several threads can
        encode and write at once."""
        self.writable_file()
        by_pwrite = self._pwrite_ok(obj)
        if isinstance(obj.payload, codec.Blob) and not by_pwrite:
            obj.payload = obj.payload.to_array()  # small: one contiguous buffer for h5py
        payload = obj.payload
        with self._lock:
            group = self._group(obj.group)
            if _has_link(group, obj.key):
                return False
            offset: int | None
            try:
                if by_pwrite:
                    dsid, offset = self._create_for_pwrite(group, obj.key, payload.nbytes)
                else:
                    assert isinstance(payload, np.ndarray)  # a Blob became an array above
                    kwargs = self._filter_kwargs(obj)
                    ds = group.create_dataset(obj.key, data=payload, **kwargs)
                    dsid = ds.id
                    offset = dsid.get_offset() if ds.chunks is None and payload.size else None
                # one JSON attribute, not one HDF5 attribute per field: measured ~4x cheaper per
                # dataset to write and to read (h5py attribute calls dominate small tensors);
                # written with the low-level API (3x cheaper than ds.attrs[...] = ..., same type)
                text = json.dumps(jsonable(obj.attrs), separators=(",", ":"))
                aid = h5py.h5a.create(dsid, META_ATTR.encode(), _JSON_TYPE, h5py.h5s.create(h5py.h5s.SCALAR))
                aid.write(np.array(text, dtype=h5py.string_dtype("utf-8")))
            except Exception:
                if obj.key in group:  # never leave a dataset without its attributes
                    del group[obj.key]
                raise
        if by_pwrite:
            assert offset is not None  # _create_for_pwrite always gives one
            try:
                self._pwrite_all(payload, offset)
            except BaseException:
                with self._lock:
                    if obj.key in group:
                        del group[obj.key]
                raise
        if offset is not None:
            obj.location = (int(offset), int(payload.nbytes))
        return True

    def _group(self, name: str) -> h5py.Group:
        g = self._groups.get(name)
        if g is None or not g.id.valid:
            g = self._groups[name] = self.file[name]
        return g

    def _filter_kwargs(self, obj: PreparedObject) -> dict[str, Any]:
        # HDF5 filters need chunked layout; below a few KiB they only add overhead (and szip refuses
        # chunks smaller than its block), so tiny datasets are stored plain.
        payload = cast(np.ndarray, obj.payload)  # not a Blob: those are written by pwrite
        if (
            obj.attrs.get("encoding") == ENCODING_VALUES
            and payload.nbytes >= _MIN_FILTER_BYTES
            and payload.ndim > 0
            and self.compression is not None
        ):
            kwargs: dict[str, Any] = {"compression": self.compression}
            if self.compression_opts is not None:
                kwargs["compression_opts"] = self.compression_opts
            return kwargs
        return {}

    def _pwrite_ok(self, obj: PreparedObject) -> bool:
        p = obj.payload
        if isinstance(p, codec.Blob):
            return p.nbytes >= _PWRITE_MIN_BYTES
        return (
            obj.attrs.get("encoding", ENCODING_CODEC) == ENCODING_CODEC
            and p.dtype == np.uint8
            and p.ndim == 1
            and p.nbytes >= _PWRITE_MIN_BYTES
            and p.flags.c_contiguous
        )

    def _create_for_pwrite(self, group: h5py.Group, key: str, size: int) -> tuple[Any, int]:
        """Create a contiguous uint8 dataset with its space allocated at once and return it with
        its file offset; the caller writes the bytes there with ``pwrite`` on a plain descriptor.
        h5py keeps the GIL while it copies data; a ``pwrite`` releases it, so other threads keep
        encoding during the write. HDF5 never touches an early-allocated, never-filled contiguous
        dataset's space after this."""
        if self._pwrite_dcpl is None:  # one property list for all of them (called under self._lock)
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_layout(h5py.h5d.CONTIGUOUS)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            self._pwrite_dcpl = dcpl
        space = h5py.h5s.create_simple((size,))
        dsid = h5py.h5d.create(group.id, key.encode(), h5py.h5t.STD_U8LE, space, dcpl=self._pwrite_dcpl)
        offset = dsid.get_offset()
        if offset is None:  # pragma: no cover - early allocation always gives an address
            raise StoreError(f"HDF5 gave no file offset for {key}")
        if self._writer is None:
            self._writer = PayloadWriter(self.filepath, direct=self.direct_io, sync_every=self.sync_every)
        return dsid, int(offset)

    def _pwrite_all(self, payload: np.ndarray | codec.Blob, offset: int) -> None:
        segments = payload.segments if isinstance(payload, codec.Blob) else [memoryview(payload).cast("B")]  # type: ignore[arg-type]  # numpy stubs: ndarray is a Buffer only on 3.12+
        assert self._writer is not None
        self._writer.write(segments, offset)

    def flush(self) -> None:
        self.writable_file().flush()

    # -------------------------------------------------------------------------------- read
    def read_payload(self, ds: h5py.Dataset, hash_key: str, attrs: dict[str, Any] | None = None) -> np.ndarray:
        """The stored payload of ``ds``, checked against its recorded payload checksum."""
        try:
            payload = ds[()]
        except (OSError, ValueError) as exc:
            raise CorruptObjectError(
                f"object {hash_key} in {self.filepath} cannot be read: {exc}", hash_key=hash_key
            ) from exc
        payload = np.asarray(payload)
        expected = (attrs if attrs is not None else read_attrs(ds, hash_key)).get("payload_xxh3")
        if expected is not None and payload_checksum(payload) != as_text(expected):
            raise CorruptObjectError(
                f"object {hash_key} in {self.filepath} is damaged (payload checksum mismatch); it was not returned",
                hash_key=hash_key,
            )
        return payload

    def dataset(self, group: str, key: str) -> h5py.Dataset | None:
        """The dataset of ``key`` in ``group``, None if there is none. What HDF5 meets finding and
        opening it in a damaged file (group index, object header) is :class:`CorruptObjectError`."""
        self.readable_file()
        try:
            g = self._group(group)
            ds = g[key] if key in g else None  # not g.get(): that takes HDF5's failure to open it for absence
        except (KeyError, RuntimeError, ValueError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:  # the OS's I/O error: named as such above
                raise
            raise CorruptObjectError(
                f"object {key} in {self.filepath} cannot be read: its HDF5 structure is "
                f"damaged ({type(exc).__name__}: {exc})",
                hash_key=key,
            ) from exc
        if ds is not None and not isinstance(ds, h5py.Dataset):  # a damaged object header's type
            raise CorruptObjectError(
                f"object {key} in {self.filepath} cannot be read: HDF5 finds a "
                f"{type(ds).__name__} there, not a dataset (its header is damaged)",
                hash_key=key,
            )
        return ds

    def location(self, key: str, group: str = "weights") -> tuple[int, int] | None:
        """``(file offset, length)`` of the bytes HDF5 reads as the payload of ``key`` (its dataset's
        contiguous storage), or None if it is stored otherwise; :class:`CorruptObjectError` if HDF5
        cannot open it."""
        self.readable_file()
        try:
            dsid = h5py.h5d.open(self._group(group).id, key.encode())
            offset = dsid.get_offset()
            return None if offset is None else (int(offset), int(dsid.get_storage_size()))
        except (KeyError, RuntimeError, ValueError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise
            raise CorruptObjectError(
                f"object {key} in {self.filepath} cannot be read: its HDF5 structure is "
                f"damaged ({type(exc).__name__}: {exc})",
                hash_key=key,
            ) from exc

    def read_prepared(self, key: str, group: str = "weights") -> PreparedObject | None:
        """The stored payload and attributes of one object, exactly as written, checksum-verified
        but not decoded. Used to copy objects between stores without re-encoding."""
        ds = self.dataset(group, key)
        if ds is None:
            return None
        attrs = read_attrs(ds, key)
        payload = self.read_payload(ds, key, attrs)
        try:
            if group == "weights":
                logical = int(attrs.get("nbytes", payload.nbytes))
            else:
                logical = delta_logical_bytes(attrs["original_shape"], as_text(attrs["original_dtype"]))
        except (KeyError, ValueError, TypeError, CoralError) as exc:
            raise CorruptObjectError(
                f"metadata of object {key} in {self.filepath} is damaged: {exc!r}", hash_key=key
            ) from exc
        return PreparedObject(key, group, payload, attrs, logical)

    # ----------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Close the file; raises what a background sync of its payloads met (the file is closed
        all the same)."""
        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                writer.close()
        finally:
            if self.file is not None and self.file.id.valid:
                self.file.close()
            self.file = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def _has_link(group: h5py.Group, key: str) -> bool:
    """``key in group`` for a plain name, through the low-level call (a quarter of the cost)."""
    if not key or "/" in key or key.startswith("."):  # paths, "." and ".." mean what h5py says they mean
        return key in group
    return bool(group.id.links.exists(key.encode()))


def read_attrs(ds: h5py.Dataset, key: str) -> dict[str, Any]:
    """A dataset's metadata: the JSON attribute, or (files from before it) one attribute per field."""
    try:
        raw = ds.attrs.get(META_ATTR)
        if raw is None:
            return {k: _py(v) for k, v in ds.attrs.items()}
    except (KeyError, RuntimeError, ValueError, OSError) as exc:  # HDF5 attribute storage damaged
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        raise CorruptObjectError(
            f"metadata of object {key} cannot be read: {type(exc).__name__}: {exc}", hash_key=key
        ) from exc
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        return doc
    except (ValueError, TypeError) as exc:
        raise CorruptObjectError(f"metadata of object {key} is damaged: {exc}", hash_key=key) from exc


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v
