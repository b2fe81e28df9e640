"""What `--resume` may do to a run: the settings it may not change without `--allow-changes`,
and when there is nothing left to resume. Pure decisions on the run folder's records; the
driver (`pipeline.py`) acts on them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autotune.config import Config, validate
from autotune.config_yaml import load_yaml_file
from autotune.errors import AutotuneError
from autotune.files import read_user_json
from autotune.resume_rules import changed_keys
from autotune.rundir import RUN_CONFIG, RUN_REQUEST, path_text, write_json


def resume_changes(output_dir: Path, config: Config, data: str, *, allow_changes: bool,
                   pinned: set[str] = frozenset()) -> list[dict[str, Any]]:
    """The settings this `--resume` changes against what the run in `output_dir` was started
    with (the data, the learning rate, the steps...; the tuner's own plan keys aside, unless the
    user sets one now). Raises the one-line refusal unless `allow_changes`; returns them (empty
    when nothing changed) to record."""
    from autotune.tuning.plan import PLAN_KEYS

    path = output_dir / RUN_CONFIG
    if not path.is_file():
        return []   # nothing trained yet: this "resume" starts the run
    try:
        before = validate(load_yaml_file(path)).to_dict()
    except AutotuneError:
        return []   # unreadable: the checkpoint checks say what is wrong with the run
    changes = changed_keys(before, config.to_dict(), set(PLAN_KEYS) - set(pinned))
    recorded = recorded_request(output_dir)
    data_now = path_text(Path(data).resolve())
    if recorded.get("data") and recorded["data"] != data_now:
        changes.insert(0, ("--data", recorded["data"], data_now))
    if changes and not allow_changes:
        raise AutotuneError(f"`--resume` with other settings than the run in `{path_text(output_dir)}` was "
                            f"started with: {describe_changes(changes)}; resume with the same flags, add "
                            "`--allow-changes` to continue with the new ones (recorded in run_summary.json), or "
                            "start a new `--output-dir`")
    return [{"key": k, "before": a, "after": b} for k, a, b in changes]


def describe_changes(changes: list[tuple[str, Any, Any]] | list[dict[str, Any]]) -> str:
    rows = [(c["key"], c["before"], c["after"]) if isinstance(c, dict) else c for c in changes]
    shown = ", ".join(f"`{k}` {json.dumps(a, ensure_ascii=False)} -> {json.dumps(b, ensure_ascii=False)}"
                      for k, a, b in rows[:6])
    return shown + (f" and {len(rows) - 6} more" if len(rows) > 6 else "")


def extends_the_run(changes: list[dict[str, Any]]) -> bool:
    """Changes accepted by `--allow-changes` that give a finished run more to train."""
    def more(change: dict[str, Any]) -> bool:
        before, after = change.get("before"), change.get("after")
        if change.get("key") == "training.max_steps":
            return isinstance(after, int) and (after < 0 or not isinstance(before, int) or 0 <= before < after)
        if change.get("key") == "training.num_train_epochs":
            return isinstance(after, (int, float)) and (not isinstance(before, (int, float)) or after > before)
        return False

    return any(more(c) for c in changes)


def nothing_to_resume(output_dir: Path, summary: dict[str, Any]) -> str:
    return (f"`{path_text(output_dir)}` holds a run that finished (step {summary.get('steps')} of "
            f"{summary.get('max_steps')}): nothing to resume, and nothing was changed; its adapter is there. To train "
            "longer, add a larger `--set training.max_steps=...` with `--allow-changes`.")


def recorded_request(output_dir: Path) -> dict[str, Any]:
    """What the command line gave besides the config when the run started (its data path)."""
    if not (output_dir / RUN_REQUEST).is_file():
        return {}
    try:
        value = read_user_json(output_dir / RUN_REQUEST, what="run request")
    except AutotuneError:
        return {}
    return value if isinstance(value, dict) else {}


def record_request(output_dir: Path, data: str) -> None:
    write_json(output_dir / RUN_REQUEST, {"data": path_text(Path(data).resolve())})
