// Run-time ISA selection and the checks shared by the native linears.
#include <algorithm>
#include <atomic>

#include "laco_cpu.h"

namespace laco {

namespace {
std::atomic<int> g_isa_cap{static_cast<int>(Isa::kAvx512Bf16)};

Isa detect() {
#if LACO_X86
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the wide registers (XGETBV).
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt"))
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi2") ? Isa::kAvx512Bf16
                                                                                         : Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2") &&
      __builtin_cpu_supports("popcnt"))
    return Isa::kAvx2;
#endif
  return Isa::kScalar;
}
}  // namespace

Isa detected_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa active_isa() {
  return static_cast<Isa>(std::min(static_cast<int>(detected_isa()), g_isa_cap.load()));
}

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16: return "avx512bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

void set_isa(const std::string& name) {
  if (name == "auto" || name == "avx512bf16") {
    g_isa_cap = static_cast<int>(Isa::kAvx512Bf16);
  } else if (name == "avx512") {
    g_isa_cap = static_cast<int>(Isa::kAvx512);
  } else if (name == "avx2") {
    g_isa_cap = static_cast<int>(Isa::kAvx2);
  } else if (name == "scalar") {
    g_isa_cap = static_cast<int>(Isa::kScalar);
  } else {
    TORCH_CHECK(false, "set_isa: unknown ISA '", name, "'; expected auto, scalar, avx2, avx512 or avx512bf16");
  }
}

namespace {
// Software prefetch distance of the direct kernels' values stream when rows are read whole (M = 1 decode),
// per op, split evenly between the decode's four row streams. bitmap: 6144, measured on a Zen 5 EPYC and
// again with four streams on a Zen 4 (4-12 KB flat, 2.60-2.62x over F.linear; 1-2 KB 2.26-2.50x). 2:4:
// 1024 since stop 36 (four streams): Zen 4, 7B fp32 on cold caches, 0.5-1 KB 2.04-2.29x over F.linear,
// 2 KB 1.99-2.21x, 4 KB (the old default) 1.83-2.15x, 8 KB 1.75-2.04x; the Zen 3 sweep of stop 35 was
// flat. docs/cpu_kernels.md has the sweeps. Settable for tuning runs (bench/cpu_kernels.py records them).
constexpr int64_t kDefaultPrefetch[2] = {1024, 6144};
std::atomic<int64_t> g_prefetch_bytes[2] = {{kDefaultPrefetch[0]}, {kDefaultPrefetch[1]}};
}  // namespace

int64_t prefetch_bytes(LinearOp op) { return g_prefetch_bytes[static_cast<int>(op)].load(std::memory_order_relaxed); }

void set_prefetch_bytes(LinearOp op, int64_t bytes) {
  TORCH_CHECK(bytes >= -1 && bytes <= (int64_t{1} << 20), "set_prefetch_bytes: need -1 (default) or 0..1 MiB, got ",
              bytes);
  g_prefetch_bytes[static_cast<int>(op)] = bytes < 0 ? kDefaultPrefetch[static_cast<int>(op)] : bytes;
}

int64_t linear_k_block(int64_t m, int64_t k, int64_t align) {
  // one x row may live in L2 (the weights dominate the traffic); several rows must fit in L1,
  // else every weight vector costs m L2 reads of x
  const int64_t budget = m <= 1 ? 512 * 1024 : 24 * 1024;
  if (m * k * static_cast<int64_t>(sizeof(float)) <= budget) return k;
  int64_t cols = budget / (m * static_cast<int64_t>(sizeof(float)));
  cols = std::max<int64_t>(align, cols / align * align);
  return std::min(cols, k);
}

int64_t linear_row_grain(int64_t m, int64_t k) {
  // Why this big: a fork/join costs microseconds on idle cores, and when the other cores are busy
  // (a shared machine) a parallel region waits for a descheduled thread: measured 7.6 ms per
  // 1536x576 2:4 call at M = 1 on 2 threads (0.04 ms on 1) on a 2-core machine whose other core was
  // busy. The old grain (64K weights) split that op in 13 chunks; now it runs on one thread.
  constexpr int64_t kMinChunkMacs = int64_t{1} << 18;
  return std::max<int64_t>(1, kMinChunkMacs / std::max<int64_t>(m * k, 1));
}

void linear_check_x(const at::Tensor& x, const at::Tensor& values, int64_t in_features, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(values.device().is_cpu(), op, ": values must be a CPU tensor, got ", values.device());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK(x.size(1) == in_features, op, ": x has ", x.size(1), " columns, the weight expects K=", in_features);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": native kernels take float32 or bfloat16 x, got ", x.scalar_type());
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), op, ": x has dtype ", x.scalar_type(),
              " but the weight values have dtype ", values.scalar_type());
  TORCH_CHECK(values.is_contiguous(), op, ": values must be contiguous");
}

at::Tensor linear_x_fp32(const at::Tensor& x, const at::Tensor& values, int64_t in_features, const char* op) {
  linear_check_x(x, values, in_features, op);
  return x.to(at::kFloat).contiguous();
}

at::Tensor linear_bias_fp32(const c10::optional<at::Tensor>& bias, int64_t out_features, const char* op) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.device().is_cpu(), op, ": bias must be a CPU tensor, got ", b.device());
  TORCH_CHECK(b.dim() == 1 && b.size(0) == out_features, op, ": bias must have shape [", out_features,
              "], got ", b.sizes());
  TORCH_CHECK(at::isFloatingType(b.scalar_type()), op, ": bias must be floating point, got ", b.scalar_type());
  return b.to(at::kFloat).contiguous();
}

}  // namespace laco
