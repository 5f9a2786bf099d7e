"""One request's token stream as the web handlers use it, and this node's live throughput meter.

`Generation` wraps `node.generate`: it times the request on its own (concurrent requests do not share
`node.stats["last_timings"]`), can wait for the first token before a handler commits to a reply (so
"busy", "not ready" and "prompt too long" become HTTP errors, not half-sent streams), and closing it
ends the session on every stage; it feeds the node's Prometheus instruments (web/metrics.py) as tokens
come. `Meter` counts the tokens of all requests entering through this node, for the dashboard's live
tokens/s and time to first token. `Deltas` cuts the token stream into what an API sends: content text
and tool calls, with the tokens behind each piece (for logprobs).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from swarm.model.generate import Timings
from swarm.model.sampling import Choice, SamplingParams

LIVE_WINDOW_S = 2.0


class Meter:
    """Tokens/s over the last seconds, open generations and the last time to first token, on this node."""

    def __init__(self):
        self.active = 0
        self.stamps: deque[float] = deque(maxlen=4096)
        self.last_ttft_s: float | None = None
        self.last_tps: float | None = None

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        recent = [t for t in self.stamps if now - t <= LIVE_WINDOW_S]
        if len(recent) < 2 or now - recent[-1] > LIVE_WINDOW_S / 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)

    def flowing(self) -> bool:
        """True while tokens flow, and a little after, so the last push shows the rate fall to zero."""
        return bool(self.active) or bool(self.stamps and time.monotonic() - self.stamps[-1] < LIVE_WINDOW_S + 1)

    def as_dict(self) -> dict:
        return {"tps": round(self.tokens_per_s(), 2), "active": self.active, "last_ttft_s": self.last_ttft_s,
                "last_tps": self.last_tps}


class Generation:
    """`async with Generation(...) as gen: await gen.start(); async for token, text, reason in gen: ...`"""

    def __init__(self, node, meter: Meter, prompt: list[int], params: SamplingParams, metrics=None):
        self.node, self.meter, self.prompt, self.params, self.metrics = node, meter, prompt, params, metrics
        self.timings = Timings(prompt_tokens=len(prompt))
        self.token_ids: list[int] = []
        self.choices: list[Choice] = []          # with their log-probabilities, when asked for
        self.text = ""
        self.finish_reason: str | None = None
        self._tokens = None
        self._first = None
        self._t0 = self._last = 0.0

    async def __aenter__(self) -> Generation:
        self._t0 = time.perf_counter()
        self._tokens = self.node.generate(self.prompt, self.params)
        self.meter.active += 1
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(self.prompt))
        return self

    async def __aexit__(self, *exc) -> None:
        self.meter.active -= 1
        if self.token_ids:
            self.meter.last_ttft_s = round(self.timings.prefill_s, 4)
            self.meter.last_tps = round(self.timings.decode_tps, 2)
        await self._tokens.aclose()  # ends the session on every stage, whether it finished or not

    async def start(self) -> None:
        """Wait for the first token; raises SwarmError (busy, not ready, too long) before anything was sent."""
        try:
            self._first = await self._next()
        except StopAsyncIteration:
            self._first = None

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> tuple[Choice, str, str | None]:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self._next()

    async def _next(self) -> tuple[Choice, str, str | None]:
        choice, text, reason = await self._tokens.__anext__()
        now = time.perf_counter()
        if not self.token_ids:
            self.timings.prefill_s, self._t1 = now - self._t0, now
        if self.metrics is not None:
            (self.metrics.token_time if self.token_ids else self.metrics.ttft).observe(now - (self._last or self._t0))
            self.metrics.generated_tokens.inc()
        self._last = now
        self.token_ids.append(choice.token)
        self.choices.append(choice)
        self.timings.generated_tokens += 1
        self.timings.decode_s = now - self._t1
        self.text += text
        self.finish_reason = reason or self.finish_reason
        self.meter.stamps.append(time.monotonic())
        return choice, text, reason

    def usage(self) -> dict:
        prompt, completion = len(self.prompt), len(self.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass
class Delta:
    """A piece of an answer: content text and tool calls that can go out now, and the tokens behind them."""

    text: str = ""
    calls: list[dict] = field(default_factory=list)
    choices: list[Choice] = field(default_factory=list)


class Deltas:
    """Generated tokens -> the answer's pieces. With tools in play (job.tool_parser()), text that may begin
    a tool call is held back until it is known, and calls come out whole; markers that are special tokens
    (left out of the text) are put back for the parser."""

    def __init__(self, job):
        self.parser = job.tool_parser()
        self.markers = job.tool_markers or {}
        self.pending: list[Choice] = []
        self.text = ""
        self.calls: list[dict] = []
        self.pieces: list[Delta] = []

    def feed(self, choice: Choice, text: str) -> Delta | None:
        self.pending.append(choice)
        calls: list[dict] = []
        if self.parser is not None:
            text, calls = self.parser.feed(self.markers.get(choice.token, text))
        return self._out(text, calls) if text or calls else None

    def close(self) -> Delta | None:
        text, calls = self.parser.close() if self.parser is not None else ("", [])
        return self._out(text, calls) if text or calls or self.pending else None

    def _out(self, text: str, calls: list[dict]) -> Delta:
        delta = Delta(text, calls, self.pending)
        self.pending = []
        self.text += text
        self.calls += calls
        self.pieces.append(delta)
        return delta

    def finish_reason(self, gen: Generation) -> str:
        return "tool_calls" if self.calls else gen.finish_reason or "length"
