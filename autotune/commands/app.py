"""The web UI: `python app.py` (runs under `runs/`), or `python app.py --runs DIR` / `--adapter DIR`.

Tabs: Speak (a run, a checkpoint, a speaker, text, an optional voice prompt, sampling), Compare
(one text across 2-4 checkpoints, each clip scored; keep the best), Runs (state, steps, best
scores, report.html), Codec (audio -> codes -> audio). Labels follow the browser's language
(English or Japanese). Binds 127.0.0.1 unless `--host` or `--share` says otherwise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from autotune.cli import ArgumentParser, run_main
from autotune.errors import AutotuneError


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="app.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", action="append", default=[], metavar="DIR",
                   help="offer every run under DIR (repeatable; default `runs` when no --adapter is given)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="offer one adapter folder as NAME (repeatable)")
    p.add_argument("--model", metavar="ID|PATH|tiny", help="base model (default: the one the run was trained on)")
    p.add_argument("--codec", metavar="ID|PATH|tiny", help="XCodec2 (default: the run's `data.codec`)")
    p.add_argument("--asr-model", metavar="ID|PATH|tiny|none",
                   help="speech recogniser for Compare's CER/WER and blank voice-prompt transcripts "
                        "(default: the run's `scores.asr_model`)")
    p.add_argument("--speaker-model", metavar="ID|PATH|tiny|none",
                   help="speaker-verification model for Compare's similarity (default: the run's `scores.speaker_model`)")
    p.add_argument("--device", metavar="DEVICE", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    p.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with the model repository")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs the internet)")
    p.add_argument("--max-queue", type=int, default=16, metavar="N",
                   help="requests that may wait in the page's queue; beyond that the page says it is busy (default 16)")
    return p


def studio_from(args):
    from autotune.commands.serve import adapters_from
    from autotune.webui import Studio, StudioOptions

    adapters = adapters_from(args.adapter)
    runs = args.runs or ([] if adapters else ["runs"])
    for folder in runs:
        if not Path(folder).expanduser().is_dir():
            raise AutotuneError(f"`--runs {folder}` is not a folder: pass the folder your runs are in "
                                "(train.py's --output-dir goes under it), or `--adapter DIR`")
    if args.max_queue < 1:
        raise AutotuneError(f"`--max-queue` must be at least 1, got {args.max_queue}")
    return Studio(StudioOptions(runs=[Path(r).expanduser() for r in runs], adapters=adapters, model=args.model,
                                codec=args.codec, device=args.device, precision=args.precision,
                                asr_model=args.asr_model, speaker_model=args.speaker_model,
                                trust_remote_code=args.trust_remote_code))


def launch(args, *, block: bool = True):
    """Build and start the page; returns (page, url). With `block=False` it serves in a thread."""
    from autotune.commands.serve import require

    require("gradio")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from autotune.webui import CSS, build

    studio = studio_from(args)
    page, i18n = build(studio)
    page.queue(max_size=args.max_queue, default_concurrency_limit=1, api_open=False)
    allowed = [str(studio.out_dir), *(str(r.resolve()) for r in studio.options.runs),
               *(str(Path(a).resolve()) for a in studio.options.adapters.values())]
    try:
        _, url, share_url = page.launch(server_name=args.host, server_port=args.port, share=args.share,
                                        allowed_paths=allowed, i18n=i18n, css=CSS, quiet=True,
                                        prevent_thread_lock=True, footer_links=[])
    except OSError as exc:
        raise AutotuneError(f"cannot listen on {args.host}:{args.port} ({' '.join(str(exc).split())[:160]}): "
                            "pick another `--port`") from None
    print(f"the voice studio is at {url}" + (f" and {share_url}" if share_url else "") + "; Ctrl-C stops", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") or args.share:
        print("warning: the page is reachable beyond this machine: anyone who opens it can speak with your runs",
              file=sys.stderr, flush=True)
    if block:
        try:
            page.block_thread()
        finally:
            page.close()
    return page, url


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    launch(args)
    return 0


def entry() -> None:
    run_main(main)


if __name__ == "__main__":
    entry()
