// bf16 GEMMs with the output features in the vector lanes, on CPUs with AVX512_BF16 (no AMX; stop 44):
//  - sparse24_shuffle_bf16 (the "shuffle" path): 2:4 weights, the x pairs picked per lane by a byte shuffle;
//  - lanes_dense_bf16 (the "lanes" path): weights decompressed straight into its panels by a filler (the bitmap:
//    bm_lanes_panel_bf16, 16 rows at a time) and multiplied densely.
//
// Why: the pair kernel (pair_outer_bf16.cpp) puts rows of x in the lanes and reads each dot's x pairs from a
// table: three loads per dot, about 1.9 cycles per dot on a Zen 4 even from L1 (docs/cpu_kernels.md, stop 43),
// so it only matches oneDNN's dense bf16 GEMM. Here the lanes are 16 output features n, and one dot serves
// one group of 4 columns of x (two dense dots' worth):
//     y[m, n] += v[n, 2g] * x[m, 4g + i0(n, g)] + v[n, 2g + 1] * x[m, 4g + i1(n, g)]
// x[m, 4g .. 4g + 3] (8 bytes) is broadcast to every 128-bit lane (vpbroadcastq) and each 32-bit lane takes
// its own two bf16 out of it with one in-lane `vpshufb` whose control (bytes 2 i0, 2 i0 + 1, 2 i1, 2 i1 + 1)
// comes from the group's metadata nibble. A shuffle + vdpbf16ps pair issued at about 1.33 cycles on the
// Zen 4 (a throwaway microbenchmark; a dot alone 1.0, a two-source vpermt2w + dot 2.4), i.e. 0.67 cycles per
// dense-dot equivalent against oneDNN's 1.1 at M = 64.
//
// How: output features in blocks of 32 (two 16-lane vectors), K in blocks of kGroupsPerBlock groups. Per
// block the weights are re-laid into a panel in L1: per group and vector the 16 value pairs (a 16 x 16 dword
// transpose of the stored values) and the 16 shuffle controls (from the meta words, gathered by row); then
// every register block of up to 8 rows of x runs over the panel with 16 fp32 accumulators (8 rows x 2
// vectors), partial sums kept in a per-thread [rows, 32] fp32 buffer between K-blocks; x passes in chunks of at most
// 8 MB of rows (stop 46, lanes_common.h), each chunk a pass over the weight. One thread computes each
// output element in a fixed order: the same bits for any thread count.
// The dense variant: per block of 128 column pairs the weights are decompressed straight into a panel of
// 16-feature pair vectors (bm_lanes_panel_bf16: 16 rows' 32-column words expanded into registers, then the same
// transpose; stop 45, where stop 44 went through a [32, K] row buffer), then per pair 2 loads, 8
// broadcasts of x[m, 2p .. 2p + 1] and 16 dots. It does the dense count of multiply-adds; against the bitmap
// panels (decompress + oneDNN, which re-lays the panel again) it saves that second re-layout and runs its loop at
// about the same rate as oneDNN's.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <vector>

#include "lanes_common.h"

namespace laco {
namespace {

using lanes::kFeat;
using lanes::kLanes;
using lanes::kMaxRows;
using lanes::kVecs;
constexpr int64_t kGroupsPerBlock = 64;   // panel: 64 groups x 2 vectors x (values, controls) x 64 B = 16 KB

#if LACO_X86
// vpshufb control of a meta nibble (i0 | i1 << 2): bytes 2 i0, 2 i0 + 1, 2 i1, 2 i1 + 1 of the broadcast
// 8-byte group. Every nibble maps to in-range bytes (invalid nibbles never occur in a checked weight).
uint32_t control_of_nibble(int nib) {
  const uint32_t i0 = nib & 3, i1 = (nib >> 2) & 3;
  return (2 * i0) | ((2 * i0 + 1) << 8) | ((2 * i1) << 16) | ((2 * i1 + 1) << 24);
}

// Panel of features [n0, n0 + 32) x groups [g0, g0 + gc): pan[(g * kVecs + v) * 2 + 0] = value pairs of the
// 16 features of vector v, [... + 1] = their shuffle controls (16 dwords each). Features >= N: zeros.
LACO_AVX512BF16 void fill_panel(const char* values, const uint32_t* meta, int64_t N, int64_t G, int64_t W,
                                int64_t n0, int64_t g0, int64_t gc, const uint32_t* lut_words, uint32_t* pan) {
  const __m512i lut = _mm512_load_si512(lut_words);
  for (int v = 0; v < kVecs; ++v) {
    const int64_t nb = n0 + v * kLanes;
    const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(kLanes, N - nb));
    const __mmask16 rmask = static_cast<__mmask16>((1u << rows) - 1u);
    const __m512i rowoff = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(static_cast<int>(W)));
    const uint32_t* mbase = meta + nb * W;
    for (int64_t s = 0; s < gc; s += 16) {
      const int64_t cnt = std::min<int64_t>(16, gc - s);
      const __mmask16 cmask = static_cast<__mmask16>((1u << cnt) - 1u);
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < rows ? _mm512_maskz_loadu_epi32(cmask, values + ((nb + i) * G + g0 + s) * 4) : _mm512_setzero_si512();
      transpose16x16_epi32(r);
      for (int64_t c = 0; c < cnt; ++c) _mm512_store_si512(pan + ((s + c) * kVecs + v) * 2 * kLanes, r[c]);
      // controls: the meta words of the 16 features (one gather per 8 groups), a nibble each
      for (int64_t c = 0; c < cnt; c += 8) {
        const int64_t g = g0 + s + c;  // a multiple of 8: one meta word holds groups g .. g + 7
        const __m512i words = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rmask, rowoff,
                                                          mbase + (g >> 3), 4);
        for (int64_t e = 0; e < 8 && c + e < cnt; ++e) {
          const __m512i nib = _mm512_and_si512(_mm512_srli_epi32(words, static_cast<unsigned>(4 * e)),
                                               _mm512_set1_epi32(15));
          _mm512_store_si512(pan + ((s + c + e) * kVecs + v) * 2 * kLanes + kLanes, _mm512_permutexvar_epi32(nib, lut));
        }
      }
    }
  }
}

// Prefetch of the weight bytes fill_panel reads for features [n0, n0 + 32) x groups [g0, g0 + kGroupsPerBlock).
void prefetch_panel(const char* values, const uint32_t* meta, int64_t N, int64_t G, int64_t W, int64_t n0, int64_t g0) {
  const int64_t n1 = std::min<int64_t>(N, n0 + kFeat), g1 = std::min<int64_t>(G, g0 + kGroupsPerBlock);
  for (int64_t n = n0; n < n1; ++n) {
    const char* row = values + (n * G) * 4;
    for (int64_t o = g0 * 4 / 64 * 64; o < g1 * 4; o += 64) _mm_prefetch(row + o, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(meta + n * W + (g0 >> 3)), _MM_HINT_T0);
  }
}

// acc[R][v] (R rows of x from xr, stride ldx, at group g0) over the panel's gc groups.
template <int R>
LACO_AVX512BF16 void run_rows(const uint32_t* pan, int64_t gc, const uint16_t* xr, int64_t ldx, float* part,
                              bool first) {
  __m512 acc[R][kVecs];
  lanes::load_acc<R>(acc, part, first);
  for (int64_t g = 0; g < gc; ++g) {
    const uint32_t* p = pan + g * kVecs * 2 * kLanes;
    const __m512i w0 = _mm512_load_si512(p), c0 = _mm512_load_si512(p + kLanes);
    const __m512i w1 = _mm512_load_si512(p + 2 * kLanes), c1 = _mm512_load_si512(p + 3 * kLanes);
#pragma GCC unroll 8
    for (int m = 0; m < R; ++m) {
      long long q;
      std::memcpy(&q, xr + m * ldx + 4 * g, 8);
      const __m512i xq = _mm512_set1_epi64(q);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)w0, (__m512bh)_mm512_shuffle_epi8(xq, c0));
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], (__m512bh)w1, (__m512bh)_mm512_shuffle_epi8(xq, c1));
    }
  }
  lanes::store_acc<R>(acc, part);
}

using RunRows = void (*)(const uint32_t*, int64_t, const uint16_t*, int64_t, float*, bool);
constexpr RunRows kRunRows[kMaxRows + 1] = {nullptr,      run_rows<1>, run_rows<2>, run_rows<3>, run_rows<4>,
                                            run_rows<5>, run_rows<6>, run_rows<7>, run_rows<8>};

// Dense variant (decompressed weights): the panel holds 16-feature bf16 pair vectors (bm_lanes_panel_bf16).
template <int R>
LACO_AVX512BF16 void run_rows_dense(const uint32_t* pan, int64_t pc, const uint16_t* xr, int64_t ldx, float* part,
                                    bool first) {
  __m512 acc[R][kVecs];
  lanes::load_acc<R>(acc, part, first);
#pragma GCC unroll 2
  for (int64_t p = 0; p < pc; ++p) {
    const __m512i w0 = _mm512_load_si512(pan + p * kVecs * kLanes);
    const __m512i w1 = _mm512_load_si512(pan + p * kVecs * kLanes + kLanes);
#pragma GCC unroll 8
    for (int m = 0; m < R; ++m) {
      int q;
      std::memcpy(&q, xr + m * ldx + 2 * p, 4);
      const __m512i xb = _mm512_set1_epi32(q);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)w0, (__m512bh)xb);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], (__m512bh)w1, (__m512bh)xb);
    }
  }
  lanes::store_acc<R>(acc, part);
}

constexpr RunRows kRunRowsDense[kMaxRows + 1] = {nullptr, run_rows_dense<1>, run_rows_dense<2>, run_rows_dense<3>,
                                                 run_rows_dense<4>, run_rows_dense<5>, run_rows_dense<6>,
                                                 run_rows_dense<7>, run_rows_dense<8>};

// y[m, n0 + f] = bf16(part[m, f] + bias) for the block's features < N; rounding to nearest even, NaN -> 0x7fc0
// (torch's conversion).
LACO_AVX512BF16 void store_rows(const float* part, int64_t M, const float* bias, int64_t N, int64_t n0, uint16_t* y) {
  for (int v = 0; v < kVecs; ++v) {
    const int64_t nb = n0 + v * kLanes;
    if (nb >= N) break;
    const int64_t cnt = std::min<int64_t>(kLanes, N - nb);
    const __mmask16 k = static_cast<__mmask16>((1u << cnt) - 1u);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(k, bias + nb) : _mm512_setzero_ps();
    for (int64_t m = 0; m < M; ++m) {
      _mm256_mask_storeu_epi16(y + m * N + nb, k,
                               f32x16_to_bf16(_mm512_add_ps(_mm512_load_ps(part + m * kFeat + v * kLanes), b)));
    }
  }
}
#endif

}  // namespace

at::Tensor sparse24_shuffle_bf16(const at::Tensor& x, const at::Tensor& b32, const at::Tensor& values,
                                 const at::Tensor& meta, int64_t N, int64_t K) {
#if LACO_X86
  const int64_t M = x.size(0), G = K / 4, W = (G + 7) / 8;
  const at::Tensor xc = x.contiguous();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const char* vp = reinterpret_cast<const char*>(values.data_ptr());
  const uint32_t* mp = reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>());
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({M, N}, x.options());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  alignas(64) uint32_t lut_words[16];
  for (int i = 0; i < 16; ++i) lut_words[i] = control_of_nibble(i);
  lanes::run_feature_blocks(
      M, N, K, G, kGroupsPerBlock, kGroupsPerBlock * kVecs * 2 * kLanes, K * 2, lanes::kXChunkBytes,
      lanes::no_block_setup,
      [&](int64_t n0, int64_t, int64_t g0, int64_t gc, const uint32_t*, uint32_t* pan) {
        // the next panel's weight bytes (this block's next K-block, or the next block's first) into L1/L2 while
        // this one computes: a 7B weight comes from DRAM, 32 rows = 32 streams the hardware prefetchers do not
        // follow ahead (past N it prefetches nothing)
        const bool more = g0 + gc < G;
        prefetch_panel(vp, mp, N, G, W, more ? n0 : n0 + kFeat, more ? g0 + gc : 0);
        fill_panel(vp, mp, N, G, W, n0, g0, gc, lut_words, pan);
      },
      [&](int64_t r, int64_t m0, int64_t g0, int64_t gc, const uint32_t* pan, float* part, bool first) {
        kRunRows[r](pan, gc, xp + m0 * K + 4 * g0, K, part, first);
      },
      [&](const float* part, int64_t n0, int64_t mc0, int64_t mrows) {
        store_rows(part, mrows, bp, N, n0, yp + mc0 * N);
      });
  return y;
#else
  (void)x; (void)b32; (void)values; (void)meta; (void)N; (void)K;
  TORCH_CHECK(false, "sparse24_shuffle_bf16: x86 only");
#endif
}

at::Tensor lanes_dense_bf16(const at::Tensor& x, const at::Tensor& b32, int64_t N, int64_t K, const LanesPanelFill& fill) {
#if LACO_X86
  TORCH_CHECK(K % 2 == 0, "lanes_dense_bf16: K must be even");
  const int64_t M = x.size(0), P = K / 2;
  const at::Tensor xc = x.contiguous();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({M, N}, x.options());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  constexpr int64_t kPairsPerBlock = 2 * kGroupsPerBlock;  // 128 pairs: 32 x 256 columns, a 16 KB panel
  lanes::run_feature_blocks(
      M, N, K, P, kPairsPerBlock, kPairsPerBlock * kVecs * kLanes, K * 2, lanes::kXChunkBytes,
      [&](int64_t, int64_t, std::vector<uint32_t>& scratch) {
        scratch.resize(2 * kFeat);  // the rows' cursors: kFeat int64 slots
      },
      [&](int64_t n0, int64_t nrows, int64_t p0, int64_t pc, uint32_t* scratch, uint32_t* pan) {
        fill(n0, nrows, p0, pc, reinterpret_cast<int64_t*>(scratch), pan);
      },
      [&](int64_t r, int64_t m0, int64_t p0, int64_t pc, const uint32_t* pan, float* part, bool first) {
        kRunRowsDense[r](pan, pc, xp + m0 * K + 2 * p0, K, part, first);
      },
      [&](const float* part, int64_t n0, int64_t mc0, int64_t mrows) {
        store_rows(part, mrows, bp, N, n0, yp + mc0 * N);
      });
  return y;
#else
  (void)x; (void)b32; (void)N; (void)K; (void)fill;
  TORCH_CHECK(false, "lanes_dense_bf16: x86 only");
#endif
}

}  // namespace laco
