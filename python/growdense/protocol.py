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

A module-local width may carry several roles on different tensors: an attention's
``"heads"`` are computed by its q/k/v rows (producer) and read by its output
projection's columns (consumer); its ``"embed_dim"`` (the residual stream) is read by the
q/k/v columns and written by the output projection's rows. Each :class:`Axis` names its
role; :meth:`GrowthSpec.roles` lists a width's.

One *unit* of a width may span several elements (:attr:`Axis.unit`: a head is
``head_dim`` rows) and a dimension may hold the width several times over
(:attr:`Axis.blocks`: an attention's stacked q, k, v projections): unit ``u`` of block
``b`` is the elements ``[(b * capacity + u) * unit, (b * capacity + u + 1) * unit)``.

The pure-torch helpers below (:func:`element_ranges`, :func:`element_index`,
:func:`zero_units_`, :func:`permute_units_`, :func:`move_units_`, :func:`normal_`) are the reference for
whatever kernel a module names in its declaration (:attr:`TensorSpec.normal`).

A tensor may also declare, per init strategy, what its new slices get
(:attr:`TensorSpec.inits`: a constant or a :class:`Normal` draw), e.g. an embedding's
columns: N(0, 1) under ``"he"`` (the module's own initialisation), zero under
``"zero_out"``. A module that keeps state beyond its declared tensors (a norm's ramp) may
define ``on_grow_(width, start, stop, init, **options)``: the wiring calls it after
writing a growth's new slices (see :class:`Growable`).

New init strategies register with :func:`register_init` (``Wiring.grow(name, n,
init=...)`` looks them up; extra keyword arguments of ``grow`` are passed to the
strategy's :meth:`InitStrategy.check` and :meth:`InitStrategy.apply_`). See
docs/adding-a-growable-module.md.
"""

from __future__ import annotations

import itertools
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import Tensor, nn

from . import sharded
from ._units import element_index, element_ranges

__all__ = [
    "PRODUCER",
    "CONSUMER",
    "RIDER",
    "ROLES",
    "Axis",
    "Normal",
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
    "move_units_",
    "move_and_fill_units_",
    "draw_normal_",
    "normal_",
    "register_owner",
    "holders",
    "active_block",
    "bounding_block",
    "call_on_grow_",
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
class Normal:
    """A declared value for new slices: a draw from N(0, ``std``^2) (see :attr:`TensorSpec.inits`)."""

    std: float

    def __post_init__(self) -> None:
        if not (isinstance(self.std, (int, float)) and math.isfinite(self.std) and self.std >= 0):
            raise ValueError(f"Normal std must be a finite number >= 0, got {self.std!r}")


def _memo(owner: object, cache: str, key: Any, compute: Callable[[], Any]) -> Any:
    """``compute()`` for ``key``, once: kept in ``owner.<cache>`` (a frozen declaration, whose answers never change)."""
    found = owner.__dict__.get(cache)
    if found is None:
        found = {}
        object.__setattr__(owner, cache, found)
    value = found.get(key)
    if value is None:
        value = found[key] = compute()
    return value


@dataclass(frozen=True)
class TensorSpec:
    """One Parameter or buffer of a growable module and the widths its dimensions ride.

    Args:
        name: the attribute name in the module (``"weight"``), or a dotted path into a
            submodule (``"out_proj.weight"``); a ``None`` attribute (no bias) is skipped.
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
        inits: per init strategy name, what a new slice gets under it: a constant
            (``0.0``) or a :class:`Normal` draw (through :attr:`normal`); as pairs
            ``(("he", Normal(1.0)), ("zero_out", 0.0))``. Written, like :attr:`fill`,
            before the strategy runs, and the strategy leaves such slices alone (``split``
            still copies producers' and riders' sources). Under an init not listed, the
            strategy decides (a rider without a fill: left zero).
    """

    name: str
    axes: tuple[Axis, ...]
    fill: Optional[float] = None
    fan_in_dims: Optional[tuple[int, ...]] = None
    normal: Optional[NormalKernel] = field(default=None, compare=False)
    inits: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        for entry in self.inits:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)):
                raise TypeError(f"TensorSpec {self.name!r}: inits are (init name, value) pairs, got {entry!r}")
            if not isinstance(entry[1], (int, float, Normal)) or isinstance(entry[1], bool):
                raise TypeError(
                    f"TensorSpec {self.name!r}: the value for init {entry[0]!r} must be a number or a Normal, "
                    f"got {entry[1]!r}"
                )

    def axis(self, width: str) -> Optional[Axis]:
        """The axis riding module-local ``width``, or ``None``."""
        for axis in self.axes:
            if axis.width == width:
                return axis
        return None

    def stacked_besides(self, dim: int) -> tuple[Axis, ...]:
        """The axes on other dimensions than ``dim`` that stack their width in several blocks."""
        return _memo(self, "_stacked_cache", dim, lambda: tuple(a for a in self.axes if a.dim != dim and a.blocks > 1))

    def declared(self, init: str) -> Any:
        """What a new slice gets under ``init`` whatever the strategy: :attr:`fill`, else ``inits[init]``, else ``None``."""
        if self.fill is not None:
            return self.fill
        for name, value in self.inits:
            if name == init:
                return value
        return None


@dataclass(frozen=True)
class GrowthSpec:
    """A growable module's declaration: its widths and every tensor riding them."""

    widths: tuple[str, ...]
    tensors: tuple[TensorSpec, ...]

    def riding(self, width: str) -> list[tuple[TensorSpec, Axis]]:
        """``(tensor, axis)`` for every tensor with a dimension on module-local ``width``."""
        return list(self._derived(width)[0])

    def roles(self, width: str) -> tuple[str, ...]:
        """The roles of module-local ``width``'s tensors, in :data:`ROLES` order (one or several)."""
        return self._derived(width)[1]

    def _derived(self, width: str) -> tuple[tuple[tuple[TensorSpec, Axis], ...], tuple[str, ...]]:
        """``(riding, roles)`` of ``width``, computed once per width (the declaration is frozen)."""
        def derive() -> tuple[tuple[tuple[TensorSpec, Axis], ...], tuple[str, ...]]:
            riding = tuple((t, a) for t in self.tensors for a in t.axes if a.width == width)
            present = {a.role for _, a in riding}
            return riding, tuple(r for r in ROLES if r in present)

        return _memo(self, "_derived_cache", width, derive)

    def role(self, width: str) -> str:
        """The role of module-local ``width`` when its tensors all play one (else ``ValueError``: see :meth:`roles`)."""
        roles = self.roles(width)
        if len(roles) != 1:
            raise ValueError(
                f"module-local width {width!r} has roles {list(roles)}; use roles() for a width with several"
            )
        return roles[0]

    def width_with_role(self, role: str) -> Optional[str]:
        """The only module-local width whose tensors all play ``role`` (``None`` when none or several)."""
        found = [w for w in self.widths if self.roles(w) == (role,)]
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

    # Optional (not part of the runtime check):
    #
    # def on_grow_(self, width: str, start: int, stop: int, init: str, **options) -> None:
    #     """Called by the wiring after it wrote units [start, stop) of ``width`` (new
    #     active count already set): update state beyond the declared tensors (a norm
    #     starts its ramp under init="zero_out"). ``options`` are the strategy's."""
    #
    # def _growth_block(self, param) -> Optional[tuple[slice, ...]]:
    #     """active_block(param), faster than the generic answer (called every step)."""


def call_on_grow_(module: nn.Module, width: str, start: int, stop: int, init: str, options: Mapping[str, Any]) -> None:
    """Call ``module.on_grow_`` if it has one (see :class:`Growable`)."""
    cls = type(module)
    plain = getattr(cls, "__getattr__", None) is nn.Module.__getattr__
    if plain and not hasattr(cls, "on_grow_") and "on_grow_" not in module.__dict__:
        return  # (asked of the class: a failed lookup through nn.Module.__getattr__ costs an exception)
    hook = getattr(module, "on_grow_", None)
    if hook is not None:
        hook(width, start, stop, init, **options)


def is_growable(module: object) -> bool:
    """Whether ``module`` is an ``nn.Module`` following :class:`Growable`."""
    return isinstance(module, nn.Module) and isinstance(module, Growable)


# ---- geometry (pure torch) ------------------------------------------------------------
def _resolve(module: nn.Module, name: str) -> tuple[Optional[nn.Module], str]:
    """The submodule holding the tensor at dotted path ``name`` and its attribute name."""
    owner, _, attr = name.rpartition(".")
    if not owner:
        return module, attr
    try:
        return module.get_submodule(owner), attr
    except AttributeError:
        return None, attr


def tensor_of(module: nn.Module, spec: Union[TensorSpec, str]) -> Optional[Tensor]:
    """The module's tensor at ``spec.name`` (a dotted path reaches into submodules); ``None`` if it has none."""
    name = spec if isinstance(spec, str) else spec.name
    holder: Optional[nn.Module] = module
    if "." in name:
        holder, name = _resolve(module, name)
        if holder is None:
            return None
    if name in holder._parameters:
        return holder._parameters[name]
    if name in holder._buffers:
        return holder._buffers[name]
    value = getattr(holder, name, None)
    return value if isinstance(value, Tensor) else None


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


@torch.no_grad()
def zero_units_(tensor: Tensor, axis: Axis, cap: int, start: int, stop: int, value: Any = 0) -> None:
    """Set units ``[start, stop)`` along ``axis`` of ``tensor`` to ``value`` (0: zero)."""
    for first, length in element_ranges(axis, cap, start, stop):
        part = sharded.narrow(tensor, axis.dim, first, length)  # a DTensor: the rows this rank holds
        if value == 0:
            part.zero_()
        else:
            part.fill_(value)


@torch.no_grad()
def permute_units_(tensor: Tensor, axis: Axis, cap: int, perm: Tensor) -> None:
    """In place along ``axis``: new unit ``i`` is old unit ``perm[i]``, for ``i < len(perm)``."""
    if sharded.is_sharded(tensor):
        sharded.move_units_(tensor, axis, cap, perm, torch.arange(perm.numel(), device=perm.device))
        return
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
    if sharded.is_sharded(tensor):
        sharded.move_units_(tensor, axis, cap, src, dst)
        return
    src, dst = src.to(tensor.device), dst.to(tensor.device)
    tensor.index_copy_(axis.dim, element_index(axis, cap, dst), tensor.index_select(axis.dim, element_index(axis, cap, src)))


def producer_parts(members) -> list[tuple[Axis, int, int, Tensor, tuple[int, ...]]]:
    """``(axis, capacity, width, tensor, active extent)`` of every producer tensor without a
    declared fill (a bias has one) among a width group's ``members``: what a unit's norm reads."""
    parts = []
    for m in members:
        if PRODUCER not in m.roles:
            continue
        cap = capacity(m.module, m.width)
        width = m.module.active_width(m.width)
        for spec, t in members_of(m.module):
            axis = spec.axis(m.width)
            if axis is not None and axis.role == PRODUCER and spec.fill is None:
                parts.append((axis, cap, width, t, active_extent(m.module, spec)))
    return parts


#: Rows of a tensor handled at once by :func:`move_and_fill_units_` along its last
#: dimension: about this many bytes, so a block stays in the CPU's L2 cache between its
#: gather, its scatter and its fill.
_BLOCK_BYTES = 1 << 21


@torch.no_grad()
def move_and_fill_units_(
    tensor: Tensor,
    axis: Axis,
    cap: int,
    src: Optional[Tensor],
    dst: Optional[Tensor],
    start: int,
    stop: int,
    value: Any = 0,
    *,
    disjoint: bool = False,
    scratch: Optional[Tensor] = None,
) -> None:
    """In place along ``axis``: unit ``dst[i]`` gets old unit ``src[i]``, then units ``[start, stop)`` become ``value``.

    The same result as :func:`move_units_` then :func:`zero_units_` (their reference),
    with the least memory traffic the layout allows and no buffer of the tensor's size:
    along dimension 0 the moved rows go through a cache-sized buffer (all at once unless
    ``disjoint``: no unit is both a source and a destination) and the filled ones are
    written once; along the last dimension of a contiguous tensor (a consumer's columns)
    one block of rows at a time is gathered, scattered and filled while it is in cache,
    instead of three passes over the whole tensor and a strided ``index_copy_``.
    ``src`` and ``dst`` (1-D long) may be ``None`` or empty: no move. ``scratch``: a 1-D
    tensor of ``tensor``'s dtype and device to use as the buffer (its size bounds the
    blocks; reused across calls it spares new memory); default: one of about
    ``_BLOCK_BYTES``.
    """
    moving = src is not None and dst is not None and src.numel() > 0
    if not moving:
        zero_units_(tensor, axis, cap, start, stop, value)
        return
    assert src is not None and dst is not None
    if sharded.is_sharded(tensor):  # a DTensor: rows move across ranks (the reference's sharded path)
        move_units_(tensor, axis, cap, src, dst)
        zero_units_(tensor, axis, cap, start, stop, value)
        return
    src, dst = src.to(tensor.device), dst.to(tensor.device)
    simple = axis.unit == 1 and axis.blocks == 1
    moves = src.numel()
    if scratch is None or scratch.dtype != tensor.dtype or scratch.device != tensor.device:
        scratch = torch.empty(max(1, _BLOCK_BYTES // tensor.element_size()), dtype=tensor.dtype, device=tensor.device)
    if simple and tensor.dim() >= 2 and axis.dim == tensor.dim() - 1 and tensor.is_contiguous():
        width = tensor.shape[-1]
        rows = tensor.view(-1, width)
        block = max(1, min(_BLOCK_BYTES // max(1, width * tensor.element_size()), scratch.numel() // moves))
        block = min(block, rows.shape[0])
        s_all, d_all = src.expand(block, -1), dst.expand(block, -1)
        for first in range(0, rows.shape[0], block):
            part = rows[first : first + block]
            n = part.shape[0]
            buf = scratch[: n * moves].view(n, moves) if n * moves <= scratch.numel() else None
            gathered = torch.gather(part, 1, s_all[:n], out=buf) if buf is not None else part.gather(1, s_all[:n])
            part.scatter_(1, d_all[:n], gathered)
            if stop > start:
                tail = part[:, start:stop]
                tail.zero_() if value == 0 else tail.fill_(value)
        return
    if simple and axis.dim == 0:
        row = tensor[0].numel() if tensor.dim() > 0 else 1
        chunk = moves if not disjoint else max(1, scratch.numel() // max(1, row))
        for first in range(0, moves, chunk):
            s, d = src[first : first + chunk], dst[first : first + chunk]
            need = s.numel() * row
            if need <= scratch.numel():
                buf = scratch[:need].view(s.numel(), *tensor.shape[1:])
                torch.index_select(tensor, 0, s, out=buf)
            else:
                buf = tensor.index_select(0, s)
            tensor.index_copy_(0, d, buf)
    else:
        move_units_(tensor, axis, cap, src, dst)
    zero_units_(tensor, axis, cap, start, stop, value)


# The most values a draw into a non-contiguous block stages at once (16 KiB of float32).
DRAW_CHUNK = 1 << 12


def draw_normal_(view: Tensor, std: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """Fill ``view`` with N(0, std^2) in place; the order of the draws is growdense's definition of He values.

    A contiguous view is drawn as it is. torch draws a non-contiguous tensor value by
    value (on the CPU about 15 times slower than a contiguous one), so a non-contiguous
    view (a block of rows narrower than the capacity) is drawn in contiguous chunks of
    whole leading-dimension slices, at most :data:`DRAW_CHUNK` values each, and copied in.
    ``growdense::normal_block_`` on the CPU draws the same values the same way. A ``DTensor``
    view is drawn by its own ``normal_`` (a ``Wiring`` draws sharded blocks through
    :func:`growdense.sharded.normal_` instead, into plain scratch tensors).
    """
    if torch.is_grad_enabled():  # (a decorator would cost more than the draw of a small block)
        with torch.no_grad():
            return draw_normal_(view, std, generator)
    if view.numel() == 0 or view.dim() == 0 or view.is_contiguous() or sharded.is_sharded(view):
        return view.normal_(0.0, std, generator=generator)
    rows = view.shape[0]
    step = max(1, DRAW_CHUNK // max(1, view[0].numel()))
    scratch = torch.empty((min(step, rows), *view.shape[1:]), dtype=view.dtype, device=view.device)
    for start in range(0, rows, step):
        part = view[start:start + step]
        chunk = scratch[: part.shape[0]]
        chunk.normal_(0.0, std, generator=generator)
        part.copy_(chunk)
    return view


def normal_(tensor: Tensor, index: tuple, std: float, generator: Optional[torch.Generator] = None) -> None:
    """Pure-torch reference kernel: fill ``tensor[index]`` with N(0, std^2) in place (see :func:`draw_normal_`)."""
    if torch.is_grad_enabled():
        with torch.no_grad():
            return draw_normal_(tensor[index], std, generator)
    draw_normal_(tensor[index], std, generator)


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
    def roles(self) -> tuple[str, ...]:
        """The roles its tensors play along the width (see :meth:`GrowthSpec.roles`)."""
        return self.spec.roles(self.width)

    @property
    def role(self) -> str:
        """Its role, or its roles joined by ``"+"`` (``"producer+consumer"``) when it plays several."""
        return "+".join(self.roles)


@dataclass(eq=False, slots=True)
class Slice:
    """One tensor's new units in a growth: what an :class:`InitStrategy` writes.

    ``index`` selects the new units in every block restricted to the active extents of
    the other dimensions after the growth (one tuple of slices per block); ``fan_in``
    is the product of the active extents (after the growth) of ``spec.fan_in_dims``.
    ``ranges`` are the new units' ``(first element, length)`` along the axis, one per
    block; ``stacked`` the tensor's other axes that stack their width in several blocks.
    """

    member: Member
    spec: TensorSpec
    axis: Axis
    tensor: Tensor
    start: int  # first new unit
    stop: int  # one past the last new unit
    extent: tuple[int, ...]  # active extents after the growth, in elements
    capacity: int  # of the width along this axis, in units
    role: str = field(init=False, repr=False)
    ranges: list[tuple[int, int]] = field(init=False, repr=False)
    stacked: tuple[Axis, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        axis = self.axis
        self.role = axis.role
        self.ranges = element_ranges(axis, self.capacity, self.start, self.stop)
        self.stacked = self.spec.stacked_besides(axis.dim)

    @property
    def module(self) -> nn.Module:
        return self.member.module

    @property
    def index(self) -> list[tuple[slice, ...]]:
        """One tuple of slices per rectangle of the new units: every block of this axis, and
        along another dimension whose width is stacked in blocks, each block's active units."""
        dim_ = self.axis.dim
        if not self.stacked:
            rest = [slice(0, e) for e in self.extent]
            out = []
            for first, length in self.ranges:
                rest[dim_] = slice(first, first + length)
                out.append(tuple(rest))
            return out
        per_dim: list[list[tuple[int, int]]] = []
        for dim, extent in enumerate(self.extent):
            if dim == dim_:
                per_dim.append(self.ranges)
                continue
            other = next((a for a in self.stacked if a.dim == dim), None)
            if other is not None:
                cap = self.tensor.shape[dim] // (other.unit * other.blocks)
                per_dim.append(element_ranges(other, cap, 0, self.module.active_width(other.width)))  # type: ignore[attr-defined]
            else:
                per_dim.append([(0, extent)])
        return [tuple(slice(f, f + n) for f, n in combo) for combo in itertools.product(*per_dim)]

    def zero_stacked_outside_(self) -> None:
        """Zero the inactive units of this tensor's other stacked widths (blocks > 1): a safety
        net for strategies that write whole active extents (``split``)."""
        for other in self.stacked:
            cap = self.tensor.shape[other.dim] // (other.unit * other.blocks)
            zero_units_(self.tensor, other, cap, self.module.active_width(other.width), cap)  # type: ignore[attr-defined]

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
            sharded.normal_(kernel, self.tensor, index, std, generator)  # a DTensor: same draws, local rows

    def fill_(self, value: float) -> None:
        for index in self.index:
            sharded.fill_(self.tensor, index, value)

    def declared(self, init: str) -> Any:
        """What the declaration gives this slice under ``init`` (see :meth:`TensorSpec.declared`)."""
        return self.spec.declared(init)

    def write_declared_(self, init: str, generator: Optional[torch.Generator] = None) -> bool:
        """Write the declared value under ``init`` (a constant or a :class:`Normal` draw); whether there was one."""
        value = self.declared(init)
        if value is None:
            return False
        if isinstance(value, Normal):
            self.normal_(value.std, generator)
        elif value != 0:  # new slices are zero already (outside the active part)
            self.fill_(value)
        return True


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
    init: str = ""  # the strategy's name

    @property
    def n(self) -> int:
        return self.stop - self.start

    def by_role(self, role: str) -> list[Slice]:
        return [s for s in self.slices if s.role == role]


class InitStrategy(Protocol):
    """How a growth's new units start. Registered by name with :func:`register_init`.

    :meth:`check` runs in the plan, before anything changes (raise ``ValueError`` /
    ``TypeError`` naming the problem); :meth:`apply_` writes every :class:`Slice` of the
    change that has no declared value under its name (``slice.declared(change.init)``:
    a :attr:`TensorSpec.fill` or an entry of :attr:`TensorSpec.inits`; those are written
    before it runs; a strategy may overwrite them, as ``split`` does). ``options`` are
    the extra keyword arguments of ``Wiring.grow`` (e.g. ``split_noise``, ``closure``).
    Optional: ``apply_many_(changes, **options)``, which ``Wiring.grow_many`` calls with
    every width's change at once (their new units all active) instead of ``apply_`` per
    width (see docs/adding-a-growable-module.md); ``writes_only_data = True``, a promise
    that it writes nothing but the slices' tensors (no gradient, no optimizer state, no
    user code that could): the wiring then leaves the new units' gradients and optimizer
    state as they were (zero) without looking at them again.
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


def forget_owners(params: Iterable[Optional[Tensor]]) -> None:
    """Drop the records of ``params`` (register them again after): ``torch.utils.swap_tensors``
    refuses a tensor that has weak references, and ``Module._apply`` (``.to()``) swaps the
    Parameters of a ``fully_shard``'ed module (``DTensor``\\ s) that way."""
    for param in params:
        entry = None if param is None else _OWNERS.get(id(param))
        if entry is not None and entry[0]() is param:
            del _OWNERS[id(param)]


def holders(param: Tensor) -> list[nn.Module]:
    """The live growable modules that hold ``param`` as one of their Parameters now."""
    entry = _OWNERS.get(id(param))
    if entry is None or entry[0]() is not param:
        return []
    out = []
    for ref in entry[1]:
        module = ref()
        if module is not None and _holds(module, param):
            out.append(module)
    return out


def other_holders(param: Tensor, module: nn.Module) -> list[nn.Module]:
    """The live growable modules other than ``module`` that hold ``param`` now."""
    entry = _OWNERS.get(id(param))
    if entry is None or entry[0]() is not param:
        return []
    if len(entry[1]) == 1 and entry[1][0]() is module:
        return []
    return [h for h in holders(param) if h is not module]


def _holds(module: nn.Module, param: Tensor) -> bool:
    """Whether ``module`` holds ``param`` now: as its own Parameter or as a declared tensor (a dotted path)."""
    if any(p is param for p in module._parameters.values()):
        return True
    return any(t is param for _, t in members_of(module))


def _block_in(module: nn.Module, param: Tensor) -> Optional[tuple[slice, ...]]:
    fast = getattr(module, "_growth_block", None)  # optional: the same answer, faster (called every step)
    if fast is not None:
        return fast(param)
    for spec in module.growth_spec().tensors:  # type: ignore[attr-defined]
        if tensor_of(module, spec) is param:
            return bounding_block(module, spec, param)
    return None


def bounding_block(module: nn.Module, spec: TensorSpec, tensor: Tensor) -> tuple[slice, ...]:
    """The smallest block ``(slice(0, e), ...)`` of ``tensor`` holding its active part.

    Along a width with several blocks (q, k, v stacked) it runs to the end of the last
    block's active units, so it also holds the inactive units of the earlier blocks
    (zero, as everything outside the active part).
    """
    extent = list(tensor.shape)
    for axis in spec.axes:
        n = module.active_width(axis.width)  # type: ignore[attr-defined]
        cap = tensor.shape[axis.dim] // (axis.unit * axis.blocks)
        extent[axis.dim] = ((axis.blocks - 1) * cap + n) * axis.unit if n else 0
    return tuple(slice(0, e) for e in extent)


def active_block(param: Tensor) -> Optional[tuple[slice, ...]]:
    """The slices of ``param`` that its growable module uses now, or ``None``.

    For a GrowLinear: ``(slice(0, out_features), slice(0, in_features))`` for its
    ``weight``, ``(slice(0, out_features),)`` for its ``bias``. ``None`` for a tensor that
    is not a growable module's Parameter, or that several modules share. Where the active
    part is not one block (q, k and v stacked in one tensor, each with its active heads),
    the smallest block holding it (:func:`bounding_block`). Everything outside the block is zero (the
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
