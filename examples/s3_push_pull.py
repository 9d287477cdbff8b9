"""Push checkpoints to S3 at the end of training and resume on a "second machine" after a pull.

Starts a local S3-speaking server (moto, on 127.0.0.1 only) so it runs anywhere; point S3Config
at AWS, MinIO, R2... for real use. Needs `pip install "moto[server]"` for the local server.
"""

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

import boto3
import lightning.pytorch as pl
import torch

import coral_torch
from coral_torch import S3Config
from coral_torch.callbacks import CoralCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import MLP, SyntheticData  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="s3_run")
    args = ap.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="team-checkpoints")
        remote = S3Config(bucket="team-checkpoints", prefix="project-x", endpoint_url=endpoint,
                          region="us-east-1", addressing_style="path")

        # machine A: train 3 epochs, push on train end
        pl.seed_everything(0, verbose=False)
        cb = CoralCheckpoint(repo=root / "machine_a" / ".coral", run="exp1", monitor="val_loss", s3=remote)
        trainer = pl.Trainer(max_epochs=3, callbacks=[cb], logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=root / "machine_a")
        trainer.fit(MLP(epochs=4), datamodule=SyntheticData())
        print(f"machine A pushed: {cb.push_stats}")
        head = cb.last_commit

        # machine B: empty directory, pull, resume from the hash
        repo_b = coral_torch.Repository(root / "machine_b" / ".coral")
        print(f"machine B pulled: {repo_b.pull(remote)}")
        trainer_b = pl.Trainer(max_epochs=4, callbacks=[CoralCheckpoint(repo=repo_b, run="exp1", monitor="val_loss")],
                               logger=False, enable_progress_bar=False, enable_model_summary=False,
                               default_root_dir=root / "machine_b")
        trainer_b.fit(MLP(epochs=4), datamodule=SyntheticData(), ckpt_path=f"coral://{head[:10]}")
        print(f"machine B resumed from coral://{head[:10]} and finished epoch {trainer_b.current_epoch - 1}")
        print(f"second push from A sends {repo_a_push(root, remote)} object bytes")
    finally:
        server.stop()


def repo_a_push(root: Path, remote: S3Config) -> int:
    return coral_torch.Repository(root / "machine_a" / ".coral", create=False).push(remote)["object_bytes"]


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
