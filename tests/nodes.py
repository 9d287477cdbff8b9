"""Simulated nodes and multi-rank jobs for the multi-process tests.

A node is a directory with its own working directory, HOME and coral-torch cache; ranks on
different nodes share nothing but the S3 server (reached through the standard AWS environment).
A job is ``world`` processes of a worker script (``tests/_dcp_worker.py``, ...) with the
torch.distributed environment set; rank 0 of a worker writes ``<out>.<rank>.json`` reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from s3_server import REGION, TEST_KEY, TEST_SECRET, free_port

DCP_WORKER = Path(__file__).resolve().parent / "_dcp_worker.py"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def node_env(node: Path, endpoint: str, **more: str) -> dict:
    """The environment of a process on ``node``: its own HOME and cache; S3 at ``endpoint``."""
    (node / "home").mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HOME": str(node / "home"),
        "CORAL_CACHE_DIR": str(node / "cache"),
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": TEST_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET,
        "AWS_DEFAULT_REGION": REGION,
        "PYTHONPATH": str(PACKAGE_ROOT),
        "OMP_NUM_THREADS": "1",
        **more,
    }
    env.pop("CORAL_REPO", None)
    return env


def start_job(scenario: str, args: dict, root: Path, endpoint: str, world: int = 2,
              worker: Path = DCP_WORKER) -> list[subprocess.Popen]:
    """``world`` ranks of one job, each on its own node under ``root`` (``node<rank>``)."""
    port = free_port()
    procs = []
    for rank in range(world):
        node = root / f"node{rank}"
        env = node_env(node, endpoint, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(worker), scenario, json.dumps(args)], env=env, cwd=node,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def wait_job(procs: list[subprocess.Popen], timeout: float = 150) -> list[tuple[int, str]]:
    """Each rank's (exit status, output); a rank still running after ``timeout`` is killed (-9)."""
    deadline = time.monotonic() + timeout
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            out += "\n[killed by the test: it ran past its timeout]"
        outs.append((p.returncode, out))
    return outs


def run_job(scenario: str, args: dict, root: Path, endpoint: str, *, world: int = 2,
            timeout: float = 300) -> list[tuple[int, str]]:
    """A job that must succeed on every rank."""
    outs = wait_job(start_job(scenario, args, root, endpoint, world), timeout)
    for rc, out in outs:
        assert rc == 0, out[-4000:]
    return outs


def report(out: str, rank: int) -> dict:
    with open(f"{out}.{rank}.json") as f:
        return json.load(f)


def same(a, b, path="") -> None:
    """Equal structure; tensors bit for bit (dtype, shape, bytes)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    else:
        assert a == b, (path, a, b)


MP_WORKER = Path(__file__).resolve().parent / "_mp_worker.py"


def run_lightning(args: dict, *, env: dict | None = None, cwd: Path | None = None, timeout: float = 300,
                  expect_ok: bool = True) -> subprocess.CompletedProcess:
    """Run tests/_mp_worker.py (a 2-rank CoralModelParallelStrategy fit; Lightning starts rank 1)."""
    env = dict(env if env is not None else os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(MP_WORKER), json.dumps(args)], env=env, cwd=cwd, capture_output=True,
                       text=True, timeout=timeout)
    if expect_ok:
        assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    return p


def lightning_report(args: dict, **kw) -> dict:
    """:func:`run_lightning`, then rank 0's report."""
    run_lightning(args, **kw)
    with open(args["out"] + ".json") as f:
        return json.load(f)
