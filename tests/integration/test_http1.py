"""HTTP/1.x on the wire: raw sockets against the gateway's own codec (keep-alive, pipelining,
chunked request bodies, `Expect: 100-continue`, HTTP/1.0, request-smuggling shapes, garbage
and oversized heads, bodies over the limit, unread bodies, and response framing).

Every test talks bytes to the listener over a plain `socket`, with a timeout so that a gateway
that waits for bytes that never come fails the test instead of hanging it."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

import agw
from agw import OTHER_KEY
from h1util import CHAT, Conn, Resp, assert_spec_error, chat, chat_bytes, chunked, request

MAX_BODY = 65536
REPLY = "Hello from eastus-a."


@pytest.fixture(scope="module")
def env(module_cluster):
    m = module_cluster.mock("eastus-a")
    cfg = agw.single(m, server={"max_request_body_bytes": MAX_BODY})
    gw = module_cluster.gateway(cfg)
    return gw, m


def assert_chat_ok(r: Resp) -> dict:
    assert r.status_code == 200, r
    body = r.json()
    assert body["choices"][0]["message"]["content"] == REPLY, body
    assert r.headers.get("x-request-id"), r
    return body


def assert_connection_still_serves(c: "Conn") -> None:
    """The connection stays open and answers the next request."""
    c.send(chat())
    assert_chat_ok(c.read_response())


# -- 1. keep-alive -----------------------------------------------------------------------


def test_keep_alive_serves_several_requests_on_one_connection(fresh):
    gw, m = fresh
    with Conn(gw) as c:
        ids = []
        for _ in range(3):
            c.send(chat())
            r = c.read_response()
            assert_chat_ok(r)
            assert not r.closes(), f"the gateway closes a keep-alive connection: {r!r}"
            ids.append(r.headers.get("x-request-id"))
        c.expect_open()
        # and still usable after a pause
        assert_connection_still_serves(c)
    assert len(set(ids)) == 3, ids
    assert len(m.data_requests()) == 4


def test_connection_close_from_the_client_closes(fresh):
    gw, m = fresh
    with Conn(gw) as c:
        assert_connection_still_serves(c)
        c.send(chat(headers=[("Connection", "close")]))
        r = c.read_response()
        assert_chat_ok(r)
        assert r.closes(), f"no `connection: close` on the answer to a closing request: {r!r}"
        c.expect_closed()


def test_connection_close_is_honoured_among_other_options(fresh):
    gw, _ = fresh
    with Conn(gw) as c:
        c.send(chat(headers=[("Connection", "TE, Close")]))
        r = c.read_response()
        assert_chat_ok(r)
        assert r.closes(), r
        c.expect_closed()


def test_request_on_an_idle_connection_as_shutdown_begins_is_answered(cluster):
    """A kept-alive client that sends just after SIGTERM (or the SIGQUIT of an upgrade) gets
    its answer, with `connection: close`, rather than a connection closed under it."""
    import signal

    m = cluster.mock("eastus-a")
    gw = cluster.gateway(agw.single(m))
    with Conn(gw) as c:
        assert_connection_still_serves(c)
        gw.process.send_signal(signal.SIGTERM)
        cluster.gateways.remove(gw)
        time.sleep(0.1)  # the connection is idle when the shutdown begins
        c.send(chat())
        r = c.read_response()
        assert_chat_ok(r)
        assert r.closes(), f"no `connection: close` while shutting down: {r!r}"
        c.expect_closed()
    assert gw.proc.proc.wait(timeout=30) == 0
    assert len(m.data_requests()) == 2


# -- 2. pipelining -----------------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order(fresh):
    gw, m = fresh
    # prompt_tokens = len(content) / 4: tells the answers apart
    contents = ["a" * 40, "b" * 400, "c" * 200]
    wire = b"".join(chat(chat_bytes(t)) for t in contents)
    with Conn(gw) as c:
        c.send(wire)
        resps = [c.read_response() for _ in contents]
        for r in resps:
            assert_chat_ok(r)
            assert not r.closes(), r
        assert [r.json()["usage"]["prompt_tokens"] for r in resps] == [10, 100, 50]
        ids = [r.headers.get("x-request-id") for r in resps]
        assert len(set(ids)) == 3, ids
        c.expect_open()
    seen = m.data_requests()
    assert [q["body_len"] for q in seen] == [len(chat_bytes(t)) for t in contents]


def test_pipelined_request_after_a_chunked_body(fresh):
    gw, m = fresh
    first = chat_bytes("first " * 20)
    wire = (
        request(CHAT, b"", length=False, headers=[("Transfer-Encoding", "chunked")])
        + chunked(first, [7, 30])
        + chat(chat_bytes("b" * 400), headers=[("Connection", "close")])
    )
    with Conn(gw) as c:
        c.send(wire)
        r1 = c.read_response()
        assert_chat_ok(r1)
        r2 = c.read_response()
        assert_chat_ok(r2)
        assert r2.json()["usage"]["prompt_tokens"] == 100
        assert r2.closes()
        c.expect_closed()
    assert [q["body_len"] for q in m.data_requests()] == [len(first), len(chat_bytes("b" * 400))]


# -- 3. chunked request bodies -----------------------------------------------------------


def test_chunked_body_with_extensions_and_trailer_reaches_the_backend_whole(fresh):
    gw, m = fresh
    body = chat_bytes("A chunked request body, sent in several pieces. " * 20)
    framed = chunked(
        body,
        [1, 16, 255, 1000],
        ext=["", ";foo=bar", ';name="quoted value"', ";a;b=c"],
        trailers=["X-Trailer: yes", "X-Other: 1"],
    )
    with Conn(gw) as c:
        c.send(request(CHAT, b"", length=False, headers=[("Transfer-Encoding", "chunked")]) + framed)
        r = c.read_response()
        assert_chat_ok(r)
        assert not r.closes(), r
        assert_connection_still_serves(c)
    seen = m.data_requests()
    assert len(seen) == 2, seen
    q = seen[0]
    assert q["body_len"] == len(body), q
    assert q["body_sha256"] == hashlib.sha256(body).hexdigest(), "the body changed on the way"
    assert q["headers"].get("content-length") == str(len(body)), q["headers"]
    assert "transfer-encoding" not in q["headers"], q["headers"]
    assert "x-trailer" not in q["headers"] and "x-other" not in q["headers"]


def test_chunked_body_sent_in_pieces_with_pauses(fresh):
    """Chunk-size lines and data split over several TCP writes."""
    gw, m = fresh
    body = chat_bytes("pieces " * 50)
    framed = chunked(body, [10, 100])
    with Conn(gw) as c:
        c.send(request(CHAT, b"", length=False, headers=[("Transfer-Encoding", "chunked")]))
        for i in range(0, len(framed), 7):
            c.send(framed[i:i + 7])
            if i % 70 == 0:
                time.sleep(0.01)
        assert_chat_ok(c.read_response())
    q = m.data_requests()[0]
    assert q["body_sha256"] == hashlib.sha256(body).hexdigest()


# -- 4. Expect: 100-continue -------------------------------------------------------------


def test_expect_100_continue(fresh):
    gw, m = fresh
    body = chat_bytes("Sent after 100 Continue.")
    head = request(CHAT, b"", headers=[("Expect", "100-continue")])
    head = head.replace(b"Content-Length: 0", f"Content-Length: {len(body)}".encode())
    with Conn(gw) as c:
        c.send(head)
        interim = c.read_response()
        assert interim.status_code == 100, f"expected 100 Continue, got {interim!r}"
        assert interim.version == "HTTP/1.1"
        assert m.data_requests() == [], "the backend was called before the body came"
        c.send(body)
        r = c.read_response()
        assert_chat_ok(r)
        assert not r.closes(), r
        assert_connection_still_serves(c)
    q = m.data_requests()[0]
    assert q["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert "expect" not in q["headers"], q["headers"]


def test_expect_100_continue_with_a_chunked_body(fresh):
    gw, m = fresh
    body = chat_bytes("Chunked after 100 Continue.")
    with Conn(gw) as c:
        c.send(request(CHAT, b"", length=False,
                       headers=[("Transfer-Encoding", "chunked"), ("Expect", "100-continue")]))
        assert c.read_response().status_code == 100
        c.send(chunked(body, [5, 5]))
        assert_chat_ok(c.read_response())
    assert m.data_requests()[0]["body_len"] == len(body)


def test_expect_100_continue_refused_request_gets_no_100(fresh):
    """A request refused on its head is answered at once, without a 100 Continue, and the
    connection is closed (its body was never read)."""
    gw, m = fresh
    head = request(CHAT, b"", key=OTHER_KEY, headers=[("Expect", "100-continue")])
    head = head.replace(b"Content-Length: 0", b"Content-Length: 100")
    with Conn(gw) as c:
        c.send(head)
        r = c.read_response()
        assert_spec_error(r, 401, "InvalidCredential")
        assert r.closes(), r
        c.expect_closed()
    assert m.data_requests() == []


# -- 5. HTTP/1.0 -------------------------------------------------------------------------


def test_http10_request_is_answered_and_closed(fresh):
    gw, _ = fresh
    with Conn(gw) as c:
        c.send(chat(version="1.0"))
        r = c.read_response()
        assert_chat_ok(r)
        assert "transfer-encoding" not in r.headers, r
        assert r.closes(), f"no `connection: close` for an HTTP/1.0 client: {r!r}"
        c.expect_closed()


def test_http10_stream_is_close_delimited_sse(fresh):
    gw, _ = fresh
    with Conn(gw) as c:
        c.send(chat(chat_bytes(stream=True), version="1.0"))
        r = c.read_response()
        assert r.status_code == 200, r
        assert (r.headers.get("content-type") or "").startswith("text/event-stream"), r
        assert "transfer-encoding" not in r.headers, f"chunked to an HTTP/1.0 client: {r!r}"
        assert "content-length" not in r.headers, r
        # read_response read to the close: nothing else can follow
        c.expect_closed()
    text = r.text
    assert text.startswith("data: "), f"not a bare SSE body (chunk framing?): {text[:80]!r}"
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    data = agw.sse_data(text)
    content = "".join(
        (json.loads(d)["choices"][0].get("delta") or {}).get("content") or ""
        for d in data[:-1]
    )
    assert content == REPLY, text


# -- 6. request smuggling shapes ---------------------------------------------------------


def _smuggle_cases():
    body = chat_bytes()
    n = len(body)
    ch = chunked(body, [10])
    hdr = lambda *h: request(CHAT, b"", length=False, headers=list(h))  # noqa: E731
    return {
        "cl-and-te": hdr(("Content-Length", str(len(ch))), ("Transfer-Encoding", "chunked")) + ch,
        "te-and-cl": hdr(("Transfer-Encoding", "chunked"), ("Content-Length", str(len(ch)))) + ch,
        "two-content-lengths": hdr(("Content-Length", str(n)), ("Content-Length", str(n + 5)))
        + body + b"     ",
        "content-length-list": hdr(("Content-Length", f"{n}, {n + 5}")) + body + b"     ",
        "te-gzip-chunked": hdr(("Transfer-Encoding", "gzip, chunked")) + ch,
        "te-chunked-twice": hdr(("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked"))
        + ch,
        "te-identity": hdr(("Transfer-Encoding", "identity"), ("Content-Length", str(n))) + body,
        "content-length-abc": hdr(("Content-Length", "abc")) + body,
        "content-length-plus": hdr(("Content-Length", f"+{n}")) + body,
        "content-length-hex": hdr(("Content-Length", f"0x{n:x}")) + body,
    }


SMUGGLE = _smuggle_cases()


@pytest.mark.parametrize("case", list(SMUGGLE))
def test_smuggling_shapes_are_refused_and_close(fresh, case):
    gw, m = fresh
    with Conn(gw) as c:
        c.send(SMUGGLE[case])
        r = c.read_response()
        assert_spec_error(r, 400, "InvalidRequestBody")
        assert r.closes(), f"a refused request's connection stays open: {r!r}"
        c.expect_closed()
    assert m.data_requests() == [], "a smuggling-shaped request reached the backend"
    line = gw.audit_for(r.headers.get("x-request-id"))
    assert line["status"] == 400 and line["error_code"] == "InvalidRequestBody", line


def test_a_malformed_chunked_body_is_400_and_closes(fresh):
    gw, m = fresh
    body = chat_bytes()
    bad = b"5\r\n" + body[:5] + b"XX" + body[5:]  # chunk data not followed by CRLF
    with Conn(gw) as c:
        c.send(request(CHAT, b"", length=False, headers=[("Transfer-Encoding", "chunked")]) + bad)
        r = c.read_response()
        assert_spec_error(r, 400, "InvalidRequestBody")
        assert r.closes(), r
        c.expect_closed()
    assert m.data_requests() == []


# -- 7. garbage and oversized heads ------------------------------------------------------


def _assert_malformed_head_answer(r: Resp):
    assert r.status_code == 400, r
    assert (r.headers.get("content-type") or "").startswith("application/json"), r
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"].get("code") == "InvalidRequestBody", body
    assert isinstance(body["error"].get("message"), str) and body["error"]["message"].strip()
    assert r.closes(), f"no `connection: close` on a 400 for a broken head: {r!r}"


BAD_HEADS = {
    "tls-hello": b"\x16\x03\x01hello\r\n\r\n",
    "binary": bytes(range(1, 32)) + b"\r\n\r\n",
    "no-version": b"GET /healthz\r\n\r\n",
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "space-in-header-name": b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
    "huge-header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n",
    "many-headers": b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    + b"".join(f"X-H{i}: v\r\n".encode() for i in range(200)) + b"\r\n",
}


@pytest.mark.parametrize("case", list(BAD_HEADS))
def test_bad_heads_get_400_json_and_close_and_the_gateway_keeps_serving(fresh, case):
    gw, m = fresh
    with Conn(gw) as c:
        c.send(BAD_HEADS[case])
        r = c.read_response()
        if case == "http2-preface":
            # A cleartext HTTP/2 preface is not HTTP/1.1 either (no h2c here).
            assert r.status_code in (400, 505), r
            assert r.closes(), r
        else:
            _assert_malformed_head_answer(r)
        c.expect_closed()
    with Conn(gw) as c:
        assert_connection_still_serves(c)
    assert len(m.data_requests()) == 1


def test_an_endless_head_is_refused_at_64k(fresh):
    """A head that reaches 64 KiB without its end is refused, not waited for."""
    gw, _ = fresh
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
    head += b"a" * (64 * 1024 - len(head))
    with Conn(gw) as c:
        c.send(head)
        r = c.read_response()
        _assert_malformed_head_answer(r)
        c.expect_closed()


def test_a_head_just_under_64k_is_served(fresh):
    gw, _ = fresh
    pad = 60 * 1024
    with Conn(gw) as c:
        c.send(chat(headers=[("X-Pad", "p" * pad)]))
        assert_chat_ok(c.read_response())


@pytest.mark.parametrize("case", ["tls-hello", "huge-header"])
def test_answers_to_bad_heads_carry_x_request_id(fresh, case):
    """SPEC §8: every response carries `x-request-id`."""
    gw, _ = fresh
    with Conn(gw) as c:
        c.send(BAD_HEADS[case])
        r = c.read_response()
    assert r.status_code == 400, r
    assert r.headers.get("x-request-id"), f"a 400 without x-request-id: {r!r}"


# -- 8. body over the limit --------------------------------------------------------------


def test_chunked_body_over_the_limit_is_413_and_closes(fresh):
    gw, m = fresh
    body = chat_bytes("x" * (MAX_BODY + 10_000))
    framed = chunked(body, [8192] * 20)
    with Conn(gw) as c:
        try:
            c.send(request(CHAT, b"", length=False, headers=[("Transfer-Encoding", "chunked")])
                   + framed)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway may stop reading early; its answer is what counts
        r = c.read_response()
        assert_spec_error(r, 413, "RequestTooLarge")
        assert r.closes(), f"the rest of the refused body would be read as a request: {r!r}"
        c.expect_closed()
    assert m.data_requests() == []


def test_chunked_body_at_the_limit_is_served(fresh):
    gw, m = fresh
    prefix = chat_bytes("")
    body = chat_bytes("y" * (MAX_BODY - len(prefix)))
    assert len(body) == MAX_BODY
    with Conn(gw) as c:
        c.send(request(CHAT, b"", length=False, headers=[("Transfer-Encoding", "chunked")])
               + chunked(body, [4096] * 20))
        assert_chat_ok(c.read_response())
    assert m.data_requests()[0]["body_len"] == MAX_BODY


def test_declared_length_over_the_limit_is_413_and_closes(fresh):
    gw, m = fresh
    head = request(CHAT, b"")
    head = head.replace(b"Content-Length: 0", f"Content-Length: {MAX_BODY + 1}".encode())
    with Conn(gw) as c:
        c.send(head)  # the body is never sent: the declared length is enough to refuse
        r = c.read_response()
        assert_spec_error(r, 413, "RequestTooLarge")
        assert r.closes(), r
        c.expect_closed()
    assert m.data_requests() == []


# -- 9. unread bodies --------------------------------------------------------------------


# A body that is itself a request: if the gateway took it for the next request, a second
# answer would follow the 401.
INNER = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_unread_body_of_a_refused_request_closes_the_connection(fresh, framing):
    gw, m = fresh
    if framing == "content-length":
        wire = request(CHAT, INNER, key=OTHER_KEY)
    else:
        wire = request(CHAT, b"", key=OTHER_KEY, length=False,
                       headers=[("Transfer-Encoding", "chunked")]) + chunked(INNER, [10])
    with Conn(gw) as c:
        c.send(wire)
        r = c.read_response()
        assert_spec_error(r, 401, "InvalidCredential")
        assert r.closes(), f"a 401 with its body unread keeps the connection: {r!r}"
        c.expect_closed()
    assert m.data_requests() == []


@pytest.mark.parametrize(
    "make_request, status, code",
    [
        (lambda: request(CHAT, None, key=OTHER_KEY), 401, "InvalidCredential"),
        # A 400 for a body that was read whole (not JSON) leaves the connection usable.
        (lambda: chat(b"this is { not json"), 400, "InvalidRequestBody"),
    ],
    ids=["refused-before-the-body", "refused-after-reading-the-body"],
)
def test_refused_request_keeps_the_connection(fresh, make_request, status, code):
    gw, _ = fresh
    with Conn(gw) as c:
        c.send(make_request())
        r = c.read_response()
        assert_spec_error(r, status, code)
        assert not r.closes(), r
        assert_connection_still_serves(c)


# -- 10. response framing ----------------------------------------------------------------


def test_plain_response_content_length_is_the_body_length(fresh):
    gw, _ = fresh
    with Conn(gw) as c:
        c.send(chat(headers=[("Connection", "close")]))
        raw = b""
        try:
            while True:
                chunk = c.sock.recv(65536)
                if not chunk:
                    break
                raw += chunk
        except ConnectionResetError:
            pass
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, raw[:500]
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 200"), lines[0]
    cls = [l.split(":", 1)[1].strip() for l in lines[1:] if l.lower().startswith("content-length:")]
    assert len(cls) == 1, lines
    assert not any(l.lower().startswith("transfer-encoding:") for l in lines), lines
    assert int(cls[0]) == len(body), f"content-length {cls[0]} but {len(body)} body bytes"
    assert json.loads(body)["choices"][0]["message"]["content"] == REPLY


def test_streamed_response_is_chunked_and_ends_with_done(fresh):
    gw, _ = fresh
    with Conn(gw) as c:
        c.send(chat(chat_bytes(stream=True)))
        r = c.read_response()
        assert r.status_code == 200, r
        assert (r.headers.get("transfer-encoding") or "").lower() == "chunked", r
        assert "content-length" not in r.headers, r
        assert (r.headers.get("content-type") or "").startswith("text/event-stream"), r
        assert r.wire.endswith(b"0\r\n\r\n"), r.wire[-50:]
        assert r.text.endswith("data: [DONE]\n\n"), r.text[-200:]
        data = agw.sse_data(r.text)
        assert data[-1] == "[DONE]"
        content = "".join(
            (json.loads(d)["choices"][0].get("delta") or {}).get("content") or ""
            for d in data[:-1]
        )
        assert content == REPLY
        assert not r.closes(), r
        # the chunked body ended exactly: the next answer starts right after it
        assert_connection_still_serves(c)


def test_head_of_healthz_has_no_body(fresh):
    gw, _ = fresh
    with Conn(gw) as c:
        c.send(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        r = c.read_response(head_request=True)
        assert r.status_code in (200, 503), r
        # no body bytes follow the head: the next answer starts right after it
        assert_connection_still_serves(c)
