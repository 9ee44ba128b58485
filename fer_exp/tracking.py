"""MLflow tracking as a training-loop callback: params, tags, per-epoch metrics, test metrics,
figures, tables, checkpoints and the model, loadable with ``mlflow.pyfunc.load_model``."""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from fer_exp.classes import CLASS_NAMES, IMAGE_SIZE
from fer_exp.metrics import confusion_figure, per_class_table, report_text
from fer_exp.models import count_parameters
from fer_exp.train import Callback, FitResult, Trainer

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "lr",
                 "epoch_seconds", "train_images_per_second")
TEST_METRICS = ("test_accuracy", "test_macro_f1", "test_weighted_f1", "test_macro_precision", "test_macro_recall",
                "test_weighted_precision", "test_weighted_recall", "test_loss",
                *(f"test_acc_{c}" for c in CLASS_NAMES), *(f"test_f1_{c}" for c in CLASS_NAMES))


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///mlflow.db`` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class ProbabilityModel(torch.nn.Module):
    """What is logged: float32 pixels 0-255, shape (N, 1, 48, 48) -> class probabilities (N, 7)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels / 255.0).softmax(dim=1)


def log_pytorch_model(model: torch.nn.Module, example_images: torch.Tensor):
    """Log ``model`` (any device) as an MLflow model with a batch-size-free signature."""
    import copy

    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    wrapped = ProbabilityModel(copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format)).eval()
    # pt2 export fixes every dimension of size 1, so the example has 2 images to keep the batch free
    example = example_images[:2].unsqueeze(1).float().cpu().numpy()
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, IMAGE_SIZE, IMAGE_SIZE))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(CLASS_NAMES)))]),
    )
    # the flavour's own pinned requirements (torch); inferring them instead re-imports the model in a
    # subprocess, ~11 s of every run's end on a 2-core machine
    return mlflow.pytorch.log_model(wrapped, name="model", signature=signature, input_example=example,
                                    pip_requirements=mlflow.pytorch.get_default_pip_requirements())


class MLflowCallback(Callback):
    """Logs a :class:`~fer_exp.train.Trainer` run to the active MLflow run: the test evaluation's
    metrics, figure and tables when the fit made one, the checkpoints and the model when asked."""

    def __init__(self, log_model: bool = True, log_checkpoints: bool = True):
        self.log_model, self.log_checkpoints = log_model, log_checkpoints

    def on_fit_start(self, trainer: Trainer) -> None:
        cfg, data = trainer.cfg, trainer.data
        trainable, total = count_parameters(trainer.model)
        # `mlflow run` logs its own -P values under the plain names (an empty one means "not given"),
        # and MLflow never lets a param change, so the resolved config lives under `config.*`.
        mlflow.log_params({f"config.{k}": v for k, v in cfg.to_dict().items()})
        mlflow.set_tags({
            "model": cfg.model, "num_params": total, "num_params_trainable": trainable,
            "data_source": data.source, "data_format": data.format, "split_rule": data.split_rule,
            **{f"{name}_size": len(split) for name, split in data.splits().items()},
            "device": str(trainer.device), "amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "off",
            "torch_version": torch.__version__, "timm_version": importlib.metadata.version("timm"),
            "pretrained_load": getattr(trainer.model, "load_report", None) or "",
        })
        mlflow.log_text(cfg.to_yaml(), "config.yaml")
        mlflow.log_dict(data.summary(), "data_summary.json")

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics({k: metrics[k] for k in EPOCH_METRICS if k in metrics}, step=epoch)

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        mlflow.log_metrics({"best_epoch": result.best_epoch, f"best_{trainer.cfg.select_metric}": result.best_value,
                            "epochs_run": trainer.epoch, "fit_seconds": result.seconds})
        if result.test_metrics:
            self.log_test_evaluation(trainer, result)
        if self.log_checkpoints:
            mlflow.log_artifact(str(result.best_checkpoint), "checkpoints")
            mlflow.log_artifact(str(result.last_checkpoint), "checkpoints")
        if self.log_model:
            log_pytorch_model(trainer.model, trainer.data.val.images)

    @staticmethod
    def log_test_evaluation(trainer: Trainer, result: FitResult) -> None:
        test = trainer.data.test
        labels, predictions = test.labels.numpy(), result.test_probabilities.argmax(1)
        mlflow.log_metrics({k: result.test_metrics[k] for k in TEST_METRICS})
        figure = confusion_figure(labels, predictions, title=f"{trainer.cfg.model} test")
        mlflow.log_figure(figure, "confusion_matrix.png")
        import matplotlib.pyplot as plt

        plt.close(figure)
        mlflow.log_table(per_class_table(labels, predictions), artifact_file="per_class_metrics.json")
        mlflow.log_text(report_text(labels, predictions), "classification_report.txt")
        frame = pd.DataFrame({"source": test.sources, "label": labels, "prediction": predictions,
                              "label_name": [CLASS_NAMES[i] for i in labels],
                              "prediction_name": [CLASS_NAMES[i] for i in predictions]})
        for i, name in enumerate(CLASS_NAMES):
            frame[f"prob_{name}"] = result.test_probabilities[:, i]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "test_predictions.csv"
            frame.to_csv(path, index=False)
            mlflow.log_artifact(str(path))
