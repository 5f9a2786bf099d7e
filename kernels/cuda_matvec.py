"""The q4 matvec: y = x @ dequantize(w).T for 1-16 activation rows, optionally with an RMS-norm folded into
its input or a residual added to its output; `q4_matvec` picks the kernel.

Two kernels compute it. The tensor-core kernel (kernels.cuda_mma) takes 1-16 rows. The SIMT kernel here
takes 1-8 rows and is the fallback: each thread streams 16-byte chunks (32 weights, always inside one group)
of R rows with non-caching loads and multiplies them by activations held in float32; the partial sums of a
row are reduced over a warp and, where several warps share rows (SPLIT), through shared memory. Per chunk
the sum is scale * sum(x*q) + bias * sum(x): q becomes a float in a single AND, the masked nibble read as a
subnormal float (q * 16^j * 2^-149), and x is pre-scaled by a power of two that makes each product
x * q * 2^-85, exactly as a float product would round; one FMA per weight.

Both read MLX's affine layout: `weight` uint32 [out, in/8] (eight 4-bit values per word, lowest bits first),
`scales`/`biases` [out, in/group_size], w = scale * q + bias.
"""

from __future__ import annotations

import math

import mlx.core as mx

from kernels import cuda_mma
from kernels.cuda_common import (COMMON, Recipe, cached, float_bits, header, launch, layers_fit, norm_fits,
                                 norm_signature, passed, q4_parts, shapes_of, signature)

MAX_ROWS = 8                       # activation rows the SIMT kernels take
# Where the SIMT kernel beats mx.quantized_matmul per call on the H100 (bf16, 2026-11-25): up to 7 rows (at 8
# MLX switches to its tensor-core kernel), and for a plain matvec from about 8M weights: below that MLX's
# lower per-launch cost wins (896x896: 3.6 us vs 6.2 us a call; 3584x3584: 10.0 vs 7.4).
SIMT_ROWS = 7
# Rows up to which the SIMT kernel is preferred to the tensor-core one where both passed: on the H100
# (2026-12-05, 18944x3584 bf16) 1948 against 855 GB/s at 1 row, 1549 against 840 at 2, 897 against 804 at 3.
SIMT_FIRST_ROWS = 2
# Rows the q4 products take by default (a plain linear, SwiGLU, q/k/v): up to 7, where they beat MLX's
# kernels per call; from 8 rows mx.quantized_matmul's tensor-core kernel reads about 1.0 TB/s on the H100
# against 0.73-0.81 for ours (2026-12-05). DecodeStep asks for up to cuda_mma.MAX_ROWS (16).
FASTER_ROWS = 7
FASTER_WEIGHTS = 8 * 2 ** 20

SIMT_DOT = r"""
__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Nibble j of a word as a float, in one AND: its bits left in place with a zero exponent make the
// subnormal q * 16^p * 2^-149 (p = j, or j - 5 for j >= 5, taken from hi = w >> 20 so that no nibble
// reaches the exponent bits).
__device__ __forceinline__ float nibble(uint32_t w, uint32_t hi, int j) {
  return __uint_as_float(j < 5 ? (w & (0xFu << (4 * j))) : (hi & (0xFu << (4 * (j - 5)))));
}

// 2^(64 - 4p) for nibble j: x times it times nibble(j) is x * q * 2^-85 (powers of two: exact), a normal
// float for any |x| between 2^-41 and 2^63; PRODUCT_SCALE undoes the 2^-85 once per chunk.
__device__ __forceinline__ constexpr float nibble_scale(int j) {
  return j == 0 || j == 5 ? 0x1p64f : j == 1 || j == 6 ? 0x1p60f : j == 2 || j == 7 ? 0x1p56f
       : j == 3 ? 0x1p52f : 0x1p48f;
}
constexpr float PRODUCT_SCALE = 0x1p85f;

// a * b + c rounded once, subnormal operands kept whatever flush-to-zero mode the compiler was given.
__device__ __forceinline__ float fma_exact(float a, float b, float c) {
  float d;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(d) : "f"(a), "f"(b), "f"(c));
  return d;
}

// RR weight rows (pointers to row starts), M activation rows of K values: acc[r][m] += row_r . x_m
// for the chunks c = gt, gt + TPG, ... of 32 weights each. NORM: x_m is taken times the RMS-norm weight
// nw, and acc[RR][m] sums x_m^2 over the same chunks; after the reduction over the row group that gives
// rms(x_m), and row . (x_m * nw) / rms(x_m) is the product with rms_norm(x_m) (exact in float32).
template <typename T, int M, int RR, int TPG, int GS, bool NORM>
__device__ __forceinline__ void rows_dot(const T* x, int K, const uint32_t* const* wr, const T* const* sr,
                                         const T* const* br, int gt, float (&acc)[RR + NORM][M], const T* nw) {
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
      uint4 un = {0u, 0u, 0u, 0u};
      if (NORM) un = __ldg(reinterpret_cast<const uint4*>(nw + c * 32 + i * 8));
      const T* g = reinterpret_cast<const T*>(&un);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4 u = __ldg(reinterpret_cast<const uint4*>(x + m * K + c * 32 + i * 8));
        const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          float f = tof(h[j]);
          if (NORM) {
            acc[RR][m] = fmaf(f, f, acc[RR][m]);
            f *= tof(g[j]);
          }
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
          for (int m = 0; m < M; ++m) d[r][m] = fma_exact(xs[m][j], v, d[r][m]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < RR; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m)
        acc[r][m] = fma_exact(sc[r] * PRODUCT_SCALE, d[r][m], fmaf(bi[r], xsum[m], acc[r][m]));
  }
}

// Row pointers of R rows from row0 (rows past N repeat the last: computed, never stored).
template <typename T, int R, int GS>
__device__ __forceinline__ void row_pointers(const uint32_t* w, const T* s, const T* b, int row0, int N, int K,
                                             const uint32_t** wr, const T** sr, const T** br) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = min(row0 + r, N - 1);
    wr[r] = w + (size_t)row * (K / 8);
    sr[r] = s + (size_t)row * (K / GS);
    br[r] = b + (size_t)row * (K / GS);
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
"""

MATVEC = r"""
// y[m, row] = x[m] . dequant(w[row]) for R rows per row group, GROUPS = WPB / SPLIT groups per block.
// NORM: x RMS-normalized first (weight nw, epsilon eps); RES: y = round(x . w) + res, as `res + linear(x)`.
template <typename T, int M, int R, int SPLIT, int WPB, int GS, bool NORM, bool RES>
__device__ void matvec(const T* x, const uint32_t* w, const T* s, const T* b, T* y, int N, int K,
                       const T* nw, float eps, const T* res) {
  constexpr int TPG = 32 * SPLIT, GROUPS = WPB / SPLIT, RN = R + NORM;
  __shared__ float red[GROUPS * RN * M];
  const int group = threadIdx.x / TPG, gt = threadIdx.x % TPG;
  const uint32_t* wr[R];
  const T* sr[R];
  const T* br[R];
  row_pointers<T, R, GS>(w, s, b, (blockIdx.x * GROUPS + group) * R, N, K, wr, sr, br);
  float acc[RN][M] = {};
  rows_dot<T, M, R, TPG, GS, NORM>(x, K, wr, sr, br, gt, acc, nw);
  reduce_rows<RN, M, SPLIT, WPB>(acc, red);
  for (int i = threadIdx.x; i < GROUPS * R * M; i += WPB * 32) {
    const int g = i / (R * M), r = (i % (R * M)) / M, m = i % M;
    const int row = (blockIdx.x * GROUPS + g) * R + r;
    float v = red[g * RN * M + r * M + m];
    if (NORM) v *= inv_rms(red[g * RN * M + R * M + m], K, eps);
    if (row < N) y[(size_t)m * N + row] = rnd<T>(RES ? round_to<T>(v) + tof(res[(size_t)m * N + row]) : v);
  }
}
"""


def simt_code(part: str) -> str:
    """The device code of a SIMT kernel: the shared helpers, the row dot product and the kernel's part."""
    return header(COMMON, SIMT_DOT, part)


def _matvec_spec(norm: bool, res: bool) -> tuple:
    nw, eps = ("nw", "__int_as_float(EPS)") if norm else ("nullptr", "0.0f")
    inputs = ["x", "w", "scales", "biases", *(["nw"] if norm else []), *(["res"] if res else [])]
    body = (f"  q4::matvec<T, M, R, SPLIT, WPB, GS, {str(norm).lower()}, {str(res).lower()}>(x, w, scales, biases, y, "
            f"w_shape[0], w_shape[1] * 8, {nw}, {eps}, {'res' if res else 'nullptr'});")
    return inputs, ["y"], body


SPECS = {"matvec": _matvec_spec(False, False), "matvec_norm": _matvec_spec(True, False),
         "matvec_res": _matvec_spec(False, True)}


def launch_config(n: int, k: int, m: int, fused: int = 1) -> tuple[int, int, int]:
    """(R, SPLIT, WPB) of the SIMT kernels: rows per row group, warps sharing a row group, warps per block.

    Eight weight rows in flight per thread (R * fused), fewer as activation rows multiply the registers
    a row needs; a row group to one warp unless there are too few warps to keep the memory busy, and
    never less than two 16-byte chunks per thread. Chosen from sweeps on the H100 (2026-11-25/26): one warp
    per row group and 8 rows fastest on the large shapes; blocks of 8 warps where few row groups share
    no rows (q/k/v 12.0 us at (8, 1, 8) against 12.4 at (8, 1, 4)); down_proj (SPLIT 4) faster with 4.
    """
    rows = max(1, 8 // (m * fused))
    chunks, split = k // 32, 1
    while split < 4 and -(-n // rows) * split < 1024 and chunks >= 128 * split:
        split *= 2
    return rows, split, 8 if split == 1 and -(-n // rows) < 2048 else 4


def use_mma(x: mx.array, path: str | None) -> bool:
    """Whether a call tries the tensor-core kernel first: asked for, or (path None) passed its self-check and
    more rows than SIMT_FIRST_ROWS or the SIMT kernel off."""
    if path is not None:
        return path == "mma"
    rows = math.prod(x.shape[:-1])
    return bool(passed.get("mma")) and (rows > SIMT_FIRST_ROWS or not passed.get("simt"))


def simt_rows(max_rows: int, path: str | None) -> int:
    """Rows the SIMT kernel takes: up to 8 when asked for, else where it beats MLX's kernels."""
    return max_rows if path == "simt" else min(max_rows, SIMT_ROWS)


def simt_template(dtype, m: int, cfg: tuple[int, int, int], group_size: int, eps: float | None = None) -> tuple:
    r, split, wpb = cfg
    return (("T", dtype), ("M", m), ("R", r), ("SPLIT", split), ("WPB", wpb), ("GS", group_size),
            *((("EPS", float_bits(eps)),) if eps is not None else ()))


def simt_plan(kind: str, spec: tuple, code: str, x, layers, group_size: int, max_rows: int, config, fused: int,
              outputs: int = 1, eps: float | None = None) -> tuple | None:
    """(kernel, grid, threadgroup, output shapes) of a SIMT kernel for one call signature, or None."""
    fit = layers_fit(x, group_size, layers, min(max_rows, MAX_ROWS))
    if fit is None or (fused == 2 and layers[0][0].shape != layers[1][0].shape):
        return None
    m, k = fit
    ns = [w.shape[0] for w, _, _ in layers][:outputs]
    cfg = config or launch_config(sum(ns), k, m, fused)
    r, split, wpb = cfg
    blocks = sum(-(-n // (r * wpb // split)) for n in ns)
    recipe = Recipe(kind, spec, code, simt_template(x.dtype, m, cfg, group_size, eps))
    return recipe, (blocks * wpb * 32, 1, 1), (wpb * 32, 1, 1), [(*x.shape[:-1], n) for n in ns]


def matvec_plan(x: mx.array, layer: tuple, group_size: int, norm: tuple | None = None,
                residual: mx.array | None = None, config=None, max_rows: int = FASTER_ROWS,
                path: str | None = None) -> tuple | None:
    """(kernel kind, launch plan) of q4_matvec for these shapes, or None if no kernel applies.

    path: "mma" (tensor cores, 1-16 rows), "simt" (1-8 rows) or None: the tensor-core kernel where its
    self-check passed, else the SIMT kernel up to SIMT_ROWS rows (where it beats MLX's)."""
    def make():
        if not norm_fits(x, norm) or norm is not None and residual is not None:
            return None
        kind = "matvec_norm" if norm else "matvec_res" if residual is not None else "matvec"
        eps = None if norm is None else norm[1]
        if use_mma(x, path):
            plan = cuda_mma.matvec_plan(x, layer, group_size, norm, residual is not None, config, max_rows)
            if plan is not None or path == "mma":
                return None if plan is None else ("mma_" + kind, plan)
        plan = simt_plan(kind, SPECS[kind], simt_code(MATVEC), x, (layer,), group_size, simt_rows(max_rows, path),
                         config, 1, eps=eps)
        return None if plan is None else (kind, plan)

    if residual is not None and residual.shape != (*x.shape[:-1], layer[0].shape[0]):
        return None
    if residual is not None and residual.dtype != x.dtype:
        return None
    return cached(signature(x, (layer,), "matvec", group_size, max_rows, config, norm_signature(norm),
                            shapes_of(residual), path, passed.get("mma"), passed.get("simt")), make)


def q4_matvec(x: mx.array, weight: mx.array, scales: mx.array, biases: mx.array, group_size: int, *,
              norm: tuple | None = None, residual: mx.array | None = None, config: tuple | None = None,
              init_value: float | None = None, max_rows: int = FASTER_ROWS, min_weights: int = FASTER_WEIGHTS,
              path: str | None = None) -> mx.array | None:
    """x @ dequantize(weight).T for 1-16 rows of fp16/bf16 activations (bits 4), or None if not applicable.

    norm=(weight, eps): of rms_norm(x) instead; residual: plus residual (one of the two at most)."""
    if weight.size * 8 < min_weights:
        return None
    found = matvec_plan(x, (weight, scales, biases), group_size, norm, residual, config, max_rows, path)
    if found is None:
        return None
    extra = [*(norm or ())[:1], *([residual] if residual is not None else [])]
    return launch(found[1], [x, weight, scales, biases, *extra], x.dtype, init_value)[0]


def fused_linear(x: mx.array, proj, residual: mx.array | None = None) -> mx.array | None:
    """proj(x) (+ residual) through one kernel whatever the layer's size; None -> compute it unfused."""
    parts = q4_parts(proj)
    if parts is None or "bias" in proj:
        return None
    return q4_matvec(x, *parts[:3], parts[3], residual=residual, min_weights=0)
