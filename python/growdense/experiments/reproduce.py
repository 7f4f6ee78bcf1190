"""``growdense reproduce``: the growing-VAE study (Fixed, Approach 1, Approach 2) and beyond.

Trains each model on MNIST, records per-epoch and per-step metrics and every growth
event, evaluates the final models (importance-sampled log-likelihood, ELBO variance as a
function of L), and writes CSV/JSON, figures and markdown tables to one folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..models.evaluation import elbo_estimates, elbo_variance, iwae_bound
from ..models.vae import VAE, bernoulli_nll, gaussian_kl, negative_elbo
from ..schedule import GrowthSchedule

__all__ = ["ReproduceConfig", "RunSpec", "PRESETS", "run_specs", "make_schedule", "train_run", "reproduce",
           "add_arguments", "config_from_args", "main"]

APPROACHES = ("fixed", "1", "2", "all")


@dataclass
class ReproduceConfig:
    """Everything a reproduction depends on (saved as ``config.json``)."""

    approach: str = "all"
    epochs: int = 200
    every: int = 25
    inits: tuple[str, ...] = ("he",)
    keeps: tuple[str, ...] = ("first",)
    start: tuple[int, int] = (32, 16)
    step: tuple[int, int] = (32, 16)
    target: tuple[int, int] = (256, 128)
    latent: int = 20
    samples: int = 20
    lr: float = 1e-3
    batch_size: int = 128
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    data_dir: str = "./data"
    out: str = "runs/reproduce"
    iwae_ks: tuple[int, ...] = (1, 10, 100, 1000)
    iwae_images: Optional[int] = None
    variance_ls: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)
    variance_repeats: int = 20
    variance_images: int = 500
    probe_images: int = 1000
    spike_window: int = 10
    progress: bool = True
    preset: str = "study"


PRESETS: dict[str, dict[str, Any]] = {
    # the study: 200 epochs, growth every 25, all of MNIST, full test set
    "study": {},
    # all three models on a subset in a few minutes on 2 CPU cores
    "quick": dict(epochs=16, every=2, train_subset=3000, test_subset=1000, iwae_images=200,
                  variance_images=100, variance_repeats=10, probe_images=500, out="runs/quick"),
    # the smallest run that exercises every path (CI): every growth, both inits, both keeps
    "ci": dict(epochs=8, every=1, train_subset=384, test_subset=128, inits=("he", "zero_out"),
               keeps=("first", "norm"), iwae_ks=(1, 10, 100, 1000), iwae_images=16, variance_ls=(1, 5, 20),
               variance_repeats=4, variance_images=16, probe_images=64, spike_window=2, out="runs/ci"),
}


@dataclass(frozen=True)
class RunSpec:
    """One trained model: its approach (``fixed``, ``1``, ``2``), init and keep strategies."""

    approach: str
    init: str = "he"
    keep: str = "first"

    @property
    def name(self) -> str:
        if self.approach == "fixed":
            return "fixed"
        if self.approach == "1":
            return f"approach1-{self.init}"
        return f"approach2-{self.init}-{self.keep}"


def run_specs(cfg: ReproduceConfig) -> list[RunSpec]:
    """The models to train: Fixed; Approach 1 per init; Approach 2 per init (first keep)
    and per further keep (first init). One factor varies at a time."""
    if cfg.approach not in APPROACHES:
        raise ValueError(f"unknown approach {cfg.approach!r}; expected one of {APPROACHES}")
    specs = []
    if cfg.approach in ("fixed", "all"):
        specs.append(RunSpec("fixed"))
    if cfg.approach in ("1", "all"):
        specs += [RunSpec("1", init) for init in cfg.inits]
    if cfg.approach in ("2", "all"):
        specs += [RunSpec("2", init, cfg.keeps[0]) for init in cfg.inits]
        specs += [RunSpec("2", cfg.inits[0], keep) for keep in cfg.keeps[1:]]
    return specs


def make_schedule(spec: RunSpec, cfg: ReproduceConfig):
    """The ``GrowthSchedule`` of a run (``None`` for Fixed)."""
    if spec.approach == "fixed":
        return None
    names = ["h1", "h2"]
    if spec.approach == "1":
        return GrowthSchedule.grow_every(names, start=cfg.start, step=cfg.step, target=cfg.target, every=cfg.every)
    return GrowthSchedule.prune_then_regrow(
        names, full=cfg.target, cut_to=cfg.start, step=cfg.step, at=cfg.every, every=cfg.every
    )


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def evaluate_loss(model: VAE, x: torch.Tensor, samples: int, seed: int, batch_size: int = 500) -> dict[str, float]:
    """Mean per-image negative ELBO (and its two terms) on ``x``, with fixed noise ``seed``."""
    was_training = model.training
    model.eval()
    g = _generator(x.device, seed)
    total = rec = kl = 0.0
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        logits, mu, logvar = model(xb, samples, g)
        r = bernoulli_nll(logits, xb).mean(0)
        k = gaussian_kl(mu, logvar)
        rec += r.sum().item()
        kl += k.sum().item()
    model.train(was_training)
    n = x.shape[0]
    return {"loss": (rec + kl) / n, "rec": rec / n, "kl": kl / n}


def train_run(
    spec: RunSpec,
    cfg: ReproduceConfig,
    train: torch.Tensor,
    test: torch.Tensor,
    bar: Any = None,
) -> dict[str, Any]:
    """Train one model; return its history, steps, growth events, wall time and the model."""
    device = train.device
    torch.manual_seed(cfg.seed)
    schedule = make_schedule(spec, cfg)
    if schedule is None:
        h1, h2 = cfg.target
    else:
        w0 = schedule.initial_widths()
        h1, h2 = w0["h1"], w0["h2"]
    model = VAE(h1, h2, capacity=cfg.target, latent=cfg.latent, device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.attach_optimizer(optimizer)
    grow_gen = _generator(device, cfg.seed + 1)
    data_gen = torch.Generator().manual_seed(cfg.seed + 2)
    noise_gen = _generator(device, cfg.seed + 3)
    probe = test[: cfg.probe_images]

    history: list[dict[str, Any]] = []
    steps: list[float] = []
    events: list[dict[str, Any]] = []
    n = train.shape[0]
    t_run = time.perf_counter()
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        grew = False
        if schedule is not None and epoch in schedule.growth_epochs():
            before_w = model.widths()
            before = evaluate_loss(model, probe, cfg.samples, cfg.seed + 5)["loss"]
            grew = bool(schedule.apply(epoch, model.wiring, init=spec.init, keep=spec.keep, generator=grow_gen))
            if grew:
                after = evaluate_loss(model, probe, cfg.samples, cfg.seed + 5)["loss"]
                events.append({"run": spec.name, "index": len(events) + 1, "epoch": epoch, "step": len(steps),
                               "h1_before": before_w[0], "h2_before": before_w[1],
                               "h1": model.widths()[0], "h2": model.widths()[1],
                               "probe_before": before, "probe_after": after, "jump": after - before})
        model.train()
        perm = torch.randperm(n, generator=data_gen).to(device)
        total = 0.0
        for start in range(0, n, cfg.batch_size):
            xb = train[perm[start : start + cfg.batch_size]]
            logits, mu, logvar = model(xb, cfg.samples, noise_gen)
            loss = negative_elbo(xb, logits, mu, logvar).mean()
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            optimizer.step()
            value = loss.item()
            steps.append(value)
            total += value * xb.shape[0]
        train_loss = total / n
        ev = evaluate_loss(model, test, cfg.samples, cfg.seed + 4)
        h1, h2 = model.widths()
        history.append({
            "run": spec.name, "epoch": epoch, "h1": h1, "h2": h2, "params": model.num_parameters(),
            "grew": int(grew), "train_loss": train_loss, "test_loss": ev["loss"], "test_elbo": -ev["loss"],
            "test_rec": ev["rec"], "test_kl": ev["kl"], "epoch_time": time.perf_counter() - t0,
        })
        if bar is not None:
            bar.set_description(spec.name)
            bar.set_postfix(epoch=epoch, loss=f"{train_loss:.2f}", test=f"{ev['loss']:.2f}", widths=f"{h1}/{h2}")
            bar.update(1)
    wall = time.perf_counter() - t_run
    w = cfg.spike_window
    for ev_ in events:
        s = ev_["step"]
        pre = steps[max(0, s - w) : s]
        post = steps[s : s + w]
        ev_["pre_mean"] = sum(pre) / len(pre) if pre else float("nan")
        ev_["post_max"] = max(post) if post else float("nan")
        ev_["spike"] = ev_["post_max"] - ev_["pre_mean"]
    return {"spec": spec, "history": history, "steps": steps, "events": events, "wall_time": wall, "model": model}


def evaluate_run(model: VAE, test: torch.Tensor, cfg: ReproduceConfig) -> dict[str, Any]:
    """IWAE bounds for each K and the ELBO on the same images; ELBO variance against L."""
    x = test if cfg.iwae_images is None else test[: cfg.iwae_images]
    out: dict[str, Any] = {"iwae_images": int(x.shape[0])}
    g = _generator(x.device, cfg.seed + 6)
    elbo = elbo_estimates(model, x, cfg.samples, 1, generator=g)[0]
    out["elbo"] = elbo.mean().item()
    out["iwae"] = {}
    t0 = time.perf_counter()
    for k in cfg.iwae_ks:
        out["iwae"][str(k)] = iwae_bound(model, x, k, generator=_generator(x.device, cfg.seed + 7 + k)).mean().item()
    out["iwae_time"] = time.perf_counter() - t0
    xv = test[: cfg.variance_images]
    out["variance_images"] = int(xv.shape[0])
    out["variance"] = elbo_variance(model, xv, cfg.variance_ls, cfg.variance_repeats,
                                    generator=_generator(x.device, cfg.seed + 8))
    return out


# ---- writing ---------------------------------------------------------------------------
def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        path.write_text("")
        return
    keys = list(rows[0])
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def reproduce(cfg: ReproduceConfig, argv: Optional[Sequence[str]] = None) -> Path:
    """Run the reproduction described by ``cfg``; return the output folder."""
    from . import plots, report
    from .data import load_mnist

    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    train, test = load_mnist(cfg.data_dir, train_subset=cfg.train_subset, test_subset=cfg.test_subset,
                             seed=cfg.seed)
    train, test = train.to(device), test.to(device)
    specs = run_specs(cfg)
    meta = {
        "config": asdict(cfg),
        "command": "growdense reproduce " + " ".join(argv) if argv is not None else None,
        "runs": [s.name for s in specs],
        "device": str(device),
        "train_images": int(train.shape[0]),
        "test_images": int(test.shape[0]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (out / "config.json").write_text(json.dumps(_jsonable(meta), indent=2))

    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs * len(specs), unit="epoch", dynamic_ncols=True)
    results = []
    try:
        for spec in specs:
            res = train_run(spec, cfg, train, test, bar)
            torch.save(res["model"].state_dict(), out / "checkpoints" / f"{spec.name}.pt")
            results.append(res)
            _write_csv(out / "metrics_partial.csv", [row for r in results for row in r["history"]])
    finally:
        if bar is not None:
            bar.close()
    evaluations = {}
    for res in results:
        evaluations[res["spec"].name] = evaluate_run(res["model"], test, cfg)

    history = [row for r in results for row in r["history"]]
    events = [e for r in results for e in r["events"]]
    steps = [{"run": r["spec"].name, "step": i, "epoch": i // math.ceil(train.shape[0] / cfg.batch_size),
              "loss": v} for r in results for i, v in enumerate(r["steps"])]
    _write_csv(out / "metrics.csv", history)
    (out / "metrics_partial.csv").unlink(missing_ok=True)  # superseded by metrics.csv
    _write_csv(out / "steps.csv", steps)
    _write_csv(out / "growth_events.csv", events)
    summary_runs = {}
    for r in results:
        name = r["spec"].name
        summary_runs[name] = {
            "approach": r["spec"].approach, "init": r["spec"].init, "keep": r["spec"].keep,
            "wall_time": r["wall_time"], "history": r["history"], "events": r["events"],
            "evaluation": evaluations[name],
        }
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (out / "config.json").write_text(json.dumps(_jsonable(meta), indent=2))
    (out / "metrics.json").write_text(json.dumps(_jsonable({"config": meta, "runs": summary_runs}), indent=2))
    (out / "evaluation.json").write_text(json.dumps(_jsonable(evaluations), indent=2))

    plots.write_figures(out, results, evaluations, test, cfg)
    report.write_tables(out, results, cfg)
    report.write_summary(out, meta, results, evaluations, cfg)
    return out


# ---- command line --------------------------------------------------------------------
def _csv_list(kind):
    def parse(text: str):
        return tuple(kind(v) for v in text.split(",") if v)

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``reproduce`` options (defaults: the study's, or the chosen preset's)."""
    p = parser
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="study (default: 200 epochs, growth every 25, all data), quick, or ci")
    p.add_argument("--quick", action="store_true", help="same as --preset quick: all three models on a "
                   "3,000-image subset, 16 epochs, growth every 2 (a few minutes on 2 CPU cores)")
    p.add_argument("--approach", choices=APPROACHES, help="fixed, 1, 2 or all (default all)")
    p.add_argument("--epochs", type=int, help="training epochs per model (study: 200)")
    p.add_argument("--every", "--growth-interval", dest="every", type=int,
                   help="epochs between growths; Approach 2 cuts at this epoch (study: 25)")
    p.add_argument("--init", dest="inits", type=_csv_list(str),
                   help="init strategy of new neurons, comma-separated to compare: he (study), zero_out, split")
    p.add_argument("--keep", dest="keeps", type=_csv_list(str),
                   help="which neurons Approach 2 keeps at the cut, comma-separated to compare: first (study), norm")
    p.add_argument("--device", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, help="seed of weights, data order, noise and growth (default 0)")
    p.add_argument("--train-subset", type=int, help="train on this many training images (default all 60,000)")
    p.add_argument("--test-subset", type=int, help="evaluate on the first this many test images (default 10,000)")
    p.add_argument("--data-dir", help="folder holding MNIST/raw (torchvision layout; default ./data)")
    p.add_argument("--out", help="output folder (default runs/reproduce)")
    p.add_argument("--samples", type=int, help="latent samples L per image (study: 20)")
    p.add_argument("--lr", type=float, help="Adam learning rate (study: 1e-3)")
    p.add_argument("--batch-size", type=int, help="mini-batch size (study: 128)")
    p.add_argument("--iwae-ks", type=_csv_list(int), help="importance samples K for the IWAE bound (default 1,10,100,1000)")
    p.add_argument("--iwae-images", type=int, help="test images for the IWAE bound (default all test images)")
    p.add_argument("--variance-ls", type=_csv_list(int), help="L values for the ELBO variance (default 1,2,5,10,20,50,100)")
    p.add_argument("--variance-repeats", type=int, help="independent ELBO draws per image and L (default 20)")
    p.add_argument("--variance-images", type=int, help="test images for the ELBO variance (default 500)")
    p.add_argument("--probe-images", type=int, help="test images of the loss probe around each growth (default 1000)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")


def config_from_args(args: argparse.Namespace) -> ReproduceConfig:
    """Preset defaults, then every option given explicitly."""
    preset = "quick" if args.quick and args.preset is None else (args.preset or "study")
    cfg = replace(ReproduceConfig(), preset=preset, **PRESETS[preset])
    given = {f.name: getattr(args, f.name) for f in fields(ReproduceConfig)
             if f.name != "preset" and getattr(args, f.name, None) is not None}
    cfg = replace(cfg, **given)
    if cfg.epochs < 1 or cfg.every < 1:
        raise SystemExit("--epochs and --every must be >= 1")
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="growdense reproduce", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_from_args(args, list(argv) if argv is not None else sys.argv[1:])


def run_from_args(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run ``reproduce`` for parsed arguments; print where the results are."""
    from .data import MnistNotFoundError

    cfg = config_from_args(args)
    try:
        out = reproduce(cfg, argv)
    except MnistNotFoundError as error:
        print(f"growdense reproduce: {error}", file=sys.stderr)
        return 2
    print(f"results in {out}/ (summary.md, tables.md, metrics.csv, figures/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
