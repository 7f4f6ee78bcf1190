"""``GrowthSchedule``: when hidden widths shrink and grow, by epoch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ._checks import check_int
from .policies import KEEP_CHOICES
from .wiring import Wiring

__all__ = ["GrowthEvent", "GrowthSchedule"]


@dataclass(frozen=True)
class GrowthEvent:
    """What happens at the start of (0-based) ``epoch``: first shrink, then grow.

    ``shrink_to`` maps hidden widths to the width they are cut to; ``grow_by`` maps hidden
    widths to the number of neurons then added.
    """

    epoch: int
    shrink_to: Mapping[str, int] = field(default_factory=dict)
    grow_by: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Checked and copied here, so an event that exists is one apply() can carry out.
        epoch = check_int("GrowthEvent epoch", self.epoch)
        if epoch < 0:
            raise ValueError(f"GrowthEvent epoch must be >= 0, got {epoch}")
        object.__setattr__(self, "epoch", epoch)
        for what, least in (("shrink_to", 1), ("grow_by", 0)):
            mapping = getattr(self, what)
            if not isinstance(mapping, Mapping):
                raise TypeError(f"GrowthEvent {what} must be a mapping {{name: int}}, got {type(mapping).__name__}")
            checked = {}
            for name, value in mapping.items():
                if not isinstance(name, str):
                    raise TypeError(f"GrowthEvent {what} keys must be hidden-width names (str), got {name!r}")
                value = check_int(f"GrowthEvent {what}[{name!r}]", value)
                if value < least:
                    raise ValueError(f"GrowthEvent {what}[{name!r}] must be >= {least}, got {value}")
                checked[name] = value
            object.__setattr__(self, what, checked)


def _ints(what: str, values: Sequence[int], count: int) -> list[int]:
    values = list(values)
    if len(values) != count:
        raise ValueError(f"{what} has {len(values)} values for {count} hidden widths")
    return [check_int(f"{what} values", value) for value in values]


class GrowthSchedule:
    """Hidden widths as a function of the epoch, and the events that change them.

    Build one with :meth:`grow_every` (the study's Approach 1) or :meth:`prune_then_regrow`
    (Approach 2), or directly from initial widths and :class:`GrowthEvent` s. At the start of
    each epoch call :meth:`apply`; it changes the wiring only at event epochs.

    Args:
        initial: ``{name: width}`` during epoch 0 (before any event).
        events: the events, at distinct epochs >= 0 (an event at epoch 0 applies at the
            start of training, before the first step).
    """

    def __init__(self, initial: Mapping[str, int], events: Sequence[GrowthEvent] = ()) -> None:
        self._initial = {}
        for name, width in dict(initial).items():
            if not isinstance(name, str):
                raise TypeError(f"hidden-width names must be str, got {name!r}")
            width = check_int(f"initial width of {name!r}", width)
            if width < 1:
                raise ValueError(f"initial width of {name!r} must be >= 1, got {width}")
            self._initial[name] = width
        events = list(events)
        for event in events:
            if not isinstance(event, GrowthEvent):
                raise TypeError(f"events must be GrowthEvents, got {type(event).__name__}")
        epochs = [event.epoch for event in events]
        if len(set(epochs)) != len(epochs):
            raise ValueError(f"two events share an epoch: {sorted(epochs)}")
        self._events = sorted(events, key=lambda event: event.epoch)
        widths = dict(self._initial)
        for event in self._events:
            for name in (*event.shrink_to, *event.grow_by):
                if name not in widths:
                    raise ValueError(f"event at epoch {event.epoch} names {name!r}, which has no initial width")
            for name, to in event.shrink_to.items():
                if not 1 <= to <= widths[name]:
                    raise ValueError(
                        f"event at epoch {event.epoch} shrinks {name!r} to {to}, but it is {widths[name]} wide"
                    )
                widths[name] = to
            for name, n in event.grow_by.items():
                widths[name] += n

    # ---- the study's two approaches ------------------------------------------------
    @classmethod
    def grow_every(
        cls,
        names: Sequence[str],
        start: Sequence[int],
        step: Sequence[int],
        target: Sequence[int],
        every: int,
    ) -> "GrowthSchedule":
        """Start at ``start``; every ``every`` epochs add ``step`` until ``target`` (Approach 1).

        Growth happens at the start of epochs ``every, 2*every, ...``; a width that would pass
        its target grows only up to it. ``grow_every(["h1", "h2"], (32, 16), (32, 16),
        (256, 128), 25)`` gives 32/16 during epochs 0-24, 64/32 during 25-49, ...,
        256/128 from epoch 175 (7 growths).
        """
        names = list(names)
        start, step, target = (_ints(w, v, len(names)) for w, v in (("start", start), ("step", step), ("target", target)))
        every = cls._check_every(every)
        for name, s, d, t in zip(names, start, step, target):
            if d < 1 or not 1 <= s <= t:
                raise ValueError(f"{name!r}: need step >= 1 and 1 <= start <= target, got {s}, {d}, {t}")
        return cls(dict(zip(names, start)), cls._regrow_events(names, start, step, target, every, every))

    @classmethod
    def prune_then_regrow(
        cls,
        names: Sequence[str],
        full: Sequence[int],
        cut_to: Sequence[int],
        step: Sequence[int],
        at: int,
        every: int,
    ) -> "GrowthSchedule":
        """Start at ``full``; at epoch ``at`` cut to ``cut_to`` and regrow by ``step`` (Approach 2).

        At the start of epoch ``at`` each width is shrunk to ``cut_to`` and, in the same
        event, grown by ``step``; then it grows by ``step`` every ``every`` epochs until
        ``full``. ``prune_then_regrow(["h1", "h2"], (256, 128), (32, 16), (32, 16), at=25,
        every=25)`` gives 256/128 during epochs 0-24, 64/32 during 25-49, ..., 256/128 from
        epoch 175 (Table 2 of the study).
        """
        names = list(names)
        full, cut_to, step = (_ints(w, v, len(names)) for w, v in (("full", full), ("cut_to", cut_to), ("step", step)))
        every = cls._check_every(every)
        at = check_int("at", at)
        if at < 0:
            raise ValueError(f"at must be >= 0, got {at!r}")
        for name, f, c, d in zip(names, full, cut_to, step):
            if d < 1 or not 1 <= c <= f:
                raise ValueError(f"{name!r}: need step >= 1 and 1 <= cut_to <= full, got {f}, {c}, {d}")
        events = cls._regrow_events(names, cut_to, step, full, at, every)
        cut = dict(zip(names, cut_to))
        if events and events[0].epoch == at:
            events[0] = GrowthEvent(at, cut, events[0].grow_by)
        else:
            events.insert(0, GrowthEvent(at, cut, {}))
        return cls(dict(zip(names, full)), events)

    @staticmethod
    def _check_every(every: int) -> int:
        every = check_int("every", every)
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every!r}")
        return every

    @staticmethod
    def _regrow_events(names, start, step, target, first: int, every: int) -> list[GrowthEvent]:
        widths = dict(zip(names, start))
        events, epoch = [], first
        while any(widths[n] < t for n, t in zip(names, target)):
            grow = {}
            for name, d, t in zip(names, step, target):
                n = min(d, t - widths[name])
                if n > 0:
                    grow[name] = n
                    widths[name] += n
            events.append(GrowthEvent(epoch, {}, grow))
            epoch += every
        return events

    # ---- queries ---------------------------------------------------------------------
    @property
    def events(self) -> list[GrowthEvent]:
        """The events, by epoch."""
        return list(self._events)

    def names(self) -> list[str]:
        return list(self._initial)

    def initial_widths(self) -> dict[str, int]:
        """Widths during epoch 0, before any event (build the model at these)."""
        return dict(self._initial)

    def widths_at(self, epoch: int) -> dict[str, int]:
        """The widths in effect during (0-based) ``epoch``, after that epoch's event."""
        widths = dict(self._initial)
        for event in self._events:
            if event.epoch > epoch:
                break
            widths.update(event.shrink_to)
            for name, n in event.grow_by.items():
                widths[name] += n
        return widths

    def growth_epochs(self) -> list[int]:
        """The epochs at whose start the widths change."""
        return [event.epoch for event in self._events]

    def event_at(self, epoch: int) -> Optional[GrowthEvent]:
        """The event at the start of ``epoch``, or ``None``."""
        for event in self._events:
            if event.epoch == epoch:
                return event
        return None

    def __repr__(self) -> str:
        return f"GrowthSchedule(initial={self._initial}, events={self._events})"

    # ---- applying -------------------------------------------------------------------
    def apply(
        self,
        epoch: int,
        wiring: Wiring,
        *,
        init: str = "he",
        keep: Union[str, Sequence[int], Tensor, Mapping[str, Union[str, Sequence[int], Tensor]]] = "first",
        generator: Optional[torch.Generator] = None,
        split_noise: float = 1e-2,
        optimizer_state: Optional[str] = None,
        **init_options: Any,
    ) -> bool:
        """Apply the event at the start of ``epoch`` to ``wiring``; ``True`` if it changed the wiring.

        ``True`` whenever the event shrinks a width or adds neurons, also when a cut and
        the regrowth in the same event end at the width of the epoch before (the cut
        neurons were replaced by new ones); ``False`` at an epoch without an event (and
        for an event whose every action is a no-op: shrinking to the current width, growing
        by 0). Call it at the start of every epoch (``epoch >= 0``). At an event epoch the wiring must hold the
        widths of the epoch before (``widths_at(epoch - 1)``, or the initial widths); it
        then holds ``widths_at(epoch)``. Shrinks use ``keep``, then growths use ``init`` and
        ``generator``, names in schedule order. Everything is validated before anything
        changes. ``keep`` may be a mapping ``{name: keep}`` to choose per hidden width
        (names it leaves out keep ``"first"``). ``optimizer_state`` is the policy of every
        shrink and growth of the event (default: the wiring's ``optimizer_state``, itself
        ``"keep"`` by default; ``"reset"`` restarts the optimizer as newly built, as the
        study did; see :mod:`growdense.optim_state`). Further keyword arguments go to the
        init strategy (see :meth:`Wiring.grow`).
        """
        # Validate the arguments at every call (not only at event epochs), then the whole
        # event: nothing changes unless every action of the event is valid.
        epoch = check_int("epoch", epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0 (0-based, the epoch about to start), got {epoch}")
        if not isinstance(wiring, Wiring):
            raise TypeError(f"apply() needs a Wiring, got {type(wiring).__name__}")
        wiring.check_init(init, generator=generator, split_noise=split_noise, **init_options)
        for policy in keep.values() if isinstance(keep, Mapping) else (keep,):
            if isinstance(policy, str) and policy not in KEEP_CHOICES:
                raise ValueError(f"unknown keep {policy!r}; expected one of {KEEP_CHOICES} or a sequence of indices")
        if isinstance(keep, Mapping) and not set(keep) <= set(self._initial):
            raise ValueError(f"keep names {sorted(set(keep) - set(self._initial))} are not in the schedule {self.names()}")
        event = self.event_at(epoch)
        if event is None:
            return False
        before = self.widths_at(epoch - 1) if epoch > 0 else self.initial_widths()
        actual = {name: wiring.width(name) for name in self._initial}  # KeyError if unknown
        if actual != before:
            raise RuntimeError(
                f"the wiring's widths {actual} are not the schedule's widths {before} before epoch {epoch}; "
                f"build the model at schedule.widths_at(epoch - 1) (or restore it from a checkpoint)"
            )
        # Validate the whole event first: shrinks against current widths, growths against
        # the widths after the shrinks.
        keeps = {
            name: (keep.get(name, "first") if isinstance(keep, Mapping) else keep) for name in event.shrink_to
        }
        policy = wiring.check_optimizer_state(
            optimizer_state, [n for n, k in event.grow_by.items() if k > 0], stacklevel=3
        )
        for name, to in event.shrink_to.items():
            wiring.check_shrink(name, to, keeps[name])
        for name, n in event.grow_by.items():
            wiring.check_grow(name, 0, init, generator=generator, split_noise=split_noise, **init_options)  # capacity below
            after_shrink = event.shrink_to.get(name, before[name])
            if after_shrink + n > wiring.capacity(name):
                raise ValueError(
                    f"epoch {epoch}: growing {name!r} to {after_shrink + n} exceeds its capacity {wiring.capacity(name)}"
                )
        for name, to in event.shrink_to.items():
            wiring.shrink(name, to, keep=keeps[name], optimizer_state=policy)
        # one call: a strategy that can (init="gradmax") grows every width from one pass of its closure
        wiring.grow_many(event.grow_by, init=init, generator=generator, split_noise=split_noise,
                         optimizer_state=policy, **init_options)
        # A cut and a regrowth back to the same width changed the network all the same.
        changed = any(to < before[name] for name, to in event.shrink_to.items())
        return changed or any(n > 0 for n in event.grow_by.values())
