"""A fake Azure OpenAI backend on a raw socket, for the backend misbehaviour that aoai-mock
cannot show: stray responses, connections closed or reset after a request was read, `101
Switching Protocols`, conflicting framing, hop-by-hop headers in answers.

It listens on 127.0.0.1 (a free port), runs a thread per accepted connection, and records
every request it receives: the raw head, the parsed header lines, the body, the number of the
connection it came on (1, 2, ... in accept order) and its place on that connection. The
gateway's health checks (`GET /openai/models`, agw.HEALTH_PATH) are always answered
`200 {"object":"list","data":[]}` and are recorded apart from data requests.

Data requests go to `handler(conn, req)`, which answers through `conn` (`send`, `close`,
`reset`); the default, `echo`, answers 200 with a JSON body that names the request's marker
(the content of its first chat message) and the backend, so that a client can tell whose
answer it got.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import agw

MAX_HEAD = 256 * 1024


@dataclass
class Received:
    """One request as the backend received it."""

    conn: int  # the connection's number, 1-based, in accept order
    seq: int  # its place among all requests of that connection (health checks included)
    data_seq: int  # its place among the data requests of that connection (-1: a health check)
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]  # in order, as sent (names as written)
    head: bytes  # the raw head, request line to the empty line
    body: bytes  # the body (de-chunked if it was chunked)
    at: float = field(default_factory=time.monotonic)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def health(self) -> bool:
        return self.method == "GET" and self.path == "/openai/models"

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        vals = self.values(name)
        return ", ".join(vals) if vals else None

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}

    @property
    def marker(self) -> str | None:
        """The content of the first chat message (what the tests put a marker in)."""
        try:
            return json.loads(self.body)["messages"][0]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None

    def __repr__(self) -> str:
        return (
            f"<conn {self.conn} #{self.seq} {self.method} {self.target} marker={self.marker!r} "
            f"headers={self.headers!r} body={len(self.body)}B>"
        )


class BackendConn:
    """The backend's side of one accepted connection, as a handler sees it."""

    def __init__(self, backend: "FakeBackend", sock: socket.socket, number: int):
        self.backend = backend
        self.sock = sock
        self.number = number
        self.served = 0  # data requests handled on this connection before the current one
        self.closed = False

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True

    def close(self) -> None:
        """An orderly close (FIN), without an answer."""
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def reset(self) -> None:
        """An abortive close (RST: SO_LINGER with a zero timeout)."""
        self.closed = True
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.sock.close()


Handler = Callable[[BackendConn, Received], None]


def response(status: int = 200, body: bytes = b"", headers: Iterable[tuple[str, str]] = (),
             reason: str | None = None, length: bool = True,
             content_type: str | None = "application/json") -> bytes:
    """An HTTP/1.1 response's bytes (Content-Length framing unless `length=False`)."""
    reasons = {100: "Continue", 101: "Switching Protocols", 200: "OK", 400: "Bad Request",
               404: "Not Found", 500: "Internal Server Error", 502: "Bad Gateway"}
    lines = [f"HTTP/1.1 {status} {reason or reasons.get(status, 'Status')}"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    if length:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def answer_body(marker: str | None, backend: str) -> bytes:
    """A chat completion whose content names the marker and the backend."""
    return json.dumps({
        "id": f"chatcmpl-{backend}",
        "object": "chat.completion",
        "model": "gpt-4o",
        "marker": marker,
        "backend": backend,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": f"echo {marker} from {backend}"},
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }).encode()


def answer(req: Received, backend: str, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """The ordinary keep-alive 200 answer to `req`."""
    return response(200, answer_body(req.marker, backend), headers)


def echo(conn: BackendConn, req: Received) -> None:
    conn.send(answer(req, conn.backend.name))


HEALTH_ANSWER = response(200, b'{"object":"list","data":[]}')


class FakeBackend:
    def __init__(self, name: str = "fake", handler: Handler = echo):
        self.name = name
        self.handler = handler
        self.received: list[Received] = []
        self.errors: list[str] = []  # requests it could not parse (shown by failing tests)
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._nconn = 0
        self._stopped = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, name=f"fake-{name}-accept", daemon=True).start()

    # -- what it received ---------------------------------------------------------------
    def data_requests(self) -> list[Received]:
        with self._lock:
            return [r for r in self.received if not r.health]

    def with_marker(self, marker: str) -> list[Received]:
        return [r for r in self.data_requests() if r.marker == marker]

    def connections(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return self._nconn

    def wait_data(self, n: int, timeout: float = 10.0) -> list[Received]:
        """Waits until at least `n` data requests arrived; returns them all."""
        return agw.wait_until(
            lambda: (lambda d: d if len(d) >= n else None)(self.data_requests()),
            timeout, f"{n} data request(s) at fake backend {self.name} (got "
            f"{self.data_requests()!r})",
        )

    def clear(self) -> None:
        with self._lock:
            self.received.clear()
            self.errors.clear()

    # -- serving ------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stopped:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._nconn += 1
                number = self._nconn
                self._conns.append(sock)
            threading.Thread(
                target=self._serve, args=(sock, number), name=f"fake-{self.name}-{number}",
                daemon=True,
            ).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        conn = BackendConn(self, sock, number)
        buf = b""
        seq = 0

        def fill() -> bool:
            nonlocal buf
            try:
                chunk = sock.recv(65536)
            except OSError:
                return False
            if not chunk:
                return False
            buf += chunk
            return True

        try:
            while not conn.closed and not self._stopped:
                while b"\r\n\r\n" not in buf:
                    if len(buf) > MAX_HEAD or not fill():
                        return
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                parts = lines[0].split(" ")
                if len(parts) != 3:
                    self.errors.append(f"conn {number}: bad request line {lines[0]!r}")
                    return
                method, target, version = parts
                headers = []
                for line in lines[1:]:
                    k, sep, v = line.partition(":")
                    if not sep:
                        self.errors.append(f"conn {number}: bad header line {line!r}")
                        return
                    headers.append((k, v.strip()))
                lower = {k.lower(): v for k, v in headers}
                body = b""
                if "chunked" in lower.get("transfer-encoding", "").lower():
                    while True:
                        while b"\r\n" not in buf:
                            if not fill():
                                return
                        size_line, _, buf = buf.partition(b"\r\n")
                        size = int(size_line.split(b";")[0].strip(), 16)
                        if size == 0:
                            while b"\r\n\r\n" not in b"\r\n" + buf:
                                if not fill():
                                    return
                            _, _, buf = (b"\r\n" + buf).partition(b"\r\n\r\n")
                            break
                        while len(buf) < size + 2:
                            if not fill():
                                return
                        body += buf[:size]
                        buf = buf[size + 2:]
                elif "content-length" in lower:
                    n = int(lower["content-length"])
                    while len(buf) < n:
                        if not fill():
                            return
                    body, buf = buf[:n], buf[n:]
                req = Received(
                    conn=number, seq=seq, data_seq=-1, method=method, target=target,
                    version=version, headers=headers, head=head + b"\r\n\r\n", body=body,
                )
                seq += 1
                if req.health:
                    with self._lock:
                        self.received.append(req)
                    conn.send(HEALTH_ANSWER)
                    continue
                req.data_seq = conn.served
                with self._lock:
                    self.received.append(req)
                self.handler(conn, req)
                conn.served += 1
        except Exception as exc:  # noqa: BLE001 - a broken handler shows in the test
            self.errors.append(f"conn {number}: {exc!r}")
        finally:
            if not conn.closed:
                try:
                    sock.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._stopped = True
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass
