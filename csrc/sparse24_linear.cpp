// y[M, N] = x[M, K] @ dense(W24)^T + bias on the CPU, reading only the packed 2:4 weight.
//
// Layout (laco_kernels/formats.py): values [N, K/2] (fp32 or bf16), meta int32 [N, ceil(K/32)];
// meta word w of row n holds groups 8w..8w+7 (4 bits each: i0 | i1 << 2), i.e. dense columns
// 32w..32w+31 and values 16w..16w+15. Value j of a word sits at column 4*(j/2) + ((word >> 2j) & 3),
// so one broadcast, one variable shift, one AND and one ADD turn a meta word into the 16 gather
// indices of an AVX-512 two-source permute of the 32 x values of that word: x is gathered in
// registers and the weights are streamed exactly once (half the bytes of a dense fp32 row + 1/16).
//
// bf16 on CPUs with AVX512_BF16: x stays bf16, a word-permute gathers it and vdpbf16ps adds each
// group's two products into fp32 (s24_avx512bf16); elsewhere bf16 is widened to fp32 in registers.
//
// Parallel over output rows N (each thread streams a contiguous range of weight rows); x rows are
// handled in blocks of up to 8 so each weight vector feeds up to 8 FMAs, and K is blocked so those
// rows stay in L1 (prefetch in software, see prefetch_bytes). Accumulation is fp32; every
// output element is produced by one thread in a fixed order (deterministic for any thread count).
#include <ATen/Parallel.h>

#include <algorithm>

#include "laco_cpu.h"

namespace laco {
namespace {

struct S24Args {
  const float* x;       // [M, K] fp32
  const uint16_t* x16;  // [M, K] bf16 bits when x is bf16 (AVX512_BF16 path), else nullptr
  int64_t pf_bytes;     // software prefetch distance in the values stream (see s24_run)
  const void* values;   // [N, K/2] float or bf16 bits
  const uint32_t* meta; // [N, W]
  int64_t M, N, K, W;
};

constexpr int kMaxMB = 8;  // rows of x per register block (outer_linear.cpp kDirectBlockRows: the same 8)
// Prefetch distance in the values stream when rows are read whole. Measured on an AMD EPYC (Zen 5,
// KVM), M = 1, fp32, 1 thread: 11008x4096 4.4 ms at 2 KB, 3.1 ms at 4 KB; 4096x11008 4.0 ms at
// 2 KB, 3.7 ms at 4-6 KB (~26 GB/s, dense F.linear's rate); 12 KB slower again.
// (the default of prefetch_bytes(LinearOp::kSparse24), common.cpp; set_prefetch_bytes to tune)


// Partial sums over groups [g0, g1) of rows m0..m0+mb of x with weight row n (any ISA's tail).
template <typename VT>
void s24_scalar(const S24Args& a, int64_t n, int64_t m0, int mb, int64_t g0, int64_t g1, float* out) {
  const VT* v = static_cast<const VT*>(a.values) + n * (a.K / 2);
  const uint32_t* meta = a.meta + n * a.W;
  for (int i = 0; i < mb; ++i) {
    const float* xr = a.x + (m0 + i) * a.K;
    float s0 = 0.f, s1 = 0.f;
    for (int64_t g = g0; g < g1; ++g) {
      const uint32_t nib = (meta[g >> 3] >> (4 * (g & 7))) & 0xFu;
      s0 += to_f32(v[2 * g]) * xr[4 * g + (nib & 3u)];
      s1 += to_f32(v[2 * g + 1]) * xr[4 * g + (nib >> 2)];
    }
    out[i] += s0 + s1;
  }
}

#if LACO_X86
// One meta word (32 columns) of one weight row against MB rows of x.
template <typename VT, int MB>
LACO_AVX512 LACO_INLINE void s24_word_avx512(const VT* v, const uint32_t* meta, const float* x, int64_t K,
                                             int64_t w, __m512* acc, __m512i shifts, __m512i base, __m512i three,
                                             int64_t pf_bytes) {
  _mm_prefetch(reinterpret_cast<const char*>(v + 16 * w) + pf_bytes, _MM_HINT_T0);
  const __m512i word = _mm512_set1_epi32(static_cast<int>(meta[w]));
  const __m512i idx = _mm512_add_epi32(_mm512_and_si512(_mm512_srlv_epi32(word, shifts), three), base);
  const __m512 vv = load16_f32_avx512(v + 16 * w);
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) {
    const float* xr = x + i * K + 32 * w;
    const __m512 g = _mm512_permutex2var_ps(_mm512_loadu_ps(xr), idx, _mm512_loadu_ps(xr + 16));
    acc[i] = _mm512_fmadd_ps(vv, g, acc[i]);
  }
}

// U independent accumulators per x row hide the FMA latency when few rows share a weight vector.
template <typename VT, int MB, int U>
LACO_AVX512 void s24_avx512(const S24Args& a, int64_t n, int64_t m0, int64_t g0, int64_t g1, float* out) {
  const VT* v = static_cast<const VT*>(a.values) + n * (a.K / 2);
  const uint32_t* meta = a.meta + n * a.W;
  const float* x = a.x + m0 * a.K;
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i three = _mm512_set1_epi32(3);
  __m512 acc[U][MB];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < MB; ++i) acc[u][i] = _mm512_setzero_ps();

  const int64_t w0 = g0 / 8, w1 = g1 / 8;  // g0 is a multiple of 8; groups past 8*w1 go scalar
  int64_t w = w0;
  for (; w + U <= w1; w += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) s24_word_avx512<VT, MB>(v, meta, x, a.K, w + u, acc[u], shifts, base, three, a.pf_bytes);
  }
  for (; w < w1; ++w) s24_word_avx512<VT, MB>(v, meta, x, a.K, w, acc[0], shifts, base, three, a.pf_bytes);
  for (int i = 0; i < MB; ++i) {
    __m512 s = acc[0][i];
    for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[u][i]);
    out[i] += _mm512_reduce_add_ps(s);
  }
  if (8 * w1 < g1) s24_scalar<VT>(a, n, m0, MB, 8 * w1, g1, out);
}

// Values and meta of weight rows n, n + stride, ..., n + (R - 1) * stride (the four-row decode kernels below).
template <typename VT, int R>
LACO_INLINE void s24_row_ptrs(const S24Args& a, int64_t n, const VT* (&v)[R], const uint32_t* (&meta)[R],
                              int64_t stride = 1) {
  for (int r = 0; r < R; ++r) {
    v[r] = static_cast<const VT*>(a.values) + (n + r * stride) * (a.K / 2);
    meta[r] = a.meta + (n + r * stride) * a.W;
  }
}

// M = 1, whole rows: R weight rows at a time, word by word. Why: one row at a time is one sequential
// stream, and its software prefetches (into L1) are capped by the core's fill buffers; R interleaved
// streams let the L2 hardware prefetcher run ahead on each of them, and each x word (two loads) serves
// R rows. Row r's prefetch runs pf_bytes ahead in its own row and, past its end, continues in row r + R
// (the row it will read next), so a new group of rows starts with its first lines already on the way.
template <typename VT, int R>
LACO_AVX512 void s24_rows_m1_avx512(const S24Args& a, int64_t n, float* out, int64_t stride = 1) {
  const int64_t row_bytes = (a.K / 2) * static_cast<int64_t>(sizeof(VT));
  const VT* v[R];
  const uint32_t* meta[R];
  s24_row_ptrs<VT, R>(a, n, v, meta, stride);
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i three = _mm512_set1_epi32(3);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const int64_t w1 = a.K / 32;  // full meta words; the groups past 8 * w1 go scalar
  const int64_t skip = stride == 1 ? (R - 1) * row_bytes : 0;
  for (int64_t w = 0; w < w1; ++w) {
    const __m512 xlo = _mm512_loadu_ps(a.x + 32 * w), xhi = _mm512_loadu_ps(a.x + 32 * w + 16);
    int64_t pf = 16 * w * static_cast<int64_t>(sizeof(VT)) + a.pf_bytes;
    if (pf >= row_bytes) pf += skip;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(v[r]) + pf, _MM_HINT_T0);
      const __m512i word = _mm512_set1_epi32(static_cast<int>(meta[r][w]));
      const __m512i idx = _mm512_add_epi32(_mm512_and_si512(_mm512_srlv_epi32(word, shifts), three), base);
      acc[r] = _mm512_fmadd_ps(load16_f32_avx512(v[r] + 16 * w), _mm512_permutex2var_ps(xlo, idx, xhi), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    out[r] = _mm512_reduce_add_ps(acc[r]);
    if (8 * w1 < a.K / 4) s24_scalar<VT>(a, n + r * stride, 0, 1, 8 * w1, a.K / 4, out + r);
  }
}

// One half meta word (16 columns) of one weight row against MB rows of x.
template <typename VT, int MB>
LACO_AVX2 LACO_INLINE void s24_half_avx2(const VT* v, const uint32_t* meta, const float* x, int64_t K, int64_t h,
                                         __m256* acc, __m256i shifts, __m256i base, __m256i three, int64_t pf_bytes) {
  _mm_prefetch(reinterpret_cast<const char*>(v + 8 * h) + pf_bytes, _MM_HINT_T0);
  const uint32_t half = meta[h >> 1] >> (16 * (h & 1));
  const __m256i idx = _mm256_add_epi32(
      _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(half)), shifts), three), base);
  const __m256 vv = load8_f32_avx2(v + 8 * h);
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) {
    const float* xr = x + i * K + 16 * h;
    // vpermps uses the low 3 index bits: lanes 0-3 pick from the first 8 columns, lanes 4-7 from the next 8
    const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xr), idx);
    const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xr + 8), idx);
    acc[i] = _mm256_fmadd_ps(vv, _mm256_blend_ps(lo, hi, 0xF0), acc[i]);
  }
}

// AVX2 works on half words (4 groups, 16 columns, 8 values): two one-source permutes and a blend.
template <typename VT, int MB, int U>
LACO_AVX2 void s24_avx2(const S24Args& a, int64_t n, int64_t m0, int64_t g0, int64_t g1, float* out) {
  const VT* v = static_cast<const VT*>(a.values) + n * (a.K / 2);
  const uint32_t* meta = a.meta + n * a.W;
  const float* x = a.x + m0 * a.K;
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
  const __m256i three = _mm256_set1_epi32(3);
  __m256 acc[U][MB];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < MB; ++i) acc[u][i] = _mm256_setzero_ps();

  const int64_t h0 = g0 / 4, h1 = g1 / 4;
  int64_t h = h0;
  for (; h + U <= h1; h += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) s24_half_avx2<VT, MB>(v, meta, x, a.K, h + u, acc[u], shifts, base, three, a.pf_bytes);
  }
  for (; h < h1; ++h) s24_half_avx2<VT, MB>(v, meta, x, a.K, h, acc[0], shifts, base, three, a.pf_bytes);
  for (int i = 0; i < MB; ++i) {
    __m256 s = acc[0][i];
    for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[u][i]);
    out[i] += hsum8_avx2(s);
  }
  if (4 * h1 < g1) s24_scalar<VT>(a, n, m0, MB, 4 * h1, g1, out);
}
#endif  // LACO_X86

#if LACO_X86
// AVX2 form of s24_rows_m1_avx512: M = 1, whole rows, R weight rows at a time, a meta word (16 values,
// 32 columns) per step: two index vectors from one broadcast word, four one-source permutes and two
// blends gather x, two FMAs. bf16 values are widened by unpacking against zero (one instruction per 8
// values, no shift), which leaves them in the lane order [0-3, 8-11] / [4-7, 12-15]; the x gather follows
// that order (shifts and sources below), so nothing is reordered back. One prefetch per row per 64 bytes.
// Why: the half-word loop (8 values a step) spent about 15 instructions per 16 bytes of bf16 values,
// and its bf16 decode ran at 7.6 GB/s against dense bf16's 8; a standalone copy of this loop (/tmp probe,
// one thread, Zen 3) ran 1.20-1.34x faster in bf16 and 1.24x in fp32 on cache-resident SmolLM2 weights,
// 1.0-1.07x in fp32 streamed from memory. A half word left at the end of a row (K % 32 >= 16) and the
// groups past it run as before.
// Rows n + r * stride: with stride 1 (adjacent rows) row r's prefetch continues past its end in row r + R,
// the row it reads next; with a larger stride (s24_run's four quarters) in row n + r * stride + 1, which
// follows it in memory, pf_bytes ahead.
template <typename VT, int R>
LACO_AVX2 void s24_rows_m1_avx2(const S24Args& a, int64_t n, float* out, int64_t stride = 1) {
  constexpr bool kBf16 = !std::is_same_v<VT, float>;
  const int64_t row_bytes = (a.K / 2) * static_cast<int64_t>(sizeof(VT));
  const VT* v[R];
  const uint32_t* meta[R];
  s24_row_ptrs<VT, R>(a, n, v, meta, stride);
  // value j of a word takes its column index from bits 2j, 2j+1; columns 4 * (j / 2) + index
  const __m256i shift_a = kBf16 ? _mm256_setr_epi32(0, 2, 4, 6, 16, 18, 20, 22)
                                : _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i shift_b = kBf16 ? _mm256_setr_epi32(8, 10, 12, 14, 24, 26, 28, 30)
                                : _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);  // vpermps reads the low 3 index bits
  const __m256i three = _mm256_set1_epi32(3);
  const __m256i zero = _mm256_setzero_si256();
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const int64_t w1 = a.K / 32;  // full meta words
  const int64_t skip = stride == 1 ? (R - 1) * row_bytes : 0;
  for (int64_t w = 0; w < w1; ++w) {
    const float* xw = a.x + 32 * w;
    const __m256 x0 = _mm256_loadu_ps(xw), x1 = _mm256_loadu_ps(xw + 8);
    const __m256 x2 = _mm256_loadu_ps(xw + 16), x3 = _mm256_loadu_ps(xw + 24);
    int64_t pf = 16 * w * static_cast<int64_t>(sizeof(VT)) + a.pf_bytes;
    if (pf >= row_bytes) pf += skip;
    const bool prefetch = !kBf16 || (w & 1) == 0;  // bf16: 32 bytes a word
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(v[r]) + pf, _MM_HINT_T0);
      const __m256i word = _mm256_set1_epi32(static_cast<int>(meta[r][w]));
      const __m256i ia = _mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(word, shift_a), three), base);
      const __m256i ib = _mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(word, shift_b), three), base);
      __m256 ga, gb, va, vb;
      if constexpr (kBf16) {  // va: values 0-3 | 8-11 (x columns 0-7 | 16-23), vb: 4-7 | 12-15
        ga = _mm256_blend_ps(_mm256_permutevar8x32_ps(x0, ia), _mm256_permutevar8x32_ps(x2, ia), 0xF0);
        gb = _mm256_blend_ps(_mm256_permutevar8x32_ps(x1, ib), _mm256_permutevar8x32_ps(x3, ib), 0xF0);
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v[r] + 16 * w));
        va = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw));
        vb = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));
      } else {  // va: values 0-7 (columns 0-15), vb: 8-15 (columns 16-31)
        ga = _mm256_blend_ps(_mm256_permutevar8x32_ps(x0, ia), _mm256_permutevar8x32_ps(x1, ia), 0xF0);
        gb = _mm256_blend_ps(_mm256_permutevar8x32_ps(x2, ib), _mm256_permutevar8x32_ps(x3, ib), 0xF0);
        va = load8_f32_avx2(v[r] + 16 * w);
        vb = load8_f32_avx2(v[r] + 16 * w + 8);
      }
      acc[r] = _mm256_fmadd_ps(va, ga, acc[r]);
      acc[r] = _mm256_fmadd_ps(vb, gb, acc[r]);
    }
  }
  int64_t g_done = 8 * w1;
  if (a.K / 16 > 2 * w1) {  // one half word left: 8 values, 16 columns, the M > 1 kernels' step
    const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    for (int r = 0; r < R; ++r)
      s24_half_avx2<VT, 1>(v[r], meta[r], a.x, a.K, 2 * w1, &acc[r], shifts, base, three, 0);
    g_done += 4;
  }
  for (int r = 0; r < R; ++r) {
    out[r] = hsum8_avx2(acc[r]);
    if (g_done < a.K / 4) s24_scalar<VT>(a, n + r * stride, 0, 1, g_done, a.K / 4, out + r);
  }
}
#endif  // LACO_X86

#if LACO_X86
// bf16 x and weights: two meta words (16 groups, 64 columns, 32 values) per step. vpermt2w gathers the
// 32 bf16 x of the kept positions from the 64 columns; vdpbf16ps multiplies them with the 32 values and
// adds each group's two products into one fp32 lane. Half the instructions of the fp32 path per value.
template <int MB>
LACO_AVX512BF16 LACO_INLINE void s24_pair_bf16(const uint16_t* v, const uint32_t* meta, const uint16_t* x, int64_t K,
                                               int64_t w, __m512* acc, __m512i shifts, __m512i base,
                                               __m512i three, int64_t pf_bytes) {
  _mm_prefetch(reinterpret_cast<const char*>(v + 16 * w) + pf_bytes, _MM_HINT_T0);
  const __m512i lo = _mm512_add_epi32(
      _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(meta[w])), shifts), three), base);
  const __m512i hi = _mm512_add_epi32(
      _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(meta[w + 1])), shifts), three), base);
  const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(lo)),
                                         _mm512_cvtepi32_epi16(_mm512_add_epi32(hi, _mm512_set1_epi32(32))), 1);
  const __m512i vv = _mm512_loadu_si512(v + 16 * w);
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) {
    const uint16_t* xr = x + i * K + 32 * w;
    const __m512i g = _mm512_permutex2var_epi16(_mm512_loadu_si512(xr), idx, _mm512_loadu_si512(xr + 32));
    acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)vv, (__m512bh)g);
  }
}

template <int MB, int U>
LACO_AVX512BF16 void s24_avx512bf16(const S24Args& a, int64_t n, int64_t m0, int64_t g0, int64_t g1, float* out) {
  const uint16_t* v = static_cast<const uint16_t*>(a.values) + n * (a.K / 2);
  const uint32_t* meta = a.meta + n * a.W;
  const uint16_t* x = a.x16 + m0 * a.K;
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i three = _mm512_set1_epi32(3);
  __m512 acc[U][MB];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < MB; ++i) acc[u][i] = _mm512_setzero_ps();
  const int64_t w0 = g0 / 8, w1 = w0 + (g1 / 8 - w0) / 2 * 2;  // whole pairs of words; the rest goes scalar
  int64_t w = w0;
  for (; w + 2 * U <= w1; w += 2 * U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) s24_pair_bf16<MB>(v, meta, x, a.K, w + 2 * u, acc[u], shifts, base, three, a.pf_bytes);
  }
  for (; w < w1; w += 2) s24_pair_bf16<MB>(v, meta, x, a.K, w, acc[0], shifts, base, three, a.pf_bytes);
  for (int i = 0; i < MB; ++i) {
    __m512 s = acc[0][i];
    for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[u][i]);
    out[i] += _mm512_reduce_add_ps(s);
  }
  if (8 * w1 < g1) s24_scalar<uint16_t>(a, n, m0, MB, 8 * w1, g1, out);
}
#endif

template <typename VT, int MB>
void s24_block(Isa isa, const S24Args& a, int64_t n, int64_t m0, int64_t g0, int64_t g1, float* out) {
  constexpr int U = MB == 1 ? 4 : (MB == 2 ? 2 : 1);
#if LACO_X86
  if constexpr (std::is_same_v<VT, uint16_t>) {
    if (isa >= Isa::kAvx512Bf16 && a.x16) return s24_avx512bf16<MB, U>(a, n, m0, g0, g1, out);
  }
  if (isa >= Isa::kAvx512) return s24_avx512<VT, MB, U>(a, n, m0, g0, g1, out);
  if (isa == Isa::kAvx2) return s24_avx2<VT, MB, U>(a, n, m0, g0, g1, out);
#endif
  s24_scalar<VT>(a, n, m0, MB, g0, g1, out);
}

template <typename VT>
void s24_dispatch_mb(Isa isa, int mb, const S24Args& a, int64_t n, int64_t m0, int64_t g0, int64_t g1, float* out) {
  switch (mb) {
    case 1: return s24_block<VT, 1>(isa, a, n, m0, g0, g1, out);
    case 2: return s24_block<VT, 2>(isa, a, n, m0, g0, g1, out);
    case 3: return s24_block<VT, 3>(isa, a, n, m0, g0, g1, out);
    case 4: return s24_block<VT, 4>(isa, a, n, m0, g0, g1, out);
    case 5: return s24_block<VT, 5>(isa, a, n, m0, g0, g1, out);
    case 6: return s24_block<VT, 6>(isa, a, n, m0, g0, g1, out);
    case 7: return s24_block<VT, 7>(isa, a, n, m0, g0, g1, out);
    default: return s24_block<VT, 8>(isa, a, n, m0, g0, g1, out);
  }
}

template <typename VT>
void s24_run(S24Args a, const float* bias, float* y) {
  const Isa isa = active_isa();
  // K-blocks sized so the x rows of one M-block stay in cache while the thread's weight rows stream past
  // (weights of 16 MB and more with a small x: whole rows, read_whole_rows in laco_cpu.h)
  const bool whole = read_whole_rows(a.M, a.N, a.K, sizeof(VT), a.x16 ? 2 : 4);
  const int64_t kb = whole ? a.K : linear_k_block(std::min<int64_t>(a.M, kMaxMB), a.K, 32);  // multiple of 32 unless all of K
  // Software prefetch: the hardware prefetchers of the machines we measured cover the weight stream
  // poorly, so the distance sets the memory-level parallelism. Whole rows: prefetch_bytes(kSparse24) ahead in the one
  // contiguous values stream; K-blocks: the same block of the next row (the stream jumps between rows).
  a.pf_bytes = kb == a.K ? prefetch_bytes(LinearOp::kSparse24) : (a.K / 2) * static_cast<int64_t>(sizeof(VT));
  const int64_t grain = linear_row_grain(a.M, a.K);
#if LACO_X86
  // M = 1, whole rows, fp32 (or bf16 widened) on AVX-512 or AVX2: four rows at a time (s24_rows_m1_avx512 /
  // s24_rows_m1_avx2). First measured on the AMX Xeon, one thread, four adjacent rows against one row at a
  // time: 11008x4096 1.82x over F.linear against 1.32x, 4096x11008 1.74x against 1.16x; two rows 1.62x,
  // eight 1.81x. The four rows now come from the four quarters of the thread's rows (n, n + q, n + 2q,
  // n + 3q), so each is one long sequential stream through its quarter, instead of four adjacent rows
  // (four short streams per group that the hardware prefetcher picks up anew). Each stream prefetches a
  // quarter of prefetch_bytes ahead: the same bytes in flight as one stream. Zen 3 EPYC (AVX2), stop 35:
  // a /tmp probe of this loop (SmolLM2's 210 decoder linears streamed from DRAM, one thread) read
  // 22.3-24.6 GB/s against 13.0-14.3 for adjacent rows; 7B fp32 1.13-1.21x faster (1.96-1.97x over
  // F.linear). Zen 4 EPYC (AVX-512), stop 36, one thread, 7B shapes on cold caches: fp32 1.39x / 1.30x
  // over F.linear -> 1.93x / 1.42x (bench/results/native_ab_zen4_m1_streams_sparse24_linear.json), and
  // with the 1 KB prefetch distance 2.30x / 1.80x (bench/cpu_kernels.py); bf16 widened (ISA capped at
  // avx512) 2.21-2.70x -> 3.19-3.28x, AVX2 (capped) bf16 2.19-2.57x -> 2.80-2.83x. So every ISA and dtype
  // of this path takes quarters (the rows left at the end of a range go one at a time: the same sums).
  if (a.M == 1 && kb == a.K && isa >= Isa::kAvx2 &&
      !(std::is_same_v<VT, uint16_t> && isa >= Isa::kAvx512Bf16 && a.x16)) {
    constexpr int R = 4;
    const bool z = isa >= Isa::kAvx512;
    S24Args aq = a;
    aq.pf_bytes = a.pf_bytes / R;
    at::parallel_for(0, a.N, grain, [&](int64_t n0, int64_t n1) {
      float part[R];
      const int64_t q = (n1 - n0) / R;
      for (int64_t i = 0; i < q; ++i) {
        if (z) s24_rows_m1_avx512<VT, R>(aq, n0 + i, part, q); else s24_rows_m1_avx2<VT, R>(aq, n0 + i, part, q);
        for (int r = 0; r < R; ++r) y[n0 + i + r * q] = (bias ? bias[n0 + i + r * q] : 0.f) + part[r];
      }
      for (int64_t n = n0 + R * q; n < n1; ++n) {  // the last rows of the range, one at a time, in the same
        if (z) s24_rows_m1_avx512<VT, 1>(a, n, part); else s24_rows_m1_avx2<VT, 1>(a, n, part);  // order of
        y[n] = (bias ? bias[n] : 0.f) + part[0];  // sums (any thread split gives the same bits)
      }
    });
    return;
  }
#endif
  at::parallel_for(0, a.N, grain, [&](int64_t n0, int64_t n1) {
    float part[kMaxMB];
    for (int64_t k0 = 0; k0 < a.K; k0 += kb) {
      const int64_t g0 = k0 / 4, g1 = std::min(a.K, k0 + kb) / 4;
      for (int64_t m0 = 0; m0 < a.M; m0 += kMaxMB) {
        const int mb = static_cast<int>(std::min<int64_t>(kMaxMB, a.M - m0));
        for (int64_t n = n0; n < n1; ++n) {
          std::fill(part, part + mb, 0.f);
          s24_dispatch_mb<VT>(isa, mb, a, n, m0, g0, g1, part);
          for (int i = 0; i < mb; ++i) {
            float& dst = y[(m0 + i) * a.N + n];
            dst = (k0 == 0 ? (bias ? bias[n] : 0.f) : dst) + part[i];
          }
        }
      }
    }
  });
}


}  // namespace

at::Tensor sparse24_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                           const c10::optional<at::Tensor>& bias, int64_t out_features, int64_t in_features) {
  const char* op = "sparse24_linear";
  const int64_t N = out_features, K = in_features;
  TORCH_CHECK(K > 0 && K % 4 == 0, op, ": in_features must be a positive multiple of 4, got ", K);
  TORCH_CHECK(values.dim() == 2 && values.size(0) == N && values.size(1) == K / 2, op,
              ": values must have shape [", N, ", ", K / 2, "], got ", values.sizes());
  TORCH_CHECK(meta.device().is_cpu() && meta.scalar_type() == at::kInt && meta.is_contiguous(), op,
              ": meta must be a contiguous CPU int32 tensor");
  const int64_t W = (K / 4 + 7) / 8;
  TORCH_CHECK(meta.dim() == 2 && meta.size(0) == N && meta.size(1) == W, op, ": meta must have shape [", N, ", ",
              W, "], got ", meta.sizes());
  linear_check_x(x, values, K, op);
  at::Tensor b32 = linear_bias_fp32(bias, N, op);
  const LinearPath path = linear_path(LinearOp::kSparse24, x.scalar_type(), x.size(0), N, K);
  if (path == LinearPath::kAmx) {
    const Isa isa = active_isa();
    const uint32_t* mp = reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>());
    const uint16_t* vp = reinterpret_cast<const uint16_t*>(values.data_ptr());
    return amx_linear(
        x, bias, N, K,
        [=](int64_t r0, int64_t r1, void* dst) {
          s24_decompress_rows<uint16_t>(isa, vp, mp, K, W, r0, r1, static_cast<uint16_t*>(dst));
        },
        [=](int64_t r0, int64_t r1, int s) {
          return s == 0 ? std::make_pair(reinterpret_cast<const char*>(vp + r0 * (K / 2)), (r1 - r0) * K)
                        : std::make_pair(reinterpret_cast<const char*>(mp + r0 * W), (r1 - r0) * W * 4);
        });
  }
  if (path == LinearPath::kShuffle) {  // features in the lanes (lanes_bf16.cpp, lanes_fp32.cpp)
    if (values.scalar_type() == at::kBFloat16) return sparse24_shuffle_bf16(x, b32, values, meta, N, K);
    return sparse24_shuffle_fp32(linear_x_fp32(x, values, K, op), b32, values, meta, N, K);
  }
  if (path == LinearPath::kPair) {
    return sparse24_pair_bf16(x, b32, values, meta, N, K);  // bf16 dot pairs (pair_outer_bf16.cpp)
  }
  if (path == LinearPath::kPanel) {
    const Isa isa = active_isa();
    const uint32_t* mp = reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>());
    if (values.scalar_type() == at::kFloat) {
      const float* vp = values.data_ptr<float>();
      return panel_linear(x, bias, N, K, [=](int64_t r0, int64_t r1, void* dst) {
        s24_decompress_rows<float>(isa, vp, mp, K, W, r0, r1, static_cast<float*>(dst));
      });
    }
    const uint16_t* vp = reinterpret_cast<const uint16_t*>(values.data_ptr());
    return panel_linear(x, bias, N, K, [=](int64_t r0, int64_t r1, void* dst) {
      s24_decompress_rows<uint16_t>(isa, vp, mp, K, W, r0, r1, static_cast<uint16_t*>(dst));
    });
  }
  at::Tensor x32 = linear_x_fp32(x, values, K, op);
  const int64_t M = x32.size(0);
  if (path == LinearPath::kOuter) {
    return sparse24_outer(x32, b32, values, meta, N, K, x.scalar_type());
  }
  at::Tensor y = at::empty({M, N}, x32.options());
  if (M == 0 || N == 0) return y.to(x.scalar_type());

  at::Tensor x16 = x.scalar_type() == at::kBFloat16 ? x.contiguous() : at::Tensor();
  S24Args a{x32.data_ptr<float>(), x16.defined() ? reinterpret_cast<const uint16_t*>(x16.data_ptr()) : nullptr, 0,
            values.data_ptr(), reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>()),
            M, N, K, W};
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  if (values.scalar_type() == at::kFloat) {
    s24_run<float>(a, bp, y.data_ptr<float>());
    return y;
  }
  s24_run<uint16_t>(a, bp, y.data_ptr<float>());
  return y.to(at::kBFloat16);  // round to nearest even
}

}  // namespace laco
