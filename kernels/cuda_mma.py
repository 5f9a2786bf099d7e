"""The tensor-core q4 kernel: the products of 1-16 activation rows with 4-bit matrices (matvec, with an
RMS-norm folded into its input or a residual added to its output; SwiGLU's gate and up; q, k and v in one
launch), at the memory's speed for every row count, where one FMA per weight and row would not be.

A warp owns RT tiles of 16 weight rows and a share of K (the 128-wide stages split, split + nsplit, ...).
Its weights go from memory to shared memory by cp.async, four stages in flight, and from there to registers
by ldmatrix, which hands lane (g, c) the 32-bit word c (eight 4-bit values) of rows g and g + 8 of a 32-wide
block: the A fragment of m16n8k16 for two k16 steps. A nibble pair (q_j, q_j+4) becomes two exact half
values in one AND-OR (the nibbles under the exponent of 1024 or 128) and one FMA that takes the 1024 or
128 away, and the mma multiplies them by the activation pairs (x_j, x_j+4) of lane c's eight values, in
float32 accumulators. A group's partial sums get their scale and bias in float32 once per group:
y = sum_groups scale * sum(q * x) + bias * sum(x), so the only rounding is the activations' own (with an
RMS-norm, x * nw is split into a half part and a half remainder, two columns of the same mma, so that it
too is exact to float32).

Activation columns: col < M is row col of x (NT = ceil(M / 8) column tiles); with the norm, col in [M, 2M)
holds the remainders (NT = ceil(2M / 8)). Blocks are (32, nsplit, rowsets) threads: warp (split, rowset);
the split warps' fragments are summed in shared memory and the block's epilogue writes the outputs.
"""

from __future__ import annotations

from kernels.cuda_common import COMMON, Recipe, float_bits, header, layers_fit

MAX_ROWS = 16
STAGE_K = 128
STAGES = 4
# A block's shared memory: its warps' pipelines (8 warps x 4 stages x 1 KB of weights, whatever RT), then
# reused for the split warps' fragments and their sum (at most 2 x 16 KB) and the columns' sums of x^2.
SHARED_MEMORY = 32 * 1024 + 9 * 32 * 4
TARGET_WARPS = 4096   # warps a launch aims for: about 32 per multiprocessor of an H100/H200, all in one wave

MMA = r"""
constexpr int MMA_STAGES = 4;  // 128-wide K stages in flight per warp

__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)) : "memory");
}

// d += A . B (m16n8k16, float32 accumulators); the null pointer's type picks the element type.
__device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                    uint32_t b0, uint32_t b1, const __half*) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                    uint32_t b0, uint32_t b1, const __nv_bfloat16*) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c, const __half*) {
  uint32_t d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
__device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c, const __nv_bfloat16*) {
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// p[j] = (q_j, q_j+4), exact, from a word of eight 4-bit values. f16: a nibble under the exponent of 1024
// reads 1024 + q (bits 0-3) or 1024 + 16 q (bits 4-7); bf16 has room for bits 0-3 only (128 + q).
__device__ __forceinline__ void nibble_pairs(uint32_t w, uint32_t (&p)[4], const __half* t) {
  const uint32_t lo = 0x000F000Fu, hi = 0x00F000F0u, magic = 0x64006400u, w8 = w >> 8;
  p[0] = fma2((w & lo) | magic, 0x3C003C00u, 0xE400E400u, t);   // * 1 - 1024
  p[1] = fma2((w & hi) | magic, 0x2C002C00u, 0xD400D400u, t);   // / 16 - 64
  p[2] = fma2((w8 & lo) | magic, 0x3C003C00u, 0xE400E400u, t);
  p[3] = fma2((w8 & hi) | magic, 0x2C002C00u, 0xD400D400u, t);
}
__device__ __forceinline__ void nibble_pairs(uint32_t w, uint32_t (&p)[4], const __nv_bfloat16* t) {
#pragma unroll
  for (int j = 0; j < 4; ++j) p[j] = fma2(((w >> (4 * j)) & 0x000F000Fu) | 0x43004300u, 0x3F803F80u, 0xC300C300u, t);
}

// Factor on x * nw before it is rounded to T: float16's range, 65504, would not hold every activation times
// its norm weight (2^-8 moves the limit to 1.7e7; the group's scale takes it back).
__device__ __forceinline__ constexpr float norm_prescale(const __half*) { return 0x1p-8f; }
__device__ __forceinline__ constexpr float norm_prescale(const __nv_bfloat16*) { return 1.0f; }

// Two floats as the halves of one register (lo in the low half), rounded to nearest; and back.
__device__ __forceinline__ uint32_t pack2(float lo, float hi, const __half*) {
  uint32_t d;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, const __nv_bfloat16*) {
  uint32_t d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}
__device__ __forceinline__ float half_value(uint32_t bits, const __half*) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits & 0xFFFFu)));
}
__device__ __forceinline__ float half_value(uint32_t bits, const __nv_bfloat16*) {
  return __uint_as_float(bits << 16);
}

// The scales (or biases) of one row's groups in a 128-wide stage: four, two or one 16-bit values.
__device__ __forceinline__ unsigned long long stage_groups(const void* p, int gs) {
  if (gs == 32) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    return v.x | (static_cast<unsigned long long>(v.y) << 32);
  }
  if (gs == 64) return __ldg(reinterpret_cast<const unsigned int*>(p));
  return __ldg(reinterpret_cast<const unsigned short*>(p));
}

// B fragments of one 32-wide block for this lane's column: the pairs (x_j, x_j+4) of its eight values u
// (or of x * nw, rounded, or of the remainder when `rest`); xs += their sum (the bias's factor; a remainder
// column adds nothing, its high column has the whole), sq += the sum of x^2.
template <typename T, bool NORM>
__device__ __forceinline__ void column_pairs(const uint4& u, const uint4& nu, bool rest, uint32_t (&b)[4],
                                             float& xs, float& sq) {
  const T* t = nullptr;
  const T* h = reinterpret_cast<const T*>(&u);
  if (!NORM) {
    b[0] = __byte_perm(u.x, u.z, 0x5410);
    b[1] = __byte_perm(u.x, u.z, 0x7632);
    b[2] = __byte_perm(u.y, u.w, 0x5410);
    b[3] = __byte_perm(u.y, u.w, 0x7632);
#pragma unroll
    for (int j = 0; j < 8; ++j) xs += tof(h[j]);
    return;
  }
  const T* gw = reinterpret_cast<const T*>(&nu);
  float f[8], sum = 0.0f;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float v = tof(h[j]);
    sq = fmaf(v, v, sq);
    f[j] = v * tof(gw[j]);
    sum += f[j];
    f[j] *= norm_prescale(t);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t top = pack2(f[i], f[i + 4], t);
    b[i] = rest ? pack2(f[i] - half_value(top, t), f[i + 4] - half_value(top >> 16, t), t) : top;
  }
  xs += rest ? 0.0f : sum;
}

// One warp's share of a q4 product: RT tiles of 16 rows (tile rt: rows row0[rt] + [0, 16) of matrix rt,
// which has n[rt] rows; rows past the end repeat the last) times NT * 8 activation columns, over the
// stages split, split + nsplit, ... of K. acc[rt][nt]: the C fragment (rows g and g + 8 of the tile,
// columns 2c, 2c + 1 of column tile nt), every group's scale and bias applied; sq[nt]: this lane's
// column's sum of x^2. buf: the warp's MMA_STAGES * RT KB of shared memory.
template <typename T, int RT, int NT, bool NORM, bool PREFETCH>
__device__ __forceinline__ void warp_tiles(const T* x, int M, int K, int GS, const uint32_t* const (&w)[RT],
                                           const T* const (&s)[RT], const T* const (&bz)[RT],
                                           const int (&row0)[RT], const int (&n)[RT], int split, int nsplit,
                                           const T* nw, float (&acc)[RT][NT][4], float (&sq)[NT], uint4* buf) {
  const T* t = nullptr;
  const int lane = threadIdx.x, g = lane >> 2, c = lane & 3;
  const int words = K >> 3, groups = K / GS, stages = K >> 7, gshift = GS == 32 ? 0 : GS == 64 ? 1 : 2;
  // cp.async: chunk j of a stage is row (lane / 4) + 8 j of the warp's 16 RT, its 16-byte chunk lane % 4,
  // stored at chunk index XOR (row / 2) % 4, so that ldmatrix's eight rows of a block hit distinct banks.
  const uint32_t* src[2 * RT];
  int dst[2 * RT];
#pragma unroll
  for (int j = 0; j < 2 * RT; ++j) {
    const int row = g + 8 * j;
    src[j] = w[j >> 1] + (size_t)min(row0[j >> 1] + (row & 15), n[j >> 1] - 1) * words + c * 4;
    dst[j] = row * 4 + (c ^ ((row >> 1) & 3));
  }
  // ldmatrix: lane l addresses row l % 8 of matrix l / 8: rows 8 ((l / 8) % 2) + [0, 8) of a tile, block l / 16
  // of a pair of blocks.
  const int lrow = 8 * ((lane >> 3) & 1) + (lane & 7), lblk = lane >> 4;
  int tok[NT];
  bool has[NT], rest[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int col = nt * 8 + g;
    rest[nt] = NORM && col >= M;
    tok[nt] = rest[nt] ? col - M : col;
    has[nt] = col < (NORM ? 2 * M : M);
  }
  const int mine = split < stages ? (stages - 1 - split) / nsplit + 1 : 0;
#pragma unroll
  for (int p = 0; p < MMA_STAGES - 1; ++p) {
    if (p < mine)
#pragma unroll
      for (int j = 0; j < 2 * RT; ++j) cp_async16(buf + p * RT * 64 + dst[j], src[j] + (split + p * nsplit) * 16);
    cp_async_commit();
  }
  float xs[NT], d[RT][NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) xs[nt] = 0.0f;
  // The scales and biases of a stage's groups for rows g and g + 8 of each tile: read from memory (not
  // through the cp.async pipeline), so with PREFETCH they are asked for a stage before they are used.
  auto fetch = [&](int it, unsigned long long (&sv)[RT][2], unsigned long long (&bv)[RT][2]) {
    const int k0 = (split + it * nsplit) << 7;
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const size_t at = (size_t)min(row0[rt] + g + 8 * h, n[rt] - 1) * groups + (k0 / GS);
        sv[rt][h] = stage_groups(s[rt] + at, GS);
        bv[rt][h] = stage_groups(bz[rt] + at, GS);
      }
  };
  auto stage = [&](int it, unsigned long long (&sv)[RT][2], unsigned long long (&bv)[RT][2]) {
    const int ahead = it + MMA_STAGES - 1;
    if (ahead < mine) {
      uint4* slot = buf + (ahead % MMA_STAGES) * RT * 64;
#pragma unroll
      for (int j = 0; j < 2 * RT; ++j) cp_async16(slot + dst[j], src[j] + (split + ahead * nsplit) * 16);
    }
    cp_async_commit();
    const int k0 = (split + it * nsplit) << 7;
    uint4 xv[NT][4], nv[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      nv[b] = NORM ? __ldg(reinterpret_cast<const uint4*>(nw + k0 + 32 * b + 8 * c)) : uint4{0u, 0u, 0u, 0u};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        xv[nt][b] = has[nt] ? __ldg(reinterpret_cast<const uint4*>(x + (size_t)tok[nt] * K + k0 + 32 * b + 8 * c))
                            : uint4{0u, 0u, 0u, 0u};
    }
    if (!PREFETCH) fetch(it, sv, bv);
    cp_async_wait<MMA_STAGES - 1>();
    __syncwarp();
    const uint4* sb = buf + (it % MMA_STAGES) * RT * 64;
#pragma unroll
    for (int pair = 0; pair < 2; ++pair) {
      uint32_t a[RT][4];
#pragma unroll
      for (int rt = 0; rt < RT; ++rt) {
        const int row = 16 * rt + lrow;
        ldmatrix_x4(a[rt], sb + row * 4 + ((2 * pair + lblk) ^ ((row >> 1) & 3)));
      }
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int blk = 2 * pair + e, kb = (k0 >> 5) + blk;
        uint32_t bx[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) column_pairs<T, NORM>(xv[nt][blk], nv[blk], rest[nt], bx[nt], xs[nt], sq[nt]);
        if ((kb & ((1 << gshift) - 1)) == 0)
#pragma unroll
          for (int rt = 0; rt < RT; ++rt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) d[rt][nt][0] = d[rt][nt][1] = d[rt][nt][2] = d[rt][nt][3] = 0.0f;
#pragma unroll
        for (int rt = 0; rt < RT; ++rt) {
          uint32_t pl[4], ph[4];
          nibble_pairs(a[rt][2 * e], pl, t);
          nibble_pairs(a[rt][2 * e + 1], ph, t);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            mma(d[rt][nt], pl[0], ph[0], pl[1], ph[1], bx[nt][0], bx[nt][1], t);
            mma(d[rt][nt], pl[2], ph[2], pl[3], ph[3], bx[nt][2], bx[nt][3], t);
          }
        }
        if (((kb + 1) & ((1 << gshift) - 1)) == 0) {  // the group ends: scale, bias, and the columns' sums
          const int shift = 16 * (blk >> gshift);
          float ca[NT], cb[NT];
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            float v = xs[nt];
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            v += __shfl_xor_sync(0xffffffffu, v, 2);
            ca[nt] = __shfl_sync(0xffffffffu, v, 8 * c);
            cb[nt] = __shfl_sync(0xffffffffu, v, 8 * c + 4);
            xs[nt] = 0.0f;
          }
          const float unscale = NORM ? 1.0f / norm_prescale(t) : 1.0f;
#pragma unroll
          for (int rt = 0; rt < RT; ++rt) {
            const float s0 = half_value(static_cast<uint32_t>(sv[rt][0] >> shift), t) * unscale;
            const float s1 = half_value(static_cast<uint32_t>(sv[rt][1] >> shift), t) * unscale;
            const float b0 = half_value(static_cast<uint32_t>(bv[rt][0] >> shift), t);
            const float b1 = half_value(static_cast<uint32_t>(bv[rt][1] >> shift), t);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
              acc[rt][nt][0] = fmaf(s0, d[rt][nt][0], fmaf(b0, ca[nt], acc[rt][nt][0]));
              acc[rt][nt][1] = fmaf(s0, d[rt][nt][1], fmaf(b0, cb[nt], acc[rt][nt][1]));
              acc[rt][nt][2] = fmaf(s1, d[rt][nt][2], fmaf(b1, ca[nt], acc[rt][nt][2]));
              acc[rt][nt][3] = fmaf(s1, d[rt][nt][3], fmaf(b1, cb[nt], acc[rt][nt][3]));
            }
          }
        }
      }
    }
    __syncwarp();
  };
  unsigned long long sa[RT][2], ba[RT][2], sb2[RT][2], bb2[RT][2];
  if (PREFETCH && mine > 0) fetch(0, sa, ba);
  for (int it = 0; it < mine; it += 2) {  // two stages a turn, so that the two sets of registers alternate
    if (PREFETCH && it + 1 < mine) fetch(it + 1, sb2, bb2);
    stage(it, sa, ba);
    if (it + 1 >= mine) break;
    if (PREFETCH && it + 2 < mine) fetch(it + 2, sa, ba);
    stage(it + 1, sb2, bb2);
  }
  cp_async_wait<0>();
}

extern __shared__ uint4 mma_smem[];

// The block's part after its warps: fragments summed over the split warps into red[rowset][rt][row][col]
// (floats, reusing the pipeline's shared memory) and rowset 0's column sums of x^2 into sqs[col]; then
// returns 1 / rms of every activation row (NORM) through sqs.
template <int RT, int NT, bool NORM>
__device__ __forceinline__ void gather(const float (&acc)[RT][NT][4], const float (&sq)[NT], int M, int K,
                                       float eps, float*& red, float*& sqs) {
  constexpr int NCOL = NT * 8;
  const int lane = threadIdx.x, g = lane >> 2, c = lane & 3, nsplit = blockDim.y, sp = threadIdx.y;
  const int rowsets = blockDim.z, rs = threadIdx.z, tid = lane + 32 * (sp + nsplit * rs);
  float* part = reinterpret_cast<float*>(mma_smem);            // [rowset][split][rt][16][NCOL]
  red = part + rowsets * nsplit * RT * 16 * NCOL;               // [rowset][rt][16][NCOL]
  sqs = red + rowsets * RT * 16 * NCOL;                         // [split][NCOL], then [NCOL]
  __syncthreads();  // every warp is done with its pipeline buffers
  float* mine = part + (rs * nsplit + sp) * RT * 16 * NCOL;
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      float* at = mine + rt * 16 * NCOL + nt * 8 + 2 * c;
      at[g * NCOL] = acc[rt][nt][0];
      at[g * NCOL + 1] = acc[rt][nt][1];
      at[(g + 8) * NCOL] = acc[rt][nt][2];
      at[(g + 8) * NCOL + 1] = acc[rt][nt][3];
    }
  if (NORM) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      float v = sq[nt];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      if (rs == 0 && c == 0) sqs[sp * NCOL + nt * 8 + g] = v;
    }
  }
  __syncthreads();
  const int per = RT * 16 * NCOL, nthreads = 32 * nsplit * rowsets;
  for (int i = tid; i < rowsets * per; i += nthreads) {
    const int r = i / per, j = i % per;
    float v = 0.0f;
    for (int k = 0; k < nsplit; ++k) v += part[(r * nsplit + k) * per + j];
    red[i] = v;
  }
  float* inv = sqs + nsplit * NCOL;
  if (NORM && tid < M) {
    float v = 0.0f;
    for (int k = 0; k < nsplit; ++k) v += sqs[k * NCOL + tid];
    inv[tid] = inv_rms(v, K, eps);
  }
  sqs = inv;
  __syncthreads();
}

// The value of output (row r of tile rt of a rowset, activation row m): the column m, plus the remainder
// column m + M with the norm, times 1 / rms.
template <int RT, int NT, bool NORM>
__device__ __forceinline__ float result(const float* red, const float* inv, int rowset, int rt, int r, int m, int M) {
  constexpr int NCOL = NT * 8;
  const float* at = red + ((rowset * RT + rt) * 16 + r) * NCOL;
  return NORM ? (at[m] + at[m + M]) * inv[m] : at[m];
}

// y = x . w (RES: + res, rounded as `res + linear(x)` rounds) for the block's rows: RT consecutive tiles a rowset.
template <typename T, int RT, int NT, bool NORM, bool RES, bool PREFETCH>
__device__ void mma_matvec(const T* x, int M, const uint32_t* w, const T* s, const T* b, T* y, int N, int K, int GS,
                           const T* nw, float eps, const T* res) {
  const int rowsets = blockDim.z, base = (blockIdx.x * rowsets + threadIdx.z) * RT * 16;
  const uint32_t* wt[RT];
  const T* st[RT];
  const T* bt[RT];
  int r0[RT], nn[RT];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt) {
    wt[rt] = w, st[rt] = s, bt[rt] = b, r0[rt] = base + 16 * rt, nn[rt] = N;
  }
  float acc[RT][NT][4] = {}, sq[NT] = {};
  const int warp = threadIdx.y + blockDim.y * threadIdx.z;
  warp_tiles<T, RT, NT, NORM, PREFETCH>(x, M, K, GS, wt, st, bt, r0, nn, threadIdx.y, blockDim.y, nw, acc, sq,
                              mma_smem + warp * MMA_STAGES * RT * 64);
  float *red, *inv;
  gather<RT, NT, NORM>(acc, sq, M, K, eps, red, inv);
  const int tid = threadIdx.x + 32 * (threadIdx.y + blockDim.y * threadIdx.z), rows = rowsets * RT * 16;
  for (int i = tid; i < rows * M; i += 32 * blockDim.y * rowsets) {
    const int rl = i / M, m = i % M, row = blockIdx.x * rows + rl;
    if (row >= N) continue;
    const float v = result<RT, NT, NORM>(red, inv, rl / (RT * 16), (rl / 16) % RT, rl % 16, m, M);
    y[(size_t)m * N + row] = rnd<T>(RES ? round_to<T>(v) + tof(res[(size_t)m * N + row]) : v);
  }
}

// silu(x . gate) * (x . up): tile 0 of a warp is 16 gate rows, tile 1 the same 16 up rows; the two products
// rounded to T as the unfused linears return them, the rest in float32.
template <typename T, int NT, bool NORM, bool PREFETCH>
__device__ void mma_swiglu(const T* x, int M, const uint32_t* gw, const T* gs, const T* gb, const uint32_t* uw,
                           const T* us, const T* ub, T* y, int N, int K, int GS, const T* nw, float eps) {
  const int rowsets = blockDim.z, base = (blockIdx.x * rowsets + threadIdx.z) * 16;
  const uint32_t* wt[2] = {gw, uw};
  const T* st[2] = {gs, us};
  const T* bt[2] = {gb, ub};
  const int r0[2] = {base, base}, nn[2] = {N, N};
  float acc[2][NT][4] = {}, sq[NT] = {};
  const int warp = threadIdx.y + blockDim.y * threadIdx.z;
  warp_tiles<T, 2, NT, NORM, PREFETCH>(x, M, K, GS, wt, st, bt, r0, nn, threadIdx.y, blockDim.y, nw, acc, sq,
                             mma_smem + warp * MMA_STAGES * 2 * 64);
  float *red, *inv;
  gather<2, NT, NORM>(acc, sq, M, K, eps, red, inv);
  const int tid = threadIdx.x + 32 * (threadIdx.y + blockDim.y * threadIdx.z), rows = rowsets * 16;
  for (int i = tid; i < rows * M; i += 32 * blockDim.y * rowsets) {
    const int rl = i / M, m = i % M, row = blockIdx.x * rows + rl;
    if (row >= N) continue;
    const float gate = round_to<T>(result<2, NT, NORM>(red, inv, rl / 16, 0, rl % 16, m, M));
    const float up = round_to<T>(result<2, NT, NORM>(red, inv, rl / 16, 1, rl % 16, m, M));
    y[(size_t)m * N + row] = rnd<T>(gate / (1.0f + expf(-gate)) * up);
  }
}

// q, k and v in one launch: blocks [0, nb0) compute q, then k, then v; the linear biases (HAS_BIAS) added
// after rounding, as `quantized_matmul(...) + bias` does.
template <typename T, int NT, bool HAS_BIAS, bool NORM, bool PREFETCH>
__device__ void mma_qkv(const T* x, int M, int K, int GS, const uint32_t* qw, const T* qs, const T* qb, const T* ql,
                        T* yq, int nq, const uint32_t* kw, const T* ks, const T* kb, const T* kl, T* yk, int nk,
                        const uint32_t* vw, const T* vs, const T* vb, const T* vl, T* yv, int nv,
                        const T* nw, float eps) {
  const int rowsets = blockDim.z, rows = rowsets * 16;
  int block;
  const Matrix<T> mat = qkv_matrix<T>(rows, block, {qw, qs, qb, ql, yq, nq}, {kw, ks, kb, kl, yk, nk},
                                      {vw, vs, vb, vl, yv, nv});
  const uint32_t* wt[1] = {mat.w};
  const T* st[1] = {mat.s};
  const T* bt[1] = {mat.b};
  const int r0[1] = {(block * rowsets + (int)threadIdx.z) * 16}, nn[1] = {mat.n};
  float acc[1][NT][4] = {}, sq[NT] = {};
  const int warp = threadIdx.y + blockDim.y * threadIdx.z;
  warp_tiles<T, 1, NT, NORM, PREFETCH>(x, M, K, GS, wt, st, bt, r0, nn, threadIdx.y, blockDim.y, nw, acc, sq,
                             mma_smem + warp * MMA_STAGES * 64);
  float *red, *inv;
  gather<1, NT, NORM>(acc, sq, M, K, eps, red, inv);
  const int tid = threadIdx.x + 32 * (threadIdx.y + blockDim.y * threadIdx.z);
  for (int i = tid; i < rows * M; i += 32 * blockDim.y * rowsets) {
    const int rl = i / M, m = i % M, row = block * rows + rl;
    if (row >= mat.n) continue;
    float v = result<1, NT, NORM>(red, inv, rl / 16, 0, rl % 16, m, M);
    if (HAS_BIAS) v = round_to<T>(v) + tof(mat.lb[row]);
    mat.y[(size_t)m * mat.n + row] = rnd<T>(v);
  }
}
"""

CODE = header(COMMON, MMA)

_ROWS = "q4::leading_rows(x_shape, x_ndim)"


def _spec(kind: str, norm: bool = False, res: bool = False, bias: bool = False) -> tuple[list, list, str]:
    """(inputs, outputs, body) of a kernel kind; `_norm` takes the RMS-norm weight nw and its epsilon as the
    constant EPS (the float's bits), `_res` a residual, `_bias` q/k/v's linear biases."""
    nw, eps = ("nw", "__int_as_float(EPS)") if norm else ("nullptr", "0.0f")
    flag = str(norm).lower()
    extra = ["nw"] if norm else []
    if kind == "matvec":
        return (["x", "w", "scales", "biases", *extra, *(["res"] if res else [])], ["y"],
                f"  q4::mma_matvec<T, RT, NT, {flag}, {str(res).lower()}, PREFETCH>(x, {_ROWS}, w, scales, biases, y, w_shape[0], "
                f"w_shape[1] * 8, w_shape[1] * 8 / scales_shape[1], {nw}, {eps}, {'res' if res else 'nullptr'});")
    if kind == "swiglu":
        return (["x", "gw", "gs", "gb", "uw", "us", "ub", *extra], ["y"],
                f"  q4::mma_swiglu<T, NT, {flag}, PREFETCH>(x, {_ROWS}, gw, gs, gb, uw, us, ub, y, gw_shape[0], gw_shape[1] * 8, "
                f"gw_shape[1] * 8 / gs_shape[1], {nw}, {eps});")
    lq, lk, lv = ("ql", "kl", "vl") if bias else ("nullptr",) * 3
    return (["x", "qw", "qs", "qb", "kw", "ks", "kb", "vw", "vs", "vb", *extra, *(["ql", "kl", "vl"] if bias else [])],
            ["yq", "yk", "yv"],
            f"  q4::mma_qkv<T, NT, {str(bias).lower()}, {flag}, PREFETCH>(x, {_ROWS}, qw_shape[1] * 8, qw_shape[1] * 8 / qs_shape[1], "
            f"qw, qs, qb, {lq}, yq, qw_shape[0], kw, ks, kb, {lk}, yk, kw_shape[0], vw, vs, vb, {lv}, yv, vw_shape[0], "
            f"{nw}, {eps});")


SPECS = {"matvec": _spec("matvec"), "matvec_norm": _spec("matvec", norm=True),
         "matvec_res": _spec("matvec", res=True), "swiglu": _spec("swiglu"), "swiglu_norm": _spec("swiglu", norm=True),
         "qkv": _spec("qkv"), "qkv_bias": _spec("qkv", bias=True), "qkv_norm": _spec("qkv", norm=True),
         "qkv_bias_norm": _spec("qkv", norm=True, bias=True)}


def column_tiles(rows: int, norm: bool) -> int:
    """Tiles of 8 activation columns: a column per row, and one more per row for the norm's remainders."""
    return -(-rows * (2 if norm else 1) // 8)


def launch_config(tiles: int, k: int, rt: int = 1) -> tuple[int, int]:
    """(nsplit, rowsets): warps splitting K, and row sets (of RT tiles of 16 rows) per block of 8 / RT warps.

    Enough warps for the whole GPU in one wave (TARGET_WARPS) by splitting K, never under two stages a
    warp; a block holds 8 / RT warps, so that every block's pipeline takes 32 KB of shared memory."""
    warps, stages, nsplit = 8 // rt, k // STAGE_K, 1
    while nsplit < warps and tiles * nsplit < TARGET_WARPS and stages >= 4 * nsplit:
        nsplit *= 2
    return nsplit, warps // nsplit


def _plan(kind: str, x, layers, group_size: int, max_rows: int, config, rt: int, norm, outputs: int) -> tuple | None:
    """(kernel, grid, threadgroup, output shapes) for one call signature, or None."""
    fit = layers_fit(x, group_size, layers, min(max_rows, MAX_ROWS))
    if fit is None or fit[1] % STAGE_K:
        return None
    m, k = fit
    ns = [w.shape[0] for w, _, _ in layers][:outputs]
    per_tile = 16 if kind.startswith("swiglu") else 16 * rt
    tiles = sum(-(-n // per_tile) for n in ns)
    nsplit, rowsets, prefetch = (*config, True)[:3] if config else (*launch_config(tiles, k, rt), True)
    blocks = sum(-(-n // (per_tile * rowsets)) for n in ns)
    template = (("T", x.dtype), ("RT", rt), ("NT", column_tiles(m, norm is not None)), ("PREFETCH", bool(prefetch)),
                *((("EPS", float_bits(norm[1])),) if norm is not None else ()))
    recipe = Recipe("mma_" + kind, SPECS[kind], CODE, template, SHARED_MEMORY)
    return recipe, (blocks * 32, nsplit, rowsets), (32, nsplit, rowsets), [(*x.shape[:-1], n) for n in ns]


def matvec_plan(x, layer, group_size: int, norm, residual: bool, config=None, max_rows: int = MAX_ROWS):
    kind = "matvec_norm" if norm else "matvec_res" if residual else "matvec"
    return _plan(kind, x, (layer,), group_size, max_rows, config, 1, norm, 1)


def swiglu_plan(x, gate, up, group_size: int, norm, config=None, max_rows: int = MAX_ROWS):
    if gate[0].shape != up[0].shape:
        return None
    return _plan("swiglu_norm" if norm else "swiglu", x, (gate, up), group_size, max_rows, config, 2, norm, 1)


def qkv_plan(x, q, k, v, group_size: int, bias: bool, norm, config=None, max_rows: int = MAX_ROWS):
    kind = "qkv" + ("_bias" if bias else "") + ("_norm" if norm else "")
    return _plan(kind, x, (q, k, v), group_size, max_rows, config, 1, norm, 3)
