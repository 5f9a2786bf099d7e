"""The CPU kernels against MLX's own ops: quantized and dense linears against mx.quantized_matmul and a
float64 product, RMS-norm, RoPE, attention and SwiGLU against mx.fast and mlx.nn; a row's result the same
whatever rows share its call; zero-copy views of MLX's buffers; the self-check's fallback; and a correct
kernel for a CPU without AVX-512 (numba told to compile for Haswell, in a process of its own)."""

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

pytest.importorskip("numba")

from kernels import cpu_block, cpu_matmul, cpu_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 2e-6  # max |ours - MLX| / max |MLX|: float32 sums in another order


def quantized(rng, out_dim, in_dim, group_size, bits):
    w = mx.array(rng.standard_normal((out_dim, in_dim), np.float32) * in_dim ** -0.5)
    q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    mx.eval(q, s, b)
    return q, s, b


def relative_error(y, ref):
    return float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))


def sum_error(y, ref, x, w):
    """max |ours - MLX| over each output's sum of |x_i w_i|: float32 sums in another order are off by a
    few ulps of that sum, which a lone output near 0 makes large against the output itself."""
    return float(np.max(np.abs(y - ref) / (np.abs(x) @ np.abs(w).T + 1e-30)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.sampled_from(cpu_matmul.BITS), group_size=st.sampled_from(cpu_matmul.GROUP_SIZES),
       out_dim=st.integers(1, 70), groups=st.integers(1, 4), rows=st.integers(1, 20), seed=st.integers(0, 2 ** 16))
def test_quantized_matches_mlx(bits, group_size, out_dim, groups, rows, seed):
    rng = np.random.default_rng(seed)
    in_dim = group_size * groups
    q, s, b = quantized(rng, out_dim, in_dim, group_size, bits)
    plan = cpu_matmul.quantized_plan(np.asarray(q), np.asarray(s), np.asarray(b), group_size, bits)
    x = mx.array(rng.standard_normal((rows, in_dim), np.float32))
    ref = np.asarray(mx.quantized_matmul(x, q, s, b, transpose=True, group_size=group_size, bits=bits))
    w = np.asarray(mx.dequantize(q, s, b, group_size=group_size, bits=bits))
    assert sum_error(plan(np.asarray(x), 2), ref, np.asarray(x), w) <= TOLERANCE


@pytest.mark.parametrize("half, kept_as", [("bfloat16", np.uint16), ("float16", np.int16)])
@pytest.mark.parametrize("bits", [4, 3])
def test_scales_saved_in_half_precision_are_read_in_16_bits(half, kept_as, bits):
    """Scales and biases a checkpoint saved in 16 bits (widened to float32 by the stage) stay 16-bit in the
    plan, and every driver reads them as the float32 values MLX multiplies with."""
    rng = np.random.default_rng(bits)
    w = mx.array(rng.standard_normal((70, 256), np.float32) * 0.06)
    q, s, b = mx.quantize(w, group_size=64, bits=bits)
    s, b = (a.astype(getattr(mx, half)).astype(mx.float32) for a in (s, b))
    plan = cpu_matmul.quantized_plan(np.asarray(q), np.asarray(s), np.asarray(b), 64, bits)
    assert plan.scales.dtype == kept_as and plan.biases.dtype == kept_as
    wd = np.asarray(mx.dequantize(q, s, b, group_size=64, bits=bits))
    for rows in (1, 3, 9):  # the fused driver, its 2-row tile, the tiled driver
        x = mx.array(rng.standard_normal((rows, 256), np.float32))
        ref = np.asarray(mx.quantized_matmul(x, q, s, b, transpose=True, group_size=64, bits=bits))
        assert sum_error(plan(np.asarray(x), 2), ref, np.asarray(x), wd) <= TOLERANCE
        assert sum_error(plan.on_blas(np.asarray(x), 2), ref, np.asarray(x), wd) <= TOLERANCE


@pytest.mark.parametrize("bits", [4, 6, 32])
def test_prompt_chunks_on_blas_match_mlx(bits):
    """Plan.on_blas (weights dequantized a block at a time, numpy's BLAS) for a prompt chunk's rows."""
    rng = np.random.default_rng(bits)
    out_dim, in_dim, rows = 1100, 192, 70   # 1100: two dequantized blocks and a part of one
    w = mx.array(rng.standard_normal((out_dim, in_dim), np.float32) * in_dim ** -0.5)
    x = mx.array(rng.standard_normal((rows, in_dim), np.float32))
    if bits == 32:
        plan, ref = cpu_matmul.dense_plan(np.asarray(w)), np.asarray(x @ w.T)
    else:
        q, s, b = mx.quantize(w, group_size=64, bits=bits)
        plan = cpu_matmul.quantized_plan(np.asarray(q), np.asarray(s), np.asarray(b), 64, bits)
        ref = np.asarray(mx.quantized_matmul(x, q, s, b, transpose=True, group_size=64, bits=bits))
    assert relative_error(plan.on_blas(np.asarray(x), 2), ref) <= TOLERANCE


@pytest.mark.parametrize("in_dim", [16, 64, 172, 896])
def test_dense_matches_float64(in_dim):
    rng = np.random.default_rng(in_dim)
    w = rng.standard_normal((45, in_dim), np.float32)
    x = rng.standard_normal((7, in_dim), np.float32)
    plan = cpu_matmul.dense_plan(w)
    for rows in (1, 7):  # the decode driver and the tiled one
        assert relative_error(plan(x[:rows], 2), x[:rows].astype(np.float64) @ w.T.astype(np.float64)) <= TOLERANCE


@pytest.mark.parametrize("bits", [4, 8, 3, 32])
def test_a_row_does_not_depend_on_its_neighbours(bits):
    """Each row of a call equals that row alone, whatever the row count (decode and tiled drivers, every
    tile shape), the thread count, or the rows beside it."""
    rng = np.random.default_rng(bits)
    in_dim, out_dim = 256, 67   # 67 rows: whole 4-row blocks and a remainder
    if bits == 32:
        plan = cpu_matmul.dense_plan(rng.standard_normal((out_dim, in_dim), np.float32))
    else:
        q, s, b = quantized(rng, out_dim, in_dim, 64, bits)
        plan = cpu_matmul.quantized_plan(np.asarray(q), np.asarray(s), np.asarray(b), 64, bits)
    x = rng.standard_normal((23, in_dim), np.float32)
    solo = np.concatenate([plan(x[i:i + 1], 1) for i in range(len(x))])
    for rows in (2, 3, 4, 5, 9, 16, 23):
        for threads in (1, 2):
            np.testing.assert_array_equal(plan(x[:rows], threads), solo[:rows])
    np.testing.assert_array_equal(plan(x[::-1].copy(), 2), solo[::-1])


def test_plans_are_views_of_mlx_buffers():
    q, s, b = quantized(np.random.default_rng(0), 64, 256, 64, 4)
    plan = cpu_matmul.quantized_plan(np.asarray(q), np.asarray(s), np.asarray(b), 64, 4)
    assert np.shares_memory(plan.weight, np.asarray(q))
    assert np.shares_memory(plan.scales, np.asarray(s)) and np.shares_memory(plan.biases, np.asarray(b))
    w = mx.random.normal((32, 64))
    mx.eval(w)
    assert np.shares_memory(cpu_matmul.dense_plan(np.asarray(w)).weight, np.asarray(w))


def test_linear_runs_the_cpu_plan_and_keeps_mlx_for_half_precision():
    from kernels.linear import Linear, kernel_path

    assert kernel_path()["linear"].startswith("cpu-numba-")
    q, s, b = quantized(np.random.default_rng(1), 96, 128, 32, 4)
    bias = mx.arange(96, dtype=mx.float32)
    layer = Linear(q, bias, scales=s, biases=b, group_size=32, bits=4)
    assert layer.cpu is not None
    x = mx.random.normal((1, 5, 128))
    ref = mx.quantized_matmul(x, q, s, b, transpose=True, group_size=32, bits=4) + bias
    y = layer(x)
    assert y.shape == (1, 5, 96) and relative_error(np.asarray(y), np.asarray(ref)) <= TOLERANCE
    half = Linear(q, None, scales=s.astype(mx.bfloat16), biases=b.astype(mx.bfloat16), group_size=32, bits=4)
    assert half.cpu is None  # a stage computing in bfloat16 keeps MLX's kernel, which computes in bfloat16


def test_a_failing_self_check_falls_back_to_mlx(monkeypatch):
    saved = dict(cpu_path._state, formats=dict(cpu_path._state["formats"]))
    real = cpu_matmul.Plan.__call__
    monkeypatch.setattr(cpu_matmul.Plan, "__call__", lambda self, x, threads: real(self, x, threads) * 1.001)
    cpu_path._state.update(enabled=None, formats={})
    try:
        assert not cpu_path.enabled()
        path = cpu_path.describe()
        assert path["linear"] == "mlx" and "FAILED" in path["why"]
        assert cpu_path.plan(mx.zeros((8, 32), mx.float32), None, None, 0, 0) is None
    finally:
        cpu_path._state.clear()
        cpu_path._state.update(saved)


def test_without_avx512_the_kernels_still_pass():
    """numba compiling for Haswell (AVX2, no AVX-512), into a cache of its own: the self-check passes for
    every weight format and names the target."""
    code = ("from kernels import cpu_path\n"
            "assert cpu_path.enabled(), cpu_path.describe()\n"
            "assert all(cpu_path.check_format(b)[0] for b in (2, 3, 5, 6, 8)), cpu_path._state['formats']\n"
            "print(cpu_path.describe()['linear'])\n")
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CACHE_DIR=str(Path(os.environ.get("TMPDIR", "/tmp"))
                                                                        / f"cake-swarm-numba-haswell-{os.getuid()}"))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "cpu-numba-haswell"


@pytest.mark.parametrize("host, given, spin", [("127.0.0.1", None, "2000"), ("localhost", None, "2000"),
                                               ("::1", None, "2000"), ("10.0.0.7", None, "20000"),
                                               ("0.0.0.0", None, "20000"), ("127.0.0.1", "777", "777")])
def test_kernel_threads_spin_shorter_on_a_node_whose_peers_share_its_cores(host, given, spin):
    """`up` on a loopback address (every peer on this machine) makes the kernels' OpenMP threads spin
    briefly after a region, so that the next stage gets the cores; elsewhere they bridge the gaps of one
    forward; a user's GOMP_SPINCOUNT wins. The node's kernels line says which."""
    code = ("import os, sys\n"
            "from swarm.cli import _is_loopback\n"
            "from kernels.linear import share_cores\n"
            "share_cores(_is_loopback(sys.argv[1]))\n"
            "from kernels import cpu_path\n"
            "assert cpu_path.enabled(), cpu_path.describe()\n"
            "print(os.environ['GOMP_SPINCOUNT'], cpu_path.describe()['why'])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    if given:
        env["GOMP_SPINCOUNT"] = given
    out = subprocess.run([sys.executable, "-c", code, host], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    value, why = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert value == spin and why.endswith(f"spinning {spin} pauses after a region")


# --- the ops around the linears ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_embedding_rows_are_mlxs_bit_for_bit(bits, group_size):
    from kernels.linear import Linear
    rng = np.random.default_rng(bits * 1000 + group_size)
    q, s, b = mx.quantize(mx.array(rng.standard_normal((300, 384)).astype(np.float32) * 3), group_size=group_size,
                          bits=bits)
    ids = rng.integers(0, 300, 40)
    for linear, numpy_path in ((Linear(q, scales=s, biases=b, group_size=group_size, bits=bits), True),
                               (Linear(q, scales=s.astype(mx.bfloat16), biases=b.astype(mx.bfloat16),
                                       group_size=group_size, bits=bits), False)):  # MLX rounds in bf16: its lookup
        table = cpu_block.Embedding(linear)
        assert (table.weight is not None) == numpy_path
        for some in (ids, ids[:1]):
            expected = np.array(linear.rows(mx.array(some)).astype(mx.float32))
            np.testing.assert_array_equal(table.rows(some), expected)
    dense = Linear(mx.array(rng.standard_normal((50, 64)).astype(np.float32)))
    some = ids[:5] % 50
    np.testing.assert_array_equal(cpu_block.Embedding(dense).rows(some), np.array(dense.rows(mx.array(some))))


def test_rms_norm_matches_mlx():
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((9, 96), np.float32), rng.standard_normal(96).astype(np.float32)
    ref = np.asarray(mx.fast.rms_norm(mx.array(x), mx.array(w), 1e-5))
    np.testing.assert_allclose(cpu_block.rms_norm(x, w, 1e-5), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("rope", [dict(base=10000.0, scale=1.0, freqs=None), dict(base=1e6, scale=0.25, freqs=None),
                                  dict(base=None, scale=1.0, freqs="periods")])
def test_rope_matches_mlx(traditional, rope):
    rng = np.random.default_rng(3)
    dim, offset = 64, 37
    x = rng.standard_normal((6, 5, dim), np.float32)  # (positions, heads, head_dim)
    freqs = mx.array(10000.0 ** (np.arange(0, dim, 2) / dim) * np.linspace(1, 8, dim // 2), mx.float32) \
        if rope["freqs"] else None
    ref = mx.fast.rope(mx.array(x.transpose(1, 0, 2))[None], dim, traditional=traditional, base=rope["base"],
                       scale=rope["scale"], offset=offset, freqs=freqs)
    ours = x.copy()
    cpu_block.rope(ours, offset + np.arange(6), cpu_block.inverse_frequencies(dim, rope["base"], rope["scale"], freqs),
                   traditional)
    np.testing.assert_allclose(ours, np.asarray(ref)[0].transpose(1, 0, 2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("new_rows", [1, 7, 150])
def test_attention_matches_mlx(new_rows):
    """A session with 20 cached positions and new_rows more: causal, grouped heads (6 over 2). 150 rows: a
    prompt chunk, on BLAS in blocks (the last one partial)."""
    rng = np.random.default_rng(new_rows)
    heads, kv_heads, dim, past = 6, 2, 32, 20
    k = rng.standard_normal((past + new_rows, kv_heads, dim), np.float32)
    v = rng.standard_normal((past + new_rows, kv_heads, dim), np.float32)
    q = rng.standard_normal((new_rows, heads, dim), np.float32)
    kv = cpu_block.KV()
    kv.append(k[:past], v[:past])
    kv.append(k[past:], v[past:])
    ours = cpu_block.attend_rows(q, kv, dim ** -0.5)
    qm, km, vm = (mx.array(a.transpose(1, 0, 2))[None] for a in (q, k, v))
    mask = mx.array(np.arange(past + new_rows)[None] <= past + np.arange(new_rows)[:, None])
    ref = mx.fast.scaled_dot_product_attention(qm, km, vm, scale=dim ** -0.5, mask=mask)
    np.testing.assert_allclose(ours, np.asarray(ref)[0].transpose(1, 0, 2).reshape(new_rows, -1), rtol=1e-4, atol=1e-5)


def test_kv_grows_past_its_step():
    kv, rng = cpu_block.KV(), np.random.default_rng(5)
    k = rng.standard_normal((300, 2, 8), np.float32)
    for start in range(0, 300, 100):
        kv.append(k[start:start + 100], -k[start:start + 100])
    assert kv.offset == 300 and kv.keys.shape == (2, 512, 8)
    np.testing.assert_array_equal(kv.keys[:, :300], k.transpose(1, 0, 2))
    np.testing.assert_array_equal(kv.values[:, :300], -k.transpose(1, 0, 2))


@pytest.mark.parametrize("rows", [3, 40])  # on the calling thread, and spread over the cores
def test_silu_mul_matches_mlx(rows):
    rng = np.random.default_rng(6)
    g, u = rng.standard_normal((rows, 50), np.float32) * 4, rng.standard_normal((rows, 50), np.float32)
    ref = np.asarray(nn.silu(mx.array(g)) * mx.array(u))
    np.testing.assert_allclose(cpu_block.silu_mul(g, u), ref, rtol=1e-5, atol=1e-6)
