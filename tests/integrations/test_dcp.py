"""Sharded checkpoints through torch.distributed.checkpoint: real 2-process FSDP2 runs (gloo, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import coral_torch
from coral_torch import Repository

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from nodes import (  # noqa: E402
    lightning_report as run_lightning,  # noqa: E402
    report,
    same,
)
from s3_server import free_port  # noqa: E402

WORKER = Path(__file__).resolve().parents[1] / "_dcp_worker.py"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run_ranks(scenario: str, args: dict, *, world: int = 2, timeout: float = 240, expect_ok: bool = True):
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), scenario, json.dumps(args)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        outs.append((p.returncode, out))
    if expect_ok:
        for rc, out in outs:
            assert rc == 0, out[-4000:]
    return outs


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp")
    repo, out = root / ".coral", str(root / "report")
    run_ranks("save", {"repo": str(repo), "out": out})
    return repo, out


def test_fsdp2_save_dedups_deltas_and_reports_the_commit_on_every_rank(fsdp_run):
    repo_path, out = fsdp_run
    r0, r1 = report(out, 0), report(out, 1)
    for key in ("first", "unchanged", "third", "async", "loaded"):
        assert r0[key] == r1[key] and r0[key], key  # the same commit id on both ranks
    assert r0["unchanged"] == r0["first"]  # an unchanged save is the same commit, nothing new stored
    repo = Repository(repo_path)
    log = {c.id: c for c in repo.log("shard")}
    assert set(log) == {r0["first"], r0["third"], r0["async"]}
    assert log[r0["first"]].info["world_size"] == 2
    third = repo.manifest(r0["third"])
    assert third.sharded
    # both ranks wrote their own pack for each save; the publish made them one commit
    hows = [how for _, _, how in repo.catalog.commit_objects(r0["third"])]
    assert any(h == "delta" for h in hows), hows  # chunks XOR-delta'd against the first save's
    assert repo.get_commit(r0["third"]).parent == r0["first"]
    assert repo.verify().ok
    assert repo.resolve("runs/shard/latest") == r0["async"]


def test_loads_2_to_2_2_to_1_and_into_a_plain_model_bit_exact(fsdp_run):
    repo_path, out = fsdp_run
    r0 = report(out, 0)
    saved = torch.load(out + ".pt", weights_only=True)
    # 2 -> 2 (in the workers): a fresh sharded model loaded the third commit
    same(saved["third"]["model"], saved["back"]["model"])
    same(saved["third"]["optim"], saved["back"]["optim"])
    # 2 -> 1 consolidated: coral_torch.load gives the full, unsharded state dict
    full = coral_torch.load(f"coral://{r0['third']}", repo=repo_path)
    same(saved["third"]["model"], full["model"])
    same(saved["third"]["optim"], full["optim"])
    assert full["extra"] == {"epoch": 1, "note": "hello"}
    same(saved["async"]["model"], coral_torch.load(r0["async"], repo=repo_path)["model"])
    # 2 -> 1 through DCP, no process group: into a plain (unsharded) module's state dict
    import coral_torch.dcp as cdcp

    torch.manual_seed(5)
    plain = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 48), torch.nn.ReLU(),
                                torch.nn.Linear(48, 8))
    sd = {"model": plain.state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cdcp.load(sd, r0["third"], repo=repo_path) == r0["third"]
    same(saved["third"]["model"], plain.state_dict())


def test_sharded_commit_is_first_class_verify_gc_tag_export(fsdp_run, tmp_path):
    repo_path, out = fsdp_run
    r0 = report(out, 0)
    repo = Repository(repo_path)
    repo.tag("sharded-v1", r0["third"])
    assert repo.gc()["commits_removed"] == 0 and repo.verify().ok
    from coral_torch.cli import main as cli

    assert cli(["--repo", str(repo_path), "export", "sharded-v1", str(tmp_path / "m.pt")]) == 0
    exported = torch.load(tmp_path / "m.pt", weights_only=True)
    same(coral_torch.load("sharded-v1", repo=repo_path), exported)
    assert cli(["--repo", str(repo_path), "show", "sharded-v1"]) == 0
    assert cli(["--repo", str(repo_path), "verify"]) == 0


def test_sharded_commits_push_and_pull_through_s3(fsdp_run, server, bucket, tmp_path):
    from s3_server import REGION, TEST_KEY, TEST_SECRET

    from coral_torch.storage import S3Config

    repo_path, out = fsdp_run
    r0 = report(out, 0)
    cfg = S3Config(bucket=bucket, prefix="dcp", region=REGION, endpoint_url=server.endpoint, access_key=TEST_KEY,
                   secret_key=TEST_SECRET, addressing_style="path", progress=False)
    Repository(repo_path).push(cfg)
    other = Repository(tmp_path / "pulled")
    other.pull(cfg)
    assert other.verify().ok
    same(coral_torch.load(r0["third"], repo=repo_path), other.load(r0["third"]))


def test_a_rank_killed_mid_save_leaves_nothing_visible_and_the_next_save_works(tmp_path):
    repo_path, out = tmp_path / ".coral", str(tmp_path / "kill")
    run_ranks("after_kill", {"repo": str(repo_path), "out": out + "a"})
    before = {c.id for c in Repository(repo_path).log()}
    outs = run_ranks("killed", {"repo": str(repo_path), "out": out, "timeout": 15}, expect_ok=False, timeout=120)
    assert outs[1][0] == 3  # the rank that died
    repo = Repository(repo_path)
    assert {c.id for c in repo.log()} == before  # nothing of the killed save is visible
    assert repo.verify().ok
    assert repo.gc(orphan_grace_s=0)["orphan_files_removed"] >= 1  # the dead save's packs
    run_ranks("after_kill", {"repo": str(repo_path), "out": out + "b"})
    r = report(out + "b", 0)
    assert Repository(repo_path).verify().ok and r["cid"] in {c.id for c in Repository(repo_path).log()}


class _Custom:
    """A value only a full unpickler can rebuild (DCP stores it as BYTE_IO)."""

    def __init__(self, v):
        self.v = v


def test_pickled_values_are_not_executed_on_load_unless_trusted(tmp_path):
    import coral_torch.dcp as cdcp
    from coral_torch.errors import UnsafeCheckpointError

    sd = {"w": torch.arange(6.0).reshape(2, 3), "obj": _Custom(3), "n": 7}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cid = cdcp.save(sd, repo=tmp_path / ".coral")
        target = {"w": torch.zeros(2, 3), "obj": None, "n": 0}
        with pytest.raises(UnsafeCheckpointError):
            cdcp.load(target, cid, repo=tmp_path / ".coral")
        with pytest.raises(UnsafeCheckpointError):
            coral_torch.load(cid, repo=tmp_path / ".coral")
        cdcp.load(target, cid, repo=tmp_path / ".coral", trust_pickles=True)
    assert target["obj"].v == 3 and target["n"] == 7 and torch.equal(target["w"], sd["w"])
    assert coral_torch.load(cid, repo=tmp_path / ".coral", weights_only=False)["obj"].v == 3




def test_lightning_model_parallel_resume_is_exact_and_model_checkpoint_keeps_working(tmp_path):
    repo, ckdir = str(tmp_path / ".coral"), str(tmp_path / "ckpts")
    straight = run_lightning({"repo": str(tmp_path / "straight"), "epochs": 3, "out": str(tmp_path / "s")})
    first = run_lightning({"repo": repo, "epochs": 2, "out": str(tmp_path / "a"), "model_checkpoint": True,
                           "ckdir": ckdir})
    r = Repository(repo)
    assert r.manifest(first["last"]).sharded and len(r.log("mp")) == 2
    # ModelCheckpoint's files are pointers to sharded commits; top-1 removed the other epoch's
    names = sorted(os.listdir(ckdir))
    assert "last.ckpt" in names and len(names) == 2, names
    assert coral_torch.load(os.path.join(ckdir, "last.ckpt"))["state_dict"]
    resumed = run_lightning({"repo": repo, "epochs": 3, "out": str(tmp_path / "b"), "ckpt": "coral://latest"})
    assert resumed["epoch"] == straight["epoch"] == 3
    same(torch.load(str(tmp_path / "s.pt")), torch.load(str(tmp_path / "b.pt")))  # 2 + 1 epochs == 3
    assert Repository(repo).verify().ok
