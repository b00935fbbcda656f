"""laco_kernels: make pruned LLMs fast (Triton sparse GEMMs) and good again (pruning, recovery)."""
from .formats import BitmapWeight, PackedMask, Sparse24Weight

__version__ = "0.1.0"
__all__ = ["BitmapWeight", "PackedMask", "Sparse24Weight"]
