"""Which checkpoint sounds best, measured: intelligibility and speaker similarity.

The seed-tts-eval protocol, on the samples `SampleCallback` writes at each evaluation:

- intelligibility: an ASR model (Whisper through transformers' ASR pipeline)
  transcribes each generated clip, and the transcript is compared with the text the
  model was asked to say (`metrics.error_rate`, both sides normalised). Texts in a
  script written without spaces between words (kana, kanji, hanzi, hangul, Thai...)
  are scored by character error rate, all others by word error rate (`metrics.uses_cer`).
- speaker similarity: the cosine between the x-vectors of the generated clip and
  of real clips of the same speaker, from a speaker-verification model.

`Scorer` loads both models lazily and never makes training fail: a model that
cannot be loaded is reported once, in one line, through the `warn` callable and its
part of the scores is None; an error on one sample is written into that sample. A hub
id goes through `loading.settle_hub` first: offline, an uncached model is refused in
seconds, without asking the hub client (which would retry for half a minute).

The text metrics live in `metrics`, the tiny random stand-ins (`tiny`) in
`scorers_tiny`. At module level only numpy and the project's light modules are
imported; torch and transformers load with the models.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autotune.audio import load_audio
from autotune.config import DEFAULT_ASR_MODEL, DEFAULT_SPEAKER_MODEL
from autotune.errors import AutotuneError
from autotune.llasa import SAMPLING_RATE
from autotune.loading import clip_words, is_cached, settle_hub
from autotune.metrics import asr_language, cosine, error_rate, uses_cer
from autotune.rundir import write_json

__all__ = ["DEFAULT_ASR_MODEL", "DEFAULT_SPEAKER_MODEL", "NONE", "SCORES_FILE", "TINY", "Scorer", "SpeakerEncoder",
           "Transcriber", "build_tiny_asr", "build_tiny_speaker", "load_asr", "load_speaker", "write_scores"]

# DEFAULT_ASR_MODEL and DEFAULT_SPEAKER_MODEL are the `scores` section's defaults (config.py):
# Whisper large-v3-turbo, large-v3's encoder with a 4-layer decoder, about as accurate as
# large-v3 (seed-tts-eval's English ASR) on Japanese and English and several times faster to
# decode, which matters at every evaluation; and WavLM base plus fine-tuned for speaker
# verification, the transformers-format relative of seed-tts-eval's WavLM-large (a raw .pth).

#: A model id meaning "the tiny random stand-in" (`scorers_tiny`): tests and offline demos.
TINY = "tiny"
#: A model id meaning "skip this part of the scores".
NONE = "none"
SCORES_FILE = "scores.json"

#: Whisper reads 30 s windows; longer clips need its long-form (timestamped) decoding.
_WHISPER_WINDOW_SAMPLES = 30 * SAMPLING_RATE


# --------------------------------------------------------------------------- models


class Transcriber:
    """An ASR pipeline plus how to call it: Whisper gets the text's language and
    greedy decoding (seed-tts-eval's `generate()` call), and its long-form mode for
    clips over 30 s."""

    def __init__(self, pipe: Any, model_id: str) -> None:
        self.pipe = pipe
        self.model_id = model_id
        generation = getattr(pipe.model, "generation_config", None)
        self.is_whisper = getattr(pipe.model.config, "model_type", None) == "whisper"
        self._languages = set(getattr(generation, "lang_to_id", None) or {}) if self.is_whisper else set()

    def transcribe(self, wave: np.ndarray, text: str | None = None) -> str:
        """The transcript of a 16 kHz mono clip; `text` (what should have been said) picks Whisper's language."""
        wave = np.asarray(wave, dtype=np.float32).reshape(-1)
        kwargs: dict[str, Any] = {}
        if self.is_whisper:
            generate: dict[str, Any] = {"num_beams": 1}
            language = asr_language(text or "")
            if language is not None and f"<|{language}|>" in self._languages:
                generate.update(language=language, task="transcribe")
            kwargs["generate_kwargs"] = generate
            if wave.size > _WHISPER_WINDOW_SAMPLES:
                kwargs["return_timestamps"] = True
        # Whisper's own generate() passes its config together with arguments, and transformers
        # warns about that inside itself: nothing for a user to act on.
        quiet = logging.getLogger("transformers.generation.utils")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            output = self.pipe({"raw": wave, "sampling_rate": SAMPLING_RATE}, **kwargs)
        finally:
            quiet.setLevel(level)
        return str(output.get("text", "")).strip()


class SpeakerEncoder:
    """A speaker-verification model (x-vector head) and its feature extractor."""

    def __init__(self, model: Any, feature_extractor: Any, model_id: str) -> None:
        self.model = model.eval()
        self.feature_extractor = feature_extractor
        self.model_id = model_id

    def embed(self, wave: np.ndarray) -> np.ndarray:
        """The x-vector of a 16 kHz mono clip, as float32."""
        import torch

        wave = np.asarray(wave, dtype=np.float32).reshape(-1)
        if wave.size < SAMPLING_RATE // 10:
            raise ValueError(f"the clip is too short for a speaker embedding ({wave.size} samples, 0.1 s needed)")
        inputs = self.feature_extractor(wave, sampling_rate=SAMPLING_RATE, return_tensors="pt")
        device = next(self.model.parameters()).device
        # One unpadded clip: the attention mask would be all ones, and passing it only
        # trips a PyTorch deprecation warning in WavLM's attention.
        values = inputs["input_values"].to(device=device, dtype=next(self.model.parameters()).dtype)
        with torch.inference_mode():
            embedding = self.model(input_values=values).embeddings[0]
        return embedding.float().cpu().numpy()


def build_tiny_asr(device: str = "cpu") -> Transcriber:
    """`scorers_tiny`'s random Whisper, wrapped as a real ASR model is: its transcripts are
    meaningless lowercase letters."""
    from autotune.scorers_tiny import tiny_whisper_pipeline

    return Transcriber(tiny_whisper_pipeline(device), TINY)


def build_tiny_speaker(device: str = "cpu") -> SpeakerEncoder:
    """`scorers_tiny`'s random WavLM x-vector model: its embeddings tell signals apart, not voices."""
    from autotune.scorers_tiny import tiny_wavlm_xvector

    model, feature_extractor = tiny_wavlm_xvector(device)
    return SpeakerEncoder(model, feature_extractor, TINY)


# --------------------------------------------------------------------------- loading


def _source(model_id: str, role: str, setting: str) -> tuple[str, bool]:
    """Where to load `model_id` from, and whether only the local cache may be used.

    Raises:
        AutotuneError: it names a folder that does not exist, or a hub id that is neither
            in the local cache nor downloadable now (decided in seconds, before transformers
            is asked: its hub client would retry for half a minute).
    """
    local = Path(model_id).expanduser()
    looks_local = model_id.startswith(("/", "./", "../", "~", ".\\", "..\\")) or local.exists()
    if looks_local:
        if not local.is_dir():
            raise AutotuneError(f"could not load the {role} `{model_id}`: no such folder; pass a folder holding "
                                f"the checkpoint, a hub id, or `--set {setting}={NONE}` to skip it")
        return str(local), True
    offline = settle_hub()
    if offline is not None and not is_cached(model_id):
        raise AutotuneError(f"the {role} `{model_id}` is not downloaded, and {offline}: `hf download {model_id}` "
                            f"once, or `--set {setting}={NONE}`")
    return model_id, offline is not None


def _load_error(model_id: str, role: str, setting: str, exc: BaseException) -> AutotuneError:
    local = Path(model_id).expanduser().exists()
    fix = ("check that the folder holds the checkpoint" if local
           else f"check the id, or download it again (`hf download {model_id}`)")
    return AutotuneError(f"could not load the {role} `{model_id}` ({clip_words(str(exc), 160) or type(exc).__name__}): "
                         f"{fix}; `--set {setting}=PATH` takes a local folder, `--set {setting}={NONE}` skips it")


#: Weights that turn a base model into the one we need; a checkpoint without them
#: (a plain WavLM or Whisper encoder-decoder) loads them at random, silently.
_ASR_HEAD = ("proj_out.", "lm_head.")
_SPEAKER_HEAD = ("projector.", "tdnn.", "feature_extractor.", "layer_weights")


def _check_head(model_id: str, info: dict[str, Any], head: tuple[str, ...], what: str, setting: str,
                default: str) -> None:
    missing = sorted(k for k in info.get("missing_keys") or [] if k.startswith(head))
    if missing:
        raise AutotuneError(f"`{model_id}` is not {what} ({len(missing)} weights of its head missing, e.g. "
                            f"`{missing[0]}`); use e.g. `--set {setting}={default}`")


def load_asr(model_id: str, device: str = "cpu") -> Transcriber:
    """The ASR model `model_id` (`tiny`, a local folder or a hub id) in transformers'
    ASR pipeline on `device` (float16 on CUDA).

    Raises:
        AutotuneError: it cannot be loaded (missing folder, not cached while offline, ...).
    """
    if model_id == TINY:
        return build_tiny_asr(device)
    role, setting = "ASR model", "scores.asr_model"
    source, local_only = _source(model_id, role, setting)
    import torch
    from transformers import AutoFeatureExtractor, AutoModelForCTC, AutoModelForSpeechSeq2Seq, AutoTokenizer, pipeline

    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    try:
        try:
            model, info = AutoModelForSpeechSeq2Seq.from_pretrained(source, dtype=dtype, local_files_only=local_only,
                                                                    output_loading_info=True)
        except ValueError:  # not an encoder-decoder: a CTC model (wav2vec2 and kin) also works in the pipeline
            model, info = AutoModelForCTC.from_pretrained(source, dtype=dtype, local_files_only=local_only,
                                                          output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        feature_extractor = AutoFeatureExtractor.from_pretrained(source, local_files_only=local_only)
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, broken folder: the user's to fix
        raise _load_error(model_id, role, setting, exc) from exc
    _check_head(model_id, info, _ASR_HEAD, "a speech-recognition checkpoint", setting, DEFAULT_ASR_MODEL)
    pipe = pipeline("automatic-speech-recognition", model=model.eval().to(device), tokenizer=tokenizer,
                    feature_extractor=feature_extractor, device=torch.device(device), dtype=dtype)
    return Transcriber(pipe, model_id)


def load_speaker(model_id: str, device: str = "cpu") -> SpeakerEncoder:
    """The speaker-verification model `model_id` (`tiny`, a folder or a hub id; an
    x-vector checkpoint such as WavLM's `*-sv`) on `device`, in float32.

    Raises:
        AutotuneError: it cannot be loaded, or it has no trained x-vector head.
    """
    if model_id == TINY:
        return build_tiny_speaker(device)
    role, setting = "speaker model", "scores.speaker_model"
    source, local_only = _source(model_id, role, setting)
    from transformers import AutoFeatureExtractor, AutoModelForAudioXVector

    try:
        model, info = AutoModelForAudioXVector.from_pretrained(source, local_files_only=local_only,
                                                               output_loading_info=True)
        feature_extractor = AutoFeatureExtractor.from_pretrained(source, local_files_only=local_only)
    except Exception as exc:  # noqa: BLE001
        raise _load_error(model_id, role, setting, exc) from exc
    _check_head(model_id, info, _SPEAKER_HEAD, "a speaker-verification (x-vector) checkpoint", setting,
                DEFAULT_SPEAKER_MODEL)
    return SpeakerEncoder(model.to(device), feature_extractor, model_id)


# --------------------------------------------------------------------------- scoring


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, AutotuneError):
        return exc.one_line()
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Scorer:
    """Scores generated samples: transcripts with error rates, and speaker similarity.

    `asr_model` and `speaker_model` are each a hub id, a local folder, `"tiny"` or
    `"none"` (that part is skipped). Models load on the first `load()` or
    `score()`, on `device` (`"cpu"`, or `"cuda"`/`"cuda:N"` when the training's
    memory plan leaves room). A model that cannot be loaded is reported once
    through `warn` and its part of every result is None. Reference clips'
    embeddings are cached by path, size and modification time.
    """

    def __init__(self, asr_model: str = DEFAULT_ASR_MODEL, speaker_model: str = DEFAULT_SPEAKER_MODEL, *,
                 device: str = "cpu", warn: Callable[[str], None] | None = None) -> None:
        device = str(device)
        if device != "cpu" and not device.startswith("cuda"):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        self.asr_model = str(asr_model)
        self.speaker_model = str(speaker_model)
        self.device = device
        self.warn = warn or (lambda message: None)
        self.asr: Transcriber | None = None
        self.speaker: SpeakerEncoder | None = None
        self.asr_error: str | None = None
        self.speaker_error: str | None = None
        #: Seconds each model took to load (None: not loaded, skipped or failed).
        self.load_seconds: dict[str, float | None] = {"asr": None, "speaker": None}
        self._tried = {"asr": False, "speaker": False}
        self._reference_cache: dict[tuple[str, int, int], np.ndarray] = {}

    # -- loading -------------------------------------------------------------

    def load(self) -> dict[str, float | None]:
        """Load both models (once; later calls return at once). Returns `load_seconds`."""
        self._load_part("asr", self.asr_model, load_asr, "transcripts and error rates")
        self._load_part("speaker", self.speaker_model, load_speaker, "speaker similarity")
        return dict(self.load_seconds)

    def _load_part(self, part: str, model_id: str, loader: Callable[[str, str], Any], what: str) -> None:
        if self._tried[part]:
            return
        self._tried[part] = True
        if model_id.strip().lower() == NONE:
            return
        started = time.perf_counter()
        try:
            loaded = loader(model_id, self.device)
        except Exception as exc:  # noqa: BLE001 - scoring must never end a training run
            message = _reason(exc)
            setattr(self, f"{part}_error", message)
            self.warn(f"scores: {message}; training goes on without {what}")
            return
        setattr(self, part, loaded)
        self.load_seconds[part] = time.perf_counter() - started

    def unavailable(self, part: str) -> str | None:
        """Why `part` ("asr" or "speaker") is off after an attempt to load it, else None
        (loaded, not tried yet, or `none` on purpose)."""
        model_id = self.asr_model if part == "asr" else self.speaker_model
        if not self._tried[part] or getattr(self, part) is not None or model_id.strip().lower() == NONE:
            return None
        return getattr(self, f"{part}_error") or f"no {part} model"

    def unload(self) -> None:
        """Drop the models (and free their GPU memory); a later `score()` does not reload them."""
        self.asr = None
        self.speaker = None
        self._reference_cache.clear()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    # -- single clips --------------------------------------------------------

    def transcribe(self, wave: np.ndarray, text: str | None = None) -> str | None:
        """The ASR transcript of a clip (None when there is no ASR model)."""
        self.load()
        return None if self.asr is None else self.asr.transcribe(wave, text)

    def speaker_embedding(self, wave: np.ndarray) -> np.ndarray | None:
        """The speaker embedding of a 16 kHz mono clip (None when there is no speaker model)."""
        self.load()
        return None if self.speaker is None else self.speaker.embed(wave)

    def _reference_embedding(self, reference: Any) -> np.ndarray:
        if isinstance(reference, (str, os.PathLike)):
            path = Path(reference)
            stat = path.stat() if path.is_file() else None
            key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns) if stat else None
            if key is not None and key in self._reference_cache:
                return self._reference_cache[key]
            embedding = self.speaker.embed(load_audio(path))
            if key is not None:
                self._reference_cache[key] = embedding
            return embedding
        return self.speaker.embed(_as_wave(reference))

    # -- a set of samples ------------------------------------------------------

    def score(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Score generated samples.

        Each sample is `{"text": str, "wav": path | 16 kHz mono array | None,
        "reference_wavs": [path | array, ...]}` (references: real clips of the
        same speaker; optional). Returns::

            {"asr_model": str, "speaker_model": str, "device": str,
             "asr_error": str | None, "speaker_error": str | None,   # why a part is off
             "load_seconds": {"asr": float | None, "speaker": float | None},
             "seconds": float,                # this call, loading included
             "samples": [{"index": int, "text": str, "wav": str | None,
                          "reference_wavs": [str | None, ...],
                          "metric": "cer" | "wer", "cer" | "wer": float | None,
                          "transcript": str | None, "similarity": float | None,
                          "error": str},      # only when something failed for this sample
                         ...],
             "mean_cer": float | None, "mean_wer": float | None,
             "mean_error_rate": float | None, # the combined view: each sample's own metric
             "mean_similarity": float | None,
             "counts": {"samples", "cer", "wer", "similarity", "failed"}}

        The similarity of a sample is the mean cosine between its embedding and
        each reference clip's. Nothing here raises for a bad sample or model.
        """
        started = time.perf_counter()
        self.load()
        records = [self._score_one(i, sample) for i, sample in enumerate(samples)]
        cer = [r["cer"] for r in records if r["metric"] == "cer" and r.get("cer") is not None]
        wer = [r["wer"] for r in records if r["metric"] == "wer" and r.get("wer") is not None]
        similarity = [r["similarity"] for r in records if r["similarity"] is not None]
        failed = [r for r in records if "error" in r]
        if failed:
            noun = "sample" if len(failed) == 1 else "samples"
            self.warn(f"scores: {len(failed)} of {len(records)} {noun} not fully scored "
                      f"(sample {failed[0]['index']}: {failed[0]['error']}); training goes on")
        return {
            "asr_model": self.asr_model, "speaker_model": self.speaker_model, "device": self.device,
            "asr_error": self.asr_error, "speaker_error": self.speaker_error,
            "load_seconds": dict(self.load_seconds),
            "seconds": time.perf_counter() - started,
            "samples": records,
            "mean_cer": _mean(cer), "mean_wer": _mean(wer), "mean_error_rate": _mean(cer + wer),
            "mean_similarity": _mean(similarity),
            "counts": {"samples": len(records), "cer": len(cer), "wer": len(wer), "similarity": len(similarity),
                       "failed": len(failed)},
        }

    def _score_one(self, index: int, sample: dict[str, Any]) -> dict[str, Any]:
        text = str(sample.get("text") or "")
        metric = "cer" if uses_cer(text) else "wer"
        wav = sample.get("wav")
        references = list(sample.get("reference_wavs") or [])
        record: dict[str, Any] = {
            "index": index, "text": text, "wav": _describe(wav),
            "reference_wavs": [_describe(r) for r in references],
            "metric": metric, metric: None, "transcript": None, "similarity": None,
        }
        errors: list[str] = []
        try:
            if wav is None:
                raise ValueError("no audio (the codec did not decode this sample)")
            wave = _as_wave(wav)
        except Exception as exc:  # noqa: BLE001 - one bad sample must not stop the others
            record["error"] = _reason(exc)
            return record
        if self.asr is not None:
            try:
                record["transcript"] = self.asr.transcribe(wave, text)
                record[metric] = error_rate(text, record["transcript"])[0]
            except Exception as exc:  # noqa: BLE001
                errors.append(f"transcript: {_reason(exc)}")
        if self.speaker is not None and references:
            try:
                generated = self.speaker.embed(wave)
                record["similarity"] = float(np.mean([cosine(generated, self._reference_embedding(r))
                                                      for r in references]))
            except Exception as exc:  # noqa: BLE001
                errors.append(f"similarity: {_reason(exc)}")
        if errors:
            record["error"] = "; ".join(errors)
        return record


def _as_wave(value: Any) -> np.ndarray:
    """A 16 kHz mono float32 array from a path (any rate, resampled) or an array (taken as 16 kHz)."""
    if isinstance(value, (str, os.PathLike)):
        return load_audio(value)
    wave = np.asarray(value, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"expected a mono waveform of shape (samples,), got shape {wave.shape}")
    if wave.size == 0:
        raise ValueError("the clip is empty")
    return wave


def _describe(value: Any) -> str | None:
    return str(value) if isinstance(value, (str, os.PathLike)) else None


# --------------------------------------------------------------------------- writing


def _relative_to(path: str | None, folder: Path) -> str | None:
    """`path` relative to `folder` when it lies in it or beside it (`../references/x.wav`), else as is."""
    if path is None:
        return None
    resolved, here = Path(path).resolve(), folder.resolve()
    for ups, base in enumerate((here, here.parent)):
        try:
            return "../" * ups + resolved.relative_to(base).as_posix()
        except ValueError:
            continue
    return path


def write_scores(folder: str | os.PathLike[str], result: dict[str, Any]) -> Path:
    """Write `result` (from `Scorer.score`) as `<folder>/scores.json`, atomically.

    Sample paths inside `folder` are written relative to it (`0.wav`), so the
    file stays right when the run folder moves. NaN and infinities become null.

    Raises:
        AutotuneError: the disk is full or read-only (`rundir.write_json`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = dict(result)
    payload["samples"] = [
        {**s, "wav": _relative_to(s.get("wav"), folder),
         "reference_wavs": [_relative_to(r, folder) for r in s.get("reference_wavs") or []]}
        for s in result.get("samples", [])
    ]
    target = folder / SCORES_FILE
    write_json(target, _finite(payload), allow_nan=False)
    return target


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
