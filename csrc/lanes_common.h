// Shared by the kernels with output features in the vector lanes (lanes_bf16.cpp, lanes_fp32.cpp): block sizes,
// the accumulators of a register block, 64-byte aligned per-thread buffers and the loop over feature blocks.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "laco_cpu.h"

namespace laco {
namespace lanes {

constexpr int kLanes = 16;             // output features per vector
constexpr int kVecs = 2;               // vectors per feature block
constexpr int kFeat = kLanes * kVecs;  // features per block: 32
constexpr int kMaxRows = 8;            // rows of x per register block (16 accumulators)

#if LACO_X86
// acc[m][v] = part[m, 16 v : 16 v + 16] (or zero on a block's first K-block); part: [R, 32] fp32, 64-byte aligned.
template <int R>
LACO_AVX512 LACO_INLINE void load_acc(__m512 (&acc)[R][kVecs], const float* part, bool first) {
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m)
#pragma GCC unroll 2
    for (int v = 0; v < kVecs; ++v)
      acc[m][v] = first ? _mm512_setzero_ps() : _mm512_load_ps(part + m * kFeat + v * kLanes);
}

template <int R>
LACO_AVX512 LACO_INLINE void store_acc(const __m512 (&acc)[R][kVecs], float* part) {
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m)
#pragma GCC unroll 2
    for (int v = 0; v < kVecs; ++v) _mm512_store_ps(part + m * kFeat + v * kLanes, acc[m][v]);
}
#endif

// Rows of x per pass over the weight (x_chunk_bytes > 0; else all of x in one pass). Every 32-feature block streams
// all of x once, so an x that does not stay in L3 beside the weight stream is re-read from DRAM for every block;
// chunks of at most x_chunk_bytes of x (equal chunks, multiples of the register block) come from L3 instead, at the
// cost of filling every panel once per chunk (a bitmap panel fill: about 6 ms per pass over a 7B weight at 50%).
inline int64_t x_chunk_rows(int64_t M, int64_t x_row_bytes, int64_t x_chunk_bytes) {
  const int64_t total = M * std::max<int64_t>(x_row_bytes, 1);
  if (x_chunk_bytes <= 0 || total <= x_chunk_bytes) return std::max<int64_t>(M, 1);
  const int64_t chunks = (total + x_chunk_bytes - 1) / x_chunk_bytes;
  const int64_t rows = (M + chunks - 1) / chunks;
  return (rows + kMaxRows - 1) / kMaxRows * kMaxRows;
}

// 8 MB (stop 46, Zen 4 EPYC, 32 MB L3; forced paths against F.linear in one process, docs/cpu_kernels.md): 2:4 bf16
// 4096x11008 at M = 1024, one thread: one pass (22.5 MB of x) 1.14x, 2 MB chunks 1.10x, 4 MB 1.25x, 8 MB 1.31x; two
// threads 1.25-1.34x at 0-16 MB (no trend). The bf16 bitmap lanes kernel at M = 1024 on 4096x11008: 0.83-0.93x ->
// 1.00x. fp32 2:4 1.17x / 1.09x (4096x11008 / 11008x4096) -> 1.17x / 1.19x.
constexpr int64_t kXChunkBytes = int64_t{8} << 20;

// A 64-byte aligned array of n elements held by buf (zero-filled).
template <typename T>
T* aligned_buffer(std::vector<T>& buf, int64_t n) {
  buf.assign(static_cast<size_t>(n) + 64 / sizeof(T), T{});
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t{63});
}

// The loop of every lane kernel, in parallel over the 32-feature blocks of an [M, K] x [N, K]^T product (at least
// ~1M multiply-adds per chunk, linear_row_grain). Per block: begin(n0, nrows, rows) once (`rows`: the thread's
// scratch; the bitmap fillers keep their rows' cursors there); per K-block of at most kb of the `units` (groups,
// pairs or columns): panel(n0, nrows, u0, uc, rows, pan) into the thread's 64-byte aligned panel of panel_elems
// dwords, then run(r, m0, u0, uc, pan, part + 32 (m0 - mc0), first) per register block of r <= 8 rows of x; at the
// end finish(part, n0, mc0, mrows). part: the thread's [mrows, 32] fp32 partial sums, first: the block's first
// K-block. Rows of x in chunks [mc0, mc0 + mrows) of x_chunk_rows(M, x_row_bytes, x_chunk_bytes) rows, each chunk
// a pass over all blocks.
template <typename Begin, typename Panel, typename Run, typename Finish>
void run_feature_blocks(int64_t M, int64_t N, int64_t K, int64_t units, int64_t kb, int64_t panel_elems,
                        int64_t x_row_bytes, int64_t x_chunk_bytes, const Begin& begin, const Panel& panel, const Run& run,
                        const Finish& finish) {
  const int64_t blocks = (N + kFeat - 1) / kFeat;
  const int64_t chunk = x_chunk_rows(M, x_row_bytes, x_chunk_bytes);
  for (int64_t mc0 = 0; mc0 < M; mc0 += chunk) {
    const int64_t mrows = std::min(chunk, M - mc0);
    const int64_t grain = std::max<int64_t>(1, linear_row_grain(mrows, K) / kFeat);
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      std::vector<float> part_buf;
      std::vector<uint32_t> pan_buf, rows;
      float* part = aligned_buffer(part_buf, mrows * kFeat);
      uint32_t* pan = aligned_buffer(pan_buf, panel_elems);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n0 = b * kFeat, nrows = std::min<int64_t>(kFeat, N - n0);
        begin(n0, nrows, rows);
        for (int64_t u0 = 0; u0 < units; u0 += kb) {
          const int64_t uc = std::min(kb, units - u0);
          panel(n0, nrows, u0, uc, rows.data(), pan);
          for (int64_t m0 = mc0; m0 < mc0 + mrows; m0 += kMaxRows) {
            run(std::min<int64_t>(kMaxRows, mc0 + mrows - m0), m0, u0, uc, pan, part + (m0 - mc0) * kFeat, u0 == 0);
          }
        }
        finish(part, n0, mc0, mrows);
      }
    });
  }
}

// begin() of the kernels that need no per-block work.
inline void no_block_setup(int64_t, int64_t, std::vector<uint32_t>&) {}

}  // namespace lanes
}  // namespace laco
