"""GrowEmbedding against nn.Embedding of the active embedding dimension (float64).

A lookup copies rows and its gradient adds rows of the output gradient: both sides do the
same additions in the same order, so the comparisons are exact (tolerance 0) except where
stated.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from growdense import GrowEmbedding
from grow_module_helpers import CountingBackend, assert_outside_zero, assert_same_storage, storage, twin_state

F64 = torch.float64
EXACT = dict(rtol=0, atol=0)


def twin_of(m: GrowEmbedding, **kw) -> nn.Embedding:
    twin = nn.Embedding(m.num_embeddings, m.embedding_dim, dtype=F64, **kw)
    twin.load_state_dict(twin_state(m))
    return twin


def compare(m, twin, idx):
    y, y_ref = m(idx), twin(idx)
    torch.testing.assert_close(y, y_ref, **EXACT)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    grad = m.weight.grad.to_dense() if m.weight.grad.is_sparse else m.weight.grad
    ref = twin.weight.grad.to_dense() if twin.weight.grad.is_sparse else twin.weight.grad
    torch.testing.assert_close(grad[:, : m.embedding_dim], ref, **EXACT)
    assert_outside_zero(m)


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(padding_idx=2), dict(padding_idx=-1, scale_grad_by_freq=True), dict(sparse=True),
     dict(max_norm=1.5, norm_type=1.0)],
    ids=str,
)
def test_matches_twin_before_and_after_growth(kw):
    torch.manual_seed(0)
    m = GrowEmbedding(11, 4, capacity_embedding_dim=10, dtype=F64, **kw)
    twin = nn.Embedding(11, 4, dtype=F64, **kw)
    m.load_state_dict(twin.state_dict())
    idx = torch.tensor([[0, 2, 3, 3], [10, 1, 2, 7]])
    compare(m, twin, idx)
    torch.testing.assert_close(m.weight[:, :4], twin.weight, **EXACT)  # max_norm renormalised both alike
    before = storage(m)
    for n in (3, 3):  # 4 -> 7 -> 10 (the capacity)
        m.zero_grad()
        m.grow(n, generator=torch.Generator().manual_seed(n))
        assert_same_storage(m, before)
        if m.padding_idx is not None:
            assert m.weight[m.padding_idx].abs().max() == 0
        compare(m, twin_of(m, **kw), idx)
    m.zero_grad()
    m.shrink(5)
    assert_outside_zero(m)
    compare(m, twin_of(m, **kw), idx)


def test_same_initialisation_as_the_twin_under_the_same_seed():
    torch.manual_seed(3)
    t = nn.Embedding(7, 5, padding_idx=1)
    torch.manual_seed(3)
    m = GrowEmbedding(7, 5, padding_idx=1, capacity_embedding_dim=9)
    torch.testing.assert_close(m.weight[:, :5], t.weight, **EXACT)
    assert m.weight[:, 5:].abs().max() == 0


def test_zero_growth_keeps_every_embedding_and_adds_zero_dimensions():
    m = GrowEmbedding(6, 3, capacity_embedding_dim=8)
    idx = torch.arange(6)
    before = m(idx).detach()
    m.grow(4, "zero_out")
    y = m(idx)
    torch.testing.assert_close(y[:, :3], before, **EXACT)
    assert y[:, 3:].abs().max() == 0
    m.grow(1, "he", generator=torch.Generator().manual_seed(0))
    assert m(idx)[:, 7].abs().min() > 0  # drawn N(0, 1): nonzero almost surely


def test_from_pretrained_and_weight_and_freeze():
    table = torch.randn(5, 3, dtype=F64)
    m = GrowEmbedding.from_pretrained(table, capacity_embedding_dim=6)
    t = nn.Embedding.from_pretrained(table)
    assert not m.weight.requires_grad and not t.weight.requires_grad
    idx = torch.tensor([4, 0, 2])
    torch.testing.assert_close(m(idx), t(idx), **EXACT)
    m2 = GrowEmbedding(5, 3, _weight=table, _freeze=False)
    assert m2.weight.requires_grad
    torch.testing.assert_close(m2(idx), t(idx), **EXACT)
    with pytest.raises(ValueError, match="_weight has shape"):
        GrowEmbedding(5, 4, _weight=table)


def test_bad_arguments_and_checkpoints_are_refused_with_clear_errors():
    with pytest.raises(ValueError, match="padding_idx=5 must be within num_embeddings=5"):
        GrowEmbedding(5, 3, padding_idx=5)
    m = GrowEmbedding(5, 3, capacity_embedding_dim=4)
    with pytest.raises(ValueError, match="capacity_embedding_dim of at least 6"):
        m.grow(3)
    assert m.embedding_dim == 3
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: the checkpoint has \(5, 4\)"):
        m.load_state_dict(nn.Embedding(5, 4).state_dict())


def test_state_dict_round_trip_at_grown_width_and_repr():
    m = GrowEmbedding(9, 2, capacity_embedding_dim=6, padding_idx=0, dtype=F64)
    m.grow(3)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = GrowEmbedding(9, 2, capacity_embedding_dim=6, padding_idx=0, dtype=F64)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.embedding_dim == 5
    idx = torch.arange(9)
    torch.testing.assert_close(fresh(idx), m(idx), **EXACT)
    torch.testing.assert_close(copy.deepcopy(m)(idx), m(idx), **EXACT)
    assert repr(m) == "GrowEmbedding(9, 5, capacity_embedding_dim=6, padding_idx=0)"


def test_drop_in_over_torch_module_db_samples():
    pytest.importorskip("expecttest")
    from torch.testing._internal.common_modules import module_db

    info = next(i for i in module_db if i.module_cls is nn.Embedding)
    samples = info.module_inputs_func(info, device="cpu", dtype=F64, requires_grad=True, training=True)
    assert samples
    for sample in samples:
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        torch.manual_seed(0)
        twin = nn.Embedding(*args, **kwargs, dtype=F64)
        dim = kwargs.get("embedding_dim", args[1] if len(args) > 1 else None)
        m = GrowEmbedding(*args, **kwargs, dtype=F64, capacity_embedding_dim=dim + 5)
        m.load_state_dict(twin.state_dict())
        (idx,) = sample.forward_input.args
        compare(m, twin, idx)


def test_compile_across_eight_widths_uses_at_most_two_graphs():
    torch._dynamo.reset()
    m = GrowEmbedding(20, 4, capacity_embedding_dim=32)
    eager = copy.deepcopy(m)
    backend = CountingBackend()
    compiled = torch.compile(m, backend=backend)
    idx = torch.tensor([[1, 5, 19], [0, 0, 3]])
    for k in range(8):
        if k:
            m.grow(4, generator=torch.Generator().manual_seed(k))
            eager.grow(4, generator=torch.Generator().manual_seed(k))
        y = compiled(idx)
        torch.testing.assert_close(y, eager(idx), **EXACT)
        (y * y).sum().backward()
        assert_outside_zero(m)
    assert m.embedding_dim == 32
    assert 1 <= backend.graphs <= 2, f"{backend.graphs} graphs for 8 widths"


def test_autocast_cpu_bfloat16_leaves_the_lookup_alone():
    m = GrowEmbedding(8, 4, capacity_embedding_dim=6)
    idx = torch.tensor([1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(idx)
    torch.testing.assert_close(y, m(idx), **EXACT)  # embedding is not an autocast op: float32 rows


def test_growth_spec_declares_the_columns_as_riding():
    pytest.importorskip("growdense.protocol")
    from growdense import protocol

    m = GrowEmbedding(8, 4, capacity_embedding_dim=6)
    spec = m.growth_spec()
    assert spec.role("embedding_dim") == protocol.RIDER
    assert protocol.capacity(m, "embedding_dim") == 6
