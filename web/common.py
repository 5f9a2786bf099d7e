"""What every web handler shares: the app keys, the request body, a request's prompt and sampling made
ready for the node (`read_job`, `prepare`), one generation answered whole or streamed (`respond`, server-sent
events), and OpenAI's error JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass

from aiohttp import web

from swarm.model.sampling import SamplingParams
from swarm.model.tokenizer import ChatTemplateError
from swarm.pipeline import SwarmError
from web import tools as toolkit
from web.generation import Deltas, Generation
from web.validation import Prompt, RequestError, checked, prompt_ids, vocab_size

NODE = web.AppKey("node", object)
METER = web.AppKey("meter", object)
METRICS = web.AppKey("metrics", object)

RETRY_AFTER_S = 2
MAX_BODY_BYTES = 4 << 20
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error"}
SWARM_CODES = {400: "context_length_exceeded", 409: "conflict", 503: "service_unavailable", 504: "timeout"}


@dataclass
class Job:
    """A request ready for the node: the prompt's ids, the sampler's parameters, and how tool calls are read
    back from the text (None when the request has no tools in play)."""

    ids: list[int]
    params: SamplingParams
    tool_format: toolkit.ToolFormat | None = None
    tool_markers: dict[int, str] | None = None
    parallel_tool_calls: bool = True

    def tool_parser(self) -> toolkit.ToolCallParser | None:
        return toolkit.ToolCallParser(self.tool_format, self.parallel_tool_calls) if self.tool_format else None


async def read_body(request: web.Request) -> dict:
    """The request's JSON object, or RequestError."""
    try:
        body = await request.json()
    except ValueError as e:
        raise RequestError(f"the body is not JSON: {e}", None, "invalid_json") from None
    except web.HTTPRequestEntityTooLarge:
        raise RequestError(f"the body is larger than {MAX_BODY_BYTES} bytes", None, "request_too_large",
                           413) from None
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object", None, "invalid_json")
    return body


async def read_job(request: web.Request, parse, names: dict[str, str] | None = None) -> tuple[dict, Prompt, Job]:
    """The request's body, its Prompt and its Job: `parse` (the API's adapter: body -> Prompt, SamplingParams)
    reads it, `prepare` checks it against the model once the swarm is ready. Raises RequestError or SwarmError."""
    node = request.app[NODE]
    body = await read_body(request)
    prompt, params = parse(body)
    await node.wait_ready()  # the tokenizer and the model's vocabulary come with the plan
    return body, prompt, prepare(node, prompt, params, names)


def generation(request: web.Request, job: Job) -> Generation:
    return Generation(request.app[NODE], request.app[METER], job.ids, job.params, request.app[METRICS])


def prepare(node, prompt: Prompt, params: SamplingParams, names: dict[str, str] | None = None) -> Job:
    """The request's prompt as token ids (chat template and tools applied) and its sampling checked against
    the model; RequestError for anything the client got wrong. Call once the swarm is ready (the tokenizer
    and the model's vocabulary come with the plan). names: the API's names for the sampler's fields."""
    names = names or {}
    vocab, tokenizer = vocab_size(node), node.tokenizer
    job = Job([], params)
    if prompt.tools and prompt.tool_choice != "none":
        fmt = toolkit.tool_format(tokenizer)
        if fmt is toolkit.BARE_JSON and prompt.tool_choice == "auto":
            raise RequestError("this model's chat template has no tools section, so it cannot choose a tool itself: "
                               "name one in tool_choice or use \"required\"", names.get("tool_choice", "tool_choice"),
                               "unsupported_value")
        job.tool_format, job.tool_markers = fmt, toolkit.special_markers(tokenizer, fmt)
        job.parallel_tool_calls = prompt.parallel_tool_calls
        if prompt.tool_choice != "auto":
            if params.grammar is not None:
                raise RequestError("a response format and a forced tool choice cannot be combined",
                                   names.get("grammar", "response_format"))
            params.grammar = toolkit.forced_grammar(prompt.tools, prompt.tool_choice, fmt, tokenizer)
            names = {**names, "grammar": names.get("tools", "tools")}
    job.params = checked(params, vocab, names)
    job.ids = encode(node, prompt, vocab, names)
    try:
        node.token_budget(len(job.ids), params.max_tokens)
    except SwarmError as e:
        raise RequestError(str(e), names.get("prompt", "messages" if prompt.messages else "prompt"),
                           "context_length_exceeded") from None
    return job


def encode(node, prompt: Prompt, vocab: int | None, names: dict[str, str]) -> list[int]:
    if prompt.ids is not None:
        return prompt_ids(prompt.ids, vocab, names.get("prompt", "prompt"))
    if node.tokenizer is None:
        raise RequestError("this model has no tokenizer: send the prompt as token ids", names.get("prompt", "prompt"))
    if prompt.messages is None:
        return node.tokenizer.encode(prompt.text or "")
    renders = prompt.tools and prompt.tool_choice != "none" and node.tokenizer.renders_tools
    try:
        return node.tokenizer.encode_chat(prompt.messages, tools=toolkit.openai_tools(prompt.tools) if renders else None)
    except ChatTemplateError as e:
        raise RequestError(f"the model's chat template refused these messages: {e}", names.get("messages", "messages"),
                           "invalid_messages") from None


def model_id(node) -> str:
    """The name clients see for the swarm's model: the same on every node (the model's hash, or its name)."""
    return node.plan_meta.get("model_name") or node.plan_meta.get("model") or node.model_hash


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error JSON."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None) -> web.Response:
    """OpenAI's error JSON as a reply; a 503 (busy or not ready) says when to come back."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return web.json_response(error_body(status, message, param, code), status=status, headers=headers)


def request_error(e: RequestError) -> web.Response:
    return error_response(e.status, str(e), e.code, e.param)


def swarm_error(e: SwarmError) -> web.Response:
    return error_response(e.status, str(e), SWARM_CODES.get(e.status))


# --- answers -------------------------------------------------------------------------------------------

async def respond(request: web.Request, job: Job, stream: bool, whole, streamed, failed) -> web.StreamResponse:
    """One generation answered: whole(gen, answer) -> the reply once every token came (answer: the Deltas),
    or streamed(gen, answer) -> the stream; failed(SwarmError) -> the reply when the swarm refuses the
    request before its first token (busy, not ready)."""
    async with generation(request, job) as gen:
        try:
            await gen.start()
            answer = Deltas(job)
            if not stream:
                async for choice, text, _ in gen:
                    if request.transport is None or request.transport.is_closing():
                        return web.Response(status=499)  # the client gave up: stop, nobody reads this
                    answer.feed(choice, text)
                answer.close()
                return whole(gen, answer)
        except SwarmError as e:
            return failed(e)
        return await streamed(gen, answer)


async def pieces(gen: Generation, answer: Deltas):
    """The pieces of a streamed answer as its tokens come, and what its end releases (None for a token
    whose text is held back)."""
    async for choice, text, _ in gen:
        yield answer.feed(choice, text)
    yield answer.close()


async def open_stream(request: web.Request) -> web.StreamResponse:
    """A server-sent events reply, started."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})  # proxies must not hold the tokens back
    await response.prepare(request)
    return response


async def send_event(response: web.StreamResponse, data, event: str | None = None) -> None:
    head = f"event: {event}\n".encode() if event else b""
    await response.write(head + b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n")
