"""Request ids (SPEC §8): every response carries a generated `x-request-id`; the backend's
`apim-request-id` is passed through and logged as `upstream_request_id`."""

from __future__ import annotations

import pytest

import agw
from agw import API_VERSION, KEY


@pytest.fixture(scope="module")
def env(module_cluster):
    m = module_cluster.mock("eastus-a")
    return module_cluster.gateway(agw.single(m)), m


def test_every_response_has_its_own_request_id(env):
    gw, m = env
    with agw.http_client() as h:
        responses = [
            h.post(gw.url + agw.chat_path("gpt-4o"), headers={"api-key": KEY}, json=agw.chat_body()),
            h.post(gw.url + agw.chat_path("gpt-4o"), headers={"api-key": KEY}, json=agw.chat_body()),
            h.post(gw.url + agw.chat_path("gpt-4o"), headers={"api-key": KEY},
                   json=agw.chat_body(stream=True)),
            h.post(gw.url + agw.chat_path("gpt-4o"), json=agw.chat_body()),  # 401
            h.post(gw.url + "/openai/fine_tuning/jobs", headers={"api-key": KEY}, json={}),  # 404
            h.get(f"{gw.url}/openai/models?api-version={API_VERSION}", headers={"api-key": KEY}),
            h.get(gw.url + "/healthz"),
        ]
    assert [r.status_code for r in responses][:3] == [200, 200, 200]
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(ids), list(zip([r.request.url.path for r in responses], ids))
    assert len(set(ids)) == len(ids), f"request ids repeat: {ids}"

    # the id the client got is the one in the audit log
    for r in responses[:6]:
        line = gw.audit_for(r.headers["x-request-id"])
        assert line["status"] == r.status_code


def test_backend_request_id_is_passed_through_and_logged(env):
    gw, m = env
    with agw.http_client() as h:
        direct = h.post(m.url + agw.chat_path("gpt-4o"), json=agw.chat_body())
        assert direct.headers.get("apim-request-id"), "the mock sends apim-request-id"
        r1 = h.post(gw.url + agw.chat_path("gpt-4o"), headers={"api-key": KEY}, json=agw.chat_body())
        r2 = h.post(gw.url + agw.chat_path("gpt-4o"), headers={"api-key": KEY}, json=agw.chat_body())
    up1, up2 = r1.headers.get("apim-request-id"), r2.headers.get("apim-request-id")
    assert up1 and up2 and up1 != up2, (up1, up2)
    # the gateway's own id, once — not the backend's x-request-id (which equals apim-request-id)
    assert len(r1.headers.get_list("x-request-id")) == 1, r1.headers.get_list("x-request-id")
    assert r1.headers["x-request-id"] != up1
    assert gw.audit_for(r1.headers["x-request-id"])["upstream_request_id"] == up1
    assert gw.audit_for(r2.headers["x-request-id"])["upstream_request_id"] == up2


def test_audit_line_fields(env):
    """One JSON line per request with every SPEC §8 field (null when it has no value)."""
    gw, m = env
    with agw.http_client() as h:
        r = h.post(gw.url + agw.chat_path("gpt-4o"), headers={"api-key": KEY},
                   json=agw.chat_body())
    assert r.status_code == 200
    line = gw.audit_for(r.headers["x-request-id"])
    fields = {"ts", "request_id", "client", "auth", "key_id", "user", "provider", "client_ip",
              "method", "path", "operation", "deployment", "backend", "region", "attempts",
              "status", "error_code", "stream", "prompt_tokens", "completion_tokens",
              "total_tokens", "usage_source", "duration_ms", "ttfb_ms", "upstream_request_id"}
    assert fields <= set(line), f"missing: {sorted(fields - set(line))}"
    assert line["ts"].endswith("Z") or line["ts"].endswith("+00:00"), line["ts"]
    assert line["method"] == "POST"
    assert line["path"] == "/openai/deployments/gpt-4o/chat/completions"
    assert line["client_ip"] == "127.0.0.1"
    assert line["user"] is None and line["provider"] is None and line["error_code"] is None
    assert line["attempts"] == 1
    assert isinstance(line["duration_ms"], (int, float)) and line["duration_ms"] >= 0
    assert KEY not in str(line)
    assert "Say hello" not in str(line), "the prompt must not be logged"
    assert "Hello from" not in str(line), "the completion must not be logged"
