"""``growdense reproduce`` end to end on a tiny MNIST subset (the ``ci`` preset)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from growdense.__main__ import main

from mnist_data import DATA, candidates
needs_mnist = pytest.mark.skipif(not (DATA / "MNIST" / "raw").is_dir(), reason=f"MNIST not found in {[str(c) for c in candidates()]}")


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
        pytest.skip(f"MNIST not found in {[str(c) for c in candidates()]}")
    out = tmp_path_factory.mktemp("reproduce") / "ci"
    assert main(["reproduce", "--preset", "ci", "--data-dir", str(DATA), "--out", str(out), "--train-subset",
                 "256", "--no-progress"]) == 0
    return out


@needs_mnist
def test_ci_preset_writes_every_artifact(ci_run):
    for name in ("config.json", "metrics.csv", "metrics.json", "steps.csv", "growth_events.csv", "estimates.csv",
                 "evaluation.json", "tables.md", "summary.md"):
        assert (ci_run / name).stat().st_size > 0, name
    figures = {p.name for p in (ci_run / "figures").glob("*.png")}
    runs = ["fixed", "approach1-he", "approach1-zero_out", "approach2-he-first", "approach2-zero_out-first",
            "approach2-he-norm"]
    assert {"approach1_loss_elbo.png", "approach2_loss_elbo.png", "reconstructions.png", "growth_spikes.png",
            "batch_losses.png", "elbo_variance_iwae.png", "fixed_loss.png", "iwae_gap.png"} <= figures
    assert {f"samples_{r}.png" for r in runs} <= figures
    config = json.loads((ci_run / "config.json").read_text())
    assert config["runs"] == runs and config["train_images"] == 256 and config["config"]["preset"] == "ci"
    evaluation = json.loads((ci_run / "evaluation.json").read_text())
    for r in runs:
        assert set(evaluation[r]["iwae"]) == {"1", "10", "100", "1000"}
        assert [v["L"] for v in evaluation[r]["variance"]] == [1, 5, 20]
        assert [v["L"] for v in evaluation[r]["logw_variance"]] == [1, 5, 20]
        assert [v["K"] for v in evaluation[r]["iwae_variance"]] == [1, 10]
        assert all(v["var"] > 0 for v in evaluation[r]["logw_variance"])  # a trained encoder is not exact
    with (ci_run / "estimates.csv").open() as f:
        estimates = list(csv.DictReader(f))
    assert [(e["run"], e["epoch"]) for e in estimates] == [(r, str(ep)) for r in runs for ep in (3, 7)]
    assert all(float(e["gap"]) >= 0 for e in estimates)
    summary = (ci_run / "summary.md").read_text()
    assert "IWAE K=1000" in summary and "Growth events" in summary and "IWAE gap during training" in summary
    assert "log importance weight" in summary
    assert all((ci_run / "checkpoints" / f"{r}.last.pt").is_file() for r in runs)
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

    from growdense.experiments.cli import add_arguments, config_from_args
    from growdense.experiments.reproduce import ReproduceConfig, run_specs

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


def test_missing_data_is_a_clear_error(tmp_path, capsys, monkeypatch):
    tv = pytest.importorskip("torchvision.datasets")

    def no_download(self):
        raise AssertionError("--no-download must not download")

    monkeypatch.setattr(tv.MNIST, "download", no_download)
    assert main(["reproduce", "--preset", "ci", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--no-progress", "--no-download"]) == 2
    err = capsys.readouterr().err
    assert "MNIST not found" in err and str(tmp_path) in err and "--no-download" in err


def _write_idx(raw: Path, n: int) -> None:
    """Tiny MNIST files in the idx format torchvision reads (n images per split)."""
    import struct

    raw.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for prefix in ("train", "t10k"):
        pixels = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28)
                                                         + pixels.numpy().tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + bytes(range(n)))


def test_missing_data_is_downloaded_there(tmp_path, capsys, monkeypatch):
    tv = pytest.importorskip("torchvision.datasets")
    from growdense.experiments.data import load_mnist

    calls = []

    def fake_download(self):  # what torchvision's download leaves behind, without the network
        calls.append((self.root, self.train))
        _write_idx(Path(self.raw_folder), 12)

    monkeypatch.setattr(tv.MNIST, "download", fake_download)
    train, test = load_mnist(tmp_path / "data", download=True)
    assert calls and calls[0][0] == str(tmp_path / "data")
    assert train.shape == (12, 784) and test.shape == (12, 784) and 0 <= train.min() and train.max() <= 1
    err = capsys.readouterr().err
    assert "downloading" in err and str((tmp_path / "data" / "MNIST" / "raw").resolve()) in err
    calls.clear()
    load_mnist(tmp_path / "data", download=True)  # present now: no second download
    assert not calls


def test_failed_download_is_a_clear_error(tmp_path, capsys, monkeypatch):
    tv = pytest.importorskip("torchvision.datasets")

    def offline(self):  # torchvision's error after every mirror failed
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(tv.MNIST, "download", offline)
    assert main(["reproduce", "--preset", "ci", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "downloading it failed" in err and "Error downloading" in err and str(tmp_path) in err


# ---- training: optimizer-state policy, resumption, precision, fixed widths --------------------
def _tiny_cfg(**kw):
    from growdense.experiments.config import ReproduceConfig

    base = dict(epochs=4, every=1, batch_size=32, samples=2, probe_images=16, gap_epochs=(1, 3), gap_k=4,
                gap_images=8, spike_window=2, progress=False, device="cpu")
    base.update(kw)
    return ReproduceConfig(**base)


def _tiny_data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(80, 784, generator=g), torch.rand(24, 784, generator=g)


def _steps(model, opt, x, n, seed):
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        loss = model.loss(x[i * 8 : (i + 1) * 8], 2, g)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _grown_pair(policy):
    """Two identical models trained 3 steps; the first grows through apply_growth with ``policy``."""
    from growdense import GrowthSchedule
    from growdense.experiments.training import apply_growth
    from growdense.models import VAE
    from growdense.optim import Adam

    x = _tiny_data()[0]
    pair = []
    for _ in range(2):
        torch.manual_seed(0)
        model = VAE(32, 16)
        opt = Adam(model.parameters(), lr=1e-3)
        model.attach_optimizer(opt)
        _steps(model, opt, x, 3, 1)
        pair.append((model, opt))
    schedule = GrowthSchedule.grow_every(["h1", "h2"], start=(32, 16), step=(32, 16), target=(256, 128), every=1)
    (a, opt_a), (b, opt_b) = pair
    before = {k: v.clone() for k, v in opt_a.state[a.enc1.weight].items()}
    assert apply_growth(schedule, 1, a.wiring, init="he", keep="first", optimizer_state=policy,
                        generator=torch.Generator().manual_seed(2))
    schedule.apply(1, b.wiring, init="he", generator=torch.Generator().manual_seed(2))
    return x, a, opt_a, b, opt_b, before


def test_reset_equals_a_newly_built_optimizer():
    from growdense.optim import Adam

    x, a, opt_a, b, _, _ = _grown_pair("reset")
    opt_b = Adam(b.parameters(), lr=1e-3)  # the study's way: a new optimizer after the growth
    _steps(a, opt_a, x, 4, 3)
    _steps(b, opt_b, x, 4, 3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name  # bit for bit
    assert opt_a.state_dict()["state"].keys() == opt_b.state_dict()["state"].keys()
    for k, s in opt_a.state_dict()["state"].items():
        for key in s:
            assert torch.equal(s[key], opt_b.state_dict()["state"][k][key]), (k, key)


def test_keep_continues_the_old_neurons_state():
    x, a, opt_a, _, _, before = _grown_pair("keep")
    state = opt_a.state[a.enc1.weight]
    assert int(state["step"]) == int(before["step"]) == 3  # not restarted
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state[key][:32, :], before[key][:32, :])  # old neurons unchanged
        assert not state[key][32:64].any()  # new neurons start from zero moments


def test_resume_continues_bit_for_bit(tmp_path):
    from growdense.experiments.config import RunSpec
    from growdense.experiments.training import ResumeError, train_run

    train, test = _tiny_data()
    cfg = _tiny_cfg()
    spec = RunSpec("2", "he", "norm")
    full = train_run(spec, cfg, train, test, checkpoint_dir=tmp_path / "a")

    def stop_after_epoch_1(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(spec, cfg, train, test, checkpoint_dir=tmp_path / "b", on_epoch=stop_after_epoch_1)
    resumed = train_run(spec, cfg, train, test, checkpoint_dir=tmp_path / "b", resume=True)
    timing = ("train_time", "epoch_time")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert len(resumed["history"]) == cfg.epochs
    assert strip(resumed["history"]) == strip(full["history"])  # exact equality of every float
    assert resumed["steps"] == full["steps"] and resumed["events"] == full["events"]
    assert resumed["estimates"] == full["estimates"] and [e["epoch"] for e in full["estimates"]] == [1, 3]
    for k, v in full["model"].state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, resumed["model"].state_dict()[k]), k
    again = train_run(spec, cfg, train, test, checkpoint_dir=tmp_path / "b", resume=True)  # finished: no training
    assert strip(again["history"]) == strip(full["history"])
    with pytest.raises(ResumeError, match="lr"):
        train_run(spec, _tiny_cfg(lr=5e-4), train, test, checkpoint_dir=tmp_path / "b", resume=True)


def test_resume_with_other_options_changes_nothing(tmp_path, capsys):
    from growdense.experiments.config import RunSpec
    from growdense.experiments.training import train_run

    train, test = _tiny_data()
    out = tmp_path / "run"
    train_run(RunSpec("fixed"), _tiny_cfg(epochs=1), train, test, checkpoint_dir=out / "checkpoints")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # refused before MNIST is even looked for: the data folder does not exist
    assert main(["reproduce", "--approach", "fixed", "--epochs", "1", "--every", "1", "--batch-size", "32",
                 "--samples", "2", "--out", str(out), "--data-dir", str(tmp_path / "none"), "--no-download",
                 "--resume", "--no-progress"]) == 2
    assert "another configuration" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_fixed_widths_and_optimizer_state_comparisons():
    import argparse

    from growdense.experiments.cli import add_arguments, config_from_args
    from growdense.experiments.reproduce import run_specs
    from growdense.experiments.training import build_run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--fixed-widths", "256x128,32x16", "--optimizer-state", "reset,keep",
                                              "--keep", "first,norm"]))
    assert cfg.optimizer_states == ("reset", "keep") and cfg.fixed_widths == ((256, 128), (32, 16))
    assert [s.name for s in run_specs(cfg)] == [
        "fixed", "fixed-32x16", "approach1-he", "approach1-he-keep", "approach2-he-first", "approach2-he-norm",
        "approach2-he-first-keep"]
    model, _, schedule = build_run(run_specs(cfg)[1], cfg, torch.device("cpu"))
    assert schedule is None and model.widths() == (32, 16)
    assert config_from_args(parser.parse_args([])).optimizer_states == ("reset",)  # the study's default
    with pytest.raises(SystemExit):
        parser.parse_args(["--optimizer-state", "zero"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--precision", "fp16"])


def _bf16_epoch():
    from growdense.experiments.config import RunSpec
    from growdense.experiments.training import build_run, train_epoch

    train, _ = _tiny_data()
    losses = {}
    for precision in ("fp32", "bf16"):
        model, opt, _ = build_run(RunSpec("fixed"), _tiny_cfg(), torch.device("cpu"))
        losses[precision] = train_epoch(model, opt, train, batch_size=32, samples=2,
                                        data_generator=torch.Generator().manual_seed(0),
                                        noise_generator=torch.Generator().manual_seed(1), precision=precision)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay float32
        assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    return losses


def test_bf16_trains_under_autocast():
    losses = _bf16_epoch()
    assert losses["bf16"].dtype == torch.float32 and torch.isfinite(losses["bf16"]).all()
    # the first step sees the same weights and data: bfloat16 has 8 bits of mantissa (relative
    # rounding 2^-8 ~ 0.4% per product, partly averaging out over sums of 784 pixels): 2%
    torch.testing.assert_close(losses["bf16"][0], losses["fp32"][0], rtol=2e-2, atol=0)


# ---- a newcomer's trial: what a failed or repeated command leaves behind -------------------------
def _snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_failed_download_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    tv = pytest.importorskip("torchvision.datasets")

    def offline(self):  # torchvision makes the folders, writes part of a file, then fails
        Path(self.raw_folder).mkdir(parents=True, exist_ok=True)
        (Path(self.raw_folder) / "train-images-idx3-ubyte.gz").write_bytes(b"partial")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(tv.MNIST, "download", offline)
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "--preset", "ci", "--data-dir", "deep/data", "--out", "runs/ci", "--no-progress"]) == 2
    assert "downloading it failed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither deep/data/MNIST/raw nor runs/ci
    # a data folder that existed keeps what it had, and only that
    (tmp_path / "mine" / "MNIST" / "raw").mkdir(parents=True)
    (tmp_path / "mine" / "MNIST" / "raw" / "notes.txt").write_text("mine")
    assert main(["reproduce", "--preset", "ci", "--data-dir", "mine", "--out", "o", "--no-progress"]) == 2
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "mine", "mine/MNIST", "mine/MNIST/raw", "mine/MNIST/raw/notes.txt"]


def test_rerun_and_resume_are_checked_and_the_final_evaluation_has_a_bar(tmp_path, capsys):
    pytest.importorskip("torchvision")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    _write_idx(tmp_path / "data" / "MNIST" / "raw", 24)
    out = tmp_path / "out"
    args = ["reproduce", "--approach", "fixed", "--epochs", "1", "--every", "1", "--batch-size", "8", "--samples", "2",
            "--iwae-ks", "1,2", "--iwae-images", "4", "--variance-ls", "1,2", "--variance-ks", "1,2",
            "--variance-repeats", "2", "--variance-images", "4", "--gap-k", "2", "--gap-images", "4",
            "--probe-images", "4", "--data-dir", str(tmp_path / "data"), "--out", str(out)]
    # --resume with nothing to resume says so (tools/run_study.sh starts and continues with --resume)
    assert main([*args, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "--resume found no checkpoint of fixed" in err and "from scratch" in err
    import shutil

    shutil.rmtree(out)
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "final evaluation" in err or "evaluating fixed" in err  # the bar of the last minute
    before = _snapshot(out)
    # rerunning over finished checkpoints without --resume: refused, nothing changed
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "growdense reproduce: error:" in err and "--resume" in err and "fixed" in err
    assert _snapshot(out) == before
    assert main([*args, "--resume", "--no-progress"]) == 0  # a finished run reloads


def test_mnist_tests_look_where_reproduce_does(tmp_path, monkeypatch):
    import mnist_data

    (tmp_path / "data" / "MNIST" / "raw").mkdir(parents=True)
    monkeypatch.delenv("GROWDENSE_MNIST_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert mnist_data.mnist_root() == tmp_path / "data"  # ./data, reproduce's default --data-dir
    (tmp_path / "elsewhere" / "MNIST" / "raw").mkdir(parents=True)
    monkeypatch.setenv("GROWDENSE_MNIST_DIR", str(tmp_path / "elsewhere"))
    assert mnist_data.mnist_root() == tmp_path / "elsewhere"
