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


def _safe_console_streams() -> None:
    """Printing must never be what fails a run.

    - A path or flag with bytes that are not UTF-8 reaches Python as surrogate escapes
      (`\\udcff`); a strict UTF-8 stdout would raise printing it back, e.g. in
      `--check-data --json`: `surrogateescape` writes the original bytes instead.
    - A console that is not UTF-8 (`PYTHONIOENCODING=ascii`, an old locale) cannot print
      Japanese text or rich's box lines: those fall back to `\\u....` escapes."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) not in ("strict", None) or not hasattr(stream, "reconfigure"):
            continue
        utf8 = (getattr(stream, "encoding", "") or "").lower().replace("-", "") in ("utf8", "utf8sig")
        try:
            stream.reconfigure(errors="surrogateescape" if utf8 else "backslashreplace")
        except (ValueError, OSError):  # a detached or closed stream: leave it as it is
            pass


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> NoReturn:
    """Run `main`; an `AutotuneError` becomes one line on stderr and exit code 2."""
    _safe_console_streams()
    try:
        code = main(argv)
    except AutotuneError as exc:
        sys.stderr.write("error: " + "\n".join(exc.lines()) + "\n")
        code = exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        code = 130
    sys.exit(code)
