"""The README's walkthrough runs exactly as written (a new user's first commands)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from s3_server import REGION, TEST_KEY, TEST_SECRET, MotoS3Server  # noqa: E402

pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- readme-test:start -->\s*```bash\n(.*?)```\s*<!-- readme-test:end -->", text, re.S)
    assert block, "README.md lost its tested walkthrough block"
    lines = [re.split(r"\s+#\s", line)[0].strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_readme_has_the_two_setup_commands_first():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert [line.split("#")[0].strip() for line in first_block.splitlines()] == ["make demo", "make test"]


def test_readme_walkthrough_runs_as_written(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    bindir = Path(sys.executable).parent
    with MotoS3Server() as server:
        server.client().create_bucket(Bucket="my-checkpoints")
        env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1",
                   AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID=TEST_KEY,
                   AWS_SECRET_ACCESS_KEY=TEST_SECRET, AWS_DEFAULT_REGION=REGION)
        for line in readme_commands():
            if line.startswith("source "):
                continue  # the test already runs inside the environment
            args = shlex.split(line)
            if args[0] == "python":
                args[0] = sys.executable
            res = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert res.returncode == 0, f"`{line}` failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "stats.png").exists()
    from coral_torch import Repository

    assert len(Repository(tmp_path / "copy" / ".coral", create=False).log()) >= 3
    assert len(Repository(tmp_path / "runs" / ".coral", create=False).log()) == 4
