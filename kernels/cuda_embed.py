"""The embedding lookup of a 4-bit table in one launch: dequantize(weight[ids]); MLX's own is three gathers
and a dequantize. One thread per word (8 values) of each looked-up row.
"""

from __future__ import annotations

import mlx.core as mx

from kernels.cuda_common import COMMON, DTYPES, GROUP_SIZES, Recipe, cached, header, launch, passed

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

CODE = header(COMMON, EMBED)
SPEC = (["ids", "w", "scales", "biases"], ["out"],
        "  q4::embed<T, I, GS>(ids, w, scales, biases, out, ids_shape[0] * ids_shape[1], w_shape[1], w_shape[0]);")


def embed_plan(ids: mx.array, weight: mx.array, scales: mx.array, biases: mx.array, group_size: int) -> tuple | None:
    """The launch plan of embed_rows for these shapes (ids (B, L)), or None if it does not apply."""
    def make():
        V, words = weight.shape if weight.ndim == 2 else (0, 0)
        ok = (ids.ndim == 2 and ids.dtype in (mx.int32, mx.uint32) and weight.dtype == mx.uint32 and V
              and scales.dtype in DTYPES and biases.dtype == scales.dtype and group_size in GROUP_SIZES
              and (words * 8) % group_size == 0 and scales.shape == biases.shape == (V, words * 8 // group_size))
        if not ok:
            return None
        n = ids.shape[0] * ids.shape[1]
        template = (("T", scales.dtype), ("I", ids.dtype), ("GS", group_size))
        return Recipe("embed", SPEC, CODE, template), (n * words, 1, 1), (256, 1, 1), [(*ids.shape, words * 8)]
    return cached(("embed", ids.shape, ids.dtype, weight.shape, weight.dtype, scales.shape, scales.dtype,
                   biases.shape, biases.dtype, group_size), make)


def embed_rows(ids: mx.array, weight: mx.array, scales: mx.array, biases: mx.array, group_size: int, *,
               init_value: float | None = None, unchecked: bool = False) -> mx.array | None:
    """dequantize(weight[ids]) in one launch, for ids of shape (B, L); None if not applicable or (unless
    `unchecked`, as the self-check runs it) the kernel did not pass its self-check."""
    if not (unchecked or passed.get("embed")):
        return None
    plan = embed_plan(ids, weight, scales, biases, group_size)
    if plan is None:
        return None
    return launch(plan, [ids, weight, scales, biases], scales.dtype, init_value)[0]
