"""Fused 4-bit decode kernels for MLX's CUDA backend: q4 matvec, SwiGLU (gate+up) and q/k/v in one launch.

They read MLX's affine layout once: `weight` uint32 [out, in/8] (eight 4-bit values per word, lowest bits
first), `scales`/`biases` [out, in/group_size], w = scale * q + bias. Each thread streams 16-byte chunks
(32 weights, always inside one group) of R rows with non-caching loads, multiplies them by activations
held in float32, and the partial sums of a row are reduced over a warp and, where several warps share
rows (SPLIT), through shared memory. Per chunk the sum is scale * sum(x*q) + bias * sum(x): q becomes
a float without an int->float conversion by OR-ing the masked nibble into the mantissa of 2^23 (the
nibble at bit 4j then reads as q * 16^j, so x is pre-scaled by 16^-j, exactly).

`enabled()` is True only on the CUDA backend and after a one-time self-check against mx.quantized_matmul
passed; elsewhere (CPU, Metal) nothing here compiles and the callers keep MLX's kernels. Each public
function returns None where it does not apply, and the caller falls back.
"""

from __future__ import annotations

import math

import mlx.core as mx

MAX_ROWS = 8                       # activation rows (tokens) the kernels take
# Where they beat mx.quantized_matmul per call on the H100 (bf16, 2026-11-25): up to 7 rows (at 8 MLX
# switches to its tensor-core kernel and is 4x faster), and for a plain matvec from about 8M weights:
# below that MLX's lower per-launch cost wins (896x896: 3.6 us vs 6.2 us a call; 3584x3584: 10.0 vs 7.4).
FASTER_ROWS = 7
FASTER_WEIGHTS = 8 * 2 ** 20
GROUP_SIZES = (32, 64, 128)
DTYPES = (mx.float16, mx.bfloat16)
TOLERANCE = 1e-3

HEADER = r"""
namespace q4 {

template <typename T> __device__ __forceinline__ float tof(T v) { return static_cast<float>(v); }
template <typename T> __device__ __forceinline__ T rnd(float v) { return static_cast<T>(v); }
template <typename T> __device__ __forceinline__ float round_to(float v) { return tof(rnd<T>(v)); }

// Weights are read exactly once: keep them out of L1 so the activations stay there.
__device__ __forceinline__ uint4 load_weights(const uint32_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Nibble j of a word as a float: j < 5 in place, value q * 16^j (bits 0..19 of the 23-bit mantissa),
// j >= 5 from hi = w >> 20, value q * 16^(j-5).
__device__ __forceinline__ float nibble(uint32_t w, uint32_t hi, int j) {
  const uint32_t bits = j < 5 ? (w & (0xFu << (4 * j))) : (hi & (0xFu << (4 * (j - 5))));
  return __uint_as_float(bits | 0x4B000000u) - 8388608.0f;  // (2^23 + v) - 2^23 == v exactly
}

// 16^-(position of nibble j): multiplying x by it (exact) undoes the scale nibble() leaves.
__device__ __forceinline__ constexpr float nibble_scale(int j) {
  return j == 0 || j == 5 ? 1.0f : j == 1 || j == 6 ? 0.0625f : j == 2 || j == 7 ? 0.00390625f
       : j == 3 ? 0.000244140625f : 1.52587890625e-05f;
}

// RR weight rows (pointers to row starts), M activation rows of K values: acc[r][m] += row_r . x_m
// for the chunks c = gt, gt + TPG, ... of 32 weights each.
template <typename T, int M, int RR, int TPG, int GS>
__device__ __forceinline__ void rows_dot(const T* x, int K, const uint32_t* const* wr, const T* const* sr,
                                         const T* const* br, int gt, float (&acc)[RR][M]) {
  const int chunks = K / 32;
  for (int c = gt; c < chunks; c += TPG) {
    uint4 q[RR];
    float sc[RR], bi[RR];
#pragma unroll
    for (int r = 0; r < RR; ++r) q[r] = load_weights(wr[r] + c * 4);
#pragma unroll
    for (int r = 0; r < RR; ++r) {
      sc[r] = tof(sr[r][(c * 32) / GS]);
      bi[r] = tof(br[r][(c * 32) / GS]);
    }
    float d[RR][M], xsum[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
      xsum[m] = 0.0f;
#pragma unroll
      for (int r = 0; r < RR; ++r) d[r][m] = 0.0f;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float xs[M][8];
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4 u = __ldg(reinterpret_cast<const uint4*>(x + m * K + c * 32 + i * 8));
        const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float f = tof(h[j]);
          xsum[m] += f;
          xs[m][j] = f * nibble_scale(j);
        }
      }
#pragma unroll
      for (int r = 0; r < RR; ++r) {
        const uint32_t w = word(q[r], i), hi = w >> 20;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float v = nibble(w, hi, j);
#pragma unroll
          for (int m = 0; m < M; ++m) d[r][m] = fmaf(xs[m][j], v, d[r][m]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < RR; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[r][m] = fmaf(sc[r], d[r][m], fmaf(bi[r], xsum[m], acc[r][m]));
  }
}

// Sums acc over the SPLIT warps of each row group into red[group][idx] (idx = r * M + m); all threads
// of the block must call it. WPB warps per block.
template <int RR, int M, int SPLIT, int WPB>
__device__ __forceinline__ void reduce_rows(float (&acc)[RR][M], float* red) {
  constexpr int V = RR * M;
  __shared__ float part[WPB][V];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < RR; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (((r * M + m) & 31) == lane) part[warp][r * M + m] = v;
    }
  __syncthreads();
  constexpr int GROUPS = WPB / SPLIT;
  for (int i = threadIdx.x; i < GROUPS * V; i += WPB * 32) {
    const int g = i / V, idx = i % V;
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < SPLIT; ++k) s += part[g * SPLIT + k][idx];
    red[i] = s;
  }
  __syncthreads();
}

// y[m, row] = x[m] . dequant(w[row]) for R rows per row group, GROUPS = WPB / SPLIT groups per block.
template <typename T, int M, int R, int SPLIT, int WPB, int GS>
__device__ void matvec(const T* x, const uint32_t* w, const T* s, const T* b, T* y, int N, int K) {
  constexpr int TPG = 32 * SPLIT, GROUPS = WPB / SPLIT;
  __shared__ float red[GROUPS * R * M];
  const int group = threadIdx.x / TPG, gt = threadIdx.x % TPG;
  const int row0 = (blockIdx.x * GROUPS + group) * R;
  const uint32_t* wr[R];
  const T* sr[R];
  const T* br[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = min(row0 + r, N - 1);
    wr[r] = w + (size_t)row * (K / 8);
    sr[r] = s + (size_t)row * (K / GS);
    br[r] = b + (size_t)row * (K / GS);
  }
  float acc[R][M] = {};
  rows_dot<T, M, R, TPG, GS>(x, K, wr, sr, br, gt, acc);
  reduce_rows<R, M, SPLIT, WPB>(acc, red);
  for (int i = threadIdx.x; i < GROUPS * R * M; i += WPB * 32) {
    const int g = i / (R * M), r = (i % (R * M)) / M, m = i % M;
    const int row = (blockIdx.x * GROUPS + g) * R + r;
    if (row < N) y[(size_t)m * N + row] = rnd<T>(red[i]);
  }
}

// out = silu(g) * u with g, u the two products rounded to T (as the unfused linears return them) and the
// rest in float32, rounded once.
template <typename T, int M, int R, int SPLIT, int WPB, int GS>
__device__ void swiglu(const T* x, const uint32_t* gw, const T* gs, const T* gb, const uint32_t* uw,
                       const T* us, const T* ub, T* y, int N, int K) {
  constexpr int TPG = 32 * SPLIT, GROUPS = WPB / SPLIT, RR = 2 * R;
  __shared__ float red[GROUPS * RR * M];
  const int group = threadIdx.x / TPG, gt = threadIdx.x % TPG;
  const int row0 = (blockIdx.x * GROUPS + group) * R;
  const uint32_t* wr[RR];
  const T* sr[RR];
  const T* br[RR];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = min(row0 + r, N - 1);
    wr[r] = gw + (size_t)row * (K / 8);
    sr[r] = gs + (size_t)row * (K / GS);
    br[r] = gb + (size_t)row * (K / GS);
    wr[R + r] = uw + (size_t)row * (K / 8);
    sr[R + r] = us + (size_t)row * (K / GS);
    br[R + r] = ub + (size_t)row * (K / GS);
  }
  float acc[RR][M] = {};
  rows_dot<T, M, RR, TPG, GS>(x, K, wr, sr, br, gt, acc);
  reduce_rows<RR, M, SPLIT, WPB>(acc, red);
  for (int i = threadIdx.x; i < GROUPS * R * M; i += WPB * 32) {
    const int g = i / (R * M), r = (i % (R * M)) / M, m = i % M;
    const int row = (blockIdx.x * GROUPS + g) * R + r;
    if (row < N) {
      const float gate = round_to<T>(red[g * RR * M + r * M + m]);
      const float up = round_to<T>(red[g * RR * M + (R + r) * M + m]);
      y[(size_t)m * N + row] = rnd<T>(gate / (1.0f + expf(-gate)) * up);
    }
  }
}

// q, k and v of one activation in one launch: blocks [0, nq) compute q, then k, then v; the optional
// linear biases are added after rounding, as `quantized_matmul(...) + bias` does.
template <typename T, int M, int R, int SPLIT, int WPB, int GS, bool HAS_BIAS>
__device__ void qkv(const T* x, int K, const uint32_t* qw, const T* qs, const T* qb, const T* ql, T* yq, int nq,
                    const uint32_t* kw, const T* ks, const T* kb, const T* kl, T* yk, int nk,
                    const uint32_t* vw, const T* vs, const T* vb, const T* vl, T* yv, int nv) {
  constexpr int TPG = 32 * SPLIT, GROUPS = WPB / SPLIT, RB = GROUPS * R;
  __shared__ float red[GROUPS * R * M];
  const int nb0 = (nq + RB - 1) / RB, nb1 = (nk + RB - 1) / RB;
  const int which = blockIdx.x < nb0 ? 0 : blockIdx.x < nb0 + nb1 ? 1 : 2;
  // Selected by value, not by indexing an array, so that nothing goes to local memory.
  const uint32_t* w = which == 0 ? qw : which == 1 ? kw : vw;
  const T* s = which == 0 ? qs : which == 1 ? ks : vs;
  const T* b = which == 0 ? qb : which == 1 ? kb : vb;
  const T* lb = which == 0 ? ql : which == 1 ? kl : vl;
  T* y = which == 0 ? yq : which == 1 ? yk : yv;
  const int N = which == 0 ? nq : which == 1 ? nk : nv;
  const int block = blockIdx.x - (which == 0 ? 0 : which == 1 ? nb0 : nb0 + nb1);
  const int group = threadIdx.x / TPG, gt = threadIdx.x % TPG;
  const int row0 = (block * GROUPS + group) * R;
  const uint32_t* wr[R];
  const T* sr[R];
  const T* br[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = min(row0 + r, N - 1);
    wr[r] = w + (size_t)row * (K / 8);
    sr[r] = s + (size_t)row * (K / GS);
    br[r] = b + (size_t)row * (K / GS);
  }
  float acc[R][M] = {};
  rows_dot<T, M, R, TPG, GS>(x, K, wr, sr, br, gt, acc);
  reduce_rows<R, M, SPLIT, WPB>(acc, red);
  for (int i = threadIdx.x; i < GROUPS * R * M; i += WPB * 32) {
    const int g = i / (R * M), r = (i % (R * M)) / M, m = i % M;
    const int row = (block * GROUPS + g) * R + r;
    if (row < N) {
      float v = red[i];
      if (HAS_BIAS) v = round_to<T>(v) + tof(lb[row]);
      y[(size_t)m * N + row] = rnd<T>(v);
    }
  }
}

}  // namespace q4
"""

# Kernel bodies: MLX writes the signature (inputs as `const T* name`, `name_shape` where used, then the
# outputs) and the template constants T, M, R, SPLIT, WPB, GS (and HAS_BIAS) above the body.
MATVEC_SOURCE = """
  q4::matvec<T, M, R, SPLIT, WPB, GS>(x, w, scales, biases, y, w_shape[0], w_shape[1] * 8);
"""
SWIGLU_SOURCE = """
  q4::swiglu<T, M, R, SPLIT, WPB, GS>(x, gw, gs, gb, uw, us, ub, y, gw_shape[0], gw_shape[1] * 8);
"""
QKV_SOURCE = """
#if QKV_HAS_BIAS
  const T *lq = ql, *lk = kl, *lv = vl;
#else
  const T *lq = nullptr, *lk = nullptr, *lv = nullptr;
#endif
  q4::qkv<T, M, R, SPLIT, WPB, GS, QKV_HAS_BIAS>(x, qw_shape[1] * 8, qw, qs, qb, lq, yq, qw_shape[0],
                                                 kw, ks, kb, lk, yk, kw_shape[0], vw, vs, vb, lv, yv, vw_shape[0]);
#undef QKV_HAS_BIAS
"""

KERNEL_SPECS = {
    # kind: (input names, output names, body)
    "matvec": (["x", "w", "scales", "biases"], ["y"], MATVEC_SOURCE),
    "swiglu": (["x", "gw", "gs", "gb", "uw", "us", "ub"], ["y"], SWIGLU_SOURCE),
    "qkv": (["x", "qw", "qs", "qb", "kw", "ks", "kb", "vw", "vs", "vb"], ["yq", "yk", "yv"],
            "#define QKV_HAS_BIAS 0\n" + QKV_SOURCE),
    "qkv_bias": (["x", "qw", "qs", "qb", "kw", "ks", "kb", "vw", "vs", "vb", "ql", "kl", "vl"], ["yq", "yk", "yv"],
                 "#define QKV_HAS_BIAS 1\n" + QKV_SOURCE),
}

_kernels: dict[str, object] = {}
_enabled: bool | None = None
_check_report: str = ""


def _kernel(kind: str):
    """The mx.fast.cuda_kernel of one kind, built on first use (building one needs MLX's CUDA back-end)."""
    if kind not in _kernels:
        inputs, outputs, body = KERNEL_SPECS[kind]
        _kernels[kind] = mx.fast.cuda_kernel(name=f"q4_{kind}", input_names=inputs, output_names=outputs,
                                             source=body, header=HEADER)
    return _kernels[kind]


def on_cuda() -> bool:
    """Whether the default device is the GPU of MLX's CUDA back-end."""
    cuda = getattr(mx, "cuda", None)
    return (cuda is not None and cuda.is_available() and mx.default_device().type == mx.DeviceType.gpu
            and not mx.metal.is_available())


def launch_config(n: int, k: int, m: int, fused: int = 1) -> tuple[int, int, int]:
    """(R, SPLIT, WPB): rows per row group, warps sharing a row group, warps per block.

    Eight weight rows in flight per thread (R * fused), fewer as activation rows multiply the registers
    a row needs; a row group to one warp unless there are too few warps to keep the memory busy, and
    never less than two 16-byte chunks per thread. Chosen from a sweep on the H100 (2026-11-25): there
    one warp per row group and 8 rows ran fastest on the large shapes, SPLIT 8 slowest everywhere.
    """
    rows = max(1, 8 // (m * fused))
    chunks, split = k // 32, 1
    while split < 4 and -(-n // rows) * split < 1024 and chunks >= 128 * split:
        split *= 2
    return rows, split, 4


def _check_args(x: mx.array, group_size: int, layers, max_rows: int) -> tuple[int, int] | None:
    """(rows of x, K) when x and every (weight, scales, biases) fit these kernels, else None."""
    if x.dtype not in DTYPES or group_size not in GROUP_SIZES or x.ndim < 1:
        return None
    k = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    if not 1 <= rows <= min(max_rows, MAX_ROWS) or k % group_size:
        return None
    for w, s, b in layers:
        if b is None or w.dtype != mx.uint32 or w.ndim != 2 or w.shape[1] * 8 != k:
            return None
        if s.dtype != x.dtype or b.dtype != x.dtype or s.shape != (w.shape[0], k // group_size) or b.shape != s.shape:
            return None
    return rows, k


def _template(dtype, m: int, cfg: tuple[int, int, int], group_size: int) -> list:
    r, split, wpb = cfg
    return [("T", dtype), ("M", m), ("R", r), ("SPLIT", split), ("WPB", wpb), ("GS", group_size)]


def _rows_per_block(cfg: tuple[int, int, int]) -> int:
    r, split, wpb = cfg
    return r * wpb // split


def _grid(n_rows_blocks: int, cfg: tuple[int, int, int]) -> tuple[tuple, tuple]:
    wpb = cfg[2]
    return (n_rows_blocks * wpb * 32, 1, 1), (wpb * 32, 1, 1)   # MLX's grid counts threads, not blocks


# The kernels read x as rows of K contiguous values whatever its leading shape (MLX makes it row
# contiguous), and the outputs take x's leading shape directly: no reshape ops, each of which would cost
# a graph node per call. Decode on the GPU is bound by the host's time per op, so what a call decides
# from shapes and dtypes (applicable? template, grid, output shapes) is worked out once per signature
# and kept in _plans; a call then costs a dict lookup and the launch. max_rows: activation rows taken
# (default: where the kernels are the faster).
_plans: dict[tuple, tuple | None] = {}


def _signature(x, layers, *rest) -> tuple:
    return (x.shape, x.dtype, *((w.shape, w.dtype, s.shape, s.dtype, None if b is None else (b.shape, b.dtype))
                                for w, s, b in layers), *rest)


def _plan(x, layers, group_size: int, max_rows: int, config, fused: int, outputs: int = 1) -> tuple | None:
    """(template, grid, threadgroup, output shapes) for one call signature, or None if not applicable."""
    fit = _check_args(x, group_size, layers, max_rows)
    if fit is None or (fused == 2 and layers[0][0].shape != layers[1][0].shape):
        return None
    m, k = fit
    ns = [w.shape[0] for w, _, _ in layers][:outputs]
    cfg = config or launch_config(sum(ns), k, m, fused)
    grid, block = _grid(sum(-(-n // _rows_per_block(cfg)) for n in ns), cfg)
    return _template(x.dtype, m, cfg, group_size), grid, block, [(*x.shape[:-1], n) for n in ns]


def q4_matvec(x: mx.array, weight: mx.array, scales: mx.array, biases: mx.array, group_size: int, *,
              config: tuple[int, int, int] | None = None, init_value: float | None = None,
              max_rows: int = FASTER_ROWS, min_weights: int = FASTER_WEIGHTS) -> mx.array | None:
    """x @ dequantize(weight).T for a few rows of fp16/bf16 activations (bits 4), or None if not applicable."""
    if weight.size * 8 < min_weights:
        return None
    layers = ((weight, scales, biases),)
    key = _signature(x, layers, "matvec", group_size, max_rows, config)
    if key not in _plans:
        _plans[key] = _plan(x, layers, group_size, max_rows, config, 1)
    plan = _plans[key]
    if plan is None:
        return None
    template, grid, block, shapes = plan
    return _kernel("matvec")(inputs=[x, weight, scales, biases], template=template, grid=grid, threadgroup=block,
                             output_shapes=shapes, output_dtypes=[x.dtype], init_value=init_value)[0]


def swiglu(x: mx.array, gate_w: mx.array, gate_s: mx.array, gate_b: mx.array, up_w: mx.array, up_s: mx.array,
           up_b: mx.array, group_size: int, *, config: tuple[int, int, int] | None = None,
           init_value: float | None = None, max_rows: int = FASTER_ROWS) -> mx.array | None:
    """silu(x @ gate.T) * (x @ up.T) in one kernel, or None if not applicable."""
    layers = ((gate_w, gate_s, gate_b), (up_w, up_s, up_b))
    key = _signature(x, layers, "swiglu", group_size, max_rows, config)
    if key not in _plans:
        _plans[key] = _plan(x, layers, group_size, max_rows, config, 2)
    plan = _plans[key]
    if plan is None:
        return None
    template, grid, block, shapes = plan
    return _kernel("swiglu")(inputs=[x, gate_w, gate_s, gate_b, up_w, up_s, up_b], template=template, grid=grid,
                             threadgroup=block, output_shapes=shapes, output_dtypes=[x.dtype],
                             init_value=init_value)[0]


def qkv(x: mx.array, q: tuple, k: tuple, v: tuple, group_size: int, linear_biases: tuple | None = None, *,
        config: tuple[int, int, int] | None = None, init_value: float | None = None,
        max_rows: int = FASTER_ROWS) -> tuple | None:
    """(x @ Wq.T, x @ Wk.T, x @ Wv.T) (+ their linear biases) in one launch; q/k/v are (weight, scales,
    biases) triples sharing the input dimension. None if not applicable."""
    layers = (q, k, v)
    lb_sig = None if linear_biases is None else tuple(None if lb is None else (lb.shape, lb.dtype)
                                                       for lb in linear_biases)
    key = _signature(x, layers, "qkv", group_size, max_rows, config, lb_sig)
    if key not in _plans:
        plan = _plan(x, layers, group_size, max_rows, config, 1, outputs=3)
        if plan is not None and lb_sig is not None and lb_sig != tuple(((n,), x.dtype) for *_, n in plan[3]):
            plan = None
        _plans[key] = plan
    plan = _plans[key]
    if plan is None:
        return None
    template, grid, block, shapes = plan
    inputs = [x, *q, *k, *v] + (list(linear_biases) if linear_biases is not None else [])
    return tuple(_kernel("qkv_bias" if linear_biases is not None else "qkv")(
        inputs=inputs, template=template, grid=grid, threadgroup=block, output_shapes=shapes,
        output_dtypes=[x.dtype] * 3, init_value=init_value))


def _q4_parts(layer) -> tuple | None:
    """(weight, scales, biases, group_size) of a 4-bit quantized linear layer without a bias, else None."""
    if getattr(layer, "bits", 0) != 4 or "scales" not in layer:
        return None
    return layer.weight, layer.scales, layer.biases, layer.group_size


# The fused launches pay where one projection has FASTER_WEIGHTS or more: at decode the host's time per
# op bounds small models, and there a custom kernel costs more host time than MLX's own (Qwen2.5-0.5B
# shape on the H100: about 330 tok/s fused against 365 unfused; 7B shape: 214 against 170).

def fused_swiglu(x: mx.array, gate_proj, up_proj, min_weights: int = FASTER_WEIGHTS) -> mx.array | None:
    """silu(gate_proj(x)) * up_proj(x) through one kernel, for the engine's MLP; None -> compute it unfused."""
    g, u = _q4_parts(gate_proj), _q4_parts(up_proj)
    if g is None or u is None or g[3] != u[3] or "bias" in gate_proj or "bias" in up_proj:
        return None
    if g[0].size * 8 < min_weights:
        return None
    return swiglu(x, *g[:3], *u[:3], g[3])


def fused_qkv(x: mx.array, q_proj, k_proj, v_proj, min_weights: int = FASTER_WEIGHTS) -> tuple | None:
    """(q_proj(x), k_proj(x), v_proj(x)) through one launch, for the engine's attention; None -> unfused."""
    parts = [_q4_parts(p) for p in (q_proj, k_proj, v_proj)]
    if any(p is None for p in parts) or len({p[3] for p in parts}) != 1 or parts[0][0].size * 8 < min_weights:
        return None
    has_bias = ["bias" in p for p in (q_proj, k_proj, v_proj)]
    if any(has_bias) and not all(has_bias):
        return None
    lbs = tuple(p.bias for p in (q_proj, k_proj, v_proj)) if all(has_bias) else None
    return qkv(x, *(p[:3] for p in parts), parts[0][3], lbs)


def random_q4(n: int, k: int, group_size: int, dtype, key=None) -> tuple[mx.array, mx.array, mx.array]:
    """A random 4-bit layer [n, k] as mx.quantize writes it, with scales/biases in dtype."""
    w = mx.random.normal((n, k), key=key) * 0.02
    q, s, b = mx.quantize(w, group_size=group_size, bits=4)
    return q, s.astype(dtype), b.astype(dtype)


def reference(x: mx.array, layer: tuple, group_size: int) -> mx.array:
    """mx.quantized_matmul in float32 on upcast inputs, rounded to x's dtype: what an exact kernel returns."""
    w, s, b = layer
    f32 = mx.float32
    y = mx.quantized_matmul(x.astype(f32), w, s.astype(f32), b.astype(f32), transpose=True,
                            group_size=group_size, bits=4)
    return y.astype(x.dtype)


def rel_err(out: mx.array, ref: mx.array) -> float:
    """||out - ref|| / ||ref|| in float32; NaN (an unwritten, poisoned output) gives inf."""
    o, r = out.astype(mx.float32), ref.astype(mx.float32)
    err = (mx.linalg.norm((o - r).reshape(-1)) / mx.linalg.norm(r.reshape(-1))).item()
    return err if math.isfinite(err) else math.inf


def self_check(seed: int = 0) -> tuple[bool, str]:
    """Each kernel kind on fresh random inputs against mx.quantized_matmul, outputs poisoned with NaN."""
    key = mx.random.key(seed)
    worst, lines = 0.0, []
    for i, (dtype, gs, m) in enumerate([(mx.float16, 64, 1), (mx.bfloat16, 128, 3), (mx.bfloat16, 32, 8)]):
        keys = mx.random.split(mx.random.split(key, 3)[i], 6)
        n, k, nkv = 320, 1024, 64
        x = mx.random.normal((m, k), key=keys[0]).astype(dtype)
        a, c = random_q4(n, k, gs, dtype, keys[1]), random_q4(n, k, gs, dtype, keys[2])
        kl, vl = random_q4(nkv, k, gs, dtype, keys[3]), random_q4(nkv, k, gs, dtype, keys[4])
        lbs = tuple(mx.random.normal((d,), key=kk).astype(dtype)
                    for d, kk in zip((n, nkv, nkv), mx.random.split(keys[5], 3)))
        nan = float("nan")
        checks = {
            "matvec": (q4_matvec(x, *a, gs, init_value=nan, max_rows=MAX_ROWS, min_weights=0), reference(x, a, gs)),
            "swiglu": (swiglu(x, *a, *c, gs, init_value=nan, max_rows=MAX_ROWS), swiglu_reference(x, a, c, gs)),
        }
        got = qkv(x, a, kl, vl, gs, lbs, init_value=nan, max_rows=MAX_ROWS)
        refs = (reference(x, a, gs) + lbs[0], reference(x, kl, gs) + lbs[1], reference(x, vl, gs) + lbs[2])
        for j, name in enumerate("qkv"):
            checks[f"qkv.{name}"] = (got[j], refs[j])
        for name, (out, ref) in checks.items():
            e = rel_err(out, ref)
            worst = max(worst, e)
            lines.append(f"{name} {dtype} gs={gs} m={m}: rel err {e:.2e}")
    return worst < TOLERANCE, "\n".join(lines)


def swiglu_reference(x: mx.array, gate: tuple, up: tuple, gs: int) -> mx.array:
    """silu(g) * u in float32 from the two reference products, rounded to x's dtype once."""
    g, u = (reference(x, t, gs).astype(mx.float32) for t in (gate, up))
    return (g * mx.sigmoid(g) * u).astype(x.dtype)


def enabled() -> bool:
    """True on MLX's CUDA back-end once the start-up self-check passed (run once, on first call)."""
    global _enabled, _check_report
    if _enabled is None:
        _enabled = False
        if on_cuda():
            try:
                _enabled, _check_report = self_check()
            except Exception as e:  # a kernel that does not build or launch leaves MLX's own in place
                _check_report = f"self-check failed: {type(e).__name__}: {e}"
    return _enabled


def check_report() -> str:
    """What the last self-check measured (empty where none ran)."""
    return _check_report
