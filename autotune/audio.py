"""Audio in and out: read any file soundfile reads as 16 kHz mono, resample, write WAV, and
the log-mel features XCodec2's semantic encoder takes.

Only numpy and soundfile at module level: torch and transformers are imported inside the
functions that need them, so command lines that never touch audio stay cheap.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import soundfile as sf

from autotune.errors import AutotuneError
from autotune.llasa import SAMPLING_RATE

if TYPE_CHECKING:
    import torch
    from transformers.models.xcodec2.feature_extraction_xcodec2 import Xcodec2FeatureExtractor


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

    Samples outside [-1, 1] are clipped rather than wrapped around. Written beside and moved
    into place: a full disk leaves no half file (one line, `AutotuneError`).
    """
    from autotune.rundir import atomic_path

    samples = np.clip(np.asarray(wave, dtype=np.float32).reshape(-1), -1.0, 1.0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(path)) as tmp:
        sf.write(str(tmp), samples, int(sampling_rate), subtype="PCM_16", format="WAV")


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


@lru_cache(maxsize=4)
def _kaldi_filters(sampling_rate: int, num_mel_bins: int, frame_length: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Kaldi's povey window and mel filter bank, as transformers' w2v-BERT extractor builds them."""
    from transformers.audio_utils import mel_filter_bank, window_function

    fft_length = 1 << (frame_length - 1).bit_length()
    filters = mel_filter_bank(num_frequency_bins=fft_length // 2 + 1, num_mel_filters=num_mel_bins, min_frequency=20,
                              max_frequency=sampling_rate // 2, sampling_rate=sampling_rate, norm=None,
                              mel_scale="kaldi", triangularize_in_mel_space=True)
    return window_function(frame_length, "povey", periodic=False), filters, fft_length


def log_fbank(waveform: np.ndarray, *, sampling_rate: int, num_mel_bins: int, frame_length: int,
              frame_shift: int) -> np.ndarray:
    """Kaldi-compatible log mel filterbank of a 1-D waveform (already scaled to 16-bit range),
    shape (frames, num_mel_bins): transformers' `spectrogram` with the options
    `Xcodec2FeatureExtractor` uses through torchaudio (povey window, pre-emphasis 0.97, DC
    removal, no dither, snip_edges, 20 Hz to Nyquist, power spectrum), without torchaudio,
    which has no build for every torch release."""
    from transformers.audio_utils import spectrogram

    window, filters, fft_length = _kaldi_filters(sampling_rate, num_mel_bins, frame_length)
    return spectrogram(np.asarray(waveform, dtype=np.float64), window, frame_length=frame_length,
                       hop_length=frame_shift, fft_length=fft_length, power=2.0, center=False, preemphasis=0.97,
                       mel_filters=filters, log_mel="log", mel_floor=float(np.finfo(np.float32).eps),
                       remove_dc_offset=True, dtype=np.float64).T


def featurize(wave: np.ndarray, fe: Xcodec2FeatureExtractor, device: torch.device) -> dict[str, torch.Tensor]:
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
    fbank = torch.from_numpy(log_fbank(
        (centred * 2**15).numpy(),
        sampling_rate=int(fe.sampling_rate),
        num_mel_bins=int(fe.num_mel_bins),
        frame_length=int(fe.frame_length),
        frame_shift=int(fe.frame_shift),
    )).to(device=device, dtype=torch.float32)
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


def _reason(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line error messages."""
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0].strip()
    return first if len(first) <= 300 else first[:297] + "..."
