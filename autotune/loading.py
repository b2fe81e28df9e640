"""Loading a pretrained checkpoint: from where (a folder, the hub cache, the hub) and strictly.

- `strict_from_pretrained` refuses a checkpoint whose weights do not all fit the model:
  transformers would fill the gaps with random values, print a table and carry on.
- `settle_hub` decides once per process, within seconds, whether the hub answers, and when it
  does not, switches the hub client to its own offline mode: the client would otherwise retry
  every lookup of an uncached file for about half a minute, printing a line per attempt.
- `quiet_hub_retries` keeps those retry lines off the console on every path (installed when
  this module is imported, which any code that loads a checkpoint does first).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
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
    if not Path(str(source)).expanduser().exists():
        settle_hub()    # a hub id: decide once whether the hub answers, before transformers asks it
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

#: Set beside `HF_HUB_OFFLINE` when `settle_hub` switched the hub client off, so that the
#: processes this one starts (sweep trials) give the real reason, not "HF_HUB_OFFLINE is set".
UNREACHABLE_ENV = "LLASA_AUTOTUNE_HUB_UNREACHABLE"


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
            outcome.append(clip_words(str(exc), 120) or type(exc).__name__)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S)
    return outcome[0] if outcome else f"no answer within {HUB_PROBE_TIMEOUT_S:g} s"


_settled: list[str | None] = []      # the process's one decision, once made
_settle_lock = threading.Lock()


def settle_hub() -> str | None:
    """Why this process does not use the hub (None: it answers), decided once per process.

    Already offline (`HF_HUB_OFFLINE`): that is the reason, nothing is asked. Otherwise the
    endpoint gets one request of at most `HUB_PROBE_TIMEOUT_S`; when it does not answer, the
    hub client goes offline through its own switches (`huggingface_hub.constants.HF_HUB_OFFLINE`,
    which `is_offline_mode()` and so transformers read, and the `HF_HUB_OFFLINE` variable,
    which PEFT reads). Every later lookup in the process, by transformers, PEFT or us, then
    takes the local cache at once instead of retrying a dead connection for half a minute
    per file; a cached checkpoint still loads, an uncached one could not be had anyway.
    """
    quiet_hub_retries()
    with _settle_lock:
        if _settled:
            return _settled[0]
        from huggingface_hub import constants, is_offline_mode

        if is_offline_mode():
            reason = os.environ.get(UNREACHABLE_ENV) or "HF_HUB_OFFLINE is set"
        else:
            unreachable = hub_unreachable(constants.ENDPOINT)
            reason = None if unreachable is None else f"the hub at {constants.ENDPOINT} cannot be reached ({unreachable})"
            if reason is not None:
                constants.HF_HUB_OFFLINE = True
                os.environ["HF_HUB_OFFLINE"] = "1"
                os.environ[UNREACHABLE_ENV] = reason
        _settled.append(reason)
        return reason


def is_cached(repo_id: str, filename: str = "config.json") -> bool:
    """Whether the local hub cache holds `filename` of `repo_id` (a checkpoint has its config.json)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # noqa: BLE001 - not a valid repo id: certainly not cached
        return False


#: What huggingface_hub's back-off loop logs at each attempt: `Retrying in 8s [Retry 5/5].`,
#: `'[Errno 111] Connection refused' thrown while requesting HEAD https://...`, `Rate limited.
#: Waiting ...`. Raw, repeated, and about a lookup whose outcome we report in one line ourselves.
_RETRY_LINE = re.compile(r"^Retrying in |\[Retry \d+/\d+\]|thrown while requesting |^Rate limited\. Waiting ")


class _DropHubRetries(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("huggingface_hub") and _RETRY_LINE.search(str(record.msg)))


_DROP_HUB_RETRIES = _DropHubRetries()


def quiet_hub_retries() -> None:
    """Keep huggingface_hub's retry lines off the console, on every path (idempotent).

    The lines are logged by the library's module loggers and printed by the handler on its
    root logger `huggingface_hub` (and by the root logger's, when an application set one):
    the filter sits on those handlers, which every propagated record passes, and on the
    library's loggers that exist now, for records that do not propagate.
    """
    # Importing the library's logging module gives its root logger the handler that prints.
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.get_logger()

    loggers = [logging.getLogger("huggingface_hub"), logging.getLogger()]
    loggers += [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)
                if name.startswith("huggingface_hub.")]
    for logger in loggers:
        for target in [logger, *logger.handlers]:
            if _DROP_HUB_RETRIES not in target.filters:
                target.addFilter(_DROP_HUB_RETRIES)


def clip_words(text: str, limit: int = 200) -> str:
    """`text` on one line, at most about `limit` characters, cut between words (never inside a
    URL or a path) and marked with `…` where cut."""
    words = str(text).split()
    kept: list[str] = []
    for word in words:
        if kept and len(" ".join([*kept, word])) > limit:
            return " ".join(kept) + " …"
        if not kept and len(word) > limit:
            return "…"
        kept.append(word)
    return " ".join(kept)


# Any process that loads a checkpoint imports this module first: from here on no retry line
# of the hub client reaches the console, whichever library makes the lookup.
quiet_hub_retries()
