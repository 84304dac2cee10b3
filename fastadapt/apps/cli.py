"""Command line: ``fastadapt {demo,recsys,bench} [options]`` (the same as ``python -m fastadapt``).

Each subcommand lives in its own module of :mod:`fastadapt.apps` exposing
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them up.  A ``run``
reports a user error (a missing file, a bad number) by raising :class:`UsageError`: the command
line then prints one line, ``fastadapt <command>: error: <message>``, on stderr and exits with
status 2, without a traceback.
"""

import argparse
import importlib
import sys
from types import ModuleType
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

PROG = "fastadapt"

DESCRIPTION = ("fastadapt's applications: the seed comparison of AdaGrad, RMSprop and Adam, a "
               "recommender trained with sparse steps, and a quick bandwidth benchmark.")

EPILOG = "Run 'fastadapt COMMAND --help' for the options of a command, with their defaults."

#: subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("fastadapt.apps.demo", "the seed comparison: AdaGrad, RMSprop and Adam on linear regression"),
    "recsys": ("fastadapt.apps.recsys", "train matrix factorisation (BPR, or a bag model) on a sparse "
                                        "interaction matrix, sparse steps against dense ones"),
    "bench": ("fastadapt.apps.benchmark", "quick GB/s table against the streaming ceiling (and torch.optim)"),
}


class UsageError(Exception):
    """A user error in a subcommand's options or input: reported as one line, exit status 2."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _float(text: str, ok: Callable[[float], bool], what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _float(text, lambda v: 0 < v < float("inf"), "a positive number")


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _float(text, lambda v: 0 <= v < float("inf"), "a number >= 0")


class HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default after its help text (``(default: 50)``), except where there
    is none to show (flags, options defaulting to None) or the help text already names it."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is False
                or default is argparse.SUPPRESS or "default" in text):
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        return f"{text} (default: {str(default).replace('%', '%%')})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but an error is one line on stderr (``fastadapt recsys: error: argument
    --users: ...``, pointing to ``--help``) instead of the usage block followed by the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> Tuple[argparse.ArgumentParser, Dict[str, ModuleType]]:
    """The ``fastadapt`` argument parser, with the subcommands whose modules import."""
    import fastadapt as fa

    parser = ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {fa.__version__}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    modules: Dict[str, ModuleType] = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:     # a subcommand whose module is not there (partial checkout)
            if exc.name != module_name:
                raise
            continue
        modules[name] = module
        p = sub.add_parser(name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".",
                           formatter_class=HelpFormatter)
        module.add_arguments(p)
    return parser, modules


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m fastadapt`` and the ``fastadapt`` script; returns the exit status."""
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(modules[args.command].run(args) or 0)
    except UsageError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
