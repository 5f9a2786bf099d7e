"""The CUDA kernels (kernels/cuda_*.py): their host side (plans, launch configurations, the self-check's
report and log) and the fallback everywhere; the kernels compiled with nvcc where it is installed; and run
against MLX's own ops where MLX's CUDA back-end is (the GPU machine). CI has no GPU: the GPU tests skip."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from kernels import cuda_attention, cuda_check, cuda_common, cuda_embed, cuda_matvec, cuda_mma, cuda_q4, cuda_qkv
from kernels import cuda_step, cuda_swiglu
from kernels.cuda_check import random_q4, reference, rel_err
from kernels.linear import Linear, matvec_kernel, quantized_linear

ROOT = Path(__file__).resolve().parents[1]
ON_GPU = cuda_common.on_cuda()
gpu = pytest.mark.skipif(not ON_GPU, reason="needs MLX's CUDA back-end")
NAN = float("nan")


def layer(n, k, gs=64, dtype=mx.float16, seed=0):
    return random_q4(n, k, gs, dtype, mx.random.key(seed))


@pytest.fixture
def kernels_on(monkeypatch):
    """Every kernel family marked as passed (for the host-side plans; nothing is built)."""
    for family in cuda_check.FAMILIES:
        monkeypatch.setitem(cuda_common.passed, family, True)
    cuda_common._plans.clear()
    yield
    cuda_common._plans.clear()


# ---------------------------------------------------------------- off the GPU: the fallback, the plans

def test_disabled_without_cuda_and_nothing_built():
    if ON_GPU:
        pytest.skip("this machine has the CUDA back-end")
    assert cuda_q4.enabled() is False
    assert cuda_q4.check_report() == ""
    assert cuda_q4.report() == {"path": "mlx", "reason": "not on MLX's CUDA back-end", "kernels": {}}
    assert cuda_common._kernels == {}


@pytest.mark.parametrize("change", ["float32", "rows", "group", "k", "scale_dtype", "scale_shape", "no_biases",
                                    "packing", "empty"])
@pytest.mark.parametrize("path", ["simt", "mma"])
def test_not_applicable_inputs_give_none(change, path):
    w, s, b = layer(64, 256)
    x = mx.ones((2, 256), mx.float16)
    gs = 64
    rows = cuda_mma.MAX_ROWS
    if change == "float32":
        x = x.astype(mx.float32)
    elif change == "rows":
        x = mx.ones((3, 6, 256), mx.float16)          # 18 rows > 16
    elif change == "group":
        gs = 16
    elif change == "k":
        x = mx.ones((1, 512), mx.float16)
    elif change == "scale_dtype":
        s = s.astype(mx.bfloat16)
    elif change == "scale_shape":
        s = s[:, :2]
    elif change == "no_biases":
        b = None
    elif change == "packing":
        w = w.astype(mx.int32)
    elif change == "empty":
        x = mx.ones((0, 256), mx.float16)
    assert cuda_q4.q4_matvec(x, w, s, b, gs, min_weights=0, path=path, max_rows=rows) is None
    assert cuda_q4.swiglu(x, w, s, b, w, s, b, gs, path=path, max_rows=rows) is None
    assert cuda_q4.qkv(x, (w, s, b), (w, s, b), (w, s, b), gs, path=path, max_rows=rows) is None


def test_small_matvecs_go_to_mlx():
    if ON_GPU:
        pytest.skip("a valid input would run the kernel")
    w, s, b = layer(64, 256)
    x = mx.ones((1, 256), mx.float16)
    assert cuda_q4.q4_matvec(x, w, s, b, 64) is None      # 16K weights < FASTER_WEIGHTS: MLX's launch is cheaper
    with pytest.raises(RuntimeError):                      # past the size rule it would build the kernel
        cuda_q4.q4_matvec(x, w, s, b, 64, min_weights=0, path="simt")


def test_rows_go_to_the_path_that_takes_them(kernels_on, monkeypatch):
    w, s, b = layer(64, 256)
    for rows, path, kind in ((1, None, "matvec"), (2, None, "matvec"), (3, None, "mma_matvec"),
                             (7, None, "mma_matvec"), (1, "mma", "mma_matvec"), (8, "simt", "matvec")):
        plan = cuda_matvec.matvec_plan(mx.ones((rows, 256), mx.float16), (w, s, b), 64, path=path, max_rows=rows)
        assert plan[0] == kind
    assert cuda_matvec.matvec_plan(mx.ones((8, 256), mx.float16), (w, s, b), 64) is None      # MLX's from 8 rows
    assert cuda_matvec.matvec_plan(mx.ones((16, 256), mx.float16), (w, s, b), 64, max_rows=16)[0] == "mma_matvec"
    assert cuda_matvec.matvec_plan(mx.ones((17, 256), mx.float16), (w, s, b), 64, max_rows=17) is None
    assert cuda_matvec.matvec_plan(mx.ones((9, 256), mx.float16), (w, s, b), 64, path="simt") is None
    cuda_common.passed["simt"] = False                     # the SIMT path off: the tensor cores from 1 row
    assert cuda_matvec.matvec_plan(mx.ones((1, 256), mx.float16), (w, s, b), 64)[0] == "mma_matvec"
    cuda_common.passed["simt"] = True
    cuda_common.passed["mma"] = False                      # the tensor-core path off: SIMT up to 7 rows, then MLX
    assert cuda_matvec.matvec_plan(mx.ones((7, 256), mx.float16), (w, s, b), 64)[0] == "matvec"
    assert cuda_matvec.matvec_plan(mx.ones((8, 256), mx.float16), (w, s, b), 64) is None
    w3, s3, b3 = layer(64, 384)                            # K = 384: a multiple of 128
    assert cuda_mma.matvec_plan(mx.ones((1, 384), mx.float16), (w3, s3, b3), 64, None, False) is not None
    w2, s2, b2 = layer(64, 320)                            # K = 320: the tensor-core kernel takes stages of 128
    assert cuda_mma.matvec_plan(mx.ones((1, 320), mx.float16), (w2, s2, b2), 64, None, False) is None


def test_fused_helpers_decline_layers_they_cannot_take():
    w, s, b = layer(64, 256)
    x = mx.ones((1, 256), mx.float16)
    q4 = Linear(w, scales=s, biases=b, group_size=64, bits=4)
    w8, s8, b8 = mx.quantize(mx.ones((64, 256)), group_size=64, bits=8)
    q8 = Linear(w8, scales=s8.astype(mx.float16), biases=b8.astype(mx.float16), group_size=64, bits=8)
    dense = Linear(mx.ones((64, 256), mx.float16))
    with_bias = Linear(w, mx.zeros((64,), mx.float16), scales=s, biases=b, group_size=64, bits=4)
    w32, s32, b32 = layer(64, 256, gs=32)
    other_group = Linear(w32, scales=s32, biases=b32, group_size=32, bits=4)
    assert cuda_q4.fused_swiglu(x, q4, q8, min_weights=0) is None
    assert cuda_q4.fused_swiglu(x, dense, q4, min_weights=0) is None
    assert cuda_q4.fused_swiglu(x, q4, with_bias, min_weights=0) is None
    assert cuda_q4.fused_swiglu(x, q4, other_group, min_weights=0) is None
    assert cuda_q4.fused_qkv(x, q4, q4, other_group, min_weights=0) is None
    assert cuda_q4.fused_qkv(x, with_bias, q4, q4, min_weights=0) is None    # bias on some of q/k/v only
    assert cuda_q4.fused_qkv(mx.ones((1, 256), mx.float32), q4, q4, q4, min_weights=0) is None
    assert cuda_q4.fused_swiglu(x, q4, q4) is None           # 16K weights: MLX's unfused ops are cheaper
    assert cuda_q4.fused_qkv(x, q4, q4, q4) is None


@pytest.mark.parametrize("n,k", [(896, 896), (128, 896), (4864, 896), (3584, 18944), (152064, 3584), (18944, 3584),
                                 (100, 2048), (4608, 3584)])
@pytest.mark.parametrize("rt", [1, 2])
def test_mma_launch_config_covers_every_row_and_keeps_two_stages_a_warp(n, k, rt):
    tiles = -(-n // (16 * rt))
    nsplit, rowsets = cuda_mma.launch_config(tiles, k, rt)
    assert nsplit * rowsets * rt == 8 and nsplit in (1, 2, 4, 8)
    rows_per_block = rowsets * 16 * rt
    blocks = -(-n // rows_per_block)
    assert blocks * rows_per_block >= n > (blocks - 1) * rows_per_block
    assert k // 128 >= 2 * nsplit or nsplit == 1


def test_mma_plans(kernels_on):
    dt = mx.bfloat16
    w, s, b = layer(18944, 3584, dtype=dt)
    norm = (mx.ones((3584,), dt), 1e-6)
    for rows, nt, nt_norm in ((1, 1, 1), (4, 1, 1), (5, 1, 2), (8, 1, 2), (9, 2, 3), (16, 2, 4)):
        x = mx.ones((1, rows, 3584), dt)
        recipe, grid, block, shapes = cuda_mma.matvec_plan(x, (w, s, b), 64, None, False)
        assert ("NT", nt) in recipe.template and ("RT", 1) in recipe.template and shapes == [(1, rows, 18944)]
        nsplit, rowsets = block[1], block[2]
        assert block == (32, nsplit, rowsets) and grid[1:] == (nsplit, rowsets) and grid[0] % 32 == 0
        assert grid[0] // 32 * rowsets * 16 >= 18944 and recipe.shared_memory == cuda_mma.SHARED_MEMORY
        recipe, *_ = cuda_mma.swiglu_plan(x, (w, s, b), (w, s, b), 64, norm)
        assert recipe.kind == "mma_swiglu_norm" and ("NT", nt_norm) in recipe.template and ("RT", 2) in recipe.template
        assert ("EPS", cuda_common.float_bits(1e-6)) in recipe.template
    small = layer(512, 3584, dtype=dt)
    x = mx.ones((1, 3, 3584), dt)
    biases = tuple(mx.zeros((n,), dt) for n in (18944, 512, 512))
    kind, (recipe, grid, block, shapes) = cuda_qkv.qkv_plan(x, (w, s, b), small, small, 64, biases, norm)
    assert kind == "mma_qkv_bias_norm" and shapes == [(1, 3, 18944), (1, 3, 512), (1, 3, 512)]
    assert grid[0] // 32 == sum(-(-n // (block[2] * 16)) for n in (18944, 512, 512))
    assert cuda_mma.swiglu_plan(x, (w, s, b), small, 64, None) is None          # gate and up of one shape


@pytest.mark.parametrize("n,k,m", [(896, 896, 1), (128, 896, 8), (4864, 896, 1), (3584, 18944, 1),
                                   (152064, 3584, 1), (100, 2048, 3), (18944, 3584, 5)])
def test_simt_launch_config_covers_every_row(n, k, m):
    for fused in (1, 2):
        r, split, wpb = cuda_matvec.launch_config(n, k, m, fused)
        assert split in (1, 2, 4, 8) and wpb % split == 0 and wpb * 32 <= 1024
        rows_per_block = r * wpb // split
        blocks = -(-n // rows_per_block)
        assert blocks * rows_per_block >= n > (blocks - 1) * rows_per_block
        assert (k // 32) >= 64 * split or split == 1


def test_reference_is_quantized_matmul_rounded_and_rel_err():
    w, s, b = layer(96, 512, gs=128, dtype=mx.bfloat16, seed=3)
    x = mx.random.normal((2, 512), key=mx.random.key(4)).astype(mx.bfloat16)
    ref = reference(x, (w, s, b), 128)
    assert ref.dtype == mx.bfloat16 and ref.shape == (2, 96)
    exact = mx.quantized_matmul(x.astype(mx.float32), w, s.astype(mx.float32), b.astype(mx.float32),
                                transpose=True, group_size=128, bits=4)
    assert rel_err(ref, exact) < 4e-3               # bfloat16 rounding only
    assert rel_err(ref, ref) == 0.0
    assert rel_err(mx.full(ref.shape, NAN, mx.bfloat16), ref) == float("inf")
    assert rel_err(ref * 1.01, ref) > 5e-3


def test_rope_reference_is_mx_fast_rope():
    x = mx.random.normal((1, 3, 1, 128), key=mx.random.key(5))
    inv = cuda_attention.rope_inverse_frequencies(128, 1e6, 1.0, None)
    for traditional in (False, True):
        want = mx.fast.rope(x, 128, traditional=traditional, base=1e6, scale=1.0, offset=1234)
        assert mx.allclose(cuda_check.rope_reference(x, 1234, inv, traditional), want, atol=2e-4).item()


def test_quantized_linear_falls_back_to_mlx_off_cuda():
    w, s, b = layer(64, 256, dtype=mx.float32)
    for shape in ((1, 256), (1, 1, 256), (12, 256)):
        x = mx.random.normal(shape, key=mx.random.key(1))
        want = mx.quantized_matmul(x, w, s, b, transpose=True, group_size=64, bits=4)
        got = quantized_linear(x, w, s, b, 64, 4)
        assert got.shape == want.shape and mx.array_equal(got, want).item()


def test_attention_plans_take_only_what_the_kernels_do():
    dt = mx.bfloat16
    cache = (mx.zeros((1, 4, 512, 128), dt),) * 2
    q, kv = mx.zeros((1, 3, 28 * 128), dt), mx.zeros((1, 3, 4 * 128), dt)
    recipe, grid, block, shapes, dtypes = cuda_attention.sessions_plan(q, kv, kv, cache, 3, 128)
    s = cuda_attention.splits(3, 4)
    assert grid == (s * 128, 4, 3) and block == (128, 1, 1) and ("QH", 7) in recipe.template
    assert shapes == [(1, 3, 28 * 128), (3, 28, s, 128), (3, 28, s, 2)] and dtypes == [dt, mx.float32, mx.float32]
    assert len(recipe.spec[0]) == 3 + 2 * 4 + 4 and ("SLOTS", 4) in recipe.template    # slots: a power of two
    plan = cuda_attention.sessions_plan
    assert plan(q, kv, kv, cache, 2, 128) is None                                         # 3 rows, 2 sessions
    assert plan(mx.zeros((1, 3, 36 * 128), dt), kv, kv, cache, 3, 128) is None            # 9 heads a group
    assert plan(q, kv, kv, (mx.zeros((1, 2, 512, 128), dt),) * 2, 3, 128) is None         # 2 KV heads cached
    assert plan(q, kv, kv, (cache[0].astype(mx.float16), cache[1]), 3, 128) is None
    assert plan(mx.zeros((1, 17, 28 * 128), dt), mx.zeros((1, 17, 512), dt), mx.zeros((1, 17, 512), dt), cache,
                17, 128) is None                                                          # 17 sessions
    assert plan(mx.zeros((1, 3, 3 * 96), dt), mx.zeros((1, 3, 96), dt), mx.zeros((1, 3, 96), dt),
                (mx.zeros((1, 1, 256, 96), dt),) * 2, 3, 96) is None                      # head_dim 96
    assert cuda_attention.attend_sessions(q, kv, kv, [cache] * 3, mx.zeros((2,), mx.int32),
                                          mx.zeros((64,), mx.float32), 128) is None       # 2 positions for 3
    assert 1 <= cuda_attention.splits(16, 8) <= cuda_attention.splits(1, 4) == 128

    single = (mx.zeros((1, 2, 256, 128), dt),) * 2
    q1, k1, pos, inv = mx.zeros((1, 1, 4 * 128), dt), mx.zeros((1, 1, 2 * 128), dt), mx.zeros((1,), mx.int32), \
        mx.zeros((64,), mx.float32)
    recipe, grid, block, shapes = cuda_attention.attend_plan(q1, k1, k1, *single, pos, inv, 128)
    assert recipe.kind == "attend" and grid == (4 * 128, 1, 1) and shapes == [(1, 1, 512)]
    assert cuda_attention.attend_plan(q1, k1, k1, *single, pos.astype(mx.uint32), inv, 128) is None


def test_embed_plan():
    w, s, b = layer(64, 256, dtype=mx.bfloat16)
    ids = mx.zeros((1, 3), mx.uint32)
    recipe, grid, _, shapes = cuda_embed.embed_plan(ids, w, s, b, 64)
    assert recipe.kind == "embed" and grid == (3 * 32, 1, 1) and shapes == [(1, 3, 256)]
    assert cuda_embed.embed_plan(ids.astype(mx.float32), w, s, b, 64) is None
    assert cuda_embed.embed_plan(mx.zeros((3,), mx.int32), w, s, b, 64) is None
    assert cuda_embed.embed_plan(ids, w, s, b, 128) is None                              # scales of group 64


def test_decode_step_plans_five_launches_for_one_to_sixteen_sessions(kernels_on):
    dt, h, gs = mx.bfloat16, 256, 64
    q, k, v, o = layer(4 * 64, h, dtype=dt), layer(2 * 64, h, dtype=dt), layer(2 * 64, h, dtype=dt), \
        layer(h, 4 * 64, dtype=dt)
    gate, up, down = layer(768, h, dtype=dt), layer(768, h, dtype=dt), layer(h, 768, dtype=dt)
    inv = cuda_attention.rope_inverse_frequencies(64, 1e6, 1.0, None)
    step = cuda_step.DecodeStep(mx.ones((h,), dt), mx.ones((h,), dt), 1e-6, q, k, v, None, o, gate, up, down, gs,
                                64, inv, False)
    cache = (mx.zeros((1, 2, 256, 64), dt),) * 2
    for sessions in (1, 5, 16):
        plans = step.plan(mx.zeros((1, sessions, h), dt), cache, sessions)
        tc = "" if sessions <= cuda_matvec.SIMT_FIRST_ROWS else "mma_"      # SIMT first for one or two rows
        assert [kind for kind, *_ in plans] == [tc + "qkv_norm", "sessions", tc + "matvec_res", tc + "swiglu_norm",
                                                tc + "matvec_res"]
        assert plans[1][2]["grid"][2] == sessions
    cuda_common.passed["attention"] = False                # the older attention kernel: one session only
    assert [kind for kind, *_ in step.plan(mx.zeros((1, 1, h), dt), cache, 1)][1] == "serial"
    assert step.plan(mx.zeros((1, 2, h), dt), cache, 2) is None


def test_positions():
    assert cuda_step.positions([3, 0, 70000]).tolist() == [3, 0, 70000]
    view = cuda_step.position(41)
    assert view.shape == (1,) and view.dtype == mx.int32 and view.item() == 41
    assert cuda_step.position(41) is view


@pytest.mark.parametrize("base,scale,freqs,traditional", [(10000.0, 1.0, None, False), (1e6, 0.25, None, True),
                                                          (None, 0.5, "linspace", False)])
def test_rope_inverse_frequencies_mean_what_mx_fast_rope_means(base, scale, freqs, traditional):
    x = mx.random.normal((1, 3, 5, 128), key=mx.random.key(2))
    freqs = mx.linspace(1, 500, 64) if freqs else None
    want = mx.fast.rope(x, 128, traditional=traditional, base=base, scale=scale, offset=7, freqs=freqs)
    inv = cuda_q4.rope_inverse_frequencies(128, base, scale, freqs)
    assert inv.shape == (64,) and inv.dtype == mx.float32
    got = mx.fast.rope(x, 128, traditional=traditional, base=None, scale=1.0, offset=7, freqs=1.0 / inv)
    assert mx.allclose(got, want, atol=1e-5).item()
    assert not mx.allclose(mx.fast.rope(x, 128, traditional=traditional, base=None, scale=1.0, offset=8,
                                        freqs=1.0 / inv), want, atol=1e-3).item()


def test_kernel_sources_are_included_from_a_file_named_by_their_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    code = cuda_attention.FLASH_CODE
    line = cuda_common.included(code)
    (path,) = (tmp_path / "cake-swarm" / "cuda").glob("q4_*.cuh")
    assert line == f'#include "{path}"\n' and path.read_text() == code
    path.write_text("tampered")                     # a wrong file is replaced, never compiled
    cuda_common.included(code)
    assert path.read_text() == code
    assert "mma_matvec" not in cuda_attention.FLASH_CODE and "attend_split" not in cuda_mma.CODE


def test_a_failing_family_is_logged_reported_and_left_off(monkeypatch, caplog):
    if ON_GPU:
        pytest.skip("on the GPU the families build")
    monkeypatch.setattr(cuda_check, "_results", {})
    saved = dict(cuda_common.passed)
    try:
        with caplog.at_level(logging.INFO, logger="kernels.cuda"):
            result = cuda_check.run_family("embed")
        assert cuda_common.passed["embed"] is False
    finally:
        cuda_common.passed.clear()
        cuda_common.passed.update(saved)
    assert result["passed"] is False and "RuntimeError" in result["reason"] and result["worst_error"] is None
    (record,) = [r for r in caplog.records if r.name == "kernels.cuda"]
    assert record.levelno == logging.WARNING and "embed" in record.getMessage() and "RuntimeError" in record.getMessage()
    assert cuda_check.check_report().startswith("[embed] FAILED: RuntimeError")


# ---------------------------------------------------------------- the kernels compiled (nvcc, no GPU needed)

# What MLX's CUDA back-end puts around a kernel body (mlx/backend/cuda/custom_kernel.cpp): its device header,
# ours, then `__global__ void name(const T* input, [Shape input_shape,] [int input_ndim,] ..., T* output, ...)`
# with the constants first in the body. The stand-in header gives what ours relies on from MLX's.
MLX_STANDIN = """
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda/std/array>
namespace mlx::core::cu { using Shape = cuda::std::array<int32_t, 8>; }
"""
CUDA_TYPES = {mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.float32: "float"}
INPUT_TYPES = {"w": "uint32_t", "gw": "uint32_t", "uw": "uint32_t", "qw": "uint32_t", "kw": "uint32_t",
               "vw": "uint32_t", "inv_freq": "float", "pos": "int32_t", "positions": "int32_t", "counters": "int32_t",
               "ids": "uint32_t"}


def mlx_style_kernel(name: str, recipe: cuda_common.Recipe, out_dtypes: list | None = None) -> str:
    inputs, outputs, body = recipe.spec
    text = cuda_common.kernel_body(body, recipe.template)
    dtype = dict(recipe.template)["T"]
    params = []
    for n in inputs:
        params.append(f"const {INPUT_TYPES.get(n, CUDA_TYPES[dtype])}* {n}")
        if n + "_shape" in text:
            params.append(f"const __grid_constant__ Shape {n}_shape")
        if n + "_ndim" in text:
            params.append(f"const __grid_constant__ int {n}_ndim")
    params += [f"{CUDA_TYPES[d]}* {n}" for n, d in zip(outputs, out_dtypes or [dtype] * len(outputs))]
    return f"namespace mlx::core::cu {{\n__global__ void {name}({', '.join(params)}) {{\n{text}\n}}\n}}\n"


def compile_cases() -> dict[str, list]:
    """Kernels of every family, by their device code: (recipe, output dtypes)."""
    bf, f16 = mx.bfloat16, mx.float16
    x8, x16 = mx.zeros((1, 8, 1024), bf), mx.zeros((1, 16, 1024), f16)
    a, c = layer(320, 1024, dtype=bf), layer(320, 1024, dtype=f16)
    norm, norm16 = (mx.ones((1024,), bf), 1e-6), (mx.ones((1024,), f16), 1e-5)
    lb = tuple(mx.zeros((320,), bf) for _ in range(3))
    mma = [cuda_mma.matvec_plan(x8, a, 64, None, True)[0], cuda_mma.matvec_plan(x16, c, 64, norm16, False)[0],
           cuda_mma.swiglu_plan(x8, a, a, 64, norm)[0], cuda_mma.swiglu_plan(x16, c, c, 64, None)[0],
           cuda_mma.qkv_plan(x8, a, a, a, 64, True, norm)[0], cuda_mma.qkv_plan(x16, c, c, c, 64, False, norm16)[0]]
    simt = [cuda_matvec.simt_plan(k, cuda_matvec.SPECS[k], cuda_matvec.simt_code(cuda_matvec.MATVEC), x, (t,), 64, 8,
                                  None, 1, eps=e)[0]
            for k, x, t, e in (("matvec", x8, a, None), ("matvec_norm", mx.zeros((1, 1024), f16), c, 1e-6))]
    simt += [cuda_swiglu.swiglu_plan(mx.zeros((1, 1024), bf), a, a, 64, norm, path="simt")[1][0],
             cuda_qkv.qkv_plan(mx.zeros((3, 1024), bf), a, a, a, 64, lb, norm, path="simt")[1][0]]
    cache = (mx.zeros((1, 4, 256, 128), bf),) * 2
    q, kv = mx.zeros((1, 2, 28 * 128), bf), mx.zeros((1, 2, 4 * 128), bf)
    cache64 = (mx.zeros((1, 2, 256, 64), f16),) * 2
    flash = [cuda_attention.sessions_plan(q, kv, kv, cache, 2, 128),
             cuda_attention.sessions_plan(mx.zeros((1, 1, 14 * 64), f16), mx.zeros((1, 1, 128), f16),
                                          mx.zeros((1, 1, 128), f16), cache64, 1, 64, True)]
    serial = cuda_attention.attend_plan(mx.zeros((1, 1, 512), bf), mx.zeros((1, 1, 256), bf),
                                        mx.zeros((1, 1, 256), bf), *(mx.zeros((1, 2, 256, 128), bf),) * 2,
                                        mx.zeros((1,), mx.int32), mx.zeros((64,), mx.float32), 128)
    embed = cuda_embed.embed_plan(mx.zeros((1, 3), mx.uint32), *a, 64)
    return {"mma": [(r, None) for r in mma], "simt": [(r, None) for r in simt],
            "flash": [(p[0], p[4]) for p in flash], "serial": [(serial[0], None)], "embed": [(embed[0], None)]}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_kernels_compile_for_hopper_without_spills(tmp_path):
    by_code: dict[str, list] = {}                          # each kernel with only the device code it is given
    for cases in compile_cases().values():
        for recipe, dtypes in cases:
            by_code.setdefault(recipe.code, []).append((recipe, dtypes))
    report, count = "", 0
    for n, (code, cases) in enumerate(by_code.items()):
        src = MLX_STANDIN + code + "".join(mlx_style_kernel(f"k{i}", r, d) for i, (r, d) in enumerate(cases))
        (tmp_path / f"{n}.cu").write_text(src)
        done = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-O3", "--resource-usage", "-o",
                               str(tmp_path / f"{n}.cubin"), str(tmp_path / f"{n}.cu")],
                              capture_output=True, text=True, timeout=600)
        report += done.stdout + done.stderr
        assert done.returncode == 0, report[-3000:]
        count += len(cases)
    usage = [line for line in report.splitlines() if "stack frame" in line]
    assert len(usage) == count, report[-3000:]
    assert all(line.strip().startswith("0 bytes stack frame, 0 bytes spill stores") for line in usage), usage


# ---------------------------------------------------------------- on the GPU

@gpu
def test_self_check_passes_and_enables_every_family():
    assert cuda_q4.enabled(), cuda_q4.check_report()
    report = cuda_q4.report()
    assert report["path"] == "cuda-fused"
    assert {f: k["passed"] for f, k in report["kernels"].items()} == {f: True for f in cuda_check.FAMILIES}, \
        cuda_q4.check_report()


@gpu
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("n,k,rows,gs", [(896, 896, 1, 32), (896, 4864, 2, 64), (3584, 18944, 1, 128),
                                         (4864, 896, 8, 64), (4608, 3584, 13, 64), (18944, 3584, 16, 32)])
@pytest.mark.parametrize("path", ["mma", "simt"])
def test_products_match_quantized_matmul(dtype, n, k, rows, gs, path):
    if path == "simt" and rows > 8:
        pytest.skip("the SIMT kernel takes 1-8 rows")
    keys = mx.random.split(mx.random.key(n + k + rows), 6)
    a, c = layer(n, k, gs, dtype, seed=n + gs), layer(n, k, gs, dtype, seed=n + gs + 1)
    x = mx.random.normal((1, rows, k), key=keys[0]).astype(dtype)
    norm = ((1 + 0.1 * mx.random.normal((k,), key=keys[4])).astype(dtype), 1e-6)
    xn = cuda_check.norm_reference(x, norm)
    out = cuda_q4.q4_matvec(x, *a, gs, init_value=NAN, min_weights=0, path=path, max_rows=16)
    assert out.shape == (1, rows, n) and out.dtype == dtype
    assert rel_err(out, reference(x, a, gs)) < cuda_check.TOLERANCE
    out = cuda_q4.q4_matvec(x, *a, gs, norm=norm, init_value=NAN, min_weights=0, path=path, max_rows=16)
    assert rel_err(out, reference(xn, a, gs, dtype)) < cuda_check.TOLERANCE
    out = cuda_q4.swiglu(x, *a, *c, gs, norm=norm, init_value=NAN, path=path, max_rows=16)
    assert rel_err(out, cuda_check.swiglu_reference(xn, a, c, gs, dtype)) < cuda_check.TOLERANCE
    lbs = tuple(mx.random.normal((n,), key=kk).astype(dtype) for kk in keys[1:4])
    for got, t, lb in zip(cuda_q4.qkv(x, a, c, a, gs, lbs, init_value=NAN, path=path, max_rows=16), (a, c, a), lbs):
        assert rel_err(got, reference(x, t, gs) + lb) < cuda_check.TOLERANCE


@gpu
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_quantized_linear_uses_the_kernel_on_cuda(dtype):
    w, s, b = layer(4096, 2048, 64, dtype, seed=5)
    x = mx.random.normal((1, 1, 2048), key=mx.random.key(6)).astype(dtype)
    fast = matvec_kernel(w, 4)
    assert fast is cuda_q4.q4_matvec
    got = quantized_linear(x, w, s, b, 64, 4, fast)
    assert mx.array_equal(got, cuda_q4.q4_matvec(x, w, s, b, 64)).item()
    assert rel_err(got, reference(x, (w, s, b), 64)) < cuda_check.TOLERANCE


@gpu
@pytest.mark.parametrize("lengths", [[1000], [4095, 17, 0, 2500], [32767], [37 + 2047 * i for i in range(16)]])
def test_attention_matches_mlx_for_any_length_and_sessions(lengths):
    dtype, D, heads, kv_heads = mx.bfloat16, 128, 28, 4
    caps = [-(-(n + 1) // 256) * 256 for n in lengths]
    q, k, v, caches = cuda_check.sessions_case(dtype, D, heads, kv_heads, lengths, caps, mx.random.key(len(lengths)))
    inv = cuda_attention.rope_inverse_frequencies(D, 1e6, 1.0, None)
    refs = cuda_check.sessions_references(q, k, v, caches, lengths, inv, D, False)
    before = [kc[:, :, n + 1:] * 1 for (kc, _), n in zip(caches, lengths)]
    mx.eval(before)
    out = cuda_attention.attend_sessions(q, k, v, caches, mx.array(lengths, mx.int32), inv, D, init_value=NAN)
    mx.eval(out)
    errors = cuda_check.sessions_errors(out, caches, lengths, refs)
    assert max(e for _, e in errors) < cuda_check.TOLERANCE, errors
    for (kc, _), n, rest in zip(caches, lengths, before):  # nothing past the new position was written
        assert mx.array_equal(kc[:, :, n + 1:], rest).item()


def step_reference(step, x, caches, lengths):
    """A decoder layer's step for each session from MLX's ops in float32 (rounded where the kernels round):
    rms_norm, q/k/v + bias, RoPE and attention over the session's cache, o_proj + residual, rms_norm,
    SwiGLU, down_proj + residual."""
    gs, dt, D = step.group_size, x.dtype, step.head_dim
    rows = []
    for b, ((keys, values), n) in enumerate(zip(caches, lengths)):
        xb = x[:, b:b + 1]
        xn = cuda_check.norm_reference(xb, step.attn_norm)
        q, k, v = (reference(xn, t, gs, dt) + (0 if step.qkv_bias is None else step.qkv_bias[i])
                   for i, t in enumerate((step.q, step.k, step.v)))
        out = cuda_check.attend_reference(q, k, v, keys, values, n, step.inv_freq, D, step.traditional)[0]
        h = reference(out, step.o, gs) + xb
        g = cuda_check.swiglu_reference(cuda_check.norm_reference(h, step.mlp_norm), step.gate, step.up, gs, dt)
        rows.append(reference(g, step.down, gs) + h)
    return mx.concatenate(rows, axis=1)


@gpu
@pytest.mark.parametrize("lengths", [[40], [300, 0, 1030, 7]])
def test_decode_step_matches_mlx_ops_for_a_batch_of_sessions(tmp_path, lengths):
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_gpu import decode_steps

    from swarm.model.decoder import load_stage
    from tests.mlxlm_reference import write_checkpoint
    folder = write_checkpoint(tmp_path / "m", dict(model_type="qwen2", hidden_size=256, intermediate_size=768,
                                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                                   num_hidden_layers=2, rope_theta=1e6, tie_word_embeddings=False),
                              dtype=mx.float16, scaled=True)
    stage = load_stage(folder)
    step = decode_steps(stage)[0]
    B = len(lengths)
    x = mx.random.normal((1, B, 256), key=mx.random.key(9)).astype(mx.float16)
    caches = [tuple(mx.random.normal((1, 2, n + 200, 64), key=mx.random.key(n + i)).astype(mx.float16)
                    for i in range(2)) for n in lengths]
    mx.eval(caches)
    want = step_reference(step, x, caches, lengths)
    mx.eval(want)
    got = step.batch(x, caches, cuda_q4.positions(lengths))
    assert got is not None and got.shape == x.shape
    assert rel_err(got, want) < 5e-3                              # float16 roundings; a wrong session is O(1)


@gpu
def test_the_decoder_runs_a_batch_of_sessions_through_the_fused_step_as_each_alone(tmp_path):
    """Stage.forward with the decode rows of several sessions (the scheduler's batches) takes
    DecodeStep.batch and gives each session the logits it gets alone, step after step."""
    from swarm.model.decoder import load_stage
    from tests.mlxlm_reference import write_checkpoint
    folder = write_checkpoint(tmp_path / "m", dict(model_type="qwen2", hidden_size=256, intermediate_size=768,
                                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                                   num_hidden_layers=2, rope_theta=1e6, tie_word_embeddings=False),
                              dtype=mx.float16, scaled=True)
    stage = load_stage(folder)
    assert all(layer.decode_step is not None for layer in stage.layers)
    prompts = [[1, 5, 9], [1, 7, 7, 7, 7, 3, 2] * 20, [4], [1] + list(range(10, 300))]
    tokens = [[11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 25, 26], [31, 32, 33, 34, 35, 36], [41, 42, 43, 44, 45, 46]]
    alone = []
    for prompt, toks in zip(prompts, tokens):
        cache = stage.make_cache()
        stage(mx.array([prompt]), cache)
        alone.append([stage(mx.array([[t]]), cache)[0, -1] for t in toks])
        mx.eval(alone[-1])
    caches = [stage.make_cache() for _ in prompts]
    for prompt, cache in zip(prompts, caches):
        mx.eval(stage(mx.array([prompt]), cache))
    for i in range(len(tokens[0])):
        logits = stage.forward(mx.array([t[i] for t in tokens], dtype=mx.int32), caches, [1] * len(prompts))
        mx.eval(logits)
        for s in range(len(prompts)):
            assert rel_err(logits[s], alone[s][i]) < 2e-2, (i, s)  # float16 sums in another order; a wrong cache is O(1)
    assert all(c[0].offset == len(p) + len(tokens[0]) for c, p in zip(caches, prompts))
