#!/usr/bin/env python
"""What scoring the training samples costs per evaluation, at the default models' real shapes.

    python bench/scoring.py --out bench/results/scoring-cpu.json
    python bench/scoring.py --quick                      # the 2 s clip only
    python bench/scoring.py --device cuda --out bench/results/scoring-cuda.json

The defaults (`openai/whisper-large-v3-turbo` for the transcripts,
`microsoft/wavlm-base-plus-sv` for speaker similarity) cannot always be
downloaded, so this builds randomly initialised models with their exact
architecture configs (`WHISPER_TURBO`, `WAVLM_BASE_PLUS_SV` below, with where
each value was checked) and wraps them exactly as `autotune.scores` does: the
transformers ASR pipeline inside `Transcriber`, the x-vector model inside
`SpeakerEncoder`, fp32 on CPU, Whisper in fp16 on CUDA (as `load_asr`). The
tokenizer is the tiny scorer's offline byte-level Whisper tokenizer
(`autotune.scorers_tiny.tiny_whisper_tokenizer`), padded
with filler tokens to Whisper's real vocabulary layout (50,257 text tokens,
then end-of-text, start-of-transcript, the 100 languages, ..., the 1,501
timestamps: 51,866 ids), so the special-token ids and the output layer are
the real ones.

What is timed:
- model build (random init + pipeline; this is not the time to load a
  checkpoint from disk, which reads 1.6 GB + 0.4 GB of weights instead);
- `Transcriber.transcribe` of a 2 s, 5 s and 10 s clip, greedy, with the text's
  language forced (a Japanese text, as `asr_language` forces for kana), and of
  the 5 s clip with an English text, where the product leaves the language to
  Whisper's detection (transformers then runs the encoder once more, inside
  `detect_language`). A random decoder would run to the 448-token limit or stop
  at once, so every decode is held to exactly `--tokens` new tokens
  (min = max = 40, a realistic transcript for ~5 s of speech); the tokens
  actually generated are counted (decoder calls) and reported, with the time
  split between the encoder and the rest;
- `SpeakerEncoder.embed` of the same clips.
One warm-up of each model first, then the median of `--reps` runs (fewer when
the estimated run time would pass `--budget`; the JSON says how many ran). Each
case also keeps its fastest run and every run's process CPU time: on a shared
machine the median can carry other work's load (`note` says when the load
average was over 1.5 at the start).

`seconds_per_evaluation`: the default `samples.num_texts: 2` clips of ~5 s, each
transcribed and embedded, plus `scores.references: 3` reference clips (taken
as ~5 s) embedded once: `Scorer` caches reference embeddings, so later
evaluations skip them (`later_evaluations`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from autotune.config import DEFAULT_ASR_MODEL, DEFAULT_SPEAKER_MODEL  # noqa: E402
from autotune.llasa import SAMPLING_RATE  # noqa: E402
from autotune.scores import SpeakerEncoder, Transcriber  # noqa: E402

#: `openai/whisper-large-v3-turbo` config.json. Checked against the copies of that
#: file in huggingface.co/onnx-community/whisper-large-v3-turbo (config.json),
#: argmaxinc/whisperkit-coreml (openai_whisper-large-v3-v20240930_turbo*/config.json)
#: and fine-tunes whose `_name_or_path` is openai/whisper-large-v3-turbo
#: (JSWOOK/FINE_TUNING, avemio/German-RAG-WHISPER-LARGE-v3-TURBO-HESSIAN-AI): all agree.
WHISPER_TURBO: dict[str, Any] = dict(
    vocab_size=51866, num_mel_bins=128, d_model=1280,
    encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
    decoder_layers=4, decoder_attention_heads=20, decoder_ffn_dim=5120,
    max_source_positions=1500, max_target_positions=448, activation_function="gelu",
    scale_embedding=False, tie_word_embeddings=True,
    bos_token_id=50257, eos_token_id=50257, pad_token_id=50257, decoder_start_token_id=50258,
    begin_suppress_tokens=[220, 50257], use_cache=True,
)

#: `microsoft/wavlm-base-plus-sv`: the WavLM base(-plus) encoder plus transformers'
#: x-vector head. Encoder values: microsoft/wavlm-base-plus config.json (copies at
#: huggingface.co/Xenova/wavlm-base-plus, 0xmagical/wavelm-study), equal to
#: transformers' WavLMConfig defaults. Head: the s3prl x-vector head that
#: transformers' convert_wavlm_original_s3prl_checkpoint_to_pytorch.py maps
#: (5 TDNN layers 512,512,512,512,1500; kernels 5,3,3,1,1; dilations 1,2,3,1,1;
#: 512-d embedding, which users of the checkpoint report). use_weighted_layer_sum:
#: the checkpoint has `layer_weights` (autotune.scores checks them as part of the
#: head). num_labels 1211 (the VoxCeleb1 dev speakers: the AM-softmax objective,
#: not used for embeddings; it matches the 58.6 kB config.json of id2label/label2id).
#: The parameter count this gives (~101 M) matches the 405 MB fp32 pytorch_model.bin.
WAVLM_BASE_PLUS_SV: dict[str, Any] = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
    conv_bias=False, feat_extract_norm="group", do_stable_layer_norm=False,
    num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, num_buckets=320, max_bucket_distance=800,
    tdnn_dim=(512, 512, 512, 512, 1500), tdnn_kernel=(5, 3, 3, 1, 1), tdnn_dilation=(1, 2, 3, 1, 1),
    xvector_output_dim=512, use_weighted_layer_sum=True, num_labels=1211,
)

#: Texts per evaluation (`samples.num_texts`) and reference clips per speaker (`scores.references`).
NUM_TEXTS = 2
NUM_REFERENCES = 3
TEXT_FORCED = "今日はとても良い天気ですね、散歩に行きましょう。"  # kana: `asr_language` forces "ja"
TEXT_DETECTED = "The weather is lovely today, so let us go for a walk."  # Latin: left to detection


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _whisper_tokenizer() -> tuple[Any, list[str]]:
    """The tiny scorer's offline Whisper tokenizer (byte-level, no merges, Whisper's
    special tokens in Whisper's order), with filler text tokens so that the ids are
    Whisper's real ones: end-of-text at 50257, 51,866 tokens in all."""
    from autotune.scorers_tiny import tiny_whisper_tokenizer

    tokenizer, languages = tiny_whisper_tokenizer(text_tokens=50257)
    vocab = tokenizer.get_vocab()
    assert len(vocab) == WHISPER_TURBO["vocab_size"], len(vocab)
    assert vocab["<|endoftext|>"] == 50257 and vocab["<|notimestamps|>"] == 50364
    return tokenizer, languages


def build_asr(device: str, tokens: int) -> tuple[Transcriber, dict[str, float]]:
    """A random Whisper large-v3-turbo behind the ASR pipeline, as `load_asr` sets it up."""
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, pipeline)

    parts: dict[str, float] = {}
    started = time.perf_counter()
    tokenizer, languages = _whisper_tokenizer()
    vocab = tokenizer.get_vocab()
    parts["tokenizer"] = time.perf_counter() - started

    started = time.perf_counter()
    config = WhisperConfig(**WHISPER_TURBO)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WhisperForConditionalGeneration(config)
    eos = vocab["<|endoftext|>"]
    # The multilingual generation config a hub checkpoint ships (its ids), but every
    # decode held to exactly `tokens` new tokens.
    model.generation_config = GenerationConfig(
        decoder_start_token_id=vocab["<|startoftranscript|>"], bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        max_length=WHISPER_TURBO["max_target_positions"], begin_suppress_tokens=[vocab["\u0120"], eos],
        lang_to_id={token: vocab[token] for token in languages}, is_multilingual=True,
        task_to_id={"translate": vocab["<|translate|>"], "transcribe": vocab["<|transcribe|>"]},
        no_timestamps_token_id=vocab["<|notimestamps|>"], prev_sot_token_id=vocab["<|startofprev|>"],
        max_initial_timestamp_index=50, max_new_tokens=tokens, min_new_tokens=tokens)
    parts["model_init"] = time.perf_counter() - started

    started = time.perf_counter()
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    model = model.to(dtype=dtype).eval().to(device)
    feature_extractor = WhisperFeatureExtractor(feature_size=128)  # large-v3's: 128 mels, 30 s windows
    pipe = pipeline("automatic-speech-recognition", model=model, tokenizer=tokenizer,
                    feature_extractor=feature_extractor, device=torch.device(device), dtype=dtype)
    _sync(device)
    parts["to_device_and_pipeline"] = time.perf_counter() - started
    return Transcriber(pipe, DEFAULT_ASR_MODEL), parts


def build_speaker(device: str) -> tuple[SpeakerEncoder, dict[str, float]]:
    """A random WavLM base-plus x-vector model, as `load_speaker` sets it up (fp32 everywhere)."""
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

    parts: dict[str, float] = {}
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WavLMForXVector(WavLMConfig(**WAVLM_BASE_PLUS_SV))
    parts["model_init"] = time.perf_counter() - started
    started = time.perf_counter()
    feature_extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLING_RATE, padding_value=0.0,
                                                 do_normalize=True, return_attention_mask=True)
    encoder = SpeakerEncoder(model.to(device), feature_extractor, DEFAULT_SPEAKER_MODEL)
    _sync(device)
    parts["to_device"] = time.perf_counter() - started
    return encoder, parts


class DecodeProbe:
    """Counts decoder calls (one per generated token, plus one for language detection)
    and times the encoder, through forward hooks on the Whisper model."""

    def __init__(self, model: Any, device: str) -> None:
        self.device = device
        self.decoder_calls = 0
        self.encoder_calls = 0
        self.encoder_seconds = 0.0
        self._started = 0.0
        inner = model.model
        inner.decoder.register_forward_pre_hook(self._decoder)
        inner.encoder.register_forward_pre_hook(self._encoder_in)
        inner.encoder.register_forward_hook(self._encoder_out)

    def reset(self) -> None:
        self.decoder_calls = self.encoder_calls = 0
        self.encoder_seconds = 0.0

    def _decoder(self, module: Any, args: Any) -> None:
        self.decoder_calls += 1

    def _encoder_in(self, module: Any, args: Any) -> None:
        _sync(self.device)
        self._started = time.perf_counter()

    def _encoder_out(self, module: Any, args: Any, output: Any) -> None:
        _sync(self.device)
        self.encoder_calls += 1
        self.encoder_seconds += time.perf_counter() - self._started


def clip(seconds: float, seed: int) -> np.ndarray:
    """A speech-like 16 kHz signal: a gliding harmonic tone, syllable-rate amplitude modulation, noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLING_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4.0 * t)) ** 2
    wave = 0.1 * voiced * envelope + 0.01 * rng.standard_normal(t.size)
    return wave.astype(np.float32)


#: CPU seconds (all threads of this process) of the last `timed` call: less sensitive
#: than wall time to other work on a shared machine.
LAST_CPU_SECONDS = [0.0]


def timed(device: str, fn: Callable[[], Any]) -> float:
    _sync(device)
    started, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    LAST_CPU_SECONDS[0] = time.process_time() - cpu
    return time.perf_counter() - started


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cpu_model": _cpu_model(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "loadavg_at_start": _loadavg(),
    }
    with contextlib.suppress(OSError, ValueError):
        info["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _loadavg() -> list[float] | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--quick", action="store_true", help="the 2 s clip only (and no language-detection run)")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per case after one warm-up (median)")
    parser.add_argument("--tokens", type=int, default=40, help="new tokens every decode is held to")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds the timed ASR runs may take; fewer reps when the estimate passes it")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    device = str(args.device)
    started_all = time.perf_counter()

    info = machine(device)
    notes: list[str] = []
    load = info.get("loadavg_at_start")
    if load and load[0] > 1.5:
        notes.append(f"load average {load[0]:.2f} at start (> 1.5): the machine was busy with other work "
                     f"({info['cpu_count']} CPUs), so the CPU times may be inflated")

    asr, asr_build = build_asr(device, args.tokens)
    speaker, speaker_build = build_speaker(device)
    whisper = asr.pipe.model
    probe = DecodeProbe(whisper, device)
    params = {"asr": sum(p.numel() for p in whisper.parameters()),
              "speaker": sum(p.numel() for p in speaker.model.parameters())}

    lengths = [2.0] if args.quick else [2.0, 5.0, 10.0]
    clips = {s: clip(s, seed=i) for i, s in enumerate(lengths)}

    # Warm-up (once per model), which also estimates a run's time for the budget.
    probe.reset()
    warm_asr = timed(device, lambda: asr.transcribe(clips[lengths[0]], TEXT_FORCED))
    warm_speaker = timed(device, lambda: speaker.embed(clips[lengths[0]]))
    # The forced-language cases get the reps first; the detection case (two encoder
    # passes, so about twice a forced run) gets what the budget leaves, at least one.
    reps = max(1, args.reps)
    while reps > 1 and reps * len(lengths) * warm_asr > args.budget:
        reps -= 1
    detected_reps = 0 if args.quick else max(1, min(reps, int((args.budget - reps * len(lengths) * warm_asr)
                                                             // (2 * warm_asr))))
    cases = [(s, "forced", reps) for s in lengths] + ([(5.0, "detected", detected_reps)] if detected_reps else [])
    if reps < args.reps or (detected_reps and detected_reps < args.reps):
        notes.append(f"ASR reps cut from {args.reps} to {reps} with the language forced and to {detected_reps} "
                     f"with language detection, to fit --budget {args.budget:.0f} s (the warm-up transcription "
                     f"took {warm_asr:.1f} s); shapes unchanged")

    asr_results: list[dict[str, Any]] = []
    for seconds, kind, n in cases:
        text = TEXT_FORCED if kind == "forced" else TEXT_DETECTED
        runs, cpu, encoder, calls, encodes, transcript = [], [], [], [], [], ""
        for _ in range(n):
            probe.reset()
            holder: dict[str, str] = {}
            runs.append(timed(device, lambda: holder.setdefault("t", asr.transcribe(clips[seconds], text))))
            cpu.append(LAST_CPU_SECONDS[0])
            encoder.append(probe.encoder_seconds)
            calls.append(probe.decoder_calls)
            encodes.append(probe.encoder_calls)
            transcript = holder["t"]
        median = statistics.median(runs)
        asr_results.append({
            "clip_seconds": seconds, "language": "forced (ja)" if kind == "forced" else "detected (en text)",
            "median_seconds": median, "min_seconds": min(runs), "runs_seconds": runs, "runs_cpu_seconds": cpu,
            "encoder_seconds_median": statistics.median(encoder), "encoder_passes": max(encodes),
            "decode_and_rest_seconds_median": median - statistics.median(encoder),
            "decoder_calls": max(calls),
            "tokens_generated": max(calls) - (1 if kind == "detected" else 0),
            "transcript_chars": len(transcript),
        })

    speaker_results: list[dict[str, Any]] = []
    for seconds in lengths:
        runs, cpu = [], []
        for _ in range(max(3, reps)):
            runs.append(timed(device, lambda: speaker.embed(clips[seconds])))
            cpu.append(LAST_CPU_SECONDS[0])
        speaker_results.append({"clip_seconds": seconds, "median_seconds": statistics.median(runs),
                                "min_seconds": min(runs), "runs_seconds": runs, "runs_cpu_seconds": cpu})

    def asr_at(seconds: float, kind: str) -> float | None:
        for r in asr_results:
            if r["clip_seconds"] == seconds and r["language"].startswith(kind):
                return r["median_seconds"]
        return None

    spk_seconds = 5.0 if 5.0 in lengths else lengths[0]
    spk = next(r["median_seconds"] for r in speaker_results if r["clip_seconds"] == spk_seconds)
    per_eval: dict[str, Any] = {
        "assumes": f"{NUM_TEXTS} samples of ~{spk_seconds:g} s (transcribed + embedded) and {NUM_REFERENCES} "
                   f"reference clips of ~{spk_seconds:g} s embedded once (cached by Scorer afterwards); "
                   f"{args.tokens} tokens per transcript; model loading not included",
    }
    for kind in ("forced", "detected"):
        a = asr_at(spk_seconds, kind)
        if a is None:
            continue
        later = NUM_TEXTS * (a + spk)
        per_eval[f"language_{kind}"] = {"first_evaluation": later + NUM_REFERENCES * spk,
                                        "later_evaluations": later}
    # The same from each case's fastest run: the least disturbed by other work on the machine.
    spk_min = next(r["min_seconds"] for r in speaker_results if r["clip_seconds"] == spk_seconds)
    for kind in ("forced", "detected"):
        a = next((r["min_seconds"] for r in asr_results
                  if r["clip_seconds"] == spk_seconds and r["language"].startswith(kind)), None)
        if a is not None:
            later = NUM_TEXTS * (a + spk_min)
            per_eval[f"language_{kind}"]["from_fastest_runs"] = {
                "first_evaluation": later + NUM_REFERENCES * spk_min, "later_evaluations": later}
    headline = per_eval["language_forced"]["first_evaluation"]

    result = {
        "bench": "scoring", "device": device,
        "asr_dtype": "float16" if device.startswith("cuda") else "float32", "speaker_dtype": "float32",
        "machine": info,
        "models": {
            "asr": {"stands_for": DEFAULT_ASR_MODEL, "class": "WhisperForConditionalGeneration (random init)",
                    "parameters": params["asr"], "config": WHISPER_TURBO,
                    "feature_extractor": "WhisperFeatureExtractor(feature_size=128)",
                    "tokenizer": "scorers_tiny's byte-level WhisperTokenizer padded to the real 51,866-id layout",
                    "decode": f"greedy (num_beams=1), min_new_tokens = max_new_tokens = {args.tokens}"},
            "speaker": {"stands_for": DEFAULT_SPEAKER_MODEL, "class": "WavLMForXVector (random init)",
                        "parameters": params["speaker"],
                        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in WAVLM_BASE_PLUS_SV.items()}},
        },
        "build_seconds": {"asr": sum(asr_build.values()), "asr_parts": asr_build,
                          "speaker": sum(speaker_build.values()), "speaker_parts": speaker_build,
                          "note": "random init in memory, not a checkpoint load from disk"},
        "warmup_seconds": {"asr": warm_asr, "speaker": warm_speaker},
        "reps": {"asr_language_forced": reps, "asr_language_detected": detected_reps,
                 "speaker": max(3, reps), "warmup": 1},
        "asr_per_clip": asr_results,
        "speaker_per_clip": speaker_results,
        "seconds_per_evaluation": headline,
        "seconds_per_evaluation_detail": per_eval,
        "note": "; ".join(notes) or None,
        "loadavg_at_end": _loadavg(),
        "total_bench_seconds": time.perf_counter() - started_all,
        "command": "python bench/scoring.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    # How many cores the timed runs got: process CPU time over wall time, against the
    # threads torch uses. Other work on the machine shows here even when the load
    # average was low at the start.
    wall = [t for r in asr_results + speaker_results for t in r["runs_seconds"]]
    cpu_all = [t for r in asr_results + speaker_results for t in r["runs_cpu_seconds"]]
    if not device.startswith("cuda"):
        cores = sum(cpu_all) / sum(wall)
        result["effective_cores"] = cores
        if cores < 0.6 * torch.get_num_threads():
            notes.append(f"the timed runs got {cores:.2f} of {torch.get_num_threads()} cores on average "
                         f"(process CPU time / wall time): other work shared the CPUs, so the wall times are "
                         f"up to {torch.get_num_threads() / cores:.1f}x what an idle machine gives")
    end_load = result["loadavg_at_end"]
    if end_load and end_load[0] > 1.5:
        notes.append(f"load average {end_load[0]:.2f} at the end")
    result["note"] = "; ".join(notes) or None
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
