"""Anthropic's Messages API on a demo solo_demo, spoken to by the official `anthropic` client: text (equal to
`cake-swarm generate` on one node), streaming events, stop sequences, forced tool use whose input
satisfies the tool's schema, and refusals in Anthropic's error shape."""

from __future__ import annotations

import anthropic
import jsonschema
import pytest

from tests.swarm_harness import SOLO_CHAT as CHAT, SOLO_MAX_TOKENS as MAX_TOKENS

WEATHER = {"name": "get_weather", "description": "The weather in a city", "input_schema": {
    "type": "object", "additionalProperties": False, "required": ["city", "days"],
    "properties": {"city": {"type": "string", "maxLength": 10}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}


def client(solo_demo) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=solo_demo.url, api_key="unused", max_retries=0)


def test_text_equals_one_nodes_generate(solo_demo, solo_demo_answer):
    message = client(solo_demo).messages.create(model="demo", max_tokens=MAX_TOKENS,
                                             messages=[{"role": "user", "content": CHAT}])
    assert message.type == "message" and message.role == "assistant" and message.model == "demo"
    assert [b.type for b in message.content] == ["text"] and message.content[0].text == solo_demo_answer
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == MAX_TOKENS
    assert message.usage.input_tokens > 0


def test_streamed_text_and_events(solo_demo, solo_demo_answer):
    with client(solo_demo).messages.stream(model="demo", max_tokens=MAX_TOKENS,
                                        messages=[{"role": "user", "content": [{"type": "text", "text": CHAT}]}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == solo_demo_answer and final.content[0].text == solo_demo_answer
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == MAX_TOKENS


def test_a_stop_sequence_is_named(solo_demo, solo_demo_answer):
    stop = solo_demo_answer.split()[3]
    message = client(solo_demo).messages.create(model="demo", max_tokens=MAX_TOKENS, stop_sequences=["zzz", stop],
                                             messages=[{"role": "user", "content": CHAT}])
    assert message.content[0].text == solo_demo_answer[:solo_demo_answer.index(stop)]
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_forced_tool_use_satisfies_the_schema(solo_demo, stream):
    args = dict(model="demo", max_tokens=100, tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"},
                messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    if stream:
        with client(solo_demo).messages.stream(**args) as s:
            kinds = [e.type for e in s]
            message = s.get_final_message()
        assert "content_block_start" in kinds and kinds[-1] == "message_stop"
    else:
        message = client(solo_demo).messages.create(**args)
    assert message.stop_reason == "tool_use"
    (block,) = message.content
    assert block.type == "tool_use" and block.name == "get_weather" and block.id.startswith("toolu_")
    jsonschema.validate(block.input, WEATHER["input_schema"])


def test_a_tool_result_conversation_and_mistakes_in_anthropics_shape(solo_demo):
    c = client(solo_demo)
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                  "input": {"city": "Paris", "days": 1}}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}]
    answer = c.messages.create(model="demo", max_tokens=5, system="Be brief.", messages=history)
    assert answer.content[0].type == "text" and answer.usage.output_tokens == 5
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model="demo", max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    assert e.value.body["error"]["param"] == "messages[0].content"
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model="demo", max_tokens=5, messages=[{"role": "user", "content": "x"}], extra_body={"top_k": -1})
    assert e.value.body["error"]["param"] == "top_k"
