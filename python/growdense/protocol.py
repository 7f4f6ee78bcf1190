"""The protocol every growable module follows, and what :class:`~growdense.Wiring` needs of it.

A growable module allocates its tensors once, at capacity, and keeps an *active* part of
each of its *widths*: module-local names such as ``"in"`` and ``"out"`` for
:class:`~growdense.GrowLinear`, or ``"features"`` for a norm. It declares, for every
Parameter and buffer it owns, which dimension rides which of its widths
(:class:`Axis`, :class:`TensorSpec`, :class:`GrowthSpec`), and it keeps its active counts
(:class:`Growable`). Everything else (writing new slices, zeroing removed ones,
permuting, editing gradients and optimizer state, validating a change before anything
moves) is done once, here and in :class:`~growdense.Wiring`, from the declaration.

A *width* of a model (``Wiring``'s, e.g. ``"h1"``) is a named group of every
(module, module-local width) riding it; each member's tensors play one of three roles
along the width's dimension:

- :data:`PRODUCER`: the tensor computes the width's units (a linear layer's rows and
  bias). New slices get the init strategy's *incoming* values (He rows; copies for
  ``split``), or the declared :attr:`TensorSpec.fill` (a bias: 0).
- :data:`CONSUMER`: the tensor reads the width's units (a linear layer's columns). New
  slices get the strategy's *outgoing* values (He; zero for ``zero_out``; halves for
  ``split``).
- :data:`RIDER`: the tensor is indexed by the width's units but neither computes nor
  mixes them (a norm's weight and bias, an embedding's columns along a residual stream).
  New slices get the declared :attr:`TensorSpec.fill` (1 for a norm's weight, 0 for a
  bias); ``split`` copies the sources' values.

One *unit* of a width may span several elements (:attr:`Axis.unit`: a head is
``head_dim`` rows) and a dimension may hold the width several times over
(:attr:`Axis.blocks`: an attention's stacked q, k, v projections): unit ``u`` of block
``b`` is the elements ``[(b * capacity + u) * unit, (b * capacity + u + 1) * unit)``.

The pure-torch helpers below (:func:`element_ranges`, :func:`element_index`,
:func:`zero_units_`, :func:`permute_units_`, :func:`normal_`) are the reference for
whatever kernel a module names in its declaration (:attr:`TensorSpec.normal`).

New init strategies register with :func:`register_init` (``Wiring.grow(name, n,
init=...)`` looks them up; extra keyword arguments of ``grow`` are passed to the
strategy's :meth:`InitStrategy.check` and :meth:`InitStrategy.apply_`). See
docs/adding-a-growable-module.md.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = [
    "PRODUCER",
    "CONSUMER",
    "RIDER",
    "ROLES",
    "Axis",
    "TensorSpec",
    "GrowthSpec",
    "Growable",
    "is_growable",
    "Member",
    "Slice",
    "Change",
    "InitStrategy",
    "register_init",
    "init_strategy",
    "init_names",
    "capacity",
    "tensor_of",
    "active_extent",
    "element_ranges",
    "element_index",
    "zero_units_",
    "permute_units_",
    "normal_",
    "register_owner",
    "holders",
    "active_block",
]

PRODUCER = "producer"
CONSUMER = "consumer"
RIDER = "rider"
ROLES = (PRODUCER, CONSUMER, RIDER)

#: ``normal(tensor, index, std, generator)``: fill ``tensor[index]`` with N(0, std^2) in
#: place. ``index`` is a tuple of slices (one per dimension).
NormalKernel = Callable[[Tensor, tuple, float, Optional[torch.Generator]], None]


# ---- declarations ------------------------------------------------------------------
@dataclass(frozen=True)
class Axis:
    """Dimension ``dim`` of a tensor rides the module-local width ``width`` in ``role``.

    ``unit``: elements per unit along ``dim`` (a head: ``head_dim``). ``blocks``: how many
    times the width is stacked along ``dim`` (q, k, v in one projection: 3). The
    dimension's size is ``blocks * capacity * unit``.
    """

    dim: int
    width: str
    role: str
    unit: int = 1
    blocks: int = 1

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {ROLES}")
        if self.unit < 1 or self.blocks < 1:
            raise ValueError(f"unit and blocks must be >= 1, got unit={self.unit}, blocks={self.blocks}")


@dataclass(frozen=True)
class TensorSpec:
    """One Parameter or buffer of a growable module and the widths its dimensions ride.

    Args:
        name: the attribute name in the module (``"weight"``); a ``None`` attribute (no
            bias) is skipped.
        axes: one :class:`Axis` per dimension that rides a width (at most one each);
            dimensions not listed are fixed.
        fill: the value of a new slice whatever the init strategy (``0.0`` for a bias,
            ``1.0`` for a norm's weight); ``None``: the strategy writes it (random
            weights). ``split`` copies the sources' values instead for producers and
            riders.
        fan_in_dims: the dimensions whose active extents multiply to the fan-in a
            strategy uses (He's ``std = sqrt(2 / fan_in)``); default: every dimension but
            0 (torch's convention for ``nn.Linear`` and convolutions).
        normal: the kernel that fills a block with normal values; ``None``: :func:`normal_`
            (its pure-torch twin, which tests compare the kernel against).
    """

    name: str
    axes: tuple[Axis, ...]
    fill: Optional[float] = None
    fan_in_dims: Optional[tuple[int, ...]] = None
    normal: Optional[NormalKernel] = field(default=None, compare=False)

    def axis(self, width: str) -> Optional[Axis]:
        """The axis riding module-local ``width``, or ``None``."""
        for axis in self.axes:
            if axis.width == width:
                return axis
        return None


@dataclass(frozen=True)
class GrowthSpec:
    """A growable module's declaration: its widths and every tensor riding them."""

    widths: tuple[str, ...]
    tensors: tuple[TensorSpec, ...]

    def riding(self, width: str) -> list[tuple[TensorSpec, Axis]]:
        """``(tensor, axis)`` for every tensor with a dimension on module-local ``width``."""
        return [(t, a) for t in self.tensors for a in t.axes if a.width == width]

    def role(self, width: str) -> str:
        """The role of module-local ``width``: that of its tensors (they must agree)."""
        roles = {a.role for _, a in self.riding(width)}
        if len(roles) != 1:
            raise ValueError(f"module-local width {width!r} has roles {sorted(roles)}; declare exactly one")
        return roles.pop()

    def width_with_role(self, role: str) -> Optional[str]:
        """The only module-local width in ``role`` (``None`` when none or several)."""
        found = [w for w in self.widths if self.riding(w) and self.role(w) == role]
        return found[0] if len(found) == 1 else None


@runtime_checkable
class Growable(Protocol):
    """What a module implements to be growable (besides being an ``nn.Module``).

    The module keeps its active counts (in units) as plain Python ints; it never writes
    tensors in :meth:`set_active_width_` (the wiring does, from the declaration), so a
    change is planned and validated before anything moves.
    """

    def growth_spec(self) -> GrowthSpec:
        """The declaration (may depend on the instance: e.g. whether it has a bias)."""
        ...

    def active_width(self, width: str) -> int:
        """The active count, in units, of module-local ``width``."""
        ...

    def set_active_width_(self, width: str, units: int) -> None:
        """Set the active count of module-local ``width`` (bookkeeping only: no tensor writes)."""
        ...


def is_growable(module: object) -> bool:
    """Whether ``module`` is an ``nn.Module`` following :class:`Growable`."""
    return isinstance(module, nn.Module) and isinstance(module, Growable)


# ---- geometry (pure torch) ------------------------------------------------------------
def tensor_of(module: nn.Module, spec: TensorSpec) -> Optional[Tensor]:
    """The module's tensor named ``spec.name`` (``None`` if it has none)."""
    if spec.name in module._parameters:
        return module._parameters[spec.name]
    if spec.name in module._buffers:
        return module._buffers[spec.name]
    return getattr(module, spec.name, None)


def capacity(module: nn.Module, width: str) -> int:
    """The capacity, in units, of module-local ``width``: the smallest over its tensors."""
    caps = []
    for spec, axis in module.growth_spec().riding(width):  # type: ignore[attr-defined]
        tensor = tensor_of(module, spec)
        if tensor is not None:
            caps.append(tensor.shape[axis.dim] // (axis.unit * axis.blocks))
    if not caps:
        raise ValueError(f"{type(module).__name__} has no tensor on width {width!r}")
    return min(caps)


def active_extent(module: nn.Module, spec: TensorSpec, units: Optional[Mapping[str, int]] = None) -> tuple[int, ...]:
    """The active extent of each dimension of ``spec``'s tensor, in elements.

    A dimension on a width with ``blocks == 1`` is active over its first
    ``active * unit`` elements; a fixed dimension, or one with several blocks, over all
    of it (its active elements are not a prefix: see :func:`element_ranges`). ``units``
    overrides the module's active counts (``{width: units}``), for a planned change.
    """
    tensor = tensor_of(module, spec)
    assert tensor is not None
    extent = list(tensor.shape)
    for axis in spec.axes:
        if axis.blocks == 1:
            n = units[axis.width] if units and axis.width in units else module.active_width(axis.width)  # type: ignore[attr-defined]
            extent[axis.dim] = n * axis.unit
    return tuple(extent)


def element_ranges(axis: Axis, cap: int, start: int, stop: int) -> list[tuple[int, int]]:
    """``(first element, length)`` of units ``[start, stop)`` in each block along ``axis.dim``."""
    return [((b * cap + start) * axis.unit, (stop - start) * axis.unit) for b in range(axis.blocks)] if stop > start else []


def element_index(axis: Axis, cap: int, units: Tensor) -> Tensor:
    """The element indices along ``axis.dim`` of ``units`` (a 1-D long tensor), every block."""
    within = (units[:, None] * axis.unit + torch.arange(axis.unit, device=units.device)).flatten()
    if axis.blocks == 1:
        return within
    return torch.cat([within + b * cap * axis.unit for b in range(axis.blocks)])


@torch.no_grad()
def zero_units_(tensor: Tensor, axis: Axis, cap: int, start: int, stop: int, value: Any = 0) -> None:
    """Set units ``[start, stop)`` along ``axis`` of ``tensor`` to ``value`` (0: zero)."""
    for first, length in element_ranges(axis, cap, start, stop):
        part = tensor.narrow(axis.dim, first, length)
        if value == 0:
            part.zero_()
        else:
            part.fill_(value)


@torch.no_grad()
def permute_units_(tensor: Tensor, axis: Axis, cap: int, perm: Tensor) -> None:
    """In place along ``axis``: new unit ``i`` is old unit ``perm[i]``, for ``i < len(perm)``."""
    perm = perm.to(tensor.device)
    dst = element_index(axis, cap, torch.arange(perm.numel(), device=tensor.device))
    src = element_index(axis, cap, perm)
    if axis.blocks == 1 and axis.unit == 1:
        head = tensor.narrow(axis.dim, 0, perm.numel())
        head.copy_(head.index_select(axis.dim, src))
    else:
        tensor.index_copy_(axis.dim, dst, tensor.index_select(axis.dim, src))


@torch.no_grad()
def move_units_(tensor: Tensor, axis: Axis, cap: int, src: Tensor, dst: Tensor) -> None:
    """In place along ``axis``: unit ``dst[i]`` gets old unit ``src[i]`` (the two sets disjoint)."""
    if src.numel() == 0:
        return
    src, dst = src.to(tensor.device), dst.to(tensor.device)
    tensor.index_copy_(axis.dim, element_index(axis, cap, dst), tensor.index_select(axis.dim, element_index(axis, cap, src)))


@torch.no_grad()
def normal_(tensor: Tensor, index: tuple, std: float, generator: Optional[torch.Generator] = None) -> None:
    """Pure-torch reference kernel: fill ``tensor[index]`` with N(0, std^2) in place."""
    tensor[index].normal_(0.0, std, generator=generator)


# ---- a planned change ----------------------------------------------------------------
@dataclass(frozen=True)
class Member:
    """One module of a width group and its module-local width."""

    module: nn.Module
    width: str

    @property
    def spec(self) -> GrowthSpec:
        return self.module.growth_spec()  # type: ignore[attr-defined]

    @property
    def role(self) -> str:
        return self.spec.role(self.width)


@dataclass(frozen=True)
class Slice:
    """One tensor's new units in a growth: what an :class:`InitStrategy` writes.

    ``index`` selects the new units in every block restricted to the active extents of
    the other dimensions after the growth (one tuple of slices per block); ``fan_in``
    is the product of the active extents (after the growth) of ``spec.fan_in_dims``.
    """

    member: Member
    spec: TensorSpec
    axis: Axis
    tensor: Tensor
    start: int  # first new unit
    stop: int  # one past the last new unit
    extent: tuple[int, ...]  # active extents after the growth, in elements
    capacity: int  # of the width along this axis, in units

    @property
    def role(self) -> str:
        return self.axis.role

    @property
    def module(self) -> nn.Module:
        return self.member.module

    @property
    def index(self) -> list[tuple[slice, ...]]:
        out = []
        for first, length in element_ranges(self.axis, self.capacity, self.start, self.stop):
            idx = [slice(0, e) for e in self.extent]
            idx[self.axis.dim] = slice(first, first + length)
            out.append(tuple(idx))
        return out

    @property
    def fan_in(self) -> int:
        dims = self.spec.fan_in_dims
        if dims is None:
            dims = tuple(range(1, len(self.extent)))
        return max(1, math.prod(self.extent[d] for d in dims))

    def normal_(self, std: float, generator: Optional[torch.Generator] = None) -> None:
        """Fill the new units with N(0, std^2) through the declared kernel (else :func:`normal_`)."""
        kernel = self.spec.normal or normal_
        for index in self.index:
            kernel(self.tensor, index, std, generator)

    def fill_(self, value: float) -> None:
        for index in self.index:
            self.tensor[index].fill_(value)


@dataclass
class Change:
    """A validated growth of one width by ``stop - start`` units, handed to an :class:`InitStrategy`.

    ``slices`` lists every tensor's new units, members in group order (producers
    first), each module's tensors in declaration order. The active counts are already
    the new ones when :meth:`InitStrategy.apply_` runs.
    """

    name: str
    start: int
    stop: int
    members: tuple[Member, ...]
    slices: tuple[Slice, ...]
    generator: Optional[torch.Generator] = None

    @property
    def n(self) -> int:
        return self.stop - self.start

    def by_role(self, role: str) -> list[Slice]:
        return [s for s in self.slices if s.role == role]


class InitStrategy(Protocol):
    """How a growth's new units start. Registered by name with :func:`register_init`.

    :meth:`check` runs in the plan, before anything changes (raise ``ValueError`` /
    ``TypeError`` naming the problem); :meth:`apply_` writes every :class:`Slice` of the
    change whose tensor has no declared :attr:`TensorSpec.fill` (those are written
    before it runs; a strategy may overwrite them, as ``split`` does). ``options`` are
    the extra keyword arguments of ``Wiring.grow`` (e.g. ``split_noise``, ``closure``).
    Optional: ``apply_many_(changes, **options)``, which ``Wiring.grow_many`` calls with
    every width's change at once (their new units all active) instead of ``apply_`` per
    width (see docs/adding-a-growable-module.md).
    """

    name: str

    def check(self, change: Change, **options: Any) -> None: ...

    def apply_(self, change: Change, **options: Any) -> None: ...


_INITS: dict[str, InitStrategy] = {}


def register_init(strategy: InitStrategy, *, replace: bool = False) -> InitStrategy:
    """Make ``strategy`` available as ``init=strategy.name``; returns it."""
    name = getattr(strategy, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError("an init strategy needs a non-empty str attribute 'name'")
    if name in _INITS and not replace:
        raise ValueError(f"init strategy {name!r} is already registered (pass replace=True to replace it)")
    _INITS[name] = strategy
    return strategy


def init_strategy(name: object) -> InitStrategy:
    """The strategy registered as ``name``; ``ValueError`` naming the known ones otherwise."""
    if not isinstance(name, str) or name not in _INITS:
        raise ValueError(f"unknown init {name!r} for new neurons; expected one of {init_names()}")
    return _INITS[name]


def init_names() -> tuple[str, ...]:
    """The registered init strategies' names, in registration order."""
    return tuple(_INITS)


# ---- which module holds a Parameter ----------------------------------------------------
# ``id(param) -> (weakref(param), weakrefs of the modules that registered it)``. Kept here
# rather than as an attribute of the Parameter, so that a Parameter pickles like any
# other (``torch.save(list(model.parameters()))`` loads with ``weights_only=True``). An
# entry goes when its Parameter dies; a module that no longer holds the Parameter
# (``layer.weight = other``) is ignored. An optimizer sees only Parameters: this is how it
# finds their active blocks (:func:`active_block`).
_OWNERS: dict[int, tuple[weakref.ref, tuple[weakref.ref, ...]]] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _OWNERS.get(key)
    if entry is not None and entry[0] is ref:
        del _OWNERS[key]


def register_owner(param: Tensor, module: nn.Module) -> None:
    """Record that growable ``module`` holds ``param`` (call on every assignment of a Parameter)."""
    key = id(param)
    entry = _OWNERS.get(key)
    if entry is None or entry[0]() is not param:
        _OWNERS[key] = (weakref.ref(param, lambda ref, key=key: _forget(key, ref)), (weakref.ref(module),))
        return
    modules = tuple(r for r in entry[1] if r() is not None and r() is not module)
    _OWNERS[key] = (entry[0], modules + (weakref.ref(module),))


def holders(param: Tensor) -> list[nn.Module]:
    """The live growable modules that hold ``param`` as one of their Parameters now."""
    entry = _OWNERS.get(id(param))
    if entry is None or entry[0]() is not param:
        return []
    out = []
    for ref in entry[1]:
        module = ref()
        if module is not None and any(p is param for p in module._parameters.values()):
            out.append(module)
    return out


def _block_in(module: nn.Module, param: Tensor) -> Optional[tuple[slice, ...]]:
    fast = getattr(module, "_growth_block", None)  # optional: the same answer, faster (called every step)
    if fast is not None:
        return fast(param)
    for spec in module.growth_spec().tensors:  # type: ignore[attr-defined]
        if module._parameters.get(spec.name) is param:
            if any(a.blocks != 1 for a in spec.axes):
                return None
            return tuple(slice(0, e) for e in active_extent(module, spec))
    return None


def active_block(param: Tensor) -> Optional[tuple[slice, ...]]:
    """The slices of ``param`` that its growable module uses now, or ``None``.

    For a GrowLinear: ``(slice(0, out_features), slice(0, in_features))`` for its
    ``weight``, ``(slice(0, out_features),)`` for its ``bias``. ``None`` for a tensor that
    is not a growable module's Parameter, that several modules share, or whose active
    part is not one block (stacked widths). Everything outside the block is zero (the
    weights, their gradients and the optimizer state), which is what lets an optimizer
    step over the block only (:mod:`growdense.optim`).
    """
    entry = _OWNERS.get(id(param))
    if entry is None or entry[0]() is not param:
        return None
    if len(entry[1]) == 1:
        module = entry[1][0]()
        return None if module is None else _block_in(module, param)
    found = holders(param)
    return _block_in(found[0], param) if len(found) == 1 else None


def members_of(module: nn.Module) -> Iterator[tuple[TensorSpec, Tensor]]:
    """``(spec, tensor)`` for every declared tensor the module has (absent ones skipped)."""
    for spec in module.growth_spec().tensors:  # type: ignore[attr-defined]
        tensor = tensor_of(module, spec)
        if tensor is not None:
            yield spec, tensor
