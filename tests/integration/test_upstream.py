"""What the backend sees (SPEC §5, §7): the gateway's own credential — the managed-identity
bearer or the backend's key — and nothing the client sent as a credential; no compression;
the managed-identity token fetched once for many requests, used until its expiry while its
refresh fails, and refreshed off the request path."""

from __future__ import annotations

import concurrent.futures
import time

import agw
from agw import KEY, MI_HEADER_SECRET, MI_TOKEN


def _no_client_secret(headers: dict[str, str]) -> None:
    for name, value in headers.items():
        assert KEY not in value, f"the client's key reached the backend in {name}"
        assert "session=s3cr3t" not in value, f"the client's cookie reached the backend in {name}"


def test_backend_sees_managed_identity_bearer_only(mock, gateway):
    backend = mock("eastus-a", require_bearer=MI_TOKEN)
    gw = gateway(agw.single(backend))

    # 1. the SDK (api-key header)
    sdk = agw.azure_client(gw)
    resp = sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert resp.choices[0].message.content == "Hello from eastus-a."

    # 2. raw: Authorization: Bearer agw_…, a cookie, compression asked for
    with agw.http_client() as h:
        r = h.post(
            gw.url + agw.chat_path("gpt-4o"),
            headers={
                "Authorization": f"Bearer {KEY}",
                "Cookie": "session=s3cr3t",
                "Accept-Encoding": "gzip, deflate, br",
            },
            json=agw.chat_body(),
        )
    assert r.status_code == 200, r.text
    assert r.headers.get("content-encoding") in (None, "identity")

    reqs = backend.data_requests()
    assert len(reqs) == 2, reqs
    for q in reqs:
        h = q["headers"]
        assert h.get("authorization") == f"Bearer {MI_TOKEN}", h
        assert "api-key" not in h, f"the client's api-key header reached the backend: {h}"
        assert "cookie" not in h, f"the client's cookie reached the backend: {h}"
        assert "accept-encoding" not in h, f"accept-encoding must be removed upstream: {h}"
        assert "x-identity-header" not in h
        assert MI_HEADER_SECRET not in " ".join(h.values())
        _no_client_secret(h)


def test_api_key_backend_receives_its_configured_key(mock, gateway):
    backend = mock("sweden", require_api_key="backend-secret-key")
    cfg = agw.single(backend, credential="api_key")
    cfg["backends"][0]["api_key"] = "${AGW_TEST_BACKEND_KEY}"  # ${VAR} substitution
    gw = gateway(cfg, env={"AGW_TEST_BACKEND_KEY": "backend-secret-key"})

    sdk = agw.azure_client(gw)
    resp = sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert resp.choices[0].message.content == "Hello from sweden."
    with agw.http_client() as h:
        r = h.post(gw.url + agw.chat_path("gpt-4o"),
                   headers={"Authorization": f"Bearer {KEY}", "Cookie": "session=s3cr3t"},
                   json=agw.chat_body())
    assert r.status_code == 200, r.text

    reqs = backend.data_requests()
    assert len(reqs) == 2
    for q in reqs:
        h = q["headers"]
        assert h.get("api-key") == "backend-secret-key", h
        assert "authorization" not in h, f"no bearer for an api_key backend: {h}"
        assert "cookie" not in h
        _no_client_secret(h)


def test_token_endpoint_called_once_for_many_requests(mock, gateway):
    identity = mock("my-identity", identity_token="mi-token-once", identity_header="hdr-once")
    backend = mock("eastus-a", require_bearer="mi-token-once")
    gw = gateway(
        agw.single(backend),
        env={"IDENTITY_ENDPOINT": f"{identity.url}/msi/token", "IDENTITY_HEADER": "hdr-once"},
    )

    def one(i: int) -> int:
        with agw.http_client() as h:
            r = h.post(gw.url + agw.chat_path("gpt-4o"), headers={"api-key": KEY},
                       json=agw.chat_body(f"request {i}"))
            return r.status_code

    # ten at once (a cold cache must not fetch ten tokens), then twenty one after another
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(one, range(10)))
    statuses += [one(i) for i in range(10, 30)]
    assert statuses == [200] * 30, statuses
    assert len(backend.data_requests()) == 30
    assert identity.stats()["token_requests"] == 1


# -- managed-identity token: cached until its real expiry, refreshed off the request path ----

SHORT_TOKEN = "mi-token-short-lived"
SHORT_SECRET = "hdr-short-lived"


def _short_lived_token_gateway(mock, gateway, ttl: int):
    """A gateway whose managed-identity tokens live `ttl` seconds (an identity mock of its
    own, which the test can make fail), in front of a backend that requires the token."""
    identity = mock("short-identity", identity_token=SHORT_TOKEN, identity_header=SHORT_SECRET,
                    identity_expires_in=ttl)
    backend = mock("eastus-a", require_bearer=SHORT_TOKEN)
    gw = gateway(
        agw.single(backend),  # request_timeout_seconds: 30
        env={"IDENTITY_ENDPOINT": f"{identity.url}/msi/token", "IDENTITY_HEADER": SHORT_SECRET},
    )
    return identity, backend, gw


def _timed_chat(gw) -> tuple[object, float]:
    t = time.monotonic()
    with agw.http_client(timeout=60) as h:
        r = h.post(gw.url + agw.chat_path("gpt-4o"), headers={"api-key": KEY}, json=agw.chat_body())
    return r, time.monotonic() - t


def _refreshes(gw, result: str) -> float:
    from opsutil import metric_value, scrape

    return metric_value(scrape(gw), "aoai_gateway_upstream_token_refreshes_total", result=result) or 0


PROMPT = 3.0  # seconds: "at once", generously (the request timeout is 30 s)


def test_cached_token_serves_requests_while_the_token_endpoint_fails(mock, gateway):
    """While refreshes fail, requests keep using the cached token until its real expiry,
    without waiting on the failing refresh; the failures are counted; once the endpoint is
    back, a refresh brings a new token without a restart."""
    ttl = 8
    identity, backend, gw = _short_lived_token_gateway(mock, gateway, ttl)
    r, _ = _timed_chat(gw)
    assert r.status_code == 200, r.text
    # the refresh at half-life: the token cached from now on expires about `ttl` s later
    agw.wait_until(lambda: _refreshes(gw, "success") >= 2, 20, "the refresh at half-life")
    identity.faults(identity_status=503)
    refreshed = time.monotonic()

    served = 0
    # up to 1.5 s before its expiry (whole seconds, and the poll above): well inside the
    # last seconds of its life, where a request used to wait for a fetch of its own
    while time.monotonic() < refreshed + ttl - 1.5:
        r, took = _timed_chat(gw)
        assert r.status_code == 200, f"{r.status_code} with a valid cached token: {r.text}"
        assert took < PROMPT, f"a request took {took:.1f}s while the token endpoint was failing"
        served += 1
        time.sleep(0.2)
    assert served >= 5, served
    agw.wait_until(lambda: _refreshes(gw, "failure") >= 1, 15, "a failed refresh to be counted")
    assert all(q["headers"].get("authorization") == f"Bearer {SHORT_TOKEN}" for q in backend.data_requests())

    identity.faults(identity_status=0)
    successes = _refreshes(gw, "success")
    agw.wait_until(lambda: _refreshes(gw, "success") > successes, 30, "a refresh after recovery")
    r, took = _timed_chat(gw)
    assert r.status_code == 200 and took < PROMPT, (r.status_code, took, r.text)


def test_expired_token_is_a_prompt_503_and_recovers_without_restart(mock, gateway):
    """Once the cached token has expired and the token endpoint still fails, a request to a
    managed-identity backend is answered at once with 503 BackendUnavailable (no backend
    called without a credential); when the endpoint is back, requests succeed again."""
    ttl = 5
    identity, backend, gw = _short_lived_token_gateway(mock, gateway, ttl)
    r, _ = _timed_chat(gw)
    assert r.status_code == 200, r.text
    identity.faults(identity_status=503)
    failing_since = time.monotonic()
    sent = len(backend.data_requests())

    # every token the gateway holds was fetched before the failure: expired `ttl` s after it
    time.sleep(max(0.0, failing_since + ttl + 1 - time.monotonic()))
    for _ in range(3):
        r, took = _timed_chat(gw)
        agw.assert_error(r, 503, "BackendUnavailable")
        assert "managed-identity token" in r.json()["error"]["message"], r.text
        assert took < PROMPT, f"the 503 took {took:.1f}s"
    assert len(backend.data_requests()) == sent, "a backend was called without a valid token"
    assert _refreshes(gw, "failure") >= 1

    identity.faults(identity_status=0)

    def ok():
        r, _ = _timed_chat(gw)
        return r.status_code == 200

    agw.wait_until(ok, 30, "requests to succeed after the token endpoint recovered", 0.5)
    assert _refreshes(gw, "success") >= 2
