"""The `fmzoo` command line: one sub-command per module in fmzoo/ (cli_*.py).

Each command module exposes HELP, add_arguments(parser) and run(args) -> int; heavy imports
happen inside run() so that `fmzoo --help` stays instant (no jax). A user error (a bad
value, a missing or corrupt file) ends the command with one line, "error: ...", and exit
status 2; FMZOO_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "run": "fmzoo.cli_run",
    "models": "fmzoo.cli_models",
    "forward": "fmzoo.cli_models",
    "generate": "fmzoo.cli_generate",
    "chat": "fmzoo.cli_chat",
    "train": "fmzoo.cli_train",
    "sft": "fmzoo.cli_sft",
    "reward": "fmzoo.cli_reward",
    "dpo": "fmzoo.cli_dpo",
    "ppo": "fmzoo.cli_ppo",
    "label": "fmzoo.cli_label",
    "grpo": "fmzoo.cli_grpo",
    "eval": "fmzoo.cli_eval",
    "export": "fmzoo.cli_export",
}


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks; appends an option's default once, and only when it
    says something (not None / False, not already in the help text)."""

    def _get_help_string(self, action):
        text = action.help or ""
        quiet = action.default is None or action.default is False or \
            action.default == argparse.SUPPRESS
        if "default" not in text and not quiet and action.option_strings and action.nargs != 0:
            text += " (default: %(default)s)"
        return text


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
    except (ValueError, OSError) as e:  # ConfigError, CheckpointError, ... are ValueErrors
        if os.environ.get("FMZOO_DEBUG"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
