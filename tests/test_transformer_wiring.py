"""A pre-norm transformer of growable modules grown through one Wiring (issue 23, items 3 and 6).

Every width: the residual stream (embedding, norms, attention model width, FFN input
columns and output rows, LM head columns), each FFN's inner width, each attention's heads.
The reference is a float64 recomputation from copies of the active parts with plain tensor
algebra (tests/transformer_helpers.py).

Tolerances: float64 model against the float64 reference: the same products summed in
another order, ~1e-15 relative on O(1) values; 1e-10 is far below a real error (a wrong
block moves values by O(0.1)). zero_out growth: 1e-12 in float64 and 1e-6 in float32 (the
issue's bounds; before and after differ only by summation order and by the ramp's written-out
norm against torch's fused one).
"""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

import growdense
import growdense.optim
from growdense import GrowLayerNorm, GrowRMSNorm, load_checkpoint, protocol, save_checkpoint
from growdense.norms import ramp_step
from grow_helpers import assert_same
from grow_module_helpers import CountingBackend
from transformer_helpers import (
    CAPS,
    TinyGPT,
    assert_active_blocks,
    assert_outside_zero,
    declared_parameters,
    reference_forward,
    tokens,
)

REF = {"atol": 1e-10, "rtol": 1e-10}
WIDTHS = ["stream", "ffn0", "ffn1", "heads0", "heads1"]


def grow_every_width(wiring, init: str, seed: int = 1, **options) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, n in (("stream", 4), ("ffn0", 4), ("ffn1", 6), ("heads0", 1), ("heads1", 2)):
        wiring.grow(name, n, init=init, generator=g, **options)


def loss_of(model, toks):
    logits = model(toks)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), toks.roll(-1, 1).reshape(-1))


def full_snapshot(model, optimizer=None) -> dict:
    snap = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        snap[name] = t.detach().clone()
        snap[name + ".grad"] = None if getattr(t, "grad", None) is None else t.grad.clone()
    for name, m in model.named_modules():
        if hasattr(m, "widths") and callable(m.widths):
            snap[name + ".widths"] = m.widths()
        if isinstance(m, growdense.GrowLinear):
            snap[name + ".widths"] = (m.in_features, m.out_features)
        if hasattr(m, "ramping"):
            snap[name + ".ramp"] = (m.ramping, m._ramp_left)
    if optimizer is not None:
        for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                snap[f"state{i}.{key}"] = value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
    snap["rng"] = torch.get_rng_state()
    return snap


# ---- declarations ------------------------------------------------------------------------
def test_the_protocol_resolves_dotted_paths_and_widths_with_two_roles():
    model = TinyGPT()
    attn = model.blocks[0].attn
    assert protocol.capacity(attn, "heads") == CAPS["heads"] and protocol.capacity(attn, "embed_dim") == CAPS["stream"]
    spec = attn.growth_spec()
    out = next(s for s in spec.tensors if s.name == "out_proj.weight")
    assert protocol.tensor_of(attn, out) is attn.out_proj.weight
    wiring = model.wiring()
    roles = {type(m).__name__ + "." + w: r for m, w, r in wiring.members("heads0")}
    assert roles == {"GrowMultiheadAttention.heads": "producer+consumer"}
    stream = wiring.members("stream")
    assert len(stream) == 1 + 2 * 5 + 2 and wiring.capacity("stream") == CAPS["stream"]
    # Producers first (fc2 rows; the attention writes and reads), then consumers, then riders.
    assert [r for _, _, r in stream][:3] == ["producer+consumer", "producer", "producer+consumer"]


def test_active_block_of_every_new_parameter_and_its_bounding_block_for_stacked_heads():
    model = TinyGPT()
    attn = model.blocks[0].attn
    d, cap = attn.head_dim, CAPS["heads"] * attn.head_dim
    # q/k/v rows: blocks of `cap` rows, the first 2 heads of each active; columns: the stream.
    assert protocol.active_block(attn.in_proj_weight) == (slice(0, 2 * cap + 2 * d), slice(0, 8))
    assert protocol.active_block(attn.out_proj.weight) == (slice(0, 8), slice(0, 2 * d))
    assert protocol.active_block(attn.out_proj.bias) == (slice(0, 8),)
    assert protocol.active_block(model.emb.weight) == (slice(0, 11), slice(0, 8))
    assert protocol.active_block(model.norm.weight) == (slice(0, 8),)
    assert protocol.holders(attn.out_proj.weight) == [attn]
    assert_active_blocks(model)
    clone = copy.deepcopy(model)  # a copy's Parameters find their own modules
    assert protocol.holders(clone.blocks[0].attn.out_proj.weight) == [clone.blocks[0].attn]
    assert protocol.active_block(clone.blocks[0].attn.in_proj_weight) == (slice(0, 2 * cap + 2 * d), slice(0, 8))


def test_a_module_with_several_widths_must_name_the_one_on_the_stream():
    model = TinyGPT()
    wiring = growdense.Wiring()
    with pytest.raises(TypeError, match=r"has widths \['heads', 'embed_dim'\]"):
        wiring.add_width("s", [model.emb, model.blocks[0].attn])
    with pytest.raises(ValueError, match="two of its widths"):
        wiring.add_width("s", [(model.blocks[0].attn, "heads"), (model.blocks[0].attn, "embed_dim")])
    with pytest.raises(ValueError, match="consume its own output"):
        wiring.add_width("s", [(model.head, "in"), (model.blocks[0].fc1, "out"), (model.blocks[0].fc1, "in")])
    assert wiring.names() == []


# ---- function-preserving growth ----------------------------------------------------------
@pytest.mark.parametrize("norm", [GrowLayerNorm, GrowRMSNorm])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_zero_out_growth_of_every_width_leaves_the_output_unchanged(norm, dtype, tol):
    torch.manual_seed(0)
    model = TinyGPT(norm=norm, dtype=dtype)
    toks = tokens()
    wiring = model.wiring()
    before = model(toks).detach()
    grow_every_width(wiring, "zero_out", ramp_steps=4)
    assert wiring.widths() == {"stream": 12, "ffn0": 16, "heads0": 3, "ffn1": 18, "heads1": 4}
    after = model(toks).detach()
    torch.testing.assert_close(after, before, atol=tol, rtol=tol)
    assert all(m.ramping for m in model.modules() if isinstance(m, norm))
    torch.testing.assert_close(model(toks).double(), reference_forward(model, toks),
                               **(REF if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}))
    # The ramp moves the function continuously; after ramp_steps steps the norms are plain again.
    for _ in range(4):
        ramp_step(model)
        torch.testing.assert_close(model(toks).double(), reference_forward(model, toks),
                                   **(REF if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}))
    assert not any(m.ramping for m in model.modules() if isinstance(m, norm))
    assert_outside_zero(model)


def test_zero_out_on_the_stream_without_a_norm_ramp_would_change_the_output():
    """The ramp is what keeps the norms exact: the plain norm over the grown width differs."""
    torch.manual_seed(0)
    model = TinyGPT()
    toks = tokens()
    before = model(toks).detach()
    model.wiring().grow("stream", 4, init="zero_out", generator=torch.Generator().manual_seed(1))
    for m in model.modules():
        if isinstance(m, GrowLayerNorm):
            m._end_ramp()
    assert (model(toks) - before).abs().max() > 1e-3


def test_the_embedding_rider_gets_its_own_distribution_under_he_and_zero_under_zero_out():
    torch.manual_seed(0)
    model = TinyGPT()
    model.emb.padding_idx = 0
    with torch.no_grad():
        model.emb.weight[0].zero_()
    wiring = model.wiring()
    wiring.grow("stream", 4, init="zero_out", generator=torch.Generator().manual_seed(1))
    assert torch.all(model.emb.weight[:, 8:] == 0)
    wiring.grow("stream", 4, init="he", generator=torch.Generator().manual_seed(2))
    new = model.emb.weight[1:, 12:16]
    # 40 draws of N(0, 1): the sample std within [0.6, 1.5] (a He std sqrt(2/11) ~ 0.43 fails).
    assert 0.6 < float(new.std()) < 1.5 and torch.all(model.emb.weight[0] == 0)


# ---- the outside-part invariant, storage, optimizers -----------------------------------------
OPTIMIZERS = {
    "adam": (torch.optim.Adam, {"lr": 1e-2}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    "sgd-momentum": (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}),
    "growdense-adam": (growdense.optim.Adam, {"lr": 1e-2}),
    "growdense-adamw": (growdense.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
}


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_outside_stays_zero_and_storage_is_kept_across_steps_growth_and_shrinking(opt):
    torch.manual_seed(0)
    model = TinyGPT()
    cls, kwargs = OPTIMIZERS[opt]
    optimizer = cls(model.parameters(), **kwargs)
    wiring = model.wiring(optimizer, optimizer_state="keep_global_step" if opt in ("adam", "adamw") else None)
    storage = {id(p): (p, p.data_ptr()) for p in model.parameters()}
    toks = tokens(seed=3)
    g = torch.Generator().manual_seed(5)

    def step():
        optimizer.zero_grad()
        loss_of(model, toks).backward()
        optimizer.step()
        ramp_step(model)
        assert_outside_zero(model, optimizer)

    step()
    grow_every_width(wiring, "zero_out", ramp_steps=2)
    assert_outside_zero(model, optimizer)
    step()
    step()
    wiring.grow("stream", 2, init="he", generator=g)
    wiring.grow("heads0", 1, init="split", generator=g)
    wiring.grow("ffn1", 3, init="split", generator=g)
    assert_outside_zero(model, optimizer)
    step()
    wiring.shrink("stream", 6, keep="norm")
    wiring.shrink("heads1", 2, keep=[3, 0])
    wiring.shrink("ffn0", 5)
    assert_outside_zero(model, optimizer)
    step()
    wiring.permute("heads0", [2, 0, 3, 1])
    wiring.grow("stream", 5, init="zero_out", generator=g)
    step()
    torch.testing.assert_close(model(toks), reference_forward(model, toks), **REF)
    assert_active_blocks(model)
    assert {id(p): (p, p.data_ptr()) for p in model.parameters()} == storage


def test_growdense_adam_steps_the_active_blocks_and_matches_torch_adam():
    """growdense.optim.Adam (active blocks, keep_global_step) equals torch.optim.Adam on the same model."""
    torch.manual_seed(0)
    a = TinyGPT()
    b = copy.deepcopy(a)
    oa, ob = growdense.optim.Adam(a.parameters(), lr=1e-2), torch.optim.Adam(b.parameters(), lr=1e-2)
    wa, wb = a.wiring(oa, optimizer_state="keep_global_step"), b.wiring(ob, optimizer_state="keep_global_step")
    toks = tokens(seed=4)
    for i in range(6):
        for model, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            loss_of(model, toks).backward()
            opt.step()
        if i == 1:
            grow_every_width(wa, "he", seed=7)
            grow_every_width(wb, "he", seed=7)
        if i == 3:
            for w in (wa, wb):
                w.shrink("stream", 10, keep="norm")
                w.shrink("heads0", 2)
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-12, msg=n)
    assert_outside_zero(a, oa)


def test_adam_state_of_new_units_is_fresh_and_old_units_keep_theirs():
    torch.manual_seed(0)
    model = TinyGPT()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    wiring = model.wiring(optimizer, optimizer_state="keep_global_step")
    optimizer.zero_grad()
    loss_of(model, tokens()).backward()
    optimizer.step()
    attn = model.blocks[0].attn
    old = optimizer.state[attn.out_proj.weight]["exp_avg"].clone()
    wiring.grow("heads0", 1, init="he", generator=torch.Generator().manual_seed(0))
    state = optimizer.state[attn.out_proj.weight]["exp_avg"]
    assert torch.equal(state, old)  # the new columns were zero (outside) and stay fresh
    wiring.shrink("heads0", 2, keep=[2, 0])
    d = attn.head_dim
    assert torch.equal(state[:8, d : 2 * d], old[:8, :d]) and not state[:, 2 * d :].any()


# ---- state_dict and checkpoints ---------------------------------------------------------------
def test_state_dict_and_checkpoint_round_trips_at_grown_widths(tmp_path):
    torch.manual_seed(0)
    model = TinyGPT()
    optimizer = growdense.optim.AdamW(model.parameters(), lr=1e-2)
    wiring = model.wiring(optimizer)
    toks = tokens()
    optimizer.zero_grad()
    loss_of(model, toks).backward()
    optimizer.step()
    grow_every_width(wiring, "zero_out", ramp_steps=3)
    ramp_step(model)  # mid-ramp: the ramp is part of the state
    expected = model(toks).detach()
    # A model built at the initial widths loads the grown state_dict ...
    fresh = TinyGPT()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(toks), expected, atol=0, rtol=0)
    assert fresh.wiring().widths() == wiring.widths()
    # ... and the grown checkpoint, optimizer included.
    path = os.path.join(tmp_path, "ckpt.pt")
    save_checkpoint(path, model, optimizer, wiring=wiring)
    other = TinyGPT()
    other_opt = growdense.optim.AdamW(other.parameters(), lr=1e-2)
    other_wiring = other.wiring(other_opt)
    load_checkpoint(path, other, other_opt, wiring=other_wiring)
    torch.testing.assert_close(other(toks), expected, atol=0, rtol=0)
    assert other_wiring.widths() == wiring.widths()
    assert_outside_zero(other, other_opt)
    assert_active_blocks(other)
    for model_, opt in ((model, optimizer), (other, other_opt)):  # the same next step
        opt.zero_grad()
        loss_of(model_, toks).backward()
        opt.step()
        ramp_step(model_)
    for p, q in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


# ---- compile, autocast --------------------------------------------------------------------------
def test_compiled_once_across_eight_widths():
    torch.manual_seed(0)
    model = TinyGPT(blocks=1, dtype=torch.float32)
    wiring = model.wiring()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, dynamic=None)
    toks = tokens()
    g = torch.Generator().manual_seed(0)
    steps = [("stream", 1), ("ffn0", 2), ("heads0", 1), ("stream", 2), ("ffn0", 3), ("stream", 1), ("heads0", 1)]
    for i in range(len(steps) + 1):  # 8 widths
        torch.testing.assert_close(compiled(toks), model(toks), atol=1e-5, rtol=1e-5)
        if i < len(steps):
            wiring.grow(*steps[i], init="he", generator=g)
    assert backend.graphs <= 2, backend.graphs


def test_inductor_across_growth():
    pytest.importorskip("torch._inductor")
    torch.manual_seed(0)
    model = TinyGPT(blocks=1, dtype=torch.float32)
    wiring = model.wiring()
    compiled = torch.compile(model, backend="inductor")
    toks = tokens()
    try:
        first = compiled(toks)
    except Exception as error:  # no C++ toolchain for inductor here
        pytest.skip(f"inductor cannot compile on this machine: {type(error).__name__}")
    torch.testing.assert_close(first, model(toks), atol=1e-5, rtol=1e-5)
    g = torch.Generator().manual_seed(0)
    for name, n in (("stream", 2), ("heads0", 1), ("ffn0", 4)):
        wiring.grow(name, n, init="he", generator=g)
        # float32: inductor's fused kernels sum in another order (~1e-6 relative on O(1) logits).
        torch.testing.assert_close(compiled(toks), model(toks), atol=1e-4, rtol=1e-4)


def test_autocast_bfloat16_after_growth():
    torch.manual_seed(0)
    model = TinyGPT(dtype=torch.float32)
    grow_every_width(model.wiring(), "he")
    toks = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(toks)
    assert torch.isfinite(y).all()
    # bf16 keeps 8 bits of mantissa through two blocks of O(1) values: a few 1e-2.
    torch.testing.assert_close(y.float(), model(toks), atol=0.15, rtol=0.1)
    loss_of(model, toks).backward()
    assert_outside_zero(model)


# ---- failed calls -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call,error",
    [
        (lambda w: w.grow("stream", 9), "exceeds the capacity"),
        (lambda w: w.grow("heads0", 3), "exceeds the capacity"),
        (lambda w: w.grow("stream", 2, init="bogus"), "unknown init"),
        (lambda w: w.grow("stream", 2, init="zero_out", ramp_steps=0), "ramp_steps must be >= 1"),
        (lambda w: w.grow("stream", 2, init="he", ramp_steps=3), "unexpected option"),
        (lambda w: w.shrink("heads0", 1, keep=[5]), "out of range"),
        (lambda w: w.shrink("stream", 0), "between 1 and"),
        (lambda w: w.permute("ffn0", [0, 0]), "keep indices|duplicates|exactly"),
    ],
)
def test_a_failed_call_changes_nothing(call, error):
    torch.manual_seed(0)
    model = TinyGPT()
    optimizer = growdense.optim.Adam(model.parameters(), lr=1e-2)
    wiring = model.wiring(optimizer)
    optimizer.zero_grad()
    loss_of(model, tokens()).backward()
    optimizer.step()
    wiring.grow("stream", 2, init="zero_out", generator=torch.Generator().manual_seed(0))
    before = full_snapshot(model, optimizer)
    with pytest.raises((ValueError, TypeError), match=error):
        call(wiring)
    assert_same(full_snapshot(model, optimizer), before)
