"""Streaming (SPEC §6, §7): the gateway asks upstream for usage, hides the usage it added,
passes the usage a client asked for, logs streamed token counts, and does not buffer SSE."""

from __future__ import annotations

import json
import re
import time

import pytest

import agw
from agw import API_VERSION, KEY


def _direct_usage(m: agw.Mock, path: str, body: dict) -> dict:
    """Usage of the same request sent straight to the mock (its numbers)."""
    with agw.http_client() as h:
        r = h.post(m.url + path, json={k: v for k, v in body.items() if k not in ("stream", "stream_options")})
        r.raise_for_status()
        return r.json()["usage"]


@pytest.fixture(scope="module")
def env(module_cluster):
    """One gateway for the tests that only read: "gpt-4o" (chat) and "instruct" (completions)."""
    m = module_cluster.mock("eastus-a")
    cfg = agw.make_config(
        deployments={"gpt-4o": [agw.member("b1")], "instruct": [agw.member("b1")]},
        backends=[agw.backend("b1", m)],
    )
    gw = module_cluster.gateway(cfg)
    return gw, m


def _stream(gw: agw.Gateway, path: str, body: dict) -> tuple[agw.httpx.Response, str]:
    with agw.http_client() as h:
        with h.stream("POST", gw.url + path, headers={"api-key": KEY}, json=body) as r:
            text = r.read().decode()
    return r, text


def test_stream_without_include_usage_hides_usage_and_counts_it(fresh):
    gw, m = fresh
    path = agw.chat_path("gpt-4o")
    body = agw.chat_body("Count the tokens of this streamed request, please.", stream=True)

    r, text = _stream(gw, path, body)
    assert r.status_code == 200, text
    assert r.headers.get("content-type", "").startswith("text/event-stream")

    # upstream: include_usage was added
    reqs = m.data_requests()
    assert len(reqs) == 1
    assert reqs[0]["stream"] is True
    assert (reqs[0]["stream_options"] or {}).get("include_usage") is True, reqs[0]

    # the client: no usage at all, content intact, [DONE] last
    assert '"usage"' not in text, f"the client did not ask for usage but got it:\n{text}"
    data = agw.sse_data(text)
    assert data[-1] == "[DONE]", data[-3:]
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks and all(c.get("choices") for c in chunks), "a chunk without choices reached the client"
    content = "".join(
        (c["choices"][0].get("delta") or {}).get("content") or "" for c in chunks
    )
    assert content == "Hello from eastus-a."
    assert text.endswith("data: [DONE]\n\n")

    # the audit log knows the streamed usage
    expected = _direct_usage(m, path, body)
    line = gw.audit_for(r.headers.get("x-request-id"))
    assert line["stream"] is True
    assert line["status"] == 200
    assert line["prompt_tokens"] == expected["prompt_tokens"]
    assert line["completion_tokens"] == expected["completion_tokens"]
    assert line["total_tokens"] == expected["prompt_tokens"] + expected["completion_tokens"]
    assert line["usage_source"] == "response"


def test_stream_with_include_usage_delivers_usage_chunk(fresh):
    gw, m = fresh
    path = agw.chat_path("gpt-4o")
    body = agw.chat_body("I do want my usage.", stream=True, stream_options={"include_usage": True})

    r, text = _stream(gw, path, body)
    assert r.status_code == 200, text
    data = agw.sse_data(text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    usage_chunks = [c for c in chunks if c.get("usage")]
    assert len(usage_chunks) == 1, f"expected one usage chunk:\n{text}"
    assert usage_chunks[0] is chunks[-1] and usage_chunks[0]["choices"] == []
    expected = _direct_usage(m, path, body)
    assert usage_chunks[0]["usage"]["prompt_tokens"] == expected["prompt_tokens"]
    assert usage_chunks[0]["usage"]["completion_tokens"] == expected["completion_tokens"]

    line = gw.audit_for(r.headers.get("x-request-id"))
    assert line["prompt_tokens"] == expected["prompt_tokens"]
    assert line["completion_tokens"] == expected["completion_tokens"]
    assert line["usage_source"] == "response"


def test_completions_stream_without_include_usage(fresh):
    gw, m = fresh
    path = f"/openai/deployments/instruct/completions?api-version={API_VERSION}"
    body = {"prompt": "Once upon a time", "max_tokens": 20, "stream": True}

    r, text = _stream(gw, path, body)
    assert r.status_code == 200, text
    reqs = m.data_requests()
    assert (reqs[0]["stream_options"] or {}).get("include_usage") is True, reqs[0]
    assert '"usage"' not in text, text
    data = agw.sse_data(text)
    assert data[-1] == "[DONE]"
    assert all(json.loads(d).get("choices") for d in data[:-1])
    line = gw.audit_for(r.headers.get("x-request-id"))
    expected = _direct_usage(m, path, body)
    assert line["prompt_tokens"] == expected["prompt_tokens"]
    assert line["completion_tokens"] == expected["completion_tokens"]
    assert line["usage_source"] == "response"


def test_sse_is_not_buffered(mock, gateway):
    """Chunks reach the client as the backend sends them."""
    m = mock("eastus-a", chunk_delay_ms=300)
    gw = gateway(agw.single(m))
    arrivals = []
    with agw.http_client() as h:
        t0 = time.monotonic()
        with h.stream("POST", gw.url + agw.chat_path("gpt-4o"), headers={"api-key": KEY},
                      json=agw.chat_body(stream=True)) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data:"):
                    arrivals.append((time.monotonic() - t0, line))
    assert arrivals and arrivals[-1][1].strip() == "data: [DONE]"
    first, last = arrivals[0][0], arrivals[-1][0]
    # the mock pauses 300 ms before each content chunk: a buffering proxy delivers all at once
    assert last - first >= 0.5, f"SSE arrived in one burst: {[round(t, 2) for t, _ in arrivals]}"


def test_a_client_that_hangs_up_mid_stream_is_499_not_a_server_error(cluster):
    """SPEC §8: a client that goes away before the response ended is normal traffic: audited
    as 499 ClientClosedRequest (not the 200 whose head it had received, never a 5xx), counted
    in downstream_errors_total{kind="client_closed"} and requests_total{code="499"}, and
    logged below warn."""
    from opsutil import metric_value, scrape

    m = cluster.mock("slow", chunk_delay_ms=300)
    gw = cluster.gateway(agw.single(m))

    def closed() -> float:
        return metric_value(scrape(gw), "aoai_gateway_downstream_errors_total",
                            kind="client_closed") or 0.0

    before = closed()
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True}
    with agw.http_client() as h:
        with h.stream("POST", gw.url + agw.chat_path("gpt-4o"), headers={"api-key": agw.KEY},
                      json=body) as r:
            assert r.status_code == 200
            rid = r.headers["x-request-id"]
            next(r.iter_raw())  # the first bytes, then hang up
    line = gw.audit_for(rid, timeout=15)
    assert (line["status"], line["error_code"]) == (499, "ClientClosedRequest"), line
    # Whatever was known by then is what is charged: tokens exactly when there is a source.
    assert (line["usage_source"] == "none") == (line["total_tokens"] is None), line
    agw.wait_until(lambda: closed() == before + 1, 5, "downstream_errors{client_closed} +1")
    assert metric_value(scrape(gw), "aoai_gateway_requests_total", code="499") == 1
    noisy = [l for l in gw.proc.stderr().splitlines() if " ERROR " in l or " WARN " in l]
    assert not noisy, noisy


def test_an_open_stream_keeps_a_small_connection_state(module_cluster):
    """Issue 18 (memory per open SSE stream): the state of an HTTP/1 connection, which every
    open stream holds for its whole life, stays small — the rarely used large stages
    (realtime, streamed forms, lists, a TLS connect to a backend) are boxed, and no step is
    kept twice. The gateway logs its size once at debug; this is the debug build's figure
    (9,888 bytes before those changes, 7,648 after; the release build's is about the same)."""
    m = module_cluster.mock("eastus-a")
    cfg = agw.make_config(
        deployments={"gpt-4o": [agw.member("b1")]}, backends=[agw.backend("b1", m)]
    )
    gw = module_cluster.gateway(cfg, env={"RUST_LOG": "gateway=debug"})
    r, text = _stream(gw, agw.chat_path("gpt-4o"), agw.chat_body("Hello there.", stream=True))
    assert r.status_code == 200, text
    assert agw.sse_data(text)[-1] == "[DONE]"
    found = None
    for _ in range(50):
        found = re.search(r"an HTTP/1 connection's state: (\d+) bytes", gw.proc.stderr())
        if found:
            break
        time.sleep(0.1)
    assert found, "the gateway did not log its connection state's size at debug"
    assert int(found.group(1)) <= 8192, found.group(0)
