"""Speak text with a trained adapter: `python synthesize.py --adapter runs/X --text "..." -o out.wav`.

Loads the base model the adapter was trained on (adapter_config.json, or `--model`), applies
the LoRA adapter strictly (every tensor must fit), samples speech tokens with Llasa's prompt
(normalised as the run's training text was) and decodes them with XCodec2 into a 16 kHz mono
WAV. `--text-file` speaks one text per line into `DIR/0001.wav`, `DIR/0002.wav`, ...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from autotune.cli import ArgumentParser, run_main
from autotune.errors import AutotuneError

#: `--text-file`: more lines than this is a book, not a script: split it (each line takes seconds to minutes).
MAX_TEXT_LINES = 10_000
#: Sampling settings outside these ranges overflow the logits or are not sampling any more.
TEMPERATURE_RANGE = (0.01, 10.0)
REPETITION_PENALTY_RANGE = (0.01, 10.0)


def _number_in(low: float, high: float, what: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"`{text}` is not a number") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be a number from {low:g} to {high:g}, got {text}")
        return value
    return parse


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}` is not a number") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}` is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _seed(text: str) -> int:
    """A seed torch accepts: 0 .. 2**63 - 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**63-1, got {text}")
    return value


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="synthesize.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, metavar="DIR",
                   help="a training run's output folder (or one of its checkpoint-N / kept-... folders)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="the text to speak")
    what.add_argument("--text-file", metavar="FILE",
                      help=f"one text per line (blank lines are skipped; at most {MAX_TEXT_LINES:,} lines of "
                           "2,000 characters); -o is then a folder")
    p.add_argument("-o", "--output", required=True, metavar="OUT.wav|DIR",
                   help="WAV file to write (with --text) or folder for 0001.wav, 0002.wav, ... (with --text-file)")
    p.add_argument("--model", metavar="ID|PATH|tiny",
                   help="base model (default: `base_model_name_or_path` of the adapter's adapter_config.json)")
    p.add_argument("--codec", metavar="ID|PATH|tiny",
                   help="XCodec2 that decodes the speech (default: the run's `data.codec`, else HKUSTAudio/xcodec2-hf)")
    p.add_argument("--reference", metavar="CLIP", help="voice prompt clip for voice cloning (needs --reference-text)")
    p.add_argument("--reference-text", metavar="TEXT", help="transcript of --reference")
    p.add_argument("--speaker", metavar="NAME",
                   help="speak in this speaker's voice (a multi-speaker run: its speakers are in run_summary.json)")
    p.add_argument("--temperature", type=_number_in(*TEMPERATURE_RANGE, "the temperature"), default=0.8, metavar="T",
                   help="sampling temperature (default 0.8, the Llasa model card's)")
    p.add_argument("--top-p", type=_probability, default=1.0, metavar="P",
                   help="nucleus sampling threshold, above 0 and at most 1 (default 1.0, the model card's)")
    p.add_argument("--repetition-penalty", type=_number_in(*REPETITION_PENALTY_RANGE, "the repetition penalty"),
                   default=1.0, metavar="X",
                   help="repetition penalty (default 1.0: none, as the model card; the official LoRA example uses 1.2)")
    p.add_argument("--max-new-tokens", type=_positive_int, metavar="N",
                   help="longest speech in tokens, 50 per second (default: all that fits, prompt plus speech never "
                        "pass Llasa's 2,048 positions; 150 for the tiny demo model, which never ends by itself)")
    p.add_argument("--seed", type=_seed, metavar="N", help="make the sampling reproducible (each text uses this seed)")
    p.add_argument("--batch-size", type=_positive_int, default=1, metavar="N",
                   help="with --text-file, speak N lines per generate call: the same speech (each line keeps its "
                        "own sampling), faster on a GPU (default 1)")
    p.add_argument("--device", metavar="DEVICE", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="model weights (default: bf16 or fp16 on a GPU, fp32 on the CPU)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with the model repository")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout: totals (codes, dropped, generated, seconds) "
                        "and one entry per file; the other lines go to stderr")
    return p


# ------------------------------------------------------------------ inputs ---

def read_texts(args) -> list[str]:
    """The texts to speak: `--text`, or the lines of `--text-file` (bounded: size, lines, line length)."""
    from autotune.files import TEXT_FILE_LIMIT_BYTES, read_user_text
    from autotune.voice import MAX_TEXT_CHARS, check_text

    if args.text is not None:
        return [check_text(args.text, "`--text`")]
    text = read_user_text(args.text_file, what="text", limit_bytes=TEXT_FILE_LIMIT_BYTES)
    texts: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if len(texts) >= MAX_TEXT_LINES:
            raise AutotuneError(f"`--text-file {args.text_file}` holds more than {MAX_TEXT_LINES:,} texts: split it "
                                "into several files (each line takes seconds to minutes to speak)")
        if len(line.strip()) > MAX_TEXT_CHARS:
            raise AutotuneError(f"`--text-file {args.text_file}` line {number} is {len(line.strip()):,} characters: "
                                f"Llasa's 2,048 positions hold about 40 s of speech, far less than {MAX_TEXT_CHARS:,} "
                                "characters; split it into sentences, one per line")
        texts.append(check_text(line, f"`--text-file {args.text_file}` line {number}"))
    if not texts:
        raise AutotuneError(f"`--text-file {args.text_file}` holds no text: write one text per line")
    return texts


def check_reference_args(args) -> None:
    from autotune.voice import check_text

    if args.reference is None:
        if args.reference_text is not None:
            raise AutotuneError("`--reference-text` needs `--reference CLIP`, the clip it transcribes")
        return
    if args.reference_text is None or not args.reference_text.strip():
        raise AutotuneError("`--reference` needs `--reference-text \"...\"`, the transcript of the clip")
    check_text(args.reference_text, "`--reference-text`")


def output_paths(args, count: int) -> list[Path]:
    """Where the WAVs go; the folder is made and tried with a test file now, before any model loads."""
    from autotune.rundir import path_text

    out = Path(args.output).expanduser()
    if args.text is not None:
        if out.is_dir():
            raise AutotuneError(f"`-o {path_text(args.output)}` is a folder: with --text give a file name such as out.wav")
        paths, folder = [out], out.parent
    else:
        if out.exists() and not out.is_dir():
            raise AutotuneError(f"`-o {path_text(args.output)}` is a file: with --text-file give a folder")
        paths, folder = [out / f"{i:04d}.wav" for i in range(1, count + 1)], out
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".synthesize-", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        blocking = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            reason = f"`{path_text(blocking)}` is a file, not a folder"
        raise AutotuneError(f"cannot write into `{path_text(folder)}` ({reason}): choose another `-o`") from None
    return paths


# -------------------------------------------------------------------- main ---

class _Signals:
    """One policy for the command's whole life: SIGINT, SIGTERM and SIGHUP stop it at once with
    130, 143 and 129, except while a WAV is being written, which finishes first (and is whole)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.writing = False

    def handle(self, signum, frame) -> None:
        import signal

        from autotune.signals import RunInterrupted

        self.received = self.received or signal.Signals(signum).name
        if not self.writing:
            raise RunInterrupted(self.received, "speaking")

    @contextlib.contextmanager
    def file_being_written(self):
        from autotune.signals import RunInterrupted

        self.writing = True
        try:
            yield
        finally:
            self.writing = False
        if self.received:
            raise RunInterrupted(self.received, "speaking")


def main(argv: list[str] | None = None) -> int:
    import threading

    from autotune.signals import EXIT_CODES, RunInterrupted, stop_signals_handled_by

    signals = _Signals()
    written: list[str] = []
    total = [0]
    handled = stop_signals_handled_by(signals.handle) if threading.current_thread() is threading.main_thread() \
        else contextlib.nullcontext()
    try:
        with handled:
            return speak(argv, signals, written, total)
    except RunInterrupted as stop:
        left = total[0] - len(written)
        kept = f"{len(written)} file{'s' if len(written) != 1 else ''} written whole" if written else "no file written"
        rest = f", {left} not written" if total[0] and left else ""
        sys.stderr.write(f"{stop.name}: stopped; {kept}{rest}\n")
        return EXIT_CODES.get(stop.name, 130)


def speak(argv: list[str] | None, signals: Any, written: list[str], total: list[int]) -> int:
    args = build_parser().parse_args(argv)
    say = (lambda message: print(message, file=sys.stderr)) if args.json else print

    from autotune.adapters import read_adapter

    files = read_adapter(args.adapter)
    texts = read_texts(args)
    total[0] = len(texts)
    check_reference_args(args)
    paths = output_paths(args, len(texts))
    reference_wave = None
    if args.reference is not None:
        from autotune.voice import read_clip

        reference_wave = read_clip(args.reference, "`--reference`")

    from autotune.audio import write_wav
    from autotune.generation import SpeechItem
    from autotune.llasa import SAMPLING_RATE
    from autotune.voice import Voice

    voice = Voice.for_adapter(args.adapter, model=args.model, codec=args.codec, device=args.device,
                              precision=args.precision, trust_remote_code=args.trust_remote_code)
    adapter = voice.adapter(args.adapter, files)
    speaker = voice.check_speaker(adapter, args.speaker)
    reference_codes = voice.reference_codes(reference_wave, "`--reference`") if reference_wave is not None else None
    reference_text = args.reference_text.strip() if reference_codes else None
    items = [SpeechItem(text, reference_text=reference_text, reference_codes=reference_codes, speaker=speaker,
                        temperature=args.temperature, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                        max_new_tokens=args.max_new_tokens, seed=args.seed) for text in texts]
    for number, item in enumerate(items, 1):   # every text is checked before the first is spoken
        try:
            voice.fits(adapter, item)
        except AutotuneError as exc:
            where = f"`--text-file` line {number}: " if args.text is None else ""
            raise AutotuneError(where + exc.one_line()) from None
    say(f"loaded {voice.model_name} + adapter {args.adapter} and codec {voice.codec_id} on {voice.device} "
        f"in {voice.load_seconds:.1f} s")
    cap = voice.default_max_new_tokens()
    if args.max_new_tokens is None and cap is not None:
        say(f"the tiny demo model never ends its speech by itself: each clip stops at {cap} tokens "
            f"({cap / 50:g} s); `--max-new-tokens` changes it")
    if len(texts) > 1:
        longest = max(len(t) for t in texts)
        say(f"speaking {len(texts):,} texts (the longest {longest:,} characters) into {args.output}")

    started = time.perf_counter()
    results = []
    for first in range(0, len(items), args.batch_size):
        batch = items[first:first + args.batch_size]
        speeches = voice.speak(adapter, batch)
        for item, speech, path in zip(batch, speeches, paths[first:first + len(batch)]):
            with signals.file_being_written():     # a signal now waits for this file to be whole
                write_wav(path, speech.wave, SAMPLING_RATE)
                written.append(str(path))
            spoken = speech.spoken
            results.append({"text": item.text, "output": str(path), "codes": len(spoken.codes),
                            "dropped": spoken.dropped, "generated": spoken.generated,
                            "seconds": speech.audio_seconds, "ended": spoken.ended,
                            "compute_seconds": round(speech.seconds_taken, 3),
                            "real_time_factor": _round(speech.real_time_factor)})
            note = "" if spoken.ended else f" (hit the limit of {spoken.budget} new tokens before the end of speech)"
            rtf = f", real-time factor {speech.real_time_factor:.2f}" if speech.real_time_factor else ""
            say(f"{path}: {speech.audio_seconds:.2f} s of audio from {spoken.generated} generated tokens, "
                f"{spoken.dropped} non-speech dropped{note} [{speech.seconds_taken:.1f} s{rtf}]")
            if not spoken.codes:
                say(f"  ! {path}: no speech tokens were generated; the file is empty")
    seconds = time.perf_counter() - started
    audio = sum(r["seconds"] for r in results)
    say(f"{len(results)} file{'s' if len(results) != 1 else ''}, {audio:.1f} s of audio in {seconds:.1f} s"
        + (f" (real-time factor {seconds / audio:.2f})" if audio > 0 else ""))
    if args.json:
        totals = {key: sum(r[key] for r in results) for key in ("codes", "dropped", "generated", "seconds")}
        print(json.dumps({**totals, "sampling_rate": SAMPLING_RATE, "compute_seconds": round(seconds, 3),
                          "real_time_factor": _round(seconds / audio if audio > 0 else None), "files": results},
                         ensure_ascii=False))
    return 0


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def entry() -> None:
    run_main(main)


if __name__ == "__main__":
    entry()
