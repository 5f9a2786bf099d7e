"""Many streams at once: batched decode through one node and through a three-node swarm (demo model).

Every stream of a batch must give exactly its solo greedy answer (CPU, float32): sixteen chats with ten
different prompts and sixteen different lengths, half of them joining while the first half is
decoding, through one node; then 64 chats at once through the middle node of a 2/2/1 swarm, where 16
generate and the rest wait their turn in the queue (--max-batch 16, --max-queue 64): all are served,
none refused. The stages report the largest batch they ran, which must exceed one (they batched).
Afterwards every node reports no session, and each daemon's resident memory is within 50 MB of what it
was after a warm-up round.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid

import aiohttp

from swarm.model.decoder import load_stage
from swarm.model.generate import generate_ids
from swarm.model.sampling import SamplingParams
from swarm.model.source import resolve_model
from tests.checkpoints import require_demo
from tests.swarm_harness import Daemon, free_port, wait_for, wait_ready

MAX_BATCH = 16        # the daemon's default --max-batch
# the demo tokenizer's ids of ten story openings ("Once upon a time, there was a little dog", "The sun was hot
# and", ...): random ids would mostly lead the tiny model into the same few stories
PROMPTS = [[1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 400, 428], [1, 291, 262, 379, 286, 270, 309, 269],
           [1, 317, 269, 368, 302, 263, 377, 267, 265, 282, 295, 433], [1, 274, 287, 381, 261, 352, 266, 268, 388],
           [1, 385, 328, 432, 261, 370, 268, 315, 418], [1, 392, 287, 336, 467], [1, 291, 280, 294, 262, 294, 353],
           [1, 359, 413, 286, 352, 412, 271, 299], [1, 301, 314, 391, 266, 261, 280, 412, 354],
           [1, 291, 268, 414, 294, 286, 268, 421, 425, 411]]
RSS_SLACK = 50 << 20


def requests(n: int) -> list[tuple[list[int], int]]:
    """(prompt, max_tokens) of n chats: the ten prompts in turn, lengths from 8 to 40 tokens."""
    return [(PROMPTS[i % len(PROMPTS)], 8 + (i * 13) % 33) for i in range(n)]


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def solo_answers(env: dict, chats: list[tuple[list[int], int]]) -> list[list[int]]:
    """Each chat's greedy answer from one node's engine alone (what `cake-swarm generate --output ids` prints)."""
    require_demo()
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = env["XDG_CACHE_HOME"]
    try:
        stage = load_stage(resolve_model("demo"))
    finally:
        os.environ.pop("XDG_CACHE_HOME") if old is None else os.environ.update(XDG_CACHE_HOME=old)
    eos = set(stage.cfg.eos_token_id)
    return [list(generate_ids(stage, p, SamplingParams(max_tokens=n), eos_ids=eos, max_context=256)) for p, n in chats]


async def _chat(http: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int, delay: float = 0.0) -> dict:
    await asyncio.sleep(delay)
    async with http.ws_connect(url + "/ws/chat") as ws:
        await ws.send_json({"prompt_ids": prompt, "max_tokens": max_tokens})
        while True:
            msg = await ws.receive(timeout=300)
            assert msg.type == aiohttp.WSMsgType.TEXT, msg.type
            frame = json.loads(msg.data)
            if frame["type"] != "token":
                return frame


def chats_at_once(url: str, chats: list[tuple[list[int], int]], late: int = 0, delay: float = 0.0) -> list[dict]:
    """The chats all at once, except the last `late` ones, which start `delay` seconds later."""
    async def run():
        async with aiohttp.ClientSession() as http:
            return await asyncio.gather(*(_chat(http, url, p, n, delay if i >= len(chats) - late else 0.0)
                                          for i, (p, n) in enumerate(chats)))
    return asyncio.run(run())


def idle(daemons) -> bool:
    """No node has a request in flight or a stage session (peers' counts come with their heartbeats)."""
    for d in daemons:
        s = d.state()
        if s["sessions"] or s["waiting"] or any(n["sessions"] for n in s["nodes"]):
            return False
    return True


def start(tmp_path, env: dict, nodes: list[tuple[str, str]], budget: str) -> list[Daemon]:
    key, seed_port, daemons = uuid.uuid4().hex, free_port(), []
    try:
        for name, speed in nodes:
            args = ["--memory-budget", budget, "--max-context", "256", "--speed", speed, "--cluster-key", key,
                    "--cache-dir", str(tmp_path / name), "--config-dir", str(tmp_path / f"config-{name}"), "--no-mdns"]
            args += ["--model", "demo"] if not daemons else ["--peer", f"127.0.0.1:{seed_port}"]
            daemons.append(Daemon(name, "127.0.0.1", seed_port if not daemons else free_port(), args, tmp_path, env))
        return daemons
    except BaseException:
        for d in daemons:
            d.stop()
        raise


def test_sixteen_streams_joining_and_ending_mid_batch_on_one_node(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    daemons = start(tmp_path, env, [("a", "1")], "4MB")
    try:
        wait_ready(daemons, nodes=1)
        chats = requests(16)
        expected = solo_answers(env, chats)
        assert len({tuple(e) for e in expected}) == 16  # sixteen different answers
        results = chats_at_once(daemons[0].url, chats, late=8, delay=0.05)
        for i, frame in enumerate(results):
            assert frame["type"] == "done" and frame["token_ids"] == expected[i], (i, frame)
        peak = daemons[0].state()["nodes"][0]["batch_peak"]
        print(f"\none node: 16 streams exact, largest batch {peak}")
        assert peak > 1
    finally:
        for d in daemons:
            d.stop()


def test_sixty_four_streams_through_a_three_node_swarm(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    daemons = start(tmp_path, env, [("a", "3"), ("b", "2"), ("c", "1")], "300000")
    try:
        states = wait_ready(daemons, nodes=3)
        assert [(s["name"], s["start"], s["end"]) for s in states[0]["plan"]] == [("a", 0, 2), ("b", 2, 4), ("c", 4, 5)]
        entry = daemons[1]   # the middle stage takes the requests too
        chats = requests(64)
        expected = solo_answers(env, chats)

        warm = chats_at_once(entry.url, chats[:MAX_BATCH])  # every code path and buffer used once
        assert all(f["type"] == "done" for f in warm), [f for f in warm if f["type"] != "done"][:3]
        wait_for(lambda: idle(daemons), 10, "no sessions after the warm-up", daemons)
        before = [rss(d.proc.pid) for d in daemons]

        results = chats_at_once(entry.url, chats)
        wrong = [(i, f) for i, f in enumerate(results) if f["type"] != "done" or f["token_ids"] != expected[i]]
        assert not wrong, wrong[:3]
        peaks = [d.state()["nodes"][0]["batch_peak"] for d in daemons]
        print(f"\nthree nodes: 64 streams exact, none refused; largest batch per stage {peaks}")
        assert min(peaks) > 1

        wait_for(lambda: idle(daemons), 10, "every node to report no sessions", daemons)
        after = [rss(d.proc.pid) for d in daemons]
        print("load: RSS MB before/after: " + ", ".join(
            f"{d.name} {b / 2**20:.1f}/{a / 2**20:.1f}" for d, b, a in zip(daemons, before, after)))
        for d, b, a in zip(daemons, before, after):
            assert a - b < RSS_SLACK, f"{d.name}: RSS grew by {(a - b) / 2**20:.1f} MB"
    finally:
        for d in daemons:
            d.stop()
