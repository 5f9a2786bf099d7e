"""The OpenAI-compatible API of a two-node demo swarm, spoken to by the official `openai` client.

Every answer is checked against `cake-swarm generate` on one node (no daemon): the pipeline across two
processes must give exactly the single-node tokens, through either node, streamed or not. Structured
output is checked against its JSON schema (jsonschema), log-probabilities against the float32 log-softmax
of the engine's own logits for the same tokens."""

from __future__ import annotations

import asyncio
import json
import math

import aiohttp
import jsonschema
import mlx.core as mx
import numpy as np
import openai
import pytest

from tests.swarm_harness import cli_generate, demo_pair, own_sessions, ready_swarm, wait_for, wait_idle

STORY = "Once upon a time"
CHAT = "The little dog wanted to"
MAX_TOKENS = 40
B_MAX_SESSIONS = 4  # b's --max-batch, with no queue: the fifth request at once is refused as busy


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("openai-swarm")


@pytest.fixture(scope="module")
def swarm(workdir):
    with ready_swarm(demo_pair(workdir, args_b=("--max-batch", str(B_MAX_SESSIONS), "--max-queue", "0")), nodes=2) as daemons:
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


async def test_past_the_batch_and_queue_503_with_retry_after(swarm):
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


# --- structured output, tools, logprobs and the rest of the API (issue 15) -------------------------------

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "mood"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "mood": {"enum": ["happy", "sad", "sleepy"]}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city", "days"],
    "properties": {"city": {"type": "string", "maxLength": 10}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_strict_json_schema_answer_parses_and_satisfies_the_schema(swarm, temperature):
    answer = client(swarm[1]).chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Tell me about Lily"}], max_tokens=120, seed=3,
        temperature=temperature, response_format={"type": "json_schema", "json_schema": {
            "name": "person", "schema": PERSON, "strict": True}})
    jsonschema.validate(json.loads(answer.choices[0].message.content), PERSON)
    assert answer.choices[0].finish_reason == "stop"  # the grammar completed the text
    streamed = client(swarm[0]).chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Tell me about Lily"}], max_tokens=120, seed=3,
        temperature=temperature, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
        stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == answer.choices[0].message.content  # through the other node, streamed: the same draws
    # any object: a story model fills free keys with prose, so it may run out of tokens; what it wrote is JSON so far
    free = client(swarm[0]).chat.completions.create(model="demo", messages=[{"role": "user", "content": "Lily"}],
                                                    max_tokens=60, temperature=temperature, seed=3,
                                                    response_format={"type": "json_object"}).choices[0]
    assert free.message.content.startswith("{")
    if free.finish_reason == "stop":
        assert isinstance(json.loads(free.message.content), dict)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_named_tool_choice_gives_a_call_whose_arguments_satisfy_the_schema(swarm, stream):
    args = dict(model="demo", messages=[{"role": "user", "content": "What is the weather in Paris?"}], max_tokens=100,
                tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    if stream:
        chunks = list(client(swarm[0]).chat.completions.create(stream=True, **args))
        calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
        reason = chunks[-1].choices[0].finish_reason
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    else:
        answer = client(swarm[0]).chat.completions.create(**args)
        calls, reason = answer.choices[0].message.tool_calls, answer.choices[0].finish_reason
        assert answer.choices[0].message.content is None
    assert reason == "tool_calls" and len(calls) == 1
    assert calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])


def test_a_demo_without_a_tools_template_refuses_tool_choice_auto(swarm):
    with pytest.raises(openai.BadRequestError) as e:
        client(swarm[0], max_retries=0).chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER])
    assert e.value.body["param"] == "tool_choice" and e.value.body["code"] == "unsupported_value"


def reference_log_softmax(workdir, monkeypatch, ids: list[int], n: int) -> np.ndarray:
    """float32 log-softmax of the demo's logits (one stage, no daemon) at the positions that chose the last n of ids."""
    from swarm.model.decoder import load_stage
    from swarm.model.source import resolve_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(workdir / "xdg"))
    stage = load_stage(resolve_model("demo"))
    logits = stage(mx.array([ids[:-1]]), stage.make_cache(), all_logits=True)[0, -n:].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_top_logprobs_are_the_engines_log_softmax(swarm, workdir, monkeypatch, stream):
    args = dict(model="demo", messages=[{"role": "user", "content": STORY}], max_tokens=8, logprobs=True,
                top_logprobs=3, extra_body={"return_token_ids": True})
    if stream:
        chunks = [c for c in client(swarm[1]).chat.completions.create(stream=True, **args) if c.choices]
        entries = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        ids = [t for c in chunks for t in c.choices[0].model_dump().get("token_ids") or []]
        prompt = chunks[0].model_dump()["prompt_token_ids"]
    else:
        answer = client(swarm[1]).chat.completions.create(**args)
        entries, ids = answer.choices[0].logprobs.content, answer.choices[0].model_dump()["token_ids"]
        prompt = answer.model_dump()["prompt_token_ids"]
        assert "".join(e.token for e in entries) == answer.choices[0].message.content
    assert len(entries) == len(ids) == 8
    reference = reference_log_softmax(workdir, monkeypatch, prompt + ids, 8)
    for entry, token, ref in zip(entries, ids, reference):
        tops = entry.top_logprobs
        assert len(tops) == 3 and tops[0].logprob == entry.logprob  # greedy: the chosen token is the likeliest
        assert [t.logprob for t in tops] == sorted((t.logprob for t in tops), reverse=True)
        assert sum(math.exp(t.logprob) for t in tops) <= 1 + 1e-6
        assert abs(entry.logprob - ref[token]) < 1e-4
        best = np.argsort(-ref)[:3]
        assert np.allclose([t.logprob for t in tops], ref[best], atol=1e-4)
        assert bytes(entry.bytes).decode() == entry.token


def test_completions_logprobs_whole_and_streamed_agree(swarm):
    args = dict(model="demo", prompt=STORY, max_tokens=6, logprobs=2)
    whole = client(swarm[0]).completions.create(**args).choices[0]
    chunks = [c.choices[0] for c in client(swarm[0]).completions.create(stream=True, **args)]
    streamed = [t for c in chunks if c.logprobs for t in c.logprobs.token_logprobs]
    assert whole.logprobs.token_logprobs == streamed and len(streamed) == 6
    assert "".join(whole.logprobs.tokens) == whole.text
    assert whole.logprobs.text_offset == [sum(len(t) for t in whole.logprobs.tokens[:i]) for i in range(6)]
    assert all(len(top) == 2 and max(top.values()) == lp for top, lp in zip(whole.logprobs.top_logprobs, streamed))


def test_content_parts_give_the_plain_contents_answer(swarm, cli):
    parts = [{"type": "text", "text": CHAT[:9]}, {"type": "text", "text": CHAT[9:]}]
    answer = client(swarm[0]).chat.completions.create(model="demo", messages=[{"role": "user", "content": parts}],
                                                      max_tokens=MAX_TOKENS)
    assert answer.choices[0].message.content == cli["chat"]


def test_models_retrieve_and_an_unknown_model(swarm):
    assert client(swarm[1]).models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError) as e:
        client(swarm[1], max_retries=0).models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found"


def test_max_completion_tokens_wins_logit_bias_and_penalties_reach_the_sampler(swarm, cli):
    c = client(swarm[0])
    both = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": CHAT}], max_tokens=20,
                                     max_completion_tokens=7)
    assert both.usage.completion_tokens == 7
    first = c.completions.create(model="demo", prompt=STORY, max_tokens=1, logprobs=2).choices[0].logprobs
    _, second = sorted(first.top_logprobs[0].items(), key=lambda kv: -kv[1])
    ids = c.completions.create(model="demo", prompt=STORY, max_tokens=2, extra_body={"return_token_ids": True})
    banned = ids.choices[0].model_dump()["token_ids"][0]
    biased = c.completions.create(model="demo", prompt=STORY, max_tokens=1, logit_bias={str(banned): -100})
    # the runner-up, once the favourite is banned (the first piece of a text loses its leading space)
    assert biased.choices[0].text == second[0].lstrip()
    plain = c.completions.create(model="demo", prompt=STORY, max_tokens=MAX_TOKENS).choices[0].text
    assert plain == cli["story"]
    penalised = [c.completions.create(model="demo", prompt=STORY, max_tokens=MAX_TOKENS, frequency_penalty=2.0,
                                      presence_penalty=1.0).choices[0].text for _ in range(2)]
    assert penalised[0] == penalised[1] != plain
    # top_p 0 keeps only the likeliest token: greedy whatever the temperature
    assert c.completions.create(model="demo", prompt=STORY, max_tokens=MAX_TOKENS, temperature=1.5, top_p=0,
                                seed=5).choices[0].text == plain
