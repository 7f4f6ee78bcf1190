"""``growdense reproduce``: the growing-VAE study (Fixed, Approach 1, Approach 2) and beyond.

Trains each model on MNIST, records per-epoch and per-step metrics, every growth event and
the IWAE gap at chosen epochs, evaluates the final models (importance-sampled
log-likelihood, variance of the log-weight estimators against L and K), and writes
CSV/JSON, figures and markdown tables to one folder. The pieces: :mod:`.config` (what is
trained), :mod:`.training` (the loop, growth, checkpoints), :mod:`.evaluation`,
:mod:`.output`, :mod:`.plots`, :mod:`.report`; the command line is :mod:`.cli`.
"""

from __future__ import annotations

import math
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .config import PRESETS, ReproduceConfig, RunSpec, check_config, check_writable, make_schedule, resolve_device, run_specs
from .evaluation import evaluate_run, evaluation_steps
from .output import write_csv, write_json
from .training import check_checkpoints, train_run

__all__ = ["ReproduceConfig", "RunSpec", "PRESETS", "run_specs", "make_schedule", "train_run", "reproduce"]


def reproduce(cfg: ReproduceConfig, argv: Optional[Sequence[str]] = None, *, resume: bool = False) -> Path:
    """Run the reproduction described by ``cfg``; return the output folder.

    Every run writes a checkpoint after each epoch under ``out/checkpoints``; with ``resume``
    runs continue from those (finished runs are not retrained), ending exactly as an
    uninterrupted reproduction. Raises (before anything is written): :class:`~.config.ConfigError`
    for a configuration that cannot run; :class:`~.training.ResumeError` when ``out`` already
    holds checkpoints of these runs and ``resume`` is off (they would be overwritten), or when
    they were written by another configuration (with ``resume``, runs without a checkpoint
    start from scratch, and stderr says which);
    :class:`~.data.MnistNotFoundError` when MNIST is neither there nor downloadable (a failed
    download leaves no folder behind).
    """
    from . import plots, report
    from .data import load_mnist

    check_config(cfg)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    check_writable(out)
    specs = run_specs(cfg)
    fresh = check_checkpoints(specs, cfg, out / "checkpoints", resume=resume)  # refuses before anything is written
    if resume and fresh:
        print(f"growdense reproduce: --resume found no checkpoint of {', '.join(fresh)} in {out / 'checkpoints'}: "
              f"{'they start' if len(fresh) > 1 else 'it starts'} from scratch", file=sys.stderr, flush=True)
    train, test = load_mnist(cfg.data_dir, train_subset=cfg.train_subset, test_subset=cfg.test_subset,
                             seed=cfg.seed, download=cfg.download)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    train, test = train.to(device), test.to(device)
    meta: dict[str, Any] = {
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
        "resumed": bool(resume),
    }
    write_json(out / "config.json", meta)

    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs * len(specs), unit="epoch", dynamic_ncols=True)
    results = []
    try:
        for spec in specs:
            def progress(row, name=spec.name):
                if bar is not None:
                    bar.set_description(name)
                    bar.set_postfix(epoch=row["epoch"], loss=f"{row['train_loss']:.2f}",
                                    test=f"{row['test_loss']:.2f}", widths=f"{row['h1']}/{row['h2']}")
                    bar.update(1)

            res = train_run(spec, cfg, train, test, checkpoint_dir=out / "checkpoints", resume=resume,
                            on_epoch=progress)
            if bar is not None:
                bar.n = len(results) * cfg.epochs + len(res["history"])
                bar.refresh()
            torch.save(res["model"].state_dict(), out / "checkpoints" / f"{spec.name}.pt")
            results.append(res)
            write_csv(out / "metrics_partial.csv", [row for r in results for row in r["history"]])
    finally:
        if bar is not None:
            bar.close()
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(results) * evaluation_steps(cfg), unit="step", desc="final evaluation",
                   dynamic_ncols=True)
    try:
        evaluations = {}
        for res in results:
            name = res["spec"].name

            def step(what, name=name):
                if bar is not None:
                    bar.set_description(f"evaluating {name}: {what}")
                    bar.update(1)

            evaluations[name] = evaluate_run(res["model"], test, cfg, on_step=step)
    finally:
        if bar is not None:
            bar.close()

    history = [row for r in results for row in r["history"]]
    events = [e for r in results for e in r["events"]]
    per_epoch = math.ceil(train.shape[0] / cfg.batch_size)
    steps = [{"run": r["spec"].name, "step": i, "epoch": i // per_epoch, "loss": v}
             for r in results for i, v in enumerate(r["steps"])]
    write_csv(out / "metrics.csv", history)
    (out / "metrics_partial.csv").unlink(missing_ok=True)  # superseded by metrics.csv
    write_csv(out / "steps.csv", steps)
    write_csv(out / "growth_events.csv", events)
    write_csv(out / "estimates.csv", [e for r in results for e in r["estimates"]])
    summary_runs = {}
    for r in results:
        spec = r["spec"]
        summary_runs[spec.name] = {
            "approach": spec.approach, "init": spec.init, "keep": spec.keep,
            "optimizer_state": spec.optimizer_state, "widths": spec.widths,
            "wall_time": r["wall_time"], "history": r["history"], "events": r["events"],
            "estimates": r["estimates"], "evaluation": evaluations[spec.name],
        }
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(out / "config.json", meta)
    write_json(out / "metrics.json", {"config": meta, "runs": summary_runs})
    write_json(out / "evaluation.json", evaluations)

    plots.write_figures(out, results, evaluations, test, cfg)
    report.write_tables(out, results, cfg)
    report.write_summary(out, meta, results, evaluations, cfg)
    return out
