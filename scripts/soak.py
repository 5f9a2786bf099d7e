"""Soak: a four-node swarm on loopback under continuous chats, one node killed and restarted each minute.

    python scripts/soak.py [--minutes 10] [--clients 2] [--signal kill|term] [--json]

The demo model on a, budgets that hold two of its five layers, so the plan is a, b, c and d is the
spare. Clients chat through a (the source, never restarted) without pause, each answer checked against
one node's greedy answer. In the middle of every --restart-every seconds the next of b, c, d is stopped;
the script waits until the swarm is ready without it (recovery), starts it again with the same port and
cache folder, and waits until it is back in the swarm (rejoin). Streams in flight when a stage dies or
comes back move to the new plan (swarm/pipeline.py): none should fail, none should be wrong. It prints
each event, then requests, failures (by reason), wrong answers, the longest pause a stream saw, recovery
and rejoin times, shards downloaded again (should be none) and the daemons' memory at the start and end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.swarm_harness import Daemon, free_port, get_json, wait_ready  # noqa: E402
from tests.test_faults import shard_files  # noqa: E402
from tests.test_load import PROMPTS, rss, solo_answers  # noqa: E402

BUDGET = "300000"
NODES = (("a", "4"), ("b", "3"), ("c", "2"), ("d", "1"))


class Soak:
    def __init__(self, tmp: Path, max_tokens: int):
        self.tmp, self.env, self.key = tmp, {"XDG_CACHE_HOME": str(tmp / "xdg")}, uuid.uuid4().hex
        self.daemons: dict[str, Daemon] = {}
        self.ports: dict[str, int] = {}
        self.max_tokens = max_tokens
        self.requests = 0
        self.ok = 0
        self.wrong = 0
        self.failures: Counter[str] = Counter()
        self.events: list[dict] = []
        self.tokens = 0
        self.longest_pause_s = 0.0
        self.full_plan: list[str] = []   # node names of the plan with every node up

    def start(self, name: str, speed: str) -> Daemon:
        port = self.ports.setdefault(name, free_port())
        args = ["--memory-budget", BUDGET, "--max-context", "256", "--speed", speed, "--cluster-key", self.key,
                "--cache-dir", str(self.tmp / name), "--config-dir", str(self.tmp / f"config-{name}"), "--no-mdns"]
        args += ["--model", "demo"] if name == "a" else ["--peer", f"127.0.0.1:{self.ports['a']}"]
        self.daemons[name] = Daemon(name, "127.0.0.1", port, args, self.tmp, self.env)
        return self.daemons[name]

    def swarm_state(self) -> dict:
        return get_json(self.daemons["a"].url + "/api/swarm", timeout=5)

    # --- clients ---------------------------------------------------------------------------------

    async def client(self, i: int, expected: list[list[int]], until: float) -> None:
        url = self.daemons["a"].url + "/ws/chat"
        n = i
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < until:
                k = n % len(PROMPTS)
                n += 1
                self.requests += 1
                try:
                    async with http.ws_connect(url) as ws:
                        await ws.send_json({"prompt_ids": PROMPTS[k], "max_tokens": self.max_tokens})
                        last = None
                        while True:
                            frame = json.loads((await ws.receive(timeout=60)).data)
                            now = time.monotonic()
                            if last is not None:
                                self.longest_pause_s = max(self.longest_pause_s, now - last)
                            last = now
                            if frame["type"] != "token":
                                break
                except (aiohttp.ClientError, asyncio.TimeoutError, TypeError, ValueError) as e:
                    self.failures[f"client: {type(e).__name__}"] += 1
                    await asyncio.sleep(0.2)
                    continue
                if frame["type"] == "done":
                    self.tokens += len(frame["token_ids"])
                    if frame["token_ids"] == expected[k]:
                        self.ok += 1
                    else:
                        self.wrong += 1
                else:
                    self.failures[_reason(frame.get("message", ""))] += 1
                    await asyncio.sleep(0.05)

    # --- restarts --------------------------------------------------------------------------------

    async def restart(self, name: str, speed: str, sig: signal.Signals) -> dict:
        d = self.daemons[name]
        cached = shard_files(self.tmp / name)
        in_plan = name in [s["name"] for s in self.swarm_state()["plan"]]
        t0 = time.monotonic()
        await asyncio.to_thread(d.stop, sig)
        recovered = await self.wait(lambda s: s["ready"] and name not in [n["name"] for n in s["nodes"]], 60)
        t1 = time.monotonic()
        self.start(name, speed)
        rejoined = await self.wait(lambda s: s["ready"] and len(s["nodes"]) == len(NODES)
                                   and [x["name"] for x in s["plan"]] == self.full_plan, 120)
        event = {"node": name, "in_plan": in_plan, "signal": sig.name,
                 "recovery_s": round(recovered - t0, 2) if recovered else None,
                 "rejoin_s": round(rejoined - t1, 2) if rejoined else None,
                 "downloaded_again": sorted(k for k, v in shard_files(self.tmp / name).items() if cached.get(k) not in (None, v))}
        self.events.append(event)
        print(f"[{time.strftime('%H:%M:%S')}] restarted {name} ({'in the plan' if in_plan else 'spare'}, "
              f"{sig.name}): ready without it after {event['recovery_s']} s, back after {event['rejoin_s']} s; "
              f"requests {self.requests}, ok {self.ok}, failed {sum(self.failures.values())}, wrong {self.wrong}",
              flush=True)
        return event

    async def wait(self, good, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if good(await asyncio.to_thread(self.swarm_state)):
                    return time.monotonic()
            except OSError:
                pass
            await asyncio.sleep(0.1)
        return None


def _reason(message: str) -> str:
    """An error message with the node ids and numbers taken out, to count alike failures together."""
    words = [w for w in message.split() if not any(c.isdigit() for c in w)]
    return " ".join(words)[:90]


async def soak(args) -> dict:
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="cake-soak-"))
    tmp.mkdir(parents=True, exist_ok=True)
    s = Soak(tmp, args.max_tokens)
    try:
        for name, speed in NODES:
            s.start(name, speed)
        states = await asyncio.to_thread(wait_ready, list(s.daemons.values()), 120, len(NODES))
        s.full_plan = [x["name"] for x in states[0]["plan"]]
        expected = await asyncio.to_thread(solo_answers, s.env, [(p, args.max_tokens) for p in PROMPTS])
        rss_start = {n: rss(d.proc.pid) for n, d in s.daemons.items()}
        print(f"soak: {len(NODES)} nodes ready in {tmp}; {args.minutes} min, {args.clients} clients, a restart every "
              f"{args.restart_every} s", flush=True)
        t_start = time.monotonic()
        until = t_start + args.minutes * 60
        clients = [asyncio.ensure_future(s.client(i, expected, until)) for i in range(args.clients)]
        order = [n for n in NODES if n[0] != "a"]
        k = 0
        while t_start + (k + 0.5) * args.restart_every < until:  # mid-interval: one restart in each
            await asyncio.sleep(max(0.0, t_start + (k + 0.5) * args.restart_every - time.monotonic()))
            name, speed = order[k % len(order)]
            await s.restart(name, speed, signal.SIGKILL if args.signal == "kill" else signal.SIGTERM)
            k += 1
        await asyncio.gather(*clients)
        elapsed = time.monotonic() - t_start
        rss_end = {n: rss(d.proc.pid) for n, d in s.daemons.items()}
    finally:
        for d in s.daemons.values():
            d.stop()
    recoveries = [e["recovery_s"] for e in s.events if e["recovery_s"] is not None]
    rejoins = [e["rejoin_s"] for e in s.events if e["rejoin_s"] is not None]
    return {
        "minutes": round(elapsed / 60, 2), "clients": args.clients, "restarts": len(s.events),
        "requests": s.requests, "ok": s.ok, "wrong": s.wrong, "failed": sum(s.failures.values()),
        "failures": dict(s.failures.most_common()), "tokens_per_s": round(s.tokens / elapsed, 1),
        "longest_pause_s": round(s.longest_pause_s, 2),
        "recovery_s": _spread(recoveries), "rejoin_s": _spread(rejoins),
        "never_recovered": sum(e["recovery_s"] is None for e in s.events),
        "never_rejoined": sum(e["rejoin_s"] is None for e in s.events),
        "downloaded_again": sum(len(e["downloaded_again"]) for e in s.events),
        "rss_mb_start": {n: round(v / 2**20, 1) for n, v in rss_start.items()},
        "rss_mb_end": {n: round(v / 2**20, 1) for n, v in rss_end.items()}, "events": s.events,
    }


def _spread(xs: list[float]) -> dict:
    return {"min": min(xs), "median": round(statistics.median(xs), 2), "max": max(xs)} if xs else {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--restart-every", type=float, default=60.0, help="seconds between restarts")
    ap.add_argument("--clients", type=int, default=2, help="chats in flight at any time")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--signal", choices=["kill", "term"], default="kill", help="how the node is stopped")
    ap.add_argument("--tmp", help="folder for logs and caches (default: a new temporary folder)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args()
    summary = asyncio.run(soak(args))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        events = summary.pop("events")
        for key, value in summary.items():
            print(f"{key:>18}: {value}")
        print(f"{'events':>18}: {len(events)} (see --json)")
    good = not (summary["wrong"] or summary["failed"] or summary["never_recovered"] or summary["never_rejoined"])
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
