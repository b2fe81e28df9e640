"""What a run folder is, and what may happen to it (issue #22's severe kinds): only a folder with
this tool's marker is a run; a run knows its kind (run or sweep); `--overwrite` moves the old one
aside until the new one trains, for sweeps too; the user's files are never inside what is replaced,
and the run never writes inside the data; a kill between moving aside and training is put right at
the next start; a finished run resumed trains nothing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from autotune import rundir
from autotune.errors import AutotuneError
from tests.tiny_runs import DATA, TINY, run_train as train

FAST = [*TINY, "--set", "training.logging_steps=1",
        "--set", "training.max_steps=2", "--set", "training.eval_steps=2", "--set", "training.save_steps=2",
        "--set", "training.report_to=none"]


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def data_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    shutil.copytree(DATA, folder)
    return folder


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------- only the marker is a run ---

@pytest.mark.parametrize("lookalike", [rundir.RUN_CONFIG, rundir.SWEEP_RECORD])
def test_a_folder_that_only_looks_like_a_run_is_never_replaced(tmp_path, capsys, lookalike):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / lookalike).write_text("not a run of this tool\n")
    (folder / "notes.txt").write_text("years of work")
    before = contents(folder)
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert train("--data", str(DATA), *FAST, "--output-dir", str(folder), *extra) == 2
        err = one_line_error(capsys)
        assert "not a run of this tool" in err or "no run of this tool" in err
        assert "--overwrite` to replace" not in err   # the hint never offers to replace it
    assert contents(folder) == before


@pytest.mark.slow
def test_a_lock_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--data", str(DATA), *FAST, "--output-dir", str(out)) == 0
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (out / rundir.LOCK).unlink()
    (out / rundir.LOCK).symlink_to(precious)
    assert train("--data", str(DATA), *FAST, "--output-dir", str(out), "--overwrite") == 2
    assert "symbolic link" in one_line_error(capsys)
    assert precious.read_text() == "keep me"
    # The low-level lock refuses a link on its own too.
    with pytest.raises(AutotuneError, match="symbolic link"):
        rundir.RunFolder(out)._lock(out)
    assert precious.read_text() == "keep me"


# ------------------------------------------------- the user's files are safe ---

@pytest.mark.slow
def test_data_inside_the_folder_being_replaced_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--data", str(DATA), *FAST, "--output-dir", str(out)) == 0
    shutil.copy(DATA / "train.jsonl", out / "train.jsonl")
    before = contents(out)
    assert train("--data", str(out / "train.jsonl"), *FAST, "--output-dir", str(out), "--overwrite") == 2
    assert "inside `--output-dir" in one_line_error(capsys)
    assert contents(out) == before


def test_the_output_folder_may_not_be_inside_the_data_folder(tmp_path, capsys):
    data = data_copy(tmp_path)
    before = contents(data)
    assert train("--data", str(data), *FAST, "--output-dir", str(data / "runs" / "x")) == 2
    assert "inside the data folder" in one_line_error(capsys)
    assert contents(data) == before


def test_the_default_output_folder_stays_out_of_the_data_folder(tmp_path, monkeypatch):
    from autotune.pipeline import default_output_dir

    data = data_copy(tmp_path)
    monkeypatch.chdir(data)
    chosen = default_output_dir(".")
    assert not str(chosen.resolve()).startswith(str(data.resolve()) + os.sep)
    assert chosen.parent == data.resolve().parent / "runs"
    monkeypatch.chdir(tmp_path)
    assert default_output_dir(str(data)).parent == Path("runs")


# ------------------------------------------------------- --overwrite of a sweep ---

SWEEP = ["--sweep", "training.learning_rate=1e-4,2e-4"]


@pytest.mark.slow
def test_a_sweep_replaced_by_one_that_fails_before_training_comes_back_whole(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    assert train("--data", str(DATA), *FAST, *SWEEP, "--output-dir", str(out)) == 0
    before = contents(out)
    before.pop(rundir.LOCK, None)
    from autotune import model as M

    def no_model(*args, **kwargs):
        raise AutotuneError("cannot load the model (test)")

    monkeypatch.setattr(M, "load_base_model", no_model)
    code = train("--data", str(DATA), *FAST, *SWEEP, "--output-dir", str(out), "--overwrite")
    assert code != 0
    after = contents(out)
    after.pop(rundir.LOCK, None)
    assert after == before
    assert not list(tmp_path.glob(".replaced-*"))


@pytest.mark.slow
def test_a_sweep_stopped_before_training_puts_back_the_run_it_replaced(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert train("--data", str(DATA), *FAST, "--output-dir", str(out)) == 0
    adapter = (out / "adapter_model.safetensors").read_bytes()
    from autotune import model as M

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(M, "load_base_model", interrupted)
    assert train("--data", str(DATA), *FAST, *SWEEP, "--output-dir", str(out), "--overwrite") == 130
    assert (out / "adapter_model.safetensors").read_bytes() == adapter
    assert rundir.kind_of(out) == rundir.RUN


# ----------------------------------------------------------- a run's kind ---

@pytest.mark.slow
def test_a_plain_resume_of_a_sweep_is_refused_and_the_sweep_resumes(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert train("--data", str(DATA), *FAST, *SWEEP, "--output-dir", str(out)) == 0
    before = contents(out)
    assert train("--data", str(DATA), *FAST, "--output-dir", str(out), "--resume") == 2
    err = one_line_error(capsys)
    assert "holds a sweep" in err and "--sweep" in err
    assert contents(out) == before
    assert train("--data", str(DATA), *FAST, *SWEEP, "--output-dir", str(out), "--resume") == 0


@pytest.mark.slow
def test_a_sweep_resume_of_a_single_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--data", str(DATA), *FAST, "--output-dir", str(out)) == 0
    assert train("--data", str(DATA), *FAST, *SWEEP, "--output-dir", str(out), "--resume") == 2
    assert "holds a single run" in one_line_error(capsys)


@pytest.mark.slow
def test_a_sweep_resumed_after_its_config_file_changed_is_refused(tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text("lora:\n  r: 4\n")
    out = tmp_path / "sweep"
    argv = ["--data", str(DATA), *FAST, *SWEEP, "--output-dir", str(out), "--config", str(config)]
    record = out / rundir.SWEEP_RECORD
    assert train(*argv) == 0
    # The sweep stopped after its first trial: forget the second, as a stop would have left it.
    saved = json.loads(record.read_text())
    shutil.rmtree(out / saved["trials"][1]["name"], ignore_errors=True)
    config.write_text("lora:\n  r: 8\n")
    assert train(*argv, "--resume") == 2
    err = one_line_error(capsys)
    assert "lora.r" in err and "4 -> 8" in err


# ------------------------------------------------ a kill between aside and training ---

@pytest.mark.slow
def test_an_old_run_left_aside_by_a_kill_is_put_back_at_the_next_start(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--data", str(DATA), *FAST, "--output-dir", str(out)) == 0
    before = contents(out)
    before.pop(rundir.LOCK, None)
    # What `--overwrite` leaves when killed after the move: the old run aside, a new folder never trained.
    dead_pid = 2**22 + 17
    aside = out.with_name(f"{rundir.REPLACED_PREFIX}{out.name}-{dead_pid}-1700000000")
    os.rename(out, aside)
    rundir.mark_ours(out)
    assert train("--data", str(DATA), *FAST, "--output-dir", str(out), "--check-data") == 0
    assert "put back" in capsys.readouterr().out
    after = contents(out)
    after.pop(rundir.LOCK, None)
    assert after == before and not aside.exists()


@pytest.mark.slow
def test_an_old_run_left_aside_beside_a_trained_one_is_named_with_how_to_restore_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--data", str(DATA), *FAST, "--output-dir", str(out)) == 0
    aside = out.with_name(f"{rundir.REPLACED_PREFIX}{out.name}-{2**22 + 17}-1700000000")
    shutil.copytree(out, aside)
    capsys.readouterr()
    assert train("--data", str(DATA), *FAST, "--output-dir", str(out), "--check-data") == 0
    said = capsys.readouterr().out
    assert str(aside) in " ".join(said.split()) and "mv " in said and aside.is_dir()


# ---------------------------------------------------- a finished run, resumed ---

@pytest.mark.slow
def test_a_finished_run_resumed_trains_nothing_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--data", str(DATA), *FAST, "--output-dir", str(out)) == 0
    before = contents(out)
    before.pop(rundir.LOCK, None)
    capsys.readouterr()
    assert train("--data", str(DATA), *FAST, "--output-dir", str(out), "--resume") == 0
    assert "nothing to resume" in " ".join(capsys.readouterr().out.split())
    after = contents(out)
    after.pop(rundir.LOCK, None)
    assert after == before
    # Raising max_steps with --allow-changes continues it.
    assert train("--data", str(DATA), *FAST[:-8], "--set", "training.max_steps=4", "--set", "training.eval_steps=2",
                 "--set", "training.save_steps=2", "--set", "training.report_to=none",
                 "--output-dir", str(out), "--resume", "--allow-changes") == 0
    assert json.loads((out / rundir.RUN_SUMMARY).read_text())["steps"] == 4


@pytest.mark.slow
def test_a_kill_while_a_sweep_resumes_keeps_its_finished_trials_times(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    argv = ["--data", str(DATA), *FAST, *SWEEP, "--output-dir", str(out)]
    assert train(*argv) == 0
    record = out / rundir.SWEEP_RECORD
    first = json.loads(record.read_text())
    done = first["trials"][0]
    shutil.rmtree(out / first["trials"][1]["name"])   # the second trial never ran

    class Killed(BaseException):
        """`kill -9`: nothing after this point runs, no handler, no last save."""

    from autotune.sweep import local

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(local, "run_trial", killed)
    with pytest.raises(Killed):
        from autotune.cli import run_main
        from train import main

        run_main(main, [*argv, "--resume"])
    left = json.loads(record.read_text())["trials"][0]
    assert left["name"] == done["name"]
    assert left["started_at"] == done["started_at"] and left["finished_at"] == done["finished_at"]


# --------------------------------------------------------- a read-only folder ---

@pytest.mark.slow
def test_a_folder_that_turns_read_only_at_a_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch,
                                                                                          capsys):
    import errno

    import torch

    from autotune import checkpoints as K

    out = tmp_path / "run"
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):   # the file system is remounted read-only after the first save
            raise OSError(errno.EROFS, "Read-only file system", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    argv = ["--data", str(DATA), *FAST[:-8], "--set", "training.max_steps=4", "--set", "training.eval_steps=2",
            "--set", "training.save_steps=2", "--set", "training.report_to=none", "--output-dir", str(out)]
    assert train(*argv) == 2
    err = one_line_error(capsys)
    assert "read-only" in err and "checkpoint-2" in err and "--resume" in err
    assert K.newest_checkpoint(out) == out / "checkpoint-2"
    # A temporary file such a failure leaves is gone at the next claim; the resume then finishes.
    (out / ".report.html.abcd1234.tmp").write_text("half")
    monkeypatch.undo()
    assert train(*argv, "--resume") == 0
    assert not (out / ".report.html.abcd1234.tmp").exists()


# ------------------------------------------------------ the split on resume ---

@pytest.mark.slow
def test_resume_keeps_the_recorded_split_when_the_data_grew(tmp_path, capsys):
    data = data_copy(tmp_path)
    out = tmp_path / "run"
    argv = ["--data", str(data), *FAST[:-8], "--set", "training.eval_steps=2", "--set", "training.save_steps=2",
            "--set", "training.report_to=none", "--output-dir", str(out)]
    assert train(*argv, "--set", "training.max_steps=2") == 0
    before = json.loads((out / rundir.SPLIT_RECORD).read_text())
    lines = (data / "train.jsonl").read_text(encoding="utf-8").splitlines()
    grown = []
    for line in lines[:8]:   # new clips: other text and other codes (a copy of a clip is kept once)
        item = json.loads(line)
        item["text"], item["code"] = "新しい" + item["text"], list(reversed(item["code"]))
        grown.append(json.dumps(item, ensure_ascii=False))
    (data / "train.jsonl").write_text("\n".join(lines + grown) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert train(*argv, "--set", "training.max_steps=4", "--resume", "--allow-changes") == 0
    after = json.loads((out / rundir.SPLIT_RECORD).read_text())
    assert after["val"] == before["val"] and after["val_source"] == "recorded"
    assert after["train_count"] == before["train_count"] + 8
    assert "8 samples new since then train" in " ".join(capsys.readouterr().out.split())
