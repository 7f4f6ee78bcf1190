"""Figures of a reproduction (matplotlib for curves, torchvision for image grids)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

__all__ = ["write_figures", "training_figures", "image_figures", "reconstructions_figure", "to_pixels"]

# One colour per model within each approach's figure (Approach 1's and Approach 2's models
# are never drawn together, so the two sets may share colours).
_COLORS = {"fixed": "tab:blue", "fixed-32x16": "tab:cyan",
           "approach1-he": "tab:red", "approach1-zero_out": "tab:orange", "approach1-he-keep": "tab:pink",
           "approach1-split": "tab:olive", "approach1-gradmax": "black", "approach1-tiny": "tab:brown",
           "approach1-gradmax-keep": "tab:gray", "approach1-tiny-keep": "gold",
           "approach2-he-first": "tab:green", "approach2-zero_out-first": "tab:olive",
           "approach2-he-norm": "tab:purple", "approach2-he-first-keep": "tab:gray", "approach2-split-first": "tab:red",
           "approach2-gradmax-first": "black", "approach2-tiny-first": "tab:brown",
           "approach2-gradmax-first-keep": "tab:pink", "approach2-tiny-first-keep": "tab:orange"}


def _color(name: str) -> str | None:
    return _COLORS.get(name)


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (imported only when plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, *, crop: bool = False) -> Path:
    """Write ``fig``; ``crop`` fits the image to what is drawn, a legend outside the axes too."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight" if crop else None)
    plt.close(fig)
    return path


def _steps_per_epoch(r: dict[str, Any]) -> int:
    return max(1, len(r["steps"]) // max(1, len(r["history"])))


def _batch_elbo(ax, r: dict[str, Any], growth_lines: bool = True) -> None:
    """ELBO per mini-batch (thin), its per-epoch mean and +-1 std over that epoch's mini-batches
    (line and band), growth events marked at their mini-batch; nothing for a model whose
    mini-batch losses are not known."""
    import numpy as np

    if not r["steps"]:
        return
    name = r["spec"].name
    per = _steps_per_epoch(r)
    elbo = -np.asarray(r["steps"], dtype=float)
    n_ep = len(elbo) // per
    ax.plot(np.arange(len(elbo)), elbo, lw=0.3, alpha=0.25, color=_color(name))
    if n_ep:
        e = elbo[: n_ep * per].reshape(n_ep, per)
        centre = np.arange(n_ep) * per + per / 2
        mean, std = e.mean(1), e.std(1)
        ax.plot(centre, mean, lw=1.2, color=_color(name), label=f"{name}: epoch mean ± std")
        ax.fill_between(centre, mean - std, mean + std, alpha=0.25, color=_color(name), lw=0)
    if growth_lines:
        for ev in r["events"]:
            ax.axvline(ev["step"], color=_color(name) or "grey", ls="--", lw=0.7)


def _elbo_limits(ax, results: Sequence[dict[str, Any]]) -> None:
    """Show the informative range: the first epochs' ELBO dwarfs the rest."""
    vals = sorted(-v for r in results for v in r["steps"][len(r["steps"]) // 10 :])
    if vals:
        ax.set_ylim(vals[int(0.001 * (len(vals) - 1))] - 10, vals[-1] + 2)


def _curves(path: Path, results: Sequence[dict[str, Any]], approach: str, title: str) -> Path | None:
    """The study's Figures 6 and 7: the loss per epoch (left) and the ELBO per mini-batch with its
    spread (right), Fixed against one approach, growth epochs marked. A fixed model at other
    widths (the starting 32/16 from scratch) is drawn with Approach 1, which starts there."""
    plt = _pyplot()
    chosen = [r for r in results if r["spec"].approach == approach
              or (r["spec"].approach == "fixed" and (r["spec"].widths is None or approach == "1"))]
    if not any(r["spec"].approach == approach for r in chosen) or not any(r["steps"] for r in chosen):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    growth = sorted({e["epoch"] for r in chosen for e in r["events"]})
    for r in chosen:
        name = r["spec"].name
        ep = [h["epoch"] for h in r["history"]]
        axes[0].plot(ep, [h["train_loss"] for h in r["history"]], label=f"{name} (train)", color=_color(name))
        axes[0].plot(ep, [h["test_loss"] for h in r["history"]], ls=":", color=_color(name),
                     label=f"{name} (test)")
        _batch_elbo(axes[1], r)
    for g in growth:
        axes[0].axvline(g, color="grey", ls="--", lw=0.7)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss: negative ELBO per image (nats)")
    axes[1].set_xlabel("mini-batch")
    axes[1].set_ylabel("training ELBO per image, per mini-batch (nats)")
    vals = [h["train_loss"] for r in chosen for h in r["history"][len(r["history"]) // 10 :]]
    if vals:
        lo, hi = min(vals), max(vals)
        axes[0].set_ylim(lo - 0.05 * (hi - lo) - 1, hi + 0.3 * (hi - lo) + 1)
    _elbo_limits(axes[1], chosen)
    unknown = [r["spec"].name for r in chosen if not r["steps"]]
    if unknown:
        axes[1].text(0.02, 0.98, "mini-batch losses not kept: " + ", ".join(unknown), transform=axes[1].transAxes,
                     fontsize=7, color="grey", va="top")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title} (dashed lines: growth events)")
    return _save(fig, path)


def _fixed_loss(path: Path, results: Sequence[dict[str, Any]]) -> Path | None:
    """The study's Figure 4: the fixed (target) model's training loss on its own."""
    plt = _pyplot()
    fixed = [r for r in results if r["spec"].approach == "fixed"]
    if not fixed:
        return None
    r = next((f for f in fixed if f["spec"].widths is None), fixed[0])
    if not r["steps"]:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ep = [h["epoch"] for h in r["history"]]
    axes[0].plot(ep, [h["train_loss"] for h in r["history"]], color=_color("fixed"), label="train (epoch mean)")
    axes[0].plot(ep, [h["test_loss"] for h in r["history"]], ls=":", color=_color("fixed"), label="test")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss: negative ELBO per image (nats)")
    steps = r["steps"]
    axes[1].plot(range(len(steps)), steps, lw=0.4, color=_color("fixed"))
    tail = sorted(steps[len(steps) // 10 :])
    if tail:
        axes[1].set_ylim(tail[0] - 2, tail[int(0.999 * (len(tail) - 1))] + 10)
    axes[1].set_xlabel("mini-batch")
    axes[1].set_ylabel("training loss per mini-batch (nats per image)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    w = r["spec"].widths
    fig.suptitle(f"{r['spec'].name} ({'256/128' if w is None else f'{w[0]}/{w[1]}'}): training loss "
                 f"(study's Figure 4)")
    return _save(fig, path)


def _steps(path: Path, results: Sequence[dict[str, Any]]) -> Path | None:
    plt = _pyplot()
    growing = [r for r in results if r["events"]]
    if not growing:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for r in growing:
        name = r["spec"].name
        idx = [e["index"] for e in r["events"]]
        axes[0].plot(idx, [e["jump"] for e in r["events"]], "o-", label=name, color=_color(name))
        axes[1].plot(idx, [e.get("spike", float("nan")) for e in r["events"]], "o-", label=name, color=_color(name))
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
    return _save(fig, path)


def _step_curves(path: Path, results: Sequence[dict[str, Any]]) -> Path | None:
    """Every mini-batch loss of every model, each model's growth events marked in its colour."""
    plt = _pyplot()
    results = [r for r in results if r["steps"]]
    if not any(r["events"] for r in results):
        return None
    fig, ax = plt.subplots(figsize=(12, 4.2))
    for r in results:
        name = r["spec"].name
        ax.plot(range(len(r["steps"])), r["steps"], lw=0.5, label=name, color=_color(name), alpha=0.8)
        for ev in r["events"]:
            ax.axvline(ev["step"], color=_color(name) or "grey", ls="--", lw=0.6, alpha=0.8)
    vals = sorted(v for r in results for v in r["steps"][len(r["steps"]) // 10 :])
    if vals:
        ax.set_ylim(vals[0] - 2, vals[int(0.999 * (len(vals) - 1))] + 10)
    ax.set_xlabel("training step (mini-batch); dashed: growth events")
    ax.set_ylabel("batch loss (nats per image)")
    ax.set_title("Training loss of every mini-batch, per model (dashed lines: its growth events)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _variance(path: Path, evaluations: dict[str, Any]) -> Path:
    """Std of the log-weight estimators against L and K (zero at the true posterior), the
    analytic-KL training estimator for comparison, and the IWAE bound against K."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for name, ev in evaluations.items():
        c = _color(name)
        rows = ev.get("logw_variance", [])
        axes[0].loglog([v["L"] for v in rows], [v["std"] for v in rows], "o-", label=f"{name}: mean of log w", color=c)
        axes[0].loglog([v["L"] for v in ev["variance"]], [v["std"] for v in ev["variance"]], "x:", color=c,
                       label=f"{name}: analytic-KL estimator")
        rows = ev.get("iwae_variance", [])
        axes[1].loglog([v["K"] for v in rows], [v["std"] for v in rows], "o-", label=name, color=c)
        ks = [int(k) for k in ev["iwae"]]
        axes[2].semilogx(ks, [ev["iwae"][str(k)] for k in ks], "o-", label=name, color=c)
    axes[0].set_xlabel("latent samples L")
    axes[0].set_ylabel("std of the L-sample ELBO estimate per image (nats)")
    axes[1].set_xlabel("importance samples K")
    axes[1].set_ylabel("std of the K-sample IWAE estimate per image (nats)")
    axes[2].set_xlabel("importance samples K")
    axes[2].set_ylabel("IWAE bound on log p(x) (nats per image)")
    axes[0].set_title("spread of the ELBO estimators against L")
    axes[1].set_title("spread of the IWAE estimator against K")
    axes[2].set_title("IWAE bound against K")
    fig.suptitle("Final models: estimator spread (std over repeats, per test image) and the IWAE bound")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    return _save(fig, path)


def _gap(path: Path, results: Sequence[dict[str, Any]]) -> Path | None:
    """The IWAE gap and the variance of log w at the chosen epochs, per model."""
    plt = _pyplot()
    with_estimates = [r for r in results if r["estimates"]]
    if not with_estimates:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for r in with_estimates:
        name = r["spec"].name
        ep = [e["epoch"] for e in r["estimates"]]
        axes[0].plot(ep, [e["gap"] for e in r["estimates"]], "o-", label=name, color=_color(name))
        axes[1].semilogy(ep, [e["logw_var"] for e in r["estimates"]], "o-", label=name, color=_color(name))
    k = with_estimates[0]["estimates"][0]["samples"]
    axes[0].set_ylabel(f"IWAE (K={k}) - ELBO, test images (nats)")
    axes[1].set_ylabel("variance of log w per image (nats²)")
    axes[0].set_title(f"IWAE gap (K={k})")
    axes[1].set_title("variance of the log-weights")
    fig.suptitle("During training: IWAE gap and log-weight variance at the chosen epochs")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3, which="both")
    # One legend for both panels, outside them: with many models it would hide their points.
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    return _save(fig, path, crop=True)


def training_figures(fig_dir: Path, results: Sequence[dict[str, Any]]) -> list[Path]:
    """The figures drawn from the training records alone (``spec``, ``history``, ``steps``,
    ``events`` with their spikes, ``estimates``): the study's Figures 4, 6 and 7, the growth
    spikes, every mini-batch loss and the IWAE gap. Figures whose models are absent are skipped;
    returns the paths drawn."""
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    drawn = [_fixed_loss(fig_dir / "fixed_loss.png", results),
             _curves(fig_dir / "approach1_loss_elbo.png", results, "1", "Approach 1 vs Fixed (study's Figure 6)"),
             _curves(fig_dir / "approach2_loss_elbo.png", results, "2", "Approach 2 vs Fixed (study's Figure 7)"),
             _steps(fig_dir / "growth_spikes.png", results),
             _step_curves(fig_dir / "batch_losses.png", results),
             _gap(fig_dir / "iwae_gap.png", results)]
    return [path for path in drawn if path is not None]


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as the uint8 pixels an image grid stores (the rounding of
    ``torchvision.utils.save_image``), so a figure drawn again from them is the same file."""
    return images.detach().mul(255).add(0.5).clamp(0, 255).to(torch.uint8).cpu()


def reconstructions_figure(path: Path, test: torch.Tensor, rows: Sequence[torch.Tensor],
                           labels: Optional[Sequence[str]] = None) -> Path:
    """The study's Figure 5: the first row ``test`` (16 digits), then one row per model of their
    posterior-mean reconstructions (float in [0, 1], or uint8 pixels from :func:`to_pixels`).

    The grid is ``torchvision.utils.save_image``'s (16 tiles a row, padding 2); ``labels`` (one
    per model row) name the rows in a strip to the right of it, the first row "test images"."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    rows = [r.float().div(255) if r.dtype == torch.uint8 else r.float() for r in [test, *rows]]
    grid = make_grid(torch.cat([r.cpu().reshape(-1, 784) for r in rows]).reshape(-1, 1, 28, 28), nrow=16,
                     padding=2, pad_value=0.5)
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()  # save_image's
    image = Image.fromarray(pixels)
    if labels is not None:
        names = ["test images", *labels]
        if len(names) != len(rows):
            raise ValueError(f"{len(rows) - 1} model rows but {len(labels)} labels")
        draw = ImageDraw.Draw(image)
        width = 8 + max(int(draw.textlength(name)) for name in names)
        labelled = Image.new("RGB", (image.width + width, image.height), (255, 255, 255))
        labelled.paste(image, (0, 0))
        draw = ImageDraw.Draw(labelled)
        for i, name in enumerate(names):
            draw.text((image.width + 4, 2 + 30 * i + 9), name, fill=(0, 0, 0))
        image = labelled
    image.save(path)
    return Path(path)


def image_figures(fig_dir: Path, models: Sequence[tuple[str, Any]], seed: int,
                  test: torch.Tensor | None = None) -> list[Path]:
    """The study's Figure 3 (64 samples from the prior per model, the same z for every model:
    ``samples_<name>.png``) and, given ``test`` images, its Figure 5 (first row 16 test digits,
    then one row of posterior-mean reconstructions per model: ``reconstructions.png``)."""
    from torchvision.utils import save_image

    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if test is not None:
        x = test[:16]
        written.append(reconstructions_figure(fig_dir / "reconstructions.png", x,
                                              [model.reconstruct(x) for _, model in models],
                                              [name for name, _ in models]))
    for name, model in models:
        g = torch.Generator(device=model.dec1.weight.device).manual_seed(seed + 9)
        path = fig_dir / f"samples_{name}.png"
        save_image(model.sample(64, g).reshape(-1, 1, 28, 28).cpu(), path, nrow=8, padding=2, pad_value=0.5)
        written.append(path)
    return written


def write_figures(out: Path, results: Sequence[dict[str, Any]], evaluations: dict[str, Any], test: torch.Tensor,
                  cfg: Any) -> list[Path]:
    """Write every figure of a reproduction under ``out/figures``; return their paths."""
    fig_dir = Path(out) / "figures"
    drawn = training_figures(fig_dir, results)
    drawn.append(_variance(fig_dir / "elbo_variance_iwae.png", evaluations))
    drawn += image_figures(fig_dir, [(r["spec"].name, r["model"]) for r in results], cfg.seed, test)
    return sorted(drawn)
