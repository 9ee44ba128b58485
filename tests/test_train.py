"""fer_exp.train (the loop, schedules, checkpoints, callbacks) and fer_exp.metrics, plus `fer-exp train` errors.

Every training here is tiny (synthetic faces, 1-3 batches an epoch, CPU). Control-flow tests (early
stopping, best-epoch selection, callbacks that stop or raise) use ``ScriptedTrainer``, which skips the
optimisation and reads its validation metrics from a script, so that the outcome is known in advance.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
)
from sklearn.utils.class_weight import compute_class_weight

from fer_exp.classes import CLASS_NAMES, NUM_CLASSES
from fer_exp.config import TTA_CHOICES, ConfigError, load_config
from fer_exp.inference import predict_probabilities
from fer_exp.data import load_data
from fer_exp.metrics import classification_metrics, confusion_figure, per_class_table, report_text, score_text, uncopied_metrics
from fer_exp.train import (
    Callback,
    CheckpointWriteError,
    FitResult,
    Trainer,
    TrainingDiverged,
    class_weight_tensor,
    cpu_has_native_bf16,
    make_scheduler,
    resolve_amp,
    resolve_device,
)

DATA = "synthetic:96,32,32"
SMALL = "synthetic:32,16,16"
EPOCH_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "lr")
CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "epoch", "config"}
TIMING_KEYS = ("epoch_seconds", "epoch_overhead_seconds", "train_images_per_second")


def config(**overrides):
    base = dict(data=DATA, epochs=2, batch_size=32, device="cpu", amp="off", early_stopping=0)
    return load_config(overrides={**base, **overrides})


@pytest.fixture(scope="module")
def data():
    return load_data(DATA)


@pytest.fixture(scope="module")
def small():
    return load_data(SMALL)


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_fit_start(self, trainer):
        self.events.append(("start", trainer))

    def on_epoch_end(self, trainer, epoch, metrics):
        self.events.append(("epoch", epoch, dict(metrics)))

    def on_fit_end(self, trainer, result):
        self.events.append(("end", result))

    def kinds(self):
        return [e[0] for e in self.events]


class ScriptedTrainer(Trainer):
    """No optimisation; epoch k's validation metrics are ``script[k - 1]``; test is evaluated for real."""

    def __init__(self, *args, script, **kwargs):
        super().__init__(*args, **kwargs)
        self.script = script

    def train_epoch(self, max_batches=None):
        return {"train_loss": 1.0, "train_accuracy": 0.5, "epoch_seconds": 0.0, "train_images_per_second": 0.0}

    def evaluate(self, split, tta="none"):
        if split != "val":
            return super().evaluate(split, tta)
        row = self.script[self.epoch - 1]
        return {"val_loss": row.get("loss", 1.0), "val_accuracy": row.get("acc", 0.5),
                "val_macro_f1": row.get("f1", 0.5)}, None


def scripted(small, tmp_path, script, callbacks=(), **overrides):
    cfg = config(data=SMALL, batch_size=16, epochs=len(script), **overrides)
    return ScriptedTrainer(cfg, small, tmp_path, callbacks=callbacks, progress=False, script=script)


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ================================================================ metrics

LABELS = [0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4, 4, 5, 5, 6, 6, 6]
PREDS = [0, 0, 2, 1, 2, 6, 3, 3, 4, 3, 4, 0, 5, 3, 6, 6, 2]


def test_classification_metrics_match_sklearn():
    m = classification_metrics(LABELS, PREDS)
    labels = list(range(NUM_CLASSES))
    assert m["accuracy"] == pytest.approx(accuracy_score(LABELS, PREDS)) == pytest.approx(11 / 17)
    for average in ("macro", "weighted"):
        kw = dict(labels=labels, average=average, zero_division=0)
        assert m[f"{average}_precision"] == pytest.approx(precision_score(LABELS, PREDS, **kw))
        assert m[f"{average}_recall"] == pytest.approx(recall_score(LABELS, PREDS, **kw))
        assert m[f"{average}_f1"] == pytest.approx(f1_score(LABELS, PREDS, **kw))
    recall = recall_score(LABELS, PREDS, labels=labels, average=None, zero_division=0)
    f1 = f1_score(LABELS, PREDS, labels=labels, average=None, zero_division=0)
    for i, name in enumerate(CLASS_NAMES):
        assert m[f"acc_{name}"] == pytest.approx(recall[i])  # per-class accuracy is recall
        assert m[f"f1_{name}"] == pytest.approx(f1[i])
    assert m["acc_angry"] == pytest.approx(2 / 3) and m["acc_disgust"] == 1.0 and m["acc_happy"] == 0.75
    assert all(type(v) is float for v in m.values())


def test_classification_metrics_prefix_and_range():
    m = classification_metrics(np.array(LABELS), np.array(PREDS), prefix="val_")
    assert set(m) == {f"val_{k}" for k in classification_metrics(LABELS, PREDS)}
    assert all(0.0 <= v <= 1.0 for v in m.values())
    perfect = classification_metrics(LABELS, LABELS)
    assert perfect["accuracy"] == perfect["macro_f1"] == perfect["weighted_f1"] == 1.0


def test_a_class_with_no_faces_has_no_score_and_leaves_the_macro_averages():
    """Evaluated on faces of three classes, a model is scored on those three: the four absent classes read
    n/a (NaN), not 0%, and do not pull the macro averages down (they did: 7 classes averaged)."""
    labels = [0, 0, 3, 3, 3, 6, 6]
    preds = [0, 2, 3, 3, 6, 6, 6]
    m = classification_metrics(labels, preds)
    evaluated = dict(labels=[0, 3, 6], zero_division=0)
    assert m["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro", **evaluated))
    assert m["macro_recall"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["macro_f1"] > f1_score(labels, preds, labels=list(range(NUM_CLASSES)), average="macro", zero_division=0)
    assert m["weighted_f1"] == pytest.approx(f1_score(labels, preds, average="weighted", **evaluated))
    for name in ("disgust", "fear", "sad", "surprise"):
        assert math.isnan(m[f"acc_{name}"]) and math.isnan(m[f"f1_{name}"])
    assert m["acc_angry"] == 0.5 and m["acc_neutral"] == 1.0 and m["f1_happy"] == pytest.approx(0.8)
    table = per_class_table(labels, preds)
    assert table["accuracy"][1] is None and table["f1"][2] is None and table["support"][2] == 0
    assert table["precision"][2] == 0.0 and table["precision"][1] is None  # fear was predicted (wrongly), disgust never
    assert table["accuracy"][0] == 0.5 and len(table["precision"]) == NUM_CLASSES
    report = report_text(labels, preds)
    assert "no faces of disgust, fear, sad, surprise: left out of the averages" in report and "disgust" not in report.split("no faces")[0]
    assert "micro avg" not in report and re.search(r"accuracy +0\.7143 +7\n", report)  # 5 of 7, as scikit-learn lays it out
    assert "n/a" == score_text(m["acc_sad"]) and score_text(0.5) == "0.500"


def test_uncopied_metrics_score_only_the_faces_that_are_not_copies():
    copied = np.array([i % 3 == 0 for i in range(len(LABELS))])
    others = classification_metrics(np.array(LABELS)[~copied], np.array(PREDS)[~copied])
    m = uncopied_metrics(LABELS, PREDS, copied, "test_")
    assert m == {"test_accuracy_uncopied": others["accuracy"], "test_macro_f1_uncopied": others["macro_f1"]}
    assert m["test_accuracy_uncopied"] != classification_metrics(LABELS, PREDS)["accuracy"]
    assert uncopied_metrics(LABELS, PREDS, np.zeros(len(LABELS), bool), "test_") == {}  # no copies: the test's own
    assert uncopied_metrics(LABELS, PREDS, np.ones(len(LABELS), bool), "test_") == {}  # nothing left to score


def test_per_class_table_has_seven_rows():
    table = per_class_table(LABELS, PREDS)
    assert set(table) == {"class", "precision", "recall", "f1", "support", "accuracy"}
    assert all(len(column) == NUM_CLASSES for column in table.values())
    assert table["class"] == list(CLASS_NAMES)
    assert table["accuracy"] == table["recall"]
    p, r, f, s = precision_recall_fscore_support(LABELS, PREDS, labels=list(range(NUM_CLASSES)), zero_division=0)
    assert table["support"] == s.tolist() and sum(table["support"]) == len(LABELS)
    np.testing.assert_allclose(table["precision"], p)
    np.testing.assert_allclose(table["f1"], f)


def test_confusion_figure_two_matrix_axes():
    import matplotlib.figure
    import matplotlib.pyplot as plt

    fig = confusion_figure(LABELS, PREDS, title="T")
    try:
        assert isinstance(fig, matplotlib.figure.Figure)
        matrices = [ax for ax in fig.axes if ax.images]  # the other axes are the two colorbars
        assert len(matrices) == 2
        assert [ax.get_title() for ax in matrices] == ["T (counts)", "T (row-normalised)"]
        counts = np.asarray(matrices[0].images[0].get_array())
        np.testing.assert_array_equal(counts, confusion_matrix(LABELS, PREDS, labels=list(range(NUM_CLASSES))))
        normalised = np.asarray(matrices[1].images[0].get_array())
        np.testing.assert_allclose(normalised.sum(axis=1), np.ones(NUM_CLASSES))
        assert [t.get_text() for t in matrices[0].get_xticklabels()] == list(CLASS_NAMES)
    finally:
        plt.close(fig)


# ================================================================ class weights

def test_balanced_class_weights_equal_sklearn_when_all_present():
    labels = torch.tensor([0] * 10 + [1] * 2 + [2] * 5 + [3] * 20 + [4] * 7 + [5] * 3 + [6] * 9)
    weights = class_weight_tensor(labels, "balanced")
    assert weights.shape == (NUM_CLASSES,) and weights.dtype == torch.float32
    expected = compute_class_weight("balanced", classes=np.arange(NUM_CLASSES), y=labels.numpy())
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-6)


def test_balanced_class_weights_zero_for_absent_classes():
    labels = torch.tensor([0] * 6 + [2] * 3 + [3] * 12)
    weights = class_weight_tensor(labels, "balanced")
    assert weights[[1, 4, 5, 6]].tolist() == [0.0] * 4
    n = len(labels)  # the documented n / (classes * count), classes = 7
    np.testing.assert_allclose(weights[[0, 2, 3]].numpy(), [n / (7 * 6), n / (7 * 3), n / (7 * 12)], rtol=1e-6)


def test_starting_a_run_does_not_import_scikit_learn():
    # scikit-learn's import costs ~2 s of every start; it is imported at the first evaluation
    import subprocess
    import sys

    code = ("import sys, fer_exp.experiment, fer_exp.train, fer_exp.tracking, fer_exp.cli; "
            "from fer_exp.train import class_weight_tensor; import torch; "
            "class_weight_tensor(torch.tensor([0, 1, 1]), 'balanced'); "
            "print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_class_weights_none():
    assert class_weight_tensor(torch.tensor([0, 1, 2]), "none") is None


# ================================================================ schedules

def run_schedule(scheduler, epochs=3, steps=10, lr=0.01, **overrides):
    cfg = load_config(overrides=dict(scheduler=scheduler, epochs=epochs, lr=lr, **overrides))
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched, unit = make_scheduler(cfg, optimizer, steps)
    lrs = [optimizer.param_groups[0]["lr"]]  # lrs[i] is the LR of optimisation step i + 1
    if unit == "step":
        for _ in range(epochs * steps):
            optimizer.step()
            sched.step()
            lrs.append(optimizer.param_groups[0]["lr"])
    return sched, unit, lrs, optimizer


def test_cosine_with_warmup():
    lr = 0.01
    _, unit, lrs, _ = run_schedule("cosine", warmup_epochs=1)
    assert unit == "step"
    assert lrs[0] == pytest.approx(0.01 * lr)  # warmup starts at 1% of lr ...
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:11]))  # ... rises ...
    assert lrs[10] == pytest.approx(lr) and max(lrs) == pytest.approx(lr)  # ... to lr after one epoch
    assert all(b <= a + 1e-12 for a, b in zip(lrs[10:], lrs[11:]))  # then cosine decay ...
    assert lrs[30] == pytest.approx(0.01 * lr)  # ... to 1% of lr
    assert lrs[29] < 0.02 * lr and min(lrs) >= 0.01 * lr - 1e-12
    assert lrs[20] == pytest.approx((lr + 0.01 * lr) / 2, rel=1e-3)  # half way through the cosine


def test_cosine_without_warmup_and_with_too_long_warmup():
    lr = 0.01
    _, _, lrs, _ = run_schedule("cosine", warmup_epochs=0)
    assert lrs[0] == pytest.approx(lr)
    assert all(b <= a + 1e-12 for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(0.01 * lr)
    _, _, lrs, _ = run_schedule("cosine", warmup_epochs=0.5)
    assert lrs[0] == pytest.approx(0.01 * lr) and lrs[5] == pytest.approx(lr)
    _, _, lrs, _ = run_schedule("cosine", warmup_epochs=10)  # longer than training: clipped, no error
    assert lrs[0] == pytest.approx(0.01 * lr) and max(lrs) == pytest.approx(lr)
    _, _, lrs, _ = run_schedule("cosine", epochs=1, steps=1)  # a single step
    assert lrs[0] == pytest.approx(lr)


def test_onecycle_peaks_at_lr():
    lr, total = 0.01, 30
    _, unit, lrs, _ = run_schedule("onecycle")
    assert unit == "step"
    used = lrs[:total]  # the LR of each of the total optimisation steps
    assert max(used) == pytest.approx(lr)
    peak = int(np.argmax(used))
    assert 0.2 * total <= peak <= 0.4 * total
    assert used[0] == pytest.approx(lr / 25)
    assert used[-1] < lr / 1000
    assert all(b >= a for a, b in zip(used[:peak], used[1:peak + 1]))
    assert all(b <= a for a, b in zip(used[peak:], used[peak + 1:]))


@pytest.mark.parametrize("select, mode", [("val_loss", "min"), ("val_accuracy", "max"), ("val_macro_f1", "max")])
def test_plateau_is_per_epoch_and_follows_select_metric(select, mode):
    sched, unit, lrs, optimizer = run_schedule("plateau", select_metric=select)
    assert unit == "epoch" and lrs == [0.01]
    assert sched.mode == mode
    for epoch in range(4):  # the first value, then 3 without improvement (patience 3)
        sched.step(0.5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    sched.step(0.5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.005)
    better = 0.1 if mode == "min" else 0.9
    for _ in range(4):
        sched.step(better)
        better = better - 0.1 if mode == "min" else better + 0.01
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.005)


def test_no_scheduler():
    sched, unit, lrs, _ = run_schedule("none")
    assert sched is None and unit == "none" and lrs == [0.01]


# ================================================================ device and precision

def test_resolve_device_auto_is_cpu_here():
    if torch.cuda.is_available() or (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        pytest.skip("an accelerator is available")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_resolve_device_cuda_without_cuda(name):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device(name)


def test_resolve_amp():
    cpu = torch.device("cpu")
    assert resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    assert resolve_amp("auto", cpu) == (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert resolve_amp("off", torch.device("cuda")) is None
    assert resolve_amp("auto", torch.device("mps")) is None


# ================================================================ end to end

@pytest.fixture(scope="module")
def fitted(data, tmp_path_factory):
    """One real 2-epoch run (3 batches an epoch) on synthetic:96,32,32, with a recording callback."""
    folder = tmp_path_factory.mktemp("fit")
    cfg = config()
    recorder = Recorder()
    trainer = Trainer(cfg, data, folder, callbacks=[recorder], progress=False)
    result = trainer.fit()
    return cfg, trainer, result, recorder, folder


def test_fit_result_and_history(fitted):
    cfg, trainer, result, _, _ = fitted
    assert isinstance(result, FitResult)
    assert len(result.history) == cfg.epochs == 2
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert result.history is trainer.history
    for h in result.history:
        for key in ("train_accuracy", "val_accuracy", "val_macro_f1"):
            assert 0.0 <= h[key] <= 1.0, key
        for key in ("train_loss", "val_loss"):
            assert math.isfinite(h[key]) and h[key] > 0, key
        assert h["lr"] > 0 and h["epoch_seconds"] > 0 and h["train_images_per_second"] > 0
        assert h["epoch_overhead_seconds"] > 0  # the val pass and the checkpoints take time
    assert not result.stopped_early
    assert result.seconds >= result.loop_seconds > result.step_seconds == pytest.approx(
        sum(h["epoch_seconds"] for h in result.history))
    assert 0 < result.overhead_fraction < 1


def test_slow_work_around_the_steps_shows_in_the_overhead(small, tmp_path):
    class SlowLogging(Callback):
        def on_epoch_end(self, trainer, epoch, metrics):
            time.sleep(0.5)

    cfg = config(data=SMALL, batch_size=16, epochs=2)
    slow = Trainer(cfg, small, tmp_path / "slow", callbacks=[SlowLogging()], progress=False).fit()
    assert slow.loop_seconds - slow.step_seconds >= 1.0  # two epochs of 0.5 s logging
    # the share counts the callbacks' time (not a comparison with a quick run: on a loaded machine the
    # quick run's own share varies more than the sleep adds)
    assert slow.overhead_fraction >= 1.0 / slow.loop_seconds and slow.step_seconds > 0


def test_fit_lr_follows_the_schedule(fitted):
    cfg, trainer, result, _, _ = fitted
    assert trainer.steps_per_epoch == 3
    # the LR each epoch starts with (its first step's, as for the plateau schedule, which moves between
    # epochs): warmup (1 epoch) starts at 1% of lr, cosine at lr
    assert result.history[0]["lr"] == pytest.approx(0.01 * cfg.lr)
    assert result.history[1]["lr"] == pytest.approx(cfg.lr)


def test_fit_best_epoch_is_first_max_of_val_accuracy(fitted):
    _, _, result, _, _ = fitted
    values = [h["val_accuracy"] for h in result.history]
    assert result.best_epoch == 1 + int(np.argmax(values))
    assert result.best_value == max(values)


def test_checkpoints(fitted, data):
    cfg, trainer, result, _, folder = fitted
    assert result.best_checkpoint == folder / "best.pt" and result.last_checkpoint == folder / "last.pt"
    best, last = load_checkpoint(folder / "best.pt"), load_checkpoint(folder / "last.pt")
    for ckpt in (best, last):
        assert CHECKPOINT_KEYS <= set(ckpt)
        assert ckpt["config"] == cfg.to_dict()
        assert ckpt["scheduler"] is not None
    assert last["epoch"] == 2 and best["epoch"] == result.best_epoch
    assert best["best_value"] == result.best_value
    # the returned model holds the best weights (it was evaluated on test with them)
    assert same_weights(trainer.model.state_dict(), best["model"])
    assert {"best_epoch", "stale", "global_rng", "rng"} <= set(last)  # what an exact resume needs


class StopAfter(Callback):
    """Interrupts training after an epoch's checkpoint, as Ctrl-C or SIGTERM would at the next step."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, trainer, epoch, metrics):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def without_timing(history):
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history]


@pytest.mark.parametrize("levers", [{}, {"mixup_alpha": 0.4, "ema_decay": 0.9, "aug_shift": 0.1, "aug_scale": 0.1}],
                         ids=["recipe", "mixup-ema-shift-zoom"])
def test_an_interrupted_run_resumed_from_last_pt_ends_as_the_uninterrupted_one(data, tmp_path, levers):
    cfg = config(epochs=4, dropout=0.3, **levers)  # dropout and augmentation: both random streams must resume
    full_trainer = Trainer(cfg, data, tmp_path / "full", progress=False)
    full = full_trainer.fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, data, tmp_path / "cut", callbacks=[StopAfter(2)], progress=False).fit()
    trainer = Trainer(cfg, data, tmp_path / "cut", progress=False)
    trainer.restore(tmp_path / "cut" / "last.pt")
    assert trainer.epoch == 2
    resumed = trainer.fit()
    a, b = without_timing(full.history), without_timing(resumed.history)
    assert [h["epoch"] for h in b] == [1, 2, 3, 4]
    # its time is the whole run's: the steps of all four epochs, not of the two after the resume
    assert resumed.step_seconds == pytest.approx(sum(h["epoch_seconds"] for h in resumed.history), rel=1e-6)
    assert resumed.seconds >= resumed.loop_seconds >= resumed.step_seconds > 0
    for ha, hb in zip(a, b):
        assert ha.keys() == hb.keys() and all(abs(ha[k] - hb[k]) <= 1e-6 for k in ha), (ha, hb)
    assert resumed.best_epoch == full.best_epoch
    assert all(abs(full.test_metrics[k] - resumed.test_metrics[k]) <= 1e-6 for k in full.test_metrics)
    last_full = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    last_resumed = load_checkpoint(tmp_path / "cut" / "last.pt")["model"]
    assert all(torch.allclose(last_full[k].float(), last_resumed[k].float(), atol=1e-6) for k in last_full)


def test_a_resumed_run_keeps_its_best_epoch_and_early_stopping_count(small, tmp_path):
    script = [{"acc": 0.5}, {"acc": 0.6}, {"acc": 0.4}, {"acc": 0.3}, {"acc": 0.9}]
    full = scripted(small, tmp_path / "full", script, early_stopping=2).fit()
    assert (full.best_epoch, len(full.history)) == (2, 4)  # stopped at epoch 4: two epochs without a better one
    with pytest.raises(KeyboardInterrupt):
        scripted(small, tmp_path / "cut", script, callbacks=[StopAfter(3)], early_stopping=2).fit()
    trainer = scripted(small, tmp_path / "cut", script, early_stopping=2)
    trainer.restore(tmp_path / "cut" / "last.pt")
    resumed = trainer.fit()
    assert (resumed.best_epoch, len(resumed.history)) == (2, 4)
    assert load_checkpoint(tmp_path / "cut" / "best.pt")["epoch"] == 2  # epoch 3 did not overwrite it
    # on other faces (images added, relabelled, another folder): refused, not trained on silently
    other = scripted(dataclasses.replace(small, train=small.train.subset(torch.arange(len(small.train) - 1))),
                     tmp_path / "other", script, early_stopping=2)
    with pytest.raises(ValueError, match="its train split.s. held other faces or labels when it was interrupted"):
        other.restore(tmp_path / "cut" / "last.pt")


def test_a_stop_between_an_improving_epoch_s_two_renames_never_leaves_best_pt_ahead_of_last_pt(small, tmp_path,
                                                                                                 monkeypatch):
    """Epoch 2 improves: last.pt and best.pt are both replaced. A stop between the two renames used to
    leave best.pt at epoch 2 and last.pt at epoch 1; a resumed run that (on a non-deterministic GPU)
    no longer improved at epoch 2 kept best.pt's discarded weights and tested them."""
    script = [{"acc": 0.5}, {"acc": 0.6}, {"acc": 0.4}]
    real_replace, renames = os.replace, []

    def stop_at_the_second_rename_of_epoch_2(source, target):
        if Path(target).name in ("last.pt", "best.pt") and cut.epoch == 2:
            renames.append(Path(target).name)
            if len(renames) == 2:
                raise KeyboardInterrupt
        return real_replace(source, target)

    cut = scripted(small, tmp_path / "cut", script)
    monkeypatch.setattr(os, "replace", stop_at_the_second_rename_of_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    monkeypatch.setattr(os, "replace", real_replace)
    assert renames == ["last.pt", "best.pt"]  # last.pt first: it may run ahead of best.pt, not behind it
    trainer = scripted(small, tmp_path / "cut", script)
    trainer.restore(tmp_path / "cut" / "last.pt")
    assert load_checkpoint(tmp_path / "cut" / "best.pt")["epoch"] == trainer.best_epoch == trainer.epoch == 2
    assert not (tmp_path / "cut" / "best.pt.partial").exists()
    result = trainer.fit()
    assert result.best_epoch == 2 and load_checkpoint(tmp_path / "cut" / "best.pt")["epoch"] == 2


def test_a_best_pt_that_cannot_be_renamed_into_place_is_a_checkpoint_write_error(small, tmp_path, monkeypatch):
    """Not an OSError that the run took for a failing tracking store."""
    real_replace = os.replace

    def refused(source, target):
        if Path(target).name == "best.pt":
            raise PermissionError(13, "Permission denied")
        return real_replace(source, target)
    trainer = scripted(small, tmp_path, [{"acc": 0.5}])
    trainer.epoch, trainer.best_epoch = 1, 1
    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(CheckpointWriteError, match=r"best\.pt could not be written \(Permission denied\); make the folder"):
        trainer.save("last", also="best")


def test_a_last_pt_alone_resumes_where_it_is_the_best_epoch_and_says_so_where_best_pt_is_missing(small, tmp_path):
    """A last.pt downloaded from the run's artifacts without its best.pt: the test at the end failed
    with FileNotFoundError, after the resume had started."""
    for script, best_is_last in (([{"acc": 0.5}, {"acc": 0.6}], True), ([{"acc": 0.6}, {"acc": 0.5}], False)):
        folder, alone = tmp_path / f"full{best_is_last}", tmp_path / f"alone{best_is_last}"
        scripted(small, folder, script).fit()
        alone.mkdir()
        shutil.copyfile(folder / "last.pt", alone / "last.pt")
        trainer = scripted(small, alone, script)
        if best_is_last:
            trainer.restore(alone / "last.pt")
            result = trainer.fit()
            assert result.best_epoch == 2 and result.test_metrics and (alone / "best.pt").is_file()
        else:
            with pytest.raises(ValueError, match=r"best epoch's checkpoint \(.*best.pt, epoch 1\) is missing"):
                trainer.restore(alone / "last.pt")


def test_a_checkpoint_written_on_another_kind_of_device_resumes_with_its_stream_seeded_again(small, tmp_path, capsys):
    """A CUDA generator's state is 16 bytes (seed and offset), a CPU one's 5056: a run begun on a GPU could
    not be resumed on a CPU (set_state refused it). Now it resumes, and says it is not exact."""
    script = [{"acc": 0.5}, {"acc": 0.6}, {"acc": 0.7}]
    with pytest.raises(KeyboardInterrupt):
        scripted(small, tmp_path, script, callbacks=[StopAfter(2)]).fit()
    state = load_checkpoint(tmp_path / "last.pt")
    state["rng"] = torch.tensor([42, 0, 0, 0, 0, 0, 0, 0, 128, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)  # CUDA's form
    torch.save(state, tmp_path / "last.pt")
    trainer = scripted(small, tmp_path, script)
    trainer.restore(tmp_path / "last.pt")
    assert "written on another kind of device than cpu" in capsys.readouterr().err
    again = scripted(small, tmp_path, script)
    again.restore(tmp_path / "last.pt")
    assert torch.equal(trainer.generator.get_state(), again.generator.get_state())  # seeded again, reproducibly
    assert trainer.fit().best_epoch == 3


def test_test_metrics_and_probabilities(fitted, data):
    _, _, result, _, _ = fitted
    t = result.test_metrics
    for key in ("test_accuracy", "test_macro_f1", "test_weighted_f1", "test_macro_precision", "test_macro_recall",
                *(f"test_acc_{c}" for c in CLASS_NAMES)):
        assert 0.0 <= t[key] <= 1.0, key
    assert math.isfinite(t["test_loss"]) and t["test_loss"] > 0
    p = result.test_probabilities
    assert p.shape == (32, NUM_CLASSES)
    assert (p >= 0).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert t["test_accuracy"] == pytest.approx(float((p.argmax(1) == data.test.labels.numpy()).mean()))


def test_tta_auto_chooses_on_val_at_the_selected_epoch_and_tests_once_with_that(data, tmp_path, monkeypatch):
    trainer = Trainer(config(tta="auto"), data, tmp_path, progress=False)
    evaluated = []
    evaluate = trainer.evaluate
    monkeypatch.setattr(trainer, "evaluate", lambda split, tta="none": evaluated.append((split, tta)) or evaluate(split, tta))
    result = trainer.fit()
    after_the_epochs = evaluated[trainer.epoch:]  # each epoch's val pass is without TTA
    assert evaluated[:trainer.epoch] == [("val", "none")] * trainer.epoch
    assert after_the_epochs == [("val", "none"), ("val", "flip"), ("val", "tencrop"), ("test", result.tta)]
    assert set(result.tta_val) == set(TTA_CHOICES)
    assert result.tta_val["none"] == result.best_value  # the selected epoch's weights, loaded back
    for tta in TTA_CHOICES:  # each candidate's own val accuracy
        assert result.tta_val[tta] == pytest.approx(evaluate("val", tta)[0]["val_accuracy"])
    assert result.tta == max(result.tta_val, key=result.tta_val.get)
    metrics, probabilities = evaluate("test", result.tta)
    assert result.test_metrics == pytest.approx(metrics) and np.allclose(result.test_probabilities, probabilities)


@pytest.mark.parametrize("select, scores, chosen", [
    ("val_accuracy", {"none": 0.50, "flip": 0.70, "tencrop": 0.60}, "flip"),
    ("val_accuracy", {"none": 0.60, "flip": 0.60, "tencrop": 0.55}, "none"),  # a tie keeps the cheaper
    ("val_macro_f1", {"none": 0.50, "flip": 0.55, "tencrop": 0.58}, "tencrop"),
    ("val_loss", {"none": 1.10, "flip": 1.00, "tencrop": 1.20}, "flip"),  # the lowest loss
])
def test_tta_auto_picks_the_best_val_select_metric_and_never_looks_at_test(data, tmp_path, select, scores, chosen):
    class ValScored(Trainer):
        def evaluate(self, split, tta="none"):
            assert split == "val", "the choice looked at test"
            return {select: scores[tta]}, None

    trainer = ValScored(config(tta="auto", select_metric=select), data, tmp_path, progress=False)
    assert trainer.choose_tta() == (chosen, scores)


@pytest.mark.parametrize("tta", TTA_CHOICES)
def test_a_fixed_tta_is_what_test_is_evaluated_with(fitted, tta):
    cfg, trainer, *_ = fitted
    trainer.cfg = dataclasses.replace(cfg, tta=tta)
    try:
        metrics, probabilities, used, val = trainer.evaluate_selected()
    finally:
        trainer.cfg = cfg
    assert (used, val) == (tta, {})
    assert metrics == pytest.approx(trainer.evaluate("test", tta)[0])
    images, _ = trainer.splits["test"]
    expected, _ = predict_probabilities(trainer.eval_model, images, tta=tta, memory_format=trainer.memory_format)
    assert np.allclose(probabilities, expected, atol=1e-6)


def test_recording_callback(fitted):
    cfg, trainer, result, recorder, _ = fitted
    assert recorder.kinds() == ["start", "epoch", "epoch", "end"]
    assert recorder.events[0][1] is trainer
    epochs = [e for e in recorder.events if e[0] == "epoch"]
    assert [e[1] for e in epochs] == [1, 2]
    for (_, epoch, metrics), h in zip(epochs, result.history):
        assert set(EPOCH_KEYS) <= set(metrics)
        assert {k: metrics[k] for k in EPOCH_KEYS} == {k: h[k] for k in EPOCH_KEYS}
    assert recorder.events[-1][1] is result


# ================================================================ reproducibility

@pytest.fixture(scope="module")
def repeated(small, tmp_path_factory):
    """Three real 2-epoch runs (1 batch an epoch): seed 0, seed 0 again, seed 1."""
    runs = []
    for seed in (0, 0, 1):
        cfg = config(data=SMALL, batch_size=32, seed=seed)
        trainer = Trainer(cfg, small, tmp_path_factory.mktemp(f"seed{seed}"), progress=False)
        runs.append((trainer, trainer.fit()))
    return runs


def history_values(result):
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in result.history]


def test_same_seed_same_history_and_weights(repeated):
    (a, ra), (b, rb), _ = repeated
    assert history_values(ra) == history_values(rb)
    assert same_weights(a.model.state_dict(), b.model.state_dict())
    assert same_weights(load_checkpoint(ra.last_checkpoint)["model"], load_checkpoint(rb.last_checkpoint)["model"])
    np.testing.assert_array_equal(ra.test_probabilities, rb.test_probabilities)


def test_other_seed_differs(repeated):
    (a, ra), _, (c, rc) = repeated
    assert [h["train_loss"] for h in ra.history] != [h["train_loss"] for h in rc.history]
    assert not same_weights(load_checkpoint(ra.last_checkpoint)["model"], load_checkpoint(rc.last_checkpoint)["model"])


def test_same_seed_repeats_even_when_another_trainer_is_built_in_between(repeated, small, tmp_path):
    (_, ra), _, _ = repeated
    trainer = Trainer(config(data=SMALL, batch_size=32, seed=0), small, tmp_path / "a", progress=False)
    Trainer(config(data=SMALL, batch_size=32, seed=1), small, tmp_path / "b", progress=False)  # e.g. a sweep
    result = trainer.fit()
    assert history_values(result) == history_values(ra)


# ================================================================ callbacks and early stopping

class StopAt(Callback):
    def __init__(self, epoch):
        self.epoch, self.ended = epoch, False

    def on_epoch_end(self, trainer, epoch, metrics):
        if epoch == self.epoch:
            trainer.should_stop = True

    def on_fit_end(self, trainer, result):
        self.ended = True


class Pruned(Exception):
    pass


class RaiseAt(Callback):
    def __init__(self, epoch):
        self.epoch, self.ended = epoch, False

    def on_epoch_end(self, trainer, epoch, metrics):
        if epoch == self.epoch:
            raise Pruned(f"pruned at epoch {epoch}")

    def on_fit_end(self, trainer, result):
        self.ended = True


def test_callback_should_stop_ends_after_that_epoch(small, tmp_path):
    stop = StopAt(2)
    trainer = scripted(small, tmp_path, [{}] * 5, callbacks=[stop])
    result = trainer.fit()
    assert len(result.history) == 2 and trainer.epoch == 2
    assert result.stopped_early and stop.ended
    assert load_checkpoint(result.last_checkpoint)["epoch"] == 2


def test_callback_exception_propagates(small, tmp_path):
    recorder, prune = Recorder(), RaiseAt(2)
    trainer = scripted(small, tmp_path, [{}] * 5, callbacks=[prune, recorder])
    with pytest.raises(Pruned, match="pruned at epoch 2"):
        trainer.fit()
    assert len(trainer.history) == 2
    assert not prune.ended and "end" not in recorder.kinds()
    assert recorder.kinds() == ["start", "epoch"]  # the raising callback came first at epoch 2


def test_early_stopping_when_val_never_improves(small, tmp_path):
    trainer = scripted(small, tmp_path, [{"acc": 0.5}, {"acc": 0.4}, {"acc": 0.9}, {"acc": 0.9}, {"acc": 0.9}],
                       early_stopping=1)
    result = trainer.fit()
    assert len(result.history) == 2 < trainer.cfg.epochs
    assert result.stopped_early and result.best_epoch == 1 and result.best_value == 0.5
    assert load_checkpoint(result.best_checkpoint)["epoch"] == 1
    assert load_checkpoint(result.last_checkpoint)["epoch"] == 2


def test_early_stopping_patience_counts_since_last_improvement(small, tmp_path):
    accs = [0.5, 0.5, 0.7, 0.6, 0.6, 0.9, 0.9]  # equal is not better
    trainer = scripted(small, tmp_path, [{"acc": a} for a in accs], early_stopping=2)
    result = trainer.fit()
    assert [h["val_accuracy"] for h in result.history] == accs[:5]
    assert result.best_epoch == 3 and result.stopped_early


def test_no_early_stopping_when_zero(small, tmp_path):
    trainer = scripted(small, tmp_path, [{"acc": 0.5}] * 4, early_stopping=0)
    result = trainer.fit()
    assert len(result.history) == 4 and not result.stopped_early and result.best_epoch == 1


def test_early_stopping_with_real_training(small, tmp_path):
    """Real training, where val never improves after epoch 1 (the val accuracy is pinned)."""

    class Pinned(Trainer):
        def evaluate(self, split, tta="none"):
            metrics, p = super().evaluate(split, tta)
            if split == "val":
                metrics["val_accuracy"] = 0.5
            return metrics, p

    cfg = config(data=SMALL, batch_size=32, epochs=4, early_stopping=1)
    result = Pinned(cfg, small, tmp_path, progress=False).fit()
    assert len(result.history) == 2 and result.stopped_early and result.best_epoch == 1


@pytest.mark.parametrize(
    "select, best",
    [("val_loss", 2), ("val_accuracy", 4), ("val_macro_f1", 3)],
)
def test_select_metric_picks_best_epoch_from_history(small, tmp_path, select, best):
    script = [{"loss": 1.0, "acc": 0.9, "f1": 0.2}, {"loss": 0.6, "acc": 0.1, "f1": 0.3},
              {"loss": 0.8, "acc": 0.2, "f1": 0.8}, {"loss": 0.7, "acc": 0.95, "f1": 0.4}]
    trainer = scripted(small, tmp_path, script, select_metric=select)
    result = trainer.fit()
    values = [h[select] for h in result.history]
    expected = 1 + int(np.argmin(values) if select == "val_loss" else np.argmax(values))
    assert result.best_epoch == expected == best
    assert result.best_value == values[best - 1]
    ckpt = load_checkpoint(result.best_checkpoint)
    assert ckpt["epoch"] == best and ckpt["best_value"] == result.best_value


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_diverged_loss_stops_the_run_and_keeps_the_last_good_checkpoint(small, tmp_path, bad):
    trainer = scripted(small, tmp_path, [{"loss": 1.0}, {"loss": bad}, {"loss": 1.0}], select_metric="val_loss")
    with pytest.raises(TrainingDiverged, match=f"the val loss is {bad} at epoch 2: training diverged"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1  # the last good epoch, not overwritten
    assert len(trainer.history) == 1


def test_a_diverged_run_is_marked_failed_with_the_reason(small, store):
    import mlflow

    from fer_exp.experiment import run_experiment

    class Diverging(Callback):
        def on_epoch_end(self, trainer, epoch, metrics):
            trainer.train_epoch = lambda max_batches=None: {"train_loss": float("nan"), "train_accuracy": 0.0,
                                                            "epoch_seconds": 0.0, "train_images_per_second": 0.0}

    from fer_exp.data.dataset import Split

    cfg = config(data=SMALL, batch_size=16, epochs=3, output_dir=str(store / "out"), system_metrics=False)
    copied = dataclasses.replace(small, test=Split.concat([small.test, small.train.subset([0])]))  # a train face in test
    with pytest.raises(TrainingDiverged, match="train loss is nan at epoch 2"):
        run_experiment(cfg, [Diverging()], progress=False, log_model=False, data=copied)
    run = mlflow.MlflowClient().search_runs([mlflow.get_experiment_by_name(cfg.experiment_name).experiment_id])[0]
    assert run.info.status == "FAILED" and "training diverged" in run.data.tags["stop_reason"]
    assert run.data.tags["duplicates_test_in_train"] == "1 (0 labelled otherwise)"  # said with the run's data


@pytest.mark.parametrize("duplicates, correlation", [("report", 1.0), ("report", 0.97), ("drop", 1.0), ("drop", 0.97)])
def test_a_run_on_data_with_cross_split_copies(small, store, duplicates, correlation):
    """FER2013's copies (test faces whose pixels are in train): the run scores the test faces without a copy
    apart (test_accuracy_uncopied, the predictions' copied column), the same faces whether it trained on
    the copies or, with --duplicates drop, not; drop says how many it left out and names the run so. At
    --copy-correlation 0.97 a near-copy (a train face with a little noise) is a copy too."""
    import mlflow
    import pandas as pd

    from fer_exp.experiment import run_experiment

    lines = ["emotion,pixels,Usage"]
    for split, usage in ((small.train, "Training"), (small.val, "PublicTest"), (small.test, "PrivateTest")):
        for image, label in zip(split.images, split.labels.tolist()):
            lines.append(f"{label},{' '.join(map(str, image.flatten().tolist()))},{usage}")
    copies = [f"{int(small.train.labels[i])},{' '.join(map(str, small.train.images[i].flatten().tolist()))},PrivateTest"
              for i in (0, 5, 9)]
    noisy = (small.train.images[2].int() + torch.randint(-2, 3, (48, 48), generator=torch.Generator().manual_seed(0)))
    copies.append(f"{int(small.train.labels[2])},{' '.join(map(str, noisy.clamp(0, 255).flatten().tolist()))},PrivateTest")
    (store / "fer2013.csv").write_text("\n".join(lines + copies) + "\n")
    cfg = config(data=str(store / "fer2013.csv"), batch_size=16, epochs=1, duplicates=duplicates, system_metrics=False,
                 output_dir=str(store / "out"), copy_correlation=correlation)
    summary = run_experiment(cfg, progress=False, log_model=False)
    run = mlflow.get_run(summary.run_id)
    tags, metrics = run.data.tags, run.data.metrics
    predictions = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{summary.run_id}/test_predictions.csv"))
    logged = mlflow.artifacts.load_dict(f"runs:/{summary.run_id}/data_summary.json")
    near = correlation < 1
    assert run.data.params["config.duplicates"] == duplicates and tags["test_size"] == str(len(small.test) + 4)
    assert predictions["copied"].tolist() == [False] * len(small.test) + [True] * 3 + [near]  # as the source has them
    assert tags["copy_correlation"] == ("0.97" if near else "1")
    others = predictions[~predictions["copied"]]
    assert metrics["test_accuracy_uncopied"] == pytest.approx((others["label"] == others["prediction"]).mean())
    assert metrics["test_macro_f1_uncopied"] == pytest.approx(summary.result.test_metrics["test_macro_f1_uncopied"])
    if duplicates == "report":
        assert tags["duplicates_test_in_train"] == "3 (0 labelled otherwise)" and tags["train_size"] == str(len(small.train))
        assert logged["duplicates_dropped"] == {}
        assert run.info.run_name == f"cnn 48px lr=0.001 wd=0.0001 {'copies@0.97 ' if near else ''}seed42"
    else:
        dropped = 3 + near
        assert tags["duplicates_dropped_from_train"] == str(dropped) and tags["duplicates_dropped_from_val"] == "0"
        assert tags["train_size"] == str(len(small.train) - dropped)
        copying = "identical or correlating >= 0.97 with" if near else "identical to"
        assert tags["split_rule"].endswith(f"dropped {dropped} train face(s) {copying} a val or test face and 0 val "
                                           f"face(s) {copying} a test face (duplicates: drop)")
        assert not any(key.startswith("duplicates_test_in") for key in tags)  # none left to leak
        assert run.info.run_name == f"cnn 48px lr=0.001 wd=0.0001 no-copies{'@0.97' if near else ''} seed42"
        assert logged["duplicates_dropped"] == {"train": dropped, "val": 0} and logged["duplicates_across_splits"] == {}
        assert logged["copy_correlation"] == correlation and logged["faces_with_copies"]["test"] == dropped
        assert ("near_copies" in logged) == near


# ================================================================ resnet18 with frozen layers

def test_resnet18_frozen_layers_do_not_change(tmp_path):
    data = load_data("synthetic:16,8,8")  # one batch: resnet18 at 112 px is the slowest thing here
    cfg = config(model="resnet18", pretrained="none", input_size=112, freeze_depth=2, data="synthetic:16,8,8",
                 epochs=1, batch_size=16)
    trainer = Trainer(cfg, data, tmp_path, progress=False)
    # built in the mode it trains in, before the amp and compile measurements capture it on CUDA
    assert not trainer.model.backbone.bn1.training and trainer.model.backbone.layer2.training
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    frozen = ("backbone.conv1.", "backbone.bn1.", "backbone.layer1.")
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith(frozen) for n in trainable)
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(trainable)
    result = trainer.fit()
    assert len(result.history) == 1 and math.isfinite(result.history[0]["train_loss"])
    after = trainer.model.state_dict()
    for name, tensor in after.items():
        if name.startswith(frozen):  # weights and BatchNorm statistics alike
            assert torch.equal(tensor, before[name]), name
    assert not torch.equal(after["backbone.fc.weight"], before["backbone.fc.weight"])
    assert not torch.equal(after["backbone.layer2.0.conv1.weight"], before["backbone.layer2.0.conv1.weight"])
    assert not torch.equal(after["backbone.layer2.0.bn1.running_mean"], before["backbone.layer2.0.bn1.running_mean"])
    assert result.test_probabilities.shape == (8, NUM_CLASSES)


# ================================================================ `fer-exp train` errors

@pytest.fixture
def cli(store):
    from fer_exp.cli import main

    def invoke(*args):
        result = CliRunner().invoke(main, ["train", *args])
        return result, result.output

    return invoke


@pytest.mark.parametrize(
    "args, pieces",
    [
        (["--epochs", "abc"], ["epochs must be int", "'abc'"]),
        (["--epochs", "1.5"], ["epochs must be int"]),
        (["--model", "vgg"], ["model must be one of cnn, resnet18", "'vgg'"]),
        (["--input-size", "100"], ["input_size must be one of 0, 48, 64, 96, 112, 224"]),
        (["--config", "missing.yaml"], ["missing.yaml", "not found"]),
        (["--lr", "0"], ["lr must be positive"]),
        (["--model", "cnn", "--pretrained", "imagenet"], ["resnet18 only"]),
        (["--data", "/no/such/path", "--epochs", "1"], ["/no/such/path"]),
        (["--data", "synthetic:16,8,8", "--output-dir", "a-file/sub"], ["output_dir a-file/sub", "--output-dir"]),
    ],
)
def test_train_user_errors_exit_2_without_traceback(cli, tmp_path, args, pieces):
    (tmp_path / "a-file").write_text("not a folder")
    result, output = cli(*args)
    assert result.exit_code == 2, output
    assert isinstance(result.exception, SystemExit)
    assert "Error:" in output
    for piece in pieces:
        assert piece in output
    assert "Traceback" not in output
    assert not (tmp_path / "outputs").exists()


def test_an_unreachable_tracking_server_is_reported_in_seconds(cli, monkeypatch):
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://fer:pw-9z@127.0.0.1:{port}")
    start = time.time()
    result, output = cli("--data", "synthetic:16,8,8", "--epochs", "1")
    assert result.exit_code == 2 and f"the tracking server http://fer:***@127.0.0.1:{port} does not answer" in output
    assert time.time() - start < 30 and "pw-9z" not in output and "Traceback" not in output


def test_an_artifact_store_that_cannot_be_written_is_reported_before_training(cli, tmp_path):
    import os

    import mlflow

    (tmp_path / "a-file").write_text("not a folder")
    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    client.create_experiment("badart", artifact_location=str(tmp_path / "a-file" / "artifacts"))
    result, output = cli("--data", "synthetic:16,8,8", "--epochs", "1", "--experiment-name", "badart")
    assert result.exit_code == 2 and "keeps its artifacts in" in output and "cannot be written" in output, output
    assert "first training step" not in output
    assert not client.search_runs([client.get_experiment_by_name("badart").experiment_id])


def test_a_deleted_experiment_is_a_clear_error_before_training(cli, tmp_path):
    import os

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])  # the store the command uses
    client.delete_experiment(client.create_experiment("gone"))
    result, output = cli("--data", "synthetic:16,8,8", "--epochs", "1", "--experiment-name", "gone")
    assert result.exit_code == 2 and "Cannot set a deleted experiment 'gone'" in output, output
    assert "Traceback" not in output and "first training step" not in output
    assert not client.search_runs([client.get_experiment_by_name("gone").experiment_id])


def test_train_bad_yaml_exits_2(cli, tmp_path):
    (tmp_path / "bad.yaml").write_text("epoch: 3\n")
    result, output = cli("--config", "bad.yaml")
    assert result.exit_code == 2 and "unknown config key 'epoch'" in output and "Did you mean epochs" in output


@pytest.mark.slow
def test_cnn_learns_synthetic_faces_far_above_chance(tmp_path):
    """The synthetic faces are learnable: a few CPU epochs put the CNN far above chance (1/7)."""
    cfg = load_config(overrides={"data": "synthetic:1200,300,300", "epochs": 3, "batch_size": 32, "seed": 0})
    result = Trainer(cfg, load_data(cfg.data, seed=cfg.seed), tmp_path, progress=False).fit()
    assert result.test_metrics["test_accuracy"] > 0.35, result.history
    assert result.test_metrics["test_macro_f1"] > 0.25, result.history


# ================================================================ accuracy levers: mixup, EMA


def test_mixup_is_seeded_and_changes_training(data, tmp_path):
    runs = [Trainer(config(epochs=1, mixup_alpha=a), data, tmp_path / f"{a}-{i}", progress=False).fit(evaluate_test=False)
            for a, i in ((0.4, 0), (0.4, 1), (0.0, 0))]
    assert without_timing(runs[0].history) == without_timing(runs[1].history)
    assert runs[0].history[0]["train_loss"] != runs[2].history[0]["train_loss"]


def test_mixup_loss_is_the_weighted_loss_of_both_label_sets(data, tmp_path):
    import torch.nn.functional as F

    trainer = Trainer(config(class_weights="none"), data, tmp_path, progress=False)
    x = torch.rand(8, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    a, b = torch.arange(8) % 7, (torch.arange(8) + 3) % 7
    trainer.model.eval()  # no dropout, BatchNorm in eval: the forward is a pure function of the weights
    with torch.no_grad():
        logits = trainer.model(x)
    expected = 0.3 * F.cross_entropy(logits, a) + 0.7 * F.cross_entropy(logits, b)
    loss, _ = trainer.optimize(x, a, b, 0.3)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_ema_decay_warms_up_so_a_short_run_forgets_its_untrained_start():
    from fer_exp.train import ema_decay_at

    assert ema_decay_at(0.999, 0) == pytest.approx(0.1) and ema_decay_at(0.999, 90) == pytest.approx(0.91)
    assert ema_decay_at(0.999, 100_000) == 0.999
    # the weight left on the first (untrained) weights after 600 updates: without warm-up 0.999**600
    left = 1.0
    for t in range(600):
        left *= ema_decay_at(0.999, t)
    assert left < 0.02 and 0.999 ** 600 > 0.5


def test_ema_weights_are_the_moving_average_and_are_what_is_evaluated_and_saved(data, tmp_path):
    trainer = Trainer(config(ema_decay=0.5, epochs=4, early_stopping=0), data, tmp_path, progress=False)
    snapshots = []
    original = trainer.update

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        snapshots.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        return out

    trainer.update = recording
    result = trainer.fit()
    name = next(k for k in snapshots[0] if k.endswith("weight") and snapshots[0][k].ndim == 2)
    averages = [snapshots[0][name]]
    for t, snap in enumerate(snapshots[1:]):  # the first update copies; then ema = d ema + (1 - d) w
        d = min(0.5, (1 + t) / (10 + t))  # warm-up: 0.1, 0.18, 0.25, ... then 0.5 from the 9th update
        averages.append(d * averages[-1] + (1 - d) * snap[name])
    assert len(snapshots) == 4 * trainer.steps_per_epoch > 10  # the warm-up and the plain decay both ran
    expected = averages[result.best_epoch * trainer.steps_per_epoch - 1]  # the best epoch's EMA is kept
    assert torch.allclose(trainer.eval_model.state_dict()[name], expected, atol=1e-6)
    assert not torch.allclose(trainer.model.state_dict()[name], expected)
    # val/test are evaluated with the EMA, and a checkpoint loads for prediction as the EMA
    from fer_exp.inference import load_model

    loaded = load_model(str(result.best_checkpoint), device="cpu")
    _, probabilities = trainer.predict("test")
    np.testing.assert_allclose(loaded.predict(data.test.images)[0], probabilities, atol=1e-6)
    np.testing.assert_allclose(result.test_probabilities, probabilities, atol=1e-6)


def test_a_training_step_reads_nothing_back_from_the_device(data, tmp_path, monkeypatch):
    """A host read (bool, int, item of a tensor) waits for the device: an asynchronous step, a captured
    graph's above all, must not pay one. With every lever on (augmentation, mixup, EMA, schedule), a
    step makes none: the EMA counts its updates on the host (AveragedModel reads its counter every
    update), mixup draws its weight on the device; the checkpoint still holds the EMA's n_averaged."""
    levers = dict(ema_decay=0.9, mixup_alpha=0.2, aug_shift=0.1, aug_scale=0.1, label_smoothing=0.1)
    trainer = Trainer(config(**levers), data, tmp_path, progress=False)
    images, labels = (t[:32] for t in trainer.splits["train"])
    trainer.model.train()

    def host_read(*args):
        raise AssertionError("a training step read a tensor back to the host")

    with monkeypatch.context() as patched:
        for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
            patched.setattr(torch.Tensor, name, host_read)
        for _ in range(3):
            trainer.train_step(images, labels)
    assert trainer.ema.updates == 3 and int(trainer.ema.state_dict()["n_averaged"]) == 3
    restored = Trainer(config(**levers), data, tmp_path / "restored", progress=False)
    restored.ema.load_state_dict(trainer.ema.state_dict())
    assert restored.ema.updates == 3


@pytest.mark.parametrize("key,value,piece", [("aug_shift", 0.6, "between 0 and 0.5"), ("ema_decay", 1.0, "[0, 1)"),
                                             ("mixup_alpha", -1, "must not be negative")])
def test_lever_ranges_are_checked(key, value, piece):
    with pytest.raises(ConfigError, match=re.escape(piece)):
        config(**{key: value})


# ================================================================ precision by measurement, compiled step


def fake_clock(monkeypatch):
    """The clock fer_exp.device measures steps with, advanced only by the returned ``sleep``: timings
    exact to the microsecond however loaded the machine (real sleeps overshoot by milliseconds)."""
    import types

    import fer_exp.device

    now = [0.0]
    monkeypatch.setattr(fer_exp.device, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    return lambda seconds: now.__setitem__(0, now[0] + seconds)


def test_a_compiled_trainer_starts_from_dynamo_s_state_of_a_new_process(data, tmp_path, monkeypatch):
    """A tuning worker builds a trainer per trial: each compiled step would add Dynamo cache entries for
    the same code until its recompile limit made the step silently eager. A trainer that compiles resets
    Dynamo first; one that does not leaves it alone."""
    import torch._dynamo

    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    monkeypatch.setattr(torch, "compile", lambda function, mode=None: function)
    for trial in range(3):
        Trainer(config(compile="default"), data, tmp_path, progress=False)
    assert len(resets) == 3
    Trainer(config(compile="off"), data, tmp_path, progress=False)
    Trainer(config(compile="auto"), data, tmp_path, progress=False)  # CPU: auto is off
    assert len(resets) == 3


def test_measured_amp_picks_the_faster_keeps_fp32_when_close_and_caches(tmp_path, monkeypatch):
    from fer_exp.device import measured_amp

    monkeypatch.setenv("FER_EXP_CACHE_DIR", str(tmp_path))
    sleep = fake_clock(monkeypatch)
    calls = []

    def step_with(fp32_ms, bf16_ms):
        def step(dtype):
            calls.append(dtype)
            sleep((bf16_ms if dtype is torch.bfloat16 else fp32_ms) / 1000)
        return step

    cpu = torch.device("cpu")
    assert measured_amp(cpu, step_with(20, 2), "fast bf16", repeats=2)[0] is torch.bfloat16
    assert measured_amp(cpu, step_with(2, 20), "fast fp32", repeats=2)[0] is None
    assert measured_amp(cpu, step_with(60, 59.5), "close", repeats=3)[0] is None  # not 5% faster: fp32
    calls.clear()
    dtype, report = measured_amp(cpu, step_with(2, 20), "fast bf16", repeats=2)
    assert dtype is torch.bfloat16 and report.endswith("(cached)") and calls == []  # kept, not measured again
    assert set(json.loads((tmp_path / "amp.json").read_text())) == {"fast bf16", "fast fp32", "close"}


def test_measuring_amp_leaves_the_run_untouched(data, tmp_path, monkeypatch):
    """The measurement trains a copy under a forked RNG: weights, BatchNorm statistics and the
    random streams of the run are as before, so a measured run and a cached one train alike."""
    monkeypatch.setenv("FER_EXP_CACHE_DIR", str(tmp_path / "cache"))
    trainer = Trainer(config(batch_size=8), data, tmp_path, progress=False)  # small steps: a quick measurement
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rng = torch.get_rng_state()
    dtype, report = trainer.measure_amp()
    assert report.startswith("measured ") and dtype in (None, torch.bfloat16)
    assert same_weights(before, trainer.model.state_dict()) and torch.equal(rng, torch.get_rng_state())
    assert "(cached)" in trainer.measure_amp()[1]


def test_measured_compile_keeps_its_paid_compilation_and_weighs_later_runs_against_a_warm_compile(tmp_path, monkeypatch):
    import torch._dynamo

    from fer_exp.device import measured_compile

    monkeypatch.setenv("FER_EXP_CACHE_DIR", str(tmp_path))
    sleep = fake_clock(monkeypatch)
    calls, resets = [], []
    compile_seconds = {"now": 0.6}  # the first call of a compilation compiles: cold, then warm after a reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(len(calls)) or compile_seconds.update(now=0.1))

    def eager():
        calls.append("eager")
        sleep(0.02)

    def compile_step():
        first = [True]

        def compiled():
            calls.append("compiled")
            sleep(compile_seconds["now"] if first[0] else 0.005)
            first[0] = False
        return compiled

    cpu = torch.device("cpu")
    pays, report = measured_compile(cpu, eager, compile_step, "cnn", total_steps=10, repeats=3)
    # the measuring run has paid both compilations: it keeps the compiled step although 10 steps save ~0.15 s
    assert pays and report.startswith("measured reduce-overhead") and "(after a reset), paid here" in report
    assert calls.count("eager") == 4 and calls.count("compiled") == 2 + 2 + 4 and len(resets) == 1
    entry = json.loads((tmp_path / "compile.json").read_text())["cnn"]
    assert entry["eager_ms"] > 3 * entry["compiled_ms"]
    assert 0.5 < entry["compile_seconds"] < 2 and 0.05 < entry["warm_compile_seconds"] < 0.5
    # later runs (cached, nothing measured again): the saving over the run against the warm compile
    calls.clear()
    pays, report = measured_compile(cpu, eager, compile_step, "cnn", total_steps=1, repeats=3)
    assert not pays and report.startswith("cached off") and calls == []  # ~15 ms saved < the warm compile
    # a run it pays for compiles at once (its first two calls) and keeps what that took: a new process
    # pays set-up that a reset does not (here 0.4 s against the reset's 0.1 s)
    resets.clear()
    compile_seconds["now"] = 0.4
    pays, report = measured_compile(cpu, eager, compile_step, "cnn", total_steps=40, repeats=3)  # saves ~0.6 s
    assert pays and report.startswith("cached reduce-overhead") and calls == ["compiled"] * 2 and not resets
    assert "0.1 s warm (after a reset), here 0.4 s" in report
    later = json.loads((tmp_path / "compile.json").read_text())["cnn"]
    assert later == dict(entry, observed_warm_seconds=later["observed_warm_seconds"])
    assert len(later["observed_warm_seconds"]) == 1 and 0.35 < later["observed_warm_seconds"][0] < 0.6
    pays, report = measured_compile(cpu, eager, compile_step, "cnn", total_steps=20, repeats=3)
    assert not pays and "0.4 s warm (median of 1 run(s))" in report  # ~0.3 s saved: now too short
    # one compile made cold again (inductor's cache wiped) does not stick: the median of the runs decides
    compile_seconds["now"] = 3.0
    assert measured_compile(cpu, eager, compile_step, "cnn", total_steps=400, repeats=3)[0]  # ~6 s saved > 0.4 s
    compile_seconds["now"] = 0.4
    saving = 160 * (entry["eager_ms"] - entry["compiled_ms"]) / 1e3  # ~2.4 s: under the 3 s, over the median
    assert 1.8 < saving < 2.9
    pays, report = measured_compile(cpu, eager, compile_step, "cnn", total_steps=160, repeats=3)
    assert pays and "warm (median of 2 run(s))" in report
    # a compiled step that is not faster is never taken, however long the run
    (tmp_path / "compile.json").write_text(json.dumps({"cnn": dict(entry, compiled_ms=entry["eager_ms"])}))
    assert not measured_compile(cpu, eager, compile_step, "cnn", total_steps=10**9, repeats=3)[0]
    # an entry from before the warm compile was measured is measured again
    (tmp_path / "compile.json").write_text(json.dumps({"cnn": {"eager_ms": 20.0, "compiled_ms": 5.0, "compile_seconds": 0.6}}))
    assert measured_compile(cpu, eager, compile_step, "cnn", total_steps=1, repeats=3)[1].startswith("measured")
    assert "warm_compile_seconds" in json.loads((tmp_path / "compile.json").read_text())["cnn"]


class FakeCompiled:
    """torch.compile's stand-in: the function run eagerly (BatchNorm statistics and dropout's random
    stream are used as by a real compiled step), or a compiler that fails."""

    def __init__(self, function, fail=False):
        self.inner, self.fail = function, fail

    def __call__(self, *args):
        if self.fail:
            raise RuntimeError("no backend for this device")
        return self.inner(*args)


def test_auto_compile_is_off_on_the_cpu_and_measured_on_the_run_s_own_model(data, tmp_path, monkeypatch):
    monkeypatch.setenv("FER_EXP_CACHE_DIR", str(tmp_path / "cache"))
    trainer = Trainer(config(batch_size=8), data, tmp_path, progress=False)  # small steps: a quick measurement
    assert config().compile == "auto" and trainer.forward_loss == trainer.augmented_loss
    assert trainer.compile_report == "auto: off (not CUDA)"
    monkeypatch.setattr(torch, "compile", lambda function, mode=None: FakeCompiled(function))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rng = torch.get_rng_state()
    forward, report = trainer.measure_compile()
    assert report.startswith("auto: measured") and "ms a step" in report
    # the measurement's forward/backward passes left no trace: weights, BatchNorm statistics, random streams
    assert same_weights(before, trainer.model.state_dict()) and torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in trainer.model.parameters())
    # the choice is per run, from the cached measurement: a long run takes the compiled forward, a short one not
    cache = tmp_path / "cache" / "compile.json"
    entries = json.loads(cache.read_text())
    key = next(iter(entries))
    cache.write_text(json.dumps({key: {"eager_ms": 10.0, "compiled_ms": 2.0, "compile_seconds": 90.0,
                                       "warm_compile_seconds": 30.0}}))
    forward, report = trainer.measure_compile()  # 2 epochs x 6 steps: saves 0.1 s < 30 s
    assert forward == trainer.augmented_loss and report.startswith("auto: cached off")
    trainer.cfg = dataclasses.replace(trainer.cfg, epochs=100_000)  # saves 8 ms x epochs x steps_per_epoch > 30 s
    forward, report = trainer.measure_compile()
    assert isinstance(forward, FakeCompiled) and report.startswith("auto: cached reduce-overhead")
    # where the measuring run finds the compiled step faster, it keeps the compilation it made last (after
    # the reset), not a third one
    made = []
    monkeypatch.setattr(torch, "compile", lambda function, mode=None: made.append(FakeCompiled(function)) or made[-1])

    def faster(device, eager_step, compile_step, key, total_steps):
        for _ in range(2):
            compile_step()()
        return True, "measured reduce-overhead"
    monkeypatch.setattr("fer_exp.train.measured_compile", faster)
    forward, report = trainer.measure_compile()
    assert len(made) == 2 and forward is made[1] and report == "auto: measured reduce-overhead"


def test_a_compiler_that_fails_leaves_auto_eager_and_says_why(data, tmp_path, monkeypatch):
    monkeypatch.setenv("FER_EXP_CACHE_DIR", str(tmp_path / "cache"))
    trainer = Trainer(config(batch_size=8), data, tmp_path, progress=False)  # small steps: a quick measurement
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    monkeypatch.setattr(torch, "compile", lambda function, mode=None: FakeCompiled(function, fail=True))
    forward, report = trainer.measure_compile()
    assert forward == trainer.augmented_loss and "compiling failed: RuntimeError: no backend" in report
    assert same_weights(before, trainer.model.state_dict())


@pytest.mark.slow
def test_compiled_step_captures_augmentation_forward_and_loss_and_matches_eager(data, tmp_path):
    """compile=default on the CPU (torch.compile of the step's augmentation, forward and loss, and so
    of its backward): from the same draws the same loss, hits and gradients as eager, and the same run
    within float tolerance; checkpoints keep the plain module's keys."""
    levers = dict(epochs=1, dropout=0.0, aug_shift=0.1, aug_scale=0.1)  # every augmentation, no dropout mask
    eager = Trainer(config(**levers, compile="off"), data, tmp_path / "eager", progress=False)
    compiled = Trainer(config(**levers, compile="default"), data, tmp_path / "compiled", progress=False)
    assert eager.forward_loss == eager.augmented_loss and compiled.forward_loss != compiled.augmented_loss
    images, labels = (t[:32] for t in eager.splits["train"])
    draws = eager.augment.draw(32, eager.device, torch.Generator().manual_seed(0))
    steps = []
    for trainer in (eager, compiled):
        trainer.model.train()
        loss, hits = trainer.forward_loss(images, labels, draws)
        loss.backward()
        steps.append((loss.item(), int(hits), [p.grad.clone() for p in trainer.model.parameters()]))
        trainer.model.zero_grad(set_to_none=True)
    # hits: one of 32 may flip where two logits are within float noise of each other
    assert steps[1][0] == pytest.approx(steps[0][0], abs=1e-5) and abs(steps[1][1] - steps[0][1]) <= 1
    # fused kernels sum in another order and BatchNorm in training amplifies it: within 5% in norm
    # (measured 0.1-1.2% with 1 or 2 threads; a step that augments or mixes differently is off by far
    # more, and its loss by more than 1e-5). The conv biases before BatchNorm have gradients of ~1e-7,
    # float noise: the 1e-5 floor covers them.
    for grad_eager, grad_compiled in zip(steps[0][2], steps[1][2], strict=True):
        assert (grad_compiled - grad_eager).norm() <= 5e-2 * grad_eager.norm() + 1e-5
    runs = [trainer.fit(evaluate_test=False) for trainer in (eager, compiled)]
    for key in ("train_loss", "val_loss"):
        assert runs[1].history[0][key] == pytest.approx(runs[0].history[0][key], abs=1e-3), key
    one_image = 1 / len(eager.splits["val"][1])  # a prediction whose two top logits are within float noise
    assert runs[1].history[0]["val_accuracy"] == pytest.approx(runs[0].history[0]["val_accuracy"], abs=one_image + 1e-9)
    assert not any(k.startswith("_orig_mod") for k in load_checkpoint(runs[1].last_checkpoint)["model"])


def test_a_stop_asked_while_the_data_loads_makes_no_run(store, capfd):
    """Ctrl-C or SIGTERM while the data decodes: the command stops before a run is made (it made one, then
    marked it KILLED); the first signal is acknowledged at once, with what a second one does."""
    import os
    import signal

    import mlflow

    from fer_exp import train
    from fer_exp.experiment import run_experiment

    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    train.stop_on_signals()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # handled: asks to stop, says so
        assert "SIGTERM: stopping at the next safe point" in capfd.readouterr().err  # (written to fd 2)
        cfg = load_config(overrides={"data": "synthetic:32,8,8", "epochs": 1, "device": "cpu", "system_metrics": False,
                                     "output_dir": str(store / "out")})
        with pytest.raises(KeyboardInterrupt):
            run_experiment(cfg, progress=False)
    finally:
        train._stop_requested.clear()
        for number, handler in previous.items():
            signal.signal(number, handler)
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])] == []
