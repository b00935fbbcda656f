"""Triton kernels and their host launchers, one file per op family (no nn.Module knowledge)."""
