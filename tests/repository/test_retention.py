"""Retention policies and what a repository keeps: policies decided from repository state, pointer
refs that died with their files, leases of resumed runs, and saves that never build on damage."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import coral_torch
from coral_torch import Repository
from coral_torch.api import close_repositories
from coral_torch.errors import CoralError, InvalidRefNameError
from coral_torch.retention import (
    AnyOf,
    BestN,
    CommitFacts,
    Epochs,
    EveryNEpochs,
    EveryNSeconds,
    EveryNSteps,
    KeepAll,
    KeepNone,
    LatestN,
    RetentionPolicyError,
    Steps,
)


@pytest.fixture(autouse=True)
def _fresh_handles():
    yield
    close_repositories()


def state(i: int, n: int = 4096) -> dict:
    g = torch.Generator().manual_seed(i)
    return {"w": torch.randn(n, generator=g), "b": torch.full((16,), float(i)), "fixed": torch.arange(256.0)}


# ============================================================================ policies (pure)
def facts(n: int, losses=None) -> list[CommitFacts]:
    return [CommitFacts(f"c{i}", float(i), i, epoch=i, step=10 * (i + 1),
                        metrics={"loss": losses[i]} if losses else {}) for i in range(n)]


def test_policies_select_what_they_say():
    f = facts(6, [0.5, 0.1, 0.4, 0.1, 0.9, float("nan")])
    assert LatestN(2).select(f) == {"c4", "c5"}
    assert BestN(2, "loss").select(f) == {"c1", "c3"}  # tie at 0.1: both; NaN is not ranked
    assert BestN(1, "loss", "max").select(f) == {"c4"}
    assert EveryNSteps(20).select(f) == {"c0", "c1", "c3", "c5"}  # steps 10..60: first per window of 20
    assert EveryNEpochs(3).select(f) == {"c0", "c3"}
    assert EveryNSeconds(2.5).select(f) == {"c0", "c3"}
    assert Steps([20, 40]).select(f) == {"c1", "c3"} and Epochs([5]).select(f) == {"c5"}
    assert (LatestN(1) | BestN(1, "loss")).select(f) == {"c5", "c1"}
    assert KeepAll().select(f) == {c.id for c in f} and KeepNone().select(f) == set()
    assert AnyOf(LatestN(1), AnyOf(KeepNone(), Epochs([0]))).policies == (LatestN(1), KeepNone(), Epochs([0]))


@pytest.mark.parametrize("make", [lambda: LatestN(-1), lambda: BestN(1, ""), lambda: BestN(1, "x", "low"),
                                  lambda: EveryNSteps(0), lambda: EveryNSeconds(0), lambda: Steps([-3]),
                                  lambda: AnyOf("latest")])
def test_bad_policy_arguments_are_refused(make):
    with pytest.raises(RetentionPolicyError):
        make()


POLICIES = st.sampled_from([
    LatestN(1), LatestN(3), BestN(2, "loss"), BestN(1, "loss", "max"), EveryNSteps(25), EveryNEpochs(2),
    EveryNSeconds(3.0), Steps([20, 70]), LatestN(2) | BestN(2, "loss"), EveryNEpochs(3) | LatestN(1),
])


@settings(max_examples=200, deadline=None)
@given(POLICIES, st.lists(st.tuples(st.floats(0.01, 5.0), st.integers(1, 30), st.one_of(st.none(), st.floats(0, 1))),
                          min_size=1, max_size=25))
def test_deciding_from_survivors_equals_deciding_from_the_whole_history(policy, steps):
    """What makes repository state enough: applying the policy after every save, over the commits
    that survived so far, keeps exactly what the policy keeps over the full history."""
    history, survivors, t, step = [], [], 0.0, 0
    for i, (dt, dstep, loss) in enumerate(steps):
        t, step = t + dt, step + dstep
        c = CommitFacts(f"c{i}", t, i, epoch=i, step=step, metrics={} if loss is None else {"loss": loss})
        history.append(c)
        survivors.append(c)
        kept = policy.select(survivors)
        survivors = [s for s in survivors if s.id in kept]
        assert kept == policy.select(history)


# ======================================================================= coral_torch.save(keep=)
def test_save_with_keep_deletes_the_pointer_files_of_dropped_commits(tmp_path):
    policy = LatestN(2) | BestN(1, "loss")
    losses = [0.5, 0.1, 0.4, 0.3, 0.6]
    for i, loss in enumerate(losses):
        coral_torch.save(state(i), tmp_path / f"e{i}.pt", run="r", metrics={"loss": loss}, monitor="loss",
                         epoch=i, keep=policy)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["e1.pt", "e3.pt", "e4.pt"]
    repo = Repository(tmp_path / ".coral", create=False)
    assert sorted(c.epoch for c in repo.log("r")) == [1, 3, 4]
    assert repo.resolve("best") == repo.resolve("r/best") == coral_torch.api.read_pointer(tmp_path / "e1.pt")[0]
    for i in (1, 3, 4):
        torch.testing.assert_close(coral_torch.load(tmp_path / f"e{i}.pt"), state(i), rtol=0, atol=0)
    assert repo.verify().ok and repo.gc(dry_run=True)["commits_removed"] == 0


def test_save_keep_optimizer_strips_older_commits(tmp_path):
    def ckpt(i):
        return {"state_dict": state(i), "optimizer_states": [{"state": {0: {"exp_avg": torch.randn(512) + i}},
                                                              "param_groups": [{"lr": 0.1, "params": [0]}]}],
                "epoch": i, "global_step": 10 * i}
    for i in range(3):
        coral_torch.save(ckpt(i), tmp_path / f"e{i}.pt", run="r", keep=KeepAll(), keep_optimizer=LatestN(1))
    loaded = [coral_torch.load(tmp_path / f"e{i}.pt") for i in range(3)]
    assert [bool(ck["optimizer_states"][0]["state"]) for ck in loaded] == [False, False, True]
    assert all(ck["optimizer_states"][0]["param_groups"] for ck in loaded)
    assert [ck["epoch"] for ck in loaded] == [0, 1, 2]
    with pytest.raises(CoralError, match="keep_optimizer needs keep"):
        coral_torch.save(ckpt(3), tmp_path / "x.pt", keep_optimizer="last")


def test_save_monitor_makes_best(tmp_path):
    for i, loss in enumerate([0.3, 0.1, 0.2]):
        coral_torch.save(state(i), tmp_path / f"e{i}.pt", metrics={"val": loss}, monitor="val")
    best = coral_torch.load("best", repo=tmp_path / ".coral")
    torch.testing.assert_close(best, state(1), rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["a b", "ä", "x+y", "new\nline"])
def test_run_and_tag_names_follow_one_rule(tmp_path, bad):
    with pytest.raises(InvalidRefNameError, match="letters, digits"):
        coral_torch.save(state(0), tmp_path / "a.pt", run=bad)
    with pytest.raises(InvalidRefNameError, match="letters, digits"):
        coral_torch.save(state(0), tmp_path / "b.pt", tag=bad)
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "b.pt").exists()


# ============================================================ pointer files, gc, rm, prune (CLI)
def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coral_torch.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_gc_drops_refs_of_deleted_or_replaced_pointer_files(tmp_path):
    for i in range(4):
        coral_torch.save(state(i), tmp_path / f"ck{i}.pt")
    (tmp_path / "ck0.pt").unlink()
    (tmp_path / "ck1.pt").unlink()
    (tmp_path / "ck2.pt").write_text("not a pointer any more")
    repo = Repository(tmp_path / ".coral", create=False)
    # a save in flight publishes its ref before it writes its file: young refs are left alone
    assert repo.gc(dry_run=True)["commits_removed"] == 0
    out = cli("--repo", ".coral", "gc", "--yes", "--grace", "0", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "removed 3 commit(s)" in out.stdout and "dropped 3 dead ref(s)" in out.stdout
    repo = Repository(tmp_path / ".coral", create=False)
    assert len(repo.log()) == 1 and list(repo.refs()) == ["files/ck3.pt", "runs/default/latest"]
    torch.testing.assert_close(coral_torch.load(tmp_path / "ck3.pt"), state(3), rtol=0, atol=0)
    assert repo.verify().ok


def test_cli_rm_removes_files_and_refs(tmp_path):
    for i in range(3):
        coral_torch.save(state(i), tmp_path / f"ck{i}.pt", tag=f"t{i}" if i == 2 else None)
    out = cli("--repo", ".coral", "rm", "ck0.pt", "ck1.pt", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "ck0.pt").exists() and not (tmp_path / "ck1.pt").exists()
    repo = Repository(tmp_path / ".coral", create=False)
    assert len(repo.log()) == 1  # ck2's commit: its file, its tag and runs/default/latest hold it
    assert cli("--repo", ".coral", "rm", "t2", cwd=tmp_path).returncode == 0
    assert "tags/t2" not in repo.refs() and len(repo.log()) == 1  # the file still holds it
    bad = cli("--repo", ".coral", "rm", "nope", cwd=tmp_path)
    assert bad.returncode == 1 and "neither a pointer file nor a ref" in bad.stderr
    (tmp_path / "plain.pt").write_bytes(b"PK\x03\x04 not a pointer")
    bad = cli("--repo", ".coral", "rm", "plain.pt", cwd=tmp_path)
    assert bad.returncode == 1 and (tmp_path / "plain.pt").exists()


def test_cli_prune_dry_run_then_yes(in_tmp):
    for i, loss in enumerate([0.5, 0.1, 0.4, 0.3, 0.6, 0.7]):
        coral_torch.save(state(i), run="r", metrics={"val_loss": loss}, epoch=i, keep=KeepAll())
    args = ["prune", "--run", "r", "--keep-latest", "2", "--keep-best", "1", "--monitor", "val_loss"]
    dry = cli(*args, cwd=in_tmp)
    assert dry.returncode == 0, dry.stderr
    assert "would remove 3 commit(s)" in dry.stdout and "would free about" in dry.stdout
    r = Repository(in_tmp / ".coral", create=False)
    assert len(r.log("r")) == 6
    done = cli(*args, "--yes", cwd=in_tmp)
    assert done.returncode == 0, done.stderr
    assert sorted(c.epoch for c in r.log("r")) == [1, 4, 5]
    assert r.verify().ok
    assert cli("prune", "--run", "nope", "--keep-latest", "1", cwd=in_tmp).returncode == 1
    assert cli("prune", "--run", "r", cwd=in_tmp).returncode == 1  # nothing said to keep


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_prune_optimizer_latest_and_second_process_decides_the_same(in_tmp):
    repo = Repository(in_tmp / ".coral")
    policy = LatestN(2) | BestN(1, "loss")
    for i, loss in enumerate([0.5, 0.1, 0.4, 0.3]):
        repo.commit({"model": state(i), "optimizer_states": [{"state": {0: {"m": torch.randn(64) + i}},
                                                               "param_groups": [{"lr": 1.0}]}]},
                    run="r", metrics={"loss": loss}, keep=policy)
    kept = {c.id for c in repo.log("r")}
    # another process, deciding from the repository alone, finds nothing to change
    out = cli("--repo", ".coral", "prune", "--run", "r", "--keep-latest", "2", "--keep-best", "1",
              "--monitor", "loss", cwd=in_tmp)
    assert out.returncode == 0 and "would remove 0 commit(s)" in out.stdout, out.stdout + out.stderr
    out = cli("--repo", ".coral", "prune", "--run", "r", "--keep-latest", "2", "--keep-best", "1",
              "--monitor", "loss", "--optimizer-latest", "1", "--yes", cwd=in_tmp)
    assert out.returncode == 0 and "stripped optimizer state of 2" in out.stdout, out.stdout + out.stderr
    fresh = Repository(in_tmp / ".coral", create=False)
    assert len(fresh.log("r")) == len(kept) == 3
    with_state = [c.epoch for c in fresh.log("r") if fresh.load(c.id)["optimizer_states"][0]["state"]]
    assert len(with_state) == 1 and fresh.verify().ok


# ===================================================================================== leases
def test_lease_holds_a_commit_until_it_ends(in_tmp):
    repo = Repository(in_tmp / ".coral")
    first = repo.commit(state(0), run="r", keep=LatestN(1)).commit_id
    lease = repo.lease(first)
    repo.commit(state(1), run="r", keep=LatestN(1))
    assert repo.catalog.get_commit(first) is not None  # the policy dropped it; the lease holds it
    assert repo.gc()["commits_removed"] == 0  # this process is alive: its lease stays
    repo.end_lease(lease)
    assert repo.catalog.get_commit(first) is None


def test_gc_drops_the_lease_of_a_process_that_ended(in_tmp):
    repo = Repository(in_tmp / ".coral")
    cid = repo.commit(state(0), run="r", keep=False, head=False, tags=["t"]).commit_id
    code = ("import sys; from coral_torch import Repository; r = Repository('.coral'); "
            f"print(r.lease('{cid}'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=in_tmp, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    name = out.stdout.strip()
    assert name.startswith("leases/") and repo.refs("leases/") == {name: cid}
    assert name in repo.gc()["dead_refs"] and repo.refs("leases/") == {}


# ================================================================ no save builds on damage
def _pack_of(repo: Repository, name: str) -> Path:
    h = dict((n, h) for n, h, _ in repo.catalog.commit_objects(repo.resolve("latest")))[name]
    return repo.path / "packs" / repo.catalog.get_object(h).pack


def _damage(kind: str, repo: Repository, pack: Path) -> None:
    if kind == "truncate":
        os.truncate(pack, pack.stat().st_size // 2)
    elif kind == "delete":
        pack.unlink()
    else:  # a flipped payload byte of every object in the pack: same size, new bytes
        data = bytearray(pack.read_bytes())
        for row in repo.catalog.objects_in_packs([pack.name]):
            if row.offset is not None:
                data[row.offset + row.length // 2] ^= 0x40
        pack.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["truncate", "delete", "flip"])
@pytest.mark.parametrize("changed", [False, True])
def test_a_save_after_damage_never_publishes_an_unloadable_commit(in_tmp, kind, changed):
    repo = Repository(in_tmp / ".coral")
    repo.commit(state(0), run="r", keep=True)
    _damage(kind, repo, _pack_of(repo, "fixed"))
    fresh = Repository(in_tmp / ".coral", create=False)  # a new process: nothing verified yet
    again = state(0)
    if changed:
        again["w"] += 1e-3
    cid = fresh.commit(again, run="r", keep=True).commit_id
    torch.testing.assert_close(Repository(in_tmp / ".coral", create=False).load(cid), again, rtol=0, atol=0)
    report = Repository(in_tmp / ".coral", create=False).verify()
    if not changed:  # the saver held the exact bytes of every damaged object: all commits repaired
        assert report.ok, report
        torch.testing.assert_close(fresh.load(fresh.log("r")[-1].id), state(0), rtol=0, atol=0)


def test_a_damaged_delta_base_is_not_relied_on(in_tmp):
    repo = Repository(in_tmp / ".coral")
    base = state(0, n=1 << 16)
    repo.commit(base, run="r", keep=True)
    step = {k: v.clone() for k, v in base.items()}
    step["w"][:100] += 1.0
    second = repo.commit(step, run="r", keep=True)
    assert second.new_delta >= 1
    # damage the keyframe: the second commit's delta of "w" now cannot be rebuilt
    _damage("flip", repo, repo.path / "packs" / repo.catalog.get_object(
        dict((n, h) for n, h, _ in repo.catalog.commit_objects(repo.log("r")[-1].id))["w"]).pack)
    fresh = Repository(in_tmp / ".coral", create=False)
    cid = fresh.commit(step, run="r", keep=True).commit_id  # same content as the second commit
    assert cid == second.commit_id
    torch.testing.assert_close(Repository(in_tmp / ".coral", create=False).load(cid), step, rtol=0, atol=0)
    report = Repository(in_tmp / ".coral", create=False).verify()
    assert list(report.damaged_commits) == [repo.log("r")[-1].id]  # only the keyframe is still damaged


def test_trusted_objects_are_not_read_again(in_tmp, monkeypatch):
    repo = Repository(in_tmp / ".coral")
    repo.commit(state(0), run="r")
    from coral_torch.repository.read import ObjectReader

    builds = []
    real = ObjectReader.verify_chain
    monkeypatch.setattr(ObjectReader, "verify_chain", lambda self, chain: builds.append(1) or real(self, chain))
    repo.commit(state(0) | {"b": torch.zeros(16)}, run="r")  # "w" and "fixed" deduplicated: trusted
    assert builds == []


# ================================================================ Lightning: resume and sharded
HERE = Path(__file__).resolve().parents[1]  # tests/: the workers and shared helpers


def _run(script: str, args: dict, timeout: float = 300) -> None:
    p = subprocess.run([sys.executable, str(HERE / script), json_dumps(args)], capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]


def json_dumps(x: dict) -> str:
    import json

    return json.dumps(x)


def _kept_epochs(repo_path: Path, run: str) -> tuple[set[int], dict[str, str]]:
    repo = Repository(repo_path, create=False)
    refs = repo.refs(f"runs/{run}/")
    by_id = {c.id: c.epoch for c in repo.log(run)}
    kept = {by_id[c] for n, c in refs.items() if "/keep/" in n or "/top/" in n}
    assert repo.gc(dry_run=True)["commits_removed"] == 0 and not repo.refs("saves/")
    return kept, refs


@pytest.mark.slow
def test_resumed_run_keeps_what_an_uninterrupted_one_keeps(tmp_path):
    """save_top_k=2 by val_loss (0.1, 0.5, 0.3, 0.4): 4 epochs straight, and 2 + 2 resumed from
    coral://latest in a fresh process, keep the same two commits, with exactly two retention refs."""
    base = {"mode": "resume", "model": {"val_schedule": [0.1, 0.5, 0.3, 0.4]}, "run": "t",
            "callback": {"save_top_k": 2}}
    for name, epochs, ckpt in (("straight", 4, None), ("resumed", 2, None), ("resumed", 4, "coral://latest")):
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        args = {**base, "root": str(root), "repo": str(root / ".coral"), "max_epochs": epochs,
                "out": str(tmp_path / f"{name}{epochs}.pt")}
        _run("_lightning_worker.py", {**args, "ckpt": ckpt} if ckpt else args)
    straight, _ = _kept_epochs(tmp_path / "straight" / ".coral", "t")
    resumed, refs = _kept_epochs(tmp_path / "resumed" / ".coral", "t")
    assert straight == resumed == {0, 2}
    assert sum("/keep/" in n for n in refs) == 2 and not any("/top/" in n for n in refs)
    assert not Repository(tmp_path / "resumed" / ".coral", create=False).refs("leases/")  # ended with the run


@pytest.mark.slow
def test_sharded_run_keeps_top_k_across_a_resume(tmp_path):
    """CoralModelParallelStrategy (FSDP2, 2 gloo ranks) with save_top_k=2: the sharded commits are
    kept by policy (no per-save refs hold them), and a resumed run keeps what a straight one does."""
    cb = {"save_top_k": 2, "monitor": "train_loss"}
    _run("_mp_worker.py", {"repo": str(tmp_path / "straight"), "epochs": 4, "out": str(tmp_path / "s"),
                           "callback": cb})
    _run("_mp_worker.py", {"repo": str(tmp_path / "r"), "epochs": 2, "out": str(tmp_path / "a"), "callback": cb})
    _run("_mp_worker.py", {"repo": str(tmp_path / "r"), "epochs": 4, "out": str(tmp_path / "b"), "callback": cb,
                           "ckpt": "coral://latest"})
    straight, _ = _kept_epochs(tmp_path / "straight", "mp")
    resumed, refs = _kept_epochs(tmp_path / "r", "mp")
    assert straight == resumed and len(resumed) == 2
    assert sum("/keep/" in n for n in refs) == 2
    repo = Repository(tmp_path / "r", create=False)
    assert len(repo.log("mp")) <= 3 and repo.verify().ok  # the best two, and latest


@pytest.mark.slow
def test_kill_9_during_saves_and_retention_loses_nothing_kept(tmp_path):
    """SIGKILL at random instants while saves apply a policy (releasing commits, storing kept
    deltas whole, stripping optimizer state): every ref names a commit that loads bit-exactly,
    verify passes, and the next process carries on and ends with exactly what the policy keeps."""
    sys.path.insert(0, str(HERE))
    from _retention_worker import checkpoint

    repo_path = tmp_path / ".coral"
    rng = random.Random(7)
    epoch = 0
    for round_ in range(8):
        proc = subprocess.Popen([sys.executable, str(HERE / "_retention_worker.py"), str(repo_path), str(epoch), "50"],
                                stdout=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # one save at least, then a kill somewhere in the next ones
        assert first.startswith("COMMITTED"), first
        time.sleep(rng.uniform(0.0, 0.6))
        proc.kill()
        proc.wait()
        repo = Repository(repo_path, create=False)
        for cid in set(repo.refs().values()):
            row = repo.get_commit(cid)
            got = repo.load(cid)
            want = checkpoint(row.epoch)
            torch.testing.assert_close(got["state_dict"], want["state_dict"], rtol=0, atol=0)
            if got["optimizer_states"][0]["state"]:
                torch.testing.assert_close(got["optimizer_states"], want["optimizer_states"], rtol=0, atol=0)
        assert repo.verify().ok, f"round {round_}"
        epoch = max(c.epoch for c in repo.log("r")) + 1
        repo.close()
    # a last uninterrupted save applies the policy to whatever the kills left
    out = subprocess.run([sys.executable, str(HERE / "_retention_worker.py"), str(repo_path), str(epoch), "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    repo = Repository(repo_path, create=False)
    repo.gc(orphan_grace_s=0)
    epochs = sorted(c.epoch for c in repo.log("r"))
    assert epochs == sorted({e for e in epochs if e >= epoch - 1 or e % 4 == 0}), epochs
    assert epoch in epochs and repo.verify().ok and not repo.verify().orphan_files
    with_optimizer = [c.epoch for c in repo.log("r") if repo.load(c.id)["optimizer_states"][0]["state"]]
    assert with_optimizer == [epoch]


@pytest.mark.slow
def test_ctrl_c_while_waiting_for_a_background_save_stays_a_keyboard_interrupt(tmp_path):
    """SIGINT while the training thread waits for the in-flight save: Lightning's graceful shutdown
    runs (no CoralCheckpointError with an empty reason), the log says what became of the save,
    and the repository holds whole commits only."""
    import signal

    repo_path = tmp_path / ".coral"
    args = {"mode": "kill", "root": str(tmp_path), "repo": str(repo_path), "max_epochs": 50, "delay": 0.1,
            "report_waits": True}
    proc = subprocess.Popen([sys.executable, str(HERE / "_lightning_worker.py"), json_dumps(args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        assert time.monotonic() < deadline, "worker too slow"
        if line.startswith("WAITING"):
            time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]  # Lightning's exit after a graceful shutdown
    assert "background checkpoint save failed" not in err and "CoralCheckpointError" not in err, err[-3000:]
    assert "Detected KeyboardInterrupt" in err or "Detected KeyboardInterrupt" in out
    assert ("in-flight checkpoint save finished: published as commit" in err
            or "in-flight checkpoint save was abandoned" in err
            or "in-flight checkpoint save failed" in err), err[-3000:]
    repo = Repository(repo_path, create=False)
    assert repo.verify().ok
    for c in repo.log():
        assert repo.load(c.id)["state_dict"]
