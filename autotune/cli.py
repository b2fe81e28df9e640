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
    """Run `main` under the process's one signal policy (`signals.RunSignals`): an `AutotuneError`
    becomes one line on stderr and exit code 2; SIGINT, SIGTERM and SIGHUP at any moment end in
    130, 143 or 129 with one line, never a traceback; a closed pipe on stdout (`| head`) ends quietly."""
    from autotune.signals import hold_stop_signals_until_exit, process_signals

    _safe_console_streams()
    policy = process_signals()
    policy.install()
    policy.start_run()
    try:
        code = _run(main, argv, policy)
    finally:
        if argv is not None:
            policy.uninstall()   # called in-process (tests, tools): give the handlers back
        else:
            policy.phase = "exiting"   # the process entry: a late signal no longer changes anything,
            hold_stop_signals_until_exit()   # not even in Python's own teardown
    sys.exit(code)


def _run(main: Callable[[list[str] | None], int], argv: list[str] | None, policy) -> int:
    from autotune.signals import EXIT_CODES, RunInterrupted

    try:
        code = main(argv)
        if policy.received and code == 0:
            code = EXIT_CODES.get(policy.received, 130)   # the work completed; the signal still ends it
    except AutotuneError as exc:
        sys.stderr.write("error: " + "\n".join(exc.lines()) + "\n")
        code = exc.exit_code
    except RunInterrupted as exc:
        sys.stderr.write(f"{exc.name}: stopped\n")
        code = EXIT_CODES.get(exc.name, 130)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        code = 130
    except BrokenPipeError:
        code = _closed_stdout()
    return _flush_or_closed(code)


def _closed_stdout() -> int:
    """The reader of our stdout went away (`llasa-probe --json | head`): what it read is what it
    wanted. Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 0


def _flush_or_closed(code: int) -> int:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return _closed_stdout() or code
    except (OSError, ValueError):
        pass
    return code
