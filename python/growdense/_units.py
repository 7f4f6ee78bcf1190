"""Where a width's units lie along a tensor dimension: element ranges and indices (pure torch).

A unit is ``axis.unit`` consecutive elements; a dimension holding ``axis.blocks`` stacked
blocks (q, k and v) has ``cap`` units per block. Shared by :mod:`growdense.protocol` (which
re-exports both) and :mod:`growdense.sharded`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

__all__ = ["element_ranges", "element_index"]


class _Units(Protocol):
    """What these functions read of a :class:`growdense.protocol.Axis`."""

    unit: int
    blocks: int


def element_ranges(axis: _Units, cap: int, start: int, stop: int) -> list[tuple[int, int]]:
    """``(first element, length)`` of units ``[start, stop)`` in each block along ``axis.dim``."""
    return [((b * cap + start) * axis.unit, (stop - start) * axis.unit) for b in range(axis.blocks)] if stop > start else []


def element_index(axis: _Units, cap: int, units: Tensor) -> Tensor:
    """The element indices along ``axis.dim`` of ``units`` (a 1-D long tensor), every block."""
    within = (units[:, None] * axis.unit + torch.arange(axis.unit, device=units.device)).flatten()
    if axis.blocks == 1:
        return within
    return torch.cat([within + b * cap * axis.unit for b in range(axis.blocks)])
