"""Per-client request and token limits (SPEC §3 `clients[].limits`, `unlisted_clients.limits`,
`limits`; §6), through the official `openai` SDK.

Windows are GCRA (a sliding leaky bucket): a limit of L per minute frees one unit every 60/L s,
and `retry-after-ms` is the exact wait until the refused request fits. So the tests use small
limits and check the waits the gateway announces (and that waiting them is enough) instead of
waiting whole minutes; one test waits out a full window once.

Token arithmetic is exact rather than guessed: `prompt_estimate: bytes`, and where a test needs
the gateway's reservation for a prompt it asks the gateway (`Calibration`: a client with a huge
`tokens_per_day`, whose `x-ratelimit-remaining-tokens` tells what each request reserved). The
mock reports `prompt_tokens = max(1, bytes/4)`, `completion_tokens = 4`; tests read the usage
from the responses rather than assuming it. Reconciliation happens when the gateway finishes a
request, just before it writes the audit line: tests wait for that line before relying on it.
"""

from __future__ import annotations

import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import openai
import pytest

import agw
from agw import API_VERSION, KEY, OTHER_KEY, OTHER_KEY_SHA256
from redisutil import RedisServer

CALIB_KEY = agw.make_key("limits calibration")
CALIB_LIMIT = 10**12


# --------------------------------------------------------------------------------------------
# helpers


@dataclass
class Res:
    status: int
    headers: Any
    body: Any  # parsed SDK object on success, the httpx response on failure
    response: Any  # the httpx response
    sent: float  # time.monotonic() before sending
    received: float  # time.monotonic() after the answer

    @property
    def request_id(self) -> str:
        return self.headers.get("x-request-id")

    def h(self, name: str) -> int | None:
        """An integer header that must appear at most once."""
        values = self.headers.get_list(name) if hasattr(self.headers, "get_list") else None
        if values is None:
            v = self.headers.get(name)
            values = [] if v is None else [v]
        assert len(values) <= 1, f"header {name} appears {len(values)} times: {values}"
        if not values:
            return None
        assert re.fullmatch(r"\d+", values[0]), f"{name}: {values[0]!r} is not an integer"
        return int(values[0])

    def rl(self) -> tuple:
        """(limit-requests, remaining-requests, limit-tokens, remaining-tokens)."""
        return (
            self.h("x-ratelimit-limit-requests"),
            self.h("x-ratelimit-remaining-requests"),
            self.h("x-ratelimit-limit-tokens"),
            self.h("x-ratelimit-remaining-tokens"),
        )

    @property
    def usage_total(self) -> int:
        return self.body.usage.total_tokens


def sdk(gw: agw.Gateway, key: str = KEY, **kw) -> openai.AzureOpenAI:
    return agw.azure_client(gw, key, **kw)


def chat(client: openai.AzureOpenAI, deployment: str = "gpt-4o", content: str = "hi",
         max_tokens: int | None = None, **kw) -> Res:
    """One chat completion through the SDK; never raises for an HTTP status."""
    args: dict[str, Any] = {"model": deployment, "messages": [{"role": "user", "content": content}]}
    if max_tokens is not None:
        args["max_tokens"] = max_tokens
    args.update(kw)
    sent = time.monotonic()
    try:
        raw = client.chat.completions.with_raw_response.create(**args)
    except openai.APIStatusError as e:
        return Res(e.status_code, e.response.headers, e.response, e.response, sent, time.monotonic())
    body = raw.parse()
    return Res(raw.status_code, raw.headers, body, raw.http_response, sent, time.monotonic())


def ok(r: Res) -> Res:
    assert r.status == 200, f"expected 200, got {r.status}: {getattr(r.response, 'text', '')[:300]}"
    return r


def retry_ms(r: Res, status: int = 429, code: str = "RateLimitExceeded") -> int:
    """Asserts a limit answer (SPEC §6, §8) and returns its `retry-after-ms`."""
    agw.assert_error(r.response, status, code)
    ms = r.h("retry-after-ms")
    secs = r.h("retry-after")
    assert ms is not None and ms > 0, f"{code} without a positive retry-after-ms: {dict(r.headers)}"
    assert secs == max(1, math.ceil(ms / 1000)), (
        f"Retry-After {secs} does not match retry-after-ms {ms} (ceil to whole seconds)"
    )
    return ms


def settled(gw: agw.Gateway, r: "Res | str") -> dict:
    """Waits until the gateway finished (and reconciled) the request: its audit line."""
    return gw.audit_for(r if isinstance(r, str) else r.request_id)


def limits_section(**kw) -> dict:
    d = {"store": "memory", "prompt_estimate": "bytes", "default_completion_reservation": 0}
    d.update(kw)
    return d


def calib_client() -> dict:
    return agw.client("calib", keys=[agw.sha256_hex(CALIB_KEY)],
                      limits={"tokens_per_day": CALIB_LIMIT})


def config(mock: agw.Mock, clients: list[dict], deployments=("gpt-4o", "gpt-4o-mini"),
           limits: dict | None = None, **kw) -> dict:
    return agw.make_config(
        deployments={d: [agw.member("b1")] for d in deployments},
        backends=[agw.backend("b1", mock)],
        clients=clients,
        limits=limits or limits_section(),
        **kw,
    )


class Calibration:
    """What the gateway reserves for a request, read from the `calib` client's
    `x-ratelimit-remaining-tokens` (its only limit is a huge tokens_per_day: no refill, so
    remaining = limit − usage so far − this reservation, exactly)."""

    def __init__(self, gw: agw.Gateway):
        self.gw = gw
        self.client = sdk(gw, CALIB_KEY)
        self.used = 0

    def reservation(self, content: str, deployment: str = "gpt-4o", max_tokens: int | None = None) -> int:
        r = ok(chat(self.client, deployment, content, max_tokens))
        lim, rem = r.h("x-ratelimit-limit-tokens"), r.h("x-ratelimit-remaining-tokens")
        assert lim == CALIB_LIMIT, f"calibration client: x-ratelimit-limit-tokens {lim}"
        reserved = CALIB_LIMIT - self.used - rem
        settled(self.gw, r)
        self.used += r.usage_total
        return reserved

    def estimate(self, content: str, deployment: str = "gpt-4o") -> int:
        """The prompt estimate alone (no max_tokens; default_completion_reservation is 0)."""
        return self.reservation(content, deployment)


def metric(gw: agw.Gateway, name: str, labels: dict[str, str] | None = None) -> float:
    text = gw.admin.get("/metrics").text
    total = 0.0
    found = False
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if not m:
            continue
        lab = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if labels and any(lab.get(k) != v for k, v in labels.items()):
            continue
        found = True
        total += float(m.group(2))
    if not found and labels is None:
        raise AssertionError(f"metric {name} not on /metrics:\n{text[:3000]}")
    return total


def seconds_to_utc_midnight() -> float:
    now = time.time()
    return 86400 - (now % 86400)


def sleep_until(t: float) -> None:
    d = t - time.monotonic()
    if d > 0:
        time.sleep(d)


@pytest.fixture
def redis_server(tmp_path):
    r = RedisServer(tmp_path / "redis").start()
    try:
        yield r
    finally:
        r.stop()


# --------------------------------------------------------------------------------------------
# requests_per_minute


def test_requests_per_minute_rejects_the_n_plus_1th_with_the_true_wait_and_recovers(cluster):
    """rpm 10: ten pass (remaining 9…0), the 11th gets 429 RateLimitExceeded whose
    retry-after-ms is the exact time until the first slot frees (6 s after the first request);
    refused requests — and requests refused earlier by identity or authorization — consume
    nothing; waiting the announced time is enough and not much less is; after a full window the
    whole burst is available again."""
    m = cluster.mock("b")
    cfg = config(m, [
        agw.client("app", deployments=["gpt-4o"], limits={"requests_per_minute": 10}),
        agw.client("other", keys=[OTHER_KEY_SHA256], limits={"requests_per_minute": 10}),
    ])
    gw = cluster.gateway(cfg)
    c = sdk(gw)

    # Refused by identity or authorization: consumes nothing of the limit (SPEC §5).
    for _ in range(3):
        r = chat(c, "gpt-4o-mini")
        agw.assert_error(r.response, 403, "DeploymentNotAllowed")
    for _ in range(2):
        r = chat(sdk(gw, agw.make_key("nobody")), "gpt-4o")
        agw.assert_error(r.response, 401, "InvalidCredential")
    m.clear()

    burst = [ok(chat(c)) for _ in range(10)]
    first = burst[0]
    for i, r in enumerate(burst):
        assert r.rl()[:2] == (10, 9 - i), f"request {i + 1}: x-ratelimit-*-requests {r.rl()}"
    assert len(m.data_requests()) == 10

    r11 = chat(c)
    ms = retry_ms(r11)
    # The first slot frees 6 s after the first request was admitted.
    lo = (first.sent + 6.0 - r11.received) * 1000 - 5
    hi = (first.received + 6.0 - r11.sent) * 1000 + 5
    assert lo <= ms <= hi, f"retry-after-ms {ms}, expected the true wait in [{lo:.0f}, {hi:.0f}]"
    assert len(m.data_requests()) == 10, "a refused request reached the backend"
    free_at = r11.received + ms / 1000  # no earlier than this the 11th fits

    # Another client's counters are its own.
    assert ok(chat(sdk(gw, OTHER_KEY))).rl()[:2] == (10, 9)

    # More refused requests: each announces a wait no longer than the last, none is counted.
    last = ms
    for _ in range(5):
        r = chat(c)
        w = retry_ms(r)
        assert w <= last + 5, f"retry-after-ms grew from {last} to {w}: a refusal was counted"
        last = w

    # Shortly before the announced time: still refused, with what is left of the wait.
    sleep_until(r11.sent + ms / 1000 - 1.0)
    r = chat(c)
    w = retry_ms(r)
    assert w <= 1050, f"1 s before the announced time the wait left is {w} ms"
    # At the announced time: admitted (the refusals consumed nothing), now 0 remaining.
    sleep_until(free_at + 0.02)
    r = ok(chat(c))
    assert r.rl()[:2] == (10, 0), r.rl()
    assert len(m.data_requests()) == 12  # 10 + other client's + this one
    line = settled(gw, r11)
    assert (line["status"], line["error_code"], line["usage_source"]) == (429, "RateLimitExceeded", "none")
    assert metric(gw, "aoai_gateway_rejections_total", {"client": "app", "reason": "rate_limited"}) == 7

    # A full window after the last admitted request, the whole burst is there again.
    sleep_until(r.received + 60.05)
    again = [ok(chat(c)) for _ in range(10)]
    assert [x.rl()[1] for x in again] == list(range(9, -1, -1))
    retry_ms(chat(c))


# --------------------------------------------------------------------------------------------
# tokens_per_minute


def test_tokens_per_minute_reserves_before_the_backend_and_reconciles(cluster):
    """tpm 1200 (one token per 50 ms). A request reserving 1000 output tokens but using a few
    gets the difference back at once: the next request, which only fits after that refund,
    passes, and its x-ratelimit-remaining-tokens shows the refund. A prompt too large for what
    is left is refused before any backend is called, with the exact wait; waiting it is enough."""
    m = cluster.mock("b")
    gw = cluster.gateway(config(m, [
        agw.client("app", limits={"tokens_per_minute": 1200}), calib_client()]))
    cal = Calibration(gw)
    big, mid = "x" * 3000, "y" * 1000
    est_hi, est_big, est_mid = cal.estimate("hi"), cal.estimate(big), cal.estimate(mid)
    assert 0 < est_hi < 20 and 700 < est_big < 800 and 200 < est_mid < 300, (est_hi, est_big, est_mid)
    m.clear()
    c = sdk(gw)
    rate = 1200 / 60.0  # tokens refilled per second

    # 1: reserves est_hi + 1000 of an empty window.
    r1 = ok(chat(c, content="hi", max_tokens=1000))
    reserve1 = est_hi + 1000
    assert r1.rl()[2:] == (1200, 1200 - reserve1), r1.rl()
    u1 = r1.usage_total
    assert u1 < 20
    line = settled(gw, r1)
    assert line["usage_source"] == "response" and line["total_tokens"] == u1, line

    # 2: fits only if request 1 was reconciled to its usage.
    reserve2 = est_big + 100
    slack_before = 1200 - reserve1 + rate * (time.monotonic() - r1.sent) + 1
    assert reserve2 > slack_before, "test design: request 2 must not fit an unreconciled window"
    r2 = ok(chat(c, content=big, max_tokens=100))
    exact = 1200 - u1 - reserve2
    rem2 = r2.rl()[3]
    assert r2.rl()[2] == 1200
    assert exact <= rem2 <= exact + rate * (r2.received - r1.sent) + 1, (
        f"x-ratelimit-remaining-tokens {rem2}: expected {exact} (+ refill) after request 1 "
        f"({reserve1} reserved) was reconciled to its usage {u1}"
    )
    u2 = r2.usage_total
    settled(gw, r2)
    assert len(m.data_requests()) == 2

    # 3: 60 tokens (3 s) more than what is left: refused, never reaches the backend.
    left = 1200 - u1 - u2
    max3 = left - est_mid + 60
    assert max3 > 0
    reserve3 = est_mid + max3
    r3 = chat(c, content=mid, max_tokens=max3)
    ms = retry_ms(r3)
    assert len(m.data_requests()) == 2, "a request over the token budget reached the backend"
    line = settled(gw, r3)
    assert line["status"] == 429 and line["error_code"] == "RateLimitExceeded", line
    assert metric(gw, "aoai_gateway_rejections_total", {"client": "app", "reason": "token_limited"}) == 1

    # The exact wait: GCRA state after 1 and 2 (both refunded at once) is
    # tat = max(t1 + u1·50ms, t2) + u2·50ms; wait = tat + reserve3·50ms − 60 s − t3.
    def wait(t1, t2, t3):
        tat = max(t1 + u1 * 0.05, t2) + u2 * 0.05
        return (tat + reserve3 * 0.05 - 60 - t3) * 1000

    lo = wait(r1.sent, r2.sent, r3.received) - 5
    hi = wait(r1.received, r2.received, r3.sent) + 5
    assert lo <= ms <= hi, f"retry-after-ms {ms}, the true wait is in [{lo:.0f}, {hi:.0f}]"

    # Waiting the announced time is enough.
    sleep_until(r3.received + ms / 1000 + 0.02)
    r4 = ok(chat(c, content=mid, max_tokens=max3))
    refill = rate * (r4.received - (r3.sent + ms / 1000))
    assert r4.rl()[3] <= refill + 2, f"the window should be about empty: {r4.rl()}"
    assert len(m.data_requests()) == 3


def test_request_larger_than_the_limit_is_refused_with_a_full_window_wait(cluster):
    m = cluster.mock("b")
    gw = cluster.gateway(config(m, [agw.client("app", limits={"tokens_per_minute": 500})]))
    r = chat(sdk(gw), content="hi", max_tokens=600)
    assert retry_ms(r) == 60000
    assert m.data_requests() == []


# --------------------------------------------------------------------------------------------
# tokens_per_day


def test_tokens_per_day_quota_exceeded_until_the_utc_day_ends(cluster):
    """tpd 300, exact (a day counter does not refill): after a request reconciled to its usage
    u1, a request reserving 300 − u1 + 1 gets 429 QuotaExceeded with Retry-After until 00:00
    UTC (within a second), one reserving exactly 300 − u1 passes with remaining 0."""
    if seconds_to_utc_midnight() < 10:
        time.sleep(seconds_to_utc_midnight() + 1)
    m = cluster.mock("b")
    gw = cluster.gateway(config(m, [agw.client("app", limits={"tokens_per_day": 300})]))
    c = sdk(gw)

    r1 = ok(chat(c, content="hi", max_tokens=200))
    lim, rem = r1.rl()[2:]
    assert lim == 300
    est_hi = 300 - rem - 200
    assert 0 < est_hi < 20, f"reservation of 'hi' + 200: {300 - rem}"
    u1 = r1.usage_total
    settled(gw, r1)

    r2 = chat(c, content="hi", max_tokens=300 - u1 - est_hi + 1)
    ms = retry_ms(r2, 429, "QuotaExceeded")
    expect_lo = (86400 - (time.time() % 86400)) * 1000
    assert abs(ms - expect_lo) <= 1000, (
        f"retry-after-ms {ms}: the UTC day ends in {expect_lo:.0f} ms"
    )
    assert len(m.data_requests()) == 1, "a request over the daily quota reached the backend"

    # Larger than the whole quota: also QuotaExceeded until the day ends.
    r = chat(c, content="hi", max_tokens=400)
    ms = retry_ms(r, 429, "QuotaExceeded")
    assert abs(ms - seconds_to_utc_midnight() * 1000) <= 1000, ms

    r3 = ok(chat(c, content="hi", max_tokens=300 - u1 - est_hi))
    assert r3.rl()[2:] == (300, 0), r3.rl()
    assert len(m.data_requests()) == 2
    settled(gw, r3)
    assert metric(gw, "aoai_gateway_rejections_total", {"client": "app", "reason": "quota_exceeded"}) == 2


# --------------------------------------------------------------------------------------------
# per deployment, other clients, unlisted clients


def test_per_deployment_limits_apply_on_top_of_client_wide_ones(cluster):
    """Client rpm 5 with gpt-4o: rpm 2 on top. gpt-4o stops after 2 (30 s per slot), the
    client as a whole after 5 (12 s per slot); a second client with the same limits has its
    own counters."""
    m = cluster.mock("b")
    lim = {"requests_per_minute": 5, "deployments": {"gpt-4o": {"requests_per_minute": 2}}}
    gw = cluster.gateway(config(m, [
        agw.client("app", limits=lim),
        agw.client("other", keys=[OTHER_KEY_SHA256], limits=lim),
    ]))
    c = sdk(gw)

    a = [ok(chat(c, "gpt-4o")) for _ in range(2)]
    assert [x.rl()[:2] for x in a] == [(2, 1), (2, 0)], "the per-deployment limit is the tightest"
    r = chat(c, "gpt-4o")
    ms = retry_ms(r)
    assert (a[0].sent + 30 - r.received) * 1000 - 5 <= ms <= 30000, ms

    b = [ok(chat(c, "gpt-4o-mini")) for _ in range(3)]
    assert [x.rl()[:2] for x in b] == [(5, 2), (5, 1), (5, 0)], [x.rl() for x in b]
    r = chat(c, "gpt-4o-mini")
    ms = retry_ms(r)
    assert (a[0].sent + 12 - r.received) * 1000 - 5 <= ms <= 12000, f"client-wide wait {ms}"
    # gpt-4o is refused by both windows: the longer wait (per deployment) is announced.
    r = chat(c, "gpt-4o")
    ms = retry_ms(r)
    assert ms > 12000, f"gpt-4o wait {ms} should be the per-deployment one (~30 s)"
    assert len(m.data_requests()) == 5

    o = sdk(gw, OTHER_KEY)
    assert ok(chat(o, "gpt-4o")).rl()[:2] == (2, 1)
    assert ok(chat(o, "gpt-4o-mini")).rl()[:2] == (5, 3)


def _oidc_token(idp: agw.Mock, app: str) -> str:
    r = idp.http.post("/oauth2/token", data={
        "grant_type": "client_credentials", "client_id": app, "client_secret": "s",
        "scope": "api://aoai-gateway/.default"})
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def test_unlisted_oidc_apps_each_have_their_own_limits(cluster):
    """`unlisted_clients.limits` is a template: every unlisted application (keyed by its
    client_claim value) gets its own counters; a listed OIDC client has its own limits."""
    idp = cluster.mock("idp", oidc=True)
    m = cluster.mock("b")
    cfg = config(m, [
        agw.client("listed", keys=[], tokens=[{"provider": "idp", "client": "listed-app"}],
                   limits={"requests_per_minute": 3}),
        agw.client("keyed", limits={"requests_per_minute": 1}),
    ])
    cfg["identity"] = {"oidc": [{
        "name": "idp", "issuer": idp.url, "audiences": ["api://aoai-gateway"],
        "algorithms": ["RS256"], "client_claim": "azp",
        "unlisted_clients": {
            "allow": {"deployments": ["gpt-4o"], "operations": ["chat.completions"]},
            "limits": {"requests_per_minute": 2},
        },
    }]}
    gw = cluster.gateway(cfg)

    def client_for(app):
        import openai as o
        return o.AzureOpenAI(azure_endpoint=gw.url, azure_ad_token=_oidc_token(idp, app),
                             api_version=API_VERSION, max_retries=0, http_client=agw.http_client())

    a, b, listed = client_for("app-a"), client_for("app-b"), client_for("listed-app")
    ra = [ok(chat(a)) for _ in range(2)]
    assert [x.rl()[:2] for x in ra] == [(2, 1), (2, 0)]
    retry_ms(chat(a))
    assert settled(gw, ra[0])["client"] == "unlisted:idp:app-a"

    rb = [ok(chat(b)) for _ in range(2)]
    assert [x.rl()[:2] for x in rb] == [(2, 1), (2, 0)], "app-b shares app-a's counters"
    retry_ms(chat(b))

    rl = [ok(chat(listed)) for _ in range(3)]
    assert [x.rl()[:2] for x in rl] == [(3, 2), (3, 1), (3, 0)]
    assert settled(gw, rl[0])["client"] == "listed"
    retry_ms(chat(listed))

    assert ok(chat(sdk(gw))).rl()[:2] == (1, 0)
    assert len(m.data_requests()) == 8


# --------------------------------------------------------------------------------------------
# streaming


@pytest.mark.parametrize("include_usage", [False, True], ids=["gateway-adds-usage", "client-asks-usage"])
def test_streamed_tokens_are_charged_exactly(cluster, include_usage):
    """tpd 1000 (exact) and tpm 1200: a stream reserving its prompt + 500 is reconciled to the
    usage the backend streamed. Afterwards a request reserving 1000 − usage + 1 is refused
    (the stream was charged at least its usage) and one reserving exactly 1000 − usage passes
    (it was charged no more, in the day window and in the minute window, which would not fit
    it either had the reservation stood)."""
    m = cluster.mock("b")
    gw = cluster.gateway(config(m, [
        agw.client("app", limits={"tokens_per_day": 1000, "tokens_per_minute": 1200})]))
    c = sdk(gw)
    content = "z" * 400
    kw = {"stream": True}
    if include_usage:
        kw["stream_options"] = {"include_usage": True}
    sent = time.monotonic()
    raw = c.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": content}], max_tokens=500, **kw)
    assert raw.status_code == 200
    lim, rem = int(raw.headers["x-ratelimit-limit-tokens"]), int(raw.headers["x-ratelimit-remaining-tokens"])
    assert lim == 1000, "the day limit has the least remaining"
    est = 1000 - rem - 500
    assert 90 < est < 130, f"estimate of a 400-byte prompt: {est}"
    text, usage = "", None
    for chunk in raw.parse():
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == "Hello from b."
    line = settled(gw, raw.headers["x-request-id"])
    assert line["stream"] is True and line["usage_source"] == "response", line
    actual = line["total_tokens"]
    if include_usage:
        assert usage is not None and usage.total_tokens == actual
    else:
        assert usage is None, "the client did not ask for usage"
    # The mock's own count of this request: 400/4 prompt + 4 completion.
    assert actual == 104, f"streamed usage logged as {actual}"
    assert len(m.data_requests()) == 1

    r = chat(c, content=content, max_tokens=1000 - actual - est + 1)
    retry_ms(r, 429, "QuotaExceeded")
    assert len(m.data_requests()) == 1
    r = ok(chat(c, content=content, max_tokens=1000 - actual - est))
    assert r.rl()[2:] == (1000, 0), r.rl()
    assert 1200 - 500 - est - (1000 - actual) < 0, "test design: would not fit tpm unreconciled"


# --------------------------------------------------------------------------------------------
# x-ratelimit-* headers


def test_ratelimit_headers_show_the_tightest_limit_with_this_request_counted(cluster):
    """Client rpm 20 and tpd 1000; gpt-4o rpm 3 and tpm 800 on top. Each response names the
    limit with the least remaining, this request counted, replacing the backend's own
    x-ratelimit headers."""
    m = cluster.mock("b")
    gw = cluster.gateway(config(m, [
        agw.client("app", limits={
            "requests_per_minute": 20, "tokens_per_day": 1000,
            "deployments": {"gpt-4o": {"requests_per_minute": 3, "tokens_per_minute": 800}}}),
        calib_client()]))
    cal = Calibration(gw)
    big = "w" * 2400
    r_big = cal.reservation(big, "gpt-4o-mini", max_tokens=1)
    m.clear()
    c = sdk(gw)
    rate = 800 / 60

    r1 = ok(chat(c, "gpt-4o", "hi", max_tokens=10))
    lr, rr, lt, rt = r1.rl()
    assert (lr, rr) == (3, 2), "requests: gpt-4o's 3 per minute, this request counted"
    assert lt == 800, "tokens: gpt-4o's tpm 800 (800 − r) is below the day's (1000 − r)"
    reserve_hi = 800 - rt
    assert 10 < reserve_hi < 30
    u1 = r1.usage_total
    settled(gw, r1)
    t0 = r1.sent

    r2 = ok(chat(c, "gpt-4o-mini", big, max_tokens=1))
    lr, rr, lt, rt = r2.rl()
    assert lr == 20 and 18 <= rr <= 18 + int((r2.received - t0) / 3), (lr, rr)
    assert (lt, rt) == (1000, 1000 - u1 - r_big), "tokens: only the day window applies to gpt-4o-mini"
    u2 = r2.usage_total
    assert u2 > 500
    settled(gw, r2)

    r3 = ok(chat(c, "gpt-4o", "hi", max_tokens=10))
    lr, rr, lt, rt = r3.rl()
    assert (lr, rr) == (3, 1)
    day_left = 1000 - u1 - u2 - reserve_hi
    minute_left = 800 - u1 - reserve_hi  # at least; more with refill
    assert day_left < minute_left
    assert (lt, rt) == (1000, day_left), (
        f"tokens: the day ({day_left} left) is now tighter than gpt-4o's minute (≥{minute_left})")

    # The backend's own x-ratelimit-remaining-* never leak through next to the gateway's.
    with agw.http_client() as h:
        direct = h.post(m.url + agw.chat_path("gpt-4o"), json=agw.chat_body("hi"))
    assert direct.headers.get("x-ratelimit-remaining-requests") is not None, "mock sends its own"
    for r in (r1, r2, r3):
        for name in ("x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens"):
            assert len(r.headers.get_list(name)) == 1, (name, r.headers.get_list(name))


def test_backend_rate_limit_headers_are_replaced_where_the_gateway_limits(cluster):
    """A client limited only by tokens_per_day: the gateway's token headers are there, and the
    backend's own fleet-wide x-ratelimit-remaining-requests (the mock sends 9999) is not passed
    on beside them. A client without limits still sees the backend's headers."""
    m = cluster.mock("b")
    gw = cluster.gateway(config(m, [
        agw.client("day", limits={"tokens_per_day": 100000}),
        agw.client("free", keys=[agw.api_key(OTHER_KEY_SHA256)]),
    ]))
    r = ok(chat(sdk(gw)))
    assert r.h("x-ratelimit-limit-tokens") == 100000
    assert r.h("x-ratelimit-remaining-requests") is None, "the backend's request header leaked"
    assert r.h("x-ratelimit-limit-requests") is None
    free = ok(chat(sdk(gw, key=OTHER_KEY)))
    assert free.h("x-ratelimit-remaining-requests") == 9999, "unlimited clients see the backend's"


# --------------------------------------------------------------------------------------------
# the SDK's own retry


def test_sdk_automatic_retry_honours_retry_after_ms_and_succeeds(cluster):
    """rpm 20 (3 s per slot), exhausted. The SDK with max_retries=2 gets one 429, sleeps the
    announced retry-after-ms, and its one retry succeeds: two attempts at the gateway, one at
    the backend, no hammering."""
    m = cluster.mock("b")
    gw = cluster.gateway(config(m, [agw.client("app", limits={"requests_per_minute": 20})]))
    c0 = sdk(gw)
    for _ in range(20):
        ok(chat(c0))
    m.clear()
    # Audit lines are written after the response; wait for all 20 before counting.
    agw.wait_until(lambda: len(gw.audit_lines()) >= 20, 10, "the 20 audit lines")
    before = len(gw.audit_lines())

    events: list[tuple[str, float, int | None, str | None]] = []

    def on_request(request):
        events.append(("request", time.monotonic(), None, None))

    def on_response(response):
        events.append(("response", time.monotonic(), response.status_code,
                       response.headers.get("retry-after-ms")))

    hc = agw.http_client(event_hooks={"request": [on_request], "response": [on_response]})
    c = openai.AzureOpenAI(azure_endpoint=gw.url, api_key=KEY, api_version=API_VERSION,
                           max_retries=2, http_client=hc)
    start = time.monotonic()
    resp = c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    took = time.monotonic() - start
    assert resp.choices[0].message.content == "Hello from b."

    kinds = [e[0] for e in events]
    assert kinds == ["request", "response", "request", "response"], events
    (_, _, _, _), (_, t_429, s1, ms), (_, t_retry, _, _), (_, _, s2, _) = events
    assert (s1, s2) == (429, 200), events
    ms = int(ms)
    assert 0 < ms <= 3000
    gap = (t_retry - t_429) * 1000
    assert ms - 5 <= gap <= ms + 1000, f"the SDK waited {gap:.0f} ms for a retry-after-ms of {ms}"
    assert took < 5

    agw.wait_until(lambda: len(gw.audit_lines()) >= before + 2, 10, "two audit lines")
    time.sleep(0.2)
    lines = gw.audit_lines()[before:]
    assert [(l["status"], l["error_code"]) for l in lines] == [(429, "RateLimitExceeded"), (200, None)], lines
    assert len(m.data_requests()) == 1


# --------------------------------------------------------------------------------------------
# concurrency


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_fifty_concurrent_requests_against_rpm_10_admit_exactly_10(cluster, tmp_path, store):
    m = cluster.mock("b", latency_ms=200)
    redis = None
    lim = limits_section(store=store)
    if store == "redis":
        redis = RedisServer(tmp_path / "redis").start()
        lim.update(redis_url=redis.url, on_store_failure="reject")
    try:
        gw = cluster.gateway(config(m, [agw.client("app", limits={"requests_per_minute": 10})], limits=lim))
        hc = agw.http_client(limits=agw.httpx.Limits(max_connections=60, max_keepalive_connections=60))
        c = openai.AzureOpenAI(azure_endpoint=gw.url, api_key=KEY, api_version=API_VERSION,
                               max_retries=0, http_client=hc)
        barrier = threading.Barrier(50)

        def one(_):
            barrier.wait()
            return chat(c)

        start = time.monotonic()
        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(one, range(50)))
        took = time.monotonic() - start
        assert took < 5.5, f"the burst took {took:.1f} s: a slot may have refilled (one per 6 s)"
        statuses = sorted(r.status for r in results)
        assert statuses.count(200) == 10 and statuses.count(429) == 40, statuses
        for r in results:
            if r.status == 429:
                retry_ms(r)
        remaining = sorted(r.rl()[1] for r in results if r.status == 200)
        # Each request reads the clock before it is admitted and the window refills
        # continuously, so under a concurrent burst (two gateway threads, or the Redis round
        # trip) a header may be one lower than its arrival rank; admission itself is exact
        # (above). The first admitted sees 9 left, the last 0.
        assert all(0 <= x <= 9 for x in remaining), remaining
        assert remaining[0] == 0 and remaining[-1] == 9, remaining
        assert len(m.data_requests()) == 10
        if redis is not None:
            assert redis.keys("agw:lim:*"), "store: redis, but nothing was written to Redis"
            assert metric(gw, "aoai_gateway_limit_store_errors_total") == 0
    finally:
        if redis is not None:
            redis.stop()


# --------------------------------------------------------------------------------------------
# Redis


def _redis_limits(redis: RedisServer, on_failure: str) -> dict:
    return limits_section(store="redis", redis_url=redis.url, on_store_failure=on_failure)


def test_two_gateways_on_one_redis_share_a_clients_limits(cluster, redis_server):
    """Two gateway processes on one redis-server: the request count and the reconciled token
    count are shared (each sees the other's requests in its headers), and 30 concurrent
    requests split between them admit what is left of rpm 10, within one request."""
    m = cluster.mock("b", latency_ms=100)
    cfg = config(m, [agw.client("app", limits={"requests_per_minute": 10, "tokens_per_day": 100000})],
                 limits=_redis_limits(redis_server, "reject"))
    g1, g2 = cluster.gateway(cfg), cluster.gateway(cfg)
    c1, c2 = sdk(g1), sdk(g2)

    r1 = ok(chat(c1, content="hi", max_tokens=100))
    assert r1.rl()[:2] == (10, 9)
    reserve = 100000 - r1.rl()[3]
    u1 = r1.usage_total
    settled(g1, r1)
    # Gateway 1 queues the correction for its next admission, or sends it at most 10 ms after
    # the request ended (README, Limits): it has no next admission here, so it flushes.
    time.sleep(0.1)
    r2 = ok(chat(c2, content="hi", max_tokens=100))
    assert r2.rl()[:2] == (10, 8), "gateway 2 does not see gateway 1's request"
    assert r2.rl()[2:] == (100000, 100000 - u1 - reserve), (
        "gateway 2 does not see gateway 1's reconciled usage")
    settled(g2, r2)

    barrier = threading.Barrier(30)

    def one(i):
        barrier.wait()
        return i % 2, chat(c1 if i % 2 == 0 else c2)

    start = time.monotonic()
    with ThreadPoolExecutor(30) as pool:
        results = list(pool.map(one, range(30)))
    took = time.monotonic() - start
    admitted = [g for g, r in results if r.status == 200]
    refused = [r for _, r in results if r.status != 200]
    for r in refused:
        retry_ms(r)
    assert 8 <= len(admitted) <= 9, (
        f"{len(admitted)} of 30 admitted by two gateways sharing rpm 10 (8 left), took {took:.1f}s")
    assert len(m.data_requests()) == 2 + len(admitted)
    assert redis_server.keys("agw:lim:*"), "nothing in Redis"
    for g in (g1, g2):
        assert metric(g, "aoai_gateway_limit_store_errors_total") == 0


def test_redis_down_with_on_store_failure_local_keeps_serving_and_recovers(cluster, redis_server):
    """Killing Redis: requests are still served, decided by the process's own counters (which
    still enforce the limit), each one counted in aoai_gateway_limit_store_errors_total. After
    Redis restarts on the same port the gateway uses it again by itself."""
    m = cluster.mock("b")
    gw = cluster.gateway(config(m, [agw.client("app", limits={"requests_per_minute": 3})],
                                limits=_redis_limits(redis_server, "local")))
    c = sdk(gw)
    assert ok(chat(c)).rl()[:2] == (3, 2)
    assert redis_server.keys("agw:lim:*"), "the first request was not counted in Redis"
    assert metric(gw, "aoai_gateway_limit_store_errors_total") == 0

    redis_server.kill()
    errors = 0.0
    rem = []
    for _ in range(3):
        r = ok(chat(c))
        rem.append(r.rl()[1])
        e = metric(gw, "aoai_gateway_limit_store_errors_total")
        assert e > errors, "a request decided without Redis was not counted as a store error"
        errors = e
    assert rem == [2, 1, 0], f"local counters (fresh) should give 2, 1, 0: {rem}"
    retry_ms(chat(c))  # the local counters still enforce the limit
    assert metric(gw, "aoai_gateway_limit_store_errors_total") > errors
    assert len(m.data_requests()) == 4

    redis_server.start()
    assert redis_server.keys("agw:lim:*") == []

    def back():
        r = chat(c)
        return r if r.status == 200 else None

    r = agw.wait_until(back, 10, "the gateway to use the restarted Redis", interval=0.3)
    assert r.rl()[:2] == (3, 2), f"first request after recovery should be counted in the fresh Redis: {r.rl()}"
    assert redis_server.keys("agw:lim:*"), "recovered, but nothing written to Redis"
    e = metric(gw, "aoai_gateway_limit_store_errors_total")
    assert [ok(chat(c)).rl()[1] for _ in range(2)] == [1, 0]
    retry_ms(chat(c))
    assert metric(gw, "aoai_gateway_limit_store_errors_total") == e, "store errors after recovery"


def test_hung_redis_delays_requests_by_no_more_than_the_store_timeout(cluster, redis_server):
    """A Redis that stops answering (SIGSTOP: connections stay open) does not stall requests:
    each is decided locally after a bounded wait, counted as a store error, and the gateway
    goes back to Redis by itself once it answers again."""
    m = cluster.mock("b")
    gw = cluster.gateway(config(m, [agw.client("app", limits={"requests_per_minute": 100})],
                                limits=_redis_limits(redis_server, "local")))
    c = sdk(gw)
    ok(chat(c))
    redis_server.pause()
    try:
        slowest = 0.0
        for _ in range(4):
            r = ok(chat(c))
            slowest = max(slowest, r.received - r.sent)
        assert slowest < 1.5, f"a request waited {slowest:.2f} s for a hung Redis"
        errors = metric(gw, "aoai_gateway_limit_store_errors_total")
        assert errors >= 4, errors
    finally:
        redis_server.resume()

    def back():
        before = metric(gw, "aoai_gateway_limit_store_errors_total")
        ok(chat(c))
        return metric(gw, "aoai_gateway_limit_store_errors_total") == before

    agw.wait_until(back, 10, "requests decided by Redis again (no new store errors)", interval=0.3)


def test_redis_down_with_on_store_failure_reject_answers_503_and_recovers(cluster, redis_server):
    m = cluster.mock("b")
    gw = cluster.gateway(config(m, [
        agw.client("app", limits={"requests_per_minute": 100}),
        agw.client("free", keys=[OTHER_KEY_SHA256]),
    ], limits=_redis_limits(redis_server, "reject")))
    c = sdk(gw)
    ok(chat(c))
    m.clear()

    redis_server.kill()
    for i in range(3):
        r = chat(c)
        agw.assert_error(r.response, 503, "LimitStoreUnavailable")
        assert metric(gw, "aoai_gateway_limit_store_errors_total") >= i + 1
    assert m.data_requests() == [], "a request nobody could count reached the backend"
    # A client without limits needs no store.
    ok(chat(sdk(gw, OTHER_KEY)))

    redis_server.start()

    def back():
        r = chat(c)
        if r.status == 503:
            agw.assert_error(r.response, 503, "LimitStoreUnavailable")
            return None
        return ok(r)

    r = agw.wait_until(back, 10, "the gateway to use the restarted Redis", interval=0.3)
    assert r.rl()[:2] == (100, 99), r.rl()
    e = metric(gw, "aoai_gateway_limit_store_errors_total")
    ok(chat(c))
    assert metric(gw, "aoai_gateway_limit_store_errors_total") == e


# --------------------------------------------------------------------------------------------
# what each kind of request is charged


def _true_usage(m: agw.Mock, path: str, body: dict) -> int:
    """total_tokens of the same request sent straight to the mock, not streamed."""
    body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    with agw.http_client() as h:
        r = h.post(m.url + path, json=body)
    r.raise_for_status()
    return r.json()["usage"]["total_tokens"]


def test_every_operation_plain_and_streamed_is_charged_its_reported_usage(cluster):
    """tokens_per_day (exact): after completions, embeddings and responses requests, plain and
    streamed, each reserving far more than it uses, the day's count is exactly the sum of the
    usage the backend reports for them — read back through a probe's x-ratelimit-remaining-tokens."""
    m = cluster.mock("b")
    L = 100000
    gw = cluster.gateway(config(m, [agw.client("app", limits={"tokens_per_day": L})]))
    c = sdk(gw)
    v = f"?api-version={API_VERSION}"

    probe = ok(chat(c, content="hi"))
    est_hi = L - probe.rl()[3]
    used = probe.usage_total
    settled(gw, probe)

    def check(what, rid, path, body):
        nonlocal used
        line = settled(gw, rid)
        assert line["status"] == 200 and line["usage_source"] == "response", (what, line)
        true = _true_usage(m, path, body)
        r = ok(chat(c, content="hi"))
        assert r.rl()[3] == L - used - true - est_hi, (
            f"{what}: charged {L - used - est_hi - r.rl()[3]} tokens, the backend reported {true}")
        used += true + r.usage_total
        settled(gw, r)

    comp = "/openai/deployments/gpt-4o/completions" + v
    # max_tokens 1: the usage (prompt + 4) exceeds the reservation (prompt + 1): a surcharge.
    for stream, max_tokens in ((False, 3000), (True, 3000), (False, 1)):
        body = {"prompt": "p" * 200, "max_tokens": max_tokens}
        raw = c.completions.with_raw_response.create(model="gpt-4o", stream=stream, **body)
        if stream:
            assert "".join(ch.choices[0].text for ch in raw.parse() if ch.choices) == "Hello from b."
        check(f"completions stream={stream} max_tokens={max_tokens}", raw.headers["x-request-id"], comp, body)

    body = {"input": "e" * 200}
    raw = c.embeddings.with_raw_response.create(model="gpt-4o", **body)
    check("embeddings", raw.headers["x-request-id"], "/openai/deployments/gpt-4o/embeddings" + v, body)

    for stream in (False, True):
        body = {"input": "r" * 200, "max_output_tokens": 3000}
        raw = c.responses.with_raw_response.create(model="gpt-4o", stream=stream, **body)
        if stream:
            kinds = [ev.type for ev in raw.parse()]
            assert kinds[-1] == "response.completed", kinds
        check(f"responses stream={stream}", raw.headers["x-request-id"], "/openai/responses" + v,
              {"model": "gpt-4o", **body})


def test_failed_attempts_and_failed_requests_leave_the_documented_charge(cluster):
    """A failed attempt followed by a successful one is charged the success's usage; a request
    whose every attempt failed (no usage to be had) keeps its reservation (SPEC §6)."""
    m = cluster.mock("b")
    L = 100000
    cfg = agw.make_config(
        deployments={"gpt-4o": [agw.member("b1"), agw.member("b2")]},
        backends=[agw.backend("b1", m), agw.backend("b2", m, region="westus")],
        clients=[agw.client("app", limits={"tokens_per_day": L})],
        limits=limits_section(),
        retries={"max_attempts": 2, "on_status": [500]},
    )
    gw = cluster.gateway(cfg)
    c = sdk(gw)
    probe = ok(chat(c, content="hi"))
    est_hi = L - probe.rl()[3]
    used = probe.usage_total
    settled(gw, probe)

    m.faults(fail_status=500, fail_count=1)
    r = ok(chat(c, content="hi", max_tokens=2000))
    line = settled(gw, r)
    assert line["attempts"] == 2 and line["usage_source"] == "response", line
    used += r.usage_total

    m.faults(fail_status=500, fail_count=2)
    r = chat(c, content="hi", max_tokens=2000)
    assert r.status == 500, r.status
    line = settled(gw, r)
    assert line["usage_source"] == "reserved" and line["total_tokens"] == est_hi + 2000, line
    used += est_hi + 2000

    r = ok(chat(c, content="hi"))
    assert r.rl()[3] == L - used - est_hi, (
        f"{L - est_hi - r.rl()[3]} tokens charged so far, expected {used}: the probe, the "
        f"retried request's usage and the failed request's reservation {est_hi + 2000}")


def test_client_disconnecting_mid_stream_is_still_charged(cluster):
    """A client that hangs up after the first bytes of a stream is charged: its reservation
    (no usage could be had, SPEC §6) or, if the gateway still read it, the backend's usage —
    never nothing; the audit line says which."""
    m = cluster.mock("b", chunk_delay_ms=300)
    L = 100000
    gw = cluster.gateway(config(m, [agw.client("app", limits={"tokens_per_day": L}), calib_client()]))
    est_hi = Calibration(gw).estimate("hi")
    body = {"messages": [{"role": "user", "content": "z" * 400}], "max_tokens": 500, "stream": True}
    with agw.http_client() as h:
        with h.stream("POST", gw.url + agw.chat_path("gpt-4o"), headers={"api-key": KEY}, json=body) as r:
            assert r.status_code == 200
            reserved = L - int(r.headers["x-ratelimit-remaining-tokens"])
            rid = r.headers["x-request-id"]
            next(r.iter_raw())  # the first bytes, then hang up
    line = gw.audit_for(rid, timeout=15)
    true = _true_usage(m, agw.chat_path("gpt-4o"), body)
    probe = ok(chat(sdk(gw), content="hi"))
    charged = L - probe.rl()[3] - est_hi
    expected = {"reserved": reserved, "response": true}.get(line["usage_source"])
    assert expected is not None, f"usage_source {line['usage_source']!r} for a cut stream: {line}"
    assert charged == expected, (
        f"cut stream charged {charged}; usage_source {line['usage_source']} means {expected}")
