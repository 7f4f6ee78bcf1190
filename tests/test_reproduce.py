"""``growdense reproduce`` end to end on a tiny MNIST subset (the ``ci`` preset)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from growdense.__main__ import main

DATA = Path(os.environ.get("GROWDENSE_MNIST_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_mnist = pytest.mark.skipif(not (DATA / "MNIST" / "raw").is_dir(), reason=f"MNIST not found at {DATA}")


def _table(approach: str, epoch: int) -> tuple[int, int]:
    # the ci preset grows every epoch: Table 1 / Table 2 with one epoch per row
    if approach == "2" and epoch == 0:
        return 256, 128
    return 32 * (epoch + 1), 16 * (epoch + 1)


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory) -> Path:
    pytest.importorskip("torchvision")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    if not (DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"MNIST not found at {DATA}")
    out = tmp_path_factory.mktemp("reproduce") / "ci"
    assert main(["reproduce", "--preset", "ci", "--data-dir", str(DATA), "--out", str(out), "--train-subset",
                 "256", "--no-progress"]) == 0
    return out


@needs_mnist
def test_ci_preset_writes_every_artifact(ci_run):
    for name in ("config.json", "metrics.csv", "metrics.json", "steps.csv", "growth_events.csv",
                 "evaluation.json", "tables.md", "summary.md"):
        assert (ci_run / name).stat().st_size > 0, name
    figures = {p.name for p in (ci_run / "figures").glob("*.png")}
    runs = ["fixed", "approach1-he", "approach1-zero_out", "approach2-he-first", "approach2-zero_out-first",
            "approach2-he-norm"]
    assert {"approach1_loss_elbo.png", "approach2_loss_elbo.png", "reconstructions.png", "growth_spikes.png",
            "batch_losses.png", "elbo_variance_iwae.png"} <= figures
    assert {f"samples_{r}.png" for r in runs} <= figures
    config = json.loads((ci_run / "config.json").read_text())
    assert config["runs"] == runs and config["train_images"] == 256 and config["config"]["preset"] == "ci"
    evaluation = json.loads((ci_run / "evaluation.json").read_text())
    for r in runs:
        assert set(evaluation[r]["iwae"]) == {"1", "10", "100", "1000"}
        assert [v["L"] for v in evaluation[r]["variance"]] == [1, 5, 20]
    summary = (ci_run / "summary.md").read_text()
    assert "IWAE K=1000" in summary and "Growth events" in summary
    tables = (ci_run / "tables.md").read_text()
    assert "Table 1" in tables and "Table 2" in tables and "| 7 | 7-7 | 256 | 128 |" in tables


@needs_mnist
def test_widths_in_metrics_follow_the_tables(ci_run):
    with (ci_run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 * 8
    for row in rows:
        epoch, h = int(row["epoch"]), (int(row["h1"]), int(row["h2"]))
        if row["run"] == "fixed":
            assert h == (256, 128)
        else:
            assert h == _table(row["run"][8], epoch), row
        for key in ("train_loss", "test_loss", "test_elbo", "params", "epoch_time"):
            assert float(row[key]) == float(row[key])  # present and not NaN
        assert float(row["test_elbo"]) == pytest.approx(-float(row["test_loss"]))


@needs_mnist
def test_zero_out_growth_preserves_the_function(ci_run):
    with (ci_run / "growth_events.csv").open() as f:
        events = list(csv.DictReader(f))
    zero = [e for e in events if e["run"] == "approach1-zero_out"]
    assert len(zero) == 7
    assert all(abs(float(e["jump"])) < 1e-3 for e in zero)
    cut = [e for e in events if e["run"] == "approach2-he-first" and e["index"] == "1"][0]
    assert (cut["h1_before"], cut["h2_before"], cut["h1"], cut["h2"]) == ("256", "128", "64", "32")


def test_quick_preset_and_overrides():
    import argparse

    from growdense.experiments.reproduce import ReproduceConfig, add_arguments, config_from_args, run_specs

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--quick"]))
    assert cfg.preset == "quick" and cfg.train_subset == 3000 and cfg.epochs == 16 and cfg.every == 2
    assert [s.name for s in run_specs(cfg)] == ["fixed", "approach1-he", "approach2-he-first"]
    cfg = config_from_args(parser.parse_args(["--quick", "--epochs", "4", "--init", "he,zero_out", "--keep",
                                              "first,norm", "--approach", "2"]))
    assert cfg.epochs == 4 and cfg.every == 2
    assert [s.name for s in run_specs(cfg)] == ["approach2-he-first", "approach2-zero_out-first",
                                                "approach2-he-norm"]
    study = config_from_args(parser.parse_args([]))
    assert study == ReproduceConfig()  # the study's defaults
    assert (study.epochs, study.every, study.samples, study.batch_size, study.lr) == (200, 25, 20, 128, 1e-3)


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    pytest.importorskip("torchvision")
    assert main(["reproduce", "--preset", "ci", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "MNIST not found" in err and str(tmp_path) in err
