// The kept half of a dense [N, K] tensor at a 2:4 weight's positions: the CPU backward of
// sparse24_linear gathers dV = (dY^T X) at the kept slots with it (laco_kernels/ops/sparse_gemm.py).
// A plain copy, so the result is bit-identical to dense.gather(1, kept_columns(meta, K)); it avoids
// building that int64 [N, K/2] index on every backward (0.1-0.9 ms a SmolLM2 linear here).
#include <ATen/Parallel.h>

#include <algorithm>

#include "laco_cpu.h"

namespace laco {

namespace {
template <typename T>
void gather_rows(const T* dense, const uint32_t* meta, int64_t K, int64_t W, int64_t r0, int64_t r1, T* out) {
  const int64_t groups = K / 4;
  for (int64_t n = r0; n < r1; ++n) {
    const T* d = dense + n * K;
    const uint32_t* mt = meta + n * W;
    T* o = out + n * (K / 2);
    for (int64_t g = 0; g < groups; ++g) {
      // nibble of group g: bits 0-1 the first kept position, bits 2-3 the second (formats.py)
      const uint32_t nib = (mt[g >> 3] >> ((g & 7) * 4)) & 0xFu;
      o[2 * g] = d[4 * g + (nib & 3u)];
      o[2 * g + 1] = d[4 * g + (nib >> 2)];
    }
  }
}
}  // namespace

at::Tensor sparse24_gather(const at::Tensor& dense, const at::Tensor& meta) {
  TORCH_CHECK(dense.dim() == 2 && dense.is_contiguous() && dense.device().is_cpu() &&
                  (dense.scalar_type() == at::kFloat || dense.scalar_type() == at::kBFloat16),
              "sparse24_gather: dense must be a contiguous CPU fp32 / bf16 [N, K] tensor");
  const int64_t N = dense.size(0), K = dense.size(1), W = (K / 4 + 7) / 8;
  TORCH_CHECK(K % 4 == 0, "sparse24_gather: K must be a multiple of 4, got ", K);
  TORCH_CHECK(meta.scalar_type() == at::kInt && meta.is_contiguous() && meta.dim() == 2 && meta.size(0) == N &&
                  meta.size(1) == W, "sparse24_gather: meta must be contiguous int32 [", N, ", ", W, "]");
  at::Tensor out = at::empty({N, K / 2}, dense.options());
  if (N == 0 || K == 0) return out;
  const uint32_t* mp = reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>());
  at::parallel_for(0, N, std::max<int64_t>(1, (int64_t{256} << 10) / (K * 4)), [&](int64_t r0, int64_t r1) {
    if (dense.scalar_type() == at::kFloat) {
      gather_rows<float>(dense.data_ptr<float>(), mp, K, W, r0, r1, out.data_ptr<float>());
    } else {
      gather_rows<uint16_t>(reinterpret_cast<const uint16_t*>(dense.data_ptr()), mp, K, W, r0, r1,
                            reinterpret_cast<uint16_t*>(out.data_ptr()));
    }
  });
  return out;
}

}  // namespace laco
