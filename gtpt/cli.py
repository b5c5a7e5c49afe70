"""The ``gtpt`` command line."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .config import list_variants


def _cmd_summary(args) -> int:
    from .summary import summary

    for i, name in enumerate(args.variants or list_variants()):
        if i:
            print()
        print(summary(name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gtpt", description="GTPT pose estimation on fused Triton kernels")
    sub = p.add_subparsers(dest="command", metavar="command")
    s = sub.add_parser("summary", help="parameters per stage and token schedule of GTPT variants")
    s.add_argument("variants", nargs="*", help=f"variants (default: all): {', '.join(list_variants())}")
    s.set_defaults(func=_cmd_summary)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except ValueError as e:  # bad variant names and the like: one clear line, no traceback
        print(f"gtpt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
