"""A small GPT-style language model whose every width grows in place while it trains.

:class:`GPT` is a pre-norm decoder-only transformer built from growdense's growable
modules: token and position :class:`~growdense.GrowEmbedding`, per block a
:class:`~growdense.GrowLayerNorm`, a causal :class:`~growdense.GrowMultiheadAttention`, a
second norm and an FFN of two :class:`~growdense.GrowLinear` (GELU fused into the first),
then a final norm and the output projection. Every tensor is allocated at its capacity;
:meth:`GPT.grow` widens

- the residual stream ``d_model`` (every embedding, norm, projection reading or writing it),
- the heads of every attention (whole heads of fixed ``head_dim``),
- the inner width ``d_ff`` of every FFN,

with the same Parameters, so the optimizer built on them keeps stepping. With
``init="zero_out"`` the function is exactly unchanged at the growth: new FFN neurons and
heads enter with zero outgoing weights, and the new residual features are ramped into
every norm (:mod:`growdense.norms`: they enter with a factor going from 0 to 1 over
``ramp_steps`` calls of :meth:`GPT.ramp_step`, as MSG's masks do).

:class:`PlainGPT` is the same network written in plain PyTorch (``nn.Embedding``,
``nn.LayerNorm``, ``nn.Linear``, ``F.scaled_dot_product_attention``, as nanoGPT writes it)
at one fixed size: the reference for speed, and the model that :func:`rebuild_grown` grows
the way growth is done without growdense (MSG, bert2BERT, LiGO): a new model of the new
size, the old weights copied into it, the optimizer rebuilt with its moments zero-padded.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import GrowMultiheadAttention
from ..embedding import GrowEmbedding
from ..layers import GrowLinear
from ..norms import GrowLayerNorm
from ..protocol import draw_normal_

__all__ = ["GPT", "GPTConfig", "PlainGPT", "plain_from_grow", "rebuild_grown"]


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of a :class:`GPT` (active widths) and its capacities (``None``: the active width)."""

    vocab_size: int
    block_size: int
    n_layer: int = 2
    d_model: int = 64
    n_head: int = 2
    d_ff: int = 256
    capacity_d_model: Optional[int] = None
    capacity_heads: Optional[int] = None
    capacity_d_ff: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "d_model", "n_head", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be an int >= 1, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head} (head_dim is fixed)")
        for width, cap in (("d_model", self.capacity_d_model), ("n_head", self.capacity_heads),
                           ("d_ff", self.capacity_d_ff)):
            if cap is not None and cap < getattr(self, width):
                raise ValueError(f"the capacity of {width} ({cap}) is below {width}={getattr(self, width)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def capacities(self) -> dict[str, int]:
        """``{"d_model", "heads", "d_ff"}`` capacities."""
        return {
            "d_model": self.capacity_d_model or self.d_model,
            "heads": self.capacity_heads or self.n_head,
            "d_ff": self.capacity_d_ff or self.d_ff,
        }


def _causal_mask(n: int, device=None) -> Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + fc2(gelu(fc1(ln2(x))))``."""

    def __init__(self, cfg: GPTConfig, factory: dict) -> None:
        super().__init__()
        caps = cfg.capacities()
        d, D = cfg.d_model, caps["d_model"]
        self.ln1 = GrowLayerNorm(d, capacity=D, **factory)
        self.attn = GrowMultiheadAttention(
            d, cfg.n_head, batch_first=True, capacity_heads=caps["heads"], capacity_embed_dim=D, **factory
        )
        self.ln2 = GrowLayerNorm(d, capacity=D, **factory)
        self.fc1 = GrowLinear(d, cfg.d_ff, capacity_in=D, capacity_out=caps["d_ff"], activation="gelu", **factory)
        self.fc2 = GrowLinear(cfg.d_ff, d, capacity_in=caps["d_ff"], capacity_out=D, **factory)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask, is_causal=True)[0]
        return x + self.fc2(self.fc1(self.ln2(x)))


class GPT(nn.Module):
    r"""A character- or token-level GPT whose residual width, heads and FFN widths grow in place.

    Args:
        vocab_size, block_size: vocabulary and longest context.
        n_layer, d_model, n_head, d_ff: the starting sizes (``head_dim = d_model // n_head``
            stays fixed: heads grow by whole heads).
        capacity_d_model, capacity_heads, capacity_d_ff: the largest sizes (default: the
            starting ones).
        device, dtype: where and in which precision the tensors live.

    ``forward(idx)`` takes token indices ``(B, T)`` with ``T <= block_size`` and returns the
    logits ``(B, T, vocab_size)``.
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int = 2,
        d_model: int = 64,
        n_head: int = 2,
        d_ff: int = 256,
        *,
        capacity_d_model: Optional[int] = None,
        capacity_heads: Optional[int] = None,
        capacity_d_ff: Optional[int] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        cfg = GPTConfig(vocab_size, block_size, n_layer, d_model, n_head, d_ff,
                        capacity_d_model, capacity_heads, capacity_d_ff)
        self.config = cfg
        factory = {"device": device, "dtype": dtype}
        D = cfg.capacities()["d_model"]
        self.tok_emb = GrowEmbedding(vocab_size, d_model, capacity_embedding_dim=D, **factory)
        self.pos_emb = GrowEmbedding(block_size, d_model, capacity_embedding_dim=D, **factory)
        self.blocks = nn.ModuleList(Block(cfg, factory) for _ in range(n_layer))
        self.ln_f = GrowLayerNorm(d_model, capacity=D, **factory)
        self.head = GrowLinear(d_model, vocab_size, capacity_in=D, **factory)
        self.register_buffer("_mask", _causal_mask(block_size, device), persistent=False)
        self.register_buffer("_positions", torch.arange(block_size, device=device), persistent=False)

    # ---- sizes -------------------------------------------------------------------------
    @property
    def d_model(self) -> int:
        """The active residual width."""
        return self.tok_emb.embedding_dim

    @property
    def head_dim(self) -> int:
        return self.blocks[0].attn.head_dim

    def widths(self) -> dict[str, int]:
        """The active sizes: ``{"d_model", "heads", "d_ff"}`` (every block has the same)."""
        b = self.blocks[0]
        return {"d_model": self.d_model, "heads": b.attn.num_heads, "d_ff": b.fc1.out_features}

    def capacities(self) -> dict[str, int]:
        return self.config.capacities()

    def norms(self) -> list[GrowLayerNorm]:
        return [m for m in self.modules() if isinstance(m, GrowLayerNorm)]

    # ---- forward -------------------------------------------------------------------------
    def forward(self, idx: Tensor) -> Tensor:
        if idx.dim() != 2:
            raise ValueError(f"GPT expects token indices of shape (batch, time), got {tuple(idx.shape)}")
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"a sequence of {T} tokens is longer than block_size={self.config.block_size}")
        x = self.tok_emb(idx) + self.pos_emb(self._positions[:T])
        mask = self._mask[:T, :T]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))

    # ---- growth --------------------------------------------------------------------------
    def grow(
        self,
        d_model: int = 0,
        heads: int = 0,
        d_ff: int = 0,
        *,
        init: str = "zero_out",
        ramp_steps: int = 100,
        generator: Optional[torch.Generator] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        optimizer_state: Optional[str] = None,
        wiring=None,
    ) -> None:
        """Add ``d_model`` residual features, ``heads`` heads and ``d_ff`` FFN neurons to every block, in place.

        Goes through :meth:`wiring` (or the ``wiring`` given, built by it): the residual
        stream first, then each block's heads and FFN width. ``init="zero_out"`` keeps the
        output exactly at the growth: new FFN neurons and heads get He-normal incoming
        weights and zero outgoing ones; new residual features are zero in the embeddings,
        the linears writing the stream draw their new rows He-normal, those reading it get
        zero new columns, and every norm ramps them in over ``ramp_steps`` calls of
        :meth:`ramp_step`. ``init="he"`` draws every new weight (embeddings N(0, 1)) and
        lets new features into the norms at once. The Parameters keep their storage;
        ``optimizer``'s state follows under ``optimizer_state`` (see
        :meth:`growdense.Wiring.grow`: ``"keep"`` gives new units their own step count,
        ``"keep_global_step"`` zero moments and the Parameter's step count, as rebuilding
        with zero-padded moments does). All sizes are checked before anything changes.
        """
        if init not in ("zero_out", "he"):
            raise ValueError(f"unknown init {init!r}; expected 'zero_out' or 'he'")
        want = {"d_model": d_model, "heads": heads, "d_ff": d_ff}
        now, caps = self.widths(), self.capacities()
        for name, n in want.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(f"grow({name}=...) takes an int >= 0, got {n!r}")
            if now[name] + n > caps[name]:
                raise ValueError(
                    f"cannot grow {name} from {now[name]} to {now[name] + n}: its capacity is {caps[name]}; "
                    f"build the GPT with capacity_{'heads' if name == 'heads' else name} of at least {now[name] + n}"
                )
        if wiring is None:
            wiring = self.wiring(optimizer)
        elif optimizer is not None and wiring.optimizer is not optimizer:
            raise ValueError("pass either a wiring or an optimizer: the wiring's optimizer is the one that follows")
        # One planned call, in the order of separate grow() calls (the same draws): the
        # residual stream first, then each block's heads and FFN width.
        sizes = {"residual": d_model} if d_model else {}
        for i in range(len(self.blocks)):
            if heads:
                sizes[f"heads{i}"] = heads
            if d_ff:
                sizes[f"ffn{i}"] = d_ff
        if not sizes:
            return
        extra = {"ramp_steps": ramp_steps} if init == "zero_out" and d_model else {}  # for the residual's norms
        wiring.grow_many(sizes, init=init, generator=generator, optimizer_state=optimizer_state, **extra)

    def ramp_step(self) -> None:
        """Advance the norms' ramp of residual features grown with ``init="zero_out"`` (call after each step)."""
        for norm in self.norms():
            norm.ramp_step()

    def wiring(self, optimizer: Optional[torch.optim.Optimizer] = None, **kwargs):
        """A :class:`~growdense.Wiring` over this model's widths (``kwargs`` go to ``Wiring``).

        ``"residual"``: every module reading or writing the residual stream (embeddings
        and norms ride it, each attention's ``"embed_dim"``: ``out_proj`` rows produce it,
        q/k/v columns consume it; ``fc2`` rows produce it; ``fc1`` and ``head`` consume
        it); ``"heads{i}"``: block ``i``'s attention heads (q/k/v rows and ``out_proj``
        columns); ``"ffn{i}"``: block ``i``'s FFN width (``fc1`` rows, ``fc2`` columns).
        """
        from ..wiring import Wiring

        w = Wiring(optimizer, **kwargs)
        stream: list = [self.tok_emb, self.pos_emb]
        for b in self.blocks:
            stream += [b.ln1, (b.attn, "embed_dim"), b.ln2, (b.fc1, "in"), (b.fc2, "out")]
        stream += [self.ln_f, (self.head, "in")]
        w.add_width("residual", stream)
        for i, b in enumerate(self.blocks):
            w.add_width(f"heads{i}", [(b.attn, "heads")])
            w.add(f"ffn{i}", b.fc1, [b.fc2])
        return w


# ---- the same network in plain PyTorch ------------------------------------------------------
class _LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm``; while ``ramp`` is set, new features enter scaled by it (MSG's masked norm)."""

    def __init__(self, d: int, **factory) -> None:
        super().__init__(d, **factory)
        self.ramp: Optional[Tensor] = None
        self.ramp_rate: Optional[Tensor] = None
        self.ramp_left = 0

    def forward(self, x: Tensor) -> Tensor:
        if self.ramp is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        r = self.ramp.to(x.dtype)
        total = r.sum()
        mean = (x * r).sum(-1, keepdim=True) / total
        c = x - mean
        var = (c * c * r).sum(-1, keepdim=True) / total
        return (c * torch.rsqrt(var + self.eps) * self.weight + self.bias) * r

    @torch.no_grad()
    def start_ramp(self, old: int, steps: int) -> None:
        d = self.normalized_shape[0]
        ramp = torch.ones(d, device=self.weight.device, dtype=self.weight.dtype)
        rate = torch.zeros_like(ramp)
        if self.ramp is not None:  # a ramp still running: keep its factors
            ramp[:old].copy_(self.ramp[:old])
            rate[:old].copy_(self.ramp_rate[:old])
        ramp[old:] = 0.0
        rate[old:] = 1.0 / steps
        self.ramp, self.ramp_rate, self.ramp_left = ramp, rate, max(self.ramp_left, steps)

    @torch.no_grad()
    def ramp_step(self) -> None:
        if self.ramp is None:
            return
        self.ramp.add_(self.ramp_rate).clamp_(max=1.0)
        self.ramp_left -= 1
        if self.ramp_left <= 0:
            self.ramp = self.ramp_rate = None


class PlainAttention(nn.Module):
    """Causal self-attention: one packed q/k/v ``nn.Linear``, ``F.scaled_dot_product_attention``, ``out_proj``."""

    def __init__(self, d_model: int, n_head: int, head_dim: int, factory: dict) -> None:
        super().__init__()
        self.n_head, self.head_dim = n_head, head_dim
        inner = n_head * head_dim
        self.in_proj = nn.Linear(d_model, 3 * inner, **factory)
        self.out_proj = nn.Linear(inner, d_model, **factory)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        H, d = self.n_head, self.head_dim
        q, k, v = self.in_proj(x).view(B, T, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, H * d))


class PlainBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, head_dim: int, d_ff: int, factory: dict) -> None:
        super().__init__()
        self.ln1 = _LayerNorm(d_model, **factory)
        self.attn = PlainAttention(d_model, n_head, head_dim, factory)
        self.ln2 = _LayerNorm(d_model, **factory)
        self.fc1 = nn.Linear(d_model, d_ff, **factory)
        self.fc2 = nn.Linear(d_ff, d_model, **factory)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PlainGPT(nn.Module):
    """:class:`GPT` in plain PyTorch at one fixed size (``head_dim`` defaults to ``d_model // n_head``)."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int = 2, d_model: int = 64, n_head: int = 2,
                 d_ff: int = 256, *, head_dim: Optional[int] = None, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        head_dim = d_model // n_head if head_dim is None else head_dim
        self.sizes = {"vocab_size": vocab_size, "block_size": block_size, "n_layer": n_layer, "d_model": d_model,
                      "n_head": n_head, "d_ff": d_ff, "head_dim": head_dim}
        self.tok_emb = nn.Embedding(vocab_size, d_model, **factory)
        self.pos_emb = nn.Embedding(block_size, d_model, **factory)
        self.blocks = nn.ModuleList(PlainBlock(d_model, n_head, head_dim, d_ff, factory) for _ in range(n_layer))
        self.ln_f = _LayerNorm(d_model, **factory)
        self.head = nn.Linear(d_model, vocab_size, **factory)
        self.register_buffer("_positions", torch.arange(block_size, device=device), persistent=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok_emb(idx) + self.pos_emb(self._positions[: idx.shape[1]])
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def ramp_step(self) -> None:
        for m in self.modules():
            if isinstance(m, _LayerNorm):
                m.ramp_step()


def _factored(name: str, sizes: dict) -> list[list[int]]:
    """Per dimension of PlainGPT's tensor ``name``, its factors (only q/k/v rows have several: 3 blocks)."""
    if name.endswith("attn.in_proj.weight"):
        return [[3, sizes["n_head"] * sizes["head_dim"]], [sizes["d_model"]]]
    if name.endswith("attn.in_proj.bias"):
        return [[3, sizes["n_head"] * sizes["head_dim"]]]
    return []


def _copy_leading(dst: Tensor, src: Tensor, dst_factors, src_factors) -> None:
    """Copy ``src`` into the leading part of ``dst`` (per factor, when factored)."""
    if dst_factors:
        d = dst.view([f for dim in dst_factors for f in dim])
        s = src.view([f for dim in src_factors for f in dim])
        d[tuple(slice(0, n) for n in s.shape)].copy_(s)
    else:
        dst[tuple(slice(0, n) for n in src.shape)].copy_(src)


@torch.no_grad()
def plain_from_grow(model: GPT) -> PlainGPT:
    """A :class:`PlainGPT` of ``model``'s active sizes holding a copy of its active weights (same function)."""
    cfg, w = model.config, model.widths()
    plain = PlainGPT(cfg.vocab_size, cfg.block_size, cfg.n_layer, w["d_model"], w["heads"], w["d_ff"],
                     head_dim=model.head_dim, device=model.head.weight.device, dtype=model.head.weight.dtype)
    plain.tok_emb.weight.copy_(model.tok_emb.active_tensor("weight"))
    plain.pos_emb.weight.copy_(model.pos_emb.active_tensor("weight"))
    for gb, pb in zip(model.blocks, plain.blocks):
        for g, p in ((gb.ln1, pb.ln1), (gb.ln2, pb.ln2)):
            p.weight.copy_(g.active_tensor("weight"))
            p.bias.copy_(g.active_tensor("bias"))
        pb.attn.in_proj.weight.copy_(gb.attn.active_tensor("in_proj_weight"))
        pb.attn.in_proj.bias.copy_(gb.attn.active_tensor("in_proj_bias"))
        pb.attn.out_proj.weight.copy_(gb.attn.active_tensor("out_proj.weight"))
        pb.attn.out_proj.bias.copy_(gb.attn.active_tensor("out_proj.bias"))
        for g, p in ((gb.fc1, pb.fc1), (gb.fc2, pb.fc2)):
            p.weight.copy_(g.active_weight)
            p.bias.copy_(g.active_bias)
    plain.ln_f.weight.copy_(model.ln_f.active_tensor("weight"))
    plain.ln_f.bias.copy_(model.ln_f.active_tensor("bias"))
    plain.head.weight.copy_(model.head.active_weight)
    plain.head.bias.copy_(model.head.active_bias)
    return plain


def _he(t: Tensor, fan_in: int, generator) -> None:
    draw_normal_(t, math.sqrt(2.0 / fan_in), generator)


@torch.no_grad()
def rebuild_grown(
    model: PlainGPT,
    optimizer: Optional[torch.optim.Optimizer],
    d_model: int = 0,
    heads: int = 0,
    d_ff: int = 0,
    *,
    ramp_steps: int = 100,
    generator: Optional[torch.Generator] = None,
    optimizer_factory=None,
) -> tuple[PlainGPT, Optional[torch.optim.Optimizer]]:
    """Grow a :class:`PlainGPT` by rebuilding it: the way growth is done without growdense (MSG).

    A new ``PlainGPT`` of the new sizes is built (its constructor allocates and
    initialises every tensor), the old weights are copied into its leading slices, the
    new slices are written as :meth:`GPT.grow` writes them with ``init="zero_out"`` (so
    the function is unchanged; the norms ramp the new residual features in), and a new
    optimizer (``optimizer_factory(params)``, default: the old one's class and
    hyper-parameters) is built whose state is the old one's zero-padded (Adam's moments;
    ``step`` copied). Returns the new model and optimizer.
    """
    s = dict(model.sizes)
    d0, h0, f0, hd = s["d_model"], s["n_head"], s["d_ff"], s["head_dim"]
    d1, h1, f1 = d0 + d_model, h0 + heads, f0 + d_ff
    i0, i1 = h0 * hd, h1 * hd
    p0 = next(model.parameters())
    new = PlainGPT(s["vocab_size"], s["block_size"], s["n_layer"], d1, h1, f1, head_dim=hd,
                   device=p0.device, dtype=p0.dtype)
    old_params = dict(model.named_parameters())
    new_params = dict(new.named_parameters())
    s1 = dict(new.sizes)
    for name, p in new_params.items():  # the new slices as GPT.grow(init="zero_out") writes them
        if name.endswith(("tok_emb.weight", "pos_emb.weight")):
            p[:, d0:].zero_()
        elif name.endswith("attn.in_proj.weight"):
            v = p.view(3, i1, d1)
            v[:, :i0, d0:].zero_()
            _he(v[:, i0:, :], d1, generator)
        elif name.endswith("bias") and ("ln" not in name.rsplit(".", 2)[-2]):
            p.zero_()
        elif name.endswith("attn.out_proj.weight"):
            _he(p[d0:, :i0], i0, generator)
            p[:, i0:].zero_()
        elif name.endswith("fc1.weight"):
            p[:f0, d0:].zero_()
            _he(p[f0:, :], d1, generator)
        elif name.endswith("fc2.weight"):
            _he(p[d0:, :f0], f0, generator)
            p[:, f0:].zero_()
        elif name.endswith("head.weight"):
            p[:, d0:].zero_()
    for name, p in new_params.items():  # the old weights into the leading slices (biases too)
        _copy_leading(p, old_params[name], _factored(name, s1), _factored(name, s))
    if d_model:
        for old_m, new_m in zip(model.modules(), new.modules()):
            if isinstance(new_m, _LayerNorm):
                new_m.ramp, new_m.ramp_rate, new_m.ramp_left = old_m.ramp, old_m.ramp_rate, old_m.ramp_left
                new_m.start_ramp(d0, ramp_steps)
    else:
        for old_m, new_m in zip(model.modules(), new.modules()):
            if isinstance(new_m, _LayerNorm):
                new_m.ramp, new_m.ramp_rate, new_m.ramp_left = old_m.ramp, old_m.ramp_rate, old_m.ramp_left
    if optimizer is None:
        return new, None
    if optimizer_factory is None:
        accepted = inspect.signature(type(optimizer).__init__).parameters
        hyper = {k: v for k, v in optimizer.param_groups[0].items() if k != "params" and k in accepted}
        new_opt = type(optimizer)(new.parameters(), **hyper)
    else:
        new_opt = optimizer_factory(new.parameters())
    for name, p in new_params.items():
        old_state = optimizer.state.get(old_params[name])
        if not old_state:
            continue
        state = {}
        for key, value in old_state.items():
            if isinstance(value, Tensor) and value.shape == old_params[name].shape and value.dim() > 0:
                padded = torch.zeros_like(p)
                _copy_leading(padded, value, _factored(name, s1), _factored(name, s))
                state[key] = padded
            else:
                state[key] = value.clone() if isinstance(value, Tensor) else value
        new_opt.state[p] = state
    return new, new_opt
