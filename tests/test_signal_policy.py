"""One signal policy for the whole life of a process (issue #22): SIGINT, SIGTERM and SIGHUP end
in 130, 143 and 129 at any moment, with one line and never a traceback; once training has run,
a signal lets the run write its adapter and summary first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from autotune import rundir
from tests.tiny_runs import DATA, ROOT, TINY, run_train as train

FAST = ["--data", str(DATA), *TINY,
        "--set", "training.logging_steps=1", "--set", "training.max_steps=2", "--set", "training.eval_steps=2",
        "--set", "training.save_steps=2", "--set", "training.report_to=none"]


@pytest.mark.slow
def test_a_signal_in_the_gap_after_the_last_step_lets_the_run_finish_its_files(tmp_path, monkeypatch, capsys):
    from autotune.training import recovery

    real = recovery.fit

    def fit_then_hangup(*args, **kwargs):
        result = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGHUP)   # the terminal closes as training ends
        return result

    monkeypatch.setattr(recovery, "fit", fit_then_hangup)
    out = tmp_path / "run"
    assert train(*FAST, "--output-dir", str(out)) == 129
    said = capsys.readouterr()
    assert "nothing was trained" not in said.out and "Traceback" not in said.err
    summary = json.loads((out / rundir.RUN_SUMMARY).read_text())
    assert summary["adapter_saved"] is True and summary["signal_after_last_step"] == "SIGHUP"
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_signal_during_the_last_evaluation_exits_with_its_code(tmp_path, monkeypatch, capsys):
    from transformers.trainer_callback import CallbackHandler

    real = CallbackHandler.on_evaluate
    sent = []

    def on_evaluate(self, args, state, control, metrics):
        if state.global_step >= state.max_steps and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, args, state, control, metrics)

    monkeypatch.setattr(CallbackHandler, "on_evaluate", on_evaluate)
    out = tmp_path / "run"
    assert train(*FAST, "--output-dir", str(out)) == 143
    assert sent and "Traceback" not in capsys.readouterr().err
    monkeypatch.undo()
    # Whatever the moment, what it left resumes to a whole run.
    code = train(*FAST, "--output-dir", str(out), "--resume")
    assert code == 0 and (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_second_signal_while_finishing_stops_at_once_with_the_code(tmp_path, monkeypatch, capsys):
    from autotune import pipeline

    real = pipeline.write_final_report

    def report_then_two_signals(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "write_final_report", report_then_two_signals)
    out = tmp_path / "run"
    assert train(*FAST, "--output-dir", str(out)) == 143
    assert "Traceback" not in capsys.readouterr().err


def test_a_signal_before_the_run_starts_is_one_line_and_its_code(monkeypatch, capsys):
    from autotune import request

    def parse(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal stops the command before this")

    monkeypatch.setattr(request, "parse_request", parse)
    assert train(*FAST) == 143
    err = capsys.readouterr().err
    assert err.strip() == "SIGTERM: stopped"


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_a_real_process_signalled_while_it_starts_exits_with_the_code(tmp_path, sig, code):
    """A real `train.py`, signalled while it imports torch and reads the data: never killed by
    the signal (a negative return code), never a traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *FAST, "--output-dir", str(tmp_path / "run")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, (out, err)
    assert "Traceback" not in err


LATE_SIGNAL = r"""
import os, signal, sys, time
from autotune.cli import run_main

class SignalInTeardown:
    # Freed while Python tears the modules down, after it has put the default handlers back.
    def __del__(self):
        os.kill(os.getpid(), signal.{sig})
        time.sleep(0.2)

keep = SignalInTeardown()
run_main(lambda argv: {code})
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_in_pythons_own_teardown_leaves_the_exit_code_decided(sig):
    """A chaos run found it: a signal after the command ended, while Python freed its modules
    (its default handlers back by then), killed the process (-2, -1) instead of its exit code."""
    import subprocess
    import sys

    for code in (0, 2):
        done = subprocess.run([sys.executable, "-c", LATE_SIGNAL.replace("{sig}", sig).replace("{code}", str(code))],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == code, (sig, done.returncode, done.stderr)
        assert "Traceback" not in done.stderr
