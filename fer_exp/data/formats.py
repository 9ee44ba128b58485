"""Readers for the two formats users bring: the original fer2013.csv and the Kaggle image folders.

Each reader returns *groups* of samples as they are found in the source (for example the CSV's
``Training``/``PublicTest``/``PrivateTest`` rows); ``fer_exp.data.loader`` turns groups into the
train/val/test splits. Bad samples go through :class:`BadSamples`, which either stops with a
:class:`DataError` naming the file or row, or records them when the user asked to skip.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from fer_exp.classes import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, class_index
from fer_exp.config import CHOICES
from fer_exp.data.dataset import DataError, DecodeReport, Split
from fer_exp.data.images import ImageDecodeError, read_gray, to_model_size
from fer_exp.errors import first_line

CSV_COLUMNS = ("emotion", "pixels", "Usage")
CSV_USAGE_GROUPS = {"Training": "train", "PublicTest": "public", "PrivateTest": "private"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TEST_PREFIXES = {"PublicTest_": "public", "PrivateTest_": "private"}
VAL_FOLDER_NAMES = ("val", "validation")
ON_BAD_CHOICES = CHOICES["on_bad"]


class BadSamples:
    """Applies the user's ``on_bad`` policy: raise at the first bad sample, or skip and record it."""

    def __init__(self, on_bad: str, report: DecodeReport):
        if on_bad not in ON_BAD_CHOICES:
            raise ValueError(f"on_bad must be one of {ON_BAD_CHOICES}, got {on_bad!r}")
        self.on_bad = on_bad
        self.report = report

    def __call__(self, where: str, why: str) -> None:
        if self.on_bad == "error":
            raise DataError(f"{where}: {why}. Fix or remove it, or pass --on-bad skip to skip bad samples.")
        self.report.skipped.append((where, why))


def shown(value, limit: int = 40) -> str:
    """``repr(value)``, cut short: an error message names the bad value without pasting a whole row."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 5]}...{text[-1]} ({len(str(value))} characters)"


def _pixels_to_image(text: str) -> np.ndarray:
    """Parse one CSV ``pixels`` cell; raises ValueError with the reason."""
    values = text.split() if isinstance(text, str) else []
    if len(values) != IMAGE_SIZE * IMAGE_SIZE:
        raise ValueError(f"has {len(values)} pixel values, expected {IMAGE_SIZE * IMAGE_SIZE} (48x48)")
    try:
        array = np.array(values, dtype=np.int32)
    except (ValueError, OverflowError):  # OverflowError: a number too large for int32, e.g. 3000000000
        for value in values:
            try:
                number = int(value)
            except ValueError:
                raise ValueError(f"has a non-numeric pixel value {shown(value)}; expected integers 0-255") from None
            if not 0 <= number <= 255:
                raise ValueError(f"has a pixel value {shown(value)} outside 0-255") from None
        raise
    if array.min() < 0 or array.max() > 255:
        raise ValueError(f"has pixel values outside 0-255 (min {array.min()}, max {array.max()})")
    return array.astype(np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)


def read_csv(path: Path, on_bad: str = "error") -> tuple[dict[str, Split], DecodeReport]:
    """Read the original ``fer2013.csv`` (``emotion,pixels,Usage``) into groups train/public/private."""
    import pandas as pd

    report = DecodeReport()
    bad = BadSamples(on_bad, report)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises many types for unreadable files
        raise DataError(f"{path}: cannot be read as CSV ({first_line(exc, 200)})") from None
    missing = [c for c in CSV_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(shown(c) for c in frame.columns[:8]) or 'none'}. "
            f"The original fer2013.csv has the header 'emotion,pixels,Usage'."
        )
    images: dict[str, list[np.ndarray]] = {g: [] for g in CSV_USAGE_GROUPS.values()}
    labels: dict[str, list[int]] = {g: [] for g in CSV_USAGE_GROUPS.values()}
    sources: dict[str, list[str]] = {g: [] for g in CSV_USAGE_GROUPS.values()}
    for row, (emotion, pixels, usage) in enumerate(zip(frame["emotion"], frame["pixels"], frame["Usage"]), start=1):
        where = f"{path.name} row {row} (line {row + 1})"
        group = CSV_USAGE_GROUPS.get(usage.strip())
        if group is None and not usage.strip():
            bad(where, "has no Usage (its third field is empty or missing; each row is emotion,pixels,Usage)")
            continue
        if group is None:
            bad(where, f"unknown Usage {shown(usage)}; expected one of {', '.join(CSV_USAGE_GROUPS)}")
            continue
        label = emotion.strip()
        if not label.isdigit() or int(label) >= NUM_CLASSES:
            bad(where, f"unknown emotion label {shown(emotion)}; expected an integer 0-{NUM_CLASSES - 1} ({', '.join(f'{i} {n}' for i, n in enumerate(CLASS_NAMES))})")
            continue
        try:
            image = _pixels_to_image(pixels)
        except ValueError as exc:
            bad(where, f"pixels {exc}")
            continue
        images[group].append(image)
        labels[group].append(int(label))
        sources[group].append(f"{path.name}#row{row}")
    groups = {g: _make_split(images[g], labels[g], sources[g]) for g in images if sources[g]}
    return groups, report


def _make_split(images: list[np.ndarray], labels: list[int], sources: list[str]) -> Split:
    if not sources:
        return Split.empty()
    return Split(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64), sources)


# ---------------------------------------------------------------------------------------------
# Kaggle image folders


def find_split_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    """The child folder of ``root`` whose name is one of ``names`` (any case), if any."""
    if not root.is_dir():
        return None
    for child in sorted(root.iterdir()):
        if child.is_dir() and child.name.lower() in names:
            return child
    return None


def list_folder_split(split_dir: Path, root: Path, bad: BadSamples) -> list[tuple[Path, int]]:
    """The (file, label) pairs under ``split_dir/<class>/``; unknown class folders are bad input."""
    files: list[tuple[Path, int]] = []
    for child in sorted(split_dir.iterdir()):
        rel = child.relative_to(root)
        if child.name.startswith("."):
            bad.report.ignored.append(str(rel))
            continue
        if not child.is_dir():
            bad(str(rel), f"stray file in a split folder; expected only class folders ({', '.join(CLASS_NAMES)})")
            continue
        label = class_index(child.name)
        if label is None:
            bad(str(rel), f"unknown class folder {shown(child.name)}; expected one of {', '.join(CLASS_NAMES)} (any case)")
            continue
        for entry in sorted(os.scandir(child), key=lambda e: e.name):
            path = Path(entry.path)
            if entry.name.startswith("."):
                bad.report.ignored.append(str(path.relative_to(root)))
            elif not entry.is_file():
                bad(str(path.relative_to(root)), "is not an image file (a folder or a broken link inside a class folder)")
            elif path.suffix.lower() not in IMAGE_EXTENSIONS:
                bad(str(path.relative_to(root)), f"is not an image (expected one of {', '.join(IMAGE_EXTENSIONS)})")
            else:
                files.append((path, label))
    return files


def _decode(path: Path) -> tuple[np.ndarray | None, str | None, bool, bool]:
    """Decode one image to 48x48 uint8 gray: (image, error, converted_to_gray, resized)."""
    try:
        gray, converted = read_gray(path)
    except ImageDecodeError as exc:
        return None, str(exc), False, False
    image, resized = to_model_size(gray)
    return image, None, converted, resized


def decode_files(files: list[tuple[Path, int]], root: Path, bad: BadSamples, desc: str) -> Split:
    """Decode image files in parallel threads (PIL releases the GIL while decoding)."""
    from tqdm.auto import tqdm

    images, labels, sources = [], [], []
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        results = pool.map(_decode, [f for f, _ in files], chunksize=64)
        for (path, label), (image, error, converted, resized) in tqdm(
            zip(files, results), total=len(files), desc=f"decoding {desc}", unit="img", leave=False, disable=None
        ):
            rel = str(path.relative_to(root))
            if error is not None:
                bad(rel, error)
                continue
            bad.report.converted_to_gray += converted
            bad.report.resized += resized
            images.append(image)
            labels.append(label)
            sources.append(rel)
    return _make_split(images, labels, sources)


def read_folders(root: Path, on_bad: str = "error") -> tuple[dict[str, Split], DecodeReport]:
    """Read the Kaggle layout into groups: train, val (a val/validation folder), and the test folder's
    files grouped by name prefix into public / private / test (files with neither prefix)."""
    try:
        return _read_folders(root, on_bad)
    except PermissionError as exc:
        raise DataError(f"{exc.filename}: cannot be read (permission denied); fix its permissions") from None


def _read_folders(root: Path, on_bad: str) -> tuple[dict[str, Split], DecodeReport]:
    report = DecodeReport()
    bad = BadSamples(on_bad, report)
    train_dir = find_split_dir(root, ("train",))
    test_dir = find_split_dir(root, ("test",))
    val_dir = find_split_dir(root, VAL_FOLDER_NAMES)
    assert train_dir is not None or test_dir is not None, "read_folders needs train/ or test/; detect_format checks this"
    listed: dict[str, list[tuple[Path, int]]] = {"train": list_folder_split(train_dir, root, bad)} if train_dir else {}
    if val_dir is not None:
        listed["val"] = list_folder_split(val_dir, root, bad)
    for name in list(listed):  # a test face among the faces trained or selected on: the protocol's leak
        kept = []
        for path, label in listed[name]:
            group = prefix_group(path)
            if group is None or (name == "val" and group == "public"):  # PublicTest is FER2013's own val
                kept.append((path, label))
            else:
                bad(str(path.relative_to(root)), f"a {'PublicTest' if group == 'public' else 'PrivateTest'} file in "
                    f"{path.relative_to(root).parts[0]}/ (a face of FER2013's {'val' if group == 'public' else 'test'} split "
                    f"would be {'trained' if name == 'train' else 'selected'} on); move it to "
                    f"{'val/ or test/' if group == 'public' else 'test/'}")
        listed[name] = kept
    if test_dir is not None:
        for path, label in list_folder_split(test_dir, root, bad):
            listed.setdefault(prefix_group(path) or "test", []).append((path, label))
    if "public" in listed and "private" in listed and "test" in listed:  # unprefixed: its split cannot be told
        for path, _ in listed.pop("test"):
            bad(str(path.relative_to(root)), "test/ holds PublicTest_* and PrivateTest_* files and this one has neither "
                "prefix, so its split cannot be told; rename or remove it")
    groups = {name: decode_files(files, root, bad, name) for name, files in listed.items() if files}
    return groups, report


def prefix_group(path: Path) -> str | None:
    """``public`` or ``private`` for a file named as FER2013's PublicTest_*/PrivateTest_* faces, else None."""
    return next((g for prefix, g in TEST_PREFIXES.items() if path.name.lower().startswith(prefix.lower())), None)
