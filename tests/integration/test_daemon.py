"""`aoai-gateway run --daemon` (SPEC §2's CLI): the command returns once the daemon has
started, and the daemon serves exactly as the foreground process does, including what runs on
threads of the gateway's own: the audit log's writer and the token tables (read in the
background at start). Pingora forks when it daemonizes, after the configuration is read, and a
thread started before that fork does not exist in the serving process: these threads start in
it (an audit log written before had no writer in the daemon, and its lines were lost).
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess

import httpx
import yaml

import agw
from agw import KEY


def threads_of(pid: int) -> list[str]:
    return [(t / "comm").read_text().strip() for t in pathlib.Path(f"/proc/{pid}/task").iterdir()]


def test_daemon_serves_and_writes_its_audit_log(cluster, tmp_path):
    backend = cluster.mock("daemon-east")
    ident = cluster.identity_mock()
    port, admin = agw.free_port(), agw.free_port()
    audit = tmp_path / "audit.log"
    cfg = agw.single(backend, health_checks={"interval_seconds": 3600})
    cfg["server"] = {"listeners": [{"address": f"127.0.0.1:{port}"}],
                     "admin_address": f"127.0.0.1:{admin}"}
    cfg["audit_log"] = {"path": str(audit)}
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    pid_file = tmp_path / "gateway.pid"
    env = agw.clean_env({
        "AOAI_GATEWAY_PID_FILE": str(pid_file),
        "AOAI_GATEWAY_UPGRADE_SOCK": str(tmp_path / "upgrade.sock"),
        "IDENTITY_ENDPOINT": f"{ident.url}/msi/token",
        "IDENTITY_HEADER": agw.MI_HEADER_SECRET,
    })
    # Files, not pipes: the daemon keeps the descriptors it was given.
    err = tmp_path / "gateway.stderr"
    with open(err, "wb") as errf:
        started = subprocess.run([str(agw.GATEWAY_BIN), "run", "-c", str(config), "--daemon"],
                                 env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=errf, timeout=60)
    assert started.returncode == 0, err.read_text()[-2000:]
    agw.wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 30,
                   "the daemon's pid file")
    pid = int(pid_file.read_text())
    try:
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{admin}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        agw.wait_until(ready, 30, "the daemon to answer /healthz")
        ids = []
        for i in range(3):
            r = httpx.post(base + agw.chat_path("gpt-4o"), headers={"api-key": KEY},
                           json=agw.chat_body(f"Hello {i}."), timeout=10)
            assert r.status_code == 200, r.text[:300]
            ids.append(r.headers["x-request-id"])

        def audited() -> bool:
            return audit.exists() and all(rid in audit.read_text() for rid in ids)

        agw.wait_until(audited, 10, "the daemon's audit lines")
        assert "audit-log" in threads_of(pid), threads_of(pid)
    finally:
        os.kill(pid, signal.SIGTERM)
    agw.wait_until(lambda: not pathlib.Path(f"/proc/{pid}").exists(), 30, "the daemon to exit")
