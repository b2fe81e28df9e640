"""The run folder's rules on made-up folders, without training (the end-to-end cases are in
test_run_folders.py, slow tier): what counts as a run, its kind, the lock, nesting, what a
killed `--overwrite` left, and a finished run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from autotune import rundir
from autotune.errors import AutotuneError
from autotune.rundir import RUN, SWEEP, RunFolder


def run_folder(path: Path, kind: str = RUN, trained: bool = True) -> Path:
    rundir.mark_ours(path, kind)
    if trained:
        (path / (rundir.SWEEP_RECORD if kind == SWEEP else rundir.RUN_CONFIG)).write_text("x")
    return path


@pytest.mark.parametrize("name", [rundir.RUN_CONFIG, rundir.SWEEP_RECORD])
def test_a_lookalike_is_no_run_for_any_action(tmp_path, name):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / name).write_text("mine")
    assert not rundir.is_ours(folder)
    for kind in (RUN, SWEEP):
        for resume, overwrite in ((False, False), (False, True), (True, False)):
            with pytest.raises(AutotuneError) as caught:
                RunFolder(folder, kind).check(resume=resume, overwrite=overwrite)
            assert "--overwrite` to replace" not in str(caught.value)


def test_a_run_and_a_sweep_resume_only_as_themselves(tmp_path):
    run, sweep = run_folder(tmp_path / "run"), run_folder(tmp_path / "sweep", SWEEP)
    assert RunFolder(run, RUN).check(resume=True, overwrite=False) == "resume"
    assert RunFolder(sweep, SWEEP).check(resume=True, overwrite=False) == "resume"
    with pytest.raises(AutotuneError, match="holds a sweep, not a single run"):
        RunFolder(sweep, RUN).check(resume=True, overwrite=False)
    with pytest.raises(AutotuneError, match="holds a single run, not a sweep"):
        RunFolder(run, SWEEP).check(resume=True, overwrite=False)
    # Either kind may replace the other with --overwrite, through the move aside.
    assert RunFolder(sweep, RUN).check(resume=False, overwrite=True) == "replace"


def test_an_older_marker_without_a_kind_is_read_from_its_files(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / rundir.MARKER).write_text(json.dumps({"tool": "llasa-autotune"}))
    assert rundir.kind_of(folder) == RUN
    (folder / rundir.SWEEP_RECORD).write_text("{}")
    assert rundir.kind_of(folder) == SWEEP


def test_the_lock_never_follows_a_link(tmp_path):
    folder = run_folder(tmp_path / "run")
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (folder / rundir.LOCK).symlink_to(target)
    with pytest.raises(AutotuneError, match="symbolic link"):
        RunFolder(folder).check(resume=True, overwrite=False)
    with pytest.raises(AutotuneError, match="symbolic link"):
        RunFolder(folder)._lock(folder)
    assert target.read_text() == "keep me" and rundir.holder_of(folder) is None


def test_inputs_and_output_may_not_hold_each_other(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    (data / "wavs").mkdir(parents=True)
    (data / "metadata.csv").write_text("a|b\n")
    out.mkdir()
    assert rundir.nested_problem(out, {"--data": data}) is None
    assert "inside the data folder" in rundir.nested_problem(data / "runs" / "x", {"--data": data})
    assert "inside the data folder" in rundir.nested_problem(data / "r", {"--data": data / "metadata.csv"})
    (out / "train.jsonl").write_text("{}")
    assert "inside `--output-dir" in rundir.nested_problem(out, {"--data": out / "train.jsonl"})
    assert "inside `--output-dir" in rundir.nested_problem(out, {"--config": out / "c.yaml"})


def aside_of(folder: Path) -> Path:
    return folder.with_name(f"{rundir.REPLACED_PREFIX}{folder.name}-{2**22 + 17}-1700000000")


def test_a_run_left_aside_is_put_back_over_a_new_folder_that_never_trained(tmp_path):
    out = tmp_path / "run"
    old = run_folder(aside_of(out))
    (old / "adapter_model.safetensors").write_bytes(b"weights")
    run_folder(out)                         # the new run wrote its config, then was killed
    lines = RunFolder(out).recover_left_aside()
    assert len(lines) == 1 and lines[0].startswith("put back")
    assert (out / "adapter_model.safetensors").read_bytes() == b"weights" and not old.exists()


def test_a_run_left_aside_beside_one_that_trained_is_named_not_moved(tmp_path):
    out = tmp_path / "run"
    old = run_folder(aside_of(out))
    folder = RunFolder(out)
    run_folder(out)
    folder.training_started()               # its marker says the new run trained
    assert rundir.has_trained(out)
    lines = folder.recover_left_aside()
    assert len(lines) == 1 and str(old) in lines[0] and "mv " in lines[0] and old.is_dir()


def test_a_live_overwrite_is_left_alone(tmp_path):
    out = tmp_path / "run"
    live = run_folder(out.with_name(f"{rundir.REPLACED_PREFIX}{out.name}-{os.getppid()}-1700000000"))
    assert RunFolder(out).recover_left_aside() == [] and live.is_dir()


def test_a_finished_run_is_told_from_a_stopped_one(tmp_path):
    done, stopped = run_folder(tmp_path / "done"), run_folder(tmp_path / "stopped")
    (done / rundir.RUN_SUMMARY).write_text(json.dumps({"interrupted": None, "steps": 4}))
    (stopped / rundir.RUN_SUMMARY).write_text(json.dumps({"interrupted": "SIGTERM", "steps": 2}))
    assert rundir.finished_run(done)["steps"] == 4
    assert rundir.finished_run(stopped) is None and rundir.finished_run(tmp_path) is None


def test_what_a_resume_of_a_finished_run_may_extend():
    from autotune.resuming import extends_the_run

    assert extends_the_run([{"key": "training.max_steps", "before": 4, "after": 8}])
    assert not extends_the_run([{"key": "training.max_steps", "before": 8, "after": 4}])
    assert not extends_the_run([{"key": "training.learning_rate", "before": 1e-4, "after": 5e-5}])
    assert extends_the_run([{"key": "training.num_train_epochs", "before": 3, "after": 5}])


def test_temporary_files_of_failed_writes_are_cleared_but_nothing_else(tmp_path):
    folder = run_folder(tmp_path / "run")
    (folder / ".report.html.ab12cd34.tmp").write_text("half")
    (folder / "samples" / "step-2").mkdir(parents=True)
    (folder / "samples" / "step-2" / ".0.wav.zz99yy88.tmp").write_text("half")
    (folder / "notes.tmp").write_text("a user's file")
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / ".x.ab12cd34.tmp").write_text("the checkpoint's own business")
    removed = rundir.clear_temporaries(folder)
    assert sorted(p.name for p in removed) == [".0.wav.zz99yy88.tmp", ".report.html.ab12cd34.tmp"]
    assert (folder / "notes.tmp").exists() and (folder / "checkpoint-2" / ".x.ab12cd34.tmp").exists()


def test_a_write_failure_is_named_by_what_the_storage_did():
    import errno

    assert rundir.write_failure(OSError(errno.EROFS, "Read-only file system")) == "the file system is read-only"
    assert rundir.write_failure(OSError(errno.ENOSPC, "No space left on device")) == "the disk is full"
    assert "not writable" in rundir.write_failure(PermissionError(errno.EACCES, "Permission denied"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("torch's writer lost the errno") from inner
    except RuntimeError as outer:
        assert rundir.write_failure(outer) == "the disk is full"
    assert rundir.write_failure(ValueError("a bug")) is None
