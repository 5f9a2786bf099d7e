"""16-lane float32 SIMD for the CPU kernels: numba intrinsics that emit LLVM vector code.

One rule makes every CPU linear row-independent: y[m, n] = sum_k x[m, k] * w[n, k] is accumulated in 16
lanes, vector step after vector step along k (lane l takes every 16th product, in order, one multiply-add
each), and the lanes are then summed in one fixed tree (`lane_sum`). `tile` and `dequantize_row` both
follow it whatever the weight format, so a row's result does not depend on how many rows share a call, on
the tile shape chosen for them or on the thread count; LLVM splits the 16-lane vectors into what the
target CPU has (AVX-512, AVX2, SSE) without changing the arithmetic.

Weight kinds: DENSE is float32 rows; 4 and ANY are MLX's affine quantization (uint32 words, a row's
values as one little-endian bit stream, w = scale * q + bias per group), dequantized in registers. 4-bit
rows are read in "kernel order": the four words of a 32-value chunk broadcast over 16 lanes and shifted
by 0,0,0,0,4,4,4,4,... give the values 0,8,16,24,1,9,17,25,..., and shifted by 16 more the other 16,
two instructions a vector. Where the CPU has AVX-512, the 16 values a group's scale and bias give
(s * q + b for q = 0..15) are made once a chunk and the shifted words index them (vpermps reads only the
low 4 bits of each lane): one permute a vector instead of a mask, a conversion and a multiply-add, the
same numbers. Activations multiplied with 4-bit rows are put in that order once per call
(`cpu_matmul.kernel_order`). ANY takes 2, 3, 5, 6 or 8 bits, told at run time (one compiled kernel for
all of them), values in their natural order.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _versioned_cache() -> None:
    """numba keys a cached kernel by the stamp of the file that defines it, not of the intrinsics it inlines:
    after an upgrade that changes this file alone, kernels built from the old intrinsics would load. The
    kernels' cache lives in a folder named by a digest of every kernels/cpu_*.py file instead: under
    NUMBA_CACHE_DIR when set, else beside these files (where numba would have put it), else in the user's
    cache. Imported before any of them defines a cached function."""
    here = Path(__file__).parent
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(here.glob("cpu_*.py")))).hexdigest()[:16]
    if numba.config.CACHE_DIR:
        root = numba.config.CACHE_DIR
    elif os.access(here, os.W_OK):
        root = str(here / "__pycache__" / "numba")
    else:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cake-swarm", "numba")
    numba.config.CACHE_DIR = os.path.join(root, digest)


_versioned_cache()

LANES = 16
DENSE, ANY = 32, 0  # weight kinds besides 4-bit: float32, and bits given at run time
F32, I32, I64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
VF, VI = ir.VectorType(F32, LANES), ir.VectorType(I32, LANES)


def _const(n: int):
    return ir.Constant(I64, n)


def _has_avx512() -> bool:
    """Whether numba compiles for a CPU with AVX-512F (the host, or the CPU named in NUMBA_CPU_NAME /
    NUMBA_CPU_FEATURES)."""
    from llvmlite import binding

    if numba.config.CPU_FEATURES:
        return "+avx512f" in numba.config.CPU_FEATURES.split(",")
    if numba.config.CPU_NAME and numba.config.CPU_NAME != "host":
        return False  # a named CPU: the portable code, which LLVM lowers for whatever it has
    return bool(binding.get_host_cpu_features().get("avx512f"))


PERMUTE = _has_avx512()
# The weights' rows are read a few at a time, each from start to end: the hardware prefetcher alone keeps
# too few reads in flight (a 4864 x 896 4-bit matrix not in cache read at ~10 GB/s on the 2-core VM); asking
# for the same place PREFETCH_ROWS rows further on, each step, reads it at 15-21 GB/s.
PREFETCH_ROWS = 8


def _prefetch(builder, ptr):
    i8p = ir.IntType(8).as_pointer()
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, I32, I32, I32]), "llvm.prefetch.p0i8")
    builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])


def _permute(builder, table, index):
    """table[index & 15] lane by lane (AVX-512's vpermps)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(VF, [VF, VI]), "llvm.x86.avx512.permvar.sf.512")
    return builder.call(fn, [table, index])


def _fmuladd(builder, a, b, c):
    """a * b + c, fused where the target has FMA (the same choice for every call in a kernel)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(VF, [VF, VF, VF]), "llvm.fmuladd.v16f32")
    return builder.call(fn, [a, b, c])


def _splat(builder, scalar):
    v = builder.insert_element(ir.Constant(VF, ir.Undefined), scalar, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(VI, [0] * LANES))


def _load(builder, ptr, index, vtype=VF):
    return builder.load(builder.bitcast(builder.gep(ptr, [index]), vtype.as_pointer()), align=4)


def _lane_sum(builder, v):
    """The 16 lanes summed in a fixed tree: the upper half added to the lower until one lane is left."""
    n = LANES
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, n), list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(I32, 0))


def _array(context, builder, aryty, value):
    """(data pointer, shape) of a C-contiguous array argument."""
    a = context.make_array(aryty)(context, builder, value)
    return a.data, cgutils.unpack_tuple(builder, a.shape, aryty.ndim)


def layout(group_size: int, bits: int) -> int:
    """The run-time description of a quantized format the kernels take: log2(group_size / 16) + 16 * bits."""
    return group_size.bit_length() - 5 + 16 * bits


class _Weights:
    """Emits the float32 weight vectors of one row for one chunk of k, in the order the activations use.

    `kind` (compile time): DENSE, 4 (4-bit in kernel order) or ANY (the bits read from `layout` at run
    time, values in order). A chunk is `steps` vector steps: two for 4-bit, one otherwise.
    """

    def __init__(self, context, builder, kind, types_, values):
        self.builder, self.kind = builder, kind
        self.ptr, shape = _array(context, builder, types_[0], values[0])
        self.row_len = shape[1]  # floats or words a row
        if kind != DENSE:
            self.half = str(types_[1].dtype)  # scales and biases: float32, or bfloat16 / float16 bits as uint16 / int16
            self.scales, (_, self.groups) = _array(context, builder, types_[1], values[1])
            self.biases, _ = _array(context, builder, types_[2], values[2])
            self.group_shift = builder.and_(values[3], _const(15))
            self.bits = builder.lshr(values[3], _const(4))
        if kind == ANY:  # read by bytes: 16 values are 2 * bits bytes
            self.ptr = builder.bitcast(self.ptr, ir.IntType(8).as_pointer())
            self.row_len = builder.mul(self.row_len, _const(4))
            self.end = builder.mul(shape[0], self.row_len)
        self.steps = 2 if kind == 4 else 1

    def scale_bias(self, row, step):
        b = self.builder
        g = b.add(b.mul(row, self.groups), b.lshr(step, self.group_shift))
        return _splat(b, self._float(self.scales, g)), _splat(b, self._float(self.biases, g))

    def _float(self, ptr, i):
        b = self.builder
        value = b.load(b.gep(ptr, [i]))
        if self.half == "int16":  # float16 (numba has no float16 arrays)
            return b.fpext(b.bitcast(value, ir.HalfType()), F32)
        if self.half == "uint16":  # bfloat16: the upper half of a float32
            return b.bitcast(b.shl(b.zext(value, I32), ir.Constant(I32, 16)), F32)
        return value

    def prefetch(self, at):
        """Ask for element `at` (of the weights as read) PREFETCH_ROWS rows further on."""
        b = self.builder
        _prefetch(b, b.gep(self.ptr, [b.add(at, b.mul(self.row_len, _const(PREFETCH_ROWS)))]))

    def vectors(self, row, chunk):
        b = self.builder
        step = b.mul(chunk, _const(self.steps))
        if self.kind == DENSE:
            at = b.add(b.mul(row, self.row_len), b.mul(step, _const(LANES)))
            self.prefetch(at)
            return [_load(b, self.ptr, at)]
        s, bias = self.scale_bias(row, step)
        if self.kind == 4:  # 16 bytes: four words, 32 values, kernel order
            at = b.add(b.mul(row, self.row_len), b.mul(chunk, _const(4)))
            words = _load(b, self.ptr, at, ir.VectorType(I32, 4))
            self.prefetch(at)
            spread = b.shuffle_vector(words, words, ir.Constant(VI, [0, 1, 2, 3] * 4))
            shifted = [b.lshr(spread, ir.Constant(VI, [half + 4 * (lane // 4) for lane in range(LANES)])) for half in (0, 16)]
            if PERMUTE:
                table = _fmuladd(b, ir.Constant(VF, [float(q) for q in range(16)]), s, bias)
                return [_permute(b, table, index) for index in shifted]
            return [_fmuladd(b, b.uitofp(b.and_(index, ir.Constant(VI, [15] * LANES)), VF), s, bias) for index in shifted]
        return [_fmuladd(b, self._in_order(row, step), s, bias)]

    def _in_order(self, row, step):
        """16 values of `bits` bits in order, from the 2 * bits bytes that hold them: a 16-byte load where it
        stays inside the array, else those bytes copied first; then two halves of 8 values (8 * bits <= 64)."""
        b, i128 = self.builder, ir.IntType(128)
        at = b.add(b.mul(row, self.row_len), b.mul(step, b.mul(self.bits, _const(2))))
        self.prefetch(at)
        src = b.gep(self.ptr, [at])
        whole = cgutils.alloca_once(b, i128)
        with b.if_else(b.icmp_unsigned("<=", b.add(at, _const(16)), self.end)) as (inside, at_the_end):
            with inside:
                b.store(b.load(b.bitcast(src, i128.as_pointer()), align=1), whole)
            with at_the_end:
                b.store(ir.Constant(i128, 0), whole)
                cgutils.raw_memcpy(b, b.bitcast(whole, ir.IntType(8).as_pointer()), src,
                                   b.mul(self.bits, _const(2)), 1)
        whole = b.load(whole)
        v8 = ir.VectorType(I64, 8)
        shifts = b.mul(_splat_i64(b, self.bits), ir.Constant(v8, list(range(8))))
        halves = []
        for h in range(2):
            part = b.trunc(b.lshr(whole, b.zext(b.mul(self.bits, _const(8 * h)), i128)), I64)
            halves.append(b.trunc(b.lshr(_splat_i64(b, part), shifts), ir.VectorType(I32, 8)))
        spread = b.shuffle_vector(halves[0], halves[1], ir.Constant(VI, list(range(LANES))))
        mask = b.sub(b.shl(ir.Constant(I32, 1), b.trunc(self.bits, I32)), ir.Constant(I32, 1))
        mask = b.shuffle_vector(b.insert_element(ir.Constant(VI, ir.Undefined), mask, ir.Constant(I32, 0)),
                                ir.Constant(VI, ir.Undefined), ir.Constant(VI, [0] * LANES))
        return b.uitofp(b.and_(spread, mask), VF)


def _splat_i64(builder, scalar):
    v8 = ir.VectorType(I64, 8)
    v = builder.insert_element(ir.Constant(v8, ir.Undefined), scalar, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, 8), [0] * 8))


def _literal(t):
    return t.literal_value if isinstance(t, types.IntegerLiteral) else None


@intrinsic(prefer_literal=True)
def tile(typingctx, out, x, w, scales, biases, layout, m0, n0, w0, k0, k1, acc, j0, first, last, mb, nb, kind):
    """Rows m0..m0+mb of x times rows w0..w0+nb of w (of `kind`) over k in [k0, k1), as the module doc says.

    The lanes start from zero where `first`, else from acc[m, j0 + j]; where `last` they are summed into
    out[m, n0 + j], else kept in acc[m, j0 + j] for the next range of k. x: float32 (M, K) in the order
    the weights read; acc: float32 (M, J, 16); layout: see `layout`; mb, nb, kind: compile-time integers.
    """
    MB, NB, BITS = _literal(mb), _literal(nb), _literal(kind)
    if None in (MB, NB, BITS):
        return None

    def codegen(context, builder, sig, args):
        out_p, (_, n_out) = _array(context, builder, sig.args[0], args[0])
        x_p, (_, k) = _array(context, builder, sig.args[1], args[1])
        weights = _Weights(context, builder, BITS, sig.args[2:6], args[2:6])
        m0_, n0_, w0_, k0_, k1_ = args[6:11]
        acc_p, (_, acc_rows, _) = _array(context, builder, sig.args[11], args[11])
        j0_, first, last = args[12:15]
        lanes = [[cgutils.alloca_once(builder, VF) for _ in range(NB)] for _ in range(MB)]

        def saved(i, j):  # where acc[m0 + i, j0 + j] starts
            row = builder.add(builder.mul(builder.add(m0_, _const(i)), acc_rows), builder.add(j0_, _const(j)))
            return builder.bitcast(builder.gep(acc_p, [builder.mul(row, _const(LANES))]), VF.as_pointer())

        with builder.if_else(builder.icmp_unsigned("!=", first, ir.Constant(first.type, 0))) as (zero, resume):
            with zero:
                for i in range(MB):
                    for j in range(NB):
                        builder.store(ir.Constant(VF, [0.0] * LANES), lanes[i][j])
            with resume:
                for i in range(MB):
                    for j in range(NB):
                        builder.store(builder.load(saved(i, j), align=4), lanes[i][j])
        x_rows = [builder.mul(builder.add(m0_, _const(i)), k) for i in range(MB)]
        w_rows = [builder.add(w0_, _const(j)) for j in range(NB)]
        chunk_len = LANES * weights.steps
        chunks = (builder.udiv(k0_, _const(chunk_len)), builder.udiv(k1_, _const(chunk_len)))
        with cgutils.for_range_slice(builder, *chunks, _const(1)) as (c, _):
            ws = [weights.vectors(r, c) for r in w_rows]
            at = builder.mul(c, _const(chunk_len))
            for i in range(MB):
                xs = [_load(builder, x_p, builder.add(x_rows[i], builder.add(at, _const(LANES * s))))
                      for s in range(weights.steps)]
                for j in range(NB):
                    a = builder.load(lanes[i][j])
                    for s in range(weights.steps):
                        a = _fmuladd(builder, xs[s], ws[j][s], a)
                    builder.store(a, lanes[i][j])
        with builder.if_else(builder.icmp_unsigned("!=", last, ir.Constant(last.type, 0))) as (finish, keep):
            with finish:
                for i in range(MB):
                    for j in range(NB):
                        at = builder.add(builder.mul(builder.add(m0_, _const(i)), n_out), builder.add(n0_, _const(j)))
                        builder.store(_lane_sum(builder, builder.load(lanes[i][j])), builder.gep(out_p, [at]))
            with keep:
                for i in range(MB):
                    for j in range(NB):
                        builder.store(builder.load(lanes[i][j]), saved(i, j), align=4)
        return context.get_dummy_value()

    return types.void(out, x, w, scales, biases, layout, m0, n0, w0, k0, k1, acc, j0, first, last, mb, nb,
                      kind), codegen


@intrinsic(prefer_literal=True)
def dequantize_row(typingctx, dst, r, w, scales, biases, layout, n, kind):
    """dst[r] = row n of w (of `kind`) as float32, in the order the tiles read (kernel order for 4-bit)."""
    BITS = _literal(kind)
    if BITS is None or BITS == DENSE:
        return None

    def codegen(context, builder, sig, args):
        dst_p, (_, k) = _array(context, builder, sig.args[0], args[0])
        weights = _Weights(context, builder, BITS, sig.args[2:6], args[2:6])
        row_start = builder.mul(args[1], k)
        chunk_len = LANES * weights.steps
        with cgutils.for_range(builder, builder.udiv(k, _const(chunk_len))) as loop:
            at = builder.add(row_start, builder.mul(loop.index, _const(chunk_len)))
            for s, v in enumerate(weights.vectors(args[6], loop.index)):
                p = builder.gep(dst_p, [builder.add(at, _const(LANES * s))])
                builder.store(v, builder.bitcast(p, VF.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(dst, r, w, scales, biases, layout, n, kind), codegen
