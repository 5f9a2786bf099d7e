"""One request's token stream as the web handlers use it, and this node's live throughput meter.

`Generation` wraps `node.generate`: it times the request on its own (concurrent requests do not share
`node.stats["last_timings"]`), can wait for the first token before a handler commits to a reply (so
"busy", "not ready" and "prompt too long" become HTTP errors, not half-sent streams), and closing it
ends the session on every stage. `Meter` counts the tokens of all requests entering through this node,
for the dashboard's live tokens/s and time to first token.
"""

from __future__ import annotations

import time
from collections import deque

from swarm.model.generate import Timings
from swarm.model.sampling import SamplingParams

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

    def __init__(self, node, meter: Meter, prompt: list[int], params: SamplingParams):
        self.node, self.meter, self.prompt, self.params = node, meter, prompt, params
        self.timings = Timings(prompt_tokens=len(prompt))
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self._tokens = None
        self._first = None
        self._t0 = 0.0

    async def __aenter__(self) -> Generation:
        self._t0 = time.perf_counter()
        self._tokens = self.node.generate(self.prompt, self.params)
        self.meter.active += 1
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

    async def __anext__(self) -> tuple[int, str, str | None]:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self._next()

    async def _next(self) -> tuple[int, str, str | None]:
        token, text, reason = await self._tokens.__anext__()
        now = time.perf_counter()
        if not self.token_ids:
            self.timings.prefill_s, self._t1 = now - self._t0, now
        self.token_ids.append(token)
        self.timings.generated_tokens += 1
        self.timings.decode_s = now - self._t1
        self.text += text
        self.finish_reason = reason or self.finish_reason
        self.meter.stamps.append(time.monotonic())
        return token, text, reason

    def usage(self) -> dict:
        prompt, completion = len(self.prompt), len(self.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
