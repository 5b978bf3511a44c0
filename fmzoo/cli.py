"""The `fmzoo` command line: one sub-command per module in fmzoo/ (cli_*.py).

Each command module exposes HELP, add_arguments(parser) and run(args) -> int; heavy imports
happen inside run() so that `fmzoo --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "models": "fmzoo.cli_models",
    "forward": "fmzoo.cli_models",
    "generate": "fmzoo.cli_generate",
    "train": "fmzoo.cli_train",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmzoo", description="A JAX/Flax model zoo: RNN seq2seq to post-trained transformer LMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in COMMANDS.items():
        mod = importlib.import_module(modname)
        p = sub.add_parser(name, help=mod.HELP[name] if isinstance(mod.HELP, dict) else mod.HELP,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add = getattr(mod, f"add_{name}_arguments", None) or mod.add_arguments
        add(p)
        p.set_defaults(_run=getattr(mod, f"run_{name}", None) or mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
