"""The web UI behind `python app.py`: speak, compare checkpoints by ear and by score, keep one,
see the runs, and hear what the codec keeps (Gradio; labels in English or Japanese by the
browser's language).

`Studio` is everything but the page: it lists runs and checkpoints by name (a request can only
pick what it offers, never name a path), loads one `Voice` lazily on first use (a base model
that is not on disk is then a message, not a crash), speaks, scores with `autotune.scores`, and
keeps a checkpoint with `runs.keep`. `build` lays out the page and turns every error into a
one-line message in the page.
"""

from __future__ import annotations

import functools
import html
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autotune.errors import AutotuneError
from autotune.generation import SpeechItem
from autotune.llasa import CODES_PER_SECOND, SAMPLING_RATE
from autotune.rundir import path_text
from autotune.runs import (RunEntry, is_adapter, keep, list_runs, reference_clips, run_settings,
                           trained_speakers)
from autotune.voice import Voice, read_clip

MAX_LINES = 20
MAX_COMPARED = 4
SEP = " :: "


@dataclass
class StudioOptions:
    runs: list[Path] = field(default_factory=list)
    adapters: dict[str, Path] = field(default_factory=dict)
    model: str | None = None
    codec: str | None = None
    device: str | None = None
    precision: str = "auto"
    asr_model: str | None = None
    speaker_model: str | None = None
    trust_remote_code: bool = False


class Studio:
    """The UI's state: the runs it offers, one lazily loaded Voice, scorers, output clips."""

    def __init__(self, options: StudioOptions):
        self.options = options
        self.voice: Voice | None = None
        self.codec: Any = None
        self.scorers: dict[tuple[str, str], Any] = {}
        self.lock = threading.RLock()
        self.out_dir = Path(tempfile.mkdtemp(prefix="llasa-app-"))
        self._clips = 0

    # -- what is offered -------------------------------------------------------------

    def entries(self) -> dict[str, RunEntry | Path]:
        """Run names -> runs under --runs (RunEntry) or --adapter folders (Path)."""
        found: dict[str, RunEntry | Path] = {}
        several = len(self.options.runs) > 1
        for root in self.options.runs:
            for entry in list_runs(root):
                name = f"{Path(root).name}/{entry.name}" if several else entry.name
                found.setdefault(name, entry)
        for name, folder in self.options.adapters.items():
            found.setdefault(name, Path(folder))
        return found

    def checkpoint_names(self, run: str | None) -> list[str]:
        entry = self.entries().get(run or "")
        if entry is None:
            return []
        if isinstance(entry, Path):
            return ["adapter"] if is_adapter(entry) else []
        return [c.name for c in entry.checkpoints]

    def resolve(self, run: str | None, checkpoint: str | None) -> Path:
        """The adapter folder of a run and checkpoint the UI offered; one line otherwise."""
        entry = self.entries().get(run or "")
        if entry is None:
            raise AutotuneError(f"no run named `{run}` under {self._where()}: press Refresh, or pick another")
        if isinstance(entry, Path):
            if not is_adapter(entry):
                raise AutotuneError(f"`{path_text(entry)}` holds no adapter (adapter_config.json and "
                                    "adapter_model.safetensors): pass the output folder of a finished run")
            return entry
        found = {c.name: c.path for c in entry.checkpoints}
        if not found:
            raise AutotuneError(f"the run folder `{path_text(entry.path)}` holds no adapter yet ({entry.state}"
                                f"{': ' + entry.why if entry.why else ''}): it saves one at its first checkpoint")
        if checkpoint not in found:
            checkpoint = next(iter(found))
        return found[checkpoint]

    def speakers(self, run: str | None) -> list[str]:
        try:
            return list(trained_speakers(self.resolve(run, None)) or {})
        except AutotuneError:
            return []

    def _where(self) -> str:
        return ", ".join(f"`{path_text(r)}`" for r in self.options.runs) or "the folders given"

    # -- the engine ------------------------------------------------------------------

    def engine(self, adapter: Path) -> Voice:
        with self.lock:
            if self.voice is None:
                opts = self.options
                self.voice = Voice.for_adapter(adapter, model=opts.model, codec=opts.codec, device=opts.device,
                                               precision=opts.precision, trust_remote_code=opts.trust_remote_code)
                self.codec = self.voice.codec
            return self.voice

    def codec_only(self) -> Any:
        """The codec, without loading a base model (the Codec tab)."""
        with self.lock:
            if self.codec is None:
                from autotune.codec import load_codec
                from autotune.llasa import DEFAULT_CODEC
                from autotune.voice import pick_device

                codec_id = self.options.codec
                for entry in self.entries().values():
                    if codec_id:
                        break
                    folder = entry if isinstance(entry, Path) else entry.path
                    try:
                        codec_id = run_settings(folder).codec
                    except AutotuneError:
                        continue
                self.codec = load_codec(codec_id or DEFAULT_CODEC, device=pick_device(self.options.device))
            return self.codec

    def scorer(self, adapter: Path) -> Any:
        from autotune.scores import DEFAULT_ASR_MODEL, DEFAULT_SPEAKER_MODEL, Scorer

        settings = run_settings(adapter)
        asr = self.options.asr_model or settings.asr_model or DEFAULT_ASR_MODEL
        speaker = self.options.speaker_model or settings.speaker_model or DEFAULT_SPEAKER_MODEL
        with self.lock:
            if (asr, speaker) not in self.scorers:
                self.scorers[(asr, speaker)] = Scorer(asr, speaker, device="cpu")
            return self.scorers[(asr, speaker)]

    # -- speaking --------------------------------------------------------------------

    def item(self, voice: Voice, adapter: Any, text: str, speaker: str | None, prompt: tuple | None,
             sampling: dict[str, Any]) -> SpeechItem:
        return SpeechItem(text, reference_text=prompt[0] if prompt else None, reference_codes=prompt[1] if prompt else None,
                          speaker=voice.check_speaker(adapter, speaker or None, "Speaker"), **sampling)

    def voice_prompt(self, voice: Voice, adapter_path: Path, clip: str | None, transcript: str | None):
        """(transcript, codes) of an uploaded or recorded clip; a blank transcript is filled by ASR."""
        if not clip:
            return None
        wave = read_clip(clip, "the voice prompt clip")
        transcript = (transcript or "").strip()
        if not transcript:
            scorer = self.scorer(adapter_path)
            text = scorer.transcribe(wave)
            if not text:
                why = scorer.unavailable("asr") or "it heard nothing"
                raise AutotuneError(f"the voice prompt needs its transcript: type what the clip says (no transcript "
                                    f"from the ASR model: {why})")
            transcript = text
        return transcript, voice.reference_codes(wave)

    def speak(self, run: str, checkpoint: str, speaker: str | None, text: str, clip: str | None,
              transcript: str | None, sampling: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
        lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
        if not lines:
            raise AutotuneError("the text is empty: type what to say (one clip per line)")
        if len(lines) > MAX_LINES:
            raise AutotuneError(f"{len(lines)} lines: the page speaks at most {MAX_LINES} at once; use "
                                "`synthesize.py --text-file` for more")
        adapter_path = self.resolve(run, checkpoint)
        voice = self.engine(adapter_path)
        adapter = voice.adapter(adapter_path)
        prompt = self.voice_prompt(voice, adapter_path, clip, transcript)
        items = [self.item(voice, adapter, line, speaker, prompt, sampling) for line in lines]
        for number, item in enumerate(items, 1):
            try:
                voice.fits(adapter, item)
            except AutotuneError as exc:
                raise AutotuneError((f"line {number}: " if len(items) > 1 else "") + exc.one_line()) from None
        speeches = voice.speak(adapter, items)
        source = f"{run} · {self.checkpoint_name(run, adapter_path)}"
        return [self._clip(s, source) for s in speeches], prompt[0] if prompt else None

    def checkpoint_name(self, run: str, adapter_path: Path) -> str:
        entry = self.entries().get(run)
        if isinstance(entry, RunEntry):
            for c in entry.checkpoints:
                if c.path == adapter_path:
                    return c.name
        return "adapter"

    def _clip(self, speech: Any, source: str) -> dict[str, Any]:
        from autotune.audio import write_wav

        with self.lock:
            self._clips += 1
            path = self.out_dir / f"clip-{self._clips:05d}.wav"
        write_wav(path, speech.wave, SAMPLING_RATE)
        return {"path": str(path), "text": speech.text, "source": source, "audio_seconds": speech.audio_seconds,
                "seconds": speech.seconds_taken, "rtf": speech.real_time_factor, "ended": speech.spoken.ended,
                "tokens": speech.spoken.generated}

    def compare(self, picked: list[str], text: str, speaker: str | None, sampling: dict[str, Any]):
        """Each picked checkpoint speaks the same text with the same seed; each clip is scored."""
        picked = list(dict.fromkeys(picked or []))
        if not 2 <= len(picked) <= MAX_COMPARED:
            raise AutotuneError(f"pick 2 to {MAX_COMPARED} checkpoints to compare ({len(picked)} picked)")
        line = (text or "").strip()
        if not line or "\n" in line:
            raise AutotuneError("type one line of text to compare the checkpoints on")
        if sampling.get("seed") is None:
            sampling = {**sampling, "seed": int(time.time()) % 100_000}   # one seed for all: a fair comparison
        results = []
        for value in picked:
            run, _, checkpoint = value.partition(SEP)
            adapter_path = self.resolve(run, checkpoint)
            voice = self.engine(adapter_path)
            adapter = voice.adapter(adapter_path)
            item = self.item(voice, adapter, line, speaker, None, sampling)
            voice.fits(adapter, item)
            clip = self._clip(voice.speak(adapter, [item])[0], f"{run} · {checkpoint}")
            references = [str(p) for p in reference_clips(adapter_path, speaker or None)]
            scores = self.scorer(adapter_path).score([{"text": line, "wav": clip["path"],
                                                       "reference_wavs": references}])
            clip.update(run=run, checkpoint=checkpoint, adapter=str(adapter_path), scores=scores["samples"][0],
                        references=len(references))
            results.append(clip)
        return results

    def keep(self, adapter: str, scores: dict[str, Any] | None) -> Path:
        allowed = {str(self.resolve(run, c)) for run in self.entries() for c in self.checkpoint_names(run)}
        if adapter not in allowed:
            raise AutotuneError("that checkpoint is no longer offered: press Refresh and compare again")
        return keep(Path(adapter), scores=scores)

    def codec_round_trip(self, clip: str | None) -> tuple[str, str]:
        if not clip:
            raise AutotuneError("give a clip to pass through the codec (upload or record one)")
        from autotune.audio import write_wav
        from autotune.voice import MAX_REFERENCE_SECONDS

        wave = read_clip(clip, "the clip")
        codec = self.codec_only()
        with self.lock:
            started = time.perf_counter()
            codes = codec.encode(wave)
            back = codec.decode(codes)
            seconds = time.perf_counter() - started
            self._clips += 1
            path = self.out_dir / f"codec-{self._clips:05d}.wav"
        write_wav(path, back, SAMPLING_RATE)
        info = (f"{len(codes)} codes ({CODES_PER_SECOND} per second, one codebook of 65,536) for "
                f"{wave.size / SAMPLING_RATE:.2f} s of audio, in {seconds:.2f} s on {codec.device}; clips up to "
                f"{MAX_REFERENCE_SECONDS:.0f} s")
        return str(path), info


# ------------------------------------------------------------ rendering ---


def file_url(path: str | Path) -> str:
    from urllib.parse import quote

    return "/gradio_api/file=" + quote(str(Path(path).resolve()))


def clips_html(clips: list[dict[str, Any]]) -> str:
    rows = []
    for clip in clips:
        rtf = f", real-time factor {clip['rtf']:.2f}" if clip.get("rtf") else ""
        limit = "" if clip["ended"] else " · hit the length limit"
        rows.append(
            f"<div class='llasa-clip'><div class='llasa-text'>{html.escape(clip['text'])}</div>"
            f"<audio controls preload='metadata' src='{file_url(clip['path'])}'></audio> "
            f"<a download href='{file_url(clip['path'])}'>wav</a>"
            f"<div class='llasa-info'>{clip['audio_seconds']:.2f} s of audio in {clip['seconds']:.2f} s{rtf}"
            f"{limit} · {html.escape(clip['source'])}</div></div>")
    return "<div class='llasa-clips'>" + "".join(rows) + "</div>"


def score_html(clip: dict[str, Any]) -> str:
    scores = clip.get("scores") or {}
    parts = []
    metric = scores.get("metric", "cer")
    if scores.get(metric) is not None:
        parts.append(f"{metric.upper()} {100 * scores[metric]:.1f}%")
    if scores.get("similarity") is not None:
        parts.append(f"similarity {scores['similarity']:.3f} (vs {clip.get('references', 0)} reference clips)")
    elif not clip.get("references"):
        parts.append("similarity: the run kept no reference clips")
    if scores.get("error"):
        parts.append(f"not fully scored: {html.escape(str(scores['error']))}")
    transcript = scores.get("transcript")
    heard = f"<div class='llasa-info'>heard: {html.escape(transcript)}</div>" if transcript else ""
    return (f"<div class='llasa-compare'><b>{html.escape(clip['run'])} · {html.escape(clip['checkpoint'])}</b>"
            f"{clips_html([clip])}<div class='llasa-scores'>{' · '.join(parts) or 'no scores'}</div>{heard}</div>")


STATE_COLOURS = {"running": "#1d6fd1", "finished": "#1a8a3a", "interrupted": "#b36b00", "failed": "#b3261e"}


def runs_html(entries: dict[str, RunEntry | Path]) -> str:
    if not entries:
        return "<p>No runs yet.</p>"
    head = ("<tr><th>run</th><th>state</th><th>steps</th><th>best eval loss</th><th>best scores</th>"
            "<th>started</th><th>finished</th><th>checkpoints</th><th>report</th></tr>")
    rows = []
    for name, entry in entries.items():
        if isinstance(entry, Path):
            rows.append(f"<tr class='llasa-run' data-state='adapter'><td>{html.escape(name)}</td><td>adapter</td>"
                        + "<td></td>" * 7 + "</tr>")
            continue
        best = entry.best_scores or {}
        scores = []
        if isinstance(best.get("mean_cer"), (int, float)):
            scores.append(f"CER {100 * best['mean_cer']:.1f}%")
        if isinstance(best.get("mean_wer"), (int, float)):
            scores.append(f"WER {100 * best['mean_wer']:.1f}%")
        if isinstance(best.get("mean_similarity"), (int, float)):
            scores.append(f"similarity {best['mean_similarity']:.3f}")
        if scores and best.get("step") is not None:
            scores.append(f"(step {best['step']})")
        steps = f"{entry.steps}" + (f" / {entry.max_steps}" if entry.max_steps else "") if entry.steps is not None else ""
        loss = f"{entry.best_eval_loss:.4f}" if entry.best_eval_loss is not None else ""
        report = f"<a href='{file_url(entry.report)}' target='_blank'>report.html</a>" if entry.report else ""
        colour = STATE_COLOURS.get(entry.state, "#555")
        rows.append(
            f"<tr class='llasa-run' data-state='{entry.state}'><td>{html.escape(name)}</td>"
            f"<td><span style='color:{colour};font-weight:600' title='{html.escape(entry.why)}'>{entry.state}</span>"
            f"</td><td>{steps}</td><td>{loss}</td><td>{' '.join(scores)}</td><td>{entry.started or ''}</td>"
            f"<td>{entry.finished or ''}</td><td>{len(entry.checkpoints)}</td><td>{report}</td></tr>")
    return f"<table class='llasa-runs'>{head}{''.join(rows)}</table>"


CSS = """
.llasa-clip { margin: 0.4em 0 0.8em; }
.llasa-clip audio { vertical-align: middle; max-width: 100%; }
.llasa-info { color: #666; font-size: 0.9em; }
.llasa-scores { font-weight: 600; margin-top: 0.3em; }
.llasa-runs { border-collapse: collapse; width: 100%; }
.llasa-runs th, .llasa-runs td { border-bottom: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; }
"""


def guarded(handler):
    """Every error a user can cause becomes one line in the page, never a traceback."""
    import gradio as gr

    @functools.wraps(handler)
    def run(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except gr.Error:
            raise
        except AutotuneError as exc:
            raise gr.Error(exc.one_line(), print_exception=False) from None
        except Exception as exc:  # noqa: BLE001 - shown as one line; the console has the rest
            reason = " ".join(str(exc).split())[:240] or type(exc).__name__
            raise gr.Error(f"unexpected {type(exc).__name__}: {reason}", print_exception=False) from None
    return run


def sampling_of(temperature: float, top_p: float, repetition_penalty: float, seed: Any, longest_s: float) -> dict:
    try:
        seed_value = None if seed in (None, "") else int(seed)
    except (TypeError, ValueError):
        raise AutotuneError(f"the seed must be a whole number, got `{seed}`") from None
    if seed_value is not None and not 0 <= seed_value < 2 ** 63:
        raise AutotuneError(f"the seed must be from 0 to 2**63-1, got {seed_value}")
    checks = (("temperature", temperature, 0.01, 10.0), ("top-p", top_p, 0.01, 1.0),
              ("repetition penalty", repetition_penalty, 0.01, 10.0), ("longest speech", longest_s, 0, 40.96))
    for name, value, low, high in checks:
        if value is None or not low <= float(value) <= high:
            raise AutotuneError(f"the {name} must be from {low:g} to {high:g}, got {value}")
    tokens = int(round(float(longest_s) * CODES_PER_SECOND)) if longest_s else None
    return {"temperature": float(temperature), "top_p": float(top_p), "repetition_penalty": float(repetition_penalty),
            "seed": seed_value, "max_new_tokens": tokens}


# ------------------------------------------------------------ the page ---


def build(studio: Studio):
    """The Gradio page: tabs Speak, Compare, Runs, Codec."""
    import gradio as gr

    from autotune.webui_text import EN, JA

    t = gr.I18n(en=EN, ja=JA)

    def run_choices() -> list[str]:
        return list(studio.entries())

    def first_speakable() -> str | None:
        runs = run_choices()
        return next((r for r in runs if studio.checkpoint_names(r)), runs[0] if runs else None)

    def compare_choices() -> list[tuple[str, str]]:
        return [(f"{run} · {c}", f"{run}{SEP}{c}") for run in run_choices() for c in studio.checkpoint_names(run)]

    def on_run(run: str | None):
        names = studio.checkpoint_names(run)
        speakers = studio.speakers(run)
        return (gr.update(choices=names, value=names[0] if names else None),
                gr.update(choices=speakers, value=speakers[0] if speakers else None, visible=bool(speakers)))

    def refresh(run: str | None):
        runs = run_choices()
        run = run if run in runs else first_speakable()
        checkpoint, speaker = on_run(run)
        return (gr.update(choices=runs, value=run), checkpoint, speaker,
                gr.update(choices=compare_choices()), runs_html(studio.entries()))

    @guarded
    def speak(run, checkpoint, speaker, text, clip, transcript, temperature, top_p, penalty, seed, longest):
        sampling = sampling_of(temperature, top_p, penalty, seed, longest)
        clips, heard = studio.speak(run, checkpoint, speaker, text, clip, transcript, sampling)
        total_audio = sum(c["audio_seconds"] for c in clips)
        total = sum(c["seconds"] for c in clips)
        summary = (f"{len(clips)} clip{'s' if len(clips) != 1 else ''}, {total_audio:.2f} s of audio in {total:.2f} s"
                   + (f" (real-time factor {total / total_audio:.2f})" if total_audio > 0 else ""))
        return clips_html(clips), summary, (heard if heard and not (transcript or "").strip() else gr.update())

    @guarded
    def compare(picked, text, speaker, temperature, top_p, penalty, seed, longest):
        sampling = sampling_of(temperature, top_p, penalty, seed, longest)
        results = studio.compare(picked, text, speaker, sampling)
        updates = []
        for i in range(MAX_COMPARED):
            shown = i < len(results)
            updates += [gr.update(visible=shown), score_html(results[i]) if shown else ""]
        return [*updates, results, ""]

    def keeper(index: int):
        @guarded
        def keep_one(results):
            if not results or index >= len(results):
                raise AutotuneError("compare first, then keep one of the clips")
            chosen = results[index]
            target = studio.keep(chosen["adapter"], chosen.get("scores"))
            run_name = chosen["run"]
            return (f"Kept `{chosen['run']} · {chosen['checkpoint']}` as `{path_text(target)}`: "
                    f"`python synthesize.py --adapter {path_text(target)} --text \"...\" -o out.wav`, "
                    f"or model `{run_name}/{target.name}` on `serve.py`."), gr.update(choices=compare_choices())
        return keep_one

    @guarded
    def codec_round_trip(clip):
        return studio.codec_round_trip(clip)

    with gr.Blocks(title="Llasa voice studio", analytics_enabled=False) as page:
        gr.Markdown(t("title"), elem_id="title")
        gr.Markdown(t("intro"))
        with gr.Tabs():
            with gr.Tab(t("tab_speak"), id="speak"):
                with gr.Row():
                    run = gr.Dropdown(run_choices(), label=t("run"), value=first_speakable(), elem_id="run", scale=3)
                    checkpoint = gr.Dropdown([], label=t("checkpoint"), elem_id="checkpoint", scale=2)
                    speaker = gr.Dropdown([], label=t("speaker"), visible=False, elem_id="speaker", scale=2)
                    refresh_button = gr.Button(t("refresh"), scale=1, elem_id="refresh")
                text = gr.Textbox(label=t("text"), placeholder="こんにちは、今日はいい天気ですね。", lines=3,
                                  elem_id="text")
                with gr.Accordion(t("voice_prompt"), open=False):
                    clip = gr.Audio(sources=["upload", "microphone"], type="filepath", label=t("voice_prompt"))
                    transcript = gr.Textbox(label=t("voice_prompt_text"), elem_id="transcript")
                with gr.Accordion(t("sampling"), open=False):
                    with gr.Row():
                        temperature = gr.Slider(0.01, 2.0, value=0.8, step=0.01, label=t("temperature"))
                        top_p = gr.Slider(0.01, 1.0, value=1.0, step=0.01, label=t("top_p"))
                        penalty = gr.Slider(0.5, 2.0, value=1.0, step=0.01, label=t("repetition_penalty"))
                    with gr.Row():
                        seed = gr.Textbox(label=t("seed"), value="", elem_id="seed")
                        longest = gr.Slider(0, 40, value=0, step=0.5, label=t("longest"))
                speak_button = gr.Button(t("speak"), variant="primary", elem_id="speak")
                clips = gr.HTML(elem_id="clips")
                timing = gr.Markdown(elem_id="timing")
            with gr.Tab(t("tab_compare"), id="compare"):
                picked = gr.CheckboxGroup(compare_choices(), label=t("compare_pick"), elem_id="picked")
                with gr.Row():
                    compare_text = gr.Textbox(label=t("compare_text"), value="こんにちは、今日はいい天気ですね。",
                                              elem_id="compare-text", scale=4)
                    compare_speaker = gr.Textbox(label=t("speaker"), elem_id="compare-speaker", scale=1)
                compare_button = gr.Button(t("compare"), variant="primary", elem_id="compare")
                columns, cells, keeps = [], [], []
                with gr.Row():
                    for i in range(MAX_COMPARED):
                        with gr.Column(visible=False) as column:
                            cell = gr.HTML(elem_id=f"compared-{i}")
                            keep_button = gr.Button(t("keep"), elem_id=f"keep-{i}")
                        columns.append(column)
                        cells.append(cell)
                        keeps.append(keep_button)
                kept = gr.Markdown(elem_id="kept")
                results = gr.State([])
            with gr.Tab(t("tab_runs"), id="runs"):
                runs_refresh = gr.Button(t("refresh"), elem_id="runs-refresh")
                runs_table = gr.HTML(runs_html(studio.entries()), elem_id="runs-table")
            with gr.Tab(t("tab_codec"), id="codec"):
                codec_in = gr.Audio(sources=["upload", "microphone"], type="filepath", label=t("codec_in"))
                codec_button = gr.Button(t("codec_run"), variant="primary", elem_id="codec-run")
                codec_out = gr.Audio(type="filepath", label=t("codec_out"), interactive=False, elem_id="codec-out")
                codec_info = gr.Markdown(elem_id="codec-info")

        run.change(on_run, [run], [checkpoint, speaker])
        page.load(on_run, [run], [checkpoint, speaker])
        refresh_button.click(refresh, [run], [run, checkpoint, speaker, picked, runs_table])
        runs_refresh.click(refresh, [run], [run, checkpoint, speaker, picked, runs_table])
        speak_button.click(speak, [run, checkpoint, speaker, text, clip, transcript, temperature, top_p, penalty,
                                   seed, longest], [clips, timing, transcript])
        compare_outputs = [x for pair in zip(columns, cells) for x in pair] + [results, kept]
        compare_button.click(compare, [picked, compare_text, compare_speaker, temperature, top_p, penalty, seed,
                                       longest], compare_outputs)
        for i, button in enumerate(keeps):
            button.click(keeper(i), [results], [kept, picked])
        codec_button.click(codec_round_trip, [codec_in], [codec_out, codec_info])
    return page, t
