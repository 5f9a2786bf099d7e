"""x @ W.T on the CPU for MLX-quantized (2-8 bits) and float32 weights, on all cores through numba.

`Plan` holds one layer's weights as the kernels read them: zero-copy numpy views of the MLX arrays
(scales and biases in 16 bits where that holds their values exactly: `halved`). A call picks
one of two drivers by the number of activation rows; both are built on kernels.cpu_simd's `tile`, so a
row's result is the same whichever runs it:

- few rows (decode): each weight chunk is dequantized in registers and multiplied into every row at once,
  the weights streamed from memory once (bandwidth-bound);
- many rows (prefill): each thread dequantizes 16 weight rows into a float32 tile in cache, then multiplies
  it with all activation rows, 4 x 4 dot products at a time (compute-bound, FMA throughput).

Threads take the output columns in tasks of TASK_ROWS, one task at a time; each output is computed by one
thread from start to end. `Plan.on_blas` is the faster path for the rows of one prompt chunk (numpy's BLAS
on dequantized blocks), which gives up the row independence: kernels.cpu_block uses it for prompt chunks
only, one chunk a call.
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from kernels.cpu_simd import ANY, DENSE, LANES, dequantize_row, layout, tile

FUSED_ROWS = 4      # up to this many activation rows the fused (decode) driver runs, above it the tiled one
TILE_ROWS = 16      # weight rows a thread dequantizes at a time in the tiled driver
K_BLOCK = 256       # values of k the tiled driver multiplies at a time (a multiple of 32)
SERIAL_BYTES = 256 * 1024  # below this much weight data times rows, a call runs on the calling thread alone
TASK_ROWS = 128     # output rows a task (the unit the threads take one at a time) computes
BLAS_ROWS = 512     # weight rows `Plan.on_blas` dequantizes at a time
GROUP_SIZES = (32, 64, 128)
BITS = (2, 3, 4, 5, 6, 8)

_one_call_at_a_time = threading.Lock()  # each call already uses every thread it is given


@functools.cache
def drivers(kind: int):
    """(fused, tiled, dequantize) jitted drivers for weights of `kind` (cpu_simd: DENSE, 4 or ANY), compiled
    on first call, cached on disk."""

    @njit(parallel=True, cache=True)
    def fused(out, x, w, scales, biases, layout, tasks):
        M, N = out.shape
        K = x.shape[1]
        unused = np.empty((1, 1, LANES), np.float32)
        blocks = (N + 3) // 4
        per = (blocks + tasks - 1) // tasks
        for t in prange(tasks):
            for block in range(t * per, min(blocks, (t + 1) * per)):
                n0 = block * 4
                if n0 + 4 <= N:
                    m = 0
                    while m + 4 <= M:
                        tile(out, x, w, scales, biases, layout, m, n0, n0, 0, K, unused, 0, True, True, 4, 4, kind)
                        m += 4
                    if m + 2 <= M:
                        tile(out, x, w, scales, biases, layout, m, n0, n0, 0, K, unused, 0, True, True, 2, 4, kind)
                        m += 2
                    if m < M:
                        tile(out, x, w, scales, biases, layout, m, n0, n0, 0, K, unused, 0, True, True, 1, 4, kind)
                else:
                    for n in range(n0, N):
                        for m in range(M):
                            tile(out, x, w, scales, biases, layout, m, n, n, 0, K, unused, 0, True, True, 1, 1, kind)

    if kind == DENSE:
        @njit(parallel=True, cache=True)
        def tiled(out, x, w, scales, biases, layout, tasks):
            N = out.shape[1]
            tiles = (N + TILE_ROWS - 1) // TILE_ROWS
            per = (tiles + tasks - 1) // tasks
            for t in prange(tasks):
                acc = np.empty((x.shape[0], TILE_ROWS, LANES), np.float32)
                for i in range(t * per, min(tiles, (t + 1) * per)):
                    n0 = i * TILE_ROWS
                    dot_tiles(out, x, w, n0, n0, min(TILE_ROWS, N - n0), acc)
    else:
        @njit(parallel=True, cache=True)
        def tiled(out, x, w, scales, biases, layout, tasks):
            N, K = out.shape[1], x.shape[1]
            tiles = (N + TILE_ROWS - 1) // TILE_ROWS
            per = (tiles + tasks - 1) // tasks
            for t in prange(tasks):
                wk = np.empty((TILE_ROWS, K), np.float32)
                acc = np.empty((x.shape[0], TILE_ROWS, LANES), np.float32)
                for i in range(t * per, min(tiles, (t + 1) * per)):
                    n0 = i * TILE_ROWS
                    rows = min(TILE_ROWS, N - n0)
                    for r in range(rows):
                        dequantize_row(wk, r, w, scales, biases, layout, n0 + r, kind)
                    dot_tiles(out, x, wk, n0, 0, rows, acc)

    @njit(nogil=True, cache=True)
    def dequantize(dst, w, scales, biases, layout, n0):
        """dst[r] = row n0 + r of w as float32 (the order the kernels read), on the calling thread."""
        for r in range(dst.shape[0]):
            dequantize_row(dst, r, w, scales, biases, layout, n0 + r, kind)

    return fused, tiled, dequantize


@njit(cache=True)
def dot_tiles(out, x, wk, n0, w0, rows, acc):
    """out[:, n0:n0+rows] = x . wk[w0:w0+rows] for float32 rows wk: 4 x 4 dot products at a time, over
    ranges of K_BLOCK values of k so that the rows being multiplied stay in the L1 cache."""
    M, K = x.shape
    for k0 in range(0, K, K_BLOCK):
        k1 = min(K, k0 + K_BLOCK)
        first, last = k0 == 0, k1 == K
        m = 0
        while m < M:
            j = 0
            while j + 4 <= rows:
                if m + 4 <= M:
                    tile(out, x, wk, wk, wk, 0, m, n0 + j, w0 + j, k0, k1, acc, j, first, last, 4, 4, DENSE)
                else:
                    for i in range(m, M):
                        tile(out, x, wk, wk, wk, 0, i, n0 + j, w0 + j, k0, k1, acc, j, first, last, 1, 4, DENSE)
                j += 4
            for jj in range(j, rows):
                for i in range(m, min(M, m + 4)):
                    tile(out, x, wk, wk, wk, 0, i, n0 + jj, w0 + jj, k0, k1, acc, jj, first, last, 1, 1, DENSE)
            m += 4


def kernel_order(x: np.ndarray, kind: int) -> np.ndarray:
    """x (M, K) float32, C-contiguous, with each 32-value chunk in the order weights of `kind` are read."""
    if kind != 4:
        return np.ascontiguousarray(x, np.float32)
    M, K = x.shape
    return np.ascontiguousarray(x.reshape(M, K // 32, 4, 2, 4).transpose(0, 1, 3, 4, 2), np.float32).reshape(M, K)


@dataclass(frozen=True)
class Plan:
    """One linear layer's weights as the CPU kernels read them; `in_dim` is padded to whole vectors (dense)."""

    weight: np.ndarray        # uint32 (out, in * bits / 32), or float32 (out, padded in)
    scales: np.ndarray        # (out, in / group_size): float32, or 16-bit (`halved`); empty for float32 weights
    biases: np.ndarray
    kind: int                 # cpu_simd's DENSE, 4 or ANY
    layout: int               # cpu_simd.layout(group_size, bits); 0 for float32 weights
    in_dim: int

    @property
    def out_dim(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: np.ndarray, threads: int) -> np.ndarray:
        """x (M, in_dim) float32 -> (M, out_dim) float32."""
        M = x.shape[0]
        padded = self.weight.shape[1] if self.kind == DENSE else self.in_dim
        if padded != self.in_dim:
            x = np.pad(x, ((0, 0), (0, padded - self.in_dim)))
        out = np.empty((M, self.out_dim), np.float32)
        fused, tiled, _ = drivers(self.kind)
        # a thread team costs about 10 us a call, and far more when the cores are busy with other work
        threads = 1 if self.weight.nbytes * M < SERIAL_BYTES else max(1, min(threads, self.out_dim // TILE_ROWS))
        # many small tasks handed out one at a time: a thread that the OS preempts holds up one task, not
        # its whole share of the rows
        tasks = max(threads, -(-self.out_dim // TASK_ROWS))
        x = kernel_order(x, self.kind)
        with _one_call_at_a_time:
            numba.set_num_threads(threads)
            numba.set_parallel_chunksize(1)
            (fused if M <= FUSED_ROWS else tiled)(out, x, self.weight, self.scales, self.biases, self.layout, tasks)
        return out

    def on_blas(self, x: np.ndarray, threads: int) -> np.ndarray:
        """x (M, in_dim) -> (M, out_dim) on numpy's BLAS: for the rows of one prompt chunk. Faster than the
        tiles at hundreds of rows, but a row's sums then run in BLAS's order, which may depend on the other
        rows: `__call__` keeps rows independent, this does not.

        The output columns are split over `threads` BLAS threads (`on_blas_threads`); each dequantizes
        BLAS_ROWS weight rows at a time and multiplies them."""
        if self.kind == DENSE and self.weight.shape[1] != self.in_dim:
            x = np.pad(x, ((0, 0), (0, self.weight.shape[1] - self.in_dim)))
        x = kernel_order(x, self.kind)
        out = np.empty((x.shape[0], self.out_dim), np.float32)
        parts = np.linspace(0, self.out_dim, max(1, min(threads, self.out_dim // TASK_ROWS)) + 1).astype(int)
        on_blas_threads(lambda i: self._blas_part(x, out, parts[i], parts[i + 1]), range(len(parts) - 1), len(parts) - 1)
        return out

    def _blas_part(self, x: np.ndarray, out: np.ndarray, start: int, stop: int) -> None:
        if self.kind == DENSE:
            np.matmul(x, self.weight[start:stop].T, out=out[:, start:stop])
            return
        dequantize = drivers(self.kind)[2]
        block = np.empty((min(BLAS_ROWS, stop - start), self.in_dim), np.float32)
        for n0 in range(start, stop, BLAS_ROWS):
            rows = block[:min(BLAS_ROWS, stop - n0)]
            dequantize(rows, self.weight, self.scales, self.biases, self.layout, n0)
            np.matmul(x, rows.T, out=out[:, n0:n0 + len(rows)])


def on_blas_threads(fn, items, threads: int) -> None:
    """fn(item) for each item, on `threads` Python threads that each call a one-thread BLAS. (BLAS's own
    threads spin for a while after each call, and would fight the kernels' threads for the cores.)"""
    one_thread_blas()
    list(_blas_pool(threads).map(fn, items))


@functools.cache
def _blas_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="cpu-blas")


@functools.cache
def one_thread_blas() -> None:
    """numpy's BLAS on one thread per call, from the first prompt chunk on (on_blas runs several calls);
    without threadpoolctl (the `cpu` extra) BLAS keeps its threads, and on_blas is slower, not wrong."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return
    ThreadpoolController().limit(limits=1, user_api="blas")


def quantized_plan(weight: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int, bits: int) -> Plan | None:
    """A Plan over MLX-quantized tensors (numpy views of them), or None where the kernels do not take the layout."""
    if bits not in BITS or group_size not in GROUP_SIZES or weight.dtype != np.uint32 or weight.ndim != 2:
        return None
    in_dim = weight.shape[1] * 32 // bits
    if scales.shape != (weight.shape[0], in_dim // group_size) or biases.shape != scales.shape:
        return None
    scales, biases = halved(np.ascontiguousarray(scales, np.float32), np.ascontiguousarray(biases, np.float32))
    return Plan(np.ascontiguousarray(weight), scales, biases, 4 if bits == 4 else ANY, layout(group_size, bits), in_dim)


def halved(scales: np.ndarray, biases: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scales and biases in 16 bits where that holds their float32 values exactly (a checkpoint saved them
    in bfloat16 or float16, and the stage widened them): bfloat16's bits as uint16 (the upper half of the
    float32), float16's as int16 (numba takes no float16 arrays). A tenth fewer bytes to read a 4-bit
    weight at group size 64, the same numbers."""
    pair = np.stack([scales, biases])
    if not np.any(pair.view(np.uint32) & 0xFFFF):
        upper = (pair.view(np.uint32) >> 16).astype(np.uint16)
        return upper[0], upper[1]
    with np.errstate(over="ignore"):
        half = pair.astype(np.float16)
    if np.array_equal(half.astype(np.float32), pair):
        return half[0].view(np.int16), half[1].view(np.int16)
    return scales, biases


def dense_plan(weight: np.ndarray) -> Plan | None:
    """A Plan over float32 weights (out, in): a view where `in` is a whole number of vectors, else a padded copy."""
    if weight.dtype != np.float32 or weight.ndim != 2:
        return None
    out_dim, in_dim = weight.shape
    padded = -(-in_dim // LANES) * LANES
    w = np.ascontiguousarray(weight) if padded == in_dim else np.pad(weight, ((0, 0), (0, padded - in_dim)))
    empty = np.empty((0, 0), np.float32)
    return Plan(w, empty, empty, DENSE, 0, in_dim)
