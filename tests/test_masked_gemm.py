"""kernels/masked_gemm.py in the Triton interpreter against reference.py (fp16 / fp32)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import TOLERANCES
from laco_kernels import reference
from laco_kernels.formats import PackedMask
from laco_kernels.kernels import masked_gemm as mg

SHAPES = [(1, 37, 70), (33, 45, 100), (5, 24, 1100)]  # M = 1, odd, large K (several K tiles)
DENSITIES = [0.0, 0.5, "2:4", 0.9]


def make_mask(n, k, density):
    if density == "2:4":
        keep = torch.rand(n, k // 4, 4).argsort(-1)[..., :2]
        return torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(n, k)
    return torch.rand(n, k) < density


def close(a, b, dtype):
    torch.testing.assert_close(a.float(), b.float(), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
def test_forward_and_grads_match_reference(dtype, shape, density):
    m, n, k = shape
    if density == "2:4" and k % 4:
        k += 4 - k % 4
    x, w, b, dy = (torch.randn(*s, dtype=dtype) for s in ((m, k), (n, k), (n,), (m, n)))
    mask = make_mask(n, k, density)
    bits = PackedMask.from_bool(mask).bits
    close(mg.masked_linear_fwd(x, w, bits, b), reference.masked_linear(x, w, mask, b), dtype)
    close(mg.masked_linear_dx(dy, w, bits), dy.float() @ (w.float() * mask), dtype)
    dw, db = mg.masked_linear_dw(dy, x, bits, want_bias=True)
    close(dw, reference.masked_weight_grad(dy, x, mask), dtype)
    close(db, dy.float().sum(0), dtype)
    assert dw.dtype == dtype and bool((dw[~mask] == 0).all()), "dW must be exactly zero at pruned weights"


def test_prefill_tiles_and_no_mask_baseline():
    """M > 64 takes the 128x128 tiles; HAS_MASK=False is the plain linear."""
    m, n, k = 150, 70, 96
    x, w, b, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(n), torch.randn(m, n)
    mask = make_mask(n, k, 0.5)
    bits = PackedMask.from_bool(mask).bits
    close(mg.masked_linear_fwd(x, w, bits, b), reference.masked_linear(x, w, mask, b), torch.float32)
    close(mg.masked_linear_fwd(x, w, None, b), F.linear(x, w, b), torch.float32)
    close(mg.masked_linear_dx(dy, w, None), dy @ w, torch.float32)
    dw, db = mg.masked_linear_dw(dy, x, None)
    assert db is None
    close(dw, dy.t() @ x, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_non_contiguous_inputs(dtype):
    m, n, k = 9, 40, 68
    x = torch.randn(k, m, dtype=dtype).t()                 # column-major x
    w = torch.randn(n, 2 * k, dtype=dtype)[:, ::2]          # strided weight
    dy = torch.randn(n, m, dtype=dtype).t()
    mask = make_mask(n, k, 0.5)
    bits = PackedMask.from_bool(mask).bits
    assert not x.is_contiguous() and not w.is_contiguous()
    close(mg.masked_linear_fwd(x, w, bits), reference.masked_linear(x, w, mask), dtype)
    close(mg.masked_linear_dx(dy, w, bits), dy.float() @ (w.float() * mask), dtype)
    dw, _ = mg.masked_linear_dw(dy, x, bits)
    close(dw, reference.masked_weight_grad(dy, x, mask), dtype)


def test_empty_batch():
    w, mask = torch.randn(8, 40), make_mask(8, 40, 0.5)
    bits = PackedMask.from_bool(mask).bits
    assert mg.masked_linear_fwd(torch.randn(0, 40), w, bits).shape == (0, 8)
    dw, db = mg.masked_linear_dw(torch.randn(0, 8), torch.randn(0, 40), bits, want_bias=True)
    assert bool((dw == 0).all()) and bool((db == 0).all())


def test_bad_precision_is_an_error():
    with pytest.raises(ValueError, match="input_precision"):
        mg.masked_linear_fwd(torch.randn(2, 32), torch.randn(4, 32), None, input_precision="fast")


# ----------------------------------------------------------------------------------------
# the guard: W zero at pruned slots -> the plain GEMM loop; anything else -> the masked loop
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("nk", [(37, 70), (16, 256), (40, 1100)])
def test_pruned_nonzero_flags_exactly_the_violations(dtype, nk):
    n, k = nk
    mask = make_mask(n, k, 0.5)
    bits = PackedMask.from_bool(mask).bits
    w = torch.randn(n, k, dtype=dtype) * mask
    assert mg.pruned_nonzero(w, bits).tolist() == [0]
    w[0, 0] = 5.0  # a kept slot may hold anything: still clean
    mask[0, 0] = True
    bits = PackedMask.from_bool(mask).bits
    assert mg.pruned_nonzero(w, bits).tolist() == [0]
    pruned = (~mask).nonzero()
    for value in (1e-3, -0.5, float("nan"), float("inf")):  # one bad entry, the last pruned slot
        bad = w.clone()
        bad[tuple(pruned[-1])] = value
        assert mg.pruned_nonzero(bad, bits).tolist() == [1], value
    neg0 = w.clone()
    neg0[tuple(pruned[0])] = -0.0  # -0 == 0: W * M is the same
    assert mg.pruned_nonzero(neg0, bits).tolist() == [0]
    # a strided weight view is read through its strides
    wide = torch.zeros(n, 2 * k, dtype=dtype)
    wide[:, ::2] = w
    wide[tuple(pruned[-1] * torch.tensor([1, 2]))] = 1.0
    assert mg.pruned_nonzero(wide[:, ::2], bits).tolist() == [1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_guarded_kernels_exact_for_clean_and_dirty_weights(dtype):
    """With the check's flag both loops give (W ⊙ M) results; a flag forced to 0 on a dirty W
    gives the unmasked product, so the test sees which loop ran."""
    m, n, k = 150, 70, 100  # prefill tiles (> 64 rows), K not a multiple of 32
    x, b, dy = torch.randn(m, k, dtype=dtype), torch.randn(n, dtype=dtype), torch.randn(m, n, dtype=dtype)
    mask = make_mask(n, k, 0.5)
    bits = PackedMask.from_bool(mask).bits
    clean = torch.randn(n, k, dtype=dtype) * mask
    dirty = clean + torch.randn(n, k, dtype=dtype) * ~mask
    for w in (clean, dirty):
        flag = mg.pruned_nonzero(w, bits)
        assert flag.tolist() == [int(w is dirty)]
        close(mg.masked_linear_fwd(x, w, bits, b, flag=flag), reference.masked_linear(x, w, mask, b), dtype)
        close(mg.masked_linear_dx(dy, w, bits, flag=flag), dy.float() @ (w.float() * mask), dtype)
    lie = torch.zeros(1, dtype=torch.int32)
    close(mg.masked_linear_fwd(x, dirty, bits, b, flag=lie), F.linear(x.float(), dirty.float(), b.float()), dtype)
    close(mg.masked_linear_dx(dy, dirty, bits, flag=lie), dy.float() @ dirty.float(), dtype)
    with pytest.raises(ValueError, match="flag"):
        mg.masked_linear_fwd(x, clean, bits, flag=torch.zeros(2, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_even_loops_match_reference(dtype):
    """M and N multiples of every config's loop step: the dX / dW launches take their EVEN
    variants (no bound test along the loop); guarded and unguarded."""
    m, n, k = 128, 128, 100
    x, b, dy = torch.randn(m, k, dtype=dtype), torch.randn(n, dtype=dtype), torch.randn(m, n, dtype=dtype)
    mask = make_mask(n, k, 0.5)
    bits = PackedMask.from_bool(mask).bits
    assert n % mg._dx_config(m, dtype)["BLOCK_N"] == 0 and m % mg._dw_config(n, dtype)["BLOCK_M"] == 0
    for w in (torch.randn(n, k, dtype=dtype), torch.randn(n, k, dtype=dtype) * mask):
        for flag in (None, mg.pruned_nonzero(w, bits)):
            close(mg.masked_linear_fwd(x, w, bits, b, flag=flag), reference.masked_linear(x, w, mask, b), dtype)
            close(mg.masked_linear_dx(dy, w, bits, flag=flag), dy.float() @ (w.float() * mask), dtype)
    dw, db = mg.masked_linear_dw(dy, x, bits, want_bias=True)
    close(dw, reference.masked_weight_grad(dy, x, mask), dtype)
    close(db, dy.float().sum(0), dtype)
    assert bool((dw[~mask] == 0).all())



@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_peeled_last_step_matches_reference(dtype):
    """N and M not multiples of the loop steps, with whole steps before the partial one: the
    plain dX loop and the dW loop run unbounded steps, then the peeled last step."""
    m, n, k = 150, 150, 100
    cdx, cdw = mg._dx_config(m, dtype, k, n=n), mg._dw_config(n, dtype, k)
    assert n // cdx["BLOCK_N"] >= 1 and n % cdx["BLOCK_N"] != 0
    assert m // cdw["BLOCK_M"] >= 1 and m % cdw["BLOCK_M"] != 0
    x, dy = torch.randn(m, k, dtype=dtype), torch.randn(m, n, dtype=dtype)
    mask = make_mask(n, k, 0.5)
    bits = PackedMask.from_bool(mask).bits
    w = torch.randn(n, k, dtype=dtype) * mask
    close(mg.masked_linear_dx(dy, w, bits, flag=mg.pruned_nonzero(w, bits)), dy.float() @ w.float(), dtype)
    close(mg.masked_linear_dx(dy, w, None), dy.float() @ w.float(), dtype)
    dw, db = mg.masked_linear_dw(dy, x, bits, want_bias=True)
    close(dw, reference.masked_weight_grad(dy, x, mask), dtype)
    close(db, dy.float().sum(0), dtype)

@pytest.mark.parametrize("arch", [None, 80, 90])
def test_masked_loop_wide_tiles_and_peeled_step(monkeypatch, arch):
    """16-bit prefill with W nonzero at pruned slots, so the mask is applied in the loop (guarded and
    unguarded launches): sm_80 / sm_90 take the 256-row forward / dX tiles where the grid fills the
    GPU (one SM here), other devices the 128-row ones; N is not a multiple of the dX step, so the
    masked loop's partial last step runs peeled, and the guard's plain loop is held to the same."""
    from laco_kernels.kernels import dense_gemm

    monkeypatch.setattr(dense_gemm, "device_arch", lambda device: arch)
    monkeypatch.setattr(mg, "_SMS", 1)
    m, n, k = 300, 150, 100
    dt = torch.float16
    rows = 256 if arch else 128
    assert mg._config(m, dt, n, 1, k, arch)["BLOCK_M"] == rows and mg._dx_config(m, dt, k, 1, n, arch)["BLOCK_M"] == rows
    assert n % mg._dx_config(m, dt, k, 1, n, arch)["BLOCK_N"] != 0
    assert mg._config(m, dt, n, 10 ** 6, k, arch)["BLOCK_M"] == 128  # a grid that leaves SMs idle: 128 rows
    x, b, dy = torch.randn(m, k, dtype=dt), torch.randn(n, dtype=dt), torch.randn(m, n, dtype=dt)
    mask = make_mask(n, k, 0.5)
    bits = PackedMask.from_bool(mask).bits
    for w in (torch.randn(n, k, dtype=dt), torch.randn(n, k, dtype=dt) * mask):
        for flag in (None, mg.pruned_nonzero(w, bits)):
            close(mg.masked_linear_fwd(x, w, bits, b, flag=flag), reference.masked_linear(x, w, mask, b), dt)
            close(mg.masked_linear_dx(dy, w, bits, flag=flag), dy.float() @ (w.float() * mask), dt)


def test_fp32_tile_choice_fills_the_gpu():
    """fp32 takes the largest FMA tile whose grid still has a program per SM (the 64 x 64 forward /
    dX tiles only with N % 16 == 0 and K % 32 == 0), else the smallest."""
    f32 = torch.float32
    big = mg._config(4096, f32, 4096, 132, 4096)
    assert (big["BLOCK_M"], big["BLOCK_N"]) == (64, 64)
    assert mg._config(4096, f32, 4096, 132, 4100)["BLOCK_M"] == 32  # K not 32-divisible
    assert mg._config(256, f32, 128, 132, 4096)["BLOCK_M"] == 32  # nothing fills: the smallest tile
    assert mg._config(4096, f32) == mg._config(100, f32, 64, 132, 64)  # no column count: the smallest tile
    assert mg._dx_config(4096, f32, 4096, 132, 4096)["BLOCK_K"] == 64
    assert mg._dx_config(4096, f32, 4096, 132, 4095)["BLOCK_K"] == 32
    assert mg._dx_config(128, f32, 64, 132, 64)["BLOCK_K"] == 32
    assert mg._dw_config(4096, f32, 4096)["BLOCK_N"] == 128 and mg._dw_config(576, f32, 64)["BLOCK_N"] == 64
    # 16-bit: one tile off sm_80 / sm_90 (the 256-row tiles: test_masked_loop_wide_tiles_and_peeled_step)
    assert mg._config(4096, torch.float16, 4096, 1, 4096) == mg._config(4096, torch.float16)


@pytest.mark.parametrize("nk", [(70, 100), (96, 128)])
def test_fp32_every_tile_matches_reference(monkeypatch, nk):
    """With one SM the launchers take the large fp32 tiles (64 x 64 forward / dX where N and K
    allow, 128-column dW; the small ones run in the other tests); M not a multiple of any tile,
    guarded and not."""
    sms = 1
    monkeypatch.setattr(mg, "_SMS", sms)
    m, (n, k) = 150, nk
    f32 = torch.float32
    x, b, dy = torch.randn(m, k), torch.randn(n), torch.randn(m, n)
    mask = make_mask(n, k, 0.5)
    bits = PackedMask.from_bool(mask).bits
    assert mg._config(m, f32, n, mg._SMS, k)["BLOCK_M"] == (64 if n == 96 else 32)
    assert mg._dw_config(n, f32, k, mg._SMS)["BLOCK_N"] == 128
    for w in (torch.randn(n, k), torch.randn(n, k) * mask):
        for flag in (None, mg.pruned_nonzero(w, bits)):
            close(mg.masked_linear_fwd(x, w, bits, b, flag=flag), reference.masked_linear(x, w, mask, b), f32)
            close(mg.masked_linear_dx(dy, w, bits, flag=flag), dy @ (w * mask), f32)
    dw, db = mg.masked_linear_dw(dy, x, bits, want_bias=True)
    close(dw, reference.masked_weight_grad(dy, x, mask), f32)
    close(db, dy.sum(0), f32)
    assert bool((dw[~mask] == 0).all())
