"""The OpenAI-compatible API of a two-node demo swarm, spoken to by the official `openai` client.

Every answer is checked against `cake-swarm generate` on one node (no daemon): the pipeline across two
processes must give exactly the single-node tokens, through either node, streamed or not."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

from tests.swarm_harness import cli_generate, demo_pair, own_sessions, ready_swarm, wait_for, wait_idle

STORY = "Once upon a time"
CHAT = "The little dog wanted to"
MAX_TOKENS = 40
B_MAX_SESSIONS = 4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("openai-swarm")


@pytest.fixture(scope="module")
def swarm(workdir):
    with ready_swarm(demo_pair(workdir, args_b=("--max-sessions", str(B_MAX_SESSIONS))), nodes=2) as daemons:
        yield daemons


@pytest.fixture(scope="module")
def cli(swarm, workdir):
    """What one node alone generates (the demo conversion is already in the swarm's XDG_CACHE_HOME)."""
    tmp = workdir
    return {
        "story": cli_generate(tmp, "--prompt", STORY, "--raw", "--max-tokens", str(MAX_TOKENS)),
        "story_ids": [int(t) for t in cli_generate(tmp, "--prompt", STORY, "--raw", "--max-tokens", str(MAX_TOKENS),
                                                   "--output", "ids").split(",")],
        # no --raw: the demo has no chat template, so `generate` and chat both fall back to the plain text
        "chat": cli_generate(tmp, "--prompt", CHAT, "--max-tokens", str(MAX_TOKENS)),
        "sampled": cli_generate(tmp, "--prompt", STORY, "--raw", "--max-tokens", "30", "--temperature", "0.8",
                                "--top-p", "0.9", "--seed", "7"),
    }


def client(daemon, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", **kw)




def test_models_names_the_swarms_model_on_every_node(swarm):
    ids = [[m.id for m in client(d).models.list()] for d in swarm]
    assert ids[0] == ids[1] and len(ids[0]) == 1
    assert ids[0][0] == "demo"  # the name the source was started with (`--model demo`)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_completions_match_generate_through_both_nodes(swarm, cli, stream):
    for daemon in swarm:
        args = dict(model="demo", prompt=STORY, max_tokens=MAX_TOKENS, temperature=0)
        if stream:
            chunks = list(client(daemon).completions.create(stream=True, **args))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            answer = client(daemon).completions.create(**args)
            text, reasons = answer.choices[0].text, [answer.choices[0].finish_reason]
            assert answer.object == "text_completion"
            assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (5, MAX_TOKENS)
        assert text == cli["story"], daemon.name
        assert reasons == ["length"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_chat_matches_generate_through_both_nodes(swarm, cli, stream):
    messages = [{"role": "user", "content": CHAT}]
    for daemon in swarm:
        if stream:
            chunks = list(client(daemon).chat.completions.create(
                model="demo", messages=messages, max_tokens=MAX_TOKENS, stream=True,
                stream_options={"include_usage": True}))
            assert chunks[0].choices[0].delta.role == "assistant"
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_TOKENS
            assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
        else:
            answer = client(daemon).chat.completions.create(model="demo", messages=messages, max_tokens=MAX_TOKENS)
            assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
            assert answer.choices[0].finish_reason == "length"
            text = answer.choices[0].message.content
        assert text == cli["chat"], daemon.name


def test_token_ids_in_and_out(swarm, cli):
    a, b = swarm
    answer = client(a).completions.create(model="demo", prompt=STORY, max_tokens=MAX_TOKENS,
                                          extra_body={"return_token_ids": True})
    choice = answer.choices[0].model_dump()
    assert choice["token_ids"] == cli["story_ids"]
    prompt_ids = choice["prompt_token_ids"]
    assert len(prompt_ids) == answer.usage.prompt_tokens
    # the prompt as token ids gives the same answer; streamed, the chunks' ids add up to every id
    chunks = list(client(b).completions.create(model="demo", prompt=prompt_ids, max_tokens=MAX_TOKENS, stream=True,
                                               extra_body={"return_token_ids": True}))
    assert "".join(c.choices[0].text for c in chunks) == cli["story"]
    assert [t for c in chunks for t in c.choices[0].model_dump()["token_ids"]] == cli["story_ids"]
    chat = client(b).chat.completions.create(model="demo", messages=[{"role": "user", "content": STORY}],
                                             max_tokens=MAX_TOKENS, extra_body={"return_token_ids": True})
    assert chat.model_dump()["prompt_token_ids"] == prompt_ids
    assert chat.choices[0].model_dump()["token_ids"] == cli["story_ids"]


def test_stop_seed_and_top_p(swarm, cli):
    a, b = swarm
    stopped = client(b).completions.create(model="demo", prompt=STORY, max_tokens=MAX_TOKENS, stop=["Lily"])
    assert stopped.choices[0].text == cli["story"].split("Lily")[0]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = list(client(a).chat.completions.create(model="demo", messages=[{"role": "user", "content": STORY}],
                                                      max_tokens=MAX_TOKENS, stop="Lily", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cli["story"].split("Lily")[0]
    assert streamed[-1].choices[0].finish_reason == "stop"
    for daemon in swarm:
        sampled = client(daemon).completions.create(model="demo", prompt=STORY, max_tokens=30, temperature=0.8,
                                                    top_p=0.9, seed=7)
        assert sampled.choices[0].text == cli["sampled"]


def test_errors_are_openai_errors(swarm):
    a, b = swarm
    c = client(a, max_retries=0)
    for bad in (dict(prompt=STORY, max_tokens=0), dict(prompt=STORY, n=2), dict(prompt=STORY, temperature=-1),
                dict(prompt="story " * 5000), dict(prompt=[[1, 2], [3, 4]])):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="demo", **bad)
        assert e.value.status_code == 400 and e.value.body["message"], bad
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="demo", messages=[])

    async def raw():
        async with aiohttp.ClientSession() as http, \
                http.post(a.url + "/v1/completions", data=b"{not json") as r:
            return r.status, await r.json()
    status, body = asyncio.run(raw())
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and body["error"]["message"]


async def _first_chunks(daemon, n: int, http: aiohttp.ClientSession) -> list[aiohttp.ClientResponse]:
    """n streaming completions through `daemon`, each read up to its first chunk (so each holds a session)."""
    responses = []
    for i in range(n):
        r = await http.post(daemon.url + "/v1/completions", json={
            "prompt": f"{STORY} {i}", "max_tokens": 400, "stream": True})
        assert r.status == 200
        assert (await r.content.readline()).startswith(b"data: {")
        responses.append(r)
    return responses


async def test_past_the_session_limit_503_with_retry_after(swarm):
    a, b = swarm
    async with aiohttp.ClientSession() as http:
        held = await _first_chunks(b, B_MAX_SESSIONS, http)
        try:
            assert own_sessions(b)["requests"] == B_MAX_SESSIONS
            async with http.post(b.url + "/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": STORY}], "max_tokens": 8}) as r:
                assert r.status == 503 and int(r.headers["Retry-After"]) > 0
                assert "busy" in (await r.json())["error"]["message"]
            async with http.ws_connect(b.url + "/ws/chat") as ws:
                await ws.send_json({"prompt": STORY, "max_tokens": 8})
                frame = await ws.receive_json(timeout=30)
                assert frame["type"] == "error" and frame["status"] == 503 and "busy" in frame["message"]
            # the other node has its own limit and still serves
            ok = client(a).completions.create(model="demo", prompt=STORY, max_tokens=4)
            assert ok.choices[0].finish_reason == "length"
        finally:
            for r in held:  # clients that leave mid-stream
                r.close()
    await asyncio.to_thread(wait_idle, swarm)


async def test_a_client_leaving_mid_stream_frees_every_stage(swarm):
    a, b = swarm
    async with aiohttp.ClientSession() as http:
        (r,) = await _first_chunks(b, 1, http)
        for _ in range(6):  # a few tokens more
            await r.content.readline()
        # the session is open on both stages and at its origin
        assert own_sessions(b)["requests"] == 1
        assert own_sessions(a)["stage_sessions"] == 1 and own_sessions(b)["stage_sessions"] == 1
        r.close()
    await asyncio.to_thread(wait_idle, swarm)


async def test_a_client_giving_up_on_a_whole_answer_frees_every_stage(swarm):
    a, b = swarm
    tokens_before = b.state()["stats"]["tokens"]

    async def ask():
        async with aiohttp.ClientSession() as http, http.post(b.url + "/v1/completions", json={
                "prompt": STORY, "max_tokens": 400}) as r:
            return await r.read()
    task = asyncio.ensure_future(ask())
    await asyncio.to_thread(wait_for, lambda: own_sessions(b)["requests"] == 1, 30, "the request to start", swarm)
    task.cancel()  # closes the connection
    await asyncio.to_thread(wait_idle, swarm)
    assert b.state()["stats"]["tokens"] == tokens_before  # the 400 tokens were never all generated


async def test_eight_simultaneous_streaming_chats_get_their_solo_answers(swarm):
    prompts = ["Once upon a time", "The little dog", "Tom had a red ball", "One day, a bird",
               "Sue and Ben went to the park", "There was a big tree", "Lily saw a cat", "The sun was hot"]
    clients = [openai.AsyncOpenAI(base_url=swarm[i % 2].url + "/v1", api_key="unused") for i in range(len(prompts))]

    async def chat(c, prompt, stream):
        args = dict(model="demo", messages=[{"role": "user", "content": prompt}], max_tokens=24)
        if not stream:
            return (await c.chat.completions.create(**args)).choices[0].message.content
        text = ""
        async for chunk in await c.chat.completions.create(stream=True, **args):
            text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        return text

    solo = [await chat(c, p, stream=False) for c, p in zip(clients, prompts)]
    together = await asyncio.gather(*(chat(c, p, stream=True) for c, p in zip(clients, prompts)))
    assert len(set(solo)) == len(prompts)  # different prompts, different answers: a mix-up would show
    assert together == solo
    for c in clients:
        await c.close()


def test_sse_wire_format(swarm):
    """The raw stream: `data: {json}` events, blank-line separated, closed by `data: [DONE]`."""
    async def raw():
        async with aiohttp.ClientSession() as http, http.post(swarm[1].url + "/v1/completions", json={
                "prompt": STORY, "max_tokens": 3, "stream": True}) as r:
            return r.headers["Content-Type"], (await r.read()).decode()
    content_type, body = asyncio.run(raw())
    assert content_type.startswith("text/event-stream")
    events = body.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(p["object"] == "text_completion" for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
