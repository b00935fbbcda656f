// Mid-M path of the 2:4 linear (AVX2 CPUs): outer products over the kept weights only.
//
// The direct kernels (sparse24_linear.cpp, bitmap_linear.cpp) expand a vector of weights and take dot
// products with rows of x: dense multiply-adds, plus a gather or an expand per vector. From a few rows of
// x on, the BLAS behind F.linear does dense multiply-adds faster than that. This path does only the kept
// ones: x is transposed once into xt [K, Mp] (Mp = M rounded up to 8, zero rows added), and for output row
// n every kept weight w[n, c] is broadcast and multiplied with the vectors xt[c, m0 : m0 + 8 * MBV],
// accumulating y^T[n, m0 : ...] in MBV ymm registers. Per kept weight: one broadcast load, MBV loads and
// MBV FMAs, no shuffles, and half the multiply-adds of the dense GEMM.
//
// Blocking: rows of x in blocks of at most 64 (8 accumulators), and K in blocks whose xt slice (K_blk x
// 64 rows x 4 bytes) stays in L1 while a thread's weight rows pass over it. Each row's kept weights of a
// K-block are first decoded into (offset into xt, fp32 value) pairs; then the FMA loop runs over them.
// Every output element is produced by one thread in a fixed order (deterministic for any thread count).
// Measured on the AVX2 machine (docs/cpu_kernels.md); AVX-512 machines keep their measured direct /
// panel thresholds, as this path was not measured there.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <utility>
#include <vector>

#include "laco_cpu.h"

namespace laco {
namespace {

constexpr int kMaxMBV = 8;                     // 8 vectors of 8 rows: 64 rows of x per block
// xt slice per K-block: it stays in L1 (32 KB on Zen 3) while kRowChunk rows pass over it. 20 KB measured
// best of 8 / 20 / 64 / 256 KB (1536x576 fp32, M = 16: 0.81x / 1.31x / 0.95x / 0.77x dense; noisy machine).
constexpr int64_t kXtBytes = 20 * 1024;
constexpr int64_t kXtBytesAvx512 = 32 * 1024;
std::atomic<int64_t> g_outer_min_m_override{-1};
constexpr int64_t kRowChunk = 16;

// Kept weights of row n over columns [k0, k1): writes off[j] (float index of column c_j in xt, c_j * Mp)
// and returns their fp32 values (either vals, filled here, or a pointer into the fp32 values tensor).

#if LACO_X86
// y^T[n, block] += sum_j val[j] * xt[off[j] + block]; acc_io holds the MBV * 8 partial sums.
// U sets of accumulators (summed at the end) keep U * MBV FMA chains in flight when MBV is small.
// Every accumulator index is a compile-time constant (fold expressions, not loops), so GCC keeps them in
// registers: with loop indices it kept the array on the stack and stored all of it every step.
template <size_t... V>
LACO_AVX2 LACO_INLINE void outer_fma(std::index_sequence<V...>, __m256 w, const float* xr, __m256* acc) {
  ((acc[V] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + 8 * V), acc[V])), ...);
}

template <int MBV, size_t... U>
LACO_AVX2 LACO_INLINE void outer_step(std::index_sequence<U...>, const int32_t* off, const float* val, const float* xt,
                                      __m256* acc) {
  (outer_fma(std::make_index_sequence<MBV>{}, _mm256_broadcast_ss(val + U), xt + off[U], acc + U * MBV), ...);
}

template <int MBV, size_t... I>
LACO_AVX2 LACO_INLINE void outer_init(std::index_sequence<I...>, const float* acc_io, __m256* acc) {
  ((acc[I] = I < MBV ? _mm256_loadu_ps(acc_io + 8 * (I % MBV)) : _mm256_setzero_ps()), ...);
}

template <int MBV, size_t... I>
LACO_AVX2 LACO_INLINE void outer_fold(std::index_sequence<I...>, __m256* acc) {  // acc[v] += acc[MBV + I]
  ((acc[I % MBV] = _mm256_add_ps(acc[I % MBV], acc[MBV + I])), ...);
}

template <size_t... V>
LACO_AVX2 LACO_INLINE void outer_store(std::index_sequence<V...>, const __m256* acc, float* acc_io) {
  (_mm256_storeu_ps(acc_io + 8 * V, acc[V]), ...);
}

template <int MBV, int U>
LACO_AVX2 void outer_row_avx2(const int32_t* off, const float* val, int64_t cnt, const float* xt, float* acc_io) {
  __m256 acc[U * MBV];
  outer_init<MBV>(std::make_index_sequence<U * MBV>{}, acc_io, acc);
  int64_t j = 0;
  for (; j + U <= cnt; j += U) outer_step<MBV>(std::make_index_sequence<U>{}, off + j, val + j, xt, acc);
  for (; j < cnt; ++j) outer_step<MBV>(std::make_index_sequence<1>{}, off + j, val + j, xt, acc);
  outer_fold<MBV>(std::make_index_sequence<(U - 1) * MBV>{}, acc);
  outer_store(std::make_index_sequence<MBV>{}, acc, acc_io);
}

void outer_row(int mbv, const int32_t* off, const float* val, int64_t cnt, const float* xt, float* acc) {
  switch (mbv) {
    case 1: return outer_row_avx2<1, 4>(off, val, cnt, xt, acc);
    case 2: return outer_row_avx2<2, 4>(off, val, cnt, xt, acc);
    case 3: return outer_row_avx2<3, 2>(off, val, cnt, xt, acc);
    case 4: return outer_row_avx2<4, 2>(off, val, cnt, xt, acc);
    case 5: return outer_row_avx2<5, 1>(off, val, cnt, xt, acc);
    case 6: return outer_row_avx2<6, 1>(off, val, cnt, xt, acc);
    case 7: return outer_row_avx2<7, 1>(off, val, cnt, xt, acc);
    default: return outer_row_avx2<8, 1>(off, val, cnt, xt, acc);
  }
}

// The same kernel in zmm registers (AVX-512 CPUs): 16 rows of x per vector, at most 4 vectors (64 rows).
template <size_t... V>
LACO_AVX512 LACO_INLINE void outer_fma512(std::index_sequence<V...>, __m512 w, const float* xr, __m512* acc) {
  ((acc[V] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xr + 16 * V), acc[V])), ...);
}

template <int MBV, size_t... U>
LACO_AVX512 LACO_INLINE void outer_step512(std::index_sequence<U...>, const int32_t* off, const float* val,
                                           const float* xt, __m512* acc) {
  (outer_fma512(std::make_index_sequence<MBV>{}, _mm512_set1_ps(val[U]), xt + off[U], acc + U * MBV), ...);
}

template <int MBV, size_t... I>
LACO_AVX512 LACO_INLINE void outer_init512(std::index_sequence<I...>, const float* acc_io, __m512* acc) {
  ((acc[I] = I < MBV ? _mm512_loadu_ps(acc_io + 16 * (I % MBV)) : _mm512_setzero_ps()), ...);
}

template <int MBV, size_t... I>
LACO_AVX512 LACO_INLINE void outer_fold512(std::index_sequence<I...>, __m512* acc) {
  ((acc[I % MBV] = _mm512_add_ps(acc[I % MBV], acc[MBV + I])), ...);
}

template <size_t... V>
LACO_AVX512 LACO_INLINE void outer_store512(std::index_sequence<V...>, const __m512* acc, float* acc_io) {
  (_mm512_storeu_ps(acc_io + 16 * V, acc[V]), ...);
}

template <int MBV, int U>
LACO_AVX512 void outer_row_avx512(const int32_t* off, const float* val, int64_t cnt, const float* xt, float* acc_io) {
  __m512 acc[U * MBV];
  outer_init512<MBV>(std::make_index_sequence<U * MBV>{}, acc_io, acc);
  int64_t j = 0;
  for (; j + U <= cnt; j += U) outer_step512<MBV>(std::make_index_sequence<U>{}, off + j, val + j, xt, acc);
  for (; j < cnt; ++j) outer_step512<MBV>(std::make_index_sequence<1>{}, off + j, val + j, xt, acc);
  outer_fold512<MBV>(std::make_index_sequence<(U - 1) * MBV>{}, acc);
  outer_store512(std::make_index_sequence<MBV>{}, acc, acc_io);
}

void outer_row512(int mbv, const int32_t* off, const float* val, int64_t cnt, const float* xt, float* acc) {
  switch (mbv) {
    case 1: return outer_row_avx512<1, 4>(off, val, cnt, xt, acc);
    case 2: return outer_row_avx512<2, 4>(off, val, cnt, xt, acc);
    case 3: return outer_row_avx512<3, 2>(off, val, cnt, xt, acc);
    default: return outer_row_avx512<4, 2>(off, val, cnt, xt, acc);
  }
}

// 2:4 decode, 4 groups (16 columns, 8 values) per step: the index arithmetic of s24_half_avx2.
template <typename VT>
LACO_AVX2 Decoded s24_decode_avx2(const VT* v, const uint32_t* meta, int64_t g0, int64_t g1, int64_t mp, int32_t* off,
                                  float* vals) {
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
  const __m256i three = _mm256_set1_epi32(3), vmp = _mm256_set1_epi32(static_cast<int>(mp));
  int64_t g = g0, j = 0;
  for (; g < g1 && (g & 3); ++g, j += 2) {  // to a half-word boundary
    const uint32_t nib = (meta[g >> 3] >> (4 * (g & 7))) & 0xFu;
    off[j] = static_cast<int32_t>((4 * g + (nib & 3u)) * mp);
    off[j + 1] = static_cast<int32_t>((4 * g + (nib >> 2)) * mp);
  }
  for (; g + 4 <= g1; g += 4, j += 8) {
    const uint32_t half = meta[g >> 3] >> (4 * (g & 7));
    const __m256i col = _mm256_add_epi32(
        _mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(half)), shifts), three),
                         base),
        _mm256_set1_epi32(static_cast<int>(4 * g)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(off + j), _mm256_mullo_epi32(col, vmp));
  }
  for (; g < g1; ++g, j += 2) {
    const uint32_t nib = (meta[g >> 3] >> (4 * (g & 7))) & 0xFu;
    off[j] = static_cast<int32_t>((4 * g + (nib & 3u)) * mp);
    off[j + 1] = static_cast<int32_t>((4 * g + (nib >> 2)) * mp);
  }
  const int64_t cnt = 2 * (g1 - g0);
  if constexpr (std::is_same_v<VT, float>) {
    return {cnt, v + 2 * g0};
  } else {
    const uint16_t* p = v + 2 * g0;
    int64_t i = 0;
    for (; i + 8 <= cnt; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(vals + i), _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    for (; i < cnt; ++i) vals[i] = bf16_to_f32(p[i]);
    return {cnt, vals};
  }
}
#endif

// Smallest M for this path on AVX2 (below it the direct kernel; from panel_min_m on the panel path).
// Measured on the AVX2 machine (AMD EPYC, family 25 model 1, 1 thread; docs/cpu_kernels.md): the outer
// kernel beat the direct one from M = 8 on (1536x576 fp32 1.89x vs 1.51x dense, bf16 2.36x vs 1.71x;
// M = 4: 1.88x vs 2.47x) on both SmolLM2 and 7B shapes.
constexpr int64_t kDefaultOuterMinM = 8;
// AVX-512 (zmm variant), fp32: measured on the AMX Xeon (docs/cpu_kernels.md, forced paths interleaved
// with F.linear, one thread). 2:4 7B, outer / direct / panel: M = 16 1.71x / 1.13x / 0.65x (11008x4096),
// M = 64 1.38x / 0.52x / 0.74x, M = 8 1.71x / 2.47x / 1.78x (direct wins); 2:4 1536x576 M = 32 1.25x / 1.16x /
// 1.05x, M = 16 1.14x / 1.43x; with two threads the direct kernel held to M = 32 on the small shapes.
// Bitmap 70% 1536x576: M = 16 1.41x / 0.69x / 0.88x, M = 128 1.26x / 0.36x / 0.85x, M = 256 0.67x / - / 0.87x
// (the panel takes over there, panel.cpp); 7B 50%: M = 16 1.25x-1.82x vs panel 0.58x-1.08x. bf16: the AMX
// path covers the middle range where there are tiles; without AMX not measured, so not chosen.
int64_t avx512_default_outer_min_m(LinearOp op, at::ScalarType dt, int64_t dense_bytes) {
  if (dt != at::kFloat) return int64_t{1} << 62;
  if (op == LinearOp::kBitmap) return 16;  // up to the panel threshold (panel.cpp: 256 / 1024 one thread, 12 (AMX: 8) / 1024 two)
  const bool large = dense_bytes >= kLargeWeightBytes;
  if (large) return 16;
  return at::get_num_threads() == 1 ? 32 : 64;
}

}  // namespace

// bf16 pair kernel (pair_outer_bf16.cpp) on CPUs with AVX512_BF16 and no AMX: the M range it serves.
// Measured on the Zen 4 EPYC (docs/cpu_kernels.md, stops 37-38): see pair_path. 2:4 weights of 16 MB or
// more from M = 8 (stop 38, 8-lane vectors for M <= 8). 7B shapes at M = 8, in-process A/B against the stop-37
// build (panels there), one / two threads: 0.94-1.04x of F.linear against 0.83-0.91x
// (bench/results/native_ab_zen4_s24_bf16_m8_pair_t{1,2}_stop38.json); smaller weights keep the direct kernel
// at M = 8 (SmolLM2 shapes, forced paths, one thread: direct 1.45-1.63x, pair 1.08-1.37x;
// cpu_kernels_epyc_zen4_bf16_m4_8_paths_stop38.json).
constexpr int64_t kPairMinM = 16, kPairMinMLarge24 = 8, kPairMaxM = 128, kPairMaxM24Large = 64;
constexpr double kPairMaxDensity = 0.4;

// bf16 at the AVX512_BF16 ISA (the kernel's offsets need K < 2^24). With AMX tiles their path serves the
// middle range and the pair kernel only runs when forced (set_outer_min_m), as in tests.
bool pair_isa(at::ScalarType dt, int64_t K) {
  return dt == at::kBFloat16 && active_isa() >= Isa::kAvx512Bf16 && K < (int64_t{1} << 24) &&
         (!amx_available() || g_outer_min_m_override.load() >= 0);
}

int64_t outer_min_m(LinearOp op, at::ScalarType dt, int64_t N, int64_t K) {
  if (pair_isa(dt, K)) {
    const int64_t o = g_outer_min_m_override.load();
    const bool large = N * K * 2 >= kLargeWeightBytes;
    if (o >= 0) return o;
    if (op == LinearOp::kSparse24) return large ? kPairMinMLarge24 : kPairMinM;
    // bitmap under 16 MB: the direct path's register-blocked kernel serves M below the panels' threshold
    // (panel.cpp; stop 42, 70%: blocked 1.13-1.31x the pair kernel's speed at M = 16, at M = 32 0.91-0.97x
    // where K < 1024 and 1.00-1.10x where K >= 1024, at M = 64 0.76-0.97x), so the pair kernel starts there too
    return large ? kPairMinM : (K >= 1024 ? 64 : 32);
  }
  // the kernel exists for 2:4 on AVX2 (bitmap: measured slower than the panel path at 50%, about even at
  // 70%, so the panel path serves it; AVX-512: not measured there, the direct / panel thresholds stand),
  // and its int32 offsets into one M-block's xt [K, 64] need K * 64 < 2^31
  // AVX2: 2:4 only (the bitmap there: measured slower than the panel path at 50%, about even at 70%);
  // AVX-512: both formats (the bitmap decode is a register compress, bm_outer_decode). int32 offsets into
  // one M-block's xt [K, 64] need K * 64 < 2^31.
  const Isa isa = active_isa();
  if (isa < Isa::kAvx2 || (isa == Isa::kAvx2 && op != LinearOp::kSparse24) ||
      K * 8 * kMaxMBV >= (int64_t{1} << 31)) {
    return int64_t{1} << 62;
  }
  const int64_t o = g_outer_min_m_override.load();
  if (o >= 0) return o;
  if (isa == Isa::kAvx2) return kDefaultOuterMinM;
  return avx512_default_outer_min_m(op, dt, N * K * static_cast<int64_t>(c10::elementSize(dt)));
}

void set_outer_min_m(int64_t m) { g_outer_min_m_override = m; }

int64_t pair_max_m(LinearOp op, at::ScalarType dt, int64_t N, int64_t K) {
  if (!pair_isa(dt, K)) return 0;
  if (g_outer_min_m_override.load() >= 0) return int64_t{1} << 62;
  // one thread, 2:4 weight under 16 MB: the pair kernel also beat the panels at M = 128 (1536x576 / 576x1536:
  // 1.04x / 0.97x against 0.95x / 0.91x)
  const bool large = N * K * 2 >= kLargeWeightBytes;
  // 2:4 weight of 16 MB or more: the panels win from M = 64 (stop 41, 7B shapes, forced paths, 15 rounds,
  // medians: pair 0.85x / 0.93x one thread, 0.76-0.93x two, against panels 0.89-0.98x / 0.92-1.01x split);
  // at M = 32 the pair kernel still led on 11008x4096 (1.06-1.07x against 0.96-0.97x)
  if (op == LinearOp::kSparse24 && large) return kPairMaxM24Large;
  return op == LinearOp::kSparse24 && at::get_num_threads() == 1 ? 2 * kPairMaxM : kPairMaxM;
}

namespace {
std::atomic<int64_t> g_shuffle_min_m_override{-1};
// 2:4 bf16 on AVX512_BF16 without AMX: the shuffle kernel from M = 8 on, every weight size (stop 44, Zen 4,
// one thread, medians of 5 interleaved rounds, speed over F.linear, shuffle / the path it replaced):
// 1536x576 and 576x1536 M = 8 1.65x / 1.16x (direct), M = 16-64 1.43-1.49x / 1.05-1.12x (pair), M = 256-1024
// 1.41-1.48x / 0.98-1.02x (panels); 11008x4096 / 4096x11008 M = 8 1.22x / 0.97x and 1.17x / 0.93x (pair),
// M = 64-256 1.18-1.29x / 0.93-0.97x (panels); at M = 4 the direct kernel held (1.00x / 1.08x against
// 1.04x / 0.94x; 576x1536 1.51x against 1.38x). docs/cpu_kernels.md "Stop 44".
constexpr int64_t kShuffleMinM = 8;
// fp32 2:4 on AVX-512 CPUs without AMX (lanes_fp32.cpp): from M = 16 on, every weight size (stop 44, Zen 4,
// medians of 3-5 interleaved rounds, shuffle / the path it replaced): one thread 1536x576 and 576x1536 M = 16-1024
// 1.19-1.29x / 0.88-1.24x (direct, outer, panels), 11008x4096 and 4096x11008 M = 16-256 1.29-1.73x / 1.01-1.60x
// (outer); two threads SmolLM2 shapes M = 16-1024 1.28-2.22x / 0.96-1.36x. At M = 8 mixed (1.23-1.31x against
// 1.27-1.30x one thread, 4096x11008 1.27x against 1.37x): the direct kernel keeps it. Not measured on AMX Xeons.
constexpr int64_t kShuffleMinMF32 = 16;
}  // namespace

namespace {
// 2:4 bf16 weights of 16 MB and more with K >= 2 N (the 7B down projection) on AVX512_BF16 without AMX: the direct
// kernel keeps one full register block of x (M <= 8; linear_path) since it reads such weights in whole rows (stop 46,
// read_whole_rows in laco_cpu.h). The bench's forced paths against F.linear in one process, 7-9 rounds,
// medians, two runs: 4096x11008 M = 8 direct 1.12x / 1.18x (one thread), 1.35x / 1.47x (two) against shuffle 0.96x /
// 1.05x and 1.04x / 1.22x and the pair kernel about 1.01x. On 11008x4096 the shuffle kernel stayed ahead (1.07-1.55x
// against 0.98-1.29x); at M > 8 the direct kernel makes a second pass over the weight.
bool direct_keeps_one_block(LinearOp op, at::ScalarType dt, int64_t N, int64_t K) {
  return op == LinearOp::kSparse24 && dt == at::kBFloat16 && active_isa() >= Isa::kAvx512Bf16 && !amx_available() &&
         N * K * 2 >= kLargeWeightBytes && K >= 2 * N;
}
// One register block of the 2:4 direct kernel (kMaxMB in sparse24_linear.cpp): the direct range on such weights,
// and the shuffle kernel from the row after it.
constexpr int64_t kDirectBlockRows = 8;
}  // namespace

int64_t shuffle_min_m(LinearOp op, at::ScalarType dt, int64_t N, int64_t K) {
  if (op != LinearOp::kSparse24) return int64_t{1} << 62;
  const bool f32 = dt == at::kFloat && active_isa() >= Isa::kAvx512;  // lanes_fp32.cpp
  if (!f32 && (dt != at::kBFloat16 || active_isa() < Isa::kAvx512Bf16)) return int64_t{1} << 62;
  const int64_t o = g_shuffle_min_m_override.load();
  if (o >= 0) return o;
  // not measured on AMX CPUs (their tiles keep the bf16 range, their fp32 paths stay as measured)
  if (amx_available()) return int64_t{1} << 62;
  if (f32) return kShuffleMinMF32;
  return direct_keeps_one_block(op, dt, N, K) ? kDirectBlockRows + 1 : kShuffleMinM;
}

void set_shuffle_min_m(int64_t m) { g_shuffle_min_m_override = m; }

namespace {
std::atomic<int64_t> g_lanes_min_m_override{-1};
// bitmap bf16 on AVX512_BF16 without AMX, weights under 16 MB, density >= 0.25: the lanes kernel from M = 32
// (stop 44, Zen 4, interleaved with F.linear, medians of 5 rounds, lanes / the path it replaced): 1536x576 and
// 576x1536 at 50% and 70%, one thread M = 32-64 0.93-1.06x / 0.78-0.88x, M = 256-1024 0.98-1.05x / 0.91-1.00x; two
// threads M = 32-1024 0.99-1.27x / 0.61-1.01x. At M = 16 it was mixed (one thread 0.86-0.92x against 0.79-0.96x),
// and on 7B weights too (0.78-1.04x against 0.86-1.25x, the kernel of stop 44: see below for stop 45's). Density under 0.25 was not
// measured (the pair kernel skips empty pairs, this loop does the dense count): kept off.
constexpr int64_t kLanesMinM = 32;
// The fp32 bitmap (lanes_fp32.cpp), weights under 16 MB: in place of the panels, from panel_min_m (stop 44, medians of
// 5 rounds, lanes / panels: 1536x576 and 576x1536 at 50% and 70%, one thread M = 256-1024 1.08-1.39x / 0.93-1.01x,
// two threads M = 64-1024 1.07-1.95x / 0.87-1.09x; below panel_min_m the outer and direct kernels led (M = 16-64,
// one thread: 0.92-1.16x against 0.80-1.72x). 7B weights at M = 1024 tied (0.95-0.98x / 0.97-1.00x one thread,
// 1.06-1.13x / 0.98-1.04x two): they kept the panels until stop 46 (below).
constexpr double kLanesMinDensity = 0.25;
// bf16 weights of 16 MB and more (stop 45, after the kernel expanded the bitmap straight into its panels with a
// software prefetch of each row's values 256 bytes ahead; /tmp probe, forced lanes beside the dispatched path and
// F.linear, 5 rounds interleaved, medians, 11008x4096 and 4096x11008, lanes / dispatched): density 0.5, one thread
// M = 8-64 1.00-1.22x / 0.93-1.02x (panels), two threads 0.97-1.35x / 0.93-1.06x, M = 256 0.98-0.99x / 0.95-0.97x;
// density 0.3 M = 8-16 0.97-1.37x / 0.97-1.13x (panels, pair), M = 32 1.00-1.15x / 1.02-1.13x (pair: mixed),
// M = 64 1.03-1.06x / 1.12-1.17x (pair: lost), M = 256 0.99x / 0.94-0.99x; M = 1024 (two threads, 3 rounds)
// 0.93-1.05x / 0.96-1.00x (mixed). So from M = 8, except where the pair kernel serves from M = 32. Stop 46: with x
// in chunks of 8 MB (lanes_common.h; before, a 22.5 MB x was re-read from DRAM for every 32-feature block) the
// lanes kernel beat the panels at M = 1024 in all 8 cells (both shapes, 50% and 70%, one and two threads; /tmp
// probe, forced paths and F.linear interleaved, 5 rounds, medians): 0.996-1.050x against 0.959-1.001x, so the
// range has no upper end any more (it stopped at 1024). And no gap: at density 0.3 in the pair kernel's range (M = 32
// to pair_max_m) the pair kernel was the slower of the two in two runs of 12 cells each (/tmp probe, the bench's
// forced paths and F.linear interleaved, 9 rounds, medians, 11008x4096 and 4096x11008, M = 32 / 64 / 96, one and
// two threads): pair 0.79-1.14x, lanes 0.94-1.12x; it led only on 11008x4096 at one thread in the first run.
constexpr int64_t kLanesLargeMinM = 8;
// The fp32 bitmap under 16 MB at density above 0.4: from M = 16 even where the panels start later (one thread), in
// place of the outer-product kernel, whose work grows with the kept weights (stop 45, /tmp probe in the bench's
// context: dense, 2:4, bitmap 70% and the forced bitmap 50% path interleaved, 15 rounds, medians, over F.linear,
// lanes / outer, one thread: 1536x576 M = 16-64 0.97-1.47x / 0.91-1.07x, 576x1536 0.90-1.10x / 0.67-0.96x; at 70%
// the outer kernel led, 1.22-1.54x / 1.18-1.41x lanes, and keeps its range; at M = 8 the direct kernel led,
// 1.18-1.30x / 0.91-1.15x).
// Stop 46: fp32 weights of 16 MB and more take the same rule (they had no lanes range): with x in chunks of 8 MB
// the lanes kernel beat what the rule chose before (the outer-product kernel from M = 16, panels from 1024) on the
// 7B shapes (/tmp probe, forced paths and F.linear interleaved, 3-5 rounds, medians, lanes / before): density 0.5,
// one thread M = 16 1.47-1.70x / 0.97-1.16x, M = 64 1.29-1.52x / 1.34-1.62x (outer a little ahead), M = 256
// 1.26x / 1.18x, M = 1024 1.15-1.19x / 1.03x; two threads M = 16 1.86-2.40x / 1.47-1.51x, M = 64 1.39-1.79x /
// 1.43-1.83x, M = 256 1.21-1.40x / 1.17-1.29x, M = 1024 1.35x / 1.01x; density 0.3 at M = 1024 (panels) 1.10x /
// 0.93x one thread, 1.31x / 0.97x two. At density 0.3 below 1024 the outer kernel, which skips the pruned
// multiply-adds, led (M = 16-256 1.29-2.30x against 1.19-1.91x) and keeps its range.
constexpr int64_t kLanesF32DenseMinM = 16;
}  // namespace

int64_t lanes_min_m(LinearOp op, at::ScalarType dt, int64_t N, int64_t K, double density) {
  if (op != LinearOp::kBitmap) return int64_t{1} << 62;
  const bool f32 = dt == at::kFloat && active_isa() >= Isa::kAvx512;  // lanes_fp32.cpp: any K
  if (!f32 && (dt != at::kBFloat16 || active_isa() < Isa::kAvx512Bf16 || K % 2 != 0)) return int64_t{1} << 62;
  const int64_t o = g_lanes_min_m_override.load();
  if (o >= 0) return o;
  if (amx_available() || density < kLanesMinDensity) return int64_t{1} << 62;
  if (!f32 && N * K * 2 >= kLargeWeightBytes) return kLanesLargeMinM;
  if (!f32) return kLanesMinM;
  const int64_t pm = panel_min_m(op, dt, N, K);
  return density > kPairMaxDensity ? std::min(pm, kLanesF32DenseMinM) : pm;
}

void set_lanes_min_m(int64_t m) { g_lanes_min_m_override = m; }

LinearPath linear_path(LinearOp op, at::ScalarType dt, int64_t M, int64_t N, int64_t K, double density) {
  if (M <= 0 || N <= 0) return LinearPath::kDirect;
  // a forced shuffle threshold wins over every other path; its measured default yields to any other forced
  // threshold (tests and benchmarks that force the outer, pair or panel path get that path)
  const bool shuffle = M >= shuffle_min_m(op, dt, N, K);
  const bool others_forced = g_outer_min_m_override.load() >= 0 || panel_min_m_forced();
  if (shuffle && (g_shuffle_min_m_override.load() >= 0 || !others_forced)) return LinearPath::kShuffle;
  if (M <= kDirectBlockRows && !others_forced && g_shuffle_min_m_override.load() < 0 &&
      direct_keeps_one_block(op, dt, N, K)) {
    return LinearPath::kDirect;
  }
  const bool lanes = M >= lanes_min_m(op, dt, N, K, density);
  if (lanes && (g_lanes_min_m_override.load() >= 0 || !others_forced)) return LinearPath::kLanes;  // (the same rule)
  if (M >= amx_min_m(op, dt, N, K) && M < amx_max_m(op, dt, N, K)) return LinearPath::kAmx;
  // a forced panel threshold (set_panel_min_m) wins over the pair kernel's measured range, as it does
  // over the outer-product kernel's
  const bool panel = M >= panel_min_m(op, dt, N, K);
  if (panel && panel_min_m_forced()) return LinearPath::kPanel;
  if (pair_path(op, dt, M, N, K, density)) return LinearPath::kPair;
  if (panel) return LinearPath::kPanel;
  if (M >= outer_min_m(op, dt, N, K)) return LinearPath::kOuter;
  return LinearPath::kDirect;
}

bool pair_path(LinearOp op, at::ScalarType dt, int64_t M, int64_t N, int64_t K, double density) {
  // bitmap: the kernel does one dot per column pair holding a nonzero; random weights at density d leave
  // 1 - (1 - d)^2 of the pairs (d = 0.3: 0.51, d = 0.5: 0.75), and at 0.75 it lost to the panels
  if (op == LinearOp::kBitmap && density > kPairMaxDensity && g_outer_min_m_override.load() < 0) return false;
  return M > 0 && N > 0 && M >= outer_min_m(op, dt, N, K) && M < pair_max_m(op, dt, N, K);
}

// y [M, N] in out_dtype = x32 [M, K] @ W^T + b32, W given by decode. x32 fp32 contiguous; b32 fp32 or undefined.
at::Tensor outer_linear(const at::Tensor& x32, const at::Tensor& b32, int64_t N, int64_t K, int64_t k_align,
                        at::ScalarType out_dtype, const Decode& decode) {
#if LACO_X86
  const int64_t vw = active_isa() >= Isa::kAvx512 ? 16 : 8;  // rows of x per vector register
  const int64_t M = x32.size(0), mp = (M + vw - 1) / vw * vw;
  const int64_t nblocks = (mp + 8 * kMaxMBV - 1) / (8 * kMaxMBV);
  // xt per M-block: [K, 8 * mbv] contiguous (zero rows past M), so a K-block's slice is one dense piece of
  // L1 (a shared [K, Mp] layout with Mp = 128 put the slice on a quarter of the L1 sets: 2x slower)
  std::vector<at::Tensor> xts;
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t m0 = b * 8 * kMaxMBV, rows = std::min<int64_t>(8 * kMaxMBV, M - m0);
    at::Tensor t = at::zeros({K, (rows + vw - 1) / vw * vw}, x32.options());
    t.narrow(1, 0, rows).copy_(x32.narrow(0, m0, rows).t());
    xts.push_back(t);
  }
  at::Tensor yt = at::empty({N, mp}, x32.options());
  float* ytp = yt.data_ptr<float>();
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  const int64_t xt_bytes = vw == 16 ? kXtBytesAvx512 : kXtBytes;
  at::parallel_for(0, N, linear_row_grain(M, K), [&](int64_t n0, int64_t n1) {
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t m0 = b * 8 * kMaxMBV;
      const int64_t w = xts[b].size(1);
      const int mbv = static_cast<int>(w / vw);
      const float* xtp = xts[b].data_ptr<float>();
      int64_t kb = xt_bytes / (w * static_cast<int64_t>(sizeof(float)));
      kb = std::min(K, std::max(k_align, kb / k_align * k_align));
      std::vector<int32_t> off(static_cast<size_t>(kb + 64));
      std::vector<float> vals(static_cast<size_t>(kb + 64));
      for (int64_t n = n0; n < n1; ++n) std::fill(ytp + n * mp + m0, ytp + n * mp + m0 + w, bp ? bp[n] : 0.f);
      // kRowChunk rows at a time pass over each K-block's xt slice (L1) in turn: the slice is reused
      // kRowChunk times and each row's weights are still read in order (kRowChunk streams). With all of
      // the thread's rows per K-block instead, the weight reads jumped a row (KBs) every few hundred bytes
      // (TLB and prefetch misses: 2-3x slower at M = 64 on SmolLM2 shapes).
      for (int64_t c0 = n0; c0 < n1; c0 += kRowChunk) {
        const int64_t c1 = std::min(n1, c0 + kRowChunk);
        for (int64_t k0 = 0; k0 < K; k0 += kb) {
          const int64_t k1 = std::min(K, k0 + kb);
          for (int64_t n = c0; n < c1; ++n) {
            const Decoded d = decode(n, k0, k1, w, off.data(), vals.data());
            if (vw == 16) {
              outer_row512(mbv, off.data(), d.vals, d.count, xtp, ytp + n * mp + m0);
            } else {
              outer_row(mbv, off.data(), d.vals, d.count, xtp, ytp + n * mp + m0);
            }
          }
        }
      }
    }
  });
  return yt.narrow(1, 0, M).t().to(out_dtype).contiguous();
#else
  (void)x32; (void)b32; (void)N; (void)K; (void)k_align; (void)out_dtype; (void)decode;
  TORCH_CHECK(false, "outer_linear: x86 only");
#endif
}

at::Tensor sparse24_outer(const at::Tensor& x32, const at::Tensor& b32, const at::Tensor& values, const at::Tensor& meta,
                          int64_t N, int64_t K, at::ScalarType out_dtype) {
#if LACO_X86
  const int64_t W = (K / 4 + 7) / 8;
  const uint32_t* mt = reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>());
  if (values.scalar_type() == at::kFloat) {
    const float* v = values.data_ptr<float>();
    return outer_linear(x32, b32, N, K, 32, out_dtype, [=](int64_t n, int64_t k0, int64_t k1, int64_t mp, int32_t* off,
                                                          float* vals) {
      return s24_decode_avx2<float>(v + n * (K / 2), mt + n * W, k0 / 4, k1 / 4, mp, off, vals);
    });
  }
  const uint16_t* v = reinterpret_cast<const uint16_t*>(values.data_ptr());
  return outer_linear(x32, b32, N, K, 32, out_dtype, [=](int64_t n, int64_t k0, int64_t k1, int64_t mp, int32_t* off,
                                                        float* vals) {
    return s24_decode_avx2<uint16_t>(v + n * (K / 2), mt + n * W, k0 / 4, k1 / 4, mp, off, vals);
  });
#else
  (void)x32; (void)b32; (void)values; (void)meta; (void)N; (void)K; (void)out_dtype;
  TORCH_CHECK(false, "sparse24_outer: x86 only");
#endif
}

}  // namespace laco
