"""Compile once, grow many times: a torch.compile'd GrowLinear model across the study's widths.

The active widths are DynamicInts, which torch.compile traces as symbolic sizes, and the
compiled forward is written in aten ops on views of the active block: one graph serves
every width below the capacity, a second one the width equal to it (its strides
differ). Inductor, on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from growdense import GrowLinear, Wiring

pytest.importorskip("torch._inductor")

# The study's schedule: h1 32..256 step 32, h2 16..128 step 16 (8 widths each).
WIDTHS = [(32 * k, 16 * k) for k in range(1, 9)]


def encoder() -> nn.Sequential:
    return nn.Sequential(
        GrowLinear(784, 32, capacity_out=256, activation="relu"),
        GrowLinear(32, 16, capacity_in=256, capacity_out=128, activation="relu"),
        GrowLinear(16, 20, capacity_in=128),
    )


class CountingInductor:
    """A torch.compile backend that counts the graphs it is given and compiles them with inductor."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        return compile_fx(gm, example_inputs)


def test_compiled_model_grows_through_the_study_widths_with_at_most_two_graphs():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = encoder()
    compiled_model = copy.deepcopy(eager)
    wirings = [Wiring.chain(list(m)) for m in (eager, compiled_model)]
    backend = CountingInductor()
    compiled = torch.compile(compiled_model, backend=backend)
    x = torch.randn(16, 784)
    for k, (h1, h2) in enumerate(WIDTHS):
        if k:
            for wiring, seed in zip(wirings, (k, k)):
                wiring.grow("h1", 32, generator=torch.Generator().manual_seed(seed))
                wiring.grow("h2", 16, generator=torch.Generator().manual_seed(seed + 100))
        assert wirings[1].widths() == {"h1": h1, "h2": h2}
        for m in (eager, compiled_model):
            m.zero_grad()
        y_ref = eager(x)
        y = compiled(x)
        # float32 GEMMs of inductor vs ATen's addmm: same products, possibly summed in
        # another order; 784-term sums of O(1) values agree to ~1e-6 relative.
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())
        g = torch.randn_like(y_ref)
        y_ref.backward(g)
        y.backward(g)
        for a, b in zip(compiled_model.parameters(), eager.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5 * b.grad.abs().max().item())
        # zero outside the active block, in the compiled model's gradients too
        first = compiled_model[0]
        assert first.weight.grad[h1:].abs().sum() == 0
        assert compiled_model[1].weight.grad[:, h1:].abs().sum() == 0
        assert compiled_model[1].weight.grad[h2:].abs().sum() == 0
        assert first.out_features == h1 and type(first.out_features) is int
    assert 1 <= backend.graphs <= 2, f"{backend.graphs} graphs for {len(WIDTHS)} widths"


def test_widths_stay_plain_ints_to_eager_code_and_checkpoints():
    layer = GrowLinear(3, 4, capacity_in=8, capacity_out=8)
    layer.grow_in(2)
    state = layer.state_dict()
    extra = state["_extra_state"]
    assert type(extra["in_features"]) is int and extra == {**extra, "in_features": 5, "out_features": 4}
    assert type(layer.in_features) is int and layer.in_features == 5
    assert "in_features=5, out_features=4," in repr(layer)  # printed as plain ints
    buffer = __import__("io").BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # no DynamicInt in what is saved
    other = GrowLinear(3, 4, capacity_in=8, capacity_out=8)
    other.load_state_dict(loaded)
    assert other.in_features == 5
    copy.deepcopy(layer)(torch.randn(2, 5))
