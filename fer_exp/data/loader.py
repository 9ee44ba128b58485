"""``load_data``: detect the format of a source, decode it once (cached), resolve train/val/test."""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import time
from pathlib import Path

import numpy as np
import torch

from fer_exp.classes import CLASS_NAMES
from fer_exp.data import cache
from fer_exp.config import CHOICES
from fer_exp.data.dataset import SPLIT_NAMES, DataError, FerData, Split
from fer_exp.data.formats import ON_BAD_CHOICES, find_split_dir, read_csv, read_folders
from fer_exp.data.synthetic import parse_synthetic_spec, synthetic_split

LAYOUT_HELP = (
    "Expected one of: the original fer2013.csv (columns emotion,pixels,Usage), a folder holding it, "
    "the Kaggle image-folder layout (train/<class>/*.jpg and test/<class>/*.jpg, class folders "
    f"{', '.join(CLASS_NAMES)}), or 'synthetic'."
)


def detect_format(source: str, train: bool = True) -> tuple[str, Path | None]:
    """('synthetic', None), ('csv', file) or ('folder', root); raises DataError otherwise. ``train`` False: a
    folder with test/ alone will do (faces to evaluate on, none to train on)."""
    if source == "synthetic" or source.startswith("synthetic:"):
        return "synthetic", None
    path = Path(source).expanduser()
    if not path.exists():
        from fer_exp.config import Config

        default = (f" ({source} is the default --data: the README's 'Get FER2013' says how to fetch it; "
                   "--data synthetic is an offline demo)" if source == Config.data else "")
        raise DataError(f"{source}: no such file or folder{default}. {LAYOUT_HELP}")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            packed = path.name.lower().endswith((".tar.gz", ".tgz", ".tar", ".zip", ".gz"))
            raise DataError(f"{source}: is a file but not a .csv"
                            + (" (an archive: extract it first, then give the .csv or the folder it holds)" if packed else "")
                            + f". {LAYOUT_HELP}")
        return "csv", path
    if not path.is_dir():  # a device, a socket, a FIFO
        raise DataError(f"{source}: is neither a regular file nor a folder. {LAYOUT_HELP}")
    if find_split_dir(path, ("train",)) is not None or (not train and find_split_dir(path, ("test",)) is not None):
        return "folder", path
    csvs = sorted(path.glob("*.csv"))
    named = [c for c in csvs if c.name.lower() == "fer2013.csv"]
    if named or len(csvs) == 1:
        return "csv", (named or csvs)[0]
    found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
    alone = (" A test/ folder alone is faces to evaluate on: fer-exp evaluate --data reads it (with --split test, the default); training needs train/."
             if find_split_dir(path, ("test",)) is not None else "")
    names = {p.name.lower() for p in path.iterdir() if p.is_dir()}
    if names & set(CLASS_NAMES):  # a split's class folders: the split folder itself was given
        alone += f" These are class folders, so {source} is one split: give the folder above it ({path.resolve().parent})."
    raise DataError(f"{source}: unknown layout (found {found}). {LAYOUT_HELP}{alone}")


def _stratified_or_plain_split(labels, fraction: float, seed: int):
    """scikit-learn's seeded ``train_test_split`` of the indices, stratified where every class allows it."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    try:
        keep, held = train_test_split(index, test_size=fraction, random_state=seed, stratify=stratify)
    except ValueError:  # too few samples for every class to appear on both sides: a plain seeded split
        stratify = None
        keep, held = train_test_split(index, test_size=fraction, random_state=seed)
    return np.sort(keep), np.sort(held), stratify is not None


def holdout(split: Split, fraction: float, seed: int, use_cache: bool = True) -> tuple[Split, Split, bool]:
    """A seeded hold-out, stratified where every class allows it: (rest, held_out, stratified).

    The split is a pure function of the label sequence, the fraction, the seed and scikit-learn's
    version, so it is cached under a hash of those: a warm start does not import scikit-learn.
    """
    if len(split) < 2:
        raise DataError(f"the train split has {len(split)} image(s); at least 2 are needed to hold out a val split")
    held_out = math.ceil(fraction * len(split))  # scikit-learn's rounding of test_size
    if not 1 <= held_out < len(split):
        raise DataError(f"a val fraction of {fraction:g} of the train split's {len(split)} images leaves "
                        f"{'no val' if held_out < 1 else 'no train'} images; choose --val-fraction between "
                        f"{1 / len(split):.3g} and {(len(split) - 1) / len(split):.3g} (0.1 is usual)")
    labels = split.labels.numpy()
    digest = hashlib.sha256(labels.astype(np.int64).tobytes())
    digest.update(f"|{fraction!r}|{seed}|scikit-learn {_sklearn_version()}".encode())
    key = digest.hexdigest()[:24]
    blob = cache.load_blob(key, "holdout") if use_cache else None
    if isinstance(blob, dict) and {"keep", "held", "stratified"} <= blob.keys():
        keep, held, stratified = blob["keep"], blob["held"], bool(blob["stratified"])
    else:
        keep, held, stratified = _stratified_or_plain_split(labels, fraction, seed)
        keep, held = torch.from_numpy(keep), torch.from_numpy(held)
        if use_cache:
            cache.save_blob(key, "holdout", {"keep": keep, "held": held, "stratified": stratified})
    return split.subset(keep), split.subset(held), stratified


def _sklearn_version() -> str:
    try:
        return importlib.metadata.version("scikit-learn")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def resolve_splits(groups: dict[str, Split], fmt: str, val_fraction: float, seed: int,
                   use_cache: bool = True, train: bool = True) -> tuple[dict[str, Split], str]:
    """Turn the source's groups into train/val/test and say which rule did it. ``train`` False: a source
    without train faces is test alone (train and val empty), to evaluate on."""
    if "train" not in groups and not train:
        tests = [groups[g] for g in ("public", "private", "test") if g in groups]
        if not tests:
            raise DataError(f"no images to evaluate on: no {'PublicTest/PrivateTest rows' if fmt == 'csv' else 'test/ folder'}. {LAYOUT_HELP}")
        where = "the PublicTest/PrivateTest rows" if fmt == "csv" else "test/"
        return ({"train": Split.empty(), "val": Split.empty(), "test": Split.concat(tests)},
                f"test = {where} (no train faces: a source to evaluate on)")
    if "train" not in groups:
        where = "Training rows" if fmt == "csv" else "train/ folder"
        raise DataError(f"the train split is empty: no images in the {where}. {LAYOUT_HELP}")
    unprefixed = groups.get("test")
    if "val" in groups:
        if "public" in groups and "private" in groups:  # test/ as Kaggle ships it: PublicTest is FER2013's val
            raise DataError("the source has a val/ folder and test/ holds both PublicTest_* and PrivateTest_* files: "
                            "test would include PublicTest, FER2013's val (a copy of which val/ may be). Remove val/ "
                            "(val = PublicTest, test = PrivateTest) or keep only PrivateTest_* files in test/")
        tests = [groups[g] for g in ("public", "private", "test") if g in groups]
        splits = {"train": groups["train"], "val": groups["val"], "test": Split.concat(tests) if tests else Split.empty()}
        rule = "train = train/; val = the val/ folder; test = test/"
    elif "public" in groups and "private" in groups:
        if unprefixed is not None:
            raise DataError(
                f"{unprefixed.sources[0]}: test/ holds PublicTest_* and PrivateTest_* files, and this file has "
                "neither prefix, so its split cannot be told. Rename or remove it, or pass --on-bad skip."
            )
        splits = {"train": groups["train"], "val": groups["public"], "test": groups["private"]}
        rule = ("train = Training; val = PublicTest; test = PrivateTest" if fmt == "csv" else
                "train = train/; val = test/PublicTest_*; test = test/PrivateTest_*")
    else:
        tests = [groups[g] for g in ("public", "private", "test") if g in groups]
        train, val, stratified = holdout(groups["train"], val_fraction, seed, use_cache)
        splits = {"train": train, "val": val, "test": Split.concat(tests) if tests else Split.empty()}
        test_name = {"csv": "the PublicTest/PrivateTest rows present", "folder": "test/"}[fmt]
        rule = f"train = {100 - round(val_fraction * 100)}% of train; val = {'stratified' if stratified else 'random (too few per class to stratify)'} {round(val_fraction * 100)}% hold-out of train (seed {seed}); test = {test_name}"
    for name in SPLIT_NAMES:
        if len(splits[name]) == 0:
            what = "PublicTest/PrivateTest rows" if fmt == "csv" else f"images in {name}/"
            raise DataError(f"the {name} split is empty (no {what}). {LAYOUT_HELP}")
    return splits, rule


def load_data(source: str, *, on_bad: str = "error", seed: int = 0, val_fraction: float = 0.1,
              use_cache: bool = True, duplicates: str = "report", copy_correlation: float = 1.0,
              train: bool = True) -> FerData:
    """Load a FER2013 source (a CSV, the Kaggle folders, or ``synthetic[:TRAIN,VAL,TEST]``).

    Decoding happens once per source; later loads read the cache unless the source changed.
    ``duplicates="drop"``: without the faces copied across splits (:meth:`FerData.without_duplicates`).
    ``copy_correlation``: below 1, faces whose pixels correlate at least that much with a face of an
    earlier split count as its copies too (counted, scored apart, and dropped by ``duplicates="drop"``).
    ``train`` False (evaluation): a source of test faces alone (a test/ folder, a CSV of test rows) is read
    with empty train and val splits.
    """
    if on_bad not in ON_BAD_CHOICES:
        raise DataError(f"--on-bad must be one of {', '.join(ON_BAD_CHOICES)}, got {on_bad!r}")
    if duplicates not in CHOICES["duplicates"]:
        raise DataError(f"--duplicates must be one of {', '.join(CHOICES['duplicates'])}, got {duplicates!r}")
    if not 0.0 < copy_correlation <= 1.0:
        raise DataError(f"copy_correlation must be above 0 and at most 1 (1: identical pixels only; 0.95 also counts "
                        f"the same photo cropped or recompressed), got {copy_correlation}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be strictly between 0 and 1 (the share of train held out for val), got {val_fraction}")
    if not 0 <= seed < 2**32:  # numpy/scikit-learn seeds; a negative one would end in a traceback
        raise DataError(f"seed must be an integer from 0 to 2**32 - 1, got {seed}")
    start = time.perf_counter()
    try:
        data = _load(source, on_bad, seed, val_fraction, use_cache, start, train)
        data.copy_correlation = float(copy_correlation)
        if copy_correlation < 1:  # every pair of faces correlated now, so the load's time says it
            for split in ("val", "test"):
                data.copied(split)
        if duplicates == "drop" and len(data.train):  # (test alone: nothing trained on to drop)
            data = data.without_duplicates()
        if duplicates == "drop" or copy_correlation < 1:
            data.load_seconds = time.perf_counter() - start
        return data
    except PermissionError as exc:  # a folder that cannot be listed, while detecting or fingerprinting it
        raise DataError(f"{exc.filename}: cannot be read (permission denied); fix its permissions") from None


def _load(source: str, on_bad: str, seed: int, val_fraction: float, use_cache: bool, start: float,
          train: bool = True) -> FerData:
    fmt, path = detect_format(source, train)
    if fmt == "synthetic":
        try:
            sizes = parse_synthetic_spec(source)
        except ValueError as exc:
            raise DataError(str(exc)) from None
        splits = {name: synthetic_split(n, seed, name) for name, n in sizes.items()}
        rule = f"synthetic faces drawn per split (seed {seed})"
        return FerData(**splits, source=source, format=fmt, split_rule=rule,
                       load_seconds=time.perf_counter() - start)

    key = cache.fingerprint(path, on_bad) if use_cache else None
    cached = cache.load(key) if key else None
    if cached is not None:
        groups, report = cached
    else:
        groups, report = read_csv(path, on_bad) if fmt == "csv" else read_folders(path, on_bad)
        if key:
            cache.save(key, groups, report)
    splits, rule = resolve_splits(groups, fmt, val_fraction, seed, use_cache, train)
    return FerData(**splits, source=str(path), format=fmt, split_rule=rule, report=report,
                   from_cache=cached is not None, load_seconds=time.perf_counter() - start)
