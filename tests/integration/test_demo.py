"""`make run`: the demo script starts the gateway in front of aoai-mock and prints a curl line
and an `openai` SDK snippet; both must work exactly as printed (SPEC §10)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time

import agw

DEMO_PORTS = (8080, 9464, 18081, 18082)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_make_run_demo_answers_the_printed_curl_and_sdk_snippet():
    busy = [p for p in DEMO_PORTS if not _port_free(p)]
    assert not busy, f"the demo's ports are in use by something else: {busy}"
    agw.require_binary(agw.GATEWAY_BIN)
    agw.require_binary(agw.MOCK_BIN)
    proc = subprocess.Popen(
        ["bash", str(agw.REPO / "scripts" / "run-demo.sh"), str(agw.BIN_DIR)],
        cwd=agw.REPO, env=agw.clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    lines: list[str] = []
    done = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "RT" and any("<<'RT'" in x for x in lines):
                done.set()
        done.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert done.wait(90), "the demo did not print its instructions:\n" + "".join(lines)
        text = "".join(lines)
        curl = re.search(r"^(curl .*?)\n\n", text, re.S | re.M)
        snippet = re.search(r"^python3 - <<'PY'\n(.*?)\nPY$", text, re.S | re.M)
        assert curl and snippet, "no curl line or SDK snippet in:\n" + text

        out = subprocess.run(["bash", "-c", curl.group(1)], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert '"content":"Hello from eastus."' in out.stdout, out.stdout

        env = agw.clean_env()
        py = subprocess.run(["python3", "-c", snippet.group(1)], capture_output=True, text=True,
                            timeout=60, env=env)
        assert py.returncode == 0, py.stderr
        printed = py.stdout.splitlines()
        assert printed[0].startswith("Hello from eastus."), py.stdout  # plain, with its usage
        assert "completion_tokens=4" in printed[0], py.stdout
        assert printed[1] == "Hello from eastus.", py.stdout  # streamed, chunk by chunk

        # The realtime snippet: a WebSocket session through the gateway.
        realtime = re.search(r"^python3 - <<'RT'\n(.*?)\nRT$", text, re.S | re.M)
        assert realtime, "no realtime snippet in:\n" + text
        rt = subprocess.run(["python3", "-c", realtime.group(1)], capture_output=True, text=True,
                            timeout=60, env=env)
        assert rt.returncode == 0, rt.stderr
        said = rt.stdout.splitlines()
        assert said[0] == "Hello from eastus.", rt.stdout
        assert "input_tokens=120" in said[1] and "output_tokens=80" in said[1], rt.stdout

        # The demo's audit log (on its terminal) has both requests, attributed to the demo key.
        deadline = time.time() + 5
        while time.time() < deadline and "".join(lines).count('"client":"demo-app"') < 4:
            time.sleep(0.1)
        assert "".join(lines).count('"client":"demo-app"') >= 4, "".join(lines)
        assert '"operation":"realtime"' in "".join(lines), "".join(lines)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline and not all(_port_free(p) for p in DEMO_PORTS):
        time.sleep(0.1)
    assert all(_port_free(p) for p in DEMO_PORTS), "the demo left processes listening"
