// Mid-M path of the bf16 linears on CPUs with AVX512_BF16 (no AMX): outer products over pairs of kept
// weights, one vdpbf16ps per weight pair and 16 rows of x.
//
// Why: on a Zen 4 EPYC the bf16 F.linear runs oneDNN's vdpbf16ps GEMM at ~175 GFLOP/s from M = 16 on;
// the direct kernels (sparse24_linear.cpp, bitmap_linear.cpp) re-load each x row per weight row, and
// the panels (panel.cpp) add the decompression to that same GEMM: 0.73-0.94x of F.linear at M = 8-64
// (bench/results/cpu_kernels_epyc_zen4_*stop36_final.json). Skipping the pruned multiply-adds needs a
// loop whose dot products carry only kept weights.
//
// How: vdpbf16ps adds, per fp32 lane, two bf16 products. Lanes are 16 rows of x; the two products are
// the two weights of a pair of one output row n against the same two columns of x:
//     yt[n, m] += w[n, c0] * x[m, c0] + w[n, c1] * x[m, c1]      for the 16 rows m of a vector
// The weight pair is broadcast; the x pairs come from a table built once per call (fill_table_*):
//  - 2:4: a group's two kept columns (i0 < i1, a format invariant) are one of 6 combinations; the table
//    holds, per group and combination, the vector of (x[m, 4g + i0], x[m, 4g + i1]) pairs: 3x x's bytes.
//    The weight pair is the group's two stored values as one 32-bit word (never decoded).
//    One dot per group per 16 rows: half the dots of the dense GEMM.
//  - bitmap: adjacent columns (2p, 2p + 1); the table is x transposed in pairs (x's bytes); a pair whose
//    two weights are zero is skipped (random 50%: 3/4 of the pairs remain, 70%: 1/2).
// The rows of a chunk of kRowChunk weight rows are first decoded whole into (table offset, weight pair)
// lists (s24_pair_decode / bm_pair_decode), then K-blocks of the table pass under the chunk's rows: per
// pair one broadcast and MBV loads + dots (pair_row; M <= 8: one 8-lane vector, pair_row8). x rows in blocks
// of at most 64 (4 vectors); the next chunk's weight bytes are prefetched into L2 meanwhile. fp32
// accumulation, rounded to bf16 in the kernel; each output element is produced by one thread in a fixed
// order (the same bits for any thread count). Dispatch (linear_path, outer_linear.cpp): bf16 at the
// AVX512_BF16 ISA without AMX, M in [outer_min_m, pair_max_m); measured results in docs/cpu_kernels.md
// (stops 37-38). Since stop 44 the 2:4 weights go to the shuffle kernel (lanes_bf16.cpp) from M = 8
// on; this kernel serves 2:4 only where that one is forced off (set_shuffle_min_m) or another path forced.
#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "laco_cpu.h"

namespace laco {
namespace {

constexpr int kLanes = 16;      // rows of x per zmm vector
constexpr int kMaxMBV = 4;      // vectors per M-block: 64 rows of x
constexpr int64_t kRowChunk = 16;
// Table bytes per K-block. The dot loop reads one 64-byte table vector per dot; a slice that fits L1 (32 KB
// on Zen 4) makes K-blocks so short that the per-row, per-block cost (accumulators loaded and stored,
// ~6 ns) outweighs it. Measured on the Zen 4 (one thread, ns per dot, 2:4 1536x576 / 11008x4096, M = 64):
// 16 KB 0.78 / 0.91, 32 KB 0.69 / 0.81, 64 KB 0.63 / 0.73, 128 KB 0.67 / 0.81; bitmap 70% was fastest at
// 32 KB (11008x4096 M = 32 / 64: 1.09x / 1.17x of F.linear against 0.94x / 0.98x at 64 KB).
constexpr int64_t kTableBytesS24 = int64_t{64} << 10;
constexpr int64_t kTableBytesBitmap = int64_t{32} << 10;

#if LACO_X86
// acc[v] += tab[off + 16 v : ...] . bcast(pair) for v < MBV; every index a compile-time constant (fold
// expressions) so the accumulators stay in registers.
template <size_t... V>
LACO_AVX512BF16 LACO_INLINE void pair_dot(std::index_sequence<V...>, __m512i w, const uint32_t* t, __m512* acc) {
  ((acc[V] = _mm512_dpbf16_ps(acc[V], (__m512bh)_mm512_loadu_si512(t + kLanes * V), (__m512bh)w)), ...);
}

template <int MBV, size_t... U>
LACO_AVX512BF16 LACO_INLINE void pair_step(std::index_sequence<U...>, const int32_t* off, const uint32_t* pairs,
                                           const uint32_t* tab, __m512* acc) {
  (pair_dot(std::make_index_sequence<MBV>{}, _mm512_set1_epi32(static_cast<int>(pairs[U])), tab + off[U],
            acc + U * MBV), ...);
}

template <int MBV, size_t... I>
LACO_AVX512BF16 LACO_INLINE void pair_init(std::index_sequence<I...>, const float* acc_io, __m512* acc) {
  ((acc[I] = I < MBV ? _mm512_loadu_ps(acc_io + kLanes * (I % MBV)) : _mm512_setzero_ps()), ...);
}

template <int MBV, size_t... I>
LACO_AVX512BF16 LACO_INLINE void pair_fold(std::index_sequence<I...>, __m512* acc) {  // acc[v] += acc[MBV + I]
  ((acc[I % MBV] = _mm512_add_ps(acc[I % MBV], acc[MBV + I])), ...);
}

template <size_t... V>
LACO_AVX512BF16 LACO_INLINE void pair_store(std::index_sequence<V...>, const __m512* acc, float* acc_io) {
  (_mm512_storeu_ps(acc_io + kLanes * V, acc[V]), ...);
}

// acc_io [MBV * 16] += sum_j pairs[j] . tab[off[j] : off[j] + MBV * 16]; U accumulator sets keep U * MBV
// dot chains in flight (vdpbf16ps latency) and are folded in a fixed order.
template <int MBV, int U>
LACO_AVX512BF16 void pair_row(const int32_t* off, const uint32_t* pairs, int64_t cnt, const uint32_t* tab,
                              float* acc_io) {
  __m512 acc[U * MBV];
  pair_init<MBV>(std::make_index_sequence<U * MBV>{}, acc_io, acc);
  int64_t j = 0;
  for (; j + U <= cnt; j += U) pair_step<MBV>(std::make_index_sequence<U>{}, off + j, pairs + j, tab, acc);
  for (; j < cnt; ++j) pair_step<MBV>(std::make_index_sequence<1>{}, off + j, pairs + j, tab, acc);
  if constexpr (U > 1) pair_fold<MBV>(std::make_index_sequence<(U - 1) * MBV>{}, acc);
  pair_store(std::make_index_sequence<MBV>{}, acc, acc_io);
}

// M <= 8: one 8-lane (ymm) vector per dot. On Zen 4 a zmm vdpbf16ps is two 256-bit halves, so 16 lanes of
// which 8 are padding cost twice what the 8 useful ones need, and the table vector read per dot (the loop's
// bound, from L2) is half as long.
template <size_t... U>
LACO_AVX512BF16 LACO_INLINE void pair_step8(std::index_sequence<U...>, const int32_t* off, const uint32_t* pairs,
                                            const uint32_t* tab, __m256* acc) {
  ((acc[U] = _mm256_dpbf16_ps(acc[U], (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tab + off[U])),
                              (__m256bh)_mm256_set1_epi32(static_cast<int>(pairs[U])))), ...);
}

template <int U>
LACO_AVX512BF16 void pair_row8(const int32_t* off, const uint32_t* pairs, int64_t cnt, const uint32_t* tab,
                               float* acc_io) {
  __m256 acc[U];
  acc[0] = _mm256_loadu_ps(acc_io);
  for (int u = 1; u < U; ++u) acc[u] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + U <= cnt; j += U) pair_step8(std::make_index_sequence<U>{}, off + j, pairs + j, tab, acc);
  for (; j < cnt; ++j) pair_step8(std::make_index_sequence<1>{}, off + j, pairs + j, tab, acc);
  for (int u = 1; u < U; ++u) acc[0] = _mm256_add_ps(acc[0], acc[u]);
  _mm256_storeu_ps(acc_io, acc[0]);
}

// Lanes of an M-block of `rows` rows of x: 8 (one ymm) up to 8 rows, else whole 16-lane vectors.
int64_t block_lanes(int64_t rows) { return rows <= kLanes / 2 ? kLanes / 2 : (rows + kLanes - 1) / kLanes * kLanes; }

void pair_row_mbv(int64_t L, const int32_t* off, const uint32_t* pairs, int64_t cnt, const uint32_t* tab, float* acc) {
  if (L < kLanes) return pair_row8<8>(off, pairs, cnt, tab, acc);
  switch (L / kLanes) {
    case 1: return pair_row<1, 6>(off, pairs, cnt, tab, acc);
    case 2: return pair_row<2, 3>(off, pairs, cnt, tab, acc);
    case 3: return pair_row<3, 2>(off, pairs, cnt, tab, acc);
    default: return pair_row<4, 3>(off, pairs, cnt, tab, acc);
  }
}

// A table vector of 16 lanes, or its low 8 where the M-block has 8 lanes (its neighbours in the table are
// other threads' rows).
LACO_AVX512BF16 LACO_INLINE void store_lanes(uint32_t* t, int64_t lanes, __m512i v) {
  if (lanes >= kLanes) _mm512_storeu_si512(t, v);
  else _mm256_storeu_si256(reinterpret_cast<__m256i*>(t), _mm512_castsi512_si256(v));
}

// Columns (i0, i1) of the 6 kept-pair combinations of a 2:4 group, and the combination of each meta
// nibble (i0 | i1 << 2). Nibbles with i0 >= i1 violate the format (from_dense / validate sort them);
// they map to combination 0 so a bad meta word cannot index outside the table.
constexpr int kCombo0[6] = {0, 0, 0, 1, 1, 2}, kCombo1[6] = {1, 2, 3, 2, 3, 3};
constexpr int kComboOfNibble[16] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 3, 0, 0, 2, 4, 5, 0};

// Table of one M-block (rows m0 .. m0 + rows of x, L lanes, lanes past `rows` zero), for the 2:4 groups
// [g0, g1): tab[(6 g + q) * L + l] = x[m0 + l, 4g + i0(q)] | x[m0 + l, 4g + i1(q)] << 16. Per group and 16
// lanes: two 8-lane gathers of the group's four bf16 (one 64-bit word per row of x), then one word
// permute per combination. x: [M, K] bf16 bits, contiguous.
LACO_AVX512BF16 void fill_table_s24(const uint16_t* x, int64_t K, int64_t m0, int64_t rows, int64_t L, int64_t g0,
                                    int64_t g1, uint32_t* tab) {
  alignas(64) uint16_t idx[6][32];
  for (int q = 0; q < 6; ++q)
    for (int l = 0; l < 16; ++l) {
      idx[q][2 * l] = static_cast<uint16_t>(4 * l + kCombo0[q]);
      idx[q][2 * l + 1] = static_cast<uint16_t>(4 * l + kCombo1[q]);
    }
  __m512i vidx[6];
  for (int q = 0; q < 6; ++q) vidx[q] = _mm512_load_si512(idx[q]);
  const char* base = reinterpret_cast<const char*>(x);
  for (int64_t l0 = 0; l0 < L; l0 += kLanes) {
    // byte offsets of rows m0 + l0 + (0..15) (clamped: lanes past `rows` are masked off)
    const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i rs = _mm512_set1_epi64(2 * K);
    const __m512i o_lo = _mm512_mullo_epi64(_mm512_add_epi64(lane, _mm512_set1_epi64(m0 + l0)), rs);
    const __m512i o_hi = _mm512_mullo_epi64(_mm512_add_epi64(lane, _mm512_set1_epi64(m0 + l0 + 8)), rs);
    const int64_t valid = std::min<int64_t>(kLanes, std::max<int64_t>(0, rows - l0));
    const __mmask8 k_lo = static_cast<__mmask8>(valid >= 8 ? 0xFF : (1u << valid) - 1u);
    const __mmask8 k_hi = static_cast<__mmask8>(valid <= 8 ? 0 : (1u << (valid - 8)) - 1u);
    for (int64_t g = g0; g < g1; ++g) {
      const char* bg = base + 8 * g;
      const __m512i lo = _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), k_lo, o_lo, bg, 1);
      const __m512i hi = _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), k_hi, o_hi, bg, 1);
      uint32_t* t = tab + 6 * g * L + l0;
      for (int q = 0; q < 6; ++q) store_lanes(t + q * L, L - l0, _mm512_permutex2var_epi16(lo, vidx[q], hi));
    }
  }
}

// The same for the bitmap's adjacent column pairs [p0, p1): tab[p * L + l] = x[m0 + l, 2p] | x[m0 + l, 2p + 1] << 16
// (zero past K): one 16-lane gather of 32-bit words per pair.
LACO_AVX512BF16 void fill_table_pairs(const uint16_t* x, int64_t K, int64_t m0, int64_t rows, int64_t L, int64_t p0,
                                      int64_t p1, uint32_t* tab) {
  const char* base = reinterpret_cast<const char*>(x);
  for (int64_t l0 = 0; l0 < L; l0 += kLanes) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    // int32 byte offsets: the caller keeps 64 rows x 2K bytes below 2^31
    const __m512i o = _mm512_mullo_epi32(_mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(l0))),
                                         _mm512_set1_epi32(static_cast<int>(2 * K)));
    const int64_t valid = std::min<int64_t>(kLanes, std::max<int64_t>(0, rows - l0));
    const __mmask16 k = static_cast<__mmask16>((1u << valid) - 1u);
    const char* bm = base + m0 * 2 * K;
    const int64_t pe = std::min(p1, K / 2);  // whole pairs; an odd K's last column below
    for (int64_t p = p0; p < pe; ++p)
      store_lanes(tab + p * L + l0, L - l0, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, o, bm + 4 * p, 1));
    if (pe < p1) {  // p = K / 2 of an odd K: column K - 1 and a zero
      alignas(64) uint32_t last[kLanes] = {};
      for (int64_t l = 0; l < valid; ++l) last[l] = x[(m0 + l0 + l) * K + K - 1];
      store_lanes(tab + pe * L + l0, L - l0, _mm512_load_si512(last));
    }
  }
}

// 2:4 row n, all K / 4 groups: one entry per group, off[g] = (6 g + combination) * L (the word offset of its
// table row in the M-block's table); the weight pairs are the group's two stored values (the caller's).
LACO_AVX512BF16 void s24_pair_decode(const uint32_t* mrow, int64_t G, int64_t L, int32_t* off) {
  alignas(64) int32_t lut[16];
  for (int i = 0; i < 16; ++i) lut[i] = static_cast<int32_t>(kComboOfNibble[i] * L);
  const __m512i vlut = _mm512_load_si512(lut);
  const __m512i shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  const __m512i step = _mm512_set1_epi32(static_cast<int>(16 * 6 * L));
  __m512i gbase = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                     _mm512_set1_epi32(static_cast<int>(6 * L)));
  int64_t g = 0;
  for (; g + 16 <= G; g += 16) {  // two meta words: 16 nibbles -> 16 combinations -> 16 offsets
    const __m512i words = _mm512_mask_set1_epi32(_mm512_set1_epi32(static_cast<int>(mrow[g >> 3])), 0xFF00,
                                                 static_cast<int>(mrow[(g >> 3) + 1]));
    const __m512i nib = _mm512_and_si512(_mm512_srlv_epi32(words, shifts), _mm512_set1_epi32(15));
    _mm512_storeu_si512(off + g, _mm512_add_epi32(gbase, _mm512_permutexvar_epi32(nib, vlut)));
    gbase = _mm512_add_epi32(gbase, step);
  }
  for (; g < G; ++g) {
    const uint32_t nib = (mrow[g >> 3] >> (4 * (g & 7))) & 0xFu;
    off[g] = static_cast<int32_t>((6 * g + kComboOfNibble[nib]) * L);
  }
}

// Bitmap row (vals: its first value, bits: its K bits; vals_end: the end of the values tensor): per 32-column
// word the values expanded to their columns (vpexpandw), then the 16 column pairs holding a nonzero weight
// compressed into the lists (register compress; its store form is slow on Zen 4); off = pair index * L.
// seg[b] = first entry of columns [b kb, ...) (kb a multiple of 32), seg[nkb] = the count. off / pairs need
// K / 2 + 16 entries. The values are loaded whole (64 bytes) and expanded in registers where those bytes stay
// inside the tensor (perf on Zen 4, 70%, 1536x576, M = 16: this decode a third of the kernel's time, most of it
// after the load form of vpexpandw and the compresses; the register form and a running offset in place of a
// multiply and a division per word: 1.03-1.04x at M = 16-32, same bits, bench/results/native_ab_zen4_bitmap_pair_decode_stop38.json).
LACO_AVX512BF16 void bm_pair_decode(const uint16_t* vals, const uint16_t* vals_end, const uint32_t* bits, int64_t K,
                                    int64_t kb, int64_t L, int32_t* off, uint32_t* pairs, int64_t* seg) {
  const __m512i step = _mm512_set1_epi32(static_cast<int>(16 * L));  // offsets: int32, K < 2^24 and L <= 64
  __m512i o = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                 _mm512_set1_epi32(static_cast<int>(L)));
  int64_t j = 0, next_seg = 0, nseg = 0;
  for (int64_t c = 0; c < K; c += 32, o = _mm512_add_epi32(o, step)) {
    if (c == next_seg) {
      seg[nseg++] = j;
      next_seg += kb;
    }
    uint32_t b = bits[c >> 5];
    if (c + 32 > K) b &= (1u << (K - c)) - 1u;  // the row ends inside this word
    const __m512i w = vals + 32 <= vals_end ? _mm512_maskz_expand_epi16(b, _mm512_loadu_si512(vals))
                                            : _mm512_maskz_expandloadu_epi16(b, vals);
    vals += __builtin_popcount(b);
    const __mmask16 keep = static_cast<__mmask16>(_pext_u32(b | (b >> 1), 0x55555555u));
    _mm512_storeu_si512(pairs + j, _mm512_maskz_compress_epi32(keep, w));
    _mm512_storeu_si512(off + j, _mm512_maskz_compress_epi32(keep, o));
    j += __builtin_popcount(keep);
  }
  seg[(K + kb - 1) / kb] = j;
}
#endif  // LACO_X86

#if LACO_X86
// y[l, r] = bf16(acc[r * L + l]) for r < nr rows of a chunk and l < rows: per x row one 16-lane gather
// down the chunk's accumulators and a rounding to nearest even (as c10::BFloat16 and the direct kernels:
// NaN stays a quiet NaN; vcvtneps2bf16 would flush denormals).
LACO_AVX512BF16 void store_bf16_block(const float* acc, int64_t L, int64_t rows, int64_t nr, uint16_t* y, int64_t ldy) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int>(L)));
  const __mmask16 k = static_cast<__mmask16>((1u << nr) - 1u);
  for (int64_t l = 0; l < rows; ++l) {
    _mm256_mask_storeu_epi16(y + l * ldy, k, f32x16_to_bf16(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, idx, acc + l, 4)));
  }
}
#endif

// Decode of one weight row's kept pairs for an M-block of L lanes: writes off (word offsets into the
// M-block's table), seg[b] (first entry of K-block b, kb columns each; seg[nkb] = the count) and returns the
// weight pairs: `pairs`, filled, or (2:4 weights under 16 MB) the stored values. Room: K / 2 + 64 entries.
using PairDecode = std::function<const uint32_t*(int64_t n, int64_t kb, int64_t L, int32_t* off, uint32_t* pairs,
                                                 int64_t* seg)>;
// spans(n, s): the s-th (0 or 1) contiguous byte range of weight row n (values, then meta / bitmap).
using PairSpans = std::function<std::pair<const char*, int64_t>(int64_t n, int s)>;

at::Tensor pair_outer(const at::Tensor& x, const at::Tensor& b32, int64_t N, int64_t K, bool s24,
                      const PairDecode& decode, const PairSpans& spans) {
#if LACO_X86
  const int64_t M = x.size(0);
  constexpr int64_t kBlockRows = kLanes * kMaxMBV;
  const int64_t nblocks = (M + kBlockRows - 1) / kBlockRows;
  const int64_t P = s24 ? 6 * (K / 4) : (K + 1) / 2;  // table rows per M-block
  const at::Tensor xc = x.contiguous();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  // tables of all M-blocks, one after the other (block b: P x L_b words), in a buffer kept by the calling
  // thread (a fresh multi-MB allocation is page-faulted on every call)
  std::vector<int64_t> tab_at(nblocks + 1, 0);
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t rows = std::min(kBlockRows, M - b * kBlockRows);
    tab_at[b + 1] = tab_at[b] + P * block_lanes(rows);
  }
  thread_local at::Tensor cache;
  at::Tensor hold;
  const int64_t words = tab_at[nblocks];
  at::Tensor& buf = words * 4 <= (int64_t{16} << 20) ? cache : hold;  // kept up to 16 MB (7B, M = 64: 4 MB)
  if (!buf.defined() || buf.numel() < words) buf = at::empty({words}, at::TensorOptions().dtype(at::kInt));
  uint32_t* tab = reinterpret_cast<uint32_t*>(buf.data_ptr<int32_t>());
  const int64_t units = s24 ? K / 4 : (K + 1) / 2;  // groups or pairs
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t m0 = b * kBlockRows, rows = std::min(kBlockRows, M - m0);
    const int64_t L = block_lanes(rows);
    uint32_t* tb = tab + tab_at[b];
    at::parallel_for(0, units, std::max<int64_t>(1, (int64_t{1} << 14) / L), [&](int64_t u0, int64_t u1) {
      if (s24) fill_table_s24(xp, K, m0, rows, L, u0, u1, tb); else fill_table_pairs(xp, K, m0, rows, L, u0, u1, tb);
    });
  }
  at::Tensor y = at::empty({M, N}, x.options());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  // columns per K-block: its table slice (kTableBytes*) stays in cache while the chunk's rows pass over
  // it; a multiple of 32 columns (the bitmap decodes whole words)
  const int64_t nkb_max = (K + 31) / 32 + 1;
  at::parallel_for(0, N, linear_row_grain(M, K), [&](int64_t n0, int64_t n1) {
    alignas(64) float acc[kRowChunk * kBlockRows];  // the chunk's rows x the block's lanes, fp32
    const int64_t cap = K / 2 + 64;
    std::vector<int32_t> off(static_cast<size_t>(kRowChunk * cap));
    std::vector<uint32_t> pairs(static_cast<size_t>(kRowChunk * cap));
    std::vector<int64_t> seg(static_cast<size_t>(kRowChunk * nkb_max));
    const uint32_t* pp[kRowChunk];
    // Row chunks outside, M-blocks inside: a chunk's weight rows are read from memory once (the second
    // M-block decodes them again from L2).
    for (int64_t c0 = n0; c0 < n1; c0 += kRowChunk) {
      const int64_t nr = std::min(n1 - c0, kRowChunk);
      // The next chunk's weight rows are prefetched into L2, a K-block's share at a time, while the first
      // M-block of this chunk computes: its decode then reads from cache (7B 2:4 weights from DRAM: the
      // decode, waiting on memory, took 5-8 ms of a 12-31 ms call).
      std::pair<const char*, int64_t> next[kRowChunk][2];
      const int64_t nn = std::min(n1 - (c0 + nr), kRowChunk);
      for (int64_t r = 0; r < nn; ++r)
        for (int q = 0; q < 2; ++q) next[r][q] = spans(c0 + nr + r, q);
      for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t m0 = b * kBlockRows, rows = std::min(kBlockRows, M - m0);
        const int64_t L = block_lanes(rows);
        const uint32_t* tb = tab + tab_at[b];
        const int64_t kb = std::min((K + 31) / 32 * 32, std::max<int64_t>(32, (s24 ? kTableBytesS24 : kTableBytesBitmap) /
                                                                                   ((s24 ? 6 : 2) * L) / 32 * 32));
        const int64_t nkb = (K + kb - 1) / kb;
        for (int64_t r = 0; r < nr; ++r) {
          pp[r] = decode(c0 + r, kb, L, off.data() + r * cap, pairs.data() + r * cap, seg.data() + r * nkb_max);
          std::fill(acc + r * L, acc + (r + 1) * L, bp ? bp[c0 + r] : 0.f);
        }
        for (int64_t k = 0; k < nkb; ++k) {
          for (int64_t r = 0; r < nr; ++r) {
            if (b == 0 && r < nn) {
              for (int q = 0; q < 2; ++q) {
                const int64_t lo = next[r][q].second * k / nkb, hi = next[r][q].second * (k + 1) / nkb;
                for (int64_t o = lo / 64 * 64; o < hi; o += 64) _mm_prefetch(next[r][q].first + o, _MM_HINT_T1);
              }
            }
            const int64_t* sr = seg.data() + r * nkb_max;
            pair_row_mbv(L, off.data() + r * cap + sr[k], pp[r] + sr[k], sr[k + 1] - sr[k],
                         tb, acc + r * L);
          }
        }
        store_bf16_block(acc, L, rows, nr, yp + m0 * N + c0, N);
      }
    }
  });
  return y;
#else
  (void)x; (void)b32; (void)N; (void)K; (void)s24; (void)decode; (void)spans;
  TORCH_CHECK(false, "pair_outer: x86 only");
#endif
}
}  // namespace

at::Tensor sparse24_pair_bf16(const at::Tensor& x, const at::Tensor& b32, const at::Tensor& values,
                              const at::Tensor& meta, int64_t N, int64_t K) {
  const uint16_t* v = reinterpret_cast<const uint16_t*>(values.data_ptr());
  const uint32_t* mt = reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>());
  const int64_t W = (K / 4 + 7) / 8, G = K / 4;
  const bool in_place = reinterpret_cast<uintptr_t>(v) % 4 == 0 && N * K * 2 < kLargeWeightBytes;
  return pair_outer(x, b32, N, K, true, [=](int64_t n, int64_t kb, int64_t L, int32_t* off, uint32_t* pairs,
                                            int64_t* seg) -> const uint32_t* {
#if LACO_X86
    s24_pair_decode(mt + n * W, G, L, off);
    for (int64_t k = 0; k * kb < K; ++k) seg[k] = k * kb / 4;
    seg[(K + kb - 1) / kb] = G;
    // Weights of 16 MB or more are copied: the copy streams the row from memory in order (the dot loop
    // visits it a K-block at a time between other rows; 7B weights from DRAM: 0.43-0.72x of F.linear read
    // in place). Smaller ones (cache-resident) are read in place: 1536x576 / 576x1536 M = 16 213 / 200 us
    // copied, 193 / 183 us in place (one thread).
    if (in_place) return reinterpret_cast<const uint32_t*>(v + n * (K / 2));
    std::memcpy(pairs, v + n * (K / 2), static_cast<size_t>(G) * 4);
    return pairs;
#else
    (void)n; (void)kb; (void)L; (void)off; (void)seg; (void)in_place;
    return pairs;
#endif
  }, [=](int64_t n, int s) {
    return s == 0 ? std::make_pair(reinterpret_cast<const char*>(v + n * (K / 2)), K * 1)
                  : std::make_pair(reinterpret_cast<const char*>(mt + n * W), W * 4);
  });
}

at::Tensor bitmap_pair_bf16(const at::Tensor& x, const at::Tensor& b32, const at::Tensor& values,
                            const at::Tensor& bitmap, const at::Tensor& offsets, int64_t tile_k, int64_t N, int64_t K) {
  const uint16_t* v = reinterpret_cast<const uint16_t*>(values.data_ptr());
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(bitmap.data_ptr<int32_t>());
  const int32_t* offs = offsets.data_ptr<int32_t>();
  const int64_t W = (K + 31) / 32, T = (K + tile_k - 1) / tile_k;
  const uint16_t* v_end = v + values.numel();
  return pair_outer(x, b32, N, K, false, [=](int64_t n, int64_t kb, int64_t L, int32_t* off, uint32_t* pairs,
                                             int64_t* seg) -> const uint32_t* {
#if LACO_X86
    bm_pair_decode(v + offs[n * T], v_end, bits + n * W, K, kb, L, off, pairs, seg);
#else
    (void)n; (void)kb; (void)L; (void)off; (void)seg; (void)v_end;
#endif
    return pairs;
  }, [=](int64_t n, int s) {
    if (s == 1) return std::make_pair(reinterpret_cast<const char*>(bits + n * W), W * 4);
    const int64_t v0 = offs[n * T], v1 = n + 1 < N ? offs[(n + 1) * T] : values.numel();
    return std::make_pair(reinterpret_cast<const char*>(v + v0), (v1 - v0) * 2);
  });
}

}  // namespace laco
