"""The stage scheduler in one process: a real stage (mlx-lm's stories-shaped llama), real frames in and out.

What is checked: sessions decoded together give exactly their solo greedy tokens; a long prompt is cut
into chunks that share steps with the others' decode; the first stage of a three-stage plan runs its
decoding sessions as three micro-batches; rows that break the rules are refused one session at a time.
"""

from __future__ import annotations

import asyncio

import mlx.core as mx
import numpy as np
import pytest

from swarm.model.decoder import load_stage
from swarm.model.generate import generate_ids
from swarm.model.sampling import Sampler, SamplingParams
from swarm.scheduler import PREFILL_ROWS, Opening, Route, StageScheduler, choose

EOS = frozenset({2})


def opening(budget: int) -> dict:
    return Opening(SamplingParams(), budget, EOS, [], 0).to_wire()


class Harness:
    """A scheduler whose sent frames are kept, and whose tokens for the first stage come back to it."""

    def __init__(self, stage, route: Route, max_batch: int = 16, loop_back: bool = True):
        self.frames: list[tuple[str, dict]] = []
        self.rows_per_step: list[list[int]] = []
        self.loop_back = loop_back
        for name in ("forward", "forward_numpy"):  # MLX's ops, or numpy on the CPU kernels
            setattr(stage, name, self.counting(getattr(stage, name)))
        self.scheduler = StageScheduler(stage, route, self.send, self.compute, max_batch=max_batch)

    def counting(self, forward):
        def counted(x, caches, rows, all_logits=False):
            self.rows_per_step.append(list(rows))
            return forward(x, caches, rows, all_logits)
        return counted

    async def send(self, node: str, frame: dict) -> None:
        self.frames.append((node, frame))
        if self.loop_back and frame["t"] == "tokens" and node == self.scheduler.route.first_node:
            self.scheduler.take_tokens(frame["rows"])

    async def compute(self, fn):
        return await asyncio.get_running_loop().run_in_executor(None, fn)

    def tokens_of(self, session: str) -> list[int]:
        return [r["token"] for _, f in self.frames if f["t"] == "tokens" for r in f["rows"] if r["session"] == session]


def open_frame(epoch: int, sessions: dict[str, list[int]], budget: int, stage: int = 0) -> dict:
    rows, tokens = [], []
    for sid, prompt in sessions.items():
        rows.append({"session": sid, "pos": 0, "n": len(prompt), "origin": "me", "open": opening(budget)})
        tokens += prompt
    return {"t": "forward", "epoch": epoch, "stage": stage, "rows": rows, "tokens": tokens}


async def until(predicate, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def whole(tiny_llama):
    return load_stage(tiny_llama.folder)


PROMPTS = {f"s{i}": [1] + [(7 * i + 3 * k) % 500 + 3 for k in range(3 + 5 * i)] for i in range(8)}


async def test_sessions_decoded_together_give_their_solo_tokens(whole, tiny_llama):
    budget = 12
    solo = {sid: list(generate_ids(whole, p, SamplingParams(max_tokens=budget), EOS)) for sid, p in PROMPTS.items()}
    h = Harness(load_stage(tiny_llama.folder), Route(1, 0, 1, None, "me"))
    task = asyncio.ensure_future(h.scheduler.run())
    try:
        first = dict(list(PROMPTS.items())[:4])
        assert h.scheduler.take_forward(open_frame(1, first, budget)) == []
        await until(lambda: len(h.tokens_of("s0")) >= 3)  # the others join while these decode
        assert h.scheduler.take_forward(open_frame(1, dict(list(PROMPTS.items())[4:]), budget)) == []
        await until(lambda: not h.scheduler.sessions)
    finally:
        task.cancel()
    assert {sid: h.tokens_of(sid) for sid in PROMPTS} == solo
    assert max(len(rows) for rows in h.rows_per_step) > 4  # steps with several sessions: it batched


async def test_a_long_prompt_shares_steps_with_the_others_decode(tiny_llama):
    h = Harness(load_stage(tiny_llama.folder), Route(1, 0, 1, None, "me"))
    task = asyncio.ensure_future(h.scheduler.run())
    try:
        h.scheduler.take_forward(open_frame(1, {"a": [1, 5, 9], "b": [1, 7]}, 40))
        await until(lambda: len(h.tokens_of("a")) >= 2)
        long_prompt = [1] + [(k * 13) % 500 + 3 for k in range(2 * PREFILL_ROWS + 100)]
        h.scheduler.take_forward(open_frame(1, {"long": long_prompt}, 4))
        await until(lambda: h.tokens_of("long"))
    finally:
        task.cancel()
    with_prompt = [rows for rows in h.rows_per_step if max(rows) > 1 and len(rows) > 1]
    assert len(with_prompt) >= 3, h.rows_per_step  # the prompt took three steps, each beside decode rows
    assert all(max(rows) <= PREFILL_ROWS for rows in h.rows_per_step)


@pytest.mark.parametrize("machines, groups", [(3, [2, 2, 2]), (1, [6])])
async def test_the_first_of_three_stages_runs_a_micro_batch_per_machine(tiny_llama, machines, groups):
    first = load_stage(tiny_llama.folder, 0, 2, True, False)
    h = Harness(first, Route(1, 0, 3, "next", "me", micro_batches=machines), loop_back=False)
    task = asyncio.ensure_future(h.scheduler.run())
    try:
        sessions = {f"d{i}": [1, 10 + i] for i in range(6)}
        h.scheduler.take_forward(open_frame(1, sessions, 20))
        await until(lambda: sum(len(f["rows"]) for _, f in h.frames) == 6)
        h.frames.clear()
        # the six tokens come back at once; over three machines the stage takes at most 6 / 3 = 2 a step
        h.scheduler.take_tokens([{"session": sid, "pos": 2, "token": 42, "done": False} for sid in sessions])
        await until(lambda: sum(len(f["rows"]) for _, f in h.frames) == 6)
    finally:
        task.cancel()
    assert [len(f["rows"]) for _, f in h.frames] == groups
    assert all(f["t"] == "forward" and f["stage"] == 1 and f["hidden"]["shape"] == [n, first.cfg.hidden_size]
               for (_, f), n in zip(h.frames, groups))


async def test_rows_that_break_the_rules_are_refused_one_session_at_a_time(tiny_llama):
    h = Harness(load_stage(tiny_llama.folder), Route(3, 0, 1, None, "me"))
    vocab = h.scheduler.stage.cfg.vocab_size
    frame = open_frame(3, {"good": [1, 2, 3], "past-vocab": [1, vocab], "late": [1, 4]}, 5)
    frame["rows"][2]["pos"] = 7  # a session must start at position 0
    refused = h.scheduler.take_forward(frame)
    assert sorted((sid, e.code) for _, sid, e in refused) == [("late", "stage_failed"), ("past-vocab", "bad_request")]
    assert list(h.scheduler.sessions) == ["good"]
    stale = h.scheduler.take_forward(open_frame(2, {"old": [1, 2]}, 5))
    assert [(sid, e.code) for _, sid, e in stale] == [("old", "stale")]  # another epoch's rows: the origin moves it
    bad_opening = open_frame(3, {"odd": [1, 2]}, 5)
    bad_opening["rows"][0]["open"]["sampling"]["temperature"] = float("nan")
    assert [sid for _, sid, _ in h.scheduler.take_forward(bad_opening)] == ["odd"]


def test_numpy_logits_are_chosen_from_as_mlx_logits_are():
    """A CPU stage hands choose() numpy logits: greedy rows take numpy's argmax, the others their sampler's
    draw; every pick is the one the same logits as an mx.array give."""
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((4, 300)).astype(np.float32)
    logits[1, [17, 250]] = 9.0  # a tie: the first index, as MLX's argmax
    params = [SamplingParams(max_tokens=5), SamplingParams(max_tokens=5),
              SamplingParams(max_tokens=5, temperature=0.8, seed=3), SamplingParams(max_tokens=5, top_p=0.9, temperature=1.0, seed=4)]

    def picks(x):
        return [c.token for c in choose(x, [Sampler(p) for p in params])]

    assert picks(logits) == picks(mx.array(logits))
    assert picks(logits)[1] == 17
