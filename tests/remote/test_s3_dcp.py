"""Sharded (FSDP2 / DCP) saves straight to an S3 repository from every rank, with no shared file
system: 2 gloo ranks whose working directories, HOME and caches are private, sharing nothing but
the S3 server (moto, and rclone serve s3). Loads on 2 and on 1 rank(s) from empty caches."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nodes import lightning_report, node_env, report, run_job, same  # noqa: E402
from s3_server import s3_config  # noqa: E402

from coral_torch.location import parse_location  # noqa: E402
from coral_torch.repository.s3_repository import S3Repository  # noqa: E402

pytestmark = [pytest.mark.timeout(400), pytest.mark.filterwarnings("ignore::UserWarning")]


def _check_run(url: str, endpoint: str, root: Path, out: str, config=None) -> None:
    r0, r1 = report(out, 0), report(out, 1)
    for key in ("first", "unchanged", "third", "async", "loaded"):
        assert r0[key] == r1[key] and r0[key], key  # the same commit id on both ranks
    assert r0["unchanged"] == r0["first"]
    for r in (r0, r1):  # what each rank's writer uploaded (write_shard's last_publish, per save)
        up = r["uploaded"]
        first, unchanged, third = up["first"], up["unchanged"], up["third"]
        assert first["write_shard"] and first["bytes_uploaded"] > 0 and first["objects_uploaded"] > 0, up
        # an unchanged save uploads nothing new: every object of its shards is on the bucket already
        assert unchanged["bytes_uploaded"] == 0 and unchanged["objects_uploaded"] == 0, up
        assert unchanged["objects_skipped"] > 0, up  # it did look (write_shard ran), finding them there
        # a save after a training step uploads something, and fewer bytes than the first
        assert 0 < third["bytes_uploaded"] < first["bytes_uploaded"], up
    for rank in range(2):  # no repository directory appeared on any node: only its cache
        assert not (root / f"node{rank}" / ".coral").exists()
        assert (root / f"node{rank}" / "cache").is_dir()
    kw = {"config": config} if config is not None else {}
    fresh = S3Repository(parse_location(url), cache_dir=root / "fresh-cache", **kw)
    try:
        log = {c.id: c for c in fresh.log("shard")}
        assert set(log) == {r0["first"], r0["third"], r0["async"]}
        assert log[r0["first"]].info["world_size"] == 2 and log[r0["third"]].parent == r0["first"]
        hows = [how for _, _, how in fresh.catalog.commit_objects(r0["third"])]
        assert any(h == "delta" for h in hows), hows  # each rank delta-encoded against its own chunks
        assert fresh.resolve("shard/latest") == r0["async"]
        assert fresh.verify().ok
        saved = torch.load(out + ".pt", weights_only=True)
        same(saved["third"]["model"], saved["back"]["model"])  # 2 -> 2, fresh processes
        same(saved["third"]["optim"], saved["back"]["optim"])
        full = fresh.load(r0["third"])  # 2 -> 1 consolidated, a fresh cache
        same(saved["third"]["model"], full["model"])
        same(saved["third"]["optim"], full["optim"])
        same(saved["async"]["model"], fresh.load(r0["async"])["model"])
    finally:
        fresh.close()
    # fresh processes on fresh nodes (empty caches) load 2 -> 2
    out2 = str(root / "reload")
    run_job("load", {"repo": url, "ref": r0["third"], "out": out2}, root / "second-pair", endpoint)
    assert report(out2, 0)["loaded"] == report(out2, 1)["loaded"] == r0["third"]
    same(saved["third"]["model"], torch.load(out2 + ".pt", weights_only=True)["back"]["model"])
    same(saved["third"]["optim"], torch.load(out2 + ".pt", weights_only=True)["back"]["optim"])


def test_fsdp2_saves_from_every_rank_to_s3_and_loads_on_fresh_nodes(server, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    url = f"s3://{bucket}/dcp"
    out = str(tmp_path / "report")
    run_job("save", {"repo": url, "out": out}, tmp_path, server.endpoint)
    _check_run(url, server.endpoint, tmp_path, out)


def test_fsdp2_on_rclone(rclone_server, tmp_path):

    bucket = rclone_server.create_bucket("dcp-rclone")
    url = f"s3://{bucket}/dcp"
    out = str(tmp_path / "report")
    run_job("save", {"repo": url, "out": out}, tmp_path, rclone_server.endpoint)
    config = s3_config(rclone_server.endpoint, bucket, "dcp")
    _check_run(url, rclone_server.endpoint, tmp_path, out, config)


def run_lightning(args: dict, endpoint: str, node: Path, timeout: float = 300) -> dict:
    env = node_env(node, endpoint)
    return lightning_report(args, env=env, cwd=node, timeout=timeout)


def test_lightning_model_parallel_on_s3_resumes_on_a_fresh_node(server, bucket, tmp_path):
    """CoralModelParallelStrategy (FSDP2, 2 ranks, each rank its own cache): 2 epochs, then 1 more
    resumed from coral://latest on a fresh node, equals 3 straight."""
    url = f"s3://{bucket}/mp"
    straight = run_lightning(
        {
            "repo": f"{url}-straight",
            "epochs": 3,
            "out": str(tmp_path / "s"),
            "cache_root": str(tmp_path / "n0" / "caches"),
        },
        server.endpoint,
        tmp_path / "n0",
    )
    first = run_lightning(
        {"repo": url, "epochs": 2, "out": str(tmp_path / "a"), "cache_root": str(tmp_path / "n1" / "caches")},
        server.endpoint,
        tmp_path / "n1",
    )
    resumed = run_lightning(
        {
            "repo": url,
            "epochs": 3,
            "out": str(tmp_path / "b"),
            "ckpt": "coral://latest",
            "cache_root": str(tmp_path / "n2" / "caches"),
        },
        server.endpoint,
        tmp_path / "n2",
    )
    assert resumed["epoch"] == straight["epoch"] == 3 and first["last"] != resumed["last"]
    same(torch.load(str(tmp_path / "s.pt")), torch.load(str(tmp_path / "b.pt")))  # 2 + 1 epochs == 3
    for n in ("n1", "n2"):
        assert not (tmp_path / n / ".coral").exists()


def test_a_save_of_one_rank_loads_resharded_on_two_fresh_nodes(server, bucket, tmp_path, monkeypatch):
    """1 -> 2: a single-rank FSDP2 save, loaded by 2 ranks on fresh nodes (empty caches), each
    fetching the chunks its part lies in, bit-exact against what was saved."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    url = f"s3://{bucket}/one-to-two"
    out = str(tmp_path / "single")
    run_job("s3_save", {"repo": url, "out": out}, tmp_path / "single-node", server.endpoint, world=1)
    cid = report(out, 0)["cid"]
    saved = torch.load(out + ".pt", weights_only=True)["saved"]
    back = str(tmp_path / "pair")
    run_job("load", {"repo": url, "ref": cid, "out": back}, tmp_path / "pair-nodes", server.endpoint)
    assert report(back, 0)["loaded"] == report(back, 1)["loaded"] == cid
    loaded = torch.load(back + ".pt", weights_only=True)["back"]
    same(saved["model"], loaded["model"])
    same(saved["optim"], loaded["optim"])
