"""Run every example script and the LightningCLI configs as a user would, in a scratch directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.slow


def run(args: list[str], cwd: Path, timeout: int = 180) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    res = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, f"{args} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def test_demo_then_resume_from_hash(tmp_path):
    out = run([str(EXAMPLES / "demo.py"), "--dir", "demo_run"], tmp_path)
    assert "coral repository" in out and "verify: ok" in out and "resumed from coral://" in out
    out = run([str(EXAMPLES / "resume_from_hash.py"), "demo_run/.coral", "best", "--epochs", "1"], tmp_path)
    assert "resuming from" in out and "new latest commit" in out


def test_save_load_example(tmp_path):
    out = run([str(EXAMPLES / "save_load.py")], tmp_path)
    assert "equals torch.load of the plain file: True" in out


def test_s3_example(tmp_path):
    out = run([str(EXAMPLES / "s3_push_pull.py")], tmp_path)
    assert "machine B resumed from coral://" in out and "second push from A sends 0 object bytes" in out


def test_frozen_backbone_minilm_example(tmp_path):
    script = EXAMPLES / "frozen_backbone_minilm.py"
    if not script.exists():
        pytest.fail("examples/frozen_backbone_minilm.py is missing")
    out = run([str(script), "--epochs", "2"], tmp_path, timeout=300)
    assert "backbone stored once" in out


@pytest.mark.parametrize("config", ["coral.yaml", "coral_s3.yaml"])
def test_lightning_cli_config_runs_an_epoch(tmp_path, config):
    args = [str(EXAMPLES / "train_cli.py"), "fit", "--config", str(ROOT / "configs" / config),
            "--trainer.max_epochs", "1"]
    if config == "coral_s3.yaml":
        # a local S3 server stands in for the bucket the config names
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
        from s3_server import REGION, TEST_KEY, TEST_SECRET, MotoS3Server

        with MotoS3Server() as server:
            server.client().create_bucket(Bucket="my-checkpoints")
            env_args = ["--trainer.callbacks.init_args.s3.endpoint_url", server.endpoint,
                        "--trainer.callbacks.init_args.s3.access_key", TEST_KEY,
                        "--trainer.callbacks.init_args.s3.secret_key", TEST_SECRET,
                        "--trainer.callbacks.init_args.s3.region", REGION]
            out = run(args + env_args, tmp_path)
            listed = server.client().list_objects_v2(Bucket="my-checkpoints", Prefix="coral/project-x/commits/")
            assert listed.get("KeyCount", 0) == 1
    else:
        run(args, tmp_path)
    from coral_torch import Repository

    repo = Repository(tmp_path / "runs" / ".coral", create=False)
    assert len(repo.log()) == 1 and repo.verify().ok
