"""Sessions across the stages of a plan: hidden states forward, the last stage samples, tokens ring back.

A request enters at any node (its origin). The origin sends the prompt to the first stage in chunks;
each stage runs its layers and forwards the hidden state to the next; the last stage samples and
sends the token both to the origin (to stream it) and to the first stage (to go on), so each token
costs one round of hops and nothing else. The origin ends the session on every stage when it is done,
fails or is cancelled; an idle session is dropped after SESSION_IDLE_S.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator

import mlx.core as mx

from swarm.model.generate import PREFILL_STEP
from swarm.model.sampling import Sampler, SamplingParams
from swarm.protocol import decode_tensor, encode_tensor

if TYPE_CHECKING:
    from swarm.node import Node

log = logging.getLogger("swarm.pipeline")

SESSION_IDLE_S = 120.0
FIRST_TOKEN_TIMEOUT_S = 300.0
TOKEN_TIMEOUT_S = 60.0


class SwarmError(RuntimeError):
    """A request the swarm cannot serve now; `status` is the HTTP status that says so."""

    def __init__(self, message: str, status: int = 503):
        super().__init__(message)
        self.status = status


def sampling_to_wire(params: SamplingParams, budget: int, eos: set[int]) -> dict:
    return {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p, "min_p": params.min_p,
            "repetition_penalty": params.repetition_penalty, "repetition_context": params.repetition_context,
            "seed": params.seed if params.seed is not None else -1, "budget": budget, "eos": sorted(eos)}


def sampling_from_wire(d: dict) -> tuple[SamplingParams, int, frozenset[int]]:
    seed = int(d.get("seed", -1))
    params = SamplingParams(temperature=float(d["temperature"]), top_k=int(d["top_k"]), top_p=float(d["top_p"]),
                            min_p=float(d["min_p"]), repetition_penalty=float(d["repetition_penalty"]),
                            repetition_context=int(d["repetition_context"]), seed=None if seed < 0 else seed)
    return params, int(d["budget"]), frozenset(int(t) for t in d["eos"])


@dataclass
class StageSession:
    origin: str
    epoch: int
    cache: list
    params: SamplingParams
    budget: int
    eos: frozenset[int]
    sampler: Sampler
    history: list[int] = field(default_factory=list)
    step: int = 0
    touched: float = field(default_factory=time.monotonic)


class StageRunner:
    """This node's part of every session: frames are handled one at a time, in arrival order."""

    def __init__(self, node: "Node"):
        self.node = node
        self.sessions: dict[str, StageSession] = {}
        self.ended: deque[str] = deque(maxlen=4096)
        self.queue: asyncio.Queue[dict] = asyncio.Queue()

    def submit(self, frame: dict) -> None:
        self.queue.put_nowait(frame)

    def end(self, session: str) -> None:
        self.ended.append(session)
        self.sessions.pop(session, None)

    def drop_all(self, why: str) -> None:
        for session in list(self.sessions):
            self.end(session)
        if why:
            log.info("dropped all sessions: %s", why)

    async def run(self) -> None:
        while True:
            frame = await self.queue.get()
            try:
                await self._handle(frame)
            except Exception as e:  # one session fails; the node goes on
                if isinstance(e, (SwarmError, ConnectionError)):
                    log.warning("session %s failed on this stage: %s", frame.get("session"), e)
                else:
                    log.exception("session %s failed on this stage", frame.get("session"))
                self.end(frame["session"])
                await self.node.send_quietly(frame.get("origin", ""), {
                    "t": "error", "session": frame["session"], "message": f"stage on {self.node.name} failed: {e}"})

    async def sweep(self) -> None:
        while True:
            await asyncio.sleep(SESSION_IDLE_S / 4)
            now = time.monotonic()
            for sid, s in list(self.sessions.items()):
                if now - s.touched > SESSION_IDLE_S:
                    log.info("session %s idle for %.0f s: freed", sid, now - s.touched)
                    self.end(sid)

    def _session(self, frame: dict) -> StageSession | None:
        sid = frame["session"]
        session = self.sessions.get(sid)
        if session is None and sid not in self.ended and frame["t"] == "forward" and "sampling" in frame:
            params, budget, eos = sampling_from_wire(frame["sampling"])
            session = self.sessions[sid] = StageSession(
                origin=str(frame.get("origin", "")), epoch=frame["epoch"], cache=self.node.stage.make_cache(),
                params=params, budget=budget, eos=eos, sampler=Sampler(params))
        return session

    async def _handle(self, frame: dict) -> None:
        session = self._session(frame)
        if session is None:
            return  # ended, or a late frame of a session this node never had
        session.touched = time.monotonic()
        node, stage = self.node, self.node.stage
        # the plan of this frame's epoch, held across the awaits below: a new epoch may come meanwhile
        plan, mine = node.plan, node.plan_stage
        if frame["epoch"] != node.epoch or stage is None:
            raise SwarmError(f"plan epoch {frame['epoch']} is no longer in force (now {node.epoch})")
        if mine is None or (mine.start, mine.end) != (stage.spec.start, stage.spec.end):
            raise SwarmError(f"this node is still loading its stage of plan epoch {node.epoch}")
        ids = [frame["token"]] if frame["t"] == "token" else frame.get("tokens")
        if (ids is not None) != stage.spec.first:
            raise SwarmError(f"this stage takes {'token ids' if stage.spec.first else 'hidden states'}", 400)
        if ids is not None:
            # MLX does not check indices: an id past the embedding reads out of bounds (a crash at best)
            if not all(0 <= t < stage.cfg.vocab_size for t in ids):
                raise SwarmError(f"token ids must be in [0, {stage.cfg.vocab_size})", 400)
            x, more = mx.array([ids], dtype=mx.int32), bool(frame.get("more"))
        else:
            x, more = decode_tensor(frame["hidden"]), bool(frame.get("more"))
            if x.ndim != 3 or x.shape[0] != 1 or x.shape[2] != stage.cfg.hidden_size:
                raise SwarmError(f"hidden states of shape {tuple(x.shape)} for hidden size {stage.cfg.hidden_size}", 400)
        pos, cache = frame["pos"], session.cache
        if cache[0].offset != pos:
            raise SwarmError(f"session {frame['session']}: expected position {cache[0].offset}, got {pos}")
        if not stage.spec.last:
            hidden = await node.compute(lambda: _evaluated(stage(x, cache)))
            out = {"t": "forward", "session": frame["session"], "epoch": frame["epoch"], "pos": pos,
                   "origin": session.origin, "hidden": encode_tensor(hidden, node.wire_dtype), "more": more}
            if "sampling" in frame:
                out["sampling"] = frame["sampling"]
            await node.send(plan.stages[plan.stages.index(mine) + 1].node_id, out)
            return
        if more:
            await node.compute(lambda: _evaluated(stage(x, cache)))
            return
        token = await node.compute(lambda: session.sampler(stage(x, cache)[0, -1], session.history))
        session.history.append(token)
        session.step += 1
        done = token in session.eos or session.step >= session.budget
        out = {"t": "token", "session": frame["session"], "epoch": frame["epoch"], "pos": pos + x.shape[1],
               "token": token, "done": done, "step": session.step, "origin": session.origin}
        first = plan.stages[0].node_id
        if done:
            self.end(frame["session"])
        for target in dict.fromkeys([session.origin] + ([first] if not done else [])):
            await node.send(target, out)


def _evaluated(x: mx.array) -> mx.array:
    mx.eval(x)
    return x


@dataclass
class Request:
    session: str
    epoch: int
    nodes: tuple[str, ...]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


async def request_tokens(node: "Node", prompt: list[int], params: SamplingParams, budget: int) -> AsyncIterator[int]:
    """Token ids of one generation through the swarm's pipeline, as the last stage samples them."""
    plan, epoch = node.plan, node.epoch
    first = plan.stages[0].node_id
    request = Request(uuid.uuid4().hex, epoch, plan.node_ids())
    node.requests[request.session] = request
    sampling = sampling_to_wire(params, budget, node.eos_ids)
    try:
        for i in range(0, len(prompt), PREFILL_STEP):
            await node.send(first, {"t": "forward", "session": request.session, "epoch": epoch, "pos": i,
                                    "tokens": prompt[i:i + PREFILL_STEP], "origin": node.id, "sampling": sampling,
                                    "more": i + PREFILL_STEP < len(prompt)})
        timeout = FIRST_TOKEN_TIMEOUT_S
        while True:
            try:
                kind, value, done = await asyncio.wait_for(request.queue.get(), timeout)
            except asyncio.TimeoutError:
                raise SwarmError(f"no token from the pipeline in {timeout:.0f} s", 504) from None
            if kind == "error":
                raise SwarmError(value)
            yield value
            if done:
                return
            timeout = TOKEN_TIMEOUT_S
    finally:
        node.requests.pop(request.session, None)
        for node_id in request.nodes:
            await node.send_quietly(node_id, {"t": "end", "session": request.session})


def deliver(node: "Node", frame: dict) -> None:
    """A token, end or error frame reaching this node: feed its request and/or its first stage."""
    t, sid = frame["t"], frame.get("session")
    request = node.requests.get(sid)
    if t == "token":
        if request is not None and frame.get("origin", node.id) == node.id:
            request.queue.put_nowait(("token", frame["token"], bool(frame.get("done"))))
        if not frame.get("done") and node.plan_stage is not None and node.plan_stage.first and sid in node.runner.sessions:
            node.runner.submit(frame)
    elif t == "end":
        node.runner.end(sid)
    elif t == "error" and request is not None:
        request.queue.put_nowait(("error", frame["message"], True))


def fail_stale_requests(node: "Node", epoch: int) -> None:
    """Requests of an older plan fail now: a new epoch ended their sessions on every stage."""
    for request in list(node.requests.values()):
        if request.epoch != epoch:
            request.queue.put_nowait(("error", f"the swarm changed its plan (epoch {epoch}) mid-request", True))


def fail_requests(node: "Node", dead_node: str, why: str) -> None:
    """Requests whose pipeline passes through a node that is gone fail now instead of waiting."""
    for request in list(node.requests.values()):
        if dead_node in request.nodes:
            request.queue.put_nowait(("error", f"node {dead_node} left the swarm mid-request ({why})", True))
