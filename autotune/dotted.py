"""Nested mappings addressed by dotted keys (`training.bf16`): how `--set` and the
config layers name a setting. Plain dicts in, plain dicts out."""

from __future__ import annotations

import copy
from typing import Any


def get_dotted(tree: dict[str, Any], key: str) -> Any:
    """`tree["a"]["b"]` for `a.b`; None where a part is missing."""
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def dotted_keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    """Leaf keys of a nested mapping, dotted (`training.bf16`)."""
    keys: set[str] = set()
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not name.endswith("lr_scheduler_kwargs"):
            keys |= dotted_keys(value, name + ".")
        else:
            keys.add(name)
    return keys
