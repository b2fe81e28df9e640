"""Printing to the user: a line, or a warning in yellow; stderr when there is no rich console
(a callback used outside a run). Text is printed as it is, never read as rich markup."""

from __future__ import annotations

import sys


def warn(console, message: str) -> None:
    if console is not None:
        console.print(message, style="yellow", markup=False, highlight=False)
    else:
        print(message, file=sys.stderr)


def say(console, message: str) -> None:
    if console is not None:
        console.print(message, markup=False, highlight=False)
    else:
        print(message, file=sys.stderr)
