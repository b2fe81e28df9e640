"""Several processes (`accelerate launch`, torchrun): joining the group early, so the steps
before training can agree, and agreeing on one plan. With one process these are no-ops."""

from __future__ import annotations

import os
from typing import Any, Callable

from autotune.errors import AutotuneError


def world() -> tuple[int, int, int]:
    """(processes, rank, local rank) as the launcher set them."""
    return (int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
            int(os.environ.get("LOCAL_RANK", "0")))


def start(processes: int) -> None:
    """Join the process group now; the Trainer's Accelerator later reuses the same state."""
    if processes > 1:
        from accelerate import PartialState

        PartialState()


def on_main_then_share(is_main: bool, processes: int, step: Callable[[], Any]) -> Any:
    """Run a step with side effects on the main process only; every process then gets its
    result, or raises the same one-line error, instead of one hanging."""
    error = result = None
    if is_main:
        try:
            result = step()
        except AutotuneError as exc:
            error = exc.one_line()
    if processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [error, result]
        broadcast_object_list(box, from_process=0)
        error, result = box
    if error:
        raise AutotuneError(error)
    return result


def agree_on_plan(processes: int, my_gpu_bytes: int, plan_record: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Every process trains with one plan: the one the smallest GPU allows. Returns that
    plan's record and the rank that measured it."""
    if processes <= 1:
        return plan_record, 0
    from accelerate.utils import gather_object

    everyone = gather_object([(my_gpu_bytes or 0, int(os.environ.get("RANK", "0")), plan_record)])
    _, rank, chosen = min(everyone, key=lambda item: (item[0], item[1]))
    return chosen, rank
