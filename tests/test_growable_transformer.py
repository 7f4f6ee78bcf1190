"""growable(model) on transformers: width groups across residual streams, norms, embeddings, attention.

Tolerances. Models run in float64. Conversion keeps every weight bit for bit, but the
growable modules compute on narrowed views of capacity tensors (attention through
F.scaled_dot_product_attention or an explicit softmax, linears through GrowLinear's
kernels), so the summation order may differ from torch's fused paths: outputs are
compared with atol=rtol=1e-12, about 1e4 float64 ulps of the O(1) outputs here and far
below the O(0.1-1) change a growth with init="he" makes (checked below). The same holds
after a function-preserving (zero_out) growth, where the longer inner dimensions add
exact zero terms.

Tests marked ``needs_attention_wiring`` grow the residual stream or the heads: they need
the Wiring to register an attention's widths (a module that both reads and writes the
stream, dotted tensor names such as ``out_proj.weight``) and the norms' zero_out ramp.
A protocol without those makes growable() report these widths in ``wiring.fixed``, and
the tests skip, saying so.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from growdense import (
    GrowEmbedding, GrowLayerNorm, GrowLinear, GrowMultiheadAttention, GrowRMSNorm, NotGrowableError, Wiring, growable,
)

TOL = {"atol": 1e-12, "rtol": 1e-12}


def _attention_registers() -> bool:
    attn = GrowMultiheadAttention(4, 2, capacity_heads=3, capacity_embed_dim=6)
    try:
        Wiring().add_width("h", [(attn, "heads")])
        Wiring().add_width("e", [(attn, "embed_dim"), GrowLayerNorm(4, capacity=6)])
    except (TypeError, ValueError):
        return False
    return True


needs_attention_wiring = pytest.mark.skipif(
    not _attention_registers(), reason="the Wiring cannot register an attention's widths yet (protocol work pending)"
)


# ---- models ------------------------------------------------------------------------
class Block(nn.Module):
    """A hand-written pre-norm transformer block."""

    def __init__(self, d: int, heads: int, ffn: int, norm: type = nn.LayerNorm, act: type = nn.GELU) -> None:
        super().__init__()
        self.ln1 = norm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = norm(d)
        self.fc1, self.act, self.fc2 = nn.Linear(d, ffn), act(), nn.Linear(ffn, d)

    def forward(self, x, mask=None):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """Token and position embeddings, pre-norm blocks, a final norm and an LM head (tied or not)."""

    def __init__(self, vocab=13, context=8, d=8, heads=2, ffn=16, layers=2, tied=False, norm=nn.LayerNorm):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads, ffn, norm) for _ in range(layers))
        self.norm, self.head = norm(d), nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, idx):
        T = idx.size(1)
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        mask = torch.triu(torch.full((T, T), float("-inf"), dtype=x.dtype, device=idx.device), diagonal=1)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


class EncoderLM(nn.Module):
    """An embedding, nn.TransformerEncoder (its own final norm) and a head: the stream can grow."""

    def __init__(self, norm_first=True, batch_first=True, activation="gelu", vocab=11, d=8, heads=2, ffn=12):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, ffn, dropout=0.0, activation=activation, norm_first=norm_first,
                                           batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        return self.head(self.encoder(self.emb(idx)))


def tokens(batch=3, T=8, vocab=11, seed=0):
    return torch.randint(0, vocab, (batch, T), generator=torch.Generator().manual_seed(seed))


def out(model, *inputs):
    with torch.no_grad():
        return model(*inputs)


def names_of(wiring) -> set:
    return set(wiring.names()) | set(wiring.fixed)


def member_names(wiring, model, width) -> set:
    names = {id(m): n for n, m in model.named_modules()}
    return {(names[id(m)], local) for m, local, _ in wiring.members(width)}


# ---- nn.TransformerEncoderLayer ---------------------------------------------------------
@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_converts_and_keeps_its_output(norm_first, batch_first, activation):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=activation, norm_first=norm_first,
                                       batch_first=batch_first).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    mask = torch.rand(3 if batch_first else 5, 5 if batch_first else 3) < 0.3
    mask[:, 0] = False
    layer.eval()
    before_eval = out(layer, x, None, mask)  # the fused fast path (eval, no grad) in torch
    layer.train()
    before_train = out(layer, x)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        wiring = growable(layer, capacity=2.0)
    assert isinstance(layer.self_attn, GrowMultiheadAttention) and not layer.self_attn._qkv_same_embed_dim
    assert isinstance(layer.linear1, GrowLinear) and isinstance(layer.linear2, GrowLinear)
    assert type(layer.norm1) is nn.LayerNorm and type(layer.norm2) is nn.LayerNorm  # the stream is fixed here
    # The stream is the layer's input and output: fixed, and said so; the FFN width grows.
    assert names_of(wiring) == {"stream@src", "linear1", "self_attn.heads"}
    assert "input of the model" in wiring.fixed["stream@src"] and "output of the model" in wiring.fixed["stream@src"]
    assert "linear1" in wiring.names() and wiring.widths()["linear1"] == 16 and wiring.capacity("linear1") == 32
    assert member_names(wiring, layer, "linear1") == {("linear1", "out"), ("linear2", "in")}
    torch.testing.assert_close(out(layer, x), before_train, **TOL)
    layer.eval()
    torch.testing.assert_close(out(layer, x, None, mask), before_eval, **TOL)
    # zero_out growth of the FFN width keeps the function; "he" changes it.
    wiring.grow("linear1", 16, init="zero_out")
    assert layer.linear1.out_features == 32 and layer.linear2.in_features == 32
    torch.testing.assert_close(out(layer, x, None, mask), before_eval, **TOL)
    layer.train()
    torch.testing.assert_close(out(layer, x), before_train, **TOL)
    wiring.shrink("linear1", 8)
    wiring.grow("linear1", 8, init="he")
    assert (out(layer, x) - before_train).abs().max() > 1e-2


@needs_attention_wiring
@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_layer_heads_grow_function_preserving(norm_first):
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, norm_first=norm_first, batch_first=True).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    before = out(layer, x)
    wiring = growable(layer, capacity={"self_attn.heads": 4})
    assert wiring.capacity("self_attn.heads") == 4
    wiring.grow("self_attn.heads", 2, init="zero_out")
    assert layer.self_attn.num_heads == 4
    torch.testing.assert_close(out(layer, x), before, **TOL)


def test_encoder_layer_strict_raises_naming_the_boundary_and_changes_nothing():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    state = copy.deepcopy(layer.state_dict())
    with pytest.raises(NotGrowableError) as info:
        growable(layer, strict=True)
    assert "stream@src" in info.value.problems
    assert "input of the model" in info.value.problems["stream@src"]
    assert type(layer.self_attn) is nn.MultiheadAttention and type(layer.linear1) is nn.Linear
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())


# ---- a hand-written tiny GPT -----------------------------------------------------------
def test_tiny_gpt_widths_names_and_conversion():
    torch.manual_seed(2)
    model = TinyGPT().double()
    idx = tokens(vocab=13)
    before = out(model, idx)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        wiring = growable(model, capacity=2.0)
    assert names_of(wiring) == {
        "stream@tok", "blocks.0.attn.heads", "blocks.1.attn.heads", "blocks.0.fc1", "blocks.1.fc1",
    }
    assert member_names(wiring, model, "blocks.0.fc1") == {("blocks.0.fc1", "out"), ("blocks.0.fc2", "in")}
    # Every module of the model is its growable twin, holding the same weights.
    assert isinstance(model.tok, GrowEmbedding) and isinstance(model.pos, GrowEmbedding)
    assert isinstance(model.norm, GrowLayerNorm) and isinstance(model.head, GrowLinear)
    for block in model.blocks:
        assert isinstance(block.ln1, GrowLayerNorm) and isinstance(block.attn, GrowMultiheadAttention)
    torch.testing.assert_close(out(model, idx), before, **TOL)
    # The FFN widths grow now, function-preserving with zero_out.
    for name in ("blocks.0.fc1", "blocks.1.fc1"):
        wiring.grow(name, 16, init="zero_out")
    torch.testing.assert_close(out(model, idx), before, **TOL)


@needs_attention_wiring
def test_tiny_gpt_stream_members_and_every_width_grows_function_preserving():
    torch.manual_seed(3)
    model = TinyGPT().double()
    idx = tokens(vocab=13)
    before = out(model, idx)
    wiring = growable(model, capacity=2.0)
    assert wiring.fixed == {}
    stream = member_names(wiring, model, "stream@tok")
    expected = {("tok", "embedding_dim"), ("pos", "embedding_dim"), ("norm", "features"), ("head", "in")}
    for i in range(2):
        b = f"blocks.{i}"
        expected |= {(f"{b}.ln1", "features"), (f"{b}.ln2", "features"), (f"{b}.attn", "embed_dim"), (f"{b}.fc1", "in"), (f"{b}.fc2", "out")}
    assert stream == expected
    assert member_names(wiring, model, "blocks.0.attn.heads") == {("blocks.0.attn", "heads")}
    for name in wiring.names():
        wiring.grow(name, wiring.capacity(name) - wiring.width(name), init="zero_out")
        torch.testing.assert_close(out(model, idx), before, **TOL)
    assert model.tok.embedding_dim == 16 and model.blocks[0].attn.num_heads == 4


def test_tied_lm_head_is_reported_and_left_as_it_is():
    torch.manual_seed(4)
    model = TinyGPT(tied=True).double()
    idx = tokens(vocab=13)
    before = out(model, idx)
    with pytest.warns(UserWarning, match="tied weights"):
        wiring = growable(model)
    assert "stream@tok" in wiring.fixed and "tied weights" in wiring.fixed["stream@tok"]
    assert "untie them" in wiring.fixed["stream@tok"]
    # The tied modules stay torch's, sharing their Parameter; the FFN widths still grow.
    assert type(model.tok) is nn.Embedding and type(model.head) is nn.Linear and model.head.weight is model.tok.weight
    assert "blocks.0.fc1" in wiring.names()
    torch.testing.assert_close(out(model, idx), before, **TOL)
    with pytest.raises(NotGrowableError, match="tied weights"):
        growable(TinyGPT(tied=True), strict=True)


def test_rms_norm_rides_the_stream():
    torch.manual_seed(5)
    model = TinyGPT(norm=nn.RMSNorm).double()
    idx = tokens(vocab=13)
    before = out(model, idx)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        wiring = growable(model)
    assert isinstance(model.norm, GrowRMSNorm) and isinstance(model.blocks[1].ln2, GrowRMSNorm)
    assert "stream@tok" in names_of(wiring)
    torch.testing.assert_close(out(model, idx), before, **TOL)


# ---- nn.TransformerEncoder inside a model ------------------------------------------------
@pytest.mark.parametrize("norm_first,batch_first,activation", [(True, True, "gelu"), (False, False, "relu")])
def test_encoder_inside_a_model(norm_first, batch_first, activation):
    torch.manual_seed(6)
    model = EncoderLM(norm_first, batch_first, activation).double()
    idx = tokens()
    if not batch_first:
        idx = idx.t().contiguous()
    before = out(model, idx)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        wiring = growable(model, capacity={"encoder.layers.0.linear1": 24})
    assert names_of(wiring) == {"stream@emb", "encoder.layers.0.linear1", "encoder.layers.1.linear1",
                                "encoder.layers.0.self_attn.heads", "encoder.layers.1.self_attn.heads"}
    assert wiring.capacity("encoder.layers.0.linear1") == 24 and wiring.capacity("encoder.layers.1.linear1") == 12
    assert isinstance(model.encoder.norm, GrowLayerNorm) and isinstance(model.encoder.layers[1].norm2, GrowLayerNorm)
    assert model.encoder.use_nested_tensor is False
    torch.testing.assert_close(out(model, idx), before, **TOL)
    wiring.grow("encoder.layers.0.linear1", 12, init="zero_out")
    torch.testing.assert_close(out(model, idx), before, **TOL)
    model.eval()  # no fused path runs on the capacity tensors
    torch.testing.assert_close(out(model, idx), before, **TOL)


@needs_attention_wiring
def test_encoder_stream_grows_function_preserving():
    torch.manual_seed(7)
    model = EncoderLM().double()
    idx = tokens()
    before = out(model, idx)
    wiring = growable(model)
    assert wiring.fixed == {}
    wiring.grow("stream@emb", 8, init="zero_out")
    assert model.emb.embedding_dim == 16 and model.encoder.layers[0].self_attn.embed_dim == 16
    torch.testing.assert_close(out(model, idx), before, **TOL)


# ---- what cannot grow stays fixed (or raises with strict=True) ----------------------------
class ReshapingBlock(nn.Module):
    """An FFN whose hidden width goes through a reshape the analysis does not understand."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 6), nn.Linear(6, 6)
        self.fc4 = nn.Linear(6, 7)

    def forward(self, idx):
        x = self.emb(idx)
        h = torch.relu(self.fc1(x))
        h = h.view(h.shape[0], h.shape[1], 2, 4).flip(-1).reshape(h.shape[0], h.shape[1], 8)  # mixes features
        x = x + self.fc2(h)
        x = x + self.fc3(torch.relu(x))
        return self.fc4(x)


def test_unknown_reshape_stays_fixed_and_is_reported():
    torch.manual_seed(8)
    model = ReshapingBlock().double()
    idx = torch.randint(0, 7, (2, 5))
    before = out(model, idx)
    with pytest.warns(UserWarning, match="fc1"):
        wiring = growable(model)
    assert "fc1" in wiring.fixed and "view" in wiring.fixed["fc1"]
    assert model.fc1.capacity_out == 8  # converted for the stream it reads; its fixed width has no headroom
    assert "stream@emb" in names_of(wiring)
    torch.testing.assert_close(out(model, idx), before, **TOL)


def test_strict_raises_naming_the_op_and_changes_nothing():
    model = ReshapingBlock()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(NotGrowableError) as info:
        growable(model, strict=True)
    assert "fc1" in info.value.problems and "reshape (view" in info.value.problems["fc1"]
    assert "strict=False" in str(info.value)
    assert type(model.fc1) is nn.Linear and type(model.emb) is nn.Embedding
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


class LearnedPositions(nn.Module):
    """A positional table as a raw Parameter added to the stream: read directly, so the stream is fixed."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(5, 4)
        self.pos = nn.Parameter(torch.randn(6, 4))
        self.fc1, self.fc2, self.head = nn.Linear(4, 8), nn.Linear(8, 4), nn.Linear(4, 5)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.size(1)]
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x)


def test_parameter_read_directly_fixes_its_stream_only():
    torch.manual_seed(9)
    model = LearnedPositions().double()
    idx = torch.randint(0, 5, (2, 6))
    before = out(model, idx)
    with pytest.warns(UserWarning, match="reads 'pos' directly"):
        wiring = growable(model)
    assert "stream@tok" in wiring.fixed and wiring.names() == ["fc1"]
    torch.testing.assert_close(out(model, idx), before, **TOL)


def test_exclude_by_width_or_module():
    torch.manual_seed(10)
    model = TinyGPT().double()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        wiring = growable(model, exclude=["blocks.0.fc1", "blocks.1"])
    assert wiring.fixed["blocks.0.fc1"].startswith("it is excluded")
    assert "excluded (exclude='blocks.1')" in wiring.fixed["blocks.1.fc1"]
    assert "excluded (exclude='blocks.1')" in wiring.fixed["stream@tok"]  # blocks.1 writes the stream too
    assert type(model.blocks[1].fc1) is nn.Linear
    with pytest.raises(ValueError, match="neither a width nor a module"):
        growable(TinyGPT(), exclude=["nope"])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"capacity": {"nope": 3}}, ValueError, "not hidden widths"),
        ({"capacity": {"blocks.0.fc1": 8}}, ValueError, "below the width 16"),
        ({"capacity": 0.5}, ValueError, ">= 1"),
        ({"streams": False, "strict": False}, ValueError, "strict=False needs streams=True"),
    ],
)
def test_bad_arguments_change_nothing(kwargs, error, match):
    model = TinyGPT()
    state = copy.deepcopy(model.state_dict())
    types = [type(m) for m in model.modules()]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with pytest.raises(error, match=match):
            growable(model, **kwargs)
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_mlp_analysis_on_request():
    with pytest.raises(NotGrowableError):  # the MLP analysis: norms and residual additions fix widths
        growable(TinyGPT(), streams=False)


def test_the_users_rng_is_untouched():
    model = TinyGPT()
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        growable(model)  # building the growable twins draws their initial values from a forked RNG
    assert torch.equal(torch.rand(3), expected)


def test_training_step_after_conversion_matches_the_original():
    """Gradients through the converted model equal the original's (float64, 1e-12)."""
    torch.manual_seed(12)
    model = TinyGPT().double()
    reference = copy.deepcopy(model)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        growable(model)
    idx = tokens(vocab=13)
    F.cross_entropy(reference(idx).flatten(0, 1), idx.flatten()).backward()
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    torch.testing.assert_close(model.tok.weight.grad[:, :8], reference.tok.weight.grad, **TOL)
    torch.testing.assert_close(model.blocks[0].fc1.weight.grad[:16, :8], reference.blocks[0].fc1.weight.grad, **TOL)
    attn, ref_attn = model.blocks[1].attn, reference.blocks[1].attn
    torch.testing.assert_close(attn.active_tensor("in_proj_weight"), ref_attn.in_proj_weight, rtol=0, atol=0)
    torch.testing.assert_close(attn.in_proj_weight.grad.view(3, 16, 16)[:, :8, :8].reshape(24, 8),
                               ref_attn.in_proj_weight.grad, **TOL)
