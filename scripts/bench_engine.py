"""Engine benchmark: cake-swarm's engine beside mlx-lm on the same checkpoint and dtype policy, in one run.

    python scripts/bench_engine.py [--model demo|PATH|qwen2.5-0.5b ...] [--prompt-tokens 128] [--tokens 128]

Each measurement runs in a fresh process (so peak RSS is that engine's alone): prefill tok/s, decode tok/s,
peak RSS. A shape name (qwen2.5-0.5b, ...) is written first with scripts/make_model.py into --work.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "llama-3.2-1b")


def run_one(engine: str, model: str, prompt_tokens: int, tokens: int) -> dict:
    """In this process: load, prefill, decode greedily; returns the figures."""
    import mlx.core as mx

    from kernels.linear import compute_dtype
    from swarm.model.source import resolve_model

    folder = resolve_model(model)
    prompt = [(i * 7919 + 13) % 500 + 3 for i in range(prompt_tokens)]
    t_load = time.perf_counter()
    if engine == "cake-swarm":
        from swarm.model.decoder import load_stage
        from swarm.model.generate import generate_ids
        from swarm.model.sampling import SamplingParams

        stage = load_stage(folder)
        dtype = stage.dtype
        steps = generate_ids(stage, prompt, SamplingParams(max_tokens=tokens), frozenset())
    else:
        from mlx.utils import tree_map
        from mlx_lm.generate import generate_step
        from mlx_lm.utils import load_model

        model_, _ = load_model(folder)
        dtype = compute_dtype(mx.bfloat16)
        if dtype == mx.float32:  # the same policy as the engine: float32 compute on the CPU
            model_.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                                   model_.parameters()))
        mx.eval(model_.parameters())
        steps = (int(t) for t, _ in generate_step(mx.array(prompt), model_, max_tokens=tokens))
    load_s = time.perf_counter() - t_load
    t0 = time.perf_counter()
    count = 0
    for _ in steps:
        count += 1
        if count == 1:
            t1 = time.perf_counter()
    t2 = time.perf_counter()
    return {"engine": engine, "model": model, "dtype": str(dtype), "load_s": round(load_s, 3),
            "prefill_tps": round(prompt_tokens / (t1 - t0), 1), "decode_tps": round((count - 1) / (t2 - t1), 1),
            "tokens": count, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def measure(engine: str, model: str, args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", engine, "--model", model, "--prompt-tokens",
                          str(args.prompt_tokens), "--tokens", str(args.tokens)], cwd=REPO, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", action="append", help="demo, a folder, or a shape name (repeatable)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="runs per engine; the best is reported")
    p.add_argument("--work", type=Path, default=Path("/tmp/cake-swarm-bench"))
    p.add_argument("--one", choices=("cake-swarm", "mlx-lm"), help=argparse.SUPPRESS)
    args = p.parse_args()
    models = args.model or ["demo", "qwen2.5-0.5b"]
    if args.one:
        print(json.dumps(run_one(args.one, models[0], args.prompt_tokens, args.tokens)))
        return
    sys.path.insert(0, str(REPO / "scripts"))
    rows = []
    for model in models:
        if model in SHAPES:
            from make_model import make_model
            folder = args.work / model
            if not (folder / "config.json").exists():
                make_model(model, folder)
            model = str(folder)
        for engine in ("cake-swarm", "mlx-lm"):
            runs = [measure(engine, model, args) for _ in range(args.repeats)]
            best = max(runs, key=lambda r: r["decode_tps"])
            best["peak_rss_mb"] = min(r["peak_rss_mb"] for r in runs)
            rows.append(best)
            print(json.dumps(best), file=sys.stderr)
    print(f"\n{platform.node()} {platform.machine()} {time.strftime('%Y-%m-%d')}, prompt {args.prompt_tokens} tokens, "
          f"{args.tokens} generated, best of {args.repeats}")
    print(f"{'model':<28} {'engine':<11} {'dtype':<14} {'prefill tok/s':>13} {'decode tok/s':>12} {'peak RSS MB':>11}")
    for r in rows:
        print(f"{Path(r['model']).name:<28} {r['engine']:<11} {r['dtype']:<14} {r['prefill_tps']:>13} {r['decode_tps']:>12} "
              f"{r['peak_rss_mb']:>11}")
    for i in range(0, len(rows), 2):
        ours, ref = rows[i], rows[i + 1]
        print(f"{Path(ours['model']).name}: decode {ours['decode_tps'] / ref['decode_tps']:.2f}x mlx-lm, "
              f"peak RSS {ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
