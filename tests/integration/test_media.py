"""Versions, media and usage details (SPEC §13): `stream_options` only for api-versions that
take it (older streams counted by the gateway), usage details in the audit line and metric,
images and audio (JSON and multipart, the deployment rewritten), `models/{id}`."""

from __future__ import annotations

import json

import openai
import pytest

import agw
import opsutil
from agw import KEY

OLD_VERSIONS = ["2024-02-01", "2024-06-01", "2024-08-01-preview"]


@pytest.fixture(scope="module")
def env(module_cluster):
    """"gpt-4o" on member deployment "gpt-4o-east", "o3-mini" (a reasoning model), and a
    client allowed only "gpt-4o"."""
    m = module_cluster.mock("media-a")
    cfg = agw.make_config(
        deployments={
            "gpt-4o": [agw.member("b1", "gpt-4o-east")],
            "o3-mini": [agw.member("b1")],
            "dall-e-3": [agw.member("b1", "dalle-east")],
            "whisper": [agw.member("b1", "whisper-east")],
            "tts": [agw.member("b1", "tts-east")],
        },
        backends=[agw.backend("b1", m)],
        clients=[
            agw.client("test-client", limits={"tokens_per_minute": 100000}),
            agw.client("narrow", keys=[agw.sha256_hex(agw.OTHER_KEY)], deployments=["gpt-4o"]),
        ],
    )
    gw = module_cluster.gateway(cfg)
    return gw, m


def _metric(gw, name, **labels):
    return opsutil.metric_value(opsutil.scrape(gw), name, **labels) or 0


# --------------------------------------------------------------------------------------
# stream_options and api-versions


@pytest.mark.parametrize("version", OLD_VERSIONS)
def test_mock_refuses_stream_options_for_old_versions_like_azure(fresh, version):
    """The mock plays Azure: an old api-version answers 400 to any `stream_options`."""
    _, m = fresh
    with agw.http_client() as h:
        r = h.post(
            f"{m.url}/openai/deployments/gpt-4o/chat/completions?api-version={version}",
            json=agw.chat_body(stream=True, stream_options={"include_usage": True}),
        )
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["message"] == "Unrecognized request argument supplied: stream_options"
        assert err["type"] == "invalid_request_error"
        # Without it, the old version streams, with no usage chunk.
        r = h.post(
            f"{m.url}/openai/deployments/gpt-4o/chat/completions?api-version={version}",
            json=agw.chat_body(stream=True),
        )
        assert r.status_code == 200 and '"usage"' not in r.text, r.text
        # From 2024-09-01-preview on it is accepted.
        r = h.post(
            f"{m.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-09-01-preview",
            json=agw.chat_body(stream=True, stream_options={"include_usage": True}),
        )
        assert r.status_code == 200 and '"usage"' in r.text, r.text


@pytest.mark.parametrize("version", ["2024-02-01", "2024-06-01"])
def test_old_version_stream_works_and_is_counted_by_the_gateway(fresh, version):
    gw, m = fresh
    before = _metric(gw, "aoai_gateway_tokens_total", client="test-client", deployment="gpt-4o",
                     type="completion")
    client = agw.azure_client(gw, api_version=version)
    stream = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Tell me about streams, please."}],
        stream=True,
    )
    rid = stream.headers.get("x-request-id")
    chunks = list(stream.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from media-a."
    assert all(c.usage is None for c in chunks)

    # Nothing was added upstream: the old version would have refused it.
    (req,) = m.data_requests()
    assert req["stream_options"] is None, req
    assert f"api-version={version}" in req["query"]

    line = gw.audit_for(rid)
    assert line["status"] == 200 and line["stream"] is True
    assert line["usage_source"] == "estimated"
    # "Hello from media-a." is 5 or 6 tokens in any OpenAI encoding; the prompt is one
    # message of 7 words with the per-message overhead.
    assert 3 <= line["completion_tokens"] <= 8, line
    assert 8 <= line["prompt_tokens"] <= 25, line
    assert line["total_tokens"] == line["prompt_tokens"] + line["completion_tokens"]
    after = _metric(gw, "aoai_gateway_tokens_total", client="test-client", deployment="gpt-4o",
                    type="completion")
    assert after - before == line["completion_tokens"]


def test_old_version_stream_charges_the_estimate_to_the_limits(fresh):
    """The limit is charged the gateway's count, not the reservation (max_tokens 5000)."""
    gw, _ = fresh
    client = agw.azure_client(gw, api_version="2024-06-01")
    stream = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], stream=True, max_tokens=5000,
    )
    rid = stream.headers.get("x-request-id")
    list(stream.parse())
    line = gw.audit_for(rid)
    assert line["usage_source"] == "estimated"
    r = agw.azure_client(gw).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
    )
    remaining = int(r.headers["x-ratelimit-remaining-tokens"])
    # Had the reservation (prompt + 5000) stood, fewer than 95,000 would remain.
    assert remaining > 100000 - 200, remaining


def test_new_version_still_gets_include_usage_added(fresh):
    gw, m = fresh
    client = agw.azure_client(gw, api_version="2024-09-01-preview")
    chunks = list(client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], stream=True))
    assert all(c.usage is None for c in chunks)
    (req,) = m.data_requests()
    assert req["stream_options"] == {"include_usage": True}


def test_v1_stream_gets_include_usage_added(fresh):
    gw, m = fresh
    client = agw.openai_client(gw)
    chunks = list(client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from media-a."
    (req,) = m.data_requests()
    assert req["stream_options"] == {"include_usage": True}


def test_client_stream_options_on_an_old_version_get_azures_answer(fresh):
    """The gateway forwards what the client sent; Azure's 400 is the client's answer."""
    gw, m = fresh
    client = agw.azure_client(gw, api_version="2024-06-01")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], stream=True,
            stream_options={"include_usage": True})
    assert "Unrecognized request argument supplied: stream_options" in str(e.value)
    (req,) = m.data_requests()
    assert req["stream_options"] == {"include_usage": True}


# --------------------------------------------------------------------------------------
# Usage details


def _long_prompt() -> str:
    # About 2,000 tokens of text by the mock's count (bytes / 4): cached from 1,024 on.
    return "word " * 1600


def test_cached_and_reasoning_tokens_in_audit_and_metric(fresh):
    gw, _ = fresh
    labels = dict(client="test-client", deployment="o3-mini")
    before = {t: _metric(gw, "aoai_gateway_token_details_total", type=t, **labels)
              for t in ("cached_prompt", "reasoning", "audio_prompt", "audio_completion")}
    client = agw.azure_client(gw)
    r = client.chat.completions.with_raw_response.create(
        model="o3-mini", messages=[{"role": "user", "content": _long_prompt()}])
    body = r.parse()
    details_p = body.usage.prompt_tokens_details
    details_c = body.usage.completion_tokens_details
    assert details_p.cached_tokens >= 1024 and details_c.reasoning_tokens == 64
    line = gw.audit_for(r.headers.get("x-request-id"))
    assert line["cached_tokens"] == details_p.cached_tokens
    assert line["reasoning_tokens"] == 64
    assert line["completion_tokens"] == body.usage.completion_tokens
    after = {t: _metric(gw, "aoai_gateway_token_details_total", type=t, **labels) for t in before}
    assert after["cached_prompt"] - before["cached_prompt"] == details_p.cached_tokens
    assert after["reasoning"] - before["reasoning"] == 64
    assert after["audio_prompt"] == before["audio_prompt"]
    assert after["audio_completion"] == before["audio_completion"]


def test_details_from_the_streamed_usage_chunk(fresh):
    """The usage chunk the gateway asked for (and hid) carries the details too."""
    gw, _ = fresh
    client = agw.azure_client(gw)
    stream = client.chat.completions.with_raw_response.create(
        model="o3-mini", messages=[{"role": "user", "content": _long_prompt()}], stream=True)
    rid = stream.headers.get("x-request-id")
    chunks = list(stream.parse())
    assert all(c.usage is None for c in chunks)
    line = gw.audit_for(rid)
    assert line["usage_source"] == "response"
    assert line["cached_tokens"] >= 1024 and line["reasoning_tokens"] == 64


def test_details_of_the_responses_api(fresh):
    gw, _ = fresh
    client = agw.openai_client(gw)
    r = client.responses.with_raw_response.create(model="o3-mini", input=_long_prompt())
    resp = r.parse()
    assert resp.usage.output_tokens_details.reasoning_tokens == 64
    line = gw.audit_for(r.headers.get("x-request-id"))
    assert line["cached_tokens"] == resp.usage.input_tokens_details.cached_tokens >= 1024
    assert line["reasoning_tokens"] == 64


def test_zero_details_are_logged_as_zero_and_absent_ones_as_null(fresh):
    gw, _ = fresh
    client = agw.azure_client(gw)
    r = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    line = gw.audit_for(r.headers.get("x-request-id"))
    assert line["cached_tokens"] == 0 and line["reasoning_tokens"] == 0
    r = client.embeddings.with_raw_response.create(model="gpt-4o", input="Hi")
    line = gw.audit_for(r.headers.get("x-request-id"))
    assert line["cached_tokens"] is None and line["reasoning_tokens"] is None
    # The old-version stream's own count has no details.
    old = agw.azure_client(gw, api_version="2024-06-01")
    stream = old.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], stream=True)
    list(stream.parse())
    line = gw.audit_for(stream.headers.get("x-request-id"))
    assert line["usage_source"] == "estimated" and line["cached_tokens"] is None


# --------------------------------------------------------------------------------------
# Images and audio


def _only_request(m):
    reqs = m.data_requests()
    assert len(reqs) == 1, reqs
    return reqs[0]


def test_v1_image_generation_names_the_deployment_in_the_body(fresh):
    gw, m = fresh
    import base64

    r = agw.openai_client(gw).images.generate(model="dall-e-3", prompt="a lighthouse",
                                              response_format="b64_json")
    png = base64.b64decode(r.data[0].b64_json)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert r.data[0].revised_prompt == "a lighthouse (drawn by dalle-east)"
    req = _only_request(m)
    assert req["path"] == "/openai/v1/images/generations"
    assert req["model"] == "dalle-east"
    line = gw.wait_audit(lambda l: l["path"] == "/openai/v1/images/generations")
    assert line["operation"] == "images" and line["deployment"] == "dall-e-3"
    assert line["status"] == 200


def test_deployment_path_image_generation(fresh):
    gw, m = fresh
    r = agw.azure_client(gw).images.generate(model="dall-e-3", prompt="a boat")
    assert r.data[0].url
    req = _only_request(m)
    assert req["path"] == "/openai/deployments/dalle-east/images/generations"


def test_v1_speech_returns_the_audio_bytes(fresh):
    gw, m = fresh
    r = agw.openai_client(gw).audio.speech.create(model="tts", voice="alloy", input="Good morning")
    assert r.read() == b"\xff\xf3\x44\xc4Good morning"
    assert r.response.headers["content-type"] == "audio/mpeg"
    req = _only_request(m)
    assert (req["path"], req["model"]) == ("/openai/v1/audio/speech", "tts-east")


@pytest.mark.parametrize("kind", ["transcriptions", "translations"])
def test_v1_audio_upload_rewrites_the_form_model_and_the_file_arrives_intact(fresh, kind):
    import hashlib
    import os

    gw, m = fresh
    audio = b"RIFF" + os.urandom(6 * 1024 * 1024)
    # Bytes that look like multipart framing inside the file.
    audio += b"\r\n--boundary\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nx\r\n"
    api = getattr(agw.openai_client(gw, timeout=60).audio, kind)
    r = api.with_raw_response.create(model="whisper", file=("speech.wav", audio, "audio/wav"))
    t = r.parse()
    sha = hashlib.sha256(audio).hexdigest()
    assert t.text == f'model=whisper-east file="speech.wav" {len(audio)} "{sha}"', t.text
    req = _only_request(m)
    assert req["path"] == f"/openai/v1/audio/{kind}"
    assert req["model"] == "whisper-east"
    # The upstream body is the client's with only the field's value changed.
    assert req["body_len"] == int(r.http_request.headers["content-length"]) + len("-east")
    line = gw.audit_for(r.headers["x-request-id"])
    assert line["operation"] == "audio" and line["deployment"] == "whisper" and line["status"] == 200


def test_v1_image_edit_is_a_form_too(fresh):
    import hashlib

    gw, m = fresh
    image = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 100
    r = agw.openai_client(gw).images.edit(model="dall-e-3", image=("in.png", image, "image/png"),
                                          prompt="add a hat")
    sha = hashlib.sha256(image).hexdigest()
    assert r.data[0].revised_prompt == f"add a hat (drawn by dalle-east) from {sha}"
    assert _only_request(m)["model"] == "dalle-east"


def test_deployment_path_transcription(fresh):
    gw, m = fresh
    r = agw.azure_client(gw).audio.transcriptions.create(model="whisper", file=("a.wav", b"RIFFdata"))
    assert r.text.startswith("model=whisper-east file=")
    req = _only_request(m)
    assert req["path"] == "/openai/deployments/whisper-east/audio/transcriptions"
    # The SDK names the deployment in the form too: renamed like the path.
    assert req["model"] == "whisper-east"


def test_form_model_is_authorized_like_any_deployment(fresh):
    gw, m = fresh
    client = agw.openai_client(gw, key=agw.OTHER_KEY)
    with pytest.raises(openai.PermissionDeniedError) as e:
        client.audio.transcriptions.create(model="whisper", file=("a.wav", b"RIFFdata"))
    assert e.value.body["code"] == "DeploymentNotAllowed"
    with pytest.raises(openai.NotFoundError) as e:
        client.audio.transcriptions.create(model="nope", file=("a.wav", b"RIFFdata"))
    assert e.value.body["code"] == "DeploymentNotFound"
    assert m.data_requests() == []


def _form(parts: list[tuple[str, bytes]], boundary: str = "b0und") -> bytes:
    out = b""
    for disposition, content in parts:
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize("why, body", [
    ("two model fields", _form([('form-data; name="model"', b"whisper"),
                                ('form-data; name="file"; filename="a.wav"', b"RIFF"),
                                ('form-data; name="model"', b"tts")])),
    ("a name hidden in a filename", _form([('form-data; name="model"', b"whisper"),
                                           ('form-data; filename="x; name=model"; name="file"', b"RIFF")])),
    ("no close", _form([('form-data; name="model"', b"whisper")])[:-12]),
    ("no model", _form([('form-data; name="file"; filename="a.wav"', b"RIFF")])),
])
def test_forms_that_could_be_read_otherwise_are_refused(fresh, why, body):
    gw, m = fresh
    with agw.http_client() as h:
        r = h.post(gw.url + "/openai/v1/audio/transcriptions", content=body,
                   headers={"api-key": KEY, "content-type": "multipart/form-data; boundary=b0und"})
    agw.assert_error(r, 400, "InvalidRequestBody")
    assert m.data_requests() == []


# --------------------------------------------------------------------------------------
# models/{id}


def test_models_retrieve_answers_visible_deployments_only(fresh):
    gw, m = fresh
    for client in (agw.openai_client(gw), agw.azure_client(gw)):
        assert client.models.retrieve("o3-mini").id == "o3-mini"
    narrow = agw.openai_client(gw, key=agw.OTHER_KEY)
    assert narrow.models.retrieve("gpt-4o").id == "gpt-4o"
    with pytest.raises(openai.NotFoundError) as e:
        narrow.models.retrieve("o3-mini")
    assert e.value.body["code"] == "DeploymentNotFound"
    with pytest.raises(openai.NotFoundError):
        agw.azure_client(gw).models.retrieve("no-such-deployment")
    assert m.data_requests() == []
    line = gw.wait_audit(lambda l: l["path"] == "/openai/v1/models/o3-mini" and l["client"] == "narrow")
    assert line["operation"] == "models.read" and line["status"] == 404
