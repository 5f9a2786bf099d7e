"""The decoder's layers on the CPU over numpy arrays: RMS-norm, RoPE, attention over each session's KV
cache and SwiGLU as numba kernels, the linears on kernels.cpu_matmul, a stage's forward in one call.

On MLX's CPU back-end every small op costs 50-150 us of CPU (rms_norm, rope, the attention, silu, measured
on the 2-core VM), about 20 ms a token for the ops around the linears of a 24-layer model, so on the CPU
path a stage keeps MLX for its tensors only: `StageRunner` runs the same forward as swarm.model.decoder's
Stage (the rows of several sessions packed one after another, each session attending over its own cache)
with the hidden states in numpy from the embedding to the logits. Every kernel here works row by row, so
a row's result does not depend on the rows beside it (batched decode gives solo decode's tokens); a
session's prompt chunk of BLAS_MIN_ROWS rows or more runs its linears and its attention on BLAS instead
(sums in BLAS's order, the same for the same chunk whatever shares its batch), spread over BLAS threads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numba
import numpy as np
from numba import njit, prange

from kernels import cpu_matmul, cpu_path, cpu_simd  # noqa: F401  (cpu_simd: it names numba's cache folder)


class KV:
    """Keys and values of one layer for one session: float32 (kv_heads, capacity, head_dim), grown in steps."""

    step = 256

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0

    def append(self, k: np.ndarray, v: np.ndarray) -> None:
        """k, v: (new, kv_heads, head_dim)."""
        start, end = self.offset, self.offset + k.shape[0]
        if self.keys is None or end > self.keys.shape[1]:
            capacity = -(-end // self.step) * self.step
            self.keys, self.values = (self._grown(a, k, capacity) for a in (self.keys, self.values))
        self.keys[:, start:end] = k.transpose(1, 0, 2)
        self.values[:, start:end] = v.transpose(1, 0, 2)
        self.offset = end

    def _grown(self, old: np.ndarray | None, like: np.ndarray, capacity: int) -> np.ndarray:
        room = np.zeros((like.shape[1], capacity, like.shape[2]), np.float32)
        if old is not None:
            room[:, :self.offset] = old[:, :self.offset]
        return room

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


@njit(cache=True)
def rms_norm(x, weight, eps):
    """x (T, d) float32 -> x / rms(x) * weight, each row on its own (sums in float64)."""
    T, d = x.shape
    out = np.empty_like(x)
    for t in range(T):
        ss = 0.0
        for i in range(d):
            ss += np.float64(x[t, i]) * x[t, i]
        inv = np.float32(1.0 / math.sqrt(ss / d + eps))
        for i in range(d):
            out[t, i] = x[t, i] * inv * weight[i]
    return out


@njit(cache=True)
def rope(x, positions, inv_freq, traditional):
    """RoPE in place on x (T, heads, head_dim) at positions (T,): pairs (i, i + half), or (2i, 2i + 1) where
    traditional; angle = position * inv_freq[i] (what mx.fast.rope computes, here in float64)."""
    T, heads, dim = x.shape
    half = dim // 2
    for t in range(T):
        for i in range(half):
            angle = np.float64(positions[t]) * inv_freq[i]
            c, s = math.cos(angle), math.sin(angle)
            a, b = (2 * i, 2 * i + 1) if traditional else (i, i + half)
            for h in range(heads):
                x1, x2 = np.float64(x[t, h, a]), np.float64(x[t, h, b])
                x[t, h, a] = x1 * c - x2 * s
                x[t, h, b] = x2 * c + x1 * s


@njit(cache=True, fastmath=True)
def _attend_row(q, keys, values, length, scale, out):
    """out (heads * head_dim) = attention of one row q (heads, head_dim) over the first `length` positions of
    keys/values (kv_heads, capacity, head_dim); head h reads kv head h // (heads / kv_heads). fastmath lets
    the sums over head_dim run as vectors: the same code for every row, so rows stay independent."""
    heads, dim = q.shape
    group = heads // keys.shape[0]
    scores = np.empty(length, np.float32)
    out[:] = 0.0
    for h in range(heads):
        g = h // group
        top = -np.inf
        for s in range(length):
            acc = np.float32(0.0)
            for i in range(dim):
                acc += q[h, i] * keys[g, s, i]
            scores[s] = acc * scale
            top = max(top, scores[s])
        total = np.float32(0.0)
        for s in range(length):
            scores[s] = np.exp(scores[s] - top)
            total += scores[s]
        for s in range(length):
            p = scores[s] / total
            for i in range(dim):
                out[h * dim + i] += p * values[g, s, i]


@njit(cache=True)
def attend_one(q, keys, values, length, scale):
    """A decode row: q (heads, head_dim) over `length` cached positions -> (heads * head_dim)."""
    out = np.empty(q.shape[0] * q.shape[1], np.float32)
    _attend_row(q, keys, values, length, scale, out)
    return out


@njit(cache=True, parallel=True)
def attend_causal(q, keys, values, length, scale):
    """L new rows q (L, heads, head_dim), the last L of `length` cached positions: row l sees the first
    length - L + l + 1. -> (L, heads * head_dim), rows spread over the threads."""
    L = q.shape[0]
    out = np.empty((L, q.shape[1] * q.shape[2]), np.float32)
    for row in prange(L):
        _attend_row(q[row], keys, values, length - L + row + 1, scale, out[row])
    return out


def attend_rows(q: np.ndarray, kv: KV, scale: float) -> np.ndarray:
    """q (L, heads, head_dim) of one session's L new rows, whose keys and values are already in kv (the last
    L positions): causal attention -> (L, heads * head_dim). A prompt chunk (BLAS_MIN_ROWS rows or more)
    runs on BLAS, as its linears do."""
    if q.shape[0] == 1:
        return attend_one(q[0], kv.keys, kv.values, kv.offset, np.float32(scale))[None]
    if q.shape[0] >= BLAS_MIN_ROWS:
        return attend_on_blas(q, kv, scale)
    _use_threads()
    return attend_causal(q, kv.keys, kv.values, kv.offset, np.float32(scale))


ATTEND_BLOCK = 64  # rows of a prompt chunk that attend_on_blas computes at a time
_HIDDEN = np.triu(np.full((ATTEND_BLOCK, ATTEND_BLOCK), -np.inf, np.float32), k=1)  # row i sees columns <= i


def attend_on_blas(q: np.ndarray, kv: KV, scale: float) -> np.ndarray:
    """attend_rows for a prompt chunk: per block of ATTEND_BLOCK rows and kv head, the scores of the block's
    query heads over the positions its last row sees in one matrix product, the causal part of the last
    block of columns masked, softmax, and one product with the values. The blocks are spread over the
    cores, each on a one-thread BLAS."""
    L, heads, dim = q.shape
    kv_heads, past = kv.keys.shape[0], kv.offset - L
    group = heads // kv_heads
    out = np.empty((L, heads, dim), np.float32)

    def block(b0: int) -> None:
        n = min(ATTEND_BLOCK, L - b0)
        seen = past + b0 + n
        for g in range(kv_heads):
            rows = q[b0:b0 + n, g * group:(g + 1) * group].reshape(n * group, dim)
            s = (rows @ kv.keys[g, :seen].T).reshape(n, group, seen)
            s *= np.float32(scale)
            s[:, :, seen - n:] += _HIDDEN[:n, None, :n]
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            out[b0:b0 + n, g * group:(g + 1) * group] = (s.reshape(n * group, seen) @ kv.values[g, :seen]).reshape(n, group, dim)

    cpu_matmul.on_blas_threads(block, range(0, L, ATTEND_BLOCK), cpu_path.threads())
    return out.reshape(L, heads * dim)


def _use_threads() -> None:
    numba.set_num_threads(min(cpu_path.threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_parallel_chunksize(1)


@njit(cache=True, nogil=True)
def _silu_mul_rows(gate, up, out, start, stop):
    for t in range(start, stop):
        for i in range(gate.shape[1]):
            g = gate[t, i]
            out[t, i] = g / (np.float32(1.0) + np.exp(-g)) * up[t, i]


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up, elementwise, float32 (T, n). Many rows (a prompt chunk) are spread over the BLAS
    threads, the ones its linears run on, rather than numba's, which would stay awake beside them."""
    out = np.empty_like(gate)
    T = gate.shape[0]
    if T < 16:
        _silu_mul_rows(gate, up, out, 0, T)
        return out
    bounds = np.linspace(0, T, cpu_path.threads() + 1).astype(int)
    cpu_matmul.on_blas_threads(lambda i: _silu_mul_rows(gate, up, out, bounds[i], bounds[i + 1]),
                               range(len(bounds) - 1), cpu_path.threads())
    return out


def inverse_frequencies(head_dim: int, base: float | None, scale: float, freqs: mx.array | None) -> np.ndarray:
    """RoPE's angle per position for each pair, float64 (head_dim / 2,): what mx.fast.rope derives from
    (base, scale) or takes as `freqs` (periods), times the position scale."""
    if freqs is not None:
        return scale / np.asarray(freqs, np.float64)
    return scale * base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def _vector(a: mx.array | None) -> np.ndarray | None:
    return None if a is None else np.asarray(a.astype(mx.float32))


BLAS_MIN_ROWS = 64  # a prompt chunk of at least this many rows runs its linears on BLAS (cpu_matmul.Plan.on_blas)


def prompt_chunks(rows: list[int]) -> list[tuple[int, int]]:
    """(first row, rows) of each session whose rows in a batch are a prompt chunk long enough for BLAS."""
    starts = np.cumsum([0] + rows[:-1])
    return [(int(a), n) for a, n in zip(starts, rows) if n >= BLAS_MIN_ROWS]


class _Linear:
    """A decoder Linear's plan and bias, called on numpy rows."""

    def __init__(self, linear):
        if linear.cpu is None:
            raise ValueError("a linear without a CPU plan (the CPU kernels are off or do not take its layout)")
        self.plan, self.bias = linear.cpu, _vector(linear.bias) if "bias" in linear else None

    def __call__(self, x: np.ndarray, chunks: list[tuple[int, int]] = ()) -> np.ndarray:
        """x (T, in) -> (T, out). The rows of each chunk (first row, rows) run on BLAS, one chunk a call, so
        that a chunk gives the same result whatever shares its batch; every other row on the row-exact kernels."""
        threads = cpu_path.threads()
        if not chunks:
            y = self.plan(x, threads)
        else:
            y = np.empty((x.shape[0], self.plan.out_dim), np.float32)
            rest = np.ones(x.shape[0], bool)
            for a, n in chunks:
                y[a:a + n] = self.plan.on_blas(x[a:a + n], threads)
                rest[a:a + n] = False
            if rest.any():
                y[rest] = self.plan(np.ascontiguousarray(x[rest]), threads)
        return y if self.bias is None else y + self.bias


@dataclass
class LayerStep:
    """One decoder layer (swarm.model.decoder.Block) on numpy rows."""

    attn_norm: np.ndarray
    mlp_norm: np.ndarray
    eps: float
    q: _Linear
    k: _Linear
    v: _Linear
    o: _Linear
    gate: _Linear
    up: _Linear
    down: _Linear
    q_norm: np.ndarray | None
    k_norm: np.ndarray | None
    heads: int
    kv_heads: int
    head_dim: int
    inv_freq: np.ndarray
    traditional: bool

    @classmethod
    def of(cls, block) -> LayerStep:
        a, m = block.self_attn, block.mlp
        norms = (_vector(a.q_norm), _vector(a.k_norm)) if "q_norm" in a else (None, None)
        return cls(_vector(block.input_layernorm), _vector(block.post_attention_layernorm), block.eps,
                   _Linear(a.q_proj), _Linear(a.k_proj), _Linear(a.v_proj), _Linear(a.o_proj),
                   _Linear(m.gate_proj), _Linear(m.up_proj), _Linear(m.down_proj), *norms,
                   a.n_heads, a.n_kv_heads, a.head_dim,
                   inverse_frequencies(a.head_dim, a.rope_base, a.rope_scale, a._freqs), a.traditional)

    def __call__(self, h: np.ndarray, kvs: list[KV], rows: list[int]) -> np.ndarray:
        """h (T, hidden): the rows of len(kvs) sessions one after another (rows[i] of session i)."""
        T, chunks = h.shape[0], prompt_chunks(rows)
        x = rms_norm(h, self.attn_norm, self.eps)
        q = self.q(x, chunks).reshape(T, self.heads, self.head_dim)
        k = self.k(x, chunks).reshape(T, self.kv_heads, self.head_dim)
        v = self.v(x, chunks).reshape(T, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = rms_norm(q.reshape(-1, self.head_dim), self.q_norm, self.eps).reshape(q.shape)
            k = rms_norm(k.reshape(-1, self.head_dim), self.k_norm, self.eps).reshape(k.shape)
        positions = np.concatenate([kv.offset + np.arange(n) for kv, n in zip(kvs, rows)])
        rope(q, positions, self.inv_freq, self.traditional)
        rope(k, positions, self.inv_freq, self.traditional)
        out, start = [], 0
        for kv, n in zip(kvs, rows):
            kv.append(k[start:start + n], v[start:start + n])
            out.append(attend_rows(q[start:start + n], kv, self.head_dim ** -0.5))
            start += n
        h = h + self.o(np.concatenate(out) if len(out) > 1 else out[0], chunks)
        x = rms_norm(h, self.mlp_norm, self.eps)
        return h + self.down(silu_mul(self.gate(x, chunks), self.up(x, chunks)), chunks)


class Embedding:
    """The embedding's rows for token ids on numpy, MLX's dequantized values bit for bit (scale * q + bias in
    float32, q unpacked from the little-endian bit stream MLX packs): ~20 us a token where MLX's lookup
    takes ~330 us on the 2-core VM (a gather, a dequantize and a trip to MLX's stream thread). Weights in
    another dtype keep MLX's lookup. (Not cpu_matmul's dequantize: it fuses the multiply-add and reads
    4-bit rows in kernel order, and the hidden states must start as MLX's.)"""

    def __init__(self, linear):
        self.linear, self.weight = linear, None
        if not linear.quantized:
            if linear.weight.dtype == mx.float32:
                self.weight = np.asarray(linear.weight)
        elif linear.scales.dtype == mx.float32 and linear.biases.dtype == mx.float32:
            self.weight, self.scales, self.biases = (np.asarray(a) for a in (linear.weight, linear.scales, linear.biases))
            self.bits, self.group = linear.bits, linear.group_size
            self.width = linear.weight.shape[1] * 32 // linear.bits
            self.place_values = 1 << np.arange(self.bits, dtype=np.uint16)  # a value from its bits

    def rows(self, ids: np.ndarray) -> np.ndarray:
        if self.weight is None:
            return np.array(self.linear.rows(mx.array(ids)).astype(mx.float32))
        if not self.linear.quantized:
            return self.weight[ids]
        n = len(ids)
        bits = np.unpackbits(self.weight[ids].view(np.uint8), axis=-1, bitorder="little")
        q = bits.reshape(n, self.width, self.bits) @ self.place_values
        groups = q.astype(np.float32).reshape(n, -1, self.group)
        return (groups * self.scales[ids][:, :, None] + self.biases[ids][:, :, None]).reshape(n, self.width)


class StageRunner:
    """A decoder Stage's forward on numpy: the embedding's rows (Embedding), then every layer, the final
    norm and the head on the CPU kernels. Built once the stage is loaded; KV caches from `make_cache`."""

    def __init__(self, stage):
        self.stage = stage
        self.layers = [LayerStep.of(block) for block in stage.layers]
        if stage.spec.first:
            self.embedding = Embedding(stage.embed_tokens)
        if stage.spec.last:
            self.norm, self.head = _vector(stage.norm), _Linear(stage.lm_head)

    def make_cache(self) -> list[KV]:
        return [KV() for _ in self.layers]

    def forward(self, x, caches: list[list[KV]], rows: list[int], all_logits: bool = False) -> np.ndarray:
        """As Stage.forward: x token ids (T,) on the first stage, else hidden states (T, hidden); returns
        logits (sessions, vocab) of each session's last row ((T, vocab) with all_logits) on the last stage,
        else hidden states (T, hidden)."""
        stage = self.stage
        if stage.spec.first:
            h = self.embedding.rows(np.asarray(x))  # int32 ids from the scheduler index as they are
        else:
            h = np.ascontiguousarray(x, np.float32).reshape(-1, stage.cfg.hidden_size)
        for i, layer in enumerate(self.layers):
            h = layer(h, [c[i] for c in caches], rows)
        if not stage.spec.last:
            return h
        if not all_logits:
            h = h[np.cumsum(rows) - 1]
        return self.head(rms_norm(np.ascontiguousarray(h), self.norm, stage.cfg.rms_norm_eps))
