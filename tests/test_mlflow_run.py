"""End to end: `mlflow run . -P model=cnn` on synthetic data into a fresh sqlite store, read back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # every test here shares or makes real `mlflow run` / `fer-exp train` processes

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
TEST_METRICS = ["test_accuracy", "test_macro_f1", "test_weighted_f1", "test_macro_precision", "test_macro_recall",
                *(f"test_acc_{c}" for c in CLASSES)]
EPOCH_METRICS = ["train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "lr"]
ARTIFACTS = ["confusion_matrix.png", "per_class_metrics.json", "classification_report.txt", "config.yaml",
             "test_predictions.csv", "checkpoints/best.pt", "checkpoints/last.pt"]


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env["FER_EXP_CACHE_DIR"] = str(tmp_path / "cache")
    env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"  # short runs still log system metrics
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's python first
    return env


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One `mlflow run` shared by the tests below (it takes about a minute on 2 CPU cores)."""
    tmp = tmp_path_factory.mktemp("mlflow_run")
    env = _env(tmp)
    mlflow_cli = [sys.executable, "-m", "mlflow"]
    cmd = [*mlflow_cli, "run", str(REPO), "-P", "model=cnn", "-P", "data=synthetic:320,64,64", "-P", "epochs=1",
           "-P", "batch_size=64", "-P", "copy_correlation=0.99", "--env-manager", "local", "--experiment-name", "e2e"]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    yield client, runs[0], tmp, env, proc.stdout + proc.stderr
    shutil.rmtree(REPO / "outputs" / runs[0].info.run_id, ignore_errors=True)


def test_run_finished_with_metrics_in_range(finished_run):
    client, run, *_ = finished_run
    assert run.info.status == "FINISHED"
    for name in TEST_METRICS:
        assert name in run.data.metrics, name
        assert 0.0 <= run.data.metrics[name] <= 1.0, (name, run.data.metrics[name])
    for name in EPOCH_METRICS:
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [1], name
    assert run.data.metrics["train_loss"] > 0 and run.data.metrics["val_loss"] > 0
    assert run.data.metrics["best_val"] == run.data.metrics["val_accuracy"]  # one epoch: it is the selected one
    assert 0 < run.data.metrics["lr"] <= 1e-3
    # the work around the steps (val pass, checkpoints, logging) is measured and logged
    assert 0 < run.data.metrics["overhead_fraction"] < 1 and run.data.metrics["epoch_overhead_seconds"] > 0


def test_params_and_tags(finished_run):
    _, run, *_ = finished_run
    params, tags = run.data.params, run.data.tags
    assert params["config.model"] == "cnn" and params["config.epochs"] == "1" and params["config.batch_size"] == "64"
    assert params["config.data"] == "synthetic:320,64,64"
    assert params["config.lr"] == "0.001"  # not given: the default
    assert params["config.copy_correlation"] == "0.99" and params["config.duplicates"] == "report"
    assert tags["model"] == "cnn" and tags["num_params"] == "584807" and tags["num_params_trainable"] == "584807"
    assert tags["data_format"] == "synthetic" and tags["train_size"] == "320" and tags["test_size"] == "64"
    assert tags["device"] == "cpu" and tags["torch_version"] and tags["timm_version"]
    assert tags["select_metric"] == "val_accuracy"
    assert run.info.run_name == "cnn 48px lr=0.001 wd=0.0001 copies@0.99 seed42"  # says what the run is
    assert "Custom CNN" in tags["mlflow.note.content"] and "584,807 parameters" in tags["mlflow.note.content"]


def test_the_splits_are_logged_as_dataset_inputs_and_system_metrics_too(finished_run):
    _, run, *_ = finished_run
    contexts = {[t.value for t in i.tags if t.key == "mlflow.data.context"][0]: i.dataset
                for i in run.inputs.dataset_inputs}
    assert set(contexts) == {"training", "validation", "test"}
    assert contexts["training"].name == "fer2013-train" and len(contexts["training"].digest) == 12
    assert len({d.digest for d in contexts.values()}) == 3  # a digest of the content: each split its own
    assert "synthetic:320,64,64" in contexts["test"].source
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert "system/system_memory_usage_megabytes" in run.data.metrics


def test_artifacts(finished_run):
    client, run, tmp, *_ = finished_run
    import pandas as pd
    import torch
    import yaml

    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp / "artifacts")))
    for name in ARTIFACTS:
        assert (local / name).is_file(), name
    assert (local / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads((local / "per_class_metrics.json").read_text())
    assert [row[0] for row in table["data"]] == list(CLASSES)
    assert "disgust" in (local / "classification_report.txt").read_text()
    assert yaml.safe_load((local / "config.yaml").read_text())["data"] == "synthetic:320,64,64"
    predictions = pd.read_csv(local / "test_predictions.csv")
    assert len(predictions) == 64
    assert list(predictions.columns[:3]) == ["source", "label", "prediction"]
    probs = predictions[[f"prob_{c}" for c in CLASSES]].to_numpy()
    assert abs(probs.sum(axis=1) - 1).max() < 1e-4
    assert (probs.argmax(axis=1) == predictions["prediction"].to_numpy()).all()
    checkpoint = torch.load(local / "checkpoints" / "best.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "config"} <= set(checkpoint)
    assert checkpoint["epoch"] == 1 and checkpoint["config"]["model"] == "cnn"


def test_model_is_logged_for_the_run(finished_run):
    client, run, *_ = finished_run
    # MLflow 3 keeps models as logged models linked to the run, not as run artifacts
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [(m.name, m.source_run_id) for m in models] == [("model", run.info.run_id)]
    # pinned, not inferred (inference re-imports the model in a subprocess at every run's end)
    import mlflow

    folder = Path(mlflow.artifacts.download_artifacts(models[0].artifact_location, tracking_uri=client.tracking_uri))
    requirements = (folder / "requirements.txt").read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert any(r.startswith("mlflow==") for r in requirements)


def test_logged_model_loads_in_a_fresh_process(finished_run):
    _, run, tmp, env, _ = finished_run
    script = (
        "import sys, numpy as np, mlflow\n"
        f"CLASSES = {CLASSES!r}\n"
        f"model = mlflow.pyfunc.load_model('runs:/{run.info.run_id}/model')\n"
        "for n in (1, 5):\n"
        "    x = np.random.default_rng(0).integers(0, 256, (n, 1, 48, 48)).astype(np.float32)\n"
        "    frame = model.predict(x)\n"
        "    p = frame[[f'prob_{c}' for c in CLASSES]].to_numpy()\n"
        "    assert p.shape == (n, 7), p.shape\n"
        "    assert (frame['emotion'] == [CLASSES[i] for i in p.argmax(1)]).all()\n"
        "    assert np.allclose(p.sum(1), 1, atol=1e-4) and (p >= 0).all()\n"
        "print('OK')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_sigterm_marks_the_run_killed_and_keeps_the_checkpoints(tmp_path):
    import signal

    from mlflow.tracking import MlflowClient

    env = _env(tmp_path)
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "fer_exp.cli", "train", "--data", "synthetic:64,16,16", "--epochs", "100000",
           "--batch-size", "16", "--experiment-name", "killed", "--output-dir", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch   1/100000"):
            # opened once the command has made the store (opening a new store as it does broke its migration)
            client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
            # resuming a run that is still training is refused (both would log into one run)
            run = client.search_runs([client.get_experiment_by_name("killed").experiment_id])[0]
            twice = subprocess.run([sys.executable, "-m", "fer_exp.cli", "train", "--resume", run.info.run_id],
                                   cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
            assert proc.poll() is None, "".join(lines)
            proc.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) == 130, output
    assert twice.returncode == 2 and f"the run is still training in process {proc.pid}" in twice.stderr, twice.stderr
    assert "Traceback" not in twice.stderr
    assert "marked KILLED" in output
    run = client.search_runs([client.get_experiment_by_name("killed").experiment_id])[0]
    assert run.info.status == "KILLED"
    assert (tmp_path / "out" / run.info.run_id / "checkpoints" / "last.pt").is_file()


def test_the_command_prints_where_to_look(finished_run):
    _, run, _, env, output = finished_run
    experiment = run.info.experiment_id
    assert f"runs page: http://127.0.0.1:5000/#/experiments/{experiment}/runs?workflowType=machine_learning" in output
    assert (f"this run:  http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run.info.run_id}"
            "?workflowType=machine_learning") in output
    assert f"mlflow ui --backend-store-uri {env['MLFLOW_TRACKING_URI']}" in output


def test_sigkill_then_resume_ends_as_an_uninterrupted_run(tmp_path):
    """A run killed with SIGKILL loses only the epoch in progress; `--resume` continues it in the same
    MLflow run and ends with the metrics of a run never interrupted (same seed, CPU)."""
    import signal

    from mlflow.tracking import MlflowClient

    from fer_exp.config import load_config
    from fer_exp.data import load_data
    from fer_exp.train import Trainer

    env = _env(tmp_path)
    env["PYTHONUNBUFFERED"] = "1"
    options = ["--data", "synthetic:96,32,32", "--epochs", "4", "--batch-size", "32", "--device", "cpu"]
    cmd = [sys.executable, "-m", "fer_exp.cli", "train", *options, "--experiment-name", "resume",
           "--output-dir", str(tmp_path / "out"), "--system-metrics", "false"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch   2/4"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    run = client.search_runs([client.get_experiment_by_name("resume").experiment_id])[0]
    assert run.info.status == "RUNNING", "".join(lines)  # SIGKILL leaves no chance to say otherwise
    resume = [sys.executable, "-m", "fer_exp.cli", "train", "--resume", run.info.run_id]
    changed = subprocess.run([*resume, "--lr", "0.5"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2 and "cannot resume with another config (lr: 0.001 -> 0.5)" in changed.stderr
    # as `mlflow run . -P resume=ID` does: MLflow makes a run of its own (named at random) for the launch,
    # without --experiment-name in the Default experiment, not beside the resumed run: that is said
    launch = client.create_run("0", run_name="skillful-lark-557").info.run_id
    done = subprocess.run(resume, cwd=tmp_path, env={**env, "MLFLOW_RUN_ID": launch}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = client.get_run(launch).data.tags
    assert record["mlflow.parentRunId"] == run.info.run_id and record["fer_exp.role"] == "launch"
    assert record["mlflow.runName"] == f"resume of {run.info.run_name}"
    assert f"resuming run {run.info.run_id} after epoch" in done.stderr
    assert (f"note: mlflow run made its own run {launch} in experiment 'Default', not beside the resumed run in "
            "'resume'; pass --experiment-name resume to mlflow run") in done.stderr
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumes"] == "1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2, 3, 4]
    cfg = load_config(overrides=dict(zip([o[2:].replace("-", "_") for o in options[::2]], options[1::2])))
    reference = Trainer(cfg, load_data(cfg.data, seed=cfg.seed), tmp_path / "ref", progress=False).fit()
    for key in ("test_accuracy", "test_macro_f1", "test_loss"):
        assert abs(run.data.metrics[key] - reference.test_metrics[key]) <= 1e-6, key
    again = subprocess.run(resume, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "is FINISHED: there is nothing to resume" in again.stderr
