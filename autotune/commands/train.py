"""Fine-tune Llasa with LoRA on your GPU: `llasa-train --data dataset/ --auto` (or `python train.py ...`).

the folder -> probe -> profile -> config -> data -> plan (dry run) -> train -> finish;
every step is a named function in `autotune.pipeline`, a sweep is `autotune.sweep`.
"""

from __future__ import annotations

import sys

from autotune.cli import run_main


def build_parser():
    from autotune.request import build_parser

    return build_parser()


def main(argv: list[str] | None = None) -> int:
    from autotune.request import parse_request

    request = parse_request(list(argv) if argv is not None else sys.argv[1:])
    if request.sweep:
        from autotune.sweep.local import run_sweep

        return run_sweep(request)
    from autotune.pipeline import run

    return run(request)


def entry() -> None:
    run_main(main)


if __name__ == "__main__":
    entry()
