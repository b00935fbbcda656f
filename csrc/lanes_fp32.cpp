// fp32 2:4 linear with the output features in the vector lanes, on AVX-512 CPUs (the "shuffle" path for fp32;
// stop 44). The fp32 counterpart of sparse24_shuffle_bf16 (lanes_bf16.cpp):
//     y[m, n] += v[n, 2g] * x[m, 4g + i0(n, g)] + v[n, 2g + 1] * x[m, 4g + i1(n, g)]
// x[m, 4g .. 4g + 3] (16 bytes) is broadcast to every 128-bit lane (vbroadcastf32x4) and each lane takes its
// x[i0] and x[i1] with an in-lane `vpermilps` whose controls are the meta nibble's two halves; two FMAs per
// group against the dense GEMM's four. Layout and loop as in the bf16 kernel: 32 features (two vectors) per
// block, 64 groups per K-block, a panel per block in L1 (per group and vector: first values, second values,
// i0 controls, i1 controls; 16 floats each; the values by a 16 x 16 transpose, the controls from meta words
// gathered by row), register blocks of 8 rows of x x 2 vectors, partial sums in a per-thread [M, 32] buffer.
// Each output element is one thread's fixed-order sum (the same bits for any thread count).
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "lanes_common.h"

namespace laco {
namespace {

using lanes::kFeat;
using lanes::kLanes;
using lanes::kMaxRows;
using lanes::kVecs;
constexpr int64_t kGroupsPerBlock = 32;  // panel: 32 groups x 2 vectors x 4 x 64 B = 16 KB (L1)
constexpr int kPanelVecs = 4;            // per group and vector: v0, v1, i0, i1

#if LACO_X86
// pan[((g * kVecs + v) * 4 + q) * 16]: q = 0 first values, 1 second values, 2 i0 controls, 3 i1 controls.
LACO_AVX512 void fill_panel_f32(const float* values, const uint32_t* meta, int64_t N, int64_t G, int64_t W, int64_t n0,
                                int64_t g0, int64_t gc, float* pan) {
  const __m512i rowoff = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int>(W)));
  for (int v = 0; v < kVecs; ++v) {
    const int64_t nb = n0 + v * kLanes;
    const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(kLanes, N - nb));
    const __mmask16 rmask = static_cast<__mmask16>((1u << rows) - 1u);
    for (int64_t s = 0; s < gc; s += 8) {  // 8 groups = 16 values per row
      const int64_t cnt = std::min<int64_t>(8, gc - s);
      const __mmask16 cmask = static_cast<__mmask16>((1u << (2 * cnt)) - 1u);
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < rows ? _mm512_castps_si512(_mm512_maskz_loadu_ps(cmask, values + (nb + i) * 2 * G + 2 * (g0 + s)))
                        : _mm512_setzero_si512();
      transpose16x16_epi32(r);
      const int64_t g = g0 + s;  // a multiple of 8: one meta word
      const __m512i words = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rmask, rowoff,
                                                        meta + nb * W + (g >> 3), 4);
      for (int64_t e = 0; e < cnt; ++e) {
        float* p = pan + ((s + e) * kVecs + v) * kPanelVecs * kLanes;
        _mm512_store_si512(p, r[2 * e]);
        _mm512_store_si512(p + kLanes, r[2 * e + 1]);
        const __m512i nib = _mm512_srli_epi32(words, static_cast<unsigned>(4 * e));
        _mm512_store_si512(p + 2 * kLanes, nib);                         // vpermilps reads bits 1:0: i0
        _mm512_store_si512(p + 3 * kLanes, _mm512_srli_epi32(nib, 2));  // bits 3:2: i1
      }
    }
  }
}

template <int R>
LACO_AVX512 void run_rows_f32(const float* pan, int64_t gc, const float* xr, int64_t ldx, float* part, bool first) {
  __m512 acc[R][kVecs];
  lanes::load_acc<R>(acc, part, first);
  for (int64_t g = 0; g < gc; ++g) {
    const float* p = pan + g * kVecs * kPanelVecs * kLanes;
    const __m512 a0 = _mm512_load_ps(p), a1 = _mm512_load_ps(p + kLanes);
    const __m512i ac0 = _mm512_load_si512(p + 2 * kLanes), ac1 = _mm512_load_si512(p + 3 * kLanes);
    const __m512 b0 = _mm512_load_ps(p + 4 * kLanes), b1 = _mm512_load_ps(p + 5 * kLanes);
    const __m512i bc0 = _mm512_load_si512(p + 6 * kLanes), bc1 = _mm512_load_si512(p + 7 * kLanes);
#pragma GCC unroll 8
    for (int m = 0; m < R; ++m) {
      const __m512 xq = _mm512_broadcast_f32x4(_mm_loadu_ps(xr + m * ldx + 4 * g));
      acc[m][0] = _mm512_fmadd_ps(a0, _mm512_permutevar_ps(xq, ac0), acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(b0, _mm512_permutevar_ps(xq, bc0), acc[m][1]);
      acc[m][0] = _mm512_fmadd_ps(a1, _mm512_permutevar_ps(xq, ac1), acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(b1, _mm512_permutevar_ps(xq, bc1), acc[m][1]);
    }
  }
  lanes::store_acc<R>(acc, part);
}

using RunRowsF32 = void (*)(const float*, int64_t, const float*, int64_t, float*, bool);
constexpr RunRowsF32 kRunRowsF32[kMaxRows + 1] = {nullptr, run_rows_f32<1>, run_rows_f32<2>, run_rows_f32<3>,
                                                  run_rows_f32<4>, run_rows_f32<5>, run_rows_f32<6>, run_rows_f32<7>,
                                                  run_rows_f32<8>};

// Dense variant (the fp32 bitmap): the panel, filled straight from the bitmap (bm_lanes_panel_f32 in
// bitmap_linear.cpp), holds pan[(k * kVecs + v) * 16] = the 16 features' weights of column k0 + k.
template <int R>
LACO_AVX512 void run_rows_dense_f32(const float* pan, int64_t kc, const float* xr, int64_t ldx, float* part,
                                    bool first) {
  __m512 acc[R][kVecs];
  lanes::load_acc<R>(acc, part, first);
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 w0 = _mm512_load_ps(pan + k * kVecs * kLanes), w1 = _mm512_load_ps(pan + k * kVecs * kLanes + kLanes);
#pragma GCC unroll 8
    for (int m = 0; m < R; ++m) {
      const __m512 xb = _mm512_set1_ps(xr[m * ldx + k]);
      acc[m][0] = _mm512_fmadd_ps(w0, xb, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(w1, xb, acc[m][1]);
    }
  }
  lanes::store_acc<R>(acc, part);
}

constexpr RunRowsF32 kRunRowsDenseF32[kMaxRows + 1] = {
    nullptr, run_rows_dense_f32<1>, run_rows_dense_f32<2>, run_rows_dense_f32<3>, run_rows_dense_f32<4>,
    run_rows_dense_f32<5>, run_rows_dense_f32<6>, run_rows_dense_f32<7>, run_rows_dense_f32<8>};

LACO_AVX512 void store_rows_f32(const float* part, int64_t M, const float* bias, int64_t N, int64_t n0, float* y) {
  for (int v = 0; v < kVecs; ++v) {
    const int64_t nb = n0 + v * kLanes;
    if (nb >= N) break;
    const int64_t cnt = std::min<int64_t>(kLanes, N - nb);
    const __mmask16 k = static_cast<__mmask16>((1u << cnt) - 1u);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(k, bias + nb) : _mm512_setzero_ps();
    for (int64_t m = 0; m < M; ++m)
      _mm512_mask_storeu_ps(y + m * N + nb, k, _mm512_add_ps(_mm512_load_ps(part + m * kFeat + v * kLanes), b));
  }
}
#endif

}  // namespace

at::Tensor sparse24_shuffle_fp32(const at::Tensor& x32, const at::Tensor& b32, const at::Tensor& values,
                                 const at::Tensor& meta, int64_t N, int64_t K) {
#if LACO_X86
  const int64_t M = x32.size(0), G = K / 4, W = (G + 7) / 8;
  const float* xp = x32.data_ptr<float>();
  const float* vp = values.data_ptr<float>();
  const uint32_t* mp = reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>());
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({M, N}, x32.options());
  float* yp = y.data_ptr<float>();
  lanes::run_feature_blocks(
      M, N, K, G, kGroupsPerBlock, kGroupsPerBlock * kVecs * kPanelVecs * kLanes, K * 4,
      lanes::kXChunkBytes, lanes::no_block_setup,
      [&](int64_t n0, int64_t, int64_t g0, int64_t gc, const uint32_t*, uint32_t* pan) {
        fill_panel_f32(vp, mp, N, G, W, n0, g0, gc, reinterpret_cast<float*>(pan));
      },
      [&](int64_t r, int64_t m0, int64_t g0, int64_t gc, const uint32_t* pan, float* part, bool first) {
        kRunRowsF32[r](reinterpret_cast<const float*>(pan), gc, xp + m0 * K + 4 * g0, K, part, first);
      },
      [&](const float* part, int64_t n0, int64_t mc0, int64_t mrows) {
        store_rows_f32(part, mrows, bp, N, n0, yp + mc0 * N);
      });
  return y;
#else
  (void)x32; (void)b32; (void)values; (void)meta; (void)N; (void)K;
  TORCH_CHECK(false, "sparse24_shuffle_fp32: x86 only");
#endif
}

at::Tensor lanes_dense_fp32(const at::Tensor& x32, const at::Tensor& b32, int64_t N, int64_t K,
                            const LanesPanelFill& fill) {
#if LACO_X86
  const int64_t M = x32.size(0);
  const float* xp = x32.data_ptr<float>();
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({M, N}, x32.options());
  float* yp = y.data_ptr<float>();
  constexpr int64_t kColsPerBlock = 128;  // panel 128 x 2 x 64 B = 16 KB
  lanes::run_feature_blocks(
      M, N, K, K, kColsPerBlock, kColsPerBlock * kVecs * kLanes, K * 4, lanes::kXChunkBytes,
      [&](int64_t, int64_t, std::vector<uint32_t>& scratch) {
        scratch.resize(2 * kFeat);  // the rows' cursors: kFeat int64 slots
      },
      [&](int64_t n0, int64_t nrows, int64_t k0, int64_t kc, uint32_t* scratch, uint32_t* pan) {
        fill(n0, nrows, k0, kc, reinterpret_cast<int64_t*>(scratch), pan);
      },
      [&](int64_t r, int64_t m0, int64_t k0, int64_t kc, const uint32_t* pan, float* part, bool first) {
        kRunRowsDenseF32[r](reinterpret_cast<const float*>(pan), kc, xp + m0 * K + k0, K, part, first);
      },
      [&](const float* part, int64_t n0, int64_t mc0, int64_t mrows) {
        store_rows_f32(part, mrows, bp, N, n0, yp + mc0 * N);
      });
  return y;
#else
  (void)x32; (void)b32; (void)N; (void)K; (void)fill;
  TORCH_CHECK(false, "lanes_dense_fp32: x86 only");
#endif
}

}  // namespace laco
