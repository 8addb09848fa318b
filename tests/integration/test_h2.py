"""HTTP/2 (ALPN h2 on a TLS listener): many streams of one connection (issue 18, goal 4).

The answers of the streams of one connection are written together (front/h2_io.rs: frames of
several streams share a TLS record and a write), so these check what a client of such a
connection sees: every stream its own whole answer, and a stream cut short by its client
leaving its siblings alone. curl multiplexes the transfers of one `--parallel` run over one
HTTP/2 connection (`%{num_connects}` tells); the `h2` library sends what curl cannot (a CONNECT).
"""

from __future__ import annotations

import json
import subprocess

import pytest

import agw
from agw import KEY
from pki import Pki

DEPLOYMENT = "gpt-4o"
CHAT = agw.chat_path(DEPLOYMENT)
STREAMS = 32
# One line per transfer: status, HTTP version, new connections, body bytes, two headers.
WRITE_OUT = ("%{http_code} %{http_version} %{num_connects} %{size_download} "
             "%header{content-length} %header{x-request-id}\\n")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def backend(module_cluster):
    return module_cluster.mock("h2-east", stream_chunks=10)


class H2Gateway:
    """The gateway on its TLS listener, and the CA that signed its certificate."""

    def __init__(self, gw: agw.Gateway, ca: str):
        self.gw, self.ca = gw, ca

    def transfer(self, body: dict, out, max_time: float | None = None) -> list[str]:
        """curl's arguments for one transfer of a `--parallel` run."""
        args = ["--http2", "--cacert", self.ca, "-H", f"api-key: {KEY}",
                "-H", "content-type: application/json", "--data", json.dumps(body),
                "-o", str(out), "-w", WRITE_OUT]
        if max_time is not None:
            args += ["--max-time", str(max_time)]
        return args + [f"https://{self.gw.listeners[0]}{CHAT}"]


@pytest.fixture(scope="module")
def h2(module_cluster, pki, backend) -> H2Gateway:
    listener = {"address": f"127.0.0.1:{agw.free_port()}",
                "tls": {"certificate": str(pki.server.chain), "private_key": str(pki.server.key)}}
    cfg = agw.single(backend, deployment=DEPLOYMENT, server={"listeners": [listener]},
                     health_checks={"interval_seconds": 3600})
    return H2Gateway(module_cluster.gateway(cfg), str(pki.server_ca.crt))


def parallel(transfers: list[list[str]], timeout: float = 60) -> tuple[list[list[str]], str]:
    """Runs the transfers at once (`--next` between them); one write-out line each."""
    argv = ["curl", "-sS", "--parallel", "--parallel-max", str(len(transfers))]
    for i, t in enumerate(transfers):
        argv += (["--next"] if i else []) + t
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=agw.clean_env())
    return [l.split(" ") for l in r.stdout.splitlines() if l.strip()], r.stderr


def test_streams_of_one_connection_each_get_their_own_whole_answer(h2, backend, tmp_path):
    """32 chat requests multiplexed on one connection, answered in the same few passes of the
    event loop (their frames coalesced): each answer is whole, framed by its own
    `content-length`, under its own request id, and audited as served."""
    backend.clear()
    outs = [tmp_path / f"{i}.json" for i in range(STREAMS)]
    lines, err = parallel([h2.transfer(agw.chat_body(f"Hello {i}."), o)
                           for i, o in enumerate(outs)])
    assert len(lines) == STREAMS, (lines, err)
    assert [l[:2] for l in lines] == [["200", "2"]] * STREAMS, lines
    assert sum(int(l[2]) for l in lines) == 1, f"not one connection: {lines}"
    for l in lines:
        assert l[3] == l[4], l   # the bytes received are the declared length
    bodies = [json.loads(o.read_bytes()) for o in outs]
    for b in bodies:
        assert b["object"] == "chat.completion" and b["choices"][0]["message"]["content"], b
    ids = [l[5] for l in lines]
    assert len(set(ids)) == STREAMS, ids
    for rid in ids:
        line = h2.gw.audit_for(rid)
        assert (line["status"], line["deployment"]) == (200, DEPLOYMENT), line
    assert len(backend.data_requests()) == STREAMS


def test_a_stream_cut_short_leaves_its_siblings_whole(h2, backend, tmp_path):
    """Three streams on one connection, answers streamed slowly: the client gives up on one
    after 1 s (its stream is reset); the two beside it still receive every event to
    `[DONE]`. The cut one is audited as 499, the others as 200."""
    backend.faults(chunk_delay_ms=250)
    try:
        body = agw.chat_body("Stream to me.", stream=True)
        outs = [tmp_path / f"{n}.sse" for n in ("a", "cut", "b")]
        lines, err = parallel([h2.transfer(body, outs[0]),
                               h2.transfer(body, outs[1], max_time=1),
                               h2.transfer(body, outs[2])])
        assert len(lines) == 3, (lines, err)
        assert sum(int(l[2]) for l in lines) == 1, f"not one connection: {lines}"
        by_id = {l[5]: l for l in lines}
        whole = [agw.sse_data(outs[i].read_text()) for i in (0, 2)]
        for events in whole:
            assert events[-1] == "[DONE]", events
            assert "again" in "".join(events), events   # all ten pieces
        cut = agw.sse_data(outs[1].read_text())
        assert "[DONE]" not in cut, cut
        statuses = sorted(h2.gw.audit_for(rid)["status"] for rid in by_id)
        assert statuses == [200, 200, 499], statuses
    finally:
        backend.faults(chunk_delay_ms=0)


class _H2Answer:
    """One stream's answer, read with the `h2` library: status, headers, body."""

    def __init__(self, headers: list[tuple[bytes, bytes]], body: bytes):
        self.headers = {k.decode(): v.decode() for k, v in headers}
        self.status_code = int(self.headers.pop(":status"))
        self.body = body
        self.text = body.decode(errors="replace")


def _h2_exchange(h2gw: H2Gateway, requests: list[list[tuple[str, str]]]) -> list[_H2Answer]:
    """Sends the requests (header lists) as streams of one fresh HTTP/2 connection, one after
    the other, and returns their answers."""
    import socket
    import ssl

    import h2.config
    import h2.connection
    import h2.events

    host, port = h2gw.gw.listeners[0].rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=h2gw.ca)
    ctx.set_alpn_protocols(["h2"])
    answers = []
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as s:
        assert s.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        s.sendall(conn.data_to_send())
        for req in requests:
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, req, end_stream=True)
            s.sendall(conn.data_to_send())
            headers, body, ended = None, b"", False
            while not ended:
                data = s.recv(65536)
                assert data, "the gateway closed the connection"
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                        headers = ev.headers
                    elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                        body += ev.data
                        conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                    elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                        ended = True
                    elif isinstance(ev, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                        raise AssertionError(f"stream {sid} not answered: {ev!r}")
                s.sendall(conn.data_to_send())
            assert headers is not None, f"stream {sid} ended without a head"
            answers.append(_H2Answer(headers, body))
    return answers


def test_connect_over_h2_is_refused_by_the_gateway_and_the_connection_serves_on(h2, backend):
    """HTTP/2 CONNECT (RFC 9113 §8.5: `:method CONNECT` and `:authority`, no `:path`) is not
    something the gateway tunnels: the stream gets the product's own 404
    OperationNotSupported error body with a request id, audited, and nothing reaches the
    backend; the next stream of the same connection is served as usual."""
    backend.clear()
    authority = f"{h2.gw.listeners[0]}"
    connect = [(":method", "CONNECT"), (":authority", "backend.example:443"), ("api-key", KEY)]
    models = [(":method", "GET"), (":scheme", "https"), (":authority", authority),
              (":path", "/openai/models?api-version=2024-10-21"), ("api-key", KEY)]
    refused, served = _h2_exchange(h2, [connect, models])
    agw.assert_error(refused, 404, "OperationNotSupported")
    line = h2.gw.audit_for(refused.headers["x-request-id"])
    assert line["status"] == 404 and line["error_code"] == "OperationNotSupported", line
    assert served.status_code == 200, served.text[:300]
    assert "data" in json.loads(served.body), served.text[:300]
    assert not backend.data_requests(), "a CONNECT reached the backend"
