"""What each rank runs in tests/test_lightning_distributed.py: Lightning's Trainer, 2 gloo processes.

The processes are started by ``fsdp_helpers.spawn`` (file store, barrier, collected
cycles, destroyed group, ``os._exit``: test_ddp.py's clean teardown). Each sets
``LOCAL_RANK`` so that Lightning takes them as launched externally and uses the process
group that is already there instead of starting its own (no re-run script, no port).

Each rank writes what it saw to ``<out>/<kind>-rank<r>.pt``; the test compares the files.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

import growdense
from growdense import GrowLinear, GrowthEvent, GrowthSchedule, growable, sharded
from growdense.lightning import GrowthCallback

WORLD = 2
STEPS, BATCH = 3, 8  # per rank and epoch; a single process takes batches of WORLD * BATCH
EPOCHS = 4
GROWN = [{"0": 8, "2": 4}, {"0": 16, "2": 8}, {"0": 32, "2": 16}, {"0": 32, "2": 16}]  # widths at each epoch


def data(rank: Optional[int] = None) -> torch.utils.data.DataLoader:
    """STEPS * WORLD * BATCH samples of a learnable regression (float64), in order.

    Rank r gets the samples r, r + 2, ... in batches of BATCH (a DistributedSampler
    without shuffling: Lightning's own would shuffle the training set); the two ranks'
    k-th batches together are the single process's (``rank=None``) k-th batch of
    ``WORLD * BATCH``.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * WORLD * BATCH, 16, generator=gen, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(16, 12, generator=gen, dtype=torch.float64)) @ torch.randn(
        12, 3, generator=gen, dtype=torch.float64
    )
    dataset = torch.utils.data.TensorDataset(x, y)
    if rank is None:
        return torch.utils.data.DataLoader(dataset, batch_size=WORLD * BATCH, shuffle=False)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=WORLD, rank=rank, shuffle=False)
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, sampler=sampler)


def schedule() -> GrowthSchedule:
    return GrowthSchedule(
        {"0": 8, "2": 4},
        [GrowthEvent(1, grow_by={"0": 8, "2": 4}), GrowthEvent(2, grow_by={"0": 16, "2": 8})],
    )


class Regressor(pl.LightningModule):
    """16 -> 8 -> 4 -> 3, growable to 32 and 16 (float64); ``shard``: FSDP2 in ``configure_model``."""

    def __init__(self, shard: bool = False, optimizer: str = "growdense") -> None:
        super().__init__()
        self.optimizer_kind = optimizer
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(16, 8, dtype=torch.float64), nn.ReLU(),
            nn.Linear(8, 4, dtype=torch.float64), nn.ReLU(),
            nn.Linear(4, 3, dtype=torch.float64),
        )
        self.wiring = growable(self.net, 4.0)
        self.shard = shard
        self.seen: list[tuple[int, int, dict, list[int]]] = []  # (epoch, id(optimizer), widths, ids of Parameters)
        self.losses: list[float] = []
        self.at_start: dict = {}

    def configure_model(self) -> None:
        if not self.shard or sharded.is_sharded(self.net[0].weight):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, GrowLinear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def on_train_start(self) -> None:  # after a checkpoint was restored
        self.at_start = snapshot(self, self.trainer.optimizers[0])

    def on_train_epoch_start(self) -> None:  # after the callbacks' hook of the same name
        self.seen.append((self.current_epoch, id(self.trainer.optimizers[0]), self.wiring.widths(),
                          [id(p) for p in self.parameters()]))

    def configure_optimizers(self):
        if self.optimizer_kind == "growdense":  # each neuron its own step count: state beyond tensors
            return growdense.optim.Adam(self.parameters(), lr=1e-2)
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if sharded.is_sharded(t) else t).detach().clone()


def snapshot(module: Regressor, optimizer) -> dict:
    """Whole parameters and Adam state (gathered from the shards), and the widths."""
    out: dict = {"widths": module.wiring.widths()}
    for name, p in module.net.named_parameters():
        out[name] = full(p)
        for key, value in optimizer.state.get(p, {}).items():
            out[f"{name}.{key}"] = full(value) if isinstance(value, torch.Tensor) else value
    return out


def trainer(strategy, out_dir: str, epochs: int, callbacks, devices: int = WORLD, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
        callbacks=callbacks,
        use_distributed_sampler=False,
        **kwargs,
    )


def callback(seed: int) -> GrowthCallback:
    return GrowthCallback(schedule(), init="he", generator=torch.Generator().manual_seed(seed), optimizer_state="keep")


def strategy_of(kind: str):
    if kind == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    return ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1, process_group_backend="gloo")


def run(rank: int, out_dir: str, kind: str) -> None:
    """Straight through 4 epochs (checkpoint each epoch), then resumed from epoch 1's checkpoint
    (growdense's Adam), then 2 epochs with no growth generator (torch's Adam)."""
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(WORLD))
    warnings.filterwarnings("ignore", category=UserWarning)  # Lightning's advice on workers and such
    warnings.filterwarnings("ignore", category=FutureWarning)
    ckpt_dir = os.path.join(out_dir, "ckpt")
    result: dict = {}

    # 1. Straight through, growing at epochs 1 and 2.
    module = Regressor(shard=kind == "fsdp2")
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1)
    fit = trainer(strategy_of(kind), out_dir, EPOCHS, [callback(1), checkpoints])
    fit.fit(module, data(rank))
    result["straight"] = {
        "seen": module.seen,
        "losses": module.losses,
        "optimizer": id(fit.optimizers[0]),
        "wiring_optimizer": id(module.wiring.optimizer),
        "sharded": sharded.is_sharded(module.net[0].weight),
        "end": snapshot(module, fit.optimizers[0]),
        "checkpoints": sorted(os.listdir(ckpt_dir)),
    }

    # 2. A fresh model at the initial widths resumes from the checkpoint written after epoch 1
    #    (grown once); the callback's generator, seeded otherwise, gets the saved state back.
    (path,) = [os.path.join(ckpt_dir, n) for n in os.listdir(ckpt_dir) if n.startswith("epoch=1-")]
    resumed = Regressor(shard=kind == "fsdp2")
    fresh_widths = resumed.wiring.widths()
    fit = trainer(strategy_of(kind), out_dir, EPOCHS, [callback(999)], enable_checkpointing=False)
    fit.fit(resumed, data(rank), ckpt_path=path)
    result["resumed"] = {
        "fresh_widths": fresh_widths,
        "seen": resumed.seen,
        "at_start": resumed.at_start,
        "losses": resumed.losses,
        "end": snapshot(resumed, fit.optimizers[0]),
    }
    if kind == "ddp":
        result["checkpoint"] = torch.load(path, weights_only=False, map_location="cpu")

    # 3. No generator: rank 0's new weights are broadcast (DDP), or each rank draws the rows it holds (FSDP2).
    module = Regressor(shard=kind == "fsdp2", optimizer="torch")
    fit = trainer(strategy_of(kind), out_dir, 2, [GrowthCallback(schedule(), optimizer_state="reset")],
                  enable_checkpointing=False)
    fit.fit(module, data(rank))
    result["default"] = {"seen": module.seen, "end": snapshot(module, fit.optimizers[0])}
    torch.save(result, os.path.join(out_dir, f"{kind}-rank{rank}.pt"))


def run_ddp(rank: int, out_dir: str) -> None:
    run(rank, out_dir, "ddp")


def run_fsdp2(rank: int, out_dir: str) -> None:
    run(rank, out_dir, "fsdp2")


def single_process(out_dir: str) -> dict:
    """The reference: one process, batches of WORLD * BATCH, the same growth generator."""
    module = Regressor()
    fit = trainer("auto", out_dir, EPOCHS, [callback(1)], devices=1, enable_checkpointing=False)
    fit.fit(module, data())
    return {"seen": module.seen, "losses": module.losses, "end": snapshot(module, fit.optimizers[0])}
