"""One conformance suite for the storage chapter's `WeightStore` contract, run against every backend.

``WeightStoreSuite`` is written once (zarr-python v3 style): it needs an ``open_store`` fixture, a
factory that opens a store on the same location each time it is called (a path, a bucket and
prefix), and a ``damage_payload(store, key)`` hook that damages a stored payload the way only that
backend can. Its ``store`` fixture is ``open_store()``, closed after the test. The subclasses are:

- ``TestHDF5Store``: an ``.h5`` file under ``tmp_path``;
- ``TestS3StoreMoto``: :class:`S3Store` on moto's server on 127.0.0.1 (conftest ``server``/``bucket``);
- ``TestS3StoreRclone``: :class:`S3Store` on ``rclone serve s3`` on 127.0.0.1 (conftest
  ``rclone_server``), with botocore's checksum settings at ``when_required`` (rclone sends the
  whole object's CRC32 with a ranged GET).

The contract (``coral_torch/storage/weight_store.py`` and SPEC-storage.md 4.2): keys are content
hashes; ``store`` is idempotent and returns the key; ``load`` returns ``None`` for an unknown key
and verifies what it returns; ``exists``/``delete`` answer ``False`` for unknown keys;
``get_metadata`` reads a description without the payload, ``None`` if absent; ``store_batch``
returns ``{input key: hash}``; ``load_batch`` leaves unknown keys out; ``get_storage_info`` reports
counts and sizes, ``compression_ratio`` being ``compressed_bytes / total_bytes``; stores are
context managers. Both backends also keep deltas (``store_delta`` ... ``delete_delta``, SPEC 4.3).

Where the backends legitimately differ the class says so in an attribute (``key_policy``,
``info_keys``, ``delta_array_kept``); no test is skipped for one backend.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers

from conftest import DTYPE_NAMES, make_tensor, raw_bytes, tensor_cases  # noqa: E402
from s3_server import REGION, TEST_KEY, TEST_SECRET  # noqa: E402

from coral_torch.errors import IntegrityError, StoreError  # noqa: E402
from coral_torch.format.delta import Delta, DeltaEncoder, DeltaType  # noqa: E402
from coral_torch.format.weight_tensor import WeightMetadata, WeightTensor  # noqa: E402
from coral_torch.storage import WeightStore  # noqa: E402
from coral_torch.storage.hdf5_store import HDF5Store  # noqa: E402
from coral_torch.storage.s3_store import S3Config, S3Store  # noqa: E402

pytestmark = [pytest.mark.timeout(180), pytest.mark.filterwarnings("ignore::UserWarning")]

MiB = 1 << 20
#: a well-formed content hash that no test stores
MISSING = "0" * 32
#: what every backend's get_storage_info() reports (each adds its own keys: see ``info_keys``)
COMMON_INFO_KEYS = {
    "total_weights",
    "total_bytes",
    "compressed_bytes",
    "compression_ratio",
    "total_deltas",
    "delta_bytes",
}


def tensor_of(t: torch.Tensor, name: str, **meta: Any) -> WeightTensor:
    w = WeightTensor(t, name=name)
    if meta:
        w = WeightTensor(t, WeightMetadata(name=name, shape=tuple(t.shape), dtype=t.dtype, **meta))
    return w


def assert_bit_exact(loaded: WeightTensor, original: torch.Tensor, what: str = "") -> None:
    assert loaded is not None, f"{what}: not found"
    back = loaded.to_torch()
    assert (back.dtype, tuple(back.shape)) == (original.dtype, tuple(original.shape)), what
    assert raw_bytes(back) == raw_bytes(original), f"{what}: bytes differ"


def random_bits(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int32, generator=g).view(torch.float32)


class WeightStoreSuite:
    """The `WeightStore` contract. Subclasses provide ``open_store`` and ``damage_payload``."""

    #: what a key that is not a plain name (``""``, ``"a/b"``, ``"../x"``) does.
    #: ``"absent"``: it names nothing (reads say so: ``None``/``False``); ``"refused"``: every method
    #: raises :class:`StoreError` before touching the backend (S3Store's ``check_key``: object keys
    #: must stay inside the prefix).
    key_policy: str = "absent"
    #: get_storage_info() keys this backend reports besides ``COMMON_INFO_KEYS``
    info_keys: frozenset = frozenset()
    #: whether a delta whose ``data`` is an ndarray loads back as an ndarray (of its dtype and shape);
    #: ``False``: it loads back as its raw bytes (``bytes``), which rebuild the same tensor
    delta_array_kept: bool = True

    # ------------------------------------------------------------------------- fixtures/hooks
    @pytest.fixture
    def open_store(self) -> Callable[[], WeightStore]:  # pragma: no cover - provided by subclasses
        raise NotImplementedError

    @pytest.fixture
    def store(self, open_store) -> Iterator[WeightStore]:
        s = open_store()
        try:
            yield s
        finally:
            s.close()

    def damage_payload(self, store: WeightStore, key: str) -> None:  # pragma: no cover - per backend
        """Flip one byte of the payload stored under ``key``, behind the store's back."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ basics
    def test_is_a_weight_store(self, store):
        assert isinstance(store, WeightStore)

    def test_empty_store(self, store):
        assert store.list_weights() == []
        assert store.list_deltas() == []
        assert store.load_batch([]) == {}
        assert store.store_batch({}) == {}
        info = store.get_storage_info()
        assert info["total_weights"] == 0 and info["total_deltas"] == 0
        assert info["total_bytes"] == 0
        assert info["compression_ratio"] == 1.0

    def test_store_returns_content_hash_and_round_trips(self, store):
        t = make_tensor("float32", (16, 24), seed=5)
        w = WeightTensor(t, name="layer.weight")
        key = store.store(w)
        assert key == w.compute_hash()
        assert store.exists(key)
        assert store.list_weights() == [key]
        assert_bit_exact(store.load(key), t, "float32 16x24")
        assert store.load(key).metadata.name == "layer.weight"

    @pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
    def test_dtypes_and_shapes_bit_exact(self, store, dtype_name):
        """Every dtype (bfloat16, float8, complex...) and shape (0-d, empty, transposed and stepped
        views) comes back bit for bit: NaN payloads, -0.0, infinities and subnormals included."""
        cases = tensor_cases(dtype_name)
        keys = {}
        for label, t in cases:
            w = WeightTensor(t, name=f"{dtype_name}.{label}")
            keys[label] = store.store(w)
            assert keys[label] == w.compute_hash()
        for label, t in cases:
            loaded = store.load(keys[label])
            assert_bit_exact(loaded, t, f"{dtype_name} {label}")
            assert loaded.metadata.dtype == t.dtype
            assert loaded.shape == tuple(t.shape)
        assert set(store.list_weights()) == set(keys.values())

    def test_scalar_and_empty_tensors(self, store):
        cases = {
            "0-d": torch.tensor(3.25, dtype=torch.float32),
            "0-d bf16": torch.tensor(-1.5, dtype=torch.bfloat16),
            "empty": torch.zeros(0, dtype=torch.float32),
            "empty 2-d": torch.zeros((0, 4), dtype=torch.bfloat16),
            "empty 3-d": torch.zeros((3, 0, 2), dtype=torch.int64),
        }
        for label, t in cases.items():
            key = store.store(WeightTensor(t, name=label))
            got = store.load(key)
            assert_bit_exact(got, t, label)
            meta = store.get_metadata(key)
            assert meta.shape == tuple(t.shape) and meta.dtype == t.dtype, label
            assert meta.nbytes == t.numel() * t.element_size()

    def test_large_tensor_round_trip(self, store):
        """6 MiB of random bits: a multipart upload and a ranged download on S3."""
        t = random_bits(1_600_000, seed=11)
        key = store.store(WeightTensor(t, name="big"))
        assert_bit_exact(store.load(key), t, "big")
        assert store.get_storage_info()["total_bytes"] == t.numel() * 4

    # ------------------------------------------------------------------------------ metadata
    def test_metadata_preserved(self, store):
        t = make_tensor("bfloat16", (8, 12), seed=6)
        w = tensor_of(t, "encoder.layer0.weight", layer_type="Linear", model_name="tiny-bert")
        key = store.store(w)
        for meta in (store.get_metadata(key), store.load(key).metadata):
            assert meta.name == "encoder.layer0.weight"
            assert meta.shape == (8, 12)
            assert meta.dtype == "bfloat16" and meta.dtype == torch.bfloat16
            assert meta.layer_type == "Linear"
            assert meta.model_name == "tiny-bert"
            assert meta.hash == key

    def test_metadata_defaults_preserved(self, store):
        key = store.store(WeightTensor(np.arange(5, dtype=np.int16), name="steps"))
        meta = store.get_metadata(key)
        assert (meta.name, meta.shape, meta.dtype, meta.layer_type, meta.model_name) == (
            "steps",
            (5,),
            "int16",
            None,
            None,
        )

    # ------------------------------------------------------------------------------ missing
    def test_missing_key(self, store):
        store.store(WeightTensor(np.ones(3, np.float32), name="present"))
        assert store.load(MISSING) is None
        assert store.exists(MISSING) is False
        assert store.get_metadata(MISSING) is None
        assert store.delete(MISSING) is False
        assert store.load_delta(MISSING) is None
        assert store.delta_exists(MISSING) is False
        assert store.delete_delta(MISSING) is False

    def test_load_batch_leaves_out_missing_keys(self, store):
        ws = {f"w{i}": WeightTensor(make_tensor("float16", (9, i + 1), seed=i), name=f"w{i}") for i in range(3)}
        hashes = store.store_batch(ws)
        keys = list(hashes.values())
        got = store.load_batch([keys[0], MISSING, keys[2], keys[0]])
        assert list(got) == [keys[0], keys[2]]
        for k in (0, 2):
            assert_bit_exact(got[keys[k]], ws[f"w{k}"].to_torch(), f"w{k}")
        assert store.load_batch([MISSING]) == {}

    def test_non_plain_keys(self, store):
        """``key_policy`` says what a key that is not a plain name does on this backend."""
        store.store(WeightTensor(np.ones(3, np.float32), name="present"))
        for bad in ("", "a/b", "../x"):
            if self.key_policy == "absent":
                assert store.load(bad) is None, bad
                assert store.exists(bad) is False, bad
                assert store.get_metadata(bad) is None, bad
                assert store.delete(bad) is False, bad
            else:
                assert self.key_policy == "refused"
                for call in (store.load, store.exists, store.get_metadata, store.delete, store.load_delta):
                    with pytest.raises(StoreError, match="invalid object key"):
                        call(bad)
        assert len(store.list_weights()) == 1

    # ------------------------------------------------------------------------------ writes
    def test_store_is_idempotent(self, store):
        t = make_tensor("float32", (32, 32), seed=7)
        first = store.store(WeightTensor(t, name="first"))
        info = store.get_storage_info()
        # the same content again, under another name: same key, nothing new, the first description stays
        assert store.store(WeightTensor(t.clone(), name="second")) == first
        assert store.store(WeightTensor(t, name="first")) == first
        assert store.list_weights() == [first]
        after = store.get_storage_info()
        assert after["total_weights"] == info["total_weights"] == 1
        assert after["compressed_bytes"] == info["compressed_bytes"]
        assert store.get_metadata(first).name == "first"
        assert_bit_exact(store.load(first), t, "idempotent")

    def test_store_under_given_key(self, store):
        t = make_tensor("int32", (10,), seed=8)
        w = WeightTensor(t, name="custom")
        assert store.store(w, "my-key") == "my-key"
        assert store.exists("my-key") and not store.exists(w.compute_hash())
        assert_bit_exact(store.load("my-key"), t, "custom key")
        assert store.get_metadata("my-key").hash == w.compute_hash()  # the content's hash, not the key

    def test_store_batch(self, store):
        t = make_tensor("bfloat16", (40, 3), seed=9)
        ws = {
            "a": WeightTensor(t, name="a"),
            "b": WeightTensor(make_tensor("int8", (77,), seed=10), name="b"),
            "a_again": WeightTensor(t.clone(), name="a_again"),  # same content: stored once
            "scalar": WeightTensor(make_tensor("float64", (), seed=11), name="scalar"),
        }
        result = store.store_batch(ws)
        assert list(result) == list(ws)
        assert result == {name: w.compute_hash() for name, w in ws.items()}
        assert result["a"] == result["a_again"]
        assert sorted(store.list_weights()) == sorted(set(result.values()))
        got = store.load_batch(list(result.values()))
        assert set(got) == set(result.values())
        for name, w in ws.items():
            assert_bit_exact(got[result[name]], w.to_torch(), name)
        assert store.store_batch(ws) == result  # idempotent too
        assert len(store.list_weights()) == 3

    def test_delete(self, store):
        k1 = store.store(WeightTensor(make_tensor("float32", (5,), seed=12), name="one"))
        k2 = store.store(WeightTensor(make_tensor("float32", (6,), seed=13), name="two"))
        assert store.delete(k1) is True
        assert store.delete(k1) is False
        assert not store.exists(k1) and store.load(k1) is None and store.get_metadata(k1) is None
        assert store.list_weights() == [k2]
        assert store.load_batch([k1, k2]).keys() == {k2}
        # stored again after a delete: back, bit for bit
        t = make_tensor("float32", (5,), seed=12)
        assert store.store(WeightTensor(t, name="one")) == k1
        assert_bit_exact(store.load(k1), t, "re-stored")

    # ------------------------------------------------------------------------------ integrity
    def test_load_verifies_the_bytes(self, store):
        """``load`` verifies what it returns: a damaged payload raises, it is never returned."""
        t = random_bits(4096, seed=14)
        key = store.store(WeightTensor(t, name="victim"))
        self.damage_payload(store, key)
        with pytest.raises(IntegrityError):
            store.load(key)
        with pytest.raises(IntegrityError):
            store.load_batch([key])

    # ------------------------------------------------------------------------------ info
    def test_storage_info(self, store):
        dtypes = ("float32", "bfloat16", "int64")
        ws = [WeightTensor(make_tensor(d, (33, 7), seed=i), name=d) for i, d in enumerate(dtypes)]
        for w in ws:
            store.store(w)
        info = store.get_storage_info()
        assert COMMON_INFO_KEYS | self.info_keys <= set(info)
        assert info["total_weights"] == 3
        assert info["total_bytes"] == sum(w.nbytes for w in ws)
        assert info["compressed_bytes"] > 0
        assert info["compression_ratio"] == pytest.approx(info["compressed_bytes"] / info["total_bytes"])
        assert info["total_deltas"] == 0 and info["delta_bytes"] == 0

    # ------------------------------------------------------------------------------ deltas
    def _delta_pair(self, seed: int = 15):
        rng = np.random.default_rng(seed)
        ref = WeightTensor(rng.standard_normal(2000).astype(np.float32), name="ref")
        data = ref.data.copy()
        data[::10] += 1e-3
        tgt = WeightTensor(data, name="tgt")
        return ref, tgt

    def test_delta_round_trip(self, store):
        ref, tgt = self._delta_pair()
        enc = DeltaEncoder()
        delta = enc.encode(tgt, ref)
        rkey = store.store(ref)
        dkey = tgt.compute_hash()
        assert store.store_delta(delta, dkey) == dkey
        assert store.store_delta(delta, dkey) == dkey  # idempotent
        assert store.delta_exists(dkey) and store.list_deltas() == [dkey]
        # deltas are not weights
        assert not store.exists(dkey) and store.list_weights() == [rkey] and store.load(dkey) is None
        back = store.load_delta(dkey)
        assert back == delta
        rebuilt = enc.reconstruct(back, store.load(rkey))
        assert rebuilt.raw.tobytes() == tgt.raw.tobytes()
        meta = store.get_metadata(dkey)  # a delta's description, like a weight's
        assert meta is not None and meta.shape == tgt.shape and meta.dtype == "float32"
        info = store.get_storage_info()
        assert info["total_deltas"] == 1 and info["delta_bytes"] > 0 and info["total_weights"] == 1
        assert store.delete_delta(dkey) is True and store.delete_delta(dkey) is False
        assert not store.delta_exists(dkey) and store.load_delta(dkey) is None and store.list_deltas() == []
        assert store.exists(rkey)

    @pytest.mark.parametrize("as_bytes", [False, True], ids=["ndarray", "bytes"])
    def test_delta_data_keeps_its_type(self, store, as_bytes):
        """A hand-built FLOAT32_RAW delta: bytes come back as bytes; an ndarray comes back as an
        ndarray of its dtype and shape where ``delta_array_kept``, else as its bytes. Either way it
        rebuilds the same tensor."""
        ref = WeightTensor(np.arange(24, dtype=np.float32).reshape(4, 6), name="ref")
        diff = np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6)
        delta = Delta(
            DeltaType.FLOAT32_RAW,
            diff.tobytes() if as_bytes else diff,
            (4, 6),
            "float32",
            reference_hash=ref.compute_hash(),
            compression_ratio=1.0,
        )
        key = "1" * 32
        store.store_delta(delta, key)
        back = store.load_delta(key)
        assert (back.delta_type, back.original_shape, back.original_dtype, back.reference_hash) == (
            delta.delta_type,
            delta.original_shape,
            delta.original_dtype,
            delta.reference_hash,
        )
        if as_bytes or not self.delta_array_kept:
            assert isinstance(back.data, (bytes, bytearray)) and bytes(back.data) == diff.tobytes()
        else:
            assert back == delta
            assert isinstance(back.data, np.ndarray)
            assert back.data.dtype == diff.dtype and back.data.shape == diff.shape
            assert back.data.tobytes() == diff.tobytes()
        enc = DeltaEncoder()
        assert enc.reconstruct(back, ref).raw.tobytes() == enc.reconstruct(delta, ref).raw.tobytes()

    # ------------------------------------------------------------------------------ lifetime
    def test_context_manager_and_persistence(self, open_store):
        t = make_tensor("bfloat16", (17, 5), seed=16)
        with open_store() as s:
            assert isinstance(s, WeightStore)
            key = s.store(WeightTensor(t, name="kept"))
        # closed on exit: every call says so
        for call in (
            lambda: s.load(key),
            lambda: s.exists(key),
            lambda: s.list_weights(),
            lambda: s.store(WeightTensor(t, name="x")),
            lambda: s.get_storage_info(),
        ):
            with pytest.raises(StoreError, match="closed"):
                call()
        s.close()  # closing twice is harmless
        # a new store on the same location sees what the first one stored
        with open_store() as again:
            assert again.list_weights() == [key]
            assert_bit_exact(again.load(key), t, "reopened")
            assert again.get_metadata(key).name == "kept"

    def test_context_manager_closes_on_error(self, open_store):
        with pytest.raises(RuntimeError, match="boom"):
            with open_store() as s:
                s.store(WeightTensor(np.ones(4, np.float32), name="x"))
                raise RuntimeError("boom")
        with pytest.raises(StoreError, match="closed"):
            s.list_weights()


# ---------------------------------------------------------------------------------- backends
class TestHDF5Store(WeightStoreSuite):
    """HDF5Store on a file under tmp_path. Keys are HDF5 link names: one that is not a plain name
    finds nothing."""

    key_policy = "absent"
    delta_array_kept = True
    info_keys = frozenset({"filepath", "file_size", "compression", "compressions_found"})

    @pytest.fixture
    def open_store(self, tmp_path) -> Callable[[], WeightStore]:
        path = tmp_path / "weights.h5"
        return lambda: HDF5Store(path)

    def damage_payload(self, store: WeightStore, key: str) -> None:
        ds = store.file["weights"][key]
        raw = np.array(ds[()]).reshape(-1).view(np.uint8).copy()
        raw[len(raw) // 2] ^= 0x40
        ds[...] = raw.view(ds.dtype).reshape(ds.shape)
        store.file.flush()


def s3_config(endpoint: str, bucket: str, prefix: str, **kw: Any) -> S3Config:
    opts: dict[str, Any] = dict(
        bucket=bucket,
        prefix=prefix,
        region=REGION,
        endpoint_url=endpoint,
        access_key=TEST_KEY,
        secret_key=TEST_SECRET,
        addressing_style="path",
        progress=False,
        max_attempts=2,
        connect_timeout=2,
        read_timeout=20,
        max_concurrency=4,
        multipart_threshold=5 * MiB,
        multipart_chunksize=5 * MiB,
    )
    opts.update(kw)
    return S3Config(**opts)


class _S3Suite(WeightStoreSuite):
    """S3Store: object keys must stay inside the prefix, so a key that is not a plain name is
    refused (``StoreError``) on every call."""

    key_policy = "refused"
    delta_array_kept = False  # the delta object keeps no array layout: data comes back as bytes
    info_keys = frozenset(
        {"backend", "url", "bucket", "prefix", "endpoint_url", "metadata_bytes", "stored_bytes", "orphaned_payloads"}
    )
    prefix = "conformance/run1"

    def raw_client(self, store: S3Store):  # pragma: no cover - per server
        raise NotImplementedError

    def damage_payload(self, store: WeightStore, key: str) -> None:
        c = self.raw_client(store)
        obj = f"{store.config.prefix}weights/{key}"
        data = bytearray(c.get_object(Bucket=store.config.bucket, Key=obj)["Body"].read())
        data[len(data) // 2] ^= 0x40
        c.put_object(Bucket=store.config.bucket, Key=obj, Body=bytes(data))

    def test_storage_info_names_the_remote(self, store):
        info = store.get_storage_info()
        assert info["backend"] == "s3" and info["bucket"] == store.config.bucket
        assert info["prefix"] == self.prefix + "/" and info["orphaned_payloads"] == 0


class TestS3StoreMoto(_S3Suite):
    """S3Store on moto's ThreadedMotoServer (conftest ``server``, a fresh bucket per test)."""

    @pytest.fixture
    def open_store(self, server, bucket) -> Callable[[], WeightStore]:
        self._server = server
        return lambda: S3Store(s3_config(server.endpoint, bucket, self.prefix))

    def raw_client(self, store: S3Store):
        return self._server.client()


class TestS3StoreRclone(_S3Suite):
    """S3Store on ``rclone serve s3`` (conftest ``rclone_server``, a fresh bucket per test): an S3
    server sharing no code with moto or botocore. botocore's checksum settings stay at
    ``when_required`` (rclone sends the whole object's CRC32 with a ranged GET; coral-torch checks
    every byte itself)."""

    @pytest.fixture
    def open_store(self, rclone_server) -> Callable[[], WeightStore]:
        self._server = rclone_server
        bucket = rclone_server.create_bucket(f"coral-{uuid.uuid4().hex[:10]}")
        return lambda: S3Store(
            s3_config(
                rclone_server.endpoint,
                bucket,
                self.prefix,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
        )

    def raw_client(self, store: S3Store):
        return self._server.client()
