"""Bad set-up of an ``s3://bucket/prefix`` repository, through the repository entry points
(``coral_torch.save``/``load``, ``coral_torch.dcp.save``/``load``, the CLI): wrong credentials and
an endpoint where nothing listens give a one-line :class:`CoralError` before anything is written,
on the bucket or on this node, and nothing is half-published. Real moto server, with its signature
checks switched on (``enforce_auth``); the bucket is listed with valid IAM credentials."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from s3_server import free_port  # noqa: E402

import coral_torch  # noqa: E402
from coral_torch.errors import CoralError, RemoteAuthError, RemoteConnectionError  # noqa: E402
from coral_torch.repository.handles import close_repositories  # noqa: E402

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore::UserWarning")]

ALLOW = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
READ_ONLY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["s3:Get*", "s3:List*"], "Resource": "*"}],
}
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def setup(server, bucket, tmp_path, monkeypatch):
    """A repository at s3://<bucket>/ckpts holding one commit, an allow-all IAM user (the valid
    credentials), and moto checking signatures; failures then run with an empty cache directory."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("CORAL_CACHE_DIR", str(tmp_path / "writer-cache"))
    close_repositories()
    url = f"s3://{bucket}/ckpts"
    first = coral_torch.save({"w": torch.zeros(4)}, repo=url, run="r")
    good = server.create_user(f"u{uuid.uuid4().hex[:8]}", ALLOW)
    close_repositories()
    monkeypatch.setenv("CORAL_CACHE_DIR", str(tmp_path / "cache"))
    server.enforce_auth(True)
    try:
        s3 = server.client(key=good[0], secret=good[1])
        keys = lambda: {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}  # noqa: E731
        yield {"url": url, "first": first, "good": good, "keys": keys, "before": keys()}
    finally:
        server.enforce_auth(False)
        close_repositories()


def _bad(setup: dict, how: str) -> dict[str, str]:
    """The environment of a wrong set-up: an unknown key, a wrong secret, or nothing listening."""
    if how == "dead endpoint":
        return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    key, secret = ("AKIANOSUCHKEY0000000", "x") if how == "unknown key" else (setup["good"][0], "wrong-secret-5f1e")
    return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}


EXPECTED = {
    "unknown key": (RemoteAuthError, "InvalidAccessKeyId"),
    "wrong secret": (RemoteAuthError, "SignatureDoesNotMatch"),
    "dead endpoint": (RemoteConnectionError, "Check endpoint_url"),
}


def _one_line(exc: BaseException, how: str, chained: bool = False) -> None:
    """``exc`` is the expected error in one line that says what to check, with no botocore error
    chained on (``chained``: coral_torch.dcp re-raises it from DCP's CheckpointException)."""
    kind, says = EXPECTED[how]
    msg = str(exc)
    assert isinstance(exc, kind) and says in msg and "\n" not in msg, f"{type(exc).__name__}: {msg}"
    assert "wrong-secret-5f1e" not in msg
    assert exc.__cause__ is None or (chained and type(exc.__cause__).__name__ == "CheckpointException")
    if kind is RemoteAuthError:
        assert "AWS_ACCESS_KEY_ID" in msg  # says what to check


@pytest.mark.parametrize("how", list(EXPECTED))
def test_save_and_load_fail_in_one_line_before_anything_is_written(setup, tmp_path, monkeypatch, how):
    import coral_torch.dcp as cdcp

    for name, value in _bad(setup, how).items():
        monkeypatch.setenv(name, value)
    url, sd = setup["url"], {"w": torch.ones(4)}
    calls = {
        "save with a pointer file": lambda: coral_torch.save(sd, tmp_path / "a.pt", repo=url, run="r"),
        "save into an empty prefix": lambda: coral_torch.save(sd, repo=url + "-new"),
        "load coral://latest": lambda: coral_torch.load("coral://latest", repo=url),
        "load r/latest": lambda: coral_torch.load("r/latest", repo=url),
        "dcp.save": lambda: cdcp.save({"w": torch.ones(4)}, repo=url, run="r"),
    }
    for what, call in calls.items():
        t0 = time.monotonic()
        with pytest.raises(CoralError) as e:
            call()
        elapsed = time.monotonic() - t0
        _one_line(e.value, how, chained=what.startswith("dcp"))
        assert elapsed < 30, f"{what} took {elapsed:.1f} s to fail"
        close_repositories()
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "cache").exists()  # nothing on this node
    assert setup["keys"]() == setup["before"]  # nor on the bucket


@pytest.mark.parametrize("how", ["wrong secret", "dead endpoint"])
def test_cli_says_it_in_one_line_without_a_traceback(setup, tmp_path, how):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(PACKAGE_ROOT), **_bad(setup, how)}
    env.pop("CORAL_REPO", None)
    out = subprocess.run(
        [sys.executable, "-m", "coral_torch.cli", "--repo", setup["url"], "log"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and lines, out
    assert "Traceback" not in out.stderr and lines[-1].startswith("coral-torch: error: "), out.stderr
    assert EXPECTED[how][1] in lines[-1] and not (tmp_path / "cache").exists()


def test_dcp_load_names_the_error(setup, monkeypatch):
    import coral_torch.dcp as cdcp

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    with pytest.raises(RemoteAuthError) as e:
        cdcp.load({"w": torch.empty(4)}, "latest", repo=setup["url"])
    _one_line(e.value, "unknown key")  # raised as itself, not from DCP's CheckpointException


def _read_only(server, setup, monkeypatch) -> None:
    server.enforce_auth(False)  # IAM users are made with auth off
    key, secret = server.create_user(f"ro{uuid.uuid4().hex[:8]}", READ_ONLY)
    server.enforce_auth(True)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)


def test_read_only_credentials_publish_nothing(server, setup, tmp_path, monkeypatch):
    """Credentials that may read but not write: the repository opens, the save fails at its first
    upload, and the bucket keeps exactly what it had; no pointer file is written."""
    _read_only(server, setup, monkeypatch)
    with pytest.raises(RemoteAuthError) as e:
        coral_torch.save({"w": torch.ones(4)}, tmp_path / "a.pt", repo=setup["url"], run="r")
    assert "\n" not in str(e.value) and "denied access" in str(e.value)
    assert not (tmp_path / "a.pt").exists() and setup["keys"]() == setup["before"]


def test_a_save_that_was_not_published_is_not_latest_on_this_node(server, setup, tmp_path, monkeypatch):
    _read_only(server, setup, monkeypatch)
    with pytest.raises(CoralError):
        coral_torch.save({"w": torch.ones(4)}, tmp_path / "a.pt", repo=setup["url"], run="r")
    close_repositories()  # a later process on this node, the same cache
    assert torch.equal(coral_torch.load("latest", repo=setup["url"])["w"], torch.zeros(4))
    assert [c.id for c in coral_torch.open_repository(setup["url"]).log()] == [setup["first"]]
