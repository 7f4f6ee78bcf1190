"""What the growable twins of torch modules share: named widths, a tensor layout, state_dict.

A growable module allocates every tensor once, at capacity, and uses only an active part
of it. Which part is given by its *layout*: for each tensor (a path such as ``"weight"``
or ``"out_proj.bias"``), each real dimension is a product of *factors*, and each factor
has its capacity size and either rides a named width of the module or is fixed. A
LayerNorm's ``weight`` is one factor riding ``"features"``; a MultiheadAttention's
``in_proj_weight`` (rows ``[q; k; v]``, each of ``capacity_heads * head_dim``) has the
factors ``(3, fixed) (capacity_heads, "heads") (head_dim, fixed)`` along its rows and
``(capacity_embed_dim, "embed_dim")`` along its columns. The active part of a tensor is
then, in its factored view, the first ``width`` entries of every riding factor, and
everything else is zero (the tensor and its gradient).

From the layout alone this module derives: the active view of a tensor, the shape that
the torch twin's tensor has (the twin's ``state_dict`` loads as it is), zeroing what
lies outside the active part, and zeroing a slice that a shrink leaves. A subclass says
how new slices are initialised (:meth:`_GrowModule._init_slice`).
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from . import protocol
from ._checks import check_int
from .layers import _Width

__all__ = ["Factor", "Layout"]

# A factor of one real dimension: (size at capacity, the width it rides or None).
Factor = tuple[int, Optional[str]]
# tensor path -> per real dimension, its factors (outermost first).
Layout = dict[str, tuple[tuple[Factor, ...], ...]]

_EXTRA_STATE_VERSION = 1
_PREFIX = "_active_"


class _Holder(nn.Module):
    """A submodule that only holds tensors for its parent (``out_proj`` of an attention).

    Its parent loads and saves its tensors (they are in the parent's layout), so loading
    does nothing here. Its Parameters are registered as the parent's (see
    :func:`growdense.protocol.active_block`).
    """

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        return None

    def register_parameter(self, name: str, param: Optional[nn.Parameter]) -> None:
        super().register_parameter(name, param)
        parent = self.__dict__.get("_growdense_parent")
        parent = parent() if parent is not None else None
        if parent is not None:
            parent._tensors_changed()
            if param is not None:
                protocol.register_owner(param, parent)

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_growdense_parent", None)  # a weak reference: set again by the parent
        return state


class _GrowModule(nn.Module):
    """Base of the growable twins: named widths and a layout (see the module docstring).

    Subclasses set ``_width_names`` (the widths, in order) and implement ``_layout``,
    ``_init_slice``, ``reset_parameters`` and the forward. Widths are stored as
    ``_active_<name>`` (DynamicInts: symbolic sizes under torch.compile, so one graph
    serves every width), capacities as plain ints in ``_capacities``.
    """

    _width_names: tuple[str, ...] = ()
    _inits: tuple[str, ...] = ()

    def _init_widths(self, widths: Mapping[str, int], capacities: Mapping[str, Optional[int]]) -> None:
        caps = {}
        for name in self._width_names:
            active = check_int(name, widths[name])
            cap = capacities.get(name)
            cap = active if cap is None else check_int(f"capacity_{name}", cap)
            if not 1 <= active <= cap:
                raise ValueError(
                    f"{name}={active} must be between 1 and its capacity {cap}; "
                    f"pass capacity_{name} at least as large as {name}"
                )
            caps[name] = cap
            setattr(self, _PREFIX + name, active)
        self._capacities = caps

    # ---- widths ----------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith(_PREFIX) and isinstance(value, int):
            if type(value) is not _Width:
                value = _Width(int(value))
            if name in self.__dict__:  # a plain attribute already: nn.Module's checks have nothing to do
                object.__setattr__(self, name, value)
                return
        super().__setattr__(name, value)
        if isinstance(value, _Holder):
            self._adopt(value)

    def register_parameter(self, name: str, param: Optional[nn.Parameter]) -> None:
        super().register_parameter(name, param)
        self._tensors_changed()
        if param is not None:  # `module.weight = p` comes through here too
            protocol.register_owner(param, self)

    def _adopt(self, holder: "_Holder") -> None:
        """Make ``holder``'s Parameters (and later assignments to it) this module's."""
        holder.__dict__["_growdense_parent"] = weakref.ref(self)
        self._tensors_changed()
        for param in holder._parameters.values():
            if param is not None:
                protocol.register_owner(param, self)

    def _register_owners(self) -> None:
        """Let :func:`growdense.protocol.active_block` find this module from its Parameters."""
        self._tensors_changed()
        for param in self._parameters.values():
            if param is not None:
                protocol.register_owner(param, self)
        for child in self._modules.values():
            if isinstance(child, _Holder):
                self._adopt(child)

    def _tensors_changed(self) -> None:
        self.__dict__.pop("_growdense_spec", None)
        self.__dict__.pop("_growdense_block_specs", None)

    def __setstate__(self, state: dict) -> None:  # copy.deepcopy and pickle come through here
        super().__setstate__(state)
        for key, value in list(self.__dict__.items()):
            if key.startswith(_PREFIX) and isinstance(value, int) and type(value) is not _Width:
                self.__dict__[key] = _Width(int(value))
        self._register_owners()

    def _apply(self, fn, recurse: bool = True):  # .to(), .double() may replace Parameters
        protocol.forget_owners(self.parameters())  # or swap them in place (DTensors): no weak references then
        try:
            return super()._apply(fn, recurse)
        finally:
            self._register_owners()

    def width(self, name: str) -> int:
        """The active size of width ``name`` (a plain int)."""
        self._check_width_name(name)
        return int(getattr(self, _PREFIX + name))

    def capacity(self, name: str) -> int:
        """The allocated size of width ``name``."""
        self._check_width_name(name)
        return self._capacities[name]

    def widths(self) -> dict[str, int]:
        """Every width's active size, by name."""
        return {name: int(getattr(self, _PREFIX + name)) for name in self._width_names}

    def capacities(self) -> dict[str, int]:
        """Every width's capacity, by name."""
        return dict(self._capacities)

    def _check_width_name(self, name: str) -> None:
        if name not in self._width_names:
            raise ValueError(f"{type(self).__name__} has no width {name!r}; its widths are {list(self._width_names)}")

    # ---- the growable-module protocol (growdense.protocol) ---------------------------
    # Other names of this module's widths accepted by active_width/set_active_width_.
    _aliases: dict[str, str] = {}

    def growth_spec(self) -> "protocol.GrowthSpec":
        """The declaration for :mod:`growdense.protocol` (built once, again when a tensor is replaced)."""
        spec = self.__dict__.get("_growdense_spec")
        if spec is None:
            spec = self._growth_spec()
            self.__dict__["_growdense_spec"] = spec
        return spec

    def _growth_spec(self) -> "protocol.GrowthSpec":  # pragma: no cover - every subclass implements it
        raise NotImplementedError

    def _growth_block(self, param: Tensor) -> Optional[tuple[slice, ...]]:
        """:func:`growdense.protocol.active_block` for this module's Parameters (asked at every
        optimizer step: the declaration found last time for ``param`` is tried first)."""
        found = self.__dict__.get("_growdense_block_specs")
        if found is None:
            found = self.__dict__["_growdense_block_specs"] = {}
        spec = found.get(id(param))
        if spec is not None and protocol.tensor_of(self, spec) is param:
            return protocol.bounding_block(self, spec, param)
        for spec in self.growth_spec().tensors:
            if protocol.tensor_of(self, spec) is param:
                found[id(param)] = spec
                return protocol.bounding_block(self, spec, param)
        return None

    def _own_width(self, width: str) -> str:
        own = self._aliases.get(width, width)
        self._check_width_name(own)
        return own

    def active_width(self, width: str) -> int:
        """The active count, in units, of module-local ``width`` (the protocol's name)."""
        value = self.__dict__.get(_PREFIX + width)  # a width by its own name (not an alias)
        if value is not None and width in self._capacities:
            return int(value)
        return int(getattr(self, _PREFIX + self._own_width(width)))

    def set_active_width_(self, width: str, units: int) -> None:
        """Set the active count of module-local ``width`` (bookkeeping only: no tensor writes).

        The Wiring moves and fills every declared tensor itself (a norm's ramp included)
        after this call, so nothing is zeroed here: zeroing the leaving units first would
        lose those that a ``keep="norm"`` shrink moves into the kept places.
        """
        own = self._own_width(width)
        units = check_int("units", units)
        if not 0 <= units <= self._capacities[own]:
            raise ValueError(f"{width}={units} is outside 0..{self._capacities[own]}")
        key = _PREFIX + own
        if key in self.__dict__:  # what __setattr__ does for a width already set, without its questions
            self.__dict__[key] = _Width(units)
        else:
            setattr(self, key, units)

    # ---- the layout ------------------------------------------------------------
    def _layout(self) -> Layout:  # pragma: no cover - every subclass implements it
        raise NotImplementedError

    def tensor_layout(self) -> Layout:
        """For each tensor this module owns (present ones only), how its dimensions ride the widths.

        ``{path: per real dimension, a tuple of (capacity size, width name or None)}``.
        """
        return {path: dims for path, dims in self._layout().items() if self._tensor(path) is not None}

    def _tensor(self, path: str) -> Optional[Tensor]:
        owner, _, name = path.rpartition(".")
        module = self.get_submodule(owner) if owner else self
        return getattr(module, name, None)

    @staticmethod
    def _factored_shape(dims: Sequence[Sequence[Factor]]) -> list[int]:
        return [size for dim in dims for size, _ in dim]

    def _active_size(self, factor: Factor) -> int:
        size, width = factor
        return size if width is None else getattr(self, _PREFIX + width)

    def _twin_shape(self, dims: Sequence[Sequence[Factor]]) -> tuple[int, ...]:
        """The shape of the twin's tensor: each real dimension at its active size."""
        return tuple(math.prod(int(self._active_size(f)) for f in dim) for dim in dims)

    def _region(
        self, dims: Sequence[Sequence[Factor]], override: Optional[tuple[str, int, int]] = None
    ) -> tuple[slice, ...]:
        """Slices of the factored view: every riding factor's active part, ``override``'s width at [start, stop)."""
        slices = []
        for dim in dims:
            for size, width in dim:
                if width is None:
                    slices.append(slice(None))
                elif override is not None and width == override[0]:
                    slices.append(slice(override[1], override[2]))
                else:
                    slices.append(slice(0, int(getattr(self, _PREFIX + width))))
        return tuple(slices)

    def active_view(self, path: str) -> Tensor:
        """The active part of tensor ``path`` in its factored shape (a view, no copy)."""
        dims = self._layout()[path]
        tensor = self._tensor(path)
        return tensor.view(self._factored_shape(dims))[self._region(dims)]

    def active_tensor(self, path: str) -> Tensor:
        """The active part of tensor ``path`` in the twin's shape (a copy where the part is not one block)."""
        dims = self._layout()[path]
        return self.active_view(path).reshape(self._twin_shape(dims))

    def _width_axes(self):
        """Yield ``(view, axis, size, width)`` for every axis of every tensor and its gradient.

        ``view`` is the tensor in its factored shape, ``width`` the name the axis rides
        (``None`` for a fixed axis).
        """
        for path, dims in self.tensor_layout().items():
            tensor = self._tensor(path)
            for t in (tensor, tensor.grad):
                if t is None or t.is_sparse:
                    continue
                view = t.view(self._factored_shape(dims))
                for axis, (size, width) in enumerate(part for dim in dims for part in dim):
                    yield view, axis, size, width

    @torch.no_grad()
    def _zero_outside(self) -> None:
        """Zero everything outside the active part: tensors, and their gradients."""
        for view, axis, size, width in self._width_axes():
            if width is not None:
                active = int(getattr(self, _PREFIX + width))
                view.narrow(axis, active, size - active).zero_()

    @torch.no_grad()
    def _zero_slice(self, width: str, start: int, stop: int) -> None:
        """Zero [start, stop) of ``width`` in every tensor that rides it, and in their gradients."""
        for view, axis, _, w in self._width_axes():
            if w == width:
                view.narrow(axis, start, stop - start).zero_()

    def _new_slice(self, path: str, width: str, start: int, stop: int) -> Tensor:
        """The slice [start, stop) of ``width`` in tensor ``path`` within the other widths' active part (a view)."""
        dims = self._layout()[path]
        return self._tensor(path).view(self._factored_shape(dims))[self._region(dims, (width, start, stop))]

    def _init_like_twin(self, path: str, init) -> None:
        """Draw the active part of ``path`` as the twin would draw its tensor (same shape, same RNG use)."""
        tensor = self._tensor(path)
        if tensor is None:
            return
        value = torch.empty(self._twin_shape(self._layout()[path]), device=tensor.device, dtype=tensor.dtype)
        init(value)
        view = self.active_view(path)
        view.copy_(value.view(view.shape))

    # ---- resizing ----------------------------------------------------------------
    def _init_slice(self, width: str, start: int, stop: int, init: str, generator: Optional[torch.Generator]) -> None:
        """Write the new slice [start, stop) of ``width`` (already zero) in every tensor riding it."""
        raise NotImplementedError  # pragma: no cover

    def _check_resize(self, width: str, new: int, init: str) -> int:
        self._check_width_name(width)
        new = check_int("width", new)
        cap = self._capacities[width]
        if not 1 <= new <= cap:
            raise ValueError(
                f"cannot resize {type(self).__name__}'s {width} to {new}: it must be between 1 and its capacity "
                f"{cap}" + (f"; construct the module with capacity_{width} of at least {new}" if new > cap else "")
            )
        if init not in self._inits:
            raise ValueError(f"unknown init {init!r} for {type(self).__name__}; expected one of {self._inits}")
        return new

    @torch.no_grad()
    def resize(self, width: str, new: int, init: str = "he", *, generator: Optional[torch.Generator] = None) -> None:
        """Set width ``width`` to ``new``: grow (new slices set by ``init``) or shrink (what leaves is zeroed).

        The Parameters keep their storage. Gradients outside the active part stay zero.

        This and the module's own ``grow*``/``shrink*`` methods change the module only
        (its tensors and their gradients), as :class:`~growdense.GrowLinear`'s
        ``grow_out``/``shrink_out`` do: an optimizer's state for these Parameters is left
        as it was. In a model that trains, grow and shrink the width through a
        :class:`~growdense.Wiring` built with the optimizer (``Wiring(optimizer)``; a
        residual stream is one width over every module that reads, writes or rides it),
        which edits the Parameters, their gradients and the optimizer state together. Done
        here instead, with an optimizer that holds state, a removed slice keeps its moments
        (a torch optimizer stepping the whole tensor then moves the zeroed weights again;
        a regrown slice starts from the old moments) and new slices get no fresh state or
        step count of their own.
        """
        new = self._check_resize(width, new, init)
        old = self.width(width)
        if new > old:
            self._init_slice(width, old, new, init, generator)
            setattr(self, _PREFIX + width, new)
        elif new < old:
            self._zero_slice(width, new, old)
            setattr(self, _PREFIX + width, new)
            self._after_shrink(width, new, old)

    def _after_shrink(self, width: str, new: int, old: int) -> None:
        """Hook for state beyond the layout's tensors (a norm's ramp)."""

    # ---- state_dict ----------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"version": _EXTRA_STATE_VERSION, "widths": self.widths()}

    def set_extra_state(self, state: Any) -> None:
        """Set the active widths from :meth:`get_extra_state`'s dict; what leaves the active part is zeroed."""
        widths = self._widths_from_extra_state(state)
        with torch.no_grad():
            self._set_widths(widths, state)

    def _widths_from_extra_state(self, state: Any) -> dict[str, int]:
        name = type(self).__name__
        if not isinstance(state, dict) or not isinstance(state.get("widths"), dict):
            raise ValueError(f"{name} extra state must be a dict with 'widths', got {state!r}")
        widths = {}
        for width in self._width_names:
            if width not in state["widths"]:
                raise ValueError(f"{name} extra state lacks the width {width!r}: it has {sorted(state['widths'])}")
            try:
                value = check_int(width, state["widths"][width])
            except TypeError as error:
                raise ValueError(f"{name} extra state: {error}") from None
            if not 1 <= value <= self._capacities[width]:
                raise ValueError(
                    f"the checkpoint's {width}={value} does not fit this {name}'s capacity "
                    f"{self._capacities[width]}; construct it with capacity_{width} of at least {value}"
                )
            widths[width] = value
        return widths

    def _set_widths(self, widths: Mapping[str, int], extra: Any = None) -> None:
        for width, value in widths.items():
            setattr(self, _PREFIX + width, value)
        self._zero_outside()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # A state_dict with extra state is this module's own: its tensors have the capacity
        # shapes and it sets the widths. One without is the torch twin's: its tensors are
        # the active part at the current widths. A module whose tensors do not fit is left
        # as it was (load_state_dict then raises).
        for hook in self._load_state_dict_pre_hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        extra_key = prefix + "_extra_state"
        layout = self.tensor_layout()
        present = {path: state_dict[prefix + path] for path in layout if prefix + path in state_dict}
        missing_keys.extend(prefix + path for path in layout if path not in present)
        if strict:
            unexpected_keys.extend(
                key for key in state_dict
                if key.startswith(prefix) and key != extra_key and key[len(prefix):] not in layout
                and self._unexpected(key[len(prefix):])
            )
        own = extra_key in state_dict
        name = type(self).__name__
        if own:
            try:
                widths = self._widths_from_extra_state(state_dict[extra_key])
            except ValueError as error:
                error_msgs.append(f"{prefix}_extra_state: {error}")
                return
            shapes = {path: self._tensor(path).shape for path in layout}
            what = "capacity shape"
        else:
            widths = self.widths()
            shapes = {path: torch.Size(self._twin_shape(dims)) for path, dims in layout.items()}
            what = f"active shape at {widths} (a {self._twin_name()} state_dict)"
        errors = []
        for path, value in present.items():
            if not isinstance(value, Tensor) or value.shape != shapes[path]:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                errors.append(
                    f"size mismatch for {prefix}{path}: the checkpoint has {shape} but this {name}'s {what} is "
                    f"{tuple(shapes[path])} (capacities {self._capacities}); "
                    + (
                        f"construct {name} with the checkpoint's capacities"
                        if own
                        else f"construct {name} with widths matching the {self._twin_name()} that saved it"
                    )
                )
        if errors:
            error_msgs.extend(errors)
            return
        assign = local_metadata.get("assign_to_params_buffers", False)
        with torch.no_grad():
            if own:
                for path, value in present.items():
                    if assign:
                        self._assign(path, value)
                    else:
                        self._tensor(path).copy_(value)
                self._set_widths(widths, state_dict[extra_key])
            else:
                for path, value in present.items():
                    dims = layout[path]
                    if assign:  # a new capacity tensor on the value's device and dtype holds it
                        full = torch.zeros(self._tensor(path).shape, device=value.device, dtype=value.dtype)
                        self._assign(path, full)
                    target = self._tensor(path).view(self._factored_shape(dims))[self._region(dims)]
                    target.copy_(value.reshape(target.shape))
                self._set_widths(widths, None)

    def _unexpected(self, key: str) -> bool:
        """Whether a key under this module's prefix that is not in its layout is unexpected here."""
        head = key.split(".", 1)[0]
        return not (head in self._modules and not isinstance(self._modules[head], _Holder))

    def _twin_name(self) -> str:
        return "torch.nn." + type(self).__name__[len("Grow"):]

    def _assign(self, path: str, value: Tensor) -> None:
        owner, _, name = path.rpartition(".")
        module = self.get_submodule(owner) if owner else self
        old = module._parameters[name]
        if isinstance(value, nn.Parameter):
            value.requires_grad_(old.requires_grad)
        else:
            value = nn.Parameter(value, requires_grad=old.requires_grad)
        setattr(module, name, value)
        self._register_owners()

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """As :meth:`torch.nn.Module.load_state_dict`, for this module's own state_dict or its torch twin's.

        The module's own (with ``_extra_state``) has the capacity shapes and sets the
        widths; the twin's fills the active part at the current widths (a tensor of
        another shape is refused with an error naming it). With ``strict=True`` wrong keys
        raise before anything changes.
        """
        if strict and isinstance(state_dict, Mapping):
            layout = self.tensor_layout()
            missing = [path for path in layout if path not in state_dict]
            unexpected = [key for key in state_dict if key not in layout and key != "_extra_state"]
            if missing or unexpected:
                msgs = []
                if missing:
                    msgs.append("Missing key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in missing)))
                if unexpected:
                    msgs.append("Unexpected key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in unexpected)))
                raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t" + "\n\t".join(msgs))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def check_growth(n: Any) -> int:
    """A growth count: an int >= 0."""
    n = check_int("n", n)
    if n < 0:
        raise ValueError(f"cannot grow by {n}: n must be >= 0 (use shrink to narrow a width)")
    return n
