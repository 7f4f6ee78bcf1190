"""``GrowEmbedding``: an embedding table whose embedding dimension grows in place."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_int
from ._grow_module import Layout, _GrowModule, check_growth
from .protocol import draw_normal_

__all__ = ["GrowEmbedding"]

_EMBEDDING_INITS = ("he", "default", "zero_out", "zero")


class GrowEmbedding(_GrowModule):
    r"""A :class:`torch.nn.Embedding` whose embedding dimension grows and shrinks in place.

    ``weight`` is allocated once as ``num_embeddings x capacity_embedding_dim``; only its
    first ``embedding_dim`` columns are used and the rest is zero (weight and gradient).
    The vocabulary is fixed. Loads an ``nn.Embedding`` state_dict of the active size.

    Args:
        num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
            scale_grad_by_freq, sparse, device, dtype: as for :class:`torch.nn.Embedding`.
        _weight: an initial ``num_embeddings x embedding_dim`` table (copied into the
            capacity tensor); ``_freeze``: whether the weight is frozen.
        capacity_embedding_dim: the allocated embedding dimension (default: ``embedding_dim``).
    """

    _width_names = ("embedding_dim",)
    _inits = _EMBEDDING_INITS

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: Optional[int] = None,
        max_norm: Optional[float] = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: Optional[Tensor] = None,
        _freeze: bool = False,
        device=None,
        dtype=None,
        *,
        capacity_embedding_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        num_embeddings = check_int("num_embeddings", num_embeddings)
        if num_embeddings < 1:
            raise ValueError(f"num_embeddings must be >= 1, got {num_embeddings}")
        self._init_widths({"embedding_dim": embedding_dim}, {"embedding_dim": capacity_embedding_dim})
        self.num_embeddings = num_embeddings
        if padding_idx is not None:
            padding_idx = check_int("padding_idx", padding_idx)
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(
                    f"padding_idx={padding_idx} must be within num_embeddings={num_embeddings} "
                    f"(between {-num_embeddings} and {num_embeddings - 1})"
                )
            if padding_idx < 0:
                padding_idx += num_embeddings
        self.padding_idx = padding_idx
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.scale_grad_by_freq = scale_grad_by_freq
        self.sparse = sparse
        cap = self._capacities["embedding_dim"]
        if _weight is None:
            self.weight = nn.Parameter(torch.empty((num_embeddings, cap), device=device, dtype=dtype),
                                       requires_grad=not _freeze)
            self.reset_parameters()
        else:
            if tuple(_weight.shape) != (num_embeddings, self.embedding_dim):
                raise ValueError(
                    f"_weight has shape {tuple(_weight.shape)}, expected (num_embeddings, embedding_dim) = "
                    f"({num_embeddings}, {self.embedding_dim})"
                )
            full = torch.zeros((num_embeddings, cap), device=device or _weight.device, dtype=dtype or _weight.dtype)
            with torch.no_grad():
                full[:, : self.embedding_dim] = _weight
            self.weight = nn.Parameter(full, requires_grad=not _freeze)

    def _layout(self) -> Layout:
        return {"weight": (((self.num_embeddings, None),), ((self._capacities["embedding_dim"], "embedding_dim"),))}

    def _growth_spec(self):
        """The declaration for :mod:`growdense.protocol`: the weight's columns ride ``embedding_dim``.

        New columns: N(0, 1) under ``"he"`` (as :meth:`grow` and ``nn.Embedding`` draw),
        zero under ``"zero_out"`` (every token's embedding keeps its values and is zero
        in the new dimensions); ``"split"`` copies the sources' columns. The padding row
        stays zero (:meth:`on_grow_`).
        """
        from . import protocol as p
        from .ops import block_normal_

        return p.GrowthSpec(("embedding_dim",), (
            p.TensorSpec(
                "weight", (p.Axis(1, "embedding_dim", p.RIDER),), inits=(("he", p.Normal(1.0)), ("zero_out", 0.0)),
                normal=block_normal_,
            ),
        ))

    @torch.no_grad()
    def on_grow_(self, width: str, start: int, stop: int, init: str, **options) -> None:
        """Called by a :class:`~growdense.Wiring` after it wrote columns ``[start, stop)``: the padding row stays zero."""
        if self.padding_idx is not None:
            self.weight[self.padding_idx, start:stop].zero_()

    @property
    def embedding_dim(self) -> int:
        """The active embedding dimension."""
        return self.width("embedding_dim")

    @property
    def capacity_embedding_dim(self) -> int:
        return self._capacities["embedding_dim"]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, 1) on the active columns as :class:`torch.nn.Embedding`, the padding row zero; zero outside."""
        self.weight.zero_()
        self._init_like_twin("weight", nn.init.normal_)
        self._fill_padding_idx_with_zero()

    def _fill_padding_idx_with_zero(self) -> None:
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.padding_idx].fill_(0)

    def _init_slice(self, width: str, start: int, stop: int, init: str, generator) -> None:
        if init in ("he", "default"):
            draw_normal_(self._new_slice("weight", width, start, stop), 1.0, generator)
            self._fill_padding_idx_with_zero()

    def grow(self, n: int, init: str = "he", *, generator: Optional[torch.Generator] = None) -> None:
        """Add ``n`` embedding dimensions.

        ``init``: ``"he"`` (or ``"default"``) draws the new columns from N(0, 1) as
        ``nn.Embedding`` initialises (an embedding has no fan-in to scale by); ``"zero_out"``
        (or ``"zero"``) leaves them zero (every token's embedding is unchanged, zero in the new dimensions).
        The padding row stays zero. Changes this module only, not an optimizer's state (see :meth:`resize`).
        """
        n = check_growth(n)
        self.resize("embedding_dim", self.embedding_dim + n, init, generator=generator)

    def shrink(self, to: int) -> None:
        """Keep the first ``to`` embedding dimensions; zero the others (weight and gradient).

        Changes this module only, not an optimizer's state (see :meth:`resize`).
        """
        to = check_int("to", to)
        if to > self.embedding_dim:
            raise ValueError(f"cannot shrink embedding_dim from {self.embedding_dim} to {to}; use grow to widen")
        self.resize("embedding_dim", to)

    def forward(self, input: Tensor) -> Tensor:
        weight = self.weight.narrow(1, 0, self._active_embedding_dim)
        if self.sparse and self.weight.requires_grad and torch.is_grad_enabled():
            # A sparse gradient cannot flow back through the narrowed view: the op is
            # differentiated here, its sparse rows padded to the capacity width.
            if self.max_norm is not None:
                with torch.no_grad():
                    torch.embedding_renorm_(weight, input.reshape(-1), self.max_norm, self.norm_type)
            return _SparseEmbedding.apply(input, self.weight, self._active_embedding_dim, self.padding_idx,
                                          self.scale_grad_by_freq)
        return F.embedding(
            input, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, capacity_embedding_dim={self.capacity_embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.max_norm is not None:
            s += f", max_norm={self.max_norm}"
        if self.norm_type != 2:
            s += f", norm_type={self.norm_type}"
        if self.scale_grad_by_freq:
            s += ", scale_grad_by_freq=True"
        if self.sparse:
            s += ", sparse=True"
        return s

    @classmethod
    def from_pretrained(
        cls,
        embeddings: Tensor,
        freeze: bool = True,
        padding_idx: Optional[int] = None,
        max_norm: Optional[float] = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        *,
        capacity_embedding_dim: Optional[int] = None,
    ) -> "GrowEmbedding":
        """A ``GrowEmbedding`` holding a copy of ``embeddings`` (2-D) as its active columns."""
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings must be 2-dimensional, got shape {tuple(embeddings.shape)}")
        rows, cols = embeddings.shape
        return cls(
            rows, cols, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse,
            _weight=embeddings, _freeze=freeze, capacity_embedding_dim=capacity_embedding_dim,
        )


class _SparseEmbedding(torch.autograd.Function):
    """``F.embedding(input, weight[:, :width], sparse=True)`` whose gradient has ``weight``'s capacity shape."""

    @staticmethod
    def forward(ctx, input: Tensor, weight: Tensor, width: int, padding_idx: Optional[int], scale_grad_by_freq: bool):
        ctx.save_for_backward(input)
        ctx.num_weights, ctx.capacity = weight.shape
        ctx.padding_idx = -1 if padding_idx is None else padding_idx
        ctx.scale_grad_by_freq = scale_grad_by_freq
        return F.embedding(input, weight.narrow(1, 0, width), padding_idx)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (input,) = ctx.saved_tensors
        g = torch.ops.aten.embedding_backward(
            grad, input, ctx.num_weights, ctx.padding_idx, ctx.scale_grad_by_freq, True
        ).coalesce()
        values = g.values()
        values = F.pad(values, (0, ctx.capacity - values.shape[1]))
        full = torch.sparse_coo_tensor(
            g.indices(), values, (ctx.num_weights, ctx.capacity), is_coalesced=True, check_invariants=False
        )
        return None, full, None, None, None
