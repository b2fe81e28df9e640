"""An OpenAI-compatible speech server for your runs: `python serve.py --runs runs/`.

`POST /v1/audio/speech` (model, input, voice, response_format wav/flac/pcm/mp3/opus),
`GET /v1/models`, `GET /health`. One base model stays in memory; each run or checkpoint is a
LoRA adapter loaded strictly on first use; concurrent requests for the same model are batched
into one `generate` call. Binds 127.0.0.1 unless `--host` says otherwise.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from autotune.cli import ArgumentParser, run_main
from autotune.errors import AutotuneError


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}` is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _milliseconds(text: str) -> float:
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}` is not a number") from None
    if not math.isfinite(value) or not 0 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1000 ms, got {text}")
    return value


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="serve.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", action="append", default=[], metavar="DIR",
                   help="serve every run under DIR (and its checkpoints: `run/checkpoint-N`, `run/kept-...`); "
                        "repeatable; default `runs` when no --adapter is given")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="serve one adapter folder as model NAME (default: the folder's name); repeatable")
    p.add_argument("--voices", metavar="DIR",
                   help="named voice prompts: NAME.wav clips, each with its transcript in NAME.txt; "
                        "a request's `voice` picks one by NAME")
    p.add_argument("--model", metavar="ID|PATH|tiny", help="base model (default: the one the adapters were trained on)")
    p.add_argument("--codec", metavar="ID|PATH|tiny", help="XCodec2 (default: the runs' `data.codec`)")
    p.add_argument("--device", metavar="DEVICE", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    p.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with the model repository")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network, "
                        "set an API key then)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require `Authorization: Bearer KEY` on /v1/ (default: the LLASA_API_KEY environment "
                        "variable; none when neither is set)")
    p.add_argument("--max-batch", type=_positive_int, default=16, metavar="N",
                   help="most requests spoken in one generate call (default 16; 1 turns batching off)")
    p.add_argument("--max-wait-ms", type=_milliseconds, default=30.0, metavar="MS",
                   help="how long a request waits for others to batch with (default 30 ms)")
    p.add_argument("--max-queue", type=_positive_int, default=64, metavar="N",
                   help="requests that may wait; beyond that the server answers 429 at once (default 64)")
    p.add_argument("--max-adapters", type=_positive_int, default=8, metavar="N",
                   help="adapters held in memory at once; the least recently used goes (default 8)")
    return p


def adapters_from(values: list[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep:
            name, folder = Path(value).expanduser().resolve().name, value
        if not name or "/" in name:
            raise AutotuneError(f"`--adapter {value}`: the model name must be a plain name without `/`")
        if name in found:
            raise AutotuneError(f"`--adapter {value}`: the name `{name}` is used twice; name them `NAME=DIR`")
        found[name] = Path(folder).expanduser()
    return found


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise AutotuneError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): pick another `--port`, or "
                            "stop what uses it") from None
    sock.listen(128)
    return sock


def main(argv: list[str] | None = None) -> int:
    app, sock, settings = prepare(argv)
    serve(app, sock, settings)
    return 0


def require(*modules: str) -> None:
    """The optional packages a command needs, or one line saying how to install them."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise AutotuneError(f"this needs {', '.join(missing)}, which is not installed: "
                            "`pip install -e \".[ui]\"` (gradio, fastapi, uvicorn)")


def prepare(argv: list[str] | None = None):
    """Everything but serving: (the ASGI app, its bound socket, the settings); errors are one line."""
    args = build_parser().parse_args(argv)
    require("fastapi", "uvicorn")
    from autotune.adapters import read_adapter
    from autotune.speech_api import Models, ServerSettings, api_key_from, create_app, read_voice_prompts

    key = api_key_from(args.api_key)
    fixed = adapters_from(args.adapter)
    for name, folder in fixed.items():
        read_adapter(folder, what=f"--adapter {name}=")
    runs = args.runs or ([] if fixed else ["runs"])
    for folder in runs:
        if not Path(folder).expanduser().is_dir():
            raise AutotuneError(f"`--runs {folder}` is not a folder: pass the folder your runs are in, or "
                                "`--adapter DIR` for one adapter")
    models = Models(fixed, [Path(r) for r in runs])
    served = models.all()
    if not served:
        raise AutotuneError(f"no adapter found under {', '.join(runs)}: train a run first, or pass `--adapter DIR`")
    prompts = read_voice_prompts(Path(args.voices) if args.voices else None)
    sock = bind(args.host, args.port)    # a port in use is found before minutes of loading
    try:
        from autotune.voice import Voice

        first_name, first = next(iter(sorted(served.items())))
        voice = Voice.for_adapter(first, model=args.model, codec=args.codec, device=args.device,
                                  precision=args.precision, trust_remote_code=args.trust_remote_code,
                                  max_adapters=args.max_adapters)
        voice.adapter(first)      # a broken adapter or base model is one line now, not at the first request
    except BaseException:
        sock.close()
        raise
    settings = ServerSettings(api_key=key, max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1000,
                              max_queue=args.max_queue)
    app = create_app(voice, models, prompts, settings)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {len(served)} model{'s' if len(served) != 1 else ''} (e.g. `{first_name}`) on "
          f"http://{shown}:{sock.getsockname()[1]}/v1/audio/speech with {voice.model_name} on {voice.device}"
          f"{', API key required' if key else ''}; Ctrl-C stops", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not key:
        print(f"warning: listening on {args.host} without an API key: anyone who can reach this port can use it; "
              "set `--api-key` or LLASA_API_KEY", file=sys.stderr, flush=True)
    return app, sock, settings


def serve(app, sock: socket.socket, settings) -> None:
    import uvicorn

    # Connections beyond the queue and the batch in flight are answered 503 by uvicorn at once.
    config = uvicorn.Config(app, log_level="warning", limit_concurrency=settings.max_queue + settings.max_batch + 8,
                            timeout_keep_alive=5, access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


def entry() -> None:
    run_main(main)


if __name__ == "__main__":
    entry()
