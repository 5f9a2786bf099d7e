"""Anthropic's Messages API (POST /v1/messages), streaming and not, as a thin adapter: the request becomes
OpenAI-shaped messages, tools and sampling for the one validation layer and generation path; the answer
goes back as Anthropic's content blocks (text, tool_use), stop reasons, usage and stream events.

Errors come in Anthropic's shape ({"type": "error", "error": {"type", "message"}}) with OpenAI's param
and code beside them.
"""

from __future__ import annotations

import json
import uuid

from aiohttp import web

from swarm.pipeline import SwarmError
from web import tools as toolkit
from web import validation as v
from web.common import NODE, SWARM_CODES, model_id, open_stream, pieces, read_job, respond, send_event
from web.generation import Deltas, Generation

FIELDS = {"model", "messages", "max_tokens", "system", "stop_sequences", "temperature", "top_p", "top_k", "stream",
          "tools", "tool_choice", "metadata", "service_tier"}
OFF = {"thinking": {"type": "disabled"}, "container": None, "mcp_servers": None}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               503: "overloaded_error", 504: "api_error"}
STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}
NAMES = {"max_tokens": "max_tokens", "stop": "stop_sequences", "tools": "tools", "tool_choice": "tool_choice"}


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> web.Response:
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    body = {"type": "error", "error": {"type": kind, "message": message, "param": param, "code": code}}
    return web.json_response(body, status=status, headers={"Retry-After": "2"} if status == 503 else None)


# --- the request ---------------------------------------------------------------------------------------

def block_text(content, param: str) -> str:
    """A tool result's or a system prompt's content: a string or text blocks."""
    return v.text_of(content, param)


def openai_messages(body: dict) -> list[dict]:
    """Anthropic's system and messages (text, tool_use and tool_result blocks) as OpenAI's messages."""
    out = []
    if body.get("system") is not None:
        out.append({"role": "system", "content": block_text(body["system"], "system")})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise v.RequestError("messages must be a non-empty list", "messages", "invalid_type")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise v.RequestError(f"{where}.role must be user or assistant", f"{where}.role")
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise v.RequestError(f"{where}.content must be a string or a list of blocks", f"{where}.content",
                                 "invalid_type")
        texts, calls = [], []
        for j, block in enumerate(blocks):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(block)
            elif kind == "tool_use" and message["role"] == "assistant":
                calls.append({"id": block.get("id"), "type": "function",
                              "function": {"name": block.get("name"), "arguments": block.get("input")}})
            elif kind == "tool_result" and message["role"] == "user":
                out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                            "content": block_text(block.get("content"), f"{where}.content[{j}].content")})
            else:
                raise v.RequestError(f"{where}.content[{j}]: blocks of type {kind!r} are not supported here",
                                     f"{where}.content", "unsupported_content")
        if texts or calls or not blocks:
            out.append({"role": message["role"], "content": texts, **({"tool_calls": calls} if calls else {})})
    return v.messages(out)


def tools_and_choice(body: dict) -> tuple[list[dict], str | dict, bool]:
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise v.RequestError("tools must be a list", "tools", "invalid_type")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
            raise v.RequestError(f"tools[{i}]: only client tools (name, description, input_schema) are supported",
                                 "tools", "unsupported_value")
    functions = [toolkit.function_tool(t, f"tools[{i}]", "input_schema") for i, t in enumerate(tools)]
    choice = v.typed(body, "tool_choice", dict, {"type": "auto"} if functions else {"type": "none"})
    kind = {"auto": "auto", "any": "required", "none": "none"}.get(choice.get("type"))
    if choice.get("type") == "tool":
        kind = toolkit.named_choice(choice.get("name"), functions, "tool_choice")
    elif kind is None or (kind != "none" and not functions):
        raise v.RequestError("tool_choice.type must be auto, any, tool (with tools) or none", "tool_choice")
    return functions, kind, not choice.get("disable_parallel_tool_use", False)


def parse(body: dict) -> tuple[v.Prompt, object]:
    v.refuse_unknown(body, FIELDS, OFF)
    if body.get("max_tokens") is None:
        raise v.RequestError("max_tokens is required", "max_tokens", "missing_required_parameter")
    params = v.sampling({**body, "stop": body.get("stop_sequences")}, v.token_limit(body, "max_tokens"))
    tools, choice, parallel = tools_and_choice(body)
    return v.Prompt(messages=openai_messages(body), tools=tools, tool_choice=choice, parallel_tool_calls=parallel), params


# --- the answer ----------------------------------------------------------------------------------------

def tool_block(call: dict) -> dict:
    return {"type": "tool_use", "id": "toolu_" + call["id"].removeprefix("call_"), "name": call["function"]["name"],
            "input": json.loads(call["function"]["arguments"])}


def stop_of(node, gen: Generation, answer: Deltas) -> tuple[str, str | None]:
    """(stop_reason, the stop sequence that ended the text or None)."""
    reason = answer.finish_reason(gen)
    if reason != "stop":
        return STOP_REASONS.get(reason, reason), None
    if (gen.token_ids and gen.token_ids[-1] in node.eos_ids) or not gen.params.stop or node.tokenizer is None:
        return "end_turn", None
    rest = node.tokenizer.decode(gen.token_ids)[len(gen.text):]  # what the stop checker held back
    hit = next((s for s in gen.params.stop if s in rest), None)
    return ("stop_sequence", hit) if hit else ("end_turn", None)


def message(node, gen: Generation | None, message_id: str, blocks: list, stop: tuple = (None, None)) -> dict:
    usage = {"input_tokens": len(gen.prompt) if gen else 0, "output_tokens": len(gen.token_ids) if gen else 0}
    return {"id": message_id, "type": "message", "role": "assistant", "model": model_id(node), "content": blocks,
            "stop_reason": stop[0], "stop_sequence": stop[1], "usage": usage}


async def messages(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    try:
        body, _, job = await read_job(request, parse, NAMES)
        stream = v.flag(body, "stream")
    except v.RequestError as e:
        return error(e.status, str(e), e.param, e.code)
    except SwarmError as e:
        return error(e.status, str(e), None, SWARM_CODES.get(e.status))
    message_id = "msg_" + uuid.uuid4().hex[:24]

    def whole(gen: Generation, answer: Deltas) -> web.Response:
        blocks = [{"type": "text", "text": answer.text}] if answer.text or not answer.calls else []
        blocks += [tool_block(c) for c in answer.calls]
        return web.json_response(message(node, gen, message_id, blocks, stop_of(node, gen, answer)))
    return await respond(request, job, stream, whole,
                         lambda gen, answer: _stream(request, node, gen, answer, message_id),
                         lambda e: error(e.status, str(e), None, SWARM_CODES.get(e.status)))


async def _stream(request: web.Request, node, gen: Generation, answer: Deltas, message_id: str) -> web.StreamResponse:
    response = await open_stream(request)
    index, text_open = 0, False

    async def event(kind: str, **data) -> None:
        await send_event(response, {"type": kind, **data}, kind)

    try:
        await event("message_start", message=message(node, gen, message_id, []))
        await event("ping")
        try:
            async for delta in pieces(gen, answer):
                if delta is None:
                    continue
                if delta.text:
                    if not text_open:
                        await event("content_block_start", index=index, content_block={"type": "text", "text": ""})
                        text_open = True
                    await event("content_block_delta", index=index, delta={"type": "text_delta", "text": delta.text})
                for call in delta.calls:
                    if text_open:
                        await event("content_block_stop", index=index)
                        index, text_open = index + 1, False
                    block = tool_block(call)
                    await event("content_block_start", index=index, content_block={**block, "input": {}})
                    await event("content_block_delta", index=index,
                                delta={"type": "input_json_delta", "partial_json": call["function"]["arguments"]})
                    await event("content_block_stop", index=index)
                    index += 1
            if text_open:
                await event("content_block_stop", index=index)
            reason, sequence = stop_of(node, gen, answer)
            await event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                        usage={"output_tokens": len(gen.token_ids)})
            await event("message_stop")
        except SwarmError as e:
            await event("error", error={"type": ERROR_TYPES.get(e.status, "api_error"), "message": str(e)})
    except ConnectionResetError:
        pass  # the client left; leaving the `async with` ends the session on every stage
    return response
