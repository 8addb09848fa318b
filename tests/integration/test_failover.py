"""Routing and failover (SPEC §7): a large chat request fails over from a throttled, reset or
failing primary to a secondary in another region with its body intact; the throttled primary
is skipped until its retry-after-ms cooldown ends; priority tiers and weights."""

from __future__ import annotations

import time

import agw
from agw import KEY

BIG = 200 * 1024  # a long-context chat request, far above Pingora's 64 KiB replay buffer


def two_regions(a: agw.Mock, b: agw.Mock, **kw) -> dict:
    # same deployment name on both backends: the body must reach them byte for byte
    # (a renamed member legitimately gets the body's `model` rewritten)
    return agw.make_config(
        deployments={
            "gpt-4o": [
                agw.member("east", priority=1),
                agw.member("sweden", priority=2),
            ]
        },
        backends=[
            agw.backend("east", a, region="eastus"),
            agw.backend("sweden", b, region="swedencentral"),
        ],
        **kw,
    )


class Capture:
    """An SDK http_client that remembers the bytes of each request body it sent."""

    def __init__(self):
        self.bodies: list[bytes] = []
        self.client = agw.http_client(event_hooks={"request": [self._hook]})

    def _hook(self, request):
        self.bodies.append(request.read())


def big_messages(tag: str) -> list[dict]:
    filler = ("The quick brown fox jumps over the lazy dog. " * (BIG // 45 + 1))[:BIG]
    return [
        {"role": "system", "content": f"request {tag}"},
        {"role": "user", "content": filler},
    ]


def send_big(gw: agw.Gateway, cap: Capture, tag: str):
    import openai

    client = openai.AzureOpenAI(azure_endpoint=gw.url, api_key=KEY, api_version=agw.API_VERSION,
                                max_retries=0, http_client=cap.client)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=big_messages(tag))
    return raw, raw.parse()


def chat_requests(m: agw.Mock) -> list[dict]:
    return [q for q in m.data_requests() if q["path"].endswith("/chat/completions")]


def test_429_fails_over_with_full_body_and_cools_down(mock, gateway):
    a = mock("eastus-a")
    b = mock("sweden-b")
    gw = gateway(two_regions(a, b))
    cap = Capture()
    # warm-up (the SDK's first call is slow to build), which also shows the primary is used
    _, warm = send_big(gw, cap, "warm-up")
    assert warm.choices[0].message.content == "Hello from eastus-a."
    a.clear(), b.clear()
    a.faults(fail_429_count=1, retry_after_ms=3000)

    t0 = time.monotonic()
    raw, resp = send_big(gw, cap, "1")
    assert raw.http_response.status_code == 200
    assert resp.choices[0].message.content == "Hello from sweden-b."
    sent = cap.bodies[-1]
    assert len(sent) > BIG

    a_reqs, b_reqs = chat_requests(a), chat_requests(b)
    assert len(a_reqs) == 1, f"the primary must be tried once: {a_reqs}"
    assert a_reqs[0]["status"] == 429
    assert a_reqs[0]["path"] == "/openai/deployments/gpt-4o/chat/completions"
    assert len(b_reqs) == 1
    assert b_reqs[0]["path"] == "/openai/deployments/gpt-4o/chat/completions"
    assert b_reqs[0]["body_len"] == len(sent), "the secondary did not get the whole body"
    assert b_reqs[0]["body_sha256"] == agw.sha256_hex(sent), "the secondary got other bytes"
    assert a_reqs[0]["body_sha256"] == agw.sha256_hex(sent)

    line = gw.audit_for(raw.headers.get("x-request-id"))
    assert line["attempts"] == 2
    assert line["backend"] == "sweden" and line["region"] == "swedencentral"
    assert line["status"] == 200

    # while the primary cools down (retry-after-ms 3000), requests go straight to the secondary
    raw2, resp2 = send_big(gw, cap, "2")
    assert resp2.choices[0].message.content == "Hello from sweden-b."
    assert time.monotonic() - t0 < 2.5, "the test machine was too slow to observe the cooldown"
    assert len(chat_requests(a)) == 1, "the cooling primary was contacted"
    assert len(chat_requests(b)) == 2
    assert chat_requests(b)[-1]["body_sha256"] == agw.sha256_hex(cap.bodies[-1])
    assert gw.audit_for(raw2.headers.get("x-request-id"))["attempts"] == 1

    # after the cooldown the primary is used again
    def primary_back():
        with agw.http_client() as h:
            r = h.post(gw.url + agw.chat_path("gpt-4o"), headers={"api-key": KEY},
                       json=agw.chat_body("small"))
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"] == "Hello from eastus-a."

    agw.wait_until(primary_back, 10, "the primary to be used again after its cooldown", 0.2)
    back_after = time.monotonic() - t0
    assert back_after >= 2.5, f"the primary was used again after {back_after:.2f}s, before 3 s"
    assert len(chat_requests(a)) == 2


def test_reset_fails_over(mock, gateway):
    a = mock("eastus-a")
    b = mock("sweden-b")
    gw = gateway(two_regions(a, b))
    a.faults(reset_count=1)
    cap = Capture()
    raw, resp = send_big(gw, cap, "reset")
    assert resp.choices[0].message.content == "Hello from sweden-b."
    b_reqs = chat_requests(b)
    assert len(b_reqs) == 1
    assert b_reqs[0]["body_len"] == len(cap.bodies[-1])
    assert b_reqs[0]["body_sha256"] == agw.sha256_hex(cap.bodies[-1])
    assert gw.audit_for(raw.headers.get("x-request-id"))["attempts"] == 2


def test_500_fails_over(mock, gateway):
    a = mock("eastus-a")
    b = mock("sweden-b")
    gw = gateway(two_regions(a, b))
    a.faults(fail_status=500, fail_count=1)
    cap = Capture()
    raw, resp = send_big(gw, cap, "500")
    assert resp.choices[0].message.content == "Hello from sweden-b."
    assert [q["status"] for q in chat_requests(a)] == [500]
    b_reqs = chat_requests(b)
    assert len(b_reqs) == 1
    assert b_reqs[0]["body_sha256"] == agw.sha256_hex(cap.bodies[-1])


def test_status_not_in_on_status_is_returned_as_is(mock, gateway):
    """A 400 from the backend is the client's answer: no failover."""
    a = mock("eastus-a")
    b = mock("sweden-b")
    gw = gateway(two_regions(a, b))
    a.faults(fail_status=400, fail_count=1)
    with agw.http_client() as h:
        r = h.post(gw.url + agw.chat_path("gpt-4o"), headers={"api-key": KEY}, json=agw.chat_body())
    assert r.status_code == 400
    assert len(chat_requests(a)) == 1
    assert chat_requests(b) == []
    assert r.headers.get("x-request-id")


def test_same_member_never_tried_twice(mock, gateway):
    """One member, a 500: the client gets the backend's 500 after one attempt."""
    a = mock("eastus-a")
    gw = gateway(agw.single(a))
    a.faults(fail_status=500, fail_count=1)
    with agw.http_client() as h:
        r = h.post(gw.url + agw.chat_path("gpt-4o"), headers={"api-key": KEY}, json=agw.chat_body())
    assert r.status_code == 500, r.text
    assert len(chat_requests(a)) == 1
    assert r.headers.get("x-request-id")


def test_priority_tier_is_used_while_available(mock, gateway):
    a = mock("eastus-a")
    b = mock("sweden-b")
    gw = gateway(two_regions(a, b))
    with agw.http_client() as h:
        for _ in range(10):
            r = h.post(gw.url + agw.chat_path("gpt-4o"), headers={"api-key": KEY}, json=agw.chat_body())
            assert r.status_code == 200
            assert r.json()["choices"][0]["message"]["content"] == "Hello from eastus-a."
    assert len(chat_requests(a)) == 10
    assert chat_requests(b) == []


def test_weights_share_traffic_within_a_tier(mock, gateway):
    a = mock("eastus-a")
    b = mock("eastus-b")
    cfg = agw.make_config(
        deployments={"gpt-4o": [agw.member("a", weight=3), agw.member("b", weight=1)]},
        backends=[agw.backend("a", a), agw.backend("b", b, region="eastus2")],
    )
    gw = gateway(cfg)
    n = 120
    with agw.http_client() as h:
        for i in range(n):
            r = h.post(gw.url + agw.chat_path("gpt-4o"), headers={"api-key": KEY},
                       json=agw.chat_body(f"n{i}"))
            assert r.status_code == 200
    na, nb = len(chat_requests(a)), len(chat_requests(b))
    assert na + nb == n
    # weight 3:1 → 90 vs 30 expected; the bounds are far outside any fair random deviation
    assert 70 <= na <= 108, f"weight 3 got {na}/{n}, weight 1 got {nb}/{n}"


def _cooldown_gauge(gw: agw.Gateway, backend: str, deployment: str) -> float | None:
    from opsutil import metric_value, scrape

    return metric_value(scrape(gw), "aoai_gateway_backend_cooldown_seconds",
                        backend=backend, deployment=deployment)


def test_cooldown_gauge_shows_a_429_at_once_and_counts_down(mock, gateway):
    """aoai_gateway_backend_cooldown_seconds is the remaining cooldown when /metrics is
    scraped — not the value of the last health-check round (one every 60 s here)."""
    a = mock("eastus-a")
    b = mock("sweden-b")
    gw = gateway(two_regions(a, b, health_checks={"interval_seconds": 60}))
    # the first health round has run (it used to set the gauges); no pair is cooling
    agw.wait_until(lambda: a.stats()["health_requests"] > 0, 10, "a health check")
    assert _cooldown_gauge(gw, "east", "gpt-4o") == 0
    assert _cooldown_gauge(gw, "sweden", "gpt-4o") == 0

    a.faults(fail_429_count=1, retry_after_ms=8000)
    with agw.http_client() as h:
        r = h.post(gw.url + agw.chat_path("gpt-4o"), headers={"api-key": KEY}, json=agw.chat_body())
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello from sweden-b.", r.text
    cooled_at = time.monotonic()

    first = _cooldown_gauge(gw, "east", "gpt-4o")
    scraped_after = time.monotonic() - cooled_at
    assert first is not None and 8 - scraped_after - 1 <= first <= 8, \
        f"cooldown gauge {first} right after a 429 with retry-after-ms 8000"
    assert _cooldown_gauge(gw, "sweden", "gpt-4o") == 0

    time.sleep(1.5)
    later = _cooldown_gauge(gw, "east", "gpt-4o")
    elapsed = time.monotonic() - cooled_at
    assert later is not None and later < first - 1, f"the gauge did not count down: {first} then {later}"
    assert 8 - elapsed - 1 <= later <= 8 - elapsed + 0.1, f"{later} s left after {elapsed:.1f} s of 8"

    # after its end: 0, with no health round in between
    agw.wait_until(lambda: _cooldown_gauge(gw, "east", "gpt-4o") == 0, 15, "the cooldown to end")
    assert time.monotonic() - cooled_at >= 7, "the cooldown ended early"
