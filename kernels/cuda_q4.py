"""Fused 4-bit decode kernels for MLX's CUDA backend: q4 matvec (optionally with an RMS-norm folded into
its input or a residual added to its output), SwiGLU (gate+up) and q/k/v in one launch, RoPE + attention
for one new position, the embedding lookup, and `DecodeStep`: a decoder layer's one-token step in five
launches.

They read MLX's affine layout once: `weight` uint32 [out, in/8] (eight 4-bit values per word, lowest bits
first), `scales`/`biases` [out, in/group_size], w = scale * q + bias. Each thread streams 16-byte chunks
(32 weights, always inside one group) of R rows with non-caching loads, multiplies them by activations
held in float32, and the partial sums of a row are reduced over a warp and, where several warps share
rows (SPLIT), through shared memory. Per chunk the sum is scale * sum(x*q) + bias * sum(x): q becomes
a float in a single AND, the masked nibble read as a subnormal float (q * 16^j * 2^-149), and x is
pre-scaled by a power of two that makes each product x * q * 2^-85, exactly as a float product would
round; one FMA per weight, where an int->float conversion or a magic-number subtraction costs another
instruction per weight, and decode's kernels are bound by instruction issue as much as by memory.

`enabled()` is True only on the CUDA backend and after a one-time self-check against mx.quantized_matmul
passed; elsewhere (CPU, Metal) nothing here compiles and the callers keep MLX's kernels. Each public
function returns None where it does not apply, and the caller falls back.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from pathlib import Path

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

# CUDA sources by part, each kernel kind compiled with only the parts it needs (MLX passes a kernel's whole
# source with every call, so smaller is cheaper per launch).
COMMON = r"""
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

"""

DOT = r"""
// RR weight rows (pointers to row starts), M activation rows of K values: acc[r][m] += row_r . x_m
// for the chunks c = gt, gt + TPG, ... of 32 weights each. NORM: x_m is taken times the RMS-norm weight
// nw, and acc[RR][m] sums x_m^2 over the same chunks; after the reduction over the row group that gives
// rms(x_m), and row . (x_m * nw) / rms(x_m) is the product with rms_norm(x_m) (inv_rms(), exact in
// float32, without rounding the normalized x to T). The activations are read once either way.
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

// 1 / rms of an activation row of K values from its reduced sum of squares, as mx.fast.rms_norm computes it.
__device__ __forceinline__ float inv_rms(float sum_sq, int K, float eps) { return rsqrtf(sum_sq / K + eps); }

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

SWIGLU = r"""
// out = silu(g) * u with g, u the two products rounded to T (as the unfused linears return them) and the
// rest in float32, rounded once.
template <typename T, int M, int R, int SPLIT, int WPB, int GS, bool NORM>
__device__ void swiglu(const T* x, const uint32_t* gw, const T* gs, const T* gb, const uint32_t* uw,
                       const T* us, const T* ub, T* y, int N, int K, const T* nw, float eps) {
  constexpr int TPG = 32 * SPLIT, GROUPS = WPB / SPLIT, RR = 2 * R, RN = RR + NORM;
  __shared__ float red[GROUPS * RN * M];
  const int group = threadIdx.x / TPG, gt = threadIdx.x % TPG;
  const int row0 = (blockIdx.x * GROUPS + group) * R;
  const uint32_t* wr[RR];
  const T* sr[RR];
  const T* br[RR];
  row_pointers<T, R, GS>(gw, gs, gb, row0, N, K, wr, sr, br);
  row_pointers<T, R, GS>(uw, us, ub, row0, N, K, wr + R, sr + R, br + R);
  float acc[RN][M] = {};
  rows_dot<T, M, RR, TPG, GS, NORM>(x, K, wr, sr, br, gt, acc, nw);
  reduce_rows<RN, M, SPLIT, WPB>(acc, red);
  for (int i = threadIdx.x; i < GROUPS * R * M; i += WPB * 32) {
    const int g = i / (R * M), r = (i % (R * M)) / M, m = i % M;
    const int row = (blockIdx.x * GROUPS + g) * R + r;
    if (row < N) {
      const float scale = NORM ? inv_rms(red[g * RN * M + RR * M + m], K, eps) : 1.0f;
      const float gate = round_to<T>(red[g * RN * M + r * M + m] * scale);
      const float up = round_to<T>(red[g * RN * M + (R + r) * M + m] * scale);
      y[(size_t)m * N + row] = rnd<T>(gate / (1.0f + expf(-gate)) * up);
    }
  }
}
"""

QKV = r"""
// q, k and v of one activation in one launch: blocks [0, nq) compute q, then k, then v; the optional
// linear biases are added after rounding, as `quantized_matmul(...) + bias` does.
template <typename T, int M, int R, int SPLIT, int WPB, int GS, bool HAS_BIAS, bool NORM>
__device__ void qkv(const T* x, int K, const uint32_t* qw, const T* qs, const T* qb, const T* ql, T* yq, int nq,
                    const uint32_t* kw, const T* ks, const T* kb, const T* kl, T* yk, int nk,
                    const uint32_t* vw, const T* vs, const T* vb, const T* vl, T* yv, int nv,
                    const T* nw, float eps) {
  constexpr int TPG = 32 * SPLIT, GROUPS = WPB / SPLIT, RB = GROUPS * R, RN = R + NORM;
  __shared__ float red[GROUPS * RN * M];
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
  const uint32_t* wr[R];
  const T* sr[R];
  const T* br[R];
  row_pointers<T, R, GS>(w, s, b, (block * GROUPS + group) * R, N, K, wr, sr, br);
  float acc[RN][M] = {};
  rows_dot<T, M, R, TPG, GS, NORM>(x, K, wr, sr, br, gt, acc, nw);
  reduce_rows<RN, M, SPLIT, WPB>(acc, red);
  for (int i = threadIdx.x; i < GROUPS * R * M; i += WPB * 32) {
    const int g = i / (R * M), r = (i % (R * M)) / M, m = i % M;
    const int row = (block * GROUPS + g) * R + r;
    if (row < N) {
      float v = red[g * RN * M + r * M + m];
      if (NORM) v *= inv_rms(red[g * RN * M + R * M + m], K, eps);
      if (HAS_BIAS) v = round_to<T>(v) + tof(lb[row]);
      y[(size_t)m * N + row] = rnd<T>(v);
    }
  }
}

"""

ATTEND = r"""
// Block-wide sum (ADD) or max of one value per thread; every thread gets the result. buf: 32 floats.
template <bool ADD>
__device__ __forceinline__ float block_reduce(float v, float* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float u = __shfl_xor_sync(0xffffffffu, v, o);
    v = ADD ? v + u : fmaxf(v, u);
  }
  __syncthreads();  // buf may still be read by a previous call
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  v = ADD ? 0.0f : -__int_as_float(0x7f800000);
  for (int i = 0; i < warps; ++i) v = ADD ? v + buf[i] : fmaxf(v, buf[i]);
  return v;
}

// Attention for one new position `pos` (pos_p[0]) of query head blockIdx.x, batch row blockIdx.y:
// RoPE (angle pos * inv_freq[i]; pairs (i, i + D/2), or (2i, 2i + 1) when TRAD) on q and on the new k,
// rounded to T as mx.fast.rope returns them; then softmax(q . k_t / sqrt(D)) v_t over t in [0, pos], the
// cache (B, KV, cap, D) giving t < pos and the new k, v giving t = pos. Writes out (B, 1, H * D), and the
// new k (roped) and v into the cache at pos, in place: the cache arrays are inputs that MLX does not
// know to change, so nothing may read them at pos or beyond within the same graph except this kernel.
template <typename T, int D, int MAXP, bool TRAD>
__device__ void attend(const T* q, const T* k, const T* v, T* kc, T* vc, const int* pos_p,
                       const float* inv_freq, T* out, int H, int KV, int cap) {
  __shared__ float qs[D], kn[D], vn[D], p[MAXP], buf[32];
  const int h = blockIdx.x, b = blockIdx.y, g = h / (H / KV), tid = threadIdx.x, nt = blockDim.x;
  const int pos = pos_p[0];
  const T* qh = q + ((size_t)b * H + h) * D;
  const T* kh = k + ((size_t)b * KV + g) * D;
  const T* vh = v + ((size_t)b * KV + g) * D;
  for (int i = tid; i < D / 2; i += nt) {
    const int a = TRAD ? 2 * i : i, c = TRAD ? 2 * i + 1 : i + D / 2;
    float sn, cs;
    sincosf(pos * inv_freq[i], &sn, &cs);
    const float q0 = tof(qh[a]), q1 = tof(qh[c]), k0 = tof(kh[a]), k1 = tof(kh[c]);
    qs[a] = round_to<T>(q0 * cs - q1 * sn);
    qs[c] = round_to<T>(q0 * sn + q1 * cs);
    kn[a] = round_to<T>(k0 * cs - k1 * sn);
    kn[c] = round_to<T>(k0 * sn + k1 * cs);
  }
  for (int i = tid; i < D; i += nt) vn[i] = tof(vh[i]);
  __syncthreads();
  if (h % (H / KV) == 0) {  // one block of the group writes the new position; all read only t < pos
    for (int i = tid; i < D; i += nt) {
      kc[(((size_t)b * KV + g) * cap + pos) * D + i] = rnd<T>(kn[i]);
      vc[(((size_t)b * KV + g) * cap + pos) * D + i] = vh[i];
    }
  }
  const float scale = rsqrtf((float)D);
  const T* kg = kc + ((size_t)b * KV + g) * cap * D;
  float top = -__int_as_float(0x7f800000);  // -inf
  for (int t = tid; t <= pos; t += nt) {
    float s = 0.0f;
    if (t == pos) {
#pragma unroll
      for (int i = 0; i < D; ++i) s = fmaf(qs[i], kn[i], s);
    } else {
      const uint4* row = reinterpret_cast<const uint4*>(kg + (size_t)t * D);
#pragma unroll
      for (int c = 0; c < D / 8; ++c) {
        const uint4 u = row[c];
        const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int j = 0; j < 8; ++j) s = fmaf(qs[c * 8 + j], tof(e[j]), s);
      }
    }
    s *= scale;
    p[t] = s;
    top = fmaxf(top, s);
  }
  top = block_reduce<false>(top, buf);
  float sum = 0.0f;
  for (int t = tid; t <= pos; t += nt) {
    const float e = expf(p[t] - top);
    p[t] = e;
    sum += e;
  }
  sum = block_reduce<true>(sum, buf);  // its barriers also publish p
  const T* vg = vc + ((size_t)b * KV + g) * cap * D;
  for (int i = tid; i < D; i += nt) {
    float acc = p[pos] * vn[i];
#pragma unroll 8
    for (int t = 0; t < pos; ++t) acc = fmaf(p[t], tof(vg[(size_t)t * D + i]), acc);
    out[((size_t)b * H + h) * D + i] = rnd<T>(acc / sum);
  }
}

"""

EMBED = r"""
// Rows ids[i] of a 4-bit matrix, dequantized: out[i, :] = scale * q + bias. One thread per word (8 values).
template <typename T, typename I, int GS>
__device__ void embed(const I* ids, const uint32_t* w, const T* s, const T* b, T* out, int n, int words, int V) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= n * words) return;
  const int i = t / words, j = t % words;
  const long long id = static_cast<long long>(ids[i]);
  const size_t row = id < 0 ? 0 : id >= V ? V - 1 : id;  // callers check ids; this keeps every read in bounds
  const uint32_t q = w[row * words + j];
  const size_t g = row * (words * 8 / GS) + (j * 8) / GS;
  const float sc = tof(s[g]), bi = tof(b[g]);
  T* o = out + (size_t)i * words * 8 + j * 8;
#pragma unroll
  for (int k = 0; k < 8; ++k) o[k] = rnd<T>(fmaf(sc, (float)((q >> (4 * k)) & 0xFu), bi));
}
"""

PARTS = {"matvec": (COMMON, DOT, MATVEC), "swiglu": (COMMON, DOT, SWIGLU), "qkv": (COMMON, DOT, QKV),
         "attend": (COMMON, ATTEND), "embed": (COMMON, EMBED)}


def header(kind: str) -> str:
    """The device code a kernel kind ('matvec_res', 'qkv_bias_norm', ...) needs, in namespace q4."""
    return "namespace q4 {\n" + "\n".join(PARTS[kind.split("_")[0]]) + "\n}  // namespace q4\n"


# Kernel bodies: MLX writes the signature (inputs as `const T* name`, `name_shape` where used, then the
# outputs); kernel_body() declares the constants (T, M, R, SPLIT, WPB, GS, ...) above the body. Variants:
# `_norm` takes the RMS-norm weight of its input (nw) and its epsilon as the constant EPS (the float's
# bits: a constant costs no memory read), `_res` a residual added to the output, `_bias` q/k/v's linear
# biases.
def _spec(kind: str, norm: bool = False, res: bool = False, bias: bool = False) -> tuple[list, list, str]:
    extra = ["nw"] if norm else []
    nw, eps = ("nw", "__int_as_float(EPS)") if norm else ("nullptr", "0.0f")
    flag = "true" if norm else "false"
    if kind == "matvec":
        inputs = ["x", "w", "scales", "biases", *extra] + (["res"] if res else [])
        body = (f"  q4::matvec<T, M, R, SPLIT, WPB, GS, {flag}, {'true' if res else 'false'}>(x, w, scales, biases, y, "
                f"w_shape[0], w_shape[1] * 8, {nw}, {eps}, {'res' if res else 'nullptr'});")
        return inputs, ["y"], body
    if kind == "swiglu":
        inputs = ["x", "gw", "gs", "gb", "uw", "us", "ub", *extra]
        body = (f"  q4::swiglu<T, M, R, SPLIT, WPB, GS, {flag}>(x, gw, gs, gb, uw, us, ub, y, gw_shape[0], "
                f"gw_shape[1] * 8, {nw}, {eps});")
        return inputs, ["y"], body
    inputs = ["x", "qw", "qs", "qb", "kw", "ks", "kb", "vw", "vs", "vb", *extra] + (["ql", "kl", "vl"] if bias else [])
    lq, lk, lv = ("ql", "kl", "vl") if bias else ("nullptr",) * 3
    body = (f"  q4::qkv<T, M, R, SPLIT, WPB, GS, {'true' if bias else 'false'}, {flag}>(x, qw_shape[1] * 8, "
            f"qw, qs, qb, {lq}, yq, qw_shape[0], kw, ks, kb, {lk}, yk, kw_shape[0], vw, vs, vb, {lv}, yv, vw_shape[0], "
            f"{nw}, {eps});")
    return inputs, ["yq", "yk", "yv"], body


ATTEND_SPEC = (["q", "k", "v", "kc", "vc", "pos", "inv_freq", "after"], ["out"],
               ("  q4::attend<T, D, MAXP, TRAD>(q, k, v, const_cast<T*>(kc), const_cast<T*>(vc), pos, inv_freq, "
                "out, q_shape[2] / D, k_shape[2] / D, kc_shape[2]);"))

EMBED_SPEC = (["ids", "w", "scales", "biases"], ["out"],
              "  q4::embed<T, I, GS>(ids, w, scales, biases, out, ids_shape[0] * ids_shape[1], w_shape[1], w_shape[0]);")

KERNEL_SPECS = {
    "matvec": _spec("matvec"), "matvec_norm": _spec("matvec", norm=True), "matvec_res": _spec("matvec", res=True),
    "swiglu": _spec("swiglu"), "swiglu_norm": _spec("swiglu", norm=True),
    "qkv": _spec("qkv"), "qkv_bias": _spec("qkv", bias=True),
    "qkv_norm": _spec("qkv", norm=True), "qkv_bias_norm": _spec("qkv", norm=True, bias=True),
    "attend": ATTEND_SPEC, "embed": EMBED_SPEC,
}
MAX_POSITIONS = 8192   # positions the attention kernel holds scores for (32 KB of shared memory)
HEAD_DIMS = (64, 128)

_kernels: dict[tuple, object] = {}
_enabled: bool | None = None
_check_report: str = ""
CUDA_TYPES = {mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.float32: "float", mx.int32: "int32_t",
              mx.uint32: "uint32_t"}


def kernel_body(kind: str, template: tuple) -> str:
    """The body of a kernel kind with its constants (T, M, R, ...) declared first, as MLX declares template
    arguments."""
    lines = [f"  using {name} = {CUDA_TYPES[v]};" if isinstance(v, mx.Dtype) else
             f"  constexpr {'bool' if isinstance(v, bool) else 'int'} {name} = {str(v).lower()};"
             for name, v in template]
    return "\n".join([*lines, KERNEL_SPECS[kind][2]])


def _kernel(kind: str, template: tuple):
    """The mx.fast.cuda_kernel of one kind and one set of constants, built on first use (building one needs
    MLX's CUDA back-end).

    The constants are written into the source rather than passed as MLX template arguments, which MLX
    formats into the source anew at every launch; host time per launch bounds decode. The name carries a
    hash of the source: MLX caches compiled kernels on disk by name, and a kernel changed by an upgrade
    must not run the old code. MLX also copies a kernel's whole source into every launch (a few
    microseconds per launch for our 5-8 KB), so the code is included from a file instead
    (`include_headers`)."""
    key = (kind, template)
    if key not in _kernels:
        inputs, outputs, _ = KERNEL_SPECS[kind]
        code, body = header(kind), kernel_body(kind, template)
        digest = hashlib.sha256((code + body).encode()).hexdigest()[:16]
        _kernels[key] = mx.fast.cuda_kernel(name=f"q4_{kind}_{digest}", input_names=inputs, output_names=outputs,
                                            source=body, header=_included(code, digest) if include_headers else code)
    return _kernels[key]


include_headers = True


def _included(code: str, digest: str) -> str:
    """A one-line header including `code` from a file named by its hash (in the user's cache folder)."""
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cake-swarm" / "cuda"
    path = folder / f"q4_{digest}.cuh"
    if not path.exists() or path.read_text() != code:
        folder.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f"{path.name}.{os.getpid()}.part")
        part.write_text(code)
        os.replace(part, path)
    return f'#include "{path}"\n'


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
    one warp per row group and 8 rows ran fastest on the large shapes, SPLIT 8 slowest everywhere. Blocks of
    8 warps where few row groups share no rows: the fused one-token step's sweep (2026-11-26, 7B shapes)
    measured q/k/v 12.0 us at (8, 1, 8) against 12.4 at (8, 1, 4), o_proj 6.4 against 6.5, while down_proj
    (SPLIT 4) ran slower with 8 warps (23.6 against 22.1 us) and SwiGLU is best at (4, 1, 4). The same
    sweep after the one-AND dequantization (third session) found this rule's choice best or within 0.8 us
    of the best for all four.
    """
    rows = max(1, 8 // (m * fused))
    chunks, split = k // 32, 1
    while split < 4 and -(-n // rows) * split < 1024 and chunks >= 128 * split:
        split *= 2
    return rows, split, 8 if split == 1 and -(-n // rows) < 2048 else 4


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


def _norm_fits(x: mx.array, norm: tuple | None) -> bool:
    """norm: None, or (weight (K,) in x's dtype, epsilon (a positive float))."""
    return norm is None or (norm[0].shape == (x.shape[-1],) and norm[0].dtype == x.dtype
                            and isinstance(norm[1], float) and norm[1] > 0)


def _eps(norm: tuple | None) -> float | None:
    return None if norm is None else norm[1]


def _norm_sig(norm: tuple | None) -> tuple | None:
    return None if norm is None else (norm[0].shape, norm[0].dtype, norm[1])


def float_bits(value: float) -> int:
    """The bits of value as a float32, as a signed int (a template constant; the kernel reads it back)."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


def _template(dtype, m: int, cfg: tuple[int, int, int], group_size: int, eps: float | None = None) -> tuple:
    r, split, wpb = cfg
    return (("T", dtype), ("M", m), ("R", r), ("SPLIT", split), ("WPB", wpb), ("GS", group_size),
            *((("EPS", float_bits(eps)),) if eps is not None else ()))


def _rows_per_block(cfg: tuple[int, int, int]) -> int:
    r, split, wpb = cfg
    return r * wpb // split


def _grid(n_rows_blocks: int, cfg: tuple[int, int, int]) -> tuple[tuple, tuple]:
    wpb = cfg[2]
    return (n_rows_blocks * wpb * 32, 1, 1), (wpb * 32, 1, 1)   # MLX's grid counts threads, not blocks


# The kernels read x as rows of K contiguous values whatever its leading shape (MLX makes it row
# contiguous), and the outputs take x's leading shape directly: no reshape ops, each of which would cost
# a graph node per call. The host's time per op bounds decode on the GPU as much as the kernels do, so
# what a call decides from shapes and dtypes (applicable? template, grid, output shapes) is worked out
# once per signature and kept in _plans; a call then costs a dict lookup and the launch. max_rows:
# activation rows taken (default: where the kernels are the faster).
_plans: dict[tuple, tuple | None] = {}


def _signature(x, layers, *rest) -> tuple:
    return (x.shape, x.dtype, *((w.shape, w.dtype, s.shape, s.dtype, None if b is None else (b.shape, b.dtype))
                                for w, s, b in layers), *rest)


def _shapes(*arrays) -> tuple:
    return tuple(None if a is None else (a.shape, a.dtype) for a in arrays)


def _plan(x, layers, group_size: int, max_rows: int, config, fused: int, outputs: int = 1,
          eps: float | None = None) -> tuple | None:
    """(template, grid, threadgroup, output shapes) for one call signature, or None if not applicable."""
    fit = _check_args(x, group_size, layers, max_rows)
    if fit is None or (fused == 2 and layers[0][0].shape != layers[1][0].shape):
        return None
    m, k = fit
    ns = [w.shape[0] for w, _, _ in layers][:outputs]
    cfg = config or launch_config(sum(ns), k, m, fused)
    grid, block = _grid(sum(-(-n // _rows_per_block(cfg)) for n in ns), cfg)
    return _template(x.dtype, m, cfg, group_size, eps), grid, block, [(*x.shape[:-1], n) for n in ns]


def _launch(kind: str, plan: tuple, inputs: list, dtype, init_value: float | None = None) -> list:
    template, grid, block, shapes = plan
    return _kernel(kind, template)(inputs=inputs, grid=grid, threadgroup=block, output_shapes=shapes,
                                   output_dtypes=[dtype] * len(shapes), init_value=init_value)


def _cached(key: tuple, make) -> tuple | None:
    if key not in _plans:
        _plans[key] = make()
    return _plans[key]


def matvec_plan(x: mx.array, layer: tuple, group_size: int, norm: tuple | None = None,
                residual: mx.array | None = None, config=None, max_rows: int = FASTER_ROWS) -> tuple | None:
    """(kernel kind, launch plan) of q4_matvec for these shapes, or None if it does not apply."""
    def make():
        plan = _plan(x, (layer,), group_size, max_rows, config, 1, eps=_eps(norm)) if _norm_fits(x, norm) else None
        if plan is None or norm is not None and residual is not None:
            return None
        if residual is not None and _shapes(residual) != ((tuple(plan[3][0]), x.dtype),):
            return None
        return ("matvec_norm" if norm else "matvec_res" if residual is not None else "matvec"), plan
    return _cached(_signature(x, (layer,), "matvec", group_size, max_rows, config, _norm_sig(norm),
                              _shapes(residual)), make)


def q4_matvec(x: mx.array, weight: mx.array, scales: mx.array, biases: mx.array, group_size: int, *,
              norm: tuple | None = None, residual: mx.array | None = None,
              config: tuple[int, int, int] | None = None, init_value: float | None = None,
              max_rows: int = FASTER_ROWS, min_weights: int = FASTER_WEIGHTS) -> mx.array | None:
    """x @ dequantize(weight).T for a few rows of fp16/bf16 activations (bits 4), or None if not applicable.

    norm=(weight, eps): of rms_norm(x) instead; residual: plus residual (one of the two at most).
    """
    if weight.size * 8 < min_weights:
        return None
    found = matvec_plan(x, (weight, scales, biases), group_size, norm, residual, config, max_rows)
    if found is None:
        return None
    extra = [*(norm or ())[:1], *([residual] if residual is not None else [])]
    return _launch(found[0], found[1], [x, weight, scales, biases, *extra], x.dtype, init_value)[0]


def swiglu_plan(x: mx.array, gate: tuple, up: tuple, group_size: int, norm: tuple | None = None, config=None,
                max_rows: int = FASTER_ROWS) -> tuple | None:
    """(kernel kind, launch plan) of swiglu for these shapes, or None if it does not apply."""
    def make():
        plan = _plan(x, (gate, up), group_size, max_rows, config, 2, eps=_eps(norm)) if _norm_fits(x, norm) else None
        return None if plan is None else ("swiglu_norm" if norm else "swiglu", plan)
    return _cached(_signature(x, (gate, up), "swiglu", group_size, max_rows, config, _norm_sig(norm)), make)


def swiglu(x: mx.array, gate_w: mx.array, gate_s: mx.array, gate_b: mx.array, up_w: mx.array, up_s: mx.array,
           up_b: mx.array, group_size: int, *, norm: tuple | None = None, config: tuple[int, int, int] | None = None,
           init_value: float | None = None, max_rows: int = FASTER_ROWS) -> mx.array | None:
    """silu(x @ gate.T) * (x @ up.T) in one kernel (of rms_norm(x) with norm=(weight, eps)), or None if not
    applicable."""
    found = swiglu_plan(x, (gate_w, gate_s, gate_b), (up_w, up_s, up_b), group_size, norm, config, max_rows)
    if found is None:
        return None
    return _launch(found[0], found[1], [x, gate_w, gate_s, gate_b, up_w, up_s, up_b, *(norm or ())[:1]], x.dtype,
                   init_value)[0]


def qkv_plan(x: mx.array, q: tuple, k: tuple, v: tuple, group_size: int, linear_biases: tuple | None = None,
             norm: tuple | None = None, config=None, max_rows: int = FASTER_ROWS) -> tuple | None:
    """(kernel kind, launch plan) of qkv for these shapes, or None if it does not apply."""
    lb_sig = None if linear_biases is None else _shapes(*linear_biases)

    def make():
        plan = (_plan(x, (q, k, v), group_size, max_rows, config, 1, outputs=3, eps=_eps(norm))
                if _norm_fits(x, norm) else None)
        if plan is None or lb_sig is not None and lb_sig != tuple(((n,), x.dtype) for *_, n in plan[3]):
            return None
        return "qkv" + ("_bias" if linear_biases is not None else "") + ("_norm" if norm else ""), plan
    return _cached(_signature(x, (q, k, v), "qkv", group_size, max_rows, config, lb_sig, _norm_sig(norm)), make)


def qkv(x: mx.array, q: tuple, k: tuple, v: tuple, group_size: int, linear_biases: tuple | None = None, *,
        norm: tuple | None = None, config: tuple[int, int, int] | None = None, init_value: float | None = None,
        max_rows: int = FASTER_ROWS) -> tuple | None:
    """(x @ Wq.T, x @ Wk.T, x @ Wv.T) (+ their linear biases) in one launch; q/k/v are (weight, scales,
    biases) triples sharing the input dimension; of rms_norm(x) with norm=(weight, eps). None if not
    applicable."""
    found = qkv_plan(x, q, k, v, group_size, linear_biases, norm, config, max_rows)
    if found is None:
        return None
    inputs = [x, *q, *k, *v, *(norm or ())[:1], *(linear_biases or ())]
    return tuple(_launch(found[0], found[1], inputs, x.dtype, init_value))


def rope_inverse_frequencies(head_dim: int, base: float | None, scale: float, freqs: mx.array | None) -> mx.array:
    """scale * theta_i for the pairs i < head_dim / 2 of mx.fast.rope(dims=head_dim, base, scale, freqs), float32."""
    if freqs is not None:
        return (scale / freqs.astype(mx.float32)).astype(mx.float32)
    exponents = mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim
    return (scale * mx.exp(-exponents * math.log(base))).astype(mx.float32)


def attend_plan(q: mx.array, k: mx.array, v: mx.array, keys: mx.array, values: mx.array, position: mx.array,
                inv_freq: mx.array, head_dim: int, traditional: bool = False) -> tuple | None:
    """(kernel kind, launch plan) of attend for these shapes (any cache capacity), or None."""
    B, D = q.shape[0], head_dim

    def make():
        H, KV = q.shape[-1] // D, k.shape[-1] // D
        ok = (q.dtype in DTYPES and D in HEAD_DIMS and q.ndim == 3 and q.shape[1] == 1 and k.shape == v.shape
              and k.shape[:2] == (B, 1) and q.shape[-1] == H * D and k.shape[-1] == KV * D and KV and H % KV == 0
              and keys.ndim == 4 and keys.shape[:2] == (B, KV) and keys.shape[3] == D
              and values.shape[:2] + values.shape[3:] == keys.shape[:2] + keys.shape[3:]
              and {k.dtype, v.dtype, keys.dtype, values.dtype} == {q.dtype}
              and _shapes(position, inv_freq) == (((1,), mx.int32), ((D // 2,), mx.float32)))
        template = (("T", q.dtype), ("D", D), ("MAXP", MAX_POSITIONS), ("TRAD", bool(traditional)))
        return ("attend", (template, (H * 128, B, 1), (128, 1, 1), [q.shape])) if ok else None
    return _cached(("attend", q.shape, k.shape, v.shape, keys.shape[:2] + keys.shape[3:],
                    values.shape[:2] + values.shape[3:], q.dtype, keys.dtype, values.dtype, D, traditional,
                    _shapes(position, inv_freq)), make)


def attend(q: mx.array, k: mx.array, v: mx.array, keys: mx.array, values: mx.array, position: mx.array,
           inv_freq: mx.array, head_dim: int, traditional: bool = False, after: mx.array | None = None, *,
           init_value: float | None = None) -> mx.array | None:
    """One new position's attention: RoPE on q (B, 1, H*D) and k (B, 1, KV*D) at `position` (int32 array of
    shape (1,)), softmax over the cache (keys, values: (B, KV, capacity, D), row-contiguous, of one shape) up
    to it plus the new k, v. Returns out (B, 1, H*D), or None if not applicable. The new k (roped) and v
    are written into keys and values at `position` in place, so no cache update follows; `after`: an array
    the kernel waits for, unread (the output of the step that wrote the previous position in place, which
    MLX would not otherwise order before this one; see KVCache in swarm.model.decoder). The caller keeps
    position < MAX_POSITIONS and position < capacity."""
    found = attend_plan(q, k, v, keys, values, position, inv_freq, head_dim, traditional)
    if found is None:
        return None
    inputs = [q, k, v, keys, values, position, inv_freq, keys if after is None else after]
    return _launch("attend", found[1], inputs, q.dtype, init_value)[0]


_positions: mx.array | None = None
_position_views: dict[int, mx.array] = {}


def position(offset: int) -> mx.array:
    """offset as the int32 array of shape (1,) that attend() takes: a view into one arange made once, the
    same array for every layer of a step (one op a token, not one a layer, and nothing written by the host)."""
    global _positions
    view = _position_views.get(offset)
    if view is None:
        if _positions is None:
            _positions = mx.arange(MAX_POSITIONS, dtype=mx.int32)
            mx.eval(_positions)
        if len(_position_views) >= 64:
            _position_views.clear()
        view = _position_views[offset] = _positions[offset:offset + 1]
    return view


def embed_plan(ids: mx.array, weight: mx.array, scales: mx.array, biases: mx.array, group_size: int) -> tuple | None:
    """(kernel kind, launch plan) of embed_rows for these shapes, or None if it does not apply."""
    def make():
        V, words = weight.shape if weight.ndim == 2 else (0, 0)
        ok = (ids.ndim == 2 and ids.dtype in (mx.int32, mx.uint32) and weight.dtype == mx.uint32 and V
              and scales.dtype in DTYPES and biases.dtype == scales.dtype and group_size in GROUP_SIZES
              and (words * 8) % group_size == 0 and scales.shape == biases.shape == (V, words * 8 // group_size))
        if not ok:
            return None
        n = ids.shape[0] * ids.shape[1]
        template = (("T", scales.dtype), ("I", ids.dtype), ("GS", group_size))
        return "embed", (template, (n * words, 1, 1), (256, 1, 1), [(*ids.shape, words * 8)])
    return _cached(("embed", ids.shape, ids.dtype, weight.shape, weight.dtype, scales.shape, scales.dtype,
                    biases.shape, biases.dtype, group_size), make)


def embed_rows(ids: mx.array, weight: mx.array, scales: mx.array, biases: mx.array, group_size: int, *,
               init_value: float | None = None) -> mx.array | None:
    """dequantize(weight[ids]) (the embedding lookup) in one launch, for ids of shape (B, L); None if not
    applicable. MLX's own is three gathers and a dequantize."""
    found = embed_plan(ids, weight, scales, biases, group_size)
    if found is None:
        return None
    return _launch("embed", found[1], [ids, weight, scales, biases], scales.dtype, init_value)[0]


def _q4_parts(layer) -> tuple | None:
    """(weight, scales, biases, group_size) of a 4-bit quantized linear layer without a bias, else None."""
    if getattr(layer, "bits", 0) != 4 or "scales" not in layer:
        return None
    return layer.weight, layer.scales, layer.biases, layer.group_size


# The fused launches pay where one projection has FASTER_WEIGHTS or more: at decode the host's time per
# op bounds small models, and there a custom kernel costs more host time than MLX's own (Qwen2.5-0.5B
# shape on the H100: about 330 tok/s fused against 365 unfused; 7B shape: 214 against 170).

def fused_swiglu(x: mx.array, gate_proj, up_proj, min_weights: int = FASTER_WEIGHTS,
                 norm: tuple | None = None) -> mx.array | None:
    """silu(gate_proj(x)) * up_proj(x) through one kernel, for the engine's MLP; None -> compute it unfused."""
    g, u = _q4_parts(gate_proj), _q4_parts(up_proj)
    if g is None or u is None or g[3] != u[3] or "bias" in gate_proj or "bias" in up_proj:
        return None
    if g[0].size * 8 < min_weights:
        return None
    return swiglu(x, *g[:3], *u[:3], g[3], norm=norm)


def fused_qkv(x: mx.array, q_proj, k_proj, v_proj, min_weights: int = FASTER_WEIGHTS,
              norm: tuple | None = None) -> tuple | None:
    """(q_proj(x), k_proj(x), v_proj(x)) through one launch, for the engine's attention; None -> unfused."""
    parts = [_q4_parts(p) for p in (q_proj, k_proj, v_proj)]
    if any(p is None for p in parts) or len({p[3] for p in parts}) != 1 or parts[0][0].size * 8 < min_weights:
        return None
    has_bias = ["bias" in p for p in (q_proj, k_proj, v_proj)]
    if any(has_bias) and not all(has_bias):
        return None
    lbs = tuple(p.bias for p in (q_proj, k_proj, v_proj)) if all(has_bias) else None
    return qkv(x, *(p[:3] for p in parts), parts[0][3], lbs, norm=norm)


def fused_linear(x: mx.array, proj, residual: mx.array | None = None) -> mx.array | None:
    """proj(x) (+ residual) through one kernel whatever the layer's size; None -> compute it unfused."""
    parts = _q4_parts(proj)
    if parts is None or "bias" in proj:
        return None
    return q4_matvec(x, *parts[:3], parts[3], residual=residual, min_weights=0)


class DecodeStep:
    """One decoder layer for one new token in five launches: rms_norm + q/k/v; RoPE + attention; o_proj +
    residual; rms_norm + SwiGLU; down_proj + residual. The host's time per op bounds decode on the GPU
    as much as the kernels do, and this is 5 ops where the op-by-op layer has about 20 (and the new k, v
    go into the cache from the attention kernel, with no cache ops).

    Built once per layer by the decoder; a call returns the hidden out, having written the new position's
    k and v into the cache in place (see attend), or None where these kernels do not apply (the caller then
    runs the layer op by op). What a call needs beyond its inputs is planned once per shape.
    """

    def __init__(self, attn_norm: mx.array, mlp_norm: mx.array, eps: float, q: tuple, k: tuple, v: tuple,
                 qkv_bias: tuple | None, o: tuple, gate: tuple, up: tuple, down: tuple, group_size: int,
                 head_dim: int, inv_freq: mx.array, traditional: bool):
        eps = float(eps)
        self.q, self.k, self.v, self.o, self.gate, self.up, self.down = q, k, v, o, gate, up, down
        self.qkv_bias, self.group_size, self.head_dim, self.traditional = qkv_bias, group_size, head_dim, traditional
        self.attn_norm, self.mlp_norm, self.inv_freq = (attn_norm, eps), (mlp_norm, eps), inv_freq
        self.qkv_inputs = [*q, *k, *v, attn_norm, *(qkv_bias or ())]
        self.mlp_inputs = [*gate, *up, mlp_norm]
        self._plans: dict[tuple, list | None] = {}

    def _plan(self, x: mx.array, keys: mx.array) -> list | None:
        """(kernel, launch arguments) of the five launches for x's shape and dtype, or None."""
        gs, dt = self.group_size, x.dtype
        def like(n):  # an input of this width, for its shape only (never evaluated)
            return mx.zeros((*x.shape[:-1], n), dt)
        q_dim, kv_dim = self.q[0].shape[0], self.k[0].shape[0]
        found = [qkv_plan(x, self.q, self.k, self.v, gs, self.qkv_bias, self.attn_norm),
                 attend_plan(like(q_dim), like(kv_dim), like(kv_dim), keys, keys, mx.zeros((1,), mx.int32),
                             self.inv_freq, self.head_dim, self.traditional),
                 matvec_plan(like(q_dim), self.o, gs, residual=x),
                 swiglu_plan(x, self.gate, self.up, gs, self.mlp_norm),
                 matvec_plan(like(self.gate[0].shape[0]), self.down, gs, residual=x)]
        if any(f is None for f in found):
            return None
        return [(_kernel(kind, template), {"grid": grid, "threadgroup": block, "output_shapes": shapes,
                                           "output_dtypes": [dt] * len(shapes)})
                for kind, (template, grid, block, shapes) in found]

    def __call__(self, x: mx.array, keys: mx.array, values: mx.array, position: mx.array,
                 after: mx.array | None = None) -> mx.array | None:
        sig = (x.shape, x.dtype, keys.dtype)
        if sig not in self._plans:
            self._plans[sig] = self._plan(x, keys)
        plans = self._plans[sig]
        if plans is None:
            return None
        (kqkv, aqkv), (katt, aatt), (ko, ao), (kmlp, amlp), (kdown, adown) = plans
        q, k, v = kqkv(inputs=[x, *self.qkv_inputs], **aqkv)
        out = katt(inputs=[q, k, v, keys, values, position, self.inv_freq, keys if after is None else after],
                   **aatt)[0]
        h = ko(inputs=[out, *self.o, x], **ao)[0]
        g = kmlp(inputs=[h, *self.mlp_inputs], **amlp)[0]
        return kdown(inputs=[g, *self.down, h], **adown)[0]


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


def attend_reference(q, k, v, keys, values, position: int, inv_freq, head_dim: int, traditional: bool) -> tuple:
    """What attend returns, from mx.fast.rope and mx.fast.scaled_dot_product_attention in float32 (RoPE's
    results rounded to the dtype, as mx.fast.rope returns them)."""
    B, D, dt, f32 = q.shape[0], head_dim, q.dtype, mx.float32

    def heads(t):  # (B, 1, n * D) -> (B, n, 1, D)
        return t.reshape(B, 1, -1, D).transpose(0, 2, 1, 3)

    def rope(t):
        return mx.fast.rope(heads(t).astype(f32), D, traditional=traditional, base=None, scale=1.0,
                            offset=position, freqs=1.0 / inv_freq).astype(dt)
    qr, kr, vv = rope(q), rope(k), heads(v)
    all_k = mx.concatenate([keys[:, :, :position], kr], axis=2).astype(f32)
    all_v = mx.concatenate([values[:, :, :position], vv], axis=2).astype(f32)
    out = mx.fast.scaled_dot_product_attention(qr.astype(f32), all_k, all_v, scale=D ** -0.5)
    return out.transpose(0, 2, 1, 3).reshape(q.shape).astype(dt), kr, vv


def self_check(seed: int = 0) -> tuple[bool, str]:
    """Each kernel kind on fresh random inputs against mx.quantized_matmul (and for attention against
    mx.fast.rope and mx.fast.scaled_dot_product_attention), outputs poisoned with NaN."""
    key = mx.random.key(seed)
    worst, lines, nan = 0.0, [], float("nan")
    for i, (dtype, gs, m) in enumerate([(mx.float16, 64, 1), (mx.bfloat16, 128, 3), (mx.bfloat16, 32, 8)]):
        keys = mx.random.split(mx.random.split(key, 3)[i], 8)
        n, k, nkv = 320, 1024, 64
        x = mx.random.normal((m, k), key=keys[0]).astype(dtype)
        a, c = random_q4(n, k, gs, dtype, keys[1]), random_q4(n, k, gs, dtype, keys[2])
        kl, vl = random_q4(nkv, k, gs, dtype, keys[3]), random_q4(nkv, k, gs, dtype, keys[4])
        lbs = tuple(mx.random.normal((d,), key=kk).astype(dtype)
                    for d, kk in zip((n, nkv, nkv), mx.random.split(keys[5], 3)))
        norm = ((1.0 + 0.1 * mx.random.normal((k,), key=keys[6])).astype(dtype), 1e-5)
        xn = norm_reference(x, norm)
        res = mx.random.normal((m, n), key=keys[7]).astype(dtype)
        rows = MAX_ROWS
        checks = {
            "matvec": (q4_matvec(x, *a, gs, init_value=nan, max_rows=rows, min_weights=0), reference(x, a, gs)),
            "matvec+norm": (q4_matvec(x, *a, gs, norm=norm, init_value=nan, max_rows=rows, min_weights=0),
                            reference(xn, a, gs, dtype)),
            "matvec+residual": (q4_matvec(x, *a, gs, residual=res, init_value=nan, max_rows=rows, min_weights=0),
                                reference(x, a, gs) + res),
            "swiglu": (swiglu(x, *a, *c, gs, init_value=nan, max_rows=rows), swiglu_reference(x, a, c, gs)),
            "swiglu+norm": (swiglu(x, *a, *c, gs, norm=norm, init_value=nan, max_rows=rows),
                            swiglu_reference(xn, a, c, gs, dtype)),
        }
        for label, nrm, x_ref in (("qkv", None, x), ("qkv+norm", norm, xn)):
            got = qkv(x, a, kl, vl, gs, lbs, norm=nrm, init_value=nan, max_rows=rows)
            refs = [reference(x_ref, t, gs, dtype) + lb for t, lb in zip((a, kl, vl), lbs)]
            checks.update({f"{label}.{name}": (got[j], refs[j]) for j, name in enumerate("qkv")})
        for name, (out, ref) in checks.items():
            e = rel_err(out, ref)
            worst = max(worst, e)
            lines.append(f"{name} {dtype} gs={gs} m={m}: rel err {e:.2e}")
    for i, (dtype, D, heads, kv_heads, batch, position, traditional) in enumerate(
            [(mx.bfloat16, 128, 4, 2, 1, 300, False), (mx.float16, 64, 3, 1, 2, 0, True),
             (mx.float16, 128, 2, 2, 1, 37, False)]):
        ks = mx.random.split(mx.random.key(seed + 100 + i), 5)
        capacity = 512
        q = mx.random.normal((batch, 1, heads * D), key=ks[0]).astype(dtype)
        k, v = (mx.random.normal((batch, 1, kv_heads * D), key=kk).astype(dtype) for kk in ks[1:3])
        cache_k, cache_v = (mx.random.normal((batch, kv_heads, capacity, D), key=kk).astype(dtype) for kk in ks[3:5])
        inv_freq = rope_inverse_frequencies(D, 10000.0 + 1000 * i, 1.0, None)
        mx.eval(cache_k, cache_v)
        refs = attend_reference(q, k, v, cache_k, cache_v, position, inv_freq, D, traditional)
        mx.eval(refs)
        out = attend(q, k, v, cache_k, cache_v, mx.array([position], mx.int32), inv_freq, D, traditional,
                     init_value=nan)
        mx.eval(out)  # then the cache holds the new position
        got = (out, cache_k[:, :, position:position + 1], cache_v[:, :, position:position + 1])
        for name, out, ref in zip(("out", "k", "v"), got, refs):
            e = rel_err(out, ref)
            worst = max(worst, e)
            lines.append(f"attend.{name} {dtype} D={D} heads={heads}/{kv_heads} B={batch} pos={position}: rel err {e:.2e}")
    for dtype, gs, ids_dtype in ((mx.bfloat16, 64, mx.uint32), (mx.float16, 32, mx.int32)):
        table = random_q4(1000, 256, gs, dtype, mx.random.key(seed + 7))
        ids = mx.array([[0, 999, 17], [5, 5, 640]], dtype=ids_dtype)
        got = embed_rows(ids, *table, gs, init_value=nan)
        ref = mx.dequantize(*(t[ids] for t in table), group_size=gs, bits=4)
        e = rel_err(got, ref)
        worst = max(worst, e)
        lines.append(f"embed {dtype} gs={gs} ids {ids_dtype}: rel err {e:.2e}")
    return worst < TOLERANCE, "\n".join(lines)


def enabled() -> bool:
    """True on MLX's CUDA back-end once the start-up self-check passed (run once, on first call)."""
    global _enabled, _check_report, include_headers
    if _enabled is None:
        _enabled = False
        if on_cuda():
            try:
                try:
                    _enabled, _check_report = self_check()
                except Exception:  # a JIT compiler that cannot read the included file: sources inline
                    _kernels.clear()
                    include_headers = False
                    _enabled, _check_report = self_check()
            except Exception as e:  # a kernel that does not build or launch leaves MLX's own in place
                _check_report = f"self-check failed: {type(e).__name__}: {e}"
    return _enabled


def check_report() -> str:
    """What the last self-check measured (empty where none ran)."""
    return _check_report
