"""Training one model of a reproduction: the epoch loop, growth with its optimizer-state policy,
per-epoch checkpoints and resumption.

The loop costs what its steps cost: the data set is one tensor on the device and batches
are gathered from it by index; per-step losses stay on the device and are read once per
epoch (no per-step synchronisation); logging happens once per epoch.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ..checkpoint import load_checkpoint, save_checkpoint
from ..models.evaluation import iwae_gap
from ..models.vae import VAE, bernoulli_nll, gaussian_kl
from ..optim import Adam
from ..schedule import GrowthSchedule
from ..wiring import Wiring
from .config import ReproduceConfig, RunSpec, gap_epochs, make_schedule

__all__ = ["autocast", "apply_growth", "growth_closure", "GRADIENT_BATCHES", "train_epoch", "evaluate_loss",
           "build_run", "train_run", "add_spikes", "ResumeError", "checkpoint_path", "check_resumable",
           "check_checkpoints"]

# Configuration fields that decide a run's trajectory: a checkpoint only resumes a run whose
# fields all match (the output folder, progress bar, device and final-evaluation sizes may change).
_TRAJECTORY_FIELDS = ("epochs", "every", "start", "step", "target", "latent", "samples", "lr", "batch_size",
                      "precision", "train_subset", "test_subset", "seed", "gap_epochs", "gap_k", "gap_images",
                      "probe_images")


class ResumeError(RuntimeError):
    """A run's checkpoint cannot continue the run asked for (another configuration)."""


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward's precision: ``fp32`` (no autocast) or ``bf16`` (``torch.autocast`` with bfloat16
    on ``device``; weights, gradients and optimizer state stay float32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}; expected 'fp32' or 'bf16'")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_malloc_tuned = False


def keep_freed_memory() -> bool:
    """Let the C allocator keep freed blocks of a training step's size for the next step.

    A CPU step allocates and frees tensors of megabytes (the decoder's L x B rows: its
    logits, their gradient); glibc hands blocks that large back to the system when they
    are freed (mmap'd blocks, and trimming of the heap's top), so every step takes fresh
    pages from the kernel and faults them in, zeroed, on their first write (measured: a
    step of the study's VAE 6-9% faster without it, 1 thread, AMD EPYC). Raising the mmap
    and trim thresholds (to 32 MiB and 512 MiB) keeps them in the heap, as the CPU
    allocators people preload for PyTorch (jemalloc, tcmalloc) do. Process-wide, once;
    glibc on Linux only. Returns whether the thresholds were set.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _malloc_tuned = bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 512 << 20))
    return _malloc_tuned


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# The gradient-guided inits read the loss on this many training mini-batches (of the run's
# batch size), drawn once per growth; every call of the closure sees the same images and
# the same latent noise, so TINY's line search compares like with like. Two batches keep a
# GradMax growth near the cost of two training steps per hidden width.
GRADIENT_BATCHES = 2
# GradMax's new neurons have zero incoming weights; behind the encoder's ReLU a zero bias
# would leave them at ReLU's kink (derivative 0) for good. This bias keeps them active on
# every input (the consumers' biases compensate: the function is unchanged at the growth).
GRADMAX_OPTIONS = {"scale": 1.0, "bias": 0.1}
TINY_OPTIONS = {"line_search_steps": 8}


def growth_closure(model: VAE, train: Tensor, cfg: ReproduceConfig, epoch: int,
                   batches: int = GRADIENT_BATCHES) -> Callable[[], Tensor]:
    """The closure of a gradient-guided growth at ``epoch``: the study's loss on ``batches`` mini-batches.

    The images are drawn (without replacement) by a generator seeded from the run's seed and
    the epoch, and the latent noise is re-seeded at every call, so the closure is a fixed
    function of the weights. It does not call ``backward``.
    """
    pick = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7 * epoch + 6)
    count = min(train.shape[0], batches * cfg.batch_size)
    index = torch.randperm(train.shape[0], generator=pick)[:count].to(train.device)
    chunks = [train.index_select(0, i) for i in index.split(cfg.batch_size)]
    device = train.device

    def closure() -> Tensor:
        noise = _generator(device, cfg.seed * 1_000_003 + 7 * epoch + 9)
        with autocast(device, cfg.precision):
            losses = [model.loss(xb, cfg.samples, noise) * xb.shape[0] for xb in chunks]
        return torch.stack(losses).sum() / count

    return closure


def apply_growth(
    schedule: GrowthSchedule,
    epoch: int,
    wiring: Wiring,
    *,
    init: str,
    keep: str,
    optimizer_state: str,
    generator: Optional[torch.Generator] = None,
    closure: Optional[Callable[[], Tensor]] = None,
) -> bool:
    """``schedule.apply`` with an optimizer-state policy; ``True`` if the widths changed.

    ``"reset"``: after the event the optimizer's whole state restarts as a newly built
    optimizer's (the study's way). ``"keep"``: the old neurons' state continues; the new
    neurons start a fresh Adam, their bias correction counted from their birth. ``closure``: the
    loss for the gradient-guided inits (``"gradmax"``, ``"tiny"``; see :func:`growth_closure`).
    """
    if optimizer_state not in ("reset", "keep"):
        raise ValueError(f"unknown optimizer_state {optimizer_state!r}; expected 'reset' or 'keep'")
    options = dict({"gradmax": GRADMAX_OPTIONS, "tiny": TINY_OPTIONS}.get(init, {}))
    if init in ("gradmax", "tiny"):
        options["closure"] = closure
    return bool(
        schedule.apply(epoch, wiring, init=init, keep=keep, generator=generator, optimizer_state=optimizer_state,
                       **options)
    )


def train_epoch(
    model: VAE,
    optimizer: torch.optim.Optimizer,
    train: Tensor,
    *,
    batch_size: int,
    samples: int,
    data_generator: torch.Generator,
    noise_generator: torch.Generator,
    precision: str = "fp32",
) -> Tensor:
    """One pass over ``train`` (N, D) in a random order; the per-step losses, on the device.

    The order is ``torch.randperm(N, generator=data_generator)`` (on the CPU); the last batch
    may be smaller. Nothing in the loop waits for the device. On the CPU the C allocator
    keeps freed step-sized blocks from then on (:func:`keep_freed_memory`).
    """
    n = train.shape[0]
    device = train.device
    if device.type == "cpu":
        keep_freed_memory()
    perm = torch.randperm(n, generator=data_generator).to(device)
    steps = -(-n // batch_size)
    losses = torch.empty(steps, device=device, dtype=torch.float32)
    model.train()
    amp = autocast(device, precision)
    for i in range(steps):
        xb = train.index_select(0, perm[i * batch_size : (i + 1) * batch_size])
        with amp:
            loss = model.loss(xb, samples, noise_generator)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
        losses[i] = loss.detach()
    return losses


def _epoch_mean(losses: list[float], n: int, batch_size: int) -> float:
    """Mean per-image loss of an epoch from its per-batch means (the last batch may be smaller)."""
    total = 0.0
    for i, value in enumerate(losses):
        total += value * min(batch_size, n - i * batch_size)
    return total / n


@torch.no_grad()
def evaluate_loss(model: VAE, x: Tensor, samples: int, seed: int, batch_size: int = 500) -> dict[str, float]:
    """Mean per-image negative ELBO (and its two terms) on ``x`` in float32, with fixed noise ``seed``."""
    was_training = model.training
    model.eval()
    g = _generator(x.device, seed)
    rec = torch.zeros((), device=x.device, dtype=torch.float64)
    kl = torch.zeros((), device=x.device, dtype=torch.float64)
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        logits, mu, logvar = model(xb, samples, g)
        rec += bernoulli_nll(logits, xb).mean(0).sum()
        kl += gaussian_kl(mu, logvar).sum()
    model.train(was_training)
    n = x.shape[0]
    rec_, kl_ = rec.item(), kl.item()
    return {"loss": (rec_ + kl_) / n, "rec": rec_ / n, "kl": kl_ / n}


def build_run(spec: RunSpec, cfg: ReproduceConfig, device: torch.device):
    """The model (at its initial widths, seeded with ``cfg.seed``), its optimizer and its schedule."""
    torch.manual_seed(cfg.seed)
    schedule = make_schedule(spec, cfg)
    if schedule is not None:
        w0 = schedule.initial_widths()
        h1, h2 = w0["h1"], w0["h2"]
    else:
        h1, h2 = spec.widths or cfg.target
    model = VAE(h1, h2, capacity=cfg.target, latent=cfg.latent, device=device)
    optimizer = Adam(model.parameters(), lr=cfg.lr)
    model.attach_optimizer(optimizer)
    return model, optimizer, schedule


def checkpoint_path(folder: Path, spec: RunSpec) -> Path:
    """Where a run's per-epoch checkpoint lives."""
    return Path(folder) / f"{spec.name}.last.pt"


def _trajectory(spec: RunSpec, cfg: ReproduceConfig) -> dict[str, Any]:
    c = asdict(cfg)
    return {"run": spec.name, **{k: repr(c[k]) for k in _TRAJECTORY_FIELDS}}


def check_resumable(spec: RunSpec, cfg: ReproduceConfig, checkpoint_dir: Path) -> bool:
    """Whether ``spec`` has a checkpoint in ``checkpoint_dir``; raise :class:`ResumeError` if that
    checkpoint was written by a configuration that trains differently."""
    ckpt = checkpoint_path(checkpoint_dir, spec)
    if not ckpt.is_file():
        return False
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["extra"].get("trajectory")
    identity = _trajectory(spec, cfg)
    if saved != identity:
        diff = sorted(k for k in identity if saved is None or saved.get(k) != identity[k])
        raise ResumeError(f"{ckpt} was written by another configuration (differs in {diff}); "
                          f"resume with the original options or use another --out")
    return True


def check_checkpoints(specs: Sequence[RunSpec], cfg: ReproduceConfig, checkpoint_dir: Path, *,
                      resume: bool) -> list[str]:
    """Check the checkpoints in ``checkpoint_dir`` against the request; return the names of the
    runs of ``specs`` that will start from scratch.

    Without ``resume``, none of ``specs`` may have a checkpoint there (a new run would overwrite
    it): :class:`ResumeError`. With ``resume``, every checkpoint there must come from this
    configuration (:class:`ResumeError` otherwise); runs without one start from scratch.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if resume:
        return [spec.name for spec in specs if not check_resumable(spec, cfg, checkpoint_dir)]
    existing = [spec.name for spec in specs if checkpoint_path(checkpoint_dir, spec).is_file()]
    if existing:
        raise ResumeError(f"{checkpoint_dir} already holds checkpoints of {', '.join(existing)}, which a new run "
                          f"would overwrite: pass --resume to continue (or reload) them, or choose another --out")
    return [spec.name for spec in specs]


def add_spikes(events: list[dict[str, Any]], steps: Sequence[float], window: int) -> None:
    """Give each growth event its training-loss spike: the largest batch loss of the ``window``
    steps from the growth on (``post_max``) minus the mean of the ``window`` steps before it
    (``pre_mean``)."""
    for ev in events:
        s = int(ev["step"])
        pre = steps[max(0, s - window) : s]
        post = steps[s : s + window]
        ev["pre_mean"] = sum(pre) / len(pre) if pre else float("nan")
        ev["post_max"] = max(post) if post else float("nan")
        ev["spike"] = ev["post_max"] - ev["pre_mean"]


def train_run(
    spec: RunSpec,
    cfg: ReproduceConfig,
    train: Tensor,
    test: Tensor,
    *,
    checkpoint_dir: Optional[Path] = None,
    resume: bool = False,
    on_epoch: Optional[Callable[[dict[str, Any]], None]] = None,
) -> dict[str, Any]:
    """Train one model; return its history, steps, growth events, estimates, wall time and the model.

    With ``checkpoint_dir``, a checkpoint is written atomically after every epoch (model,
    optimizer, generators, metrics so far). With ``resume``, a run whose checkpoint is there
    continues after its last saved epoch and ends exactly as the uninterrupted run would
    (bit for bit on the CPU); a finished run is loaded without training. ``on_epoch`` is
    called with each epoch's metrics row after its checkpoint is written.
    """
    device = train.device
    model, optimizer, schedule = build_run(spec, cfg, device)
    gens = {"grow": _generator(device, cfg.seed + 1), "data": torch.Generator().manual_seed(cfg.seed + 2),
            "noise": _generator(device, cfg.seed + 3)}
    probe = test[: cfg.probe_images]
    gap_set = set(gap_epochs(cfg))
    history: list[dict[str, Any]] = []
    steps: list[float] = []
    events: list[dict[str, Any]] = []
    estimates: list[dict[str, Any]] = []
    wall = 0.0
    first_epoch = 0
    ckpt = None
    if checkpoint_dir is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        ckpt = checkpoint_path(checkpoint_dir, spec)
    identity = _trajectory(spec, cfg)
    if resume and ckpt is not None and ckpt.is_file():
        check_resumable(spec, cfg, checkpoint_dir)
        extra = load_checkpoint(ckpt, model, optimizer, generators=gens, wiring=model.wiring, map_location="cpu")
        history, events, estimates = list(extra["history"]), list(extra["events"]), list(extra["estimates"])
        steps = extra["steps"].tolist()
        wall = float(extra["wall_time"])
        first_epoch = int(extra["epoch"]) + 1

    n = train.shape[0]
    for epoch in range(first_epoch, cfg.epochs):
        t0 = time.perf_counter()
        grew = False
        if schedule is not None and epoch in schedule.growth_epochs():
            before_w = model.widths()
            before = evaluate_loss(model, probe, cfg.samples, cfg.seed + 5)["loss"]
            closure = growth_closure(model, train, cfg, epoch) if spec.init in ("gradmax", "tiny") else None
            grew = apply_growth(schedule, epoch, model.wiring, init=spec.init, keep=spec.keep,
                                optimizer_state=spec.optimizer_state, generator=gens["grow"], closure=closure)
            if grew:
                after = evaluate_loss(model, probe, cfg.samples, cfg.seed + 5)["loss"]
                events.append({"run": spec.name, "index": len(events) + 1, "epoch": epoch, "step": len(steps),
                               "h1_before": before_w[0], "h2_before": before_w[1],
                               "h1": model.widths()[0], "h2": model.widths()[1],
                               "probe_before": before, "probe_after": after, "jump": after - before})
        t_train = time.perf_counter()
        losses = train_epoch(model, optimizer, train, batch_size=cfg.batch_size, samples=cfg.samples,
                             data_generator=gens["data"], noise_generator=gens["noise"],
                             precision=cfg.precision).tolist()
        t_trained = time.perf_counter()
        steps.extend(losses)
        ev = evaluate_loss(model, test, cfg.samples, cfg.seed + 4)
        h1, h2 = model.widths()
        if epoch in gap_set:
            gap = iwae_gap(model, test[: cfg.gap_images], cfg.gap_k,
                           generator=_generator(device, cfg.seed + 10 + epoch))
            estimates.append({"run": spec.name, "epoch": epoch, "h1": h1, "h2": h2, **gap})
        now = time.perf_counter()
        row = {
            "run": spec.name, "epoch": epoch, "h1": h1, "h2": h2, "params": model.num_parameters(),
            "grew": int(grew), "train_loss": _epoch_mean(losses, n, cfg.batch_size), "test_loss": ev["loss"],
            "test_elbo": -ev["loss"], "test_rec": ev["rec"], "test_kl": ev["kl"],
            "train_time": t_trained - t_train, "epoch_time": now - t0,
        }
        history.append(row)
        wall += now - t0
        if ckpt is not None:
            save_checkpoint(ckpt, model, optimizer, generators=gens, wiring=model.wiring, extra={
                "epoch": epoch, "history": history, "events": events, "estimates": estimates,
                "steps": torch.tensor(steps, dtype=torch.float64), "wall_time": wall, "trajectory": identity,
            })
        if on_epoch is not None:
            on_epoch(row)

    add_spikes(events, steps, cfg.spike_window)
    return {"spec": spec, "history": history, "steps": steps, "events": events, "estimates": estimates,
            "wall_time": wall, "model": model}
