"""``Wiring``: coupled growth and shrinking of hidden widths across ``GrowLinear`` layers."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import init_strategies as _builtin_inits  # noqa: F401  (registers "he", "zero_out", "split")
from . import optim_state, protocol, sharded
from ._checks import check_int
from .policies import KEEP_CHOICES, Keep, check_generator, check_split_noise
from .policies import kept_indices, permutation
from .protocol import CONSUMER, PRODUCER, RIDER, Change, Member, Slice

__all__ = ["Wiring", "KEEP_CHOICES"]


@dataclass(frozen=True)
class _Hidden:
    """A width group: every (module, module-local width) riding it, producers first."""

    members: tuple[Member, ...]

    @property
    def producer(self):
        return self.members[0].module

    @property
    def consumers(self) -> tuple:
        return tuple(m.module for m in self.members if CONSUMER in m.roles)

    def layers(self) -> tuple:
        seen: dict[int, object] = {}
        for m in self.members:
            seen.setdefault(id(m.module), m.module)
        return tuple(seen.values())


def _role_name(role: str) -> str:
    return "+".join({PRODUCER: "producer", CONSUMER: "consumer", RIDER: "rider"}[r] for r in role.split("+"))


def _check_optimizer(optimizer: object) -> Optional[torch.optim.Optimizer]:
    """``optimizer`` unless it is neither ``None`` nor a ``torch.optim.Optimizer``."""
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        hint = ""
        if hasattr(optimizer, "optimizer") and isinstance(getattr(optimizer, "optimizer"), torch.optim.Optimizer):
            hint = " (this looks like a learning-rate scheduler: pass its .optimizer)"
        raise TypeError(
            f"Wiring needs a torch.optim.Optimizer (or None), got {type(optimizer).__name__}{hint}"
        )
    return optimizer


class _Event:
    """What one call of a :class:`Wiring` reads again and again, read once.

    Each module's declared tensors (:func:`growdense.protocol.members_of`), each
    (module, width)'s capacity, which layers were checked, and every tensor found writable
    with its version then (before anything changed: :meth:`untouched`). Valid for one call
    only: between calls a module may replace its tensors. Keys are the ids of objects the
    wiring holds, alive for the whole call. Gradients and optimizer state are read again
    where they are written: a strategy's closure may create them.
    """

    __slots__ = ("_tensors", "_riding", "_caps", "_states", "resizable", "writable")

    def __init__(self) -> None:
        self._tensors: dict[int, list[tuple[protocol.TensorSpec, Tensor]]] = {}
        self._riding: dict[tuple[int, str], list[tuple[protocol.TensorSpec, protocol.Axis, Tensor]]] = {}
        self._caps: dict[tuple[int, str], int] = {}
        self._states: dict[int, list] = {}  # id(param) -> [its state dict, its size, keyed tensors, fresh values]
        self.resizable: set[int] = set()  # ids of layers found sharing no Parameter
        self.writable: dict[int, tuple[Tensor, int]] = {}  # id -> (tensor, its version when checked)

    def _state_entry(self, optimizer: Optional[torch.optim.Optimizer], param: Tensor) -> list:
        """``[state dict, its size, keyed state tensors, fresh values or None]`` of ``param``, read
        again if its state dict was replaced or changed size since (a strategy's closure may create state)."""
        state = optimizer.state.get(param) if optimizer is not None else None
        entry = self._states.get(id(param))
        if entry is None or entry[0] is not state or entry[1] != (len(state) if state else 0):
            keyed = optim_state._keyed_state_tensors(optimizer, param, state) if state else []
            entry = self._states[id(param)] = [state, len(state) if state else 0, keyed, None]
        return entry

    def state_tensors(self, optimizer: Optional[torch.optim.Optimizer], param: Tensor) -> list[tuple[str, Tensor]]:
        """:func:`growdense.optim_state._keyed_state_tensors`, read once per call."""
        return self._state_entry(optimizer, param)[2]

    def fresh_state(self, optimizer: Optional[torch.optim.Optimizer], param: Tensor) -> list[tuple[Tensor, Any]]:
        """:func:`growdense.optim_state.fresh_state_tensors`, read once per call."""
        entry = self._state_entry(optimizer, param)
        if entry[3] is None:
            entry[3] = optim_state.fresh_state_tensors(optimizer, param, entry[2])
        return entry[3]

    def untouched(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` was checked writable in this call and nothing wrote it since
        (``Tensor._version``, autograd's count of in-place writes, unchanged)."""
        entry = self.writable.get(id(tensor))
        return entry is not None and entry[0] is tensor and entry[1] == tensor._version

    def members_of(self, module: nn.Module) -> list[tuple[protocol.TensorSpec, Tensor]]:
        found = self._tensors.get(id(module))
        if found is None:
            found = self._tensors[id(module)] = list(protocol.members_of(module))
        return found

    def riding(self, module: nn.Module, width: str) -> list[tuple[protocol.TensorSpec, protocol.Axis, Tensor]]:
        """``(spec, axis, tensor)`` for each of the module's declared tensors riding module-local ``width``."""
        key = (id(module), width)
        found = self._riding.get(key)
        if found is None:
            found = []
            for spec, axis in module.growth_spec().riding(width):  # type: ignore[attr-defined]
                if found and found[-1][0] is spec:
                    continue  # a tensor rides a width along its first such axis (TensorSpec.axis)
                tensor = protocol.tensor_of(module, spec)
                if tensor is not None:
                    found.append((spec, axis, tensor))
            self._riding[key] = found
        return found

    def capacity(self, module: nn.Module, width: str) -> int:
        """:func:`growdense.protocol.capacity`, from the cached tensors."""
        key = (id(module), width)
        cap = self._caps.get(key)
        if cap is None:
            caps = [tensor.shape[a.dim] // (a.unit * a.blocks) for _, a, tensor in self.riding(module, width)]
            if not caps:
                raise ValueError(f"{type(module).__name__} has no tensor on width {width!r}")
            cap = self._caps[key] = min(caps)
        return cap

    def hidden_capacity(self, hidden: "_Hidden") -> int:
        """The smallest capacity among the width's members."""
        key = (id(hidden), None)
        cap = self._caps.get(key)
        if cap is None:
            cap = self._caps[key] = min(self.capacity(m.module, m.width) for m in hidden.members)
        return cap

    def axes(self, hidden: "_Hidden"):
        """``(member, spec, axis, tensor, capacity)`` for every tensor riding the width."""
        out = []
        for m in hidden.members:
            cap = self.capacity(m.module, m.width)
            for spec, axis, tensor in self.riding(m.module, m.width):
                out.append((m, spec, axis, tensor, cap))
        return out


class Wiring:
    """Which GrowLinear produces each hidden width and which GrowLinears consume it.

    A hidden width named ``name`` is the output of one ``producer`` (its rows) and the
    input of every ``consumer`` (their columns); one producer may feed several consumers
    (e.g. a VAE's last encoder layer feeds the mean and the log-variance heads).
    :meth:`grow` and :meth:`shrink` change the producer's rows, every consumer's columns,
    their gradients and, when :attr:`optimizer` is set, the optimizer's state for those
    slices, all together. Every argument is validated before anything changes, so a call
    that raises leaves the layers and the optimizer as they were.

    The wiring holds references to the layers, not copies: use it with any module (the
    layers may live anywhere in it, including inside ``DistributedDataParallel``).

    Args:
        optimizer: optimizer whose state follows the changes (settable later as
            ``wiring.optimizer``). State tensors shaped like their parameter are edited in
            place: new and removed slices get the optimizer's fresh values (zero, but
            Adagrad's initial accumulator and Rprop's initial step size), permutations are
            applied, everything else is left bit-identical (see ``optimizer_state`` for
            Adam's step count and a full restart). Optimizers whose
            state cannot be kept right (LBFGS, Adafactor, SparseAdam, state not shaped like
            its parameter) are refused here: see
            :func:`growdense.optim_state.check_attachable`.
        optimizer_state: the default optimizer-state policy of :meth:`grow` and
            :meth:`shrink`: ``"keep"``, ``"reset"`` or ``"keep_global_step"`` (see
            :mod:`growdense.optim_state`). ``None`` (default): ``"keep"`` where the
            optimizer can give new neurons exactly its fresh state, else
            ``"keep_global_step"`` with a warning; an explicit ``"keep"`` raises instead.
        broadcast_from: under ``torch.distributed``, the rank whose new weights every rank
            receives after each :meth:`grow` (a broadcast of the changed layers'
            parameters). ``None`` (default): no communication; give every rank a generator
            with the same seed instead.
        process_group: process group for that broadcast (default: the world).
    """

    def __init__(
        self,
        optimizer: Optional[torch.optim.Optimizer] = None,
        *,
        broadcast_from: Optional[int] = None,
        process_group: Optional[object] = None,
        optimizer_state: Optional[str] = None,
    ) -> None:
        self.optimizer = optimizer
        if broadcast_from is not None:
            broadcast_from = check_int("broadcast_from", broadcast_from)
            if broadcast_from < 0:
                raise ValueError(f"broadcast_from must be a rank >= 0 or None, got {broadcast_from}")
        self.optimizer_state = None if optimizer_state is None else optim_state.check_policy(optimizer_state)
        self.broadcast_from = broadcast_from
        self.process_group = process_group
        self._hidden: dict[str, _Hidden] = {}

    @property
    def optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The optimizer whose state follows the changes (``None``: no optimizer)."""
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer: Optional[torch.optim.Optimizer]) -> None:
        optimizer = _check_optimizer(optimizer)
        optim_state.check_attachable(optimizer)  # refuses what growdense cannot keep right
        self._optimizer = optimizer

    @classmethod
    def chain(
        cls,
        layers: Sequence[nn.Module],
        names: Optional[Sequence[str]] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        **kwargs,
    ) -> "Wiring":
        """The wiring of an MLP: hidden width ``i`` is ``layers[i]``'s output and ``layers[i+1]``'s input.

        ``names`` defaults to ``"h1"``, ``"h2"``, ... (``len(layers) - 1`` of them).
        """
        layers = list(layers)
        if names is None:
            names = [f"h{i + 1}" for i in range(len(layers) - 1)]
        if len(names) != len(layers) - 1:
            raise ValueError(f"{len(layers)} layers have {len(layers) - 1} hidden widths, got {len(names)} names")
        wiring = cls(optimizer, **kwargs)
        for i, name in enumerate(names):
            wiring.add(name, layers[i], [layers[i + 1]])
        return wiring

    def _policy(self, optimizer_state: Optional[str]) -> str:
        """The policy of a shrink (``None``: the wiring's, else ``"keep"``)."""
        chosen = optimizer_state if optimizer_state is not None else self.optimizer_state
        return optim_state.check_policy("keep" if chosen is None else chosen)

    def check_optimizer_state(
        self, optimizer_state: Optional[str] = None, names: Optional[Sequence[str]] = None, *, stacklevel: int = 2
    ) -> str:
        """Validate the optimizer-state policy of growing ``names`` (default: all); return the one to apply.

        ``None`` means the wiring's :attr:`optimizer_state`. An explicit ``"keep"`` raises
        unless the optimizer can give new neurons exactly its fresh state
        (:func:`growdense.optim_state.check_keep`); when neither names a policy, that case
        warns and gives ``"keep_global_step"``.
        """
        return self._growth_policy(optimizer_state, names, _Event(), stacklevel + 2)

    def _growth_policy(
        self, optimizer_state: Optional[str], names: Optional[Sequence[str]], event: _Event, stacklevel: int
    ) -> str:
        """:meth:`check_optimizer_state`; a warning goes ``stacklevel`` frames up."""
        chosen = optimizer_state if optimizer_state is not None else self.optimizer_state
        policy = optim_state.check_policy("keep" if chosen is None else chosen)
        if policy != "keep":
            return policy
        hiddens = [self._get(name) for name in (self.names() if names is None else names)]
        if self.optimizer is None:
            return policy
        seen: set[int] = set()
        params = []
        for hidden in hiddens:
            for layer in hidden.layers():
                if id(layer) in seen:
                    continue
                seen.add(id(layer))
                params += [t for _, t in event.members_of(layer) if isinstance(t, nn.Parameter)]
        problem = optim_state.keep_problem(self.optimizer, params)
        if problem is None:
            return policy
        if chosen is not None:
            raise ValueError(problem)
        warnings.warn(
            f"{problem}. Growing with optimizer_state='keep_global_step' instead; pass optimizer_state to "
            f"grow(), GrowthSchedule.apply() or Wiring() to choose (and silence this warning)",
            UserWarning,
            stacklevel=stacklevel,
        )
        return "keep_global_step"

    # ---- registration ----------------------------------------------------------------
    def add(self, name: str, producer, consumers: Sequence) -> None:
        """Register hidden width ``name``: ``producer``'s output feeds each of ``consumers``.

        Any growable module (:mod:`growdense.protocol`) fits: the producer's width is its
        only module-local width in the producer role (GrowLinear: ``"out"``), a
        consumer's its only one in the consumer role (``"in"``). For riders, or modules
        with several such widths, use :meth:`add_width`.
        """
        if isinstance(consumers, nn.Module):
            raise TypeError(f"{name!r}: consumers must be a sequence of growable modules; wrap a single one in a list")
        consumers = tuple(consumers)
        for layer in (producer, *consumers):
            if not protocol.is_growable(layer):
                raise TypeError(
                    f"{name!r}: producer and consumers must be growable modules (GrowLinear, or a module "
                    f"following growdense.protocol), got {type(layer).__name__}"
                )
        if not consumers:
            raise ValueError(f"{name!r}: a hidden width needs at least one consumer")
        members = [(producer, self._only_width(name, producer, PRODUCER))]
        members += [(c, self._only_width(name, c, CONSUMER)) for c in consumers]
        self.add_width(name, members)

    @staticmethod
    def _only_width(name: str, module: nn.Module, role: str) -> str:
        width = module.growth_spec().width_with_role(role)  # type: ignore[attr-defined]
        if width is None:
            raise TypeError(
                f"{name!r}: {type(module).__name__} has no single width in the {role} role; "
                f"name its width with Wiring.add_width(name, [(module, width), ...])"
            )
        return width

    def add_width(self, name: str, members: Sequence[Union[tuple[nn.Module, str], nn.Module]]) -> None:
        """Register width ``name`` as the group of ``(module, module-local width)`` pairs riding it.

        A module with a single width (a norm, an embedding) may be listed alone. Each
        member's roles (producer, consumer, rider; an attention's ``"heads"`` and
        ``"embed_dim"`` play two) are its module's declaration. The group may hold any
        number of each, but needs a consumer, or a producer and a rider. Every member must
        have the same active width. A residual stream, for example::

            wiring.add_width("stream", [
                model.embed,                                   # its columns (rider)
                *blocks_norms,                                 # weight and bias (riders)
                (block.attn, "embed_dim"),                     # q/k/v columns, out_proj rows
                (block.fc1, "in"), (block.fc2, "out"),         # the FFN reads and writes it
                model.norm, (model.head, "in"),                # the final norm and the LM head
            ])
        """
        optim_state.check_attachable(self.optimizer)  # its state may have changed since it was set
        if not isinstance(name, str) or not name:
            raise TypeError(f"a hidden width's name must be a non-empty str, got {name!r}")
        if name in self._hidden:
            raise ValueError(f"hidden width {name!r} is already registered")
        group = []
        for entry in members:
            if isinstance(entry, nn.Module) and protocol.is_growable(entry):
                widths = entry.growth_spec().widths  # type: ignore[operator]
                if len(widths) != 1:
                    raise TypeError(
                        f"{name!r}: {type(entry).__name__} has widths {list(widths)}; list it as "
                        f"({type(entry).__name__.lower()}, width) with the one riding {name!r}"
                    )
                entry = (entry, widths[0])
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise TypeError(f"{name!r}: members are (module, width) pairs, got {entry!r}")
            module, width = entry
            if not protocol.is_growable(module):
                raise TypeError(f"{name!r}: {type(module).__name__} does not follow growdense.protocol")
            spec = module.growth_spec()
            if width not in spec.widths:
                raise ValueError(f"{name!r}: {type(module).__name__} has widths {list(spec.widths)}, not {width!r}")
            group.append(Member(module, width))
        if len({(id(m.module), m.width) for m in group}) != len(group):
            raise ValueError(f"{name!r}: the same consumer is listed twice")
        roles = {r for m in group for r in m.roles}
        if CONSUMER not in roles and not (PRODUCER in roles and RIDER in roles):
            raise ValueError(f"{name!r}: a hidden width needs at least one consumer")
        seen: dict[int, Member] = {}
        for m in group:
            first = seen.setdefault(id(m.module), m)
            if first is not m:  # one module on the width twice, through two of its widths
                if {first.roles, m.roles} == {(PRODUCER,), (CONSUMER,)}:
                    raise ValueError(f"{name!r}: a layer cannot consume its own output")
                raise ValueError(
                    f"{name!r}: {type(m.module).__name__} is listed with two of its widths "
                    f"({first.width!r} and {m.width!r}); a module rides a width through one of them"
                )
        for other, hidden in self._hidden.items():
            for m in group:
                if any(o.module is m.module and o.width == m.width for o in hidden.members):
                    verb = {PRODUCER: "this producer already produces", CONSUMER: "a consumer already consumes",
                            RIDER: "a rider already rides"}[m.roles[0]]
                    raise ValueError(f"{name!r}: {verb} hidden width {other!r}")
        widths = {m.module.active_width(m.width) for m in group}
        if len(widths) != 1:
            first = group[0]
            for m in group[1:]:
                if m.module.active_width(m.width) != first.module.active_width(first.width):
                    raise ValueError(
                        f"{name!r}: producer has out_features={first.module.active_width(first.width)} but a "
                        f"{_role_name(m.role)} has {_feature_name(m)}={m.module.active_width(m.width)}; they must match"
                    )
        # producers first, then consumers, then riders (the order strategies draw in)
        order = {PRODUCER: 0, CONSUMER: 1, RIDER: 2}
        self._hidden[name] = _Hidden(tuple(sorted(group, key=lambda m: order[m.roles[0]])))

    def names(self) -> list[str]:
        """The registered hidden widths, in registration order."""
        return list(self._hidden)

    def producer(self, name: str):
        return self._get(name).producer

    def consumers(self, name: str) -> list:
        return list(self._get(name).consumers)

    def members(self, name: str) -> list[tuple[nn.Module, str, str]]:
        """``(module, module-local width, role)`` for every member of width ``name``."""
        return [(m.module, m.width, m.role) for m in self._get(name).members]

    def width(self, name: str) -> int:
        """The active width of hidden width ``name`` (its first member's, e.g. the producer's ``out_features``)."""
        m = self._get(name).members[0]
        return m.module.active_width(m.width)

    def widths(self) -> dict[str, int]:
        """``{name: width}`` for every hidden width."""
        return {name: self.width(name) for name in self._hidden}

    def capacity(self, name: str) -> int:
        """The largest width ``name`` can grow to: the smallest capacity among its coupled layers."""
        return min(protocol.capacity(m.module, m.width) for m in self._get(name).members)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={self.width(n)}/{self.capacity(n)}" for n in self._hidden)
        return f"Wiring({parts})"

    # ---- validation ----------------------------------------------------------------
    def _get(self, name: str) -> _Hidden:
        try:
            return self._hidden[name]
        except (KeyError, TypeError):
            raise KeyError(f"unknown hidden width {name!r}; registered: {self.names()}") from None

    def _check_synced(self, name: str) -> _Hidden:
        hidden = self._get(name)
        first = hidden.members[0]
        width = first.module.active_width(first.width)
        for m in hidden.members[1:]:
            if m.module.active_width(m.width) != width:
                raise RuntimeError(
                    f"hidden width {name!r} is out of sync: producer out_features={width}, {_role_name(m.role)} "
                    f"{_feature_name(m)}={m.module.active_width(m.width)} (was a layer resized outside the Wiring?)"
                )
        return hidden

    def _check_resizable(self, name: str, event: Optional[_Event] = None) -> _Hidden:
        """The hidden width, if its layers agree and none shares a Parameter with another layer."""
        hidden = self._check_synced(name)
        for layer in hidden.layers():
            if event is not None:
                if id(layer) in event.resizable:
                    continue
                event.resizable.add(id(layer))  # only read again after this check passed (or the call raised)
            for pname, param in layer._parameters.items():
                if param is None:
                    continue
                others = protocol.other_holders(param, layer)
                if others:
                    raise RuntimeError(
                        f"this {type(layer).__name__} shares its {pname} with another {type(others[0]).__name__}; "
                        f"resizing one would break the other (its active block would no longer match the tensor): "
                        f"give each layer its own Parameters to grow or shrink them"
                    )
        return hidden

    def check_grow(
        self,
        name: str,
        n: int,
        init: str = "he",
        *,
        generator: Optional[torch.Generator] = None,
        split_noise: float = 1e-2,
        optimizer_state: Optional[str] = None,
        **init_options: Any,
    ) -> None:
        """Raise (and change nothing) unless ``grow(name, n, ...)`` with these arguments is valid."""
        self._plan_grow(name, n, init, generator, dict(init_options, split_noise=split_noise), optimizer_state,
                        _Event(), {}, stacklevel=5)

    def check_init(
        self,
        init: str = "he",
        *,
        generator: Optional[torch.Generator] = None,
        split_noise: float = 1e-2,
        **init_options: Any,
    ) -> None:
        """Raise unless ``init`` names a registered strategy that accepts these options (any width)."""
        strategy = protocol.init_strategy(init)
        check_split_noise(split_noise)
        check_generator(generator)
        strategy.check(Change("", 0, 0, (), (), generator, strategy.name), split_noise=split_noise, **init_options)

    def _plan_grow(
        self,
        name,
        n,
        init,
        generator,
        options,
        optimizer_state,
        event: _Event,
        after: dict,
        *,
        stacklevel: int,
    ) -> "_GrowPlan":
        """Validate a growth once (counts, capacities, the init and its options, the optimizer, writability).

        ``after``: ``{(id(module), width): units}``, the counts that earlier growths of the
        same call will have set (the change's extents are the ones it will meet).
        """
        hidden = self._check_resizable(name, event)
        n = check_int("n", n)
        optim_state.check_policy("keep" if optimizer_state is None else optimizer_state)
        if n < 0:
            raise ValueError(f"cannot grow {name!r} by {n}: n must be >= 0 (use shrink() to narrow)")
        strategy = protocol.init_strategy(init)
        check_split_noise(options.get("split_noise", 1e-2))
        check_generator(generator)
        width = self.width(name)
        cap = event.hidden_capacity(hidden)
        if width + n > cap:
            limits = [
                f"{_role_name(m.role)} {type(m.module).__name__}.{m.width} capacity={event.capacity(m.module, m.width)}"
                for m in hidden.members
            ]
            raise ValueError(
                f"cannot grow {name!r} from {width} to {width + n}: it exceeds the capacity "
                f"{cap} of its coupled layers ({', '.join(limits)})"
            )
        change = self._change(name, hidden, width, width + n, generator, strategy.name, event, after)
        strategy.check(change, **options)
        policy = self._growth_policy(optimizer_state, [name] if n > 0 else [], event, stacklevel + 1)
        if n > 0:
            self._check_writable(name, hidden, event, change.slices)
        return _GrowPlan(hidden, change, strategy, options, policy)

    def _change(
        self,
        name: str,
        hidden: _Hidden,
        start: int,
        stop: int,
        generator,
        init: str = "",
        event: Optional[_Event] = None,
        after: Optional[dict] = None,
    ) -> Change:
        event = _Event() if event is None else event
        slices = []
        for m in hidden.members:
            module = m.module
            cap = event.capacity(module, m.width)
            for spec, axis, tensor in event.riding(module, m.width):
                extent = list(tensor.shape)  # protocol.active_extent, at the counts the change will meet
                for a in spec.axes:
                    if a.blocks == 1:
                        if a.width == m.width:
                            units = stop
                        else:
                            units = after.get((id(module), a.width)) if after else None
                            if units is None:
                                units = module.active_width(a.width)  # type: ignore[attr-defined]
                        extent[a.dim] = units * a.unit
                slices.append(Slice(m, spec, axis, tensor, start, stop, tuple(extent), cap))
        return Change(name, start, stop, hidden.members, tuple(slices), generator, init)

    def _check_writable(
        self, name: str, hidden: _Hidden, event: Optional[_Event] = None, slices: Optional[Sequence[Slice]] = None
    ) -> None:
        """Raise unless every tensor the change writes (data, gradients, optimizer state) can be
        written in place (nothing changed yet). Each tensor is checked once per call and noted
        in ``event`` with its version (see :meth:`_Event.untouched`). ``slices``: the change's,
        when planned (every tensor riding the width, with its member)."""
        event = _Event() if event is None else event
        checked = event.writable
        inference_mode = torch.is_inference_mode_enabled()
        optimizer = self.optimizer
        if slices is None:
            riding = [(m, spec, tensor) for m in hidden.members for spec, _, tensor in event.riding(m.module, m.width)]
        else:
            riding = [(s.member, s.spec, s.tensor) for s in slices]
        for m, spec, tensor in riding:
            if id(tensor) in checked:  # its gradient and state too: checked with it in this call
                continue
            written: list[tuple[Optional[str], Tensor]] = [(None, tensor)]
            if isinstance(tensor, nn.Parameter):
                grad = tensor.grad
                if grad is not None:
                    written.append((".grad", grad))
                written += event.state_tensors(optimizer, tensor)
            for what, t in written:
                key = id(t)
                if key in checked:
                    continue
                problem = _write_problem(t, inference_mode)
                if problem is not None:
                    raise RuntimeError(
                        f"cannot resize {name!r}: {_describe(m.module, spec, what)} {problem}. Nothing was changed"
                    )
                checked[key] = (t, t._version)

    def check_shrink(self, name: str, to: int, keep: Keep = "first", optimizer_state: Optional[str] = None) -> None:
        """Raise (and change nothing) unless ``shrink(name, to, keep=keep, optimizer_state=...)`` is valid."""
        self._policy(optimizer_state)
        self._kept(name, to, keep)
        if check_int("to", to) < self.width(name) or not (isinstance(keep, str) and keep == "first"):
            self._check_writable(name, self._get(name))

    def _kept(self, name: str, to: int, keep: Keep) -> Optional[Tensor]:
        """Validate a shrink; return the kept indices in their new order (``None`` for the first ``to``)."""
        hidden = self._check_resizable(name)
        return kept_indices(name, hidden, to, keep)

    # ---- changes ----------------------------------------------------------------------
    @torch.no_grad()
    def grow(
        self,
        name: str,
        n: int,
        *,
        init: str = "he",
        generator: Optional[torch.Generator] = None,
        split_noise: float = 1e-2,
        optimizer_state: Optional[str] = None,
        **init_options: Any,
    ) -> None:
        """Add ``n`` neurons to hidden width ``name`` (appended after the active ones).

        ``init`` chooses the new weights: a strategy registered with
        :func:`growdense.protocol.register_init`; built in (see :mod:`growdense.policies`):
        ``"he"`` (He-normal in and out, the study's), ``"zero_out"`` (He in, zero out:
        the function is unchanged), ``"split"`` (Net2Net: copy neurons, halve their
        outgoing weights, ``split_noise`` breaks the symmetry). Further keyword arguments
        (``init_options``, e.g. a ``closure``) go to the strategy, which validates them
        before anything changes. Riders' new slices get their declared values. The new
        slices' gradients are zero. ``optimizer_state`` (default: the wiring's, ``"keep"``)
        chooses what the optimizer's state becomes: ``"keep"`` (old neurons continue, new
        ones start from the optimizer's fresh state, Adam's step count included),
        ``"reset"`` (the whole optimizer restarts as newly built) or ``"keep_global_step"``
        (new neurons get fresh element-wise state but their Parameter's step count); see
        :mod:`growdense.optim_state`.
        """
        call = {"name": name, "n": n, "init": init, "split_noise": split_noise, "optimizer_state": optimizer_state}
        self._agree("grow", dict(call, options=sorted(init_options)), generator)  # FSDP2: every rank alike
        self._grow_in_order(
            {name: n}, init, generator, dict(init_options, split_noise=split_noise), optimizer_state, stacklevel=4
        )

    @torch.no_grad()
    def grow_many(
        self,
        sizes: Mapping[str, int],
        *,
        init: str = "he",
        generator: Optional[torch.Generator] = None,
        split_noise: float = 1e-2,
        optimizer_state: Optional[str] = None,
        **init_options: Any,
    ) -> None:
        """Grow several hidden widths, ``{name: n}``, as one event; validated together first.

        For most strategies this is ``grow(name, n, ...)`` for each name in order (the
        same writes and random draws), planned in one pass: every width is validated
        before any changes. A strategy with an ``apply_many_(changes, **options)`` method
        (``"gradmax"``) grows them at once instead: every width's new units become active
        together (each width's other dimensions keep their extents from before the event,
        so the block joining two new sets of units, e.g. new neurons of ``h1`` feeding new
        neurons of ``h2``, stays zero), then the strategy sets them all, e.g. from one pass
        of the closure. If the strategy raises, every width is back as it was.
        """
        if not isinstance(sizes, Mapping):
            raise TypeError(f"grow_many() needs a mapping {{name: n}}, got {type(sizes).__name__}")
        call = {"sizes": sorted(sizes.items()), "init": init, "split_noise": split_noise,
                "optimizer_state": optimizer_state}
        self._agree("grow_many", dict(call, options=sorted(init_options)), generator)  # FSDP2
        options = dict(init_options, split_noise=split_noise)
        known = protocol._INITS.get(init) if isinstance(init, str) else None  # an unknown init: refused in the plan
        together = getattr(known, "apply_many_", None)
        if together is None or len(sizes) <= 1:
            self._grow_in_order(sizes, init, generator, options, optimizer_state, stacklevel=4)
            return
        event = _Event()
        plans = self._plan_many(sizes, init, generator, options, optimizer_state, event, in_order=False, stacklevel=4)
        plans = [p for p in plans if p.change.n > 0]
        if not plans:
            return
        done = []
        try:
            for plan in plans:
                plan.raise_widths()
                done.append(plan)
            together([p.change for p in plans], **options)
        except BaseException:
            for plan in reversed(done):
                plan.undo()
            raise
        for plan in plans:
            plan.finish()
        for plan in plans:
            self._fresh_new_slices(plan, event)
        for plan in plans:
            self._broadcast(plan.hidden)

    def _plan_many(
        self, sizes: Mapping[str, int], init, generator, options, optimizer_state, event: _Event, *, in_order: bool,
        stacklevel: int,
    ) -> list["_GrowPlan"]:
        """Validate the growth of every width of ``sizes``, nothing changed yet.

        ``in_order``: the widths grow one after the other, each change planned with the
        counts the earlier ones will have set (as separate :meth:`grow` calls); otherwise
        every change keeps the other dimensions' extents from before the call.
        """
        after: dict[tuple[int, str], int] = {}
        plans = []
        for name, n in sizes.items():
            plan = self._plan_grow(name, n, init, generator, options, optimizer_state, event, after,
                                   stacklevel=stacklevel + 1)
            plans.append(plan)
            if in_order:
                for m in plan.hidden.members:
                    after[(id(m.module), m.width)] = plan.change.stop
        return plans

    def _grow_in_order(
        self, sizes: Mapping[str, int], init, generator, options, optimizer_state, *, stacklevel: int
    ) -> None:
        """Grow each width of ``sizes`` in order (every one validated first): what :meth:`grow` does for one."""
        event = _Event()
        plans = self._plan_many(sizes, init, generator, options, optimizer_state, event, in_order=True,
                                stacklevel=stacklevel + 1)
        for plan in plans:
            if plan.change.n == 0:
                continue
            plan.apply()
            self._fresh_new_slices(plan, event)
            self._broadcast(plan.hidden)

    @torch.no_grad()
    def shrink(self, name: str, to: int, *, keep: Keep = "first", optimizer_state: Optional[str] = None) -> None:
        """Narrow hidden width ``name`` to ``to`` neurons.

        ``keep`` chooses which neurons stay:

        - ``"first"``: neurons ``0 .. to-1`` (the study's Approach 2);
        - ``"norm"``: the ``to`` neurons whose *incoming* weights in the producers (over
          their active inputs, bias not included) have the largest Euclidean norm; ties go
          to the lower index. Only what changes place moves: kept neurons among the first
          ``to`` stay where they are, the others move, in increasing order, into the places
          of the dropped ones among the first ``to``;
        - a sequence (or 1-D tensor) of ``to`` distinct indices in ``[0, width)``: those
          neurons, in that order.

        The moves apply together to every member's tensors (the producer's rows and
        bias, every consumer's columns, riders' slices), their gradients and optimizer
        state; then the rest is zeroed (weights, gradients, optimizer state). The
        network's output over the kept neurons is unchanged by the moves.
        ``optimizer_state`` (default: the wiring's): under ``"reset"`` the whole optimizer
        restarts as newly built; otherwise the kept neurons' state continues and the
        removed slices' state becomes the optimizer's fresh values.
        """
        self._agree("shrink", {"name": name, "to": to, "keep": keep, "optimizer_state": optimizer_state})
        policy = self._policy(optimizer_state)
        kept = self._kept(name, to, keep)
        to = check_int("to", to)
        hidden = self._get(name)
        width = self.width(name)
        moves = None
        if kept is not None:
            if isinstance(keep, str):  # "norm": kept in increasing order; fill the holes only
                moves = _fill_holes(kept, to)
            else:
                perm = permutation(kept, width)
                if perm is not None:
                    moves = (perm, torch.arange(width, device=perm.device))
        if to < width or moves is not None:
            self._check_writable(name, hidden)
        # keep="norm" fills holes: sources >= to > destinations. The moves come before the
        # widths are lowered: a module may clear what leaves its active part when it shrinks.
        disjoint = isinstance(keep, str) and moves is not None
        self._move_and_fill(hidden, moves, to, width, keep_state=policy != "reset", disjoint=disjoint)
        for m in hidden.members:
            m.module.set_active_width_(m.width, to)
        if policy == "reset":
            optim_state.reset_(self.optimizer)

    @torch.no_grad()
    def permute(self, name: str, perm: Union[Sequence[int], Tensor]) -> None:
        """Reorder the neurons of hidden width ``name``: new neuron ``i`` is old neuron ``perm[i]``.

        ``perm`` is a permutation of ``range(width)``. Every member's tensors, gradients
        and optimizer state move together; the network's function is unchanged.
        """
        if isinstance(perm, str):
            raise TypeError(f"permute() needs a sequence of indices, got the string {perm!r}")
        self._agree("permute", {"name": name, "perm": perm})
        indices = self._kept(name, self.width(name), perm)
        hidden = self._get(name)
        self._check_writable(name, hidden)
        self._move_and_fill(hidden, (indices, torch.arange(indices.numel(), device=indices.device)), 0, 0)

    # ---- internals -------------------------------------------------------------------
    def _agree(self, what: str, call: dict, generator: Optional[torch.Generator] = None) -> None:
        """Before this wiring changes a width: if its tensors are ``DTensor``\\ s, check every rank makes the same change.

        Nothing happens (no communication) when none of the wiring's tensors is a ``DTensor``.
        Otherwise every rank of the mesh must call with the same arguments, from the same
        widths and capacities, with generators in the same state; each rank's layouts must
        be ones growdense writes (:func:`growdense.sharded.check_supported`). Any difference raises on every
        rank, before anything changes. With :attr:`broadcast_from` set, the generator is
        first set to that rank's state on every rank (so that every rank draws its values).
        """
        if sharded.initialized_dist() is None:  # a DTensor needs a process group: one process agrees with itself
            return
        members = [t for h in self._hidden.values() for m in h.members for _, t in protocol.members_of(m.module)]
        if not any(sharded.is_sharded(t) for t in members):  # FSDP2 shards every Parameter: none is, nothing to agree on
            return
        tensors = []
        for hidden in self._hidden.values():
            for m in hidden.members:
                for spec, t in protocol.members_of(m.module):
                    if spec.axis(m.width) is not None:
                        tensors.append(t)
                        grad = getattr(t, "grad", None)
                        if grad is not None:
                            tensors.append(grad)
                        optimizer = self.optimizer
                        if optimizer is not None:
                            tensors += [v for v in optimizer.state.get(t, {}).values() if isinstance(v, Tensor)]
        example = sharded.any_sharded(tensors)
        if example is None:
            return
        if self.broadcast_from is not None and generator is not None:
            import torch.distributed as dist

            state = [generator.get_state()]
            dist.broadcast_object_list(state, src=self.broadcast_from, group=self.process_group)
            generator.set_state(state[0])
        problem = None
        try:
            sharded.check_supported(tensors)
        except NotImplementedError as error:
            problem = str(error)
        widths = {name: (self.width(name), self.capacity(name)) for name in self.names()}
        sharded.agree(example, what, call, widths, generator, problem)

    def _axes(self, hidden: _Hidden):
        """``(member, spec, axis, tensor, capacity)`` for every tensor riding the width."""
        return _Event().axes(hidden)

    def _move_and_fill(
        self,
        hidden: _Hidden,
        moves: Optional[tuple[Tensor, Tensor]],
        start: int,
        stop: int,
        keep_state: bool = True,
        disjoint: bool = False,
    ) -> None:
        """Move units, then clear ``[start, stop)``, in every member tensor: one pass over each.

        ``moves`` (``(src, dst)`` or ``None``): unit ``dst[i]`` gets old unit ``src[i]`` in
        the data, the gradient and (with ``keep_state``) the optimizer state, whose birth
        steps follow. Then units ``[start, stop)`` become 0 in the data and gradients and
        the optimizer's fresh values in its state (their births: the Parameter's). Without
        ``keep_state`` the state is left alone (the caller resets it). ``disjoint``: no
        unit is both a source and a destination (the moves may go in pieces).
        """
        src, dst = moves if moves is not None else (None, None)
        scratch: dict[tuple, Tensor] = {}  # one cache-sized buffer per dtype and device, for every tensor
        for _, _, axis, tensor, cap in self._axes(hidden):
            is_param = isinstance(tensor, nn.Parameter)
            targets: list[tuple[Tensor, Any]] = [(tensor.data if is_param else tensor, 0)]
            if is_param and tensor.grad is not None:
                targets.append((tensor.grad, 0))
            if is_param and keep_state:
                targets += optim_state.fresh_state_tensors(self.optimizer, tensor)
            for t, value in targets:
                buf = None
                if src is not None and src.numel() > 0:
                    key = (t.dtype, t.device)
                    buf = scratch.get(key)
                    if buf is None:
                        buf = scratch[key] = torch.empty(
                            protocol._BLOCK_BYTES // t.element_size(), dtype=t.dtype, device=t.device
                        )
                protocol.move_and_fill_units_(
                    t, axis, cap, src, dst, start, stop, value, disjoint=disjoint, scratch=buf
                )
            if not (is_param and keep_state and self.optimizer is not None and self.optimizer.state.get(tensor)):
                continue
            if src is not None and dst is not None and src.numel() > 0 and optim_state.has_births(self.optimizer, tensor):
                s = protocol.element_index(axis, cap, src.to(tensor.device))
                d = protocol.element_index(axis, cap, dst.to(tensor.device))
                optim_state.move_births_(self.optimizer, tensor, axis.dim, s, d)
            for first, length in protocol.element_ranges(axis, cap, start, stop):
                optim_state.mark_born_(self.optimizer, tensor, axis.dim, first, first + length, "keep_global_step")

    def _fresh_new_slices(self, plan: "_GrowPlan", event: _Event) -> None:
        """After a growth: the new units' gradients zero, the optimizer state as ``plan.policy`` says.

        Every tensor riding the width is one of the change's slices (its axis and capacity
        with it). Under ``"reset"`` the whole optimizer restarts; otherwise the new units'
        element-wise state gets the optimizer's fresh values and their births are marked.
        The new units were outside the active part, where gradients and optimizer state are
        zero (the invariant): a tensor that nothing wrote since the call was planned
        (:meth:`_Event.untouched`; the built-in strategies write only the data) is not
        written again, except with a fresh value other than zero (Adagrad's, Rprop's).
        """
        change, policy = plan.change, plan.policy
        optimizer = self.optimizer
        keep_state = policy != "reset" and optimizer is not None
        births = keep_state and optim_state.counts_births(optimizer)
        data_only = getattr(plan.strategy, "writes_only_data", False) is True
        zero_state = keep_state and data_only and optim_state.optimizer_rules(optimizer).fresh_all_zero
        if data_only and not births and (zero_state or not keep_state):
            if policy == "reset":
                optim_state.reset_(optimizer)
            return  # nothing but the data was written: gradients and state are still zero there
        for s in change.slices:
            param = s.tensor
            if not isinstance(param, nn.Parameter):
                continue
            ranges = s.ranges
            dim = s.axis.dim
            grad = param.grad
            if grad is not None and not data_only and not event.untouched(grad):
                for first, length in ranges:
                    grad.narrow(dim, first, length).zero_()
            if keep_state and not zero_state:
                for state, value in event.fresh_state(optimizer, param):
                    if value == 0 and (data_only or event.untouched(state)):
                        continue
                    for first, length in ranges:
                        part = state.narrow(dim, first, length)
                        part.zero_() if value == 0 else part.fill_(value)
            if births and (policy == "keep" or optim_state.has_births(optimizer, param)):
                optim_state.mark_born_ranges_(optimizer, param, dim, ranges, policy)
        if policy == "reset":
            optim_state.reset_(optimizer)

    def _broadcast(self, hidden: _Hidden) -> None:
        if self.broadcast_from is None:
            return
        dist = sharded.initialized_dist()
        if dist is None:
            return
        for layer in hidden.layers():
            for _, tensor in protocol.members_of(layer):
                if sharded.is_sharded(tensor):  # each rank holds its own rows, drawn from the synced generator
                    continue
                dist.broadcast(tensor.data, src=self.broadcast_from, group=self.process_group)


ROLES_ = (PRODUCER, CONSUMER, RIDER)


def _describe(module: nn.Module, spec: protocol.TensorSpec, what: Optional[str]) -> str:
    """How a written tensor is named in messages: the data, ``.grad``, or an optimizer state's key."""
    name = f"{type(module).__name__}.{spec.name}"
    if what is None:
        return name
    if what == ".grad":
        return f"{name}.grad"
    return f"the optimizer's {what!r} of {name}"


def _write_problem(t: Tensor, inference_mode: bool) -> Optional[str]:
    """Why ``t`` cannot be written in place (``None``: it can); ``inference_mode``: whether it is enabled."""
    if t.layout == torch.strided and t.dtype.is_floating_point and not t.is_inference() and t.is_contiguous():
        return None  # the common case, in four cheap questions
    if t.is_inference() and not inference_mode:
        return (
            "is an inference tensor (made under torch.inference_mode()), which cannot be written in place "
            "outside it; build the model outside inference_mode, or clone its tensors into new Parameters"
        )
    if t.layout != torch.strided:
        return f"has layout {t.layout}; growdense writes dense (strided) tensors only"
    if not t.dtype.is_floating_point:
        return (
            f"has dtype {t.dtype}; growdense grows and shrinks real floating-point tensors only: "
            f"convert the layer (e.g. layer.float())"
        )
    if 0 in t.stride() and t.numel() > 1 and any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape)):
        return (
            "has elements sharing memory (an expanded tensor), which cannot be written in place; "
            "give it its own storage (e.g. .clone())"
        )
    return None


def _feature_name(m: Member) -> str:
    """How a member's width is called in messages (GrowLinear: in_features / out_features)."""
    return {"in": "in_features", "out": "out_features"}.get(m.width, m.width)


def _fill_holes(kept: Tensor, to: int) -> Optional[tuple[Tensor, Tensor]]:
    """Moves that bring the sorted ``kept`` into ``[0, to)``: those outside go into the dropped places inside."""
    inside = torch.zeros(to, dtype=torch.bool, device=kept.device)
    inner = kept[kept < to]
    inside[inner] = True
    src = kept[kept >= to]
    if src.numel() == 0:
        return None
    dst = (~inside).nonzero().flatten()
    return src, dst


@dataclass
class _GrowPlan:
    """A validated growth; :meth:`apply` makes it (it cannot fail on valid input)."""

    hidden: _Hidden
    change: Change
    strategy: object
    options: dict
    policy: str

    def raise_widths(self) -> None:
        """Make the new units active and write the declared fills (the strategy writes the rest)."""
        change = self.change
        for m in change.members:
            m.module.set_active_width_(m.width, change.stop)
        for s in change.slices:  # declared values: fills, and this init's entry of TensorSpec.inits
            s.write_declared_(change.init, change.generator)

    def finish(self) -> None:
        """After the strategy's writes: the modules' own state, and stacked units outside the active
        ones zero again where the strategy may have written whole extents (any strategy but those
        writing through ``Slice.normal_`` and ``Slice.fill_`` only: ``sharded.SLICE_LOCAL_INITS``)."""
        change = self.change
        if change.init not in sharded.SLICE_LOCAL_INITS:  # those write the new units' rectangles only
            for s in change.slices:
                if s.stacked:
                    s.zero_stacked_outside_()
        for m in change.members:  # state beyond the declared tensors (a norm's ramp)
            protocol.call_on_grow_(m.module, m.width, change.start, change.stop, change.init, self.options)

    def undo(self) -> None:
        """Back to the width before :meth:`raise_widths`: the new units zero again, the counts lowered."""
        change = self.change
        for s in change.slices:
            data = s.tensor.data if isinstance(s.tensor, nn.Parameter) else s.tensor
            protocol.zero_units_(data, s.axis, s.capacity, change.start, change.stop)
        for m in change.members:
            m.module.set_active_width_(m.width, change.start)

    def apply(self) -> None:
        self.raise_widths()
        try:
            with sharded.gathered(self.change) as whole:  # DTensors: strategies that index freely see gathered copies
                self.strategy.apply_(whole, **self.options)  # type: ignore[attr-defined]
        except BaseException:  # a strategy that runs user code (a closure) may fail: change nothing
            self.undo()
            raise
        self.finish()
