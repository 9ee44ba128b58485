"""`fer-exp tune`: Optuna studies as nested MLflow runs, on synthetic data, end to end.

Real studies in real storages: sqlite (the default) and a real PostgreSQL server (conftest's
``postgres_url``); real worker processes, real signals. Trials are tiny CNN trainings on the CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from click.testing import CliRunner

from fer_exp.cli import main
from fer_exp.config import CHOICES, FIELDS, ConfigError
from fer_exp.experiment import database_url
from fer_exp.tune import make_pruner, make_sampler, plan_study
from fer_exp.tune_report import FIGURES, mask_url

REPO = Path(__file__).resolve().parents[1]
STUDY_FILE = """\
model: cnn
data: {data}
epochs: {epochs}
batch_size: 32
eval_batch_size: 256
early_stopping: 0
device: cpu
study:
  sampler: tpe
  sampler_startup_trials: 1
search_space:
  lr: {{type: float, low: 1.0e-7, high: 1.0e-2, log: true}}
"""


def env_for(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "FER_EXP_CACHE_DIR": str(tmp / "cache"),
            "PYTHONUNBUFFERED": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return env


def enter(tmp: Path, monkeypatch) -> None:
    """This test's process works in ``tmp`` with its store and cache, as :func:`fer_exp`'s processes do."""
    monkeypatch.chdir(tmp)
    for name, value in env_for(tmp).items():
        monkeypatch.setenv(name, value)


def fer_exp(tmp: Path, *args, timeout=600) -> subprocess.CompletedProcess:
    """`fer-exp ARGS` in a fresh process, in ``tmp``, with its own MLflow store and cache."""
    return subprocess.run([sys.executable, "-m", "fer_exp.cli", *args], cwd=tmp, env=env_for(tmp),
                          capture_output=True, text=True, timeout=timeout)


def runs_of(tmp: Path, experiment="fer2013"):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(experiment)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return client, runs


def by_role(runs, role):
    return [r for r in runs if r.data.tags.get("fer_exp.role") == role]


def load_study(tmp: Path, name: str, storage: str | None = None):
    return optuna.load_study(study_name=name, storage=storage or f"sqlite:///{tmp / 'optuna.db'}")


# ================================================================ the study file and its errors


@pytest.mark.parametrize("model", CHOICES["model"])
def test_shipped_study_files_plan(model):
    plan = plan_study(REPO / "experiments" / f"tune_{model}.yaml", {"pretrained": "none" if model == "resnet18" else None})
    names = {p.name for p in plan.space}
    assert {"lr", "weight_decay", "input_size"} <= names
    lr = next(p for p in plan.space if p.name == "lr")
    assert (lr.low, lr.high, lr.log) == (1e-5, 1e-2, True)
    sizes = next(p for p in plan.space if p.name == "input_size").choices
    assert sizes == ((48, 64, 96) if model == "cnn" else (112, 224))
    assert ("freeze_depth" in names) == (model == "resnet18")
    assert plan.config.model == model and plan.study.study_name == f"tune_{model}"
    assert plan.enqueued and all(len(trial) == len(plan.space) for trial in plan.enqueued)  # the recipe, complete


def test_command_line_fixes_a_field_for_all_trials_and_takes_it_out_of_the_space():
    plan = plan_study(REPO / "experiments" / "tune_resnet18.yaml", {"pretrained": "none", "input_size": "112"},
                      {"n_trials": "3"})
    assert "input_size" not in {p.name for p in plan.space} and plan.fixed_by_cli == ("input_size",)
    assert plan.config.input_size == 112 and plan.config.pretrained == "none" and plan.study.n_trials == 3
    assert all("input_size" not in trial for trial in plan.enqueued)
    with pytest.raises(ConfigError, match="--lr, --weight-decay, --input-size fix every field the study searches"):
        plan_study(REPO / "experiments" / "tune_cnn.yaml", {"lr": "0.01", "weight_decay": "0.001", "input_size": "48"}, {})


@pytest.mark.parametrize(
    "space, pieces",
    [
        ("  lrr: {type: float, low: 0.1, high: 0.2}", ["unknown config field 'lrr'", "Did you mean lr"]),
        ("  learning_rate: {type: float, low: 0.1, high: 0.2}", ["unknown config field 'learning_rate'", "Did you mean lr"]),
        ("  input_size: {type: int, low: 48, high: 96}", ["value 49 is not valid", "search them with type: categorical"]),
        ("  dropout: {type: float, low: 0.1, high: 0.5, step: 0.3}", ["step 0.3 does not divide the range 0.1..0.5",
                                                                     "make high 0.4"]),
        ("  lr: {type: float, low: 0.01, high: 0.001}", ["search_space.lr", "empty range"]),
        ("  lr: {type: float, low: 0, high: 0.1, log: true}", ["log range needs low > 0"]),
        ("  lr: {type: float, low: -1, high: 0.1}", ["value -1.0 is not valid", "lr must be positive"]),
        ("  freeze_depth: {type: int, low: 0, high: 2}", ["value 2 is not valid", "resnet18 only"]),
        ("  input_size: {type: categorical, choices: [48, 112]}", ["value 112 is not valid", "input_size for model cnn"]),
        ("  epochs: {type: float, low: 1, high: 3}", ["epochs is a int field"]),
        ("  lr: {type: uniform, low: 0.1, high: 0.2}", ["type must be one of float, int, categorical"]),
        ("  lr: {type: float, low: 0.1}", ["needs low and high"]),
        ("  lr: {type: float, low: 0.001, high: 0.01, steps: 3}", ["unknown key(s) steps"]),
        ("  model: {type: categorical, choices: [cnn, resnet18]}", ["model is fixed for a whole study"]),
        ("  select_metric: {type: categorical, choices: [val_accuracy, val_loss]}",
         ["select_metric is fixed for a whole study (the study's objective"]),
        ("  tta: {type: categorical, choices: [none, flip]}", ["tta is fixed for a whole study"]),
        ("  duplicates: {type: categorical, choices: [report, drop]}", ["duplicates is fixed for a whole study"]),
        ("  eval_batch_size: {type: int, low: 64, high: 512}", ["where and how runs run"]),
        ("  scheduler: {type: categorical, choices: [cosine, linear]}", ["scheduler must be one of"]),
        ("  lr: [0.1, 0.2]", ["search_space.lr must be a mapping"]),
        ("  {}", ["search_space must be a non-empty mapping"]),
    ],
)
def test_a_wrong_search_space_exits_2_before_any_trial(tmp_path, store, space, pieces):
    path = tmp_path / "study.yaml"
    path.write_text(f"model: cnn\ndata: synthetic:32,16,16\nsearch_space:\n{space}\n")
    result = CliRunner().invoke(main, ["tune", "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "Error:" in result.output
    for piece in pieces:
        assert piece in result.output, result.output
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    "args, piece",
    [
        (["--sampler", "cmaes"], "sampler must be one of tpe, random, gp"),
        (["--workers", "0"], "workers must be at least 1"),
        (["--n-trials", "-1"], "n_trials must not be negative"),
        (["--enqueue", "lr=5"], "lr=5 is outside the search space"),
        (["--enqueue", "momentum=0.9"], "'momentum=0.9' must be NAME=VALUE"),
        (["--storage", "nosuchdb://x"], "cannot open the Optuna storage nosuchdb://x"),
        (["--data", "/no/such/folder"], "/no/such/folder: no such file or folder"),
    ],
)
def test_bad_study_options_exit_2(tmp_path, store, args, piece):
    path = tmp_path / "study.yaml"
    path.write_text(STUDY_FILE.format(data="synthetic:32,16,16", epochs=1))
    result = CliRunner().invoke(main, ["tune", "--config", str(path), *args])
    assert result.exit_code == 2 and piece in result.output and "Traceback" not in result.output, result.output


def test_a_study_file_of_arms_given_to_tune_or_train_points_to_fer_exp_study(store):
    for command in ("tune", "train"):
        result = CliRunner().invoke(main, [command, "--config", str(REPO / "experiments" / "reference.yaml")])
        assert result.exit_code == 2 and "a study file of arms and seeds" in result.output, result.output
        assert "fer-exp study" in result.output


def test_retraining_the_best_of_a_study_that_is_not_there_exits_2_and_names_those_there(tmp_path, store):
    path = tmp_path / "study.yaml"
    path.write_text(STUDY_FILE.format(data="synthetic:32,16,16", epochs=1))
    result = CliRunner().invoke(main, ["tune", "--config", str(path), "--n-trials", "0", "--retrain-best",
                                       "--study-name", "mistyped"])
    assert result.exit_code == 2 and "no study 'mistyped'" in result.output and "studies there: none" in result.output
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_experiment_by_name("fer2013") is None  # no parent run made (nor an empty study)
    assert optuna.get_all_study_names(f"sqlite:///{tmp_path / 'optuna.db'}") == []


def test_a_study_cut_short_by_its_timeout_says_so(tmp_path, store):
    path = tmp_path / "study.yaml"
    path.write_text(STUDY_FILE.format(data="synthetic:32,16,16", epochs=1))
    result = CliRunner().invoke(main, ["tune", "--config", str(path), "--n-trials", "2", "--timeout", "0.001"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "--timeout 0.001 s: no trial was started after it, 0 of 2 trials finished" in result.output
    assert "with --total-trials 2 runs the rest" in result.output


def test_pretrained_weights_that_cannot_be_had_stop_the_study_before_any_trial(tmp_path, store):
    """Each trial failed on them; the worker gave up after three failed trials."""
    path = tmp_path / "study.yaml"
    path.write_text(STUDY_FILE.format(data="synthetic:32,16,16", epochs=1).replace("model: cnn", "model: resnet18"))
    result = CliRunner().invoke(main, ["tune", "--config", str(path), "--n-trials", "2", "--tracking", "false",
                                       "--pretrained", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 2 and "missing.safetensors" in result.output, result.output
    assert "No study or trial was started" in result.output and "FAIL" not in result.output
    assert optuna.get_all_study_names(f"sqlite:///{tmp_path / 'optuna.db'}") == []


def test_a_resumed_study_queues_the_enqueued_parameters_it_has_not_tried(tmp_path, store):
    """--enqueue on a resumed study was ignored without a word; now the new sets run first, those the
    study holds are not run twice, and both are said."""
    path = tmp_path / "study.yaml"
    path.write_text(STUDY_FILE.format(data="synthetic:32,16,16", epochs=1))
    args = ["tune", "--config", str(path), "--tracking", "false"]
    first = CliRunner().invoke(main, [*args, "--n-trials", "1", "--enqueue", "lr=0.003"])
    assert first.exit_code == 0, first.output + repr(first.exception)
    resumed = CliRunner().invoke(main, [*args, "--n-trials", "1", "--enqueue", "lr=0.003; lr=0.0005"])
    assert resumed.exit_code == 0, resumed.output + repr(resumed.exception)
    assert "enqueue: queued to run first: lr=0.0005" in resumed.output, resumed.output
    assert "enqueue: already trials of the study, not queued again: lr=0.003" in resumed.output
    trials = optuna.load_study(study_name="study", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    assert [t.params["lr"] for t in trials] == [0.003, 0.0005] and [t.state.name for t in trials] == ["COMPLETE"] * 2


def test_no_study_file_for_the_model_says_how_to_give_one(tmp_path, store, monkeypatch):
    monkeypatch.setattr("fer_exp.tune.REPO_EXPERIMENTS", tmp_path / "nowhere")
    result = CliRunner().invoke(main, ["tune", "--model", "resnet18"])
    assert result.exit_code == 2 and "experiments/tune_resnet18.yaml" in result.output and "--config" in result.output
    typo = CliRunner().invoke(main, ["tune", "--model", "cnnx"])
    assert typo.exit_code == 2 and "model must be one of cnn, resnet18, got 'cnnx'" in typo.output, typo.output


def test_passwords_are_masked():
    assert mask_url("postgresql://fer:s3cret@db.example:5432/optuna") == "postgresql://fer:***@db.example:5432/optuna"
    assert mask_url("sqlite:///optuna.db") == "sqlite:///optuna.db"
    assert mask_url("postgresql://fer@host/db") == "postgresql://fer@host/db"
    from fer_exp.cli import ui_hint

    for uri in ("postgresql://fer:s3cret@db/mlflow", "https://fer:s3cret@mlflow.example"):
        shown = ui_hint("0123", "7", uri)
        assert "s3cret" not in shown and "fer:***@" in shown and "/#/experiments/7/runs/0123" in shown


def test_every_sampler_and_pruner_choice_is_built():
    plan = plan_study(REPO / "experiments" / "tune_cnn.yaml")
    kinds = {name: type(make_sampler(plan.study.__class__(sampler=name), 0)).__name__ for name in CHOICES["sampler"]}
    assert kinds == {"tpe": "TPESampler", "random": "RandomSampler", "gp": "GPSampler"}
    kinds = {name: type(make_pruner(plan.study.__class__(pruner=name), 5)).__name__ for name in CHOICES["pruner"]}
    assert kinds == {"median": "MedianPruner", "hyperband": "HyperbandPruner", "none": "NopPruner"}


@pytest.mark.parametrize("warmup", [0, 1, 2])
def test_pruner_warmup_epochs_always_run_in_full(warmup):
    """`pruner_warmup_epochs: k`: the first k epochs of a trial are never pruned (trials report epochs
    1, 2, ...); the earliest prune is at epoch k + 1. (k = 1, the default, keeps the LR warm-up epoch.)"""
    import optuna

    plan = plan_study(REPO / "experiments" / "tune_cnn.yaml")
    sc = plan.study.__class__(pruner="median", pruner_startup_trials=2, pruner_warmup_epochs=warmup)
    study = optuna.create_study(direction="maximize", pruner=make_pruner(sc, 5))
    for _ in range(2):  # two good trials: 0.9 at every epoch
        trial = study.ask()
        for epoch in range(1, 6):
            trial.report(0.9, epoch)
        study.tell(trial, 0.9)
    bad = study.ask()
    pruned_at = None
    for epoch in range(1, 6):
        bad.report(0.1, epoch)
        if bad.should_prune():
            pruned_at = epoch
            break
    assert pruned_at == warmup + 1


# ================================================================ one study, resumed, on the default storage


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A 3-trial study (two learning trials, one that cannot learn), then resumed with one more trial
    and --retrain-best. Runs in-process through the CLI; about a minute on 2 CPU cores."""
    tmp = tmp_path_factory.mktemp("study")
    path = tmp / "tune_small.yaml"
    path.write_text(STUDY_FILE.format(data="synthetic:800,100,20", epochs=3))
    common = ["tune", "--config", str(path), "--pruner", "median", "--pruner-startup-trials", "2",
              "--pruner-warmup-epochs", "2"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        for name, value in env_for(tmp).items():
            mp.setenv(name, value)
        for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(name, raising=False)
        # the same learning recipe twice (same seed: the same curve), then lr 1e-7, which cannot learn
        first = CliRunner().invoke(main, [*common, "--n-trials", "3", "--enqueue", "lr=0.003; lr=0.003; lr=1e-7"])
        assert first.exit_code == 0, first.output + repr(first.exception)
        client, runs_first = runs_of(tmp)
        resumed = CliRunner().invoke(main, [*common, "--n-trials", "1", "--retrain-best", "--retrain-epochs", "1"])
        assert resumed.exit_code == 0, resumed.output + repr(resumed.exception)
        client, runs = runs_of(tmp)
        yield {"tmp": tmp, "client": client, "runs_first": runs_first, "runs": runs, "first": first.output,
               "resumed": resumed.output, "study": load_study(tmp, "tune_small")}


@pytest.mark.slow
def test_one_parent_and_a_child_per_trial(study):
    parents = by_role(study["runs_first"], "study")
    trials = by_role(study["runs_first"], "trial")
    assert len(parents) == 1 and len(trials) == 3
    parent = parents[0]
    assert parent.info.run_name == "tune_small" and parent.info.status == "FINISHED"
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["study"] == "tune_small"
        assert run.info.experiment_id == parent.info.experiment_id
    assert sorted(r.data.tags["trial"] for r in trials) == ["0", "1", "2"]


@pytest.mark.slow
def test_children_are_full_training_runs_that_never_touch_test(study):
    client = study["client"]
    for run in by_role(study["runs"], "trial"):
        params = run.data.params
        assert len([k for k in params if k.startswith("config.")]) == len(FIELDS)  # every config field
        assert params["config.model"] == "cnn" and params["config.epochs"] == "3"
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        epochs = study["study"].trials[int(run.data.tags["trial"])].user_attrs["epochs_run"]
        assert [m.step for m in history] == list(range(1, epochs + 1)) and epochs >= 1
        assert not any(k.startswith("test_") for k in run.data.metrics)
        assert "test is not evaluated (a tuning trial" in run.data.tags["mlflow.note.content"]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "checkpoints" not in artifacts and "test_predictions.csv" not in artifacts
    trial_ids = {r.info.run_id for r in by_role(study["runs"], "trial")}
    models = client.search_logged_models(experiment_ids=[study["runs"][0].info.experiment_id])
    assert not {m.source_run_id for m in models} & trial_ids  # trials export no model


@pytest.mark.slow
def test_the_trial_that_cannot_learn_is_pruned_and_its_run_killed(study):
    trials = {t.number: t for t in study["study"].trials}
    assert [trials[n].state.name for n in (0, 1, 2)] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert trials[2].params["lr"] == pytest.approx(1e-7)
    assert trials[0].value == trials[1].value  # the same config and seed on the CPU: the same run
    run = next(r for r in by_role(study["runs"], "trial") if r.data.tags["trial"] == "2")
    assert run.info.status == "KILLED"
    assert run.data.tags["trial_state"] == "PRUNED" and "pruned by Optuna at epoch 3" in run.data.tags["stop_reason"]
    assert trials[2].user_attrs["epochs_run"] == 3
    for number in (0, 1):
        run = next(r for r in by_role(study["runs"], "trial") if r.data.tags["trial"] == str(number))
        assert run.info.status == "FINISHED" and run.data.tags["trial_state"] == "COMPLETE"
        assert run.data.metrics["best_val"] == pytest.approx(trials[number].value)
        assert run.data.tags["select_metric"] == "val_accuracy"
    assert "trial 2 PRUNED" in study["first"]


@pytest.mark.slow
def test_the_parent_holds_best_value_params_table_and_figures(study):
    client = study["client"]
    parent = by_role(study["runs"], "study")[0]
    best = study["study"].best_trial
    tags, metrics = parent.data.tags, parent.data.metrics
    assert tags["best_trial"] == str(best.number) and json.loads(tags["best_params"]) == best.params
    best_run = next(r for r in by_role(study["runs"], "trial") if r.data.tags["trial"] == str(best.number))
    assert tags["best_run_id"] == best_run.info.run_id
    assert metrics["best_val"] == pytest.approx(best.value)
    assert metrics["trials_pruned"] >= 1 and metrics["trials_complete"] + metrics["trials_pruned"] == 4
    assert parent.data.params["space.lr"] == "float log 1e-07..0.01" and "config.lr" not in parent.data.params
    assert parent.data.params["config.epochs"] == "3"
    folder = Path(client.download_artifacts(parent.info.run_id, "", str(study["tmp"] / "parent")))
    for name in FIGURES:
        assert (folder / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    import pandas as pd

    table = pd.read_csv(folder / "trials.csv")
    assert list(table["number"]) == [0, 1, 2, 3] and set(table["state"]) <= {"COMPLETE", "PRUNED"}
    assert set(table["mlflow_run_id"]) == {r.info.run_id for r in by_role(study["runs"], "trial")}
    history = client.get_metric_history(parent.info.run_id, "best_val")
    assert len(history) >= 4  # after every trial, then the summary


@pytest.mark.slow
def test_a_resumed_study_adds_trials_to_the_same_study_and_parent(study):
    assert len(study["study"].trials) == 4
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in study["study"].trials) == 4
    parents = by_role(study["runs"], "study")
    assert len(parents) == 1 and parents[0].info.run_id == by_role(study["runs_first"], "study")[0].info.run_id
    assert "resumed, 3 finished trials" in study["resumed"]
    assert len(by_role(study["runs"], "trial")) == 4
    assert study["study"].trials[3].params != study["study"].trials[0].params  # new proposals, not a replay


@pytest.mark.slow
def test_retrain_best_is_tested_once_and_logs_the_model(study):
    client = study["client"]
    parent = by_role(study["runs"], "study")[0]
    retrained = by_role(study["runs"], "retrain")
    assert len(retrained) == 1
    run = retrained[0]
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.tags["study_result"] == "true" and parent.data.tags["result_run_id"] == run.info.run_id
    best = study["study"].best_trial
    assert float(run.data.params["config.lr"]) == pytest.approx(best.params["lr"])
    assert run.data.params["config.epochs"] == "1"
    assert 0 <= run.data.metrics["test_accuracy"] <= 1 and "test_macro_f1" in run.data.metrics
    assert parent.data.metrics["result_test_accuracy"] == run.data.metrics["test_accuracy"]
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.source_run_id for m in models] == [run.info.run_id]


@pytest.mark.slow
def test_an_interrupted_retraining_is_resumed_and_a_finished_one_not_made_again(store, monkeypatch):
    """Ctrl-C or SIGTERM during --retrain-best, then the same command: the retraining goes on from its
    last epoch in the same run; once finished, the same command again reuses it instead of retraining."""
    (store / "s.yaml").write_text(STUDY_FILE.format(data="synthetic:64,16,16", epochs=1))
    args = ["tune", "--config", "s.yaml", "--pruner", "none", "--retrain-best", "--retrain-epochs", "3"]
    real_log_metrics = mlflow.log_metrics

    def interrupted_at_epoch_2(metrics, *a, **kw):
        if kw.get("step") == 2:  # trials have one epoch: only the retraining reaches a second
            raise KeyboardInterrupt
        return real_log_metrics(metrics, *a, **kw)
    monkeypatch.setattr(mlflow, "log_metrics", interrupted_at_epoch_2)
    first = CliRunner().invoke(main, [*args, "--n-trials", "1"])
    assert first.exit_code == 130, first.output
    monkeypatch.setattr(mlflow, "log_metrics", real_log_metrics)
    [killed] = by_role(runs_of(store)[1], "retrain")
    assert killed.info.status == "KILLED"
    again = CliRunner().invoke(main, [*args, "--n-trials", "0"])
    assert again.exit_code == 0 and f"resuming the interrupted retraining, run {killed.info.run_id}" in again.output, again.output
    client, runs = runs_of(store)
    [run] = by_role(runs, "retrain")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2, 3]
    third = CliRunner().invoke(main, [*args, "--n-trials", "0"])
    assert third.exit_code == 0 and f"already retrained: run {run.info.run_id}" in third.output, third.output
    assert len(by_role(runs_of(store)[1], "retrain")) == 1
    parent = by_role(runs_of(store)[1], "study")[0]
    assert parent.data.tags["result_run_id"] == run.info.run_id


def test_a_stop_as_the_last_trial_finishes_starts_no_retraining(store, monkeypatch):
    """Ctrl-C just after the study's last trial was told: the command ends interrupted (exit 130, parent
    KILLED) instead of starting --retrain-best only to kill it; the same command then retrains."""
    from fer_exp import train
    from fer_exp.tune import Worker

    (store / "s.yaml").write_text(STUDY_FILE.format(data="synthetic:64,16,16", epochs=1))
    args = ["tune", "--config", "s.yaml", "--pruner", "none", "--retrain-best", "--retrain-epochs", "1"]
    real_finish = Worker.finish

    def stop_after_telling(self, *a, **kw):
        told = real_finish(self, *a, **kw)
        train._stop_requested.set()  # as stop_on_signals' handler does
        return told
    monkeypatch.setattr(Worker, "finish", stop_after_telling)
    try:
        first = CliRunner().invoke(main, [*args, "--n-trials", "1"])
    finally:
        train._stop_requested.clear()
    assert first.exit_code == 130 and "interrupted: resume with the same command" in first.output, first.output
    assert "with --total-trials 1: its trials are done, so it only retrains the best" in first.output
    assert "retraining" not in first.output
    _, runs = runs_of(store)
    assert by_role(runs, "retrain") == [] and by_role(runs, "study")[0].info.status == "KILLED"
    monkeypatch.setattr(Worker, "finish", real_finish)
    again = CliRunner().invoke(main, [*args, "--total-trials", "1"])
    assert again.exit_code == 0 and "retraining trial #0" in again.output, again.output
    [run] = by_role(runs_of(store)[1], "retrain")
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_a_changed_study_is_refused_on_resume(study, monkeypatch):
    tmp = study["tmp"]
    enter(tmp, monkeypatch)
    result = CliRunner().invoke(main, ["tune", "--config", str(tmp / "tune_small.yaml"), "--batch-size", "16"])
    assert result.exit_code == 2 and "made with another configuration (batch_size: 32 -> 16)" in result.output
    assert "--study-name" in result.output
    assert len(load_study(tmp, "tune_small").trials) == 4


@pytest.mark.slow
def test_a_study_resumed_on_other_faces_or_with_its_parent_run_deleted_is_refused(study, monkeypatch):
    """--data is resumable (the same faces at another path), but not other faces: their trials would not
    compare. A parent run deleted in the UI is said, with how to restore it."""
    tmp = study["tmp"]
    enter(tmp, monkeypatch)
    other = CliRunner().invoke(main, ["tune", "--config", str(tmp / "tune_small.yaml"), "--n-trials", "1",
                                      "--data", "synthetic:800,101,20"])
    assert other.exit_code == 2 and "was made on other faces than --data synthetic:800,101,20" in other.output, other.output
    assert "its val split(s) differ" in other.output
    parent = study["study"].user_attrs["mlflow_parent_run_id"]
    client = study["client"]
    client.delete_run(parent)
    try:
        deleted = CliRunner().invoke(main, ["tune", "--config", str(tmp / "tune_small.yaml"), "--n-trials", "0"])
        assert deleted.exit_code == 2 and f"its run {parent} is deleted" in deleted.output, deleted.output
        assert f"mlflow runs restore --run-id {parent}" in deleted.output and "Traceback" not in deleted.output
    finally:
        client.restore_run(parent)
    assert len(load_study(tmp, "tune_small").trials) == 4


@pytest.mark.slow
def test_a_trial_s_run_is_not_resumed_as_a_training_run(study, monkeypatch):
    """It would be tested and log a model: trials select on val only; its study resumes it."""
    tmp = study["tmp"]
    enter(tmp, monkeypatch)
    trial = next(r for r in by_role(study["runs"], "trial") if r.info.status == "KILLED")  # the pruned one
    result = CliRunner().invoke(main, ["train", "--resume", trial.info.run_id])
    assert result.exit_code == 2 and "of the tuning study tune_small" in result.output, result.output
    assert "run the same fer-exp tune command again" in result.output
    assert study["client"].get_run(trial.info.run_id).info.status == "KILLED"


def test_a_study_recorded_before_a_config_field_existed_resumes(study, monkeypatch):
    """A study whose stored definition lacks a field added since (tta) was made with its default: the
    same command resumes it."""
    tmp = study["tmp"]
    enter(tmp, monkeypatch)
    stored = load_study(tmp, "tune_small")
    definition = stored.user_attrs["definition"]
    stored.set_user_attr("definition", {**definition, "config": {k: v for k, v in definition["config"].items()
                                                                  if k != "tta"}})
    try:
        result = CliRunner().invoke(main, ["tune", "--config", str(tmp / "tune_small.yaml"), "--n-trials", "0"])
        assert result.exit_code == 0, result.output + repr(result.exception)
        changed = CliRunner().invoke(main, ["tune", "--config", str(tmp / "tune_small.yaml"), "--n-trials", "0",
                                            "--tta", "flip"])
        assert changed.exit_code == 2 and "(tta: 'none' -> 'flip')" in changed.output
    finally:
        stored.set_user_attr("definition", definition)
    assert len(load_study(tmp, "tune_small").trials) == 4


# ================================================================ seeds, workers, signals


def test_the_sampler_is_seeded(tmp_path, store):
    """Two new studies with the same seed propose the same trials; another seed does not."""
    from fer_exp.tune import tune

    (tmp_path / "s.yaml").write_text(STUDY_FILE.format(data="synthetic:32,16,16", epochs=1))
    proposals = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        plan = plan_study(tmp_path / "s.yaml", {"seed": seed},
                          {"study_name": name, "n_trials": 3, "tracking": False, "pruner": "none"})
        tune(plan, progress=False)
        proposals.append([t.params["lr"] for t in load_study(tmp_path, name).trials])
    assert proposals[0] == proposals[1] and len(set(proposals[0])) == 3
    assert proposals[2] != proposals[0]
    assert not (tmp_path / "mlflow.db").exists()  # tracking off: Optuna's storage only


def test_processes_asking_at_once_propose_different_trials(tmp_path):
    """Commands (or workers) with one seed asking a study for trials at the same moment propose
    different ones (the sampler is seeded per trial number), where one seed per command made them run
    identical trials; the same seed still proposes the same study."""
    from fer_exp.config import StudyConfig
    from fer_exp.tune import trial_seeded_sampler

    storage = f"sqlite:///{tmp_path / 'o.db'}"
    optuna.create_study(study_name="s", storage=storage)
    config = StudyConfig(sampler="tpe", sampler_startup_trials=5)

    def ask(name, *, seed=42):  # a process's own view of the study, asking before the others have told
        study = optuna.load_study(study_name=name, storage=storage,
                                  sampler=trial_seeded_sampler(lambda s: make_sampler(config, s), seed))
        trial = study.ask()
        return trial.number, trial.suggest_float("lr", 1e-7, 1e-2, log=True)

    together = [ask("s") for _ in range(3)]
    assert [number for number, _ in together] == [0, 1, 2] and len({lr for _, lr in together}) == 3
    optuna.create_study(study_name="again", storage=storage)
    assert [ask("again") for _ in range(3)] == together  # the same seed, the same proposals
    optuna.create_study(study_name="other", storage=storage)
    assert ask("other", seed=7) != together[0]


def test_a_resumed_trial_reports_the_epochs_it_goes_on_from():
    """The retry that goes on from an interrupted trial's epoch 3 reports epochs 1-3 from the run's history
    (the pruner sees the whole curve) and counts them as resumed: stopped again before epoch 4 ends, it
    has run 3 epochs of which 3 are resumed (not 0 and -3)."""
    from pathlib import Path as P
    from types import SimpleNamespace

    from fer_exp.tune import PruningCallback

    trial = optuna.create_study(direction="maximize").ask()
    pruning = PruningCallback(trial, "val_accuracy")
    history = [{"epoch": e, "val_accuracy": 0.1 * e} for e in (1, 2, 3)]
    pruning.on_fit_start(SimpleNamespace(resumed_from=P("last.pt"), epoch=3, history=history))
    assert (pruning.epochs, pruning.resumed_after) == (3, 3)
    assert trial.storage.get_trial(trial._trial_id).intermediate_values == {1: 0.1, 2: 0.2, 3: 0.1 * 3}
    fresh = PruningCallback(trial, "val_accuracy")
    fresh.on_fit_start(SimpleNamespace(resumed_from=None, epoch=0, history=[]))
    assert (fresh.epochs, fresh.resumed_after) == (0, 0)


def test_queued_trials_beyond_the_target_stay_queued(tmp_path):
    """Two workers resuming a study whose interrupted trials were queued again, with room for one more
    trial: the first takes a queued trial, the second waits rather than taking the other and dropping it
    (and its parameters) as surplus."""
    from fer_exp.tune import Worker, WorkerSpec

    (tmp_path / "s.yaml").write_text(STUDY_FILE.format(data="synthetic:32,16,16", epochs=1))
    plan = plan_study(tmp_path / "s.yaml", None, {"study_name": "s", "tracking": False, "heartbeat": 10})
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    study_ = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    distributions = {"lr": optuna.distributions.FloatDistribution(1e-7, 1e-2, log=True)}
    study_.add_trial(optuna.trial.create_trial(params={"lr": 1e-3}, distributions=distributions, value=0.5))
    for lr in (2e-3, 3e-3):  # queued again after an interruption
        study_.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING, params={"lr": lr},
                                                   distributions=distributions))
    # (the deadline within the running trial's 30 s of heartbeats, and past a loaded machine's set-up)
    workers = [Worker(WorkerSpec(plan, storage, 2, time.time() + 6, 42, w, 2)) for w in (0, 1)]
    first = workers[0].claim()
    assert first is not None and first.params == {"lr": 2e-3}
    assert workers[1].claim() is None  # the deadline passes while it waits for the first to finish
    assert [t.state.name for t in study_.trials] == ["COMPLETE", "RUNNING", "WAITING"]
    # a stop (Ctrl-C, SIGTERM) that comes between trials starts no new one: nothing asked, nothing to fail
    from fer_exp import train

    train._stop_requested.set()
    try:
        with pytest.raises(KeyboardInterrupt):
            Worker(WorkerSpec(plan, storage, 3, None, 42, 0, 1)).claim()
    finally:
        train._stop_requested.clear()
    assert [t.state.name for t in optuna.load_study(study_name="s", storage=storage).trials] == ["COMPLETE", "RUNNING", "WAITING"]
    # the interrupted trial queued again keeps its parameters and origin, not the rungs it had passed
    # (SuccessiveHalving and Hyperband skip the rungs a trial holds: the retry would pass them unjudged)
    workers[0].storage.set_trial_system_attr(first._trial_id, "completed_rung_0", 0.4)
    workers[0].queue_again(first, [])
    retry = optuna.load_study(study_name="s", storage=storage).trials[-1]
    assert retry.state.name == "WAITING" and retry.params == {"lr": 2e-3}
    assert retry.system_attrs == {"failed_trial": first.number}


@pytest.mark.slow
def test_two_workers_finish_exactly_n_trials_on_sqlite(tmp_path):
    (tmp_path / "s.yaml").write_text(STUDY_FILE.format(data="synthetic:64,16,16", epochs=1))
    proc = fer_exp(tmp_path, "tune", "--config", "s.yaml", "--workers", "2", "--n-trials", "5", "--pruner", "none")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "database is locked" not in output
    assert {"[worker 0] trial", "[worker 1] trial"} <= {line[:16] for line in output.splitlines()}
    study_ = load_study(tmp_path, "s")
    assert [t.state.name for t in study_.trials] == ["COMPLETE"] * 5
    _, runs = runs_of(tmp_path)
    trials = by_role(runs, "trial")
    assert sorted(int(r.data.tags["trial"]) for r in trials) == [0, 1, 2, 3, 4]  # each once
    assert {r.info.status for r in trials} == {"FINISHED"}
    assert {r.data.tags["worker"] for r in trials} == {"0", "1"}
    assert {t.user_attrs["mlflow_run_id"] for t in study_.trials} == {r.info.run_id for r in trials}


def _start(tmp: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fer_exp.cli", *args], cwd=tmp, env=env_for(tmp),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _read_until(proc: subprocess.Popen, predicate, lines: list, limit=300) -> str:
    start = time.time()
    for line in proc.stdout:
        lines.append(line)
        if predicate(line):
            return line
        assert time.time() - start < limit, "".join(lines)
    raise AssertionError("process ended before the expected line:\n" + "".join(lines))


@pytest.mark.slow
def test_sigterm_stops_the_study_cleanly_and_the_same_command_resumes_it(tmp_path):
    """SIGTERM mid-trial: the trial's run KILLED, the parent KILLED, exit 130. The same command then runs
    the interrupted trial again (its parameters, not a new proposal), going on in its run from its last
    epoch, with the values it had reported kept for the pruner."""
    epochs = 20
    (tmp_path / "s.yaml").write_text(STUDY_FILE.format(data="synthetic:256,16,16", epochs=epochs))
    args = ["tune", "--config", "s.yaml", "--pruner", "none"]
    proc = _start(tmp_path, *args, "--n-trials", "3")
    lines: list[str] = []
    _read_until(proc, lambda line: "trial 0 started" in line, lines)
    started = time.time()
    while not list(tmp_path.glob("outputs/*/checkpoints/last.pt")):  # an epoch finished
        assert time.time() - started < 120 and proc.poll() is None, "".join(lines)
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) == 130, output
    assert "interrupted: resume with the same command, with --total-trials 3 for the 3 trial(s) of this one still to run " \
           "(as it is, it adds 3 more)" in output, output
    assert "trial 0: interrupted; queued again for the command that resumes the study (it goes on from its last epoch)" in output
    client, runs = runs_of(tmp_path)
    parent = by_role(runs, "study")[0]
    assert parent.info.status == "KILLED"
    assert "RUNNING" not in {r.info.status for r in runs}
    study_ = load_study(tmp_path, "s")
    assert study_.trials[0].state.name == "FAIL"
    [killed] = [r for r in by_role(runs, "trial") if r.data.tags["trial"] == "0"]
    assert killed.info.status == "KILLED"
    done = len(client.get_metric_history(killed.info.run_id, "val_accuracy"))
    assert 1 <= done < epochs, output

    proc = fer_exp(tmp_path, *args, "--n-trials", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    client, runs = runs_of(tmp_path)
    assert [r.info.run_id for r in by_role(runs, "study")] == [parent.info.run_id]
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    trials = load_study(tmp_path, "s").trials
    assert sum(t.state.name == "COMPLETE" for t in trials) == 1
    # the interrupted trial was queued again: the resumed command ran its parameters, not a new proposal
    assert trials[1].state.name == "COMPLETE" and trials[1].system_attrs.get("failed_trial") == 0
    assert trials[1].params == trials[0].params and "error" not in trials[1].user_attrs
    assert "(retry of trial 0)" in proc.stdout
    assert f"queued again: trial 0 (lr={trials[0].params['lr']:.3g}) from its last epoch" in proc.stdout
    # ... in the interrupted trial's run, from its last checkpoint: each epoch trained and logged once
    assert trials[1].user_attrs["mlflow_run_id"] == killed.info.run_id
    assert "resuming run" in proc.stdout + proc.stderr
    run = client.get_run(killed.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["trial"] == "1" and run.data.tags["trial_state"] == "COMPLETE"
    assert run.data.tags["retry_of_trial"] == "0" and "error" not in run.data.tags and "stop_reason" not in run.data.tags
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == list(range(1, epochs + 1))
    assert sorted(trials[1].intermediate_values) == list(range(1, epochs + 1))
    assert trials[1].user_attrs["epochs_resumed"] >= done  # (the checkpoint may be an epoch ahead of the metrics)
    assert not (tmp_path / "outputs" / run.info.run_id).exists()  # trials keep no weights once finished
    assert f"epochs spent: {epochs} of {epochs}" in proc.stdout  # the resumed epochs are not counted twice


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie no one reaps, as under a container's init, does not)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.slow
def test_workers_stop_when_their_command_is_killed(tmp_path):
    """SIGKILL of `fer-exp tune --workers 2` (nothing can be forwarded): its workers stop within seconds,
    their trials' runs KILLED, rather than running on unseen and taking new trials."""
    (tmp_path / "s.yaml").write_text(STUDY_FILE.format(data="synthetic:256,16,16", epochs=50))
    proc = _start(tmp_path, "tune", "--config", "s.yaml", "--workers", "2", "--n-trials", "4", "--pruner", "none")
    lines: list[str] = []
    pids = []
    while len(pids) < 2:
        pids.append(int(_read_until(proc, lambda line: line.startswith("worker "), lines).split("pid ")[1].rstrip(")\n")))
    running: set[str] = set()  # both workers in a trial, whichever started first
    while running != {"0", "1"}:
        running.add(_read_until(proc, lambda line: line.startswith("[worker ") and "started" in line, lines)[8])
    proc.kill()
    proc.wait(timeout=60)
    started = time.time()
    while any(_alive(pid) for pid in pids):
        assert time.time() - started < 90, f"workers {[p for p in pids if _alive(p)]} still run after their command died"
        time.sleep(0.5)
    _, runs = runs_of(tmp_path)
    statuses = [r.info.status for r in by_role(runs, "trial")]
    # none RUNNING: a trial whose run had begun is KILLED; one stopped before its run began made none
    assert set(statuses) <= {"KILLED", "FINISHED"}, statuses
    assert "RUNNING" not in {t.state.name for t in load_study(tmp_path, "s").trials}


@pytest.mark.slow
def test_a_killed_worker_s_trial_is_failed_and_retried_on_postgresql(tmp_path, postgres_url):
    """Two workers on a real PostgreSQL study; one is SIGKILLed mid-trial. The other fails that
    trial through its heartbeat, runs it again, and the study ends with the trials asked for."""
    (tmp_path / "s.yaml").write_text(STUDY_FILE.format(data="synthetic:256,16,16", epochs=3))
    proc = _start(tmp_path, "tune", "--config", "s.yaml", "--storage", postgres_url, "--workers", "2",
                  "--n-trials", "3", "--pruner", "none", "--heartbeat", "1", "--study-name", "pg")
    lines: list[str] = []
    pids = {}
    while len(pids) < 2:
        line = _read_until(proc, lambda line: line.startswith("worker "), lines)
        pids[line.split()[1]] = int(line.split("pid ")[1].rstrip(")\n"))
    line = _read_until(proc, lambda line: line.startswith("[worker 1] trial") and "started" in line, lines)
    killed_trial = int(line.split("trial ")[1].split()[0])
    started = time.time()
    while "mlflow_run_id" not in load_study(tmp_path, "pg", postgres_url).trials[killed_trial].user_attrs:
        assert time.time() - started < 120, "".join(lines)
        time.sleep(0.5)
    time.sleep(2)  # mid-trial: its MLflow run exists and it has beaten its heart
    os.kill(pids["1"], signal.SIGKILL)
    output = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=600) == 0, output
    assert "pg-secret-7f3a" not in output  # the password is masked in everything printed
    study_ = load_study(tmp_path, "pg", postgres_url)
    states = {t.number: t.state.name for t in study_.trials}
    assert states[killed_trial] == "FAIL", output
    assert list(states.values()).count("COMPLETE") == 3, output
    retry = [t for t in study_.trials if t.system_attrs.get("failed_trial") == killed_trial]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert retry[0].params == study_.trials[killed_trial].params
    client, runs = runs_of(tmp_path)
    assert "RUNNING" not in {r.info.status for r in runs}
    lost = client.get_run(study_.trials[killed_trial].user_attrs["mlflow_run_id"])
    assert lost.info.status == "FAILED" and lost.data.tags["trial_state"] == "FAIL"
    retried = client.get_run(retry[0].user_attrs["mlflow_run_id"])
    assert retried.info.status == "FINISHED" and retried.data.tags["retry_of_trial"] == str(killed_trial)
    parent = by_role(runs, "study")[0]
    assert parent.data.tags["study_storage"] == postgres_url.replace("pg-secret-7f3a", "***")
    assert "pg-secret-7f3a" not in json.dumps([r.data.params | r.data.tags for r in runs])
    for run in (parent, retried):  # nor in any artifact, nor in what the study itself keeps
        folder = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id)))
        for file in folder.rglob("*"):
            assert not file.is_file() or b"pg-secret-7f3a" not in file.read_bytes(), file
    kept = [study_.user_attrs] + [[t.user_attrs, t.system_attrs] for t in study_.trials]
    assert "pg-secret-7f3a" not in json.dumps(kept, default=str)


@pytest.mark.slow
def test_mlflow_run_tune_entry_point(tmp_path):
    """`mlflow run . -e tune` as the README shows it (tiny data): the run MLflow makes is the parent."""
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "tune", "-P", "model=resnet18",
           "-P", "data=synthetic:32,16,16", "-P", "n_trials=2", "-P", "epochs=1", "-P", "pretrained=none",
           "-P", "batch_size=16", "-P", "copy_correlation=0.99", "--env-manager", "local", "--experiment-name", "tuning"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    client, runs = runs_of(tmp_path, "tuning")
    roots = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(roots) == 1 and roots[0].data.tags["fer_exp.role"] == "study"
    assert roots[0].info.run_name == "tune_resnet18"  # the study's name, not one MLflow drew at random
    assert roots[0].data.params["model"] == "resnet18" and roots[0].data.params["n_trials"] == "2"  # -P values
    children = by_role(runs, "trial")
    assert len(children) == 2 and {r.data.tags["mlflow.parentRunId"] for r in children} == {roots[0].info.run_id}
    assert {r.data.params["config.model"] for r in children} == {"resnet18"}
    assert {r.data.params["config.copy_correlation"] for r in children} == {"0.99"}
    assert {r.info.status for r in runs} == {"FINISHED"}


def _start_together(script: str, n: int, tmp_path: Path) -> list[subprocess.CompletedProcess]:
    """``n`` python processes running ``script``, in step as commands started together would be: at each
    ``# together`` line every process says it is there and waits until all are (the first: once their
    imports are done)."""
    parts = script.split("# together\n")
    code = parts[0]
    for i, part in enumerate(parts[1:]):
        here, go = tmp_path / f"here{i}", tmp_path / f"go{i}"
        here.mkdir()
        code += (f"import os, pathlib, time\npathlib.Path({str(here)!r}, str(os.getpid())).touch()\n"
                 f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.005)\n" + part)
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(n)]
    start = time.time()
    for i in range(len(parts) - 1):
        while (len(list((tmp_path / f"here{i}").iterdir())) < n and all(p.poll() is None for p in procs)
               and time.time() - start < 300):
            time.sleep(0.02)
        (tmp_path / f"go{i}").touch()
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), p.stdout.read()) for p in procs]


def test_runs_started_together_on_a_new_store_all_log(tmp_path):
    """MLflow makes a new sqlite store's tables in the first process to open it; three at once broke each
    other's migrations (two of three died with a SQL traceback) until the store was made under a lock."""
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    script = (f"import mlflow\nfrom fer_exp.experiment import check_tracking_store\n# together\n"
              f"check_tracking_store({uri!r})\nmlflow.set_tracking_uri({uri!r})\n"
              "experiment = mlflow.set_experiment('together').experiment_id\n"
              "with mlflow.start_run(experiment_id=experiment): mlflow.log_metric('m', 1)\n")
    for proc in _start_together(script, 4, tmp_path):
        assert proc.returncode == 0, proc.stdout[-3000:]
    client = mlflow.MlflowClient(uri)
    assert len(client.search_runs([client.get_experiment_by_name("together").experiment_id])) == 4
    assert list((tmp_path / "new").iterdir()) == [tmp_path / "new" / "mlflow.db"]  # no lock file left beside it


def test_the_database_lock_is_reentrant_in_its_thread_and_held_against_others(tmp_path):
    """`fer-exp study` holds the store's lock while a run starts, and starting it opens the store under
    the lock again: a second flock of the thread's own would wait for the first forever. Another
    thread (as another process) still waits for it."""
    import threading

    from fer_exp.experiment import database_lock

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    order: list[str] = []

    def other():
        with database_lock(uri):
            order.append("other")

    def holder():
        with database_lock(uri):
            with database_lock(uri):
                order.append("inner")
            waiting = threading.Thread(target=other, daemon=True)
            waiting.start()
            waiting.join(1.0)
            order.append("outer")
        waiting.join(10)

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "database_lock taken twice by one thread waits for itself"
    assert order == ["inner", "outer", "other"]


def _new_postgres_database(postgres_url: str, name: str) -> str:
    """A new, empty database on conftest's server, owned by its user; its URL."""
    import sqlalchemy

    admin = postgres_url.replace("fer:pg-secret-7f3a@", "postgres@").rsplit("/", 1)[0] + "/postgres"  # trust auth
    engine = sqlalchemy.create_engine(admin.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {name} OWNER fer"))
    engine.dispose()
    return postgres_url.rsplit("/", 1)[0] + "/" + name


def _new_storage(kind: str, tmp_path: Path, request) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'optuna.db'}"
    return _new_postgres_database(request.getfixturevalue("postgres_url"), f"{kind}_{tmp_path.name.lower()}"[:60])


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_studies_started_together_on_a_new_storage_make_one_study(tmp_path, request, kind):
    """`fer-exp tune` commands started together on one new storage (on one machine, or on several against
    PostgreSQL): one makes the tables, the study (its definition, the enqueued recipe) and its parent
    run, the others find them; their summaries of the parent run follow one another. Without the lock
    most of four died with a SQL traceback ("table studies already exists", "UNIQUE constraint failed:
    tags.key, tags.run_uuid"), made parent runs of their own, or enqueued the recipe again."""
    url = _new_storage(kind, tmp_path, request)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = ("import os\nfrom fer_exp.experiment import check_tracking_store\n"
              "from fer_exp.tune import join_study, plan_study\n"
              f"os.environ['MLFLOW_TRACKING_URI'] = {uri!r}\ncheck_tracking_store({uri!r})\n"
              f"plan = plan_study({str(REPO / 'experiments' / 'tune_cnn.yaml')!r})\n# together\n"
              f"study, resumed, parent = join_study(plan, {url!r})\n# together\nparent.summarise('FINISHED')\n"
              "print('resumed', resumed)\n")
    procs = _start_together(script, 4, tmp_path)
    for proc in procs:
        assert proc.returncode == 0, mask_url(proc.stdout[-3000:])
    assert sorted(p.stdout.split()[-1] for p in procs) == ["False", "True", "True", "True"]
    [summary] = optuna.study.get_all_study_summaries(database_url(url))
    study_ = optuna.load_study(study_name=summary.study_name, storage=database_url(url))
    assert len(study_.trials) == len(plan_study(REPO / "experiments" / "tune_cnn.yaml").enqueued) > 0
    client = mlflow.MlflowClient(uri)
    [parent] = client.search_runs([client.get_experiment_by_name("fer2013").experiment_id])
    assert parent.info.run_id == study_.user_attrs["mlflow_parent_run_id"] and parent.info.status == "FINISHED"


@pytest.mark.slow
def test_tune_commands_started_together_on_new_stores_run_the_study_s_total(tmp_path, postgres_url):
    """Three real `fer-exp tune` commands, as on three machines started at once: a new MLflow store,
    a new PostgreSQL storage, `--total-trials 3`: all end well, with three trials under one parent run."""
    (tmp_path / "s.yaml").write_text(STUDY_FILE.format(data="synthetic:64,16,16", epochs=1))
    storage = _new_postgres_database(postgres_url, f"e2e_{tmp_path.name.lower()}"[:60])
    procs = [_start(tmp_path, "tune", "--config", "s.yaml", "--storage", storage, "--total-trials", "3",
                    "--pruner", "none") for _ in range(3)]
    for proc in procs:
        output = proc.stdout.read()
        assert proc.wait(timeout=600) == 0, mask_url(output[-3000:])
    study_ = load_study(tmp_path, "s", database_url(storage))
    claimed = [t for t in study_.trials if not t.user_attrs.get("surplus")]  # two asks at one moment: one gives way
    assert [t.state for t in claimed] == [optuna.trial.TrialState.COMPLETE] * 3
    _, runs = runs_of(tmp_path)
    [parent] = by_role(runs, "study")
    assert parent.info.status == "FINISHED" and parent.data.tags["trials_complete"] == "3"
    trials = by_role(runs, "trial")
    assert len(trials) == 3 and {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}


def test_the_epochs_saved_count_only_finished_trials():
    """A failed or interrupted trial's epochs are spent but never possible: counted apart, so the
    saving is never negative ("13 of 12, -8% saved" before)."""
    from fer_exp.tune_report import study_summary

    plan = plan_study(REPO / "experiments" / "tune_cnn.yaml", {"epochs": "4"})
    study_ = optuna.create_study(direction="maximize")
    for state, epochs in (("COMPLETE", 4), ("PRUNED", 2), ("FAIL", 3)):
        trial = optuna.trial.create_trial(state=getattr(optuna.trial.TrialState, state), user_attrs={"epochs_run": epochs},
                                          value=0.5 if state == "COMPLETE" else None)
        study_.add_trial(trial)
    summary = study_summary(study_, plan)
    assert (summary["epochs_finished"], summary["epochs_possible"], summary["epochs_spent"]) == (6, 8, 9)
