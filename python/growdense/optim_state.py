"""Keep an optimizer's per-parameter state in step with in-place growth.

A :class:`~growdense.GrowLinear` keeps its Parameters when it grows or shrinks, so an
optimizer built on them keeps working; only the *slices* that changed need their state
edited. These helpers do that for every state tensor shaped like its parameter (Adam /
AdamW ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; SGD ``momentum_buffer``; the same
for any optimizer that stores element-wise state). Other entries, such as Adam's scalar
``step``, are left alone. Parameters without state yet (before the first ``step()``) are
skipped. Everything is written in place, so the default, ``foreach`` and ``fused``
implementations see the change and the optimizer is never rebuilt.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor

__all__ = ["state_tensors", "zero_state_", "permute_state_"]


def state_tensors(optimizer: Optional[torch.optim.Optimizer], param: Tensor) -> Iterator[Tensor]:
    """The state tensors of ``param`` in ``optimizer`` that have ``param``'s shape.

    Yields nothing when ``optimizer`` is ``None`` or holds no state for ``param``.
    """
    if optimizer is None:
        return
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if isinstance(value, Tensor) and value.shape == param.shape and value.dim() > 0:
            yield value


@torch.no_grad()
def zero_state_(
    optimizer: Optional[torch.optim.Optimizer], param: Optional[Tensor], dim: int, start: int, stop: int
) -> None:
    """Zero ``[start, stop)`` along ``dim`` of every element-wise state tensor of ``param``."""
    if param is None or stop <= start:
        return
    for tensor in state_tensors(optimizer, param):
        tensor.narrow(dim, start, stop - start).zero_()


@torch.no_grad()
def permute_state_(
    optimizer: Optional[torch.optim.Optimizer], param: Optional[Tensor], dim: int, perm: Tensor
) -> None:
    """Reorder the first ``len(perm)`` entries along ``dim`` of ``param``'s state: ``new[i] = old[perm[i]]``."""
    if param is None:
        return
    for tensor in state_tensors(optimizer, param):
        permute_(tensor, dim, perm)


def permute_(tensor: Tensor, dim: int, perm: Tensor) -> None:
    """In place: ``tensor.narrow(dim, 0, len(perm))[i] = old[perm[i]]`` along ``dim``."""
    head = tensor.narrow(dim, 0, perm.numel())
    head.copy_(head.index_select(dim, perm.to(tensor.device)))
