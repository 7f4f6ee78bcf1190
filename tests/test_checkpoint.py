"""Checkpoints: bit-exact resume mid-schedule, atomic writes, clear capacity errors."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from growdense import GrowthSchedule
from growdense.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from grow_helpers import TinyEncoder, assert_same, snapshot

EPOCHS = 8
# 8/6 wide, cut to 3/2 at epoch 2 and regrown by 2/2 every 2 epochs: events at 2, 4, 6.
SCHEDULE = GrowthSchedule.prune_then_regrow(["h1", "h2"], full=(8, 6), cut_to=(3, 2), step=(2, 2), at=2, every=2)

OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
}


class Run:
    """A small training run that uses every source of randomness a real one does."""

    def __init__(self, opt_name: str, seed: int):
        torch.manual_seed(seed)
        widths = SCHEDULE.initial_widths()
        self.model = TinyEncoder(d_in=6, h1=widths["h1"], h2=widths["h2"], latent=3, cap1=8, cap2=6)
        self.optimizer = OPTIMIZERS[opt_name](self.model.parameters())
        self.wiring = self.model.wiring(self.optimizer)
        self.growth = torch.Generator().manual_seed(seed + 1)
        self.data_order = torch.Generator().manual_seed(seed + 2)
        data = torch.Generator().manual_seed(99)  # the data set itself is fixed
        self.x = torch.randn(64, 6, generator=data)
        self.y = torch.randn(64, 6, generator=data)

    def epoch(self, epoch: int) -> list[torch.Tensor]:
        SCHEDULE.apply(epoch, self.wiring, init="he", keep="norm", generator=self.growth)
        losses = []
        for batch in torch.randperm(64, generator=self.data_order).split(16):
            self.optimizer.zero_grad()
            out = self.model(self.x[batch])
            noise = 0.01 * torch.randn_like(out)  # global RNG, like a VAE's sampling
            loss = F.mse_loss(out + noise, self.y[batch])
            loss.backward()
            self.optimizer.step()
            losses.append(loss.detach())
        return losses

    def save(self, path, next_epoch: int) -> None:
        save_checkpoint(
            path, self.model, self.optimizer, wiring=self.wiring,
            generators={"growth": self.growth, "data_order": self.data_order}, extra={"epoch": next_epoch},
        )

    def load(self, path) -> int:
        extra = load_checkpoint(
            path, self.model, self.optimizer, wiring=self.wiring,
            generators={"growth": self.growth, "data_order": self.data_order},
        )
        return extra["epoch"]


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("stop_after", [2, 3])  # right after a cut-and-regrow epoch; between events
def test_resume_is_bit_exact(tmp_path, opt, stop_after):
    full = Run(opt, seed=0)
    reference = [loss for epoch in range(EPOCHS) for loss in full.epoch(epoch)]

    first = Run(opt, seed=0)
    for epoch in range(stop_after + 1):
        first.epoch(epoch)
    path = tmp_path / "ckpt.pt"
    first.save(path, next_epoch=stop_after + 1)
    del first

    # A fresh process would build everything anew, at the schedule's initial widths and
    # with other random values; the checkpoint must bring back all of it.
    torch.manual_seed(12345)
    resumed = Run(opt, seed=7)
    start = resumed.load(path)
    assert start == stop_after + 1
    assert resumed.wiring.widths() == SCHEDULE.widths_at(stop_after)
    losses = [loss for epoch in range(start, EPOCHS) for loss in resumed.epoch(epoch)]

    assert torch.equal(torch.stack(losses), torch.stack(reference[4 * start :]))
    assert_same(snapshot(resumed.model, resumed.optimizer), snapshot(full.model, full.optimizer))


def test_resume_without_rng_state_diverges(tmp_path):
    # Shows the bit-exact test can fail: forgetting the data-order generator changes the losses.
    full = Run("adam", seed=0)
    reference = [loss for epoch in range(EPOCHS) for loss in full.epoch(epoch)]
    first = Run("adam", seed=0)
    for epoch in range(3):
        first.epoch(epoch)
    save_checkpoint(tmp_path / "c.pt", first.model, first.optimizer, generators={"growth": first.growth})
    resumed = Run("adam", seed=7)
    load_checkpoint(tmp_path / "c.pt", resumed.model, resumed.optimizer, generators={"growth": resumed.growth})
    losses = [loss for epoch in range(3, EPOCHS) for loss in resumed.epoch(epoch)]
    assert not torch.equal(torch.stack(losses), torch.stack(reference[12:]))


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    run = Run("adam", seed=0)
    run.epoch(0)
    path = tmp_path / "ckpt.pt"
    run.save(path, next_epoch=1)
    good = path.read_bytes()
    run.epoch(1)

    real_save = torch.save

    def dying_save(obj, file, *args, **kwargs):
        real_save(obj, file, *args, **kwargs)
        file.truncate(100)  # half-written, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run.save(path, next_epoch=2)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    assert Run("adam", seed=3).load(path) == 1


def test_other_capacity_fails_clearly_and_changes_nothing(tmp_path):
    run = Run("adam", seed=0)
    run.epoch(0)
    run.save(tmp_path / "c.pt", next_epoch=1)
    torch.manual_seed(0)
    other = TinyEncoder(d_in=6, h1=8, h2=6, latent=3, cap1=16, cap2=6)  # h1 capacity 16, not 8
    opt = torch.optim.Adam(other.parameters())
    before = snapshot(other, opt)
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointError, match=r"enc1.weight: the checkpoint has shape \(8, 6\), the model \(16, 6\)"):
        load_checkpoint(tmp_path / "c.pt", other, opt)
    assert_same(snapshot(other, opt), before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_mismatched_optimizer_fails_before_loading(tmp_path):
    run = Run("adam", seed=0)
    run.epoch(0)
    run.save(tmp_path / "c.pt", next_epoch=1)
    fresh = Run("adam", seed=5)
    small_opt = torch.optim.Adam(list(fresh.model.parameters())[:4])
    before = snapshot(fresh.model)
    with pytest.raises(CheckpointError, match="parameter groups of sizes"):
        load_checkpoint(tmp_path / "c.pt", fresh.model, small_opt)
    assert_same(snapshot(fresh.model), before)


def test_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a growdense checkpoint"):
        load_checkpoint(tmp_path / "x.pt", TinyEncoder())


def test_missing_generator(tmp_path):
    run = Run("adam", seed=0)
    save_checkpoint(tmp_path / "c.pt", run.model)
    with pytest.raises(CheckpointError, match=r"generators \['growth'\]"):
        load_checkpoint(tmp_path / "c.pt", run.model, generators={"growth": torch.Generator()})
