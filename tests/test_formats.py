"""formats.py: round trips (hypothesis), the 2:4 validity check, safetensors save/load, errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from laco_kernels.formats import BitmapWeight, PackedMask, Sparse24Weight, pack_bits, unpack_bits

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SETTINGS = dict(max_examples=25, deadline=None)


def _random_24(n, k, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    w[w == 0] = 1  # exact zeros would make "kept" positions ambiguous
    # keep 0, 1 or 2 entries of each group at random positions
    keep = torch.rand(n, k // 4, 4, generator=g).argsort(-1) < torch.randint(0, 3, (n, k // 4, 1), generator=g)
    return w * keep.reshape(n, k).to(dtype)


@settings(**SETTINGS)
@given(n=st.integers(1, 9), groups=st.integers(1, 20), seed=st.integers(0, 2 ** 16), dtype=st.sampled_from(DTYPES))
def test_sparse24_round_trip(n, groups, seed, dtype):
    w = _random_24(n, 4 * groups, seed, dtype)
    w24 = Sparse24Weight.from_dense(w)
    assert torch.equal(w24.to_dense(), w)
    assert w24.values.shape == (n, 2 * groups) and w24.meta.dtype == torch.int32
    assert w24.meta.shape == (n, (groups + 7) // 8)
    assert torch.equal(w24.mask() | (w == 0), torch.ones_like(w, dtype=torch.bool))
    w24.validate()
    assert w24.nbytes == w24.values.numel() * w24.values.element_size() + w24.meta.numel() * 4


@settings(**SETTINGS)
@given(n=st.integers(1, 6), groups=st.integers(1, 12), seed=st.integers(0, 2 ** 16))
def test_sparse24_validity_check_rejects_three_nonzeros(n, groups, seed):
    w = _random_24(n, 4 * groups, seed, torch.float32)
    g = torch.Generator().manual_seed(seed)
    r, c = int(torch.randint(0, n, (1,), generator=g)), int(torch.randint(0, groups, (1,), generator=g))
    w[r, 4 * c: 4 * c + 4] = torch.tensor([1.0, -2.0, 3.0, 0.0])  # three nonzeros in one group
    with pytest.raises(ValueError, match=f"not 2:4 sparse: row {r}, columns {4 * c}"):
        Sparse24Weight.from_dense(w)
    pruned = Sparse24Weight.from_dense(w, prune=True)
    d = pruned.to_dense()
    assert ((d.reshape(n, groups, 4) != 0).sum(-1) <= 2).all()
    assert torch.equal(d[r, 4 * c: 4 * c + 4], torch.tensor([0.0, -2.0, 3.0, 0.0]))  # two largest magnitudes


def test_sparse24_prune_keeps_two_largest_of_dense():
    w = torch.tensor([[0.1, -5.0, 0.2, 4.0, 1.0, 2.0, 3.0, -4.0]])
    assert torch.equal(Sparse24Weight.from_dense(w, prune=True).to_dense(),
                       torch.tensor([[0.0, -5.0, 0.0, 4.0, 0.0, 0.0, 3.0, -4.0]]))


@settings(**SETTINGS)
@given(n=st.integers(1, 7), k=st.integers(1, 300), sparsity=st.floats(0.0, 1.0), seed=st.integers(0, 2 ** 16),
       tile_k=st.sampled_from([32, 64, 128, 256]), dtype=st.sampled_from(DTYPES))
def test_bitmap_round_trip(n, k, sparsity, seed, tile_k, dtype):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) >= sparsity)).to(dtype)
    bw = BitmapWeight.from_dense(w, tile_k=tile_k)
    assert torch.equal(bw.to_dense(), w)
    assert bw.values.numel() == int((w != 0).sum())
    assert bw.offsets.shape == (n, (k + tile_k - 1) // tile_k)
    bw.validate()


@settings(**SETTINGS)
@given(n=st.integers(1, 5), k=st.integers(1, 100), seed=st.integers(0, 2 ** 16))
def test_bits_round_trip(n, k, seed):
    m = torch.rand(n, k, generator=torch.Generator().manual_seed(seed)) > 0.5
    assert torch.equal(unpack_bits(pack_bits(m), k), m)
    assert torch.equal(PackedMask.from_bool(m).to_bool(), m)


@pytest.mark.parametrize("cls", ["sparse24", "bitmap", "mask"])
def test_safetensors_round_trip(tmp_path, cls):
    w = Sparse24Weight.from_dense(torch.randn(6, 40), prune=True).to_dense()
    obj = {"sparse24": lambda: Sparse24Weight.from_dense(w), "bitmap": lambda: BitmapWeight.from_dense(w, tile_k=64),
           "mask": lambda: PackedMask.from_weight(w)}[cls]()
    path = str(tmp_path / "w.safetensors")
    obj.save(path)
    back = type(obj).load(path)
    for name, t in obj.to_tensors().items():
        assert torch.equal(back.to_tensors()[name], t), name
    assert back.shape == obj.shape
    with pytest.raises(ValueError, match="expected format"):
        (BitmapWeight if cls != "bitmap" else Sparse24Weight).load(path)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="divisible by 4"):
        Sparse24Weight.from_dense(torch.randn(3, 6))
    with pytest.raises(TypeError, match="dtype int64"):
        Sparse24Weight.from_dense(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="2 dimensions"):
        BitmapWeight.from_dense(torch.randn(8))
    with pytest.raises(ValueError, match="tile_k"):
        BitmapWeight.from_dense(torch.randn(2, 8), tile_k=48)
    with pytest.raises(ValueError, match="empty"):
        Sparse24Weight.from_dense(torch.randn(0, 8))
    w24 = Sparse24Weight.from_dense(torch.randn(4, 16), prune=True)
    with pytest.raises(ValueError, match="values has shape"):
        Sparse24Weight(w24.values[:, :4], w24.meta, w24.shape).validate()
    bw = BitmapWeight.from_dense(torch.randn(4, 64))
    with pytest.raises(ValueError, match="offsets do not match"):
        BitmapWeight(bw.values, bw.bitmap, bw.offsets + 1, bw.shape, bw.tile_k).validate()


def test_row_chunked_packing_matches_whole(monkeypatch):
    """The packing helpers work on row chunks (bounded int64 temporaries); results must not
    depend on the chunk size, including a last chunk shorter than the others."""
    from laco_kernels import formats

    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 52, generator=g)
    mask = torch.rand(37, 70, generator=g) < 0.3
    whole = (Sparse24Weight.from_dense(w, prune=True), pack_bits(mask))
    monkeypatch.setattr(formats, "_CHUNK_ELEMS", 200)  # a few rows per chunk
    w24, bits = Sparse24Weight.from_dense(w, prune=True), pack_bits(mask)
    assert torch.equal(w24.values, whole[0].values) and torch.equal(w24.meta, whole[0].meta)
    assert torch.equal(bits, whole[1]) and torch.equal(unpack_bits(bits, 70), mask)
    dense = w24.to_dense()
    kept = w.reshape(37, 13, 4).abs().topk(2, -1).indices
    m = w24.mask().reshape(37, 13, 4)
    assert bool(m.gather(-1, kept).all()) and bool((m.sum(-1) == 2).all())
    assert torch.equal(dense.reshape(37, 13, 4).gather(-1, kept), w.reshape(37, 13, 4).gather(-1, kept))
    w24.validate()
    bad = w24.meta.clone()
    bad[30, 0] = 0  # row 30 group 0: i0 = i1 = 0 (a chunk past the first)
    with pytest.raises(ValueError, match="two distinct"):
        Sparse24Weight(w24.values, bad, w24.shape).validate()


def test_top2_of_4_matches_a_stable_sort_with_ties():
    """The comparison-based selection keeps what a stable descending sort keeps, ties included."""
    from laco_kernels.formats import _top2_of_4

    g = torch.Generator().manual_seed(1)
    score = torch.randint(0, 3, (500, 4), generator=g).float()  # values in {0, 1, 2}: ties everywhere
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :2]
    expect = torch.zeros(500, 4, dtype=torch.bool).scatter_(-1, order, True)
    assert torch.equal(_top2_of_4(score), expect)


# -- issue 13: atomic save, load errors naming the file, the NaN contract ------------------------
import os  # noqa: E402

import safetensors.torch  # noqa: E402

from _faults import InjectedFault, inject, leftovers, snapshot  # noqa: E402

_MAKERS = {"sparse24": lambda w: Sparse24Weight.from_dense(w, prune=True),
           "bitmap": lambda w: BitmapWeight.from_dense(w, tile_k=32),
           "mask": lambda w: PackedMask.from_weight(w)}


@pytest.mark.parametrize("cls", list(_MAKERS))
@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("fault", [("safetensors", "save_file", 1), ("os", "fsync", 1), ("os", "replace", 1)])
def test_save_fault_keeps_old_file_or_nothing(tmp_path, monkeypatch, cls, existing, fault):
    path = str(tmp_path / "w.safetensors")
    old = _MAKERS[cls](torch.randn(4, 32))
    if existing:
        old.save(path)
    before = snapshot(path)
    target = {"safetensors": safetensors.torch, "os": os}[fault[0]]
    inject(monkeypatch, target, fault[1], fault[2])
    with pytest.raises(InjectedFault):
        _MAKERS[cls](torch.randn(4, 32)).save(path)
    monkeypatch.undo()
    assert snapshot(path) == before
    assert leftovers(tmp_path) == []
    if existing:
        back = type(old).load(path)
        assert all(torch.equal(back.to_tensors()[k], v) for k, v in old.to_tensors().items())


def test_save_onto_a_folder_refuses_and_leaves_nothing(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        Sparse24Weight.from_dense(torch.randn(2, 8), prune=True).save(str(tmp_path / "d"))
    assert sorted(os.listdir(tmp_path)) == ["d"] and os.listdir(tmp_path / "d") == []


def test_load_errors_name_the_file(tmp_path):
    w24 = Sparse24Weight.from_dense(torch.randn(4, 32), prune=True)
    good = str(tmp_path / "good.safetensors")
    w24.save(good)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)  # header size far larger than the file
    with pytest.raises(ValueError, match="junk.safetensors.*not a readable safetensors"):
        Sparse24Weight.load(str(junk))
    half = tmp_path / "half.safetensors"
    half.write_bytes(open(good, "rb").read()[:40])
    with pytest.raises(ValueError, match="half.safetensors.*not a readable safetensors"):
        Sparse24Weight.load(str(half))
    with pytest.raises(IsADirectoryError, match="is a folder"):
        Sparse24Weight.load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope.safetensors.*does not exist"):
        Sparse24Weight.load(str(tmp_path / "nope.safetensors"))
    meta = w24.metadata()
    cases = {
        "missing": ({"values": w24.values}, meta, r"tensor\(s\) \['meta'\] missing"),
        "dtype": ({"values": w24.values, "meta": w24.meta.to(torch.int64)}, meta, "meta has dtype int64"),
        "shape": ({"values": w24.values[:2], "meta": w24.meta}, meta, "values has shape"),
        "badshape": (w24.to_tensors(), dict(meta, shape="[4"), "metadata 'shape'"),
        "noshape": (w24.to_tensors(), {k: v for k, v in meta.items() if k != "shape"}, "metadata 'shape'"),
        "format": (w24.to_tensors(), dict(meta, format="x"), "expected format"),
    }
    for name, (tensors, md, pattern) in cases.items():
        p = str(tmp_path / f"{name}.safetensors")
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, p, metadata=md)
        with pytest.raises((TypeError, ValueError), match=f"{name}.safetensors.*{pattern}"):
            Sparse24Weight.load(p)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("pos", [0, 1, 2, 3])
@pytest.mark.parametrize("maker", ["sparse24", "sparse24-prune", "bitmap", "mask"])
def test_non_finite_weights_rejected_wherever_they_are(bad, pos, maker):
    """The NaN contract: packing refuses NaN / inf, naming the first position, whatever the slot."""
    w = torch.zeros(3, 8)
    w[1, 4:8] = torch.tensor([1.0, 0.0, 2.0, 0.0])
    w[1, 4 + pos] = bad
    make = {"sparse24": lambda: Sparse24Weight.from_dense(w), "sparse24-prune":
            lambda: Sparse24Weight.from_dense(w, prune=True), "bitmap": lambda: BitmapWeight.from_dense(w),
            "mask": lambda: PackedMask.from_weight(w)}[maker]
    with pytest.raises(ValueError, match=rf"weight holds 1 non-finite.*index \(1, {4 + pos}\)"):
        make()
