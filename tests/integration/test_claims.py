"""Claims that grant (`identity.oidc[].grants`) and per-user limits (`limits.per_user`,
SPEC §14), through the real OIDC flow: an aoai-mock `--oidc` identity provider serving the
JWKS of a key generated here, tokens minted with PyJWT (jwt_util.py)."""

from __future__ import annotations

import agw
from agw import assert_error
from jwt_util import SigningKey, claims, jwks, mint

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
