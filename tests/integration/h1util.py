"""A tiny, strict HTTP/1.1 client on raw sockets, and request builders, shared by the tests
that talk bytes to the gateway's listener (test_http1.py, test_framing.py).

Every read has a socket timeout, so that a gateway that waits for bytes that never come fails
the test instead of hanging it."""

from __future__ import annotations

import json
import socket

import agw
from agw import KEY, assert_error

TIMEOUT = 10.0
CHAT = agw.chat_path("gpt-4o")


# -- a tiny, strict HTTP/1.1 client ------------------------------------------------------


class Headers:
    """Response headers in order; lookups are case-insensitive, repeated ones joined."""

    def __init__(self, pairs: list[tuple[str, str]]):
        self.pairs = pairs

    def get(self, name: str, default=None):
        vals = [v for k, v in self.pairs if k.lower() == name.lower()]
        return ", ".join(vals) if vals else default

    def count(self, name: str) -> int:
        return sum(1 for k, _ in self.pairs if k.lower() == name.lower())

    def items(self):
        return list(self.pairs)

    def __contains__(self, name: str) -> bool:
        return self.count(name) > 0

    def __repr__(self) -> str:
        return repr(self.pairs)


class Resp:
    def __init__(self, version: str, status: int, headers: Headers, body: bytes, wire: bytes):
        self.version = version
        self.status_code = status
        self.headers = headers
        self.body = body
        self.wire = wire  # the body as it was framed on the wire

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self):
        return json.loads(self.body)

    def closes(self) -> bool:
        return any(
            o.strip().lower() == "close"
            for o in (self.headers.get("connection") or "").split(",")
        )

    def __repr__(self) -> str:
        return f"<{self.version} {self.status_code} {self.headers!r} {self.body[:300]!r}>"


class Conn:
    """One client connection; bytes read past a response stay for the next one."""

    def __init__(self, gw: agw.Gateway, timeout: float = TIMEOUT):
        host, port = gw.listeners[0].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.buf = b""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        """Reads more; False at EOF. A socket timeout propagates (the test fails)."""
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise AssertionError(f"connection closed inside a line: {self.buf[:200]!r}")
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise AssertionError(
                    f"connection closed after {len(self.buf)} of {n} body bytes"
                )
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_response(self, head_request: bool = False) -> Resp:
        """One response (an interim 1xx one too: the caller reads the final one next)."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise AssertionError(f"connection closed before a response head: {self.buf!r}")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        assert len(parts) >= 2 and parts[0] in ("HTTP/1.1", "HTTP/1.0"), f"status line {lines[0]!r}"
        version, status = parts[0], int(parts[1])
        pairs = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            assert sep and name and name == name.strip(), f"bad header line {line!r}"
            pairs.append((name, value.strip()))
        headers = Headers(pairs)

        if head_request or status < 200 or status in (204, 304):
            return Resp(version, status, headers, b"", b"")
        te = headers.get("transfer-encoding")
        if te is not None:
            assert "content-length" not in headers, f"both framings: {headers!r}"
            assert te.lower() == "chunked", f"transfer-encoding {te!r}"
            body, wire = b"", b""
            while True:
                size_line = self._line()
                wire += size_line + b"\r\n"
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    break
                data = self._exactly(size)
                crlf = self._exactly(2)
                assert crlf == b"\r\n", f"chunk of {size} not followed by CRLF: {crlf!r}"
                body += data
                wire += data + crlf
            while True:  # trailers, then the empty line
                line = self._line()
                wire += line + b"\r\n"
                if not line:
                    break
            return Resp(version, status, headers, body, wire)
        cl = headers.get("content-length")
        if cl is not None:
            assert headers.count("content-length") == 1, f"repeated content-length: {headers!r}"
            body = self._exactly(int(cl))
            return Resp(version, status, headers, body, body)
        # delimited by the close of the connection
        while self._fill():
            pass
        body, self.buf = self.buf, b""
        return Resp(version, status, headers, body, body)

    def expect_closed(self) -> None:
        """The server closes the connection, and sends nothing more before it does."""
        try:
            while self._fill():
                pass
        except ConnectionResetError:
            pass
        except socket.timeout:
            raise AssertionError(
                f"the gateway kept the connection open {TIMEOUT:.0f}s (got {self.buf!r})"
            ) from None
        assert self.buf == b"", f"bytes after the last response: {self.buf[:500]!r}"

    def expect_open(self, wait: float = 0.5) -> None:
        """Nothing arrives and the connection is not closed within `wait` seconds."""
        self.sock.settimeout(wait)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return
        finally:
            self.sock.settimeout(TIMEOUT)
        raise AssertionError(f"expected an idle open connection, got {chunk!r}")


def request(target: str, body: bytes | None = None, *, method: str = "POST",
            version: str = "1.1", key: str | None = KEY, headers: list[tuple[str, str]] = (),
            length: bool = True) -> bytes:
    """A request's bytes (Content-Length framing unless `length=False`; the body appended)."""
    lines = [f"{method} {target} HTTP/{version}", "Host: gateway.test"]
    if key is not None:
        lines.append(f"api-key: {key}")
    if body is not None:
        lines.append("Content-Type: application/json")
        if length:
            lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def chat_bytes(content: str = "Say hello.", **kw) -> bytes:
    return json.dumps(agw.chat_body(content, **kw)).encode()


def chat(body: bytes | None = None, **kw) -> bytes:
    return request(CHAT, chat_bytes() if body is None else body, **kw)


def chunked(data: bytes, sizes: list[int], ext: list[str] | None = None,
            trailers: list[str] = ()) -> bytes:
    """`data` in chunks of the given sizes (the rest in one more), with extensions."""
    out, i, n = b"", 0, 0
    while i < len(data):
        size = sizes[n] if n < len(sizes) else len(data) - i
        piece = data[i:i + size]
        e = (ext[n % len(ext)] if ext else "")
        # upper-case hex for odd chunks: both are valid
        hexsize = f"{len(piece):X}" if n % 2 else f"{len(piece):x}"
        out += f"{hexsize}{e}\r\n".encode() + piece + b"\r\n"
        i += len(piece)
        n += 1
    out += b"0\r\n" + b"".join(t.encode() + b"\r\n" for t in trailers) + b"\r\n"
    return out


def assert_spec_error(r: Resp, status: int, code: str) -> dict:
    """SPEC §8: status, `{"error":{"code","message"}}`, x-request-id, no key in it."""
    return assert_error(r, status, code)
