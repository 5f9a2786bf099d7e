"""What every web handler shares: the app keys, request fields -> sampling and prompt, the error reply."""

from __future__ import annotations

from aiohttp import web

from swarm.model.sampling import SamplingParams

NODE = web.AppKey("node", object)
METER = web.AppKey("meter", object)

RETRY_AFTER_S = 2
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               409: "conflict_error", 422: "invalid_request_error"}


def sampling_params(body: dict, default_max_tokens: int = 256) -> SamplingParams:
    """Request fields (OpenAI's names) -> SamplingParams; ValueError on bad values."""
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(str(s) for s in stop)
    max_tokens = next((body[k] for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None),
                      default_max_tokens)
    params = SamplingParams(temperature=float(body.get("temperature", 0.0) or 0.0), top_p=float(body.get("top_p", 1.0) or 1.0),
                            top_k=int(body.get("top_k", 0) or 0), min_p=float(body.get("min_p", 0.0) or 0.0),
                            repetition_penalty=float(body.get("repetition_penalty", 1.0) or 1.0),
                            seed=None if body.get("seed") is None else int(body["seed"]),
                            max_tokens=int(max_tokens), stop=stop)
    if params.temperature < 0 or not 0 < params.top_p <= 1 or params.max_tokens < 1 or params.top_k < 0:
        raise ValueError("temperature >= 0, 0 < top_p <= 1, top_k >= 0 and max_tokens >= 1 are required")
    return params


def encode_prompt(node, body: dict) -> list[int]:
    """The prompt's token ids from "messages" (chat template), "prompt" (text) or "prompt_ids".

    A model without a chat template (a base model such as the demo) gets the tokenizer's fallback: the
    messages' contents joined by newlines, with the tokenizer's own BOS, i.e. a plain continuation.
    """
    if "prompt_ids" in body:
        ids = [int(t) for t in body["prompt_ids"]]
        if not ids:
            raise ValueError("prompt_ids is empty")
        return ids
    if node.tokenizer is None:
        raise ValueError("this model has no tokenizer: send prompt_ids")
    if "messages" in body:
        messages = body["messages"]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a non-empty list of {role, content} objects")
        return node.tokenizer.encode_chat(messages)
    return node.tokenizer.encode(str(body["prompt"]))


def model_id(node) -> str:
    """The name clients see for the swarm's model: the same on every node (the model's hash, or its name)."""
    return node.plan_meta.get("model_name") or node.plan_meta.get("model") or node.model_hash


def error_body(status: int, message: str, code: str | None = None) -> dict:
    """OpenAI's error JSON."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(status: int, message: str, code: str | None = None) -> web.Response:
    """OpenAI's error JSON as a reply; a 503 (busy or not ready) says when to come back."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return web.json_response(error_body(status, message, code), status=status, headers=headers)
