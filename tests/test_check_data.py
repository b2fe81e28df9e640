"""`train.py --data ... --check-data [--json]` as a user runs it: a subprocess from
the repository root, offline, loading no model weights."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Runs train.py's real `__main__` and then reports, on stderr's last line, which
# heavy modules the run imported: model classes mean model weights were loaded.
WRAPPER = r"""
import json, runpy, sys
sys.argv = ["train.py", *sys.argv[1:]]
code = 0
try:
    runpy.run_path("train.py", run_name="__main__")
except SystemExit as exc:
    code = exc.code
heavy = [m for m in sys.modules if m.startswith(("transformers.models.llama.modeling", "peft",
                                                   "transformers.models.xcodec2.modeling"))]
sys.stderr.write("\nMODULES " + json.dumps({"heavy": sorted(heavy), "torch": "torch" in sys.modules}) + "\n")
sys.exit(code)
"""

JAPANESE = ["こんにちは、今日はいい天気ですね。", "東京駅から新幹線で大阪まで二時間半かかります。", "猫が窓辺で日向ぼっこをしている。"]


def offline_env(tmp_path: Path) -> dict[str, str]:
    # An empty hub cache: the default model's tokenizer is certainly not on disk.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
            "CUDA_VISIBLE_DEVICES": "", "PYTHONIOENCODING": "utf-8", "COLUMNS": "400"}


def check_data(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    proc = subprocess.run([sys.executable, "-c", WRAPPER, "--check-data", *args], cwd=REPO,
                          env=offline_env(tmp_path), capture_output=True, text=True, encoding="utf-8", timeout=120)
    marker = proc.stderr.rstrip().rsplit("\n", 1)[-1]
    assert marker.startswith("MODULES "), proc.stderr
    modules = json.loads(marker[len("MODULES "):])
    proc.stderr = proc.stderr.rstrip()[: -len(marker)]
    return proc, modules


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """20 lines: 19 of 40-130 codes and one of 3,000 codes (over the 2,048 default)."""
    folder = tmp_path_factory.mktemp("data")
    rng = random.Random(1)
    lines = []
    for i in range(20):
        n = 3000 if i == 7 else 40 + 5 * i
        text = JAPANESE[i % 3] if i % 2 else f"English sentence number {i}."
        key = "codes" if i % 5 == 0 else "code"
        lines.append(json.dumps({"text": text, key: [rng.randrange(65536) for _ in range(n)]}, ensure_ascii=False))
        assert text == (JAPANESE[i % 3] if i % 2 else f"English sentence number {i}.")
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def expected_kept_codes() -> int:
    return sum(40 + 5 * i for i in range(20) if i != 7)


def longest_codes_and_bytes() -> int:
    """Codes + UTF-8 bytes of the transcript of the longest kept line."""
    return max(40 + 5 * i + len((JAPANESE[i % 3] if i % 2 else f"English sentence number {i}.").encode())
               for i in range(20) if i != 7)


@pytest.mark.slow
def test_tiny_model_counts_exactly_and_is_deterministic(tmp_path, data_dir):
    runs = [check_data(tmp_path, "--data", str(data_dir), "--json", "--model", "tiny") for _ in range(2)]
    (first, modules), (second, _) = runs
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout  # the same data prints the same object
    out = json.loads(first.stdout)
    assert isinstance(out["train_samples"], int) and isinstance(out["val_samples"], int)
    assert (out["train_samples"], out["val_samples"]) == (17, 2)  # 19 kept, 10% held out
    assert isinstance(out["audio_seconds"], float)
    assert out["audio_seconds"] == round(expected_kept_codes() / 50, 2)  # kept samples only
    assert isinstance(out["max_tokens"], int) and out["max_tokens"] <= 2048
    assert out["token_count_exact"] is True and out["token_count_note"] is None
    assert out["val_source"] == "split"
    source = f"{data_dir / 'train.jsonl'}:8"
    assert [s["source"] for s in out["skipped"]] == [source]
    assert out["skipped"][0]["tokens"] > 3000 and out["skipped"][0]["max_length"] == 2048
    # Exact for the tiny byte-level tokenizer: 53 template tokens + UTF-8 bytes + codes + END.
    assert out["max_tokens"] == longest_codes_and_bytes() + 53 + 1
    assert modules["heavy"] == [], "--check-data imported model code"
    assert first.stderr.strip() == ""


def expected_replica_max_tokens(data_dir: Path) -> int:
    """Prompt + codes + END of the longest kept line, counted with Llasa's tokenizer replica."""
    from autotune.llasa import PromptBuilder
    from autotune.replica import build_llasa_tokenizer

    builder = PromptBuilder(build_llasa_tokenizer())
    lengths = []
    for line in (data_dir / "train.jsonl").read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        codes = item.get("code") or item.get("codes")
        total = len(builder.prompt_ids(item["text"])) + len(codes) + 1
        if total <= 2048:
            lengths.append(total)
    return max(lengths)


@pytest.mark.slow
def test_default_model_offline_counts_exactly_with_the_replica_tokenizer(tmp_path, data_dir):
    pytest.importorskip("llama_models")
    (first, modules), (second, _) = (check_data(tmp_path, "--data", str(data_dir), "--json") for _ in range(2))
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    out = json.loads(first.stdout)
    assert out["token_count_exact"] is True
    assert any("replica" in note for note in out["notes"])
    assert (out["train_samples"], out["val_samples"]) == (17, 2)
    assert out["audio_seconds"] == round(expected_kept_codes() / 50, 2)
    assert [s["source"] for s in out["skipped"]] == [f"{data_dir / 'train.jsonl'}:8"]
    assert out["max_tokens"] == expected_replica_max_tokens(data_dir)
    assert not [m for m in modules["heavy"] if "modeling_llama" in m or m.startswith("peft")]
    assert "Traceback" not in first.stderr


def test_without_any_tokenizer_lengths_are_estimated_and_say_so(data_dir, monkeypatch, capsys):
    import train
    from autotune import replica

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(replica, "replica_available", lambda: False)
    assert train.main(["--data", str(data_dir), "--check-data", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_count_exact"] is False
    assert "estimate" in out["token_count_note"] and "conservative" in out["token_count_note"]
    # Conservative: 64 template tokens + UTF-8 bytes + codes + END, above the tiny tokenizer's exact 53 + ...
    assert out["max_tokens"] == longest_codes_and_bytes() + 64 + 1


@pytest.mark.slow
def test_default_model_table_says_how_lengths_were_counted(tmp_path, data_dir):
    proc, modules = check_data(tmp_path, "--data", str(data_dir))
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "is not available locally" in text and ("replica" in text or "conservative" in text)
    assert "skipped" in text and "train.jsonl:8" in text
    assert not [m for m in modules["heavy"] if "modeling_llama" in m]


@pytest.mark.slow
def test_val_flag_overrides_the_split(tmp_path, data_dir):
    val = tmp_path / "held-out.jsonl"
    val.write_text("\n".join(json.dumps({"text": t, "code": [1, 2, 3 + i]}, ensure_ascii=False)
                             for i, t in enumerate(JAPANESE)) + "\n", encoding="utf-8")
    proc, _ = check_data(tmp_path, "--data", str(data_dir), "--json", "--model", "tiny", "--val", str(val))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["train_samples"], out["val_samples"], out["val_source"]) == (19, 3, "eval_data_dir")


@pytest.mark.slow
def test_audio_is_encoded_with_the_cache_next_to_the_run(tmp_path):
    sys.path.insert(0, str(REPO))
    import numpy as np

    from autotune.audio import write_wav

    data = tmp_path / "lj"
    for name, seconds in (("a", 1.0), ("b", 2.0)):
        t = np.arange(int(16_000 * seconds)) / 16_000
        write_wav(data / "wavs" / f"{name}.wav", 0.3 * np.sin(2 * np.pi * (220 + 100 * t) * t))
    (data / "metadata.csv").write_text("a|一秒の音声\nb|two seconds|two seconds\n", encoding="utf-8")
    before = sorted(p.name for p in data.rglob("*"))
    args = ("--data", str(data), "--json", "--model", "tiny", "--codec", "tiny", "--output-dir", str(tmp_path / "runs" / "r1"))
    first, modules = check_data(tmp_path, *args)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert out["layout"] == "ljspeech"
    assert out["audio_seconds"] == 3.0  # 50 + 100 codes
    assert out["train_samples"] + out["val_samples"] == 2
    assert len(list((tmp_path / "runs" / ".codec-cache").glob("*.json"))) == 2
    assert sorted(p.name for p in data.rglob("*")) == before  # nothing written into the data folder
    assert not (tmp_path / "runs" / "r1").exists()  # --check-data creates no run folder
    assert not [m for m in modules["heavy"] if "modeling_llama" in m or m.startswith("peft")]


def test_malformed_data_exits_2_with_every_problem_on_its_own_line(tmp_path):
    data = tmp_path / "bad"
    data.mkdir()
    path = data / "train.jsonl"
    path.write_text("\n".join([
        json.dumps({"text": "ok", "code": [1, 2, 3]}),
        '{"text": "cut off", "code": [1, 2',
        json.dumps({"text": "", "code": [1]}),
        json.dumps({"code": [1]}),
        json.dumps({"text": "no codes"}),
        json.dumps({"text": "x", "code": [1, 2.5]}),
        json.dumps({"text": "x", "code": [70000]}),
        json.dumps({"text": "x", "audio": "gone.wav"}),
    ]) + "\n", encoding="utf-8")
    for extra in ((), ("--json",)):
        proc, modules = check_data(tmp_path, "--data", str(data), "--model", "tiny", *extra)
        assert proc.returncode == 2
        assert proc.stdout == ""
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.splitlines()
        first_line = lines[0]
        assert first_line.startswith("error: 7 malformed lines in the data")
        for number, problem in [(2, "invalid JSON"), (3, "empty `text`"), (4, "missing `text`"),
                                (5, "missing speech codes"), (6, "`code` must hold integers, found 2.5"),
                                (7, "`code` value 70000 is out of range 0..65535"), (8, f"audio file `{data / 'gone.wav'}` is missing")]:
            assert any(line.startswith(f"  - {path}:{number}: {problem}") for line in lines), number
        assert not any(f"{path}:1:" in line for line in lines)
        assert modules["heavy"] == []


def test_missing_data_folder_is_a_one_line_error(tmp_path):
    proc, _ = check_data(tmp_path, "--data", str(tmp_path / "nowhere"), "--json", "--model", "tiny")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0].startswith("error: data path")
    assert "Traceback" not in proc.stderr


def _voice_folder(folder: Path) -> Path:
    """Two clips with transcripts (full-width text llasa-trainer's rules change) and a backup/
    copy of the first."""
    sys.path.insert(0, str(REPO))
    import numpy as np

    from autotune.audio import write_wav

    for i, (name, text) in enumerate((("a", "今日は　いい天気！"), ("b", "ＡＢＣです。"))):
        t = np.arange(16_000 * (i + 1)) / 16_000
        write_wav(folder / f"{name}.wav", 0.3 * np.sin(2 * np.pi * (220 + 50 * i) * t))
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    (folder / "backup").mkdir()
    (folder / "backup" / "a.wav").write_bytes((folder / "a.wav").read_bytes())
    (folder / "backup" / "a.txt").write_text("今日は　いい天気！", encoding="utf-8")
    return folder


@pytest.mark.slow
def test_without_the_codec_the_data_is_still_checked_in_full(tmp_path):
    """#28: the codec error was all --check-data said. Now the layout, counts, exact lengths
    (decoded), copies and the normalisation come, with the codec problem as one line."""
    data = _voice_folder(tmp_path / "voice")
    codec = tmp_path / "no-codec-here"
    args = ("--data", str(data), "--model", "tiny", "--codec", str(codec),
            "--set", "data.text_normalization=llasa-trainer")
    proc, modules = check_data(tmp_path, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["layout"] == "audio+txt" and out["train_samples"] + out["val_samples"] == 2
    assert out["audio_seconds"] == 3.0   # 1 s + 2 s, decoded: exact without the codec
    assert out["codec_problem"].startswith(f"could not load the codec `{codec}`")
    assert [(d["source"], d["duplicate_of"]) for d in out["duplicates"]] == [
        (f"{data / 'backup' / 'a.txt'}:1", f"{data / 'a.txt'}:1")]
    assert out["text_normalization"] == {
        "mode": "llasa-trainer", "changed": 2, "transcripts": 2,
        "examples": [{"source": f"{data / 'a.txt'}:1", "before": "今日は　いい天気！", "after": "今日はいい天気!"},
                     {"source": f"{data / 'b.txt'}:1", "before": "ＡＢＣです。", "after": "ABCです。"}]}
    assert any(note.startswith("codec: could not load the codec") for note in out["notes"])
    assert not [m for m in modules["heavy"] if "modeling_llama" in m or m.startswith("peft")]
    proc, _ = check_data(tmp_path, *args)
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0 and "audio+txt" in text
    assert "! codec: could not load the codec" in text and "1 duplicate clip left out" in text
    assert "text normalisation `llasa-trainer`: changes 2 of 2 transcripts" in text


@pytest.mark.slow
def test_without_the_codec_transcript_problems_come_with_the_codec_line(tmp_path):
    data = _voice_folder(tmp_path / "voice")
    (data / "b.txt").write_text("  \n", encoding="utf-8")
    proc, _ = check_data(tmp_path, "--data", str(data), "--model", "tiny", "--codec", str(tmp_path / "none"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == "error: 2 problems in the data; fix them or remove them:"
    assert lines[1] == f"  - {data / 'b.txt'}:1: empty text"
    assert lines[2].startswith(f"  - codec: could not load the codec `{tmp_path / 'none'}`")
