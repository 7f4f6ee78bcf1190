"""``growable(model)``: make an existing model's hidden widths growable, found by tracing.

The model's forward is traced with :mod:`torch.fx` (no example input is needed). A
*hidden width* is the output of one ``nn.Linear`` (the producer) that flows, through
elementwise operations only (activations, dropout, arithmetic with Python numbers), into
the input of one or more other ``nn.Linear`` s (the consumers). Its name is the
producer's qualified module name (``"0"``, ``"2"``, ... in an ``nn.Sequential``;
``"encoder.fc1"`` in a nested module).

Every producer and consumer becomes a :class:`~growdense.GrowLinear` holding the same
weights; an activation module that directly follows one is fused into it and replaced by
``nn.Identity``, so the model's own ``forward`` keeps working unchanged.

A linear whose output reaches no other linear (an output layer) is not a hidden width and
stays as it is unless it consumes one. A linear whose output reaches another linear
through anything else (a reshape, a normalisation, an addition of another tensor such as
a residual connection, a concatenation), or whose hidden output is also returned by the
model, cannot grow: :func:`growable` refuses it by name, with the reason, unless it is
listed in ``exclude`` (then its width stays fixed). A VAE's mean and log-variance heads
are such layers: the latent width reaches the decoder through the sampling.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

import torch
import torch.fx
from torch import nn

from . import protocol
from ._conversion import (
    _ADDITIONS, _BINARY_FUNCTIONS, _BINARY_METHODS, _CONCATENATIONS, _ELEMENTWISE_FUNCTIONS, _ELEMENTWISE_METHODS,
    _ELEMENTWISE_MODULES, _NORM_FUNCTIONS, _NORM_MODULES, _RESHAPES, Capacity, NotGrowableError, _capacities,
    _fusions, _input_of, _op_name, _tensor_args,
)
from .layers import GrowLinear
from .wiring import Wiring

__all__ = ["growable", "NotGrowableError"]

NotGrowableError.__module__ = __name__  # public here (defined beside what both analyses share)


# ---- tracing and the analysis of one producer's output ------------------------------------

@dataclass
class _Flow:
    """Where one linear's output goes.

    ``consumers``: linears it reaches through elementwise operations only; ``indirect``:
    linears it reaches only through something else; ``barriers``: why it cannot grow
    (operations its width flows into that growdense cannot resize).
    """

    consumers: list[str] = field(default_factory=list)
    indirect: list[str] = field(default_factory=list)
    barriers: list[str] = field(default_factory=list)

    def reason(self) -> str:
        if self.consumers:
            return "; ".join(self.barriers)
        through = "; ".join(self.barriers)
        return f"its output reaches {self.indirect} only through operations that fix its width: {through}"


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with every ``nn.Linear`` (subclasses and lazy ones included) a leaf:
    a call of one is a node growable() can convert or refuse by name."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, nn.Linear) or super().is_leaf_module(m, module_qualified_name)


def _linear_problem(module: nn.Linear) -> Optional[str]:
    """Why ``module`` (an ``nn.Linear``, maybe a subclass) cannot become a GrowLinear, or ``None``."""
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return "it is a lazy layer that has not been initialised yet; run one forward pass first"
    cls = type(module)
    if cls is nn.Linear:
        return None
    if cls.forward is not nn.Linear.forward:
        return (f"it is a {cls.__name__}, an nn.Linear subclass with its own forward, which a GrowLinear "
                f"would not compute; exclude it or make it a plain nn.Linear")
    extra = [n for n, _ in module.named_parameters() if n not in ("weight", "bias")]
    extra += [n for n, _ in module.named_buffers()] + [n for n, _ in module.named_children()]
    if extra:
        return (f"it is a {cls.__name__}, an nn.Linear subclass holding more than weight and bias "
                f"({', '.join(extra)}), which a GrowLinear would drop")
    return None


def _trace(model: nn.Module) -> torch.fx.Graph:
    try:
        return _Tracer().trace(model)
    except Exception as error:  # any failure of a user's forward under tracing
        raise NotGrowableError(
            {type(model).__name__: f"its forward cannot be traced by torch.fx ({type(error).__name__}: {error})"},
            "growable() follows the model's forward symbolically; make it traceable (no Python control "
            "flow on tensor values or shapes), or build the GrowLinear layers and their Wiring by hand.",
        ) from error


def _barrier(node: torch.fx.Node, width: set[torch.fx.Node], modules: Mapping[str, nn.Module]) -> Optional[str]:
    """``None`` if ``node`` keeps the width elementwise, else why the width cannot flow through it."""
    op, target = node.op, node.target
    if op == "output":
        return "its output is an output of the model (used outside it, so its width cannot change)"
    if op == "call_module":
        module = modules[target]
        if isinstance(module, _ELEMENTWISE_MODULES):
            return None
        if isinstance(module, nn.PReLU) and module.num_parameters == 1:
            return None
        if isinstance(module, _NORM_MODULES):
            return f"its output flows into a normalisation layer ({type(module).__name__} {target!r})"
        return f"its output flows into module {target!r} ({type(module).__name__}), which growdense cannot resize"
    if op not in ("call_function", "call_method"):
        return f"its output flows into an operation growdense cannot follow ({op} {_op_name(target)})"
    others = [arg for arg in _tensor_args(node) if arg not in width]
    elementwise = (_ELEMENTWISE_FUNCTIONS, _ELEMENTWISE_METHODS, _BINARY_FUNCTIONS, _BINARY_METHODS)
    if any(target in kind for kind in elementwise):
        if not others:
            return None
        if target in _ADDITIONS:
            return (
                f"its output flows into an addition ({_op_name(target)} at {node.name!r}) with a tensor "
                f"that does not grow with it, such as a residual connection"
            )
        return (
            f"its output flows into an elementwise {_op_name(target)} (at {node.name!r}) with a tensor "
            f"that does not grow with it"
        )
    if target in _RESHAPES:
        return f"its output flows into a reshape ({_op_name(target)} at {node.name!r})"
    if target in _CONCATENATIONS:
        return f"its output flows into a concatenation ({_op_name(target)} at {node.name!r})"
    if target in _NORM_FUNCTIONS:
        return f"its output flows into a normalisation ({_op_name(target)} at {node.name!r})"
    if _reads_batch_size_only(node):
        return None
    if (op == "call_method" and target == "size") or (op == "call_function" and target is getattr):
        return f"its shape is read (at {node.name!r}), so the code may depend on the width"
    return f"its output flows into {_op_name(target)} (at {node.name!r}), which growdense cannot follow"


def _reads_batch_size_only(node: torch.fx.Node) -> bool:
    """``h.size(0)`` or ``h.shape[0]``: reads a leading dimension, never the width."""
    if node.op == "call_method" and node.target == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return isinstance(dim, int) and dim >= 0 and not isinstance(dim, bool)
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
        return bool(node.users) and all(
            user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0 for user in node.users
        )
    return False


def _flow(
    nodes: list[torch.fx.Node],
    calls: list[torch.fx.Node],
    linears: Mapping[str, nn.Module],
    modules: Mapping[str, nn.Module],
) -> tuple[_Flow, set]:
    """Follow a producer's outputs: elementwise to consumer linears, anything else to barriers.

    ``nodes`` is the graph in (topological) order, so when a node is reached every input
    it combines is already known to carry the width or not. ``width`` holds the nodes that
    carry the width elementwise; ``tainted`` those reached through a barrier, followed
    only to learn whether they reach another linear.
    """
    flow = _Flow()
    width, tainted = set(calls), set()
    for node in nodes:
        if node in width:
            continue
        args = _tensor_args(node)
        is_linear = node.op == "call_module" and node.target in linears
        if any(arg in width for arg in args):
            if is_linear and _input_of(node) in width and sum(arg in width for arg in args) == 1:
                if node.target not in flow.consumers:
                    flow.consumers.append(node.target)
                continue
            if _reads_batch_size_only(node):
                continue
            reason = _barrier(node, width, modules)
            if reason is None:
                width.add(node)
                continue
            if reason not in flow.barriers:
                flow.barriers.append(reason)
            tainted.add(node)
        elif any(arg in tainted for arg in args):
            if is_linear:
                if node.target not in flow.indirect:
                    flow.indirect.append(node.target)
            elif not _reads_batch_size_only(node):
                tainted.add(node)
    return flow, width


# ---- the public entry point ----------------------------------------------------------

def growable(
    model: nn.Module,
    capacity: Capacity = 2.0,
    *,
    exclude: Iterable[str] = (),
    streams: Optional[bool] = None,
    strict: Optional[bool] = None,
    allow_empty: bool = False,
) -> Wiring:
    """Make ``model``'s hidden widths growable, in place; return their :class:`~growdense.Wiring`.

    Two analyses (``streams``): a transformer's widths are found as width groups across
    residual additions, norms, embeddings and attention, and converted to
    :class:`~growdense.GrowLinear`, :class:`~growdense.GrowLayerNorm`,
    :class:`~growdense.GrowRMSNorm`, :class:`~growdense.GrowEmbedding` and
    :class:`~growdense.GrowMultiheadAttention` (see docs/growing-transformers.md and
    :mod:`growdense._width_groups` for the rules and the names of the widths); an MLP's
    hidden widths are found as described below.

    Each hidden width (see the module docstring) gets its producer and consumers replaced
    by :class:`~growdense.GrowLinear` s with the same weights and capacity for more
    neurons; an ``nn.ReLU`` (and ``nn.GELU`` / ``nn.SiLU`` where GrowLinear supports them)
    directly after a converted linear is fused into it and replaced by ``nn.Identity``. The
    model computes the same function afterwards (bit for bit in float32 on CPU). Build the
    optimizer after this call: the converted layers have new Parameters.

    Args:
        model: the model; its ``forward`` must be traceable by :mod:`torch.fx`.
        capacity: the capacity of every hidden width as a multiple of its width now
            (``2.0``: room to double), or ``{name: neurons}`` for chosen widths (the others
            get no headroom: they can shrink and regrow, not pass today's width).
        exclude: hidden widths to leave fixed (their names, or the name of a submodule to
            leave all widths inside it fixed). A width whose output also flows somewhere
            it cannot grow (a reshape, a normalisation, a residual addition, a
            concatenation, the model's output) must be excluded, or the call fails.
            With ``streams``: a width's name, or a module whose widths (every width one
            of its members lies in) stay fixed.
        streams: follow widths across residual additions, norms (which ride a width),
            embeddings and attention (width groups). ``None`` (default): when the model
            holds an ``nn.Embedding``, ``nn.MultiheadAttention``,
            ``nn.TransformerEncoderLayer`` or ``nn.TransformerEncoder``; ``False``: the
            MLP analysis, where norms and additions of other tensors fix a width.
        strict: with ``streams``, whether a width that cannot grow (an operation the
            analysis does not understand, the model's inputs and outputs) raises
            :class:`NotGrowableError` naming it and why (``True``) or stays fixed,
            listed in the returned wiring's ``fixed`` (``False``, the default; a width
            fixed by an operation also warns). The MLP analysis is always strict.
        allow_empty: return an empty :class:`~growdense.Wiring` for a model that has no
            hidden width at all (by default that raises, naming why each linear layer is not
            one). A model whose hidden widths are all in ``exclude`` gives an empty Wiring.

    Returns:
        A :class:`~growdense.Wiring` with no optimizer: set ``wiring.optimizer = opt`` (or
        let :class:`growdense.lightning.GrowthCallback` do it) so growth keeps the
        optimizer's state consistent. Its ``fixed`` attribute maps each width found but
        left fixed to the reason (``{}`` for the MLP analysis).

    Raises:
        NotGrowableError: a layer that cannot be made growable, naming it and why. The
            model is unchanged (its modules and ``state_dict``) when anything raises.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"growable() needs an nn.Module, got {type(model).__name__}")
    from . import _width_groups

    if streams is None:
        streams = _width_groups.has_stream_modules(model)
    if streams:
        return _width_groups.growable_streams(model, capacity, exclude=exclude, strict=bool(strict))
    if strict is not None and not strict:
        raise ValueError("strict=False needs streams=True: the MLP analysis refuses a width it cannot grow")
    if isinstance(exclude, str):
        exclude = [exclude]
    exclude = list(exclude)
    modules = dict(model.named_modules())
    existing = {name: type(module).__name__ for name, module in modules.items() if protocol.is_growable(module)}
    if existing:
        raise NotGrowableError(
            {name: f"it is already a {kind}" for name, kind in existing.items()},
            "growable() converts a model of nn.Linear layers once; wire GrowLinear layers by hand with Wiring.add().",
        )
    # nn.Linear and its subclasses: those whose forward is nn.Linear's are converted; the others,
    # and lazy layers not yet initialised, are refused by name if they would have to be.
    linears = {name: module for name, module in modules.items() if isinstance(module, nn.Linear)}
    for name in exclude:
        if not isinstance(name, str) or not any(n == name or n.startswith(name + ".") for n in linears):
            raise ValueError(
                f"exclude names {name!r}, which is not a linear layer or a module holding one; "
                f"linear layers: {list(linears)}"
            )

    graph = _trace(model)
    nodes = list(graph.nodes)
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in nodes:
        if node.op == "call_module" and node.target in linears:
            calls.setdefault(node.target, []).append(node)

    def excluded(name: str) -> bool:
        return any(name == e or name.startswith(e + ".") for e in exclude)

    # 1. Hidden widths: producers whose output reaches consumers through elementwise ops.
    problems: dict[str, str] = {}
    hidden: dict[str, list[str]] = {}
    carriers: dict[str, set] = {}
    kept_fixed: list[str] = []
    for name, producer_calls in calls.items():
        flow, width = _flow(nodes, producer_calls, linears, modules)
        if not (flow.consumers or flow.indirect):
            continue  # an output-side layer
        if excluded(name):
            kept_fixed.append(name)
            continue  # one the user keeps fixed
        if flow.barriers:
            problems[name] = flow.reason()
            continue
        hidden[name] = flow.consumers
        carriers[name] = width
    # A consumer called elsewhere on something else would see its input width change there too.
    for name, consumers in hidden.items():
        for consumer in consumers:
            if any(_input_of(call) not in carriers[name] for call in calls[consumer]):
                problems.setdefault(
                    name, f"its consumer {consumer!r} is also called on an input that does not come from {name!r}"
                )
    if problems:
        raise NotGrowableError(problems, f"pass exclude={sorted(problems)} to keep these widths fixed.")
    if not hidden and not kept_fixed and not allow_empty:
        raise NotGrowableError(
            _why_nothing(linears, calls),
            f"{type(model).__name__} has no hidden width growable() can grow: a hidden width is an nn.Linear "
            f"whose output reaches another nn.Linear through elementwise operations. Pass allow_empty=True to "
            f"accept an empty Wiring.",
        )

    # 2. The layers to convert must be plain: nothing else may hold or read their Parameters.
    consumer_of = {c: name for name, consumers in hidden.items() for c in consumers}
    converted = [name for name in linears if name in hidden or name in consumer_of]
    _check_convertible(model, graph, converted, linears, problems)
    if problems:
        raise NotGrowableError(problems)

    widths = {name: linears[name].out_features for name in hidden}
    capacities = _capacities(capacity, widths, [n for n in calls if excluded(n)])

    # 3. Activations to fuse, then build everything before the model is touched.
    fused = _fusions(graph, converted, linears, modules)
    new: dict[str, GrowLinear] = {}
    for name in converted:
        linear = linears[name]
        layer = GrowLinear.from_linear(
            linear,
            capacity_in=capacities[consumer_of[name]] if name in consumer_of else None,
            capacity_out=capacities.get(name),
            activation=fused.get(name, (None, []))[0],
        )
        layer.train(linear.training)
        layer.weight.requires_grad_(linear.weight.requires_grad)
        if linear.bias is not None:
            layer.bias.requires_grad_(linear.bias.requires_grad)
        new[name] = layer
    wiring = _width_groups.GrowableWiring()
    for name, consumers in hidden.items():
        wiring.add(name, new[name], [new[c] for c in consumers])
    replacements = {id(linears[name]): new[name] for name in converted}
    for _, (_, activations) in fused.items():
        for act in activations:
            replacements[id(modules[act])] = nn.Identity()

    # 4. Swap the modules in every parent that holds them (nothing above can fail after this).
    _width_groups.swap_modules(model, replacements)
    return wiring


def _check_convertible(model: nn.Module, graph: torch.fx.Graph, converted: list[str], linears, problems: dict) -> None:
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    read = {node.target for node in graph.nodes if node.op == "get_attr"}
    for name in converted:
        linear = linears[name]
        problem = _linear_problem(linear)
        if problem is not None:
            problems[name] = problem
            continue
        if linear._forward_hooks or linear._forward_pre_hooks or linear._backward_hooks or linear._backward_pre_hooks:
            problems[name] = "it has hooks registered, which would not carry over to the new layer"
            continue
        if torch.nn.utils.parametrize.is_parametrized(linear):
            problems[name] = "it is parametrized (e.g. weight norm), which GrowLinear does not support"
            continue
        for pname in ("weight", "bias"):
            param = getattr(linear, pname)
            if param is None:
                continue
            others = [n for n in owners.get(id(param), []) if n.rsplit(".", 1)[0] != name]
            if others:
                problems[name] = f"its {pname} is shared with {others} (tied weights)"
            elif f"{name}.{pname}" in read:
                problems[name] = f"the model's forward reads its {pname} directly (e.g. tied weights)"


def _why_nothing(linears, calls) -> dict[str, str]:
    """Why each linear layer of a model with no hidden width is not one (for the error)."""
    if not linears:
        return {"(model)": "it has no nn.Linear layer"}
    why = {}
    for name in linears:
        if name not in calls:
            why[name] = "its forward never calls it"
        else:
            why[name] = "its output reaches no other nn.Linear (an output layer)"
    return why
