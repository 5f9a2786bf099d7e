"""Tokenizer of a checkpoint folder: tokenizer.json through the `tokenizers` library, special tokens and EOS
ids from the config files, chat templates rendered with jinja2 the way transformers renders them, and a
streaming detokenizer that never emits half a UTF-8 character."""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as _Backend

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")
# Names a message's reasoning comes under; transformers copies the first of them that is set to
# `reasoning_content` and `thinking`, the two names templates read.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


class ChatTemplateError(ValueError):
    """A chat template that cannot be rendered, or one that raised through `raise_exception`."""


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value) -> str | None:
    # tokenizer_config.json stores a special token as a string or as a serialized AddedToken dict
    return value.get("content") if isinstance(value, dict) else value


def _as_ids(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, list) else {int(value)}


def _raise_exception(message):
    raise ChatTemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; templates expect plain json.dumps, as transformers gives them
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _template_message(message: dict) -> dict:
    # transformers drops None values (templates would print "None" or trip on them) and aliases reasoning
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in REASONING_FIELDS if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the character that stands for each byte, reversed."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _plain_content(content) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


class Tokenizer:
    """Encode/decode text and render chat prompts for one model."""

    def __init__(self, backend: _Backend, config: dict | None = None, eos_ids: set[int] | None = None,
                 chat_template: str | list | None = None):
        self.backend = backend
        config = config or {}
        self.special_tokens = {n: _token_text(config[n]) for n in SPECIAL_NAMES if _token_text(config.get(n))}
        # as transformers does: the config's added tokens and named special tokens join the backend's added tokens
        wanted = [AddedToken(e["content"], **{k: e[k] for k in ADDED_TOKEN_FLAGS if k in e})
                  for e in (config.get("added_tokens_decoder") or {}).values()]
        wanted += [AddedToken(t, special=True, normalized=False) for t in self.special_tokens.values()]
        known = {t.content for t in backend.get_added_tokens_decoder().values()}
        for token in wanted:
            if token.content not in known:
                known.add(token.content)
                (backend.add_special_tokens if token.special else backend.add_tokens)([token])
        # transformers (5) lets tokenizer.json's post-processor decide and ignores add_bos_token/add_eos_token
        # when there is one; where there is none the flags build one, as transformers 4's Llama tokenizer did
        if backend.post_processor is None and (config.get("add_bos_token") or config.get("add_eos_token")):
            self._set_post_processor(bool(config.get("add_bos_token")), bool(config.get("add_eos_token")))
        self.chat_template = chat_template if chat_template is not None else config.get("chat_template")
        eos = self.special_tokens.get("eos_token")
        self._eos_ids = set(eos_ids or ()) | ({backend.token_to_id(eos)} - {None} if eos else set())

    @classmethod
    def load(cls, model_dir: str | Path) -> Tokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json in the model folder")
        backend = _Backend.from_file(str(path))
        # older checkpoints keep the special tokens in special_tokens_map.json; tokenizer_config.json wins
        config = {**_read_json(model_dir / "special_tokens_map.json"),
                  **_read_json(model_dir / "tokenizer_config.json")}
        eos_ids = set()
        for name in ("generation_config.json", "config.json"):
            eos_ids |= _as_ids(_read_json(model_dir / name).get("eos_token_id"))
        jinja_file = model_dir / "chat_template.jinja"  # newer transformers save the template beside the config
        template = jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else None
        return cls(backend, config, eos_ids, template)

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        add_bos = add_bos and bos is not None and self.backend.token_to_id(bos) is not None
        add_eos = add_eos and eos is not None and self.backend.token_to_id(eos) is not None
        single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
        pair = " ".join([single] + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
        specials = [(t, self.backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    @property
    def bos_token_id(self) -> int | None:
        bos = self.special_tokens.get("bos_token")
        return self.backend.token_to_id(bos) if bos else None

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self._eos_ids)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def _byte_level(self) -> bool:
        decoder = json.loads(self.backend.to_str()).get("decoder")
        return "ByteLevel" in json.dumps(decoder)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for in the text (a leading space included), as logprobs report them."""
        piece = self.backend.id_to_token(int(token_id))
        if piece is None:
            return b""
        if int(token_id) in self.backend.get_added_tokens_decoder():
            return piece.encode()
        if self._byte_level:
            alphabet = _byte_level_alphabet()
            return bytes(alphabet[c] for c in piece if c in alphabet)
        if match := BYTE_PIECE.fullmatch(piece):
            return bytes([int(match.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template has a tools section (it reads `tools`)."""
        try:
            return self.has_chat_template and re.search(r"\btools\b", self.template_for(tools=True)) is not None
        except ChatTemplateError:
            return False

    def template_for(self, tools) -> str:
        template = self.chat_template
        if isinstance(template, list):  # named templates: [{"name": "default"|"tool_use"|..., "template": ...}]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("tool_use") if tools and "tool_use" in named else named.get("default")
        if not template:
            raise ChatTemplateError("the model's tokenizer_config.json has no usable chat_template")
        return template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tools=None,
                            **extra) -> str:
        """The prompt text for `messages`. Without a chat template (base models such as the demo) the
        messages' contents joined by newlines: a plain continuation prompt, encoded by `encode_chat` with
        the tokenizer's own special tokens."""
        if not self.has_chat_template:
            return "\n".join(_plain_content(m.get("content")) for m in messages)
        messages = [_template_message(m) for m in messages]
        context = {**self.special_tokens, **extra}
        try:
            return _compile(self.template_for(tools)).render(
                messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
                **context)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools=None,
                    **extra) -> list[int]:
        text = self.apply_chat_template(messages, add_generation_prompt, tools, **extra)
        # a template writes its own BOS; the plain fallback relies on the tokenizer's
        return self.encode(text, add_special_tokens=not self.has_chat_template)

    def detokenizer(self, skip_special_tokens: bool = True) -> StreamingDetokenizer:
        return StreamingDetokenizer(self, skip_special_tokens)


class StreamingDetokenizer:
    """Turns generated ids into text one id at a time, never emitting half a UTF-8 character.

    Each step decodes a short window: the ids of the last emitted piece (the prefix, so that a decoder
    which strips the first token's leading space, as SentencePiece's does, strips it from text already
    sent and not from the new text), then the ids not yet emitted. The new text is released once it no
    longer ends in U+FFFD, i.e. once its last character is complete; until then the ids wait, however
    many a character (or a run of byte-level tokens cut across characters) takes. The pieces add up to
    decode(ids), invalid bytes included (U+FFFD in both), with one exception: a run of byte-fallback
    <0xNN> tokens that starts as valid UTF-8 and turns invalid, which decode() replaces as a whole after
    its valid start was already sent."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._window: list[int] = []
        self._prefix_len = 0  # ids at the start of the window whose text is already out
        self._prefix_text = ""

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, self.skip_special_tokens)

    def _release(self, text: str) -> str:
        new = text[len(self._prefix_text):]
        self._window = self._window[self._prefix_len:]
        self._prefix_len = len(self._window)
        self._prefix_text = self._decode(self._window)
        return new

    def add(self, token_id: int) -> str:
        """The text that `token_id` completes ("" while a character is unfinished)."""
        self._window.append(int(token_id))
        text = self._decode(self._window)
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        return self._release(text)

    def finalize(self) -> str:
        """The text still held (an unfinished character decodes to U+FFFD, as in decode())."""
        return self._release(self._decode(self._window))
