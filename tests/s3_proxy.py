"""A fault-injecting HTTP proxy for S3 tests, on 127.0.0.1 in front of a test S3 server.

:class:`FaultProxy` forwards HTTP/1.1 requests one at a time per connection (it answers
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

Bounded: the proxy serves at most ``max_requests`` requests and ``max_seconds`` seconds (then it
resets new connections), every socket operation times out after ``io_timeout`` seconds, and
:meth:`FaultProxy.stop` resets what is still open and joins its threads.
"""

from __future__ import annotations

import hashlib
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Optional

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


def _abort(s: Optional[socket.socket]) -> None:
    """Drop a connection hard (RST)."""
    if s is None:
        return
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


class FaultProxy:
    """The proxy (see the module docstring). Use as a context manager, or :meth:`start` / :meth:`stop`."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", *, max_requests: int = 5000,
                 max_seconds: float = 300.0, io_timeout: float = 30.0, opaque_etags: bool = False):
        self.upstream = (upstream_host, upstream_port)
        self.opaque_etags = opaque_etags
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.io_timeout = io_timeout
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._open: set[socket.socket] = set()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._fault: Optional[Fault] = None
        self._pattern: Optional[re.Pattern[str]] = None
        self._matched = 0
        self._deadline = 0.0
        self.served = 0
        self.fired: list[str] = []
        self.requests: list[tuple[str, int]] = []  # ("METHOD target", status or -1)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control ------------------------------------------------------------------------------
    def arm(self, fault: Optional[Fault]) -> None:
        """Inject ``fault`` from now on (``None``: pass everything through)."""
        with self._lock:
            self._fault = fault
            self._pattern = re.compile(fault.match) if fault is not None else None
            self._matched = 0
            self.fired = []

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
        self._deadline = time.monotonic() + self.max_seconds
        t = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)
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
            _abort(s)
        for t in list(self._threads):
            t.join(timeout=self.io_timeout)

    def __enter__(self) -> "FaultProxy":
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
                over = self.served >= self.max_requests or time.monotonic() > self._deadline
                self.served += 1
            if over:
                _abort(client)
                continue
            t = threading.Thread(target=self._serve, args=(client,), name="fault-proxy-conn", daemon=True)
            t.start()
            self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _track(self, s: socket.socket, on: bool) -> None:
        with self._lock:
            (self._open.add if on else self._open.discard)(s)

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
                upstream.sendall(data[: int(fault.at * len(data))])
                time.sleep(0.05)  # let the server see the partial request before the reset
                _abort(upstream)
                _abort(client)
                return
            upstream.sendall(data)
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
                client.sendall(out[: int(fault.at * len(out))])
                _abort(client)
                return
            client.sendall(out)
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
