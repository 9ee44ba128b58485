"""Time one complete training run: the real ``Trainer.fit`` (every epoch, the val evaluation after
each, checkpoints, the final test evaluation of the best epoch), without MLflow.

    python benchmarks/full_training.py --config experiments/cnn.yaml --data ../shared/fer2013
    python benchmarks/full_training.py --data ../shared/fer2013 --set epochs=60 --set amp=off --json out.json

``--set NAME=VALUE`` overrides any config field, as ``fer-exp train --NAME VALUE`` would. The result
(JSON) holds the resolved config, the device, wall-clock seconds for data loading, model building and
the fit, seconds and train images/s per epoch, the val curve and the test metrics, so two runs that
differ in one lever (``amp=off`` against ``amp=bf16``, say) can be compared for both speed and accuracy.
MLflow is left out on purpose: this measures the training path; ``fer-exp train`` adds its logging
(per-epoch metrics, then artifacts and the model export at the end) on top. ``--export PATH`` writes
the finished run (best weights, history, config, the data's fingerprint), which ``fer-exp study --import PATH``
tracks on a machine with MLflow (a GPU machine's runs, say).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fer_exp.classes import CLASS_NAMES
from fer_exp.config import TTA_CHOICES, ConfigError, load_config
from fer_exp.data import DataError
from fer_exp.experiment import load_run_data
from fer_exp.inference import predict_probabilities
from fer_exp.metrics import UNCOPIED_SUFFIX, classification_metrics, uncopied_metrics
from fer_exp.train import Callback, Trainer, write_atomically


class EpochClock(Callback):
    """Prints one line per epoch (stderr) so a long run shows progress; with ``partial_json``, also
    writes what the run has measured so far there after every epoch ("partial": true), so a run cut off
    by a time limit still returns its val curve and speed (the finished run overwrites it)."""

    def __init__(self, partial_json: str | None = None):
        self.partial_json = partial_json

    def on_epoch_end(self, trainer, epoch, metrics):
        if self.partial_json:  # written whole, then renamed: a kill never leaves half a file
            text = json.dumps({"partial": True, **so_far(trainer)}, indent=2) + "\n"
            write_atomically(Path(self.partial_json), lambda partial: partial.write_text(text))
        print(f"[{trainer.cfg.model} amp={trainer.amp_dtype or 'fp32'}] epoch {epoch}/{trainer.cfg.epochs} "
              f"{metrics['epoch_seconds']:.2f}s  {metrics['train_images_per_second']:.0f} img/s  "
              f"val_acc {metrics['val_accuracy']:.4f}", file=sys.stderr, flush=True)


def parse_sets(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ConfigError(f"--set takes NAME=VALUE, got {pair!r}")
        overrides[name.strip().replace("-", "_")] = value
    return overrides


def so_far(trainer: Trainer) -> dict:
    """What a run has measured after its latest epoch: the partial result and the start of the final one."""
    history = trainer.history
    return {"device": str(trainer.device), "amp_choice": trainer.amp_report, "compile_choice": trainer.compile_report,
            "config": trainer.cfg.to_dict(), "epochs_run": len(history),
            "epoch_seconds": [round(h["epoch_seconds"], 3) for h in history],
            "best_epoch": trainer.best_epoch, "best_val": {trainer.cfg.select_metric: trainer.best_value},
            "val_accuracy": [round(h["val_accuracy"], 4) for h in history],
            "val_macro_f1": [round(h["val_macro_f1"], 4) for h in history]}


def run(config: str | None, data_source: str | None, sets: list[str], tta: bool = True,
        partial_json: str | None = None, export: str | None = None) -> dict:
    overrides = parse_sets(sets)
    if data_source:
        overrides["data"] = data_source
    cfg = load_config(config, overrides)
    begin = time.perf_counter()
    data = load_run_data(cfg)
    loaded = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fer-full-") as checkpoints:  # ~90 MB for a ResNet18: not left in /tmp
        trainer = Trainer(cfg, data, checkpoint_dir=checkpoints, callbacks=[EpochClock(partial_json)], progress=False)
        built = time.perf_counter()
        result = trainer.fit()
        done = time.perf_counter()
        if export:  # the finished run, for `fer-exp study --import` on a machine with MLflow
            trainer.export(result, export)
    epoch_seconds = [h["epoch_seconds"] for h in result.history]
    device = trainer.device
    return {
        **so_far(trainer),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "fp32",
        "train_images": len(data.train), "val_images": len(data.val), "test_images": len(data.test),
        "load_seconds": round(loaded - begin, 2),
        "build_seconds": round(built - loaded, 2),
        "first_step_seconds": round(trainer.first_step_seconds, 2),
        "fit_seconds": round(done - built, 2),
        "total_seconds": round(done - begin, 2),
        "median_epoch_seconds": round(statistics.median(epoch_seconds), 3),
        # the work around the steps (val pass, checkpoints, syncs): per epoch, and as a share of the loop
        "median_epoch_overhead_seconds": round(statistics.median(h.get("epoch_overhead_seconds", 0.0) for h in result.history), 4),
        "overhead_fraction": round(result.overhead_fraction, 4),
        "median_train_images_per_second": round(statistics.median(h["train_images_per_second"] for h in result.history), 1),
        "test_accuracy": result.test_metrics["test_accuracy"],
        "test_macro_f1": result.test_metrics["test_macro_f1"],
        # the scores on the test faces with no copy in train or val (FER2013's copies), and what drop left out
        **{k: v for k, v in result.test_metrics.items() if k.endswith(UNCOPIED_SUFFIX)},
        "duplicates_dropped": data.duplicates_dropped,
        "test_acc_per_class": {c: round(result.test_metrics[f"test_acc_{c}"], 4) for c in CLASS_NAMES},
        "stopped_early": result.stopped_early,
        "tta": tta_metrics(trainer, data) if tta else {},
    }


def tta_metrics(trainer: Trainer, data) -> dict:
    """The best epoch's val and test metrics with each test-time augmentation (select one on val,
    report its test), and how fast each predicts."""
    out = {}
    for tta in TTA_CHOICES:
        row = {}
        for split in ("val", "test"):
            chosen = data.splits()[split]
            start = time.perf_counter()
            probabilities, _ = predict_probabilities(trainer.eval_model, chosen.images, batch_size=trainer.cfg.eval_batch_size,
                                                     tta=tta, amp_dtype=trainer.amp_dtype, memory_format=trainer.memory_format)
            seconds = time.perf_counter() - start
            metrics = classification_metrics(chosen.labels.numpy(), probabilities.argmax(1))
            row |= {f"{split}_accuracy": round(metrics["accuracy"], 4), f"{split}_macro_f1": round(metrics["macro_f1"], 4)}
            if split == "test":
                row["test_images_per_second"] = round(len(chosen) / seconds, 1)
                row |= {k: round(v, 4) for k, v in uncopied_metrics(chosen.labels.numpy(), probabilities.argmax(1),
                                                                   data.copied("test"), "test_").items()}
        out[tta] = row
    return out


def study_arms(path: str, base: str | None = None) -> list[str]:
    """A study file's arms as ``NAME|--config FILE --set K=V ...`` lines (for gpu_check.sh, where MLflow
    and ``fer-exp study`` are not installed); with ``base``, only the arms built on that experiment file."""
    import yaml

    study = Path(path)
    lines = []
    for name, arm in yaml.safe_load(study.read_text())["arms"].items():
        if base and arm["config"] != base:
            continue
        sets = " ".join(f"--set {key}={value}" for key, value in (arm.get("set") or {}).items())
        lines.append(f"{name}|--config {study.parent / arm['config']} {sets}".rstrip())
    return lines


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, --data, --set and --json: how a benchmark that trains is told what to train."""
    default_config = Path(__file__).resolve().parents[1] / "experiments" / "cnn.yaml"
    parser.add_argument("--config", default=str(default_config), help="experiment YAML ('' for the defaults)")
    parser.add_argument("--data", default=None, help="FER2013 source; overrides the config's data")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a config field")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the result here")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--no-tta", action="store_true", help="skip the val/test evaluation with flip and ten-crop TTA")
    parser.add_argument("--export", default=None, metavar="PATH",
                        help="also write the finished run there (best weights, history, config): "
                             "`fer-exp study --import PATH` tracks it where MLflow is")
    parser.add_argument("--study-arms", default=None, metavar="STUDY_FILE",
                        help="print the study file's arms (NAME|options, a line each) and exit")
    parser.add_argument("--arms-on", default=None, metavar="FILE",
                        help="with --study-arms: only the arms built on this experiment file (e.g. cnn.yaml)")
    args = parser.parse_args(argv)
    if args.study_arms:
        print("\n".join(study_arms(args.study_arms, args.arms_on)))
        return 0
    try:
        result = run(args.config or None, args.data, args.set, tta=not args.no_tta, partial_json=args.json,
                     export=args.export)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
