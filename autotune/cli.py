"""What every command line shares: one-line errors with exit code 2, no traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, NoReturn

from autotune.errors import AutotuneError

# bitsandbytes logs a hint about an optional CPU kernel package at import time, on
# GPU machines too; it is noise for our users and would break one-line errors.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (exit 2), with a pointer to `--help`."""

    def error(self, message: str) -> NoReturn:
        # One line even when the message echoes an argument holding a newline.
        message = " ".join(message.split())
        sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="load a whole config (sections model, data, training, lora, autotune, samples); "
                             "overrides the GPU profile")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override one dotted key, e.g. `--set lora.r=16` or `--set training.learning_rate=5e-5`; "
                             "repeatable; wins over `--config`")


def _print_raw_bytes_back() -> None:
    """A path or flag with bytes that are not UTF-8 reaches Python as surrogate escapes
    (`\\udcff`); with a strict stdout (PYTHONIOENCODING=utf-8, or an en_US.UTF-8 locale)
    printing it back, e.g. in `--check-data --json`, crashed with UnicodeEncodeError.
    `surrogateescape` writes the original bytes instead, as the C.UTF-8 locale does."""
    stream = sys.stdout
    if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
        try:
            stream.reconfigure(errors="surrogateescape")
        except (ValueError, OSError):  # a detached or closed stream: leave it as it is
            pass


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> NoReturn:
    """Run `main`; an `AutotuneError` becomes one line on stderr and exit code 2."""
    _print_raw_bytes_back()
    try:
        code = main(argv)
    except AutotuneError as exc:
        sys.stderr.write("error: " + "\n".join(exc.lines()) + "\n")
        code = exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        code = 130
    sys.exit(code)
