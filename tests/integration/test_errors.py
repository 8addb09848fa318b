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
    # Files and batches are served (SPEC §11), but only on their own paths and methods.
    ("PUT", "/openai/files?api-version=2024-10-21"),
    ("POST", "/openai/files/file-1?api-version=2024-10-21"),
    ("DELETE", "/openai/batches/batch_1?api-version=2024-10-21"),
    ("GET", "/openai/batches/batch_1/cancel?api-version=2024-10-21"),
    ("POST", "/openai/fine_tuning/jobs?api-version=2024-10-21"),
    ("POST", "/openai/assistants?api-version=2024-10-21"),
    ("GET", "/openai/v1/vector_stores"),
    ("POST", "/openai/v1/files/file-1/content"),
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


def test_unsupported_path_of_an_identified_client_is_attributed_to_it(env):
    """Identity comes first for every request but /healthz: a refused request of an
    identified client is counted and audited against that client, not `anonymous`."""
    from opsutil import metric_value, scrape

    gw, m = env
    m.clear()

    def not_found() -> float:
        return metric_value(scrape(gw), "aoai_gateway_rejections_total",
                            client="all", reason="not_found") or 0.0

    before = not_found()
    r = agw.raw_request(gw.url, "GET", f"/openai/fine_tuning/jobs?api-version={API_VERSION}",
                        headers={"api-key": ALL_KEY})
    errors(r, 404, "OperationNotSupported")
    line = gw.audit_for(r.headers["x-request-id"])
    assert (line["client"], line["auth"], line["status"], line["error_code"]) == (
        "all", "api_key", 404, "OperationNotSupported"), line
    assert line["path"] == "/openai/fine_tuning/jobs"
    agw.wait_until(lambda: not_found() == before + 1, 5, "rejections_total{reason=not_found} +1")
    assert metric_value(scrape(gw), "aoai_gateway_requests_total", client="all", code="404")
    assert m.data_requests() == []


def test_unsupported_path_without_a_credential_is_401(env):
    gw, m = env
    r = agw.raw_request(gw.url, "GET", "/openai/fine_tuning/jobs", headers={})
    errors(r, 401, "MissingCredential")
    line = gw.audit_for(r.headers["x-request-id"])
    assert (line["client"], line["status"]) == ("anonymous", 401)
    r = agw.raw_request(gw.url, "GET", "/openai/fine_tuning/jobs", headers={"api-key": OTHER_KEY})
    errors(r, 401, "InvalidCredential")


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


# -- bodies that are not JSON because they are not UTF-8 (RFC 8259 §8.1) ----------------

LIMITED_KEY = agw.make_key("utf8 limited")  # a client with token limits (the reservation path)


@pytest.fixture(scope="module")
def utf8_env(module_cluster):
    m = module_cluster.mock("utf8-east")
    cfg = agw.make_config(
        deployments={"gpt-4o": [agw.member("east")], "text-embedding-3-large": [agw.member("east")]},
        backends=[agw.backend("east", m)],
        clients=[
            agw.client("plain"),
            agw.client("limited", keys=[agw.sha256_hex(LIMITED_KEY)],
                       limits={"tokens_per_minute": 1000000}),
        ],
    )
    return module_cluster.gateway(cfg), m


UTF8_PATHS = [
    agw.chat_path("gpt-4o"),
    "/openai/v1/chat/completions",
    f"/openai/deployments/text-embedding-3-large/embeddings?api-version={API_VERSION}",
    "/openai/v1/embeddings",
]


def _utf8_body(path: str, text: bytes, extra: bytes = b"") -> bytes:
    """A body for `path` whose prompt text is `text` (raw bytes); `model` where the path
    has no deployment."""
    model = b""
    if path.startswith("/openai/v1/"):
        model = b'"model":"text-embedding-3-large",' if "embeddings" in path else b'"model":"gpt-4o",'
    if "embeddings" in path:
        return b"{" + model + extra + b'"input":"' + text + b'"}'
    return b"{" + model + extra + b'"messages":[{"role":"user","content":"' + text + b'"}]}'


@pytest.mark.parametrize("key", [KEY, LIMITED_KEY], ids=["no-limits", "token-limits"])
@pytest.mark.parametrize("path", UTF8_PATHS, ids=["deployment-chat", "v1-chat", "deployment-embeddings", "v1-embeddings"])
def test_invalid_utf8_in_a_string_is_400_and_reaches_no_backend(utf8_env, path, key):
    gw, m = utf8_env
    m.clear()
    hdrs = {"api-key": key, "Content-Type": "application/json"}
    bodies = [
        _utf8_body(path, b"\xff\xfe"),                             # never UTF-8
        _utf8_body(path, b"caf\xc3"),                               # a cut character
        _utf8_body(path, b"\xed\xa0\x80"),                          # an encoded surrogate
        _utf8_body(path, b"\xc0\xaf"),                               # overlong
        _utf8_body(path, b"\xff", extra=b'"temperature":1e0,'),      # read by serde
        _utf8_body(path, b"\xff", extra=b'"us\\u0065r":"u",'),      # an escaped key: serde
    ]
    if not path.startswith("/openai/v1/"):
        bodies.append(b'{"model":"gpt-4o","messages":"\xff\xfe"}')  # a field nobody reads
    for body in bodies:
        r = post(gw, path, headers=hdrs, content=body)
        errors(r, 400, "InvalidRequestBody")
    assert m.data_requests() == [], "a body that is not UTF-8 reached the backend"


@pytest.mark.parametrize("path", UTF8_PATHS, ids=["deployment-chat", "v1-chat", "deployment-embeddings", "v1-embeddings"])
def test_valid_utf8_above_ascii_passes_byte_for_byte(utf8_env, path):
    gw, m = utf8_env
    for key in (KEY, LIMITED_KEY):
        for extra in (b"", b'"temperature":1e0,'):
            m.clear()
            body = _utf8_body(path, "Grüße, 日本 🙂".encode(), extra=extra)
            r = post(gw, path, headers={"api-key": key, "Content-Type": "application/json"}, content=body)
            assert r.status_code == 200, r.text
            [q] = m.data_requests()
            assert q["body_len"] == len(body) and q["body_sha256"] == agw.sha256_hex(body), q


def test_a_number_serde_cannot_hold_is_400_not_a_dropped_connection(utf8_env):
    """Outside the fast reader's subset, serde skipped ignored values unchecked: a number out
    of range passed, and the token reservation's parse of the whole body then panicked."""
    gw, m = utf8_env
    m.clear()
    for key in (KEY, LIMITED_KEY):
        r = post(gw, agw.chat_path("gpt-4o"), headers={"api-key": key, "Content-Type": "application/json"},
                 content=b'{"messages":[{"role":"user","content":"hi"}],"temperature":1e400}')
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
