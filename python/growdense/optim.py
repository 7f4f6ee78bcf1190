"""Optimizers whose step costs what the active blocks cost, not what the capacity costs.

A :class:`~growdense.GrowLinear` at a small fraction of its capacity still hands a plain
``torch.optim.Adam`` Parameters, gradients and moments of the capacity's size: every
step reads and writes all of them (64 times the active elements at 1/8 of the capacity
in both dimensions). Outside the active block all of these are zero (the weights, their
gradients and the optimizer state), and an Adam/AdamW update of a zero weight with a
zero gradient and zero moments is zero: so stepping over the active block alone gives
the same Parameters and state, bit for bit.

:class:`Adam` and :class:`AdamW` are ``torch.optim.Adam`` / ``torch.optim.AdamW``
(subclasses: same arguments, same ``state`` and ``state_dict``, the state tensors keep
the Parameter's capacity shape, so :mod:`growdense.optim_state` and a
:class:`~growdense.Wiring` edit them as usual) with two differences for the Parameters of
a GrowLinear that is not at full capacity:

- ``step()`` runs torch's own Adam over views of the active blocks of the Parameters,
  gradients and moments (views into the capacity storage, so the update lands in place).
  With ``fused=True`` it steps over the whole tensors, as torch does.
- ``zero_grad()`` zeroes the active block of such a Parameter's ``.grad`` and keeps the
  tensor rather than setting it to ``None``: the next backward then adds its gradient
  into that block in place (the GrowLinear op does this whenever ``.grad`` is already
  there) instead of allocating and zero-filling a capacity-sized gradient each step.
  One visible difference from ``set_to_none=True``: such a ``.grad`` is a zero tensor,
  not ``None``, after ``zero_grad()``; so a layer that took no part in a step's forward
  still gets Adam's momentum update for that step, as with ``set_to_none=False``.

Everything else (other Parameters, a GrowLinear at full capacity) behaves exactly as in
torch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .layers import active_block

__all__ = ["Adam", "AdamW", "zero_grad_"]


def _partial_block(param: Tensor) -> Optional[tuple[slice, ...]]:
    """``param``'s active block when it is smaller than ``param``, else ``None``."""
    block = active_block(param)
    if block is None:
        return None
    shape = param.shape
    if block[0].stop == shape[0] and (len(block) == 1 or block[1].stop == shape[1]):
        return None
    return block


@torch.no_grad()
def zero_grad_(params, set_to_none: bool = True) -> None:
    """``Optimizer.zero_grad`` for an iterable of Parameters, as described in this module.

    Parameters of a GrowLinear below capacity keep their ``.grad`` with its active block
    zeroed; every other Parameter gets torch's behaviour (``None``, or zeroed in place
    with ``set_to_none=False``).
    """
    for p in params:
        grad = p.grad
        if grad is None:
            continue
        block = _partial_block(p) if grad.layout == torch.strided else None
        if set_to_none and block is None:
            p.grad = None
            continue
        if grad.grad_fn is not None:
            grad.detach_()
        elif grad.requires_grad:
            grad.requires_grad_(False)
        if block is None:
            grad.zero_()
        else:
            grad[block].zero_()


class _ActiveBlockSteps:
    """Mixin for torch.optim.Adam and its subclasses: step over the active blocks."""

    def _init_group(self, group, params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        has_complex = super()._init_group(  # type: ignore[misc]
            group, params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps
        )
        if group["fused"]:  # the fused kernels want whole tensors
            return has_complex
        amsgrad = group["amsgrad"]
        for i, p in enumerate(params_with_grad):
            block = _partial_block(p)
            if block is None:
                continue
            sources = (p, grads[i], exp_avgs[i], exp_avg_sqs[i]) + ((max_exp_avg_sqs[i],) if amsgrad else ())
            views = self._block_views(p, block, sources)
            params_with_grad[i], grads[i], exp_avgs[i], exp_avg_sqs[i] = views[:4]
            if amsgrad:
                max_exp_avg_sqs[i] = views[4]
        return has_complex

    def _block_views(self, p: Tensor, block: tuple[slice, ...], sources: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Views ``t[block]`` of a Parameter, its gradient and its state tensors, cached between steps.

        Making a view costs microseconds in Python; a step of a small layer costs tens.
        The cache entry is reused while the block and the tensors are the same and the
        Parameter's storage too (``param.data = ...`` changes it; a loaded ``state_dict``
        makes new state tensors, a new ``.grad`` a new gradient). The entry holds the
        last gradient it saw until the Parameter's next step, as ``zero_grad`` here does.
        """
        cache = self.__dict__.setdefault("_growdense_views", {})
        ptr = p.data_ptr()  # `param.data = ...` keeps the Parameter but changes its storage
        entry = cache.get(id(p))
        if (
            entry is not None
            and entry[0] == block
            and entry[1] == ptr
            and len(entry[2]) == len(sources)
            and all(a is b for a, b in zip(entry[2], sources))
        ):
            return entry[3]
        views = tuple(t[block] for t in sources)
        cache[id(p)] = (block, ptr, sources, views)
        return views

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:  # type: ignore[attr-defined]
            zero_grad_(group["params"], set_to_none)


class Adam(_ActiveBlockSteps, torch.optim.Adam):
    """``torch.optim.Adam`` that steps over the active blocks of GrowLinear Parameters.

    Same arguments, state and results as ``torch.optim.Adam``; see :mod:`growdense.optim`.
    """


class AdamW(_ActiveBlockSteps, torch.optim.AdamW):
    """``torch.optim.AdamW`` that steps over the active blocks of GrowLinear Parameters.

    Same arguments, state and results as ``torch.optim.AdamW``; see :mod:`growdense.optim`.
    """
