#!/usr/bin/env python
"""The speech server under concurrent clients: batched against one request at a time.

    python bench/serve.py --out bench/results/serve-cpu.json              # tiny model on the CPU
    python bench/serve.py --model llasa-1b-random --device cuda --out gpu-out/serve.json

Two servers run in this process on one `Voice` (one base model, one LoRA adapter of r=16 on all
seven projections, random and non-zero): `--max-batch 16` (requests for the same model within
30 ms ride in one generate call) and `--max-batch 1` (one at a time). For 1, 4 and 16 clients,
each client sends its requests back to back over real HTTP on the loopback (httpx), each with
its own seed and text, and every clip is held to exactly `--max-new-tokens` speech tokens (a
random model never says END, so each request costs the same). Reported per mode and client
count: requests per second, p50 and p95 latency, seconds of audio per second. Target (issue
#26): batched >= 3x the throughput of one at a time at 16 clients.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET_SPEEDUP = 3.0
TEXTS = ["今日はいい天気ですね。", "Hello, how are you today?", "お茶をもう一杯いかがですか。", "The quick brown fox."]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny (default) or llasa-1b-random (random weights, Llasa-1B shape)")
    p.add_argument("--codec", default="tiny", help="codec that decodes each clip (default tiny)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", default="1,4,16", help="concurrent client counts (default 1,4,16)")
    p.add_argument("--requests-per-client", type=int, default=0,
                   help="requests each client sends (default: enough for 16 requests per run, at least 2 each)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="speech tokens per clip (default 64: 1.3 s)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=30.0)
    p.add_argument("--out", help="write the JSON here as well as to stdout")
    return p.parse_args()


def build_voice(args):
    import torch
    from peft import LoraConfig, get_peft_model

    from autotune.voice import Voice

    voice = Voice(args.model, codec_id=args.codec, device=args.device, model_given=True, codec_given=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "adapter"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        peft = get_peft_model(voice.model, LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    peft.save_pretrained(str(folder))
    voice.model = peft.unload()
    return voice, folder


class Server:
    def __init__(self, voice, adapter: Path, max_batch: int, max_wait_ms: float):
        import socket

        import uvicorn

        from autotune.speech_api import Models, ServerSettings, create_app

        settings = ServerSettings(max_batch=max_batch, max_wait_s=max_wait_ms / 1000, max_queue=256)
        app = create_app(voice, Models({"bench": adapter}, []), {}, settings)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(256)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/audio/speech"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="error", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def run_clients(url: str, clients: int, per_client: int, max_new_tokens: int) -> dict:
    import httpx

    latencies: list[float] = []
    audio: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(timeout=600) as http:
            for n in range(per_client):
                body = {"model": "bench", "voice": "default", "response_format": "wav",
                        "input": TEXTS[(index + n) % len(TEXTS)], "seed": index * 1000 + n,
                        "max_new_tokens": max_new_tokens}
                started = time.perf_counter()
                answer = http.post(url, json=body)
                took = time.perf_counter() - started
                with lock:
                    if answer.status_code == 200:
                        latencies.append(took)
                        audio.append(float(answer.headers.get("x-audio-seconds", 0)))
                    else:
                        failures.append(f"{answer.status_code}: {answer.text[:200]}")

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    seconds = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"clients": clients, "requests": clients * per_client, "answered": len(latencies), "failed": failures,
            "seconds": round(seconds, 3), "requests_per_second": round(len(latencies) / seconds, 3),
            "p50_s": round(statistics.median(ordered), 3) if ordered else None,
            "p95_s": round(ordered[max(0, int(round(0.95 * len(ordered))) - 1)], 3) if ordered else None,
            "audio_seconds_per_second": round(sum(audio) / seconds, 3)}


def main() -> int:
    args = parse()
    import torch

    counts = [int(c) for c in args.clients.split(",")]
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    voice, adapter = build_voice(args)
    results = []
    for mode, max_batch in (("one_at_a_time", 1), ("batched", args.max_batch)):
        server = Server(voice, adapter, max_batch, args.max_wait_ms)
        try:
            run_clients(server.url, 1, 1, args.max_new_tokens)          # warm-up: the adapter loads here
            for clients in counts:
                per_client = args.requests_per_client or max(2, -(-16 // clients))
                row = run_clients(server.url, clients, per_client, args.max_new_tokens)
                row["mode"] = mode
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            server.stop()
    by = {(r["mode"], r["clients"]): r for r in results}
    speedups = {str(c): round(by[("batched", c)]["requests_per_second"] / by[("one_at_a_time", c)]["requests_per_second"], 2)
                for c in counts if by[("one_at_a_time", c)]["requests_per_second"] > 0}
    top = str(max(counts))
    report = {
        "bench": "serve", "command": " ".join(["python", "bench/serve.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": args.device,
                    "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
                    "load_average_at_start": load_before},
        "model": args.model, "codec": args.codec, "max_new_tokens": args.max_new_tokens,
        "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
        "results": results, "speedup_batched_vs_one_at_a_time": speedups,
        "target": {"clients": int(top), "speedup_at_least": TARGET_SPEEDUP,
                   "met": speedups.get(top, 0) >= TARGET_SPEEDUP},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
