"""Constrained decoding: a grammar turned into a per-step token mask, through llguidance.

A request may ask for its text to follow a grammar: a JSON schema (`{"type": "json_schema", "schema":
{...}}`), any JSON object (`{"type": "json_object"}`), a regular expression (`{"type": "regex",
"pattern": "..."}`) or a Lark grammar (`{"type": "lark", "grammar": "..."}`). `check_grammar` compiles
and validates the spec where the request enters (a bad one is the client's error); at the stage that
samples, a `Constraint` per session says which tokens may come next and follows the tokens chosen.
The masks come from the model's own tokenizer.json, whatever kind of vocabulary it holds (byte-level BPE,
SentencePiece with byte fallback).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

GRAMMAR_TYPES = ("json_schema", "json_object", "regex", "lark")
MAX_GRAMMAR_BYTES = 256 << 10


class GrammarError(ValueError):
    """A grammar spec that cannot be compiled; says why."""


def _llguidance():
    import llguidance  # imported on first use: a node that never constrains never loads it
    return llguidance


def grammar_text(spec: dict) -> str:
    """The llguidance grammar of a spec (see the module's docstring); GrammarError when malformed."""
    ll = _llguidance()
    if not isinstance(spec, dict) or spec.get("type") not in GRAMMAR_TYPES:
        raise GrammarError(f"a grammar is a map whose type is one of {', '.join(GRAMMAR_TYPES)}")
    kind = spec["type"]
    try:
        if kind in ("json_schema", "json_object"):
            schema = spec.get("schema") if kind == "json_schema" else {"type": "object"}
            if not isinstance(schema, (dict, bool)):
                raise GrammarError("a json_schema grammar needs its schema as an object")
            # compact JSON: with free whitespace a model may fill its whole budget with newlines
            text = ll.JsonCompiler(separators=(",", ":"), whitespace_flexible=False).compile(json.dumps(schema))
        elif kind == "regex":
            if not isinstance(spec.get("pattern"), str):
                raise GrammarError("a regex grammar needs its pattern as a string")
            text = ll.LLMatcher.grammar_from_regex(spec["pattern"])
        else:
            if not isinstance(spec.get("grammar"), str):
                raise GrammarError("a lark grammar needs its grammar as a string")
            text = ll.LLMatcher.grammar_from_lark(spec["grammar"])
    except GrammarError:
        raise
    except Exception as e:  # llguidance says what it could not read
        raise GrammarError(f"{kind} grammar: {e}") from None
    if len(text) > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"the grammar is larger than {MAX_GRAMMAR_BYTES} bytes")
    return text


def check_grammar(spec: dict) -> dict:
    """spec, once it compiles to a valid grammar; GrammarError saying what is wrong otherwise."""
    message = _llguidance().LLMatcher.validate_grammar(grammar_text(spec))  # "" when valid
    if message:
        raise GrammarError(f"{spec['type']} grammar: {message}")
    return spec


class Vocabulary:
    """The model's tokenizer as llguidance sees it, built once per node (building it walks the vocabulary)."""

    _cache: dict[tuple, Vocabulary] = {}
    _lock = threading.Lock()

    def __init__(self, tokenizer_json: Path, vocab_size: int, eos_ids: list[int]):
        self.vocab_size = vocab_size
        self.tokenizer = _llguidance().LLTokenizer(str(tokenizer_json), n_vocab=vocab_size,
                                                   eos_token=sorted(eos_ids) or None)

    @classmethod
    def of(cls, tokenizer_json: Path, vocab_size: int, eos_ids) -> Vocabulary:
        key = (str(tokenizer_json), vocab_size, tuple(sorted(eos_ids)))
        with cls._lock:
            if key not in cls._cache:
                cls._cache[key] = cls(tokenizer_json, vocab_size, list(eos_ids))
            return cls._cache[key]

    def constraint(self, spec: dict, tokens=()) -> Constraint:
        return Constraint(self, grammar_text(spec), tokens)


class Constraint:
    """One session's grammar state at the sampling stage: the tokens allowed next, following those chosen."""

    def __init__(self, vocabulary: Vocabulary, grammar: str, tokens=()):
        ll = _llguidance()
        self.vocab_size = vocabulary.vocab_size
        self.matcher = ll.LLMatcher(vocabulary.tokenizer, grammar)
        self._words = np.zeros((self.vocab_size + 31) // 32, dtype=np.int32)
        if tokens:
            self.matcher.consume_tokens(list(tokens))  # a moved session: the tokens it already generated
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise GrammarError(f"grammar: {self.matcher.get_error()}")

    def allowed(self) -> np.ndarray:
        """Which tokens may come next: bool (vocab_size,)."""
        self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        self._check()
        return np.unpackbits(self._words.view(np.uint8), bitorder="little")[:self.vocab_size].astype(bool)

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)
        self._check()

    @property
    def finished(self) -> bool:
        """Nothing may follow: the text is complete."""
        return self.matcher.is_stopped()
