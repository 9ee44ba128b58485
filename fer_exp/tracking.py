"""MLflow tracking as a training-loop callback: params, tags, per-epoch metrics, test metrics,
figures, tables, checkpoints and the model (:mod:`fer_exp.serving`), loadable with ``mlflow.pyfunc.load_model``
and ``fer-exp predict``."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import tempfile
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from fer_exp.classes import CLASS_NAMES
from fer_exp.metrics import UNCOPIED_SUFFIX, confusion_figure, per_class_table, report_text
from fer_exp.models import count_parameters
from fer_exp.train import Callback, FitResult, Trainer

# MLflow draws a download bar for every artifact it fetches (a model's weights as it logs or loads them,
# each run's predictions in a comparison): noise between our own progress lines. Every path of fer-exp
# that reaches MLflow imports this module first.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
SELECTED_METRIC = "best_val"  # the val value of the selected epoch, whichever metric selected it (tag select_metric)
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "lr",
                 "epoch_seconds", "epoch_overhead_seconds", "train_images_per_second")
TEST_METRICS = ("test_accuracy", "test_macro_f1", "test_weighted_f1", "test_macro_precision", "test_macro_recall",
                "test_weighted_precision", "test_weighted_recall", "test_loss",
                *(f"test_acc_{c}" for c in CLASS_NAMES), *(f"test_f1_{c}" for c in CLASS_NAMES))


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///mlflow.db`` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def describe_run(cfg) -> str:
    """A run name that says what the run is: model, key settings, seed."""
    parts = [cfg.model, f"{cfg.input_size}px"]
    if cfg.model == "resnet18":
        weights = cfg.pretrained if cfg.pretrained in ("imagenet", "none") else "local"
        parts += [weights, f"freeze{cfg.freeze_depth}"]
    parts += [f"lr={cfg.lr:g}", f"wd={cfg.weight_decay:g}"]
    if cfg.class_weights == "none":
        parts.append("unweighted")
    if cfg.duplicates == "drop" or cfg.copy_correlation < 1:  # copies@R: scored apart at R, trained on
        parts.append(("no-copies" if cfg.duplicates == "drop" else "copies")
                     + (f"@{cfg.copy_correlation:g}" if cfg.copy_correlation < 1 else ""))
    return " ".join([*parts, f"seed{cfg.seed}"])


def ui_base(uri: str | None = None) -> str:
    """The MLflow UI's address: a tracking server's own, else where `mlflow ui` serves by default."""
    uri = uri or tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def runs_page_url(experiment_id: str, uri: str | None = None) -> str:
    """The experiment's runs table; ``workflowType=machine_learning`` opens the classic ML view
    (MLflow 3.x opens its GenAI overview otherwise)."""
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def run_page_url(run_id: str, experiment_id: str, uri: str | None = None, base: str | None = None) -> str:
    """One run's page (metrics, params, artifacts), in the classic ML view too. ``base`` '' gives a
    root-relative link (for pages the MLflow server itself shows)."""
    base = ui_base(uri) if base is None else base
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def log_config_params(cfg) -> None:
    """The run's resolved config as ``config.*`` params: `mlflow run` logs its own -P values under the
    plain names (an empty one means "not given"), and MLflow never lets a param change."""
    mlflow.log_params({f"config.{k}": v for k, v in cfg.to_dict().items()})


def log_data_inputs(data, splits: tuple[str, ...] = ("train", "val", "test")) -> None:
    """The ``splits`` (a training run's three; an evaluation's one) as MLflow dataset inputs (the UI's
    Datasets panel): source, digest, shape."""
    from mlflow.data.code_dataset_source import CodeDatasetSource

    contexts = {"train": "training", "val": "validation", "test": "test"}
    for name, split in data.splits().items():
        if name not in splits:
            continue
        # a path as it was on this machine: a relative one (under `mlflow run`, relative to the project) says
        # nothing once the run is looked at from elsewhere (config.data keeps what was given)
        source = CodeDatasetSource({"generator": "fer_exp.data.synthetic", "spec": data.source}) \
            if data.format == "synthetic" else str(Path(data.source).resolve())
        with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways" (all the same one)
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_numpy(split.images.numpy(), targets=split.labels.numpy(), source=source,
                                             name=f"fer2013-{name}", digest=split.digest())
        log_input_retrying(dataset, context=contexts[name], tags={"split_rule": data.split_rule[:250], "size": str(len(split)),
                                                                  "members": split.members_digest()})


def log_input_retrying(dataset, attempts: int = 5, **options) -> None:
    """``mlflow.log_input``, again where another process registered the same dataset at the same moment:
    MLflow's SQL store looks the dataset up, then inserts it, so two first runs of one experiment (two
    tuning workers) race to its unique key and one failed with "UNIQUE constraint failed: datasets..."."""
    import time

    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, **options)
            return
        except Exception as exc:  # sqlalchemy's IntegrityError, raw or wrapped by MLflow
            text = str(exc)
            raced = "datasets" in text and ("UNIQUE constraint failed" in text or "duplicate key" in text)
            if not raced or attempt == attempts - 1:
                raise
            time.sleep(0.1 * (attempt + 1))  # the other insert has committed by then: found, linked


def run_description(cfg, data, trainable: int, total: int, tested: bool = True) -> str:
    what = {"cnn": "Custom CNN (4 conv blocks, GAP + FC)", "resnet18": "timm ResNet18"}[cfg.model]
    return (f"{what}, {total:,} parameters ({trainable:,} trainable), on {data.source} ({data.format}; "
            f"{data.split_rule}). {cfg.epochs} epochs of AdamW (lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}, "
            f"{cfg.scheduler} schedule), {cfg.class_weights} class weights, seed {cfg.seed}. The epoch with the best "
            f"{cfg.select_metric} is selected on val (metric `{SELECTED_METRIC}`)"
            + ("; test is not evaluated (a tuning trial: it selects on val)." if not tested else "; test is evaluated once, on it"
               + {"none": ".", "auto": ", with the test-time augmentation that scores best on val (tag `test_tta`)."}.get(
                   cfg.tta, f", with {cfg.tta} test-time augmentation.")))


class MLflowCallback(Callback):
    """Logs a :class:`~fer_exp.train.Trainer` run to the active MLflow run: the test evaluation's
    metrics, figure and tables when the fit made one, the checkpoints and the model when asked."""

    def __init__(self, log_model: bool = True, log_checkpoints: bool = True, tested: bool = True):
        self.log_model, self.log_checkpoints, self.tested = log_model, log_checkpoints, tested  # tested: not a trial

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.resumed_from is not None:  # params, inputs and config stay as first logged; how often and where it resumed is kept
            run = mlflow.get_run(mlflow.active_run().info.run_id)
            resumes = int(run.data.tags.get("resumes", "0")) + 1
            # what the resume changed of how it runs (MLflow never lets a param change): its own tags
            # (not its name, which the run shows, nor its experiment, where it is: neither is how it trains)
            changed = "; ".join(f"{k}: {run.data.params[f'config.{k}']} -> {v}" for k, v in trainer.cfg.to_dict().items()
                                if k not in ("run_name", "experiment_name") and f"config.{k}" in run.data.params
                                and run.data.params[f"config.{k}"] != str(v))
            mlflow.set_tags({"resumes": resumes, f"resume_{resumes}_after_epoch": trainer.epoch,
                             f"resume_{resumes}_device": str(trainer.device), f"resume_{resumes}_amp": trainer.amp_report,
                             **({f"resume_{resumes}_changed": changed[:5000]} if changed else {})})
        else:
            self.log_run_description(trainer)
        # the epochs the trainer holds that the run lacks: after a kill between an epoch's checkpoint and
        # its metrics (a resume), or every epoch of a run trained elsewhere (Trainer.replay)
        if trainer.history:
            run_id = mlflow.active_run().info.run_id
            logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "val_accuracy")}
            for row in trainer.history:
                if row["epoch"] not in logged:
                    self.on_epoch_end(trainer, row["epoch"], row)

    def log_run_description(self, trainer: Trainer) -> None:
        """A new run's config (params and config.yaml), tags, data inputs and description."""
        cfg, data = trainer.cfg, trainer.data
        trainable, total = count_parameters(trainer.model)
        log_config_params(cfg)
        mlflow.set_tags({
            "model": cfg.model, "num_params": total, "num_params_trainable": trainable,
            "data_source": data.source, "data_format": data.format, "split_rule": data.split_rule,
            **{f"{name}_size": len(split) for name, split in data.splits().items()},
            "device": str(trainer.device), "amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "off",
            "torch_version": torch.__version__, "timm_version": importlib.metadata.version("timm"),
            "pretrained_load": getattr(trainer.model, "load_report", None) or "",
            "select_metric": cfg.select_metric, "amp_choice": trainer.amp_report,
            "compile_choice": trainer.compile_report,
        })
        if "mlflow.note.content" not in mlflow.get_run(mlflow.active_run().info.run_id).data.tags:
            mlflow.set_tag("mlflow.note.content", run_description(cfg, data, trainable, total, self.tested))
        log_data_inputs(data)
        mlflow.log_text(cfg.to_yaml(), "config.yaml")
        summary = data.summary()
        # faces of val/test whose pixels are also in an earlier split (FER2013 has such copies): filterable
        mlflow.set_tags({f"duplicates_{pair.replace(' ', '_')}": f"{found['images']} ({found['other_label']} labelled otherwise)"
                         for pair, found in summary["duplicates_across_splits"].items()})
        if data.duplicates_dropped:  # duplicates: drop
            mlflow.set_tags({f"duplicates_dropped_from_{split}": n for split, n in data.duplicates_dropped.items()})
        mlflow.log_dict(summary, "data_summary.json")

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics({k: metrics[k] for k in EPOCH_METRICS if k in metrics}, step=epoch)

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        run = mlflow.active_run()
        # a run resumed after its training had ended (its end's logging failed or was interrupted) logs
        # what that end logged once: the test's metrics, the whole fit's seconds (the resume's are ~0)
        logged = set(mlflow.get_run(run.info.run_id).data.metrics) if trainer.resumed_from is not None else set()

        def new(metrics: dict) -> dict:
            return {k: v for k, v in metrics.items() if k not in logged}
        mlflow.log_metrics(new({"best_epoch": result.best_epoch, SELECTED_METRIC: result.best_value,
                                "epochs_run": trainer.epoch, "fit_seconds": result.seconds,
                                "overhead_fraction": result.overhead_fraction}))
        if result.tta_val:  # tta auto: what each candidate scored on val, which chose the test's
            mlflow.log_metrics(new({f"{trainer.cfg.select_metric}_tta_{tta}": v for tta, v in result.tta_val.items()}))
        if result.test_metrics:
            mlflow.set_tag("test_tta", result.tta)
            self.log_test_evaluation(trainer, result, skip=logged)
        if self.log_checkpoints:
            for checkpoint in (result.best_checkpoint, result.last_checkpoint):
                if checkpoint is not None:
                    mlflow.log_artifact(str(checkpoint), "checkpoints")
        if self.log_model:
            self.log_run_model(trainer, result, run)

    @staticmethod
    def log_run_model(trainer: Trainer, result: FitResult, run) -> None:
        """The run's model (registered as ``register``). A resumed run whose earlier end logged it keeps that
        one (the same weights), registering it where that had not happened, and drops those whose upload
        failed or was cut off (they would stand beside it as the run's models)."""
        from mlflow.entities import LoggedModelStatus

        from fer_exp.serving import log_model

        client, name = mlflow.MlflowClient(), trainer.cfg.register
        earlier = []
        if trainer.resumed_from is not None:
            with contextlib.suppress(mlflow.exceptions.MlflowException):  # (an MLflow 2 server has no logged models)
                earlier = client.search_logged_models([run.info.experiment_id],
                                                      filter_string=f"source_run_id = '{run.info.run_id}' and name = 'model'")
        for model in earlier:
            if model.status != LoggedModelStatus.READY:
                client.delete_logged_model(model.model_id)
        ready = [m for m in earlier if m.status == LoggedModelStatus.READY]
        if not ready:
            log_model(trainer.eval_model, trainer.cfg, registered_model_name=name or None, tta=result.tta,
                      evaluated_in=trainer.evaluated_in)
        elif name and not any(v.name == name for v in client.search_model_versions(f"run_id = '{run.info.run_id}'")):
            mlflow.register_model(f"models:/{max(ready, key=lambda m: m.creation_timestamp).model_id}", name)

    @staticmethod
    def log_test_evaluation(trainer: Trainer, result: FitResult, skip: set = frozenset()) -> None:
        test = trainer.data.test
        log_evaluation(test.labels.numpy(), result.test_probabilities, test.sources, result.test_metrics,
                       title=f"{trainer.cfg.model} test" + (f", TTA {result.tta}" if result.tta != "none" else ""),
                       copied=trainer.data.copied("test"), copy_correlation=trainer.data.copy_correlation, skip=skip)


def log_evaluation(labels: np.ndarray, probabilities: np.ndarray, sources: list[str], metrics: dict[str, float],
                   title: str, split: str = "test", copied: np.ndarray | None = None, copy_correlation: float = 1.0,
                   skip: set = frozenset()) -> None:
    """An evaluation on one split, into the active run: its metrics, the confusion-matrix figure, the
    per-class table, the classification report and every prediction (``<split>_predictions.csv``).
    ``copied``: per face, whether an earlier split of the source holds its pixels (the predictions' column
    ``copied``; the scores on the other faces are in ``metrics``, :func:`fer_exp.metrics.uncopied_metrics`), counted
    at ``copy_correlation`` (1: identical pixels; the tag ``copy_correlation`` where some face is a copy).
    Metrics named in ``skip`` (logged already) are not logged again."""
    import matplotlib.pyplot as plt

    predictions = probabilities.argmax(1)
    uncopied = {k: v for k, v in metrics.items() if k.endswith(UNCOPIED_SUFFIX)}
    chosen = {k: metrics[k] for k in TEST_METRICS} | uncopied if split == "test" else metrics
    mlflow.log_metrics({k: v for k, v in chosen.items() if k not in skip})
    figure = confusion_figure(labels, predictions, title=title)
    mlflow.log_figure(figure, "confusion_matrix.png")
    plt.close(figure)
    mlflow.log_table(per_class_table(labels, predictions), artifact_file="per_class_metrics.json")
    mlflow.log_text(report_text(labels, predictions), "classification_report.txt")
    frame = pd.DataFrame({"source": sources, "label": labels, "prediction": predictions,
                          "label_name": [CLASS_NAMES[i] for i in labels],
                          "prediction_name": [CLASS_NAMES[i] for i in predictions]})
    if copied is not None:
        frame["copied"] = copied
        if copied.any():  # which faces the uncopied scores leave out: compare rescores runs counted otherwise
            mlflow.set_tag("copy_correlation", f"{copy_correlation:g}")
    for i, name in enumerate(CLASS_NAMES):
        frame[f"prob_{name}"] = probabilities[:, i]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{split}_predictions.csv"
        frame.to_csv(path, index=False)
        mlflow.log_artifact(str(path))


@contextlib.contextmanager
def killed_on_interrupt():
    """Inside ``mlflow.start_run()``: Ctrl-C or SIGTERM (as KeyboardInterrupt) half-way through a run's
    logging ends the run KILLED, as an interrupted training run ends, not FAILED nor left RUNNING."""
    try:
        yield
    except KeyboardInterrupt:
        mlflow.end_run(status="KILLED")
        raise
