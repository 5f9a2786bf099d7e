"""Choosing the next token from logits (greedy, temperature, top-k, top-p, min-p, repetition penalty, seed)
and deciding when generation stops (EOS ids, stop strings, max_tokens, context length)."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import mlx.core as mx


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context: int = 64
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()


def apply_repetition_penalty(logits: mx.array, history: list[int], penalty: float, context: int) -> mx.array:
    """CTRL's penalty as HF applies it: logits of recently seen tokens are divided by `penalty` where
    positive and multiplied where negative, so a penalty > 1 always makes them less likely."""
    recent = sorted(set(history[-context:])) if context > 0 else []
    if penalty == 1.0 or not recent:
        return logits
    idx = mx.array(recent)
    seen = logits[idx]
    logits = mx.array(logits)
    logits[idx] = mx.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def filter_logits(logits: mx.array, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """(kept logits in descending order, their token ids); dropped ones are -inf. Each filter sees the
    distribution renormalised after the previous one, as HF's logits warpers do."""
    order = mx.argsort(-logits)
    ranked = logits[order]
    first = mx.arange(ranked.size) == 0  # the most likely token always stays, as HF's min_tokens_to_keep=1
    neg_inf = mx.array(-math.inf, dtype=mx.float32)
    if 0 < top_k < ranked.size:
        ranked = mx.where(mx.arange(ranked.size) < top_k, ranked, neg_inf)
    if top_p < 1.0:
        probs = mx.softmax(ranked)
        # keep a token while the mass ranked above it is still short of top_p: the smallest set reaching top_p
        before = mx.cumsum(probs) - probs
        ranked = mx.where((before < top_p) | first, ranked, neg_inf)
    if min_p > 0.0:
        # p_i >= min_p * p_max is log p_i >= log p_max + log min_p, and the log-normaliser cancels
        ranked = mx.where((ranked >= ranked[0] + math.log(min_p)) | first, ranked, neg_inf)
    return ranked, order


class Sampler:
    """Picks one token per call. The random key lives here, split once per draw, so the same seed and the
    same logits give the same tokens no matter what else uses MLX's global random state."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self._key = mx.random.key(params.seed if params.seed is not None else secrets.randbits(63))

    def __call__(self, logits: mx.array, history: list[int] | None = None) -> int:
        p = self.params
        logits = logits.reshape(-1).astype(mx.float32)
        logits = apply_repetition_penalty(logits, history or [], p.repetition_penalty, p.repetition_context)
        if p.temperature <= 0.0 or p.top_k == 1:
            return int(mx.argmax(logits).item())
        logits = logits / p.temperature
        self._key, draw_key = mx.random.split(self._key)
        if p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0:
            ranked, order = filter_logits(logits, p.top_k, p.top_p, p.min_p)
            return int(order[mx.random.categorical(ranked, key=draw_key)].item())
        return int(mx.random.categorical(logits, key=draw_key).item())


def _held_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could be the start of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class StopChecker:
    """Filters the text stream of one generation and says when it ends.

    feed(token_id, new_text) -> (text_to_emit, finish_reason or None). finish_reason is "stop" for an EOS
    id or a stop string (neither is emitted) and "length" once max_tokens tokens were fed or the context
    is full: prompt_tokens + tokens fed >= context_limit (pass context_limit=None for no limit). Text
    that might begin a stop string is held back until it cannot."""

    def __init__(self, stop_strings=(), eos_ids=(), max_tokens: int = 256, context_limit: int | None = None,
                 prompt_tokens: int = 0):
        self.stops = tuple(s for s in stop_strings if s)
        self.eos_ids = set(eos_ids)
        self.max_tokens = max_tokens
        self.context_limit = context_limit
        self.prompt_tokens = prompt_tokens
        self.generated = 0
        self.finish_reason: str | None = None
        self._held = ""

    def feed(self, token_id: int, new_text: str) -> tuple[str, str | None]:
        if self.finish_reason is not None:
            return "", self.finish_reason
        self.generated += 1
        if token_id in self.eos_ids:
            return self._finish("stop", self._held)
        text = self._held + new_text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            return self._finish("stop", text[: min(hits)])
        full = self.context_limit is not None and self.prompt_tokens + self.generated >= self.context_limit
        if self.generated >= self.max_tokens or full:
            return self._finish("length", text)
        keep = _held_suffix(text, self.stops)
        self._held = text[len(text) - keep:]
        return text[: len(text) - keep], None

    def _finish(self, reason: str, text: str) -> tuple[str, str]:
        self.finish_reason, self._held = reason, ""
        return text, reason
