"""The byte budget of an S3 repository's node-local cache: least recently used packs are evicted
after saves, fetches and reads; evicted objects come back from the bucket (verified) when a read
needs them; ``$CORAL_CACHE_BYTES``; a SIGKILL in the middle of an eviction. Real moto server."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from s3_server import s3_config  # noqa: E402

import coral_torch  # noqa: E402
from coral_torch.defaults import CACHE_BYTES_ENV, DEFAULT_CACHE_BYTES  # noqa: E402
from coral_torch.errors import CoralError, RemoteConfigError  # noqa: E402
from coral_torch.location import parse_location  # noqa: E402
from coral_torch.repository.repository import Repository  # noqa: E402
from coral_torch.repository.s3_repository import S3Repository, cache_budget  # noqa: E402
from coral_torch.storage.s3_store import S3Config  # noqa: E402

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore::UserWarning")]

MIB = 1 << 20
BUDGET = int(2.5 * MIB)


def _config(server, bucket: str) -> S3Config:
    return s3_config(server.endpoint, bucket)


def _state(i: int) -> dict:
    """~1 MiB of random float32, different for every ``i``."""
    g = torch.Generator().manual_seed(1000 + i)
    return {"w": torch.randn(256, 1024, generator=g), "i": i}


def _evolving(i: int) -> dict:
    """~1 MiB that changes a little from one ``i`` to the next (the saves delta-encode)."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(256, 1024, generator=g)
    w.view(-1)[: 4096 * (i + 1) : 97] += i + 1
    return {"w": w, "i": i}


def _same(a: dict, b: dict) -> None:
    assert a["i"] == b["i"]
    assert a["w"].dtype == b["w"].dtype and a["w"].shape == b["w"].shape
    assert torch.equal(a["w"].view(-1).view(torch.int32), b["w"].view(-1).view(torch.int32))


def _pack_bytes(cache: Path) -> int:
    return sum(f.stat().st_size for f in (cache / "packs").iterdir())


def _cached_commits(cache: Path, ids: list[str]) -> list[str]:
    """The commits whose every object is in the cache directory (a plain local repository)."""
    with Repository(cache) as local:
        lacking = local.catalog.commits_missing_objects()
    return [c for c in ids if c not in lacking]


# ------------------------------------------------------------------------------ the budget
@pytest.mark.parametrize(("make", "budget"), [(_state, BUDGET), (_evolving, int(1.5 * MIB))], ids=["random", "deltas"])
def test_saves_keep_the_cache_under_budget_and_every_commit_loads(server, bucket, tmp_path, caplog, make, budget):
    caplog.set_level(logging.INFO, logger="coral_torch.repository.s3_repository")
    cache = tmp_path / "cache"
    repo = S3Repository(parse_location(f"s3://{bucket}/ckpts"), config=_config(server, bucket), cache_dir=cache,
                        cache_bytes=budget)
    ids = []
    for i in range(6):
        ids.append(repo.commit(make(i), run="r").commit_id)
        assert _pack_bytes(cache) <= budget and repo.cache_usage() <= budget
        # the latest commit is in the cache: a plain local repository on its directory loads it
        with Repository(cache) as local:
            _same(local.load(ids[-1]), make(i))
    assert any("evicted" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert len(_cached_commits(cache, ids)) < 6  # some were evicted
    # the cache keeps every commit's metadata; a fetch does not bring evicted objects back
    assert [c.id for c in repo.log("r")] == ids[::-1]
    assert repo.fetch().get("objects_downloaded", 0) == 0
    assert _pack_bytes(cache) <= budget
    # every commit loads bit-exact through the same repository (evicted objects fetched again)
    for i, cid in enumerate(ids):
        _same(repo.load(cid), make(i))
        assert cid in _cached_commits(cache, ids)
        assert _pack_bytes(cache) <= budget
    assert repo.load("r/latest")["i"] == 5 and repo.load(f"{ids[-1]}~5")["i"] == 0
    report = repo.verify()
    assert report.ok, report
    with Repository(cache) as local:  # every object the cache holds verifies (no delta without its base)
        plain = local.verify()
        assert not (plain.damaged_objects or plain.missing_packs or plain.unreadable_packs or plain.dangling_refs)
        assert sorted(p.name for p in (cache / "packs").iterdir()) == sorted(local.catalog.packs())
    lru = json.loads((cache / "lru.json").read_text())
    assert set(lru["commits"]) <= set(ids) and lru["evicting"] == []
    # another node (an empty cache) loads them all from the bucket
    fresh = S3Repository(parse_location(f"s3://{bucket}/ckpts"), config=_config(server, bucket),
                         cache_dir=tmp_path / "fresh", cache_bytes=budget)
    for i, cid in enumerate(ids):
        _same(fresh.load(cid), make(i))
    assert fresh.verify().ok
    repo.close()
    fresh.close()


def test_run_heads_outlast_more_recent_commits_while_they_fit(server, bucket, tmp_path):
    cache = tmp_path / "cache"
    budget = 4 * MIB
    repo = S3Repository(parse_location(f"s3://{bucket}/ckpts"), config=_config(server, bucket), cache_dir=cache,
                        cache_bytes=budget)
    b = repo.commit(_state(10), run="b").commit_id  # run b's head, the least recently used commit
    a = [repo.commit(_state(i), run="a").commit_id for i in range(4)]
    cached = _cached_commits(cache, [b, *a])
    assert b in cached and a[-1] in cached  # the heads stay: a next save of either run deltas against them
    assert a[0] not in cached
    assert repo.cache_usage() <= budget
    _same(repo.load(a[0]), _state(0))  # fetched again from the bucket
    assert a[0] in _cached_commits(cache, a) and repo.cache_usage() <= budget
    repo.close()


# ------------------------------------------------------------------------------ $CORAL_CACHE_BYTES
def test_cache_budget_from_the_environment(server, bucket, tmp_path, monkeypatch):
    assert cache_budget("500M") == 500 * MIB
    assert cache_budget("2G") == 2 << 30
    assert cache_budget("2g") == cache_budget("2GiB") == cache_budget("2 GB") == 2 << 30
    assert cache_budget("1.5K") == 1536
    assert cache_budget("123456") == cache_budget(123456) == 123456
    monkeypatch.delenv(CACHE_BYTES_ENV, raising=False)
    assert cache_budget() == DEFAULT_CACHE_BYTES == 20 << 30
    monkeypatch.setenv(CACHE_BYTES_ENV, "")
    assert cache_budget() == DEFAULT_CACHE_BYTES
    monkeypatch.setenv(CACHE_BYTES_ENV, " 500M ")
    assert cache_budget() == 500 * MIB
    monkeypatch.setenv(CACHE_BYTES_ENV, "3000000")
    repo = S3Repository(parse_location(f"s3://{bucket}/ckpts"), config=_config(server, bucket),
                        cache_dir=tmp_path / "c1")
    assert repo.cache_bytes == 3_000_000
    repo.close()
    for bad in ["lots", "-1", "5X", "1e9", "12 M B", "G"]:
        monkeypatch.setenv(CACHE_BYTES_ENV, bad)
        with pytest.raises(RemoteConfigError) as e:
            cache_budget()
        assert isinstance(e.value, CoralError) and CACHE_BYTES_ENV in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(RemoteConfigError):
            S3Repository(parse_location(f"s3://{bucket}/ckpts"), config=_config(server, bucket),
                         cache_dir=tmp_path / "c2")
        assert not (tmp_path / "c2").exists()  # refused before anything was written
    for bad_arg in [-5, "many", True]:
        with pytest.raises(RemoteConfigError) as e:
            cache_budget(bad_arg)  # type: ignore[arg-type]
        assert "cache_bytes" in str(e.value)


# ------------------------------------------------------------------------------ crash safety
CRASH = r"""
import json, os, signal, sys
import torch
from coral_torch.location import parse_location
from coral_torch.repository.catalog import Catalog
from coral_torch.repository.read import ObjectReader
from coral_torch.repository.s3_repository import S3Repository
from coral_torch.storage.s3_store import S3Config

a = json.loads(sys.argv[1])
repo = S3Repository(parse_location(a["url"]), config=S3Config(**a["config"]), cache_dir=a["cache"],
                    cache_bytes=1 << 40)
def state(i):
    g = torch.Generator().manual_seed(1000 + i)
    return {"w": torch.randn(256, 1024, generator=g), "i": i}
for i in range(4):
    repo.commit(state(i), run="r")

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if a["where"] == "catalog":  # killed before the eviction's catalog transaction
    Catalog.apply_reclaim = die
else:  # killed after it: the catalog forgot the packs, their files are still there
    ObjectReader.drop = die
repo.cache_bytes = a["budget"]
repo.fetch()  # over budget now: evicts
print("not killed")
"""


@pytest.mark.parametrize("where", ["catalog", "files"])
def test_sigkill_while_evicting_leaves_a_cache_that_opens_and_verifies(server, bucket, tmp_path, where):
    cache = tmp_path / "cache"
    url = f"s3://{bucket}/ckpts"
    c = _config(server, bucket)
    config = {k: getattr(c, k) for k in ("bucket", "prefix", "endpoint_url", "access_key", "secret_key", "region",
                                         "addressing_style", "progress")}
    args = {"url": url, "config": config, "cache": str(cache), "where": where, "budget": BUDGET}
    env = {**os.environ, "PYTHONPATH": str(Path(coral_torch.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    env.pop(CACHE_BYTES_ENV, None)
    out = subprocess.run([sys.executable, "-c", CRASH, json.dumps(args)], env=env, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == -9, out.stdout[-2000:] + out.stderr[-4000:]
    lru = json.loads((cache / "lru.json").read_text())
    assert lru["evicting"]  # the eviction had recorded what it was removing
    with Repository(cache) as local:
        leftover = {p.name for p in (cache / "packs").iterdir()} - set(local.catalog.packs())
    assert bool(leftover) == (where == "files")
    assert leftover <= set(lru["evicting"])

    repo = S3Repository(parse_location(url), config=c, cache_dir=cache, cache_bytes=BUDGET)
    with Repository(cache) as local:  # reopening removed the files the killed eviction left
        assert sorted(p.name for p in (cache / "packs").iterdir()) == sorted(local.catalog.packs())
        plain = local.verify()  # every object the cache holds verifies
        assert not (plain.damaged_objects or plain.missing_packs or plain.unreadable_packs or plain.dangling_refs)
    assert json.loads((cache / "lru.json").read_text())["evicting"] == []
    report = repo.verify()
    assert report.ok, report
    assert repo.load("r/latest")["i"] == 3
    repo.commit(_state(4), run="r")  # saves go on
    log = repo.log("r")
    assert [repo.load(row.id)["i"] for row in log] == [4, 3, 2, 1, 0]
    for row in log:
        _same(repo.load(row.id), _state(repo.load(row.id)["i"]))
        assert repo.cache_usage() <= BUDGET
    assert repo.verify().ok
    repo.close()


def test_an_object_that_passes_its_checksum_but_is_another_is_never_read(server, bucket, tmp_path):
    """The cache takes a fetched payload on its metadata's size and checksum alone (every read of
    the cache checks the content hash, so weights are not decoded twice). A forgery that passes
    those checks (another object's bytes under this key, its metadata rewritten to match) is stored,
    then refused by the read: the wrong tensor is never handed out."""
    from coral_torch.errors import IntegrityError
    from coral_torch.format.documents import decode_document, encode_document

    cfg = _config(server, bucket)
    repo = S3Repository(parse_location(f"s3://{bucket}/ckpts"), config=cfg, cache_dir=tmp_path / "writer")
    a = repo.commit(_state(1), run="a").commit_id
    b = repo.commit(_state(2), run="b").commit_id  # another run: stored whole, not as a delta of a

    def biggest(cid: str) -> str:
        rows = [(repo.catalog.get_object(h).nbytes, h) for _, h, _ in repo.catalog.commit_objects(cid)]
        return max(rows)[1]

    victim, other = biggest(a), biggest(b)
    repo.close()
    s3 = server.client()
    meta = {h: decode_document(s3.get_object(Bucket=bucket, Key=f"ckpts/metadata/{h}.json")["Body"].read(), "m", "t")
            for h in (victim, other)}
    forged = dict(meta[victim], **{k: v for k, v in meta[other].items() if k.startswith("payload_")})
    payload = s3.get_object(Bucket=bucket, Key=f"ckpts/weights/{other}")["Body"].read()
    s3.put_object(Bucket=bucket, Key=f"ckpts/weights/{victim}", Body=payload)
    s3.put_object(Bucket=bucket, Key=f"ckpts/metadata/{victim}.json", Body=encode_document(forged))

    fresh = S3Repository(parse_location(f"s3://{bucket}/ckpts"), config=cfg, cache_dir=tmp_path / "reader")
    try:
        assert torch.equal(fresh.load(b)["w"], _state(2)["w"])  # the object it was copied from: intact
        with pytest.raises(IntegrityError) as e:
            fresh.load(a)
        assert victim[:12] in str(e.value), e.value
    finally:
        fresh.close()
