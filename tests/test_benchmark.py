"""The throughput benchmark runs end to end on a small synthetic set (correctness, not timing)."""

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def unpacked_results(out: Path, into: Path) -> Path:
    """gpu_check.sh's results as the device tool returns them: $OUT/results.tar.gz, unpacked."""
    with tarfile.open(out / "results.tar.gz") as packed:
        packed.extractall(into, filter="data")
    return into


@pytest.mark.slow
def test_throughput_benchmark_smoke(tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = dict(os.environ, FER_EXP_CACHE_DIR=str(tmp_path / "cache"), TMPDIR=str(temp))
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--data", "synthetic:128,32,32",
           "--batches", "2", "--batch-size", "16", "--eval-batch-size", "16", "--rounds", "1", "--workers", "1",
           "--resnet-batches", "1", "--resnet-batch-size", "4", "--json", "--cold-start", "--cold-start-repeats", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout)
    ips = results["images_per_second"]
    for group in ("cnn", "resnet18@112"):
        for method in ("fer-exp", "compute bound"):
            assert ips[group][method]["train"] > 0 and ips[group][method]["eval"] > 0
    assert ips["cnn"]["conventional"]["train"] > 0 and ips["cnn"]["conventional"]["eval"] > 0
    assert set(ips["cnn ablations"]) == {"channels_last off", "fused AdamW off (foreach)", "bf16 autocast", "fp32 (amp off)"}
    assert {"cnn train fer-exp/conventional", "cnn train fer-exp/compute bound", "cnn eval fer-exp/conventional",
            "resnet18@112 train fer-exp/compute bound"} <= set(results["ratios"])
    assert all(v > 0 for v in results["ratios"].values())
    assert len(results["cold_start_seconds"]) == 1 and all(0 < s < 120 for s in results["cold_start_seconds"])
    assert not list(temp.glob("fer-*"))  # its image folder and the launches' store are removed


def test_full_training_benchmark_reports_speed_and_accuracy(tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = dict(os.environ, FER_EXP_CACHE_DIR=str(tmp_path / "cache"), TMPDIR=str(temp))
    out = tmp_path / "run.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "full_training.py"), "--config", str(REPO / "experiments" / "cnn.yaml"),
           "--data", "synthetic:96,32,32", "--set", "epochs=2", "--set", "batch_size=16", "--set", "early_stopping=0",
           "--set", "eval_batch_size=16", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result == json.loads(proc.stdout)
    assert result["config"]["epochs"] == 2 and result["config"]["batch_size"] == 16 and result["config"]["lr"] == 0.001
    assert result["epochs_run"] == 2 and len(result["epoch_seconds"]) == 2 and all(s > 0 for s in result["epoch_seconds"])
    assert result["fit_seconds"] >= sum(result["epoch_seconds"]) * 0.99
    assert result["train_images"] == 96 - 0 and result["test_images"] == 32
    assert not list(temp.glob("fer-*"))  # the run's checkpoints are not left behind
    assert 0 <= result["test_accuracy"] <= 1 and 0 <= result["test_macro_f1"] <= 1
    assert all(0 <= a <= 1 for a in result["val_accuracy"]) and result["amp"] in ("fp32", "bfloat16")
    assert "epoch 2/2" in proc.stderr  # one progress line per epoch
    assert result["compile_choice"] == "auto: off (not CUDA)" and 0 < result["overhead_fraction"] < 1
    assert result["median_epoch_overhead_seconds"] > 0


def test_a_full_training_cut_off_by_its_time_limit_still_returns_what_it_measured(tmp_path):
    out = tmp_path / "run.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "full_training.py"), "--data", "synthetic:64,16,16",
           "--set", "epochs=500", "--set", "batch_size=16", "--set", "early_stopping=0", "--json", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=dict(os.environ, FER_EXP_CACHE_DIR=str(tmp_path / "cache"),
                                                        TMPDIR=str(tmp_path)),  # the killed run's checkpoints
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (out.exists() and json.loads(out.read_text() or "{}").get("epochs_run", 0) >= 2):
            time.sleep(0.2)
    finally:
        proc.kill()  # as gpu_check's timeout does
        proc.wait()
    partial = json.loads(out.read_text())
    assert partial["partial"] is True and partial["epochs_run"] >= 2 and partial["config"]["epochs"] == 500
    assert len(partial["val_accuracy"]) == len(partial["epoch_seconds"]) == partial["epochs_run"]


def test_full_training_lists_a_study_file_s_arms_for_the_gpu_script(tmp_path):
    (tmp_path / "study.yaml").write_text(
        "seeds: [1]\narms:\n  plain: {config: cnn.yaml}\n  shift: {config: cnn.yaml, set: {aug_shift: 0.1, seed: 3}}\n"
        "  together: {config: best_cnn.yaml}\n")
    cmd = [sys.executable, str(REPO / "benchmarks" / "full_training.py"), "--study-arms", str(tmp_path / "study.yaml")]
    lines = subprocess.run(cmd + ["--arms-on", "cnn.yaml"], capture_output=True, text=True, timeout=120).stdout.splitlines()
    assert lines == [f"plain|--config {tmp_path}/cnn.yaml",
                     f"shift|--config {tmp_path}/cnn.yaml --set aug_shift=0.1 --set seed=3"]
    assert len(subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout.splitlines()) == 3
    # the shipped ablation study: the recipe and each lever alone on cnn.yaml
    shipped = subprocess.run([sys.executable, str(REPO / "benchmarks" / "full_training.py"), "--study-arms",
                              "experiments/ablation_cnn.yaml", "--arms-on", "cnn.yaml"], cwd=REPO, capture_output=True,
                             text=True, timeout=120).stdout.splitlines()
    assert shipped[0] == "recipe|--config experiments/cnn.yaml" and len(shipped) >= 6


def test_full_training_benchmark_rejects_a_bad_override(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "full_training.py"), "--data", "synthetic:32,8,8", "--set", "epochz=2"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown config key 'epochz'" in proc.stderr and "epochs" in proc.stderr


@pytest.mark.slow
def test_gpu_check_script_runs_every_step_on_a_tiny_set(tmp_path):
    # the one prepared script a GPU session runs; here on the CPU with tiny sizes, so a GPU session
    # never spends its device minutes on a broken script
    out = tmp_path / "out"
    temp = tmp_path / "temp"  # the script's and the benchmarks' temporary folders: none may be left behind
    temp.mkdir()
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, FER_EXP_CACHE_DIR=str(tmp_path / "cache"), TMPDIR=str(temp),
               FER_GPU_DATA="synthetic:64,16,16", FER_GPU_EPOCHS="1", FER_GPU_RESNET_EPOCHS="1", FER_GPU_BATCHES="1",
               FER_GPU_WORKERS="0", FER_GPU_SET="batch_size=16 eval_batch_size=16", FER_GPU_COMPILE="",
               FER_GPU_THROUGHPUT_COMPILE="", FER_GPU_PROFILE_ARGS="--steps 1 --warmup 1 --top 3",
               FER_GPU_GRAPH_MODE="off",  # the compiled step costs minutes here; test_train.py compiles it on the CPU
               FER_GPU_THROUGHPUT_ARGS="--batch-size 16 --eval-batch-size 16 --rounds 1 --resnet-batches 1 "
                                       "--resnet-batch-size 4 --skip-ablations",
               FER_GPU_TUNE_WORKERS="1", FER_GPU_TUNE_SECONDS="5",  # in-process: a trial starts within 5 s
               FER_GPU_TUNE_MODELS="resnet18",  # the one that must not download (the CNN study: tests/test_tune.py)
               FER_GPU_TUNE_SET_RESNET18="epochs=1 input_size=112 pretrained=none",
               # the GPU's time budgets (570 s in all, 90 s a profile) are not the test's: a loaded 2-core
               # machine with one thread a process may take minutes here, and no step may be cut short
               FER_GPU_DEADLINE="3000", **{f"FER_GPU_{step}_LIMIT": "900" for step in
                                          ("THROUGHPUT", "PROFILE", "CNN", "RESNET", "TUNE", "COMPILE")})
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=3300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert {p.name for p in out.iterdir()} == {"log.txt", "summary.txt", "results.tar.gz"}  # <= 8 files back
    names = {"throughput.json", "cnn_graph.json", "cnn_graph_warm.json", "cnn_bf16.json", "cnn_fp32.json", "resnet18_112.json", "resnet18_224.json",
             "compile_eager.json", "tune_resnet18.json", "profile_cnn.json", "profile_resnet18_112.json", "profile_resnet18_224.json"}
    log = (out / "log.txt").read_text()
    out = unpacked_results(out, tmp_path / "results")
    assert {p.name for p in out.iterdir()} == names
    tune = json.loads((out / "tune_resnet18.json").read_text())
    assert [r["workers"] for r in tune["runs"]] == [1] and tune["runs"][0]["finished_trials"] >= 1, tune
    assert tune["runs"][0]["trials_per_hour"] > 0 and tune["runs"][0]["epochs_per_trial"] == 1
    assert tune["config"].endswith("experiments/tune_resnet18.yaml") and "pretrained=none" in tune["set"]
    assert json.loads((out / "compile_eager.json").read_text())["images_per_second"]["cnn"]["fer-exp"]["train"] > 0
    assert json.loads((out / "cnn_fp32.json").read_text())["amp"] == "fp32"
    assert json.loads((out / "cnn_bf16.json").read_text())["amp"] == "bfloat16"  # forced: auto may pick fp32
    assert json.loads((out / "profile_resnet18_112.json").read_text())["config"]["compile"] == "off"
    assert json.loads((out / "cnn_graph.json").read_text())["config"]["compile"] == "off"
    assert json.loads((out / "cnn_fp32.json").read_text())["tta"] == {}  # speed steps skip the TTA evaluation
    assert json.loads((out / "resnet18_224.json").read_text())["config"]["input_size"] == 224
    throughput = json.loads((out / "throughput.json").read_text())
    assert throughput["images_per_second"]["cnn"]["conventional"]["train"] > 0
    assert throughput["ratios"]["resnet18@224 train fer-exp/compute bound"] > 0  # both ResNet18 sizes
    profile = json.loads((out / "profile_resnet18_224.json").read_text())
    assert profile["config"]["input_size"] == 224 and profile["fer-exp"]["wall_ms_per_step"] > 0
    for line in ("ratio cnn train fer-exp/conventional", "cnn_bf16: cpu amp", "resnet18_224: cpu", "tune resnet18: 5.0 s",
                 "1 worker(s): ", "profile cnn (auto: off (not CUDA)", "fer-exp/compute bound"):
        assert line in proc.stdout
    assert "exit 0" in log and "exit 1" not in proc.stdout
    assert [p.name for p in temp.iterdir() if not p.name.startswith("torchinductor_")] == []


@pytest.mark.slow
def test_gpu_check_packs_real_layout_data_and_trains_from_the_tarball(tmp_path):
    from PIL import Image

    from fer_exp.classes import CLASS_NAMES

    root = tmp_path / "somewhere" / "faces"
    for split, n in (("train", 6), ("test", 2)):
        for label, name in enumerate(CLASS_NAMES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(n):
                Image.new("L", (48, 48), 30 * label + k).save(folder / f"{split}_{k}.png")
    script = str(REPO / "benchmarks" / "gpu_check.sh")
    tarball = tmp_path / "pack" / "fer2013.tar.gz"
    packed = subprocess.run(["bash", script, "pack", str(root), str(tarball)], capture_output=True, text=True, timeout=120)
    assert packed.returncode == 0, packed.stderr
    assert tarball.stat().st_size > 0

    missing = subprocess.run(["bash", script, "pack", str(tmp_path / "nope"), str(tmp_path / "x.tar")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no train/ and test/ folders" in missing.stderr

    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, FER_EXP_CACHE_DIR=str(tmp_path / "cache"),
               FER_GPU_TAR=str(tarball), FER_GPU_EPOCHS="1", FER_GPU_SET="batch_size=8 eval_batch_size=8")
    env.pop("FER_GPU_DATA", None)
    proc = subprocess.run(["bash", script, "run", "cnn-bf16"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = unpacked_results(out, tmp_path / "results")
    result = json.loads((results / "cnn_bf16.json").read_text())
    assert result["config"]["data"].endswith("/fer2013") and result["train_images"] + result["val_images"] == 42
    assert result["test_images"] == 14
    assert {p.name for p in results.iterdir()} == {"cnn_bf16.json"}

    wrong = subprocess.run(["bash", script, "run", "cnn-fp16"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    assert wrong.returncode == 2 and "unknown step cnn-fp16" in wrong.stdout + wrong.stderr


def test_a_failing_torch_compile_is_reported_not_fatal(tmp_path, monkeypatch, capsys):
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    import throughput

    def broken(*args):  # what torch.compile returns here: the compiled step's forward and loss
        raise RuntimeError("backend exploded\nmore lines")

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda function, mode=None: compiled.append(mode) or broken)
    monkeypatch.setenv("FER_EXP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    code = throughput.main(["--data", "synthetic:64,16,16", "--batches", "1", "--batch-size", "16", "--eval-batch-size", "16",
                            "--rounds", "1", "--workers", "0", "--skip-resnet", "--skip-ablations",
                            "--compile", "default", "reduce-overhead", "--json"])
    assert code == 0 and compiled == ["default", "reduce-overhead"]
    results = json.loads(capsys.readouterr().out)
    assert results["compile"] == {"torch.compile default": "failed: RuntimeError: backend exploded",
                                  "torch.compile reduce-overhead": "failed: RuntimeError: backend exploded"}
    assert results["images_per_second"]["cnn ablations"]["torch.compile default"]["train"] == 0
    assert results["images_per_second"]["cnn"]["fer-exp"]["train"] > 0


def test_throughput_sets_the_compiled_step_against_the_conventional_pipeline(tmp_path, monkeypatch, capsys):
    """The issue's goal is a ratio within one benchmark run: the compiled fer-exp step's train img/s over
    the conventional pipeline's (and over the eager compute bound's). Here torch.compile is the identity."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    import throughput

    monkeypatch.setattr(torch, "compile", lambda function, mode=None: function)
    monkeypatch.setenv("FER_EXP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    code = throughput.main(["--data", "synthetic:64,16,16", "--batches", "1", "--batch-size", "16", "--eval-batch-size", "16",
                            "--rounds", "1", "--workers", "0", "--skip-resnet", "--skip-ablations",
                            "--compile", "reduce-overhead", "--json"])
    assert code == 0
    ratios = json.loads(capsys.readouterr().out)["ratios"]
    assert ratios["cnn train torch.compile reduce-overhead/conventional"] > 0
    assert ratios["cnn train torch.compile reduce-overhead/compute bound"] > 0


def test_profile_step_reports_where_a_step_s_time_goes(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "profile_step.py"), "--data", "synthetic:64,16,16",
           "--set", "batch_size=16", "--set", "aug_shift=0.1", "--steps", "2", "--warmup", "1", "--top", "5",
           "--json", str(tmp_path / "p.json")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, FER_EXP_CACHE_DIR=str(tmp_path / "cache")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "p.json").read_text())
    fer, bound = result["fer-exp"], result["compute bound"]
    assert result["config"]["aug_shift"] == 0.1 and result["batch_size"] == 16
    # the real step runs the augmentation and the gather on top of the compute bound's model step
    assert fer["aten_ops_per_step"] > bound["aten_ops_per_step"] > 50
    assert fer["device_busy_ms_per_step"] is None and fer["kernel_launches_per_step"] == 0  # no CUDA here
    assert "fer-exp        wall" in proc.stdout and "by self_cpu_time_total" in proc.stdout
    bad = subprocess.run(cmd[:-2] + ["--set", "epochz=3"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "epochz" in bad.stderr


def test_gpu_check_skips_what_the_deadline_leaves_no_time_for(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, FER_GPU_DATA="synthetic:64,16,16", FER_GPU_DEADLINE="0")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("throughput", "cnn_bf16", "cnn_fp32", "resnet18_112", "resnet18_224", "compile-default",
                 "compile-max-autotune"):  # a process and a limit per compile mode
        assert f"== {name} skipped" in proc.stdout
    assert "cnn_bf16: no result" in proc.stdout


@pytest.mark.slow
def test_gpu_check_copies_step_trains_best_cnn_with_and_without_the_copies(tmp_path):
    """The copies measurement, on the CPU with one seed: best_cnn.yaml with duplicates report, drop, and drop
    at copy_correlation 0.95, in parallel, each an export that experiments/copies_cnn.yaml's arms match."""
    out = tmp_path / "out"
    temp = tmp_path / "temp"  # the script's and the benchmarks' temporary folders: none may be left behind
    temp.mkdir()
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, FER_EXP_CACHE_DIR=str(tmp_path / "cache"), TMPDIR=str(temp),
               FER_GPU_DATA="synthetic:64,16,16", FER_GPU_SET="batch_size=16 eval_batch_size=16",
               FER_GPU_COPIES_SEEDS="7", FER_GPU_BEST_SETS="--set epochs=1")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "run", "copies"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = unpacked_results(out, tmp_path / "results")
    settings = {"report": ("report", 1.0), "drop": ("drop", 1.0), "drop-near": ("drop", 0.95)}
    assert {p.name for p in results.glob("*.json")} == {f"copies_{s}_seed7.json" for s in settings}
    for setting, (duplicates, correlation) in settings.items():
        run = json.loads((results / f"copies_{setting}_seed7.json").read_text())
        assert run["config"]["duplicates"] == duplicates and run["config"]["class_weights"] == "none"
        assert run["config"]["copy_correlation"] == correlation
        assert run["config"]["seed"] == 7 and run["duplicates_dropped"] == ({} if setting == "report" else {"train": 0, "val": 0})
    assert "0 of 3 runs failed" in proc.stdout + proc.stderr and "copies_drop-near_seed7" in (out / "summary.txt").read_text()
    unknown = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "run", "copies"], cwd=tmp_path,
                             env={**env, "OUT": str(tmp_path / "out2"), "FER_GPU_COPIES_SETTINGS": "report dorp"},
                             capture_output=True, text=True, timeout=600)
    assert unknown.returncode != 0 and "unknown setting 'dorp'" in unknown.stdout + unknown.stderr
    assert {p.name for p in out.glob("runs.tar.gz.part*")} == {"runs.tar.gz.part00"}


def test_gpu_check_accuracy_step_runs_its_arms_in_parallel_with_tta(tmp_path):
    """The accuracy issue's device measurement, on the CPU with two arms and one seed of best_cnn.yaml."""
    out = tmp_path / "out"
    temp = tmp_path / "temp"  # the script's and the benchmarks' temporary folders: none may be left behind
    temp.mkdir()
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, FER_EXP_CACHE_DIR=str(tmp_path / "cache"), TMPDIR=str(temp),
               FER_GPU_DATA="synthetic:64,16,16", FER_GPU_EPOCHS="1", FER_GPU_SET="batch_size=16 eval_batch_size=16",
               FER_GPU_ABLATIONS="recipe: ema-shift:ema_decay=0.9,aug_shift=0.1", FER_GPU_BEST_SEEDS="7",
               FER_GPU_BEST_SETS="--set epochs=1")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "run", "accuracy"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert {p.name for p in out.iterdir()} == {"log.txt", "summary.txt", "results.tar.gz", "runs.tar.gz.part00"}
    results = unpacked_results(out, tmp_path / "results")
    assert {p.name for p in results.glob("*.json")} == {"ablation_recipe.json", "ablation_ema-shift.json",
                                                        "best_cnn_seed7.json"}
    arm = json.loads((results / "ablation_ema-shift.json").read_text())
    assert arm["config"]["ema_decay"] == 0.9 and arm["config"]["aug_shift"] == 0.1 and arm["amp"] == "fp32"
    assert set(arm["tta"]) == {"none", "flip", "tencrop"} and 0 <= arm["tta"]["tencrop"]["test_accuracy"] <= 1
    best = json.loads((results / "best_cnn_seed7.json").read_text())
    assert best["config"]["seed"] == 7 and best["config"]["class_weights"] == "none" and best["epochs_run"] == 1
    assert best["config"]["tta"] == "auto"
    assert "0 of 2 runs failed" in proc.stdout + proc.stderr and "ablation_ema-shift" in (out / "summary.txt").read_text()

    # the finished runs come back in parts; where MLflow is, the study tracks them (test evaluated here)
    parts = sorted(out.glob("runs.tar.gz.part*"))
    runs = tmp_path / "runs"
    runs.mkdir()
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts)), mode="r:gz") as tar:
        tar.extractall(runs, filter="data")
    assert {p.name for p in runs.glob("*.pt")} == {"ablation_recipe.pt", "ablation_ema-shift.pt", "best_cnn_seed7.pt"}
    study_file = tmp_path / "study.yaml"
    study_file.write_text(f"experiment_name: gpu_runs\nseeds: [42]\narms:\n  recipe: {{config: {REPO}/experiments/cnn.yaml}}\n"
                          f"  ema-shift: {{config: {REPO}/experiments/cnn.yaml, set: {{ema_decay: 0.9, aug_shift: 0.1}}}}\n"
                          f"  best: {{config: {REPO}/experiments/best_cnn.yaml}}\n")
    env = dict(env, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    same = ["--data", "synthetic:64,16,16", "--amp", "off", "--batch-size", "16", "--import", str(runs)]

    def study(*args):
        return subprocess.run([sys.executable, "-m", "fer_exp.cli", "study", str(study_file), *args, *same,
                               "--output", str(tmp_path / "report")], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)

    ablations = study("--epochs", "1", "--early-stopping", "0")
    assert ablations.returncode == 0, ablations.stdout[-3000:] + ablations.stderr[-3000:]
    assert "recipe               seed 42     imported from" in ablations.stdout
    assert "ema-shift            seed 42     imported from" in ablations.stdout
    assert "best_cnn_seed7.pt: no run of the study has its config; the closest, best seed 42, differs in" in ablations.stdout
    assert "seed: 7 there, 42 here" in ablations.stdout
    assert "1 run(s) still to make" in ablations.stdout and "| recipe | 1 |" in ablations.stdout
    best = study("--arms", "best", "--seeds", "7", "--epochs", "1")
    assert best.returncode == 0, best.stdout[-3000:] + best.stderr[-3000:]
    assert "best                 seed 7      imported from" in best.stdout and "| best | 1 |" in best.stdout

    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    [run] = client.search_runs([client.get_experiment_by_name("gpu_runs").experiment_id],
                               filter_string="tags.arm = 'ema-shift'")
    trained = json.loads((results / "ablation_ema-shift.json").read_text())
    assert run.info.status == "FINISHED" and run.data.params["config.ema_decay"] == "0.9"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == trained["val_accuracy"]
    assert run.data.metrics["test_accuracy"] == pytest.approx(trained["test_accuracy"], abs=0.07)  # 1 of 16 may flip
    assert run.data.tags["test_accuracy_where_trained"] == str(trained["test_accuracy"])
    assert run.data.tags["test_tta"] == run.data.tags["test_tta_where_trained"] == "none"  # cnn.yaml's
    [best_run] = client.search_runs([run.info.experiment_id], filter_string="tags.arm = 'best'")
    # best_cnn.yaml's tta: auto, chosen again here on val (it was chosen there too)
    scores = {t: best_run.data.metrics[f"val_accuracy_tta_{t}"] for t in ("none", "flip", "tencrop")}
    assert best_run.data.tags["test_tta"] == max(scores, key=scores.get)
    assert best_run.data.tags["test_tta_where_trained"] in scores
    again = study("--epochs", "1", "--early-stopping", "0", "--dry-run")
    assert again.returncode == 0 and again.stdout.count("made already") == 2 and "would be imported" not in again.stdout


def test_pruning_replay_feeds_a_finished_study_through_the_pruners(tmp_path):
    """Two learning trials, then two flat ones: median pruning with warmup 1 stops the flat ones at
    epoch 2 and keeps the best; the table says so."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="none", storage=storage, direction="maximize")
    for curve in ([0.2, 0.4, 0.6, 0.7], [0.2, 0.5, 0.6, 0.8], [0.3, 0.1, 0.1, 0.1], [0.1, 0.1, 0.2, 0.1]):
        trial = study.ask()
        for epoch, value in enumerate(curve, 1):
            trial.report(value, epoch)
        study.tell(trial, curve[-1])
    out = tmp_path / "replay.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pruning_replay.py"), "--storage", storage,
                           "--study", "none", "--json", str(out)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    table = json.loads(out.read_text())
    assert table["epochs"] == 16 and table["best"] == 0.8
    row = next(r for r in table["rows"] if r["pruner"] == "median startup 2 warmup 1")
    assert row["pruned_at"] == [2, 2] and row["epochs"] == 12 and row["best_lost"] == 0
    assert "median startup 2 warmup 1" in proc.stdout and "25% saved)" in proc.stdout
    missing = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pruning_replay.py"), "--storage", storage,
                              "--study", "nope"], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert missing.returncode == 2 and "no study 'nope'" in missing.stderr
    elsewhere = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pruning_replay.py"), "--storage",
                                f"sqlite:///{tmp_path / 'typo.db'}", "--study", "none"], capture_output=True, text=True,
                               timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert elsewhere.returncode == 2 and "no Optuna storage at" in elsewhere.stderr
    assert not (tmp_path / "typo.db").exists()  # no empty database left where the study is not
