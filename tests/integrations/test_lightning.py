"""Lightning integration, end to end: real `Trainer` runs on tiny models, real repositories.

Multi-process tests (fresh-process resume runs in the default set; kill-during-save and DDP are
marked slow) drive tests/_lightning_worker.py with ``sys.executable``.
"""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any, Optional

import pytest

pl = pytest.importorskip("lightning.pytorch")
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers

from _lightning_models import (  # noqa: E402
    TRAINER_DEFAULTS,
    TinyDataModule,
    TinyModel,
    diff,
    tiny_loaders,
    train_state,
)

import coral_torch  # noqa: E402
from coral_torch import Repository  # noqa: E402
from coral_torch.api import read_pointer  # noqa: E402
from coral_torch.callbacks import (  # noqa: E402
    CoralCheckpoint,
    CoralCheckpointError,
    CoralCheckpointIO,
    load_module_from_checkpoint,
)
from coral_torch.errors import CoralError  # noqa: E402

WORKER = Path(__file__).resolve().parents[1] / "_lightning_worker.py"
STEPS_PER_EPOCH = 8  # 256 samples / batch 32
# Epoch 0 is the best, then 2: top-2 keeps epochs 0 and 2 (by val_loss), never "the newest two".
VAL_SCHEDULE = [0.1, 0.5, 0.3, 0.4]

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning",  # Lightning's "does not have many workers" etc.
    "ignore::DeprecationWarning",
    "ignore:.*LeafSpec",
)


# ------------------------------------------------------------------------------------ helpers
def make_trainer(**kw: Any) -> "pl.Trainer":
    return pl.Trainer(**{**TRAINER_DEFAULTS, **kw})


def fit_tiny(repo: Any, max_epochs: int, *, ckpt: Optional[str] = None, model_kw: Optional[dict] = None,
             trainer_kw: Optional[dict] = None, seed: int = 1, **cb_kw: Any):
    """Train TinyModel with a CoralCheckpoint on ``repo``; returns (model, trainer, callback)."""
    pl.seed_everything(seed, verbose=False)
    model = TinyModel(**(model_kw or {}))
    cb = CoralCheckpoint(repo=repo, **cb_kw)
    trainer = make_trainer(max_epochs=max_epochs, callbacks=[cb], **(trainer_kw or {}))
    trainer.fit(model, *tiny_loaders(), ckpt_path=ckpt)
    return model, trainer, cb


def run_worker(args: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(WORKER), json.dumps(args)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


def commits_by_epoch(repo: Repository, run: Optional[str] = None) -> dict[int, str]:
    return {c.epoch: c.id for c in repo.log(run)}


def fresh(path: Path) -> Repository:
    """A new Repository object (not the process-wide one the callback used)."""
    return Repository(path, create=False)


class StartRecorder(Callback):
    def __init__(self) -> None:
        self.start: Optional[tuple[int, int]] = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = (trainer.current_epoch, trainer.global_step)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """4 epochs without interruption: the reference every exact resume must reproduce."""
    root = tmp_path_factory.mktemp("straight")
    model, trainer, cb = fit_tiny(root / ".coral", 4, monitor="val_loss", run="exp",
                                  model_kw={"val_schedule": VAL_SCHEDULE})
    assert len(cb.history) == 4
    return train_state(model, trainer)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> tuple[Path, dict[int, str]]:
    """A repository holding epochs 0 and 1 of run "exp"; tests copy it before resuming into it."""
    root = tmp_path_factory.mktemp("two")
    _, trainer, cb = fit_tiny(root / ".coral", 2, monitor="val_loss", run="exp",
                              model_kw={"val_schedule": VAL_SCHEDULE})
    repo = fresh(root / ".coral")
    by_epoch = commits_by_epoch(repo, "exp")
    assert sorted(by_epoch) == [0, 1] and cb.last_commit == by_epoch[1]
    repo.close()
    return root / ".coral", by_epoch


def copy_repo(src: Path, dst_root: Path) -> Path:
    dst = dst_root / ".coral"
    # the WAL travels with the catalog; the shared-memory index is rebuilt from it on open
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lock", "*-shm"))
    return dst


# =============================================================================== 1. exact resume
def test_exact_resume_from_hash_in_fresh_process(tmp_path, straight, two_epochs):
    src, by_epoch = two_epochs
    repo_path = copy_repo(src, tmp_path)
    cid = by_epoch[1]
    out = tmp_path / "final.pt"
    proc = run_worker({"mode": "resume", "root": str(tmp_path), "repo": str(repo_path), "max_epochs": 4,
                       "ckpt": f"coral://{cid[:10]}", "out": str(out), "model": {"val_schedule": VAL_SCHEDULE}})
    assert "DONE" in proc.stdout
    resumed = torch.load(out, weights_only=True)

    # the state really holds what must survive: BatchNorm buffers incl. the 0-d counter, AdamW steps
    sd = straight["state_dict"]
    assert sd["net.1.num_batches_tracked"].dim() == 0 and int(sd["net.1.num_batches_tracked"]) == 4 * STEPS_PER_EPOCH
    assert "net.1.running_var" in sd
    opt_state = straight["optimizers"][0]["state"]
    assert opt_state and all(float(s["step"]) == 4 * STEPS_PER_EPOCH for s in opt_state.values())
    assert straight["schedulers"][0]["last_epoch"] == 4
    assert diff(resumed, straight) == []

    # the resumed run continued run "exp" from that commit in the same repository
    repo = fresh(repo_path)
    log = repo.log("exp")
    assert [c.epoch for c in log] == [3, 2, 1, 0]
    assert log[1].parent == cid
    assert all(c.run == "exp" for c in log)


@pytest.mark.parametrize("ref", ["coral://exp/latest", "coral://latest", "coral://best"])
def test_exact_resume_from_named_ref(tmp_path, straight, two_epochs, ref):
    src, by_epoch = two_epochs
    repo_path = copy_repo(src, tmp_path)
    # "best" follows val_loss: epoch 0 (0.1) beats epoch 1 (0.5), so it resumes one epoch earlier
    expected = by_epoch[0] if ref.endswith("best") else by_epoch[1]
    assert fresh(repo_path).resolve(ref) == expected
    rec = StartRecorder()
    pl.seed_everything(123, verbose=False)  # overwritten by the RNG state in the checkpoint
    model = TinyModel(val_schedule=VAL_SCHEDULE)
    cb = CoralCheckpoint(repo=repo_path, monitor="val_loss")
    trainer = make_trainer(max_epochs=4, callbacks=[cb, rec])
    trainer.fit(model, *tiny_loaders(), ckpt_path=ref)
    start_epoch = 1 if ref.endswith("best") else 2
    assert rec.start == (start_epoch, start_epoch * STEPS_PER_EPOCH)
    assert diff(train_state(model, trainer), straight) == []
    assert cb.run == "exp"  # the resumed run continues


# ======================================================================== 2. CoralCheckpointIO
def test_checkpoint_io_with_model_checkpoint(tmp_path):
    repo_path, ckdir = tmp_path / "repo", tmp_path / "ckpts"
    mc = ModelCheckpoint(dirpath=ckdir, filename="{epoch}", save_top_k=2, monitor="val_loss", save_last=True)
    pl.seed_everything(1, verbose=False)
    model = TinyModel(val_schedule=VAL_SCHEDULE)
    trainer = make_trainer(max_epochs=4, plugins=[CoralCheckpointIO(repo_path)], callbacks=[mc])
    trainer.fit(model, *tiny_loaders())

    # pointer files where ModelCheckpoint wanted them; top-k kept epochs 0 and 2
    assert sorted(p.name for p in ckdir.iterdir()) == ["epoch=0.ckpt", "epoch=2.ckpt", "last.ckpt"]
    pointers = {}
    for p in ckdir.iterdir():
        assert p.stat().st_size < 1024
        cid, where = read_pointer(p)
        assert where.resolve() == repo_path.resolve()
        pointers[p.name] = cid
    assert mc.best_model_path == str(ckdir / "epoch=0.ckpt")

    repo = fresh(repo_path)
    files = repo.refs("files/")
    assert files == {f"files/ckpts/{name}": cid for name, cid in pointers.items()}
    # Lightning 2.6 refreshes last.ckpt only in epochs that saved a top-k checkpoint, so epoch 3
    # (val_loss 0.4, not top-2) saved nothing and last.ckpt is epoch 2. Top-k deletion removed
    # epoch 1's file and its ref: the repository dropped that commit at once, disk follows what is kept
    assert {c.epoch for c in repo.log()} == {0, 2}
    assert pointers["last.ckpt"] == pointers["epoch=2.ckpt"]
    live = set(repo.refs().values())
    assert {c.id for c in repo.log()} == live
    assert repo.gc(dry_run=True)["commits_removed"] == 0
    for cid in live:
        assert "state_dict" in repo.load(cid)
    assert repo.verify().ok

    # trainer.save_checkpoint -> pointer; coral_torch.load(prefix) == what Lightning dumped
    manual = tmp_path / "manual.ckpt"
    trainer.save_checkpoint(manual)
    dumped = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    cid, _ = read_pointer(manual)
    loaded = coral_torch.load(cid[:12], repo=repo_path)
    for key in ("epoch", "global_step", "state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks"):
        assert key in loaded, key
    assert diff(loaded, dumped) == []
    assert diff(coral_torch.load(manual), dumped) == []  # through the pointer file as well

    # resume from a pointer file path and from coral://<prefix>
    for ckpt, epoch in ((str(ckdir / "last.ckpt"), 3), (f"coral://{pointers['epoch=0.ckpt'][:8]}", 1)):
        rec = StartRecorder()
        m2 = TinyModel(val_schedule=VAL_SCHEDULE)
        t2 = make_trainer(max_epochs=epoch + 1, plugins=[CoralCheckpointIO(repo_path)], callbacks=[rec],
                          enable_checkpointing=False)
        t2.fit(m2, *tiny_loaders(), ckpt_path=ckpt)
        assert rec.start == (epoch, epoch * STEPS_PER_EPOCH), ckpt
        assert t2.global_step == (epoch + 1) * STEPS_PER_EPOCH


def test_coral_checkpoint_and_model_checkpoint_share_the_repository(tmp_path, monkeypatch):
    """CoralCheckpoint installs CoralCheckpointIO, so a ModelCheckpoint next to it commits into the
    same repository from the training thread while the callback's background save is in flight."""
    repo_path, ckdir = tmp_path / ".coral", tmp_path / "ckpts"
    repo = Repository(repo_path)
    calls: list[tuple[str, float, float]] = []
    real_commit, real_write = repo.commit, repo.writer.write_pack

    bg_in_commit, fg_waiting = threading.Event(), threading.Event()

    def timed_commit(*args, **kw):
        t0 = time.monotonic()
        bg = threading.current_thread().name.startswith("coral-save")
        if bg:
            bg_in_commit.set()
        elif bg_in_commit.is_set():  # a foreground save while a background commit is in flight
            fg_waiting.set()
        try:
            return real_commit(*args, **kw)
        finally:
            if bg:
                bg_in_commit.clear()
            calls.append((threading.current_thread().name, t0, time.monotonic()))

    writes: list[tuple[bool, float, float]] = []

    def slow_write(*args, **kw):
        # A background save holds the repository lock until a foreground save has started during
        # its commit (and is waiting for that lock), so the two certainly contend. If the trainer
        # got its save in before this commit began (a loaded machine starves the niced background
        # thread), the next epoch's foreground save is the one that contends; the assertions below
        # check that one did.
        bg = threading.current_thread().name.startswith("coral-save")
        t0 = time.monotonic()
        try:
            if bg and not fg_waiting.is_set() and fg_waiting.wait(60):
                time.sleep(0.2)
            return real_write(*args, **kw)
        finally:
            writes.append((bg, t0, time.monotonic()))

    monkeypatch.setattr(repo, "commit", timed_commit)
    monkeypatch.setattr(repo.writer, "write_pack", slow_write)
    cb = CoralCheckpoint(repo=repo, run="both")
    mc = ModelCheckpoint(dirpath=ckdir, filename="{epoch}", save_top_k=-1)
    pl.seed_everything(1, verbose=False)
    model = TinyModel()
    trainer = make_trainer(max_epochs=3, callbacks=[mc, cb])
    trainer.fit(model, *tiny_loaders())
    assert isinstance(trainer.strategy.checkpoint_io, CoralCheckpointIO)
    background = [c for c in calls if c[0].startswith("coral-save")]
    foreground = [c for c in calls if not c[0].startswith("coral-save")]
    assert len(background) == len(foreground) == 3
    # ModelCheckpoint's save of epoch N+1 ran while the callback's save of epoch N was in flight
    assert any(b[1] < f[1] < b[2] for b in background for f in foreground), calls
    # both threads wrote packs (at once if they overlapped: packs need no lock since the plan ->
    # write -> publish split); only the publishing transactions are serialised, and everything
    # both published is intact
    assert {bg for bg, _, _ in writes} == {True, False}
    assert Repository(repo_path).verify().ok
    repo = fresh(repo_path)
    files = sorted(p.name for p in ckdir.iterdir())
    assert files == ["epoch=0.ckpt", "epoch=1.ckpt", "epoch=2.ckpt"]
    pointed = []
    for name in files:
        cid, where = read_pointer(ckdir / name)
        assert where.resolve() == repo_path.resolve()
        assert repo.load(cid)["epoch"] == int(name[6])
        pointed.append(cid)
    ours = [h["commit"] for h in cb.history]
    assert [repo.load(c)["epoch"] for c in ours] == [0, 1, 2]
    # The two differ only where the callback's own state (its last commit) was still in flight when
    # ModelCheckpoint dumped; equal checkpoints are one commit, stored once.
    assert 3 <= len(repo.log()) <= 6 and set(ours) | set(pointed) == {c.id for c in repo.log()}
    for a, b in zip(ours, pointed):
        assert diff(repo.load(a)["state_dict"], repo.load(b)["state_dict"]) == []
    assert repo.refs("runs/both/latest") == {"runs/both/latest": ours[-1]}
    assert set(repo.refs("runs/both/keep/").values()) == set(ours)
    assert repo.verify().ok


def test_load_module_from_checkpoint(tmp_path):
    repo_path = tmp_path / "repo"
    pl.seed_everything(1, verbose=False)
    model = TinyModel(lr=3e-3, hidden=16)
    trainer = make_trainer(max_epochs=1, plugins=[CoralCheckpointIO(repo_path)], enable_checkpointing=False)
    trainer.fit(model, *tiny_loaders())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    cid, _ = read_pointer(tmp_path / "m.ckpt")

    for ref in (cid[:10], f"coral://{cid}"):
        m2 = load_module_from_checkpoint(TinyModel, ref, repo=repo_path)
        assert isinstance(m2, TinyModel)
        assert m2.hparams.lr == 3e-3 and m2.hparams.hidden == 16  # built from saved hyper-parameters
        assert diff(m2.state_dict(), model.state_dict()) == []
    m3 = load_module_from_checkpoint(TinyModel, tmp_path / "m.ckpt", lr=0.5, map_location="cpu")
    assert m3.hparams.lr == 0.5 and m3.hparams.hidden == 16  # kwargs override
    assert diff(m3.state_dict(), model.state_dict()) == []
    # the datamodule path goes through the same helper
    assert isinstance(load_module_from_checkpoint(TinyDataModule, cid[:10], repo=repo_path), TinyDataModule)
    # strict loading is the default: a module of another shape is refused
    with pytest.raises(RuntimeError):
        load_module_from_checkpoint(TinyModel, cid[:10], repo=repo_path, hidden=8)


# ========================================================================== 3. precision, compile
def test_bf16_mixed_precision(tmp_path):
    model, trainer, cb = fit_tiny(tmp_path / ".coral", 2, trainer_kw={"precision": "bf16-mixed"})
    saved = coral_torch.load(cb.last_commit, repo=tmp_path / ".coral")
    assert diff(saved["state_dict"], model.state_dict()) == []
    assert diff(saved["optimizer_states"][0], trainer.optimizers[0].state_dict()) == []
    rec = StartRecorder()
    t2 = make_trainer(max_epochs=3, precision="bf16-mixed", callbacks=[CoralCheckpoint(repo=tmp_path / ".coral"), rec])
    t2.fit(TinyModel(), *tiny_loaders(), ckpt_path=f"coral://{cb.last_commit[:8]}")
    assert rec.start == (2, 2 * STEPS_PER_EPOCH) and t2.global_step == 3 * STEPS_PER_EPOCH


def test_bfloat16_parameters_round_trip_exactly(tmp_path):
    pl.seed_everything(1, verbose=False)
    model = TinyModel().to(torch.bfloat16)
    cb = CoralCheckpoint(repo=tmp_path / ".coral")
    trainer = make_trainer(max_epochs=2, precision="bf16-true", callbacks=[cb])
    trainer.fit(model, *tiny_loaders())
    assert next(model.parameters()).dtype == torch.bfloat16
    saved = coral_torch.load(cb.last_commit, repo=tmp_path / ".coral")
    assert saved["state_dict"]["net.0.weight"].dtype == torch.bfloat16
    assert diff(saved["state_dict"], model.state_dict()) == []
    assert diff(saved["optimizer_states"][0], trainer.optimizers[0].state_dict()) == []
    m2 = load_module_from_checkpoint(TinyModel, cb.last_commit[:8], repo=tmp_path / ".coral").to(torch.bfloat16)
    assert diff(m2.state_dict(), model.state_dict()) == []


def test_torch_compiled_module_saves_and_resumes(tmp_path):
    torch._dynamo.reset()
    ref_model, ref_trainer, _ = fit_tiny(tmp_path / "a" / ".coral", 2, model_kw={"compile_net": True})
    model, trainer, cb = fit_tiny(tmp_path / "b" / ".coral", 1, model_kw={"compile_net": True})
    saved = coral_torch.load(cb.last_commit, repo=tmp_path / "b" / ".coral")
    assert any(k.startswith("net._orig_mod.") for k in saved["state_dict"])
    assert diff(saved["state_dict"], model.state_dict()) == []
    model2, trainer2, _ = fit_tiny(tmp_path / "b" / ".coral", 2, ckpt=f"coral://{cb.last_commit[:8]}", seed=7,
                                   model_kw={"compile_net": True})
    assert diff(train_state(model2, trainer2), train_state(ref_model, ref_trainer)) == []


# ============================================================================ 4. retention knobs
def test_save_top_k_keeps_refs_of_best_commits_only(tmp_path):
    model, trainer, cb = fit_tiny(tmp_path / ".coral", 4, run="k", monitor="val_loss", save_top_k=2,
                                  save_last=False, model_kw={"val_schedule": VAL_SCHEDULE})
    repo = fresh(tmp_path / ".coral")
    by_epoch = commits_by_epoch(repo)
    # epochs 1 and 3 fell out of the top 2: removed at once, their disk space with them
    assert sorted(by_epoch) == [0, 2]
    for epoch, cid in by_epoch.items():
        assert repo.get_commit(cid).metrics["val_loss"] == pytest.approx(VAL_SCHEDULE[epoch])
    assert [h["epoch"] for h in cb.history] == [0, 1, 2, 3]
    best_two = {by_epoch[0], by_epoch[2]}
    assert set(repo.refs().values()) == best_two
    assert "runs/k/latest" not in repo.refs()  # save_last=False
    assert repo.refs("runs/k/best") == {"runs/k/best": by_epoch[0]}
    assert set(cb.best_k) == best_two and cb.best_model_path == f"coral://{by_epoch[0]}"
    # Lightning's ckpt_path="best" goes through best_model_path and CoralCheckpointIO
    trainer.validate(model, tiny_loaders()[1], ckpt_path="best", verbose=False)
    assert trainer.ckpt_path == f"coral://{by_epoch[0]}"
    assert diff(model.state_dict(), repo.load(by_epoch[0])["state_dict"]) == []
    assert repo.gc()["commits_removed"] == 0
    assert {c.id for c in repo.log()} == best_two
    for cid in best_two:
        assert "optimizer_states" in repo.load(cid)
    assert repo.verify().ok


def test_save_top_k_all_keeps_every_commit(tmp_path):
    fit_tiny(tmp_path / ".coral", 3, run="all", monitor="val_loss", save_top_k=-1,
             model_kw={"val_schedule": VAL_SCHEDULE})
    repo = fresh(tmp_path / ".coral")
    ids = {c.id for c in repo.log()}
    assert len(ids) == 3 and set(repo.refs("runs/all/keep/").values()) == ids
    assert repo.gc()["commits_removed"] == 0


def _optimizer_hashes(repo: Repository, cid: str) -> set[str]:
    return {e[1] for e in repo.catalog.get_commit(cid).manifest["tensors"] if e[0].startswith("optimizer_states/")}


def test_keep_optimizer_last(tmp_path):
    _, _, cb = fit_tiny(tmp_path / ".coral", 3, run="ko", keep_optimizer="last")
    repo = fresh(tmp_path / ".coral")
    # the replaced full commits were removed with their optimizer state, no gc needed
    assert len(repo.log()) == 3 and repo.gc(dry_run=True)["commits_removed"] == 0
    newest = cb.last_commit
    kept = {c.epoch: c.id for c in repo.log()}
    assert sorted(kept) == [0, 1, 2] and kept[2] == newest
    assert repo.resolve("latest") == repo.resolve("ko/latest") == repo.resolve("coral://latest") == newest
    for epoch, cid in kept.items():
        ck = repo.load(cid)
        assert "state_dict" in ck and ck["epoch"] == epoch
        # every commit still resumes (param_groups kept); only the newest keeps per-parameter state
        assert [bool(o["state"]) for o in ck["optimizer_states"]] == [cid == newest], epoch
        assert ck["optimizer_states"][0]["param_groups"]
        assert bool(_optimizer_hashes(repo, cid)) == (cid == newest)
    assert repo.verify().ok


def test_keep_optimizer_last_keeps_best_complete(tmp_path):
    # val_loss 0.1, 0.5, 0.3, 0.4: epoch 0 stays best, so it keeps its optimizer state too
    _, _, cb = fit_tiny(tmp_path / ".coral", 4, run="kb", keep_optimizer="last", monitor="val_loss",
                        model_kw={"val_schedule": VAL_SCHEDULE})
    repo = fresh(tmp_path / ".coral")
    by_epoch = {c.epoch: c.id for c in repo.log()}
    assert repo.resolve("best") == by_epoch[0] and repo.resolve("latest") == by_epoch[3]
    full = {e for e, c in by_epoch.items() if _optimizer_hashes(repo, c)}
    assert full == {0, 3}


def test_keep_optimizer_none(tmp_path):
    fit_tiny(tmp_path / ".coral", 2, keep_optimizer="none")
    repo = fresh(tmp_path / ".coral")
    assert len(repo.log()) == 2
    for c in repo.log():
        ck = repo.load(c.id)
        assert "state_dict" in ck and "lr_schedulers" in ck
        assert [o["state"] for o in ck["optimizer_states"]] == [{}]  # param_groups only: resumable
        assert not _optimizer_hashes(repo, c.id)


def _four_vs_two_plus_two(tmp_path: Path, worker_args: dict) -> tuple[dict, dict]:
    """Train 4 epochs straight in one worker process, and 2 epochs then (a fresh process, resuming
    from coral://latest) 2 more in another repository; returns both final train states."""
    runs = {"straight": ("a", 4, None), "first": ("b", 2, None), "resumed": ("b", 4, "coral://latest")}
    for out, (root, epochs, ckpt) in runs.items():
        (tmp_path / root).mkdir(exist_ok=True)
        args = {**worker_args, "root": str(tmp_path / root), "repo": str(tmp_path / root / ".coral"),
                "max_epochs": epochs, "out": str(tmp_path / f"{out}.pt")}
        run_worker({**args, "ckpt": ckpt} if ckpt else args)
    return (torch.load(tmp_path / "straight.pt", weights_only=True),
            torch.load(tmp_path / "resumed.pt", weights_only=True))


@pytest.mark.slow
@pytest.mark.parametrize("keep_optimizer, optimizer", [("last", "adamw"), ("none", "sgd")])
def test_resume_from_latest_after_retention_rewrites_is_exact(tmp_path, keep_optimizer, optimizer):
    """2 epochs, then a fresh process resumes from coral://latest for 2 more: equal to 4 straight.
    "none" keeps no per-parameter state, so only a stateless optimizer (SGD) can resume exactly."""
    model_kw = {"val_schedule": VAL_SCHEDULE, "optimizer": optimizer}
    cb_kw = {"keep_optimizer": keep_optimizer}
    straight, resumed = _four_vs_two_plus_two(
        tmp_path, {"mode": "resume", "model": model_kw, "callback": cb_kw, "run": "r"})
    assert resumed["global_step"] == 4 * STEPS_PER_EPOCH
    assert diff(resumed, straight) == []


@pytest.mark.slow
def test_resume_restores_the_users_dataloader_generator(tmp_path):
    """DataLoader(shuffle=True, generator=torch.Generator().manual_seed(1)): Lightning does not save
    that generator, so without the callback's help 2+2 epochs would shuffle differently from 4."""
    straight, resumed = _four_vs_two_plus_two(
        tmp_path, {"mode": "resume", "model": {"val_schedule": VAL_SCHEDULE}, "loader_seed": 1, "run": "g"})
    assert diff(resumed, straight) == []
    # the loader's generator state is in the checkpoint (Lightning itself does not save it)
    repo = fresh(tmp_path / "b" / ".coral")
    latest = repo.load("g/latest", weights_only=True)
    states = [v for k, v in latest["callbacks"].items() if k.startswith("CoralCheckpoint")]
    assert states and len(states[0]["loader_rng"]) == 1


def test_every_n_train_steps(tmp_path):
    _, _, cb = fit_tiny(tmp_path / ".coral", 2, every_n_train_steps=5)
    repo = fresh(tmp_path / ".coral")
    assert sorted(c.step for c in repo.log()) == [5, 10, 15]
    assert sorted(repo.load(c.id)["global_step"] for c in repo.log()) == [5, 10, 15]


def test_save_weights_only(tmp_path):
    model, _, cb = fit_tiny(tmp_path / ".coral", 2, save_weights_only=True)
    ck = coral_torch.load(cb.last_commit, repo=tmp_path / ".coral")
    assert "optimizer_states" not in ck and "callbacks" not in ck and "lr_schedulers" not in ck
    assert diff(ck["state_dict"], model.state_dict()) == []
    m2 = load_module_from_checkpoint(TinyModel, cb.last_commit, repo=tmp_path / ".coral")
    assert diff(m2.state_dict(), model.state_dict()) == []


# ==================================================================================== 5. async
def test_background_error_surfaces_on_training_thread(tmp_path, monkeypatch):
    repo = Repository(tmp_path / ".coral")
    real_commit = repo.commit
    calls: list[str] = []

    def failing_once(*args, **kw):
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            raise OSError("disk on fire")
        return real_commit(*args, **kw)

    monkeypatch.setattr(repo, "commit", failing_once)
    pl.seed_everything(1, verbose=False)
    cb = CoralCheckpoint(repo=repo)
    trainer = make_trainer(max_epochs=3, callbacks=[cb])
    with pytest.raises(CoralCheckpointError, match="disk on fire") as info:
        trainer.fit(TinyModel(), *tiny_loaders())
    assert isinstance(info.value.__cause__, OSError)
    assert calls[0].startswith("coral-save")  # it failed in the background ...
    assert trainer.global_step < 3 * STEPS_PER_EPOCH  # ... and stopped training at the next hook
    assert repo.log() == []


def test_train_end_flushes_in_flight_save(tmp_path, monkeypatch):
    repo = Repository(tmp_path / ".coral")
    real_commit = repo.commit

    def slow_commit(*args, **kw):
        time.sleep(0.5)
        return real_commit(*args, **kw)

    monkeypatch.setattr(repo, "commit", slow_commit)
    cb = CoralCheckpoint(repo=repo, run="flush")
    pl.seed_everything(1, verbose=False)
    trainer = make_trainer(max_epochs=2, callbacks=[cb])
    trainer.fit(TinyModel(), *tiny_loaders())
    # no waiting here: fit returned only after the last save was committed
    log = fresh(tmp_path / ".coral").log()
    assert [c.epoch for c in log] == [1, 0] and log[0].id == cb.last_commit
    assert len(cb.history) == 2 and cb.history[-1]["commit"] == cb.last_commit
    assert all(h["background_s"] >= 0.5 for h in cb.history)
    assert cb.history[0]["stall_s"] < 0.5  # the first save did not wait for its commit (later ones
    # may wait for the previous save: at most one is in flight)


def test_waiting_training_thread_helps_finish_the_save(tmp_path, monkeypatch):
    """A save still running when training ends is finished by the training thread too (at its
    priority), not only by the low-priority background thread; the commit is the same."""
    repo = Repository(tmp_path / ".coral")
    real_encode = repo.writer._encode_one
    threads: list[str] = []

    def slow_in_background(*args, **kw):
        name = threading.current_thread().name
        threads.append(name)
        if name.startswith("coral-save"):
            time.sleep(0.05)  # a starved background thread
        return real_encode(*args, **kw)

    monkeypatch.setattr(repo.writer, "_encode_one", slow_in_background)
    real_commit = repo.commit
    commit_kw: list[dict] = []
    monkeypatch.setattr(repo, "commit", lambda *a, **kw: commit_kw.append(kw) or real_commit(*a, **kw))
    cb = CoralCheckpoint(repo=repo, run="help")
    pl.seed_everything(1, verbose=False)
    model = TinyModel()
    trainer = make_trainer(max_epochs=1, callbacks=[cb])
    trainer.fit(model, *tiny_loaders())
    assert "MainThread" in threads and any(t.startswith("coral-save") for t in threads)
    assert cb.history[-1]["helped_items"] == threads.count("MainThread") > 0
    assert all(kw["direct_io"] for kw in commit_kw)  # background saves write around the page cache
    assert fresh(tmp_path / ".coral").verify().ok
    loaded = coral_torch.load(cb.last_commit, repo=tmp_path / ".coral")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["state_dict"][k], v), k


@pytest.mark.parametrize("async_save", [True, False])
def test_commit_stats_are_logged(tmp_path, async_save):
    logger = CSVLogger(tmp_path / "logs", name="lg")
    model, trainer, cb = fit_tiny(None, 2, async_save=async_save,
                                  trainer_kw={"logger": logger, "default_root_dir": str(tmp_path)})
    assert cb.run == "version_0"  # run named after the logger's version
    assert cb.repo.path == tmp_path / ".coral"  # default repository: <default_root_dir>/.coral
    assert [c.epoch for c in fresh(tmp_path / ".coral").log("version_0")] == [1, 0]
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    keys = ("coral/bytes_written", "coral/logical_bytes", "coral/ratio", "coral/stall_s", "coral/background_s")
    for k in keys:
        assert k in rows[0], k
    stat_rows = [r for r in rows if r["coral/bytes_written"]]
    assert len(stat_rows) == 2
    for r in stat_rows:
        assert float(r["coral/logical_bytes"]) > 0 and 0 < float(r["coral/ratio"]) <= 1.5
        assert float(r["coral/stall_s"]) >= 0 and float(r["coral/background_s"]) > 0


# ======================================================================= 6. kill during a save
@pytest.mark.slow
def test_kill_during_async_save_leaves_repository_consistent(tmp_path):
    repo_path = tmp_path / ".coral"
    args = {"mode": "kill", "root": str(tmp_path), "repo": str(repo_path), "max_epochs": 50, "delay": 0.1}
    err = open(tmp_path / "worker.err", "w")
    proc = subprocess.Popen([sys.executable, str(WORKER), json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=err, text=True)
    committed: list[str] = []
    saving = 0
    deadline = time.monotonic() + 90
    try:
        for line in proc.stdout:
            assert time.monotonic() < deadline, "worker too slow"
            if line.startswith("COMMITTED"):
                committed.append(line.split()[1])
            elif line.startswith("SAVING"):
                saving += 1
                if saving == 3:  # third save in flight (two committed): kill mid-pack-write
                    while not list((repo_path / "packs").glob(".tmp-*")) and time.monotonic() < deadline:
                        time.sleep(0.01)
                    time.sleep(0.1)  # some objects are in the temporary pack already
                    proc.send_signal(signal.SIGKILL)
                    break
    finally:
        proc.kill()
        proc.wait()
        err.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "worker.err").read_text()[-4000:]
    assert len(committed) == 2

    repo = Repository(repo_path, create=False)
    report = repo.verify()
    assert report.ok, report
    # the kill landed while the pack was being written: its temporary file is an orphan, nothing more
    assert [f for f in report.orphan_files if f.startswith(".tmp-")], report
    ids = [c.id for c in repo.log()]
    assert set(committed) <= set(ids)
    assert len(ids) == 2, "the killed save must not be visible"
    for cid in ids:
        ck = repo.load(cid)
        assert "optimizer_states" in ck and ck["state_dict"]
    assert all(cid in ids for cid in repo.refs().values())
    repo.gc(orphan_grace_s=0)  # removes the killed writer's temporary pack, if it left one
    assert not [p for p in (repo_path / "packs").iterdir() if p.name.startswith(".tmp")]
    last_epoch = repo.get_commit(committed[-1]).epoch
    repo.close()

    # the previous commit resumes in a fresh process
    args = {"mode": "kill", "root": str(tmp_path), "repo": str(repo_path), "max_epochs": last_epoch + 2,
            "ckpt": f"coral://{committed[-1][:12]}"}
    out = run_worker(args).stdout
    assert f"RESUMED {last_epoch + 1} " in out
    assert f"DONE {last_epoch + 2} " in out
    assert fresh(repo_path).verify().ok


# ========================================================================== 7. DDP and sharding
@pytest.mark.slow
def test_ddp_rank_zero_writes_and_resume_on_all_ranks(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    repo_path = tmp_path / "repo"
    base = {"mode": "ddp", "root": str(work), "repo": str(repo_path)}
    run_worker({**base, "max_epochs": 2, "out": str(tmp_path / "first")}, timeout=180)
    reports = [json.loads((tmp_path / "first" / f"rank{r}.json").read_text()) for r in (0, 1)]
    r0, r1 = reports
    assert r0["world_size"] == r1["world_size"] == 2
    assert not r0["repo_is_none"] and r0["commits"] == 2
    assert r1["repo_is_none"] and r1["commits"] == 0 and r1["last_commit"] is None
    assert r0["checkpoint_io"] == r1["checkpoint_io"] == "CoralCheckpointIO"
    assert r0["weight_sum"] == r1["weight_sum"]  # DDP kept the replicas in sync
    # exactly one repository, exactly one commit per epoch
    catalogs = sorted(p.parent for p in tmp_path.rglob("catalog.sqlite"))
    assert catalogs == [repo_path]
    repo = fresh(repo_path)
    by_epoch = commits_by_epoch(repo)
    assert sorted(by_epoch) == [0, 1] and by_epoch[1] == r0["last_commit"]
    repo.close()

    run_worker({**base, "max_epochs": 3, "ckpt": f"coral://{by_epoch[1][:10]}", "out": str(tmp_path / "second")},
               timeout=180)
    reports = [json.loads((tmp_path / "second" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in reports:  # both ranks resumed at epoch 2 and finished it
        assert r["epoch"] == 3 and r["global_step"] == reports[0]["global_step"] > 0
    assert reports[0]["commits"] == 1 and reports[1]["commits"] == 0
    assert reports[0]["weight_sum"] == reports[1]["weight_sum"]
    repo = fresh(repo_path)
    assert sorted(c.epoch for c in repo.log()) == [0, 1, 2]
    assert repo.get_commit(reports[0]["last_commit"]).parent == by_epoch[1]


def test_sharded_strategies_are_refused(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    cb = CoralCheckpoint(repo=tmp_path / ".coral")
    # FSDP needs a GPU accelerator to build a Trainer, but set-up only looks at the strategy object
    trainer = types.SimpleNamespace(strategy=FSDPStrategy(), default_root_dir=str(tmp_path), is_global_zero=True)
    with pytest.raises(CoralError, match="FSDPStrategy"):
        cb.setup(trainer, TinyModel(), "fit")
    DeepSpeedStrategy = type("DeepSpeedStrategy", (), {})
    trainer.strategy = DeepSpeedStrategy()
    with pytest.raises(CoralError, match="DeepSpeedStrategy"):
        cb.setup(trainer, TinyModel(), "fit")
    assert cb.repo is None and not (tmp_path / ".coral").exists()  # refused before touching anything


@pytest.mark.slow
def test_model_parallel_run_destroys_the_process_group_it_launched_at_exit(tmp_path):
    """Lightning never destroys a gloo group: alive at interpreter exit, its threads occasionally
    aborted a finished run ("terminate called without an active exception"). The strategy destroys
    the group it launched at exit (not at teardown: the sharded module still needs it after fit)."""
    run_worker({"mode": "mp_exit", "root": str(tmp_path), "repo": str(tmp_path / "repo"), "max_epochs": 2,
                "out": str(tmp_path / "out")}, timeout=240)
    reports = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["child_returncodes"] == [0]  # rank 1 (Lightning's child process) exited cleanly too
    for r in reports:
        assert r["last_commit"] == reports[0]["last_commit"] is not None
        assert r["dist_initialized_after_fit"]  # still usable after fit: full_tensor() gathered
        assert r["full_tensor_after_fit"] == reports[0]["full_tensor_after_fit"]
        assert [name for name, daemon in r["threads_after_fit"] if not daemon] == ["MainThread"]
        assert not r["dist_initialized_at_exit"]


@pytest.mark.slow
def test_model_parallel_leaves_a_process_group_the_user_initialized_alone(tmp_path):
    run_worker({"mode": "mp_exit", "root": str(tmp_path), "repo": str(tmp_path / "repo"), "max_epochs": 1,
                "out": str(tmp_path / "out"), "devices": 1, "user_group": True}, timeout=240)
    report = json.loads((tmp_path / "out" / "rank0.json").read_text())
    assert report["last_commit"] is not None
    assert report["dist_initialized_at_exit"]  # the script's group: the script destroys it
