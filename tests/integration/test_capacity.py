"""Capacity-aware routing (SPEC §14): a PTU member whose last `x-ratelimit-remaining-tokens`
report cannot cover a request's reservation is skipped for it — the tier spills to
pay-as-you-go before Azure answers 429 — and is used again as soon as a newer report or the
end of its window says it has room."""

from __future__ import annotations

import time

import agw
import opsutil

WINDOW = 3  # capacity_window_seconds of the PTU backend in this test


def ptu_and_paygo(ptu: agw.Mock, paygo: agw.Mock) -> dict:
    # No token limit for the client: the gateway computes the reservation for routing alone.
    return agw.make_config(
        deployments={
            "gpt-4o": [
                agw.member("ptu", deployment="gpt-4o-ptu", priority=1),
                agw.member("paygo", priority=2),
            ]
        },
        backends=[
            agw.backend("ptu", ptu, region="eastus", capacity_window_seconds=WINDOW),
            agw.backend("paygo", paygo, region="swedencentral"),
        ],
    )


def chat(gw: agw.Gateway, max_tokens: int) -> str:
    r = gw.http.post(
        agw.chat_path("gpt-4o"),
        headers={"api-key": agw.KEY},
        json=agw.chat_body("Say hello.", max_tokens=max_tokens),
    )
    assert r.status_code == 200, (r.status_code, r.text)
    return r.json()["choices"][0]["message"]["content"]


def set_capacity(m: agw.Mock, tokens: int | None, requests: int = 100) -> None:
    body = {"gpt-4o-ptu": None if tokens is None else
            {"remaining_tokens": tokens, "remaining_requests": requests}}
    r = m.http.put("/_mock/capacity", json=body)
    assert r.status_code == 200, r.text


def chats_on(m: agw.Mock) -> int:
    return sum(1 for q in m.data_requests() if q["path"].endswith("/chat/completions"))


def test_a_ptu_short_of_capacity_spills_to_paygo_without_a_429(mock, gateway):
    ptu, paygo = mock("ptu"), mock("paygo")
    gw = gateway(ptu_and_paygo(ptu, paygo))
    from_ptu, from_paygo = "Hello from ptu.", "Hello from paygo."

    # The PTU member serves while it reports room (no report at all at first).
    assert chat(gw, 1000) == from_ptu
    # It now announces 50 tokens left: a small request (about 13 tokens reserved) still
    # fits and goes there, bringing back that report.
    set_capacity(ptu, 50)
    assert chat(gw, 5) == from_ptu
    # From now on, a request reserving 1,000 tokens never reaches it — had it been sent, the
    # PTU would answer 429 to everything.
    ptu.faults(fail_429_share=1.0)
    before = chats_on(ptu)
    for _ in range(5):
        assert chat(gw, 1000) == from_paygo
    assert chats_on(ptu) == before, "a member short of capacity was sent a request"
    samples = opsutil.scrape(gw)
    assert opsutil.metric_value(samples, "aoai_gateway_upstream_skips_total",
                                backend="ptu", deployment="gpt-4o", reason="capacity") == 5
    assert opsutil.metric_value(samples, "aoai_gateway_upstream_attempts_total",
                                backend="ptu", code="429") is None, "a 429 happened"
    assert opsutil.metric_value(samples, "aoai_gateway_upstream_skips_total",
                                backend="paygo") is None
    # /status shows the reports the gateway steers by.
    status = gw.admin.get("/status").json()
    reports = {(c["backend"], c["deployment"]): c for c in status["capacity"]}
    assert reports[("ptu", "gpt-4o-ptu")]["remaining_tokens"] == 50, status["capacity"]
    assert reports[("paygo", "gpt-4o")]["remaining_tokens"] == 999_000, status["capacity"]

    # A newer report with room puts it back at once: a small request still fits, the PTU
    # now reports plenty, and the next large request goes there.
    ptu.faults(fail_429_share=0.0)
    set_capacity(ptu, None)
    assert chat(gw, 5) == from_ptu
    assert chat(gw, 1000) == from_ptu

    # Or the window: a report older than capacity_window_seconds says nothing any more.
    set_capacity(ptu, 50)
    assert chat(gw, 5) == from_ptu
    assert chat(gw, 1000) == from_paygo
    set_capacity(ptu, None)
    time.sleep(WINDOW + 0.3)
    assert chat(gw, 1000) == from_ptu
    assert chat(gw, 1000) == from_ptu


def test_no_request_left_is_short_whatever_the_tokens(mock, gateway):
    ptu, paygo = mock("ptu"), mock("paygo")
    gw = gateway(ptu_and_paygo(ptu, paygo))
    set_capacity(ptu, 999_000, requests=0)
    assert chat(gw, 1) == "Hello from ptu."  # no report yet: tried, and it reports 0 requests
    assert chat(gw, 1) == "Hello from paygo."
    samples = opsutil.scrape(gw)
    assert opsutil.metric_value(samples, "aoai_gateway_upstream_skips_total",
                                backend="ptu", reason="capacity") == 1
