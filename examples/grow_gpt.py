"""Grow a small GPT while it trains: growdense in place against a fixed model and against rebuilding.

A character-level GPT (2 blocks, pre-norm, learned positions) learns the docstrings of a
fixed list of Python standard-library modules (:func:`stdlib_docstrings`: the text this
Python ships, nothing downloaded). Three runs on the same batches, the same seed and the
same AdamW hyper-parameters and learning-rate schedule:

- ``grow``: :class:`growdense.models.GPT` starts at width 64, 2 heads of 32, FFN 256 and
  grows in place through one :class:`growdense.Wiring` (``GPT.wiring``: the residual
  stream, each block's heads and FFN width), with the same Parameters and the same
  ``growdense.optim.AdamW``, to 96/3/384 and then 128/4/512 (``init="zero_out"``: the
  output is unchanged at each growth, new residual features ramp into the norms over
  ``--ramp-steps`` steps; the grown units' AdamW moments start at zero with the
  Parameter's step count, ``--optimizer-state keep_global_step``, as rebuilding does);
- ``fixed``: the same model at its final size 128/4/512 from scratch;
- ``rebuild``: the grow run's starting weights in a plain-PyTorch model
  (:class:`growdense.models.gpt.PlainGPT`), grown at the same steps the way growth is
  done without growdense (MSG): a new model of the new size, the weights copied, the new
  slices written as the in-place growth writes them, a new ``torch.optim.AdamW`` whose
  moments are the old ones zero-padded.

It prints a table (final validation loss, training time, the growth events' cost), writes
the per-step losses to JSON and draws the loss curves with the growths marked.

    python examples/grow_gpt.py                                   # ~3-5 min on 2 cores
    python examples/grow_gpt.py --threads 1 --figure docs/figures/grow_gpt.png
    python examples/grow_gpt.py --quick                           # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import growdense
from growdense.models.gpt import GPT, plain_from_grow, rebuild_grown

# The corpus: the docstrings of these modules (their own, then those of their public
# classes, functions and methods, in sorted order), as the running Python ships them.
CORPUS_MODULES = (
    "argparse", "collections", "dataclasses", "functools", "itertools", "json", "logging", "os", "pathlib",
    "random", "re", "statistics", "string", "textwrap", "typing", "unittest", "datetime", "decimal", "fractions",
    "heapq", "inspect", "pickle", "shutil", "subprocess", "tempfile", "threading", "zipfile", "csv", "email",
    "http.client", "urllib.parse", "difflib", "pprint", "enum", "abc", "contextlib", "copy", "math", "operator",
    "bisect", "calendar", "configparser", "queue", "socket", "struct", "tarfile", "uuid", "warnings", "weakref",
)
# Vocabulary: newline and printable ASCII; any other character reads as "?".
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))


def stdlib_docstrings(modules=CORPUS_MODULES) -> str:
    """The concatenated docstrings of ``modules`` (deterministic for one Python version)."""
    parts = []
    with warnings.catch_warnings():  # reading some members (typing.io) warns
        warnings.simplefilter("ignore", DeprecationWarning)
        _collect(modules, parts)
    return "\n\n".join(parts)


def _collect(modules, parts: list) -> None:
    for module_name in modules:
        mod = importlib.import_module(module_name)
        if mod.__doc__:
            parts.append(inspect.cleandoc(mod.__doc__))
        for name in sorted(vars(mod)):
            obj = vars(mod)[name]
            if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(doc)
            if inspect.isclass(obj):
                for member_name in sorted(vars(obj)):
                    member = vars(obj)[member_name]
                    if not member_name.startswith("_") and inspect.isfunction(member) and member.__doc__:
                        parts.append(inspect.cleandoc(member.__doc__))


def encode(text: str) -> torch.Tensor:
    lookup = {c: i for i, c in enumerate(VOCAB)}
    unknown = lookup["?"]
    return torch.tensor([lookup.get(c, unknown) for c in text], dtype=torch.long)


class Batches:
    """Random windows of the token stream: the same sequence for every run with the same seed."""

    def __init__(self, data: torch.Tensor, batch_size: int, block_size: int, seed: int) -> None:
        self.data, self.batch_size, self.block_size = data, batch_size, block_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.data) - self.block_size - 1, (self.batch_size,), generator=self.generator)
        offsets = torch.arange(self.block_size + 1)
        windows = self.data[starts[:, None] + offsets]
        return windows[:, :-1], windows[:, 1:]


def loss_of(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, val_batches: list) -> float:
    model.eval()
    losses = [loss_of(model, x, y).item() for x, y in val_batches]
    model.train()
    return sum(losses) / len(losses)


def build_gpt(args, start: bool) -> GPT:
    torch.manual_seed(args.seed)
    sizes = (args.d_model, args.heads, args.d_ff) if start else (args.final_d_model, args.final_heads,
                                                                   args.final_d_ff)
    return GPT(len(VOCAB), args.block_size, args.n_layer, *sizes, capacity_d_model=args.final_d_model,
               capacity_heads=args.final_heads, capacity_d_ff=args.final_d_ff)


def growth_steps(args) -> list[int]:
    return [int(s) for s in args.grow_at.split(",") if s]


def growth_amounts(args, events: int) -> list[tuple[int, int, int]]:
    """Per event, how much each width grows: the start-to-final difference split evenly over the events."""
    total = (args.final_d_model - args.d_model, args.final_heads - args.heads, args.final_d_ff - args.d_ff)
    out = []
    for i in range(events):
        out.append(tuple(t * (i + 1) // events - t * i // events for t in total))
    return out


def train(mode: str, args, train_data: torch.Tensor, val_batches: list) -> dict:
    """One run; returns its per-step losses, validation losses, times and growth events."""
    steps_at = growth_steps(args) if mode != "fixed" else []
    amounts = growth_amounts(args, len(steps_at))
    model = build_gpt(args, start=mode != "fixed")
    hyper = dict(lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    if mode == "rebuild":
        model = plain_from_grow(model)
        optimizer = torch.optim.AdamW(model.parameters(), **hyper)
    else:
        optimizer = growdense.optim.AdamW(model.parameters(), **hyper)
    grow_generator = torch.Generator().manual_seed(args.seed + 1)
    wiring = model.wiring(optimizer) if mode == "grow" else None
    batches = Batches(train_data, args.batch_size, args.block_size, args.seed)
    record = {"mode": mode, "train_loss": [], "val": [], "events": [], "step_seconds": []}
    record["val"].append((0, evaluate(model, val_batches)))
    for step in range(args.steps):
        if step in steps_at:
            d, h, f = amounts[steps_at.index(step)]
            with torch.no_grad():
                x_check, _ = val_batches[0]
                before = model(x_check)
            t0 = time.perf_counter()
            if mode == "grow":
                model.grow(d, h, f, init="zero_out", ramp_steps=args.ramp_steps, generator=grow_generator,
                           wiring=wiring, optimizer_state=args.optimizer_state)
            else:
                model, optimizer = rebuild_grown(model, optimizer, d, h, f, ramp_steps=args.ramp_steps,
                                                 generator=grow_generator)
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                change = (model(x_check) - before).abs().max().item()
            widths = model.widths() if mode == "grow" else {
                "d_model": model.sizes["d_model"], "heads": model.sizes["n_head"], "d_ff": model.sizes["d_ff"]}
            record["events"].append({"step": step, "seconds": seconds, "widths": widths,
                                     "output_change": change, "max_abs_logit": before.abs().max().item()})
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        x, y = batches.next()
        t0 = time.perf_counter()
        loss = loss_of(model, x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.ramp_step()
        record["step_seconds"].append(time.perf_counter() - t0)
        record["train_loss"].append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            record["val"].append((step + 1, evaluate(model, val_batches)))
    record["train_seconds"] = sum(record["step_seconds"]) + sum(e["seconds"] for e in record["events"])
    record["parameters_active"] = sum(p.numel() for p in model.parameters()) if mode != "grow" else None
    return record


def smooth(xs: list[float], alpha: float = 0.05) -> list[float]:
    out, value = [], None
    for x in xs:
        value = x if value is None else (1 - alpha) * value + alpha * x
        out.append(value)
    return out


LABELS = {
    "grow": "grown in place (growdense)",
    "fixed": "final size from scratch",
    "rebuild": "grown by rebuilding (MSG's way)",
}
COLORS = {"grow": "C0", "fixed": "C1", "rebuild": "C2"}


def step_flops(widths: dict, args) -> float:
    """Analytic FLOPs of one training step (3x the forward; a multiply-add is 2 FLOPs; causal attention T/2)."""
    d, h, f = widths["d_model"], widths["heads"], widths["d_ff"]
    inner = h * (args.d_model // args.heads)
    per_token = args.n_layer * (4 * d * inner + 2 * d * f + args.block_size * inner) + d * len(VOCAB)
    return 3 * 2 * args.batch_size * args.block_size * per_token


def cumulative_flops(rec: dict, args) -> list[float]:
    """Training FLOPs after each step, with the widths each step ran at."""
    if rec["mode"] == "fixed":
        widths = {"d_model": args.final_d_model, "heads": args.final_heads, "d_ff": args.final_d_ff}
    else:
        widths = {"d_model": args.d_model, "heads": args.heads, "d_ff": args.d_ff}
    changes = {e["step"]: e["widths"] for e in rec["events"]}
    out, total = [], 0.0
    for step in range(len(rec["train_loss"])):
        widths = changes.get(step, widths)
        total += step_flops(widths, args)
        out.append(total)
    return out


def plot(records: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for mode, rec in records.items():
        steps = range(1, len(rec["train_loss"]) + 1)
        flops = [x / 1e12 for x in cumulative_flops(rec, args)]
        ls = "--" if mode == "rebuild" else "-"
        axes[0].plot(steps, smooth(rec["train_loss"]), ls, color=COLORS[mode], lw=1.3, label=LABELS[mode] + " (train)")
        vs, vl = zip(*rec["val"])
        axes[0].plot(vs, vl, "o", color=COLORS[mode], ms=3.5, label=LABELS[mode] + " (validation)")
        axes[1].plot(flops, smooth(rec["train_loss"]), ls, color=COLORS[mode], lw=1.3)
    grow = records.get("grow")
    if grow is not None:
        for e in grow["events"]:
            w = e["widths"]
            axes[0].axvline(e["step"], color="0.5", lw=0.8, ls=":")
            axes[0].annotate(f"grow to {w['d_model']}/{w['heads']}h/{w['d_ff']}", (e["step"], 0.0),
                             xycoords=("data", "axes fraction"), xytext=(3, 4), textcoords="offset points",
                             fontsize=8, color="0.3", rotation=90, va="bottom")
            axes[1].axvline(cumulative_flops(grow, args)[e["step"] - 1] / 1e12, color="0.5", lw=0.8, ls=":")
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("training compute (TFLOP, analytic: 3x forward)")
    axes[0].set_ylabel("cross-entropy (nats per character)")
    top = max(rec["val"][0][1] for rec in records.values())
    axes[0].set_ylim(min(min(smooth(r["train_loss"])) for r in records.values()) - 0.1, min(top, 3.6))
    axes[0].legend(fontsize=7.5, loc="upper right")
    axes[1].set_title("the same curves against compute", fontsize=9)
    fig.suptitle(
        f"Character GPT ({args.n_layer} blocks) on Python's stdlib docstrings: width {args.d_model}->"
        f"{args.final_d_model}, heads {args.heads}->{args.final_heads}, FFN {args.d_ff}->{args.final_d_ff}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--grow-at", default="150,300", help="steps at which every width grows (comma-separated)")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--d-ff", type=int, default=256)
    p.add_argument("--final-d-model", type=int, default=128)
    p.add_argument("--final-heads", type=int, default=4)
    p.add_argument("--final-d-ff", type=int, default=512)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ramp-steps", type=int, default=50)
    p.add_argument("--optimizer-state", default="keep_global_step", choices=("keep_global_step", "keep", "reset"),
                   help="what AdamW's state of grown units becomes (growdense.Wiring.grow); keep_global_step "
                   "(zero moments, the Parameter's step count) is what rebuilding with zero-padded moments does")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--modes", default="grow,fixed,rebuild")
    p.add_argument("--out", default="runs/grow_gpt", help="folder for results.json and the figure")
    p.add_argument("--figure", default=None, help="where to save the figure (default: <out>/grow_gpt.png)")
    p.add_argument("--quick", action="store_true", help="a few steps at tiny sizes (a smoke run)")
    p.add_argument("--replot", default=None, metavar="RESULTS_JSON",
                   help="only draw the figure (and print the table) from a results.json of an earlier run")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.grow_at, args.eval_every, args.eval_batches = 12, "4,8", 6, 2
        args.d_model, args.heads, args.d_ff = 16, 2, 32
        args.final_d_model, args.final_heads, args.final_d_ff = 32, 4, 64
        args.block_size, args.batch_size, args.warmup, args.ramp_steps = 16, 4, 2, 3
    if args.final_d_model // args.final_heads != args.d_model // args.heads:
        p.error("head_dim must stay fixed: d_model/heads and final_d_model/final_heads must be equal")
    for s in growth_steps(args):
        if not 0 < s < args.steps:
            p.error(f"--grow-at step {s} is outside 1..{args.steps - 1}")
    return args


def print_table(records: dict, args) -> None:
    rows = []
    for mode, rec in records.items():
        events = rec["events"]
        rows.append([
            LABELS[mode], f"{rec['val'][-1][1]:.3f}", f"{cumulative_flops(rec, args)[-1] / 1e12:.2f}",
            f"{rec['train_seconds']:.1f}",
            f"{statistics.median(rec['step_seconds']) * 1e3:.1f}",
            ", ".join(f"{e['seconds'] * 1e3:.2f}" for e in events) or "-",
            ", ".join(f"{e['output_change']:.1e}" for e in events) or "-",
        ])
    header = ["run", "final val loss", "train compute (TFLOP)", "train time (s)", "median step (ms)",
              "growth events (ms)", "max abs output change at growth"]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    if args.replot:
        payload = json.loads(Path(args.replot).read_text())
        saved = argparse.Namespace(**payload["args"])
        print_table(payload["runs"], saved)
        figure = Path(args.figure) if args.figure else Path(args.replot).parent / "grow_gpt.png"
        plot(payload["runs"], saved, figure)
        print(f"\nwrote {figure}")
        return payload
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    text = stdlib_docstrings()
    data = encode(text)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    val_source = Batches(val_data, args.batch_size, args.block_size, seed=12345)
    val_batches = [val_source.next() for _ in range(args.eval_batches)]
    corpus = {"modules": list(CORPUS_MODULES), "characters": len(text),
              "sha256": hashlib.sha256(text.encode()).hexdigest(), "python": platform.python_version()}
    print(f"# corpus: docstrings of {len(CORPUS_MODULES)} stdlib modules, Python {corpus['python']}: "
          f"{len(text)} characters (sha256 {corpus['sha256'][:16]}), vocabulary {len(VOCAB)}")
    print(f"# {cpu_model()}, torch.set_num_threads({torch.get_num_threads()}), torch {torch.__version__}",
          flush=True)
    records = {}
    for mode in args.modes.split(","):
        t0 = time.perf_counter()
        records[mode] = train(mode, args, train_data, val_batches)
        print(f"  {mode}: {time.perf_counter() - t0:.1f} s, final validation loss {records[mode]['val'][-1][1]:.4f}",
              flush=True)
    print_table(records, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]) if argv is None
               else "python examples/grow_gpt.py " + " ".join(argv),
               "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "corpus": corpus, "args": vars(args), "runs": records}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    figure = Path(args.figure) if args.figure else out / "grow_gpt.png"
    plot(records, args, figure)
    print(f"\nwrote {out / 'results.json'} and {figure}")
    return payload


if __name__ == "__main__":
    main()
