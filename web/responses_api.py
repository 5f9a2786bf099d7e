"""OpenAI's Responses API (POST /v1/responses), streaming and not, as a thin adapter over the one validation
layer and generation path: `input` (a string, or message, function_call and function_call_output
items) and `instructions` become chat messages; `text.format` becomes the response format; the answer
goes back as output items (message with output_text, function_call) with usage and, streamed, the
Responses events. Nothing is stored: `store: true` and `previous_response_id` are refused.
"""

from __future__ import annotations

import time
import uuid

from aiohttp import web

from swarm.pipeline import SwarmError
from web import tools as toolkit
from web import validation as v
from web.common import (NODE, SWARM_CODES, model_id, open_stream, pieces, read_job, request_error, respond,
                        send_event, swarm_error)
from web.generation import Deltas, Generation

FIELDS = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "tools", "tool_choice",
          "parallel_tool_calls", "text", "stream", "metadata", "user", "service_tier", "truncation"}
OFF = {"store": False, "previous_response_id": None, "reasoning": None, "include": [], "background": False,
       "prompt": None, "max_tool_calls": None, "top_logprobs": None, "conversation": None}
NAMES = {"max_tokens": "max_output_tokens", "grammar": "text.format", "tools": "tools", "tool_choice": "tool_choice",
         "prompt": "input"}


# --- the request ---------------------------------------------------------------------------------------

def input_messages(body: dict) -> list[dict]:
    """instructions + input as chat messages; function calls join the assistant message before them."""
    out = [{"role": "system", "content": v.typed(body, "instructions", str)}] if body.get("instructions") else []
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise v.RequestError("input must be a string or a non-empty list of items", "input", "invalid_type")
    for i, item in enumerate(items):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            out.append({"role": item.get("role"), "content": item.get("content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            if not (out and out[-1]["role"] == "assistant" and not out[-1]["content"]):
                out.append({"role": "assistant", "content": None, "tool_calls": []})
            out[-1].setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output")})
        else:
            raise v.RequestError(f"input[{i}]: items of type {kind!r} are not supported", "input", "unsupported_content")
    return v.messages(out, "input")


def tools_and_choice(body: dict) -> tuple[list[dict], str | dict]:
    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) and t.get("type") == "function" for t in tools):
        raise v.RequestError("tools: only function tools {type: function, name, parameters} are supported", "tools",
                             "unsupported_value")
    functions = [toolkit.function_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        return functions, toolkit.named_choice(choice.get("name"), functions, "tool_choice")
    return functions, toolkit.tool_choice(choice, functions)


def parse(body: dict) -> tuple[v.Prompt, object]:
    v.refuse_unknown(body, FIELDS, OFF)
    if body.get("truncation") not in (None, "disabled"):
        raise v.RequestError("truncation must be disabled: a prompt too long is refused", "truncation",
                             "unsupported_value")
    text = v.typed(body, "text", dict, {})
    params = v.sampling(body, v.token_limit(body, "max_output_tokens"))
    fmt = v.typed(text, "format", dict, None, param="text.format")
    if fmt is not None and fmt.get("type") == "json_schema":  # Responses put the schema beside the type
        fmt = {"type": "json_schema", "json_schema": {"schema": fmt.get("schema")}}
    params.grammar = v.response_format({"text.format": fmt}, "text.format")
    tools, choice = tools_and_choice(body)
    prompt = v.Prompt(messages=input_messages(body), tools=tools, tool_choice=choice,
                      parallel_tool_calls=v.flag(body, "parallel_tool_calls", True))
    return prompt, params


# --- the answer ----------------------------------------------------------------------------------------

class Response:
    """The response object as it grows: its output items, and the events that announce them."""

    def __init__(self, node, body: dict, prompt: v.Prompt):
        self.id = "resp_" + uuid.uuid4().hex
        self.node, self.body, self.prompt = node, body, prompt
        self.created = int(time.time())
        self.output: list[dict] = []

    def as_dict(self, status: str, gen: Generation | None = None) -> dict:
        usage = None
        if gen is not None:
            usage = {"input_tokens": len(gen.prompt), "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens": len(gen.token_ids), "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": len(gen.prompt) + len(gen.token_ids)}
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        choice = self.prompt.tool_choice
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None,
                "incomplete_details": incomplete, "instructions": self.body.get("instructions"),
                "max_output_tokens": self.body.get("max_output_tokens"), "model": model_id(self.node),
                "output": self.output, "parallel_tool_calls": self.prompt.parallel_tool_calls,
                "temperature": self.body.get("temperature"), "top_p": self.body.get("top_p"),
                "tool_choice": {"type": "function", **choice} if isinstance(choice, dict) else choice,
                "tools": [{"type": "function", **t} for t in self.prompt.tools],
                "text": self.body.get("text") or {"format": {"type": "text"}}, "store": False,
                "metadata": self.body.get("metadata") or {}, "usage": usage}

    def message(self, text: str, status: str = "completed") -> dict:
        return {"type": "message", "id": "msg_" + self.id[5:], "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}

    @staticmethod
    def function_call(call: dict) -> dict:
        return {"type": "function_call", "id": "fc_" + call["id"].removeprefix("call_"), "call_id": call["id"],
                "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}


def status_of(gen: Generation, answer: Deltas) -> str:
    return "incomplete" if answer.finish_reason(gen) == "length" else "completed"


async def responses(request: web.Request) -> web.StreamResponse:
    try:
        body, prompt, job = await read_job(request, parse, NAMES)
        stream = v.flag(body, "stream")
    except v.RequestError as e:
        return request_error(e)
    except SwarmError as e:
        return swarm_error(e)
    reply = Response(request.app[NODE], body, prompt)

    def whole(gen: Generation, answer: Deltas) -> web.Response:
        reply.output = [reply.message(answer.text)] if answer.text or not answer.calls else []
        reply.output += [reply.function_call(c) for c in answer.calls]
        return web.json_response(reply.as_dict(status_of(gen, answer), gen))
    return await respond(request, job, stream, whole,
                         lambda gen, answer: _stream(request, reply, gen, answer), swarm_error)


async def _stream(request: web.Request, reply: Response, gen: Generation, answer: Deltas) -> web.StreamResponse:
    response = await open_stream(request)
    sequence = 0
    message: dict | None = None   # the message item being written, while one is

    async def event(kind: str, **data) -> None:
        nonlocal sequence
        await send_event(response, {"type": kind, "sequence_number": sequence, **data}, kind)
        sequence += 1

    async def close_message() -> None:
        nonlocal message
        if message is None:
            return
        text, where = message["content"][0]["text"], dict(item_id=message["id"], output_index=len(reply.output) - 1)
        await event("response.output_text.done", **where, content_index=0, text=text, logprobs=[])
        await event("response.content_part.done", **where, content_index=0, part=message["content"][0])
        message["status"] = "completed"
        await event("response.output_item.done", output_index=where["output_index"], item=message)
        message = None

    try:
        await event("response.created", response=reply.as_dict("in_progress"))
        await event("response.in_progress", response=reply.as_dict("in_progress"))
        try:
            async for delta in pieces(gen, answer):
                if delta is None:
                    continue
                if delta.text:
                    if message is None:
                        message = reply.message("", "in_progress")
                        reply.output.append(message)
                        await event("response.output_item.added", output_index=len(reply.output) - 1, item=message)
                        message["content"] = [{"type": "output_text", "text": "", "annotations": []}]
                        await event("response.content_part.added", item_id=message["id"],
                                    output_index=len(reply.output) - 1, content_index=0, part=message["content"][0])
                    message["content"][0]["text"] += delta.text
                    await event("response.output_text.delta", item_id=message["id"], output_index=len(reply.output) - 1,
                                content_index=0, delta=delta.text, logprobs=[])
                for call in delta.calls:
                    await close_message()
                    item = reply.function_call(call)
                    reply.output.append(item)
                    where = dict(item_id=item["id"], output_index=len(reply.output) - 1)
                    await event("response.output_item.added", output_index=where["output_index"],
                                item={**item, "arguments": "", "status": "in_progress"})
                    await event("response.function_call_arguments.delta", **where, delta=item["arguments"])
                    await event("response.function_call_arguments.done", **where, arguments=item["arguments"])
                    await event("response.output_item.done", output_index=where["output_index"], item=item)
            await close_message()
            status = status_of(gen, answer)
            await event(f"response.{status}", response=reply.as_dict(status, gen))
        except SwarmError as e:
            await event("error", code=SWARM_CODES.get(e.status), message=str(e), param=None)
    except ConnectionResetError:
        pass  # the client left; leaving the `async with` ends the session on every stage
    return response
