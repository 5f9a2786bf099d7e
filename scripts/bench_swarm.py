"""Swarm benchmark on loopback: decode tok/s of 1, 2 and 3 nodes in one run, the per-hop cost, time to ready.

    python scripts/bench_swarm.py [--model qwen2.5-0.5b|demo|PATH] [--tokens 64] [--rounds 7] [--cores-per-node K]
                                   [--swarms 1,2,3]

Every node is a real `cake-swarm up` process on 127.0.0.1 (mDNS off, --peer to the source). Budgets are set
so that N nodes are needed for N = 1, 2, 3; the three swarms run side by side and the same greedy request
goes to each in turn through its first node (best and median tok/s, ratios best to best and median to
median).
The per-hop cost comes from the demo model (--hop-model), whose compute is tiny: (time per token with 3
nodes - with 1 node) / 3 extra hops per token (n for the largest swarm of --swarms).

By default every node shares all of the machine's cores, as daemons on one small machine do. With
--cores-per-node K (a many-core host), node i of each swarm runs on cores [iK, iK+K) alone, with K kernel
threads, spinning as a lone node on a LAN would: three devices of K cores each, joined by loopback.
`--swarms 1,2 --cores-per-node 1` makes the same comparison with two nodes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from kernels.cpu_path import SPIN_ALONE  # noqa: E402
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


def start_swarm(model: str, n: int, work: Path, max_context: int, env: dict,
                cores_per_node: int = 0) -> tuple[list[Daemon], float]:
    """n real daemons holding the model, budgets set so that all n are needed; (daemons, seconds to ready).
    With cores_per_node, node i runs on cores [i * cores_per_node, (i + 1) * cores_per_node) only."""
    total, layer = model_bytes(model, max_context)
    # halfway between 1/n and 1/(n-1) of the model: n nodes are needed, with room for the embedding and head
    budget = total + layer if n == 1 else (total // n + total // (n - 1)) // 2
    port = free_port()
    daemons = []
    t0 = time.perf_counter()
    for i in range(n):
        args = ["--memory-budget", str(budget), "--max-context", str(max_context), "--speed", str(10 - i),
                "--no-mdns", "--cache-dir", str(work / f"{Path(model).name}-n{n}-{i}")]
        args += ["--model", model] if i == 0 else ["--peer", f"127.0.0.1:{port}"]
        popen = subprocess.Popen
        if cores_per_node:
            cores = set(range(i * cores_per_node, (i + 1) * cores_per_node))
            args += ["--threads", str(cores_per_node)]
            popen = functools.partial(subprocess.Popen, preexec_fn=lambda cores=cores: os.sched_setaffinity(0, cores))
        daemons.append(Daemon(f"{Path(model).name}-n{n}-{i}", "127.0.0.1", port if i == 0 else free_port(), args, work,
                              env, popen))
    wait_ready(daemons, timeout=600, nodes=n)
    return daemons, time.perf_counter() - t0


def run_swarms(model: str, work: Path, tokens: int, max_context: int, env: dict, rounds: int,
               cores_per_node: int = 0, sizes: tuple[int, ...] = (1, 2, 3)) -> list[dict]:
    """Swarms of 1, 2 and 3 nodes (or `sizes`) up side by side, idle but for the request in flight: one request to each
    in turn, `rounds` times, so that the machine's moods fall on all of them alike."""
    swarms = {}
    try:
        for n in sizes:
            # nodes on loopback spin their kernel threads shorter (kernels/cpu_path.py), which the other
            # stages on these cores need; one node alone, or each on cores of its own, runs as a lone node
            # on a LAN would
            alone = {"GOMP_SPINCOUNT": SPIN_ALONE} if n == 1 or cores_per_node else {}
            swarms[n] = start_swarm(model, n, work, max_context, {**env, **alone}, cores_per_node)
        for daemons, _ in swarms.values():
            chat_ws(daemons[0].url, {"prompt_ids": PROMPT, "max_tokens": 8})  # warm up
        runs = {n: [] for n in swarms}
        for _ in range(rounds):
            for n, (daemons, _) in swarms.items():
                runs[n].append(chat_ws(daemons[0].url, {"prompt_ids": PROMPT, "max_tokens": tokens}, timeout=600)["done"])
        return [{"nodes": n, "stages": len(daemons[0].state()["plan"]), "ready_s": ready_s,
                 "tps": [d["timings"]["decode_tps"] for d in runs[n]],
                 "ttft_s": statistics.median(d["timings"]["ttft_s"] for d in runs[n]),
                 "ids": {tuple(d["token_ids"]) for d in runs[n]}}
                for n, (daemons, ready_s) in swarms.items()]
    finally:
        for daemons, _ in swarms.values():
            for d in daemons:
                d.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--rounds", type=int, default=7, help="requests to each swarm, in turn")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cake-swarm-bench")
    p.add_argument("--hop-model", default="demo", help="the model the per-hop cost is measured on (none: skip)")
    p.add_argument("--cores-per-node", type=int, default=0,
                   help="give node i of each swarm cores [iK, iK+K) of its own and K threads (0: all share all)")
    p.add_argument("--swarms", default="1,2,3", help="the swarm sizes to compare, the first one the base")
    args = p.parse_args()
    sizes = tuple(int(n) for n in args.swarms.split(","))
    if args.cores_per_node and max(sizes) * args.cores_per_node > len(os.sched_getaffinity(0)):
        p.error(f"--cores-per-node {args.cores_per_node}: {max(sizes)} nodes need {max(sizes) * args.cores_per_node} "
                f"cores, this machine gives {len(os.sched_getaffinity(0))}")
    args.work.mkdir(parents=True, exist_ok=True)
    env = {"XDG_CACHE_HOME": str(args.work / "xdg")}
    models = []
    for model in [args.model] + ([args.hop_model] if args.hop_model != "none" else []):
        if model.startswith(("qwen", "llama")):
            from make_model import make_model
            folder = args.work / model
            if not (folder / "config.json").exists():
                make_model(model, folder)
            model = str(folder)
        models.append(model)
    print(f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}; "
          + (f"each node on {args.cores_per_node} cores of its own" if args.cores_per_node else "all nodes share all cores"))
    results = {}
    for model in models:
        tokens = args.tokens if model == models[0] else 200
        rows = run_swarms(model, args.work, tokens, args.max_context, env, args.rounds, args.cores_per_node, sizes)
        results[model] = rows
        base = rows[0]
        print(f"\n{Path(model).name}: {tokens} tokens, greedy, through the first node; {args.rounds} requests to each "
              f"swarm in turn (load average now {os.getloadavg()[0]:.1f})")
        print(f"{'nodes':>5} {'stages':>6} {'tok/s best':>10} {'median':>7} {'vs 1 node':>15} {'TTFT ms':>8} "
              f"{'up->ready s':>11} {'same ids':>8}")
        for r in rows:
            ratio = f"{max(r['tps']) / max(base['tps']):.2f} / {statistics.median(r['tps']) / statistics.median(base['tps']):.2f}x"
            print(f"{r['nodes']:>5} {r['stages']:>6} {max(r['tps']):>10.1f} {statistics.median(r['tps']):>7.1f} {ratio:>15} "
                  f"{r['ttft_s'] * 1000:>8.1f} {r['ready_s']:>11.1f} {str(len(r['ids'] | base['ids']) == 1):>8}")
    if len(models) < 2 or sizes[0] != 1:
        return
    demo = results[models[-1]]
    per_token = [1 / statistics.median(r["tps"]) for r in demo]
    print(f"\nper-hop cost (demo, medians; n hops per token at n nodes, none at 1): "
          f"{(per_token[-1] - per_token[0]) / sizes[-1] * 1e6:.0f} us")


if __name__ == "__main__":
    main()
