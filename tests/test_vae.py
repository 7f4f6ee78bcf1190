"""The VAE, its loss and its probabilistic evaluation (growdense.models)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from growdense.models import VAE, elbo_estimates, elbo_variance, iwae_bound, negative_elbo
from growdense.schedule import GrowthSchedule

from mnist_data import DATA, candidates

# The study's Tables 1 and 2: widths (h1, h2) after each growth event.
TABLE1 = [(32, 16), (64, 32), (96, 48), (128, 64), (160, 80), (192, 96), (224, 112), (256, 128)]
TABLE2 = [(256, 128)] + TABLE1[1:]


def test_loss_equals_hand_computation():
    # 2 pixels, 1 latent, L = 2 samples, one image.
    x = torch.tensor([[1.0, 0.25]], dtype=torch.float64)
    logits = torch.tensor([[[0.5, -1.0]], [[2.0, 0.0]]], dtype=torch.float64)  # (L=2, B=1, D=2)
    mu = torch.tensor([[0.3]], dtype=torch.float64)
    logvar = torch.tensor([[-0.5]], dtype=torch.float64)

    def bce(t, logit):
        p = 1.0 / (1.0 + math.exp(-logit))
        return -(t * math.log(p) + (1.0 - t) * math.log(1.0 - p))

    rec = 0.5 * ((bce(1.0, 0.5) + bce(0.25, -1.0)) + (bce(1.0, 2.0) + bce(0.25, 0.0)))
    kl = -0.5 * (1.0 - 0.5 - 0.3**2 - math.exp(-0.5))
    got = negative_elbo(x, logits, mu, logvar)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(rec + kl, rel=1e-12)


def test_model_loss_is_the_per_image_negative_elbo():
    torch.manual_seed(0)
    model = VAE(32, 16)
    x = torch.rand(5, 784)
    g = torch.Generator().manual_seed(1)
    logits, mu, logvar = model(x, 3, g)
    assert logits.shape == (3, 5, 784) and mu.shape == (5, 20) and logvar.shape == (5, 20)
    loss = model.loss(x, 3, torch.Generator().manual_seed(1))
    assert loss.item() == pytest.approx(negative_elbo(x, logits, mu, logvar).mean().item(), rel=1e-6)
    # same as the study's formula with the sigmoid output and a plain BCE
    p = torch.sigmoid(logits)
    bce = -(x * p.log() + (1 - x) * (1 - p).log()).sum(-1).mean(0)
    kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(-1)
    assert loss.item() == pytest.approx((bce + kl).mean().item(), rel=1e-5)
    loss.backward()
    assert model.enc1.weight.grad[32:].abs().sum() == 0  # nothing outside the active block


def test_structure_and_parameter_count():
    model = VAE()  # the study's target structure
    assert model.widths() == (256, 128)
    full = 784 * 256 + 256 + 256 * 128 + 128 + 2 * (128 * 20 + 20) + 20 * 128 + 128 + 128 * 256 + 256 + 256 * 784 + 784
    assert model.num_parameters() == full
    small = VAE(32, 16)
    assert small.enc1.capacity_out == 256 and small.mu_head.capacity_in == 128
    assert small.wiring.widths() == {"h1": 32, "h2": 16}
    with pytest.raises(ValueError):
        VAE(300, 16)


@pytest.mark.parametrize("approach", ["1", "2"])
def test_widths_follow_tables_1_and_2_at_every_epoch(approach):
    from growdense.experiments.reproduce import ReproduceConfig, RunSpec, make_schedule

    cfg = ReproduceConfig()  # the study: 200 epochs, growth every 25
    schedule = make_schedule(RunSpec(approach), cfg)
    table = TABLE1 if approach == "1" else TABLE2
    assert schedule.growth_epochs() == [25, 50, 75, 100, 125, 150, 175]
    w0 = schedule.initial_widths()
    model = VAE(w0["h1"], w0["h2"])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.attach_optimizer(optimizer)
    g = torch.Generator().manual_seed(0)
    for epoch in range(cfg.epochs):
        schedule.apply(epoch, model.wiring, init="he", keep="first", generator=g)
        expected = table[min(epoch // 25, 7)]
        assert model.widths() == expected, epoch
        assert (schedule.widths_at(epoch)["h1"], schedule.widths_at(epoch)["h2"]) == expected
    x = torch.rand(4, 784)
    assert torch.isfinite(model.loss(x, 2))


def _toy_data(n: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    prototypes = (torch.rand(8, 784, generator=g) > 0.7).float()
    idx = torch.randint(0, 8, (n,), generator=g)
    flip = torch.rand(n, 784, generator=g) < 0.05
    return (prototypes[idx] + flip.float()).remainder(2.0)


@pytest.fixture(scope="module")
def toy_model() -> tuple[VAE, torch.Tensor]:
    torch.manual_seed(0)
    x = _toy_data()
    model = VAE(32, 16, capacity=(32, 16), latent=4, decoder=(32, 64))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(150):
        xb = x[(step * 64) % 256 : (step * 64) % 256 + 64]
        loss = model.loss(xb, 1, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, x[:64]


def test_iwae_bound_is_above_the_elbo_and_tightens_with_k(toy_model):
    model, x = toy_model
    elbo = elbo_estimates(model, x, 500, generator=torch.Generator().manual_seed(1))[0].mean().item()
    bounds = {k: iwae_bound(model, x, k, generator=torch.Generator().manual_seed(2 + k)).mean().item()
              for k in (1, 10, 100, 1000)}
    assert bounds[1] == pytest.approx(elbo, abs=1.0)  # K = 1 is a one-sample ELBO
    assert elbo < bounds[10] < bounds[100] < bounds[1000]
    assert bounds[1000] >= elbo


def test_elbo_variance_decreases_with_l(toy_model):
    model, x = toy_model
    rows = elbo_variance(model, x[:32], (1, 10, 100), repeats=8, generator=torch.Generator().manual_seed(3))
    assert [r["L"] for r in rows] == [1, 10, 100]
    assert rows[0]["var"] > rows[1]["var"] > rows[2]["var"]
    # the KL is analytic, the reconstruction term an average of L draws: variance ~ 1/L
    assert rows[0]["var"] / rows[2]["var"] == pytest.approx(100, rel=0.6)


def test_missing_mnist_says_where_it_looked(tmp_path):
    pytest.importorskip("torchvision")
    from growdense.experiments.data import MnistNotFoundError, load_mnist

    with pytest.raises(MnistNotFoundError) as info:
        load_mnist(tmp_path)
    msg = str(info.value)
    assert str((tmp_path / "MNIST" / "raw").resolve()) in msg and "--data-dir" in msg and "download=True" in msg


@pytest.mark.skipif(not (DATA / "MNIST" / "raw").is_dir(), reason=f"MNIST not found in {[str(c) for c in candidates()]}")
def test_mnist_loads_as_flat_floats():
    pytest.importorskip("torchvision")
    from growdense.experiments.data import load_mnist

    train, test = load_mnist(DATA, train_subset=100, test_subset=10)
    assert train.shape == (100, 784) and test.shape == (10, 784)
    assert train.dtype == torch.float32 and 0 <= train.min() and train.max() <= 1
