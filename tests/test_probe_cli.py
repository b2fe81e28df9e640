"""`probe.py` as a user runs it: a subprocess, JSON out, one-line errors, no torch."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "probe.py"
RTX4090 = ["--gpu", "NVIDIA GeForce RTX 4090", "--vram", "24", "--cc", "8.9"]


def no_gpu_env() -> dict[str, str]:
    # An empty CUDA_VISIBLE_DEVICES hides every GPU, so the answer is the same on a GPU machine.
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def run_probe(*args: str, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *python_flags, str(PROBE), *args], cwd=REPO, env=no_gpu_env(),
                          capture_output=True, text=True, timeout=60)


def probe_json(*args: str) -> dict:
    proc = run_probe("--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_json_without_gpu_is_the_cpu_profile():
    data = probe_json()
    assert data["gpus"] == []
    assert data["profile"]["name"] == "cpu"
    assert data["config"]["training"]["bf16"] is False
    assert data["config"]["training"]["fp16"] is False
    assert isinstance(data["reasons"], list) and data["reasons"]
    assert all(isinstance(r, str) for r in data["reasons"])
    assert data["reasons"][0] == "no GPU visible: profile `cpu` (fp32, small LoRA)"
    assert data["no_gpu_reason"] == "CUDA_VISIBLE_DEVICES is empty, so CUDA sees no GPU"
    assert data["what_if"] is False
    assert data["pinned"] == []


def test_what_if_rtx4090():
    data = probe_json(*RTX4090)
    assert data["what_if"] is True
    assert data["profile"]["name"] == "rtx4090"
    assert data["config"]["training"]["bf16"] is True
    assert data["config"]["training"]["fp16"] is False
    assert data["config"]["training"]["optim"] == "adamw_torch_fused"
    assert data["config"]["lora"]["r"] == 32
    (gpu,) = data["gpus"]
    assert gpu["name"] == "NVIDIA GeForce RTX 4090"
    assert gpu["cc"] == [8, 9]
    assert gpu["total_bytes"] == 24 * 2**30


def test_what_if_guesses_compute_capability_from_the_name():
    data = probe_json("--gpu", "Tesla V100-SXM2-16GB", "--vram", "16", "--count", "2")
    assert data["profile"]["name"] == "v100-16gb"
    assert len(data["gpus"]) == 2
    assert (data["config"]["training"]["bf16"], data["config"]["training"]["fp16"]) == (False, True)


def test_set_and_config_apply_and_are_pinned(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("training:\n  learning_rate: 5e-5\nlora:\n  r: 16\n  lora_dropout: 0.1\n", encoding="utf-8")
    data = probe_json(*RTX4090, "--config", str(user), "--set", "lora.r=4")
    assert data["config"]["lora"]["r"] == 4                    # --set beats --config
    assert data["config"]["lora"]["lora_dropout"] == 0.1
    assert data["config"]["training"]["learning_rate"] == 5e-5
    assert data["config"]["lora"]["lora_alpha"] == 64          # the profile's, not pinned
    assert data["pinned"] == ["lora.lora_dropout", "lora.r", "training.learning_rate"]
    assert "`lora.r` pinned by you" in data["reasons"]


def test_shipped_config_through_probe():
    data = probe_json(*RTX4090, "--config", "config/optimized_training.yaml")
    assert data["config"]["training"]["lr_scheduler_type"] == "cosine_with_restarts"
    # Batch sizes are left to the profile (and later the auto-tuner).
    assert data["config"]["training"]["per_device_train_batch_size"] == 2
    assert "training.per_device_train_batch_size" not in data["pinned"]


def test_human_output_renders():
    proc = run_probe(*RTX4090)
    assert proc.returncode == 0, proc.stderr
    assert "rtx4090" in proc.stdout
    assert "Why" in proc.stdout


def test_help_exits_zero():
    proc = run_probe("--help")
    assert proc.returncode == 0
    assert "--vram" in proc.stdout


BAD_YAML = "training:\n  bf16: [true\n"


@pytest.mark.parametrize("args, message", [
    (["--vram", "abc"], "error: `--vram` must be a positive number of GiB, got `abc`"),
    (["--vram", "-1"], "error: `--vram` must be a positive number of GiB, got `-1`"),
    (["--gpu", "RTX 4090", "--vram", "24", "--cc", "x"],
     "error: `--cc` must look like MAJOR.MINOR (for example 8.6), got `x`"),
    (["--vram", "abc", "--cc", "x"],
     "error: `--vram` must be a positive number of GiB, got `abc`; `--cc` must look like MAJOR.MINOR"),
    (["--cc", "x"], "error: what-if mode needs `--vram GIB` (and optionally `--gpu NAME --cc X.Y`), e.g. `--gpu 'RTX 4090' --vram 24`; `--cc` must look like MAJOR.MINOR"),
    (["--gpu", "Mystery", "--vram", "8"], "error: cannot guess the compute capability of `Mystery`"),
    (["--gpu", "RTX 4090", "--vram", "24", "--count", "0"], "error: `--count` must be at least 1, got `0`"),
    (["--count", "x"], "error: argument --count: invalid int value: 'x'"),
    (["--set", "lora.rnak=8"], "error: invalid config (1 problem):\n  - unknown key `lora.rnak` (did you mean `lora.r`?)"),
    (["--set", "nonsense"], "error: `--set nonsense` must look like `section.key=value`"),
    (["--set", "training.bf16=true", "--set", "training.fp16=true"],
     "error: invalid config (1 problem):\n  - `training`: `training.bf16` and `training.fp16` are both true"),
    (["--config", "missing.yaml"], "error: config file `missing.yaml` does not exist"),
    (["--config", "{bad_yaml}"], "error: `{bad_yaml}` is not valid YAML: "),
    (["--bogus"], "error: unrecognized arguments: --bogus (see `probe.py --help`)"),
])
def test_bad_input_is_one_error_line_exit_2(tmp_path, args, message):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(BAD_YAML, encoding="utf-8")
    args = [a.replace("{bad_yaml}", str(bad_yaml)) for a in args]
    message = message.replace("{bad_yaml}", str(bad_yaml))
    proc = run_probe("--json", *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("error:")
    assert all(line.startswith("  - ") for line in lines[1:]), proc.stderr   # a list: one problem per line
    assert proc.stderr.startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_probe_does_not_import_torch_sys_modules():
    wrapper = (
        "import runpy, sys\n"
        "sys.argv = ['probe.py', '--json']\n"
        "try:\n"
        "    runpy.run_path('probe.py', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft', 'bitsandbytes'))\n"
        "sys.stderr.write('HEAVY=' + ','.join(heavy) + '\\n')\n"
    )
    proc = subprocess.run([sys.executable, "-c", wrapper], cwd=REPO, env=no_gpu_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)
    assert "HEAVY=\n" in proc.stderr, proc.stderr


@pytest.mark.parametrize("args", [[], RTX4090], ids=["probe", "what-if"])
def test_probe_does_not_import_torch_importtime(args):
    proc = run_probe("--json", *args, python_flags=("-X", "importtime"))
    assert proc.returncode == 0, proc.stderr
    modules = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
               if line.startswith("import time:")]
    assert "yaml" in modules  # the check sees real imports
    heavy = [m for m in modules if m.split(".")[0] in ("torch", "transformers", "peft", "bitsandbytes")]
    assert heavy == []


@pytest.mark.slow
def test_probe_wall_time(capsys):
    runs = 7
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = run_probe("--json")
        times.append(time.perf_counter() - start)
        assert proc.returncode == 0, proc.stderr
    median = statistics.median(times)
    with capsys.disabled():
        print(f"\n`python probe.py --json` wall time over {runs} runs: median {median * 1000:.0f} ms "
              f"(min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms)")
    assert median < 3.0, "sanity bound only: the probe must not import torch"
