"""Tests of autotune.report: the HTML's structure, parsed, and the page as a real
headless Chromium renders it (skipped when Chromium is not installed)."""

from __future__ import annotations

import html.parser
import math
import os
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from autotune.audio import write_wav
from autotune.report import AUDIO_COPIES, evaluation_from_scores, write_report, write_sweep_report

HOSTILE = '<script>alert("x")</script> & \'quotes\''


def tone(freq: float, seconds: float = 0.5) -> np.ndarray:
    t = np.arange(int(16_000 * seconds)) / 16_000
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


class Page(html.parser.HTMLParser):
    """Every start tag with its attributes, and the text, of an HTML document."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for name, attrs in self.tags if name == tag]

    def series(self) -> dict[str, list[int]]:
        """Point counts of each chart's polylines, by series name."""
        out: dict[str, list[int]] = {}
        for attrs in self.all("polyline"):
            out.setdefault(attrs["data-series"], []).append(len(attrs["points"].split()))
        return out


def make_run(root: Path) -> tuple[Path, dict, dict]:
    """A run folder with two evaluations of three samples each; one sample has no
    audio and one points at a deleted file. Returns the folder, the run and counts."""
    out = root / "run"
    speaker = root / "data" / "話者A" / "本物 1.wav"   # outside the run folder, non-ASCII name
    write_wav(speaker, tone(200))
    evaluations = []
    for k, step in enumerate((50, 100)):
        samples = []
        for i, text in enumerate(["今日はいい天気ですね。", f"The cat sat. {HOSTILE}", "明日は雨"]):
            rel = f"samples/step-{step}/音声 {i}.wav"
            write_wav(out / rel, tone(220 + 30 * i + k))
            metric = "wer" if i == 1 else "cer"
            samples.append({"index": i, "text": text, "wav": rel, "reference_wav": str(speaker),
                            "transcript": text[:4], "metric": metric, metric: 0.1 * (2 - k) + 0.01 * i,
                            "similarity": 0.7 + 0.1 * k})
        evaluations.append({"step": step, "samples": samples,
                            "means": {"mean_cer": 0.2 - 0.1 * k, "mean_wer": 0.21 - 0.1 * k,
                                      "mean_error_rate": 0.205 - 0.1 * k, "mean_similarity": 0.7 + 0.1 * k}})
    evaluations[0]["samples"][2]["wav"] = None                          # the codec was not there
    (out / evaluations[1]["samples"][2]["wav"]).unlink()                # deleted since
    history = [{"step": s, "loss": 5 * math.exp(-s / 40) + 1, "learning_rate": 1e-4} for s in range(10, 110, 10)]
    history += [{"step": 50, "eval_loss": 2.5}, {"step": 100, "eval_loss": 2.0}, {"train_runtime": 12.0, "step": 100}]
    evaluations[1]["samples"][0]["speaker"] = "話者A"
    evaluations[1]["samples"][1]["speaker"] = "bob"
    run = {"title": f"Run {HOSTILE}", "gpus": [{"index": 0, "name": "NVIDIA H200", "total_bytes": 150 * 1024**3}],
           "plan": PLAN, "reasons": [f"because {HOSTILE}"],
           "history": history, "evaluations": evaluations,
           "best": {"step": 100, "metric": "cer", "value": 0.1, "checkpoint": "checkpoint-100"},
           "summary": {"steps": 100, "max_steps": 100, "steady_tokens_per_second": 39512.3,
                       "scores_best": {"step": 100, "mean_cer": 1.0, "mean_similarity": 0.8},
                       "plan_reason": "the dry run: fastest that fits"}}
    # Every clip of both evaluations (one without audio, one deleted), and the best one's again on top.
    counts = {"audio": 2 * 3 * 2 - 2 + (3 * 2 - 1), "loss": 10, "eval_loss": 2, "evaluations": 2}
    return out, run, counts


#: A plan as run_summary.json records it (`Plan.to_dict`).
PLAN = {"settings": {"training.per_device_train_batch_size": 4, "training.gradient_accumulation_steps": 2,
                     "training.bf16": True, "training.fp16": False, "training.gradient_checkpointing": False,
                     "training.lean_loss": True, "training.optim": "adamw_torch_fused", "lora.r": 16,
                     "lora.lora_alpha": 32, "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                    "up_proj", "down_proj"],
                     "model.load_in_4bit": False, "data.max_length": 2048, "training.torch_compile": False,
                     "training.use_liger_kernel": False},
        "processes": 1, "effective_batch_size": 8, "precision": "bf16",
        "label": "batch 4x2, no-ckpt, lean-loss, adamw_torch_fused, r16, len 2048"}


def check_audio_sources(page: Page, folder: Path) -> list[Path]:
    files = []
    for attrs in page.all("audio"):
        src = attrs["src"]
        assert src and not src.startswith(("/", "file:")) and "://" not in src and ".." not in src
        target = folder / urllib.parse.unquote(src)
        assert target.is_file(), src
        files.append(target)
    return files


# --------------------------------------------------------------------------- structure


def test_report_structure(tmp_path: Path) -> None:
    out, run, counts = make_run(tmp_path)
    path = write_report(out, run)
    assert path == out / "report.html"
    text = path.read_text(encoding="utf-8")
    page = Page(text)

    files = check_audio_sources(page, out)
    assert len(files) == counts["audio"]
    assert all(a["controls"] is not None or "controls" in a for a in page.all("audio"))
    # Generated clips by relative path, quoted; the real voice copied in beside the page.
    assert urllib.parse.quote("samples/step-50/音声 0.wav") in text
    copies = [f for f in files if f.parent.name == AUDIO_COPIES]
    assert copies and all(f.read_bytes() == (tmp_path / "data" / "話者A" / "本物 1.wav").read_bytes() for f in copies)
    assert "no audio" in text and "audio file missing" in text

    assert len(page.all("svg")) == 3
    assert page.series() == {"train": [counts["loss"]], "eval": [counts["eval_loss"]],
                             "CER": [counts["evaluations"]], "WER": [counts["evaluations"]],
                             "similarity": [counts["evaluations"]]}
    assert len(page.all("circle")) == counts["loss"] + counts["eval_loss"] + 3 * counts["evaluations"]
    assert len([a for a in page.all("line") if a.get("class") == "best-marker"]) == 3

    sections = [a["id"] for a in page.all("section")]
    assert sections == ["listen", "step-50", "step-100"]
    assert "best" in next(a for a in page.all("section") if a["id"] == "step-100")["class"]
    words = " ".join("".join(page.text).split())
    assert "Listen: step 100 — the best checkpoint, by cer · CER 10.0 %, WER 11.0 %, speaker similarity 0.800" in words
    assert "Hardware: 1 x NVIDIA H200 (150.0 GiB)" in words
    assert ("Plan: batch 4 x 2 (8 samples per step), gradient checkpointing off, bf16, LoRA r 16 (alpha 32) on all 7 "
            "projections, memory-lean loss, optimizer adamw_torch_fused, up to 2,048 tokens per sample") in words
    assert "because:the dry run: fastest that fits" in words and "Result: 39,512 tokens/s" in words
    # The raw values, collapsed, at the end; rates as percentages there too.
    assert page.all("details") and text.index("<details") > text.index('id="step-100"')
    assert "plan.settings.lora.r" in text and "39,512.3" in text and "150.0 GiB" in text
    assert "summary.scores_best.mean_cer</th><td>100.0 %</td>" in text


def test_the_page_leads_with_the_voice_then_the_plan_then_the_details(tmp_path: Path) -> None:
    out, run, _ = make_run(tmp_path)
    text = write_report(out, run).read_text(encoding="utf-8")
    order = [text.index(marker) for marker in ('id="listen"', "<audio", 'id="curves"', "<svg", 'id="what-ran"',
                                               'id="evaluations"', 'id="step-50"', "<details")]
    assert order == sorted(order)


def test_every_sample_row_names_its_speaker(tmp_path: Path) -> None:
    out, run, _ = make_run(tmp_path)
    page = Page(write_report(out, run).read_text(encoding="utf-8"))
    speakers = [i for i, (tag, attrs) in enumerate(page.tags) if attrs.get("class") == "speaker"]
    assert len(speakers) == 2 * 2              # two named samples, in the listen card and in step 100
    assert "話者A" in page.text and "bob" in page.text


def test_a_page_written_while_training_says_so_and_picks_the_best_scores(tmp_path: Path) -> None:
    """Before the first checkpoint there is no best checkpoint: the best scores so far lead."""
    out, run, _ = make_run(tmp_path)
    del run["best"], run["summary"]
    text = " ".join("".join(Page(write_report(out, run).read_text(encoding="utf-8")).text).split())
    assert "training: step 100 so far" in text
    assert "Listen: step 100 — the best scores so far, by error rate" in text


def test_report_is_self_contained_and_escaped(tmp_path: Path) -> None:
    out, run, _ = make_run(tmp_path)
    text = write_report(out, run).read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    page = Page(text)
    assert not page.all("script") and not page.all("link") and not page.all("img")
    assert "@import" not in text and "url(" not in text
    assert HOSTILE in "".join(page.text)           # shown as text...
    assert '<script>alert("x")' not in text        # ...never as markup
    assert page.all("title") and f"Run {HOSTILE}" in "".join(page.text)


def test_report_is_replaced_whole(tmp_path: Path) -> None:
    out, run, _ = make_run(tmp_path)
    write_report(out, {"title": "first"})
    write_report(out, run)
    assert "first" not in (out / "report.html").read_text(encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == [AUDIO_COPIES, "report.html", "samples"]


def test_an_empty_run_still_makes_a_page(tmp_path: Path) -> None:
    page = Page(write_report(tmp_path / "bare", {}).read_text(encoding="utf-8"))
    assert not page.all("polyline") and not page.all("audio")
    text = "".join(page.text)
    assert "nothing recorded yet" in text and "no GPU" in text and "no samples were generated" in text
    assert "Plan: not recorded" in text


def test_one_evaluation_is_one_point(tmp_path: Path) -> None:
    run = {"evaluations": [{"step": 7, "samples": [], "means": {"mean_similarity": 0.5}}]}
    page = Page(write_report(tmp_path, run).read_text(encoding="utf-8"))
    assert page.series() == {"similarity": [1]}
    assert len(page.all("circle")) == 1


def test_evaluation_from_scores_joins_the_step_folder() -> None:
    scores = {"samples": [{"index": 0, "text": "hi", "wav": "0.wav", "reference_wavs": ["/data/a.wav", "/data/b.wav"],
                           "metric": "wer", "wer": 0.5, "transcript": "hi there", "similarity": 0.8},
                          {"index": 1, "text": "yo", "wav": None, "reference_wavs": [], "metric": "wer", "wer": None,
                           "transcript": None, "similarity": None, "error": "no audio"}],
              "mean_cer": None, "mean_wer": 0.5, "mean_error_rate": 0.5, "mean_similarity": 0.8, "seconds": 1.0}
    entry = evaluation_from_scores(20, scores, "samples/step-20")
    assert entry["step"] == 20
    assert entry["means"] == {"mean_cer": None, "mean_wer": 0.5, "mean_error_rate": 0.5, "mean_similarity": 0.8}
    first, second = entry["samples"]
    assert first["wav"] == "samples/step-20/0.wav" and first["reference_wav"] == "/data/a.wav"
    assert first["wer"] == 0.5 and first["transcript"] == "hi there"
    assert second["wav"] is None and second["reference_wav"] is None and second["error"] == "no audio"


# --------------------------------------------------------------------------- sweep


def make_sweep(root: Path) -> list[dict]:
    write_wav(root / "ref.wav", tone(200))
    trials = []
    for i, error in enumerate([0.12, 0.05, None, 0.30]):
        write_wav(root / f"trial-{i}" / "samples" / "step-10" / "0.wav", tone(250 + 30 * i))
        (root / f"trial-{i}" / "report.html").write_text("<p>trial</p>", encoding="utf-8")
        metrics = {} if error is None else {"mean_error_rate": error, "mean_similarity": 0.8 - error}
        sample = None if error is None else {"text": f"trial {i} {HOSTILE}", "wav": f"trial-{i}/samples/step-10/0.wav",
                                             "reference_wav": "ref.wav", "metric": "wer", "wer": error,
                                             "transcript": "trial", "similarity": 0.8 - error}
        trials.append({"name": f"trial-{i}", "status": "failed" if error is None else "done",
                       "params": {"lora": {"r": 8 * (i + 1)}}, "metrics": metrics,
                       "report": f"trial-{i}/report.html", "sample": sample})
    return trials


def ranked_names(page: Page) -> list[str]:
    return [a["href"].split("/")[0] for a in page.all("a")]


def test_sweep_report_ranks_and_plays_one_sample_each(tmp_path: Path) -> None:
    trials = make_sweep(tmp_path)
    text = write_sweep_report(tmp_path, trials, metric="mean_error_rate").read_text(encoding="utf-8")
    page = Page(text)
    assert ranked_names(page) == ["trial-1", "trial-0", "trial-3", "trial-2"]  # lower is better; no metric last
    assert all((tmp_path / urllib.parse.unquote(a["href"])).is_file() for a in page.all("a"))
    assert len(check_audio_sources(page, tmp_path)) == 2 * 3                  # generated + real voice, 3 samples
    assert "http://" not in text and "https://" not in text and not page.all("script")
    assert HOSTILE in "".join(page.text)
    best = [a for a in page.all("section") if "best" in a["class"].split()]
    assert len(best) == 1
    # Rates read as percentages in the ranking too, similarity as a cosine.
    assert '<td class="num">12.0 %</td>' in text and '<td class="num">0.68</td>' in text and ">0.12<" not in text

    by_similarity = Page(write_sweep_report(tmp_path, trials, metric="mean_similarity").read_text(encoding="utf-8"))
    assert ranked_names(by_similarity) == ["trial-1", "trial-0", "trial-3", "trial-2"]  # higher is better
    reversed_ = Page(write_sweep_report(tmp_path, trials, metric="mean_error_rate", higher_is_better=True)
                     .read_text(encoding="utf-8"))
    assert ranked_names(reversed_) == ["trial-3", "trial-0", "trial-1", "trial-2"]


def test_sweep_without_the_metric_names_no_best(tmp_path: Path) -> None:
    trials = make_sweep(tmp_path)
    page = Page(write_sweep_report(tmp_path, trials, metric="eval_loss").read_text(encoding="utf-8"))
    assert ranked_names(page) == ["trial-0", "trial-1", "trial-2", "trial-3"]  # the given order
    assert not [a for a in page.all("section") if "best" in a["class"].split()]


# --------------------------------------------------------------------------- a real browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _near(pixels: np.ndarray, hex_color: str, tolerance: float = 0.08) -> int:
    rgb = np.array([int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(pixels[..., :3] - rgb).max(axis=-1) < tolerance).sum())


def _run_chromium(browser: str, tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", *extra, "--dump-dom", url]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "HOME": str(tmp_path)})
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"Chromium could not run here: {exc}")


def test_chromium_renders_the_players_and_the_curves(tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (`apt-get install -y chromium`)")
    import matplotlib.image

    out, run, counts = make_run(tmp_path)
    report = write_report(out, run)
    screenshot = tmp_path / "shot.png"
    done = _run_chromium(browser, tmp_path, report.as_uri(), f"--screenshot={screenshot}", "--window-size=1200,2000")
    if done.returncode != 0 or not screenshot.is_file():
        pytest.skip(f"Chromium could not start here (exit {done.returncode}): {done.stderr.strip()[-300:]}")

    dom = Page(done.stdout)
    assert len(dom.all("audio")) == counts["audio"]
    check_audio_sources(dom, out)
    assert len(dom.all("svg")) == 3
    assert dom.series()["train"] == [counts["loss"]]

    pixels = matplotlib.image.imread(screenshot)
    assert pixels.shape[:2] == (2000, 1200)
    rgb = (pixels[..., :3] * 255).astype(np.uint32)
    colours = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])
    assert len(colours) > 100                       # text, players, charts: not a blank page
    # Links are blue too (about 200 pixels); the curves add well over a thousand.
    assert _near(pixels, "#2563eb") > 1000          # the blue curves (train loss, CER, similarity) were drawn
    assert _near(pixels, "#dc2626") > 150           # and the red ones (eval loss, WER); nothing else is that red


#: Lays the report out in a 1280 x 800 frame, as a laptop's browser window shows it, and
#: writes where its parts are. The report itself has no script; this page beside it has.
_MEASURE = """<!DOCTYPE html><html><body style="margin:0">
<iframe id="report" src="report.html" style="width:1280px;height:800px;border:0"></iframe><pre id="where"></pre>
<script>
window.addEventListener("load", () => {
  const page = document.getElementById("report").contentDocument;
  const box = (selector) => { const el = page.querySelector(selector); if (!el) return null;
                              const r = el.getBoundingClientRect(); return [r.top, r.bottom, r.left, r.right]; };
  document.getElementById("where").textContent = JSON.stringify({
    audio: box("#listen audio"), chart: box("svg.chart"), what_ran: box("#what-ran"),
    evaluations: box("#evaluations"), details: box("details")});
});
</script></body></html>"""


def test_chromium_shows_a_player_and_the_curves_on_the_first_screen(tmp_path: Path) -> None:
    """At 1280 x 800, before any scrolling: a player of the best clips, whole, and the curves
    starting; the plan and then the details further down, in that order."""
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (`apt-get install -y chromium`)")
    import json

    out, run, _ = make_run(tmp_path)
    write_report(out, run)
    (out / "measure.html").write_text(_MEASURE, encoding="utf-8")
    done = _run_chromium(browser, tmp_path, (out / "measure.html").as_uri(), "--allow-file-access-from-files",
                         "--window-size=1300,900")
    found = [a for a in Page(done.stdout).text if a.strip().startswith("{")]
    if done.returncode != 0 or not found:
        pytest.skip(f"Chromium could not lay the page out here (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    where = json.loads(found[0])
    top, bottom, left, right = where["audio"]
    assert 0 <= top and bottom <= 800 and 0 <= left and right <= 1280, where     # a whole player, unscrolled
    assert where["chart"][0] < 800, where                                          # the curves begin on screen
    tops = [where[key][0] for key in ("audio", "chart", "what_ran", "evaluations", "details")]
    assert tops == sorted(tops), where
