"""GrowLinear(activation=...) against nn.Linear + the activation of the same active size.

Modes (each side interleaved with the other in one run, medians over many samples):

- ``fwd``: forward only, under ``torch.no_grad()``.
- ``fwd+bwd``: forward and backward of ``y.backward(grad_y)``, the input requiring grad
  (as for a hidden layer), every ``.grad`` reset to ``None`` before each call.
- ``step``: a training step as a user runs it: ``opt.zero_grad()``, forward, backward,
  ``opt.step()`` with Adam. nn.Linear uses ``torch.optim.Adam``; GrowLinear is timed with
  ``torch.optim.Adam`` (which steps over the whole capacity) and with
  ``growdense.optim.Adam`` (which steps over the active block only), where it exists.

``--activation`` picks the fused activation (relu, the default and the one the goals are
set for; gelu, gelu_tanh, silu, none); the baseline applies the same torch function
(``growdense.ops.ACTIVATION_FUNCTIONS``) after ``nn.Linear``.

``ratio`` is active/capacity: the GrowLinear is allocated at capacity = active / ratio in
both dimensions and compared with an nn.Linear of the active size. On CUDA the table
also gives achieved TFLOP/s and the fraction of a measured peak (a large ``torch.mm``
timed in the same run).

    python benchmarks/bench_layer.py                 # CPU, default sizes (~3 min)
    python benchmarks/bench_layer.py --device cuda   # GPU sweep
    python benchmarks/bench_layer.py --quick         # seconds
    python benchmarks/bench_layer.py --activation gelu --sizes vae --modes fwd,fwd+bwd
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import growdense  # noqa: E402
from growdense import GrowLinear  # noqa: E402

try:  # the active-block optimizer, where this version of growdense has it
    from growdense.optim import Adam as GrowAdam  # noqa: E402
except ImportError:  # pragma: no cover
    GrowAdam = None

VAE_SIZES = [(128, 784, 256), (128, 256, 128), (128, 128, 20)]
CPU_LARGE = [(1024, 1024, 1024), (1024, 2048, 2048)]
GPU_BATCHES = [128, 1024, 8192, 65536]
GPU_WIDTHS = [16, 64, 256, 1024, 4096]
QUICK_SIZES = [(32, 48, 24), (16, 24, 8)]
MODES = ("fwd", "fwd+bwd", "step")

# Goals (time ratios growdense / nn.Linear on the CPU; speedups nn / growdense on CUDA).
CPU_GOAL_FULL = 1.05  # fwd+bwd, active = capacity
CPU_GOAL_EIGHTH = 1.25  # step, active = capacity / 8
CUDA_GOAL_VAE = 1.3  # speedup at the VAE sizes
CUDA_GOAL_LARGE = 0.9  # speedup at 4096x4096, batch 8192


@dataclass
class Config:
    batch: int
    d_in: int
    d_out: int
    ratio: int  # capacity = active * ratio

    @property
    def capacity(self) -> tuple[int, int]:
        return self.d_in * self.ratio, self.d_out * self.ratio

    def label(self) -> str:
        return f"{self.batch} | {self.d_in}→{self.d_out} | {self.capacity[0]}→{self.capacity[1]} | 1/{self.ratio}"


def configs(args) -> list[Config]:
    ratios = [int(r) for r in args.ratios.split(",")]
    if args.quick:
        sizes = QUICK_SIZES
    else:
        sizes = []
        for part in args.sizes.split(","):
            if part == "vae":
                sizes += VAE_SIZES
            elif part == "large":
                sizes += CPU_LARGE if args.device == "cpu" else [(b, w, w) for b in (1024, 8192) for w in (1024, 4096)]
            elif part == "sweep":
                sizes += [(b, w, w) for b in GPU_BATCHES for w in GPU_WIDTHS]
            else:
                raise SystemExit(f"unknown --sizes part {part!r}; use vae, large, sweep")
    out, seen = [], set()
    for batch, d_in, d_out in sizes:
        for ratio in ratios:
            cfg = Config(batch, d_in, d_out, ratio)
            cap_in, cap_out = cfg.capacity
            key = (batch, d_in, d_out, ratio)
            if key in seen:
                continue
            seen.add(key)
            if cap_in * cap_out * 4 > args.max_capacity_mib * 2**20:
                print(f"# skipped {cfg.label()}: capacity weight over --max-capacity-mib", flush=True)
                continue
            # The sweep's ratios < 1 only where they matter: VAE sizes and the large squares.
            if part_is_sweep_only(cfg, args) and ratio != 1:
                continue
            out.append(cfg)
    return out


def part_is_sweep_only(cfg: Config, args) -> bool:
    if args.quick or "sweep" not in args.sizes.split(","):
        return False
    vae = (cfg.batch, cfg.d_in, cfg.d_out) in VAE_SIZES
    large = cfg.batch == 8192 and cfg.d_in in (1024, 4096) and cfg.d_in == cfg.d_out
    return not (vae or large)


def make_groups(cfg: Config, mode: str, device: str, dtype: torch.dtype, seed: int,
                activation: str = "relu") -> list[dict]:
    """Groups of functions to time for one configuration and mode, keyed by side name.

    The sides of one group run interleaved; the first side of each group is the baseline.
    """
    act = growdense.ops.ACTIVATION_FUNCTIONS[activation] or (lambda t: t)
    plain = f"nn.Linear+{activation}"
    torch.manual_seed(seed)
    cap_in, cap_out = cfg.capacity
    lin = nn.Linear(cfg.d_in, cfg.d_out, device=device, dtype=dtype)
    x0 = torch.randn(cfg.batch, cfg.d_in, device=device, dtype=dtype)
    gy = torch.randn(cfg.batch, cfg.d_out, device=device, dtype=dtype)

    def grow_layer() -> GrowLinear:
        layer = GrowLinear(
            cfg.d_in, cfg.d_out, capacity_in=cap_in, capacity_out=cap_out, activation=activation,
            device=device, dtype=dtype,
        )
        with torch.no_grad():
            layer.active_weight.copy_(lin.weight)
            layer.active_bias.copy_(lin.bias)
        return layer

    sides = {}
    if mode == "fwd":
        layer = grow_layer()

        def nn_fwd():
            with torch.no_grad():
                return act(lin(x0))

        def gd_fwd():
            with torch.no_grad():
                return layer(x0)

        sides[plain] = nn_fwd
        sides["GrowLinear"] = gd_fwd
        return [sides]

    if mode == "fwd+bwd":
        layer = grow_layer()
        xa, xb = x0.clone().requires_grad_(), x0.clone().requires_grad_()

        def nn_fb():
            lin.weight.grad = lin.bias.grad = xa.grad = None
            act(lin(xa)).backward(gy)

        def gd_fb():
            layer.weight.grad = layer.bias.grad = xb.grad = None
            layer(xb).backward(gy)

        sides[plain] = nn_fb
        sides["GrowLinear"] = gd_fb
        return [sides]

    # step: each GrowLinear variant is timed in its own group with the baseline, so that
    # one variant's memory traffic (torch's Adam over the whole capacity) does not evict
    # the caches the other sides run in.
    def stepper(opt, x, fn):
        def step():
            opt.zero_grad()
            x.grad = None
            fn(x).backward(gy)
            opt.step()

        return step

    groups = []
    variants = [("GrowLinear, torch Adam", torch.optim.Adam)]
    if GrowAdam is not None:
        variants.insert(0, ("GrowLinear, growdense Adam", GrowAdam))
    for name, make_opt in variants:
        base = nn.Linear(cfg.d_in, cfg.d_out, device=device, dtype=dtype)
        with torch.no_grad():
            base.weight.copy_(lin.weight)
            base.bias.copy_(lin.bias)
        xa = x0.clone().requires_grad_()
        layer = grow_layer()
        xb = x0.clone().requires_grad_()
        groups.append({
            f"{plain}, torch Adam": stepper(torch.optim.Adam(base.parameters()), xa, lambda x, m=base: act(m(x))),
            name: stepper(make_opt(layer.parameters()), xb, layer),
        })
    return groups


def flops(cfg: Config, mode: str) -> float:
    per = 2.0 * cfg.batch * cfg.d_in * cfg.d_out
    return per if mode == "fwd" else 3 * per  # backward: grad_x and grad_w GEMMs


def measure_peak(device: str, dtype: torch.dtype, quick: bool) -> dict:
    """TFLOP/s of one large square torch.mm on this device, measured now."""
    n = 256 if quick else (8192 if device.startswith("cuda") else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    samples = common.time_interleaved(
        {"mm": lambda: torch.mm(a, b)}, device=device, warmup=2, reps=3 if quick else 10
    )
    t = common.median(samples["mm"])
    return {"n": n, "median_s": t, "tflops": 2.0 * n**3 / t / 1e12}


def calibrate_inner(fn, device: str, target_s: float) -> int:
    """How many back-to-back calls make one sample last about ``target_s``."""
    samples = common.time_interleaved({"f": fn}, device=device, warmup=1, reps=3)
    t = max(common.median(samples["f"]), 1e-7)
    return int(min(max(round(target_s / t), 1), 200))


def goal_for(cfg: Config, mode: str, device: str, side: str, activation: str = "relu") -> Optional[tuple[str, float]]:
    """(kind, threshold) of the issue's goal that applies to this row, or None (the goals
    are set for ReLU layers)."""
    if activation != "relu":
        return None
    if device == "cpu":
        if mode == "fwd+bwd" and cfg.ratio == 1:
            return ("time ratio ≤", CPU_GOAL_FULL)
        if mode == "step" and cfg.ratio == 8 and side == "GrowLinear, growdense Adam":
            return ("time ratio ≤", CPU_GOAL_EIGHTH)
        return None
    if mode == "fwd+bwd" and cfg.ratio == 1:
        if (cfg.batch, cfg.d_in, cfg.d_out) in VAE_SIZES:
            return ("speedup ≥", CUDA_GOAL_VAE)
        if (cfg.batch, cfg.d_in, cfg.d_out) == (8192, 4096, 4096):
            return ("speedup ≥", CUDA_GOAL_LARGE)
    return None


def measure_group(sides: dict, cfg: Config, mode: str, args, reps: int, warmup: int, max_seconds: float,
                  peak: dict, cuda: bool) -> list[dict]:
    """Time one group of sides interleaved; one row per non-baseline side."""
    ref_name = next(iter(sides))
    inner = 1
    if not args.quick:
        inner = calibrate_inner(sides[ref_name], args.device, 2e-3 if cuda else 1e-3)
    samples = common.time_interleaved(
        sides, device=args.device, warmup=warmup, reps=reps, inner=inner, max_seconds=max_seconds
    )
    ref = samples[ref_name]
    rows = []
    for side, xs in samples.items():
        if side == ref_name:
            continue
        t_ref, t = common.median(ref), common.median(xs)
        ratio = common.paired_ratio(xs, ref)
        row = {
            "batch": cfg.batch, "in": cfg.d_in, "out": cfg.d_out,
            "capacity_in": cfg.capacity[0], "capacity_out": cfg.capacity[1],
            "active_over_capacity": f"1/{cfg.ratio}", "mode": mode,
            "activation": args.activation, "baseline": ref_name, "side": side,
            "baseline_median_s": t_ref, "median_s": t,
            "baseline_iqr_rel": common.spread(ref), "iqr_rel": common.spread(xs),
            "samples": len(xs), "calls_per_sample": inner,
            "time_ratio": ratio, "speedup": 1.0 / ratio,
        }
        if mode != "step":
            f = flops(cfg, mode)
            row["tflops"] = f / t / 1e12
            row["baseline_tflops"] = f / t_ref / 1e12
            row["fraction_of_peak"] = row["tflops"] / peak["tflops"]
        goal = goal_for(cfg, mode, "cuda" if cuda else "cpu", side, args.activation)
        if goal is not None:
            kind, threshold = goal
            value = ratio if kind.startswith("time") else 1.0 / ratio
            met = value <= threshold if kind.startswith("time") else value >= threshold
            row["goal"] = f"{kind} {threshold}"
            row["goal_met"] = bool(met)
        rows.append(row)
        print(
            f"{cfg.label()} | {mode} | {side}: {common.fmt_time(t)} vs {common.fmt_time(t_ref)} -> x{ratio:.3f}"
            + (f"  [{row['goal']}: {'met' if row['goal_met'] else 'MISSED'}]" if "goal" in row else ""),
            flush=True,
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--sizes", default=None, help="comma list of vae, large, sweep (default: vae,large on "
                        "the CPU, vae,sweep on CUDA)")
    parser.add_argument("--ratios", default="1,2,8", help="capacity / active factors (default: %(default)s)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of fwd, fwd+bwd, step")
    parser.add_argument("--activation", default="relu", choices=sorted(growdense.ops.ACTIVATION_FUNCTIONS),
                        help="the layer's fused activation (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=None, help="samples per side (default 30 CPU, 50 CUDA)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="time budget per configuration and mode (default 4 s CPU, 2 s CUDA)")
    parser.add_argument("--max-capacity-mib", type=float, default=512,
                        help="skip configurations whose capacity weight exceeds this (default %(default)s)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.sizes is None:
        args.sizes = "vae,sweep" if cuda else "vae,large"
    reps = args.reps or (3 if args.quick else (50 if cuda else 30))
    warmup = 1 if args.quick else args.warmup
    max_seconds = args.max_seconds or (0.5 if args.quick else (2.0 if cuda else 4.0))
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; use {', '.join(MODES)}")
    dtype = torch.float32

    info = common.setup(args.threads, args.device)
    peak = measure_peak(args.device, dtype, args.quick)
    print(f"# peak: torch.mm {peak['n']}x{peak['n']} float32: {peak['tflops']:.3f} TFLOP/s", flush=True)

    rows = []
    for cfg in configs(args):
        for mode in modes:
            if mode == "step" and part_is_sweep_only(cfg, args):
                continue  # the sweep's other sizes: kernels only (fwd, fwd+bwd)
            for sides in make_groups(cfg, mode, args.device, dtype, args.seed, args.activation):
                rows.extend(measure_group(sides, cfg, mode, args, reps, warmup, max_seconds, peak, cuda))
    common.finish(info)

    header = ["batch", "in→out", "capacity", "active/cap", "mode", "side", "baseline (nn.Linear)", "growdense",
              "time ratio"]
    if cuda:
        header += ["TFLOP/s", "% of peak", "speedup"]
    header += ["goal"]
    table_rows = []
    for r in rows:
        cells = [
            r["batch"], f"{r['in']}→{r['out']}", f"{r['capacity_in']}→{r['capacity_out']}", r["active_over_capacity"],
            r["mode"], r["side"], common.fmt_time(r["baseline_median_s"]), common.fmt_time(r["median_s"]),
            f"{r['time_ratio']:.3f}",
        ]
        if cuda:
            cells += [
                f"{r['tflops']:.2f}" if "tflops" in r else "-",
                f"{100 * r['fraction_of_peak']:.0f}%" if "fraction_of_peak" in r else "-",
                f"{r['speedup']:.2f}x",
            ]
        cells.append(("met" if r["goal_met"] else "**missed**") + f" ({r['goal']})" if "goal" in r else "")
        table_rows.append(cells)
    common.report(
        "bench_layer", args, info, header, table_rows,
        [f"Activation: {args.activation}. Peak: torch.mm {peak['n']}² float32 = {peak['tflops']:.3f} TFLOP/s.",
         f"Medians of up to {reps} interleaved samples per side after {warmup} warm-up rounds; time ratio = "
         "median over rounds of growdense / nn.Linear (< 1: growdense faster)."],
        {"peak": peak, "reps": reps, "warmup": warmup, "dtype": str(dtype), "rows": rows},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
