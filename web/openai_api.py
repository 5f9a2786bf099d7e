"""OpenAI-compatible endpoints: GET /v1/models(/{id}), POST /v1/completions and /v1/chat/completions.

What a client can rely on:
- One model per swarm: any "model" value is accepted; answers carry the swarm's model id (/v1/models).
- "prompt" is a string, a list of token ids, or a one-element list of either; "n" must be 1.
- Sampling as OpenAI defines it: max_completion_tokens (over max_tokens), temperature, top_p, seed, stop,
  presence_penalty, frequency_penalty, logit_bias; top_k, min_p and repetition_penalty as vLLM accepts them.
- response_format json_object and json_schema (strict or not: the text always follows the schema), and as
  extensions {"type": "regex", "pattern"} and {"type": "lark", "grammar"}: decoding is constrained.
- tools and tool_choice (none, auto, required, or a named function): tools are rendered through the
  model's chat template, calls parsed back into tool_calls (streamed as whole calls); required or a named
  function forces one call whose arguments follow the function's schema, on any model (web/tools.py).
- logprobs / top_logprobs (chat) and logprobs (completions, the number of alternatives), up to 20, from
  the model's own distribution (before penalties, bias and grammar).
- Content parts: text parts are joined into the message's text; other kinds are refused.
- "stream": true answers as server-sent events ending with `data: [DONE]`;
  "stream_options": {"include_usage": true} adds a last chunk with the usage.
- "return_token_ids": true adds the generated ids to each choice as `token_ids` (in a stream, the ids
  behind that chunk's text; all chunks together give every id, EOS included) and the prompt's ids as
  `prompt_token_ids`, as vLLM does.
- Errors are OpenAI's error JSON (message, type, param, code): 400 for a client's mistake (web/validation.py),
  503 busy or not ready with Retry-After, 504 when the pipeline stalls. An error after a stream began comes
  as a `data: {"error": ...}` event before `[DONE]`.
"""

from __future__ import annotations

import time
import uuid

from aiohttp import web

from swarm.pipeline import SwarmError
from web import tools as toolkit
from web import validation as v
from web.common import (NODE, SWARM_CODES, Job, error_body, error_response, model_id, open_stream,
                        read_job, request_error, respond, send_event, swarm_error)
from web.generation import Delta, Deltas, Generation

SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "logit_bias", "seed", "stop", "n", "user", "metadata",
                   "service_tier", "stream", "stream_options", "return_token_ids", "logprobs"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                                 "tool_choice", "parallel_tool_calls"}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "best_of", "response_format"}
# OpenAI's parameters with no meaning here: refused unless they hold the value that means "off"
CHAT_OFF = {"store": False, "audio": None, "modalities": ["text"], "prediction": None, "functions": None,
            "function_call": None, "web_search_options": None, "reasoning_effort": None}
COMPLETION_OFF = {"echo": False, "suffix": None, "store": False}


# --- models --------------------------------------------------------------------------------------------

def model_card(node) -> dict:
    return {"id": model_id(node), "object": "model", "created": int(node.started), "owned_by": "cake-swarm"}


async def models(request: web.Request) -> web.Response:
    node = request.app[NODE]
    return web.json_response({"object": "list", "data": [model_card(node)] if model_id(node) else []})


async def model(request: web.Request) -> web.Response:
    node, wanted = request.app[NODE], request.match_info["model"]
    if not model_id(node) or wanted != model_id(node):
        return error_response(404, f"the model {wanted!r} does not exist here; this swarm runs {model_id(node)!r}",
                              "model_not_found", "model")
    return web.json_response(model_card(node))


# --- requests ------------------------------------------------------------------------------------------

def chat_request(body: dict, fields: set[str] = CHAT_FIELDS, needs_messages: bool = True) -> tuple[v.Prompt, object]:
    """A chat body -> (Prompt, SamplingParams); RequestError for anything wrong or unsupported."""
    v.refuse_unknown(body, fields, CHAT_OFF)
    v.only_one(body, "n")
    max_tokens = v.token_limit(body, "max_completion_tokens", "max_tokens")
    params = v.sampling(body, max_tokens)
    params.logprobs = v.top_logprobs(body, "top_logprobs", v.flag(body, "logprobs"))
    params.grammar = v.response_format(body)
    tools = toolkit.tool_definitions(body.get("tools"))
    prompt = v.Prompt(tool_choice=toolkit.tool_choice(body.get("tool_choice"), tools), tools=tools,
                      parallel_tool_calls=v.flag(body, "parallel_tool_calls", True))
    if needs_messages or "messages" in body:
        prompt.messages = v.messages(body.get("messages"))
    return prompt, params


def completion_request(body: dict) -> tuple[v.Prompt, object]:
    v.refuse_unknown(body, COMPLETION_FIELDS, COMPLETION_OFF)
    v.only_one(body, "n")
    v.only_one(body, "best_of")
    if "prompt" not in body:
        raise v.RequestError("prompt is required", "prompt", "missing_required_parameter")
    params = v.sampling(body, v.token_limit(body, "max_tokens"))
    params.logprobs = v.top_logprobs(body, "logprobs", True) if body.get("logprobs") is not None else None
    params.grammar = v.response_format(body)
    return v.completion_prompt(body["prompt"]), params


def stream_options(body: dict) -> bool:
    """Whether a stream ends with a usage chunk."""
    options = v.typed(body, "stream_options", dict, {})
    return v.flag(options, "include_usage") if options else False


# --- replies -------------------------------------------------------------------------------------------

def chat_logprobs(node, delta: Delta) -> list[dict]:
    """OpenAI's per-token entries for the tokens behind one piece of a chat answer (EOS left out)."""
    def entry(token: int, logprob: float) -> dict:
        raw = node.tokenizer.token_bytes(token) if node.tokenizer else b""
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}
    return [{**entry(c.token, c.logprob), "top_logprobs": [entry(t, lp) for t, lp in c.top or []]}
            for c in delta.choices if c.logprob is not None and c.token not in node.eos_ids]


def completion_logprobs(node, delta: Delta, offset: int) -> dict:
    """OpenAI's (legacy) completions logprobs for one piece: tokens, their logprobs, alternatives, offsets."""
    entries = chat_logprobs(node, delta)
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def merge_logprobs(parts: list[dict], chat: bool) -> dict:
    if chat:
        return {"content": [e for p in parts for e in p["content"]], "refusal": None}
    return {k: [x for p in parts for x in p[k]] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


class Reply:
    """The JSON objects of one answer, chat or completion, whole or in chunks."""

    def __init__(self, node, chat: bool, job: Job, with_ids: bool):
        self.node, self.chat, self.job, self.with_ids = node, chat, job, with_ids
        self.model = model_id(node)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.logprobs = job.params.logprobs is not None
        self._prompt_ids_due = True
        self._offset = 0         # completions' text_offset: where the next piece starts
        self._calls_sent = 0     # a stream's tool calls are numbered across chunks

    def _object(self, kind: str, choices: list, **extra) -> dict:
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices, **extra}
        if self.with_ids and self.chat and self._prompt_ids_due:
            out["prompt_token_ids"] = self.job.ids
        return out

    def _logprobs(self, delta: Delta) -> dict | None:
        if not self.logprobs:
            return None
        if self.chat:
            return {"content": chat_logprobs(self.node, delta), "refusal": None}
        out = completion_logprobs(self.node, delta, self._offset)
        self._offset += len(delta.text)
        return out

    def _choice(self, body: dict, reason: str | None, delta: Delta | None, logprobs: dict | None) -> dict:
        choice: dict = {"index": 0, **body, "logprobs": logprobs, "finish_reason": reason}
        if self.with_ids and delta is not None:
            choice["token_ids"] = [c.token for c in delta.choices]
            if not self.chat and self._prompt_ids_due:
                choice["prompt_token_ids"] = self.job.ids
        return choice

    def _kind(self, chunk: bool) -> str:
        return ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"

    def whole(self, gen: Generation, answer: Deltas) -> dict:
        deltas = answer.pieces
        everything = Delta(answer.text, answer.calls, [c for d in deltas for c in d.choices])
        if self.chat:
            message = {"role": "assistant", "content": answer.text or (None if answer.calls else "")}
            if answer.calls:
                message["tool_calls"] = answer.calls
            body = {"message": message}
        else:
            body = {"text": answer.text}
        logprobs = merge_logprobs([self._logprobs(d) for d in deltas], self.chat) if self.logprobs else None
        choice = self._choice(body, answer.finish_reason(gen), everything, logprobs)
        return self._object(self._kind(False), [choice], usage=gen.usage(), timings=gen.timings.as_dict())

    def chunk(self, delta: Delta, reason: str | None = None) -> dict:
        if self.chat:
            body: dict = {"content": delta.text} if delta.text else {}
            if delta.calls:
                body["tool_calls"] = [{"index": i, **c} for i, c in enumerate(delta.calls, self._calls_sent)]
                self._calls_sent += len(delta.calls)
            body = {"delta": body}
        else:
            body = {"text": delta.text}
        out = self._object(self._kind(True), [self._choice(body, reason, delta, self._logprobs(delta))])
        self._prompt_ids_due = False  # a stream gives the prompt's ids in its first chunk only
        return out

    def role_chunk(self) -> dict:
        out = self.chunk(Delta())
        out["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return out

    def usage_chunk(self, gen: Generation) -> dict:
        return self._object(self._kind(True), [], usage=gen.usage())


# --- handlers ------------------------------------------------------------------------------------------

async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=True)


async def _complete(request: web.Request, chat: bool) -> web.StreamResponse:
    node = request.app[NODE]
    try:
        body, _, job = await read_job(request, chat_request if chat else completion_request,
                                      {} if chat else {"top_logprobs": "logprobs"})
        stream, include_usage = v.flag(body, "stream"), stream_options(body)
        with_ids = v.flag(body, "return_token_ids")
    except v.RequestError as e:
        return request_error(e)
    except SwarmError as e:
        return swarm_error(e)
    reply = Reply(node, chat, job, with_ids)
    return await respond(request, job, stream, lambda gen, answer: web.json_response(reply.whole(gen, answer)),
                         lambda gen, answer: _stream(request, reply, gen, answer, include_usage), swarm_error)


async def _stream(request: web.Request, reply: Reply, gen: Generation, answer: Deltas,
                  include_usage: bool) -> web.StreamResponse:
    response = await open_stream(request)
    try:
        if reply.chat:
            await send_event(response, reply.role_chunk())
        try:
            async for choice, text, _ in gen:
                if (delta := answer.feed(choice, text)) is not None:
                    await send_event(response, reply.chunk(delta))
            await send_event(response, reply.chunk(answer.close() or Delta(), answer.finish_reason(gen)))
            if include_usage:
                await send_event(response, reply.usage_chunk(gen))
        except SwarmError as e:
            await send_event(response, error_body(e.status, str(e), None, SWARM_CODES.get(e.status)))
        await response.write(b"data: [DONE]\n\n")
    except ConnectionResetError:
        pass  # the client left; leaving the `async with` ends the session on every stage
    return response
