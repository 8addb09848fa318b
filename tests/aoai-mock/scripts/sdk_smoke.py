"""Smoke check of a running aoai-mock with the official `openai` SDK.

Usage: python sdk_smoke.py http://127.0.0.1:PORT [NAME]
"""

import sys

import math
from openai import AzureOpenAI, OpenAI

base = sys.argv[1].rstrip("/")
name = sys.argv[2] if len(sys.argv) > 2 else "mock"
want = f"Hello from {name}."
msgs = [{"role": "user", "content": "hello world!"}]  # 12 bytes -> 3 prompt tokens

az = AzureOpenAI(azure_endpoint=base, api_key="x", api_version="2024-10-21", max_retries=0)

r = az.chat.completions.create(model="gpt-4o", messages=msgs)
assert r.choices[0].message.content == want, r
assert r.model == "gpt-4o"
assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 4, 7), r.usage
print("chat ok:", r.id)

chunks = list(az.chat.completions.create(model="gpt-4o", messages=msgs, stream=True))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == want, text
assert all(c.usage is None for c in chunks)
assert chunks[-1].choices[0].finish_reason == "stop"
print("chat stream ok:", len(chunks), "chunks")

chunks = list(
    az.chat.completions.create(
        model="gpt-4o", messages=msgs, stream=True, stream_options={"include_usage": True}
    )
)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == want, text
assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 7, chunks[-1]
assert all(c.usage is None for c in chunks[:-1])
print("chat stream include_usage ok:", len(chunks), "chunks")

c = az.completions.create(model="gpt-35-instruct", prompt="abcdabcd")
assert c.choices[0].text == want and c.usage.prompt_tokens == 2, c
chunks = list(az.completions.create(model="gpt-35-instruct", prompt="abcd", stream=True))
assert "".join(x.choices[0].text for x in chunks if x.choices) == want
print("completions ok")

e = az.embeddings.create(model="text-embedding-3-small", input=["hello", "world"])  # base64 by default
assert len(e.data) == 2 and len(e.data[0].embedding) == 8, e
assert abs(math.sqrt(sum(x * x for x in e.data[0].embedding)) - 1.0) < 1e-4
f = az.embeddings.create(model="text-embedding-3-small", input=["hello", "world"], encoding_format="float")
assert all(abs(a - b) < 1e-6 for a, b in zip(e.data[0].embedding, f.data[0].embedding))
e3 = az.embeddings.create(model="text-embedding-3-small", input="x", dimensions=16)
assert len(e3.data[0].embedding) == 16
assert e.usage.prompt_tokens == 2, e.usage
print("embeddings ok (base64 == float)")

oa = OpenAI(base_url=base + "/openai/v1", api_key="x", max_retries=0)
resp = oa.responses.create(model="gpt-4o", input="abcdabcd")
assert resp.output_text == want, resp
assert resp.usage.input_tokens == 2 and resp.usage.output_tokens == 4 and resp.usage.total_tokens == 6
print("responses ok:", resp.id)

events = list(oa.responses.create(model="gpt-4o", input="abcdabcd", stream=True))
types = [ev.type for ev in events]
assert types[0] == "response.created" and types[-1] == "response.completed", types
deltas = "".join(ev.delta for ev in events if ev.type == "response.output_text.delta")
assert deltas == want
assert events[-1].response.output_text == want
assert events[-1].response.usage.total_tokens == 6
print("responses stream ok:", types)

with oa.responses.stream(model="gpt-4o", input="abcdabcd") as s:
    for _ in s:
        pass
    final = s.get_final_response()
assert final.output_text == want
print("responses.stream helper ok")

r = oa.chat.completions.create(model="gpt-4o", messages=msgs)
assert r.choices[0].message.content == want
print("v1 chat ok")

models = az.models.list()
assert len(models.data) > 0
print("models ok")
img = az.images.generate(model="dall-e-3", prompt="x")
assert img.data[0].url
print("images ok")
print("ALL OK")
