"""The run folder: --overwrite never deletes what is not a run, one process per folder,
signals outside the training loop, writes that never leave half a file."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from autotune import rundir
from autotune.errors import AutotuneError
from tests.tiny_runs import DATA, ROOT, TINY, run_train as train

FAST = ["--data", str(DATA), *TINY,
        "--set", "training.logging_steps=1", "--set", "training.max_steps=2", "--set", "training.eval_steps=2",
        "--set", "training.save_steps=2"]


def users_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "thesis"
    (folder / "src").mkdir(parents=True)
    (folder / "thesis.docx").write_bytes(b"years of work")
    (folder / "src" / "main.c").write_text("int main(){}")
    return folder


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -------------------------------------------------------------- --overwrite ---

def test_overwrite_checks_first_a_typo_leaves_the_run_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(*FAST, "--output-dir", str(out)) == 0
    before = contents(out)
    capsys.readouterr()
    assert train(*FAST, "--output-dir", str(out), "--overwrite", "--set", "lora.rnak=1") == 2
    assert "lora.rnak" in capsys.readouterr().err
    assert contents(out) == before


def test_overwrite_refuses_a_folder_that_is_not_ours(tmp_path, capsys):
    folder = users_folder(tmp_path)
    before = contents(folder)
    assert train(*FAST, "--output-dir", str(folder), "--overwrite") == 2
    err = capsys.readouterr().err
    assert "refuses to replace" in err and str(folder) in err and len(err.strip().splitlines()) == 1
    assert contents(folder) == before


def test_overwrite_replaces_our_run_only_once_the_new_one_trains(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert train(*FAST, "--output-dir", str(out)) == 0
    first = (out / "adapter_model.safetensors").read_bytes()
    # The new run fails before training (the model cannot load): the old run must come back whole.
    from autotune import model as M

    def no_model(*args, **kwargs):
        raise AutotuneError("cannot load the model (test)")

    monkeypatch.setattr(M, "load_base_model", no_model)
    assert train(*FAST, "--output-dir", str(out), "--overwrite", "--set", "training.learning_rate=5e-3") == 2
    assert (out / "adapter_model.safetensors").read_bytes() == first
    assert not list(tmp_path.glob(rundir.REPLACED_PREFIX + "*")), "nothing left aside"
    monkeypatch.undo()
    assert train(*FAST, "--output-dir", str(out), "--overwrite", "--set", "training.learning_rate=5e-3") == 0
    assert (out / "adapter_model.safetensors").read_bytes() != first
    assert not list(tmp_path.glob(rundir.REPLACED_PREFIX + "*")), "the old run is deleted once the new one trained"


@pytest.mark.slow
def test_overwrite_through_a_symlinked_output_dir(tmp_path):
    real = tmp_path / "real"
    assert train(*FAST, "--output-dir", str(real)) == 0
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    assert train(*FAST, "--output-dir", str(link), "--overwrite") == 0
    assert link.is_symlink() and (real / rundir.RUN_SUMMARY).is_file()


def test_a_failed_start_leaves_a_folder_the_next_run_may_use(tmp_path, monkeypatch):
    out = tmp_path / "run"
    from autotune.tuning import dryrun

    def broken(*args, **kwargs):
        raise AutotuneError("the dry run failed (test)")

    monkeypatch.setattr(dryrun, "search", broken)
    assert train(*FAST, "--output-dir", str(out), "--auto") == 2
    assert rundir.is_ours(out) and not rundir.has_started(out)
    monkeypatch.undo()
    assert train(*FAST, "--output-dir", str(out)) == 0, "no --overwrite needed: nothing was trained there"


# ------------------------------------------------------------------- lock ---

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from autotune.rundir import RunFolder
    folder = RunFolder(Path(sys.argv[1]))
    folder.claim(folder.check(resume=False, overwrite=False))
    print("held", flush=True)
    time.sleep(60)
""")


def test_a_second_process_is_refused_with_the_pid_and_a_dead_holder_blocks_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["--resume"], ["--overwrite"]):
            assert train(*FAST, "--output-dir", str(out), *extra) == 2
            err = capsys.readouterr().err
            assert f"in use by process {holder.pid}" in err, (extra, err)
    finally:
        holder.kill()
        holder.wait()
    assert (out / rundir.LOCK).read_text().strip() == str(holder.pid), "the dead holder's PID is still written"
    assert train(*FAST, "--output-dir", str(out)) == 0, "a lock whose process is gone does not block"


def test_resume_during_a_live_run_deletes_nothing(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        saving = out / ".tmp-checkpoint-12"
        saving.mkdir()
        (saving / "README.md").write_text("being written")
        assert train(*FAST, "--output-dir", str(out), "--resume") == 2
        assert (saving / "README.md").is_file(), "a live run's save in progress is not 'cut short'"
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- signals ---

def test_sighup_mid_training_saves_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    from autotune.training import trainer as T

    real_step = T.LlasaTrainer.training_step
    sent = []

    def step(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == 1 and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGHUP)   # a closed terminal
        return real_step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(T.LlasaTrainer, "training_step", step)
    out = tmp_path / "run"
    assert train(*FAST, "--output-dir", str(out), "--set", "training.max_steps=4") == 129
    summary = json.loads((out / rundir.RUN_SUMMARY).read_text())
    assert summary["interrupted"] == "SIGHUP" and (out / "checkpoint-2").is_dir()
    assert "--resume --output-dir" in capsys.readouterr().out


@pytest.mark.slow
def test_sigterm_during_the_dry_run_leaves_a_folder_resume_can_use(tmp_path, monkeypatch, capsys):
    from autotune.tuning import dryrun

    real = dryrun.TrainerMeasure.__call__

    def measure(self, plan):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, plan)

    monkeypatch.setattr(dryrun.TrainerMeasure, "__call__", measure)
    out = tmp_path / "run"
    assert train(*FAST, "--output-dir", str(out), "--auto") == 143
    said = capsys.readouterr()
    assert "SIGTERM before training started: stopped" in said.out and "Traceback" not in said.err
    assert rundir.is_ours(out) and not rundir.has_started(out)
    monkeypatch.undo()
    assert train(*FAST, "--output-dir", str(out), "--auto", "--resume") == 0, "the printed hint works"
    assert json.loads((out / rundir.RUN_SUMMARY).read_text())["steps"] == 2


def test_sigterm_while_encoding_audio_says_to_run_again(tmp_path, monkeypatch, capsys):
    import soundfile as sf
    import numpy as np

    from autotune import codec

    data = tmp_path / "data"
    (data / "wavs").mkdir(parents=True)
    lines = []
    for i in range(3):
        sf.write(str(data / "wavs" / f"a{i}.wav"), np.sin(np.arange(8000) * (0.01 + i / 100)).astype("float32"), 16000)
        lines.append(f"a{i}|テキスト{i}")
    (data / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    real = codec.Codec.encode

    def encode(self, wave):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, wave)

    monkeypatch.setattr(codec.Codec, "encode", encode)
    out = tmp_path / "run"
    assert train("--data", str(data), "--model", "tiny", "--codec", "tiny", "--output-dir", str(out)) == 143
    said = capsys.readouterr().out
    assert "run the same command again" in said
    assert not out.exists() or not rundir.has_started(out)


def test_sigterm_during_the_final_save_finishes_it(tmp_path, monkeypatch, capsys):
    from autotune.training import outputs

    real = outputs.save_adapter

    def save(model, output_dir, console=None):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(model, output_dir, console)

    monkeypatch.setattr(outputs, "save_adapter", save)
    out = tmp_path / "run"
    assert train(*FAST, "--output-dir", str(out)) == 143
    summary = json.loads((out / rundir.RUN_SUMMARY).read_text())
    assert summary["adapter_saved"] is True and summary["signal_after_last_step"] == "SIGTERM"
    assert (out / "adapter_model.safetensors").is_file()
    assert "finished and was saved whole" in capsys.readouterr().out


# ----------------------------------------------------------- writes, paths ---

def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    target = tmp_path / "run_summary.json"
    target.write_text("old")
    import builtins

    real_open = builtins.open

    class FullFile:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        return FullFile(handle) if "w" in mode and str(path).endswith(".tmp") else handle

    monkeypatch.setattr(builtins, "open", fake_open)
    with pytest.raises(AutotuneError, match="disk is full; nothing half-written"):
        rundir.write_json(target, {"a": 1})
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["run_summary.json"], "no .tmp left behind"


@pytest.mark.parametrize("code, said", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only")])
def test_a_file_a_writer_cannot_finish_is_one_line_and_leaves_no_file(tmp_path, code, said):
    """A writer that wants a file name (safetensors, soundfile): half its bytes reach the disk, then it fails."""
    with pytest.raises(AutotuneError, match=said):
        with rundir.atomic_path(tmp_path / "clip.wav") as tmp:
            tmp.write_bytes(b"RIFF half")
            raise OSError(code, os.strerror(code))
    assert list(tmp_path.iterdir()) == [], "no 0-byte or half file, no .tmp"


def test_paths_that_are_not_utf8_are_written_as_escapes(tmp_path):
    name = os.fsdecode(b"data-\xff")
    target = tmp_path / "split.json"
    rundir.write_json(target, {"val": [f"/x/{name}/train.jsonl:3"]})
    assert json.loads(target.read_text(encoding="utf-8")) == {"val": ["/x/data-\\xff/train.jsonl:3"]}


def test_a_data_folder_whose_name_is_not_utf8_trains(tmp_path):
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/data-\xff"))
    folder.mkdir()
    (folder / "train.jsonl").write_bytes((DATA / "train.jsonl").read_bytes())
    out = tmp_path / "run"
    args = [a if a != str(DATA) else str(folder) for a in FAST]
    assert train(*args, "--output-dir", str(out)) == 0
    split = json.loads((out / rundir.SPLIT_RECORD).read_text(encoding="utf-8"))
    assert all("data-\\xff" in source for source in split["val"])


@pytest.mark.parametrize("env", [{"PYTHONIOENCODING": "ascii"}, {"LC_ALL": "C", "LANG": "C"}])
@pytest.mark.slow
def test_odd_console_encodings_and_a_japanese_path_print_without_a_traceback(tmp_path, env):
    folder = tmp_path / "音声データ"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes((DATA / "train.jsonl").read_bytes())
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(folder), "--check-data",
                           "--model", "tiny"], cwd=ROOT, capture_output=True, timeout=120,
                          env={**os.environ, **env, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    assert b"Traceback" not in proc.stderr


def test_files_written_whole_get_the_modes_of_ordinary_files(tmp_path: Path):
    """Atomic writes go through a 0600 temporary file; the result has the umask's mode, as
    `open()` would give, so a run's report and summary stay readable to others."""
    old = os.umask(0o022)
    try:
        rundir.write_text(tmp_path / "report.html", "<html></html>")
        with rundir.atomic_path(tmp_path / "clip.wav") as tmp:
            tmp.write_bytes(b"png")
        os.umask(0o077)
        rundir.write_json(tmp_path / "private.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "clip.wav").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
