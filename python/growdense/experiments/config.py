"""What a reproduction trains: its configuration, the presets, and the list of runs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..policies import KEEP_CHOICES
from ..protocol import init_names
from ..schedule import GrowthSchedule

__all__ = ["ReproduceConfig", "RunSpec", "PRESETS", "APPROACHES", "PRECISIONS", "OPTIMIZER_STATES", "run_specs",
           "make_schedule", "resolve_device", "gap_epochs", "ConfigError", "check_config", "check_device",
           "check_writable"]

APPROACHES = ("fixed", "1", "2", "all")
PRECISIONS = ("fp32", "bf16")
# "reset": a growth restarts the optimizer as a newly built one (the study rebuilt its layers,
# hence its Adam); "keep": the old neurons' optimizer state continues, new neurons start fresh.
OPTIMIZER_STATES = ("reset", "keep")


@dataclass
class ReproduceConfig:
    """Everything a reproduction depends on (saved as ``config.json``)."""

    approach: str = "all"
    epochs: int = 200
    every: int = 25
    inits: tuple[str, ...] = ("he",)
    keeps: tuple[str, ...] = ("first",)
    optimizer_states: tuple[str, ...] = ("reset",)
    fixed_widths: Optional[tuple[tuple[int, int], ...]] = None  # None: the target widths only
    start: tuple[int, int] = (32, 16)
    step: tuple[int, int] = (32, 16)
    target: tuple[int, int] = (256, 128)
    latent: int = 20
    samples: int = 20
    lr: float = 1e-3
    batch_size: int = 128
    precision: str = "fp32"
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    data_dir: str = "./data"
    download: bool = True
    out: str = "runs/reproduce"
    iwae_ks: tuple[int, ...] = (1, 10, 100, 1000)
    iwae_images: Optional[int] = None
    variance_ls: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)
    variance_ks: tuple[int, ...] = (1, 10, 100)
    variance_repeats: int = 20
    variance_images: int = 500
    gap_epochs: Optional[tuple[int, ...]] = None  # None: the last epoch of every phase
    gap_k: int = 100
    gap_images: int = 500
    probe_images: int = 1000
    spike_window: int = 10
    progress: bool = True
    preset: str = "study"


PRESETS: dict[str, dict[str, Any]] = {
    # the study: 200 epochs, growth every 25, all of MNIST, full test set
    "study": {},
    # all three models on a subset in a few minutes on 2 CPU cores
    "quick": dict(epochs=16, every=2, train_subset=3000, test_subset=1000, iwae_images=200,
                  variance_images=100, variance_repeats=10, gap_images=200, probe_images=500, out="runs/quick"),
    # the smallest run that exercises every path (CI): every growth, both inits, both keeps
    "ci": dict(epochs=8, every=1, train_subset=384, test_subset=128, inits=("he", "zero_out"),
               keeps=("first", "norm"), iwae_ks=(1, 10, 100, 1000), iwae_images=16, variance_ls=(1, 5, 20),
               variance_ks=(1, 10), variance_repeats=4, variance_images=16, gap_epochs=(3, 7), gap_k=10,
               gap_images=16, probe_images=64, spike_window=2, out="runs/ci"),
}


@dataclass(frozen=True)
class RunSpec:
    """One trained model: its approach (``fixed``, ``1``, ``2``), init, keep and optimizer-state
    policies, and for a fixed model its widths (``None``: the target)."""

    approach: str
    init: str = "he"
    keep: str = "first"
    optimizer_state: str = "reset"
    widths: Optional[tuple[int, int]] = None

    @property
    def name(self) -> str:
        if self.approach == "fixed":
            return "fixed" if self.widths is None else f"fixed-{self.widths[0]}x{self.widths[1]}"
        name = f"approach1-{self.init}" if self.approach == "1" else f"approach2-{self.init}-{self.keep}"
        return name if self.optimizer_state == "reset" else f"{name}-{self.optimizer_state}"

    @classmethod
    def from_name(cls, name: str) -> "RunSpec":
        """The spec whose :attr:`name` is ``name`` (``fixed``, ``fixed-32x16``,
        ``approach1-he``, ``approach2-zero_out-norm-keep``, ...)."""
        parts = name.split("-")
        try:
            if parts[0] == "fixed" and len(parts) <= 2:
                if len(parts) == 1:
                    return cls("fixed")
                h1, h2 = parts[1].split("x")
                return cls("fixed", widths=(int(h1), int(h2)))
            if parts[0] == "approach1" and len(parts) in (2, 3):
                return cls("1", init=parts[1], **({"optimizer_state": parts[2]} if len(parts) == 3 else {}))
            if parts[0] == "approach2" and len(parts) in (3, 4):
                return cls("2", init=parts[1], keep=parts[2],
                           **({"optimizer_state": parts[3]} if len(parts) == 4 else {}))
        except ValueError:
            pass
        raise ValueError(f"{name!r} is not the name of a reproduce run (fixed, fixed-<h1>x<h2>, "
                         f"approach1-<init>[-<state>], approach2-<init>-<keep>[-<state>])")


def run_specs(cfg: ReproduceConfig) -> list[RunSpec]:
    """The models to train: Fixed (at each of ``fixed_widths``); Approach 1 per init, then per
    further optimizer-state policy; Approach 2 per init (first keep), per further keep, per
    further optimizer-state policy. One factor varies at a time."""
    if cfg.approach not in APPROACHES:
        raise ValueError(f"unknown approach {cfg.approach!r}; expected one of {APPROACHES}")
    bad = [s for s in cfg.optimizer_states if s not in OPTIMIZER_STATES]
    if bad or not cfg.optimizer_states:
        raise ValueError(f"unknown optimizer state policy {bad}; expected some of {OPTIMIZER_STATES}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {cfg.precision!r}; expected one of {PRECISIONS}")
    state0 = cfg.optimizer_states[0]
    specs = []
    if cfg.approach in ("fixed", "all"):
        for w in cfg.fixed_widths or (tuple(cfg.target),):
            w = (int(w[0]), int(w[1]))
            if not (1 <= w[0] <= cfg.target[0] and 1 <= w[1] <= cfg.target[1]):
                raise ValueError(f"fixed widths {w[0]}x{w[1]} must be between 1x1 and the target "
                                 f"{cfg.target[0]}x{cfg.target[1]}")
            specs.append(RunSpec("fixed", widths=None if w == tuple(cfg.target) else w))
    if cfg.approach in ("1", "all"):
        specs += [RunSpec("1", init, optimizer_state=state0) for init in cfg.inits]
        specs += [RunSpec("1", cfg.inits[0], optimizer_state=s) for s in cfg.optimizer_states[1:]]
    if cfg.approach in ("2", "all"):
        specs += [RunSpec("2", init, cfg.keeps[0], state0) for init in cfg.inits]
        specs += [RunSpec("2", cfg.inits[0], keep, state0) for keep in cfg.keeps[1:]]
        specs += [RunSpec("2", cfg.inits[0], cfg.keeps[0], s) for s in cfg.optimizer_states[1:]]
    return specs


def make_schedule(spec: RunSpec, cfg: ReproduceConfig) -> Optional[GrowthSchedule]:
    """The ``GrowthSchedule`` of a run (``None`` for Fixed)."""
    if spec.approach == "fixed":
        return None
    names = ["h1", "h2"]
    if spec.approach == "1":
        return GrowthSchedule.grow_every(names, start=cfg.start, step=cfg.step, target=cfg.target, every=cfg.every)
    return GrowthSchedule.prune_then_regrow(
        names, full=cfg.target, cut_to=cfg.start, step=cfg.step, at=cfg.every, every=cfg.every
    )


def gap_epochs(cfg: ReproduceConfig) -> list[int]:
    """Epochs after which the IWAE gap and the log-weight variance are measured: ``cfg.gap_epochs``,
    or by default the last epoch of every phase (the epoch before each growth) and the last."""
    if cfg.gap_epochs is not None:
        return sorted({e for e in cfg.gap_epochs if 0 <= e < cfg.epochs})
    return sorted({e for e in range(cfg.epochs) if (e + 1) % cfg.every == 0} | {cfg.epochs - 1})


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; raise :class:`ConfigError` for a device
    that is not one or that this machine does not have."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(device)


class ConfigError(ValueError):
    """An option of a reproduction that cannot work, named with the fix (raised before anything
    is written or trained)."""


# Options that count something and must be >= 1 when given (None: the default).
_POSITIVE = {"epochs": "--epochs", "every": "--every", "samples": "--samples", "batch_size": "--batch-size",
             "train_subset": "--train-subset", "test_subset": "--test-subset", "iwae_images": "--iwae-images",
             "variance_repeats": "--variance-repeats", "variance_images": "--variance-images", "gap_k": "--gap-k",
             "gap_images": "--gap-images", "probe_images": "--probe-images", "latent": "latent",
             "spike_window": "spike_window"}
_POSITIVE_LISTS = {"iwae_ks": "--iwae-ks", "variance_ls": "--variance-ls", "variance_ks": "--variance-ks"}


def check_config(cfg: ReproduceConfig) -> None:
    """Raise :class:`ConfigError` naming the option unless every field of ``cfg`` can run.

    Checks counts (>= 1), lists (not empty, values >= 1), inits, keeps, optimizer-state
    policies, precision, approach, fixed widths (within the target) and the learning rate;
    the device and the output folder are checked by :func:`check_device` and
    :func:`check_writable`.
    """
    import math

    for name, option in _POSITIVE.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{option} must be a whole number >= 1, got {value!r}")
    for name, option in _POSITIVE_LISTS.items():
        values = getattr(cfg, name)
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise ConfigError(f"{option} must be a comma-separated list of whole numbers >= 1, got "
                              f"{','.join(map(str, values)) or 'nothing'}")
    if cfg.gap_epochs is not None and any(not isinstance(v, int) or v < 0 for v in cfg.gap_epochs):
        raise ConfigError(f"--gap-epochs must be epochs >= 0, got {','.join(map(str, cfg.gap_epochs))}")
    for option, values, allowed in (("--init", cfg.inits, init_names()), ("--keep", cfg.keeps, KEEP_CHOICES),
                                    ("--optimizer-state", cfg.optimizer_states, OPTIMIZER_STATES)):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise ConfigError(f"{option}: unknown {', '.join(map(repr, bad)) or 'empty list'}; choose from "
                              f"{', '.join(allowed)} (comma-separated to compare several)")
    if cfg.approach not in APPROACHES:
        raise ConfigError(f"--approach must be one of {', '.join(APPROACHES)}, got {cfg.approach!r}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if not (isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ConfigError(f"--lr must be a finite number > 0, got {cfg.lr!r}")
    for w in cfg.fixed_widths or ():
        if not (1 <= w[0] <= cfg.target[0] and 1 <= w[1] <= cfg.target[1]):
            raise ConfigError(f"--fixed-widths {w[0]}x{w[1]} is outside the models' capacity: each fixed width "
                              f"must be between 1x1 and the target {cfg.target[0]}x{cfg.target[1]}")


def check_device(device: str) -> torch.device:
    """``device`` as a ``torch.device`` this machine can train on; :class:`ConfigError` otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; use "
                              f"--device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "meta":
        raise ConfigError("--device meta holds no data and cannot train; use auto, cpu or cuda")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as error:
            raise ConfigError(f"--device {device} is not usable here ({error}); use auto, cpu or cuda") from None
    return dev


def check_writable(folder: str | os.PathLike, option: str = "--out") -> None:
    """Raise :class:`ConfigError` unless ``folder`` is (or can be created as) a writable folder;
    creates nothing."""
    path = Path(folder).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {folder} is a file, not a folder; choose another {option}")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{option} {folder}: {probe} is a file, so the folder cannot be created there")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == path else f"cannot be created: {probe} is not writable"
        raise ConfigError(f"{option} {folder} {what}; choose a folder you can write to")
