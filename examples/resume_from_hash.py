"""Resume training from a checkpoint's content hash (or a tag, run name, latest, best).

    python examples/demo.py                                   # makes demo_run/.coral
    python examples/resume_from_hash.py demo_run/.coral latest --epochs 2
    python examples/resume_from_hash.py demo_run/.coral 6ba4fdcb --epochs 1
"""

import argparse
import logging
import sys
from pathlib import Path

import lightning.pytorch as pl

import coral_torch
from coral_torch.callbacks import CoralCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import MLP, SyntheticData  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("repo", help="repository directory, e.g. demo_run/.coral")
    ap.add_argument("ref", help="hash prefix, tag, run name, latest or best")
    ap.add_argument("--epochs", type=int, default=1, help="epochs to train after the checkpoint")
    args = ap.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    repo = coral_torch.Repository(args.repo, create=False)
    commit = repo.get_commit(args.ref)  # clear error for unknown or ambiguous refs
    print(f"resuming from {commit.id[:10]} (run {commit.run}, epoch {commit.epoch}, step {commit.step})")
    hparams = coral_torch.load(commit.id, repo=repo).get("hyper_parameters", {})
    model = MLP(**{k: hparams[k] for k in ("width", "lr", "epochs") if k in hparams})
    trainer = pl.Trainer(
        max_epochs=(commit.epoch or 0) + 1 + args.epochs,
        callbacks=[CoralCheckpoint(repo=repo, monitor="val_loss")],
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=Path(args.repo).parent,
    )
    trainer.fit(model, datamodule=SyntheticData(), ckpt_path=f"coral://{commit.id}")
    print(f"finished epoch {trainer.current_epoch - 1}; val_loss {float(trainer.callback_metrics['val_loss']):.4f}")
    print(f"new latest commit: {repo.resolve('latest')[:10]}")


if __name__ == "__main__":
    main()
