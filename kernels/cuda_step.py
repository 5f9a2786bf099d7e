"""`DecodeStep`: a decoder layer's step of one new token for each of B sessions (1-16) in five launches, and
the position arrays it takes.

The launches: rms_norm + q/k/v; RoPE + attention over each session's own cache (writing the new k, v into
it); o_proj + residual; rms_norm + SwiGLU; down_proj + residual. The host's time per op bounds decode on
the GPU as much as the kernels do, and this is 5 ops where the op-by-op layer has about 20 per session.
"""

from __future__ import annotations

import mlx.core as mx

from kernels import cuda_attention, cuda_matvec, cuda_mma, cuda_qkv, cuda_swiglu
from kernels.cuda_attention import MAX_POSITIONS, SESSIONS
from kernels.cuda_common import kernel, passed


def position_limit() -> int:
    """Cache positions the fused step takes: any with the batched attention kernel, else the older one's."""
    return 2 ** 31 - 1 if passed.get("attention") else MAX_POSITIONS


def positions(offsets: list[int]) -> mx.array:
    """Each session's new position (its cache's offset) as the int32 array DecodeStep.batch takes; made once a
    token and shared by every layer."""
    return mx.array(offsets, dtype=mx.int32)


_arange: mx.array | None = None
_views: dict[int, mx.array] = {}


def position(offset: int) -> mx.array:
    """offset (< MAX_POSITIONS) as an int32 array of shape (1,): a view into one arange made once, the same
    array for every layer of a step (one op a token, and nothing written by the host)."""
    global _arange
    view = _views.get(offset)
    if view is None:
        if _arange is None:
            _arange = mx.arange(MAX_POSITIONS, dtype=mx.int32)
            mx.eval(_arange)
        if len(_views) >= 64:
            _views.clear()
        view = _views[offset] = _arange[offset:offset + 1]
    return view


class DecodeStep:
    """One decoder layer for one new token of each of B sessions; built once per layer by the decoder.

    `batch(x, caches, positions, after)` returns the hidden out, having written each session's new k and v
    into its cache in place, or None where these kernels do not apply (the caller then runs the layer op
    by op). Calls of one DecodeStep must run in order (its attention launches share a counter array), as
    a decoder's steps do. What a call needs beyond its inputs is planned once per shape.
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
        self.counters: mx.array | None = None
        self._plans: dict[tuple, list | None] = {}

    def plan(self, x: mx.array, cache: tuple, sessions: int) -> list | None:
        """(kind, recipe, launch arguments) of the five launches for x's shape and dtype (cache: the first
        session's), or None. The attention: the batched kernel, else (one session) the older one."""
        gs, dt = self.group_size, x.dtype
        def like(n):  # an input of this width, for its shape only (never evaluated)
            return mx.zeros((*x.shape[:-1], n), dt)
        q_dim, kv_dim = self.q[0].shape[0], self.k[0].shape[0]
        q, kv = like(q_dim), like(kv_dim)
        att = None
        if passed.get("attention"):
            att = ("sessions", cuda_attention.sessions_plan(q, kv, kv, cache, sessions, self.head_dim, self.traditional))
        if (att is None or att[1] is None) and sessions == 1 and passed.get("attention_serial"):
            att = ("serial", cuda_attention.attend_plan(q, kv, kv, *cache, mx.zeros((1,), mx.int32), self.inv_freq,
                                                        self.head_dim, self.traditional))
        rows = cuda_mma.MAX_ROWS
        found = [cuda_qkv.qkv_plan(x, self.q, self.k, self.v, gs, self.qkv_bias, self.attn_norm, max_rows=rows),
                 None if att is None else att[1],
                 cuda_matvec.matvec_plan(q, self.o, gs, residual=x, max_rows=rows),
                 cuda_swiglu.swiglu_plan(x, self.gate, self.up, gs, self.mlp_norm, max_rows=rows),
                 cuda_matvec.matvec_plan(like(self.gate[0].shape[0]), self.down, gs, residual=x, max_rows=rows)]
        if any(f is None for f in found):
            return None
        found[1] = (att[0], found[1])
        return [(kind, recipe, {"grid": grid, "threadgroup": block, "output_shapes": shapes,
                                "output_dtypes": dtypes[0] if dtypes else [dt] * len(shapes)})
                for kind, (recipe, grid, block, shapes, *dtypes) in found]

    def batch(self, x: mx.array, caches: list[tuple], positions: mx.array, after: mx.array | None = None) -> mx.array | None:
        """x (1, B, hidden) or (B, 1, hidden): the new row of each of B sessions; caches[b] = (keys, values)
        of session b, each (1, KV, capacity_b, D); positions: (B,) int32 (`positions()`), session b's new
        position, below capacity_b (the caller's to keep, with KVCache.reserve); after: the output of the
        step that last wrote these caches in place (None if evaluated since). Returns the hidden out (x's
        shape) or None."""
        sig = (x.shape, x.dtype, len(caches), caches[0][0].shape[:2] + caches[0][0].shape[3:], caches[0][0].dtype)
        if sig not in self._plans:
            found = self.plan(x, caches[0], len(caches)) if len(caches) <= SESSIONS else None
            self._plans[sig] = None if found is None else [(kind, kernel(r), args) for kind, r, args in found]
        plans = self._plans[sig]
        if plans is None:
            return None
        (_, kqkv, aqkv), (att, katt, aatt), (_, ko, ao), (_, kmlp, amlp), (_, kdown, adown) = plans
        q, k, v = kqkv(inputs=[x, *self.qkv_inputs], **aqkv)
        if att == "sessions":
            if self.counters is None:
                self.counters = cuda_attention.counters()
            inputs = cuda_attention.session_inputs(q, k, v, caches, positions, self.inv_freq, after, self.counters)
        else:
            keys, values = caches[0]
            inputs = [q, k, v, keys, values, positions, self.inv_freq, keys if after is None else after]
        out = katt(inputs=inputs, **aatt)[0]
        h = ko(inputs=[out, *self.o, x], **ao)[0]
        g = kmlp(inputs=[h, *self.mlp_inputs], **amlp)[0]
        return kdown(inputs=[g, *self.down, h], **adown)[0]

    def __call__(self, x: mx.array, keys: mx.array, values: mx.array, position: mx.array,
                 after: mx.array | None = None) -> mx.array | None:
        """One session (x (1, 1, hidden), its cache (1, KV, capacity, D), position: int32 (1,))."""
        return self.batch(x, [(keys, values)], position, after)
