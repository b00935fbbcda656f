"""Mask helpers: pattern / sparsity validation, per-row unstructured and N:M masks."""
import pytest
import torch

from laco_kernels.prune.masks import (check_sparsity, is_nm, make_mask, n_pruned, nm_mask, parse_pattern,
                                      pattern_sparsity, sparsity_of, unstructured_mask)


@pytest.mark.parametrize("text,nm", [("2:4", (2, 4)), ("4:8", (4, 8)), (" 1 : 3 ", (1, 3)), ("7:16", (7, 16))])
def test_parse_pattern(text, nm):
    assert parse_pattern(text) == nm
    assert pattern_sparsity(text) == pytest.approx(1 - nm[0] / nm[1])


@pytest.mark.parametrize("bad,msg", [("3:2", "pattern '3:2' is not N:M with N < M"), ("4:4", "N < M"),
                                     ("0:4", "N < M"), ("2-4", "not of the form"), ("2:4:8", "not of the form"),
                                     ("", "not of the form"), ("a:b", "not of the form")])
def test_parse_pattern_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        parse_pattern(bad)


def test_parse_pattern_type():
    with pytest.raises(TypeError, match="string"):
        parse_pattern(24)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_check_sparsity_errors(bad):
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        check_sparsity(bad)


def test_check_sparsity_type():
    assert check_sparsity(0) == 0.0
    with pytest.raises(TypeError):
        check_sparsity("0.5")
    with pytest.raises(TypeError):
        check_sparsity(True)


@pytest.mark.parametrize("rows,cols,s", [(1, 7, 0.5), (5, 33, 0.3), (16, 128, 0.5), (3, 10, 0.0), (4, 9, 0.95)])
def test_unstructured_mask_exact_per_row(rows, cols, s):
    score = torch.randn(rows, cols)
    mask = unstructured_mask(score, s)
    k = n_pruned(cols, s)
    assert mask.dtype == torch.bool and mask.shape == score.shape
    assert (mask.sum(1) == cols - k).all()
    # every kept score of a row is >= every pruned score of that row
    for r in range(rows):
        kept, pruned = score[r][mask[r]], score[r][~mask[r]]
        if len(kept) and len(pruned):
            assert kept.min() >= pruned.max()


def test_n_pruned_rounding():
    assert n_pruned(10, 0.5) == 5 and n_pruned(7, 0.5) == 4 and n_pruned(3, 0.1) == 0 and n_pruned(4, 0.99) == 4


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 5)])
def test_nm_mask_keeps_top_n_of_each_group(n, m):
    score = torch.randn(6, m * 5)
    mask = nm_mask(score, n, m)
    groups, gmask = score.view(6, 5, m), mask.view(6, 5, m)
    assert (gmask.sum(-1) == n).all()
    assert is_nm(mask, n, m)
    top = groups.topk(n, dim=-1).values.min(-1).values
    assert torch.equal(groups.masked_fill(~gmask, float("inf")).min(-1).values, top)
    assert sparsity_of(mask) == pytest.approx(1 - n / m)


def test_nm_mask_errors():
    with pytest.raises(ValueError, match="not a multiple of M=4"):
        nm_mask(torch.randn(2, 6), 2, 4)
    with pytest.raises(ValueError, match="N < M"):
        nm_mask(torch.randn(2, 8), 4, 4)
    with pytest.raises(ValueError, match="2-D"):
        unstructured_mask(torch.randn(8), 0.5)
    with pytest.raises(TypeError, match="floating"):
        unstructured_mask(torch.ones(2, 4, dtype=torch.long), 0.5)


def test_make_mask_dispatch_and_is_nm():
    score = torch.randn(4, 8)
    assert torch.equal(make_mask(score, 0.5, "2:4"), nm_mask(score, 2, 4))
    assert torch.equal(make_mask(score, 0.25), unstructured_mask(score, 0.25))
    dense = torch.ones(4, 8, dtype=torch.bool)
    assert not is_nm(dense, 2, 4) and not is_nm(dense[:, :6], 2, 4)
    assert sparsity_of(torch.tensor([[0.0, 1.0], [2.0, 0.0]])) == 0.5
