"""Optimizers whose step costs what the active blocks cost, and that count each neuron's age.

A :class:`~growdense.GrowLinear` at a small fraction of its capacity still hands a plain
``torch.optim.Adam`` Parameters, gradients and moments of the capacity's size: every
step reads and writes all of them (64 times the active elements at 1/8 of the capacity
in both dimensions). Outside the active block all of these are zero (the weights, their
gradients and the optimizer state), and an Adam/AdamW update of a zero weight with a
zero gradient and zero moments is zero: so stepping over the active block alone gives
the same Parameters and state, bit for bit.

:class:`Adam`, :class:`AdamW`, :class:`RAdam`, :class:`Adamax` and :class:`Adagrad` are
torch's (subclasses: same arguments, same ``state`` and ``state_dict``, the state tensors
keep the Parameter's capacity shape, so :mod:`growdense.optim_state` and a
:class:`~growdense.Wiring` edit them as usual) with these differences for the Parameters
of a GrowLinear:

- ``step()`` runs torch's own update over views of the active blocks of the Parameters,
  gradients and state (views into the capacity storage, so the update lands in place).
- :class:`Adam` and :class:`AdamW` with ``fused=True`` on the CPU step the active blocks
  with growdense's own kernel (:func:`growdense.ops.adam_step_`): one pass that reads and
  writes each element of a Parameter, its gradient and its moments once, in the order of
  operations of torch's single-tensor update (equal to it within an ulp or two in
  float32; in bfloat16 it rounds once where torch rounds after each operation). On other
  devices, or with ``amsgrad``, ``capturable``, ``differentiable`` or a ``GradScaler``,
  ``fused=True`` steps over the whole tensors with torch's fused kernel.
- Neurons added under ``optimizer_state="keep"`` count their own steps: the state holds,
  under :data:`BIRTH_KEY`, the step at which each row and column became active, and each
  group of elements of one age is stepped with its own step count (Adam's bias
  correction, RAdam's rectification, Adagrad's ``lr_decay``), so a new neuron is updated
  exactly as by a fresh optimizer started at its birth. Not with torch's fused kernel
  (``fused=True`` off the CPU).
- ``zero_grad()`` zeroes the active block of such a Parameter's ``.grad`` and keeps the
  tensor rather than setting it to ``None``: the next backward then adds its gradient
  into that block in place (the GrowLinear op does this whenever ``.grad`` is already
  there) instead of allocating and zero-filling a capacity-sized gradient each step.
  One visible difference from ``set_to_none=True``: such a ``.grad`` is a zero tensor,
  not ``None``, after ``zero_grad()``; so a layer that took no part in a step's forward
  still gets Adam's momentum update for that step, as with ``set_to_none=False``.

Everything else (other Parameters, a GrowLinear at full capacity that never grew under
``"keep"``) behaves exactly as in torch. A ``state_dict`` saved here loads in torch's own
optimizer (which ignores :data:`BIRTH_KEY`) and the other way round.
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch
from torch import Tensor
from torch.optim.adam import adam as _adam_functional

from . import _torch_internals, ops, sharded
from .layers import active_block

__all__ = ["Adam", "AdamW", "RAdam", "Adamax", "Adagrad", "zero_grad_", "BIRTH_KEY", "cohorts"]


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
            sharded.part(grad, block).zero_()  # a DTensor (FSDP2): the rows this rank holds


#: The optimizer-state key holding, per dimension of a Parameter, the step count at which
#: each index along it last became active: ``[[row births], [column births]]`` for a
#: matrix, one list for a bias, one per dimension of any other tensor (an attention's
#: ``(1, 1, heads * head_dim)`` ``bias_k``: three). An element's age is ``state["step"]``
#: minus the latest birth of its indices (``max(row birth, column birth)`` for a matrix).
#: Absent: every element is as old as the Parameter's state. Written by
#: :func:`growdense.optim_state.mark_born_` (a :class:`~growdense.Wiring` growing under
#: ``optimizer_state="keep"``).
BIRTH_KEY = "birth_steps"


def _runs(indices: list[int]) -> list[slice]:
    """Maximal runs of consecutive integers in the sorted list ``indices``, as slices."""
    runs: list[slice] = []
    start = prev = None
    for i in indices:
        if prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            runs.append(slice(start, prev + 1))
        start = prev = i
    if start is not None:
        runs.append(slice(start, prev + 1))
    return runs


def cohorts(active: tuple[int, ...], births: list[list[int]]) -> list[tuple[tuple[slice, ...], int]]:
    """Split the active block into boxes of elements born at the same step.

    ``active`` is the block's size per dimension (it starts at index 0), ``births`` the
    per-dimension birth steps (:data:`BIRTH_KEY`), one list per dimension of the tensor
    (a width may ride any of them: the heads of an attention's ``bias_k`` ride its third).
    Returns ``(index, birth)`` pairs: the boxes cover the block exactly once. An element
    is born at the latest birth of its indices; the elements born at ``b`` are split by the
    first dimension whose index is born at ``b`` (the dimensions before it born earlier,
    those after it no later), so dimensions born in order give one box per distinct birth
    (two for a matrix grown along both dimensions); a permutation that scatters neurons of
    different ages gives one per run.
    """
    if len(active) != len(births):
        raise ValueError(f"cohorts: {len(active)} active sizes but births for {len(births)} dimensions")
    axes = [list(b[:n]) for b, n in zip(births, active)]
    out: list[tuple[tuple[slice, ...], int]] = []
    for b in sorted(set().union(*map(set, axes))):
        for first in range(len(axes)):
            runs = []
            for d, axis in enumerate(axes):
                if d < first:
                    keep = [i for i, r in enumerate(axis) if r < b]
                elif d == first:
                    keep = [i for i, r in enumerate(axis) if r == b]
                else:
                    keep = [i for i, r in enumerate(axis) if r <= b]
                if not keep:
                    break
                runs.append(_runs(keep))
            else:
                out.extend((index, b) for index in itertools.product(*runs))
    return out


class _ActiveBlockSteps:
    """Mixin for torch optimizers that step through ``_init_group``: step over the active blocks, by age.

    ``_hooked`` (per class): whether torch's ``_init_group`` is known to have the layout
    this relies on (see :mod:`growdense._torch_internals`); if not, the optimizer is
    torch's own, unchanged.
    """

    _hooked = False
    _steps_by_age = False  # whether neurons added under optimizer_state="keep" get their own step count

    def _init_group(self, group, params_with_grad, grads, *lists):
        result = super()._init_group(group, params_with_grad, grads, *lists)  # type: ignore[misc]
        if self._hooked:
            self._to_active_blocks(group, params_with_grad, grads, *lists)
        return result

    def _to_active_blocks(self, group, params, grads, *lists) -> None:
        """Replace, in place, each entry of the lists by views of its active block, one per age.

        ``lists`` are the optimizer's state lists as its ``_init_group`` fills them, the
        step counts last (lists left empty, such as Adam's ``max_exp_avg_sqs`` without
        amsgrad, stay empty). Elements of different ages (see :data:`BIRTH_KEY`) get
        their own entry with a step count of their own age, so each is updated as a
        fresh optimizer started at its birth would update it. The Parameter's own
        ``step`` then counts the steps of its oldest possible element (it is incremented
        here, not by the functional form).
        """
        *element_lists, state_steps = lists
        count = len(params)
        aligned = [params, grads] + [lst for lst in element_lists if count and len(lst) == count]
        blocks = [_partial_block(p) for p in params]
        if not any(b is not None or BIRTH_KEY in self.state[p] for p, b in zip(params, blocks)):  # type: ignore[attr-defined]
            return
        fused = group.get("fused") and not _steps_blocks_fused(self, group)  # torch's fused kernel
        new: tuple[list, ...] = tuple([] for _ in aligned)
        new_steps: list[Tensor] = []
        for i, p in enumerate(params):
            sources = tuple(lst[i] for lst in aligned)
            births = self.state[p].get(BIRTH_KEY)  # type: ignore[attr-defined]
            block = blocks[i]
            if births is None:
                if block is None or fused:  # the fused kernels want whole tensors
                    views = [tuple(sharded.local(t) for t in sources)]  # DTensors: their local shards
                else:
                    views = self._block_views(p, block, None, sources)[1]
                for lst, v in zip(new, views[0]):
                    lst.append(v)
                new_steps.append(state_steps[i])
                continue
            if fused:
                raise RuntimeError(
                    "growdense.optim: fused=True steps whole tensors and cannot give neurons added under "
                    "optimizer_state='keep' their own step count; build the optimizer with fused=False "
                    "(the default or foreach), or grow with optimizer_state='reset' or 'keep_global_step'"
                )
            step = state_steps[i]
            rects, views = self._block_views(p, block, births, sources)
            for (_, birth), view in zip(rects, views):
                for lst, v in zip(new, view):
                    lst.append(v)
                new_steps.append(step - birth)  # a copy: the step function increments it to the cohort's age
            step += 1
        for lst, items in zip(aligned, new):
            lst[:] = items
        state_steps[:] = new_steps

    def _block_views(
        self, p: Tensor, block: Optional[tuple[slice, ...]], births: Optional[list], sources: tuple[Tensor, ...]
    ) -> tuple[list, list[tuple[Tensor, ...]]]:
        """Views of a Parameter, its gradient and its state tensors per rectangle, cached between steps.

        Returns the rectangles (``(index, birth)``, see :func:`cohorts`) and their views:
        the active block without ``births``, one rectangle per run of equal age with them. Making a view
        costs microseconds in Python; a step of a small layer costs tens. The cache
        entry is reused while the block, the births and the tensors are the same and the
        Parameter's storage too (``param.data = ...`` changes it; a loaded ``state_dict``
        makes new state tensors, a new ``.grad`` a new gradient). The entry holds the
        last gradient it saw until the Parameter's next step, as ``zero_grad`` here does.
        """
        cache = self.__dict__.setdefault("_growdense_views", {})
        ptr = sharded.local(p).data_ptr()  # `param.data = ...` keeps the Parameter but changes its storage
        entry = cache.get(id(p))
        if (
            entry is not None
            and entry[0] == block
            and entry[1] is births
            and entry[2] == ptr
            and len(entry[3]) == len(sources)
            and all(a is b for a, b in zip(entry[3], sources))
        ):
            return entry[4], entry[5]
        if births is None:
            rects = [(block, 0)]
        else:
            active = tuple(s.stop for s in block) if block is not None else tuple(p.shape)
            rects = cohorts(active, births)
        views = [tuple(sharded.part(t, index) for t in sources) for index, _ in rects]  # DTensors: local rows
        cache[id(p)] = (block, births, ptr, sources, rects, views)
        return rects, views

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:  # type: ignore[attr-defined]
            zero_grad_(group["params"], set_to_none)


def _scalar_dtype(fused: bool) -> torch.dtype:
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _public_init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps) -> bool:
    """What ``torch.optim.Adam`` does to gather a group's lists and create its state, in public API."""
    has_complex = False
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")
        has_complex |= torch.is_complex(p)
        params.append(p)
        grads.append(p.grad)
        state = self.state[p]
        if len(state) == 0:
            on_device = group["capturable"] or group["fused"]
            state["step"] = torch.zeros(
                (), dtype=_scalar_dtype(bool(group["fused"])), device=p.device if on_device else "cpu"
            )
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        if group["amsgrad"]:
            max_exp_avg_sqs.append(state["max_exp_avg_sq"])
        state_steps.append(state["step"])
    return has_complex


def _public_step(self, closure=None):
    """``torch.optim.Adam.step`` through the public functional ``torch.optim.adam.adam``.

    Used where torch's private ``Adam._init_group`` is not known to be usable (see
    :mod:`growdense._torch_internals`).
    """
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    with torch.no_grad():
        for group in self.param_groups:
            if group["differentiable"]:
                raise RuntimeError("growdense.optim does not support differentiable=True with this torch version")
            lists: tuple[list, ...] = ([], [], [], [], [], [])
            has_complex = _public_init_group(self, group, *lists)
            self._to_active_blocks(group, *lists)
            beta1, beta2 = group["betas"]
            _adam_functional(
                *lists,
                amsgrad=group["amsgrad"],
                has_complex=has_complex,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
                foreach=group["foreach"],
                capturable=group["capturable"],
                differentiable=False,
                fused=group["fused"],
                grad_scale=getattr(self, "grad_scale", None),
                found_inf=getattr(self, "found_inf", None),
                decoupled_weight_decay=group.get("decoupled_weight_decay", False),
            )
    return loss


_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _steps_blocks_fused(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    """Whether ``fused=True`` steps this group with growdense's own kernel (see the module's docs)."""
    if not getattr(type(optimizer), "_fused_blocks", False) or not group.get("fused"):
        return False
    if group.get("amsgrad") or group.get("capturable") or group.get("differentiable"):
        return False
    if getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None:
        return False
    return all(sharded.local(p).device.type == "cpu" and p.dtype in _FUSED_DTYPES for p in group["params"])


def _as_block(tensors: tuple[Tensor, ...]) -> Optional[tuple[Tensor, ...]]:
    """The tensors as blocks the kernel takes (at most 2-D, contiguous columns), else ``None``."""
    if all(t.dim() <= 2 and (t.dim() == 0 or t.stride(-1) == 1 or t.size(-1) <= 1) for t in tensors):
        return tensors
    if all(t.is_contiguous() for t in tensors):
        return tuple(t.view(-1) for t in tensors)
    return None


class _FusedBlockSteps:
    """Mixin for Adam and AdamW: ``fused=True`` on the CPU steps the active blocks in one pass each."""

    _fused_blocks = True

    def _torch_step(self, closure=None):
        step = super().step.__func__  # type: ignore[misc]
        # torch wraps a class's step with its hooks; this class's own step already ran them
        return (step.__wrapped__ if getattr(step, "hooked", False) else step)(self, closure)

    def step(self, closure=None):
        ours = [g for g in self.param_groups if _steps_blocks_fused(self, g)]  # type: ignore[attr-defined]
        if not ours:
            return self._torch_step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rest = [g for g in self.param_groups if not any(g is o for o in ours)]  # type: ignore[attr-defined]
        if rest:
            groups = self.param_groups  # type: ignore[attr-defined]
            self.param_groups = rest
            try:
                self._torch_step()
            finally:
                self.param_groups = groups
        with torch.no_grad():
            for group in ours:
                self._fused_group_step(group)
        return loss

    def _fused_group_step(self, group: dict) -> None:
        lists: tuple[list, ...] = ([], [], [], [], [], [])
        _public_init_group(self, group, *lists)
        self._to_active_blocks(group, *lists)  # type: ignore[attr-defined]
        params, grads, exp_avgs, exp_avg_sqs, _, steps = lists
        if not params:
            return
        torch._foreach_add_(steps, 1)
        blocks: tuple[list, ...] = ([], [], [], [], [])
        leftover: tuple[list, ...] = ([], [], [], [], [], [])
        for entry, step in zip(zip(params, grads, exp_avgs, exp_avg_sqs), steps):
            block = _as_block(entry)
            if block is None:
                for lst, t in zip(leftover, (*entry, None, step)):
                    if t is not None:
                        lst.append(t)
                continue
            for lst, t in zip(blocks, block):
                lst.append(t)
            blocks[4].append(step.item())
        beta1, beta2 = group["betas"]
        hyper = dict(lr=float(group["lr"]), weight_decay=group["weight_decay"], eps=group["eps"],
                     maximize=group["maximize"])
        if blocks[0]:
            ops.adam_step_(*blocks, beta1=beta1, beta2=beta2,
                           decoupled_weight_decay=group.get("decoupled_weight_decay", False), **hyper)
        if leftover[0]:  # strided beyond what the kernel takes: torch's single-tensor update
            for s in leftover[5]:
                s -= 1  # it counts the step itself
            _adam_functional(*leftover, amsgrad=False, has_complex=False, beta1=beta1, beta2=beta2,
                             foreach=False, capturable=False, differentiable=False, fused=False,
                             decoupled_weight_decay=group.get("decoupled_weight_decay", False), **hyper)


class Adam(_FusedBlockSteps, _ActiveBlockSteps, torch.optim.Adam):
    """``torch.optim.Adam`` that steps over the active blocks of GrowLinear Parameters.

    Same arguments, state and results as ``torch.optim.Adam``; see :mod:`growdense.optim`.
    """

    _hooked = _steps_by_age = _torch_internals.INIT_GROUP["Adam"]


class AdamW(_FusedBlockSteps, _ActiveBlockSteps, torch.optim.AdamW):
    """``torch.optim.AdamW`` that steps over the active blocks of GrowLinear Parameters.

    Same arguments, state and results as ``torch.optim.AdamW``; see :mod:`growdense.optim`.
    """

    _hooked = _steps_by_age = _torch_internals.INIT_GROUP["Adam"]


if not _torch_internals.INIT_GROUP["Adam"]:
    for _cls in (Adam, AdamW):
        _cls._torch_step = _public_step  # type: ignore[method-assign]
        _cls._steps_by_age = True


class RAdam(_ActiveBlockSteps, torch.optim.RAdam):
    """``torch.optim.RAdam`` that steps over the active blocks of GrowLinear Parameters, by age.

    Same arguments, state and results as ``torch.optim.RAdam``; see :mod:`growdense.optim`.
    """

    _hooked = _steps_by_age = _torch_internals.INIT_GROUP["RAdam"]


class Adamax(_ActiveBlockSteps, torch.optim.Adamax):
    """``torch.optim.Adamax`` that steps over the active blocks of GrowLinear Parameters, by age.

    Same arguments and results as ``torch.optim.Adamax``; see :mod:`growdense.optim`.
    (Outside the active block ``exp_inf`` stays zero where torch's own would write eps.)
    """

    _hooked = _steps_by_age = _torch_internals.INIT_GROUP["Adamax"]


class Adagrad(_ActiveBlockSteps, torch.optim.Adagrad):
    """``torch.optim.Adagrad`` that steps over the active blocks of GrowLinear Parameters, by age.

    Same arguments, state and results as ``torch.optim.Adagrad``: with ``lr_decay``, each
    neuron's learning rate decays from its own birth. See :mod:`growdense.optim`.
    """

    _hooked = _steps_by_age = _torch_internals.INIT_GROUP["Adagrad"]


# ---- growth rules (growdense.optim_state) -----------------------------------------------------
def _steps_by_age(optimizer: torch.optim.Optimizer) -> str:
    return "element" if type(optimizer)._steps_by_age else "parameter"  # type: ignore[attr-defined]


def _keep_check(optimizer: torch.optim.Optimizer, groups: list) -> Optional[str]:
    """Whether new neurons get their own step count: not without the private hook, not with torch's fused kernel."""
    name = type(optimizer).__name__
    alternatives = "or grow with optimizer_state='reset' (a fresh optimizer) or 'keep_global_step'"
    if not type(optimizer)._steps_by_age:  # type: ignore[attr-defined]
        return (
            f"growdense.optim.{name} cannot count each neuron's steps with this torch version "
            f"({torch.__version__}; see growdense._torch_internals), {alternatives}"
        )
    if any(g.get("fused") and not _steps_blocks_fused(optimizer, g) for g in groups):
        return (
            f"growdense.optim.{name}(fused=True) cannot give new neurons their own step count under "
            f"optimizer_state='keep': build it with fused=False (the default or foreach=True), {alternatives}"
        )
    return None


def _register_rules() -> None:
    """Torch's rules for each base (fresh values, checkpoint keys), with each element's age counted."""
    import dataclasses

    from . import optim_state

    for cls in (Adam, AdamW, RAdam, Adamax, Adagrad):
        base = optim_state.optimizer_rules(cls)  # its torch base class's until registered here
        optim_state.register_optimizer_rules(
            cls, dataclasses.replace(base, step=_steps_by_age, keep_check=_keep_check), replace=True
        )


_register_rules()
