"""Tools (function calling): the request's tool definitions checked, the model's tool-call format found
from its chat template, tool calls parsed back out of the generated text (whole or streamed), and the
grammar that forces a call when tool_choice names a tool or says `required`.

Formats, as the templates write them:
- hermes (Qwen2.5, Hermes, many others): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, repeated;
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` to the end of the reply;
- llama3 (Llama 3.1-3.3 JSON tool calling): the whole reply is `{"name": ..., "parameters": {...}}`,
  perhaps after `<|python_tag|>`, several separated by `;`;
- json, for a model whose template has no tools section: a forced call is the bare object
  `{"name": ..., "arguments": {...}}`. Such a model is not told about tools, so `auto` is refused there.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from web.validation import RequestError, typed

TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_TOOLS = 128
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ToolFormat:
    name: str
    start: str | None            # the marker before a call; None: the whole reply is the call(s)
    end: str | None              # the marker after one call; None: calls run to the end of the reply
    arguments_key: str = "arguments"
    prefix: str = ""             # a forced call is written as start + prefix + the call's JSON + suffix + end
    suffix: str = ""


HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>", prefix="\n", suffix="\n")
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", None, prefix="[", suffix="]")
LLAMA3 = ToolFormat("llama3", None, None, arguments_key="parameters")
BARE_JSON = ToolFormat("json", None, None)


def tool_format(tokenizer) -> ToolFormat:
    """The format the model's chat template writes tool calls in (BARE_JSON without a tools section)."""
    if tokenizer is None or not tokenizer.renders_tools:
        return BARE_JSON
    template = tokenizer.template_for(tools=True)
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or ("<|start_header_id|>" in template and "parameters" in template):
        return LLAMA3
    return BARE_JSON


# --- the request's tools ---------------------------------------------------------------------------------

def tool_definitions(value, param: str = "tools") -> list[dict]:
    """OpenAI's [{"type": "function", "function": {name, description, parameters}}] as [{name, description,
    parameters}]."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise RequestError(f"{param} must be a list of at most {MAX_TOOLS} tools", param, "invalid_type")
    tools = []
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict):
            raise RequestError(f"{param}[{i}] must be {{type: function, function: {{name, parameters}}}}", param)
        tools.append(function_tool(function, f"{param}[{i}].function"))
    names = [t["name"] for t in tools]
    if len(set(names)) != len(names):
        raise RequestError(f"{param}: tool names must be unique", param)
    return tools


def function_tool(function: dict, param: str, schema_key: str = "parameters") -> dict:
    name = function.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise RequestError(f"{param}.name must be 1-64 letters, digits, _ . or -", param)
    schema = function.get(schema_key)
    if schema is None:
        schema = {"type": "object", "properties": {}}
    if not isinstance(schema, dict):
        raise RequestError(f"{param}.{schema_key} must be a JSON schema object", param, "invalid_type")
    description = typed(function, "description", str, "", param=f"{param}.description")
    return {"name": name, "description": description, "parameters": schema}


def tool_choice(value, tools: list[dict], param: str = "tool_choice") -> str | dict:
    """"none", "auto", "required" or {"name": ...} (a tool of the request)."""
    if value is None:
        return "auto" if tools else "none"
    if value in ("none", "auto", "required"):
        if value != "none" and not tools:
            raise RequestError(f"{param} {value!r} needs tools", param)
        return value
    function = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    return named_choice(name, tools, param)


def named_choice(name, tools: list[dict], param: str) -> dict:
    if name not in [t["name"] for t in tools]:
        raise RequestError(f"{param} names {name!r}, which is not among the request's tools", param)
    return {"name": name}


def openai_tools(tools: list[dict]) -> list[dict]:
    """The tools as chat templates read them (OpenAI's shape, as transformers passes them)."""
    return [{"type": "function", "function": t} for t in tools]


def forced_grammar(tools: list[dict], choice: str | dict, fmt: ToolFormat, tokenizer) -> dict:
    """A lark grammar (swarm/model/grammar.py) whose every text is one call of the chosen tool (or of any
    tool, for "required") in the model's format, its arguments following the tool's schema."""
    chosen = [t for t in tools if choice == "required" or t["name"] == choice["name"]]
    options = [{"type": "object", "properties": {"name": {"const": t["name"]}, fmt.arguments_key: t["parameters"]},
                "required": ["name", fmt.arguments_key], "additionalProperties": False} for t in chosen]
    schema = {**(options[0] if len(options) == 1 else {"anyOf": options}), "x-guidance": JSON_STYLE}
    end = fmt.end if fmt.start is not None and fmt.end else None
    parts = [lark_text(tokenizer, fmt.start), lark_text(tokenizer, fmt.prefix), "call", lark_text(tokenizer, fmt.suffix),
             lark_text(tokenizer, end)]
    return {"type": "lark", "grammar": f"start: {' '.join(p for p in parts if p)}\ncall: %json {json.dumps(schema)}\n"}


def lark_text(tokenizer, text: str | None) -> str:
    """text as a lark terminal: a marker that is an added token of the vocabulary as that token (llguidance
    treats added tokens as special, and the model writes a marker as its token), anything else as a string."""
    if not text:
        return ""
    token = tokenizer.backend.token_to_id(text) if tokenizer is not None else None
    if token is not None and token in tokenizer.backend.get_added_tokens_decoder():
        return f"<[{token}]>"
    return json.dumps(text)


# --- calls out of the text ---------------------------------------------------------------------------------

def new_call(name: str, arguments: dict) -> dict:
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def calls_in(text: str, fmt: ToolFormat) -> list[dict] | None:
    """The calls one block of text holds (a JSON object, a list of them, or `;`-separated ones), or None
    when it is not that."""
    text = text.strip().removeprefix(PYTHON_TAG).strip()
    try:
        found = json.loads(text)
    except ValueError:
        try:
            found = [json.loads(part) for part in text.split(";") if part.strip()]
        except ValueError:
            return None
    found = found if isinstance(found, list) else [found]
    calls = []
    for item in found:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get(fmt.arguments_key, item.get("arguments", item.get("parameters", {})))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append(new_call(item["name"], arguments))
    return calls or None


def _held_back(text: str, marker: str) -> int:
    """How much of the end of text could be the start of marker."""
    return next((n for n in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:n])), 0)


class ToolCallParser:
    """Splits generated text into content and tool calls as it streams: feed(text) and close() return
    (content that can go out now, calls complete now). Text that may begin a call is held back until it
    is known; a call that does not parse goes out as content."""

    def __init__(self, fmt: ToolFormat, parallel: bool = True):
        self.fmt, self.parallel = fmt, parallel
        self.buffer = ""
        self.in_call = False
        self.calls: list[dict] = []
        self._decided = fmt.start is not None   # whole-reply formats decide on the reply's first character

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.buffer += text
        if not self._decided:
            head = self.buffer.lstrip()
            if PYTHON_TAG.startswith(head):  # nothing yet, or what may still become the tag
                return "", []
            self._decided, self.in_call = True, head[0] in "{[" or head.startswith(PYTHON_TAG)
        if self.fmt.start is None:
            if self.in_call:
                return "", []
            out, self.buffer = self.buffer, ""
            return out, []
        content, calls = "", []
        while True:
            if not self.in_call:
                at = self.buffer.find(self.fmt.start)
                if at < 0:
                    keep = _held_back(self.buffer, self.fmt.start)
                    content += self.buffer[:len(self.buffer) - keep]
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    return content, calls
                content += self.buffer[:at]
                self.buffer, self.in_call = self.buffer[at:], True
            end = self.buffer.find(self.fmt.end, len(self.fmt.start)) if self.fmt.end else -1
            if end < 0:
                return content, calls
            block, self.buffer = self.buffer[:end + len(self.fmt.end)], self.buffer[end + len(self.fmt.end):]
            self.in_call = False
            found = self._take(block[len(self.fmt.start):-len(self.fmt.end)])
            if found is None:
                content += block
            calls += found or []

    def close(self) -> tuple[str, list[dict]]:
        """The end of the reply: what is still held, as content or calls."""
        rest, self.buffer = self.buffer, ""
        if not self.in_call:
            return rest, []
        self.in_call = False
        body = rest[len(self.fmt.start):] if self.fmt.start else rest
        found = self._take(body)
        return ("", found) if found is not None else (rest, [])

    def _take(self, block: str) -> list[dict] | None:
        found = calls_in(block, self.fmt)
        if found is None:
            return None
        if not self.parallel:
            found = found[:max(0, 1 - len(self.calls))]
        self.calls += found
        return found


def special_markers(tokenizer, fmt: ToolFormat) -> dict[int, str]:
    """Markers that are special tokens (which the detokenizer leaves out of the text): id -> text, so a
    parser can be told that they came."""
    if tokenizer is None:
        return {}
    added = tokenizer.backend.get_added_tokens_decoder()
    markers = [m for m in (fmt.start, PYTHON_TAG if fmt is LLAMA3 else None) if m]
    ids = {tokenizer.backend.token_to_id(m): m for m in markers}
    return {i: m for i, m in ids.items() if i is not None and i in added and added[i].special}
