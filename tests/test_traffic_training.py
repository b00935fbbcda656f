"""Traffic bounds of the training kernels (issue 3) on small shapes, in the interpreter.

masked_linear forward + dX + dW moves <= 1.15x the bytes of the unmasked Triton linear (same
kernels, no mask); the fused loss reads pred and target once per direction and its backward
writes only grad_pred. bench/traffic.py records the same at larger shapes.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import traffic  # noqa: E402
import traffic_training  # noqa: E402


@pytest.mark.parametrize("m,n,k", [(1, 256, 256), (64, 128, 160)])
def test_masked_linear_step_within_bound(m, n, k):
    rec = traffic_training.masked_linear_step(m, n, k, torch.float16, density=0.5)
    assert rec["total_ratio"] <= traffic_training.MASKED_BOUND, rec
    # the mask really is read: three weight-sized passes each read its packed bits
    extra = rec["bytes_read"] - rec["dense_bytes_read"]
    assert extra == 3 * rec["mask_nbytes"], rec
    assert rec["bytes_written"] == rec["dense_bytes_written"]


@pytest.mark.parametrize("kind", traffic_training.KINDS)
def test_recon_loss_reads_once_and_writes_only_grad(kind):
    fwd, bwd = traffic_training.recon_loss_traffic(37, 200, torch.float16, kind)
    assert fwd["bytes_read"] == fwd["dense_bytes_read"]
    assert bwd["dense_bytes_read"] <= bwd["bytes_read"] <= bwd["dense_bytes_read"] + bwd["allowed_extra_read"]
    assert bwd["bytes_written"] == bwd["grad_nbytes"]


def test_families_are_registered_in_the_audit():
    assert {"masked_linear", "recon_loss"} <= set(traffic.REGISTRY)
