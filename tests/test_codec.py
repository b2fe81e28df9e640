"""Tests of autotune.codec: real code on CPU, with the tiny random XCodec2 and synthetic audio."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from autotune.audio import load_audio, resample, write_wav
from autotune.codec import Codec, DeferredCodec, build_tiny_codec, load_codec
from autotune.codec_cache import encode_files
from autotune.llasa import DEFAULT_CODEC, NUM_SPEECH_TOKENS, TINY
from autotune.errors import AutotuneError

SR = 16_000


def tone(seconds: float, sr: int = SR, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    """A sine with a little noise, so clips differ and the codec sees something speech-like in level."""
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    noise = np.random.default_rng(seed).standard_normal(n)
    return (0.4 * np.sin(2 * np.pi * freq * t) + 0.02 * noise).astype(np.float32)


def peak_frequency(wave: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(wave.size)))
    return float(np.argmax(spectrum) * sr / wave.size)


@pytest.fixture(scope="module")
def codec() -> Codec:
    return build_tiny_codec()


# --------------------------------------------------------------------------- codec


def test_tiny_codec_has_the_real_codecs_rates(codec: Codec) -> None:
    assert codec.sampling_rate == 16_000
    assert codec.codes_per_second == 50
    assert codec.hop_length == 320
    assert codec.codebook_size == NUM_SPEECH_TOKENS == 65_536
    assert codec.codec_id.startswith(f"{TINY}-")


@pytest.mark.parametrize(("seconds", "expected"), [(1.0, 50), (2.5, 125)])
def test_encode_gives_50_codes_per_second_and_decode_320_samples_per_code(
    codec: Codec, seconds: float, expected: int
) -> None:
    codes = codec.encode(tone(seconds))
    assert len(codes) == expected
    assert all(isinstance(c, int) and 0 <= c < 65_536 for c in codes)
    # The tiny model is re-initialised so that frames spread over the codebook.
    assert len(set(codes)) > expected // 4

    audio = codec.decode(codes)
    assert audio.dtype == np.float32
    assert audio.shape == (expected * 320,)
    assert np.isfinite(audio).all()
    assert codec.decode(np.asarray(codes, dtype=np.int64)).shape == (expected * 320,)


@pytest.mark.parametrize("num_samples", [319, 16_319, 12_345])
def test_code_count_follows_the_models_rounding(codec: Codec, num_samples: int) -> None:
    wave = tone(num_samples / SR)
    assert wave.size == num_samples
    assert len(codec.encode(wave)) == codec.num_codes(num_samples) == (num_samples + 1) // 320


def test_codes_depend_on_the_audio(codec: Codec) -> None:
    assert codec.encode(tone(1.0, freq=220.0, seed=1)) != codec.encode(tone(1.0, freq=3000.0, seed=2))


def test_tiny_codec_is_deterministic_and_leaves_the_rng_alone(codec: Codec) -> None:
    import torch

    state = torch.get_rng_state()
    again = build_tiny_codec()
    assert torch.equal(state, torch.get_rng_state())
    assert again.codec_id == codec.codec_id
    wave = tone(1.0, seed=3)
    assert again.encode(wave) == codec.encode(wave)
    assert load_codec(TINY).codec_id == codec.codec_id


def test_too_short_audio_and_bad_codes_are_refused(codec: Codec) -> None:
    with pytest.raises(AutotuneError, match="too short"):
        codec.encode(np.zeros(100, dtype=np.float32))
    with pytest.raises(ValueError, match="0..65535"):
        codec.decode([0, 65_536])
    with pytest.raises(ValueError, match="mono"):
        codec.encode(np.zeros((2, 16_000), dtype=np.float32))
    assert codec.decode([]).shape == (0,)


def test_features_match_transformers_extractor(codec: Codec) -> None:
    """Our torchaudio-free features against transformers' own extractor, where torchaudio is installed."""
    pytest.importorskip("torchaudio")
    from autotune.audio import featurize

    wave = tone(1.3)
    reference = codec.feature_extractor(wave, sampling_rate=SR, return_tensors="pt")
    ours = featurize(wave, codec.feature_extractor, codec.device)
    for name, value in reference.items():
        assert ours[name].shape == value.shape, name
        assert np.allclose(ours[name].float().numpy(), value.float().numpy(), atol=1e-4), name


# A port of `torchaudio.compliance.kaldi.fbank` with Xcodec2FeatureExtractor's options, kept
# here as the reference for `audio.log_fbank` (which is transformers' `spectrogram`).
def torch_kaldi_fbank(
    waveform, *, sampling_rate: int, num_mel_bins: int, frame_length: int, frame_shift: int
):
    """Kaldi-compatible log mel filterbank of a 1-D waveform, shape (frames, num_mel_bins).

    A port of `torchaudio.compliance.kaldi.fbank` with the options that
    `Xcodec2FeatureExtractor` uses (povey window, pre-emphasis 0.97, DC
    removal, no dither, snip_edges, low_freq 20 Hz, high_freq Nyquist, power
    spectrum). transformers' extractor needs torchaudio, which has no build for
    every torch release; this keeps the codec working on plain torch.
    """
    import math

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

    def mel(freq):
        if isinstance(freq, torch.Tensor):
            return 1127.0 * (1.0 + freq / 700.0).log()
        return 1127.0 * math.log(1.0 + freq / 700.0)

    low_mel, high_mel = mel(20.0), mel(sampling_rate / 2)
    delta = (high_mel - low_mel) / (num_mel_bins + 1)
    # float64 filters (the old port built them in float32), so the comparison is of the algorithm
    bins = torch.arange(num_mel_bins, dtype=torch.float64).unsqueeze(1)
    left, center, right = (low_mel + (bins + k) * delta for k in (0.0, 1.0, 2.0))
    fft_mel = mel(sampling_rate / fft_size * torch.arange(fft_size // 2, dtype=torch.float64)).unsqueeze(0)
    banks = torch.clamp(torch.min((fft_mel - left) / (center - left), (right - fft_mel) / (right - center)), min=0.0)
    banks = torch.nn.functional.pad(banks, (0, 1)).to(dtype=dtype, device=device)
    return torch.max(power @ banks.T, eps).log()




def test_log_fbank_equals_the_kaldi_port(codec: Codec) -> None:
    """`audio.log_fbank` (transformers' audio_utils) against the torch port of Kaldi's fbank
    this project used before: the same frames, bins and values."""
    import torch

    from autotune.audio import log_fbank

    fe = codec.feature_extractor
    for seconds, seed in ((0.4, 1), (1.3, 2), (3.0, 3)):
        wave = tone(seconds, seed=seed)
        centred = np.pad(np.append(wave, 0.0), (160, 160)) * 2**15
        kwargs = dict(sampling_rate=int(fe.sampling_rate), num_mel_bins=int(fe.num_mel_bins),
                      frame_length=int(fe.frame_length), frame_shift=int(fe.frame_shift))
        ours = log_fbank(centred, **kwargs)
        reference = torch_kaldi_fbank(torch.as_tensor(centred, dtype=torch.float64), **kwargs).numpy()
        assert ours.shape == reference.shape
        assert np.abs(ours - reference).max() < 1e-6, np.abs(ours - reference).max()


# --------------------------------------------------------------------------- load_codec


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads the variable once at import, so patch its constant as well.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_load_codec_from_a_saved_folder(codec: Codec, tmp_path: Path, offline: None) -> None:
    folder = tmp_path / "xcodec2"
    codec.model.save_pretrained(folder)
    codec.feature_extractor.save_pretrained(folder)
    loaded = load_codec(str(folder))
    assert loaded.codec_id != codec.codec_id
    wave = tone(1.0, seed=4)
    assert loaded.encode(wave) == codec.encode(wave)


def test_load_codec_missing_folder_says_what_to_do(tmp_path: Path, offline: None) -> None:
    missing = tmp_path / "no-such-codec"
    with pytest.raises(AutotuneError) as info:
        load_codec(str(missing))
    message = info.value.one_line()
    assert f"could not load the codec `{missing}`" in message
    assert "no such folder" in message
    assert "--codec tiny" in message


def test_load_codec_empty_folder_and_unknown_hub_id(tmp_path: Path, offline: None) -> None:
    with pytest.raises(AutotuneError, match="could not load the codec .*config.json.*--codec tiny"):
        load_codec(str(tmp_path))
    with pytest.raises(AutotuneError) as info:
        load_codec("no-such-org/no-such-codec")
    assert "could not load the codec `no-such-org/no-such-codec` (" in str(info.value)
    assert "--codec PATH" in str(info.value)
    assert DEFAULT_CODEC == "HKUSTAudio/xcodec2-hf"


# --------------------------------------------------------------------------- audio I/O


def test_load_audio_mixes_stereo_to_mono_and_resamples(tmp_path: Path) -> None:
    sr = 22_050
    left = tone(1.0, sr=sr, freq=440.0)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, sr, subtype="FLOAT")

    wave = load_audio(path)
    assert wave.dtype == np.float32
    assert wave.ndim == 1
    assert wave.size == round(left.size * SR / sr)
    assert abs(peak_frequency(wave, SR) - 440.0) < 2.0
    # Averaging a tone with silence halves it: 0.4 -> 0.2 amplitude.
    assert 0.18 < np.abs(wave[2000:-2000]).max() < 0.23


@pytest.mark.parametrize(("sr", "freq"), [(8_000, 1_000.0), (22_050, 440.0), (44_100, 3_000.0), (48_000, 5_000.0)])
def test_resample_keeps_frequency_amplitude_and_length(sr: int, freq: float) -> None:
    n = int(2.5 * sr) + 7
    x = np.sin(2 * np.pi * freq * np.arange(n) / sr).astype(np.float32)
    y = resample(x, sr, SR)
    assert y.size == round(n * SR / sr)
    assert abs(peak_frequency(y, SR) - freq) < 2.0
    expected = np.sin(2 * np.pi * freq * np.arange(y.size) / SR)
    inner = slice(800, y.size - 800)  # away from the zero-padded ends
    assert np.abs(y[inner] - expected[inner]).max() < 1e-3


def test_resample_removes_what_16khz_cannot_hold() -> None:
    sr = 44_100
    x = np.sin(2 * np.pi * 10_000.0 * np.arange(2 * sr) / sr).astype(np.float32)
    y = resample(x, sr, SR)
    # A 10 kHz tone would alias to 6 kHz at full strength (rms 0.707) without the low-pass.
    assert np.sqrt(np.mean(y[800:-800] ** 2)) < 1e-3
    assert np.array_equal(resample(x, sr, sr), x)


def test_write_wav_is_16_bit_mono_and_round_trips(tmp_path: Path) -> None:
    wave = tone(0.5)
    wave[0] = 3.0  # out of range: clipped, not wrapped
    path = tmp_path / "sub" / "out.wav"
    write_wav(path, wave)
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (SR, 1, "PCM_16", wave.size)
    back = load_audio(path)
    assert back[0] == pytest.approx(1.0, abs=1e-4)
    assert np.abs(back[1:] - wave[1:]).max() < 1e-4


def test_load_audio_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.wav"
    with pytest.raises(AutotuneError, match=f"^{missing}: audio file is missing$"):
        load_audio(missing)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio at all" * 40)
    with pytest.raises(AutotuneError, match=f"^{garbage}: cannot read audio \\(.+\\)$"):
        load_audio(garbage)


# --------------------------------------------------------------------------- encode_files


def _write_clips(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    one, long = folder / "one.wav", folder / "long.flac"
    sf.write(one, tone(1.0, seed=5), SR)
    sf.write(long, tone(2.5, seed=6), SR)
    stereo = folder / "stereo22k.wav"
    left = tone(1.0, sr=22_050, seed=7)
    sf.write(stereo, np.stack([left, 0.5 * left], axis=1), 22_050)
    return [one, long, stereo]


def test_encode_files_caches_and_reencodes_changed_files(codec: Codec, tmp_path: Path) -> None:
    paths = _write_clips(tmp_path / "audio")
    cache = tmp_path / "cache"

    first = encode_files(paths, codec, cache, progress=True)
    assert (first.encoded, first.from_cache) == (3, 0)
    assert [len(first[p]) for p in paths] == [50, 125, 50]
    assert all(0 <= c < 65_536 for codes in first.values() for c in codes)
    entries = sorted(cache.glob("*.json"))
    assert len(entries) == 3
    assert not [p for p in cache.iterdir() if p.suffix != ".json"]  # no temporary files left
    payload = json.loads(entries[0].read_text())
    assert payload["codec_id"] == codec.codec_id

    second = encode_files(paths, codec, cache, progress=False)
    assert (second.encoded, second.from_cache) == (0, 3)
    assert dict(second) == dict(first)

    sf.write(paths[0], tone(1.0, freq=900.0, seed=8), SR)
    third = encode_files(paths, codec, cache, progress=False)
    assert (third.encoded, third.from_cache) == (1, 2)
    assert third[paths[0]] != first[paths[0]]
    assert third[paths[1]] == first[paths[1]]


@pytest.mark.parametrize("kind", ["folder", "tiny"])
def test_a_deferred_codec_loads_weights_only_for_files_not_cached(codec: Codec, tmp_path: Path, offline: None,
                                                                  monkeypatch, kind: str) -> None:
    import autotune.codec as codec_module

    name = TINY
    if kind == "folder":
        name = str(tmp_path / "xcodec2")
        codec.model.save_pretrained(name)
        codec.feature_extractor.save_pretrained(name)
    loads = []
    real_load = codec_module.load_codec
    monkeypatch.setattr(codec_module, "load_codec", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    paths, cache = _write_clips(tmp_path / "audio"), tmp_path / "cache"

    first = DeferredCodec(name)
    assert first.codec_id == real_load(name).codec_id and not loads  # the key needs no weights
    encoded = encode_files(paths, first, cache, progress=False)
    assert encoded.encoded == 3 and first.loaded and len(loads) == 1

    again = DeferredCodec(name)
    cached = encode_files(paths, again, cache, progress=False)
    assert (cached.encoded, cached.from_cache) == (0, 3) and dict(cached) == dict(encoded)
    assert not again.loaded and len(loads) == 1   # every file cached: the weights never loaded

    sf.write(paths[0], tone(1.0, freq=700.0, seed=9), SR)
    changed = encode_files(paths, DeferredCodec(name), cache, progress=False)
    assert (changed.encoded, changed.from_cache) == (1, 2) and len(loads) == 2


def test_a_codec_that_fails_to_load_is_one_error_tried_once(codec: Codec, tmp_path: Path, offline: None,
                                                            monkeypatch) -> None:
    import autotune.codec as codec_module

    folder = tmp_path / "xcodec2"
    codec.model.save_pretrained(folder)
    codec.feature_extractor.save_pretrained(folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()   # the key (file names, sizes) still resolves; the load fails
    loads = []
    real_load = codec_module.load_codec
    monkeypatch.setattr(codec_module, "load_codec", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    paths = _write_clips(tmp_path / "audio")
    with pytest.raises(AutotuneError) as info:
        encode_files(paths, DeferredCodec(str(folder)), tmp_path / "cache", progress=False)
    assert len(loads) == 1
    assert str(info.value).startswith(f"could not load the codec `{folder}`")
    assert "audio file" not in str(info.value)


def test_a_deferred_codec_reports_a_missing_folder_at_once(tmp_path: Path, offline: None) -> None:
    with pytest.raises(AutotuneError, match="no such folder"):
        DeferredCodec(str(tmp_path / "nowhere"))


def test_encode_files_reports_every_bad_file_at_once(codec: Codec, tmp_path: Path) -> None:
    good = _write_clips(tmp_path / "audio")[0]
    missing = tmp_path / "audio" / "missing.wav"
    garbage = tmp_path / "audio" / "garbage.wav"
    garbage.write_bytes(bytes(range(256)) * 8)
    cache = tmp_path / "cache"

    with pytest.raises(AutotuneError) as info:
        encode_files([missing, good, garbage], codec, cache, progress=False)
    error = info.value
    assert str(error).startswith("2 of 3 audio files could not be encoded")
    assert error.details[0] == f"{missing}: audio file is missing"
    assert error.details[1].startswith(f"{garbage}: cannot read audio (")
    assert len(error.details) == 2

    # The good file was cached before the error was raised.
    again = encode_files([good], codec, cache, progress=False)
    assert (again.encoded, again.from_cache) == (0, 1)


def test_a_corrupt_cache_entry_is_encoded_again(codec: Codec, tmp_path: Path) -> None:
    path = _write_clips(tmp_path / "audio")[0]
    cache = tmp_path / "cache"
    encode_files([path], codec, cache, progress=False)
    (entry,) = cache.glob("*.json")
    entry.write_text("{not json")
    again = encode_files([path], codec, cache, progress=False)
    assert (again.encoded, again.from_cache) == (1, 0)
    assert len(again[path]) == 50


def test_a_deferred_codec_names_an_unknown_hub_id_like_load_codec(offline: None) -> None:
    with pytest.raises(AutotuneError) as deferred:
        DeferredCodec("no-such-org/no-such-codec")
    with pytest.raises(AutotuneError) as direct:
        load_codec("no-such-org/no-such-codec")
    assert "could not load the codec `no-such-org/no-such-codec` (" in str(deferred.value)
    assert str(deferred.value).split(" (")[0] == str(direct.value).split(" (")[0]
    assert str(deferred.value).rsplit("): ", 1)[1] == str(direct.value).rsplit("): ", 1)[1]


@pytest.mark.slow
def test_a_hub_codec_is_keyed_by_its_commit(codec: Codec, tmp_path: Path) -> None:
    """A hub codec in the local hub cache (offline): the key names the snapshot's commit,
    the same before the weights load (DeferredCodec) and after (load_codec)."""
    import subprocess
    import sys

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--some-org--xcodec2"
    codec.model.save_pretrained(repo / "snapshots" / commit)
    codec.feature_extractor.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = ("from autotune.codec import DeferredCodec, load_codec\n"
              "print(DeferredCodec('some-org/xcodec2').codec_id)\n"
              "print(load_codec('some-org/xcodec2').codec_id)\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [f"some-org/xcodec2@{commit}"] * 2


# --------------------------------------------------------------------------- no codec on disk, no hub

_TIMED_LOADS = r"""
import json, time
from autotune.codec import DeferredCodec, load_codec
from autotune.errors import AutotuneError
out = []
for make in (DeferredCodec, load_codec):
    start = time.monotonic()
    try:
        make("HKUSTAudio/xcodec2-hf")
        out.append([time.monotonic() - start, "loaded"])
    except AutotuneError as exc:
        out.append([time.monotonic() - start, exc.one_line()])
print(json.dumps(out))
"""


def _no_hub_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), **extra}
    for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        if name not in extra:
            env.pop(name, None)
    return env


@pytest.mark.parametrize("hub", ["refusing", pytest.param("silent", marks=pytest.mark.slow), "offline"])
def test_a_codec_not_on_disk_without_a_hub_fails_within_5_s_saying_what_to_do(tmp_path: Path, hub: str) -> None:
    """Before, the hub client retried a refused connection for 25-50 s before saying so.
    `silent` accepts the connection and never answers, like a black-holed proxy."""
    import socket
    import subprocess
    import sys

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = {"refusing": "http://127.0.0.1:9", "silent": f"http://127.0.0.1:{silent.getsockname()[1]}"}.get(hub)
        extra = {"HF_ENDPOINT": endpoint} if endpoint else {"HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, "-c", _TIMED_LOADS], cwd=Path(__file__).resolve().parents[1],
                              env=_no_hub_env(tmp_path, **extra), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    why = f"the hub at {endpoint} cannot be reached: " if endpoint else "HF_HUB_OFFLINE is set"
    for seconds, message in json.loads(done.stdout):
        assert seconds < 5.0, (seconds, message)
        assert message.startswith(f"could not load the codec `{DEFAULT_CODEC}` (not in the local hub cache, "
                                  f"and {why}")
        assert f"download it once (`hf download {DEFAULT_CODEC}`)" in message
        assert "--codec PATH" in message and "`--codec tiny` runs an offline test" in message


def _train_without_codec_or_hub(tmp_path: Path, *args: str):
    import subprocess
    import sys

    data = tmp_path / "lj"
    if not data.exists():
        write_wav(data / "wavs" / "a.wav", tone(1.0))
        (data / "metadata.csv").write_text("a|one second of sound\n", encoding="utf-8")
    return subprocess.run([sys.executable, "train.py", "--data", str(data), "--model", "tiny", *args],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
                          env=_no_hub_env(tmp_path, HF_ENDPOINT="http://127.0.0.1:9", CUDA_VISIBLE_DEVICES=""))


def test_check_data_on_audio_without_codec_or_hub_says_in_one_note_what_training_needs(tmp_path: Path) -> None:
    """`--check-data` reads and measures the audio without the codec and says once what to get."""
    checked = _train_without_codec_or_hub(tmp_path, "--check-data", "--output-dir", str(tmp_path / "runs" / "r1"))
    assert checked.returncode == 0, checked.stderr
    said = " ".join((checked.stdout + checked.stderr).split())   # the console wraps its notes
    assert "Traceback" not in said and "Retrying" not in said
    assert said.count("could not load the codec") == 1
    note = said[said.index(f"could not load the codec `{DEFAULT_CODEC}`"):]
    assert note.startswith(f"could not load the codec `{DEFAULT_CODEC}` (not in the local hub cache")
    assert "hf download" in note and "--codec tiny" in note and "training needs it" in note


@pytest.mark.slow
def test_training_on_audio_without_codec_or_hub_stops_in_one_line(tmp_path: Path) -> None:
    trained = _train_without_codec_or_hub(tmp_path, "--output-dir", str(tmp_path / "runs" / "r2"),
                                          "--set", "training.max_steps=1")
    assert trained.returncode == 2, trained.stderr
    assert "Traceback" not in trained.stderr
    (line,) = [l for l in trained.stderr.splitlines() if l.startswith("error:")]
    assert line.startswith(f"error: could not load the codec `{DEFAULT_CODEC}` (not in the local hub cache")
    assert "hf download" in line and "--codec tiny" in line


# --------------------------------------------------------------------------- the tiny codec's cost


def test_the_tiny_codec_works_on_one_thread_and_gives_the_callers_back(codec: Codec) -> None:
    """Split over threads, its small operations spun for minutes on a busy two-core box."""
    import torch

    seen: list[int] = []
    hook = codec.model.acoustic_encoder.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        codes = codec.encode(tone(0.5))
        assert torch.get_num_threads() == 2
        assert codec.decode(codes).shape == (len(codes) * 320,)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
        hook.remove()
    assert seen == [1]
    # Still the real XCodec2 code path, with fewer, wider-strided encoder blocks.
    assert type(codec.model).__name__ == "Xcodec2Model"
    assert codec.model.config.downsampling_ratios == [8, 8, 5] and codec.hop_length == 320


def test_check_data_encodes_each_clip_once_and_decodes_nothing(tmp_path: Path, monkeypatch) -> None:
    """`--check-data --codec tiny` on an LJSpeech folder: one encode per clip, no decode
    (the conv_transpose1d in a profile of it is the encoder's anti-aliased activations'
    upsampling, not a decoder)."""
    from transformers import Xcodec2Model

    from train import main

    data = tmp_path / "lj"
    for i in range(3):
        write_wav(data / "wavs" / f"c{i}.wav", tone(1.0 + 0.25 * i, seed=20 + i))
    (data / "metadata.csv").write_text("".join(f"c{i}|clip {i}\n" for i in range(3)), encoding="utf-8")
    encodes = []
    real_encode = Xcodec2Model.encode
    monkeypatch.setattr(Xcodec2Model, "encode", lambda self, *a, **k: encodes.append(1) or real_encode(self, *a, **k))

    def no_decode(*args, **kwargs):
        raise AssertionError("a decode during --check-data")

    monkeypatch.setattr(Xcodec2Model, "decode", no_decode)
    monkeypatch.setattr(Xcodec2Model, "forward", no_decode)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert main(["--check-data", "--data", str(data), "--model", "tiny", "--codec", "tiny",
                 "--output-dir", str(tmp_path / "run")]) == 0
    assert len(encodes) == 3
