"""Growth and shrink policies: how new neurons start, and which neurons a shrink keeps.

A hidden width is produced by one :class:`~growdense.GrowLinear` (its output rows) and
consumed by one or more (their input columns). :class:`~growdense.Wiring` validates a
call, then asks this module what to write (growth) or which neurons to keep (shrink).

Growth policies (``init``)
--------------------------

Growing a hidden width by ``n`` adds ``n`` rows to the
producer (*incoming* weights and bias) and ``n`` columns to every consumer (*outgoing*
weights). The strategies differ in what they write there:

``"he"``
    He-normal incoming *and* outgoing weights, zero bias, as in the study this project
    starts from (which saw a loss spike at each growth). Incoming std
    ``sqrt(2 / producer.in_features)``, outgoing std ``sqrt(2 / consumer.in_features)``
    (the consumer's new width). He et al., "Delving Deep into Rectifiers", ICCV 2015.
    Preserves nothing: the new neurons immediately change the output.

``"zero_out"``
    He-normal incoming weights, zero bias, *zero* outgoing weights. The network's function
    is exactly unchanged at the moment of growth (the new neurons are multiplied by zero),
    while the gradient of the outgoing weights is non-zero (the new neurons are active), so
    they start learning at the next step. Function-preserving growth in the sense of
    Net2Net (Chen et al., 2016); zero outgoing weights with random incoming ones is the
    "Random" baseline of GradMax (Evci et al., "GradMax: Growing Neural Networks using
    Gradient Information", ICLR 2022).

``"split"``
    Net2WiderNet (Chen, Goodfellow, Shlens, "Net2Net: Accelerating Learning via Knowledge
    Transfer", ICLR 2016): each new neuron copies the incoming weights and bias of a
    source neuron drawn without replacement from the active ones (with replacement in
    rounds when ``n`` exceeds the width); the source's outgoing weights ``w`` are split
    into ``w/2 + e`` (source) and ``w/2 - e`` (copy), with ``e`` small Gaussian noise
    (std ``split_noise`` times the std of the consumer's active weights) that breaks the
    symmetry between the two. Since source and copy compute the same activation, the
    function is preserved up to float rounding (the sum ``(w/2 + e) + (w/2 - e)``).

``"gradmax"``, ``"tiny"``
    Gradient-guided: GradMax (Evci et al., "GradMax: Growing Neural Networks using
    Gradient Information", ICLR 2022) and TINY (Verbockhaven et al., "Growing Tiny
    Networks: Spotting Expressivity Bottlenecks and Fixing Them Optimally", TMLR 2024).
    They need ``closure=``, a function that computes and returns the loss on data the
    caller chooses; see :mod:`growdense.gradient_growth` and
    ``docs/gradient-guided-growth.md``. GradMax's new incoming weights are zero: with a
    fused ReLU and bias 0 the new neurons sit at ReLU's kink, where the derivative is 0,
    so they never learn; ``bias=b`` with ``b > 0`` keeps them active
    (the consumers' biases compensate, the function is unchanged).

Keep policies (``keep``)
------------------------

``"first"``
    Neurons ``0 .. to-1`` stay (the study's Approach 2).

``"norm"``
    The ``to`` neurons whose *incoming* weight row in the producer (over its active
    inputs, bias not included) has the largest Euclidean norm; ties go to the lower index.
    They keep their relative order.

a sequence (or 1-D integer tensor) of ``to`` distinct indices in ``[0, width)``
    Those neurons, in that order.

The kept neurons are moved to the front by one permutation (:func:`permutation`), which
the wiring applies to the producer's rows, the consumers' columns, their gradients and
optimizer state together.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import protocol, sharded
from ._checks import check_int, check_nonnegative_real
from .init_strategies import GROW_INITS, check_init

__all__ = ["GROW_INITS", "KEEP_CHOICES", "Keep", "check_init", "check_split_noise", "kept_indices", "permutation"]

KEEP_CHOICES = ("first", "norm")
Keep = Union[str, Sequence[int], Tensor]


def check_split_noise(split_noise: float) -> float:
    """``split_noise`` as a float; raises unless it is a finite real number >= 0."""
    return check_nonnegative_real("split_noise", split_noise)


def check_generator(generator: Optional[torch.Generator]) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


# ---- shrinking -----------------------------------------------------------------------
def kept_indices(name: str, hidden, to: int, keep: Keep) -> Optional[Tensor]:
    """Validate a shrink of hidden width ``name`` to ``to``; the kept indices in their new order.

    ``None`` means the first ``to`` (nothing moves). Raises, changing nothing, on a bad
    ``to`` or ``keep``.
    """
    to = check_int("to", to)
    first = hidden.members[0]
    width = first.module.active_width(first.width)
    device = next(t for _, t in protocol.members_of(first.module)).device
    if not 1 <= to <= width:
        raise ValueError(
            f"cannot shrink {name!r} from {width} to {to}: the new width must be between 1 and {width}"
            + ("; use grow() to widen" if to > width else "")
        )
    if isinstance(keep, str):
        if keep == "first":
            return None
        if keep == "norm":
            return _largest_norm(hidden, to)
        raise ValueError(f"unknown keep {keep!r}; expected one of {KEEP_CHOICES} or a sequence of indices")
    if isinstance(keep, Tensor):
        if keep.dim() != 1 or keep.dtype.is_floating_point or keep.dtype.is_complex or keep.dtype == torch.bool:
            raise TypeError(f"keep indices must be a 1-D integer tensor, got {keep.dtype} of shape {tuple(keep.shape)}")
        indices = [int(i) for i in keep.tolist()]
    else:
        try:
            indices = [check_int("keep index", i) for i in keep]
        except TypeError as error:
            raise TypeError(f"keep must be 'first', 'norm' or a sequence of int indices: {error}") from None
    if len(indices) != to:
        raise ValueError(f"shrinking {name!r} to {to} needs exactly {to} keep indices, got {len(indices)}")
    bad = [i for i in indices if not 0 <= i < width]
    if bad:
        raise ValueError(f"keep indices {bad} are out of range for {name!r} of width {width} (valid: 0..{width - 1})")
    if len(set(indices)) != len(indices):
        dups = sorted({i for i in indices if indices.count(i) > 1})
        raise ValueError(f"keep indices for {name!r} contain duplicates: {dups}")
    return torch.tensor(indices, dtype=torch.long, device=device)


@torch.no_grad()
def unit_norms(hidden) -> Tensor:
    """Each unit's Euclidean norm over its producers' incoming weights (their active parts, no bias).

    The producers' tensors without a declared fill (biases have one) count; a unit of
    several elements counts all of them.
    """
    found = protocol.producer_parts(hidden.members)
    norms = sharded.unit_norms(found)  # None unless a producer is a DTensor (FSDP2)
    if norms is not None:
        return norms
    parts = [(axis, cap, width, t[tuple(slice(0, e) for e in extent)]) for axis, cap, width, t, extent in found]
    if not parts:
        raise ValueError("keep='norm' needs a producer with incoming weights")
    if len(parts) == 1 and parts[0][0].unit == 1 and parts[0][0].blocks == 1 and parts[0][0].dim == 0:
        active = parts[0][3]
        return active.norm(dim=1) if active.dim() == 2 else active.flatten(1).norm(dim=1)  # as nn.Linear rows
    total = None
    for axis, cap, width, active in parts:
        index = protocol.element_index(axis, cap, torch.arange(width, device=active.device))
        part = active.index_select(axis.dim, index).movedim(axis.dim, 0).reshape(axis.blocks, width, axis.unit, -1)
        sq = part.pow(2).sum(dim=(0, 2, 3))
        total = sq if total is None else total + sq.to(total.device)
    return total.sqrt()


@torch.no_grad()
def _largest_norm(hidden, to: int) -> Tensor:
    norms = unit_norms(hidden)
    order = torch.sort(norms, descending=True, stable=True).indices[:to]
    return torch.sort(order).values


def permutation(kept: Tensor, width: int) -> Optional[Tensor]:
    """The permutation of ``range(width)`` that moves ``kept`` to the front; ``None`` if it is the identity."""
    rest = torch.ones(width, dtype=torch.bool, device=kept.device)
    rest[kept] = False
    perm = torch.cat([kept, rest.nonzero().flatten()])
    return None if torch.equal(perm, torch.arange(width, device=perm.device)) else perm
