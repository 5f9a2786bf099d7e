"""Choosing the next token from logits, and deciding when generation stops.

A `Sampler` is one session's state at the stage that samples: its parameters (greedy, temperature, top-k,
top-p, min-p, the repetition, presence and frequency penalties, logit_bias, seed), the tokens its penalties
look at, and how many tokens it has chosen. The draw at step n uses a key made from (seed, n) alone, so a
session moved to other nodes mid-stream continues with the very draws it would have made. `Choice` carries
the token and, when asked, its log-probability and the most likely alternatives from the model's own
distribution. `StopChecker` ends a generation on EOS ids, stop strings, max_tokens or the context length.
"""

from __future__ import annotations

import json
import math
import secrets
from collections import Counter
from dataclasses import dataclass, field

import mlx.core as mx

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024


class SamplingError(ValueError):
    """A sampling parameter out of its range; `param` names it as the request did."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def _number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    logprobs: int | None = None      # None: no log-probabilities; n: the chosen token's and the n most likely
    grammar: dict | None = None      # the text must follow it (swarm/model/grammar.py)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1

    def check(self, vocab_size: int | None = None) -> SamplingParams:
        """self, or SamplingError naming the first parameter out of range (token ids against vocab_size)."""
        ranges = [("temperature", self.temperature, 0, 100), ("top_p", self.top_p, 0, 1), ("min_p", self.min_p, 0, 1),
                  ("repetition_penalty", self.repetition_penalty, 1e-3, 100),
                  ("presence_penalty", self.presence_penalty, -2, 2), ("frequency_penalty", self.frequency_penalty, -2, 2)]
        for name, value, low, high in ranges:
            if not _number(value) or not low <= value <= high:
                raise SamplingError(name, f"must be a finite number in [{low}, {high}], got {value!r}")
        counts = [("top_k", self.top_k, 0, 1 << 31), ("repetition_context", self.repetition_context, 0, 1 << 20),
                  ("max_tokens", self.max_tokens, 1, 1 << 24)]
        if self.seed is not None:
            counts.append(("seed", self.seed, 0, 2**63 - 1))
        if self.logprobs is not None:
            counts.append(("top_logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS))
        for name, value, low, high in counts:
            if type(value) is not int or not low <= value <= high:
                raise SamplingError(name, f"must be an integer in [{low}, {high}], got {value!r}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise SamplingError("logit_bias", f"at most {MAX_LOGIT_BIAS} tokens")
        for token, bias in self.logit_bias.items():
            if type(token) is not int or not 0 <= token < (vocab_size or 1 << 31):
                raise SamplingError("logit_bias", f"token {token!r} is not in the vocabulary [0, {vocab_size})")
            if not _number(bias) or not -100 <= bias <= 100:
                raise SamplingError("logit_bias", f"the bias of token {token} must be in [-100, 100], got {bias!r}")
        if len(self.stop) > 16 or not all(type(s) is str and len(s) <= 1024 for s in self.stop):
            raise SamplingError("stop", "at most 16 strings of at most 1024 characters")
        return self

    @property
    def plain_greedy(self) -> bool:
        """The next token is the argmax of the logits as they are (so a batch takes one argmax for all such rows)."""
        return (self.greedy and self.repetition_penalty == 1.0 and not self.presence_penalty
                and not self.frequency_penalty and not self.logit_bias and self.logprobs is None and not self.grammar)

    def to_wire(self) -> dict:
        """The fields the sampling stage needs, as a CBOR-able map (the seed is set: a moved session keeps it)."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p,
                "repetition_penalty": self.repetition_penalty, "repetition_context": self.repetition_context,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "logit_bias": [[t, b] for t, b in sorted(self.logit_bias.items())],
                "seed": self.seed if self.seed is not None else -1,
                "logprobs": -1 if self.logprobs is None else self.logprobs,
                **({"grammar": json.dumps(self.grammar)} if self.grammar else {})}

    @classmethod
    def from_wire(cls, d: dict) -> SamplingParams:
        seed, logprobs = int(d.get("seed", -1)), int(d.get("logprobs", -1))
        return cls(temperature=float(d["temperature"]), top_k=int(d["top_k"]), top_p=float(d["top_p"]),
                   min_p=float(d["min_p"]), repetition_penalty=float(d["repetition_penalty"]),
                   repetition_context=int(d["repetition_context"]),
                   presence_penalty=float(d.get("presence_penalty", 0.0)),
                   frequency_penalty=float(d.get("frequency_penalty", 0.0)),
                   logit_bias={int(t): float(b) for t, b in d.get("logit_bias", ())},
                   seed=None if seed < 0 else seed, logprobs=None if logprobs < 0 else min(logprobs, MAX_TOP_LOGPROBS),
                   grammar=json.loads(d["grammar"]) if d.get("grammar") else None)


@dataclass
class Choice:
    token: int
    logprob: float | None = None                     # log p(token) under the model's distribution
    top: list[tuple[int, float]] | None = None       # the most likely tokens and their log p, best first


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


def apply_penalties(logits: mx.array, generated: Counter, presence: float, frequency: float) -> mx.array:
    """OpenAI's presence and frequency penalties over the tokens generated so far: each seen token loses
    presence once and frequency times its count."""
    if not generated or (not presence and not frequency):
        return logits
    ids = sorted(generated)
    cut = mx.array([presence + frequency * generated[t] for t in ids], dtype=logits.dtype)
    logits = mx.array(logits)
    logits[mx.array(ids)] = logits[mx.array(ids)] - cut
    return logits


def apply_logit_bias(logits: mx.array, bias: dict[int, float]) -> mx.array:
    if not bias:
        return logits
    ids = sorted(bias)
    logits = mx.array(logits)
    logits[mx.array(ids)] = logits[mx.array(ids)] + mx.array([bias[t] for t in ids], dtype=logits.dtype)
    return logits


def draw_key(seed: int, step: int) -> mx.array:
    """The random key of draw `step` of a session with this seed (no state carried between draws)."""
    return mx.random.key((seed * 0x9E3779B97F4A7C15 + step) % 2**64)


class Sampler:
    """One session's choice of each next token (see the module's docstring).

    context: the tokens before the next one (prompt and generated) that the repetition penalty looks at;
    step: how many of them this session generated (the last `step` of context), for the seeded draws and
    the presence and frequency penalties.
    """

    def __init__(self, params: SamplingParams, context=(), step: int = 0, constraint=None):
        self.params = params
        self.constraint = constraint    # a grammar.Constraint, already past the tokens generated so far
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        keep = max(params.repetition_context, 0) if params.repetition_penalty != 1.0 else 0
        self.context = list(context)[-keep:] if keep else []
        self.generated = Counter(list(context)[len(context) - step:] if step else [])
        self.step = step

    def adjusted(self, logits: mx.array) -> mx.array:
        """The logits the choice is made from: penalties and logit_bias applied, float32, shape (vocab,)."""
        p = self.params
        logits = logits.reshape(-1).astype(mx.float32)
        logits = apply_repetition_penalty(logits, self.context, p.repetition_penalty, p.repetition_context)
        logits = apply_penalties(logits, self.generated, p.presence_penalty, p.frequency_penalty)
        logits = apply_logit_bias(logits, p.logit_bias)
        if self.constraint is not None:
            logits = mx.where(mx.array(self.constraint.allowed()), logits, mx.array(-math.inf, dtype=mx.float32))
        return logits

    @property
    def finished(self) -> bool:
        """The grammar allows nothing more: the session is complete."""
        return self.constraint is not None and self.constraint.finished

    def pick(self, logits: mx.array) -> int:
        """The next token from adjusted logits: argmax when greedy, else a draw from the filtered softmax."""
        p = self.params
        if p.greedy:
            return int(mx.argmax(logits).item())
        logits = logits / p.temperature
        key = draw_key(self.seed, self.step)
        if p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0:
            ranked, order = filter_logits(logits, p.top_k, p.top_p, p.min_p)
            return int(order[mx.random.categorical(ranked, key=key)].item())
        return int(mx.random.categorical(logits, key=key).item())

    def next(self, logits: mx.array) -> Choice:
        """Choose the token after `logits` (vocab,) and remember it."""
        choice = Choice(self.pick(self.adjusted(logits)))
        if self.params.logprobs is not None:
            choice.logprob, choice.top = log_probabilities(logits, choice.token, self.params.logprobs)
        self.accept(choice.token)
        return choice

    def accept(self, token: int) -> None:
        """`token` follows: the penalties see it, the next draw is the next step."""
        if self.params.repetition_penalty != 1.0:
            self.context.append(token)
            del self.context[:-max(self.params.repetition_context, 1)]
        self.generated[token] += 1
        self.step += 1
        if self.constraint is not None:
            self.constraint.accept(token)

    def __call__(self, logits: mx.array) -> int:
        return self.next(logits).token


def log_probabilities(logits: mx.array, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """log p(token) and the `top` most likely tokens with their log p, from the model's logits (float32)."""
    x = logits.reshape(-1).astype(mx.float32)
    logp = x - mx.logsumexp(x)
    best = mx.argsort(-logp)[:top] if top else mx.array([], dtype=mx.int32)
    values = logp[best].tolist() if top else []
    return float(logp[token].item()), [(int(i), float(v)) for i, v in zip(best.tolist(), values)]


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

    def finish(self, reason: str) -> str:
        """End here (the stage ended the session: a grammar complete); the text held back so far."""
        return self._finish(reason, self._held)[0] if self.finish_reason is None else ""

    def _finish(self, reason: str, text: str) -> tuple[str, str]:
        self.finish_reason, self._held = reason, ""
        return text, reason
