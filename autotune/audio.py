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


# One sample of Llasa holds at most this much speech (`autotune.reading.MAX_CODES` codes at 50 per
# second); nothing longer is ever decoded whole.
MAX_AUDIO_SECONDS = 2_000.0
BLOCK_FRAMES = 1 << 16   # frames per decoded block: 6 channels of float32 are 1.5 MB


class AudioDecodeError(Exception):
    """The bytes are not audio we can use: libsndfile's reason, or samples that are not finite."""


class AudioTooLong(Exception):
    """The audio decodes to more than the cap; decoding stopped there.

    Attributes:
        seconds: how much had decoded when it stopped (more than the cap).
    """

    def __init__(self, seconds: float, max_seconds: float):
        super().__init__(f"audio is longer than {max_seconds:,.1f} s")
        self.seconds = seconds
        self.max_seconds = max_seconds


def load_audio(path: str | os.PathLike[str], *, max_seconds: float = MAX_AUDIO_SECONDS) -> np.ndarray:
    """Read an audio file as float32 mono at 16 kHz.

    Any format libsndfile reads works (WAV, FLAC, OGG/Vorbis, and MP3 with
    libsndfile >= 1.1). Channels are averaged to mono and other sampling
    rates are resampled (`resample`). The file is decoded in blocks and its length is
    what decodes, whatever its header says: memory stays bounded by `max_seconds`.

    Raises:
        AutotuneError: the file is missing, cannot be decoded, holds non-finite
            samples, or decodes to more than `max_seconds`.
    """
    from autotune.files import open_regular

    path = Path(path)
    if not path.is_file():
        raise AutotuneError(f"{path}: audio file is missing")
    try:
        with open_regular(path, "audio") as handle:
            return decode_audio(handle, max_seconds=max_seconds)
    except OSError as exc:
        raise AutotuneError(f"{path}: cannot read audio ({first_line(exc)})") from exc
    except AudioDecodeError as exc:
        raise AutotuneError(f"{path}: cannot read audio ({exc})") from exc
    except AudioTooLong as exc:
        raise AutotuneError(f"{path}: {exc}: cut it shorter") from exc


def decode_audio(source: BinaryIO, *, max_seconds: float = MAX_AUDIO_SECONDS) -> np.ndarray:
    """The 16 kHz mono float32 waveform of an open audio file, decoded in blocks of
    `BLOCK_FRAMES`: each block is mixed to mono and resampled as it comes, so memory holds the
    16 kHz result and one block, never the file. The length is what decodes, not what the
    header claims.

    Raises:
        AudioDecodeError: libsndfile cannot read it, or a sample is NaN or infinite.
        AudioTooLong: more than `max_seconds` decodes (decoding stops there).
    """
    import soxr

    try:
        with sf.SoundFile(source) as audio:
            rate = int(audio.samplerate)
            if rate <= 0:
                raise AudioDecodeError(f"sampling rate {rate} Hz")
            stream = None if rate == SAMPLING_RATE else soxr.ResampleStream(rate, SAMPLING_RATE, 1, dtype="float32")
            max_frames = math.floor(max_seconds * rate)
            parts: list[np.ndarray] = []
            frames = 0
            while True:
                block = audio.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
                if not len(block):
                    break
                finite = np.isfinite(block)
                if not finite.all():
                    at = frames + int(np.argmin(finite.all(axis=1)))
                    raise AudioDecodeError(f"a sample is NaN or infinite at {at / rate:.3f} s: export the clip again")
                frames += len(block)
                if frames > max_frames:
                    raise AudioTooLong(frames / rate, max_seconds)
                # A product with equal weights averages the channels several times faster than `mean`.
                mono = block @ np.full(block.shape[1], 1 / block.shape[1], np.float32) if block.shape[1] > 1 \
                    else block[:, 0]
                parts.append(mono if stream is None else stream.resample_chunk(mono))
            if stream is not None:
                parts.append(stream.resample_chunk(np.zeros(0, np.float32), last=True))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        # soundfile reports unknown formats as LibsndfileError (a RuntimeError)
        # and some malformed headers as TypeError/ValueError.
        raise AudioDecodeError(first_line(exc)) from exc
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


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


def resample(wave: np.ndarray, orig_sr: int, target_sr: int = SAMPLING_RATE) -> np.ndarray:
    """Band-limited resampling of a mono signal (libsoxr, high quality).

    The output has `round(len(wave) * target_sr / orig_sr)` samples and output
    sample `n` sits at input time `n * orig_sr / target_sr`. Downsampling removes
    what the new rate cannot hold instead of folding it back as aliases.
    """
    import soxr

    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sampling rates must be positive, got {orig_sr} and {target_sr}")
    if orig_sr == target_sr or wave.size == 0:
        return wave.copy()
    return soxr.resample(wave, orig_sr, target_sr).astype(np.float32, copy=False)


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


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line error messages."""
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0].strip()
    return first if len(first) <= 300 else first[:297] + "..."
