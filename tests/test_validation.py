"""Every client mistake is a 4xx with an error body (or an error frame), on a live demo daemon: the rows of
issue 14's table one by one, then hypothesis throwing random and mutated requests at every entry point
(/v1/chat/completions, /v1/completions, /v1/messages, /v1/responses, /ws/chat). Never a 5xx, never a
traceback in the log, and the node answers exactly as before afterwards."""

from __future__ import annotations

import asyncio
import json
import math

import aiohttp
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.swarm_harness import Daemon, free_port, ready_swarm

STORY = "Once upon a time"
REFERENCE = {"prompt": STORY, "max_tokens": 12}
FIELDS = ["messages", "prompt", "prompt_ids", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "seed", "stop", "n",
          "logprobs", "top_logprobs", "response_format", "tools", "tool_choice", "stream", "stream_options", "system",
          "stop_sequences", "input", "instructions", "max_output_tokens", "text", "audio", "echo", "store", "user"]
VALID = {
    "/v1/chat/completions": {"model": "demo", "messages": [{"role": "user", "content": STORY}], "max_tokens": 4},
    "/v1/completions": {"model": "demo", "prompt": STORY, "max_tokens": 4},
    "/v1/messages": {"model": "demo", "messages": [{"role": "user", "content": STORY}], "max_tokens": 4},
    "/v1/responses": {"model": "demo", "input": STORY, "max_output_tokens": 4},
    "/ws/chat": {"prompt": STORY, "max_tokens": 4},
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("validation")
    node = Daemon("solo", "127.0.0.1", free_port(), ["--model", "demo", "--no-mdns", "--speed", "1",
                                                     "--cache-dir", str(tmp / "cache")], tmp, {"XDG_CACHE_HOME": str(tmp / "xdg")})
    with ready_swarm([node], nodes=1):
        yield node


@pytest.fixture(scope="module")
def reference(daemon) -> str:
    return post(daemon, "/v1/completions", REFERENCE)[1]["choices"][0]["text"]


def post(daemon, path: str, body, raw: str | None = None) -> tuple[int, dict | str]:
    """One request, its status and its JSON (or, for a stream, its text)."""
    content = raw if raw is not None else json.dumps(body)  # NaN and Infinity stay as JSON's extensions write them

    async def run():
        async with aiohttp.ClientSession() as http, http.post(daemon.url + path, data=content.encode(), headers={
                "Content-Type": "application/json"}, timeout=aiohttp.ClientTimeout(total=60)) as r:
            if r.content_type == "text/event-stream":
                return r.status, await r.text()
            return r.status, await r.json()
    return asyncio.run(run())


def chat_socket(daemon, messages: list[str]) -> list[dict]:
    """Each message's last frame (done or error) on one /ws/chat connection."""
    async def run():
        frames = []
        async with aiohttp.ClientSession() as http, http.ws_connect(daemon.url + "/ws/chat") as ws:
            for message in messages:
                await ws.send_str(message)
                while (frame := await ws.receive_json(timeout=60))["type"] == "token":
                    pass
                frames.append(frame)
        return frames
    return asyncio.run(run())


def assert_openai_error(status: int, body: dict, param: str | None, code: str | None = None) -> None:
    assert 400 <= status < 500, (status, body)
    error = body["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["code"], body
    assert error["param"] == param, body
    if code:
        assert error["code"] == code, body


def assert_answers_as_before(daemon, reference: str) -> None:
    assert post(daemon, "/v1/completions", REFERENCE)[1]["choices"][0]["text"] == reference
    frame = chat_socket(daemon, [json.dumps(REFERENCE)])[0]
    assert frame["type"] == "done" and frame["usage"]["completion_tokens"] == 12
    log = daemon.log()
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]


# --- issue 14's table ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, param, code", [
    ("/v1/completions", {"prompt": [1, 600]}, "prompt", "invalid_token_id"),
    ("/v1/completions", {"prompt": [-1, 20]}, "prompt", "invalid_token_id"),
    ("/v1/completions", {"prompt": STORY, "seed": 2**70}, "seed", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": STORY}], "seed": -1}, "seed", "invalid_value"),
    ("/v1/completions", {"prompt": STORY, "n": 0}, "n", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": STORY}], "n": 2}, "n", "invalid_value"),
    ("/v1/completions", {"prompt": STORY, "logit_bias": {"512": 5}}, "logit_bias", "invalid_value"),
    ("/v1/completions", {"prompt": STORY, "logit_bias": {"3": 101}}, "logit_bias", "invalid_value"),
    ("/v1/completions", {"prompt": STORY, "presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
    ("/v1/completions", {"prompt": STORY, "frequency_penalty": "high"}, "frequency_penalty", "invalid_type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": STORY}], "response_format": {"type": "xml"}},
     "response_format", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": STORY}], "tools": [{"type": "function"}]},
     "tools", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": STORY}], "audio": {"voice": "x"}},
     "audio", "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": STORY}], "best_of": 2}, "best_of",
     "unknown_parameter"),
    ("/v1/completions", {"prompt": "story " * 5000}, "prompt", "context_length_exceeded"),
])
def test_each_mistake_is_a_400_naming_the_field(daemon, reference, path, body, param, code):
    status, answer = post(daemon, path, body)
    assert status == 400
    assert_openai_error(status, answer, param, code)


def test_a_body_past_the_size_limit_is_a_413(daemon):
    status, answer = post(daemon, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * (5 << 20)}]})
    assert status == 413 and answer["error"]["code"] == "request_too_large" and answer["error"]["message"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_temperature_that_is_no_finite_number(daemon, literal):
    status, answer = post(daemon, "/v1/completions", None, f'{{"prompt": "{STORY}", "temperature": {literal}}}')
    assert_openai_error(status, answer, "temperature")


def test_top_p_zero_keeps_the_likeliest_token(daemon, reference):
    status, answer = post(daemon, "/v1/completions", {**REFERENCE, "top_p": 0, "temperature": 1.0, "seed": 1})
    assert status == 200 and answer["choices"][0]["text"] == reference


def test_the_chat_socket_answers_mistakes_with_error_frames_and_stays_open(daemon, reference):
    mistakes = ["[1,2]", "null", '"hi"', "{not json", '{"prompt_ids": [1, 1000000]}', '{"prompt": "x", "seed": 1e30}',
                '{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', '{"prompt": "x", "tools": 3}']
    frames = chat_socket(daemon, mistakes + [json.dumps(REFERENCE)])
    params = [None, None, None, None, "prompt_ids", "seed", "temperature", "tools"]
    for frame, param in zip(frames, params):
        assert frame["type"] == "error" and frame["status"] == 400 and frame["message"], frame
        assert frame["error"]["param"] == param and frame["error"]["code"], frame
    assert frames[-1]["type"] == "done"
    assert_answers_as_before(daemon, reference)


# --- fuzzing the validation layer ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**80, max_value=2**80) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
# values that come close to valid ones: numbers at the edges of the ranges, token ids at the vocabulary's end
near_values = st.sampled_from([0, 1, -1, 2, 20, 21, 100, 101, 511, 512, 2**63, 0.5, 1.5, -0.5, math.nan, math.inf,
                               "", "x", [], {}, [1, 2], [-1], {"1": 1}, {"type": "json_object"},
                               {"type": "json_schema", "json_schema": {"schema": {"type": "integer"}}},
                               [{"type": "function", "function": {"name": "f"}}], "required", "auto",
                               [{"role": "user", "content": [{"type": "text", "text": "x"}]}]])


@st.composite
def requests(draw) -> tuple[str, dict | object]:
    path = draw(st.sampled_from(sorted(VALID)))
    if draw(st.integers(0, 9)) == 0:
        return path, draw(json_values)  # anything at all as the body
    body = dict(VALID[path])
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        body[name] = draw(near_values | json_values)
    if draw(st.booleans()):  # generation stays short whatever else changed
        body.update({k: 4 for k in ("max_tokens", "max_output_tokens") if k in VALID[path]})
    return path, body


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests())
def test_fuzzed_requests_get_an_answer_or_a_4xx_with_an_error_body(daemon, request):
    path, body = request
    if path == "/ws/chat":
        frame = chat_socket(daemon, [json.dumps(body)])[0]
        event(f"{path} {frame['type']}")
        assert frame["type"] == "done" or (frame["type"] == "error" and 400 <= frame["status"] < 500
                                           and frame["error"]["message"] and frame["error"]["code"]), frame
        return
    status, answer = post(daemon, path, body)
    event(f"{path} {status}")
    assert status == 200 or 400 <= status < 500, (status, answer)
    if status == 200 and isinstance(answer, str):  # a stream: whole, and never an error event
        assert '"error"' not in answer and ("data: [DONE]" in answer or "response.completed" in answer
                                            or "response.incomplete" in answer or "message_stop" in answer), answer
    elif status != 200:
        error = answer["error"]
        assert error["message"] and error["type"] and "param" in error and error["code"], answer


def test_after_the_fuzzing_the_node_answers_as_before(daemon, reference):
    assert_answers_as_before(daemon, reference)
