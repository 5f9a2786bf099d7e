"""Checks and times the CUDA kernels (kernels/cuda_*.py) against MLX's own on a CUDA GPU.

    python scripts/bench_gpu.py report              # the start-up self-check: which kernels passed, why not
    python scripts/bench_gpu.py goals               # the issue's goals in one process (see goals())
    python scripts/bench_gpu.py check [bf16|f16]    # every linear shape of Qwen2.5 0.5B-7B and Llama 3.2 1B,
                             # groups 32/64/128, 1-16 rows, both kernel paths, the fused step's variants, and
                             # the batched attention at 1k-32k positions; outputs poisoned with NaN: rel err < 1e-3
    python scripts/bench_gpu.py time [bf16|f16]     # GB/s per call: mx.quantized_matmul, the SIMT and the
                             # tensor-core kernels, 1-16 rows; the 7B step's kernels; ceilings (dense f16, copy)
    python scripts/bench_gpu.py attention           # the batched attention against MLX's op-by-op, 128-32k positions
    python scripts/bench_gpu.py sweep               # tensor-core launch configurations on the large 7B shapes
    python scripts/bench_gpu.py steps [shape]       # decode with the fused step: B = 1-16 sessions, 128 and 32k
                             # positions, mx.compile of the step, host and wall time a step, mlx-lm beside it
    python scripts/bench_gpu.py pipeline [shape]    # host against wall time a step through the engine's Stage
    python scripts/bench_gpu.py decode [shapes]     # tok/s: mlx-lm vs the engine (MLX's kernels, ours)
    python scripts/bench_gpu.py overhead            # host us per op: MLX's ops beside custom kernels

Each phase prints a table last and appends JSON lines to $OUT/bench.jsonl (or ./bench.jsonl). Errors are
relative: ||out - ref|| / ||ref||, ref = MLX's ops in float32 on upcast inputs, rounded to the dtype (what
an exact kernel returns); MLX's own half-precision result is measured against it too.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from kernels import cuda_attention, cuda_check, cuda_matvec, cuda_mma, cuda_qkv, cuda_step, cuda_swiglu  # noqa: E402
from kernels.cuda_check import TOLERANCE, norm_reference, random_q4, reference, rel_err, swiglu_reference  # noqa: E402

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
ROWS = (1, 2, 3, 5, 8, 9, 12, 16)


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


def report() -> bool:
    print("card:", card(), flush=True)
    r = cuda_check.report()
    print(json.dumps(r, indent=1))
    print(cuda_check.check_report())
    log({"phase": "report", **r})
    return r["path"] == "cuda-fused"


# ---------------------------------------------------------------- check

class Errors:
    """Worst errors per category: ours vs the reference, MLX's own vs the reference, ours vs MLX's."""

    def __init__(self):
        self.worst: dict[str, list] = {}
        self.failures: list[str] = []

    def record(self, cat: str, what: str, out, ref, mlx_out=None) -> None:
        e = rel_err(out, ref) if out is not None else math.inf
        em = rel_err(mlx_out, ref) if mlx_out is not None else 0.0
        w = self.worst.setdefault(cat, [0.0, 0.0, 0])
        w[0], w[1], w[2] = max(w[0], e), max(w[1], em), w[2] + 1
        log({"phase": "check", "cat": cat, "what": what, "err": e, "mlx_err": em})
        if not e < TOLERANCE:
            self.failures.append(f"{cat} {what}: {e:.3e}")

    def table(self) -> str:
        return table([[cat, v[2], f"{v[0]:.2e}", f"{v[1]:.2e}"] for cat, v in self.worst.items()],
                     ["category", "checks", "worst ours", "worst mlx"])


def check(dtypes: tuple[str, ...] = ("bf16",), seed: int = 1) -> bool:
    print("card:", card(), flush=True)
    ok = report()
    errors = Errors()
    t0 = time.perf_counter()
    for dname in dtypes:
        check_products(errors, dname, seed)
        print(f"q4 products {dname}: {time.perf_counter() - t0:.0f} s", flush=True)
        check_attention(errors, dname, seed)
        print(f"attention {dname}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"checked {', '.join(dtypes)}; errors vs float32 MLX ops rounded to the dtype; card: {card()}")
    print(errors.table())
    print(f"{sum(v[2] for v in errors.worst.values())} checks, {len(errors.failures)} over {TOLERANCE}")
    for f in errors.failures[:20]:
        print("FAIL", f)
    return ok and not errors.failures


def check_products(errors: Errors, dname: str, seed: int) -> None:
    """The q4 products on every model shape: the tensor-core path at 1-16 rows, the SIMT path at 1 and 7."""
    dtype = DTYPES[dname]
    qm = lambda x_, t, gs: mx.quantized_matmul(x_, *t, transpose=True, group_size=gs, bits=4)  # noqa: E731
    n_key = 0
    for gs in (32, 64, 128):
        for n, k in all_shapes():
            rows = ROWS if gs == 64 and n < 100_000 else (1, 16)
            n_key += 1
            kk = keys(seed * 1000 + n_key, 2 + len(rows))
            layer = random_q4(n, k, gs, dtype, kk[0])
            for m, xk in zip(rows, kk[2:]):
                x = mx.random.normal((m, k), key=xk).astype(dtype)
                ref, mlx_out = reference(x, layer, gs), qm(x, layer, gs)
                out = cuda_matvec.q4_matvec(x, *layer, gs, init_value=NAN, min_weights=0, max_rows=16, path="mma")
                errors.record(f"matvec mma {dname}", f"{n}x{k} gs={gs} rows={m}", out, ref, mlx_out)
                if gs == 64 and m in (1, 8):
                    out = cuda_matvec.q4_matvec(x, *layer, gs, init_value=NAN, max_rows=8, min_weights=0, path="simt")
                    errors.record(f"matvec simt {dname}", f"{n}x{k} gs={gs} rows={m}", out, ref, mlx_out)
            del layer
        for model, (h, inter, heads, kv_heads, hd, _, qkv_bias) in MODELS.items():
            n_key += 1
            kk = keys(seed * 1000 + n_key, 12)
            gate, up = (random_q4(inter, h, gs, dtype, kk[i]) for i in (0, 1))
            q = random_q4(heads * hd, h, gs, dtype, kk[2])
            kl, vl = (random_q4(kv_heads * hd, h, gs, dtype, kk[i]) for i in (3, 4))
            lbs = tuple(mx.random.normal((t[0].shape[0],), key=kk[5 + i]).astype(dtype) * 0.5
                        for i, t in enumerate((q, kl, vl))) if qkv_bias else None
            norm = ((1.0 + 0.1 * mx.random.normal((h,), key=kk[8])).astype(dtype), 1e-6)
            o, down = random_q4(h, heads * hd, gs, dtype, kk[9]), random_q4(h, inter, gs, dtype, kk[10])
            for m in ((1, 2, 5, 8, 11, 16) if gs == 64 else (1, 16)):
                x = mx.random.normal((1, m, h), key=mx.random.split(kk[11], 17)[m]).astype(dtype)
                xn, mlx_norm = norm_reference(x, norm), mx.fast.rms_norm(x, norm[0], norm[1])
                for path in ("mma", "simt") if gs == 64 and m in (1, 8) else ("mma",):
                    tag = f"{path} {dname}"
                    for label, nrm, x_ref, x_mlx in (("", None, x, x), ("+norm", norm, xn, mlx_norm)):
                        out = cuda_swiglu.swiglu(x, *gate, *up, gs, norm=nrm, init_value=NAN, max_rows=16, path=path)
                        errors.record(f"swiglu{label} {tag}", f"{model} gs={gs} rows={m}", out,
                                      swiglu_reference(x_ref, gate, up, gs, dtype),
                                      nn.silu(qm(x_mlx, gate, gs)) * qm(x_mlx, up, gs))
                        outs = cuda_qkv.qkv(x, q, kl, vl, gs, lbs, norm=nrm, init_value=NAN, max_rows=16, path=path)
                        for j, (name, t) in enumerate(zip("qkv", (q, kl, vl))):
                            ref, mo = reference(x_ref, t, gs, dtype), qm(x_mlx, t, gs)
                            if lbs is not None:
                                ref, mo = ref + lbs[j], mo + lbs[j]
                            errors.record(f"qkv{label} {tag}", f"{model}.{name} gs={gs} rows={m}",
                                          None if outs is None else outs[j], ref, mo)
                    for name, layer, k in (("o", o, heads * hd), ("down", down, inter)):
                        xin = mx.random.normal((1, m, k), key=kk[6]).astype(dtype)
                        res = mx.random.normal((1, m, h), key=kk[7]).astype(dtype)
                        out = cuda_matvec.q4_matvec(xin, *layer, gs, residual=res, init_value=NAN, max_rows=16,
                                                    min_weights=0, path=path)
                        errors.record(f"matvec+residual {tag}", f"{model}.{name} gs={gs} rows={m}", out,
                                      reference(xin, layer, gs) + res, qm(xin, layer, gs) + res)


def check_attention(errors: Errors, dname: str, seed: int) -> None:
    """The batched attention against RoPE and mx.fast.scaled_dot_product_attention in float32: one session at
    1k-32k positions, 16 sessions of lengths spread over 1-32k, for the 7B and the 0.5B heads; MLX's column:
    its own ops in the dtype (mx.fast.rope, mx.fast.scaled_dot_product_attention)."""
    dtype = DTYPES[dname]
    cases = [("qwen2.5-7b", [n]) for n in (1000, 4096, 16384, 32767)] + \
            [("qwen2.5-7b", [37 + 2047 * i for i in range(16)]), ("qwen2.5-0.5b", [32767]),
             ("qwen2.5-0.5b", [5 + 997 * i for i in range(16)])]
    for i, (model, lengths) in enumerate(cases):
        _, _, heads, kv_heads, hd, _, _ = MODELS[model]
        caps = [-(-(n + 1) // 256) * 256 for n in lengths]
        q, k, v, caches = cuda_check.sessions_case(dtype, hd, heads, kv_heads, lengths, caps, mx.random.key(seed + i))
        inv_freq = cuda_attention.rope_inverse_frequencies(hd, 1e6, 1.0, None)
        refs = cuda_check.sessions_references(q, k, v, caches, lengths, inv_freq, hd, False)
        mlx_outs = [mlx_attention(q[:, b:b + 1], k[:, b:b + 1], v[:, b:b + 1], kc, vc, n, hd)
                    for b, ((kc, vc), n) in enumerate(zip(caches, lengths))]
        mx.eval(mlx_outs)
        out = cuda_attention.attend_sessions(q, k, v, caches, mx.array(lengths, mx.int32), inv_freq, hd,
                                             init_value=NAN)
        mx.eval(out)
        what = f"{model} B={len(lengths)} pos={min(lengths)}-{max(lengths)}"
        for b, (ro, rk, rv) in enumerate(refs):
            got = None if out is None else out[:, b:b + 1].reshape(ro.shape)
            errors.record(f"attention {dname} B={len(lengths)}", f"{what} [{b}]", got, ro, mlx_outs[b].reshape(ro.shape))
            kc, vc = caches[b]
            n = lengths[b]
            errors.record(f"attention.kv {dname}", f"{what} [{b}]", mx.concatenate(
                [kc[:, :, n:n + 1], vc[:, :, n:n + 1]], axis=2), mx.concatenate([rk, rv], axis=2))
        del caches


def mlx_attention(q, k, v, keys_, values, position: int, hd: int, base: float = 1e6):
    """MLX's own op-by-op attention for one session's new row, in the dtype, as the engine runs it."""
    heads_of = lambda t: t.reshape(1, 1, -1, hd).transpose(0, 2, 1, 3)  # noqa: E731
    qr, kr = (mx.fast.rope(heads_of(t), hd, traditional=False, base=base, scale=1.0, offset=position) for t in (q, k))
    ak = mx.concatenate([keys_[:, :, :position], kr], axis=2)
    av = mx.concatenate([values[:, :, :position], heads_of(v)], axis=2)
    out = mx.fast.scaled_dot_product_attention(qr, ak, av, scale=hd ** -0.5)
    return out.transpose(0, 2, 1, 3).reshape(q.shape)


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
    for kk in keys(seed, copies):
        a, b, c = mx.random.split(kk, 3)
        w = mx.random.randint(0, 2 ** 31 - 1, (n, k // 8), key=a).astype(mx.uint32) * 2 + 1
        s = (mx.random.uniform(0.5, 1.5, (n, k // gs), key=b) * 0.002).astype(dtype)
        bb = (mx.random.normal((n, k // gs), key=c) * 0.01).astype(dtype)
        out.append((w, s, bb))
    mx.eval(out)
    return out


def layer_bytes(n: int, k: int, gs: int) -> int:
    return n * k // 2 + 2 * 2 * n * (k // gs)


def copies_for(nbytes: int) -> int:
    return max(2, min(64, math.ceil(400e6 / nbytes)))   # > 8x the 50-60 MB L2, at most 64 copies


def time_kernels(dname: str = "bf16", gs: int = 64) -> None:
    """GB/s of the big matvec at 1-16 rows (MLX, SIMT, tensor cores), the 7B step's kernels at 1/8/16 rows."""
    dtype = DTYPES[dname]
    print("card:", card(), flush=True)
    qm = lambda x, w, s, b: mx.quantized_matmul(x, w, s, b, transpose=True, group_size=gs, bits=4)  # noqa: E731
    rows = []

    def row(what, m, nb, times: dict):
        rows.append([what, m, f"{nb / 1e6:.1f}", *(f"{nb / t / 1e9:.0f}" if t else "-" for t in times.values()),
                     *(f"{t * 1e6:.1f}" if t else "-" for t in times.values())])
        log({"phase": "time", "what": what, "m": m, "dtype": dname, "gs": gs, "bytes": nb,
             **{f"{k}_s": t for k, t in times.items()}})
        print(rows[-1], flush=True)

    for n, k in ((18944, 3584), (3584, 18944), (152064, 3584), (4864, 896)):
        nb = layer_bytes(n, k, gs)
        layers = random_layers(n, k, gs, dtype, copies_for(nb), seed=n + k)
        n_iter = max(50, min(400, int(2e9 / nb)))
        for m in (ROWS if (n, k) == (18944, 3584) else (1, 8, 16)):
            args = [(mx.random.normal((1, m, k)).astype(dtype), *lay) for lay in layers]
            times = {"mlx": per_call(qm, args, n_iter),
                     "simt": per_call(lambda x, w, s, b: cuda_matvec.q4_matvec(x, w, s, b, gs, max_rows=8, min_weights=0,
                                                                              path="simt"), args, n_iter) if m <= 8 else None,
                     "mma": per_call(lambda x, w, s, b: cuda_matvec.q4_matvec(x, w, s, b, gs, min_weights=0, max_rows=16, path="mma"),
                                     args, n_iter)}
            row(f"matvec {n}x{k}", m, nb, times)
        del layers, args
    h, inter, heads, kv, hd, _, _ = MODELS["qwen2.5-7b"]
    norm = (mx.ones((h,), dtype), 1e-6)
    nb_sw = 2 * layer_bytes(inter, h, gs)
    gates, ups = (random_layers(inter, h, gs, dtype, copies_for(nb_sw), s) for s in (1, 2))
    nb_qkv = layer_bytes(heads * hd, h, gs) + 2 * layer_bytes(kv * hd, h, gs)
    c = copies_for(nb_qkv)
    qs, ks, vs = (random_layers(n_, h, gs, dtype, c, i) for i, n_ in ((3, heads * hd), (4, kv * hd), (5, kv * hd)))
    for m in (1, 8, 16):
        x = mx.random.normal((1, m, h)).astype(dtype)
        args = [(x, g, u) for g, u in zip(gates, ups)]
        unfused = lambda x, g, u: nn.silu(qm(mx.fast.rms_norm(x, norm[0], 1e-6), *g)) * qm(mx.fast.rms_norm(x, norm[0], 1e-6), *u)  # noqa: E731
        times = {"mlx": per_call(unfused, args, 100),
                 "simt": per_call(lambda x, g, u: cuda_swiglu.swiglu(x, *g, *u, gs, norm=norm, max_rows=8, path="simt"),
                                  args, 100) if m <= 8 else None,
                 "mma": per_call(lambda x, g, u: cuda_swiglu.swiglu(x, *g, *u, gs, norm=norm, max_rows=16, path="mma"), args, 100)}
        row("swiglu+norm 7b", m, nb_sw, times)
        args = [(x, a, b, d) for a, b, d in zip(qs, ks, vs)]
        times = {"mlx": per_call(lambda x, a, b, d: [qm(mx.fast.rms_norm(x, norm[0], 1e-6), *t) for t in (a, b, d)], args, 200),
                 "simt": per_call(lambda x, a, b, d: cuda_qkv.qkv(x, a, b, d, gs, norm=norm, max_rows=8, path="simt"),
                                  args, 200) if m <= 8 else None,
                 "mma": per_call(lambda x, a, b, d: cuda_qkv.qkv(x, a, b, d, gs, norm=norm, max_rows=16, path="mma"), args, 200)}
        row("qkv+norm 7b", m, nb_qkv, times)
    del gates, ups, qs, ks, vs
    w = [mx.random.normal((18944, 3584)).astype(mx.float16) for _ in range(3)]
    x = mx.random.normal((1, 3584)).astype(mx.float16)
    t = per_call(lambda x, w: x @ w.T, [(x, a) for a in w], 100)
    row("dense f16 matvec 18944x3584", 1, w[0].nbytes, {"mlx": t, "simt": None, "mma": None})
    a = mx.random.normal((256 * 2 ** 20,)).astype(mx.float16)
    t = per_call(lambda a: a + 1, [(a,)], 20)
    row("copy 512 MiB f16 (r+w)", "", 2 * a.nbytes, {"mlx": t, "simt": None, "mma": None})
    print(f"{dname}, group size {gs}; GB/s counts weight + scale + bias bytes; card: {card()}")
    print(table(rows, ["what", "rows", "MB", "mlx GB/s", "simt GB/s", "mma GB/s", "mlx us", "simt us", "mma us"]))


def sweep(dname: str = "bf16", gs: int = 64) -> None:
    """(nsplit, rowsets) of the tensor-core kernel on the large 7B shapes at 1 and 16 rows; launch_config's
    choice beside the three fastest."""
    dtype = DTYPES[dname]
    print("card:", card(), flush=True)
    rows = []
    for n, k in ((18944, 3584), (3584, 18944), (3584, 3584)):
        nb = layer_bytes(n, k, gs)
        layers = random_layers(n, k, gs, dtype, copies_for(nb), seed=7)
        for m in (1, 16):
            x = mx.random.normal((1, m, k)).astype(dtype)
            args = [(x, *lay) for lay in layers]
            results = []
            for nsplit in (1, 2, 4, 8):
                cfg = (nsplit, 8 // nsplit)
                if k // 128 < nsplit:
                    continue
                t = per_call(lambda x, w, s, b: cuda_matvec.q4_matvec(x, w, s, b, gs, config=cfg, min_weights=0,
                                                                      max_rows=16, path="mma"), args, 100, 3)
                results.append((t, cfg))
                log({"phase": "sweep", "n": n, "k": k, "m": m, "config": cfg, "s": t, "bytes": nb})
            default = cuda_mma.launch_config(-(-n // 16), k)
            t_default = next((t for t, c in results if c == default), NAN)
            for t, cfg in sorted(results)[:3]:
                rows.append([f"{n}x{k}", m, str(cfg), f"{t * 1e6:.1f}", f"{nb / t / 1e9:.0f}",
                             f"{default} {nb / t_default / 1e9:.0f}"])
        del layers, args
    print(table(rows, ["shape", "rows", "(nsplit, rowsets)", "us", "GB/s", "launch_config's GB/s"]))


def attention_time(dname: str = "bf16") -> None:
    """us per launch of the batched attention (7B heads) at 128-32k positions for 1 and 16 sessions,
    against MLX's op-by-op (mx.fast.rope + concatenate + sdpa) per session; GB/s counts the cache read."""
    dtype = DTYPES[dname]
    print("card:", card(), flush=True)
    _, _, heads, kv_heads, hd, _, _ = MODELS["qwen2.5-7b"]
    inv_freq = cuda_attention.rope_inverse_frequencies(hd, 1e6, 1.0, None)
    rows = []
    for sessions, n in ((1, 128), (1, 1024), (1, 8192), (1, 32767), (16, 128), (16, 4096), (16, 32767)):
        lengths = [n] * sessions
        caps = [n + 256] * sessions
        layers = 4   # caches of several layers rotated through, beyond L2
        cases = [cuda_check.sessions_case(dtype, hd, heads, kv_heads, lengths, caps, mx.random.key(i)) for i in range(layers)]
        pos = mx.array(lengths, mx.int32)
        ours = per_call(lambda q, k, v, caches: cuda_attention.attend_sessions(q, k, v, caches, pos, inv_freq, hd),
                        cases, 40, 3)
        mlx_t = per_call(lambda q, k, v, caches: [mlx_attention(q[:, b:b + 1], k[:, b:b + 1], v[:, b:b + 1], *caches[b],
                                                                n, hd) for b in range(sessions)], cases, 10, 3)
        nb = sessions * 2 * kv_heads * (n + 1) * hd * 2
        rows.append([sessions, n, f"{nb / 1e6:.1f}", f"{ours * 1e6:.1f}", f"{nb / ours / 1e9:.0f}",
                     f"{mlx_t * 1e6:.1f}", f"{mlx_t / ours:.1f}"])
        log({"phase": "attention", "sessions": sessions, "positions": n, "bytes": nb, "ours_s": ours, "mlx_s": mlx_t})
        print(rows[-1], flush=True)
        del cases
    print(f"attention, qwen2.5-7b heads (28/4, D=128), {dname}; card: {card()}")
    print(table(rows, ["sessions", "positions", "cache MB", "ours us", "ours GB/s", "mlx op-by-op us", "speed-up"]))


# ---------------------------------------------------------------- decode with the fused step

def model_path(shape: str, layers: int = 0) -> Path:
    from make_model import make_model
    path = Path(f"/tmp/models/{shape}" if not layers else f"/tmp/models/{shape}-{layers}l")
    if not (path / "config.json").exists():
        t0 = time.perf_counter()
        make_model(shape, path, layers=layers or None)
        print(f"made {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def decode_steps(stage) -> list:
    """A cuda_step.DecodeStep per layer of a loaded stage, built from its modules (as the decoder does)."""
    steps = []
    for layer in stage.layers:
        a, m = layer.self_attn, layer.mlp
        linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
        parts = [(lin.weight, lin.scales, lin.biases) for lin in linears]
        bias = tuple(lin.bias for lin in linears[:3]) if "bias" in a.q_proj else None
        inv_freq = cuda_attention.rope_inverse_frequencies(a.head_dim, a.rope_base, a.rope_scale, a._freqs)
        steps.append(cuda_step.DecodeStep(layer.input_layernorm, layer.post_attention_layernorm, layer.eps,
                                          *parts[:3], bias, *parts[3:], linears[0].group_size, a.head_dim, inv_freq,
                                          a.traditional))
    return steps


class Batch:
    """B sessions' KV caches (random content up to each session's length) for every layer of a stage."""

    def __init__(self, stage, lengths: list[int], room: int, dtype):
        cfg = stage.cfg
        kv, hd = cfg.num_key_value_heads, cfg.head_dim
        self.offsets = list(lengths)
        self.caches = []
        for _ in stage.layers:
            layer = []
            for n in lengths:
                cap = -(-(n + room) // 256) * 256
                layer.append(tuple(mx.random.normal((1, kv, cap, hd)).astype(dtype) for _ in range(2)))
            mx.eval(layer)
            self.caches.append(layer)

    def arrays(self) -> list:
        return [a for layer in self.caches for kv in layer for a in kv]


def forward(stage, steps, ids, positions, caches, after):
    """One token for each session: ids (1, B) -> next greedy ids (1, B), through the fused steps."""
    h = stage.embed_tokens.rows(ids)
    for step, layer_caches in zip(steps, caches):
        h = step.batch(h, layer_caches, positions, after)
    logits = stage.lm_head(mx.fast.rms_norm(h, stage.norm, stage.cfg.rms_norm_eps))
    return mx.argmax(logits, axis=-1).astype(mx.int32)


def run_steps(stage, steps, batch: Batch, n_steps: int, compiled=None) -> tuple[float, float]:
    """(host s, wall s) per step over n_steps queued steps (async_eval, no waiting), after two warm-up steps."""
    B = len(batch.offsets)
    ids = mx.array([[1000 + b for b in range(B)]], mx.int32)
    layers = len(batch.caches)
    flat = batch.arrays()

    def one(ids, i):
        pos = cuda_step.positions([o + i for o in batch.offsets])
        if compiled is not None:
            return compiled(ids, pos, *flat)
        return forward(stage, steps, ids, pos, batch.caches, ids)
    for i in range(2):
        ids = one(ids, i)
        mx.eval(ids)
    mx.synchronize()
    host, t0 = 0.0, time.perf_counter()
    for i in range(2, 2 + n_steps):
        t1 = time.perf_counter()
        ids = one(ids, i)
        mx.async_eval(ids)
        host += time.perf_counter() - t1
    mx.eval(ids)
    mx.synchronize()
    wall = time.perf_counter() - t0
    batch.offsets = [o + 2 + n_steps for o in batch.offsets]
    del layers
    return host / n_steps, wall / n_steps


def compiled_forward(stage, steps, layers: int, B: int):
    """mx.compile of one token's step, the caches passed as inputs (they are written in place)."""
    def fn(ids, positions, *flat):
        caches = [[(flat[(i * B + b) * 2], flat[(i * B + b) * 2 + 1]) for b in range(B)] for i in range(layers)]
        return forward(stage, steps, ids, positions, caches, ids)
    return mx.compile(fn)


def mlxlm_tps(path: Path, runs: int = 3, tokens: int = 128) -> list[float]:
    """mlx-lm's decode tok/s on a checkpoint, greedy, `tokens` after a 32-token prompt, `runs` times."""
    from mlx_lm import load as lm_load
    from mlx_lm import stream_generate
    model, tok = lm_load(str(path))
    tps = []
    for _ in range(runs):
        last = None
        for last in stream_generate(model, tok, list(range(1000, 1032)), max_tokens=tokens):
            pass
        tps.append(last.generation_tps)
    return tps


def steps_phase(shape: str = "qwen2.5-7b", n_steps: int = 48) -> None:
    """Decode tok/s with the fused step for B sessions (aggregate and per stream), at 128 and 32k positions,
    host and wall time per step, mx.compile beside it; mlx-lm's single-stream tok/s on the same checkpoint."""
    from swarm.model.decoder import load_stage
    print("card:", card(), flush=True)
    r = cuda_check.report()
    print("kernels:", {f: k["passed"] for f, k in r["kernels"].items()}, flush=True)
    path = model_path(shape)
    stage = load_stage(path)
    dtype = stage.dtype
    steps = decode_steps(stage)
    rows = []

    def record(label, B, ctx, host, wall):
        rows.append([label, B, ctx, f"{B / wall:.1f}", f"{1 / wall:.1f}", f"{host * 1e6:.0f}", f"{wall * 1e6:.0f}"])
        log({"phase": "steps", "shape": shape, "variant": label, "sessions": B, "positions": ctx, "host_s": host,
             "wall_s": wall, "tok_s": B / wall})
        print(rows[-1], flush=True)

    for B, ctx in ((1, 128), (1, 32768), (2, 128), (4, 128), (8, 128), (16, 128), (16, 4096)):
        batch = Batch(stage, [ctx + b for b in range(B)], 4 * (n_steps + 2), dtype)   # room for four runs
        for _ in range(2):
            host, wall = run_steps(stage, steps, batch, n_steps)
        record("fused step", B, ctx, host, wall)
        if B in (1, 16) and ctx == 128:
            try:
                fn = compiled_forward(stage, steps, len(stage.layers), B)
                for _ in range(2):
                    host, wall = run_steps(stage, steps, batch, n_steps, compiled=fn)
                record("fused step, mx.compile", B, ctx, host, wall)
            except Exception as e:  # what MLX does not allow is a finding too
                rows.append(["mx.compile", B, ctx, "-", "-", "-", f"{type(e).__name__}: {e}"[:80]])
                print(rows[-1], flush=True)
        del batch
    del stage, steps
    try:
        tps = mlxlm_tps(path)
        rows.append(["mlx-lm 0.32.2", 1, 160, f"{statistics.median(tps[1:]):.1f}", "", "", ""])
        log({"phase": "steps", "shape": shape, "variant": "mlx-lm", "tps": tps})
    except Exception as e:  # the engine's numbers still count without the reference
        rows.append(["mlx-lm", 1, "", "-", "", "", f"{type(e).__name__}: {e}"[:60]])
    print(f"decode with the fused step, {shape} shape ({dtype}), {n_steps} queued steps after warm-up, greedy; "
          f"card: {card()}")
    print(table(rows, ["variant", "sessions", "positions", "tok/s", "tok/s a stream", "host us/step", "wall us/step"]))


def goals(shape: str = "qwen2.5-7b", n_steps: int = 48) -> None:
    """The issue's goals in one process (the self-check's kernels compile once): the families the step uses
    checked; the 18944x3584 matvec at 1, 4 and 16 rows (MLX, SIMT, tensor cores with and without the
    scales fetched a stage ahead), each output checked; decode with the fused step at 1 and 16 sessions,
    128 and 32k positions; mlx-lm's single stream on the same checkpoint."""
    from swarm.model.decoder import load_stage
    print("card:", card(), flush=True)
    t0 = time.perf_counter()
    cuda_check.ensure_checked(("mma", "simt", "attention"))
    r = cuda_check.report()
    print(f"self-check {time.perf_counter() - t0:.0f} s:", {f: (k["passed"], k["worst_error"], k["reason"][:200])
                                                           for f, k in r["kernels"].items()}, flush=True)
    rows, gs, dtype = [], 64, mx.bfloat16
    n, k = 18944, 3584
    nb = layer_bytes(n, k, gs)
    layers = random_layers(n, k, gs, dtype, copies_for(nb), seed=3)
    variants = {"mlx": lambda x, w, s, b: mx.quantized_matmul(x, w, s, b, transpose=True, group_size=gs, bits=4),
                "simt": lambda x, w, s, b: cuda_matvec.q4_matvec(x, w, s, b, gs, max_rows=8, min_weights=0, path="simt"),
                "mma": lambda x, w, s, b: cuda_matvec.q4_matvec(x, w, s, b, gs, min_weights=0, max_rows=16, path="mma"),
                "mma, scales not ahead": lambda x, w, s, b: cuda_matvec.q4_matvec(
                    x, w, s, b, gs, min_weights=0, max_rows=16, path="mma",
                    config=(*cuda_mma.launch_config(-(-n // 16), k), False))}
    for m in (1, 4, 16):
        args = [(mx.random.normal((1, m, k)).astype(dtype), *lay) for lay in layers]
        for name, fn in variants.items():
            if name == "simt" and m > 8:
                continue
            err = rel_err(fn(*args[0]), reference(args[0][0], args[0][1:], gs))
            t = per_call(fn, args, 60)
            rows.append([f"matvec {n}x{k} {name}", m, f"{nb / t / 1e9:.0f}", f"{t * 1e6:.1f}", f"{err:.1e}"])
            log({"phase": "goals", "what": f"matvec {name}", "m": m, "s": t, "bytes": nb, "err": err})
            print(rows[-1], flush=True)
    del layers, args
    path = model_path(shape)
    stage = load_stage(path)
    steps = decode_steps(stage)
    for B, ctx in ((1, 128), (1, 32768), (16, 128)):
        batch = Batch(stage, [ctx + b for b in range(B)], 4 * (n_steps + 2), stage.dtype)
        for _ in range(2):
            host, wall = run_steps(stage, steps, batch, n_steps)
        rows.append([f"decode {shape}, fused step, {ctx} positions", B, f"{B / wall:.1f} tok/s",
                     f"host {host * 1e6:.0f} us", f"wall {wall * 1e6:.0f} us"])
        log({"phase": "goals", "what": "decode", "sessions": B, "positions": ctx, "host_s": host, "wall_s": wall})
        print(rows[-1], flush=True)
        del batch
    del stage, steps
    try:
        tps = mlxlm_tps(path)
        rows.append([f"decode {shape}, mlx-lm 0.32.2", 1, f"{statistics.median(tps[1:]):.1f} tok/s", "", ""])
        log({"phase": "goals", "what": "mlx-lm", "tps": tps})
    except Exception as e:  # the engine's numbers still count without the reference
        rows.append(["mlx-lm", 1, "-", "", f"{type(e).__name__}: {e}"[:60]])
    print(f"goals, card: {card()}")
    print(table(rows, ["what", "rows/sessions", "GB/s or tok/s", "us / host", "err / wall"]))


# ---------------------------------------------------------------- through the engine's Stage

def pipeline(shape: str = "qwen2.5-7b", steps: int = 64) -> None:
    """Host against GPU time per decode step through the engine's Stage (as shipped): `steps` steps of known
    tokens queued with async_eval without waiting (wall = the slower of host and GPU) and one at a time."""
    from swarm.model.decoder import load_stage
    from swarm.model.generate import prefill

    stage = load_stage(model_path(shape))
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
                     "wall_us": wall / steps * 1e6})
    print(f"us per decode step through the engine's Stage ({steps} steps); card: {card()}")
    print(table(rows, ["model", "mode", "host us", "wall us"]))


def decode(shapes=("qwen2.5-0.5b", "qwen2.5-7b"), tokens: int = 128) -> None:
    """tok/s of mlx-lm and of the engine (MLX's kernels; ours, as shipped), interleaved."""
    from swarm.model.decoder import load_stage
    from swarm.model.generate import Timings, generate_ids
    from swarm.model.sampling import SamplingParams
    from kernels import cuda_common

    print("card:", card(), flush=True)
    enabled = cuda_check.enabled()
    saved = dict(cuda_common.passed)
    rows = []
    prompt = list(range(1000, 1032))
    for shape in shapes:
        path = model_path(shape)
        try:
            from mlx_lm import load as lm_load
            from mlx_lm import stream_generate
            model, tok = lm_load(str(path))
            tps = []
            for _ in range(4):
                last = None
                for last in stream_generate(model, tok, prompt, max_tokens=tokens):
                    pass
                tps.append(last.generation_tps)
            rows.append([shape, "mlx-lm 0.32.2", f"{statistics.median(tps[1:]):.1f}", f"max {max(tps):.1f}"])
            log({"phase": "decode", "shape": shape, "variant": "mlx-lm", "tps": tps})
            del model
        except Exception as e:
            rows.append([shape, "mlx-lm", "-", f"{type(e).__name__}: {e}"[:60]])
        for name in ["engine"] + (["engine+kernels"] if enabled else []):
            cuda_common.passed.update({k: False for k in saved} if name == "engine" else saved)
            cuda_common._plans.clear()
            try:
                stage = load_stage(path)
                tps = []
                for _ in range(4):
                    t = Timings()
                    list(generate_ids(stage, prompt, SamplingParams(temperature=0.0, max_tokens=tokens), timings=t))
                    tps.append(t.decode_tps)
                rows.append([shape, name, f"{statistics.median(tps[1:]):.1f}", f"max {max(tps):.1f}"])
                log({"phase": "decode", "shape": shape, "variant": name, "tps": tps})
                del stage
            except Exception as e:  # one variant failing leaves the others' figures
                rows.append([shape, name, "-", f"{type(e).__name__}: {e}"[:80]])
        cuda_common.passed.update(saved)
    print(f"decode tok/s (median of runs 2-4), greedy, {tokens} tokens after a 32-token prompt; card: {card()}")
    print(table(rows, ["model", "variant", "tok/s", "note"]))


def overhead(n_ops: int = 200, rounds: int = 10) -> None:
    """Host time per op: chains of n_ops ops, built (Python), handed to the GPU (mx.async_eval) and finished
    (mx.eval), in us per op; MLX's own ops beside custom kernels."""
    print("card:", card(), flush=True)
    dt, gs = mx.bfloat16, 64
    x = mx.random.normal((1, 1, 896)).astype(dt)
    layer = random_q4(896, 896, gs, dt)
    cases = {
        "mx.add": lambda h: h + x,
        "mx.fast.rms_norm": lambda h: mx.fast.rms_norm(h, x[0, 0], 1e-6),
        "mx.quantized_matmul 896x896": lambda h: mx.quantized_matmul(h, *layer, transpose=True, group_size=gs, bits=4),
        "q4_matvec simt 896x896": lambda h: cuda_matvec.q4_matvec(h, *layer, gs, min_weights=0, path="simt"),
        "q4_matvec mma 896x896": lambda h: cuda_matvec.q4_matvec(h, *layer, gs, min_weights=0, max_rows=16, path="mma"),
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
             "total_us": total * per})
    print(f"host us per op, chains of {n_ops} ops; card: {card()}")
    print(table(rows, ["op", "build", "async_eval", "total"]))


PHASES = {"report": lambda a: report(), "goals": lambda a: goals(*a[:1]), "check": lambda a: check(tuple(a) or ("bf16",)),
          "time": lambda a: time_kernels(*a[:1]), "attention": lambda a: attention_time(*a[:1]),
          "sweep": lambda a: sweep(*a[:1]), "steps": lambda a: steps_phase(*a[:1]), "pipeline": lambda a: pipeline(*a[:1]),
          "decode": lambda a: decode(tuple(a) or ("qwen2.5-0.5b", "qwen2.5-7b")), "overhead": lambda a: overhead()}

if __name__ == "__main__":
    phase = sys.argv[1] if len(sys.argv) > 1 else "check"
    if phase not in PHASES:
        sys.exit(f"unknown phase {phase!r}; phases: {', '.join(PHASES)}")
    result = PHASES[phase](sys.argv[2:])
    sys.exit(0 if result is not False else 1)
