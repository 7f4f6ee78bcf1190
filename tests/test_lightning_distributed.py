"""GrowthCallback under Lightning's multi-process strategies: 2 gloo processes on the CPU.

``strategy="ddp"`` (``DDPStrategy``) and FSDP2 (``ModelParallelStrategy(data_parallel_size=2,
tensor_parallel_size=1)``, the LightningModule's ``configure_model`` calling ``fully_shard``)
each run in one pair of processes (tests/lightning_workers.py; process start-up dominates
the cost): a 16 -> 8 -> 4 -> 3 float64 model grows at epochs 1 and 2 (to 32 and 16), once
straight through 4 epochs with a checkpoint every epoch, once resumed from epoch 1's
checkpoint by a fresh model at the initial widths, once with no generator. Checked:

- both ranks grow at the same epochs to the same widths; the trainer's optimizer and the
  Parameters are the same objects at every epoch (and the wiring's optimizer is the trainer's);
- the run equals a single process on the whole batch (each rank holds half of it): losses,
  parameters and Adam state within 1e-10. Float64, and the only difference is the order of
  the sums (the gradient of two half-batches averaged by the collective against one whole
  batch): ~1e-16 observed; a wrong growth or a rank with other weights moves values by ~1e-2;
- the resumed run equals the uninterrupted one bit for bit (same ranks, same operations,
  the callback's generator state restored from the checkpoint), at the grown widths, with
  the optimizer's state restored: growdense's Adam under ``optimizer_state="keep"`` (each
  neuron's own step count, which Lightning's FSDP2 loader would drop: the callback carries
  it);
- with no generator (and torch's Adam) the ranks still agree (DDP: rank 0's new weights
  are broadcast; FSDP2: each row has one owner).

FSDP1 (``strategy="fsdp"``) is refused by the callback before anything changes.
Teardown: as test_ddp.py (file store in the test's folder, barrier, collected cycles,
destroyed group, ``os._exit``), through ``fsdp_helpers.spawn``.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from fsdp_helpers import fsdp_available, spawn  # noqa: E402

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="the 2-process tests use gloo over a file store on POSIX"),
    pytest.mark.skipif(not fsdp_available(), reason="torch.distributed with gloo and FSDP2 is not available"),
    pytest.mark.skipif(not hasattr(pl.strategies, "ModelParallelStrategy"),
                       reason="this Lightning has no ModelParallelStrategy (FSDP2): Lightning >= 2.4 does"),
]

KINDS = ("ddp", "fsdp2")
TOL = 1e-10  # float64; see the module's notes


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import lightning_workers as workers

    out = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp(kind)
        spawn(getattr(workers, f"run_{kind}"), folder)
        out[kind] = [torch.load(folder / f"{kind}-rank{r}.pt", weights_only=False) for r in range(workers.WORLD)]
    out["single"] = workers.single_process(str(tmp_path_factory.mktemp("single")))
    return out


def tensors(snapshot):
    return {k: v for k, v in snapshot.items() if isinstance(v, torch.Tensor)}


def births(snapshot):
    return {k: v for k, v in snapshot.items() if k.endswith(".birth_steps")}


@pytest.mark.parametrize("kind", KINDS)
def test_both_ranks_grow_at_the_same_epochs_with_the_same_optimizer(results, kind):
    from lightning_workers import GROWN

    for rank, result in enumerate(results[kind]):
        run = result["straight"]
        assert [(epoch, widths) for epoch, _, widths, _ in run["seen"]] == list(enumerate(GROWN)), rank
        assert {optimizer for _, optimizer, _, _ in run["seen"]} == {run["optimizer"]} == {run["wiring_optimizer"]}
        assert len({tuple(params) for _, _, _, params in run["seen"]}) == 1  # the same Parameters throughout
        assert run["sharded"] == (kind == "fsdp2")  # FSDP2 did shard them
        assert run["end"]["widths"] == GROWN[-1]


@pytest.mark.parametrize("kind", KINDS)
def test_ranks_match_a_single_process(results, kind):
    from lightning_workers import STEPS

    single = results["single"]
    ranks = [r["straight"] for r in results[kind]]
    mean_loss = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]  # halves of each batch
    torch.testing.assert_close(torch.tensor(mean_loss), torch.tensor(single["losses"]), rtol=TOL, atol=TOL)
    reference = tensors(single["end"])
    assert set(tensors(ranks[0]["end"])) == set(reference)
    for key, value in reference.items():
        assert torch.equal(ranks[0]["end"][key], ranks[1]["end"][key]), key
        torch.testing.assert_close(ranks[0]["end"][key], value, rtol=TOL, atol=TOL, msg=key)
    assert reference["0.weight"][16:].abs().sum() > 0  # the second growth's neurons were drawn and trained
    assert births(ranks[0]["end"]) == births(ranks[1]["end"]) == births(single["end"])
    assert single["end"]["0.weight.birth_steps"][0] == [0] * 8 + [STEPS] * 8 + [2 * STEPS] * 16  # neurons' ages


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_resumes_at_the_grown_widths(results, kind):
    from lightning_workers import EPOCHS, GROWN, STEPS

    for rank, result in enumerate(results[kind]):
        straight, resumed = result["straight"], result["resumed"]
        assert straight["checkpoints"] == [f"epoch={e}-step={(e + 1) * STEPS}.ckpt" for e in range(EPOCHS)]
        assert resumed["fresh_widths"] == GROWN[0]
        start = resumed["at_start"]  # restored, before epoch 2's growth
        assert start["widths"] == GROWN[1], rank
        assert start["0.weight.step"].item() == 2 * STEPS and start["0.weight.exp_avg"].shape == (32, 16)
        assert start["0.weight.exp_avg"][16:].abs().sum() == 0  # beyond the width of epoch 1: zero
        assert start["0.weight.exp_avg"][8:16].abs().sum() > 0  # the first growth's neurons' state came back
        assert [(epoch, widths) for epoch, _, widths, _ in resumed["seen"]] == [(2, GROWN[2]), (3, GROWN[3])]
        for key, value in tensors(straight["end"]).items():  # bit for bit
            assert torch.equal(resumed["end"][key], value), (rank, key)
        # growdense Adam's per-neuron step counts came back (under FSDP2 through the callback)
        assert start["0.weight.birth_steps"][0] == [0] * 8 + [STEPS] * 8 + [0] * 16
        assert births(resumed["end"]) == births(straight["end"])
        assert resumed["losses"] == straight["losses"][2 * STEPS:]
    if kind == "ddp":  # a file written by rank 0: the weights restored are those saved
        saved = results[kind][0]["checkpoint"]
        assert saved["state_dict"]["net.0._extra_state"]["out_features"] == GROWN[1]["0"]
        for rank in range(2):
            start = results[kind][rank]["resumed"]["at_start"]
            for name in ("0.weight", "2.bias", "4.weight"):
                assert torch.equal(start[name], saved["state_dict"][f"net.{name}"]), (rank, name)


@pytest.mark.parametrize("kind", KINDS)
def test_without_a_generator_the_ranks_agree(results, kind):
    from lightning_workers import GROWN

    ranks = [r["default"] for r in results[kind]]
    for run in ranks:
        assert [(epoch, widths) for epoch, _, widths, _ in run["seen"]] == list(enumerate(GROWN[:2]))
    for key, value in tensors(ranks[0]["end"]).items():
        assert torch.equal(ranks[1]["end"][key], value), key
    assert ranks[0]["end"]["0.weight"][8:16].abs().sum() > 0


def test_fsdp1_is_refused_before_anything_changes():
    """Lightning's ``strategy="fsdp"`` (FSDP1) needs a GPU, so the check is called as the
    Trainer calls it (``Callback.setup``, before the strategy wraps the model)."""
    from lightning.pytorch.strategies import FSDPStrategy

    from growdense.lightning import GrowthCallback
    from lightning_workers import GROWN, Regressor, schedule

    module = Regressor()
    before = {k: v.clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    trainer = types.SimpleNamespace(strategy=FSDPStrategy(), world_size=2, current_epoch=0, optimizers=[])
    callback = GrowthCallback(schedule())
    with pytest.raises(RuntimeError, match=r"FSDP1 .*Use strategy='ddp', or FSDP2: strategy=ModelParallelStrategy"):
        callback.setup(trainer, module, "fit")
    assert module.wiring.widths() == GROWN[0] and module.wiring.broadcast_from is None
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items() if k in before)
    with pytest.raises(ValueError, match="requires a GPU"):  # what Lightning itself says on the CPU
        pl.Trainer(strategy="fsdp", accelerator="cpu", devices=1, logger=False)


def test_to_swaps_growable_parameters_in_place():
    """``ModelParallelStrategy`` calls ``model.to(device)`` after ``fully_shard``: DTensor
    Parameters are swapped in place (``torch.utils.swap_tensors``, the path every module takes
    with ``torch.__future__.set_swap_module_params_on_conversion(True)``), which refuses a
    tensor with weak references. The layer still finds its active block afterwards."""
    from growdense import GrowLinear, protocol

    layer = GrowLinear(3, 2, capacity_in=5, capacity_out=4)
    weight = layer.weight
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        layer.to(torch.float64)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    assert layer.weight is weight and weight.dtype == torch.float64  # the same object, swapped
    assert protocol.active_block(layer.weight) == (slice(0, 2), slice(0, 3))
    layer.grow_out(1)
    assert protocol.active_block(layer.weight) == (slice(0, 3), slice(0, 3))
