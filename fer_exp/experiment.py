"""One tracked training run: data -> model -> train/evaluate -> MLflow."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fer_exp.config import Config, ConfigError
from fer_exp.data import FerData, load_data
from fer_exp.train import FitResult, StopTraining, Trainer, TrainingDiverged


class TrackingError(RuntimeError):
    """The run cannot be tracked as asked (a deleted experiment, a store that refuses it); found
    before any training, with what to do about it."""


def check_output_dir(folder: str) -> None:
    """Fail now, not after the first epoch, when checkpoints cannot be written under ``folder``."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"output_dir {folder}: checkpoints cannot be written there ({exc.strerror or exc}); "
                          "choose another folder with --output-dir") from None


@dataclass
class RunSummary:
    run_id: str
    experiment_id: str
    tracking_uri: str
    result: FitResult


def load_run_data(cfg: Config) -> FerData:
    """The data a config trains on (decoded once, then read from the cache)."""
    return load_data(cfg.data, on_bad=cfg.on_bad, seed=cfg.seed, val_fraction=cfg.val_fraction)


def run_experiment(cfg: Config, callbacks=(), progress: bool = True, log_model: bool = True, *,
                   data: FerData | None = None, parent_run_id: str | None = None, experiment_id: str | None = None,
                   tags: dict | None = None, evaluate_test: bool = True, log_checkpoints: bool = True,
                   on_run_start: Callable[[str], None] | None = None) -> RunSummary:
    """Load the data (unless given), build the trainer, and train inside an MLflow run.

    The run's experiment is, in this order: ``experiment_id``; the parent run's (``parent_run_id``,
    which also nests the run under it, across processes); the run that ``mlflow run`` started
    (``MLFLOW_RUN_ID``, adopted as this run); ``cfg.experiment_name``. Extra ``callbacks`` (an Optuna
    pruner, say) ride along with tracking. A callback's :class:`StopTraining` ends the run KILLED with
    its reason as the ``stop_reason`` tag, Ctrl-C or SIGTERM likewise; any other error ends it FAILED.
    Tuning trials pass ``evaluate_test=False`` (select on val, never touch test) and no model.
    """
    import mlflow

    from fer_exp.tracking import MLflowCallback, describe_run, tracking_uri

    if data is None:
        data = load_run_data(cfg)
    check_output_dir(cfg.output_dir)
    trainer = Trainer(cfg, data, checkpoint_dir=cfg.output_dir, progress=progress,
                      callbacks=[MLflowCallback(log_model and evaluate_test, log_checkpoints), *callbacks])
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        if experiment_id is None and parent_run_id is not None:  # a child lives where its parent does
            experiment_id = mlflow.MlflowClient().get_run(parent_run_id).info.experiment_id
        if experiment_id is None and not os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run` made the run and chose its experiment
            experiment_id = mlflow.set_experiment(cfg.experiment_name).experiment_id
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"tracking store {uri}: {str(exc.message).splitlines()[0]}") from None
    with mlflow.start_run(run_name=cfg.run_name or describe_run(cfg), experiment_id=experiment_id,
                          parent_run_id=parent_run_id, tags=tags, log_system_metrics=cfg.system_metrics) as run:
        trainer.checkpoint_dir = Path(cfg.output_dir) / run.info.run_id / "checkpoints"
        if on_run_start is not None:
            on_run_start(run.info.run_id)
        try:
            result = trainer.fit(evaluate_test=evaluate_test)
        except StopTraining as stop:
            mlflow.set_tag("stop_reason", stop.reason)
            mlflow.end_run(status="KILLED")
            raise
        except TrainingDiverged as diverged:
            mlflow.set_tag("stop_reason", str(diverged))
            mlflow.end_run(status="FAILED")
            raise
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the run is KILLED, last.pt of the last epoch stays
            mlflow.set_tag("stop_reason", "interrupted (Ctrl-C or SIGTERM)")
            mlflow.end_run(status="KILLED")
            print(f"\ninterrupted: run {run.info.run_id} marked KILLED after {trainer.epoch - 1} complete epoch(s); "
                  f"checkpoints in {trainer.checkpoint_dir}", file=sys.stderr)
            raise
    return RunSummary(run.info.run_id, run.info.experiment_id, uri, result)
