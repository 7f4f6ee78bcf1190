"""The growable modules' own grow/shrink methods and an optimizer (issue 23, item 6).

As ``GrowLinear.grow_out``/``shrink_out`` do, the new modules' own methods (``grow``,
``shrink``, ``grow_heads``, ``grow_embed_dim``, ``resize``, ...) change the module only:
its tensors and their gradients, never an optimizer's state. A Wiring built with the
optimizer is what keeps the state in step. Checked: the state is bit for bit what it
was after each module method; and the reason the docstrings send training code to the
Wiring: after a shrink by the module's own method a torch optimizer moves the zeroed
weights again, after the same shrink through the Wiring everything outside the active
parts stays exactly zero (weights, gradients, state).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from growdense import GrowEmbedding, GrowLayerNorm, GrowLinear, GrowMultiheadAttention, GrowRMSNorm
from growdense.norms import ramp_step
from transformer_helpers import TinyGPT, assert_outside_zero, tokens

F64 = torch.float64


def _attention():
    return GrowMultiheadAttention(8, 2, add_bias_kv=True, batch_first=True, capacity_heads=4,
                                  capacity_embed_dim=12, dtype=F64)


# (build, forward on a random input, [module method calls])
CASES = {
    "layernorm": (lambda: GrowLayerNorm(6, capacity=10, dtype=F64), lambda m, x: m(x[..., : m.features]),
                  [("grow", 3), ("shrink", 4), ("grow", 2, "zero_out")]),
    "rmsnorm": (lambda: GrowRMSNorm(6, capacity=10, dtype=F64), lambda m, x: m(x[..., : m.features]),
                [("grow", 3), ("shrink", 4)]),
    "embedding": (lambda: GrowEmbedding(7, 6, capacity_embedding_dim=10, dtype=F64),
                  lambda m, x: m(torch.arange(7)), [("grow", 3), ("shrink", 4), ("grow", 1, "zero_out")]),
    "attention": (_attention, lambda m, x: m(x[..., : m.embed_dim], x[..., : m.embed_dim], x[..., : m.embed_dim])[0],
                  [("grow_heads", 2), ("shrink_heads", 1), ("grow_embed_dim", 4), ("shrink_embed_dim", 6),
                   ("resize", "heads", 3)]),
    "linear": (lambda: GrowLinear(6, 5, capacity_in=10, capacity_out=9, dtype=F64), lambda m, x: m(x[..., : m.in_features]),
               [("grow_out", 3), ("grow_in", 2), ("shrink_out", 4), ("shrink_in", 5)]),
}


def state_copy(opt):
    return {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_module_methods_change_the_module_only_never_the_optimizer_state(name):
    build, forward, calls = CASES[name]
    torch.manual_seed(0)
    module = build()
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    x = torch.randn(3, 4, 12, dtype=F64, generator=torch.Generator().manual_seed(1))
    for call in calls:
        opt.zero_grad()
        forward(module, x).pow(2).sum().backward()
        opt.step()
        before = state_copy(opt)
        method, *args = call
        getattr(module, method)(*args)
        after = state_copy(opt)
        assert after.keys() == before.keys()
        for key, state in before.items():
            for k, v in state.items():
                assert torch.equal(after[key][k], v), (call, k)


def _train(model, opt, toks, steps):
    for _ in range(steps):
        opt.zero_grad()
        logits = model(toks)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), toks.roll(-1, 1).reshape(-1)).backward()
        opt.step()
        ramp_step(model)


def test_shrink_through_the_wiring_keeps_the_outside_zero_where_module_methods_do_not():
    toks = tokens(seed=3)
    results = {}
    for how in ("wiring", "module"):
        torch.manual_seed(0)
        model = TinyGPT()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        _train(model, opt, toks, 3)
        if how == "wiring":
            model.wiring(opt).shrink("stream", 6)
        else:  # every member of the stream by its own method
            model.emb.shrink(6)
            model.norm.shrink(6)
            model.head.shrink_in(6)
            for b in model.blocks:
                b.ln1.shrink(6)
                b.ln2.shrink(6)
                b.attn.shrink_embed_dim(6)
                b.fc1.shrink_in(6)
                b.fc2.shrink_out(6)
        _train(model, opt, toks, 2)
        results[how] = model, opt
    assert_outside_zero(*results["wiring"])
    model, _ = results["module"]
    # Adam's moments of the removed features were left in place: its update moved the zeroed weights.
    assert model.norm.weight[6:8].abs().min() > 1e-4
    with pytest.raises(AssertionError, match="nonzero outside"):
        assert_outside_zero(*results["module"])
