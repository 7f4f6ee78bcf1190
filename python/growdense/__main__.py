"""The ``growdense`` command."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="growdense", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print what this build of growdense contains")
    from .experiments.cli import DESCRIPTION, add_arguments

    rep = sub.add_parser(
        "reproduce",
        help="reproduce the growing-VAE study on MNIST (Fixed, Approach 1, Approach 2) and write "
        "metrics, figures and tables",
        description=DESCRIPTION + " Needs the 'experiments' extra (torchvision, matplotlib, tqdm).",
    )
    add_arguments(rep)
    args = parser.parse_args(argv)
    if args.command == "info":
        import growdense
        from growdense import ops

        info = growdense.build_info()
        # The CPU kernels in use (GROWDENSE_CPU_CAPABILITY forces one of the available).
        info["cpu_kernels"] = ops.cpu_capability()
        info["cpu_kernels_available"] = ops.cpu_capabilities()
        info["cpu_kernels_compiled"] = ops.cpu_capabilities(compiled=True)
        # Who draws the He values of new weights on the CPU (growdense's kernel gives torch's values).
        info["cpu_normal_draws"] = ops.cpu_normal_draws()
        print(json.dumps(info, indent=2))
    elif args.command == "reproduce":
        from .experiments.cli import run_from_args

        raw = list(sys.argv[1:] if argv is None else argv)
        return run_from_args(args, raw[raw.index("reproduce") + 1 :] if "reproduce" in raw else raw, parser=rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
