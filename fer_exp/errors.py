"""What an exception says, in one line, for the clear errors fer-exp prints instead of tracebacks."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of ``exc``'s message (MLflow's ``message`` where it has one), at most ``limit``
    characters; the exception's type name where the message is empty."""
    text = str(getattr(exc, "message", None) or exc).strip()
    line = (text.splitlines() or [type(exc).__name__])[0]
    return line[:limit] if limit else line
