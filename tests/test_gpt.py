"""growdense.models.GPT: against its plain-PyTorch twin, growth of every width, rebuilding, the example runner."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import growdense
from growdense.models.gpt import GPT, PlainGPT, plain_from_grow, rebuild_grown

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "grow_gpt.py"
V, T, B = 24, 12, 3


def small(dtype=torch.float64, seed=0, **sizes) -> GPT:
    torch.manual_seed(seed)
    kw = dict(n_layer=2, d_model=16, n_head=2, d_ff=32, capacity_d_model=32, capacity_heads=4, capacity_d_ff=64)
    kw.update(sizes)
    return GPT(V, T, dtype=dtype, **kw)


def tokens(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def loss_of(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))


def train(model, opt, steps, seed=5):
    for i in range(steps):
        x, y = tokens(seed + i)
        loss = loss_of(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.ramp_step()


def test_forward_and_gradients_match_plain_twin_before_and_after_growth():
    # float64 on both sides, the same weights: agreement to rounding (1e-10 absolute on O(1) logits).
    model = small()
    x, y = tokens()
    for stage in range(3):
        plain = plain_from_grow(model)
        assert plain.sizes["d_model"] == model.d_model
        ours, ref = model(x), plain(x)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
        loss_of(model, x, y).backward()
        loss_of(plain, x, y).backward()
        torch.testing.assert_close(model.blocks[1].fc1.weight.grad[: model.widths()["d_ff"], : model.d_model],
                                   plain.blocks[1].fc1.weight.grad, rtol=0, atol=1e-10)
        torch.testing.assert_close(model.tok_emb.weight.grad[:, : model.d_model], plain.tok_emb.weight.grad,
                                   rtol=0, atol=1e-10)
        in_proj = model.blocks[0].attn.in_proj_weight
        inner = model.widths()["heads"] * model.head_dim
        got = in_proj.grad.view(3, 4 * model.head_dim, 32)[:, :inner, : model.d_model].reshape(3 * inner, -1)
        torch.testing.assert_close(got, plain.blocks[0].attn.in_proj.weight.grad, rtol=0, atol=1e-10)
        model.zero_grad()
        if stage < 2:
            model.grow(8, 1, 16, init="he")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_zero_out_growth_of_every_width_keeps_the_output(dtype, tol):
    # The bound: 1e-6 (float32) / 1e-12 (float64) absolute, logits of O(1).
    model = small(dtype)
    opt = growdense.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, 3)  # norms, biases and embeddings away from their initial values
    x, _ = tokens()
    with torch.no_grad():
        before = model(x)
        model.grow(16, 2, 32, init="zero_out", generator=torch.Generator().manual_seed(0))
        after = model(x)
    assert model.widths() == {"d_model": 32, "heads": 4, "d_ff": 64}
    assert (after - before).abs().max().item() <= tol


def test_growth_keeps_storage_and_the_outside_zero_through_training():
    model = small(torch.float32)
    opt = growdense.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, 2)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    model.grow(8, 1, 16)
    train(model, opt, 3)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    # Outside the active part everything is zero: weights, gradients, Adam's moments.
    for m in model.modules():
        if isinstance(m, growdense.GrowLinear):
            for t in (m.weight.detach(), m.weight.grad, opt.state[m.weight]["exp_avg"],
                      opt.state[m.weight]["exp_avg_sq"]):
                outside = t.clone()
                outside[: m.out_features, : m.in_features] = 0
                assert torch.count_nonzero(outside) == 0
        elif hasattr(m, "tensor_layout"):
            for path, dims in m.tensor_layout().items():
                t = m._tensor(path)
                for what in (t.detach(), t.grad, opt.state[t]["exp_avg"], opt.state[t]["exp_avg_sq"]):
                    outside = what.clone().view(m._factored_shape(dims))
                    outside[m._region(dims)] = 0
                    assert torch.count_nonzero(outside) == 0, path
                    assert torch.count_nonzero(what) > 0, path


def test_grow_validates_before_changing_anything():
    model = small()
    before = model.widths()
    x, _ = tokens()
    y0 = model(x)
    with pytest.raises(ValueError, match="capacity_d_ff of at least 96"):
        model.grow(4, 1, 64)  # d_ff 32 + 64 > 64; d_model and heads would fit
    with pytest.raises(ValueError, match="init"):
        model.grow(4, init="bogus")
    with pytest.raises(ValueError, match="int >= 0"):
        model.grow(-1)
    assert model.widths() == before
    torch.testing.assert_close(model(x), y0, rtol=0, atol=0)


def test_in_place_growth_trains_as_rebuilding_with_zero_padded_moments():
    # growdense's in place growth with the same AdamW and a rebuild with its moments
    # zero-padded (MSG's way) are the same training algorithm: given the same new weights
    # (the rebuild's new slices are overwritten by the grown model's) they give the same
    # models after further steps (float64: 1e-9 on parameters that moved ~1e-2).
    model = small()
    plain = plain_from_grow(model)
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01)
    opt = growdense.optim.AdamW(model.parameters(), **hyper)
    popt = torch.optim.AdamW(plain.parameters(), **hyper)
    train(model, opt, 3)
    train(plain, popt, 3)
    model.grow(8, 1, 16, init="zero_out", ramp_steps=4, generator=torch.Generator().manual_seed(0),
               optimizer=opt, optimizer_state="keep_global_step")
    plain, popt = rebuild_grown(plain, popt, 8, 1, 16, ramp_steps=4, generator=torch.Generator().manual_seed(0))
    x, _ = tokens()
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=1e-12)  # both kept the function
    with torch.no_grad():  # the same new weights on both sides
        for p, q in zip(plain.parameters(), plain_from_grow(model).parameters()):
            p.copy_(q)
    assert all(isinstance(v, torch.Tensor) for v in popt.state[plain.head.weight].values())
    train(model, opt, 5)
    train(plain, popt, 5)
    for (name, p), q in zip(plain.named_parameters(), plain_from_grow(model).parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-9, msg=name)


def test_rebuild_grown_pads_moments_and_copies_weights():
    model = small()
    plain = plain_from_grow(model)
    popt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    train(plain, popt, 2)
    old_q = plain.blocks[0].attn.in_proj.weight.detach().view(3, 16, 16).clone()
    old_m = popt.state[plain.blocks[0].attn.in_proj.weight]["exp_avg"].view(3, 16, 16).clone()
    new, nopt = rebuild_grown(plain, popt, 16, 2, 32)
    w = new.blocks[0].attn.in_proj.weight.detach().view(3, 32, 32)
    m = nopt.state[new.blocks[0].attn.in_proj.weight]["exp_avg"].view(3, 32, 32)
    torch.testing.assert_close(w[:, :16, :16], old_q, rtol=0, atol=0)
    torch.testing.assert_close(m[:, :16, :16], old_m, rtol=0, atol=0)
    assert m[:, 16:].abs().sum() == 0 and m[:, :, 16:].abs().sum() == 0
    assert new.sizes["d_model"] == 32 and new.sizes["n_head"] == 4 and new.sizes["d_ff"] == 64
    assert nopt.state[new.head.weight]["step"] == popt.state[plain.head.weight]["step"]


def test_plain_gpt_is_a_plain_model():
    plain = PlainGPT(V, T, 1, 16, 2, 32)
    assert not any(type(m).__module__.startswith("growdense") and "gpt" not in type(m).__module__
                   for m in plain.modules())
    x, _ = tokens()
    assert plain(x).shape == (B, T, V)


def test_wiring_names_every_width():
    model = small()
    wiring = model.wiring()
    assert wiring.names() == ["residual", "heads0", "ffn0", "heads1", "ffn1"]
    assert wiring.widths() == {"residual": 16, "heads0": 2, "ffn0": 32, "heads1": 2, "ffn1": 32}
    assert {wiring.capacity(n) for n in wiring.names()} == {32, 4, 64}
    members = {type(m).__name__ for m, _, _ in wiring.members("residual")}
    assert members == {"GrowEmbedding", "GrowLayerNorm", "GrowMultiheadAttention", "GrowLinear"}


def _example():
    spec = importlib.util.spec_from_file_location("_growdense_example_grow_gpt", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_corpus_is_deterministic_text():
    example = _example()
    text = example.stdlib_docstrings()
    assert len(text) > 100_000 and text == example.stdlib_docstrings()
    ids = example.encode(text[:1000])
    assert ids.max() < len(example.VOCAB) and "".join(example.VOCAB[i] for i in ids[:50]) == text[:50]


def test_example_runs_quick(tmp_path):
    example = _example()
    payload = example.main(["--quick", "--out", str(tmp_path)])
    runs = payload["runs"]
    assert set(runs) == {"grow", "fixed", "rebuild"}
    for mode in ("grow", "rebuild"):
        events = runs[mode]["events"]
        assert [e["step"] for e in events] == [4, 8]
        assert events[-1]["widths"] == {"d_model": 32, "heads": 4, "d_ff": 64}
        assert all(e["output_change"] < 1e-5 for e in events)  # zero_out: float32 rounding only
    assert all(len(r["train_loss"]) == 12 for r in runs.values())
    assert (tmp_path / "grow_gpt.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["corpus"]["characters"] > 100_000
