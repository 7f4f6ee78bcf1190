"""Keep an optimizer's per-parameter state in step with in-place growth.

A :class:`~growdense.GrowLinear` keeps its Parameters when it grows or shrinks, so an
optimizer built on them keeps working; only the *slices* that changed need their state
edited. These helpers do that for every state tensor shaped like its parameter (Adam /
AdamW ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; SGD ``momentum_buffer``; RMSprop,
Adagrad, Rprop, Adadelta, ASGD's per-element state; the same for any optimizer that
stores element-wise state). Scalar entries, such as Adam's ``step``, are left alone.
Parameters without state yet (before the first ``step()``) are skipped. Everything is
written in place, so the default, ``foreach`` and ``fused`` implementations see the
change and the optimizer is never rebuilt.

What happens to the optimizer's state when a :class:`~growdense.Wiring` grows or shrinks
is its *optimizer-state policy* (:data:`POLICIES`):

- ``"keep"`` (the default): old neurons' state continues unchanged; new neurons start
  from the optimizer's own fresh state, exactly as if a new optimizer had been built for
  them at their birth. For :mod:`growdense.optim`'s optimizers (Adam, AdamW, RAdam,
  Adamax, Adagrad) that includes the step count, counted from each neuron's birth
  (:data:`growdense.optim.BIRTH_KEY`): a new weight's first Adam update is
  ``-lr * g / (|g| + eps)`` at any global step. Element-wise state is set to the
  optimizer's fresh values (zero; Adagrad's ``initial_accumulator_value``; Rprop's ``lr``
  as step size), which is exact for SGD (``dampening=0``), RMSprop, Rprop, Adadelta and
  Adagrad without ``lr_decay``. Where that cannot be exact (torch's own Adam family,
  whose step count is one per Parameter; Adagrad with ``lr_decay``; ASGD; SGD with
  momentum and dampening; ``fused=True`` under growdense's) an explicit ``"keep"`` raises,
  naming the choices, and the default (no policy named anywhere) warns and applies
  ``"keep_global_step"``.
- ``"reset"``: the optimizer's whole state, for every parameter it holds, restarts as a
  newly built optimizer's would (what rebuilding the layers and the optimizer at each
  growth does).
- ``"keep_global_step"``: old neurons continue; new neurons' element-wise state is fresh
  (zero moments) but they share their Parameter's step count, so Adam's bias correction
  of their first updates is the old step's (growdense's behaviour before the policies
  existed; kept for comparison).

Shrinking under ``"keep"`` or ``"keep_global_step"`` sets the state of the removed slices
to the fresh value (zero, Adagrad's initial accumulator, Rprop's initial step size).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
from torch import Tensor

from . import sharded

__all__ = [
    "POLICIES",
    "check_policy",
    "check_attachable",
    "check_keep",
    "keep_problem",
    "check_optimizer_state_compatible",
    "state_tensors",
    "zero_state_",
    "fresh_state_",
    "mark_born_",
    "permute_state_",
    "reset_",
]

POLICIES = ("keep", "reset", "keep_global_step")

_BIRTH_KEY = "birth_steps"  # = growdense.optim.BIRTH_KEY (not imported: optim imports layers)


def check_policy(policy: object) -> str:
    """Return ``policy`` if it is one of :data:`POLICIES`, else raise a ``ValueError``."""
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValueError(f"unknown optimizer_state {policy!r}; expected one of {POLICIES}")
    return policy


def _adafactor() -> Optional[type]:
    return getattr(torch.optim, "Adafactor", None)


def check_attachable(optimizer: object) -> None:
    """Raise unless growdense can keep ``optimizer``'s state right across grow and shrink.

    Refused: anything that is not a ``torch.optim.Optimizer`` (``TypeError``); LBFGS (one
    flat history over all parameters); Adafactor (row and column statistics averaged
    over the whole capacity); SparseAdam (needs sparse gradients); any optimizer holding
    a state tensor that is not shaped like its parameter (``ValueError``). ``None`` is
    accepted (no optimizer).
    """
    if optimizer is None:
        return
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer (or None), got {type(optimizer).__name__}; "
            f"pass the optimizer itself, not a learning-rate scheduler or a list"
        )
    name = type(optimizer).__name__
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError(
            f"{name} keeps one flat history over all its parameters, which growing or shrinking a layer "
            f"cannot edit slice by slice; use another optimizer with a Wiring, or rebuild the {name} after each change"
        )
    adafactor = _adafactor()
    if adafactor is not None and isinstance(optimizer, adafactor):
        raise ValueError(
            f"{name} factors its second moment into row and column averages over the whole capacity, which "
            f"differ from the active block's; use growdense.optim.Adam or another element-wise optimizer"
        )
    if isinstance(optimizer, torch.optim.SparseAdam):
        raise ValueError(f"{name} needs sparse gradients; GrowLinear's gradients are dense: use growdense.optim.Adam")
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(
                        f"{name} holds state {key!r} of shape {tuple(value.shape)} for a parameter of shape "
                        f"{tuple(param.shape)}: growdense can only keep state shaped like its parameter"
                    )


def _holds_state(optimizer: torch.optim.Optimizer, params: Iterable[Optional[Tensor]]) -> list[Tensor]:
    return [p for p in params if p is not None and optimizer.state.get(p)]


def _group_of(optimizer: torch.optim.Optimizer, param: Tensor) -> Mapping[str, Any]:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise KeyError("the parameter is in no parameter group of the optimizer")


def check_keep(optimizer: Optional[torch.optim.Optimizer], params: Iterable[Optional[Tensor]]) -> None:
    """Raise a ``ValueError`` unless ``optimizer`` can give neurons added to ``params`` exactly its fresh state.

    Only parameters that already have state matter (the others start fresh anyway).
    """
    problem = keep_problem(optimizer, params)
    if problem is not None:
        raise ValueError(problem)


def keep_problem(optimizer: Optional[torch.optim.Optimizer], params: Iterable[Optional[Tensor]]) -> Optional[str]:
    """Why ``optimizer`` cannot give neurons added to ``params`` exactly its fresh state (``None``: it can)."""
    if optimizer is None:
        return None
    held = _holds_state(optimizer, params)
    if not held:
        return None
    from .optim import _ActiveBlockSteps

    name = type(optimizer).__name__
    alternatives = "or grow with optimizer_state='reset' (a fresh optimizer) or 'keep_global_step'"
    groups = [_group_of(optimizer, p) for p in held]
    if isinstance(optimizer, _ActiveBlockSteps):
        if not optimizer._steps_by_age:
            return (
                f"growdense.optim.{name} cannot count each neuron's steps with this torch version "
                f"({torch.__version__}; see growdense._torch_internals), {alternatives}"
            )
        if any(g.get("fused") for g in groups):
            return (
                f"growdense.optim.{name}(fused=True) cannot give new neurons their own step count under "
                f"optimizer_state='keep': build it with fused=False (the default or foreach=True), {alternatives}"
            )
        return None
    adam_family = tuple(
        getattr(torch.optim, n) for n in ("Adam", "AdamW", "NAdam", "RAdam", "Adamax") if hasattr(torch.optim, n)
    )
    if isinstance(optimizer, adam_family):
        from . import optim

        hint = f" use growdense.optim.{name} (same arguments and state_dict)," if hasattr(optim, name) else ""
        return (
            f"torch.optim.{name} keeps one step count per parameter, so new neurons would get the old step's bias "
            f"correction instead of their own under optimizer_state='keep':{hint} {alternatives}"
        )
    if isinstance(optimizer, torch.optim.SGD) and any(g["momentum"] != 0 and g["dampening"] != 0 for g in groups):
        return (
            f"SGD with momentum and dampening starts a fresh momentum buffer at the gradient itself, which a zeroed "
            f"slice cannot reproduce under optimizer_state='keep': use dampening=0, {alternatives}"
        )
    if isinstance(optimizer, torch.optim.Adagrad) and any(g["lr_decay"] != 0 for g in groups):
        return (
            f"Adagrad with lr_decay decays by a step count kept per parameter, so new neurons would not start from "
            f"their own under optimizer_state='keep': use lr_decay=0, {alternatives}"
        )
    if isinstance(optimizer, torch.optim.ASGD):
        return (
            f"ASGD keeps eta and mu per parameter, derived from its step count, so new neurons would not start from "
            f"their own under optimizer_state='keep': {alternatives}"
        )
    return None


def check_optimizer_state_compatible(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]) -> None:
    """Raise a ``ValueError`` if ``state_dict`` was saved from another kind of optimizer.

    ``torch.optim.Optimizer.load_state_dict`` accepts, say, an Adam state in an SGD, whose
    next ``step()`` then fails. Compared: each parameter group's hyperparameter names (a
    group holding names this optimizer does not have *and* lacking names it needs was
    saved by another type; only one kind of difference is what other torch versions
    give) and, for torch's element-wise optimizers, the state entries each one needs.
    """
    name = type(optimizer).__name__
    saved_groups = state_dict.get("param_groups", [])
    for i, (group, saved) in enumerate(zip(optimizer.param_groups, saved_groups)):
        own, theirs = set(group) - {"params"}, set(saved) - {"params"}
        extra, missing = sorted(theirs - own), sorted(own - theirs)
        if extra and missing:
            raise ValueError(
                f"the saved optimizer state was written by another kind of optimizer than this {name}: its parameter "
                f"group {i} has {extra}, which {name} does not, and lacks {missing}, which {name} needs"
            )
    needed = _needed_state_keys(optimizer, saved_groups)
    if needed is None:
        return
    ids_to_group = {pid: g for g in saved_groups for pid in g.get("params", [])}
    for pid, state in state_dict.get("state", {}).items():
        want = needed(ids_to_group.get(pid, {}))
        lacking = sorted(want - set(state))
        if lacking:
            raise ValueError(
                f"the saved optimizer state of parameter {pid} has {sorted(state)} but this {name} needs {lacking}: "
                f"it was written by another kind of optimizer"
            )


def _needed_state_keys(optimizer: torch.optim.Optimizer, saved_groups) -> Optional[Any]:
    """For torch's element-wise optimizers: a function from a saved group to the state keys it needs."""
    o = torch.optim
    table = [
        (getattr(o, "NAdam", None), lambda g: {"step", "mu_product", "exp_avg", "exp_avg_sq"}),
        (getattr(o, "RAdam", None), lambda g: {"step", "exp_avg", "exp_avg_sq"}),
        (getattr(o, "Adamax", None), lambda g: {"step", "exp_avg", "exp_inf"}),
        (
            o.Adam,
            lambda g: {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if g.get("amsgrad") else set()),
        ),
        (o.SGD, lambda g: {"momentum_buffer"} if g.get("momentum", 0) != 0 else set()),
        (
            o.RMSprop,
            lambda g: {"step", "square_avg"}
            | ({"momentum_buffer"} if g.get("momentum", 0) > 0 else set())
            | ({"grad_avg"} if g.get("centered") else set()),
        ),
        (o.Adagrad, lambda g: {"step", "sum"}),
        (o.Rprop, lambda g: {"step", "prev", "step_size"}),
        (o.ASGD, lambda g: {"step", "eta", "mu", "ax"}),
        (o.Adadelta, lambda g: {"step", "square_avg", "acc_delta"}),
    ]
    for cls, needed in table:
        if cls is not None and isinstance(optimizer, cls):
            return needed
    return None


def state_tensors(optimizer: Optional[torch.optim.Optimizer], param: Tensor) -> Iterator[Tensor]:
    """The state tensors of ``param`` in ``optimizer`` that have ``param``'s shape.

    Yields nothing when ``optimizer`` is ``None`` or holds no state for ``param``.
    """
    for _, tensor in _keyed_state_tensors(optimizer, param):
        yield tensor


def _keyed_state_tensors(optimizer: Optional[torch.optim.Optimizer], param: Tensor) -> Iterator[tuple[str, Tensor]]:
    if optimizer is None:
        return
    state = optimizer.state.get(param)
    if not state:
        return
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == param.shape and value.dim() > 0:
            yield key, value


@torch.no_grad()
def zero_state_(
    optimizer: Optional[torch.optim.Optimizer], param: Optional[Tensor], dim: int, start: int, stop: int
) -> None:
    """Zero ``[start, stop)`` along ``dim`` of every element-wise state tensor of ``param``."""
    if param is None or stop <= start:
        return
    for tensor in state_tensors(optimizer, param):
        sharded.narrow(tensor, dim, start, stop - start).zero_()


def _fresh_value(optimizer: torch.optim.Optimizer, param: Tensor, key: str) -> Optional[complex]:
    """The value ``optimizer`` gives state ``key`` of a new parameter, if not zero."""
    value: Any = None
    if isinstance(optimizer, torch.optim.Adagrad) and key == "sum":
        value = optimizer.defaults["initial_accumulator_value"]  # what torch's own lazy init uses
    elif isinstance(optimizer, torch.optim.Rprop) and key == "step_size":
        lr = _group_of(optimizer, param)["lr"]
        value = lr.item() if isinstance(lr, Tensor) else lr
    if value is None or value == 0:
        return None
    return complex(value, value) if param.is_complex() else value


@torch.no_grad()
def fresh_state_(
    optimizer: Optional[torch.optim.Optimizer], param: Optional[Tensor], dim: int, start: int, stop: int
) -> None:
    """Set ``[start, stop)`` along ``dim`` of ``param``'s element-wise state to the optimizer's fresh values.

    Zero, except Adagrad's ``sum`` (its ``initial_accumulator_value``) and Rprop's
    ``step_size`` (the group's ``lr``), as each creates them for a new parameter.
    """
    if param is None or stop <= start:
        return
    for key, tensor in _keyed_state_tensors(optimizer, param):
        value = _fresh_value(optimizer, param, key)  # type: ignore[arg-type]
        part = sharded.narrow(tensor, dim, start, stop - start)  # a DTensor: the rows this rank holds
        if value is None:
            part.zero_()
        else:
            part.fill_(value)


def mark_born_(
    optimizer: Optional[torch.optim.Optimizer],
    param: Optional[Tensor],
    dim: int,
    start: int,
    stop: int,
    policy: str,
) -> None:
    """Record that indices ``[start, stop)`` along ``dim`` of ``param`` became active now.

    For optimizers that count each element's age (:mod:`growdense.optim`) under
    ``"keep"``: their age starts at the Parameter's current step count. Under
    ``"keep_global_step"`` (and for removed indices, which pass ``policy="keep_global_step"``)
    they count as old as the Parameter. Other optimizers are left alone.
    """
    from .optim import _ActiveBlockSteps

    if param is None or stop <= start or not isinstance(optimizer, _ActiveBlockSteps) or not optimizer._steps_by_age:
        return
    state = optimizer.state.get(param)
    if not state or "step" not in state:
        return
    births = state.get(_BIRTH_KEY)
    if policy == "keep":
        birth = int(state["step"].item())
        if births is None:
            births = [[0] * n for n in param.shape]
    elif births is None:
        return
    else:
        birth = 0
    births = [list(b) for b in births]  # a new object: the view cache compares births by identity
    births[dim][start:stop] = [birth] * (stop - start)
    if all(b == 0 for axis in births for b in axis):
        del state[_BIRTH_KEY]
    else:
        state[_BIRTH_KEY] = births


@torch.no_grad()
def permute_state_(
    optimizer: Optional[torch.optim.Optimizer], param: Optional[Tensor], dim: int, perm: Tensor
) -> None:
    """Reorder the first ``len(perm)`` entries along ``dim`` of ``param``'s state: ``new[i] = old[perm[i]]``."""
    if param is None:
        return
    for tensor in state_tensors(optimizer, param):
        permute_(tensor, dim, perm)
    births = optimizer.state.get(param, {}).get(_BIRTH_KEY) if optimizer is not None else None
    if births is not None:
        births = [list(b) for b in births]
        order = perm.tolist()
        births[dim][: len(order)] = [births[dim][i] for i in order]
        optimizer.state[param][_BIRTH_KEY] = births  # type: ignore[union-attr]


def move_births_(optimizer: Optional[torch.optim.Optimizer], param: Tensor, dim: int, src: Tensor, dst: Tensor) -> None:
    """Move the birth steps of elements ``src`` to ``dst`` along ``dim`` (with the state tensors they describe)."""
    births = optimizer.state.get(param, {}).get(_BIRTH_KEY) if optimizer is not None else None
    if births is None:
        return
    births = [list(b) for b in births]
    old = list(births[dim])
    for s, d in zip(src.tolist(), dst.tolist()):
        births[dim][d] = old[s]
    optimizer.state[param][_BIRTH_KEY] = births  # type: ignore[union-attr]


def permute_(tensor: Tensor, dim: int, perm: Tensor) -> None:
    """In place: ``tensor.narrow(dim, 0, len(perm))[i] = old[perm[i]]`` along ``dim``."""
    head = tensor.narrow(dim, 0, perm.numel())
    head.copy_(head.index_select(dim, perm.to(tensor.device)))


def reset_(optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Restart ``optimizer``'s whole state as a newly built optimizer's (hyperparameters unchanged)."""
    if optimizer is None:
        return
    optimizer.state.clear()
    optimizer.__dict__.pop("_growdense_views", None)
    if isinstance(optimizer, torch.optim.Adagrad):  # Adagrad creates its state when built, not at the first step
        init = optimizer.defaults["initial_accumulator_value"]
        for group in optimizer.param_groups:
            fused = bool(group.get("fused"))
            for p in group["params"]:
                state = optimizer.state[p]
                if fused:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                else:
                    state["step"] = torch.tensor(0.0, dtype=_default_scalar_dtype())
                value = complex(init, init) if p.is_complex() else init
                state["sum"] = torch.full_like(p, value, memory_format=torch.preserve_format)


def _default_scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
