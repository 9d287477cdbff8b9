"""Subprocess worker for tests/integrations/test_lightning.py: ``python _lightning_worker.py '<json args>'``.

Modes:
  resume  train TinyModel with CoralCheckpoint (optionally from ``ckpt``) and torch.save the final
          weights/optimizer/scheduler state to ``out``.
  kill    train BigModel with an asynchronous CoralCheckpoint whose commits are slowed down; print
          "SAVING <epoch>" when a commit starts and "COMMITTED <id>" when it is done, so the parent
          can SIGKILL the process mid-save. With ``ckpt`` it resumes and prints "RESUMED <epoch> <step>";
          with ``report_waits`` it prints "WAITING <epoch>" when the training thread waits for a save.
  ddp     TinyModel under DDP (gloo, 2 CPU processes; Lightning re-launches this script for rank 1);
          every rank writes ``<out>/rank<N>.json`` describing what its callback did.
  mp_exit FSDP2 under CoralModelParallelStrategy (gloo, ``devices`` CPU processes, default 2), nothing
          shut down by the script: every rank writes ``<out>/rank<N>.json`` from an atexit hook that
          runs after the library's, with the threads and process group alive at interpreter exit.
          With ``user_group`` the script initializes the (1-rank) process group itself, before the
          Trainer, and destroys it in that hook.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from _lightning_models import TRAINER_DEFAULTS, BigModel, TinyModel, big_loader, tiny_loaders, train_state  # noqa: E402

from coral_torch import Repository  # noqa: E402
from coral_torch.callbacks import CoralCheckpoint  # noqa: E402


def mode_resume(a: dict) -> None:
    pl.seed_everything(1, verbose=False)
    model = TinyModel(**a.get("model", {}))
    train, val = tiny_loaders(generator_seed=a.get("loader_seed"))
    cb = CoralCheckpoint(repo=a["repo"], monitor="val_loss", run=a.get("run"), **a.get("callback", {}))
    trainer = pl.Trainer(max_epochs=a["max_epochs"], callbacks=[cb], default_root_dir=a["root"], **TRAINER_DEFAULTS)
    trainer.fit(model, train, val, ckpt_path=a.get("ckpt"))
    torch.save(train_state(model, trainer), a["out"])
    print("DONE", cb.last_commit, flush=True)


def mode_kill(a: dict) -> None:
    from coral_torch.repository.write import ObjectWriter

    pl.seed_everything(2, verbose=False)
    repo = Repository(a["repo"])
    delay = float(a.get("delay", 0.0))
    if delay:
        encode = ObjectWriter._encode_one

        def slow_encode(self, *args, **kw):  # makes every commit take long enough to be killed in
            time.sleep(delay)
            return encode(self, *args, **kw)

        ObjectWriter._encode_one = slow_encode
    commit = repo.commit

    def noisy_commit(obj, **kw):
        print("SAVING", kw.get("epoch"), flush=True)
        stats = commit(obj, **kw)
        print("COMMITTED", stats.commit_id, kw.get("epoch"), flush=True)
        return stats

    repo.commit = noisy_commit
    model = BigModel()
    cb = CoralCheckpoint(repo=repo, run="big", async_save=True)
    if a.get("report_waits"):  # say when the training thread starts waiting for a save in flight
        barrier = cb._sync_barrier

        def reporting_barrier(trainer, *, wait):
            if wait and cb._committer is not None and cb._committer.busy:
                print("WAITING", trainer.current_epoch, flush=True)
            return barrier(trainer, wait=wait)

        cb._sync_barrier = reporting_barrier

    class Report(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            print("RESUMED", trainer.current_epoch, trainer.global_step, flush=True)

    trainer = pl.Trainer(max_epochs=a["max_epochs"], callbacks=[cb, Report()], default_root_dir=a["root"],
                         **TRAINER_DEFAULTS)
    trainer.fit(model, big_loader(), ckpt_path=a.get("ckpt"))
    print("DONE", trainer.current_epoch, trainer.global_step, cb.last_commit, flush=True)


def mode_ddp(a: dict) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    pl.seed_everything(1, verbose=False)
    model = TinyModel()
    train, val = tiny_loaders()
    cb = CoralCheckpoint(repo=a["repo"], monitor="val_loss", run="ddp")
    trainer = pl.Trainer(
        max_epochs=a["max_epochs"], callbacks=[cb], default_root_dir=a["root"],
        strategy=DDPStrategy(process_group_backend="gloo"), devices=2,
        **TRAINER_DEFAULTS,
    )
    trainer.fit(model, train, val, ckpt_path=a.get("ckpt"))
    rank = trainer.global_rank
    report = {
        "rank": rank,
        "world_size": trainer.world_size,
        "repo_is_none": cb.repo is None,
        "commits": len(cb.history),
        "last_commit": cb.last_commit,
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "checkpoint_io": type(trainer.strategy.checkpoint_io).__name__,
        "weight_sum": float(sum(p.double().sum() for p in model.parameters())),
    }
    out = Path(a["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    # shut gloo down before the interpreter does: exiting with its threads alive occasionally
    # aborts the process ("terminate called without an active exception")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _native_threads() -> Optional[list[str]]:
    """Names of this process's OS threads (Linux), gloo's and the TCPStore's included."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    names = []
    for tid in tids:
        try:
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except OSError:
            pass
    return names


def mode_mp_exit(a: dict) -> None:
    import atexit
    import gc
    import threading

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, TensorDataset

    from coral_torch.callbacks import CoralModelParallelStrategy

    out = Path(a["out"])
    report: dict = {}
    procs: list = []  # rank 0: the launcher's child processes (never the trainer: it holds the model)

    def at_exit() -> None:  # registered first, so it runs after the library's own atexit hooks
        gc.collect()
        report["dist_initialized_at_exit"] = dist.is_available() and dist.is_initialized()
        report["native_threads_at_exit"] = _native_threads()
        report["child_returncodes"] = [p.wait(timeout=120) for p in procs]
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{report.get('rank', 'x')}.json").write_text(json.dumps(report))
        if a.get("user_group") and dist.is_initialized():
            dist.destroy_process_group()  # the script's own group: the script's to destroy

    atexit.register(at_exit)
    devices = int(a.get("devices", 2))
    if a.get("user_group"):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=devices)

    class Sharded(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))

        def configure_model(self):
            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net[0], self.net[2]):
                fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    pl.seed_everything(3, verbose=False)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g))
    model = Sharded()
    cb = CoralCheckpoint(repo=a["repo"], run="mp")
    trainer = pl.Trainer(max_epochs=a["max_epochs"], callbacks=[cb], default_root_dir=a["root"],
                         strategy=CoralModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1),
                         devices=devices, **TRAINER_DEFAULTS)
    trainer.fit(model, DataLoader(data, batch_size=8))
    # the group outlives fit: the sharded module still works (a collective) after it returned
    report["full_tensor_after_fit"] = float(sum(v.full_tensor().detach().double().sum() for v in model.parameters()))
    report.update(rank=trainer.global_rank, last_commit=cb.last_commit,
                  dist_initialized_after_fit=dist.is_initialized(),
                  threads_after_fit=[[t.name, t.daemon] for t in threading.enumerate()])
    procs.extend(getattr(trainer.strategy.launcher, "procs", None) or [])


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    os.chdir(args["root"])
    {"resume": mode_resume, "kill": mode_kill, "ddp": mode_ddp, "mp_exit": mode_mp_exit}[args["mode"]](args)
