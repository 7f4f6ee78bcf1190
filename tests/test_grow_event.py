"""A growth event planned in one pass: Wiring.grow_many in order, GPT.grow in one call, the new slices' state."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import growdense
from growdense import GrowLinear, Wiring, protocol
from growdense.models.gpt import GPT
from growdense.protocol import PRODUCER

V, T, B = 24, 12, 3


def small(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(V, T, n_layer=2, d_model=16, n_head=2, d_ff=32, capacity_d_model=32, capacity_heads=4,
               capacity_d_ff=64, dtype=torch.float64)


def trained(seed: int = 0):
    """A GPT and its growdense AdamW after two steps (gradients and state present)."""
    model = small(seed)
    opt = growdense.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    for _ in range(2):
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def everything(model, opt) -> dict:
    """Every tensor and count the growth may change: parameters, gradients, buffers, optimizer state, widths."""
    out = {f"param {n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"grad {n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    out.update({f"buffer {n}": b.clone() for n, b in model.named_buffers()})
    names = {p: n for n, p in model.named_parameters()}
    for p, state in opt.state.items():
        for key, value in state.items():
            out[f"state {names[p]} {key}"] = value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
    out["widths"] = model.widths()
    out["norm ramps"] = [(n._ramp_left, n._ramping) for n in model.norms()]
    return out


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key  # bit for bit
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("init", ["zero_out", "he"])
@pytest.mark.parametrize("policy", ["keep", "keep_global_step"])
def test_gpt_grow_in_one_call_equals_separate_wiring_grows(init, policy):
    # The reference: one Wiring.grow per width, in GPT.grow's documented order (the residual
    # stream, then each block's heads and FFN width), from the same generator state.
    one, opt_one = trained()
    sep, opt_sep = trained()
    one.grow(16, 2, 32, init=init, generator=torch.Generator().manual_seed(7), optimizer=opt_one,
             optimizer_state=policy, ramp_steps=5)
    g = torch.Generator().manual_seed(7)
    wiring = sep.wiring(opt_sep)
    wiring.grow("residual", 16, init=init, generator=g, optimizer_state=policy,
                **({"ramp_steps": 5} if init == "zero_out" else {}))
    for i in range(2):
        wiring.grow(f"heads{i}", 2, init=init, generator=g, optimizer_state=policy)
        wiring.grow(f"ffn{i}", 32, init=init, generator=g, optimizer_state=policy)
    assert_identical(everything(one, opt_one), everything(sep, opt_sep))
    assert one.widths() == {"d_model": 32, "heads": 4, "d_ff": 64}


def test_grow_many_validates_every_width_before_changing_any():
    model, opt = trained()
    wiring = model.wiring(opt)
    before = everything(model, opt)
    with pytest.raises(ValueError, match="exceeds the capacity"):  # the last width is the bad one
        wiring.grow_many({"residual": 8, "heads0": 1, "ffn1": 64}, init="zero_out", optimizer_state="keep")
    with pytest.raises(KeyError, match="unknown hidden width"):
        wiring.grow_many({"residual": 8, "nonexistent": 1}, init="he")
    assert_identical(everything(model, opt), before)


class Scribble:
    """A strategy that, besides the producers' new rows, writes every gradient and Adam moment
    it can reach (as a strategy running user code might): the wiring must still leave the new
    units' gradients zero and their moments fresh."""

    name = "scribble-test"

    def check(self, change, **options):
        options.pop("split_noise", None)
        if set(options) - {"optimizer"}:
            raise TypeError(f"unexpected {sorted(set(options) - {'optimizer'})}")

    def apply_(self, change, **options):
        for s in change.slices:
            if s.role == PRODUCER and s.spec.fill is None:
                s.fill_(0.5)
            t = s.tensor
            if t.grad is not None:
                t.grad.fill_(3.0)
            for value in options["optimizer"].state.get(t, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == t.shape:
                    value.fill_(5.0)


def test_gradients_and_state_written_during_the_growth_are_cleared_in_the_new_slices():
    protocol.register_init(Scribble(), replace=True)
    torch.manual_seed(0)
    a, b = GrowLinear(4, 3, capacity_out=6), GrowLinear(3, 2, capacity_in=6)
    opt = torch.optim.SGD([*a.parameters(), *b.parameters()], lr=0.1, momentum=0.9)
    x = torch.randn(5, 4)
    for _ in range(2):
        opt.zero_grad()
        b(torch.relu(a(x))).sum().backward()
        opt.step()
    wiring = Wiring.chain([a, b], optimizer=opt)
    wiring.grow("h1", 2, init="scribble-test", optimizer=opt, optimizer_state="keep")
    # New units 3, 4: rows of a (and its bias), columns of b. Zero gradient, zero momentum
    # (SGD's fresh buffer); what the strategy wrote elsewhere stays as it wrote it.
    assert torch.all(a.weight.grad[3:5] == 0) and torch.all(a.bias.grad[3:5] == 0)
    assert torch.all(b.weight.grad[:, 3:5] == 0)
    for p, new in ((a.weight, (slice(3, 5),)), (a.bias, (slice(3, 5),)), (b.weight, (slice(None), slice(3, 5)))):
        buf = opt.state[p]["momentum_buffer"]
        assert torch.all(buf[new] == 0)
        rest = torch.ones_like(buf, dtype=torch.bool)
        rest[new] = False
        assert torch.all(buf[rest] == 5.0) and torch.all(p.grad[rest] == 3.0)
    assert torch.all(a.weight[3:5, :4] == 0.5)


def test_a_fresh_value_other_than_zero_is_written_into_the_new_slices():
    # Rprop creates its step sizes at the group's lr (torch's _init_group: full_like(p, lr)).
    # After the lr changes, a new unit's fresh step size is the new lr, not what lies outside
    # the active part (the old lr), so it must be written.
    torch.manual_seed(0)
    a, b = GrowLinear(4, 3, capacity_out=6), GrowLinear(3, 2, capacity_in=6)
    opt = torch.optim.Rprop([*a.parameters(), *b.parameters()], lr=0.01)
    x = torch.randn(5, 4)
    for _ in range(2):
        opt.zero_grad()
        b(torch.relu(a(x))).sum().backward()
        opt.step()
    opt.param_groups[0]["lr"] = 0.05
    old = opt.state[a.weight]["step_size"].clone()
    assert torch.all(old[3:] == 0.01)  # outside the active part: the old lr
    Wiring.chain([a, b], optimizer=opt).grow("h1", 2, init="he", generator=torch.Generator().manual_seed(0),
                                             optimizer_state="keep")
    new = opt.state[a.weight]["step_size"]
    assert torch.all(new[3:5] == 0.05) and torch.equal(new[:3], old[:3]) and torch.equal(new[5:], old[5:])
    assert torch.all(opt.state[b.weight]["step_size"][:, 3:5] == 0.05)
