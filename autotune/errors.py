"""The one project exception type.

Every error a user can cause is raised as `AutotuneError`; the command lines
catch it, print its message on one line (a list of problems then follows, one per
line) and exit with code 2.
"""


MAX_DETAILS_SHOWN = 20


class AutotuneError(Exception):
    """A problem the user can fix. The message says what is wrong and how to fix it."""

    exit_code = 2

    def __init__(self, message: str, *, details: list[str] | None = None):
        super().__init__(message)
        self.details = list(details or [])

    def one_line(self) -> str:
        """The message as a single line (details are joined with `; `)."""
        text = " ".join(str(self).split())
        if self.details:
            text += ": " + "; ".join(" ".join(d.split()) for d in self.details)
        return text

    def lines(self, limit: int = MAX_DETAILS_SHOWN) -> list[str]:
        """The message, then each detail on its own line (at most `limit`, then a count)."""
        out = [" ".join(str(self).split()) + (":" if self.details else "")]
        out += ["  - " + " ".join(d.split()) for d in self.details[:limit]]
        if len(self.details) > limit:
            out.append(f"  ... and {len(self.details) - limit} more")
        return out
