"""Growth of sharded tensors: every write of a change lands on each rank's local shard, in place.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a growable module's Parameters, their
gradients and the optimizer's state are ``DTensor``\\ s sharded along dimension 0: each
rank holds a contiguous run of rows (``torch.chunk``'s split; the last ranks' runs may be
shorter or empty). A change of width writes slices of those tensors. The helpers here
are what :mod:`growdense.protocol`, :class:`~growdense.Wiring`, :mod:`growdense.optim_state`
and :mod:`growdense.optim` call where they touch a tensor; for a plain tensor each does
exactly what the single-process code did, and for a ``DTensor`` it works on the local
shard:

- a block of global indices maps to the local rows it holds (:func:`part`,
  :func:`narrow`), which are written in place: the Parameter, its ``DTensor`` and the
  local shard keep their storage;
- a normal draw (:func:`normal_`) is made for the *whole* new slice on every rank, from
  the same generator and into a scratch block with the strides the slice has in the
  global tensor, so that the values equal a single-process growth's whatever the number
  of ranks; each rank keeps the rows it holds. Ranks must therefore pass generators in
  the same state (the wiring checks it: :func:`agree`);
- moving units along the sharded dimension (``keep="norm"`` shrinks, permutations)
  gathers the moved rows from their owners (an ``all_gather`` of the moved slice, not of
  the tensor) and each rank writes the destination rows it holds;
- a unit's norm (``keep="norm"``) is computed by the rank holding its rows and shared
  with an ``all_gather``;
- an init strategy that writes through more than :meth:`~growdense.protocol.Slice.normal_`
  and :meth:`~growdense.protocol.Slice.fill_` (``"split"``, strategies registered by users)
  runs on a gathered copy of each tensor it writes, and each rank copies its rows back
  (:func:`gathered`): correct for any strategy, at the cost of an ``all_gather`` of
  those tensors.

Supported placements: ``Shard(d)`` and ``Replicate()`` on a device mesh of any number of
dimensions, each tensor dimension sharded by at most one mesh dimension (FSDP2, and HSDP's
``(Replicate(), Shard(0))``). Anything else (``Partial``, a dimension sharded twice, tensor
parallel's strided shards) is refused before anything changes (:func:`check_supported`).

Collectives run in the same order on every rank because every rank applies the same
change to the same tensors: the wiring checks that first (:func:`agree`).
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from ._units import element_index

__all__ = [
    "is_sharded",
    "local",
    "local_ranges",
    "part",
    "narrow",
    "normal_",
    "fill_",
    "move_units_",
    "move_elements_",
    "unit_norms",
    "check_supported",
    "any_sharded",
    "agree",
    "gathered",
    "SLICE_LOCAL_INITS",
]

#: Init strategies that write only through ``Slice.normal_`` and ``Slice.fill_``: they run
#: on the local shards directly. Others run on gathered copies (see :func:`gathered`).
SLICE_LOCAL_INITS: set[str] = {"he", "zero_out"}


def _dtensor_type() -> Optional[type]:
    try:
        from torch.distributed.tensor import DTensor
    except (ImportError, RuntimeError):  # torch built without distributed
        return None
    return DTensor


_DTENSOR = _dtensor_type()


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a Parameter of a ``fully_shard``'ed module, its grad or state)."""
    return _DTENSOR is not None and isinstance(tensor, _DTENSOR)


def local(tensor: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (the storage itself, no copy); a plain tensor as is."""
    if not is_sharded(tensor):
        return tensor
    return tensor._local_tensor  # type: ignore[attr-defined]  # to_local() under autograd returns a view; same storage


def _layout(tensor: Tensor) -> list[tuple[int, int, int]]:
    """``(tensor dim, mesh dim, coordinate)`` for each mesh dimension that shards ``tensor``."""
    from torch.distributed.tensor import Replicate, Shard

    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    coordinate = mesh.get_coordinate()
    out = []
    for mesh_dim, placement in enumerate(tensor.placements):  # type: ignore[attr-defined]
        if type(placement) is Shard:
            out.append((placement.dim % tensor.dim(), mesh_dim, coordinate[mesh_dim]))
        elif not isinstance(placement, Replicate):
            raise NotImplementedError(
                f"growdense grows DTensors placed as Shard(dim) or Replicate() (FSDP2), not {placement}; "
                f"tensor parallel and partial placements are not supported yet"
            )
    dims = [d for d, _, _ in out]
    if len(set(dims)) != len(dims):
        raise NotImplementedError(
            f"growdense grows DTensors whose dimensions are each sharded by at most one mesh dimension, "
            f"got placements {tuple(tensor.placements)}"  # type: ignore[attr-defined]
        )
    return out


def _chunk(n: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of chunk ``index`` when ``torch.chunk`` splits ``n`` into ``parts`` (DTensor's Shard)."""
    size = math.ceil(n / parts) if n else 0
    start = min(index * size, n)
    return start, min(start + size, n)


def local_ranges(tensor: Tensor) -> tuple[tuple[int, int], ...]:
    """Per dimension, the ``[start, stop)`` of global indices the local shard holds."""
    ranges = [(0, n) for n in tensor.shape]
    if not is_sharded(tensor):
        return tuple(ranges)
    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    for dim, mesh_dim, coordinate in _layout(tensor):
        ranges[dim] = _chunk(tensor.shape[dim], mesh.size(mesh_dim), coordinate)
    shape = tuple(stop - start for start, stop in ranges)
    if shape != tuple(local(tensor).shape):  # a layout growdense does not know: never write it
        raise NotImplementedError(
            f"the local shard has shape {tuple(local(tensor).shape)} where growdense expects {shape} "
            f"(torch.chunk's split of {tuple(tensor.shape)} by {tuple(tensor.placements)})"  # type: ignore[attr-defined]
        )
    return tuple(ranges)


def _owners(tensor: Tensor, dim: int) -> Optional[tuple[Any, list[tuple[int, int]]]]:
    """For a dimension sharded by a mesh dimension: its process group and every member's ``[start, stop)``."""
    if not is_sharded(tensor):
        return None
    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    for d, mesh_dim, _ in _layout(tensor):
        if d == dim:
            n = mesh.size(mesh_dim)
            return mesh.get_group(mesh_dim), [_chunk(tensor.shape[dim], n, i) for i in range(n)]
    return None


def part(tensor: Tensor, index: Sequence[slice]) -> Tensor:
    """``tensor[index]`` (slices with step 1, one per leading dimension) as a view of what this rank holds.

    For a plain tensor: ``tensor[index]``. For a ``DTensor``: the local shard's view of the
    global block's intersection with the rows this rank holds (possibly empty).
    """
    index = tuple(index)
    if not is_sharded(tensor):
        return tensor[index]
    shard = local(tensor)
    out = []
    for i, (lo, hi) in enumerate(local_ranges(tensor)):
        s = index[i] if i < len(index) else slice(None)
        start, stop, step = s.indices(tensor.shape[i])
        if step != 1:
            raise ValueError("growdense.sharded.part takes slices with step 1")
        a, b = max(start, lo), min(max(stop, start), hi)
        out.append(slice(a - lo, max(a, b) - lo))
    return shard[tuple(out)]


def narrow(tensor: Tensor, dim: int, start: int, length: int) -> Tensor:
    """``tensor.narrow(dim, start, length)``, as a view of what this rank holds (see :func:`part`)."""
    if not is_sharded(tensor):
        return tensor.narrow(dim, start, length)
    index = [slice(None)] * tensor.dim()
    index[dim] = slice(start, start + length)
    return part(tensor, index)


def fill_(tensor: Tensor, index: Sequence[slice], value: Any) -> None:
    """``tensor[index].fill_(value)`` (zero_ for 0) on what this rank holds."""
    target = part(tensor, index)
    if value == 0:
        target.zero_()
    else:
        target.fill_(value)


def normal_(
    kernel: Callable[[Tensor, tuple, float, Optional[torch.Generator]], None],
    tensor: Tensor,
    index: tuple,
    std: float,
    generator: Optional[torch.Generator],
) -> None:
    """``kernel(tensor, index, std, generator)``: N(0, std^2) into ``tensor[index]``, the same values on any number of ranks.

    For a ``DTensor`` the kernel draws the whole block on every rank into a scratch
    tensor whose view of the block has the strides the block has in the contiguous global
    tensor (so torch's sampler takes the same path and makes the same values as in one
    process); each rank copies the part it holds. The scratch tensor spans the block's
    leading rows and every element of the other dimensions: a slice of the tensor, not
    the tensor.
    """
    if not is_sharded(tensor):
        kernel(tensor, index, std, generator)
        return
    index = tuple(index) + (slice(None),) * (tensor.dim() - len(index))
    rows = index[0].indices(tensor.shape[0])
    n = max(0, rows[1] - rows[0])
    scratch = torch.zeros((n, *tensor.shape[1:]), dtype=tensor.dtype, device=local(tensor).device)
    kernel(scratch, (slice(0, n),) + index[1:], std, generator)
    source, target = [], []
    for d, ((lo, hi), s) in enumerate(zip(local_ranges(tensor), index)):
        start, stop, _ = s.indices(tensor.shape[d])
        a, b = max(start, lo), min(stop, hi)
        if b <= a:
            return  # this rank holds none of the block
        target.append(slice(a - lo, b - lo))
        source.append(slice(a - rows[0], b - rows[0]) if d == 0 else slice(a, b))
    local(tensor)[tuple(target)].copy_(scratch[tuple(source)])


@torch.no_grad()
def _gather_rows(tensor: Tensor, dim: int, rows: Tensor) -> Tensor:
    """The global entries ``rows`` along sharded ``dim`` of ``tensor``, every rank, from their owners (exact)."""
    import torch.distributed as dist

    owners = _owners(tensor, dim)
    shard = local(tensor)
    if owners is None:
        return shard.index_select(dim, rows)
    group, ranges = owners
    me = dist.get_rank(group)
    lo, hi = ranges[me]
    shape = list(shard.shape)
    shape[dim] = rows.numel()
    mine = torch.zeros(shape, dtype=shard.dtype, device=shard.device)
    held = ((rows >= lo) & (rows < hi)).nonzero().flatten()
    if held.numel():
        mine.index_copy_(dim, held, shard.index_select(dim, rows[held] - lo))
    everyone = [torch.empty_like(mine) for _ in ranges]
    dist.all_gather(everyone, mine.contiguous(), group=group)
    out = torch.empty_like(mine)
    for r, (a, b) in enumerate(ranges):
        picked = ((rows >= a) & (rows < b)).nonzero().flatten()
        if picked.numel():
            out.index_copy_(dim, picked, everyone[r].index_select(dim, picked))
    return out


@torch.no_grad()
def move_elements_(tensor: Tensor, dim: int, src: Tensor, dst: Tensor) -> None:
    """In place along ``dim``: global element ``dst[i]`` gets old element ``src[i]`` (the two disjoint or a permutation)."""
    if not is_sharded(tensor):
        tensor.index_copy_(dim, dst, tensor.index_select(dim, src))
        return
    values = _gather_rows(tensor, dim, src.to(local(tensor).device))
    lo, hi = local_ranges(tensor)[dim]
    dst = dst.to(values.device)
    held = ((dst >= lo) & (dst < hi)).nonzero().flatten()
    if held.numel():
        local(tensor).index_copy_(dim, dst[held] - lo, values.index_select(dim, held))


def move_units_(tensor: Tensor, axis, cap: int, src: Tensor, dst: Tensor) -> None:
    """:func:`growdense.protocol.move_units_` for a ``DTensor``: unit ``dst[i]`` gets old unit ``src[i]``."""
    move_elements_(tensor, axis.dim, element_index(axis, cap, src), element_index(axis, cap, dst))


@torch.no_grad()
def unit_norms(parts: list[tuple[Any, int, int, Tensor, tuple[int, ...]]]) -> Optional[Tensor]:
    """Each unit's Euclidean norm over producers' active parts when one of them is sharded (else ``None``).

    ``parts``: ``(axis, capacity, width, tensor, active extent)`` for each producer tensor,
    as :func:`growdense.policies.unit_norms` collects them. Every rank reduces what it
    holds; the results are gathered and each unit's taken from the rank holding it (or
    added in rank order where a unit's elements span ranks). With one producer of
    one-row units (a linear layer's rows) each norm is computed whole, over the row, by
    the rank holding it, as in one process.
    """
    import torch.distributed as dist

    if not any(is_sharded(t) for *_, t, _ in parts):
        return None
    total: Optional[Tensor] = None
    for axis, cap, width, tensor, extent in parts:
        others = [d for d in range(tensor.dim()) if d != axis.dim and _owners(tensor, d) is not None]
        whole = len(parts) == 1 and axis.unit == 1 and axis.blocks == 1 and not others
        view = part(tensor, tuple(slice(0, e) for e in extent))
        lo, hi = local_ranges(tensor)[axis.dim]
        elements = element_index(axis, cap, torch.arange(width, device=view.device))
        held = ((elements >= lo) & (elements < hi)).nonzero().flatten()
        rows = view.index_select(axis.dim, elements[held] - lo).movedim(axis.dim, 0)
        rows = rows.flatten(1) if rows.dim() > 1 else rows[:, None]
        values = torch.zeros(elements.numel(), dtype=view.dtype, device=view.device)
        values[held] = rows.norm(dim=1) if whole else rows.pow(2).sum(dim=1)
        owners = _owners(tensor, axis.dim)
        if owners is not None:  # each element from the rank holding it
            group, ranges = owners
            everyone = [torch.empty_like(values) for _ in ranges]
            dist.all_gather(everyone, values, group=group)
            for r, (a, b) in enumerate(ranges):
                mask = (elements >= a) & (elements < b)
                values[mask] = everyone[r][mask]
        for d in others:  # partial sums over the other sharded dimensions
            group, ranges = _owners(tensor, d)  # type: ignore[misc]
            everyone = [torch.empty_like(values) for _ in ranges]
            dist.all_gather(everyone, values, group=group)
            values = everyone[0].clone()
            for other in everyone[1:]:
                values = values + other
        if whole:
            return values
        per_unit = values.reshape(axis.blocks, width, axis.unit).sum(dim=(0, 2))
        total = per_unit if total is None else total + per_unit
    assert total is not None
    return total.sqrt()


def check_supported(tensors: Iterable[Tensor]) -> None:
    """Raise ``NotImplementedError`` (nothing changed) for a ``DTensor`` whose layout growdense cannot write."""
    for t in tensors:
        if is_sharded(t):
            local_ranges(t)


def initialized_dist():
    """``torch.distributed`` when a default process group exists, else ``None`` (no tensor can then be a ``DTensor``)."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def any_sharded(tensors: Iterable[Tensor]) -> Optional[Tensor]:
    """The first ``DTensor`` among ``tensors``, or ``None``."""
    for t in tensors:
        if is_sharded(t):
            return t
    return None


def _generator_digest(generator: Optional[torch.Generator]) -> Optional[str]:
    if generator is None:
        return None
    return hashlib.sha1(generator.get_state().numpy().tobytes()).hexdigest()


def _plain(value: Any) -> Any:
    """A comparable, picklable stand-in for a call's argument."""
    if isinstance(value, Tensor):
        return ("tensor", value.tolist())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    return repr(value)


def agree(
    example: Tensor,
    what: str,
    call: dict,
    widths: dict,
    generator: Optional[torch.Generator],
    problem: Optional[str] = None,
) -> None:
    """Raise on every rank unless every rank of ``example``'s mesh makes the same change from the same widths.

    ``call``: the change's arguments (``{"n": 3, "init": "he"}``; tensors and sequences are
    compared by value, other objects by ``repr``), ``widths``: the
    wiring's widths and capacities before it, ``generator``: the growth's generator, whose
    state must match too (the ranks draw the whole new slice each, and keep their rows).
    One ``all_gather`` of a 20-byte digest per mesh dimension (and an ``all_gather_object``
    to name the difference when there is one); called before anything changes, so a
    refused change changes nothing on any rank.
    """
    import torch.distributed as dist

    mine = {"call": {k: _plain(v) for k, v in call.items()}, "widths": widths, "generator": _generator_digest(generator),
            "problem": problem}
    digest = torch.tensor(list(hashlib.sha1(repr(mine).encode()).digest()), dtype=torch.uint8, device=local(example).device)
    mesh = example.device_mesh  # type: ignore[attr-defined]
    for mesh_dim in range(mesh.ndim):
        group = mesh.get_group(mesh_dim)
        digests = [torch.empty_like(digest) for _ in range(dist.get_world_size(group))]
        dist.all_gather(digests, digest, group=group)  # one small collective when the ranks agree
        if all(torch.equal(d, digest) for d in digests):
            continue
        everyone: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, mine, group=group)  # they do not: say how
        for rank, theirs in enumerate(everyone):
            if theirs["problem"] is not None:
                raise NotImplementedError(
                    f"cannot {what} on rank {dist.get_global_rank(group, rank)}: {theirs['problem']}. "
                    f"Nothing was changed on any rank"
                )
            if theirs == mine:
                continue
            for key in ("widths", "call", "generator"):
                if theirs[key] != mine[key]:
                    noun = {
                        "widths": "widths and capacities",
                        "call": "arguments",
                        "generator": "generator states (seed the generator the same on every rank)",
                    }[key]
                    raise RuntimeError(
                        f"cannot {what}: the ranks of the mesh disagree on the {noun}: this rank "
                        f"({dist.get_rank()}) has {mine[key]}, rank {dist.get_global_rank(group, rank)} has "
                        f"{theirs[key]}. Nothing was changed on any rank"
                    )


@contextmanager
def gathered(change) -> Iterator[Any]:
    """A copy of ``change`` whose sharded tensors are gathered whole; on exit each rank copies its part back.

    For init strategies that index tensors freely (see :data:`SLICE_LOCAL_INITS`). The
    copy back overwrites each local shard with its own rows of the gathered tensor:
    what the strategy did not write comes back as it was.
    """
    if change.init in SLICE_LOCAL_INITS or not any(is_sharded(s.tensor) for s in change.slices):
        yield change
        return
    full: dict[int, tuple[Tensor, Tensor]] = {}
    slices = []
    for s in change.slices:
        if is_sharded(s.tensor):
            key = id(s.tensor)
            if key not in full:
                full[key] = (s.tensor, s.tensor.full_tensor())
            slices.append(replace(s, tensor=full[key][1]))
        else:
            slices.append(s)
    yield replace(change, slices=tuple(slices))
    for tensor, whole in full.values():
        index = tuple(slice(lo, hi) for lo, hi in local_ranges(tensor))
        local(tensor).copy_(whole[index])
