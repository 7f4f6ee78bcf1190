"""The built-in init strategies of a growth, registered by name (see :mod:`growdense.protocol`).

``Wiring.grow(name, n, init=...)`` looks the strategy up with
:func:`growdense.protocol.init_strategy`; a new one is added with
:func:`growdense.protocol.register_init` from any module, without editing the wiring.
What each built-in writes is described in :mod:`growdense.policies`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from . import protocol
from ._checks import check_nonnegative_real
from .protocol import CONSUMER, PRODUCER, RIDER, Change, Slice, element_index

__all__ = ["GROW_INITS", "HeInit", "ZeroOutInit", "SplitInit", "check_init", "check_options"]


def _he_std(fan_in: int) -> float:
    return math.sqrt(2.0 / fan_in)


def check_options(strategy: str, options: dict, allowed: tuple[str, ...]) -> None:
    """Raise ``TypeError`` naming any option of ``options`` that ``strategy`` does not take."""
    extra = sorted(set(options) - set(allowed))
    if extra:
        takes = f"it takes {list(allowed)}" if allowed else "it takes none"
        raise TypeError(f"init={strategy!r} got unexpected option(s) {extra}; {takes}")


def _check_common(change: Change) -> None:
    gen = change.generator
    if gen is not None and not isinstance(gen, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(gen).__name__}")


class HeInit:
    """``"he"``: He-normal incoming and outgoing weights, declared values elsewhere (the study's)."""

    name = "he"
    outgoing_zero = False
    options: tuple[str, ...] = ()
    writes_only_data = True

    def check(self, change: Change, **options: Any) -> None:
        _check_common(change)
        options.pop("split_noise", None)  # accepted (and unused) by every built-in, as before
        check_options(self.name, options, self.options)

    def apply_(self, change: Change, **options: Any) -> None:
        for s in change.slices:
            role = s.role
            if role == RIDER or role == CONSUMER and self.outgoing_zero:
                continue  # a rider: its declared value or zero; zero outgoing weights: zero already
            if s.declared(self.name) is not None:
                continue  # written from the declaration
            s.normal_(_he_std(s.fan_in), change.generator)


class ZeroOutInit(HeInit):
    """``"zero_out"``: He-normal incoming weights, zero outgoing ones: the function is unchanged.

    Option ``ramp_steps`` (an int >= 1): how many ``ramp_step`` calls a growable norm on the
    width takes to bring its new features in (default: the norm's ``ramp_steps``).
    """

    name = "zero_out"
    outgoing_zero = True
    options = ("ramp_steps",)

    def check(self, change: Change, **options: Any) -> None:
        super().check(change, **options)
        if "ramp_steps" in options:
            steps = options["ramp_steps"]
            if isinstance(steps, bool) or not isinstance(steps, int):
                raise TypeError(f"ramp_steps must be an int, got {type(steps).__name__}")
            if steps < 1:
                raise ValueError(f"ramp_steps must be >= 1, got {steps}")


class SplitInit:
    """``"split"``: Net2WiderNet. New units copy sources' producer and rider slices; consumers split."""

    name = "split"
    writes_only_data = True

    def check(self, change: Change, **options: Any) -> None:
        _check_common(change)
        options = dict(options)
        if "split_noise" in options:
            check_nonnegative_real("split_noise", options.pop("split_noise"))
        check_options(self.name, options, ("split_noise",))
        if change.n and change.start == 0:
            raise ValueError(f"init='split' cannot grow {change.name!r} from width 0: there is no neuron to copy")

    def apply_(self, change: Change, **options: Any) -> None:
        split_noise = float(options.get("split_noise", 1e-2))
        width, n = change.start, change.n
        first = change.slices[0].tensor
        sources = _split_sources(width, n, first.device, change.generator)
        new = torch.arange(width, width + n, device=first.device)
        for s in change.slices:
            if s.role in (PRODUCER, RIDER):
                _copy_units_(s, sources, new)
        for s in change.slices:
            if s.role == CONSUMER:
                _split_consumer_(s, sources, new, width, n, split_noise, change.generator)


def _restrict(s: Slice, dim_index: Tensor) -> tuple:
    """An index of ``s.tensor``: ``dim_index`` along the axis, the active extent elsewhere."""
    idx: list[Any] = [slice(0, e) for e in s.extent]
    idx[s.axis.dim] = dim_index
    return tuple(idx)


def _copy_units_(s: Slice, sources: Tensor, new: Tensor) -> None:
    t = s.tensor
    src = element_index(s.axis, s.capacity, sources.to(t.device))
    dst = element_index(s.axis, s.capacity, new.to(t.device))
    values = t.index_select(s.axis.dim, src)[_restrict(s, slice(None))]
    t[_restrict(s, dst)] = values


def _split_consumer_(s: Slice, sources, new, width, n, split_noise, generator) -> None:
    t = s.tensor
    sources, new = sources.to(t.device), new.to(t.device)
    before = list(s.extent)
    before[s.axis.dim] = width * s.axis.unit
    old = t[tuple(slice(0, e) for e in before)]
    scale = split_noise * float(old.std()) if old.numel() > 1 else 0.0
    rest = _restrict(s, slice(None))
    # Sources may repeat (n > width): split sequentially, one distinct round at a time.
    for lo in range(0, n, width):
        src = element_index(s.axis, s.capacity, sources[lo : lo + width])
        dst = element_index(s.axis, s.capacity, new[lo : lo + width])
        half = t.index_select(s.axis.dim, src)[rest] * 0.5
        draw_on = generator.device if generator is not None else t.device
        noise = torch.randn(half.shape, generator=generator, device=draw_on, dtype=t.dtype).to(t.device) * scale
        t[_restrict(s, src)] = half + noise
        t[_restrict(s, dst)] = half - noise


def _split_sources(width: int, n: int, device: torch.device, generator: Optional[torch.Generator]) -> Tensor:
    """``n`` source indices in ``[0, width)``: distinct within each round of ``width``."""
    draw_on = generator.device if generator is not None else device
    rounds = [
        torch.randperm(width, generator=generator, device=draw_on)[: min(width, n - lo)] for lo in range(0, n, width)
    ]
    return torch.cat(rounds).to(device) if rounds else torch.empty(0, dtype=torch.long, device=device)


for _strategy in (HeInit(), ZeroOutInit(), SplitInit()):
    if _strategy.name not in protocol.init_names():
        protocol.register_init(_strategy)

#: The built-in strategies (more may be registered: :func:`growdense.protocol.init_names`).
GROW_INITS = ("he", "zero_out", "split")


def check_init(init: object) -> None:
    """Raise ``ValueError`` unless ``init`` names a registered strategy."""
    protocol.init_strategy(init)
