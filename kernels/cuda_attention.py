"""Attention of one new position per session, fused with RoPE and with the cache write: `attend_sessions`
for B sessions (1-16), each over its own KV cache of its own length, any length (flash-decoding); and
`attend`, the older kernel for one session up to MAX_POSITIONS, kept as the fallback.

Both apply RoPE (angle pos * inv_freq[i]) to q and the new k, rounded to the dtype as mx.fast.rope returns
them, take softmax(q . k_t / sqrt(D)) v_t over t in [0, pos] (the cache for t < pos, the new k, v for
t = pos), and write the new roped k and v into the cache at pos, in place: the caches are inputs that MLX
does not know to change, so nothing may read them at pos or beyond within the same graph except these
kernels; `after` (an array the kernel waits for, unread) orders them after the step that wrote the
previous position (see KVCache in swarm.model.decoder).
"""

from __future__ import annotations

import math

import mlx.core as mx

from kernels.cuda_common import COMMON, DTYPES, Recipe, cached, header, launch, shapes_of

HEAD_DIMS = (64, 128)
MAX_POSITIONS = 8192   # positions the single-session kernel holds scores for (32 KB of shared memory)
SESSIONS = 16          # cache slots of the batched kernel: sessions per launch
MAX_GROUP = 8          # query heads per KV head the batched kernel takes
THREADS = 128

FLASH = r"""
constexpr int FLASH_THREADS = 128, FLASH_TILE = 128, FLASH_MIN_SPAN = 32;

// Block (split j, kv head g, session b) of a flash-decoding attention: the QH query heads of group g over
// the positions [j * span, (j + 1) * span) of [0, pos], span = max(32, ceil((pos + 1) / S)), in tiles of 128
// with a running max and sum; its unnormalized output and (max, sum) go to part/stats, and the last of the
// group's splits to finish (a counter, reset after use) combines them into out. The cache of session b is
// kc/vc (KV, cap, D); split 0 writes the new roped k and v at pos. The scores are float32 throughout.
template <typename T, int D, int QH, bool TRAD>
__device__ void attend_split(const T* q, const T* k, const T* v, T* kc, T* vc, int cap, const int* positions,
                             const float* inv_freq, T* out, float* part, float* stats, int* counters) {
  constexpr int DQ = D / 8, PL = FLASH_THREADS / DQ;
  __shared__ __align__(16) float qs[QH][D];
  __shared__ __align__(16) float kn[D], vn[D];
  __shared__ float sc[QH][FLASH_TILE];
  __shared__ float run_max[QH], run_sum[QH], corr[QH];
  __shared__ __align__(16) float red[4][QH][D];
  __shared__ int last;
  const int split = blockIdx.x, g = blockIdx.y, b = blockIdx.z, S = gridDim.x, KV = gridDim.y, H = KV * QH;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int pos = positions[b], len = pos + 1;
  const int span = max(FLASH_MIN_SPAN, (len + S - 1) / S), used = (len + span - 1) / span;
  const int lo = split * span, hi = min(len, lo + span);
  if (lo >= hi) return;  // the whole block: an unused split
  const T* kh = k + ((size_t)b * KV + g) * D;
  const T* vh = v + ((size_t)b * KV + g) * D;
  for (int i = tid; i < D / 2; i += FLASH_THREADS) {
    const int a = TRAD ? 2 * i : i, c = TRAD ? 2 * i + 1 : i + D / 2;
    float sn, cs;
    sincosf(pos * inv_freq[i], &sn, &cs);
#pragma unroll
    for (int h = 0; h < QH; ++h) rope_pair(q + ((size_t)b * H + g * QH + h) * D, qs[h], a, c, cs, sn);
    rope_pair(kh, kn, a, c, cs, sn);
  }
  for (int i = tid; i < D; i += FLASH_THREADS) vn[i] = tof(vh[i]);
  if (tid < QH) {
    run_max[tid] = -__int_as_float(0x7f800000);
    run_sum[tid] = 0.0f;
  }
  __syncthreads();
  T* kg = kc + (size_t)g * cap * D;
  T* vg = vc + (size_t)g * cap * D;
  if (split == 0)
    for (int i = tid; i < D; i += FLASH_THREADS) {
      kg[(size_t)pos * D + i] = rnd<T>(kn[i]);
      vg[(size_t)pos * D + i] = vh[i];
    }
  const float scale = rsqrtf((float)D);
  const int dq = tid % DQ, pl = tid / DQ;
  float acc[QH][8];
#pragma unroll
  for (int h = 0; h < QH; ++h)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[h][j] = 0.0f;
  for (int t0 = lo; t0 < hi; t0 += FLASH_TILE) {
    const int n = min(FLASH_TILE, hi - t0);
    // scores: thread i takes position t0 + i, its key row read in 16-byte pieces, eight in flight
    float s[QH];
#pragma unroll
    for (int h = 0; h < QH; ++h) s[h] = 0.0f;
    if (tid < n) {
      const int t = t0 + tid;
      const uint4* row = reinterpret_cast<const uint4*>(kg + (size_t)t * D);
#pragma unroll
      for (int c0 = 0; c0 < D / 8; c0 += 8) {
        uint4 u[8];
#pragma unroll
        for (int c = 0; c < 8; ++c) u[c] = t == pos ? uint4{0u, 0u, 0u, 0u} : __ldg(row + c0 + c);
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          const T* e = reinterpret_cast<const T*>(&u[c]);
          float kf[8];
#pragma unroll
          for (int j = 0; j < 8; ++j) kf[j] = t == pos ? kn[(c0 + c) * 8 + j] : tof(e[j]);
#pragma unroll
          for (int h = 0; h < QH; ++h) {
            const float4 qa = *reinterpret_cast<const float4*>(&qs[h][(c0 + c) * 8]);
            const float4 qb = *reinterpret_cast<const float4*>(&qs[h][(c0 + c) * 8 + 4]);
            s[h] = fmaf(qa.x, kf[0], fmaf(qa.y, kf[1], fmaf(qa.z, kf[2], fmaf(qa.w, kf[3], s[h]))));
            s[h] = fmaf(qb.x, kf[4], fmaf(qb.y, kf[5], fmaf(qb.z, kf[6], fmaf(qb.w, kf[7], s[h]))));
          }
        }
      }
    }
#pragma unroll
    for (int h = 0; h < QH; ++h) sc[h][tid] = tid < n ? s[h] * scale : -__int_as_float(0x7f800000);
    __syncthreads();
    for (int h = warp; h < QH; h += 4) {  // the running max and sum of head h; the tile's probabilities
      float m = -__int_as_float(0x7f800000);
      for (int i = lane; i < FLASH_TILE; i += 32) m = fmaxf(m, sc[h][i]);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      const float top = fmaxf(run_max[h], m), cr = expf(run_max[h] - top);
      float sum = 0.0f;
      for (int i = lane; i < FLASH_TILE; i += 32) {
        const float e = expf(sc[h][i] - top);
        sc[h][i] = e;
        sum += e;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      __syncwarp();
      if (lane == 0) {
        run_sum[h] = run_sum[h] * cr + sum;
        run_max[h] = top;
        corr[h] = cr;
      }
    }
    __syncthreads();
    // p . v: thread (pl, dq) takes values [8 dq, 8 dq + 8) of positions pl, pl + PL, ... of the tile
#pragma unroll
    for (int h = 0; h < QH; ++h)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[h][j] *= corr[h];
#pragma unroll 4
    for (int i = pl; i < n; i += PL) {
      const int t = t0 + i;
      float vf[8];
      if (t == pos) {
#pragma unroll
        for (int j = 0; j < 8; ++j) vf[j] = vn[dq * 8 + j];
      } else {
        const uint4 u = __ldg(reinterpret_cast<const uint4*>(vg + (size_t)t * D) + dq);
        const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int j = 0; j < 8; ++j) vf[j] = tof(e[j]);
      }
#pragma unroll
      for (int h = 0; h < QH; ++h) {
        const float p = sc[h][i];
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[h][j] = fmaf(p, vf[j], acc[h][j]);
      }
    }
    __syncthreads();  // sc is the next tile's
  }
  // sum over the PL position lanes: within a warp by shuffles, then over the 4 warps in shared memory
#pragma unroll
  for (int h = 0; h < QH; ++h)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float x = acc[h][j];
#pragma unroll
      for (int o = DQ; o < 32; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
      if (lane < DQ) red[warp][h][dq * 8 + j] = x;
    }
  __syncthreads();
  const size_t head0 = (size_t)b * H + g * QH;
  if (used == 1) {  // one split: the block's result is the output
    for (int i = tid; i < QH * D; i += FLASH_THREADS) {
      const int h = i / D, d = i % D;
      out[(head0 + h) * D + d] = rnd<T>((red[0][h][d] + red[1][h][d] + red[2][h][d] + red[3][h][d]) / run_sum[h]);
    }
    return;
  }
  for (int i = tid; i < QH * D; i += FLASH_THREADS) {
    const int h = i / D, d = i % D;
    part[((head0 + h) * S + split) * D + d] = red[0][h][d] + red[1][h][d] + red[2][h][d] + red[3][h][d];
  }
  if (tid < QH) {
    stats[((head0 + tid) * S + split) * 2] = run_max[tid];
    stats[((head0 + tid) * S + split) * 2 + 1] = run_sum[tid];
  }
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    last = atomicAdd(&counters[b * KV + g], 1) == used - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  float* weight = &red[0][0][0];  // [QH][S]: e^(m_j - M) / L of each split
  if (tid < QH) {
    const float* st = stats + (head0 + tid) * S * 2;
    float top = -__int_as_float(0x7f800000), total = 0.0f;
    for (int j = 0; j < used; ++j) top = fmaxf(top, __ldcg(st + 2 * j));
    for (int j = 0; j < used; ++j) total += __ldcg(st + 2 * j + 1) * expf(__ldcg(st + 2 * j) - top);
    for (int j = 0; j < used; ++j) weight[tid * S + j] = expf(__ldcg(st + 2 * j) - top) / total;
  }
  __syncthreads();
  for (int i = tid; i < QH * D; i += FLASH_THREADS) {
    const int h = i / D, d = i % D;
    float o = 0.0f;
    for (int j = 0; j < used; ++j) o = fmaf(weight[h * S + j], __ldcg(part + ((head0 + h) * S + j) * D + d), o);
    out[(head0 + h) * D + d] = rnd<T>(o);
  }
  if (tid == 0) counters[b * KV + g] = 0;
}
"""

SERIAL = r"""
// Block-wide sum (ADD) or max of one value per thread; every thread gets the result. buf: 32 floats.
template <bool ADD>
__device__ __forceinline__ float block_reduce(float v, float* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float u = __shfl_xor_sync(0xffffffffu, v, o);
    v = ADD ? v + u : fmaxf(v, u);
  }
  __syncthreads();  // buf may still be read by a previous call
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  v = ADD ? 0.0f : -__int_as_float(0x7f800000);
  for (int i = 0; i < warps; ++i) v = ADD ? v + buf[i] : fmaxf(v, buf[i]);
  return v;
}

// One session, position pos_p[0], query head blockIdx.x, batch row blockIdx.y; the cache (B, KV, cap, D).
// One block per head, serial over positions, scores for up to MAXP positions in shared memory.
template <typename T, int D, int MAXP, bool TRAD>
__device__ void attend(const T* q, const T* k, const T* v, T* kc, T* vc, const int* pos_p,
                       const float* inv_freq, T* out, int H, int KV, int cap) {
  __shared__ float qs[D], kn[D], vn[D], p[MAXP], buf[32];
  const int h = blockIdx.x, b = blockIdx.y, g = h / (H / KV), tid = threadIdx.x, nt = blockDim.x;
  const int pos = pos_p[0];
  const T* qh = q + ((size_t)b * H + h) * D;
  const T* kh = k + ((size_t)b * KV + g) * D;
  const T* vh = v + ((size_t)b * KV + g) * D;
  for (int i = tid; i < D / 2; i += nt) {
    const int a = TRAD ? 2 * i : i, c = TRAD ? 2 * i + 1 : i + D / 2;
    float sn, cs;
    sincosf(pos * inv_freq[i], &sn, &cs);
    rope_pair(qh, qs, a, c, cs, sn);
    rope_pair(kh, kn, a, c, cs, sn);
  }
  for (int i = tid; i < D; i += nt) vn[i] = tof(vh[i]);
  __syncthreads();
  if (h % (H / KV) == 0) {  // one block of the group writes the new position; all read only t < pos
    for (int i = tid; i < D; i += nt) {
      kc[(((size_t)b * KV + g) * cap + pos) * D + i] = rnd<T>(kn[i]);
      vc[(((size_t)b * KV + g) * cap + pos) * D + i] = vh[i];
    }
  }
  const float scale = rsqrtf((float)D);
  const T* kg = kc + ((size_t)b * KV + g) * cap * D;
  float top = -__int_as_float(0x7f800000);
  for (int t = tid; t <= pos; t += nt) {
    float s = 0.0f;
    if (t == pos) {
#pragma unroll
      for (int i = 0; i < D; ++i) s = fmaf(qs[i], kn[i], s);
    } else {
      const uint4* row = reinterpret_cast<const uint4*>(kg + (size_t)t * D);
#pragma unroll
      for (int c = 0; c < D / 8; ++c) {
        const uint4 u = row[c];
        const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int j = 0; j < 8; ++j) s = fmaf(qs[c * 8 + j], tof(e[j]), s);
      }
    }
    s *= scale;
    p[t] = s;
    top = fmaxf(top, s);
  }
  top = block_reduce<false>(top, buf);
  float sum = 0.0f;
  for (int t = tid; t <= pos; t += nt) {
    const float e = expf(p[t] - top);
    p[t] = e;
    sum += e;
  }
  sum = block_reduce<true>(sum, buf);  // its barriers also publish p
  const T* vg = vc + ((size_t)b * KV + g) * cap * D;
  for (int i = tid; i < D; i += nt) {
    float acc = p[pos] * vn[i];
#pragma unroll 8
    for (int t = 0; t < pos; ++t) acc = fmaf(p[t], tof(vg[(size_t)t * D + i]), acc);
    out[((size_t)b * H + h) * D + i] = rnd<T>(acc / sum);
  }
}
"""

FLASH_CODE = header(COMMON, FLASH)
SERIAL_CODE = header(COMMON, SERIAL)


def _slot_select(name: str, what: str, slots: int) -> str:
    """`sb == 0 ? name0<what> : sb == 1 ? ... : name<slots-1><what>`: a session's array by value, not by indexing."""
    return "".join(f"sb == {i} ? {name}{i}{what} : " for i in range(slots - 1)) + f"{name}{slots - 1}{what}"


def flash_spec(slots: int) -> tuple:
    """(inputs, outputs, body) of the batched kernel with `slots` cache slots: a power of two, since MLX's host
    time per launch grows with the inputs (36 inputs: about 25 us a launch on the H100)."""
    return (["q", "k", "v", *(f"{n}{i}" for i in range(slots) for n in ("kc", "vc")), "positions", "inv_freq",
             "after", "counters"],
            ["out", "part", "stats"],
            "  const int sb = blockIdx.z;\n"
            f"  const T* kcs = {_slot_select('kc', '', slots)};\n"
            f"  const T* vcs = {_slot_select('vc', '', slots)};\n"
            f"  const int cap = {_slot_select('kc', '_shape[2]', slots)};\n"
            "  q4::attend_split<T, D, QH, TRAD>(q, k, v, const_cast<T*>(kcs), const_cast<T*>(vcs), cap, positions, "
            "inv_freq, out, part, stats, const_cast<int*>(counters));")


def slots_for(sessions: int) -> int:
    return 1 << (sessions - 1).bit_length()

SERIAL_SPEC = (["q", "k", "v", "kc", "vc", "pos", "inv_freq", "after"], ["out"],
               ("  q4::attend<T, D, MAXP, TRAD>(q, k, v, const_cast<T*>(kc), const_cast<T*>(vc), pos, inv_freq, "
                "out, q_shape[2] / D, k_shape[2] / D, kc_shape[2]);"))


def splits(sessions: int, kv_heads: int) -> int:
    """Position splits per (session, KV head): about 1024 blocks in all, at most 128 (each split takes 32
    positions or more, so short caches use a few and the other blocks leave at once)."""
    return max(1, min(128, 1024 // (sessions * kv_heads)))


def sessions_plan(q: mx.array, k: mx.array, v: mx.array, cache: tuple, sessions: int, head_dim: int,
                  traditional: bool = False) -> tuple | None:
    """The launch plan of attend_sessions for these shapes (cache: one session's (keys, values), for the
    dtype and heads every session shares), or None."""
    D, rows = head_dim, math.prod(q.shape[:-1])

    def make():
        keys, values = cache
        H, KV = q.shape[-1] // D, k.shape[-1] // D
        ok = (q.dtype in DTYPES and D in HEAD_DIMS and rows == sessions and 1 <= sessions <= SESSIONS
              and q.shape[:-1] == k.shape[:-1] == v.shape[:-1] and k.shape[-1] == v.shape[-1]
              and q.shape[-1] == H * D and k.shape[-1] == KV * D and KV and H % KV == 0 and H // KV <= MAX_GROUP
              and keys.ndim == 4 and keys.shape[0] == 1 and keys.shape[1] == KV and keys.shape[3] == D
              and values.shape == keys.shape and {k.dtype, v.dtype, keys.dtype, values.dtype} == {q.dtype})
        if not ok:
            return None
        s = splits(sessions, KV)
        slots = slots_for(sessions)
        template = (("T", q.dtype), ("D", D), ("QH", H // KV), ("TRAD", bool(traditional)), ("SLOTS", slots))
        return (Recipe("attend_sessions", flash_spec(slots), FLASH_CODE, template), (s * THREADS, KV, sessions), (THREADS, 1, 1),
                [q.shape, (sessions, H, s, D), (sessions, H, s, 2)], [q.dtype, mx.float32, mx.float32])
    return cached(("attend_sessions", q.shape, k.shape, v.shape, q.dtype, cache[0].shape[:2] + cache[0].shape[3:],
                   cache[0].dtype, cache[1].dtype, sessions, D, traditional), make)


_counters: mx.array | None = None


def counters() -> mx.array:
    """A zeroed int32 counter per (session, KV head) for attend_sessions' last-block reduction; the kernel
    resets what it used, so one array serves every launch that runs after the previous one finished."""
    c = mx.zeros((SESSIONS * 256,), mx.int32)
    mx.eval(c)
    return c


def session_inputs(q, k, v, caches: list, positions, inv_freq, after, counts) -> list:
    """attend_sessions' inputs: the first session's arrays fill the unused cache slots (never read)."""
    slots = [a for kv in caches for a in kv] + [a for _ in range(slots_for(len(caches)) - len(caches))
                                               for a in caches[0]]
    return [q, k, v, *slots, positions, inv_freq, caches[0][0] if after is None else after, counts]


def attend_sessions(q: mx.array, k: mx.array, v: mx.array, caches: list[tuple], positions: mx.array,
                    inv_freq: mx.array, head_dim: int, traditional: bool = False, after: mx.array | None = None, *,
                    init_value: float | None = None) -> mx.array | None:
    """One new position for each of B sessions: q (..., H*D) with B rows (session b's in row b), k and v
    (..., KV*D); caches[b] = (keys, values), each (1, KV, capacity_b, D) row-contiguous; positions (B,)
    int32, session b's new position, below capacity_b (the caller's to keep). Returns out (q's shape), or
    None if not applicable. Writes each session's new roped k and v into its cache at its position."""
    global _counters
    if positions.shape != (len(caches),) or positions.dtype != mx.int32 or inv_freq.shape != (head_dim // 2,):
        return None
    plan = sessions_plan(q, k, v, caches[0], len(caches), head_dim, traditional)
    if plan is None or any(kc.shape[:2] + kc.shape[3:] != caches[0][0].shape[:2] + caches[0][0].shape[3:]
                           or vc.shape != kc.shape or kc.dtype != q.dtype or vc.dtype != q.dtype for kc, vc in caches):
        return None
    if _counters is None:
        _counters = counters()
    inputs = session_inputs(q, k, v, caches, positions, inv_freq, after, _counters)
    return launch(plan, inputs, q.dtype, init_value)[0]


def attend_plan(q: mx.array, k: mx.array, v: mx.array, keys: mx.array, values: mx.array, position: mx.array,
                inv_freq: mx.array, head_dim: int, traditional: bool = False) -> tuple | None:
    """The launch plan of the single-session kernel (any cache capacity), or None."""
    B, D = q.shape[0], head_dim

    def make():
        H, KV = q.shape[-1] // D, k.shape[-1] // D
        ok = (q.dtype in DTYPES and D in HEAD_DIMS and q.ndim == 3 and q.shape[1] == 1 and k.shape == v.shape
              and k.shape[:2] == (B, 1) and q.shape[-1] == H * D and k.shape[-1] == KV * D and KV and H % KV == 0
              and keys.ndim == 4 and keys.shape[:2] == (B, KV) and keys.shape[3] == D
              and values.shape[:2] + values.shape[3:] == keys.shape[:2] + keys.shape[3:]
              and {k.dtype, v.dtype, keys.dtype, values.dtype} == {q.dtype}
              and shapes_of(position, inv_freq) == (((1,), mx.int32), ((D // 2,), mx.float32)))
        template = (("T", q.dtype), ("D", D), ("MAXP", MAX_POSITIONS), ("TRAD", bool(traditional)))
        return (Recipe("attend", SERIAL_SPEC, SERIAL_CODE, template), (H * 128, B, 1), (128, 1, 1), [q.shape]) if ok else None
    return cached(("attend", q.shape, k.shape, v.shape, keys.shape[:2] + keys.shape[3:],
                   values.shape[:2] + values.shape[3:], q.dtype, keys.dtype, values.dtype, D, traditional,
                   shapes_of(position, inv_freq)), make)


def attend(q: mx.array, k: mx.array, v: mx.array, keys: mx.array, values: mx.array, position: mx.array,
           inv_freq: mx.array, head_dim: int, traditional: bool = False, after: mx.array | None = None, *,
           init_value: float | None = None) -> mx.array | None:
    """The single-session kernel: q (B, 1, H*D), k (B, 1, KV*D), `position` (int32 array of shape (1,)), the
    cache (keys, values: (B, KV, capacity, D)). The caller keeps position < MAX_POSITIONS and < capacity."""
    plan = attend_plan(q, k, v, keys, values, position, inv_freq, head_dim, traditional)
    if plan is None:
        return None
    inputs = [q, k, v, keys, values, position, inv_freq, keys if after is None else after]
    return launch(plan, inputs, q.dtype, init_value)[0]


def rope_inverse_frequencies(head_dim: int, base: float | None, scale: float, freqs: mx.array | None) -> mx.array:
    """scale * theta_i for the pairs i < head_dim / 2 of mx.fast.rope(dims=head_dim, base, scale, freqs), float32."""
    if freqs is not None:
        return (scale / freqs.astype(mx.float32)).astype(mx.float32)
    exponents = mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim
    return (scale * mx.exp(-exponents * math.log(base))).astype(mx.float32)
