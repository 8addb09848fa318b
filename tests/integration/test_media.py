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
