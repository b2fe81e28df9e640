"""What `--resume` may change: a resumed run (or sweep) compares the config it was started with
against the one it is given now; what it learns may not change without `--allow-changes`."""

from __future__ import annotations

from typing import Any

from autotune.dotted import dotted_keys, get_dotted

# Keys a resumed run may change freely: what it is shown and told, not what it learns.
# The tuner's own keys (batch split, precision, checkpointing...) are left to the plan.
HARMLESS_ON_RESUME = ("samples.", "scores.", "autotune.", "training.logging_steps", "training.logging_dir",
                      "training.report_to", "training.dataloader_num_workers", "training.dataloader_pin_memory",
                      "training.per_device_eval_batch_size", "data.max_errors_shown")


def changed_keys(before: dict[str, Any], after: dict[str, Any], ignore: set[str] | frozenset[str] = frozenset()
                 ) -> list[tuple[str, Any, Any]]:
    """(key, before, after) for each dotted key whose value differs, sorted; keys starting
    with a `HARMLESS_ON_RESUME` prefix and those in `ignore` are left out."""
    keys = dotted_keys(before) | dotted_keys(after)
    out = []
    for key in sorted(keys):
        if key in ignore or key.startswith(HARMLESS_ON_RESUME):
            continue
        a, b = get_dotted(before, key), get_dotted(after, key)
        if a != b:
            out.append((key, a, b))
    return out
