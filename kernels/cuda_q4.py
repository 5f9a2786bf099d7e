"""The names the decoder and kernels.linear take from the CUDA kernels, gathered from the modules that own
them: cuda_matvec, cuda_swiglu, cuda_qkv, cuda_mma (the tensor-core path), cuda_attention, cuda_embed,
cuda_step (the fused decode step) and cuda_check (the start-up self-check and its report).

`enabled()` is True only on MLX's CUDA back-end and after the self-check passed; elsewhere (CPU, Metal)
nothing here compiles and the callers keep MLX's kernels. Each function returns None where it does not
apply, and the caller falls back.
"""

from kernels.cuda_attention import HEAD_DIMS, MAX_POSITIONS, attend, rope_inverse_frequencies
from kernels.cuda_check import check_report, enabled, report
from kernels.cuda_common import on_cuda
from kernels.cuda_embed import embed_rows
from kernels.cuda_matvec import FASTER_ROWS, FASTER_WEIGHTS, fused_linear, q4_matvec
from kernels.cuda_qkv import fused_qkv, qkv
from kernels.cuda_step import DecodeStep, position, position_limit, positions
from kernels.cuda_swiglu import fused_swiglu, swiglu

__all__ = ["HEAD_DIMS", "MAX_POSITIONS", "FASTER_ROWS", "FASTER_WEIGHTS", "DecodeStep", "attend", "check_report",
           "embed_rows", "enabled", "fused_linear", "fused_qkv", "fused_swiglu", "on_cuda", "position",
           "position_limit", "positions", "q4_matvec", "qkv", "report", "rope_inverse_frequencies", "swiglu"]
