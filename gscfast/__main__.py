"""The ``gscfast`` command: one subcommand per study (``gscfast gaussian --help``).

Also ``python -m gscfast``. Each study module in ``gscfast.experiments.STUDIES`` supplies
``HELP``, ``add_arguments(parser)`` and ``main(args) -> exit status``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .experiments import STUDIES

    parser = argparse.ArgumentParser(
        prog="gscfast", description="Studies of exploding and vanishing gradients with gscfast."
    )
    parser.add_argument("--version", action="version", version=f"gscfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in STUDIES.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    from .experiments import EngineError, ResultsDirError, UsageError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._main(args) or 0)
    except (ResultsDirError, EngineError, UsageError) as e:
        print(f"gscfast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
