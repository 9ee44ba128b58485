"""On-disk cache of decoded sources, keyed by the source's paths, sizes and mtimes."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch

from fer_exp.data.dataset import DecodeReport, Split

CACHE_VERSION = 2  # 2: test faces in train/ or val/ and unprefixed files in a mixed test/ are bad samples


def cache_dir() -> Path:
    """``$FER_EXP_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/fer-exp`` (``~/.cache/fer-exp``)."""
    if os.environ.get("FER_EXP_CACHE_DIR"):
        return Path(os.environ["FER_EXP_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fer-exp"


def fingerprint(source: Path, *extra: str) -> str:
    """A key that changes when any file under ``source`` is added, removed, resized or touched, or when
    Pillow (which decodes the images) changes version."""
    import PIL

    digest = hashlib.sha256(f"v{CACHE_VERSION}|{source.resolve()}|{'|'.join(extra)}|pillow {PIL.__version__}".encode())
    if source.is_file():
        stat = source.stat()
        digest.update(f"{stat.st_size}|{stat.st_mtime_ns}".encode())
        return digest.hexdigest()[:24]
    stack = [source]
    entries = []
    seen = {(source.stat().st_dev, source.stat().st_ino)}
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=True):
                    entries.append(f"{os.path.relpath(entry.path, source)}/")  # (a new folder, or a link to one)
                    where = entry.stat(follow_symlinks=True)
                    if (where.st_dev, where.st_ino) not in seen:  # a linked folder once; a link back up is no loop
                        seen.add((where.st_dev, where.st_ino))
                        stack.append(Path(entry.path))
                else:
                    try:
                        stat = entry.stat()
                    except OSError:  # a broken link: key on the link itself; the reader reports it
                        stat = entry.stat(follow_symlinks=False)
                    entries.append(f"{os.path.relpath(entry.path, source)}|{stat.st_size}|{stat.st_mtime_ns}")
    for line in sorted(entries):
        digest.update(line.encode())
        digest.update(b"\n")
    return digest.hexdigest()[:24]


def _path(key: str, kind: str = "decoded") -> Path:
    return cache_dir() / f"{kind}-{key}.pt"


DIGEST_SIZE = 32  # a cache file: the BLAKE2b digest of what follows, then torch.save's bytes


def load_blob(key: str, kind: str) -> dict | None:
    """A saved blob of plain tensors/lists, or None when absent, unreadable or not as it was written
    (truncated, a flipped bit: its digest tells), so that it is computed again rather than trusted."""
    path = _path(key, kind)
    try:
        content = path.read_bytes()
    except OSError:
        return None
    digest, payload = content[:DIGEST_SIZE], content[DIGEST_SIZE:]
    if digest != hashlib.blake2b(payload, digest_size=DIGEST_SIZE).digest():
        return None
    try:
        return torch.load(io.BytesIO(payload), weights_only=True)
    except Exception:  # a foreign file: compute again rather than fail
        return None


def save_blob(key: str, kind: str, blob: dict) -> None:
    """Write atomically; a read-only or full cache location costs speed, never correctness."""
    path = _path(key, kind)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    payload = buffer.getvalue()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            handle.write(hashlib.blake2b(payload, digest_size=DIGEST_SIZE).digest())
            handle.write(payload)
        os.replace(tmp, path)
    except (OSError, RuntimeError):
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def load(key: str) -> tuple[dict[str, Split], DecodeReport] | None:
    blob = load_blob(key, "decoded")
    if blob is None:
        return None
    try:
        groups = {name: Split(g["images"], g["labels"], g["sources"]) for name, g in blob["groups"].items()}
        report = DecodeReport(**blob["report"])
        report.skipped = [tuple(s) for s in report.skipped]
        return groups, report
    except Exception:  # a foreign layout: decode again rather than fail
        return None


def save(key: str, groups: dict[str, Split], report: DecodeReport) -> None:
    save_blob(key, "decoded", {
        "groups": {n: {"images": s.images, "labels": s.labels, "sources": s.sources} for n, s in groups.items()},
        "report": {
            "converted_to_gray": report.converted_to_gray,
            "resized": report.resized,
            "skipped": [list(s) for s in report.skipped],
            "ignored": report.ignored,
        },
    })
