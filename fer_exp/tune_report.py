"""What a tuning study shows: its parent MLflow run (created once, reopened on resume, summarised
at the end), the trials table, the summary and Optuna's figures. :mod:`fer_exp.tune` runs the study."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

from typing import TYPE_CHECKING

from fer_exp.errors import first_line
from fer_exp.search_space import space_spec

if TYPE_CHECKING:
    from fer_exp.tune import StudyPlan


class StudyError(RuntimeError):
    """The study cannot run as asked (storage, resume mismatch, tracking store); says how to fix it."""


def mask_url(url: str) -> str:
    """The URL with its password replaced by *** (for logs, tags and the console)."""
    return re.sub(r"(://[^:/@\s]*:)[^@/\s]+@", r"\1***@", url)


class ParentRun:
    """The study's MLflow run: created once, reopened on resume, summarised at the end."""

    def __init__(self, plan: StudyPlan, study, storage_url: str):
        import mlflow

        from fer_exp.tracking import tracking_uri

        self.plan, self.study, self.storage_url = plan, study, storage_url
        self.uri = tracking_uri()
        mlflow.set_tracking_uri(self.uri)
        self.client = mlflow.MlflowClient()
        # `mlflow run -e tune` made a run for this launch; children must not adopt it through the env
        launch = os.environ.pop("MLFLOW_RUN_ID", None)
        known = study.user_attrs.get("mlflow_parent_run_id")
        if known:
            try:
                run = self.client.get_run(known)
            except Exception:
                raise StudyError(
                    f"study {plan.study.study_name!r} keeps its runs under parent run {known}, which the tracking "
                    f"store {mask_url(self.uri)} does not have. Point MLFLOW_TRACKING_URI at the store the study "
                    "started with, or use a new --study-name.") from None
            experiment = self.client.get_experiment(run.info.experiment_id)
            if run.info.lifecycle_stage != "active" or experiment.lifecycle_stage != "active":
                where = (f"run {known}" if run.info.lifecycle_stage != "active" else
                         f"experiment {experiment.name} ({experiment.experiment_id})")
                restore = (f"mlflow runs restore --run-id {known}" if run.info.lifecycle_stage != "active" else
                           f"mlflow experiments restore --experiment-id {experiment.experiment_id}")
                raise StudyError(f"study {plan.study.study_name!r} keeps its runs under parent run {known}, and its "
                                 f"{where} is deleted in {mask_url(self.uri)}: restore it (`{restore}`, or the MLflow "
                                 "UI's deleted runs) to resume the study, or use a new --study-name.")
            self.run_id, self.experiment_id = known, run.info.experiment_id
            self.client.update_run(known, status="RUNNING")
            if launch and launch != known:  # keep the launch as a small record under the study's run
                self.client.set_tag(launch, "mlflow.parentRunId", known)
                self.client.set_tag(launch, "fer_exp.role", "launch")
                self.client.set_tag(launch, "study", plan.study.study_name)
                self.client.set_tag(launch, "mlflow.runName", f"{plan.study.study_name} (resumed)")
                self.client.set_tag(launch, "mlflow.note.content",
                                    f"Resumed study {plan.study.study_name}; its trials are under run {known}.")
            return
        if launch:
            run = self.client.get_run(launch)
            self.run_id, self.experiment_id = launch, run.info.experiment_id
            self.client.set_tag(launch, "mlflow.runName", plan.study.study_name)  # MLflow named it at random
        else:
            try:
                self.experiment_id = mlflow.set_experiment(plan.config.experiment_name).experiment_id
            except mlflow.exceptions.MlflowException as exc:
                raise StudyError(f"tracking store {mask_url(self.uri)}: {first_line(exc)}") from None
            self.run_id = self.client.create_run(self.experiment_id, run_name=plan.study.study_name).info.run_id
        study.set_user_attr("mlflow_parent_run_id", self.run_id)
        study.set_user_attr("mlflow_experiment_id", self.experiment_id)
        self.log_study_definition(storage_url)

    def log_study_definition(self, storage_url: str) -> None:
        import yaml

        plan, client, run_id = self.plan, self.client, self.run_id
        searched = {p.name for p in plan.space}
        params = {f"config.{k}": v for k, v in plan.config.to_dict().items() if k not in searched}
        params |= {f"space.{p.name}": p.describe() for p in plan.space}
        params |= {"study.sampler": plan.study.sampler, "study.pruner": plan.study.pruner,
                   "study.direction": plan.direction}
        client.log_batch(run_id, params=[_param(k, v) for k, v in params.items()])
        client.set_tag(run_id, "study", plan.study.study_name)
        client.set_tag(run_id, "fer_exp.role", "study")
        client.set_tag(run_id, "model", plan.config.model)
        client.set_tag(run_id, "study_storage", mask_url(storage_url))
        client.set_tag(run_id, "select_metric", plan.config.select_metric)
        client.set_tag(run_id, "mlflow.note.content", (
            f"Optuna study **{plan.study.study_name}** ({Path(plan.path).name}): {plan.config.model}, "
            f"{plan.direction} {plan.config.select_metric} over " + ", ".join(f"{p.name} ({p.describe()})" for p in plan.space)
            + ". Each trial is a child run; the best is tagged `best_run_id`."))
        client.log_text(run_id, plan.config.to_yaml(), "config.yaml")
        client.log_text(run_id, yaml.safe_dump(space_spec(plan.space), sort_keys=False), "search_space.yaml")

    def summarise(self, status: str, retrain: tuple[str | None, dict] = (None, {})) -> dict:
        """Best trial, counts, trials table and figures on the parent run (and ``retrain``: the retrained
        best's run and test metrics); returns the summary. Under the study's :func:`database_lock`: other
        commands on the study may summarise the same run at the same moment (MLflow refuses a tag that
        two processes write at once)."""
        from fer_exp.experiment import database_lock

        with database_lock(self.storage_url):
            return self._summarise(status, *retrain)

    def _summarise(self, status: str, retrain_run_id: str | None, retrain_test: dict) -> dict:
        summary = study_summary(self.study, self.plan)
        client, run_id = self.client, self.run_id
        tags = {"trials_complete": summary["complete"], "trials_pruned": summary["pruned"],
                "trials_failed": summary["failed"]}
        metrics = {"trials_complete": summary["complete"], "trials_pruned": summary["pruned"],
                   "trials_failed": summary["failed"], "epochs_spent": summary["epochs_spent"]}
        best = summary.get("best")
        if best:
            tags |= {"best_trial": best["number"], "best_value": f"{best['value']:.6g}",
                     "best_params": json.dumps(best["params"]), "best_run_id": best.get("mlflow_run_id", "")}
            from fer_exp.tracking import SELECTED_METRIC

            metrics[SELECTED_METRIC] = best["value"]  # logged after each trial too
        for key, value in tags.items():
            client.set_tag(run_id, key, str(value))
        last_trial = max((t.number for t in self.study.get_trials(deepcopy=False)), default=0)
        client.log_batch(run_id, metrics=[metric(k, v, last_trial) for k, v in metrics.items()])
        with tempfile.TemporaryDirectory() as tmp:
            table = Path(tmp) / "trials.csv"
            trials_frame(self.study).to_csv(table, index=False)
            client.log_artifact(run_id, str(table))
            for name, figure in study_figures(self.study, self.plan):
                client.log_figure(run_id, figure, f"figures/{name}.png")
                import matplotlib.pyplot as plt

                plt.close(figure)
        if retrain_run_id:
            client.set_tag(run_id, "result_run_id", retrain_run_id)
            client.log_batch(run_id, metrics=[metric(f"result_{k}", v) for k, v in retrain_test.items()
                                              if k in ("test_accuracy", "test_macro_f1", "test_accuracy_uncopied",
                                                       "test_macro_f1_uncopied")])
        client.set_terminated(run_id, status)
        return summary


def _param(key, value):
    from mlflow.entities import Param as MlflowParam

    return MlflowParam(key, str(value))


def metric(key, value, step: int = 0):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), step)


def format_params(params: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def trials_frame(study):
    """One row per trial: number, state, value, epochs, seconds, params, run id, worker, retry of."""
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     "epochs_run": t.user_attrs.get("epochs_run"),
                     "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                     if t.datetime_complete and t.datetime_start else None,
                     **{f"params_{k}": v for k, v in t.params.items()},
                     "mlflow_run_id": t.user_attrs.get("mlflow_run_id", ""), "worker": t.user_attrs.get("worker"),
                     "retry_of": t.system_attrs.get("failed_trial"), "error": t.user_attrs.get("error", "")})
    return pd.DataFrame(rows)


def study_summary(study, plan: StudyPlan) -> dict:
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    states = [t.state.name for t in trials]
    summary = {"study": plan.study.study_name, "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
               # a retry that went on from its interrupted trial's last epoch ran only the epochs after it
               "failed": states.count("FAIL"), "epochs_spent": sum((t.user_attrs.get("epochs_run") or 0)
                                                                  - (t.user_attrs.get("epochs_resumed") or 0) for t in trials),
               "epochs_finished": sum(t.user_attrs.get("epochs_run") or 0 for t in trials if t.state.name in ("COMPLETE", "PRUNED")),
               "epochs_possible": plan.config.epochs * (states.count("COMPLETE") + states.count("PRUNED")),
               "direction": plan.direction, "metric": plan.config.select_metric}
    try:
        best = study.best_trial
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params,
                           "mlflow_run_id": best.user_attrs.get("mlflow_run_id", "")}
    except ValueError:
        pass
    return summary


FIGURES = ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values")


def study_figures(study, plan: StudyPlan):
    """Optuna's matplotlib figures; one that the study cannot draw yet (too few trials) is skipped."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import optuna
    import optuna.visualization.matplotlib as vis

    from optuna.exceptions import ExperimentalWarning

    warnings.filterwarnings("ignore", category=ExperimentalWarning)
    for name in FIGURES:
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # "no complete trials" and the like: said below
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = getattr(vis, f"plot_{name}")(study)
        except Exception as exc:  # e.g. importances need 2 complete trials with varying params
            print(f"figure {name} skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        finally:
            optuna.logging.set_verbosity(verbosity)
        axes = axes.flat[0] if hasattr(axes, "flat") else axes
        figure = axes.get_figure()
        figure.set_size_inches(10, 6)
        figure.tight_layout()
        yield name, figure


def format_table(study, plan: StudyPlan) -> str:
    """The trials as an aligned text table (the console's final report)."""
    frame = trials_frame(study)
    if frame.empty:
        return "(no trials)"
    names = [p.name for p in plan.space]
    header = ["#", "state", plan.config.select_metric, "epochs", "seconds", *names, "run"]
    lines = [header] + [
        [str(row["number"]), row["state"], _cell(row["value"], ".4f"), _cell(row["epochs_run"], ".0f"),
         _cell(row["seconds"], ".0f"), *(_cell(row.get(f"params_{n}"), ".3g") for n in names),
         _cell(row["mlflow_run_id"], "")[:12]]
        for row in frame.to_dict("records")]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


def _cell(value, fmt: str) -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt) if isinstance(value, (int, float)) and fmt else str(value)
