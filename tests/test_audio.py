"""autotune.audio: resampling through libsoxr and decoding in bounded blocks.

Speed is bench material, not a test here; these check what the samples are.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from autotune.audio import BLOCK_FRAMES, AudioTooLong, decode_audio, load_audio, resample  # noqa: E402
from autotune.errors import AutotuneError  # noqa: E402

SR = 16_000


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def test_resampling_44k_to_16k_keeps_1_khz_and_removes_9_khz():
    sr = 44_100
    t = np.arange(3 * sr) / sr
    kept = resample(np.sin(2 * np.pi * 1_000 * t).astype(np.float32), sr, SR)
    removed = resample(np.sin(2 * np.pi * 9_000 * t).astype(np.float32), sr, SR)
    assert kept.size == removed.size == 3 * SR
    inner = slice(800, -800)
    expected = np.sin(2 * np.pi * 1_000 * np.arange(kept.size) / SR)
    assert np.abs(kept[inner] - expected[inner]).max() < 1e-3   # a 1 kHz tone passes unchanged
    # 9 kHz is above 16 kHz's Nyquist (8 kHz): without the low-pass it would fold back to 7 kHz at rms 0.707.
    assert rms(removed[inner]) < 1e-3


def test_the_same_rate_is_a_copy():
    x = np.linspace(-1, 1, 101, dtype=np.float32)
    y = resample(x, SR, SR)
    assert np.array_equal(y, x) and y is not x


def test_decoding_in_blocks_equals_resampling_the_whole_clip(tmp_path):
    """Blocks are resampled as they come (soxr's stream): the result is the one-shot one, so
    block boundaries leave no trace, and stereo is the average of its channels."""
    sr = 22_050
    n = 3 * BLOCK_FRAMES + 1_234
    rng = np.random.default_rng(0)
    stereo = (0.2 * rng.standard_normal((n, 2))).astype(np.float32)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, sr, subtype="FLOAT")
    decoded = load_audio(path)
    whole = resample(stereo.mean(axis=1), sr, SR)
    assert decoded.shape == whole.shape == (round(n * SR / sr),)
    assert np.abs(decoded - whole).max() < 1e-6


def test_decoding_stops_at_the_cap(tmp_path):
    path = tmp_path / "ten.wav"
    sf.write(path, np.zeros(10 * SR, np.float32), SR)
    assert load_audio(path, max_seconds=10).size == 10 * SR
    with path.open("rb") as handle, pytest.raises(AudioTooLong) as info:
        decode_audio(handle, max_seconds=2.5)
    assert 2.5 < info.value.seconds <= 2.5 + BLOCK_FRAMES / SR   # one block past the cap at most
    with pytest.raises(AutotuneError, match=r"^.*ten\.wav: audio is longer than 2\.5 s: cut it shorter$"):
        load_audio(path, max_seconds=2.5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_sample_is_an_error_naming_when(tmp_path, bad):
    wave = np.zeros(2 * SR, np.float32)
    wave[SR + SR // 2] = bad
    path = tmp_path / "bad.wav"
    sf.write(path, wave, SR, subtype="FLOAT")
    with pytest.raises(AutotuneError) as info:
        load_audio(path)
    assert str(info.value) == f"{path}: cannot read audio (a sample is NaN or infinite at 1.500 s: export the clip again)"
