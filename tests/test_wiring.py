"""Coupled growth and shrinking: Wiring, init strategies and optimizer state.

Tolerances. Growing changes the inner dimension of the next GEMM (more, possibly zero,
terms), which can change float32 summation order and blocking; a function-preserving
growth therefore matches the previous output to float32 rounding, not bit for bit. The
outputs here are O(1) sums of a few dozen O(1) terms, so ``atol=1e-5, rtol=1e-5`` is
about 100 float32 ulps: orders of magnitude below what a wrong init changes (O(0.1-1),
checked by ``test_he_changes_the_function``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from growdense import GrowLinear, Wiring
from grow_helpers import TinyEncoder, assert_same, reference_forward, snapshot, train_step

TOL = {"atol": 1e-5, "rtol": 1e-5}


def trained(optimizer_factory=None, steps=3, seed=0, **model_kwargs):
    """A TinyEncoder after a few optimizer steps, so optimizer state exists and is non-zero."""
    torch.manual_seed(seed)
    model = TinyEncoder(**model_kwargs)
    factory = optimizer_factory or (lambda ps: torch.optim.Adam(ps, lr=1e-2))
    optimizer = factory(model.parameters())
    x, target = torch.randn(16, 6), torch.randn(16, 6)
    for _ in range(steps):
        train_step(model, optimizer, x, target)
    return model, optimizer, x, target


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False),
    "adam-foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True),
    "adamw-amsgrad-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True, fused=True),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
}


def _fused_supported_on_cpu() -> bool:
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    try:
        torch.optim.Adam([p], fused=True).step()
    except RuntimeError:
        return False
    return True


def optimizer_param(name):
    marks = []
    if "fused" in name:
        marks.append(
            pytest.mark.skipif(not _fused_supported_on_cpu(), reason="this torch build has no fused Adam on CPU")
        )
    return pytest.param(name, marks=marks, id=name)


ALL_OPTIMIZERS = [optimizer_param(name) for name in OPTIMIZERS]


# ---- registration and queries ------------------------------------------------------------
def test_widths_capacity_and_names():
    model = TinyEncoder()
    wiring = model.wiring()
    assert wiring.names() == ["h1", "h2"]
    assert wiring.widths() == {"h1": 5, "h2": 4}
    assert wiring.width("h2") == 4
    assert wiring.capacity("h1") == 12 and wiring.capacity("h2") == 10
    # The smallest capacity among the coupled layers wins.
    small = TinyEncoder()
    small.logvar = GrowLinear(4, 3, capacity_in=7)
    assert small.wiring().capacity("h2") == 7


def test_add_rejects_bad_wiring():
    model = TinyEncoder()
    wiring = Wiring()
    with pytest.raises(ValueError, match="must match"):
        wiring.add("h", model.enc1, [model.mu])  # 5 outputs into 4 inputs
    wiring.add("h1", model.enc1, [model.enc2])
    with pytest.raises(ValueError, match="already registered"):
        wiring.add("h1", model.enc2, [model.mu])
    with pytest.raises(ValueError, match="already produces"):
        wiring.add("other", model.enc1, [model.enc2])
    with pytest.raises(TypeError, match="GrowLinear"):
        wiring.add("h2", model.enc2, [nn.Linear(4, 3)])
    with pytest.raises(ValueError, match="at least one consumer"):
        wiring.add("h2", model.enc2, [])


def test_chain_wires_an_mlp():
    layers = [GrowLinear(3, 4, capacity_out=8), GrowLinear(4, 5, capacity_in=8, capacity_out=9), GrowLinear(5, 2, capacity_in=9)]
    wiring = Wiring.chain(layers)
    assert wiring.widths() == {"h1": 4, "h2": 5}
    wiring.grow("h2", 3)
    assert (layers[1].out_features, layers[2].in_features) == (8, 8)


# ---- init strategies ------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["zero_out", "split"])
def test_function_preserving_growth(init):
    model, _, x, _ = trained()
    before = model(x).detach()
    wiring = model.wiring()
    g = torch.Generator().manual_seed(1)
    wiring.grow("h1", 4, init=init, generator=g)
    wiring.grow("h2", 3, init=init, generator=g)
    assert wiring.widths() == {"h1": 9, "h2": 7}
    after = model(x).detach()
    torch.testing.assert_close(after, before, **TOL)
    # The plain-PyTorch reference of the grown network agrees as well.
    torch.testing.assert_close(reference_forward(model, x), before, **TOL)


def test_he_changes_the_function():
    # Shows the preservation test above can fail: He outgoing weights move the output.
    model, _, x, _ = trained()
    before = model(x).detach()
    model.wiring().grow("h2", 3, init="he", generator=torch.Generator().manual_seed(1))
    assert (model(x).detach() - before).abs().max() > 1e-2


def test_he_statistics_and_zero_bias():
    torch.manual_seed(0)
    producer = GrowLinear(400, 10, capacity_out=410)
    consumer = GrowLinear(10, 300, capacity_in=410)
    wiring = Wiring()
    wiring.add("h", producer, [consumer])
    wiring.grow("h", 400, init="he", generator=torch.Generator().manual_seed(0))
    incoming = producer.weight[10:410, :400]
    outgoing = consumer.weight[:300, 10:410]
    # 160k and 120k samples: the std estimate is within ~0.3%; 3% is a loose, safe bound.
    assert incoming.std().item() == pytest.approx(math.sqrt(2 / 400), rel=0.03)
    assert outgoing.std().item() == pytest.approx(math.sqrt(2 / 410), rel=0.03)
    assert torch.all(producer.bias[10:410] == 0)
    assert torch.all(producer.weight[:, 400:] == 0) and torch.all(consumer.weight[300:] == 0)


def test_zero_out_new_columns_are_zero_and_rows_are_he():
    model, _, _, _ = trained()
    model.wiring().grow("h2", 5, init="zero_out", generator=torch.Generator().manual_seed(2))
    assert torch.all(model.mu.weight[:, 4:9] == 0) and torch.all(model.logvar.weight[:, 4:9] == 0)
    assert torch.all(model.enc2.weight[4:9, :5] != 0)
    assert torch.all(model.enc2.bias[4:9] == 0)


def test_split_copies_rows_and_splits_columns():
    model, _, x, _ = trained()
    w2, b2 = model.enc2.weight.detach().clone(), model.enc2.bias.detach().clone()
    mu_old = model.mu.weight.detach().clone()
    model.wiring().grow("h2", 3, init="split", generator=torch.Generator().manual_seed(3))
    rows = model.enc2.weight[4:7, :5]
    # Each new row is an exact copy of one old row (and its bias).
    sources = [next(j for j in range(4) if torch.equal(rows[k], w2[j, :5])) for k in range(3)]
    assert len(set(sources)) == 3
    for k, j in enumerate(sources):
        assert model.enc2.bias[4 + k] == b2[j]
        # Outgoing columns of source and copy sum to the original column, and differ (noise).
        src, new = model.mu.weight[:3, j], model.mu.weight[:3, 4 + k]
        torch.testing.assert_close(src + new, mu_old[:3, j], atol=1e-6, rtol=1e-6)
        assert not torch.equal(src, new)


def test_split_more_neurons_than_width_preserves_function():
    model, _, x, _ = trained()
    before = model(x).detach()
    model.wiring().grow("h2", 6, init="split", generator=torch.Generator().manual_seed(4))  # 4 -> 10
    torch.testing.assert_close(model(x).detach(), before, **TOL)


def test_same_seed_same_weights():
    a, _, _, _ = trained()
    b, _, _, _ = trained()
    for model in (a, b):
        model.wiring().grow("h1", 3, init="he", generator=torch.Generator().manual_seed(7))
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q)


# ---- optimizer state --------------------------------------------------------------------------
@pytest.mark.parametrize("opt", ALL_OPTIMIZERS)
def test_regrown_state_is_zero_and_the_rest_bit_identical(opt):
    model, optimizer, x, target = trained(OPTIMIZERS[opt])
    wiring = model.wiring(optimizer)
    snap = snapshot(model, optimizer)
    wiring.shrink("h2", 2)  # keep first: neurons 2, 3 leave
    wiring.grow("h2", 3, init="he", generator=torch.Generator().manual_seed(0))  # 2, 3, 4 are new
    keys = [k for k in optimizer.state[model.enc2.weight] if k != "step"]
    assert keys, "the optimizer should have element-wise state"
    for key in keys:
        rows = optimizer.state[model.enc2.weight][key]
        assert torch.all(rows[2:] == 0)
        assert torch.equal(rows[:2], snap[f"state{_index(optimizer, model.enc2.weight)}.{key}"][:2])
        bias = optimizer.state[model.enc2.bias][key]
        assert torch.all(bias[2:] == 0) and torch.equal(bias[:2], snap[f"state{_index(optimizer, model.enc2.bias)}.{key}"][:2])
        for head in (model.mu, model.logvar):
            cols = optimizer.state[head.weight][key]
            old = snap[f"state{_index(optimizer, head.weight)}.{key}"]
            assert torch.all(cols[:, 2:] == 0) and torch.equal(cols[:, :2], old[:, :2])
    # Layers not coupled to h2 are untouched, bit for bit (state, weights).
    i = _index(optimizer, model.enc1.weight)
    for key, value in optimizer.state[model.enc1.weight].items():
        assert torch.equal(value, snap[f"state{i}.{key}"])
    assert torch.equal(model.enc1.weight, snap["enc1.weight"])
    # The scalar step count is left alone.
    if "step" in optimizer.state[model.enc2.weight]:
        assert torch.equal(optimizer.state[model.enc2.weight]["step"], snap[f"state{_index(optimizer, model.enc2.weight)}.step"])
    # Training goes on with the same optimizer object.
    loss = train_step(model, optimizer, x, target)
    assert torch.isfinite(loss)


def _index(optimizer, param):
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return next(i for i, p in enumerate(params) if p is param)


def test_growth_before_the_first_step_has_no_state_to_touch():
    torch.manual_seed(0)
    model = TinyEncoder()
    optimizer = torch.optim.Adam(model.parameters())
    wiring = model.wiring(optimizer)
    wiring.grow("h1", 2)
    wiring.shrink("h1", 3, keep="norm")
    assert len(optimizer.state) == 0
    x = torch.randn(4, 6)
    train_step(model, optimizer, x, torch.zeros(4, 6))
    assert len(optimizer.state) == 8


def test_one_adam_step_after_regrowth_matches_a_hand_built_model():
    """Shrink (keep="norm"), regrow (zero_out), one Adam step: compare with plain nn.Linear + Adam.

    The reference is built by hand from the kept neurons' weights and optimizer moments
    (zero moments for the new neurons), so it checks permutation, zeroing and the step.
    """
    model, optimizer, x, target = trained(lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False), steps=4)
    enc2_norms = model.enc2.active_weight.norm(dim=1)
    kept = sorted(torch.topk(enc2_norms, 2).indices.tolist())
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    old_state = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in model.named_parameters()}

    wiring = model.wiring(optimizer)
    wiring.shrink("h2", 2, keep="norm")
    g = torch.Generator().manual_seed(5)
    wiring.grow("h2", 1, init="zero_out", generator=g)
    new_row = model.enc2.weight[2, :5].detach().clone()

    # Reference: plain Linear layers of the new widths (h1=5, h2=3).
    ref = nn.ModuleDict({
        "enc1": nn.Linear(6, 5), "enc2": nn.Linear(5, 3), "mu": nn.Linear(3, 3), "logvar": nn.Linear(3, 3)
    })
    with torch.no_grad():
        ref.enc1.weight.copy_(old["enc1.weight"][:5, :6]); ref.enc1.bias.copy_(old["enc1.bias"][:5])
        ref.enc2.weight.copy_(torch.cat([old["enc2.weight"][kept, :5], new_row[None]]))
        ref.enc2.bias.copy_(torch.cat([old["enc2.bias"][kept], torch.zeros(1)]))
        for head in ("mu", "logvar"):
            getattr(ref, head).weight.copy_(torch.cat([old[f"{head}.weight"][:3, kept], torch.zeros(3, 1)], dim=1))
            getattr(ref, head).bias.copy_(old[f"{head}.bias"][:3])
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, foreach=False)

    def moved(name, value):
        layer, kind = name.split(".")
        if name == "enc1.weight":
            return value[:5, :6]
        if name == "enc1.bias":
            return value[:5]
        if layer == "enc2":
            v = value[kept, :5] if kind == "weight" else value[kept]
            return torch.cat([v, torch.zeros_like(v[:1])])
        if kind == "weight":
            return torch.cat([value[:3, kept], torch.zeros(3, 1)], dim=1)
        return value[:3]

    for name, p in ref.named_parameters():
        s = old_state[name]
        ref_opt.state[p] = {
            "step": s["step"].clone(),
            "exp_avg": moved(name, s["exp_avg"]).clone(),
            "exp_avg_sq": moved(name, s["exp_avg_sq"]).clone(),
        }

    def ref_forward(v):
        h = torch.relu(ref.enc2(torch.relu(ref.enc1(v))))
        return torch.cat([ref.mu(h), ref.logvar(h)], dim=-1)

    loss = train_step(model, optimizer, x, target)
    ref_opt.zero_grad()
    ref_loss = nn.functional.mse_loss(ref_forward(x), target)
    ref_loss.backward()
    ref_opt.step()
    torch.testing.assert_close(loss, ref_loss.detach(), **TOL)
    for name, p in ref.named_parameters():
        layer = getattr(model, name.split(".")[0])
        mine = layer.active_weight if name.endswith("weight") else layer.active_bias
        torch.testing.assert_close(mine, p.detach(), **TOL)


# ---- shrinking: which neurons stay ------------------------------------------------------------
def test_keep_norm_keeps_the_largest_norm_neurons_and_the_function_over_them():
    model, optimizer, x, _ = trained(steps=2)
    w1, b1 = model.enc1.weight.detach().clone(), model.enc1.bias.detach().clone()
    w2 = model.enc2.weight.detach().clone()
    state = {k: v.clone() for k, v in optimizer.state[model.enc1.weight].items()}
    # Independent choice: norms of the producer's incoming rows, computed in float64 here.
    norms = [float(w1[i, :6].double().norm()) for i in range(5)]
    chosen = sorted(sorted(range(5), key=lambda i: -norms[i])[:3])
    # Only what changes place moves (issue 27): kept neurons among the first 3 stay, the
    # others fill the dropped places among the first 3 in increasing order.
    outside = iter(i for i in chosen if i >= 3)
    expected = [i if i in chosen else next(outside) for i in range(3)]

    # Reference output over those neurons only: a network whose other h1 neurons are removed.
    def over_kept(v):
        h1 = torch.relu(v @ w1[expected, :6].T + b1[expected])
        h2 = torch.relu(h1 @ w2[:4, expected].T + model.enc2.bias[:4])
        return torch.cat([model.mu(h2), model.logvar(h2)], dim=-1)

    reference = over_kept(x).detach()
    model.wiring(optimizer).shrink("h1", 3, keep="norm")
    assert torch.equal(model.enc1.weight[:3], w1[expected])
    assert torch.equal(model.enc2.weight[:, :3], w2[:, expected])
    assert torch.all(model.enc1.weight[3:] == 0) and torch.all(model.enc2.weight[:, 3:] == 0)
    torch.testing.assert_close(model(x).detach(), reference, **TOL)
    for key in ("exp_avg", "exp_avg_sq"):
        moved = optimizer.state[model.enc1.weight][key]
        assert torch.equal(moved[:3], state[key][expected]) and torch.all(moved[3:] == 0)


def test_keep_explicit_indices_in_the_given_order():
    model, optimizer, x, _ = trained()
    w2 = model.enc2.weight.detach().clone()
    mu = model.mu.weight.detach().clone()
    model.enc2.weight.grad = torch.randn_like(model.enc2.weight) * (w2 != 0)
    grad = model.enc2.weight.grad.clone()
    model.wiring(optimizer).shrink("h2", 2, keep=[3, 1])
    assert torch.equal(model.enc2.weight[:2], w2[[3, 1]])
    assert torch.equal(model.mu.weight[:, :2], mu[:, [3, 1]])
    assert torch.equal(model.enc2.weight.grad[:2], grad[[3, 1]]) and torch.all(model.enc2.weight.grad[2:] == 0)
    torch.testing.assert_close(model(x).detach(), reference_forward(model, x), **TOL)


def test_keep_first_is_the_study():
    model, optimizer, _, _ = trained()
    w1 = model.enc1.weight.detach().clone()
    model.wiring(optimizer).shrink("h1", 2)
    assert torch.equal(model.enc1.weight[:2], w1[:2]) and torch.all(model.enc1.weight[2:] == 0)
    assert model.enc1.out_features == 2 and model.enc2.in_features == 2


def test_permute_keeps_the_function_and_moves_state():
    model, optimizer, x, _ = trained()
    before = model(x).detach()
    state = optimizer.state[model.mu.weight]["exp_avg"].clone()
    perm = [2, 0, 3, 1]
    model.wiring(optimizer).permute("h2", perm)
    torch.testing.assert_close(model(x).detach(), before, **TOL)
    assert torch.equal(optimizer.state[model.mu.weight]["exp_avg"][:, :4], state[:, perm])
    with pytest.raises(ValueError, match="exactly 4"):
        model.wiring().permute("h2", [0, 1])


# ---- bad input: clear errors, nothing changed ------------------------------------------------
BAD_CALLS = [
    ("unknown name", lambda w: w.grow("h3", 1), KeyError, "unknown hidden width"),
    ("unknown name shrink", lambda w: w.shrink("nope", 1), KeyError, "unknown hidden width"),
    ("shrink above active", lambda w: w.shrink("h1", 6), ValueError, "between 1 and 5"),
    ("shrink to zero", lambda w: w.shrink("h1", 0), ValueError, "between 1 and 5"),
    ("duplicate keep", lambda w: w.shrink("h1", 3, keep=[0, 2, 2]), ValueError, "duplicates"),
    ("out-of-range keep", lambda w: w.shrink("h1", 2, keep=[0, 5]), ValueError, "out of range"),
    ("negative keep", lambda w: w.shrink("h1", 2, keep=[-1, 0]), ValueError, "out of range"),
    ("keep length", lambda w: w.shrink("h1", 2, keep=[0, 1, 2]), ValueError, "exactly 2"),
    ("keep kind", lambda w: w.shrink("h1", 2, keep="largest"), ValueError, "unknown keep"),
    ("float keep", lambda w: w.shrink("h1", 2, keep=torch.tensor([0.0, 1.0])), TypeError, "integer"),
    ("past producer capacity", lambda w: w.grow("h1", 8), ValueError, "capacity 12"),
    ("past a consumer's capacity", lambda w: w.grow("h2", 4), ValueError, "capacity 7"),
    ("negative growth", lambda w: w.grow("h1", -1), ValueError, ">= 0"),
    ("float growth", lambda w: w.grow("h1", 1.0), TypeError, "int"),
    ("unknown init", lambda w: w.grow("h1", 1, init="xavier"), ValueError, "unknown init"),
]


@pytest.mark.parametrize("call,error,match", [pytest.param(c, e, m, id=i) for i, c, e, m in BAD_CALLS])
def test_bad_input_errors_and_changes_nothing(call, error, match):
    model, optimizer, x, target = trained()
    # The log-variance head has a smaller input capacity (7) than h2's producer (10).
    small = GrowLinear(4, 3, capacity_in=7)
    with torch.no_grad():
        small.active_weight.copy_(model.logvar.active_weight)
    model.logvar = small
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_step(model, optimizer, x, target)
    model(x).sum().backward()  # leave gradients in place
    wiring = model.wiring(optimizer)
    before = snapshot(model, optimizer)
    with pytest.raises(error, match=match):
        call(wiring)
    assert_same(snapshot(model, optimizer), before)


def test_out_of_sync_layers_are_reported():
    model = TinyEncoder()
    wiring = model.wiring()
    model.mu.grow_in(1)  # resized behind the wiring's back
    with pytest.raises(RuntimeError, match="out of sync"):
        wiring.grow("h2", 1)
