"""q, k and v in one launch: (x @ Wq.T, x @ Wk.T, x @ Wv.T) (+ their linear biases) for 1-16 activation
rows, optionally of rms_norm(x); `qkv` picks the kernel (the tensor-core one in kernels.cuda_mma, else the
SIMT one here, up to 8 rows). The SIMT kernel's blocks [0, nq) compute q, then k, then v.
"""

from __future__ import annotations

import mlx.core as mx

from kernels import cuda_mma
from kernels.cuda_common import cached, launch, norm_fits, norm_signature, passed, q4_parts, shapes_of, signature
from kernels.cuda_matvec import FASTER_ROWS, FASTER_WEIGHTS, simt_code, simt_plan, simt_rows, use_mma

QKV = r"""
// The linear biases are added after rounding, as `quantized_matmul(...) + bias` does.
template <typename T, int M, int R, int SPLIT, int WPB, int GS, bool HAS_BIAS, bool NORM>
__device__ void qkv(const T* x, int K, const uint32_t* qw, const T* qs, const T* qb, const T* ql, T* yq, int nq,
                    const uint32_t* kw, const T* ks, const T* kb, const T* kl, T* yk, int nk,
                    const uint32_t* vw, const T* vs, const T* vb, const T* vl, T* yv, int nv,
                    const T* nw, float eps) {
  constexpr int TPG = 32 * SPLIT, GROUPS = WPB / SPLIT, RB = GROUPS * R, RN = R + NORM;
  __shared__ float red[GROUPS * RN * M];
  int block;
  const Matrix<T> mat = qkv_matrix<T>(RB, block, {qw, qs, qb, ql, yq, nq}, {kw, ks, kb, kl, yk, nk},
                                      {vw, vs, vb, vl, yv, nv});
  const int N = mat.n;
  const int group = threadIdx.x / TPG, gt = threadIdx.x % TPG;
  const uint32_t* wr[R];
  const T* sr[R];
  const T* br[R];
  row_pointers<T, R, GS>(mat.w, mat.s, mat.b, (block * GROUPS + group) * R, N, K, wr, sr, br);
  float acc[RN][M] = {};
  rows_dot<T, M, R, TPG, GS, NORM>(x, K, wr, sr, br, gt, acc, nw);
  reduce_rows<RN, M, SPLIT, WPB>(acc, red);
  for (int i = threadIdx.x; i < GROUPS * R * M; i += WPB * 32) {
    const int g = i / (R * M), r = (i % (R * M)) / M, m = i % M;
    const int row = (block * GROUPS + g) * R + r;
    if (row < N) {
      float v = red[g * RN * M + r * M + m];
      if (NORM) v *= inv_rms(red[g * RN * M + R * M + m], K, eps);
      if (HAS_BIAS) v = round_to<T>(v) + tof(mat.lb[row]);
      mat.y[(size_t)m * N + row] = rnd<T>(v);
    }
  }
}
"""


def _spec(norm: bool, bias: bool) -> tuple:
    nw, eps = ("nw", "__int_as_float(EPS)") if norm else ("nullptr", "0.0f")
    lq, lk, lv = ("ql", "kl", "vl") if bias else ("nullptr",) * 3
    return (["x", "qw", "qs", "qb", "kw", "ks", "kb", "vw", "vs", "vb", *(["nw"] if norm else []),
             *(["ql", "kl", "vl"] if bias else [])], ["yq", "yk", "yv"],
            f"  q4::qkv<T, M, R, SPLIT, WPB, GS, {str(bias).lower()}, {str(norm).lower()}>(x, qw_shape[1] * 8, "
            f"qw, qs, qb, {lq}, yq, qw_shape[0], kw, ks, kb, {lk}, yk, kw_shape[0], vw, vs, vb, {lv}, yv, vw_shape[0], "
            f"{nw}, {eps});")


SPECS = {"qkv": _spec(False, False), "qkv_bias": _spec(False, True), "qkv_norm": _spec(True, False),
         "qkv_bias_norm": _spec(True, True)}


def qkv_plan(x: mx.array, q: tuple, k: tuple, v: tuple, group_size: int, linear_biases: tuple | None = None,
             norm: tuple | None = None, config=None, max_rows: int = FASTER_ROWS, path: str | None = None) -> tuple | None:
    """(kernel kind, launch plan) of qkv for these shapes, or None if no kernel applies (path: as
    cuda_matvec.matvec_plan's)."""
    lb_sig = None if linear_biases is None else shapes_of(*linear_biases)

    def make():
        if not norm_fits(x, norm):
            return None
        if lb_sig is not None and lb_sig != tuple(((t[0].shape[0],), x.dtype) for t in (q, k, v)):
            return None
        kind = "qkv" + ("_bias" if linear_biases is not None else "") + ("_norm" if norm else "")
        if use_mma(x, path):
            plan = cuda_mma.qkv_plan(x, q, k, v, group_size, linear_biases is not None, norm, config, max_rows)
            if plan is not None or path == "mma":
                return None if plan is None else ("mma_" + kind, plan)
        plan = simt_plan(kind, SPECS[kind], simt_code(QKV), x, (q, k, v), group_size, simt_rows(max_rows, path),
                         config, 1, outputs=3, eps=None if norm is None else norm[1])
        return None if plan is None else (kind, plan)
    return cached(signature(x, (q, k, v), "qkv", group_size, max_rows, config, lb_sig, norm_signature(norm), path,
                            passed.get("mma"), passed.get("simt")), make)


def qkv(x: mx.array, q: tuple, k: tuple, v: tuple, group_size: int, linear_biases: tuple | None = None, *,
        norm: tuple | None = None, config: tuple | None = None, init_value: float | None = None,
        max_rows: int = FASTER_ROWS, path: str | None = None) -> tuple | None:
    """(x @ Wq.T, x @ Wk.T, x @ Wv.T) (+ their linear biases) in one launch; q/k/v are (weight, scales,
    biases) triples sharing the input dimension; of rms_norm(x) with norm=(weight, eps). None if not
    applicable."""
    found = qkv_plan(x, q, k, v, group_size, linear_biases, norm, config, max_rows, path)
    if found is None:
        return None
    inputs = [x, *q, *k, *v, *(norm or ())[:1], *(linear_biases or ())]
    return tuple(launch(found[1], inputs, x.dtype, init_value))


def fused_qkv(x: mx.array, q_proj, k_proj, v_proj, min_weights: int = FASTER_WEIGHTS,
              norm: tuple | None = None) -> tuple | None:
    """(q_proj(x), k_proj(x), v_proj(x)) through one launch, for the engine's attention; None -> unfused."""
    parts = [q4_parts(p) for p in (q_proj, k_proj, v_proj)]
    if any(p is None for p in parts) or len({p[3] for p in parts}) != 1 or parts[0][0].size * 8 < min_weights:
        return None
    has_bias = ["bias" in p for p in (q_proj, k_proj, v_proj)]
    if any(has_bias) and not all(has_bias):
        return None
    lbs = tuple(p.bias for p in (q_proj, k_proj, v_proj)) if all(has_bias) else None
    return qkv(x, *(p[:3] for p in parts), parts[0][3], lbs, norm=norm)
