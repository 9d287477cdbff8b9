"""Repository: bit-exact commits over delta chains, refs, dedup, gc, locking, corruption, unsafe pickles.

Everything runs on real files in temporary directories; nothing is mocked.
"""

from __future__ import annotations

import base64
import collections
import copy
import io
import json
import os
import pickle
import random
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import h5py
import pytest
import torch
import xxhash
from conftest import assert_same  # noqa: E402
from torch import nn

import coral_torch
from coral_torch import DeltaConfig, Repository
from coral_torch.errors import (
    AmbiguousRefError,
    CheckpointDamagedError,
    NotARepositoryError,
    RefNotFoundError,
    RepositoryLockedError,
    UnsafeCheckpointError,
)

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------ helpers
def packs_bytes(repo: Repository) -> int:
    return sum(p.stat().st_size for p in (repo.path / "packs").iterdir())


def object_of(repo: Repository, cid: str, name: str):
    h = dict((n, h) for n, h, _ in repo.catalog.commit_objects(cid))[name]
    return repo.catalog.get_object(h)


def py_child(code: str, *args: str) -> subprocess.Popen:
    """Start a Python child (the venv's interpreter) running ``code``; its stdout is a text pipe."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def wait_line(proc: subprocess.Popen, prefix: str, timeout: float = 60.0) -> str:
    """Block until the child prints a line starting with ``prefix`` (fails if it exits first)."""
    result: list[str] = []

    def reader():
        for line in proc.stdout:
            if line.startswith(prefix):
                result.append(line.strip())
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        proc.kill()
        raise AssertionError(f"child never printed {prefix!r}; stderr: {proc.stderr.read()[-3000:]}")
    return result[0]


# ================================================================== 1. training sequences
class TinyNet(nn.Module):
    def __init__(self, emb_dtype: torch.dtype, dtype: torch.dtype):
        super().__init__()
        self.emb = nn.Embedding(40, 12).to(emb_dtype)
        self.fc1 = nn.Linear(24, 48).to(dtype)
        self.bn = nn.BatchNorm1d(48).to(dtype)
        self.fc2 = nn.Linear(48, 6).to(dtype)
        self.dtype = dtype

    def forward(self, x):
        h = self.emb(x).flatten(1).to(self.dtype)
        return self.fc2(torch.relu(self.bn(self.fc1(h))))


SEQUENCE_DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "mixed": (torch.bfloat16, torch.float32),
}


def _sequence_kind(seed: int) -> str:
    return ["fp32", "bf16", "fp32", "fp16", "mixed"][seed % 5]


@pytest.fixture
def one_torch_thread():
    """Tiny models train faster on one thread (no OpenMP spinning on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("seed", range(20))
def test_training_sequence_roundtrips_bit_exact_through_delta_chains(tmp_path, seed, one_torch_thread):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    kind = _sequence_kind(seed)
    emb_dtype, dtype = SEQUENCE_DTYPES[kind]
    model = TinyNet(emb_dtype, dtype)
    half = dtype != torch.float32
    opt = torch.optim.AdamW(model.parameters(), lr=rng.choice([1e-3, 3e-3, 1e-2]), eps=1e-3 if half else 1e-8)
    epochs = rng.randint(4, 12)
    full_checkpoint = rng.random() < 0.6
    max_chain = 3
    repo = Repository(tmp_path / "repo", delta_config=DeltaConfig(max_chain_length=max_chain))
    saved: list[tuple[str, object]] = []
    all_stats = []
    for epoch in range(epochs):
        for _ in range(rng.randint(1, 4)):
            x = torch.randint(0, 40, (16, 2))
            y = torch.randn(16, 6, dtype=dtype)
            loss = ((model(x) - y) ** 2).float().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if full_checkpoint:
            obj = {"epoch": epoch, "global_step": epoch * 10, "state_dict": model.state_dict(),
                   "optimizer_states": [opt.state_dict()], "loss": loss.item()}
        else:
            obj = model.state_dict()
        expected = copy.deepcopy(obj)
        stats = repo.commit(obj, run=f"seq{seed}", metrics={"val_loss": loss.detach()}, monitor="val_loss")
        all_stats.append(stats)
        saved.append((stats.commit_id, expected))
    repo.close()

    assert any(s.new_delta > 0 for s in all_stats), [(s.new_full, s.new_delta, s.deduplicated) for s in all_stats]
    assert len({cid for cid, _ in saved}) == epochs

    # a fresh Repository on the same path: every epoch, in a shuffled order, at every chain depth
    fresh = Repository(tmp_path / "repo", create=False)
    depths = [r[0] for r in fresh.catalog.conn.execute("SELECT depth FROM objects")]
    assert max(depths) <= max_chain
    if kind == "fp32" and epochs >= 6:
        assert max(depths) == max_chain  # chains reached their bound and wrapped to keyframes
    bad = fresh.catalog.conn.execute(
        "SELECT COUNT(*) FROM objects d JOIN objects b ON d.base=b.hash WHERE d.kind='delta' AND d.depth != b.depth + 1"
    ).fetchone()[0]
    assert bad == 0
    order = list(range(epochs))
    rng.shuffle(order)
    for i in order:
        cid, expected = saved[i]
        back = fresh.load(cid)
        assert_same(expected, back, f"epoch{i}")
        if not full_checkpoint:
            assert type(back) is collections.OrderedDict and back._metadata == expected._metadata
    log = fresh.log(f"seq{seed}")
    assert [c.id for c in log] == [cid for cid, _ in reversed(saved)]
    assert fresh.resolve(f"seq{seed}/latest") == saved[-1][0]
    assert fresh.verify().ok

    # resume: load the latest, train on, commit: deltas against the loaded bytes
    back = fresh.load("latest")
    model.load_state_dict(back["state_dict"] if full_checkpoint else back)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    obj = model.state_dict() if not full_checkpoint else {"epoch": epochs, "state_dict": model.state_dict()}
    expected = copy.deepcopy(obj)
    stats = fresh.commit(obj, run=f"seq{seed}")
    assert_same(expected, Repository(tmp_path / "repo", create=False).load(stats.commit_id))
    fresh.close()


# ===================================================================================== 4. refs
def small(seed: int, n: int = 64) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g), "seed": seed}


def test_refs_resolve_every_form(tmp_path):
    repo = Repository(tmp_path / "repo")
    losses = [0.5, 0.2, 0.3, 0.25]
    ids = []
    for i, vl in enumerate(losses):
        ids.append(repo.commit(small(i), run="alpha", metrics={"val_loss": vl}, monitor="val_loss", mode="min",
                               epoch=i, tags=["v1"] if i == 1 else ()).commit_id)
    accs = [0.1, 0.9, 0.5]
    beta = [repo.commit(small(100 + i), run="beta", metrics={"acc": a}, monitor="acc", mode="max").commit_id
            for i, a in enumerate(accs)]

    for cid in ids + beta:
        assert repo.resolve(cid) == cid
        assert repo.resolve(cid.upper()) == cid
        assert repo.resolve(f"coral://{cid}") == cid
    unique_len = next(n for n in range(4, 33) if len({c[:n] for c in ids + beta}) == len(ids + beta))
    for cid in ids + beta:
        assert repo.resolve(cid[:unique_len]) == cid
        assert repo.resolve(f"coral://{cid[:unique_len]}") == cid
    assert repo.resolve("v1") == ids[1]
    assert repo.resolve("tags/v1") == ids[1]
    assert repo.resolve("coral://v1") == ids[1]
    assert repo.resolve("latest") == beta[-1]
    assert repo.resolve("alpha") == ids[-1]
    assert repo.resolve("alpha/latest") == ids[-1]
    assert repo.resolve("alpha/best") == ids[1]  # min val_loss
    assert repo.resolve("beta/best") == beta[1]  # max acc
    assert repo.resolve("best") == beta[1]  # best of the latest run
    assert repo.resolve("runs/alpha/latest") == ids[-1]

    # log: newest first, per run and overall
    assert [c.id for c in repo.log("alpha")] == ids[::-1]
    assert [c.id for c in repo.log("beta")] == beta[::-1]
    assert [c.id for c in repo.log()] == (ids + beta)[::-1]
    assert [c.epoch for c in repo.log("alpha")] == [3, 2, 1, 0]
    assert repo.log("alpha")[0].metrics == {"val_loss": 0.25}

    repo.tag("release", "alpha/best")
    assert repo.resolve("release") == ids[1]
    assert_same(small(1), repo.load("release"))
    assert repo.delete_ref("tags/release")
    with pytest.raises(RefNotFoundError):
        repo.resolve("release")


def test_best_in_single_run_repository(tmp_path):
    repo = Repository(tmp_path / "repo")
    with pytest.raises(RefNotFoundError, match="monitor"):
        repo.resolve("best")
    ids = [repo.commit(small(i), metrics={"val_loss": v}, monitor="val_loss", mode="min").commit_id
           for i, v in enumerate([0.9, 0.4, float("nan"), 0.6])]
    assert repo.resolve("best") == ids[1]
    assert_same(small(1), coral_torch.load("best", repo=repo))
    assert_same(small(1), coral_torch.load("coral://best", repo=repo))


def test_unknown_and_short_refs_raise_clear_errors(tmp_path):
    repo = Repository(tmp_path / "repo")
    with pytest.raises(RefNotFoundError, match="no commits yet"):
        repo.resolve("latest")
    cid = repo.commit(small(0), run="myrun", tags=["good"]).commit_id
    with pytest.raises(RefNotFoundError) as e:
        repo.resolve("nonexistent")
    msg = str(e.value)
    assert "nonexistent" in msg and "myrun" in msg and "good" in msg and "at least 4" in msg
    with pytest.raises(RefNotFoundError):
        repo.resolve(cid[:3])  # too short to be a prefix
    other = "0000" if not cid.startswith("0000") else "ffff"
    with pytest.raises(RefNotFoundError, match="no commit matches"):
        repo.resolve(other + "abcdef")
    with pytest.raises(RefNotFoundError):
        repo.resolve("")
    with pytest.raises(KeyError):  # RefNotFoundError is a KeyError, like a dict lookup
        repo.resolve("nope")
    with pytest.raises(NotARepositoryError):
        Repository(tmp_path / "missing", create=False)


def test_ambiguous_prefix_lists_candidates(tmp_path):
    repo = Repository(tmp_path / "repo")
    by_prefix: dict[str, str] = {}
    pair = None
    for i in range(3000):  # deterministic: the first 4-char collision among tiny commits
        cid = repo.commit({"i": i}).commit_id
        if cid[:4] in by_prefix:
            pair = (by_prefix[cid[:4]], cid)
            break
        by_prefix[cid[:4]] = cid
    assert pair is not None
    prefix = pair[0][:4]
    with pytest.raises(AmbiguousRefError) as e:
        repo.resolve(prefix)
    assert set(pair) <= set(e.value.candidates)
    assert pair[0][:12] in str(e.value) and pair[1][:12] in str(e.value)
    assert "ambiguous" in str(e.value)
    with pytest.raises(AmbiguousRefError):
        coral_torch.load(f"coral://{prefix}", repo=repo)
    common = len(os.path.commonprefix(pair))
    for cid in pair:
        assert repo.resolve(cid[: common + 1]) == cid
    assert repo.load(pair[1][: common + 1])["i"] == i


# ==================================================================================== 5. dedup
class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128))
        self.head = nn.Linear(128, 4)

    def forward(self, x):
        return self.head(self.backbone(x))


def test_frozen_backbone_is_stored_once(tmp_path):
    torch.manual_seed(0)
    model = Backbone()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    repo = Repository(tmp_path / "repo")
    backbone_names = [f"state_dict/{k}" for k in model.state_dict() if k.startswith("backbone")]
    head_names = [f"state_dict/{k}" for k in model.state_dict() if k.startswith("head")]
    head_bytes = sum(t.numel() * 4 for k, t in model.state_dict().items() if k.startswith("head"))
    stats = []
    expected = []
    for epoch in range(4):
        loss = model(torch.randn(8, 128)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        obj = {"epoch": epoch, "state_dict": model.state_dict()}
        expected.append(copy.deepcopy(obj))
        stats.append(repo.commit(obj, run="frozen"))
    first, *rest = stats
    assert first.new_full == len(backbone_names) + len(head_names)
    for s in rest:
        assert s.deduplicated == len(backbone_names)
        assert s.new_full + s.new_delta == len(head_names)
        assert s.written_bytes <= head_bytes + 1024
        hows = {n: how for n, _, how in repo.catalog.commit_objects(s.commit_id)}
        assert all(hows[n] == "dedup" for n in backbone_names)
        assert all(hows[n].split("/")[0] in ("full", "delta") for n in head_names)  # full/skipN: delta lost
    n_objects = repo.catalog.conn.execute("SELECT COUNT(*) FROM objects").fetchone()[0]
    assert n_objects == len(backbone_names) + 4 * len(head_names)

    # the same backbone in a second run, from a second Repository object: stored once
    torch.manual_seed(0)
    other = Backbone()
    other.head.reset_parameters()
    repo2 = Repository(tmp_path / "repo")
    s2 = repo2.commit({"epoch": 0, "state_dict": other.state_dict()}, run="finetune-2")
    assert s2.deduplicated >= len(backbone_names)
    assert s2.new_full == len(head_names)
    assert repo2.catalog.conn.execute("SELECT COUNT(*) FROM objects").fetchone()[0] == n_objects + len(head_names)
    for st, exp in zip(stats, expected):
        assert_same(exp, repo2.load(st.commit_id))


def test_identical_tensors_and_tied_weights_stored_once(tmp_path):
    repo = Repository(tmp_path / "repo")
    emb = nn.Embedding(64, 32)
    head = nn.Linear(32, 64, bias=False)
    head.weight = emb.weight
    sd = {"emb.weight": emb.weight.detach(), "head.weight": head.weight.detach(), "copy": emb.weight.detach().clone()}
    s = repo.commit(sd)
    assert s.tensors == 2 and s.new_full == 1 and s.deduplicated == 1
    assert s.written_bytes < 64 * 32 * 4 * 1.01
    back = repo.load(s.commit_id)
    assert back["emb.weight"] is back["head.weight"]
    assert back["copy"] is not back["emb.weight"] and torch.equal(back["copy"], back["emb.weight"])
    s2 = repo.commit({"again": emb.weight.detach().clone()}, run="other")
    assert s2.written_bytes == 0 and s2.deduplicated == 1


# ======================================================================================= 6. gc
def test_gc_removes_unreferenced_commits_keeps_delta_bases_and_reclaims_disk(tmp_path):
    repo = Repository(tmp_path / "repo", delta_config=DeltaConfig(max_chain_length=2))
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen)
    frozen = torch.randn(128, 128, generator=gen)
    ids, expected = [], []
    written = 0
    for epoch in range(6):
        w = w + 1e-4 * torch.randn(64, 256, generator=gen)
        obj = {"w": w.clone(), "frozen": frozen, "scratch": torch.randn(256, 256, generator=gen), "epoch": epoch}
        expected.append(copy.deepcopy(obj))
        st = repo.commit(obj, run="main", keep=False, tags=["keepme"] if epoch == 2 else ())
        ids.append(st.commit_id)
        written += st.written_bytes
        if epoch > 0 and epoch != 3:
            assert st.new_delta >= 1, "w should be stored as a delta"
    # moving runs/main/latest released every untagged commit at once, with its unique objects
    live = {ids[2], ids[5]}
    assert {c.id for c in repo.log()} == live
    chain = [object_of(repo, ids[e], "w") for e in (2, 5)]
    scratch_bytes = 256 * 256 * 4
    assert written - packs_bytes(repo) >= 3 * scratch_bytes  # 4 dead scratch tensors left the disk
    # every live object rebuilds (delta bases are never freed under a live delta); where the bases'
    # commits were gone, the live delta was stored whole instead, so its bases left the disk too
    listed = {h for c in live for _, h, _ in repo.catalog.commit_objects(c)}
    for o in chain:
        bases = repo.reader.chain(o.hash)
        assert all(repo.catalog.get_object(b.hash) is not None for b in bases)
        assert all(b.hash in listed for b in bases)
    for e in (2, 5):
        assert repo.catalog.get_object(object_of(repo, ids[e], "scratch").hash) is not None

    # a commit no ref ever named (head=False, keep=False) is only found by gc
    junk = repo.commit({"junk": torch.randn(300, 300, generator=gen)}, run="junk", keep=False, head=False).commit_id
    junk_pack = object_of(repo, junk, "junk").pack
    dry = repo.gc(dry_run=True)
    assert dry["dry_run"] and dry["commits_removed"] == 1
    assert len(repo.log()) == 3  # nothing changed
    before = packs_bytes(repo)
    stats = repo.gc()
    after = packs_bytes(repo)
    assert stats["commits_removed"] == 1 and stats["packs_removed"] == 1
    assert {c.id for c in repo.log()} == live
    assert repo.catalog.get_commit(junk) is None and repo.catalog.commit_objects(junk) == []
    assert not (repo.path / "packs" / junk_pack).exists()
    assert before - after >= 0.8 * 300 * 300 * 4
    assert stats["bytes_reclaimed"] == before - after
    # every remaining object lives in a pack that exists; no stray files
    packs = set(repo.catalog.packs())
    assert packs == {p.name for p in (repo.path / "packs").iterdir()}
    assert {r.pack for r in repo.catalog.all_objects()} <= packs

    for e in (2, 5):
        assert_same(expected[e], repo.load(ids[e]))
    report = repo.verify()
    assert report.ok and not report.orphan_files and report.objects_checked == len(repo.catalog.all_objects())
    repo.close()
    fresh = Repository(tmp_path / "repo", create=False)
    for e in (2, 5):
        assert_same(expected[e], fresh.load(ids[e]))
    again = fresh.gc()
    assert again["commits_removed"] == 0 and again["objects_removed"] == 0 and again["bytes_reclaimed"] == 0
    # the run continues after gc: deltas against the loaded latest
    obj = {"w": w + 1e-4, "frozen": frozen, "scratch": torch.zeros(2), "epoch": 6}
    st = fresh.commit(obj, run="main", keep=False)
    assert_same(obj, fresh.load(st.commit_id))
    assert fresh.verify().ok


def test_gc_removes_orphan_files_and_deleted_refs(tmp_path):
    repo = Repository(tmp_path / "repo")
    a = repo.commit(small(1), run="r").commit_id
    b = repo.commit(small(2), run="r").commit_id
    (repo.path / "packs" / ".tmp-20250101-000000-abcdef.h5").write_bytes(b"half written")
    (repo.path / "packs" / "20250101-000000-unknown.h5").write_bytes(b"\x89HDF\r\n" + b"\0" * 100)
    report = repo.verify()
    assert report.ok
    assert sorted(report.orphan_files) == [".tmp-20250101-000000-abcdef.h5", "20250101-000000-unknown.h5"]
    assert repo.delete_ref(f"keep/{a}")
    assert repo.catalog.get_commit(a) is None  # its last ref went: removed at once
    assert repo.gc()["orphan_files_kept"] == 2  # young: they may be a writer's, waiting to be published
    stats = repo.gc(orphan_grace_s=0)
    assert stats["orphan_files_removed"] == 2 and stats["commits_removed"] == 0
    assert repo.verify().orphan_files == []
    assert [c.id for c in repo.log()] == [b]
    assert_same(small(2), repo.load(b))


def test_colliding_tensor_names_survive_gc(tmp_path):
    """Keys 1 and "1" (or "a/b" and ["a"]["b"]) flatten to the same tensor name; gc must still keep
    both tensors of a live commit."""
    repo = Repository(tmp_path / "repo")
    gen = torch.Generator().manual_seed(0)
    obj = {1: torch.randn(100, generator=gen), "1": torch.randn(100, generator=gen),
           "a/b": torch.randn(10, generator=gen), "a": {"b": torch.randn(10, generator=gen)}}
    cid = repo.commit(obj, keep=False).commit_id  # live through runs/default/latest only
    repo.commit(small(0), run="other", keep=False, head=False)
    repo.gc()
    assert_same(obj, repo.load(cid))
    assert repo.verify().ok


# ========================================================================== threads in one process
def test_gc_and_commits_from_threads_of_one_process_do_not_race(tmp_path):
    """A background save thread and a gc on another thread share one Repository: the write lock must
    exclude threads too (otherwise gc deletes the pack a commit is writing)."""
    repo = Repository(tmp_path / "repo", workers=2)
    errors: list[BaseException] = []
    done = threading.Event()
    saved: list[tuple[str, dict]] = []

    def writer():
        try:
            gen = torch.Generator().manual_seed(1)
            for i in range(40):
                obj = {"w": torch.randn(20000, generator=gen), "i": i}
                saved.append((repo.commit(obj, run="bg").commit_id, obj))
                repo.commit({"tmp": torch.randn(4000, generator=gen)}, run="scratch", keep=False, head=False)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    def collector():
        try:
            while not done.is_set():
                repo.gc()
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=collector)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for cid, obj in saved:
        assert_same(obj, repo.load(cid))
    assert repo.verify().ok


def test_repository_created_concurrently_or_after_interrupted_creation(tmp_path):
    (tmp_path / "half" / "packs").mkdir(parents=True)  # a creation killed before the catalog existed
    Repository(tmp_path / "half").commit(small(0))
    errors = []

    def make(p):
        try:
            Repository(p).close()
        except Exception as exc:
            errors.append(exc)

    for trial in range(5):
        threads = [threading.Thread(target=make, args=(tmp_path / f"r{trial}",)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "data.txt").write_text("user file")
    with pytest.raises(NotARepositoryError, match="refusing"):
        Repository(tmp_path / "busy")


# ==================================================================== 8. processes and the lock
LOCK_HOLDER = """
import sys, time
from coral_torch import Repository
r = Repository(sys.argv[1])
r.lock.acquire()
print("LOCKED", flush=True)
time.sleep(float(sys.argv[2]))
r.lock.release()
print("RELEASED", flush=True)
"""

WRITER = """
import sys, torch
from coral_torch import Repository
path, run, seed, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
r = Repository(path, lock_timeout=120)
print("READY", flush=True)
for i in range(n):
    g = torch.Generator().manual_seed(seed * 1000 + i)
    st = r.commit({"w": torch.randn(200, 200, generator=g), "i": i, "run": run}, run=run)
    print("DONE", st.commit_id, i, flush=True)
"""


def writer_obj(run: str, seed: int, i: int) -> dict:
    """What WRITER commits as its ``i``-th checkpoint."""
    g = torch.Generator().manual_seed(seed * 1000 + i)
    return {"w": torch.randn(200, 200, generator=g), "i": i, "run": run}


def test_second_writer_gets_locked_error_naming_the_pid_while_readers_work(tmp_path):
    repo = Repository(tmp_path / "repo")
    obj = {"w": torch.randn(100, 100), "n": 1}
    cid = repo.commit(obj).commit_id
    child = py_child(LOCK_HOLDER, str(repo.path), "60")
    try:
        wait_line(child, "LOCKED")
        impatient = Repository(tmp_path / "repo", lock_timeout=0.3)
        t0 = time.monotonic()
        with pytest.raises(RepositoryLockedError) as e:
            impatient.commit({"x": torch.ones(3)})
        assert time.monotonic() - t0 < 5
        assert f"locked by PID {child.pid}" in str(e.value)
        assert e.value.pid == child.pid
        with pytest.raises(RepositoryLockedError, match=f"PID {child.pid}"):
            impatient.gc()
        # readers do not need the lock
        reader = Repository(tmp_path / "repo", create=False)
        assert_same(obj, reader.load(cid))
        assert_same(obj, coral_torch.load(cid[:8], repo=tmp_path / "repo"))
        assert [c.id for c in reader.log()] == [cid]
        assert reader.verify().ok
    finally:
        child.kill()
        child.wait()
    # SIGKILL released the lock: the next writer goes through at once
    t0 = time.monotonic()
    st = impatient.commit({"x": torch.ones(3)})
    assert time.monotonic() - t0 < 5
    assert_same({"x": torch.ones(3)}, repo.load(st.commit_id))


def test_writers_wait_for_each_other_and_readers_read_meanwhile(tmp_path):
    repo = Repository(tmp_path / "repo")
    base = {"w": torch.randn(300, 300), "tag": "base"}
    base_id = repo.commit(base, run="base").commit_id

    # 1. a writer waits for the lock and then succeeds
    holder = py_child(LOCK_HOLDER, str(repo.path), "1.5")
    wait_line(holder, "LOCKED")
    patient = Repository(tmp_path / "repo", lock_timeout=60)
    t0 = time.monotonic()
    st = patient.commit({"after": torch.arange(5)})
    waited = time.monotonic() - t0
    assert holder.wait(30) == 0
    assert waited > 0.5, f"the commit did not wait for the lock holder ({waited:.2f}s)"
    assert torch.equal(repo.load(st.commit_id)["after"], torch.arange(5))

    # 2. two writer processes in parallel, a reader in this process meanwhile
    writers = [py_child(WRITER, str(repo.path), f"w{k}", str(k), "6") for k in range(2)]
    loads = 0
    try:
        while any(w.poll() is None for w in writers):
            assert_same(base, repo.load(base_id))  # never blocked, never sees a partial commit
            newest = repo.log()[0]
            if newest.run != "base" and newest.run.startswith("w"):
                i = repo.load(newest.id)["i"]
                assert_same(writer_obj(newest.run, int(newest.run[1:]), i), repo.load(newest.id))
            loads += 1
        outs = [w.communicate(timeout=60) for w in writers]
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
    for w, (out, err) in zip(writers, outs):
        assert w.returncode == 0, err[-3000:]
        assert out.count("DONE") == 6
    assert loads > 0
    fresh = Repository(tmp_path / "repo", create=False)
    for k in range(2):
        log = fresh.log(f"w{k}")
        assert len(log) == 6
        for c, i in zip(log, range(5, -1, -1)):
            assert_same(writer_obj(f"w{k}", k, i), fresh.load(c.id))
        done_ids = [line.split()[1] for line in outs[k][0].splitlines() if line.startswith("DONE")]
        assert [c.id for c in log] == done_ids[::-1]
    assert fresh.verify().ok


# ================================================================================ 9. corruption
def _corruption_repo(tmp_path):
    """Run "main": w is a keyframe at epochs 0 and 2, a delta at 1 and 3 (max_chain_length=1);
    "clean" is an unrelated run."""
    repo = Repository(tmp_path / "repo", delta_config=DeltaConfig(max_chain_length=1))
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen)
    shared = torch.randn(32, 32, generator=gen)
    ids, expected = [], []
    for epoch in range(4):
        w = w + 1e-4 * torch.randn(64, 128, generator=gen)
        obj = {"w": w.clone(), "b": torch.randn(64, generator=gen), "shared": shared, "epoch": epoch}
        expected.append(copy.deepcopy(obj))
        st = repo.commit(obj, run="main")
        ids.append(st.commit_id)
    kinds = [object_of(repo, c, "w").kind for c in ids]
    assert kinds == ["full", "delta", "full", "delta"]
    clean_obj = {"c": torch.randn(50, generator=gen)}
    clean = repo.commit(clean_obj, run="clean").commit_id
    repo.close()
    return ids, expected, clean, clean_obj


def _flip_byte(pack: Path, group: str, key: str, at: float = 0.5) -> None:
    with h5py.File(pack, "r+") as f:
        ds = f[group][key]
        data = ds[()]
        i = int(len(data) * at)
        data[i] ^= 0x5A
        ds[...] = data


@pytest.mark.parametrize("group", ["weights", "deltas"])
def test_flipped_byte_is_detected_and_named(tmp_path, group):
    ids, expected, clean, clean_obj = _corruption_repo(tmp_path)
    repo = Repository(tmp_path / "repo", create=False)
    victim_epoch = 0 if group == "weights" else 1
    victim = object_of(repo, ids[victim_epoch], "w")
    assert victim.kind == ("full" if group == "weights" else "delta")
    repo.close()
    _flip_byte(tmp_path / "repo" / "packs" / victim.pack, group, victim.hash)

    repo = Repository(tmp_path / "repo", create=False)
    damaged = [0, 1] if group == "weights" else [1]  # epoch 1's w is a delta on epoch 0's
    for e in range(4):
        if e in damaged:
            with pytest.raises(CheckpointDamagedError) as exc:
                repo.load(ids[e])
            assert exc.value.tensors == ["w"]
            assert exc.value.commit == ids[e]
            assert "w" in str(exc.value) and ids[e][:10] in str(exc.value)
        else:
            assert_same(expected[e], repo.load(ids[e]))
    assert_same(clean_obj, repo.load(clean))
    with pytest.raises(CheckpointDamagedError):
        coral_torch.load(ids[damaged[0]], repo=repo)

    report = repo.verify()
    assert not report.ok
    assert victim.hash in report.damaged_objects
    if group == "weights":
        child = object_of(repo, ids[1], "w")
        assert child.hash in report.damaged_objects
        assert "delta base" in report.damaged_objects[child.hash]
    assert set(report.damaged_commits) == {ids[e] for e in damaged}
    assert all(names == ["w"] for names in report.damaged_commits.values())


def test_truncated_pack_is_detected_and_named(tmp_path):
    ids, expected, clean, clean_obj = _corruption_repo(tmp_path)
    repo = Repository(tmp_path / "repo", create=False)
    pack = object_of(repo, ids[2], "w").pack  # keyframe of epoch 2, base of epoch 3's delta
    in_pack = {r.hash for r in repo.catalog.all_objects() if r.pack == pack}
    # cut inside the first object's bytes, so every object of the pack loses bytes (the order of
    # objects in a pack depends on which encoder thread finishes first)
    cut = min(r.offset for r in repo.catalog.all_objects() if r.pack == pack) + 8
    repo.close()
    path = tmp_path / "repo" / "packs" / pack
    os.truncate(path, cut)

    repo = Repository(tmp_path / "repo", create=False)
    for e in (2, 3):
        with pytest.raises(CheckpointDamagedError) as exc:
            repo.load(ids[e])
        assert "w" in exc.value.tensors
        assert exc.value.commit == ids[e]
        assert all(n in str(exc.value) for n in exc.value.tensors)
    for e in (0, 1):
        assert_same(expected[e], repo.load(ids[e]))
    assert_same(clean_obj, repo.load(clean))
    report = repo.verify()
    assert not report.ok
    assert in_pack <= set(report.damaged_objects)
    assert object_of(repo, ids[3], "w").hash in report.damaged_objects  # via its delta base
    assert set(report.damaged_commits) == {ids[2], ids[3]}
    assert "w" in report.damaged_commits[ids[2]] and "b" in report.damaged_commits[ids[2]]
    assert "w" in report.damaged_commits[ids[3]]
    assert any("truncated" in why for why in report.damaged_objects.values())


def test_pack_whose_size_changed_is_reported_even_if_its_objects_read_fine(tmp_path):
    """Bytes appended to a published pack leave every object loadable (reads go by offset), but
    verify flags the pack's objects: the file is no longer what was written and fsynced."""
    ids, expected, clean, clean_obj = _corruption_repo(tmp_path)
    repo = Repository(tmp_path / "repo", create=False)
    pack = object_of(repo, ids[2], "w").pack
    rows = [r for r in repo.catalog.all_objects() if r.pack == pack]
    repo.close()
    with open(tmp_path / "repo" / "packs" / pack, "ab") as f:
        f.write(b"\0" * 16)
    repo = Repository(tmp_path / "repo", create=False)
    for e in range(4):
        assert_same(expected[e], repo.load(ids[e]))
    report = repo.verify()
    assert not report.ok and {r.hash for r in rows} <= set(report.damaged_objects)
    assert all("truncated or overwritten" in report.damaged_objects[r.hash] for r in rows)


def test_deleted_pack_is_reported_missing(tmp_path):
    ids, expected, clean, clean_obj = _corruption_repo(tmp_path)
    repo = Repository(tmp_path / "repo", create=False)
    pack = object_of(repo, clean, "c").pack
    (repo.path / "packs" / pack).unlink()
    report = repo.verify()
    assert report.missing_packs == [pack] and not report.ok
    assert list(report.damaged_commits) == [clean]
    with pytest.raises(CheckpointDamagedError, match="c"):
        repo.load(clean)
    assert_same(expected[3], repo.load(ids[3]))


# ============================================================================ 10. unsafe pickle
class _Exploit:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecExploit:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_value_needing_code_execution_is_refused_by_default(tmp_path):
    marker = tmp_path / "pwned"
    repo = Repository(tmp_path / "repo")
    obj = {"w": torch.ones(3), "payload": _Exploit(marker)}
    cid = repo.commit(obj).commit_id
    assert not marker.exists()  # saving ran nothing
    manifest = repo.catalog.get_commit(cid).manifest
    blob = manifest["skeleton"]["v"][1]
    assert blob["t"] == "blob"
    for load in (lambda: repo.load(cid), lambda: coral_torch.load(cid, repo=repo),
                 lambda: Repository(tmp_path / "repo").load(cid, weights_only=True)):
        with pytest.raises(UnsafeCheckpointError, match="weights_only=False"):
            load()
        assert not marker.exists()
    # the test is meaningful: an explicit opt-in does run the pickle
    repo.load(cid, weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["torch.save", "raw pickle"])
@pytest.mark.parametrize("exploit", [_Exploit, _ExecExploit])
def test_crafted_manifest_with_malicious_blob_is_refused(tmp_path, fmt, exploit):
    marker = tmp_path / "pwned"
    repo = Repository(tmp_path / "repo")
    repo.commit({"w": torch.ones(2)})
    if fmt == "torch.save":
        buf = io.BytesIO()
        torch.save(exploit(marker), buf)
        data = buf.getvalue()
    else:
        data = pickle.dumps(exploit(marker))
    manifest = {
        "format": 1,
        "skeleton": {"t": "dict", "k": ["ok", "evil"],
                     "v": [1, {"t": "blob", "type": "builtins.dict", "v": base64.b64encode(data).decode()}]},
        "tensors": [],
    }
    # a crafted catalog can carry a correct commit id (xxh3 is no signature): the blob must still
    # never run; a wrong id is refused even earlier (CatalogDamagedError, see the fuzz tests)
    manifest_json = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    evil_id = xxhash.xxh3_128(manifest_json.encode()).hexdigest()
    con = sqlite3.connect(repo.path / "catalog.sqlite")
    with con:
        con.execute(
            "INSERT INTO commits(id, parent, run, epoch, step, time, message, metrics, manifest, lossy,"
            " logical_bytes, new_bytes, info) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (evil_id, None, "default", None, None, time.time(), "", "{}", manifest_json, 0, 0, 0, "{}"),
        )
        con.execute("INSERT INTO refs(name, commit_id, updated) VALUES (?,?,?)", ("tags/evil", evil_id, time.time()))
    con.close()
    for ref in ("evil", evil_id, evil_id[:8], "latest"):
        with pytest.raises(UnsafeCheckpointError):
            repo.load(ref)
        with pytest.raises(UnsafeCheckpointError):
            coral_torch.load(f"coral://{ref}", repo=tmp_path / "repo")
    assert not marker.exists()


def test_sibling_deltas_on_one_base_load_and_verify(tmp_path):
    """Two runs branch from one checkpoint: both children are XOR deltas on the same base object.
    Loading and verifying rebuild each child into its own buffer (deltas are applied in place),
    so neither sibling sees the other's bytes."""
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(64, 257, generator=g), "b": torch.randn(300, generator=g)}
    kids = []
    for k in range(2):
        kid = {n: t.clone() for n, t in base.items()}
        kid["w"].view(-1)[k::7] += 1e-3 * (k + 1)  # small changes: deltas pay
        kids.append(kid)
    repo = Repository(tmp_path / "repo", delta_config=DeltaConfig(max_chain_length=4))
    root = repo.commit(base, run="a").commit_id
    ids = [repo.commit(kids[0], run="a").commit_id]
    repo.load(root)  # the base is the delta reference again
    ids.append(repo.commit(kids[1], run="b", parent=root).commit_id)
    w_objs = [object_of(repo, cid, "w") for cid in ids]
    assert [o.kind for o in w_objs] == ["delta", "delta"]
    assert w_objs[0].base == w_objs[1].base == object_of(repo, root, "w").hash
    repo.close()

    repo = Repository(tmp_path / "repo", create=False)
    report = repo.verify()
    assert report.ok and report.objects_checked >= 4, report
    for cid, kid in zip(ids, kids):
        assert_same(kid, repo.load(cid))
    assert_same(base, repo.load(root))
    # one request naming a delta chain twice (the same tensor under two names) is built once each
    both = repo.materialize([w_objs[0].hash, w_objs[1].hash, w_objs[0].hash])
    assert both[w_objs[0].hash].tobytes() == kids[0]["w"].numpy().tobytes()
    assert both[w_objs[1].hash].tobytes() == kids[1]["w"].numpy().tobytes()


def test_sampled_probe_skips_deltas_that_cannot_pay_and_keeps_those_that_do(tmp_path):
    """Large tensors: an AdamW-moment-like tensor (every bit changes) is stored whole without a
    whole-tensor delta attempt; a fine-tune-like weight (low mantissa bits change) becomes a delta."""
    g = torch.Generator().manual_seed(5)
    n = (5 << 20) // 4  # 5 MiB of fp32: above the probe threshold
    moment = torch.randn(n, generator=g)
    weight = torch.randn(n, generator=g)
    repo = Repository(tmp_path / "repo")
    repo.commit({"m": moment, "w": weight}, run="r")
    attempts = []
    real = coral_torch.format.codec.encode_blob

    def spy(raw, itemsize, level=1, *, base=None, **kw):
        if base is not None and raw.size == n * 4:
            attempts.append(raw.size)
        return real(raw, itemsize, level, base=base, **kw)

    moment2 = torch.randn(n, generator=g)
    weight2 = weight.clone()
    weight2.view(torch.int32).add_(torch.randint(-8, 8, (n,), generator=g, dtype=torch.int32))
    coral_torch.format.codec.encode_blob = spy
    try:
        cid = repo.commit({"m": moment2, "w": weight2}, run="r").commit_id
    finally:
        coral_torch.format.codec.encode_blob = real
    assert object_of(repo, cid, "m").kind == "full"
    assert object_of(repo, cid, "w").kind == "delta"
    assert attempts == [n * 4]  # only w was delta-encoded in full
    assert_same({"m": moment2, "w": weight2}, repo.load(cid))


def test_parent_refs(tmp_path):
    repo = Repository(tmp_path / "repo")
    ids = [repo.commit({"w": torch.full((4,), float(i))}, run="r", tags=[f"e{i}"]).commit_id for i in range(4)]
    assert repo.resolve("latest") == ids[3]
    assert repo.resolve("latest~1") == repo.resolve("latest^") == repo.resolve("r/latest~") == ids[2]
    assert repo.resolve("latest~3") == repo.resolve("e2~2") == repo.resolve("latest^^~1") == ids[0]
    assert repo.resolve(f"coral://{ids[3][:8]}~0") == ids[3]
    with pytest.raises(RefNotFoundError, match="only 3 ancestor"):
        repo.resolve("latest~4")


@pytest.mark.parametrize("edit", ["huge shape", "huge length", "offset past end", "nbytes lies"])
def test_crafted_sizes_are_refused_before_allocating(tmp_path, edit):
    from coral_torch.errors import CheckpointDamagedError, CoralError

    repo = Repository(tmp_path / "repo")
    cid = repo.commit({"w": torch.randn(64, 64)}, run="r").commit_id
    h = repo.catalog.get_commit(cid).manifest["tensors"][0][1]
    repo.close()
    con = sqlite3.connect(tmp_path / "repo" / "catalog.sqlite")
    with con:
        if edit == "huge shape":  # 10^12 float32 elements: 3.6 TiB
            con.execute("UPDATE objects SET shape=?, nbytes=? WHERE hash=?", (json.dumps([10**12]), 4 * 10**12, h))
        elif edit == "huge length":  # a 16 GiB blob in a small pack
            con.execute("UPDATE objects SET length=? WHERE hash=?", (16 << 30, h))
        elif edit == "offset past end":
            con.execute("UPDATE objects SET offset=offset+1000000 WHERE hash=?", (h,))
        else:
            con.execute("UPDATE objects SET nbytes=nbytes*2 WHERE hash=?", (h,))
    con.close()
    repo = Repository(tmp_path / "repo", create=False)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointDamagedError) as info:
        repo.load(cid)
    assert time.perf_counter() - t0 < 1.0  # refused, not attempted
    assert isinstance(info.value, CoralError) and "\n" not in str(info.value)
    assert not repo.verify().ok


def test_a_fresh_process_stores_what_a_long_lived_one_stores(tmp_path):
    """Delta bases and the 'delta lost lately' countdown come from the repository, not from RAM:
    continuing a run with a new Repository object stores the same objects, the same way."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(256, 256, generator=gen)
    states = []
    for epoch in range(6):
        w = w + 1e-4 * torch.randn(256, 256, generator=gen)
        noise = torch.randn(256, 256, generator=gen)  # changes completely: its delta always loses
        states.append({"w": w.clone(), "noise": noise, "epoch": epoch})

    def run(path, reopen: bool):
        repo = Repository(path)
        out = []
        for obj in states:
            if reopen:
                repo.close()
                repo = Repository(path, create=False)
            cid = repo.commit(obj, run="r").commit_id
            out.append(sorted((n, how) for n, _, how in repo.catalog.commit_objects(cid)))
        assert repo.verify().ok
        return out

    long_lived = run(tmp_path / "a", reopen=False)
    fresh = run(tmp_path / "b", reopen=True)
    assert long_lived == fresh
    hows = [dict(c) for c in long_lived]
    assert [h["w"] for h in hows] == ["full", "delta", "delta", "full", "delta", "delta"]
    assert hows[1]["noise"] == "full/skip3" and hows[2]["noise"] == "full/skip2"


def test_a_damaged_parent_does_not_stop_the_next_save(tmp_path):
    repo = Repository(tmp_path / "repo")
    w = torch.randn(128, 128)
    first = repo.commit({"w": w}, run="r").commit_id
    repo.close()
    con = sqlite3.connect(tmp_path / "repo" / "catalog.sqlite")
    with con:  # the parent's manifest no longer hashes to its id
        con.execute("UPDATE commits SET manifest=replace(manifest, '\"w\"', '\"v\"') WHERE id=?", (first,))
    con.close()
    repo = Repository(tmp_path / "repo", create=False)
    st = repo.commit({"w": w + 1e-4}, run="r")
    assert st.new_full == 1 and st.new_delta == 0  # stored whole, not against the damaged parent
    assert torch.equal(repo.load(st.commit_id)["w"], w + 1e-4)
    report = repo.verify()
    assert not report.ok and first in report.damaged_manifests and st.commit_id not in report.damaged_manifests


def test_lossy_deltas_only_behind_allow_lossy_marked_shown_and_warned(tmp_path, capsys):
    import warnings

    from coral_torch.cli import main as cli
    from coral_torch.errors import CoralError
    from coral_torch.format.delta import DeltaConfig, DeltaType
    from coral_torch.repository.repository import LossyCheckpointWarning

    with pytest.raises(CoralError):
        DeltaConfig(delta_type=DeltaType.INT8_QUANTIZED)  # lossy needs allow_lossy=True
    repo = Repository(tmp_path / "repo", delta_config=DeltaConfig(delta_type=DeltaType.INT8_QUANTIZED,
                                                                   allow_lossy=True))
    torch.manual_seed(0)
    w = torch.randn(256, 64)
    a = repo.commit({"w": w}, run="q").commit_id
    b = repo.commit({"w": w + 1e-3 * torch.randn(256, 64)}, run="q").commit_id
    assert not repo.get_commit(a).lossy and repo.get_commit(b).lossy
    assert [how for _, _, how in repo.catalog.commit_objects(b)] == ["delta"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(repo.load(a)["w"], w)  # lossless: no warning
    with pytest.warns(LossyCheckpointWarning):
        back = repo.load(b)["w"]
    assert back.shape == w.shape and torch.allclose(back, w, atol=0.05)
    assert repo.verify().ok  # an approximation by design is not damage
    assert cli(["--repo", str(tmp_path / "repo"), "log"]) == 0
    assert "LOSSY" in capsys.readouterr().out


def test_a_commit_that_loses_a_race_with_gc_is_planned_again(tmp_path, monkeypatch):
    """Objects are planned and written without the lock; when what the plan deduplicated against
    is removed before the publish (here: the only commit holding it is released), the publish
    refuses (ConcurrentChangeError) and the commit is planned and written again."""
    repo = Repository(tmp_path / "repo")
    shared = torch.arange(4096, dtype=torch.float32)
    a = repo.commit({"w": shared.clone()}, run="a", keep=False).commit_id
    real = repo.write_objects
    calls = []

    def racing(*args, **kw):
        out = real(*args, **kw)
        calls.append(len(out.rows))
        if len(calls) == 1:
            assert repo.delete_ref("runs/a/latest")  # releases commit a and its object, now
            assert repo.catalog.get_commit(a) is None
        return out

    monkeypatch.setattr(repo, "write_objects", racing)
    b = repo.commit({"w": shared.clone(), "x": torch.ones(3)}, run="b")
    assert calls == [1, 2]  # first plan deduplicated "w"; the second wrote it again
    back = Repository(tmp_path / "repo").load(b.commit_id)
    assert torch.equal(back["w"], shared) and torch.equal(back["x"], torch.ones(3))
    assert repo.verify().ok
    assert not [p for p in (repo.path / "packs").iterdir() if p.name not in repo.catalog.packs()]


def test_manifest_format_is_checked_and_ids_are_stable():
    from coral_torch.errors import CatalogDamagedError, UnsupportedFormatError
    from coral_torch.format.manifest import Manifest, TensorEntry

    m = Manifest({"t": "tensor", "i": 0}, [TensorEntry("w", "ab" * 16, "float32", (2, 3))])
    text = m.to_json()
    assert text == ('{"format":1,"skeleton":{"i":0,"t":"tensor"},"tensors":[["w","' + "ab" * 16
                    + '","float32",[2,3],"cpu","tensor"]]}')  # what every existing commit id hashes
    assert Manifest.parse(text, m.commit_id()) == m
    with pytest.raises(CatalogDamagedError):
        Manifest.parse(text, "0" * 32)
    with pytest.raises(UnsupportedFormatError):
        Manifest.parse(text.replace('"format":1', '"format":99'))
    with pytest.raises(CatalogDamagedError):
        Manifest.parse(text.replace('[2,3]', '[2,-3]'))
    with pytest.raises(CatalogDamagedError):
        Manifest.parse(text.replace('"format":1', '"format":2'))  # sharded without a layout


def test_setting_delta_config_changes_what_the_next_commit_plans(tmp_path):
    from coral_torch.format.delta import DeltaConfig

    repo = Repository(tmp_path / "repo")
    w = torch.randn(100_000, generator=torch.Generator().manual_seed(0))

    def nudged(k):  # a sparse change: its XOR delta is far smaller than the tensor
        out = w.clone()
        out[::1000] += k
        return out

    repo.commit({"w": w}, run="r")
    repo.delta_config = DeltaConfig(max_chain_length=0)  # no deltas from now on
    assert repo.commit({"w": nudged(1)}, run="r").new_delta == 0
    repo.delta_config = DeltaConfig()
    assert repo.commit({"w": nudged(2)}, run="r").new_delta == 1
