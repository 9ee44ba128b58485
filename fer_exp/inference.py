"""Inference: class probabilities for uint8 face images, with test-time augmentation (TTA) and model
ensembles. One function, :func:`predict_probabilities`, serves training's val/test evaluation,
``fer-exp predict``, ``fer-exp evaluate``, the served MLflow model and the throughput benchmark.

:func:`load_model` loads a trained model from a checkpoint file (``best.pt``), a saved weights file
(``model.safetensors``), or an MLflow model URI (``runs:/<id>/model``, ``models:/<name>/<version>``,
``models:/<name>@<alias>``); MLflow is imported only for a URI.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fer_exp.augment import to_float
from fer_exp.classes import CLASS_NAMES, NUM_CLASSES
from fer_exp.config import FIELDS, TTA_CHOICES, TTA_OPTIONS, Config
from fer_exp.device import autocast, inference_amp, memory_format_for, resolve_device
from fer_exp.errors import NOT_A_TORCH_FILE, first_line, torch_file_kind
from fer_exp.models import build_model

TENCROP_FRACTION = 0.875  # ten-crop: 4 corners and the centre at 42 of 48 px, resized back, and their mirrors
WEIGHTS_FILE = "model.safetensors"  # what a logged model keeps: the weights, the config in its metadata


class ModelLoadError(ValueError):
    """A model URI or file that cannot be loaded; the message says which and why."""


def tta_views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The views of a float batch (N, 1, H, W) that TTA averages over: ``none`` the batch itself,
    ``flip`` it and its mirror, ``tencrop`` the four corner and the centre crops (resized back to H x W,
    so the model sees faces at its own input size) and their mirrors."""
    if tta == "none":
        return [x]
    if tta == "flip":
        return [x, x.flip(-1)]
    if tta != "tencrop":
        raise ValueError(f"tta must be one of {', '.join(TTA_CHOICES)}, got {tta!r}")
    h, w = x.shape[-2:]
    ch, cw = round(h * TENCROP_FRACTION), round(w * TENCROP_FRACTION)
    top, left = (h - ch) // 2, (w - cw) // 2
    crops = [x[..., :ch, :cw], x[..., :ch, w - cw:], x[..., h - ch:, :cw], x[..., h - ch:, w - cw:],
             x[..., top:top + ch, left:left + cw]]
    crops = [F.interpolate(c, size=(h, w), mode="bilinear", align_corners=False) for c in crops]
    return crops + [c.flip(-1) for c in crops]


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, images: torch.Tensor, *, batch_size: int = 1024,
                          tta: str = "none", amp_dtype: torch.dtype | None = None,
                          memory_format: torch.memory_format = torch.contiguous_format,
                          labels: torch.Tensor | None = None) -> tuple[np.ndarray, float | None]:
    """(class probabilities (N, 7) as float32, mean cross-entropy against ``labels`` or None) of uint8
    images (N, H, W), in eval mode on the model's device. With TTA the probabilities are the mean of
    the views' softmax, and the loss is the cross-entropy of that mean."""
    if tta not in TTA_CHOICES:
        raise ValueError(f"tta must be one of {', '.join(TTA_CHOICES)}, got {tta!r}")
    model.eval()
    device = next(model.parameters()).device
    n = images.shape[0]
    loss_sum = torch.zeros((), device=device)
    out = []
    for start in range(0, n, batch_size):
        x = to_float(images[start:start + batch_size].to(device))
        views = tta_views(x, tta)
        with autocast(device, amp_dtype):
            logits = [model(v.contiguous(memory_format=memory_format)).float() for v in views]
        if len(logits) == 1:  # exactly the softmax and cross-entropy of the logits
            probabilities = logits[0].softmax(1)
            if labels is not None:
                loss_sum += F.cross_entropy(logits[0], labels[start:start + batch_size].to(device), reduction="sum")
        else:
            probabilities = torch.stack([z.softmax(1) for z in logits]).mean(0)
            if labels is not None:
                loss_sum += F.nll_loss(probabilities.clamp_min(1e-12).log(), labels[start:start + batch_size].to(device),
                                       reduction="sum")
        out.append(probabilities)  # kept on the device: one copy to the host at the end, not one per batch
    probabilities = torch.cat(out).cpu().numpy() if out else np.zeros((0, NUM_CLASSES), np.float32)
    return probabilities, (loss_sum.item() / max(n, 1) if labels is not None else None)


@dataclass
class LoadedModel:
    """A trained model ready to predict, with the config it was trained with."""

    model: torch.nn.Module
    config: Config
    source: str  # what was loaded: the URI or file
    run_id: str | None = None  # the MLflow run that made it, where known
    device: torch.device = torch.device("cpu")
    amp_dtype: torch.dtype | None = None
    tta: str = "none"  # the test-time augmentation its run was tested with (chosen on val where tta was auto)
    batch_size: int = 0  # images per forward pass (0: its config's eval_batch_size)

    @property
    def name(self) -> str:
        return f"{self.config.model} {self.config.input_size}px"

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout the model trained and was evaluated in: the same kernels, the same numbers."""
        return memory_format_for(self.config.channels_last)

    def resolve_tta(self, tta: str) -> str:
        """``model``: this model's own TTA; else ``tta`` itself."""
        if tta not in TTA_OPTIONS:
            raise ValueError(f"tta must be one of {', '.join(TTA_OPTIONS)}, got {tta!r}")
        return self.tta if tta == "model" else tta

    def predict(self, images: torch.Tensor, tta: str = "model", labels: torch.Tensor | None = None,
                batch_size: int | None = None) -> tuple[np.ndarray, float | None]:
        return predict_probabilities(self.model, images, batch_size=batch_size or self.batch_size or self.config.eval_batch_size,
                                     tta=self.resolve_tta(tta), amp_dtype=self.amp_dtype, memory_format=self.memory_format, labels=labels)


def ensemble_probabilities(models: list[LoadedModel], images: torch.Tensor, tta: str = "model",
                           labels: torch.Tensor | None = None) -> tuple[np.ndarray, float | None]:
    """The mean of the models' (TTA) probabilities, and the cross-entropy of that mean. ``tta`` ``model``:
    each model with its own."""
    if len(models) == 1:
        return models[0].predict(images, tta, labels)
    probabilities = np.mean([m.predict(images, tta)[0] for m in models], axis=0).astype(np.float32)
    if labels is None:
        return probabilities, None
    picked = probabilities[np.arange(len(labels)), labels.numpy()]
    return probabilities, float(-np.log(np.clip(picked, 1e-12, None)).mean()) if len(labels) else 0.0


def config_from_dict(values: dict) -> Config:
    """The config a model was trained with, as stored beside its weights (keys of newer or older
    versions ignored; the device is chosen where it loads, not where it trained)."""
    known = {k: v for k, v in values.items() if k in FIELDS}
    return dataclasses.replace(Config(**known), device="auto", pretrained="none")


def own_tta(cfg: Config, recorded: str | None = None) -> str:
    """A model's own TTA: the one its run recorded testing with, else its config's where that names one
    (a checkpoint of a ``tta: auto`` run does not know the choice: none)."""
    if recorded in TTA_CHOICES:
        return recorded
    return cfg.tta if cfg.tta in TTA_CHOICES else "none"


def build_inference_model(cfg: Config, state_dict: dict, device: str | torch.device = "auto",
                          evaluated_in: dict | None = None, source: str = "the file") -> LoadedModel:
    """The model on ``device``, predicting in the precision its run evaluated in where that was measured
    (``evaluated_in``: see :func:`fer_exp.device.inference_amp`); ``source`` names the file in errors."""
    target = resolve_device(device) if isinstance(device, str) else device
    try:
        model = build_model(cfg.model, input_size=cfg.input_size or None, freeze_depth=0, pretrained="none",
                            dropout=cfg.dropout)
    except ValueError as exc:  # a hand-edited config: a model or size fer-exp does not build
        raise ModelLoadError(f"{source}: its config names a model fer-exp cannot build ({exc})") from None
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:  # the first line is only "Error(s) in loading state_dict for ...": say which keys
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])[:300]
        raise ModelLoadError(f"{source}: the weights do not fit a {cfg.model} at {cfg.input_size or 'its default'} px: "
                             f"{detail or str(exc)[:300]}") from None
    loaded = LoadedModel(model, cfg, source="", device=target, amp_dtype=inference_amp(cfg.amp, target, evaluated_in),
                         tta=own_tta(cfg))
    model.to(target, memory_format=loaded.memory_format).eval()
    return loaded


def save_weights(model: torch.nn.Module, cfg: Config, path: str | Path, tta: str = "none",
                 evaluated_in: dict | None = None) -> Path:
    """The model's weights as safetensors (no pickle: loading runs no code), the config, the TTA its run
    tested with and where and in which precision it evaluated in its metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"fer_exp_config": json.dumps(cfg.to_dict()), "classes": ",".join(CLASS_NAMES),
                                          "fer_exp_tta": tta, "fer_exp_evaluated_in": json.dumps(evaluated_in or {})})
    return Path(path)


def load_weights_file(path: Path, device: str | torch.device = "auto") -> LoadedModel:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for foreign or truncated files
        raise ModelLoadError(f"{path}: not a safetensors weights file ({first_line(exc, 120)})") from None
    if "fer_exp_config" not in metadata:
        raise ModelLoadError(f"{path}: a safetensors file without fer-exp's config; it was not saved by fer-exp")
    loaded = build_inference_model(config_from_dict(json.loads(metadata["fer_exp_config"])), state, device,
                                   json.loads(metadata.get("fer_exp_evaluated_in") or "{}"), str(path))
    return dataclasses.replace(loaded, source=str(path), tta=own_tta(loaded.config, metadata.get("fer_exp_tta")))


def load_checkpoint_file(path: Path, device: str | torch.device = "auto") -> LoadedModel:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a text file, an image, an empty file: torch's errors vary by content
        kind = torch_file_kind(path)
        if isinstance(exc, pickle.UnpicklingError) and kind in ("zip", "pickle"):  # a checkpoint, not of tensors only
            raise ModelLoadError(f"{path}: refused, the file holds pickled objects beyond tensors (loading it could "
                                 "run code); use a checkpoint written by fer-exp train") from None
        reason = NOT_A_TORCH_FILE.get(kind) or first_line(exc, 120)  # torch's words where it is one gone wrong
        raise ModelLoadError(f"{path}: not a PyTorch checkpoint ({reason}); give the best.pt or last.pt of a run, a "
                             "weights file (.safetensors) or an MLflow model URI (runs:/<run id>/model)") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ModelLoadError(f"{path}: not a fer-exp checkpoint (expected the best.pt or last.pt of a run)")
    weights = state["model"]
    if "ema" in state:  # the run evaluated and logged its EMA weights: predict with those
        weights = {k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}
    loaded = build_inference_model(config_from_dict(state["config"]), weights, device, state.get("evaluated_in"), str(path))
    recorded = state["trained"].get("test_tta") if isinstance(state.get("trained"), dict) else None  # an export's
    return dataclasses.replace(loaded, source=str(path), tta=own_tta(loaded.config, recorded))


def load_model(uri: str, device: str | torch.device = "auto", batch_size: int = 0) -> LoadedModel:
    """A trained model from a checkpoint (``.pt``), a weights file (``.safetensors``), a logged MLflow
    model's folder, or an MLflow URI: ``runs:/<run id>/model``, ``models:/<name>/<version>``,
    ``models:/<name>@<alias>``, ``models:/m-<model id>``; predicting ``batch_size`` images at a time (0:
    its config's eval_batch_size)."""
    return dataclasses.replace(_load_model(uri, device), batch_size=batch_size)


def _load_model(uri: str, device: str | torch.device = "auto") -> LoadedModel:
    path = Path(uri)
    if "://" not in uri and not uri.startswith(("runs:", "models:")):
        if path.is_dir():
            found = sorted(path.rglob(WEIGHTS_FILE))
            if not found:
                raise ModelLoadError(f"{uri}: a folder without {WEIGHTS_FILE}; give a checkpoint, a weights file "
                                     "or an MLflow model URI (runs:/<run id>/model)")
            if len(found) > 1:  # an mlruns/ folder, say: which model is meant is not for fer-exp to guess
                raise ModelLoadError(f"{uri}: a folder with {len(found)} models ({', '.join(map(str, found[:3]))}"
                                     f"{', ...' if len(found) > 3 else ''}); give the one meant, or its runs:/<run id>/model")
            return load_weights_file(found[0], device)
        if not path.is_file():
            if len(uri) == 32 and all(c in "0123456789abcdef" for c in uri):  # a bare run id
                raise ModelLoadError(f"{uri}: no such file; for the model of run {uri} give runs:/{uri}/model")
            raise ModelLoadError(f"{uri}: no such file; give a checkpoint (.pt), a weights file (.safetensors), or "
                                 "an MLflow model URI (runs:/<run id>/model, models:/<name>/<version>)")
        if path.suffix == ".safetensors":
            return load_weights_file(path, device)
        return load_checkpoint_file(path, device)
    if uri.startswith(("http://", "https://")):
        raise ModelLoadError(f"{uri}: a web address; download the file first (curl -LO ...) and give its path, or "
                             "give an MLflow model URI (runs:/<run id>/model; MLFLOW_TRACKING_URI names the server)")
    return load_mlflow_model(uri, device)


def load_mlflow_model(uri: str, device: str | torch.device = "auto") -> LoadedModel:
    import mlflow

    from fer_exp.tracking import DEFAULT_TRACKING_URI, tracking_uri  # (also quiets MLflow's download bars)

    from fer_exp.experiment import TrackingError, check_tracking_store, sqlite_file

    store = tracking_uri()
    if store == DEFAULT_TRACKING_URI and not Path("mlflow.db").is_file():  # opening it would make an empty one
        raise ModelLoadError(f"{uri}: no MLflow store here ({Path.cwd() / 'mlflow.db'} does not exist); run from the "
                             "folder that holds mlflow.db, or set MLFLOW_TRACKING_URI (e.g. sqlite:////path/to/mlflow.db)")
    if store.startswith("sqlite:") and sqlite_file(store) is not None and not sqlite_file(store).is_file():
        raise ModelLoadError(f"{uri}: MLFLOW_TRACKING_URI names no MLflow store ({sqlite_file(store).absolute()} does not "
                             "exist; opening it would make an empty one): check the path (sqlite:////absolute/path/mlflow.db)")
    try:  # a server that does not answer: said in seconds, not after MLflow's minutes of retries
        check_tracking_store(store, write=False)
    except TrackingError as exc:
        raise ModelLoadError(f"{uri}: {exc}") from None
    mlflow.set_tracking_uri(store)
    check_mlflow_uri_form(uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except Exception as exc:  # MLflow raises several types for a missing run, model or artifact
            message = first_line(exc, 200)
            raise ModelLoadError(f"{uri}: cannot be loaded from the tracking store {tracking_uri()} ({message}); "
                                 "check the URI and MLFLOW_TRACKING_URI") from None
        found = sorted(local.rglob(WEIGHTS_FILE)) if local.is_dir() else []
        if not found and not local.is_file():
            raise ModelLoadError(f"{uri}: holds no {WEIGHTS_FILE}; it was not logged by this fer-exp "
                                 "(give the run's checkpoint instead: runs:/<run id>/checkpoints/best.pt)")
        try:
            loaded = load_weights_file(found[0], device) if found else load_model(str(local), device)
        except ModelLoadError as exc:  # named as the user named it, not by the download's passing path
            raise ModelLoadError(str(exc).replace(str(found[0] if found else local), uri)) from None
    run_id = None
    if uri.startswith("runs:/"):
        run_id = uri[len("runs:/"):].split("/")[0]
    elif uri.startswith("models:/"):
        run_id = model_version_run_id(uri)
    run = None
    if run_id:
        try:
            run = mlflow.MlflowClient().get_run(run_id)
        except mlflow.exceptions.MlflowException:
            pass
    if run is not None and run.info.lifecycle_stage == "deleted":  # its artifacts stay until `mlflow gc`
        print(f"warning: {uri}: run {run_id} is deleted; its model loads until `mlflow gc` removes its artifacts. "
              f"Restore it with: mlflow runs restore --run-id {run_id}", file=sys.stderr, flush=True)
    tta = loaded.tta
    if run is not None and loaded.config.tta == "auto" and tta == "none":  # a checkpoint of a tta-auto run: its run knows the choice
        tta = own_tta(loaded.config, run.data.tags.get("test_tta"))
    return dataclasses.replace(loaded, source=uri, run_id=run_id, tta=tta)


def check_mlflow_uri_form(uri: str) -> None:
    """A ``runs:/`` URI that names a whole run, or a ``models:/`` one that names no version, is said with the
    form meant (MLflow would download every artifact of the run, or look for a logged model of that id)."""
    import mlflow

    if uri.startswith("runs:/") and not uri[len("runs:/"):].strip("/").partition("/")[2]:
        run_id = uri[len("runs:/"):].strip("/")
        raise ModelLoadError(f"{uri}: names a whole run, not its model; give runs:/{run_id}/model")
    ref = uri[len("models:/"):] if uri.startswith("models:/") else None
    if ref and not ref.startswith("m-") and "/" not in ref.strip("/") and "@" not in ref:
        name = ref.strip("/")
        try:
            versions = sorted((int(v.version) for v in mlflow.MlflowClient().search_model_versions(f"name = '{name}'")),
                              reverse=True)
        except mlflow.exceptions.MlflowException:
            versions = []
        known = f" (its versions: {', '.join(map(str, versions[:5]))}{', ...' if len(versions) > 5 else ''})" if versions else ""
        raise ModelLoadError(f"{uri}: names no version of the registered model {name}{known}; give "
                             f"models:/{name}/<version> or models:/{name}@<alias>")


def model_version_run_id(uri: str) -> str | None:
    """The run that made a registered model version (``models:/name/3`` or ``models:/name@alias``) or a
    logged model (``models:/m-<id>``)."""
    import mlflow

    client = mlflow.MlflowClient()
    ref = uri[len("models:/"):]
    try:
        if ref.startswith("m-") and "/" not in ref and "@" not in ref:  # MLflow 3's own id of a logged model
            return client.get_logged_model(ref).source_run_id
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias).run_id
        name, _, version = ref.partition("/")
        if version.isdigit():
            return client.get_model_version(name, version).run_id
    except mlflow.exceptions.MlflowException:
        return None
    return None
