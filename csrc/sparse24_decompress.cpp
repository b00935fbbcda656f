// Decompression of a 2:4 weight into dense rows: the panel path (csrc/panel.cpp), the AMX tiles
// (csrc/amx_linear.cpp) and sparse24_to_dense (the CPU backward, laco_kernels/_native.py). Split from
// sparse24_linear.cpp (the linear's direct kernels and its dispatch) to keep files short.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>

#include "laco_cpu.h"

namespace laco {
namespace {

// ---- decompression into a dense panel (the panel path, csrc/panel.cpp) ----------------------------
// Kept columns of one meta byte (two groups): bit c set when column c (0..7) holds a value. Positions
// are sorted (i0 < i1, a format invariant checked by from_dense / validate), so the values of a word, in
// order, land on its set bits in order: an expand-load.
struct KeptMaskTable {
  std::array<uint8_t, 256> m;
  KeptMaskTable() {
    for (int b = 0; b < 256; ++b) {
      int v = 0;
      for (int g = 0; g < 2; ++g) {
        const int nib = (b >> (4 * g)) & 0xF;
        v |= ((1 << (nib & 3)) | (1 << (nib >> 2))) << (4 * g);
      }
      m[b] = static_cast<uint8_t>(v);
    }
  }
};
const KeptMaskTable& kept_mask_table() {
  static const KeptMaskTable t;
  return t;
}

LACO_INLINE uint32_t kept_mask32(uint32_t word, const uint8_t* lut) {
  return static_cast<uint32_t>(lut[word & 0xffu]) | static_cast<uint32_t>(lut[(word >> 8) & 0xffu]) << 8 |
         static_cast<uint32_t>(lut[(word >> 16) & 0xffu]) << 16 | static_cast<uint32_t>(lut[word >> 24]) << 24;
}

// Groups [g0, K/4) of row n, scalar: zero the columns, then place both values of each group.
template <typename VT>
void s24_decompress_tail(const VT* v, const uint32_t* meta, int64_t g0, int64_t K, VT* dst) {
  std::fill(dst + 4 * g0, dst + K, VT(0));
  for (int64_t g = g0; g < K / 4; ++g) {
    const uint32_t nib = (meta[g >> 3] >> (4 * (g & 7))) & 0xFu;
    dst[4 * g + (nib & 3u)] = v[2 * g];
    dst[4 * g + (nib >> 2)] = v[2 * g + 1];
  }
}

#if LACO_X86
template <typename VT>
LACO_AVX512 void s24_decompress_avx512(const VT* v, const uint32_t* meta, int64_t K, VT* dst) {
  const uint8_t* lut = kept_mask_table().m.data();
  const int64_t wf = K / 32;
  for (int64_t w = 0; w < wf; ++w) {
    const uint32_t km = kept_mask32(meta[w], lut);
    if constexpr (std::is_same_v<VT, float>) {
      // each 16-column half holds exactly 8 values (2 per group)
      _mm512_storeu_ps(dst + 32 * w, _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(km), v + 16 * w));
      _mm512_storeu_ps(dst + 32 * w + 16, _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(km >> 16), v + 16 * w + 8));
    } else {  // bf16 bits without VBMI2: expand as 32-bit lanes, narrow back
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + 16 * w))));
      const __m512i hi = _mm512_cvtepu16_epi32(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + 16 * w + 8))));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32 * w),
                          _mm512_cvtepi32_epi16(_mm512_maskz_expand_epi32(static_cast<__mmask16>(km), lo)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32 * w + 16),
                          _mm512_cvtepi32_epi16(_mm512_maskz_expand_epi32(static_cast<__mmask16>(km >> 16), hi)));
    }
  }
  s24_decompress_tail<VT>(v, meta, 8 * wf, K, dst);
}

// AVX2: one meta byte (2 groups, 8 columns, 4 values) per step. The 4 values go to the kept columns in
// order (a format invariant), so lane c takes value rank(c) = popcount(kept & ((1 << c) - 1)): one
// permute and one AND with the kept-lane mask; bf16 bits ride in 32-bit lanes, packed back on store.
struct RankTable {
  alignas(32) int32_t idx[256][8];
  RankTable() {
    for (int b = 0; b < 256; ++b)
      for (int c = 0; c < 8; ++c) idx[b][c] = __builtin_popcount(static_cast<unsigned>(b) & ((1u << c) - 1u)) & 7;
  }
};

template <typename VT>
LACO_AVX2 void s24_decompress_avx2(const VT* v, const uint32_t* meta, int64_t K, VT* dst) {
  static const RankTable rank;
  const uint8_t* lut = kept_mask_table().m.data();
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const int64_t wf = K / 32;
  for (int64_t w = 0; w < wf; ++w) {
    const uint32_t word = meta[w];
    for (int q = 0; q < 4; ++q) {
      const uint32_t km = lut[(word >> (8 * q)) & 0xffu];
      const VT* p = v + 16 * w + 4 * q;
      __m256i packed;
      if constexpr (std::is_same_v<VT, float>) {
        packed = _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      } else {
        packed = _mm256_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
      }
      const __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(km)), lane_bit), lane_bit);
      const __m256i pi = _mm256_load_si256(reinterpret_cast<const __m256i*>(rank.idx[km]));
      const __m256i r = _mm256_and_si256(_mm256_permutevar8x32_epi32(packed, pi), on);
      VT* d = dst + 32 * w + 8 * q;
      if constexpr (std::is_same_v<VT, float>) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), r);
      } else {  // lanes hold 0..65535: the unsigned-saturating pack is exact
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
      }
    }
  }
  s24_decompress_tail<VT>(v, meta, 8 * wf, K, dst);
}

LACO_AVX512BF16 void s24_decompress_bf16(const uint16_t* v, const uint32_t* meta, int64_t K, uint16_t* dst) {
  const uint8_t* lut = kept_mask_table().m.data();
  const int64_t wf = K / 32;
  // Four meta words (128 columns) per step: their kept masks come from one 16-entry byte table (nibble ->
  // the 4-bit mask of its group; nibble = i0 | i1 << 2, i0 < i1) applied with pshufb to the low and high nibbles of the 16 meta bytes,
  // instead of 16 scalar table loads (the scalar version ran at ~11 GB/s of dense output, which made the
  // decompression, not the memory stream, the cost of the AMX path on 7B shapes).
  const __m128i nib_lut = _mm_setr_epi8(0, 0, 0, 0, 0x3, 0, 0, 0, 0x5, 0x6, 0, 0, 0x9, 0xA, 0xC, 0);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  int64_t w = 0;
  for (; w + 4 <= wf; w += 4) {
    const __m128i mb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(meta + w));
    const __m128i lo = _mm_shuffle_epi8(nib_lut, _mm_and_si128(mb, low4));
    const __m128i hi = _mm_shuffle_epi8(nib_lut, _mm_and_si128(_mm_srli_epi16(mb, 4), low4));
    const __m128i km = _mm_or_si128(lo, _mm_slli_epi16(hi, 4));
    const uint64_t k01 = static_cast<uint64_t>(_mm_cvtsi128_si64(km));
    const uint64_t k23 = static_cast<uint64_t>(_mm_extract_epi64(km, 1));
    const uint32_t kms[4] = {static_cast<uint32_t>(k01), static_cast<uint32_t>(k01 >> 32), static_cast<uint32_t>(k23),
                             static_cast<uint32_t>(k23 >> 32)};
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512i vals =
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 16 * (w + j))));
      _mm512_storeu_si512(dst + 32 * (w + j), _mm512_maskz_expand_epi16(static_cast<__mmask32>(kms[j]), vals));
    }
  }
  for (; w < wf; ++w) {
    const uint32_t km = kept_mask32(meta[w], lut);
    // register-form expand of a 32-byte load: the memory form (expand-load) is microcoded on Intel cores
    const __m512i vals = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 16 * w)));
    _mm512_storeu_si512(dst + 32 * w, _mm512_maskz_expand_epi16(static_cast<__mmask32>(km), vals));
  }
  s24_decompress_tail<uint16_t>(v, meta, 8 * wf, K, dst);
}
#endif

}  // namespace

// Dense rows [r0, r1) of the weight into dst ([r1 - r0, K], VT).
template <typename VT>
void s24_decompress_rows(Isa isa, const VT* values, const uint32_t* meta, int64_t K, int64_t W, int64_t r0,
                         int64_t r1, VT* dst) {
  for (int64_t n = r0; n < r1; ++n, dst += K) {
    const VT* v = values + n * (K / 2);
    const uint32_t* mt = meta + n * W;
#if LACO_X86
    if constexpr (std::is_same_v<VT, uint16_t>) {
      if (isa >= Isa::kAvx512Bf16) {
        s24_decompress_bf16(v, mt, K, dst);
        continue;
      }
    }
    if (isa >= Isa::kAvx512) {
      s24_decompress_avx512<VT>(v, mt, K, dst);
      continue;
    }
    if (isa == Isa::kAvx2) {
      s24_decompress_avx2<VT>(v, mt, K, dst);
      continue;
    }
#endif
    s24_decompress_tail<VT>(v, mt, 0, K, dst);
  }
}

template void s24_decompress_rows<float>(Isa, const float*, const uint32_t*, int64_t, int64_t, int64_t, int64_t,
                                          float*);
template void s24_decompress_rows<uint16_t>(Isa, const uint16_t*, const uint32_t*, int64_t, int64_t, int64_t,
                                             int64_t, uint16_t*);

at::Tensor sparse24_to_dense(const at::Tensor& values, const at::Tensor& meta, int64_t out_features,
                             int64_t in_features) {
  const int64_t N = out_features, K = in_features, W = (K / 4 + 7) / 8;
  TORCH_CHECK(K > 0 && K % 4 == 0 && values.dim() == 2 && values.size(0) == N && values.size(1) == K / 2 &&
                  values.is_contiguous() && (values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16),
              "sparse24_to_dense: values must be contiguous fp32 / bf16 [", N, ", ", K / 2, "]");
  TORCH_CHECK(meta.scalar_type() == at::kInt && meta.is_contiguous() && meta.dim() == 2 && meta.size(0) == N &&
                  meta.size(1) == W, "sparse24_to_dense: meta must be contiguous int32 [", N, ", ", W, "]");
  at::Tensor out = at::empty({N, K}, values.options());
  const Isa isa = active_isa();
  const uint32_t* mp = reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>());
  at::parallel_for(0, N, std::max<int64_t>(1, (int64_t{256} << 10) / (K * 4)), [&](int64_t r0, int64_t r1) {
    if (values.scalar_type() == at::kFloat) {
      s24_decompress_rows<float>(isa, values.data_ptr<float>(), mp, K, W, r0, r1, out.data_ptr<float>() + r0 * K);
    } else {
      s24_decompress_rows<uint16_t>(isa, reinterpret_cast<const uint16_t*>(values.data_ptr()), mp, K, W, r0, r1,
                                    reinterpret_cast<uint16_t*>(out.data_ptr()) + r0 * K);
    }
  });
  return out;
}

}  // namespace laco
