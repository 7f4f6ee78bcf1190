"""Growth triggered by the gradient (or a loss plateau), within a budget.

:class:`GradientTrigger` decides *when* a hidden width grows, where a
:class:`~growdense.GrowthSchedule` fixes the epochs in advance. Call
:meth:`GradientTrigger.apply` at the start of every epoch (as ``GrowthSchedule.apply``),
with the closure of the gradient-guided inits (see :meth:`growdense.Wiring.grow`); the
:class:`growdense.lightning.GrowthCallback` does this inside ``Trainer.fit``.

Criteria
--------

``"gradmax"``
    The GradMax score of each width below its target: the mean squared gradient norm the
    ``step`` new neurons' incoming weights would receive at GradMax's initialisation
    (``||Omega^T M||_F^2 / n``, outgoing columns at the existing neurons' mean norm) over
    the mean squared gradient norm of the existing neurons' incoming weights
    (``||dL/dW||_F^2 / width``). Above ``threshold`` (default 1: new neurons would learn
    faster than the average existing one) the width grows. One pass of the closure per
    width checked; no ``.grad`` changes.
``"plateau"``
    The width grows when the loss the caller passes (e.g. the last epoch's training loss)
    has decreased by less than ``threshold`` (relative) over the last ``patience`` checks.

Budget: each width grows by ``step`` up to ``target``; ``max_growths`` events in all;
``cooldown`` epochs at least between two events.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from ._checks import check_int
from .gradient_growth import collect_statistics, gradmax_slices, takes_closure
from . import protocol
from .wiring import Wiring

__all__ = ["GradientTrigger", "CRITERIA"]

CRITERIA = ("gradmax", "plateau")


def gradmax_score(wiring: Wiring, name: str, n: int, closure: Callable[[], Tensor], scale: float = 1.0) -> float:
    """The ``"gradmax"`` criterion for growing hidden width ``name`` by ``n`` (see the module docstring)."""
    producer, consumers = wiring.producer(name), wiring.consumers(name)
    stats = collect_statistics(producer, consumers, closure, weight_grad=True)
    new = gradmax_slices(producer, consumers, n, stats=stats, scale=scale, generator=torch.Generator().manual_seed(0))
    existing = stats.weight_grad_sq / max(1, stats.width)
    proposed = new.predicted / max(1, n)
    if existing == 0.0:
        return math.inf if proposed > 0 else 0.0
    return proposed / existing


class GradientTrigger:
    """Grow hidden widths when a criterion says it pays, within a budget.

    Args:
        step: ``{name: n}``, neurons added to a width at each of its growths.
        target: ``{name: width}``, the largest width each may reach (the budget per width).
        criterion: ``"gradmax"`` or ``"plateau"`` (see :mod:`growdense.triggers`).
        threshold: the criterion's threshold (default 1.0 for ``"gradmax"``, 0.01 for ``"plateau"``).
        patience: checks a plateau spans (``"plateau"``).
        cooldown: least number of epochs between two growths.
        max_growths: growth events in all (``None``: until every target is reached).
        check_every: check at epochs ``0, check_every, 2 * check_every, ...`` only.
        init: how new neurons start (see :meth:`growdense.Wiring.grow`); further keyword
            arguments are the init's options (``scale=``, ``bias=`` for ``"gradmax"``), checked
            at the first growth with the closure.
    """

    def __init__(
        self,
        step: Mapping[str, int],
        target: Mapping[str, int],
        *,
        criterion: str = "gradmax",
        threshold: Optional[float] = None,
        patience: int = 3,
        cooldown: int = 1,
        max_growths: Optional[int] = None,
        check_every: int = 1,
        init: str = "gradmax",
        **init_options: Any,
    ) -> None:
        if criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; expected one of {CRITERIA}")
        protocol.init_strategy(init)  # ValueError naming the registered ones
        self.step = {str(k): check_int(f"step[{k!r}]", v) for k, v in dict(step).items()}
        self.target = {str(k): check_int(f"target[{k!r}]", v) for k, v in dict(target).items()}
        if set(self.step) != set(self.target) or not self.step:
            raise ValueError(f"step and target must name the same hidden widths, got {sorted(self.step)} and "
                             f"{sorted(self.target)}")
        if any(v < 1 for v in self.step.values()):
            raise ValueError(f"every step must be >= 1, got {self.step}")
        self.criterion = criterion
        self.threshold = float(threshold if threshold is not None else (1.0 if criterion == "gradmax" else 0.01))
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"threshold must be finite and >= 0, got {threshold!r}")
        self.patience = check_int("patience", patience)
        self.cooldown = check_int("cooldown", cooldown)
        self.check_every = check_int("check_every", check_every)
        if self.patience < 1 or self.cooldown < 0 or self.check_every < 1:
            raise ValueError("patience and check_every must be >= 1, cooldown >= 0")
        self.max_growths = None if max_growths is None else check_int("max_growths", max_growths)
        self.init = init
        self.init_options = dict(init_options)
        self.growths = 0
        self.last_growth: Optional[int] = None
        self.losses: list[float] = []
        self.history: list[dict[str, Any]] = []

    def names(self) -> list[str]:
        return list(self.step)

    def exhausted(self, wiring: Wiring) -> bool:
        """Whether the budget is spent: every target reached, or ``max_growths`` events done."""
        if self.max_growths is not None and self.growths >= self.max_growths:
            return True
        return all(wiring.width(name) >= self.target[name] for name in self.step)

    def apply(
        self,
        epoch: int,
        wiring: Wiring,
        *,
        closure: Optional[Callable[[], Tensor]] = None,
        loss: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        optimizer_state: Optional[str] = None,
    ) -> bool:
        """Check the criterion at the start of ``epoch``; grow the widths it selects. ``True`` if any grew.

        ``closure``: the loss for the ``"gradmax"`` criterion and for gradient-guided inits.
        ``loss``: the value a ``"plateau"`` criterion tracks (recorded at every call).
        """
        epoch = check_int("epoch", epoch)
        if not isinstance(wiring, Wiring):
            raise TypeError(f"apply() needs a Wiring, got {type(wiring).__name__}")
        unknown = [name for name in self.step if name not in wiring.names()]
        if unknown:
            raise ValueError(f"the trigger's hidden widths {unknown} are not in the wiring {wiring.names()}")
        if loss is not None:
            self.losses.append(float(loss))
        if epoch % self.check_every or self.exhausted(wiring):
            return False
        if self.last_growth is not None and epoch - self.last_growth < self.cooldown:
            return False
        chosen: dict[str, int] = {}
        for name in self.step:
            n = min(self.step[name], self.target[name] - wiring.width(name), wiring.capacity(name) - wiring.width(name))
            if n <= 0:
                continue
            score = self._score(wiring, name, n, closure)
            fire = score > self.threshold if self.criterion == "gradmax" else score < self.threshold
            self.history.append({"epoch": epoch, "name": name, "criterion": self.criterion, "score": score,
                                 "grew": bool(fire)})
            if fire:
                chosen[name] = n
        if not chosen:
            return False
        policy = wiring.check_optimizer_state(optimizer_state, list(chosen), stacklevel=2)
        options = dict(self.init_options)
        if takes_closure(self.init):
            options["closure"] = closure
        wiring.grow_many(chosen, init=self.init, generator=generator, optimizer_state=policy, **options)
        self.growths += 1
        self.last_growth = epoch
        if self.criterion == "plateau":
            self.losses.clear()  # a new plateau is measured from the growth on
        return True

    def _score(self, wiring: Wiring, name: str, n: int, closure) -> float:
        if self.criterion == "gradmax":
            if closure is None:
                raise ValueError("the 'gradmax' criterion needs closure= (the loss on data you choose)")
            return gradmax_score(wiring, name, n, closure)
        if len(self.losses) <= self.patience:
            return math.inf  # not enough history: no plateau yet
        old, new = self.losses[-1 - self.patience], self.losses[-1]
        return (old - new) / max(abs(old), 1e-12)

    # ---- checkpoints --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"growths": self.growths, "last_growth": self.last_growth, "losses": list(self.losses),
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.growths = int(state["growths"])
        self.last_growth = None if state["last_growth"] is None else int(state["last_growth"])
        self.losses = [float(v) for v in state["losses"]]
        self.history = [dict(h) for h in state["history"]]

    def __repr__(self) -> str:
        return (f"GradientTrigger(step={self.step}, target={self.target}, criterion={self.criterion!r}, "
                f"threshold={self.threshold}, growths={self.growths})")
