"""Compare-and-swap publishing (coral_torch.repository.remote.publish) against real S3 servers: moto's
ThreadedMotoServer, which enforces ``If-None-Match: *`` and ``If-Match`` on PUT, and ``rclone serve s3``,
which ignores both (there refs are moved by read, write, read back). No decorator mocks, no stubs.

Commit documents are real: a small repository is pushed once and its documents read back.
"""

from __future__ import annotations

import logging
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers

from s3_server import REGION, TEST_KEY, TEST_SECRET  # noqa: E402

from coral_torch import Repository  # noqa: E402
from coral_torch.errors import (  # noqa: E402
    ConcurrentChangeError,
    CoralError,
    CorruptObjectError,
    InvalidRefNameError,
    RefConflictError,
)
from coral_torch.repository.remote import (  # noqa: E402
    RemoteRef,
    conditional_writes,
    move_ref,
    publish_commit,
    read_ref,
)
from coral_torch.repository.remote.protocol import check_commit_doc  # noqa: E402
from coral_torch.storage.s3.client import S3Client  # noqa: E402
from coral_torch.storage.s3_store import S3Config  # noqa: E402

pytestmark = [pytest.mark.timeout(180), pytest.mark.filterwarnings("ignore::UserWarning")]
PREFIX = "team/exp"
REF = "runs/a/latest"
N_COMMITS = 10


def s3_config(endpoint: str, bucket: str, **kw: Any) -> S3Config:
    opts: dict[str, Any] = dict(
        bucket=bucket, prefix=PREFIX, region=REGION, endpoint_url=endpoint, access_key=TEST_KEY,
        secret_key=TEST_SECRET, addressing_style="path", progress=False, max_attempts=3, connect_timeout=2,
        read_timeout=20, max_concurrency=4,
    )
    opts.update(kw)
    return S3Config(**opts)


class Remote:
    """One fresh bucket on one server: coral-torch clients for it and a raw boto3 client."""

    def __init__(self, kind: str, srv: Any, bucket: str):
        self.kind, self.srv, self.bucket = kind, srv, bucket
        self.extra = {"request_checksum_calculation": "when_required"} if kind == "rclone" else {}
        self.raw = srv.client()
        self._clients: list[S3Client] = []

    def client(self) -> S3Client:
        self._clients.append(S3Client(s3_config(self.srv.endpoint, self.bucket, **self.extra)))
        return self._clients[-1]

    def keys(self, sub: str) -> list[str]:
        got = self.raw.list_objects_v2(Bucket=self.bucket, Prefix=f"{PREFIX}/{sub}")
        return [o["Key"] for o in got.get("Contents", [])]

    def put_raw(self, rel: str, body: bytes) -> None:
        self.raw.put_object(Bucket=self.bucket, Key=f"{PREFIX}/{rel}", Body=body)

    def close(self) -> None:
        for c in self._clients:
            c.close()


@pytest.fixture(params=["moto", "rclone"])
def remote(request) -> Any:
    if request.param == "moto":
        srv = request.getfixturevalue("server")
        bucket = f"coral-{uuid.uuid4().hex[:12]}"
        srv.client().create_bucket(Bucket=bucket)
    else:
        srv = request.getfixturevalue("rclone_server")
        bucket = srv.create_bucket(f"coral-{uuid.uuid4().hex[:10]}")
    r = Remote(request.param, srv, bucket)
    yield r
    r.close()


@pytest.fixture
def moto_remote(server) -> Any:
    bucket = f"coral-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=bucket)
    r = Remote("moto", server, bucket)
    yield r
    r.close()


@pytest.fixture(scope="module")
def commits(server, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """``{commit id: its commit document}`` of a small real repository, as its push wrote them."""
    repo = Repository(tmp_path_factory.mktemp("publish") / "repo", workers=1)
    g = torch.Generator().manual_seed(7)
    for i in range(N_COMMITS):
        repo.commit({"state_dict": {"w": torch.randn(16, generator=g)}, "step": i}, run="a", tags=[f"t{i}"])
    bucket = f"coral-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=bucket)
    cfg = s3_config(server.endpoint, bucket)
    assert repo.push(cfg)["commits_uploaded"] == N_COMMITS
    client = S3Client(cfg)
    try:
        ids = sorted(k[: -len(".json")] for k in client.list_entries("commits/"))
        docs = {cid: client.get_document(f"commits/{cid}.json") for cid in ids}
    finally:
        client.close()
    for cid, doc in docs.items():
        assert len(cid) == 32 and int(cid, 16) >= 0
        check_commit_doc(doc, cid, "test")
    return docs


# ---------------------------------------------------------------------------- the probe
def test_conditional_writes_probe(remote, caplog):
    """moto refuses both conditions; rclone accepts both writes (ignores the headers): one warning,
    once per URL, and the probe document is removed."""
    client = remote.client()
    with caplog.at_level(logging.WARNING, logger="coral_torch.repository.remote.publish"):
        got = conditional_writes(client)
        assert conditional_writes(client) is got  # cached
        assert conditional_writes(remote.client()) is got  # per URL, not per client
    assert got is (remote.kind == "moto")
    warnings = [r for r in caplog.records if r.name.endswith(".publish")]
    if remote.kind == "moto":
        assert warnings == []
    else:
        assert len(warnings) == 1
        msg = warnings[0].getMessage()
        assert "does not enforce conditional writes" in msg and client.url in msg and "last writer wins" in msg
        assert "If-None-Match" in msg  # says which condition it let through
    assert remote.keys(".coral-probe/") == []


# ---------------------------------------------------------------------------- commits
def test_publish_commit_is_idempotent(remote, commits):
    client = remote.client()
    cid, doc = next(iter(commits.items()))
    assert publish_commit(client, cid, doc) is True
    assert publish_commit(client, cid, doc) is False
    assert publish_commit(remote.client(), cid, doc) is False  # another writer, same commit
    got = client.get_document(f"commits/{cid}.json")
    check_commit_doc(got, cid, "test")
    assert remote.keys("commits/") == [f"{PREFIX}/commits/{cid}.json"]


@pytest.mark.parametrize("damage", ["bytes", "content"])
def test_publish_commit_replaces_a_damaged_document(remote, commits, damage):
    """A document whose bytes fail their checksum, or one that is sealed but not the document of that id
    (another commit's), is replaced; an intact one is then left alone."""
    client = remote.client()
    (cid, doc), (other, other_doc) = list(commits.items())[:2]
    if damage == "bytes":
        remote.put_raw(f"commits/{cid}.json", b'{"kind": "commit", "id": "' + cid.encode() + b'"}')
    else:
        client.put_document(f"commits/{cid}.json", other_doc)
    assert publish_commit(client, cid, doc) is True
    check_commit_doc(client.get_document(f"commits/{cid}.json"), cid, "test")
    assert publish_commit(client, cid, doc) is False


# ------------------------------------------------------------------------------- refs
def test_move_ref_create_advance_and_stale_expected(remote, commits):
    """Create (expected absent), advance with the right expected, then a writer holding the stale value
    is refused: on moto by If-Match, on rclone by the read before the write."""
    client = remote.client()
    c0, c1, c2, c3 = list(commits)[:4]
    absent = read_ref(client, REF)
    assert absent == RemoteRef(REF, None, None)
    r0 = move_ref(client, REF, c0, expected=absent, updated=1.0)
    assert r0.commit == c0 and r0.etag and read_ref(client, REF) == r0
    r1 = move_ref(client, REF, c1, expected=r0, updated=2.0)
    assert r1.commit == c1 and r1.etag != r0.etag and read_ref(client, REF) == r1

    with pytest.raises(RefConflictError) as info:
        move_ref(client, REF, c2, expected=r0, updated=3.0)
    err = info.value
    assert isinstance(err, ConcurrentChangeError)
    assert (err.ref, err.expected, err.current) == (REF, c0, c1)
    msg = str(err)
    assert "\n" not in msg and REF in msg and client.url in msg and c0 in msg and c1 in msg and "save again" in msg
    assert read_ref(client, REF) == r1  # not moved

    with pytest.raises(RefConflictError) as info:  # "create" when another writer created it meanwhile
        move_ref(remote.client(), REF, c3, expected=absent, updated=4.0)
    assert (info.value.expected, info.value.current) == (None, c1)
    assert read_ref(client, REF) == r1

    # moving to where the ref already is: done, nothing to refuse
    assert move_ref(client, REF, c1, expected=r0, updated=5.0).commit == c1


def test_move_ref_after_another_writer_deleted_the_ref(remote, commits):
    """If-Match on a deleted key is a 404 on moto, not a 412: still a conflict, ``current`` None."""
    client = remote.client()
    c0, c1 = list(commits)[:2]
    r0 = move_ref(client, REF, c0, expected=read_ref(client, REF), updated=1.0)
    remote.raw.delete_object(Bucket=remote.bucket, Key=f"{PREFIX}/refs/{REF}.json")
    with pytest.raises(RefConflictError) as info:
        move_ref(client, REF, c1, expected=r0, updated=2.0)
    assert (info.value.expected, info.value.current) == (c0, None)
    assert "deleted" in str(info.value) and "\n" not in str(info.value)
    assert read_ref(client, REF) == RemoteRef(REF, None, None)


def test_move_ref_refuses_a_ref_rewritten_to_the_same_commit(remote, commits):
    """Compare-and-swap is on the document, not only the commit: a rewrite (same commit, newer time) since
    ``expected`` was read is a conflict too, and the message says so."""
    client = remote.client()
    c0, c1 = list(commits)[:2]
    r0 = move_ref(client, REF, c0, expected=read_ref(client, REF), updated=1.0)
    r0b = move_ref(remote.client(), REF, c0, expected=RemoteRef(REF, None, None), updated=2.0)
    assert r0b == r0  # already there: nothing written
    client.put_document(f"refs/{REF}.json", {"kind": "ref", "name": REF, "commit": c0, "updated": 2.0})
    with pytest.raises(RefConflictError) as info:
        move_ref(client, REF, c1, expected=r0, updated=3.0)
    assert (info.value.expected, info.value.current) == (c0, c0) and "(rewritten)" in str(info.value)


def test_rclone_read_back_catches_a_writer_inside_the_window(rclone_server, commits):
    """Without conditional writes a ref is read, written and read back: another writer whose write lands
    right after this one's (inside the window the read cannot see) is reported, not silently lost."""
    c0, c1, c2 = list(commits)[:3]
    bucket = rclone_server.create_bucket(f"coral-{uuid.uuid4().hex[:10]}")
    cfg = s3_config(rclone_server.endpoint, bucket, request_checksum_calculation="when_required")
    other = S3Client(cfg)

    class Interleaved(S3Client):
        """A real client after whose ref write another writer's lands (on the same server)."""

        def put_document(self, rel: str, doc: Any, *args: Any, **kw: Any) -> Any:
            put = super().put_document(rel, doc, *args, **kw)
            if rel.startswith("refs/") and doc["commit"] == c1:
                other.put_document(rel, {"kind": "ref", "name": REF, "commit": c2, "updated": 9.0})
            return put

    client = Interleaved(cfg)
    try:
        assert conditional_writes(client) is False
        r0 = move_ref(client, REF, c0, expected=read_ref(client, REF), updated=1.0)
        with pytest.raises(RefConflictError) as info:
            move_ref(client, REF, c1, expected=r0, updated=2.0)
        assert (info.value.expected, info.value.current) == (c0, c2)
        assert read_ref(client, REF).commit == c2
    finally:
        client.close()
        other.close()


def test_move_ref_replaces_a_damaged_ref(remote, commits):
    client = remote.client()
    c0, c1 = list(commits)[:2]
    remote.put_raw(f"refs/{REF}.json", b"not json")
    with pytest.raises(CorruptObjectError):
        read_ref(client, REF)
    damaged = read_ref(client, REF, damaged_ok=True)
    assert damaged.commit is None and damaged.etag
    assert move_ref(client, REF, c0, expected=damaged, updated=1.0).commit == c0
    assert read_ref(client, REF).commit == c0
    with pytest.raises(RefConflictError):
        move_ref(client, REF, c1, expected=damaged, updated=2.0)


@pytest.mark.parametrize("start", ["absent", "existing"])
def test_move_ref_race_has_one_winner(moto_remote, commits, start):
    """8 writers (each its own client) move the ref from the same expected value at once: exactly one
    succeeds, the others get RefConflictError naming the winner's commit, and the ref names it."""
    ids = list(commits)
    base = moto_remote.client()
    expected = read_ref(base, REF)
    if start == "existing":
        expected = move_ref(base, REF, ids[0], expected=expected, updated=0.0)
    assert conditional_writes(base)
    targets = ids[1:9]
    clients = [moto_remote.client() for _ in targets]
    barrier = threading.Barrier(len(targets))
    results: list[Any] = [None] * len(targets)

    def writer(i: int) -> None:
        barrier.wait()
        try:
            results[i] = move_ref(clients[i], REF, targets[i], expected=expected, updated=float(i + 1))
        except BaseException as exc:  # noqa: BLE001 - collected and checked below
            results[i] = exc

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    wins = [r for r in results if isinstance(r, RemoteRef)]
    conflicts = [r for r in results if isinstance(r, RefConflictError)]
    assert len(wins) == 1 and len(conflicts) == len(targets) - 1, results
    winner = wins[0].commit
    assert winner in targets
    assert all(c.current == winner and c.expected == expected.commit for c in conflicts)
    assert read_ref(base, REF) == wins[0]


def test_conflict_error_attributes_default():
    """RefConflictError is a ConcurrentChangeError and can be built from its message alone."""
    err = RefConflictError("x")
    assert isinstance(err, ConcurrentChangeError) and (err.ref, err.expected, err.current) == ("", None, None)


def test_move_ref_refuses_bad_arguments(moto_remote, commits):
    client, cid = moto_remote.client(), next(iter(commits))
    with pytest.raises(CoralError, match="not a commit id"):
        move_ref(client, REF, "abc", expected=RemoteRef(REF, None, None), updated=1.0)
    with pytest.raises(CoralError, match="expected is of ref"):
        move_ref(client, REF, cid, expected=RemoteRef("tags/x", None, None), updated=1.0)
    with pytest.raises(InvalidRefNameError):
        read_ref(client, "../escape")
