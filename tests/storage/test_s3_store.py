"""S3Store against a real S3 server: moto's ThreadedMotoServer on 127.0.0.1 (no decorator mocks, no botocore stubs).

Faults are real too: corrupted objects are written to the server with boto3, credentials are checked
by moto's IAM (switched on for the auth test), and dropped connections come from a TCP proxy that
cuts mid-stream (tests/s3_proxy.py, mode "tcp").
"""

from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pytest
import torch

from coral_torch.errors import (
    BucketNotFoundError,
    CorruptObjectError,
    HashMismatchError,
    IntegrityError,
    ReadOnlyStoreError,
    RemoteAuthError,
    RemoteConfigError,
    RemoteConnectionError,
    RemoteError,
    StoreError,
    SyncIncompleteError,
)
from coral_torch.format.delta import DeltaEncoder
from coral_torch.format.weight_tensor import WeightTensor
from coral_torch.storage.hdf5_store import HDF5Store
from coral_torch.storage.s3_store import S3Config, S3Store

try:
    from .s3_proxy import Fault, FaultProxy
    from .s3_server import REGION, TEST_KEY, TEST_SECRET, free_port
except ImportError:  # tests/ is not a package
    from s3_proxy import Fault, FaultProxy
    from s3_server import REGION, TEST_KEY, TEST_SECRET, free_port

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


def make_config(server, bucket, **kw) -> S3Config:
    opts = dict(
        bucket=bucket,
        region=REGION,
        endpoint_url=server.endpoint,
        access_key=TEST_KEY,
        secret_key=TEST_SECRET,
        addressing_style="path",
        progress=False,
        max_attempts=2,
        connect_timeout=2,
        read_timeout=15,
        max_concurrency=4,
    )
    opts.update(kw)
    return S3Config(**opts)


@pytest.fixture
def store(server, bucket):
    s = S3Store(make_config(server, bucket))
    yield s
    s.close()


def sample_weights() -> dict[str, WeightTensor]:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    out = {
        "f32": WeightTensor(torch.randn(64, 33), name="enc.f32"),
        "bf16": WeightTensor(torch.randn(128, 16).to(torch.bfloat16), name="enc.bf16"),
        "f16": WeightTensor(rng.standard_normal(301).astype(np.float16), name="f16"),
        "f64": WeightTensor(rng.standard_normal((7, 9)), name="f64"),
        "i64": WeightTensor(np.arange(-500, 500, dtype=np.int64), name="steps"),
        "bool": WeightTensor(rng.random(77) > 0.5, name="mask"),
        "u8": WeightTensor(rng.integers(0, 256, 999, dtype=np.uint8), name="bytes"),
        "c64": WeightTensor((rng.standard_normal(50) + 1j * rng.standard_normal(50)).astype(np.complex64), name="c"),
        "scalar": WeightTensor(np.array(3.25, dtype=np.float32), name="scalar"),
        "empty": WeightTensor(np.zeros((0, 4), dtype=np.float32), name="empty"),
        "big": WeightTensor(rng.standard_normal((256, 256)).astype(np.float32), name="big"),
    }
    if hasattr(torch, "float8_e4m3fn"):
        out["f8"] = WeightTensor(torch.randn(40).to(torch.float8_e4m3fn), name="f8")
    return out


def random_weights(n: int, nbytes: int, seed: int = 1) -> dict[str, WeightTensor]:
    """Incompressible tensors: the payload is about ``nbytes`` each."""
    rng = np.random.default_rng(seed)
    return {f"w{i}": WeightTensor(rng.integers(0, 256, nbytes, dtype=np.uint8), name=f"w{i}") for i in range(n)}


def same(a: WeightTensor, b: WeightTensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.raw.tobytes() == b.raw.tobytes()


def add_deltas(local: HDF5Store, n: int = 2) -> dict[str, WeightTensor]:
    """Store ``n`` reference tensors and XOR deltas of their successors in ``local``; returns the
    successors by their hash (the delta keys)."""
    enc = DeltaEncoder()
    rng = np.random.default_rng(7)
    targets = {}
    for i in range(n):
        ref = WeightTensor(rng.standard_normal(2000).astype(np.float32), name=f"ref{i}")
        tgt_data = ref.data.copy()
        tgt_data[::10] += 1e-3
        tgt = WeightTensor(tgt_data, name=f"tgt{i}")
        local.store(ref)
        local.store_delta(enc.encode(tgt, ref), tgt.compute_hash())
        targets[tgt.compute_hash()] = tgt
    local.flush()
    return targets


# ---------------------------------------------------------------------------------- config
def test_config_validation_and_normalisation():
    assert S3Config(bucket="abc", prefix="coral/experiments").prefix == "coral/experiments/"
    assert S3Config(bucket="abc", prefix="/x/").prefix == "x/"
    assert S3Config(bucket="abc").prefix == ""
    assert S3Config(bucket="abc", prefix="p").url == "s3://abc/p/"
    for bad in ("ab", "", "s3://bucket", "bucket/path", "-abc", "a" * 300, "ab..cd"):
        with pytest.raises(RemoteConfigError, match="bucket name"):
            S3Config(bucket=bad)
    with pytest.raises(RemoteConfigError, match="both access_key and secret_key"):
        S3Config(bucket="abc", access_key="AKIA")
    with pytest.raises(RemoteConfigError, match="multipart_chunksize"):
        S3Config(bucket="abc", multipart_chunksize=1024)
    with pytest.raises(RemoteConfigError, match="max_concurrency"):
        S3Config(bucket="abc", max_concurrency=0)
    with pytest.raises(RemoteConfigError, match="max_attempts"):
        S3Config(bucket="abc", max_attempts=0)
    with pytest.raises(RemoteConfigError, match="addressing_style"):
        S3Config(bucket="abc", addressing_style="dns")
    with pytest.raises(RemoteConfigError, match="endpoint_url"):
        S3Config(bucket="abc", endpoint_url="localhost:9000")
    for bad in ("a/../b", "..", "x/./y", "a\\b", "a\x7fb"):
        with pytest.raises(RemoteConfigError, match="invalid prefix"):
            S3Config(bucket="abc", prefix=bad)
    for knob in ("request_checksum_calculation", "response_checksum_validation", "upload_verification"):
        with pytest.raises(RemoteConfigError, match=knob):
            S3Config(bucket="abc", **{knob: "always"})
    cfg = S3Config(bucket="abc")
    assert (cfg.request_checksum_calculation, cfg.response_checksum_validation, cfg.upload_verification) == \
        ("when_supported", "when_required", "auto")
    cfg = S3Config(bucket="abc", access_key="AKIAEXAMPLE", secret_key="very-secret", session_token="tok")
    assert "very-secret" not in repr(cfg) and "tok" not in repr(cfg)
    assert isinstance(RemoteConfigError("x"), ValueError)


# -------------------------------------------------------------------------------- contract
def test_contract_round_trip_bit_exact(store):
    weights = sample_weights()
    keys = {}
    for name, w in weights.items():
        keys[name] = store.store(w)
        assert keys[name] == w.compute_hash()
    assert sorted(store.list_weights()) == sorted(set(keys.values()))
    for name, w in weights.items():
        h = keys[name]
        assert store.exists(h)
        meta = store.get_metadata(h)
        assert meta.name == w.metadata.name and meta.shape == w.shape and meta.dtype == w.dtype and meta.hash == h
        got = store.load(h)
        assert same(got, w), name
        assert got.metadata.name == w.metadata.name
        assert got.compute_hash() == h
    assert store.load(keys["bf16"]).to_torch().dtype == torch.bfloat16
    assert torch.equal(store.load(keys["bf16"]).to_torch(), weights["bf16"].to_torch())
    assert store.load(keys["scalar"]).shape == ()
    assert store.load(keys["empty"]).shape == (0, 4)

    info = store.get_storage_info()
    assert info["backend"] == "s3" and info["total_weights"] == len(set(keys.values()))
    assert info["total_bytes"] == sum(w.nbytes for w in weights.values())
    assert info["compressed_bytes"] > 0 and info["orphaned_payloads"] == 0

    h = keys["f32"]
    assert store.delete(h) is True
    assert not store.exists(h) and store.load(h) is None and store.get_metadata(h) is None
    assert store.delete(h) is False
    assert h not in store.list_weights()


def test_store_is_idempotent_and_custom_keys(server, bucket, store):
    w = sample_weights()["big"]
    h = store.store(w)
    c = server.client()
    before = c.head_object(Bucket=bucket, Key=f"weights/{h}")
    time.sleep(1.1)  # LastModified has one-second resolution
    assert store.store(w) == h
    after = c.head_object(Bucket=bucket, Key=f"weights/{h}")
    assert after["LastModified"] == before["LastModified"]  # nothing re-sent
    assert store.list_weights() == [h]
    assert store.store(w, hash_key="my_custom_key") == "my_custom_key"
    assert same(store.load("my_custom_key"), w)
    with pytest.raises(StoreError, match="invalid object key"):
        store.store(w, hash_key="../escape")


def test_unknown_keys(store):
    unknown = "0" * 32
    assert store.load(unknown) is None
    assert store.exists(unknown) is False
    assert store.get_metadata(unknown) is None
    assert store.delete(unknown) is False
    assert store.load_delta(unknown) is None
    assert store.delta_exists(unknown) is False
    assert store.delete_delta(unknown) is False
    assert store.load_batch([unknown]) == {}
    assert store.list_weights() == [] and store.list_deltas() == []


def test_batch_operations(store):
    weights = sample_weights()
    weights["dup"] = weights["f32"]
    mapping = store.store_batch(weights)
    assert mapping["dup"] == mapping["f32"]
    assert set(mapping) == set(weights)
    assert sorted(store.list_weights()) == sorted(set(mapping.values()))
    loaded = store.load_batch(list(mapping.values()) + ["f" * 32])
    assert set(loaded) == set(mapping.values())
    for name, h in mapping.items():
        assert same(loaded[h], weights[name])
    assert store.store_batch(weights) == mapping  # idempotent


def test_deltas_round_trip(store):
    enc = DeltaEncoder()
    ref = WeightTensor(torch.randn(1000), name="ref")
    tgt_t = ref.to_torch().clone()
    tgt_t[::7] += 0.01
    tgt = WeightTensor(tgt_t, name="tgt")
    delta = enc.encode(tgt, ref)
    dh = tgt.compute_hash()
    rh = store.store(ref)
    assert store.store_delta(delta, dh) == dh
    assert store.store_delta(delta, dh) == dh
    assert store.delta_exists(dh) and not store.exists(dh)
    assert store.list_deltas() == [dh] and store.list_weights() == [rh]
    got = store.load_delta(dh)
    assert got.data == delta.data and got.reference_hash == rh
    assert got.original_shape == delta.original_shape and got.original_dtype == delta.original_dtype
    assert got.delta_type == delta.delta_type
    rebuilt = enc.reconstruct(got, store.load(got.reference_hash))
    assert rebuilt.compute_hash() == dh
    meta = store.get_metadata(dh)
    assert meta.shape == (1000,) and meta.compression_info["delta_type"] == "xor"
    info = store.get_storage_info()
    assert info["total_deltas"] == 1 and info["delta_bytes"] == len(delta.data)
    assert store.delete_delta(dh) is True and store.delete_delta(dh) is False
    assert not store.delta_exists(dh)


def test_object_layout_and_prefix_isolation(server, bucket):
    a = S3Store(make_config(server, bucket, prefix="team/run1"))
    b = S3Store(make_config(server, bucket, prefix="team/run2/"))
    w = sample_weights()["f32"]
    h = a.store(w)
    enc = DeltaEncoder()
    tgt = WeightTensor(w.data + 1, name="t")
    dh = tgt.compute_hash()
    a.store_delta(enc.encode(tgt, w), dh)
    c = server.client()
    keys = {o["Key"] for o in c.list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {
        f"team/run1/weights/{h}",
        f"team/run1/metadata/{h}.json",
        f"team/run1/deltas/{dh}",
        f"team/run1/metadata/{dh}.delta.json",
    }
    doc = json.loads(c.get_object(Bucket=bucket, Key=f"team/run1/metadata/{h}.json")["Body"].read())
    assert doc["format"] == "coral-torch-s3" and doc["kind"] == "weight" and doc["hash"] == h
    assert doc["shape"] == [64, 33] and doc["dtype"] == "float32" and doc["encoding"] == "czp1"
    assert doc["nbytes"] == w.nbytes and doc["payload_bytes"] > 0 and len(doc["payload_xxh3"]) == 16
    blob = c.get_object(Bucket=bucket, Key=f"team/run1/weights/{h}")["Body"].read()
    assert blob[:4] == b"CZP1"
    assert b.list_weights() == [] and b.load(h) is None and not b.exists(h)
    a.close()
    b.close()


def test_interrupted_upload_is_invisible(server, bucket, store):
    """A payload without its metadata (what an upload cut between the two leaves) is not present."""
    w = sample_weights()["big"]
    h = w.compute_hash()
    payload, _ = store.objects.encode_weight(w)
    server.client().put_object(Bucket=bucket, Key=f"weights/{h}", Body=payload.tobytes())
    assert not store.exists(h) and store.load(h) is None and store.list_weights() == []
    assert store.get_storage_info()["orphaned_payloads"] == 1
    assert store.store(w) == h  # the next upload completes it
    assert same(store.load(h), w)
    assert store.get_storage_info()["orphaned_payloads"] == 0


def test_context_manager_closes(server, bucket):
    with S3Store(make_config(server, bucket)) as s:
        s.store(sample_weights()["u8"])
    with pytest.raises(StoreError, match="closed"):
        s.list_weights()


# ------------------------------------------------------------------------------------ sync
def test_sync_from_local_is_incremental(server, bucket, store, tmp_path):
    local = HDF5Store(tmp_path / "local.h5")
    weights = sample_weights()
    mapping = local.store_batch(weights)
    targets = add_deltas(local, 2)
    n_weights = len(local.list_weights())

    first = store.sync_from_local(local)
    assert first["uploaded"] == n_weights and first["deltas_uploaded"] == 2
    assert first["skipped"] == 0 and first["failed"] == 0 and first["bytes_transferred"] > 0
    assert sorted(store.list_weights()) == sorted(local.list_weights())
    assert sorted(store.list_deltas()) == sorted(targets)

    # codec objects are uploaded as stored, byte for byte (no re-encode)
    c = server.client()
    for h in mapping.values():
        remote_blob = c.get_object(Bucket=bucket, Key=f"weights/{h}")["Body"].read()
        assert remote_blob == local.read_prepared(h).payload.tobytes()
    for name, h in mapping.items():
        assert same(store.load(h), weights[name])
    for dh in targets:
        assert store.load_delta(dh).data == local.load_delta(dh).data

    second = store.sync_from_local(local)
    assert second["uploaded"] == 0 and second["deltas_uploaded"] == 0
    assert second["bytes_transferred"] == 0 and second["skipped"] == n_weights + 2

    extra = WeightTensor(np.linspace(0, 1, 100, dtype=np.float32), name="new")
    local.store(extra)
    third = store.sync_from_local(local, progress=True)  # with a progress bar (on stderr)
    assert third["uploaded"] == 1 and third["skipped"] == n_weights + 2
    assert same(store.load(extra.compute_hash()), extra)
    local.close()


def test_sync_from_values_encoded_local(store, tmp_path):
    """gzip (HDF5 filter) objects are loaded, verified and encoded with the codec for upload."""
    local = HDF5Store(tmp_path / "gzip.h5", compression="gzip")
    weights = sample_weights()
    mapping = local.store_batch(weights)
    stats = store.sync_from_local(local)
    assert stats["uploaded"] == len(set(mapping.values()))
    for name, h in mapping.items():
        assert same(store.load(h), weights[name])
        assert store.get_metadata(h).compression_info["encoding"] == "czp1"
    local.close()


def test_sync_to_local_into_empty_store(store, tmp_path):
    src = HDF5Store(tmp_path / "src.h5")
    weights = sample_weights()
    mapping = src.store_batch(weights)
    targets = add_deltas(src, 2)
    store.sync_from_local(src)

    dst = HDF5Store(tmp_path / "dst.h5")
    stats = store.sync_to_local(dst)
    n = len(src.list_weights())
    assert stats["downloaded"] == n and stats["deltas_downloaded"] == 2
    assert stats["skipped"] == 0 and stats["failed"] == 0 and stats["bytes_transferred"] > 0
    for name, h in mapping.items():
        assert same(dst.load(h), weights[name]), name
        assert dst.load(h).metadata.name == weights[name].metadata.name
    enc = DeltaEncoder()
    for dh, tgt in targets.items():
        d = dst.load_delta(dh)
        assert d.data == src.load_delta(dh).data
        assert same(enc.reconstruct(d, dst.load(d.reference_hash)), tgt)
    dst.close()

    # the file is complete on disk (flushed), and a second sync fetches nothing
    dst = HDF5Store(tmp_path / "dst.h5", mode="a")
    assert sorted(dst.list_weights()) == sorted(src.list_weights())
    again = store.sync_to_local(dst)
    assert again["downloaded"] == 0 and again["bytes_transferred"] == 0 and again["skipped"] == n + 2
    dst.close()
    with pytest.raises(ReadOnlyStoreError):
        store.sync_to_local(HDF5Store(tmp_path / "dst.h5", mode="r"))
    src.close()


# ------------------------------------------------------------------------------- integrity
def _flip(server, bucket, key: str, at: int | None = None) -> bytes:
    c = server.client()
    data = bytearray(c.get_object(Bucket=bucket, Key=key)["Body"].read())
    i = len(data) // 2 if at is None else at
    for j in range(i, min(i + 8, len(data))):
        data[j] ^= 0xFF
    c.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    return bytes(data)


def test_corrupted_object_detected_on_load_and_sync(server, bucket, store, tmp_path):
    weights = sample_weights()
    mapping = store.store_batch(weights)
    h = mapping["big"]
    _flip(server, bucket, f"weights/{h}")

    with pytest.raises(CorruptObjectError) as ei:
        store.load(h)
    assert ei.value.hash_key == h and h in str(ei.value) and "not returned" in str(ei.value)
    with pytest.raises(IntegrityError):
        store.load_batch([h])
    assert same(store.load(mapping["f32"]), weights["f32"])  # the others are fine

    local = HDF5Store(tmp_path / "pulled.h5")
    with pytest.raises(SyncIncompleteError) as si:
        store.sync_to_local(local)
    err = si.value
    assert set(err.failures) == {h} and isinstance(err.failures[h], CorruptObjectError)
    assert h in str(err) and err.stats["failed"] == 1
    assert err.stats["downloaded"] == len(set(mapping.values())) - 1
    assert h not in local.list_weights()  # bad bytes never land locally
    for name, k in mapping.items():
        if k != h:
            assert same(local.load(k), weights[name])
    local.close()


def test_tampered_payload_with_matching_checksum_fails_content_hash(server, bucket, store):
    """Bytes changed and the recorded checksums updated to match (the document re-sealed): the content
    hash still catches it."""
    from coral_torch.storage.s3_store import _payload_hash, encode_document

    w = WeightTensor(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8), name="raw")
    h = store.store(w)
    data = _flip(server, bucket, f"weights/{h}", at=100)  # inside the raw plane: still decodes
    c = server.client()
    doc = json.loads(c.get_object(Bucket=bucket, Key=f"metadata/{h}.json")["Body"].read())
    doc["payload_xxh3"] = _payload_hash(data)
    c.put_object(Bucket=bucket, Key=f"metadata/{h}.json", Body=encode_document(doc))
    with pytest.raises(HashMismatchError) as ei:
        store.load(h)
    assert ei.value.hash_key == h and h in str(ei.value)


def test_damaged_metadata_and_missing_payload(server, bucket, store):
    weights = sample_weights()
    h1 = store.store(weights["f32"])
    h2 = store.store(weights["i64"])
    c = server.client()
    c.put_object(Bucket=bucket, Key=f"metadata/{h1}.json", Body=b"{not json")
    with pytest.raises(CorruptObjectError, match=h1):
        store.load(h1)
    c.delete_object(Bucket=bucket, Key=f"weights/{h2}")
    with pytest.raises(CorruptObjectError, match="payload .* is missing"):
        store.load(h2)


# ---------------------------------------------------------------------------------- errors
def test_wrong_credentials_rejected_clearly(server, bucket, monkeypatch):
    """moto checks signatures and IAM policies once auth is switched on (/moto-api/reset-auth)."""
    allow_all = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    other = f"coral-other-{uuid.uuid4().hex[:8]}"
    server.client().create_bucket(Bucket=other)
    only_other = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*",
                       "Resource": [f"arn:aws:s3:::{other}", f"arn:aws:s3:::{other}/*"]}],
    }
    key, secret = server.create_user(f"u{uuid.uuid4().hex[:8]}", allow_all)
    lkey, lsecret = server.create_user(f"l{uuid.uuid4().hex[:8]}", only_other)
    server.enforce_auth(True)
    try:
        with S3Store(make_config(server, bucket, access_key=key, secret_key=secret)) as good:
            w = sample_weights()["f32"]
            assert same(good.load(good.store(w)), w)

        with pytest.raises(RemoteAuthError) as ei:
            S3Store(make_config(server, bucket, access_key=key, secret_key="wrong-secret"))
        msg = str(ei.value)
        assert "rejected the credentials" in msg and "SignatureDoesNotMatch" in msg and "secret_key" in msg
        assert ei.value.__cause__ is None  # no botocore traceback chained on
        assert isinstance(ei.value, PermissionError) and isinstance(ei.value, RemoteError)

        with pytest.raises(RemoteAuthError, match="InvalidAccessKeyId"):
            S3Store(make_config(server, bucket, access_key="AKIANOSUCHKEY0000000", secret_key="x"))

        # default credential chain (environment) with bad keys
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENVWRONG00000000")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nope")
        with pytest.raises(RemoteAuthError, match="InvalidAccessKeyId"):
            S3Store(make_config(server, bucket, access_key=None, secret_key=None))

        # valid credentials, bucket not allowed by policy
        with pytest.raises(RemoteAuthError, match="denied access"):
            S3Store(make_config(server, bucket, access_key=lkey, secret_key=lsecret))
        with S3Store(make_config(server, other, access_key=lkey, secret_key=lsecret)) as allowed:
            assert allowed.list_weights() == []

        # a store opened without the bucket check fails clearly on first use
        lazy = S3Store(make_config(server, bucket, access_key=key, secret_key="wrong", check_bucket=False))
        with pytest.raises(RemoteAuthError):
            lazy.list_weights()
        with pytest.raises(RemoteAuthError):
            lazy.load("0" * 32)
        lazy.close()
    finally:
        server.enforce_auth(False)


def test_missing_bucket(server):
    name = f"coral-missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(BucketNotFoundError) as ei:
        S3Store(make_config(server, name))
    err = ei.value
    assert name in str(err) and server.endpoint in str(err)
    assert err.bucket == name and err.endpoint == server.endpoint
    assert isinstance(err, FileNotFoundError) and err.__cause__ is None
    lazy = S3Store(make_config(server, name, check_bucket=False))
    with pytest.raises(BucketNotFoundError, match=name):
        lazy.list_weights()
    with pytest.raises(BucketNotFoundError):
        lazy.load("0" * 32)
    with pytest.raises(BucketNotFoundError):
        lazy.store(sample_weights()["u8"])
    lazy.close()


def test_no_credentials_at_all(server, bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(RemoteAuthError, match="no usable AWS credentials"):
        S3Store(make_config(server, bucket, access_key=None, secret_key=None))


def test_connection_refused(bucket):
    port = free_port()  # nothing listens here
    t0 = time.monotonic()
    with pytest.raises(RemoteConnectionError) as ei:
        S3Store(S3Config(
            bucket=bucket, region=REGION, endpoint_url=f"http://127.0.0.1:{port}", access_key=TEST_KEY,
            secret_key=TEST_SECRET, addressing_style="path", max_attempts=2, connect_timeout=1, progress=False,
        ))
    msg = str(ei.value)
    assert f"127.0.0.1:{port}" in msg and "after 2 attempts" in msg
    assert isinstance(ei.value, ConnectionError) and ei.value.__cause__ is None
    assert time.monotonic() - t0 < 15


# ------------------------------------------------------------------------------- multipart
def test_multipart_upload_small_threshold(server, bucket):
    cfg = make_config(server, bucket, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    with S3Store(cfg) as s:
        w = random_weights(1, 12 * MiB, seed=5)["w0"]
        h = s.store(w)
        head = server.client().head_object(Bucket=bucket, Key=f"weights/{h}")
        assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # 12 MiB + header in 5 MiB parts
        assert same(s.load(h), w)  # and back down in ranged parts


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_multipart_upload_64mb_default_config(server, bucket, tmp_path):
    with S3Store(make_config(server, bucket, multipart_threshold=64 * MiB, multipart_chunksize=16 * MiB)) as s:
        w = random_weights(1, 68 * MiB, seed=6)["w0"]
        h = s.store(w)
        head = server.client().head_object(Bucket=bucket, Key=f"weights/{h}")
        assert head["ContentLength"] >= 64 * MiB
        etag = head["ETag"].strip('"')
        assert "-" in etag and int(etag.rsplit("-", 1)[1]) == 5, etag  # ceil(68 MiB / 16 MiB)
        assert same(s.load(h), w)
        local = HDF5Store(tmp_path / "big.h5")
        assert s.sync_to_local(local)["downloaded"] == 1
        assert same(local.load(h), w)
        local.close()


# -------------------------------------------------------------------------- dropped connections
def test_connection_cut_once_is_retried(server, bucket, tmp_path):
    local = HDF5Store(tmp_path / "l.h5")
    weights = random_weights(6, 200_000, seed=11)
    mapping = local.store_batch(weights)
    with FaultProxy(server.port, mode="tcp") as proxy:
        remote = S3Store(make_config(server, bucket, endpoint_url=proxy.endpoint, max_attempts=3))
        proxy.cut_after(300_000, stay_down=False)  # one drop in the middle of an upload
        stats = remote.sync_from_local(local)
        assert proxy.cuts == 1
        assert stats["uploaded"] == 6 and stats["failed"] == 0
        for name, h in mapping.items():
            assert same(remote.load(h), weights[name])
        remote.close()
    local.close()


def test_sync_interrupted_then_resumed_sends_only_missing(server, bucket, tmp_path):
    local = HDF5Store(tmp_path / "l.h5")
    weights = random_weights(12, 256 * 1024, seed=12)
    mapping = local.store_batch(weights)
    deltas = add_deltas(local, 2)
    all_keys = set(local.list_weights())
    direct = S3Store(make_config(server, bucket))
    with FaultProxy(server.port, mode="tcp") as proxy:
        remote = S3Store(make_config(server, bucket, endpoint_url=proxy.endpoint, max_concurrency=2))
        proxy.cut_after(1_400_000, stay_down=True)  # the connection drops mid-upload and stays down
        with pytest.raises(SyncIncompleteError) as ei:
            remote.sync_from_local(local)
        err = ei.value
        assert proxy.cuts == 1
        assert err.failures and all(isinstance(e, RemoteConnectionError) for e in err.failures.values())
        assert "Run the sync again to resume" in str(err)
        first = err.stats
        assert 0 < first["uploaded"] < len(all_keys)

        # what is visible is complete and verified; what is not finished is not visible
        present = set(direct.list_weights())
        assert first["uploaded"] <= len(present) < len(all_keys)
        for h in present:
            assert same(direct.load(h), local.load(h))
        for h in all_keys - present:
            assert not direct.exists(h) and direct.load(h) is None
        present_deltas = set(direct.list_deltas())

        proxy.set_down(False)
        up_before = proxy.bytes_up
        second = remote.sync_from_local(local)
        assert second["failed"] == 0
        assert second["uploaded"] == len(all_keys - present)  # finished objects are not re-sent
        assert second["deltas_uploaded"] == len(set(deltas) - present_deltas)
        assert second["skipped"] == len(present) + len(present_deltas)
        # bytes through the wire: only the missing objects (plus request overhead)
        missing_payload = sum(local.read_prepared(h).stored_bytes for h in all_keys - present)
        assert proxy.bytes_up - up_before < missing_payload + 300_000
        third = remote.sync_from_local(local)
        assert third["uploaded"] == 0 and third["bytes_transferred"] == 0
        remote.close()
    assert set(direct.list_weights()) == all_keys
    for name, h in mapping.items():
        assert same(direct.load(h), weights[name])
    direct.close()
    local.close()


def test_sync_to_local_interrupted_then_resumed(server, bucket, tmp_path):
    direct = S3Store(make_config(server, bucket))
    weights = random_weights(10, 256 * 1024, seed=13)
    mapping = direct.store_batch(weights)
    local = HDF5Store(tmp_path / "pull.h5")
    with FaultProxy(server.port, mode="tcp") as proxy:
        remote = S3Store(make_config(server, bucket, endpoint_url=proxy.endpoint, max_concurrency=2))
        proxy.cut_after(1_000_000, stay_down=True, direction="down")  # dies mid-download
        with pytest.raises(SyncIncompleteError) as ei:
            remote.sync_to_local(local)
        first = ei.value.stats
        assert proxy.cuts == 1 and 0 < first["downloaded"] < 10
        got = set(local.list_weights())
        assert len(got) == first["downloaded"]
        for name, h in mapping.items():
            if h in got:
                assert same(local.load(h), weights[name])
        proxy.set_down(False)
        second = remote.sync_to_local(local)
        assert second["downloaded"] == 10 - len(got) and second["skipped"] == len(got)
        remote.close()
    for name, h in mapping.items():
        assert same(local.load(h), weights[name])
    local.close()
    direct.close()


# ------------------------------------------------------------------------- verified transfers
def test_document_checksum_round_trip_and_damage(store):
    """put_document/get_document: canonical bytes, checksum verified; a key that could leave the
    prefix is refused before any request."""
    from coral_torch.storage.s3_store import decode_document, document_md5, encode_document

    doc = {"kind": "ref", "name": "tags/x", "commit": "0" * 32, "updated": 1.5, "nested": {"b": [1, 2.0]}}
    assert encode_document(doc) == encode_document(dict(reversed(list(doc.items()))))  # key order free
    sent = store.put_document("refs/tags/x.json", doc)
    assert sent == len(encode_document(doc))
    assert store.list_entries("refs/")["tags/x.json"].etag == document_md5(doc)
    assert {k: v for k, v in store.get_document("refs/tags/x.json").items() if k in doc} == doc
    assert store.get_document("refs/none.json") is None
    body = bytearray(encode_document(doc))
    body[body.index(b"1.5")] = ord("2")  # one character: valid JSON, wrong checksum
    with pytest.raises(CorruptObjectError, match="checksum mismatch"):
        decode_document(bytes(body), "ref document tags/x", "here")
    with pytest.raises(CorruptObjectError, match="no checksum"):
        decode_document(json.dumps(doc).encode(), "ref document tags/x", "here")
    for bad in ("refs/../x.json", "refs/a\nb.json", "/refs/x.json"):
        with pytest.raises(StoreError, match="invalid document key"):
            store.put_document(bad, doc)


def test_upload_damaged_on_the_way_is_sent_again(server, bucket, tmp_path, caplog):
    """moto checks neither Content-MD5 nor CRC32: a bit flipped in an upload is stored. The ETag
    gives it away; the object is read back and sent again, and only then is its metadata written."""
    w = random_weights(1, 50_000, seed=21)["w0"]
    with FaultProxy(server.port) as proxy:
        s = S3Store(make_config(server, bucket, endpoint_url=proxy.endpoint))
        for what in (r"/weights/", r"/metadata/"):
            proxy.arm(Fault("corrupt_request", rf"^PUT [^?]*{what}"))
            with caplog.at_level("WARNING", logger="coral_torch"):
                h = s.store(w)
            assert proxy.fired and any("arrived damaged" in r.getMessage() for r in caplog.records)
            caplog.clear()
            assert same(s.load(h), w)
            assert s.check_remote_object("weights", h) is None
            s.delete(h)
        # every attempt damaged: refused, and the object stays invisible (no metadata)
        proxy.arm(Fault("corrupt_request", r"^PUT [^?]*/weights/", times=10))
        with pytest.raises(RemoteError, match="intact after 2 attempts") as ei:
            s.store(w)
        assert "\n" not in str(ei.value)
        assert not s.exists(w.compute_hash())
        s.close()


@pytest.mark.parametrize("mode", ["auto", "read-back"])
def test_server_whose_etags_are_not_md5s(server, bucket, tmp_path, caplog, mode):
    """A server that answers opaque ETags (like SSE-KMS) is recognised by one read-back; documents
    are then read back after each upload, payloads up to 1 MiB too. upload_verification="read-back"
    reads back everything: a payload damaged on the way is caught there as well."""
    small = random_weights(1, 20_000, seed=22)["w0"]
    big = random_weights(1, 1_500_000, seed=23)["w0"]  # over the read-back limit of "auto"
    with FaultProxy(server.port, opaque_etags=True) as proxy:
        s = S3Store(make_config(server, bucket, prefix=f"opaque-{mode}", endpoint_url=proxy.endpoint,
                                upload_verification=mode))
        with caplog.at_level("INFO", logger="coral_torch"):
            h = s.store(small)
        assert s.client.etags_are_md5 is False and any("not the MD5" in r.getMessage() for r in caplog.records)
        assert same(s.load(h), small) and s.check_remote_object("weights", h) is None
        proxy.arm(Fault("corrupt_request", r"^PUT [^?]*/metadata/"))
        hd = s.store_delta(DeltaEncoder().encode(WeightTensor(small.data ^ 1, name="t"), small), "d" * 32)
        assert proxy.fired and s.load_delta(hd) is not None  # the damaged document was read back, sent again
        proxy.arm(Fault("corrupt_request", r"^PUT [^?]*/weights/"))
        hb = s.store(big)
        assert proxy.fired
        if mode == "read-back":
            assert same(s.load(hb), big)
        else:  # trusted to the server's own Content-MD5 check, which moto does not make: found on load
            with pytest.raises(IntegrityError):
                s.load(hb)
        s.close()


def test_client_conditional_writes_and_ranges(server, bucket):
    """The transport's conditional writes: If-None-Match: * creates only, If-Match: <etag> swaps
    only while the ETag is unchanged; a refused one is PreconditionFailedError and writes nothing."""
    from coral_torch.format.documents import encode_document
    from coral_torch.storage.s3.client import PreconditionFailedError, S3Client

    c = S3Client(make_config(server, bucket, prefix="cond"))
    try:
        first = c.put_document("refs/main.json", {"kind": "ref", "v": 1}, if_none_match=True)
        with pytest.raises(PreconditionFailedError) as ei:
            c.put_document("refs/main.json", {"kind": "ref", "v": 2}, if_none_match=True)
        assert isinstance(ei.value, RemoteError) and ei.value.__cause__ is None
        doc, etag = c.get_document("refs/main.json", with_etag=True)
        assert doc["v"] == 1 and etag == first.etag
        c.put_document("refs/main.json", {"kind": "ref", "v": 3}, if_match=etag)
        with pytest.raises(PreconditionFailedError):
            c.put_document("refs/main.json", {"kind": "ref", "v": 4}, if_match=etag)  # stale ETag
        assert c.get_document("refs/main.json")["v"] == 3
        body = encode_document({"kind": "ref", "v": 3})
        assert c.get_range("refs/main.json", 2, 10) == body[2:12]
        assert c.get_document("refs/none.json", with_etag=True) == (None, None)
    finally:
        c.close()
