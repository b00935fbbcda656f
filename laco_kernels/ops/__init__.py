"""Autograd Functions and dispatch: CUDA -> Triton, CPU -> native extension or reference."""
