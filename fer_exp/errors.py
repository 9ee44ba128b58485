"""The wording of what fer-exp prints: what an exception says, in one line (the clear errors fer-exp
prints instead of tracebacks), what a file that does not load is, and counts with their nouns."""

from __future__ import annotations

import zipfile
from pathlib import Path

# why a file that torch.load refuses is not a PyTorch file, by its torch_file_kind
NOT_A_TORCH_FILE = {"other": "a file of another kind: a text or HTML page, an image, a download that failed?",
                    "cut zip": "damaged or cut short: written only in part, by a full disk or a copy stopped half-way"}


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of ``exc``'s message (MLflow's ``message`` where it has one), at most ``limit``
    characters; the exception's type name where the message is empty."""
    text = str(getattr(exc, "message", None) or exc).strip()
    line = (text.splitlines() or [type(exc).__name__])[0]
    return line[:limit] if limit else line


def counted(n: int, noun: str) -> str:
    """'1 epoch', '3 epochs': a count and its noun (plural by -s)."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def torch_file_kind(path: str | Path) -> str:
    """What a file holds, by its first bytes: "zip" (what torch.save writes), "cut zip" (the start of one,
    written only in part), "pickle" (an older torch.save: its PROTO opcode first), or "other" (a text file,
    an image: what the unpickler also chokes on)."""
    with open(path, "rb") as handle:
        if zipfile.is_zipfile(handle):
            return "zip"
        handle.seek(0)
        head = handle.read(4)
    return "cut zip" if head.startswith(b"PK\x03\x04") else "pickle" if head[:1] == b"\x80" else "other"
