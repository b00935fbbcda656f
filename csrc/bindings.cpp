// Python bindings of laco_kernels._C (the thin Python layer is laco_kernels/_native.py).
#include <torch/extension.h>

#include "laco_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "laco_kernels native CPU kernels: 2:4 and bitmap sparse linears, fused reconstruction loss";
  m.def("sparse24_linear", &laco::sparse24_linear, "x [M,K] @ dense(2:4)^T + bias -> [M,N] (fp32 or bf16)",
        py::arg("x"), py::arg("values"), py::arg("meta"), py::arg("bias"), py::arg("out_features"),
        py::arg("in_features"));
  m.def("bitmap_linear", &laco::bitmap_linear, "x [M,K] @ dense(bitmap)^T + bias -> [M,N] (fp32 or bf16)",
        py::arg("x"), py::arg("values"), py::arg("bitmap"), py::arg("offsets"), py::arg("tile_k"), py::arg("bias"),
        py::arg("out_features"), py::arg("in_features"));
  m.def("sparse24_linear_fast", &laco::sparse24_linear_fast,
        "the packed module's eager CPU inference call: sparse24_linear's result, or None when the call is not "
        "plain eager inference on well-formed CPU tensors (csrc/module_fast.cpp)",
        py::arg("x"), py::arg("values"), py::arg("meta"), py::arg("bias"), py::arg("out_features"),
        py::arg("in_features"));
  m.def("bitmap_linear_fast", &laco::bitmap_linear_fast,
        "the packed module's eager CPU inference call: bitmap_linear's result, or None (csrc/module_fast.cpp)",
        py::arg("x"), py::arg("values"), py::arg("bitmap"), py::arg("offsets"), py::arg("tile_k"), py::arg("bias"),
        py::arg("out_features"), py::arg("in_features"));
  m.def("sparse24_to_dense", &laco::sparse24_to_dense, "dense [N,K] of a 2:4 weight", py::arg("values"),
        py::arg("meta"), py::arg("out_features"), py::arg("in_features"));
  m.def("sparse24_gather", &laco::sparse24_gather, "kept half [N,K/2] of a dense [N,K] tensor at 2:4 positions",
        py::arg("dense"), py::arg("meta"));
  m.def("bitmap_to_dense", &laco::bitmap_to_dense, "dense [N,K] of a bitmap weight", py::arg("values"),
        py::arg("bitmap"), py::arg("offsets"), py::arg("tile_k"), py::arg("out_features"), py::arg("in_features"));
  m.def("masked_linear_forward", &laco::masked_linear_forward, "x [M,K] @ (weight ⊙ mask)^T + bias -> [M,N]",
        py::arg("x"), py::arg("weight"), py::arg("bits"), py::arg("bias"));
  m.def("masked_linear_grad_input", &laco::masked_linear_grad_input, "grad_out [M,N] @ (weight ⊙ mask) -> [M,K]",
        py::arg("grad_out"), py::arg("weight"), py::arg("bits"));
  m.def("masked_linear_grad_weight", &laco::masked_linear_grad_weight, "(grad_out^T @ x) ⊙ mask -> [N,K]",
        py::arg("grad_out"), py::arg("x"), py::arg("bits"));
  m.def("reconstruction_loss_forward", &laco::reconstruction_loss_forward,
        "(loss fp32 scalar, stats fp32) for pred/target [R,D]", py::arg("pred"), py::arg("target"), py::arg("kind"));
  m.def("reconstruction_loss_backward", &laco::reconstruction_loss_backward, "grad_pred [R,D] in pred's dtype",
        py::arg("grad_out"), py::arg("pred"), py::arg("target"), py::arg("kind"), py::arg("stats"));
  // thresholds by M: panel, outer-product and AMX ranges (same arguments, same checks)
  using Threshold = int64_t (*)(laco::LinearOp, at::ScalarType, int64_t, int64_t);
  const auto def_threshold = [&m](const char* name, Threshold fn, const char* doc) {
    m.def(name, [name, fn](const std::string& op, const std::string& dtype, int64_t n, int64_t k) {
            TORCH_CHECK(op == "sparse24_linear" || op == "bitmap_linear", name, ": unknown op '", op, "'");
            TORCH_CHECK(dtype == "float32" || dtype == "bfloat16", name, ": dtype must be float32 or bfloat16");
            return fn(op == "sparse24_linear" ? laco::LinearOp::kSparse24 : laco::LinearOp::kBitmap,
                      dtype == "float32" ? at::kFloat : at::kBFloat16, n, k);
          }, doc, py::arg("op"), py::arg("dtype"), py::arg("n"), py::arg("k"));
  };
  def_threshold("panel_min_m", &laco::panel_min_m, "smallest M that runs through decompressed panels + BLAS (active ISA)");
  def_threshold("outer_min_m", &laco::outer_min_m,
                "smallest M that runs through the outer-product kernel (active ISA; huge where it has none)");
  def_threshold("amx_min_m", &laco::amx_min_m, "smallest M that runs on AMX tiles (huge where there are none, or for fp32)");
  def_threshold("amx_max_m", &laco::amx_max_m, "first M past the AMX range (the panel path from there on)");
  def_threshold("pair_max_m", &laco::pair_max_m,
                "first M past the bf16 pair kernel's range [outer_min_m, pair_max_m) (0 where it does not run)");
  m.def("linear_path", [](const std::string& op, const std::string& dtype, int64_t n, int64_t k, int64_t mm,
                          double density) {
          TORCH_CHECK(op == "sparse24_linear" || op == "bitmap_linear", "linear_path: unknown op '", op, "'");
          TORCH_CHECK(dtype == "float32" || dtype == "bfloat16", "linear_path: dtype must be float32 or bfloat16");
          static const char* names[] = {"direct", "outer", "pair", "panel", "amx", "shuffle", "lanes"};
          return std::string(names[static_cast<int>(laco::linear_path(
              op == "sparse24_linear" ? laco::LinearOp::kSparse24 : laco::LinearOp::kBitmap,
              dtype == "float32" ? at::kFloat : at::kBFloat16, mm, n, k, density))]);
        }, "the path the op takes at M = m (the dispatch itself)", py::arg("op"), py::arg("dtype"), py::arg("n"),
        py::arg("k"), py::arg("m"), py::arg("density"));
  m.def("set_panel_min_m", &laco::set_panel_min_m, "-1: measured defaults; else this M threshold for every op",
        py::arg("m"));
  m.def("set_outer_min_m", &laco::set_outer_min_m, "-1: measured defaults; else this M threshold for every op",
        py::arg("m"));
  m.def("set_shuffle_min_m", &laco::set_shuffle_min_m,
        "-1: measured defaults; else this M threshold for the 2:4 bf16 shuffle kernel", py::arg("m"));
  m.def("set_lanes_min_m", &laco::set_lanes_min_m,
        "-1: measured defaults; else this M threshold for the bf16 bitmap lanes kernel", py::arg("m"));
  m.def("set_amx_min_m", &laco::set_amx_min_m, "-1: measured defaults; else this M threshold for every op",
        py::arg("m"));
  m.def("amx_available", &laco::amx_available, "CPU has AMX-BF16 and the OS granted the tile state");
  m.def("set_amx_enabled", &laco::set_amx_enabled, "turn the AMX path on / off (tests, benchmarks)", py::arg("on"));
  m.def("prefetch_bytes", [](const std::string& op) {
          TORCH_CHECK(op == "sparse24_linear" || op == "bitmap_linear", "prefetch_bytes: unknown op '", op, "'");
          return laco::prefetch_bytes(op == "sparse24_linear" ? laco::LinearOp::kSparse24 : laco::LinearOp::kBitmap);
        }, "software prefetch distance of the direct kernel's values stream at M = 1", py::arg("op"));
  m.def("set_prefetch_bytes", [](const std::string& op, int64_t bytes) {
          TORCH_CHECK(op == "sparse24_linear" || op == "bitmap_linear", "set_prefetch_bytes: unknown op '", op, "'");
          laco::set_prefetch_bytes(op == "sparse24_linear" ? laco::LinearOp::kSparse24 : laco::LinearOp::kBitmap, bytes);
        }, "set that distance (-1: the default)", py::arg("op"), py::arg("bytes"));
  m.def("bitmap_block_range", [](int64_t k, double density) {
          TORCH_CHECK(k > 0, "bitmap_block_range: k must be positive, got ", k);
          return std::make_pair(laco::bitmap_block_min_m(), laco::bitmap_block_max_m(k, density));
        }, "[lo, hi): the M at which bitmap_linear's direct bf16 path runs the register-blocked kernel (in_features k)",
        py::arg("k"), py::arg("density"));
  m.def("set_bitmap_block_min_m", &laco::set_bitmap_block_min_m,
        "-1: the measured default; else that M (huge: never)", py::arg("m"));
  m.def("set_panel_bytes", &laco::set_panel_bytes,
        "dense bytes per decompressed panel (0: the measured default, 1 MB; 2 MB for bf16 on AVX512_BF16 without AMX)",
        py::arg("bytes"));
  m.def("set_panel_split", &laco::set_panel_split, "-1: measured default; 0: never; 1: always split panels by thread",
        py::arg("mode"));
  m.def("panel_split", &laco::panel_split, "whether the panel path would split rows by thread for this call",
        py::arg("m"), py::arg("n"), py::arg("k"), py::arg("element_size"));
  m.def("panel_bytes", &laco::panel_bytes, "dense bytes per decompressed panel (bf16 without AMX: twice this unless set)");
  m.def("set_isa", &laco::set_isa, "cap the vector ISA: auto | scalar | avx2 | avx512 (for tests)", py::arg("name"));
  m.def("active_isa", []() { return laco::isa_name(laco::active_isa()); }, "ISA the kernels use now");
  m.def("detected_isa", []() { return laco::isa_name(laco::detected_isa()); }, "best ISA of this CPU");
}
