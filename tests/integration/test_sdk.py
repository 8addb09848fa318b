"""The official openai SDK through the gateway (SPEC §4): chat (plain and streamed),
completions, embeddings, responses, models list — the answers are the backend's, the upstream
request carries the backend's deployment name, and every response's usage is accounted."""

from __future__ import annotations

import base64
import struct

import pytest

import agw
from agw import API_VERSION, KEY

MOCK_NAME = "eastus-a"
ALLOWED = {"gpt-4o", "text-embedding-3-large", "gpt-35-turbo-instruct"}


@pytest.fixture(scope="module")
def env(module_cluster):
    m = module_cluster.mock(MOCK_NAME)
    cfg = agw.make_config(
        deployments={
            # client-facing name -> the backend's deployment name
            "gpt-4o": [agw.member("east", deployment="gpt-4o-east")],
            "text-embedding-3-large": [agw.member("east")],
            "gpt-35-turbo-instruct": [agw.member("east")],
            "not-for-you": [agw.member("east")],
        },
        backends=[agw.backend("east", m, region="eastus")],
        clients=[agw.client(deployments=sorted(ALLOWED), operations=["*"])],
        # the mock counts model lists with health checks: keep the checks out of the way
        health_checks={"interval_seconds": 3600},
    )
    gw = module_cluster.gateway(cfg)
    return gw, m


def direct_chat(m: agw.Mock, deployment: str, body: dict) -> dict:
    """The same request sent straight to the mock (what the backend would answer)."""
    with agw.http_client() as h:
        r = h.post(f"{m.url}{agw.chat_path(deployment)}", json=body)
        r.raise_for_status()
        return r.json()


def last_request(m: agw.Mock, path_suffix: str) -> dict:
    reqs = [q for q in m.data_requests() if q["path"].endswith(path_suffix)]
    assert reqs, f"the backend saw no request to …{path_suffix}: {m.data_requests()!r}"
    return reqs[-1]


def test_chat_plain(env):
    gw, m = env
    client = agw.azure_client(gw)
    messages = [{"role": "user", "content": "Tell me something about gateways, please."}]
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages)
    resp = raw.parse()
    assert resp.choices[0].message.content == f"Hello from {MOCK_NAME}."
    expected = direct_chat(m, "gpt-4o-east", {"messages": messages})["usage"]
    assert resp.usage.prompt_tokens == expected["prompt_tokens"]
    assert resp.usage.completion_tokens == expected["completion_tokens"]
    assert resp.usage.total_tokens == expected["total_tokens"]

    up = last_request(m, "/chat/completions")
    assert up["method"] == "POST"
    assert up["path"] == "/openai/deployments/gpt-4o-east/chat/completions", up
    assert f"api-version={API_VERSION}" in (up["query"] or ""), up

    line = gw.audit_for(raw.headers.get("x-request-id"))
    assert line["client"] == "test-client"
    assert line["auth"] == "api_key"
    assert line["key_id"] == agw.KEY_SHA256[:8]
    assert line["deployment"] == "gpt-4o"
    assert line["backend"] == "east"
    assert line["region"] == "eastus"
    assert line["operation"] == "chat.completions"
    assert line["status"] == 200
    assert line["stream"] is False
    assert line["path"] == "/openai/deployments/gpt-4o/chat/completions"
    assert line["prompt_tokens"] == expected["prompt_tokens"]
    assert line["completion_tokens"] == expected["completion_tokens"]
    assert line["usage_source"] == "response"


def test_chat_streamed(env):
    gw, m = env
    client = agw.azure_client(gw)
    messages = [{"role": "user", "content": "Stream me a greeting."}]
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=messages, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"Hello from {MOCK_NAME}."
    assert all(c.usage is None for c in chunks), "a usage chunk reached a client that did not ask"
    assert chunks[-1].choices, "the last chunk the client got is a usage-only chunk"


def test_chat_streamed_with_usage(env):
    gw, m = env
    client = agw.azure_client(gw)
    messages = [{"role": "user", "content": "Stream me a greeting and count."}]
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o", messages=messages, stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"Hello from {MOCK_NAME}."
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1], "one final usage chunk"
    assert chunks[-1].choices == []
    expected = direct_chat(m, "gpt-4o-east", {"messages": messages})["usage"]
    assert chunks[-1].usage.prompt_tokens == expected["prompt_tokens"]
    assert chunks[-1].usage.completion_tokens == expected["completion_tokens"]


def test_completions(env):
    gw, m = env
    client = agw.azure_client(gw)
    raw = client.completions.with_raw_response.create(
        model="gpt-35-turbo-instruct", prompt="Say hello to the gateway.", max_tokens=16
    )
    resp = raw.parse()
    assert resp.choices and resp.choices[0].text
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0
    up = last_request(m, "/completions")
    assert up["path"] == "/openai/deployments/gpt-35-turbo-instruct/completions"
    line = gw.audit_for(raw.headers.get("x-request-id"))
    assert line["operation"] == "completions"
    assert line["prompt_tokens"] == resp.usage.prompt_tokens
    assert line["completion_tokens"] == resp.usage.completion_tokens
    assert line["usage_source"] == "response"


def test_embeddings_base64(env):
    """The SDK asks for base64 by default and decodes it; both must survive the gateway."""
    gw, m = env
    client = agw.azure_client(gw)
    raw = client.embeddings.with_raw_response.create(
        model="text-embedding-3-large", input=["first text", "second text"]
    )
    resp = raw.parse()
    assert len(resp.data) == 2
    for item in resp.data:
        assert isinstance(item.embedding, list) and len(item.embedding) > 0
        assert all(isinstance(x, float) for x in item.embedding)
    assert resp.usage.prompt_tokens > 0
    up = last_request(m, "/embeddings")
    assert up["path"] == "/openai/deployments/text-embedding-3-large/embeddings"
    line = gw.audit_for(raw.headers.get("x-request-id"))
    assert line["operation"] == "embeddings"
    assert line["prompt_tokens"] == resp.usage.prompt_tokens
    assert line["usage_source"] == "response"


def test_embeddings_base64_raw(env):
    """The raw answer to encoding_format=base64 is base64 of little-endian float32s."""
    gw, _ = env
    with agw.http_client() as h:
        r = h.post(
            f"{gw.url}/openai/deployments/text-embedding-3-large/embeddings?api-version={API_VERSION}",
            headers={"api-key": KEY},
            json={"input": "hello", "encoding_format": "base64"},
        )
    assert r.status_code == 200, r.text
    emb = r.json()["data"][0]["embedding"]
    assert isinstance(emb, str)
    raw = base64.b64decode(emb)
    assert len(raw) > 0 and len(raw) % 4 == 0
    struct.unpack(f"<{len(raw) // 4}f", raw)


def test_responses_v1(env):
    gw, m = env
    client = agw.openai_client(gw)
    raw = client.responses.with_raw_response.create(model="gpt-4o", input="Say hello.")
    resp = raw.parse()
    assert resp.output_text, resp
    assert MOCK_NAME in resp.output_text
    assert resp.usage.input_tokens > 0 and resp.usage.output_tokens > 0
    up = last_request(m, "/responses")
    assert up["path"] == "/openai/v1/responses", up
    assert up["model"] == "gpt-4o-east", "the upstream body must name the backend's deployment"
    line = gw.audit_for(raw.headers.get("x-request-id"))
    assert line["operation"] == "responses"
    assert line["deployment"] == "gpt-4o"
    assert line["prompt_tokens"] == resp.usage.input_tokens
    assert line["completion_tokens"] == resp.usage.output_tokens
    assert line["usage_source"] == "response"


def test_responses_v1_streamed(env):
    gw, m = env
    client = agw.openai_client(gw)
    events = list(client.responses.create(model="gpt-4o", input="Say hello.", stream=True))
    types = [e.type for e in events]
    assert "response.output_text.delta" in types, types
    assert types[-1] == "response.completed", types
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert MOCK_NAME in deltas
    final = events[-1].response
    assert final.output_text == deltas
    assert final.usage.input_tokens > 0
    assert last_request(m, "/responses")["model"] == "gpt-4o-east"
    assert last_request(m, "/responses")["stream"] is True
    # the streamed request's usage is read from the stream and logged
    line = gw.wait_audit(
        lambda l: l.get("operation") == "responses" and l.get("stream") is True,
        what="for the streamed responses request",
    )
    assert line["prompt_tokens"] == final.usage.input_tokens
    assert line["completion_tokens"] == final.usage.output_tokens
    assert line["usage_source"] == "response"


def test_responses_azure_path(env):
    """`POST /openai/responses?api-version=…` (AzureOpenAI's own path for responses)."""
    gw, m = env
    client = agw.azure_client(gw, api_version="2025-03-01-preview")
    resp = client.responses.create(model="gpt-4o", input="Say hello.")
    assert MOCK_NAME in resp.output_text
    up = last_request(m, "/responses")
    assert up["model"] == "gpt-4o-east"


def test_v1_chat_completions_model_in_body(env):
    gw, m = env
    client = agw.openai_client(gw)
    resp = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
    )
    assert resp.choices[0].message.content == f"Hello from {MOCK_NAME}."
    up = last_request(m, "/chat/completions")
    assert up["path"] == "/openai/v1/chat/completions", up
    assert up["model"] == "gpt-4o-east"


def test_models_list_shows_only_allowed_deployments(env):
    gw, m = env
    version = "2024-06-01"
    before = m.stats()["health_requests"]
    azure = agw.azure_client(gw, api_version=version)
    ids = {model.id for model in azure.models.list()}
    assert ids == ALLOWED

    v1 = agw.openai_client(gw)
    assert {model.id for model in v1.models.list()} == ALLOWED

    with agw.http_client() as h:
        r = h.get(f"{gw.url}/openai/deployments?api-version={version}", headers={"api-key": KEY})
    assert r.status_code == 200, r.text
    assert {d["id"] for d in r.json()["data"]} == ALLOWED
    assert r.headers.get("x-request-id")

    assert m.stats()["health_requests"] == before, "models.read must be answered by the gateway"
