"""Width groups of a traced model: ``growable(model)`` across residual streams, norms, embeddings, attention.

This is the analysis behind ``growable(model, streams=True)`` (the default for a model
holding an ``nn.Embedding``, ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` or
``nn.TransformerEncoder``). It follows the *last dimension* (the features) of every tensor
the forward computes, as a dependency graph for pruning does for channels: every
tensor's features are a variable, and a union-find joins the variables that must have
the same size:

- an element-wise operation (activation, dropout, arithmetic) keeps its input's
  features; an addition (a residual connection) or a product of two tensors joins theirs;
- ``nn.Linear``: its input joins its ``in`` width, its output is its ``out`` width;
- ``nn.LayerNorm`` / ``nn.RMSNorm`` (over the last dimension, with weights): its input and
  output join its ``features`` (the norm *rides* the width);
- ``nn.Embedding``: its output is its ``embedding_dim`` (it *writes* the stream);
- ``nn.MultiheadAttention``: query, key and value (when of the model width) and the
  output join its ``embed_dim``; its heads are a width of their own;
- ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` are known patterns (their
  forwards hold a fused fast path that tracing cannot follow): the stream joins
  ``self_attn``, ``linear1``'s input, ``linear2``'s output and both norms; ``linear1``'s
  output and ``linear2``'s input are the feed-forward width; the heads are their own.

Each resulting group is a *width* when a member computes it (a linear's output, an
embedding, an attention) and a member reads or rides it (an attention's heads and
embed_dim do both), or the computed features reach a reader through an operation the
analysis cannot follow (then it is fixed). It grows when
nothing outside these rules touches it; otherwise it stays fixed and the reason is
recorded (the model's inputs and outputs, a reshape, a concatenation along the
features, reading the width from a shape, a parameter read directly, a module growdense
does not know). Widths are named (see :func:`_name`):

- the heads of attention ``A``: ``"A.heads"``;
- a width written by several modules (a residual stream: the embedding, every
  attention's and feed-forward block's output): ``"stream@"`` + its first writer in the
  forward's order (``"stream@tok_emb"``);
- a width written by one module: that module's name (``"layers.0.linear1"``), as for MLPs.

Operations on the first dimension, or on negative dimensions other than ``-1``
(``x.size(0)``, ``x.size(-2)``, ``x.mean(-2)``, ``x.transpose(-3, -2)``, ``torch.cat(...,
dim=-2)``, ``x[i]``), keep the width: this assumes the tensors carrying a width have at
least two dimensions (the features last), as a transformer's ``(batch, sequence,
features)`` do.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from . import protocol
from .attention import GrowMultiheadAttention
from .embedding import GrowEmbedding
from .layers import GrowLinear
from .norms import GrowLayerNorm, GrowRMSNorm
from .wiring import Wiring

__all__ = ["GrowableWiring", "has_stream_modules", "growable_streams"]

_RMSNorm = getattr(nn, "RMSNorm", None)
_NORMS = (nn.LayerNorm,) + ((_RMSNorm,) if _RMSNorm is not None else ())
_PATTERNS = (nn.TransformerEncoderLayer, nn.TransformerEncoder)
_KNOWN = (nn.Linear, nn.Embedding, nn.MultiheadAttention) + _NORMS + _PATTERNS

# Reasons a width stays fixed, by kind: the model's boundary, the user's choice, or an
# operation or module the analysis cannot follow.
BOUNDARY, EXCLUDED, OPERATION = "boundary", "excluded", "operation"


class GrowableWiring(Wiring):
    """The :class:`~growdense.Wiring` that :func:`growdense.growable` returns.

    Besides the widths it can grow, it lists the widths it found and left fixed:
    ``fixed`` maps each such width's name to why (``{}`` when every width grows).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fixed: dict[str, str] = {}


def has_stream_modules(model: nn.Module) -> bool:
    """Whether ``model`` holds a module whose widths only the width-group analysis can follow."""
    kinds = (nn.Embedding, nn.MultiheadAttention) + _PATTERNS
    return any(isinstance(m, kinds) for m in model.modules())


# ---- module-local widths and their roles --------------------------------------------------
def _locals(module: nn.Module) -> dict[str, frozenset]:
    """``{module-local width: roles}`` of a convertible module (its Grow twin's protocol names)."""
    P, C, R = protocol.PRODUCER, protocol.CONSUMER, protocol.RIDER
    if isinstance(module, nn.Linear):
        return {"in": frozenset({C}), "out": frozenset({P})}
    if isinstance(module, nn.Embedding):
        return {"embedding_dim": frozenset({R})}
    if isinstance(module, _NORMS):
        return {"features": frozenset({R})}
    if isinstance(module, nn.MultiheadAttention):
        # heads: q/k/v rows compute them, out_proj's columns read them; embed_dim: the
        # projections read the stream, out_proj's rows write it
        out = {"heads": frozenset({P, C}), "embed_dim": frozenset({P, C})}
        if not module._qkv_same_embed_dim:
            out.update(kdim=frozenset({C}), vdim=frozenset({C}))
        return out
    return {}


def _writes(module: nn.Module, local: str) -> bool:
    """Whether ``local`` is a width this module computes (a writer, for naming)."""
    return protocol.PRODUCER in _locals(module).get(local, ()) or isinstance(module, nn.Embedding)


# ---- the analysis ----------------------------------------------------------------------
@dataclass
class _Group:
    members: list[tuple[str, str]] = field(default_factory=list)  # (module name, local width)
    reasons: list[tuple[str, str]] = field(default_factory=list)  # (kind, text)
    writers: list[tuple[int, str]] = field(default_factory=list)  # (order, label)
    name: str = ""

    def fixed_reason(self) -> Optional[str]:
        texts = list(dict.fromkeys(text for _, text in self.reasons))
        return "; ".join(texts) if texts else None

    def kinds(self) -> set[str]:
        return {kind for kind, _ in self.reasons}


class _Analysis:
    """Union-find over feature variables (see the module docstring)."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = modules
        self.parent: list[int] = []
        self.reasons: dict[int, list[tuple[str, str]]] = {}
        self.writers: dict[int, list[tuple[int, str]]] = {}
        self.local: dict[tuple[str, str], int] = {}
        self.derived: list[tuple[int, int]] = []  # (source, result) through an operation that fixes both
        self.order = 0

    # union-find
    def new(self, reason: Optional[tuple[str, str]] = None) -> int:
        self.parent.append(len(self.parent))
        var = len(self.parent) - 1
        if reason is not None:
            self.reasons.setdefault(var, []).append(reason)
        return var

    def find(self, var: int) -> int:
        while self.parent[var] != var:
            self.parent[var] = self.parent[self.parent[var]]
            var = self.parent[var]
        return var

    def union(self, *vars_: Optional[int]) -> Optional[int]:
        vs = [v for v in vars_ if v is not None]
        if not vs:
            return None
        root = self.find(vs[0])
        for v in vs[1:]:
            other = self.find(v)
            if other != root:
                self.parent[other] = root
        return root

    def fix(self, var: Optional[int], kind: str, text: str) -> None:
        if var is not None:
            self.reasons.setdefault(var, []).append((kind, text))

    def write(self, var: int, label: str) -> None:
        self.writers.setdefault(var, []).append((self.order, label))

    def of(self, module_name: str, local: str) -> int:
        """The variable of a module-local width."""
        key = (module_name, local)
        if key not in self.local:
            self.local[key] = var = self.new()
            if _writes(self.modules[module_name], local):
                self.write(var, module_name)
        return self.local[key]

    # known modules and patterns
    def linear(self, name: str, x: Optional[int]) -> int:
        self.union(x, self.of(name, "in"))
        return self.of(name, "out")

    def norm(self, name: str, x: Optional[int]) -> int:
        module = self.modules[name]
        shape = tuple(module.normalized_shape)
        if len(shape) != 1 or not module.elementwise_affine:
            why = "normalises over several dimensions" if len(shape) != 1 else "has no elementwise affine weights"
            out = self.new()
            self.union(out, x)
            self.fix(out, OPERATION, f"{type(module).__name__} {name!r} {why}, which growdense cannot grow")
            return out
        return self.union(x, self.of(name, "features"))  # type: ignore[return-value]

    def attention(self, name: str, q: Optional[int], k: Optional[int], v: Optional[int]) -> tuple[int, int]:
        module = self.modules[name]
        self.of(name, "heads")
        if module._qkv_same_embed_dim:
            self.union(q, k, v, self.of(name, "embed_dim"))
        else:
            self.union(q, self.of(name, "embed_dim"))
            self.union(k, self.of(name, "kdim"))
            self.union(v, self.of(name, "vdim"))
        weights = self.new((OPERATION, f"the attention weights of {name!r} are used (their last dimension is a "
                                       f"sequence length, not a width)"))
        return self.of(name, "embed_dim"), weights

    def encoder_layer(self, name: str, x: Optional[int]) -> Optional[int]:
        """``nn.TransformerEncoderLayer`` as a known pattern (either ``norm_first``)."""
        layer = self.modules[name]
        p = f"{name}." if name else ""
        for norm in ("norm1", "norm2"):
            if self._affine(p + norm):
                x = self.union(x, self.of(p + norm, "features"))
            else:
                self.fix(x, OPERATION, f"{p + norm!r} has no elementwise affine weights, which growdense cannot grow")
        out, _ = self.attention(p + "self_attn", x, x, x)
        x = self.union(x, out, self.of(p + "linear1", "in"), self.of(p + "linear2", "out"))
        hidden = self.union(self.of(p + "linear1", "out"), self.of(p + "linear2", "in"))
        act = layer.activation
        if isinstance(act, nn.Module) and not isinstance(act, _ELEMENTWISE_MODULES):
            self.fix(hidden, OPERATION, f"{name or 'the layer'}'s activation is {type(act).__name__}, "
                                        f"which growdense cannot follow")
        return x

    def encoder(self, name: str, x: Optional[int]) -> Optional[int]:
        encoder = self.modules[name]
        p = f"{name}." if name else ""
        for i, layer in enumerate(encoder.layers):
            if type(layer) is not nn.TransformerEncoderLayer:
                self.fix(x, OPERATION, f"{p}layers.{i} is a {type(layer).__name__}, not an nn.TransformerEncoderLayer")
                continue
            x = self.encoder_layer(f"{p}layers.{i}", x)
        if encoder.norm is not None:
            if isinstance(encoder.norm, _NORMS):
                x = self.norm(p + "norm", x)
            else:
                self.fix(x, OPERATION, f"{p}norm is a {type(encoder.norm).__name__}, which growdense cannot follow")
        return x

    def _affine(self, name: str) -> bool:
        norm = self.modules.get(name)
        return isinstance(norm, _NORMS) and norm.elementwise_affine and len(tuple(norm.normalized_shape)) == 1

    def groups(self) -> dict[int, _Group]:
        out: dict[int, _Group] = {}
        for (module, local), var in self.local.items():
            out.setdefault(self.find(var), _Group()).members.append((module, local))
        for var, reasons in self.reasons.items():
            root = self.find(var)
            if root in out:
                out[root].reasons.extend(reasons)
        for var, writers in self.writers.items():
            root = self.find(var)
            if root in out:
                out[root].writers.extend(writers)
        return out


# ---- tracing -------------------------------------------------------------------------
from ._conversion import (  # noqa: E402
    _BINARY_FUNCTIONS, _BINARY_METHODS, _CONCATENATIONS, _ELEMENTWISE_FUNCTIONS,
    _ELEMENTWISE_METHODS, _ELEMENTWISE_MODULES, _RESHAPES, NotGrowableError, _capacities, _fusions, _op_name,
)

_MORE_BINARY = {torch.where, torch.maximum, torch.minimum, "masked_fill", "masked_fill_", "type_as", "expand_as"}
_METADATA = {"dim", "ndimension", "is_contiguous", "get_device", "type", "is_floating_point"}
_METADATA_ATTRS = {"dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "prod", "logsumexp", torch.sum, torch.mean, torch.amax, torch.amin,
               torch.prod, torch.logsumexp}
_SOFTMAX = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax"}
_DIM_MOVES = {"transpose", "swapaxes", "swapdims", torch.transpose, torch.swapaxes, torch.swapdims}


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer with every module the analysis knows (subclasses too) as a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _KNOWN) or super().is_leaf_module(m, module_qualified_name)


def _keeps_width(dim: Any) -> bool:
    """A dimension argument that cannot be the features (see the module docstring)."""
    return isinstance(dim, int) and not isinstance(dim, bool) and (dim == 0 or dim < -1)


def _arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _run(analysis: _Analysis, graph: torch.fx.Graph) -> None:
    val: dict[torch.fx.Node, Optional[int]] = {}
    tuples: dict[torch.fx.Node, tuple[int, int]] = {}
    modules = analysis.modules

    def tensor_vars(node: torch.fx.Node) -> list[int]:
        found: list[int] = []

        def visit(arg: torch.fx.Node) -> None:
            if arg in tuples:
                found.extend(tuples[arg])
            elif val.get(arg) is not None:
                found.append(val[arg])  # type: ignore[arg-type]

        torch.fx.node.map_arg((node.args, node.kwargs), visit)
        return found

    def var_of(arg: Any) -> Optional[int]:
        return val.get(arg) if isinstance(arg, torch.fx.Node) else None

    def unknown(node: torch.fx.Node, what: str) -> int:
        result = analysis.new((OPERATION, f"it is the output of {what}"))
        for v in tensor_vars(node):
            analysis.fix(v, OPERATION, f"it flows into {what}")
            analysis.derived.append((v, result))
        return result

    for analysis.order, node in enumerate(graph.nodes):
        op, target = node.op, node.target
        where = f"at {node.name!r}"
        if op == "placeholder":
            val[node] = v = analysis.new((BOUNDARY, f"it is an input of the model ({node.name!r})"))
            analysis.write(v, node.name)
        elif op == "output":
            for v in tensor_vars(node):
                analysis.fix(v, BOUNDARY, "it is an output of the model")
        elif op == "get_attr":
            val[node] = analysis.new(
                (OPERATION, f"the forward reads {target!r} directly (a Parameter or buffer used as a tensor, e.g. "
                            f"tied weights or a positional table; use an nn.Embedding or a module instead)"))
        elif op == "call_module":
            module = modules[target]
            x = var_of(_arg(node, 0, "input"))
            if isinstance(module, _ELEMENTWISE_MODULES) or (isinstance(module, nn.PReLU) and module.num_parameters == 1):
                val[node] = x
            elif type(module) is nn.Linear:
                val[node] = analysis.linear(target, x)
            elif type(module) is nn.Embedding:
                val[node] = analysis.of(target, "embedding_dim")
            elif type(module) in _NORMS:
                val[node] = analysis.norm(target, x)
            elif type(module) is nn.MultiheadAttention:
                q = var_of(_arg(node, 0, "query"))
                k = var_of(_arg(node, 1, "key"))
                v = var_of(_arg(node, 2, "value"))
                tuples[node] = analysis.attention(target, q, k, v)
            elif type(module) is nn.TransformerEncoderLayer:
                val[node] = analysis.encoder_layer(target, var_of(_arg(node, 0, "src")))
            elif type(module) is nn.TransformerEncoder:
                val[node] = analysis.encoder(target, var_of(_arg(node, 0, "src")))
            else:
                val[node] = unknown(node, f"module {target!r} ({type(module).__name__}), which growdense cannot follow")
        else:  # call_function, call_method
            args = tensor_vars(node)
            first = var_of(node.args[0]) if node.args else None
            name = _op_name(target)
            if node.args and node.args[0] in tuples and target is operator.getitem:
                index = node.args[1]
                val[node] = tuples[node.args[0]][index] if index in (0, 1) else unknown(node, f"{name} {where}")
            elif target is getattr:
                attr = node.args[1]
                if attr == "shape":
                    users = list(node.users)
                    if not all(u.target is operator.getitem and _keeps_width(u.args[1]) for u in users):
                        analysis.fix(first, OPERATION, f"its shape is read {where} (the code may depend on the width)")
                elif attr not in _METADATA_ATTRS:
                    analysis.fix(first, OPERATION, f"its attribute {attr!r} is read {where}")
                val[node] = None
            elif target in ("size",) or target in _METADATA:
                if target == "size":
                    dim = _arg(node, 1, "dim")
                    ok = _keeps_width(dim) if dim is not None else all(
                        u.target is operator.getitem and _keeps_width(u.args[1]) for u in node.users)
                    if not ok:
                        analysis.fix(first, OPERATION, f"its shape is read {where} (the code may depend on the width)")
                val[node] = None
            elif target is operator.getitem and first is not None:
                index = node.args[1]
                keeps = not isinstance(index, tuple) and not isinstance(index, type(Ellipsis))
                if isinstance(index, tuple) and Ellipsis in index:
                    after = index[index.index(Ellipsis) + 1:]
                    keeps = all(i == slice(None) for i in after)
                val[node] = first if keeps else unknown(node, f"an indexing {where} that may select features")
            elif first is None and not args:
                # no tensor of a width involved (shapes, masks, positions built from scratch)
                val[node] = analysis.new((OPERATION, f"it is created {where} ({name})"))
            elif target in _ELEMENTWISE_FUNCTIONS or target in _ELEMENTWISE_METHODS:
                val[node] = first if first is not None else args[0]
            elif target in _BINARY_FUNCTIONS or target in _BINARY_METHODS or target in _MORE_BINARY:
                val[node] = analysis.union(*args)
            elif target in _SOFTMAX or target in _REDUCTIONS:
                dim = _arg(node, 1, "dim")
                val[node] = first if _keeps_width(dim) else unknown(node, f"{name} over its features {where}")
            elif target in _DIM_MOVES:
                dims = (_arg(node, 1, "dim0"), _arg(node, 2, "dim1"))
                ok = all(_keeps_width(d) and d != 0 for d in dims) or dims in ((0, -2), (-2, 0))
                val[node] = first if ok else unknown(node, f"a reshape ({name} {where}) that growdense does not understand")
            elif target in ("permute", torch.permute):
                perm = node.args[1:] if target == "permute" else node.args[1]
                if len(perm) == 1 and isinstance(perm[0], (tuple, list)):
                    perm = tuple(perm[0])
                ok = all(isinstance(p, int) for p in perm) and perm and perm[-1] in (len(perm) - 1, -1)
                val[node] = first if ok else unknown(node, f"a reshape ({name} {where}) that growdense does not understand")
            elif target in ("unsqueeze", torch.unsqueeze, "squeeze", torch.squeeze):
                dim = _arg(node, 1, "dim")
                val[node] = first if _keeps_width(dim) else unknown(
                    node, f"a reshape ({name} {where}) that growdense does not understand")
            elif target in _CONCATENATIONS:
                dim = _arg(node, 1, "dim", 0)
                joinable = target in (torch.cat, torch.concat) and _keeps_width(dim) and dim != 0
                joinable = joinable or (target is torch.stack and dim == 0)
                val[node] = analysis.union(*args) if joinable else unknown(
                    node, f"a concatenation ({name} {where}) along the features")
            elif target in _RESHAPES:
                val[node] = unknown(node, f"a reshape ({name} {where}) that growdense does not understand")
            else:
                val[node] = unknown(node, f"{name} {where}, which growdense cannot follow")


def _name(group: _Group, modules: Mapping[str, nn.Module]) -> str:
    """The naming rule (see the module docstring)."""
    heads = [m for m, local in group.members if local == "heads"]
    if heads:
        return f"{heads[0]}.heads"
    writers: list[str] = []
    for _, label in sorted(group.writers):
        if label not in writers:
            writers.append(label)
    if len(writers) > 1:
        return f"stream@{writers[0]}"
    if writers:
        return writers[0]
    return f"width@{group.members[0][0]}"


def _reaches_a_reader(analysis: _Analysis, groups: Mapping[int, _Group]) -> set[int]:
    """The roots whose features reach (through operations that fix them) a group a module reads or rides."""
    edges: dict[int, set[int]] = {}
    for src, dst in analysis.derived:
        edges.setdefault(analysis.find(src), set()).add(analysis.find(dst))
    modules = analysis.modules
    readers = {root for root, g in groups.items()
               if any(_locals(modules[m])[local] - {protocol.PRODUCER} for m, local in g.members)}
    reaching: set[int] = set()
    for start in edges:
        seen, todo = {start}, [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        if (seen - {start}) & readers:
            reaching.add(start)
    return reaching


def _is_width(group: _Group, modules: Mapping[str, nn.Module], reaches: bool) -> bool:
    """A group is a width when a module writes it and another member reads or rides it, or its
    features reach one through operations the analysis cannot follow (they fix it)."""
    if not any(_writes(modules[m], local) for m, local in group.members):
        return False
    if len(group.members) >= 2 or reaches:
        return True
    module, local = group.members[0]
    return {protocol.PRODUCER, protocol.CONSUMER} <= _locals(modules[module])[local]  # an attention's heads


# ---- conversion ------------------------------------------------------------------------
def _convert_problem(name: str, module: nn.Module, owners: Mapping[int, list[str]], read: set) -> Optional[str]:
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return f"{name!r} has hooks registered, which would not carry over to its growable twin"
    if torch.nn.utils.parametrize.is_parametrized(module):
        return f"{name!r} is parametrized (e.g. weight norm), which its growable twin does not support"
    for pname, param in module.named_parameters(recurse=True):
        if isinstance(param, nn.parameter.UninitializedParameter):
            return f"{name!r} is a lazy module that has not been initialised yet; run one forward pass first"
        full = f"{name}.{pname}" if name else pname
        others = [n for n in owners.get(id(param), []) if n != full]
        if others:
            return (f"{full!r} is shared with {others} (tied weights), which growdense does not grow; untie them "
                    f"(e.g. lm_head.weight = nn.Parameter(embedding.weight.detach().clone())) to grow this width")
        if full in read:
            return f"the forward reads {full!r} directly (e.g. tied weights)"
    return None


def _build(module: nn.Module, caps: Mapping[str, Optional[int]], activation: Optional[str]) -> nn.Module:
    """The growable twin of ``module`` with the same weights and the given capacities."""
    if type(module) is nn.Linear:
        return GrowLinear.from_linear(module, capacity_in=caps.get("in"), capacity_out=caps.get("out"),
                                      activation=activation)
    weight = next(iter(module.parameters()))
    factory = {"device": weight.device, "dtype": weight.dtype}
    if type(module) is nn.Embedding:
        new = GrowEmbedding(module.num_embeddings, module.embedding_dim, module.padding_idx, module.max_norm,
                            module.norm_type, module.scale_grad_by_freq, module.sparse, _weight=module.weight.detach(),
                            capacity_embedding_dim=caps.get("embedding_dim"), **factory)
    elif type(module) is nn.LayerNorm:
        new = GrowLayerNorm(module.normalized_shape[0], module.eps, True, module.bias is not None,
                            capacity=caps.get("features"), **factory)
    elif _RMSNorm is not None and type(module) is _RMSNorm:
        new = GrowRMSNorm(module.normalized_shape[0], module.eps, True, capacity=caps.get("features"), **factory)
    else:
        assert type(module) is nn.MultiheadAttention
        packed = module._qkv_same_embed_dim
        new = GrowMultiheadAttention(
            module.embed_dim, module.num_heads, module.dropout, bias=module.in_proj_bias is not None,
            add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn,
            kdim=module.kdim, vdim=module.vdim, batch_first=module.batch_first,
            capacity_heads=caps.get("heads"), capacity_embed_dim=caps.get("embed_dim"),
            capacity_kdim=None if packed else caps.get("kdim"), capacity_vdim=None if packed else caps.get("vdim"),
            **factory,
        )
    new.load_state_dict(module.state_dict())
    return new


def _copy_flags(old: nn.Module, new: nn.Module) -> None:
    new.train(old.training)
    params = dict(new.named_parameters())
    for pname, param in old.named_parameters():
        if pname in params:
            params[pname].requires_grad_(param.requires_grad)


def growable_streams(
    model: nn.Module, capacity: Any, *, exclude: Iterable[str] = (), strict: bool = False
) -> GrowableWiring:
    """``growable(model, streams=True)``: see :func:`growdense.growable`."""
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    modules = dict(model.named_modules())
    existing = {name: type(m).__name__ for name, m in modules.items() if protocol.is_growable(m)}
    if existing:
        raise NotGrowableError(
            {name: f"it is already a {kind}" for name, kind in existing.items()},
            "growable() converts a model of torch modules once; wire growable modules by hand with Wiring.add_width().",
        )
    if isinstance(model, _KNOWN) and not isinstance(model, _PATTERNS):
        raise NotGrowableError(
            {"(model)": f"it is a single {type(model).__name__}, which growable() cannot replace in place"},
            f"use growdense.Grow{type(model).__name__} directly, or wrap the module in another module.",
        )

    def exclude_reason(module_name: str) -> Optional[str]:
        for e in exclude:
            if module_name == e or module_name.startswith(e + "."):
                return f"it is excluded (exclude={e!r})"
        return None

    analysis = _Analysis(modules)
    graph: Optional[torch.fx.Graph] = None
    if isinstance(model, _PATTERNS):
        x = analysis.new((BOUNDARY, "it is an input of the model ('src')"))
        analysis.write(x, "src")
        analysis.order = 1
        out = analysis.encoder_layer("", x) if isinstance(model, nn.TransformerEncoderLayer) else analysis.encoder("", x)
        analysis.fix(out, BOUNDARY, "it is an output of the model")
    else:
        try:
            graph = _Tracer().trace(model)
        except Exception as error:  # any failure of a user's forward under tracing
            raise NotGrowableError(
                {type(model).__name__: f"its forward cannot be traced by torch.fx ({type(error).__name__}: {error})"},
                "growable() follows the model's forward symbolically; make it traceable (no Python control flow on "
                "tensor values or shapes), or build the growable modules and their Wiring by hand.",
            ) from error
        _run(analysis, graph)
    for (module_name, _), var in list(analysis.local.items()):
        if reason := exclude_reason(module_name):
            analysis.fix(var, EXCLUDED, reason)

    # 1. Widths, their names, and which stay fixed.
    by_root = analysis.groups()
    reaching = _reaches_a_reader(analysis, by_root)
    groups = [g for root, g in by_root.items() if _is_width(g, modules, root in reaching)]
    for g in groups:
        g.members.sort(key=lambda m: (list(modules).index(m[0]), m[1]))
    taken: dict[str, int] = {}
    for g in sorted(groups, key=lambda g: min(o for o, _ in g.writers) if g.writers else 0):
        base = _name(g, modules)
        taken[base] = taken.get(base, 0) + 1
        g.name = base if taken[base] == 1 else f"{base}#{taken[base]}"
    groups.sort(key=lambda g: min((o for o, _ in g.writers), default=0))
    names = {g.name for g in groups}
    for e in exclude:
        if not isinstance(e, str) or not (e in names or any(n == e or n.startswith(e + ".") for n in modules if n)):
            raise ValueError(f"exclude names {e!r}, which is neither a width nor a module of the model; "
                             f"its widths are {sorted(names)}")
    for g in groups:
        if g.name in exclude:
            g.reasons.append((EXCLUDED, f"it is excluded (exclude={g.name!r})"))

    # 2. The modules to convert must be convertible; a module that is not fixes its widths.
    owners: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname)
    read = {n.target for n in graph.nodes if n.op == "get_attr"} if graph is not None else set()
    group_of = {member: g for g in groups for member in g.members}
    problems: dict[str, Optional[str]] = {}
    while True:
        growing = [g for g in groups if g.fixed_reason() is None]
        convert = sorted({m for g in growing for m, _ in g.members}, key=list(modules).index)
        changed = False
        for name in convert:
            if name not in problems:
                problems[name] = _convert_problem(name, modules[name], owners, read)
            if problems[name] is not None:
                for local in _locals(modules[name]):
                    g = group_of.get((name, local))
                    if g is not None and g.fixed_reason() is None:
                        g.reasons.append((OPERATION, problems[name]))
                        changed = True
        if not changed:
            break

    fixed = {g.name: g.fixed_reason() for g in groups if g.fixed_reason() is not None}
    if strict:
        blocking = {g.name: g.fixed_reason() for g in groups if g.kinds() - {EXCLUDED}}
        if blocking:
            raise NotGrowableError(blocking, f"pass strict=False (or exclude={sorted(blocking)}) to keep these "
                                             f"widths fixed and grow the others.")
    growing = [g for g in groups if g.fixed_reason() is None]
    widths = {}
    for g in growing:
        module, local = g.members[0]
        widths[g.name] = _width_of(modules[module], local)
    if isinstance(capacity, Mapping):
        for key in capacity:
            if key in fixed:
                raise ValueError(f"capacity names {key!r}, a width that stays fixed: {fixed[key]}")
    caps_by_name = _capacities(capacity, widths, ())

    # 3. Build everything before the model is touched.
    local_caps: dict[str, dict[str, Optional[int]]] = {}
    for g in growing:
        for module, local in g.members:
            local_caps.setdefault(module, {})[local] = caps_by_name[g.name]
    linears = {n: m for n, m in modules.items() if type(m) is nn.Linear}
    fused = _fusions(graph, [n for n in convert if n in linears], linears, modules) if graph is not None else {}
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    new: dict[str, nn.Module] = {}
    with torch.random.fork_rng(devices=cuda):  # building draws initial values: the user's RNG stays as it was
        for name in convert:
            new[name] = _build(modules[name], local_caps.get(name, {}), fused.get(name, (None, []))[0])
            _copy_flags(modules[name], new[name])
    wiring = GrowableWiring()
    for g in growing:
        members = [(new[m], local) for m, local in g.members]
        try:
            wiring.add_width(g.name, members)
        except (TypeError, ValueError) as error:
            if strict:
                raise NotGrowableError({g.name: f"the Wiring cannot register it ({error})"}) from error
            g.reasons.append((OPERATION, f"the Wiring cannot register it yet ({error})"))
    wiring.fixed = {g.name: g.fixed_reason() for g in groups if g.fixed_reason() is not None}
    replacements: dict[int, nn.Module] = {id(modules[name]): layer for name, layer in new.items()}
    for _, (_, activations) in fused.items():
        for act in activations:
            replacements[id(modules[act])] = nn.Identity()

    # 4. Swap the modules in every parent that holds them (nothing above can fail after this).
    swap_modules(model, replacements)
    for m in model.modules():  # its nested-tensor fast path reads whole tensors of the first layer
        if isinstance(m, nn.TransformerEncoder) and any(id(mod) in replacements for mod in m.modules()):
            m.use_nested_tensor = False
    unexpected = {g.name: g.fixed_reason() for g in groups if OPERATION in g.kinds()}
    if unexpected:
        lines = "\n  ".join(f"{n}: {r}" for n, r in unexpected.items())
        warnings.warn(f"growable(): these widths stay fixed:\n  {lines}\n(see wiring.fixed; strict=True raises "
                      f"instead)", UserWarning, stacklevel=3)
    return wiring


def swap_modules(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Put ``replacements[id(child)]`` in the place of ``child`` in every parent of ``model`` that holds it."""
    holders = [
        (parent, child_name, replacements[id(child)])
        for parent in model.modules()
        for child_name, child in parent._modules.items()
        if child is not None and id(child) in replacements
    ]
    for parent, child_name, replacement in holders:
        parent._modules[child_name] = replacement


def _width_of(module: nn.Module, local: str) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features if local == "in" else module.out_features
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if isinstance(module, _NORMS):
        return int(tuple(module.normalized_shape)[0])
    assert isinstance(module, nn.MultiheadAttention)
    return {"heads": module.num_heads, "kdim": module.kdim, "vdim": module.vdim}.get(local, module.embed_dim)
