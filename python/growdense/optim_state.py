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

What each optimizer needs is one record per optimizer class, :class:`OptimizerRules`
(its element-wise state and fresh values, state left alone, how it counts steps, when
``"keep"`` cannot be exact, a refusal), registered with :func:`register_optimizer_rules`
and looked up through the class's MRO by :func:`optimizer_rules`: a subclass of
``torch.optim.Adam`` gets Adam's rules. torch's optimizers are registered here,
:mod:`growdense.optim`'s in that module. An optimizer class with no rules gets
:data:`DEFAULT_RULES`: every state tensor shaped like its parameter is element-wise with
fresh value 0, and any other state tensor is refused. See
docs/adding-a-growable-module.md, "Adding an optimizer".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import torch
from torch import Tensor

from . import sharded

__all__ = [
    "POLICIES",
    "STEP_COUNTS",
    "OptimizerRules",
    "register_optimizer_rules",
    "optimizer_rules",
    "DEFAULT_RULES",
    "check_policy",
    "check_attachable",
    "check_keep",
    "keep_problem",
    "check_optimizer_state_compatible",
    "state_tensors",
    "zero_state_",
    "fresh_state_",
    "fresh_state_tensors",
    "counts_births",
    "mark_born_",
    "mark_born_ranges_",
    "has_births",
    "move_births_",
    "permute_state_",
    "reset_",
]

POLICIES = ("keep", "reset", "keep_global_step")

#: How an optimizer keeps the step count its update depends on (:attr:`OptimizerRules.step`).
STEP_COUNTS = ("none", "parameter", "global", "element")

_BIRTH_KEY = "birth_steps"  # = growdense.optim.BIRTH_KEY (not imported: optim imports layers)

#: A fresh value: a number, or ``fn(optimizer, group) -> number`` for one read from the
#: optimizer's hyperparameters (Rprop's initial step size is its group's ``lr``).
FreshValue = Union[float, Callable[[torch.optim.Optimizer, Mapping[str, Any]], float]]


def check_policy(policy: object) -> str:
    """Return ``policy`` if it is one of :data:`POLICIES`, else raise a ``ValueError``."""
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValueError(f"unknown optimizer_state {policy!r}; expected one of {POLICIES}")
    return policy


# ---- the rules of each optimizer class ------------------------------------------------------
@dataclass(frozen=True)
class OptimizerRules:
    """How growth and shrinking edit one optimizer class's state (registered per class).

    Args:
        state: the state entries indexed like their parameter (element-wise, same
            shape) and the value each takes for an element a newly built optimizer has
            not seen yet: a number, or ``fn(optimizer, group)`` reading it from the
            hyperparameters. Any other state tensor shaped like its parameter is taken as
            element-wise with fresh value 0 (what ``torch.zeros_like`` state gives).
        fixed: state entries that are not indexed by the parameter's elements, whatever
            their shape (a per-parameter scalar in a 1-element tensor, a small history):
            left alone by every change. A state tensor neither shaped like its parameter
            nor listed here is refused when the optimizer is attached.
        step: how the optimizer keeps the step count its update depends on (one of
            :data:`STEP_COUNTS`): ``"none"`` (no count, or one the update ignores except
            under hyperparameters that :attr:`keep_check` refuses), ``"parameter"`` (one
            per Parameter: new neurons would get their Parameter's count, so
            ``optimizer_state="keep"`` cannot be exact), ``"global"`` (one for the whole
            optimizer: likewise), ``"element"`` (each element's age is counted from its
            birth, recorded under ``"birth_steps"``: growdense's own optimizers). A
            function of the optimizer may choose one per instance.
        keep_check: ``fn(optimizer, groups) -> problem or None``: why new neurons of
            Parameters in ``groups`` (their parameter groups) cannot start from exactly
            the fresh state (a hyperparameter such as SGD's ``dampening``); runs before
            the check by :attr:`step`.
        refuse: a message when growdense cannot keep this optimizer's state at all
            (``{name}`` is replaced by the class name); attaching it raises ``ValueError``.
        required_state: ``fn(saved_group) -> keys`` every parameter's saved state must
            hold, to refuse loading another kind of optimizer's ``state_dict``.
        on_reset: ``fn(optimizer)`` creating the state a newly built optimizer has
            before its first step (Adagrad's ``sum``); ``optimizer_state="reset"`` calls
            it after clearing the state.
    """

    state: Mapping[str, FreshValue] = field(default_factory=dict)
    fixed: frozenset = frozenset()
    step: Union[str, Callable[[torch.optim.Optimizer], str]] = "none"
    keep_check: Optional[Callable[[torch.optim.Optimizer, list], Optional[str]]] = None
    refuse: Optional[str] = None
    required_state: Optional[Callable[[Mapping[str, Any]], set]] = None
    on_reset: Optional[Callable[[torch.optim.Optimizer], None]] = None

    @property
    def fresh_all_zero(self) -> bool:
        """Whether every element-wise state tensor's fresh value is 0 (no hyperparameter to read)."""
        return all(type(v) in (int, float) and v == 0 for v in self.state.values())

    def __post_init__(self) -> None:
        if not isinstance(self.step, str) and not callable(self.step):
            raise TypeError(f"step must be one of {STEP_COUNTS} or a function of the optimizer, got {self.step!r}")
        if isinstance(self.step, str) and self.step not in STEP_COUNTS:
            raise ValueError(f"unknown step count {self.step!r}; expected one of {STEP_COUNTS}")
        object.__setattr__(self, "fixed", frozenset(self.fixed))
        object.__setattr__(self, "state", dict(self.state))

    def step_of(self, optimizer: torch.optim.Optimizer) -> str:
        """The step count of ``optimizer`` (:attr:`step`, resolved for this instance)."""
        step = self.step(optimizer) if callable(self.step) else self.step
        if step not in STEP_COUNTS:
            raise ValueError(f"the rules of {type(optimizer).__name__} gave step count {step!r}; expected one of {STEP_COUNTS}")
        return step

    def fresh_value(self, optimizer: torch.optim.Optimizer, param: Tensor, key: str) -> float:
        """The fresh value of ``param``'s element-wise state ``key`` (0 when not declared)."""
        value = self.state.get(key, 0.0)
        if callable(value):
            value = value(optimizer, _group_of(optimizer, param))
        return value.item() if isinstance(value, Tensor) else value


#: The rules of an optimizer class no rules are registered for: every state tensor shaped
#: like its parameter is element-wise with fresh value 0, no step count, nothing refused
#: (other state tensors are refused when attached).
DEFAULT_RULES = OptimizerRules()

_RULES: dict[type, OptimizerRules] = {}
_LOOKUP: dict[type, OptimizerRules] = {}  # by exact class, filled from _RULES through the MRO


def register_optimizer_rules(cls: type, rules: OptimizerRules, *, replace: bool = False) -> OptimizerRules:
    """Register ``rules`` for optimizer class ``cls`` and its subclasses (unless they have their own).

    Returns ``rules``. ``replace=True`` replaces rules registered for ``cls`` itself.
    """
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise TypeError(f"optimizer rules are registered for a torch.optim.Optimizer subclass, got {cls!r}")
    if not isinstance(rules, OptimizerRules):
        raise TypeError(f"rules must be an OptimizerRules, got {type(rules).__name__}")
    if cls in _RULES and not replace:
        raise ValueError(f"rules for {cls.__qualname__} are already registered (pass replace=True to replace them)")
    _RULES[cls] = rules
    _LOOKUP.clear()
    return rules


def optimizer_rules(optimizer: Union[torch.optim.Optimizer, type]) -> OptimizerRules:
    """The rules of ``optimizer`` (an instance or a class): its class's, else the nearest base class's."""
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    rules = _LOOKUP.get(cls)
    if rules is None:
        rules = next((_RULES[c] for c in cls.__mro__ if c in _RULES), DEFAULT_RULES)
        _LOOKUP[cls] = rules
    return rules


def _display_name(cls: type) -> str:
    module = cls.__module__
    if module.startswith("torch.optim"):
        return f"torch.optim.{cls.__name__}"
    if module.startswith("growdense.optim"):
        return f"growdense.optim.{cls.__name__}"
    return cls.__name__


def check_attachable(optimizer: object) -> None:
    """Raise unless growdense can keep ``optimizer``'s state right across grow and shrink.

    Refused: anything that is not a ``torch.optim.Optimizer`` (``TypeError``); an
    optimizer whose rules (:func:`optimizer_rules`) refuse it (LBFGS: one flat history
    over all parameters; Adafactor: row and column statistics averaged over the whole
    capacity; SparseAdam: sparse gradients); any optimizer holding a state tensor that is
    neither shaped like its parameter nor declared :attr:`OptimizerRules.fixed`
    (``ValueError``). ``None`` is accepted (no optimizer).
    """
    if optimizer is None:
        return
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer (or None), got {type(optimizer).__name__}; "
            f"pass the optimizer itself, not a learning-rate scheduler or a list"
        )
    name = type(optimizer).__name__
    rules = optimizer_rules(optimizer)
    if rules.refuse is not None:
        raise ValueError(rules.refuse.format(name=name))
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if (
                    isinstance(value, Tensor)
                    and value.dim() > 0
                    and value.shape != param.shape
                    and key not in rules.fixed
                ):
                    raise ValueError(
                        f"{name} holds state {key!r} of shape {tuple(value.shape)} for a parameter of shape "
                        f"{tuple(param.shape)}: growdense can only keep state shaped like its parameter. If "
                        f"{key!r} is not indexed by the parameter's elements, register rules declaring it fixed: "
                        f"growdense.optim_state.register_optimizer_rules({name}, OptimizerRules(fixed={{{key!r}}}, ...))"
                    )


def _holds_state(optimizer: torch.optim.Optimizer, params: Iterable[Optional[Tensor]]) -> list[Tensor]:
    return [p for p in params if p is not None and optimizer.state.get(p)]


def _group_of(optimizer: torch.optim.Optimizer, param: Tensor) -> Mapping[str, Any]:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise KeyError("the parameter is in no parameter group of the optimizer")


_ALTERNATIVES = "or grow with optimizer_state='reset' (a fresh optimizer) or 'keep_global_step'"


def check_keep(optimizer: Optional[torch.optim.Optimizer], params: Iterable[Optional[Tensor]]) -> None:
    """Raise a ``ValueError`` unless ``optimizer`` can give neurons added to ``params`` exactly its fresh state.

    Only parameters that already have state matter (the others start fresh anyway).
    """
    problem = keep_problem(optimizer, params)
    if problem is not None:
        raise ValueError(problem)


def keep_problem(optimizer: Optional[torch.optim.Optimizer], params: Iterable[Optional[Tensor]]) -> Optional[str]:
    """Why ``optimizer`` cannot give neurons added to ``params`` exactly its fresh state (``None``: it can).

    Asks the optimizer's rules: their :attr:`~OptimizerRules.keep_check`, then their
    :attr:`~OptimizerRules.step` count (one per Parameter or per optimizer cannot be exact).
    """
    if optimizer is None:
        return None
    held = _holds_state(optimizer, params)
    if not held:
        return None
    rules = optimizer_rules(optimizer)
    groups = [_group_of(optimizer, p) for p in held]
    if rules.keep_check is not None:
        problem = rules.keep_check(optimizer, groups)
        if problem is not None:
            return problem
    step = rules.step_of(optimizer)
    if step in ("parameter", "global"):
        cls = type(optimizer)
        hint = ""
        base = next((c for c in cls.__mro__ if c.__module__.startswith("torch.optim")), None)
        if base is not None and base is not torch.optim.Optimizer:
            # a registered twin of the torch class (growdense.optim's): same name, derived from it
            ours = next((c for c in _RULES if c is not base and c.__name__ == base.__name__ and issubclass(c, base)),
                        None)
            if ours is not None and not issubclass(cls, ours):
                also = "" if base is cls else f" (or derive {cls.__name__} from it)"
                hint = f" use {_display_name(ours)}{also} (same arguments and state_dict),"
        per = "per parameter" if step == "parameter" else "for all its parameters"
        return (
            f"{_display_name(cls)} keeps one step count {per}, so new neurons would get the old step's bias "
            f"correction instead of their own under optimizer_state='keep':{hint} {_ALTERNATIVES}"
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
    needed = optimizer_rules(optimizer).required_state
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


def state_tensors(optimizer: Optional[torch.optim.Optimizer], param: Tensor) -> Iterator[Tensor]:
    """The state tensors of ``param`` in ``optimizer`` that have ``param``'s shape.

    Yields nothing when ``optimizer`` is ``None`` or holds no state for ``param``.
    """
    for _, tensor in _keyed_state_tensors(optimizer, param):
        yield tensor


def _keyed_state_tensors(
    optimizer: Optional[torch.optim.Optimizer], param: Tensor, state: Optional[Mapping[str, Any]] = None
) -> list[tuple[str, Tensor]]:
    """``(key, tensor)`` for every state tensor of ``param`` shaped like it and not declared fixed
    (``state``: ``optimizer.state.get(param)``, when the caller has it)."""
    if optimizer is None:
        return []
    if state is None:
        state = optimizer.state.get(param)
    if not state:
        return []
    fixed = optimizer_rules(optimizer).fixed
    shape = param.shape
    return [
        (key, value)
        for key, value in state.items()
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape == shape and key not in fixed
    ]


def fresh_state_tensors(
    optimizer: Optional[torch.optim.Optimizer], param: Tensor, keyed: Optional[list[tuple[str, Tensor]]] = None
) -> list[tuple[Tensor, Any]]:
    """``(state tensor, its fresh value)`` for every element-wise state tensor of ``param`` (see :func:`fresh_state_`).

    ``keyed``: what :func:`_keyed_state_tensors` gives for ``param``, when the caller has it."""
    if keyed is None:
        keyed = _keyed_state_tensors(optimizer, param)
    if not keyed:
        return []
    declared = optimizer_rules(optimizer).state  # type: ignore[arg-type]
    out = []
    for key, tensor in keyed:
        constant = declared.get(key, 0.0)
        if type(constant) in (int, float) and constant == 0:  # the common case: no lookup of the group
            out.append((tensor, 0))
            continue
        value = _fresh_value(optimizer, param, key)  # type: ignore[arg-type]
        out.append((tensor, 0 if value is None else value))
    return out


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
    """The value ``optimizer`` gives state ``key`` of a new parameter, if not zero (its rules')."""
    value = optimizer_rules(optimizer).fresh_value(optimizer, param, key)
    if value is None or value == 0:
        return None
    return complex(value, value) if param.is_complex() else value


@torch.no_grad()
def fresh_state_(
    optimizer: Optional[torch.optim.Optimizer], param: Optional[Tensor], dim: int, start: int, stop: int
) -> None:
    """Set ``[start, stop)`` along ``dim`` of ``param``'s element-wise state to the optimizer's fresh values.

    The values are the optimizer's rules' (:attr:`OptimizerRules.state`): zero, except
    Adagrad's ``sum`` (its ``initial_accumulator_value``) and Rprop's ``step_size`` (the
    group's ``lr``), as each creates them for a new parameter.
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


def counts_births(optimizer: Optional[torch.optim.Optimizer]) -> bool:
    """Whether ``optimizer`` counts each element's age (rules with ``step="element"``): whether
    :func:`mark_born_` records anything for it."""
    return optimizer is not None and optimizer_rules(optimizer).step_of(optimizer) == "element"


def mark_born_(
    optimizer: Optional[torch.optim.Optimizer],
    param: Optional[Tensor],
    dim: int,
    start: int,
    stop: int,
    policy: str,
) -> None:
    """Record that indices ``[start, stop)`` along ``dim`` of ``param`` became active now.

    For optimizers that count each element's age (rules with ``step="element"``:
    :mod:`growdense.optim`) under ``"keep"``: their age starts at the Parameter's current
    step count. Under ``"keep_global_step"`` (and for removed indices, which pass
    ``policy="keep_global_step"``) they count as old as the Parameter. Other optimizers
    are left alone.
    """
    if param is None or stop <= start:
        return
    mark_born_ranges_(optimizer, param, dim, ((start, stop - start),), policy)


def mark_born_ranges_(
    optimizer: Optional[torch.optim.Optimizer],
    param: Optional[Tensor],
    dim: int,
    ranges: Iterable[tuple[int, int]],
    policy: str,
) -> None:
    """:func:`mark_born_` for several ``(first index, length)`` ranges along ``dim`` at once
    (what :func:`growdense.protocol.element_ranges` gives: a growth's units in every block)."""
    spans = [(first, first + length) for first, length in ranges if length > 0]
    if param is None or not spans or optimizer is None or optimizer_rules(optimizer).step_of(optimizer) != "element":
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
    for start, stop in spans:
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


def has_births(optimizer: Optional[torch.optim.Optimizer], param: Tensor) -> bool:
    """Whether ``optimizer`` records birth steps for ``param`` (see :func:`mark_born_`)."""
    return optimizer is not None and _BIRTH_KEY in optimizer.state.get(param, {})


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
    on_reset = optimizer_rules(optimizer).on_reset
    if on_reset is not None:
        on_reset(optimizer)


def _default_scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


# ---- torch's optimizers --------------------------------------------------------------------
def _adagrad_initial_state(optimizer: torch.optim.Optimizer) -> None:
    """Adagrad creates its state when built, not at the first step: ``step`` 0 and ``sum`` filled."""
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


def _sgd_keep_check(optimizer: torch.optim.Optimizer, groups: list) -> Optional[str]:
    if any(g["momentum"] != 0 and g["dampening"] != 0 for g in groups):
        return (
            f"SGD with momentum and dampening starts a fresh momentum buffer at the gradient itself, which a zeroed "
            f"slice cannot reproduce under optimizer_state='keep': use dampening=0, {_ALTERNATIVES}"
        )
    return None


def _adagrad_keep_check(optimizer: torch.optim.Optimizer, groups: list) -> Optional[str]:
    if any(g["lr_decay"] != 0 for g in groups):
        return (
            f"Adagrad with lr_decay decays by a step count kept per parameter, so new neurons would not start from "
            f"their own under optimizer_state='keep': use lr_decay=0, {_ALTERNATIVES}"
        )
    return None


def _asgd_keep_check(optimizer: torch.optim.Optimizer, groups: list) -> Optional[str]:
    return (
        f"ASGD keeps eta and mu per parameter, derived from its step count, so new neurons would not start from "
        f"their own under optimizer_state='keep': {_ALTERNATIVES}"
    )


def _group_lr(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> float:
    lr = group["lr"]
    return lr.item() if isinstance(lr, Tensor) else lr


def _register_torch_rules() -> None:
    o = torch.optim
    adam = OptimizerRules(
        state={"exp_avg": 0.0, "exp_avg_sq": 0.0, "max_exp_avg_sq": 0.0},
        step="parameter",
        required_state=lambda g: {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if g.get("amsgrad") else set()),
    )
    table: dict[str, OptimizerRules] = {
        "Adam": adam,
        "AdamW": adam,
        "NAdam": OptimizerRules(
            state={"exp_avg": 0.0, "exp_avg_sq": 0.0},
            step="parameter",
            required_state=lambda g: {"step", "mu_product", "exp_avg", "exp_avg_sq"},
        ),
        "RAdam": OptimizerRules(
            state={"exp_avg": 0.0, "exp_avg_sq": 0.0},
            step="parameter",
            required_state=lambda g: {"step", "exp_avg", "exp_avg_sq"},
        ),
        "Adamax": OptimizerRules(
            state={"exp_avg": 0.0, "exp_inf": 0.0},
            step="parameter",
            required_state=lambda g: {"step", "exp_avg", "exp_inf"},
        ),
        "SGD": OptimizerRules(
            state={"momentum_buffer": 0.0},
            keep_check=_sgd_keep_check,
            required_state=lambda g: {"momentum_buffer"} if g.get("momentum", 0) != 0 else set(),
        ),
        "RMSprop": OptimizerRules(
            state={"square_avg": 0.0, "momentum_buffer": 0.0, "grad_avg": 0.0},
            required_state=lambda g: {"step", "square_avg"}
            | ({"momentum_buffer"} if g.get("momentum", 0) > 0 else set())
            | ({"grad_avg"} if g.get("centered") else set()),
        ),
        "Adagrad": OptimizerRules(
            state={"sum": lambda opt, group: opt.defaults["initial_accumulator_value"]},  # what torch's lazy init uses
            keep_check=_adagrad_keep_check,
            required_state=lambda g: {"step", "sum"},
            on_reset=_adagrad_initial_state,
        ),
        "Rprop": OptimizerRules(
            state={"prev": 0.0, "step_size": _group_lr},
            required_state=lambda g: {"step", "prev", "step_size"},
        ),
        "ASGD": OptimizerRules(
            state={"ax": 0.0},
            keep_check=_asgd_keep_check,
            required_state=lambda g: {"step", "eta", "mu", "ax"},
        ),
        "Adadelta": OptimizerRules(
            state={"square_avg": 0.0, "acc_delta": 0.0},
            required_state=lambda g: {"step", "square_avg", "acc_delta"},
        ),
        "LBFGS": OptimizerRules(
            refuse="{name} keeps one flat history over all its parameters, which growing or shrinking a layer "
            "cannot edit slice by slice; use another optimizer with a Wiring, or rebuild the {name} after each change"
        ),
        "Adafactor": OptimizerRules(
            refuse="{name} factors its second moment into row and column averages over the whole capacity, which "
            "differ from the active block's; use growdense.optim.Adam or another element-wise optimizer"
        ),
        "SparseAdam": OptimizerRules(
            refuse="{name} needs sparse gradients; GrowLinear's gradients are dense: use growdense.optim.Adam"
        ),
    }
    for name, rules in table.items():
        cls = getattr(o, name, None)
        if isinstance(cls, type):
            register_optimizer_rules(cls, rules)


_register_torch_rules()
