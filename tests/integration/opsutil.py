"""Helpers of test_operations.py: a real Prometheus server, the text exposition format, and
clients that keep sending requests in the background while a test reloads or upgrades the
gateway."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

import agw

PROMETHEUS_BIN = shutil.which("prometheus")
PROMTOOL_BIN = shutil.which("promtool")


# --------------------------------------------------------------------------------------
# /metrics text


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict
    value: float


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> tuple[list[Sample], dict[str, str]]:
    """Samples and `# TYPE` declarations of a Prometheus text exposition."""
    samples: list[Sample] = []
    types: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            types[name] = kind.strip()
            continue
        if line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"unparseable /metrics line: {line!r}"
        name, raw_labels, value = m.groups()
        labels = {k: v.encode().decode("unicode_escape") for k, v in _LABEL.findall(raw_labels or "")}
        samples.append(Sample(name, labels, float(value)))
    return samples, types


def metric_value(samples: list[Sample], name: str, **labels) -> float | None:
    """The sum of the samples of `name` whose labels include `labels` (None: no such sample)."""
    found = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(found) if found else None


def scrape(gw: agw.Gateway) -> list[Sample]:
    r = gw.admin.get("/metrics")
    assert r.status_code == 200, r.text
    return parse_metrics(r.text)[0]


# --------------------------------------------------------------------------------------
# Prometheus


class Prometheus:
    """A Prometheus server on a loopback port, scraping `targets` every second."""

    def __init__(self, cluster: agw.Cluster, targets: list[str], rule_files: list[Path] = (),
                 interval: str = "1s"):
        assert PROMETHEUS_BIN, "prometheus is not installed (Debian package `prometheus`; `make deps`)"
        self.dir = cluster.workdir / "prometheus"
        self.dir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {
                    "job_name": "aoai-gateway",
                    "scrape_interval": interval,
                    "scrape_timeout": interval,
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": targets}],
                }
            ],
        }
        cfg_path = self.dir / "prometheus.yml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.port = agw.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = agw.Proc(
            "prometheus",
            [
                PROMETHEUS_BIN,
                f"--config.file={cfg_path}",
                f"--storage.tsdb.path={self.dir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            self.dir,
            agw.clean_env(),
        )
        cluster.procs.append(self.proc)
        self.http = agw.http_client(base_url=self.url, timeout=10.0)

        def ready():
            if not self.proc.alive():
                raise AssertionError(f"prometheus exited at start-up:\n{self.proc.tail()}")
            return self.http.get("/-/ready").status_code == 200

        agw.wait_until(ready, 60, "prometheus to be ready")

    def api(self, path: str, **params) -> dict:
        r = self.http.get(f"/api/v1/{path}", params=params)
        body = r.json()
        assert r.status_code == 200 and body.get("status") == "success", (
            f"prometheus /api/v1/{path} {params}: {r.status_code} {body}"
        )
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query; returns the vector's elements (`metric`, `value`)."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def by_labels(self, expr: str, *label_names: str) -> dict[tuple, float]:
        return {
            tuple(e["metric"].get(n, "") for n in label_names): float(e["value"][1])
            for e in self.query(expr)
        }

    def wait_scraped(self, timeout: float = 30.0) -> None:
        """Until every target has been scraped successfully at least once."""

        def up():
            targets = self.api("targets")["activeTargets"]
            return targets and all(t["health"] == "up" for t in targets)

        agw.wait_until(up, timeout, "prometheus to scrape every target")


# --------------------------------------------------------------------------------------
# Continuous traffic


@dataclass
class Traffic:
    """Clients that send chat requests continuously, each in its own thread:
    `keepalive` reuses one connection; `fresh` opens a new connection per request. Every
    answer other than 200 with the mock's full reply, and every transport error, is recorded
    in `failures`."""

    url: str
    key: str = agw.KEY
    deployment: str = "gpt-4o"
    modes: tuple = ("keepalive", "fresh")
    pause: float = 0.01
    ok: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(m,), name=f"traffic-{m}", daemon=True)
            for m in self.modes
        ]
        self._lock = threading.Lock()

    def __enter__(self) -> "Traffic":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def total_ok(self) -> int:
        with self._lock:
            return sum(self.ok.values())

    def _one(self, client: httpx.Client, mode: str, n: int) -> None:
        body = agw.chat_body(f"traffic {mode} {n}")
        try:
            r = client.post(agw.chat_path(self.deployment), json=body, headers={"api-key": self.key})
        except Exception as exc:  # noqa: BLE001 - every transport error is a failed request
            self.failures.append((time.time(), mode, n, repr(exc)))
            return
        try:
            content = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None
        except Exception:  # noqa: BLE001
            content = None
        if r.status_code != 200 or not content or not content.startswith("Hello from "):
            self.failures.append((time.time(), mode, n, f"{r.status_code} {r.text[:300]}"))
            return
        with self._lock:
            self.ok[mode] = self.ok.get(mode, 0) + 1

    def _run(self, mode: str) -> None:
        n = 0
        if mode == "keepalive":
            with agw.http_client(base_url=self.url, timeout=30.0) as client:
                while not self._stop.is_set():
                    n += 1
                    self._one(client, mode, n)
                    time.sleep(self.pause)
        else:
            while not self._stop.is_set():
                n += 1
                with agw.http_client(base_url=self.url, timeout=30.0) as client:
                    self._one(client, mode, n)
                time.sleep(self.pause)


class SlowStream:
    """One streamed chat request read chunk by chunk in a thread; `first_chunk` is set when the
    first SSE event arrived, `done` when the stream ended."""

    def __init__(self, url: str, key: str = agw.KEY, deployment: str = "gpt-4o"):
        self.url = url
        self.key = key
        self.deployment = deployment
        self.first_chunk = threading.Event()
        self.done = threading.Event()
        self.status: int | None = None
        self.text = ""
        self.error: str | None = None
        self.chunk_times: list[float] = []
        self._thread = threading.Thread(target=self._run, name="slow-stream", daemon=True)

    def start(self) -> "SlowStream":
        self._thread.start()
        return self

    def join(self, timeout: float = 60) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            with agw.http_client(base_url=self.url, timeout=60.0) as client:
                with client.stream(
                    "POST",
                    agw.chat_path(self.deployment),
                    json=agw.chat_body("stream through a reload", stream=True),
                    headers={"api-key": self.key},
                ) as r:
                    self.status = r.status_code
                    for chunk in r.iter_text():
                        self.text += chunk
                        self.chunk_times.append(time.monotonic())
                        if "data:" in self.text:
                            self.first_chunk.set()
        except Exception as exc:  # noqa: BLE001
            self.error = repr(exc)
        finally:
            self.first_chunk.set()
            self.done.set()

    def content(self) -> str:
        """The concatenated `delta.content` of the stream's chunks."""
        out = ""
        for data in agw.sse_data(self.text):
            if data == "[DONE]":
                continue
            for choice in json.loads(data).get("choices", []):
                out += (choice.get("delta") or {}).get("content") or ""
        return out
