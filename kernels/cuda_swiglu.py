"""SwiGLU in one launch: silu(x @ gate.T) * (x @ up.T) for 1-16 activation rows, optionally of rms_norm(x);
`swiglu` picks the kernel (the tensor-core one in kernels.cuda_mma, else the SIMT one here, up to 8 rows).

The SIMT kernel reads R gate rows and the same R up rows per row group with kernels.cuda_matvec's row dot
product; g and u are rounded to the dtype as the unfused linears return them, the rest is float32.
"""

from __future__ import annotations

import mlx.core as mx

from kernels import cuda_mma
from kernels.cuda_common import cached, launch, norm_fits, norm_signature, passed, q4_parts, signature
from kernels.cuda_matvec import FASTER_ROWS, FASTER_WEIGHTS, simt_code, simt_plan, simt_rows, use_mma

SWIGLU = r"""
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


def _spec(norm: bool) -> tuple:
    nw, eps = ("nw", "__int_as_float(EPS)") if norm else ("nullptr", "0.0f")
    return (["x", "gw", "gs", "gb", "uw", "us", "ub", *(["nw"] if norm else [])], ["y"],
            f"  q4::swiglu<T, M, R, SPLIT, WPB, GS, {str(norm).lower()}>(x, gw, gs, gb, uw, us, ub, y, gw_shape[0], "
            f"gw_shape[1] * 8, {nw}, {eps});")


SPECS = {"swiglu": _spec(False), "swiglu_norm": _spec(True)}


def swiglu_plan(x: mx.array, gate: tuple, up: tuple, group_size: int, norm: tuple | None = None, config=None,
                max_rows: int = FASTER_ROWS, path: str | None = None) -> tuple | None:
    """(kernel kind, launch plan) of swiglu for these shapes, or None if no kernel applies (path: as
    cuda_matvec.matvec_plan's)."""
    def make():
        if not norm_fits(x, norm):
            return None
        kind = "swiglu_norm" if norm else "swiglu"
        if use_mma(x, path):
            plan = cuda_mma.swiglu_plan(x, gate, up, group_size, norm, config, max_rows)
            if plan is not None or path == "mma":
                return None if plan is None else ("mma_" + kind, plan)
        plan = simt_plan(kind, SPECS[kind], simt_code(SWIGLU), x, (gate, up), group_size, simt_rows(max_rows, path),
                         config, 2, eps=None if norm is None else norm[1])
        return None if plan is None else (kind, plan)
    return cached(signature(x, (gate, up), "swiglu", group_size, max_rows, config, norm_signature(norm), path,
                            passed.get("mma"), passed.get("simt")), make)


def swiglu(x: mx.array, gate_w: mx.array, gate_s: mx.array, gate_b: mx.array, up_w: mx.array, up_s: mx.array,
           up_b: mx.array, group_size: int, *, norm: tuple | None = None, config: tuple | None = None,
           init_value: float | None = None, max_rows: int = FASTER_ROWS, path: str | None = None) -> mx.array | None:
    """silu(x @ gate.T) * (x @ up.T) in one kernel (of rms_norm(x) with norm=(weight, eps)), or None if not
    applicable."""
    found = swiglu_plan(x, (gate_w, gate_s, gate_b), (up_w, up_s, up_b), group_size, norm, config, max_rows, path)
    if found is None:
        return None
    return launch(found[1], [x, gate_w, gate_s, gate_b, up_w, up_s, up_b, *(norm or ())[:1]], x.dtype, init_value)[0]


# The fused launches pay where one projection has FASTER_WEIGHTS or more: at decode the host's time per
# op bounds small models, and there a custom kernel costs more host time than MLX's own (Qwen2.5-0.5B
# shape on the H100: about 330 tok/s fused against 365 unfused; 7B shape: 214 against 170).
def fused_swiglu(x: mx.array, gate_proj, up_proj, min_weights: int = FASTER_WEIGHTS,
                 norm: tuple | None = None) -> mx.array | None:
    """silu(gate_proj(x)) * up_proj(x) through one kernel, for the engine's MLP; None -> compute it unfused."""
    g, u = q4_parts(gate_proj), q4_parts(up_proj)
    if g is None or u is None or g[3] != u[3] or "bias" in gate_proj or "bias" in up_proj:
        return None
    if g[0].size * 8 < min_weights:
        return None
    return swiglu(x, *g[:3], *u[:3], g[3], norm=norm)
