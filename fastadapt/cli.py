"""Command line: ``python -m fastadapt {demo,recsys,bench} [options]``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them up.
"""

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("fastadapt.demo", "the seed comparison: AdaGrad, RMSprop and Adam on linear regression"),
    "recsys": ("fastadapt.recsys", "train matrix factorisation on a sparse interaction matrix"),
    "bench": ("fastadapt.benchmark", "quick GB/s table against the streaming ceiling (and torch)"),
}


def main(argv=None):
    """Entry point of ``python -m fastadapt`` and the ``fastadapt`` script."""
    parser = argparse.ArgumentParser(prog="python -m fastadapt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:          # a subcommand whose module is not there (partial checkout)
            continue
        modules[name] = module
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
