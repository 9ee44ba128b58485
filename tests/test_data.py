"""The data layer (fer_exp.data) and ``fer-exp data inspect``.

Small sources are built per test under tmp_path: a few uniform 48x48 images per class written with
PIL (each class has its own grey value, so a label can be checked from the pixels), and small
fer2013.csv files written as text. Every test points FER_EXP_CACHE_DIR at its own tmp folder.
The real-data tests read ../shared/fer2013 beside the checkout and skip cleanly when it is absent.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from fer_exp.classes import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES
from fer_exp.cli import main
from fer_exp.data import DataError, FerData, load_data
from fer_exp.data import cache as data_cache
from fer_exp.data.synthetic import FER2013_TRAIN_COUNTS

NPIX = IMAGE_SIZE * IMAGE_SIZE
CLASS_VALUE = [10 + 35 * i for i in range(NUM_CLASSES)]  # grey value of every image of class i
VALUE_CLASS = {v: i for i, v in enumerate(CLASS_VALUE)}
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "fer2013"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own decode cache, so no test reads or writes the user's cache."""
    folder = tmp_path / "fer-exp-cache"
    monkeypatch.setenv("FER_EXP_CACHE_DIR", str(folder))
    return folder


# ---------------------------------------------------------------------------------------------
# builders


def write_image(path: Path, value: int = 128, *, mode: str = "L", size: tuple[int, int] = (48, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = {"L": value, "RGB": (value,) * 3, "RGBA": (value, value, value, 255)}[mode]
    Image.new(mode, size, colour).save(path)
    return path


def noise_jpeg_bytes(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 48), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def make_folders(root: Path, train=3, test=2, *, names=CLASS_NAMES, train_dir="train", test_dir="test",
                 test_prefix="PublicTest_", ext=".png") -> Path:
    """Kaggle layout: train_dir/<name>/Training_k.ext and test_dir/<name>/<prefix>k.ext.

    ``train``/``test`` are a count per class or a list of 7 counts (in FER2013 class order);
    ``names`` are the class folder names in FER2013 class order (any case); test=None: no test folder.
    """
    for split_dir, counts, prefix in ((train_dir, train, "Training_"), (test_dir, test, test_prefix)):
        if counts is None:
            continue
        counts = [counts] * NUM_CLASSES if isinstance(counts, int) else counts
        for label, (name, n) in enumerate(zip(names, counts)):
            for k in range(n):
                write_image(root / split_dir / name / f"{prefix}{k:04d}{ext}", CLASS_VALUE[label])
    return root


def pixel_row(label: int, row: int) -> np.ndarray:
    """A distinct 48x48 image for every (label, row)."""
    return ((np.arange(NPIX) * (label + 1) + 7 * row) % 256).astype(np.uint8).reshape(48, 48)


def csv_text(rows: list[tuple]) -> str:
    """rows: (emotion, usage) -> pixel_row(emotion, row), or (emotion, pixels_text, usage) as given."""
    lines = ["emotion,pixels,Usage"]
    for i, row in enumerate(rows, start=1):
        if len(row) == 2:
            emotion, usage = row
            pixels = " ".join(map(str, pixel_row(int(emotion), i).ravel().tolist()))
        else:
            emotion, pixels, usage = row
        lines.append(f"{emotion},{pixels},{usage}")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[tuple]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(csv_text(rows))
    return path


def usage_rows(per_class: dict[str, int]) -> list[tuple]:
    """per_class Usage -> rows per class, interleaved by class."""
    rows = []
    for usage, n in per_class.items():
        for k in range(n):
            for label in range(NUM_CLASSES):
                rows.append((label, usage))
    return rows


def inspect(*args: str):
    return CliRunner().invoke(main, ["data", "inspect", *map(str, args)])


def assert_cli_error(source, *fragments: str, args: tuple = ()) -> str:
    result = inspect(source, *args)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert "Error:" in result.output
    for fragment in fragments:
        assert fragment in result.output
    return result.output


def labels_from_pixels(images: torch.Tensor) -> list[int]:
    """The class each uniform image was drawn for, from its grey value."""
    out = []
    for image in images:
        values = image.unique().tolist()
        assert len(values) == 1, "fixture images are uniform"
        out.append(VALUE_CLASS[values[0]])
    return out


def assert_well_formed(data: FerData) -> None:
    for name, split in data.splits().items():
        assert split.images.dtype == torch.uint8, name
        assert split.images.ndim == 3 and tuple(split.images.shape[1:]) == (48, 48), name
        assert split.labels.dtype == torch.int64, name
        assert split.labels.shape == (len(split),), name
        assert len(split.sources) == len(split) > 0, name
        assert int(split.labels.min()) >= 0 and int(split.labels.max()) < NUM_CLASSES


# ---------------------------------------------------------------------------------------------
# 1. fer2013.csv


def test_csv_training_public_private_become_train_val_test(tmp_path):
    rows = usage_rows({"Training": 3, "PublicTest": 2, "PrivateTest": 1})
    path = write_csv(tmp_path / "fer2013.csv", rows)
    data = load_data(str(path))
    assert_well_formed(data)
    assert data.format == "csv"
    assert data.split_rule == "train = Training; val = PublicTest; test = PrivateTest"
    assert [len(data.train), len(data.val), len(data.test)] == [21, 14, 7]
    assert data.train.class_counts() == [3] * 7
    assert data.val.class_counts() == [2] * 7
    assert data.test.class_counts() == [1] * 7
    usage_of = {i: row[1] for i, row in enumerate(rows, start=1)}
    for split, usage in ((data.train, "Training"), (data.val, "PublicTest"), (data.test, "PrivateTest")):
        for image, label, source in zip(split.images, split.labels.tolist(), split.sources):
            assert source.startswith("fer2013.csv#row")
            row = int(source.removeprefix("fer2013.csv#row"))
            assert usage_of[row] == usage
            assert rows[row - 1][0] == label
            assert torch.equal(image, torch.from_numpy(pixel_row(label, row)))


def test_csv_labels_are_the_emotion_column(tmp_path):
    rows = [(6, "Training"), (0, "Training"), (3, "Training"), (1, "PublicTest"), (5, "PrivateTest")]
    data = load_data(str(write_csv(tmp_path / "fer2013.csv", rows)))
    assert data.train.labels.tolist() == [6, 0, 3]
    assert data.train.sources == ["fer2013.csv#row1", "fer2013.csv#row2", "fer2013.csv#row3"]
    assert data.val.labels.tolist() == [1] and data.val.sources == ["fer2013.csv#row4"]
    assert data.test.labels.tolist() == [5] and data.test.sources == ["fer2013.csv#row5"]


def test_csv_folder_holding_fer2013_csv(tmp_path):
    rows = usage_rows({"Training": 2, "PublicTest": 1, "PrivateTest": 1})
    write_csv(tmp_path / "src" / "fer2013.csv", rows)
    write_csv(tmp_path / "src" / "other.csv", [(0, "Training")])  # fer2013.csv is preferred by name
    (tmp_path / "src" / "notes.txt").write_text("hello")
    data = load_data(str(tmp_path / "src"))
    assert data.format == "csv"
    assert Path(data.source).name == "fer2013.csv"
    assert [len(data.train), len(data.val), len(data.test)] == [14, 7, 7]

    result = inspect(tmp_path / "src", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["format"] == "csv"


@pytest.mark.parametrize("test_usage", ["PublicTest", "PrivateTest"])
def test_csv_single_test_usage_is_test_and_val_is_a_holdout(tmp_path, test_usage):
    rows = usage_rows({"Training": 20, test_usage: 2})  # 20 Training rows per class
    path = write_csv(tmp_path / "fer2013.csv", rows)
    data = load_data(str(path), seed=0)
    assert_well_formed(data)
    assert data.test.class_counts() == [2] * 7
    assert all(usage_of_row(rows, s) == test_usage for s in data.test.sources)
    # val is a stratified 10% of Training: exactly 2 of every class's 20 rows
    assert data.val.class_counts() == [2] * 7
    assert data.train.class_counts() == [18] * 7
    assert all(usage_of_row(rows, s) == "Training" for s in data.train.sources + data.val.sources)
    assert not set(data.train.sources) & set(data.val.sources)
    assert len(set(data.train.sources) | set(data.val.sources)) == 140
    assert "hold-out" in data.split_rule and "seed 0" in data.split_rule
    again = load_data(str(path), seed=0)
    assert again.val.sources == data.val.sources
    other = load_data(str(path), seed=1)
    assert other.val.sources != data.val.sources
    assert other.val.class_counts() == [2] * 7


def usage_of_row(rows: list[tuple], source: str) -> str:
    return rows[int(source.split("#row")[1]) - 1][-1]


def test_csv_usage_and_label_whitespace_is_tolerated(tmp_path):
    pixels = " ".join(["5"] * NPIX)
    path = write_csv(tmp_path / "fer2013.csv", [(" 2", pixels, "Training "), ("4", pixels, " PublicTest"),
                                                 ("0", pixels, "PrivateTest")])
    data = load_data(str(path))
    assert data.train.labels.tolist() == [2] and data.val.labels.tolist() == [4]
    assert int(data.train.images.max()) == 5 == int(data.train.images.min())


GOOD = " ".join(["100"] * NPIX)
CSV_BAD_ROWS = {
    # id: (bad row, fragments the message must hold)
    "wrong-pixel-count": ((0, " ".join(["1"] * (NPIX - 1)), "Training"), ["row 2", "2303 pixel values", "expected 2304"]),
    "too-many-pixels": ((0, " ".join(["1"] * (NPIX + 1)), "Training"), ["row 2", "2305 pixel values", "expected 2304"]),
    "empty-pixels": ((0, "", "Training"), ["row 2", "0 pixel values", "expected 2304"]),
    "non-numeric-pixel": ((0, "abc " + " ".join(["1"] * (NPIX - 1)), "Training"), ["row 2", "non-numeric", "'abc'", "0-255"]),
    "float-pixel": ((0, "1.5 " + " ".join(["1"] * (NPIX - 1)), "Training"), ["row 2", "non-numeric", "'1.5'"]),
    "pixel-above-255": ((0, "256 " + " ".join(["1"] * (NPIX - 1)), "Training"), ["row 2", "outside 0-255"]),
    "pixel-negative": ((0, "-1 " + " ".join(["1"] * (NPIX - 1)), "Training"), ["row 2", "outside 0-255"]),
    "pixel-overflows-int32": ((0, "3000000000 " + " ".join(["1"] * (NPIX - 1)), "Training"), ["row 2", "outside 0-255"]),
    "label-7": ((7, GOOD, "Training"), ["row 2", "unknown emotion label '7'", "0-6"]),
    "label-x": (("x", GOOD, "Training"), ["row 2", "unknown emotion label 'x'", "0-6"]),
    "label-negative": ((-1, GOOD, "Training"), ["row 2", "unknown emotion label '-1'"]),
    "label-empty": (("", GOOD, "Training"), ["row 2", "unknown emotion label ''"]),
    "unknown-usage": ((0, GOOD, "Validation"), ["row 2", "unknown Usage 'Validation'", "Training, PublicTest, PrivateTest"]),
}


def test_a_csv_row_of_one_field_is_said_to_lack_its_usage(tmp_path):
    path = write_csv(tmp_path / "fer2013.csv", [(1, "Training"), (2, "PublicTest")])
    path.write_text(path.read_text() + "garbage\n")
    with pytest.raises(DataError, match=r"row 3 \(line 4\): has no Usage \(its third field is empty or missing; each row "
                                        r"is emotion,pixels,Usage\)"):  # (was: unknown Usage '')
        load_data(str(path))


@pytest.mark.parametrize("case", CSV_BAD_ROWS, ids=list(CSV_BAD_ROWS))
def test_csv_bad_row_stops_with_dataerror_naming_the_row(tmp_path, case):
    bad_row, fragments = CSV_BAD_ROWS[case]
    rows = [(1, GOOD, "Training"), bad_row, (2, GOOD, "PublicTest"), (3, GOOD, "PrivateTest")]
    path = write_csv(tmp_path / "fer2013.csv", rows)
    with pytest.raises(DataError) as info:
        load_data(str(path))
    message = str(info.value)
    assert message.startswith("fer2013.csv row 2 (line 3)")
    for fragment in fragments:
        assert fragment in message
    assert_cli_error(path, "fer2013.csv row 2", *fragments)


def test_csv_missing_columns(tmp_path):
    path = tmp_path / "fer2013.csv"
    path.write_text("emotion,Usage\n0,Training\n")
    with pytest.raises(DataError, match=r"missing column\(s\) pixels.*emotion,pixels,Usage") as info:
        load_data(str(path))
    assert str(path) in str(info.value)
    assert_cli_error(path, "missing column(s) pixels", "emotion,pixels,Usage")

    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(DataError, match=r"missing column\(s\) emotion, pixels, Usage; found 'a', 'b', 'c'"):
        load_data(str(path))


def test_csv_empty_file(tmp_path):
    path = tmp_path / "fer2013.csv"
    path.write_text("")
    with pytest.raises(DataError, match="fer2013.csv"):
        load_data(str(path))
    assert_cli_error(path, "fer2013.csv")


def test_csv_without_test_rows_or_training_rows(tmp_path):
    path = write_csv(tmp_path / "fer2013.csv", usage_rows({"Training": 10}))
    with pytest.raises(DataError, match="test split is empty.*PublicTest/PrivateTest rows"):
        load_data(str(path))
    assert_cli_error(path, "test split is empty")

    path = write_csv(tmp_path / "only_test" / "fer2013.csv", usage_rows({"PublicTest": 1, "PrivateTest": 1}))
    with pytest.raises(DataError, match="train split is empty.*Training rows"):
        load_data(str(path))
    assert_cli_error(path, "train split is empty")


def test_csv_on_bad_skip_skips_and_reports_bad_rows(tmp_path):
    rows = usage_rows({"Training": 2, "PublicTest": 1, "PrivateTest": 1})  # 28 good rows
    rows.insert(3, (9, GOOD, "Training"))  # row 4
    rows.insert(9, (0, "1 2 3", "Training"))  # row 10
    rows.append((0, GOOD, "Test"))  # row 31
    path = write_csv(tmp_path / "fer2013.csv", rows)
    with pytest.raises(DataError, match="row 4"):
        load_data(str(path))
    data = load_data(str(path), on_bad="skip")
    assert [len(data.train), len(data.val), len(data.test)] == [14, 7, 7]
    where = [w for w, _ in data.report.skipped]
    assert where == ["fer2013.csv row 4 (line 5)", "fer2013.csv row 10 (line 11)", "fer2013.csv row 31 (line 32)"]
    whys = [y for _, y in data.report.skipped]
    assert "unknown emotion label '9'" in whys[0] and "3 pixel values" in whys[1] and "unknown Usage 'Test'" in whys[2]
    skipped_sources = {"fer2013.csv#row4", "fer2013.csv#row10", "fer2013.csv#row31"}
    assert not skipped_sources & set(data.train.sources + data.val.sources + data.test.sources)

    result = inspect(path, "--on-bad", "skip")
    assert result.exit_code == 0, result.output
    assert "skipped 3 bad sample(s)" in result.output
    assert "fer2013.csv row 10 (line 11)" in result.output
    summary = json.loads(inspect(path, "--on-bad", "skip", "--json").output)
    assert [s["where"] for s in summary["skipped"]] == where


# ---------------------------------------------------------------------------------------------
# 2 & 4. Kaggle image folders, labels


def test_folder_labels_are_fer2013_indices_whatever_the_folder_order_and_case(tmp_path):
    mixed = ["ANGRY", "Disgust", "fEaR", "happy", "SaD", "Surprise", "NEUTRAL"]
    order = list(range(NUM_CLASSES))
    random.Random(3).shuffle(order)
    root = tmp_path / "faces"
    for label in order:  # create class folders in a shuffled order
        for split, n in (("Train", 2 + label), ("TEST", 1 + label % 3)):
            for k in range(n):
                write_image(root / split / mixed[label] / f"img{k}.png", CLASS_VALUE[label])
    data = load_data(str(root))
    assert_well_formed(data)
    assert data.format == "folder"
    for split in (data.train, data.val, data.test):
        assert split.labels.tolist() == labels_from_pixels(split.images)
        for label, source in zip(split.labels.tolist(), split.sources):
            assert Path(source).parts[1] == mixed[label]
    assert [a + b for a, b in zip(data.train.class_counts(), data.val.class_counts())] == [2 + i for i in range(7)]
    assert data.test.class_counts() == [1 + i % 3 for i in range(7)]


def test_folder_sources_are_paths_relative_to_the_root(tmp_path):
    root = make_folders(tmp_path / "faces", train=10, test=1)
    data = load_data(str(root))
    for split in data.splits().values():
        for source in split.sources:
            assert not Path(source).is_absolute()
            assert (root / source).is_file()
    assert all(s.startswith("test/") and "/PublicTest_" in s for s in data.test.sources)
    assert all(s.startswith("train/") for s in data.train.sources + data.val.sources)


def test_folder_public_and_private_test_files_become_val_and_test(tmp_path):
    root = make_folders(tmp_path / "faces", train=3, test=2, test_prefix="PublicTest_")
    make_folders(root, train=None, test=1, test_prefix="PrivateTest_", ext=".jpg")
    data = load_data(str(root))
    assert_well_formed(data)
    assert data.split_rule == "train = train/; val = test/PublicTest_*; test = test/PrivateTest_*"
    assert data.train.class_counts() == [3] * 7  # no hold-out taken from train
    assert data.val.class_counts() == [2] * 7
    assert data.test.class_counts() == [1] * 7
    assert all(Path(s).name.startswith("PublicTest_") for s in data.val.sources)
    assert all(Path(s).name.startswith("PrivateTest_") for s in data.test.sources)
    # JPEG round trip of a uniform grey is exact within a level or two
    for image, label in zip(data.test.images, data.test.labels.tolist()):
        assert abs(float(image.float().mean()) - CLASS_VALUE[label]) <= 2


def test_folder_public_private_and_unprefixed_test_files_is_an_error(tmp_path):
    root = make_folders(tmp_path / "faces", train=3, test=1, test_prefix="PublicTest_")
    make_folders(root, train=None, test=1, test_prefix="PrivateTest_")
    write_image(root / "test" / "happy" / "mystery.png", CLASS_VALUE[3])
    with pytest.raises(DataError, match=r"test/happy/mystery.png.*neither prefix"):
        load_data(str(root))
    skipped = load_data(str(root), on_bad="skip")  # as the message offers: the file is skipped, said so
    assert [where for where, _ in skipped.report.skipped] == ["test/happy/mystery.png"]
    assert len(skipped.val) == len(skipped.test) == 7


def test_test_faces_among_train_or_val_and_a_val_folder_beside_a_mixed_test_are_refused(tmp_path):
    """The protocol's leaks a folder can hold: a PublicTest/PrivateTest face in train/ (trained on) or val/
    (selected on), and a val/ folder beside Kaggle's test/ (which holds PublicTest, FER2013's val, too)."""
    root = make_folders(tmp_path / "a", train=3, test=2)
    write_image(root / "train" / "happy" / "PrivateTest_0009.png", CLASS_VALUE[3])
    with pytest.raises(DataError, match=r"train/happy/PrivateTest_0009.png: a PrivateTest file in train/ .a face of "
                                        r"FER2013's test split would be trained on.; move it to test/"):
        load_data(str(root))
    skipped = load_data(str(root), on_bad="skip")
    assert not any("PrivateTest" in s for s in skipped.train.sources + skipped.val.sources)
    assert skipped.report.skipped[0][0] == "train/happy/PrivateTest_0009.png"
    mixed = make_folders(tmp_path / "b", train=3, test=1, test_prefix="PublicTest_")
    make_folders(mixed, train=None, test=1, test_prefix="PrivateTest_")
    make_folders(mixed, train=1, test=None, train_dir="val")
    with pytest.raises(DataError, match=r"val/ folder and test/ holds both .*Remove val/"):
        load_data(str(mixed))
    # FER2013's own split as folders, as that message offers: val/ PublicTest, test/ PrivateTest
    own = make_folders(tmp_path / "c", train=3, test=1, test_prefix="PrivateTest_")
    make_folders(own, train=None, test=1, test_prefix="PublicTest_", test_dir="val")
    data = load_data(str(own))
    assert data.split_rule == "train = train/; val = the val/ folder; test = test/" and len(data.val) == len(data.test) == 7
    write_image(own / "val" / "sad" / "PrivateTest_0042.png", CLASS_VALUE[4])  # but never a test face in val/
    with pytest.raises(DataError, match=r"val/sad/PrivateTest_0042.png: a PrivateTest file in val/ .a face of "
                                        r"FER2013's test split would be selected on.; move it to test/"):
        load_data(str(own))
    # a link back up the tree (train/self -> train/) is walked once, not forever
    (root / "train" / "self").symlink_to(root / "train", target_is_directory=True)
    linked = load_data(str(root), on_bad="skip")
    assert "train/self" in [where for where, _ in linked.report.skipped]


@pytest.mark.parametrize("prefix", ["PublicTest_", "PrivateTest_"])
def test_folder_single_prefix_test_is_test_and_val_is_a_holdout(tmp_path, prefix):
    root = make_folders(tmp_path / "faces", train=10, test=2, test_prefix=prefix)
    data = load_data(str(root))
    assert data.test.class_counts() == [2] * 7
    assert all(Path(s).name.startswith(prefix) for s in data.test.sources)
    assert data.val.class_counts() == [1] * 7
    assert data.train.class_counts() == [9] * 7


@pytest.mark.parametrize("val_name", ["val", "validation", "Validation", "VAL"])
def test_folder_val_folder_is_val(tmp_path, val_name):
    root = make_folders(tmp_path / "faces", train=3, test=2)
    make_folders(root, train=1, test=None, train_dir=val_name)
    data = load_data(str(root))
    assert data.split_rule == "train = train/; val = the val/ folder; test = test/"
    assert data.train.class_counts() == [3] * 7  # no hold-out taken from train
    assert data.val.class_counts() == [1] * 7
    assert all(s.startswith(f"{val_name}/") for s in data.val.sources)
    assert data.test.class_counts() == [2] * 7
    assert data.val.labels.tolist() == labels_from_pixels(data.val.images)


STRATA = [30, 10, 30, 50, 40, 20, 40]  # unequal classes, every count a multiple of 10


def test_folder_holdout_is_stratified_seeded_and_reported(tmp_path):
    root = make_folders(tmp_path / "faces", train=STRATA, test=1)
    all_train = {f"train/{name}/Training_{k:04d}.png" for name, n in zip(CLASS_NAMES, STRATA) for k in range(n)}
    data = load_data(str(root), seed=0)
    assert_well_formed(data)
    # stratified: each class contributes exactly its 10% share, so per-class proportions are kept
    assert data.val.class_counts() == [n // 10 for n in STRATA]
    assert data.train.class_counts() == [n - n // 10 for n in STRATA]
    assert set(data.train.sources).isdisjoint(data.val.sources)
    assert set(data.train.sources) | set(data.val.sources) == all_train
    assert data.test.class_counts() == [1] * 7
    assert data.split_rule == ("train = 90% of train; val = stratified 10% hold-out of train (seed 0); "
                               "test = test/")
    assert data.val.labels.tolist() == labels_from_pixels(data.val.images)

    same = load_data(str(root), seed=0)
    assert same.from_cache  # decoded groups come from the cache; the hold-out is drawn again
    assert same.val.sources == data.val.sources and torch.equal(same.val.images, data.val.images)
    assert same.train.sources == data.train.sources

    other = load_data(str(root), seed=1)
    assert other.val.sources != data.val.sources
    assert other.val.class_counts() == [n // 10 for n in STRATA]
    assert "(seed 1)" in other.split_rule

    wider = load_data(str(root), seed=0, val_fraction=0.2)
    assert wider.val.class_counts() == [n // 5 for n in STRATA]
    assert "stratified 20% hold-out" in wider.split_rule


def test_holdout_is_cached_so_a_warm_start_skips_scikit_learn(tmp_path, monkeypatch):
    from fer_exp.data import loader

    root = make_folders(tmp_path / "faces", train=STRATA, test=1)
    first = load_data(str(root), seed=0)
    calls = []
    real_split = loader._stratified_or_plain_split
    monkeypatch.setattr(loader, "_stratified_or_plain_split", lambda *a: calls.append(a) or real_split(*a))
    again = load_data(str(root), seed=0)
    assert calls == []  # hold-out read from the cache
    assert again.val.sources == first.val.sources and again.split_rule == first.split_rule
    load_data(str(root), seed=3)  # another seed is another split: drawn, then cached
    load_data(str(root), seed=0, val_fraction=0.2)
    assert len(calls) == 2
    load_data(str(root), seed=0, use_cache=False)  # --no-cache draws everything again
    assert len(calls) == 3
    holdouts = sorted(p.name for p in data_cache.cache_dir().glob("holdout-*.pt"))
    assert len(holdouts) == 3


def test_corrupt_holdout_cache_is_drawn_again(tmp_path):
    root = make_folders(tmp_path / "faces", train=STRATA, test=1)
    first = load_data(str(root), seed=0)
    for path in data_cache.cache_dir().glob("holdout-*.pt"):
        path.write_bytes(b"not a torch file")
    again = load_data(str(root), seed=0)
    assert again.val.sources == first.val.sources


def test_folder_holdout_on_a_tiny_train_split_does_not_crash(tmp_path):
    # 3 images per class: 10% is 3 images, too few for all 7 classes (scikit-learn refuses to stratify)
    root = make_folders(tmp_path / "faces", train=3, test=1)
    data = load_data(str(root))
    assert len(data.train) + len(data.val) == 21 and len(data.val) >= 1
    assert set(data.train.sources).isdisjoint(data.val.sources)
    assert inspect(root).exit_code == 0


def test_tiny_holdout_rule_says_it_is_not_stratified(tmp_path):
    root = make_folders(tmp_path / "faces", train=3, test=1)
    assert "random (too few per class to stratify) 10% hold-out" in load_data(str(root)).split_rule


def test_test_file_prefixes_match_in_any_case(tmp_path):
    root = make_folders(tmp_path / "faces", train=10, test=2, test_prefix="publictest_")
    make_folders(root, train=None, test=3, test_prefix="PRIVATETEST_")
    data = load_data(str(root))
    assert len(data.val) == 14 and len(data.test) == 21
    assert "val = test/PublicTest_*" in data.split_rule


def test_unreadable_folder_is_a_data_error(tmp_path, monkeypatch):
    root = make_folders(tmp_path / "faces", train=3, test=1)
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self.name == "train":
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(DataError, match="train: cannot be read"):
        load_data(str(root), use_cache=False)


def test_a_folder_that_cannot_be_listed_while_fingerprinting_is_a_dataerror(tmp_path, monkeypatch):
    """The cache key lists every file; a folder it may not list is a clear error, not a traceback."""
    import os

    root = make_folders(tmp_path / "faces", train=10, test=1)
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name == "sad":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=r"train/sad: cannot be read \(permission denied\)"):
        load_data(str(root))


def test_16_bit_gray_images_are_scaled_not_clipped(tmp_path):
    root = make_folders(tmp_path / "faces", train=10, test=1)
    path = root / "train" / "happy" / "deep.png"
    Image.fromarray(np.full((48, 48), 32896, dtype=np.uint16)).save(path)  # mid-grey in 16 bits
    assert Image.open(path).mode.startswith("I;16")
    data = load_data(str(root))
    everything = {s: img for split in data.splits().values() for s, img in zip(split.sources, split.images)}
    assert int(everything["train/happy/deep.png"].float().mean()) == 128


def test_float_gray_images_in_0_1_are_scaled_not_black(tmp_path):
    from fer_exp.data.images import read_gray

    path = tmp_path / "float.tiff"
    Image.fromarray(np.full((48, 48), 0.5, dtype=np.float32)).save(path)  # mode F
    assert Image.open(path).mode == "F" and int(read_gray(path)[0].mean()) == 128
    Image.fromarray(np.full((48, 48), 200.0, dtype=np.float32)).save(path)  # already 0-255
    assert int(read_gray(path)[0].mean()) == 200
    import pandas as pd

    from fer_exp.predict import draw_predictions  # and --show draws it as the model sees it, not black

    Image.fromarray(np.full((48, 48), 0.5, dtype=np.float32)).save(path)
    frame = pd.DataFrame([{"source": str(path), "x": 0, "y": 0, "width": 48, "height": 48, "emotion": "sad", "confidence": 0.5}])
    [drawn] = draw_predictions(frame, tmp_path / "drawn")
    assert Image.open(drawn).convert("L").getpixel((128, 128)) == 128


def test_the_decode_cache_is_keyed_on_pillow_s_version(tmp_path, monkeypatch):
    import PIL

    from fer_exp.data import cache

    key = cache.fingerprint(tmp_path, "error")
    monkeypatch.setattr(PIL, "__version__", "0.0.1")
    assert cache.fingerprint(tmp_path, "error") != key  # another decoder: decoded again, not read stale


def test_folder_needs_more_than_one_train_image_for_a_holdout(tmp_path):
    root = tmp_path / "faces"
    write_image(root / "train" / "happy" / "a.png", CLASS_VALUE[3])
    write_image(root / "test" / "happy" / "b.png", CLASS_VALUE[3])
    with pytest.raises(DataError, match="train split has 1 image"):
        load_data(str(root))
    assert_cli_error(root, "train split has 1 image")


# ---------------------------------------------------------------------------------------------
# 5. grayscale conversion, resizing


def test_rgb_images_become_gray_and_other_sizes_are_resized_and_counted(tmp_path):
    root = make_folders(tmp_path / "faces", train=10, test=1)
    write_image(root / "train" / "angry" / "rgb.png", CLASS_VALUE[0], mode="RGB")
    write_image(root / "train" / "fear" / "rgba.png", CLASS_VALUE[2], mode="RGBA")
    write_image(root / "train" / "happy" / "big.png", CLASS_VALUE[3], size=(96, 96))
    write_image(root / "train" / "sad" / "odd.png", CLASS_VALUE[4], size=(50, 31))
    write_image(root / "test" / "surprise" / "rgb_big.jpg", CLASS_VALUE[5], mode="RGB", size=(64, 64))
    write_image(root / "test" / "neutral" / "rgb_small.png", CLASS_VALUE[6], mode="RGB", size=(24, 24))
    data = load_data(str(root))
    assert_well_formed(data)
    assert data.report.converted_to_gray == 4
    assert data.report.resized == 4
    summary = data.summary()
    assert summary["converted_to_gray"] == 4 and summary["resized"] == 4
    assert summary["image_size"] == [48, 48]
    by_source = {s: (img, lab) for split in data.splits().values()
                 for img, lab, s in zip(split.images, split.labels.tolist(), split.sources)}
    for name, label in (("train/angry/rgb.png", 0), ("train/fear/rgba.png", 2), ("train/happy/big.png", 3),
                        ("train/sad/odd.png", 4), ("test/surprise/rgb_big.jpg", 5), ("test/neutral/rgb_small.png", 6)):
        image, got = by_source[name]
        assert got == label
        assert tuple(image.shape) == (48, 48)
        assert abs(float(image.float().mean()) - CLASS_VALUE[label]) <= 2  # grey of (v, v, v) is v

    result = inspect(root)
    assert "converted to grayscale: 4; resized to 48x48: 4" in result.output


def test_plain_48x48_gray_images_are_not_counted(tmp_path):
    data = load_data(str(make_folders(tmp_path / "faces", train=10, test=1)))
    assert data.report.converted_to_gray == 0 and data.report.resized == 0


def test_gray_image_pixels_are_kept_exactly(tmp_path):
    root = make_folders(tmp_path / "faces", train=10, test=1)
    pattern = np.random.default_rng(1).integers(0, 256, (48, 48), dtype=np.uint8)
    Image.fromarray(pattern).save(root / "test" / "sad" / "pattern.png")
    data = load_data(str(root))
    index = data.test.sources.index("test/sad/pattern.png")
    assert torch.equal(data.test.images[index], torch.from_numpy(pattern))
    assert data.test.labels[index].item() == 4


# ---------------------------------------------------------------------------------------------
# 6. caching


def test_second_load_comes_from_the_cache_and_equals_the_first(tmp_path, isolated_cache):
    root = make_folders(tmp_path / "faces", train=10, test=2)
    (root / "train" / ".DS_Store").write_bytes(b"\0")
    assert data_cache.cache_dir() == isolated_cache
    first = load_data(str(root))
    assert not first.from_cache
    assert list(isolated_cache.glob("decoded-*.pt")), "the decode was cached in FER_EXP_CACHE_DIR"
    second = load_data(str(root))
    assert second.from_cache
    for name in ("train", "val", "test"):
        a, b = getattr(first, name), getattr(second, name)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.sources == b.sources
        assert b.images.dtype == torch.uint8 and b.labels.dtype == torch.int64
    assert second.report == first.report and second.report.ignored == ["train/.DS_Store"]
    assert second.split_rule == first.split_rule and second.format == first.format

    result = inspect(root)
    assert result.exit_code == 0 and "(cache)" in result.output
    assert "(decoded)" in inspect(root, "--no-cache").output


def test_cache_is_invalidated_when_the_source_changes(tmp_path):
    root = make_folders(tmp_path / "faces", train=10, test=2)
    assert not load_data(str(root)).from_cache
    assert load_data(str(root)).from_cache

    # a new file
    write_image(root / "train" / "happy" / "new.png", CLASS_VALUE[3])
    added = load_data(str(root))
    assert not added.from_cache
    assert len(added.train) + len(added.val) == 71
    assert load_data(str(root)).from_cache

    # a touched file (same bytes, new mtime)
    target = root / "test" / "sad" / "PublicTest_0000.png"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert not load_data(str(root)).from_cache
    assert load_data(str(root)).from_cache

    # a modified file (new content and mtime): the new pixels are loaded
    write_image(target, 77)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000_000))
    changed = load_data(str(root))
    assert not changed.from_cache
    index = changed.test.sources.index("test/sad/PublicTest_0000.png")
    assert changed.test.images[index].unique().tolist() == [77]

    # a removed file
    (root / "train" / "happy" / "new.png").unlink()
    removed = load_data(str(root))
    assert not removed.from_cache and len(removed.train) + len(removed.val) == 70


def test_csv_cache_is_invalidated_when_the_csv_changes(tmp_path):
    path = write_csv(tmp_path / "fer2013.csv", usage_rows({"Training": 2, "PublicTest": 1, "PrivateTest": 1}))
    first = load_data(str(path))
    assert not first.from_cache and load_data(str(path)).from_cache
    with path.open("a") as f:
        f.write(f"3,{GOOD},Training\n")
    grown = load_data(str(path))
    assert not grown.from_cache and len(grown.train) == 15
    assert grown.train.sources[-1] == "fer2013.csv#row29"


def test_no_cache_neither_reads_nor_writes_it(tmp_path, isolated_cache):
    root = make_folders(tmp_path / "faces", train=10, test=1)
    data = load_data(str(root), use_cache=False)
    assert not data.from_cache
    assert not isolated_cache.exists() or not list(isolated_cache.iterdir())
    load_data(str(root))
    assert not load_data(str(root), use_cache=False).from_cache


def test_a_corrupt_cache_file_is_decoded_again(tmp_path, isolated_cache):
    root = make_folders(tmp_path / "faces", train=10, test=1)
    first = load_data(str(root))
    [cached] = isolated_cache.glob("decoded-*.pt")
    cached.write_bytes(b"not a torch file")
    again = load_data(str(root))
    assert not again.from_cache
    assert torch.equal(again.train.images, first.train.images)
    assert load_data(str(root)).from_cache


def test_a_cache_file_changed_but_still_loadable_is_not_trusted(tmp_path, isolated_cache):
    """Bytes flipped inside the cached pixels or labels (a bad disk, a stray write) still load as a
    torch file; its digest tells, and the source is decoded again rather than trained on wrong data."""
    root = make_folders(tmp_path / "faces", train=10, test=1)
    first = load_data(str(root))
    [cached] = isolated_cache.glob("decoded-*.pt")
    content = bytearray(cached.read_bytes())
    middle = len(content) // 2
    content[middle:middle + 100] = bytes(255 - b for b in content[middle:middle + 100])  # inside the pixels
    cached.write_bytes(bytes(content))
    again = load_data(str(root))
    assert not again.from_cache and torch.equal(again.train.images, first.train.images)
    assert torch.equal(again.train.labels, first.train.labels) and load_data(str(root)).from_cache


def test_cache_keeps_the_skip_report_and_is_separate_per_on_bad(tmp_path):
    root = make_folders(tmp_path / "faces", train=10, test=1)
    (root / "train" / "angry" / "broken.jpg").write_bytes(b"garbage")
    first = load_data(str(root), on_bad="skip")
    second = load_data(str(root), on_bad="skip")
    assert second.from_cache
    assert second.report.skipped == first.report.skipped
    assert second.report.skipped[0][0] == "train/angry/broken.jpg"
    with pytest.raises(DataError, match="broken.jpg"):  # a cached skip decode does not hide the error
        load_data(str(root), on_bad="error")


def test_a_training_says_what_on_bad_skip_skipped(tmp_path, capsys):
    """train, tune and study load their data through load_run_data: the skipped files are said on screen,
    not only in the run's data_summary.json, from the cache too, and once in a process (a study loads its
    data for each seed)."""
    from fer_exp import experiment
    from fer_exp.config import load_config

    root = make_folders(tmp_path / "faces", train=10, test=1)
    (root / "train" / "angry" / "broken.jpg").write_bytes(b"garbage")
    cfg = load_config(overrides={"data": str(root), "on_bad": "skip"})
    for decoded in (True, False):  # decoded, then from the cache in a new process (here: the record cleared)
        experiment._said.discard(("skipped", cfg.data_key()))
        assert experiment.load_run_data(cfg).from_cache is not decoded
        assert "skipped 1 bad sample(s) (--on-bad skip): train/angry/broken.jpg" in capsys.readouterr().err
    experiment.load_run_data(cfg)
    assert "skipped" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 7. bad input in folders and paths


def truncated_jpeg(path: Path) -> None:
    data = noise_jpeg_bytes()
    path.write_bytes(data[: len(data) // 2])


FOLDER_BAD = {
    # id: (make it bad, file named in the message, what the message says was expected)
    "unknown-class-folder": (lambda r: write_image(r / "train" / "Contempt" / "a.png"),
                             "train/Contempt", ["unknown class folder 'Contempt'", "angry, disgust"]),
    "stray-file-in-split": (lambda r: (r / "train" / "labels.txt").write_text("x"),
                            "train/labels.txt", ["stray file", "class folders"]),
    "stray-non-image": (lambda r: (r / "train" / "happy" / "notes.txt").write_text("x"),
                        "train/happy/notes.txt", ["is not an image", ".jpg"]),
    "not-an-image": (lambda r: (r / "test" / "fear" / "fake.jpg").write_bytes(b"this is not a jpeg"),
                     "test/fear/fake.jpg", ["cannot be decoded as an image"]),
    "truncated-jpeg": (lambda r: truncated_jpeg(r / "train" / "sad" / "cut.jpg"),
                       "train/sad/cut.jpg", ["cannot be decoded as an image", "truncated"]),
    "empty-image-file": (lambda r: (r / "train" / "sad" / "empty.png").write_bytes(b""),
                         "train/sad/empty.png", ["cannot be decoded as an image"]),
    "folder-in-class-folder": (lambda r: (r / "train" / "sad" / "sub.png").mkdir(),
                               "train/sad/sub.png", ["is not an image file"]),
    "broken-link": (lambda r: os.symlink(r / "nowhere.png", r / "train" / "sad" / "link.png"),
                    "train/sad/link.png", ["is not an image file"]),
}


@pytest.mark.parametrize("case", FOLDER_BAD, ids=list(FOLDER_BAD))
def test_folder_bad_input_stops_with_dataerror_naming_the_file(tmp_path, case):
    spoil, where, fragments = FOLDER_BAD[case]
    root = make_folders(tmp_path / "faces", train=10, test=2)
    spoil(root)
    with pytest.raises(DataError) as info:
        load_data(str(root))
    message = str(info.value)
    assert message.startswith(f"{where}:")
    for fragment in fragments:
        assert fragment in message
    assert "--on-bad skip" in message
    assert_cli_error(root, where, *fragments)

    # skip: the bad sample is reported and every good image still loads
    data = load_data(str(root), on_bad="skip")
    assert [w for w, _ in data.report.skipped] == [where]
    assert len(data.train) + len(data.val) == 70 and len(data.test) == 14
    result = inspect(root, "--on-bad", "skip")
    assert result.exit_code == 0, result.output
    assert "skipped 1 bad sample(s)" in result.output and where in result.output


def test_unreadable_image_stops_with_dataerror(tmp_path, monkeypatch):
    """A file that cannot be read (permissions; simulated, since tests may run as root)."""
    root = make_folders(tmp_path / "faces", train=10, test=1)
    locked = root / "train" / "happy" / "Training_0003.png"
    real_read_bytes = Path.read_bytes

    def read_bytes(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(DataError, match=r"^train/happy/Training_0003.png: cannot be decoded.*Permission denied"):
        load_data(str(root), use_cache=False)
    data = load_data(str(root), on_bad="skip", use_cache=False)
    assert [w for w, _ in data.report.skipped] == ["train/happy/Training_0003.png"]
    assert len(data.train) + len(data.val) == 69


def test_on_bad_skip_reports_every_bad_sample_and_keeps_the_good_ones(tmp_path):
    root = make_folders(tmp_path / "faces", train=10, test=2)
    (root / "train" / "angry" / "x.jpg").write_bytes(b"nope")
    truncated_jpeg(root / "test" / "happy" / "y.jpg")
    (root / "train" / "happy" / "z.txt").write_text("z")
    write_image(root / "test" / "contempt" / "c.png")
    data = load_data(str(root), on_bad="skip")
    assert sorted(w for w, _ in data.report.skipped) == sorted(
        ["train/angry/x.jpg", "test/happy/y.jpg", "train/happy/z.txt", "test/contempt"])
    assert len(data.train) + len(data.val) == 70 and len(data.test) == 14
    assert data.test.labels.tolist() == labels_from_pixels(data.test.images)
    summary = json.loads(inspect(root, "--on-bad", "skip", "--json").output)
    assert len(summary["skipped"]) == 4
    assert all(set(s) == {"where", "why"} and s["why"] for s in summary["skipped"])


def test_hidden_files_are_ignored_but_listed(tmp_path):
    root = make_folders(tmp_path / "faces", train=10, test=1)
    (root / "train" / ".DS_Store").write_bytes(b"\0\1")
    (root / "train" / "happy" / ".DS_Store").write_bytes(b"\0\1")
    (root / "test" / "sad" / "._PublicTest_0000.png").write_bytes(b"AppleDouble")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    data = load_data(str(root))  # on_bad="error": hidden files are not errors
    assert sorted(data.report.ignored) == sorted(
        ["train/.DS_Store", "train/happy/.DS_Store", "test/sad/._PublicTest_0000.png", "train/.ipynb_checkpoints"])
    assert not data.report.skipped
    assert len(data.train) + len(data.val) == 70 and len(data.test) == 7
    assert all(".DS_Store" not in s for s in data.train.sources + data.val.sources)
    assert sorted(data.summary()["ignored"]) == sorted(data.report.ignored)
    assert "ignored 4 hidden file(s)" in inspect(root).output


def test_empty_train_split(tmp_path):
    root = tmp_path / "faces"
    for name in CLASS_NAMES:
        (root / "train" / name).mkdir(parents=True)
    make_folders(root, train=None, test=1)
    with pytest.raises(DataError, match="train split is empty.*train/ folder"):
        load_data(str(root))
    assert_cli_error(root, "train split is empty")


def test_missing_test_folder(tmp_path):
    root = make_folders(tmp_path / "faces", train=10, test=None)
    with pytest.raises(DataError, match=r"test split is empty \(no images in test/\)"):
        load_data(str(root))
    assert_cli_error(root, "test split is empty")


def test_test_folder_with_class_folders_but_no_images(tmp_path):
    root = make_folders(tmp_path / "faces", train=10, test=0)
    (root / "test" / "angry").mkdir(parents=True)
    with pytest.raises(DataError, match="test split is empty"):
        load_data(str(root))


def test_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=r"nope: no such file or folder.*Expected one of"):
        load_data(str(missing))
    assert_cli_error(missing, "no such file or folder", "fer2013.csv", "train/<class>")


def test_unknown_layout(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "readme.md").write_text("hi")
    (junk / "photos").mkdir()
    write_image(junk / "photos" / "a.png")
    with pytest.raises(DataError, match=r"junk: unknown layout \(found photos, readme.md\).*Expected one of"):
        load_data(str(junk))
    assert_cli_error(junk, "unknown layout", "photos")


def test_the_default_data_path_missing_says_where_to_get_fer2013(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data/fer2013 is the default --data: the README's 'Get FER2013'"):
        load_data("data/fer2013")
    with pytest.raises(DataError) as other:
        load_data("elsewhere/fer2013")
    assert "default" not in str(other.value)


def test_empty_folder_and_non_csv_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"unknown layout \(found nothing\)"):
        load_data(str(tmp_path / "empty"))
    image = write_image(tmp_path / "face.png")
    with pytest.raises(DataError, match="face.png: is a file but not a .csv"):
        load_data(str(image))
    assert_cli_error(image, "not a .csv")
    root = make_folders(tmp_path / "kaggle", train=2, test=1)
    with pytest.raises(DataError, match=r"These are class folders, so .*train is one split: give the folder above it"):
        load_data(str(root / "train"))
    (tmp_path / "fer2013.tar.gz").write_bytes(b"\x1f\x8b")  # the challenge's download, given as it is
    with pytest.raises(DataError, match=r"not a .csv \(an archive: extract it first"):
        load_data(str(tmp_path / "fer2013.tar.gz"))


@pytest.mark.parametrize("kwargs, fragment", [
    ({"on_bad": "ignore"}, "--on-bad must be one of"),
    ({"val_fraction": 0.0}, "val_fraction must be strictly between 0 and 1"),
    ({"val_fraction": 1.5}, "val_fraction must be strictly between 0 and 1"),
    ({"seed": -1}, "seed must be"),
    ({"duplicates": "remove"}, "--duplicates must be one of report, drop"),
])
def test_bad_options(tmp_path, kwargs, fragment):
    root = make_folders(tmp_path / "faces", train=10, test=1)
    with pytest.raises(DataError, match=fragment):
        load_data(str(root), **kwargs)


def test_bad_cli_options_exit_2_without_traceback(tmp_path):
    root = make_folders(tmp_path / "faces", train=10, test=1)
    assert_cli_error(root, "val_fraction", args=("--val-fraction", "0"))
    assert_cli_error(root, "seed must be", args=("--seed", "-1"))
    assert_cli_error("synthetic:10,2,2", "seed must be", args=("--seed", "-1"))
    result = inspect(root, "--on-bad", "ignore")
    assert result.exit_code == 2 and "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# 3. synthetic


@pytest.fixture(scope="module")
def synthetic_big() -> FerData:
    return load_data("synthetic:2000,10,700", seed=0)


def test_synthetic_is_deterministic_per_seed():
    a = load_data("synthetic:60,20,20", seed=0)
    b = load_data("synthetic:60,20,20", seed=0)
    c = load_data("synthetic:60,20,20", seed=1)
    assert_well_formed(a)
    assert a.format == "synthetic" and "seed 0" in a.split_rule
    assert [len(a.train), len(a.val), len(a.test)] == [60, 20, 20]
    for name in ("train", "val", "test"):
        x, y, z = getattr(a, name), getattr(b, name), getattr(c, name)
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels) and x.sources == y.sources
        assert not torch.equal(x.images, z.images)
    assert not torch.equal(a.train.images[:20], a.val.images)  # the splits are different draws
    assert not torch.equal(a.val.images, a.test.images)
    assert a.train.sources[:2] == ["synthetic:train:0", "synthetic:train:1"]
    assert not a.from_cache


def test_synthetic_default_sizes_via_cli():
    result = inspect("synthetic", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["format"] == "synthetic"
    assert summary["sizes"] == {"train": 3000, "val": 600, "test": 600}
    assert summary["image_size"] == [48, 48]


def test_synthetic_class_proportions_are_like_fer2013(synthetic_big):
    counts = np.array(synthetic_big.train.class_counts())
    assert counts.sum() == 2000
    assert counts.argmin() == CLASS_NAMES.index("disgust")
    assert counts.argmax() == CLASS_NAMES.index("happy")
    fer = np.array(FER2013_TRAIN_COUNTS) / sum(FER2013_TRAIN_COUNTS)
    np.testing.assert_allclose(counts / counts.sum(), fer, atol=0.035)


def test_synthetic_classes_are_not_separable_by_mean_brightness(synthetic_big):
    def brightness(split):
        return split.images.float().mean(dim=(1, 2)).numpy()

    x_train, y_train = brightness(synthetic_big.train), synthetic_big.train.labels.numpy()
    x_test, y_test = brightness(synthetic_big.test), synthetic_big.test.labels.numpy()

    def ncm_balanced_accuracy(x_tr, x_te):
        means = np.array([x_tr[y_train == c].mean() for c in range(NUM_CLASSES)])
        pred = np.abs(x_te[:, None] - means[None]).argmin(1)
        return np.mean([(pred[y_test == c] == c).mean() for c in range(NUM_CLASSES) if (y_test == c).any()])

    def class_mean_spread(x_tr):  # over the classes with enough samples for a stable mean
        means = [x_tr[y_train == c].mean() for c in range(NUM_CLASSES) if (y_train == c).sum() >= 150]
        return (max(means) - min(means)) / x_tr.std()

    # nearest class mean on brightness alone is at chance (1/7 = 0.14)
    assert ncm_balanced_accuracy(x_train, x_test) < 0.2
    # per-class mean brightness differs by little next to the spread within a class
    assert class_mean_spread(x_train) < 0.3
    # ...and both checks notice a brightness that carries the class (controls)
    assert ncm_balanced_accuracy(x_train + 20.0 * y_train, x_test + 20.0 * y_test) > 0.25
    assert class_mean_spread(x_train + 5.0 * y_train) > 0.5


def test_synthetic_images_are_faces_not_noise(synthetic_big):
    images = synthetic_big.train.images.float()
    assert images.std() > 20  # a lit face on a background, not a constant
    assert len({tuple(img.flatten()[:64].tolist()) for img in synthetic_big.train.images[:50]}) == 50


@pytest.mark.parametrize("spec", ["synthetic:", "synthetic:10,2", "synthetic:10,2,2,2", "synthetic:a,b,c",
                                  "synthetic:0,2,2", "synthetic:10,-2,2", "synthetic:10;2;2", "synthetic:1.5,2,2"])
def test_bad_synthetic_spec(spec):
    with pytest.raises(DataError, match="bad synthetic spec.*synthetic:TRAIN,VAL,TEST"):
        load_data(spec)
    assert_cli_error(spec, "bad synthetic spec")


# ---------------------------------------------------------------------------------------------
# 8. data inspect output


def table_rows(output: str) -> dict[str, list[int]]:
    rows = {}
    for line in output.splitlines():
        parts = line.split()
        if parts and parts[0] in ("train", "val", "test") and all(p.isdigit() for p in parts[1:]) and len(parts) == 9:
            rows[parts[0]] = [int(p) for p in parts[1:]]
    return rows


def test_inspect_prints_format_rule_table_size_and_imbalance(tmp_path):
    root = make_folders(tmp_path / "faces", train=STRATA, test=[2, 1, 2, 3, 2, 2, 2])
    from fer_exp.config import Config

    data = load_data(str(root), seed=Config().seed)  # inspect shows the split training makes by default
    result = inspect(root)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "format:      folder" in out
    assert f"split rule:  {data.split_rule}" in out
    assert "image size:  48x48" in out
    header = next(line for line in out.splitlines() if line.startswith("split ") and "rule" not in line)
    assert header.split() == ["split", *CLASS_NAMES, "total"]
    rows = table_rows(out)
    assert rows == {
        "train": [n - n // 10 for n in STRATA] + [198],
        "val": [n // 10 for n in STRATA] + [22],
        "test": [2, 1, 2, 3, 2, 2, 2, 14],
    }
    assert "class imbalance (train, largest/smallest class): 5.0" in out  # 45 / 9


def test_inspect_json_has_the_summary_keys(tmp_path):
    path = write_csv(tmp_path / "fer2013.csv", usage_rows({"Training": 2, "PublicTest": 1, "PrivateTest": 1})
                     + [(3, "Training")] * 4)
    result = inspect(path, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    for key in ("source", "format", "split_rule", "image_size", "sizes", "class_counts", "imbalance_ratio",
                "converted_to_gray", "resized", "skipped", "ignored", "from_cache", "load_seconds"):
        assert key in summary
    assert summary["format"] == "csv"
    assert summary["split_rule"] == "train = Training; val = PublicTest; test = PrivateTest"
    assert summary["image_size"] == [48, 48]
    assert summary["sizes"] == {"train": 18, "val": 7, "test": 7}
    assert summary["class_counts"]["train"] == {"angry": 2, "disgust": 2, "fear": 2, "happy": 6, "sad": 2,
                                                "surprise": 2, "neutral": 2}
    assert summary["class_counts"]["val"] == dict.fromkeys(CLASS_NAMES, 1)
    assert summary["imbalance_ratio"] == 3.0
    assert summary["from_cache"] is False
    assert json.loads(inspect(path, "--json").output)["from_cache"] is True


def test_faces_copied_across_splits_are_counted_and_said(tmp_path):
    """FER2013 holds faces whose pixels are in two splits (266 PublicTest faces are in Training, 10 of them
    labelled otherwise): inspect and a run's data summary say how many, per pair of splits."""
    def text(label, row):
        return " ".join(map(str, pixel_row(label, row).ravel().tolist()))

    rows = [(label, "Training") for label in range(7) for _ in range(2)]  # rows 1-14, all distinct
    rows += [(0, text(0, 1), "PublicTest"), (1, "PublicTest"), (5, text(0, 2), "PrivateTest"), (2, "PrivateTest")]
    path = write_csv(tmp_path / "fer2013.csv", rows)
    found = load_data(str(path)).duplicates_across_splits()
    assert found == {"val in train": {"images": 1, "other_label": 0, "examples": ["fer2013.csv#row15 = fer2013.csv#row1"]},
                     "test in train": {"images": 1, "other_label": 1, "examples": ["fer2013.csv#row17 = fer2013.csv#row2"]}}
    out = inspect(path).output
    assert "test in train: 1 image(s) with pixels identical to one there (1 labelled otherwise)" in out
    assert json.loads(inspect(path, "--json").output)["duplicates_across_splits"] == found


def test_duplicates_drop_removes_the_copies_from_train_and_val_and_keeps_test_whole(tmp_path):
    """--duplicates drop: a train face identical to a val or test face is not trained on, a val face
    identical to a test face does not select the epoch; test is FER2013's own, every face kept."""
    def text(label, row):
        return " ".join(map(str, pixel_row(label, row).ravel().tolist()))

    rows = [(label, "Training") for label in range(7) for _ in range(2)]  # rows 1-14, all distinct
    rows += [(0, text(0, 1), "Training")]  # row 15: row 1 again (a copy within train stays apart from val)
    rows += [(0, text(0, 1), "PublicTest"), (1, "PublicTest"), (3, "PublicTest")]  # 16 copies rows 1 and 15
    rows += [(5, text(0, 2), "PrivateTest"), (2, text(3, 18), "PrivateTest"), (4, "PrivateTest")]  # 19: row 2, 20: row 18
    path = write_csv(tmp_path / "fer2013.csv", rows)
    kept = load_data(str(path))
    data = load_data(str(path), duplicates="drop")
    assert data.test.sources == kept.test.sources and torch.equal(data.test.images, kept.test.images)
    assert [s.split("#row")[1] for s in data.train.sources] == [str(r) for r in range(3, 15)]  # 1, 2 and 15 gone
    assert [s.split("#row")[1] for s in data.val.sources] == ["16", "17"]  # 18 is test's row 20
    assert data.duplicates_across_splits() == {}  # none left
    assert kept.copied("test").tolist() == data.copied("test").tolist() == [True, True, False]  # as in the source
    assert kept.copied("val").tolist() == [True, False, False]  # row 16 is row 1 (and 15) of train
    assert data.copied("val").tolist() == [True, False]  # row 18 dropped (test's row 20)
    assert data.duplicates_dropped == {"train": 3, "val": 1}
    assert data.split_rule == ("train = Training; val = PublicTest; test = PrivateTest; dropped 3 train face(s) identical "
                               "to a val or test face and 1 val face(s) identical to a test face (duplicates: drop)")
    assert data.summary()["duplicates_dropped"] == {"train": 3, "val": 1} and kept.summary()["duplicates_dropped"] == {}
    assert data.summary()["faces_with_copies"] == {"val": 1, "test": 2} == kept.summary()["faces_with_copies"]
    assert "test: 2 of 3 faces (66.7%) have a copy in train or val" in inspect(path).output
    out = inspect(path, "--duplicates", "drop").output
    assert "test: 2 of 3 faces (66.7%) have a copy in the source's train or val (dropped from them)" in out
    assert "dropped as copies of a later split's faces (--duplicates drop): 3 from train, 1 from val" in out
    assert "train       " in out and "in train:" not in out
    assert "(--duplicates drop removes such copies from train and val; test stays whole)" in inspect(path).output


def test_near_copies_count_as_copies_at_a_copy_correlation_below_1(tmp_path, monkeypatch):
    """FER2013 also holds near-copies (the same photo cropped, recompressed or watermarked: 93 test faces
    correlate at 0.95 or more with a training face here). At --copy-correlation 0.95 they are copies
    like the pixel-identical ones: counted (apart, with examples), left out of the uncopied scores'
    faces, and dropped from train and val by --duplicates drop; at 1 (the default) they are not."""
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (20, 48, 48))

    def near(i):  # face i, slightly changed: correlation ~0.997
        return np.clip(faces[i] + rng.integers(-8, 9, (48, 48)), 0, 255)

    def text(pixels):
        return " ".join(map(str, np.asarray(pixels).ravel().tolist()))

    val16 = near(7)
    rows = [(i % 7, text(faces[i]), "Training") for i in range(14)]  # rows 1-14
    rows += [(0, text(faces[14]), "PublicTest"), (1, text(val16), "PublicTest")]  # 15; 16 nearly train's row 8
    rows += [(3, text(near(3)), "PrivateTest"), (2, text(faces[5]), "PrivateTest"),  # 17 nearly row 4; 18 = row 6
             (4, text(faces[16]), "PrivateTest"), (1, text(val16), "PrivateTest")]  # 19 new; 20 = val's row 16
    path = write_csv(tmp_path / "fer2013.csv", rows)
    exact = load_data(str(path))
    assert exact.copied("test").tolist() == [False, True, False, True] and not exact.copied("val").any()
    assert "near_copies" not in exact.summary() and exact.summary()["copy_correlation"] == 1.0
    data = load_data(str(path), copy_correlation=0.95)
    assert data.copied("test").tolist() == [True, True, False, True] and data.copied("val").tolist() == [False, True]
    found = data.near_copies()
    assert found["val"]["images"] == 1 and found["test"]["images"] == 1  # rows 18 and 20 are identical: not near
    example = found["test"]["examples"][0]
    assert example.startswith("fer2013.csv#row17 ~ fer2013.csv#row4 (") and 0.95 < float(example[-6:-1]) < 1
    assert found["val"]["examples"][0].startswith("fer2013.csv#row16 ~ fer2013.csv#row8 (")
    summary = data.summary()
    assert summary["faces_with_copies"] == {"val": 1, "test": 3} and summary["near_copies"] == found
    # drop: train rows 6 (copied by test) and 4 and 8 (nearly copied by test and val) go, and val's row 16 (copied by test)
    dropped = load_data(str(path), duplicates="drop", copy_correlation=0.95)
    assert [s.split("#row")[1] for s in dropped.train.sources] == [str(r) for r in range(1, 15) if r not in (4, 6, 8)]
    assert [s.split("#row")[1] for s in dropped.val.sources] == ["15"] and len(dropped.test) == 4
    assert dropped.copied("test").tolist() == [True, True, False, True] and dropped.copied("val").tolist() == [False]
    kept = dropped.summary()  # counts of the faces kept, as faces_with_copies: val's near-copy was dropped
    assert kept["near_copies"] == {"val": {"images": 0, "examples": []}, "test": found["test"]}
    assert kept["faces_with_copies"] == {"val": 0, "test": 3}
    assert dropped.split_rule.endswith("dropped 3 train face(s) identical or correlating >= 0.95 with a val or test face "
                                       "and 1 val face(s) identical or correlating >= 0.95 with a test face (duplicates: drop)")
    assert load_data(str(path), duplicates="drop").duplicates_dropped == {"train": 1, "val": 1}  # identical only
    out = inspect(path, "--copy-correlation", "0.95").output
    assert "test: 3 of 4 faces (75.0%) have a copy (identical, or correlating >= 0.95) in train or val" in out
    assert "test: 1 face(s) nearly copy one of train or val (pixel correlation >= 0.95, not identical; counted as copies)" in out
    assert "val: 1 face(s) nearly copy one of train" in out and "(--duplicates drop removes such copies" in out
    assert json.loads(inspect(path, "--json", "--copy-correlation", "0.95").output)["near_copies"]["test"]["images"] == 1
    out = inspect(path, "--copy-correlation", "0.95", "--duplicates", "drop").output
    assert "dropped as copies of a later split's faces (--duplicates drop): 3 from train, 1 from val" in out
    assert "val: 0 face(s)" not in out and "(--duplicates drop removes such copies" not in out  # done already
    assert "test: 1 face(s) nearly copy one of the source's train or val (dropped from it)" in out
    assert "nearly copy" not in inspect(path).output
    for bad in ("1.5", "0"):
        refused = inspect(path, "--copy-correlation", bad)
        assert refused.exit_code == 2 and "--copy-correlation" in refused.output
    with pytest.raises(DataError, match="copy_correlation must be above 0 and at most 1"):
        load_data(str(path), copy_correlation=1.2)
    # every pair correlated once: later loads of the same faces read the correlations from the cache
    from fer_exp.data.dataset import FerData

    def not_again(self):
        raise AssertionError("correlated again")
    monkeypatch.setattr(FerData, "_compute_correlations", not_again)
    again = load_data(str(path), copy_correlation=0.9)  # any correlation: the same saved maxima
    assert again.copied("test").tolist() == [True, True, False, True] and again.near_copies() == found
    for saved in (Path(os.environ["FER_EXP_CACHE_DIR"])).glob("correlations-*"):
        saved.write_bytes(saved.read_bytes()[:-10])  # cut short: not trusted, computed again
    monkeypatch.undo()
    assert load_data(str(path), copy_correlation=0.95).near_copies() == found


def test_duplicates_drop_on_a_hold_out_keeps_no_copy_of_a_val_or_test_face_in_train(tmp_path):
    """Where val is a seeded hold-out of train, copies of one face may land on both sides of it: drop keeps
    every copy out of train. make_folders' images are uniform per class, so each class is one face."""
    root = make_folders(tmp_path / "faces", train=[10, 10, 10, 10, 10, 10, 0], test=[0, 0, 0, 0, 0, 2, 0])
    write_image(root / "train" / "neutral" / "Training_other.png", 250)  # a neutral face the test lacks
    write_image(root / "train" / "neutral" / "Training_other2.png", 251)
    data = load_data(str(root), duplicates="drop", val_fraction=0.3)
    assert set(labels_from_pixels(data.test.images)) == {5} and len(data.test) == 2
    train_faces = {bytes(image.flatten().tolist()) for image in data.train.images}
    assert not train_faces & {bytes(image.flatten().tolist()) for image in torch.cat([data.val.images, data.test.images])}
    assert 5 not in data.train.labels.tolist() and 5 not in data.val.labels.tolist()
    assert sum(data.duplicates_dropped.values()) == 62 - len(data.train) - len(data.val)  # 62 train images
    with pytest.raises(DataError, match="every train face is a copy of a later split's face.*use duplicates: report"):
        load_data(str(make_folders(tmp_path / "same", train=4, test=1)), duplicates="drop", val_fraction=0.5)


def test_inspect_seed_and_val_fraction_options(tmp_path):
    root = make_folders(tmp_path / "faces", train=STRATA, test=1)
    s0 = json.loads(inspect(root, "--json").output)
    s1 = json.loads(inspect(root, "--json", "--seed", "1", "--val-fraction", "0.2").output)
    assert "seed 42" in s0["split_rule"] and "seed 1" in s1["split_rule"]
    assert s0["sizes"]["val"] == 22 and s1["sizes"]["val"] == 44


# ---------------------------------------------------------------------------------------------
# 9. the real FER2013 (../shared/fer2013), skipped where absent

real_data = pytest.mark.skipif(not REAL.is_dir(), reason=f"real FER2013 not found at {REAL}")

REAL_TRAIN = {"angry": 3995, "disgust": 436, "fear": 4097, "happy": 7215, "sad": 4830, "surprise": 3171,
              "neutral": 4965}
REAL_TEST = {"angry": 467, "disgust": 56, "fear": 496, "happy": 895, "sad": 653, "surprise": 415, "neutral": 607}


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory) -> Path:
    """One decode cache for the whole session: the real folders take ~15-20 s to decode."""
    return tmp_path_factory.mktemp("real-fer2013-cache")


@pytest.fixture(scope="session")
def real_folder_data(real_cache) -> FerData:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FER_EXP_CACHE_DIR", str(real_cache))
        return load_data(str(REAL))


@pytest.mark.realdata
@real_data
def test_real_fer2013_folders_have_the_exact_class_counts(real_folder_data):
    data = real_folder_data
    assert_well_formed(data)
    assert data.format == "folder"
    train = [a + b for a, b in zip(data.train.class_counts(), data.val.class_counts())]
    assert dict(zip(CLASS_NAMES, train)) == REAL_TRAIN
    assert sum(train) == 28_709
    assert dict(zip(CLASS_NAMES, data.test.class_counts())) == REAL_TEST
    assert len(data.test) == 3_589
    assert all(Path(s).name.startswith("PublicTest_") for s in data.test.sources)
    assert "hold-out" in data.split_rule and data.split_rule.endswith("test = test/")
    assert len(data.val) == 2_871  # ceil(10% of 28,709)
    assert data.report.converted_to_gray == 0 and data.report.resized == 0 and not data.report.skipped
    # FER2013's copies: PublicTest faces whose pixels are in Training (with seed 0's hold-out here)
    copies = data.duplicates_across_splits()  # seed 0's hold-out: 261 in train, 33 in val (seed 42: 266, 24)
    assert 240 < copies["test in train"]["images"] < 300 and copies["test in train"]["other_label"] >= 5
    assert copies["test in val"]["images"] > 10 and copies["val in train"]["images"] > 100
    dropped = real_folder_data.without_duplicates()  # duplicates: drop
    assert dropped.duplicates_across_splits() == {} and len(dropped.test) == 3_589
    assert 500 < dropped.duplicates_dropped["train"] < 700 and 10 < dropped.duplicates_dropped["val"] < 40
    near = dataclasses.replace(data, copy_correlation=0.95)  # the same faces, copies counted at 0.95
    assert 80 < near.near_copies()["test"]["images"] < 110  # 93 here: the same photos, cropped or watermarked
    assert near.without_duplicates().duplicates_dropped["train"] > dropped.duplicates_dropped["train"] + 200


@pytest.mark.realdata
@real_data
def test_real_fer2013_loads_from_the_cache_the_second_time(real_folder_data, real_cache, monkeypatch):
    monkeypatch.setenv("FER_EXP_CACHE_DIR", str(real_cache))
    again = load_data(str(REAL))
    assert again.from_cache
    assert again.val.sources == real_folder_data.val.sources
    assert torch.equal(again.test.images, real_folder_data.test.images)
    summary = json.loads(inspect(REAL, "--json").output)
    assert summary["from_cache"] is True
    assert summary["class_counts"]["test"] == REAL_TEST


@pytest.mark.realdata
@real_data
def test_real_fer2013_sample_csv(real_cache, monkeypatch):
    monkeypatch.setenv("FER_EXP_CACHE_DIR", str(real_cache))
    data = load_data(str(REAL / "fer2013_sample.csv"))
    assert_well_formed(data)
    assert data.format == "csv"
    assert len(data.train) + len(data.val) + len(data.test) == 1_400
    assert [a + b for a, b in zip(data.train.class_counts(), data.val.class_counts())] == [150] * 7
    assert data.test.class_counts() == [50] * 7  # PublicTest rows
    assert data.val.class_counts() == [15] * 7  # stratified 10% of Training
    assert all(s.startswith("fer2013_sample.csv#row") for s in data.test.sources)
