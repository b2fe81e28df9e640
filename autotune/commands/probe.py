"""What will my GPU get, and why: `llasa-probe [--json] [--gpu NAME --vram GIB --cc X.Y]` (or `python probe.py`).

Reads the GPUs through NVML (never imports torch), matches a built-in profile
and prints the recommended settings with the reasons.
"""

from __future__ import annotations

from autotune.cli import ArgumentParser, add_config_args, run_main


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="probe.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: gpus, profile, config, reasons, warnings")
    add_config_args(parser)
    whatif = parser.add_argument_group("what-if mode", "plan for a card you do not have, without touching NVML")
    whatif.add_argument("--gpu", metavar="NAME", help="GPU name as NVML reports it, e.g. 'NVIDIA GeForce RTX 4090'")
    whatif.add_argument("--vram", metavar="GIB", help="its memory in GiB, e.g. 24")
    whatif.add_argument("--cc", metavar="MAJOR.MINOR", help="its compute capability, e.g. 8.9 (guessed from known names)")
    whatif.add_argument("--count", type=int, default=1, metavar="N", help="how many such GPUs (default 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from autotune.probe_report import gather, render

    report = gather(args)
    if args.json:
        import json

        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        render(report)
    return 0


def entry() -> None:
    run_main(main)


if __name__ == "__main__":
    entry()
