"""Using trained models: `fer-exp predict` (files, folders, faces, TTA, every model URI form), the
logged pyfunc and a real `mlflow models serve`, and `fer-exp evaluate` with TTA and an ensemble."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import pickle
import re
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from fer_exp.classes import CLASS_NAMES
from fer_exp.cli import main
from fer_exp.config import load_config
from fer_exp.inference import load_model, predict_probabilities, tta_views

TINY = {"data": "synthetic:96,24,40", "epochs": 2, "batch_size": 32, "eval_batch_size": 64, "device": "cpu",
        "experiment_name": "use", "system_metrics": False}
PROBS = [f"prob_{c}" for c in CLASS_NAMES]
GRACE_HOPPER = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, isolated_store):
    """Two CNN runs (seeds 1 and 2) with their models logged; seed 1 registered as 'fer-test' v1; seed 2
    tested with flip TTA (``tta: flip``)."""
    from fer_exp.experiment import run_experiment

    tmp = tmp_path_factory.mktemp("use")
    with isolated_store(tmp) as mp:
        runs = {}
        for seed in (1, 2):
            cfg = load_config(overrides={**TINY, "seed": seed, "output_dir": str(tmp / "out"),
                                         "register": "fer-test" if seed == 1 else "", "tta": "flip" if seed == 2 else None})
            runs[seed] = run_experiment(cfg, progress=False)
        client = mlflow.MlflowClient()
        client.set_registered_model_alias("fer-test", "champion", "1")
        images = tmp / "images"
        images.mkdir()
        rng = np.random.default_rng(0)
        for i in range(3):  # asymmetric faces of several sizes and modes: a gradient plus noise
            pixels = (np.linspace(0, 255, 64)[None, :] * 0.6 + rng.integers(0, 100, (80, 64))).clip(0, 255)
            image = Image.fromarray(pixels.astype(np.uint8))
            (image.convert("RGB") if i == 1 else image).resize((40 + 30 * i, 50 + 30 * i)).save(images / f"face{i}.png")
        yield {"tmp": tmp, "runs": runs, "client": client, "images": images, "mp": mp}


@pytest.fixture(autouse=True)
def _tracking_uri_from_env():
    """mlflow.set_tracking_uri is process-global: point it at this test's store (the env var) again."""
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or None)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def predict_csv(trained, *args) -> pd.DataFrame:
    out = trained["tmp"] / f"preds-{time.monotonic_ns()}.csv"
    result = invoke("predict", *args, "--output", out)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return pd.read_csv(out)


@pytest.mark.slow  # the tracked runs
def test_every_model_uri_form_gives_the_same_predictions(trained):
    run = trained["runs"][1]
    checkpoint = trained["tmp"] / "out" / run.run_id / "checkpoints" / "best.pt"
    forms = [f"runs:/{run.run_id}/model", "models:/fer-test/1", "models:/fer-test@champion", checkpoint]
    frames = [predict_csv(trained, "--model", uri, trained["images"]) for uri in forms]
    first = frames[0]
    assert list(first["source"].map(lambda s: Path(s).name)) == ["face0.png", "face1.png", "face2.png"]
    assert np.allclose(first[PROBS].sum(axis=1), 1, atol=1e-5)
    assert (first["emotion"] == [CLASS_NAMES[i] for i in first[PROBS].to_numpy().argmax(1)]).all()
    for frame in frames[1:]:
        np.testing.assert_allclose(frame[PROBS].to_numpy(), first[PROBS].to_numpy(), atol=1e-6)
    # and they are the run's own: the logged model predicts the test split as the run evaluated it
    loaded = load_model(forms[1])
    assert loaded.run_id == run.run_id


@pytest.mark.slow
def test_predict_matches_the_runs_logged_test_predictions(trained):
    """The shared inference path: the model loaded from MLflow reproduces the training run's test
    probabilities (test_predictions.csv) on the same images."""
    from fer_exp.data import load_data

    run = trained["runs"][1]
    logged = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.run_id, artifact_path="test_predictions.csv"))
    test = load_data("synthetic:96,24,40", seed=1).test
    probabilities = load_model(f"runs:/{run.run_id}/model").predict(test.images)[0]
    np.testing.assert_allclose(probabilities, logged[PROBS].to_numpy(), atol=1e-5)


@pytest.mark.slow
def test_a_model_predicts_with_the_tta_its_run_was_tested_with(trained):
    """Seed 2's run was tested with flip TTA: its logged model, served model, checkpoint and evaluation
    predict with flip unless told otherwise, and so reproduce the run's test predictions."""
    from fer_exp.data import load_data

    run, client = trained["runs"][2], trained["client"]
    uri = f"runs:/{run.run_id}/model"
    assert client.get_run(run.run_id).data.tags["test_tta"] == "flip"
    logged = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.run_id, artifact_path="test_predictions.csv"))
    test = load_data("synthetic:96,24,40", seed=2).test
    model = load_model(uri)
    assert model.tta == "flip"
    np.testing.assert_allclose(model.predict(test.images)[0], logged[PROBS].to_numpy(), atol=1e-5)
    plain = model.predict(test.images, tta="none")[0]
    assert np.abs(plain - logged[PROBS].to_numpy()).max() > 1e-5
    served = mlflow.pyfunc.load_model(uri)
    assert served.metadata.get_params_schema().to_dict()[0]["default"] == "flip"
    np.testing.assert_allclose(served.predict(test.images.numpy())[PROBS].to_numpy(), logged[PROBS].to_numpy(), atol=1e-5)
    np.testing.assert_allclose(served.predict(test.images.numpy(), params={"tta": "none"})[PROBS].to_numpy(), plain,
                               atol=1e-5)
    checkpoint = trained["tmp"] / "out" / run.run_id / "checkpoints" / "best.pt"
    assert load_model(str(checkpoint)).tta == "flip"  # its config says flip
    evaluated = invoke("evaluate", "--model", uri, "--data", "synthetic:96,24,40")
    assert evaluated.exit_code == 0, evaluated.output + repr(evaluated.exception)
    evaluation = client.get_run(evaluated.output.split("evaluation run ")[1].split()[0])
    assert evaluation.data.tags["tta"] == "flip" and evaluation.data.tags["model"] == "cnn+tta:flip"
    assert evaluation.data.metrics["test_accuracy"] == pytest.approx(
        client.get_run(run.run_id).data.metrics["test_accuracy"])
    # a checkpoint of a tta-auto run (its config cannot know the choice): its run's tag says it
    from fer_exp.models import build_model

    auto = client.create_run(run.experiment_id, tags={"test_tta": "tencrop"})
    torch.save({"model": build_model("cnn").state_dict(), "config": {**load_config().to_dict(), "tta": "auto"}},
               trained["tmp"] / "best.pt")
    client.log_artifact(auto.info.run_id, str(trained["tmp"] / "best.pt"), "checkpoints")
    assert load_model(f"runs:/{auto.info.run_id}/checkpoints/best.pt").tta == "tencrop"
    assert load_model(str(trained["tmp"] / "best.pt")).tta == "none"  # the file alone does not know
    # MLflow 3's own address of a logged model names its run too
    [logged_model] = client.search_logged_models(experiment_ids=[run.experiment_id],
                                                 filter_string=f"source_run_id = '{run.run_id}'")
    assert load_model(f"models:/{logged_model.model_id}").run_id == run.run_id
    # an ensemble of a flip model and a plain one, each with its own
    both = invoke("evaluate", "--model", f"runs:/{trained['runs'][1].run_id}/model", "--model", uri,
                  "--data", "synthetic:96,24,40", "--no-log")
    assert both.exit_code == 0 and "cnn+cnn+tta:none/flip on test" in both.output, both.output


@pytest.mark.slow
def test_detect_faces_finds_the_face_and_show_draws_it(trained, tmp_path):
    """OpenCV's Haar cascade on the photo matplotlib ships (Grace Hopper): one face, its box, a drawn image."""
    photo = tmp_path / "grace.jpg"
    photo.write_bytes(GRACE_HOPPER.read_bytes())
    blank = tmp_path / "blank.png"
    Image.new("L", (200, 200), 128).save(blank)
    run = trained["runs"][1]
    out = tmp_path / "faces.json"
    result = invoke("predict", "--model", f"runs:/{run.run_id}/model", photo, blank, "--detect-faces",
                    "--output", out, "--show", tmp_path / "shown")
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["face"] == 0 and rows[0]["source"].endswith("grace.jpg")
    x, y, w, h = (rows[0][k] for k in ("x", "y", "width", "height"))
    assert 120 < x < 190 and 70 < y < 140 and 180 < w < 280 and w == h  # her face, not the flag or the cap
    assert "no face found in" in result.output and "blank.png" in result.output
    assert "2 image(s), 1 face(s) (1 without a face)" in result.output
    drawn = sorted((tmp_path / "shown").glob("*.png"))
    assert len(drawn) == 1
    pixels = np.asarray(Image.open(drawn[0]).convert("RGB")).astype(int)
    edge = pixels[y + h // 2, x - 1:x + 2]  # the box's left edge, drawn in red
    assert ((edge[:, 0] > 200) & (edge[:, 1] < 90)).any()
    # the face is classified as the crop it is: the same probabilities as predicting the crop itself
    crop = tmp_path / "crop.png"
    Image.open(photo).convert("L").crop((x, y, x + w, y + h)).save(crop)
    alone = predict_csv(trained, "--model", f"runs:/{run.run_id}/model", crop)
    np.testing.assert_allclose(alone[PROBS].to_numpy()[0], [rows[0][p] for p in PROBS], atol=1e-6)


@pytest.mark.slow
def test_tta_changes_predictions_deterministically(trained):
    uri = f"runs:/{trained['runs'][1].run_id}/model"
    plain = predict_csv(trained, "--model", uri, trained["images"])
    by_tta = {tta: predict_csv(trained, "--model", uri, trained["images"], "--tta", tta) for tta in ("flip", "tencrop")}
    for tta, frame in by_tta.items():
        # (a 2-epoch model is nearly uniform, so the change is small, but far above float noise)
        assert np.abs(frame[PROBS].to_numpy() - plain[PROBS].to_numpy()).max() > 1e-5, tta
        again = predict_csv(trained, "--model", uri, trained["images"], "--tta", tta)
        np.testing.assert_array_equal(again[PROBS].to_numpy(), frame[PROBS].to_numpy())


def test_tta_views():
    x = torch.rand(2, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    assert [v.shape for v in tta_views(x, "tencrop")] == [(2, 1, 48, 48)] * 10
    flip = tta_views(x, "flip")
    assert torch.equal(flip[0], x) and torch.equal(flip[1], x.flip(-1))
    tencrop = tta_views(x, "tencrop")
    assert all(torch.equal(tencrop[i + 5], tencrop[i].flip(-1)) for i in range(5))
    assert len({tuple(v.flatten()[:50].tolist()) for v in tencrop}) == 10  # ten different views
    with pytest.raises(ValueError, match="tta must be one of"):
        tta_views(x, "rotate")


def test_flip_tta_on_a_mirror_symmetric_face_equals_no_tta():
    """Averaging a face with its mirror changes nothing when the face is its own mirror."""
    from fer_exp.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn").eval()
    half = torch.randint(0, 256, (4, 48, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    symmetric = torch.cat([half, half.flip(-1)], dim=-1)
    plain, _ = predict_probabilities(model, symmetric)
    flipped, _ = predict_probabilities(model, symmetric, tta="flip")
    np.testing.assert_allclose(flipped, plain, atol=1e-6)


@pytest.mark.slow
def test_unreadable_files_are_reported_and_skipped(trained, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    good = trained["images"] / "face0.png"
    uri = f"runs:/{trained['runs'][1].run_id}/model"
    result = invoke("predict", "--model", uri, good, tmp_path / "broken.jpg")
    assert result.exit_code == 0, result.output
    assert "broken.jpg: cannot be decoded as an image" in result.output
    assert "face0.png" in result.output and "Traceback" not in result.output
    # a path that does not exist is a typo: the command stops before predicting anything
    typo = invoke("predict", "--model", uri, good, tmp_path / "missing.png", "--output", tmp_path / "preds.csv")
    assert typo.exit_code == 2 and f"no such file or folder: {tmp_path / 'missing.png'}; check the path" in typo.output
    assert not (tmp_path / "preds.csv").exists()
    only_bad = invoke("predict", "--model", uri, tmp_path / "broken.jpg")
    assert only_bad.exit_code == 2 and "none of the images could be read" in only_bad.output


@pytest.mark.slow  # the tracked runs
def test_a_resume_whose_checkpoint_folder_is_gone_downloads_last_pt_with_its_best_pt(trained, tmp_path):
    """The test at the end of a resumed run needs best.pt; only last.pt was downloaded."""
    from fer_exp.experiment import find_last_checkpoint

    run_id = trained["runs"][1].run_id
    recorded = Path(trained["client"].get_run(run_id).data.tags["checkpoint_dir"])
    moved = recorded.with_name("moved-away")
    recorded.rename(moved)
    try:
        last = find_last_checkpoint(run_id, load_config(overrides={**TINY, "output_dir": str(tmp_path)}))
        assert last.name == "last.pt" and last.is_file() and tmp_path / run_id in last.parents
        assert (last.parent / "best.pt").is_file()  # beside it, where the resumed run tests from
    finally:
        moved.rename(recorded)


@pytest.mark.slow  # the tracked runs
def test_a_deleted_run_s_model_loads_with_a_warning_that_says_how_to_restore_it(trained):
    run_id = trained["runs"][1].run_id
    image = next(trained["images"].iterdir())
    trained["client"].delete_run(run_id)
    try:
        for uri in (f"runs:/{run_id}/model", "models:/fer-test/1"):
            result = invoke("predict", "--model", uri, image)
            assert result.exit_code == 0, result.output + repr(result.exception)
            assert f"warning: {uri}: run {run_id} is deleted" in result.output, result.output
            assert f"mlflow runs restore --run-id {run_id}" in result.output
    finally:
        trained["client"].restore_run(run_id)
    assert "is deleted" not in invoke("predict", "--model", f"runs:/{run_id}/model", image).output


@pytest.mark.parametrize("case", ["missing run", "missing file", "pickled", "bad output"])
def test_bad_model_or_output_exits_2(case, tmp_path, store):
    image = tmp_path / "x.png"
    Image.new("L", (48, 48), 100).save(image)
    args = ["predict", "--model", "runs:/0123456789abcdef/model", image]
    expected = "cannot be loaded"
    if case == "missing run":
        mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).search_experiments()  # the store exists, not the run
    if case == "missing file":
        args[2], expected = str(tmp_path / "nope.pt"), "no such file"
    elif case == "pickled":
        class Evil:
            def __reduce__(self):
                return (os.system, ("touch " + str(tmp_path / "pwned"),))

        with open(tmp_path / "evil.pt", "wb") as handle:
            pickle.dump({"model": Evil(), "config": {}}, handle)
        args[2], expected = str(tmp_path / "evil.pt"), "refused"
    elif case == "bad output":
        from fer_exp.inference import save_weights
        from fer_exp.models import build_model

        args[2] = str(save_weights(build_model("cnn"), load_config(), tmp_path / "model.safetensors"))
        args += ["--output", str(tmp_path / "preds.xlsx")]
        expected = "write a .csv or a .json file"
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_logged_model_is_code_and_safetensors_not_a_pickle(trained):
    run = trained["runs"][1]
    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{run.run_id}/model"))
    mlmodel = (folder / "MLmodel").read_text()
    assert "serialization_format: safetensors" in mlmodel and "pyfunc_model.py" in mlmodel
    assert not list(folder.rglob("*.pkl")) and list(folder.rglob("model.safetensors"))
    assert (folder / "code" / "fer_exp" / "inference.py").is_file()  # the package travels with the model
    from safetensors import safe_open

    with safe_open(str(next(folder.rglob("model.safetensors"))), framework="pt") as handle:
        recorded = json.loads(handle.metadata()["fer_exp_evaluated_in"])
    checkpoint = torch.load(Path(run.result.best_checkpoint), weights_only=True)
    assert recorded == checkpoint["evaluated_in"] and recorded["device_type"] == "cpu" and recorded["amp"] in ("bf16", "fp32")
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run.run_id}/model")
    as_array = pyfunc.predict(np.zeros((2, 1, 48, 48), np.float32))
    buffer = io.BytesIO()
    Image.new("RGB", (96, 120), (0, 0, 0)).save(buffer, "JPEG")
    as_base64 = pyfunc.predict(pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()] * 2}))
    assert list(as_array.columns) == ["emotion", *PROBS]
    np.testing.assert_allclose(as_array[PROBS].to_numpy(), as_base64[PROBS].to_numpy(), atol=1e-6)  # black is black
    with_tta = pyfunc.predict(np.zeros((1, 48, 48), np.uint8), params={"tta": "flip"})
    assert with_tta.shape == (1, 8)


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_seven_probabilities_per_image(trained, local_server, free_port):
    """A real `mlflow models serve` process on localhost, as the README shows it: base64 images in a
    DataFrame, and pixel arrays."""
    tmp, port = trained["tmp"], free_port()
    # as in an activated environment: `mlflow models serve` starts the `uvicorn` found on PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    base = f"http://127.0.0.1:{port}"

    def post(payload):
        request = urllib.request.Request(base + "/invocations", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/fer-test/1", "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with local_server(cmd, base + "/ping", cwd=tmp, env=env):
        files = sorted(trained["images"].glob("*.png"))
        encoded = [base64.b64encode(f.read_bytes()).decode() for f in files]
        answer = post({"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}})
        rows = answer["predictions"]
        assert len(rows) == len(files)
        for row in rows:
            assert set(row) == {"emotion", *PROBS} and row["emotion"] in CLASS_NAMES
            assert abs(sum(row[p] for p in PROBS) - 1) < 1e-4
        expected = load_model("models:/fer-test/1").predict(
            torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("L").resize((48, 48), Image.Resampling.BILINEAR))
                                       for f in files])))[0]
        np.testing.assert_allclose([[r[p] for p in PROBS] for r in rows], expected, atol=1e-5)
        as_list = post({"inputs": encoded})["predictions"]  # a list of base64 texts, as most clients send it
        np.testing.assert_allclose([[r[p] for p in PROBS] for r in as_list], expected, atol=1e-5)
        arrays = post({"inputs": np.zeros((2, 48, 48)).tolist(), "params": {"tta": "tencrop"}})["predictions"]
        assert len(arrays) == 2 and all(len([k for k in r if k.startswith("prob_")]) == 7 for r in arrays)


@pytest.mark.slow
def test_evaluate_an_ensemble_with_tta_logs_a_comparable_run(trained):
    runs = trained["runs"]
    uris = [f"runs:/{runs[1].run_id}/model", f"runs:/{runs[2].run_id}/model"]
    result = invoke("evaluate", "--model", uris[0], "--model", uris[1], "--data", "synthetic:96,24,40", "--tta", "flip")
    assert result.exit_code == 0, result.output + repr(result.exception)
    client = trained["client"]
    run_id = result.output.split("evaluation run ")[1].split()[0]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["model"] == "cnn+cnn+tta:flip" and run.data.tags["fer_exp.role"] == "evaluation"
    assert {run.data.tags["source_run_0"], run.data.tags["source_run_1"]} == {runs[1].run_id, runs[2].run_id}
    # the one split it evaluated is its dataset input (not the training run's train and val as well)
    assert [(d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"])
            for d in run.inputs.dataset_inputs] == [("fer2013-test", "test")]
    artifacts = {f.path for f in client.list_artifacts(run_id)}
    assert {"confusion_matrix.png", "test_predictions.csv", "per_class_metrics.json"} <= artifacts
    # the ensemble is the mean of its members' flip-TTA probabilities
    from fer_exp.data import load_data

    test = load_data("synthetic:96,24,40", seed=1).test
    members = [load_model(u).predict(test.images, tta="flip")[0] for u in uris]
    logged = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="test_predictions.csv"))
    np.testing.assert_allclose(logged[PROBS].to_numpy(), np.mean(members, axis=0), atol=1e-6)
    accuracy = float((np.mean(members, axis=0).argmax(1) == test.labels.numpy()).mean())
    assert run.data.metrics["test_accuracy"] == pytest.approx(accuracy)
    # a single model without TTA reproduces its training run's test metrics exactly
    single = invoke("evaluate", "--model", uris[0], "--data", "synthetic:96,24,40")
    single_id = single.output.split("evaluation run ")[1].split()[0]
    assert client.get_run(single_id).data.metrics["test_accuracy"] == pytest.approx(
        client.get_run(runs[1].run_id).data.metrics["test_accuracy"])
    # and compare sets the evaluations beside the training runs
    compared = invoke("compare", "--experiment", "use", "--output", trained["tmp"] / "cmp", "--no-log")
    assert compared.exit_code == 0, compared.output
    assert "cnn+cnn+tta:flip" in compared.output
    # the plain re-evaluation is its training run's test again: not a second "model" beside it
    # (and seed 2's evaluation with its own flip, where an earlier test of this module's worker made one)
    assert re.search(r"skipped [12] evaluation\(s\) that repeat the test of the run they evaluated", compared.output)
    assert "| cnn:evaluated |" not in compared.output


@pytest.mark.slow
def test_an_evaluation_or_comparison_interrupted_while_logging_is_marked_killed(trained, monkeypatch):
    """Ctrl-C, or SIGTERM (raised as Ctrl-C in these short commands), half-way through the run's
    artifacts: exit 130 with a word, the run KILLED rather than left RUNNING or marked FINISHED."""
    import signal

    import fer_exp.tracking

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(fer_exp.tracking, "log_evaluation", interrupted)
    monkeypatch.setattr(signal, "signal", lambda signum, handler, real=signal.signal: installed.append(signum))
    installed = []
    result = invoke("evaluate", "--model", f"runs:/{trained['runs'][1].run_id}/model", "--data", "synthetic:96,24,40",
                    "--experiment-name", "interrupted")
    assert result.exit_code == 130 and "interrupted: the evaluation; its run, if it had begun, is marked KILLED" in result.output
    assert installed == [signal.SIGTERM]  # SIGTERM interrupts as Ctrl-C does (not installed here: pytest's process)
    monkeypatch.setattr(mlflow, "log_artifact", interrupted)
    compared = invoke("compare", "--experiment", "use", "--output", trained["tmp"] / "cmp-interrupted",
                      "--experiment", "interrupted")
    assert compared.exit_code == 130 and "interrupted: the comparison" in compared.output, compared.output
    client = trained["client"]
    for name, role in (("interrupted", "evaluation"), ("use", "comparison")):
        runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], f"tags.fer_exp.role = '{role}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        assert runs[0].info.status == "KILLED", (name, runs[0].info.status)


@pytest.mark.slow
def test_an_ensemble_is_evaluated_on_val_only_where_its_members_share_one_val_split(trained):
    """Seeds 1 and 2 hold out different val faces, so their ensemble is refused on val; members trained
    with one data_seed share that seed's split, and the ensemble's val score is the mean of theirs on it."""
    import dataclasses

    from fer_exp.data import load_data
    from fer_exp.evaluate import evaluate

    runs = trained["runs"]
    uris = [f"runs:/{runs[1].run_id}/model", f"runs:/{runs[2].run_id}/model"]
    refused = invoke("evaluate", "--model", uris[0], "--model", uris[1], "--split", "val", "--no-log")
    assert refused.exit_code == 2 and "different val hold-outs" in refused.output and "--data-seed" in refused.output
    models = [load_model(u) for u in uris]
    shared = [dataclasses.replace(m, config=dataclasses.replace(m.config, data_seed=5)) for m in models]
    result = evaluate(shared, "synthetic:96,24,40", split="val", tta="none", log=False, progress=False)
    val = load_data("synthetic:96,24,40", seed=5).val
    expected = np.mean([m.predict(val.images, tta="none")[0] for m in models], axis=0)
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)
    assert result.metrics["val_accuracy"] == pytest.approx(float((expected.argmax(1) == val.labels.numpy()).mean()))
    assert not torch.equal(val.images, load_data("synthetic:96,24,40", seed=1).val.images)  # not the first member's own
    # members trained with and without FER2013's copies share the hold-out (neither trained on its faces)
    dropped = [shared[0], dataclasses.replace(shared[1], config=dataclasses.replace(shared[1].config, duplicates="drop"))]
    assert evaluate(dropped, "synthetic:96,24,40", split="val", tta="none", log=False,
                    progress=False).metrics["val_accuracy"] == result.metrics["val_accuracy"]


@pytest.mark.slow
def test_an_evaluation_scores_the_test_faces_copied_from_train_apart(trained, tmp_path):
    """On data whose test holds copies of train faces, `fer-exp evaluate` logs the scores on the other
    faces (test_accuracy_uncopied) and marks each prediction's copied, as a training run does."""
    from fer_exp.data import load_data

    data = load_data("synthetic:96,24,40", seed=1)
    lines = ["emotion,pixels,Usage"]
    for split, usage in ((data.train, "Training"), (data.val, "PublicTest"), (data.test, "PrivateTest"),
                         (data.train.subset([0, 1, 2, 3]), "PrivateTest")):
        lines += [f"{label},{' '.join(map(str, image.flatten().tolist()))},{usage}"
                  for image, label in zip(split.images, split.labels.tolist())]
    near = (data.train.images[5].int() + torch.randint(-2, 3, (48, 48), generator=torch.Generator().manual_seed(0)))
    lines.append(f"{int(data.train.labels[5])},{' '.join(map(str, near.clamp(0, 255).flatten().tolist()))},PrivateTest")
    (tmp_path / "fer2013.csv").write_text("\n".join(lines) + "\n")
    result = invoke("evaluate", "--model", f"runs:/{trained['runs'][1].run_id}/model", "--data", str(tmp_path / "fer2013.csv"))
    assert result.exit_code == 0, result.output
    assert "on the test faces with no copy in train or val (FER2013 has copies" in result.output
    run_id = re.search(r"evaluation run (\w+)", result.output).group(1)
    predictions = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/test_predictions.csv"))
    assert predictions["copied"].tolist() == [False] * 40 + [True] * 4 + [False]  # the near-copy: not at 1
    others = predictions[~predictions["copied"]]
    assert mlflow.get_run(run_id).data.metrics["test_accuracy_uncopied"] == pytest.approx(
        (others["label"] == others["prediction"]).mean())
    # an ensemble of members that counted copies at 1 and at 0.97 counts them at 0.97, in either order
    import dataclasses

    from fer_exp.evaluate import evaluate
    from fer_exp.inference import load_model as load

    members = [load(f"runs:/{trained['runs'][s].run_id}/model") for s in (1, 2)]
    members[1] = dataclasses.replace(members[1], config=dataclasses.replace(members[1].config, copy_correlation=0.97))
    results = [evaluate(order, str(tmp_path / "fer2013.csv"), split="test", tta="none", log=False, progress=False)
               for order in (members, members[::-1])]
    probabilities = results[0].probabilities
    kept = np.arange(45) < 40  # the near-copy counts as a copy at 0.97 too
    expected = float((probabilities.argmax(1)[kept] == np.array([int(x) for x in predictions["label"]])[kept]).mean())
    assert results[0].metrics["test_accuracy_uncopied"] == results[1].metrics["test_accuracy_uncopied"] == pytest.approx(expected)


@pytest.mark.slow
def test_a_test_split_without_some_classes_scores_them_n_a_and_averages_over_the_rest(trained, tmp_path):
    """A user's own labelled faces of three emotions: evaluate says n/a for the other four (it said 0%),
    logs them as NaN, averages macro-F1 over the three, and compare's tables say n/a too."""
    from sklearn.metrics import f1_score

    from fer_exp.data import load_data

    data = load_data("synthetic:96,24,40", seed=1)
    kept = [i for i, label in enumerate(data.test.labels.tolist()) if label in (0, 3, 6)]
    lines = ["emotion,pixels,Usage"]
    for split, usage in ((data.train, "Training"), (data.val, "PublicTest"), (data.test.subset(kept), "PrivateTest")):
        lines += [f"{label},{' '.join(map(str, image.flatten().tolist()))},{usage}"
                  for image, label in zip(split.images, split.labels.tolist())]
    (tmp_path / "three.csv").write_text("\n".join(lines) + "\n")
    result = invoke("evaluate", "--model", f"runs:/{trained['runs'][1].run_id}/model", "--data", tmp_path / "three.csv",
                    "--experiment-name", "three-classes")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "disgust n/a" in result.output and "surprise n/a" in result.output and "angry n/a" not in result.output
    run_id = re.search(r"evaluation run (\w+)", result.output).group(1)
    metrics = trained["client"].get_run(run_id).data.metrics
    assert math.isnan(metrics["test_acc_fear"]) and math.isnan(metrics["test_f1_sad"]) and 0 <= metrics["test_acc_happy"] <= 1
    predictions = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/test_predictions.csv"))
    assert set(predictions["label"]) == {0, 3, 6}
    assert metrics["test_macro_f1"] == pytest.approx(f1_score(predictions["label"], predictions["prediction"],
                                                              labels=[0, 3, 6], average="macro", zero_division=0))
    report = mlflow.artifacts.load_text(f"runs:/{run_id}/classification_report.txt")
    assert "no faces of disgust, fear, sad, surprise: left out of the averages" in report
    compared = invoke("compare", "--experiment", "three-classes", "--output", tmp_path / "cmp", "--no-log")
    assert compared.exit_code == 0, compared.output
    per_class = (tmp_path / "cmp" / "tables.md").read_text().split("## Per-class accuracy")[1].split("\n\n")[1]
    assert per_class.count("n/a") == 4, per_class


def test_the_served_model_class_defines_without_mlflows_type_hint_warning():
    """Every training logs the model, so importing the serving module once printed MLflow's warning
    about predict's type hints (shown under MLflow's own 'once' filter, past an 'ignore')."""
    import subprocess

    proc = subprocess.run([sys.executable, "-W", "default", "-c", "import fer_exp.serving"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "type hint" not in proc.stderr.lower(), proc.stderr[-2000:]


def test_a_model_predicts_in_the_precision_its_run_evaluated_in(tmp_path, monkeypatch):
    """amp auto on CUDA is measured when a model trains (fp32 for the CNN on an H200), so a loaded model
    predicts on CUDA in what its run tested in, not by the bf16 rule; elsewhere, and for amp off or bf16,
    the rule. The record travels in the weights file and the checkpoint."""
    from fer_exp import inference
    from fer_exp.device import inference_amp, resolve_amp
    from fer_exp.models import build_model

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert inference_amp("auto", cuda, {"device_type": "cuda", "amp": "fp32"}) is None
    assert inference_amp("auto", cuda, {"device_type": "cuda", "amp": "bf16"}) is torch.bfloat16
    assert inference_amp("off", cuda, {"device_type": "cuda", "amp": "bf16"}) is None
    assert inference_amp("bf16", cuda, {"device_type": "cuda", "amp": "fp32"}) is torch.bfloat16
    assert inference_amp("auto", cpu, {"device_type": "cuda", "amp": "fp32"}) == resolve_amp("auto", cpu)
    record = {"device_type": "cuda", "amp": "fp32"}
    seen = []
    real = inference.inference_amp
    monkeypatch.setattr(inference, "inference_amp", lambda amp, device, evaluated=None: seen.append(evaluated) or real(amp, device, evaluated))
    path = inference.save_weights(build_model("cnn"), load_config(), tmp_path / "model.safetensors", evaluated_in=record)
    inference.load_model(str(path), "cpu")
    torch.save({"model": build_model("cnn").state_dict(), "config": load_config().to_dict(), "evaluated_in": record},
               tmp_path / "best.pt")
    inference.load_model(str(tmp_path / "best.pt"), "cpu")
    assert seen == [record, record]


def test_a_single_text_column_of_any_name_is_read_as_base64_images():
    """pandas 3 gives text columns a string dtype, not object: such a column is still images, not numbers."""
    from fer_exp.serving import ServingInputError, images_from_input

    buffer = io.BytesIO()
    Image.new("L", (60, 60), 200).save(buffer, format="PNG")
    frame = pd.DataFrame({"img": [base64.b64encode(buffer.getvalue()).decode()]})
    images = images_from_input(frame)
    assert images.shape == (1, 48, 48) and images.dtype == torch.uint8 and int(images[0, 0, 0]) == 200
    with pytest.raises(ServingInputError, match="row 0: the 'image' value is not base64 text"):
        images_from_input(pd.DataFrame({"img": ["aaa"]}))
    with pytest.raises(ServingInputError, match=r"needs an 'image' column .* got columns \['a', 'b'\]"):
        images_from_input(pd.DataFrame({"a": [frame["img"][0]], "b": ["x"]}))  # several columns, none 'image'
    with pytest.raises(ServingInputError, match=r"the key\(s\) 'input'; send \{\"inputs\""):
        images_from_input({"input": [1]})  # a mistyped JSON key arrives as a mapping


def test_served_inputs_as_users_send_them():
    """A list of base64 texts (what {"inputs": [...]} becomes: an array of text), base64 wrapped in lines or
    as a data URL, one colour image (H, W, 3); pixels outside 0-255 or scaled to 0-1 are refused, not
    clipped into a black face."""
    from fer_exp.serving import ServingInputError, images_from_input

    buffer = io.BytesIO()
    Image.new("L", (60, 60), 200).save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76)) + "\n"
    for given in (np.array([encoded, encoded]), np.array([wrapped, "data:image/png;base64," + encoded], dtype=object)):
        images = images_from_input(given)
        assert images.shape == (2, 48, 48) and (images == 200).all()
    colour = np.zeros((30, 40, 3), np.uint8)
    colour[..., 0] = 100  # red 100: luma 29.9
    one = images_from_input(colour)
    assert one.shape == (1, 48, 48) and (one == 30).all()
    gray = np.arange(48 * 48).reshape(48, 48) % 256
    for shaped in (gray, gray[..., None], gray[None], gray[None, ..., None], gray[None, None]):  # a gray face, any axes
        assert torch.equal(images_from_input(shaped), torch.from_numpy(gray[None].astype(np.uint8))), shaped.shape
    with pytest.raises(ServingInputError, match=r"\(H, W, 1\) or \(H, W, 3\); got \(1, 2, 48, 48, 1\)"):
        images_from_input(np.zeros((1, 2, 48, 48, 1)))
    for bad, message in ((np.full((1, 48, 48), 0.5), "within 0-1"), (np.full((1, 48, 48), 300), "values from 300 to 300"),
                         (np.full((1, 48, 48), np.nan), "NaN")):
        with pytest.raises(ServingInputError, match=message):
            images_from_input(bad)


def test_predict_refuses_a_bad_output_or_an_ambiguous_model_folder_before_predicting(tmp_path, monkeypatch, free_port):
    """A bad --output is refused before the model loads; a folder holding several models is not guessed
    from; a runs:/ URI where no store is (or a mistyped sqlite path) leaves no empty mlflow.db behind, and a
    tracking server that does not answer is said in seconds; --batch-size changes nothing but memory."""
    from fer_exp.inference import save_weights
    from fer_exp.models import build_model

    image = tmp_path / "x.png"
    Image.new("L", (48, 48), 100).save(image)
    (tmp_path / "blocker").write_text("a file, not a folder")
    blocked = invoke("predict", "--model", "runs:/0123456789abcdef/model", image, "--output", tmp_path / "blocker" / "p.csv")
    assert blocked.exit_code == 2 and "the predictions cannot be written there" in blocked.output, blocked.output
    assert f"{tmp_path / 'blocker'} is a file, not a folder" in blocked.output
    (tmp_path / "a-folder.csv").mkdir()
    for option, place, said in (("--output", tmp_path / "a-folder.csv", "is a folder; name a .csv or .json file"),
                                ("--show", tmp_path / "blocker", "the drawn images cannot be written there")):
        refused = invoke("predict", "--model", "runs:/0123456789abcdef/model", image, option, place)  # before loading
        assert refused.exit_code == 2 and said in refused.output, refused.output
    for sub in ("a", "b"):
        (tmp_path / "models" / sub).mkdir(parents=True)
        save_weights(build_model("cnn"), load_config(), tmp_path / "models" / sub / "model.safetensors")
    several = invoke("predict", "--model", tmp_path / "models", image)
    assert several.exit_code == 2 and "a folder with 2 models" in several.output, several.output
    one = tmp_path / "models" / "a" / "model.safetensors"
    for i in range(2):
        Image.new("L", (48, 48), 60 * i).save(tmp_path / f"y{i}.png")
    from fer_exp import inference

    batches, real = [], inference.predict_probabilities
    monkeypatch.setattr(inference, "predict_probabilities", lambda *a, **kw: batches.append(kw["batch_size"]) or real(*a, **kw))
    images = [image, tmp_path / "y0.png", tmp_path / "y1.png"]
    default, small = (predict_rows(invoke("predict", "--model", one, *images, *extra)) for extra in ((), ("--batch-size", "2")))
    assert len(default) == 3 and default == small and batches == [1024, 2]  # the config's eval_batch_size, then 2
    (tmp_path / "p.json").write_text("an earlier file")
    from fer_exp import predict as predict_module

    real_replace, written = os.replace, []

    def full_disk(source, target):  # the partial file is written, then the disk is full
        written.append(Path(source).read_text())
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(predict_module.os, "replace", full_disk)
    full = invoke("predict", "--model", one, image, "--output", tmp_path / "p.json")
    assert full.exit_code == 2 and "cannot be written (No space left on device)" in full.output, full.output
    assert json.loads(written[0])[0]["source"] == str(image)  # (it had been written whole, aside)
    assert (tmp_path / "p.json").read_text() == "an earlier file" and [f.name for f in tmp_path.glob(".p.json*")] == []
    monkeypatch.setattr(predict_module.os, "replace", real_replace)
    as_json = invoke("predict", "--model", one, image, "--output", tmp_path / "p.json")
    assert as_json.exit_code == 0 and "\\/" not in (tmp_path / "p.json").read_text()
    assert json.loads((tmp_path / "p.json").read_text())[0]["source"] == str(image)
    faceless = invoke("predict", "--model", one, image, "--detect-faces")  # a flat grey square: no face
    assert faceless.exit_code == 0 and "predict without --detect-faces" in faceless.output, faceless.output
    run_id = "0123456789abcdef0123456789abcdef"
    bare = invoke("predict", "--model", run_id, image)
    assert bare.exit_code == 2 and f"give runs:/{run_id}/model" in bare.output
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    nowhere = invoke("predict", "--model", "runs:/0123456789abcdef/model", image)
    assert nowhere.exit_code == 2 and "no MLflow store here" in nowhere.output and "MLFLOW_TRACKING_URI" in nowhere.output
    evaluated = invoke("evaluate", "--model", "runs:/0123456789abcdef/model", "--data", "synthetic:16,8,8")
    assert evaluated.exit_code == 2 and "no MLflow store here" in evaluated.output, evaluated.output
    assert not (tmp_path / "mlflow.db").exists()
    mistyped = tmp_path / "no-such-folder" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{mistyped}")
    typo = invoke("predict", "--model", "models:/fer-cnn/1", image)
    assert typo.exit_code == 2 and f"names no MLflow store ({mistyped} does not exist" in typo.output, typo.output
    assert not mistyped.parent.exists()  # no empty store made where the path was mistyped
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    down = invoke("predict", "--model", "models:/fer-cnn/1", image)
    assert down.exit_code == 2 and "does not answer" in down.output and time.monotonic() - started < 30, down.output


def test_show_draws_a_16_bit_image_as_the_model_sees_it(tmp_path):
    from fer_exp.inference import save_weights
    from fer_exp.models import build_model

    model = save_weights(build_model("cnn"), load_config(), tmp_path / "model.safetensors")
    Image.fromarray(np.full((64, 64), 30000, np.uint16)).save(tmp_path / "deep.png")  # mode I;16
    result = invoke("predict", "--model", model, tmp_path / "deep.png", "--show", tmp_path / "drawn")
    assert result.exit_code == 0, result.output
    [drawn] = (tmp_path / "drawn").glob("*.png")
    centre = Image.open(drawn).convert("L").getpixel((128, 128))
    assert abs(centre - round(30000 / 257)) <= 1  # not clipped to white (255)


def predict_rows(result) -> list[str]:
    assert result.exit_code == 0, result.output
    return [line for line in result.output.splitlines() if line.strip().endswith("48x48")]


def test_a_file_named_twice_is_predicted_once(tmp_path):
    from fer_exp.predict import list_images

    Image.new("L", (48, 48), 1).save(tmp_path / "a.png")
    assert list_images([str(tmp_path / "a.png"), str(tmp_path)]) == [tmp_path / "a.png"]


@pytest.mark.slow  # the tracked runs
def test_evaluate_without_data_refuses_other_faces_at_the_model_s_relative_path(trained, tmp_path, monkeypatch):
    """A model's data as its config names it (a relative path) read from another folder: where that holds other
    faces than its run logged, or nothing, evaluate says so and names --data, rather than score them as its test."""
    import dataclasses

    from fer_exp.data import load_data
    from fer_exp.evaluate import EvaluateError, evaluate
    from fer_exp.inference import load_model as load

    model = load(f"runs:/{trained['runs'][1].run_id}/model")
    moved = dataclasses.replace(model, config=dataclasses.replace(model.config, data="faces.csv"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EvaluateError, match=r"that is the data runs:/\w+/model trained on, as its config names it .*give --data"):
        evaluate([moved], log=False, progress=False)
    other = load_data("synthetic:96,24,40", seed=7)  # other faces where the model's relative path points
    lines = ["emotion,pixels,Usage"] + [f"{label},{' '.join(map(str, image.flatten().tolist()))},{usage}"
                                         for split, usage in ((other.train, "Training"), (other.test, "PrivateTest"))
                                         for image, label in zip(split.images, split.labels.tolist())]
    (tmp_path / "faces.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(EvaluateError, match=r"faces.csv, the data .* holds other test faces than run \w+ was evaluated on"):
        evaluate([moved], log=False, progress=False)
    assert evaluate([moved], "faces.csv", log=False, progress=False).metrics["test_accuracy"] >= 0  # --data: as asked
    assert evaluate([model], log=False, progress=False).metrics["test_accuracy"] == pytest.approx(
        trained["client"].get_run(model.run_id).data.metrics["test_accuracy"])  # its own data: its own test


@pytest.mark.slow  # the tracked runs
def test_evaluate_scores_labelled_faces_of_one_s_own_with_no_train_faces(trained, tmp_path):
    """A test/ folder alone (or a CSV of test rows alone) is faces to evaluate on: evaluate reads it with no
    train or val split; training on it says what it lacks."""
    model = f"runs:/{trained['runs'][1].run_id}/model"
    rng = np.random.default_rng(0)
    for emotion in ("happy", "sad"):
        (tmp_path / "own" / "test" / emotion).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (48, 48)).astype(np.uint8)).save(tmp_path / "own" / "test" / emotion / f"{i}.png")
    evaluated = invoke("evaluate", "--model", model, "--data", tmp_path / "own", "--no-log")
    assert evaluated.exit_code == 0 and "6 test images" in evaluated.output and "angry n/a" in evaluated.output, evaluated.output
    rows = [f"{CLASS_NAMES.index('happy')},{' '.join(['7'] * 48 * 48)},PrivateTest"] * 2
    (tmp_path / "rows.csv").write_text("emotion,pixels,Usage\n" + "\n".join(rows) + "\n")
    from_csv = invoke("evaluate", "--model", model, "--data", tmp_path / "rows.csv", "--no-log")
    assert from_csv.exit_code == 0 and "2 test images" in from_csv.output, from_csv.output
    training = invoke("train", "--data", tmp_path / "own", "--epochs", "1")
    assert training.exit_code == 2 and "A test/ folder alone is faces to evaluate on" in training.output, training.output
    on_val = invoke("evaluate", "--model", model, "--data", tmp_path / "own", "--split", "val", "--no-log")
    assert on_val.exit_code == 2 and "unknown layout" in on_val.output
