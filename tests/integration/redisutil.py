"""A real `redis-server` for the integration tests: started on a free loopback port, killed
(SIGKILL, like a crash) and restarted on the same port.

No Redis client library is needed: the few commands the tests send (PING, KEYS, FLUSHALL) go
over a plain socket in RESP.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import agw


def redis_server_binary() -> str:
    path = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if not path or not os.access(path, os.X_OK):
        raise AssertionError(
            "redis-server is not installed, and the limit tests need a real one: run "
            "`scripts/install-deps.sh` (or `apt-get install redis-server`), or set REDIS_SERVER "
            "to its path"
        )
    return path


def _encode(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _Reader:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(f"redis error: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n).decode(errors="replace")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise RuntimeError(f"unexpected redis reply {line!r}")


class RedisServer:
    """One `redis-server` process: no persistence, loopback only, a fixed port across restarts."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.binary = redis_server_binary()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or agw.free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self._starts = 0
        self.log_paths: list[Path] = []

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, timeout: float = 15.0) -> "RedisServer":
        assert self.proc is None or self.proc.poll() is not None, "redis-server already running"
        self._starts += 1
        log = self.workdir / f"redis-{self.port}-{self._starts}.log"
        self.log_paths.append(log)
        argv = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--protected-mode", "no",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--logfile", str(log),
            "--daemonize", "no",
        ]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )

        def up():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise AssertionError(
                    f"redis-server exited at start-up (code {self.proc.returncode}) on port "
                    f"{self.port}: {err}\n{self.log_tail()}"
                )
            return self.command("PING") == "PONG"

        agw.wait_until(up, timeout, f"redis-server to answer PING on port {self.port}")
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash; waits until the port refuses connections."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

        def down():
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return False
            except OSError:
                return True

        agw.wait_until(down, 10, f"port {self.port} to refuse connections after killing redis")

    def restart(self, timeout: float = 15.0) -> "RedisServer":
        """Starts again on the same port (empty: nothing is persisted). The port may linger in
        TIME_WAIT briefly; redis sets SO_REUSEADDR, so binding succeeds at once."""
        self.kill()
        return self.start(timeout)

    def pause(self) -> None:
        """SIGSTOP: the server hangs with its connections open (a half-open peer)."""
        assert self.alive()
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        parts = []
        for p in self.log_paths:
            if p.exists():
                parts.append(f"--- {p.name} ---\n{p.read_text(errors='replace')[-n:]}")
        return "\n".join(parts)

    # -- commands -----------------------------------------------------------------------
    def command(self, *args: str, timeout: float = 2.0):
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(_encode(*args))
            return _Reader(s).reply()

    def keys(self, pattern: str = "*") -> list[str]:
        return sorted(self.command("KEYS", pattern))

    def flushall(self) -> None:
        assert self.command("FLUSHALL") == "OK"
