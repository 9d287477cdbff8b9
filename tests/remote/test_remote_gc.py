"""Garbage collection of an S3 remote (:func:`coral_torch.repository.remote.collect_garbage`) against a
real moto server: what is live is computed here independently from the documents on the bucket."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from coral_torch import WeightTensor
from coral_torch.errors import ConcurrentChangeError, CorruptObjectError
from coral_torch.location import parse_location
from coral_torch.repository.remote import collect_garbage
from coral_torch.repository.s3_repository import S3Repository
from coral_torch.retention import LatestN
from coral_torch.storage.s3.client import RemoteEntry, S3Client
from coral_torch.storage.s3_store import S3Config, S3Store

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore::UserWarning")]

PREFIX = "ckpts"


def _config(server, bucket: str) -> S3Config:
    return S3Config(bucket=bucket, prefix=PREFIX, endpoint_url=server.endpoint, addressing_style="path", progress=False)


def _repo(server, bucket: str, cache: Path) -> S3Repository:
    return S3Repository(parse_location(f"s3://{bucket}/{PREFIX}"), config=_config(server, bucket), cache_dir=cache)


def _state(i: int) -> dict:
    """Commit ``i``: ``w`` changes one row per commit (deltas against the parent), ``u`` is new each
    time (an object only that commit needs), ``b`` never changes (deduplicated)."""
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(64, 64, generator=g)
    w[: i + 1] += 1.0
    u = torch.randn(32, 32, generator=torch.Generator().manual_seed(i))
    return {"w": w, "u": u, "b": torch.zeros(5), "step": i}


def _five_commits(server, bucket: str, tmp_path: Path, n: int = 5, keep: int = 2) -> list[str]:
    """``n`` commits of run ``exp`` kept by ``LatestN(keep)``; ``keep=0``: kept by their ``keep/``
    refs, then every ref document but ``latest`` deleted on the bucket (released by hand, so the
    last commit's delta chain runs through objects of released commits)."""
    repo = _repo(server, bucket, tmp_path / "cache-writer")
    try:
        cids = [repo.commit(_state(i), run="exp", keep=LatestN(keep) if keep else True).commit_id for i in range(n)]
    finally:
        repo.close()
    if not keep:
        for k in _keys(server, bucket):
            if k.startswith("refs/") and k != "refs/runs/exp/latest.json":
                server.client().delete_object(Bucket=bucket, Key=f"{PREFIX}/{k}")
    return cids


def _keys(server, bucket: str) -> dict[str, int]:
    """``{key relative to the prefix: size}`` of everything under the prefix."""
    out: dict[str, int] = {}
    for page in server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{PREFIX}/"):
        for o in page.get("Contents", []):
            out[o["Key"][len(PREFIX) + 1 :]] = o["Size"]
    return out


def _doc(server, bucket: str, rel: str) -> dict:
    return json.loads(server.client().get_object(Bucket=bucket, Key=f"{PREFIX}/{rel}")["Body"].read())


def _needed(server, bucket: str) -> tuple[set[str], set[str]]:
    """(commit ids the refs name, every key the bucket must keep for them), from the documents."""
    keys = _keys(server, bucket)
    live = {_doc(server, bucket, k)["commit"] for k in keys if k.startswith("refs/") and k.endswith(".json")}
    todo = {o[1] for cid in live for o in _doc(server, bucket, f"commits/{cid}.json")["objects"]}
    need = {f"commits/{cid}.json" for cid in live} | {k for k in keys if k.startswith("refs/")}
    seen: set[str] = set()
    while todo:
        h = todo.pop()
        seen.add(h)
        if f"metadata/{h}.delta.json" in keys:
            need |= {f"metadata/{h}.delta.json", f"deltas/{h}"}
            base = _doc(server, bucket, f"metadata/{h}.delta.json")["reference_hash"]
            if base not in seen:
                todo.add(base)
        if f"metadata/{h}.json" in keys:
            need |= {f"metadata/{h}.json", f"weights/{h}"}
    return live, need


@pytest.fixture
def client(server, bucket):
    c = S3Client(_config(server, bucket))
    yield c
    c.close()


def test_listing_entries_carry_their_modification_time(server, bucket, client):
    before = time.time()
    server.client().put_object(Bucket=bucket, Key=f"{PREFIX}/notes.txt", Body=b"hello")
    (entry,) = client.list_entries("notes.txt").values()
    assert entry.size == 5 and before - 5 <= entry.modified <= time.time() + 5
    assert dict(client.iter_entries(""))["notes.txt"] == entry
    assert RemoteEntry(3, "abc") == (3, "abc", 0.0)  # two-argument constructions still work


@pytest.mark.parametrize("n,keep", [(5, 2), (3, 0)])
def test_gc_keeps_exactly_what_kept_commits_need(server, bucket, client, tmp_path, n, keep):
    cids = _five_commits(server, bucket, tmp_path, n, keep)
    keep = keep or 1
    server.client().put_object(Bucket=bucket, Key=f"{PREFIX}/.coral-probe/x.json", Body=b"{}")
    server.client().put_object(Bucket=bucket, Key=f"{PREFIX}/notes.txt", Body=b"not ours")
    live, need = _needed(server, bucket)
    assert live == set(cids[-keep:])  # LatestN: the last ones (latest is the last)
    named = {o[1] for c in live for o in _doc(server, bucket, f"commits/{c}.json")["objects"]}
    if n == 3:  # the kept commit is a delta on a delta: its bases are objects of released commits
        assert any(k.split("/")[1].split(".")[0] not in named for k in need if k.startswith(("weights/", "deltas/")))
    before = _keys(server, bucket)
    assert need < set(before)

    stats = collect_garbage(client, dry_run=False, grace_s=0)
    assert stats["problems"] == [] and not stats["dry_run"]
    assert stats["commits_removed"] == n - keep and stats["objects_removed"] >= n - keep and stats["bytes_freed"] > 0
    after = _keys(server, bucket)
    assert set(after) == need | {".coral-probe/x.json", "notes.txt"}
    gone = set(before) - set(after)
    assert {f"commits/{c}.json" for c in cids[:-keep]} <= gone
    assert stats["bytes_freed"] == sum(before[k] for k in gone if not k.startswith("commits/"))

    # a fresh node (new cache) loads every kept commit bit-exact
    fresh = _repo(server, bucket, tmp_path / "cache-fresh")
    try:
        assert {c.id for c in fresh.log()} == set(cids[-keep:])
        for i, cid in zip(range(n - keep, n), cids[-keep:]):
            got, want = fresh.load(cid), _state(i)
            assert all(torch.equal(got[k], want[k]) for k in ("w", "u", "b")) and got["step"] == i
    finally:
        fresh.close()
    again = collect_garbage(client, dry_run=False, grace_s=0)  # nothing left to do
    assert again["commits_removed"] == again["objects_removed"] == again["bytes_freed"] == 0
    assert set(_keys(server, bucket)) == set(after)


def test_dry_run_deletes_nothing_and_reports_the_same_counts(server, bucket, client, tmp_path):
    _five_commits(server, bucket, tmp_path)
    before = _keys(server, bucket)
    dry = collect_garbage(client, grace_s=0)  # dry_run is the default
    assert dry["dry_run"] and _keys(server, bucket) == before
    real = collect_garbage(client, dry_run=False, grace_s=0)
    counts = ("commits_removed", "objects_removed", "orphan_payloads_removed", "bytes_freed", "kept_young")
    assert {k: dry[k] for k in counts} == {k: real[k] for k in counts}
    assert real["commits_removed"] == 3 and real["bytes_freed"] > 0


def test_grace_keeps_freshly_released_commits_and_objects(server, bucket, client, tmp_path):
    _five_commits(server, bucket, tmp_path)
    before = _keys(server, bucket)
    stats = collect_garbage(client, dry_run=False)  # the default grace: an hour
    assert stats["problems"] == [] and stats["kept_young"] > 3
    assert stats["commits_removed"] == stats["objects_removed"] == stats["bytes_freed"] == 0
    assert _keys(server, bucket) == before


def test_objects_of_a_save_in_flight_are_kept_until_old(server, bucket, client, tmp_path):
    repo = _repo(server, bucket, tmp_path / "cache")
    try:
        repo.commit(_state(0), run="exp")
    finally:
        repo.close()
    with S3Store(_config(server, bucket)) as store:  # uploaded, no commit yet
        key = store.store(WeightTensor(torch.randn(16, 16).numpy()))
    half = "ab" * 32  # a payload whose metadata never came (an interrupted upload)
    server.client().put_object(Bucket=bucket, Key=f"{PREFIX}/weights/{half}", Body=b"x" * 100)
    stray = {f"weights/{key}", f"metadata/{key}.json", f"weights/{half}"}
    _, need = _needed(server, bucket)

    young = collect_garbage(client, dry_run=False)
    assert young["kept_young"] == 2 and young["objects_removed"] == 0
    assert stray <= set(_keys(server, bucket))

    old = collect_garbage(client, dry_run=False, now=time.time() + 7200)
    assert old["problems"] == [] and old["objects_removed"] == 2 and old["orphan_payloads_removed"] == 1
    assert set(_keys(server, bucket)) == need


def test_a_damaged_ref_document_refuses_gc_and_deletes_nothing(server, bucket, client, tmp_path):
    _five_commits(server, bucket, tmp_path)
    server.client().put_object(Bucket=bucket, Key=f"{PREFIX}/refs/runs/exp/latest.json", Body=b"garbage{")
    before = _keys(server, bucket)
    with pytest.raises(CorruptObjectError) as e:
        collect_garbage(client, dry_run=False, grace_s=0)
    msg = str(e.value)
    assert "\n" not in msg and "refused" in msg and "runs/exp/latest" in msg and "nothing was deleted" in msg
    assert _keys(server, bucket) == before


def test_missing_delta_metadata_of_a_live_object_deletes_nothing(server, bucket, client, tmp_path):
    _five_commits(server, bucket, tmp_path)
    live, need = _needed(server, bucket)
    delta_meta = sorted(k for k in need if k.endswith(".delta.json"))
    assert delta_meta, "the kept commits hold deltas"
    server.client().delete_object(Bucket=bucket, Key=f"{PREFIX}/{delta_meta[0]}")
    before = _keys(server, bucket)
    stats = collect_garbage(client, dry_run=False, grace_s=0)
    assert len(stats["problems"]) >= 1 and all("\n" not in p for p in stats["problems"])
    assert stats["commits_removed"] == stats["objects_removed"] == stats["bytes_freed"] == 0
    assert _keys(server, bucket) == before


def test_a_ref_moved_onto_garbage_meanwhile_stops_gc(server, bucket, client, tmp_path, monkeypatch):
    cids = _five_commits(server, bucket, tmp_path)
    before = _keys(server, bucket)
    real = client.list_entries
    seen = {"refs": 0}

    def list_entries(sub: str = ""):  # the second listing of refs/: someone tagged a released commit
        if sub == "refs/":
            seen["refs"] += 1
            if seen["refs"] == 2:
                doc = {"kind": "ref", "name": "tags/old", "commit": cids[0], "updated": time.time()}
                client.put_document("refs/tags/old.json", doc)
        return real(sub)

    monkeypatch.setattr(client, "list_entries", list_entries)
    with pytest.raises(ConcurrentChangeError) as e:
        collect_garbage(client, dry_run=False, grace_s=0)
    assert "\n" not in str(e.value) and cids[0] in str(e.value)
    assert set(_keys(server, bucket)) == set(before) | {"refs/tags/old.json"}


def test_a_save_deduplicating_against_garbage_meanwhile_stops_gc(server, bucket, client, tmp_path, monkeypatch):
    _five_commits(server, bucket, tmp_path)
    before = _keys(server, bucket)
    real = client.list_entries
    seen = {"refs": 0, "cid": ""}
    state = {"u": _state(0)["u"], "v": torch.ones(3)}  # u of a released commit: already on the bucket

    def list_entries(sub: str = ""):  # a save on another node publishes just before the re-check
        if sub == "refs/":
            seen["refs"] += 1
            if seen["refs"] == 2:
                other = _repo(server, bucket, tmp_path / "cache-other")
                try:
                    seen["cid"] = other.commit(state, run="other").commit_id
                finally:
                    other.close()
        return real(sub)

    monkeypatch.setattr(client, "list_entries", list_entries)
    with pytest.raises(ConcurrentChangeError) as e:
        collect_garbage(client, dry_run=False, grace_s=0)
    assert "\n" not in str(e.value) and "published meanwhile" in str(e.value)
    assert seen["cid"] in e.value.missing and set(_keys(server, bucket)) >= set(before)
    monkeypatch.undo()
    fresh = _repo(server, bucket, tmp_path / "cache-fresh")
    try:
        assert torch.equal(fresh.load(seen["cid"])["u"], state["u"])
    finally:
        fresh.close()
