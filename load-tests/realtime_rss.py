#!/usr/bin/env python3
"""Memory of idle realtime sessions: the gateway's RSS with N concurrent idle WebSocket
sessions open through it, against the same gateway idle (issue 15's goal: 500 sessions cost
at most 64 MiB more).

    python3 load-tests/realtime_rss.py [BIN_DIR] [N]      # defaults: target/release 500

Starts an aoai-mock (realtime, backend key) and the gateway (one thread, API-key client,
audit log to a file) on loopback ports, warms the gateway up (chat requests and one realtime
session, so that lazy allocations are made), reads VmRSS from /proc, opens N sessions at once
(each waits for its `session.created`), waits, reads VmRSS again, closes them and reads it a
third time. Needs the `websockets` package.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import websockets

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "target" / "release")
N = int(sys.argv[2]) if len(sys.argv) > 2 else 500
KEY = "agw_" + "r" * 43


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))


def wait(pred, what: str, timeout: float = 30):
    end = time.time() + timeout
    while time.time() < end:
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


async def open_sessions(url: str, n: int):
    async def one():
        ws = await websockets.connect(url, additional_headers={"api-key": KEY},
                                      open_timeout=60, max_size=None)
        first = json.loads(await ws.recv())
        assert first["type"] == "session.created", first
        return ws

    # Opened in batches of 50 so that the accept queue never overflows.
    sessions = []
    for start in range(0, n, 50):
        sessions += await asyncio.gather(*(one() for _ in range(min(50, n - start))))
    return sessions


async def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="agw-rt-rss-"))
    mock_port, gw_port, admin_port = free_port(), free_port(), free_port()
    procs = []
    try:
        mock = subprocess.Popen(
            [str(BIN / "aoai-mock"), "--listen", f"127.0.0.1:{mock_port}", "--name", "rss",
             "--require-api-key", "rss-backend-key", "--threads", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(mock)
        cfg = f"""
server:
  listeners: [{{address: 127.0.0.1:{gw_port}}}]
  admin_address: 127.0.0.1:{admin_port}
  threads: 1
clients:
  - id: rss
    api_keys: [{{sha256: {hashlib.sha256(KEY.encode()).hexdigest()}}}]
    allow: {{deployments: ["*"], operations: ["*"]}}
deployments:
  gpt-rt: [{{backend: mock, deployment: gpt-rt-mock}}]
backends:
  - {{name: mock, url: "http://127.0.0.1:{mock_port}", region: local, credential: api_key, api_key: rss-backend-key}}
health_checks: {{interval_seconds: 3600}}
audit_log: {{path: {work}/audit.log}}
"""
        (work / "gateway.yaml").write_text(cfg)
        gw = subprocess.Popen([str(BIN / "aoai-gateway"), "run", "-c", str(work / "gateway.yaml")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(gw)
        wait(lambda: urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/healthz").status == 200,
             "the gateway")
        url = f"ws://127.0.0.1:{gw_port}/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-rt"

        # Warm-up: one session with a response, then a few sessions opened and closed.
        async with websockets.connect(url, additional_headers={"api-key": KEY}) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "response.create"}))
            while json.loads(await ws.recv())["type"] != "response.done":
                pass
        for ws in await open_sessions(url, 20):
            await ws.close()
        await asyncio.sleep(2)
        idle = rss_kib(gw.pid)

        sessions = await open_sessions(url, N)
        await asyncio.sleep(3)
        loaded = rss_kib(gw.pid)
        open_now = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics").read().decode()
        gauge = re.search(r"^aoai_gateway_realtime_sessions (\S+)$", open_now, re.M)

        await asyncio.gather(*(ws.close() for ws in sessions))
        await asyncio.sleep(3)
        after = rss_kib(gw.pid)

        extra = (loaded - idle) / 1024
        print(f"sessions open (gauge): {gauge.group(1) if gauge else '?'}")
        print(f"idle gateway RSS:            {idle / 1024:7.1f} MiB")
        print(f"with {N} idle sessions:     {loaded / 1024:7.1f} MiB  (+{extra:.1f} MiB, "
              f"{(loaded - idle) / max(N, 1):.1f} KiB a session)")
        print(f"after they closed:           {after / 1024:7.1f} MiB")
        print(f"goal +64 MiB for 500: {'met' if extra * 500 / max(N, 1) <= 64 else 'NOT met'}")
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    asyncio.run(main())
