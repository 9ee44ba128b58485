"""Face detection for photos: OpenCV's bundled frontal-face Haar cascade (no download), so
``fer-exp predict --detect-faces`` classifies each face of a photo rather than the whole picture."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

CASCADE_FILE = "haarcascade_frontalface_default.xml"


class FaceDetectorError(RuntimeError):
    """OpenCV or its cascade is missing; the message says how to install it."""


@lru_cache(maxsize=1)
def _cascade():
    try:
        import cv2
    except ImportError:
        raise FaceDetectorError("--detect-faces needs OpenCV: pip install 'opencv-python-headless>=4.8,<5'") from None
    if not hasattr(cv2, "CascadeClassifier"):
        raise FaceDetectorError(f"this OpenCV ({cv2.__version__}) has no Haar cascades (OpenCV 5 dropped them): "
                                "pip install 'opencv-python-headless>=4.8,<5'")
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + CASCADE_FILE)
    if cascade.empty():
        raise FaceDetectorError(f"OpenCV's {CASCADE_FILE} could not be loaded from {cv2.data.haarcascades}")
    return cascade


def detect_faces(gray: np.ndarray, min_size: int = 24) -> list[tuple[int, int, int, int]]:
    """Face boxes (x, y, width, height) in an 8-bit grayscale image, largest first."""
    import cv2

    cascade = _cascade()
    equalised = cv2.equalizeHist(np.ascontiguousarray(gray))
    boxes = cascade.detectMultiScale(equalised, scaleFactor=1.1, minNeighbors=5, minSize=(min_size, min_size))
    boxes = [tuple(int(v) for v in box) for box in (boxes if len(boxes) else [])]
    return sorted(boxes, key=lambda b: (-b[2] * b[3], b[1], b[0]))


def crop(gray: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x, y, w, h = box
    return gray[y:y + h, x:x + w]
