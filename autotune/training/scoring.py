"""Which checkpoint sounds best, measured while training runs.

At each evaluation `SampleCallback` speaks its texts; `ScoreKeeper.after_sampling` then
scores the clips (`scores.Scorer`: intelligibility by Whisper, similarity to real clips of
the same speaker by WavLM), writes `samples/step-N/scores.json`, logs the means to
TensorBoard, hands them to the Trainer as `eval_cer`, `eval_wer`, `eval_error_rate` and
`eval_similarity` (so that `metric_for_best_model` and early stopping can follow them), and
rewrites `report.html`. Scoring never stops training: a scorer that cannot load warns once,
a step it could not score is never the best.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune.config import SCORE_METRICS, Config
from autotune.describe import scores_in_words
from autotune.rundir import checkpoint_step
from autotune.scores import NONE, TINY, Scorer, write_scores

# The Trainer's metric names for each mean of `Scorer.score`.
MEANS = {"cer": "mean_cer", "wer": "mean_wer", "error_rate": "mean_error_rate", "similarity": "mean_similarity"}

# GPU memory the scorers need (weights, activations of one clip), GiB: the defaults are about
# 0.8 B parameters in fp16 (Whisper large-v3-turbo) and 0.1 B in fp32 (WavLM base plus SV).
NEED_GIB = {"openai/whisper-large-v3-turbo": 2.0, "microsoft/wavlm-base-plus-sv": 0.6, TINY: 0.05}
OTHER_MODEL_GIB = 3.0

REFERENCES_DIR = "references"   # <output>/samples/references/: real clips decoded from their codes


def scorer_device(config: Config, training_device: str) -> tuple[str, str]:
    """("cpu" | "cuda:N", why): the GPU only when the training's peak so far, plus the scorers,
    stays under `autotune.memory_fraction` of the card (or its `vram_limit_gib` cap)."""
    wanted = config.scores.device
    if wanted == "cpu" or not training_device.startswith("cuda"):
        return "cpu", "scores.device is cpu" if wanted == "cpu" else "training runs on the CPU"
    import torch

    index = torch.device(training_device).index or 0
    need = sum(NEED_GIB.get(m, OTHER_MODEL_GIB) for m in (config.scores.asr_model, config.scores.speaker_model)
               if m.strip().lower() != NONE) * 2**30
    if wanted == "cuda":
        return training_device, "scores.device is cuda"
    total = torch.cuda.get_device_properties(index).total_memory
    cap = min(total, int(config.autotune.vram_limit_gib * 2**30)) if config.autotune.vram_limit_gib else total
    budget = cap * config.autotune.memory_fraction
    peak = torch.cuda.max_memory_allocated(index)
    if peak + need <= budget:
        return training_device, (f"training peak {peak / 2**30:.1f} GiB + scorers {need / 2**30:.1f} GiB fit the "
                                 f"{budget / 2**30:.1f} GiB budget")
    return "cpu", (f"training peak {peak / 2**30:.1f} GiB leaves less than the scorers' {need / 2**30:.1f} GiB "
                   f"under the {budget / 2**30:.1f} GiB budget")


def choose_references(prompt_text: str, speaker: str | None, val: Sequence[Any], train: Sequence[Any],
                      count: int) -> tuple[list[Any], str]:
    """Up to `count` real samples of the prompt's speaker (any, for a set without speakers),
    from validation (training when validation has none of them), other texts first."""
    def same(s) -> bool:
        return speaker is None or s.prompt_speaker == speaker or s.speaker == speaker

    for pool, where in ((val, "validation"), (train, "training")):
        mine = [s for s in pool if same(s) and (s.audio is not None or s.codes is not None)]
        if mine:
            others = [s for s in mine if s.text != prompt_text]
            return (others or mine)[:count], where
    return [], "none"


def check_metric_has_texts(config: Config, val: Sequence[Any], train: Sequence[Any]) -> None:
    """`cer` (or `wer`) as the metric needs a sample text scored by it: say so before training.

    Raises:
        AutotuneError: no sample text is scored by the chosen error rate.
    """
    metric = config.training.metric_for_best_model
    if metric not in ("cer", "wer") or config.samples.num_texts <= 0:
        return
    from autotune.errors import AutotuneError
    from autotune.metrics import uses_cer
    from autotune.training.samples import choose_prompts

    prompts, _ = choose_prompts(config.samples, val, train)
    kinds = {"cer" if uses_cer(p.text) else "wer" for p in prompts}
    if prompts and metric not in kinds:
        scored = ("Japanese and Chinese texts (by characters)" if metric == "cer"
                  else "space-delimited texts (by words)")
        raise AutotuneError(f"`training.metric_for_best_model: {metric}` scores {scored}, and none of the "
                            f"{len(prompts)} sample texts is one: `--set training.metric_for_best_model=error_rate` "
                            "(each text by its own rate)")


class ScoreKeeper:
    """The scores of every evaluation of one fit, the best and the latest, and the report."""

    def __init__(self, config: Config, output_dir: Path, *, val: Sequence[Any] = (), train: Sequence[Any] = (),
                 training_device: str = "cpu", console: Any = None, report_info: dict[str, Any] | None = None,
                 scorer: Scorer | None = None, warn: Callable[[str], None] | None = None):
        self.config = config
        self.output_dir = Path(output_dir)
        self.val, self.train = list(val), list(train)
        self.voice_prompt: str | None = None   # samples.reference_audio: the voice every sample clones
        self.training_device = training_device
        self.console = console
        self.report_info = dict(report_info or {})
        self.warn = warn or (lambda message: None)
        self.scorer = scorer            # one already loaded on the CPU (the dry run's) is reused there
        self.device_reason: str | None = None
        self.evaluations: list[dict[str, Any]] = []
        self.seconds: list[float] = []
        self.metric = config.training.metric_for_best_model
        self._references: dict[tuple[str, str | None], list[str]] = {}
        self.fallback: str | None = None       # why the best checkpoint follows eval_loss instead of a score
        self.timing: dict[str, Any] | None = None   # the dry run's `time_scorers` record

    def restore(self) -> int:
        """On `--resume`: the evaluations the run scored before it stopped, from their
        scores.json (a later one of the same step replaces it). Returns how many."""
        import json

        from autotune.report import evaluation_from_scores

        for path in sorted((self.output_dir / "samples").glob("step-*/scores.json")):
            try:
                payload = json.loads(path.read_text(encoding="utf-8"))
                step = int(path.parent.name.removeprefix("step-"))
            except (OSError, ValueError):
                continue      # a damaged file costs its evaluation's row, nothing more
            if step not in {e["step"] for e in self.evaluations}:
                self.evaluations.append(evaluation_from_scores(step, payload, f"samples/{path.parent.name}"))
        self.evaluations.sort(key=lambda e: e["step"])
        return len(self.evaluations)

    def use_data(self, val: Sequence[Any], train: Sequence[Any]) -> None:
        """The validation and training samples references are chosen from (after the plan's cut)."""
        self.val, self.train = list(val), list(train)
        self._references.clear()

    # -- the scorer ------------------------------------------------------------

    def _get_scorer(self) -> Scorer:
        if self.scorer is not None and self.device_reason is not None:
            return self.scorer
        device, self.device_reason = scorer_device(self.config, self.training_device)
        if self.scorer is None or self.scorer.device != device:
            self.scorer = Scorer(self.config.scores.asr_model, self.config.scores.speaker_model, device=device,
                                 warn=self.warn)
        return self.scorer

    def said(self, text: str) -> str:
        """`text` as the model was asked to say it: normalised as the run's prompts are
        (`data.text_normalization`, `auto` decided by the model as the run decides it)."""
        from autotune.textnorm import normalize, resolve

        data, model = self.config.data, self.config.model
        return normalize(text, resolve(data.text_normalization, model.name_or_path))

    # -- references --------------------------------------------------------------

    def references(self, text: str, speaker: str | None, codec: Any) -> list[str]:
        """Paths of real clips of the speaker: the recordings, or their codes decoded by the
        codec (written once under samples/references/)."""
        if self.voice_prompt:
            return [self.voice_prompt]    # a cloned voice is compared with the clip it clones
        key = (text, speaker)
        if key in self._references:
            return self._references[key]
        chosen, _ = choose_references(text, speaker, self.val, self.train, self.config.scores.references)
        paths = []
        for sample in chosen:
            if sample.audio is not None and Path(sample.audio).is_file():
                paths.append(str(sample.audio))
            elif codec is not None and sample.codes is not None:
                import hashlib

                from autotune.audio import write_wav
                from autotune.llasa import SAMPLING_RATE

                folder = self.output_dir / "samples" / REFERENCES_DIR
                folder.mkdir(parents=True, exist_ok=True)
                name = hashlib.sha1(sample.source.encode("utf-8", "replace")).hexdigest()[:12]
                path = folder / f"{name}.wav"
                if not path.is_file():
                    write_wav(path, codec.decode([int(c) for c in sample.codes]), SAMPLING_RATE)
                paths.append(str(path))
        self._references[key] = paths
        return paths

    # -- after each sampling --------------------------------------------------------

    def after_sampling(self, step: int, folder: Path, records: list[dict[str, Any]], codec: Any,
                       writer: Any, state: Any = None) -> dict[str, Any] | None:
        """Score the clips of one sampling; the result as written to scores.json."""
        from autotune.report import evaluation_from_scores

        if codec is None:
            return None    # codes without audio: nothing to hear, nothing to score
        started = time.perf_counter()
        scorer = self._get_scorer()
        spoken = [r for r in records if "index" in r and not r.get("skipped")]
        items = []
        for r in spoken:
            wav = folder / r["wav"] if r.get("wav") else None
            # The model was asked to say the text as the run normalises it: that is what the
            # transcript is held against, or a dropped character would count as an error.
            items.append({"text": self.said(r["text"]), "wav": str(wav) if wav else None,
                          "reference_wavs": self.references(r["text"], r.get("speaker"), codec)})
        result = scorer.score(items)
        for record, sample in zip(spoken, result["samples"]):
            if record.get("speaker") is not None:
                sample["speaker"] = record["speaker"]
            if record["text"] != sample["text"]:
                sample["written"] = record["text"]      # the text as the data has it
        result["device_reason"] = self.device_reason
        result["step"] = step
        written = write_scores(folder, result)
        self.seconds.append(time.perf_counter() - started)
        import json

        payload = json.loads(written.read_text(encoding="utf-8"))
        relative = folder.resolve().relative_to(self.output_dir.resolve()).as_posix()
        self.evaluations = [e for e in self.evaluations if e["step"] != step]
        self.evaluations.append(evaluation_from_scores(step, payload, relative))
        for name, mean in MEANS.items():
            value = payload.get(mean)
            if writer is not None and value is not None:
                writer.add_scalar(f"scores/{name}", value, step)
        if writer is not None:
            writer.flush()
        if self.console is not None:
            self.console.print(f"scores at step {step}: {scores_in_words(payload)} ({self.seconds[-1]:.1f} s on "
                               f"{scorer.device})", markup=False, highlight=False)
        if state is not None:
            self.write_report(state)
        return payload

    def fill_metrics(self, step: int, metrics: dict[str, Any], *, main: bool = True, args: Any = None) -> None:
        """`eval_<score>` for each score of this step (the worst value where it was not scored),
        the same on every process. When the scorer the run chooses by cannot load, the best
        checkpoint and early stopping follow `eval_loss` from then on (said once)."""
        evaluation = next((e for e in self.evaluations if e["step"] == step), None) if main else None
        values: dict[str, Any] = {name: (evaluation["means"].get(mean) if evaluation else None)
                                  for name, mean in MEANS.items()}
        values["_unavailable"] = self._unavailable() if main else None
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box = [values]
            dist.broadcast_object_list(box, src=0)
            values = box[0]
        unavailable = values.pop("_unavailable")
        for name, value in values.items():
            metrics[f"eval_{name}"] = value if value is not None else self._worst(name)
        if unavailable and self.fallback is None and args is not None and self.metric in SCORE_METRICS:
            self.fallback = (f"`training.metric_for_best_model: {self.metric}` cannot be measured ({unavailable}); "
                             "the best checkpoint and early stopping follow eval_loss instead")
            args.metric_for_best_model, args.greater_is_better = "eval_loss", False
            self.metric = "eval_loss"
            if main:
                self.warn(f"scores: {self.fallback}")

    def _unavailable(self) -> str | None:
        """Why the score the run chooses by cannot be had at all (its model did not load)."""
        if self.metric not in SCORE_METRICS or self.scorer is None:
            return None
        part = "speaker" if SCORE_METRICS[self.metric] == "speaker_model" else "asr"
        return self.scorer.unavailable(part)

    def _worst(self, name: str) -> float:
        """What a step that could not be scored counts as: never the best, no improvement."""
        higher = name == "similarity"
        return -math.inf if higher else math.inf

    # -- summary and report ------------------------------------------------------------

    def best(self) -> dict[str, Any] | None:
        """The evaluation best by the run's score metric (error rate, else similarity, when
        the run chooses by its loss)."""
        name = self.metric if self.metric in SCORE_METRICS else (
            "error_rate" if any(e["means"].get("mean_error_rate") is not None for e in self.evaluations)
            else "similarity")
        scored = [e for e in self.evaluations if e["means"].get(MEANS[name]) is not None]
        if not scored:
            return None
        higher = name == "similarity"
        chosen = (max if higher else min)(scored, key=lambda e: e["means"][MEANS[name]])
        return {"step": chosen["step"], "by": name, **chosen["means"]}

    def summary(self, adapter_step: int | None = None) -> dict[str, Any]:
        """run_summary.json's `scores`; `adapter` is the evaluation of the saved adapter's step
        (`adapter_step`: the best checkpoint's, or the last), else the latest evaluation."""
        scorer = self.scorer
        latest = self.evaluations[-1] if self.evaluations else None
        adapter = next((e for e in self.evaluations if e["step"] == adapter_step), latest)
        return {
            "asr_model": self.config.scores.asr_model, "speaker_model": self.config.scores.speaker_model,
            "device": scorer.device if scorer else None, "device_reason": self.device_reason,
            "asr_error": scorer.asr_error if scorer else None, "speaker_error": scorer.speaker_error if scorer else None,
            "load_seconds": dict(scorer.load_seconds) if scorer else None,
            "dry_run": self.timing,
            "fallback": self.fallback,
            "evaluations": len(self.evaluations),
            "median_seconds_per_evaluation": round(statistics.median(self.seconds), 3) if self.seconds else None,
            "latest": {"step": latest["step"], **latest["means"]} if latest else None,
            "best": self.best(),
            "adapter": {"step": adapter["step"], **adapter["means"]} if adapter else None,
            "adapter_sample": next((x for x in adapter["samples"] if x.get("wav")), None) if adapter else None,
        }

    def write_report(self, state: Any, summary: dict[str, Any] | None = None) -> Path | None:
        return write_run_report(self.output_dir, self.report_info, state, self.evaluations, self.metric,
                                summary=summary, warn=self.warn)


def write_run_report(output_dir: Path, info: dict[str, Any], state: Any, evaluations: list[dict[str, Any]],
                     metric: str, *, summary: dict[str, Any] | None = None,
                     warn: Callable[[str], None] | None = None) -> Path | None:
    """report.html: the best clips and the curves, the GPU and the plan and why, every
    evaluation. A full disk warns and leaves the previous page."""
    from autotune.errors import AutotuneError
    from autotune.report import write_report

    best = None
    checkpoint = getattr(state, "best_model_checkpoint", None) if state is not None else None
    if checkpoint:
        step = checkpoint_step(checkpoint)
        best = {"step": step, "metric": metric, "value": getattr(state, "best_metric", None),
                "checkpoint": Path(checkpoint).name,
                "why": f"the best {metric} of the evaluations so far; the adapter loads it at the end"}
    run = {**info, "history": list(getattr(state, "log_history", []) or []), "evaluations": evaluations,
           "best": best, "summary": summary or info.get("summary")}
    try:
        return write_report(output_dir, run)
    except AutotuneError as exc:
        (warn or (lambda m: None))(f"report.html not written: {exc.one_line()}")
        return None


def scoring_on(config: Config) -> bool:
    """Scores are measured when a scorer is set and samples are spoken."""
    return config.scores.enabled and config.samples.num_texts > 0


def report_info(output_dir: Path, rec: Any, plan: Any) -> dict[str, Any]:
    """What report.html shows of a run besides its curves and clips: the GPU, the plan and why
    (`rec`: the probe's `profiles.Recommendation`)."""
    return {"title": f"Run {Path(output_dir).name}", "gpus": [g.to_dict() for g in rec.gpus],
            "plan": plan.to_dict(), "reasons": [f"{rec.profile.title}: the matched profile", *rec.reasons]}


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The report's summary card: run_summary.json's headline values and its scores."""
    shown = {key: summary.get(key) for key in (
        "steps", "max_steps", "final_train_loss", "final_eval_loss", "best_eval_loss", "metric_for_best_model",
        "best_metric", "stopped_early_at", "steady_tokens_per_second", "wall_seconds", "interrupted")}
    dry_run = summary.get("dry_run") or {}
    if dry_run.get("reason"):
        shown["plan_reason"] = f"the dry run: {dry_run['reason']}"
    scores = summary.get("scores")
    if scores:
        shown.update({"scored_evaluations": scores.get("evaluations"), "scores_best": scores.get("best"),
                      "scores_of_adapter": scores.get("adapter"), "scores_device": scores.get("device"),
                      "scoring_seconds_per_evaluation": scores.get("median_seconds_per_evaluation")})
    return shown


@dataclass
class LoadedScorers:
    """The scorers the dry run loaded and timed, handed to the training so it loads them once."""

    scorer: Scorer
    timing: dict[str, Any]


def time_scorers(config: Config, warn: Callable[[str], None] | None = None,
                 say: Callable[..., None] | None = None) -> tuple[Scorer, dict[str, Any]]:
    """Load the scorers on the CPU and score one 2-second clip against itself: the dry
    run's record of what scoring costs, said through `say`. The loaded scorer is handed
    to the training."""
    import numpy as np

    begun = time.perf_counter()
    scorer = Scorer(config.scores.asr_model, config.scores.speaker_model, device="cpu", warn=warn)
    started = time.perf_counter()
    scorer.load()
    loaded = time.perf_counter() - started
    t = np.arange(2 * 16000, dtype=np.float32) / 16000
    clip = (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    started = time.perf_counter()
    scorer.score([{"text": "a", "wav": clip, "reference_wavs": [clip]}])
    timing = {"device": "cpu", "load_seconds": round(loaded, 3),
              "load_seconds_by_part": {k: (round(v, 3) if v is not None else None)
                                       for k, v in scorer.load_seconds.items()},
              "seconds_per_clip": round(time.perf_counter() - started, 3),
              "seconds": round(time.perf_counter() - begun, 3),
              "asr_error": scorer.asr_error, "speaker_error": scorer.speaker_error}
    loaded_parts = [f"{name} {seconds:.1f} s" for name, seconds in timing["load_seconds_by_part"].items()
                    if seconds is not None]
    if say is not None and loaded_parts:
        say(f"scorers loaded on the CPU ({', '.join(loaded_parts)}); one 2 s clip scored in "
            f"{timing['seconds_per_clip']:.2f} s", markup=False, highlight=False)
    return scorer, timing
