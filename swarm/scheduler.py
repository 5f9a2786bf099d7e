"""The per-token path of one stage: rows of sessions in, one batched forward, rows out.

A stage of a plan (embedding? + layers [start, end) + head?) serves every session that passes through
it. Rows reach it in frames: a prompt chunk from the session's origin or a sampled token coming back
(first stage), hidden states from the stage before (the others). Each step the scheduler

  1. takes the rows that are ready: one waiting piece per session, every decode row up to the batch
     size, and at most PREFILL_ROWS prompt rows (a long prompt is cut, so it never stalls the others);
  2. runs them through the stage as one packed forward on the compute thread (the linears see all the
     rows at once; each session attends over its own KV cache);
  3. sends the hidden states on to the next stage as one frame, or, on the last stage, chooses each
     session's next token with its own sampler and sends it to the session's origin (to stream) and back
     to the first stage (to go on). A session whose token is an end, or whose budget is spent, ends here.

The first stage of a plan spread over M machines takes at most 1/M of its decoding sessions a step, so
the sessions circulate as M micro-batches and every machine computes at the same time. Stages that share
a machine share its processor: splitting among them would only add hops (measured on loopback: 16
streams through three daemons on two cores, 1034 tok/s in one batch against 489 in three groups).

A scheduler lives as long as its plan's epoch: it knows its stage, where its rows go next, and how to
send frames and reach the compute thread (all given), and nothing of the node around it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import mlx.core as mx
import numpy as np

from swarm.model.decoder import KVCache, Stage
from swarm.model.sampling import Choice, Sampler, SamplingParams
from swarm.protocol import encode_tensor, tensor_float32, tensor_numpy, tensor_to_mx

log = logging.getLogger("swarm.scheduler")

PREFILL_ROWS = 256          # prompt rows a step takes beside the decode rows
SESSION_IDLE_S = 120.0      # a session no row reached for this long is freed
ENDED_KEPT = 4096           # ended session ids remembered, so late rows of theirs are dropped quietly

Send = Callable[[str, dict], Awaitable[None]]
Compute = Callable[[Callable], Awaitable]
Constrain = Callable[[dict, list[int]], object]


class RowError(ValueError):
    """Rows this stage refuses; `code` tells the origin whether the session can be moved ("stale")."""

    def __init__(self, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Route:
    """Where a stage's output goes, in the plan of its epoch."""
    epoch: int
    index: int                  # this stage's place in the plan
    stages: int                 # how many stages the plan has
    next_node: str | None       # the node of stage index + 1 (None on the last stage)
    first_node: str             # the node of stage 0, where sampled tokens go on
    micro_batches: int = 1      # groups the first stage keeps its decoding sessions in (see the docstring)


@dataclass
class Opening:
    """What the stage that samples needs of a session; travels with the session's first rows."""
    params: SamplingParams
    budget: int                 # tokens the session may generate in all (counting those before a move)
    eos: frozenset[int]
    context: list[int]          # tokens the penalties look at: prompt tail and all tokens generated so far
    step: int                   # tokens generated so far (a session moved mid-stream starts past 0)

    def to_wire(self) -> dict:
        return {"sampling": self.params.to_wire(), "budget": self.budget, "eos": sorted(self.eos),
                "context": self.context, "step": self.step}

    @classmethod
    def from_wire(cls, d: dict, vocab_size: int) -> Opening:
        """The opening a peer sent, checked: nothing out of range reaches MLX (which does not check indices)."""
        try:
            opening = cls(SamplingParams.from_wire(d["sampling"]).check(vocab_size), int(d["budget"]),
                          frozenset(int(t) for t in d["eos"]), [int(t) for t in d.get("context", ())],
                          int(d.get("step", 0)))
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise RowError(f"bad session opening: {e}") from None
        if not all(0 <= t < vocab_size for t in opening.context) or not 0 <= opening.step <= len(opening.context) + (1 << 24):
            raise RowError(f"bad session opening: context ids must be in [0, {vocab_size})")
        return opening


@dataclass
class Piece:
    """Rows of one session waiting for this stage: token ids (first stage) or hidden states (n, hidden)."""
    session: str
    pos: int
    rows: list[int] | np.ndarray          # (n, hidden) in the wire's dtype
    more: bool                  # prompt rows follow: nothing is sampled after these

    @property
    def n(self) -> int:
        return len(self.rows) if isinstance(self.rows, list) else self.rows.shape[0]

    def split(self, n: int) -> tuple[Piece, Piece]:
        return (Piece(self.session, self.pos, self.rows[:n], True),
                Piece(self.session, self.pos + n, self.rows[n:], self.more))


@dataclass
class StageSession:
    origin: str
    caches: list[KVCache]
    next_pos: int                         # where the next rows must start (rows queued included)
    opening: Opening | None               # sent on with the first rows to leave this stage
    sampler: Sampler | None = None        # the last stage's
    decoding: bool = False                # its prompt is done (a token came back)
    touched: float = field(default_factory=time.monotonic)


class StageScheduler:
    def __init__(self, stage: Stage, route: Route, send: Send, compute: Compute, *, max_batch: int = 16,
                 wire_dtype: str | None = None, constrain: Constrain | None = None):
        self.stage, self.route, self.send, self.compute = stage, route, send, compute
        self.constrain = constrain   # (grammar spec, tokens so far) -> Constraint, on a stage that samples
        self.max_batch, self.wire_dtype = max(1, max_batch), wire_dtype
        self.sessions: dict[str, StageSession] = {}
        self.ended: deque[str] = deque(maxlen=ENDED_KEPT)
        self.queue: list[Piece] = []
        self.wake = asyncio.Event()
        self.steps = 0
        self.last_batch = self.peak_batch = 0     # sessions in the last step, and the most in any step
        self.task: asyncio.Task | None = None   # run(), as its owner started it
        self.wire_in = "float32"                # the dtype hidden states arrive in

    # --- rows in (called on the event loop as frames arrive) -------------------------------------------

    def take_forward(self, frame: dict) -> list[tuple[str, str, RowError]]:
        """Queue a forward frame's rows; returns (origin, session, error) for the rows refused."""
        rows, errors = frame["rows"], []
        if frame["epoch"] != self.route.epoch:
            stale = RowError(f"plan epoch {frame['epoch']} is no longer in force (now {self.route.epoch})", "stale")
            return [(str(r.get("origin", "")), r["session"], stale) for r in rows]
        if "tokens" in frame:
            parts = _cut(frame["tokens"], [r["n"] for r in rows])
        else:
            hidden = tensor_numpy(frame["hidden"])  # MLX ops belong to the compute thread: rows stay numpy till then
            if hidden.ndim != 2 or hidden.shape[1] != self.stage.cfg.hidden_size:
                raise RowError(f"hidden states of shape {tuple(hidden.shape)} for hidden size "
                               f"{self.stage.cfg.hidden_size}", "stage_failed")
            self.wire_in = frame["hidden"]["dtype"]
            parts = _cut(hidden, [r["n"] for r in rows])
        for row, part in zip(rows, parts):
            try:
                self._queue(row["session"], row["pos"], part, bool(row.get("more")), row)
            except RowError as e:
                errors.append((str(row.get("origin", "")), row["session"], e))
                self.end(row["session"])
        self.wake.set()
        return errors

    def take_tokens(self, rows: list[dict]) -> None:
        """Sampled tokens coming back to the first stage: each is its session's next row."""
        for row in rows:
            session = self.sessions.get(row["session"])
            if session is None or row.get("done"):
                continue
            session.decoding = True
            try:
                self._queue(row["session"], row["pos"], [row["token"]], False, row)
            except RowError as e:
                log.warning("token row of session %s refused: %s", row["session"], e)
                self.end(row["session"])
        self.wake.set()

    def _queue(self, sid: str, pos: int, rows, more: bool, row: dict) -> None:
        if (isinstance(rows, list)) != self.stage.spec.first:
            raise RowError(f"this stage takes {'token ids' if self.stage.spec.first else 'hidden states'}", "stage_failed")
        session = self.sessions.get(sid)
        if session is None:
            if sid in self.ended:
                return  # a late row of a session that ended: nothing to say
            if "open" not in row:
                raise RowError(f"session {sid} is unknown on this stage", "stale")
            opening = Opening.from_wire(row["open"], self.stage.cfg.vocab_size)
            session = self.sessions[sid] = StageSession(str(row.get("origin", "")), self.stage.make_cache(), 0, opening)
            if self.stage.spec.last:
                session.sampler = Sampler(opening.params, opening.context, opening.step, self._constraint(opening))
        if pos != session.next_pos:
            raise RowError(f"session {sid}: expected position {session.next_pos}, got {pos}", "stage_failed")
        if isinstance(rows, list) and not all(0 <= t < self.stage.cfg.vocab_size for t in rows):
            # MLX does not check indices: an id past the embedding reads out of bounds
            raise RowError(f"token ids must be in [0, {self.stage.cfg.vocab_size})")
        n = len(rows) if isinstance(rows, list) else rows.shape[0]
        if n == 0:
            raise RowError("a piece has no rows")
        session.next_pos += n
        session.touched = time.monotonic()
        self.queue.append(Piece(sid, pos, rows, more))

    def _constraint(self, opening: Opening):
        """The session's grammar state, past the tokens it generated before a move; None without a grammar."""
        if not opening.params.grammar:
            return None
        if self.constrain is None:
            raise RowError("this stage cannot follow a grammar (no tokenizer)")
        try:
            return self.constrain(opening.params.grammar, opening.context[len(opening.context) - opening.step:]
                                  if opening.step else [])
        except ValueError as e:
            raise RowError(f"bad grammar: {e}") from None

    def end(self, sid: str) -> None:
        if self.sessions.pop(sid, None) is not None or sid not in self.ended:
            self.ended.append(sid)
        self.queue = [p for p in self.queue if p.session != sid]

    def sweep(self) -> None:
        now = time.monotonic()
        for sid, s in list(self.sessions.items()):
            if now - s.touched > SESSION_IDLE_S:
                log.info("session %s idle for %.0f s: freed", sid, now - s.touched)
                self.end(sid)

    # --- the loop ------------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.queue and await self._step():
                await asyncio.sleep(0)  # let frames in before the next step

    async def _step(self) -> bool:
        """One batch through the stage; False when nothing queued could be taken."""
        batch = self._take_batch()
        if not batch:
            return False
        sessions = [self.sessions[p.session] for p in batch]
        try:
            out = await self.compute(lambda: self._forward(batch, sessions))
            self.steps += 1
            self.last_batch = len(batch)
            self.peak_batch = max(self.peak_batch, len(batch))
            await self._emit(batch, sessions, out)
        except Exception as e:  # the batch's sessions fail; the stage goes on
            log.exception("a batch of %d sessions failed on this stage", len(batch))
            for piece, session in zip(batch, sessions):
                self.end(piece.session)
                await self._send_error(session.origin, piece.session, f"stage failed: {e}", "stage_failed")
        return True

    def _decode_cap(self) -> int:
        if self.route.index != 0 or self.route.micro_batches <= 1:
            return self.max_batch
        decoding = sum(s.decoding for s in self.sessions.values())
        return max(1, min(self.max_batch, math.ceil(decoding / self.route.micro_batches)))

    def _take_batch(self) -> list[Piece]:
        """One piece per session: decode rows up to the cap, then prompt rows up to PREFILL_ROWS."""
        decode, prefill, seen, left = [], [], set(), []
        cap, room = self._decode_cap(), PREFILL_ROWS
        for piece in self.queue:
            if piece.session not in self.sessions:
                continue
            if piece.session in seen:
                left.append(piece)
            elif piece.n == 1 and len(decode) < cap:
                decode.append(piece)
            elif piece.n > 1 and room > 0:
                if piece.n > room:
                    piece, rest = piece.split(room)
                    left.append(rest)
                prefill.append(piece)
                room -= piece.n
            else:
                left.append(piece)
            seen.add(piece.session)
        self.queue = left
        return decode + prefill

    def _forward(self, batch: list[Piece], sessions: list[StageSession]):
        """On the compute thread: the batch through the stage; hidden states, or one Choice per final piece."""
        caches, rows = [s.caches for s in sessions], [p.n for p in batch]
        if self.stage.spec.first:
            ids = [t for p in batch for t in p.rows]
        else:
            hidden = batch[0].rows if len(batch) == 1 else np.concatenate([p.rows for p in batch])
        if self.stage.cpu is not None:  # numpy from the wire to the wire: an MLX op costs a thread hand-off
            x = np.array(ids, np.int32) if self.stage.spec.first else tensor_float32(hidden, self.wire_in)
            out = self.stage.forward_numpy(x, caches, rows)
        else:
            x = mx.array(ids, dtype=mx.int32) if self.stage.spec.first else tensor_to_mx(hidden, self.wire_in)
            out = self.stage.forward(x, caches, rows)
            if not self.stage.spec.last:
                out = out[0]
                mx.eval(out)
        if not self.stage.spec.last:
            return out
        return choose(out, [None if p.more else s.sampler for p, s in zip(batch, sessions)])

    async def _emit(self, batch: list[Piece], sessions: list[StageSession], out) -> None:
        route = self.route
        if not self.stage.spec.last:
            rows = []
            for piece, session in zip(batch, sessions):
                row = {"session": piece.session, "pos": piece.pos, "n": piece.n, "more": piece.more,
                       "origin": session.origin}
                if session.opening is not None:
                    row["open"], session.opening = session.opening.to_wire(), None
                rows.append(row)
            frame = {"t": "forward", "epoch": route.epoch, "stage": route.index + 1, "rows": rows,
                     "hidden": encode_tensor(out, self.wire_dtype)}
            try:
                await self.send(route.next_node, frame)
            except ConnectionError as e:
                for piece, session in zip(batch, sessions):
                    await self._send_error(session.origin, piece.session, f"next stage unreachable: {e}", "stale")
            return
        by_target: dict[str, list[dict]] = {}
        for piece, session, choice in zip(batch, sessions, out):
            if choice is None:
                continue  # a prompt chunk with more to come
            opening, sampler = session.opening, session.sampler
            done = choice.token in opening.eos or sampler.step >= opening.budget or sampler.finished
            row = {"session": piece.session, "pos": piece.pos + piece.n, "token": choice.token, "done": done,
                   "step": sampler.step}
            if choice.logprob is not None:
                row["logprob"], row["top"] = choice.logprob, [[t, lp] for t, lp in choice.top]
            by_target.setdefault(session.origin, []).append(row)
            if done:
                self.end(piece.session)
            elif route.first_node != session.origin:
                by_target.setdefault(route.first_node, []).append(row)
        # the first stage's copy first: the next step waits on it, the stream does not
        for target in sorted(by_target, key=lambda node: node != route.first_node):
            try:
                await self.send(target, {"t": "tokens", "epoch": route.epoch, "rows": by_target[target]})
            except ConnectionError:
                pass  # an origin gone has nobody to stream to; a first stage gone moves its sessions

    async def _send_error(self, origin: str, sid: str, message: str, code: str) -> None:
        try:
            await self.send(origin, {"t": "error", "session": sid, "message": message, "code": code})
        except ConnectionError:
            pass


def choose(logits: mx.array | np.ndarray, samplers: list[Sampler | None]) -> list[Choice | None]:
    """Each session's next token from its row of logits (sessions, vocab); None where it has no sampler.
    Plain greedy rows share one argmax (numpy's, on a CPU stage's numpy logits: no MLX op); the others go
    through their own sampler."""
    on_numpy = isinstance(logits, np.ndarray)
    plain = [i for i, s in enumerate(samplers) if s is not None and s.params.plain_greedy]
    out: list[Choice | None] = [None] * len(samplers)
    if plain:
        rows = logits if len(plain) == len(samplers) else logits[plain if on_numpy else mx.array(plain)]
        picks = (np.argmax if on_numpy else mx.argmax)(rows, axis=-1).tolist()
        for i, token in zip(plain, picks):
            samplers[i].accept(token)
            out[i] = Choice(token)
    for i, sampler in enumerate(samplers):
        if sampler is not None and out[i] is None:
            out[i] = sampler.next(mx.array(logits[i]) if on_numpy else logits[i])
    return out


def _cut(rows, counts: list[int]) -> list:
    """rows (a list or an array of rows) cut into consecutive parts of these sizes; RowError if they disagree."""
    total = len(rows) if isinstance(rows, list) else rows.shape[0]
    if sum(counts) != total or any(n < 1 for n in counts):
        raise RowError(f"rows declare {sum(counts)} positions, the frame carries {total}")
    parts, start = [], 0
    for n in counts:
        parts.append(rows[start:start + n])
        start += n
    return parts
