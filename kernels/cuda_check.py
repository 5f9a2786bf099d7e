"""The start-up self-check of the CUDA kernels, and the references it and the tests compare against.

Each kernel family runs once on fresh random inputs, outputs poisoned with NaN, against MLX's own ops in
float32 (mx.quantized_matmul, mx.fast.rms_norm's formula, RoPE at float32 angles and
mx.fast.scaled_dot_product_attention, mx.dequantize): "simt" and "mma" (the q4 products), "attention" (the
batched flash-decoding kernel), "attention_serial" (the single-session one), "embed". A family that fails
or does not build stays off and its callers keep MLX's kernels (or the other family). The outcome is
logged on the "kernels.cuda" logger and kept for `report()` (the dashboard) and `check_report()`.
"""

from __future__ import annotations

import logging
import math
import time

import mlx.core as mx

from kernels import cuda_attention, cuda_embed, cuda_matvec, cuda_qkv, cuda_swiglu
from kernels import cuda_common as common
from kernels.cuda_common import TOLERANCE, on_cuda

log = logging.getLogger("kernels.cuda")
FAMILIES = ("mma", "simt", "attention", "attention_serial", "embed")
NAN = float("nan")

_results: dict[str, dict] = {}   # family -> {"passed", "worst_error", "reason", "lines"}
_ran = False


# ---------------------------------------------------------------- references

def random_q4(n: int, k: int, group_size: int, dtype, key=None) -> tuple[mx.array, mx.array, mx.array]:
    """A random 4-bit layer [n, k] as mx.quantize writes it, with scales/biases in dtype."""
    w = mx.random.normal((n, k), key=key) * 0.02
    q, s, b = mx.quantize(w, group_size=group_size, bits=4)
    return q, s.astype(dtype), b.astype(dtype)


def reference(x: mx.array, layer: tuple, group_size: int, dtype=None) -> mx.array:
    """mx.quantized_matmul in float32 on upcast inputs, rounded to dtype (x's by default): what an exact
    kernel returns."""
    w, s, b = layer
    f32 = mx.float32
    y = mx.quantized_matmul(x.astype(f32), w, s.astype(f32), b.astype(f32), transpose=True,
                            group_size=group_size, bits=4)
    return y.astype(dtype or x.dtype)


def rel_err(out: mx.array, ref: mx.array) -> float:
    """||out - ref|| / ||ref|| in float32; NaN (an unwritten, poisoned output) gives inf."""
    o, r = out.astype(mx.float32), ref.astype(mx.float32)
    err = (mx.linalg.norm((o - r).reshape(-1)) / mx.linalg.norm(r.reshape(-1))).item()
    return err if math.isfinite(err) else math.inf


def norm_reference(x: mx.array, norm: tuple) -> mx.array:
    """rms_norm(x) in float32 (not rounded: the kernels fold the norm into their float32 sums)."""
    w, eps = norm
    x32 = x.astype(mx.float32)
    return x32 * mx.rsqrt(mx.mean(x32 * x32, axis=-1, keepdims=True) + eps) * w.astype(mx.float32)


def swiglu_reference(x: mx.array, gate: tuple, up: tuple, gs: int, dtype=None) -> mx.array:
    """silu(g) * u in float32 from the two reference products (each rounded to dtype, x's by default, as
    the kernel rounds them), rounded once more at the end."""
    dt = dtype or x.dtype
    g, u = (reference(x, t, gs, dt).astype(mx.float32) for t in (gate, up))
    return (g * mx.sigmoid(g) * u).astype(dt)


def rope_reference(t: mx.array, position: int, inv_freq: mx.array, traditional: bool) -> mx.array:
    """RoPE of t (..., D) at one position in float32 MLX ops, angle position * inv_freq[i] as a float32
    product (as mx.fast.rope takes it), rounded to t's dtype."""
    D = t.shape[-1]
    angle = mx.array(position, mx.float32) * inv_freq
    cos, sin = mx.cos(angle), mx.sin(angle)
    x = t.astype(mx.float32)
    if traditional:
        a, b = x[..., 0::2], x[..., 1::2]
        out = mx.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape)
    else:
        a, b = x[..., :D // 2], x[..., D // 2:]
        out = mx.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.astype(t.dtype)


def attend_reference(q, k, v, keys, values, position: int, inv_freq, head_dim: int, traditional: bool) -> tuple:
    """(out, roped k, v) of one session's new position: RoPE (rope_reference) and
    mx.fast.scaled_dot_product_attention in float32 over the cache's [0, position) and the new k, v."""
    B, D, dt, f32 = q.shape[0], head_dim, q.dtype, mx.float32

    def heads(t):  # (B, 1, n * D) -> (B, n, 1, D)
        return t.reshape(B, 1, -1, D).transpose(0, 2, 1, 3)
    qr, kr, vv = rope_reference(heads(q), position, inv_freq, traditional), \
        rope_reference(heads(k), position, inv_freq, traditional), heads(v)
    all_k = mx.concatenate([keys[:, :, :position], kr], axis=2).astype(f32)
    all_v = mx.concatenate([values[:, :, :position], vv], axis=2).astype(f32)
    out = mx.fast.scaled_dot_product_attention(qr.astype(f32), all_k, all_v, scale=D ** -0.5)
    return out.transpose(0, 2, 1, 3).reshape(q.shape).astype(dt), kr, vv


def sessions_case(dtype, D: int, heads: int, kv_heads: int, lengths: list[int], capacities: list[int], key):
    """Random q, k, v rows (1, B, .) and caches (1, KV, capacity, D) for sessions at the given positions."""
    B = len(lengths)
    ks = mx.random.split(key, 3 + 2 * B)
    q = mx.random.normal((1, B, heads * D), key=ks[0]).astype(dtype)
    k, v = (mx.random.normal((1, B, kv_heads * D), key=kk).astype(dtype) for kk in ks[1:3])
    caches = [tuple(mx.random.normal((1, kv_heads, cap, D), key=kk).astype(dtype) * scale
                    for kk, scale in zip(ks[3 + 2 * i:5 + 2 * i], (1.0, 2.0))) for i, cap in enumerate(capacities)]
    mx.eval(q, k, v, caches)
    return q, k, v, caches


def sessions_references(q, k, v, caches, lengths, inv_freq, D, traditional) -> list[tuple]:
    """attend_reference of each session's row, evaluated (before a kernel writes the caches)."""
    refs = []
    for b, ((keys, values), pos) in enumerate(zip(caches, lengths)):
        refs.append(attend_reference(q[:, b:b + 1].reshape(1, 1, -1), k[:, b:b + 1].reshape(1, 1, -1),
                                     v[:, b:b + 1].reshape(1, 1, -1), keys, values, pos, inv_freq, D, traditional))
    mx.eval(refs)
    return refs


def sessions_errors(out, caches, lengths, refs) -> list[tuple[str, float]]:
    """(what, rel err) of a batched attention's output rows and of the k, v it wrote into each cache."""
    errors = []
    for b, ((keys, values), pos, (ro, rk, rv)) in enumerate(zip(caches, lengths, refs)):
        errors.append((f"out[{b}] pos={pos}", rel_err(out[:, b:b + 1].reshape(ro.shape), ro)))
        errors.append((f"k[{b}]", rel_err(keys[:, :, pos:pos + 1], rk)))
        errors.append((f"v[{b}]", rel_err(values[:, :, pos:pos + 1], rv)))
    return errors


# ---------------------------------------------------------------- the checks

def _q4_case(dtype, gs: int, m: int, key, n: int = 320, k: int = 1024, nkv: int = 64) -> dict:
    keys = mx.random.split(key, 8)
    x = mx.random.normal((m, k), key=keys[0]).astype(dtype)
    a, c = random_q4(n, k, gs, dtype, keys[1]), random_q4(n, k, gs, dtype, keys[2])
    kl, vl = random_q4(nkv, k, gs, dtype, keys[3]), random_q4(nkv, k, gs, dtype, keys[4])
    lbs = tuple(mx.random.normal((d,), key=kk).astype(dtype) for d, kk in zip((n, nkv, nkv), mx.random.split(keys[5], 3)))
    norm = ((1.0 + 0.1 * mx.random.normal((k,), key=keys[6])).astype(dtype), 1e-5)
    res = mx.random.normal((m, n), key=keys[7]).astype(dtype)
    return {"x": x, "a": a, "c": c, "kl": kl, "vl": vl, "lbs": lbs, "norm": norm, "res": res}


def q4_checks(path: str, dtype, gs: int, m: int, key) -> list[tuple[str, float]]:
    """(what, rel err) of every q4 kernel kind of one path ("simt" or "mma") on one random case."""
    t = _q4_case(dtype, gs, m, key)
    x, a, c, norm = t["x"], t["a"], t["c"], t["norm"]
    xn = norm_reference(x, norm)
    rows = 16
    got = {
        "matvec": (cuda_matvec.q4_matvec(x, *a, gs, init_value=NAN, max_rows=rows, min_weights=0, path=path),
                   reference(x, a, gs)),
        "matvec+norm": (cuda_matvec.q4_matvec(x, *a, gs, norm=norm, init_value=NAN, max_rows=rows, min_weights=0,
                                              path=path), reference(xn, a, gs, dtype)),
        "matvec+residual": (cuda_matvec.q4_matvec(x, *a, gs, residual=t["res"], init_value=NAN, max_rows=rows,
                                                  min_weights=0, path=path), reference(x, a, gs) + t["res"]),
        "swiglu": (cuda_swiglu.swiglu(x, *a, *c, gs, init_value=NAN, max_rows=rows, path=path),
                   swiglu_reference(x, a, c, gs)),
        "swiglu+norm": (cuda_swiglu.swiglu(x, *a, *c, gs, norm=norm, init_value=NAN, max_rows=rows, path=path),
                        swiglu_reference(xn, a, c, gs, dtype)),
    }
    for label, nrm, x_ref, lbs in (("qkv", None, x, None), ("qkv+bias+norm", norm, xn, t["lbs"])):
        outs = cuda_qkv.qkv(x, a, t["kl"], t["vl"], gs, lbs, norm=nrm, init_value=NAN, max_rows=rows, path=path)
        for j, name in enumerate("qkv"):
            ref = reference(x_ref, (a, t["kl"], t["vl"])[j], gs, dtype)
            got[f"{label}.{name}"] = (None if outs is None else outs[j], ref if lbs is None else ref + lbs[j])
    lines = []
    for name, (out, ref) in got.items():
        if out is None:
            raise RuntimeError(f"{name}: no kernel took {dtype} gs={gs} rows={m}")
        lines.append((f"{name} {dtype} gs={gs} rows={m}", rel_err(out, ref)))
    return lines


def attention_checks(seed: int = 0) -> list[tuple[str, float]]:
    """The batched kernel on sessions of different lengths and capacities (several splits each), GQA groups
    of 1-7 heads, head_dim 64 and 128, both RoPE layouts."""
    lines = []
    cases = [(mx.bfloat16, 128, 14, 2, [700, 0, 37], [768, 256, 512], False),
             (mx.float16, 64, 4, 4, [5], [256], True),
             (mx.float16, 128, 8, 8, [300, 1999], [512, 2048], False)]
    for i, (dtype, D, heads, kv_heads, lengths, capacities, trad) in enumerate(cases):
        q, k, v, caches = sessions_case(dtype, D, heads, kv_heads, lengths, capacities, mx.random.key(seed + 100 + i))
        inv_freq = cuda_attention.rope_inverse_frequencies(D, 10000.0 + 1000 * i, 1.0, None)
        refs = sessions_references(q, k, v, caches, lengths, inv_freq, D, trad)
        out = cuda_attention.attend_sessions(q, k, v, caches, mx.array(lengths, mx.int32), inv_freq, D, trad,
                                             init_value=NAN)
        if out is None:
            raise RuntimeError(f"attend_sessions declined case {i}")
        mx.eval(out)
        lines += [(f"{what} {dtype} D={D} heads={heads}/{kv_heads}", e)
                  for what, e in sessions_errors(out, caches, lengths, refs)]
    return lines


def serial_checks(seed: int = 0) -> list[tuple[str, float]]:
    lines = []
    for i, (dtype, D, heads, kv_heads, batch, position, trad) in enumerate(
            [(mx.bfloat16, 128, 4, 2, 1, 300, False), (mx.float16, 64, 3, 1, 2, 0, True)]):
        ks = mx.random.split(mx.random.key(seed + 200 + i), 5)
        q = mx.random.normal((batch, 1, heads * D), key=ks[0]).astype(dtype)
        k, v = (mx.random.normal((batch, 1, kv_heads * D), key=kk).astype(dtype) for kk in ks[1:3])
        keys, values = (mx.random.normal((batch, kv_heads, 512, D), key=kk).astype(dtype) for kk in ks[3:5])
        inv_freq = cuda_attention.rope_inverse_frequencies(D, 10000.0, 1.0, None)
        mx.eval(keys, values)
        refs = attend_reference(q, k, v, keys, values, position, inv_freq, D, trad)
        mx.eval(refs)
        out = cuda_attention.attend(q, k, v, keys, values, mx.array([position], mx.int32), inv_freq, D, trad,
                                    init_value=NAN)
        mx.eval(out)
        got = (out, keys[:, :, position:position + 1], values[:, :, position:position + 1])
        lines += [(f"attend.{name} {dtype} D={D} B={batch} pos={position}", rel_err(o, r))
                  for name, o, r in zip(("out", "k", "v"), got, refs)]
    return lines


def embed_checks(seed: int = 0) -> list[tuple[str, float]]:
    lines = []
    for dtype, gs, ids_dtype in ((mx.bfloat16, 64, mx.uint32), (mx.float16, 32, mx.int32)):
        table = random_q4(1000, 256, gs, dtype, mx.random.key(seed + 7))
        ids = mx.array([[0, 999, 17], [5, 5, 640]], dtype=ids_dtype)
        got = cuda_embed.embed_rows(ids, *table, gs, init_value=NAN, unchecked=True)
        lines.append((f"embed {dtype} gs={gs} ids {ids_dtype}",
                      rel_err(got, mx.dequantize(*(t[ids] for t in table), group_size=gs, bits=4))))
    return lines


def family_checks(family: str, seed: int = 0) -> list[tuple[str, float]]:
    """(what, rel err) of one family's checks; raises where a kernel does not build or declines."""
    key = mx.random.key(seed)
    # Two cases a path: every kernel costs MLX about 2 s of NVRTC at start (2026-12-05, H100), not kept
    # across processes.
    if family == "mma":
        return [e for i, (dt, gs, m) in enumerate([(mx.float16, 64, 3), (mx.bfloat16, 32, 16)])
                for e in q4_checks("mma", dt, gs, m, mx.random.split(key, 2)[i])]
    if family == "simt":
        return [e for i, (dt, gs, m) in enumerate([(mx.float16, 128, 1), (mx.bfloat16, 32, 7)])
                for e in q4_checks("simt", dt, gs, m, mx.random.split(key, 2)[i])]
    if family == "attention":
        return attention_checks(seed)
    if family == "attention_serial":
        return serial_checks(seed)
    return embed_checks(seed)


def run_family(family: str, seed: int = 0) -> dict:
    """Checks one family, records and logs the outcome, and switches it on or off."""
    t0 = time.perf_counter()
    try:
        try:
            lines = family_checks(family, seed)
        except Exception:  # a JIT compiler that cannot read the included file: sources inline
            if not common.include_headers:
                raise
            common.include_headers = False
            common._kernels.clear()
            common._plans.clear()
            lines = family_checks(family, seed)
        worst = max(e for _, e in lines)
        ok = worst < TOLERANCE
        bad = [f"{what}: {e:.2e}" for what, e in lines if not e < TOLERANCE]
        result = {"passed": ok, "worst_error": worst, "reason": "" if ok else f"error over {TOLERANCE}: " + "; ".join(bad[:4]),
                  "lines": [f"{what}: rel err {e:.2e}" for what, e in lines]}
    except Exception as e:  # a kernel that does not build or launch leaves MLX's own in place
        result = {"passed": False, "worst_error": None, "reason": f"{type(e).__name__}: {e}"[:500], "lines": []}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    _results[family] = result
    common.passed[family] = result["passed"]
    common._plans.clear()   # plans made before the outcome may have chosen another path
    if result["passed"]:
        log.info("CUDA kernels %s: self-check passed (worst rel err %.1e, %.1f s)", family, result["worst_error"],
                 result["seconds"])
    else:
        log.warning("CUDA kernels %s: off, self-check failed: %s", family, result["reason"])
    return result


def ensure_checked(families: tuple[str, ...] = FAMILIES) -> None:
    """Runs the self-check of every family once, on MLX's CUDA back-end only (`families`: only these, the
    others staying off)."""
    global _ran
    if _ran:
        return
    _ran = True
    if not on_cuda():
        return
    for family in families:
        run_family(family)


def enabled() -> bool:
    """True on MLX's CUDA back-end once the q4 products passed their self-check (tensor-core or SIMT)."""
    ensure_checked()
    return bool(common.passed.get("mma") or common.passed.get("simt"))


def report() -> dict:
    """Which kernels this process runs and why, for the log and the dashboard: {"path": "cuda-fused" or
    "mlx", "reason": ..., "kernels": {family: {"passed", "worst_error", "reason", "seconds"}}}."""
    if not on_cuda():
        return {"path": "mlx", "reason": "not on MLX's CUDA back-end", "kernels": {}}
    ensure_checked()
    kernels = {f: {k: v for k, v in r.items() if k != "lines"} for f, r in _results.items()}
    on = enabled()
    step = on and bool(common.passed.get("attention") or common.passed.get("attention_serial"))
    reason = ("fused one-token step" if step else "fused linears; decode step off (attention failed its check)") if on \
        else "the q4 kernels failed their self-check: " + "; ".join(r["reason"] for f, r in _results.items()
                                                                     if f in ("mma", "simt"))
    return {"path": "cuda-fused" if on else "mlx", "reason": reason, "kernels": kernels}


def check_report() -> str:
    """What the self-check measured, one line a check (empty where none ran)."""
    return "\n".join(f"[{f}] {'passed' if r['passed'] else 'FAILED: ' + r['reason']}\n" + "\n".join(r["lines"])
                     for f, r in _results.items())
