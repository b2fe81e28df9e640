"""`--plan FILE`: a plan an earlier dry run recorded (`read_plan_file`), checked against
this run (`check_plan_fits`).

What a plan is (`Plan`, its keys, `memory_shape`) lives in `autotune.plan`, below the training
that walks the ladder's rungs too; the names stay importable from here for the dry run's callers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autotune.config import Config, load_yaml_file, validate
from autotune.dotted import get_dotted
from autotune.errors import AutotuneError
from autotune.plan import PLAN_KEYS, Plan, measured_with, memory_shape

__all__ = ["PLAN_KEYS", "Plan", "check_plan_fits", "measured_with", "memory_shape", "read_plan_file"]


# -------------------------------------------------------------- --plan FILE ---

def read_plan_file(path: str | Path, processes: int) -> tuple[Plan, dict[str, Any]]:
    """`--plan FILE`: the plan in a dry run's autotune.json (a sweep's shape.json, a run's
    run_summary.json), or the config a run trained with (its run_config.yaml), and what it
    was measured with. Read and checked before anything else happens, so a bad file is found
    at once and `--overwrite` cannot delete it before it is read."""
    path = Path(path)
    fix = "pass the autotune.json a dry run (`--auto` or `--dry-run`) wrote"
    if path.suffix in (".yaml", ".yml"):
        try:
            config = validate(load_yaml_file(path))
        except AutotuneError as exc:
            raise AutotuneError(f"`--plan {path}` holds no valid run config ({exc.one_line()}): {fix}") from None
        return Plan.from_config(config, processes), measured_with(config)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AutotuneError(f"cannot read `--plan {path}` ({exc.strerror or exc}): {fix}") from None
    except ValueError:
        raise AutotuneError(f"`--plan {path}` is not JSON: {fix}") from None
    try:
        plan = Plan.from_record(record.get("plan") if isinstance(record, dict) else None)
    except Exception:  # noqa: BLE001 - any malformed plan is the same user error
        raise AutotuneError(f"`--plan {path}` holds no valid dry-run plan: {fix}") from None
    recorded = record.get("measured_with")
    return plan, recorded if isinstance(recorded, dict) else {}


def check_plan_fits(plan: Plan, measured: dict[str, Any], *, where: str, processes: int, config: Config,
                    pinned: set[str], runnable_precisions: list[str], optimizer_runs: bool) -> None:
    """A plan from `--plan` against this run: its processes, this machine's precisions and
    optimizer, what it was measured with, and the keys the user pinned. Its values themselves
    stay unpinned, so an out-of-memory error mid-training can still take the next rung."""
    if plan.processes != processes:
        raise AutotuneError(f"{where} was measured for {plan.processes} process(es) and this run has "
                            f"{processes}: run the dry run again with `--auto`")
    if plan.precision not in runnable_precisions or not optimizer_runs:
        what = (f"{plan.precision}, and this machine runs {', '.join(runnable_precisions)}"
                if plan.precision not in runnable_precisions else f"{plan['training.optim']}, which cannot run here")
        raise AutotuneError(f"{where} was measured on other hardware ({what}): run the dry run again with `--auto`")
    now = measured_with(config)
    if not plan["training.lean_loss"]:
        now.pop("training.lean_loss_chunk_size")   # no chunks without the lean loss
    for key, value in sorted(measured.items()):
        if key in now and now[key] != value:
            raise AutotuneError(f"{where} was measured with `{key}` {json.dumps(value)} and this run has "
                                f"{json.dumps(now[key])}: `--set {key}={json.dumps(value)}`, "
                                "or run the dry run again with `--auto`")
    ours, theirs = config.to_dict(), plan.apply(config).to_dict()
    for key in sorted(pinned):
        a, b = get_dotted(ours, key), get_dotted(theirs, key)
        if a != b:
            raise AutotuneError(f"`{key}` is set to {a!r} but {where} has {b!r}: drop the setting, "
                                "or run the dry run again with it")
