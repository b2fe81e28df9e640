"""Stop signals for a whole run, and how to continue a stopped one. No torch here: the
driver installs these before anything heavy is imported (`--check-data` imports no model code).

SIGINT, SIGTERM and SIGHUP (a closed terminal or ssh session) all ask a run to stop."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143, "SIGHUP": 129}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class RunInterrupted(BaseException):
    """A stop signal outside the training loop (data encoding, the dry run). A
    BaseException, as KeyboardInterrupt is, so no `except Exception` swallows it."""

    def __init__(self, name: str, phase: str):
        super().__init__(name)
        self.name = name
        self.phase = phase


class RunSignals:
    """The one owner of SIGINT, SIGTERM and SIGHUP for the whole life of a process, by phase:

    - preparing (start-up, reading and encoding data, the dry run): stop at once with
      `RunInterrupted`; the driver, or `cli.run_main` before the driver runs, says so in one
      line, with how to go on, and exits 130/143/129;
    - training: ask the `InterruptCallback` to finish the step, save and stop; a second signal
      stops at once;
    - finishing (once training has run: the last evaluation's aftermath, the adapter, the
      summary, the report): the signal is remembered and the run completes its files first,
      then exits with the signal's code; a second signal stops at once (checkpoints are whole);
    - saving (the final adapter and summary are being written): wait until they are whole.

    `install` is counted: the command line installs it first, a run (or each trial of a sweep
    run in-process) installs it again, and only the outermost `uninstall` restores the old handlers.
    """

    def __init__(self) -> None:
        self.phase = "preparing"
        self.received: str | None = None
        self.callback: Any = None   # reliability.InterruptCallback while training
        self._previous: dict[int, Any] = {}
        self._depth = 0

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if self._depth == 0:
            self._previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)
        self._depth += 1

    def uninstall(self) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            for sig, old in self._previous.items():
                signal.signal(sig, old)
            self._previous = {}

    def start_run(self) -> None:
        """A new run (or sweep trial) in this process starts preparing, with no signal pending."""
        self.phase, self.received, self.callback = "preparing", None, None

    @contextmanager
    def training(self, callback: Any) -> Iterator[None]:
        self.phase, self.callback = "training", callback
        if self.received:       # a signal between the dry run and the first step, or before a retry
            callback.requested = callback.requested or self.received
        try:
            yield
        finally:
            # Training ran: from now on a signal lets the run finish its files, then stops.
            self.phase, self.callback = "finishing", None

    @contextmanager
    def saving(self) -> Iterator[None]:
        before, self.phase = self.phase, "saving"
        try:
            yield
        finally:
            self.phase = before

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        first = self.received is None
        self.received = self.received or name
        if self.phase == "exiting":
            return   # the command has ended and its exit code is decided
        if self.phase == "saving":
            _say(f"\n{name}: finishing the final save first (a few seconds), then stopping\n")
            return
        if self.phase == "finishing":
            if not first:
                _say(f"\n{name} again: stopping now (the checkpoints are whole)\n")
                raise SystemExit(EXIT_CODES.get(self.received, 128 + signum))
            _say(f"\n{name}: training is over; writing the adapter and the summary first, then stopping "
                 "(press Ctrl-C again to stop at once)\n")
            return
        if self.phase == "training" and self.callback is not None:
            if self.callback.requested is not None and not first:
                _say(f"\n{name} again: stopping now, without saving (the last checkpoint is kept)\n")
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                raise SystemExit(EXIT_CODES.get(name, 128 + signum))
            self.callback.requested = self.callback.requested or name
            _say(f"\n{name}: finishing this step, then saving a checkpoint and stopping "
                 "(press Ctrl-C again to stop at once without saving)\n")
            return
        raise RunInterrupted(name, self.phase)


_PROCESS: RunSignals | None = None


def process_signals() -> RunSignals:
    """The one signal policy of this process (see `RunSignals`)."""
    global _PROCESS
    if _PROCESS is None:
        _PROCESS = RunSignals()
    return _PROCESS


def _say(text: str) -> None:
    # A raw write, not rich nor sys.stderr: this runs in a signal handler, possibly
    # in the middle of a print, where a buffered write would be a reentrant call.
    try:
        os.write(2, text.encode("utf-8", "replace"))
    except OSError:
        pass


def resume_command(argv: Sequence[str] | None, output_dir: Path, program: str = "train.py") -> str:
    """The command that continues this run: the same options with `--resume
    --output-dir OUT` (an earlier `--resume`, `--output-dir` or `--overwrite` is dropped)."""
    if argv is None:
        return f"python {program} <the same options> --resume --output-dir {shlex.quote(str(output_dir))}"
    kept: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if _is_option(name, "--resume"):
            # nargs="?": a following value that is not an option is the checkpoint.
            if "=" not in token and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                i += 1
        elif _is_option(name, "--output-dir"):
            i += 0 if "=" in token else 1
        elif not _is_option(name, "--overwrite"):
            kept.append(token)
        i += 1
    return shlex.join(["python", program, *kept, "--resume", "--output-dir", str(output_dir)])


def _is_option(token: str, option: str) -> bool:
    # argparse takes unambiguous prefixes (`--output` for `--output-dir`).
    return token == option or (len(token) > 4 and token.startswith("--") and option.startswith(token))


def command_line(args: Any) -> tuple[list[str] | None, str]:
    """(options, program) of this run: `args.argv` when the entry point recorded
    it, else the process's own arguments when it is `train.py`, else unknown."""
    script = bool(sys.argv) and Path(sys.argv[0]).name == "train.py"
    program = sys.argv[0] if script else "train.py"
    argv = getattr(args, "argv", None)
    if argv is not None:
        return list(argv), program
    return (sys.argv[1:] if script else None), program


def hold_stop_signals_until_exit() -> None:
    """The command has ended and its exit code is decided: a stop signal from now on stays
    pending and dies with the process. Python's own teardown puts the default handlers back
    before it frees the modules (which takes a second or more with torch loaded), and a
    signal in that window would kill the process instead of letting it exit with its code."""
    if hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


@contextmanager
def stop_signals_handled_by(handler) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP go to `handler` inside the block; the previous handlers come back after."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
