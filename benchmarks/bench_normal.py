"""He draws of new weights on the CPU: growdense::normal_block_ against torch's normal_, the same values.

Both sides fill the same block of a float32 capacity buffer with N(0, std^2) from the same
generator state and give the same values bit for bit (checked here every run, and in
tests/test_normal_draws.py): torch through ``growdense.protocol.draw_normal_`` (its
``normal_`` of the block, in contiguous chunks where the block is not contiguous: how a
growth drew them before, and how the transformer benchmark's rebuild draws them),
growdense through ``growdense.ops.normal_block_``, whose own kernel makes the generator's
numbers in bulk where it gives torch's values (``growdense.ops.cpu_normal_draws()`` says
which kernel draws). Blocks are the new rows of growth events: whole rows (contiguous) and
part of each row (chunks copied in). Calls are interleaved; each figure is a median.

    python benchmarks/bench_normal.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from growdense import ops, protocol  # noqa: E402

BLOCKS = [  # (capacity shape, rows, cols): what a growth event draws
    ((512, 128), (256, 512), (0, 128)),  # the example GPT's new FFN rows (whole rows)
    ((128, 512), (64, 128), (0, 256)),  # its fc2 rows over the active FFN width (part of each row)
    ((1024, 1024), (512, 1024), (0, 1024)),  # a 1024x1024 layer from 512 to 1024 outputs
    ((4096, 4096), (2048, 4096), (0, 4096)),  # a 4096x4096 layer from 2048 to 4096 outputs
    ((4096, 4096), (2048, 4096), (0, 2048)),  # new rows over half the inputs
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)
    if args.device != "cpu":
        raise SystemExit("bench_normal.py measures the CPU kernel; use --device cpu")
    info = common.setup(args.threads, "cpu")
    blocks = BLOCKS[:2] if args.quick else BLOCKS
    reps = 5 if args.quick else args.reps
    rows_out, results = [], []
    for shape, rows, cols in blocks:
        ours, theirs = torch.zeros(shape), torch.zeros(shape)
        g_ours, g_theirs = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        std = (2.0 / (cols[1] - cols[0])) ** 0.5
        view = theirs[rows[0]:rows[1], cols[0]:cols[1]]
        fns = {
            "growdense": lambda: ops.normal_block_(ours, rows, cols, std, g_ours),
            "torch": lambda: protocol.draw_normal_(view, std, g_theirs),
        }
        samples = common.time_interleaved(fns, warmup=2, reps=reps, max_seconds=20)
        same = torch.equal(ours, theirs) and torch.equal(g_ours.get_state(), g_theirs.get_state())
        n = (rows[1] - rows[0]) * (cols[1] - cols[0])
        g, t = common.median(samples["growdense"]), common.median(samples["torch"])
        speedup = common.paired_ratio(samples["torch"], samples["growdense"])
        block = f"{shape[0]}x{shape[1]}[{rows[0]}:{rows[1]}, {cols[0]}:{cols[1]}]"
        rows_out.append([block, f"{n:,}", common.fmt_time(g), common.fmt_time(t), f"{speedup:.2f}x",
                         "yes" if same else "**no**"])
        results.append({"block": block, "values": n, "growdense_s": g, "torch_s": t, "speedup": speedup,
                        "same_values_and_generator_state": same, "samples": samples})
    common.finish(info)
    notes = [f"growdense's draws: {ops.cpu_normal_draws()} (growdense.ops.cpu_normal_draws()); "
             f"speedup: the median over rounds of torch's time over growdense's, interleaved."]
    common.report("bench_normal", args, info,
                  ["block (capacity[rows, cols])", "values", "growdense", "torch", "speedup", "same values"],
                  rows_out, notes, {"draws": ops.cpu_normal_draws(), "results": results})
    return 0 if all(r["same_values_and_generator_state"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
