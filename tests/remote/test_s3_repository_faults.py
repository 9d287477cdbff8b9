"""Faults while saving into an S3 repository: network cuts and delays (the fault proxy) and kill -9
of the saving process at the steps of a publish. The invariant checked after each: no ref on the
bucket names a commit with a missing or damaged object (``remote_problems``), and the next save and
a load on a fresh node work, bit-exact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from s3_checks import remote_problems  # noqa: E402
from s3_proxy import Fault, FaultProxy  # noqa: E402
from s3_server import REGION, TEST_KEY, TEST_SECRET  # noqa: E402

import coral_torch  # noqa: E402
from coral_torch.errors import CoralError  # noqa: E402
from coral_torch.location import S3Location  # noqa: E402
from coral_torch.repository.s3_repository import S3Repository  # noqa: E402
from coral_torch.storage.s3_store import S3Config  # noqa: E402

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore::UserWarning")]

KEY = r"/[^/?]+/[^/?]+/"  # /<bucket>/<prefix>/
TARGETS = {
    "payload": rf"^PUT {KEY}(weights|deltas)/",
    "metadata": rf"^PUT {KEY}metadata/",
    "commit": rf"^PUT {KEY}commits/",
    "ref": rf"^PUT {KEY}refs/",
}


def _config(endpoint: str, bucket: str, **kw) -> S3Config:
    opts = dict(
        bucket=bucket, prefix="ckpts", region=REGION, endpoint_url=endpoint, access_key=TEST_KEY,
        secret_key=TEST_SECRET, addressing_style="path", progress=False, max_attempts=2, connect_timeout=1,
        read_timeout=0.6, max_concurrency=2,
    )
    opts.update(kw)
    return S3Config(**opts)


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(512, 256, generator=g), "v": torch.randn(4096, generator=g), "epoch": seed}


def _check_fresh_node(endpoint: str, bucket: str, cache: Path, seed: int) -> None:
    """A fresh cache saves the next checkpoint and loads it back bit-exact."""
    repo = S3Repository(S3Location(bucket, "ckpts"), config=_config(endpoint, bucket, read_timeout=15), cache_dir=cache)
    try:
        cid = repo.commit(_state(seed), run="r").commit_id
        assert repo.resolve("r/latest") == cid
        got = repo.load(cid)
        assert all(torch.equal(got[k], _state(seed)[k]) for k in ("w", "v"))
    finally:
        repo.close()


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("kind", ["cut_request", "cut_response", "delay"])
def test_network_fault_during_a_save(server, bucket, tmp_path, target, kind):
    base = S3Repository(S3Location(bucket, "ckpts"), config=_config(server.endpoint, bucket, read_timeout=15),
                        cache_dir=tmp_path / "cache")
    base.commit(_state(1), run="r")
    base.close()
    with FaultProxy(server.port, max_requests=400, max_seconds=60) as proxy:
        proxy.arm(Fault(kind, TARGETS[target], nth=0, times=1, at=0.6, delay=1.0))
        repo = S3Repository(S3Location(bucket, "ckpts"), config=_config(proxy.endpoint, bucket),
                            cache_dir=tmp_path / "cache")
        try:
            outcome = "ok"
            cid = repo.commit(_state(2), run="r").commit_id
        except CoralError as exc:
            outcome, cid = "refused", None
            assert "\n" not in str(exc)
        finally:
            repo.close()
        assert proxy.fired, proxy.requests
    problems, refs, _ = remote_problems(server.client(), bucket, "ckpts/")
    assert problems == [], (outcome, problems)
    if outcome == "ok":
        assert refs["runs/r/latest"] == cid
    _check_fresh_node(server.endpoint, bucket, tmp_path / "fresh", 3)


_KILLER = """
import os, signal, sys, torch
import coral_torch.repository.s3_repository as s3r
from coral_torch.location import S3Location
from coral_torch.storage.s3_store import S3Config
point = sys.argv[1]
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
if point == "before-commit-document":
    s3r.publish_commit = die
elif point == "before-ref":
    s3r.move_ref = die
cfg = S3Config(bucket=sys.argv[2], prefix="ckpts", endpoint_url=sys.argv[3], addressing_style="path", progress=False)
repo = s3r.S3Repository(S3Location(sys.argv[2], "ckpts"), config=cfg, cache_dir=sys.argv[4])
g = torch.Generator().manual_seed(7)
state = {"w": torch.randn(2048, 1024, generator=g), "v": torch.randn(4096, generator=g), "epoch": 7}
if point == "mid-upload":
    import threading
    threading.Timer(float(sys.argv[5]), die).start()
repo.commit(state, run="r")
print("finished")
"""


@pytest.mark.slow
@pytest.mark.parametrize("point", ["mid-upload", "before-commit-document", "before-ref"])
def test_kill_9_during_a_save(server, bucket, tmp_path, point):
    base = S3Repository(S3Location(bucket, "ckpts"), config=_config(server.endpoint, bucket, read_timeout=15),
                        cache_dir=tmp_path / "cache0")
    first = base.commit(_state(1), run="r").commit_id
    base.close()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": TEST_KEY, "AWS_SECRET_ACCESS_KEY": TEST_SECRET,
           "AWS_DEFAULT_REGION": REGION, "PYTHONPATH": str(Path(coral_torch.__file__).parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", _KILLER, point, bucket, server.endpoint, str(tmp_path / "cache1"), "0.8"],
        env=env, capture_output=True, text=True, timeout=240,
    )
    if point != "mid-upload" or "finished" not in out.stdout:  # the timer may come after a fast save
        assert out.returncode == -signal.SIGKILL, (out.returncode, out.stderr[-2000:])
    problems, refs, _ = remote_problems(server.client(), bucket, "ckpts/")
    assert problems == [], problems
    if "finished" not in out.stdout:
        assert refs["runs/r/latest"] == first  # the killed save published no ref
    # the killed process's cache, reopened, and a fresh node both go on
    _check_fresh_node(server.endpoint, bucket, tmp_path / "cache1", 8)
    _check_fresh_node(server.endpoint, bucket, tmp_path / "fresh", 9)
