"""The XCodec2 speech codec that Llasa speaks: audio <-> discrete codes.

Llasa does not see waveforms. Each 20 ms of 16 kHz mono audio is one code of
XCodec2's single 65,536-entry codebook, so a second of speech is 50 codes.
This module loads that codec (natively from `transformers`, never the PyPI
`xcodec2` package; strictly, and converting the original format on first
use), reads audio files into 16 kHz mono float32 arrays, and turns a list of
audio files into cached code sequences for training.

Only numpy and soundfile are imported at module level: torch, transformers and
rich are imported inside the functions that need them, so importing this module
stays cheap for command lines that never touch audio.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import soundfile as sf

from autotune.errors import AutotuneError

if TYPE_CHECKING:
    import torch
    from transformers import Xcodec2Model
    from transformers.models.xcodec2.feature_extraction_xcodec2 import Xcodec2FeatureExtractor

__all__ = [
    "CODEBOOK_SIZE",
    "CODES_PER_SECOND",
    "DEFAULT_CODEC_ID",
    "HOP_LENGTH",
    "SAMPLING_RATE",
    "TINY_CODEC",
    "Codec",
    "EncodedFiles",
    "build_tiny_codec",
    "encode_files",
    "load_audio",
    "load_codec",
    "resample",
    "write_wav",
]

#: The transformers-format XCodec2 checkpoint (the one `Xcodec2Model` docs use).
#: `HKUSTAudio/xcodec2`, the original-format repo, is converted on first use.
DEFAULT_CODEC_ID = "HKUSTAudio/xcodec2-hf"
#: Pass this as the codec id to get the tiny random offline codec.
TINY_CODEC = "tiny"

SAMPLING_RATE = 16_000
HOP_LENGTH = 320
CODES_PER_SECOND = SAMPLING_RATE // HOP_LENGTH
CODEBOOK_SIZE = 4**8

# --------------------------------------------------------------------------- audio I/O


def load_audio(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an audio file as float32 mono at 16 kHz.

    Any format libsndfile reads works (WAV, FLAC, OGG/Vorbis, and MP3 with
    libsndfile >= 1.1). Channels are averaged to mono and other sampling
    rates are resampled with `resample`.

    Raises:
        AutotuneError: the file is missing or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise AutotuneError(f"{path}: audio file is missing")
    try:
        with path.open("rb") as handle:
            return _decode_audio(handle)
    except OSError as exc:
        raise AutotuneError(f"{path}: cannot read audio ({_reason(exc)})") from exc
    except _AudioDecodeError as exc:
        raise AutotuneError(f"{path}: cannot read audio ({exc})") from exc


class _AudioDecodeError(Exception):
    """libsndfile could not decode the bytes; the message is libsndfile's reason."""


def _decode_audio(source: BinaryIO) -> np.ndarray:
    try:
        data, sampling_rate = sf.read(source, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        # soundfile reports unknown formats as LibsndfileError (a RuntimeError)
        # and some malformed headers as TypeError/ValueError.
        raise _AudioDecodeError(_reason(exc)) from exc
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    return resample(mono, int(sampling_rate), SAMPLING_RATE)


def write_wav(path: str | os.PathLike[str], wave: np.ndarray, sampling_rate: int = SAMPLING_RATE) -> None:
    """Write a mono waveform (floats in [-1, 1]) as a 16-bit PCM WAV file.

    Samples outside [-1, 1] are clipped rather than wrapped around.
    """
    samples = np.clip(np.asarray(wave, dtype=np.float32).reshape(-1), -1.0, 1.0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), samples, int(sampling_rate), subtype="PCM_16", format="WAV")


def resample(
    wave: np.ndarray,
    orig_sr: int,
    target_sr: int = SAMPLING_RATE,
    *,
    zero_crossings: int = 24,
    rolloff: float = 0.94,
    kaiser_beta: float = 8.6,
) -> np.ndarray:
    """Band-limited resampling of a mono signal with a Kaiser-windowed sinc.

    The output has `round(len(wave) * target_sr / orig_sr)` samples (halves
    rounded up) and output sample `n` sits at input time
    `n * orig_sr / target_sr`. The low-pass cutoff is `rolloff` times the
    lower of the two Nyquist frequencies, so downsampling removes what the new
    rate cannot hold instead of folding it back as aliases. The signal is
    taken as zero outside its ends.
    """
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sampling rates must be positive, got {orig_sr} and {target_sr}")
    if orig_sr == target_sr or wave.size == 0:
        return wave.copy()

    # The rate ratio up/down is exact, so output times repeat every `up` outputs:
    # one filter per phase, computed once.
    g = math.gcd(orig_sr, target_sr)
    up, down = target_sr // g, orig_sr // g
    n_in = wave.size
    n_out = (n_in * up + down // 2) // down
    if n_out == 0:
        return np.zeros(0, dtype=np.float32)

    # Cutoff in cycles per input sample.
    cutoff = 0.5 * rolloff * min(1.0, up / down)
    half_width = int(math.ceil(zero_crossings / (2.0 * cutoff)))
    offsets = np.arange(-half_width + 1, half_width + 1)  # taps relative to floor(t)
    phases = np.arange(up) / up  # fractional part of t for each phase
    tau = phases[:, None] - offsets[None, :]  # t - k, shape (up, taps)
    window = np.i0(kaiser_beta * np.sqrt(np.clip(1.0 - (tau / half_width) ** 2, 0.0, None))) / np.i0(kaiser_beta)
    taps = 2.0 * cutoff * np.sinc(2.0 * cutoff * tau) * window
    # Unit gain at DC for every phase, so a constant stays exactly constant.
    taps /= taps.sum(axis=1, keepdims=True)
    taps = taps.astype(np.float32)

    padded = np.concatenate([np.zeros(half_width, np.float32), wave, np.zeros(half_width + 1, np.float32)])
    out = np.empty(n_out, dtype=np.float32)
    chunk = max(1, (1 << 22) // taps.shape[1])  # bounds the gather matrix to ~16 MB
    for start in range(0, n_out, chunk):
        n = np.arange(start, min(n_out, start + chunk), dtype=np.int64)
        base = (n * down) // up
        phase = (n * down) % up
        idx = base[:, None] + offsets[None, :] + half_width
        out[start : start + n.size] = np.einsum("ij,ij->i", padded[idx], taps[phase])
    return out


# --------------------------------------------------------------------------- features


def _kaldi_log_fbank(
    waveform: torch.Tensor, *, sampling_rate: int, num_mel_bins: int, frame_length: int, frame_shift: int
) -> torch.Tensor:
    """Kaldi-compatible log mel filterbank of a 1-D waveform, shape (frames, num_mel_bins).

    A port of `torchaudio.compliance.kaldi.fbank` with the options that
    `Xcodec2FeatureExtractor` uses (povey window, pre-emphasis 0.97, DC
    removal, no dither, snip_edges, low_freq 20 Hz, high_freq Nyquist, power
    spectrum). transformers' extractor needs torchaudio, which has no build for
    every torch release; this keeps the codec working on plain torch.
    """
    import torch

    dtype, device = waveform.dtype, waveform.device
    eps = torch.tensor(torch.finfo(torch.float32).eps, dtype=dtype, device=device)
    fft_size = 1 << (frame_length - 1).bit_length()

    frames = waveform.unfold(0, frame_length, frame_shift)
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - 0.97 * previous
    window = torch.hann_window(frame_length, periodic=False, dtype=dtype, device=device).pow(0.85)
    frames = torch.nn.functional.pad(frames * window, (0, fft_size - frame_length))
    power = torch.fft.rfft(frames).abs().pow(2.0)

    def mel(freq: torch.Tensor | float) -> Any:
        if isinstance(freq, torch.Tensor):
            return 1127.0 * (1.0 + freq / 700.0).log()
        return 1127.0 * math.log(1.0 + freq / 700.0)

    low_mel, high_mel = mel(20.0), mel(sampling_rate / 2)
    delta = (high_mel - low_mel) / (num_mel_bins + 1)
    bins = torch.arange(num_mel_bins).unsqueeze(1)
    left, center, right = (low_mel + (bins + k) * delta for k in (0.0, 1.0, 2.0))
    fft_mel = mel(sampling_rate / fft_size * torch.arange(fft_size // 2)).unsqueeze(0)
    banks = torch.clamp(torch.min((fft_mel - left) / (center - left), (right - fft_mel) / (right - center)), min=0.0)
    banks = torch.nn.functional.pad(banks, (0, 1)).to(dtype=dtype, device=device)
    return torch.max(power @ banks.T, eps).log()


def _featurize(wave: np.ndarray, fe: Xcodec2FeatureExtractor, device: torch.device) -> dict[str, torch.Tensor]:
    """The model inputs `Xcodec2FeatureExtractor` makes for one unpadded clip.

    Mirrors transformers' extractor step for step (one zero appended, padding
    to whole hops, log fbank of the hop-centred audio normalised per clip, two
    frames stacked per code) without its torchaudio dependency.
    """
    import torch

    hop = int(fe.hop_length)
    audio = torch.nn.functional.pad(torch.as_tensor(wave, dtype=torch.float32), (0, 1))
    valid = audio.shape[0]
    padded_len = -(-valid // hop) * hop
    audio = torch.nn.functional.pad(audio, (0, padded_len - valid))
    padding_mask = torch.zeros(1, padded_len, dtype=torch.int32)
    padding_mask[0, :valid] = 1

    centred = torch.nn.functional.pad(audio, (hop // 2, hop // 2))
    fbank = _kaldi_log_fbank(
        (centred * 2**15).to(device),
        sampling_rate=int(fe.sampling_rate),
        num_mel_bins=int(fe.num_mel_bins),
        frame_length=int(fe.frame_length),
        frame_shift=int(fe.frame_shift),
    )
    fbank = (fbank - fbank.mean(0)) / torch.sqrt(fbank.var(0, unbiased=True) + 1e-7)
    stride = int(fe.stride)
    usable = fbank.shape[0] - fbank.shape[0] % stride
    features = fbank[:usable].reshape(1, usable // stride, fbank.shape[1] * stride)
    return {
        "input_values": audio.view(1, 1, -1).to(device),
        "padding_mask": padding_mask.to(device),
        "input_features": features,
        "input_features_mask": torch.ones(1, features.shape[1], dtype=torch.int32, device=device),
    }


# --------------------------------------------------------------------------- the codec


class Codec:
    """An XCodec2 model and its feature extractor, on one device.

    `encode` and `decode` run under `torch.inference_mode()` and take and give
    numpy arrays, so callers never handle tensors.
    """

    def __init__(
        self,
        model: Xcodec2Model,
        feature_extractor: Xcodec2FeatureExtractor,
        codec_id: str,
        device: str | torch.device = "cpu",
    ) -> None:
        import torch

        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.feature_extractor = feature_extractor
        #: Identifies the weights for cache keys: codes from different codecs never mix.
        self.codec_id = codec_id
        self.sampling_rate: int = int(model.config.sampling_rate)
        self.hop_length: int = int(model.config.hop_length)
        self.codes_per_second: int = self.sampling_rate // self.hop_length
        self.codebook_size: int = int(np.prod(model.config.quantization_levels))

    def __repr__(self) -> str:
        return f"Codec({self.codec_id!r}, device={str(self.device)!r})"

    def num_codes(self, num_samples: int) -> int:
        """How many codes `encode` returns for `num_samples` samples: `(num_samples + 1) // 320`.

        The model appends one zero sample, pads up to whole 320-sample frames
        and flags a last, partly padded frame as invalid in its
        `audio_codes_mask`; `encode` keeps only the valid frames. So whole
        seconds give exactly 50 codes per second and a decoded clip is never
        longer than its source. (The original, non-transformers XCodec2 code
        kept one more, trailing code: `num_samples // 320 + 1`.)
        """
        return (int(num_samples) + 1) // self.hop_length

    def encode(self, wave: np.ndarray) -> list[int]:
        """Codes (each in 0..65535) of a float32 mono 16 kHz waveform; see `num_codes` for the count.

        Raises:
            AutotuneError: the clip is shorter than one code (20 ms).
        """
        import torch

        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim != 1:
            raise ValueError(f"expected a mono waveform of shape (samples,), got shape {wave.shape}")
        count = self.num_codes(wave.size)
        if count == 0:
            raise AutotuneError(
                f"audio is too short to encode ({wave.size} samples; at least {self.hop_length - 1} "
                f"samples, {1000 // self.codes_per_second} ms at {self.sampling_rate} Hz, are needed)"
            )
        with torch.inference_mode():
            inputs = _featurize(wave, self.feature_extractor, self.device)
            output = self.model.encode(**inputs, return_dict=True)
        codes = output.audio_codes[0, 0]
        if output.audio_codes_mask is not None:
            codes = codes[output.audio_codes_mask[0].bool()]
        # The model's mask and our count are the same rule; trust the model if they ever differ.
        return [int(c) for c in codes.cpu().tolist()]

    def decode(self, codes: Sequence[int] | np.ndarray) -> np.ndarray:
        """A float32 mono waveform at 16 kHz, exactly `len(codes) * 320` samples long."""
        import torch

        array = np.asarray(codes)
        if array.ndim != 1:
            raise ValueError(f"expected a flat sequence of codes, got shape {array.shape}")
        if array.size == 0:
            return np.zeros(0, dtype=np.float32)
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"codes must be integers, got dtype {array.dtype}")
        if array.min() < 0 or array.max() >= self.codebook_size:
            raise ValueError(f"codes must lie in 0..{self.codebook_size - 1}, got {array.min()}..{array.max()}")
        with torch.inference_mode():
            tensor = torch.as_tensor(array, dtype=torch.long, device=self.device).view(1, 1, -1)
            audio = self.model.decode(audio_codes=tensor, return_dict=True).audio_values
        return audio[0, 0].float().cpu().numpy().astype(np.float32, copy=False)


def _tiny_config() -> Any:
    from transformers import Wav2Vec2BertConfig, Xcodec2Config

    semantic = Wav2Vec2BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        output_hidden_size=32,
        conv_depthwise_kernel_size=3,
    )
    return Xcodec2Config(
        hidden_size=32,  # GroupNorm in the decoder needs a multiple of 32
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        encoder_hidden_size=2,
        semantic_model_config=semantic,
        quantization_dim=32 + 32,  # fc_encoder's output: hidden_size + semantic hidden_size
        downsampling_ratios=[2, 2, 4, 4, 5],  # hop 320: 50 codes per second at 16 kHz
        quantization_levels=[4] * 8,  # 4**8 = 65,536 codes, as in the real codec
        sampling_rate=SAMPLING_RATE,
    )


def build_tiny_codec(device: str | torch.device = "cpu") -> Codec:
    """A tiny XCodec2 with random weights, for tests and offline dry runs.

    It has the real codec's interface, rate and codebook (16 kHz, 320-sample
    hop so 50 codes per second, 65,536 codes) but ~190k parameters, so it
    builds in well under a second and encodes faster than real time on one
    CPU core. Its codes mean nothing and its decoded audio is noise: use it
    to exercise the pipeline, never to judge quality.

    The weights come from seed 0 inside `torch.random.fork_rng()`, so every
    build is identical and the caller's random state is untouched. Its
    `codec_id` carries a hash of the weights, so caches notice if another
    torch/transformers version initialises it differently.
    """
    import torch
    from transformers import Xcodec2Model
    from transformers.models.xcodec2.feature_extraction_xcodec2 import Xcodec2FeatureExtractor

    config = _tiny_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Xcodec2Model(config)
        _reinit_tiny_weights(model)
    feature_extractor = Xcodec2FeatureExtractor(sampling_rate=config.sampling_rate, hop_length=config.hop_length)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return Codec(model, feature_extractor, f"{TINY_CODEC}-{digest.hexdigest()[:16]}", device)


def _reinit_tiny_weights(model: Xcodec2Model) -> None:
    """Re-initialise the tiny model so that different audio gives different codes.

    transformers' 0.02-std initialisation shrinks the signal to ~1e-7 through
    the acoustic encoder's many layers, and every frame then lands on the same
    code, which would let tests pass without the audio reaching the codes at
    all. PyTorch's fan-in initialisation keeps activations near unit scale,
    and a fixed gain on the quantizer's input projection spreads the frames
    over the codebook (about 80 distinct codes in 100 frames of a chirp).
    """
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)):
                module.reset_parameters()
        model.quantizer.project_in.weight.mul_(20.0)
        model.quantizer.project_in.bias.zero_()


def load_codec(codec_id: str, device: str = "cpu") -> Codec:
    """Load the codec named `codec_id` onto `device`.

    `codec_id` is `"tiny"` (see `build_tiny_codec`), a local folder, or a
    Hugging Face Hub id such as `DEFAULT_CODEC_ID`. A hub id is taken from the
    local hub cache when it is there; otherwise it is downloaded, unless
    `HF_HUB_OFFLINE` is set or the hub does not answer within a few seconds
    (then one error says how to get it). The checkpoint may be in transformers'
    format (`HKUSTAudio/xcodec2-hf`) or X-Codec-2.0's original one
    (`HKUSTAudio/xcodec2`), which is converted once and cached (see
    `autotune.xcodec2_convert`). Either way the weights load strictly: a
    checkpoint whose weight names do not all match is an error, never a codec
    with random parts.

    Raises:
        AutotuneError: the checkpoint cannot be found or loaded, does not match
            `Xcodec2Model`, or is not a 16 kHz / 50 codes-per-second codec as
            Llasa needs.
    """
    if codec_id == TINY_CODEC:
        return build_tiny_codec(device)

    from autotune.xcodec2_convert import converted_folder, locate, original_weights_file

    folder, key = locate(codec_id, weights=True)
    from transformers import Xcodec2Model
    from transformers.models.xcodec2.feature_extraction_xcodec2 import Xcodec2FeatureExtractor

    from autotune.model import strict_from_pretrained

    source = converted_folder(folder, key, label=codec_id) if original_weights_file(folder) else folder
    try:
        model = strict_from_pretrained(Xcodec2Model, str(source), label=codec_id, fix=_STRICT_FIX)
    except AutotuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here is reported as the user's to fix
        raise AutotuneError(f"could not load the codec `{codec_id}` ({_reason(exc)}): check that the folder "
                            f"holds {_FOLDER_HINT}") from exc
    try:
        feature_extractor = Xcodec2FeatureExtractor.from_pretrained(str(source))
    except Exception:  # noqa: BLE001
        # The extractor has no weights, only settings; the model's rate and hop are the ones that matter.
        feature_extractor = Xcodec2FeatureExtractor(
            sampling_rate=model.config.sampling_rate, hop_length=model.config.hop_length
        )
    config = model.config
    if config.sampling_rate != SAMPLING_RATE or config.hop_length != HOP_LENGTH:
        raise AutotuneError(
            f"the codec `{codec_id}` runs at {config.sampling_rate} Hz with a hop of {config.hop_length} samples; "
            f"Llasa needs XCodec2 at {SAMPLING_RATE} Hz with a hop of {HOP_LENGTH} (use `{DEFAULT_CODEC_ID}`)"
        )
    if int(feature_extractor.hop_length) != config.hop_length:
        feature_extractor.hop_length = config.hop_length
    return Codec(model, feature_extractor, key, device)


_FOLDER_HINT = (
    "an XCodec2 checkpoint: transformers' format (config.json and model.safetensors, e.g. a download of "
    f"`{DEFAULT_CODEC_ID}`) or the original one (`HKUSTAudio/xcodec2`), or use `--codec {TINY_CODEC}` for an "
    "offline test"
)
_STRICT_FIX = (
    f"download it again (`hf download {DEFAULT_CODEC_ID}`) and pass that, or the original `HKUSTAudio/xcodec2` "
    f"(converted automatically); `--codec {TINY_CODEC}` runs an offline test"
)


class CodecLoadError(AutotuneError):
    """The codec itself could not be loaded (raised once, not once per audio file)."""


class DeferredCodec:
    """Stands in for `load_codec(codec_id)` until audio has to be encoded.

    The cache key (`codec_id`) comes from the checkpoint's files or hub commit
    alone, so when every file's codes are already cached the weights (about a
    gigabyte, and a download or GPU memory) are never loaded, and an
    original-format checkpoint is never converted.
    """

    def __init__(self, codec_id: str, device: str = "cpu") -> None:
        self._name, self._device = codec_id, device
        self._codec: Codec | None = None
        self.codec_id = _cache_id_without_weights(codec_id)

    @property
    def loaded(self) -> bool:
        return self._codec is not None

    def load(self) -> Codec:
        if self._codec is None:
            try:
                self._codec = load_codec(self._name, self._device)
            except AutotuneError as exc:
                # About the codec, not the file being encoded: `encode_files` stops at once,
                # before anything is written to the cache.
                raise CodecLoadError(str(exc), details=exc.details) from exc
            # The same rule as the key above; should a hub commit move in between,
            # encode under the key of the weights actually used.
            self.codec_id = self._codec.codec_id
        return self._codec

    def encode(self, wave: np.ndarray) -> list[int]:
        return self.load().encode(wave)


def _cache_id_without_weights(codec_id: str) -> str:
    """`load_codec(codec_id).codec_id`, reading only names, sizes, dates or the hub's
    config; the tiny codec is built (it is small). A missing folder or an unreachable
    hub id is the same one-line error `load_codec` gives."""
    if codec_id == TINY_CODEC:
        return build_tiny_codec().codec_id
    from autotune.xcodec2_convert import locate

    return locate(codec_id, weights=False)[1]


# --------------------------------------------------------------------------- batch encoding


class EncodedFiles(dict[Path, list[int]]):
    """`encode_files`' result: path -> codes, plus how the codes were obtained.

    Attributes:
        encoded: files run through the codec in this call.
        from_cache: files whose codes were read from the cache.
        warnings: one line per cache problem met (invalid entries, a cache that
            cannot be written); encoding went on regardless.
    """

    def __init__(self) -> None:
        super().__init__()
        self.encoded = 0
        self.from_cache = 0
        self.warnings: list[str] = []


class _CacheUse:
    """What went wrong with the cache during one `encode_files` call, for its warnings."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.invalid: list[str] = []  # "entry: why", re-encoded
        self.unwritten = 0
        self.write_error: str | None = None
        self.writable = True

    def warnings(self) -> list[str]:
        out = []
        if self.invalid:
            many = len(self.invalid) > 1
            out.append(f"{len(self.invalid)} codec cache entr{'ies' if many else 'y'} in `{self.folder}` "
                       f"{'were' if many else 'was'} invalid and encoded again ({'e.g. ' if many else ''}"
                       f"{self.invalid[0]})")
        if self.unwritten:
            out.append(f"could not write to the codec cache `{self.folder}` ({self.write_error}): "
                       f"{self.unwritten} file{'s' if self.unwritten != 1 else ''} encoded but not cached, so "
                       "encoded again next run; make the folder writable, free disk space, or use another "
                       "`--output-dir`")
        return out


def encode_files(
    paths: Sequence[str | os.PathLike[str]],
    codec: Codec,
    cache_dir: str | os.PathLike[str],
    progress: bool = True,
) -> EncodedFiles:
    """Encode audio files to codes, caching each file's codes as JSON in `cache_dir`.

    A file's cache key is the sha256 of its bytes together with
    `codec.codec_id`, so a second run encodes nothing, an edited file is
    encoded again, and codes of different codecs never mix. Cache files are
    written atomically (temporary file, then `os.replace`), so an interrupted
    run leaves no half-written entry. Keys of the result are the paths as
    given (as `Path`); the result's `encoded` and `from_cache` attributes
    count the two ways codes were obtained.

    The cache is a convenience, never a reason to fail: an entry that is not
    valid (see `_cache_problem`) is encoded again, and a cache that cannot be
    written (read-only, full disk, an entry path taken by a folder) is
    bypassed. Either way one warning line per kind goes to stderr and into the
    result's `warnings`.

    Every file is tried before any error is raised, and what did succeed is
    cached, so fixing the listed files and running again only encodes those.
    A codec that fails to load (`CodecLoadError`) stops everything at once,
    before anything is written.

    Raises:
        AutotuneError: one or more files are missing, unreadable or too short;
            its `details` hold one "path: what is wrong" per file.
    """
    from rich.progress import Progress

    cache = _CacheUse(Path(cache_dir))
    try:
        cache.folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        cache.writable, cache.write_error = False, exc.strerror or _reason(exc)
    result = EncodedFiles()
    problems: list[str] = []
    unique = list(dict.fromkeys(Path(p) for p in paths))

    with Progress(*_progress_columns(), disable=not progress, transient=False) as bar:
        task = bar.add_task("encoding audio", total=len(unique), encoded=0, encode_seconds=0.0)
        for path in unique:
            started = time.monotonic()
            try:
                codes, was_cached = _encode_one(path, codec, cache)
            except CodecLoadError:
                raise
            except AutotuneError as exc:
                problems.append(str(exc))  # already "path: what is wrong"
            else:
                result[path] = codes
                if was_cached:
                    result.from_cache += 1
                else:
                    result.encoded += 1
                    fields = bar.tasks[task].fields
                    bar.update(task, encoded=fields["encoded"] + 1,
                               encode_seconds=fields["encode_seconds"] + time.monotonic() - started)
            bar.advance(task)

    result.warnings = cache.warnings()
    for line in result.warnings:
        sys.stderr.write(f"warning: {line}\n")
    if problems:
        noun = "file" if len(problems) == 1 else "files"
        raise AutotuneError(
            f"{len(problems)} of {len(unique)} audio {noun} could not be encoded; "
            "fix or remove them from the data set and run again",
            details=problems,
        )
    return result


def _progress_columns() -> tuple[Any, ...]:
    """Bar, count, elapsed time and an ETA that shows from the first encoded file on.

    rich's own TimeRemainingColumn waits for a speed estimate over several
    updates, and cached files (done at once) would make its rate meaningless;
    this one divides the time spent encoding by the files encoded so far.
    """
    from datetime import timedelta

    from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class EncodeEtaColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            encoded, seconds = task.fields.get("encoded", 0), task.fields.get("encode_seconds", 0.0)
            if task.finished or not encoded:
                return Text("")
            left = timedelta(seconds=round(seconds / encoded * (task.remaining or 0)))
            return Text(f"about {left} left, {encoded / max(seconds, 1e-9):.1f} files/s", style="progress.remaining")

    return (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        EncodeEtaColumn(),
    )


def _encode_one(path: Path, codec: Codec, cache: _CacheUse) -> tuple[list[int], bool]:
    """Codes of one file and whether they came from the cache."""
    if not path.is_file():
        raise AutotuneError(f"{path}: audio file is missing")
    try:
        # One read serves both the hash and the decoding, so they see the same bytes.
        data = path.read_bytes()
    except OSError as exc:
        raise AutotuneError(f"{path}: cannot read audio ({_reason(exc)})") from exc

    audio_hash = hashlib.sha256(data).hexdigest()
    key = hashlib.sha256(f"{codec.codec_id}\0{audio_hash}".encode()).hexdigest()
    entry = cache.folder / f"{key}.json"
    cached, problem = _read_cache(entry, codec.codec_id, audio_hash)
    if cached is not None:
        return cached, True
    if problem:
        cache.invalid.append(f"`{entry.name}` for {path}: {problem}")

    try:
        wave = _decode_audio(io.BytesIO(data))
    except _AudioDecodeError as exc:
        raise AutotuneError(f"{path}: cannot read audio ({exc})") from exc
    try:
        codes = codec.encode(wave)
    except CodecLoadError:
        raise
    except AutotuneError as exc:
        raise AutotuneError(f"{path}: {exc}") from exc
    if cache.writable:
        payload = {"codec_id": codec.codec_id, "audio_sha256": audio_hash, "num_samples": int(wave.size),
                   "codes": codes}
        try:
            _write_json_atomic(entry, payload)
        except OSError as exc:
            cache.unwritten += 1
            cache.write_error = cache.write_error or exc.strerror or _reason(exc)
            # A folder squatting on one entry's name spoils that entry only; anything
            # else (read-only, disk full) would fail the same way for every file.
            cache.writable = isinstance(exc, IsADirectoryError)
    else:
        cache.unwritten += 1
    return codes, False


def _read_cache(entry: Path, codec_id: str, audio_hash: str) -> tuple[list[int] | None, str | None]:
    """The cached codes, else None and why the entry is unusable (None when there is no entry)."""
    try:
        text = entry.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):  # no entry (or no cache folder) yet
        return None, None
    except IsADirectoryError:
        return None, "a folder, not a file"
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"unreadable ({getattr(exc, 'strerror', None) or _reason(exc)})"
    try:
        payload = json.loads(text)
    except ValueError:
        return None, "not valid JSON"
    problem = _cache_problem(payload, codec_id, audio_hash)
    return (None, problem) if problem else (payload["codes"], None)


def _cache_problem(payload: Any, codec_id: str, audio_hash: str) -> str | None:
    """Why a parsed cache entry cannot be trusted, or None when it can.

    The codes must be a non-empty list of ints in 0..65535 whose length is
    `Codec.num_codes(num_samples)`, i.e. `(num_samples + 1) // 320`.
    """
    if not isinstance(payload, dict):
        return "not a JSON object"
    if payload.get("codec_id") != codec_id or payload.get("audio_sha256") != audio_hash:
        return "written for another codec or audio"
    codes, num_samples = payload.get("codes"), payload.get("num_samples")
    if not isinstance(codes, list) or not codes:
        return "no list of codes"
    if not all(type(c) is int for c in codes):  # bools and floats are not codes
        return "codes that are not integers"
    out_of_range = next((c for c in codes if not 0 <= c < CODEBOOK_SIZE), None)
    if out_of_range is not None:
        return f"code {out_of_range} outside 0..{CODEBOOK_SIZE - 1}"
    if type(num_samples) is not int or num_samples < 0:
        return "no valid `num_samples`"
    expected = (num_samples + 1) // HOP_LENGTH
    if len(codes) != expected:
        return f"{len(codes)} codes for {num_samples} samples, not {expected}"
    return None


def _write_json_atomic(target: Path, payload: dict[str, Any]) -> None:
    """Write JSON to `target` via a temporary file; on any failure the temporary file is removed."""
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, separators=(",", ":"))
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


def _reason(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line error messages."""
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0].strip()
    return first if len(first) <= 300 else first[:297] + "..."
