"""laco_kernels: make pruned LLMs fast (Triton sparse GEMMs) and good again (pruning, recovery)."""
import os as _os
import platform as _platform
import warnings as _warnings

from .formats import BitmapWeight, PackedMask, Sparse24Weight

__version__ = "0.1.0"
__all__ = ["BitmapWeight", "PackedMask", "Sparse24Weight", "native_missing_reason"]
from .ops.masked_gemm import masked_linear  # noqa: E402  (training kernels, issue 3)
from .ops.loss import reconstruction_loss  # noqa: E402
__all__ += ["masked_linear", "reconstruction_loss"]
from .ops.sparse_gemm import bitmap_linear, sparse24_linear  # noqa: E402  (inference kernels, issue 2)
__all__ += ["bitmap_linear", "sparse24_linear"]
from ._hf_register import install as _install_hf  # noqa: E402  (from_pretrained of laco sparse folders, issue 15)
_install_hf()


def native_missing_reason():
    """None when the native CPU kernels (``laco_kernels._C``) load, or when they are not expected
    (``LACO_NO_EXT=1``, or a CPU other than x86-64, which the sources do not target); otherwise a
    one-line explanation with the command that builds them."""
    if _os.environ.get("LACO_NO_EXT", "0") not in ("", "0"):
        return None
    if _platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        from . import _C  # noqa: F401
    except ImportError as exc:
        return (f"the native CPU kernels (laco_kernels._C) are not available ({exc}); CPU ops run the PyTorch "
                "reference, far slower (0.02x of dense F.linear measured at M = 1). Build them with "
                "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace` after "
                "installing torch; LACO_NO_EXT=1 silences this")
    return None


_reason = native_missing_reason()
if _reason:  # loud, once per process: a missing extension must never go unnoticed (issue 13)
    _warnings.warn("laco_kernels: " + _reason, RuntimeWarning, stacklevel=2)
del _reason
