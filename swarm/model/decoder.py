"""The decoder: one implementation of the llama family with switches for qwen2, qwen3 and mistral.

A `Stage` is (embedding?) + layers [start, end) + (final norm + head?). The whole model on one node is
the one-stage case; a pipeline chains stages, passing hidden states. A forward runs a batch: the rows of
several sessions packed into one sequence (1, T, hidden); the linears see all T rows at once, attention
runs per session over that session's own KV cache.
Module attribute names mirror the checkpoint's tensor names, so a layer is built straight from them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from kernels import cuda_q4
from kernels.linear import Linear, backend, compute_dtype
from swarm.model.checkpoint import read_tensor, stored_float_dtype, tensor_index
from swarm.model.config import ModelConfig, ModelError
from swarm.tensorfile import TensorInfo


class KVCache:
    """Keys and values of one layer for one session, grown in steps of `step` positions.

    The fused decode step (cuda_q4.DecodeStep) writes its position into keys/values in place, where MLX
    cannot see it: within one graph, an op reading the arrays could run before that write unless it
    depends on the step's output. So the output of the last such step is kept (`last_write`): the next
    fused step takes it as an input, and an append or a growth (a slice update, a copy) waits for it.
    A decode loop evaluates each step before it builds the next, and then that wait finds the work done.
    """

    step = 256

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0
        self.last_write: mx.array | None = None

    def append(self, k: mx.array, v: mx.array) -> None:
        # k, v: (batch, kv_heads, new, head_dim)
        start, end = self.offset, self.offset + k.shape[2]
        self._settle()
        self.reserve(end - start, k)
        self.keys[..., start:end, :] = k
        self.values[..., start:end, :] = v
        self.offset = end

    def reserve(self, n: int, like: mx.array | None = None) -> None:
        """Capacity for n more positions (`like`: new keys, for the shape of a first allocation)."""
        end = self.offset + n
        if self.keys is None or end > self.keys.shape[2]:
            self._settle()
            capacity = -(-end // self.step) * self.step
            self.keys, self.values = (self._grown(self.keys, like, capacity),
                                      self._grown(self.values, like, capacity))

    def written_in_place(self, step_output: mx.array) -> None:
        """One position was written into keys/values in place by the op giving step_output."""
        self.offset += 1
        self.last_write = step_output

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        self.append(k, v)
        return self.keys[..., :self.offset, :], self.values[..., :self.offset, :]

    def _settle(self) -> None:
        if self.last_write is not None:
            mx.eval(self.last_write)
            self.last_write = None

    def _grown(self, old: mx.array | None, like: mx.array, capacity: int) -> mx.array:
        src = like if old is None else old
        B, heads, _, dim = src.shape
        kept = 0 if old is None else self.offset
        room = mx.zeros((B, heads, capacity - kept, dim), src.dtype)
        return room if old is None else mx.concatenate([old[..., :kept, :], room], axis=2)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def rope_frequencies(cfg: ModelConfig) -> tuple[float | None, float, mx.array | None]:
    """(base, scale, freqs) for mx.fast.rope from the config's rope_theta and rope_scaling."""
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return cfg.rope_theta, 1.0, None
    if kind == "linear":
        return cfg.rope_theta, 1.0 / scaling["factor"], None
    if kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between.
        dims, factor = cfg.head_dim, scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_context = scaling.get("original_max_position_embeddings", 8192)
        periods = cfg.rope_theta ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)  # 1 / inverse frequency
        wavelengths = 2 * math.pi * periods
        smooth = (old_context / wavelengths - low) / (high - low)
        blended = periods / ((1 - smooth) / factor + smooth)
        freqs = mx.where(wavelengths > old_context / low, periods * factor,
                         mx.where(wavelengths < old_context / high, periods, blended))
        return None, 1.0, freqs
    raise ModelError(f"config.json: rope_scaling type {kind!r} is not supported")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, q_proj, k_proj, v_proj, o_proj, q_norm=None, k_norm=None):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        if q_norm is not None:
            self.q_norm, self.k_norm = q_norm, k_norm
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps, self.traditional = cfg.rms_norm_eps, cfg.rope_traditional
        self.rope_base, self.rope_scale, self._freqs = rope_frequencies(cfg)
        self.fused = q_proj.fast is not None  # q, k and v in one launch (CUDA, large layers)

    def rope(self, x: mx.array, offset: int) -> mx.array:
        return mx.fast.rope(x, self.head_dim, traditional=self.traditional, base=self.rope_base,
                            scale=self.rope_scale, offset=offset, freqs=self._freqs)

    def __call__(self, x: mx.array, caches: list[KVCache], rows: list[int]) -> mx.array:
        """x: (1, T, hidden), the rows of len(caches) sessions one after another (rows[i] of session i)."""
        T = x.shape[1]
        fused = cuda_q4.fused_qkv(x, self.q_proj, self.k_proj, self.v_proj) if self.fused else None
        q, k, v = fused if fused is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.reshape(T, self.n_heads, self.head_dim)       # (T, heads, head_dim)
        k = k.reshape(T, self.n_kv_heads, self.head_dim)    # (T, kv_heads, head_dim)
        v = v.reshape(T, self.n_kv_heads, self.head_dim)
        if "q_norm" in self:
            q = mx.fast.rms_norm(q, self.q_norm, self.eps)
            k = mx.fast.rms_norm(k, self.k_norm, self.eps)
        out, start = [], 0
        for group, n in _attention_groups(caches, rows):
            if len(group) == 1:
                out.append(self.attend(q[start:start + n], k[start:start + n], v[start:start + n], group[0]))
            else:
                out.append(self.attend_one_each(q[start:start + n], k[start:start + n], v[start:start + n], group))
            start += n
        out = out[0] if len(out) == 1 else mx.concatenate(out, axis=0)
        return self.o_proj(out.reshape(1, T, -1))

    def attend(self, q: mx.array, k: mx.array, v: mx.array, cache: KVCache) -> mx.array:
        """One session's L new rows: q (L, heads, head_dim), k, v (L, kv_heads, head_dim) -> (L, heads * head_dim)."""
        L = q.shape[0]
        q, k, v = (t[None].transpose(0, 2, 1, 3) for t in (q, k, v))       # (1, heads, L, head_dim)
        q, k = self.rope(q, cache.offset), self.rope(k, cache.offset)
        k, v = cache.update_and_fetch(k, v)                                # (1, kv_heads, offset + L, head_dim)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5,
                                                   mask="causal" if L > 1 else None)
        return out[0].transpose(1, 0, 2).reshape(L, -1)

    def attend_one_each(self, q: mx.array, k: mx.array, v: mx.array, caches: list[KVCache]) -> mx.array:
        """B sessions' next row each (decode): one attention over their caches gathered side by side, each
        masked to its own length. q (B, heads, head_dim), k, v (B, kv_heads, head_dim) -> (B, heads * head_dim)."""
        B = q.shape[0]
        offsets = mx.array([c.offset for c in caches])
        q, k, v = q[:, :, None, :], k[:, :, None, :], v[:, :, None, :]        # (B, heads, 1, head_dim)
        q, k = self.rope(q, offsets), self.rope(k, offsets)
        for i, cache in enumerate(caches):
            cache.append(k[i:i + 1], v[i:i + 1])
        length = max(c.offset for c in caches)
        for cache in caches:
            cache.reserve(length - cache.offset)
        keys = mx.concatenate([c.keys[..., :length, :] for c in caches], axis=0)  # (B, kv_heads, length, head_dim)
        values = mx.concatenate([c.values[..., :length, :] for c in caches], axis=0)
        mask = mx.arange(length)[None] < (offsets + 1)[:, None]                   # (B, length)
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.head_dim ** -0.5,
                                                   mask=mask[:, None, None, :])
        return out.reshape(B, -1)


def _attention_groups(caches: list[KVCache], rows: list[int]) -> list[tuple[list[KVCache], int]]:
    """(sessions, rows) of each attention: a run of sessions with one row each (decode) attends together,
    a session with more rows (a prompt chunk) alone."""
    groups: list[tuple[list[KVCache], int]] = []
    for cache, n in zip(caches, rows):
        if n == 1 and groups and groups[-1][1] == len(groups[-1][0]):
            groups[-1][0].append(cache)
            groups[-1] = (groups[-1][0], n + groups[-1][1])
        else:
            groups.append(([cache], n))
    return groups


class MLP(nn.Module):
    def __init__(self, gate_proj, up_proj, down_proj):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        # on CUDA, where the layer is large enough to pay for it: gate, up and silu * mul in one kernel
        self.fused = gate_proj.fast is not None and up_proj.fast is not None

    def __call__(self, x: mx.array) -> mx.array:
        h = cuda_q4.fused_swiglu(x, self.gate_proj, self.up_proj) if self.fused else None
        if h is None:
            h = nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, self_attn: Attention, mlp: MLP, input_layernorm, post_attention_layernorm, eps: float):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm, self.post_attention_layernorm, self.eps = input_layernorm, post_attention_layernorm, eps
        self.decode_step = _decode_step(self)

    def __call__(self, x: mx.array, caches: list[KVCache], rows: list[int], positions: mx.array | None = None) -> mx.array:
        """positions: for a decode batch (one row a session), each session's new position, made once a step."""
        if self.decode_step is not None and x.shape[1] == len(caches):
            out = self._fused_decode(x, caches, positions)
            if out is not None:
                return out
        h = x + self.self_attn(mx.fast.rms_norm(x, self.input_layernorm, self.eps), caches, rows)
        return h + self.mlp(mx.fast.rms_norm(h, self.post_attention_layernorm, self.eps))


    def _fused_decode(self, x: mx.array, caches: list[KVCache], positions: mx.array | None) -> mx.array | None:
        """One new row for each of these sessions through the fused step (CUDA), or None where it cannot."""
        if any(c.keys is None or c.offset >= cuda_q4.position_limit() for c in caches):
            return None  # a prompt's first rows, or past what the kernels take: op by op
        for cache in caches:
            cache.reserve(1)
        if len(caches) == 1:
            cache = caches[0]
            out = self.decode_step(x, cache.keys, cache.values, cuda_q4.position(cache.offset), cache.last_write)
        else:
            writes = {id(c.last_write): c.last_write for c in caches if c.last_write is not None}
            if len(writes) > 1:  # sessions last written by different steps: order after all of them
                mx.eval(*writes.values())
                writes = {}
            after = next(iter(writes.values()), None)
            if positions is None:
                positions = cuda_q4.positions([c.offset for c in caches])
            out = self.decode_step.batch(x, [(c.keys, c.values) for c in caches], positions, after)
        if out is not None:
            for cache in caches:
                cache.written_in_place(out)
        return out


def _decode_step(block: Block) -> cuda_q4.DecodeStep | None:
    """The layer's one-token step in five fused launches, on CUDA where its kernels passed their self-check
    and the layer is of the shape they take (4-bit linears, no q/k norm, head_dim 64 or 128)."""
    a, m = block.self_attn, block.mlp
    linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
    if not (all(lin.quantized and lin.bits == 4 for lin in linears) and len({lin.group_size for lin in linears}) == 1
            and "q_norm" not in a and a.head_dim in cuda_q4.HEAD_DIMS and cuda_q4.enabled()):
        return None
    qkv_bias = [lin.bias if "bias" in lin else None for lin in linears[:3]]
    if len({b is None for b in qkv_bias}) > 1 or any("bias" in lin for lin in linears[3:]):
        return None
    parts = [(lin.weight, lin.scales, lin.biases) for lin in linears]
    inv_freq = cuda_q4.rope_inverse_frequencies(a.head_dim, a.rope_base, a.rope_scale, a._freqs)
    return cuda_q4.DecodeStep(block.input_layernorm, block.post_attention_layernorm, block.eps, *parts[:3],
                              None if qkv_bias[0] is None else tuple(qkv_bias), *parts[3:], linears[0].group_size,
                              a.head_dim, inv_freq, a.traditional)


@dataclass(frozen=True)
class StageSpec:
    start: int
    end: int
    first: bool
    last: bool


class Stage(nn.Module):
    """Embedding (first stage) + layers [start, end) + final norm and head (last stage)."""

    def __init__(self, cfg: ModelConfig, spec: StageSpec, layers: list[Block], dtype: mx.Dtype,
                 embed_tokens: Linear | None = None, norm: mx.array | None = None, lm_head: Linear | None = None):
        super().__init__()
        self.cfg, self.spec, self.dtype = cfg, spec, dtype
        self.layers = layers
        if embed_tokens is not None:
            self.embed_tokens = embed_tokens
        if norm is not None:
            self.norm, self.lm_head = norm, lm_head
        self.cpu = None  # kernels.cpu_block.StageRunner: the same forward on the CPU kernels, where they run

    def make_cache(self) -> list:
        return self.cpu.make_cache() if self.cpu is not None else [KVCache() for _ in self.layers]

    def __call__(self, x: mx.array, cache: list[KVCache], all_logits: bool = False) -> mx.array:
        """One session: x token ids (1, L) on the first stage, else hidden states (1, L, hidden).

        Returns logits (1, L or 1, vocab) on the last stage (the last position only unless all_logits),
        else hidden states (1, L, hidden) for the next stage.
        """
        L = x.shape[1]
        out = self.forward(x[0], [cache], [L], all_logits)
        return out[None] if self.spec.last else out

    def forward_numpy(self, x: np.ndarray, caches: list, rows: list[int], all_logits: bool = False) -> np.ndarray:
        """forward on the CPU kernels (self.cpu set), numpy in and out: hidden states (T, hidden), not (1, T, hidden)."""
        return self.cpu.forward(x, caches, rows, all_logits)

    def forward(self, x: mx.array, caches: list[list[KVCache]], rows: list[int], all_logits: bool = False) -> mx.array:
        """A batch: the rows of several sessions packed one after another, session i's rows[i] rows at its
        cache's position. x: token ids (T,) on the first stage, else hidden states (T, hidden).

        Returns logits (sessions, vocab) for each session's last row on the last stage ((T, vocab) with
        all_logits), else hidden states (1, T, hidden) for the next stage.
        """
        if self.cpu is not None:
            out = mx.array(self.forward_numpy(np.asarray(x), caches, rows, all_logits))
            return out if self.spec.last else out[None]
        h = self.embed_tokens.rows(x[None]) if self.spec.first else x.reshape(1, -1, self.cfg.hidden_size).astype(self.dtype)
        # a decode batch on the fused CUDA step: the sessions' positions once for every layer (host time a step)
        positions = None
        if len(caches) > 1 and len(rows) == x.shape[0] and self.layers and self.layers[0].decode_step is not None:
            positions = cuda_q4.positions([c[0].offset for c in caches])
        for i, layer in enumerate(self.layers):
            h = layer(h, [c[i] for c in caches], rows, positions)
        if not self.spec.last:
            return h
        if not all_logits:
            ends = list(accumulate(rows))
            h = h[:, -1:] if len(rows) == 1 else h[:, mx.array([e - 1 for e in ends])]
        return self.lm_head(mx.fast.rms_norm(h, self.norm, self.cfg.rms_norm_eps))[0]


class _Reader:
    """Builds modules from the named tensors of a checkpoint, checking each one's shape."""

    def __init__(self, cfg: ModelConfig, tensors: dict[str, TensorInfo], dtype: mx.Dtype, folder: Path):
        self.cfg, self.tensors, self.dtype, self.folder = cfg, tensors, dtype, folder

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise ModelError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        return self.tensors[name]

    def array(self, name: str, shape: tuple[int, ...], cast: bool = True) -> mx.array:
        info = self.info(name)
        if info.shape != shape:
            raise ModelError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, expected {list(shape)}")
        a = read_tensor(info)
        return a.astype(self.dtype) if cast else a

    def linear(self, path: str, out_dim: int, in_dim: int, bias: bool = False) -> Linear:
        b = self.array(f"{path}.bias", (out_dim,)) if bias else None
        if f"{path}.scales" not in self.tensors:
            if self.info(f"{path}.weight").dtype == "U32":  # packed q-bit weights without their scales
                self.info(f"{path}.scales")
            return Linear(self.array(f"{path}.weight", (out_dim, in_dim)), b)
        if not self.cfg.quantization:
            raise ModelError(f"{self.info(path + '.scales').file}: {path} is quantized but config.json has no quantization block")
        group_size, bits = self.cfg.quant_params(path)
        if in_dim % group_size or (in_dim * bits) % 32:
            raise ModelError(f"{self.info(path + '.weight').file}: {path} has {in_dim} inputs, not a multiple of group size {group_size}")
        weight = self.array(f"{path}.weight", (out_dim, in_dim * bits // 32), cast=False)
        groups = (out_dim, in_dim // group_size)
        return Linear(weight, b, scales=self.array(f"{path}.scales", groups), biases=self.array(f"{path}.biases", groups),
                      group_size=group_size, bits=bits)

    def block(self, i: int) -> Block:
        cfg, p = self.cfg, f"model.layers.{i}"
        hidden, q_dim, kv_dim = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        norms = (self.array(f"{p}.self_attn.q_norm.weight", (cfg.head_dim,)),
                 self.array(f"{p}.self_attn.k_norm.weight", (cfg.head_dim,))) if cfg.qk_norm else ()
        attn = Attention(cfg,
                         self.linear(f"{p}.self_attn.q_proj", q_dim, hidden, cfg.qkv_bias),
                         self.linear(f"{p}.self_attn.k_proj", kv_dim, hidden, cfg.qkv_bias),
                         self.linear(f"{p}.self_attn.v_proj", kv_dim, hidden, cfg.qkv_bias),
                         self.linear(f"{p}.self_attn.o_proj", hidden, q_dim, cfg.attention_bias), *norms)
        mlp = MLP(self.linear(f"{p}.mlp.gate_proj", cfg.intermediate_size, hidden, cfg.mlp_bias),
                  self.linear(f"{p}.mlp.up_proj", cfg.intermediate_size, hidden, cfg.mlp_bias),
                  self.linear(f"{p}.mlp.down_proj", hidden, cfg.intermediate_size, cfg.mlp_bias))
        block = Block(attn, mlp, self.array(f"{p}.input_layernorm.weight", (hidden,)),
                      self.array(f"{p}.post_attention_layernorm.weight", (hidden,)), cfg.rms_norm_eps)
        mx.eval(block.parameters())
        return block


def shard_extent(model_dir: Path, cfg: ModelConfig) -> StageSpec:
    """The part of the model a folder holds: all of it, or what its shard.json says."""
    marker = model_dir / "shard.json"
    if not marker.exists():
        return StageSpec(0, cfg.num_hidden_layers, True, True)
    try:
        s = json.loads(marker.read_text())
        return StageSpec(int(s["start"]), int(s["end"]), bool(s["first"]), bool(s["last"]))
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{marker}: not a valid shard description ({e})") from None


def load_stage(model_dir: str | Path, start: int | None = None, end: int | None = None, first: bool | None = None,
               last: bool | None = None, dtype: mx.Dtype | None = None) -> Stage:
    """Load layers [start, end) of the checkpoint in model_dir (default: all it holds), reading only those tensors.

    first/last default to whether the stage begins at layer 0 / ends at the last layer. dtype defaults to the
    backend's compute dtype for this checkpoint (kernels.linear.compute_dtype).
    """
    folder = Path(model_dir)
    cfg = ModelConfig.load(folder)
    held = shard_extent(folder, cfg)
    start = held.start if start is None else start
    end = held.end if end is None else end
    first = (start == 0) if first is None else first
    last = (end == cfg.num_hidden_layers) if last is None else last
    if not (held.start <= start <= end <= held.end) or (first and not held.first) or (last and not held.last):
        raise ModelError(f"{folder}: holds layers [{held.start}, {held.end}) (first={held.first}, last={held.last}); "
                         f"asked for [{start}, {end}) (first={first}, last={last})")
    tensors = tensor_index(folder)
    dtype = dtype or compute_dtype(stored_float_dtype(tensors))
    reader = _Reader(cfg, tensors, dtype, folder)
    layers = [reader.block(i) for i in range(start, end)]
    tied = cfg.tie_word_embeddings if cfg.tie_word_embeddings is not None else "lm_head.weight" not in tensors
    embed = norm = head = None
    if first or (last and tied):
        embed = reader.linear("model.embed_tokens", cfg.vocab_size, cfg.hidden_size)
    if last:
        norm = reader.array("model.norm.weight", (cfg.hidden_size,))
        head = embed if tied else reader.linear("lm_head", cfg.vocab_size, cfg.hidden_size)
    stage = Stage(cfg, StageSpec(start, end, first, last), layers, dtype,
                  embed_tokens=embed if first else None, norm=norm, lm_head=head)
    mx.eval(stage.parameters())
    params = [v for _, v in tree_flatten(stage.parameters())]
    if backend() == "cuda":
        # MLX's CUDA memory is managed: pages stay with the host until the GPU first touches them. A
        # decode step reads every weight but only one row of the embedding, so without this each new
        # token's row faults in on its own (about 280 us a token on the H100 for a 7B's embedding).
        mx.eval([mx.max(v) for v in params])
    stage.nbytes = sum(v.nbytes for v in params)  # memory the stage holds
    if backend() == "cpu" and all(lin.cpu is not None for lin in _linears(stage)):
        # every linear runs on the CPU kernels: so does the rest of the forward (the ops around the linears
        # cost more than the linears themselves on MLX's CPU back-end)
        from kernels.cpu_block import StageRunner
        stage.cpu = StageRunner(stage)
    return stage


def _linears(stage: Stage) -> list[Linear]:
    out = [lin for block in stage.layers for lin in (block.self_attn.q_proj, block.self_attn.k_proj,
                                                     block.self_attn.v_proj, block.self_attn.o_proj,
                                                     block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj)]
    return out + ([stage.lm_head] if stage.spec.last else [])
