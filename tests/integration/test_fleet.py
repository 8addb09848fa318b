"""One fleet (SPEC §14): several gateway processes on one real redis-server share cooldowns
and key revocations, and go on with what they knew while Redis is away.

Every process listens on 127.0.0.1; the only Redis is the one `redisutil` starts on loopback.
"""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

import agw
from agw import KEY, OTHER_KEY
from opsutil import metric_value, scrape
from redisutil import RedisServer

KEY_ID = agw.KEY_SHA256[:8]
PROPAGATION_LIMIT = 1.0  # seconds: SPEC §14


@pytest.fixture
def redis_server(tmp_path):
    r = RedisServer(tmp_path / "redis").start()
    yield r
    r.stop()


def fleet_config(a: agw.Mock, b: agw.Mock, redis: RedisServer, limits: dict | None = None) -> dict:
    """gpt-4o on `east` (priority 1, mock a) then `sweden` (priority 2, mock b); two clients,
    the second with OTHER_KEY; the state store on `redis`; `limits` for the first client."""
    return agw.make_config(
        deployments={
            "gpt-4o": [agw.member("east", priority=1), agw.member("sweden", priority=2)]
        },
        backends=[
            agw.backend("east", a, region="eastus"),
            agw.backend("sweden", b, region="swedencentral"),
        ],
        clients=[agw.client("app-1", **({"limits": limits} if limits else {})),
                 agw.client("app-2", keys=[agw.OTHER_KEY_SHA256])],
        state={"store": "redis", "redis_url": redis.url},
    )


def chat(gw: agw.Gateway, key: str = KEY, content: str = "hi"):
    return gw.http.post(
        agw.chat_path("gpt-4o"), headers={"api-key": key}, json=agw.chat_body(content)
    )


def chat_requests(m: agw.Mock) -> list[dict]:
    return [q for q in m.data_requests() if q["path"].endswith("/chat/completions")]


def keys_cli(gw: agw.Gateway, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(agw.GATEWAY_BIN), "keys", *args, "-c", str(gw.config_path)],
        capture_output=True, text=True, timeout=30, env=agw.clean_env(),
    )


def wait_all(gws: list[agw.Gateway], status: int, key: str = KEY) -> float:
    """Seconds until every gateway answers `key` with `status` (polling every 10 ms)."""
    t0 = time.monotonic()
    pending = list(gws)
    while pending:
        pending = [g for g in pending if chat(g, key).status_code != status]
        if pending:
            assert time.monotonic() - t0 < 5, f"{len(pending)} gateway(s) never answered {status}"
            time.sleep(0.01)
    return time.monotonic() - t0


def redis_commands(redis: RedisServer) -> int:
    info = redis.command("INFO", "stats")
    return int(next(l.split(":")[1] for l in info.splitlines()
                    if l.startswith("total_commands_processed:")))


def cooling_ms(gw: agw.Gateway, backend: str) -> int:
    status = gw.admin.get("/status").json()
    return next(m["cooldown_remaining_ms"] for m in status["deployments"]["gpt-4o"]
                if m["backend"] == backend)


def test_a_429_seen_by_one_gateway_keeps_the_others_off_that_member(
        cluster, redis_server):
    a, b = cluster.mock("eastus-a"), cluster.mock("sweden-b")
    cfg = fleet_config(a, b, redis_server)
    gws = [cluster.gateway(cfg) for _ in range(3)]
    for g in gws:
        r = chat(g)
        assert r.status_code == 200 and "eastus-a" in r.text, r.text
    a.clear(), b.clear()

    a.faults(fail_429_count=1, retry_after_ms=6000)
    r = chat(gws[0], content="throttled")
    t0 = time.monotonic()
    assert r.status_code == 200 and "sweden-b" in r.text, r.text
    assert len(chat_requests(a)) == 1 and chat_requests(a)[0]["status"] == 429

    # The other two learn it: /status shows the cooldown (measured, printed, bounded).
    delays = []
    for g in gws[1:]:
        agw.wait_until(lambda: cooling_ms(g, "east") > 0, 5, "the cooldown to reach a peer",
                       interval=0.005)
        delays.append(time.monotonic() - t0)
    print(f"\ncooldown propagation to the peers: {[round(d * 1000, 1) for d in delays]} ms")
    assert max(delays) < PROPAGATION_LIMIT
    remaining = cooling_ms(gws[1], "east")
    assert 4500 < remaining <= 6000, f"the peer's cooldown is not the one announced: {remaining}"
    # It is kept in Redis for the gateways that connect later, and one that starts now
    # applies it too.
    assert redis_server.keys("agw:fleet:cool:*") == ["agw:fleet:cool:east:gpt-4o:gpt-4o"]
    late = cluster.gateway(cfg)
    agw.wait_until(lambda: cooling_ms(late, "east") > 0, 3, "the late gateway to read the cooldown")
    assert time.monotonic() - t0 < 4.5, "the late gateway took too long to start for this test"
    peers = gws[1:] + [late]

    # During the cooldown the peers send nothing to east: everything goes to sweden.
    sent = 0
    while time.monotonic() - t0 < 5:
        for g in peers:
            r = chat(g, content=f"peer {sent}")
            assert r.status_code == 200 and "sweden-b" in r.text, r.text
            sent += 1
        time.sleep(0.05)
    assert sent >= 10
    assert len(chat_requests(a)) == 1, "a peer sent a request to the cooling member"
    assert len(chat_requests(b)) == sent + 1
    for g in peers:
        assert all(line["attempts"] == 1 for line in g.audit_lines()[-3:])

    # When the cooldown is over, the peers use east again.
    agw.wait_until(lambda: "eastus-a" in chat(gws[2]).text, 10, "east to be used again", 0.2)
    assert time.monotonic() - t0 >= 5.5, "east was used before its cooldown ended"
    # The cooldown was kept in Redis, expiring with it.
    assert redis_server.keys("agw:fleet:cool:*") == []


def test_a_revoked_key_is_refused_by_every_gateway_within_a_second_until_unrevoked(
        cluster, redis_server):
    a, b = cluster.mock("eastus-a"), cluster.mock("sweden-b")
    cfg = fleet_config(a, b, redis_server)
    gws = [cluster.gateway(cfg) for _ in range(3)]
    for g in gws:
        assert chat(g).status_code == 200
    before = [metric_value(scrape(g), "aoai_gateway_rejections_total", client="anonymous",
                           reason="unauthenticated") or 0 for g in gws]

    p = keys_cli(gws[0], "revoke", "--key-id", KEY_ID)
    assert p.returncode == 0, p.stderr
    t0 = time.monotonic()
    assert "revoked key" in p.stdout and "app-1" in p.stdout, p.stdout
    took = wait_all(gws, 401)
    print(f"\nrevocation effective on 3 gateways after {took * 1000:.0f} ms (after the CLI)")
    assert time.monotonic() - t0 < PROPAGATION_LIMIT + 0.2, took

    # Refused like an unknown key, counted, and logged with the key's id.
    for i, g in enumerate(gws):
        r = chat(g)
        body = agw.assert_error(r, 401, "InvalidCredential")
        assert body["error"]["message"] == agw.assert_error(chat(g, key=agw.make_key("x")), 401,
                                                            "InvalidCredential")["error"]["message"]
        assert r.headers.get("www-authenticate") == "Bearer"
        line = g.audit_for(r.headers["x-request-id"])
        assert (line["status"], line["error_code"], line["client"], line["auth"],
                line["key_id"]) == (401, "InvalidCredential", "anonymous", "api_key", KEY_ID)
        after = metric_value(scrape(g), "aoai_gateway_rejections_total", client="anonymous",
                             reason="unauthenticated")
        assert after >= before[i] + 2
        assert metric_value(scrape(g), "aoai_gateway_revoked_keys") == 1
        assert g.admin.get("/status").json()["fleet"] == {"state_store_up": True,
                                                          "revoked_keys": 1}
        # the other client's key is untouched
        assert chat(g, key=OTHER_KEY).status_code == 200

    # The identity check is local: traffic makes no Redis round trips (only the background
    # task's reads every 2 s per gateway do).
    commands = redis_commands(redis_server)
    for n in range(90):
        assert chat(gws[n % 3], key=OTHER_KEY).status_code == 200
    assert chat(gws[0]).status_code == 401
    delta = redis_commands(redis_server) - commands - 1  # the INFO itself
    print(f"Redis commands during 91 requests on 3 gateways: {delta}")
    assert delta < 25, delta

    p = keys_cli(gws[0], "revoked")
    assert p.returncode == 0 and p.stdout.startswith(KEY_ID) and "app-1" in p.stdout, p
    # A key id that no configured key has is refused, nothing recorded.
    p = keys_cli(gws[0], "revoke", "--key-id", "00000000")
    assert p.returncode == 1 and "no key of the configuration" in p.stderr, p

    # A gateway started after the revocation refuses the key from its first request.
    gws[1].proc.stop()
    cluster.gateways.remove(gws[1])  # stopped on purpose
    restarted = cluster.gateway(gws[1].config)
    assert chat(restarted).status_code == 401
    gws = [gws[0], gws[2], restarted]

    p = keys_cli(gws[0], "unrevoke", "--key-id", KEY_ID)
    assert p.returncode == 0 and "no longer revoked" in p.stdout, p
    took = wait_all(gws, 200)
    print(f"unrevocation effective on 3 gateways after {took * 1000:.0f} ms")
    assert took < PROPAGATION_LIMIT
    assert keys_cli(gws[0], "revoked").stdout == ""


def test_memory_store_refuses_revocations_with_a_clear_message(cluster):
    a = cluster.mock("eastus-a")
    gw = cluster.gateway(agw.single(a))
    p = keys_cli(gw, "revoke", "--key-id", KEY_ID)
    assert p.returncode == 1 and "state.store: redis" in p.stderr, p
    assert chat(gw).status_code == 200


def test_redis_killed_and_restarted_mid_traffic_loses_no_request_and_no_revocation(
        cluster, redis_server):
    a, b = cluster.mock("eastus-a"), cluster.mock("sweden-b")
    # The traffic's client has a (generous) limit: its counters live in the same Redis, and
    # while Redis is away they are kept per gateway (on_store_failure: local, the default).
    cfg = fleet_config(a, b, redis_server, limits={"requests_per_minute": 100000})
    gws = [cluster.gateway(cfg) for _ in range(2)]
    # OTHER_KEY is revoked; KEY carries the traffic.
    p = keys_cli(gws[0], "revoke", "--key-id", agw.OTHER_KEY_SHA256[:8])
    assert p.returncode == 0, p.stderr
    wait_all(gws, 401, key=OTHER_KEY)

    answers: list[int] = []
    stop = threading.Event()

    def traffic():
        n = 0
        with agw.http_client(timeout=10) as h:
            while not stop.is_set() and n < 5000:
                g = gws[n % 2]
                r = h.post(g.url + agw.chat_path("gpt-4o"), headers={"api-key": KEY},
                           json=agw.chat_body(f"t{n}"))
                answers.append(r.status_code)
                n += 1
                time.sleep(0.01)

    t = threading.Thread(target=traffic)
    t.start()
    try:
        time.sleep(0.5)
        redis_server.kill()
        for g in gws:
            agw.wait_until(lambda: metric_value(scrape(g), "aoai_gateway_state_store_up") == 0,
                           5, "the gateway to notice Redis is away")
            assert g.admin.get("/status").json()["fleet"]["state_store_up"] is False
            # What it knew holds: the revoked key stays refused.
            assert chat(g, key=OTHER_KEY).status_code == 401
        time.sleep(2.5)  # several reconnection attempts
        for g in gws:
            assert chat(g, key=OTHER_KEY).status_code == 401
        redis_server.start()  # empty: the server keeps nothing
        for g in gws:
            agw.wait_until(lambda: metric_value(scrape(g), "aoai_gateway_state_store_up") == 1,
                           10, "the gateway to reconnect")
        time.sleep(0.5)
    finally:
        stop.set()
        t.join(timeout=60)
    assert len(answers) > 100, answers
    assert set(answers) == {200}, {s: answers.count(s) for s in set(answers)}

    # The revocation survived the empty Redis: written back by the gateways, so the CLI and a
    # gateway started now see it too.
    for g in gws:
        assert chat(g, key=OTHER_KEY).status_code == 401
    p = keys_cli(gws[0], "revoked")
    assert p.stdout.startswith(agw.OTHER_KEY_SHA256[:8]), p
    late = cluster.gateway(cfg)
    assert chat(late, key=OTHER_KEY).status_code == 401
    assert chat(late).status_code == 200

    assert redis_server.keys("agw:lim:*"), "the limit counters went back to Redis"

    # One warning on loss and one line on recovery per gateway and user of the store (the
    # fleet task; the limiter's connection), not one per attempt or request.
    for g in gws:
        err = g.proc.stderr()
        assert err.count("Redis is unreachable") == 1, err[-3000:]
        assert err.count("Redis answers again;") == 1, err[-3000:]
        warns = [l for l in err.splitlines() if " WARN " in l and "filters::store" in l]
        assert len(warns) == 1, warns
        assert err.count("state store: Redis answers again (") == 1, err[-3000:]


def test_a_hung_redis_is_noticed_and_requests_do_not_wait_for_it(cluster, redis_server):
    """SIGSTOP: Redis keeps its connections open and answers nothing (a half-open peer). The
    fleet task notices at its next read, requests are not slowed, the revoked key stays
    refused, and all is back when Redis answers."""
    a, b = cluster.mock("eastus-a"), cluster.mock("sweden-b")
    gw = cluster.gateway(fleet_config(a, b, redis_server))
    p = keys_cli(gw, "revoke", "--key-id", agw.OTHER_KEY_SHA256[:8])
    assert p.returncode == 0, p.stderr
    wait_all([gw], 401, key=OTHER_KEY)
    redis_server.pause()
    try:
        agw.wait_until(lambda: metric_value(scrape(gw), "aoai_gateway_state_store_up") == 0,
                       6, "the gateway to notice the hung Redis")
        for n in range(20):
            t = time.monotonic()
            assert chat(gw, content=f"h{n}").status_code == 200
            assert chat(gw, key=OTHER_KEY).status_code == 401
            assert time.monotonic() - t < 1.0, "a request waited for the hung Redis"
    finally:
        redis_server.resume()
    agw.wait_until(lambda: metric_value(scrape(gw), "aoai_gateway_state_store_up") == 1,
                   10, "the gateway to use Redis again")
    assert chat(gw, key=OTHER_KEY).status_code == 401
    assert gw.proc.stderr().count("Redis is unreachable") == 1
