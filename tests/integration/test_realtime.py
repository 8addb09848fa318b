"""Realtime sessions over WebSocket (SPEC §12; issue 15).

Accepted sessions go through the official `openai` SDK's realtime client (`AzureOpenAI` on
`/openai/realtime?deployment=D` with an API key or a JWT, `OpenAI` on
`/openai/v1/realtime?model=D` with the key as a bearer), through the gateway, to an aoai-mock
that speaks the realtime protocol and echoes the deployment it was asked for. Refused
upgrades and raw frames use the `websockets` client directly.

One gateway (module scope) serves the read-only checks; the drain and upgrade tests start
their own.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from dataclasses import dataclass

import openai
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

import agw
from agw import KEY, MI_TOKEN, OTHER_KEY, wait_until
from jwt_util import SigningKey, claims, jwks, mint
from opsutil import metric_value, scrape

RT_VERSION = "2025-04-01-preview"
AUD = "api://aoai-gateway"
LIMITED_KEY = agw.make_key("realtime limited")
NARROW_KEY = agw.make_key("realtime narrow")
RSA = SigningKey.rsa("rt-rsa-1")
# What the mock reports for every response (see tests/aoai-mock/src/realtime.rs).
MOCK_USAGE = {"input": 120, "output": 80, "total": 200, "cached": 64}


@dataclass
class Env:
    gw: agw.Gateway
    backend: agw.Mock
    idp: agw.Mock


def config(backend: agw.Mock, idp: agw.Mock | None = None, **server) -> dict:
    clients = [
        agw.client("test-client"),
        # One mock response (200 tokens) puts this client over its limit.
        agw.client("limited", keys=(agw.sha256_hex(LIMITED_KEY),),
                   limits={"tokens_per_minute": 150}),
        agw.client("narrow", keys=(agw.sha256_hex(NARROW_KEY),), deployments=("gpt-4o",)),
    ]
    extra = {}
    if idp is not None:
        clients.append(agw.client("oidc-app", keys=(),
                                  tokens=[{"provider": "contoso", "client": "app-listed"}]))
        extra["identity"] = {"oidc": [{
            "name": "contoso", "issuer": idp.url, "audiences": [AUD],
            "algorithms": ["RS256"], "client_claim": "azp",
        }]}
    return agw.make_config(
        deployments={
            "gpt-rt": [agw.member("b1", "gpt-rt-east")],
            "gpt-4o": [agw.member("b1")],
        },
        backends=[agw.backend("b1", backend)],
        clients=clients,
        health_checks={"interval_seconds": 3600},
        server={"realtime_max_message_bytes": 65536, **server},
        **extra,
    )


@pytest.fixture(scope="module")
def env(module_cluster) -> Env:
    backend = module_cluster.mock("rt-east", require_bearer=MI_TOKEN)
    idp = module_cluster.mock("rt-idp", oidc=True)
    r = idp.http.put("/_mock/oidc/jwks", json=jwks(RSA))
    assert r.status_code == 204, r.text
    gw = module_cluster.gateway(config(backend, idp))
    wait_until(lambda: idp.stats()["jwks_requests"], 30, "the gateway's JWKS fetch")
    return Env(gw, backend, idp)


# --------------------------------------------------------------------------------------
# helpers


def ws_base(gw: agw.Gateway) -> str:
    return "ws://" + gw.listeners[0]


def azure_sdk(gw: agw.Gateway, **auth) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=gw.url, api_version=RT_VERSION, max_retries=0,
        websocket_base_url=ws_base(gw) + "/openai", http_client=agw.http_client(), **auth,
    )


def v1_sdk(gw: agw.Gateway, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/openai/v1", api_key=key, max_retries=0,
                         http_client=agw.http_client())


def until(conn, kind: str):
    """Events up to and including the first of type `kind`."""
    seen = []
    for _ in range(100):
        ev = conn.recv()
        seen.append(ev)
        if ev.type == kind:
            return seen
    raise AssertionError(f"no {kind} in {[e.type for e in seen]}")


def one_response(conn) -> tuple[str, object]:
    """response.create → the text of the deltas and the response.done event."""
    conn.response.create()
    events = until(conn, "response.done")
    assert events[0].type == "response.created", [e.type for e in events]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    return text, events[-1]


def tokens(gw: agw.Gateway, client: str, kind: str) -> float:
    return metric_value(scrape(gw), "aoai_gateway_tokens_total", client=client,
                        deployment="gpt-rt", backend="b1", type=kind) or 0


def realtime_lines(gw: agw.Gateway, client: str) -> list[dict]:
    return [l for l in gw.audit_lines()
            if l.get("operation") == "realtime" and l.get("client") == client]


def wait_session_line(gw: agw.Gateway, client: str, before: int) -> dict:
    return wait_until(lambda: (realtime_lines(gw, client)[before:] or [None])[0], 15,
                      f"the audit line of {client}'s realtime session")


def upgrades(backend: agw.Mock) -> list[dict]:
    return [q for q in backend.data_requests() if q["path"].endswith("/realtime")]


def assert_backend_saw_only_the_gateway(backend: agw.Mock, param: str, secret: str) -> dict:
    reqs = upgrades(backend)
    assert len(reqs) == 1, reqs
    q = reqs[0]
    assert q["status"] == 101, q
    h = q["headers"]
    assert h.get("authorization") == f"Bearer {MI_TOKEN}", h
    assert "api-key" not in h, h
    assert all(secret not in v for v in h.values()), "a client credential reached the backend"
    assert secret not in (q["query"] or "")
    assert f"{param}=gpt-rt-east" in q["query"].split("&"), q["query"]
    return q


# --------------------------------------------------------------------------------------
# accepted sessions


def test_azure_path_with_api_key(env):
    env.backend.clear()
    before = len(realtime_lines(env.gw, "test-client"))
    prompt0 = tokens(env.gw, "test-client", "prompt")
    with azure_sdk(env.gw, api_key=KEY).realtime.connect(model="gpt-rt") as conn:
        created = conn.recv()
        assert created.type == "session.created"
        # The backend was asked for the member's deployment, not the client-facing name.
        assert created.session.model == "gpt-rt-east"
        conn.session.update(session={"type": "realtime", "instructions": "Be brief."})
        assert until(conn, "session.updated")[-1].session.instructions == "Be brief."
        text, done = one_response(conn)
        assert text == "Hello from rt-east."
        assert done.response.usage.total_tokens == MOCK_USAGE["total"]
        # Charged as it arrives: the metric moved while the session is still open.
        wait_until(lambda: tokens(env.gw, "test-client", "prompt") == prompt0 + 120, 5,
                   "tokens_total to count the response")
        assert metric_value(scrape(env.gw), "aoai_gateway_realtime_sessions") == 1
        one_response(conn)
    q = assert_backend_saw_only_the_gateway(env.backend, "deployment", KEY)
    assert q["path"] == "/openai/realtime"
    assert f"api-version={RT_VERSION}" in q["query"].split("&")

    line = wait_session_line(env.gw, "test-client", before)
    assert (line["status"], line["method"], line["path"]) == (101, "GET", "/openai/realtime"), line
    assert (line["deployment"], line["backend"], line["auth"]) == ("gpt-rt", "b1", "api_key"), line
    assert (line["prompt_tokens"], line["completion_tokens"], line["total_tokens"]) == \
        (240, 160, 400), line
    assert line["usage_source"] == "response" and line["error_code"] is None, line
    assert isinstance(line["duration_ms"], (int, float)) and line["duration_ms"] >= 0, line
    samples = scrape(env.gw)
    assert tokens(env.gw, "test-client", "prompt") == prompt0 + 240
    assert metric_value(samples, "aoai_gateway_realtime_sessions") == 0
    assert metric_value(samples, "aoai_gateway_requests_total", client="test-client",
                        deployment="gpt-rt", operation="realtime", code="101") >= 1
    assert metric_value(samples, "aoai_gateway_realtime_session_duration_seconds_count") >= 1


def test_v1_path_with_the_key_as_bearer(env):
    env.backend.clear()
    before = len(realtime_lines(env.gw, "test-client"))
    with v1_sdk(env.gw).realtime.connect(model="gpt-rt") as conn:
        assert conn.recv().session.model == "gpt-rt-east"
        text, _ = one_response(conn)
        assert text == "Hello from rt-east."
    q = assert_backend_saw_only_the_gateway(env.backend, "model", KEY)
    assert q["path"] == "/openai/v1/realtime"
    line = wait_session_line(env.gw, "test-client", before)
    assert (line["path"], line["total_tokens"]) == ("/openai/v1/realtime", 200), line


def test_jwt_session(env):
    env.backend.clear()
    token = mint(RSA, claims(env.idp.url, AUD))
    before = len(realtime_lines(env.gw, "oidc-app"))
    with azure_sdk(env.gw, azure_ad_token=token).realtime.connect(model="gpt-rt") as conn:
        assert conn.recv().type == "session.created"
        text, _ = one_response(conn)
        assert text == "Hello from rt-east."
    assert_backend_saw_only_the_gateway(env.backend, "deployment", token)
    line = wait_session_line(env.gw, "oidc-app", before)
    assert (line["auth"], line["provider"], line["total_tokens"]) == ("oidc", "contoso", 200), line
    assert token not in env.gw.audit_path.read_text()


def test_pings_are_answered_and_large_messages_close_the_session(env):
    url = ws_base(env.gw) + "/openai/realtime?api-version=x&deployment=gpt-rt"
    with ws_connect(url, additional_headers={"api-key": KEY}) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
        assert ws.ping(b"are you there").wait(5)
        # Over server.realtime_max_message_bytes (64 KiB here): closed with 1009.
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 70000}))
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(10):
                ws.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009, closed.value


def test_a_client_that_vanishes_ends_its_session_at_once(env):
    before = len(realtime_lines(env.gw, "test-client"))
    url = ws_base(env.gw) + "/openai/realtime?api-version=x&deployment=gpt-rt"
    ws = ws_connect(url, additional_headers={"api-key": KEY})
    assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
    gone = time.monotonic()
    ws.socket.shutdown(socket.SHUT_RDWR)  # no close frame
    ws.socket.close()
    line = wait_session_line(env.gw, "test-client", before)
    assert time.monotonic() - gone < 3, "the session outlived its client"
    assert (line["status"], line["total_tokens"]) == (101, None), line
    wait_until(lambda: metric_value(scrape(env.gw), "aoai_gateway_realtime_sessions") == 0, 5,
               "the open-sessions gauge to drop")


def test_idle_sessions_are_closed(cluster):
    backend = cluster.mock("rt-idle", require_bearer=MI_TOKEN)
    gw = cluster.gateway(config(backend, realtime_idle_seconds=1))
    url = ws_base(gw) + "/openai/realtime?api-version=x&deployment=gpt-rt"
    with ws_connect(url, additional_headers={"api-key": KEY}) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert 0.5 < time.monotonic() - started < 5
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
        assert closed.value.rcvd.reason == "idle timeout"
    wait_session_line(gw, "test-client", 0)


# --------------------------------------------------------------------------------------
# refused upgrades


@pytest.mark.parametrize("query,headers,status,code", [
    ("deployment=gpt-rt", {"api-key": OTHER_KEY}, 401, "InvalidCredential"),
    ("deployment=gpt-rt", {}, 401, "MissingCredential"),
    ("deployment=gpt-rt", {"api-key": NARROW_KEY}, 403, "DeploymentNotAllowed"),
    ("deployment=gpt-nope", {"api-key": KEY}, 404, "DeploymentNotFound"),
    ("api-version=x", {"api-key": KEY}, 400, "InvalidRequestBody"),
], ids=["bad-key", "no-key", "deployment-not-allowed", "unknown-deployment", "no-deployment"])
def test_refused_upgrades_reach_no_backend(env, query, headers, status, code):
    env.backend.clear()
    url = ws_base(env.gw) + "/openai/realtime?" + query
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(url, additional_headers=headers, open_timeout=10)
    resp = refused.value.response
    assert resp.status_code == status
    assert json.loads(resp.body)["error"]["code"] == code
    if status == 401:
        assert resp.headers.get("www-authenticate") == "Bearer"
    assert upgrades(env.backend) == []


@pytest.mark.parametrize("change", [{"body": b"hello"}, {"Sec-WebSocket-Version": "8"},
                                    {"Sec-WebSocket-Key": "short"}],
                         ids=["a-body", "version-8", "bad-key"])
def test_malformed_openings_are_refused(env, change):
    env.backend.clear()
    headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "api-key": KEY}
    body = change.pop("body", b"")
    headers.update(change)
    r = agw.raw_request(env.gw.url, "GET", "/openai/realtime?api-version=x&deployment=gpt-rt",
                        headers, body=body, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidRequestBody", r.text
    assert upgrades(env.backend) == []


def test_a_plain_get_without_upgrade_is_refused(env):
    env.backend.clear()
    r = env.gw.http.get("/openai/realtime?deployment=gpt-rt", headers={"api-key": KEY})
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidRequestBody", r.text
    assert upgrades(env.backend) == []


# --------------------------------------------------------------------------------------
# limits


def test_over_the_token_limit_response_create_gets_an_error_event(env):
    env.backend.clear()
    before = len(realtime_lines(env.gw, "limited"))
    samples = scrape(env.gw)
    refused0 = metric_value(samples, "aoai_gateway_rejections_total", client="limited",
                            reason="token_limited") or 0
    with azure_sdk(env.gw, api_key=LIMITED_KEY).realtime.connect(model="gpt-rt") as conn:
        assert conn.recv().type == "session.created"
        one_response(conn)  # 200 tokens of 150 per minute: in debt now
        conn.response.create(event_id="evt_over")
        err = conn.recv()
        assert err.type == "error", err
        assert err.error.code == "rate_limit_exceeded", err
        assert err.error.event_id == "evt_over", err
        # The session stays open: the next event is the answer to the next request, and no
        # response was created for the refused one.
        conn.session.update(session={"type": "realtime", "instructions": "Still here?"})
        assert conn.recv().type == "session.updated"
    line = wait_session_line(env.gw, "limited", before)
    assert (line["status"], line["total_tokens"]) == (101, 200), line
    assert metric_value(scrape(env.gw), "aoai_gateway_rejections_total", client="limited",
                        reason="token_limited") == refused0 + 1


# --------------------------------------------------------------------------------------
# drain and upgrade


def test_a_session_survives_sigterm(cluster):
    backend = cluster.mock("rt-drain", require_bearer=MI_TOKEN)
    gw = cluster.gateway(config(backend))
    with azure_sdk(gw, api_key=KEY).realtime.connect(model="gpt-rt") as conn:
        assert conn.recv().type == "session.created"
        one_response(conn)
        gw.process.send_signal(signal.SIGTERM)
        # New connections are no longer taken...
        port = int(gw.listeners[0].rsplit(":", 1)[1])

        def refused():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return False
            except OSError:
                return True

        wait_until(refused, 10, "the listener to close")
        time.sleep(1.5)
        # ...but the open session goes on.
        assert gw.process.poll() is None
        text, _ = one_response(conn)
        assert text == "Hello from rt-drain."
    gw.process.wait(timeout=15)
    line = wait_session_line(gw, "test-client", 0)
    assert line["total_tokens"] == 400, line
    cluster.gateways.remove(gw)
    gw.close()


def test_a_session_survives_a_graceful_upgrade(cluster):
    backend = cluster.mock("rt-upgrade", require_bearer=MI_TOKEN)
    gw = cluster.gateway(config(backend))
    ident = cluster.identity_mock()
    env = agw.clean_env({"IDENTITY_ENDPOINT": f"{ident.url}/msi/token",
                         "IDENTITY_HEADER": agw.MI_HEADER_SECRET})
    with azure_sdk(gw, api_key=KEY).realtime.connect(model="gpt-rt") as conn:
        assert conn.recv().type == "session.created"
        new = agw.Proc("gateway-upgraded", [str(agw.GATEWAY_BIN), "run", "-c",
                                            str(gw.config_path), "--upgrade"],
                       cluster.workdir, env)
        cluster.procs.append(new)
        wait_until(lambda: "Bootstrap starting" in new.stderr(), 30,
                   "the --upgrade instance to start")
        time.sleep(0.5)
        gw.process.send_signal(signal.SIGQUIT)
        # The new instance takes new sessions...
        wait_until(lambda: gw.http.get("/healthz").status_code == 200, 30,
                   "the upgraded instance to answer")
        with azure_sdk(gw, api_key=KEY).realtime.connect(model="gpt-rt") as other:
            assert other.recv().type == "session.created"
        # ...while the old one keeps the open session.
        time.sleep(1)
        assert gw.process.poll() is None, "the old instance left with a session open"
        text, _ = one_response(conn)
        assert text == "Hello from rt-upgrade."
    gw.process.wait(timeout=15)
    assert new.alive(), new.tail()
    cluster.gateways.remove(gw)
    gw.close()
