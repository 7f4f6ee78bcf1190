"""Figures of a reproduction (matplotlib for curves, torchvision for image grids)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["write_figures"]

_COLORS = {"fixed": "tab:blue", "approach1-he": "tab:red", "approach1-zero_out": "tab:orange",
           "approach1-split": "tab:brown", "approach2-he-first": "tab:green",
           "approach2-zero_out-first": "tab:olive", "approach2-he-norm": "tab:purple",
           "approach2-split-first": "tab:brown"}


def _color(name: str) -> str | None:
    return _COLORS.get(name)


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (imported only when plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _curves(path: Path, results: Sequence[dict[str, Any]], approach: str, title: str) -> None:
    plt = _pyplot()
    chosen = [r for r in results if r["spec"].approach in ("fixed", approach)]
    if not any(r["spec"].approach == approach for r in chosen):
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    growth = sorted({e["epoch"] for r in chosen for e in r["events"]})
    for r in chosen:
        name = r["spec"].name
        ep = [h["epoch"] for h in r["history"]]
        axes[0].plot(ep, [h["train_loss"] for h in r["history"]], label=f"{name} (train)", color=_color(name))
        axes[0].plot(ep, [h["test_loss"] for h in r["history"]], ls=":", color=_color(name),
                     label=f"{name} (test)")
        axes[1].plot(ep, [h["test_elbo"] for h in r["history"]], label=name, color=_color(name))
    for ax in axes:
        for g in growth:
            ax.axvline(g, color="grey", ls="--", lw=0.7)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss: negative ELBO per image (nats)")
    axes[1].set_ylabel("test ELBO per image (nats)")
    # the first epochs dwarf the rest: show the informative range
    vals = [h["train_loss"] for r in chosen for h in r["history"][len(r["history"]) // 10 :]]
    if vals:
        lo, hi = min(vals), max(vals)
        axes[0].set_ylim(lo - 0.05 * (hi - lo) - 1, hi + 0.3 * (hi - lo) + 1)
        e = [h["test_elbo"] for r in chosen for h in r["history"][len(r["history"]) // 10 :]]
        lo, hi = min(e), max(e)
        axes[1].set_ylim(lo - 0.3 * (hi - lo) - 1, hi + 0.05 * (hi - lo) + 1)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{title} (dashed lines: growth epochs)")
    _save(fig, path)


def _steps(path: Path, results: Sequence[dict[str, Any]]) -> None:
    plt = _pyplot()
    growing = [r for r in results if r["events"]]
    if not growing:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for r in growing:
        name = r["spec"].name
        idx = [e["index"] for e in r["events"]]
        axes[0].plot(idx, [e["jump"] for e in r["events"]], "o-", label=name, color=_color(name))
        axes[1].plot(idx, [e["spike"] for e in r["events"]], "o-", label=name, color=_color(name))
    axes[0].set_ylabel("probe loss after - before growth (nats)")
    axes[0].set_title("function change at the growth event")
    axes[1].set_ylabel("max of next batches - mean of previous (nats)")
    axes[1].set_title("training-loss spike")
    for ax in axes:
        ax.set_xlabel("growth event (1 = first)")
        ax.axhline(0, color="grey", lw=0.7)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


def _step_curves(path: Path, results: Sequence[dict[str, Any]]) -> None:
    plt = _pyplot()
    growing = [r for r in results if r["events"]]
    if not growing:
        return
    fig, ax = plt.subplots(figsize=(12, 4.2))
    for r in results:
        name = r["spec"].name
        ax.plot(range(len(r["steps"])), r["steps"], lw=0.5, label=name, color=_color(name), alpha=0.8)
    vals = sorted(v for r in results for v in r["steps"][len(r["steps"]) // 10 :])
    if vals:
        ax.set_ylim(vals[0] - 2, vals[int(0.999 * (len(vals) - 1))] + 10)
    ax.set_xlabel("training step (mini-batch)")
    ax.set_ylabel("batch loss (nats per image)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def _variance(path: Path, evaluations: dict[str, Any]) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, ev in evaluations.items():
        ls = [v["L"] for v in ev["variance"]]
        axes[0].loglog(ls, [v["std"] for v in ev["variance"]], "o-", label=name, color=_color(name))
        ks = [int(k) for k in ev["iwae"]]
        axes[1].semilogx(ks, [ev["iwae"][str(k)] for k in ks], "o-", label=name, color=_color(name))
    if evaluations:
        ls = [v["L"] for v in next(iter(evaluations.values()))["variance"]]
        ref = next(iter(evaluations.values()))["variance"][0]["std"]
        axes[0].loglog(ls, [ref / l**0.5 for l in ls], "k--", lw=0.8, label="1/sqrt(L)")
    axes[0].set_xlabel("latent samples L")
    axes[0].set_ylabel("std of the ELBO estimator per image (nats)")
    axes[1].set_xlabel("importance samples K")
    axes[1].set_ylabel("IWAE bound on log p(x) (nats per image)")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    _save(fig, path)


def write_figures(out: Path, results: Sequence[dict[str, Any]], evaluations: dict[str, Any], test: torch.Tensor,
                  cfg: Any) -> list[Path]:
    """Write every figure of a reproduction under ``out/figures``; return their paths."""
    from torchvision.utils import save_image

    fig_dir = Path(out) / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    _curves(fig_dir / "approach1_loss_elbo.png", results, "1", "Approach 1 vs Fixed (study's Figure 6)")
    _curves(fig_dir / "approach2_loss_elbo.png", results, "2", "Approach 2 vs Fixed (study's Figure 7)")
    _steps(fig_dir / "growth_spikes.png", results)
    _step_curves(fig_dir / "batch_losses.png", results)
    _variance(fig_dir / "elbo_variance_iwae.png", evaluations)
    # Figure 5: first row the test digits, then one row per model (posterior-mean reconstructions)
    x = test[:16]
    rows = [x] + [r["model"].reconstruct(x) for r in results]
    save_image(torch.cat(rows).reshape(-1, 1, 28, 28).cpu(), fig_dir / "reconstructions.png", nrow=16, padding=2,
               pad_value=0.5)
    # Figure 3: 64 samples from the prior per model, the same z for every model
    for r in results:
        g = torch.Generator(device=x.device).manual_seed(cfg.seed + 9)
        imgs = r["model"].sample(64, g)
        save_image(imgs.reshape(-1, 1, 28, 28).cpu(), fig_dir / f"samples_{r['spec'].name}.png", nrow=8,
                   padding=2, pad_value=0.5)
    return sorted(fig_dir.glob("*.png"))
