"""Failure paths on real file systems: a full disk at every write step, read-only repositories
(a read-only mount, an unprivileged user), and random damage to every file of a repository.

Mounting needs root; those tests skip with the reason where it is not permitted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

import coral_torch
from coral_torch import Repository
from coral_torch.errors import CoralError, DiskFullError, ReadOnlyRepositoryError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _fuzz_worker import KINDS as DAMAGE_KINDS  # noqa: E402


def _mount(args: list[str]) -> None:
    res = subprocess.run(["mount", *args], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"mounting is not permitted here: {res.stderr.strip()}")


@pytest.fixture
def small_tmpfs():
    """A 4 MiB tmpfs of our own (unmounted afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = Path(f"/tmp/coral-enospc-{uuid.uuid4().hex[:8]}")
    mnt.mkdir()
    _mount(["-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)])
    try:
        yield mnt
    finally:
        coral_torch.api.close_repositories()
        subprocess.run(["umount", str(mnt)], check=False)
        shutil.rmtree(mnt, ignore_errors=True)


def _checkpoint(seed: int, n: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g), "step": seed}


def _fill(mnt: Path, leave: int) -> Path:
    filler = mnt / "filler"
    filler.unlink(missing_ok=True)
    free = shutil.disk_usage(mnt).free
    with open(filler, "wb") as fh:
        fh.truncate(0)
        fh.write(b"\0" * max(0, free - leave))
    return filler


def _assert_clean(repo_dir: Path) -> None:
    r = Repository(repo_dir, create=False)
    try:
        names = {p.name for p in (repo_dir / "packs").iterdir()}
        assert not [n for n in names if n.startswith(".tmp")], names
        assert names == set(r.catalog.packs()), "a pack no commit records was left behind"
        assert r.verify().ok
    finally:
        r.close()


@pytest.mark.slow
def test_full_disk_at_every_write_step_is_named_and_leaves_the_repository_usable(small_tmpfs):
    mnt = small_tmpfs
    first = _checkpoint(0, 50_000)  # ~200 KB: room for it, then for the sweep
    path = mnt / "ck" / "last.pt"
    coral_torch.save(first, mnt / "ck" / "first.pt")
    repo_dir = mnt / "ck" / ".coral"
    big = _checkpoint(1, 120_000)  # ~480 KB raw, ~440 KB stored
    outcomes = {"saved": 0, "disk_full": 0}
    other = subprocess.Popen([sys.executable, "-c", _OTHER_PROCESS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _sweep(mnt, path, repo_dir, first, big, outcomes, other)
    finally:
        try:
            other.stdin.close()
        except BrokenPipeError:
            pass
        try:
            other.wait(timeout=60)
        except subprocess.TimeoutExpired:
            other.kill()
            other.wait()
    assert other.returncode == 0, other.stderr.read()[-2000:]
    assert outcomes["disk_full"] >= 3 and outcomes["saved"] >= 1, outcomes
    # with space back, saving works again in this very process
    coral_torch.save(_checkpoint(2, 1000), path)
    _assert_clean(repo_dir)


# one other process for the whole sweep (started once: a Python + torch start-up per step is seconds):
# for each repository path it reads, it takes the lock (opening the repository anew) and runs gc
_OTHER_PROCESS = r"""
import sys, coral_torch
for line in sys.stdin:
    r = coral_torch.Repository(line.strip(), create=False, lock_timeout=5)
    try:
        r.gc()
    finally:
        r.close()
    print("OK", flush=True)
"""


def _sweep(mnt: Path, path: Path, repo_dir: Path, first: dict, big: dict, outcomes: dict,
           other: subprocess.Popen) -> None:
    # free space from nothing to more than the save needs: the failure moves through the pack
    # write, its fsync and rename, the catalog transaction and the pointer file
    for leave in list(range(0, 600_000, 40_000)) + [4096, 16384, 65536]:
        filler = _fill(mnt, leave)
        try:
            coral_torch.save(big, path)
            outcomes["saved"] += 1
        except DiskFullError as exc:
            outcomes["disk_full"] += 1
            assert isinstance(exc, OSError) and isinstance(exc, CoralError)
            msg = str(exc)
            assert "\n" not in msg and ("full" in msg or "space" in msg), msg
        except CoralError as exc:  # anything else must still be named...
            pytest.fail(f"leave={leave}: {type(exc).__name__}: {exc}")
        finally:
            filler.unlink()
        # the repository is not wedged: the lock is free in this process and in another one
        _assert_clean(repo_dir)
        assert torch.equal(coral_torch.load(mnt / "ck" / "first.pt")["w"], first["w"])
        if path.exists():
            assert torch.equal(coral_torch.load(path)["w"], big["w"])
        try:
            other.stdin.write(f"{repo_dir}\n")
            other.stdin.flush()
            answer = other.stdout.readline().strip()
        except BrokenPipeError:
            answer = ""
        assert answer == "OK", (leave, answer, other.poll() is not None and other.stderr.read()[-2000:])


@pytest.fixture
def world_readable_dir():
    """A directory outside root's private pytest tree, so an unprivileged user can read it."""
    d = Path(f"/tmp/coral-ro-{uuid.uuid4().hex[:8]}")
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        coral_torch.api.close_repositories()
        shutil.rmtree(d, ignore_errors=True)


def _make_repo(root: Path, *, leave_wal: bool) -> tuple[Path, list[str], dict]:
    """A repository with two commits; with ``leave_wal`` the files are copied while it is open, so
    the copy has a non-empty WAL (committed data not yet in catalog.sqlite), as after a crash."""
    src = root / "src"
    objs = [_checkpoint(10, 5000), _checkpoint(11, 5000)]
    ids = [coral_torch.save(o, src / f"e{i}.pt") for i, o in enumerate(objs)]
    dst = root / "repo"
    if leave_wal:
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lock", "*-shm"))
        assert (dst / ".coral" / "catalog.sqlite-wal").stat().st_size > 0
    else:
        coral_torch.api.close_repositories()
        shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return dst, ids, {"e0": objs[0], "e1": objs[1]}


_READER = r"""
import json, sys, io, contextlib
import coral_torch
from coral_torch import Repository
from coral_torch.errors import ReadOnlyRepositoryError
from coral_torch.cli import main
root, ids = sys.argv[1], json.loads(sys.argv[2])
out = {}
out["loads"] = [float(coral_torch.load(f"{root}/e{i}.pt")["w"].sum()) for i in range(2)]
r = Repository(f"{root}/.coral", create=False)
out["log"] = [c.id for c in r.log()]
out["verify"] = r.verify().ok
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    out["cli_log"] = main(["--repo", f"{root}/.coral", "log"])
    out["cli_verify"] = main(["--repo", f"{root}/.coral", "verify"])
try:
    coral_torch.save({"x": 1}, f"{root}/new.pt")
    out["save"] = "saved?!"
except ReadOnlyRepositoryError as exc:
    out["save"] = "refused: " + str(exc)
try:
    r.gc()
    out["gc"] = "ran?!"
except ReadOnlyRepositoryError as exc:
    out["gc"] = "refused"
print(json.dumps(out))
"""


def _read_as(root: Path, ids: list[str], unprivileged: bool) -> dict:
    """Run the reader; ``unprivileged``: in a user namespace, where root has no capability over
    files and so meets their permission bits like any other user."""
    prefix = ["unshare", "--user"] if unprivileged else []
    res = subprocess.run([*prefix, sys.executable, "-c", _READER, str(root), json.dumps(ids)], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, HOME="/tmp"), cwd="/tmp")
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("leave_wal", [False, True], ids=["clean", "leftover-wal"])
def test_read_only_mount_reads_and_refuses_writes(world_readable_dir, leave_wal):
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    root, ids, objs = _make_repo(world_readable_dir, leave_wal=leave_wal)
    mnt = world_readable_dir / "ro"
    mnt.mkdir()
    _mount(["--bind", str(root), str(mnt)])
    try:
        _mount(["-o", "remount,bind,ro", str(mnt)])
        out = _read_as(mnt, ids, False)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    assert out["loads"] == [float(objs["e0"]["w"].sum()), float(objs["e1"]["w"].sum())]
    assert set(out["log"]) == set(ids) and out["verify"] and out["cli_log"] == 0 and out["cli_verify"] == 0
    assert out["save"].startswith("refused") and "read-only" in out["save"]
    assert out["gc"] == "refused"


@pytest.mark.slow
@pytest.mark.parametrize("leave_wal", [False, True], ids=["clean", "leftover-wal"])
def test_unprivileged_user_reads_a_repository_it_cannot_write(world_readable_dir, leave_wal):
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "--user", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"user namespaces are not permitted here: {probe.stderr.strip()}")
    root, ids, objs = _make_repo(world_readable_dir, leave_wal=leave_wal)
    # owned by someone else, no write bits: the reader may read, not write
    for p in [root, *root.rglob("*")]:
        os.chown(p, 65534, 65534)
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    out = _read_as(root, ids, True)
    assert out["loads"] == [float(objs["e0"]["w"].sum()), float(objs["e1"]["w"].sum())]
    assert set(out["log"]) == set(ids) and out["verify"] and out["cli_log"] == 0 and out["cli_verify"] == 0
    assert out["save"].startswith("refused")
    assert out["gc"] == "refused"
    assert not (root / "new.pt").exists()


def _fuzz_trials() -> int:
    """CORAL_FUZZ_TRIALS (default 120; 400 or more for a long run): at least one trial per kind of damage."""
    raw = os.environ.get("CORAL_FUZZ_TRIALS", "120")
    try:
        n = int(raw)
    except ValueError:
        pytest.fail(f"CORAL_FUZZ_TRIALS must be a whole number, not {raw!r}", pytrace=False)
    if n < len(DAMAGE_KINDS):
        pytest.fail(f"CORAL_FUZZ_TRIALS={n}: at least {len(DAMAGE_KINDS)}, one per kind of damage", pytrace=False)
    return n


@pytest.mark.slow
def test_random_damage_to_every_file_is_detected_or_harmless(tmp_path):
    """Byte flips, truncations and manifest edits of packs, catalog and pointers, stratified over the
    kinds of damage (tests/_fuzz_worker.py; CORAL_FUZZ_TRIALS of them, 120 by default): every load is
    bit-exact or a CoralError, and verify fails whenever a load fails."""
    trials = _fuzz_trials()
    res = subprocess.run([sys.executable, str(HERE / "_fuzz_worker.py"), str(tmp_path / "fz"), str(trials), "7"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    counts = report["counts"]
    print("fuzz outcomes:", counts, "by kind:", report["kinds"])
    assert not report["failures"], "\n".join(report["failures"])
    assert sum(counts.values()) == trials
    assert counts.get("detected", 0) >= trials // 2, counts
    # every kind of damage was made (the worker's stratification: a smaller count drops no kind)
    assert set(report["kinds"]) == set(DAMAGE_KINDS) and all(sum(o.values()) for o in report["kinds"].values())
