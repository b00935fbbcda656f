// Shared declarations of the native CPU kernels of laco_kernels._C.
//
// Every op has a scalar path and, chosen at RUN time, AVX2+FMA and AVX-512 paths compiled
// with per-function target attributes, so one binary runs on any x86-64 machine (and the
// scalar path on anything else). Tests cap the ISA with set_isa() to exercise every path.
#pragma once

// GCC 12's AVX-512 headers start reductions from _mm512_undefined_*(), which trips these warnings.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>

#if defined(__x86_64__) || defined(__i386__)
#define LACO_X86 1
#include <immintrin.h>
#else
#define LACO_X86 0
#endif

#define LACO_AVX2 __attribute__((target("avx2,fma,bmi,bmi2,popcnt")))
#define LACO_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,popcnt")))
#define LACO_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi2,avx2,fma,bmi,bmi2,popcnt")))
#define LACO_INLINE inline __attribute__((always_inline))

namespace laco {

#if LACO_X86
// In place: r[i] holds row i of a 16 x 16 dword matrix; afterwards r[c] holds column c.
LACO_AVX512 LACO_INLINE void transpose16x16_epi32(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4q + c] now holds, in 128-bit lane l, rows 4l .. 4l + 3 of columns (4 * lane-in-block + c) of rows 4q ..
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// 16 fp32 -> 16 bf16, rounded to nearest even, NaN -> 0x7fc0: f32_to_bf16 in every lane (vcvtneps2bf16 would flush
// denormals).
LACO_AVX512 LACO_INLINE __m256i f32x16_to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan =
      _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0)));
}
#endif

// Every vector of an accumulator array (__m512 / __m256) set to zero with constant indices. A loop over the array
// made GCC zero a stack copy with rep stos and load it back (about 5% of the blocked bf16 bitmap kernel's time at
// M = 16 on 1536 x 576; stop 47).
template <typename V, size_t N, size_t... I>
LACO_INLINE void zero_vectors_at(V (&a)[N], std::index_sequence<I...>) {
  ((a[I] = V{}), ...);
}
template <typename V, size_t N>
LACO_INLINE void zero_vectors(V (&a)[N]) {
  zero_vectors_at(a, std::make_index_sequence<N>{});
}

// kAvx512Bf16 adds AVX512_BF16 (vdpbf16ps) and AVX512_VBMI2 (vpexpandw): bf16 x bf16 products
// summed in pairs into fp32, used by the linears when x and the weights are bf16.
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

Isa detected_isa();        // best ISA this CPU (and OS) supports
Isa active_isa();          // min(detected, cap set by set_isa)
void set_isa(const std::string& name);  // "auto" | "scalar" | "avx2" | "avx512" | "avx512bf16"
std::string isa_name(Isa isa);

// bf16 <-> fp32 on raw bits (bf16 is the upper half of an fp32).
LACO_INLINE float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to nearest even, NaN kept quiet (what c10::BFloat16 does).
LACO_INLINE uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

template <typename T>
LACO_INLINE float to_f32(T v);
template <>
LACO_INLINE float to_f32<float>(float v) { return v; }
template <>
LACO_INLINE float to_f32<uint16_t>(uint16_t v) { return bf16_to_f32(v); }

#if LACO_X86
// ---- SIMD loads shared by the linears: 16 / 8 weights (fp32, or bf16 bits widened exactly) -> fp32 lanes
template <typename VT>
LACO_AVX512 LACO_INLINE __m512 load16_f32_avx512(const VT* p) {
  if constexpr (std::is_same_v<VT, float>) {
    return _mm512_loadu_ps(p);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <typename VT>
LACO_AVX2 LACO_INLINE __m256 load8_f32_avx2(const VT* p) {
  if constexpr (std::is_same_v<VT, float>) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// Sum of the 8 lanes (the direct kernels' row epilogue).
LACO_AVX2 LACO_INLINE float hsum8_avx2(__m256 s) {
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}
#endif

// ---- ops (each in its own csrc/<op>.cpp) -------------------------------------------------
at::Tensor sparse24_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                           const c10::optional<at::Tensor>& bias, int64_t out_features, int64_t in_features);

at::Tensor bitmap_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmap,
                         const at::Tensor& offsets, int64_t tile_k, const c10::optional<at::Tensor>& bias,
                         int64_t out_features, int64_t in_features);

// The packed modules' eager CPU inference entry (csrc/module_fast.cpp): the result, or nothing when the
// call is not plain eager inference on well-formed CPU tensors (the caller then takes the op path).
c10::optional<at::Tensor> sparse24_linear_fast(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                               const c10::optional<at::Tensor>& bias, int64_t out_features,
                                               int64_t in_features);
c10::optional<at::Tensor> bitmap_linear_fast(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmap,
                                             const at::Tensor& offsets, int64_t tile_k,
                                             const c10::optional<at::Tensor>& bias, int64_t out_features,
                                             int64_t in_features);

// Dense [N, K] weight from the packed formats (the panel path's decompressors, whole weight).
at::Tensor sparse24_to_dense(const at::Tensor& values, const at::Tensor& meta, int64_t out_features,
                             int64_t in_features);
at::Tensor bitmap_to_dense(const at::Tensor& values, const at::Tensor& bitmap, const at::Tensor& offsets, int64_t tile_k,
                           int64_t out_features, int64_t in_features);
// Dense rows [r0, r1) of a 2:4 weight (values [N, K/2] fp32 or bf16 bits, meta [N, W]) into dst ([r1 - r0, K],
// VT = float or uint16_t) with the vector code of `isa` (csrc/sparse24_decompress.cpp).
template <typename VT>
void s24_decompress_rows(Isa isa, const VT* values, const uint32_t* meta, int64_t K, int64_t W, int64_t r0, int64_t r1,
                         VT* dst);
// The kept half [N, K/2] of a dense [N, K] fp32 / bf16 tensor at a 2:4 weight's positions (csrc/sparse24_gather.cpp).
at::Tensor sparse24_gather(const at::Tensor& dense, const at::Tensor& meta);

// masked_linear (csrc/masked_linear.cpp): weight [N, K] dense fp32 / bf16, bits int32 [N, ceil(K/32)].
at::Tensor masked_linear_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bits,
                                 const c10::optional<at::Tensor>& bias);
at::Tensor masked_linear_grad_input(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& bits);
at::Tensor masked_linear_grad_weight(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bits);

std::tuple<at::Tensor, at::Tensor> reconstruction_loss_forward(const at::Tensor& pred, const at::Tensor& target,
                                                               const std::string& kind);

at::Tensor reconstruction_loss_backward(const at::Tensor& grad_out, const at::Tensor& pred,
                                        const at::Tensor& target, const std::string& kind,
                                        const at::Tensor& stats);

// ---- helpers shared by the two linears ---------------------------------------------------
// Panel path (csrc/panel.cpp): y = x @ dense^T + bias through at::addmm on blocks of decompressed rows.
enum class LinearOp : int { kSparse24 = 0, kBitmap = 1 };
// Dense weight bytes from which a weight counts as large (streamed from memory rather than cache-resident):
// every size-dependent dispatch rule splits here (panel thresholds, split panels, the outer and pair kernels'
// ranges, the pair kernel's in-place read).
constexpr int64_t kLargeWeightBytes = int64_t{16} << 20;
// The direct kernels at M > 1 block K so the rows of x stay in L1 (linear_k_block), which makes the weight stream jump
// from row to row every block: short streams the prefetchers follow poorly. On a weight of kLargeWeightBytes and more
// (streamed from DRAM) that costs more than reading x from L2 saves, so there rows are read whole while x (in the
// kernel's dtype, x_es bytes) fits kWholeRowsXBytes. Stop 46, Zen 4 EPYC, the 2:4 direct path against F.linear in
// one process (the bench's forced path, 7-9 rounds, medians), K-blocks -> whole rows: bf16 11008x4096 M = 2 / 4 one
// thread 1.21x / 1.10x -> 2.19x / 1.49x, 4096x11008 1.38x / 1.25x -> 1.77x / 1.41x, M = 8 0.76x -> 1.12x (two threads
// 0.85x -> 1.35x); fp32 11008x4096 M = 2 / 4 / 8 1.94x / 2.31x / 1.72x -> 2.12x / 2.88x / 2.66x. A 128 KB budget left
// 4096x11008 bf16 at M = 2 / 4 at 1.51x / 1.39x. On cache-resident SmolLM2 weights whole rows lost (fp32 two threads
// 2.75-2.80x -> 1.75-2.27x), so smaller weights keep the K-blocks. The bitmap kernels: docs/cpu_kernels.md "Stop 46".
constexpr int64_t kWholeRowsXBytes = int64_t{256} << 10;
inline bool read_whole_rows(int64_t M, int64_t N, int64_t K, int64_t w_es, int64_t x_es) {
  return N * K * w_es >= kLargeWeightBytes && M * K * x_es <= kWholeRowsXBytes;
}
// fill(r0, r1, dst): write dense weight rows [r0, r1) (x's dtype, row-major [r1 - r0, K]) to dst.
using PanelFill = std::function<void(int64_t, int64_t, void*)>;
// Smallest M that takes the panel path for this op, x dtype and [N, K] weight under the active ISA
// (measured defaults, or the value of set_panel_min_m when that is >= 0).
int64_t panel_min_m(LinearOp op, at::ScalarType dt, int64_t N, int64_t K);
void set_panel_min_m(int64_t m);  // -1: measured defaults; 0: always the panel; huge: never
bool panel_min_m_forced();  // set_panel_min_m holds a forced threshold
void set_panel_bytes(int64_t bytes);  // 0: the measured default (1 MB; 2 MB for bf16 on AVX512_BF16 without AMX)
// Split the panel path's rows between threads, each running its own panels through a sequential BLAS
// call: -1 measured default, 0 off, 1 on (benchmarks, tests). panel_split: what a call would do.
void set_panel_split(int64_t mode);
bool panel_split(int64_t M, int64_t N, int64_t K, int64_t element_size);
int64_t panel_bytes();
// x: [M, K] CPU fp32 / bf16 (any strides), already checked; returns y [M, N] in x's dtype.
at::Tensor panel_linear(const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t N, int64_t K,
                        const PanelFill& fill);

// Mid-M path of the 2:4 linear (csrc/outer_linear.cpp, AVX2): outer products over the kept weights.
// outer_min_m: smallest M that takes it (below panel_min_m; huge where the active ISA has no such kernel
// or K is too large for its int32 offsets).
int64_t outer_min_m(LinearOp op, at::ScalarType dt, int64_t N, int64_t K);
void set_outer_min_m(int64_t m);  // -1: measured defaults; 0: from M = 1 on; huge: never
// Kept weights of row n over columns [k0, k1) for the outer-product kernel: decode writes off[j] (float
// index of column c_j in the M-block's xt, c_j * mp; at most k1 - k0 + 64 entries) and returns the count
// and their fp32 values (vals, filled by decode, or a pointer into an fp32 values tensor).
struct Decoded {
  int64_t count;
  const float* vals;
};
using Decode = std::function<Decoded(int64_t n, int64_t k0, int64_t k1, int64_t mp, int32_t* off, float* vals)>;
// y [M, N] in out_dtype = x32 [M, K] @ W^T + b32 with W given by decode; every K-block starts at a
// multiple of k_align. x32 fp32 contiguous, b32 fp32 [N] or undefined.
at::Tensor outer_linear(const at::Tensor& x32, const at::Tensor& b32, int64_t N, int64_t K, int64_t k_align,
                        at::ScalarType out_dtype, const Decode& decode);
// x32 [M, K] fp32 contiguous, b32 fp32 [N] or undefined; y [M, N] in out_dtype.
at::Tensor sparse24_outer(const at::Tensor& x32, const at::Tensor& b32, const at::Tensor& values, const at::Tensor& meta,
                          int64_t N, int64_t K, at::ScalarType out_dtype);

// pair_path: whether op runs the bf16 pair kernel below at this M (bf16, AVX512_BF16 without AMX, M in
// [outer_min_m, pair_max_m), bitmap density at most 0.4 unless set_outer_min_m forces it); pair_max_m: first M past its range (0 if none).
int64_t pair_max_m(LinearOp op, at::ScalarType dt, int64_t N, int64_t K);
// The path a linear takes (the one dispatch of sparse24_linear / bitmap_linear, also reported to Python):
// AMX tiles, the bf16 pair kernel, decompressed panels, the outer-product kernel (fp32 x), or the direct
// kernel (also for empty shapes). density: the bitmap's nonzero fraction (ignored for 2:4).
enum class LinearPath : int { kDirect = 0, kOuter = 1, kPair = 2, kPanel = 3, kAmx = 4, kShuffle = 5, kLanes = 6 };
// 2:4 bf16 shuffle kernel (lanes_bf16.cpp) on AVX512_BF16 CPUs without AMX: M in [shuffle_min_m, ...).
int64_t shuffle_min_m(LinearOp op, at::ScalarType dt, int64_t N, int64_t K);
void set_shuffle_min_m(int64_t m);  // -1: measured defaults; 0: from M = 1 on; huge: never
// The bitmap on AVX-512 CPUs without AMX (bf16: AVX512_BF16 and K even): rows decompressed 32 at a time into a
// lane-major panel and our own loop (lanes_dense_bf16 / lanes_dense_fp32), M in [lanes_min_m, ...) for weights under
// 16 MB at density >= 0.25 (bf16 from M = 32, fp32 from the panels' threshold).
int64_t lanes_min_m(LinearOp op, at::ScalarType dt, int64_t N, int64_t K, double density);
void set_lanes_min_m(int64_t m);  // -1: measured defaults; 0: from M = 1 on; huge: never
LinearPath linear_path(LinearOp op, at::ScalarType dt, int64_t M, int64_t N, int64_t K, double density = 0.0);
bool pair_path(LinearOp op, at::ScalarType dt, int64_t M, int64_t N, int64_t K, double density = 0.0);
// bf16 mid-M path on AVX512_BF16 CPUs (csrc/pair_outer_bf16.cpp):
// one vdpbf16ps per kept weight pair and 16 rows of x. x [M, K] bf16 (any strides), b32 fp32 [N] or
// undefined, weights already checked by the caller; y [M, N] bf16.
at::Tensor sparse24_pair_bf16(const at::Tensor& x, const at::Tensor& b32, const at::Tensor& values,
                              const at::Tensor& meta, int64_t N, int64_t K);
// bf16 2:4 shuffle path on AVX512_BF16 CPUs (csrc/lanes_bf16.cpp): features in the lanes, x pairs picked
// per lane by vpshufb. Same contract as sparse24_pair_bf16.
at::Tensor sparse24_shuffle_bf16(const at::Tensor& x, const at::Tensor& b32, const at::Tensor& values,
                                 const at::Tensor& meta, int64_t N, int64_t K);
// fp32 2:4 shuffle path on AVX-512 CPUs (csrc/lanes_fp32.cpp): x32 [M, K] fp32 contiguous; y [M, N] fp32.
at::Tensor sparse24_shuffle_fp32(const at::Tensor& x32, const at::Tensor& b32, const at::Tensor& values,
                                 const at::Tensor& meta, int64_t N, int64_t K);
// The lanes panel of weight rows [n0, n0 + nrows) (nrows <= 32) and units [p0, p0 + pc) (p0 a multiple of 16;
// bf16: column pairs, fp32: columns, p0 a multiple of 32): pan[(c * 2 + v) * 16 + i] = the dword (bf16 pair
// (2 (p0 + c), 2 (p0 + c) + 1), or fp32 value p0 + c) of row n0 + 16 v + i, zero past nrows and past K. Called for
// a block's K-blocks in order; `cursor` (32 slots, the thread's) carries each row's position in the compressed
// stream from one K-block to the next (p0 == 0 starts them).
using LanesPanelFill = std::function<void(int64_t n0, int64_t nrows, int64_t p0, int64_t pc, int64_t* cursor,
                                          uint32_t* pan)>;
// fp32 GEMM with output features in the lanes on weights decompressed straight into its panels by `fill`
// (lanes_fp32.cpp; blocks of 128 columns). x32 [M, K] fp32 contiguous; y [M, N] fp32.
at::Tensor lanes_dense_fp32(const at::Tensor& x32, const at::Tensor& b32, int64_t N, int64_t K,
                            const LanesPanelFill& fill);
// bf16 GEMM with output features in the lanes on weights decompressed straight into its panels by `fill`
// (csrc/lanes_bf16.cpp, beside the shuffle kernel); K even.
at::Tensor lanes_dense_bf16(const at::Tensor& x, const at::Tensor& b32, int64_t N, int64_t K, const LanesPanelFill& fill);
at::Tensor bitmap_pair_bf16(const at::Tensor& x, const at::Tensor& b32, const at::Tensor& values,
                            const at::Tensor& bitmap, const at::Tensor& offsets, int64_t tile_k, int64_t N, int64_t K);

// bf16 path on Intel AMX tiles (csrc/amx_linear.cpp): rows decompressed by `fill` straight into the
// tile layout. amx_available: the CPU has AMX-BF16 / AMX-TILE (and AVX512_BF16) and the OS granted the
// tile state. amx_min_m: smallest M that takes it (huge for fp32, without AMX, when disabled or when the
// ISA is capped below avx512bf16); the path runs for amx_min_m <= M < amx_max_m.
bool amx_available();
void set_amx_enabled(bool on);
int64_t amx_min_m(LinearOp op, at::ScalarType dt, int64_t N, int64_t K);
// first M past the AMX range (the panel path from there on); huge when set_amx_min_m forces the path
int64_t amx_max_m(LinearOp op, at::ScalarType dt, int64_t N, int64_t K);
void set_amx_min_m(int64_t m);  // -1: measured defaults; 0: from M = 1 on; huge: never
// spans(r0, r1, s): the s-th (0 or 1) contiguous byte range holding rows [r0, r1) of the packed weight
// ({nullptr, 0} if none), prefetched while the previous rows are multiplied.
using RowSpans = std::function<std::pair<const char*, int64_t>(int64_t, int64_t, int)>;
// x: [M, K] bf16 CPU (any strides), already checked; returns y [M, N] bf16.
at::Tensor amx_linear(const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t N, int64_t K,
                      const PanelFill& fill, const RowSpans& spans);

// bitmap_linear, bf16 x at the AVX512_BF16 ISA on the direct path: M in [bitmap_block_min_m(),
// bitmap_block_max_m(K, density)) runs the register-blocked kernel (3 weight rows x 8 rows of x) instead of the
// one-row kernel. set_bitmap_block_min_m(m >= 0) forces the lower bound and lifts the upper; -1: the defaults.
int64_t bitmap_block_min_m();
int64_t bitmap_block_max_m(int64_t K, double density);
void set_bitmap_block_min_m(int64_t m);

// Software prefetch distance (bytes) of a direct kernel's values stream at M = 1 (whole rows).
int64_t prefetch_bytes(LinearOp op);
void set_prefetch_bytes(LinearOp op, int64_t bytes);  // -1: the default

// Columns of x per K-block for an M-block of m rows: the whole row when one row (m = 1) fits in
// 512 KB, for m > 1 when the m rows fit in 24 KB of L1 (else each weight vector costs m L2 reads
// of x); otherwise a multiple of `align` columns that does.
int64_t linear_k_block(int64_t m, int64_t k, int64_t align);

// Weight rows per parallel chunk for an [m, k] x: at least ~1M multiply-adds per chunk, so an op too
// small to repay an OpenMP fork/join (SmolLM2's linears at decode: ~40 us) runs on one thread.
int64_t linear_row_grain(int64_t m, int64_t k);

// Checks shared by the linears (device, rank, K, dtype of x and values).
void linear_check_x(const at::Tensor& x, const at::Tensor& values, int64_t in_features, const char* op);
// Returns x as fp32 [M, K] contiguous (a copy for bf16 x); call linear_check_x first.
at::Tensor linear_x_fp32(const at::Tensor& x, const at::Tensor& values, int64_t in_features, const char* op);
// bias as fp32 [N] contiguous, or an undefined tensor.
at::Tensor linear_bias_fp32(const c10::optional<at::Tensor>& bias, int64_t out_features, const char* op);

}  // namespace laco
