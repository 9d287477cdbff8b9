"""Faults of sharded (FSDP2 / DCP) saves straight to an S3 repository: 2 gloo ranks as simulated
nodes (private working directory, HOME and cache each), sharing nothing but the S3 server.

- a rank SIGKILLed part-way through its upload (moto, and rclone serve s3): the survivor fails, the
  bucket's refs still name the previous commit and every object they need, the next save on fresh
  nodes works and loads back bit-exact, and gc removes exactly what the failed save left;
- the coordinator SIGKILLed between the commit document and its refs: the document is there, no ref
  names it, the next save works, gc removes it;
- two 2-rank jobs on one run, the second planned before the first publishes and publishing after
  it: the first moves ``latest``, the second's coordinator gets ``RefConflictError`` (through DCP, on
  both ranks) and its commit stays on the bucket under ``keep/<id>``;
- a connection cut (request or answer) through the fault proxy at an object upload, the commit
  document or the ref move of a sharded save: retried, or refused with a named error; either way no
  ref names a commit with a missing object and the next save works.

Every bucket check is made with plain boto3 (tests/s3_checks.py), not coral-torch's reading code.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nodes import report, run_job, same, start_job, wait_job  # noqa: E402
from s3_checks import remote_problems, sealed  # noqa: E402
from s3_proxy import Fault, FaultProxy  # noqa: E402
from s3_server import REGION, TEST_KEY, TEST_SECRET  # noqa: E402

from coral_torch.location import parse_location  # noqa: E402
from coral_torch.repository.s3_repository import S3Repository  # noqa: E402
from coral_torch.storage.s3_store import S3Config  # noqa: E402

PREFIX = "dcp"
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


# ------------------------------------------------------------------------------------ the bucket, by boto3
class Bucket:
    """A repository's keys on the bucket, read with plain boto3."""

    def __init__(self, client, bucket: str, prefix: str = PREFIX):
        self.client, self.bucket, self.prefix = client, bucket, prefix.rstrip("/") + "/"

    def keys(self) -> set[str]:
        out = set()
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            out.update(o["Key"][len(self.prefix):] for o in page.get("Contents", []) or [])
        return out

    def doc(self, key: str) -> dict | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None
        return sealed(body)

    def problems(self) -> tuple[list[str], dict[str, str]]:
        problems, refs, damaged = remote_problems(self.client, self.bucket, self.prefix)
        assert damaged == 0
        return problems, refs

    def commits(self) -> set[str]:
        keys = self.keys()
        return {k[len("commits/"):-len(".json")] for k in keys if k.startswith("commits/") and k.endswith(".json")}

    def objects(self) -> tuple[set[str], set[str]]:
        """(the hashes with a metadata document, the hashes with a payload)."""
        meta, payload = set(), set()
        for k in self.keys():
            if k.startswith("metadata/"):
                meta.add(k[len("metadata/"):].removesuffix(".json").removesuffix(".delta"))
            elif k.startswith(("weights/", "deltas/")):
                payload.add(k.split("/", 1)[1])
        return meta, payload

    def object_count(self) -> int:
        return sum(1 for k in self.keys() if k.startswith(("metadata/", "weights/", "deltas/")))

    def needed(self) -> set[str]:
        """Every object the commits the refs name need: their listed objects and the delta bases
        reached from them (through each delta's metadata)."""
        _, refs = self.problems()
        todo: set[str] = set()
        for cid in set(refs.values()):
            doc = self.doc(f"commits/{cid}.json")
            assert doc is not None, cid
            todo.update(h for _, h, _ in doc["objects"])
        need: set[str] = set()
        while todo:
            h = todo.pop()
            need.add(h)
            delta = self.doc(f"metadata/{h}.delta.json")
            if delta is not None and delta["reference_hash"] not in need:
                todo.add(delta["reference_hash"])
        return need


def s3_repo(url: str, cache: Path, config: S3Config | None) -> S3Repository:
    kw = {"config": config} if config is not None else {}
    return S3Repository(parse_location(url), cache_dir=cache, **kw)


def rclone_config(rclone_server, bucket: str) -> S3Config:
    return S3Config(bucket=bucket, prefix=PREFIX, endpoint_url=rclone_server.endpoint, access_key=TEST_KEY,
                    secret_key=TEST_SECRET, region=REGION, addressing_style="path", progress=False)


def next_save_and_gc(
    url: str, endpoint: str, b: Bucket, root: Path, prior: str, config: S3Config | None, nodes: Path
) -> str:
    """After a failed save: a new 2-rank save on ``nodes`` works (a child of ``prior``) and loads
    back 2->2 bit-exact; gc then removes exactly what no live commit needs, and the new commit still
    loads (2->1, a fresh cache) bit-exact. Returns the new commit's id."""
    out = str(root / "next")
    run_job("s3_save", {"repo": url, "out": out, "train": [6], "load": True}, nodes, endpoint)
    cid = report(out, 0)["cid"]
    assert report(out, 1)["cid"] == cid and report(out, 0)["loaded"] == report(out, 1)["loaded"] == cid
    saved = torch.load(out + ".pt", weights_only=True)
    same(saved["saved"]["model"], saved["back"]["model"])
    same(saved["saved"]["optim"], saved["back"]["optim"])
    problems, refs = b.problems()
    assert problems == [] and refs["runs/shard/latest"] == cid
    assert b.doc(f"commits/{cid}.json")["parent"] == prior

    need = b.needed()
    leftover = b.object_count() - 2 * len(need)
    assert leftover > 0  # what the failed save uploaded is still there, unreferenced
    repo = s3_repo(url, root / "gc-cache", config)
    try:
        stats = repo.gc(dry_run=False, orphan_grace_s=0)
    finally:
        repo.close()
    assert stats["problems"] == [] and stats["objects_removed"] > 0, stats
    meta, payload = b.objects()
    assert meta == payload == need  # every object the live commits need, and nothing else
    assert b.object_count() == 2 * len(need)  # a metadata document and a payload each
    assert b.commits() == set(b.problems()[1].values())  # no commit document that no ref names
    assert b.problems()[0] == []
    fresh = s3_repo(url, root / "fresh-cache", config)
    try:
        full = fresh.load(cid)
        same(saved["saved"]["model"], full["model"])
        same(saved["saved"]["optim"], full["optim"])
        assert fresh.resolve("shard/latest") == cid
    finally:
        fresh.close()
    return cid


def kill_mid_upload(url: str, endpoint: str, b: Bucket, root: Path, config: S3Config | None) -> dict:
    """A save, then rank 1 SIGKILLs itself after uploading about half of its objects of the next save."""
    out = str(root / "kill")
    outs = wait_job(start_job("s3_kill", {"repo": url, "out": out, "victim": 1, "kill": "upload", "timeout": 20},
                              root / "killed-pair", endpoint), timeout=150)
    assert outs[1][0] == -9, outs[1][1][-3000:]  # rank 1 died of SIGKILL
    assert outs[0][0] == 0, outs[0][1][-3000:]  # the survivor reported what it saw, and exited
    seen = report(out, 0)
    assert "saved" not in seen and seen.get("error"), seen  # its save failed (it did not hang)
    prior = seen["prior"]
    problems, refs = b.problems()
    assert problems == []
    assert refs["runs/shard/latest"] == prior  # the previous commit
    assert b.commits() == {prior}  # the failed save published no commit document
    need = b.needed()
    meta, payload = b.objects()
    assert meta - need and payload - need  # ... but its objects went up (some of them)
    with open(f"{out}.1.upload.json") as f:  # what the killed rank uploaded before it died, and what not
        split = json.load(f)
    went_up, never = set(split["uploaded"]) - need, set(split["not_uploaded"]) - need
    assert went_up and never, split  # it died part-way through the new objects of its shards
    assert went_up <= meta and went_up <= payload
    assert never - meta  # some of its objects never reached the bucket (the survivor had not them)
    next_save_and_gc(url, endpoint, b, root, prior, config, root / "next-pair")  # fresh nodes
    meta, payload = b.objects()
    assert not (went_up & (meta | payload))  # gc removed what the killed rank had uploaded
    return seen


# ------------------------------------------------------------------------------------ the tests
@pytest.mark.timeout(150)
def test_a_rank_killed_mid_upload_leaves_the_bucket_consistent(server, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    seen = kill_mid_upload(f"s3://{bucket}/{PREFIX}", server.endpoint, Bucket(server.client(), bucket), tmp_path, None)
    print("the surviving rank saw:", seen)


@pytest.mark.timeout(150)
def test_the_coordinator_killed_between_commit_document_and_ref(server, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    url, b = f"s3://{bucket}/{PREFIX}", Bucket(server.client(), bucket)
    out = str(tmp_path / "kill")
    outs = wait_job(start_job("s3_kill", {"repo": url, "out": out, "victim": 0, "kill": "move_ref", "timeout": 20},
                              tmp_path / "killed-pair", server.endpoint), timeout=150)
    assert outs[0][0] == -9, outs[0][1][-3000:]  # the coordinator died of SIGKILL
    assert outs[1][0] == 0, outs[1][1][-3000:]
    seen = report(out, 1)
    assert "saved" not in seen and seen.get("error"), seen
    print("the surviving rank saw:", seen)
    prior = seen["prior"]
    problems, refs = b.problems()
    assert problems == []  # every intact commit document's objects are there, every ref's commit too
    assert refs["runs/shard/latest"] == prior and set(refs.values()) == {prior}
    orphans = b.commits() - {prior}
    assert len(orphans) == 1  # the dead coordinator's commit document: written, named by no ref
    (orphan,) = orphans
    assert b.doc(f"commits/{orphan}.json")["parent"] == prior
    repo = s3_repo(url, tmp_path / "gc-cache-young", None)
    try:  # within the grace period (default: an hour) gc keeps it: its ref may be about to move
        stats = repo.gc(dry_run=False)
    finally:
        repo.close()
    assert stats["commits_removed"] == stats["objects_removed"] == 0 and stats["kept_young"] >= 1, stats
    assert orphan in b.commits()
    # the next save restarts on the same nodes (the dead coordinator's cache as it left it)
    cid = next_save_and_gc(url, server.endpoint, b, tmp_path, prior, None, tmp_path / "killed-pair")
    assert cid != orphan and b.commits() == {prior, cid}  # gc removed the unreferenced commit document


@pytest.mark.timeout(200)
def test_two_jobs_on_one_run_one_moves_latest_the_other_is_kept(server, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    url, b = f"s3://{bucket}/{PREFIX}", Bucket(server.client(), bucket)
    gate = tmp_path / "gate"
    gate.mkdir()
    out_b, out_a = str(tmp_path / "b"), str(tmp_path / "a")
    # job B: a save, then a second one (keep=False: only the conflict keeps it) that is planned on
    # that first commit and waits, before publishing, until job A has published
    job_b = start_job("s3_gated", {"repo": url, "out": out_b, "prior": True, "train": [11], "keep": False,
                                   "gate": str(gate), "timeout": 180}, tmp_path / "job-b", server.endpoint)
    try:
        deadline = time.monotonic() + 120
        while not (gate / "planned").exists():
            assert time.monotonic() < deadline and all(p.poll() is None for p in job_b), "job B never planned"
            time.sleep(0.1)
        # job A: planned after job B (on B's first commit), publishes first
        run_job("s3_save", {"repo": url, "out": out_a, "train": [12]}, tmp_path / "job-a", server.endpoint)
    finally:
        (gate / "go").write_text("go")
        outs = wait_job(job_b, timeout=120)
    for rc, out in outs:
        assert rc == 0, out[-4000:]
    a0, a1, b0, b1 = report(out_a, 0), report(out_a, 1), report(out_b, 0), report(out_b, 1)
    first, winner = b0["prior"], a0["cid"]
    assert a1["cid"] == winner and b1["prior"] == first
    print("job B's ranks saw:", b0, b1, sep="\n")
    for seen in (b0, b1):  # the conflict reached both of B's ranks, through DCP
        assert "saved" not in seen, seen
        assert seen["error"] == "RefConflictError" and seen["cause"] == "CheckpointException", seen
        assert "RefConflictError" in seen["cause_message"], seen
        assert "runs/shard/latest" in seen["message"] and "moved by another writer" in seen["message"], seen
        assert winner in seen["message"], seen  # it names the other writer's commit
    problems, refs = b.problems()
    assert problems == []
    assert refs["runs/shard/latest"] == winner  # exactly one moved latest: job A
    assert b.doc(f"commits/{winner}.json")["parent"] == first
    losers = b.commits() - {first, winner}
    assert len(losers) == 1
    (loser,) = losers
    assert b.doc(f"commits/{loser}.json")["parent"] == first  # planned on the same head as A
    assert refs[f"keep/{loser}"] == loser  # nothing lost: kept on the bucket
    assert [n for n, c in refs.items() if c == loser] == [f"keep/{loser}"]
    fresh = s3_repo(url, tmp_path / "fresh-cache", None)
    try:
        saved = torch.load(out_b + ".pt", weights_only=True)["saved"]
        full = fresh.load(loser)  # the losing commit loads, bit-exact
        same(saved["model"], full["model"])
        same(saved["optim"], full["optim"])
        assert fresh.resolve("shard/latest") == winner
    finally:
        fresh.close()


@pytest.mark.timeout(150)
def test_a_rank_killed_mid_upload_on_rclone(rclone_server, tmp_path):
    bucket = rclone_server.create_bucket("dcp-faults")
    url = f"s3://{bucket}/{PREFIX}"
    seen = kill_mid_upload(url, rclone_server.endpoint, Bucket(rclone_server.client(), bucket), tmp_path,
                           rclone_config(rclone_server, bucket))
    print("the surviving rank saw:", seen)


@pytest.mark.timeout(120)
def test_a_save_given_its_parent_compares_latest_with_the_head_read_when_it_was_planned(
    server, bucket, tmp_path, monkeypatch
):
    """One process, no process group (DCP on one rank), ``parent=`` given: ``latest`` moves only if it
    still is what it was when this save was planned. Not what an earlier save of the process, which
    failed between planning and publishing, read (that refused a save built on the current head); and
    a writer moving it in the meantime is a conflict (it was overwritten: the head was read only when
    publishing)."""
    import coral_torch.dcp as cdcp
    from coral_torch.errors import RefConflictError

    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("CORAL_CACHE_DIR", str(tmp_path / "cache"))
    # resolve() fetches only if the cache was not brought up to date within FRESH_S seconds: a commit
    # id another writer published within that window is not found (RefNotFoundError). Not tested here.
    monkeypatch.setattr("coral_torch.repository.s3_repository.FRESH_S", 0.0)
    url, b = f"s3://{bucket}/{PREFIX}", Bucket(server.client(), bucket)
    other = s3_repo(url, tmp_path / "other-cache", None)
    real_publish = S3Repository.publish_shards
    try:
        c1 = cdcp.save({"w": torch.arange(6.0)}, repo=url, run="r")

        def fail(self, *a, **k):
            raise RuntimeError("publishing failed")

        monkeypatch.setattr(S3Repository, "publish_shards", fail)
        with pytest.raises(BaseException, match="publishing failed"):  # planned on c1, never published
            cdcp.save({"w": torch.arange(6.0) + 1}, repo=url, run="r")
        monkeypatch.setattr(S3Repository, "publish_shards", real_publish)
        c2 = other.commit({"w": torch.arange(6.0) + 2}, run="r").commit_id  # another writer moves latest
        c3 = cdcp.save({"w": torch.arange(6.0) + 3}, repo=url, run="r", parent=c2)  # built on the head
        problems, refs = b.problems()
        assert problems == [] and refs["runs/r/latest"] == c3 and b.doc(f"commits/{c3}.json")["parent"] == c2

        def another_writer_first(self, *a, **k):  # the head moves between planning and publishing
            other.commit({"w": torch.arange(6.0) + 4}, run="r")
            return real_publish(self, *a, **k)

        monkeypatch.setattr(S3Repository, "publish_shards", another_writer_first)
        with pytest.raises(RefConflictError, match="moved by another writer"):
            cdcp.save({"w": torch.arange(6.0) + 5}, repo=url, run="r", parent=c3, keep=False)
        problems, refs = b.problems()
        c4 = refs["runs/r/latest"]
        assert problems == [] and c4 not in (c1, c2, c3)  # the other writer's commit stays the head
        (lost,) = b.commits() - {c1, c2, c3, c4}
        assert refs[f"keep/{lost}"] == lost and b.doc(f"commits/{lost}.json")["parent"] == c3  # kept
    finally:
        other.close()


SHARDED_TARGETS = {
    "payload": rf"^PUT /[^/?]+/{PREFIX}/(weights|deltas)/",
    "commit": rf"^PUT /[^/?]+/{PREFIX}/commits/",
    "ref": rf"^PUT /[^/?]+/{PREFIX}/refs/runs/",
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("target", sorted(SHARDED_TARGETS))
@pytest.mark.parametrize(("kind", "times"), [("cut_response", 1), ("cut_request", 99)], ids=["once", "always"])
def test_a_network_cut_during_a_sharded_save(server, bucket, tmp_path, target, kind, times):
    """Cut once, the retry publishes the save; cut at every attempt, the save fails on both ranks
    with a named error and ``latest`` stays on the previous commit."""
    url, b = f"s3://{bucket}/{PREFIX}", Bucket(server.client(), bucket)
    first = str(tmp_path / "first")
    run_job("s3_save", {"repo": url, "out": first}, tmp_path / "first-pair", server.endpoint)
    prior = report(first, 0)["cid"]
    out = str(tmp_path / "cut")
    with FaultProxy(server.port, max_requests=3000, max_seconds=120) as proxy:
        proxy.arm(Fault(kind, SHARDED_TARGETS[target], nth=0, times=times, at=0.5))
        outs = wait_job(start_job("s3_save", {"repo": url, "out": out, "train": [4]}, tmp_path / "cut-pair",
                                  proxy.endpoint), timeout=180)
        assert proxy.fired, proxy.requests[-20:]
    problems, refs = b.problems()
    assert problems == [], problems  # no ref names a commit with a missing or damaged object
    if times == 1:  # the cut was retried: the save is published
        assert all(rc == 0 for rc, _ in outs), outs[0][1][-3000:]
        cid = report(out, 0)["cid"]
        assert report(out, 1)["cid"] == cid and refs["runs/shard/latest"] == cid
        assert b.doc(f"commits/{cid}.json")["parent"] == prior
    else:  # refused on both ranks, with the error that names it; latest did not move
        for rc, text in outs:
            assert rc != 0 and ("RemoteConnectionError" in text or "SyncIncompleteError" in text), text[-3000:]
        assert refs["runs/shard/latest"] == prior
    after = str(tmp_path / "after")  # the next save on fresh nodes works and loads back bit-exact
    run_job("s3_save", {"repo": url, "out": after, "train": [5], "load": True}, tmp_path / "next-pair",
            server.endpoint)
    cid = report(after, 0)["cid"]
    saved = torch.load(after + ".pt", weights_only=True)
    same(saved["saved"]["model"], saved["back"]["model"])
    same(saved["saved"]["optim"], saved["back"]["optim"])
    problems, refs = b.problems()
    assert problems == [] and refs["runs/shard/latest"] == cid
