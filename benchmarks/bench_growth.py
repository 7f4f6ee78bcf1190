"""One growth event: growdense in place against the reallocating way the study used.

The event takes an n x n layer (n inputs) from n/2 to n output neurons, while it trains
with Adam. Sides, interleaved in one run:

- ``floor``: drawing the new rows' He values into memory that is already there
  (``w[n/2:].normal_(0, sqrt(2/n))`` on a preallocated tensor). Any method has to draw
  them; growdense's goal is to cost no more than 1.2x this.
- ``growdense``: ``GrowLinear.grow_out(n/2)`` on a layer allocated at capacity n
  (He rows drawn in place, bias rows zero), then ``optim_state.zero_state_`` on Adam's
  moments for the new rows, as ``Wiring.grow`` does. The Parameters and the optimizer stay.
- ``growdense, layer only``: ``grow_out`` without the optimizer-state edit.
- ``reallocate``: the study's way: a new ``nn.Linear(n, n)`` (allocated and initialised
  by its constructor), the old weights and bias copied into its first rows, He values
  drawn for the new rows and their bias zeroed, and a new ``torch.optim.Adam`` built on
  the new Parameters (the old moments are lost; the new ones are allocated at its first
  step, which is not counted here).

Bytes newly allocated during one event are counted for each side (``common.NewBytes``:
every new tensor an op returns; on CUDA also the caching allocator's counter).

    python benchmarks/bench_growth.py                 # CPU, n = 1024, 2048, 4096
    python benchmarks/bench_growth.py --device cuda
    python benchmarks/bench_growth.py --quick
    python benchmarks/bench_growth.py --threads 1 --shrink-only   # the shrink rows alone

A second table times a shrink: the smaller-norm half of a 4096->2048->4096 hidden width
removed while Adam trains (``--shrink-sizes``). Sides, interleaved, each event on a
fresh copy made outside the timing: ``growdense`` (``Wiring.shrink(keep="norm")``:
kept neurons outside the first half move into the dropped places inside it, in the
weights, bias and Adam's moments, which are kept) and ``torch-pruning`` (Torch-Pruning's
way: a dependency graph traced on an example input, the L2 norms of the first layer's
rows, ``prune_linear_out_channels`` through the pruning group, then a new Adam: its
state is lost). Torch-Pruning is not a dependency: without it the row is skipped.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Optional
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from growdense import GrowLinear, optim_state  # noqa: E402

try:
    from growdense.optim import Adam as GrowAdam  # noqa: E402
except ImportError:  # pragma: no cover
    GrowAdam = torch.optim.Adam

GOAL_FLOOR = 1.2  # growdense event <= 1.2x the floor


def he_std(fan_in: int) -> float:
    return math.sqrt(2.0 / fan_in)


def one_adam_step(params, opt) -> None:
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def make_sides(n: int, device: str, dtype: torch.dtype) -> tuple[dict, dict, dict]:
    """For size n: (timed events, the same events to run once for the allocation count,
    the untimed resets that bring the growdense layers back to n/2 outputs)."""
    half = n // 2
    std = he_std(n)

    # floor
    floor_buf = torch.zeros(n, n, device=device, dtype=dtype)

    def floor():
        floor_buf[half:].normal_(0.0, std)

    # growdense: a layer at capacity n x n, active n/2 rows, with Adam state
    layer = GrowLinear(n, half, capacity_out=n, device=device, dtype=dtype)
    opt = GrowAdam(layer.parameters(), lr=1e-3)
    one_adam_step(list(layer.parameters()), opt)
    layer_only = GrowLinear(n, half, capacity_out=n, device=device, dtype=dtype)

    def growdense():
        layer.grow_out(n - half)
        optim_state.zero_state_(opt, layer.weight, 0, half, n)
        optim_state.zero_state_(opt, layer.bias, 0, half, n)

    def growdense_reset():
        layer.shrink_out(half)

    def growdense_layer_only():
        layer_only.grow_out(n - half)

    def growdense_layer_only_reset():
        layer_only.shrink_out(half)

    # reallocate: the old nn.Linear and its Adam stay as they were; each event builds anew
    old = nn.Linear(n, half, device=device, dtype=dtype)
    old_opt = torch.optim.Adam(old.parameters(), lr=1e-3)
    one_adam_step(list(old.parameters()), old_opt)
    keep = {}

    def reallocate():
        new = nn.Linear(n, n, device=device, dtype=dtype)
        with torch.no_grad():
            new.weight[:half].copy_(old.weight)
            new.bias[:half].copy_(old.bias)
            new.weight[half:].normal_(0.0, std)
            new.bias[half:].zero_()
        keep["layer"], keep["opt"] = new, torch.optim.Adam(new.parameters(), lr=1e-3)

    timed = {
        "floor": floor,
        "growdense": _with_reset(growdense, growdense_reset),
        "growdense, layer only": _with_reset(growdense_layer_only, growdense_layer_only_reset),
        "reallocate": reallocate,
    }
    once = {
        "floor": floor,
        "growdense": growdense,
        "growdense, layer only": growdense_layer_only,
        "reallocate": reallocate,
    }
    resets = {"growdense": growdense_reset, "growdense, layer only": growdense_layer_only_reset}
    return timed, once, resets


class _with_reset:
    """A timed event and an untimed reset to run after it (see time_events)."""

    def __init__(self, event, reset):
        self.event, self.reset = event, reset

    def __call__(self):
        self.event()


def time_events(sides: dict, device: str, warmup: int, reps: int, max_seconds: float) -> dict:
    """Like common.time_interleaved, with each event's untimed reset run after it."""
    import time

    names = list(sides)
    samples = {name: [] for name in names}
    cuda = device.startswith("cuda")

    def run(name):
        fn = sides[name]
        common.sync(device)
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            elapsed = begin.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t0
        if isinstance(fn, _with_reset):
            fn.reset()
        common.sync(device)
        return elapsed

    for _ in range(warmup):
        for name in names:
            run(name)
    started = time.perf_counter()
    for r in range(reps):
        for name in names if r % 2 == 0 else names[::-1]:
            samples[name].append(run(name))
        if r >= 4 and time.perf_counter() - started > max_seconds:
            break
    return samples


def torch_pruning_version() -> Optional[str]:
    """The installed Torch-Pruning distribution's version (its module's ``__version__`` can lag behind it)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("torch-pruning")
    except (ImportError, PackageNotFoundError):
        return None


def shrink_samples(hidden: int, outer: int, reps: int, warmup: int) -> Optional[dict]:
    """Interleaved timings of one keep="norm" shrink of ``hidden`` to ``hidden // 2`` (see the docstring)."""
    import time

    try:
        import torch_pruning as tp
    except ImportError:
        print("torch_pruning is not installed: the Torch-Pruning shrink row is skipped "
              "(pip install torch-pruning==1.6.1 to run it)", flush=True)
        return None
    from growdense import Wiring

    to = hidden // 2
    torch.manual_seed(0)
    fc1 = GrowLinear(outer, hidden)
    fc2 = GrowLinear(hidden, outer)
    opt = GrowAdam(list(fc1.parameters()) + list(fc2.parameters()), lr=1e-3)
    one_adam_step(list(fc1.parameters()) + list(fc2.parameters()), opt)
    params = [fc1.weight, fc1.bias, fc2.weight, fc2.bias]
    saved = [p.detach().clone() for p in params]
    saved_state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    wiring = Wiring(opt)
    wiring.add("h", fc1, [fc2])

    def restore_growdense():
        with torch.no_grad():
            for p, value, state in zip(params, saved, saved_state):
                p.copy_(value)
                for k, v in state.items():
                    opt.state[p][k].copy_(v)
        fc1.set_active_width_("out", hidden)
        fc2.set_active_width_("in", hidden)

    def growdense_event():
        wiring.shrink("h", to, keep="norm")

    plain = {}

    def restore_tp():
        model = nn.Sequential(nn.Linear(outer, hidden), nn.ReLU(), nn.Linear(hidden, outer))
        with torch.no_grad():
            model[0].weight.copy_(saved[0]); model[0].bias.copy_(saved[1])
            model[2].weight.copy_(saved[2]); model[2].bias.copy_(saved[3])
        popt = torch.optim.Adam(model.parameters(), lr=1e-3)
        one_adam_step(list(model.parameters()), popt)
        plain["model"], plain["opt"] = model, popt

    def tp_event():
        model = plain["model"]
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, outer))
        norms = model[0].weight.detach().norm(dim=1)
        drop = torch.sort(norms, stable=True).indices[: hidden - to].tolist()
        group = graph.get_pruning_group(model[0], tp.prune_linear_out_channels, idxs=drop)
        group.prune()
        plain["opt"] = torch.optim.Adam(model.parameters(), lr=1e-3)

    sides = {"growdense": (restore_growdense, growdense_event), "torch-pruning": (restore_tp, tp_event)}
    samples = {name: [] for name in sides}
    for r in range(warmup + reps):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in order:
            setup, event = sides[name]
            setup()
            begin = time.perf_counter()
            event()
            elapsed = time.perf_counter() - begin
            if r >= warmup:
                samples[name].append(elapsed)
    return samples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--sizes", default="1024,2048,4096", help="layer sizes n (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=None, help="events per side (default 15)")
    parser.add_argument("--max-seconds", type=float, default=None, help="time budget per size (default 40 s)")
    parser.add_argument("--shrink-sizes", default="4096,2048", help="outer,hidden widths of the shrink rows")
    parser.add_argument("--shrink-only", action="store_true", help="only the shrink table")
    args = parser.parse_args(argv)
    sizes = [] if args.shrink_only else [64, 128] if args.quick else [int(s) for s in args.sizes.split(",")]
    reps = args.reps or (3 if args.quick else 15)
    warmup = 1 if args.quick else 2
    max_seconds = args.max_seconds or (2.0 if args.quick else 40.0)
    dtype = torch.float32
    info = common.setup(args.threads, args.device)
    torch.manual_seed(args.seed)

    rows = []
    for n in sizes:
        timed, once, resets = make_sides(n, args.device, dtype)
        allocated = {}
        for name, fn in once.items():
            with common.NewBytes(args.device) as nb:
                fn()
            if name in resets:
                resets[name]()
            allocated[name] = nb
        samples = time_events(timed, args.device, warmup, reps, max_seconds)
        floor = samples["floor"]
        layer_bytes = n * n * torch.finfo(dtype).bits // 8
        for name, xs in samples.items():
            row = {
                "n": n, "event": f"{n // 2}→{n} outputs of {n} inputs", "side": name,
                "median_s": common.median(xs), "iqr_rel": common.spread(xs), "samples": len(xs),
                "ratio_to_floor": common.paired_ratio(xs, floor),
                "ratio_to_reallocate": common.paired_ratio(xs, samples["reallocate"]),
                "new_bytes": allocated[name].bytes, "largest_new_tensor_bytes": allocated[name].largest,
                "layer_bytes": layer_bytes,
                "cuda_allocated_bytes": allocated[name].cuda_allocated,
            }
            if name == "growdense":
                row["goal"] = f"time ≤ {GOAL_FLOOR}x floor, no allocation of the layer's size"
                row["goal_met"] = bool(row["ratio_to_floor"] <= GOAL_FLOOR and allocated[name].largest < layer_bytes)
            rows.append(row)
            print(
                f"n={n} {name}: {common.fmt_time(row['median_s'])}, x{row['ratio_to_floor']:.2f} floor, "
                f"x{row['ratio_to_reallocate']:.3f} reallocate, new {common.fmt_bytes(row['new_bytes'])}"
                + (f"  [{'met' if row['goal_met'] else 'MISSED'}]" if "goal" in row else ""),
                flush=True,
            )
    outer, hidden = (256, 128) if args.quick else (int(v) for v in args.shrink_sizes.split(","))
    shrink = shrink_samples(hidden, outer, reps, warmup)
    common.finish(info)
    shrink_table, shrink_rows = [], []
    if shrink is not None:
        ratio = common.paired_ratio(shrink["torch-pruning"], shrink["growdense"])
        for name, xs in shrink.items():
            speed = ratio if name == "growdense" else 1.0
            shrink_rows.append({"n": hidden, "event": f"{outer}->{hidden}->{outer}: keep the larger-norm {hidden // 2}",
                         "side": name, "median_s": common.median(xs), "iqr_rel": common.spread(xs),
                         "samples": len(xs), "speed_vs_torch_pruning": speed})
            shrink_table.append([f"{outer}->{hidden}->{outer}", name, common.fmt_time(common.median(xs)),
                                 f"{speed:.2f}x", "kept" if name == "growdense" else "lost (new Adam)"])
            print(f"shrink {outer}->{hidden}->{outer} {name}: {common.fmt_time(common.median(xs))}, "
                  f"{speed:.2f}x Torch-Pruning's speed", flush=True)

    header = ["layer", "event", "side", "median", "× floor", "× reallocate", "new memory", "goal"]
    table = []
    for r in rows:
        mem = common.fmt_bytes(r["new_bytes"])
        if r["cuda_allocated_bytes"] is not None:
            mem += f" (CUDA allocator: {common.fmt_bytes(r['cuda_allocated_bytes'])})"
        goal = ""
        if "goal" in r:
            goal = ("met" if r["goal_met"] else "**missed**") + f" (≤ {GOAL_FLOOR}x floor, no layer-sized allocation)"
        table.append([
            f"{r['n']}x{r['n']}", r["event"], r["side"], common.fmt_time(r["median_s"]),
            f"{r['ratio_to_floor']:.2f}", f"{r['ratio_to_reallocate']:.3f}", mem, goal,
        ])
    common.report(
        "bench_growth", args, info, header, table,
        [f"Medians of up to {reps} interleaved events per side after {warmup} warm-up rounds; ratios are medians "
         "over rounds of the per-round ratio. float32."]
        + ([f"Shrink (keep the larger-norm half; growdense keeps Adam's state, Torch-Pruning "
            f"{torch_pruning_version()} builds a new Adam), "
            f"speed relative to Torch-Pruning (median of per-round ratios, higher is faster; goal >= 1x):\n\n"
            + common.markdown_table(["widths", "side", "median", "speed vs Torch-Pruning", "Adam state"], shrink_table)]
           if shrink_table else []),
        {"reps": reps, "warmup": warmup, "dtype": str(dtype), "rows": rows, "shrink_rows": shrink_rows,
         "torch_pruning_version": torch_pruning_version()},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
