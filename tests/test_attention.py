"""GrowMultiheadAttention against nn.MultiheadAttention of the active size (float64).

Where the inner width (heads * head_dim) equals embed_dim there is a torch twin: it loads
our active tensors and both compute the same products (ours on views of the capacity
tensors). Tolerance 1e-12 (float64, sums of a few dozen O(1) terms: a different
summation order costs ~1e-15). After growing heads alone there is no twin (the
projections are rectangular): a per-head float64 reference written with explicit loops
stands in.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from growdense import GrowMultiheadAttention
from grow_module_helpers import (
    CountingBackend,
    active_part,
    assert_outside_zero,
    assert_same_storage,
    storage,
    twin_state,
)

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)


def inputs(m, B=2, L=3, S=4, batched=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def t(n, w):
        shape = ((B, n, w) if m.batch_first else (n, B, w)) if batched else (n, w)
        return torch.randn(shape, generator=gen, dtype=F64)

    return t(L, m.embed_dim), t(S, m.kdim), t(S, m.vdim)


def twin_of(m: GrowMultiheadAttention, **kw) -> nn.MultiheadAttention:
    assert m.num_heads * m.head_dim == m.embed_dim
    twin = nn.MultiheadAttention(m.embed_dim, m.num_heads, dtype=F64, **kw)
    twin.load_state_dict(twin_state(m))
    return twin


def compare(m, twin, q, k, v, **fwd):
    """Outputs, attention weights, input and parameter gradients of ``m`` against ``twin``."""
    ins = [x.clone().requires_grad_() for x in (q, k, v)]
    ins_ref = [x.clone().requires_grad_() for x in (q, k, v)]
    out, w = m(*ins, **fwd)
    out_ref, w_ref = twin(*ins_ref, **fwd)
    torch.testing.assert_close(out, out_ref, **TOL)
    if w_ref is None:
        assert w is None
    else:
        torch.testing.assert_close(w, w_ref, **TOL)
    g = torch.randn_like(out_ref)
    (out * g).sum().backward()
    (out_ref * g).sum().backward()
    for a, b in zip(ins, ins_ref):
        torch.testing.assert_close(a.grad, b.grad, **TOL)
    for name, p in twin.named_parameters():
        torch.testing.assert_close(active_part(m, name, m._tensor(name).grad), p.grad, **TOL)
    assert_outside_zero(m)


CONFIGS = [
    dict(),
    dict(batch_first=True),
    dict(bias=False),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True, batch_first=True),
    dict(kdim=5, vdim=7),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=str)
def test_same_initialisation_and_output_as_the_twin_then_after_growing_heads_and_width(kw):
    caps = dict(capacity_heads=4, capacity_embed_dim=16)
    if "kdim" in kw:
        caps.update(capacity_kdim=9, capacity_vdim=9)
    torch.manual_seed(0)
    twin = nn.MultiheadAttention(8, 2, dtype=F64, **kw)
    torch.manual_seed(0)
    m = GrowMultiheadAttention(8, 2, dtype=F64, **kw, **caps)  # the same draws as the twin
    for name, p in twin.named_parameters():
        torch.testing.assert_close(active_part(m, name, m._tensor(name)), p, rtol=0, atol=0)
    L, S = 3, 4
    kpm = torch.tensor([[False, True, False, False], [False, False, False, True]])
    mask = torch.randn(L, S, dtype=F64)
    for fwd in (dict(), dict(need_weights=False), dict(key_padding_mask=kpm, attn_mask=mask),
                dict(attn_mask=mask, need_weights=True, average_attn_weights=False)):
        m.zero_grad()
        twin.zero_grad()
        compare(m, twin, *inputs(m), **fwd)
    before = storage(m)
    for step in range(2):  # 2 heads / 8 wide -> 3 / 12 -> 4 / 16 (the capacities)
        m.zero_grad()
        m.grow_heads(1, generator=torch.Generator().manual_seed(step))
        m.grow_embed_dim(4, generator=torch.Generator().manual_seed(10 + step))
        assert_same_storage(m, before)
        fresh_kw = {k: v for k, v in kw.items() if k not in ("kdim", "vdim")}
        if "kdim" in kw:
            fresh_kw.update(kdim=m.kdim, vdim=m.vdim)
        compare(m, twin_of(m, **fresh_kw), *inputs(m, seed=step), key_padding_mask=kpm, attn_mask=mask)
    assert (m.num_heads, m.embed_dim) == (4, 16)


def test_drop_in_over_torch_module_db_samples():
    pytest.importorskip("expecttest")
    from torch.testing._internal.common_modules import module_db

    info = next(i for i in module_db if i.module_cls is nn.MultiheadAttention)
    samples = info.module_inputs_func(info, device="cpu", dtype=F64, requires_grad=True, training=True)
    assert len(samples) >= 32
    for sample in samples:
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        torch.manual_seed(0)
        twin = nn.MultiheadAttention(*args, **kwargs, dtype=F64)
        m = GrowMultiheadAttention(*args, **kwargs, dtype=F64, capacity_heads=kwargs["num_heads"] + 2,
                                   capacity_embed_dim=kwargs["embed_dim"] + 5)
        m.load_state_dict(twin.state_dict())
        q, k, v = (x.detach() for x in sample.forward_input.args)
        fwd = {key: val for key, val in sample.forward_input.kwargs.items()}
        for need_weights in (True, False):
            m.zero_grad()
            twin.zero_grad()
            compare(m, twin, q, k, v, need_weights=need_weights, **fwd)


def test_is_causal_follows_the_twin():
    torch.manual_seed(1)
    twin = nn.MultiheadAttention(8, 2, batch_first=True, dtype=F64)
    m = GrowMultiheadAttention(8, 2, batch_first=True, dtype=F64, capacity_heads=3, capacity_embed_dim=12)
    m.load_state_dict(twin.state_dict())
    q, k, v = inputs(m, L=5, S=5)
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=F64)
    for need_weights in (True, False):
        compare(m, twin, q, q, q, attn_mask=causal, is_causal=True, need_weights=need_weights)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        m(q, q, q, is_causal=True)


def reference(m: GrowMultiheadAttention, q, k, v):
    """Batch-first self-contained float64 attention over the active heads, one head at a time."""
    H, d, E = m.num_heads, m.head_dim, m.embed_dim
    inner = H * d
    W = active_part(m, "in_proj_weight", m.in_proj_weight)
    b = active_part(m, "in_proj_bias", m.in_proj_bias)
    Wq, Wk, Wv = W[:inner], W[inner : 2 * inner], W[2 * inner :]
    bq, bk, bv = b[:inner], b[inner : 2 * inner], b[2 * inner :]
    Wo = m.out_proj.weight[:E, :inner]
    bo = m.out_proj.bias[:E]
    heads = []
    for h in range(H):
        rows = slice(h * d, (h + 1) * d)
        Q = q @ Wq[rows].T + bq[rows]
        K = k @ Wk[rows].T + bk[rows]
        V = v @ Wv[rows].T + bv[rows]
        A = torch.softmax(Q @ K.transpose(-1, -2) / math.sqrt(d), dim=-1)
        heads.append(A @ V)
    return torch.cat(heads, dim=-1) @ Wo.T + bo


def test_heads_alone_grow_against_a_per_head_reference_and_zero_out_keeps_the_output():
    m = GrowMultiheadAttention(8, 2, batch_first=True, dtype=F64, capacity_heads=6)
    q, k, v = inputs(m)
    y0, _ = m(q, k, v)
    torch.testing.assert_close(y0, reference(m, q, k, v), **TOL)
    m.grow_heads(3, "zero_out", generator=torch.Generator().manual_seed(0))
    assert m.num_heads == 5 and m.embed_dim == 8  # inner width 20 != 8: no torch twin
    for need_weights in (True, False):
        y1, _ = m(q, k, v, need_weights=need_weights)
        torch.testing.assert_close(y1, y0, rtol=0, atol=1e-12)  # zero_out: function kept
    assert m.in_proj_weight.view(3, 6, 4, 8)[:, 2:5].abs().min() > 0  # new heads' q/k/v rows are drawn
    m.grow_heads(1, "he", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(m(q, k, v)[0], reference(m, q, k, v), **TOL)
    m.zero_grad()
    m(q, k, v)[0].sum().backward()
    assert_outside_zero(m)
    m.shrink_heads(2)
    assert_outside_zero(m)
    torch.testing.assert_close(m(q, k, v)[0], reference(m, q, k, v), **TOL)


def test_zero_out_embed_dim_growth_keeps_the_old_outputs_whatever_the_new_features_hold():
    m = GrowMultiheadAttention(8, 2, dtype=F64, capacity_embed_dim=12)
    q, k, v = inputs(m)
    y0, w0 = m(q, k, v)
    m.grow_embed_dim(4, "zero_out", generator=torch.Generator().manual_seed(0))
    y1, w1 = m(*(torch.cat([x, 5 * torch.randn(*x.shape[:-1], 4, dtype=F64)], dim=-1) for x in (q, k, v)))
    torch.testing.assert_close(y1[..., :8], y0, rtol=0, atol=1e-12)
    torch.testing.assert_close(w1, w0, rtol=0, atol=1e-12)
    assert y1[..., 8:].abs().max() > 0  # new rows of out_proj are drawn: the new features are written


def test_state_dict_round_trip_at_grown_widths_and_errors():
    m = GrowMultiheadAttention(8, 2, dtype=F64, capacity_heads=4, capacity_embed_dim=16, add_bias_kv=True)
    m.grow_heads(1)
    m.grow_embed_dim(4)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = GrowMultiheadAttention(8, 2, dtype=F64, capacity_heads=4, capacity_embed_dim=16, add_bias_kv=True)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert (fresh.num_heads, fresh.embed_dim) == (3, 12)
    q, k, v = inputs(m)
    torch.testing.assert_close(fresh(q, k, v)[0], m(q, k, v)[0], rtol=0, atol=0)
    torch.testing.assert_close(copy.deepcopy(m)(q, k, v)[0], m(q, k, v)[0], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"size mismatch for in_proj_weight: the checkpoint has \(24, 8\)"):
        m.load_state_dict(nn.MultiheadAttention(8, 2, add_bias_kv=True, dtype=F64).state_dict())
    with pytest.raises(RuntimeError, match="Unexpected key"):
        m.load_state_dict({**m.state_dict(), "out_proj.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="capacity_heads of at least 5"):
        m.grow_heads(2)
    with pytest.raises(ValueError, match="unknown init"):
        m.grow_heads(1, init="xavier")
    assert (m.num_heads, m.embed_dim) == (3, 12)
    with pytest.raises(ValueError, match="expected query of width 12"):
        m(torch.randn(3, 2, 8, dtype=F64), k, v)
    assert "capacity_heads=4" in repr(m)


def test_the_fused_encoder_layer_path_stays_away():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0)
    layer.self_attn = GrowMultiheadAttention(8, 2, batch_first=True, capacity_heads=4, capacity_embed_dim=16)
    layer.eval()
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        y = layer(x)  # torch's fused path would read the capacity tensors whole and fail
    assert y.shape == (2, 3, 8)


def test_compile_across_eight_head_counts_uses_at_most_two_graphs():
    # From 2 heads: torch.compile specialises a size of 1, so a single head gets a graph of its own.
    torch._dynamo.reset()
    m = GrowMultiheadAttention(8, 2, batch_first=True, capacity_heads=9)
    eager = copy.deepcopy(m)
    backend = CountingBackend()
    compiled = torch.compile(m, backend=backend)
    x = torch.randn(2, 5, 8)
    for k in range(8):
        if k:
            m.grow_heads(1, generator=torch.Generator().manual_seed(k))
            eager.grow_heads(1, generator=torch.Generator().manual_seed(k))
        y, _ = compiled(x, x, x, need_weights=False)
        y_ref, _ = eager(x, x, x, need_weights=False)
        # float32, the same ops traced or eager: agree to rounding.
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        y.sum().backward()
        assert_outside_zero(m)
    assert m.num_heads == 9
    assert 1 <= backend.graphs <= 2, f"{backend.graphs} graphs for 8 head counts"


def test_autocast_cpu_bfloat16():
    torch.manual_seed(0)
    m = GrowMultiheadAttention(16, 2, batch_first=True, capacity_heads=4, capacity_embed_dim=24)
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = m(x, x, x, need_weights=False)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    ref, _ = m(x, x, x, need_weights=False)
    # bf16 keeps 8 bits of mantissa; three chained products of 16-term sums: ~3e-2 of O(1) outputs.
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)


def test_growth_spec_declares_heads_and_width_with_their_roles():
    pytest.importorskip("growdense.protocol")
    from growdense import protocol

    m = GrowMultiheadAttention(8, 2, capacity_heads=4, capacity_embed_dim=12)
    spec = m.growth_spec()
    # One module-local width per width of the module, carrying both roles on different tensors.
    assert spec.widths == ("heads", "embed_dim")
    assert spec.roles("heads") == spec.roles("embed_dim") == (protocol.PRODUCER, protocol.CONSUMER)
    assert spec.tensors[-2].name == "out_proj.weight" and spec.tensors[-2].axis("heads").role == protocol.CONSUMER
    assert spec.tensors[0].axis("heads").role == protocol.PRODUCER
    assert m.active_width("heads") == 2 and m.active_width("embed_dim") == 8
    assert protocol.capacity(m, "heads") == 4 and protocol.capacity(m, "embed_dim") == 12
