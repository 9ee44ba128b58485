"""``fer-exp predict``: the emotion of every face in the user's own images, with one or more trained
models (averaged) and optional test-time augmentation. Images are prepared exactly as training data
(:mod:`fer_exp.data.images`); with face detection each face is cropped first (:mod:`fer_exp.faces`)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fer_exp.classes import CLASS_NAMES
from fer_exp.data.formats import IMAGE_EXTENSIONS
from fer_exp.data.images import ImageDecodeError, read_gray, to_model_size
from fer_exp.inference import LoadedModel, ensemble_probabilities

OUTPUT_SUFFIXES = (".csv", ".json")
COLUMNS = ("source", "face", "x", "y", "width", "height", "emotion", "confidence",
           *(f"prob_{c}" for c in CLASS_NAMES))


class PredictError(ValueError):
    """Nothing to predict on, or an output that cannot be written; says what to do."""


@dataclass
class PredictResult:
    frame: pd.DataFrame  # one row per face (with --detect-faces) or per image
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why): unreadable
    no_face: list[str] = field(default_factory=list)  # images where detection found no face
    seconds: float = 0.0


def check_paths(paths: list[str]) -> None:
    """Every path named exists: a typo stops the command before a model is loaded or an image predicted."""
    missing = [raw for raw in paths if not Path(raw).exists()]
    if missing:
        raise PredictError(f"no such file or folder: {', '.join(missing)}; check the path{'s' if len(missing) > 1 else ''} "
                           "(nothing was predicted)")


def list_images(paths: list[str]) -> list[Path]:
    """The image files among ``paths`` (folders searched recursively for image extensions)."""
    check_paths(paths)
    files = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        else:
            files.append(path)
    return list(dict.fromkeys(files))  # a file named and also found in a folder named: predicted once


def predict_images(models: list[LoadedModel], paths: list[str], *, detect_faces: bool = False, tta: str = "none",
                   show_dir: str | None = None, progress: bool = True) -> PredictResult:
    """Predict the emotion of each image (or each detected face) under ``paths``."""
    from tqdm.auto import tqdm

    from fer_exp.faces import crop
    from fer_exp.faces import detect_faces as find_faces

    files, skipped = list_images(paths), []
    if not files:
        raise PredictError(f"no images found in {', '.join(paths)} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    start = time.perf_counter()
    crops, rows, no_face = [], [], []
    for path in tqdm(files, desc="reading images", unit="img", disable=not progress or None, leave=False):
        try:
            gray, _ = read_gray(path)
        except ImageDecodeError as exc:
            skipped.append((str(path), str(exc)))
            continue
        height, width = gray.shape
        boxes = find_faces(gray) if detect_faces else [(0, 0, width, height)]
        if not boxes:
            no_face.append(str(path))
        for index, box in enumerate(boxes):
            crops.append(to_model_size(crop(gray, box))[0])
            rows.append({"source": str(path), "face": index if detect_faces else -1,
                         "x": box[0], "y": box[1], "width": box[2], "height": box[3]})
    if not rows and not no_face:
        raise PredictError("none of the images could be read: " + "; ".join(f"{w}: {y}" for w, y in skipped[:3]))
    if crops:
        probabilities, _ = ensemble_probabilities(models, torch.from_numpy(np.stack(crops)), tta)
    else:
        probabilities = np.zeros((0, len(CLASS_NAMES)), np.float32)
    frame = pd.DataFrame(rows, columns=list(COLUMNS[:6]))
    frame["emotion"] = [CLASS_NAMES[i] for i in probabilities.argmax(1)] if len(probabilities) else []
    frame["confidence"] = probabilities.max(1) if len(probabilities) else []
    for i, name in enumerate(CLASS_NAMES):
        frame[f"prob_{name}"] = probabilities[:, i]
    result = PredictResult(frame, skipped, no_face, time.perf_counter() - start)
    if show_dir:
        draw_predictions(frame, Path(show_dir))
    return result


def check_output(output: str | None, show_dir: str | None = None) -> None:
    """A wrong ``--output`` or ``--show`` stops the command before any model is loaded or image predicted."""
    from fer_exp.experiment import check_output_dir

    if output:
        if Path(output).suffix.lower() not in OUTPUT_SUFFIXES:
            raise PredictError(f"--output {output}: write a .csv or a .json file")
        if Path(output).is_dir():
            raise PredictError(f"--output {output}: is a folder; name a .csv or .json file (in it, say)")
        check_output_dir(Path(output).parent, "the predictions", "--output")
    if show_dir:
        check_output_dir(Path(show_dir), "the drawn images", "--show")


def write_predictions(frame: pd.DataFrame, output: str) -> Path:
    """The predictions as CSV or JSON, written beside ``output`` and moved onto it: a full disk or a Ctrl-C
    leaves an earlier file there whole, never half of this one."""
    path = Path(output)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise PredictError(f"--output {output}: write a .csv or a .json file")
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".csv":
            frame.to_csv(partial, index=False)
        else:  # (pandas' own JSON writes paths as "photos\/a.jpg")
            partial.write_text(json.dumps(json.loads(frame.to_json(orient="records")), indent=2) + "\n")
        os.replace(partial, path)
    except OSError as exc:
        raise PredictError(f"--output {output}: cannot be written ({exc.strerror or exc})") from None
    finally:
        partial.unlink(missing_ok=True)
    return path


def draw_predictions(frame: pd.DataFrame, folder: Path) -> list[Path]:
    """Each image with its boxes and labels (emotion and probability) drawn, as PNG in ``folder``."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PredictError(f"--show {folder}: cannot be created ({exc.strerror or exc})") from None
    written = []
    for index, (source, rows) in enumerate(frame.groupby("source", sort=False)):
        with Image.open(source) as opened:
            if opened.mode.startswith("I") or opened.mode == "F":  # 16-bit or float gray: as the model sees it, 8 bits
                image = Image.fromarray(read_gray(source)[0]).convert("RGB")
            else:
                image = ImageOps.exif_transpose(opened).convert("RGB")
        scale = max(1.0, 256 / max(image.size))  # small faces (48 px) are enlarged so labels stay legible
        if scale > 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(image)
        font = ImageFont.load_default(size=max(12, image.width // 30))
        line = max(2, image.width // 200)
        for row in rows.itertuples():
            box = [row.x * scale, row.y * scale, (row.x + row.width) * scale - 1, (row.y + row.height) * scale - 1]
            draw.rectangle(box, outline=(255, 40, 40), width=line)
            label = f"{row.emotion} {row.confidence:.2f}"
            left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
            tag_w, tag_h = right - left + 2 * line, bottom - top + 2 * line
            y = box[1] - tag_h if box[1] >= tag_h else box[1]  # above the box, or inside it at the top edge
            draw.rectangle([box[0], y, box[0] + tag_w, y + tag_h], fill=(255, 40, 40))
            draw.text((box[0] + line - left, y + line - top), label, fill=(255, 255, 255), font=font)
        name = f"{index:04d}_{Path(source).stem}.png"
        image.save(folder / name)
        written.append(folder / name)
    return written


def format_predictions(frame: pd.DataFrame, limit: int = 30) -> str:
    """A readable table: source, face, emotion, confidence and the box where faces were detected."""
    if frame.empty:
        return "no predictions"
    shown = frame.head(limit)
    width = min(max(len(s) for s in shown["source"]), 60)
    lines = [f"{'source'.ljust(width)}  face  emotion   confidence  box"]
    for row in shown.itertuples():
        face = "-" if row.face < 0 else str(row.face)
        box = f"{row.x},{row.y} {row.width}x{row.height}"
        lines.append(f"{row.source[-width:].ljust(width)}  {face:>4}  {row.emotion:<8}  {row.confidence:10.3f}  {box}")
    if len(frame) > limit:
        lines.append(f"... and {len(frame) - limit} more row(s)")
    return "\n".join(lines)

