// y[M, N] = x[M, K] @ dense(Wbitmap)^T + bias on the CPU, reading only the nonzeros.
//
// Layout (laco_kernels/formats.py): values [nnz] row-major nonzeros, bitmap int32 [N, ceil(K/32)]
// (bit k%32 of word k/32), offsets int32 [N, ceil(K/tile_k)] (index in values of each tile's first
// nonzero). A row is walked word by word with a running pointer into values (advanced by popcount);
// a K-block starts at a tile boundary, where offsets gives the pointer.
//
// AVX-512 (csrc/bitmap_avx512.inc): each 16-bit half of a word loads popcount(half) values (masked load)
// and expands them to the set lanes (vexpandps), giving a dense 16-wide weight vector that feeds one FMA
// per x row.
// AVX2 (csrc/bitmap_avx2.inc): the same per byte with a permute table. bf16 with AVX512_BF16: vpexpandw + vdpbf16ps on
// whole words, x kept in bf16; from M = 2 in register blocks of 3 weight rows x 8 rows of x (bm_bf16_block,
// bm_run_bf16_blocked). Parallel over output rows; fp32 accumulation;
// each output element is produced by one thread in a fixed order.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>

#include "laco_cpu.h"

namespace laco {
namespace {

struct BmArgs {
  const float* x;          // [M, K] fp32
  const uint16_t* x16;     // [M, K] bf16 bits when x is bf16 (AVX512_BF16 path), else nullptr
  const void* values;      // [nnz] float or bf16 bits
  const uint32_t* bitmap;  // [N, W]
  const int32_t* offsets;  // [N, T]
  int64_t M, N, K, W, T, tile_k, nnz;
  bool pf_next_row;        // K is split in blocks: prefetch the next row's block (see bm_run)
};

constexpr int kMaxMB = 8;
// Software prefetch distances when rows are read whole (values and bitmap are then two contiguous
// streams). The hardware prefetchers of the machines we measured cover them poorly (no software
// prefetch: 2.6x slower), so these distances set the memory-level parallelism. Measured on an AMD
// EPYC (Zen 5, KVM), M = 1, 70% sparse fp32, 4096x11008, 1 thread: values 2 KB ahead 4.2-4.7 ms,
// 6 KB 2.9-3.2 ms (~19 GB/s), 12 KB and more slower again; bitmap 2 KB ahead a little better
// than one row (1.4 KB) ahead.
// The values distance is prefetch_bytes(LinearOp::kBitmap) (default 6144, set_prefetch_bytes to tune).
constexpr int64_t kPfBitmapWords = 512;

// Whether row n's values end at least `margin` values before the tensor's (offsets grow with the row, so
// this holds for every row before n too): the unmasked value loads may then read `margin` values past
// the row's end. The last row never qualifies.
inline bool row_ends_before(const BmArgs& a, int64_t n, int64_t margin) {
  return n + 1 < a.N && a.offsets[(n + 1) * a.T] + margin <= a.nnz;
}

// Bits of word w that are real columns (padding bits past K are ignored even if set).
inline uint32_t valid_bits(const BmArgs& a, int64_t w) {
  const int64_t left = a.K - 32 * w;
  return left >= 32 ? 0xffffffffu : ((1u << left) - 1u);
}

template <typename VT>
void bm_scalar(const BmArgs& a, int64_t n, int64_t m0, int mb, int64_t w0, int64_t w1, const VT* p0, float* out) {
  const uint32_t* bits = a.bitmap + n * a.W;
  for (int i = 0; i < mb; ++i) {
    const float* xr = a.x + (m0 + i) * a.K;
    const VT* p = p0;
    float s = 0.f;
    for (int64_t w = w0; w < w1; ++w) {
      uint32_t b = bits[w];
      const uint32_t keep = valid_bits(a, w);
      uint32_t rest = b & ~keep;  // corrupt padding bits still own values: skip them in order
      b &= keep;
      while (b) {
        s += to_f32(*p++) * xr[32 * w + __builtin_ctz(b)];
        b &= b - 1;
      }
      p += __builtin_popcount(rest);
    }
    out[i] += s;
  }
}

// Decompression into a dense panel (the panel path, csrc/panel.cpp).
// Words [w0, W) of one row, scalar: zero the columns, then place each value at its set bit
// (padding bits past K still own values in order, as in bm_scalar).
template <typename VT>
void bm_decompress_tail(const BmArgs& a, const uint32_t* bits, int64_t w0, const VT* p, VT* dst) {
  std::fill(dst + 32 * w0, dst + a.K, VT(0));
  for (int64_t w = w0; w < a.W; ++w) {
    uint32_t b = bits[w];
    const uint32_t keep = valid_bits(a, w);
    const uint32_t rest = b & ~keep;
    b &= keep;
    while (b) {
      dst[32 * w + __builtin_ctz(b)] = *p++;
      b &= b - 1;
    }
    p += __builtin_popcount(rest);
  }
}

#if LACO_X86
#include "bitmap_avx512.inc"  // bm_avx512, bm_rows_m1_avx512, bm_avx512bf16, bm_run_bf16_blocked
#include "bitmap_avx2.inc"    // LaneTable, bm_avx2, bm_decompress_avx2
#endif  // LACO_X86

template <typename VT, int MB>
void bm_block(Isa isa, const BmArgs& a, int64_t n, int64_t m0, int64_t w0, int64_t w1, const VT* p, float* out) {
#if LACO_X86
  if constexpr (std::is_same_v<VT, uint16_t>) {
    if (isa >= Isa::kAvx512Bf16 && a.x16) {
      if (row_ends_before(a, n, 32)) return bm_avx512bf16<MB, true>(a, n, m0, w0, w1, p, out);
      return bm_avx512bf16<MB>(a, n, m0, w0, w1, p, out);
    }
  }
  if (isa >= Isa::kAvx512) {
    if (row_ends_before(a, n, 16)) return bm_avx512<VT, MB, true>(a, n, m0, w0, w1, p, out);
    return bm_avx512<VT, MB>(a, n, m0, w0, w1, p, out);
  }
  if (isa == Isa::kAvx2) return bm_avx2<VT, MB>(a, n, m0, w0, w1, p, out);
#endif
  bm_scalar<VT>(a, n, m0, MB, w0, w1, p, out);
}

template <typename VT>
void bm_dispatch_mb(Isa isa, int mb, const BmArgs& a, int64_t n, int64_t m0, int64_t w0, int64_t w1, const VT* p,
                    float* out) {
  switch (mb) {
    case 1: return bm_block<VT, 1>(isa, a, n, m0, w0, w1, p, out);
    case 2: return bm_block<VT, 2>(isa, a, n, m0, w0, w1, p, out);
    case 3: return bm_block<VT, 3>(isa, a, n, m0, w0, w1, p, out);
    case 4: return bm_block<VT, 4>(isa, a, n, m0, w0, w1, p, out);
    case 5: return bm_block<VT, 5>(isa, a, n, m0, w0, w1, p, out);
    case 6: return bm_block<VT, 6>(isa, a, n, m0, w0, w1, p, out);
    case 7: return bm_block<VT, 7>(isa, a, n, m0, w0, w1, p, out);
    default: return bm_block<VT, 8>(isa, a, n, m0, w0, w1, p, out);
  }
}

std::atomic<int64_t> g_bm_block_min_m{-1};

}  // namespace

// M range [bitmap_block_min_m(), bitmap_block_max_m(K, density)) that runs bm_run_bf16_blocked (bf16 x at
// the AVX512_BF16 ISA, on the direct path). M = 1 keeps the one-row kernel (one weight stream, tuned
// prefetch). Measured on the Zen 4 EPYC (stop 42, forced, 7-15 rounds interleaved, docs/cpu_kernels.md):
// SmolLM2 shapes M = 2-8 blocked 1.30-1.66x the one-row kernel's speed (1.56-2.22x at M = 16-64); 7B M = 2
// 1.28-1.57x, M = 4 1.05-1.18x except 4096x11008 at 50% (0.95x / 0.83x, one / two threads; K = 11008 runs in
// K-blocks): the one-row kernel from M = 4 where K >= 8192 and the density is above 0.4.
int64_t bitmap_block_min_m() {
  const int64_t o = g_bm_block_min_m.load();
  return o >= 0 ? o : 2;
}

int64_t bitmap_block_max_m(int64_t K, double density) {
  if (g_bm_block_min_m.load() >= 0) return int64_t{1} << 62;  // a forced threshold: no upper bound
  return K >= 8192 && density > 0.4 ? 4 : int64_t{1} << 62;
}

void set_bitmap_block_min_m(int64_t m) { g_bm_block_min_m = m; }

namespace {

template <typename VT>
void bm_run(BmArgs a, const float* bias, float* y) {
  const Isa isa = active_isa();
  // whole tiles per K-block, so offsets give each block's start in values
  // (weights of 16 MB and more with a small x: whole rows, read_whole_rows in laco_cpu.h)
  const int64_t kb = read_whole_rows(a.M, a.N, a.K, sizeof(VT), a.x16 ? 2 : 4) ? a.K
                                                                    : linear_k_block(std::min<int64_t>(a.M, kMaxMB), a.K, a.tile_k);
  a.pf_next_row = kb < a.K;
  const int64_t grain = linear_row_grain(a.M, a.K);
  const VT* values = static_cast<const VT*>(a.values);
#if LACO_X86
  // M = 1, whole rows: four rows at a time from the four quarters of the thread's rows (bm_rows_m1_avx512 /
  // bm_rows_m1_avx2), each one sequential stream. Zen 4 EPYC (stop 36), one thread, 70% sparse 7B shapes,
  // each call on cold caches, against the one-row kernels: AVX-512 fp32 1.34-1.59x faster (2.64-2.68x
  // over F.linear, bench/results/native_ab_zen4_m1_streams_bitmap_linear.json), bf16 widened (ISA capped at
  // avx512) 2.07-2.21x -> 2.51-2.67x over F.linear; AVX2 fp32 (capped) 1.64-1.70x -> 2.03-2.18x. AVX2 bf16 was
  // slower on four rows while it widened each value (1.87-2.09x -> 1.70-1.83x); with one vpshufb per 8 columns
  // (stop 45, bf16_widen_table) four rows took it on 7B shapes from 1.81-2.10x to 2.16-2.56x (bench/results/
  // native_ab_zen4_avx2_bitmap_stop45.json). Eight rows were slower on AVX2 (fp32 1.82-2.03x, bf16 1.96-2.13x).
  // bf16 with AVX512_BF16 keeps bm_avx512bf16 (2.8x already). Also: the AVX-512 kernel loads 16 values
  // unmasked (the mask arithmetic was a third of the one-row loop's ~37 instructions a word).
  if (a.M == 1 && kb == a.K && isa >= Isa::kAvx2 &&
      !(std::is_same_v<VT, uint16_t> && isa >= Isa::kAvx512Bf16 && a.x16)) {
    constexpr int R = 4;
    const bool z = isa >= Isa::kAvx512;
    const int64_t pf = prefetch_bytes(LinearOp::kBitmap) / R;
    auto one_row = [&](int64_t row, float* out) {
      *out = 0.f;
      bm_block<VT, 1>(isa, a, row, 0, 0, a.W, values + a.offsets[row * a.T], out);
    };
    at::parallel_for(0, a.N, grain, [&](int64_t n0, int64_t n1) {
      float part[R];
      const int64_t q = (n1 - n0) / R;
      for (int64_t i = 0; i < q; ++i) {
        // the unmasked loads (AVX-512 16 wide, AVX2 8 wide) read up to 16 values past a row's end; the
        // group's last row decides for all four
        const bool ok = row_ends_before(a, n0 + i + (R - 1) * q, 16);
        if (z && ok) bm_rows_m1_avx512<VT, R, true>(a, n0 + i, q, pf, part);
        else if (z) bm_rows_m1_avx512<VT, R, false>(a, n0 + i, q, pf, part);
        else if (ok) bm_rows_m1_avx2<VT, R>(a, n0 + i, q, pf, part);
        else for (int r = 0; r < R; ++r) one_row(n0 + i + r * q, part + r);
        for (int r = 0; r < R; ++r) y[n0 + i + r * q] = (bias ? bias[n0 + i + r * q] : 0.f) + part[r];
      }
      for (int64_t n = n0 + R * q; n < n1; ++n) {  // the last rows of the range, one at a time
        one_row(n, part);
        y[n] = (bias ? bias[n] : 0.f) + part[0];
      }
    });
    return;
  }
#endif
  at::parallel_for(0, a.N, grain, [&](int64_t n0, int64_t n1) {
    float part[kMaxMB];
    for (int64_t k0 = 0; k0 < a.K; k0 += kb) {
      const int64_t w0 = k0 / 32, w1 = (std::min(a.K, k0 + kb) + 31) / 32;
      for (int64_t m0 = 0; m0 < a.M; m0 += kMaxMB) {
        const int mb = static_cast<int>(std::min<int64_t>(kMaxMB, a.M - m0));
        for (int64_t n = n0; n < n1; ++n) {
          std::fill(part, part + mb, 0.f);
          bm_dispatch_mb<VT>(isa, mb, a, n, m0, w0, w1, values + a.offsets[n * a.T + k0 / a.tile_k], part);
          for (int i = 0; i < mb; ++i) {
            float& dst = y[(m0 + i) * a.N + n];
            dst = (k0 == 0 ? (bias ? bias[n] : 0.f) : dst) + part[i];
          }
        }
      }
    }
  });
}


// ---- decompression into a dense panel (the panel path, csrc/panel.cpp) ----------------------------
#if LACO_X86
template <typename VT>
LACO_AVX512 void bm_decompress_avx512(const BmArgs& a, const uint32_t* bits, const VT* p, VT* dst) {
  const int64_t wf = a.K / 32;
  for (int64_t w = 0; w < wf; ++w) {
    const uint32_t b = bits[w];
    if constexpr (std::is_same_v<VT, float>) {
      _mm512_storeu_ps(dst + 32 * w, _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(b), p));
      p += __builtin_popcount(b & 0xffffu);
      _mm512_storeu_ps(dst + 32 * w + 16, _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(b >> 16), p));
      p += __builtin_popcount(b >> 16);
    } else {  // bf16 bits without VBMI2: widen, expand as 32-bit lanes, narrow back
      for (int h = 0; h < 2; ++h) {
        const uint32_t bh = (b >> (16 * h)) & 0xffffu;
        const int c = __builtin_popcount(bh);
        const __m512i packed = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << c) - 1u), p));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32 * w + 16 * h),
                            _mm512_cvtepi32_epi16(_mm512_maskz_expand_epi32(static_cast<__mmask16>(bh), packed)));
        p += c;
      }
    }
  }
  bm_decompress_tail<VT>(a, bits, wf, p, dst);
}

LACO_AVX512BF16 void bm_decompress_bf16(const BmArgs& a, const uint32_t* bits, const uint16_t* p, uint16_t* dst) {
  const int64_t wf = a.K / 32;
  for (int64_t w = 0; w < wf; ++w) {
    const uint32_t b = bits[w];
    _mm512_storeu_si512(dst + 32 * w, _mm512_maskz_expandloadu_epi16(static_cast<__mmask32>(b), p));
    p += __builtin_popcount(b);
  }
  bm_decompress_tail<uint16_t>(a, bits, wf, p, dst);
}

// The lanes kernel's panel (LanesPanelFill, laco_cpu.h) straight from the bitmap: per 16-row half and 32-column
// word, each row's word is expanded into a register (its 16 bf16 pairs), the 16 registers are transposed (then
// register c holds pair c of the 16 rows) and stored. No row buffer: stop 44 decompressed 32 whole rows into a
// [32, K] buffer first, an extra store and load per 16 pairs that left L1 on 7B rows.
// Each row's values are prefetched this far ahead: 16 rows advance one 32-column word at a time, too many short
// streams for the hardware prefetchers on a 7B weight. Forced lanes on 11008x4096 and 4096x11008 (one thread,
// M = 1-32, over F.linear): no prefetch 0.68-0.95x, 2048 bytes 0.77-1.22x, 1024 0.82-1.39x, 512 0.97-1.48x, 256
// 0.97-1.55x (stop 45).
constexpr int64_t kLanesPfBytes = 256;
LACO_AVX512BF16 void bm_lanes_panel_bf16(const BmArgs& a, int64_t n0, int64_t nrows, int64_t p0, int64_t pc,
                                        int64_t* cursor, uint32_t* pan) {
  const uint16_t* values = static_cast<const uint16_t*>(a.values);
  const int64_t w0 = p0 / 16, w1 = (2 * (p0 + pc) + 31) / 32;  // p0: a multiple of 16 pairs (one word)
  if (p0 == 0) {
    for (int64_t i = 0; i < nrows; ++i) cursor[i] = a.offsets[(n0 + i) * a.T];
  }
  for (int64_t v = 0; v * 16 < nrows; ++v) {
    const int64_t nr = std::min<int64_t>(16, nrows - 16 * v);
    const uint32_t* bits = a.bitmap + (n0 + 16 * v) * a.W;
    int64_t* cur = cursor + 16 * v;
    for (int64_t w = w0; w < w1; ++w) {
      // padding bits past K own no value read here: the last word's values end the row
      const uint32_t keep = valid_bits(a, w);
      __m512i r[16];
      for (int64_t i = 0; i < 16; ++i) {
        if (i < nr) {
          const uint32_t b = bits[i * a.W + w] & keep;
          _mm_prefetch(reinterpret_cast<const char*>(values + cur[i]) + kLanesPfBytes, _MM_HINT_T0);
          if ((w & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(bits + i * a.W + w + 16), _MM_HINT_T0);
          r[i] = _mm512_maskz_expandloadu_epi16(static_cast<__mmask32>(b), values + cur[i]);
          cur[i] += __builtin_popcount(b);
        } else {
          r[i] = _mm512_setzero_si512();
        }
      }
      transpose16x16_epi32(r);
      uint32_t* dst = pan + ((w - w0) * 16 * 2 + v) * 16;
      for (int c = 0; c < 16; ++c) _mm512_store_si512(dst + c * 2 * 16, r[c]);
    }
  }
}

// The fp32 lanes kernel's panel (LanesPanelFill with fp32 columns for pairs: c0 a multiple of 32, pan[(c * 2 + v) * 16
// + i] = w[n0 + 16 v + i, c0 + c]) straight from the bitmap, 16 columns (a half word) at a time: each row's 16 values
// expanded into a register, the 16 registers transposed and stored. Stop 47: the panel came from 32 whole rows
// decompressed into a [32, K] buffer and transposed from there (bm_decompress_avx512 + fill_dword_panel: 38% of the
// lanes call at M = 16 on 576 x 1536). The loop is bm_lanes_panel_bf16's over half words; it stays a function of its
// own because that one needs AVX512_VBMI2 (vpexpandw) and this one runs on any AVX-512 CPU.
LACO_AVX512 void bm_lanes_panel_f32(const BmArgs& a, int64_t n0, int64_t nrows, int64_t c0, int64_t cc, int64_t* cursor,
                                    uint32_t* pan) {
  const float* values = static_cast<const float*>(a.values);
  const int64_t h0 = c0 / 16, h1 = (c0 + cc + 15) / 16;  // half words
  if (c0 == 0) {
    for (int64_t i = 0; i < nrows; ++i) cursor[i] = a.offsets[(n0 + i) * a.T];
  }
  for (int64_t v = 0; v * 16 < nrows; ++v) {
    const int64_t nr = std::min<int64_t>(16, nrows - 16 * v);
    const uint32_t* bits = a.bitmap + (n0 + 16 * v) * a.W;
    int64_t* cur = cursor + 16 * v;
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t w = h / 2;
      const unsigned shift = static_cast<unsigned>(16 * (h & 1));
      const uint32_t keep = (valid_bits(a, w) >> shift) & 0xffffu;  // no value is read for the padding past K
      __m512i r[16];
      for (int64_t i = 0; i < 16; ++i) {
        if (i < nr) {
          const uint32_t b = (bits[i * a.W + w] >> shift) & keep;
          _mm_prefetch(reinterpret_cast<const char*>(values + cur[i]) + kLanesPfBytes, _MM_HINT_T0);
          if ((h & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(bits + i * a.W + w + 16), _MM_HINT_T0);
          r[i] = _mm512_castps_si512(_mm512_maskz_expandloadu_ps(static_cast<__mmask16>(b), values + cur[i]));
          cur[i] += __builtin_popcount(b);
        } else {
          r[i] = _mm512_setzero_si512();
        }
      }
      transpose16x16_epi32(r);
      uint32_t* dst = pan + ((h - h0) * 16 * 2 + v) * 16;
      for (int c = 0; c < 16; ++c) _mm512_store_si512(dst + c * 2 * 16, r[c]);
    }
  }
}
#endif

// Dense rows [r0, r1) of the weight into dst ([r1 - r0, K], VT).
template <typename VT>
void bm_decompress_rows(Isa isa, const BmArgs& a, int64_t r0, int64_t r1, VT* dst) {
  const VT* values = static_cast<const VT*>(a.values);
  for (int64_t n = r0; n < r1; ++n, dst += a.K) {
    const uint32_t* bits = a.bitmap + n * a.W;
    const VT* p = values + a.offsets[n * a.T];
#if LACO_X86
    if constexpr (std::is_same_v<VT, uint16_t>) {
      if (isa >= Isa::kAvx512Bf16) {
        bm_decompress_bf16(a, bits, p, dst);
        continue;
      }
    }
    if (isa >= Isa::kAvx512) {
      bm_decompress_avx512<VT>(a, bits, p, dst);
      continue;
    }
    if (isa == Isa::kAvx2) {
      bm_decompress_avx2<VT>(a, bits, p, dst);
      continue;
    }
#endif
    bm_decompress_tail<VT>(a, bits, 0, p, dst);
  }
}

#if LACO_X86
// Kept columns of row n in [k0, k1) for the outer-product kernel (outer_linear.cpp); k0 is a multiple of
// tile_k, so the row's values from k0 on start at offsets[n, k0 / tile_k]. 16 columns per step: the set
// bits select lanes of (c + lane) * mp by a register compress.
template <typename VT>
LACO_AVX512 Decoded bm_outer_decode(const BmArgs& a, int64_t n, int64_t k0, int64_t k1, int64_t mp, int32_t* off,
                                    float* vals) {
  const uint32_t* bits = a.bitmap + n * a.W;
  const int64_t vi = a.offsets[n * a.T + k0 / a.tile_k];
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i vmp = _mm512_set1_epi32(static_cast<int>(mp));
  int64_t j = 0;
  for (int64_t c = k0; c < k1; c += 16) {
    uint32_t m16 = (bits[c >> 5] >> (c & 31)) & 0xFFFFu;
    if (c + 16 > k1) m16 &= (1u << (k1 - c)) - 1u;
    const __m512i idx = _mm512_mullo_epi32(_mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(c))), vmp);
    _mm512_storeu_si512(off + j, _mm512_maskz_compress_epi32(static_cast<__mmask16>(m16), idx));
    j += __builtin_popcount(m16);
  }
  if constexpr (std::is_same_v<VT, float>) {
    return {j, static_cast<const float*>(a.values) + vi};
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(a.values) + vi;
    for (int64_t i = 0; i < j; ++i) vals[i] = bf16_to_f32(p[i]);
    return {j, vals};
  }
}
#endif
}  // namespace

at::Tensor bitmap_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmap,
                         const at::Tensor& offsets, int64_t tile_k, const c10::optional<at::Tensor>& bias,
                         int64_t out_features, int64_t in_features) {
  const char* op = "bitmap_linear";
  const int64_t N = out_features, K = in_features;
  TORCH_CHECK(K > 0, op, ": in_features must be positive, got ", K);
  TORCH_CHECK(tile_k > 0 && tile_k % 32 == 0, op, ": tile_k must be a positive multiple of 32, got ", tile_k);
  TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D [nnz], got shape ", values.sizes());
  const int64_t W = (K + 31) / 32, T = (K + tile_k - 1) / tile_k;
  for (const auto& pr : {std::make_pair(&bitmap, "bitmap"), std::make_pair(&offsets, "offsets")}) {
    TORCH_CHECK(pr.first->device().is_cpu() && pr.first->scalar_type() == at::kInt && pr.first->is_contiguous(), op,
                ": ", pr.second, " must be a contiguous CPU int32 tensor");
  }
  TORCH_CHECK(bitmap.dim() == 2 && bitmap.size(0) == N && bitmap.size(1) == W, op, ": bitmap must have shape [", N,
              ", ", W, "], got ", bitmap.sizes());
  TORCH_CHECK(offsets.dim() == 2 && offsets.size(0) == N && offsets.size(1) == T, op,
              ": offsets must have shape [", N, ", ", T, "], got ", offsets.sizes());
  linear_check_x(x, values, K, op);
  at::Tensor b32 = linear_bias_fp32(bias, N, op);
  const int64_t M = x.size(0);
  if (M == 0 || N == 0) return at::empty({M, N}, x.options());
  // A row's values must lie inside the tensor: checked on the offsets of each row's first tile
  // and the total count (a BitmapWeight from from_dense/validate() is consistent).
  const int64_t nnz = values.numel();
  const int32_t* off = offsets.data_ptr<int32_t>();
  TORCH_CHECK(off[0] == 0 && off[(N - 1) * T] <= nnz, op, ": offsets are inconsistent with ", nnz, " values");
  BmArgs a{nullptr, nullptr, values.data_ptr(), reinterpret_cast<const uint32_t*>(bitmap.data_ptr<int32_t>()),
           off, M, N, K, W, T, tile_k, nnz, false};
  const double density = static_cast<double>(nnz) / static_cast<double>(N * K);
  const LinearPath path = linear_path(LinearOp::kBitmap, x.scalar_type(), M, N, K, density);
  if (path == LinearPath::kAmx) {
    const Isa isa = active_isa();
    const char* vbase = static_cast<const char*>(a.values);
    const char* bbase = reinterpret_cast<const char*>(a.bitmap);
    return amx_linear(
        x, bias, N, K,
        [=](int64_t r0, int64_t r1, void* dst) {
          bm_decompress_rows<uint16_t>(isa, a, r0, r1, static_cast<uint16_t*>(dst));
        },
        [=](int64_t r0, int64_t r1, int s) {
          if (s == 1) return std::make_pair(bbase + r0 * a.W * 4, (r1 - r0) * a.W * 4);
          const int64_t v0 = a.offsets[r0 * a.T], v1 = r1 < a.N ? a.offsets[r1 * a.T] : a.nnz;
          return std::make_pair(vbase + v0 * 2, (v1 - v0) * 2);
        });
  }
  if (path == LinearPath::kPair) {
    return bitmap_pair_bf16(x, b32, values, bitmap, offsets, tile_k, N, K);  // bf16 dot pairs (pair_outer_bf16.cpp)
  }
  if (path == LinearPath::kLanes) {  // features in the lanes (lanes_bf16.cpp: bf16, K even; lanes_fp32.cpp)
#if LACO_X86
    if (values.scalar_type() == at::kFloat) {
      return lanes_dense_fp32(linear_x_fp32(x, values, K, op), b32, N, K,
                              [=](int64_t n0, int64_t nrows, int64_t c0, int64_t cc, int64_t* cursor, uint32_t* pan) {
                                bm_lanes_panel_f32(a, n0, nrows, c0, cc, cursor, pan);
                              });
    }
    return lanes_dense_bf16(x, b32, N, K, [=](int64_t n0, int64_t nrows, int64_t p0, int64_t pc, int64_t* cursor,
                                              uint32_t* pan) { bm_lanes_panel_bf16(a, n0, nrows, p0, pc, cursor, pan); });
#endif
  }
  if (path == LinearPath::kPanel) {
    const Isa isa = active_isa();
    if (values.scalar_type() == at::kFloat) {
      return panel_linear(x, bias, N, K, [=](int64_t r0, int64_t r1, void* dst) {
        bm_decompress_rows<float>(isa, a, r0, r1, static_cast<float*>(dst));
      });
    }
    return panel_linear(x, bias, N, K, [=](int64_t r0, int64_t r1, void* dst) {
      bm_decompress_rows<uint16_t>(isa, a, r0, r1, static_cast<uint16_t*>(dst));
    });
  }
#if LACO_X86
  if (path == LinearPath::kDirect && x.scalar_type() == at::kBFloat16 && values.scalar_type() == at::kBFloat16 &&
      active_isa() >= Isa::kAvx512Bf16 && M >= bitmap_block_min_m() && M < bitmap_block_max_m(K, density)) {
    at::Tensor x16 = x.contiguous();
    a.x16 = reinterpret_cast<const uint16_t*>(x16.data_ptr());
    at::Tensor y = at::empty({M, N}, x.options());
    bm_run_bf16_blocked(a, b32.defined() ? b32.data_ptr<float>() : nullptr, reinterpret_cast<uint16_t*>(y.data_ptr()));
    return y;
  }
#endif
  at::Tensor x32 = linear_x_fp32(x, values, K, op);
#if LACO_X86
  if (path == LinearPath::kOuter) {
    if (values.scalar_type() == at::kFloat) {
      return outer_linear(x32, b32, N, K, tile_k, x.scalar_type(), [=](int64_t n, int64_t k0, int64_t k1, int64_t mp,
                                                                       int32_t* off, float* vals) {
        return bm_outer_decode<float>(a, n, k0, k1, mp, off, vals);
      });
    }
    return outer_linear(x32, b32, N, K, tile_k, x.scalar_type(), [=](int64_t n, int64_t k0, int64_t k1, int64_t mp,
                                                                     int32_t* off, float* vals) {
      return bm_outer_decode<uint16_t>(a, n, k0, k1, mp, off, vals);
    });
  }
#endif
  at::Tensor y = at::empty({M, N}, x32.options());
  at::Tensor x16 = x.scalar_type() == at::kBFloat16 ? x.contiguous() : at::Tensor();
  a.x = x32.data_ptr<float>();
  a.x16 = x16.defined() ? reinterpret_cast<const uint16_t*>(x16.data_ptr()) : nullptr;
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  if (values.scalar_type() == at::kFloat) {
    bm_run<float>(a, bp, y.data_ptr<float>());
    return y;
  }
  bm_run<uint16_t>(a, bp, y.data_ptr<float>());
  return y.to(at::kBFloat16);
}

at::Tensor bitmap_to_dense(const at::Tensor& values, const at::Tensor& bitmap, const at::Tensor& offsets, int64_t tile_k,
                           int64_t out_features, int64_t in_features) {
  const int64_t N = out_features, K = in_features, W = (K + 31) / 32;
  TORCH_CHECK(K > 0 && tile_k > 0 && tile_k % 32 == 0, "bitmap_to_dense: bad K or tile_k");
  const int64_t T = (K + tile_k - 1) / tile_k;
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous() &&
                  (values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16),
              "bitmap_to_dense: values must be contiguous 1-D fp32 / bf16");
  TORCH_CHECK(bitmap.scalar_type() == at::kInt && bitmap.is_contiguous() && bitmap.dim() == 2 && bitmap.size(0) == N &&
                  bitmap.size(1) == W, "bitmap_to_dense: bitmap must be contiguous int32 [", N, ", ", W, "]");
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.is_contiguous() && offsets.dim() == 2 &&
                  offsets.size(0) == N && offsets.size(1) == T, "bitmap_to_dense: offsets must be contiguous int32 [", N,
              ", ", T, "]");
  at::Tensor out = at::empty({N, K}, values.options());
  if (N == 0) return out;
  const int32_t* off = offsets.data_ptr<int32_t>();
  TORCH_CHECK(off[0] == 0 && off[(N - 1) * T] <= values.numel(), "bitmap_to_dense: offsets are inconsistent with ",
              values.numel(), " values");
  BmArgs a{nullptr, nullptr, values.data_ptr(), reinterpret_cast<const uint32_t*>(bitmap.data_ptr<int32_t>()), off,
           0, N, K, W, T, tile_k, values.numel(), false};
  const Isa isa = active_isa();
  at::parallel_for(0, N, std::max<int64_t>(1, (int64_t{256} << 10) / (K * 4)), [&](int64_t r0, int64_t r1) {
    if (values.scalar_type() == at::kFloat) {
      bm_decompress_rows<float>(isa, a, r0, r1, out.data_ptr<float>() + r0 * K);
    } else {
      bm_decompress_rows<uint16_t>(isa, a, r0, r1, reinterpret_cast<uint16_t*>(out.data_ptr()) + r0 * K);
    }
  });
  return out;
}

}  // namespace laco
