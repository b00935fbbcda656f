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

#include <algorithm>
#include <atomic>

#include "laco_cpu.h"

namespace laco {

namespace {
// Dense bytes per panel. Measured on this project's 2-core Xeon (AMX, 2 MB L2/core) with predecompressed
// panels against one F.linear: 0.5 MB panels cost 10-40% (the GEMM re-packs x for every panel and small
// N blocks use the AMX/AVX-512 microkernels badly), 8 MB panels 0-5%; see docs/cpu_kernels.md.
std::atomic<int64_t> g_panel_bytes{int64_t{8} << 20};
std::atomic<int64_t> g_min_m_override{-1};

// Smallest M that takes the panel path, per op, dtype and ISA of the direct kernel. Measured with
// bench/cpu_kernels.py (--panel-sweep) on the 2-core Xeon (AMX BF16): see docs/cpu_kernels.md. With
// a weaker BLAS (no AMX) the direct kernels win up to a larger M; these values then under-use them
// but never pick a path slower than dense F.linear by more than the panel overhead.
int64_t default_min_m(LinearOp op, at::ScalarType dt, Isa isa) {
  const bool bf16 = dt == at::kBFloat16;
  if (isa == Isa::kScalar) return 2;  // the scalar kernels lose to any BLAS beyond one row of x
  if (op == LinearOp::kSparse24) {
    if (bf16) return isa >= Isa::kAvx512Bf16 ? 4 : 2;
    return isa >= Isa::kAvx512 ? 32 : 16;
  }
  if (bf16) return isa >= Isa::kAvx512Bf16 ? 4 : 2;
  return isa >= Isa::kAvx512 ? 16 : 8;
}
}  // namespace

int64_t panel_min_m(LinearOp op, at::ScalarType dt) {
  const int64_t o = g_min_m_override.load();
  return o >= 0 ? o : default_min_m(op, dt, active_isa());
}

void set_panel_min_m(int64_t m) { g_min_m_override = m; }

void set_panel_bytes(int64_t bytes) {
  TORCH_CHECK(bytes > 0, "set_panel_bytes: need a positive byte count, got ", bytes);
  g_panel_bytes = bytes;
}

int64_t panel_bytes() { return g_panel_bytes.load(); }

at::Tensor panel_linear(const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t N, int64_t K,
                        const PanelFill& fill) {
  const int64_t M = x.size(0);
  const int64_t es = static_cast<int64_t>(x.element_size());
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  // bias in x's dtype, as F.linear requires (an fp32 bias with bf16 x is rounded to bf16 first)
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(x.scalar_type()).contiguous();
  int64_t rows = std::max<int64_t>(16, g_panel_bytes.load() / std::max<int64_t>(K * es, 1) / 16 * 16);
  rows = std::min(rows, N);
  at::Tensor panel = at::empty({rows, K}, x.options());
  char* base = static_cast<char*>(panel.data_ptr());
  // rows per decompression chunk: ~256 KB of dense weight each, so a small panel stays on one thread
  const int64_t grain = std::max<int64_t>(1, (int64_t{256} << 10) / std::max<int64_t>(K * es, 1));
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t nr = std::min(rows, N - n0);
    at::parallel_for(n0, n0 + nr, grain, [&](int64_t r0, int64_t r1) { fill(r0, r1, base + (r0 - n0) * K * es); });
    at::Tensor p = panel.narrow(0, 0, nr);
    at::Tensor yb = nr == N ? y : y.narrow(1, n0, nr);
    if (b.defined()) {
      at::addmm_out(yb, b.narrow(0, n0, nr), x, p.t());
    } else {
      at::mm_out(yb, x, p.t());
    }
  }
  return y;
}

}  // namespace laco
