"""Faithful to the official Llasa code: llasa-trainer's own YAML files, speakers, shipped commands."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from autotune.compat import run_keys
from autotune.config import resolve_config
from autotune.errors import AutotuneError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "tiny"

# Written the way laksjdjf/llasa-trainer's config/example.yaml is: its key set, its Japanese comments.
LLASA_TRAINER_YAML = """\
# LLASA TTS trainer 設定例ファイル
# =============================================================================
# 基本設定
# =============================================================================

# データとモデルパス
data_dir: {data_dir}          # 学習データのパス
output_dir: {output_dir}           # 学習結果の保存先
model_name: tiny   # ベースモデル名

# CUDA設定
cuda_visible_devices: "0"               # 使用するGPU（"0,1"で複数GPU）

# =============================================================================
# LoRA設定 - モデルの微調整パラメータ
# =============================================================================
lora:
  r: 16                    # LoRAのランク（8-64推奨、大きいほど表現力UP、メモリ使用量UP）
  lora_alpha: 32          # スケーリング係数（通常はrの2倍）
  lora_dropout: 0.05      # ドロップアウト率（0.0-0.1）
  bias: none              # バイアス学習（none/all/lora_only）
  target_modules:         # LoRAを適用するレイヤー
    - q_proj
    - k_proj
    - v_proj
    - o_proj

# =============================================================================
# 学習設定
# =============================================================================
training:
  num_train_epochs: 1                   # エポック数
  per_device_train_batch_size: 1        # デバイス当たりのバッチサイズ
  gradient_accumulation_steps: 2        # 勾配蓄積ステップ（実効バッチサイズ = batch_size * accumulation）
  learning_rate: 1e-4                   # 学習率
  weight_decay: 0.01                    # 重み減衰
  save_strategy: steps                  # 保存タイミング
  save_steps: 2                         # 保存間隔（ステップ）
  save_total_limit: 3                   # 保存する最大チェックポイント数
  fp16: false                           # 16bit精度使用（メモリ節約）
  bf16: false                           # bfloat16精度使用（A100等で有効）
  gradient_checkpointing: false         # 勾配チェックポイント（メモリ vs 速度）
  warmup_ratio: 0.03                   # ウォームアップ比率
  lr_scheduler_type: cosine            # 学習率スケジューラ
  report_to: null                      # ログ出力先（wandb/tensorboard/null）

# =============================================================================
# テスト設定 - 学習中の音声生成テスト
# =============================================================================
test:
  text: 天使ちゃんマジ天使。        # テスト用テキスト
  interval: 2                          # テスト実行間隔（ステップ）
"""


def write_their_yaml(tmp_path: Path, **values: str) -> Path:
    path = tmp_path / "their.yaml"
    values = {"data_dir": str(DATA / "train.jsonl"), "output_dir": str(tmp_path / "trained"), **values}
    path.write_text(LLASA_TRAINER_YAML.format(**values), encoding="utf-8")
    return path


def test_their_keys_map_onto_ours_and_say_so_in_one_line(tmp_path):
    from autotune.config import load_yaml_file

    tree = load_yaml_file(write_their_yaml(tmp_path))
    resolved = resolve_config(None, tree)
    c = resolved.config
    assert c.model.name_or_path == "tiny"
    assert c.samples.texts == ["天使ちゃんマジ天使。"] and c.samples.every_n_steps == 2
    assert c.training.report_to == ["none"] and c.training.save_strategy == "steps"
    assert c.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    mapped = [n for n in resolved.notes if n.startswith("read llasa-trainer keys")]
    assert len(mapped) == 1 and "model_name -> model.name_or_path" in mapped[0] and "\n" not in mapped[0]
    assert run_keys(tree) == {"data_dir": str(DATA / "train.jsonl"), "output_dir": str(tmp_path / "trained"),
                              "cuda_visible_devices": "0"}


def test_full_fine_tuning_is_refused_with_the_reason(tmp_path):
    from autotune.config import load_yaml_file

    path = write_their_yaml(tmp_path)
    text = path.read_text(encoding="utf-8")
    path.write_text(re.sub(r"lora:\n(  .*\n)+", "lora: null   # nullの場合はFFT\n", text), encoding="utf-8")
    with pytest.raises(AutotuneError, match="full fine-tuning"):
        resolve_config(None, load_yaml_file(path))


@pytest.mark.slow
def test_their_file_trains_unchanged_and_flags_win(tmp_path, monkeypatch):
    """`python train.py --config their.yaml --auto`: the file names the data, output and model.
    `--output-dir` on the command line wins over the file's `output_dir`."""
    from train import main

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    path = write_their_yaml(tmp_path)
    out = tmp_path / "flag-out"
    code = main(["--config", str(path), "--auto", "--codec", "tiny", "--output-dir", str(out),
                 "--set", "training.max_steps=2", "--set", "samples.max_new_tokens=8"])
    assert code == 0
    assert not (tmp_path / "trained").exists(), "the flag's --output-dir wins over the file's output_dir"
    summary = json.loads((out / "run_summary.json").read_text(encoding="utf-8"))
    assert summary["steps"] == 2
    codes = json.loads((out / "samples" / "step-2" / "codes.json").read_text(encoding="utf-8"))
    assert [s["text"] for s in codes["samples"]] == ["天使ちゃんマジ天使。"], "test.text is what is spoken"
    assert not (out / "logs").exists(), "report_to: null reports nothing"
    import os

    assert os.environ.get("CUDA_VISIBLE_DEVICES") == "0", "cuda_visible_devices applies when the variable is unset"


def test_data_comes_from_the_file_or_a_flag_but_must_come(tmp_path, capsys):
    from autotune.cli import run_main
    from train import main

    with pytest.raises(SystemExit) as exit_info:
        run_main(main, ["--check-data"])
    assert exit_info.value.code == 2
    assert "no data given" in capsys.readouterr().err


def test_no_shipped_file_tells_the_user_to_run_a_script_that_does_not_exist():
    shipped = [p for p in (ROOT / "config").rglob("*.yaml")] + [ROOT / "README.md"]
    assert len(shipped) >= 3
    for path in shipped:
        for script in re.findall(r"python ([\w/.-]+\.py)", path.read_text(encoding="utf-8")):
            assert (ROOT / script).is_file(), f"{path.name} tells the user to run {script}"


# ---------------------------------------------------------------- speakers ---

def two_speaker_data(folder: Path) -> Path:
    lines = [json.loads(line) for line in (DATA / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "train.jsonl").open("w", encoding="utf-8") as f:
        for i, item in enumerate(lines):
            item["speaker"] = "alice" if i % 3 else "bob"
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    return folder


def test_check_data_reports_seconds_per_speaker(tmp_path, capsys):
    from train import main

    data = two_speaker_data(tmp_path / "data")
    assert main(["--data", str(data), "--check-data", "--json", "--model", "tiny"]) == 0
    report = json.loads(capsys.readouterr().out)
    codes = {"alice": 0, "bob": 0}
    for i, line in enumerate((data / "train.jsonl").read_text(encoding="utf-8").splitlines()):
        codes["alice" if i % 3 else "bob"] += len(json.loads(line)["code"])
    assert report["speakers"] == {name: round(n / 50, 2) for name, n in sorted(codes.items(), key=lambda kv: -kv[1])}


def test_a_set_without_speakers_builds_the_plain_prompt():
    from autotune.batches import build_example
    from autotune.reading import Sample
    from autotune.llasa import PromptBuilder, build_tiny_tokenizer

    builder = PromptBuilder(build_tiny_tokenizer())
    plain = build_example(Sample(text="今日は", source="x", codes=np.array([1, 2], dtype=np.int32)), builder)
    named = build_example(Sample(text="今日は", source="x", codes=np.array([1, 2], dtype=np.int32),
                                 speaker="alice", prompt_speaker="alice"), builder)
    tok = builder.tokenizer
    assert "Speaker" not in tok.decode(plain["input_ids"])
    assert "<|end_header_id|>\n\nSpeaker alice<|SPEECH_GENERATION_START|>" in tok.decode(named["input_ids"])
    # The speaker's name is prompt, not target: only SPEECH_GENERATION_START onwards is labelled.
    start = named["input_ids"].index(builder.tokens.speech_start)
    assert all(label == -100 for label in named["labels"][:start])


def test_multi_speaker_training_samples_every_speaker_and_synthesizes_by_name(tmp_path):
    from train import main

    import synthesize

    data = two_speaker_data(tmp_path / "data")
    out = tmp_path / "run"
    code = main(["--data", str(data), "--model", "tiny", "--codec", "tiny", "--output-dir", str(out),
                 "--set", "training.max_steps=2", "--set", "training.eval_steps=2", "--set", "training.save_steps=2",
                 "--set", "samples.max_new_tokens=8"])
    assert code == 0
    summary = json.loads((out / "run_summary.json").read_text(encoding="utf-8"))
    assert set(summary["speakers"]) == {"alice", "bob"} and summary["speaker_conditioning"] is True
    sampled = json.loads((out / "samples" / "step-2" / "codes.json").read_text(encoding="utf-8"))
    assert sorted(s["speaker"] for s in sampled["samples"]) == ["alice", "bob"]
    wav = tmp_path / "bob.wav"
    assert synthesize.main(["--adapter", str(out), "--text", "こんにちは", "-o", str(wav), "--speaker", "bob",
                            "--codec", "tiny", "--max-new-tokens", "8", "--seed", "1"]) == 0
    assert wav.is_file()
    with pytest.raises(AutotuneError, match="did you mean `alice`"):
        synthesize.main(["--adapter", str(out), "--text", "こんにちは", "-o", str(wav), "--speaker", "alise",
                         "--codec", "tiny"])


def test_prompts_name_speakers_only_for_a_set_a_user_picks_from(tmp_path):
    from autotune.codec import build_tiny_codec
    from autotune.data import MAX_NAMED_SPEAKERS, conditioned_on_speakers, load_dataset
    from autotune.llasa import PromptBuilder, build_tiny_tokenizer

    assert not conditioned_on_speakers({}) and not conditioned_on_speakers({"demo": 60.0})
    assert conditioned_on_speakers({"a": 1.0, "b": 2.0})
    assert not conditioned_on_speakers({str(i): 1.0 for i in range(MAX_NAMED_SPEAKERS + 1)})
    # examples/tiny names one speaker ("demo"): its prompts stay Llasa's plain ones, and the name is reported.
    report = load_dataset(DATA, max_length=2048, val_fraction=0.1, split_seed=42,
                          prompt_builder=PromptBuilder(build_tiny_tokenizer()),
                          codec_loader=build_tiny_codec, cache_dir=tmp_path / "cache", progress=False)
    assert list(report.speakers()) == ["demo"] and not report.speaker_conditioning
    assert all(s.speaker == "demo" and s.prompt_speaker is None for s in report.train + report.val)


# ------------------------------------------------------------------ the prompt's template ---

NO_TEMPLATE = "has no chat template, and Llasa's prompt is the chat template the model was trained with"


def test_a_tokenizer_without_a_chat_template_is_refused_not_given_a_guess():
    """Before, such a tokenizer silently got a template without Llama 3.2's system block:
    21 prompt tokens where Llasa was trained on 46."""
    import copy

    from autotune.llasa import PromptBuilder, build_tiny_tokenizer

    bare = copy.copy(build_tiny_tokenizer())   # the cached original is shared: never changed
    for missing in (None, ""):
        bare.chat_template = missing
        with pytest.raises(AutotuneError) as info:
            PromptBuilder(bare)
        message = info.value.one_line()
        assert "\n" not in message and NO_TEMPLATE in message
        assert "`chat_template.jinja`" in message and "hf download" in message
    assert build_tiny_tokenizer().chat_template   # the tiny model keeps its own template
    assert PromptBuilder(build_tiny_tokenizer()).prompt_ids("今日は")


@pytest.mark.slow
def test_the_replicas_llama32_template_gives_the_system_block_and_without_it_nothing():
    import copy

    from autotune import replica
    from autotune.llasa import PromptBuilder

    if not replica.replica_available():
        pytest.skip("the offline Llasa tokenizer needs `llama-models` and `tiktoken`")
    tokenizer = replica.build_llasa_tokenizer()
    builder = PromptBuilder(tokenizer)
    prefix = tokenizer.decode(builder.prefix_ids)
    # The date is the template's own fixed one, never today's: a prompt must not change at midnight.
    assert prefix.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge "
                             "Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>")
    text_ids = builder.text_ids(["今日は"])[0]
    assert len(builder.prompt_ids("今日は")) - len(text_ids) == builder.overhead == 44
    bare = copy.copy(tokenizer)
    bare.chat_template = None
    with pytest.raises(AutotuneError, match=NO_TEMPLATE):
        PromptBuilder(bare)


def test_a_model_folder_that_lost_its_template_stops_check_data_in_one_line(tmp_path, capsys):
    from autotune.cli import run_main
    from autotune.llasa import build_tiny_model, build_tiny_tokenizer
    from train import main

    folder = tmp_path / "llasa-copy"
    build_tiny_model().save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    (folder / "chat_template.jinja").unlink()   # copied without it, as a hand-picked copy may be
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, ["--check-data", "--data", str(DATA), "--model", str(folder)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [l for l in err.splitlines() if l.startswith("error:")]
    assert f"the tokenizer of `{folder}` {NO_TEMPLATE}" in line
