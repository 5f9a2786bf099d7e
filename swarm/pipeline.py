"""A request as the node that took it (its origin) sees it: admission, the attempt in flight, and moves.

The origin keeps each request's prompt and the tokens generated so far. An attempt sends prompt and
tokens to the first stage of the plan in force, as one session; tokens come back as the last stage
samples them (swarm/scheduler.py). When the plan changes under an attempt (a stage's node lost, a join
that moves layers, a topology edit), the origin abandons it, waits for the new plan and starts another
attempt that prefills prompt + generated tokens there: the stream goes on from the next token with the
same sampler state (seed, step, the penalties' context), so the text is what an undisturbed run gives.
A request moved more than `max_moves` times, or kept waiting longer than `plan_wait` seconds for a plan,
fails with a clear error; so does one whose model has no source left or no longer fits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Protocol

from swarm.model.generate import PREFILL_STEP
from swarm.model.sampling import Choice, SamplingParams
from swarm.scheduler import Opening

log = logging.getLogger("swarm.pipeline")

MAX_MOVES = 4
PLAN_WAIT_S = 30.0
FIRST_TOKEN_TIMEOUT_S = 300.0
TOKEN_TIMEOUT_S = 60.0


class SwarmError(RuntimeError):
    """A request the swarm cannot serve now; `status` is the HTTP status that says so."""

    def __init__(self, message: str, status: int = 503):
        super().__init__(message)
        self.status = status


class Origin(Protocol):
    """What a request needs of the node that took it."""
    id: str
    attempts: dict[str, "Request"]

    async def send(self, node_id: str, frame: dict) -> None: ...
    async def send_quietly(self, node_id: str, frame: dict) -> None: ...
    async def plan_ready(self, after_epoch: int | None, timeout: float): ...
    def note_move(self, paused_s: float) -> None: ...


class Admission:
    """At most `max_active` requests generate at once; up to `max_queue` more wait their turn (first come,
    first served); past that a request is refused as busy, with the figures."""

    def __init__(self, max_active: int, max_queue: int):
        self.max_active, self.max_queue = max_active, max_queue
        self.active = self.waiting = 0
        self._slots = asyncio.Semaphore(max_active)

    @contextlib.asynccontextmanager
    async def slot(self):
        if self._slots.locked() and self.waiting >= self.max_queue:
            raise SwarmError(f"busy: {self.active} requests generating and {self.waiting} waiting "
                             f"(--max-batch {self.max_active}, --max-queue {self.max_queue})")
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._slots.release()


@dataclass
class Attempt:
    session: str
    epoch: int
    nodes: tuple[str, ...]


@dataclass(eq=False)
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams          # with its seed set, so every attempt draws the same
    budget: int                     # tokens it may generate
    eos: frozenset[int]
    generated: list[int] = field(default_factory=list)
    attempt: Attempt | None = None
    moves: int = 0
    events: asyncio.Queue = field(default_factory=asyncio.Queue)   # (kind, session, value)

    def opening(self) -> Opening:
        p, context = self.params, []
        if p.repetition_penalty != 1.0:
            context = self.prompt[-p.repetition_context:] if p.repetition_context > 0 else []
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty or p.grammar:
            context = context + self.generated
        return Opening(p, self.budget, self.eos, context, len(self.generated))


async def request_tokens(node: Origin, prompt: list[int], params: SamplingParams, budget: int, eos: frozenset[int],
                         max_moves: int = MAX_MOVES, plan_wait: float = PLAN_WAIT_S) -> AsyncIterator[tuple[Choice, bool]]:
    """(choice, done) for each token of one generation through the swarm, moved between plans as needed."""
    if params.seed is None:
        params = replace(params, seed=secrets.randbits(63))
    request = Request(uuid.uuid4().hex, list(prompt), params, budget, eos)
    try:
        while True:
            moved_at = time.monotonic() if request.attempt else None
            await _start_attempt(node, request, plan_wait)
            if moved_at is not None:
                node.note_move(time.monotonic() - moved_at)
            async for choice, done in _attempt_tokens(request):
                request.generated.append(choice.token)
                yield choice, done
                if done:
                    return
            await _abandon(node, request)
            request.moves += 1
            if request.moves > max_moves:
                raise SwarmError(f"the swarm changed its plan {request.moves} times during this request; giving up")
    finally:
        await _abandon(node, request)


async def _start_attempt(node: Origin, request: Request, plan_wait: float) -> None:
    after = request.attempt.epoch if request.attempt else None
    plan, epoch = await node.plan_ready(after, plan_wait)
    attempt = request.attempt = Attempt(f"{request.id}.{request.moves}", epoch, plan.node_ids())
    node.attempts[attempt.session] = request
    if request.moves:
        log.info("request %s moves to plan epoch %d after %d tokens", request.id, epoch, len(request.generated))
    ids = request.prompt + request.generated
    for i in range(0, len(ids), PREFILL_STEP):
        row = {"session": attempt.session, "pos": i, "n": len(ids[i:i + PREFILL_STEP]), "origin": node.id,
               "more": i + PREFILL_STEP < len(ids)}
        if i == 0:
            row["open"] = request.opening().to_wire()
        try:
            await node.send(plan.stages[0].node_id, {"t": "forward", "epoch": epoch, "stage": 0, "rows": [row],
                                                     "tokens": ids[i:i + PREFILL_STEP]})
        except ConnectionError as e:
            request.events.put_nowait(("moved", attempt.session, f"first stage unreachable: {e}"))
            return


async def _attempt_tokens(request: Request) -> AsyncIterator[tuple[Choice, bool]]:
    """The tokens of the attempt in flight; returns when the attempt is moved, raises when it fails."""
    session, timeout = request.attempt.session, FIRST_TOKEN_TIMEOUT_S
    while True:
        try:
            kind, sid, value = await asyncio.wait_for(request.events.get(), timeout)
        except asyncio.TimeoutError:
            raise SwarmError(f"no token from the pipeline in {timeout:.0f} s", 504) from None
        if sid != session:
            continue  # a late word of an abandoned attempt
        if kind == "moved":
            log.info("request %s: %s", request.id, value)
            return
        if kind == "error":
            raise SwarmError(*value)
        top = [(int(t), float(lp)) for t, lp in value["top"]] if "top" in value else None
        yield Choice(value["token"], value.get("logprob"), top), bool(value.get("done"))
        timeout = TOKEN_TIMEOUT_S


async def _abandon(node: Origin, request: Request) -> None:
    """End the attempt's session on every node of its plan (it may still be running there)."""
    attempt = request.attempt
    if attempt is None or node.attempts.pop(attempt.session, None) is None:
        return
    for node_id in attempt.nodes:
        await node.send_quietly(node_id, {"t": "end", "session": attempt.session})


def deliver_tokens(node: Origin, rows: list[dict]) -> None:
    for row in rows:
        request = node.attempts.get(row["session"])
        if request is not None:
            request.events.put_nowait(("token", row["session"], row))


def deliver_error(node: Origin, frame: dict) -> None:
    """A stage refused or lost an attempt's session: "stale" ones move, the others fail (a request the
    stage found malformed, such as a grammar it cannot follow, as the client's error: 400)."""
    request = node.attempts.get(frame.get("session", ""))
    if request is None:
        return
    code = frame.get("code")
    if code == "stale":
        request.events.put_nowait(("moved", frame["session"], frame["message"]))
    else:
        request.events.put_nowait(("error", frame["session"], (frame["message"], 400 if code == "bad_request" else 503)))


def move_requests(node: Origin, why: str, *, epoch: int | None = None, gone: str | None = None) -> None:
    """Attempts of a plan other than `epoch`, or passing through node `gone`, move to the next plan."""
    for request in set(node.attempts.values()):
        attempt = request.attempt
        if attempt is not None and ((epoch is not None and attempt.epoch != epoch) or gone in attempt.nodes):
            request.events.put_nowait(("moved", attempt.session, why))
