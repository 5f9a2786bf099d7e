"""Builds, checks and times the fused q4 kernels (kernels/cuda_q4.py) against MLX's own on a CUDA GPU.

    python scripts/bench_gpu.py check [f16|bf16]   # every linear shape of Qwen2.5 0.5B-7B and Llama 3.2 1B,
                                 # groups 32/64/128, the fused step's variants (RMS-norm, residual, attention),
                                 # float16 and bfloat16, outputs poisoned with NaN: rel err < 1e-3
    python scripts/bench_gpu.py time        # GB/s and us per call: mx.quantized_matmul vs ours, per shape
    python scripts/bench_gpu.py sweep       # launch configurations (R, SPLIT, WPB) on the large 7B shapes
    python scripts/bench_gpu.py sweep-step  # the same for the fused one-token step's kernels
    python scripts/bench_gpu.py overhead    # host us per op: MLX's ops beside custom kernels
    python scripts/bench_gpu.py decode      # tok/s: mlx-lm vs the engine (MLX's kernels, ours, fused step)
    ncu --csv --log-file $OUT/ncu.csv --clock-control none --metrics gpu__time_duration.sum -k regex:'q4_|qmv|qmm' \
        python3 scripts/bench_gpu.py profile && python3 scripts/bench_gpu.py profile-table $OUT/ncu.csv
                                 # GPU time of each kernel, without the framework's per-op overhead
    ncu --csv --log-file $OUT/dec.csv --clock-control none --cache-control none --metrics gpu__time_duration.sum \
        python3 scripts/bench_gpu.py profile-decode && python3 scripts/bench_gpu.py profile-decode-table $OUT/dec.csv
                                 # GPU time of one decode step by kernel

Each phase prints a table last and appends JSON lines to $OUT/bench.jsonl (or ./bench.jsonl). Errors are
relative: ||out - ref|| / ||ref||, ref = mx.quantized_matmul in float32 on upcast inputs rounded to the
dtype (what an exact kernel returns); MLX's own half-precision result is measured against it too.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from kernels import cuda_q4  # noqa: E402

MODELS = {  # hidden, intermediate, heads, kv heads, head dim, vocab, qkv bias
    "qwen2.5-0.5b": (896, 4864, 14, 2, 64, 151936, True),
    "qwen2.5-1.5b": (1536, 8960, 12, 2, 128, 151936, True),
    "qwen2.5-3b": (2048, 11008, 16, 2, 128, 151936, True),
    "qwen2.5-7b": (3584, 18944, 28, 4, 128, 152064, True),
    "llama-3.2-1b": (2048, 8192, 32, 8, 64, 128256, False),
}
DTYPES = {"f16": mx.float16, "bf16": mx.bfloat16}
OUT = Path(os.environ.get("OUT", "."))
NAN = float("nan")


def linear_shapes(model: str) -> dict[str, tuple[int, int]]:
    h, inter, heads, kv, hd, vocab, _ = MODELS[model]
    return {"q": (heads * hd, h), "kv": (kv * hd, h), "o": (h, heads * hd), "gate/up": (inter, h),
            "down": (h, inter), "head": (vocab, h)}


def all_shapes() -> list[tuple[int, int]]:
    seen = []
    for m in MODELS:
        for s in linear_shapes(m).values():
            if s not in seen:
                seen.append(s)
    return seen


def log(record: dict) -> None:
    record["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(OUT / "bench.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def table(rows: list[list], header: list[str]) -> str:
    cols = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cols)


def card() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = "unknown"
    return f"{out} | mlx {mx.__version__} | {time.strftime('%Y-%m-%d')}"


def keys(seed: int, n: int):
    return mx.random.split(mx.random.key(seed), n)


# ---------------------------------------------------------------- check

def check(dtypes: tuple[str, ...] = tuple(DTYPES), seed: int = 1) -> bool:
    print("card:", card(), flush=True)
    ok = cuda_q4.enabled()
    print("self-check:", "passed" if ok else "FAILED", "\n" + cuda_q4.check_report(), flush=True)
    worst: dict[str, list] = {}   # category -> [ours vs ref, mlx vs ref, ours vs mlx, count]
    failures = []

    def record(cat: str, what: str, out, ref, mlx_out):
        e, em, eo = cuda_q4.rel_err(out, ref), cuda_q4.rel_err(mlx_out, ref), cuda_q4.rel_err(out, mlx_out)
        w = worst.setdefault(cat, [0.0, 0.0, 0.0, 0])
        w[0], w[1], w[2], w[3] = max(w[0], e), max(w[1], em), max(w[2], eo), w[3] + 1
        log({"phase": "check", "cat": cat, "what": what, "err": e, "mlx_err": em, "err_vs_mlx": eo})
        if not e < cuda_q4.TOLERANCE:
            failures.append(f"{cat} {what}: {e:.3e}")

    n_key = 0
    for dname, dtype in ((d, DTYPES[d]) for d in dtypes):
        for gs in (32, 64, 128):
            for n, k in all_shapes():
                ms = (1, 2, 3, 5, 8) if gs == 64 and n < 100_000 else (1,)
                n_key += 1
                kk = keys(seed * 1000 + n_key, 2 + len(ms))
                layer = cuda_q4.random_q4(n, k, gs, dtype, kk[0])
                for m, xk in zip(ms, kk[2:]):
                    x = mx.random.normal((m, k), key=xk).astype(dtype)
                    out = cuda_q4.q4_matvec(x, *layer, gs, init_value=NAN, max_rows=8, min_weights=0)
                    ref = cuda_q4.reference(x, layer, gs)
                    mlx_out = mx.quantized_matmul(x, *layer, transpose=True, group_size=gs, bits=4)
                    record(f"matvec {dname} m={m}", f"{n}x{k} gs={gs}", out, ref, mlx_out)
                del layer
            for model in MODELS:
                h, inter, *_ = MODELS[model]
                qkv_bias = MODELS[model][6]
                n_key += 1
                kk = keys(seed * 1000 + n_key, 9)
                gate, up = (cuda_q4.random_q4(inter, h, gs, dtype, kk[i]) for i in (0, 1))
                shapes = linear_shapes(model)
                q = cuda_q4.random_q4(*shapes["q"], gs, dtype, kk[2])
                kl, vl = (cuda_q4.random_q4(*shapes["kv"], gs, dtype, kk[i]) for i in (3, 4))
                lbs = tuple(mx.random.normal((t[0].shape[0],), key=kk[5 + i]).astype(dtype) * 0.5
                            for i, t in enumerate((q, kl, vl))) if qkv_bias else None
                for m in ((1, 2, 8) if gs == 64 else (1,)):
                    x = mx.random.normal((m, h), key=mx.random.split(kk[8], 9)[m]).astype(dtype)
                    out = cuda_q4.swiglu(x, *gate, *up, gs, init_value=NAN, max_rows=8)
                    ref = cuda_q4.swiglu_reference(x, gate, up, gs)
                    g = mx.quantized_matmul(x, *gate, transpose=True, group_size=gs, bits=4)
                    u = mx.quantized_matmul(x, *up, transpose=True, group_size=gs, bits=4)
                    record(f"swiglu {dname} m={m}", f"{model} gs={gs}", out, ref, nn.silu(g) * u)
                    outs = cuda_q4.qkv(x, q, kl, vl, gs, lbs, init_value=NAN, max_rows=8)
                    for j, (name, t) in enumerate(zip("qkv", (q, kl, vl))):
                        ref = cuda_q4.reference(x, t, gs)
                        mo = mx.quantized_matmul(x, *t, transpose=True, group_size=gs, bits=4)
                        if lbs is not None:
                            ref, mo = ref + lbs[j], mo + lbs[j]
                        record(f"qkv {dname} m={m}", f"{model}.{name} gs={gs}", outs[j], ref, mo)
                    fused_step_variants(record, dname, model, gs, x, (q, kl, vl), lbs, gate, up, kk[8])
        rows = [[cat, v[3], f"{v[0]:.2e}", f"{v[1]:.2e}", f"{v[2]:.2e}"] for cat, v in worst.items()]
        print(f"checked {dname}; errors vs float32 quantized_matmul rounded to the dtype; card: {card()}")
        print(table(rows, ["category", "checks", "worst ours", "worst mlx", "ours vs mlx"]), flush=True)
    print(f"{sum(v[3] for v in worst.values())} checks, {len(failures)} over {cuda_q4.TOLERANCE}")
    for f in failures[:20]:
        print("FAIL", f)
    return ok and not failures


def fused_step_variants(record, dname: str, model: str, gs: int, x, qkv_layers, lbs, gate, up, key) -> None:
    """The kernels of the fused one-token step on one model's shapes: RMS-norm prologues (q/k/v, SwiGLU),
    residual epilogues (o_proj, down_proj) and attention at a few positions; MLX's column: its own ops."""
    dtype, (m, h) = x.dtype, x.shape
    _, inter, heads, kv_heads, hd, _, _ = MODELS[model]
    kk = keys(hash((dname, model, gs, m)) % 10_000, 8)
    norm = ((1.0 + 0.1 * mx.random.normal((h,), key=kk[0])).astype(dtype), 1e-6)
    xn = cuda_q4.norm_reference(x, norm)
    mlx_norm = mx.fast.rms_norm(x, norm[0], 1e-6)
    qm = lambda x_, t: mx.quantized_matmul(x_, *t, transpose=True, group_size=gs, bits=4)  # noqa: E731
    out = cuda_q4.swiglu(x, *gate, *up, gs, norm=norm, init_value=NAN, max_rows=8)
    record(f"swiglu+norm {dname} m={m}", f"{model} gs={gs}", out, cuda_q4.swiglu_reference(xn, gate, up, gs, dtype),
           nn.silu(qm(mlx_norm, gate)) * qm(mlx_norm, up))
    outs = cuda_q4.qkv(x, *qkv_layers, gs, lbs, norm=norm, init_value=NAN, max_rows=8)
    for j, (name, t) in enumerate(zip("qkv", qkv_layers)):
        ref, mo = cuda_q4.reference(xn, t, gs, dtype), qm(mlx_norm, t)
        if lbs is not None:
            ref, mo = ref + lbs[j], mo + lbs[j]
        record(f"qkv+norm {dname} m={m}", f"{model}.{name} gs={gs}", outs[j], ref, mo)
    for name, (n, k) in (("o", (h, heads * hd)), ("down", (h, inter))):
        layer = cuda_q4.random_q4(n, k, gs, dtype, kk[1])
        xin = mx.random.normal((m, k), key=kk[2]).astype(dtype)
        res = mx.random.normal((m, n), key=kk[3]).astype(dtype)
        out = cuda_q4.q4_matvec(xin, *layer, gs, residual=res, init_value=NAN, max_rows=8, min_weights=0)
        record(f"matvec+residual {dname} m={m}", f"{model}.{name} gs={gs}", out,
               cuda_q4.reference(xin, layer, gs) + res, qm(xin, layer) + res)
    if gs != 64:
        return
    for position in (0, 1, 255, 1000):
        q = mx.random.normal((m, 1, heads * hd), key=kk[4]).astype(dtype)
        k, v = (mx.random.normal((m, 1, kv_heads * hd), key=kk[i]).astype(dtype) for i in (5, 6))
        cache_k, cache_v = (mx.random.normal((m, kv_heads, 1024, hd), key=kk[7]).astype(dtype) * s for s in (1, 2))
        inv_freq = cuda_q4.rope_inverse_frequencies(hd, 1e6, 1.0, None)
        mx.eval(cache_k, cache_v)
        refs = cuda_q4.attend_reference(q, k, v, cache_k, cache_v, position, inv_freq, hd, False)
        # MLX's own: mx.fast.rope and mx.fast.scaled_dot_product_attention in the dtype, as the engine runs them
        heads_of = lambda t: t.reshape(m, 1, -1, hd).transpose(0, 2, 1, 3)  # noqa: E731
        qr, kr = (mx.fast.rope(heads_of(t), hd, traditional=False, base=1e6, scale=1.0, offset=position) for t in (q, k))
        ak = mx.concatenate([cache_k[:, :, :position], kr], axis=2)
        av = mx.concatenate([cache_v[:, :, :position], heads_of(v)], axis=2)
        mlx_out = mx.fast.scaled_dot_product_attention(qr, ak, av, scale=hd ** -0.5)
        mx.eval(refs, mlx_out, kr)   # before the kernel writes the new position into the cache, in place
        out = cuda_q4.attend(q, k, v, cache_k, cache_v, mx.array([position], mx.int32), inv_freq, hd, init_value=NAN)
        mx.eval(out)
        record(f"attend {dname} B={m}", f"{model} pos={position}", out, refs[0],
               mlx_out.transpose(0, 2, 1, 3).reshape(q.shape))
        record(f"attend.k {dname} B={m}", f"{model} pos={position}", cache_k[:, :, position:position + 1], refs[1], kr)
        record(f"attend.v {dname} B={m}", f"{model} pos={position}", cache_v[:, :, position:position + 1], refs[2],
               heads_of(v))


# ---------------------------------------------------------------- timing

def per_call(fn, arg_sets: list, n_iter: int, repeats: int = 5) -> float:
    """Median seconds per call of fn(*args) over n_iter calls per eval, rotating through arg_sets."""
    mx.eval([fn(*a) for a in arg_sets[:3]])
    times = []
    for _ in range(repeats):
        outs = [fn(*arg_sets[i % len(arg_sets)]) for i in range(n_iter)]
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(outs)
        mx.synchronize()
        times.append((time.perf_counter() - t0) / n_iter)
    return statistics.median(times)


def random_layers(n: int, k: int, gs: int, dtype, copies: int, seed: int) -> list[tuple]:
    """Copies of a random 4-bit layer (random bits, random scales/biases) to rotate through, beyond L2."""
    out = []
    for i, kk in enumerate(keys(seed, copies)):
        a, b, c = mx.random.split(kk, 3)
        w = mx.random.randint(0, 2 ** 31 - 1, (n, k // 8), key=a).astype(mx.uint32) * 2 + 1  # random nonzero codes
        s = (mx.random.uniform(0.5, 1.5, (n, k // gs), key=b) * 0.002).astype(dtype)
        bb = (mx.random.normal((n, k // gs), key=c) * 0.01).astype(dtype)
        out.append((w, s, bb))
    mx.eval(out)
    return out


def layer_bytes(n: int, k: int, gs: int) -> int:
    return n * k // 2 + 2 * 2 * n * (k // gs)


def copies_for(nbytes: int) -> int:
    return max(2, min(64, math.ceil(400e6 / nbytes)))   # > 8x the 50 MB L2, at most 64 copies


def time_shapes(dname: str = "bf16", gs: int = 64) -> None:
    dtype = DTYPES[dname]
    print("card:", card(), flush=True)
    rows = []
    qm = lambda x, w, s, b: mx.quantized_matmul(x, w, s, b, transpose=True, group_size=gs, bits=4)  # noqa: E731
    ours = lambda x, w, s, b: cuda_q4.q4_matvec(x, w, s, b, gs, max_rows=8, min_weights=0)  # noqa: E731
    for n, k in all_shapes():
        for m in (range(1, 9) if (n, k) == (18944, 3584) else (1,)):
            nb = layer_bytes(n, k, gs)
            layers = random_layers(n, k, gs, dtype, copies_for(nb), seed=n + k)
            x = mx.random.normal((m, k)).astype(dtype)
            args = [(x, *lay) for lay in layers]
            n_iter = max(50, min(400, int(2e9 / nb)))
            t_mlx, t_ours = per_call(qm, args, n_iter), per_call(ours, args, n_iter)
            rows.append([f"matvec {n}x{k}", m, f"{nb / 1e6:.1f}", f"{t_mlx * 1e6:.1f}", f"{nb / t_mlx / 1e9:.0f}",
                         f"{t_ours * 1e6:.1f}", f"{nb / t_ours / 1e9:.0f}", f"{t_mlx / t_ours:.2f}"])
            log({"phase": "time", "kind": "matvec", "n": n, "k": k, "m": m, "dtype": dname, "gs": gs,
                 "bytes": nb, "mlx_s": t_mlx, "ours_s": t_ours, "config": cuda_q4.launch_config(n, k, m)})
            del layers, args
    for model in MODELS:
        h, inter, *_ = MODELS[model]
        shapes = linear_shapes(model)
        nb = 2 * layer_bytes(inter, h, gs)
        c = copies_for(nb)
        gates, ups = random_layers(inter, h, gs, dtype, c, 1), random_layers(inter, h, gs, dtype, c, 2)
        x = mx.random.normal((1, h)).astype(dtype)
        args = [(x, *g, *u) for g, u in zip(gates, ups)]

        def unfused(x, gw, gsc, gb, uw, us, ub):
            g, u = qm(x, gw, gsc, gb), qm(x, uw, us, ub)
            return nn.silu(g) * u

        n_iter = max(50, min(400, int(2e9 / nb)))
        t_mlx = per_call(unfused, args, n_iter)
        t_ours = per_call(lambda x, *t: cuda_q4.swiglu(x, *t, gs), args, n_iter)
        rows.append([f"swiglu {model}", 1, f"{nb / 1e6:.1f}", f"{t_mlx * 1e6:.1f}", f"{nb / t_mlx / 1e9:.0f}",
                     f"{t_ours * 1e6:.1f}", f"{nb / t_ours / 1e9:.0f}", f"{t_mlx / t_ours:.2f}"])
        log({"phase": "time", "kind": "swiglu", "model": model, "dtype": dname, "gs": gs, "bytes": nb,
             "mlx_s": t_mlx, "ours_s": t_ours})
        del gates, ups, args
        (nq, _), (nkv, _) = shapes["q"], shapes["kv"]
        nb = layer_bytes(nq, h, gs) + 2 * layer_bytes(nkv, h, gs)
        c = copies_for(nb)
        qs, ks, vs = (random_layers(n_, h, gs, dtype, c, i) for i, n_ in ((3, nq), (4, nkv), (5, nkv)))
        args = [(x, a, b, d) for a, b, d in zip(qs, ks, vs)]
        n_iter = max(50, min(400, int(2e9 / nb)))
        t_mlx = per_call(lambda x, a, b, d: (qm(x, *a), qm(x, *b), qm(x, *d)), args, n_iter)
        t_ours = per_call(lambda x, a, b, d: cuda_q4.qkv(x, a, b, d, gs), args, n_iter)
        rows.append([f"qkv {model}", 1, f"{nb / 1e6:.1f}", f"{t_mlx * 1e6:.1f}", f"{nb / t_mlx / 1e9:.0f}",
                     f"{t_ours * 1e6:.1f}", f"{nb / t_ours / 1e9:.0f}", f"{t_mlx / t_ours:.2f}"])
        log({"phase": "time", "kind": "qkv", "model": model, "dtype": dname, "gs": gs, "bytes": nb,
             "mlx_s": t_mlx, "ours_s": t_ours})
        del qs, ks, vs, args
    # ceilings: a dense float16 matvec of the largest shape and a device copy
    w = [mx.random.normal((18944, 3584)).astype(mx.float16) for _ in range(3)]
    x = mx.random.normal((1, 3584)).astype(mx.float16)
    t = per_call(lambda x, w: x @ w.T, [(x, a) for a in w], 100)
    rows.append(["dense f16 18944x3584", 1, f"{w[0].nbytes / 1e6:.1f}", "", "", f"{t * 1e6:.1f}",
                 f"{w[0].nbytes / t / 1e9:.0f}", ""])
    a = mx.random.normal((256 * 2 ** 20,)).astype(mx.float16)
    t = per_call(lambda a: a + 1, [(a,)], 20)
    rows.append(["copy 512 MiB f16 (r+w)", "", f"{2 * a.nbytes / 1e6:.0f}", "", "", f"{t * 1e6:.1f}",
                 f"{2 * a.nbytes / t / 1e9:.0f}", ""])
    log({"phase": "time", "kind": "ceilings", "dense_s": t})
    print(f"{dname}, group size {gs}; GB/s counts weight + scale + bias bytes; card: {card()}")
    print(table(rows, ["what", "m", "MB", "mlx us", "mlx GB/s", "ours us", "ours GB/s", "speed-up"]))


def sweep(dname: str = "bf16", gs: int = 64) -> None:
    dtype = DTYPES[dname]
    print("card:", card(), flush=True)
    configs = [(r, s, w) for r in (1, 2, 4, 8) for s in (1, 2, 4, 8) for w in (4, 8) if w % s == 0]
    rows = []
    for n, k in ((18944, 3584), (3584, 18944), (3584, 3584), (512, 3584), (152064, 3584), (4864, 896)):
        nb = layer_bytes(n, k, gs)
        layers = random_layers(n, k, gs, dtype, copies_for(nb), seed=7)
        x = mx.random.normal((1, k)).astype(dtype)
        ref = cuda_q4.reference(x, layers[0], gs)
        args = [(x, *lay) for lay in layers]
        n_iter = max(50, min(400, int(2e9 / nb)))
        results = []
        for cfg in configs:
            err = cuda_q4.rel_err(cuda_q4.q4_matvec(x, *layers[0], gs, config=cfg, init_value=NAN, min_weights=0), ref)
            if not err < cuda_q4.TOLERANCE:
                print(f"FAIL {n}x{k} {cfg}: rel err {err:.2e}")
            t = per_call(lambda x, w, s, b: cuda_q4.q4_matvec(x, w, s, b, gs, config=cfg, min_weights=0), args, n_iter, 3)
            results.append((t, cfg, err))
            log({"phase": "sweep", "n": n, "k": k, "config": cfg, "s": t, "err": err, "bytes": nb})
        results.sort()
        default = cuda_q4.launch_config(n, k, 1)
        t_default = next(t for t, c, _ in results if c == default)
        for t, cfg, err in results[:3]:
            rows.append([f"{n}x{k}", str(cfg), f"{t * 1e6:.1f}", f"{nb / t / 1e9:.0f}", f"{err:.1e}",
                         f"{default} {nb / t_default / 1e9:.0f}"])
        del layers, args
    print(table(rows, ["shape", "(R,SPLIT,WPB)", "us", "GB/s", "err", "default GB/s"]))


def sweep_step(model: str = "qwen2.5-7b", dname: str = "bf16", gs: int = 64) -> None:
    """Launch configurations of the fused one-token step's kernels on one model's shapes (one activation row),
    each config's output checked; the three fastest beside launch_config's choice."""
    dtype = DTYPES[dname]
    print("card:", card(), flush=True)
    h, inter, heads, kv_heads, hd, _, qkv_bias = MODELS[model]
    eps = 1e-6
    norm_w = mx.ones((h,), dtype)
    rows = []

    def run(label, n_rows, k, fused, nbytes, make_args, call, reference):
        configs = [(r, sp, w) for r in (1, 2, 4, 8) for sp in (1, 2, 4) for w in (4, 8)
                   if w % sp == 0 and r * fused <= 8]
        args = make_args()
        n_iter = max(50, min(400, int(2e9 / nbytes)))
        results = []
        for cfg in configs:
            err = cuda_q4.rel_err(call(*args[0], cfg), reference(*args[0]))
            if not err < cuda_q4.TOLERANCE:
                print(f"FAIL {label} {cfg}: rel err {err:.2e}")
                continue
            t = per_call(lambda *a: call(*a, cfg), args, n_iter, 3)
            results.append((t, cfg))
            log({"phase": "sweep-step", "case": label, "config": cfg, "s": t, "bytes": nbytes})
        results.sort()
        default = cuda_q4.launch_config(n_rows, k, 1, fused)
        t_default = next((t for t, c in results if c == default), float("nan"))
        for t, cfg in results[:3]:
            rows.append([label, str(cfg), f"{t * 1e6:.1f}", f"{nbytes / t / 1e9:.0f}",
                         f"{default} {t_default * 1e6:.1f} us {nbytes / t_default / 1e9:.0f}"])
        print(rows[-3:], flush=True)

    x = mx.random.normal((1, h)).astype(dtype)
    nb = layer_bytes(heads * hd, h, gs) + 2 * layer_bytes(kv_heads * hd, h, gs)
    lb = tuple(mx.zeros((n,), dtype) for n in (heads * hd, kv_heads * hd, kv_heads * hd)) if qkv_bias else None

    def qkv_args():
        qs = random_layers(heads * hd, h, gs, dtype, copies_for(nb), 11)
        ks = random_layers(kv_heads * hd, h, gs, dtype, copies_for(nb), 12)
        vs = random_layers(kv_heads * hd, h, gs, dtype, copies_for(nb), 13)
        return [(x, q, k, v) for q, k, v in zip(qs, ks, vs)]
    run("qkv+norm", heads * hd + 2 * kv_heads * hd, h, 1, nb, qkv_args,
        lambda x_, q, k, v, cfg: cuda_q4.qkv(x_, q, k, v, gs, lb, norm=(norm_w, eps), config=cfg)[0],
        lambda x_, q, k, v: cuda_q4.reference(cuda_q4.norm_reference(x_, (norm_w, eps)), q, gs, dtype) + (lb[0] if lb else 0))
    for label, n, k in (("o+residual", h, heads * hd), ("down+residual", h, inter)):
        nb = layer_bytes(n, k, gs)
        xk = mx.random.normal((1, k)).astype(dtype)
        res = mx.random.normal((1, n)).astype(dtype)
        run(label, n, k, 1, nb, lambda n=n, k=k, nb=nb, xk=xk: [(xk, *lay) for lay in random_layers(n, k, gs, dtype,
                                                                                                 copies_for(nb), 14)],
            lambda x_, w, s_, b, cfg, res=res: cuda_q4.q4_matvec(x_, w, s_, b, gs, residual=res, config=cfg, min_weights=0),
            lambda x_, w, s_, b, res=res: cuda_q4.reference(x_, (w, s_, b), gs) + res)
    nb = 2 * layer_bytes(inter, h, gs)

    def swiglu_args():
        layers = random_layers(inter, h, gs, dtype, 2 * copies_for(nb), 15)
        return [(x, layers[i], layers[i + 1]) for i in range(0, len(layers), 2)]
    run("swiglu+norm", inter, h, 2, nb, swiglu_args,
        lambda x_, g, u, cfg: cuda_q4.swiglu(x_, *g, *u, gs, norm=(norm_w, eps), config=cfg),
        lambda x_, g, u: cuda_q4.swiglu_reference(cuda_q4.norm_reference(x_, (norm_w, eps)), g, u, gs, dtype))
    print(f"fused-step kernels, {model} shapes, {dname} gs={gs}; card: {card()}")
    print(table(rows, ["case", "(R,SPLIT,WPB)", "us", "GB/s", "launch_config's choice"]))


# ---------------------------------------------------------------- kernel times under Nsight Compute

def profile(dname: str = "bf16", gs: int = 64) -> None:
    """Runs each case once per repeat; run under `ncu --csv` (see __main__) for the GPU time of each kernel.

    Writes the order of the profiled kernels ($OUT/profile_labels.json): ncu lists kernels in launch order.
    """
    dtype = DTYPES[dname]
    qm = lambda x, w, s, b: mx.quantized_matmul(x, w, s, b, transpose=True, group_size=gs, bits=4)  # noqa: E731
    labels = []

    def run(label, kind, nbytes, fn, n_kernels=1):
        for _ in range(3):
            mx.eval(fn())
            mx.synchronize()
            labels.extend([[label, kind, nbytes]] * n_kernels)

    cases = [(n, k, 1) for n, k in all_shapes()] + [(18944, 3584, m) for m in range(2, 5)]
    for n, k, m in cases:
        (layer,) = random_layers(n, k, gs, dtype, 1, seed=n + k)
        x = mx.random.normal((m, k)).astype(dtype)
        nb = layer_bytes(n, k, gs)
        run(f"matvec {n}x{k} m={m}", "mlx", nb, lambda: qm(x, *layer))
        run(f"matvec {n}x{k} m={m}", "ours", nb, lambda: cuda_q4.q4_matvec(x, *layer, gs, max_rows=8, min_weights=0))
    for model in ("qwen2.5-0.5b", "qwen2.5-7b"):
        h, inter, *_ = MODELS[model]
        shapes = linear_shapes(model)
        gate, up = random_layers(inter, h, gs, dtype, 2, seed=1)
        x = mx.random.normal((1, h)).astype(dtype)
        nb = 2 * layer_bytes(inter, h, gs)
        run(f"swiglu {model}", "mlx", nb, lambda: (qm(x, *gate), qm(x, *up)), 2)
        run(f"swiglu {model}", "ours", nb, lambda: cuda_q4.swiglu(x, *gate, *up, gs))
        (q,) = random_layers(shapes["q"][0], h, gs, dtype, 1, 3)
        kl, vl = random_layers(shapes["kv"][0], h, gs, dtype, 2, 4)
        nb = layer_bytes(shapes["q"][0], h, gs) + 2 * layer_bytes(shapes["kv"][0], h, gs)
        run(f"qkv {model}", "mlx", nb, lambda: (qm(x, *q), qm(x, *kl), qm(x, *vl)), 3)
        run(f"qkv {model}", "ours", nb, lambda: cuda_q4.qkv(x, q, kl, vl, gs))
    (OUT / "profile_labels.json").write_text(json.dumps(labels))


def profile_table(csv_path: str) -> None:
    """Pairs ncu's kernel durations (in launch order) with profile()'s labels and prints GB/s per case."""
    import csv

    labels = json.loads((OUT / "profile_labels.json").read_text())
    durations = []
    with open(csv_path) as f:
        lines = [line for line in f if line.startswith('"')]
    for row in csv.DictReader(lines):
        if row.get("Metric Name") == "gpu__time_duration.sum":
            scale = {"nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3}.get(row["Metric Unit"], 1e-9)
            durations.append((row["Kernel Name"], float(row["Metric Value"].replace(",", "")) * scale))
    if len(durations) != len(labels):
        print(f"ncu listed {len(durations)} kernels, the script launched {len(labels)}")
    per_case: dict[tuple, dict] = {}
    for (label, kind, nbytes), (name, t) in zip(labels, durations):
        if ("q4_" in name) != (kind == "ours"):
            print(f"kernel {name[:70]} where {kind} {label} was expected: pairing stops here")
            break
        per_case.setdefault((label, nbytes), {}).setdefault(kind, []).append(t)
    rows = []
    for (label, nbytes), kinds in per_case.items():
        if len(kinds.get("mlx", ())) % 3 or len(kinds.get("ours", ())) != 3:
            continue
        t_mlx = sum(kinds["mlx"]) / 3            # 3 calls, each of one or more kernels
        t_ours = statistics.median(kinds["ours"])
        rows.append([label, f"{nbytes / 1e6:.1f}", f"{t_mlx * 1e6:.1f}", f"{nbytes / t_mlx / 1e9:.0f}",
                     f"{t_ours * 1e6:.1f}", f"{nbytes / t_ours / 1e9:.0f}", f"{t_mlx / t_ours:.2f}"])
        log({"phase": "ncu", "case": label, "bytes": nbytes, "mlx_s": t_mlx, "ours_s": t_ours})
    print(f"GPU time per kernel launch (ncu gpu__time_duration, caches flushed, clocks not locked); "
          f"mlx = sum of its kernels per call; card: {card()}")
    print(table(rows, ["case", "MB", "mlx us", "mlx GB/s", "ours us", "ours GB/s", "speed-up"]))


def ncu_durations(csv_path: str) -> list[tuple[str, float]]:
    """(kernel name, seconds) in launch order from `ncu --csv --metrics gpu__time_duration.sum`."""
    import csv
    with open(csv_path) as f:
        lines = [line for line in f if line.startswith('"')]
    out = []
    for row in csv.DictReader(lines):
        if row.get("Metric Name") == "gpu__time_duration.sum":
            scale = {"nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3}.get(row["Metric Unit"], 1e-9)
            out.append((row["Kernel Name"], float(row["Metric Value"].replace(",", "")) * scale))
    return out


MARKER = "step_marker"


def profile_decode(shape: str = "qwen2.5-7b", layers: int = 4, steps: int = 3) -> None:
    """Decode steps of a few layers of a model shape, as shipped (fused one-token steps); run under ncu
    (see __main__), then `profile-decode-table` gives each kernel's GPU time per step. A marker kernel
    separates the steps."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_model import make_model
    from swarm.model.decoder import load_stage
    from swarm.model.generate import prefill

    path = Path(f"/tmp/models/{shape}" if layers == 0 else f"/tmp/models/{shape}-{layers}l")
    if not (path / "config.json").exists():
        make_model(shape, path, layers=layers or None)
    stage = load_stage(path)
    marker = mx.fast.cuda_kernel(name=MARKER, input_names=["x"], output_names=["y"], source="y[0] = x[0];")
    one = mx.zeros((1,), mx.float32)
    cache = stage.make_cache()
    token = mx.argmax(prefill(stage, list(range(1000, 1032)), cache)).reshape(1, 1)
    mx.eval(token)
    for _ in range(steps):
        mx.eval(marker(inputs=[one], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)],
                       output_dtypes=[mx.float32])[0])
        token = mx.argmax(stage(token, cache)[0, -1]).reshape(1, 1)
        mx.eval(token)   # as generation does: the step's cache writes run with the next step
    mx.eval(marker(inputs=[one], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)],
                   output_dtypes=[mx.float32])[0])
    (OUT / "profile_decode.json").write_text(json.dumps({"shape": shape, "layers": layers, "steps": steps}))


def profile_decode_table(csv_path: str) -> None:
    """GPU time per decode step by kernel, from the last full step between markers."""
    meta = json.loads((OUT / "profile_decode.json").read_text())
    durations = ncu_durations(csv_path)
    marks = [i for i, (name, _) in enumerate(durations) if MARKER in name]
    if len(marks) < 2:
        print(f"found {len(marks)} step markers among {len(durations)} kernels")
        return
    step = durations[marks[-2] + 1:marks[-1]]
    by_kernel: dict[str, list] = {}
    for name, t in step:
        short = name.split("(")[0].split("<")[0].replace("mlx::core::cu::", "")[:48]
        by_kernel.setdefault(short, []).append(t)
    total = sum(t for _, t in step)
    rows = [[k, len(v), f"{sum(v) * 1e6:.1f}", f"{sum(v) / total * 100:.0f}%"]
            for k, v in sorted(by_kernel.items(), key=lambda kv: -sum(kv[1]))]
    log({"phase": "profile-decode", **meta, "total_s": total, "kernels": {k: sum(v) for k, v in by_kernel.items()}})
    print(f"GPU time of one decode step, {meta['shape']} shape with {meta['layers']} layers: {total * 1e6:.0f} us in "
          f"{len(step)} kernels (ncu, clocks not locked); card: {card()}")
    print(table(rows, ["kernel", "launches", "us", "share"]))


# ---------------------------------------------------------------- host cost per op

def overhead(n_ops: int = 200, rounds: int = 10) -> None:
    """Host time per op on this back-end: chains of n_ops ops, built (Python), handed to the GPU
    (mx.async_eval) and finished (mx.eval), in us per op; MLX's own ops beside custom kernels."""
    print("card:", card(), "| MLX_MAX_OPS_PER_BUFFER", os.environ.get("MLX_MAX_OPS_PER_BUFFER", "default"),
          "| MLX_USE_CUDA_GRAPHS", os.environ.get("MLX_USE_CUDA_GRAPHS", "default"), flush=True)
    dt, gs = mx.bfloat16, 64
    x = mx.random.normal((1, 1, 896)).astype(dt)
    layer = cuda_q4.random_q4(896, 896, gs, dt)
    copy_src = "int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < x_shape[2]) y[i] = x[i];"
    tiny = mx.fast.cuda_kernel(name="bench_tiny_copy", input_names=["x"], output_names=["y"], source=copy_src)
    padded = mx.fast.cuda_kernel(name="bench_padded_copy", input_names=["x"], output_names=["y"], source=copy_src,
                                 header="// " + "x" * 15000 + "\n")
    launch = {"grid": (896, 1, 1), "threadgroup": (128, 1, 1), "output_shapes": [x.shape], "output_dtypes": [dt]}
    cases = {
        "mx.add": lambda h: h + x,
        "mx.fast.rms_norm": lambda h: mx.fast.rms_norm(h, x[0, 0], 1e-6),
        "mx.quantized_matmul 896x896": lambda h: mx.quantized_matmul(h, *layer, transpose=True, group_size=gs, bits=4),
        "custom copy kernel, no header": lambda h: tiny(inputs=[h], **launch)[0],
        "custom copy kernel, 15 KB header": lambda h: padded(inputs=[h], **launch)[0],
        "q4_matvec 896x896": lambda h: cuda_q4.q4_matvec(h, *layer, gs, min_weights=0),
        "q4_matvec+residual 896x896": lambda h: cuda_q4.q4_matvec(h, *layer, gs, residual=x, min_weights=0),
    }
    rows = []
    for name, op in cases.items():
        build = launch_t = total = 0.0
        for r in range(rounds + 1):
            h = x
            t0 = time.perf_counter()
            for _ in range(n_ops):
                h = op(h)
            t1 = time.perf_counter()
            mx.async_eval(h)
            t2 = time.perf_counter()
            mx.eval(h)
            t3 = time.perf_counter()
            if r:   # the first round compiles
                build, launch_t, total = build + t1 - t0, launch_t + t2 - t1, total + t3 - t0
        per = 1e6 / (rounds * n_ops)
        rows.append([name, f"{build * per:.1f}", f"{launch_t * per:.1f}", f"{total * per:.1f}"])
        log({"phase": "overhead", "op": name, "build_us": build * per, "launch_us": launch_t * per,
             "total_us": total * per, "max_ops_per_buffer": os.environ.get("MLX_MAX_OPS_PER_BUFFER", "default"),
             "cuda_graphs": os.environ.get("MLX_USE_CUDA_GRAPHS", "default")})
    print(f"host us per op, chains of {n_ops} ops; card: {card()}")
    print(table(rows, ["op", "build", "async_eval", "total"]))


# ---------------------------------------------------------------- decode

def pipeline(shape: str = "qwen2.5-7b", steps: int = 64) -> None:
    """Host against GPU time per decode step, as shipped: `steps` steps of known tokens queued with
    async_eval without waiting (wall = the slower of host and GPU) and the same steps one at a time
    (wall = host + GPU + latency)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_model import make_model
    from swarm.model.decoder import load_stage
    from swarm.model.generate import prefill

    path = Path(f"/tmp/models/{shape}")
    if not (path / "config.json").exists():
        t0 = time.perf_counter()
        make_model(shape, path)
        print(f"made {shape} in {time.perf_counter() - t0:.0f} s", flush=True)
    stage = load_stage(path)
    ids = [mx.array([[1000 + i]], dtype=mx.int32) for i in range(steps)]
    mx.eval(ids)
    rows = []
    for rnd in range(3):
        for mode in ("queued", "one by one"):
            cache = stage.make_cache()
            mx.eval(prefill(stage, list(range(1000, 1032)), cache))
            mx.synchronize()
            host = 0.0
            t0 = time.perf_counter()
            for i in range(steps):
                t1 = time.perf_counter()
                out = mx.argmax(stage(ids[i], cache)[0, -1])
                mx.async_eval(out)
                host += time.perf_counter() - t1
                if mode != "queued":
                    mx.eval(out)
            mx.synchronize()
            wall = time.perf_counter() - t0
            if rnd:
                rows.append([shape, mode, f"{host / steps * 1e6:.0f}", f"{wall / steps * 1e6:.0f}"])
                log({"phase": "pipeline", "shape": shape, "mode": mode, "host_us": host / steps * 1e6,
                     "wall_us": wall / steps * 1e6, "max_ops_per_buffer": os.environ.get("MLX_MAX_OPS_PER_BUFFER"),
                     "variant": os.environ.get("BENCH_NOTE", "")})
    print(f"us per decode step ({steps} steps): host (build + async_eval) and wall; {os.environ.get('BENCH_NOTE', '')}"
          f" ops/buffer {os.environ.get('MLX_MAX_OPS_PER_BUFFER', 'default')}; card: {card()}")
    print(table(rows, ["model", "mode", "host us", "wall us"]))


def host_cost(stage, prompt: list[int], steps: int = 32) -> tuple[float, float]:
    """(us to build one step's graph, us to hand it to the GPU with async_eval) per token, after a prefill."""
    from swarm.model.generate import prefill
    cache = stage.make_cache()
    token = mx.argmax(prefill(stage, prompt, cache)).reshape(1, 1)
    build = launch = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        out = mx.argmax(stage(token, cache)[0, -1]).reshape(1, 1)
        t1 = time.perf_counter()
        mx.async_eval(out)
        t2 = time.perf_counter()
        build, launch = build + t1 - t0, launch + t2 - t1
        mx.eval(out)
        token = out
    return build / steps * 1e6, launch / steps * 1e6


def decode(shapes=("qwen2.5-0.5b", "qwen2.5-7b"), tokens: int = 128) -> None:
    """tok/s of mlx-lm and of the engine (MLX's kernels, ours op by op, the fused one-token step), interleaved."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_model import make_model
    from swarm.model.decoder import load_stage
    from swarm.model.generate import Timings, generate_ids
    from swarm.model.sampling import SamplingParams

    print("card:", card(), "| MLX_MAX_OPS_PER_BUFFER", os.environ.get("MLX_MAX_OPS_PER_BUFFER", "default"), flush=True)
    enabled = cuda_q4.enabled()
    print("kernels enabled:", enabled, flush=True)

    def load(name):
        # "engine": MLX's own kernels; "engine+kernels": ours (matvec, SwiGLU, q/k/v) op by op; "engine+step": as
        # shipped, each layer's one-token step in five fused launches. The engine picks its kernels when a layer
        # is built, so each variant is a stage of its own.
        cuda_q4._enabled = enabled and name != "engine"
        try:
            stage = load_stage(path)
        finally:
            cuda_q4._enabled = enabled
        if name == "engine+kernels":
            for layer in stage.layers:
                layer.decode_step = None
        return stage

    rows = []
    prompt = list(range(1000, 1032))
    for shape in shapes:
        path = Path(f"/tmp/models/{shape}")
        if not (path / "config.json").exists():
            t0 = time.perf_counter()
            make_model(shape, path)
            print(f"made {shape} in {time.perf_counter() - t0:.0f} s", flush=True)
        try:
            if os.environ.get("BENCH_SKIP_MLXLM"):
                raise RuntimeError("skipped (BENCH_SKIP_MLXLM)")
            from mlx_lm import load as lm_load
            from mlx_lm import stream_generate
            model, tok = lm_load(str(path))
            tps = []
            for _ in range(4):
                last = None
                for last in stream_generate(model, tok, prompt, max_tokens=tokens):
                    pass
                tps.append(last.generation_tps)
            rows.append([shape, "mlx-lm 0.32.2", f"{statistics.median(tps[1:]):.1f}", "", f"max {max(tps):.1f}"])
            log({"phase": "decode", "shape": shape, "variant": "mlx-lm", "tps": tps})
            del model
        except Exception as e:  # the engine's numbers still count without the reference
            rows.append([shape, "mlx-lm", "-", "", f"{type(e).__name__}: {e}"[:60]])
        names = ["engine"] + (["engine+kernels", "engine+step"] if enabled else [])
        if os.environ.get("BENCH_VARIANTS"):
            names = [n for n in names if n in os.environ["BENCH_VARIANTS"].split(",")]
        stages = {name: load(name) for name in names}
        tps, ids = {n: [] for n in names}, {}
        for _ in range(4):   # variants interleaved, so that a slow spell of the host hits them alike
            for name in list(names):
                t = Timings()
                try:
                    ids[name] = list(generate_ids(stages[name], prompt,
                                                  SamplingParams(temperature=0.0, max_tokens=tokens), timings=t))
                except Exception as e:  # one variant failing leaves the others' figures
                    rows.append([shape, name, "-", "", f"{type(e).__name__}: {e}"[:80]])
                    names.remove(name)
                    continue
                tps[name].append(t.decode_tps)
        for name in names:
            build, launch = host_cost(stages[name], prompt)
            same = "" if name == "engine" or "engine" not in ids else ("same tokens" if ids[name] == ids["engine"] else
                                                f"{sum(a == b for a, b in zip(ids[name], ids['engine']))}/{tokens} same")
            rows.append([shape, name, f"{statistics.median(tps[name][1:]):.1f}", f"{build:.0f} + {launch:.0f}",
                         f"max {max(tps[name]):.1f} {same}"])
            log({"phase": "decode", "shape": shape, "variant": name, "tps": tps[name], "note": same,
                 "build_us": build, "launch_us": launch,
                 "max_ops_per_buffer": os.environ.get("MLX_MAX_OPS_PER_BUFFER", "default")})
        del stages
    print(f"decode tok/s (median of runs 2-4), greedy, {tokens} tokens after a 32-token prompt; host us per token: "
          f"graph build + async_eval; card: {card()}")
    print(table(rows, ["model", "variant", "tok/s", "host us/token", "note"]))


if __name__ == "__main__":
    phase = sys.argv[1] if len(sys.argv) > 1 else "check"
    if phase == "check":
        sys.exit(0 if check(tuple(sys.argv[2:]) or tuple(DTYPES)) else 1)
    elif phase == "time":
        time_shapes(*sys.argv[2:3])
    elif phase == "sweep":
        sweep()
    elif phase == "sweep-step":
        sweep_step(*sys.argv[2:3])
    elif phase == "profile":
        profile()
    elif phase == "profile-table":
        profile_table(sys.argv[2])
    elif phase == "profile-decode":
        profile_decode(*sys.argv[2:3], *(int(a) for a in sys.argv[3:4]))
    elif phase == "pipeline":
        pipeline(*sys.argv[2:3])
    elif phase == "profile-decode-table":
        profile_decode_table(sys.argv[2])
    elif phase == "overhead":
        overhead()
    elif phase == "decode":
        decode(tuple(sys.argv[2:]) or ("qwen2.5-0.5b", "qwen2.5-7b"))
    else:
        sys.exit(f"unknown phase {phase!r}")
