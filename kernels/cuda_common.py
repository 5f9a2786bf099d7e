"""What the CUDA kernels of this package share: the device helpers every q4 kernel includes, the build of
an `mx.fast.cuda_kernel` from a kernel kind and its constants (hash-named, its code included from a file),
the per-signature launch-plan cache, and which kernel families passed the start-up self-check (`passed`,
written by kernels.cuda_check).

Nothing here compiles or launches off MLX's CUDA back-end; `on_cuda()` says whether it is there.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx

DTYPES = (mx.float16, mx.bfloat16)
GROUP_SIZES = (32, 64, 128)
TOLERANCE = 1e-3
CUDA_TYPES = {mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.float32: "float", mx.int32: "int32_t",
              mx.uint32: "uint32_t"}

# Kernel families that passed the self-check ("simt", "mma", "attention", "attention_serial", "embed"):
# kernels.cuda_check fills it; the dispatchers read it.
passed: dict[str, bool] = {}

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

// 1 / rms of an activation row of K values from its sum of squares, as mx.fast.rms_norm computes it.
__device__ __forceinline__ float inv_rms(float sum_sq, int K, float eps) { return rsqrtf(sum_sq / K + eps); }

// RoPE of the pair (a, c) of a head's values at the angle with cosine cs and sine sn, rounded to T as
// mx.fast.rope returns them.
template <typename T>
__device__ __forceinline__ void rope_pair(const T* src, float* dst, int a, int c, float cs, float sn) {
  const float x0 = tof(src[a]), x1 = tof(src[c]);
  dst[a] = round_to<T>(x0 * cs - x1 * sn);
  dst[c] = round_to<T>(x0 * sn + x1 * cs);
}

// One matrix of a q/k/v launch; blocks of `rows` rows cover q's rows, then k's, then v's.
template <typename T> struct Matrix {
  const uint32_t* w;
  const T* s;
  const T* b;
  const T* lb;  // linear bias (or null)
  T* y;
  int n;
};

// The matrix this block computes, selected by value (indexing an array would put it in local memory), and
// the block's index within it.
template <typename T>
__device__ __forceinline__ Matrix<T> qkv_matrix(int rows, int& block, const Matrix<T>& q, const Matrix<T>& k,
                                                const Matrix<T>& v) {
  const int nb0 = (q.n + rows - 1) / rows, nb1 = (k.n + rows - 1) / rows;
  const int which = blockIdx.x < nb0 ? 0 : blockIdx.x < nb0 + nb1 ? 1 : 2;
  block = blockIdx.x - (which == 0 ? 0 : which == 1 ? nb0 : nb0 + nb1);
  return which == 0 ? q : which == 1 ? k : v;
}

// Rows of an activation whose last axis is the product's K: every other axis counts.
__device__ __forceinline__ int leading_rows(const mlx::core::cu::Shape& shape, int ndim) {
  int m = 1;
  for (int i = 0; i + 1 < ndim; ++i) m *= shape[i];
  return m;
}
"""


def header(*parts: str) -> str:
    """Device code in namespace q4, from source parts."""
    return "namespace q4 {\n" + "\n".join(parts) + "\n}  // namespace q4\n"


def float_bits(value: float) -> int:
    """The bits of value as a float32, as a signed int (a kernel constant; the kernel reads it back)."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


def kernel_body(body: str, template: tuple) -> str:
    """A kernel body with its constants (T, M, R, ...) declared first, as MLX declares template arguments."""
    lines = [f"  using {name} = {CUDA_TYPES[v]};" if isinstance(v, mx.Dtype) else
             f"  constexpr {'bool' if isinstance(v, bool) else 'int'} {name} = {str(v).lower()};"
             for name, v in template]
    return "\n".join([*lines, body])


_kernels: dict[tuple, object] = {}
include_headers = True


class Recipe(NamedTuple):
    """What builds one kernel: its kind, spec (input names, output names, body), device code, constants
    (name, value) and dynamic shared memory. Plans hold recipes, so that they can be made and tested
    without the CUDA back-end."""
    kind: str
    spec: tuple
    code: str
    template: tuple
    shared_memory: int = 0

    def __repr__(self) -> str:
        return f"Recipe({self.kind}, {self.template}, shared_memory={self.shared_memory})"


def kernel(recipe: Recipe):
    """The mx.fast.cuda_kernel of a recipe, built on first use (building needs MLX's CUDA back-end).

    The constants are written into the source rather than passed as MLX template arguments, which MLX
    formats into the source anew at every launch; host time per launch bounds decode. The name carries a
    hash of the source: MLX caches compiled kernels on disk by name, and a kernel changed by an upgrade
    must not run the old code. MLX also copies a kernel's whole source into every launch, so the code is
    included from a file instead (`include_headers`)."""
    key = (recipe.kind, recipe.template, recipe.shared_memory)
    if key not in _kernels:
        inputs, outputs, body = recipe.spec
        text = kernel_body(body, recipe.template)
        code = recipe.code
        digest = hashlib.sha256((code + text).encode()).hexdigest()[:16]
        _kernels[key] = mx.fast.cuda_kernel(name=f"q4_{recipe.kind}_{digest}", input_names=list(inputs),
                                            output_names=list(outputs), source=text,
                                            header=included(code) if include_headers else code,
                                            shared_memory=recipe.shared_memory)
    return _kernels[key]


def included(code: str) -> str:
    """A one-line header including `code` from a file named by its hash (in the user's cache folder)."""
    digest = hashlib.sha256(code.encode()).hexdigest()[:16]
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


# What a call decides from shapes and dtypes (applicable? constants, grid, output shapes) is worked out
# once per signature and kept here; a call then costs a dict lookup and the launch. The host's time per op
# bounds decode on the GPU as much as the kernels do.
_plans: dict[tuple, tuple | None] = {}


def cached(key: tuple, make) -> tuple | None:
    if key not in _plans:
        _plans[key] = make()
    return _plans[key]


def shapes_of(*arrays) -> tuple:
    return tuple(None if a is None else (a.shape, a.dtype) for a in arrays)


def signature(x, layers, *rest) -> tuple:
    return (x.shape, x.dtype, *((w.shape, w.dtype, s.shape, s.dtype, None if b is None else (b.shape, b.dtype))
                                for w, s, b in layers), *rest)


def layers_fit(x: mx.array, group_size: int, layers, max_rows: int) -> tuple[int, int] | None:
    """(rows of x, K) when x and every (weight, scales, biases) fit the q4 kernels, else None."""
    if x.dtype not in DTYPES or group_size not in GROUP_SIZES or x.ndim < 1:
        return None
    k = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    if not 1 <= rows <= max_rows or k % group_size:
        return None
    for w, s, b in layers:
        if b is None or w.dtype != mx.uint32 or w.ndim != 2 or w.shape[1] * 8 != k:
            return None
        if s.dtype != x.dtype or b.dtype != x.dtype or s.shape != (w.shape[0], k // group_size) or b.shape != s.shape:
            return None
    return rows, k


def norm_fits(x: mx.array, norm: tuple | None) -> bool:
    """norm: None, or (weight (K,) in x's dtype, epsilon (a positive float))."""
    return norm is None or (norm[0].shape == (x.shape[-1],) and norm[0].dtype == x.dtype
                            and isinstance(norm[1], float) and norm[1] > 0)


def norm_signature(norm: tuple | None) -> tuple | None:
    return None if norm is None else (norm[0].shape, norm[0].dtype, norm[1])


def launch(plan: tuple, inputs: list, dtype, init_value: float | None = None) -> list:
    """Runs a planned kernel: plan = (recipe, grid, threadgroup, output shapes[, output dtypes])."""
    recipe, grid, block, shapes, *dtypes = plan
    return kernel(recipe)(inputs=inputs, grid=grid, threadgroup=block, output_shapes=shapes,
                          output_dtypes=dtypes[0] if dtypes else [dtype] * len(shapes), init_value=init_value)


def q4_parts(layer) -> tuple | None:
    """(weight, scales, biases, group_size) of a 4-bit quantized linear layer, else None."""
    if getattr(layer, "bits", 0) != 4 or "scales" not in layer:
        return None
    return layer.weight, layer.scales, layer.biases, layer.group_size
