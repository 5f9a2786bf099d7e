"""One validation layer for every entry point (OpenAI, Anthropic and Responses routes, /ws/chat): request
fields in, a `Prompt` and `SamplingParams` out, or a `RequestError` naming the field at fault.

Each API's adapter maps its own names onto the fields read here (OpenAI's names); every value is checked
for its type, range, finiteness and size before anything reaches the model, token ids against the
model's vocabulary. A field this server does not implement is refused, never ignored: OpenAI's own
parameters that have no meaning here get `unsupported_parameter`, names nobody defines get
`unknown_parameter`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from swarm.model.grammar import GrammarError, check_grammar
from swarm.model.sampling import MAX_TOP_LOGPROBS, SamplingError, SamplingParams

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_MESSAGES = 4096
MAX_TEXT = 1 << 20       # characters in one message, one prompt, one stop string list
MAX_STOPS = 16


class RequestError(ValueError):
    """A client's mistake: the reply is `status` with OpenAI's error JSON (message, type, param, code)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value", status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


@dataclass
class Prompt:
    """What the model reads: chat messages (rendered through its template), text, or token ids."""

    messages: list[dict] | None = None
    text: str | None = None
    ids: list[int] | None = None
    tools: list[dict] = field(default_factory=list)       # [{"name", "description", "parameters"}]
    tool_choice: str | dict = "auto"                      # "none" | "auto" | "required" | {"name": ...}
    parallel_tool_calls: bool = True


# --- typed fields ----------------------------------------------------------------------------------------

def _kind(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def typed(body: dict, name: str, kinds, default=None, param: str | None = None):
    """body[name] when present and not null, checked against `kinds` (int never passes for bool)."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if type(value) not in kinds:
        want = " or ".join(_kind(k()) if k is not type(None) else "null" for k in kinds)
        raise RequestError(f"{param or name} must be {want}, got {_kind(value)}", param or name, "invalid_type")
    if type(value) is float and not math.isfinite(value):
        raise RequestError(f"{param or name} must be a finite number, got {value}", param or name)
    return value


def number(body: dict, name: str, default: float) -> float:
    return float(typed(body, name, (int, float), default))


def integer(body: dict, name: str, default: int | None) -> int | None:
    value = typed(body, name, (int, float), default)
    if type(value) is float:  # 64.0 is an integer; 64.5 is not
        if not value.is_integer():
            raise RequestError(f"{name} must be an integer, got {value}", name, "invalid_type")
        value = int(value)
    return value


def flag(body: dict, name: str, default: bool = False) -> bool:
    return typed(body, name, bool, default)


def refuse_unknown(body: dict, known: set[str], unsupported: dict[str, object]) -> None:
    """Names nobody defines are refused; OpenAI's parameters not implemented here too, unless they hold
    the value that means "off" (their entry in `unsupported`)."""
    for name, value in body.items():
        if name in unsupported:
            if value is not None and value != unsupported[name]:
                raise RequestError(f"{name} is not supported by this server", name, "unsupported_parameter")
        elif name not in known:
            raise RequestError(f"unrecognized request argument: {name}", name, "unknown_parameter")


# --- sampling -----------------------------------------------------------------------------------------

def stop_strings(body: dict, name: str = "stop") -> tuple[str, ...]:
    stop = typed(body, name, (str, list), ())
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOPS or not all(type(s) is str and 0 < len(s) <= 1024 for s in stop):
        raise RequestError(f"{name}: at most {MAX_STOPS} non-empty strings of at most 1024 characters", name)
    return tuple(stop)


def logit_bias(body: dict) -> dict[int, float]:
    """OpenAI's map of token id (a JSON key, so a string) to a bias in [-100, 100]."""
    bias = typed(body, "logit_bias", dict, {})
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise RequestError(f"logit_bias: {key!r} is not a token id", "logit_bias") from None
        if type(value) not in (int, float) or type(value) is bool:
            raise RequestError(f"logit_bias: the bias of {key} must be a number", "logit_bias", "invalid_type")
        out[token] = float(value)
    return out


def sampling(body: dict, max_tokens: int | None, default_max_tokens: int = 256) -> SamplingParams:
    """The sampler's parameters from OpenAI's names (and vLLM's top_k, min_p, repetition_penalty).
    max_tokens: the limit the API's own field gave (None: the default). Ranges are checked later against
    the vocabulary (`checked`)."""
    return SamplingParams(
        temperature=number(body, "temperature", 0.0), top_p=number(body, "top_p", 1.0),
        top_k=integer(body, "top_k", 0), min_p=number(body, "min_p", 0.0),
        repetition_penalty=number(body, "repetition_penalty", 1.0),
        presence_penalty=number(body, "presence_penalty", 0.0), frequency_penalty=number(body, "frequency_penalty", 0.0),
        logit_bias=logit_bias(body), seed=integer(body, "seed", None),
        max_tokens=default_max_tokens if max_tokens is None else max_tokens, stop=stop_strings(body))


def checked(params: SamplingParams, vocab_size: int | None, names: dict[str, str] | None = None) -> SamplingParams:
    """params, or RequestError naming the request's field (`names` maps the sampler's names to the API's)."""
    try:
        params.check(vocab_size)
    except SamplingError as e:
        param = (names or {}).get(e.param, e.param)
        raise RequestError(str(e).replace(e.param, param, 1), param) from None
    if params.grammar is not None:
        try:
            check_grammar(params.grammar)
        except GrammarError as e:
            raise RequestError(str(e), (names or {}).get("grammar", "response_format"), "invalid_grammar") from None
    return params


def token_limit(body: dict, *names: str) -> int | None:
    """The first of `names` the body sets (max_completion_tokens wins over max_tokens, as at OpenAI), in
    [1, 2^24]; None when none is set."""
    for name in names:
        if body.get(name) is not None:
            value = integer(body, name, None)
            if not 1 <= value <= 1 << 24:
                raise RequestError(f"{name} must be an integer in [1, {1 << 24}], got {value}", name)
            return value
    return None


def only_one(body: dict, name: str) -> None:
    """n / best_of: one answer per request."""
    value = integer(body, name, 1)
    if value != 1:
        raise RequestError(f"{name} must be 1 (one answer per request), got {value}", name)


def top_logprobs(body: dict, name: str, enabled: bool) -> int | None:
    count = integer(body, name, 0 if enabled else None)
    if count is not None and not 0 <= count <= MAX_TOP_LOGPROBS:
        raise RequestError(f"{name} must be an integer in [0, {MAX_TOP_LOGPROBS}], got {count}", name)
    if count and not enabled:
        raise RequestError(f"{name} needs logprobs: true", name)
    return count


# --- structured output ----------------------------------------------------------------------------------

def response_format(body: dict, name: str = "response_format") -> dict | None:
    """OpenAI's response_format as a grammar spec (swarm/model/grammar.py); regex and lark as extensions."""
    fmt = typed(body, name, dict)
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), (dict, bool)):
            raise RequestError(f"{name}.json_schema must be an object with a schema", name)
        return {"type": "json_schema", "schema": spec["schema"]}
    if kind == "regex" and isinstance(fmt.get("pattern"), str):
        return {"type": "regex", "pattern": fmt["pattern"]}
    if kind == "lark" and isinstance(fmt.get("grammar"), str):
        return {"type": "lark", "grammar": fmt["grammar"]}
    raise RequestError(f"{name}.type must be text, json_object or json_schema (or regex with a pattern, lark with a "
                       f"grammar), got {kind!r}", name)


# --- prompts --------------------------------------------------------------------------------------------

def text_of(content, param: str) -> str:
    """A message's content as text: a string, or content parts of type text (the API's own part names)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise RequestError(f"{param} must be a string or a list of content parts", param, "invalid_type")
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("text", "input_text", "output_text"):
            kind = part.get("type") if isinstance(part, dict) else _kind(part)
            raise RequestError(f"{param}[{i}]: only text parts are supported, got {kind!r}", param,
                               "unsupported_content")
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{param}[{i}].text must be a string", param, "invalid_type")
        texts.append(part["text"])
    return "".join(texts)


def tool_call_arguments(call, param: str) -> dict:
    """An assistant message's tool call as a template reads it: arguments parsed from their JSON string."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise RequestError(f"{param}: a tool call is {{id, type: function, function: {{name, arguments}}}}", param)
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except ValueError:
            raise RequestError(f"{param}: the arguments of {function['name']} are not JSON", param) from None
    if not isinstance(arguments, dict):
        raise RequestError(f"{param}: the arguments of {function['name']} must be a JSON object", param)
    return {"id": str(call.get("id") or ""), "type": "function",
            "function": {"name": function["name"], "arguments": arguments}}


def messages(value, param: str = "messages") -> list[dict]:
    """Chat messages as chat templates read them: text content, tool calls with parsed arguments,
    `developer` as `system`."""
    if not isinstance(value, list) or not value:
        raise RequestError(f"{param} must be a non-empty list of messages", param, "invalid_type" if not isinstance(value, list) else "invalid_value")
    if len(value) > MAX_MESSAGES:
        raise RequestError(f"{param}: at most {MAX_MESSAGES} messages", param)
    out = []
    for i, message in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with a role and content", where, "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        text = text_of(message.get("content"), f"{where}.content")
        if len(text) > MAX_TEXT:
            raise RequestError(f"{where}.content is longer than {MAX_TEXT} characters", f"{where}.content")
        clean = {"role": "system" if role == "developer" else role, "content": text}
        if isinstance(message.get("name"), str):
            clean["name"] = message["name"]
        if role == "assistant" and message.get("tool_calls"):
            calls = message["tool_calls"]
            if not isinstance(calls, list):
                raise RequestError(f"{where}.tool_calls must be a list", f"{where}.tool_calls", "invalid_type")
            clean["tool_calls"] = [tool_call_arguments(c, f"{where}.tool_calls") for c in calls]
        if role == "tool":
            clean["tool_call_id"] = str(message.get("tool_call_id") or "")
        out.append(clean)
    return out


def prompt_ids(value, vocab_size: int | None, param: str = "prompt") -> list[int]:
    if not isinstance(value, list) or not value or not all(type(t) is int for t in value):
        raise RequestError(f"{param} must be a non-empty list of token ids", param, "invalid_type")
    bad = next((t for t in value if not 0 <= t < (vocab_size or 1 << 31)), None)
    if bad is not None:
        raise RequestError(f"{param}: token id {bad} is not in the vocabulary [0, {vocab_size})", param,
                           "invalid_token_id")
    return value


def completion_prompt(value) -> Prompt:
    """/v1/completions' prompt: a string, a list of token ids, or a one-element list of either."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise RequestError(f"prompt is longer than {MAX_TEXT} characters", "prompt")
        return Prompt(text=value)
    if isinstance(value, list) and value and all(type(t) is int for t in value):
        return Prompt(ids=value)
    raise RequestError("prompt must be a string or a list of token ids (one prompt per request)", "prompt",
                       "invalid_type")


# --- the model's vocabulary ----------------------------------------------------------------------------------

_vocab_sizes: dict[Path, int] = {}


def vocab_size(node) -> int | None:
    """The model's vocabulary (its embedding's rows), from the config.json the node holds for the model."""
    folder = node.model_dir or node.cache_dir / "models" / str(node.plan_meta.get("model"))
    if folder not in _vocab_sizes:
        try:
            _vocab_sizes[folder] = int(json.loads((folder / "config.json").read_text())["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return node.tokenizer.vocab_size if node.tokenizer is not None else None
    return _vocab_sizes[folder]
