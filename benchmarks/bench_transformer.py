"""The example transformer (examples/grow_gpt.py): a training step, a growth event, what growth allocates.

The model is :class:`growdense.models.GPT` (2 pre-norm blocks; capacity: width 128,
4 heads of 32, FFN 512; vocabulary 96; batch 16 x 64 tokens), against
:class:`growdense.models.gpt.PlainGPT`, the same network in plain PyTorch (nn.Embedding,
nn.LayerNorm, nn.Linear, ``F.scaled_dot_product_attention``, as nanoGPT writes it). Every
pair is timed interleaved in one run (the order alternating every round), after warm-up,
and reported as medians and the median of the per-round ratios.

- **step, half capacity**: one training step (forward, cross-entropy, ``zero_grad``,
  backward, AdamW step) of the GPT at width 64, 2 heads, FFN 256 inside its 128/4/512
  capacity (``growdense.optim.AdamW``) against ``PlainGPT`` of 64/2/256
  (``torch.optim.AdamW``). Goal: at most 1.25x.
- **step, full capacity**: the same at 128/4/512, capacity 128/4/512. Goal: at most 1.05x.
- **growth event**: every width of the model grown at once, 64/2/256 -> 128/4/512
  (``GPT.grow(64, 2, 256, init="zero_out", optimizer_state="keep_global_step")`` through
  the model's :class:`~growdense.Wiring`, built once beforehand: in place, the Parameters
  and the optimizer stay, AdamW's moments of the new slices are set fresh, the norms start
  their ramp) against rebuilding (MSG's way,
  :func:`growdense.models.gpt.rebuild_grown`: a new ``PlainGPT`` of the new size, the
  weights copied, the new slices written, a new AdamW whose moments are the old ones
  zero-padded). Each event runs on a fresh copy (made outside the timing) of a model that
  has taken two AdamW steps. Goal: at most 1/3. Diagnostic sides: the same growth through
  the modules' own grow methods; the floor (the new rows' He values drawn by torch's
  ``normal_`` into contiguous tensors); the same draws as the growth's, by torch, into
  blocks laid out as its (a block that is not contiguous is drawn in contiguous chunks and
  copied in, ``protocol.draw_normal_``: the least torch's ``normal_`` costs for these
  values; growdense's own kernel draws the same values faster, see bench_normal.py); and,
  on the CPU, every side's time
  in the calling thread's CPU time (``time.thread_time``), which what other jobs on a
  loaded machine take does not inflate.
- **allocations of a growth**: the bytes the event allocates on the CPU, from
  ``torch.profiler`` (``profile_memory=True``: every allocation of the CPU allocator, the
  sum and the largest), from ``common.NewBytes`` (new tensors returned by ops), and
  whether every Parameter and optimizer-state tensor keeps its ``data_ptr``. Goal:
  nothing of the model's size (the sum under 1% of the bytes of the model's Parameters).
- **function preserved**: the largest absolute change of the logits over a batch when
  every width grows with ``init="zero_out"`` (after a few training steps), float32 and
  float64. Goal: 1e-6 and 1e-12.

    python benchmarks/bench_transformer.py                 # 1 thread (see --threads)
    python benchmarks/bench_transformer.py --threads 2
    python benchmarks/bench_transformer.py --quick         # tiny sizes: a smoke run
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import growdense  # noqa: E402
from growdense import protocol  # noqa: E402
from growdense.models.gpt import GPT, PlainGPT, plain_from_grow, rebuild_grown  # noqa: E402

GOAL_HALF = 1.25
GOAL_FULL = 1.05
GOAL_GROWTH = 1 / 3
# A growth allocates nothing of the model's size: only the transient chunks through which a
# non-contiguous block's random values are drawn (protocol.DRAW_CHUNK float32 values).
STAGING_BYTES = protocol.DRAW_CHUNK * 4
GOAL_F32 = 1e-6
GOAL_F64 = 1e-12


def sizes(quick: bool, width_scale: int = 1) -> dict:
    """The example model's sizes; ``width_scale`` multiplies its model and FFN widths (the heads' size with them)."""
    if quick:
        s = dict(vocab=32, block=16, batch=4, layers=1, d=16, heads=2, ff=32, D=32, H=4, FF=64)
    else:
        s = dict(vocab=96, block=64, batch=16, layers=2, d=64, heads=2, ff=256, D=128, H=4, FF=512)
    for key in ("d", "ff", "D", "FF"):
        s[key] *= width_scale
    return s


def make_gpt(s: dict, half: bool, device: str, dtype=torch.float32, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    w = (s["d"], s["heads"], s["ff"]) if half else (s["D"], s["H"], s["FF"])
    return GPT(s["vocab"], s["block"], s["layers"], *w, capacity_d_model=s["D"], capacity_heads=s["H"],
               capacity_d_ff=s["FF"], device=device, dtype=dtype)


def loss_of(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def stepper(model, optimizer, x, y):
    def step():
        loss = loss_of(model, x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def batch(s: dict, device: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, s["vocab"], (s["batch"], s["block"]), generator=g).to(device)
    y = torch.randint(0, s["vocab"], (s["batch"], s["block"]), generator=g).to(device)
    return x, y


HYPER = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01)


def step_pair(s: dict, half: bool, device: str) -> dict:
    model = make_gpt(s, half, device)
    plain = plain_from_grow(model)
    x, y = batch(s, device)
    return {
        "growdense": stepper(model, growdense.optim.AdamW(model.parameters(), **HYPER), x, y),
        "plain PyTorch": stepper(plain, torch.optim.AdamW(plain.parameters(), **HYPER), x, y),
    }


def trained_pair(s: dict, device: str):
    """The half-width GPT and its PlainGPT copy, each after two AdamW steps (state allocated)."""
    model = make_gpt(s, True, device)
    plain = plain_from_grow(model)
    opt = growdense.optim.AdamW(model.parameters(), **HYPER)
    popt = torch.optim.AdamW(plain.parameters(), **HYPER)
    x, y = batch(s, device)
    for _ in range(2):
        stepper(model, opt, x, y)()
        stepper(plain, popt, x, y)()
    return (model, opt), (plain, popt)


def growth_amounts(s: dict) -> tuple[int, int, int]:
    return s["D"] - s["d"], s["H"] - s["heads"], s["FF"] - s["ff"]


def grow_in_place(pair, amounts, generator) -> None:
    model, _, wiring = pair
    model.grow(*amounts, init="zero_out", generator=generator, wiring=wiring, optimizer_state="keep_global_step")


@torch.no_grad()
def grow_modules_directly(pair, amounts, generator) -> None:
    """The same growth through each module's own grow methods: no Wiring, no optimizer-state edit.

    A diagnostic side: the optimizer state of the new slices is zero already (the
    invariant), so this is what the event costs without the Wiring's planning and its
    rewrite of that state.
    """
    model = pair[0]
    d, h, f = amounts
    for emb in (model.tok_emb, model.pos_emb):
        emb.grow(d, "zero_out")
    for norm in model.norms():
        norm.grow(d, "zero_out", ramp_steps=100)
    for b in model.blocks:
        b.attn.grow_embed_dim(d, "zero_out", generator=generator)
        b.fc1.grow_in(d, "zero")
        b.fc2.grow_out(d, "he", generator=generator)
    model.head.grow_in(d, "zero")
    for b in model.blocks:
        b.attn.grow_heads(h, "zero_out", generator=generator)
        b.fc1.grow_out(f, "he", generator=generator)
        b.fc2.grow_in(f, "zero")


def floor_side(s: dict, device: str, generator):
    """What any growth must do: draw the He values of the new rows that ``zero_out`` draws
    (q/k/v rows of the new heads, ``out_proj`` and ``fc2`` rows of the new residual
    features, ``fc1`` rows of the new FFN neurons), into tensors that already exist."""
    d0, D, F0, FF, hd = s["d"], s["D"], s["ff"], s["FF"], s["D"] // s["H"]
    i0, inner = s["heads"] * hd, s["H"] * hd
    shapes = [((3, inner - i0, D), D), ((D - d0, i0), i0), ((FF - F0, D), D), ((D - d0, F0), F0)] * s["layers"]
    buffers = [(torch.zeros(shape, device=device), (2.0 / fan_in) ** 0.5) for shape, fan_in in shapes]

    def floor(_pair) -> None:
        for buf, std in buffers:
            buf.normal_(0.0, std, generator=generator)
    return floor


def same_draws_side(s: dict, device: str, generator):
    """The draws the growth itself makes, into blocks laid out as the growth's: the same
    values (N(0, std^2) through ``protocol.draw_normal_``) into strided views of
    capacity-sized tensors. A block that is not contiguous (``out_proj`` and ``fc2`` rows of
    the new residual features span only the active heads / FFN neurons of a wider row) is
    drawn in contiguous chunks and copied in: the least a growth with these random values
    costs."""
    d0, D, F0, FF, hd = s["d"], s["D"], s["ff"], s["FF"], s["D"] // s["H"]
    i0, inner = s["heads"] * hd, s["H"] * hd
    views = []
    for _ in range(s["layers"]):
        qkv = torch.zeros(3 * inner, D, device=device)  # q/k/v rows of the new heads, one block each
        views += [(qkv[b * inner + i0:(b + 1) * inner], (2.0 / D) ** 0.5) for b in range(3)]
        views.append((torch.zeros(D, inner, device=device)[d0:, :i0], (2.0 / i0) ** 0.5))  # out_proj rows
        views.append((torch.zeros(FF, D, device=device)[F0:, :], (2.0 / D) ** 0.5))  # fc1 rows
        views.append((torch.zeros(D, FF, device=device)[d0:, :F0], (2.0 / F0) ** 0.5))  # fc2 rows

    def draws(_pair) -> None:
        for view, std in views:
            protocol.draw_normal_(view, std, generator)
    return draws


def with_wiring(pair):
    """``(model, optimizer, the model's Wiring over the optimizer)``: built once, as a user does."""
    model, opt = pair
    return model, opt, model.wiring(opt)


def grow_by_rebuilding(pair, amounts, generator):
    model, opt = pair
    return rebuild_grown(model, opt, *amounts, generator=generator)


def time_growth(
    s: dict, device: str, warmup: int, reps: int, max_seconds: float
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Interleaved timings of one growth event of every width, each on a fresh deep copy.

    Returns the wall-clock samples and, on the CPU, the calling thread's CPU time of the
    same events (``time.thread_time``: what the event computes, without the time other
    jobs on a loaded machine take from it; one torch thread, see ``--threads``)."""
    (gm, gopt), (pm, popt) = trained_pair(s, device)
    amounts = growth_amounts(s)
    generator = torch.Generator(device=device).manual_seed(0)
    sides = {
        "growdense": lambda pair: grow_in_place(pair, amounts, generator),
        "rebuild": lambda pair: grow_by_rebuilding(pair, amounts, generator),
        "modules' own grow methods": lambda pair: grow_modules_directly(pair, amounts, generator),
        "floor": floor_side(s, device, generator),
        "same draws": same_draws_side(s, device, generator),
    }
    templates = {"growdense": (gm, gopt), "rebuild": (pm, popt), "modules' own grow methods": (gm, gopt)}
    samples: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    started = time.perf_counter()
    for r in range(warmup + reps):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            pair = copy.deepcopy(templates[name]) if name in templates else None
            if name == "growdense":
                pair = with_wiring(pair)
            common.sync(device)
            t0, c0 = time.perf_counter(), time.thread_time()
            kept = sides[name](pair)
            common.sync(device)
            t1, c1 = time.perf_counter(), time.thread_time()
            if r >= warmup:
                samples[name].append(t1 - t0)
                cpu[name].append(c1 - c0)
            del kept, pair
        if r >= warmup + 4 and time.perf_counter() - started > max_seconds:
            break
    return samples, cpu


def tensors_of(pair) -> dict[str, torch.Tensor]:
    model, opt = pair[:2]
    out = {}
    for name, p in model.named_parameters():
        out[name] = p
        for key, value in opt.state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                out[f"{name}:{key}"] = value
    return out


def profiled_bytes(fn) -> dict:
    """Bytes the CPU allocator hands out while ``fn`` runs (torch.profiler, profile_memory=True).

    Each op's self memory (what it allocated less what it freed) counts where positive:
    the sum over ops and the largest. The profiler's own log lines are kept off stderr.
    """
    import os

    from torch.profiler import ProfilerActivity, profile

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    sizes = [max(0, getattr(e, "self_cpu_memory_usage", 0) or 0) for e in prof.events()]
    return {"allocated_bytes": sum(sizes), "largest_allocation": max(sizes, default=0)}


def growth_allocations(s: dict, device: str) -> dict:
    (gm, gopt), (pm, popt) = trained_pair(s, device)
    amounts = growth_amounts(s)
    generator = torch.Generator(device=device).manual_seed(0)
    model_bytes = sum(p.numel() * p.element_size() for p in gm.parameters())
    out = {"model_parameter_bytes": model_bytes}
    for name, template, fn in (
        ("growdense", (gm, gopt), lambda pair: grow_in_place(pair, amounts, generator)),
        ("rebuild", (pm, popt), lambda pair: grow_by_rebuilding(pair, amounts, generator)),
    ):
        grow_in_place(with_wiring(copy.deepcopy((gm, gopt))), amounts, generator)  # warm-up
        grow_by_rebuilding(copy.deepcopy((pm, popt)), amounts, generator)
        pair = copy.deepcopy(template)
        if name == "growdense":
            pair = with_wiring(pair)
        before = {k: t.data_ptr() for k, t in tensors_of(pair).items()}
        kept = {}
        prof = profiled_bytes(lambda: kept.setdefault("r", fn(pair)))
        pair2 = copy.deepcopy(template)
        if name == "growdense":
            pair2 = with_wiring(pair2)
        with common.NewBytes(device) as nb:
            fn(pair2)
        result = kept["r"] if kept["r"] is not None else pair
        after = tensors_of(result)
        same = sum(1 for k, t in after.items() if before.get(k) == t.data_ptr())
        out[name] = dict(prof, new_tensor_bytes=nb.bytes, tensors=len(before), same_storage=same)
    return out


def function_check(s: dict, device: str) -> dict:
    out = {}
    for dtype in (torch.float32, torch.float64):
        model = make_gpt(s, True, device, dtype=dtype)
        opt = growdense.optim.AdamW(model.parameters(), **HYPER)
        x, y = batch(s, device)
        for _ in range(3):
            stepper(model, opt, x, y)()
        with torch.no_grad():
            before = model(x)
            model.grow(*growth_amounts(s), init="zero_out", generator=torch.Generator(device=device).manual_seed(3))
            after = model(x)
        out[str(dtype).replace("torch.", "")] = {
            "max_abs_change": (after - before).abs().max().item(),
            "max_abs_logit": before.abs().max().item(),
            "widths_after": model.widths(),
        }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--max-seconds", type=float, default=60.0, help="per comparison")
    parser.add_argument("--width-scale", type=int, default=1,
                        help="multiply the model's widths (d_model, d_ff; the heads' size with them) by this; "
                             "the goals are set for 1")
    parser.add_argument("--growth-only", action="store_true", help="time the growth event only (no training steps)")
    args = parser.parse_args(argv)
    if args.width_scale < 1:
        parser.error(f"--width-scale must be >= 1, got {args.width_scale}")
    info = common.setup(args.threads, args.device)
    s = sizes(args.quick, args.width_scale)
    reps = 5 if args.quick else args.reps
    warmup = 1 if args.quick else 3
    device = args.device

    results = {}
    for label, half in () if args.growth_only else (("half", True), ("full", False)):
        samples = common.time_interleaved(step_pair(s, half, device), device=device, warmup=warmup, reps=reps,
                                          max_seconds=args.max_seconds)
        results[f"step_{label}"] = {**common.summarize(samples),
                                    "ratio": common.paired_ratio(samples["growdense"], samples["plain PyTorch"])}
        print(f"  step at {label} capacity: done", flush=True)
    samples, cpu = time_growth(s, device, warmup, reps, args.max_seconds)

    def ratios(xs: dict[str, list[float]]) -> dict[str, float]:
        return {"ratio": common.paired_ratio(xs["growdense"], xs["rebuild"]),
                "ratio_modules_directly": common.paired_ratio(xs["modules' own grow methods"], xs["rebuild"]),
                "ratio_floor": common.paired_ratio(xs["floor"], xs["rebuild"]),
                "ratio_same_draws": common.paired_ratio(xs["same draws"], xs["rebuild"])}

    results["growth"] = {**common.summarize(samples), **ratios(samples)}
    if device == "cpu":  # the thread's CPU time of the same events (a GPU's work is not in it)
        results["growth_cpu_time"] = {**common.summarize(cpu), **ratios(cpu)}
    print("  growth event: done", flush=True)
    alloc = growth_allocations(s, device) if device == "cpu" else None
    check = function_check(s, device)
    common.finish(info)

    half_w = f"{s['d']}/{s['heads']}h/{s['ff']}"
    full_w = f"{s['D']}/{s['H']}h/{s['FF']}"
    rows, verdicts = [], []

    def row(what, a, b, ratio, goal, met):
        rows.append([what, a, b, ratio, goal, "yes" if met else "no"])
        verdicts.append({"measure": what, "goal": goal, "met": met})

    for label, w, goal in () if args.growth_only else (("half", half_w, GOAL_HALF), ("full", full_w, GOAL_FULL)):
        r = results[f"step_{label}"]
        row(f"training step at {w} (capacity {full_w})", common.fmt_time(r["growdense"]["median_s"]),
            common.fmt_time(r["plain PyTorch"]["median_s"]) + f" (PlainGPT {w})", f"{r['ratio']:.3f}",
            f"<= {goal}", r["ratio"] <= goal)
    g = results["growth"]
    row(f"growth event {half_w} -> {full_w}", common.fmt_time(g["growdense"]["median_s"]),
        common.fmt_time(g["rebuild"]["median_s"]) + " (rebuild)", f"{g['ratio']:.3f}", "<= 1/3",
        g["ratio"] <= GOAL_GROWTH)
    rows.append([f"(diagnostic) the same growth through the modules' own grow methods, no Wiring",
                 common.fmt_time(g["modules' own grow methods"]["median_s"]), "(rebuild, as above)",
                 f"{g['ratio_modules_directly']:.3f}", "-", "-"])
    rows.append([f"(diagnostic) torch drawing the new rows' He values into existing contiguous tensors",
                 common.fmt_time(g["floor"]["median_s"]), "(rebuild, as above)", f"{g['ratio_floor']:.3f}", "-", "-"])
    rows.append([f"(diagnostic) torch's same draws into blocks laid out as the growth's (non-contiguous blocks "
                 f"staged in contiguous chunks)", common.fmt_time(g["same draws"]["median_s"]),
                 "(rebuild, as above)", f"{g['ratio_same_draws']:.3f}", "-", "-"])
    if "growth_cpu_time" in results:
        c = results["growth_cpu_time"]
        rows.append([f"(diagnostic) the growth event in the thread's CPU time (without what other jobs take; "
                     f"the same draws: {c['ratio_same_draws']:.3f} of rebuilding)",
                     common.fmt_time(c["growdense"]["median_s"]),
                     common.fmt_time(c["rebuild"]["median_s"]) + " (rebuild)", f"{c['ratio']:.3f}", "-", "-"])
    if alloc is not None:
        mb = alloc["model_parameter_bytes"]
        a, b = alloc["growdense"], alloc["rebuild"]
        row("bytes allocated by the growth (profiler: sum / largest)",
            f"{common.fmt_bytes(a['allocated_bytes'])} / {common.fmt_bytes(a['largest_allocation'])}; "
            f"{a['same_storage']}/{a['tensors']} tensors keep their data_ptr",
            f"{common.fmt_bytes(b['allocated_bytes'])} / {common.fmt_bytes(b['largest_allocation'])}; "
            f"{b['same_storage']}/{b['tensors']} keep theirs",
            f"largest {a['largest_allocation'] / mb:.4f} of the model's {common.fmt_bytes(mb)}",
            f"nothing of the model's size: each allocation at most a draw's staging chunk "
            f"({common.fmt_bytes(STAGING_BYTES)})",
            a["largest_allocation"] <= STAGING_BYTES and a["same_storage"] == a["tensors"])
    for dtype, goal in (("float32", GOAL_F32), ("float64", GOAL_F64)):
        c = check[dtype]
        row(f"zero_out growth of every width, max abs logit change ({dtype})", f"{c['max_abs_change']:.2e}",
            f"(logits up to {c['max_abs_logit']:.2f})", "-", f"<= {goal:g}", c["max_abs_change"] <= goal)

    header = ["measure", "growdense", "baseline", "ratio", "goal", "met"]
    notes = [
        f"Model: GPT, {s['layers']} blocks, vocabulary {s['vocab']}, batch {s['batch']} x {s['block']} tokens, "
        f"capacity {full_w}; AdamW (growdense.optim.AdamW / torch.optim.AdamW). Medians of "
        f"{len(g['growdense'] and samples['growdense'])} interleaved growth events; ratios are medians of per-round "
        f"ratios.",
    ]
    common.report("bench_transformer", args, info, header, rows, notes,
                  {"sizes": s, "results": results, "allocations": alloc, "function_check": check,
                   "verdicts": verdicts})
    return 0


if __name__ == "__main__":
    sys.exit(main())
