"""The main job (`make demo`): train a small model with CoralCheckpoint and show what was stored.

Trains a small MLP classifier for 5 epochs with Lightning, committing a full checkpoint (model,
AdamW state, scheduler, loops) every epoch into ./demo_run/.coral, then prints the repository log,
the bytes stored against what torch.save would have written, and resumes from a hash.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path

# Lightning 2.6 with torch >= 2.10 warns about its own use of torch's pytree API on every fit
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")

import lightning.pytorch as pl
import torch

import coral_torch
from coral_torch.callbacks import CoralCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import MLP, SyntheticData  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="demo_run")
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    pl.seed_everything(0, verbose=False)
    data = SyntheticData()
    cb = CoralCheckpoint(repo=root / ".coral", monitor="val_loss", run="demo")
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[cb], default_root_dir=root, logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    t0 = time.perf_counter()
    trainer.fit(MLP(epochs=args.epochs), datamodule=data)
    print(f"trained {args.epochs} epochs in {time.perf_counter() - t0:.1f}s, one coral commit per epoch\n")

    repo = coral_torch.Repository(root / ".coral", create=False)
    print(f"{'epoch':>5}  {'commit':<10}  {'val_loss':>8}  {'logical':>10}  {'written':>10}  {'ratio':>6}  {'stall':>7}")
    for h in cb.history:
        row = repo.get_commit(h["commit"])
        print(f"{h['epoch']:>5}  {h['commit'][:10]}  {row.metrics.get('val_loss', float('nan')):>8.4f}  "
              f"{h['logical_bytes'] / 1e6:>8.2f}MB  {h['bytes_written'] / 1e6:>8.2f}MB  {h['ratio']:>6.3f}  "
              f"{(h['stall_s'] or 0) * 1000:>5.1f}ms")
    # what ModelCheckpoint (torch.save every epoch) would have written for the same checkpoints
    probe = root / "probe.pt"
    torch.save(coral_torch.load(cb.last_commit, repo=repo), probe)
    torch_bytes = probe.stat().st_size * len(cb.history)
    probe.unlink()
    stats = repo.stats()
    print(f"\ntorch.save every epoch: {torch_bytes / 1e6:.1f} MB;  coral repository: "
          f"{stats['disk_bytes'] / 1e6:.1f} MB on disk ({stats['disk_bytes'] / torch_bytes:.2f}x)")
    best = repo.resolve("best")
    print(f"best commit (min val_loss): {best[:10]};  latest: {repo.resolve('latest')[:10]}")
    print(f"verify: {'ok' if repo.verify().ok else 'DAMAGED'}")

    # resume one more epoch from the best commit's hash, as a user would
    resume = pl.Trainer(max_epochs=args.epochs + 1, callbacks=[CoralCheckpoint(repo=root / ".coral", monitor="val_loss", run="demo")],
                        default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False)
    ref = f"coral://{repo.resolve('latest')[:8]}"
    resume.fit(MLP(epochs=args.epochs), datamodule=data, ckpt_path=ref)
    print(f"resumed from {ref} and trained to epoch {resume.current_epoch}")
    print(f"\ntry:  coral-torch --repo {root / '.coral'} log")


if __name__ == "__main__":
    main()
