// Compute-bound shapes: decompress a block of weight rows into a dense panel and hand it to the BLAS
// that F.linear uses (at::addmm / at::mm: MKL sgemm for fp32, oneDNN for bf16, AMX where the CPU has it).
//
// Why: the direct kernels (sparse24_linear.cpp, bitmap_linear.cpp) gather or expand the weight once per
// block of up to 8 rows of x and then do vector FMAs; that wins while the weight stream from memory
// dominates (small M), but from some M on the BLAS microkernels (register-blocked over M and N, AMX
// tiles for bf16) do several times more multiply-adds per cycle. Above panel_min_m() each op expands
// `rows` weight rows at a time (a panel of about kPanelBytes, reused for every row of x) and runs one
// GEMM per panel, writing straight into the output's column block: the extra cost over dense F.linear
// is one pass that writes the panel, against half (2:4) or less (bitmap) of the weight read from memory.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>

#include "laco_cpu.h"

namespace laco {

namespace {
// Dense bytes per panel (at least M rows, at most kMaxPanelBytes). Two costs pull apart: a panel that
// leaves L2 (2 MB/core on the Xeon we measured) is written back and re-read, which for memory-bound M
// costs more than the half of the weight 2:4 saves; a panel of few rows makes the GEMM re-pack x once
// per panel (M x K each time) and run its microkernels on a narrow N. Measured on the 2-core Xeon (AMX)
// with predecompressed panels against one F.linear: 0.5 MB panels 0.54-0.92x at M >= 16, 8 MB 0.84-1.2x
// (under load); with decompression the 1-2 MB panels were no worse than 8 MB at M <= 64 (see
// docs/cpu_kernels.md). Hence: 1 MB, or M rows when M is larger (x re-packed at most ~once per own size);
// bf16 without AMX: 2 MB (call_panel_bytes, measured on a Zen 4 EPYC).
constexpr int64_t kDefaultPanelBytes = int64_t{1} << 20;
std::atomic<int64_t> g_panel_bytes{kDefaultPanelBytes};
std::atomic<bool> g_panel_bytes_set{false};  // set_panel_bytes holds a value (else the dtype rule below)
constexpr int64_t kMaxPanelBytes = int64_t{8} << 20;
constexpr int64_t kHugePanelBytes = int64_t{64} << 20;
std::atomic<int64_t> g_min_m_override{-1};

// Smallest M that takes the panel path, per op, dtype, ISA of the direct kernel and weight size.
// Measured (interleaved with F.linear, ratios of minima; the 2-core Xeon was heavily loaded, load
// average 7-13, so these are coarse) on SmolLM2 576x1536 / 1536x576 ("small": the dense weight stays in
// cache, dense F.linear pays no memory stream, the direct kernels win longer) and 7B 4096x11008 /
// 11008x4096 ("large": dense streams >= 16 MB from DRAM). Table and evidence: docs/cpu_kernels.md.
// AVX2 has its own values (measured on an AVX2-only EPYC); AVX-512 without BF16 uses the Xeon's.
int64_t default_min_m(LinearOp op, at::ScalarType dt, Isa isa, int64_t dense_bytes, int64_t K) {
  const bool bf16 = dt == at::kBFloat16, large = dense_bytes >= kLargeWeightBytes;
  if (isa == Isa::kScalar) return 2;  // the scalar kernels lose to any BLAS beyond one row of x
  if (isa == Isa::kAvx2) {
    // AVX2 machine (AMD EPYC family 25 model 1, 1 thread, interleaved with F.linear; docs/cpu_kernels.md).
    // 2:4 below this M runs the direct kernel (M < 8) or the outer-product kernel (outer_linear.cpp);
    // the panel took over from M = 64 on SmolLM2 shapes (1536x576 M = 64: panel 1.07x, outer 1.04x,
    // M = 128: 1.01x vs 0.68x), from M = 8 on 7B fp32 (11008x4096 M = 8: panel 1.92x, outer 1.66x,
    // direct 1.29x; MKL's sgemm is slow there at small M on the whole weight but not on 1 MB panels) and
    // from M = 16 on 7B bf16 (M = 8: outer 1.71x, panel 1.40x; M = 16: 2.84x vs 2.51x). Bitmap: the
    // direct kernel up to M = 8 on SmolLM2 (M = 8: direct 1.12x, panel 1.08x; M = 16: 0.80x vs 1.11x),
    // the panel from M = 8 on 7B (M = 8 fp32: 1.84x vs 1.47x).
    // Small fp32 weights depend on the thread count (idle machine, bench/results/cpu_kernels_epyc_avx2_smollm2.json):
    // one thread: 2:4 panel from M = 16 (1536x576 M = 16 / 32: panel 1.20x / 1.09x, outer 1.11x / 0.90x;
    // 576x1536: 1.06x / 0.92x vs 0.85x / 0.76x), bitmap panel from M = 8 (576x1536 70% M = 8: 1.08x vs
    // direct 0.89x); two threads: 2:4 outer up to M = 63 (1536x576 M = 32: 1.45x vs panel 0.86x; 576x1536
    // M = 16: 1.58x vs 0.82x), bitmap direct up to M = 15 (1536x576 70% M = 8: 1.98x vs 1.33x).
    // Small fp32 weights re-measured on a Zen 3 EPYC (family 25 model 1, idle, `--paths`, 7-9 rounds; stop 35,
    // bench/results/cpu_kernels_epyc_zen3_smollm2_fp32_paths{,_m128,_after}_stop35.json): the 2:4 outer-product
    // kernel beat the panels from M = 16 to 64 in two runs at one thread (1.09-1.44x against 0.92-1.17x) and
    // two (1.20-1.73x against split panels 0.89-1.36x); at 128 it won 6 cells of 8 (0.85-1.32x against
    // 0.97-1.18x), at 192 it lost (0.91-1.03x against 0.95-1.03x): 2:4 panels from M = 160 at either thread
    // count (they started at 16 / 64). Bitmap at one thread, M = 8: direct 0.88-1.11x against panels
    // 0.75-0.81x, M = 16: 0.68-0.84x against 0.87-1.05x: panels from M = 16 at either thread count.
    if (op == LinearOp::kSparse24) return large ? (bf16 ? 16 : 8) : (bf16 ? 64 : 160);
    return large ? 8 : 16;
  }
  int64_t m;
  if (op == LinearOp::kSparse24) {
    // bf16 small: Zen 4 EPYC without AMX (stop 36, bench/results/cpu_kernels_epyc_zen4_smollm2_paths_stop36.json):
    // at M = 16 the direct kernel 1.04-1.24x (one thread) / 0.98-1.02x (two) against panels 0.95-1.21x /
    // 0.70-0.78x, at M = 32 panels win (0.92-0.94x against 0.79-0.83x): panels from 32 (was 16, the Xeon).
    // fp32: the outer-product kernel below 128; on weights of 16 MB or more below 512 (one thread) or 1024
    // (two or more). Zen 4 EPYC, 7B shapes, two threads, forced paths interleaved with F.linear (stop 39,
    // bench/results/cpu_kernels_epyc_zen4_7b_fp32_m64_256_t2_paths_stop39.json, ..._m512_1024_...): outer /
    // panel / split panels M = 128 1.65x / 0.83x / 1.56x (11008x4096), 1.11x / 0.97x / 1.06x (4096x11008);
    // M = 256 1.32x / 0.90x / 1.29x, 1.11x / 0.82x / 1.08x; M = 512 1.08x / 1.09x / 1.15x, 1.01x / 0.92x /
    // 1.04x (the panel rule took 0.92x there: cpu_kernels_epyc_zen4_7b_fp32_t2_outer_rule_stop39.json, 0.93x);
    // M = 1024 0.92x / 1.07x / 1.03x, 0.98x / 0.95x / 0.93x: panels from 1024. One thread, same weights
    // (..._m128_512_t1_paths_stop39.json): M = 128 1.20x / 1.11x / 1.10x, 1.08x / 0.96x / 0.90x; M = 256 1.11x /
    // 1.08x / 1.01x, 1.08x / 1.01x / 0.95x; M = 512 1.08x / 1.09x / 1.09x, 0.98x / 1.00x / 0.98x: panels from 512.
    m = bf16 ? (large ? 8 : (amx_available() ? 16 : 32)) : (large ? (at::get_num_threads() > 1 ? 1024 : 512) : 128);
  } else {
    // fp32, one thread: the outer-product kernel from M = 16 (outer_linear.cpp) up to 256; with two threads
    // on SmolLM2 shapes it did not beat the panel (the old values, panels from 8); on 7B shapes (weights of
    // 16 MB or more) it did, up to 1023: Zen 4 EPYC, two threads, bitmap 50% / 70%, the outer kernel forced
    // against the panels this rule chose before (stop 39, bench/results/bitmap_fp32_7b_t2_outer_vs_auto_zen4_stop39.json,
    // medians of 5 interleaved rounds, x F.linear): M = 16 1.88x / 1.13x (11008x4096, 50%), 3.15x / 0.49x
    // (70%), 1.13x / 1.33x (4096x11008, 50%: the one cell the panels won), 1.88x / 1.65x; M = 64 1.42-2.60x
    // against 1.17-1.55x; M = 256 1.09-1.68x against 0.82-1.11x; M = 512 1.09-1.44x against 0.92-1.00x; bitmap 70%
    // at M = 1024 (cpu_kernels_epyc_zen4_7b_fp32_m512_1024_t2_paths_stop39.json) 1.28-1.35x against 0.99-1.04x,
    // 50% not measured there (its multiply-adds are the 2:4 kernel's, which lost at 1024): panels from 1024.
    // One thread on the same weights: bitmap 70% outer / panels M = 256 1.57x / 1.07x, 1.48x / 0.97x; M = 512
    // 1.52x / 1.09x, 1.41x / 0.99x (..._m128_512_t1_paths_stop39.json); 50% (bitmap50_fp32_7b_t1_outer_vs_auto_zen4_stop39.json)
    // M = 256 1.18x / 1.06x, 1.17x / 1.03x; M = 512 1.09x / 1.02x, 1.13x / 1.04x: panels from 1024 there too.
    // fp32 7B: the direct kernel reads 30% of the bytes, 1.85x dense at M = 8.
    // bf16 small without AMX: Zen 4 (stop 36, after the direct kernel's unmasked loads;
    // bench/results/cpu_kernels_epyc_zen4_bf16_m8_16_paths_stop36.json): at M = 8 the direct kernel
    // 0.89-1.13x (one thread) / 0.91-0.95x (two) against panels 0.72-1.01x / split 0.75-0.78x, at M = 16
    // panels win (0.76-0.89x / split 0.92-0.95x against 0.63-0.82x): panels from 16 (were 8).
    // Stop 42, the same Zen 4: the direct path's register-blocked bf16 kernel (csrc/bitmap_avx512.inc,
    // bm_bf16_block) against the split panels, forced, 15 rounds interleaved (`bench/cpu_kernels.py --paths`,
    // bench/results/cpu_kernels_epyc_zen4_smollm2_bf16_paths_stop42.json; speed ratios, one / two threads):
    // 1536x576 50% M = 16 1.10x / 1.31x, M = 32 0.94x / 1.08x, M = 64 0.87x / 0.90x; 576x1536 M = 16 1.25x /
    // 1.54x, M = 32 1.09x / 1.18x, M = 64 1.00x / 1.15x: panels from 32, and from 64 where K >= 1024. Weights of
    // 16 MB or more keep 8 (7B, M = 8, 50%: blocked 0.84-0.92x the split panels; ..._7b_bf16_paths_stop42.json).
    // Below AVX512_BF16 (no blocked kernel) small weights keep 16.
    const int64_t small_bf16 = isa >= Isa::kAvx512Bf16 ? (K >= 1024 ? 64 : 32) : 16;
    // fp32 small weights with two or more threads, AVX-512 without AMX: from 12 (was 8). Since stop 44 the fp32 lanes
    // kernel (which starts at this M; outer_linear.cpp, lanes_min_m) took the panels' place, and at M = 8 the direct
    // kernel beat it in all 8 cells (stop 47, Zen 4, two threads, 1536x576 and 576x1536 at 50% and 70%, two runs,
    // dense / 2:4 / both bitmaps and the forced paths interleaved, 31 rounds, medians, over F.linear: direct
    // 1.39-2.01x, lanes 1.04-1.59x); at M = 12 they were even (1.25-1.54x against 1.12-1.57x; the dispatch with
    // direct up to 15 against lanes from 8, in-process: 1.27-1.52x against 1.33-1.55x), at 16 the lanes kernel led
    // (1.13-1.14x against 0.98-1.03x).
    const int64_t small_fp32 = at::get_num_threads() == 1 ? 256 : (amx_available() ? 8 : 12);
    m = bf16 ? (large || amx_available() ? 8 : small_bf16) : (large ? 1024 : small_fp32);
  }
  // AVX-512 without BF16: the same M (measured on the AVX-512 BF16 Xeon only).
  return m;
}
}  // namespace

int64_t panel_min_m(LinearOp op, at::ScalarType dt, int64_t N, int64_t K) {
  const int64_t o = g_min_m_override.load();
  return o >= 0 ? o : default_min_m(op, dt, active_isa(), N * K * static_cast<int64_t>(c10::elementSize(dt)), K);
}

void set_panel_min_m(int64_t m) { g_min_m_override = m; }

bool panel_min_m_forced() { return g_min_m_override.load() >= 0; }

void set_panel_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "set_panel_bytes: need a positive byte count (0: the measured default), got ", bytes);
  g_panel_bytes = bytes > 0 ? bytes : kDefaultPanelBytes;
  g_panel_bytes_set = bytes > 0;
}

int64_t panel_bytes() { return g_panel_bytes.load(); }

namespace {
// Dense bytes per panel for a call in dtype dt: 2 MB for bf16 on AVX512_BF16 CPUs without AMX, else the 1 MB
// above (or what set_panel_bytes set, for every dtype). Measured on the Zen 4 EPYC (stop 38, interleaved with
// F.linear, one and two threads, docs/cpu_kernels.md): bitmap bf16 through panels at M = 8-64, 1 / 2 / 4 MB:
// 7B shapes 0.78-1.00x / 0.93-1.28x / 0.94-1.29x, SmolLM2 shapes 0.67-1.00x / 0.73-1.08x / 0.74-1.09x; at M = 128-256
// (7B, 2:4 and bitmap) 0.87-1.00x / 0.92-1.01x / 0.51-0.98x. oneDNN's bf16 GEMM there pays a per-call cost that
// wider panels (fewer calls) spread; 4 MB lost at M >= 128.
int64_t call_panel_bytes(at::ScalarType dt) {
  const int64_t b = g_panel_bytes.load();
  // active_isa() is min(detected, cap): at AVX512_BF16 the hardware has it too
  if (g_panel_bytes_set.load() || dt != at::kBFloat16 || amx_available() || active_isa() < Isa::kAvx512Bf16) {
    return b;
  }
  return 2 * b;
}
}  // namespace

namespace {
// The calling thread's reused panel buffer (slot 0: the panel, slot 1: its fp32 widening). A fresh
// multi-MB allocation is mmapped and page-faulted on every call (measured: ~0.2 ms of a 0.35 ms
// SmolLM2-sized call at M = 1), so buffers up to kMaxPanelBytes are kept; larger ones live for the call
// (`hold` keeps them alive).
char* thread_panel(int slot, int64_t bytes, at::Tensor& hold) {
  thread_local at::Tensor cache[2];
  if (bytes > kMaxPanelBytes) {
    hold = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
    return static_cast<char*>(hold.data_ptr());
  }
  at::Tensor& c = cache[slot];
  if (!c.defined() || c.numel() < bytes) c = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  return static_cast<char*>(c.data_ptr());
}

std::atomic<int> g_split_override{-1};
}  // namespace

void set_panel_split(int64_t mode) {
  TORCH_CHECK(mode >= -1 && mode <= 1, "set_panel_split: -1 (measured default), 0 (off) or 1 (on), got ", mode);
  g_split_override = static_cast<int>(mode);
}

bool panel_split(int64_t M, int64_t N, int64_t K, int64_t es) {
  const int o = g_split_override.load();
  const int threads = at::get_num_threads();
  if (threads < 2 || at::in_parallel_region() || N < 16 * threads) return false;  // >= 16 rows a thread
  if (o >= 0) return o == 1;
  // Measured on the AMX Xeon, 2 threads, fp32, bitmap 50% / 70% and 2:4 forced onto the panel path
  // (four interleaved runs, medians; docs/cpu_kernels.md "Panels split by thread"): split against one
  // threaded BLAS call per panel, speed-up over F.linear. 576x1536 (K = 2.7 N): M = 16 1.04x / 0.94x
  // (50%), 1.16x / 1.00x (70%); M = 32 1.02x / 0.91x, 1.04x / 0.98x; M = 64 0.82x / 0.76x, 0.83x / 0.80x.
  // 1536x576: M = 64 0.98x / 0.79x, 1.01x / 0.84x, but M = 16 and 32 2-5% slower, M = 8 and M >= 128
  // slower on both shapes (the threaded BLAS splits a larger GEMM well). bf16: not split (the AMX path
  // serves M < 256 there; at M >= 256 the split was slower in 3 of 4 cells).
  const bool small = N * K * es < kLargeWeightBytes;
  // Zen 4 EPYC (AVX-512 BF16, no AMX; stop 36, bench/results/cpu_kernels_epyc_zen4_smollm2_paths_stop36.json,
  // two threads, SmolLM2 shapes): bf16 split panels beat one threaded BLAS call per panel from M = 8 to 128
  // (2:4 1536x576 1.00-1.13x against 0.78-0.95x, 576x1536 0.80-1.03x against 0.62-0.93x; bitmap 70%
  // 0.83-1.22x against 0.60-1.05x), were level at 256 (0.86-1.00x against 0.87-1.01x); 7B shapes, M = 8-64
  // (bench/results/cpu_kernels_epyc_zen4_7b_bf16_paths_stop36.json): 0.78-0.96x against 0.44-0.84x, every
  // cell (M >= 128 not measured). The AMX Xeon's bf16 runs on tiles below M = 256 and was not split there
  // (slower at M >= 256 in 3 of 4 cells). Stop 41, the same Zen 4, 7B shapes, two threads, M = 128 / 256
  // (forced paths interleaved with F.linear, 15 rounds, medians; docs/cpu_kernels.md "Stop 41"): split
  // 0.92-0.97x against 0.88-0.93x (2:4) and 0.94-0.98x against 0.89-0.97x (bitmap 70%), so weights of 16 MB
  // or more split up to M = 256 too (M = 1024 not measured).
  if (es != 4) return M <= (small ? 128 : 256) && detected_isa() == Isa::kAvx512Bf16 && !amx_available();
  // AVX2 (Zen 3 EPYC, stop 35, same runs as default_min_m's small fp32 values): split panels beat one
  // threaded BLAS call per panel at every M measured (8-256) on both SmolLM2 shapes, 2:4 and bitmap:
  // 1536x576 70% M = 16 / 32 / 128: 1.17x / 1.37x / 1.37x against 0.47x / 0.63x / 0.86x; 576x1536:
  // 1.01-1.24x against 0.79-0.98x. The same on the Zen 4 without AMX (stop 36): fp32 bitmap 70% M = 8-256
  // 1.00-1.98x against 0.48-1.11x, 2:4 (panels from M = 128) 1.01-1.06x against 0.80-1.00x. Weights of
  // 16 MB or more were not measured there, and the AMX Xeon (measured with AVX-512): the Xeon's rule.
  if (small && (active_isa() == Isa::kAvx2 || (active_isa() >= Isa::kAvx512 && !amx_available()))) return true;
  return M > 32 ? M <= 64 : (M >= 16 && K >= 2 * N);
}

at::Tensor panel_linear(const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t N, int64_t K,
                        const PanelFill& fill) {
  const int64_t M = x.size(0);
  const int64_t es = static_cast<int64_t>(x.element_size());
  // bf16 on a CPU without AVX512_BF16 (the hardware, not the set_isa cap: torch's BLAS does not
  // follow the cap): the bf16 GEMM there widens to fp32 internally and ran 6.9x slower than fp32 sgemm
  // on the AVX2 machine (1536x576, M = 1024: 240 ms against 35). So the panel is widened to fp32 (exact)
  // and multiplied with x in fp32, rounding y once at the end: fp32 accumulation, as the direct kernels.
  const bool gemm_f32 = x.scalar_type() == at::kBFloat16 && detected_isa() < Isa::kAvx512Bf16;
  // detached: the split path calls the BLAS from pool threads, which do not inherit the caller's
  // below-autograd dispatch state, and an out= GEMM refuses inputs that require grad there
  const at::Tensor xg = (gemm_f32 ? x.to(at::kFloat) : x).detach();
  at::Tensor y = at::empty({M, N}, xg.options());
  if (M == 0 || N == 0) return gemm_f32 ? y.to(x.scalar_type()) : y;
  // bias in the GEMM's dtype, as F.linear requires (an fp32 bias with bf16 x is rounded to bf16 first)
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(xg.scalar_type()).contiguous().detach();
  const int64_t row_bytes = std::max<int64_t>(K * es, 1);
  const int64_t pbytes = call_panel_bytes(x.scalar_type());
  int64_t rows = std::max(pbytes / row_bytes, M);
  // The BLAS re-packs x (M x K) for every panel. Once x passes 4 MB that costs more than the panels'
  // decompression (7B fp32, M = 1024: 22 panels of 8 MB, 0.91-0.97x dense), so panels may then grow to
  // 4x x's bytes, at most 64 MB; such a panel is allocated for the call, not kept.
  const int64_t x_bytes = M * K * es;
  const int64_t cap = x_bytes > (int64_t{4} << 20) ? std::min(4 * x_bytes, kHugePanelBytes)
                                                   : std::max(pbytes, kMaxPanelBytes);
  rows = std::min(rows, std::max<int64_t>(cap, pbytes) / row_bytes);
  rows = std::min(std::max<int64_t>(16, rows / 16 * 16), N);
  // A cache-sized weight at compute-bound M: one panel of the whole weight, so the BLAS is called once
  // (each call re-lays its operands; measured on the AMX Xeon, 576x1536 M = 256: 1 MB panels 0.80x of
  // F.linear, one panel 0.89x bf16 / 0.96x fp32).
  if (M >= 128 && N * K * es <= kMaxPanelBytes) rows = N;

  // One block of weight rows [n0, n0 + nr): decompress into `base` (fp32-widened into `base32` where
  // gemm_f32), then one GEMM into y's column block.
  auto gemm_block = [&](int64_t n0, int64_t nr, char* base, char* base32) {
    at::Tensor p = at::from_blob(base, {nr, K}, x.options());
    if (gemm_f32) p = at::from_blob(base32, {nr, K}, xg.options()).copy_(p);
    at::Tensor yb = nr == N ? y : y.narrow(1, n0, nr);
    if (b.defined()) {
      at::addmm_out(yb, b.narrow(0, n0, nr), xg, p.t());
    } else {
      at::mm_out(yb, xg, p.t());
    }
  };

  if (panel_split(M, N, K, es)) {
    // Each thread takes a contiguous share of the weight rows and runs its own panels through a
    // single-threaded BLAS call (the BLAS runs sequentially inside a parallel region): no barrier
    // between decompression and GEMM, and each thread's panel stays in its own core's cache.
    const int64_t T = at::get_num_threads();
    const int64_t share = (N + T - 1) / T;
    // The pool threads start without the caller's thread-local state: under torch.inference_mode() the
    // GEMM into y (an inference tensor) then failed there as an in-place update outside inference mode.
    const at::ThreadLocalState caller_tls;
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      at::ThreadLocalStateGuard tls_guard(caller_tls);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t lo = std::min(N, t * share), hi = std::min(N, lo + share);
        if (lo >= hi) continue;
        const int64_t prow = std::min(rows, hi - lo);
        at::Tensor hold, hold32;
        char* base = thread_panel(0, prow * K * es, hold);
        char* base32 = gemm_f32 ? thread_panel(1, prow * K * 4, hold32) : nullptr;
        for (int64_t n0 = lo; n0 < hi; n0 += prow) {
          const int64_t nr = std::min(prow, hi - n0);
          fill(n0, n0 + nr, base);
          gemm_block(n0, nr, base, base32);
        }
      }
    });
    return gemm_f32 ? y.to(x.scalar_type()) : y;
  }

  at::Tensor hold, hold32;
  char* base = thread_panel(0, rows * K * es, hold);
  char* base32 = gemm_f32 ? thread_panel(1, rows * K * 4, hold32) : nullptr;
  // rows per decompression chunk: ~256 KB of dense weight each, so a small panel stays on one thread
  const int64_t grain = std::max<int64_t>(1, (int64_t{256} << 10) / std::max<int64_t>(K * es, 1));
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t nr = std::min(rows, N - n0);
    at::parallel_for(n0, n0 + nr, grain, [&](int64_t r0, int64_t r1) { fill(r0, r1, base + (r0 - n0) * K * es); });
    gemm_block(n0, nr, base, base32);
  }
  return gemm_f32 ? y.to(x.scalar_type()) : y;
}

}  // namespace laco
