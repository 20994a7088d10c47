"""Command-line entry point: `optimas-fast demo | bench | ...`."""
from __future__ import annotations

import argparse
import logging
import sys

from optimas_fast import demo


def _cmd_demo(args: argparse.Namespace) -> int:
    return demo.main()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optimas-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="offline demo on this machine (no GPU, no network needed)")
    p.set_defaults(func=_cmd_demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
