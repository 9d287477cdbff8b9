"""`coral_torch.save` / `coral_torch.load` as drop-ins for `torch.save` / `torch.load`."""

from __future__ import annotations

import collections
import json
import os

import pytest
import torch
from conftest import assert_same  # noqa: E402

import coral_torch
from coral_torch import Repository
from coral_torch.api import read_pointer
from coral_torch.errors import CheckpointNotFoundError, RefNotFoundError


def model_state(seed: int, scale: float = 0.0) -> collections.OrderedDict:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 8))
    if scale:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * scale)
    return m.state_dict()


# ---------------------------------------------------------------------------------- pointers
def test_save_writes_pointer_and_repository_next_to_it(tmp_path):
    sd = model_state(0)
    path = tmp_path / "ckpts" / "epoch3.pt"
    cid = coral_torch.save(sd, str(path))
    assert path.is_file() and path.stat().st_size < 1024
    data = json.loads(path.read_text())
    assert data["commit"] == cid
    assert (tmp_path / "ckpts" / ".coral" / "catalog.sqlite").is_file()
    assert list((tmp_path / "ckpts" / ".coral" / "packs").glob("*.h5"))
    pointed_cid, pointed_repo = read_pointer(path)
    assert pointed_cid == cid and pointed_repo.resolve() == (tmp_path / "ckpts" / ".coral").resolve()
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]

    back = coral_torch.load(str(path))
    assert_same(sd, back)
    back = coral_torch.load(path)  # PathLike
    assert_same(sd, back)


def test_pointer_survives_moving_the_directory(tmp_path):
    sd = model_state(1)
    coral_torch.save(sd, tmp_path / "a" / "ck.pt")
    os.rename(tmp_path / "a", tmp_path / "b")
    assert_same(sd, coral_torch.load(tmp_path / "b" / "ck.pt"))


def test_load_by_prefix_coral_url_tag_and_repo_forms(tmp_path):
    sd = model_state(2)
    path = tmp_path / "ckpts" / "epoch1.pt"
    cid = coral_torch.save(sd, path, tag="first")
    repo_dir = tmp_path / "ckpts" / ".coral"
    for ref in (cid, cid[:8], cid[:4], f"coral://{cid[:10]}", "coral://first", "first", "latest", "coral://latest"):
        assert_same(sd, coral_torch.load(ref, repo=repo_dir))  # repo as path
        assert_same(sd, coral_torch.load(ref, repo=str(repo_dir)))  # repo as str
    r = Repository(repo_dir, create=False)
    assert_same(sd, coral_torch.load(cid[:6], repo=r))  # repo as Repository
    assert_same(sd, coral_torch.load(f"coral://{cid[:6]}", repo=r))
    r.close()
    with pytest.raises(RefNotFoundError, match="no commit matches"):
        coral_torch.load("coral://ffffffffffff", repo=repo_dir)


def test_load_uses_coral_repo_env(tmp_path, monkeypatch):
    repo_dir = tmp_path / "envrepo"
    sd = model_state(3)
    cid = coral_torch.save(sd, repo=repo_dir)  # no file: kept by keep/<id>
    monkeypatch.setenv("CORAL_REPO", str(repo_dir))
    assert_same(sd, coral_torch.load(cid[:7]))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CORAL_REPO")
    with pytest.raises(CheckpointNotFoundError, match="neither a file nor a ref"):
        coral_torch.load("abcd1234")  # ./.coral does not exist: clear error, nothing created
    assert not (tmp_path / ".coral").exists()


def test_save_to_file_object_writes_a_pointer(tmp_path):
    import io

    sd = model_state(4)
    buf = io.BytesIO()
    cid = coral_torch.save(sd, buf, repo=tmp_path / "repo")
    data = json.loads(buf.getvalue())
    assert data["commit"] == cid
    assert_same(sd, coral_torch.load(cid, repo=tmp_path / "repo"))


def test_overwriting_a_pointer_reclaims_the_replaced_commit_at_once(tmp_path):
    path = tmp_path / "ckpts" / "last.pt"
    gen = torch.Generator().manual_seed(5)
    first = {"w": torch.randn(256, 256, generator=gen), "only_in_first": torch.randn(512, 512, generator=gen)}
    second = {"w": torch.randn(256, 256, generator=gen)}
    c1 = coral_torch.save(first, path)
    r = coral_torch.open_repository(tmp_path / "ckpts" / ".coral")
    unique_first = r.catalog.commit_objects(c1)
    packs_dir = r.path / "packs"
    first_packs = {p.name for p in packs_dir.iterdir()}
    before = sum(p.stat().st_size for p in packs_dir.iterdir())
    c2 = coral_torch.save(second, path)
    assert c1 != c2
    assert read_pointer(path)[0] == c2
    assert not first_packs & {p.name for p in packs_dir.iterdir()}  # nothing of the first is live
    after = sum(p.stat().st_size for p in packs_dir.iterdir())
    assert r.catalog.get_commit(c1) is None  # no manual gc: the overwrite released it
    only = [h for n, h, _ in unique_first if n == "only_in_first"][0]
    assert r.catalog.get_object(only) is None
    assert after < before - 512 * 512 * 4 * 0.9 + 256 * 256 * 4  # the big unique tensor's bytes are gone
    with pytest.raises(RefNotFoundError):
        r.load(c1)
    assert_same(second, coral_torch.load(path))
    assert r.gc(dry_run=True)["commits_removed"] == 0
    assert r.verify().ok


def test_a_tagged_commit_survives_overwriting_its_file(tmp_path):
    path = tmp_path / "last.pt"
    first = {"w": torch.randn(64, 64)}
    c1 = coral_torch.save(first, path, tag="keepme")
    coral_torch.save({"w": torch.randn(64, 64)}, path)
    assert_same(first, coral_torch.load("keepme", repo=tmp_path / ".coral"))
    assert_same(first, coral_torch.load(c1[:8], repo=tmp_path / ".coral"))


def test_load_plain_torch_save_file_falls_back_to_torch_load(tmp_path):
    sd = model_state(6)
    path = tmp_path / "plain.pt"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    back = coral_torch.load(path)
    assert back["epoch"] == 3
    assert_same(sd, back["state_dict"])
    back = coral_torch.load(str(path), map_location="cpu", weights_only=True)
    assert_same(sd, back["state_dict"])


def test_save_load_cycle_with_deltas_through_api(tmp_path):
    saved = []
    for epoch in range(6):
        sd = model_state(7, scale=1e-4 * epoch)
        coral_torch.save({"epoch": epoch, "state_dict": sd}, tmp_path / f"epoch{epoch}.pt")
        saved.append({"epoch": epoch, "state_dict": sd})
    for epoch, obj in enumerate(saved):
        assert_same(obj, coral_torch.load(tmp_path / f"epoch{epoch}.pt"))


# ---------------------------------------------------------------------- Lightning-like checkpoint
def lightning_checkpoint(seed: int, epoch: int) -> dict:
    from lightning.fabric.utilities.data import AttributeDict

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Flatten(), torch.nn.Linear(24, 16),
                                torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(epoch + 1):
        x = torch.randint(0, 20, (6, 3))
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    monitor_key = "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, " \
                  "'every_n_epochs': 1, 'train_time_interval': None}"
    return {
        "epoch": epoch,
        "global_step": 10 * (epoch + 1),
        "pytorch-lightning_version": "2.6.6",
        "state_dict": model.state_dict(),
        "loops": {
            "fit_loop": {
                "state_dict": {},
                "epoch_loop.state_dict": {"_batches_that_stepped": 10 * (epoch + 1)},
                "epoch_progress": {"total": {"ready": epoch + 1, "completed": epoch}, "current": {"ready": 1}},
            }
        },
        "callbacks": {
            monitor_key: {
                "monitor": "val_loss",
                "best_model_score": torch.tensor(0.25 - epoch / 100),
                "best_model_path": f"/ckpts/epoch={epoch}.ckpt",
                "current_score": torch.tensor(0.3),
                "dirpath": "/ckpts",
                "best_k_models": {f"/ckpts/epoch={epoch}.ckpt": torch.tensor(0.25)},
                "kth_best_model_path": "",
                "kth_value": torch.tensor(float("inf")),
                "last_model_path": "",
            },
            "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}": {
                "wait_count": 0, "stopped_epoch": 0, "best_score": torch.tensor(0.25), "patience": 3,
            },
        },
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [sched.state_dict()],
        "hparams_name": "kwargs",
        "hyper_parameters": AttributeDict(lr=1e-3, hidden=16, betas=(0.9, 0.999), name="tiny",
                                          layers=[24, 16, 2], dropout=None, scheduler={"T_max": 10}),
    }


def test_lightning_like_checkpoint_roundtrips_exactly(tmp_path):
    from lightning.fabric.utilities.data import AttributeDict

    for epoch in range(3):
        ckpt = lightning_checkpoint(0, epoch)
        path = tmp_path / f"epoch={epoch}-step={ckpt['global_step']}.ckpt"
        coral_torch.save(ckpt, path)
        back = coral_torch.load(path)
        assert_same(ckpt, back)
        assert type(back["hyper_parameters"]) is AttributeDict
        assert back["hyper_parameters"].lr == 1e-3
        state = back["optimizer_states"][0]["state"]
        assert list(state) == list(ckpt["optimizer_states"][0]["state"])  # int keys kept
        assert all(isinstance(k, int) for k in state)
        assert isinstance(back["optimizer_states"][0]["param_groups"][0]["betas"], tuple)
        # the optimizer accepts it back
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Flatten(), torch.nn.Linear(24, 16),
                                    torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 2))
        model.load_state_dict(back["state_dict"])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        opt.load_state_dict(back["optimizer_states"][0])
        r = coral_torch.open_repository(tmp_path / ".coral")
        row = r.get_commit("latest")
        assert row.epoch == epoch and row.step == ckpt["global_step"]


def test_deleted_and_recreated_repository_directory_is_reopened(tmp_path):
    """The process-wide instance must not outlive its directory: after ``rm -rf ckpts`` a new
    save into the same path creates a fresh repository instead of failing on a vanished lock."""
    import shutil

    sd = {"w": torch.arange(10.0)}
    first = coral_torch.save(sd, tmp_path / "ckpts" / "a.pt")
    old = coral_torch.open_repository(tmp_path / "ckpts" / ".coral")
    shutil.rmtree(tmp_path / "ckpts")
    assert old.stale
    second = coral_torch.save({"w": torch.arange(10.0) + 1}, tmp_path / "ckpts" / "a.pt")
    repo = coral_torch.open_repository(tmp_path / "ckpts" / ".coral")
    assert repo is not old and not repo.stale
    assert [c.id for c in repo.log()] == [second] and second != first
    assert torch.equal(coral_torch.load(tmp_path / "ckpts" / "a.pt")["w"], torch.arange(10.0) + 1)


# ------------------------------------------------------------------------ torch.load parity
def test_load_takes_what_torch_load_takes(tmp_path, monkeypatch):
    import io
    import pickle

    sd = model_state(7)
    monkeypatch.chdir(tmp_path)
    # a buffer coral_torch.save wrote: it holds a pointer, and load follows it
    buf = io.BytesIO()
    cid = coral_torch.save(sd, buf, pickle.DEFAULT_PROTOCOL)  # torch.save's positional pickle_module slot
    buf.seek(0)
    assert_same(sd, coral_torch.load(buf))
    # a plain torch.save stream in a buffer, and a plain file opened "rb"
    plain = io.BytesIO()
    torch.save(sd, plain)
    plain.seek(0)
    assert_same(sd, coral_torch.load(plain, "cpu"))  # positional map_location
    torch.save(sd, tmp_path / "plain.pt")
    with open(tmp_path / "plain.pt", "rb") as fh:
        assert_same(sd, coral_torch.load(fh, map_location="cpu", weights_only=True))
    assert_same(sd, coral_torch.load(tmp_path / "plain.pt", None, pickle, mmap=True, weights_only=None))
    assert_same(sd, coral_torch.load(str(tmp_path / "plain.pt"), map_location=lambda s, loc: s))
    # a coral pointer file opened "rb", and torch.save's extra parameters accepted by save
    coral_torch.save(sd, tmp_path / "c.pt", pickle, 2, _use_new_zipfile_serialization=False)
    with open(tmp_path / "c.pt", "rb") as fh:
        assert_same(sd, coral_torch.load(fh, map_location=torch.device("cpu")))
    assert_same(sd, coral_torch.load(tmp_path / "c.pt", mmap=True))  # mmap: no effect on commits
    # refs stay keyword-free strings; the repository is a keyword
    assert_same(sd, coral_torch.load(cid[:8]))


@pytest.mark.slow
def test_overwriting_last_pt_ten_epochs_costs_at_most_3x_one_torch_save_file(tmp_path):
    """A small CNN with Adam saved to the same file every epoch: the repository (packs, catalog,
    WAL) stays within ~3x one torch.save file, with no manual gc."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3), torch.nn.ReLU(),
                            torch.nn.Flatten(), torch.nn.Linear(32 * 24 * 24, 10))
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    repo_dir = tmp_path / ".coral"
    ratios = []
    for epoch in range(10):
        for _ in range(5):
            loss = m(torch.randn(16, 1, 28, 28)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        ck = {"model": m.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch}
        torch.save(ck, tmp_path / "plain.pt")
        coral_torch.save(ck, tmp_path / "last.pt")
        disk = sum(f.stat().st_size for f in repo_dir.rglob("*") if f.is_file())
        ratios.append(disk / (tmp_path / "plain.pt").stat().st_size)
    print("repository / one torch.save file, per epoch:", " ".join(f"{r:.2f}" for r in ratios))
    assert max(ratios) <= 3.0, ratios
    repo = coral_torch.open_repository(repo_dir)
    assert len(repo.log()) == 1 and repo.gc(dry_run=True)["commits_removed"] == 0
    assert_same(ck, coral_torch.load(tmp_path / "last.pt"))
