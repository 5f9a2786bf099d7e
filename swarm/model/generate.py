"""Generation on one node: prefill in chunks, decode token by token, stop, detokenize, time it.

`generate_ids` is the bare loop on a one-stage model; `generate_text` adds the tokenizer's streaming
detokenizer and stop rules. The swarm's pipeline runs the same steps with the stages on several nodes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import mlx.core as mx

from swarm.model.decoder import Stage
from swarm.model.sampling import Sampler, SamplingParams, StopChecker
from swarm.model.tokenizer import Tokenizer

PREFILL_STEP = 512


@dataclass
class Timings:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0      # from the request to the first generated token
    decode_s: float = 0.0       # from the first generated token to the last

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        return (self.generated_tokens - 1) / self.decode_s if self.decode_s and self.generated_tokens > 1 else 0.0

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
                "ttft_s": round(self.prefill_s, 6), "decode_s": round(self.decode_s, 6),
                "prefill_tps": round(self.prefill_tps, 2), "decode_tps": round(self.decode_tps, 2)}


def context_budget(stage: Stage, prompt_len: int, max_tokens: int, max_context: int | None = None) -> int:
    """How many tokens may be generated: max_tokens, cut to what the context length leaves."""
    context = max_context or stage.cfg.max_position_embeddings
    if prompt_len >= context:
        raise ValueError(f"the prompt has {prompt_len} tokens; the context holds {context}")
    return min(max_tokens, context - prompt_len)


def prefill(stage: Stage, prompt: list[int], cache) -> mx.array:
    """Runs the prompt through the stage in chunks; returns the last position's logits (vocab,)."""
    ids = mx.array(prompt, dtype=mx.int32)[None]
    for i in range(0, len(prompt), PREFILL_STEP):
        logits = stage(ids[:, i:i + PREFILL_STEP], cache)
        mx.eval(logits)
    return logits[0, -1]


def generate_ids(stage: Stage, prompt: list[int], params: SamplingParams, eos_ids=frozenset(),
                 max_context: int | None = None, timings: Timings | None = None) -> Iterator[int]:
    """Token ids after `prompt`, until EOS (yielded) or the token budget; the stage must be first and last."""
    if not prompt:
        raise ValueError("the prompt is empty")
    timings = timings if timings is not None else Timings()
    timings.prompt_tokens = len(prompt)
    budget = context_budget(stage, len(prompt), params.max_tokens, max_context)
    sampler, cache = Sampler(params, context=prompt), stage.make_cache()
    greedy = params.plain_greedy
    t0 = time.perf_counter()
    logits = prefill(stage, prompt, cache)
    # Greedy decode keeps one step in flight: the next token's graph is queued before this one is read.
    token = mx.argmax(logits) if greedy else mx.array(sampler(logits))
    mx.async_eval(token)
    for n in range(budget):
        following = None
        if greedy and n + 1 < budget:
            following = mx.argmax(stage(token.reshape(1, 1), cache)[0, -1])
            mx.async_eval(following)
        t = token.item()
        now = time.perf_counter()
        if n == 0:
            timings.prefill_s, t1 = now - t0, now
        timings.generated_tokens, timings.decode_s = n + 1, now - t1
        yield t
        if t in eos_ids:
            return
        if not greedy and n + 1 < budget:
            following = mx.array(sampler(stage(mx.array([[t]]), cache)[0, -1]))
        token = following


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    timings: Timings = field(default_factory=Timings)


class TextStream:
    """Token ids in, text out: the streaming detokenizer and the stop rules of one generation.

    Without a tokenizer (a checkpoint that ships none) only ids flow: EOS and the budget still stop it.
    """

    def __init__(self, tokenizer: Tokenizer | None, params: SamplingParams, prompt_tokens: int, context: int,
                 eos_ids=None):
        self.detok = tokenizer.detokenizer() if tokenizer else None
        self.eos = set(eos_ids if eos_ids is not None else tokenizer.eos_token_ids if tokenizer else ())
        self.stops = StopChecker(params.stop if tokenizer else (), self.eos, params.max_tokens, context, prompt_tokens)

    def feed(self, token: int) -> tuple[str, str | None]:
        """(new text, finish reason or None) after one more token."""
        piece = "" if token in self.eos or self.detok is None else self.detok.add(token)
        return self.stops.feed(token, piece)

    def finish(self, reason: str = "stop") -> str:
        """End the stream here; the text held back (a possible start of a stop string)."""
        return self.stops.finish(reason)


def generate_text(stage: Stage, tokenizer: Tokenizer | None, prompt: list[int], params: SamplingParams,
                  max_context: int | None = None, completion: Completion | None = None) -> Iterator[str]:
    """Pieces of text as they complete (never half a character, never part of a stop string).

    `completion` (if given) collects the ids, the full text, the finish reason and the timings.
    """
    done = completion if completion is not None else Completion()
    eos = set(tokenizer.eos_token_ids) if tokenizer else set(stage.cfg.eos_token_id)
    stream = TextStream(tokenizer, params, len(prompt), max_context or stage.cfg.max_position_embeddings, eos)
    for token in generate_ids(stage, prompt, params, eos, max_context, done.timings):
        done.token_ids.append(token)
        text, reason = stream.feed(token)
        if text:
            done.text += text
            yield text
        if reason:
            done.finish_reason = reason
            return
    done.finish_reason = "length"
