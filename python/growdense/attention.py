"""``GrowMultiheadAttention``: multi-head attention whose head count and model width grow in place.

The head size is fixed; the number of heads grows by whole heads (the width ``heads``),
and the model width ``embed_dim`` (the residual stream it reads and writes) grows on its
own. Every tensor is allocated at capacity, laid out as :class:`torch.nn.MultiheadAttention`
lays it out with ``embed_dim`` at its capacity and ``num_heads`` at its capacity; only the
active heads and the active model width are computed (through
:func:`torch.nn.functional.scaled_dot_product_attention` when the weights are not needed).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_int
from ._grow_module import Layout, _GrowModule, _Holder, check_growth
from .protocol import draw_normal_

__all__ = ["GrowMultiheadAttention"]

_ATTENTION_INITS = ("he", "zero_out", "zero")


def _he_std(fan_in: int) -> float:
    return math.sqrt(2.0 / fan_in)


class _OutProjection(_Holder):
    """``out_proj``: holds ``weight`` (capacity_embed_dim x capacity_heads * head_dim) and ``bias``."""

    def __init__(self, out_features: int, in_features: int, bias: bool, factory: dict) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return f"capacity_in={self.weight.shape[1]}, capacity_out={self.weight.shape[0]}, bias={self.bias is not None}"

    def forward(self, *args, **kwargs):
        raise RuntimeError("out_proj of a GrowMultiheadAttention holds its tensors only; call the attention module")


def _float_mask(mask: Optional[Tensor], name: str, dtype: torch.dtype) -> Optional[Tensor]:
    """A boolean mask (True: masked) as an additive float mask; a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    return mask


class GrowMultiheadAttention(_GrowModule):
    r"""A :class:`torch.nn.MultiheadAttention` whose heads and model width grow in place.

    The same constructor, forward, parameter names and ``state_dict`` as
    ``nn.MultiheadAttention`` (whose ``state_dict`` loads as it is, at the matching
    widths), plus capacities. ``head_dim = embed_dim // num_heads`` is fixed at
    construction; the number of heads and ``embed_dim`` then grow independently, so the
    attention's inner width ``num_heads * head_dim`` may differ from ``embed_dim`` after
    growth (its projections are then rectangular).

    Args:
        embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
            batch_first, device, dtype: as for :class:`torch.nn.MultiheadAttention`.
        capacity_heads: the most heads (default ``num_heads``).
        capacity_embed_dim: the largest model width (default ``embed_dim``).
        capacity_kdim, capacity_vdim: the largest key and value widths when ``kdim`` /
            ``vdim`` differ from ``embed_dim`` (default ``kdim`` / ``vdim``).

    Widths: ``"heads"``, ``"embed_dim"``, and ``"kdim"``, ``"vdim"`` when the key and
    value have their own widths. ``_qkv_same_embed_dim`` is always False, which keeps
    ``nn.TransformerEncoderLayer``'s fused inference path (it reads whole tensors) away.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        *,
        capacity_heads: Optional[int] = None,
        capacity_embed_dim: Optional[int] = None,
        capacity_kdim: Optional[int] = None,
        capacity_vdim: Optional[int] = None,
    ) -> None:
        super().__init__()
        embed_dim = check_int("embed_dim", embed_dim)
        num_heads = check_int("num_heads", num_heads)
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} and num_heads={num_heads}"
            )
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        kdim = embed_dim if kdim is None else check_int("kdim", kdim)
        vdim = embed_dim if vdim is None else check_int("vdim", vdim)
        self._packed = kdim == embed_dim and vdim == embed_dim
        if self._packed and (capacity_kdim is not None or capacity_vdim is not None):
            raise ValueError(
                "capacity_kdim/capacity_vdim apply when kdim or vdim differs from embed_dim; with key and value "
                "of the model width they ride embed_dim (set capacity_embed_dim)"
            )
        self._width_names = ("heads", "embed_dim") if self._packed else ("heads", "embed_dim", "kdim", "vdim")
        widths = {"heads": num_heads, "embed_dim": embed_dim, "kdim": kdim, "vdim": vdim}
        caps = {"heads": capacity_heads, "embed_dim": capacity_embed_dim, "kdim": capacity_kdim, "vdim": capacity_vdim}
        self._init_widths(widths, caps)
        self.head_dim = embed_dim // num_heads
        self._qkv_same_embed_dim = False  # see the class docstring
        self.dropout = dropout
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        factory = {"device": device, "dtype": dtype}
        inner, E = self._capacities["heads"] * self.head_dim, self._capacities["embed_dim"]
        if self._packed:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * inner, E), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.register_parameter("in_proj_weight", None)
            self.q_proj_weight = nn.Parameter(torch.empty((inner, E), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((inner, self._capacities["kdim"]), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((inner, self._capacities["vdim"]), **factory))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * inner, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = _OutProjection(E, inner, bias, factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, inner), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, inner), **factory))
        else:
            self.bias_k = self.bias_v = None
        self.reset_parameters()

    # ---- layout and widths -----------------------------------------------------------
    def _layout(self) -> Layout:
        c = self._capacities
        heads = ((c["heads"], "heads"), (self.head_dim, None))
        E = ((c["embed_dim"], "embed_dim"),)
        layout: Layout = {
            "in_proj_weight": (((3, None),) + heads, E),
            "q_proj_weight": (heads, E),
            "in_proj_bias": (((3, None),) + heads,),
            "out_proj.weight": (E, heads),
            "out_proj.bias": (E,),
            "bias_k": (((1, None),), ((1, None),), heads),
            "bias_v": (((1, None),), ((1, None),), heads),
        }
        if not self._packed:
            layout["k_proj_weight"] = (heads, ((c["kdim"], "kdim"),))
            layout["v_proj_weight"] = (heads, ((c["vdim"], "vdim"),))
        return layout

    _inits = _ATTENTION_INITS

    def _growth_spec(self):
        """The declaration for :mod:`growdense.protocol`.

        Module-local widths, each with two roles: ``"heads"``: the q/k/v rows, their
        biases and bias_k/bias_v compute them (producer; a unit is ``head_dim``
        elements, q/k/v stacked as 3 blocks) and out_proj's columns read them
        (consumer); ``"embed_dim"`` (the residual stream): the columns of the projections
        that read the model width (consumer) and out_proj's rows and bias, which write
        it (producer). ``"kdim"`` and ``"vdim"`` (consumers) when key and value have their
        own widths.
        """
        from . import protocol as p
        from .ops import block_normal_ as normal

        d = self.head_dim
        heads = p.Axis(0, "heads", p.PRODUCER, unit=d)
        e_in = p.Axis(1, "embed_dim", p.CONSUMER)
        e_out = p.Axis(0, "embed_dim", p.PRODUCER)
        tensors = [
            p.TensorSpec("in_proj_weight", (p.Axis(0, "heads", p.PRODUCER, unit=d, blocks=3), e_in), normal=normal),
            p.TensorSpec("q_proj_weight", (heads, e_in), normal=normal),
            p.TensorSpec("k_proj_weight", (heads, p.Axis(1, "kdim", p.CONSUMER)), normal=normal),
            p.TensorSpec("v_proj_weight", (heads, p.Axis(1, "vdim", p.CONSUMER)), normal=normal),
            p.TensorSpec("in_proj_bias", (p.Axis(0, "heads", p.PRODUCER, unit=d, blocks=3),), fill=0.0),
            p.TensorSpec("bias_k", (p.Axis(2, "heads", p.PRODUCER, unit=d),), fill=0.0),
            p.TensorSpec("bias_v", (p.Axis(2, "heads", p.PRODUCER, unit=d),), fill=0.0),
            p.TensorSpec("out_proj.weight", (e_out, p.Axis(1, "heads", p.CONSUMER, unit=d)), normal=normal),
            p.TensorSpec("out_proj.bias", (e_out,), fill=0.0),
        ]
        widths = ("heads", "embed_dim") + (() if self._packed else ("kdim", "vdim"))
        return p.GrowthSpec(widths, tuple(t for t in tensors if self._tensor(t.name) is not None))

    @property
    def num_heads(self) -> int:
        """The active number of heads."""
        return self.width("heads")

    @property
    def embed_dim(self) -> int:
        """The active model width."""
        return self.width("embed_dim")

    @property
    def kdim(self) -> int:
        return self.width("embed_dim" if self._packed else "kdim")

    @property
    def vdim(self) -> int:
        return self.width("embed_dim" if self._packed else "vdim")

    @property
    def capacity_heads(self) -> int:
        return self._capacities["heads"]

    @property
    def capacity_embed_dim(self) -> int:
        return self._capacities["embed_dim"]

    # ---- initialisation ----------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the active part as :class:`torch.nn.MultiheadAttention` does (same draws, same order); zero the rest."""
        for path in self.tensor_layout():
            self._tensor(path).zero_()
        # The twin builds out_proj (an nn.Linear, which initialises itself) before the rest.
        self._init_like_twin("out_proj.weight", lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5)))
        if self.out_proj.bias is not None:
            bias = self.out_proj.bias
            torch.empty(self.embed_dim, device=bias.device, dtype=bias.dtype).uniform_()  # the twin's draw, then zeroed
        for path in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            self._init_like_twin(path, nn.init.xavier_uniform_)
        for path in ("bias_k", "bias_v"):
            self._init_like_twin(path, nn.init.xavier_normal_)

    def _init_slice(self, width: str, start: int, stop: int, init: str, generator) -> None:
        d = self.head_dim
        if width == "heads":
            for path, fan_in in (
                ("in_proj_weight", self.embed_dim),
                ("q_proj_weight", self.embed_dim),
                ("k_proj_weight", self.kdim),
                ("v_proj_weight", self.vdim),
            ):
                if self._tensor(path) is not None:
                    draw_normal_(self._new_slice(path, width, start, stop), _he_std(fan_in), generator)
            if init == "he":
                draw_normal_(self._new_slice("out_proj.weight", width, start, stop), _he_std(stop * d), generator)
            return
        # embed_dim, kdim, vdim: columns of the projections that read them ...
        if init == "he":
            readers = {"embed_dim": ("in_proj_weight", "q_proj_weight"), "kdim": ("k_proj_weight",),
                       "vdim": ("v_proj_weight",)}[width]
            for path in readers:
                if self._tensor(path) is not None:
                    draw_normal_(self._new_slice(path, width, start, stop), _he_std(stop), generator)
        # ... and for embed_dim, rows of out_proj that write it (bias zero).
        if width == "embed_dim" and init != "zero":
            draw_normal_(self._new_slice("out_proj.weight", width, start, stop), _he_std(self.num_heads * d), generator)

    def grow_heads(self, n: int, init: str = "he", *, generator: Optional[torch.Generator] = None) -> None:
        """Add ``n`` heads of ``head_dim`` each.

        Their query, key and value rows are drawn He-normal (fan_in: the input width), their
        biases (and bias_k/bias_v slices) zero. ``init`` sets their columns of ``out_proj``: ``"he"`` draws them
        He-normal (fan_in: the new inner width); ``"zero_out"`` (or ``"zero"``) leaves them
        zero, so the output is exactly unchanged.
        Changes this module only, not an optimizer's state (see :meth:`resize`).
        """
        n = check_growth(n)
        self.resize("heads", self.num_heads + n, init, generator=generator)

    def grow_embed_dim(self, n: int, init: str = "he", *, generator: Optional[torch.Generator] = None) -> None:
        """Add ``n`` model-width features (the residual stream the attention reads and writes).

        ``init``: ``"he"`` draws the new input columns of the projections He-normal (fan_in:
        the new width) and the new output rows of ``out_proj`` He-normal (fan_in: the inner
        width); ``"zero_out"`` leaves the new input columns zero (the old outputs stay
        exactly as they were, whatever the new features hold) and draws the new rows;
        ``"zero"`` leaves both zero. New biases are zero.
        Changes this module only, not an optimizer's state (see :meth:`resize`).
        """
        n = check_growth(n)
        self.resize("embed_dim", self.embed_dim + n, init, generator=generator)

    def shrink_heads(self, to: int) -> None:
        """Keep the first ``to`` heads; zero the others' slices (weights, biases, gradients).

        Changes this module only, not an optimizer's state (see :meth:`resize`).
        """
        self._shrink("heads", to)

    def shrink_embed_dim(self, to: int) -> None:
        """Keep the first ``to`` model-width features; zero the others' slices (weights, biases, gradients).

        Changes this module only, not an optimizer's state (see :meth:`resize`).
        """
        self._shrink("embed_dim", to)

    def _shrink(self, width: str, to: int) -> None:
        to = check_int("to", to)
        if to > self.width(width):
            raise ValueError(f"cannot shrink {width} from {self.width(width)} to {to}; use grow_{width} to widen")
        self.resize(width, to)

    # ---- forward -------------------------------------------------------------------------
    def _projections(self) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        inner = self._active_heads * self.head_dim
        cap_inner = self._capacities["heads"] * self.head_dim
        E = self._active_embed_dim
        if self._packed:
            w = self.in_proj_weight.view(3, cap_inner, -1).narrow(1, 0, inner).narrow(2, 0, E)
            wq, wk, wv = w.unbind(0)
        else:
            wq = self.q_proj_weight.narrow(0, 0, inner).narrow(1, 0, E)
            wk = self.k_proj_weight.narrow(0, 0, inner).narrow(1, 0, self._active_kdim)
            wv = self.v_proj_weight.narrow(0, 0, inner).narrow(1, 0, self._active_vdim)
        if self.in_proj_bias is None:
            return wq, wk, wv, None, None, None
        bq, bk, bv = self.in_proj_bias.view(3, cap_inner).narrow(1, 0, inner).unbind(0)
        return wq, wk, wv, bq, bk, bv

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """As :meth:`torch.nn.MultiheadAttention.forward`, over the active heads and widths."""
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError("GrowMultiheadAttention does not take nested tensors; pad them and pass key_padding_mask")
        self_attention = query is key and key is value
        is_batched = query.dim() == 3
        if not torch.compiler.is_compiling():
            self._check_inputs(query, key, value, is_batched, key_padding_mask)
        key_padding_mask = _float_mask(key_padding_mask, "key_padding_mask", query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # the hint goes to scaled_dot_product_attention as is_causal
        else:
            attn_mask = _float_mask(attn_mask, "attn_mask", query.dtype)
            is_causal = False
        # Work batch first: (B, L, E).
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, L = query.shape[0], query.shape[1]
        H, d = self._active_heads, self.head_dim
        inner = H * d
        if self_attention and self._packed and H == self._capacities["heads"]:
            # Every head active: q, k and v in one GEMM over the packed rows, as nn.MultiheadAttention does.
            w = self.in_proj_weight
            if self._active_embed_dim < w.shape[1]:
                w = w.narrow(1, 0, self._active_embed_dim)
            q, k, v = F.linear(query, w, self.in_proj_bias).split(inner, dim=-1)
        else:
            wq, wk, wv, bq, bk, bv = self._projections()
            q = F.linear(query, wq, bq)
            k = F.linear(key, wk, bk)
            v = F.linear(value, wv, bv)
        S = k.shape[1]
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (L, S):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(L, S)}.")
                attn_mask = attn_mask.view(1, 1, L, S)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (B * H, L, S):
                    raise RuntimeError(
                        f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be {(B * H, L, S)} "
                        f"(batch * active num_heads, L, S)."
                    )
                attn_mask = attn_mask.view(B, H, L, S)
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if self.bias_k is not None:
            cap_inner = self._capacities["heads"] * d
            k = torch.cat([k, self.bias_k.view(1, 1, cap_inner).narrow(2, 0, inner).expand(B, 1, inner)], dim=1)
            v = torch.cat([v, self.bias_v.view(1, 1, cap_inner).narrow(2, 0, inner).expand(B, 1, inner)], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.view(B, L, H, d).transpose(1, 2)
        k = k.view(B, k.shape[1], H, d).transpose(1, 2)
        v = v.view(B, v.shape[1], H, d).transpose(1, 2)
        if self.add_zero_attn:
            zeros = torch.zeros((B, H, 1, d), dtype=k.dtype, device=k.device)
            k = torch.cat([k, zeros], dim=2)
            v = torch.cat([v, zeros.to(v.dtype)], dim=2)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        S = k.shape[2]
        if key_padding_mask is not None:
            if key_padding_mask.shape != (B, S):
                raise RuntimeError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected {(B, S)}")
            kpm = key_padding_mask.view(B, 1, 1, S)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            scores = torch.matmul(q * math.sqrt(1.0 / d), k.transpose(-2, -1))
            if attn_mask is not None:
                scores = scores + attn_mask
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.matmul(weights, v)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
            weights = None
        out = out.transpose(1, 2).reshape(B, L, inner)
        E = self._active_embed_dim
        w_out = self.out_proj.weight.narrow(0, 0, E).narrow(1, 0, inner)
        b_out = None if self.out_proj.bias is None else self.out_proj.bias.narrow(0, 0, E)
        out = F.linear(out, w_out, b_out)
        if not is_batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor, is_batched: bool, kpm: Optional[Tensor]) -> None:
        want = 3 if is_batched else 2
        if query.dim() not in (2, 3) or key.dim() != want or value.dim() != want:
            raise ValueError(
                f"query, key and value must be all 3-D (batched) or all 2-D (unbatched), got "
                f"{query.dim()}-D, {key.dim()}-D and {value.dim()}-D"
            )
        for name, x, width in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if x.shape[-1] != width:
                raise ValueError(
                    f"GrowMultiheadAttention expected {name} of width {width} (its active "
                    f"{'embed_dim' if name == 'query' or self._packed else name[0] + 'dim'}), got shape "
                    f"{tuple(x.shape)}; grow or shrink the attention with its widths"
                )
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} differ in their leading dimensions")
        if kpm is not None and kpm.dim() != (2 if is_batched else 1):
            raise ValueError(
                f"key_padding_mask must be {'(N, S)' if is_batched else '(S,)'} for "
                f"{'batched' if is_batched else 'unbatched'} input, got shape {tuple(kpm.shape)}"
            )

    def extra_repr(self) -> str:
        s = (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"capacity_embed_dim={self.capacity_embed_dim}, capacity_heads={self.capacity_heads}"
        )
        if not self._packed:
            s += f", kdim={self.kdim}, vdim={self.vdim}, capacity_kdim={self._capacities['kdim']}, " \
                 f"capacity_vdim={self._capacities['vdim']}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bias_k is not None:
            s += ", add_bias_kv=True"
        if self.add_zero_attn:
            s += ", add_zero_attn=True"
        return s + f", batch_first={self.batch_first}"
