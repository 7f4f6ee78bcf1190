"""Stateful property test for a transformer's widths: random grows, shrinks, permutations,
optimizer steps, ramp steps and failing calls on a one-block pre-norm transformer
(tests/transformer_helpers.py) through one Wiring.

After every step: outside every active part the weights, gradients and optimizer state are
zero; ``active_block`` finds every Parameter; the model equals the float64 reference of the
active parts (1e-10: float64 sums in another order, ~1e-15 relative on O(1) values; a wrong
block moves values by O(0.1)). A ``zero_out`` growth leaves the output unchanged (1e-12);
a call that raised changed nothing (bit for bit, the global RNG included).

Budget: ``GROWDENSE_STATEFUL_EXAMPLES`` sequences (default 6) of up to
``GROWDENSE_STATEFUL_STEPS`` steps (default 15).
"""

from __future__ import annotations

import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule  # noqa: E402

import growdense.optim  # noqa: E402
from growdense.norms import ramp_step  # noqa: E402
from grow_helpers import assert_same  # noqa: E402
from test_transformer_wiring import full_snapshot, loss_of  # noqa: E402
from transformer_helpers import (  # noqa: E402
    TinyGPT,
    assert_active_blocks,
    assert_outside_zero,
    reference_forward,
    tokens,
)

MAX_EXAMPLES = int(os.environ.get("GROWDENSE_STATEFUL_EXAMPLES", "6"))
STEPS = int(os.environ.get("GROWDENSE_STATEFUL_STEPS", "15"))
NAMES = st.sampled_from(["stream", "ffn0", "heads0"])
OPTIMIZERS = {
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    "growdense-adam": (growdense.optim.Adam, {"lr": 0.01}),
}


class TransformerMachine(RuleBasedStateMachine):
    @initialize(opt=st.sampled_from(sorted(OPTIMIZERS)), seed=st.integers(0, 2**16))
    def setup(self, opt, seed):
        torch.manual_seed(seed)
        self.model = TinyGPT(blocks=1)
        cls, kwargs = OPTIMIZERS[opt]
        self.optimizer = cls(self.model.parameters(), **kwargs)
        self.wiring = self.model.wiring(self.optimizer, optimizer_state="keep_global_step")
        self.toks = tokens(2, 4, seed)
        self.gen = torch.Generator().manual_seed(seed)

    @rule(name=NAMES, n=st.integers(0, 4), init=st.sampled_from(["he", "zero_out", "split"]))
    def grow(self, name, n, init):
        width, cap = self.wiring.width(name), self.wiring.capacity(name)
        if width + n > cap:
            self._fails(lambda: self.wiring.grow(name, n, init=init, generator=self.gen))
            return
        before = self.model(self.toks).detach()
        self.wiring.grow(name, n, init=init, generator=self.gen, **({"ramp_steps": 3} if init == "zero_out" else {}))
        if init == "zero_out":
            torch.testing.assert_close(self.model(self.toks), before, atol=1e-12, rtol=1e-12)

    @rule(name=NAMES, data=st.data())
    def shrink(self, name, data):
        width = self.wiring.width(name)
        to = data.draw(st.integers(1, width))
        keep = data.draw(st.sampled_from(["first", "norm", "indices"]))
        if keep == "indices":
            keep = data.draw(st.permutations(list(range(width))))[:to]
        self.wiring.shrink(name, to, keep=keep)

    @rule(name=NAMES, data=st.data())
    def permute(self, name, data):
        before = self.model(self.toks).detach()
        self.wiring.permute(name, data.draw(st.permutations(list(range(self.wiring.width(name))))))
        if not any(getattr(m, "ramping", False) for m in self.model.modules()):
            torch.testing.assert_close(self.model(self.toks), before, atol=1e-10, rtol=1e-10)

    @rule()
    def step(self):
        self.optimizer.zero_grad()
        loss_of(self.model, self.toks).backward()
        self.optimizer.step()
        ramp_step(self.model)

    @rule(name=NAMES, init=st.sampled_from(["bogus", "he-ramp"]))
    def bad_grow(self, name, init):
        if init == "bogus":
            self._fails(lambda: self.wiring.grow(name, 1, init="bogus"))
        else:
            self._fails(lambda: self.wiring.grow(name, 1, init="he", ramp_steps=2))

    def _fails(self, call):
        before = full_snapshot(self.model, self.optimizer)
        with pytest.raises((ValueError, TypeError)):
            call()
        assert_same(full_snapshot(self.model, self.optimizer), before)

    @invariant()
    def outside_is_zero_and_function_matches_reference(self):
        if not hasattr(self, "model"):
            return
        assert_outside_zero(self.model, self.optimizer)
        assert_active_blocks(self.model)
        torch.testing.assert_close(self.model(self.toks), reference_forward(self.model, self.toks),
                                   atol=1e-10, rtol=1e-10)


TransformerMachine.TestCase.settings = settings(
    max_examples=MAX_EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_transformer_widths = TransformerMachine.TestCase
