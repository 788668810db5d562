"""What the command-line entry points share: argument parsing and errors without tracebacks."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from semckd_ray.errors import UserError


def config_arguments(parser: argparse.ArgumentParser, *, config_required: bool) -> None:
    parser.add_argument("--config", required=config_required, help="experiment YAML file (tune_configs/...)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value by its dotted key, e.g. --set optim.epochs=5 (repeatable)",
    )


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run ``main``; a ``UserError`` becomes one clear message on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
