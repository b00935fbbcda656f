"""laco_kernels: make pruned LLMs fast (Triton sparse GEMMs) and good again (pruning, recovery)."""
from .formats import BitmapWeight, PackedMask, Sparse24Weight

__version__ = "0.1.0"
__all__ = ["BitmapWeight", "PackedMask", "Sparse24Weight"]
from .ops.masked_gemm import masked_linear  # noqa: E402  (training kernels, issue 3)
from .ops.loss import reconstruction_loss  # noqa: E402
__all__ += ["masked_linear", "reconstruction_loss"]
from .ops.sparse_gemm import bitmap_linear, sparse24_linear  # noqa: E402  (inference kernels, issue 2)
__all__ += ["bitmap_linear", "sparse24_linear"]
from ._hf_register import install as _install_hf  # noqa: E402  (from_pretrained of laco sparse folders, issue 15)
_install_hf()
