"""Markdown tables and summary of a reproduction."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .output import markdown_table

__all__ = ["width_table", "write_tables", "write_summary"]


def width_table(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows (growth index, epoch, h1, h2, params) of a run, as its metrics recorded them."""
    hist = result["history"]
    rows = []
    first = result["events"][0] if result["events"] else None
    if first is not None and first["epoch"] == 0:
        rows.append({"growth": "initial", "epochs": "-", "h1": first["h1_before"], "h2": first["h2_before"],
                     "params": None})
    else:
        until = first["epoch"] - 1 if first else hist[-1]["epoch"]
        rows.append({"growth": "initial", "epochs": f"0-{until}", "h1": hist[0]["h1"], "h2": hist[0]["h2"],
                     "params": hist[0]["params"]})
    events = result["events"]
    for i, e in enumerate(events):
        end = events[i + 1]["epoch"] - 1 if i + 1 < len(events) else hist[-1]["epoch"]
        row = hist[e["epoch"]]
        rows.append({"growth": str(e["index"]), "epochs": f"{e['epoch']}-{end}", "h1": row["h1"], "h2": row["h2"],
                     "params": row["params"]})
    return rows


def _tables_md(results: Sequence[dict[str, Any]]) -> str:
    parts = []
    for approach, label in (("1", "Table 1: Approach 1"), ("2", "Table 2: Approach 2")):
        runs = [r for r in results if r["spec"].approach == approach]
        if not runs:
            continue
        r = runs[0]
        rows = width_table(r)
        same = all(width_table(o) == rows for o in runs[1:])
        parts.append(f"### {label} (widths of the encoder hidden layers, from `{r['spec'].name}`'s metrics)\n")
        parts.append(markdown_table(["growth", "epochs", "hidden layer 1", "hidden layer 2", "active parameters"],
                               [[x["growth"], x["epochs"], x["h1"], x["h2"], x["params"]] for x in rows]))
        if len(runs) > 1:
            parts.append(f"\nThe other Approach {approach} runs ({', '.join(o['spec'].name for o in runs[1:])}) "
                         f"{'have the same widths at every epoch' if same else 'DIFFER'}.\n")
        parts.append("\n")
    return "\n".join(parts)


def write_tables(out: Path, results: Sequence[dict[str, Any]], cfg: Any) -> Path:
    """Write ``tables.md``: the width tables (the study's Tables 1 and 2)."""
    path = Path(out) / "tables.md"
    path.write_text("# Width tables\n\n" + _tables_md(results))
    return path


def _f(v: Any, digits: int = 2) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def write_summary(out: Path, meta: dict[str, Any], results: Sequence[dict[str, Any]],
                  evaluations: dict[str, Any], cfg: Any) -> Path:
    """Write ``summary.md``: results per model, growth spikes, comparisons, evaluation."""
    by = {r["spec"].name: r for r in results}
    lines = ["# growdense reproduce: summary\n"]
    if meta.get("command"):
        lines.append(f"Command: `{meta['command']}`\n")
    lines.append(
        f"Preset `{cfg.preset}`; {meta['train_images']} training images, {meta['test_images']} test images; "
        f"{cfg.epochs} epochs per model, growth every {cfg.every} epochs; L = {cfg.samples}, batch "
        f"{cfg.batch_size}, Adam lr {cfg.lr}, optimizer state at growth: {', '.join(cfg.optimizer_states)}; "
        f"precision {cfg.precision}; seed {cfg.seed}; device {meta['device']} "
        f"({meta['threads']} threads); torch {meta['torch']}. Started {meta['started']}, finished "
        f"{meta.get('finished', '')}.\n")
    lines.append("Losses are per-image negative ELBO in nats (BCE summed over 784 pixels + KL). Train loss: "
                 "mean over the epoch's mini-batches; test loss: after the epoch, on the test images, L samples "
                 "with fixed noise.\n")
    ks = [str(k) for k in cfg.iwae_ks]
    kmax = ks[-1]
    header = ["model", "final h1/h2", "params", "final train loss", "final test loss", "best test loss (epoch)",
              f"test ELBO (L={cfg.samples})"] + [f"IWAE K={k}" for k in ks] + ["wall time (s)", "s/epoch"]
    rows = []
    for name, r in by.items():
        h = r["history"]
        last = h[-1]
        best = min(h, key=lambda x: x["test_loss"])
        ev = evaluations[name]
        rows.append([name, f"{last['h1']}/{last['h2']}", last["params"], _f(last["train_loss"]),
                     _f(last["test_loss"]), f"{_f(best['test_loss'])} ({best['epoch']})", _f(ev["elbo"])]
                    + [_f(ev["iwae"][k]) for k in ks] + [_f(r["wall_time"], 0), _f(r["wall_time"] / len(h), 1)])
    lines.append("## Results per model\n")
    lines.append(f"ELBO and IWAE bounds (nats per image, higher is better) on the first "
                 f"{next(iter(evaluations.values()))['iwae_images'] if evaluations else 0} test images.\n")
    lines.append(markdown_table(header, rows))

    if "fixed" in by:
        fixed = by["fixed"]["history"]
        lines.append("\n## Growing models against Fixed (test loss, nats per image; negative = below Fixed)\n")
        rows = []
        for name, r in by.items():
            if name == "fixed":
                continue
            h = r["history"]
            n = min(len(h), len(fixed))
            diff = [h[i]["test_loss"] - fixed[i]["test_loss"] for i in range(n)]
            first_event = r["events"][0]["epoch"] if r["events"] else 0
            below = [i for i in range(first_event, n) if diff[i] < 0]
            first_below = below[0] if below else None
            stays = None
            if first_below is not None:
                stays = next((i for i in range(first_below, n) if all(d < 0 for d in diff[i:])), None)
            tail = max(1, n // 8)
            rows.append([name, _f(diff[-1]), _f(sum(diff[-tail:]) / tail), first_below, stays,
                         f"{len(below)}/{n - first_event}"])
        lines.append(markdown_table(["model", "final difference", f"mean difference, last {max(1, len(fixed) // 8)} "
                                "epochs", "first epoch below Fixed (from the first growth)",
                                "below Fixed at every epoch from", "epochs below / epochs since first growth"],
                               rows))

    lines.append("\n## Growth events\n")
    lines.append("`jump`: loss on a fixed probe batch of test images (fixed noise) right after the growth minus "
                 f"right before it: how much the growth changed the function. `spike`: highest training batch loss "
                 f"in the {cfg.spike_window} steps after the growth minus the mean of the {cfg.spike_window} steps "
                 f"before it.\n")
    rows = []
    for name, r in by.items():
        for e in r["events"]:
            rows.append([name, e["index"], e["epoch"], f"{e['h1_before']}/{e['h2_before']} -> {e['h1']}/{e['h2']}",
                         _f(e["probe_before"]), _f(e["probe_after"]), _f(e["jump"]), _f(e["spike"])])
    lines.append(markdown_table(["model", "event", "epoch", "widths", "probe before", "probe after", "jump", "spike"],
                           rows))
    rows = []
    for name, r in by.items():
        ev = r["events"]
        if not ev:
            continue
        later = ev[1:] if r["spec"].approach == "2" else ev
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        rows.append([name, _f(ev[0]["jump"]), _f(ev[0]["spike"]), _f(mean([e["jump"] for e in later])),
                     _f(mean([e["spike"] for e in later])), _f(max(e["spike"] for e in ev))])
    lines.append("\n" + markdown_table(["model", "first jump", "first spike",
                                   "mean jump (growths only; Approach 2 without its cut)", "mean spike (same)",
                                   "largest spike"], rows))

    names = list(evaluations)
    if names:
        first = evaluations[names[0]]
        lines.append("\n## Variance of the log importance weight against L and K (the study's section 3.4)\n")
        lines.append(f"`log w = log p(x, z) - log q(z | x)` with z ~ q(z | x). Standard deviation (nats) over "
                     f"{first.get('variance_repeats', cfg.variance_repeats)} independent estimates per image, "
                     f"root-mean-square over {first['variance_images']} test images; mean estimate in brackets. "
                     "Both estimators have zero variance for every L and K when q(z | x) is the true posterior: "
                     "their spread measures how far the encoder is from it.\n")
        for key, field, label in (("L", "logw_variance", "L-sample mean of log w (Eq. 3.3)"),
                                  ("K", "iwae_variance", "K-sample IWAE estimate")):
            if field not in first:
                continue
            counts = [v[key] for v in first[field]]
            rows = [[n] + [f"{_f(evaluations[m][field][i]['std'], 3)} ({_f(evaluations[m][field][i]['mean'])})"
                           for m in names] for i, n in enumerate(counts)]
            lines.append(f"\n{label}:\n")
            lines.append(markdown_table([key] + names, rows))
        lines.append("\nFor comparison, the training loss's estimator (L-sample reconstruction term plus the analytic "
                     "KL, Eq. 2.16): its variance is that of log p(x | z), which does not vanish at the posterior.\n")
        ls = [v["L"] for v in first["variance"]]
        rows = [[L] + [f"{_f(evaluations[m]['variance'][i]['std'], 3)} ({_f(evaluations[m]['variance'][i]['mean'])})"
                       for m in names] for i, L in enumerate(ls)]
        lines.append(markdown_table(["L"] + names, rows))

    estimates = [e for r in results for e in r.get("estimates", [])]
    if estimates:
        lines.append("\n## IWAE gap during training\n")
        lines.append(f"At the end of the chosen epochs, from the same K = {estimates[0]['samples']} log weights per "
                     f"image on the first {estimates[0]['images']} test images: the ELBO (mean of log w), the IWAE "
                     "bound, their gap (it shrinks to 0 as q approaches the posterior) and the variance of log w.\n")
        rows = [[e["run"], e["epoch"], f"{e['h1']}/{e['h2']}", _f(e["elbo"]), _f(e["iwae"]), _f(e["gap"], 3),
                 _f(e["logw_var"], 2)] for e in estimates]
        lines.append(markdown_table(["model", "epoch", "h1/h2", "ELBO", "IWAE", "gap", "Var log w"], rows))

    lines.append("\n## Files\n")
    lines.append("`config.json` (run configuration), `metrics.csv` / `metrics.json` (per-epoch metrics of every "
                 "model), `steps.csv` (every training batch loss), `growth_events.csv`, `estimates.csv` (IWAE gap "
                 "and log-weight variance at the chosen epochs), `evaluation.json` (IWAE and estimator variances), "
                 "`tables.md` (Tables 1 and 2), `figures/` (`fixed_loss.png`: Figure 4; `approach1_loss_elbo.png`, "
                 "`approach2_loss_elbo.png`: Figures 6 and 7, loss per epoch and ELBO per mini-batch with its "
                 "spread, growth events marked; growth spikes, batch losses, estimator variances and IWAE against "
                 "L and K, the IWAE gap per epoch, reconstructions: first row the test digits then one row per "
                 f"model in the order {', '.join(by)}, prior samples per model), `checkpoints/` (final "
                 "state_dicts, and the per-epoch checkpoints `--resume` continues from).\n")
    path = Path(out) / "summary.md"
    path.write_text("\n".join(lines))
    return path
