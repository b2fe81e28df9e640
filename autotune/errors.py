"""The one project exception type.

Every error a user can cause is raised as `AutotuneError`; the command lines
catch it, print its message on one line and exit with code 2.
"""


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
