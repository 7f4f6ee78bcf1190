"""GrowthCallback: a real Lightning Trainer grows a growable() model mid-fit and resumes."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from growdense import GrowLinear, GrowthEvent, GrowthSchedule, growable  # noqa: E402
from growdense.lightning import GrowthCallback  # noqa: E402

EPOCHS, STEPS, BATCH = 4, 8, 32


def data(seed=0):
    """A learnable regression: targets from a fixed random teacher network."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(STEPS * BATCH, 16, generator=gen)  # STEPS batches an epoch
    teacher = torch.tanh(x @ torch.randn(16, 12, generator=gen)) @ torch.randn(12, 3, generator=gen)
    dataset = torch.utils.data.TensorDataset(x, teacher)
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=False)


class Regressor(pl.LightningModule):
    def __init__(self, capacity=4.0):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
        self.wiring = growable(self.net, capacity)  # a plain attribute: not a submodule
        self.losses: list[float] = []
        self.seen: list[tuple[int, object, dict]] = []  # (epoch, the trainer's optimizer, widths)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def on_train_epoch_start(self):  # runs after the callbacks' hook of the same name
        self.seen.append((self.current_epoch, self.trainer.optimizers[0], self.wiring.widths()))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def schedule():
    # Widths "0" and "2" (the producers' names in the Sequential) grow at epochs 1 and 2.
    return GrowthSchedule(
        {"0": 8, "2": 4},
        [GrowthEvent(1, grow_by={"0": 8, "2": 4}), GrowthEvent(2, grow_by={"0": 16, "2": 8})],
    )


def trainer(tmp_path, epochs, **kwargs):
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_grows_twice_mid_fit_with_the_same_optimizer(tmp_path):
    module = Regressor()
    callback = GrowthCallback(schedule(), init="zero_out")
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer(tmp_path, EPOCHS, callbacks=[callback, checkpoints]).fit(module, data())

    assert [(e, w) for e, _, w in module.seen] == [
        (0, {"0": 8, "2": 4}),
        (1, {"0": 16, "2": 8}),
        (2, {"0": 32, "2": 16}),
        (3, {"0": 32, "2": 16}),
    ]
    optimizer = module.seen[0][1]
    assert all(seen is optimizer for _, seen, _ in module.seen)  # the same object: never rebuilt
    assert module.trainer.optimizers[0] is optimizer and module.wiring.optimizer is optimizer
    # The Parameters the optimizer holds are the model's, still, after two growths.
    held = {id(p) for group in module.wiring.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in module.parameters()}
    # New neurons were trained: their incoming rows moved away from the He draw's zero bias.
    assert module.net[0].bias[8:32].abs().sum() > 0

    # The loss keeps falling: each epoch's mean is below the previous one.
    per_epoch = torch.tensor(module.losses).view(EPOCHS, STEPS).mean(1)
    assert (per_epoch[1:] < per_epoch[:-1]).all(), per_epoch
    assert len(list((tmp_path / "ckpt").glob("*.ckpt"))) == EPOCHS


def test_checkpoint_resumes_with_the_grown_widths(tmp_path):
    module = Regressor()
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer(tmp_path, 2, callbacks=[GrowthCallback(schedule(), init="zero_out"), checkpoints]).fit(module, data())
    (path,) = [p for p in (tmp_path / "ckpt").glob("*.ckpt") if "epoch=1" in p.name]
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert saved["net.0._extra_state"]["out_features"] == 16

    # A fresh model at the initial widths resumes at epoch 2 with the widths of epoch 1.
    resumed = Regressor()
    assert resumed.wiring.widths() == {"0": 8, "2": 4}
    callback = GrowthCallback(schedule(), init="zero_out")
    trainer(tmp_path, 4, enable_checkpointing=False, callbacks=[callback]).fit(resumed, data(), ckpt_path=str(path))
    assert [(e, w) for e, _, w in resumed.seen] == [(2, {"0": 32, "2": 16}), (3, {"0": 32, "2": 16})]
    state = resumed.trainer.optimizers[0].state[resumed.net[0].weight]
    assert state["exp_avg"].shape == (32, 16) and state["step"].item() == 4 * STEPS  # Adam's state restored
    # Widths grown from the checkpoint's: the schedule's check (widths before epoch 2) passed.
    assert isinstance(resumed.net[0], GrowLinear) and resumed.net[0].out_features == 32


def test_user_function_gets_trainer_module_and_epoch(tmp_path):
    calls = []

    def grow(trainer_, module, epoch):
        calls.append((epoch, module.wiring.optimizer is trainer_.optimizers[0]))
        if epoch == 1:
            module.wiring.grow("0", 4)

    module = Regressor()
    trainer(tmp_path, 2, enable_checkpointing=False, callbacks=[GrowthCallback(grow)]).fit(module, data())
    assert calls == [(0, True), (1, True)]
    assert module.wiring.widths() == {"0": 12, "2": 4}


class BuiltTooEarly(Regressor):
    def __init__(self):
        pl.LightningModule.__init__(self)
        self.net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
        self.optimizer = torch.optim.Adam(self.net.parameters())  # holds the nn.Linear Parameters
        self.wiring = growable(self.net)
        self.losses, self.seen = [], []

    def configure_optimizers(self):
        return self.optimizer


def test_optimizer_built_before_growable_is_refused(tmp_path):
    module = BuiltTooEarly()
    with pytest.raises(RuntimeError, match="after growdense.growable"):
        trainer(tmp_path, 1, enable_checkpointing=False, callbacks=[GrowthCallback(schedule())]).fit(module, data())


def test_missing_wiring_is_a_clear_error(tmp_path):
    module = Regressor()
    module.wiring = None
    with pytest.raises(RuntimeError, match="found no Wiring"):
        trainer(tmp_path, 1, enable_checkpointing=False, callbacks=[GrowthCallback(schedule())]).fit(module, data())


@pytest.mark.parametrize(
    "bad,match",
    [
        (GrowthSchedule({"h1": 8}, [GrowthEvent(1, grow_by={"h1": 8})]), r"\['h1'\] are not in the model's Wiring"),
        (GrowthSchedule({"0": 16, "2": 4}, [GrowthEvent(1, grow_by={"0": 8})]), "are not the schedule's"),
    ],
)
def test_schedule_that_does_not_fit_the_model_fails_before_training(tmp_path, bad, match):
    module = Regressor()
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, 2, enable_checkpointing=False, callbacks=[GrowthCallback(bad)]).fit(module, data())
    assert module.losses == [] and module.wiring.widths() == {"0": 8, "2": 4}


def test_event_not_applied_twice_in_one_epoch():
    """A run resumed from a mid-epoch checkpoint starts that epoch again: no second growth."""
    module = Regressor()
    optimizer = module.configure_optimizers()
    fake = types.SimpleNamespace(current_epoch=1, optimizers=[optimizer], world_size=1)
    callback = GrowthCallback(schedule(), module.wiring, init="zero_out")
    callback.on_train_epoch_start(fake, module)
    callback.on_train_epoch_start(fake, module)
    assert module.wiring.widths() == {"0": 16, "2": 8}
    assert module.wiring.optimizer is optimizer


def test_bad_arguments():
    with pytest.raises(TypeError, match="GrowthSchedule or a function"):
        GrowthCallback(3)
    with pytest.raises(TypeError, match="growdense.Wiring"):
        GrowthCallback(schedule(), wiring="h1")


@pytest.mark.parametrize("kwargs, match", [
    ({"init": "bogus"}, "unknown init"),
    ({"keep": "bogus"}, "unknown keep"),
    ({"keep": {"0": "bogus"}}, "unknown keep"),
    ({"keep": {"h9": "first"}}, "not in the schedule"),
    ({"optimizer_state": "bogus"}, "unknown optimizer_state"),
    ({"split_noise": -1.0}, "split_noise"),
])
def test_bad_policies_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GrowthCallback(schedule(), **kwargs)


def test_the_fallback_warning_names_what_the_callback_can_change(tmp_path):
    """torch.optim.Adam cannot give new neurons their own step count: the one warning says so in
    the callback's terms (its optimizer_state argument, configure_optimizers), briefly."""
    module = Regressor()
    with pytest.warns(UserWarning) as caught:
        trainer(tmp_path, 2, callbacks=[GrowthCallback(schedule(), init="zero_out")]).fit(module, data())
    ours = [str(w.message) for w in caught if "step count" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    (message,) = ours
    assert "GrowthCallback(..., optimizer_state='keep_global_step' or 'reset')" in message
    assert "growdense.optim.Adam from configure_optimizers" in message
    assert "grow(), GrowthSchedule.apply() or Wiring()" not in message and len(message) < 300
    assert module.wiring.widths() == {"0": 16, "2": 8}
    # choosing a policy silences it
    module = Regressor()
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error", UserWarning)
        callback = GrowthCallback(schedule(), init="zero_out", optimizer_state="reset")
        trainer(tmp_path / "b", 2, callbacks=[callback]).fit(module, data())


def test_the_generator_state_rides_in_the_checkpoint(tmp_path):
    """A resumed run draws what an uninterrupted one would: the callback saves its generator's state."""
    module = Regressor()
    generator = torch.Generator().manual_seed(5)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    callback = GrowthCallback(schedule(), init="he", generator=generator, optimizer_state="reset")
    trainer(tmp_path, 2, callbacks=[callback, checkpoints]).fit(module, data())
    (path,) = [p for p in (tmp_path / "ckpt").glob("*.ckpt") if "epoch=1" in p.name]
    saved = torch.load(path, weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("GrowthCallback")]
    assert torch.equal(state["generator"], generator.get_state())  # after epoch 1's growth drew from it
    other = GrowthCallback(schedule(), generator=torch.Generator().manual_seed(123))
    other.load_state_dict(state)
    assert torch.equal(other.generator.get_state(), generator.get_state())
