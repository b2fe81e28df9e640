#!/usr/bin/env python3
"""Fine-tune Llasa with LoRA on your GPU: `python train.py --data dataset/ --auto`.

probe -> profile -> config -> dry run -> plan -> train. Every step is a named
function in `autotune.run`.
"""

from __future__ import annotations

import os
import sys

from autotune.cli import ArgumentParser, add_config_args, run_main


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0])
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
                   help="validate the data and report counts, hours and lengths; loads no model weights")
    p.add_argument("--json", action="store_true", help="with --check-data, --dry-run or --sweep: print one JSON object")
    add_config_args(p)
    p.add_argument("--model", metavar="ID|PATH|tiny",
                   help="base model (default HKUSTAudio/Llasa-1B); `tiny` builds the offline demo model")
    p.add_argument("--codec", metavar="ID|PATH|tiny", help="XCodec2 used to encode audio and decode samples")
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
                   help="cap this process's GPU memory, as on a smaller card (torch.cuda.set_per_process_memory_fraction)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="grid search over values of a key, e.g. `--sweep lora.r=8,16,32`; repeatable")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The exact command line, so an interrupted run can print how to resume it.
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    apply_file_run_keys(args)
    from autotune.run import run

    return run(args)


def apply_file_run_keys(args) -> None:
    """A llasa-trainer `--config` file names the data, the output folder and the GPUs at its
    top level: they fill in what the command line left out (flags win; so does an
    already set CUDA_VISIBLE_DEVICES)."""
    if args.config:
        from autotune.config import load_yaml_file, run_keys

        keys = run_keys(load_yaml_file(args.config))
        args.data = args.data or keys.get("data_dir")
        args.output_dir = args.output_dir or keys.get("output_dir")
        if "cuda_visible_devices" in keys:
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", keys["cuda_visible_devices"])
    if not args.data:
        from autotune.errors import AutotuneError

        raise AutotuneError("no data given: pass `--data DIR` (a folder or transcript file), "
                            "or `data_dir:` in the `--config` file")


if __name__ == "__main__":
    run_main(main)
