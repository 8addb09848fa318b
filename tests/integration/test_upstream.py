"""What the backend sees (SPEC §5, §7): the gateway's own credential — the managed-identity
bearer or the backend's key — and nothing the client sent as a credential; no compression;
the managed-identity token fetched once for many requests."""

from __future__ import annotations

import concurrent.futures

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
