"""Training and inference throughput: fer-exp's tensor-native path against the conventional
ImageFolder + per-sample transforms + DataLoader pipeline, and against the compute bound.

    python benchmarks/throughput.py --data ../shared/fer2013            # table
    python benchmarks/throughput.py --data synthetic:512,128,128 --json  # machine-readable

Methods, timed in interleaved rounds in this one process so machine noise hits all alike:
  conventional  torchvision ImageFolder, per-sample transforms v2 (flip, rotation, colour jitter,
                random erasing), DataLoader workers; plain fp32 model step (the public-repo way)
  fer-exp       ``Trainer.train_epoch`` / ``inference.predict_probabilities``: the code ``fer-exp train``
                and ``fer-exp predict`` run
  compute bound the same ``Trainer.optimize`` model step on one pre-made batch, no data work
plus fer-exp ablations (channels_last off, fused AdamW off, bf16 on/off, and with ``--compile MODE``
torch.compile) that show what each lever contributes, and ResNet18 at 112 px for fer-exp and its
compute bound (``--resnet-sizes 112 224`` for both sizes). The compiled rows (``--compile``) get ratios
against the conventional pipeline and the eager compute bound of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fer_exp.augment import to_float
from fer_exp.classes import CLASS_NAMES
from fer_exp.config import load_config
from fer_exp.data import load_data
from fer_exp.data.formats import find_split_dir
from fer_exp.inference import predict_probabilities
from fer_exp.models import build_model
from fer_exp.train import Trainer, resolve_device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def image_folder_of(data, source: str, tmp: Path) -> Path:
    """The train folder that ImageFolder reads: the source's own, or PNGs written from the tensors."""
    path = Path(source)
    if path.is_dir() and find_split_dir(path, ("train",)) is not None:
        return find_split_dir(path, ("train",))
    from PIL import Image

    root = tmp / "train"
    for i, (image, label) in enumerate(zip(data.train.images, data.train.labels.tolist())):
        folder = root / CLASS_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.numpy()).save(folder / f"{i}.png")
    return root


class Conventional:
    """How most FER2013 repos train: ImageFolder, per-sample PIL/tensor transforms, DataLoader."""

    def __init__(self, folder: Path, cfg, device: torch.device, workers: int, train: bool):
        from torchvision import datasets
        from torchvision.transforms import v2

        steps = [v2.Grayscale(1)]
        if train:
            steps += [v2.RandomHorizontalFlip(cfg.aug_flip), v2.RandomRotation(cfg.aug_rotation),
                      v2.ColorJitter(brightness=cfg.aug_brightness, contrast=cfg.aug_contrast)]
        steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        if train:
            steps += [v2.RandomErasing(cfg.aug_erasing, scale=(0.02, 0.33), value=0.5)]
        dataset = datasets.ImageFolder(str(folder), transform=v2.Compose(steps))
        # ImageFolder numbers classes alphabetically; map them to FER2013 indices as a repo must
        order = [CLASS_NAMES.index(c.lower()) for c in dataset.classes]
        dataset.target_transform = lambda t: order[t]
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=cfg.batch_size if train else cfg.eval_batch_size, shuffle=train,
            num_workers=workers, pin_memory=device.type == "cuda", drop_last=train,
            persistent_workers=workers > 0)
        self.device = device
        self.model = build_model(cfg.model, input_size=cfg.input_size).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.iterator = iter(self.loader)

    def batches(self, n: int):
        for _ in range(n):
            try:
                yield next(self.iterator)
            except StopIteration:
                self.iterator = iter(self.loader)
                yield next(self.iterator)

    def train(self, n: int) -> int:
        self.model.train()
        seen = 0
        for x, y in self.batches(n):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            loss = F.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            seen += len(y)
        loss.item()
        return seen

    @torch.no_grad()
    def evaluate(self, n: int) -> int:
        self.model.eval()
        seen = 0
        for x, _ in self.batches(n):
            out = self.model(x.to(self.device, non_blocking=True)).softmax(1)
            seen += len(x)
        out.cpu()
        return seen


def compiled_train(cfg, data, args, mode: str, notes: dict):
    """fer-exp's training path with the compiled step (config ``compile: mode``); the untimed warm-up
    call compiles (its seconds go to ``notes``). A compile that fails is reported, not fatal."""
    import dataclasses

    trainer = fer_exp_trainer(dataclasses.replace(cfg, compile=mode), data)
    key = f"torch.compile {mode}"
    state = {"failed": False}

    def train():
        if state["failed"]:
            return 0
        if key not in notes:
            start = time.perf_counter()
            try:
                trainer.train_epoch(max_batches=args.batches)
            except Exception as exc:  # noqa: BLE001 - any backend failure is a result to report
                state["failed"] = True
                notes[key] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                return 0
            notes[key] = f"first call (compile + {args.batches} batches) {time.perf_counter() - start:.1f} s"
            return args.batches * cfg.batch_size
        trainer.train_epoch(max_batches=args.batches)
        return args.batches * cfg.batch_size

    return train


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    images = fn()
    sync(device)
    return images / (time.perf_counter() - start)


def fer_exp_trainer(cfg, data) -> Trainer:
    # a folder never made: the benchmark times steps and never fits, so nothing is saved (mkdtemp left one a call)
    return Trainer(cfg, data, checkpoint_dir=Path(tempfile.gettempdir()) / "fer-bench-never-written", progress=False)


def methods_for(cfg, data, folder, args, device):
    """name -> (train fn, eval fn); each returns the number of images it processed."""
    b = args.batches
    trainer = fer_exp_trainer(cfg, data)
    fixed_x = to_float(trainer.splits["train"][0][: cfg.batch_size])
    fixed_y = trainer.splits["train"][1][: cfg.batch_size]
    val_images = trainer.splits["val"][0]
    n_eval = min(len(val_images), b * cfg.eval_batch_size)

    def fer_train(t=trainer):
        t.train_epoch(max_batches=b)
        return b * cfg.batch_size

    def fer_eval(t=trainer):  # the inference function evaluation, predict and the served model share
        predict_probabilities(t.model, val_images[:n_eval], batch_size=cfg.eval_batch_size, amp_dtype=t.amp_dtype,
                              memory_format=t.memory_format)
        return n_eval

    def bound_train(t=trainer):
        t.model.train()
        for _ in range(b):
            loss, _ = t.optimize(fixed_x, fixed_y)
        loss.item()
        return b * cfg.batch_size

    fixed_eval = to_float(val_images[: cfg.eval_batch_size]).contiguous(memory_format=trainer.memory_format)

    def bound_eval(t=trainer):
        t.model.eval()
        with torch.no_grad(), t.autocast():
            for start in range(0, n_eval, cfg.eval_batch_size):
                out = t.model(fixed_eval[: min(cfg.eval_batch_size, n_eval - start)]).float().softmax(1)
        out.cpu()
        return n_eval

    methods = {"fer-exp": (fer_train, fer_eval), "compute bound": (bound_train, bound_eval)}
    if folder is not None:
        conv_train = Conventional(folder, cfg, device, args.workers, train=True)
        conv_eval = Conventional(folder, cfg, device, args.workers, train=False)
        methods["conventional"] = (lambda: conv_train.train(b), lambda: conv_eval.evaluate(max(1, n_eval // cfg.eval_batch_size)))
    return methods


def run(args) -> dict:
    torch.manual_seed(0)
    data = load_data(args.data)
    base = dict(data=args.data, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, device=args.device,
                epochs=1000, scheduler="none", compile="off")  # eager; --compile MODE adds the compiled rows
    cfg = load_config(overrides=base | {"model": "cnn"})
    device = resolve_device(cfg.device)
    tmp = Path(tempfile.mkdtemp(prefix="fer-bench-"))
    folder = image_folder_of(data, args.data, tmp)

    groups = {"cnn": methods_for(cfg, data, folder, args, device)}
    compile_notes: dict[str, str] = {}
    ablations = {"channels_last off": {"channels_last": False}, "fused AdamW off (foreach)": {},
                 "bf16 autocast": {"amp": "bf16"}, "fp32 (amp off)": {"amp": "off"}}
    if not args.skip_ablations:
        for name, change in ablations.items():
            acfg = load_config(overrides=base | {"model": "cnn"} | change)
            trainer = fer_exp_trainer(acfg, data)
            if name.startswith("fused"):
                trainer.optimizer = torch.optim.AdamW([p for p in trainer.model.parameters() if p.requires_grad],
                                                      lr=acfg.lr, weight_decay=acfg.weight_decay, foreach=True)
            batches = args.batches if name != "bf16 autocast" or device.type == "cuda" or trainer.amp_dtype is None else max(1, args.batches // 8)
            groups.setdefault("cnn ablations", {})[name] = (
                lambda t=trainer, n=batches, bs=acfg.batch_size: (t.train_epoch(max_batches=n), n * bs)[1], None)
    for mode in args.compile:
        groups.setdefault("cnn ablations", {})[f"torch.compile {mode}"] = (compiled_train(cfg, data, args, mode, compile_notes), None)
    for size in [] if args.skip_resnet else args.resnet_sizes:
        rcfg = load_config(overrides=base | {"model": "resnet18", "input_size": size,
                                             "batch_size": args.resnet_batch_size, "eval_batch_size": args.resnet_batch_size})
        rargs = argparse.Namespace(**{**vars(args), "batches": args.resnet_batches})
        groups[f"resnet18@{size}"] = methods_for(rcfg, data, None, rargs, device)

    # warm up every method once, then interleave the timed rounds
    for methods in groups.values():
        for train_fn, eval_fn in methods.values():
            train_fn()
            if eval_fn:
                eval_fn()
    samples: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):
        for group, methods in groups.items():
            for name, (train_fn, eval_fn) in methods.items():
                samples.setdefault((group, name, "train"), []).append(timed(train_fn, device))
                if eval_fn:
                    samples.setdefault((group, name, "eval"), []).append(timed(eval_fn, device))

    shutil.rmtree(tmp, ignore_errors=True)  # the conventional pipeline's image folder
    results: dict = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "data": args.data, "batch_size": args.batch_size, "batches": args.batches,
                     "rounds": args.rounds, "workers": args.workers, "images_per_second": {}}
    for (group, name, phase), values in samples.items():
        results["images_per_second"].setdefault(group, {}).setdefault(name, {})[phase] = round(statistics.median(values), 1)
    ips = results["images_per_second"]
    ratios = {}
    for group in [g for g in ips if g == "cnn" or g.startswith("resnet18@")]:
        for phase in ("train", "eval"):
            fer = ips[group]["fer-exp"][phase]
            if "conventional" in ips[group]:
                ratios[f"{group} {phase} fer-exp/conventional"] = round(fer / ips[group]["conventional"][phase], 2)
            ratios[f"{group} {phase} fer-exp/compute bound"] = round(fer / ips[group]["compute bound"][phase], 2)
    for name, phases in ips.get("cnn ablations", {}).items():  # the compiled step against the same baselines
        if name.startswith("torch.compile") and phases["train"] > 0:
            for baseline in ("conventional", "compute bound"):
                if baseline in ips["cnn"]:
                    ratios[f"cnn train {name}/{baseline}"] = round(phases["train"] / ips["cnn"][baseline]["train"], 2)
    results["ratios"] = ratios
    if compile_notes:
        results["compile"] = compile_notes
    return results


def cold_start(data: str, repeats: int = 2) -> list[float]:
    """Seconds from launching ``fer-exp train`` to its first training step (cache warm, store exists)."""
    import subprocess

    if not data.startswith("synthetic"):
        data = str(Path(data).resolve())  # the launches run in a temp folder
    load_data(data)  # warm the decode cache
    tmp = Path(tempfile.mkdtemp(prefix="fer-cold-"))
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "fer_exp.cli", "train", "--data", data, "--epochs", "1", "--output-dir", str(tmp)]
    seconds = []
    for _ in range(repeats + 1):  # the first launch creates the MLflow store; time the later ones
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            if "first training step done" in line:
                seconds.append(round(time.perf_counter() - start, 2))
                break
        proc.kill()
        proc.wait()
    shutil.rmtree(tmp, ignore_errors=True)
    if len(seconds) != repeats + 1:
        raise RuntimeError(f"fer-exp train never reported its first training step: {' '.join(cmd)}")
    return seconds[1:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = Path(__file__).resolve().parents[2] / "shared" / "fer2013"
    parser.add_argument("--data", default=str(default_data) if default_data.exists() else "synthetic",
                        help="FER2013 source (folder, CSV or synthetic[:TRAIN,VAL,TEST])")
    parser.add_argument("--batches", type=int, default=20, help="CNN batches per timed round")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-batch-size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (median reported)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers of the conventional pipeline")
    parser.add_argument("--resnet-batches", type=int, default=4)
    parser.add_argument("--resnet-batch-size", type=int, default=64)
    parser.add_argument("--resnet-sizes", type=int, nargs="+", default=[112], help="ResNet18 input sizes to time (e.g. 112 224)")
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--skip-ablations", action="store_true")
    parser.add_argument("--compile", nargs="*", default=[], choices=["default", "reduce-overhead", "max-autotune"],
                        help="also time fer-exp's path with torch.compile in these modes (compile time reported apart)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--cold-start", action="store_true",
                        help="also time `fer-exp train` from launch to its first training step (cache warm)")
    parser.add_argument("--cold-start-repeats", type=int, default=2, help="timed launches after the first")
    args = parser.parse_args(argv)
    results = run(args)
    if args.cold_start:
        results["cold_start_seconds"] = cold_start(args.data, args.cold_start_repeats)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"device {results['device']}, torch {results['torch']}, {results['threads']} threads, data {results['data']}")
    print(f"{'group':<16}{'method':<28}{'train img/s':>13}{'eval img/s':>13}")
    for group, methods in results["images_per_second"].items():
        for name, values in methods.items():
            print(f"{group:<16}{name:<28}{values.get('train', float('nan')):>13.1f}{values.get('eval', float('nan')):>13.1f}")
    print()
    for name, value in results["ratios"].items():
        print(f"{name:<48}{value:>6.2f}x")
    for name, note in results.get("compile", {}).items():
        print(f"{name}: {note}")
    if "cold_start_seconds" in results:
        print(f"cold start, launch to first training step: {results['cold_start_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
