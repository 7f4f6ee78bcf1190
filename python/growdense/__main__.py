"""The ``growdense`` command."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="growdense", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print what this build of growdense contains")
    args = parser.parse_args(argv)
    if args.command == "info":
        import growdense

        print(json.dumps(growdense.build_info(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
