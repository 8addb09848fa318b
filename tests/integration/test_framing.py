"""Nothing crosses between requests: a byte a backend or a client sends out of turn never ends
up in another request's answer, and a request is sent to a backend at most once.

Each test looks at what a user can check: what the backend received (how many requests,
their headers and lengths, on which of its connections) and what each client received on its
connection. Backend misbehaviour comes from `fakebackend.FakeBackend`, a raw-socket backend
that records every request; clients are the raw-socket `h1util.Conn`.

Gateways that talk to a scripted backend run with `threads: 1`: the pool of idle backend
connections is per worker thread, so with one thread a connection that went back to the pool
is the one the next request finds."""

from __future__ import annotations

import select
import threading
import time

import pytest

import agw
from fakebackend import BackendConn, FakeBackend, Received, answer, answer_body, echo, response
from h1util import CHAT, TIMEOUT, Conn, Resp, assert_spec_error, chat, chat_bytes, chunked, request
from opsutil import metric_value, scrape


# -- set-up ------------------------------------------------------------------------------


def fake_config(fakes: list[FakeBackend], priorities: list[int] | None = None,
                server: dict | None = None, **kw) -> dict:
    """Deployment gpt-4o served by the fake backends (api-key credential), one worker
    thread."""
    backends = [
        agw.backend(fb.name, fb.url, credential="api_key", api_key="backend-key")
        for fb in fakes
    ]
    members = [
        agw.member(fb.name, priority=priorities[i] if priorities else None)
        for i, fb in enumerate(fakes)
    ]
    return agw.make_config(
        deployments={"gpt-4o": members},
        backends=backends,
        server={"threads": 1, **(server or {})},
        **kw,
    )


@pytest.fixture(scope="module")
def _scripted_gateways(module_cluster):
    gateways: dict[str, tuple[agw.Gateway, list[FakeBackend]]] = {}
    yield module_cluster, gateways
    for _, fbs in gateways.values():
        for fb in fbs:
            fb.close()


@pytest.fixture
def scripted(_scripted_gateways):
    """`scripted(key, names, priorities=None)` → (gateway, fake backends): a gateway in front
    of fake backends with these names, started once per module for each key and shared by
    the tests that ask for the same key. Each test scripts the backends itself: they start
    as `echo`, with their records cleared. Whatever a test leaves in the gateway's pool is
    connections that answered normally (a connection that misbehaved is dropped, or the
    test that made it misbehave failed)."""
    cluster, gateways = _scripted_gateways
    used: list[FakeBackend] = []

    def get(key: str, names: list[str], priorities: list[int] | None = None):
        if key not in gateways:
            fbs = [FakeBackend(n) for n in names]
            gateways[key] = (cluster.gateway(fake_config(fbs, priorities)), fbs)
        gw, fbs = gateways[key]
        for fb in fbs:
            fb.handler = echo
            fb.clear()
        used.extend(fbs)
        return gw, fbs

    yield get
    for fb in used:
        fb.handler = echo
    for fb in used:
        assert not fb.errors, f"fake backend {fb.name} received unparseable bytes: {fb.errors}"


@pytest.fixture(scope="module")
def shared(module_cluster):
    """One gateway in front of one well-behaved fake backend, for the tests of what the
    gateway makes of a client's bytes."""
    fb = FakeBackend("shared")
    gw = module_cluster.gateway(fake_config([fb]))
    yield gw, fb
    fb.close()


@pytest.fixture
def env(shared):
    gw, fb = shared
    fb.handler = echo
    fb.clear()
    yield gw, fb
    fb.handler = echo
    assert not fb.errors, f"the fake backend received unparseable bytes: {fb.errors}"


@pytest.fixture(scope="module")
def trusted(module_cluster, shared):
    """A gateway that believes forwarding headers sent from 127.0.0.1."""
    _, fb = shared
    cfg = fake_config([fb], server={"trusted_proxy_cidrs": ["127.0.0.1/32"]})
    return module_cluster.gateway(cfg)


# -- helpers -----------------------------------------------------------------------------


def ask(c: Conn, marker: str, **kw) -> Resp:
    """Sends a chat request whose message is `marker`; returns the answer."""
    c.send(chat(chat_bytes(marker), **kw))
    return c.read_response()


def assert_answer(r: Resp, marker: str, backend: str | None = None) -> dict:
    """The answer is the backend's answer to the request with this marker."""
    assert r.status_code == 200, f"expected the answer to {marker!r}, got {r!r}"
    body = r.json()
    assert body.get("marker") == marker, (
        f"the client that sent {marker!r} received the answer to {body.get('marker')!r}: {r!r}"
    )
    if backend is not None:
        assert body.get("backend") == backend, f"answered by {body.get('backend')!r}: {r!r}"
    assert r.headers.get("x-request-id"), r
    return body


def assert_refused_and_closed(c: Conn, r: Resp, fb: FakeBackend, status: int = 400,
                              code: str = "InvalidRequestBody") -> None:
    """One error answer, the connection closed after it, nothing at the backend."""
    assert_spec_error(r, status, code)
    assert r.closes(), f"no `connection: close` on the {status}: {r!r}"
    c.expect_closed()
    assert fb.data_requests() == [], f"the backend received: {fb.data_requests()!r}"


def upstream_errors(gw: agw.Gateway) -> float:
    """aoai_gateway_upstream_attempts_total{code="error"}, over all backends."""
    return metric_value(scrape(gw), "aoai_gateway_upstream_attempts_total", code="error") or 0.0


# A complete, valid request sent right behind a broken one: if the gateway took the broken
# one's bytes for a message boundary, this one would be answered (and reach the backend).
SMUGGLED = chat(chat_bytes("smuggled"))


# -- 1. a stray response from a backend ----------------------------------------------------


def stray_after_first(delay: float, sent: threading.Event):
    """Answers the first data request, then sends one more complete response on the same
    connection (in the same send, or `delay` s later; `sent` is set once it is out);
    answers everything else normally."""
    lock = threading.Lock()
    state = {"done": False}

    def handler(conn: BackendConn, req: Received) -> None:
        with lock:
            first, state["done"] = not state["done"], True
        if not first:
            echo(conn, req)
            return
        stray = response(200, answer_body("STRAY", conn.backend.name))
        if delay == 0:
            conn.send(answer(req, conn.backend.name) + stray)
        else:
            conn.send(answer(req, conn.backend.name))
            time.sleep(delay)
            conn.send(stray)
        sent.set()

    return handler


@pytest.mark.parametrize("clients", ["own-connections", "one-reused-connection"])
@pytest.mark.parametrize("stray", ["same-send", "50ms-later"])
def test_a_stray_response_reaches_no_client(scripted, stray, clients):
    gw, (fb,) = scripted("stray", ["stray"])
    sent = threading.Event()
    fb.handler = stray_after_first(0 if stray == "same-send" else 0.05, sent)
    markers = ["request A", "request B", "request C", "request D"]

    def pause_after(i: int) -> None:
        if i == 0:
            # Once the stray response is out (and, on loopback, at the gateway a moment
            # later), the next request comes well within a second of the answer: the pooled
            # connection is still fresh.
            assert sent.wait(5), "the fake backend did not send its stray response"
            time.sleep(0.1)

    if clients == "own-connections":
        for i, m in enumerate(markers):
            with Conn(gw) as c:
                assert_answer(ask(c, m), m)
                c.expect_open(0.2)  # and nothing else came on this connection
            pause_after(i)
    else:
        with Conn(gw) as c:
            for i, m in enumerate(markers):
                assert_answer(ask(c, m), m)
                pause_after(i)
            c.expect_open(0.2)

    data = fb.data_requests()
    assert [r.marker for r in data] == markers, (
        f"the backend did not receive each request exactly once: {data!r}"
    )
    stray_conn = data[0].conn
    reused = [r for r in data[1:] if r.conn == stray_conn]
    assert not reused, f"the connection that carried a stray response was reused: {reused!r}"


# -- 2. a request is never sent twice to the same backend --------------------------------


def lose_on_reuse(kind: str, armed: threading.Event):
    """Once armed: a data request that comes on a connection that already served one is read
    whole, then the connection is closed (`close`: FIN; `reset`: RST) without an answer.
    New connections, and everything before arming, are answered normally."""

    def handler(conn: BackendConn, req: Received) -> None:
        if armed.is_set() and conn.served > 0:
            conn.close() if kind == "close" else conn.reset()
            return
        echo(conn, req)

    return handler


def warm(gw: agw.Gateway, fbs: list[FakeBackend], tries: int = 40) -> None:
    """Sends requests one after the other until every backend has served one (and so has a
    pooled connection in the gateway's one worker thread)."""
    with Conn(gw) as c:
        for i in range(tries):
            assert_answer(ask(c, f"warm {i}"), f"warm {i}")
            if all(fb.data_requests() for fb in fbs):
                return
    raise AssertionError(f"not every backend was picked in {tries} requests")


@pytest.mark.parametrize("kind", ["close", "reset"])
def test_a_request_lost_on_a_pooled_connection_is_not_resent_one_member(scripted, kind):
    gw, (fb,) = scripted("single", ["solo"])
    armed = threading.Event()
    fb.handler = lose_on_reuse(kind, armed)
    with Conn(gw) as c:
        assert_answer(ask(c, "first"), "first")
        armed.set()
        r = ask(c, "lost")
        assert_spec_error(r, 502, "BadGateway")
        # The next request is served (on a new backend connection).
        assert_answer(ask(c, "after"), "after")
    lost = fb.with_marker("lost")
    assert len(lost) == 1, f"the backend received the request {len(lost)} times: {lost!r}"
    line = gw.audit_for(r.headers.get("x-request-id"))
    assert (line["status"], line["attempts"], line["error_code"]) == (502, 1, "BadGateway"), line
    assert [q.marker for q in fb.data_requests()] == ["first", "lost", "after"], fb.data_requests()


@pytest.mark.parametrize("kind", ["close", "reset"])
def test_a_request_lost_on_pooled_connections_is_tried_once_per_member(scripted, kind):
    # same priority; retries.max_attempts 3
    gw, (b1, b2) = scripted("pair", ["fake-one", "fake-two"])
    armed = threading.Event()
    b1.handler = b2.handler = lose_on_reuse(kind, armed)
    warm(gw, [b1, b2])
    armed.set()
    before = upstream_errors(gw)
    with Conn(gw) as c:
        r = ask(c, "lost")
        assert_spec_error(r, 502, "BadGateway")
    for fb in (b1, b2):
        lost = fb.with_marker("lost")
        assert len(lost) == 1, f"{fb.name} received the request {len(lost)} times: {lost!r}"
    assert upstream_errors(gw) - before == 2
    line = gw.audit_for(r.headers.get("x-request-id"))
    assert (line["status"], line["attempts"], line["error_code"]) == (502, 2, "BadGateway"), line


@pytest.mark.parametrize("kind", ["close", "reset"])
def test_a_request_lost_on_a_pooled_connection_goes_to_the_other_member(scripted, kind):
    gw, (bad, good) = scripted("failover", ["fake-bad", "fake-good"], priorities=[1, 2])
    armed = threading.Event()
    bad.handler = lose_on_reuse(kind, armed)
    warm(gw, [bad])
    armed.set()
    with Conn(gw) as c:
        r = ask(c, "lost")
        assert_answer(r, "lost", backend="fake-good")
    assert len(bad.with_marker("lost")) == 1, bad.data_requests()
    assert len(good.with_marker("lost")) == 1, good.data_requests()
    line = gw.audit_for(r.headers.get("x-request-id"))
    assert (line["status"], line["attempts"], line["backend"]) == (200, 2, "fake-good"), line


# -- 3./4. Transfer-Encoding that says nothing, and on HTTP/1.0 --------------------------


@pytest.mark.parametrize(
    "te_line", [b"Transfer-Encoding: ", b"Transfer-Encoding:", b"Transfer-Encoding: ,"],
    ids=["empty", "empty-no-space", "comma"],
)
@pytest.mark.parametrize("order", ["te-first", "cl-first"])
def test_an_empty_transfer_encoding_beside_content_length_is_refused(env, te_line, order):
    gw, fb = env
    body = chat_bytes("empty te")
    cl = f"Content-Length: {len(body)}".encode()
    fields = [te_line, cl] if order == "te-first" else [cl, te_line]
    wire = (
        f"POST {CHAT} HTTP/1.1\r\nHost: gateway.test\r\napi-key: {agw.KEY}\r\n"
        "Content-Type: application/json\r\n".encode()
        + b"\r\n".join(fields) + b"\r\n\r\n" + body + SMUGGLED
    )
    with Conn(gw) as c:
        c.send(wire)
        assert_refused_and_closed(c, c.read_response(), fb)


def test_chunked_on_http10_with_keep_alive_is_refused(env):
    gw, fb = env
    wire = request(CHAT, b"", version="1.0", length=False,
                   headers=[("Connection", "keep-alive"), ("Transfer-Encoding", "chunked")])
    wire += chunked(chat_bytes("http/1.0 chunked"), [10]) + SMUGGLED
    with Conn(gw) as c:
        c.send(wire)
        r = c.read_response()
        assert_spec_error(r, 400, "InvalidRequestBody")
        assert "keep-alive" not in (r.headers.get("connection") or "").lower(), r
        c.expect_closed()
    assert fb.data_requests() == [], fb.data_requests()


# -- 5. chunked bodies: strict lines -----------------------------------------------------


def _bad_chunked() -> dict[str, bytes]:
    body = chat_bytes("chunked body")
    valid = chunked(body, [10])
    end = valid.rindex(b"0\r\n\r\n")
    return {
        # Read as `2;<ext up to CRLF>` it is the body whole; read with LF as a line end it is
        # `xx` then the rest.
        "bare-lf-in-extension": b"2;\nxx\r\n" + body[:2] + b"\r\n" + chunked(body[2:], [10]),
        "bare-cr-in-extension": b"2;\rxx\r\n" + body[:2] + b"\r\n" + chunked(body[2:], [10]),
        "empty-size-line-first": b"\r\n" + valid,
        "empty-size-line-before-last-chunk": valid[:end] + b"\r\n" + valid[end:],
        "trailer-without-colon": chunked(body, [10], trailers=["X-Trailer yes"]),
        "trailer-space-before-colon": chunked(body, [10], trailers=["X-Trailer : yes"]),
        "trailer-obs-fold": chunked(body, [10], trailers=["X-Trailer: yes", " folded"]),
        "request-line-in-trailers": chunked(
            body, [10], trailers=["GET /openai/models HTTP/1.1", "Host: smuggled"]
        ),
    }


BAD_CHUNKED = _bad_chunked()


@pytest.mark.parametrize("case", list(BAD_CHUNKED))
def test_a_malformed_chunked_body_is_refused_and_what_follows_is_not_served(env, case):
    gw, fb = env
    wire = request(CHAT, b"", length=False, headers=[("Transfer-Encoding", "chunked")])
    with Conn(gw) as c:
        c.send(wire + BAD_CHUNKED[case] + SMUGGLED)
        assert_refused_and_closed(c, c.read_response(), fb)


def test_chunk_extensions_and_trailers_still_reach_the_backend_whole(env):
    gw, fb = env
    body = chat_bytes("extensions and trailers " * 5)
    framed = chunked(
        body, [4, 7, 30],
        ext=[';name=value;q="a b"', ";n", ';x="y;z"', ""],
        trailers=["X-Trailer: yes", "X-Checksum: abc"],
    )
    assert framed.startswith(b'4;name=value;q="a b"\r\n'), framed[:40]
    with Conn(gw) as c:
        c.send(request(CHAT, b"", length=False, headers=[("Transfer-Encoding", "chunked")])
               + framed)
        assert_answer(c.read_response(), "extensions and trailers " * 5)
        assert_answer(ask(c, "next"), "next")
    data = fb.data_requests()
    assert len(data) == 2, data
    q = data[0]
    assert q.body == body, "the body changed on the way"
    assert q.values("content-length") == [str(len(body))], q
    assert "transfer-encoding" not in q.names(), q
    assert not {"x-trailer", "x-checksum"} & q.names(), q


# -- 6. hop-by-hop fields ----------------------------------------------------------------


HOP_BY_HOP = {
    "nominated-by-connection": [("Connection", "keep-alive, X-Hop"), ("X-Hop", "hop-secret")],
    "http2-settings": [("HTTP2-Settings", "AAAA")],
    "sec-websocket-key": [("Sec-WebSocket-Key", "x")],
    "transfer_encoding-underscore": [("Transfer_Encoding", "chunked")],
    "api_key-underscore": [("Api_Key", "underscore-secret")],
}
HOP_BY_HOP["all-together"] = [f for fs in HOP_BY_HOP.values() for f in fs]


@pytest.mark.parametrize("case", list(HOP_BY_HOP))
def test_hop_by_hop_request_fields_do_not_reach_the_backend(env, case):
    gw, fb = env
    fields = HOP_BY_HOP[case]
    with Conn(gw) as c:
        assert_answer(ask(c, case, headers=fields + [("X-Custom", "1")]), case)
    (q,) = fb.data_requests()
    assert q.values("x-custom") == ["1"], f"an ordinary field was dropped: {q!r}"
    dropped = {k.lower() for k, _ in fields if k.lower() != "connection"}
    assert not dropped & q.names(), f"the backend received {dropped & q.names()}: {q!r}"
    for _, v in fields:
        if "secret" in v:
            assert v.encode() not in q.head, f"{v!r} reached the backend: {q.head!r}"
    assert "x-hop" not in (q.header("connection") or "").lower(), q


def test_hop_by_hop_response_fields_do_not_reach_the_client(env):
    gw, fb = env
    fb.handler = lambda conn, req: conn.send(answer(req, fb.name, headers=[
        ("Connection", "X-Back"), ("X-Back", "1"), ("Keep-Alive", "timeout=5"), ("X-Other", "2"),
    ]))
    with Conn(gw) as c:
        r = ask(c, "hop back")
        assert_answer(r, "hop back")
        assert r.headers.get("x-other") == "2", r
        assert "x-back" not in r.headers and "keep-alive" not in r.headers, r
        assert "x-back" not in (r.headers.get("connection") or "").lower(), r
        fb.handler = echo
        assert_answer(ask(c, "next"), "next")


# -- 7. the client address behind trusted proxies ----------------------------------------


FORWARDED = {
    "x-forwarded-for-two-lines": (
        [("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-For", "198.51.100.9")],
        "198.51.100.9",
    ),
    "x-forwarded-for-trusted-chain": ([("X-Forwarded-For", "203.0.113.7, 127.0.0.1")],
                                      "203.0.113.7"),
    "x-azure-clientip-twice": (
        [("X-Azure-ClientIP", "203.0.113.7"), ("X-Azure-ClientIP", "198.51.100.9")],
        "198.51.100.9",
    ),
}


def _client_ip(gw: agw.Gateway, fields: list[tuple[str, str]], marker: str) -> str:
    with Conn(gw) as c:
        r = ask(c, marker, headers=fields)
        assert_answer(r, marker)
    return gw.audit_for(r.headers.get("x-request-id"))["client_ip"]


@pytest.mark.parametrize("case", list(FORWARDED))
def test_client_ip_from_a_trusted_proxy_is_the_last_hops(env, trusted, case):
    fields, expected = FORWARDED[case]
    assert _client_ip(trusted, fields, case) == expected


@pytest.mark.parametrize("case", list(FORWARDED))
def test_forwarding_fields_are_ignored_without_trusted_proxies(env, case):
    gw, _ = env
    fields, _ = FORWARDED[case]
    assert _client_ip(gw, fields, case) == "127.0.0.1"


# -- 8. timeouts, and answers that are not HTTP for this request -------------------------


@pytest.fixture(scope="module")
def slow_heads(module_cluster):
    fb = FakeBackend("slow-heads")
    gw = module_cluster.gateway(fake_config([fb], server={"header_timeout_seconds": 2}))
    yield gw, fb
    fb.close()


@pytest.fixture(scope="module")
def idle(module_cluster):
    fb = FakeBackend("idle")
    gw = module_cluster.gateway(fake_config([fb], server={"idle_timeout_seconds": 2}))
    yield gw, fb
    fb.close()


def test_a_head_sent_too_slowly_gets_408_and_is_closed(slow_heads):
    gw, fb = slow_heads
    wire = chat(chat_bytes("slow head"))
    head_len = wire.index(b"\r\n\r\n") + 4  # ~150 bytes: 30 s at 5 bytes a second
    with Conn(gw) as c:
        first = time.monotonic()
        for i in range(head_len):
            try:
                c.send(wire[i:i + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
            readable, _, _ = select.select([c.sock], [], [], 0.2)
            if readable or time.monotonic() - first > 8:
                break
        r = c.read_response()
        elapsed = time.monotonic() - first
        assert_spec_error(r, 408, "RequestTimeout")
        assert r.closes(), r
        c.expect_closed()
    assert 1.8 <= elapsed < 6, f"408 after {elapsed:.1f}s with header_timeout_seconds: 2"
    assert fb.data_requests() == [], fb.data_requests()


def test_bad_heads_and_slow_bodies_are_counted_as_the_clients_errors(module_cluster):
    """SPEC §8: a head that is not HTTP/1.1 counts in downstream_errors_total{kind="malformed"};
    a body that stops short of its length is cut at request_timeout_seconds, audited as 408
    RequestTimeout and counted with kind="timeout" — never reaching the backend."""
    fb = FakeBackend("slow-bodies")
    gw = module_cluster.gateway(fake_config([fb], server={"request_timeout_seconds": 2}))
    try:
        def count(kind: str) -> float:
            return metric_value(scrape(gw), "aoai_gateway_downstream_errors_total",
                                kind=kind) or 0.0

        timeouts, malformed = count("timeout"), count("malformed")
        with Conn(gw) as c:
            c.send(b"\x16\x03\x01 not http\r\n\r\n")
            assert_spec_error(c.read_response(), 400, "InvalidRequestBody")
            c.expect_closed()
        wire = chat(chat_bytes("half a body"))
        with Conn(gw) as c:
            c.send(wire[:-5])
            c.expect_closed()
        line = gw.wait_audit(lambda l: l["status"] == 408, what="the 408 of a slow body")
        assert line["error_code"] == "RequestTimeout", line
        agw.wait_until(lambda: (count("malformed"), count("timeout")) == (malformed + 1, timeouts + 1),
                       5, "downstream_errors_total{malformed,timeout} +1 each")
        assert fb.data_requests() == [], fb.data_requests()
    finally:
        fb.close()


def test_a_head_completed_in_time_after_idling_is_served(slow_heads):
    gw, fb = slow_heads
    fb.clear()
    with Conn(gw) as c:
        time.sleep(2.5)  # idle before the first byte: the head's clock has not started
        wire = chat(chat_bytes("after idling"))
        for piece in (wire[:20], wire[20:60], wire[60:]):
            c.send(piece)
            time.sleep(0.3)
        assert_answer(c.read_response(), "after idling")
        time.sleep(2.5)  # idle between two requests of a kept-alive connection
        assert_answer(ask(c, "after idling again"), "after idling again")
    assert [q.marker for q in fb.data_requests()] == ["after idling", "after idling again"]


def _wait_closed(c: Conn) -> float:
    """Waits for the gateway to close `c` (nothing sent before); returns when it did."""
    c.expect_closed()
    return time.monotonic()


def test_an_idle_keep_alive_connection_is_closed(idle):
    gw, _ = idle
    with Conn(gw) as used, Conn(gw) as unused:
        opened = time.monotonic()
        assert_answer(ask(used, "before idling"), "before idling")
        answered = time.monotonic()
        # Both closes are awaited together: a thread for the connection that sent nothing.
        closed: dict[str, float | BaseException] = {}

        def wait_unused():
            try:
                closed["unused"] = _wait_closed(unused)
            except BaseException as exc:  # noqa: BLE001 - reported below
                closed["unused"] = exc

        t = threading.Thread(target=wait_unused)
        t.start()
        used_after = _wait_closed(used) - answered
        t.join(TIMEOUT + 2)
    assert 1.8 <= used_after <= 6, f"idle connection closed {used_after:.1f}s after its answer"
    got = closed.get("unused")
    if isinstance(got, BaseException):
        raise got
    assert got is not None, "the connection that sent nothing was not closed"
    assert 1.8 <= got - opened <= 6, f"unused connection closed after {got - opened:.1f}s"


def test_a_connection_with_a_request_every_second_stays_open(idle):
    gw, _ = idle
    with Conn(gw) as c:
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < 4.5:  # longer than twice the idle timeout
            r = ask(c, f"tick {i}")
            assert_answer(r, f"tick {i}")
            assert not r.closes(), r
            i += 1
            time.sleep(1.0)
        assert_answer(ask(c, "last"), "last")


def test_a_101_answer_to_a_post_is_a_bad_gateway(scripted):
    inner = response(200, answer_body("SMUGGLED", "upgrade"))

    def handler(conn: BackendConn, req: Received) -> None:
        if req.marker == "upgrade me":
            conn.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\n\r\n" + inner)
        else:
            echo(conn, req)

    gw, (fb,) = scripted("single", ["solo"])
    fb.handler = handler
    with Conn(gw) as c:
        r = ask(c, "upgrade me")
        assert_spec_error(r, 502, "BadGateway")
        assert b"SMUGGLED" not in r.body, r
    with Conn(gw) as c:
        assert_answer(ask(c, "after"), "after")
        c.expect_open(0.2)
    data = fb.data_requests()
    assert [q.marker for q in data] == ["upgrade me", "after"], data
    assert data[1].conn != data[0].conn, f"the upgraded connection was reused: {data!r}"


def test_a_100_continue_before_the_answer_is_passed_over(env):
    gw, fb = env
    fb.handler = lambda conn, req: conn.send(
        b"HTTP/1.1 100 Continue\r\n\r\n" + answer(req, fb.name)
    )
    with Conn(gw) as c:
        assert_answer(ask(c, "continue"), "continue")
        fb.handler = echo
        assert_answer(ask(c, "next"), "next")
        c.expect_open(0.2)


def test_an_answer_with_both_framings_is_a_bad_gateway_and_its_connection_dropped(scripted):
    body = answer_body("BOTH", "both")
    framed = chunked(body, [16])

    def handler(conn: BackendConn, req: Received) -> None:
        if req.marker == "both framings":
            conn.send(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n" + framed
            )
        else:
            echo(conn, req)

    gw, (fb,) = scripted("single", ["solo"])
    fb.handler = handler
    with Conn(gw) as c:
        r = ask(c, "both framings")
        assert_spec_error(r, 502, "BadGateway")
        assert b"BOTH" not in r.body, r
        assert_answer(ask(c, "after"), "after")
        c.expect_open(0.2)
    data = fb.data_requests()
    assert [q.marker for q in data] == ["both framings", "after"], data
    assert data[1].conn != data[0].conn, f"the connection was reused: {data!r}"


# -- found by fuzzing (fuzz/README.md, F2/F3 and O2) -------------------------------------


@pytest.mark.parametrize("connection", ["keep-alive, close", "close, keep-alive"])
def test_http10_keep_alive_with_close_closes_after_the_answer(env, connection):
    """`close` wins over `keep-alive` in HTTP/1.0 as in 1.1: the request behind is not read."""
    gw, fb = env
    wire = request(CHAT, chat_bytes("http/1.0 close wins"), version="1.0",
                   headers=[("Connection", connection)])
    with Conn(gw) as c:
        c.send(wire + SMUGGLED)
        assert_answer(c.read_response(), "http/1.0 close wins")
        c.expect_closed()
    assert [q.marker for q in fb.data_requests()] == ["http/1.0 close wins"], fb.data_requests()


def test_an_absolute_form_target_keeps_its_query_and_ends_its_authority_at_a_fragment(env):
    """`http://host?q` is path `/` with query `q`; `http://host#x/openai/...` is path `/`."""
    gw, fb = env
    with Conn(gw) as c:
        # The deployment path after `#` is the fragment: no route, nothing forwarded.
        c.send(request(f"http://gateway.test#x{CHAT}", chat_bytes("fragment")))
        r = c.read_response()
        assert r.status_code == 404, r
    with Conn(gw) as c:
        # An absolute-form target with its query: the api-version reaches the backend.
        c.send(request(f"http://gateway.test{CHAT}", chat_bytes("absolute")))
        assert_answer(c.read_response(), "absolute")
    (q,) = fb.data_requests()
    assert "api-version=" in q.target, q
