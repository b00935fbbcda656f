"""LoRA baseline: trains, leaves the base sparse while unmerged, and merging reports lost sparsity."""
import pytest
import torch
from _recover_util import dense_and_pruned, one_thread

from laco_kernels.recover import lora


_threads = pytest.fixture(autouse=True)(one_thread)


def _ids(n=8, t=16):
    return torch.randint(0, 100, (n, t), generator=torch.Generator().manual_seed(2))


def test_lora_trains_all_projections_and_keeps_base_sparse():
    _, pruned = dense_and_pruned("2:4", layers=2)
    zeros = {n: p == 0 for n, p in pruned.named_parameters() if ".layers." in n and p.dim() == 2}
    ids = _ids()
    with torch.no_grad():
        loss0 = pruned(input_ids=ids, labels=ids).loss.item()
    res = lora(pruned, ids, epochs=6, batch_size=4, lr=1e-2, progress=False)
    assert not res.merged and res.steps == 12 and res.tokens == ids.numel()
    names = [n for n, _ in res.model.named_modules() if n.endswith("lora_A")]
    assert len(names) == 2 * 7  # q k v o gate up down in both blocks
    with torch.no_grad():
        assert res.model(input_ids=ids, labels=ids).loss.item() < loss0
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
            for n, p in res.model.named_parameters() if "lora_" not in n}
    for n, z in zeros.items():
        assert torch.all(base[n][z] == 0)


def test_lora_merge_destroys_sparsity_and_says_so():
    _, pruned = dense_and_pruned("unstructured", layers=1)
    res = lora(pruned, _ids(), epochs=1, batch_size=4, lr=1e-2, merge=True, progress=False)
    assert res.merged and res.pruned_weights_made_nonzero > 0.9


def test_lora_bad_calibration_raises():
    _, pruned = dense_and_pruned("2:4", layers=1)
    with pytest.raises(ValueError, match="token ids"):
        lora(pruned, torch.zeros(4, 8), progress=False)


def test_lora_autocast_trains_in_bf16_and_keeps_fp32_parameters():
    _, pruned = dense_and_pruned("2:4", layers=2)
    ids = _ids()
    with torch.no_grad():
        loss0 = pruned(input_ids=ids, labels=ids).loss.item()
    res = lora(pruned, ids, epochs=6, batch_size=4, lr=1e-2, progress=False, autocast=True)
    assert all(p.dtype == torch.float32 for p in res.model.parameters())
    with torch.no_grad():
        assert res.model(input_ids=ids, labels=ids).loss.item() < loss0
