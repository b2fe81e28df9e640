"""What a finished fit writes into the run folder: the adapter (whole, or not at all) and
the loss plot for people who do not open TensorBoard."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from autotune import checkpoints as K
from autotune.console import warn
from autotune.errors import AutotuneError
from autotune.training.callbacks import nonfinite_parameters


def plot_losses(log_history: list[dict[str, Any]], path: Path) -> bool:
    """loss.png for people who do not open TensorBoard. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from autotune import rundir

    try:
        with rundir.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return True


def save_adapter(model, output_dir: Path, console=None) -> bool:
    """adapter_model.safetensors + adapter_config.json into `output_dir`, written beside
    and moved into place whole; False (with a warning) when the adapter holds NaN or inf.
    A full disk is one line, and the previous files are left as they were."""
    from autotune import rundir

    bad = nonfinite_parameters(model)
    if bad:
        warn(console, f"! not saving the final adapter: {len(bad)} tensors hold NaN or inf; the checkpoints are kept")
        return False
    staging = output_dir / ".tmp-adapter"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(str(staging))
        for item in sorted(staging.iterdir()):
            os.replace(item, output_dir / item.name)
    except Exception as exc:
        free = K.free_bytes(output_dir)
        if not (K.is_disk_full(exc, free) or rundir.is_storage_error(exc)):
            raise
        previous = K.newest_checkpoint(output_dir)
        raise AutotuneError(K.disk_full_message("the final adapter", output_dir, free, previous)) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


