"""What every command line shares: one-line errors with exit code 2, no traceback."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from autotune.errors import AutotuneError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (exit 2), with a pointer to `--help`."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="load a whole config (sections model, data, training, lora, autotune, samples); "
                             "overrides the GPU profile")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override one dotted key, e.g. `--set lora.r=16` or `--set training.learning_rate=5e-5`; "
                             "repeatable; wins over `--config`")


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> NoReturn:
    """Run `main`; an `AutotuneError` becomes one line on stderr and exit code 2."""
    try:
        code = main(argv)
    except AutotuneError as exc:
        sys.stderr.write(f"error: {exc.one_line()}\n")
        code = exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        code = 130
    sys.exit(code)
