"""`train.py`'s flags, parsed once into a typed request.

`build_parser` defines every flag (and `--help`); `parse_request` turns a command line into
a `RunRequest`, filling in what a llasa-trainer `--config` file names at its top level;
`RunRequest.to_argv` gives the flags back, which is how a sweep starts a trial on another
GPU. Nothing else reads the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from autotune.cli import ArgumentParser, add_config_args
from autotune.errors import AutotuneError


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="train.py", description="Fine-tune Llasa with LoRA on your GPU: "
                                                    "`python train.py --data dataset/ --auto`.")
    p.add_argument("--data", metavar="DIR",
                   help="the data folder or transcript file (train.jsonl, LJSpeech, JSUT, Common Voice, audiofolder, "
                        "esd.list, ... see README); default: `data_dir` of a llasa-trainer `--config` file")
    p.add_argument("--val", metavar="PATH", help="validation set (file or folder); same as `eval_data_dir`")
    p.add_argument("--auto", action="store_true",
                   help="run the OOM-backoff dry run on the real model and the longest batch, then train with its plan")
    p.add_argument("--dry-run", action="store_true", help="only run the dry run and report the plan; train nothing")
    p.add_argument("--plan", metavar="FILE",
                   help="train with the plan an earlier dry run measured (its autotune.json) instead of dry-running; "
                        "unlike `--set`, its values can still step down the ladder after an out-of-memory error")
    p.add_argument("--check-data", action="store_true",
                   help="validate the data and report the layout, counts, hours, speakers and lengths; "
                        "loads no model weights")
    p.add_argument("--json", action="store_true", help="with --check-data, --dry-run or --sweep: print one JSON object")
    add_config_args(p)
    p.add_argument("--model", metavar="ID|PATH|tiny",
                   help="base model (default HKUSTAudio/Llasa-1B); `tiny` builds the offline demo model; "
                        "`llasa-1b-random` / `llasa-3b-random` the real shapes with random weights")
    p.add_argument("--codec", metavar="ID|PATH|tiny",
                   help="XCodec2 used to encode audio and decode samples (HKUSTAudio/xcodec2-hf; the original "
                        "HKUSTAudio/xcodec2 is converted once)")
    p.add_argument("--output-dir", metavar="DIR", help="where the run goes (default runs/<timestamp>)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue from the newest checkpoint in --output-dir, or from the given checkpoint folder")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue although flags differ from the run's run_config.yaml "
                        "(the changes are recorded in run_summary.json); without it such a resume is refused")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output-dir (only a run of this tool, or an empty folder; "
                        "the old run is deleted once the new one trains)")
    p.add_argument("--merge", action="store_true", help="also write the base model with the adapter merged in (merged/)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with the model repository")
    p.add_argument("--vram-limit", type=float, metavar="GIB",
                   help="plan as for a card of this size (its profile) and cap this process's GPU memory to it "
                        "(torch.cuda.set_per_process_memory_fraction)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="grid search over values of a key, e.g. `--sweep lora.r=8,16,32`; repeatable; trials are "
                        "ranked by their samples' scores when all have them, else by eval loss (report.html)")
    p.add_argument("--trials-per-gpu", type=trials_per_gpu, metavar="N|auto",
                   help="with --sweep: how many trials share one GPU at a time. `auto` (default): one, or more when "
                        "the dry run's measured peak leaves room for them under autotune.memory_fraction; N: N at "
                        "a time, each planned and capped as a card of 1/N of the GPU (less 0.75 GiB per process)")
    return p


def trials_per_gpu(text: str) -> str | int:
    """`--trials-per-gpu`: `auto` or a whole number from 1 to 8."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 8:
        raise argparse.ArgumentTypeError(f"expected `auto` or a whole number from 1 to 8, got {text!r}")
    return value


@dataclass
class RunRequest:
    """What the user asked for, typed. The field names are the flags' (`--dry-run` is `dry_run`)."""

    data: str | None = None
    val: str | None = None
    auto: bool = False
    dry_run: bool = False
    plan: str | None = None
    check_data: bool = False
    json: bool = False
    config: str | None = None
    sets: list[str] = field(default_factory=list)
    model: str | None = None
    codec: str | None = None
    output_dir: str | None = None
    resume: str | None = None           # "latest", a checkpoint folder, or None
    allow_changes: bool = False
    overwrite: bool = False
    merge: bool = False
    trust_remote_code: bool = False
    vram_limit: float | None = None
    sweep: list[str] = field(default_factory=list)
    trials_per_gpu: str | int | None = None   # None: not given (auto)
    # Not flags: the exact command line (for the resume hint), and a sweep's shared codec cache.
    argv: list[str] | None = None
    codec_cache: str | None = None

    def replace(self, **changes: Any) -> "RunRequest":
        return dataclasses.replace(self, **changes)

    def config_sets(self) -> list[str]:
        """The flags that are shorthands for config keys, then `--set`s: they pin like `--set`."""
        sets = []
        if self.model:
            sets.append(f"model.name_or_path={json.dumps(self.model)}")
        if self.codec:
            sets.append(f"data.codec={json.dumps(self.codec)}")
        if self.trust_remote_code:
            sets.append("model.trust_remote_code=true")
        if self.val:
            sets.append(f"eval_data_dir={json.dumps(self.val)}")
        if self.vram_limit is not None:
            sets.append(f"autotune.vram_limit_gib={self.vram_limit}")
        return sets + list(self.sets)

    def to_argv(self, leave_out: set[str] = frozenset()) -> list[str]:
        """The request as `train.py` flags (`--flag=value`, so a value may start with `-`),
        read off the parser so that a new flag is passed on too; `leave_out` names fields."""
        flags: list[str] = []
        for action in build_parser()._actions:
            if not action.option_strings or action.dest in leave_out or action.default is argparse.SUPPRESS:
                continue
            value = getattr(self, action.dest, action.default)
            flag = max(action.option_strings, key=len)
            if action.nargs == 0:
                if value != action.default:
                    flags.append(flag)
            elif isinstance(value, list):
                flags += [f"{flag}={item}" for item in value]
            elif value is not None and value != action.default:
                flags.append(f"{flag}={value}")
        return flags


def parse_request(argv: list[str]) -> RunRequest:
    """The command line as a request; a llasa-trainer `--config` file's top-level `data_dir`,
    `output_dir` and `cuda_visible_devices` fill in what the flags left out (flags win; so
    does an already set CUDA_VISIBLE_DEVICES)."""
    namespace = build_parser().parse_args(argv)
    fields = {f.name for f in dataclasses.fields(RunRequest)}
    request = RunRequest(**{k: v for k, v in vars(namespace).items() if k in fields}, argv=list(argv))
    if request.config:
        from autotune.compat import run_keys
        from autotune.config import load_yaml_file

        keys = run_keys(load_yaml_file(request.config))
        request.data = request.data or keys.get("data_dir")
        request.output_dir = request.output_dir or keys.get("output_dir")
        if "cuda_visible_devices" in keys:
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", keys["cuda_visible_devices"])
    if request.trials_per_gpu is not None and not request.sweep:
        raise AutotuneError("`--trials-per-gpu` only applies to a sweep: add `--sweep KEY=V1,V2`, or drop it")
    if not request.data:
        raise AutotuneError("no data given: pass `--data DIR` (a folder or transcript file), "
                            "or `data_dir:` in the `--config` file")
    return request
