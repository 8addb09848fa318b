"""OIDC / JWT identity (SPEC §3 `identity.oidc`, `clients[].tokens`, `backends[].credential:
forward`; §5; issue 4).

The identity providers are aoai-mock `--oidc` instances serving, through
`PUT /_mock/oidc/jwks`, JWKS documents of keys generated here (RSA-2048 and EC P-256); the
tokens are minted by PyJWT (jwt_util.py), independently of the gateway's verifier. Accepted
requests go through the official `openai` SDK (`AzureOpenAI(azure_ad_token=...)`), refused
ones through httpx.

One gateway (module scope) serves the read-only checks: two providers (`contoso`: issuer
discovery, RS256+ES256, required role, unlisted apps allowed on gpt-4o-mini; `fabrikam`: its
own issuer, audience and keys, no unlisted apps), a managed-identity backend and a `forward`
backend. The tests that change an IdP (key rotation, unknown-kid flood, outage) start their
own gateway, since they count JWKS fetches and the refetch budget is per provider.
"""

from __future__ import annotations

import pathlib
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import openai
import pytest

import agw
from agw import API_VERSION, KEY, MI_TOKEN, OTHER_KEY, assert_error, wait_until
from jwt_util import (
    SigningKey,
    claims,
    claims_of,
    hs256_with_secret,
    jwks,
    mint,
    tamper_payload,
    tamper_signature,
    unsigned,
)

AUD = "api://aoai-gateway"
FAB_AUD = "api://fabrikam-gateway"
ROLE = "AOAI.Inference"
CHAT = agw.chat_path("gpt-4o")
BODY = agw.chat_body("Hello with a token.")
MAX_TOKEN = 16 * 1024

# Keys of the `contoso` provider.
RSA = SigningKey.rsa("contoso-rsa-1")
EC = SigningKey.ec("contoso-ec-1")
# Same kid at both providers, different key material.
SHARED_CONTOSO = SigningKey.rsa("shared-kid")
SHARED_FABRIKAM = SigningKey.rsa("shared-kid")
# Keys of the `fabrikam` provider.
FAB = SigningKey.rsa("fabrikam-rsa-1")
# In no JWKS.
STRANGER = SigningKey.rsa("stranger-kid")


# --------------------------------------------------------------------------------------
# helpers


def provider(name: str, idp: agw.Mock, **kw) -> dict:
    p = {
        "name": name,
        "issuer": idp.url,  # discovery at {issuer}/.well-known/openid-configuration
        "audiences": [AUD],
        "algorithms": ["RS256", "ES256"],
        "clock_skew_seconds": 60,
        "required_claims": {"roles": [ROLE]},
        "client_claim": "azp",
        "user_claim": "oid",
    }
    p.update(kw)
    return p


def serve_jwks(idp: agw.Mock, *keys: SigningKey) -> None:
    r = idp.http.put("/_mock/oidc/jwks", json=jwks(*keys))
    assert r.status_code == 204, f"PUT /_mock/oidc/jwks: {r.status_code} {r.text}"


def set_outage(idp: agw.Mock, down: bool) -> None:
    r = idp.http.post("/_mock/oidc/outage", json={"down": down})
    assert r.status_code == 200, r.text


def jwks_fetches(idp: agw.Mock) -> int:
    return idp.stats()["jwks_requests"]


def wait_startup_fetch(idp: agw.Mock) -> int:
    """Waits until the gateway's start-up JWKS fetch reached the IdP, so that no test request
    arrives before it and spends the provider's first (budgeted) refetch; returns the count.
    (A request arriving while that fetch is in flight waits for it and uses its keys.)"""
    return wait_until(lambda: jwks_fetches(idp), 30, f"the gateway to fetch the JWKS of {idp.name}")


def sdk(gw: agw.Gateway, token: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=gw.url,
        azure_ad_token=token,
        api_version=API_VERSION,
        max_retries=0,
        http_client=agw.http_client(),
    )


def sdk_chat(gw: agw.Gateway, token: str, deployment: str = "gpt-4o"):
    """A chat completion through the SDK with a bearer JWT; returns (raw response, completion)."""
    with sdk(gw, token) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=deployment, messages=[{"role": "user", "content": "Hello with a token."}]
        )
        return raw, raw.parse()


def secrets_for(token: str) -> list[str]:
    return [KEY, OTHER_KEY] + ([token] if len(token) >= 16 else [])


def assert_no_token_in_audit(gw: agw.Gateway, token: str) -> None:
    if len(token) < 16 or not gw.audit_path.exists():
        return
    text = gw.audit_path.read_text()
    assert token not in text, "the audit log contains a token"
    sig = token.split(".")[-1]
    if len(sig) >= 20:
        assert sig not in text, "the audit log contains a token's signature"


def post_chat(gw: agw.Gateway, headers: dict, path: str = CHAT, body: dict = BODY):
    return gw.http.post(path, headers=headers, json=body)


def assert_refused(gw: agw.Gateway, backends: list[agw.Mock], token: str,
                   status: int = 401, code: str = "InvalidCredential",
                   extra_headers: dict | None = None, path: str = CHAT,
                   auth: str = "oidc") -> dict:
    """The bearer `token` is refused with the SPEC error, the 401 carries
    `WWW-Authenticate: Bearer`, no backend sees a data-plane request, and the audit line says
    who it was (anonymous, oidc) without the token."""
    for b in backends:
        b.clear()
    headers = {"Authorization": f"Bearer {token}", **(extra_headers or {})}
    r = post_chat(gw, headers, path)
    body = assert_error(r, status, code, secrets=secrets_for(token))
    if status == 401:
        www = r.headers.get("www-authenticate", "")
        assert www.lower().startswith("bearer"), f"401 without WWW-Authenticate: Bearer ({www!r})"
    for b in backends:
        assert b.data_requests() == [], f"backend {b.name} was called for a refused token"
    line = gw.audit_for(r.headers["x-request-id"])
    assert line["status"] == status and line["error_code"] == code, line
    assert line["backend"] is None and line["attempts"] in (0, None), line
    if code == "InvalidCredential":
        assert line["client"] == "anonymous", line
    assert line["auth"] == auth, line
    assert_no_token_in_audit(gw, token)
    return body


def sized_token(key: SigningKey, payload: dict, *, at_least: int | None = None,
                at_most: int | None = None) -> str:
    """A validly signed token grown with a `pad` claim to the smallest length >= `at_least`
    or the largest length <= `at_most` (base64 moves in steps of 1-4 characters)."""
    def make(n: int) -> str:
        return mint(key, {**payload, "pad": "x" * n})

    target = at_least if at_least is not None else at_most
    n = max(0, (target - len(make(0))) * 3 // 4 - 8)
    while len(make(n + 1)) <= target:
        n += 1
    tok = make(n)  # longest <= target
    if at_least is not None and len(tok) < at_least:
        tok = make(n + 1)
    return tok


# --------------------------------------------------------------------------------------
# the shared gateway


@dataclass
class Env:
    gw: agw.Gateway
    idp: agw.Mock       # contoso
    idp2: agw.Mock      # fabrikam
    backend: agw.Mock   # managed identity backend b1
    fwd: agw.Mock       # forward backend

    @property
    def backends(self) -> list[agw.Mock]:
        return [self.backend, self.fwd]

    def contoso(self, audience=AUD, **kw) -> dict:
        return claims(self.idp.url, audience, **kw)

    def fabrikam(self, audience=FAB_AUD, **kw) -> dict:
        kw.setdefault("roles", None)
        return claims(self.idp2.url, audience, **kw)


@pytest.fixture(scope="module")
def env(module_cluster) -> Env:
    idp = module_cluster.mock("contoso-idp", oidc=True)
    idp2 = module_cluster.mock("fabrikam-idp", oidc=True)
    backend = module_cluster.mock("backend")
    fwd = module_cluster.mock("fwd")
    serve_jwks(idp, RSA, EC, SHARED_CONTOSO)
    serve_jwks(idp2, FAB, SHARED_FABRIKAM)
    cfg = agw.make_config(
        deployments={
            "gpt-4o": [agw.member("b1")],
            "gpt-4o-mini": [agw.member("b1")],
            "fwd-only": [agw.member("fwd")],
            "mixed": [agw.member("fwd", priority=1), agw.member("b1", priority=2)],
        },
        backends=[
            agw.backend("b1", backend),
            agw.backend("fwd", fwd, credential="forward"),
        ],
        clients=[
            agw.client("test-client"),
            agw.client("oidc-app", keys=(),
                       tokens=[{"provider": "contoso", "client": "app-listed"}]),
            # the same client_claim value at the other provider is another client
            agw.client("fabrikam-app", keys=(),
                       tokens=[{"provider": "fabrikam", "client": "app-listed"}]),
        ],
        identity={"oidc": [
            provider("contoso", idp, unlisted_clients={
                "allow": {"deployments": ["gpt-4o-mini"], "operations": ["chat.completions"]},
                "limits": {"requests_per_minute": 3},
            }),
            provider("fabrikam", idp2, audiences=[FAB_AUD], algorithms=["RS256"],
                     required_claims={}, client_claim="appid", user_claim="sub"),
        ]},
        health_checks={"interval_seconds": 3600},
    )
    gw = module_cluster.gateway(cfg)
    wait_startup_fetch(idp)
    wait_startup_fetch(idp2)
    return Env(gw, idp, idp2, backend, fwd)


# --------------------------------------------------------------------------------------
# accepted


@pytest.mark.parametrize("key", [RSA, EC], ids=["RS256", "ES256"])
def test_token_accepted_through_sdk(env, key):
    env.backend.clear()
    c = env.contoso()
    token = mint(key, c)
    raw, completion = sdk_chat(env.gw, token)
    assert raw.http_response.status_code == 200
    assert completion.choices[0].message.content == "Hello from backend."

    line = env.gw.audit_for(raw.headers["x-request-id"])
    assert line["auth"] == "oidc", line
    assert line["provider"] == "contoso", line
    assert line["user"] == c["oid"], line
    assert line["client"] == "oidc-app", line
    assert line["key_id"] is None and line["status"] == 200 and line["backend"] == "b1", line
    assert_no_token_in_audit(env.gw, token)

    # The managed-identity backend got the gateway's token, never the caller's JWT.
    reqs = env.backend.data_requests()
    assert len(reqs) == 1, reqs
    h = reqs[0]["headers"]
    assert h.get("authorization") == f"Bearer {MI_TOKEN}", h
    assert "api-key" not in h
    assert all(token not in v for v in h.values()), "the caller's JWT reached a non-forward backend"


def test_accepted_variants(env):
    """Audience as an array containing ours; the required claim as a plain string; exp and
    nbf just inside the clock skew (60 s); no nbf at all."""
    now = int(time.time())
    cases = {
        "aud array": env.contoso(audience=["api://something-else", AUD]),
        "role as string": env.contoso(roles=ROLE),
        "expired within skew": env.contoso(exp=now - 20),
        "nbf within skew": env.contoso(nbf=now + 20),
        "no nbf": env.contoso(nbf=None),
    }
    for what, c in cases.items():
        r = post_chat(env.gw, {"Authorization": f"Bearer {mint(RSA, c)}"})
        assert r.status_code == 200, f"{what}: {r.status_code} {r.text}"
        assert env.gw.audit_for(r.headers["x-request-id"])["client"] == "oidc-app"


def test_verified_token_stops_working_at_exp_plus_skew(env):
    """A token verified once (and possibly cached) is refused as soon as exp + skew passes."""
    exp = int(time.time()) - 57  # skew 60: valid for about 3 more seconds
    token = mint(RSA, env.contoso(exp=exp))
    headers = {"Authorization": f"Bearer {token}"}
    r = post_chat(env.gw, headers)
    assert r.status_code == 200, r.text

    def refused():
        r = post_chat(env.gw, headers)
        if r.status_code == 200:
            assert time.time() < exp + 60 + 1.5, "still accepted after exp + clock skew"
            return None
        return r

    r = wait_until(refused, 10, "the token to expire", interval=0.25)
    assert_error(r, 401, "InvalidCredential", secrets=secrets_for(token))
    assert time.time() >= exp + 60, "refused before exp + clock skew"


def test_token_just_under_16_kib_accepted(env):
    token = sized_token(RSA, env.contoso(), at_most=MAX_TOKEN)
    assert MAX_TOKEN - 4 <= len(token) <= MAX_TOKEN, len(token)
    r = post_chat(env.gw, {"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------------------
# refused: 401 InvalidCredential


def _refused_tokens(env: Env) -> dict[str, str]:
    now = int(time.time())
    c = env.contoso
    return {
        "expired": mint(RSA, c(iat=now - 7200, nbf=now - 7200, exp=now - 600)),
        "not yet valid": mint(RSA, c(nbf=now + 600)),
        "wrong audience": mint(RSA, c(audience="api://another-api")),
        "wrong audience (fabrikam's)": mint(RSA, c(audience=FAB_AUD)),
        "wrong issuer": mint(RSA, claims("https://login.example.com/evil/v2.0", AUD)),
        "issuer with a trailing slash": mint(RSA, claims(env.idp.url + "/", AUD)),
        "no exp": mint(RSA, c(exp=None)),
        "no client claim (azp)": mint(RSA, c(azp=None)),
        "alg none": unsigned(c(), kid=RSA.kid),
        "alg none without kid": unsigned(c()),
        "HS256 with the RSA public key": hs256_with_secret(c(), RSA.public_pem(), kid=RSA.kid),
        "HS256 with the RSA public key, no kid": hs256_with_secret(c(), RSA.public_pem()),
        "tampered signature (RS256)": tamper_signature(mint(RSA, c())),
        "tampered signature (ES256)": tamper_signature(mint(EC, c())),
        "tampered payload": tamper_payload(mint(RSA, c(azp="app-unlisted-1")), azp="app-listed"),
        "signature stripped": mint(RSA, c()).rsplit(".", 1)[0] + ".",
        "unknown kid": mint(STRANGER, c()),
        "ES256 header on the RSA key": mint(EC, c(), kid=RSA.kid),
        "RS256 header on the EC key": mint(RSA, c(), kid=EC.kid),
        "PS256 (not in algorithms)": mint(RSA, c(), alg="PS256"),
        "over 16 KiB": sized_token(RSA, c(), at_least=MAX_TOKEN + 1),
    }


REFUSED = [
    "expired", "not yet valid", "wrong audience", "wrong audience (fabrikam's)", "wrong issuer",
    "issuer with a trailing slash", "no exp", "no client claim (azp)", "alg none", "alg none without kid",
    "HS256 with the RSA public key", "HS256 with the RSA public key, no kid",
    "tampered signature (RS256)", "tampered signature (ES256)", "tampered payload",
    "signature stripped", "unknown kid", "ES256 header on the RSA key",
    "RS256 header on the EC key", "PS256 (not in algorithms)", "over 16 KiB",
]


@pytest.mark.parametrize("case", REFUSED)
def test_bad_token_refused(env, case):
    token = _refused_tokens(env)[case]
    if case == "over 16 KiB":
        assert MAX_TOKEN < len(token) <= MAX_TOKEN + 4, len(token)
    assert_refused(env.gw, env.backends, token)


@pytest.mark.parametrize("garbage", [
    "garbage",
    "a.b.c",
    "..",
    "eyJhbGciOiJSUzI1NiJ9.e30.",
    "eyJhbGciOiJSUzI1NiIsImtpZCI6ImNvbnRvc28tcnNhLTEifQ.bm90IGpzb24.c2ln",
    "x" * 5000,
    "e30.e30.e30.e30",
], ids=["word", "a.b.c", "dots", "empty-claims", "payload-not-json", "long", "four-parts"])
def test_garbage_refused(env, garbage):
    assert_refused(env.gw, env.backends, garbage)


def test_status_counts_token_cache_hits_and_misses(env):
    """`/status` `oidc_token_cache`: a token verified once is then answered from the cache
    (a hit); a new token, a refused one and a tampered copy of a cached one are misses; only
    the verified tokens are held."""
    def cache() -> dict:
        return env.gw.admin.get("/status").json()["oidc_token_cache"]

    token = mint(RSA, env.contoso(jti="status-cache-1"))
    tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    before = cache()
    assert post_chat(env.gw, {"Authorization": f"Bearer {token}"}).status_code == 200
    for _ in range(3):
        assert post_chat(env.gw, {"Authorization": f"Bearer {token}"}).status_code == 200
    assert post_chat(env.gw, {"Authorization": f"Bearer {tampered}"}).status_code == 401
    assert post_chat(env.gw, {"Authorization": "Bearer a.b.c"}).status_code == 401
    after = cache()
    assert after["hits"] - before["hits"] == 3, (before, after)
    assert after["misses"] - before["misses"] == 3, (before, after)
    assert after["entries"] == before["entries"] + 1, (before, after)


def test_failing_jwt_rejects_even_with_a_good_api_key(env):
    now = int(time.time())
    expired = mint(RSA, env.contoso(exp=now - 600))
    assert_refused(env.gw, env.backends, expired, extra_headers={"api-key": KEY}, auth="api_key")


# --------------------------------------------------------------------------------------
# required claims and mapping: 403


@pytest.mark.parametrize("roles", [None, ["AOAI.Reader"], "AOAI.Reader", []],
                         ids=["absent", "other-role", "other-role-string", "empty"])
def test_missing_required_role_is_forbidden(env, roles):
    c = env.contoso(roles=None)
    if roles is not None:
        c["roles"] = roles
    token = mint(RSA, c)
    assert claims_of(token).get("roles") == roles
    assert_refused(env.gw, env.backends, token, status=403, code="Forbidden")


def test_unlisted_app_gets_the_unlisted_policy(env):
    app = "app-unlisted-42"
    token = mint(RSA, env.contoso(azp=app))
    raw, completion = sdk_chat(env.gw, token, deployment="gpt-4o-mini")
    assert completion.choices[0].message.content == "Hello from backend."
    line = env.gw.audit_for(raw.headers["x-request-id"])
    assert line["client"] == f"unlisted:contoso:{app}", line
    assert line["auth"] == "oidc" and line["provider"] == "contoso", line

    # The policy's allow list holds: another deployment, another operation are refused.
    assert_refused(env.gw, env.backends, token, status=403, code="DeploymentNotAllowed")
    r = env.gw.http.post(
        f"/openai/deployments/gpt-4o-mini/embeddings?api-version={API_VERSION}",
        headers={"Authorization": f"Bearer {token}"}, json={"input": "hi"})
    assert_error(r, 403, "OperationNotAllowed", secrets=secrets_for(token))

    # Its own metric label.
    metrics = env.gw.admin.get("/metrics").text
    assert f'client="unlisted:contoso:{app}"' in metrics


def test_unlisted_apps_each_have_their_own_limits(env):
    """`unlisted_clients.limits` (3 requests a minute) apply per application."""
    def chat(app: str):
        token = mint(RSA, env.contoso(azp=app))
        return post_chat(env.gw, {"Authorization": f"Bearer {token}"},
                         path=agw.chat_path("gpt-4o-mini"))

    for i in range(3):
        r = chat("app-limited-a")
        assert r.status_code == 200, f"request {i + 1}: {r.status_code} {r.text}"
    r = chat("app-limited-a")
    assert_error(r, 429, "RateLimitExceeded")
    assert r.headers.get("retry-after"), r.headers
    line = env.gw.audit_for(r.headers["x-request-id"])
    assert line["client"] == "unlisted:contoso:app-limited-a", line
    # Another unlisted application has its own budget.
    r = chat("app-limited-b")
    assert r.status_code == 200, r.text
    assert env.gw.audit_for(r.headers["x-request-id"])["client"] == "unlisted:contoso:app-limited-b"


def test_unlisted_app_without_policy_is_forbidden(env):
    token = mint(FAB, env.fabrikam(azp="some-stranger-app"))
    assert_refused(env.gw, env.backends, token, status=403, code="Forbidden")


# --------------------------------------------------------------------------------------
# two providers


def test_two_providers_each_token_to_its_own(env):
    # Same client_claim value at both providers, two different clients.
    c1 = env.contoso()
    raw, _ = sdk_chat(env.gw, mint(RSA, c1))
    line = env.gw.audit_for(raw.headers["x-request-id"])
    assert (line["client"], line["provider"], line["user"]) == ("oidc-app", "contoso", c1["oid"])

    c2 = env.fabrikam()
    raw, completion = sdk_chat(env.gw, mint(FAB, c2))
    assert completion.choices[0].message.content == "Hello from backend."
    line = env.gw.audit_for(raw.headers["x-request-id"])
    assert (line["client"], line["provider"], line["user"]) == ("fabrikam-app", "fabrikam", c2["sub"])

    # Same kid at both providers: each token is checked against its own provider's key only.
    for key, c in ((SHARED_CONTOSO, env.contoso()), (SHARED_FABRIKAM, env.fabrikam())):
        r = post_chat(env.gw, {"Authorization": f"Bearer {mint(key, c)}"})
        assert r.status_code == 200, r.text
    assert_refused(env.gw, env.backends, mint(SHARED_CONTOSO, env.fabrikam()))
    assert_refused(env.gw, env.backends, mint(SHARED_FABRIKAM, env.contoso()))
    # Each provider its own audiences and algorithms.
    assert_refused(env.gw, env.backends, mint(FAB, env.fabrikam(audience=AUD)))
    assert_refused(env.gw, env.backends, mint(EC, env.fabrikam(), kid=FAB.kid))


# --------------------------------------------------------------------------------------
# credential: forward


def test_forward_backend_receives_the_callers_jwt(env):
    env.fwd.clear()
    env.backend.clear()
    token = mint(RSA, env.contoso())
    raw, completion = sdk_chat(env.gw, token, deployment="fwd-only")
    assert completion.choices[0].message.content == "Hello from fwd."
    reqs = env.fwd.data_requests()
    assert len(reqs) == 1, reqs
    h = reqs[0]["headers"]
    assert h.get("authorization") == f"Bearer {token}", h
    assert "api-key" not in h
    assert env.backend.data_requests() == []
    line = env.gw.audit_for(raw.headers["x-request-id"])
    assert line["backend"] == "fwd" and line["client"] == "oidc-app", line


def test_api_key_request_never_reaches_a_forward_backend(env):
    env.fwd.clear()
    env.backend.clear()
    for headers in ({"api-key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        r = post_chat(env.gw, headers, path=agw.chat_path("fwd-only"))
        body = assert_error(r, 403, "Forbidden")
        # clear: it says a token is needed
        assert "token" in body["error"]["message"].lower(), body
        line = env.gw.audit_for(r.headers["x-request-id"])
        assert line["client"] == "test-client" and line["backend"] is None, line
    # and through the SDK
    with pytest.raises(openai.PermissionDeniedError):
        agw.azure_client(env.gw).chat.completions.create(
            model="fwd-only", messages=[{"role": "user", "content": "hi"}])
    assert env.fwd.data_requests() == [], "an API-key request reached a forward backend"
    assert env.backend.data_requests() == []


def test_mixed_deployment_skips_forward_member_for_api_keys(env):
    env.fwd.clear()
    env.backend.clear()
    # API key: the forward member (priority 1) is skipped, the managed-identity one serves.
    raw = agw.azure_client(env.gw).chat.completions.with_raw_response.create(
        model="mixed", messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().choices[0].message.content == "Hello from backend."
    assert env.fwd.data_requests() == []
    assert len(env.backend.data_requests()) == 1
    # JWT: the forward member serves, with the caller's token.
    token = mint(EC, env.contoso())
    _, completion = sdk_chat(env.gw, token, deployment="mixed")
    assert completion.choices[0].message.content == "Hello from fwd."
    reqs = env.fwd.data_requests()
    assert len(reqs) == 1 and reqs[0]["headers"].get("authorization") == f"Bearer {token}"


# --------------------------------------------------------------------------------------
# key rotation, unknown-kid flood, outage (one gateway each)


def single_provider_gateway(cluster, idp: agw.Mock, backend: agw.Mock, **provider_kw):
    cfg = agw.single(
        backend,
        clients=[agw.client("oidc-app", keys=(),
                            tokens=[{"provider": "contoso", "client": "app-listed"}])],
        identity={"oidc": [provider("contoso", idp, **provider_kw)]},
        health_checks={"interval_seconds": 3600},
    )
    return cluster.gateway(cfg)


def started_provider(cluster, *keys: SigningKey):
    """An IdP serving `keys`, a backend, and a gateway that has fetched those keys at start;
    with a factory of valid claims for that IdP."""
    idp = cluster.mock("idp", oidc=True)
    backend = cluster.mock("backend")
    serve_jwks(idp, *keys)
    gw = single_provider_gateway(cluster, idp, backend)
    wait_startup_fetch(idp)
    return idp, backend, gw, lambda: claims(idp.url, AUD)


def flood(gw: agw.Gateway, tokens: list[str]) -> list[int]:
    def one(tok: str) -> int:
        with agw.http_client() as h:
            return h.post(gw.url + CHAT, headers={"Authorization": f"Bearer {tok}"},
                          json=BODY).status_code

    with ThreadPoolExecutor(max_workers=10) as pool:
        return list(pool.map(one, tokens))


def test_key_rotation_accepted_after_one_refetch(cluster):
    idp, backend, gw, c = started_provider(cluster, RSA)

    sdk_chat(gw, mint(RSA, c()))
    before = jwks_fetches(idp)

    new = SigningKey.rsa("contoso-rsa-2")
    serve_jwks(idp, RSA, new)
    t0 = time.monotonic()
    raw, completion = sdk_chat(gw, mint(new, c()))
    assert completion.choices[0].message.content == "Hello from backend."
    assert jwks_fetches(idp) == before + 1, "the rotated key should cost exactly one refetch"
    # Both keys now work, with no further fetch.
    sdk_chat(gw, mint(RSA, c()))
    sdk_chat(gw, mint(new, c()))
    assert jwks_fetches(idp) == before + 1

    # A flood of unknown kids in the same minute: no further fetch at all.
    stranger_tokens = [mint(STRANGER, c(), kid=f"unknown-{i}") for i in range(30)]
    assert flood(gw, stranger_tokens) == [401] * 30
    assert time.monotonic() - t0 < 55, "too slow to show the once-a-minute rule"
    assert jwks_fetches(idp) == before + 1, "unknown kids refetched within the minute"
    assert len(backend.data_requests()) == 4  # the four accepted requests


def test_unknown_kid_flood_fetches_at_most_once_a_minute(cluster):
    """Provider configured with `jwks_url` (no discovery)."""
    idp = cluster.mock("idp", oidc=True)
    backend = cluster.mock("backend")
    serve_jwks(idp, RSA, EC)
    gw = single_provider_gateway(cluster, idp, backend, jwks_url=f"{idp.url}/jwks")
    before = wait_startup_fetch(idp)
    c = lambda: claims(idp.url, AUD)  # noqa: E731
    t0 = time.monotonic()

    tokens = [mint(STRANGER, c(), kid=f"unknown-{i}") for i in range(30)]
    statuses = flood(gw, tokens)
    assert statuses == [401] * 30, statuses
    after = jwks_fetches(idp)
    assert after - before <= 1, f"{after - before} JWKS fetches for a flood of unknown kids"
    # SPEC §5: the first refetch happens at once.
    assert after - before == 1, "an unknown kid should trigger one refetch at once"
    assert backend.data_requests() == []

    # Known keys keep working; a key rotated in now waits for the next minute.
    sdk_chat(gw, mint(RSA, c()))
    sdk_chat(gw, mint(EC, c()))
    late = SigningKey.rsa("contoso-rsa-late")
    serve_jwks(idp, RSA, EC, late)
    r = post_chat(gw, {"Authorization": f"Bearer {mint(late, c())}"})
    assert_error(r, 401, "InvalidCredential")
    assert time.monotonic() - t0 < 55, "too slow to show the once-a-minute rule"
    assert jwks_fetches(idp) == after, "a second fetch within the minute"
    assert idp.stats()["discovery_requests"] == 0, "jwks_url set, yet discovery was fetched"


def test_provider_outage_after_start_changes_nothing_for_valid_tokens(cluster):
    idp, backend, gw, c = started_provider(cluster, RSA, EC)
    sdk_chat(gw, mint(RSA, c()))

    set_outage(idp, True)
    with agw.http_client() as h:
        assert h.get(f"{idp.url}/jwks").status_code == 503
        assert h.get(f"{idp.url}/.well-known/openid-configuration").status_code == 503
    for key in (RSA, EC):  # fresh tokens: no verified-token cache hit
        _, completion = sdk_chat(gw, mint(key, c()))
        assert completion.choices[0].message.content == "Hello from backend."

    # An unknown kid makes the gateway try the IdP, which fails: the keys it holds stay.
    stats = idp.stats()
    r = post_chat(gw, {"Authorization": f"Bearer {mint(STRANGER, c())}"})
    assert_error(r, 401, "InvalidCredential")
    after = idp.stats()
    assert (after["jwks_requests"] + after["discovery_requests"]
            > stats["jwks_requests"] + stats["discovery_requests"]), \
        "the unknown kid did not make the gateway try the IdP"
    for key in (RSA, EC):
        _, completion = sdk_chat(gw, mint(key, c()))
        assert completion.choices[0].message.content == "Hello from backend."
    assert gw.proc.alive()


def test_reload_during_provider_outage_keeps_the_keys(cluster):
    """SPEC §5 (keys kept when the IdP is unreachable) with §8 (SIGHUP re-reads the file):
    a reload of an unchanged configuration while the IdP is down must not leave the provider
    without keys."""
    idp, backend, gw, c = started_provider(cluster, RSA)
    sdk_chat(gw, mint(RSA, c()))

    set_outage(idp, True)
    gw.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in gw.proc.stderr()
               or "reload failed" in gw.proc.stderr(), 20, "the reload to be logged")
    assert "configuration reloaded" in gw.proc.stderr(), gw.proc.stderr()[-2000:]
    r = post_chat(gw, {"Authorization": f"Bearer {mint(RSA, c())}"})
    assert r.status_code == 200, (
        f"after a reload during the IdP outage a valid token got {r.status_code}: {r.text}")


def verify_threads_of(gw: agw.Gateway) -> int:
    """The gateway's threads named `agw-jwt-verify` (what `ps -L` / `top -H` show)."""
    tasks = pathlib.Path(f"/proc/{gw.proc.proc.pid}/task")
    return sum((t / "comm").read_text().strip() == "agw-jwt-verify" for t in tasks.iterdir())


@pytest.mark.parametrize("threads", [None, 0, 3], ids=["default", "on-the-event-loop", "three"])
def test_verify_threads_check_new_tokens_with_the_same_answers(cluster, threads):
    """`identity.verify_threads` (default 1): signatures of tokens not in the cache are checked
    on that many threads of their own (0: on the event loop), started by the first token that
    needs them (none at start: a `--daemon` fork would lose them). Whatever the setting,
    twenty new tokens sent at once are each accepted once verified, and tampered copies
    refused."""
    idp = cluster.mock("idp", oidc=True)
    backend = cluster.mock("backend")
    serve_jwks(idp, RSA)
    identity = {"oidc": [provider("contoso", idp)]}
    if threads is not None:
        identity["verify_threads"] = threads
    gw = cluster.gateway(agw.single(
        backend,
        clients=[agw.client("oidc-app", keys=(),
                            tokens=[{"provider": "contoso", "client": "app-listed"}])],
        identity=identity,
        health_checks={"interval_seconds": 3600},
    ))
    wait_startup_fetch(idp)
    assert verify_threads_of(gw) == 0, "started before a token needed them"

    good = [mint(RSA, claims(idp.url, AUD, jti=f"vt-{i}")) for i in range(20)]
    tampered = [tamper_signature(t) for t in good[:5]]
    before = gw.admin.get("/status").json()["oidc_token_cache"]
    codes = flood(gw, good + tampered)
    assert codes == [200] * 20 + [401] * 5, codes
    after = gw.admin.get("/status").json()["oidc_token_cache"]
    assert after["misses"] - before["misses"] == 25, (before, after)
    assert after["entries"] - before["entries"] == 20, (before, after)
    assert verify_threads_of(gw) == (1 if threads is None else threads)
