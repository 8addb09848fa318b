"""Files and batches, owned and pinned (SPEC §11; issue 14).

Two aoai-mock processes play two Azure OpenAI resources (`east`, `west`); each keeps the files
it was sent and runs batches over them (404 for any other id, as Azure does). A batch completes
after the mocks' `--background-delay-ms` with an output file holding one answer per input line,
each echoing the `body.model` its line had when it reached the resource: that is how the tests
see the gateway's rewrite of `model` to the member's deployment name. The official `openai`
SDK is the client, as `OpenAI(base_url=…/openai/v1)` and as `AzureOpenAI`.
"""

from __future__ import annotations

import io
import json

import openai
import pytest

import agw
from agw import KEY, OTHER_KEY, assert_error, make_key, sha256_hex, wait_until

FILES_API = "2025-04-01-preview"
CAROL_KEY = make_key("carol files")
# The member deployment names differ from the client-facing one, so the rewrite shows.
UPSTREAM = {"east": "gpt-4o-east", "west": "gpt-4o-west"}


Env = agw.TwoResources


@pytest.fixture(scope="module")
def env(module_cluster) -> Env:
    east = module_cluster.mock("east", background_delay_ms=300)
    west = module_cluster.mock("west", background_delay_ms=300)
    cfg = agw.make_config(
        deployments={
            "batch-4o": [agw.member("east", UPSTREAM["east"]), agw.member("west", UPSTREAM["west"])],
            "east-only": [agw.member("east", "gpt-4o")],
            "west-only": [agw.member("west", "gpt-4o")],
        },
        backends=[agw.backend("east", east), agw.backend("west", west, region="westus")],
        clients=[
            agw.client("alice-app"),
            agw.client("bob-app", keys=(agw.OTHER_KEY_SHA256,)),
            agw.client("carol-app", keys=(sha256_hex(CAROL_KEY),), deployments=("east-only",)),
        ],
    )
    return Env(module_cluster.gateway(cfg), east, west)


def v1(gw: agw.Gateway, key: str = KEY) -> openai.OpenAI:
    return agw.openai_client(gw, key)


def azure(gw: agw.Gateway, key: str = KEY) -> openai.AzureOpenAI:
    return agw.azure_client(gw, key, api_version=FILES_API)


def jsonl(*models: str) -> bytes:
    lines = [
        {"custom_id": f"req-{i}", "method": "POST", "url": "/chat/completions",
         "body": {"model": m, "messages": [{"role": "user", "content": f"Question {i}"}]}}
        for i, m in enumerate(models)
    ]
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def holder_of_upload(env: Env) -> str:
    """The one mock that received a file upload since the last clear."""
    got = [m.name for m in env.mocks
           if any(q["method"] == "POST" and q["path"].endswith("/files") for q in m.data_requests())]
    assert len(got) == 1, got
    return got[0]


def assert_not_found(exc: openai.APIStatusError) -> None:
    assert exc.status_code == 404, exc
    assert exc.response.json()["error"]["code"] == "ObjectNotFound", exc.response.text


def assert_reached_no_backend(env: Env) -> None:
    for m in env.mocks:
        assert m.data_requests() == [], f"{m.name} was reached: {m.data_requests()}"


@pytest.mark.parametrize("style", ["v1", "azure"])
def test_a_batch_runs_end_to_end_with_the_model_rewritten(env, style):
    client = v1(env.gw) if style == "v1" else azure(env.gw)
    env.clear()
    f = client.files.create(file=("questions.jsonl", io.BytesIO(jsonl("batch-4o", "batch-4o"))),
                            purpose="batch")
    where = holder_of_upload(env)
    # The stored file has the member's deployment name on every line.
    stored = lines(client.files.content(f.id).content)
    assert [line["body"]["model"] for line in stored] == [UPSTREAM[where]] * 2
    assert [line["custom_id"] for line in stored] == ["req-0", "req-1"]
    assert client.files.retrieve(f.id).id == f.id

    env.clear()
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    other = env.west if where == "east" else env.east
    assert other.data_requests() == [], "the batch went where its input file is not"
    done = wait_until(
        lambda: (b := client.batches.retrieve(batch.id)).status == "completed" and b, 10,
        "the batch to complete")
    assert done.output_file_id
    out = lines(client.files.content(done.output_file_id).content)
    assert [o["custom_id"] for o in out] == ["req-0", "req-1"]
    assert {o["response"]["body"]["model"] for o in out} == {UPSTREAM[where]}
    assert other.data_requests() == [], "a follow-up went where the objects are not"
    # The output file is the batch owner's: another client cannot read it.
    with pytest.raises(openai.NotFoundError) as e:
        v1(env.gw, OTHER_KEY).files.content(done.output_file_id)
    assert_not_found(e.value)


def test_lists_show_only_ones_own_objects_from_every_resource(env):
    alice, bob = v1(env.gw), v1(env.gw, OTHER_KEY)
    mine = []
    # One file on each resource (`?deployment=` picks where a non-batch file goes).
    for dep in ("east-only", "west-only"):
        env.clear()
        mine.append(alice.files.create(file=("notes.txt", io.BytesIO(b"hello")), purpose="assistants",
                                       extra_query={"deployment": dep}).id)
        assert holder_of_upload(env) == dep.split("-")[0]
    bobs = bob.files.create(file=("bob.jsonl", io.BytesIO(jsonl("batch-4o"))), purpose="batch").id

    listed = [x.id for x in alice.files.list()]
    assert set(mine) <= set(listed)
    assert bobs not in listed
    assert bobs in [x.id for x in bob.files.list()]
    assert not set(mine) & {x.id for x in bob.files.list()}
    # Paged by the gateway, newest first.
    first = env.gw.http.get("/openai/v1/files?limit=1", headers={"api-key": KEY}).json()
    assert first["object"] == "list" and len(first["data"]) == 1 and first["has_more"] is True
    rest = env.gw.http.get(f"/openai/v1/files?limit=100&after={first['data'][0]['id']}",
                           headers={"api-key": KEY}).json()
    assert [first["data"][0]["id"]] + [x["id"] for x in rest["data"]] == listed
    stamps = [x.created_at for x in alice.files.list()]
    assert stamps == sorted(stamps, reverse=True)

    # Batches likewise.
    fa = alice.files.create(file=("a.jsonl", io.BytesIO(jsonl("batch-4o"))), purpose="batch")
    ba = alice.batches.create(input_file_id=fa.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    bb = bob.batches.create(input_file_id=bobs, endpoint="/v1/chat/completions",
                            completion_window="24h")
    alice_batches = [x.id for x in alice.batches.list()]
    assert ba.id in alice_batches and bb.id not in alice_batches
    assert [x.id for x in bob.batches.list()] == [bb.id]
    # Azure style too.
    assert ba.id in [x.id for x in azure(env.gw).batches.list()]


def test_another_clients_ids_are_not_found_and_reach_no_backend(env):
    alice, bob = v1(env.gw), v1(env.gw, OTHER_KEY)
    f = alice.files.create(file=("a.jsonl", io.BytesIO(jsonl("batch-4o"))), purpose="batch")
    b = alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                             completion_window="24h")
    env.clear()
    for call in (
        lambda: bob.files.retrieve(f.id),
        lambda: bob.files.content(f.id),
        lambda: bob.files.delete(f.id),
        lambda: bob.batches.retrieve(b.id),
        lambda: bob.batches.cancel(b.id),
        lambda: bob.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                   completion_window="24h"),
        lambda: azure(env.gw, OTHER_KEY).files.retrieve(f.id),
        lambda: alice.files.retrieve("file-never-made-here"),
    ):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert_not_found(e.value)
    assert_reached_no_backend(env)
    # Still Alice's; her delete forgets the record, after which it is not found either.
    assert alice.files.retrieve(f.id).id == f.id
    assert alice.batches.retrieve(b.id).id == b.id
    g = alice.files.create(file=("x.txt", io.BytesIO(b"x")), purpose="assistants")
    assert alice.files.delete(g.id).deleted is True
    env.clear()
    with pytest.raises(openai.NotFoundError) as e:
        alice.files.retrieve(g.id)
    assert_not_found(e.value)
    assert_reached_no_backend(env)


def test_batch_files_are_read_and_refused_before_any_backend(env):
    alice, carol = v1(env.gw), v1(env.gw, CAROL_KEY)
    env.clear()
    for data in (
        jsonl("batch-4o", "east-only"),                 # two deployments
        jsonl("batch-4o") + b"not json\n",              # a line that is not JSON
        b'{"custom_id":"x","body":{"messages":[]}}\n',  # no model
    ):
        with pytest.raises(openai.BadRequestError) as e:
            alice.files.create(file=("bad.jsonl", io.BytesIO(data)), purpose="batch")
        assert e.value.response.json()["error"]["code"] == "InvalidRequestBody"
    # A deployment the client may not use, and one that does not exist.
    with pytest.raises(openai.PermissionDeniedError) as e:
        carol.files.create(file=("c.jsonl", io.BytesIO(jsonl("batch-4o"))), purpose="batch")
    assert e.value.response.json()["error"]["code"] == "DeploymentNotAllowed"
    with pytest.raises(openai.NotFoundError) as e:
        alice.files.create(file=("c.jsonl", io.BytesIO(jsonl("gpt-9"))), purpose="batch")
    assert e.value.response.json()["error"]["code"] == "DeploymentNotFound"
    resp = env.gw.http.post("/openai/v1/files?deployment=batch-4o",
                            headers={"api-key": CAROL_KEY},
                            files={"file": ("n.txt", b"x")}, data={"purpose": "assistants"})
    assert_error(resp, 403, "DeploymentNotAllowed", secrets=(KEY, OTHER_KEY, CAROL_KEY))
    assert_reached_no_backend(env)
    # Carol's own deployment is where her other files go without `?deployment=`.
    carol.files.create(file=("n.txt", io.BytesIO(b"x")), purpose="assistants")
    assert holder_of_upload(env) == "east"


def test_a_responses_input_file_goes_to_the_files_holder(env):
    alice, bob = v1(env.gw), v1(env.gw, OTHER_KEY)
    env.clear()
    f = alice.files.create(file=("doc.txt", io.BytesIO(b"A document.")), purpose="assistants",
                           extra_query={"deployment": "west-only"})
    assert holder_of_upload(env) == "west"

    def ask(client):
        return client.responses.create(model="batch-4o", input=[{"role": "user", "content": [
            {"type": "input_file", "file_id": f.id},
            {"type": "input_text", "text": "Summarize it."}]}])

    # `batch-4o` has members on both resources; the file pins every request to west.
    for _ in range(4):
        env.clear()
        ask(alice)
        assert env.east.data_requests() == []
        assert [q["path"] for q in env.west.data_requests()] == ["/openai/v1/responses"]
    env.clear()
    with pytest.raises(openai.NotFoundError) as e:
        ask(bob)
    assert_not_found(e.value)
    assert_reached_no_backend(env)
    # A deployment without a member on the file's resource: a conflict, not a wrong guess.
    with pytest.raises(openai.ConflictError) as e:
        alice.responses.create(model="east-only", input=[{"role": "user", "content": [
            {"type": "input_file", "file_id": f.id}]}])
    assert e.value.response.json()["error"]["code"] == "ObjectConflict"
    assert_reached_no_backend(env)
