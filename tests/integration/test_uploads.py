"""Streamed uploads (SPEC §11 files, §13 multipart media; issue 14).

A multipart form larger than 64 KiB goes to the backend as it arrives: the gateway holds only
the start that names the deployment (`model`, or `purpose` and a batch file's first line), then
checks and rewrites the rest on the way. Two aoai-mock processes play two resources; each stores
the files it is sent and records each request's headers, so the tests see the upstream framing
(`content-length` or `transfer-encoding: chunked`) and the stored content. The gateway's memory
is read from /proc (VmRSS before, VmHWM after): a large file must not sit in it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import httpx
import openai
import pytest

import agw
from agw import KEY

UPSTREAM = {"east": "gpt-4o-east", "west": "gpt-4o-west"}
BOUNDARY = "agw-upload-test-boundary"
MiB = 1024 * 1024


class Env(agw.TwoResources):

    def uploads(self) -> list[tuple[str, dict]]:
        return [(m.name, q) for m in self.mocks for q in m.data_requests()
                if q["method"] == "POST" and q["path"].endswith("/files")]


@pytest.fixture(scope="module")
def env(module_cluster) -> Env:
    east = module_cluster.mock("east")
    west = module_cluster.mock("west")
    cfg = agw.make_config(
        deployments={
            "batch-4o": [agw.member("east", UPSTREAM["east"]), agw.member("west", UPSTREAM["west"])],
            "whisper": [agw.member("east", "whisper-east")],
        },
        backends=[agw.backend("east", east), agw.backend("west", west, region="westus")],
        server={"request_timeout_seconds": 180},
        # A debug-built mock busy reading 100 MB must not be taken for down.
        health_checks={"interval_seconds": 2, "timeout_seconds": 2, "failures_before_down": 30},
    )
    return Env(module_cluster.gateway(cfg), east, west)


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def batch_line(model: str, i: int, pad: int = 300) -> bytes:
    return json.dumps({
        "custom_id": f"req-{i}", "method": "POST", "url": "/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": f"Question {i} " + "x" * pad}]},
    }).encode() + b"\n"


def form_head(purpose: str = "batch", filename: str = "big.jsonl") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()


FORM_TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()


def post_chunked(gw: agw.Gateway, parts, path: str = "/openai/v1/files") -> httpx.Response:
    """POSTs a multipart body from a generator: httpx sends it chunked, as it is made."""
    with agw.http_client(timeout=180) as c:
        return c.post(gw.url + path, content=parts,
                      headers={"api-key": KEY,
                               "content-type": f"multipart/form-data; boundary={BOUNDARY}"})


def stored_lines(env: Env, file_id: str) -> list[dict]:
    data = agw.openai_client(env.gw, timeout=180).files.content(file_id).content
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def test_a_large_batch_file_streams_through_with_bounded_memory_and_is_rewritten(env):
    env.clear()
    pid = env.gw.process.pid
    n = 240_000  # about 100 MB of JSONL
    data = b"".join(batch_line("batch-4o", i) for i in range(n))
    assert len(data) > 90 * MiB
    before = status_kib(pid, "VmRSS")
    f = agw.openai_client(env.gw, timeout=180).files.create(
        file=("big.jsonl", io.BytesIO(data)), purpose="batch")
    peak = status_kib(pid, "VmHWM")
    growth_mib = (peak - before) / 1024
    print(f"peak RSS growth {growth_mib:.1f} MiB for {len(data) / MiB:.0f} MiB")
    assert growth_mib < 32, f"the gateway's peak RSS grew {growth_mib:.0f} MiB for a {len(data) / MiB:.0f} MiB file"
    [(where, q)] = env.uploads()
    # The rewritten lines change length: the member gets the body chunked.
    assert q["headers"].get("transfer-encoding") == "chunked", q["headers"]
    assert "content-length" not in q["headers"]
    del data
    stored = stored_lines(env, f.id)
    assert len(stored) == n
    assert {line["body"]["model"] for line in stored} == {UPSTREAM[where]}
    assert [stored[0]["custom_id"], stored[-1]["custom_id"]] == ["req-0", f"req-{n - 1}"]


@pytest.mark.parametrize("bad", ["not json at all", "other-deployment"])
def test_a_bad_line_deep_in_a_streamed_file_is_400_and_nothing_is_stored(env, bad):
    env.clear()
    n = 20_000  # about 8 MB; the bad line near the end
    bad_line = (b"{not json\n" if bad == "not json at all"
                else batch_line("other-deployment", n))

    def parts():
        yield form_head()
        for start in range(0, n, 1000):
            yield b"".join(batch_line("batch-4o", i) for i in range(start, start + 1000))
        yield bad_line
        yield batch_line("batch-4o", n + 1)
        yield FORM_TAIL

    r = post_chunked(env.gw, parts())
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "InvalidRequestBody"
    assert "batch file" in err["message"], err
    # The member got an unfinished request and stored nothing.
    assert env.uploads() == []
    assert all(m.data_requests() == [] for m in env.mocks)


def test_a_chunked_client_upload_is_checked_and_rewritten_as_it_streams(env):
    env.clear()
    n = 6_000  # about 2.4 MB, sent as it is generated

    def parts():
        yield form_head()
        for start in range(0, n, 500):
            yield b"".join(batch_line("batch-4o", i) for i in range(start, start + 500))
        yield FORM_TAIL

    r = post_chunked(env.gw, parts())
    assert r.status_code == 200, r.text
    [(where, _)] = env.uploads()
    stored = stored_lines(env, r.json()["id"])
    assert len(stored) == n
    assert {line["body"]["model"] for line in stored} == {UPSTREAM[where]}


def test_a_large_file_of_another_purpose_passes_byte_for_byte_with_its_length(env):
    env.clear()
    data = os.urandom(3 * MiB)
    f = agw.openai_client(env.gw, timeout=60).files.create(
        file=("blob.bin", io.BytesIO(data)), purpose="assistants",
        extra_query={"deployment": "batch-4o"})
    [(_, q)] = env.uploads()
    assert q["headers"].get("transfer-encoding") is None
    assert int(q["headers"]["content-length"]) == q["body_len"]
    got = agw.openai_client(env.gw, timeout=60).files.content(f.id).content
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def test_streamed_audio_in_chunks_has_its_model_renamed_and_arrives_intact(env):
    env.clear()
    audio = b"RIFF" + os.urandom(4 * MiB)

    def parts():
        yield (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n"
               f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
               "Content-Type: audio/wav\r\n\r\n").encode()
        for i in range(0, len(audio), 256 * 1024):
            yield audio[i:i + 256 * 1024]
        yield FORM_TAIL

    r = post_chunked(env.gw, parts(), "/openai/v1/audio/transcriptions")
    assert r.status_code == 200, r.text
    sha = hashlib.sha256(audio).hexdigest()
    assert r.json()["text"] == f'model=whisper-east file="a.wav" {len(audio)} "{sha}"'
    [q] = env.east.data_requests()
    assert q["model"] == "whisper-east"
    assert q["headers"].get("transfer-encoding") == "chunked"


def test_a_large_transcription_on_a_deployment_path_renames_the_form_model_like_the_path(env):
    env.clear()
    audio = b"RIFF" + os.urandom(2 * MiB)
    client = agw.azure_client(env.gw, timeout=60)
    r = client.audio.transcriptions.with_raw_response.create(model="whisper", file=("a.wav", audio))
    assert r.parse().text.startswith("model=whisper-east file=")
    [q] = env.east.data_requests()
    assert q["path"] == "/openai/deployments/whisper-east/audio/transcriptions"
    assert q["model"] == "whisper-east"
    assert q["body_len"] == int(r.http_request.headers["content-length"]) + len("-east")
    assert int(q["headers"]["content-length"]) == q["body_len"]


def test_a_second_model_field_after_the_streamed_file_is_refused(env):
    env.clear()

    def parts():
        yield (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n"
               f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n").encode()
        yield b"RIFF" + b"\0" * (512 * 1024)
        yield (f"\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nother\r\n"
               f"--{BOUNDARY}--\r\n").encode()

    r = post_chunked(env.gw, parts(), "/openai/v1/audio/transcriptions")
    assert r.status_code == 400, r.text
    assert "one `model` field" in r.json()["error"]["message"]
    assert env.east.data_requests() == []


def test_limits_model_after_a_large_file_and_the_upload_size(module_cluster, env):
    cfg = agw.make_config(
        deployments={"whisper": [agw.member("east", "whisper-east")]},
        backends=[agw.backend("east", env.east)],
        server={"max_request_body_bytes": 1 * MiB, "max_upload_bytes": 4 * MiB},
    )
    gw = module_cluster.gateway(cfg)
    env.clear()
    # `model` after a file larger than max_request_body_bytes: refused, saying why.
    late = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n".encode()
            + b"\0" * (2 * MiB)
            + f"\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--{BOUNDARY}--\r\n".encode())
    r = post_chunked(gw, iter([late]), "/openai/v1/audio/transcriptions")
    assert r.status_code == 400, r.text
    assert "before the file" in r.json()["error"]["message"]
    # Above max_upload_bytes: 413, by the declared length or while streaming.
    big = agw.openai_client(gw, timeout=60).audio.transcriptions
    with pytest.raises(openai.APIStatusError) as e:
        big.create(model="whisper", file=("a.wav", b"RIFF" + b"\0" * (5 * MiB)))
    assert e.value.status_code == 413

    def parts():
        yield f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n".encode()
        yield f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n".encode()
        for _ in range(5):
            yield b"\0" * MiB
        yield FORM_TAIL

    r = post_chunked(gw, parts(), "/openai/v1/audio/transcriptions")
    assert r.status_code == 413, r.text
    assert env.east.data_requests() == []


def test_a_large_form_over_http2_streams_too(module_cluster, env, tmp_path):
    """HTTP/2 clients (ALPN h2 on a TLS listener) reach the same streaming through Pingora's
    session: curl uploads an audio file with `-F`, `model` first."""
    import subprocess

    from pki import Pki

    pki = Pki(tmp_path / "pki")
    listener = {"address": f"127.0.0.1:{agw.free_port()}",
                "tls": {"certificate": str(pki.server.chain), "private_key": str(pki.server.key)}}
    cfg = agw.make_config(
        deployments={"whisper": [agw.member("east", "whisper-east")]},
        backends=[agw.backend("east", env.east)],
        server={"listeners": [listener]},
        health_checks={"interval_seconds": 3600},
    )
    gw = module_cluster.gateway(cfg)
    env.clear()
    audio = b"RIFF" + os.urandom(3 * MiB)
    wav = tmp_path / "a.wav"
    wav.write_bytes(audio)
    r = subprocess.run(
        ["curl", "-sS", "--http2", "--max-time", "60", "--cacert", str(pki.server_ca.crt),
         "-H", f"api-key: {KEY}", "-F", "model=whisper", "-F", f"file=@{wav};type=audio/wav",
         "-w", "\n%{http_version} %{http_code}",
         f"https://{gw.listeners[0]}/openai/v1/audio/transcriptions"],
        capture_output=True, text=True, timeout=90, env=agw.clean_env())
    body, _, status = r.stdout.rpartition("\n")
    assert status == "2 200", (status, body, r.stderr)
    sha = hashlib.sha256(audio).hexdigest()
    assert json.loads(body)["text"] == f'model=whisper-east file="a.wav" {len(audio)} "{sha}"'
    [q] = env.east.data_requests()
    assert q["model"] == "whisper-east"


def test_failover_before_the_streamed_body_only_and_the_upload_is_never_sent_twice(module_cluster, env):
    """Members in priority order: a resource that refuses connections, east, west. The dead
    one fails before any byte after the held start was read, so east is tried; east's 500 to a
    streamed upload is the answer (a whole-body request would move on to west)."""
    dead = f"http://127.0.0.1:{agw.free_port()}"
    cfg = agw.make_config(
        deployments={"whisper": [agw.member("dead", "whisper-dead", priority=1),
                                 agw.member("east", "whisper-east", priority=2),
                                 agw.member("west", "whisper-west", priority=3)]},
        backends=[agw.backend("dead", dead), agw.backend("east", env.east),
                  agw.backend("west", env.west)],
        health_checks={"interval_seconds": 3600},
    )
    gw = module_cluster.gateway(cfg)
    audio = b"RIFF" + os.urandom(1 * MiB)
    client = agw.openai_client(gw, timeout=60).audio.transcriptions
    env.clear()
    r = client.with_raw_response.create(model="whisper", file=("a.wav", audio))
    assert r.parse().text.startswith("model=whisper-east file=")
    assert [q["model"] for q in env.east.data_requests()] == ["whisper-east"]
    assert env.west.data_requests() == []
    line = gw.audit_for(r.headers["x-request-id"])
    assert line["attempts"] == 2 and line["backend"] == "east", line

    env.clear()
    env.east.faults(fail_status=500, fail_count=1)
    with pytest.raises(openai.InternalServerError):
        client.create(model="whisper", file=("a.wav", audio))
    assert len(env.east.data_requests()) == 1
    assert env.west.data_requests() == [], "a streamed upload went to a second member"
