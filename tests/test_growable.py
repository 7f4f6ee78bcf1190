"""growable(model): existing nn.Linear models made growable, their widths found by tracing.

Tolerances. Converting a model is checked bit for bit (``torch.equal``): a GrowLinear runs
the same float32 GEMM (addmm) and ReLU as ``nn.Linear`` + ``nn.ReLU`` on CPU. After a
function-preserving growth the next GEMM has a longer inner dimension (zero terms), which
can change float32 blocking and summation order, so those outputs are compared with
``atol=rtol=1e-5`` as in test_wiring.py: about 100 float32 ulps of the O(1) outputs here,
far below the O(0.1-1) change a growth with ``init="he"`` makes (checked below).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from growdense import GrowLinear, NotGrowableError, Wiring, growable

TOL = {"atol": 1e-5, "rtol": 1e-5}


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Dropout(0.0), nn.Linear(6, 4)
    )


class TwoHeads(nn.Module):
    """A custom forward where one hidden width (``body``) feeds two consumers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Linear(10, 7)
        self.act = nn.ReLU()
        self.mean = nn.Linear(7, 3)
        self.scale = nn.Linear(7, 3)

    def forward(self, x):
        h = self.act(self.body(x))
        return self.mean(h), F.softplus(self.scale(h))


class PlainVAE(nn.Module):
    """The study's VAE written with plain nn.Linear: 784-256-128, heads 128-20, 20-128-256-784."""

    def __init__(self, image=784, h1=256, h2=128, latent=20, d1=128, d2=256):
        super().__init__()
        torch.manual_seed(2)
        self.enc1, self.act1 = nn.Linear(image, h1), nn.ReLU()
        self.enc2, self.act2 = nn.Linear(h1, h2), nn.ReLU()
        self.mu_head = nn.Linear(h2, latent)
        self.logvar_head = nn.Linear(h2, latent)
        self.dec1, self.act3 = nn.Linear(latent, d1), nn.ReLU()
        self.dec2, self.act4 = nn.Linear(d1, d2), nn.ReLU()
        self.dec3 = nn.Linear(d2, image)

    def encode(self, x):
        h = self.act2(self.enc2(self.act1(self.enc1(x))))
        return self.mu_head(h), self.logvar_head(h)

    def decode_logits(self, z):
        return self.dec3(self.act4(self.dec2(self.act3(self.dec1(z)))))

    def forward(self, x, eps):
        """``eps``: (L, B, J) standard normal draws; returns logits (L, B, D), mu, logvar."""
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * eps
        L, B, J = z.shape
        logits = self.decode_logits(z.reshape(L * B, J)).reshape(L, B, -1)
        return logits, mu, logvar


def outputs(model, *inputs):
    with torch.no_grad():
        out = model(*inputs)
    return out if isinstance(out, tuple) else (out,)


def assert_equal_outputs(a, b, **tol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if tol:
            torch.testing.assert_close(x, y, **tol)
        else:
            assert torch.equal(x, y), (x - y).abs().max()


def structure(wiring: Wiring, model: nn.Module) -> dict[str, list[str]]:
    """``{width: [producer, *consumers]}`` by qualified module name."""
    names = {id(m): n for n, m in model.named_modules()}
    return {
        w: [names[id(wiring.producer(w))]] + [names[id(c)] for c in wiring.consumers(w)] for w in wiring.names()
    }


def state(model):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in model.state_dict().items()}


def assert_same_state(model, before, modules_before):
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert [(n, type(m)) for n, m in model.named_modules()] == modules_before


# ---- conversion ---------------------------------------------------------------------


def test_sequential_mlp_widths_fusion_and_output():
    model = mlp()
    x = torch.randn(5, 12)
    before = outputs(model, x)
    wiring = growable(model, capacity=2.0)
    assert structure(wiring, model) == {"0": ["0", "2"], "2": ["2", "5"]}
    assert wiring.widths() == {"0": 8, "2": 6}
    assert wiring.capacity("0") == 16 and wiring.capacity("2") == 12
    assert wiring.optimizer is None
    types = [type(m) for m in model]
    assert types == [GrowLinear, nn.Identity, GrowLinear, nn.Identity, nn.Dropout, GrowLinear]
    assert [model[i].activation for i in (0, 2, 5)] == ["relu", "relu", "none"]
    assert (model[5].capacity_in, model[5].capacity_out) == (12, 4)
    assert_equal_outputs(before, outputs(model, x))  # bit for bit
    stacked = outputs(model, torch.stack([x, x]))[0]  # (2, 5, 12) input: leading dims kept
    assert torch.equal(stacked[0], before[0]) and torch.equal(stacked[1], before[0])


def test_same_weights_and_nn_linear_state_dict_keys():
    model = mlp()
    reference = copy.deepcopy(model)
    growable(model)
    for i in (0, 2, 5):
        torch.testing.assert_close(model[i].active_weight, reference[i].weight, rtol=0, atol=0)
        torch.testing.assert_close(model[i].active_bias, reference[i].bias, rtol=0, atol=0)
    assert {k for k in model.state_dict() if not k.endswith("_extra_state")} == set(reference.state_dict())


@pytest.mark.parametrize("batch,d_in,hidden,capacity,bias", [(1, 5, 7, 1.0, True), (64, 784, 256, 2.0, True),
                                                              (33, 64, 513, 1.3, False), (3, 784, 32, 8.0, True)])
def test_bit_identical_to_linear_relu(batch, d_in, hidden, capacity, bias):
    torch.manual_seed(batch)
    model = nn.Sequential(nn.Linear(d_in, hidden, bias=bias), nn.ReLU(), nn.Linear(hidden, 10, bias=bias))
    x = torch.randn(batch, d_in)
    before = outputs(model, x)
    growable(model, capacity)
    assert_equal_outputs(before, outputs(model, x))


def test_gradients_match_after_conversion():
    model = mlp()
    reference = copy.deepcopy(model)
    growable(model)
    x = torch.randn(9, 12)
    reference(x).square().sum().backward()
    model(x).square().sum().backward()
    # Same GEMMs on the same values: float32 rounding only (1e-6 relative, O(1) values).
    for i in (0, 2, 5):
        torch.testing.assert_close(model[i].weight.grad[:model[i].out_features, :model[i].in_features],
                                   reference[i].weight.grad, rtol=1e-6, atol=1e-6)


def test_custom_forward_one_width_two_consumers():
    model = TwoHeads()
    x = torch.randn(4, 10)
    before = outputs(model, x)
    wiring = growable(model, capacity={"body": 16})
    assert structure(wiring, model) == {"body": ["body", "mean", "scale"]}
    assert wiring.capacity("body") == 16
    assert isinstance(model.act, nn.Identity) and model.body.activation == "relu"
    assert_equal_outputs(before, outputs(model, x))
    wiring.grow("body", 9, init="zero_out")
    assert model.mean.in_features == model.scale.in_features == 16
    assert_equal_outputs(before, outputs(model, x), **TOL)


def vae_inputs():
    gen = torch.Generator().manual_seed(3)
    return torch.rand(6, 784, generator=gen), torch.randn(2, 6, 20, generator=gen)


def test_plain_vae_matches_hand_written_wiring():
    model = PlainVAE()
    x, eps = vae_inputs()
    before = outputs(model, x, eps)
    # The heads' latent width reaches the decoder through the sampling: it stays fixed.
    wiring = growable(model, capacity=2.0, exclude=["mu_head", "logvar_head"])
    assert structure(wiring, model) == {
        "enc1": ["enc1", "enc2"],
        "enc2": ["enc2", "mu_head", "logvar_head"],
        "dec1": ["dec1", "dec2"],
        "dec2": ["dec2", "dec3"],
    }
    assert wiring.widths() == {"enc1": 256, "enc2": 128, "dec1": 128, "dec2": 256}
    assert all(isinstance(getattr(model, f"act{i}"), nn.Identity) for i in (1, 2, 3, 4))
    assert_equal_outputs(before, outputs(model, x, eps))


def test_plain_vae_study_widths_and_growth():
    """Only the encoder grows, as in the study: the decoder is excluded and stays nn.Linear."""
    model = PlainVAE(h1=32, h2=16)
    x, eps = vae_inputs()
    before = outputs(model, x, eps)
    wiring = growable(model, capacity={"enc1": 256, "enc2": 128}, exclude=["mu_head", "logvar_head", "dec1", "dec2"])
    # The hand-written wiring of growdense.models.VAE: h1 = enc1 -> enc2, h2 = enc2 -> both heads.
    assert structure(wiring, model) == {"enc1": ["enc1", "enc2"], "enc2": ["enc2", "mu_head", "logvar_head"]}
    assert type(model.dec1) is nn.Linear and type(model.act3) is nn.ReLU
    assert_equal_outputs(before, outputs(model, x, eps))
    for _ in range(7):  # 32/16 -> 256/128 in the study's steps, function preserved throughout
        wiring.grow("enc1", 32, init="zero_out")
        wiring.grow("enc2", 16, init="zero_out")
    assert wiring.widths() == {"enc1": 256, "enc2": 128}
    assert_equal_outputs(before, outputs(model, x, eps), **TOL)
    wiring.shrink("enc1", 32)
    wiring.grow("enc1", 32, init="he")
    changed = outputs(model, x, eps)[0]
    assert (changed - before[0]).abs().max() > 1e-2


def test_zero_out_growth_preserves_output_and_trains():
    model = mlp()
    x, target = torch.randn(16, 12), torch.randn(16, 4)
    before = outputs(model, x)
    wiring = growable(model, capacity=3.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    wiring.optimizer = opt
    wiring.grow("0", 8, init="zero_out")
    wiring.grow("2", 12, init="zero_out")
    assert wiring.widths() == {"0": 16, "2": 18}
    assert_equal_outputs(before, outputs(model, x), **TOL)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_capacity_multiplier_rounds_up():
    model = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 3))
    assert growable(model, 1.25).capacity("0") == 13  # ceil(12.5)


def test_shared_activation_module_is_fused_everywhere():
    act = nn.ReLU()
    model = nn.Sequential(nn.Linear(5, 6), act, nn.Linear(6, 7), act, nn.Linear(7, 2))
    x = torch.randn(3, 5)
    before = outputs(model, x)
    growable(model)
    assert isinstance(model[1], nn.Identity) and model[1] is model[3]
    assert model[0].activation == model[2].activation == "relu"
    assert_equal_outputs(before, outputs(model, x))


class ActAlsoElsewhere(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(4, 6), nn.Linear(6, 3), nn.ReLU()

    def forward(self, x):
        return self.act(self.fc2(self.act(self.fc1(x)))) + self.act(x).sum(-1, keepdim=True)


def test_activation_used_outside_a_linear_is_not_fused():
    model = ActAlsoElsewhere()
    x = torch.randn(3, 4)
    before = outputs(model, x)
    wiring = growable(model)
    assert wiring.names() == ["fc1"]
    assert type(model.act) is nn.ReLU and model.fc1.activation == "none"
    assert_equal_outputs(before, outputs(model, x))


def test_gelu_and_silu_fused_only_where_supported():
    from growdense import ops

    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 5), nn.SiLU(), nn.Linear(5, 2))
    x = torch.randn(3, 4)
    before = outputs(model, x)
    growable(model)
    for i, name in ((0, "gelu"), (2, "silu")):
        fused = name in ops.ACTIVATIONS
        assert model[i].activation == (name if fused else "none")
        assert isinstance(model[i + 1], nn.Identity) == fused
    # A fused GELU/SiLU is a different kernel from torch's: float32 rounding at most.
    assert_equal_outputs(before, outputs(model, x), **TOL)


def test_functional_activations_and_scalar_arithmetic_keep_the_width():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.fc1(x)
            h = torch.tanh(h) * torch.sigmoid(h) * 2.0 - 1
            return self.fc2(F.dropout(h, 0.0, self.training)).view(x.size(0), 2)

    model = Functional()
    x = torch.randn(3, 4)
    before = outputs(model, x)
    wiring = growable(model)
    assert structure(wiring, model) == {"fc1": ["fc1", "fc2"]}
    assert_equal_outputs(before, outputs(model, x))


def test_nested_modules_and_exclude_by_prefix():
    model = nn.Sequential(
        nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU()),
        nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2)),
    )
    wiring = growable(model)
    assert structure(wiring, model) == {"0.0": ["0.0", "0.2"], "0.2": ["0.2", "1.0"], "1.0": ["1.0", "1.2"]}
    # exclude a whole submodule: the widths produced inside it stay fixed
    fresh = nn.Sequential(
        nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU()),
        nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2)),
    )
    wiring = growable(fresh, exclude=["0"])
    assert structure(wiring, fresh) == {"1.0": ["1.0", "1.2"]}
    assert type(fresh[0][0]) is nn.Linear and type(fresh[0][1]) is nn.ReLU


def test_frozen_and_eval_flags_carry_over():
    model = mlp().eval()
    model[0].weight.requires_grad_(False)
    growable(model)
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad
    assert not model[0].training


# ---- refusals: each names the layer and the reason, and changes nothing ---------------


class Reshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc3(torch.relu(self.fc2(h))), h.view(-1, 2, 3)


class Norm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.fc1, self.fc2, self.out = nn.Linear(4, 6), nn.Linear(6, 8), nn.Linear(8, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.out(h)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 3), nn.Linear(4, 5), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.relu(torch.cat([self.a(x), self.b(x)], dim=-1)))


class HiddenIsOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h), h  # the hidden features are returned as well


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) * self.fc1.weight.norm()  # reads fc1's full weight


REFUSALS = [
    (Reshape, {"fc1": "reshape (view"}, ["fc1"]),
    (Norm, {"fc1": "normalisation layer (LayerNorm 'norm')"}, ["fc1"]),
    (Residual, {"inp": "addition", "fc2": "addition"}, ["inp", "fc2"]),
    (Concat, {"a": "concatenation (cat", "b": "concatenation (cat"}, ["a", "b"]),
    (HiddenIsOutput, {"fc1": "output of the model"}, ["fc1"]),
    (Tied, {"fc1": "reads its weight directly"}, None),
]


@pytest.mark.parametrize("cls,expected,exclude", REFUSALS, ids=[r[0].__name__ for r in REFUSALS])
def test_unsupported_structure_is_refused_and_nothing_changes(cls, expected, exclude):
    model = cls()
    before, modules = state(model), [(n, type(m)) for n, m in model.named_modules()]
    x = torch.randn(3, 4)
    out_before = outputs(model, x)
    with pytest.raises(NotGrowableError) as info:
        growable(model)
    assert set(info.value.problems) == set(expected)
    for layer, reason in expected.items():
        assert f"layer {layer!r}" in str(info.value)
        assert reason in info.value.problems[layer], info.value.problems[layer]
    assert_same_state(model, before, modules)
    assert_equal_outputs(out_before, outputs(model, x))
    if exclude is not None:  # the same model is accepted once those widths are kept fixed
        assert "exclude=" in str(info.value)
        growable(model, exclude=exclude)
        assert_equal_outputs(out_before, outputs(model, x))


def test_residual_keeps_the_inner_width_growable():
    model = Residual()
    x = torch.randn(3, 4)
    before = outputs(model, x)
    wiring = growable(model, exclude=["inp", "fc2"])
    assert structure(wiring, model) == {"fc1": ["fc1", "fc2"]}
    wiring.grow("fc1", 4, init="zero_out")
    assert_equal_outputs(before, outputs(model, x), **TOL)


def test_vae_heads_refused_without_exclude():
    model = PlainVAE(h1=8, h2=6, d1=5, d2=7)
    before, modules = state(model), [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(NotGrowableError) as info:
        growable(model)
    assert set(info.value.problems) == {"mu_head", "logvar_head"}
    assert "['dec1']" in info.value.problems["mu_head"]
    assert_same_state(model, before, modules)


def test_untraceable_forward_is_refused():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.fc1(x)
            if h.sum() > 0:  # control flow on a tensor value
                h = -h
            return self.fc2(h)

    model = Branchy()
    before, modules = state(model), [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(NotGrowableError, match="cannot be traced by torch.fx"):
        growable(model)
    assert_same_state(model, before, modules)


class SharedConsumer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) + self.fc2(x)


def test_consumer_also_called_on_another_input_is_refused():
    model = SharedConsumer()
    before, modules = state(model), [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(NotGrowableError, match="'fc2' is also called on an input that does not come from 'fc1'"):
        growable(model)
    assert_same_state(model, before, modules)


def test_tied_parameters_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    with pytest.raises(NotGrowableError, match="shared with"):
        growable(model)
    assert type(model[0]) is nn.Linear


def test_hooks_are_refused():
    model = mlp()
    model[2].register_forward_hook(lambda *args: None)
    before, modules = state(model), [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(NotGrowableError, match="layer '2': it has hooks"):
        growable(model)
    assert_same_state(model, before, modules)


def test_already_growable_is_refused():
    model = mlp()
    growable(model)
    with pytest.raises(NotGrowableError, match="already a GrowLinear"):
        growable(model)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"capacity": 0.5}, ValueError, "must be >= 1"),
        ({"capacity": "2"}, TypeError, "capacity must be a number"),
        ({"capacity": {"5": 10}}, ValueError, r"not hidden widths of the model.*\['0', '2'\]"),
        ({"capacity": {"0": 4}}, ValueError, "below the width 8"),
        ({"capacity": {"0": 16.0}}, TypeError, "must be an int"),
        ({"exclude": ["nope"]}, ValueError, "not a linear layer"),
    ],
)
def test_bad_arguments_change_nothing(kwargs, error, match):
    model = mlp()
    before, modules = state(model), [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(error, match=match):
        growable(model, **kwargs)
    assert_same_state(model, before, modules)


def test_state_dict_carries_grown_widths():
    model = mlp()
    wiring = growable(model, 2.0)
    wiring.grow("0", 5)
    copy_ = mlp()
    growable(copy_, 2.0)
    copy_.load_state_dict(model.state_dict())
    assert copy_[0].out_features == 13 and copy_[2].in_features == 13
    x = torch.randn(2, 12)
    assert_equal_outputs(outputs(model, x), outputs(copy_, x))
