"""synthesize.py never speaks wrong and never traces back (issue #22's synthesize kinds):
strict adapters, bounded input, one-line errors, one signal policy, the run's text
normalisation, and a tiny-model default that finishes in seconds.

The command runs in-process through `run_main` (what the console script runs), on run
folders made with the real PEFT API (tests/speech_runs.py)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from tests.speech_runs import make_adapter, make_run, write_tone

pytestmark = pytest.mark.filterwarnings("ignore")


def cli(capsys, *args: str) -> tuple[int, str, str]:
    from autotune.cli import run_main
    from autotune.commands.synthesize import main

    with pytest.raises(SystemExit) as stop:
        run_main(main, [str(a) for a in args])
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def assert_one_line(code: int, out: str, err: str, needle: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and out == ""
    assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("hardening") / "run")


def tampered(tmp_path: Path, run: Path, change) -> Path:
    """A copy of the run's adapter with `change(tensors, config)` applied."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "adapter"
    folder.mkdir()
    tensors = load_file(str(run / "adapter_model.safetensors"))
    config = json.loads((run / "adapter_config.json").read_text())
    tensors = change(tensors, config)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


# ------------------------------------------------------------------ A.1 strict adapters ---

def _renamed(tensors, config):
    return {name.replace("lora_A", "lora_a"): t for name, t in tensors.items()}


def _empty(tensors, config):
    return {}


def _four_of_28(tensors, config):
    assert len(tensors) == 28
    return dict(sorted(tensors.items())[:4])


def _dora(tensors, config):
    config["use_dora"] = True
    return tensors


def _nan(tensors, config):
    name = sorted(tensors)[3]
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = float("nan")
    return tensors


def _wrong_rank(tensors, config):
    config["r"] = 8
    return tensors


@pytest.mark.parametrize("change, needle", [
    (_renamed, "14 unexpected"), (_empty, "holds no tensors"), (_four_of_28, "24 weights missing"),
    (_dora, "use_dora"), (_nan, "NaN"), (_wrong_rank, "adapter"),
])
def test_an_adapter_that_does_not_fit_exactly_is_one_line_and_no_wav(run, tmp_path, capsys, change, needle):
    adapter = tampered(tmp_path, run, change)
    wav = tmp_path / "out.wav"
    code, out, err = cli(capsys, "--adapter", adapter, "--model", "tiny", "--codec", "tiny", "--text", "hello",
                         "-o", wav, "--max-new-tokens", "4")
    assert_one_line(code, out, err, needle)
    assert not wav.exists()


def test_a_refused_adapter_leaves_the_engine_clean_and_a_good_one_loads_with_its_values(run, tmp_path):
    import torch
    from safetensors.torch import load_file

    from autotune.errors import AutotuneError
    from autotune.voice import Voice

    voice = Voice("tiny", codec_id="tiny", device="cpu")
    with pytest.raises(AutotuneError, match="24 weights missing"):
        voice.adapter(tampered(tmp_path, run, _four_of_28))
    assert not any("lora" in name for name, _ in voice.model.named_modules()), "the refused adapter is taken out"
    good = voice.adapter(run)
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(voice.model, adapter_name=good.peft_name, save_embedding_layers=False)
    saved = load_file(str(run / "adapter_model.safetensors"))
    assert set(state) == set(saved) and len(saved) == 28
    assert all(torch.equal(state[name].float(), saved[name].float()) for name in saved)
    # A second adapter beside the first, refused: the first still speaks.
    second = tmp_path / "second"
    second.mkdir()
    with pytest.raises(AutotuneError, match="weights missing"):
        voice.adapter(tampered(second, run, _renamed))
    assert list(voice.model.peft_config) == [good.peft_name]


def test_strict_loading_refuses_a_pickled_adapter_and_a_foreign_peft_type(run, tmp_path):
    from autotune.adapters import read_adapter
    from autotune.errors import AutotuneError

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((run / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(AutotuneError, match="adapter_model.bin"):
        read_adapter(pickled)
    foreign = tmp_path / "ia3"
    foreign.mkdir()
    config = json.loads((run / "adapter_config.json").read_text())
    config["peft_type"] = "IA3"
    (foreign / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AutotuneError, match="only LoRA adapters"):
        read_adapter(foreign)


# ------------------------------------------------------------------ A.2 bounded input ---

def test_a_300_mb_one_line_text_file_is_refused_within_seconds(run, tmp_path, capsys):
    big = tmp_path / "big.txt"
    with open(big, "wb") as handle:          # sparse: 300 MB of NUL bytes without writing them
        handle.truncate(300 * 1024 * 1024)
    started = time.perf_counter()
    code, out, err = cli(capsys, "--adapter", run, "--text-file", big, "-o", tmp_path / "d")
    assert time.perf_counter() - started < 20
    assert_one_line(code, out, err, "larger than 16 MB")


@pytest.mark.parametrize("content, needle", [
    ("x" * 2500 + "\n", "line 1 is 2,500 characters"),
    ("hi\n" * 10_001, "more than 10,000 texts"),
])
def test_text_files_are_capped_by_line_length_and_line_count(run, tmp_path, capsys, content, needle):
    texts = tmp_path / "texts.txt"
    texts.write_text(content, encoding="utf-8")
    assert_one_line(*cli(capsys, "--adapter", run, "--text-file", texts, "-o", tmp_path / "d"), needle)
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_every_line_is_checked_against_2048_positions_before_the_first_is_spoken(run, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("hello\n" + "y" * 1990 + "\n", encoding="utf-8")   # byte-level tiny tokenizer: 1,990 tokens
    line = assert_one_line(*cli(capsys, "--adapter", run, "--text-file", texts, "-o", tmp_path / "d"),
                           "line 2: the text is too long")
    assert "only the first" in line and "characters fit" in line
    assert not list((tmp_path / "d").glob("*.wav")), "nothing is spoken when a later line cannot be"


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_a_fifo_or_a_device_as_text_file_is_one_line_at_once(run, tmp_path, capsys, special):
    path = tmp_path / "fifo"
    if special == "fifo":
        os.mkfifo(path)
    else:
        path = Path(special)
    started = time.perf_counter()
    assert_one_line(*cli(capsys, "--adapter", run, "--text-file", path, "-o", tmp_path / "d"), "not a regular file")
    assert time.perf_counter() - started < 20


# ------------------------------------------------------------------ A.3 one line, exit 2 ---

def test_bad_outputs_and_texts_are_one_line(run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = {
        "parent is a file": (["--text", "hi", "-o", blocker / "out.wav"], "is a file, not a folder"),
        "missing /proc path": (["--text", "hi", "-o", "/proc/nonexistent-llasa/out.wav"], "cannot write into"),
        "undecodable --text": (["--text", "caf\udce9", "-o", tmp_path / "o.wav"], "not UTF-8"),
        "--temperature inf": (["--text", "hi", "-o", tmp_path / "o.wav", "--temperature", "inf"], "temperature"),
        "--temperature nan": (["--text", "hi", "-o", tmp_path / "o.wav", "--temperature", "nan"], "temperature"),
        "--repetition-penalty inf": (["--text", "hi", "-o", tmp_path / "o.wav", "--repetition-penalty", "inf"],
                                     "repetition penalty"),
        "--repetition-penalty nan": (["--text", "hi", "-o", tmp_path / "o.wav", "--repetition-penalty", "nan"],
                                     "repetition penalty"),
        "--top-p nan": (["--text", "hi", "-o", tmp_path / "o.wav", "--top-p", "nan"], "top-p"),
    }
    for name, (args, needle) in cases.items():
        code, out, err = cli(capsys, "--adapter", run, *args)
        if code != 2 or needle not in err:
            pytest.fail(f"{name}: exit {code}: {err}")
        assert_one_line(code, out, err, needle)
    assert not (tmp_path / "o.wav").exists()


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_non_finite_voice_prompt_clip_is_one_line(run, tmp_path, capsys, poison):
    clip = write_tone(tmp_path / "ref.wav", subtype="FLOAT", poison=poison)
    assert_one_line(*cli(capsys, "--adapter", run, "--text", "hi", "-o", tmp_path / "o.wav",
                         "--reference", clip, "--reference-text", "a tone"), "NaN or infinite")


@pytest.mark.parametrize("data, needle", [
    ({"data": {"codec": ["tiny", "other"]}}, "`data.codec` is a list"),
    ({"data": ["codec"]}, "`data` is a list"),
    ({"data": {"text_normalization": "shout"}}, "`data.text_normalization` is `shout`"),
    ("model: [unclosed", "not valid YAML"),
    (["a", "list"], "not a mapping"),
])
def test_a_malformed_run_config_is_one_line_naming_the_key(tmp_path, capsys, data, needle):
    run = make_adapter(tmp_path / "run")
    text = data if isinstance(data, str) else yaml.safe_dump(data)
    (run / "resolved_config.yaml").write_text(text, encoding="utf-8")
    line = assert_one_line(*cli(capsys, "--adapter", run, "--text", "hi", "-o", tmp_path / "o.wav"), needle)
    assert "resolved_config.yaml" in line


def test_a_run_config_that_is_a_fifo_or_huge_is_refused(tmp_path, capsys):
    run = make_adapter(tmp_path / "run")
    os.mkfifo(run / "resolved_config.yaml")
    assert_one_line(*cli(capsys, "--adapter", run, "--text", "hi", "-o", tmp_path / "o.wav"), "not a regular file")


# ------------------------------------------------------------------ A.4 signals ---

@pytest.mark.parametrize("name, expected", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
def test_a_signal_while_a_wav_is_written_lets_it_finish_then_exits_with_the_signals_code(
        run, tmp_path, capsys, monkeypatch, name, expected):
    import autotune.audio

    real = autotune.audio.write_wav
    calls = []

    def write_then_signal(path, wave, rate=16000):
        calls.append(path)
        if len(calls) == 2:
            os.kill(os.getpid(), getattr(signal, name))   # arrives while the second file is being written
        real(path, wave, rate)

    monkeypatch.setattr(autotune.audio, "write_wav", write_then_signal)
    texts = tmp_path / "texts.txt"
    texts.write_text("one\ntwo\nthree\nfour\n", encoding="utf-8")
    before = signal.getsignal(signal.SIGTERM)
    code, out, err = cli(capsys, "--adapter", run, "--text-file", texts, "-o", tmp_path / "d",
                         "--max-new-tokens", "3", "--seed", "0")
    assert code == expected
    assert err.strip().splitlines()[-1] == f"{name}: stopped; 2 files written whole, 2 not written"
    assert "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["0001.wav", "0002.wav"], "no partial file"
    for wav in (tmp_path / "d").iterdir():
        assert sf.info(str(wav)).frames > 0
    assert signal.getsignal(signal.SIGTERM) == before, "the handlers are put back"


@pytest.mark.slow
@pytest.mark.parametrize("name, expected", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_real_signal_during_generation_exits_with_its_code_in_one_line(run, tmp_path, name, expected):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    texts = tmp_path / "texts.txt"
    texts.write_text("one\n" + "two\n" * 5, encoding="utf-8")
    out = tmp_path / "d"
    proc = subprocess.Popen([sys.executable, str(root / "synthesize.py"), "--adapter", str(run), "--text-file",
                             str(texts), "-o", str(out), "--max-new-tokens", "400", "--seed", "0"],
                            cwd=root, env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "0001.wav").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(getattr(signal, name))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == expected, stderr
    assert stderr.strip().splitlines()[-1].startswith(f"{name}: stopped; ")
    assert "Traceback" not in stderr
    for wav in out.glob("*.wav"):
        assert sf.info(str(wav)).frames > 0


# ------------------------------------------------------------------ A.5 normalisation ---

def capture_prompts(monkeypatch) -> list[dict]:
    """Record what reaches `model.generate`: the prompt ids, and the normalisation asked for."""
    import autotune.voice

    seen: list[dict] = []
    real = autotune.voice.generate_batch

    def spy(model, tokenizer, items, *, text_normalization="none", **kwargs):
        original = model.generate

        def generate(**call):
            seen.append({"normalization": text_normalization, "input_ids": call["input_ids"].tolist(),
                         "mask": call["attention_mask"].tolist()})
            return original(**call)

        model.generate = generate
        try:
            return real(model, tokenizer, items, text_normalization=text_normalization, **kwargs)
        finally:
            del model.generate

    monkeypatch.setattr(autotune.voice, "generate_batch", spy)
    return seen


def test_synthesis_normalises_the_text_and_the_voice_prompts_transcript_as_the_run_did(tmp_path, capsys, monkeypatch):
    from autotune.llasa import PromptBuilder, build_tiny_tokenizer
    from autotune.textnorm import normalize

    run = make_run(tmp_path / "run", normalization="llasa-trainer")
    seen = capture_prompts(monkeypatch)
    text, transcript = "ＡＢＣ　テスト！ 123", "ｶﾞｲﾄﾞ〜です？"
    clip = write_tone(tmp_path / "ref.wav")
    code, out, err = cli(capsys, "--adapter", run, "--text", text, "-o", tmp_path / "o.wav", "--max-new-tokens", "3",
                         "--reference", clip, "--reference-text", transcript, "--seed", "0")
    assert code == 0, err
    assert seen and seen[0]["normalization"] == "llasa-trainer"
    plain = PromptBuilder(build_tiny_tokenizer(), "none")
    normalised = normalize(transcript, "llasa-trainer") + normalize(text, "llasa-trainer")
    assert normalised == "ガイドーです?ABCテスト!123"
    expected_text = plain.prompt_ids(normalised)
    ids = seen[0]["input_ids"][0]
    assert ids[:len(expected_text)] == expected_text, "the prompt holds the normalised transcript and text"
    assert ids != plain.prompt_ids(transcript + text)[:len(ids)]


def test_an_older_run_without_the_setting_uses_autos_choice_for_its_model(tmp_path, capsys, monkeypatch):
    from autotune.runs import RunSettings

    run = make_run(tmp_path / "run", normalization=None)
    seen = capture_prompts(monkeypatch)
    code, _, err = cli(capsys, "--adapter", run, "--text", "ＡＢＣ", "-o", tmp_path / "o.wav", "--max-new-tokens", "2")
    assert code == 0, err
    assert seen[0]["normalization"] == "none"                 # auto for `tiny`
    assert RunSettings().normalization_for("NandemoGHS/Anime-Llasa-3B") == "llasa-trainer"
    assert RunSettings(text_normalization="nfkc").normalization_for("NandemoGHS/Anime-Llasa-3B") == "nfkc"


# ------------------------------------------------------------------ A.6 the tiny default ---

def test_the_tiny_model_stops_at_its_default_cap_and_the_time_and_real_time_factor_are_printed(run, tmp_path, capsys):
    code, out, err = cli(capsys, "--adapter", run, "--text", "こんにちは", "-o", tmp_path / "o.wav", "--json",
                         "--seed", "0")
    assert code == 0, err
    report = json.loads(out)
    from autotune.voice import TINY_DEFAULT_MAX_NEW_TOKENS

    assert 0 < report["generated"] <= TINY_DEFAULT_MAX_NEW_TOKENS
    assert "never ends its speech by itself" in err
    assert report["compute_seconds"] > 0 and report["real_time_factor"] > 0
    assert report["files"][0]["real_time_factor"] > 0
    assert "real-time factor" in err and "s of audio in" in err
    assert sf.info(str(tmp_path / "o.wav")).frames == report["codes"] * 320
    assert np.isfinite(sf.read(str(tmp_path / "o.wav"))[0]).all()
