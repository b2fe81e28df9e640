"""The web UI (app.py) on the tiny model: the Studio behind the page (runs, states, checkpoints,
errors as one line, keeping a checkpoint), and the page itself in real headless Chromium driven
by Playwright (Debian's chromium through `executable_path`; skipped, with the reason, only
where Chromium cannot run)."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from tests.speech_runs import make_adapter, make_run, write_tone

pytestmark = pytest.mark.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("app") / "runs"
    finished = make_run(root / "voice-a", checkpoints=(2, 4),
                        scores={"best": {"step": 4, "mean_cer": 0.25, "mean_similarity": 0.81}})
    (finished / "report.html").write_text("<html><body><h1>the report of voice-a</h1></body></html>")
    references = finished / "samples" / "references"
    write_tone(references / "ref1.wav", seconds=1.0, frequency=200)
    write_tone(references / "ref2.wav", seconds=1.2, frequency=260)
    make_run(root / "voice-b", state="interrupted", checkpoints=(2,), seed=3)
    empty = root / "started-only"
    empty.mkdir()
    (empty / ".llasa-autotune").write_text("{}")
    (empty / "run_config.yaml").write_text("model: {name_or_path: tiny}\ndata: {codec: tiny}\n")
    return root


@pytest.fixture()
def studio(runs):
    from autotune.webui import Studio, StudioOptions

    made = Studio(StudioOptions(runs=[runs], asr_model="tiny", speaker_model="tiny"))
    yield made
    shutil.rmtree(made.out_dir, ignore_errors=True)


SAMPLING = {"temperature": 0.8, "top_p": 1.0, "repetition_penalty": 1.0, "seed": 7, "max_new_tokens": 12}


# ------------------------------------------------------------------ the Studio ---

def test_the_runs_states_and_checkpoints_are_what_the_folders_say(studio):
    from autotune.runs import summary_json

    entries = studio.entries()
    assert set(entries) == {"voice-a", "voice-b", "started-only"}
    states = {name: summary_json(e)["state"] for name, e in entries.items()}
    assert states == {"voice-a": "finished", "voice-b": "interrupted", "started-only": "failed"}
    assert studio.checkpoint_names("voice-a") == ["adapter", "checkpoint-2", "checkpoint-4"]
    assert studio.checkpoint_names("started-only") == []
    a = summary_json(entries["voice-a"])
    assert a["steps"] == 4 and a["best_eval_loss"] == 9.5 and a["best_scores"]["mean_cer"] == 0.25
    assert a["report"].endswith("report.html")


def test_errors_a_user_can_cause_are_one_line(studio, tmp_path):
    from autotune.errors import AutotuneError
    from autotune.webui import sampling_of

    cases = [
        (lambda: studio.speak("started-only", None, None, "hello", None, None, SAMPLING), "holds no adapter"),
        (lambda: studio.speak("nope", None, None, "hello", None, None, SAMPLING), "no run named"),
        (lambda: studio.speak("voice-a", "adapter", None, "", None, None, SAMPLING), "empty"),
        (lambda: studio.speak("voice-a", "adapter", None, "y" * 1990, None, None, SAMPLING), "only the first"),
        (lambda: studio.speak("voice-a", "adapter", None, "x\n" * 21, None, None, SAMPLING), "at most 20"),
        (lambda: studio.speak("voice-a", "adapter", None, "hi", str(tmp_path / "missing.wav"), "t", SAMPLING),
         "does not exist"),
        (lambda: studio.compare(["voice-a :: adapter"], "hi", None, SAMPLING), "pick 2 to 4"),
        (lambda: studio.keep("/etc", None), "no longer offered"),
        (lambda: sampling_of(float("inf"), 1.0, 1.0, "", 0), "temperature"),
        (lambda: sampling_of(0.8, 1.0, 1.0, "abc", 0), "seed"),
        (lambda: studio.codec_round_trip(None), "give a clip"),
    ]
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF not really a wave file")
    cases.append((lambda: studio.speak("voice-a", "adapter", None, "hi", str(garbage), "t", SAMPLING),
                  "cannot read"))
    for call, needle in cases:
        with pytest.raises(AutotuneError) as caught:
            call()
        line = caught.value.one_line()
        assert needle in line and "\n" not in line, line


def test_a_base_model_that_is_not_on_disk_is_a_message(tmp_path):
    from autotune.errors import AutotuneError
    from autotune.webui import Studio, StudioOptions

    adapter = make_adapter(tmp_path / "runs" / "elsewhere")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "no-such-model")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    studio = Studio(StudioOptions(adapters={"elsewhere": adapter}, codec="tiny"))
    with pytest.raises(AutotuneError, match="no such folder"):
        studio.speak("elsewhere", "adapter", None, "hello", None, None, SAMPLING)


@pytest.mark.slow
def test_guarded_handlers_turn_every_error_into_one_gradio_message():
    import gradio as gr

    from autotune.errors import AutotuneError
    from autotune.webui import guarded

    @guarded
    def user_error():
        raise AutotuneError("the text is empty:\n give the text")

    @guarded
    def bug():
        raise KeyError("boom")

    with pytest.raises(gr.Error) as caught:
        user_error()
    assert caught.value.message == "the text is empty: give the text"
    with pytest.raises(gr.Error) as caught:
        bug()
    assert "KeyError" in caught.value.message and "\n" not in caught.value.message


@pytest.mark.slow
def test_keeping_a_compared_checkpoint_makes_an_adapter_folder_synthesize_and_serve_use(studio, tmp_path, capsys):
    from autotune.adapters import read_adapter
    from autotune.runs import checkpoints

    # One second of speech each: the speaker model needs more than a fraction of a second.
    results = studio.compare(["voice-a :: checkpoint-2", "voice-a :: checkpoint-4", "voice-b :: adapter"],
                             "こんにちは", None, {**SAMPLING, "max_new_tokens": 50})
    assert [r["checkpoint"] for r in results] == ["checkpoint-2", "checkpoint-4", "adapter"]
    for r in results[:2]:
        assert r["references"] == 2 and r["scores"]["similarity"] is not None, r["scores"].get("error")
        assert r["scores"]["metric"] == "cer" and r["scores"]["cer"] is not None
    assert len({Path(r["path"]).read_bytes() for r in results}) == 3, "each checkpoint says it its own way"
    kept = studio.keep(results[1]["adapter"], results[1]["scores"])
    assert kept.name == "kept-checkpoint-4" and kept.parent.name == "voice-a"
    assert read_adapter(kept).tensors.keys() == read_adapter(Path(results[1]["adapter"])).tensors.keys()
    assert json.loads((kept / "kept.json").read_text())["step"] == 4
    assert studio.keep(results[1]["adapter"], None) == kept, "keeping twice is the same folder"
    assert "kept-checkpoint-4" in [c.name for c in checkpoints(kept.parent)]
    from autotune.cli import run_main
    from autotune.commands.synthesize import main

    with pytest.raises(SystemExit) as stop:
        run_main(main, ["--adapter", str(kept), "--text", "hi", "-o", str(tmp_path / "kept.wav"),
                        "--max-new-tokens", "4"])
    assert stop.value.code == 0 and (tmp_path / "kept.wav").is_file()
    from autotune.speech_api import Models

    assert Models({}, [kept.parent.parent]).find("voice-a/kept-checkpoint-4") == kept


def test_the_labels_exist_in_both_languages():
    from autotune.webui_text import EN, JA, missing_keys

    assert missing_keys() == {}
    assert EN["tab_speak"] == "Speak" and JA["tab_speak"] == "話す"


# ------------------------------------------------------------------ the page in Chromium ---

def chromium_or_skip():
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    return executable, sync_playwright


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def page_url(runs):
    from autotune.commands.app import build_parser, launch

    args = build_parser().parse_args(["--runs", str(runs), "--asr-model", "tiny", "--speaker-model", "tiny",
                                      "--port", str(free_port())])
    page, url = launch(args, block=False)
    yield url
    page.close()


@pytest.fixture(scope="module")
def browser():
    executable, sync_playwright = chromium_or_skip()
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except Exception as exc:  # noqa: BLE001 - Chromium cannot run here: say why
            pytest.skip(f"Chromium cannot run here: {' '.join(str(exc).split())[:200]}")
        yield launched
        launched.close()


def open_page(browser, url: str, locale: str = "en-US"):
    page = browser.new_page(locale=locale, viewport={"width": 1280, "height": 900})
    page.set_default_timeout(180_000)
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#speak")
    return page


def pick_run(page, name: str) -> None:
    page.click("#run input")
    page.get_by_role("option", name=name, exact=True).click()
    page.wait_for_function("(name) => document.querySelector('#run input').value === name", arg=name)


def audio_duration(page, selector: str) -> tuple[str, float]:
    return tuple(page.evaluate("""async (selector) => {
        const audio = document.querySelector(selector);
        if (isNaN(audio.duration) || audio.readyState < 1)
            await new Promise(done => audio.addEventListener('loadedmetadata', done, {once: true}));
        return [audio.currentSrc || audio.src, audio.duration];
    }""", selector))


@pytest.mark.slow
def test_the_page_loads_in_english_and_in_japanese(browser, page_url):
    english = open_page(browser, page_url)
    tabs = english.locator("button[role=tab]").all_inner_texts()
    assert [t.strip() for t in tabs][:4] == ["Speak", "Compare", "Runs", "Codec"]
    japanese = open_page(browser, page_url, locale="ja-JP")
    tabs = japanese.locator("button[role=tab]").all_inner_texts()
    assert [t.strip() for t in tabs][:4] == ["話す", "比較", "学習一覧", "コーデック"]


@pytest.mark.slow
def test_speaking_gives_an_audio_with_a_source_and_a_duration(browser, page_url, tmp_path):
    page = open_page(browser, page_url)
    pick_run(page, "voice-a")
    page.fill("#text textarea", "こんにちは\n今日はいい天気ですね。")
    page.click("#speak")
    page.wait_for_selector("#clips audio >> nth=1")
    source, duration = audio_duration(page, "#clips audio")
    assert "/gradio_api/file=" in source and source.endswith(".wav")
    assert duration > 0
    assert "real-time factor" in page.inner_text("#timing")
    shot = tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("LLASA_UPDATE_SCREENSHOT"):
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, ROOT / "docs" / "app.png")


@pytest.mark.slow
def test_compare_shows_two_scored_clips_and_keeps_one(browser, page_url, runs):
    page = open_page(browser, page_url)
    page.get_by_role("tab", name="Compare").click()
    page.get_by_label("voice-a · checkpoint-2", exact=True).check()
    page.get_by_label("voice-a · adapter", exact=True).check()
    page.click("#compare")
    page.wait_for_selector("#compared-1 audio")
    for i in (0, 1):
        text = page.inner_text(f"#compared-{i}")
        assert "CER" in text and "similarity 0." in text and "vs 2 reference clips" in text, text
        _, duration = audio_duration(page, f"#compared-{i} audio")
        assert duration > 0
    page.click("#keep-0")
    page.wait_for_selector("#kept :text('kept-checkpoint-2')")
    assert (runs / "voice-a" / "kept-checkpoint-2" / "adapter_model.safetensors").is_file()
    if os.environ.get("LLASA_UPDATE_SCREENSHOT"):
        page.screenshot(path=str(ROOT / "docs" / "app-compare.png"), full_page=True)


@pytest.mark.slow
def test_an_over_long_text_shows_how_much_fits(browser, page_url):
    page = open_page(browser, page_url)
    pick_run(page, "voice-a")
    page.fill("#text textarea", "y" * 1990)
    page.click("#speak")
    message = page.wait_for_selector("text=/only the first [0-9,]+ of its 1,990 characters fit/")
    assert message.is_visible()
    assert "Traceback" not in page.content()


@pytest.mark.slow
def test_the_runs_tab_lists_a_finished_and_an_interrupted_run_with_its_report(browser, page_url):
    page = open_page(browser, page_url)
    page.get_by_role("tab", name="Runs").click()
    page.wait_for_selector("#runs-table tr[data-state=finished]")
    states = page.eval_on_selector_all("#runs-table tr.llasa-run", "rows => rows.map(r => r.dataset.state)")
    assert {"finished", "interrupted", "failed"} <= set(states)
    finished = page.locator("#runs-table tr[data-state=finished]")
    assert "voice-a" in finished.inner_text() and "4 / 4" in finished.inner_text()
    assert "CER 25.0%" in finished.inner_text()
    link = finished.locator("a").get_attribute("href")
    report = page.request.get(page_url.rstrip("/") + link)
    assert report.status == 200 and "the report of voice-a" in report.text()


def test_codec_round_trip_and_a_blank_voice_prompt_transcript_filled_by_asr(studio, tmp_path):
    import soundfile as sf

    clip = write_tone(tmp_path / "tone.wav", seconds=1.0)
    path, info = studio.codec_round_trip(str(clip))
    assert sf.info(path).frames == 50 * 320 and "50 codes" in info
    clips, heard = studio.speak("voice-a", "adapter", None, "こんにちは", str(clip), "", SAMPLING)
    assert heard and heard.strip(), "the tiny ASR model wrote the transcript"
    assert len(clips) == 1 and sf.info(clips[0]["path"]).frames > 0
