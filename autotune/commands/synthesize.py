"""Speak text with a trained adapter: `python synthesize.py --adapter runs/X --text "..." -o out.wav`.

Loads the base model the adapter was trained on (adapter_config.json, or
`--model`), applies the LoRA adapter, samples speech tokens with Llasa's
prompt and decodes them with XCodec2 into a 16 kHz mono WAV. `--text-file`
speaks one text per line into `DIR/0001.wav`, `DIR/0002.wav`, ...
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from autotune.cli import ArgumentParser, run_main
from autotune.errors import AutotuneError

# PEFT looks up the base model's name on the hub; offline (or for `tiny`) that only warns.
warnings.filterwarnings("ignore", message="Unable to fetch remote file")
warnings.filterwarnings("ignore", message="Could not find a config file in")
warnings.filterwarnings("ignore", message=".*checkpointing.* is deprecated and will be removed in v6",
                        category=FutureWarning)

CONFIG_FILES = ("resolved_config.yaml", "run_config.yaml")


def _positive_float(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}` is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}` is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _seed(text: str) -> int:
    """A seed torch accepts: 0 .. 2**63 - 1."""
    import argparse

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
                   help="a training run's output folder (or one of its checkpoint-N folders)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="the text to speak")
    what.add_argument("--text-file", metavar="FILE",
                      help="one text per line (blank lines are skipped); -o is then a folder")
    p.add_argument("-o", "--output", required=True, metavar="OUT.wav|DIR",
                   help="WAV file to write (with --text) or folder for 0001.wav, 0002.wav, ... (with --text-file)")
    p.add_argument("--model", metavar="ID|PATH|tiny",
                   help="base model (default: `base_model_name_or_path` of the adapter's adapter_config.json)")
    p.add_argument("--codec", metavar="ID|PATH|tiny",
                   help="XCodec2 that decodes the speech (default: the run's `data.codec`, else HKUSTAudio/xcodec2-hf)")
    p.add_argument("--reference", metavar="CLIP", help="speaker prompt clip for voice cloning (needs --reference-text)")
    p.add_argument("--reference-text", metavar="TEXT", help="transcript of --reference")
    p.add_argument("--speaker", metavar="NAME",
                   help="speak in this speaker's voice (a multi-speaker run: its speakers are in run_summary.json)")
    p.add_argument("--temperature", type=_positive_float, default=0.8, metavar="T",
                   help="sampling temperature (default 0.8, the Llasa model card's)")
    p.add_argument("--top-p", type=_positive_float, default=1.0, metavar="P",
                   help="nucleus sampling threshold, at most 1 (default 1.0, the model card's)")
    p.add_argument("--repetition-penalty", type=_positive_float, default=1.0, metavar="X",
                   help="repetition penalty (default 1.0: none, as the model card; the official LoRA example uses 1.2)")
    p.add_argument("--max-new-tokens", type=_positive_int, metavar="N",
                   help="longest speech in tokens, 50 per second (default: all that fits; prompt plus speech "
                        "never pass Llasa's 2,048 positions)")
    p.add_argument("--seed", type=_seed, metavar="N", help="make the sampling reproducible (each text uses this seed)")
    p.add_argument("--device", metavar="DEVICE", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="model weights (default: bf16 or fp16 on a GPU, fp32 on the CPU)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with the model repository")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout: totals (codes, dropped, generated, seconds) "
                        "and one entry per file; the other lines go to stderr")
    return p


# ------------------------------------------------------------------ inputs ---

def read_adapter(folder: str) -> tuple[Path, dict[str, Any]]:
    path = Path(folder).expanduser()
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise AutotuneError(f"`--adapter {folder}` {what}: pass the output folder of a training run "
                            "(it holds adapter_config.json and adapter_model.safetensors)")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise AutotuneError(f"`--adapter {folder}` holds no adapter_config.json: pass the output folder of a finished "
                            "training run or one of its checkpoint-N folders")
    try:
        adapter_config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise AutotuneError(f"`{config_file}` cannot be read ({reason}): the adapter is damaged; "
                            "use another checkpoint") from None
    if not isinstance(adapter_config, dict):
        raise AutotuneError(f"`{config_file}` is not a PEFT adapter config (expected a JSON object)")
    return path, adapter_config


def run_config_value(adapter: Path, section: str, key: str) -> Any:
    """A value from the run's config next to the adapter (or one level up for checkpoint-N)."""
    import yaml

    for folder in (adapter, adapter.parent):
        for name in CONFIG_FILES:
            candidate = folder / name
            if not candidate.is_file():
                continue
            try:
                data = yaml.safe_load(candidate.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                continue
            part = data.get(section) if isinstance(data, dict) else None
            value = part.get(key) if isinstance(part, dict) else None
            if value:
                return value
    return None


def read_texts(args) -> list[str]:
    if args.text is not None:
        if not args.text.strip():
            raise AutotuneError("`--text` is empty: give the text to speak")
        return [args.text.strip()]
    path = Path(args.text_file).expanduser()
    if not path.is_file():
        raise AutotuneError(f"`--text-file {args.text_file}` does not exist: pass a UTF-8 file with one text per line")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise AutotuneError(f"`--text-file {args.text_file}` cannot be read ({reason}): "
                            "pass a UTF-8 text file") from None
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise AutotuneError(f"`--text-file {args.text_file}` holds no text: write one text per line")
    return texts


def check_reference(args) -> None:
    if args.reference is None:
        if args.reference_text is not None:
            raise AutotuneError("`--reference-text` needs `--reference CLIP`, the clip it transcribes")
        return
    if args.reference_text is None or not args.reference_text.strip():
        raise AutotuneError("`--reference` needs `--reference-text \"...\"`, the transcript of the clip")
    if not Path(args.reference).expanduser().is_file():
        raise AutotuneError(f"`--reference {args.reference}`: audio file is missing")


def check_speaker(speaker: str | None, adapter: Path) -> None:
    """A name the run did not train is a one-line error listing the ones it did."""
    if speaker is None:
        return
    if not speaker.strip():
        raise AutotuneError("`--speaker` is empty: give a speaker name from the training data")
    known = trained_speakers(adapter)
    if known is not None and speaker not in known:
        import difflib

        if not known:
            raise AutotuneError(f"`--speaker {speaker}`: the run in `{adapter}` was trained without speaker names "
                                "in its prompts (its data has fewer than two speakers); leave out `--speaker`")
        close = difflib.get_close_matches(speaker, list(known), n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        shown = ", ".join(list(known)[:10]) + (f" and {len(known) - 10} more" if len(known) > 10 else "")
        raise AutotuneError(f"`--speaker {speaker}` is not a speaker of this run{hint}: it knows {shown}")


def trained_speakers(adapter: Path) -> dict[str, float] | None:
    """`speakers` of the run's run_summary.json ({name: seconds}); None when not recorded."""
    for folder in (adapter, adapter.parent):
        summary = folder / "run_summary.json"
        if summary.is_file():
            try:
                speakers = json.loads(summary.read_text(encoding="utf-8")).get("speakers")
            except (OSError, UnicodeDecodeError, ValueError, AttributeError):
                return None
            if not isinstance(speakers, dict):
                return None
            conditioned = json.loads(summary.read_text(encoding="utf-8")).get("speaker_conditioning", True)
            return speakers if conditioned else {}
    return None


def output_paths(args, count: int) -> list[Path]:
    out = Path(args.output).expanduser()
    if args.text is not None:
        if out.is_dir():
            raise AutotuneError(f"`-o {args.output}` is a folder: with --text give a file name such as out.wav")
        return [out]
    if out.exists() and not out.is_dir():
        raise AutotuneError(f"`-o {args.output}` is a file: with --text-file give a folder")
    return [out / f"{i:04d}.wav" for i in range(1, count + 1)]


def pick_device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AutotuneError(f"`--device {name}` is not a device: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise AutotuneError(f"`--device {name}` is not supported: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AutotuneError(f"`--device {name}`: no CUDA GPU is available here; use `--device cpu`")
    return name


def pick_precision(choice: str, device: str) -> str:
    """The precision training uses on this hardware (`profiles.precision_for`, the one rule):
    bf16 at compute capability 8.0 and up, fp16 on 7.x, fp32 on the CPU."""
    if choice != "auto":
        return choice
    if not device.startswith("cuda"):
        return "fp32"
    from autotune.hardware import probe
    from autotune.profiles import precision_for

    gpus = probe().gpus
    index = int(device.partition(":")[2] or 0)
    return precision_for(gpus[index].cc if index < len(gpus) else None)


# -------------------------------------------------------------------- main ---

def load_model(args, adapter: Path, adapter_config: dict[str, Any], device: str):
    from autotune.model import load_base_model, load_tokenizer

    name = args.model or adapter_config.get("base_model_name_or_path")
    if not name:
        raise AutotuneError(f"`{adapter / 'adapter_config.json'}` names no base model: pass `--model ID|PATH`")
    tokenizer = load_tokenizer(name, trust_remote_code=args.trust_remote_code)
    base = load_base_model(name, precision=pick_precision(args.precision, device),
                           trust_remote_code=args.trust_remote_code, device=device)
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(base, str(adapter))
    except Exception as exc:  # noqa: BLE001 - a mismatched or damaged adapter, told on one line
        reason = " ".join(str(exc).split())[:200]
        raise AutotuneError(f"cannot apply the adapter in `{adapter}` to `{name}` ({reason}): "
                            "was it trained on this base model? pass the right one with `--model`") from None
    model.to(device)
    model.eval()
    return model, tokenizer, name


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.top_p > 1:
        raise AutotuneError(f"`--top-p` must be at most 1, got {args.top_p}")
    adapter, adapter_config = read_adapter(args.adapter)
    texts = read_texts(args)
    check_reference(args)
    paths = output_paths(args, len(texts))
    check_speaker(args.speaker, adapter)
    say = (lambda message: print(message, file=sys.stderr)) if args.json else print

    from autotune.audio import load_audio, write_wav
    from autotune.codec import load_codec
    from autotune.llasa import DEFAULT_CODEC, SAMPLING_RATE

    codec_id = args.codec or run_config_value(adapter, "data", "codec") or DEFAULT_CODEC
    device = pick_device(args.device)
    reference_wave = None
    if args.reference is not None:
        try:
            reference_wave = load_audio(args.reference)
        except AutotuneError as exc:
            raise AutotuneError(f"`--reference`: {exc.one_line()}") from None
    started = time.perf_counter()
    codec = load_codec(codec_id, device=device)
    reference_codes = None
    if reference_wave is not None:
        try:
            reference_codes = codec.encode(reference_wave)
        except AutotuneError as exc:
            raise AutotuneError(f"`--reference {args.reference}`: {exc.one_line()}") from None
    model, tokenizer, model_name = load_model(args, adapter, adapter_config, device)
    say(f"loaded {model_name} + adapter {adapter} and codec {codec_id} on {device} "
        f"in {time.perf_counter() - started:.1f} s")

    from autotune.llasa import PromptBuilder
    from autotune.generation import generate_codes, new_token_budget, prompt_ids

    prompt_builder = PromptBuilder(tokenizer)
    reference_text = args.reference_text.strip() if reference_codes else None

    results = []
    for text, path in zip(texts, paths):
        t0 = time.perf_counter()
        codes, dropped, generated = generate_codes(
            model, tokenizer, text, temperature=args.temperature, top_p=args.top_p,
            repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
            reference_text=reference_text, reference_codes=reference_codes, speaker=args.speaker, seed=args.seed)
        wave = codec.decode(codes)
        write_wav(path, wave, SAMPLING_RATE)
        seconds = wave.size / SAMPLING_RATE
        budget = new_token_budget(len(prompt_ids(prompt_builder, text, reference_text=reference_text,
                                                  reference_codes=reference_codes, speaker=args.speaker)),
                                  args.max_new_tokens)
        ended = generated < budget
        results.append({"text": text, "output": str(path), "codes": len(codes), "dropped": dropped,
                        "generated": generated, "seconds": seconds, "ended": ended})
        note = "" if ended else f" (hit the limit of {budget} new tokens before the end of speech)"
        say(f"{path}: {seconds:.2f} s of audio from {generated} generated tokens, {dropped} non-speech dropped"
            f"{note} [{time.perf_counter() - t0:.1f} s]")
        if not codes:
            say(f"  ! {path}: no speech tokens were generated; the file is empty")
    if args.json:
        totals = {key: sum(r[key] for r in results) for key in ("codes", "dropped", "generated", "seconds")}
        print(json.dumps({**totals, "sampling_rate": SAMPLING_RATE, "files": results}, ensure_ascii=False))
    return 0


def entry() -> None:
    run_main(main)


if __name__ == "__main__":
    entry()
