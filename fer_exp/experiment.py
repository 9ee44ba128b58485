"""One tracked training run: data -> model -> train/evaluate -> MLflow."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from fer_exp.config import Config
from fer_exp.data import load_data
from fer_exp.train import FitResult, Trainer


@dataclass
class RunSummary:
    run_id: str
    experiment_id: str
    tracking_uri: str
    result: FitResult


def run_experiment(cfg: Config, callbacks=(), progress: bool = True, log_model: bool = True) -> RunSummary:
    """Load the data, build the trainer, and train inside an MLflow run (the one ``mlflow run``
    started, if any). Extra ``callbacks`` (an Optuna pruner, say) ride along with tracking."""
    import mlflow

    from fer_exp.tracking import MLflowCallback, tracking_uri

    data = load_data(cfg.data, on_bad=cfg.on_bad, seed=cfg.seed, val_fraction=cfg.val_fraction)
    trainer = Trainer(cfg, data, checkpoint_dir=cfg.output_dir, callbacks=[MLflowCallback(log_model), *callbacks],
                      progress=progress)
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if not os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run` made the run and chose its experiment
        mlflow.set_experiment(cfg.experiment_name)
    with mlflow.start_run(run_name=cfg.run_name or None) as run:
        trainer.checkpoint_dir = Path(cfg.output_dir) / run.info.run_id / "checkpoints"
        try:
            result = trainer.fit()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the run is KILLED, last.pt of the last epoch stays
            mlflow.end_run(status="KILLED")
            print(f"\ninterrupted: run {run.info.run_id} marked KILLED after {trainer.epoch - 1} complete epoch(s); "
                  f"checkpoints in {trainer.checkpoint_dir}", file=sys.stderr)
            raise
    return RunSummary(run.info.run_id, run.info.experiment_id, uri, result)
