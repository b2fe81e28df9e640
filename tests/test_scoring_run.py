"""Scores while training runs (issue 16): a real run on the tiny model with the tiny
Whisper and WavLM scorers writes scores.json at each evaluation, TensorBoard scalars,
the scores in run_summary.json and report.html; the best checkpoint and early stopping
follow a score; a scorer that cannot load warns once and training goes on; sweeps rank
by the scores."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from autotune.config import Config, config_rule_problems, validate
from autotune.errors import AutotuneError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "tiny"
BASE = ["--data", str(DATA), "--model", "tiny", "--codec", "tiny", "--set", "training.logging_steps=1",
        "--set", "training.learning_rate=5e-3", "--set", "samples.num_texts=2", "--set", "samples.max_new_tokens=40",
        "--set", "training.max_steps=4", "--set", "training.eval_steps=2", "--set", "training.save_steps=2",
        "--set", "training.use_early_stopping=false"]
TINY_SCORERS = ["--set", "scores.asr_model=tiny", "--set", "scores.speaker_model=tiny"]


def train(*extra: str) -> int:
    from train import main

    return main([*BASE, *extra])


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scored") / "out"
    assert train(*TINY_SCORERS, "--set", "training.metric_for_best_model=cer", "--output-dir", str(out)) == 0
    return out


def test_each_evaluation_writes_its_scores(scored_run: Path):
    for step in (2, 4):
        scores = json.loads((scored_run / "samples" / f"step-{step}" / "scores.json").read_text())
        assert scores["asr_model"] == "tiny" and scores["speaker_model"] == "tiny"
        assert len(scores["samples"]) == 2
        for sample in scores["samples"]:
            assert sample["text"] and sample["metric"] in ("cer", "wer")
            assert isinstance(sample["transcript"], str)
            rate = sample[sample["metric"]]
            assert rate is not None and rate >= 0
            assert -1.0 <= sample["similarity"] <= 1.0
            assert (scored_run / "samples" / f"step-{step}" / sample["wav"]).is_file()
            # Similarity is measured against real clips of the speaker, written beside the steps.
            assert sample["reference_wavs"] and all(
                (scored_run / "samples" / f"step-{step}" / r).is_file() for r in sample["reference_wavs"])
            assert all(r.startswith("../references/") for r in sample["reference_wavs"])
        rates = [s["cer"] for s in scores["samples"] if s["metric"] == "cer"]
        assert scores["mean_cer"] == pytest.approx(sum(rates) / len(rates))
        assert scores["mean_similarity"] == pytest.approx(
            sum(s["similarity"] for s in scores["samples"]) / len(scores["samples"]))


def test_the_summary_keeps_the_best_and_the_latest_and_the_best_checkpoint_follows_cer(scored_run: Path):
    summary = json.loads((scored_run / "run_summary.json").read_text())
    scores = summary["scores"]
    assert scores["evaluations"] == 2 and scores["device"] == "cpu"
    assert scores["load_seconds"]["asr"] is not None and scores["median_seconds_per_evaluation"] > 0
    cer = {step: json.loads((scored_run / "samples" / f"step-{step}" / "scores.json").read_text())["mean_cer"]
           for step in (2, 4)}
    assert scores["latest"]["step"] == 4 and scores["latest"]["mean_cer"] == pytest.approx(cer[4])
    best_step = min(cer, key=lambda s: (cer[s], s))      # the first of equals stays best
    assert scores["best"]["step"] == best_step and scores["best"]["by"] == "cer"
    assert summary["metric_for_best_model"] == "cer"
    assert summary["best_metric"] == pytest.approx(cer[best_step])
    assert Path(summary["best_checkpoint"]).name == f"checkpoint-{best_step}"
    # The adapter saved is the best checkpoint's: its scores are the ones a sweep ranks by.
    assert scores["adapter"]["step"] == best_step
    # The eval loss is still reported as the best loss seen, not the CER.
    state = json.loads((scored_run / "checkpoint-4" / "trainer_state.json").read_text())
    losses = [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h]
    assert summary["best_eval_loss"] == pytest.approx(min(losses))


def test_scores_reach_tensorboard(scored_run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events] = {p.parent for p in (scored_run / "logs").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"scores/cer", "scores/similarity", "scores/error_rate"} <= tags
    assert [e.step for e in acc.Scalars("scores/cer")] == [2, 4]


def test_the_report_plays_every_clip_next_to_a_real_one(scored_run: Path):
    page = (scored_run / "report.html").read_text()
    sources = re.findall(r'<audio controls preload="metadata" src="([^"]+)"', page)
    # 2 evaluations x 2 texts x (generated, real), and the best evaluation's again at the top
    assert len(sources) == 2 * 2 * 2 + 2 * 2
    for src in sources:
        assert not src.startswith(("/", "http")) and (scored_run / src).is_file()
    assert page.count("<svg") == 3                    # loss, intelligibility, similarity
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
    assert "Best checkpoint:" in page and "the matched profile" in page    # the best checkpoint, the plan and why
    assert page.index('id="listen"') < page.index("<svg") < page.index('id="what-ran"') < page.index("<details")


@pytest.mark.slow
def test_the_dry_run_times_the_scorers(tmp_path: Path):
    out = tmp_path / "out"
    assert train(*TINY_SCORERS, "--set", "training.max_steps=2", "--auto", "--output-dir", str(out)) == 0
    record = json.loads((out / "autotune.json").read_text())["scores"]
    assert record["device"] == "cpu" and record["load_seconds"] > 0 and record["seconds_per_clip"] > 0
    assert record["asr_error"] is None and record["speaker_error"] is None
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["scores"]["dry_run"] == record


@pytest.mark.slow
def test_a_scorer_that_cannot_load_warns_once_and_training_goes_on(tmp_path: Path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "no-such-whisper"
    assert train("--set", f"scores.asr_model={missing}", "--set", "scores.speaker_model=tiny",
                 "--set", "training.metric_for_best_model=cer", "--output-dir", str(out)) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert printed.count("training goes on without transcripts and error rates") == 1
    assert printed.count("cannot be measured (could not load the ASR model") == 1
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 4 and (out / "adapter_model.safetensors").is_file()
    assert "no such folder" in summary["scores"]["asr_error"]
    assert "follow eval_loss instead" in summary["scores"]["fallback"]
    # The best checkpoint is chosen by the loss, as said.
    assert summary["metric_for_best_model"] == "eval_loss"
    assert summary["best_metric"] == pytest.approx(summary["best_eval_loss"])
    # Similarity was still measured.
    assert summary["scores"]["latest"]["mean_similarity"] is not None


def test_a_resumed_run_keeps_the_scores_it_had(scored_run: Path, tmp_path: Path):
    """What `--resume` restores: every scored evaluation, from its scores.json."""
    import shutil

    from autotune.training.scoring import ScoreKeeper

    copy = tmp_path / "copy"
    shutil.copytree(scored_run / "samples", copy / "samples")
    (copy / "samples" / "step-6").mkdir()
    (copy / "samples" / "step-6" / "scores.json").write_text("{ cut short")    # damaged: skipped
    keeper = ScoreKeeper(Config(), copy)
    assert keeper.restore() == 2
    assert [e["step"] for e in keeper.evaluations] == [2, 4]
    saved = json.loads((scored_run / "samples" / "step-4" / "scores.json").read_text())
    assert keeper.evaluations[1]["means"]["mean_cer"] == saved["mean_cer"]
    assert keeper.evaluations[1]["samples"][0]["wav"] == "samples/step-4/0.wav"


# ------------------------------------------------------------- early stopping ---

def _keeper(metric: str, **scores_config):
    from autotune.training.scoring import ScoreKeeper

    config = validate({"training": {"metric_for_best_model": metric}, "scores": {"asr_model": "tiny",
                                                                                  "speaker_model": "tiny",
                                                                                  **scores_config}})
    return ScoreKeeper(config, Path("."))


def test_early_stopping_and_the_best_step_follow_the_score():
    """Transformers' own EarlyStoppingCallback and best-metric rule, on the metrics the keeper fills."""
    from transformers import EarlyStoppingCallback, TrainerControl, TrainerState, TrainingArguments

    keeper = _keeper("similarity")
    args = TrainingArguments(output_dir="unused", metric_for_best_model="similarity", greater_is_better=True,
                             load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps",
                             report_to=[], use_cpu=True)
    early = EarlyStoppingCallback(early_stopping_patience=2)
    state, control = TrainerState(), TrainerControl()
    similarity = {10: 0.50, 20: 0.70, 30: 0.65, 40: 0.69}
    for step, value in similarity.items():
        keeper.evaluations.append({"step": step, "samples": [],
                                   "means": {"mean_cer": 0.2, "mean_wer": None, "mean_error_rate": 0.2,
                                             "mean_similarity": value}})
        metrics = {"eval_loss": 1.0}
        keeper.fill_metrics(step, metrics, args=args)
        assert metrics["eval_similarity"] == value and metrics["eval_cer"] == 0.2
        state.global_step = step
        early.on_evaluate(args, state, control, metrics)
        if state.best_metric is None or metrics["eval_similarity"] > state.best_metric:   # Trainer's rule
            state.best_metric, best_step = metrics["eval_similarity"], step
    assert best_step == 20
    assert early.early_stopping_patience_counter == 2 and control.should_training_stop
    assert keeper.best()["step"] == 20 and keeper.best()["by"] == "similarity"


def test_a_step_that_was_not_scored_is_never_the_best():
    keeper = _keeper("cer")
    metrics: dict = {}
    keeper.fill_metrics(10, metrics)
    assert metrics["eval_cer"] == math.inf and metrics["eval_similarity"] == -math.inf


def test_the_sample_callback_runs_before_early_stopping(tmp_path: Path):
    """The scores must be among the metrics when early stopping reads them."""
    from transformers import EarlyStoppingCallback

    from autotune.training.samples import SampleCallback, maybe_add_sample_callback

    class FakeTrainer:                      # only the callback list, as transformers keeps it
        def __init__(self):
            self.callback_handler = SimpleNamespace(callbacks=[object(), EarlyStoppingCallback(), object()])

        def add_callback(self, callback):
            self.callback_handler.callbacks.append(callback)

    trainer = FakeTrainer()
    config = validate({"samples": {"num_texts": 1}})
    val = [SimpleNamespace(text="こんにちは", speaker=None, prompt_speaker=None, num_tokens=10, codes=[1, 2, 3])]
    keeper = _keeper("cer")
    callback = maybe_add_sample_callback(trainer, config, tmp_path, object(), val, None, keeper=keeper)
    kinds = [type(c) for c in trainer.callback_handler.callbacks]
    assert kinds.index(SampleCallback) < kinds.index(EarlyStoppingCallback)
    assert callback.keeper is keeper


# ------------------------------------------------------------------ the rules ---

@pytest.mark.parametrize(("settings", "wanted"), [
    ({"training": {"metric_for_best_model": "cer"}, "scores": {"asr_model": "none"}}, "needs `scores.asr_model`"),
    ({"training": {"metric_for_best_model": "similarity"}, "scores": {"speaker_model": "none"}},
     "needs `scores.speaker_model`"),
    ({"training": {"metric_for_best_model": "cer", "eval_strategy": "no", "load_best_model_at_end": False,
                   "use_early_stopping": False}}, "eval_strategy"),
    ({"training": {"metric_for_best_model": "cer"}, "samples": {"num_texts": 0}}, "samples at every evaluation"),
    ({"training": {"metric_for_best_model": "wer"}, "samples": {"every_n_steps": 50}}, "no `samples.every_n_steps`"),
])
def test_a_score_metric_needs_its_scorer_and_samples_at_each_evaluation(settings, wanted):
    problems = config_rule_problems(validate(settings))
    assert any(wanted in p for p in problems), problems


def test_metric_names_and_directions():
    assert validate({"training": {"metric_for_best_model": "eval_cer"}}).training.metric_for_best_model == "cer"
    assert validate({"training": {"metric_for_best_model": "similarity"}}).training.higher_is_better is True
    assert validate({"training": {"metric_for_best_model": "cer"}}).training.higher_is_better is False
    assert Config().training.higher_is_better is False
    assert config_rule_problems(validate({"training": {"metric_for_best_model": "error_rate"}})) == []


def test_cer_for_english_only_texts_is_refused_before_training(tmp_path: Path, capsys):
    from autotune.training.scoring import check_metric_has_texts

    config = validate({"training": {"metric_for_best_model": "cer"}, "samples": {"num_texts": 2}})
    english = [SimpleNamespace(text=t, speaker=None, prompt_speaker=None, num_tokens=10)
               for t in ("Good morning.", "See you tomorrow.")]
    with pytest.raises(AutotuneError, match="metric_for_best_model=error_rate"):
        check_metric_has_texts(config, english, [])
    check_metric_has_texts(validate({"training": {"metric_for_best_model": "wer"}}), english, [])


def test_the_scorers_use_the_cpu_when_training_does():
    from autotune.training.scoring import scorer_device

    assert scorer_device(Config(), "cpu") == ("cpu", "training runs on the CPU")


def test_the_scorers_share_a_gpu_only_when_the_plan_leaves_room(monkeypatch):
    """A faked 24 GiB card: the scorers go to the GPU under a small training peak, to the CPU
    when the peak leaves less than they need under the memory budget."""
    import torch

    from autotune.training import scoring

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=24 * 2**30))
    config = validate({"autotune": {"memory_fraction": 0.9}})
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i: 10 * 2**30)
    device, why = scoring.scorer_device(config, "cuda:0")
    assert device == "cuda:0" and "fit" in why
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i: 20 * 2**30)
    device, why = scoring.scorer_device(config, "cuda:0")
    assert device == "cpu" and "leaves less" in why


# --------------------------------------------------------------------- sweeps ---

def _trial(index: int, eval_loss: float, scores: dict | None):
    from autotune.sweep.grid import Trial

    return Trial(index, f"t{index}", {"training.learning_rate": 10.0 ** -index}, [], status="ok",
                 eval_loss=eval_loss, train_loss=eval_loss, scores=scores)


def test_a_sweep_ranks_by_the_scores_when_every_trial_has_them(tmp_path: Path):
    from autotune.sweep import grid

    trials = [_trial(0, 1.0, {"mean_error_rate": 0.40, "mean_similarity": 0.9}),
              _trial(1, 2.0, {"mean_error_rate": 0.10, "mean_similarity": 0.5}),
              _trial(2, 0.5, {"mean_error_rate": 0.25, "mean_similarity": 0.7})]
    assert grid.ranking_basis(trials) == "error_rate"
    assert [t.name for t in grid.rank(trials)] == ["t1", "t2", "t0"]
    assert [t.name for t in grid.rank(trials, "similarity")] == ["t0", "t2", "t1"]
    # One trial without scores: the losses rank, and the record says so.
    trials[2].scores = None
    assert grid.ranking_basis(trials) == "eval_loss"
    assert [t.name for t in grid.rank(trials)] == ["t2", "t0", "t1"]
    # Similarity alone (no ASR): similarity ranks, higher first.
    only = [_trial(0, 1.0, {"mean_error_rate": None, "mean_similarity": 0.2}),
            _trial(1, 1.0, {"mean_error_rate": None, "mean_similarity": 0.8})]
    assert grid.ranking_basis(only) == "similarity" and grid.rank(only)[0].name == "t1"


def test_the_sweep_report_lists_the_trials_in_the_table_order(tmp_path: Path):
    from autotune.sweep import grid

    for name in ("t0", "t1"):
        (tmp_path / name / "samples" / "step-2").mkdir(parents=True)
        (tmp_path / name / "samples" / "step-2" / "0.wav").write_bytes(b"RIFF")
    trials = [_trial(0, 1.0, {"mean_error_rate": 0.4, "mean_similarity": 0.9}),
              _trial(1, 2.0, {"mean_error_rate": 0.1, "mean_similarity": 0.5})]
    for t in trials:
        t.sample = {"text": "こんにちは", "wav": "samples/step-2/0.wav", "metric": "cer", "cer": 0.1}
    record = {"ranked_by": grid.ranking_basis(trials)}
    grid.write_report(tmp_path, trials, record, warn=pytest.fail)
    page = (tmp_path / "report.html").read_text()
    assert "ranked by intelligibility" in page
    assert page.index(">t1<") < page.index(">t0<")
    assert 'src="t1/samples/step-2/0.wav"' in page


def test_a_scorer_says_which_part_could_not_load(tmp_path: Path):
    from autotune.scores import Scorer

    scorer = Scorer(str(tmp_path / "missing"), "none")
    assert scorer.unavailable("asr") is None              # not tried yet
    scorer.load()
    assert "no such folder" in scorer.unavailable("asr")
    assert scorer.unavailable("speaker") is None          # off on purpose


# ------------------------------------------------- what the transcript is held against ---

def test_the_transcript_is_held_against_the_text_as_the_run_normalises_it(tmp_path: Path):
    """Issue 25: under `llasa-trainer` normalisation the model is asked to say the normalised
    text, so the error rate compares the transcript with that; the written text is kept beside
    it, and each sample names its speaker (issue 28)."""
    import numpy as np

    from autotune.audio import write_wav
    from autotune.metrics import error_rate
    from autotune.textnorm import normalize
    from autotune.training.scoring import ScoreKeeper

    config = validate({"data": {"text_normalization": "llasa-trainer"},
                       "scores": {"asr_model": "tiny", "speaker_model": "none"}})
    written = ["今日は　いい天気ですね～！", "ＡＢＣの歌を歌おう（笑）"]
    folder = tmp_path / "samples" / "step-2"
    t = np.arange(32_000) / 16_000
    for i in range(2):
        write_wav(folder / f"{i}.wav", (0.3 * np.sin(2 * np.pi * (220 + 40 * i) * t)).astype(np.float32))
    records = [{"index": i, "text": text, "speaker": speaker, "wav": f"{i}.wav"}
               for i, (text, speaker) in enumerate(zip(written, ("alice", None)))]
    keeper = ScoreKeeper(config, tmp_path)
    # No reference clip is asked for (no speaker model), so the codec is never called: any
    # object stands for "the samples have audio".
    payload = keeper.after_sampling(2, folder, records, codec=object(), writer=None)

    said = [normalize(text, "llasa-trainer") for text in written]
    assert said == ["今日はいい天気ですねー!", "ABCの歌を歌おう笑"]
    for sample, text, spoken in zip(payload["samples"], written, said):
        assert sample["text"] == spoken and sample["written"] == text
        assert sample["cer"] == error_rate(spoken, sample["transcript"])[0]
    assert payload["samples"][0]["speaker"] == "alice" and "speaker" not in payload["samples"][1]
    # With no normalisation the text is the one written, and nothing is added.
    plain = ScoreKeeper(validate({"data": {"text_normalization": "none"},
                                  "scores": {"asr_model": "tiny", "speaker_model": "none"}}), tmp_path)
    again = plain.after_sampling(4, folder, records, codec=object(), writer=None)
    assert [s["text"] for s in again["samples"]] == written and not any("written" in s for s in again["samples"])
