"""Sharded saves in the background: real 2-rank FSDP2 Lightning runs (gloo, CPU) with
CoralModelParallelStrategy and CoralCheckpoint, whose saves are asynchronous by default. A probe
(tests/_mp_worker.py ``Probe``) holds, fails or interrupts the coordinator's publish."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from coral_torch import Repository
from coral_torch.checkpoint.pointers import read_pointer_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from nodes import lightning_report, run_lightning, same  # noqa: E402

pytestmark = [pytest.mark.timeout(400), pytest.mark.filterwarnings("ignore::UserWarning")]


def errors(out: str) -> dict[int, dict]:
    found = {}
    for rank in range(2):
        p = Path(f"{out}.error{rank}.json")
        if p.exists():
            found[rank] = json.loads(p.read_text())
    return found


def test_training_goes_on_while_a_sharded_save_publishes_and_the_result_is_exact(tmp_path):
    """The first epoch's save is held at its publish until two more batches were trained: training
    did not wait for it. The run equals one with synchronous saves, bit for bit, and every commit
    is there."""
    lightning_report({"repo": str(tmp_path / "sync"), "epochs": 3, "out": str(tmp_path / "s"),
                     "callback": {"async_save": False}, "strategy": {"async_save": False}})
    held = lightning_report({"repo": str(tmp_path / "async"), "epochs": 3, "out": str(tmp_path / "a"),
                             "probe": "gate"})
    assert held["gate_timed_out"] is False and held["batches_while_saving"] >= 2, held
    same(torch.load(str(tmp_path / "s.pt")), torch.load(str(tmp_path / "a.pt")))
    r = Repository(tmp_path / "async")
    commits = r.log("mp")
    assert len(commits) == 3 and r.resolve("mp/latest") == held["last"]
    assert [c.epoch for c in reversed(commits)] == [0, 1, 2]
    assert commits[0].parent == commits[1].id  # each save's parent is the one before: it waited for it
    assert r.verify().ok
    stats = held["history"]
    assert len(stats) == 3 and all(s["background_s"] > 0 and s["staged_bytes"] > 0 for s in stats), stats
    # the same weights as the synchronous run's commits
    for a, b in zip(Repository(tmp_path / "sync").log("mp"), commits):
        same(Repository(tmp_path / "sync").load(a.id)["state_dict"], r.load(b.id)["state_dict"])


def test_model_checkpoint_saves_through_the_strategy_in_the_background(tmp_path):
    """ModelCheckpoint's saves go through the strategy's background saves: its pointer files name
    published commits and top-1 removes the other epoch's (after its save finished)."""
    ckdir = tmp_path / "ckpts"
    run = lightning_report({"repo": str(tmp_path / ".coral"), "epochs": 2, "out": str(tmp_path / "a"),
                            "model_checkpoint": True, "ckdir": str(ckdir), "coral": False,
                            "strategy": {"repo": str(tmp_path / ".coral"), "run": "mc"}})
    names = sorted(os.listdir(ckdir))
    assert "last.ckpt" in names and len(names) == 2, names
    r = Repository(tmp_path / ".coral")
    assert r.verify().ok and len(r.log("mc")) >= 2
    for name in names:
        pointer = read_pointer_file(ckdir / name)
        assert pointer is not None and r.catalog.get_commit(pointer.commit) is not None
    assert run["epoch"] == 2


def test_a_failed_background_publish_is_raised_on_the_training_thread_and_publishes_nothing(tmp_path):
    out = str(tmp_path / "f")
    p = run_lightning({"repo": str(tmp_path / ".coral"), "epochs": 3, "out": out, "probe": "fail"},
                      expect_ok=False)
    assert p.returncode != 0
    errs = errors(out)
    assert errs.get(0, {}).get("type") == "CoralCheckpointError", (errs, p.stderr[-3000:])
    assert "rank 0: RuntimeError: publish refused by the probe" in errs[0]["message"]
    assert "\n" not in errs[0]["message"]  # one line
    assert errs[0]["step"] == 9  # at the first batch of the next epoch (4 per epoch), not at the next save
    # rank 1 raised the same (unless rank 0's launcher ended it first)
    assert errs.get(1, {"type": "CoralCheckpointError"})["type"] == "CoralCheckpointError", errs
    r = Repository(tmp_path / ".coral")
    commits = r.log("mp")
    assert len(commits) == 1 and commits[0].epoch == 0  # the failed save left no commit, the first is whole
    assert r.verify().ok


def test_ctrl_c_during_a_background_save_waits_for_it_and_publishes_it_whole(tmp_path):
    out = str(tmp_path / "i")
    p = run_lightning({"repo": str(tmp_path / ".coral"), "epochs": 3, "out": out, "probe": "interrupt"},
                      expect_ok=False)
    log = p.stdout + p.stderr
    assert p.returncode != 0 and ("KeyboardInterrupt" in log or "graceful shutdown" in log), log[-3000:]
    assert "the in-flight sharded checkpoint save finished: published as commit" in log, log[-3000:]
    r = Repository(tmp_path / ".coral")
    commits = r.log("mp")
    assert [c.epoch for c in reversed(commits)] == [0, 1], commits
    assert r.resolve("mp/latest") == commits[0].id and r.verify().ok
