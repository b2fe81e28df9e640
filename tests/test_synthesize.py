"""`synthesize.py` on an adapter from a tiny CPU training run: WAVs whose length is
the generated codes x 320 samples, a text file into numbered files, and one-line
errors (exit 2, no traceback) for what a user gets wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
SYNTH = ROOT / "synthesize.py"
DATA = ROOT / "examples" / "tiny"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.filterwarnings("ignore:Could not find a config file")


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


def synth(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SYNTH), *args], cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from train import main

    out = tmp_path_factory.mktemp("synth") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        code = main(["--data", str(DATA), "--model", "tiny", "--codec", "tiny", "--output-dir", str(out),
                     "--set", "training.max_steps=2", "--set", "training.save_steps=2",
                     "--set", "training.eval_strategy=no", "--set", "samples.num_texts=0"])
    finally:
        mp.undo()
    assert code == 0
    assert (out / "adapter_config.json").is_file() and (out / "checkpoint-2" / "adapter_config.json").is_file()
    return out


def test_one_text_to_a_wav_of_codes_times_320_samples(run_dir, tmp_path, capsys, monkeypatch):
    """In-process through the console script's `run_main`; the slow tier runs it as a process."""
    from autotune.cli import run_main
    from synthesize import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    wav = tmp_path / "out.wav"
    with pytest.raises(SystemExit) as exited:
        run_main(main, ["--adapter", str(run_dir), "--text", "こんにちは", "-o", str(wav), "--codec", "tiny",
                        "--max-new-tokens", "40", "--seed", "0", "--json"])
    out, err = capsys.readouterr()
    assert exited.value.code == 0, err
    check_one_text(json.loads(out), err, wav)


@pytest.mark.slow
def test_one_text_as_a_process(run_dir, tmp_path):
    wav = tmp_path / "out.wav"
    proc = synth("--adapter", str(run_dir), "--text", "こんにちは", "-o", str(wav), "--codec", "tiny",
                 "--max-new-tokens", "40", "--seed", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    check_one_text(json.loads(proc.stdout), proc.stderr, wav)


def check_one_text(report: dict, stderr: str, wav: Path) -> None:
    info = sf.info(str(wav))
    assert (info.samplerate, info.channels) == (16000, 1)
    assert report["codes"] > 0
    assert info.frames == report["codes"] * 320
    assert report["seconds"] == pytest.approx(report["codes"] / 50)
    assert report["generated"] == report["codes"] + report["dropped"] <= 40
    assert report["files"][0]["output"] == str(wav)
    assert "generated tokens" in stderr and "s of audio" in stderr  # the human lines go to stderr
    assert "Traceback" not in stderr


def test_text_file_to_numbered_files_from_a_checkpoint_with_the_runs_codec(run_dir, tmp_path, capsys, monkeypatch):
    from synthesize import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = tmp_path / "texts.txt"
    texts.write_text("同じ文です。\n\n同じ文です。\nhello there\n", encoding="utf-8")
    out = tmp_path / "wavs"
    # No --codec: checkpoint-2 has no config, so the run's resolved_config.yaml one level up says `tiny`.
    assert main(["--adapter", str(run_dir / "checkpoint-2"), "--text-file", str(texts), "-o", str(out),
                 "--max-new-tokens", "12", "--seed", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ["0001.wav", "0002.wav", "0003.wav"]
    assert [f["text"] for f in report["files"]] == ["同じ文です。", "同じ文です。", "hello there"]
    for entry in report["files"]:
        info = sf.info(entry["output"])
        assert (info.samplerate, info.channels, info.frames) == (16000, 1, entry["codes"] * 320)
    assert report["codes"] == sum(f["codes"] for f in report["files"])
    first, _ = sf.read(str(out / "0001.wav"))
    second, _ = sf.read(str(out / "0002.wav"))
    assert np.array_equal(first, second), "the same text with the same seed gives the same speech"


def test_reference_clip_is_used_for_voice_cloning(run_dir, tmp_path, capsys, monkeypatch):
    from synthesize import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clip = tmp_path / "ref.wav"
    t = np.arange(8000, dtype=np.float32) / 16000
    sf.write(str(clip), 0.3 * np.sin(2 * np.pi * 220 * t), 16000)
    wav = tmp_path / "cloned.wav"
    assert main(["--adapter", str(run_dir), "--text", "テスト", "-o", str(wav), "--codec", "tiny", "--json",
                 "--reference", str(clip), "--reference-text", "参照の文", "--max-new-tokens", "10", "--seed", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    # Only the new speech is written, not the reference clip's 25 codes.
    assert sf.info(str(wav)).frames == report["codes"] * 320 <= 10 * 320


@pytest.fixture()
def bad_inputs(run_dir, tmp_path) -> dict[str, list[str]]:
    no_config = tmp_path / "not-an-adapter"
    no_config.mkdir()
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n", encoding="utf-8")
    clip = tmp_path / "ref.wav"
    sf.write(str(clip), np.zeros(1600, dtype=np.float32), 16000)
    out = str(tmp_path / "o.wav")
    run = str(run_dir)
    return {
        "missing adapter": (["--adapter", str(tmp_path / "nope"), "--text", "x", "-o", out], "does not exist"),
        "no adapter_config": (["--adapter", str(no_config), "--text", "x", "-o", out], "adapter_config.json"),
        "codec": (["--adapter", run, "--text", "x", "-o", out, "--codec", "/nonexistent"], "codec"),
        "empty text": (["--adapter", run, "--text", "", "-o", out], "empty"),
        "blank text": (["--adapter", run, "--text", "   ", "-o", out], "empty"),
        "empty text file": (["--adapter", run, "--text-file", str(blank), "-o", str(tmp_path / "d")], "no text"),
        "missing text file": (["--adapter", run, "--text-file", str(tmp_path / "none.txt"), "-o", out],
                              "does not exist"),
        "missing reference": (["--adapter", run, "--text", "x", "-o", out, "--reference", str(tmp_path / "r.wav"),
                               "--reference-text", "hi"], "does not exist"),
        "reference without text": (["--adapter", run, "--text", "x", "-o", out, "--reference", str(clip)],
                                   "--reference-text"),
        "text without reference": (["--adapter", run, "--text", "x", "-o", out, "--reference-text", "hi"],
                                   "--reference"),
        "top-p": (["--adapter", run, "--text", "x", "-o", out, "--top-p", "1.5"], "top-p"),
    }


def test_errors_are_one_line_with_exit_code_2(bad_inputs, tmp_path, capsys, monkeypatch):
    """In-process, through the same `run_main` the console script uses."""
    from autotune.cli import run_main
    from synthesize import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, (args, needle) in bad_inputs.items():
        with pytest.raises(SystemExit) as exited:
            run_main(main, list(args))
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert exited.value.code == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert needle in lines[0], (name, lines[0])
        assert "Traceback" not in err and out == "", name
    assert not (tmp_path / "o.wav").exists()


@pytest.mark.slow
def test_errors_are_one_line_with_exit_code_2_as_a_process(bad_inputs, tmp_path):
    """The same cases as separate processes: nothing else (a library's warning, an import-time
    traceback) reaches stderr."""
    for name, (args, needle) in bad_inputs.items():
        proc = synth(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (name, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, proc.stderr)
        assert needle in lines[0], (name, lines[0])
        assert "Traceback" not in proc.stderr and proc.stdout == "", name
    assert not (tmp_path / "o.wav").exists()
