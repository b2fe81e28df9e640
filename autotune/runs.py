"""Run folders as the speaking side sees them: what a run recorded (codec, text normalisation,
speakers, reference clips), its state, its checkpoints, and keeping one checkpoint.

Every file is read through the bounded reader and every value is checked for its type: a
`run_config.yaml` whose `data.codec` is a list is one line naming the file and the key, never
a traceback deep in the codec loader. No torch here.

A kept checkpoint is `<run>/kept-<checkpoint>/`: the adapter files plus `kept.json` (where it
came from, its scores). It sits inside the run, so everything that reads a checkpoint's run
config one level up (synthesize.py, the server, the UI) reads the run's; HF's checkpoint
rotation only deletes `checkpoint-*`, so a kept one stays when training goes on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autotune.errors import AutotuneError
from autotune.files import CONFIG_LIMIT_BYTES, read_user_json, read_user_text
from autotune.rundir import (FAILED_RECORD, MARKER, REPORT, RESOLVED_CONFIG, RUN_CONFIG, RUN_SUMMARY, SAMPLES_DIR,
                             SWEEP_RECORD, holder_of, path_text, write_json)
from autotune.textnorm import AUTO, NORMALIZATIONS, resolve

CONFIG_FILES = (RESOLVED_CONFIG, RUN_CONFIG)
ADAPTER_FILE_NAMES = ("adapter_config.json", "adapter_model.safetensors")
KEPT_PREFIX = "kept-"
KEPT_RECORD = "kept.json"
REFERENCES = "references"
MAX_REFERENCES = 3
MAX_RUNS_LISTED = 500
STATES = ("running", "finished", "interrupted", "failed")


# ------------------------------------------------------------ what a run recorded ---


@dataclass(frozen=True)
class RunSettings:
    """The run's recorded choices that speaking must follow (None: not recorded)."""

    config_file: Path | None = None
    model: str | None = None
    codec: str | None = None
    text_normalization: str | None = None
    asr_model: str | None = None
    speaker_model: str | None = None

    def normalization_for(self, base_model: str) -> str:
        """The recorded normalisation, or `auto`'s choice for the model (older runs lack it)."""
        recorded = self.text_normalization or AUTO
        return resolve(recorded, base_model)


def adapter_levels(adapter: Path) -> tuple[Path, ...]:
    """The folders whose run records apply to an adapter: its own, then its run's (checkpoint-N, kept-X)."""
    return (adapter, adapter.parent)


def run_settings(adapter: str | os.PathLike[str]) -> RunSettings:
    """What the run beside `adapter` recorded in resolved_config.yaml (else run_config.yaml).

    Raises:
        AutotuneError: the file is not readable YAML, or a key it holds has the wrong type.
    """
    import yaml

    for folder in adapter_levels(Path(adapter)):
        for name in CONFIG_FILES:
            path = folder / name
            if not path.exists():
                continue
            text = read_user_text(path, what="run config", limit_bytes=CONFIG_LIMIT_BYTES)
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                reason = " ".join(str(exc).split())[:120]
                raise AutotuneError(f"run config `{path_text(path)}` is not valid YAML ({reason}): fix or remove "
                                    "the file, or pass `--codec` and `--model` yourself") from None
            return _settings_from(path, data)
    return RunSettings()


def _settings_from(path: Path, data: Any) -> RunSettings:
    if data is None:
        return RunSettings(config_file=path)
    if not isinstance(data, dict):
        raise AutotuneError(f"run config `{path_text(path)}` is a {type(data).__name__}, not a mapping of sections: "
                            "fix or remove the file")

    def value(section: str, key: str, allowed: tuple[str, ...] = ()) -> str | None:
        part = data.get(section)
        if part is None:
            return None
        if not isinstance(part, dict):
            raise AutotuneError(f"run config `{path_text(path)}`: `{section}` is a {type(part).__name__}, not a "
                                "section of keys: fix or remove the file")
        item = part.get(key)
        if item is None:
            return None
        if not isinstance(item, str) or not item.strip():
            kind = "an empty text" if isinstance(item, str) else f"a {type(item).__name__}"
            raise AutotuneError(f"run config `{path_text(path)}`: `{section}.{key}` is {kind}, expected a name or "
                                f"path: fix the file (or pass the value on the command line)")
        if allowed and item not in allowed:
            raise AutotuneError(f"run config `{path_text(path)}`: `{section}.{key}` is `{item}`, expected one of "
                                f"{', '.join(allowed)}: fix the file")
        return item

    return RunSettings(config_file=path, model=value("model", "name_or_path"), codec=value("data", "codec"),
                       text_normalization=value("data", "text_normalization", (*NORMALIZATIONS, AUTO)),
                       asr_model=value("scores", "asr_model"), speaker_model=value("scores", "speaker_model"))


def read_summary(folder: Path) -> dict[str, Any] | None:
    """run_summary.json as a dict, None when there is none or it is unreadable."""
    path = folder / RUN_SUMMARY
    if not path.exists():
        return None
    try:
        summary = read_user_json(path, what="run summary")
    except AutotuneError:
        return None
    return summary if isinstance(summary, dict) else None


def trained_speakers(adapter: str | os.PathLike[str]) -> dict[str, float] | None:
    """The speakers a run conditioned its prompts on ({name: seconds}); {} when it trained
    without speaker names; None when not recorded."""
    for folder in adapter_levels(Path(adapter)):
        summary = read_summary(folder)
        if summary is None:
            continue
        speakers = summary.get("speakers")
        if not isinstance(speakers, dict) or not all(isinstance(k, str) for k in speakers):
            return None
        if not summary.get("speaker_conditioning", True):
            return {}
        return {k: float(v) if isinstance(v, (int, float)) else 0.0 for k, v in speakers.items()}
    return None


def run_root(adapter: Path) -> Path:
    """The run an adapter belongs to: itself, or the run above a checkpoint-N / kept-X folder."""
    if any((adapter / name).is_file() for name in (MARKER, RUN_CONFIG, RUN_SUMMARY)):
        return adapter
    return adapter.parent


def reference_clips(adapter: Path, speaker: str | None = None, limit: int = MAX_REFERENCES) -> list[Path]:
    """Real clips of the voice the run was scored against (samples/references/), those of
    `speaker` when the run recorded which clips belong to whom."""
    root = run_root(adapter)
    samples = root / SAMPLES_DIR
    chosen: list[Path] = []
    for step in sorted(samples.glob("step-*"), key=_step_of, reverse=True):
        scores = _json_or_none(step / "scores.json")
        codes = _json_or_none(step / "codes.json")
        speakers = {s.get("index"): s.get("speaker") for s in (codes or {}).get("samples", []) if isinstance(s, dict)}
        for sample in (scores or {}).get("samples", []):
            if not isinstance(sample, dict) or (speaker is not None and speakers.get(sample.get("index")) != speaker):
                continue
            for ref in sample.get("reference_wavs") or []:
                path = (step / str(ref)).resolve()
                if path.is_file() and path not in chosen and _inside(path, root):
                    chosen.append(path)
        if chosen:
            return chosen[:limit]
    folder = samples / REFERENCES
    return sorted(p for p in folder.glob("*.wav") if p.is_file())[:limit] if folder.is_dir() else []


def _json_or_none(path: Path) -> Any:
    try:
        return read_user_json(path, what="run record") if path.is_file() else None
    except AutotuneError:
        return None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder.resolve() or folder.resolve() in path.parents


def _step_of(path: Path) -> int:
    match = re.search(r"(\d+)$", path.name)
    return int(match.group(1)) if match else -1


# ------------------------------------------------------------ checkpoints ---


@dataclass(frozen=True)
class Checkpoint:
    """One adapter of a run: the run's own (`adapter`), a `checkpoint-N`, or a `kept-...` one."""

    name: str            # "adapter", "checkpoint-300", "kept-checkpoint-300"
    path: Path
    step: int | None
    scores: dict[str, Any] | None = None     # the evaluation's means at that step, when scored

    @property
    def label(self) -> str:
        return self.name if self.step is None or self.name != "adapter" else f"adapter (step {self.step})"


def is_adapter(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ADAPTER_FILE_NAMES)


def checkpoints(run: Path) -> list[Checkpoint]:
    """The run's adapters, its own first, then checkpoints by step, then kept ones."""
    summary = read_summary(run) or {}
    step_scores = _scores_by_step(run)
    found: list[Checkpoint] = []
    if is_adapter(run):
        step = _adapter_step(summary)
        found.append(Checkpoint("adapter", run, step, step_scores.get(step) if step is not None else None))
    try:
        children = sorted((p for p in run.iterdir() if p.is_dir() and is_adapter(p)), key=lambda p: p.name)
    except OSError:
        children = []
    numbered = sorted((p for p in children if p.name.startswith("checkpoint-")), key=_step_of)
    for path in numbered:
        found.append(Checkpoint(path.name, path, _step_of(path), step_scores.get(_step_of(path))))
    for path in children:
        if path.name.startswith(KEPT_PREFIX):
            record = _json_or_none(path / KEPT_RECORD) or {}
            step = record.get("step") if isinstance(record.get("step"), int) else None
            found.append(Checkpoint(path.name, path, step, step_scores.get(step) if step is not None else None))
    return found


def _adapter_step(summary: dict[str, Any]) -> int | None:
    scores = summary.get("scores") if isinstance(summary.get("scores"), dict) else {}
    adapter = scores.get("adapter") if isinstance(scores.get("adapter"), dict) else {}
    step = adapter.get("step", summary.get("steps"))
    return step if isinstance(step, int) else None


def _scores_by_step(run: Path) -> dict[int, dict[str, Any]]:
    found = {}
    for folder in (run / SAMPLES_DIR).glob("step-*"):
        scores = _json_or_none(folder / "scores.json")
        if isinstance(scores, dict):
            found[_step_of(folder)] = {k: scores.get(k) for k in ("mean_cer", "mean_wer", "mean_similarity")}
    return found


def keep(checkpoint: Path, *, scores: dict[str, Any] | None = None) -> Path:
    """Copy a checkpoint's adapter to `<run>/kept-<checkpoint>/` (whole or not at all) and
    return it; a second keep of the same checkpoint returns the folder already there."""
    checkpoint = Path(checkpoint)
    if not is_adapter(checkpoint):
        raise AutotuneError(f"`{path_text(checkpoint)}` holds no adapter (adapter_config.json and "
                            "adapter_model.safetensors): pick a checkpoint of the run")
    if checkpoint.name.startswith(KEPT_PREFIX):
        return checkpoint
    run = run_root(checkpoint)
    name = "final" if checkpoint == run else checkpoint.name
    target = run / f"{KEPT_PREFIX}{name}"
    if is_adapter(target) and all(_same_file(checkpoint / n, target / n) for n in ADAPTER_FILE_NAMES):
        return target
    if target.exists():
        target = run / f"{KEPT_PREFIX}{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        staging = Path(tempfile.mkdtemp(dir=run, prefix=f".{KEPT_PREFIX}{name}.", suffix=".tmp"))
    except OSError as exc:
        raise _keep_error(checkpoint, run, exc) from None
    try:
        for file_name in ADAPTER_FILE_NAMES:
            shutil.copy2(checkpoint / file_name, staging / file_name)
        summary = read_summary(run) or {}
        step = _step_of(checkpoint) if checkpoint != run else _adapter_step(summary)
        write_json(staging / KEPT_RECORD, {"source": checkpoint.name if checkpoint != run else "adapter",
                                           "step": step, "scores": scores,
                                           "kept_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        os.chmod(staging, 0o755)
        os.rename(staging, target)
    except (OSError, AutotuneError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise _keep_error(checkpoint, run, exc) from None
    return target


def _keep_error(checkpoint: Path, run: Path, exc: BaseException) -> AutotuneError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())[:160]
    return AutotuneError(f"cannot keep `{path_text(checkpoint)}` in `{path_text(run)}` ({reason}): free space or "
                         "make the run folder writable")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.stat().st_size != b.stat().st_size:
            return False
        with open(a, "rb") as x, open(b, "rb") as y:
            while True:
                chunk = x.read(1 << 20)
                if chunk != y.read(1 << 20):
                    return False
                if not chunk:
                    return True
    except OSError:
        return False


# ------------------------------------------------------------ the runs under a folder ---


@dataclass
class RunEntry:
    """One run for the Runs list."""

    name: str                  # relative to the folder listed
    path: Path
    state: str                 # one of STATES
    why: str = ""              # for failed/interrupted: what happened, how to go on
    steps: int | None = None
    max_steps: int | None = None
    best_eval_loss: float | None = None
    best_scores: dict[str, Any] | None = None
    started: str | None = None
    finished: str | None = None
    report: Path | None = None
    checkpoints: list[Checkpoint] = field(default_factory=list)


def run_state(folder: Path, summary: dict[str, Any] | None) -> tuple[str, str]:
    """(state, why) of a run folder: running while its lock is held, then what the summary says."""
    pid = holder_of(folder)
    if pid is not None:
        return "running", f"process {pid}" if pid > 0 else ""
    if (folder / FAILED_RECORD).is_file():
        record = _json_or_none(folder / FAILED_RECORD) or {}
        return "failed", str(record.get("error") or record.get("reason") or "the trial failed")[:200]
    if summary is None:
        return "failed", "it ended without a summary (an error, or the process was killed)"
    if summary.get("interrupted"):
        return "interrupted", f"stopped by {summary['interrupted']}; `train.py ... --resume` continues it"
    if summary.get("adapter_saved") is False:
        return "failed", "the final adapter was not saved"
    return "finished", ""


def describe_run(folder: Path, name: str) -> RunEntry:
    summary = read_summary(folder)
    state, why = run_state(folder, summary)
    summary = summary or {}
    scores = summary.get("scores") if isinstance(summary.get("scores"), dict) else {}
    best = scores.get("best") if isinstance(scores.get("best"), dict) else None
    started = None
    for record in (RUN_CONFIG, MARKER):
        if (folder / record).is_file():
            started = time.strftime("%Y-%m-%d %H:%M", time.localtime((folder / record).stat().st_mtime))
            break
    finished = summary.get("finished_at")
    return RunEntry(name=name, path=folder, state=state, why=why, steps=_int(summary.get("steps")),
                    max_steps=_int(summary.get("max_steps")), best_eval_loss=_number(summary.get("best_eval_loss")),
                    best_scores=best, started=started,
                    finished=finished.replace("T", " ")[:16] if isinstance(finished, str) else None,
                    report=folder / REPORT if (folder / REPORT).is_file() else None,
                    checkpoints=checkpoints(folder))


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def list_runs(folder: str | os.PathLike[str]) -> list[RunEntry]:
    """The runs under `folder` (itself when it is a run; a sweep's trials one level down),
    newest first. Only folders this tool made count (its marker, a run config, a sweep)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise AutotuneError(f"`--runs {path_text(folder)}` is not a folder: pass the folder your runs are in "
                            "(train.py's --output-dir goes under it, e.g. runs/)")
    entries: list[RunEntry] = []

    def visit(path: Path, depth: int) -> None:
        if len(entries) >= MAX_RUNS_LISTED:
            return
        if (path / SWEEP_RECORD).is_file() or not _is_run(path):
            if depth < 2:
                try:
                    children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
                except OSError:
                    return
                for child in children:
                    visit(child, depth + 1)
            return
        entries.append(describe_run(path, path.relative_to(root).as_posix() if path != root else path.name))

    visit(root, 0)
    entries.sort(key=lambda e: (e.path / RUN_CONFIG).stat().st_mtime if (e.path / RUN_CONFIG).is_file() else 0,
                 reverse=True)
    return entries


def _is_run(path: Path) -> bool:
    return any((path / name).is_file() for name in (RUN_CONFIG, RUN_SUMMARY)) or \
        ((path / MARKER).is_file() and is_adapter(path))


def summary_json(entry: RunEntry) -> dict[str, Any]:
    """A RunEntry as plain JSON (for the UI's table and tests)."""
    return json.loads(json.dumps({
        "name": entry.name, "state": entry.state, "why": entry.why, "steps": entry.steps,
        "max_steps": entry.max_steps, "best_eval_loss": entry.best_eval_loss, "best_scores": entry.best_scores,
        "started": entry.started, "finished": entry.finished,
        "report": str(entry.report) if entry.report else None,
        "checkpoints": [c.name for c in entry.checkpoints]}, default=str))
