// bf16 sparse linears on Intel AMX tiles: y = x @ W^T + b, W decompressed 32 rows at a time.
//
// Why: on a CPU with AMX the dense bf16 F.linear (oneDNN brgemm) is fast at multiply-adds but pays a
// fixed cost per call to re-lay the weight into AMX's pair-interleaved ("VNNI") tile layout (measured on
// the Xeon of docs/cpu_kernels.md: 1536x576 bf16, 0.25 ms at M = 1 and 0.30 ms at M = 16, i.e. the weight
// pass, not the 14M multiply-adds). The panel path (panel.cpp) paid that pass twice: our decompression
// into a dense panel, then oneDNN's re-layout of the panel. Here the decompressed rows feed the tiles
// directly, 32 rows at a time (L1 / L2): one pass over the compressed weight, half (2:4) or less (bitmap)
// of the dense bytes.
//
// Layout: C = W x^T. The weight is the A operand, so it needs no re-layout at all: W is processed in
// blocks of 32 output rows; each row is decompressed (the op's own row decompressor, PanelFill) into
// `dense` [32, Kp] (Kp = K rounded up to 32, zero tail), and A tiles (16 rows x 32 columns) are loaded
// from it as it is. x is the B operand: once per call it is copied into a zero-padded [Mp, Kp] buffer (any
// strides in, no tail cases in the tile loop) and each 16 x 16 block of its column pairs is transposed
// into `xv` (B tile row kp holds, for 16 rows m of x, the pair x[m, 2kp], x[m, 2kp + 1]): M * K work once
// per call instead of N * K per call. For each 32-row weight block and each pair of 16-row tiles of x
// the four C tiles (32 x 32 fp32, y^T) run over all of K, are transposed back, bias is added and y is
// rounded to bf16 once (fp32 accumulation throughout, like the direct kernels). A first version that
// transposed the weight into the B layout instead spent 0.25 ms of a 0.43 ms call on the transposes.
//
// Measured limits on the Xeon this was written on (a VM; docs/cpu_kernels.md): a 1 KB tile load costs
// ~34 ns and a TDPBF16PS ~17.5 ns, and they did not overlap (4 loads + 4 products per K-step of the 2 x 2
// block: 214 ns, ~150 G multiply-adds/s, about what oneDNN reaches on dense bf16 at large M). So from a
// few hundred rows of x on, the dense GEMM is as fast as these tiles and the panel path takes over.
//
// Tiles: 0-3 C, 4-5 A (weight), 6-7 B (x). Threads split the 32-row blocks; each thread configures its
// tiles (LDTILECFG) per call and releases them at the end. The OS must grant the tile state
// (arch_prctl ARCH_REQ_XCOMP_PERM, Linux >= 5.16): amx_available() asks once and is false otherwise.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "laco_cpu.h"

#if LACO_X86
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

// AMX intrinsics need GCC >= 11 or clang >= 12; an older compiler builds the extension without this path.
#if LACO_X86 && ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define LACO_HAS_AMX 1
#else
#define LACO_HAS_AMX 0
#endif
#define LACO_AMX \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,bmi,bmi2")))

namespace laco {
namespace {

std::atomic<int64_t> g_amx_min_m_override{-1};
std::atomic<bool> g_amx_enabled{true};

bool amx_os_ready() {
#if LACO_HAS_AMX && defined(__linux__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amx_bf16 = (edx >> 22) & 1u, amx_tile = (edx >> 24) & 1u;
  if (!amx_bf16 || !amx_tile) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

#if LACO_HAS_AMX
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// out[16 rows] = transpose of the 16 x 16 dwords at src (row stride `ld` dwords).
LACO_AMX LACO_INLINE void transpose16x16_regs(const uint32_t* src, int64_t ld, __m512i* out) {
  __m512i r[16], a[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * ld);
  for (int i = 0; i < 8; ++i) {  // 32-bit interleave of row pairs, per 128-bit lane
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // lane L of r[4i + j]: column 4L + j of rows 4i .. 4i + 3
    r[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // 4 x 4 transpose of 128-bit lanes across r[j], r[4 + j], r[8 + j], r[12 + j]
    const __m512i c0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44), c1 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xEE);
    const __m512i c2 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44);
    const __m512i c3 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xEE);
    out[0 + j] = _mm512_shuffle_i32x4(c0, c2, 0x88);
    out[4 + j] = _mm512_shuffle_i32x4(c0, c2, 0xDD);
    out[8 + j] = _mm512_shuffle_i32x4(c1, c3, 0x88);
    out[12 + j] = _mm512_shuffle_i32x4(c1, c3, 0xDD);
  }
}

// dst[16 rows][16 dwords] = transpose of the 16 x 16 dwords at src (row stride `ld` dwords).
LACO_AMX LACO_INLINE void transpose16x16(const uint32_t* src, int64_t ld, uint32_t* dst) {
  __m512i out[16];
  transpose16x16_regs(src, ld, out);
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + i * 16, out[i]);
}

// y rows [m0, m0 + rows) x columns [n0, n0 + nc) = bf16(C^T + bias), C = cbuf [32 n][32 m] fp32: each
// 16 x 16 quarter is transposed in registers and stored straight into y (masked at the N edge).
LACO_AMX LACO_INLINE void store_block(const float* cbuf, int64_t rows, const float* bias, int64_t n0, int64_t nc,
                                      int64_t N, uint16_t* y) {
  const uint32_t* c = reinterpret_cast<const uint32_t*>(cbuf);
  for (int h = 0; h < 2; ++h) {  // 16 columns of y (rows n of C)
    const int64_t c0 = 16 * h;
    if (c0 >= nc) break;
    const __mmask16 mk = static_cast<__mmask16>(nc - c0 >= 16 ? 0xFFFF : (1u << (nc - c0)) - 1u);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mk, bias + n0 + c0) : _mm512_setzero_ps();
    for (int q = 0; q < 2; ++q) {  // 16 rows of y (columns m of C)
      const int64_t r0 = 16 * q;
      if (r0 >= rows) break;
      __m512i t[16];
      transpose16x16_regs(c + c0 * 32 + r0, 32, t);
      const int64_t rn = std::min<int64_t>(16, rows - r0);
      for (int64_t r = 0; r < rn; ++r) {
        const __m512 v = _mm512_add_ps(_mm512_castsi512_ps(t[r]), b);
        _mm256_mask_storeu_epi16(y + (r0 + r) * N + n0 + c0, mk, (__m256i)_mm512_cvtneps_pbh(v));
      }
    }
  }
}

// Software prefetch of the next block's compressed rows, spread over the current block's tile loop, so
// the weight stream from memory can overlap the tile work (measured effect small: 7B 11008x4096 at M = 8,
// 13.8 -> 13.3 ms; decompression 8.5 ms and tiles 2.8 ms of it).
struct Prefetcher {
  const char* cur[2] = {nullptr, nullptr};
  const char* end[2] = {nullptr, nullptr};
  int64_t lines_per_step = 0;
  LACO_INLINE void step() {
    for (int64_t j = 0; j < lines_per_step; ++j) {
      const int s = cur[0] < end[0] ? 0 : 1;
      if (cur[s] >= end[s]) return;
      _mm_prefetch(cur[s], _MM_HINT_T1);
      cur[s] += 64;
    }
  }
};

// One block of 32 weight rows (`dense` [32, Kp], the A operand: C = W x^T) against every pair of 16-row
// tiles of x (`xv`: per 16 rows of x and 32 columns, a 1 KB B tile of column pairs). C tiles hold y^T,
// transposed back in registers by the bf16 store.
LACO_AMX void block_tiles(const uint16_t* dense, int64_t Kp, const uint16_t* xv, int64_t M, int64_t Mt,
                          const float* bias, int64_t n0, int64_t nc, int64_t N, float* cbuf, uint16_t* y,
                          Prefetcher& pf) {
  const int64_t ksteps = Kp / 32, ws = Kp * 2;
  const uint16_t* w1 = dense + 16 * Kp;
  for (int64_t mt = 0; mt < Mt; mt += 2) {
    const uint16_t* b0 = xv + mt * ksteps * 512;
    if (mt + 1 < Mt) {
      const uint16_t* b1 = b0 + ksteps * 512;
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      for (int64_t ks = 0; ks < ksteps; ++ks) {
        pf.step();
        _tile_loadd(4, dense + ks * 32, ws);
        _tile_loadd(5, w1 + ks * 32, ws);
        _tile_loadd(6, b0 + ks * 512, 64);
        _tile_loadd(7, b1 + ks * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, cbuf, 128);                // cbuf [32 n][32 m]
      _tile_stored(1, cbuf + 16, 128);
      _tile_stored(2, cbuf + 16 * 32, 128);
      _tile_stored(3, cbuf + 16 * 32 + 16, 128);
    } else {  // the last 16 rows of x
      _tile_zero(0); _tile_zero(2);
      for (int64_t ks = 0; ks < ksteps; ++ks) {
        pf.step();
        _tile_loadd(4, dense + ks * 32, ws);
        _tile_loadd(5, w1 + ks * 32, ws);
        _tile_loadd(6, b0 + ks * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
      }
      _tile_stored(0, cbuf, 128);
      _tile_stored(2, cbuf + 16 * 32, 128);
    }
    store_block(cbuf, std::min<int64_t>(32, M - 16 * mt), bias, n0, nc, N, y + 16 * mt * N);
  }
}

LACO_AMX void amx_rows(const uint16_t* xv, int64_t M, int64_t Mt, int64_t N, int64_t K, int64_t Kp,
                       const float* bias, int64_t blk0, int64_t blk1, const PanelFill& fill, const RowSpans& spans,
                       uint16_t* y) {
  thread_local std::vector<uint16_t> dense;
  thread_local std::vector<float> cbuf;
  dense.resize(static_cast<size_t>(32 * Kp));
  cbuf.resize(32 * 32);
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t n0 = blk * 32, nc = std::min<int64_t>(32, N - n0);
    if (Kp == K) {
      fill(n0, n0 + nc, dense.data());
    } else {
      for (int64_t r = 0; r < nc; ++r) {
        uint16_t* row = dense.data() + r * Kp;
        fill(n0 + r, n0 + r + 1, row);
        std::fill(row + K, row + Kp, uint16_t{0});
      }
    }
    if (nc < 32) std::fill(dense.begin() + nc * Kp, dense.end(), uint16_t{0});
    Prefetcher pf;
    if (blk + 1 < blk1 && spans) {
      const int64_t m0 = (blk + 1) * 32, m1 = std::min<int64_t>(N, m0 + 32);
      int64_t lines = 0;
      for (int s = 0; s < 2; ++s) {
        const std::pair<const char*, int64_t> sp = spans(m0, m1, s);
        pf.cur[s] = sp.first;
        pf.end[s] = sp.first ? sp.first + sp.second : nullptr;
        lines += (sp.second + 63) / 64;
      }
      pf.lines_per_step = (lines + Kp / 32 - 1) / (Kp / 32);
    }
    block_tiles(dense.data(), Kp, xv, M, Mt, bias, n0, nc, N, cbuf.data(), y, pf);
  }
  _tile_release();
}

// xv [Mt][Kp / 32][16 x 16 pairs]: B tiles of x (row kp of a tile: columns 2kp, 2kp + 1 of 16 rows of x).
LACO_AMX void build_xv(const uint16_t* xp, int64_t Mt, int64_t Kp, uint16_t* xv) {
  const uint32_t* src = reinterpret_cast<const uint32_t*>(xp);
  uint32_t* dst = reinterpret_cast<uint32_t*>(xv);
  const int64_t ksteps = Kp / 32;
  for (int64_t mt = 0; mt < Mt; ++mt) {
    for (int64_t ks = 0; ks < ksteps; ++ks) {
      transpose16x16(src + mt * 16 * (Kp / 2) + ks * 16, Kp / 2, dst + (mt * ksteps + ks) * 256);
    }
  }
}
#endif

}  // namespace

bool amx_available() {
  static const bool ok = detected_isa() == Isa::kAvx512Bf16 && amx_os_ready();
  return ok;
}

void set_amx_enabled(bool on) { g_amx_enabled = on; }

int64_t amx_min_m(LinearOp op, at::ScalarType dt, int64_t N, int64_t K) {
  if (dt != at::kBFloat16 || !g_amx_enabled.load() || active_isa() != Isa::kAvx512Bf16 || !amx_available()) {
    return int64_t{1} << 62;
  }
  const int64_t o = g_amx_min_m_override.load();
  if (o >= 0) return o;
  // Measured on the AMX Xeon (docs/cpu_kernels.md, one thread, interleaved with F.linear): below this M
  // the direct kernels win (2:4 1536x576 M = 4: direct 1.65x vs AMX 1.31x dense, M = 8: 1.18x vs 1.40x;
  // bitmap 60% M = 1: direct 2.23x vs 1.80x, M = 2: 1.79x vs 1.91x; 7B bitmap M = 4: 0.87x vs 1.39x).
  (void)N; (void)K;
  return op == LinearOp::kSparse24 ? 8 : 2;
}

int64_t amx_max_m(LinearOp op, at::ScalarType dt, int64_t N, int64_t K) {
  (void)op; (void)dt;
  const int64_t o = g_amx_min_m_override.load();
  if (o >= 0) return int64_t{1} << 62;  // a forced threshold forces the path for every larger M too
  // From here the tiles are compute-bound and oneDNN's dense GEMM on whole-weight panels is as fast or
  // faster (1536x576 M = 256: AMX 0.74x, panel 0.90x dense; 7B M = 256: AMX 0.66-0.78x, panel 0.73-0.79x).
  (void)N; (void)K;
  return 256;
}

void set_amx_min_m(int64_t m) { g_amx_min_m_override = m; }

at::Tensor amx_linear(const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t N, int64_t K,
                      const PanelFill& fill, const RowSpans& spans) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && amx_available(), "amx_linear: needs bf16 x and a CPU with AMX");
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
#if LACO_HAS_AMX
  const int64_t Kp = (K + 31) / 32 * 32, Mt = (M + 15) / 16;
  at::Tensor xp = at::zeros({Mt * 16, Kp}, x.options());
  xp.narrow(0, 0, M).narrow(1, 0, K).copy_(x);
  at::Tensor xv = at::empty({Mt * 16, Kp}, x.options());
  build_xv(reinterpret_cast<const uint16_t*>(xp.data_ptr()), Mt, Kp, reinterpret_cast<uint16_t*>(xv.data_ptr()));
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) b32 = bias->to(at::kFloat).contiguous();
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  const uint16_t* xvp = reinterpret_cast<const uint16_t*>(xv.data_ptr());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const int64_t blocks = (N + 31) / 32;
  const int64_t grain = std::max<int64_t>(1, (linear_row_grain(M, K) + 31) / 32);
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    amx_rows(xvp, M, Mt, N, K, Kp, bp, b0, b1, fill, spans, yp);
  });
#else
  (void)bias; (void)K; (void)fill; (void)spans;
#endif
  return y;
}

}  // namespace laco
