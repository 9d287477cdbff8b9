"""Subprocess worker for tests/test_lightning.py: ``python _lightning_worker.py '<json args>'``.

Modes:
  resume  train TinyModel with CoralCheckpoint (optionally from ``ckpt``) and torch.save the final
          weights/optimizer/scheduler state to ``out``.
  kill    train BigModel with an asynchronous CoralCheckpoint whose commits are slowed down; print
          "SAVING <epoch>" when a commit starts and "COMMITTED <id>" when it is done, so the parent
          can SIGKILL the process mid-save. With ``ckpt`` it resumes and prints "RESUMED <epoch> <step>".
  ddp     TinyModel under DDP (gloo, 2 CPU processes; Lightning re-launches this script for rank 1);
          every rank writes ``<out>/rank<N>.json`` describing what its callback did.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

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
    import coral_torch.repository.repository as repo_mod

    pl.seed_everything(2, verbose=False)
    repo = Repository(a["repo"])
    delay = float(a.get("delay", 0.0))
    if delay:
        encode = repo_mod.Repository._encode_one

        def slow_encode(self, *args, **kw):  # makes every commit take long enough to be killed in
            time.sleep(delay)
            return encode(self, *args, **kw)

        repo_mod.Repository._encode_one = slow_encode
    commit = repo.commit

    def noisy_commit(obj, **kw):
        print("SAVING", kw.get("epoch"), flush=True)
        stats = commit(obj, **kw)
        print("COMMITTED", stats.commit_id, kw.get("epoch"), flush=True)
        return stats

    repo.commit = noisy_commit
    model = BigModel()
    cb = CoralCheckpoint(repo=repo, run="big", async_save=True)

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


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    os.chdir(args["root"])
    {"resume": mode_resume, "kill": mode_kill, "ddp": mode_ddp}[args["mode"]](args)
