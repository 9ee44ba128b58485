"""The model as MLflow logs and serves it: a pyfunc that takes a batch of images and returns the emotion
and the seven class probabilities of each.

Input, any of:
  - a DataFrame with an ``image`` column of encoded image files (PNG, JPEG, ...) as base64 text or
    bytes: what ``mlflow models serve`` receives as ``{"dataframe_split": {"columns": ["image"], ...}}``;
  - a list of such base64 texts: ``{"inputs": ["<base64>", ...]}`` (or ``"instances"``);
  - an array of pixels 0-255, (N, H, W), (N, 1, H, W), (N, H, W, 1), (N, H, W, 3), or one image (H, W),
    (H, W, 1) or (H, W, 3):
    ``{"inputs": [...]}``. Values outside 0-255, or floats all within 0-1 (scaled images), are refused.
Any size and colour: images are made 48x48 grayscale exactly as training data is
(:mod:`fer_exp.data.images`). Output: a DataFrame with ``emotion`` and ``prob_<class>`` columns.
Optional param ``tta``: none, flip, tencrop, or model: the one the run was tested with (chosen on val where
the config said `tta: auto`), which is the default.

The model is logged "from code" (:mod:`fer_exp.pyfunc_model`) with its weights as safetensors: MLflow
pickles nothing, so what is stored does not change with the MLflow version, and loading it runs no
pickled code. The fer_exp package travels with the model (``code_paths``).
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import warnings
from pathlib import Path

import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
import numpy as np
import pandas as pd
import torch

from fer_exp.classes import CLASS_NAMES, IMAGE_SIZE
from fer_exp.data.images import ImageDecodeError, decode_image, to_model_size
from fer_exp.config import TTA_OPTIONS
from fer_exp.inference import WEIGHTS_FILE, LoadedModel, load_weights_file

IMAGE_COLUMN = "image"
PROBABILITY_COLUMNS = tuple(f"prob_{name}" for name in CLASS_NAMES)
SERVING_REQUIREMENTS = ("torch", "timm", "numpy", "pandas", "pillow", "safetensors", "pyyaml", "mlflow")


class ServingInputError(MlflowException):
    """A request the model cannot read; the message says what it expected (HTTP 400 when served)."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def _decode_cell(value, row: int) -> np.ndarray:
    if isinstance(value, str):
        text = "".join(value.split())  # base64 wrapped in lines (the `base64` tool wraps at 76 characters)
        if text.startswith("data:") and "," in text:  # a data URL: data:image/png;base64,....
            text = text.split(",", 1)[1]
        try:
            value = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ServingInputError(f"row {row}: the {IMAGE_COLUMN!r} value is not base64 text of an image file") from None
    if not isinstance(value, (bytes, bytearray)):
        raise ServingInputError(f"row {row}: expected base64 text or bytes of an image file, got {type(value).__name__}")
    try:
        return decode_image(bytes(value))
    except ImageDecodeError as exc:
        raise ServingInputError(f"row {row}: {exc}") from None


def _from_array(array: np.ndarray) -> np.ndarray:
    if array.dtype == object:
        raise ServingInputError("an array input must be numeric pixels 0-255")
    scaled = array.dtype.kind == "f"
    array = np.asarray(array, dtype=np.float32)
    if array.size and not np.isfinite(array).all():
        raise ServingInputError("an array input must be pixels 0-255; it holds NaN or infinite values")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ServingInputError(f"an array input must be pixels 0-255; got values from {array.min():g} to {array.max():g}")
    if scaled and array.size and 0 < array.max() <= 1:
        raise ServingInputError("an array input must be pixels 0-255; these all lie within 0-1 (images scaled to "
                                "0-1?): multiply them by 255")
    if array.ndim == 3 and (array.shape[-1] == 1 or (array.shape[-1] in (3, 4) and array.shape[1] > 4)):
        array = array[None]  # one image with its channels last, (H, W, 1) or (H, W, 3): a batch of it
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    elif array.ndim == 4 and array.shape[-1] == 1:  # gray, channels last
        array = array[..., 0]
    elif array.ndim == 4 and array.shape[-1] in (3, 4):  # RGB(A), channels last: PIL's luma ("L") weights
        array = array[..., 0] * 0.299 + array[..., 1] * 0.587 + array[..., 2] * 0.114
    elif array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ServingInputError(f"an array input must be images of shape (N, H, W), (N, 1, H, W), (N, H, W, 1) or "
                                f"(N, H, W, 3), or one image (H, W), (H, W, 1) or (H, W, 3); got {tuple(array.shape)}")
    pixels = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    if pixels.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE):
        return pixels
    return np.stack([to_model_size(p)[0] for p in pixels]) if len(pixels) else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)


def images_from_input(model_input) -> torch.Tensor:
    """uint8 (N, 48, 48) from whatever the pyfunc was given (see the module docstring)."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN in model_input.columns:
            cells = model_input[IMAGE_COLUMN].tolist()
        elif len(model_input.columns) == 1 and not pd.api.types.is_numeric_dtype(model_input.dtypes.iloc[0]):
            cells = model_input.iloc[:, 0].tolist()
        else:  # a DataFrame of numbers: one flattened image per row
            needs = (f"a DataFrame input needs an {IMAGE_COLUMN!r} column of base64 images (or square images "
                     f"flattened to rows of numbers); got columns {list(model_input.columns)[:5]}")
            if not all(pd.api.types.is_numeric_dtype(dtype) for dtype in model_input.dtypes):
                raise ServingInputError(needs)
            values = model_input.to_numpy(dtype=np.float32)
            side = int(round(np.sqrt(values.shape[1]))) if values.ndim == 2 else 0
            if side * side != values.shape[1]:
                raise ServingInputError(needs)
            return torch.from_numpy(_from_array(values.reshape(-1, side, side)))
        images = [_decode_cell(v, i) for i, v in enumerate(cells)]
        return torch.from_numpy(np.stack(images) if images else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8))
    if isinstance(model_input, dict):
        if IMAGE_COLUMN not in model_input:  # a JSON body with a mistyped key ("input") arrives as it is
            raise ServingInputError(f"got a mapping with the key(s) {', '.join(map(repr, list(model_input)[:5]))}; send "
                                    '{"inputs": [...]} (base64 images, or pixels 0-255), {"instances": [...]}, or '
                                    f'{{"dataframe_split": ...}} with an {IMAGE_COLUMN!r} column')
        return images_from_input(pd.DataFrame({IMAGE_COLUMN: list(np.atleast_1d(model_input[IMAGE_COLUMN]))}))
    if isinstance(model_input, (list, tuple)) and model_input and isinstance(model_input[0], (str, bytes)):
        return images_from_input(pd.DataFrame({IMAGE_COLUMN: list(model_input)}))
    if isinstance(model_input, torch.Tensor):
        model_input = model_input.cpu().numpy()
    array = np.asarray(model_input)
    if array.dtype.kind in "US" or (array.dtype == object and array.size and isinstance(array.flat[0], (str, bytes))):
        # {"inputs": ["<base64>", ...]} or {"instances": [...]}: MLflow hands over an array of text
        return images_from_input(pd.DataFrame({IMAGE_COLUMN: array.ravel().tolist()}))
    return torch.from_numpy(_from_array(array))


def probability_frame(probabilities: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame(probabilities.astype(np.float64), columns=list(PROBABILITY_COLUMNS))
    frame.insert(0, "emotion", [CLASS_NAMES[i] for i in probabilities.argmax(1)] if len(probabilities) else [])
    return frame


# MLflow asks for type hints on predict to validate inputs itself; this model checks its two input kinds.
# (MLflow shows that warning under a filter of its own, so "ignore" does not hold: it is recorded, unshown.)
with warnings.catch_warnings(record=True):

    class EmotionModel(mlflow.pyfunc.PythonModel):
        """The served model (see the module docstring)."""

        def __init__(self):
            self.loaded: LoadedModel | None = None

        def load_context(self, context) -> None:
            self.loaded = load_weights_file(Path(context.artifacts["weights"]))

        def predict(self, context, model_input, params=None) -> pd.DataFrame:
            tta = (params or {}).get("tta") or "model"
            if tta not in TTA_OPTIONS:
                raise ServingInputError(f"param tta must be one of {', '.join(TTA_OPTIONS)}, got {tta!r}")
            probabilities, _ = self.loaded.predict(images_from_input(model_input), tta=tta)
            return probability_frame(probabilities)


def serving_requirements() -> list[str]:
    """The packages the served model imports, pinned to the versions it was trained with."""
    pins = []
    for name in SERVING_REQUIREMENTS:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        pins.append(f"{name}=={version.split('+')[0]}")
    return pins


def model_signature(tta: str = "none"):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    outputs = Schema([ColSpec("string", "emotion"), *(ColSpec("double", c) for c in PROBABILITY_COLUMNS)])
    # no input schema: the model takes base64 images in a DataFrame or pixel arrays (MLflow would
    # otherwise refuse one of the two)
    return ModelSignature(inputs=None, outputs=outputs, params=ParamSchema([ParamSpec("tta", "string", tta)]))


def log_model(model: torch.nn.Module, cfg, registered_model_name: str | None = None, tta: str = "none",
              evaluated_in: dict | None = None):
    """Log ``model`` (trained with ``cfg``, tested with ``tta``: what it predicts with by default, in the
    precision of ``evaluated_in`` on its kind of device) as the run's ``model``, optionally registering it."""
    import shutil
    import tempfile

    from fer_exp.inference import save_weights

    package = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_weights(model, cfg, Path(tmp) / WEIGHTS_FILE, tta, evaluated_in)
        code = Path(tmp) / "fer_exp"  # the package's sources, without compiled caches
        shutil.copytree(package, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        with warnings.catch_warnings():  # "no input example": the README and the signature's docs say what it takes
            warnings.simplefilter("ignore", UserWarning)
            return mlflow.pyfunc.log_model(
                name="model", python_model=str(package / "pyfunc_model.py"), artifacts={"weights": str(weights)},
                code_paths=[str(code)], signature=model_signature(tta), pip_requirements=serving_requirements(),
                registered_model_name=registered_model_name or None,
                metadata={"serialization_format": "safetensors", "classes": list(CLASS_NAMES),
                          "model": cfg.model, "input_size": cfg.input_size})
