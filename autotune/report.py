"""One page to judge a run by ear and by number: `report.html` in the run's folder.

In the order a person asks: can I listen to it, and is it getting better (the best
evaluation's clips beside the real voice, with its scores, then the loss and score
curves); what ran (the hardware, and the plan and why, in words); then the details
(every evaluation, and every recorded value in a collapsed list).

A single self-contained HTML file: curves as inline SVG, a small inline style
sheet, no scripts, nothing from the network. Audio is referenced by paths
relative to the page (`samples/step-100/0.wav`), so the page opens from disk
and still works when the run folder is zipped or moved. Clips that live outside
the folder (a speaker's real recordings in the data set) are copied into
`report-audio/` beside the page for that reason. The page and the copies are
written whole (a temporary name, then a rename), so a page opened while the run
rewrites it is the old one or the new one, never half of either.

Values read as `describe` words them: rates as percentages, similarity as a cosine, the
plan and the hardware as sentences, here as in the model card and the sweep's page.

Only the standard library is used: the driver and the sweep call this without torch.
"""

from __future__ import annotations

import hashlib
import html
import math
import os
import shutil
import urllib.parse
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from autotune.describe import finite, format_value, plain, scores_in_words, similarity
from autotune.describe import hardware_in_words, percent, plan_in_words
from autotune.rundir import REPORT, atomic_path, write_text

__all__ = ["AUDIO_COPIES", "evaluation_from_scores", "write_report", "write_sweep_report"]

#: Where copies of clips from outside the run folder go, beside the page.
AUDIO_COPIES = "report-audio"

_PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2")

_CSS = """
:root { color-scheme: light; --ink: #1f2937; --muted: #6b7280; --line: #e5e7eb; --accent: #2563eb; --best: #059669; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "Noto Sans CJK JP",
       "Hiragino Sans", sans-serif; color: var(--ink); background: #f9fafb; }
main { max-width: 1180px; margin: 0 auto; padding: 16px 20px 48px; }
h1 { font-size: 21px; margin: 0 0 2px; }
h2 { font-size: 16px; margin: 22px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 0 0 6px; }
.sub { color: var(--muted); margin: 0 0 10px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; margin: 10px 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 10px; align-items: start; }
.charts { grid-template-columns: repeat(auto-fit, minmax(300px, 1fr)); }
.grid > .card { margin: 0; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; vertical-align: top; padding: 5px 8px; border-bottom: 1px solid var(--line); }
th { color: var(--muted); font-weight: 600; font-size: 12px; text-transform: uppercase; letter-spacing: .03em; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.kv th { width: 40%; text-transform: none; letter-spacing: 0; font-size: 13px; }
.best { border-color: var(--best); box-shadow: 0 0 0 1px var(--best) inset; }
.badge { display: inline-block; font-size: 11px; font-weight: 600; color: #fff; background: var(--best);
         border-radius: 10px; padding: 1px 8px; margin-left: 8px; vertical-align: middle; }
.muted { color: var(--muted); }
.text { font-size: 15px; }
.heard, .written { color: var(--muted); font-size: 13px; }
.speaker { font-size: 12px; font-weight: 600; color: var(--accent); }
.error { color: #b91c1c; font-size: 13px; }
audio { width: 240px; height: 34px; display: block; }
.label { font-size: 11px; color: var(--muted); text-transform: uppercase; letter-spacing: .03em; }
svg.chart { width: 100%; height: auto; display: block; }
svg.chart text { font: 11px system-ui, sans-serif; fill: #6b7280; }
svg.chart .title { font-size: 13px; font-weight: 600; fill: #1f2937; }
ul.reasons { margin: 4px 0 0; padding-left: 20px; }
p.words { margin: 4px 0; }
details > summary { cursor: pointer; font-weight: 600; }
a { color: var(--accent); }
"""


# --------------------------------------------------------------------------- small helpers


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _flatten(mapping: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(_flatten(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


def _kv_table(mapping: dict[str, Any] | None) -> str:
    if not mapping:
        return '<p class="muted">none recorded</p>'
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(format_value(k, v))}</td></tr>" for k, v in _flatten(mapping))
    return f'<table class="kv">{rows}</table>'


# --------------------------------------------------------------------------- audio paths


class _Audio:
    """Turns recorded paths into `src` values relative to the page's folder."""

    def __init__(self, page_dir: Path, base_dir: Path) -> None:
        self.page_dir = page_dir.resolve()
        self.base_dir = base_dir.resolve()

    def src(self, path: Any) -> str | None:
        """The URL-quoted relative path of an existing clip, or None (no clip, or missing)."""
        if not path:
            return None
        candidate = Path(str(path))
        if not candidate.is_absolute():
            candidate = self.base_dir / candidate
        if not candidate.is_file():
            return None
        candidate = candidate.resolve()
        try:
            relative = candidate.relative_to(self.page_dir)
        except ValueError:
            relative = self._copy_in(candidate)
        return urllib.parse.quote(relative.as_posix(), safe="/")

    def link(self, path: Any) -> str | None:
        """The URL-quoted path of an existing file relative to the page, without copying it."""
        if not path:
            return None
        candidate = Path(str(path))
        candidate = (candidate if candidate.is_absolute() else self.base_dir / candidate).resolve()
        if not candidate.is_file():
            return None
        return urllib.parse.quote(Path(os.path.relpath(candidate, self.page_dir)).as_posix(), safe="/")

    def _copy_in(self, source: Path) -> Path:
        digest = hashlib.sha1(str(source).encode("utf-8", "surrogateescape")).hexdigest()[:10]
        relative = Path(AUDIO_COPIES) / f"{digest}-{source.name}"
        target = self.page_dir / relative
        if not (target.is_file() and target.stat().st_size == source.stat().st_size):
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as partial:      # a page open meanwhile never plays half a clip
                shutil.copyfile(source, partial)
        return relative

    def player(self, path: Any, label: str) -> str:
        src = self.src(path)
        if src is None:
            return f'<span class="muted">{"no audio" if not path else "audio file missing"}</span>'
        return f'<audio controls preload="metadata" src="{_e(src)}" aria-label="{_e(label)}"></audio>'


# --------------------------------------------------------------------------- charts


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, value = [], first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _axis_range(values: list[float], floor: float | None) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if floor is not None:
        lo = min(lo, floor)
    if hi - lo < 1e-12:
        pad = abs(hi) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.08
    return (lo if floor is not None and lo == floor else lo - pad), hi + pad


def _chart(title: str, series: list[tuple[str, list[tuple[float, float]]]], *, y_label: str,
           y_floor: float | None = None, marker_x: float | None = None) -> str:
    """A line chart as inline SVG: one `<polyline>` per series with a circle per point."""
    series = [(name, [(x, y) for x, y in points if finite(x) is not None and finite(y) is not None])
              for name, points in series]
    series = [(name, points) for name, points in series if points]
    if not series:
        return (f'<div class="card"><h3>{_e(title)}</h3><p class="muted">nothing recorded yet</p></div>')
    width, height = 420, 240
    left, right, top, bottom = 62, 12, 44, 34
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_lo, y_hi = _axis_range(ys, y_floor)

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)

    def py(y: float) -> float:
        return top + (y_hi - y) / (y_hi - y_lo) * (height - top - bottom)

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{_e(title)}">',
             f'<text class="title" x="{left}" y="16">{_e(title)}</text>']
    for tick in _ticks(y_lo, y_hi):
        y = py(tick)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_e(f"{tick:g}")}</text>')
    for tick in _ticks(x_lo, x_hi, 6):
        x = px(tick)
        parts.append(f'<text x="{x:.1f}" y="{height - bottom + 16}" text-anchor="middle">{_e(f"{tick:g}")}</text>')
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{height - bottom}" y2="{height - bottom}" '
                 'stroke="#9ca3af"/>')
    parts.append(f'<text x="{width - right}" y="{height - 4}" text-anchor="end">step</text>')
    parts.append(f'<text x="12" y="{top + (height - top - bottom) / 2:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {top + (height - top - bottom) / 2:.1f})">{_e(y_label)}</text>')
    if marker_x is not None and x_lo <= marker_x <= x_hi:
        x = px(marker_x)
        parts.append(f'<line class="best-marker" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{height - bottom}" '
                     'stroke="#059669" stroke-dasharray="4 3"/>')
    legend_x = float(left)    # the legend sits under the title, whatever its length
    for i, (name, points) in enumerate(series):
        color = _PALETTE[i % len(_PALETTE)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        parts.append(f'<polyline class="series" data-series="{_e(name)}" points="{coords}" fill="none" '
                     f'stroke="{color}" stroke-width="2" stroke-linejoin="round"/>')
        for x, y in points:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}">'
                         f'<title>{_e(name)} at step {x:g}: {y:.4g}</title></circle>')
        parts.append(f'<rect x="{legend_x:.0f}" y="27" width="12" height="3" fill="{color}"/>'
                     f'<text x="{legend_x + 16:.0f}" y="32">{_e(name)}</text>')
        legend_x += 28 + len(name) * 6.5
    parts.append("</svg>")
    return f'<div class="card">{"".join(parts)}</div>'


def _points(rows: Iterable[dict[str, Any]], key: str, scale: float = 1.0) -> list[tuple[float, float]]:
    out = []
    for row in rows:
        x, y = finite(row.get("step")), finite(row.get(key))
        if x is not None and y is not None:
            out.append((x, y * scale))
    return out


# --------------------------------------------------------------------------- the run report


def evaluation_from_scores(step: int, scores: dict[str, Any], samples_dir: str) -> dict[str, Any]:
    """The report's evaluation entry for `scores.Scorer.score`'s result (as
    `write_scores` wrote it), whose relative clip paths are relative to
    `samples_dir` (e.g. `samples/step-100`, itself relative to the run folder)."""
    def joined(path: Any) -> str | None:
        if not path:
            return None
        return str(path) if os.path.isabs(str(path)) else f"{samples_dir.rstrip('/')}/{path}"

    samples = []
    for s in scores.get("samples", []):
        references = s.get("reference_wavs") or []
        samples.append({**s, "wav": joined(s.get("wav")),
                        "reference_wav": joined(references[0]) if references else None})
    means = {k: scores.get(k) for k in ("mean_cer", "mean_wer", "mean_error_rate", "mean_similarity")}
    return {"step": int(step), "samples": samples, "means": means}


_SAMPLE_HEAD = ('<tr><th class="num">#</th><th>text, and what the ASR heard</th><th>generated</th>'
                '<th>real voice</th><th class="num">errors</th><th class="num">similarity</th></tr>')


def _sample_row(sample: dict[str, Any], audio: _Audio, index: int) -> str:
    metric = sample.get("metric") or ("cer" if "cer" in sample else "wer")
    transcript = sample.get("transcript")
    speaker = f'<div class="speaker">{_e(sample["speaker"])}</div>' if sample.get("speaker") else ""
    written = (f'<div class="written">written: {_e(sample["written"])}</div>'
               if sample.get("written") and sample.get("written") != sample.get("text") else "")
    heard = (f'<div class="heard">heard: {_e(transcript) if transcript else "<i>(nothing)</i>"}</div>'
             if transcript is not None else "")
    error = f'<div class="error">{_e(sample["error"])}</div>' if sample.get("error") else ""
    return (f"<tr><td class=\"num\">{_e(sample.get('index', index))}</td>"
            f'<td>{speaker}<div class="text">{_e(sample.get("text"))}</div>{written}{heard}{error}</td>'
            f"<td>{audio.player(sample.get('wav'), 'generated')}</td>"
            f"<td>{audio.player(sample.get('reference_wav'), 'real voice')}</td>"
            f'<td class="num">{percent(sample.get(metric))}<div class="label">{_e(metric.upper())}</div></td>'
            f'<td class="num">{similarity(sample.get("similarity"))}</td></tr>')


def _samples_table(evaluation: dict[str, Any], audio: _Audio) -> str:
    samples = evaluation.get("samples") or []
    rows = "".join(_sample_row(s, audio, i) for i, s in enumerate(samples))
    return f"<table>{_SAMPLE_HEAD}{rows}</table>" if samples else '<p class="muted">no samples</p>'


def _evaluation(evaluation: dict[str, Any], audio: _Audio, best_step: Any) -> str:
    step = evaluation.get("step")
    is_best = best_step is not None and step == best_step
    badge = '<span class="badge">best</span>' if is_best else ""
    return (f'<section class="card eval{" best" if is_best else ""}" id="step-{_e(step)}">'
            f'<h3>Step {_e(step)}{badge} <span class="muted">{_e(scores_in_words(evaluation.get("means") or {}))}'
            f"</span></h3>{_samples_table(evaluation, audio)}</section>")


def _to_listen(evaluations: list[dict[str, Any]], best: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The evaluation to put first, and why: the best checkpoint's, else the best scores', else the latest."""
    by_step = {e.get("step"): e for e in evaluations}
    if best.get("step") in by_step:
        return by_step[best["step"]], f"the best checkpoint, by {best.get('metric', '?')}"
    for key, lower in (("mean_error_rate", True), ("mean_similarity", False)):
        scored = [e for e in evaluations if finite((e.get("means") or {}).get(key)) is not None]
        if scored:
            chosen = (min if lower else max)(scored, key=lambda e: e["means"][key])
            return chosen, "the best scores so far, by " + ("error rate" if lower else "similarity")
    return (evaluations[-1], "the latest evaluation") if evaluations else (None, "")


def _progress(run: dict[str, Any], history: list[dict[str, Any]]) -> str:
    summary = run.get("summary") or {}
    if summary.get("steps") is not None:
        ended = "stopped" if summary.get("interrupted") else "finished"
        return f"{ended} at step {summary['steps']} of {summary.get('max_steps', '?')}"
    steps = [int(h["step"]) for h in history if finite(h.get("step")) is not None]
    return (f"training: step {max(steps)} so far (this page is rewritten at each evaluation)" if steps
            else "training (this page is rewritten at each evaluation)")


def _what_ran(run: dict[str, Any]) -> str:
    """The hardware, the plan and why, and the headline numbers, in words."""
    summary = run.get("summary") or {}
    reasons = [r for r in [summary.get("plan_reason"), *(run.get("reasons") or [])] if r]
    because = f'<p class="words">because:</p><ul class="reasons">{"".join(f"<li>{_e(r)}</li>" for r in reasons)}</ul>'
    lines = [f'<p class="words"><b>Hardware:</b> {_e(hardware_in_words(run.get("gpus") or []))}</p>',
             f'<p class="words"><b>Plan:</b> {_e(plan_in_words(run.get("plan")))}</p>' + (because if reasons else "")]
    done = []
    if finite(summary.get("final_train_loss")) is not None:
        done.append(f"train loss {summary['final_train_loss']:.4f}")
    if finite(summary.get("best_eval_loss")) is not None:
        done.append(f"best eval loss {summary['best_eval_loss']:.4f}")
    if finite(summary.get("steady_tokens_per_second")) is not None:
        done.append(f"{summary['steady_tokens_per_second']:,.0f} tokens/s")
    if finite(summary.get("wall_seconds")) is not None:
        done.append(f"{summary['wall_seconds'] / 60:.1f} min in all")
    if finite(summary.get("scoring_seconds_per_evaluation")) is not None:
        done.append(f"scoring {summary['scoring_seconds_per_evaluation']:.1f} s per evaluation")
    if done:
        lines.append(f'<p class="words"><b>Result:</b> {_e(", ".join(done))}</p>')
    return f'<h2 id="what-ran">What ran</h2><div class="card">{"".join(lines)}</div>'


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
            f"<body><main>{body}</main></body></html>\n")


def write_report(output_dir: str | os.PathLike[str], run: dict[str, Any]) -> Path:
    """Write `<output_dir>/report.html` (atomically) and return its path.

    `run` is a plain dict; every key is optional::

        {"title": str,
         "created": str,                       # shown as is; default: now
         "gpus": [GpuInfo.to_dict() | {...} | str, ...],
         "plan": Plan.to_dict(), "reasons": [str, ...],  # the plan and why it was chosen
         "summary": {...},                      # run_summary.json's headline values (`headline`),
                                                # `plan_reason` the dry run's choice
         "history": [{"step": int, "loss": float} | {"step": int, "eval_loss": float} | ...],
                                                # trainer.state.log_history as it is
         "evaluations": [{"step": int,
                          "means": {"mean_cer", "mean_wer", "mean_error_rate", "mean_similarity"},
                          "samples": [{"text": str, "wav": path | None, "reference_wav": path | None,
                                       "speaker": str (optional), "written": str (optional),
                                       "transcript": str | None, "metric": "cer" | "wer",
                                       "cer" | "wer": float | None, "similarity": float | None,
                                       "error": str (optional)}, ...]}, ...],
                                                # see evaluation_from_scores
         "best": {"step": int, "metric": str, "value": float, "checkpoint": str, "why": str}}

    Paths may be relative to `output_dir` (as `samples/step-N/0.wav`) or
    absolute; clips outside `output_dir` are copied into `report-audio/`. A
    missing clip shows as "audio file missing" rather than a broken player.

    Raises:
        AutotuneError: the disk is full or read-only.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    audio = _Audio(out, out)
    title = str(run.get("title") or f"Run {out.name}")
    best = run.get("best") or {}
    history = [h for h in run.get("history") or [] if isinstance(h, dict)]
    evaluations = sorted((e for e in run.get("evaluations") or [] if isinstance(e, dict)),
                         key=lambda e: (finite(e.get("step")) is None, finite(e.get("step")) or 0))
    means = [{"step": e.get("step"), **(e.get("means") or {})} for e in evaluations]
    chosen, why = _to_listen(evaluations, best)
    marked = finite(chosen.get("step")) if chosen else finite(best.get("step"))

    created = run.get("created") or datetime.now().strftime("%Y-%m-%d %H:%M")
    body = [f"<h1>{_e(title)}</h1>", f'<p class="sub">{_e(created)} · {_e(_progress(run, history))}</p>']

    # First: listen, and see whether it is getting better.
    if chosen is not None:
        body.append(f'<section class="card best" id="listen"><h3>Listen: step {_e(chosen.get("step"))} '
                    f'<span class="muted">— {_e(why)} · {_e(scores_in_words(chosen.get("means") or {}))}</span>'
                    f' <a href="#step-{_e(chosen.get("step"))}">details</a></h3>{_samples_table(chosen, audio)}'
                    "</section>")
    else:
        body.append('<section class="card" id="listen"><p class="muted">no samples were generated yet: each '
                    "evaluation speaks `samples.num_texts` texts, and with the codec they become clips here</p>"
                    "</section>")
    error_series = [(name, _points(means, key, 100.0)) for key, name in (("mean_cer", "CER"), ("mean_wer", "WER"))]
    body.append('<div class="grid charts" id="curves">'
                + _chart("Loss", [("train", _points(history, "loss")), ("eval", _points(history, "eval_loss"))],
                         y_label="loss", marker_x=marked)
                + _chart("Intelligibility (lower is better)", error_series, y_label="error rate %", y_floor=0.0,
                         marker_x=marked)
                + _chart("Speaker similarity (higher is better)", [("similarity", _points(means, "mean_similarity"))],
                         y_label="cosine", marker_x=marked)
                + "</div>")

    # Then: what ran, in words.
    body.append(_what_ran(run))
    if best:
        value = finite(best.get("value"))
        checkpoint = f" ({best['checkpoint']})" if best.get("checkpoint") else ""
        shown = f"step {best.get('step')}{checkpoint} by {best.get('metric', '?')}"
        shown += f" = {value:.4g}" if value is not None else ""
        why = f' <span class="muted">— {_e(best["why"])}</span>' if best.get("why") else ""
        body.append(f'<div class="card best"><p class="words"><b>Best checkpoint:</b> {_e(shown)}{why}</p></div>')

    # Last: the details.
    body.append('<h2 id="evaluations">Every evaluation</h2>')
    if evaluations:
        body.extend(_evaluation(e, audio, best.get("step")) for e in evaluations)
    else:
        body.append('<p class="muted">no samples were generated</p>')
    raw = {key: run.get(key) for key in ("summary", "plan") if run.get(key)}
    gpus = [g if isinstance(g, dict) else {"name": g} for g in run.get("gpus") or []]
    raw.update({f"gpu{i}": gpu for i, gpu in enumerate(gpus)})
    body.append(f'<details id="raw"><summary>Every recorded value</summary><div class="card">{_kv_table(raw)}'
                "</div></details>")
    path = out / REPORT
    write_text(path, _page(title, "".join(body)))
    return path


# --------------------------------------------------------------------------- the sweep report


def _higher_is_better(metric: str) -> bool:
    return any(word in metric for word in ("similarity", "accuracy", "per_second", "score"))


def write_sweep_report(sweep_dir: str | os.PathLike[str], trials: Sequence[dict[str, Any]], *,
                       metric: str = "mean_error_rate", higher_is_better: bool | None = None,
                       title: str | None = None) -> Path:
    """Write `<sweep_dir>/report.html`: the trials ranked by `metric`, one sample each.

    Each trial is a plain dict (every key optional but `name`)::

        {"name": str, "status": str, "params": {...},
         "metrics": {"mean_error_rate": float, "mean_similarity": float, "eval_loss": float, ...},
         "report": path to the trial's report.html,
         "sample": {"text", "wav", "reference_wav", "transcript", "metric", "cer" | "wer", "similarity"}}

    Paths are relative to `sweep_dir` or absolute. The direction comes from the
    metric's name (similarity, accuracy, per-second and score are better higher,
    everything else, losses and error rates, lower) unless `higher_is_better` is
    given. Trials without the metric rank last, in the given order.

    Raises:
        AutotuneError: the disk is full or read-only.
    """
    out = Path(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    audio = _Audio(out, out)
    higher = _higher_is_better(metric) if higher_is_better is None else higher_is_better

    def key(item: tuple[int, dict[str, Any]]) -> tuple[int, float, int]:
        value = finite((item[1].get("metrics") or {}).get(metric))
        if value is None:
            return (1, 0.0, item[0])
        return (0, -value if higher else value, item[0])

    ranked = [t for _, t in sorted(enumerate(trials), key=key)]
    metric_names = list(dict.fromkeys([metric, *(k for t in ranked for k in (t.get("metrics") or {}))]))
    head = ("<tr><th class=\"num\">rank</th><th>trial</th><th>settings</th>"
            + "".join(f'<th class="num">{_e(m)}</th>' for m in metric_names) + "<th>status</th></tr>")
    rows = []
    for rank, trial in enumerate(ranked, start=1):
        metrics = trial.get("metrics") or {}
        name = _e(trial.get("name"))
        report_src = audio.link(trial.get("report"))
        shown = f'<a href="{_e(report_src)}">{name}</a>' if report_src else name
        settings = "<br>".join(f"{_e(k)} = {_e(plain(v))}" for k, v in _flatten(trial.get("params") or {}))
        cells = "".join(f'<td class="num">{_e(format_value(m, metrics.get(m)))}</td>' for m in metric_names)
        rows.append(f'<tr><td class="num">{rank}</td><td>{shown}</td><td>{settings}</td>{cells}'
                    f"<td>{_e(trial.get('status') or '')}</td></tr>")
    direction = "higher" if higher else "lower"
    heading = title or f"Sweep {out.name}"
    body = [f"<h1>{_e(heading)}</h1>",
            f'<p class="sub">{len(ranked)} trials ranked by {_e(metric)} ({direction} is better)</p>',
            f'<div class="card"><table>{head}{"".join(rows)}</table></div>', "<h2>One sample per trial</h2>"]
    for rank, trial in enumerate(ranked, start=1):
        sample = trial.get("sample")
        inner = (f"<table>{_SAMPLE_HEAD}{_sample_row(sample, audio, 0)}</table>" if sample
                 else '<p class="muted">no sample</p>')
        ranked_first = rank == 1 and finite((trial.get("metrics") or {}).get(metric)) is not None
        best = (" best", '<span class="badge">best</span>') if ranked_first else ("", "")
        body.append(f'<section class="card{best[0]}"><h3>#{rank} {_e(trial.get("name"))}{best[1]}</h3>{inner}</section>')
    path = out / REPORT
    write_text(path, _page(heading, "".join(body)))
    return path
