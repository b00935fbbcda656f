"""BlockRunner / HiddenStream: block-by-block execution reproduces the full model."""
import os

import pytest
import torch

from _tiny import FAMILIES, random_ids, tiny_model
from laco_kernels.models.adapters import get_adapter, get_module
from laco_kernels.models.capture import BlockRunner, HiddenStream


def _final_hidden(model, ids):
    """The input of the final norm (the last block's output) from one full forward."""
    norm = get_module(model, get_adapter(model).final_norm)
    seen = {}
    h = norm.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach().clone()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    return seen["x"]


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_reproduce_model_fp32(family):
    model = tiny_model(family)
    ids = random_ids(5, 12)  # 5 samples in micro-batches of 2: a ragged last batch
    want = _final_hidden(model, ids)
    runner = BlockRunner(model, batch_size=2, stream_dtype=torch.float32, progress=False)
    stream = runner.capture(ids)
    assert stream.shape == (5, 12, 64)
    for block in runner.blocks:
        stream = runner.run_block(block, stream)
    torch.testing.assert_close(stream.data, want, atol=1e-5, rtol=1e-5)
    # one micro-batch holding every sample: the same computation as the full model, bit for bit
    runner = BlockRunner(model, batch_size=5, stream_dtype=torch.float32, progress=False)
    stream = runner.capture(ids)
    for block in runner.blocks:
        runner.run_block(block, stream, stream)  # in place
    assert torch.equal(stream.data, want)


def test_forward_block_matches_run_block_and_has_grad():
    model = tiny_model("llama")
    runner = BlockRunner(model, batch_size=3, stream_dtype=torch.float32, progress=False)
    stream = runner.capture(random_ids(3, 10))
    out = runner.run_block(runner.blocks[0], stream)
    h = stream[0:3].clone().requires_grad_(True)
    y = runner.forward_block(runner.blocks[0], h)
    assert torch.equal(y.detach(), out.data)
    y.square().mean().backward()
    assert h.grad is not None and runner.blocks[0].mlp.down_proj.weight.grad is not None
    batches = list(runner.iter_batches(stream, order=torch.tensor([2, 0, 1]), batch_size=2))
    assert [b[0].tolist() for b in batches] == [[2, 0], [1]]
    assert torch.equal(batches[0][1], stream.data[[2, 0]])


def test_hooks_see_every_sample():
    model = tiny_model("qwen2")
    runner = BlockRunner(model, batch_size=2, stream_dtype=torch.float32, progress=False)
    stream = runner.capture(random_ids(5, 7))
    rows = []
    lin = runner.blocks[1].mlp.down_proj
    h = lin.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    runner.run_block(runner.blocks[1], stream)
    h.remove()
    assert sum(rows) == 5


def test_memory_mapped_stream(tmp_path):
    model = tiny_model("mistral")
    ids = random_ids(4, 9)
    want = _final_hidden(model, ids)
    runner = BlockRunner(model, batch_size=3, stream_dtype=torch.float32, offload_dir=str(tmp_path),
                         progress=False)
    stream = runner.capture(ids)
    assert stream.path is not None and os.path.exists(stream.path)
    assert os.path.getsize(stream.path) == 4 * 9 * 64 * 4
    for block in runner.blocks:
        nxt = runner.run_block(block, stream)
        assert nxt.path != stream.path and os.path.dirname(nxt.path) == str(tmp_path)
        stream.delete()
        assert not os.path.exists(stream.path)
        stream = nxt
    torch.testing.assert_close(stream.data, want, atol=1e-5, rtol=1e-5)
    copy = stream.clone(str(tmp_path / "copy.bin"))
    assert torch.equal(copy.data, stream.data)
    stream.delete(), copy.delete()
    assert os.listdir(tmp_path) == []


def test_fp16_overflow_raises():
    s = HiddenStream((1, 2, 3), torch.float16)
    with pytest.raises(FloatingPointError, match="non-finite"):
        s[0] = torch.full((2, 3), 1e6)
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e6)  # embeddings beyond fp16's range
    runner = BlockRunner(model, batch_size=2, stream_dtype=torch.float16, progress=False)
    with pytest.raises(FloatingPointError, match="bfloat16 or torch.float32"):
        runner.capture(random_ids(2, 4))


def test_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="batch_size"):
        BlockRunner(model, batch_size=0)
    with pytest.raises(ValueError, match="samples, seqlen"):
        BlockRunner(model, progress=False).capture(torch.zeros(8, dtype=torch.long))
