// Fused reconstruction losses (mse / nmse / cosine) between pred and target [R, D], forward and
// backward, in one pass over the data each; definitions and eps handling follow
// laco_kernels/reference.py::reconstruction_loss (the oracle).
//
//   mse    = sum((p - t)^2) / (R * D)
//   nmse   = sum((p - t)^2) / max(sum(t^2), 1e-12)
//   cosine = mean_r (1 - dot_r / max(|p_r| |t_r|, 1e-8))
//
// The forward returns the loss and the statistics the backward needs (nmse: the clamped sum(t^2);
// cosine: [R, 3] = dot, |p|, |t| per row). The backward is then one elementwise pass,
// grad_p = a_r * t + b_r * p. Sums run in 16 fp32 lanes over fixed-size chunks (the compiler
// vectorises the lane loops for the ISA of the calling variant) and the chunk sums are added in
// double in a fixed order, so the result does not depend on the number of threads.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "laco_cpu.h"

namespace laco {
namespace {

enum class Kind { kMse, kNmse, kCosine };

Kind parse_kind(const std::string& kind) {
  if (kind == "mse") return Kind::kMse;
  if (kind == "nmse") return Kind::kNmse;
  if (kind == "cosine") return Kind::kCosine;
  TORCH_CHECK(false, "reconstruction_loss: unknown kind '", kind, "'; expected mse, nmse or cosine");
}

constexpr int kLanes = 16;
constexpr int64_t kChunk = 16384;  // elements per partial sum of mse / nmse

// sums[0] = sum (p-t)^2, sums[1] = sum t^2, sums[2] = sum p*t, sums[3] = sum p^2 (those requested).
template <typename PT, typename TT, bool kDiff, bool kTT, bool kCos>
LACO_INLINE void lane_sums(const PT* p, const TT* t, int64_t n, float* sums) {
  float dd[kLanes] = {}, tt[kLanes] = {}, pt[kLanes] = {}, pp[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float a = to_f32(p[i + j]), b = to_f32(t[i + j]);
      if (kDiff) dd[j] += (a - b) * (a - b);
      if (kTT) tt[j] += b * b;
      if (kCos) {
        pt[j] += a * b;
        pp[j] += a * a;
      }
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const float a = to_f32(p[i]), b = to_f32(t[i]);
    if (kDiff) dd[j] += (a - b) * (a - b);
    if (kTT) tt[j] += b * b;
    if (kCos) {
      pt[j] += a * b;
      pp[j] += a * a;
    }
  }
  float s[4] = {0.f, 0.f, 0.f, 0.f};
  for (int j = 0; j < kLanes; ++j) {
    s[0] += dd[j];
    s[1] += tt[j];
    s[2] += pt[j];
    s[3] += pp[j];
  }
  for (int k = 0; k < 4; ++k) sums[k] = s[k];
}

template <typename T>
LACO_INLINE T from_f32(float v);
template <>
LACO_INLINE float from_f32<float>(float v) { return v; }
template <>
LACO_INLINE uint16_t from_f32<uint16_t>(float v) { return f32_to_bf16(v); }

// g = a * t + b * p over n elements, stored in pred's dtype.
template <typename PT, typename TT>
LACO_INLINE void axpby(const PT* p, const TT* t, PT* g, int64_t n, float a, float b) {
  for (int64_t i = 0; i < n; ++i) g[i] = from_f32<PT>(a * to_f32(t[i]) + b * to_f32(p[i]));
}

// The same bodies compiled three times; the run-time ISA picks one.
template <typename PT, typename TT, bool kDiff, bool kTT, bool kCos>
void lane_sums_any(Isa isa, const PT* p, const TT* t, int64_t n, float* sums);
template <typename PT, typename TT>
void axpby_any(Isa isa, const PT* p, const TT* t, PT* g, int64_t n, float a, float b);

#if LACO_X86
template <typename PT, typename TT, bool kDiff, bool kTT, bool kCos>
LACO_AVX512 void lane_sums_avx512(const PT* p, const TT* t, int64_t n, float* sums) {
  lane_sums<PT, TT, kDiff, kTT, kCos>(p, t, n, sums);
}
template <typename PT, typename TT, bool kDiff, bool kTT, bool kCos>
LACO_AVX2 void lane_sums_avx2(const PT* p, const TT* t, int64_t n, float* sums) {
  lane_sums<PT, TT, kDiff, kTT, kCos>(p, t, n, sums);
}
template <typename PT, typename TT>
LACO_AVX512 void axpby_avx512(const PT* p, const TT* t, PT* g, int64_t n, float a, float b) {
  axpby<PT, TT>(p, t, g, n, a, b);
}
template <typename PT, typename TT>
LACO_AVX2 void axpby_avx2(const PT* p, const TT* t, PT* g, int64_t n, float a, float b) {
  axpby<PT, TT>(p, t, g, n, a, b);
}
#endif

template <typename PT, typename TT, bool kDiff, bool kTT, bool kCos>
void lane_sums_any(Isa isa, const PT* p, const TT* t, int64_t n, float* sums) {
#if LACO_X86
  if (isa >= Isa::kAvx512) return lane_sums_avx512<PT, TT, kDiff, kTT, kCos>(p, t, n, sums);
  if (isa == Isa::kAvx2) return lane_sums_avx2<PT, TT, kDiff, kTT, kCos>(p, t, n, sums);
#endif
  lane_sums<PT, TT, kDiff, kTT, kCos>(p, t, n, sums);
}

template <typename PT, typename TT>
void axpby_any(Isa isa, const PT* p, const TT* t, PT* g, int64_t n, float a, float b) {
#if LACO_X86
  if (isa >= Isa::kAvx512) return axpby_avx512<PT, TT>(p, t, g, n, a, b);
  if (isa == Isa::kAvx2) return axpby_avx2<PT, TT>(p, t, g, n, a, b);
#endif
  axpby<PT, TT>(p, t, g, n, a, b);
}

template <typename PT, typename TT>
std::tuple<at::Tensor, at::Tensor> forward_typed(const at::Tensor& pred, const at::Tensor& target, Kind kind) {
  const Isa isa = active_isa();
  const PT* p = static_cast<const PT*>(pred.data_ptr());
  const TT* t = static_cast<const TT*>(target.data_ptr());
  const int64_t R = pred.size(0), D = pred.size(1), numel = R * D;
  auto fopts = pred.options().dtype(at::kFloat);
  if (kind == Kind::kCosine) {
    at::Tensor stats = at::empty({R, 3}, fopts);
    float* st = stats.data_ptr<float>();
    at::parallel_for(0, R, std::max<int64_t>(1, kChunk / D), [&](int64_t r0, int64_t r1) {
      float s[4];
      for (int64_t r = r0; r < r1; ++r) {
        lane_sums_any<PT, TT, false, true, true>(isa, p + r * D, t + r * D, D, s);
        st[3 * r] = s[2];
        st[3 * r + 1] = std::sqrt(s[3]);
        st[3 * r + 2] = std::sqrt(s[1]);
      }
    });
    double total = 0.0;
    for (int64_t r = 0; r < R; ++r) {
      const float denom = std::max(st[3 * r + 1] * st[3 * r + 2], 1e-8f);
      total += 1.0 - static_cast<double>(st[3 * r]) / denom;
    }
    return {at::scalar_tensor(total / R, fopts), stats};
  }
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  std::vector<double> dd(chunks), tt(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    float s[4];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * kChunk, n = std::min(kChunk, numel - i0);
      if (kind == Kind::kNmse) lane_sums_any<PT, TT, true, true, false>(isa, p + i0, t + i0, n, s);
      else lane_sums_any<PT, TT, true, false, false>(isa, p + i0, t + i0, n, s);
      dd[c] = s[0];
      tt[c] = s[1];
    }
  });
  double sdd = 0.0, stt = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    sdd += dd[c];
    stt += tt[c];
  }
  if (kind == Kind::kMse) return {at::scalar_tensor(sdd / numel, fopts), at::empty({0}, fopts)};
  const float tclamped = std::max(static_cast<float>(stt), 1e-12f);
  return {at::scalar_tensor(sdd / tclamped, fopts), at::full({1}, tclamped, fopts)};
}

template <typename PT, typename TT>
at::Tensor backward_typed(double g, const at::Tensor& pred, const at::Tensor& target, Kind kind,
                          const at::Tensor& stats) {
  const Isa isa = active_isa();
  const PT* p = static_cast<const PT*>(pred.data_ptr());
  const TT* t = static_cast<const TT*>(target.data_ptr());
  const int64_t R = pred.size(0), D = pred.size(1);
  at::Tensor grad = at::empty_like(pred);
  PT* gp = static_cast<PT*>(grad.data_ptr());
  if (kind == Kind::kCosine) {
    const float* st = stats.data_ptr<float>();
    at::parallel_for(0, R, std::max<int64_t>(1, kChunk / D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float dot = st[3 * r], pn = st[3 * r + 1], tn = st[3 * r + 2];
        const float raw = pn * tn;
        // clamp_min passes the gradient where raw >= eps; below it denom is a constant
        const double denom = raw >= 1e-8f ? static_cast<double>(raw) : 1e-8;
        const double a = -g / (R * denom);
        const double b = raw >= 1e-8f ? g * dot / (R * denom * static_cast<double>(pn) * pn) : 0.0;
        axpby_any<PT, TT>(isa, p + r * D, t + r * D, gp + r * D, D, static_cast<float>(a), static_cast<float>(b));
      }
    });
    return grad;
  }
  const int64_t numel = R * D;
  const double scale = kind == Kind::kMse ? 2.0 * g / numel : 2.0 * g / stats.data_ptr<float>()[0];
  const float a = static_cast<float>(-scale), b = static_cast<float>(scale);
  at::parallel_for(0, (numel + kChunk - 1) / kChunk, 1, [&](int64_t c0, int64_t c1) {
    const int64_t i0 = c0 * kChunk, i1 = std::min(numel, c1 * kChunk);
    axpby_any<PT, TT>(isa, p + i0, t + i0, gp + i0, i1 - i0, a, b);
  });
  return grad;
}

void check_pair(const at::Tensor& pred, const at::Tensor& target, const char* op) {
  for (const auto& pr : {std::make_pair(&pred, "pred"), std::make_pair(&target, "target")}) {
    const at::Tensor& x = *pr.first;
    TORCH_CHECK(x.device().is_cpu(), op, ": ", pr.second, " must be a CPU tensor, got ", x.device());
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": ", pr.second, " must be a contiguous 2-D [R, D] tensor");
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op, ": ", pr.second,
                " must be float32 or bfloat16, got ", x.scalar_type());
  }
  TORCH_CHECK(pred.sizes() == target.sizes(), op, ": pred has shape ", pred.sizes(), " but target has shape ",
              target.sizes());
  TORCH_CHECK(pred.numel() > 0, op, ": empty inputs (shape ", pred.sizes(), ")");
}

// 0: fp32/fp32, 1: fp32/bf16, 2: bf16/fp32, 3: bf16/bf16 (pred/target).
int dtype_pair(const at::Tensor& pred, const at::Tensor& target) {
  return (pred.scalar_type() == at::kFloat ? 0 : 2) + (target.scalar_type() == at::kFloat ? 0 : 1);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> reconstruction_loss_forward(const at::Tensor& pred, const at::Tensor& target,
                                                               const std::string& kind) {
  const Kind k = parse_kind(kind);
  check_pair(pred, target, "reconstruction_loss_forward");
  switch (dtype_pair(pred, target)) {
    case 0: return forward_typed<float, float>(pred, target, k);
    case 1: return forward_typed<float, uint16_t>(pred, target, k);
    case 2: return forward_typed<uint16_t, float>(pred, target, k);
    default: return forward_typed<uint16_t, uint16_t>(pred, target, k);
  }
}

at::Tensor reconstruction_loss_backward(const at::Tensor& grad_out, const at::Tensor& pred, const at::Tensor& target,
                                        const std::string& kind, const at::Tensor& stats) {
  const char* op = "reconstruction_loss_backward";
  const Kind k = parse_kind(kind);
  check_pair(pred, target, op);
  TORCH_CHECK(grad_out.numel() == 1, op, ": grad_out must hold one value, got shape ", grad_out.sizes());
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.device().is_cpu(), op,
              ": stats must be the contiguous float32 tensor returned by the forward");
  const int64_t want = k == Kind::kMse ? 0 : (k == Kind::kNmse ? 1 : 3 * pred.size(0));
  TORCH_CHECK(stats.numel() == want, op, ": stats has ", stats.numel(), " values, expected ", want, " for kind '",
              kind, "' (pass the stats returned by the forward)");
  const double g = grad_out.to(at::kDouble).item<double>();
  switch (dtype_pair(pred, target)) {
    case 0: return backward_typed<float, float>(g, pred, target, k, stats);
    case 1: return backward_typed<float, uint16_t>(g, pred, target, k, stats);
    case 2: return backward_typed<uint16_t, float>(g, pred, target, k, stats);
    default: return backward_typed<uint16_t, uint16_t>(g, pred, target, k, stats);
  }
}

}  // namespace laco
