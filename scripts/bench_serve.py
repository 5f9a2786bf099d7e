"""Serving benchmark: aggregate tokens/s and time to first token with N streams at once.

    python scripts/bench_serve.py [--model demo] [--streams 1,4,16,64] [--max-tokens 64] [--nodes 1,3]
                                  [--no-mlx-lm] [--json]

For each server and each N, N streaming completions (OpenAI's /v1/completions, greedy, story prompts in
turn) start together; the figures are the tokens all of them generated over the wall time from the
first request to the last token (aggregate tok/s), and the median and worst time to first token. As
the baseline of batching, the same 16 streams also run one after another. The servers, in one run:

- cake-swarm on one node (`cake-swarm up --model M`), and on three nodes of this machine splitting the
  model (budgets set so each holds about a third; `--nodes`);
- mlx_lm.server on the same folder, which batches too (`--decode-concurrency`), unless --no-mlx-lm.

All on 127.0.0.1. Every daemon's log lies in the run's folder; the servers are stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from swarm.model.source import resolve_model  # noqa: E402
from swarm.shards import profile_model  # noqa: E402
from bench_swarm import model_bytes  # noqa: E402
from tests.swarm_harness import Daemon, free_port, wait_for, wait_ready  # noqa: E402

MAX_CONTEXT = 512

PROMPTS = ["Once upon a time", "The little dog wanted to", "Tom and Sue went to the park", "The sun was hot and",
           "One day, a girl named Mia", "The big red ball", "Lily found a shiny key", "The cat sat on the mat and",
           "Ben had a toy car", "In the forest there was", "The bird sang a song", "Sam liked to eat apples",
           "The boat was small but", "Mom said it was time to", "A frog jumped into the pond", "The king had a crown"]


async def one_stream(http: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, tokens = None, 0
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    async with http.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: {r.status} {await r.text()}")
        async for line in r.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                first = time.perf_counter() - t0
    return {"ttft_s": first, "tokens": tokens, "end": time.perf_counter()}


async def streams_at_once(url: str, model: str, n: int, max_tokens: int) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as http:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_stream(http, url, model, PROMPTS[i % len(PROMPTS)], max_tokens)
                                         for i in range(n)))
    wall = max(r["end"] for r in results) - t0
    ttfts = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in results)
    return {"streams": n, "tokens": tokens, "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 1),
            "ttft_median_s": round(statistics.median(ttfts), 3), "ttft_max_s": round(max(ttfts), 3)}


async def streams_one_after_another(url: str, model: str, n: int, max_tokens: int) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as http:
        t0, tokens = time.perf_counter(), 0
        for i in range(n):
            tokens += (await one_stream(http, url, model, PROMPTS[i % len(PROMPTS)], max_tokens))["tokens"]
    wall = time.perf_counter() - t0
    return {"streams": n, "tokens": tokens, "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 1)}


def start_swarm(tmp: Path, model: str, nodes: int, env: dict, max_batch: int) -> list[Daemon]:
    tmp.mkdir(parents=True, exist_ok=True)
    folder = resolve_model(model)
    total, _ = model_bytes(str(folder), MAX_CONTEXT)
    # halfway between 1/n and 1/(n-1) of the model: exactly n nodes are needed
    budget = str((total // nodes + total // (nodes - 1)) // 2) if nodes > 1 else "0"
    key, seed_port, daemons = uuid.uuid4().hex, free_port(), []
    for i in range(nodes):
        name = "abc"[i] if nodes > 1 else "solo"
        args = ["--speed", str(nodes - i), "--cluster-key", key, "--no-mdns", "--max-context", str(MAX_CONTEXT),
                "--max-batch", str(max_batch), "--max-queue", "256",
                "--cache-dir", str(tmp / name), "--config-dir", str(tmp / f"config-{name}")]
        if nodes > 1:
            args += ["--memory-budget", budget]
        args += ["--model", str(folder)] if i == 0 else ["--peer", f"127.0.0.1:{seed_port}"]
        daemons.append(Daemon(name, "127.0.0.1", seed_port if i == 0 else free_port(), args, tmp, env))
    states = wait_ready(daemons, timeout=300, nodes=nodes)
    print(f"cake-swarm, {nodes} node(s): " + ", ".join(f"{s['name']} {s['start']}-{s['end'] - 1}"
                                                       for s in states[0]["plan"]), flush=True)
    return daemons


def start_mlx_lm(tmp: Path, model: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(tmp / "mlx_lm.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(resolve_model(model)),
                             "--host", "127.0.0.1", "--port", str(port), "--decode-concurrency", str(max_batch),
                             "--prompt-concurrency", str(max_batch)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up():
        import urllib.request
        with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
            return r.status == 200
    wait_for(up, 120, "mlx_lm.server to answer")
    return proc, url


async def measure(name: str, url: str, model: str, streams: list[int], max_tokens: int) -> dict:
    await streams_at_once(url, model, 2, 8)  # warm-up: first compiles, first allocations
    out = {"server": name, "at_once": [], "one_after_another": None}
    for n in streams:
        row = await streams_at_once(url, model, n, max_tokens)
        out["at_once"].append(row)
        print(f"{name:>22} {n:>3} at once: {row['tok_s']:>8} tok/s aggregate, ttft median {row['ttft_median_s']} s, "
              f"worst {row['ttft_max_s']} s ({row['tokens']} tokens in {row['wall_s']} s)", flush=True)
    if 16 in streams:
        row = out["one_after_another"] = await streams_one_after_another(url, model, 16, max_tokens)
        at_once = next(r for r in out["at_once"] if r["streams"] == 16)
        print(f"{name:>22}  16 one after another: {row['tok_s']} tok/s ({row['wall_s']} s); at once they finish "
              f"{row['wall_s'] / at_once['wall_s']:.1f}x sooner", flush=True)
    return out


async def bench(args) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="cake-bench-serve-"))
    env = {"XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))}
    streams = [int(s) for s in args.streams.split(",")]
    profile = profile_model(resolve_model(args.model))
    model_id = args.model
    print(f"bench_serve: {args.model} ({profile.num_layers} layers), streams {streams}, {args.max_tokens} tokens each; "
          f"logs in {tmp}", flush=True)
    results = []
    for nodes in [int(n) for n in args.nodes.split(",")]:
        daemons = await asyncio.to_thread(start_swarm, tmp / f"swarm{nodes}", args.model, nodes, env, args.max_batch)
        try:
            results.append(await measure(f"cake-swarm {nodes} node(s)", daemons[0].url, model_id, streams,
                                         args.max_tokens))
        finally:
            for d in daemons:
                d.stop()
    if not args.no_mlx_lm:
        proc, url = await asyncio.to_thread(start_mlx_lm, tmp, args.model, args.max_batch)
        try:
            results.append(await measure("mlx_lm.server", url, str(resolve_model(args.model)), streams, args.max_tokens))
        finally:
            proc.terminate()
            proc.wait(30)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo", help="checkpoint folder, repo id or 'demo'")
    ap.add_argument("--streams", default="1,4,16,64", help="concurrent streams to measure, comma-separated")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--nodes", default="1,3", help="swarm sizes to measure, comma-separated")
    ap.add_argument("--max-batch", type=int, default=16, help="--max-batch of the daemons (and mlx_lm's concurrency)")
    ap.add_argument("--no-mlx-lm", action="store_true", help="skip mlx_lm.server")
    ap.add_argument("--json", action="store_true", help="print every figure as JSON at the end")
    args = ap.parse_args()
    results = asyncio.run(bench(args))
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
