"""Procedurally drawn FER-like faces for offline demos and the test suite.

Each 48x48 grayscale face carries its class only in its features (brows, eyes, mouth shape and
opening), drawn in face-local coordinates and then placed with a random position, scale and
rotation, under random skin/background tones, a lighting gradient and noise. Mean brightness
says nothing about the class. Class proportions follow FER2013's training split by default.
"""

from __future__ import annotations

import numpy as np
import torch

from fer_exp.classes import IMAGE_SIZE, NUM_CLASSES
from fer_exp.data.dataset import Split

# FER2013 Training class counts (angry, disgust, fear, happy, sad, surprise, neutral)
FER2013_TRAIN_COUNTS = (3995, 436, 4097, 7215, 4830, 3171, 4965)
DEFAULT_SIZES = {"train": 3000, "val": 600, "test": 600}

# Per class: brow inner y, brow outer y, eye half-height, mouth half-width, mouth curvature
# (positive = corners up), mouth opening, mouth tilt (asymmetry). Face-local units, y points down.
_FEATURES = np.array(
    [
        # brow_in brow_out eye_h  mouth_w curve  open   tilt
        [-0.24, -0.42, 0.035, 0.22, -0.05, 0.015, 0.00],  # angry: brows down in the middle, narrow eyes, tight mouth
        [-0.30, -0.36, 0.040, 0.24, -0.06, 0.030, 0.14],  # disgust: narrowed eyes, raised lip on one side
        [-0.48, -0.40, 0.100, 0.28, -0.04, 0.110, 0.00],  # fear: raised inner brows, wide eyes, stretched open mouth
        [-0.36, -0.36, 0.060, 0.30, 0.14, 0.040, 0.00],  # happy: smile
        [-0.44, -0.30, 0.055, 0.24, -0.12, 0.015, 0.00],  # sad: inner brows up, corners down
        [-0.50, -0.50, 0.105, 0.12, 0.00, 0.240, 0.00],  # surprise: high brows, wide eyes, round open mouth
        [-0.36, -0.36, 0.060, 0.25, 0.00, 0.020, 0.00],  # neutral
    ],
    dtype=np.float32,
)
_JITTER = np.array([0.04, 0.04, 0.015, 0.03, 0.035, 0.015, 0.04], dtype=np.float32)


def _segment_distance(px, py, ax, ay, bx, by):
    """Distance from points (px, py) to segments a-b; all arrays broadcast."""
    dx, dy = bx - ax, by - ay
    t = np.clip(((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy + 1e-9), 0.0, 1.0)
    return np.hypot(px - (ax + t * dx), py - (ay + t * dy))


def _draw(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    shape = (n, 1, 1)
    grid = (np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5) / IMAGE_SIZE * 2 - 1
    x, y = grid[None, None, :], grid[None, :, None]

    # pose: position, scale, rotation -> face-local coordinates (u, v)
    cx, cy = rng.uniform(-0.12, 0.12, shape), rng.uniform(-0.10, 0.14, shape)
    scale = rng.uniform(0.72, 0.98, shape)
    angle = np.deg2rad(rng.uniform(-16, 16, shape))
    cos, sin = np.cos(angle), np.sin(angle)
    u = (cos * (x - cx) + sin * (y - cy)) / scale
    v = (-sin * (x - cx) + cos * (y - cy)) / scale
    pixel = 2.0 / IMAGE_SIZE / scale  # one pixel in face-local units, for soft edges

    def soft(signed):  # signed > 0 inside; one-pixel anti-aliased edge
        return np.clip(signed / pixel + 0.5, 0.0, 1.0)

    params = _FEATURES[labels] + rng.normal(0, 1, (n, _FEATURES.shape[1])).astype(np.float32) * _JITTER
    brow_in, brow_out, eye_h, mouth_w, curve, opening, tilt = (params[:, i].reshape(shape) for i in range(7))
    eye_h = np.maximum(eye_h, 0.02)
    mouth_w = np.maximum(mouth_w, 0.08)
    opening = np.maximum(opening, 0.0)

    face = soft(1.0 - np.sqrt((u / 0.74) ** 2 + (v / 0.94) ** 2))
    features = np.zeros_like(u)
    for side in (-1.0, 1.0):
        ex = side * 0.30
        eye = soft(1.0 - np.sqrt(((u - ex) / 0.12) ** 2 + ((v + 0.12) / eye_h) ** 2))
        brow = soft(0.05 - _segment_distance(u, v, side * 0.10, brow_in, side * 0.46, brow_out))
        features = np.maximum(features, np.maximum(eye, brow))
    nose = soft(0.025 - _segment_distance(u, v, 0.0, 0.0, 0.0, 0.22)) * 0.5
    lip = 0.035
    shape_u = 1.0 - (u / mouth_w) ** 2
    centre = 0.48 + tilt * u / mouth_w * 0.5
    upper = centre + curve * shape_u - opening / 2 - lip
    lower = centre + curve * shape_u + opening / 2 + lip
    mouth = soft(np.minimum(np.minimum(v - upper, lower - v), (mouth_w - np.abs(u)) * 0.5))
    features = np.maximum(features, np.maximum(nose, mouth))

    skin = rng.uniform(0.35, 0.9, shape)
    background = rng.uniform(0.0, 1.0, shape)
    contrast = rng.uniform(0.45, 0.75, shape)
    image = background + face * (skin - background) - face * features * contrast * skin
    gx, gy = rng.normal(0, 0.12, shape), rng.normal(0, 0.12, shape)
    image = image + gx * x + gy * y
    image = image + rng.normal(0, 1, image.shape) * rng.uniform(0.01, 0.04, shape)
    return (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def synthetic_split(n: int, seed: int, name: str = "train", class_weights=FER2013_TRAIN_COUNTS) -> Split:
    """``n`` faces with classes drawn in proportion to ``class_weights``; deterministic per seed."""
    rng = np.random.default_rng([seed, sum(map(ord, name))])  # splits differ, each reproducible
    p = np.asarray(class_weights, dtype=np.float64)
    labels = rng.choice(NUM_CLASSES, size=n, p=p / p.sum())
    chunks = [_draw(labels[i : i + 512], rng) for i in range(0, n, 512)]
    images = np.concatenate(chunks) if chunks else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    return Split(
        torch.from_numpy(images),
        torch.from_numpy(labels.astype(np.int64)),
        [f"synthetic:{name}:{i}" for i in range(n)],
    )


def parse_synthetic_spec(spec: str) -> dict[str, int]:
    """``synthetic`` or ``synthetic:TRAIN,VAL,TEST`` (sample counts) -> split sizes."""
    if spec == "synthetic":
        return dict(DEFAULT_SIZES)
    _, _, sizes = spec.partition(":")
    parts = sizes.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"bad synthetic spec {spec!r}: use 'synthetic' or 'synthetic:TRAIN,VAL,TEST' with positive counts, e.g. synthetic:600,120,120")
    return dict(zip(("train", "val", "test"), (int(p) for p in parts)))
