"""Bad input, systematically (hypothesis): malformed CSVs, broken image folders, wrong config files
and out-of-range options. Whatever comes in, the outcome is a result or the project's own clear
error (exit 2, a short message, no traceback), and no run is left behind in the tracking store."""

from __future__ import annotations

import io
import json
import os
import re
import string
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fer_exp.classes import CLASS_NAMES
from fer_exp.cli import main
from fer_exp.config import FIELDS, Config, ConfigError, load_config
from fer_exp.data import DataError, FerData, load_data

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

values = st.one_of(st.none(), st.booleans(), st.integers(-10**9, 10**9), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(string.printable, max_size=12), st.lists(st.integers(-5, 300), max_size=3),
                   st.sampled_from(["cnn", "resnet18", "auto", "cpu", "cuda:7", "none", "imagenet", "0", "-1", "1e-3",
                                    "val_loss", "plateau", "bf16", "synthetic:8,4,4", "true"]))
keys = st.one_of(st.sampled_from(sorted(FIELDS)), st.text(string.ascii_lowercase + "_", min_size=1, max_size=10))


def short_error(output: str) -> bool:
    lines = [line for line in output.strip().splitlines() if line.startswith("Error:")]
    return bool(lines) and "Traceback" not in output and len(output) < 4000


@SETTINGS
@given(st.dictionaries(keys, values, max_size=6))
def test_any_config_file_loads_or_is_a_configerror(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "exp.yaml"
        path.write_text(yaml.safe_dump(content))
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            assert str(exc) and "\n" not in str(exc).strip()
        else:
            assert isinstance(cfg, Config)
            assert cfg.epochs > 0 and cfg.lr > 0 and 0 <= cfg.dropout <= 1  # what got through is in range


@SETTINGS
@given(st.dictionaries(st.sampled_from(sorted(FIELDS)), values.map(str), min_size=1, max_size=4))
def test_any_train_options_exit_2_with_a_message_and_leave_no_run(store, options):
    """--data points nowhere, so every otherwise valid config stops there too: nothing ever trains."""
    args = [a for name, value in options.items() if name != "data" for a in (f"--{name.replace('_', '-')}", value)]
    result = CliRunner().invoke(main, ["train", *args, "--data", str(store / "nowhere")])
    assert result.exit_code == 2, result.output
    assert short_error(result.output), result.output
    assert not (store / "mlflow.db").exists() or not _runs(store)


@pytest.mark.parametrize("args, noted", [
    (["--model", "resnet18"], True),  # the defaults: random weights, the CNN's lr
    (["--model", "resnet18", "--pretrained", "imagenet"], False),  # chosen
    (["--config", "experiments/resnet18.yaml", "--pretrained", "none"], False),
    (["--model", "cnn"], False),
])
def test_resnet18_without_a_config_says_it_is_not_the_readme_s_pretrained_recipe(store, args, noted):
    config = [str(Path(__file__).resolve().parents[1] / a) if a.startswith("experiments/") else a for a in args]
    result = CliRunner().invoke(main, ["train", *config, "--data", str(store / "nowhere")])
    assert result.exit_code == 2 and ("--config experiments/resnet18.yaml" in result.output) == noted, result.output


def test_a_resnet18_frozen_at_random_is_said(store):
    """--pretrained none with resnet18.yaml (freeze_depth 1): the README's offline advice trains with a
    randomly initialised stem frozen; the run says so (once), and trains."""
    from fer_exp import experiment

    experiment._said.discard(("frozen at random", 1))
    result = CliRunner().invoke(main, ["train", "--config", str(Path(__file__).resolve().parents[1] / "experiments" / "resnet18.yaml"),
                                       "--pretrained", "none", "--data", "synthetic:16,8,8", "--epochs", "1",
                                       "--batch-size", "8", "--eval-batch-size", "8", "--system-metrics", "false"])
    assert result.exit_code == 0, result.output
    assert "note: freeze_depth 1 with pretrained none freezes randomly initialised layers" in result.output


def _runs(store: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


csv_cell = st.one_of(st.text(string.printable.replace("\n", "").replace("\r", ""), max_size=20),
                     st.integers(-3, 9).map(str),
                     st.lists(st.integers(-20, 300), min_size=0, max_size=2400).map(lambda xs: " ".join(map(str, xs))))
usage = st.sampled_from(["Training", "PublicTest", "PrivateTest", "training", "Test", ""])
rows = st.lists(st.tuples(csv_cell, csv_cell, st.one_of(usage, csv_cell)), max_size=12)
header = st.sampled_from(["emotion,pixels,Usage", "emotion,pixels", "pixels,emotion,Usage", "label,image,split", ""])


@SETTINGS
@given(header, rows, st.booleans())
def test_any_csv_loads_or_is_a_dataerror_and_inspect_exits_0_or_2(head, body, with_good_rows):
    lines = [head] + [",".join(f'"{c}"' if "," in c else c for c in row) for row in body]
    if with_good_rows:  # a valid file with some bad rows mixed in
        pixels = " ".join(["128"] * 2304)
        lines += [f"{k % 7},{pixels},{u}" for k, u in enumerate(["Training"] * 14 + ["PublicTest", "PrivateTest"] * 7)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fer2013.csv"
        path.write_text("\n".join(lines) + "\n")
        for on_bad in ("error", "skip"):
            try:
                data = load_data(str(path), on_bad=on_bad, use_cache=False)
            except DataError as exc:
                assert str(exc)
            else:
                assert isinstance(data, FerData) and len(data.train) > 0
        result = CliRunner().invoke(main, ["data", "inspect", str(path), "--no-cache"])
        assert result.exit_code in (0, 2), result.output
        assert result.exit_code == 0 or short_error(result.output), result.output


def _png(seed: int, size: int, mode: str) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3 if mode == "RGB" else 1), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze() if mode == "L" else pixels, mode).save(buffer, format="PNG")
    return buffer.getvalue()


file_content = st.one_of(st.binary(max_size=64), st.just(b""),
                         st.builds(_png, st.integers(0, 99), st.sampled_from([8, 48, 60]), st.sampled_from(["L", "RGB"])),
                         st.builds(lambda b: _png(0, 48, "L")[: max(1, len(_png(0, 48, "L")) // b)], st.integers(2, 9)))
tree = st.dictionaries(
    st.tuples(st.sampled_from(["train", "test", "val", "Train", "other"]),
              st.sampled_from([*CLASS_NAMES, "Happy", "unknown", ""]),
              st.sampled_from(["a.png", "b.jpg", "PublicTest_1.png", "PrivateTest_2.png", ".DS_Store", "c.txt"])),
    file_content, max_size=20)


@SETTINGS
@given(tree)
def test_any_image_folder_loads_or_is_a_dataerror(files):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "faces"
        root.mkdir()
        for (split, label, name), content in files.items():
            folder = root / split / label if label else root / split
            folder.mkdir(parents=True, exist_ok=True)
            if (folder / name).exists() or folder.is_file():
                continue
            (folder / name).write_bytes(content)
        for on_bad in ("error", "skip"):
            try:
                data = load_data(str(root), on_bad=on_bad, use_cache=False)
            except DataError as exc:
                assert str(exc)
            else:
                assert all(split.images.shape[1:] == (48, 48) for split in data.splits().values())


@pytest.mark.parametrize("data", ["synthetic:0,1,1", "synthetic:a,b,c", "synthetic:5", "/dev/null", "."])
def test_odd_data_sources_exit_2(store, data):
    result = CliRunner().invoke(main, ["train", "--data", data, "--epochs", "1"])
    assert result.exit_code == 2 and short_error(result.output), result.output


space_entry = st.one_of(values, st.dictionaries(st.sampled_from(["type", "low", "high", "log", "step", "choices", "x"]),
                                                st.one_of(values, st.sampled_from(["float", "int", "categorical"]),
                                                          st.lists(values, max_size=3)), max_size=5))


@SETTINGS
@given(st.dictionaries(keys, space_entry, max_size=4), st.dictionaries(st.text(string.ascii_lowercase + "_", max_size=12),
                                                                       values, max_size=3))
def test_any_study_file_plans_or_is_a_configerror(space, study_block):
    from fer_exp.tune import plan_study

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tune.yaml"
        path.write_text(yaml.safe_dump({"model": "cnn", "data": "synthetic:8,4,4", "study": study_block,
                                        "search_space": space}))
        try:
            plan = plan_study(path)
        except ConfigError as exc:
            assert str(exc)
        else:
            assert plan.space and all(p.name in FIELDS for p in plan.space)


def test_study_import_refuses_what_is_not_an_export_of_this_data(store):
    """fer-exp study --import takes finished-run exports of the same data only: junk, a training
    checkpoint, another data set or a missing path is a short error (exit 2), and nothing is tracked."""
    from fer_exp.config import build_config
    from fer_exp.train import Trainer

    cfg = build_config({"data": "synthetic:32,8,8", "epochs": 1, "batch_size": 8, "eval_batch_size": 8, "amp": "off"})
    trainer = Trainer(cfg, load_data(cfg.data, seed=cfg.seed), checkpoint_dir=store / "ckpt", progress=False)
    trainer.export(trainer.fit(), store / "runs" / "good.pt")
    (store / "junk").mkdir()
    (store / "junk" / "x.pt").write_bytes(b"not a torch file")
    study_file = store / "study.yaml"
    study_file.write_text(f"seeds: [42]\narms:\n  recipe: {{config: {Path(__file__).parents[1] / 'experiments' / 'cnn.yaml'}}}\n")

    def study(source, data="synthetic:32,8,8"):
        return CliRunner().invoke(main, ["study", str(study_file), "--data", data, "--epochs", "1", "--batch-size", "8",
                                         "--amp", "off", "--import", str(source)])

    for source, message in [(store / "junk", "cannot be read as a fer-exp run export"),
                            (store / "ckpt" / "last.pt", "It is a training checkpoint"),
                            (store / "nowhere", "no such file or folder"),
                            (store / "ckpt", "It is a training checkpoint")]:  # last.pt and best.pt
        result = study(source)
        assert result.exit_code == 2 and short_error(result.output) and message in result.output, result.output
    result = study(store / "runs", data="synthetic:40,8,8")
    assert result.exit_code == 2 and short_error(result.output), result.output
    assert "good.pt was trained on other data than synthetic:40,8,8: its train" in result.output.replace("\n", "")
    assert not _runs(store)
    assert not (store / "reports").exists()  # the report folder made for the comparison that never came
    # the same faces decoded to other pixels where it trained (another libjpeg): imported, and said so
    import torch

    export = torch.load(store / "runs" / "good.pt", weights_only=True)
    export["data"]["pixels"]["test"] = "0" * 12
    (store / "decoded").mkdir()
    torch.save(export, store / "decoded" / "good.pt")
    result = study(store / "decoded")
    assert result.exit_code == 0 and "decoded to other pixels" in result.output, result.output
    [run] = [r for r in _runs(store) if r.data.tags.get("arm") == "recipe"]
    assert run.data.tags["same_pixels_where_trained"] == "False" and len(_runs(store)) == 2  # and the comparison
    assert "made already" in study(store / "runs").output


# ================================================================== stores, folders and files that cannot serve


@pytest.mark.parametrize("case", ["not a database", "under a file", "in memory", "a folder", "a database server down"])
@pytest.mark.parametrize("command", ["train", "resume", "compare", "tune", "study"])
def test_a_tracking_store_that_cannot_keep_runs_is_refused_before_anything_runs(store, monkeypatch, case, command,
                                                                                free_port):
    (store / "notes.txt").write_text("hello, not sqlite")
    (store / "folder.db").mkdir()
    uri = {"not a database": f"sqlite:///{store / 'notes.txt'}", "under a file": f"sqlite:///{store / 'notes.txt' / 'x.db'}",
           "in memory": "sqlite://", "a folder": f"sqlite:///{store / 'folder.db'}",
           # (SQLAlchemy under MLflow retried for two minutes, then printed a traceback)
           "a database server down": f"postgresql://fer:secret@127.0.0.1:{free_port()}/mlflow"}[case]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    experiments = Path(__file__).parents[1] / "experiments"
    args = {"train": ["train", "--data", "synthetic:32,8,8", "--epochs", "1"],
            "resume": ["train", "--resume", "0123456789abcdef"],
            "compare": ["compare", "--experiment", "fer2013"],
            "tune": ["tune", "--model", "cnn", "--data", "synthetic:32,8,8", "--n-trials", "1"],
            "study": ["study", str(experiments / "reference.yaml"), "--data", "synthetic:32,8,8", "--seeds", "42"]}[command]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and short_error(result.output), result.output
    message = {"not a database": "is not an SQLite database", "under a file": "is a file, not a folder",
               "in memory": "is in memory", "a folder": "names a folder", "a database server down": "does not answer"}[case]
    assert message in result.output and "MLFLOW_TRACKING_URI" in result.output, result.output
    assert (store / "notes.txt").read_text() == "hello, not sqlite" and not list(store.glob("outputs/*"))


def test_an_optuna_storage_that_cannot_be_made_is_refused(store, free_port):
    (store / "notes.txt").write_text("x")
    result = CliRunner().invoke(main, ["tune", "--model", "cnn", "--data", "synthetic:32,8,8", "--n-trials", "1",
                                       "--storage", f"sqlite:///{store / 'notes.txt' / 'optuna.db'}"])
    assert result.exit_code == 2 and short_error(result.output), result.output
    assert "the Optuna storage" in result.output and "is a file, not a folder" in result.output
    down = CliRunner().invoke(main, ["tune", "--model", "cnn", "--data", "synthetic:32,8,8", "--n-trials", "1",
                                     "--storage", f"postgresql://fer:secret@127.0.0.1:{free_port()}/optuna"])
    assert down.exit_code == 2 and short_error(down.output), down.output
    assert "the Optuna storage postgresql://fer:***@127.0.0.1" in down.output and "does not answer" in down.output
    assert "secret" not in down.output


def test_a_comparison_folder_that_cannot_be_written_or_an_unknown_group_is_refused(store):
    (store / "afile").write_text("x")
    experiments = Path(__file__).parents[1] / "experiments"
    study = CliRunner().invoke(main, ["study", str(experiments / "reference.yaml"), "--data", "synthetic:32,8,8",
                                      "--seeds", "42", "--output", str(store / "afile" / "report")])
    assert study.exit_code == 2 and short_error(study.output), study.output
    assert "output" in study.output and "cannot be written there" in study.output and not _runs(store)  # nothing trained
    trained = CliRunner().invoke(main, ["train", "--data", "synthetic:32,8,8", "--epochs", "1", "--batch-size", "16",
                                        "--system-metrics", "false"])
    assert trained.exit_code == 0, trained.output
    unwritable = CliRunner().invoke(main, ["compare", "--output", str(store / "afile" / "report")])
    assert unwritable.exit_code == 2 and short_error(unwritable.output) and "cannot be written" in unwritable.output
    typo = CliRunner().invoke(main, ["compare", "--group-by", "class-weights", "--no-log"])
    assert typo.exit_code == 2 and short_error(typo.output), typo.output
    assert "no compared run has 'class-weights'" in typo.output


def test_evaluating_into_a_deleted_experiment_is_refused_before_predicting(store, monkeypatch):
    import mlflow

    trained = CliRunner().invoke(main, ["train", "--data", "synthetic:32,8,8", "--epochs", "1", "--batch-size", "16",
                                        "--system-metrics", "false"])
    assert trained.exit_code == 0, trained.output
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    client.delete_experiment(client.create_experiment("gone"))
    run = _runs(store)[0]
    result = CliRunner().invoke(main, ["evaluate", "--model", f"runs:/{run.info.run_id}/model", "--experiment-name", "gone"])
    assert result.exit_code == 2 and short_error(result.output), result.output
    assert "experiment 'gone'" in result.output and "--experiment-name" in result.output
    assert "images/s" not in result.output and len(_runs(store)) == 1  # nothing predicted, no run made


@pytest.mark.parametrize("content", [b"just some notes\n", b"", b"\xff\xd8\xff\xe0 a jpeg header", b"emotion,pixels\n0,1 2\n"])
def test_a_file_that_is_no_checkpoint_is_refused_as_a_model(tmp_path, content):
    from fer_exp.inference import ModelLoadError, load_model

    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=r"model\.pt: not a PyTorch checkpoint \(a file of another kind: .*\); give the best\.pt"):
        load_model(str(path), "cpu")  # (not torch's words about weights_only, which point at another cause)


def test_a_checkpoint_cut_short_is_said_to_be_damaged(tmp_path):
    import torch

    from fer_exp.inference import ModelLoadError, load_model
    from fer_exp.models import build_model

    path = tmp_path / "best.pt"
    torch.save({"model": build_model("cnn").state_dict(), "config": Config().to_dict()}, path)
    path.write_bytes(path.read_bytes()[:100_000])  # a full disk, a copy stopped half-way
    with pytest.raises(ModelLoadError, match=r"best\.pt: not a PyTorch checkpoint \(damaged or cut short"):
        load_model(str(path), "cpu")


def test_mlflow_uris_of_a_whole_run_or_no_version_name_the_form_meant(store):
    from fer_exp.inference import ModelLoadError, load_model

    import mlflow

    mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).create_registered_model("fer-cnn")  # a store; no version yet
    run_id = "0123456789abcdef0123456789abcdef"
    for uri, said in ((f"runs:/{run_id}/", f"names a whole run, not its model; give runs:/{run_id}/model"),
                      (f"runs:/{run_id}", f"give runs:/{run_id}/model"),
                      ("models:/fer-cnn", "names no version of the registered model fer-cnn; give models:/fer-cnn/<version> "
                                          "or models:/fer-cnn@<alias>")):
        with pytest.raises(ModelLoadError, match=re.escape(said)):
            load_model(uri, "cpu")


def test_a_web_address_as_a_model_says_to_download_it():
    from fer_exp.inference import ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match="a web address; download the file first"):
        load_model("https://example.org/best.pt", "cpu")


def test_a_checkpoint_config_naming_an_unknown_model_is_refused(tmp_path):
    import torch

    from fer_exp.inference import ModelLoadError, load_model
    from fer_exp.models import build_model

    path = tmp_path / "best.pt"
    torch.save({"model": build_model("cnn").state_dict(), "config": {**Config().to_dict(), "model": "vgg"}}, path)
    with pytest.raises(ModelLoadError, match=r"best\.pt: its config names a model fer-exp cannot build"):
        load_model(str(path), "cpu")


def test_register_names_the_registry_refuses_and_odd_config_files_are_config_errors(tmp_path):
    for name in ("bad/name", "bad:name", ".", "..x", "a/../b", "   "):
        with pytest.raises(ConfigError, match="not a valid registered model name"):
            load_config(overrides={"register": name})
    for name in ("fer-cnn_v2.1", "a..b", "my model"):  # what MLflow's registry accepts passes
        assert load_config(overrides={"register": name}).register == name
    path = tmp_path / "exp.yaml"
    path.write_bytes("epochs: 3\n".encode("utf-16"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path)
    path.write_text("epochs: 3\nlr: 0.01\nepochs: 30\n")
    with pytest.raises(ConfigError, match="the key 'epochs' is given twice"):
        load_config(path)
    # anchors and merge keys are YAML, not duplicates: a merged key the mapping overrides is fine
    study = tmp_path / "study.yaml"
    study.write_text("arms:\n  a: {set: &common {epochs: 1, batch_size: 16}}\n"
                     "  b: {set: {<<: *common, epochs: 2, class_weights: none}}\n")
    from fer_exp.study import read_study

    runs = {run.arm: run.config for run in read_study(study).runs}
    assert (runs["a"].epochs, runs["b"].epochs, runs["b"].batch_size, runs["b"].class_weights) == (1, 2, 16, "none")
    path.write_text("run_name: {a: 1}\n")
    with pytest.raises(ConfigError, match="run_name must be str"):
        load_config(path)


def test_a_val_fraction_that_leaves_a_side_empty_is_a_dataerror(tmp_path):
    for split in ("train", "test"):
        for i, name in enumerate(CLASS_NAMES):
            (tmp_path / split / name).mkdir(parents=True)
            for j in range(3):
                Image.new("L", (48, 48), 10 * i + j).save(tmp_path / split / name / f"{j}.png")
    for fraction in (0.999, 0.99):  # 21 train images: all 21 held out (scikit-learn rounds up)
        with pytest.raises(DataError, match="choose --val-fraction between"):
            load_data(str(tmp_path), val_fraction=fraction, use_cache=False)
    assert len(load_data(str(tmp_path), val_fraction=0.3, use_cache=False).val) == 7


def test_a_checkpoint_that_cannot_be_written_fails_the_run_cleanly_and_keeps_the_last_good_epoch(store, monkeypatch):
    import torch

    real_save, saves = torch.save, []

    def save(obj, f, *args, **kwargs):  # the second checkpoint meets a full disk half-way, as torch.save reports it
        saves.append(f)
        if len(saves) == 2:
            Path(f).write_bytes(b"half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3456 vs 1234")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    result = CliRunner().invoke(main, ["train", "--data", "synthetic:32,8,8", "--epochs", "3", "--batch-size", "16",
                                       "--system-metrics", "false"])
    assert result.exit_code == 1 and short_error(result.output), result.output
    assert "epoch 2: " in result.output and "last.pt could not be written (" in result.output
    assert "the checkpoints of epoch 1 are kept (resume once the folder can be written) (run marked FAILED)" in result.output
    run = _runs(store)[0]
    assert run.info.status == "FAILED" and "could not be written" in run.data.tags["stop_reason"]
    folder = Path(run.data.tags["checkpoint_dir"])
    assert not list(folder.glob("*.partial"))
    assert torch.load(folder / "last.pt", weights_only=True)["epoch"] == 1


def test_a_dataset_registered_by_another_process_at_the_same_moment_is_linked_not_fatal(store, monkeypatch):
    """Two tuning workers' first runs on a new experiment log the same dataset at once: MLflow's store
    looks it up, then inserts, and the loser's insert hit the unique key (a trial FAILED in CI). The
    input is logged again, found and linked; anything else still fails."""
    import mlflow
    import sqlalchemy.exc

    real_log_input, calls = mlflow.log_input, []

    def raced_once(dataset, **kwargs):
        calls.append(dataset.name)
        if len(calls) == 1:
            raise sqlalchemy.exc.IntegrityError("INSERT INTO datasets ...", {}, Exception(
                "UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest"))
        return real_log_input(dataset, **kwargs)
    monkeypatch.setattr(mlflow, "log_input", raced_once)
    result = CliRunner().invoke(main, ["train", "--data", "synthetic:32,8,8", "--epochs", "1", "--batch-size", "16",
                                       "--system-metrics", "false"])
    assert result.exit_code == 0, result.output
    [run] = _runs(store)
    assert calls[:2] == ["fer2013-train", "fer2013-train"]
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"fer2013-train", "fer2013-val", "fer2013-test"}
    from fer_exp.tracking import log_input_retrying

    def full(dataset, **kwargs):
        raise sqlalchemy.exc.OperationalError("INSERT", {}, Exception("database or disk is full"))
    monkeypatch.setattr(mlflow, "log_input", full)
    with pytest.raises(sqlalchemy.exc.OperationalError):  # not a race: not retried
        log_input_retrying(object(), context="training")


def test_a_store_that_fills_up_mid_run_ends_the_run_with_a_resume_hint(store, monkeypatch):
    """The tracking store's disk fills after epoch 1 (sqlite: "database or disk is full"): the command
    ends with one clear message naming the kept checkpoints and the resume command, not a traceback;
    once the store takes writes again, the resume finishes the run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    real_log_metrics, calls = mlflow.log_metrics, []

    def log_metrics(metrics, *args, **kwargs):
        calls.append(kwargs.get("step"))
        if kwargs.get("step") == 2:
            raise MlflowException("(sqlite3.OperationalError) database or disk is full\n[SQL: INSERT INTO metrics ...]")
        return real_log_metrics(metrics, *args, **kwargs)
    monkeypatch.setattr(mlflow, "log_metrics", log_metrics)
    result = CliRunner().invoke(main, ["train", "--data", "synthetic:32,8,8", "--epochs", "3", "--batch-size", "16",
                                       "--system-metrics", "false"])
    assert result.exit_code == 1 and short_error(result.output) and "Traceback" not in result.output, result.output
    [run] = _runs(store)
    assert (f"run {run.info.run_id} could not be tracked after 2 complete epoch(s): (sqlite3.OperationalError) "
            "database or disk is full; its checkpoints are in") in result.output
    assert f"resume it with: fer-exp train --resume {run.info.run_id} (run marked FAILED)" in result.output
    assert run.info.status == "FAILED" and run.data.tags["stop_reason"].startswith("tracking failed: ")
    monkeypatch.setattr(mlflow, "log_metrics", real_log_metrics)
    # its output folder moved meanwhile: the resume says where it looked and how to point it there
    (store / "outputs").rename(store / "moved")
    lost = CliRunner().invoke(main, ["train", "--resume", run.info.run_id])
    assert lost.exit_code == 2 and f"run {run.info.run_id} logged 1 epoch(s) but its last.pt is not in" in lost.output
    assert "pass the folder that now holds" in lost.output and "start a new run" in lost.output, lost.output
    client = mlflow.MlflowClient()
    client.delete_run(run.info.run_id)  # (MLflow refused it at start_run, with a traceback, after the data loaded)
    deleted = CliRunner().invoke(main, ["train", "--resume", run.info.run_id, "--output-dir", str(store / "moved")])
    assert deleted.exit_code == 2 and f"mlflow runs restore --run-id {run.info.run_id}" in deleted.output, deleted.output
    client.restore_run(run.info.run_id)
    resumed = CliRunner().invoke(main, ["train", "--resume", run.info.run_id, "--output-dir", str(store / "moved")])
    assert resumed.exit_code == 0, resumed.output
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2, 3]


def test_a_run_whose_model_upload_failed_resumes_to_one_test_one_model_and_its_whole_time(store, monkeypatch):
    """The store failed while the model uploaded (after training and test were logged): the resume tested
    and logged everything again, a second test_accuracy, fit_seconds of the ~0 s resume over the first,
    and the failed upload's model stood beside the new one."""
    import mlflow
    from mlflow.entities import LoggedModelStatus

    real_upload = mlflow.MlflowClient.log_model_artifacts

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(mlflow.MlflowClient, "log_model_artifacts", disk_full)
    first = CliRunner().invoke(main, ["train", "--data", "synthetic:32,8,8", "--epochs", "2", "--batch-size", "16",
                                      "--system-metrics", "false", "--register", "fer-once"])
    assert first.exit_code == 1 and "resume it with" in first.output, first.output
    monkeypatch.setattr(mlflow.MlflowClient, "log_model_artifacts", real_upload)
    [run] = _runs(store)
    client = mlflow.MlflowClient()
    assert run.info.status == "FAILED" and "test_accuracy" in run.data.metrics
    seconds = run.data.metrics["fit_seconds"]
    resumed = CliRunner().invoke(main, ["train", "--resume", run.info.run_id])
    assert resumed.exit_code == 0, resumed.output
    for metric in ("test_accuracy", "fit_seconds", "best_epoch", "best_val"):
        assert len(client.get_metric_history(run.info.run_id, metric)) == 1, metric
    assert client.get_run(run.info.run_id).data.metrics["fit_seconds"] == seconds
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [m.status for m in models] == [LoggedModelStatus.READY]
    assert [str(v.version) for v in client.search_model_versions("name = 'fer-once'")] == ["1"]
    from fer_exp.inference import load_model

    assert load_model("models:/fer-once/1", "cpu").run_id == run.info.run_id


def train_interrupted_at_epoch_2(monkeypatch, args: list[str]) -> None:
    """`fer-exp train ARGS`, stopped as Ctrl-C stops it once its second epoch is checkpointed (at its metrics)."""
    import mlflow

    real_log_metrics = mlflow.log_metrics

    def interrupted_at_epoch_2(metrics, *a, **kwargs):
        if kwargs.get("step") == 2:
            raise KeyboardInterrupt
        return real_log_metrics(metrics, *a, **kwargs)
    monkeypatch.setattr(mlflow, "log_metrics", interrupted_at_epoch_2)
    first = CliRunner().invoke(main, ["train", *args, "--system-metrics", "false"])
    monkeypatch.setattr(mlflow, "log_metrics", real_log_metrics)
    assert first.exit_code == 130, first.output


def test_a_resume_takes_its_faces_at_another_path_renames_the_run_and_refuses_another_experiment(store, monkeypatch):
    """The data folder moved since the run was interrupted: the resume's hint (--data) was refused as
    another config. And --run-name did nothing, --experiment-name was silently ignored."""
    import mlflow

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 2)):
        for name in CLASS_NAMES:
            (store / "faces" / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(store / "faces" / split / name / f"{i}.png")
    train_interrupted_at_epoch_2(monkeypatch, ["--data", "faces", "--epochs", "3", "--batch-size", "16"])
    [run] = _runs(store)
    assert {json.loads(d.dataset.source)["uri"] for d in run.inputs.dataset_inputs} == {str((store / "faces").resolve())}
    (store / "moved").mkdir()
    (store / "faces").rename(store / "moved" / "faces")
    lost = CliRunner().invoke(main, ["train", "--resume", run.info.run_id])
    assert lost.exit_code == 2 and "trained on faces: if its data moved, resume with --data" in lost.output, lost.output
    typo = CliRunner().invoke(main, ["train", "--resume", run.info.run_id, "--data", "moved/fcaes"])
    assert typo.exit_code == 2 and "moved/fcaes: no such file" in typo.output and "if its data moved" not in typo.output
    elsewhere = CliRunner().invoke(main, ["train", "--resume", run.info.run_id, "--data", "moved/faces",
                                         "--experiment-name", "other"])
    assert elsewhere.exit_code == 2 and "a run cannot move to another experiment" in elsewhere.output, elsewhere.output
    resumed = CliRunner().invoke(main, ["train", "--resume", run.info.run_id, "--data", "moved/faces",
                                        "--run-name", "renamed"])
    assert resumed.exit_code == 0, resumed.output
    done = mlflow.MlflowClient().get_run(run.info.run_id)
    assert done.info.status == "FINISHED" and done.info.run_name == "renamed"
    assert done.data.tags["resume_1_changed"] == "data: faces -> moved/faces"  # (params stay; the name shows itself)
    assert done.data.tags["resume_1_device"] == "cpu" and done.data.tags["resume_1_amp"]
    assert done.data.metrics["best_epoch"] >= 1 and "test_accuracy" in done.data.metrics


def test_a_stop_while_the_data_loads_makes_no_run_and_says_so(store, monkeypatch):
    from fer_exp import experiment, train

    real_load = experiment.load_run_data

    def loaded_then_ctrl_c(cfg):
        data = real_load(cfg)
        train._stop_requested.set()  # as stop_on_signals' handler does
        return data
    monkeypatch.setattr(experiment, "load_run_data", loaded_then_ctrl_c)
    try:
        result = CliRunner().invoke(main, ["train", "--data", "synthetic:32,8,8", "--epochs", "1"])
    finally:
        train._stop_requested.clear()
    assert result.exit_code == 130 and "interrupted before the run started: no run was made" in result.output
    assert _runs(store) == []


def test_a_resume_needs_no_pretrained_weights_and_keeps_a_name_given_in_the_ui(store, monkeypatch):
    """The checkpoint holds the weights: a resume fetched the pretrained ones again (offline, or the file
    gone, it failed). And a plain resume put back the config's run_name over a rename made in the UI."""
    import mlflow
    import torch

    from fer_exp.models import build_model

    weights = store / "r18.pth"
    torch.save(build_model("resnet18", pretrained="none").backbone.state_dict(), weights)
    train_interrupted_at_epoch_2(monkeypatch, ["--model", "resnet18", "--pretrained", str(weights), "--input-size", "112",
                                               "--data", "synthetic:16,8,8", "--epochs", "3", "--batch-size", "8",
                                               "--eval-batch-size", "8", "--run-name", "first"])
    [run] = _runs(store)
    weights.unlink()
    mlflow.MlflowClient().set_tag(run.info.run_id, "mlflow.runName", "renamed-in-the-ui")
    resumed = CliRunner().invoke(main, ["train", "--resume", run.info.run_id])
    assert resumed.exit_code == 0, resumed.output
    done = mlflow.MlflowClient().get_run(run.info.run_id)
    assert done.info.status == "FINISHED" and done.info.run_name == "renamed-in-the-ui"
    assert "resume_1_changed" not in done.data.tags


def test_database_urls_through_a_socket_are_not_probed_over_tcp(free_port):
    from fer_exp.experiment import TrackingError, check_database_answers

    port = free_port()
    for uri in (f"mysql+pymysql://u:p@localhost:{port}/db?unix_socket=/tmp/mysql.sock",
                f"postgresql://u@localhost:{port}/mlflow?host=/var/run/postgresql", "mysql://u:p@localhost/db",
                "postgresql:///mlflow"):
        check_database_answers(uri, timeout=1)  # nothing listens on the port: a TCP probe would refuse them
    with pytest.raises(TrackingError, match="does not answer"):
        check_database_answers(f"postgresql://u@localhost:{port}/mlflow", timeout=1)


def test_a_best_pt_that_cannot_be_made_leaves_last_pt_as_it_was(tmp_path, monkeypatch):
    """last.pt never names a best epoch that best.pt does not hold: both are replaced, or neither."""
    import torch

    from fer_exp.train import CheckpointWriteError, Trainer

    cfg = load_config(overrides={"data": "synthetic:32,8,8", "epochs": 3, "batch_size": 16})
    trainer = Trainer(cfg, load_data(cfg.data, seed=cfg.seed), tmp_path, progress=False)
    trainer.epoch, trainer.best_epoch = 1, 1
    trainer.save("last", also="best")
    trainer.epoch, trainer.best_epoch = 2, 2

    def full(source, target):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("fer_exp.train.link_or_copy", full)
    with pytest.raises(CheckpointWriteError, match=r"best\.pt could not be written \(No space left on device"):
        trainer.save("last", also="best")
    assert [torch.load(tmp_path / f"{n}.pt", weights_only=True)["best_epoch"] for n in ("last", "best")] == [1, 1]
    assert not list(tmp_path.glob("*.partial"))


def test_a_folder_turned_read_only_is_said_so_not_a_traceback(tmp_path, monkeypatch):
    """A file system remounted read-only (after disk errors) refuses the write and even the removal of
    the partial file that was never made: one clear CheckpointWriteError, saying what to do."""
    import errno

    from fer_exp.train import CheckpointWriteError, write_atomically

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(CheckpointWriteError, match=r"last\.pt could not be written \(Read-only file system\); "
                                                   r"make the folder writable again"):
        write_atomically(tmp_path / "last.pt", read_only)


def test_a_train_split_without_a_class_is_warned_about(store):
    for split in ("train", "test"):
        for i, name in enumerate(CLASS_NAMES):
            (store / "faces" / split / name).mkdir(parents=True)
            if split == "train" and name == "fear":
                continue  # an empty class folder: nothing to learn fear from
            for j in range(3):
                Image.new("L", (48, 48), 10 * i + j).save(store / "faces" / split / name / f"{j}.png")
    inspect = CliRunner().invoke(main, ["data", "inspect", str(store / "faces")])
    assert inspect.exit_code == 0, inspect.output
    assert "WARNING: train has no images of fear: a model trained on it never predicts that class" in inspect.output
    assert load_data(str(store / "faces")).summary()["missing_train_classes"] == ["fear"]
    trained = CliRunner().invoke(main, ["train", "--data", str(store / "faces"), "--epochs", "1", "--batch-size", "8",
                                        "--system-metrics", "false"])
    assert trained.exit_code == 0 and "warning: train has no images of fear" in trained.output, trained.output


def test_a_read_only_store_serves_commands_that_only_read(tmp_path, monkeypatch):
    import mlflow

    from fer_exp.experiment import TrackingError, check_tracking_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri=uri).search_experiments()  # makes the database
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: mode != os.W_OK and real_access(path, mode))  # root ignores chmod
    check_tracking_store(uri, write=False)  # compare --no-log, study --dry-run
    with pytest.raises(TrackingError, match="cannot be written; fix the permissions"):
        check_tracking_store(uri)


def test_errors_quote_the_first_line_of_what_went_wrong():
    from mlflow.exceptions import MlflowException

    from fer_exp.errors import first_line

    assert first_line(ValueError("  bad value\n  Traceback detail\n")) == "bad value"
    assert first_line(KeyError()) == "KeyError" and first_line(OSError("")) == "OSError"  # never an empty reason
    assert first_line(MlflowException("experiment 'x' is deleted\nmore")) == "experiment 'x' is deleted"
    assert first_line(RuntimeError("x" * 500), 120) == "x" * 120


def test_a_store_of_an_older_mlflow_schema_is_named_with_the_upgrade_command(store):
    """A store an older MLflow made (its schema behind this MLflow's) stops train, tune and compare with
    MLflow's own advice, the store's URL filled in, not a traceback."""
    import sqlite3

    import mlflow

    uri = f"sqlite:///{store / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri=uri).search_experiments()  # makes the database at this MLflow's schema
    with sqlite3.connect(store / "mlflow.db") as db:
        db.execute("UPDATE alembic_version SET version_num = '0584bdc529eb'")  # as MLflow 2.x left it
    for command in (["train", "--data", "synthetic:64,16,16", "--epochs", "1"], ["compare", "--no-log"],
                    ["tune", "--data", "synthetic:64,16,16", "--n-trials", "1"]):
        # a new process, as a user's command (this one has the store open already, as MLflow caches it)
        result = subprocess.run([sys.executable, "-m", "fer_exp.cli", *command], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout + result.stderr
        assert (f"the tracking store {uri} cannot be used: Detected out-of-date database schema" in result.stderr
                and f"run 'mlflow db upgrade {uri}'" in result.stderr), result.stderr
