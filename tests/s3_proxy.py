"""The fault-injecting proxy of the S3 tests, on 127.0.0.1 in front of a test S3 server.

:class:`FaultProxy` works in one of two modes, chosen when it is made:

``mode="http"`` (the default) forwards HTTP/1.1 requests one at a time per connection (it answers
``Expect: 100-continue`` itself and closes every connection after its response, so each request
is one TCP connection and the client's own retries and timeouts are what recover). It reads each
request and response whole, which lets it damage one of them on purpose, as armed with a
:class:`Fault`:

- ``cut_request``: forward the first ``at`` (a fraction) of the request's bytes, then reset both
  connections (the server gets a cut request, the client a reset);
- ``cut_response``: the server answers, the client gets the first ``at`` of the response and a reset;
- ``delay``: hold the server's answer for ``delay`` seconds (past the client's read timeout);
- ``corrupt_request``: flip one bit of the request body at ``at`` (an upload damaged on the way;
  the server sees the same headers, so ``Content-MD5`` no longer matches);
- ``corrupt_response``: flip one bit of the response body at ``at`` (a download damaged on the way).

With ``opaque_etags=True`` the proxy also replaces every ETag it passes on (the ``ETag`` header and
the ``<ETag>`` of listings) by another string of the same length derived from it, the way servers
with encryption (AWS SSE-KMS) or their own schemes answer ETags that are not the data's MD5.

A fault hits the ``times`` requests from the ``nth`` (0-based) one whose ``"METHOD target"`` line
matches the regular expression ``match``, counted from :meth:`FaultProxy.arm`. What it hit is in
:attr:`FaultProxy.fired`; every request is in :attr:`FaultProxy.requests`.

``mode="tcp"`` forwards the byte stream as it comes, both ways, keeping connections open as long as
client and server do (keep-alive and connection pools behave as without a proxy).
:meth:`FaultProxy.cut_after` makes it drop every open connection once a given number of bytes has
passed in one direction (mid-request, mid-upload, mid-download), and optionally stay down (drop each
new connection at once) until :meth:`FaultProxy.set_down` says otherwise.

In both modes: ``bytes_up`` / ``bytes_down`` count the client->server / server->client bytes
forwarded, ``accepted`` the connections served, ``refused`` those dropped at once while down
(:meth:`FaultProxy.set_down`), ``cuts`` the drops made by :meth:`FaultProxy.cut_after`.

Bounded: the proxy serves at most ``max_requests`` connections (in "http" mode one per request) and
``max_seconds`` seconds (then it resets new connections; ``None``: no bound), every socket operation of
"http" mode times out after ``io_timeout`` seconds, and :meth:`FaultProxy.stop` resets what is still
open and joins its threads.
"""

from __future__ import annotations

import hashlib
import re
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Optional

MODES = ("http", "tcp")
FAULT_KINDS = ("cut_request", "cut_response", "delay", "corrupt_request", "corrupt_response")
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "expect", "transfer-encoding", "te", "upgrade"}
_MAX_HEAD = 64 * 1024
_XML_ETAG = re.compile(rb"<ETag>(&quot;|&#34;|\")?([^<&\"]+)(&quot;|&#34;|\")?</ETag>")


def opaque_etag(etag: str) -> str:
    """The stand-in :class:`FaultProxy` gives an ETag (``opaque_etags=True``): same length, not an MD5."""
    inner = etag.strip().strip('"')
    digest = hashlib.sha256(inner.encode()).hexdigest()
    return "z" + digest[: max(0, len(inner) - 1)]


@dataclass(frozen=True)
class Fault:
    """One fault to inject (see the module docstring)."""

    kind: str
    match: str
    nth: int = 0
    times: int = 1
    at: float = 0.5
    delay: float = 0.0
    bit: int = 0x01

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {FAULT_KINDS}")
        if not 0.0 <= self.at <= 1.0:
            raise ValueError("at is a fraction in 0..1")


class _Message:
    """A request or response read whole: its head (start line + headers) and its body."""

    def __init__(self, start: str, headers: list[tuple[str, str]], body: bytes, *, bodiless: bool = False):
        self.start, self.headers, self.body = start, headers, body
        self.bodiless = bodiless  # a HEAD/204/304 answer: its Content-Length describes no body here

    def header(self, name: str) -> Optional[str]:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def encode(self) -> bytes:
        """As sent on: hop-by-hop headers dropped, the body's length given, one request per connection."""
        lines = [self.start]
        keep = {"content-length"} if self.bodiless else set()
        lines += [f"{k}: {v}" for k, v in self.headers
                  if k.lower() not in _HOP_HEADERS and (k.lower() != "content-length" or k.lower() in keep)]
        if not self.bodiless:
            lines.append(f"Content-Length: {len(self.body)}")
        lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


class _Reader:
    """Buffered reads from a socket, with a deadline per operation."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def head(self) -> Optional[bytes]:
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > _MAX_HEAD:
                raise ConnectionError("message head too long")
            if not self._fill():
                if self.buf:
                    raise ConnectionError("connection closed inside a message head")
                return None
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        return head

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("connection closed inside a message body")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError("connection closed inside a chunked body")
        out, self.buf = self.buf.split(b"\r\n", 1)
        return out

    def chunked(self) -> bytes:
        body = b""
        while True:
            size = int(self.line().split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.line():  # trailers, up to the empty line
                    pass
                return body
            body += self.exactly(size)
            self.exactly(2)

    def rest(self) -> bytes:
        while self._fill():
            pass
        out, self.buf = self.buf, b""
        return out


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for ln in lines[1:]:
        if ":" in ln:
            k, v = ln.split(":", 1)
            headers.append((k.strip(), v.strip()))
    return lines[0], headers


def _read_body(reader: _Reader, msg_headers: list[tuple[str, str]], *, response: bool, no_body: bool) -> bytes:
    h = {k.lower(): v for k, v in msg_headers}
    if no_body:
        return b""
    if "chunked" in h.get("transfer-encoding", "").lower():
        return reader.chunked()
    if "content-length" in h:
        return reader.exactly(int(h["content-length"]))
    return reader.rest() if response else b""


def _abort(s: Optional[socket.socket], *, wake: bool = False) -> None:
    """Drop a connection hard (RST); with ``wake`` shut it down first, waking any thread blocked on it."""
    if s is None:
        return
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    if wake:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    try:
        s.close()
    except OSError:
        pass


class FaultProxy:
    """The proxy (see the module docstring). Use as a context manager, or :meth:`start` / :meth:`stop`."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", *, mode: str = "http",
                 max_requests: Optional[int] = 5000, max_seconds: Optional[float] = 300.0,
                 io_timeout: float = 30.0, opaque_etags: bool = False, poll: float = 0.1):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
        if opaque_etags and mode != "http":
            raise ValueError("opaque_etags rewrites HTTP answers: it needs mode='http'")
        self.mode = mode
        self.upstream = (upstream_host, upstream_port)
        self.opaque_etags = opaque_etags
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.io_timeout = io_timeout
        self._poll = poll
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._open: set[socket.socket] = set()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(poll)
        self.port = self._listener.getsockname()[1]
        self._deadline: Optional[float] = None
        self.served = 0
        self.accepted = 0
        self.refused = 0
        self.down = False
        self.bytes_up = 0
        self.bytes_down = 0
        # "http" mode: the armed fault and what it hit
        self._fault: Optional[Fault] = None
        self._pattern: Optional[re.Pattern[str]] = None
        self._matched = 0
        self.fired: list[str] = []
        self.requests: list[tuple[str, int]] = []  # ("METHOD target", status or -1)
        # "tcp" mode: the armed cut
        self._cut_at: Optional[int] = None
        self._cut_dir = "up"
        self._stay_down = True
        self.cuts = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control ------------------------------------------------------------------------------
    def arm(self, fault: Optional[Fault]) -> None:
        """Inject ``fault`` from now on (``None``: pass everything through). "http" mode only."""
        if self.mode != "http":
            raise ValueError("a Fault damages one HTTP message: it needs mode='http' (mode='tcp' has cut_after)")
        with self._lock:
            self._fault = fault
            self._pattern = re.compile(fault.match) if fault is not None else None
            self._matched = 0
            self.fired = []

    def cut_after(self, nbytes: int, stay_down: bool = True, direction: str = "up") -> None:
        """Drop every open connection once ``nbytes`` more bytes have passed in ``direction``
        ("up": client->server, e.g. an upload; "down": server->client, e.g. a download); then, if
        ``stay_down``, drop each new connection at once until ``set_down(False)``. "tcp" mode only."""
        if self.mode != "tcp":
            raise ValueError("cut_after counts stream bytes: it needs mode='tcp' (mode='http' has arm)")
        if direction not in ("up", "down"):
            raise ValueError(direction)
        with self._lock:
            self._cut_dir = direction
            self._cut_at = (self.bytes_up if direction == "up" else self.bytes_down) + int(nbytes)
            self._stay_down = stay_down

    def set_down(self, down: bool) -> None:
        """Down: drop each new connection at once. Back up (``False``) also disarms a pending cut."""
        with self._lock:
            self.down = down
            if not down:
                self._cut_at = None

    def _pick(self, line: str) -> Optional[Fault]:
        with self._lock:
            f, pat = self._fault, self._pattern
            if f is None or pat is None or not pat.search(line):
                return None
            i = self._matched
            self._matched += 1
            if f.nth <= i < f.nth + f.times:
                self.fired.append(f"{f.kind} {line}")
                return f
            return None

    # -- lifetime -----------------------------------------------------------------------------
    def start(self) -> "FaultProxy":
        if self.max_seconds is not None:
            self._deadline = time.monotonic() + self.max_seconds
        t = threading.Thread(target=self._accept_loop, name=f"fault-proxy-{self.mode}", daemon=True)
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
            socks = list(self._open)
        for s in socks:
            _abort(s, wake=self.mode == "tcp")
        for t in list(self._threads):
            t.join(timeout=self.io_timeout)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------------
    def _spawn(self, target, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=f"fault-proxy-{self.mode}-conn", daemon=True)
        t.start()
        self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            with self._lock:
                over = (self.max_requests is not None and self.served >= self.max_requests) or (
                    self._deadline is not None and time.monotonic() > self._deadline)
                self.served += 1
                down = self.down
                if down:
                    self.refused += 1
            if over or down:
                _abort(client, wake=self.mode == "tcp")
                continue
            if self.mode == "http":
                self.accepted += 1
                self._spawn(self._serve, client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
                client.settimeout(None)
            except OSError:
                _abort(client, wake=True)
                continue
            self.accepted += 1
            with self._lock:
                self._open.update((client, upstream))
            pair = _Pair(client, upstream, self)
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                self._spawn(self._pump, src, dst, up, pair)

    def _track(self, s: socket.socket, on: bool) -> None:
        with self._lock:
            (self._open.add if on else self._open.discard)(s)

    def _count(self, up: bool, n: int) -> None:
        with self._lock:
            if up:
                self.bytes_up += n
            else:
                self.bytes_down += n

    # "tcp" mode: one thread per direction of a connection
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
                        socks = list(self._open)
                if cut:
                    for s in socks:
                        _abort(s, wake=True)
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
                self._open.discard(s)

    # "http" mode: one thread per connection, one request on it
    def _serve(self, client: socket.socket) -> None:
        upstream: Optional[socket.socket] = None
        self._track(client, True)
        line = "?"
        status = -1
        try:
            client.settimeout(self.io_timeout)
            reader = _Reader(client)
            head = reader.head()
            if head is None:
                return
            start, headers = _parse_head(head)
            method, target = (start.split(" ") + ["", ""])[:2]
            line = f"{method} {target}"
            expect = next((v for k, v in headers if k.lower() == "expect"), "")
            if expect.lower() == "100-continue":
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = _read_body(reader, headers, response=False, no_body=False)
            request = _Message(start, headers, body)
            fault = self._pick(line)
            data = request.encode()
            if fault is not None and fault.kind == "corrupt_request" and body:
                i = len(data) - len(body) + min(len(body) - 1, int(fault.at * len(body)))
                data = data[:i] + bytes([data[i] ^ fault.bit]) + data[i + 1:]
            upstream = socket.create_connection(self.upstream, timeout=self.io_timeout)
            self._track(upstream, True)
            if fault is not None and fault.kind == "cut_request":
                part = data[: int(fault.at * len(data))]
                upstream.sendall(part)
                self._count(True, len(part))
                time.sleep(0.05)  # let the server see the partial request before the reset
                _abort(upstream)
                _abort(client)
                return
            upstream.sendall(data)
            self._count(True, len(data))
            ureader = _Reader(upstream)
            while True:
                uhead = ureader.head()
                if uhead is None:
                    raise ConnectionError("the server closed the connection without an answer")
                ustart, uheaders = _parse_head(uhead)
                code = int((ustart.split(" ") + ["0", "0"])[1])
                if code >= 200 or code == 101:
                    break  # 1xx interim answers are dropped (the proxy said 100 Continue itself)
            status = code
            bodiless = method == "HEAD" or code in (204, 304)
            ubody = _read_body(ureader, uheaders, response=True, no_body=bodiless)
            if self.opaque_etags:
                uheaders = [(k, f'"{opaque_etag(v)}"' if k.lower() == "etag" else v) for k, v in uheaders]
                ubody = _XML_ETAG.sub(
                    lambda m: b"<ETag>" + (m.group(1) or b"") + opaque_etag(m.group(2).decode()).encode()
                    + (m.group(3) or b"") + b"</ETag>", ubody)
            response = _Message(ustart, uheaders, ubody, bodiless=bodiless)
            out = response.encode()
            if fault is not None and fault.kind == "delay":
                self._stop.wait(fault.delay)
            elif fault is not None and fault.kind == "corrupt_response" and ubody:
                i = len(out) - len(ubody) + min(len(ubody) - 1, int(fault.at * len(ubody)))
                out = out[:i] + bytes([out[i] ^ fault.bit]) + out[i + 1:]
            elif fault is not None and fault.kind == "cut_response":
                part = out[: int(fault.at * len(out))]
                client.sendall(part)
                self._count(False, len(part))
                _abort(client)
                return
            client.sendall(out)
            self._count(False, len(out))
        except (OSError, ValueError):
            pass  # the client gave up (timeout) or a cut: nothing more to do for this connection
        finally:
            with self._lock:
                self.requests.append((line, status))
            for s in (client, upstream):
                if s is not None:
                    self._track(s, False)
                    try:
                        s.close()
                    except OSError:
                        pass


class _Pair:
    """"tcp" mode: closes both sockets of a proxied connection once both directions have ended."""

    def __init__(self, a: socket.socket, b: socket.socket, proxy: FaultProxy):
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
