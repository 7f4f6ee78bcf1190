"""The study's claims assessed from reproduce output folders (growdense.experiments.claims).

The folders are written by hand here, with histories whose verdicts are known, so each
rule (level within the tolerance, the crossing epoch, pending runs, the widths of Tables 1
and 2, the spikes and their recovery) is checked against a case built to pass or fail it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from growdense.experiments import claims
from growdense.experiments.output import write_csv

EVERY, EPOCHS = 2, 16  # 8 phases, 7 growths: the study's schedule at 1/12.5 of its length


def widths(name: str, epoch: int) -> tuple[int, int]:
    p = min(epoch // EVERY, 7)
    if name == "fixed":
        return 256, 128
    if name == "approach2-he-first" and p == 0:
        return 256, 128
    return 32 * (p + 1), 16 * (p + 1)


def write_run(folder, seed, losses: dict[str, list[float]], *, jumps=None, epochs=EPOCHS, bad_widths=()):
    """A reproduce output folder: config.json, metrics.csv and growth_events.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"config": {"seed": seed, "epochs": epochs, "every": EVERY}}))
    rows, events = [], []
    for name, curve in losses.items():
        for e, loss in enumerate(curve):
            h1, h2 = widths(name, e)
            if (name, e) in bad_widths:
                h1 += 1
            rows.append({"run": name, "epoch": e, "h1": h1, "h2": h2, "train_loss": loss + 1, "test_loss": loss,
                         "train_time": 2.0})
        if name != "fixed":
            for i, g in enumerate(range(EVERY, min(len(curve), epochs), EVERY)):
                jump = (jumps or {}).get(name, [10.0] * 7)[i]
                events.append({"run": name, "index": i + 1, "epoch": g, "jump": jump})
    write_csv(folder / "metrics.csv", rows)
    write_csv(folder / "growth_events.csv", events)


def decreasing(start: float, end: float, n: int = EPOCHS) -> list[float]:
    return [start + (end - start) * i / (n - 1) for i in range(n)]


def verdicts(root) -> dict[str, claims.Claim]:
    return {c.claim: c for c in claims.assess(claims.load_records([root]), every=EVERY)}


def test_level_within_the_floor_is_reproduced_and_beyond_it_is_not(tmp_path):
    write_run(tmp_path / "a", 0, {"fixed": decreasing(150, 100), "approach1-he": decreasing(160, 100.3)})
    assert verdicts(tmp_path)["Approach 1 ends level with Fixed"].verdict.startswith("reproduced")
    other = tmp_path / "c"
    write_run(other, 0, {"fixed": decreasing(150, 100), "approach1-he": decreasing(160, 102.0)})
    c = verdicts(other)["Approach 1 ends level with Fixed"]
    assert c.verdict.startswith("not reproduced: Approach 1 ends 2.00 nats above Fixed")
    assert "tolerance 0.50 nats" in c.verdict


def test_the_tolerance_widens_to_the_spread_between_seeds(tmp_path):
    # Fixed's two seeds end 3 nats apart, so a 2-nat gap is within the tolerance.
    write_run(tmp_path / "s0", 0, {"fixed": decreasing(150, 100), "approach1-he": decreasing(160, 102)})
    write_run(tmp_path / "s1", 1, {"fixed": decreasing(150, 103), "approach1-he": decreasing(160, 104)})
    records = claims.load_records([tmp_path])
    assert claims.tolerance(records, ["approach1-he", "fixed"]) == pytest.approx(3.0)
    c = verdicts(tmp_path)["Approach 1 ends level with Fixed"]
    assert c.verdict == "reproduced (2 seeds, tolerance 3.00 nats)"


def test_the_crossing_epoch_is_the_first_from_which_approach2_stays_below(tmp_path):
    fixed = [100.0] * EPOCHS
    a2 = [101.0] * 5 + [99.0, 101.0] + [97.0] * (EPOCHS - 7)  # below at epoch 6, above at 7, below from 8 on
    write_run(tmp_path, 0, {"fixed": fixed, "approach2-he-first": a2})
    rec = {r.name: r for r in claims.load_records([tmp_path])}
    assert claims.crossing_epoch(rec["approach2-he-first"], rec["fixed"], after=EVERY) == 8
    c = verdicts(tmp_path)["Approach 2 below Fixed from about epoch 37"]
    assert "below from epoch 8" in c.growdense and c.verdict.startswith("reproduced")


def test_approach2_above_fixed_at_the_end_is_not_reproduced(tmp_path):
    write_run(tmp_path, 0, {"fixed": [100.0] * EPOCHS, "approach2-he-first": [99.0] * (EPOCHS - 1) + [100.5]})
    c = verdicts(tmp_path)["Approach 2 below Fixed from about epoch 37"]
    assert "not below at the end" in c.growdense and c.verdict.startswith("not reproduced")


def test_unfinished_runs_are_pending_and_say_how_far_they_are(tmp_path):
    write_run(tmp_path, 0, {"fixed": decreasing(150, 100)[:9], "approach1-he": decreasing(160, 100)})
    c = verdicts(tmp_path)["Approach 1 ends level with Fixed"]
    assert c.verdict == "pending: seed 0: fixed at 9/16 epochs"
    assert "(epoch 9/16)" in claims.final_losses_table(claims.load_records([tmp_path]))


def test_widths_are_checked_every_epoch(tmp_path):
    write_run(tmp_path / "ok", 0, {"approach1-he": decreasing(160, 100), "approach2-he-first": decreasing(160, 100)})
    assert verdicts(tmp_path / "ok")["Widths follow Tables 1 and 2"].verdict == "reproduced"
    write_run(tmp_path / "part", 0, {"approach1-he": decreasing(160, 100)[:7]})
    assert verdicts(tmp_path / "part")["Widths follow Tables 1 and 2"].verdict == "reproduced so far"
    write_run(tmp_path / "bad", 0, {"approach2-he-first": decreasing(160, 100)}, bad_widths={("approach2-he-first", 5)})
    c = verdicts(tmp_path / "bad")["Widths follow Tables 1 and 2"]
    assert c.verdict == "not reproduced: approach2-he-first seed 0 epoch 6"


def test_spikes_and_recovery(tmp_path):
    # A spike at every growth (epochs 2, 4, ...), each recovered within one epoch.
    curve = [100.0 - e for e in range(EPOCHS)]
    write_run(tmp_path / "quick", 0, {"approach1-he": curve})
    rec = claims.load_records([tmp_path / "quick"])[0]
    assert claims.recovery_epochs(rec) == [1] * 7
    assert verdicts(tmp_path / "quick")["Loss spikes at each growth, then stabilises"].verdict == "reproduced"
    # After the growth at epoch 4 (0-based) the loss stays above its pre-growth level.
    slow = [100.0, 99.0, 98.0, 97.0] + [97.5] * (EPOCHS - 4)
    write_run(tmp_path / "slow", 0, {"approach1-he": slow})
    rec = claims.load_records([tmp_path / "slow"])[0]
    assert claims.recovery_epochs(rec)[:2] == [1, None]
    assert verdicts(tmp_path / "slow")["Loss spikes at each growth, then stabilises"].verdict.startswith("not")


def test_the_cut_spike_must_be_the_largest(tmp_path):
    big = [80.0] + [10.0] * 6
    write_run(tmp_path / "big", 0, {"approach2-he-first": decreasing(160, 100)}, jumps={"approach2-he-first": big})
    assert verdicts(tmp_path / "big")["Large spike at Approach 2's cut"].verdict == "reproduced"
    small = [5.0] + [10.0] * 6
    write_run(tmp_path / "small", 0, {"approach2-he-first": decreasing(160, 100)}, jumps={"approach2-he-first": small})
    assert verdicts(tmp_path / "small")["Large spike at Approach 2's cut"].verdict == "not reproduced"


def test_the_longer_history_of_a_model_wins_and_the_cli_writes_markdown(tmp_path, capsys):
    write_run(tmp_path / "partial", 0, {"fixed": decreasing(150, 100)[:5]})
    write_run(tmp_path / "full", 0, {"fixed": decreasing(150, 100), "approach1-he": decreasing(160, 100.2)})
    records = claims.load_records([tmp_path])
    assert [len(r.history) for r in records if r.name == "fixed"] == [EPOCHS]
    out = tmp_path / "claims.md"
    assert claims.main([str(tmp_path), "--every", str(EVERY), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("| claim | study | growdense | verdict |")
    assert "| fixed | 100.00 |" in text


def test_a_folder_without_its_config_is_an_error(tmp_path):
    write_run(tmp_path, 0, {"fixed": decreasing(150, 100)})
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        claims.load_records([tmp_path])


def test_checkpoints_give_the_history_so_far_and_export_round_trips(tmp_path):
    # A per-epoch checkpoint as train_run writes it: the history and events under "extra",
    # with the run's trajectory (its configuration, values as repr strings).
    history = [{"run": "fixed", "epoch": e, "h1": 256, "h2": 128, "test_loss": 150.0 - e, "train_time": 1.0}
               for e in range(6)]
    extra = {"epoch": 5, "history": history, "events": [],
             "trajectory": {"run": "fixed", "seed": "3", "epochs": str(EPOCHS), "precision": "'fp32'",
                            "target": "(256, 128)", "latent": "20"}}
    (tmp_path / "runs" / "checkpoints").mkdir(parents=True)
    torch.save({"format": "growdense-checkpoint", "extra": extra}, tmp_path / "runs" / "checkpoints" / "fixed.last.pt")
    write_run(tmp_path / "runs" / "a1", 3, {"approach1-he": decreasing(160, 100)})
    records = claims.load_records([tmp_path / "runs"])
    fixed = next(r for r in records if r.name == "fixed")
    assert (fixed.seed, fixed.epochs, len(fixed.history), fixed.finished) == (3, EPOCHS, 6, False)
    assert (fixed.capacity, fixed.latent) == ((256, 128), 20)
    c = {c.claim: c for c in claims.assess(records, every=EVERY)}["Approach 1 ends level with Fixed"]
    assert "at epoch 6" in c.growdense and c.verdict == "pending: seed 3: fixed at 6/16 epochs"
    claims.export(records, tmp_path / "export")
    again = claims.load_records([tmp_path / "export"])
    assert [(r.name, r.seed, len(r.history)) for r in again] == [(r.name, r.seed, len(r.history)) for r in records]
    assert [row["test_loss"] for row in again[1].history] == [row["test_loss"] for row in fixed.history]
    claims.export(again, tmp_path / "export2")  # what is read back writes out the same files
    for name in ("metrics.csv", "growth_events.csv", "config.json"):
        assert (tmp_path / "export2" / "seed3" / name).read_bytes() == (tmp_path / "export" / "seed3" / name).read_bytes()


def test_two_precisions_of_one_model_are_refused(tmp_path):
    write_run(tmp_path / "fp32", 0, {"fixed": decreasing(150, 100)})
    write_run(tmp_path / "bf16", 0, {"fixed": decreasing(150, 100)})
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    cfg["config"]["precision"] = "bf16"
    (tmp_path / "bf16" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="fixed seed 0 was found trained at"):
        claims.load_records([tmp_path])


def test_comparisons_are_one_factor_at_a_time_per_seed(tmp_path):
    he = decreasing(160, 105)
    # the same computation until the first growth, off by rounding (+0.25), then 1.5 nats lower
    zero_out = [v + 0.25 for v in he[:EVERY]] + [v - 1.5 for v in he[EVERY:]]
    write_run(tmp_path, 0, {"approach1-he": he, "approach1-zero_out": zero_out, "fixed": decreasing(150, 100)})
    table = claims.comparisons_table(claims.load_records([tmp_path]), every=EVERY)
    assert f"after epoch {EVERY}, where both are still one computation" in table
    assert "(`approach1-zero_out` − `approach1-he`) | seed 0: -1.50 | seed 0: +0.25 |" in table
    assert "keep" not in table  # absent models give no row


def test_a_comparison_with_other_starting_widths_has_no_epoch_25_difference(tmp_path):
    # Approach 1 grown with gradmax starts at 32/16, Fixed at 256/128: never one computation.
    write_run(tmp_path, 0, {"approach1-gradmax": decreasing(160, 108), "fixed": decreasing(150, 100)})
    table = claims.comparisons_table(claims.load_records([tmp_path]), every=EVERY)
    assert "(`approach1-gradmax` − `fixed`) | seed 0: +8.00 | - |" in table


def test_estimates_are_read_exported_and_tabled(tmp_path):
    write_run(tmp_path / "run", 0, {"fixed": decreasing(150, 100)})
    write_csv(tmp_path / "run" / "estimates.csv",
              [{"run": "fixed", "epoch": 1, "samples": 100, "images": 500, "gap": 3.5, "logw_var": 9.87}])
    records = claims.load_records([tmp_path / "run"])
    assert "| fixed | 0 | 2: 3.50 / 9.9 |" in claims.estimates_table(records)
    claims.export(records, tmp_path / "export")
    assert claims.load_records([tmp_path / "export"])[0].estimates[0]["logw_var"] == 9.87
    assert "K = 100" in claims.claims_markdown(records, every=EVERY)


def test_the_final_evaluation_is_tabled(tmp_path):
    write_run(tmp_path, 0, {"fixed": decreasing(150, 100)})
    var = [{"L": 1, "var": 20.0}, {"L": 100, "var": 0.2}]
    ev = {"fixed": {"elbo": -100.5, "iwae": {"1000": -96.25}, "variance": var, "logw_variance": var,
                    "iwae_variance": [{"K": 1, "var": 20.0}, {"K": 100, "var": 0.5}]}}
    (tmp_path / "evaluation.json").write_text(json.dumps(ev))
    table = claims.evaluation_table(claims.load_records([tmp_path]))
    assert "| fixed | 0 | -100.50 | -96.25 | 20 / 0.2 | 20 / 0.2 | 20 / 0.5 |" in table
    claims.export(claims.load_records([tmp_path]), tmp_path / "export")
    assert claims.load_records([tmp_path / "export"])[0].evaluation == ev["fixed"]


def test_insert_fills_the_marked_block_only(tmp_path):
    write_run(tmp_path / "run", 0, {"fixed": decreasing(150, 100)})
    doc = tmp_path / "results.md"
    doc.write_text("intro\n<!-- claims:begin -->\nold table\n<!-- claims:end -->\noutro\n")
    assert claims.main([str(tmp_path / "run"), "--every", str(EVERY), "--insert", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("intro\n<!-- claims:begin -->\n| claim |") and text.endswith("<!-- claims:end -->\noutro\n")
    assert "old table" not in text
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit):
        claims.main([str(tmp_path / "run"), "--insert", str(doc)])
    assert doc.read_text() == "no markers\n"


@pytest.mark.parametrize("name", ["fixed", "fixed-32x16", "approach1-he", "approach1-zero_out-keep",
                                  "approach2-he-first", "approach2-zero_out-norm-keep"])
def test_run_names_parse_back_to_their_spec(name):
    from growdense.experiments.config import RunSpec

    assert RunSpec.from_name(name).name == name


@pytest.mark.parametrize("name", ["fixed-32", "approach3-he", "approach1", "fixed-axb"])
def test_a_name_that_is_no_run_is_refused(name):
    from growdense.experiments.config import RunSpec

    with pytest.raises(ValueError, match="is not the name of a reproduce run"):
        RunSpec.from_name(name)


def write_checkpoint(folder, name: str, seed: int, curve: list[float], *, model=None, per_epoch: int = 5):
    """A per-epoch checkpoint as train_run writes it (a real model, the history and events so far
    under "extra", the trajectory's values as repr strings); returns the model saved."""
    from growdense.checkpoint import save_checkpoint
    from growdense.models.vae import VAE

    history = [{"run": name, "epoch": e, "h1": widths(name, e)[0], "h2": widths(name, e)[1],
                "train_loss": v + 1, "test_loss": v, "train_time": 1.0} for e, v in enumerate(curve)]
    events = [] if name == "fixed" else [{"run": name, "index": i + 1, "epoch": g, "step": g * per_epoch,
                                          "jump": 10.0} for i, g in enumerate(range(EVERY, len(curve), EVERY))]
    steps = torch.tensor([v + 1 for v in curve for _ in range(per_epoch)], dtype=torch.float64)
    if model is None:
        model = VAE(*widths(name, len(curve) - 1))
    extra = {"epoch": len(curve) - 1, "history": history, "events": events, "estimates": [], "steps": steps,
             "trajectory": {"run": name, "seed": str(seed), "epochs": str(EPOCHS), "precision": "'fp32'",
                            "target": "(256, 128)", "latent": "20"}}
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / "checkpoints" / f"{name}.last.pt", model, extra=extra)
    return model


def test_figures_are_drawn_from_checkpoints_with_their_batch_losses(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    for name, (start, end) in {"fixed": (150, 100), "approach1-he": (160, 101)}.items():
        write_checkpoint(tmp_path, name, 0, decreasing(start, end))
    test = torch.rand(20, 784)
    paths = claims.figures(claims.load_records([tmp_path]), tmp_path / "figures", spike_window=2, test=test)
    names = {p.name for p in paths}
    assert {"fixed_loss.png", "approach1_loss_elbo.png", "growth_spikes.png", "batch_losses.png"} <= names
    assert {"samples_fixed.png", "samples_approach1-he.png", "reconstructions.png"} <= names
    assert "approach2_loss_elbo.png" not in names  # no Approach 2 run
    assert all(p.parent == tmp_path / "figures" / "seed0" for p in paths)
    assert all(p.stat().st_size > 10_000 for p in paths if p.name.endswith("loss.png"))


def test_figures_lists_only_what_it_drew(tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    write_checkpoint(tmp_path, "fixed", 0, decreasing(150, 100)[:5])
    stale = tmp_path / "figures" / "seed0" / "approach2_loss_elbo.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"from an earlier call")
    paths = claims.figures(claims.load_records([tmp_path]), tmp_path / "figures", spike_window=2)
    names = [p.name for p in paths]
    assert "fixed_loss.png" in names
    assert stale not in paths and stale.read_bytes() == b"from an earlier call"  # untouched, not reported
    assert len(names) == len(set(names))


def test_a_checkpoint_gives_back_its_final_model(tmp_path):
    torch.manual_seed(0)
    saved = write_checkpoint(tmp_path, "approach1-he", 0, decreasing(160, 101)[:5])
    record = claims.load_records([tmp_path])[0]
    loaded = claims.load_model(record)
    assert loaded.widths() == saved.widths() == widths("approach1-he", 4)
    got, want = loaded.state_dict(), saved.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) if torch.is_tensor(want[k]) else got[k] == want[k] for k in want)
    record.checkpoint = None
    with pytest.raises(ValueError, match="without its checkpoint"):
        claims.load_model(record)


def _samples_claim_with(tmp_path, *, grown_like_fixed: bool, fixed_seeds_alike: bool) -> claims.Claim:
    """Fixed with seeds 0 and 1 and Approach 1 with seed 0, all finished; Approach 1's decoder a
    copy of Fixed seed 0's or a model of its own, Fixed seed 1 a copy of seed 0 or its own."""
    from growdense.models.vae import VAE

    torch.manual_seed(0)
    fixed0 = write_checkpoint(tmp_path / "s0", "fixed", 0, decreasing(150, 100))
    # a fresh model's samples are near 0.5 everywhere; a trained one's are not: sharpen the
    # decoder's output so that different models' samples are far apart
    with torch.no_grad():
        fixed0.dec3.weight.mul_(20)
    write_checkpoint(tmp_path / "s0", "fixed", 0, decreasing(150, 100), model=fixed0)

    def other():
        m = VAE(256, 128)
        with torch.no_grad():
            m.dec3.weight.mul_(20)
        return m

    write_checkpoint(tmp_path / "s0", "approach1-he", 0, decreasing(160, 100),
                     model=fixed0 if grown_like_fixed else other())
    write_checkpoint(tmp_path / "s1", "fixed", 1, decreasing(150, 100), model=fixed0 if fixed_seeds_alike else other())
    records = claims.load_records([tmp_path / "s0", tmp_path / "s1"])
    return {c.claim: c for c in claims.assess(records, every=EVERY)}["Grown and fixed models' samples alike"]


def test_samples_alike_when_grown_is_no_further_from_fixed_than_two_fixed_seeds(tmp_path):
    c = _samples_claim_with(tmp_path, grown_like_fixed=True, fixed_seeds_alike=False)
    assert c.verdict.startswith("reproduced"), c
    assert "Approach 1 vs Fixed: seed 0:" in c.growdense and "Fixed seed 0 vs Fixed seed 1" in c.growdense


def test_samples_not_alike_when_grown_is_further_than_two_fixed_seeds(tmp_path):
    c = _samples_claim_with(tmp_path, grown_like_fixed=False, fixed_seeds_alike=True)
    assert c.verdict.startswith("not reproduced"), c


def test_samples_claim_is_pending_without_final_models(tmp_path):
    write_run(tmp_path, 0, {"fixed": decreasing(150, 100), "approach1-he": decreasing(160, 100)})
    c = verdicts(tmp_path)["Grown and fixed models' samples alike"]
    assert c.verdict.startswith("pending") and c.growdense == "-"


def _grid_rows(path, rows: int) -> torch.Tensor:
    """The 28x28 tiles of a 16-wide image grid (padding 2), as uint8 rows of 16 x 784 pixels."""
    from PIL import Image

    img = torch.tensor(np.array(Image.open(path).convert("L")))
    return torch.stack([torch.stack([img[2 + 30 * i: 30 + 30 * i, 2 + 30 * j: 30 + 30 * j].reshape(784)
                                     for j in range(16)]) for i in range(rows)])


def test_the_export_keeps_batch_losses_and_reconstructions_so_figures_need_no_checkpoint(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("torchvision")
    from growdense.experiments.plots import to_pixels

    torch.manual_seed(0)
    fixed = write_checkpoint(tmp_path / "runs", "fixed", 0, decreasing(150, 100))
    write_checkpoint(tmp_path / "runs", "approach1-he", 0, decreasing(160, 101)[:9])  # unfinished
    test = torch.rand(16, 784)
    records = claims.load_records([tmp_path / "runs"])
    claims.figures(records, tmp_path / "fig", spike_window=2, test=test)
    claims.export(records, tmp_path / "export")
    again = claims.load_records([tmp_path / "export"])
    assert all(r.checkpoint is None for r in again)
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "export" / "seed0").glob("*.npz")}
    assert set(files) == {"steps.npz", "reconstructions.npz"}
    claims.export(again, tmp_path / "export")  # exported again: not rewritten (a zip stamps its time)
    assert files == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "export" / "seed0").glob("*.npz")}
    for old, new in zip(records, again):
        # stored as float32: equal to 1e-6 relative, far below a figure's resolution
        assert new.steps == pytest.approx(old.steps, rel=1e-6) and len(new.steps) == len(old.steps) > 0
    by_name = {r.name: r for r in again}
    assert by_name["approach1-he"].reconstruction is None  # unfinished: no final model
    assert torch.equal(by_name["fixed"].reconstruction, to_pixels(fixed.reconstruct(test)))

    # The checkpoints gone, the training figures are drawn again from the export, and a newly
    # finished model's reconstructions join the exported row of Fixed in Figure 5.
    grown = write_checkpoint(tmp_path / "new", "approach1-he", 0, decreasing(160, 101))
    records = claims.load_records([tmp_path / "export", tmp_path / "new"])
    names = {p.name for p in claims.figures(records, tmp_path / "fig2", spike_window=2, test=test)}
    assert {"fixed_loss.png", "approach1_loss_elbo.png", "batch_losses.png", "reconstructions.png",
            "samples_approach1-he.png"} <= names
    assert "samples_fixed.png" not in names  # its model is not there to sample
    rows = _grid_rows(tmp_path / "fig2" / "seed0" / "reconstructions.png", 3)
    assert torch.equal(rows[0], to_pixels(test))
    assert torch.equal(rows[1], to_pixels(fixed.reconstruct(test)))
    assert torch.equal(rows[2], to_pixels(grown.reconstruct(test)))


def test_figures_of_a_seed_without_batch_losses_are_left_as_they_are(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "runs", 0, {"fixed": decreasing(150, 100), "approach1-he": decreasing(160, 101)})
    folder = tmp_path / "fig" / "seed0"
    folder.mkdir(parents=True)
    (folder / "approach1_loss_elbo.png").write_bytes(b"drawn with the batch losses")
    assert claims.figures(claims.load_records([tmp_path / "runs"]), tmp_path / "fig") == []
    assert (folder / "approach1_loss_elbo.png").read_bytes() == b"drawn with the batch losses"

    # With a grown model's batch losses, Fixed is drawn from its history beside it; its
    # Figure 4, which is its batch losses, is not drawn again.
    torch.manual_seed(0)
    write_checkpoint(tmp_path / "new", "approach2-he-first", 0, decreasing(170, 99))
    records = claims.load_records([tmp_path / "runs", tmp_path / "new"])
    names = {p.name for p in claims.figures(records, tmp_path / "fig", spike_window=2)}
    assert {"approach2_loss_elbo.png", "batch_losses.png", "growth_spikes.png"} <= names
    assert "fixed_loss.png" not in names
    assert "approach1_loss_elbo.png" not in names  # neither of its models has batch losses


def test_the_samples_claim_is_carried_by_the_export_when_the_checkpoints_are_gone(tmp_path):
    _samples_claim_with(tmp_path, grown_like_fixed=False, fixed_seeds_alike=False)
    records = claims.load_records([tmp_path / "s0", tmp_path / "s1"])
    tests = claims.SampleTests()
    first = {c.claim: c for c in claims.assess(records, every=EVERY, sample_tests=tests)}
    assert len(tests.results) == 2  # Approach 1 vs Fixed (seed 0), Fixed seed 0 vs seed 1
    claims.export(records, tmp_path / "export", tests)
    again = claims.load_records([tmp_path / "export"])
    assert all(r.checkpoint is None for r in again)
    carried = claims.load_sample_tests([tmp_path / "export"])
    assert carried == tests
    second = {c.claim: c for c in claims.assess(again, every=EVERY, sample_tests=carried)}
    title = "Grown and fixed models' samples alike"
    assert second[title].verdict == first[title].verdict
    assert second[title].growdense == first[title].growdense + (
        " (the tests of final models whose checkpoints were not kept: as exported in samples.json)")
    # Without the tests, nothing can be measured from histories alone.
    assert claims.assess(again, every=EVERY)[5].verdict.startswith("pending")


def test_a_pair_neither_measured_nor_carried_says_so(tmp_path):
    _samples_claim_with(tmp_path, grown_like_fixed=False, fixed_seeds_alike=False)
    records = claims.load_records([tmp_path / "s0", tmp_path / "s1"])
    # Approach 1 of seed 1 finishes after Fixed seed 1's checkpoint is gone.
    write_run(tmp_path / "s1-late", 1, {"approach1-he": decreasing(160, 100)})
    for r in records:
        if r.seed == 1:
            r.checkpoint = None
    records += claims.load_records([tmp_path / "s1-late"])
    c = {c.claim: c for c in claims.assess(records, every=EVERY)}["Grown and fixed models' samples alike"]
    assert "seed 1: not measured" in c.growdense
    assert "Fixed seed 0 vs Fixed seed 1" not in c.growdense
    assert c.verdict.startswith("pending: needs the finished Fixed models of two seeds")


@pytest.fixture
def saved_figures(monkeypatch):
    """The figures the plots module would write, by file name, drawn but not saved: (figure,
    the keyword arguments it was saved with)."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from growdense.experiments import plots

    saved = {}

    def keep(fig, path, **kwargs):
        fig.canvas.draw()
        saved[path.name] = (fig, kwargs)
        plt.close(fig)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    return saved


def test_a_fixed_model_at_other_widths_is_drawn_with_approach_1_only(tmp_path, saved_figures):
    """The 32/16 from scratch is Approach 1's starting point: Figure 6 draws it beside Fixed,
    Figure 7 (Approach 2, which never trains at 32/16 from the start) does not."""
    from growdense.experiments import plots
    from growdense.experiments.config import RunSpec

    results = []
    for name in ["fixed", "fixed-32x16", "approach1-he", "approach2-he-first"]:
        curve = decreasing(150, 100)
        results.append({"spec": RunSpec.from_name(name), "steps": [v + 1 for v in curve for _ in range(3)],
                        "history": [{"epoch": e, "train_loss": v + 1, "test_loss": v} for e, v in enumerate(curve)],
                        "events": [], "estimates": []})
    plots.training_figures(tmp_path, results)

    def labels(name):
        return {t.get_text() for t in saved_figures[name][0].axes[0].get_legend().get_texts()}

    assert {"fixed (train)", "fixed-32x16 (train)", "approach1-he (train)"} <= labels("approach1_loss_elbo.png")
    assert "fixed (train)" in labels("approach2_loss_elbo.png")
    assert not any(label.startswith("fixed-32x16") for label in labels("approach2_loss_elbo.png"))


def test_the_gap_figure_has_one_legend_beside_its_panels(tmp_path, saved_figures):
    """With twelve models a legend inside a panel hides points: the section 3.4 figure has one
    legend for both panels, naming every model, to the right of them."""
    from growdense.experiments import plots
    from growdense.experiments.config import RunSpec

    names = ["fixed", "fixed-32x16", "approach1-he", "approach2-he-first"]
    results = [{"spec": RunSpec.from_name(name), "steps": [], "events": [],
                "history": [{"epoch": e, "train_loss": 101.0 - e, "test_loss": 100.0 - e} for e in range(50)],
                "estimates": [{"epoch": e, "gap": 4.0 + i / 10, "logw_var": 12.0 + i, "samples": 100}
                              for e in (25, 50)]}
               for i, name in enumerate(names)]
    plots.training_figures(tmp_path, results)
    fig, kwargs = saved_figures["iwae_gap.png"]
    assert all(ax.get_legend() is None for ax in fig.axes)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == names
    right_of_panels = max(ax.get_window_extent().x1 for ax in fig.axes)
    assert legend.get_window_extent().x0 >= right_of_panels
    assert kwargs == {"crop": True}  # the saved image keeps the legend outside the axes


def test_every_chart_has_a_title(tmp_path, saved_figures):
    """batch_losses, iwae_gap and elbo_variance_iwae say what they show, as the others do."""
    from growdense.experiments import plots
    from growdense.experiments.config import RunSpec

    results = [{"spec": RunSpec.from_name(name), "steps": [100.0 - i / 10 for i in range(30)],
                "events": [] if name == "fixed" else [{"run": name, "index": 1, "step": 10, "epoch": 2, "spike": 1.0,
                                                       "jump": 1.0, "h1": 64, "h2": 32, "h1_before": 32,
                                                       "h2_before": 16, "probe_before": 100.0,
                                                       "probe_after": 101.0, "pre_mean": 99.0, "post_max": 100.0}],
                "history": [{"epoch": e, "train_loss": 101.0 - e, "test_loss": 100.0 - e} for e in range(6)],
                "estimates": [{"epoch": e, "gap": 4.0, "logw_var": 12.0, "samples": 100} for e in (1, 5)]}
               for name in ["fixed", "approach1-he"]]
    plots.training_figures(tmp_path, results)
    evaluation = {"iwae": {"1": -100.0, "10": -98.0}, "variance": [{"L": 1, "std": 2.0}, {"L": 2, "std": 1.5}],
                  "logw_variance": [{"L": 1, "std": 3.0}], "iwae_variance": [{"K": 1, "std": 3.0}]}
    plots._variance(tmp_path / "elbo_variance_iwae.png", {"fixed": evaluation})
    for name in ("batch_losses.png", "iwae_gap.png", "elbo_variance_iwae.png"):
        fig = saved_figures[name][0]
        titles = [ax.get_title() for ax in fig.axes] + [fig._suptitle.get_text() if fig._suptitle else ""]
        assert any(len(t) > 10 for t in titles), (name, titles)
    assert "mini-batch" in saved_figures["batch_losses.png"][0].axes[0].get_title()
    assert "IWAE gap" in saved_figures["iwae_gap.png"][0]._suptitle.get_text()


def test_reconstruction_rows_are_labelled_beside_an_unchanged_grid(tmp_path):
    pytest.importorskip("torchvision")
    from PIL import Image

    from growdense.experiments.plots import reconstructions_figure, to_pixels

    torch.manual_seed(0)
    test, a, b = torch.rand(16, 784), torch.rand(16, 784), torch.rand(16, 784)
    plain = reconstructions_figure(tmp_path / "plain.png", test, [a, b])
    labelled = reconstructions_figure(tmp_path / "labelled.png", test, [a, b], ["fixed", "approach1-he"])
    rows = _grid_rows(labelled, 3)  # the tiles sit where they always did
    assert torch.equal(rows[0], to_pixels(test)) and torch.equal(rows[2], to_pixels(b))
    plain_img = np.array(Image.open(plain).convert("L"))
    labelled_img = np.array(Image.open(labelled).convert("L"))
    assert labelled_img.shape[0] == plain_img.shape[0] and labelled_img.shape[1] > plain_img.shape[1] + 40
    assert (labelled_img[:, : plain_img.shape[1]] == plain_img).all()
    strip = labelled_img[:, plain_img.shape[1]:]
    for i in range(3):  # dark text in each row's band of the strip
        assert (strip[30 * i + 2: 30 * i + 30] < 128).any(), i
    with pytest.raises(ValueError, match="2 model rows but 1 labels"):
        reconstructions_figure(tmp_path / "bad.png", test, [a, b], ["fixed"])
