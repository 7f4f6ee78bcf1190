"""A small hand-written pre-norm transformer of growable modules, its Wiring, and checks.

Model: GrowEmbedding -> blocks of (x + attn(ln1(x)), x + fc2(gelu(fc1(ln2(x))))) -> final
norm -> LM head (GrowLinear). Widths: ``"stream"`` (the residual stream: the embedding's
columns, every norm, the attentions' model width, the FFNs' input columns and output rows,
the head's columns), ``"ffn{i}"`` (each FFN's inner width) and ``"heads{i}"`` (each
attention's heads).

The reference forward (:func:`reference_forward`) recomputes the model in float64 from
copies of the active parts only, with plain tensor algebra (its own attention, norms with
the ramp formula written out), so that it shares no code with the modules.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from growdense import GrowEmbedding, GrowLayerNorm, GrowLinear, GrowMultiheadAttention, GrowRMSNorm, Wiring
from growdense.layers import active_block

VOCAB = 11
CAPS = {"stream": 16, "ffn": 24, "heads": 4}
START = {"stream": 8, "ffn": 12, "heads": 2}  # head_dim = 8 / 2 = 4


class Block(nn.Module):
    def __init__(self, norm: type, dtype: torch.dtype) -> None:
        super().__init__()
        d, f, h = START["stream"], START["ffn"], START["heads"]
        D, Fc, H = CAPS["stream"], CAPS["ffn"], CAPS["heads"]
        self.ln1 = norm(d, capacity=D, dtype=dtype)
        self.attn = GrowMultiheadAttention(d, h, batch_first=True, capacity_heads=H, capacity_embed_dim=D, dtype=dtype)
        self.ln2 = norm(d, capacity=D, dtype=dtype)
        self.fc1 = GrowLinear(d, f, capacity_in=D, capacity_out=Fc, dtype=dtype)
        self.fc2 = GrowLinear(f, d, capacity_in=Fc, capacity_out=D, dtype=dtype)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, blocks: int = 2, norm: type = GrowLayerNorm, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.emb = GrowEmbedding(VOCAB, START["stream"], capacity_embedding_dim=CAPS["stream"], dtype=dtype)
        self.blocks = nn.ModuleList(Block(norm, dtype) for _ in range(blocks))
        self.norm = norm(START["stream"], capacity=CAPS["stream"], dtype=dtype)
        self.head = GrowLinear(START["stream"], VOCAB, capacity_in=CAPS["stream"], dtype=dtype)

    def forward(self, tokens: Tensor) -> Tensor:
        L = tokens.shape[1]
        mask = torch.triu(torch.ones(L, L, dtype=torch.bool, device=tokens.device), 1)
        x = self.emb(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))

    def wiring(self, optimizer=None, **kwargs) -> Wiring:
        wiring = Wiring(optimizer, **kwargs)
        stream: list = [self.emb]
        for b in self.blocks:
            stream += [b.ln1, (b.attn, "embed_dim"), b.ln2, (b.fc1, "in"), (b.fc2, "out")]
        stream += [self.norm, (self.head, "in")]
        wiring.add_width("stream", stream)
        for i, b in enumerate(self.blocks):
            wiring.add(f"ffn{i}", b.fc1, [b.fc2])
            wiring.add_width(f"heads{i}", [(b.attn, "heads")])
        return wiring


def tokens(batch: int = 3, length: int = 5, seed: int = 0) -> Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- the float64 reference ---------------------------------------------------------------
def _a(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().double().clone()


def _norm_ref(m, x: Tensor) -> Tensor:
    n = m.features
    r = _a(m._ramp[:n]) if m.ramping else torch.ones(n, dtype=torch.float64)
    if r.sum() == 0:  # every active feature enters with factor 0: nothing passes
        return torch.zeros_like(x)
    w = _a(m.weight[:n]) if m.weight is not None else None
    b = _a(m.bias[:n]) if getattr(m, "bias", None) is not None else None
    if isinstance(m, GrowRMSNorm):
        eps = torch.finfo(m._ramp.dtype).eps if m.eps is None else m.eps  # eps=None: the input dtype's
        y = x / torch.sqrt((x * x * r).sum(-1, keepdim=True) / r.sum() + eps)
    else:
        mean = (x * r).sum(-1, keepdim=True) / r.sum()
        var = ((x - mean) ** 2 * r).sum(-1, keepdim=True) / r.sum()
        y = (x - mean) / torch.sqrt(var + m.eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y * r


def _linear_ref(m: GrowLinear, x: Tensor) -> Tensor:
    o, i = m.out_features, m.in_features
    y = x @ _a(m.weight[:o, :i]).T
    return y if m.bias is None else y + _a(m.bias[:o])


def _attn_ref(m: GrowMultiheadAttention, x: Tensor, mask: Tensor) -> Tensor:
    H, d, E = m.num_heads, m.head_dim, m.embed_dim
    cap = m.capacity_heads * d
    w = _a(m.in_proj_weight)
    b = _a(m.in_proj_bias)
    outs = []
    for j in range(3):  # q, k, v rows of the active heads in each block
        rows = slice(j * cap, j * cap + H * d)
        outs.append(x @ w[rows, :E].T + (0 if b is None else b[rows]))
    q, k, v = (t.view(*x.shape[:-1], H, d).transpose(-3, -2) for t in outs)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)
    scores = scores.masked_fill(mask, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(-3, -2).reshape(*x.shape[:-1], H * d)
    y = out @ _a(m.out_proj.weight[:E, : H * d]).T
    return y if m.out_proj.bias is None else y + _a(m.out_proj.bias[:E])


def reference_forward(model: TinyGPT, toks: Tensor) -> Tensor:
    L = toks.shape[1]
    mask = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    x = _a(model.emb.weight[:, : model.emb.embedding_dim])[toks]
    for blk in model.blocks:
        x = x + _attn_ref(blk.attn, _norm_ref(blk.ln1, x), mask)
        x = x + _linear_ref(blk.fc2, F.gelu(_linear_ref(blk.fc1, _norm_ref(blk.ln2, x))))
    return _linear_ref(model.head, _norm_ref(model.norm, x))


# ---- the outside-part invariant ------------------------------------------------------------
def _outside(module, name: str, t: Tensor) -> Tensor:
    """``t`` with its active part zeroed, from the module's own layout (GrowLinear: its active block)."""
    rest = t.detach().clone()
    if isinstance(module, GrowLinear):
        rest[(slice(0, module.out_features), slice(0, module.in_features))[: rest.dim()]] = 0
        return rest
    dims = module._layout()[name]
    rest.view(module._factored_shape(dims))[module._region(dims)] = 0
    return rest


def declared_parameters(model: nn.Module):
    """``(module, path, Parameter)`` for every Parameter of every growable module."""
    for module in model.modules():
        if isinstance(module, GrowLinear):
            yield from ((module, n, p) for n, p in module._parameters.items() if p is not None)
        elif hasattr(module, "tensor_layout"):
            for path in module.tensor_layout():
                t = module._tensor(path)
                if isinstance(t, nn.Parameter):
                    yield module, path, t


def assert_outside_zero(model: nn.Module, optimizer=None) -> None:
    """Outside every active part: weights, gradients and every optimizer state tensor shaped like its weight are zero."""
    for module, path, p in declared_parameters(model):
        tensors = {"": p, ".grad": p.grad}
        if optimizer is not None:
            for key, v in optimizer.state.get(p, {}).items():
                if isinstance(v, Tensor) and v.shape == p.shape and v.dim() > 0:
                    tensors[f" state {key}"] = v
        for what, t in tensors.items():
            if t is not None:
                assert not _outside(module, path, t).any(), f"{type(module).__name__}.{path}{what} nonzero outside"


def assert_active_blocks(model: nn.Module) -> None:
    """active_block() finds every new module's Parameters; outside the block all is zero."""
    for module, path, p in declared_parameters(model):
        block = active_block(p)
        assert block is not None, f"{type(module).__name__}.{path} has no active block"
        rest = p.detach().clone()
        rest[block] = 0
        assert not rest.any()
