"""Errors exactly as SPEC §8: status, `{"error":{"code","message"}}`, `x-request-id`,
`WWW-Authenticate: Bearer` on 401, no credential in any error — and requests refused by the
gateway never reach a backend."""

from __future__ import annotations

import time

import httpx
import pytest

import agw
from agw import API_VERSION, KEY, OTHER_KEY, assert_error

ALL_KEY = agw.make_key("all")            # client "all": every deployment and operation
EXPIRED_KEY = agw.make_key("expired")    # a key of test-client that expired in 2020
ROTATED_KEY = agw.make_key("rotated")    # a second, unexpired key of test-client
SECRETS = (KEY, OTHER_KEY, ALL_KEY, EXPIRED_KEY, ROTATED_KEY)


@pytest.fixture(scope="module")
def env(module_cluster):
    m = module_cluster.mock("eastus-a")
    cfg = agw.make_config(
        server={"max_request_body_bytes": 65536},
        deployments={
            "gpt-4o": [agw.member("east")],
            "text-embedding-3-large": [agw.member("east")],
            "restricted": [agw.member("east")],
        },
        backends=[agw.backend("east", m)],
        clients=[
            agw.client(
                "test-client",
                keys=[
                    agw.api_key(agw.KEY_SHA256),
                    agw.api_key(agw.sha256_hex(ROTATED_KEY), expires="2099-01-01T00:00:00Z"),
                    agw.api_key(agw.sha256_hex(EXPIRED_KEY), expires="2020-01-01T00:00:00Z"),
                ],
                deployments=["gpt-4o", "text-embedding-3-large"],
                operations=["chat.completions"],
            ),
            agw.client("all", keys=[agw.sha256_hex(ALL_KEY)]),
        ],
    )
    gw = module_cluster.gateway(cfg)
    return gw, m


def post(gw, path, headers=None, **kw) -> httpx.Response:
    with agw.http_client() as h:
        return h.post(gw.url + path, headers=headers or {}, **kw)


def errors(resp, status, code):
    return assert_error(resp, status, code, secrets=SECRETS)


# -- identity --------------------------------------------------------------------------


def test_no_credential_is_401_missing_credential(env):
    gw, m = env
    m.clear()
    r = post(gw, agw.chat_path("gpt-4o"), json=agw.chat_body())
    errors(r, 401, "MissingCredential")
    assert r.headers.get("www-authenticate", "").startswith("Bearer"), r.headers
    line = gw.audit_for(r.headers["x-request-id"])
    assert line["client"] == "anonymous"
    assert line["auth"] == "none"
    assert line["status"] == 401
    assert line["error_code"] == "MissingCredential"
    assert m.data_requests() == []


@pytest.mark.parametrize("headers", [
    {"api-key": OTHER_KEY},
    {"Authorization": f"Bearer {OTHER_KEY}"},
    {"api-key": "not-even-a-gateway-key"},
], ids=["api-key", "bearer-agw", "garbage"])
def test_unknown_key_is_401_invalid_credential(env, headers):
    gw, m = env
    m.clear()
    r = post(gw, agw.chat_path("gpt-4o"), headers=headers, json=agw.chat_body())
    errors(r, 401, "InvalidCredential")
    assert r.headers.get("www-authenticate", "").startswith("Bearer")
    line = gw.audit_for(r.headers["x-request-id"])
    assert line["client"] == "anonymous"
    assert line["auth"] == "api_key"
    assert OTHER_KEY not in str(line)
    assert m.data_requests() == []


def test_expired_key_is_401(env):
    gw, m = env
    r = post(gw, agw.chat_path("gpt-4o"), headers={"api-key": EXPIRED_KEY}, json=agw.chat_body())
    errors(r, 401, "InvalidCredential")
    assert r.headers.get("www-authenticate", "").startswith("Bearer")


def test_every_unexpired_key_of_a_client_works(env):
    gw, _ = env
    for key in (KEY, ROTATED_KEY):
        r = post(gw, agw.chat_path("gpt-4o"), headers={"api-key": key}, json=agw.chat_body())
        assert r.status_code == 200, r.text


def test_bearer_gateway_key_is_accepted(env):
    gw, _ = env
    r = post(gw, agw.chat_path("gpt-4o"), headers={"Authorization": f"Bearer {KEY}"},
             json=agw.chat_body())
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hello from eastus-a."


@pytest.mark.parametrize("headers", [
    {"api-key": KEY, "Authorization": f"Bearer {OTHER_KEY}"},
    {"api-key": OTHER_KEY, "Authorization": f"Bearer {KEY}"},
], ids=["good-api-key-bad-bearer", "bad-api-key-good-bearer"])
def test_a_failing_credential_fails_even_with_a_good_one(env, headers):
    gw, _ = env
    r = post(gw, agw.chat_path("gpt-4o"), headers=headers, json=agw.chat_body())
    errors(r, 401, "InvalidCredential")


# -- authorization ---------------------------------------------------------------------


def test_deployment_not_allowed_is_403(env):
    gw, m = env
    m.clear()
    r = post(gw, agw.chat_path("restricted"), headers={"api-key": KEY}, json=agw.chat_body())
    errors(r, 403, "DeploymentNotAllowed")
    r = post(gw, "/openai/v1/chat/completions", headers={"api-key": KEY},
             json=agw.chat_body(model="restricted"))
    errors(r, 403, "DeploymentNotAllowed")
    line = gw.audit_for(r.headers["x-request-id"])
    assert line["client"] == "test-client" and line["error_code"] == "DeploymentNotAllowed"
    assert m.data_requests() == []


def test_operation_not_allowed_is_403(env):
    gw, m = env
    m.clear()
    r = post(gw, f"/openai/deployments/text-embedding-3-large/embeddings?api-version={API_VERSION}",
             headers={"api-key": KEY}, json={"input": "hello"})
    errors(r, 403, "OperationNotAllowed")
    with agw.http_client() as h:
        r = h.get(f"{gw.url}/openai/models?api-version={API_VERSION}", headers={"api-key": KEY})
    errors(r, 403, "OperationNotAllowed")
    assert m.data_requests() == []


def test_unknown_deployment_is_404(env):
    gw, m = env
    m.clear()
    r = post(gw, agw.chat_path("no-such-deployment"), headers={"api-key": ALL_KEY},
             json=agw.chat_body())
    errors(r, 404, "DeploymentNotFound")
    r = post(gw, "/openai/v1/chat/completions", headers={"api-key": ALL_KEY},
             json=agw.chat_body(model="no-such-deployment"))
    errors(r, 404, "DeploymentNotFound")
    assert m.data_requests() == []


UNSUPPORTED = [
    ("GET", "/openai/files?api-version=2024-10-21"),
    ("POST", "/openai/files?api-version=2024-10-21"),
    ("GET", "/openai/batches?api-version=2024-10-21"),
    ("POST", "/openai/batches?api-version=2024-10-21"),
    ("POST", "/openai/fine_tuning/jobs?api-version=2024-10-21"),
    ("POST", "/openai/assistants?api-version=2024-10-21"),
    ("GET", "/openai/v1/files"),
    ("POST", "/openai/v1/batches"),
    ("POST", "/openai/deployments/gpt-4o/../../files?api-version=2024-10-21"),
    ("GET", "/openai/deployments/x/../../files"),
    ("POST", "/openai/deployments/gpt-4o/%2e%2e/%2e%2e/files?api-version=2024-10-21"),
    ("POST", "/openai/deployments/gpt-4o/%2E%2E/%2E%2E/batches"),
    ("POST", "/openai/deployments/gpt-4o/chat/completions/../../../../files"),
    ("POST", "/openai/deployments/gpt-4o/chat/completions%2f..%2f..%2f..%2f..%2ffiles"),
    ("POST", "/openai/deployments/gpt-4o/chat/%2e%2e/%2e%2e/%2e%2e/%2e%2e/files"),
    ("POST", "/openai/./files"),
    ("POST", "/openai//files"),
    ("POST", "/openai/deployments/gpt-4o/files"),
    ("POST", "/openai/deployments/gpt-4o/chat/completions/extra"),
]


@pytest.mark.parametrize("method,target", UNSUPPORTED, ids=[f"{m} {t}" for m, t in UNSUPPORTED])
def test_unsupported_operations_are_404_and_reach_no_backend(env, method, target):
    gw, m = env
    m.clear()
    body = b'{"purpose":"fine-tune"}' if method == "POST" else b""
    hdrs = {"api-key": ALL_KEY}
    if body:
        hdrs["Content-Type"] = "application/json"
    r = agw.raw_request(gw.url, method, target, headers=hdrs, body=body)
    errors(r, 404, "OperationNotSupported")
    assert m.data_requests() == [], "an unsupported operation reached the backend"


def test_body_over_limit_is_413(env):
    gw, m = env
    m.clear()
    big = agw.chat_body("x" * 70000)
    r = post(gw, agw.chat_path("gpt-4o"), headers={"api-key": KEY}, json=big)
    errors(r, 413, "RequestTooLarge")

    # the same without Content-Length (chunked)
    import json as _json
    data = _json.dumps(big).encode()

    def chunks():
        for i in range(0, len(data), 8192):
            yield data[i:i + 8192]

    with agw.http_client() as h:
        r = h.post(gw.url + agw.chat_path("gpt-4o"),
                   headers={"api-key": KEY, "Content-Type": "application/json"}, content=chunks())
    errors(r, 413, "RequestTooLarge")
    assert m.data_requests() == []

    # just under the limit is fine
    r = post(gw, agw.chat_path("gpt-4o"), headers={"api-key": KEY}, json=agw.chat_body("x" * 60000))
    assert r.status_code == 200, r.text


def test_non_json_body_is_400(env):
    gw, m = env
    m.clear()
    r = post(gw, agw.chat_path("gpt-4o"), headers={"api-key": KEY, "Content-Type": "application/json"},
             content=b"this is { not json")
    errors(r, 400, "InvalidRequestBody")
    assert m.data_requests() == []


def test_v1_without_model_is_400(env):
    gw, m = env
    m.clear()
    r = post(gw, "/openai/v1/chat/completions", headers={"api-key": ALL_KEY},
             json={"messages": [{"role": "user", "content": "hi"}]})
    errors(r, 400, "InvalidRequestBody")
    assert m.data_requests() == []


def test_error_answers_through_the_sdk(env):
    """What an SDK user sees: typed exceptions with the gateway's code."""
    import openai

    gw, _ = env
    with pytest.raises(openai.AuthenticationError) as e:
        agw.azure_client(gw, key=OTHER_KEY).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401 and e.value.code == "InvalidCredential"
    with pytest.raises(openai.PermissionDeniedError) as e:
        agw.azure_client(gw).chat.completions.create(
            model="restricted", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "DeploymentNotAllowed"
    with pytest.raises(openai.NotFoundError) as e:
        agw.azure_client(gw, key=ALL_KEY).chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "DeploymentNotFound"


# -- backend-side errors (each with its own gateway and mocks) ---------------------------


def two(a, b, **kw):
    return agw.make_config(
        deployments={"gpt-4o": [agw.member("a", priority=1), agw.member("b", priority=2)]},
        backends=[agw.backend("a", a), agw.backend("b", b, region="swedencentral")],
        **kw,
    )


def chat(gw, key=KEY) -> httpx.Response:
    return post(gw, agw.chat_path("gpt-4o"), headers={"api-key": key}, json=agw.chat_body())


def test_every_attempt_429_returns_last_backend_429_then_backend_throttled(mock, gateway):
    a = mock("eastus-a")
    b = mock("sweden-b")
    gw = gateway(two(a, b))
    a.faults(fail_429_count=1, retry_after_ms=5000)
    b.faults(fail_429_count=1, retry_after_ms=4000)

    r = chat(gw)
    assert r.status_code == 429, r.text
    # the last attempt was B's: its answer and retry headers reach the client
    assert r.headers.get("retry-after-ms") == "4000", r.headers
    assert r.headers.get("x-request-id")
    assert "BackendThrottled" not in r.text
    assert len(a.data_requests()) == 1 and len(b.data_requests()) == 1

    # now every member cools down: the gateway answers itself
    r = chat(gw)
    errors(r, 429, "BackendThrottled")
    ra = r.headers.get("retry-after")
    assert ra is not None and ra.isdigit() and 1 <= int(ra) <= 4, f"Retry-After {ra!r}"
    assert len(a.data_requests()) == 1 and len(b.data_requests()) == 1, "a cooling member was called"


def test_all_members_unhealthy_is_503_and_healthz_503(mock, gateway):
    a = mock("eastus-a")
    b = mock("sweden-b")
    gw = gateway(two(a, b))

    def healthz(base):
        with agw.http_client() as h:
            return h.get(base + "/healthz", timeout=5).status_code

    agw.wait_until(lambda: healthz(gw.admin_url) == 200, 15, "/healthz 200 while backends are up")
    a.faults(health_status=500)
    b.faults(health_status=500)
    agw.wait_until(lambda: healthz(gw.admin_url) == 503, 20, "/healthz 503 once backends are down")
    assert healthz(gw.url) == 503, "/healthz on the listener must agree with the admin's"

    a.clear(), b.clear()
    r = chat(gw)
    errors(r, 503, "BackendUnavailable")
    assert a.data_requests() == [] and b.data_requests() == []

    # and back
    a.faults(health_status=0)
    agw.wait_until(lambda: healthz(gw.admin_url) == 200, 20, "/healthz 200 after recovery")
    r = chat(gw)
    assert r.status_code == 200, r.text


def test_stalled_backend_is_504_within_request_timeout(mock, gateway):
    a = mock("eastus-a")
    gw = gateway(agw.single(a, server={"request_timeout_seconds": 1}))
    a.faults(stall_count=1, stall_ms=6000)
    t0 = time.monotonic()
    r = chat(gw)
    elapsed = time.monotonic() - t0
    errors(r, 504, "BackendTimeout")
    assert elapsed < 4, f"the 1 s request timeout answered after {elapsed:.1f}s"


def test_every_member_resetting_is_502(mock, gateway):
    a = mock("eastus-a")
    b = mock("sweden-b")
    gw = gateway(two(a, b))
    a.faults(reset_count=5)
    b.faults(reset_count=5)
    r = chat(gw)
    errors(r, 502, "BadGateway")
