"""Every experiment file trains end to end on a tiny synthetic run, tracked in a temp MLflow store."""

from pathlib import Path

import pytest

from fer_exp.config import load_config

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))


def test_there_are_reference_experiments():
    assert {p.name for p in EXPERIMENTS} >= {"cnn.yaml", "resnet18.yaml"}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_file_smoke_run(path, store):
    from mlflow.tracking import MlflowClient

    from fer_exp.experiment import run_experiment

    cfg = load_config(path, {"data": "synthetic:48,16,16", "epochs": 1, "batch_size": 16, "eval_batch_size": 16,
                             "output_dir": str(store / "outputs"), "experiment_name": "smoke",
                             # no download in tests: the hub path is tested in test_models.py
                             "pretrained": "none" if load_config(path).pretrained == "imagenet" else None})
    summary = run_experiment(cfg, progress=False, log_model=cfg.model == "resnet18")
    run = MlflowClient().get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["config.model"] == load_config(path).model
    assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0
    assert (store / "outputs" / summary.run_id / "checkpoints" / "best.pt").is_file()
    if cfg.model == "resnet18":  # the pt2 export of the upsampling model keeps a free batch size
        import mlflow
        import numpy as np

        model = mlflow.pyfunc.load_model(f"runs:/{summary.run_id}/model")
        probabilities = np.asarray(model.predict(np.zeros((3, 1, 48, 48), np.float32)))
        assert probabilities.shape == (3, 7) and np.allclose(probabilities.sum(1), 1, atol=1e-4)
