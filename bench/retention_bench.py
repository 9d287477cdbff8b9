"""Retention benchmark: disk use after every epoch, CoralCheckpoint with a keep policy against
Lightning's ModelCheckpoint(save_top_k=2, save_last=True), on the MiniLM fine-tune.

Same model, data, seed and steps in every run of one process:
  modelckpt    ModelCheckpoint(monitor="val_loss", save_top_k=2, save_last=True): torch.save files
  coral        CoralCheckpoint(keep=LatestN(2) | BestN(2, "val_loss"))
  coral-opt    the same with keep_optimizer=LatestN(1) (older kept commits: weights, no AdamW moments)

Disk is measured right after each epoch's checkpoint (coral: the whole repository, catalog
included; saves are synchronous here so that the measurement follows a finished save: the async
default stores the same commits). Goals (issue 20): coral <= 0.6x ModelCheckpoint at every epoch,
coral-opt <= 0.35x.

    .venv/bin/python bench/retention_bench.py                  # 20 epochs x 10 steps
    .venv/bin/python bench/retention_bench.py --quick          # 4 epochs x 3 steps
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm  # noqa: E402
from epochs_bench import Batches  # noqa: E402

from coral_torch import Repository  # noqa: E402
from coral_torch.callbacks import CoralCheckpoint  # noqa: E402
from coral_torch.retention import BestN, LatestN  # noqa: E402


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


class DiskProbe(Checkpoint):
    """Runs after the checkpoint callbacks at every epoch end (Lightning orders Checkpoint
    subclasses last, in list order) and records the bytes under ``path``."""

    def __init__(self, path: Path):
        self.path = path
        self.bytes: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.bytes.append(dir_bytes(self.path))


def make_module(total_steps: int):
    base = minilm.LitMiniLM

    class WithValidation(base):  # val_loss for top-k; the model and optimizer are the bench's usual
        def validation_step(self, batch, batch_idx):
            ids, mask, labels = batch
            loss = self.model.loss(ids, mask, labels)
            self.log("val_loss", loss, on_epoch=True)
            return loss

    return WithValidation(total_steps=total_steps, warmup_steps=max(1, total_steps // 10))


def run(kind: str, train: list, val: list, epochs: int, root: Path) -> dict:
    pl.seed_everything(0, verbose=False)
    model = make_module(epochs * len(train))
    out = root / kind
    shutil.rmtree(out, ignore_errors=True)
    if kind == "modelckpt":
        cb = ModelCheckpoint(dirpath=out / "ckpts", monitor="val_loss", save_top_k=2, save_last=True)
        probe = DiskProbe(out / "ckpts")
    else:
        cb = CoralCheckpoint(repo=out / ".coral", run="bench", monitor="val_loss", async_save=False,
                             keep=LatestN(2) | BestN(2, "val_loss"),
                             keep_optimizer=LatestN(1) if kind == "coral-opt" else "all")
        probe = DiskProbe(out / ".coral")
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[cb, probe], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=out, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    trainer.fit(model, DataLoader(train, batch_size=None), DataLoader(val, batch_size=None))
    res = {"kind": kind, "wall_s": time.perf_counter() - t0, "bytes": probe.bytes}
    if kind != "modelckpt":
        repo = Repository(out / ".coral", create=False)
        res["commits"] = len(repo.log())
        res["verify_ok"] = repo.verify().ok
        res["gc_would_remove"] = repo.gc(dry_run=True)["commits_removed"]
    else:
        res["files"] = sorted(os.listdir(out / "ckpts"))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per epoch")
    ap.add_argument("--val-steps", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", default="modelckpt,coral,coral-opt")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.steps, args.val_steps = 4, 3, 1
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    root = Path(tempfile.mkdtemp(prefix="retention_bench-"))
    b = Batches(batch=16, seq_len=64, seed=0)
    train = [b.next() for _ in range(args.steps)]
    v = Batches(batch=16, seq_len=64, seed=1)
    val = [v.next() for _ in range(args.val_steps)]
    print(f"retention_bench: MiniLM fine-tune, {args.epochs} epochs x {args.steps} steps, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs")
    results = {}
    try:
        for kind in args.runs.split(","):
            os.sync()
            results[kind] = run(kind, train, val, args.epochs, root)
            print(f"  {kind:<10} done in {results[kind]['wall_s']:.1f}s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mc = results.get("modelckpt")
    kinds = [k for k in results if k != "modelckpt"]
    print()
    print("| epoch | ModelCheckpoint MB | " + " | ".join(f"{k} MB | vs MC" for k in kinds) + " |")
    print("|---:|---:|" + "---:|---:|" * len(kinds))
    for e in range(args.epochs):
        row = [str(e), f"{mc['bytes'][e] / 1e6:.1f}" if mc else ""]
        for k in kinds:
            n = results[k]["bytes"][e]
            row += [f"{n / 1e6:.1f}", f"{n / mc['bytes'][e]:.3f}x" if mc else ""]
        print("| " + " | ".join(row) + " |")
    if mc:
        goals = {"coral": 0.6, "coral-opt": 0.35}
        for k in kinds:
            worst = max(n / m for n, m in zip(results[k]["bytes"], mc["bytes"]))
            goal = goals.get(k)
            verdict = "" if goal is None else ("HOLDS" if worst <= goal else "MISSED") + f" (goal <= {goal}x)"
            print(f"  {k}: worst epoch {worst:.3f}x of ModelCheckpoint {verdict}; commits at the end "
                  f"{results[k]['commits']}, verify {'ok' if results[k]['verify_ok'] else 'DAMAGED'}, "
                  f"gc would remove {results[k]['gc_would_remove']}")
        print(f"  ModelCheckpoint files at the end: {', '.join(mc['files'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
