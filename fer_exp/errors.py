"""The wording of what fer-exp prints: what an exception says, in one line (the clear errors fer-exp
prints instead of tracebacks), and counts with their nouns."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of ``exc``'s message (MLflow's ``message`` where it has one), at most ``limit``
    characters; the exception's type name where the message is empty."""
    text = str(getattr(exc, "message", None) or exc).strip()
    line = (text.splitlines() or [type(exc).__name__])[0]
    return line[:limit] if limit else line


def counted(n: int, noun: str) -> str:
    """'1 epoch', '3 epochs': a count and its noun (plural by -s)."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
