"""The ``growdense reproduce`` command line: options, presets, and running it."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace
from typing import Optional, Sequence

from ..policies import KEEP_CHOICES
from ..protocol import init_names
from .config import (APPROACHES, OPTIMIZER_STATES, PRECISIONS, PRESETS, ConfigError, ReproduceConfig, check_config,
                     check_writable, resolve_device)

__all__ = ["add_arguments", "config_from_args", "main", "run_from_args"]

DESCRIPTION = (
    "Train the study's MNIST VAE as Fixed (256/128), Approach 1 (grow from 32/16) and Approach 2 (cut "
    "256/128 to 32/16, then regrow); write per-epoch metrics (CSV, JSON), figures, the width tables and "
    "a summary. Downloads MNIST into --data-dir when it is not there (--no-download forbids it). Every "
    "run is checkpointed after each epoch: --resume continues an interrupted reproduction."
)


def _csv_list(kind):
    def parse(text: str):
        return tuple(kind(v) for v in text.split(",") if v)

    return parse


def _widths(text: str) -> tuple[int, int]:
    parts = text.replace("/", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"widths must look like 32x16, got {text!r}")
    return int(parts[0]), int(parts[1])


def _choices(allowed: Sequence[str], what: str):
    def parse(text: str):
        values = _csv_list(str)(text)
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad) or repr(text)}; choose from "
                                             f"{', '.join(allowed)}")
        return values

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
    p.add_argument("--init", dest="inits", type=_choices(init_names(), "init"),
                   help="init strategy of new neurons, comma-separated to compare: he (study), zero_out, split, "
                   "gradmax, tiny (gradient-guided: the loss on a few training mini-batches at each growth)")
    p.add_argument("--keep", dest="keeps", type=_choices(KEEP_CHOICES, "keep"),
                   help="which neurons Approach 2 keeps at the cut, comma-separated to compare: first (study), norm")
    p.add_argument("--optimizer-state", dest="optimizer_states", type=_choices(OPTIMIZER_STATES, "optimizer state"),
                   help="Adam's state at a growth, comma-separated to compare: reset (default, the study's: a "
                   "new optimizer), keep (old neurons continue, new ones start fresh)")
    p.add_argument("--fixed-widths", dest="fixed_widths", type=_csv_list(_widths),
                   help="widths of the fixed models, comma-separated, e.g. 256x128,32x16 (default: the target "
                   "256x128)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="fp32 (default) or bf16 (torch.autocast with bfloat16; weights and Adam stay float32)")
    p.add_argument("--device", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, help="seed of weights, data order, noise and growth (default 0)")
    p.add_argument("--train-subset", type=int, help="train on this many training images (default all 60,000)")
    p.add_argument("--test-subset", type=int, help="evaluate on the first this many test images (default 10,000)")
    p.add_argument("--data-dir", help="folder holding MNIST/raw (torchvision layout; default ./data); MNIST is "
                   "downloaded there when missing")
    p.add_argument("--no-download", dest="download", action="store_false", default=None,
                   help="never download MNIST: stop with an error when it is not in --data-dir")
    p.add_argument("--out", help="output folder (default runs/reproduce)")
    p.add_argument("--resume", action="store_true",
                   help="continue the runs in --out from their last per-epoch checkpoints (same options)")
    p.add_argument("--samples", type=int, help="latent samples L per image (study: 20)")
    p.add_argument("--lr", type=float, help="Adam learning rate (study: 1e-3)")
    p.add_argument("--batch-size", type=int, help="mini-batch size (study: 128)")
    p.add_argument("--iwae-ks", type=_csv_list(int), help="importance samples K for the IWAE bound (default 1,10,100,1000)")
    p.add_argument("--iwae-images", type=int, help="test images for the IWAE bound (default all test images)")
    p.add_argument("--variance-ls", type=_csv_list(int),
                   help="L values for the estimator variances (default 1,2,5,10,20,50,100)")
    p.add_argument("--variance-ks", type=_csv_list(int), help="K values for the IWAE estimator variance (default 1,10,100)")
    p.add_argument("--variance-repeats", type=int, help="independent estimates per image and L or K (default 20)")
    p.add_argument("--variance-images", type=int, help="test images for the estimator variances (default 500)")
    p.add_argument("--gap-epochs", type=_csv_list(int), help="epochs after which the IWAE gap and the log-weight "
                   "variance are measured (default: the last epoch of every phase)")
    p.add_argument("--gap-k", type=int, help="importance samples for the IWAE gap during training (default 100)")
    p.add_argument("--gap-images", type=int, help="test images for the IWAE gap during training (default 500)")
    p.add_argument("--probe-images", type=int, help="test images of the loss probe around each growth (default 1000)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")


def config_from_args(args: argparse.Namespace) -> ReproduceConfig:
    """Preset defaults, then every option given explicitly; raise :class:`~.config.ConfigError`
    naming the option when one cannot run (see :func:`~.config.check_config`)."""
    preset = "quick" if args.quick and args.preset is None else (args.preset or "study")
    cfg = replace(ReproduceConfig(), preset=preset, **PRESETS[preset])
    given = {f.name: getattr(args, f.name) for f in fields(ReproduceConfig)
             if f.name != "preset" and getattr(args, f.name, None) is not None}
    cfg = replace(cfg, **given)
    check_config(cfg)
    return cfg


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="growdense reproduce", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    return run_from_args(args, list(argv) if argv is not None else sys.argv[1:], parser=parser)


def run_from_args(args: argparse.Namespace, argv: Sequence[str], *,
                  parser: Optional[argparse.ArgumentParser] = None) -> int:
    """Run ``reproduce`` for parsed arguments; print where the results are.

    Every option is checked first (values, device, output folder, the checkpoints there,
    MNIST): for a bad one this prints argparse's ``growdense reproduce: error: ...`` and
    returns 2 (the command's exit status) before anything is written or trained.
    ``parser`` prints the usage line with the error.
    """
    from .data import MnistNotFoundError
    from .reproduce import reproduce
    from .training import ResumeError

    parser = parser if parser is not None else _parser()
    try:
        cfg = config_from_args(args)
        resolve_device(cfg.device)
        check_writable(cfg.out)
        out = reproduce(cfg, argv, resume=bool(getattr(args, "resume", False)))
    except (ConfigError, MnistNotFoundError, ResumeError) as error:
        parser.print_usage(sys.stderr)  # argparse's form of an error, as parser.error() prints it
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"results in {out}/ (summary.md, tables.md, metrics.csv, figures/)")
    return 0
