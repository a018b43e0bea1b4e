"""Command line: `python -m lems_core <command> ...` (run with -h for each command).

One module per command, its options next to its code: each has NAME, HELP (its line in
`-h`), ``add_parser(subparsers)`` and ``run(args) -> int``. Options shared by several
commands live in ``common``, the bounded argparse types in ``types``. Command modules
import torch, transformers and the pipeline only inside their functions, and ``main``
builds the options of the named command alone, so `-h` and `--version` stay fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Collection

from .. import __version__
from .common import run_reporting_errors

PROG = "python -m lems_core"
DESCRIPTION = "SVD compression and rank allocation for causal LMs"
COMMAND_MODULES = ("layers", "ppl", "profile", "allocate", "evaluate", "evaluate_plans", "compress", "heal",
                   "ars")  # -h order


def command_modules() -> list:
    """The command modules, in the order `-h` lists them."""
    return [importlib.import_module(f"{__name__}.{name}") for name in COMMAND_MODULES]


def build_parser(full: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The CLI's parser. ``full`` names the commands that get all their options (default: every
    command); the others get only their name and help line, enough for `-h` and to reject a typo."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"lems {__version__}",
                        help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in command_modules():
        if full is None or module.NAME in full:
            module.add_parser(subparsers)
        else:
            subparsers.add_parser(module.NAME, help=module.HELP)
    return parser


def _named_command(argv: list[str]) -> set[str]:
    """The command ``argv`` names: its first word that is not an option (the top level takes no values)."""
    first_word = next((word for word in argv if not word.startswith("-")), None)
    return {first_word} if first_word else set()


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments) and run its command; the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(full=_named_command(argv)).parse_args(argv)
    return run_reporting_errors(args.fn, args)
