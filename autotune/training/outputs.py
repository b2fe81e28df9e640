"""What a finished fit writes into the run folder: the adapter, each file written whole (the
curves are report.html's, as inline SVG, and TensorBoard's)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from autotune import checkpoints as K
from autotune.console import warn
from autotune.errors import AutotuneError
from autotune.training.callbacks import nonfinite_parameters


def save_adapter(model, output_dir: Path, console=None) -> bool:
    """adapter_model.safetensors + adapter_config.json into `output_dir`, each written beside
    and moved into place whole (a kill between the two moves can leave the new weights beside
    the old config: the run's checkpoints are whole, and README says so). False (with a warning)
    when the adapter holds NaN or inf. A full disk is one line, and the previous files are left
    as they were."""
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


