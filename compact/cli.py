"""The `compact` command line: one subcommand per job; usage errors exit 2 with one line, no traceback."""
from __future__ import annotations

import argparse
import sys

from . import __version__


class UsageError(Exception):
    """A mistake in what the user asked for: reported as one line, exit status 2."""


def _cmd_check(args) -> int:
    import torch

    from .kernel_check import format_table, run_kernel_check

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    rows = run_kernel_check(dtypes[args.dtype], args.device)
    print(format_table(rows))
    return 0 if all(r.ok for r in rows) else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compact", description=__doc__)
    p.add_argument("--version", action="version", version=f"compact {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("check", help="run every kernel against its plain-torch reference and print a table")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    c.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    c.set_defaults(func=_cmd_check)
    d = sub.add_parser("demo", help="the main job on an embedded default")
    d.set_defaults(func=_cmd_check, dtype="bfloat16", device=None)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, FileNotFoundError, ValueError) as e:
        if args.debug:
            raise
        print(f"compact {args.command}: error: {e}", file=sys.stderr)
        return 2
