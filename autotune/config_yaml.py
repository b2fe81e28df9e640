"""A user's YAML, read so that it can never hang, blow up or run anything: `--config FILE`
(through the one bounded reader, `autotune.files`) and each `--set key=value`.

`yaml.safe_load` only (no tags that construct objects), exponent floats as numbers (`5e-5`),
and a tree that may not hold a recursive alias, millions of values from aliases, or text that
is not valid Unicode. The schema (`autotune.config`) then judges what the values mean.
No torch here: `probe.py` reads its `--config` through this module.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from autotune.errors import AutotuneError
from autotune.files import CONFIG_LIMIT_BYTES, read_user_text

# A dotted key: names of letters, digits and underscores (`training.learning_rate`).
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_set(item: str) -> tuple[str, Any]:
    """`lora.r=16` -> ("lora.r", 16). The value parses as a YAML scalar or flow list."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise AutotuneError(f"`--set {short(item)}` must look like `section.key=value`, for example `--set lora.r=16`")
    if not _KEY.match(key):
        raise AutotuneError(f"`--set {short(item)}`: `{short(key)}` is not a key; keys are dotted names such as "
                            "`lora.r` or `training.learning_rate`")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except _YAML_ERRORS as exc:
        raise AutotuneError(f"`--set {short(item)}`: the value is not valid YAML ({_yaml_problem(exc)})") from None
    # YAML 1.1 reads `5e-5` as a string; the guide writes rates that way.
    try:
        value = floatify(value)
    except BadTree as exc:
        raise AutotuneError(f"`--set {short(item)}`: the value {exc}") from None
    return key, value


# `safe_load` raises more than `YAMLError`: a bad `!!timestamp`, `!!int x` or a date such as
# 2024-13-01 raise ValueError/AttributeError/KeyError, a 5,000-digit integer ValueError, and
# thousands of nested `[` RecursionError.
_YAML_ERRORS = (yaml.YAMLError, ValueError, TypeError, KeyError, AttributeError, RecursionError, OverflowError)


def _yaml_problem(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, yaml.YAMLError):
        return first_line(exc)
    return f"a value YAML cannot construct ({type(exc).__name__}: {first_line(exc)[:120]})"


def load_yaml_file(path: str | Path) -> dict[str, Any]:
    """Read a user config with `yaml.safe_load` (never executes tags), through the bounded reader:
    a FIFO, a device or a file of many megabytes is one line at once, never a hang."""
    path = Path(path)
    text = read_user_text(path, what="config", limit_bytes=CONFIG_LIMIT_BYTES)
    try:
        data = yaml.safe_load(text)
    except _YAML_ERRORS as exc:
        raise AutotuneError(f"`{path}` is not valid YAML: {_yaml_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AutotuneError(f"`{path}` must hold a mapping of sections (`training:`, `lora:` ...), got a {type(data).__name__}")
    try:
        return floatify(data)
    except BadTree as exc:
        raise AutotuneError(f"`{path}` {exc}") from None


def short(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return " ".join(" ".join(text[:3]).split()) if text else type(exc).__name__


# YAML 1.1 wants a dot in a float (`5.0e-5`); people write `5e-5`.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _maybe_float(text: str) -> Any:
    if not _EXPONENT_FLOAT.match(text.strip()):
        return text
    number = float(text)
    return number if math.isfinite(number) else text


MAX_DEPTH = 50
MAX_VALUES = 100_000


class BadTree(ValueError):
    """A YAML value no config can hold; the caller names where it came from."""


def floatify(tree: Any, depth: int = 0, count: list[int] | None = None) -> Any:
    """Exponent floats (`5e-5`) to numbers, walking a fresh tree. Refuses what would
    hang or crash later: a recursive alias (`&a {x: *a}`), aliases that expand to
    millions of values ("billion laughs"), and unpaired surrogates (`"\\ud800"`),
    which no UTF-8 output can print."""
    count = [0] if count is None else count
    count[0] += 1
    if count[0] > MAX_VALUES:
        raise BadTree(f"holds more than {MAX_VALUES:,} values (aliases such as `*a` repeat their anchor)")
    if depth > MAX_DEPTH:
        raise BadTree(f"is nested more than {MAX_DEPTH} levels deep (or an alias `*a` sits inside its own anchor `&a`)")
    if isinstance(tree, dict):
        return {_valid_text(k): floatify(v, depth + 1, count) for k, v in tree.items()}
    if isinstance(tree, list):
        return [floatify(v, depth + 1, count) for v in tree]
    if isinstance(tree, str):
        return _maybe_float(_valid_text(tree))
    return tree


def _valid_text(value: Any) -> Any:
    # U+DC80..U+DCFF are allowed: they are how Python spells the bytes of a path that is
    # not UTF-8 (`--val`, `--model` arrive here through `cli_sets`), and print back as those bytes.
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as exc:
            raise BadTree(f"holds text that is not valid Unicode (unpaired surrogate {ascii(value[exc.start])} "
                          f"in {ascii(short(value))})") from None
    return value
