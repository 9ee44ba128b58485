"""Compare tracked runs like the reference study: overall and per-class tables (mean +/- std and a
95% confidence interval per group of seeds), figures, McNemar tests on paired test predictions, an
HTML page holding it all, and the comparison logged as an MLflow run of its own.

    fer-exp compare --experiment fer2013 --group-by model
    fer-exp compare --runs RUN_A --runs RUN_B          # two runs: a paired test between them
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import itertools
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fer_exp.classes import CLASS_NAMES, NUM_CLASSES
from fer_exp.errors import first_line

OVERALL = {"test_accuracy": "Accuracy", "test_macro_f1": "Macro F1", "test_weighted_f1": "Weighted F1"}
# the scores on the test faces with no copy in train or val (FER2013's copies), where every run has them
UNCOPIED = {"test_accuracy_uncopied": "Accuracy, uncopied", "test_macro_f1_uncopied": "Macro F1, uncopied"}
UNCOPIED_NOTE = ("Uncopied: on the test faces with no copy in the source's train or val (FER2013's copies, which a "
                 "run trains on unless --duplicates drop).")


def uncopied_note(comparison) -> str:
    """:data:`UNCOPIED_NOTE`, and what counted as a copy where it was more than identical pixels (the lowest
    correlation of the runs: where they differ, they are rescored so)."""
    counted_at = min(copy_correlation(r) for r in comparison.runs)
    return UNCOPIED_NOTE[:-2] + (f"; a copy: identical pixels, or a pixel correlation of {counted_at:g} or more)."
                                 if counted_at < 1 else ").")
PER_CLASS = {f"test_acc_{c}": c.capitalize() for c in CLASS_NAMES}
SKIPPED_ROLES = ("trial", "study", "launch", "comparison")  # tuning runs and comparisons have no test of their own


class CompareError(ValueError):
    """Nothing to compare, or runs that cannot be compared; says which and how to fix it."""


@dataclass
class RunInfo:
    run_id: str
    name: str
    group: str
    experiment_id: str
    metrics: dict
    params: dict
    tags: dict
    predictions: pd.DataFrame | None = None
    val_curve: list = field(default_factory=list)
    test_digest: str | None = None  # of the test split's pixels and labels (the run's dataset input)
    val_digest: str | None = None  # of the val split's

    @property
    def seed(self) -> str | None:
        return self.params.get("config.seed")

    @property
    def label(self) -> str:
        """The run as tables name it: its name, led by its group where the name does not say it (a
        study's arms share run names such as 'cnn 48px lr=0.001 wd=0.0001 seed42')."""
        return self.name if self.name == self.group or self.name.startswith(f"{self.group} ") else f"{self.group}: {self.name}"


# ================================================================== selecting runs


def group_value(run, key: str) -> str:
    """``tags.X``, ``params.X``, or a bare X: the tag X, else the param config.X, else the param X; ``run``:
    the run itself (its name and the start of its id: runs named alike stay apart). A fer-exp run (its
    params hold the config, ``config.model`` among them) made before a recipe or data field X existed
    trained with X's default, so it groups under it (``duplicates``: report); not so for the execution
    fields, whose defaults have changed since they were added (``compile``)."""
    from fer_exp.config import EXECUTION_FIELDS, Config

    tags, params = run.data.tags, run.data.params
    if key == "run":
        return f"{run.info.run_name or '?'} ({run.info.run_id[:8]})"
    if key.startswith("tags."):
        return tags.get(key[5:], "?")
    field_name = key.removeprefix("params.").removeprefix("config.")
    if key.startswith("params."):
        value = params.get(key[7:])
    else:
        value = next((v for v in (tags.get(key), params.get(f"config.{key}"), params.get(key)) if v is not None), None)
    if value is not None:
        return value
    defaults = {f.name: f.default for f in dataclasses.fields(Config) if f.name not in EXECUTION_FIELDS}
    if (key.startswith(("params.config.", "config.")) or "." not in key) and field_name in defaults and "config.model" in params:
        return str(defaults[field_name])
    return "?"


def search_all_runs(client, experiment_ids: list[str], filter_string: str = "", page_size: int = 1000) -> list:
    """Every run the search finds, newest first, page by page (one page stops at a store's maximum)."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=page_size,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


def run_config(run: RunInfo) -> dict:
    """The config a run trained (its ``config.*`` params, fields it predates at their defaults), as text,
    where and how it ran aside; and whose test it is: the run's own, or an evaluation's (``fer-exp
    evaluate``: another TTA, an ensemble), which is not a twin of the run it evaluated."""
    from fer_exp.config import EXECUTION_FIELDS, recorded_config

    made = recorded_config({k[len("config."):]: v for k, v in run.params.items() if k.startswith("config.")})
    config = {k: str(v) for k, v in made.items() if k not in EXECUTION_FIELDS}
    evaluation = "its own"
    if run.tags.get("fer_exp.role") == "evaluation":  # which models, with which TTA (an ensemble logs no config.*)
        evaluation = f"{run.tags.get('model', '?')} of {run.params.get('models', '?')}"
    return {**config, "test evaluation": evaluation}


def newest_of_twins(runs: list) -> tuple[list, list]:
    """(runs, older twins left out): of runs with one group, seed and config (a run trained again, a
    smoke test repeated), a search keeps the newest (``runs`` are newest first), not several "seeds"."""
    kept, twins, seen = [], [], set()
    for run in runs:
        key = (run.group, tuple(sorted(run_config(run).items())))  # the seed is in the config
        (twins if key in seen else kept).append(run)
        seen.add(key)
    return kept, twins


def mixed_configs(runs: list) -> list[str]:
    """A note for each group whose runs trained different configs beyond their seed: its mean and interval
    are then over different recipes, not over seeds of one."""
    notes = []
    for group in dict.fromkeys(r.group for r in runs):
        configs = [run_config(r) for r in runs if r.group == group]
        keys = dict.fromkeys(k for c in configs for k in c)  # (a field one run's version had and another's not)
        differ = {k: sorted({str(c.get(k)) for c in configs}) for k in keys if k != "seed" and len({c.get(k) for c in configs}) > 1}
        if differ:
            shown = "; ".join(f"{k} ({', '.join(v[:4])}{', ...' if len(v) > 4 else ''})" for k, v in list(differ.items())[:4])
            notes.append(f"group {group} averages runs whose configs differ beyond the seed, in {shown}"
                         + (f" and {len(differ) - 4} more field(s)" if len(differ) > 4 else "")
                         + ": its interval is not over seeds of one recipe; group by one of these fields or --filter")
    return notes


def repeats_its_source(run, by_id: dict) -> bool:
    """Whether a run is ``fer-exp evaluate`` of one model that repeats its training run's (one of ``by_id``)
    own test: the same data, the TTA that run tested with, the same test metrics (so not another epoch's
    checkpoint, nor another TTA)."""
    tags = run.data.tags
    if tags.get("fer_exp.role") != "evaluation" or run.data.params.get("n_models") != "1":
        return False
    source = by_id.get(tags.get("source_run_0"))
    return (source is not None and source.data.tags.get("data_source") == tags.get("data_source")
            and tags.get("tta", "none") == source.data.tags.get("test_tta", "none")
            and all(same_score(run.data.metrics.get(k), source.data.metrics.get(k)) for k in (*OVERALL, *PER_CLASS)))


def same_score(a, b) -> bool:
    """Equal, or both NaN (a class with no test faces)."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def one_class_runs(runs: list) -> list[str]:
    """A note for each run that predicts a single class on test (it has not learnt: chance level)."""
    notes = []
    for run in runs:
        predicted = [c for c in CLASS_NAMES if run.metrics.get(f"test_acc_{c}", 0) > 0]
        if len(predicted) == 1 and run.metrics.get(f"test_acc_{predicted[0]}") == 1.0:
            notes.append(f"run {run.label} ({run.run_id}) predicts {predicted[0]} for every test face: it has not learnt "
                         "(chance level); train it longer or check its recipe")
    return notes


def copy_correlation(run: RunInfo) -> float:
    """The pixel correlation at which a run counted a test face a copy: its tag ``copy_correlation``, else
    its config's (an evaluation's: its first model's), else 1 (runs made before either: identical pixels)."""
    for value in (run.tags.get("copy_correlation"), run.params.get("config.copy_correlation"),
                  run.params.get("model0.config.copy_correlation")):
        if value is not None:
            return float(value)
    return 1.0


def rescored_uncopied(runs: list[RunInfo]) -> tuple[list[RunInfo], int] | None:
    """Runs that counted copies at different correlations scored different faces apart: each run's
    uncopied scores again, from its test_predictions.csv, on the test faces no run counts as a copy (those
    of the lowest correlation: a copy at R is one at every lower R), and how many; None where a run lacks
    its predictions or their ``copied`` column, or the runs were tested on different faces."""
    from fer_exp.metrics import classification_metrics

    frames = [r.predictions for r in runs]
    if any(f is None or "copied" not in f for f in frames) or len({frozenset(f["source"]) for f in frames}) > 1:
        return None
    copied = set().union(*(f.loc[f["copied"].astype(bool), "source"] for f in frames))
    rescored = []
    for run, frame in zip(runs, frames):
        kept = frame[~frame["source"].isin(copied)]
        if kept.empty:
            return None
        scores = classification_metrics(kept["label"], kept["prediction"])
        rescored.append(dataclasses.replace(run, metrics={**run.metrics, "test_accuracy_uncopied": scores["accuracy"],
                                                          "test_macro_f1_uncopied": scores["macro_f1"]}))
    return rescored, len(kept)


def select_runs(client, experiments: list[str], filter_string: str = "", run_ids: list[str] = ()) -> tuple[list, list[str]]:
    """(runs to compare, notes on what was skipped). Explicit ``run_ids`` must all be comparable;
    a search skips tuning runs and comparisons, and runs that did not finish."""
    notes: list[str] = []
    if run_ids:
        runs = []
        for run_id in dict.fromkeys(run_ids):  # a run named twice is one run, not two seeds
            try:
                run = client.get_run(run_id)
            except Exception:
                raise CompareError(f"no run {run_id} in the tracking store {client.tracking_uri}") from None
            if run.info.lifecycle_stage != "active":
                raise CompareError(f"run {run.info.run_name or '?'} {run_id} is deleted: restore it (the MLflow UI's "
                                   "deleted runs, or `mlflow runs restore --run-id ID`) or leave it out")
            experiment = client.get_experiment(run.info.experiment_id)
            if experiment.lifecycle_stage != "active":
                raise CompareError(f"run {run_id} is in the deleted experiment {experiment.name}: restore it "
                                   f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or leave the run out")
            runs.append(run)
    else:
        found = [client.get_experiment_by_name(name) for name in experiments]
        missing = [name for name, exp in zip(experiments, found) if exp is None]
        if missing:
            known = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise CompareError(f"no experiment named {', '.join(missing)} in {client.tracking_uri} (experiments: {known})")
        deleted = [e for e in found if e.lifecycle_stage != "active"]
        if deleted:
            raise CompareError(f"experiment {deleted[0].name} is deleted: restore it (`mlflow experiments restore "
                               f"--experiment-id {deleted[0].experiment_id}`) to compare its runs")
        try:
            runs = search_all_runs(client, [e.experiment_id for e in found], filter_string)
        except Exception as exc:
            raise CompareError(f"the filter {filter_string!r} is not valid: {first_line(exc)} "
                               "(e.g. \"tags.model = 'cnn'\" or \"params.`config.seed` = '42'\")") from None
        import os

        launch = os.environ.get("MLFLOW_RUN_ID")  # under `mlflow run -e compare`: the comparison's own run
        runs = [r for r in runs if r.info.run_id != launch]
        roles = [r for r in runs if r.data.tags.get("fer_exp.role") in SKIPPED_ROLES]
        unfinished = [r for r in runs if r not in roles and r.info.status != "FINISHED"]
        if roles:
            notes.append(f"skipped {len(roles)} tuning or comparison run(s) (no test evaluation of their own)")
        if unfinished:
            notes.append(f"skipped {len(unfinished)} run(s) that did not finish: "
                         + ", ".join(f"{r.info.run_name or r.info.run_id} ({r.info.status})" for r in unfinished[:5]))
        runs = [r for r in runs if r not in roles and r not in unfinished]
        untested = [r for r in runs if not all(k in r.data.metrics for k in (*OVERALL, *PER_CLASS))]
        if untested:  # evaluations on val (fer-exp evaluate --split val), runs trained with no test split
            notes.append(f"skipped {len(untested)} run(s) with no test evaluation: "
                         + ", ".join(f"{r.info.run_name or r.info.run_id}" for r in untested[:5]))
            runs = [r for r in runs if r not in untested]
        by_id = {r.info.run_id: r for r in runs}
        repeats = [r for r in runs if repeats_its_source(r, by_id)]
        if repeats:  # the same test, the same numbers, as a second "model"
            notes.append(f"skipped {len(repeats)} evaluation(s) that repeat the test of the run they evaluated (one "
                         "model, its own data and TTA, the same metrics), which is compared: " + ", ".join(r.info.run_name or r.info.run_id for r in repeats[:5]))
            runs = [r for r in runs if r not in repeats]
    if not runs:
        where = f"experiment(s) {', '.join(experiments)}" + (f" with filter {filter_string!r}" if filter_string else "")
        raise CompareError(f"no finished training runs to compare in {where}. Train some "
                           "(fer-exp train, mlflow run . -P model=cnn) or check --experiment and --filter.")
    lacking = [r for r in runs if not all(k in r.data.metrics for k in (*OVERALL, *PER_CLASS))]
    if lacking:
        raise CompareError("these runs have no test evaluation to compare (unfinished, failed, or tuning trials, "
                           "which never see the test split): " + ", ".join(
                               f"{r.info.run_name or '?'} {r.info.run_id} ({r.info.status})" for r in lacking[:8]))
    return runs, notes


def load_run(client, run, group_by: str, workdir: Path) -> RunInfo:
    """A run's metrics, val curve and test predictions (the logged test_predictions.csv)."""
    info = RunInfo(run.info.run_id, run.info.run_name or run.info.run_id[:8], group_value(run, group_by),
                   run.info.experiment_id, dict(run.data.metrics), dict(run.data.params), dict(run.data.tags))
    info.val_curve = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
    inputs = run.inputs.dataset_inputs if run.inputs else []
    info.test_digest = next((d.dataset.digest for d in inputs if d.dataset.name.endswith("-test")), None)
    info.val_digest = next((d.dataset.digest for d in inputs if d.dataset.name.endswith("-val")), None)
    try:
        path = client.download_artifacts(run.info.run_id, "test_predictions.csv", str(workdir / run.info.run_id))
        info.predictions = pd.read_csv(path)
    except Exception:
        info.predictions = None  # older runs: tables and curves still work, paired tests do not
    return info


# ================================================================== statistics


def summarise(values) -> dict:
    """mean, std (n-1), n and the 95% t confidence interval of the mean (None for one value), over the
    values that are numbers (NaN: a class some run's test split has no faces of); NaN where none is."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if not len(values):
        return {"mean": math.nan, "std": math.nan, "n": 0, "ci_low": None, "ci_high": None}
    n, mean = len(values), float(values.mean())
    std = float(values.std(ddof=1)) if n > 1 else 0.0
    if n > 1:
        from scipy.stats import t

        half = float(t.ppf(0.975, n - 1)) * std / math.sqrt(n)
        ci = (mean - half, mean + half)
    else:
        ci = (None, None)
    return {"mean": mean, "std": std, "n": n, "ci_low": ci[0], "ci_high": ci[1]}


def mcnemar(correct_a, correct_b) -> dict:
    """McNemar's test on paired outcomes: b = A right and B wrong, c = A wrong and B right.

    p is the exact two-sided binomial p-value (valid for any b + c); the chi-square statistic with
    continuity correction, (|b - c| - 1)^2 / (b + c), is given beside it."""
    from scipy.stats import binomtest

    correct_a, correct_b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    b = int((correct_a & ~correct_b).sum())
    c = int((~correct_a & correct_b).sum())
    chi2 = (abs(b - c) - 1) ** 2 / (b + c) if b + c else 0.0
    p = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    return {"n": int(len(correct_a)), "a_right_b_wrong": b, "a_wrong_b_right": c, "chi2": float(chi2), "p_value": float(p)}


def holm(p_values) -> list[float]:
    """Holm's step-down adjustment of several tests' p-values: an adjusted p below 0.05 keeps the chance
    of any false "significant" among them under 5% (135 tests of an ablation flag ~7 by chance unadjusted)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def paired_test(a: RunInfo, b: RunInfo) -> dict:
    """McNemar and per-class accuracy differences (B - A) on the test images both runs predicted."""
    if a.predictions is None or b.predictions is None:
        missing = a if a.predictions is None else b
        raise CompareError(f"run {missing.name} ({missing.run_id}) has no test_predictions.csv: no paired test")
    merged = a.predictions[["source", "label", "prediction"]].merge(
        b.predictions[["source", "label", "prediction"]], on="source", suffixes=("_a", "_b"))
    if len(merged) != len(a.predictions) or len(merged) != len(b.predictions) or \
            not (merged["label_a"] == merged["label_b"]).all():
        raise CompareError(f"runs {a.name} and {b.name} were tested on different test sets: no paired test")
    right_a = (merged["prediction_a"] == merged["label_a"]).to_numpy()
    right_b = (merged["prediction_b"] == merged["label_b"]).to_numpy()
    labels = merged["label_a"].to_numpy()
    result = {"a": a.label, "a_run_id": a.run_id, "b": b.label, "b_run_id": b.run_id, **mcnemar(right_a, right_b),
              "accuracy_a": float(right_a.mean()), "accuracy_b": float(right_b.mean())}
    for index, name in enumerate(CLASS_NAMES):
        mask = labels == index
        result[f"delta_{name}"] = float(right_b[mask].mean() - right_a[mask].mean()) if mask.any() else float("nan")
    return result


def pairs_to_test(runs: list[RunInfo]) -> list[tuple[RunInfo, RunInfo]]:
    """Two runs: that pair. Else, for each pair of groups, their runs with the same seed (or the
    first run of each where no seed matches)."""
    if len(runs) == 2:
        return [(runs[0], runs[1])]
    groups: dict[str, list[RunInfo]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    pairs = []
    for (_, first), (_, second) in itertools.combinations(groups.items(), 2):
        by_seed = {r.seed: r for r in second}
        matched = [(r, by_seed[r.seed]) for r in first if r.seed in by_seed]
        pairs += matched or [(first[0], second[0])]
    return pairs


# ================================================================== tables


@dataclass
class Comparison:
    runs: list[RunInfo]
    group_by: str
    overall: pd.DataFrame  # one row per group: runs, mean/std/ci per metric
    per_class: pd.DataFrame
    tests: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    overall_metrics: dict = field(default_factory=lambda: dict(OVERALL))  # the overall table's columns
    chosen: ValChoice | None = None  # the group and the model val prefers
    register: str = ""  # the name --register registers the chosen model under ("": not asked)

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(r.group for r in self.runs))


# ================================================================== chosen on val


VAL_SCORE = "val_score"  # a run's val score as compare ranks it (see val_score)


def val_score(run: RunInfo) -> float | None:
    """The val score of a run's model as it predicts: its select metric at the selected epoch, with the TTA
    it tests and predicts with where the run measured that on val (``tta: auto``: ``<metric>_tta_<tta>``),
    else ``best_val``. None for a run that selected nothing on val (an evaluation of saved models)."""
    from fer_exp.tracking import SELECTED_METRIC

    if run.tags.get("fer_exp.role") == "evaluation" or SELECTED_METRIC not in run.metrics:
        return None
    select, tta = run.tags.get("select_metric", "val_accuracy"), run.tags.get("test_tta", "none")
    return run.metrics.get(f"{select}_tta_{tta}", run.metrics[SELECTED_METRIC])


@dataclass
class ValChoice:
    """What val prefers among the compared runs (the honest choice: test has no say in it)."""

    metric: str  # the runs' select_metric
    table: pd.DataFrame  # per group: its runs' val scores (mean, std, interval), as group_table makes it
    group: str  # the group of the best mean val score
    run: RunInfo  # the run of the best val score: its model is the one to use
    own_val_splits: bool  # the runs' val splits differ (each seed's hold-out)
    tied: int = 0  # other runs with the same best val score (the first of them in the tables' order is chosen)

    @property
    def lower_is_better(self) -> bool:
        return self.metric == "val_loss"


def chosen_on_val(runs: list[RunInfo]) -> tuple[ValChoice | None, list[str]]:
    """(the group and run whose val score is best, notes): over the runs that selected an epoch on val
    (training runs, not evaluations), where they all selected on one metric."""
    scored = [dataclasses.replace(r, metrics={**r.metrics, VAL_SCORE: v}) for r in runs if (v := val_score(r)) is not None]
    if not scored:
        return None, []
    metrics = sorted({r.tags.get("select_metric", "val_accuracy") for r in scored})
    if len(metrics) > 1:
        return None, [f"no model is chosen on val: the runs select on different val metrics ({', '.join(metrics)}); "
                      "compare runs that select alike, e.g. --filter \"tags.select_metric = 'val_accuracy'\""]
    choice = ValChoice(metrics[0], group_table(scored, {VAL_SCORE: "Val"}), "", scored[0],
                       len({r.val_digest for r in scored}) > 1)
    sign = 1 if choice.lower_is_better else -1
    choice.group = min(choice.table.itertuples(), key=lambda row: sign * row.Val).group
    choice.run = min(scored, key=lambda r: sign * r.metrics[VAL_SCORE])
    choice.tied = sum(r.metrics[VAL_SCORE] == choice.run.metrics[VAL_SCORE] for r in scored) - 1
    return choice, []


def val_section(comparison: Comparison) -> list[str]:
    """The markdown of :class:`ValChoice`: the groups' val scores, the group and the model val prefers, how to
    use that model."""
    choice = comparison.chosen
    if choice is None:
        return []
    percent = choice.metric != "val_loss"
    lines = [f"## Chosen on val ({choice.metric} at each run's selected epoch, with the TTA its model predicts with "
             f"where the run measured it on val{', %' if percent else ''})", "",
             f"| {group_title(comparison)} | Runs | Val |", "|---|---|---|"]
    for _, row in choice.table.iterrows():
        lines.append(f"| {row['group']} | {row['runs']} | {cell(row, 'Val', percent)} |")
    return [*lines, "", *val_choice_text(comparison)]


def val_choice_text(comparison: Comparison) -> list[str]:
    """What val prefers, and how to use that model (markdown: commands in backticks)."""
    choice = comparison.chosen
    run = choice.run
    value = f"{100 * run.metrics[VAL_SCORE]:.2f}%" if choice.metric != "val_loss" else f"{run.metrics[VAL_SCORE]:.4f}"
    lines = [f"Val prefers {group_title(comparison).lower()} {choice.group}, and of the runs the model of {run.label} "
             f"({run.run_id}: {choice.metric} {value}"
             + (f", tied with {choice.tied} other run(s): the first in the tables' order" if choice.tied else "")
             + "; its test accuracy, reported once, "
             f"{100 * run.metrics['test_accuracy']:.2f}%). Predict with it: "
             f"`fer-exp predict --model runs:/{run.run_id}/model IMAGES`"
             + (f", or, as this command registers it, `--model models:/{comparison.register}@{CHOSEN_ALIAS}`."
                if comparison.register else
                f", or register it with `--register NAME` on this command (then `--model models:/NAME@{CHOSEN_ALIAS}`).")]
    if choice.own_val_splits:
        lines.append("Each run chose on its own val split (a seed's hold-out of train, unless the runs share "
                     "--data-seed), so their val scores differ by the split as well as by the model.")
    return lines


def group_table(runs: list[RunInfo], metrics: dict) -> pd.DataFrame:
    rows = []
    for group in dict.fromkeys(r.group for r in runs):
        members = [r for r in runs if r.group == group]
        row = {"group": group, "runs": len(members)}
        for key, title in metrics.items():
            s = summarise([r.metrics[key] for r in members])
            row |= {title: s["mean"], f"{title} std": s["std"], f"{title} ci_low": s["ci_low"],
                    f"{title} ci_high": s["ci_high"], f"{title} n": s["n"]}  # n < runs: a class some tests lack
        rows.append(row)
    return pd.DataFrame(rows)


def mixed_test_sets(runs: list[RunInfo]) -> list[str]:
    """A note for each group whose runs were tested on different images (other data, or synthetic faces
    drawn per seed): its mean is then not over one test set."""
    notes = []
    for group in dict.fromkeys(r.group for r in runs):
        tested = {r.test_digest for r in runs if r.group == group and r.test_digest}
        if len(tested) > 1:
            notes.append(f"group {group} averages runs tested on {len(tested)} different test sets (other data, or "
                         "synthetic faces drawn per seed): filter by data (--filter \"tags.data_source = '...'\") "
                         "to compare like with like")
    return notes


def compare_runs(runs: list[RunInfo], group_by: str, notes=()) -> Comparison:
    notes = [*notes, *mixed_test_sets(runs), *one_class_runs(runs)]
    tests = []
    for a, b in pairs_to_test(runs):
        try:
            tests.append(paired_test(a, b))
        except CompareError as exc:
            notes = [*notes, str(exc)]
    for test, adjusted in zip(tests, holm([t["p_value"] for t in tests])):
        test["p_holm"] = adjusted
    with_uncopied = [r for r in runs if all(k in r.metrics for k in UNCOPIED)]
    counted_at = {copy_correlation(r) for r in with_uncopied}
    overall = OVERALL | (UNCOPIED if len(with_uncopied) == len(runs) else {})
    if len(counted_at) > 1 and len(with_uncopied) == len(runs):  # each run scored other faces apart
        rescored = rescored_uncopied(runs)
        shown = ", ".join(f"{c:g}" for c in sorted(counted_at, reverse=True))
        if rescored:
            runs, faces = rescored
            notes = [*notes, f"the runs count copies at different pixel correlations ({shown}; 1: identical pixels): "
                     f"their uncopied scores are rescored from their test predictions on the {faces} test faces that "
                     "no run counts as a copy"]
        else:
            overall = OVERALL
            notes = [*notes, "the uncopied scores (test_accuracy_uncopied) are left out: the runs count copies at "
                     f"different pixel correlations ({shown}; 1: identical pixels), so they score different faces, and "
                     "not every run has its test_predictions.csv on the same test faces to rescore them; compare runs "
                     f"counted alike, e.g. --filter \"params.`config.copy_correlation` = '{min(counted_at)}'\""]
    elif with_uncopied and len(with_uncopied) < len(runs):
        lacking = [r for r in runs if r not in with_uncopied]
        notes = [*notes, f"the uncopied scores (test_accuracy_uncopied) are left out: {len(lacking)} run(s) lack them "
                 "(made before they were logged, or on data without copies): "
                 + ", ".join(f"{r.name} {r.run_id}" for r in lacking[:5])]
    chosen, val_notes = chosen_on_val(runs)
    return Comparison(runs, group_by, group_table(runs, overall), group_table(runs, PER_CLASS), pd.DataFrame(tests),
                      [*notes, *val_notes], overall, chosen)


def cell(row, title: str, percent: bool = True) -> str:
    """'68.24' for one run, '67.22 ± 0.33 [66.4, 68.0]' (mean ± std [95% CI]) for several, in percent; 'n/a'
    for a class the test split has no faces of. Not ``percent`` (a loss): as they are, to 4 decimals."""
    scale, digits = (100, 2) if percent else (1, 4)
    mean = scale * row[title]
    if math.isnan(mean):
        return "n/a"  # a class with no test faces
    scored = row.get(f"{title} n", row["runs"])  # fewer than the runs: a class some runs' test split lacks
    some = f" ({scored} of {row['runs']} runs)" if scored < row["runs"] else ""
    if scored < 2:
        return f"{mean:.{digits}f}{some}"
    low, high = scale * row[f"{title} ci_low"], scale * row[f"{title} ci_high"]
    if percent:  # shown within 0-100
        low, high = max(0.0, low), min(100.0, high)
    return f"{mean:.{digits}f} ± {scale * row[f'{title} std']:.{digits}f} [{low:.{digits - 1}f}, {high:.{digits - 1}f}]{some}"


def group_title(comparison: Comparison) -> str:
    """The grouping as a column title: 'Model' for model, 'Arm' for tags.arm."""
    return comparison.group_by.split(".")[-1].replace("_", " ").capitalize()


def markdown_tables(comparison: Comparison) -> str:
    """The overall and per-class tables laid out like the reference results, then the paired tests."""
    key = group_title(comparison)

    def table(frame: pd.DataFrame, titles) -> list[str]:
        lines = [f"| {key} | Runs | " + " | ".join(titles) + " |", "|---" * (len(titles) + 2) + "|"]
        for _, row in frame.iterrows():
            lines.append(f"| {row['group']} | {row['runs']} | " + " | ".join(cell(row, t) for t in titles) + " |")
        return lines

    several = any(comparison.overall["runs"] > 1)
    out = ["## Overall (test split, %)", ""] + table(comparison.overall, comparison.overall_metrics.values())
    out += ["", "## Per-class accuracy (test split, %)", ""] + table(comparison.per_class, PER_CLASS.values())
    if several:
        out += ["", "Several runs: mean ± standard deviation [95% confidence interval of the mean, t distribution]."]
    if UNCOPIED.keys() <= comparison.overall_metrics.keys():
        out += ["", uncopied_note(comparison)]
    if comparison.chosen is not None:
        out += ["", *val_section(comparison)]
    if not comparison.tests.empty:
        several_tests = len(comparison.tests) > 1
        out += ["", "## Paired tests on the test predictions (McNemar, exact)", "",
                "| A | B | images | A right, B wrong | A wrong, B right | χ² | p | p (Holm) | B − A accuracy (points) | "
                "largest per-class differences B − A |", "|---" * 10 + "|"]
        for _, t in comparison.tests.iterrows():
            deltas = sorted(((t[f"delta_{c}"], c) for c in CLASS_NAMES if not math.isnan(t[f"delta_{c}"])),
                            key=lambda d: -abs(d[0]))[:3]
            mark = " (significant)" if t["p_holm"] < 0.05 else ""
            out.append(f"| {t['a']} | {t['b']} | {t['n']} | {t['a_right_b_wrong']} | {t['a_wrong_b_right']} | "
                       f"{t['chi2']:.2f} | {t['p_value']:.3g} | {t['p_holm']:.3g}{mark} | "
                       f"{100 * (t['accuracy_b'] - t['accuracy_a']):+.2f} | "
                       + ", ".join(f"{c} {100 * d:+.1f}" for d, c in deltas) + " |")
        out += ["", "Significant: p < 0.05 after Holm's adjustment for the "
                + (f"{len(comparison.tests)} tests in this table (each test's own p beside it)." if several_tests
                   else "one test (the same as its p).")]
    if comparison.notes:
        out += ["", *[f"Note: {n}" for n in comparison.notes]]
    return "\n".join(out)


# ================================================================== figures


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def per_class_figure(comparison: Comparison):
    plt = _plt()
    frame = comparison.per_class
    fig, ax = plt.subplots(figsize=(12, 5.5), constrained_layout=True)
    width = 0.8 / max(len(frame), 1)
    palette = plt.get_cmap("tab10" if len(frame) <= 10 else "tab20")
    x = np.arange(NUM_CLASSES)
    for i, (_, row) in enumerate(frame.iterrows()):
        means = np.array([100 * row[t] for t in PER_CLASS.values()])
        spread = np.array([100 * row[f"{t} std"] for t in PER_CLASS.values()])
        errors = [np.minimum(spread, means), np.minimum(spread, 100 - means)] if row["runs"] > 1 else None
        ax.bar(x + (i - (len(frame) - 1) / 2) * width, means, width, yerr=errors, capsize=3, color=palette(i % palette.N),
               label=f"{row['group']} ({row['runs']} run{'s' if row['runs'] > 1 else ''})")
    ax.set(xticks=x, xticklabels=list(PER_CLASS.values()), ylabel="test accuracy (%)", ylim=(0, 100),
           title="Per-class accuracy" + (" (mean ± std over runs)" if any(frame["runs"] > 1) else ""))
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return fig


def confusion_figure(comparison: Comparison):
    """One row-normalised confusion matrix per group (counts summed over its runs)."""
    from sklearn.metrics import confusion_matrix

    plt = _plt()
    groups = [g for g in comparison.groups if any(r.predictions is not None for r in comparison.runs if r.group == g)]
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(6.2 * max(len(groups), 1), 5.8), constrained_layout=True,
                             squeeze=False)
    for ax, group in zip(axes[0], groups):
        counts = sum(confusion_matrix(r.predictions["label"], r.predictions["prediction"], labels=range(NUM_CLASSES))
                     for r in comparison.runs if r.group == group and r.predictions is not None)
        rows = counts.sum(axis=1, keepdims=True)
        matrix = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
        ax.set(xticks=range(NUM_CLASSES), yticks=range(NUM_CLASSES), xticklabels=CLASS_NAMES, yticklabels=CLASS_NAMES,
               xlabel="predicted", ylabel="true", title=f"{group} (row-normalised)")
        ax.tick_params(axis="x", rotation=45)
        for i, j in itertools.product(range(NUM_CLASSES), repeat=2):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if matrix[i, j] > 0.5 else "black")
    return fig


def val_curve_figure(comparison: Comparison):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 5.5), constrained_layout=True)
    palette = plt.get_cmap("tab10" if len(comparison.groups) <= 10 else "tab20")  # C10 would be C0 again
    colours = {g: palette(i % palette.N) for i, g in enumerate(comparison.groups)}
    seen = set()
    for run in comparison.runs:
        if not run.val_curve:
            continue
        steps, values = zip(*run.val_curve)
        ax.plot(steps, [100 * v for v in values], color=colours[run.group], alpha=0.85, marker="." if len(steps) < 30 else None,
                label=run.group if run.group not in seen else None)
        seen.add(run.group)
    ax.set(xlabel="epoch", ylabel="val accuracy (%)", title="Validation accuracy per epoch (one line per run)")
    ax.grid(alpha=0.3)
    if seen:
        ax.legend()
    return fig


FIGURES = {"per_class_accuracy": per_class_figure, "confusion_matrices": confusion_figure,
           "val_accuracy": val_curve_figure}
# what a comparison writes into its --output folder (and logs): an earlier comparison's are replaced
COMPARISON_FILES = ("tables.md", "overall.csv", "per_class.csv", "runs.csv", "paired_tests.csv",
                    *(f"{name}.png" for name in FIGURES), "report.html", "runs.json")


# ================================================================== report


def html_page(comparison: Comparison, markdown: str, images: dict[str, bytes], links: dict[str, str]) -> str:
    """One self-contained page: the tables, the tests and the figures (embedded), for the artifact viewer."""
    import html

    def table_html(frame: pd.DataFrame, titles) -> str:
        shown = pd.DataFrame({comparison.group_by: frame["group"], "Runs": frame["runs"],
                              **{t: [cell(row, t) for _, row in frame.iterrows()] for t in titles}})
        return shown.to_html(index=False, border=0, classes="t")

    runs = "".join(f"<li><b>{html.escape(r.group)}</b>: <a href=\"{links[r.run_id]}\" target=\"_top\">{html.escape(r.name)}</a> "
                   f"<code>{r.run_id}</code>, test accuracy {100 * r.metrics['test_accuracy']:.2f}%</li>"
                   for r in comparison.runs)
    tests = ""
    if not comparison.tests.empty:
        shown = comparison.tests[["a", "b", "n", "a_right_b_wrong", "a_wrong_b_right", "chi2", "p_value", "p_holm",
                                  "accuracy_a", "accuracy_b", *[f"delta_{c}" for c in CLASS_NAMES]]]
        tests = "<h2>Paired tests (McNemar, exact binomial p; p_holm adjusted for the table's tests)</h2>" + shown.to_html(index=False, border=0, classes="t",
                                                                                   float_format=lambda v: f"{v:.4g}", na_rep="n/a")
    figures = "".join(f"<h2>{name.replace('_', ' ').capitalize()}</h2><img src=\"data:image/png;base64,"
                      f"{base64.b64encode(png).decode()}\" style=\"max-width:100%\">" for name, png in images.items())
    notes = "".join(f"<p><i>{html.escape(n)}</i></p>" for n in comparison.notes)
    chosen = ""
    if comparison.chosen is not None:
        choice = comparison.chosen
        shown = pd.DataFrame({comparison.group_by: choice.table["group"], "Runs": choice.table["runs"],
                              "Val": [cell(row, "Val", choice.metric != "val_loss") for _, row in choice.table.iterrows()]})
        text = "".join("<p>" + re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(line)) + "</p>"
                       for line in val_choice_text(comparison))
        chosen = (f"<h2>Chosen on val ({html.escape(choice.metric)} at each run's selected epoch)</h2>"
                  + shown.to_html(index=False, border=0, classes="t") + text)
    uncopied = f"<p>{html.escape(uncopied_note(comparison))}</p>" if UNCOPIED.keys() <= comparison.overall_metrics.keys() else ""
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>fer-exp comparison</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1300px} table.t{border-collapse:collapse;margin:1em 0}"
            ".t td,.t th{border:1px solid #ccc;padding:4px 8px;text-align:right;white-space:nowrap} .t th{background:#f0f0f0}</style>"
            f"</head><body><h1>fer-exp comparison by {html.escape(comparison.group_by)}</h1><ul>{runs}</ul>"
            f"<h2>Overall (test split, %)</h2>{table_html(comparison.overall, comparison.overall_metrics.values())}"
            f"<h2>Per-class accuracy (test split, %)</h2>{table_html(comparison.per_class, PER_CLASS.values())}"
            f"<p>Several runs: mean ± std [95% CI of the mean].</p>{uncopied}{chosen}{tests}{notes}{figures}"
            f"<details><summary>Markdown</summary><pre>{html.escape(markdown)}</pre></details></body></html>")


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM held back, then delivered on leaving (their handlers swapped for ones that note
    them: a signal mask would not do, the kernel hands the signal to another thread, MLflow's, and Python
    still interrupts the main one). Outside the main thread, nothing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    previous = {number: signal.signal(number, lambda n, _frame: came.append(n)) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(came):
            signal.raise_signal(number)


@dataclass
class CompareResult:
    comparison: Comparison
    markdown: str
    output: Path
    run_id: str | None = None
    experiment_id: str | None = None
    registered: tuple[str, str, bool] | None = None  # (name, version, new) of the model --register registered
    register_error: str | None = None  # why --register could not register it (the comparison is written)


def check_output(folder: Path) -> None:
    """The comparison's folder can be written (made where missing): a study checks it before it trains."""
    from fer_exp.config import ConfigError
    from fer_exp.experiment import check_output_dir

    try:
        check_output_dir(folder, "the comparison's tables and figures", "--output")
    except ConfigError as exc:
        raise CompareError(str(exc)) from None


def compare(experiments: list[str], filter_string: str = "", run_ids: list[str] = (), group_by: str = "model",
            output: str | Path | None = None, log: bool = True, register: str = "") -> CompareResult:
    """Select runs, compare them, write tables/figures/page to ``output`` and log them as a run; ``register``:
    register the model val chooses under this name (alias ``best``)."""
    import tempfile

    import mlflow

    from fer_exp.config import valid_registered_name
    from fer_exp.tracking import killed_on_interrupt, run_page_url, tracking_uri

    if register and not valid_registered_name(register):
        raise CompareError(f"--register {register!r} is not a valid registered model name (no '/' or ':', not '.' "
                           "and not starting with '..'), e.g. fer-best")
    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    selected, notes = select_runs(client, experiments, filter_string, run_ids)
    ungrouped = [run for run in selected if group_value(run, group_by) == "?"]
    if len(ungrouped) == len(selected):
        raise CompareError(f"no compared run has {group_by!r} (as a tag, a config field or a param), so all would be "
                           "one group '?'; group by a config field (model, class_weights, lr, ...), a tag (arm, "
                           "tags.X) or a param (params.X): a run's page in the MLflow UI lists its tags and params")
    if ungrouped:  # not a group of their own: '?' would pool whatever lacks the key (other models, say)
        if run_ids:
            raise CompareError(f"run(s) {', '.join(r.info.run_id for r in ungrouped)} have no {group_by!r} (as a tag, "
                               "a config field or a param): leave them out or group by something every run has")
        notes.append(f"skipped {len(ungrouped)} run(s) without {group_by!r}: "
                     + ", ".join(r.info.run_name or r.info.run_id for r in ungrouped[:5]))
        selected = [run for run in selected if run not in ungrouped]
    output = Path(output or f"reports/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    made_output = not output.exists()
    check_output(output)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [load_run(client, run, group_by, Path(tmp)) for run in selected]
    if not run_ids:  # a search: one run per group, seed and config; groups and seeds in order
        runs, twins = newest_of_twins(runs)
        if twins:
            notes.append(f"skipped {len(twins)} older run(s) with the same group, seed and config as a newer one "
                         "(trained again): " + ", ".join(f"{r.name} {r.run_id}" for r in twins[:5]))
        runs.sort(key=lambda r: (r.group, int(r.seed) if str(r.seed).isdigit() else 0, r.name))
    notes += mixed_configs(runs)
    comparison = compare_runs(runs, group_by, notes)
    refusal = register_refusal(client, comparison, register) if register else None
    if refusal:
        if made_output:  # the folder this call made for it, empty
            with contextlib.suppress(OSError):
                output.rmdir()
        raise CompareError(refusal)
    comparison.register = register
    markdown = markdown_tables(comparison)
    # written aside, then moved in: a comparison interrupted half-way leaves the folder's last one whole,
    # and files of an earlier comparison (its paired tests, say) are not left beside this one's
    staging = Path(tempfile.mkdtemp(prefix=".compare-", dir=output))
    try:
        (staging / "tables.md").write_text(markdown + "\n")
        comparison.overall.to_csv(staging / "overall.csv", index=False)
        comparison.per_class.to_csv(staging / "per_class.csv", index=False)
        pd.DataFrame([{"run_id": r.run_id, "name": r.name, "group": r.group, "seed": r.seed,
                       **{k: r.metrics[k] for k in (*comparison.overall_metrics, *PER_CLASS)},
                       VAL_SCORE: val_score(r)}
                      for r in comparison.runs]).to_csv(  # (as the tables have them: uncopied scores rescored)
            staging / "runs.csv", index=False)
        if not comparison.tests.empty:
            comparison.tests.to_csv(staging / "paired_tests.csv", index=False)
        images = {}
        plt = _plt()
        for name, draw in FIGURES.items():
            figure = draw(comparison)
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=110)
            plt.close(figure)
            images[name] = buffer.getvalue()
            (staging / f"{name}.png").write_bytes(images[name])
        uri = tracking_uri()
        # root-relative links: the page is mostly read in the MLflow UI's artifact viewer, on its server
        links = {r.run_id: run_page_url(r.run_id, r.experiment_id, base="") for r in runs}
        (staging / "report.html").write_text(html_page(comparison, markdown, images, links))
        (staging / "runs.json").write_text(json.dumps({r.run_id: run_page_url(r.run_id, r.experiment_id, uri)
                                                       for r in runs}, indent=2) + "\n")
        written = sorted(f.name for f in staging.iterdir())
        with signals_held():  # a Ctrl-C or SIGTERM here waits: never half the earlier comparison, half this one
            for name in COMPARISON_FILES:
                if name not in written:
                    (output / name).unlink(missing_ok=True)
            for name in written:
                os.replace(staging / name, output / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result = CompareResult(comparison, markdown, output)
    if log:
        # under `mlflow run -e compare` the comparison goes into the run MLflow started
        experiment_id = None if os.environ.get("MLFLOW_RUN_ID") else runs[0].experiment_id
        groups = " vs ".join(comparison.groups)
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"compare: {groups}"[:250], tags={
                "fer_exp.role": "comparison", "group_by": group_by, "compared_runs": ",".join(r.run_id for r in runs)[:5000],
                **({"chosen_on_val": comparison.chosen.run.run_id, "chosen_group": comparison.chosen.group[:5000]}
                   if comparison.chosen else {}),
                "mlflow.note.content": f"Comparison of {len(runs)} runs by {group_by}: {groups}. "
                                       "Open report.html for the tables, tests and figures."}) as run, \
                killed_on_interrupt():
            for _, row in comparison.overall.iterrows():
                for key, title in comparison.overall_metrics.items():
                    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(row["group"]))
                    mlflow.log_metric(f"{safe}.{key}", row[title])
            for name in written:  # this comparison's files, not whatever else the folder holds
                mlflow.log_artifact(str(output / name))
        result.run_id, result.experiment_id = run.info.run_id, run.info.experiment_id
    if register:
        try:
            version, new = register_chosen(comparison.chosen.run, register)
        except CompareError as exc:  # the comparison stands: printed, then this said
            result.register_error = str(exc)
            return result
        result.registered = (register, version, new)
        if result.run_id:
            mlflow.MlflowClient().set_tag(result.run_id, "registered_model", f"{register}/{version}")
    return result


def register_refusal(client, comparison: Comparison, register: str) -> str | None:
    """Why ``--register`` cannot register the model val chooses (none chosen, or it logged no model), or None."""
    if comparison.chosen is None:
        return (f"--register {register}: no model is chosen on val here (" + (
            "the runs select on different val metrics" if any(val_score(r) is not None for r in comparison.runs) else
            "no compared run selected an epoch on val: evaluations of saved models choose nothing")
            + "); compare training runs that select alike, or register a run's model with fer-exp train --register")
    chosen = comparison.chosen.run
    if not has_logged_model(client, chosen):
        return (f"--register {register}: run {chosen.label} ({chosen.run_id}), which val chooses, logged no model to "
                "register (no comparison was written); predict with its checkpoint instead: "
                f"fer-exp predict --model runs:/{chosen.run_id}/checkpoints/best.pt IMAGES")
    return None


def has_logged_model(client, run: RunInfo) -> bool:
    """Whether the run logged its model as ``model`` (an MLflow 3 logged model; before, an artifact folder)."""
    import mlflow

    try:
        found = client.search_logged_models([run.experiment_id], filter_string=f"source_run_id = '{run.run_id}' and name = 'model'")
    except mlflow.exceptions.MlflowException:  # a server of MLflow 2, which has no logged models
        found = []
    return bool(found) or any(f.path == "model/MLmodel" for f in client.list_artifacts(run.run_id, "model"))


CHOSEN_ALIAS = "best"  # the alias --register points at the model val chose: models:/NAME@best


def register_chosen(run: RunInfo, name: str) -> tuple[str, bool]:
    """(version, whether it is new): the run's model as a version of the registered model ``name`` (the
    version it already is, where one is: comparing again registers nothing twice), aliased ``best``."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        versions = client.search_model_versions(f"run_id = '{run.run_id}'")  # (a name may hold quotes)
        version = next((v.version for v in versions if v.name == name), None)
        new = version is None
        if new:
            version = mlflow.register_model(f"runs:/{run.run_id}/model", name).version
        client.set_registered_model_alias(name, CHOSEN_ALIAS, version)
    except mlflow.exceptions.MlflowException as exc:
        raise CompareError(f"the comparison is written, but the model of run {run.run_id} (chosen on val) could not be "
                           f"registered as {name}: {first_line(exc, 300)}") from None
    return str(version), new
