"""Linear layers of the engine (MLX q-bit or dense) and the compute-dtype policy per backend.

A quantized layer holds the checkpoint's tensors as MLX writes them: `weight` (uint32, 32/bits values per
word, lowest bits first), `scales` and `biases` (one per group of `group_size` inputs). The product runs on
`mx.quantized_matmul`, MLX's fused kernel on Metal, CUDA and CPU; `quantized_linear` is the one place a
faster kernel may take over on the GPU. On the CPU back-end, with float32 activations, every linear (dense
float32 or quantized) runs on kernels.cpu_matmul once kernels.cpu_path's self-check passed.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from kernels import cpu_path, cuda_q4


def backend() -> str:
    """'metal', 'cuda' or 'cpu': where the default device computes."""
    if mx.default_device().type == mx.DeviceType.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    return "cuda"


def kernel_path() -> dict:
    """{"linear": which kernels this backend's linears run, "why": the reason}, for the log and the dashboard."""
    on = backend()
    if on == "cpu":
        return cpu_path.describe()
    if on == "cuda":
        if cuda_q4.enabled():
            return {"linear": "cuda-fused", "why": cuda_q4.check_report()}
        return {"linear": "mlx", "why": cuda_q4.check_report() or "the CUDA kernels are off"}
    return {"linear": "mlx", "why": "Metal: MLX's own kernels"}


def share_cores(shared: bool) -> None:
    """Whether the node's pipeline runs on this machine's cores alone (see cpu_path.share_cores)."""
    cpu_path.share_cores(shared)


def set_threads(n: int) -> None:
    """Threads the CPU kernels use (default: all cores)."""
    cpu_path.set_threads(n)


def compute_dtype(checkpoint_dtype: mx.Dtype, on: str | None = None) -> mx.Dtype:
    """The dtype activations and float parameters use.

    On the GPU the checkpoint's own; on the CPU float32, since MLX's q4 matvec on the CPU runs about 30x
    slower with half-precision activations (DESIGN.md, measured facts).
    """
    return mx.float32 if (on or backend()) == "cpu" else checkpoint_dtype


def quantized_linear(x: mx.array, weight: mx.array, scales: mx.array, biases: mx.array,
                     group_size: int, bits: int, fast=None) -> mx.array:
    """x @ dequantize(weight).T; `fast` (from `matvec_kernel`, chosen once per layer) takes over where it applies."""
    if fast is not None:
        y = fast(x, weight, scales, biases, group_size)
        if y is not None:
            return y
    return mx.quantized_matmul(x, weight, scales, biases, transpose=True, group_size=group_size, bits=bits)


def matvec_kernel(weight: mx.array, bits: int):
    """kernels.cuda_q4's q4 matvec for a layer this large on CUDA once its self-check passed, else None.

    Decided once at load: decode is bound by host time per op, so nothing is looked up per call.
    """
    if bits != 4 or backend() != "cuda":
        return None
    return cuda_q4.q4_matvec if cuda_q4.enabled() and weight.size * 8 >= cuda_q4.FASTER_WEIGHTS else None


class Linear(nn.Module):
    """y = x W^T (+ b), W dense or MLX-quantized; built from the checkpoint's tensors of one module."""

    def __init__(self, weight: mx.array, bias: mx.array | None = None, *, scales: mx.array | None = None,
                 biases: mx.array | None = None, group_size: int = 0, bits: int = 0):
        super().__init__()
        self.weight = weight
        if bias is not None:
            self.bias = bias
        if scales is not None:
            self.scales, self.biases = scales, biases
        self.group_size, self.bits = group_size, bits
        self.fast = matvec_kernel(weight, bits) if scales is not None else None
        # on the CPU: a plan over numpy views of these tensors (the self-check runs at the first layer)
        self.cpu = cpu_path.plan(weight, scales, biases, group_size, bits) if backend() == "cpu" else None

    @property
    def quantized(self) -> bool:
        return "scales" in self

    def __call__(self, x: mx.array) -> mx.array:
        y = cpu_path.matmul(self.cpu, x) if self.cpu is not None else None
        if y is None and self.quantized:
            y = quantized_linear(x, self.weight, self.scales, self.biases, self.group_size, self.bits, self.fast)
        elif y is None:
            y = x @ self.weight.T
        return y + self.bias if "bias" in self else y

    def rows(self, ids: mx.array) -> mx.array:
        """Rows of W for token ids: the embedding lookup, dequantized when quantized."""
        if not self.quantized:
            return self.weight[ids]
        if self.fast is not None:  # on CUDA: one launch where MLX's takes four (and slow gathers)
            y = cuda_q4.embed_rows(ids, self.weight, self.scales, self.biases, self.group_size)
            if y is not None:
                return y
        return mx.dequantize(self.weight[ids], self.scales[ids], self.biases[ids],
                             group_size=self.group_size, bits=self.bits)
