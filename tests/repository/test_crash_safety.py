"""Crash safety: a saver process SIGKILLed at random moments loses nothing it reported as saved and
leaves nothing half-visible.

The saver (tests/_crash_worker.py) commits a deterministic checkpoint per epoch into one repository,
printing ``DONE <commit_id> <epoch>`` after each commit returns, with a throw-away commit and a gc every
fifth epoch. The parent kills it after a seeded random delay, restarts it (it continues from the
repository's latest commit), again and again. The first restarts are fresh interpreters; the rest are
forked from a pre-imported "zygote" so that dozens of kills fit in seconds. While fewer commits have
completed than the pace of 20 in the planned forked kills, a forked saver's delay counts from its first
completed commit instead of its start, so the test needs about as many kills on a slow machine as on a
fast one.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from coral_torch import DeltaConfig, Repository

HERE = Path(__file__).resolve().parents[1]  # tests/: the workers and shared helpers
WORKER = HERE / "_crash_worker.py"

_spec = importlib.util.spec_from_file_location("_crash_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(a, b, path="obj"):
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert tensor_bytes(a) == tensor_bytes(b), f"{path}: bytes differ"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), f"{path}._metadata"
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


class Lines:
    """stdout of a child, line by line, from a reader thread."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.q: "queue.Queue[str]" = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.q.put(line.rstrip("\n"))
        self.q.put("")  # EOF

    def rest(self, timeout: float = 30.0) -> list[str]:
        """All remaining lines, up to the end of the stream (the child has exited)."""
        lines = []
        while True:
            line = self.q.get(timeout=timeout)
            if line == "":
                return lines
            lines.append(line)

    def until(self, prefix: str, since: int = 0, timeout: float = 60.0) -> str:
        """The first line starting with ``prefix`` at or after position ``since`` of the log, reading
        more as needed (the saver's and the zygote's lines may come in either order)."""
        for line in self.log[since:]:
            if line.startswith(prefix):
                return line
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} line within {timeout}s; last lines: {self.log[-10:]}")
            if line == "" and self.proc.poll() is not None:
                raise AssertionError(f"child exited ({self.proc.returncode}) before {prefix!r}; "
                                     f"last lines: {self.log[-10:]}; stderr: {self.proc.stderr.read()[-3000:]}")
            self.log.append(line)
            if line.startswith("ERROR"):
                raise AssertionError(f"saver failed: {line}")
            if line.startswith(prefix):
                return line


def child_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def settle(lines: list[str], done: dict[str, int]) -> bool:
    """Record the DONE lines of one saver's life; True if it was killed inside a commit."""
    in_commit = False
    for line in lines:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "BEGIN":
            in_commit = True
        elif parts[0] == "DONE":
            done[parts[1]] = int(parts[2])
            in_commit = False
    return in_commit


def check_consistent(path: Path, seed: int) -> int:
    """A fresh reader sees a consistent repository: the latest commit of the run loads exactly."""
    r = Repository(path, create=False)
    try:
        latest = r.refs("runs/main/").get("runs/main/latest")
        if latest is None:
            return -1
        obj = r.load(latest)
        assert_same(worker.checkpoint(seed, obj["epoch"]), obj, f"latest@{obj['epoch']}")
        return obj["epoch"]
    finally:
        r.close()


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing_committed(tmp_path):
    seed = 1234
    rng = random.Random(seed)
    repo_path = tmp_path / "repo"
    Repository(repo_path, delta_config=DeltaConfig(max_chain_length=worker.MAX_CHAIN)).close()
    done: dict[str, int] = {}
    kills = killed_in_commit = 0
    leftovers_seen = 0
    last_epoch = -1
    fresh_kills, forked_kills = 3, 33

    def after_kill(lines: list[str]) -> None:
        nonlocal kills, killed_in_commit, leftovers_seen, last_epoch
        kills += 1
        killed_in_commit += settle(lines, done)
        leftovers_seen += any(p.name.startswith(".tmp-") for p in (repo_path / "packs").iterdir())
        epoch = check_consistent(repo_path, seed)
        assert epoch >= last_epoch, "the repository went back in time"
        last_epoch = epoch

    # the zygote imports torch and coral_torch while the fresh savers run (it touches the repository
    # only when told to spawn a saver, after phase 1), so its start-up costs no time of its own
    zyg = subprocess.Popen([sys.executable, str(WORKER), str(repo_path), str(seed), "--zygote"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=child_env())
    out_zyg = Lines(zyg)

    try:
        # 1. fresh interpreters
        for _ in range(fresh_kills):
            proc = subprocess.Popen([sys.executable, str(WORKER), str(repo_path), str(seed)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
            out = Lines(proc)
            out.until("READY")
            time.sleep(rng.uniform(0.05, 0.6))
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            assert proc.returncode == -signal.SIGKILL
            after_kill(out.log + out.rest())

        # 2. savers forked from the pre-imported zygote
        out = out_zyg
        out.until("ZYGOTE")
        # at least forked_kills kills, and as many more as a slow or loaded machine needs for 20
        # completed commits and 5 kills inside a commit (bounded: the test stays a test)
        forked = 0
        while (forked < forked_kills or len(done) < 20 or killed_in_commit < 5) and forked < 4 * forked_kills:
            forked += 1
            start = len(out.log)
            zyg.stdin.write("spawn\n")
            zyg.stdin.flush()
            pid = int(out.until("PID", start).split()[1])
            out.until(f"READY {pid}", start)
            if len(done) < 20 * forked / forked_kills:
                # behind the pace of 20 completed commits in forked_kills kills (commits here are slow
                # next to the random delays: a slow or loaded machine): this saver's delay counts from
                # its first completed commit, so the kill lands in what follows (its next commit, a gc)
                out.until("DONE", start)
            time.sleep(rng.uniform(0.0, 0.35))
            os.kill(pid, signal.SIGKILL)
            status = int(out.until(f"EXIT {pid}", start).split()[2])
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
            after_kill(out.log[start:])
        zyg.stdin.write("quit\n")
        zyg.stdin.flush()
        zyg.wait(30)
    finally:
        if zyg.poll() is None:
            zyg.kill()
            zyg.wait()

    assert kills >= 30
    assert len(done) >= 20, f"only {len(done)} commits completed"
    assert killed_in_commit >= 5, f"only {killed_in_commit} kills landed inside a commit"

    repo = Repository(repo_path, create=False)
    # every commit reported DONE is there, and, like every other commit in the log (nothing
    # half-written is visible), loads bit-exact as what its epoch says
    log = repo.log()
    by_id = {c.id: c for c in log}
    assert set(done) <= set(by_id), "a commit reported DONE is missing"
    assert all(by_id[cid].epoch == epoch and by_id[cid].run == "main" for cid, epoch in done.items())
    for c in log:
        expected = worker.checkpoint(seed, c.epoch) if c.run == "main" else worker.scratch(seed, c.epoch)
        assert_same(expected, repo.load(c.id), f"{c.run}@{c.epoch}")
    epochs = sorted(c.epoch for c in repo.log("main"))
    assert epochs == list(range(len(epochs))), "an epoch is missing or duplicated"
    depths = [d for d, in repo.catalog.conn.execute("SELECT depth FROM objects")]
    assert max(depths) <= worker.MAX_CHAIN and any(d > 0 for d in depths)

    report = repo.verify()
    assert report.ok, (report.damaged_objects, report.damaged_commits, report.missing_packs)
    assert all(f.endswith(".h5") for f in report.orphan_files)  # packs killed before their commit
    gc_stats = repo.gc(orphan_grace_s=0)  # the killed writers' packs are orphans at once
    assert gc_stats["orphan_files_removed"] == len(report.orphan_files)
    after = repo.verify()
    assert after.ok and after.orphan_files == []
    assert {p.name for p in (repo_path / "packs").iterdir()} == set(repo.catalog.packs())
    sample = sorted(done.items(), key=lambda kv: kv[1])
    for cid, epoch in sample[:: max(1, len(sample) // 10)] + sample[-3:]:
        assert_same(worker.checkpoint(seed, epoch), repo.load(cid), f"epoch{epoch} after gc")

    # the next save works, as a delta on the latest (a chain limit above the worker's, so the
    # latest objects' depth always leaves room for one more link)
    next_epoch = max(epochs) + 1
    repo.delta_config = DeltaConfig(max_chain_length=worker.MAX_CHAIN + 1)
    repo.load("main")
    stats = repo.commit(worker.checkpoint(seed, next_epoch), run="main")
    assert stats.new_delta > 0
    repo.close()
    fresh = Repository(repo_path, create=False)
    assert_same(worker.checkpoint(seed, next_epoch), fresh.load("main"))
    assert fresh.verify().ok
