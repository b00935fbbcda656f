// Eager CPU inference entry of the packed modules (laco_kernels/nn.py: SparseLinear24, BitmapLinear).
//
// Why in C++: a decode step calls every linear of the model once with one token. In Python, the checks
// that decide whether a call may skip the op layer (nn._native_fast + ops.dispatch.call_direct: device,
// dtype, shapes, grad mode, dispatch / torch-function modes, functorch, autocast, LACO_BACKEND) cost
// about 8-10 us a call, and the module's forward 16-27 us above nn.Linear's 8 us (one thread, Zen 3):
// 3-6 ms of a 45 ms SmolLM2 token over 210 linears. Here the same checks cost well under a microsecond.
//
// Contract: returns the result, or nothing (None in Python) when this call is not plain eager CPU
// inference on well-formed tensors; the caller then takes the public op path, which makes every check
// again and raises the errors with their messages. Nothing is ever raised for an ineligible call here.
// The caller checks first what only Python can see: torch.compiler.is_compiling() and that x, bias
// and the packed tensors are plain torch.Tensor / nn.Parameter objects (no __torch_function__ subclass).
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <cctype>
#include <cstdlib>
#include <string>

#include "laco_cpu.h"

namespace laco {
namespace {

// LACO_BACKEND unset, empty or "auto" (any case, surrounding blanks ignored), as ops.dispatch.requested_backend.
bool backend_is_auto() {
  const char* env = std::getenv("LACO_BACKEND");
  if (env == nullptr) return true;
  std::string s(env);
  const auto first = s.find_first_not_of(" \t\r\n\f\v");
  if (first == std::string::npos) return true;
  s = s.substr(first, s.find_last_not_of(" \t\r\n\f\v") - first + 1);
  if (s.size() != 4) return false;
  for (auto& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s == "auto";
}

// No dispatch or torch-function mode, no functorch transform, autocast off: what the op layer's
// _plain_eager asks (its compiling check is the caller's). A functorch transform (vmap, grad, jvp)
// includes its dynamic-layer dispatch key in the thread-local set while its stack is not empty
// (functorch/DynamicLayer.h itself needs headers the wheel does not ship).
bool plain_eager_context() {
  return c10::impl::TorchDispatchModeTLS::stack_len() == 0 && !at::impl::torch_function_mode_enabled() &&
         !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) &&
         !at::autocast::is_autocast_enabled(at::kCPU) && !at::autocast::is_autocast_enabled(at::kCUDA);
}

// A dense CPU tensor with no Python (subclass) dispatch and no gradient to record.
bool plain_cpu(const at::Tensor& t, bool grad_mode) {
  return t.defined() && t.device().is_cpu() && t.layout() == at::kStrided && !t.is_meta() &&
         !t.key_set().has(c10::DispatchKey::Python) && !(grad_mode && t.requires_grad());
}

// x [..., K] in values' native dtype, bias [N] of that dtype (or none), packed tensors plain: the
// conditions under which the public op would call the native kernel directly for this very call.
bool eligible(const at::Tensor& x, const at::Tensor& values, const c10::optional<at::Tensor>& bias, int64_t n,
              int64_t k, std::initializer_list<const at::Tensor*> packed) {
  const bool grad_mode = at::GradMode::is_enabled();
  if (!plain_cpu(x, grad_mode) || !plain_cpu(values, grad_mode)) return false;
  const auto dt = x.scalar_type();
  if ((dt != at::kFloat && dt != at::kBFloat16) || values.scalar_type() != dt) return false;
  if (x.dim() < 1 || x.size(-1) != k || x.numel() == 0) return false;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    if (!plain_cpu(b, grad_mode) || b.scalar_type() != dt || b.dim() != 1 || b.size(0) != n) return false;
  }
  for (const at::Tensor* t : packed)
    if (!plain_cpu(*t, grad_mode)) return false;
  return plain_eager_context() && backend_is_auto();
}

at::Tensor with_leading_dims(const at::Tensor& y, const at::Tensor& x, int64_t n) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = n;
  return y.view(sizes);
}

}  // namespace

c10::optional<at::Tensor> sparse24_linear_fast(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                               const c10::optional<at::Tensor>& bias, int64_t out_features,
                                               int64_t in_features) {
  if (!eligible(x, values, bias, out_features, in_features, {&meta})) return c10::nullopt;
  const at::Tensor y = sparse24_linear(x.reshape({-1, in_features}).contiguous(), values.contiguous(),
                                       meta.contiguous(), bias, out_features, in_features);
  return with_leading_dims(y, x, out_features);
}

c10::optional<at::Tensor> bitmap_linear_fast(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmap,
                                             const at::Tensor& offsets, int64_t tile_k,
                                             const c10::optional<at::Tensor>& bias, int64_t out_features,
                                             int64_t in_features) {
  if (!eligible(x, values, bias, out_features, in_features, {&bitmap, &offsets})) return c10::nullopt;
  const at::Tensor y = bitmap_linear(x.reshape({-1, in_features}).contiguous(), values.contiguous(),
                                     bitmap.contiguous(), offsets.contiguous(), tile_k, bias, out_features,
                                     in_features);
  return with_leading_dims(y, x, out_features);
}

}  // namespace laco
