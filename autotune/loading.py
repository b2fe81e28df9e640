"""Loading a pretrained checkpoint: from where (a folder, the hub cache, the hub) and strictly.

- `strict_from_pretrained` refuses a checkpoint whose weights do not all fit the model:
  transformers would fill the gaps with random values, print a table and carry on.
- `hub_offline` and `hub_unreachable` decide, within seconds, whether a hub id that is not
  on disk can be downloaded; the hub client itself retries for about half a minute per file.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from autotune.errors import AutotuneError


# --------------------------------------------------------------------------- strict loading


class BenignKey(NamedTuple):
    """A weight name `from_pretrained` may report without the loaded model being wrong."""

    kind: str  # "missing" (the model has it, the checkpoint not) or "unexpected" (the other way round)
    pattern: str  # searched (re.search) in the weight name
    applies: Callable[[Any], bool]  # given the model's config
    why: str


#: The one list of weight-name differences that do not make a loaded model wrong.
#: `strict_from_pretrained` refuses every other missing, unexpected or wrongly
#: shaped weight, because transformers fills those with random values and goes on.
BENIGN_WEIGHT_KEYS: tuple[BenignKey, ...] = (
    BenignKey("unexpected", r"(^|\.)rotary_emb\.(original_)?inv_freq$", lambda config: True,
              "RoPE frequencies are a buffer computed from the config at build time; older transformers "
              "versions saved them in checkpoints, newer ones neither save nor load them"),
    BenignKey("unexpected", r"(^|\.)position_ids$", lambda config: True,
              "an `arange` buffer that transformers now builds itself; older versions saved it"),
    BenignKey("missing", r"^lm_head\.weight$", lambda config: bool(getattr(config, "tie_word_embeddings", False)),
              "with `tie_word_embeddings` (Llasa-1B) the output head is the input embedding matrix, "
              "so a checkpoint stores it once, as `model.embed_tokens.weight`"),
)


def _benign(kind: str, name: str, config: Any) -> bool:
    return any(b.kind == kind and b.applies(config) and re.search(b.pattern, name) for b in BENIGN_WEIGHT_KEYS)


def describe_weight_problems(missing: set[str] | list[str], unexpected: set[str] | list[str],
                             mismatched: list[tuple[str, Any, Any]] = ()) -> str:
    """'2 weights missing (e.g. `a`, `b`); 1 unexpected (`c`)' for one-line errors; '' when all match."""

    def examples(names: list[str]) -> str:
        shown = ", ".join(f"`{n}`" for n in names[:2])
        return f"e.g. {shown}" if len(names) > 2 else shown

    parts = []
    if missing:
        parts.append(f"{len(missing)} weight{'s' if len(missing) != 1 else ''} missing ({examples(sorted(missing))})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({examples(sorted(unexpected))})")
    if mismatched:
        rows = sorted(mismatched, key=lambda row: row[0])
        shown = ", ".join(f"`{n}` {list(ckpt)} in the checkpoint vs {list(model)} in the model" for n, ckpt, model in rows[:2])
        parts.append(f"{len(rows)} with the wrong shape ({'e.g. ' if len(rows) > 2 else ''}{shown})")
    return "; ".join(parts)


class _DropLoadReport(logging.Filter):
    """transformers logs a table of unmatched weights; `strict_from_pretrained` raises one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    log = logging.getLogger("transformers.modeling_utils")
    drop = _DropLoadReport()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def strict_from_pretrained(model_class: Any, source: str, *, label: str, fix: str, **kwargs: Any) -> Any:
    """`model_class.from_pretrained(source, **kwargs)`, refusing a checkpoint whose weights do not all fit.

    transformers initialises missing and wrongly shaped weights at random, prints a
    table and carries on, so a renamed or truncated checkpoint would train on noise.
    Here any difference outside `BENIGN_WEIGHT_KEYS` is one `AutotuneError` that
    names `label` (the checkpoint as the user gave it), how many weights differ with
    examples, and `fix`. Loading errors themselves propagate unchanged.
    """
    with _quiet_load_report():
        # Mismatched shapes are reported, not raised, so that they join the one error below.
        model, info = model_class.from_pretrained(source, output_loading_info=True, ignore_mismatched_sizes=True,
                                                  **kwargs)
    config = model.config
    missing = {k for k in info.get("missing_keys", ()) if not _benign("missing", k, config)}
    unexpected = {k for k in info.get("unexpected_keys", ()) if not _benign("unexpected", k, config)}
    mismatched = list(info.get("mismatched_keys", ()))
    problems = describe_weight_problems(missing, unexpected, mismatched)
    if problems:
        raise AutotuneError(f"the checkpoint `{label}` does not fit {type(model).__name__} ({problems}), so those "
                            f"weights would be random: {fix}")
    return model


# --------------------------------------------------------------------------- the hub


#: How long the hub may take to answer before it counts as unreachable. huggingface_hub
#: itself retries a refused connection with back-off for about half a minute per file.
HUB_PROBE_TIMEOUT_S = 3.0


def hub_unreachable(endpoint: str) -> str | None:
    """Why `endpoint` cannot be reached, or None when it answers (any HTTP status counts).

    The request runs in a daemon thread that is waited for at most
    `HUB_PROBE_TIMEOUT_S`, because name resolution has no timeout of its own.
    """
    import threading

    import httpx

    outcome: list[str | None] = []

    def probe() -> None:
        try:
            httpx.head(endpoint, timeout=HUB_PROBE_TIMEOUT_S, follow_redirects=False)
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - any failure means: not reachable now
            outcome.append(_first_line(exc) or type(exc).__name__)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S)
    return outcome[0] if outcome else f"no answer within {HUB_PROBE_TIMEOUT_S:g} s"



def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - transformers depends on it
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))



def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""
