"""Claims that grant (`identity.oidc[].grants`) and per-user limits (`limits.per_user`,
SPEC §14), through the real OIDC flow: an aoai-mock `--oidc` identity provider serving the
JWKS of a key generated here, tokens minted with PyJWT (jwt_util.py)."""

from __future__ import annotations

import pytest

import agw
from agw import assert_error
from jwt_util import SigningKey, claims, jwks, mint
from redisutil import RedisServer

AUD = "api://aoai-gateway"
KEY = SigningKey.rsa("claims-rsa-1")


def serve_jwks(idp: agw.Mock) -> None:
    r = idp.http.put("/_mock/oidc/jwks", json=jwks(KEY))
    assert r.status_code == 204, r.text


def provider(idp: agw.Mock, **kw) -> dict:
    return {
        "name": "contoso",
        "issuer": idp.url,
        "audiences": [AUD],
        "client_claim": "azp",
        "user_claim": "oid",
        **kw,
    }


def token(idp: agw.Mock, **extra) -> str:
    return mint(KEY, claims(idp.url, AUD, **extra))


def bearer(t: str) -> dict:
    return {"Authorization": f"Bearer {t}"}


# Entra: application roles arrive in `roles` (an array), delegated scopes in `scp` (one
# space-separated string).
GRANTS = [
    {"claim": "roles", "value": "AOAI.Chat", "operations": ["chat.completions", "responses"],
     "deployments": ["gpt-4o*"]},
    {"claim": "scp", "value": "Chat.Read", "operations": ["chat.completions", "models.read"],
     "deployments": ["gpt-4o-mini"]},
]


def grants_config(idp: agw.Mock, backend: agw.Mock) -> dict:
    deployments = {d: [agw.member("b1")] for d in ("gpt-4o", "gpt-4o-mini", "emb")}
    return agw.make_config(
        deployments=deployments,
        backends=[agw.backend("b1", backend)],
        identity={"oidc": [provider(idp, grants=GRANTS)]},
        clients=[{
            "id": "app",
            "tokens": [{"provider": "contoso", "client": "app-listed"}],
            # No `responses` here: a grant cannot add what `allow` lacks.
            "allow": {"deployments": ["*"],
                      "operations": ["chat.completions", "embeddings", "models.read"]},
        }],
    )


def test_grants_narrow_allow_by_roles_and_scopes(mock, gateway):
    idp = mock("idp", oidc=True)
    serve_jwks(idp)
    backend = mock("backend")
    gw = gateway(grants_config(idp, backend))

    def chat(t: str, deployment: str):
        return gw.http.post(agw.chat_path(deployment), headers=bearer(t),
                            json=agw.chat_body("Hello with a role."))

    # An application token with the AOAI.Chat role: chat on gpt-4o*, nothing else.
    app = token(idp, roles=["AOAI.Reader", "AOAI.Chat"])
    for d in ("gpt-4o", "gpt-4o-mini"):
        r = chat(app, d)
        assert r.status_code == 200, r.text
    backend.clear()
    r = gw.http.post("/openai/deployments/emb/embeddings?api-version=" + agw.API_VERSION,
                     headers=bearer(app), json={"input": "x"})
    assert_error(r, 403, "OperationNotAllowed")
    # `responses` is granted by the role but not in the client's allow: refused.
    r = gw.http.post("/openai/v1/responses", headers=bearer(app),
                     json={"model": "gpt-4o", "input": "x"})
    assert_error(r, 403, "OperationNotAllowed")
    r = gw.http.get("/openai/models?api-version=" + agw.API_VERSION, headers=bearer(app))
    assert_error(r, 403, "OperationNotAllowed")

    # A user token with the delegated scope Chat.Read: chat on gpt-4o-mini only, and the
    # models list shows only what it may use.
    user = token(idp, roles=None, scp="openid profile Chat.Read")
    r = chat(user, "gpt-4o-mini")
    assert r.status_code == 200, r.text
    assert_error(chat(user, "gpt-4o"), 403, "DeploymentNotAllowed")
    r = gw.http.get("/openai/models?api-version=" + agw.API_VERSION, headers=bearer(user))
    assert r.status_code == 200, r.text
    assert [m["id"] for m in r.json()["data"]] == ["gpt-4o-mini"]

    # Claims that match no grant: 403 Forbidden, and the backend never hears of it.
    for t in (token(idp), token(idp, roles=None, scp="Chat.ReadWrite")):
        r = chat(t, "gpt-4o")
        assert_error(r, 403, "Forbidden", secrets=[t])
        line = gw.audit_for(r.headers["x-request-id"])
        assert line["error_code"] == "Forbidden" and line["auth"] == "oidc", line
    assert [q for q in backend.data_requests() if "emb" in q["path"] or
            q["path"].endswith("/responses")] == []
    assert len([q for q in backend.data_requests() if q["path"].endswith("/chat/completions")]) == 1


# --------------------------------------------------------------------------------------
# per-user limits


def per_user_config(idp: agw.Mock, backend: agw.Mock, **sections) -> dict:
    return agw.make_config(
        deployments={"gpt-4o": [agw.member("b1")]},
        backends=[agw.backend("b1", backend)],
        identity={"oidc": [provider(idp)]},
        clients=[{
            "id": "app",
            "tokens": [{"provider": "contoso", "client": "app-listed"}],
            "allow": {"deployments": ["*"], "operations": ["*"]},
            # 3 a minute for the application, 2 for each of its users.
            "limits": {"requests_per_minute": 3, "per_user": {"requests_per_minute": 2}},
        }],
        **sections,
    )


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_per_user_limits_hold_each_user_and_the_client_limit_holds_across_them(
        store, cluster, tmp_path):
    idp = cluster.mock("idp", oidc=True)
    serve_jwks(idp)
    backend = cluster.mock("backend")
    sections = {}
    redis = None
    if store == "redis":
        redis = RedisServer(tmp_path / "redis").start()
        sections["state"] = {"store": "redis", "redis_url": redis.url}
    try:
        cfg = per_user_config(idp, backend, **sections)
        # With Redis, two gateways: the users' windows are shared like the client's.
        gws = [cluster.gateway(cfg)] + ([cluster.gateway(cfg)] if redis else [])
        alice = token(idp, oid="user-alice")
        bob = token(idp, oid="user-bob")

        def chat(i: int, t: str):
            return gws[i % len(gws)].http.post(
                agw.chat_path("gpt-4o"), headers=bearer(t), json=agw.chat_body())

        for i in range(2):
            r = chat(i, alice)
            assert r.status_code == 200, r.text
        r = chat(2, alice)
        assert_error(r, 429, "RateLimitExceeded", secrets=[alice])
        assert r.headers.get("retry-after") and r.headers.get("retry-after-ms"), r.headers
        # Her refusal consumed nothing: bob, another user of the same client, still passes...
        r = chat(3, bob)
        assert r.status_code == 200, r.text
        assert r.headers["x-ratelimit-remaining-requests"] == "0", "the client's, the tightest"
        # ...until the client's own limit (3 across its users) is reached, though bob has one
        # left of his own.
        assert_error(chat(4, bob), 429, "RateLimitExceeded", secrets=[bob])
        line = gws[0].wait_audit(lambda l: l.get("status") == 429, what="a 429")
        assert line["client"] == "app" and line["user"] in ("user-alice", "user-bob"), line
        # Metric labels stay the configured ones: never a user value.
        text = "".join(g.admin.get("/metrics").text for g in gws)
        assert "user-alice" not in text and "user-bob" not in text
        assert len([q for q in backend.data_requests()
                    if q["path"].endswith("/chat/completions")]) == 3
        if redis:
            keys = redis.keys()
            assert any(":u:user-alice:" in k for k in keys), keys
    finally:
        if redis:
            redis.stop()


# --------------------------------------------------------------------------------------
# `aoai-gateway check` on the new keys


BAD = """\
server:
  listeners: [{address: 127.0.0.1:18080}]
identity:
  oidc:
    - name: contoso
      issuer: https://login.example/t/v2.0
      audiences: [api://aoai-gateway]
      grants:
        - {claim: roles, value: AOAI.Chat, operations: [chat.completions], deployments: ["gpt-*-mini"]}
        - {claim: scp, value: "Chat Read", operations: [chat.completions], deployments: [o1*]}
clients:
  - id: app
    api_keys: [{sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08}]
    allow: {deployments: ["*"], operations: ["*"]}
    limits:
      per_user: {requests_per_minute: 0, per_user: {}}
deployments:
  gpt-4o: [{backend: b1}]
backends:
  - {name: b1, url: "http://127.0.0.1:9", credential: forward, capacity_window_seconds: 601}
"""


def test_check_reports_the_new_keys_with_their_paths(tmp_path):
    import subprocess

    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    p = subprocess.run([str(agw.GATEWAY_BIN), "check", "-c", str(path)],
                       capture_output=True, text=True, timeout=60, env=agw.clean_env())
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    for want in [
        "line 9: identity.oidc[0].grants[0].deployments[0]: `gpt-*-mini`: `*` may only stand alone",
        "line 10: identity.oidc[0].grants[1].value: must be one word",
        "line 10: identity.oidc[0].grants[1].deployments[0]: `o1*` matches no configured deployment",
        "clients[0].limits.per_user.requests_per_minute: must be at least 1",
        "clients[0].limits.per_user.per_user: per_user limits are per user already",
        "backends[0].capacity_window_seconds: must be at most 600",
    ]:
        assert want in out, f"{want!r} not in:\n{out}"
