"""OpenAI-compatible endpoints: GET /v1/models, POST /v1/completions and /v1/chat/completions.

What a client can rely on:
- One model per swarm: any "model" value is accepted; answers carry the swarm's model id (/v1/models).
- "prompt" is a string, a list of token ids, or a one-element list of either; "n" must be 1.
- max_tokens (or max_completion_tokens), temperature, top_p, seed and stop (a string or a list) as
  OpenAI defines them; top_k, min_p and repetition_penalty as vLLM accepts them.
- Chat on a model without a chat template (a base model, like the demo): the messages' contents joined
  by newlines, with the tokenizer's BOS, so a one-message chat continues that message exactly as
  `cake-swarm generate --prompt MESSAGE` does.
- "stream": true answers as server-sent events ending with `data: [DONE]`;
  "stream_options": {"include_usage": true} adds a last chunk with the usage.
- "return_token_ids": true adds the generated ids to each choice as `token_ids` (in a stream, the ids
  behind that chunk's text; all chunks together give every id, EOS included) and the prompt's ids as
  `prompt_token_ids`, as vLLM does.
- Errors are OpenAI's error JSON with the swarm's status: 400 bad request or prompt too long, 503 busy
  (past the session limit) or not ready, with Retry-After; 504 when the pipeline stalls. An error after
  a stream began comes as a `data: {"error": ...}` event before `[DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid

from aiohttp import web

from swarm.pipeline import SwarmError
from web.common import METER, NODE, encode_prompt, error_body, error_response, model_id, sampling_params
from web.generation import Generation


async def models(request: web.Request) -> web.Response:
    node = request.app[NODE]
    name = model_id(node)
    data = [{"id": name, "object": "model", "created": int(node.started), "owned_by": "cake-swarm"}] if name else []
    return web.json_response({"object": "list", "data": data})


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=True)


def _prompt_fields(body: dict, chat: bool) -> dict:
    """The request's prompt as encode_prompt takes it."""
    if chat:
        return {"messages": body["messages"]}
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return {"prompt_ids": prompt}
    raise ValueError("prompt must be a string or a list of token ids (one prompt per request)")


def _check_supported(body: dict) -> None:
    if int(body.get("n") or 1) != 1:
        raise ValueError("n must be 1")
    for name in ("logprobs", "echo", "top_logprobs"):
        if body.get(name):
            raise ValueError(f"{name} is not supported")


class Reply:
    """The JSON objects of one answer, chat or completion, whole or in chunks."""

    def __init__(self, chat: bool, model: str, prompt: list[int], with_ids: bool):
        self.chat, self.model, self.prompt, self.with_ids = chat, model, prompt, with_ids
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self._prompt_ids_due = True

    def _object(self, kind: str, choices: list, **extra) -> dict:
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices, **extra}
        if self.with_ids and self.chat and self._prompt_ids_due:
            out["prompt_token_ids"] = self.prompt
        return out

    def _choice(self, text: str | None, reason: str | None, ids: list[int] | None, delta: bool) -> dict:
        choice: dict = {"index": 0}
        if self.chat:
            content = {} if text is None else {"content": text}
            choice["delta" if delta else "message"] = content if delta else {"role": "assistant", **content}
        else:
            choice["text"] = text or ""
        choice.update(logprobs=None, finish_reason=reason)
        if self.with_ids and ids is not None:
            choice["token_ids"] = ids
            if not self.chat and self._prompt_ids_due:
                choice["prompt_token_ids"] = self.prompt
        return choice

    def whole(self, gen: Generation) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        choice = self._choice(gen.text, gen.finish_reason or "length", gen.token_ids, delta=False)
        return self._object(kind, [choice], usage=gen.usage(), timings=gen.timings.as_dict())

    def chunk(self, text: str | None, ids: list[int] | None = None, reason: str | None = None) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        out = self._object(kind, [self._choice(text, reason, ids, delta=True)])
        self._prompt_ids_due = False  # a stream gives the prompt's ids in its first chunk only
        return out

    def role_chunk(self) -> dict:
        out = self.chunk("", [])
        out["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return out

    def usage_chunk(self, gen: Generation) -> dict:
        return self._object("chat.completion.chunk" if self.chat else "text_completion", [], usage=gen.usage())


async def _complete(request: web.Request, chat: bool) -> web.StreamResponse:
    node, meter = request.app[NODE], request.app[METER]
    try:
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        _check_supported(body)
        params = sampling_params(body)
        await node.wait_ready()  # the tokenizer comes with the plan
        prompt = encode_prompt(node, _prompt_fields(body, chat))
    except SwarmError as e:
        return error_response(e.status, str(e))
    except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        return error_response(400, f"bad request: {e}")
    reply = Reply(chat, model_id(node), prompt, bool(body.get("return_token_ids")))
    async with Generation(node, meter, prompt, params) as gen:
        try:
            await gen.start()
            if not body.get("stream"):
                async for _ in gen:
                    if request.transport is None or request.transport.is_closing():
                        return web.Response(status=499)  # the client gave up: stop, nobody reads this
                return web.json_response(reply.whole(gen))
        except SwarmError as e:
            return error_response(e.status, str(e))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await _stream(request, reply, gen, include_usage)


async def _stream(request: web.Request, reply: Reply, gen: Generation, include_usage: bool) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})  # proxies must not hold the tokens back
    await response.prepare(request)

    async def send(obj) -> None:
        await response.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")

    try:
        if reply.chat:
            await send(reply.role_chunk())
        ids: list[int] = []
        try:
            async for token, text, _ in gen:
                ids.append(token)
                if text:
                    await send(reply.chunk(text, ids))
                    ids = []
            await send(reply.chunk(None if reply.chat else "", ids, gen.finish_reason or "length"))
            if include_usage:
                await send(reply.usage_chunk(gen))
        except SwarmError as e:
            await send(error_body(e.status, str(e)))
        await response.write(b"data: [DONE]\n\n")
    except ConnectionResetError:
        pass  # the client left; leaving the `async with` ends the session on every stage
    return response
