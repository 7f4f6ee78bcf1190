"""What both of :func:`growdense.growable`'s analyses share (the MLP analysis in
:mod:`growdense.growable`, the width groups in :mod:`growdense._width_groups`): the error
they raise, the torch operations a traced width flows through, the activation modules fused
into a :class:`~growdense.GrowLinear`, and the capacities asked for."""

from __future__ import annotations

import math
import operator
from typing import Any, Iterable, Mapping, Optional, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from . import ops

Capacity = Union[float, int, Mapping[str, int]]


class NotGrowableError(ValueError):
    """A model (or one of its layers) that :func:`growable` cannot make growable.

    ``problems`` maps each offending layer's qualified name to the reason.
    """

    def __init__(self, problems: Mapping[str, str], hint: str = "") -> None:
        self.problems = dict(problems)
        lines = [f"layer {name!r}: {reason}" for name, reason in self.problems.items()]
        message = "cannot make the model growable:\n  " + "\n  ".join(lines)
        if hint:
            message += "\n" + hint
        super().__init__(message)


# ---- what a hidden width may flow through ------------------------------------------------

# Activation modules that can be fused into GrowLinear, by the name GrowLinear uses; a
# name is used only where ops.ACTIVATIONS has it (otherwise the module stays as it is).
def _fused_name(module: nn.Module) -> Optional[str]:
    if type(module) is nn.ReLU:
        name = "relu"
    elif type(module) is nn.GELU:
        name = "gelu" if module.approximate == "none" else "gelu_tanh"
    elif type(module) is nn.SiLU:
        name = "silu"
    else:
        return None
    return name if name in ops.ACTIVATIONS else None


_ELEMENTWISE_MODULES = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Dropout, nn.AlphaDropout,
)  # fmt: skip

_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.softplus, F.softsign, F.tanhshrink, F.logsigmoid, F.sigmoid,
    F.tanh, F.dropout, F.alpha_dropout, torch.relu, torch.sigmoid, torch.tanh, torch.exp,
    torch.abs, torch.square, torch.sqrt, torch.clamp, torch.neg, torch.dropout,
    operator.neg, operator.pos,
}  # fmt: skip

_ELEMENTWISE_METHODS = {
    "relu", "sigmoid", "tanh", "exp", "abs", "square", "sqrt", "clamp", "clamp_min", "clamp_max",
    "neg", "contiguous", "relu_", "sigmoid_", "tanh_", "clamp_", "neg_", "float", "double", "half",
    "bfloat16", "to",
}  # fmt: skip

# Binary elementwise operations: fine with a Python number, or with a tensor of the same width.
_BINARY_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
}  # fmt: skip
_BINARY_METHODS = {"add", "sub", "mul", "div", "pow", "add_", "sub_", "mul_", "div_", "__add__", "__mul__"}
_ADDITIONS = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub,
              "add", "sub", "add_", "sub_", "__add__"}  # fmt: skip

_RESHAPES = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "unsqueeze", "squeeze",
    "expand", "expand_as", "view_as", "reshape_as", "repeat", "movedim", "swapaxes", "mT", "T",
    torch.reshape, torch.flatten, torch.unflatten, torch.permute, torch.transpose, torch.t,
    torch.unsqueeze, torch.squeeze, torch.movedim, torch.swapaxes,
}  # fmt: skip
_CONCATENATIONS = {torch.cat, torch.concat, torch.stack, torch.hstack, torch.vstack, torch.dstack}
_NORM_FUNCTIONS = {F.layer_norm, F.batch_norm, F.group_norm, F.instance_norm, F.normalize, F.softmax,
                   F.log_softmax}  # fmt: skip
_NORM_MODULES = (
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
)  # fmt: skip
if hasattr(nn, "RMSNorm"):
    _NORM_MODULES = (*_NORM_MODULES, nn.RMSNorm)
if hasattr(F, "rms_norm"):
    _NORM_FUNCTIONS.add(F.rms_norm)


def _op_name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


def _tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    args: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), args.append)
    return args


def _input_of(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    """The input tensor of a ``call_module`` node of a linear (positional or ``input=``)."""
    value = node.args[0] if node.args else node.kwargs.get("input")
    return value if isinstance(value, torch.fx.Node) else None


# ---- capacities -----------------------------------------------------------------------

def _capacities(capacity: Capacity, widths: Mapping[str, int], excluded: Iterable[str]) -> dict[str, int]:
    if isinstance(capacity, Mapping):
        unknown = [name for name in capacity if name not in widths]
        if unknown:
            skipped = [name for name in unknown if name in set(excluded)]
            detail = f" ({skipped} are excluded)" if skipped else ""
            raise ValueError(
                f"capacity names {unknown} are not hidden widths of the model{detail}; "
                f"its hidden widths are {list(widths)}"
            )
        result = {}
        for name, width in widths.items():
            value = capacity.get(name, width)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"capacity[{name!r}] must be an int (a number of neurons), got {value!r}")
            if value < width:
                raise ValueError(f"capacity[{name!r}]={value} is below the width {width} the layer has now")
            result[name] = value
        return result
    if isinstance(capacity, bool) or not isinstance(capacity, (int, float)) or not math.isfinite(capacity):
        raise TypeError(
            f"capacity must be a number >= 1 (a multiplier of the widths) or a dict {{name: int}}, got {capacity!r}"
        )
    if capacity < 1:
        raise ValueError(f"capacity={capacity} is a multiplier of today's widths and must be >= 1")
    # Round to a whole neuron, forgiving float noise such as 100 * 1.1 = 110.00000000000001.
    return {name: max(width, math.ceil(round(width * capacity, 6))) for name, width in widths.items()}


def _fusions(graph: torch.fx.Graph, converted: list[str], linears, modules) -> dict[str, tuple[str, list[str]]]:
    """``{linear: (activation name, [activation modules to replace by Identity])}``.

    A linear is fused with the activation module that is the only user of each of its
    calls, when every call of that activation module directly follows a fused linear (so
    it can become an Identity everywhere it is used).
    """
    candidates: dict[str, tuple[str, list[str]]] = {}
    for name in converted:
        acts, kinds = [], set()
        for node in graph.nodes:
            if node.op != "call_module" or node.target != name:
                continue
            users = list(node.users)
            user = users[0] if len(users) == 1 else None
            plain_call = (
                user is not None
                and user.op == "call_module"
                and _input_of(user) is node
                and len(user.args) + len(user.kwargs) == 1
            )
            if not plain_call:
                kinds.add(None)
                break
            act = modules[user.target]
            if act._forward_hooks or act._forward_pre_hooks or act._backward_hooks or act._backward_pre_hooks:
                kinds.add(None)
                break
            kinds.add(_fused_name(act))
            acts.append(user.target)
        if len(kinds) == 1 and None not in kinds:
            candidates[name] = (kinds.pop(), sorted(set(acts)))
    while True:  # drop fusions whose activation module is also used elsewhere
        fused_calls = {id(node) for node in graph.nodes if node.op == "call_module" and node.target in candidates}
        drop = set()
        for name, (_, acts) in candidates.items():
            for node in graph.nodes:
                if node.op == "call_module" and node.target in acts:
                    source = _input_of(node)
                    kind = candidates[name][0]
                    if source is None or id(source) not in fused_calls or candidates[source.target][0] != kind:
                        drop.add(name)
        if not drop:
            return candidates
        for name in drop:
            del candidates[name]
