"""Harness of the aoai-gateway integration tests: processes, configurations, clients.

Every process listens on 127.0.0.1 and every request goes to 127.0.0.1: nothing here sends
traffic anywhere else (the gateway's managed-identity endpoint is always an aoai-mock, see
`Cluster.gateway`).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("AGW_BIN_DIR") or REPO / "target" / "debug")
GATEWAY_BIN = BIN_DIR / "aoai-gateway"
MOCK_BIN = BIN_DIR / "aoai-mock"

API_VERSION = "2024-10-21"
HEALTH_PATH = f"/openai/models?api-version={API_VERSION}"


def make_key(seed: str) -> str:
    """A well-formed gateway key (`agw_` + 43 base64url characters), derived from `seed`."""
    digest = hashlib.sha256(f"aoai-gateway integration {seed}".encode()).digest()
    return "agw_" + base64.urlsafe_b64encode(digest).decode().rstrip("=")


# The API key of the default client (its SHA-256 is what the configuration stores).
KEY = make_key("test key")
# A well-formed key that no configuration lists unless a test says so.
OTHER_KEY = make_key("other key")

# What the managed-identity endpoint (an aoai-mock) hands out, and the secret it requires.
MI_TOKEN = "mi-token-integration-0123456789"
MI_HEADER_SECRET = "identity-header-secret-42"

START_TIMEOUT = 60.0
STOP_GRACE = 5.0


def sha256_hex(text: str | bytes) -> str:
    if isinstance(text, str):
        text = text.encode()
    return hashlib.sha256(text).hexdigest()


KEY_SHA256 = sha256_hex(KEY)
OTHER_KEY_SHA256 = sha256_hex(OTHER_KEY)


def free_port() -> int:
    """A free loopback port (bound, read, closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05):
    """Poll `pred` until it returns a truthy value (returned) or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = pred()
            if value:
                return value
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - polled conditions may fail transiently
            last_exc = exc
        if time.monotonic() >= deadline:
            extra = f" (last error: {last_exc!r})" if last_exc else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


def require_binary(path: Path) -> Path:
    if not path.is_file() or not os.access(path, os.X_OK):
        raise AssertionError(
            f"binary {path} is missing: build it first (`make test` does, or "
            f"`cargo build -p gateway -p aoai-mock`), or point AGW_BIN_DIR at the directory "
            f"that holds aoai-gateway and aoai-mock"
        )
    return path


def http_client(**kw) -> httpx.Client:
    """An httpx client that ignores proxy settings from the environment."""
    kw.setdefault("timeout", 30.0)
    kw.setdefault("trust_env", False)
    return httpx.Client(**kw)


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: no proxies, no Azure credentials of this machine."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not re.match(
            r"(?i)^(https?_proxy|all_proxy|no_proxy|azure_.*|identity_.*|msi_.*|imds_.*)$", k
        )
    }
    env.setdefault("RUST_BACKTRACE", "1")
    env.setdefault("RUST_LOG", "info")
    env["NO_PROXY"] = "127.0.0.1,localhost"
    if extra:
        env.update(extra)
    return env


# --------------------------------------------------------------------------------------
# Processes


# Children get the default action for the signals the tests send, however the suite was
# started: under `nohup` SIGHUP is ignored, that is inherited, and a shell script cannot
# trap a signal ignored at its start (the supervisor script's SIGHUP forward would be lost).
for _sig in (signal.SIGHUP, signal.SIGUSR2, signal.SIGTERM, signal.SIGQUIT):
    if signal.getsignal(_sig) == signal.SIG_IGN:
        signal.signal(_sig, signal.SIG_DFL)


class Proc:
    """A child process with stdout/stderr in files (shown when a test fails)."""

    def __init__(self, label: str, argv: list[str], workdir: Path, env: dict[str, str]):
        self.label = label
        self.argv = argv
        workdir.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", label)
        self.stdout_path = workdir / f"{safe}.stdout"
        self.stderr_path = workdir / f"{safe}.stderr"
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
            env=env,
            cwd=workdir,
            start_new_session=True,
        )
        self.exited_early: int | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def tail(self, n: int = 6000) -> str:
        out, err = self.stdout(), self.stderr()
        return (
            f"$ {' '.join(self.argv)}\n(exit: {self.proc.poll()})\n"
            f"--- stdout (last {n} chars) ---\n{out[-n:]}\n"
            f"--- stderr (last {n} chars) ---\n{err[-n:]}"
        )

    def stop(self, grace: float = STOP_GRACE) -> int | None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        self._out.close()
        self._err.close()
        return self.proc.returncode


class Mock:
    """A running aoai-mock."""

    def __init__(self, name: str, proc: Proc, port: int):
        self.name = name
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.http = http_client(base_url=self.url)

    def faults(self, **kw) -> dict:
        r = self.http.post("/_mock/faults", json=kw)
        assert r.status_code < 300, f"mock {self.name} refused faults {kw}: {r.status_code} {r.text}"
        return r.json() if r.content else {}

    def requests(self) -> list[dict]:
        r = self.http.get("/_mock/requests")
        r.raise_for_status()
        return r.json()

    def data_requests(self) -> list[dict]:
        """Recorded requests other than the gateway's health checks (GET /openai/models)."""
        return [
            q
            for q in self.requests()
            if not (q.get("method") == "GET" and q.get("path") == "/openai/models")
        ]

    def clear(self) -> None:
        self.http.delete("/_mock/requests").raise_for_status()

    def stats(self) -> dict:
        r = self.http.get("/_mock/stats")
        r.raise_for_status()
        return r.json()

    def close(self) -> None:
        self.http.close()


class Gateway:
    """A running aoai-gateway."""

    def __init__(self, proc: Proc, config: dict, config_path: Path, audit_path: Path):
        self.proc = proc
        self.process = proc.proc
        self.config = config
        self.config_path = config_path
        self.audit_path = audit_path
        self.listeners = [l["address"] for l in config["server"]["listeners"]]
        self.url = f"http://{self.listeners[0]}"
        self.admin_url = f"http://{config['server']['admin_address']}"
        self.http = http_client(base_url=self.url)
        self.admin = http_client(base_url=self.admin_url)

    def audit_lines(self) -> list[dict]:
        if not self.audit_path.exists():
            return []
        text = self.audit_path.read_text()
        lines = []
        for raw in text.split("\n")[:-1]:  # only complete lines
            if raw.strip():
                try:
                    lines.append(json.loads(raw))
                except json.JSONDecodeError as exc:
                    raise AssertionError(f"audit log line is not JSON: {raw!r}") from exc
        return lines

    def wait_audit(self, pred: Callable[[dict], bool], timeout: float = 10.0, what: str = "") -> dict:
        def find():
            for line in self.audit_lines():
                if pred(line):
                    return line
            return None

        try:
            return wait_until(find, timeout, f"an audit log line {what}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; audit log so far: {self.audit_lines()!r}") from None

    def audit_for(self, request_id: str, timeout: float = 10.0) -> dict:
        assert request_id, "response had no x-request-id"
        return self.wait_audit(
            lambda l: l.get("request_id") == request_id, timeout, f"with request_id {request_id}"
        )

    def close(self) -> None:
        self.http.close()
        self.admin.close()


class Cluster:
    """Starts mocks and gateways for one test (or one module) and stops them all at the end."""

    def __init__(self, workdir: Path, parent: "Cluster | None" = None):
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.mocks: list[Mock] = []
        self.gateways: list[Gateway] = []
        self._parent = parent
        self._identity: Mock | None = None
        self._n = 0

    # -- aoai-mock ------------------------------------------------------------------
    def mock(self, name: str, **flags) -> Mock:
        """Start `aoai-mock --name NAME`; keyword flags become CLI flags
        (`fail_429_count=1` → `--fail-429-count 1`, `oidc=True` → `--oidc`)."""
        require_binary(MOCK_BIN)
        argv = [str(MOCK_BIN), "--listen", "127.0.0.1:0", "--name", name]
        for key, value in flags.items():
            opt = "--" + key.replace("_", "-")
            if value is True:
                argv.append(opt)
            elif value is False or value is None:
                continue
            else:
                argv += [opt, str(value)]
        self._n += 1
        proc = Proc(f"mock-{name}-{self._n}", argv, self.workdir, clean_env())
        self.procs.append(proc)

        def listening():
            if not proc.alive():
                raise AssertionError(f"aoai-mock {name} exited at start-up:\n{proc.tail()}")
            m = re.search(r"aoai-mock listening on 127\.0\.0\.1:(\d+)", proc.stdout())
            return int(m.group(1)) if m else None

        try:
            port = wait_until(listening, START_TIMEOUT, f"aoai-mock {name} to listen")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{proc.tail()}") from None
        mock = Mock(name, proc, port)
        self.mocks.append(mock)
        return mock

    def identity_mock(self) -> Mock:
        """The managed-identity endpoint shared by the gateways of this cluster (and, with a
        parent cluster, of the whole session)."""
        if self._parent is not None:
            return self._parent.identity_mock()
        if self._identity is None:
            self._identity = self.mock(
                "identity", identity_token=MI_TOKEN, identity_header=MI_HEADER_SECRET
            )
        return self._identity

    # -- aoai-gateway ----------------------------------------------------------------
    def gateway(self, config: dict, env: dict[str, str] | None = None, wait: bool = True) -> Gateway:
        """Write `config` (completed with loopback listener/admin ports and an audit file
        unless given) to YAML and run `aoai-gateway run -c FILE`.

        Unless `env` sets IDENTITY_ENDPOINT, the gateway's managed identity is an aoai-mock
        (App Service protocol) so that no request leaves the machine.
        """
        require_binary(GATEWAY_BIN)
        self._n += 1
        n = self._n
        config = copy.deepcopy(config)
        server = config.setdefault("server", {})
        server.setdefault("listeners", [{"address": f"127.0.0.1:{free_port()}"}])
        server.setdefault("admin_address", f"127.0.0.1:{free_port()}")
        audit_path = self.workdir / f"audit-{n}.log"
        config.setdefault("audit_log", {}).setdefault("path", str(audit_path))
        audit_path = Path(config["audit_log"]["path"])
        config_path = self.workdir / f"gateway-{n}.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))

        env = dict(env or {})
        if "IDENTITY_ENDPOINT" not in env:
            ident = self.identity_mock()
            env["IDENTITY_ENDPOINT"] = f"{ident.url}/msi/token"
            env["IDENTITY_HEADER"] = MI_HEADER_SECRET
        proc = Proc(
            f"gateway-{n}",
            [str(GATEWAY_BIN), "run", "-c", str(config_path)],
            self.workdir,
            clean_env(env),
        )
        self.procs.append(proc)
        gw = Gateway(proc, config, config_path, audit_path)
        self.gateways.append(gw)
        if wait:
            self.wait_ready(gw)
        return gw

    def wait_ready(self, gw: Gateway) -> None:
        def ready():
            if not gw.proc.alive():
                raise AssertionError("aoai-gateway exited at start-up")
            try:
                gw.admin.get("/healthz", timeout=2)
            except httpx.HTTPError:
                return False
            for addr in gw.listeners:
                host, port = addr.rsplit(":", 1)
                try:
                    socket.create_connection((host, int(port)), timeout=2).close()
                except OSError:
                    return False
            return True

        try:
            wait_until(ready, START_TIMEOUT, "aoai-gateway to answer /healthz and accept")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\nconfig {gw.config_path}:\n{gw.config_path.read_text()}\n{gw.proc.tail()}"
            ) from None

    def close(self) -> list[str]:
        """Stop everything; return complaints (a gateway that had died during the test)."""
        problems = []
        for gw in self.gateways:
            if not gw.proc.alive():
                problems.append(
                    f"aoai-gateway exited during the test (code {gw.process.returncode}):\n"
                    f"{gw.proc.tail()}"
                )
            gw.close()
        for mock in self.mocks:
            mock.close()
        for proc in reversed(self.procs):
            proc.stop()
        return problems


# --------------------------------------------------------------------------------------
# Configuration builders


def backend(name: str, target: "Mock | str", region: str = "eastus",
            credential: str = "managed_identity", **kw) -> dict:
    url = target.url if isinstance(target, Mock) else target
    return {"name": name, "url": url, "region": region, "credential": credential, **kw}


def member(backend_name: str, deployment: str | None = None, priority: int | None = None,
           weight: int | None = None) -> dict:
    m: dict[str, Any] = {"backend": backend_name}
    if deployment is not None:
        m["deployment"] = deployment
    if priority is not None:
        m["priority"] = priority
    if weight is not None:
        m["weight"] = weight
    return m


def api_key(sha256: str = KEY_SHA256, expires: str | None = None) -> dict:
    k = {"sha256": sha256}
    if expires:
        k["expires"] = expires
    return k


def client(id: str = "test-client", keys: Iterable["dict | str"] = (KEY_SHA256,),
           deployments: Iterable[str] = ("*",), operations: Iterable[str] = ("*",),
           **kw) -> dict:
    return {
        "id": id,
        "api_keys": [k if isinstance(k, dict) else api_key(k) for k in keys],
        "allow": {"deployments": list(deployments), "operations": list(operations)},
        **kw,
    }


def make_config(*, deployments: dict, backends: list[dict], clients: list[dict] | None = None,
                server: dict | None = None, retries: dict | None = None,
                health_checks: dict | None = None, **sections) -> dict:
    """A complete configuration; `server.listeners`, `server.admin_address` and
    `audit_log.path` are filled in by `Cluster.gateway` when absent."""
    cfg: dict[str, Any] = {
        "server": {
            "threads": 2,
            "max_request_body_bytes": 26214400,
            "request_timeout_seconds": 30,
            **(server or {}),
        },
        "clients": clients if clients is not None else [client()],
        "deployments": deployments,
        "backends": backends,
        "upstream_identity": {
            "source": "managed_identity",
            "scope": "https://cognitiveservices.azure.com/.default",
        },
        "health_checks": {
            "interval_seconds": 1,
            "timeout_seconds": 1,
            "failures_before_down": 2,
            "successes_before_up": 1,
            "path": HEALTH_PATH,
            **(health_checks or {}),
        },
        "retries": {
            "max_attempts": 3,
            "on_status": [408, 429, 500, 502, 503, 504],
            "default_cooldown_seconds": 10,
            "max_cooldown_seconds": 60,
            **(retries or {}),
        },
    }
    cfg.update(sections)
    return cfg


def single(mock: Mock, deployment: str = "gpt-4o", backend_deployment: str | None = None,
           credential: str = "managed_identity", **kw) -> dict:
    """A configuration with one deployment served by one backend (the mock)."""
    b = backend("b1", mock, credential=credential)
    return make_config(
        deployments={deployment: [member("b1", backend_deployment)]}, backends=[b], **kw
    )


# --------------------------------------------------------------------------------------
# Client-side helpers


def chat_path(deployment: str) -> str:
    return f"/openai/deployments/{deployment}/chat/completions?api-version={API_VERSION}"


def chat_body(content: str = "Say hello.", **kw) -> dict:
    return {"messages": [{"role": "user", "content": content}], **kw}


def azure_client(gw: Gateway, key: str = KEY, **kw):
    import openai

    return openai.AzureOpenAI(
        azure_endpoint=gw.url,
        api_key=key,
        api_version=kw.pop("api_version", API_VERSION),
        max_retries=0,
        http_client=http_client(),
        **kw,
    )


def openai_client(gw: Gateway, key: str = KEY, **kw):
    import openai

    return openai.OpenAI(
        base_url=gw.url + "/openai/v1", api_key=key, max_retries=0, http_client=http_client(), **kw
    )


def assert_error(resp, status: int, code: str, secrets: Iterable[str] = (KEY, OTHER_KEY)) -> dict:
    """The response is the gateway's SPEC §8 error: status, JSON shape, code, x-request-id,
    and no secret in its body or headers."""
    text = resp.text if hasattr(resp, "text") else resp.body.decode(errors="replace")
    status_code = resp.status_code
    assert status_code == status, f"expected {status} {code}, got {status_code}: {text[:500]}"
    ctype = resp.headers.get("content-type", "")
    assert ctype.startswith("application/json"), f"error content-type is {ctype!r}: {text[:200]}"
    body = json.loads(text)
    assert isinstance(body, dict) and set(body) == {"error"}, f"error body shape: {body!r}"
    err = body["error"]
    assert isinstance(err, dict), body
    assert err.get("code") == code, f"expected code {code}, got {body!r}"
    assert isinstance(err.get("message"), str) and err["message"].strip(), body
    assert resp.headers.get("x-request-id"), f"no x-request-id on {status} {code}"
    header_text = "\n".join(f"{k}: {v}" for k, v in resp.headers.items())
    for s in secrets:
        assert s not in text, f"error body contains a credential: {text!r}"
        assert s not in header_text, "error headers contain a credential"
    return body


def sse_data(text: str) -> list[str]:
    """The `data:` payloads of an SSE stream, in order."""
    out = []
    for line in text.splitlines():
        if line.startswith("data:"):
            out.append(line[5:].lstrip(" "))
    return out


@dataclass
class RawResponse:
    status_code: int
    headers: dict[str, str]
    body: bytes
    raw_head: str = ""

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self):
        return json.loads(self.body)


class _Headers(dict):
    def get(self, key, default=None):  # case-insensitive
        return super().get(key.lower(), default)


def raw_request(base_url: str, method: str, target: str, headers: dict[str, str] | None = None,
                body: bytes = b"", timeout: float = 30.0) -> RawResponse:
    """One HTTP/1.1 request with the request target sent byte for byte (no normalization of
    `..` or percent-escapes, unlike httpx)."""
    u = urlsplit(base_url)
    sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
    try:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {u.hostname}:{u.port}", "Connection: close"]
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    head_lines = head.decode("latin-1").split("\r\n")
    status = int(head_lines[0].split()[1])
    hdrs = _Headers()
    for line in head_lines[1:]:
        k, _, v = line.partition(":")
        k = k.strip().lower()
        hdrs[k] = (hdrs[k] + ", " + v.strip()) if k in hdrs else v.strip()
    if "chunked" in hdrs.get("transfer-encoding", "").lower():
        decoded = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            decoded += rest[:size]
            rest = rest[size + 2:]
        rest = decoded
    return RawResponse(status, hdrs, rest, head.decode("latin-1"))


@dataclass
class TwoResources:
    """A gateway in front of two mock Azure resources, `east` and `west`."""

    gw: Gateway
    east: Mock
    west: Mock

    @property
    def mocks(self) -> list[Mock]:
        return [self.east, self.west]

    def clear(self) -> None:
        for m in self.mocks:
            m.clear()
