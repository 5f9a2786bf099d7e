"""Swarm benchmark on loopback: decode tok/s of 1, 2 and 3 nodes in one run, the per-hop cost, time to ready.

    python scripts/bench_swarm.py [--model qwen2.5-0.5b|demo|PATH] [--tokens 64]

Every node is a real `cake-swarm up` process on 127.0.0.1 (mDNS off, --peer to the source). Budgets are set
so that N nodes are needed for N = 1, 2, 3; the same greedy request is sent through the first node.
The per-hop cost comes from the demo model, whose compute is tiny: (time per token with 3 nodes - with 1
node) / 3 extra hops per token.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from tests.swarm_harness import Daemon, chat_ws, free_port, wait_ready  # noqa: E402

PROMPT = [1, 403, 407, 261, 378, 300, 17, 99]


def model_bytes(model: str, max_context: int) -> tuple[int, int]:
    """(bytes of the whole model incl. KV for max_context, bytes of the largest layer incl. its KV)."""
    from swarm.model.source import resolve_model
    from swarm.node import Node, NodeConfig
    from swarm.shards import profile_model

    node = Node(NodeConfig(max_context=max_context, mdns=False, speed=1.0))
    node.profile = profile_model(resolve_model(model))
    cost = node.model_cost()
    return cost.total_bytes(), max(cost.layer_bytes) + cost.kv_bytes_per_layer


def run_swarm(model: str, n: int, work: Path, tokens: int, max_context: int, env: dict, repeats: int) -> dict:
    total, layer = model_bytes(model, max_context)
    # halfway between 1/n and 1/(n-1) of the model: n nodes are needed, with room for the embedding and head
    budget = total + layer if n == 1 else (total // n + total // (n - 1)) // 2
    port = free_port()
    daemons = []
    t0 = time.perf_counter()
    try:
        for i in range(n):
            args = ["--memory-budget", str(budget), "--max-context", str(max_context), "--speed", str(10 - i),
                    "--no-mdns", "--cache-dir", str(work / f"n{n}-{i}")]
            args += ["--model", model] if i == 0 else ["--peer", f"127.0.0.1:{port}"]
            daemons.append(Daemon(f"n{n}-{i}", "127.0.0.1", port if i == 0 else free_port(), args, work, env))
        states = wait_ready(daemons, timeout=600, nodes=n)
        ready_s = time.perf_counter() - t0
        used = len(states[0]["plan"])
        chat_ws(daemons[0].url, {"prompt_ids": PROMPT, "max_tokens": 8})  # warm up
        best = None
        for _ in range(repeats):
            done = chat_ws(daemons[0].url, {"prompt_ids": PROMPT, "max_tokens": tokens}, timeout=600)["done"]
            if best is None or done["timings"]["decode_tps"] > best["timings"]["decode_tps"]:
                best = done
        return {"nodes": n, "stages": used, "ready_s": ready_s, "tps": best["timings"]["decode_tps"],
                "ttft_s": best["timings"]["ttft_s"], "ids": best["token_ids"]}
    finally:
        for d in daemons:
            d.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="requests per swarm; the fastest is reported")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cake-swarm-bench")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    env = {"XDG_CACHE_HOME": str(args.work / "xdg")}
    models = []
    for model in (args.model, "demo"):
        if model.startswith(("qwen", "llama")):
            from make_model import make_model
            folder = args.work / model
            if not (folder / "config.json").exists():
                make_model(model, folder)
            model = str(folder)
        models.append(model)
    print(f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    results = {}
    for model in models:
        rows = [run_swarm(model, n, args.work, args.tokens if model != "demo" else 200, args.max_context, env, args.repeats)
                for n in (1, 2, 3)]
        results[model] = rows
        base = rows[0]
        print(f"\n{Path(model).name}: {args.tokens if model != 'demo' else 200} tokens, greedy, through the first node")
        print(f"{'nodes':>5} {'stages':>6} {'decode tok/s':>12} {'vs 1 node':>9} {'TTFT ms':>8} {'up->ready s':>11} {'same ids':>8}")
        for r in rows:
            print(f"{r['nodes']:>5} {r['stages']:>6} {r['tps']:>12.1f} {r['tps'] / base['tps']:>8.2f}x "
                  f"{r['ttft_s'] * 1000:>8.1f} {r['ready_s']:>11.1f} {str(r['ids'] == base['ids']):>8}")
    demo = results[models[-1]]
    per_token = [1 / r["tps"] for r in demo]
    print(f"\nper-hop cost (demo, 3 hops per token at 3 nodes vs none at 1): "
          f"{(per_token[2] - per_token[0]) / 3 * 1e6:.0f} us")


if __name__ == "__main__":
    main()
