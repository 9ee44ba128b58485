"""`fer-exp compare`: tables, figures, paired tests and the comparison run, from real tracked runs."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from fer_exp.classes import CLASS_NAMES
from fer_exp.cli import main
from fer_exp.compare import PER_CLASS, mcnemar, summarise
from fer_exp.config import load_config

TINY = {"data": "synthetic:96,24,40", "epochs": 2, "batch_size": 32, "eval_batch_size": 64, "device": "cpu",
        "experiment_name": "cmp", "system_metrics": False}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, isolated_store):
    """Two models x two seeds, trained and tracked by the real training path in a fresh store."""
    from fer_exp.experiment import run_experiment

    tmp = tmp_path_factory.mktemp("compare")
    with isolated_store(tmp) as mp:
        runs = {}
        for model in ("cnn", "resnet18"):
            for seed in (1, 2):
                cfg = load_config(overrides={**TINY, "model": model, "seed": seed, "output_dir": str(tmp / "out")})
                runs[(model, seed)] = run_experiment(cfg, progress=False, log_model=False).run_id
        # a tuning-like run without a test evaluation, and a killed run: compare must skip or refuse them
        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name("cmp").experiment_id
        trial = client.create_run(experiment, run_name="a trial", tags={"fer_exp.role": "trial"})
        client.set_terminated(trial.info.run_id, "FINISHED")
        killed = client.create_run(experiment, run_name="killed run", tags={"model": "cnn"})
        client.set_terminated(killed.info.run_id, "KILLED")
        # an evaluation on val (fer-exp evaluate --split val): finished, but no test evaluation to compare
        on_val = client.create_run(experiment, run_name="evaluate cnn on val", tags={"fer_exp.role": "evaluation",
                                                                                   "model": "cnn+tta:flip"})
        client.log_metric(on_val.info.run_id, "val_accuracy", 0.5)
        client.set_terminated(on_val.info.run_id, "FINISHED")
        yield {"tmp": tmp, "runs": runs, "client": client, "mp": mp, "trial": trial.info.run_id,
               "killed": killed.info.run_id}


def invoke(tracked, *args):
    return CliRunner().invoke(main, ["compare", "--experiment", "cmp", *args])


@pytest.fixture(scope="module")
def by_model(tracked):
    result = invoke(tracked, "--group-by", "model", "--output", str(tracked["tmp"] / "report"))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output, tracked["tmp"] / "report"


@pytest.mark.slow  # the four tracked runs
def test_tables_equal_the_runs_metrics(tracked, by_model):
    output, folder = by_model
    client = tracked["client"]
    overall = pd.read_csv(folder / "overall.csv").set_index("group")
    for model in ("cnn", "resnet18"):
        accs = [client.get_run(tracked["runs"][(model, s)]).data.metrics["test_accuracy"] for s in (1, 2)]
        assert overall.loc[model, "runs"] == 2
        assert overall.loc[model, "Accuracy"] == pytest.approx(np.mean(accs))
        assert overall.loc[model, "Accuracy std"] == pytest.approx(np.std(accs, ddof=1))
        half = 12.706204736 * np.std(accs, ddof=1) / math.sqrt(2)  # t(0.975, 1 degree of freedom)
        assert overall.loc[model, "Accuracy ci_high"] == pytest.approx(np.mean(accs) + half)
        per_class = pd.read_csv(folder / "per_class.csv").set_index("group")
        fear = [client.get_run(tracked["runs"][(model, s)]).data.metrics["test_acc_fear"] for s in (1, 2)]
        assert per_class.loc[model, "Fear"] == pytest.approx(np.mean(fear))
        assert f"| {model} | 2 | {100 * np.mean(accs):.2f} ± {100 * np.std(accs, ddof=1):.2f}" in output
    assert "| Model | Runs | Accuracy | Macro F1 | Weighted F1 |" in output
    assert "| Model | Runs | " + " | ".join(PER_CLASS.values()) + " |" in output
    runs = pd.read_csv(folder / "runs.csv")
    assert set(runs["run_id"]) == set(tracked["runs"].values())  # the trial and the killed run are not in
    assert "skipped 1 tuning or comparison run(s)" in output and "skipped 1 run(s) that did not finish" in output
    assert "skipped 1 run(s) with no test evaluation: evaluate cnn on val" in output


@pytest.mark.slow  # the four tracked runs
def test_paired_tests_match_a_hand_computation(tracked, by_model):
    _, folder = by_model
    client = tracked["client"]
    tests = pd.read_csv(folder / "paired_tests.csv")
    assert len(tests) == 2  # cnn vs resnet18, paired by seed
    for _, row in tests.iterrows():
        preds = {}
        for side in ("a", "b"):
            path = client.download_artifacts(row[f"{side}_run_id"], "test_predictions.csv", str(folder / side))
            preds[side] = pd.read_csv(path).set_index("source").sort_index()
        right_a = preds["a"]["prediction"] == preds["a"]["label"]
        right_b = preds["b"]["prediction"] == preds["b"]["label"]
        b, c = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
        assert (row["a_right_b_wrong"], row["a_wrong_b_right"], row["n"]) == (b, c, 40)
        p = min(1.0, 2 * sum(math.comb(b + c, k) for k in range(min(b, c) + 1)) / 2 ** (b + c)) if b + c else 1.0
        assert row["p_value"] == pytest.approx(p)
        fear = preds["a"]["label"] == CLASS_NAMES.index("fear")
        assert row["delta_fear"] == pytest.approx(right_b[fear].mean() - right_a[fear].mean())
    low, high = sorted(tests["p_value"])  # Holm over the two tests: 2 x the lower, then the higher (never below)
    assert sorted(tests["p_holm"]) == pytest.approx(sorted([min(1, 2 * low), max(min(1, 2 * low), high)]))


def test_holm_by_hand():
    from fer_exp.compare import holm

    # sorted 0.01, 0.02, 0.04: 3 x 0.01, max(0.03, 2 x 0.02), max(0.04, 1 x 0.04)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0]) and holm([0.2]) == [0.2] and holm([]) == []


@pytest.mark.slow  # the tracked store
def test_a_search_compares_each_recipe_and_seed_once_and_says_what_it_left_out(tracked):
    """Runs made by hand in their own experiment: a run trained twice (the older is left out), a group
    mixing recipes (said, with the fields), a run without the grouping key (left out, not a group '?'),
    runs named twice or deleted (one run; refused); a search reads every page."""
    from fer_exp.compare import search_all_runs

    client = tracked["client"]
    experiment = client.create_experiment("twins")
    metrics = {k: 0.5 for k in ("test_accuracy", "test_macro_f1", "test_weighted_f1", *PER_CLASS)}

    def made(name, start, params, tags=None, accuracy=0.5):
        run = client.create_run(experiment, start_time=start, run_name=name, tags=tags or {"model": "cnn"})
        for key, value in {**metrics, "test_accuracy": accuracy}.items():
            client.log_metric(run.info.run_id, key, value)
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
        client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    recipe = {"config.model": "cnn", "config.epochs": 2, "config.seed": 1}
    older = made("first", 1000, recipe, accuracy=0.2)
    newer = made("again", 2000, {**recipe, "config.device": "cuda"}, accuracy=0.4)  # where it ran: the same recipe
    longer = made("longer", 3000, {**recipe, "config.epochs": 60, "config.seed": 2}, accuracy=0.6)
    made("no model", 4000, {"lr": 0.1}, tags={"note": "made elsewhere"})
    # two ensemble evaluations of other members (no config.* params): not twins of each other
    ensembles = [made(f"ensemble {i}", 5000 + i, {"models": f"runs:/{i}a/model runs:/{i}b/model", "n_models": 2},
                      tags={"model": "cnn+resnet18", "fer_exp.role": "evaluation"}) for i in range(2)]
    assert [r.info.run_id for r in search_all_runs(client, [experiment], page_size=2)][3:] == [longer, newer, older]
    result = CliRunner().invoke(main, ["compare", "--experiment", "twins", "--no-log", "--output", str(tracked["tmp"] / "twins")])
    assert result.exit_code == 0, result.output
    runs = pd.read_csv(tracked["tmp"] / "twins" / "runs.csv")
    assert list(runs["run_id"]) == [newer, longer, *sorted(ensembles, key=lambda r: runs.set_index("run_id").loc[r, "name"])]
    assert f"skipped 1 older run(s) with the same group, seed and config as a newer one (trained again): first {older}" in result.output
    assert "skipped 1 run(s) without 'model': no model" in result.output
    assert "group cnn averages runs whose configs differ beyond the seed, in epochs (2, 60)" in result.output
    assert "| cnn | 2 | 50.00 ± 14.14" in result.output  # 0.4 and 0.6, not 0.2
    named = CliRunner().invoke(main, ["compare", "--runs", f"{older},{older}", "--no-log", "--output", str(tracked["tmp"] / "once")])
    assert named.exit_code == 0 and f"| first ({older[:8]}) | 1 | 20.00 |" in named.output, named.output
    client.delete_run(longer)
    deleted = CliRunner().invoke(main, ["compare", "--runs", f"{newer},{longer}", "--no-log", "--output", str(tracked["tmp"] / "gone")])
    assert deleted.exit_code == 2 and f"run longer {longer} is deleted" in deleted.output, deleted.output


def test_a_signal_during_the_folder_swap_waits_for_its_end(tmp_path):
    """SIGINT inside signals_held (in a process with MLflow's threads) interrupts only after the block."""
    import signal
    import time

    script = ("import sys, time, mlflow; mlflow.MlflowClient()\n"
              "from fer_exp.compare import signals_held\n"
              "with signals_held():\n"
              "    print('in', flush=True); time.sleep(1.5); print('left', flush=True)\n"
              "time.sleep(5); print('not interrupted', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "in\n"
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert out == "left\n" and "KeyboardInterrupt" in err, (out, err)


def test_an_evaluation_repeats_its_run_only_with_its_data_tta_and_metrics():
    from types import SimpleNamespace

    from fer_exp.compare import OVERALL, repeats_its_source

    def run(tags, metrics, params=None):
        return SimpleNamespace(data=SimpleNamespace(tags=tags, metrics=metrics, params=params or {}))

    metrics = {k: 0.5 for k in (*OVERALL, *PER_CLASS)}
    source = run({"data_source": "d", "test_tta": "flip"}, metrics)
    by_id = {"s": source}

    def evaluation(tta, changed=None, **tags):
        return run({"fer_exp.role": "evaluation", "source_run_0": "s", "data_source": "d", "tta": tta, **tags},
                   {**metrics, **(changed or {})}, {"n_models": "1"})
    assert repeats_its_source(evaluation("flip"), by_id)  # its own TTA: the same test
    assert not repeats_its_source(evaluation("none"), by_id)  # another TTA than its run tested with
    assert not repeats_its_source(evaluation("flip", {"test_accuracy": 0.4}), by_id)  # another epoch (last.pt)
    assert not repeats_its_source(evaluation("flip", data_source="other"), by_id)
    assert not repeats_its_source(evaluation("flip", source_run_0="elsewhere"), by_id)


def test_a_run_that_predicts_one_class_is_said_to_be_at_chance():
    from fer_exp.compare import RunInfo, one_class_runs

    stuck = {f"test_acc_{c}": float(c == "disgust") for c in CLASS_NAMES}
    learnt = {f"test_acc_{c}": 0.5 for c in CLASS_NAMES}
    runs = [RunInfo("a" * 32, "cnn 48px seed1", "cnn", "1", stuck, {}, {}), RunInfo("b" * 32, "cnn 48px seed2", "cnn", "1", learnt, {}, {})]
    [note] = one_class_runs(runs)
    assert note.startswith(f"run cnn 48px seed1 ({'a' * 32}) predicts disgust for every test face")


def test_the_uncopied_scores_are_columns_where_every_run_has_them():
    """Runs on FER2013 score the test faces with no copy in train or val apart: the overall table shows
    them beside the benchmark's numbers when every compared run has them, and says what they are."""
    from fer_exp.compare import OVERALL, UNCOPIED, RunInfo, compare_runs, html_page, markdown_tables

    def run(i, group, accuracy, uncopied=None, tags=None):
        metrics = {**dict.fromkeys((*OVERALL, *PER_CLASS), 0.5), "test_accuracy": accuracy}
        if uncopied is not None:
            metrics |= {"test_accuracy_uncopied": uncopied, "test_macro_f1_uncopied": uncopied - 0.1}
        return RunInfo(f"{i}" * 32, f"run {i}", group, "1", metrics, {"config.seed": str(i)}, tags or {})

    both = compare_runs([run(1, "report", 0.68, 0.66), run(2, "report", 0.70, 0.67), run(3, "drop", 0.67, 0.665)], "duplicates")
    assert list(both.overall_metrics) == [*OVERALL, *UNCOPIED]
    row = both.overall.set_index("group").loc["report"]
    assert row["Accuracy, uncopied"] == pytest.approx(0.665) and row["Macro F1, uncopied"] == pytest.approx(0.565)
    table = markdown_tables(both)
    assert "| Duplicates | Runs | Accuracy | Macro F1 | Weighted F1 | Accuracy, uncopied | Macro F1, uncopied |" in table
    assert "| drop | 1 | 67.00 | 50.00 | 50.00 | 66.50 | 56.50 |" in table
    assert "Uncopied: on the test faces with no copy in the source's train or val" in table
    page = html_page(both, table, {}, {r.run_id: "#" for r in both.runs})
    assert "<th>Accuracy, uncopied</th>" in page and "Uncopied: on the test faces with no copy in the source&#x27;s" in page
    older = compare_runs([run(1, "report", 0.68, 0.66), run(3, "drop", 0.67)], "duplicates")  # one run lacks them
    assert list(older.overall_metrics) == list(OVERALL) and "Uncopied:" not in markdown_tables(older)
    assert any(n.startswith("the uncopied scores (test_accuracy_uncopied) are left out: 1 run(s) lack them") and
               f"run 3 {'3' * 32}" in n for n in older.notes)
    # copies counted at another pixel correlation leave other faces to score: not set side by side
    near = run(4, "drop", 0.66, 0.64, {"copy_correlation": "0.95"})
    mixed = compare_runs([run(1, "report", 0.68, 0.66, {"copy_correlation": "1"}), run(2, "report", 0.70, 0.67), near],
                         "duplicates")  # run 2 predates the tag: identical pixels, as 1
    assert list(mixed.overall_metrics) == list(OVERALL)  # no predictions to rescore them from
    assert ("the uncopied scores (test_accuracy_uncopied) are left out: the runs count copies at different pixel "
            "correlations (1, 0.95; 1: identical pixels), so they score different faces") in " ".join(mixed.notes)
    # with their predictions, each run is rescored on the faces no run counts as a copy (those at 0.95)
    labels = [0, 1, 2, 3, 4, 5, 6, 0]
    frames = {1: ([0, 1, 2, 3, 4, 5, 6, 1], [True, False, False, False, False, False, False, False]),  # identical: face 0
              4: ([1, 1, 2, 3, 0, 0, 6, 0], [True, True, False, False, False, False, False, False])}  # at 0.95: 0 and 1
    for r in (mixed.runs[0], near):
        predicted, copied = frames[int(r.run_id[0])]
        r.predictions = pd.DataFrame({"source": [f"f{i}" for i in range(8)], "label": labels, "prediction": predicted,
                                      "copied": copied})
    rescored = compare_runs([mixed.runs[0], near], "duplicates")
    assert list(rescored.overall_metrics) == [*OVERALL, *UNCOPIED]
    uncopied = rescored.overall.set_index("group")["Accuracy, uncopied"]
    assert uncopied["report"] == pytest.approx(5 / 6) and uncopied["drop"] == pytest.approx(4 / 6)  # faces 2-7
    assert ("the runs count copies at different pixel correlations (1, 0.95; 1: identical pixels): their uncopied "
            "scores are rescored from their test predictions on the 6 test faces that no run counts as a copy") in rescored.notes
    assert "a pixel correlation of 0.95 or more)." in markdown_tables(rescored)
    from fer_exp.compare import copy_correlation  # the tag, else the config's, else identical pixels

    assert copy_correlation(RunInfo("6" * 32, "r", "g", "1", {}, {"config.copy_correlation": "0.9"}, {})) == 0.9
    assert copy_correlation(RunInfo("6" * 32, "r", "g", "1", {}, {"model0.config.copy_correlation": "0.8"}, {})) == 0.8
    assert copy_correlation(RunInfo("6" * 32, "r", "g", "1", {}, {}, {})) == 1.0
    alike = compare_runs([run(5, "report", 0.68, 0.66, {"copy_correlation": "0.95"}), near], "duplicates")
    assert list(alike.overall_metrics) == [*OVERALL, *UNCOPIED] and "uncopied" not in " ".join(alike.notes)
    assert "a copy: identical pixels, or a pixel correlation of 0.95 or more)." in markdown_tables(alike)


def test_a_run_made_before_a_config_field_existed_groups_under_its_default():
    """Runs made before `duplicates` existed trained as 'report': grouped so, not skipped as lacking the key."""
    from types import SimpleNamespace

    from fer_exp.compare import group_value

    def run(params, tags=None):
        return SimpleNamespace(data=SimpleNamespace(params=params, tags=tags or {}),
                               info=SimpleNamespace(run_name="r", run_id="0" * 32))

    for key in ("duplicates", "config.duplicates", "params.config.duplicates"):  # however it is spelt
        assert group_value(run({"config.model": "cnn"}), key) == "report"
        assert group_value(run({"config.model": "cnn", "config.duplicates": "drop"}), key) == "drop"
    assert group_value(run({"config.model": "cnn"}), "not_a_field") == "?"
    assert group_value(run({"config.model": "cnn"}), "compile") == "?"  # an execution field's default has changed since
    assert group_value(run({"config.lr": "0.001"}), "duplicates") == "?"  # not a fer-exp run's whole config
    assert group_value(run({}, {"fer_exp.role": "evaluation"}), "duplicates") == "?"  # no config of its own


def test_mcnemar_by_hand():
    a = np.array([1] * 7 + [0] * 2 + [1] * 10 + [0] * 5, bool)  # 7 only A right, 2 only B right
    b = np.array([0] * 7 + [1] * 2 + [1] * 10 + [0] * 5, bool)
    result = mcnemar(a, b)
    assert (result["a_right_b_wrong"], result["a_wrong_b_right"], result["n"]) == (7, 2, 24)
    assert result["chi2"] == pytest.approx((7 - 2 - 1) ** 2 / 9)
    assert result["p_value"] == pytest.approx(2 * (1 + 9 + 36) / 512)
    assert mcnemar(a, a)["p_value"] == 1.0


def test_summary_of_one_value_has_no_interval():
    assert summarise([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1, "ci_low": None, "ci_high": None}


@pytest.mark.slow  # the four tracked runs
def test_figures_page_and_the_comparison_run(tracked, by_model):
    output, folder = by_model
    for name in ("per_class_accuracy", "confusion_matrices", "val_accuracy"):
        assert (folder / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (folder / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "Paired tests" in page
    assert 'href="/#/experiments/' in page and "?workflowType=machine_learning" in page
    client = tracked["client"]
    experiment = client.get_experiment_by_name("cmp").experiment_id
    compared = client.search_runs([experiment], "tags.fer_exp.role = 'comparison'")
    assert len(compared) >= 1
    run = compared[-1]
    assert set(run.data.tags["compared_runs"].split(",")) == set(tracked["runs"].values())
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "report.html", "overall.csv", "per_class.csv", "paired_tests.csv", "tables.md", "confusion_matrices.png"}
    overall = pd.read_csv(folder / "overall.csv").set_index("group")
    assert run.data.metrics["cnn.test_accuracy"] == pytest.approx(overall.loc["cnn", "Accuracy"])
    assert f"runs page: http://127.0.0.1:5000/#/experiments/{experiment}/runs?workflowType=machine_learning" in output


@pytest.mark.slow  # the four tracked runs
def test_two_runs_are_tested_against_each_other(tracked):
    a, b = tracked["runs"][("resnet18", 1)], tracked["runs"][("cnn", 1)]
    result = invoke(tracked, "--runs", f"{a},{b}", "--output", str(tracked["tmp"] / "two"), "--no-log")
    assert result.exit_code == 0, result.output
    tests = pd.read_csv(tracked["tmp"] / "two" / "paired_tests.csv")
    assert list(zip(tests["a_run_id"], tests["b_run_id"])) == [(a, b)]


@pytest.mark.slow  # the four tracked runs
def test_runs_on_different_test_sets_are_not_paired(tracked):
    """Synthetic data is drawn per seed: two seeds' runs saw different test images."""
    a, b = tracked["runs"][("cnn", 1)], tracked["runs"][("cnn", 2)]
    apart = invoke(tracked, "--runs", a, "--runs", b, "--output", str(tracked["tmp"] / "apart"), "--no-log")
    assert apart.exit_code == 0 and "| Run | Runs |" in apart.output  # runs named: each a row of its own
    assert f"({a[:8]}) | 1 |" in apart.output and f"({b[:8]}) | 1 |" in apart.output, apart.output
    result = invoke(tracked, "--runs", a, "--runs", b, "--group-by", "model", "--output", str(tracked["tmp"] / "diff"),
                    "--no-log")
    assert result.exit_code == 0, result.output
    assert "| cnn | 2 |" in result.output  # both in one group, and said to mix test sets
    assert "were tested on different test sets: no paired test" in result.output
    assert "Note: group cnn averages runs tested on 2 different test sets" in result.output
    by_seed = invoke(tracked, "--group-by", "seed", "--output", str(tracked["tmp"] / "by-seed"), "--no-log")
    assert by_seed.exit_code == 0 and "different test sets (other data" not in by_seed.output  # a seed: one test set
    assert not (tracked["tmp"] / "diff" / "paired_tests.csv").exists()


@pytest.mark.slow  # the four tracked runs
def test_a_comparison_into_an_earlier_one_s_folder_replaces_it_and_logs_only_its_own_files(tracked):
    folder = tracked["tmp"] / "reused"
    a, b, c = tracked["runs"][("resnet18", 1)], tracked["runs"][("cnn", 1)], tracked["runs"][("cnn", 2)]
    assert invoke(tracked, "--runs", f"{a},{b}", "--output", str(folder), "--no-log").exit_code == 0
    assert (folder / "paired_tests.csv").exists()
    (folder / "my_notes.txt").write_text("the user's, not the comparison's")
    result = invoke(tracked, "--runs", f"{b},{c}", "--output", str(folder))  # no paired tests: other test sets
    assert result.exit_code == 0, result.output
    assert not (folder / "paired_tests.csv").exists()  # not the earlier comparison's tests beside this one
    assert (folder / "my_notes.txt").exists() and not list(folder.glob(".compare-*"))
    assert set(pd.read_csv(folder / "runs.csv")["run_id"]) == {b, c}
    client = tracked["client"]
    [run] = [r for r in client.search_runs([client.get_experiment_by_name("cmp").experiment_id],
                                           "tags.fer_exp.role = 'comparison'")
             if set(r.data.tags["compared_runs"].split(",")) == {b, c}]
    logged = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert "report.html" in logged and "my_notes.txt" not in logged and "paired_tests.csv" not in logged


@pytest.mark.slow  # the four tracked runs
def test_group_by_a_config_field(tracked):
    result = invoke(tracked, "--group-by", "seed", "--output", str(tracked["tmp"] / "seed"), "--no-log")
    assert result.exit_code == 0, result.output
    assert set(pd.read_csv(tracked["tmp"] / "seed" / "overall.csv")["group"].astype(str)) == {"1", "2"}


@pytest.mark.parametrize(
    "args, piece",
    [
        (["--filter", "tags.model = 'vgg'"], "no finished training runs to compare"),
        (["--filter", "tags.model = = 'x'"], "is not valid"),
        (["--experiment", "nope"], "no experiment named nope"),
    ],
)
@pytest.mark.slow  # the four tracked runs
def test_nothing_to_compare_exits_2(tracked, args, piece):
    result = CliRunner().invoke(main, ["compare", *(args if args[0] == "--experiment" else ["--experiment", "cmp", *args]),
                                       "--no-log", "--output", str(tracked["tmp"] / "none")])
    assert result.exit_code == 2 and piece in result.output and "Traceback" not in result.output, result.output


@pytest.mark.slow  # the four tracked runs
def test_runs_without_a_test_evaluation_are_refused_by_name(tracked):
    for bad in (tracked["trial"], tracked["killed"]):
        result = invoke(tracked, "--runs", tracked["runs"][("cnn", 1)], "--runs", bad, "--no-log",
                        "--output", str(tracked["tmp"] / "bad"))
        assert result.exit_code == 2 and "no test evaluation" in result.output and bad in result.output, result.output
    result = invoke(tracked, "--runs", "0123456789abcdef", "--no-log", "--output", str(tracked["tmp"] / "bad"))
    assert result.exit_code == 2 and "no run 0123456789abcdef" in result.output


@pytest.mark.slow  # the four tracked runs
def test_study_makes_its_runs_once_then_compares(tracked, tmp_path):
    (tmp_path / "base.yaml").write_text("model: cnn\nepochs: 1\nbatch_size: 32\nsystem_metrics: false\n")
    (tmp_path / "mini.yaml").write_text(
        "experiment_name: mini\nseeds: [3]\narms:\n  weighted: {config: base.yaml}\n"
        "  unweighted: {config: base.yaml, set: {class_weights: none}}\ncompare: {group_by: arm}\n")
    args = ["study", str(tmp_path / "mini.yaml"), "--data", "synthetic:64,16,24", "--output-dir", str(tmp_path / "out")]
    first = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "r1")])
    assert first.exit_code == 0, first.output + repr(first.exception)
    assert "2 run(s) in experiment mini, 0 already made, 2 to make" in first.output
    assert "| Arm | Runs | Accuracy |" in first.output and "| unweighted | 1 |" in first.output
    # the paired test names each run by its arm: the two runs' names alone would read the same
    tests = pd.read_csv(tmp_path / "r1" / "paired_tests.csv")
    assert {tests["a"][0].split(":")[0], tests["b"][0].split(":")[0]} == {"weighted", "unweighted"}
    client = tracked["client"]
    experiment = client.get_experiment_by_name("mini").experiment_id
    made = client.search_runs([experiment], "tags.study_file = 'mini'")
    assert sorted(r.data.tags["arm"] for r in made) == ["unweighted", "weighted"]
    unweighted = next(r for r in made if r.data.tags["arm"] == "unweighted")
    assert unweighted.data.params["config.class_weights"] == "none" and unweighted.data.params["config.seed"] == "3"
    second = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "r2")])
    assert second.exit_code == 0, second.output
    assert "0 to make" in second.output and "made 0 run(s); comparing all 2" in second.output
    assert len(client.search_runs([experiment], "tags.study_file = 'mini'")) == 2
    changed = CliRunner().invoke(main, [*args, "--epochs", "2", "--dry-run"])  # another config: not the same runs
    assert changed.exit_code == 0 and "0 already made, 2 to make" in changed.output
    # a run made by a fer-exp from before a config field (no param config.tta) was made with its default
    from mlflow.entities import Param

    weighted = next(r for r in made if r.data.tags["arm"] == "weighted")
    client.delete_run(weighted.info.run_id)
    older = client.create_run(experiment, tags={"study_file": "mini", "arm": "weighted"}).info.run_id
    client.log_batch(older, params=[Param(k, v) for k, v in weighted.data.params.items() if k != "config.tta"])
    client.set_terminated(older)
    again = CliRunner().invoke(main, [*args, "--dry-run"])
    assert again.exit_code == 0 and "2 already made, 0 to make" in again.output and f"made: {older}" in again.output
    flip = CliRunner().invoke(main, [*args, "--tta", "flip", "--dry-run"])  # what it was not made with
    assert flip.exit_code == 0 and "0 already made, 2 to make" in flip.output


@pytest.mark.slow  # the tracked store
def test_an_interrupted_study_resumes_its_run_instead_of_making_it_again(tracked, tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM mid-run, then the same command: the KILLED run goes on from its last epoch
    (one run for the arm and seed, its epochs 1..3 logged once), not a second run from scratch; a run
    that another command trains now is left to it."""
    from fer_exp.experiment import run_lock

    (tmp_path / "base.yaml").write_text("model: cnn\nepochs: 3\nbatch_size: 32\nsystem_metrics: false\n")
    (tmp_path / "cut.yaml").write_text("experiment_name: cut\nseeds: [4]\narms:\n  a: {config: base.yaml}\n")
    args = ["study", str(tmp_path / "cut.yaml"), "--data", "synthetic:64,16,24", "--output-dir", str(tmp_path / "out"),
            "--output", str(tmp_path / "report")]
    real_log_metrics = mlflow.log_metrics

    def interrupted_at_epoch_2(metrics, *a, **kw):
        if kw.get("step") == 2:
            raise KeyboardInterrupt
        return real_log_metrics(metrics, *a, **kw)
    monkeypatch.setattr(mlflow, "log_metrics", interrupted_at_epoch_2)
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 130 and "the same command resumes the interrupted one" in first.output, first.output
    monkeypatch.setattr(mlflow, "log_metrics", real_log_metrics)
    client = tracked["client"]
    experiment = client.get_experiment_by_name("cut").experiment_id
    [killed] = client.search_runs([experiment])
    assert killed.info.status == "KILLED"
    # a run another command has just started (RUNNING, in its first epoch: no last.pt yet) is left to it,
    # not taken for one that cannot resume and made again
    from mlflow.entities import Param

    starting = client.create_run(experiment, tags={"study_file": "cut", "arm": "a",
                                                   "checkpoint_dir": str(tmp_path / "starting")}).info.run_id
    client.log_batch(starting, params=[Param(k, v) for k, v in killed.data.params.items()])
    with run_lock(tmp_path / "starting"):
        early = CliRunner().invoke(main, args)
    assert early.exit_code == 0 and f"skipped: run {starting} is still training in process {os.getpid()} (another command)" in early.output, early.output
    assert len(client.search_runs([experiment])) == 2
    # RUNNING on another machine (a shared store): whether it still trains is known there alone
    client.set_tag(starting, "fer_exp.host", "gpu-box-7")
    elsewhere = CliRunner().invoke(main, args)
    assert elsewhere.exit_code == 0 and f"skipped: run {starting} is RUNNING on gpu-box-7" in elsewhere.output
    assert len(client.search_runs([experiment])) == 2
    client.delete_run(starting)
    # resumed by a command on another machine between this command's look and its resume: left to it
    import fer_exp.study

    host = killed.data.tags["fer_exp.host"]
    assert host == socket.gethostname()
    client.set_tag(killed.info.run_id, "fer_exp.host", "gpu-box-9")
    client.update_run(killed.info.run_id, status="RUNNING")
    monkeypatch.setattr(fer_exp.study, "find_interrupted_run", lambda *a: killed)  # what it saw before
    raced = CliRunner().invoke(main, args)
    monkeypatch.undo()
    assert raced.exit_code == 0, raced.output
    assert f"skipped: run {killed.info.run_id} was resumed meanwhile by another command (RUNNING on gpu-box-9)" in raced.output
    assert "resuming run" not in raced.output and len(client.search_runs([experiment])) == 1
    client.set_tag(killed.info.run_id, "fer_exp.host", "old-box")  # KILLED on another machine: resumed here
    client.update_run(killed.info.run_id, status="KILLED")
    with run_lock(killed.data.tags["checkpoint_dir"]):  # as if another command trained it now
        busy = CliRunner().invoke(main, args)
    assert busy.exit_code == 0 and f"skipped: run {killed.info.run_id} is still training in process {os.getpid()} (another command)" in busy.output, busy.output
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    assert f"to resume: {killed.info.run_id} (KILLED)" in second.output and "resuming run" in second.output
    [run] = client.search_runs([experiment], "tags.study_file = 'cut'")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["fer_exp.host"] == host  # where it trained last
    assert killed.data.tags["stop_reason"] == "interrupted (Ctrl-C or SIGTERM)" and "stop_reason" not in run.data.tags
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2, 3]
    # a signal once the runs are made, or during the comparison: exit 130 and a word, not a silent 0
    import fer_exp.compare
    import fer_exp.train

    monkeypatch.setattr(fer_exp.train, "stop_requested", lambda: True)
    late = CliRunner().invoke(main, args)
    assert late.exit_code == 130 and "interrupted: the runs are made; the same command compares them" in late.output
    monkeypatch.setattr(fer_exp.train, "stop_requested", lambda: False)
    monkeypatch.setattr("signal.signal", lambda *a: None)  # (pytest's own process keeps its SIGTERM)

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(fer_exp.compare, "compare", interrupted)
    during = CliRunner().invoke(main, args)
    assert during.exit_code == 130 and "interrupted: the comparison; the runs are made" in during.output, during.output


@pytest.mark.slow
def test_study_commands_started_together_make_each_run_once(store):
    """Two `fer-exp study` commands on one study file started at once (two terminals): each run is made
    by one of them and left alone by the other. Before, both planned every run at their start and made
    it, and the comparison counted the twins as extra seeds."""
    (store / "base.yaml").write_text("model: cnn\nepochs: 1\nbatch_size: 32\nsystem_metrics: false\n")
    (store / "two.yaml").write_text("experiment_name: two\nseeds: [5]\narms:\n  a: {config: base.yaml}\n"
                                    "  b: {config: base.yaml, set: {class_weights: none}}\n")
    command = [sys.executable, "-m", "fer_exp.cli", "study", "two.yaml", "--data", "synthetic:64,16,24",
               "--output-dir", "out"]
    procs = [subprocess.Popen([*command, "--output", f"report{i}"], cwd=store, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("two").experiment_id], "tags.study_file = 'two'")
    assert sorted(r.data.tags["arm"] for r in runs) == ["a", "b"], outputs
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["fer_exp.host"] for r in runs} == {socket.gethostname()}  # where each was trained


def test_a_study_whose_later_arm_cannot_load_its_pretrained_weights_stops_before_its_first_run(store):
    """The reference study offline: its ResNet18 arm's weights cannot be had. That was said at the arm's
    first run, after the CNN arms had trained; now before any run is started."""
    (store / "base.yaml").write_text("model: cnn\nepochs: 1\nbatch_size: 32\nsystem_metrics: false\n")
    (store / "s.yaml").write_text(
        "experiment_name: weights\nseeds: [5]\narms:\n  cnn: {config: base.yaml}\n"
        "  resnet: {config: base.yaml, set: {model: resnet18, pretrained: missing.safetensors}}\n")
    result = CliRunner().invoke(main, ["study", str(store / "s.yaml"), "--data", "synthetic:64,16,24",
                                       "--output-dir", str(store / "out"), "--output", str(store / "report")])
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert "arm resnet starts from pretrained=" in result.output and "no run was started" in result.output
    assert "missing.safetensors" in result.output and "[1/2]" not in result.output, result.output
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("weights")
    assert experiment is None or client.search_runs([experiment.experiment_id]) == []
    assert not (store / "report").exists()


@pytest.mark.parametrize(
    "text, piece",
    [
        ("arms: {}\n", "arms must map arm names"),
        ("arms:\n  a: {config: nowhere.yaml}\n", "nowhere.yaml not found"),
        ("arms:\n  a: {set: {epochs: zero}}\n", "epochs must be int"),
        ("seeds: [a]\narms:\n  a: {}\n", "seeds must be a non-empty list of seeds"),
        ("seeds: []\narms:\n  a: {}\n", "seeds must be a non-empty list of seeds"),
        ("seeds: [-1]\narms:\n  a: {}\n", "seeds must be a non-empty list of seeds (integers from 0)"),
        ("seeds: [42, 42]\narms:\n  a: {}\n", "name a seed twice"),
        ("arms:\n  a: {set: {seed: 5}}\n", "set may not fix seed"),
        ("arms:\n  a: {}\ncompare: {group_by: class-weights}\n", "did you mean class_weights?"),
        ("search_space: {}\narms:\n  a: {}\n", "fer-exp tune"),
    ],
)
@pytest.mark.slow  # the four tracked runs
def test_bad_study_files_exit_2(tracked, tmp_path, text, piece):
    (tmp_path / "s.yaml").write_text(text)
    result = CliRunner().invoke(main, ["study", str(tmp_path / "s.yaml"), "--dry-run"])
    assert result.exit_code == 2 and piece in result.output and "Traceback" not in result.output, result.output


@pytest.mark.slow  # the four tracked runs
def test_a_real_mlflow_server_serves_the_runs_metrics_and_the_comparison_page(tracked, by_model, local_server,
                                                                              free_port):
    """`mlflow server` on localhost over the store: what users open in the UI is really served."""
    import os
    import sys
    import urllib.request

    tmp, port = tracked["tmp"], free_port()
    base = f"http://127.0.0.1:{port}"

    def get(path, data=None):
        request = urllib.request.Request(base + path, data=json.dumps(data).encode() if data else None,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with local_server(cmd, base + "/health", cwd=tmp, env={**os.environ, "MLFLOW_TRACKING_URI": ""}):
        experiment = json.loads(get("/api/2.0/mlflow/experiments/get-by-name?experiment_name=cmp"))["experiment"]
        found = json.loads(get("/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                                               "max_results": 100}))["runs"]
        ids = {r["info"]["run_id"] for r in found}
        assert set(tracked["runs"].values()) <= ids
        run_id = tracked["runs"][("cnn", 1)]
        history = json.loads(get(f"/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=val_accuracy"))
        assert [m["step"] for m in history["metrics"]] == [1, 2]
        listed = json.loads(get(f"/api/2.0/mlflow/artifacts/list?run_id={run_id}"))
        assert "confusion_matrix.png" in {f["path"] for f in listed["files"]}
        png = get(f"/get-artifact?path=confusion_matrix.png&run_uuid={run_id}")
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        comparison = next(r for r in found if {("fer_exp.role", "comparison"), ("group_by", "model")}
                          <= {(t["key"], t["value"]) for t in r["data"].get("tags", [])})  # (others compare --runs)
        page = get(f"/get-artifact?path=report.html&run_uuid={comparison['info']['run_id']}").decode()
        assert "fer-exp comparison by model" in page and page.count("data:image/png;base64,") == 3
        assert b"<html" in get("/").lower()  # the UI itself


@pytest.mark.slow  # the four tracked runs
def test_mlflow_run_compare_entry_point_logs_into_its_own_run(tracked):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    tmp = tracked["tmp"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "FER_EXP_CACHE_DIR": str(tmp / "cache"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "mlflow", "run", str(repo), "-e", "compare", "-P", "experiment=cmp",
           "-P", f"output={tmp / 'via-mlflow'}", "--env-manager", "local", "--experiment-name", "cmp"]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "skipped 1 run(s) that did not finish: killed run (KILLED)" in proc.stdout  # not its own RUNNING run
    client = tracked["client"]
    experiment = client.get_experiment_by_name("cmp").experiment_id
    launched = [r for r in client.search_runs([experiment], "tags.fer_exp.role = 'comparison'")
                if r.data.params.get("experiment") == "cmp"]  # the -P values MLflow logged on its run
    assert len(launched) == 1 and launched[0].info.status == "FINISHED"
    assert "report.html" in {a.path for a in client.list_artifacts(launched[0].info.run_id)}


def test_a_class_some_runs_have_no_test_faces_of_averages_over_the_runs_that_do():
    """A group whose runs were tested on different faces (a note says so), one with no Disgust face: its
    Disgust cell is the other run's score, not n/a, and a class no run has faces of reads n/a."""
    from fer_exp.compare import RunInfo, cell, group_table, summarise

    assert summarise([math.nan, 0.5])["mean"] == 0.5 and summarise([math.nan, 0.5])["n"] == 1
    assert math.isnan(summarise([math.nan])["mean"])
    metrics = [{**dict.fromkeys(PER_CLASS, 0.5), "test_acc_disgust": d, "test_acc_fear": math.nan} for d in (math.nan, 0.25)]
    runs = [RunInfo(f"{i}" * 32, f"run {i}", "cnn", "1", m, {"config.seed": str(i)}, {}) for i, m in enumerate(metrics)]
    row = group_table(runs, PER_CLASS).iloc[0]
    assert cell(row, "Disgust") == "25.00 (1 of 2 runs)" and cell(row, "Fear") == "n/a"
    assert cell(row, "Happy") == "50.00 ± 0.00 [50.0, 50.0]"


def test_val_chooses_the_group_and_the_model_with_the_best_val_score_as_the_model_predicts():
    """The score of a run's model on val: with the TTA it predicts with where the run measured it (tta: auto),
    else best_val; evaluations choose nothing; a loss is best low; runs selecting on other metrics: no choice."""
    from fer_exp.compare import RunInfo, chosen_on_val, val_score

    def run(name, group, best_val, select="val_accuracy", tta=None, **metrics):
        tags = {"select_metric": select, **({"test_tta": tta} if tta else {})}
        return RunInfo(name * 32, name, group, "1", {"best_val": best_val, **metrics}, {"config.seed": name}, tags)

    plain = run("a", "recipe", 0.64)
    auto = run("b", "best", 0.63, tta="flip", val_accuracy_tta_flip=0.66, val_accuracy_tta_none=0.63)
    other = run("c", "best", 0.60, tta="none", val_accuracy_tta_none=0.60)
    evaluation = RunInfo("d" * 32, "ensemble", "cnn+cnn", "1", {"test_accuracy": 0.9}, {}, {"fer_exp.role": "evaluation"})
    assert (val_score(plain), val_score(auto), val_score(other), val_score(evaluation)) == (0.64, 0.66, 0.60, None)
    choice, notes = chosen_on_val([plain, auto, other, evaluation])
    # the best model is in the group whose mean is lower (0.63 against 0.64): both are said
    assert notes == [] and choice.run.run_id == "b" * 32 and choice.group == "recipe"
    assert choice.table.set_index("group").loc["best", "Val"] == pytest.approx(0.63) and choice.tied == 0
    choice, _ = chosen_on_val([run("a", "x", 0.9, "val_loss"), run("b", "y", 0.7, "val_loss")])
    assert choice.run.run_id == "b" * 32 and choice.group == "y" and choice.lower_is_better
    choice, _ = chosen_on_val([run("a", "x", 0.5), run("b", "y", 0.5)])
    assert choice.run.run_id == "a" * 32 and choice.tied == 1  # the first in the tables' order, said tied
    choice, notes = chosen_on_val([run("a", "x", 0.5), run("b", "y", 0.7, "val_loss")])
    assert choice is None and "select on different val metrics (val_accuracy, val_loss)" in notes[0]
    assert chosen_on_val([evaluation]) == (None, [])


@pytest.mark.slow  # the four tracked runs
def test_the_comparison_says_which_model_val_chooses(tracked, by_model):
    output, folder = by_model
    client = tracked["client"]
    best_val = {run_id: client.get_run(run_id).data.metrics["best_val"] for run_id in tracked["runs"].values()}
    chosen = max(best_val, key=lambda run_id: (best_val[run_id], -list(best_val).index(run_id)))
    runs = pd.read_csv(folder / "runs.csv").set_index("run_id")
    assert runs["val_score"].to_dict() == pytest.approx(best_val)  # tta none: the selected epoch's val
    assert "## Chosen on val (val_accuracy at each run's selected epoch" in output
    assert f"| cnn | 2 | {100 * np.mean([best_val[tracked['runs'][('cnn', s)]] for s in (1, 2)]):.2f} ± " in output
    assert f"fer-exp predict --model runs:/{chosen}/model IMAGES" in output or "tied with" in output
    experiment = client.get_experiment_by_name("cmp").experiment_id
    comparison = client.search_runs([experiment], "tags.fer_exp.role = 'comparison' and tags.group_by = 'model'")[0]
    assert best_val[comparison.data.tags["chosen_on_val"]] == max(best_val.values())
    assert "Chosen on val" in (folder / "report.html").read_text()


@pytest.mark.slow  # trains and logs a model
def test_compare_registers_the_model_val_chooses_once_and_predict_loads_it(store):
    from fer_exp.experiment import run_experiment
    from fer_exp.inference import load_model

    ids = []
    for lr in (1e-3, 3e-3):
        cfg = load_config(overrides={**TINY, "epochs": 1, "lr": lr, "output_dir": str(store / "out")})
        ids.append(run_experiment(cfg, progress=False).run_id)
    bad = CliRunner().invoke(main, ["compare", "--experiment", "cmp", "--register", "a/b"])
    assert bad.exit_code == 2 and "not a valid registered model name" in bad.output
    assert not (store / "reports").exists()  # refused before anything is compared or written
    client = mlflow.MlflowClient()
    best_val = {run_id: client.get_run(run_id).data.metrics["best_val"] for run_id in ids}
    for attempt in (1, 2):
        result = CliRunner().invoke(main, ["compare", "--experiment", "cmp", "--group-by", "lr", "--register", "fer-best",
                                           "--output", str(store / f"report{attempt}")])
        assert result.exit_code == 0, result.output + repr(result.exception)
        assert "is fer-best version 1" in result.output and ("(registered before)" in result.output) == (attempt == 2)
    versions = client.search_model_versions("name = 'fer-best'")
    assert len(versions) == 1  # comparing again registers nothing twice
    chosen = client.get_model_version_by_alias("fer-best", "best").run_id
    assert best_val[chosen] == max(best_val.values())
    assert load_model("models:/fer-best@best", device="cpu").run_id == chosen
    comparison = client.search_runs([client.get_experiment_by_name("cmp").experiment_id],
                                    "tags.fer_exp.role = 'comparison'", order_by=["attributes.start_time DESC"])[0]
    assert comparison.data.tags["registered_model"] == "fer-best/1" and comparison.data.tags["chosen_on_val"] == chosen
    # a name with a quote (which MLflow's registry takes)
    quoted = CliRunner().invoke(main, ["compare", "--experiment", "cmp", "--group-by", "lr", "--register", "fer's best",
                                       "--output", str(store / "report3")])
    assert quoted.exit_code == 0 and "is fer's best version 1" in quoted.output, quoted.output
    assert "as this command registers it, `--model models:/fer's best@best`" in quoted.output


@pytest.mark.slow  # the four tracked runs
def test_register_refuses_a_chosen_run_with_no_logged_model_before_writing(tracked):
    folder = tracked["tmp"] / "never"
    result = invoke(tracked, "--register", "fer-best", "--output", str(folder))
    assert result.exit_code == 2 and "which val chooses, logged no model to register" in result.output
    assert "checkpoints/best.pt" in result.output and not folder.exists()
    assert tracked["client"].search_registered_models("name = 'fer-best'") == []


@pytest.mark.slow  # the four tracked runs
def test_runs_with_a_filter_and_a_deleted_experiment_are_refused_saying_why(tracked):
    run = tracked["runs"][("cnn", 1)]
    both = invoke(tracked, "--runs", run, "--filter", "tags.model = 'resnet18'", "--no-log")
    assert both.exit_code == 2 and "give one or the other" in both.output, both.output
    client = tracked["client"]
    gone = client.create_experiment("gone-cmp")
    client.delete_experiment(gone)
    result = CliRunner().invoke(main, ["compare", "--experiment", "gone-cmp", "--no-log"])
    assert result.exit_code == 2 and "experiment gone-cmp is deleted" in result.output, result.output
    assert f"mlflow experiments restore --experiment-id {gone}" in result.output
