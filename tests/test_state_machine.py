"""Stateful property test: random sequences of valid and invalid operations on a coupled model.

A hypothesis ``RuleBasedStateMachine`` drives a small float64 encoder (in -> h1 -> h2 ->
two heads, h2 feeding both) through grows (every init), shrinks (every keep policy),
optimizer steps (SGD with momentum, Adam and AdamW from torch and from growdense.optim),
state_dict round trips, checkpoint saves and loads, and failing calls of every kind
(bad counts, bad inits, bad split noise, bad keep indices, over capacity, a schedule event
that cannot be applied, strict loads with missing or unexpected keys, loads of another
capacity, unreadable and unfitting checkpoints, extras that cannot be saved, a Wiring given
something that is not an optimizer). After every step it checks:

- the invariant: outside the active block, the weights, their gradients and every
  optimizer state tensor shaped like its parameter are zero;
- the model's function equals a hand-built float64 reference network of the active widths
  (plain tensor algebra on copies of the active blocks);
- after every optimizer step: the gradients equal autograd's on that reference network,
  and the update equals a plain torch optimizer of the same kind stepping active-size
  copies with the same state;
- a call that raised changed nothing (a deep snapshot, the global RNG included, compared
  bit for bit).

Tolerances: float64 throughout. Forward and gradients through another kernel and summation
order match to ~1e-15 relative on O(1) values; 1e-10 is far below any real error (a wrong
block or a stale neuron moves values by O(0.1)). Optimizer updates go through the same torch
functions on the same numbers, elementwise: 1e-12.

Budget: by default a few seconds (``MAX_EXAMPLES`` sequences of up to ``STEPS`` steps). For
a longer search set ``GROWDENSE_STATEFUL_EXAMPLES`` (and optionally
``GROWDENSE_STATEFUL_STEPS``), e.g. ``GROWDENSE_STATEFUL_EXAMPLES=2000 python -m pytest -q
tests/test_state_machine.py``.
"""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule  # noqa: E402

import growdense.optim  # noqa: E402
from growdense import CheckpointError, GrowLinear, GrowthEvent, GrowthSchedule, Wiring  # noqa: E402
from growdense import load_checkpoint, save_checkpoint  # noqa: E402
from growdense.layers import active_block  # noqa: E402
from grow_helpers import TinyEncoder, assert_same, snapshot  # noqa: E402

MAX_EXAMPLES = int(os.environ.get("GROWDENSE_STATEFUL_EXAMPLES", "12"))
STEPS = int(os.environ.get("GROWDENSE_STATEFUL_STEPS", "25"))
CAP = {"h1": 7, "h2": 6}
TOL = {"atol": 1e-10, "rtol": 1e-10}
STEP_TOL = {"atol": 1e-12, "rtol": 1e-12}

OPTIMIZERS = {
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 0.01}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    "growdense-adam": (growdense.optim.Adam, {"lr": 0.01}),
    "growdense-adamw": (growdense.optim.AdamW, {"lr": 0.01, "amsgrad": True}),
}
# The plain torch optimizer that a growdense one must match.
REFERENCE = {growdense.optim.Adam: torch.optim.Adam, growdense.optim.AdamW: torch.optim.AdamW}

NAMES = st.sampled_from(["h1", "h2"])


def full_snapshot(model, optimizer) -> dict:
    snap = snapshot(model, optimizer)
    snap["global_rng"] = torch.get_rng_state()
    return snap


def layers(model):
    return [model.enc1, model.enc2, model.mu, model.logvar]


def reference_forward(weights, x):
    """The encoder on plain tensors: ``weights`` holds (W, b) of the active blocks per layer."""
    (w1, b1), (w2, b2), (wm, bm), (wl, bl) = weights
    h = torch.relu(x @ w1.T + b1)
    h = torch.relu(h @ w2.T + b2)
    return torch.cat([h @ wm.T + bm, h @ wl.T + bl], dim=-1)


def active_copies(model, requires_grad=False):
    return [
        (
            layer.weight.detach()[: layer.out_features, : layer.in_features].clone().requires_grad_(requires_grad),
            layer.bias.detach()[: layer.out_features].clone().requires_grad_(requires_grad),
        )
        for layer in layers(model)
    ]


class GrowthMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.saved = None  # (path, snapshot at save time)

    def teardown(self):
        self.tmp.cleanup()

    @initialize(opt=st.sampled_from(sorted(OPTIMIZERS)), seed=st.integers(0, 2**16))
    def build(self, opt, seed):
        torch.manual_seed(seed)
        self.model = TinyEncoder(d_in=4, h1=3, h2=2, latent=2, cap1=CAP["h1"], cap2=CAP["h2"], dtype=torch.float64)
        cls, kwargs = OPTIMIZERS[opt]
        self.optimizer = cls(self.model.parameters(), **kwargs)
        self.wiring = self.model.wiring(self.optimizer)
        # The reference step below models one step count per parameter; the per-neuron
        # counts of optimizer_state="keep" are checked in test_optimizer_state.py.
        self.wiring.optimizer_state = "keep_global_step"
        self.generator = torch.Generator().manual_seed(seed + 1)
        data = torch.Generator().manual_seed(seed + 2)
        self.x = torch.randn(6, 4, generator=data, dtype=torch.float64)
        self.y = torch.randn(6, 4, generator=data, dtype=torch.float64)

    # ---- helpers ------------------------------------------------------------------------
    def fails_and_changes_nothing(self, call, error=(TypeError, ValueError, RuntimeError, KeyError)):
        before = full_snapshot(self.model, self.optimizer)
        with pytest.raises(error):
            call()
        assert_same(full_snapshot(self.model, self.optimizer), before)

    def room(self, name):
        return CAP[name] - self.wiring.width(name)

    # ---- valid operations ---------------------------------------------------------------
    @rule(name=NAMES, data=st.data(), init=st.sampled_from(["he", "zero_out", "split"]))
    def grow(self, name, data, init):
        n = data.draw(st.integers(0, self.room(name)), label="n")
        before = self.model(self.x).detach()
        self.wiring.grow(name, n, init=init, generator=self.generator, split_noise=0.0 if init == "split" else 1e-2)
        assert self.wiring.width(name) <= CAP[name]
        if init == "zero_out" or (init == "split"):  # function-preserving (split: up to rounding)
            torch.testing.assert_close(self.model(self.x), before, **TOL)

    @rule(name=NAMES, data=st.data(), keep=st.sampled_from(["first", "norm", "indices", "permutation"]))
    def shrink(self, name, data, keep):
        width = self.wiring.width(name)
        to = width if keep == "permutation" else data.draw(st.integers(1, width), label="to")
        if keep in ("indices", "permutation"):
            keep = data.draw(st.permutations(range(width)), label="order")[:to]
        before = self.model(self.x).detach()
        self.wiring.shrink(name, to, keep=keep)
        assert self.wiring.width(name) == to
        if to == width:  # only a permutation: the function is unchanged
            torch.testing.assert_close(self.model(self.x), before, **TOL)

    @rule()
    def step(self):
        reference = active_copies(self.model, requires_grad=True)
        self.optimizer.zero_grad()
        loss = F.mse_loss(self.model(self.x), self.y)
        loss.backward()
        ref_loss = F.mse_loss(reference_forward(reference, self.x), self.y)
        ref_loss.backward()
        torch.testing.assert_close(loss.detach(), ref_loss.detach(), **TOL)
        for layer, (w, b) in zip(layers(self.model), reference):
            torch.testing.assert_close(layer.weight.grad[: layer.out_features, : layer.in_features], w.grad, **TOL)
            torch.testing.assert_close(layer.bias.grad[: layer.out_features], b.grad, **TOL)
        expected = self.reference_step()
        self.optimizer.step()
        for param, value in expected:
            torch.testing.assert_close(param.detach()[active_block(param)], value, **STEP_TOL)

    def reference_step(self):
        """A plain torch optimizer of the same kind, on active-size copies with the same state."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        copies = []
        for p in params:
            block = active_block(p)
            copy = torch.nn.Parameter(p.detach()[block].clone())
            copy.grad = p.grad[block].clone()
            copies.append((p, block, copy))
        cls = REFERENCE.get(type(self.optimizer), type(self.optimizer))
        group = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        reference = cls([c for _, _, c in copies], **{k: v for k, v in group.items() if k in cls.__init__.__code__.co_varnames})
        for p, block, copy in copies:
            state = self.optimizer.state.get(p)
            if state:
                reference.state[copy] = {
                    k: (v[block].clone() if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() else
                        v.clone() if isinstance(v, torch.Tensor) else v)
                    for k, v in state.items()
                }
        reference.step()
        return [(p, copy.detach()) for p, _, copy in copies]

    @rule()
    def state_dict_round_trip(self):
        state = self.model.state_dict()
        fresh = TinyEncoder(d_in=4, h1=1, h2=1, latent=2, cap1=CAP["h1"], cap2=CAP["h2"], dtype=torch.float64)
        fresh.load_state_dict(state)
        assert_same(snapshot(fresh), {k: (None if k.endswith(".grad") else v) for k, v in snapshot(self.model).items()})
        torch.testing.assert_close(fresh(self.x), self.model(self.x), atol=0, rtol=0)
        for layer in layers(fresh):
            self.check_outside_zero(layer)
        self.model.load_state_dict(state)  # into itself: nothing changes
        assert_same(snapshot(self.model), snapshot(self.model))

    @rule()
    def save(self):
        path = os.path.join(self.tmp.name, "ckpt.pt")
        save_checkpoint(path, self.model, self.optimizer, wiring=self.wiring, generators={"g": self.generator})
        self.saved = (path, self.comparable_snapshot())

    @rule()
    def load(self):
        if self.saved is None:
            self.save()
        path, expected = self.saved
        load_checkpoint(path, self.model, self.optimizer, wiring=self.wiring, generators={"g": self.generator})
        assert_same(self.comparable_snapshot(), expected)

    def comparable_snapshot(self):
        """What a checkpoint restores: parameters, widths, optimizer state, generator (not gradients)."""
        snap = {k: v for k, v in snapshot(self.model, self.optimizer).items() if not k.endswith(".grad")}
        snap["generator"] = self.generator.get_state()
        return snap

    @rule(event=st.sampled_from(["valid", "invalid"]))
    def schedule_event(self, event):
        widths = self.wiring.widths()
        if event == "valid":
            shrink = {"h1": max(1, widths["h1"] - 1)}
            grow = {"h2": min(1, self.room("h2"))}
            schedule = GrowthSchedule(widths, [GrowthEvent(1, shrink_to=shrink, grow_by=grow)])
            schedule.apply(1, self.wiring, keep={"h1": "norm"}, generator=self.generator)
            assert self.wiring.widths() == schedule.widths_at(1)
        else:  # the shrink is fine, the growth exceeds the capacity: nothing may change
            schedule = GrowthSchedule(widths, [GrowthEvent(1, shrink_to={"h1": 1}, grow_by={"h2": self.room("h2") + 1})])
            self.fails_and_changes_nothing(lambda: schedule.apply(1, self.wiring))

    # ---- failing calls ----------------------------------------------------------------
    @rule(
        name=NAMES,
        bad=st.sampled_from(["over", "negative", "float", "bool", "init", "noise-nan", "noise-str", "generator"]),
    )
    def bad_grow(self, name, bad):
        n, kwargs = 1, {}
        if bad == "over":
            n = self.room(name) + 1
        elif bad == "negative":
            n = -1
        elif bad == "float":
            n = 1.5
        elif bad == "bool":
            n = True
        elif bad == "init":
            kwargs["init"] = "gradmax"
        elif bad == "noise-nan":
            kwargs.update(init="split", split_noise=math.nan)
        elif bad == "noise-str":
            kwargs.update(init="split", split_noise="x")
        else:
            kwargs["generator"] = 1234
        self.fails_and_changes_nothing(lambda: self.wiring.grow(name, n, **kwargs))

    @rule(name=NAMES, bad=st.sampled_from(["zero", "wider", "dup", "length", "range", "policy", "float"]))
    def bad_shrink(self, name, bad):
        width = self.wiring.width(name)
        to, keep = max(1, width - 1), "first"
        if bad == "zero":
            to = 0
        elif bad == "wider":
            to = width + 1
        elif bad == "dup":
            to, keep = 2, [0, 0]
        elif bad == "length":
            keep = list(range(to + 1))
        elif bad == "range":
            keep = [width] + list(range(to - 1))
        elif bad == "policy":
            keep = "largest"
        else:
            to = 1.0
        if bad == "dup" and width < 2:
            to, keep = 1, [width]  # out of range instead
        self.fails_and_changes_nothing(lambda: self.wiring.shrink(name, to, keep=keep))

    @rule(
        name=NAMES,
        data=st.data(),
        what=st.sampled_from(["inference-data", "inference-grad", "inference-state", "expanded-grad", "complex-grad"]),
        op=st.sampled_from(["grow", "shrink", "permute"]),
    )
    def unwritable_member(self, name, data, what, op):
        """A member's tensor that cannot be written in place: the change raises before anything moves."""
        members = [self.wiring.producer(name)] + self.wiring.consumers(name)
        layer = data.draw(st.sampled_from(members), label="layer")
        param = layer.weight
        width = self.wiring.width(name)
        if op == "grow" and self.room(name) == 0 or op != "grow" and width < 2:
            return
        state = self.optimizer.state.get(param) or {}
        key = next((k for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == param.shape), None)
        if what in ("inference-grad", "expanded-grad", "complex-grad") and param.grad is None:
            what = "inference-data"
        if what == "inference-state" and key is None:
            what = "inference-data"
        with torch.inference_mode():
            frozen = {"data": param.data.clone(), "grad": None if param.grad is None else param.grad.clone()}
            if key is not None:
                frozen["state"] = state[key].clone()
        original = {"data": param.data, "grad": param.grad, "state": state.get(key)}
        if what == "inference-data":
            param.data = frozen["data"]
        elif what == "inference-grad":
            param.grad = frozen["grad"]
        elif what == "inference-state":
            state[key] = frozen["state"]
        elif what == "expanded-grad":
            param.grad = param.grad[:1].clone().expand_as(param.grad)
        else:  # a complex tensor where a real one is expected (a foreign optimizer state)
            state_key = key or "momentum_buffer"
            original["state"], original_key = state.get(state_key), state_key
        try:
            if what == "complex-grad":
                if not state:
                    return
                state[original_key] = torch.zeros(param.shape, dtype=torch.complex128)
            if op == "grow":
                call = lambda: self.wiring.grow(name, 1, generator=self.generator)  # noqa: E731
            elif op == "shrink":
                call = lambda: self.wiring.shrink(name, width - 1, keep="norm")  # noqa: E731
            else:
                call = lambda: self.wiring.permute(name, list(range(width))[::-1])  # noqa: E731
            self.fails_and_changes_nothing(call, RuntimeError)
        finally:
            param.data = original["data"]
            param.grad = original["grad"]
            if what == "inference-state":
                state[key] = original["state"]
            elif what == "complex-grad" and state:
                if original["state"] is None:
                    state.pop(original_key, None)
                else:
                    state[original_key] = original["state"]

    @rule(bad=st.sampled_from(["missing", "unexpected", "capacity", "widths"]))
    def bad_layer_load(self, bad):
        layer = self.model.enc2
        state = layer.state_dict()
        if bad == "missing":
            del state["weight"]
        elif bad == "unexpected":
            state["junk"] = torch.zeros(1)
        elif bad == "capacity":
            state["weight"] = torch.zeros(layer.capacity_out + 1, layer.capacity_in, dtype=torch.float64)
        else:
            state["_extra_state"] = {"version": 1, "in_features": layer.capacity_in + 1, "out_features": 1}
        self.fails_and_changes_nothing(lambda: layer.load_state_dict(state))

    @rule(bad=st.sampled_from(["truncated", "foreign-wiring", "capacity", "not-an-optimizer", "extra"]))
    def bad_checkpoint(self, bad):
        path = os.path.join(self.tmp.name, "bad.pt")
        save_checkpoint(path, self.model, self.optimizer, wiring=self.wiring)
        if bad == "truncated":
            with open(path, "rb") as file:
                data = file.read()
            with open(path, "wb") as file:
                file.write(data[: len(data) // 3])
            self.fails_and_changes_nothing(lambda: load_checkpoint(path, self.model, self.optimizer), CheckpointError)
        elif bad == "foreign-wiring":
            other = TinyEncoder(d_in=4, h1=3, h2=2, latent=2, cap1=CAP["h1"], cap2=CAP["h2"], dtype=torch.float64)
            self.fails_and_changes_nothing(
                lambda: load_checkpoint(path, self.model, self.optimizer, wiring=other.wiring()), CheckpointError
            )
        elif bad == "capacity":
            other = TinyEncoder(d_in=4, h1=3, h2=2, latent=2, cap1=CAP["h1"] + 1, cap2=CAP["h2"], dtype=torch.float64)
            torch.save(
                {**torch.load(path, weights_only=True), "model": other.state_dict()}, path
            )
            self.fails_and_changes_nothing(lambda: load_checkpoint(path, self.model, self.optimizer), CheckpointError)
        elif bad == "not-an-optimizer":
            scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, 1)
            self.fails_and_changes_nothing(lambda: Wiring(scheduler), TypeError)
        else:
            import numpy as np

            good = open(path, "rb").read()
            self.fails_and_changes_nothing(
                lambda: save_checkpoint(path, self.model, self.optimizer, extra={"lr": np.float64(0.1)}), TypeError
            )
            assert open(path, "rb").read() == good

    # ---- invariants ---------------------------------------------------------------------
    def check_outside_zero(self, layer, optimizer=None):
        for param in (layer.weight, layer.bias):
            mask = torch.ones(param.shape, dtype=torch.bool)
            mask[active_block(param)] = False
            tensors = {"value": param.detach(), "grad": param.grad}
            if optimizer is not None:
                for key, value in optimizer.state.get(param, {}).items():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim():
                        tensors[key] = value
            for what, tensor in tensors.items():
                if tensor is not None:
                    assert not tensor[mask].any(), f"{what} of a {tuple(param.shape)} parameter is nonzero outside its block"

    @invariant()
    def outside_the_block_is_zero(self):
        if hasattr(self, "model"):
            for layer in layers(self.model):
                self.check_outside_zero(layer, self.optimizer)

    @invariant()
    def widths_are_coupled_python_ints(self):
        if hasattr(self, "model"):
            m = self.model
            assert m.enc1.out_features == m.enc2.in_features == self.wiring.width("h1")
            assert m.enc2.out_features == m.mu.in_features == m.logvar.in_features == self.wiring.width("h2")
            assert all(type(w) is int for layer in layers(m) for w in (layer.in_features, layer.out_features))

    @invariant()
    def function_is_the_reference_network(self):
        if hasattr(self, "model"):
            with torch.no_grad():
                torch.testing.assert_close(self.model(self.x), reference_forward(active_copies(self.model), self.x), **TOL)


GrowthMachine.TestCase.settings = settings(
    max_examples=MAX_EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize="GROWDENSE_STATEFUL_EXAMPLES" not in os.environ,  # CI: the same sequences every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_growth_state_machine = GrowthMachine.TestCase
