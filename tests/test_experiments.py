"""Every experiment file trains end to end on a tiny synthetic run, tracked in a temp MLflow store;
every tuning study file (study and search_space blocks) runs a one-trial study; every run-study
file (arms x seeds) makes one tiny run per arm and compares them."""

from pathlib import Path

import pytest
import yaml

from fer_exp.config import STUDY_SECTIONS, TTA_CHOICES, load_config

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))
STUDIES = [p for p in EXPERIMENTS if set(STUDY_SECTIONS) & set(yaml.safe_load(p.read_text()))]
RUN_STUDIES = [p for p in EXPERIMENTS if "arms" in yaml.safe_load(p.read_text())]
TRAINING = [p for p in EXPERIMENTS if p not in STUDIES and p not in RUN_STUDIES]
TINY = {"data": "synthetic:48,16,16", "epochs": 1, "batch_size": 16, "eval_batch_size": 16}


def test_there_are_reference_experiments_and_studies():
    assert {p.name for p in TRAINING} >= {"cnn.yaml", "resnet18.yaml"}
    assert {p.name for p in STUDIES} >= {"tune_cnn.yaml", "tune_resnet18.yaml"}
    assert {p.name for p in RUN_STUDIES} >= {"reference.yaml"}


@pytest.mark.parametrize("path", TRAINING, ids=[p.stem for p in TRAINING])
@pytest.mark.slow
def test_experiment_file_smoke_run(path, store):
    from mlflow.tracking import MlflowClient

    from fer_exp.experiment import run_experiment

    cfg = load_config(path, {**TINY, "output_dir": str(store / "outputs"), "experiment_name": "smoke",
                             # no download in tests: the hub path is tested in test_models.py
                             "pretrained": "none" if load_config(path).pretrained == "imagenet" else None})
    summary = run_experiment(cfg, progress=False, log_model=cfg.model == "resnet18")
    run = MlflowClient().get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["config.model"] == load_config(path).model
    assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0
    assert (store / "outputs" / summary.run_id / "checkpoints" / "best.pt").is_file()
    if cfg.tta == "auto":  # chosen on val: every candidate's val score logged, test evaluated with the best one
        scores = {t: run.data.metrics[f"{cfg.select_metric}_tta_{t}"] for t in TTA_CHOICES}
        assert run.data.tags["test_tta"] == summary.result.tta == max(scores, key=scores.get)
    else:
        assert run.data.tags["test_tta"] == cfg.tta
    if cfg.model == "resnet18":  # the logged model rebuilds the upsampling ResNet18 from its weights
        import mlflow
        import numpy as np

        model = mlflow.pyfunc.load_model(f"runs:/{summary.run_id}/model")
        predicted = model.predict(np.zeros((3, 1, 48, 48), np.float32))
        probabilities = predicted[[c for c in predicted.columns if c.startswith("prob_")]].to_numpy()
        assert probabilities.shape == (3, 7) and np.allclose(probabilities.sum(1), 1, atol=1e-4)


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
@pytest.mark.slow
def test_study_file_smoke_run(path, store):
    """One trial of the study file (its enqueued recipe), tracked, with the file's own search space."""
    import optuna
    from mlflow.tracking import MlflowClient

    from fer_exp.tune import plan_study, tune

    plan = plan_study(path, {**TINY, "output_dir": str(store / "outputs"), "experiment_name": "smoke",
                             "pretrained": "none" if "resnet18" in path.stem else None}, {"n_trials": 1})
    result = tune(plan, progress=False)
    study = optuna.load_study(study_name=path.stem, storage=f"sqlite:///{store / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    assert study.trials[0].params == plan.enqueued[0]  # the recipe runs first
    client = MlflowClient()
    children = client.search_runs([client.get_run(result.parent_run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 1 and children[0].info.status == "FINISHED"


SMOKE_ARMS = ("recipe", "best")  # of a large study: the plain recipe and the arm with every lever but mixup (test_train.py has each)


@pytest.mark.parametrize("path", RUN_STUDIES, ids=[p.stem for p in RUN_STUDIES])
@pytest.mark.slow
def test_run_study_file_smoke_run(path, store):
    """One seed of every arm, tiny, then the comparison (the ResNet18 arm without a download)."""
    from click.testing import CliRunner
    from mlflow.tracking import MlflowClient

    from fer_exp.cli import main

    arms = list(yaml.safe_load(path.read_text())["arms"])
    common = ["--seeds", "1", "--pretrained", "none", "--data", TINY["data"], "--epochs", "1", "--batch-size", "16",
              "--eval-batch-size", "16", "--output-dir", str(store / "outputs"), "--output", str(store / "report")]
    # every arm's configuration resolves (a dry run lists them all) ...
    dry = CliRunner().invoke(main, ["study", str(path), *common, "--dry-run"])
    assert dry.exit_code == 0 and all(arm in dry.output for arm in arms), dry.output
    # ... and the arms with code paths of their own train (all of them where the study is small)
    if len(arms) > 4:
        arms = [arm for arm in arms if arm in SMOKE_ARMS]
    result = CliRunner().invoke(main, ["study", str(path), *common, "--arms", ",".join(arms)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(yaml.safe_load(path.read_text())["experiment_name"])
    runs = client.search_runs([experiment.experiment_id], f"tags.study_file = '{path.stem}'")
    assert sorted(r.data.tags["arm"] for r in runs) == sorted(arms)
    assert (store / "report" / "report.html").is_file()
