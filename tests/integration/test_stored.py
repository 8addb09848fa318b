"""Stored objects, owned and pinned (SPEC §11, §14 `state`; issue 14): stored responses.

Two aoai-mock processes play two Azure OpenAI resources (`east`, `west`): each stores the
responses it created and answers 404 for any other id, as Azure does. Both are members of
`gpt-4o`, so the pool would spread a chain over both; the gateway must send every follow-up
(`previous_response_id`, GET, DELETE, cancel, input_items) to the one that holds it. Callers:
two API-key clients and two OIDC users of one application (`user_claim: oid`). The official
`openai` SDK is the client, both as `OpenAI(base_url=…/openai/v1)` and `AzureOpenAI`.

Which resource holds a response is read from the response itself (each mock answers
"Hello from NAME.") and checked against the requests each mock recorded.
"""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass

import httpx
import openai
import pytest
import yaml

import agw
from agw import KEY, OTHER_KEY, assert_error, make_key, wait_until
from jwt_util import SigningKey, claims, jwks, mint
from redisutil import RedisServer

RESPONSES_API = "2025-04-01-preview"
RSA = SigningKey.rsa("stored-rsa-1")
AUD = "api://aoai-gateway"
METERED_KEY = make_key("metered stored")
DAY_LIMIT = 100_000


@dataclass
class Env:
    gw: agw.Gateway
    east: agw.Mock
    west: agw.Mock
    idp: agw.Mock

    @property
    def mocks(self) -> list[agw.Mock]:
        return [self.east, self.west]

    def clear(self) -> None:
        for m in self.mocks:
            m.clear()

    def by_name(self, name: str) -> agw.Mock:
        return {"east": self.east, "west": self.west}[name]


def stored_config(east: agw.Mock, west: agw.Mock, idp: agw.Mock | None = None, **sections) -> dict:
    clients = [
        agw.client("alice-app"),
        agw.client("bob-app", keys=(agw.OTHER_KEY_SHA256,)),
        agw.client("metered", keys=(agw.sha256_hex(METERED_KEY),),
                   limits={"tokens_per_day": DAY_LIMIT}),
    ]
    identity = {}
    if idp is not None:
        clients.append(agw.client("oidc-app", keys=(),
                                  tokens=[{"provider": "contoso", "client": "app-users"}]))
        identity = {"identity": {"oidc": [{
            "name": "contoso", "issuer": idp.url, "audiences": [AUD], "algorithms": ["RS256"],
            "clock_skew_seconds": 60, "client_claim": "azp", "user_claim": "oid",
        }]}}
    return agw.make_config(
        deployments={
            "gpt-4o": [agw.member("east"), agw.member("west")],
            "west-only": [agw.member("west", "gpt-4o")],
        },
        backends=[agw.backend("east", east), agw.backend("west", west, region="westus")],
        clients=clients,
        **identity,
        **sections,
    )


@pytest.fixture(scope="module")
def env(module_cluster) -> Env:
    east = module_cluster.mock("east", background_delay_ms=400)
    west = module_cluster.mock("west", background_delay_ms=400)
    idp = module_cluster.mock("stored-idp", oidc=True)
    r = idp.http.put("/_mock/oidc/jwks", json=jwks(RSA))
    assert r.status_code == 204, r.text
    gw = module_cluster.gateway(stored_config(east, west, idp))
    wait_until(lambda: idp.stats()["jwks_requests"], 30, "the gateway to fetch the JWKS")
    return Env(gw, east, west, idp)


def v1(gw: agw.Gateway, key: str = KEY) -> openai.OpenAI:
    return agw.openai_client(gw, key)


def azure(gw: agw.Gateway, key: str = KEY) -> openai.AzureOpenAI:
    return agw.azure_client(gw, key, api_version=RESPONSES_API)


def user_token(env: Env, oid: str) -> str:
    return mint(RSA, claims(env.idp.url, AUD, azp="app-users", oid=oid))


def holder(resp) -> str:
    """The resource that produced a response ("Hello from NAME.")."""
    text = resp.output_text
    for name in ("east", "west"):
        if f"from {name}." in text:
            return name
    raise AssertionError(f"no mock name in {text!r}")


def response_paths(m: agw.Mock) -> list[tuple[str, str]]:
    return [(q["method"], q["path"]) for q in m.data_requests()]


def assert_reached_no_backend(env: Env) -> None:
    for m in env.mocks:
        assert m.data_requests() == [], f"{m.name} was reached: {response_paths(m)}"


def assert_not_found(exc: openai.APIStatusError) -> None:
    assert exc.status_code == 404, exc
    body = exc.response.json()
    assert body["error"]["code"] == "ObjectNotFound", body


# --------------------------------------------------------------------------------------
# chains land on the holder


@pytest.mark.parametrize("style", ["v1", "azure"])
def test_chains_and_follow_ups_always_land_on_the_resource_that_holds_them(env, style):
    client = v1(env.gw) if style == "v1" else azure(env.gw)
    seen = set()
    for i in range(12):
        first = client.responses.create(model="gpt-4o", input=f"Turn one, chain {i}.")
        name = holder(first)
        seen.add(name)
        other = next(m for m in env.mocks if m.name != name)
        env.clear()
        second = client.responses.create(
            model="gpt-4o", input="Turn two.", previous_response_id=first.id
        )
        assert holder(second) == name, f"chain {i}: the follow-up left its holder"
        assert second.previous_response_id == first.id
        third = client.responses.create(
            model="gpt-4o", input="Turn three.", previous_response_id=second.id
        )
        assert holder(third) == name
        got = client.responses.retrieve(first.id)
        assert got.id == first.id and got.status == "completed"
        items = client.responses.input_items.list(first.id)
        assert [c.text for it in items.data for c in it.content] == [f"Turn one, chain {i}."]
        assert other.data_requests() == [], f"chain {i}: {other.name} got {response_paths(other)}"
        posts = [q for q in env.by_name(name).data_requests() if q["method"] == "POST"]
        assert len(posts) == 2
    assert seen == {"east", "west"}, "the pool should have spread the chains over both resources"


def test_delete_forgets_the_record_and_cancel_reaches_the_holder(env):
    client = v1(env.gw)
    r = client.responses.create(model="gpt-4o", input="Delete me.")
    bg = client.responses.create(model="gpt-4o", input="Cancel me.", background=True)
    env.clear()
    cancelled = client.responses.cancel(bg.id)
    assert cancelled.id == bg.id and cancelled.status == "cancelled"
    client.responses.delete(r.id)
    paths = {m.name: response_paths(m) for m in env.mocks}
    assert ("DELETE", f"/openai/v1/responses/{r.id}") in paths[holder(r)]
    env.clear()
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.retrieve(r.id)
    assert_not_found(e.value)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="gpt-4o", input="again", previous_response_id=r.id)
    assert_not_found(e.value)
    assert_reached_no_backend(env)


def test_streamed_creation_is_recorded_and_a_stream_resumes_on_the_holder(env):
    client = v1(env.gw)
    events = list(client.responses.create(model="gpt-4o", input="Stream it.", stream=True))
    created = next(e for e in events if e.type == "response.created")
    done = next(e for e in events if e.type == "response.completed")
    rid = created.response.id
    name = holder(done.response)
    env.clear()
    resumed = list(client.responses.retrieve(rid, stream=True, starting_after=3))
    seqs = [e.sequence_number for e in resumed]
    assert seqs and seqs[0] == 4 and seqs == list(range(4, 4 + len(seqs)))
    assert resumed[-1].type == "response.completed"
    resumed_line = env.gw.wait_audit(
        lambda l: l.get("method") == "GET" and l.get("path") == f"/openai/v1/responses/{rid}"
    )
    assert resumed_line["stream"] is True and resumed_line["status"] == 200
    assert resumed_line["backend"] == name and resumed_line["deployment"] == "gpt-4o"
    assert resumed_line["usage_source"] == "none", "a retrieved response is not charged again"
    follow = client.responses.create(model="gpt-4o", input="More.", previous_response_id=rid)
    assert holder(follow) == name
    other = next(m for m in env.mocks if m.name != name)
    assert other.data_requests() == []


# --------------------------------------------------------------------------------------
# ownership


def test_another_clients_ids_are_not_found_and_reach_no_backend(env):
    alice = v1(env.gw)
    r = alice.responses.create(model="gpt-4o", input="Alice's secret.")
    bob_v1, bob_azure = v1(env.gw, OTHER_KEY), azure(env.gw, OTHER_KEY)
    env.clear()
    for call in (
        lambda: bob_v1.responses.retrieve(r.id),
        lambda: bob_azure.responses.retrieve(r.id),
        lambda: bob_v1.responses.input_items.list(r.id),
        lambda: bob_v1.responses.cancel(r.id),
        lambda: bob_v1.responses.delete(r.id),
        lambda: bob_v1.responses.retrieve(r.id, stream=True, starting_after=0),
        lambda: bob_v1.responses.create(model="gpt-4o", input="x", previous_response_id=r.id),
    ):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert_not_found(e.value)
    assert_reached_no_backend(env)
    # Unknown and never-stored ids get the very same answer.
    bodies = set()
    for rid in (r.id, "resp_doesnotexist0000", r.id[:-1] + ("0" if r.id[-1] != "0" else "1")):
        resp = env.gw.http.get(f"/openai/v1/responses/{rid}", headers={"api-key": OTHER_KEY})
        assert_error(resp, 404, "ObjectNotFound")
        bodies.add(resp.json()["error"]["message"])
    assert len(bodies) == 1
    assert_reached_no_backend(env)
    # Still Alice's.
    assert alice.responses.retrieve(r.id).id == r.id


def test_one_user_of_an_application_cannot_read_anothers(env):
    u1 = v1(env.gw, user_token(env, "user-one"))
    u2 = v1(env.gw, user_token(env, "user-two"))
    r = u1.responses.create(model="gpt-4o", input="User one's conversation.")
    env.clear()
    for c in (u2, v1(env.gw)):
        with pytest.raises(openai.NotFoundError) as e:
            c.responses.retrieve(r.id)
        assert_not_found(e.value)
        with pytest.raises(openai.NotFoundError) as e:
            c.responses.create(model="gpt-4o", input="x", previous_response_id=r.id)
        assert_not_found(e.value)
    assert_reached_no_backend(env)
    chained = u1.responses.create(model="gpt-4o", input="Again.", previous_response_id=r.id)
    assert holder(chained) == holder(r)
    line = env.gw.wait_audit(lambda l: l.get("path", "").endswith("/responses")
                             and l.get("user") == "user-one" and l.get("status") == 200)
    assert line["client"] == "oidc-app"


def test_store_false_is_not_recorded(env):
    client = v1(env.gw)
    r = client.responses.create(model="gpt-4o", input="Forget me.", store=False)
    env.clear()
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.retrieve(r.id)
    assert_not_found(e.value)
    assert_reached_no_backend(env)


def test_a_follow_up_needs_the_responses_deployment_allowed(cluster):
    """A client's own response, on a deployment it may no longer use (the configuration
    changed): its follow-ups are refused (403) before any backend."""
    east, west = cluster.mock("east"), cluster.mock("west")
    cfg = stored_config(east, west)
    gw = cluster.gateway(cfg)
    r = v1(gw).responses.create(model="gpt-4o", input="Mine.")
    cfg = gw.config  # as written, listeners included
    cfg["clients"][0]["allow"]["deployments"] = ["west-only"]
    gw.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    gw.process.send_signal(signal.SIGHUP)

    def refused():
        resp = gw.http.get(f"/openai/v1/responses/{r.id}", headers={"api-key": KEY})
        return resp if resp.status_code == 403 else None

    resp = wait_until(refused, 10, "the reload to take the deployment away")
    east.clear()
    west.clear()
    resp = gw.http.get(f"/openai/v1/responses/{r.id}", headers={"api-key": KEY})
    assert_error(resp, 403, "DeploymentNotAllowed")
    assert east.data_requests() == [] and west.data_requests() == []


def test_a_chain_to_a_deployment_without_a_member_on_the_holder_is_a_conflict(env):
    client = v1(env.gw)
    for _ in range(20):
        r = client.responses.create(model="gpt-4o", input="Where am I?")
        if holder(r) == "east":
            break
    else:
        pytest.fail("no response landed on east in 20 tries")
    env.clear()
    resp = env.gw.http.post(
        "/openai/v1/responses", headers={"api-key": KEY},
        json={"model": "west-only", "input": "x", "previous_response_id": r.id},
    )
    assert_error(resp, 409, "ObjectConflict")
    assert_reached_no_backend(env)


def test_a_holder_that_is_down_is_503_and_nothing_fails_over(env):
    client = v1(env.gw)
    r = client.responses.create(model="gpt-4o", input="Pinned.")
    m = env.by_name(holder(r))
    other = next(x for x in env.mocks if x is not m)
    m.faults(health_status=500)
    try:
        wait_until(lambda: _backend_down(env.gw, m.name), 15, f"the gateway to mark {m.name} down")
        env.clear()
        resp = env.gw.http.get(f"/openai/v1/responses/{r.id}", headers={"api-key": KEY})
        assert_error(resp, 503, "BackendUnavailable")
        resp = env.gw.http.post(
            "/openai/v1/responses", headers={"api-key": KEY},
            json={"model": "gpt-4o", "input": "x", "previous_response_id": r.id},
        )
        assert_error(resp, 503, "BackendUnavailable")
        assert other.data_requests() == [], "a pinned request failed over"
        assert m.data_requests() == []
    finally:
        m.faults(health_status=0)
        wait_until(lambda: not _backend_down(env.gw, m.name), 15, f"{m.name} up again")


def _backend_down(gw: agw.Gateway, name: str) -> bool:
    status = gw.admin.get("/status").json()
    for b in status.get("backends", []):
        if b.get("name") == name:
            return not b.get("healthy", True)
    raise AssertionError(f"backend {name} not in /status: {status}")


# --------------------------------------------------------------------------------------
# background usage


def remaining_tokens(resp: httpx.Response) -> int:
    return int(resp.headers["x-ratelimit-remaining-tokens"])


def test_background_usage_replaces_its_reservation_once(env):
    """`metered` has only a tokens_per_day limit: its remaining tokens move only by charges,
    so the headers of follow-ups (which reserve nothing) show exactly what was charged."""
    h = {"api-key": METERED_KEY}
    created = env.gw.http.post(
        "/openai/v1/responses", headers=h,
        json={"model": "gpt-4o", "input": "Think about it in the background.",
              "background": True, "max_output_tokens": 500},
    )
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["status"] == "queued" and body["usage"] is None
    rid = body["id"]
    line = env.gw.audit_for(created.headers["x-request-id"])
    assert line["usage_source"] == "reserved"
    reserved = line["total_tokens"]
    assert reserved >= 500
    first = env.gw.http.get(f"/openai/v1/responses/{rid}", headers=h)
    assert first.status_code == 200, first.text
    with_reservation = remaining_tokens(first)

    def poll():
        r = env.gw.http.get(f"/openai/v1/responses/{rid}", headers=h)
        assert r.status_code == 200, r.text
        return r if r.json()["status"] == "completed" else None

    completed = wait_until(poll, 10, "the background response to complete", interval=0.1)
    usage = completed.json()["usage"]["total_tokens"]
    assert 0 < usage < reserved
    env.gw.audit_for(completed.headers["x-request-id"])
    after = [remaining_tokens(env.gw.http.get(f"/openai/v1/responses/{rid}", headers=h))
             for _ in range(3)]
    assert after == [after[0]] * 3, f"charged more than once: {after}"
    assert after[0] - with_reservation == reserved - usage, (
        f"remaining {with_reservation} -> {after[0]}: the usage {usage} did not replace the "
        f"reservation {reserved}"
    )
    lines = [l for l in env.gw.audit_lines()
             if l.get("client") == "metered" and rid in l.get("path", "")]
    charged = [l for l in lines if l.get("usage_source") == "response"]
    assert len(charged) == 1, f"charged {len(charged)} times: {lines}"
    assert charged[0]["total_tokens"] == usage


# --------------------------------------------------------------------------------------
# two gateways, one Redis


@pytest.fixture
def redis_server(tmp_path):
    r = RedisServer(tmp_path / "redis").start()
    try:
        yield r
    finally:
        r.stop()


def test_two_gateways_on_one_redis_agree_on_every_record(cluster, redis_server):
    east = cluster.mock("east")
    west = cluster.mock("west")
    state = {"store": "redis", "redis_url": redis_server.url, "retention_days": 2}
    g1 = cluster.gateway(stored_config(east, west, state=state))
    g2 = cluster.gateway(stored_config(east, west, state=state))
    env = Env(g2, east, west, east)
    a1, a2, b2 = v1(g1), v1(g2), v1(g2, OTHER_KEY)
    made = [a1.responses.create(model="gpt-4o", input=f"On g1, {i}.") for i in range(6)]
    assert any(k.startswith("agw:obj:") for k in redis_server.keys()), redis_server.keys()
    for r in made:
        env.clear()
        assert a2.responses.retrieve(r.id).id == r.id
        follow = a2.responses.create(model="gpt-4o", input="On g2.", previous_response_id=r.id)
        assert holder(follow) == holder(r)
        other = next(m for m in env.mocks if m.name != holder(r))
        assert other.data_requests() == []
        with pytest.raises(openai.NotFoundError) as e:
            b2.responses.retrieve(r.id)
        assert_not_found(e.value)
    # Deleted through g2: gone for g1.
    a2.responses.delete(made[0].id)
    env.clear()
    with pytest.raises(openai.NotFoundError) as e:
        a1.responses.retrieve(made[0].id)
    assert_not_found(e.value)
    assert_reached_no_backend(env)
    # Each record expires with the retention.
    ttl = redis_server.command("TTL", f"agw:obj:{made[1].id}")
    assert 2 * 86400 - 120 < ttl <= 2 * 86400


def test_redis_away_chat_is_unaffected_and_unknown_records_are_not_guessed(cluster, redis_server):
    """Only requests that name an object touch the records: with Redis gone a chat request
    is served as usual; a follow-up whose record only Redis knew is 503 (not sent wherever),
    one created meanwhile is found in the gateway's memory; Redis back, all is found again."""
    east = cluster.mock("east")
    west = cluster.mock("west")
    gw = cluster.gateway(stored_config(east, west, state={"store": "redis",
                                                          "redis_url": redis_server.url}))
    client = v1(gw)
    before = client.responses.create(model="gpt-4o", input="Before the outage.")
    redis_server.pause()  # hung, with its data: every round trip times out
    chat = client.chat.completions.create(model="gpt-4o",
                                          messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content.startswith("Hello from")
    for m in (east, west):
        m.clear()
    resp = gw.http.get(f"/openai/v1/responses/{before.id}", headers={"api-key": KEY})
    assert_error(resp, 503, "LimitStoreUnavailable")
    assert east.data_requests() == [] and west.data_requests() == []
    during = client.responses.create(model="gpt-4o", input="During the outage.")
    assert client.responses.retrieve(during.id).id == during.id
    redis_server.resume()
    wait_until(lambda: gw.http.get(f"/openai/v1/responses/{before.id}",
                                   headers={"api-key": KEY}).status_code == 200,
               15, "the record to be found again once Redis is back")
    assert client.responses.retrieve(during.id).id == during.id


def test_state_and_limits_naming_different_stores_is_a_config_error(tmp_path):
    text = """
server: {listeners: [{address: 127.0.0.1:1}], admin_address: 127.0.0.1:2}
backends: [{name: b, url: http://127.0.0.1:3, credential: api_key, api_key: k}]
deployments: {d: [{backend: b}]}
limits: {store: redis, redis_url: redis://127.0.0.1:6379/0}
state: {store: redis, redis_url: redis://127.0.0.1:6380/0, retention_days: 0}
"""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    out = subprocess.run([str(agw.GATEWAY_BIN), "check", "-c", str(path)],
                         capture_output=True, text=True, env=agw.clean_env())
    assert out.returncode == 1
    errors = out.stdout + out.stderr
    assert "line 6: state.redis_url: differs from limits.redis_url" in errors, errors
    assert "state.retention_days: must be within 1..3650" in errors, errors
