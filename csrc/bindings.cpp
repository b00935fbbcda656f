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
  m.def("sparse24_to_dense", &laco::sparse24_to_dense, "dense [N,K] of a 2:4 weight", py::arg("values"),
        py::arg("meta"), py::arg("out_features"), py::arg("in_features"));
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
  m.def("panel_min_m", [](const std::string& op, const std::string& dtype, int64_t n, int64_t k) {
          TORCH_CHECK(op == "sparse24_linear" || op == "bitmap_linear", "panel_min_m: unknown op '", op, "'");
          TORCH_CHECK(dtype == "float32" || dtype == "bfloat16", "panel_min_m: dtype must be float32 or bfloat16");
          return laco::panel_min_m(op == "sparse24_linear" ? laco::LinearOp::kSparse24 : laco::LinearOp::kBitmap,
                                   dtype == "float32" ? at::kFloat : at::kBFloat16, n, k);
        }, "smallest M that runs through decompressed panels + BLAS (active ISA)", py::arg("op"), py::arg("dtype"), py::arg("n"), py::arg("k"));
  m.def("set_panel_min_m", &laco::set_panel_min_m, "-1: measured defaults; else this M threshold for every op",
        py::arg("m"));
  m.def("outer_min_m", [](const std::string& op, const std::string& dtype, int64_t n, int64_t k) {
          TORCH_CHECK(op == "sparse24_linear" || op == "bitmap_linear", "outer_min_m: unknown op '", op, "'");
          TORCH_CHECK(dtype == "float32" || dtype == "bfloat16", "outer_min_m: dtype must be float32 or bfloat16");
          return laco::outer_min_m(op == "sparse24_linear" ? laco::LinearOp::kSparse24 : laco::LinearOp::kBitmap,
                                   dtype == "float32" ? at::kFloat : at::kBFloat16, n, k);
        }, "smallest M that runs through the outer-product kernel (active ISA; huge where it has none)",
        py::arg("op"), py::arg("dtype"), py::arg("n"), py::arg("k"));
  m.def("set_outer_min_m", &laco::set_outer_min_m, "-1: measured defaults; else this M threshold for every op",
        py::arg("m"));
  m.def("prefetch_bytes", [](const std::string& op) {
          TORCH_CHECK(op == "sparse24_linear" || op == "bitmap_linear", "prefetch_bytes: unknown op '", op, "'");
          return laco::prefetch_bytes(op == "sparse24_linear" ? laco::LinearOp::kSparse24 : laco::LinearOp::kBitmap);
        }, "software prefetch distance of the direct kernel's values stream at M = 1", py::arg("op"));
  m.def("set_prefetch_bytes", [](const std::string& op, int64_t bytes) {
          TORCH_CHECK(op == "sparse24_linear" || op == "bitmap_linear", "set_prefetch_bytes: unknown op '", op, "'");
          laco::set_prefetch_bytes(op == "sparse24_linear" ? laco::LinearOp::kSparse24 : laco::LinearOp::kBitmap, bytes);
        }, "set that distance (-1: the default)", py::arg("op"), py::arg("bytes"));
  m.def("set_panel_bytes", &laco::set_panel_bytes, "dense bytes per decompressed panel", py::arg("bytes"));
  m.def("panel_bytes", &laco::panel_bytes, "dense bytes per decompressed panel");
  m.def("set_isa", &laco::set_isa, "cap the vector ISA: auto | scalar | avx2 | avx512 (for tests)", py::arg("name"));
  m.def("active_isa", []() { return laco::isa_name(laco::active_isa()); }, "ISA the kernels use now");
  m.def("detected_isa", []() { return laco::isa_name(laco::detected_isa()); }, "best ISA of this CPU");
}
