"""OpenAI's Responses API on a demo solo_demo, through the official `openai` client: text (equal to
`cake-swarm generate` on one node), the stream's events, structured output through text.format, a
required tool call whose arguments satisfy the schema, function call items in the input, and refusals."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.swarm_harness import SOLO_CHAT as CHAT, SOLO_MAX_TOKENS as MAX_TOKENS

PARAMETERS = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
              "properties": {"city": {"type": "string", "maxLength": 10}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": PARAMETERS}


def client(solo_demo) -> openai.OpenAI:
    return openai.OpenAI(base_url=solo_demo.url + "/v1", api_key="unused", max_retries=0)


def test_text_and_usage(solo_demo, solo_demo_answer):
    response = client(solo_demo).responses.create(model="demo", input=CHAT, max_output_tokens=MAX_TOKENS)
    assert response.object == "response" and response.output_text == solo_demo_answer
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == MAX_TOKENS and response.usage.total_tokens > MAX_TOKENS
    as_items = client(solo_demo).responses.create(model="demo", max_output_tokens=MAX_TOKENS, input=[
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": CHAT}]}])
    assert as_items.output_text == solo_demo_answer


def test_stream_events(solo_demo, solo_demo_answer):
    events = list(client(solo_demo).responses.create(model="demo", input=CHAT, max_output_tokens=MAX_TOKENS, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == solo_demo_answer
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output[0].content[0].text == solo_demo_answer


def test_text_format_json_schema(solo_demo):
    response = client(solo_demo).responses.create(model="demo", input="Lily", max_output_tokens=80, text={"format": {
        "type": "json_schema", "name": "weather", "schema": PARAMETERS, "strict": True}})
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), PARAMETERS)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_required_tool_call(solo_demo, stream):
    args = dict(model="demo", input="Weather in Paris?", max_output_tokens=80, tools=[TOOL], tool_choice="required")
    if stream:
        events = list(client(solo_demo).responses.create(stream=True, **args))
        assert "response.function_call_arguments.done" in [e.type for e in events]
        output = events[-1].response.output
    else:
        output = client(solo_demo).responses.create(**args).output
    (call,) = output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), PARAMETERS)


def test_function_call_items_in_the_input_and_refusals(solo_demo):
    c = client(solo_demo)
    response = c.responses.create(model="demo", max_output_tokens=4, instructions="Be brief.", input=[
        {"role": "user", "content": "Weather?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}])
    assert response.usage.output_tokens == 4
    for bad, param in ((dict(previous_response_id="resp_1"), "previous_response_id"), (dict(store=True), "store"),
                       (dict(max_output_tokens=0), "max_output_tokens"),
                       (dict(text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}), "text.format")):
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(model="demo", input="x", **{"max_output_tokens": 4, **bad})
        assert e.value.body["param"] == param and e.value.body["code"], bad
