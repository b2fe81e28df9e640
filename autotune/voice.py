"""The one speaking engine: a base model, its tokenizer and the codec in memory once, adapters
loaded strictly and switched with PEFT (`load_adapter` / `set_adapter`), texts checked before
they reach the model, and speech as waves or encoded files.

`synthesize.py`, the web UI (`app.py`) and the speech server (`serve.py`) all speak through a
`Voice`; none of them loads a model or calls `generate` on its own. A `Voice` serialises its
model work with a lock, so several threads (Gradio's workers, the server's batcher) may share it.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from autotune.adapters import AdapterFiles, load_strictly, read_adapter
from autotune.errors import AutotuneError
from autotune.generation import SpeechItem, Spoken, generate_batch, prompt_builder_for
from autotune.llasa import CODES_PER_SECOND, DEFAULT_CODEC, MAX_POSITIONS, SAMPLING_RATE, TINY
from autotune.rundir import path_text
from autotune.runs import RunSettings, run_settings, trained_speakers

#: No line of text longer than this can be spoken within Llasa's 2,048 positions: they hold
#: about 40 s of speech, and 2,000 characters take minutes to say in any language.
MAX_TEXT_CHARS = 2_000
#: A text must leave at least this much room to speak (1 s at 50 codes per second).
MIN_SPEECH_TOKENS = CODES_PER_SECOND
#: A voice prompt clip: long enough to carry a voice, short enough to leave room for the text.
MAX_REFERENCE_SECONDS = 30.0
MAX_REFERENCE_FILE_BYTES = 64 * 1024 * 1024
#: The tiny demo model never learned to stop: without a cap it would fill all 2,048 positions.
TINY_DEFAULT_MAX_NEW_TOKENS = 150
#: Response formats (OpenAI's names) and how each is written. pcm is OpenAI's: raw 16-bit
#: little-endian mono at 24 kHz; the others carry their rate (16 kHz, XCodec2's) in a header.
FORMATS = {"wav": "audio/wav", "flac": "audio/flac", "pcm": "audio/pcm", "mp3": "audio/mpeg", "opus": "audio/ogg"}
PCM_SAMPLING_RATE = 24_000


@dataclass
class LoadedAdapter:
    """An adapter held by the engine under a PEFT adapter name."""

    folder: Path
    peft_name: str
    normalization: str
    speakers: dict[str, float] | None
    settings: RunSettings
    signature: tuple[int, int]          # the weights file's size and mtime: a changed file loads again


@dataclass
class Speech:
    """One spoken text: the wave (16 kHz mono float32) and what generation reported."""

    text: str
    wave: np.ndarray
    spoken: Spoken
    seconds_taken: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def audio_seconds(self) -> float:
        return self.wave.size / SAMPLING_RATE

    @property
    def real_time_factor(self) -> float | None:
        """Seconds of compute per second of audio (below 1: faster than real time)."""
        return self.seconds_taken / self.audio_seconds if self.audio_seconds > 0 else None


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


def check_text(text: Any, what: str = "the text") -> str:
    """A text that can be tokenized: a non-empty string of real characters, within MAX_TEXT_CHARS."""
    if not isinstance(text, str):
        raise AutotuneError(f"{what} must be text, got {type(text).__name__}")
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        raise AutotuneError(f"{what} holds bytes that are not UTF-8 (from a terminal or file in another "
                            "encoding): pass it as UTF-8")
    if "\x00" in text:
        raise AutotuneError(f"{what} holds a NUL character: remove it")
    text = text.strip()
    if not text:
        raise AutotuneError(f"{what} is empty: give the text to speak")
    if len(text) > MAX_TEXT_CHARS:
        raise AutotuneError(f"{what} is {len(text):,} characters: Llasa's {MAX_POSITIONS:,} positions hold about "
                            f"{MAX_POSITIONS // CODES_PER_SECOND} s of speech, far less than {MAX_TEXT_CHARS:,} "
                            "characters take to say; split it into sentences (one per line)")
    return text


def check_wave(wave: np.ndarray, what: str) -> np.ndarray:
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if wave.size == 0:
        raise AutotuneError(f"{what} holds no audio: give a clip of a few seconds")
    if not np.isfinite(wave).all():
        raise AutotuneError(f"{what} holds NaN or infinite samples: the file is damaged; export it again "
                            "(16-bit PCM WAV is safest)")
    seconds = wave.size / SAMPLING_RATE
    if seconds > MAX_REFERENCE_SECONDS:
        raise AutotuneError(f"{what} is {seconds:.0f} s long: a voice prompt takes 50 positions per second of "
                            f"Llasa's {MAX_POSITIONS:,}; cut it to {MAX_REFERENCE_SECONDS:.0f} s or less "
                            "(3-10 s is usual)")
    return wave


def read_clip(path: str | os.PathLike[str], what: str = "the voice prompt clip") -> np.ndarray:
    """A voice prompt clip from a file: a regular, readable audio file of at most 30 s, finite."""
    from autotune.audio import load_audio
    from autotune.files import special_file_kind

    shown = path_text(path)
    try:
        info = os.stat(path)
    except OSError:
        raise AutotuneError(f"{what} `{shown}` does not exist: check the path") from None
    kind = special_file_kind(info.st_mode)
    if kind:
        raise AutotuneError(f"{what} `{shown}` is {kind}, not an audio file")
    if info.st_size > MAX_REFERENCE_FILE_BYTES:
        raise AutotuneError(f"{what} `{shown}` is {info.st_size / 2**20:.0f} MiB: a voice prompt is a few seconds; "
                            f"cut it to {MAX_REFERENCE_SECONDS:.0f} s or less")
    try:
        import soundfile as sf

        seconds = sf.info(str(path)).duration
    except Exception:  # noqa: BLE001 - libsndfile's reasons vary; load_audio says it in one line below
        seconds = 0.0
    if seconds > MAX_REFERENCE_SECONDS * 4:
        raise AutotuneError(f"{what} `{shown}` is {seconds:.0f} s long: cut it to {MAX_REFERENCE_SECONDS:.0f} s "
                            "or less (3-10 s is usual)")
    try:
        wave = load_audio(path)
    except AutotuneError as exc:
        raise AutotuneError(f"{what}: {exc.one_line()}: use a WAV, FLAC or OGG file") from None
    return check_wave(wave, f"{what} `{shown}`")


def encode_audio(wave: np.ndarray, response_format: str) -> bytes:
    """`wave` (16 kHz mono) as a file of `response_format` (a key of FORMATS)."""
    import soundfile as sf

    samples = np.clip(np.asarray(wave, dtype=np.float32).reshape(-1), -1.0, 1.0)
    if response_format == "pcm":
        from autotune.audio import resample

        pcm = np.clip(resample(samples, SAMPLING_RATE, PCM_SAMPLING_RATE), -1.0, 1.0)
        return (pcm * 32767.0).round().astype("<i2").tobytes()
    kinds = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"),
             "opus": ("OGG", "OPUS")}
    if response_format not in kinds:
        raise AutotuneError(f"response format `{response_format}` is not supported: use one of {', '.join(FORMATS)}")
    container, subtype = kinds[response_format]
    if samples.size == 0:
        samples = np.zeros(SAMPLING_RATE // 100, dtype=np.float32)   # an empty clip is still a valid file
    if subtype == "PCM_16":
        # Quantised once here, so WAV and FLAC (and pcm) carry the very same samples.
        samples = (samples * 32767.0).round().astype(np.int16)
    buffer = io.BytesIO()
    sf.write(buffer, samples, SAMPLING_RATE, format=container, subtype=subtype)
    return buffer.getvalue()


class Voice:
    """One base model (and tokenizer and codec) in memory; adapters loaded strictly on first use,
    at most `max_adapters` at once (the least recently used goes), switched with `set_adapter`."""

    def __init__(self, model_name: str, *, codec_id: str, device: str, precision: str = "auto",
                 trust_remote_code: bool = False, model_given: bool = False, codec_given: bool = False,
                 max_adapters: int = 8):
        from autotune.codec import load_codec
        from autotune.model import load_base_model, load_tokenizer

        started = time.perf_counter()
        self.model_name, self.codec_id, self.device = model_name, codec_id, device
        self.model_given, self.codec_given = model_given, codec_given
        self.max_adapters = max(1, int(max_adapters))
        self.lock = threading.RLock()
        self.tokenizer = load_tokenizer(model_name, trust_remote_code=trust_remote_code)
        self.model: Any = load_base_model(model_name, precision=pick_precision(precision, device),
                                          trust_remote_code=trust_remote_code, device=device)
        self.model.eval()
        self.codec = load_codec(codec_id, device=device)
        self.adapters: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._names = 0
        self.load_seconds = time.perf_counter() - started

    @classmethod
    def for_adapter(cls, adapter: str | os.PathLike[str] | None, *, model: str | None = None,
                    codec: str | None = None, device: str | None = None, precision: str = "auto",
                    trust_remote_code: bool = False, max_adapters: int = 8) -> "Voice":
        """An engine for the base model and codec `adapter`'s run recorded (or those given)."""
        files = read_adapter(adapter) if adapter is not None else None
        settings = run_settings(adapter) if adapter is not None else RunSettings()
        name = model or (files.base_model if files else None) or settings.model
        if not name:
            where = path_text(Path(adapter) / "adapter_config.json") if adapter is not None else "the command line"
            raise AutotuneError(f"`{where}` names no base model: pass `--model ID|PATH`")
        codec_id = codec or settings.codec or (TINY if name == TINY else DEFAULT_CODEC)
        return cls(name, codec_id=codec_id, device=pick_device(device), precision=precision,
                   trust_remote_code=trust_remote_code, model_given=model is not None, codec_given=codec is not None,
                   max_adapters=max_adapters)

    # -- adapters ------------------------------------------------------------------

    def adapter(self, folder: str | os.PathLike[str], files: AdapterFiles | None = None) -> LoadedAdapter:
        """The adapter in `folder`, loaded strictly on first use (and again when its file changed)."""
        path = Path(folder).expanduser()
        key = os.path.realpath(path)
        with self.lock:
            weights = path / "adapter_model.safetensors"
            try:
                stat = weights.stat()
                signature = (stat.st_size, stat.st_mtime_ns)
            except OSError:
                signature = (-1, -1)
            held = self.adapters.get(key)
            if held is not None and held.signature == signature:
                self.adapters.move_to_end(key)
                return held
            files = files or read_adapter(path)
            settings = run_settings(path)
            self._check_compatible(files, settings)
            if held is not None:
                self._drop(key)
            while len(self.adapters) >= self.max_adapters:
                self._drop(next(iter(self.adapters)))
            self._names += 1
            name = f"adapter{self._names}"
            self.model = load_strictly(self.model, files, name)
            self.model.eval()
            loaded = LoadedAdapter(folder=path, peft_name=name, settings=settings,
                                   normalization=settings.normalization_for(self.model_name),
                                   speakers=trained_speakers(path), signature=signature)
            self.adapters[key] = loaded
            return loaded

    def _check_compatible(self, files: AdapterFiles, settings: RunSettings) -> None:
        base = files.base_model or settings.model
        if base and base != self.model_name and not self.model_given:
            raise AutotuneError(f"the adapter in `{path_text(files.folder)}` was trained on `{base}`, but the base model "
                                f"in memory is `{self.model_name}`: start with `--model {base}` (one base model is "
                                "held at a time)")
        if settings.codec and settings.codec != self.codec_id and not self.codec_given:
            raise AutotuneError(f"the run of `{path_text(files.folder)}` encoded its audio with the codec "
                                f"`{settings.codec}`, but the codec in memory is `{self.codec_id}`: start with "
                                f"`--codec {settings.codec}`")

    def _drop(self, key: str) -> None:
        held = self.adapters.pop(key)
        try:
            self.model.delete_adapter(held.peft_name)
        except Exception:  # noqa: BLE001 - the active adapter cannot be deleted in some PEFT versions
            pass

    # -- checks --------------------------------------------------------------------

    def check_speaker(self, adapter: LoadedAdapter, speaker: str | None, flag: str = "--speaker") -> str | None:
        """A speaker the run trained (None when it trained one voice); one line otherwise."""
        known = adapter.speakers
        if speaker is None or not str(speaker).strip():
            if known:
                raise AutotuneError(f"the run in `{path_text(adapter.folder)}` speaks several voices: pick one with "
                                    f"`{flag}` ({_shown(list(known))})")
            return None
        if known is None:
            return speaker
        if not known:
            raise AutotuneError(f"`{flag} {speaker}`: the run in `{path_text(adapter.folder)}` was trained without "
                                "speaker names in its prompts (its data has fewer than two speakers); leave it out")
        if speaker not in known:
            import difflib

            close = difflib.get_close_matches(speaker, list(known), n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise AutotuneError(f"`{flag} {speaker}` is not a speaker of this run{hint}: it knows {_shown(list(known))}")
        return speaker

    def fits(self, adapter: LoadedAdapter, item: SpeechItem) -> int:
        """The prompt's length in tokens; one line saying how much of the text fits when it is too long."""
        builder = prompt_builder_for(self.tokenizer, adapter.normalization)
        check_text(item.text)
        from autotune.generation import item_prompt_ids

        length = len(item_prompt_ids(builder, item))
        if length + MIN_SPEECH_TOKENS <= MAX_POSITIONS:
            return length
        reference = len(item.reference_codes or ()) + (len(builder.text_ids([item.reference_text])[0])
                                                       if item.reference_text else 0)
        fitting = _longest_fitting_prefix(item.text, lambda t: len(item_prompt_ids(builder, replace(item, text=t)))
                                          + MIN_SPEECH_TOKENS <= MAX_POSITIONS)
        prompt = f" and the voice prompt's {reference:,}" if reference else ""
        if fitting == 0:
            raise AutotuneError(f"the text does not fit: the prompt{prompt} leave{'s' if not reference else ''} no room "
                                f"in Llasa's {MAX_POSITIONS:,} positions for 1 s of speech; use a shorter voice prompt")
        raise AutotuneError(f"the text is too long: with the prompt around it{prompt} it takes {length:,} of Llasa's "
                            f"{MAX_POSITIONS:,} positions, leaving no room to speak; only the first {fitting:,} of its "
                            f"{len(item.text):,} characters fit (up to \"…{item.text[max(0, fitting - 12):fitting]}\"): "
                            "split it into shorter lines")

    def reference_codes(self, wave: np.ndarray, what: str = "the voice prompt clip") -> tuple[int, ...]:
        wave = check_wave(wave, what)
        with self.lock:
            try:
                return tuple(self.codec.encode(wave))
            except AutotuneError as exc:
                raise AutotuneError(f"{what}: {exc.one_line()}") from None

    def default_max_new_tokens(self) -> int | None:
        return TINY_DEFAULT_MAX_NEW_TOKENS if self.model_name == TINY else None

    # -- speaking --------------------------------------------------------------------

    def speak(self, adapter: LoadedAdapter, items: Sequence[SpeechItem], *,
              should_stop: Callable[[], bool] | None = None,
              on_token: Callable[[int, int], None] | None = None) -> list[Speech]:
        """Speak `items` with `adapter` in one batched `generate` call; one wave per item."""
        if not items:
            return []
        cap = self.default_max_new_tokens()
        if cap is not None:
            items = [item if item.max_new_tokens is not None else replace(item, max_new_tokens=cap) for item in items]
        for item in items:
            self.fits(adapter, item)
        with self.lock:
            started = time.perf_counter()
            self.model.set_adapter(adapter.peft_name)
            spoken = generate_batch(self.model, self.tokenizer, items, text_normalization=adapter.normalization,
                                    should_stop=should_stop, on_token=on_token)
            waves = [self.codec.decode(s.codes) for s in spoken]
            seconds = time.perf_counter() - started
        # The batch's time is shared out by each row's length in tokens.
        total = sum(max(1, s.generated) for s in spoken)
        return [Speech(item.text, wave, s, seconds * max(1, s.generated) / total)
                for item, s, wave in zip(items, spoken, waves)]


def _longest_fitting_prefix(text: str, fits: Callable[[str], bool]) -> int:
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if fits(text[:middle]):
            low = middle
        else:
            high = middle - 1
    return low


def _shown(names: list[str]) -> str:
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
