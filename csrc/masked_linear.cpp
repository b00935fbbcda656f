// masked_linear on the CPU: y = x (W ⊙ M)^T + b, dX = dY (W ⊙ M), dW = (dY^T X) ⊙ M (db in Python).
//
// W is a dense [N, K] fp32 / bf16 weight, M a bit-packed mask (PackedMask.bits: int32 [N, ceil(K/32)],
// bit k%32 of word k/32). Every product goes through the BLAS that F.linear uses (at::mm / at::addmm,
// fp32 accumulation, AMX for bf16 where the CPU has it); the mask is applied in one vector pass per
// block of W that the GEMM then reads from cache (a masked load per 16 / 32 columns), so no bool
// [N, K] mask, no W ⊙ M of the whole weight and no fp32 copy of a bf16 operand is ever made (the
// reference builds all three). dW is masked in place right after the GEMM wrote each row block:
// pruned entries are exactly 0.
#include <ATen/Parallel.h>

#include <algorithm>

#include "laco_cpu.h"

namespace laco {
namespace {

// Bits of word w that are real columns of a row of K (padding bits past K are ignored).
LACO_INLINE uint32_t col_bits(int64_t K, int64_t w) {
  const int64_t left = K - 32 * w;
  return left >= 32 ? 0xffffffffu : ((1u << left) - 1u);
}

// dst[c - c0] = src[c] where bit c of the row is set, else 0, for columns [c0, c1) of one row (c0 % 32 == 0).
template <typename VT>
void mask_cols_scalar(const VT* src, const uint32_t* bits, int64_t K, int64_t c0, int64_t c1, VT* dst) {
  for (int64_t c = c0; c < c1; ++c) dst[c - c0] = ((bits[c >> 5] >> (c & 31)) & 1u) ? src[c] : VT(0);
}

#if LACO_X86
template <typename VT>
LACO_AVX512 void mask_cols_avx512(const VT* src, const uint32_t* bits, int64_t K, int64_t c0, int64_t c1, VT* dst) {
  const int64_t wf = c1 / 32;  // whole words inside [c0, c1)
  int64_t w = c0 / 32;
  for (; w < wf; ++w) {
    const uint32_t b = bits[w];
    VT* d = dst + 32 * w - c0;
    const VT* s = src + 32 * w;
    if constexpr (std::is_same_v<VT, float>) {
      _mm512_storeu_ps(d, _mm512_maskz_loadu_ps(static_cast<__mmask16>(b), s));
      _mm512_storeu_ps(d + 16, _mm512_maskz_loadu_ps(static_cast<__mmask16>(b >> 16), s + 16));
    } else {
      _mm512_storeu_si512(d, _mm512_maskz_loadu_epi16(static_cast<__mmask32>(b), s));
    }
  }
  if (32 * w < c1) mask_cols_scalar<VT>(src, bits, K, 32 * w, c1, dst + 32 * w - c0);
}

// g[c] = 0 where bit c is clear, for one row.
template <typename VT>
LACO_AVX512 void mask_inplace_avx512(VT* g, const uint32_t* bits, int64_t K) {
  const int64_t wf = K / 32;
  for (int64_t w = 0; w < wf; ++w) {
    const uint32_t b = bits[w];
    if (b == 0xffffffffu) continue;
    VT* p = g + 32 * w;
    if constexpr (std::is_same_v<VT, float>) {
      _mm512_storeu_ps(p, _mm512_maskz_loadu_ps(static_cast<__mmask16>(b), p));
      _mm512_storeu_ps(p + 16, _mm512_maskz_loadu_ps(static_cast<__mmask16>(b >> 16), p + 16));
    } else {
      _mm512_storeu_si512(p, _mm512_maskz_loadu_epi16(static_cast<__mmask32>(b), p));
    }
  }
  for (int64_t c = 32 * wf; c < K; ++c)
    if (!((bits[c >> 5] >> (c & 31)) & 1u)) g[c] = VT(0);
}
#endif

template <typename VT>
void mask_cols(Isa isa, const VT* src, const uint32_t* bits, int64_t K, int64_t c0, int64_t c1, VT* dst) {
#if LACO_X86
  if (isa >= Isa::kAvx512) return mask_cols_avx512<VT>(src, bits, K, c0, c1, dst);
#endif
  mask_cols_scalar<VT>(src, bits, K, c0, c1, dst);
}

template <typename VT>
void mask_inplace(Isa isa, VT* g, const uint32_t* bits, int64_t K) {
#if LACO_X86
  if (isa >= Isa::kAvx512) return mask_inplace_avx512<VT>(g, bits, K);
#endif
  for (int64_t c = 0; c < K; ++c)
    if (!((bits[c >> 5] >> (c & 31)) & 1u)) g[c] = VT(0);
}

// Masked rows / column blocks for either element type (fp32, or bf16 as raw 16-bit words).
void masked_block(Isa isa, const at::Tensor& weight, const uint32_t* bits, int64_t r0, int64_t r1, int64_t c0,
                  int64_t c1, void* dst) {
  const int64_t K = weight.size(1), W = (K + 31) / 32, width = c1 - c0;
  if (weight.scalar_type() == at::kFloat) {
    const float* w = weight.data_ptr<float>();
    for (int64_t n = r0; n < r1; ++n)
      mask_cols<float>(isa, w + n * K, bits + n * W, K, c0, c1, static_cast<float*>(dst) + (n - r0) * width);
  } else {
    const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
    for (int64_t n = r0; n < r1; ++n)
      mask_cols<uint16_t>(isa, w + n * K, bits + n * W, K, c0, c1, static_cast<uint16_t*>(dst) + (n - r0) * width);
  }
}

void check_weight_bits(const at::Tensor& weight, const at::Tensor& bits, const char* op) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2, op, ": weight must be a 2-D CPU tensor, got ",
              weight.sizes(), " on ", weight.device());
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16, op,
              ": native kernels take float32 or bfloat16 weights, got ", weight.scalar_type());
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(bits.device().is_cpu() && bits.scalar_type() == at::kInt && bits.is_contiguous(), op,
              ": mask bits must be a contiguous CPU int32 tensor");
  TORCH_CHECK(bits.dim() == 2 && bits.size(0) == N && bits.size(1) == (K + 31) / 32, op, ": mask bits must have shape [",
              N, ", ", (K + 31) / 32, "], got ", bits.sizes());
}

void check_2d(const at::Tensor& t, const at::Tensor& weight, int64_t cols, const char* name, const char* op) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.size(1) == cols, op, ": ", name, " must be a 2-D CPU tensor with ",
              cols, " columns, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == weight.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but the weight has dtype ", weight.scalar_type());
}

// Weight rows (or columns) per block of the backward: about 8 MB of weight. Larger than the forward's
// panels because here the GEMMs reduce over M (thousands of tokens in recovery) and every extra block
// re-packs the whole [M, K] x or [M, N] dY: with 1 MB blocks the fp32 backward of a SmolLM2 layer at
// 1024-4096 tokens ran 0.84-0.94x the reference (one GEMM each); one block per SmolLM2 weight does not.
int64_t block_len(int64_t other, int64_t es, int64_t align) {
  const int64_t n = std::max<int64_t>(panel_bytes(), int64_t{8} << 20) / std::max<int64_t>(other * es, 1);
  return std::max<int64_t>(align, n / align * align);
}

}  // namespace

at::Tensor masked_linear_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bits,
                                 const c10::optional<at::Tensor>& bias) {
  const char* op = "masked_linear";
  check_weight_bits(weight, bits, op);
  check_2d(x, weight, weight.size(1), "x", op);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": bias must be a CPU tensor of shape [", weight.size(0), "], got ", bias->sizes());
  }
  const Isa isa = active_isa();
  const int64_t K = weight.size(1);
  const uint32_t* bp = reinterpret_cast<const uint32_t*>(bits.data_ptr<int32_t>());
  return panel_linear(x, bias, weight.size(0), K, [&, isa, bp, K](int64_t r0, int64_t r1, void* dst) {
    masked_block(isa, weight, bp, r0, r1, 0, K, dst);
  });
}

at::Tensor masked_linear_grad_input(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& bits) {
  const char* op = "masked_linear_grad_input";
  check_weight_bits(weight, bits, op);
  const int64_t N = weight.size(0), K = weight.size(1);
  check_2d(dy, weight, N, "grad_out", op);
  const int64_t M = dy.size(0);
  at::Tensor dx = at::empty({M, K}, dy.options());
  if (M == 0 || K == 0) return dx;
  if (N == 0) return dx.zero_();
  const Isa isa = active_isa();
  const uint32_t* bp = reinterpret_cast<const uint32_t*>(bits.data_ptr<int32_t>());
  const int64_t es = static_cast<int64_t>(weight.element_size());
  // column blocks of the masked weight: each block's dX columns are one complete GEMM (no accumulation
  // across blocks, so bf16 dX is rounded once)
  const int64_t cb = std::min(K, block_len(N, es, 32));
  at::Tensor panel = at::empty({N, cb}, weight.options());
  const int64_t grain = std::max<int64_t>(1, (int64_t{256} << 10) / std::max<int64_t>(cb * es, 1));
  for (int64_t c0 = 0; c0 < K; c0 += cb) {
    const int64_t c1 = std::min(K, c0 + cb), width = c1 - c0;
    at::Tensor p = width == cb ? panel : at::empty({N, width}, weight.options());
    char* base = static_cast<char*>(p.data_ptr());
    at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
      masked_block(isa, weight, bp, r0, r1, c0, c1, base + r0 * width * es);
    });
    at::Tensor out = width == K ? dx : dx.narrow(1, c0, width);
    at::mm_out(out, dy, p);
  }
  return dx;
}

at::Tensor masked_linear_grad_weight(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bits) {
  const char* op = "masked_linear_grad_weight";
  TORCH_CHECK(x.dim() == 2 && dy.dim() == 2 && x.size(0) == dy.size(0), op,
              ": x [M, K] and grad_out [M, N] must have the same M, got ", x.sizes(), " and ", dy.sizes());
  const int64_t N = dy.size(1), K = x.size(1);
  TORCH_CHECK(bits.device().is_cpu() && bits.scalar_type() == at::kInt && bits.is_contiguous() && bits.dim() == 2 &&
                  bits.size(0) == N && bits.size(1) == (K + 31) / 32,
              op, ": mask bits must be a contiguous CPU int32 tensor of shape [", N, ", ", (K + 31) / 32, "], got ",
              bits.sizes());
  TORCH_CHECK(x.scalar_type() == dy.scalar_type() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              op, ": x and grad_out must both be float32 or both bfloat16, got ", x.scalar_type(), " and ",
              dy.scalar_type());
  at::Tensor dw = at::empty({N, K}, x.options());
  if (N == 0 || K == 0) return dw;
  if (x.size(0) == 0) return dw.zero_();
  const Isa isa = active_isa();
  const uint32_t* bp = reinterpret_cast<const uint32_t*>(bits.data_ptr<int32_t>());
  const int64_t W = (K + 31) / 32;
  const int64_t es = static_cast<int64_t>(x.element_size());
  // row blocks of dW: each is masked right after its GEMM, while it is still in cache
  const int64_t rb = std::min(N, block_len(K, es, 16));
  const at::Tensor dyt = dy.t();
  const int64_t grain = std::max<int64_t>(1, (int64_t{256} << 10) / std::max<int64_t>(K * es, 1));
  for (int64_t n0 = 0; n0 < N; n0 += rb) {
    const int64_t nr = std::min(rb, N - n0);
    at::Tensor out = nr == N ? dw : dw.narrow(0, n0, nr);
    at::mm_out(out, nr == N ? dyt : dyt.narrow(0, n0, nr), x);
    at::parallel_for(n0, n0 + nr, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t n = r0; n < r1; ++n) {
        if (x.scalar_type() == at::kFloat) {
          mask_inplace<float>(isa, dw.data_ptr<float>() + n * K, bp + n * W, K);
        } else {
          mask_inplace<uint16_t>(isa, reinterpret_cast<uint16_t*>(dw.data_ptr()) + n * K, bp + n * W, K);
        }
      }
    });
  }
  return dw;
}

}  // namespace laco
