"""kernels/cuda_q4.py: host-side checks and the fallback everywhere; the kernels themselves compiled with nvcc
where it is installed, and run against mx.quantized_matmul where MLX's CUDA back-end is (the GPU machine)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from kernels import cuda_q4
from kernels.linear import Linear, matvec_kernel, quantized_linear

ON_GPU = cuda_q4.on_cuda()
gpu = pytest.mark.skipif(not ON_GPU, reason="needs MLX's CUDA back-end")


def layer(n, k, gs=64, dtype=mx.float16, seed=0):
    return cuda_q4.random_q4(n, k, gs, dtype, mx.random.key(seed))


def test_disabled_without_cuda_and_nothing_built():
    if ON_GPU:
        pytest.skip("this machine has the CUDA back-end")
    assert cuda_q4.on_cuda() is False
    assert cuda_q4.enabled() is False
    assert cuda_q4.check_report() == ""
    assert cuda_q4._kernels == {}


@pytest.mark.parametrize("change", ["float32", "rows", "group", "k", "scale_dtype", "scale_shape", "no_biases",
                                    "packing", "empty"])
def test_not_applicable_inputs_give_none(change):
    w, s, b = layer(64, 256)
    x = mx.ones((2, 256), mx.float16)
    gs = 64
    if change == "float32":
        x = x.astype(mx.float32)
    elif change == "rows":
        x = mx.ones((3, 3, 256), mx.float16)          # 9 rows > MAX_ROWS
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
    assert cuda_q4.q4_matvec(x, w, s, b, gs, max_rows=cuda_q4.MAX_ROWS, min_weights=0) is None
    assert cuda_q4.swiglu(x, w, s, b, w, s, b, gs, max_rows=cuda_q4.MAX_ROWS) is None
    assert cuda_q4.qkv(x, (w, s, b), (w, s, b), (w, s, b), gs, max_rows=cuda_q4.MAX_ROWS) is None


def test_small_matvecs_go_to_mlx():
    if ON_GPU:
        pytest.skip("a valid input would run the kernel")
    w, s, b = layer(64, 256)
    x = mx.ones((1, 256), mx.float16)
    assert cuda_q4.q4_matvec(x, w, s, b, 64) is None      # 16K weights < FASTER_WEIGHTS: MLX's launch is cheaper
    with pytest.raises(RuntimeError):                      # past the size rule it would build the kernel
        cuda_q4.q4_matvec(x, w, s, b, 64, min_weights=0)


def test_more_rows_than_the_kernels_win_on_go_to_mlx():
    w, s, b = layer(64, 256)
    x = mx.ones((cuda_q4.FASTER_ROWS + 1, 256), mx.float16)
    assert cuda_q4.q4_matvec(x, w, s, b, 64, min_weights=0) is None
    assert cuda_q4.swiglu(x, w, s, b, w, s, b, 64) is None
    assert cuda_q4.qkv(x, (w, s, b), (w, s, b), (w, s, b), 64) is None


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


@pytest.mark.parametrize("n,k,m", [(896, 896, 1), (128, 896, 8), (4864, 896, 1), (3584, 18944, 1),
                                   (152064, 3584, 1), (100, 2048, 3), (18944, 3584, 5)])
def test_launch_config_covers_every_row(n, k, m):
    for fused in (1, 2):
        r, split, wpb = cuda_q4.launch_config(n, k, m, fused)
        assert split in (1, 2, 4, 8) and wpb % split == 0 and wpb * 32 <= 1024
        rows_per_block = r * wpb // split
        blocks = -(-n // rows_per_block)
        assert blocks * rows_per_block >= n > (blocks - 1) * rows_per_block
        assert (k // 32) >= 64 * split or split == 1     # at least two chunks per thread of a row group


def test_reference_is_quantized_matmul_rounded_and_rel_err():
    w, s, b = layer(96, 512, gs=128, dtype=mx.bfloat16, seed=3)
    x = mx.random.normal((2, 512), key=mx.random.key(4)).astype(mx.bfloat16)
    ref = cuda_q4.reference(x, (w, s, b), 128)
    assert ref.dtype == mx.bfloat16 and ref.shape == (2, 96)
    exact = mx.quantized_matmul(x.astype(mx.float32), w, s.astype(mx.float32), b.astype(mx.float32),
                                transpose=True, group_size=128, bits=4)
    assert cuda_q4.rel_err(ref, exact) < 4e-3               # bfloat16 rounding only
    assert cuda_q4.rel_err(ref, ref) == 0.0
    assert cuda_q4.rel_err(mx.full(ref.shape, float("nan"), mx.bfloat16), ref) == float("inf")
    assert cuda_q4.rel_err(ref * 1.01, ref) > 5e-3


def test_quantized_linear_falls_back_to_mlx_off_cuda():
    w, s, b = layer(64, 256, dtype=mx.float32)
    for shape in ((1, 256), (1, 1, 256), (12, 256)):
        x = mx.random.normal(shape, key=mx.random.key(1))
        want = mx.quantized_matmul(x, w, s, b, transpose=True, group_size=64, bits=4)
        got = quantized_linear(x, w, s, b, 64, 4)
        assert got.shape == want.shape and mx.array_equal(got, want).item()


# ---------------------------------------------------------------- the kernels compiled (nvcc, no GPU needed)

# What MLX's CUDA back-end puts around a kernel body (mlx/backend/cuda/custom_kernel.cpp): its device header,
# ours, then `__global__ void name(const T* input, [Shape input_shape,] ..., T* output, ...)` with the template
# constants first in the body. The stand-in header gives what ours relies on from MLX's.
MLX_STANDIN = """
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda/std/array>
namespace mlx::core::cu { using Shape = cuda::std::array<int32_t, 10>; }
"""
CUDA_TYPES = {mx.float16: "__half", mx.bfloat16: "__nv_bfloat16"}
INPUT_TYPES = {"w": "uint32_t", "gw": "uint32_t", "uw": "uint32_t", "qw": "uint32_t", "kw": "uint32_t",
               "vw": "uint32_t", "inv_freq": "float", "pos": "int32_t", "ids": "uint32_t"}


def mlx_style_kernel(kind: str, dtype, consts: dict) -> str:
    inputs, outputs, body = cuda_q4.KERNEL_SPECS[kind]
    name = f"{kind}_{CUDA_TYPES[dtype]}_{'_'.join(map(str, consts.values()))}"
    params = []
    for n in inputs:
        params.append(f"const {INPUT_TYPES.get(n, CUDA_TYPES[dtype])}* {n}")
        if n + "_shape" in body:
            params.append(f"const __grid_constant__ Shape {n}_shape")
    params += [f"{CUDA_TYPES[dtype]}* {n}" for n in outputs]
    template = (("T", dtype), *((k, mx.uint32 if v == "uint32_t" else v) for k, v in consts.items()))
    return (f"namespace mlx::core::cu {{\n__global__ void {name}({', '.join(params)}) {{\n"
            f"{cuda_q4.kernel_body(kind, template)}\n}}\n}}\n")


def q4_consts(m: int, cfg: tuple, gs: int, eps: float | None = None) -> dict:
    consts = dict(zip(("M", "R", "SPLIT", "WPB", "GS"), (m, *cfg, gs)))
    return consts if eps is None else {**consts, "EPS": cuda_q4.float_bits(eps)}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_kernels_compile_for_hopper_without_spills(tmp_path):
    cases = [("matvec", mx.float16, q4_consts(1, (4, 1, 4), 64)), ("matvec", mx.bfloat16, q4_consts(8, (2, 4, 4), 32)),
             ("matvec", mx.bfloat16, q4_consts(1, (4, 8, 8), 128)), ("swiglu", mx.bfloat16, q4_consts(1, (4, 1, 4), 64)),
             ("swiglu", mx.float16, q4_consts(8, (1, 2, 4), 128)), ("qkv", mx.float16, q4_consts(1, (4, 2, 4), 64)),
             ("qkv_bias", mx.bfloat16, q4_consts(3, (2, 1, 4), 32)),
             ("matvec_norm", mx.bfloat16, q4_consts(1, (8, 1, 4), 64, 1e-6)),
             ("matvec_res", mx.bfloat16, q4_consts(1, (8, 2, 4), 64)),
             ("swiglu_norm", mx.bfloat16, q4_consts(1, (4, 1, 4), 64, 1e-5)),
             ("qkv_bias_norm", mx.bfloat16, q4_consts(1, (8, 1, 4), 64, 1e-6)),
             ("qkv_norm", mx.float16, q4_consts(2, (4, 2, 4), 128, 1e-5)),
             ("attend", mx.bfloat16, {"D": 128, "MAXP": cuda_q4.MAX_POSITIONS, "TRAD": False}),
             ("attend", mx.float16, {"D": 64, "MAXP": cuda_q4.MAX_POSITIONS, "TRAD": True}),
             ("embed", mx.bfloat16, {"I": "uint32_t", "GS": 64})]
    report = ""
    for part in sorted({kind.split("_")[0] for kind, *_ in cases}):  # each with only the header it is given
        src = MLX_STANDIN + cuda_q4.header(part) + "".join(mlx_style_kernel(*c) for c in cases
                                                           if c[0].split("_")[0] == part)
        (tmp_path / f"{part}.cu").write_text(src)
        done = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-O3", "--resource-usage", "-o",
                               str(tmp_path / f"{part}.cubin"), str(tmp_path / f"{part}.cu")],
                              capture_output=True, text=True, timeout=300)
        report += done.stdout + done.stderr
        assert done.returncode == 0, report[-3000:]
    usage = [line for line in report.splitlines() if "stack frame" in line]
    assert len(usage) == len(cases), report[-3000:]
    assert all(line.strip().startswith("0 bytes stack frame, 0 bytes spill stores") for line in usage), usage


# ---------------------------------------------------------------- on the GPU

@gpu
def test_self_check_passes_and_enables():
    assert cuda_q4.enabled(), cuda_q4.check_report()


@gpu
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("n,k,m,gs", [(896, 896, 1, 32), (896, 4864, 2, 64), (3584, 18944, 1, 128),
                                      (4864, 896, 8, 64)])
def test_kernels_match_quantized_matmul(dtype, n, k, m, gs):
    keys = mx.random.split(mx.random.key(n + k + m), 5)
    a, c = layer(n, k, gs, dtype, seed=n + gs), layer(n, k, gs, dtype, seed=n + gs + 1)
    x = mx.random.normal((1, m, k), key=keys[0]).astype(dtype)
    nan, rows = float("nan"), cuda_q4.MAX_ROWS
    out = cuda_q4.q4_matvec(x, *a, gs, init_value=nan, max_rows=rows, min_weights=0)
    assert out.shape == (1, m, n) and out.dtype == dtype
    assert cuda_q4.rel_err(out, cuda_q4.reference(x, a, gs)) < cuda_q4.TOLERANCE
    out = cuda_q4.swiglu(x, *a, *c, gs, init_value=nan, max_rows=rows)
    assert cuda_q4.rel_err(out, cuda_q4.swiglu_reference(x, a, c, gs)) < cuda_q4.TOLERANCE
    lbs = tuple(mx.random.normal((n,), key=kk).astype(dtype) for kk in keys[1:4])
    for got, t, lb in zip(cuda_q4.qkv(x, a, c, a, gs, lbs, init_value=nan, max_rows=rows), (a, c, a), lbs):
        assert cuda_q4.rel_err(got, cuda_q4.reference(x, t, gs) + lb) < cuda_q4.TOLERANCE


@gpu
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_quantized_linear_uses_the_kernel_on_cuda(dtype):
    w, s, b = layer(4096, 2048, 64, dtype, seed=5)
    x = mx.random.normal((1, 1, 2048), key=mx.random.key(6)).astype(dtype)
    fast = matvec_kernel(w, 4)
    assert fast is cuda_q4.q4_matvec
    got = quantized_linear(x, w, s, b, 64, 4, fast)
    assert mx.array_equal(got, cuda_q4.q4_matvec(x, w, s, b, 64)).item()
    assert cuda_q4.rel_err(got, cuda_q4.reference(x, (w, s, b), 64)) < cuda_q4.TOLERANCE


def logits_fed(stage, prompt: list[int], fed: list[int]) -> list[mx.array]:
    """The last position's logits after the prompt and after each of the fed tokens (decode steps)."""
    cache = stage.make_cache()
    out = [stage(mx.array([prompt]), cache)[0, -1]]
    for t in fed:
        out.append(stage(mx.array([[t]]), cache)[0, -1])
    mx.eval(out)
    return out


@gpu
def test_fused_decode_step_matches_the_layers_op_by_op(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from make_model import make_model

    from swarm.model.decoder import load_stage
    stage = load_stage(make_model("qwen2.5-0.5b", tmp_path / "m", layers=2))
    assert all(layer.decode_step is not None for layer in stage.layers)
    prompt, fed = list(range(100, 120)), [7, 300, 9, 4000, 11, 12, 50000, 14]
    fused = logits_fed(stage, prompt, fed)
    for layer in stage.layers:
        layer.decode_step = None
    opwise = logits_fed(stage, prompt, fed)
    assert cuda_q4.rel_err(fused[0], opwise[0]) == 0.0          # the prompt runs op by op both times
    errors = [cuda_q4.rel_err(a, b) for a, b in zip(fused[1:], opwise[1:])]
    assert max(errors) < 3e-2, errors                            # bf16 rounding; a wrong position is O(1)


# ---------------------------------------------------------------- the fused one-token step's host side

def test_step_plans_take_only_what_the_kernels_do(tmp_path):
    dt = mx.bfloat16
    q, k = mx.zeros((1, 1, 4 * 128), dt), mx.zeros((1, 1, 2 * 128), dt)
    cache, pos, inv = mx.zeros((1, 2, 256, 128), dt), mx.zeros((1,), mx.int32), mx.zeros((64,), mx.float32)
    kind, (template, grid, block, shapes) = cuda_q4.attend_plan(q, k, k, cache, cache, pos, inv, 128)
    assert kind == "attend" and grid == (4 * 128, 1, 1) and block == (128, 1, 1)
    assert shapes == [(1, 1, 512)] and ("D", 128) in template
    assert cuda_q4.attend_plan(mx.zeros((1, 1, 3 * 96), dt), mx.zeros((1, 1, 96), dt), mx.zeros((1, 1, 96), dt),
                               mx.zeros((1, 1, 256, 96), dt), mx.zeros((1, 1, 256, 96), dt), pos,
                               mx.zeros((48,), mx.float32), 96) is None              # head_dim 96
    assert cuda_q4.attend_plan(mx.zeros((1, 1, 3 * 128), dt), k, k, cache, cache, pos, inv, 128) is None  # 3 % 2
    assert cuda_q4.attend_plan(q, k, k, cache, cache, pos.astype(mx.uint32), inv, 128) is None
    assert cuda_q4.attend_plan(q, k, k, cache.astype(mx.float16), cache, pos, inv, 128) is None
    assert cuda_q4.attend_plan(mx.zeros((1, 2, 512), dt), k, k, cache, cache, pos, inv, 128) is None     # 2 tokens

    w, s, b = layer(64, 256, dtype=dt)
    x = mx.zeros((1, 1, 256), dt)
    norm = (mx.ones((256,), dt), 1e-6)
    assert cuda_q4.matvec_plan(x, (w, s, b), 64, norm=norm)[0] == "matvec_norm"
    assert cuda_q4.matvec_plan(x, (w, s, b), 64, residual=mx.zeros((1, 1, 64), dt))[0] == "matvec_res"
    assert cuda_q4.matvec_plan(x, (w, s, b), 64, norm=norm, residual=mx.zeros((1, 1, 64), dt)) is None
    assert cuda_q4.matvec_plan(x, (w, s, b), 64, residual=mx.zeros((1, 1, 63), dt)) is None
    assert cuda_q4.matvec_plan(x, (w, s, b), 64, norm=(mx.ones((255,), dt), norm[1])) is None
    assert cuda_q4.matvec_plan(x, (w, s, b), 64, norm=(norm[0], mx.array([1e-6], mx.float32))) is None  # a float
    assert cuda_q4.matvec_plan(x, (w, s, b), 64, norm=(norm[0], 0.0)) is None
    assert cuda_q4.swiglu_plan(x, (w, s, b), (w, s, b), 64, norm)[0] == "swiglu_norm"
    biases = tuple(mx.zeros((64,), dt) for _ in range(3))
    assert cuda_q4.qkv_plan(x, (w, s, b), (w, s, b), (w, s, b), 64, biases, norm)[0] == "qkv_bias_norm"

    ids = mx.zeros((1, 3), mx.uint32)
    kind, (template, grid, _, shapes) = cuda_q4.embed_plan(ids, w, s, b, 64)
    assert kind == "embed" and grid == (3 * 32, 1, 1) and shapes == [(1, 3, 256)] and ("I", mx.uint32) in template
    assert cuda_q4.embed_plan(ids.astype(mx.float32), w, s, b, 64) is None
    assert cuda_q4.embed_plan(mx.zeros((3,), mx.int32), w, s, b, 64) is None
    assert cuda_q4.embed_plan(ids, w, s, b, 128) is None                                # scales of group 64


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
    code = cuda_q4.header("attend")
    line = cuda_q4._included(code, "abc123")
    path = tmp_path / "cake-swarm" / "cuda" / "q4_abc123.cuh"
    assert line == f'#include "{path}"\n' and path.read_text() == code
    path.write_text("tampered")                     # a wrong file is replaced, never compiled
    cuda_q4._included(code, "abc123")
    assert path.read_text() == code
    assert "q4::attend" not in cuda_q4.header("matvec") and "matvec(" in cuda_q4.header("matvec_res")
    assert cuda_q4.header("qkv_bias_norm") == cuda_q4.header("qkv")


@pytest.mark.skipif(ON_GPU, reason="the path off MLX's CUDA back-end")
def test_decoder_layers_keep_the_op_by_op_path_off_cuda():
    from swarm.model.decoder import load_stage
    stage = load_stage(Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tiny-qwen2-4bit")
    assert all(layer.decode_step is None for layer in stage.layers)
