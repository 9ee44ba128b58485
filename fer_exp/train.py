"""The training loop: in-memory uint8 batches, batch augmentation on the device, AdamW, LR schedule,
class-weighted cross-entropy, bf16 autocast where native, early stopping, best-on-val checkpoints.

The loop knows nothing of MLflow or Optuna: they plug in as :class:`Callback` objects.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fer_exp.augment import BatchAugment, to_float
from fer_exp.classes import NUM_CLASSES
from fer_exp.config import TTA_CHOICES, Config
from fer_exp.data import FerData
from fer_exp.device import (  # noqa: F401 (cpu_has_native_bf16, resolve_amp: re-exported)
    AUTO_COMPILE_MODE,
    autocast,
    cpu_has_native_bf16,
    evaluation_precision,
    measured_amp,
    measured_compile,
    memory_format_for,
    resolve_amp,
    resolve_device,
)
from fer_exp.errors import first_line
from fer_exp.inference import predict_probabilities
from fer_exp.metrics import classification_metrics, uncopied_metrics
from fer_exp.models import build_model

EXPORT_FORMAT = "fer-exp finished run 1"  # Trainer.export's files; what fer-exp study --import reads


class Callback:
    """Hooks into :meth:`Trainer.fit`. Raise :class:`StopTraining` from a hook to end the run early
    without a result (a pruned tuning trial, say); set ``trainer.should_stop`` to end it after this
    epoch with a result."""

    def on_fit_start(self, trainer: "Trainer") -> None: ...

    def on_epoch_end(self, trainer: "Trainer", epoch: int, metrics: dict[str, float]) -> None: ...

    def on_fit_end(self, trainer: "Trainer", result: "FitResult") -> None: ...


_stop_requested = threading.Event()


def stop_on_signals(second_stops_at_once: bool = True) -> None:
    """Let Ctrl-C and SIGTERM ask training to stop at its next step: a safe point, never in the
    middle of a write to the tracking store or a checkpoint. The loop then raises KeyboardInterrupt
    there. With ``second_stops_at_once``, a second signal raises at once (for a stuck process)."""

    def handler(signum, frame):
        if _stop_requested.is_set() and second_stops_at_once:
            raise KeyboardInterrupt
        first = not _stop_requested.is_set()
        _stop_requested.set()
        if first and second_stops_at_once:  # (a tuning worker's parent says it); a write that fails loses no stop
            with contextlib.suppress(OSError):
                os.write(2, f"\n{signal.Signals(signum).name}: stopping at the next safe point (a training step; a run "
                            "whose training is done first finishes its test evaluation and logging); again to stop at "
                            "once\n".encode())

    for name in ("SIGINT", "SIGTERM"):
        signal.signal(getattr(signal, name), handler)


def stop_requested() -> bool:
    return _stop_requested.is_set()


def raise_if_stop_requested() -> None:
    if _stop_requested.is_set():
        raise KeyboardInterrupt


class RunFailed(RuntimeError):
    """The run cannot go on: it stops FAILED (the tracking layer records why in ``stop_reason``) and
    the checkpoints of its last good epoch stay."""


class TrainingDiverged(RunFailed):
    """The loss became NaN or infinite."""


class CheckpointWriteError(RunFailed):
    """A checkpoint could not be written (a full disk, say); nothing half-written is left behind."""


class StopTraining(Exception):
    """Raised by a callback to end :meth:`Trainer.fit` at once, on purpose: no test evaluation, no
    result. ``reason`` says why (e.g. "pruned at epoch 3"); the tracking layer marks the run KILLED."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class FitResult:
    best_epoch: int
    best_value: float
    history: list[dict[str, float]]
    test_metrics: dict[str, float]  # empty when fit() left the test split alone
    test_probabilities: np.ndarray | None
    best_checkpoint: Path
    last_checkpoint: Path | None  # None: a run trained elsewhere (Trainer.replay), whose one file is best_checkpoint
    stopped_early: bool
    seconds: float
    extras: dict = field(default_factory=dict)
    # the epoch loop of this fit: its wall time, and the part of it spent in training steps; the rest is
    # the work around them (val pass, checkpoints, host syncs, the callbacks' logging)
    loop_seconds: float = 0.0
    step_seconds: float = 0.0
    # the test-time augmentation of the test evaluation; with ``tta: auto``, each candidate's val select_metric
    tta: str = "none"
    tta_val: dict[str, float] = field(default_factory=dict)

    @property
    def overhead_fraction(self) -> float:
        """The share of the epoch loop's wall time not spent in training steps."""
        return 1 - self.step_seconds / self.loop_seconds if self.loop_seconds > 0 else 0.0


def write_atomically(path: Path, write, before_replace=None) -> None:
    """``write(partial_path)``, then ``before_replace(partial_path)`` (a second file made from this one),
    then rename: an interruption never leaves a truncated file at ``path``. A write that fails (a full
    disk: torch.save says so as a RuntimeError) removes the partial file, leaves ``path`` as it was and
    raises :class:`CheckpointWriteError`, saying why."""
    partial = path.with_suffix(path.suffix + ".partial")
    try:
        write(partial)
        if before_replace is not None:
            before_replace(partial)
        os.replace(partial, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # a read-only file system refuses even to unlink a missing file
            partial.unlink(missing_ok=True)
        if isinstance(exc, CheckpointWriteError) or not isinstance(exc, (OSError, RuntimeError)):
            raise  # said already (the second file); Ctrl-C and the like: the caller's to handle
        raise write_error(path, exc) from exc


def write_error(path: Path, exc: BaseException) -> CheckpointWriteError:
    """What failed writing ``path`` (a full disk, with the space left; a folder that cannot be written)."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    reason = getattr(exc, "strerror", None) or first_line(exc)
    if free is not None and free < 64 * 2**20:
        reason = f"{reason}; {free / 2**20:.1f} MiB free there"
    refused = getattr(exc, "errno", None) in (errno.EROFS, errno.EACCES, errno.EPERM)  # not a full disk
    return CheckpointWriteError(f"{path} could not be written ({reason}); "
                                + ("make the folder writable again" if refused else "free space there"))


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system has them (no bytes written; :func:`write_atomically` replaces
    ``source`` with a new file later, so the link keeps this version), else a copy."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def global_rng_state() -> dict:
    """The global random streams (torch CPU and CUDA, numpy, Python) as checkpoint-safe values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            # (only where this process uses CUDA: asking would start a context on every GPU of a CPU run's host)
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate()}


def set_global_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, gauss))  # (loaded onto CUDA by a resume there)
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def class_weight_tensor(labels: torch.Tensor, mode: str) -> torch.Tensor | None:
    """n / (7 * count): scikit-learn's 'balanced' weights when every class is present; absent
    classes get weight 0. Computed here rather than by ``sklearn.utils.class_weight`` so a training
    start does not pay scikit-learn's import; tests check it against scikit-learn."""
    if mode == "none":
        return None
    counts = np.bincount(labels.numpy(), minlength=NUM_CLASSES).astype(np.float64)
    present = counts > 0
    weights = np.zeros(NUM_CLASSES, dtype=np.float32)
    weights[present] = counts.sum() / (NUM_CLASSES * counts[present])
    return torch.from_numpy(weights)


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """(scheduler, steps per call): 'step' schedulers advance every batch, 'epoch' ones every epoch."""
    total = cfg.epochs * steps_per_epoch
    if cfg.scheduler == "cosine":
        warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1), eta_min=cfg.lr * 0.01)
        if warmup <= 0:
            return cosine, "step"
        linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, end_factor=1.0, total_iters=warmup)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup]), "step"
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total), "step"
    if cfg.scheduler == "plateau":
        mode = "min" if cfg.select_metric == "val_loss" else "max"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=0.5, patience=3), "epoch"
    return None, "none"


def make_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    try:  # fused kernels where this torch has them for the device, else the foreach path
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def ema_decay_at(decay: float, updates: int) -> float:
    """The EMA decay of the update after ``updates`` earlier ones: ``min(decay, (1 + t) / (10 + t))``.
    The warm-up (as timm's ModelEmaV3) keeps the first weights, those of an untrained model, from
    dominating a short run: with 0.999 they would still weigh 0.999**600 = 55% after 600 steps."""
    return min(decay, (1 + updates) / (10 + updates))


class WeightAverage:
    """The exponential moving average of a model's weights and buffers (BatchNorm statistics), updated
    with :func:`ema_decay_at` after every optimiser step. It counts its updates on the host: an update
    launches two multi-tensor kernels and reads nothing back from the device (``AveragedModel.
    update_parameters`` reads its counter every step, a host sync that stalls an asynchronous step).
    Stored as an ``AveragedModel``'s state (``module.*`` and ``n_averaged``), as prediction loads it."""

    def __init__(self, model: torch.nn.Module, decay: float):
        from torch.optim.swa_utils import AveragedModel

        self.averaged = AveragedModel(model, use_buffers=True)  # a copy of the model: the averaged weights
        self.decay, self.updates = decay, 0
        pairs = list(zip([*self.averaged.module.parameters(), *self.averaged.module.buffers()],
                         [*model.parameters(), *model.buffers()], strict=True))
        self.floats = ([a for a, m in pairs if a.is_floating_point()], [m for a, m in pairs if a.is_floating_point()])
        # integer buffers (BatchNorm's num_batches_tracked, unused with a momentum) follow the model
        self.counts = ([a for a, m in pairs if not a.is_floating_point()], [m for a, m in pairs if not a.is_floating_point()])

    @property
    def module(self) -> torch.nn.Module:
        return self.averaged.module

    @torch.no_grad()
    def update(self) -> None:
        """ema = d * ema + (1 - d) * weights, d = ema_decay_at(decay, updates - 1); the first update copies."""
        averaged, current = self.floats
        if self.updates == 0:
            torch._foreach_copy_(averaged, current)
        else:
            torch._foreach_lerp_(averaged, current, 1 - ema_decay_at(self.decay, self.updates - 1))
        if self.counts[0]:
            torch._foreach_copy_(*self.counts)
        self.updates += 1

    def state_dict(self) -> dict:
        self.averaged.n_averaged.fill_(self.updates)
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)
        self.updates = int(self.averaged.n_averaged)


class Trainer:
    """Trains ``cfg.model`` on ``data``; ``fit()`` runs the epochs and the final test evaluation."""

    def __init__(self, cfg: Config, data: FerData, checkpoint_dir: str | Path, callbacks=(), progress: bool = True,
                 load_pretrained: bool = True):
        """``load_pretrained`` False: the weights will come from elsewhere (an export, a checkpoint to
        resume), so the pretrained ones (``cfg.pretrained``) are not fetched."""
        self.cfg, self.data, self.callbacks, self.progress = cfg, data, list(callbacks), progress
        # which faces and labels each split holds: kept in checkpoints, so a resume on other data is refused
        self.data_members = {name: split.members_digest() for name, split in data.splits().items()}
        seed_everything(cfg.seed)
        self.device = resolve_device(cfg.device)
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        self.amp_report = f"{cfg.amp}: {'bf16' if self.amp_dtype else 'fp32'} by rule"
        self.memory_format = memory_format_for(cfg.channels_last)
        if self.device.type == "cuda":  # every batch has the same shape: let cuDNN pick its fastest kernels once
            torch.backends.cudnn.benchmark = True
        self.model = build_model(cfg.model, num_classes=NUM_CLASSES, input_size=cfg.input_size,
                                 freeze_depth=cfg.freeze_depth, pretrained=cfg.pretrained if load_pretrained else "none",
                                 dropout=cfg.dropout)
        self.model.to(self.device, memory_format=self.memory_format)
        # in the mode it trains in (a ResNet18's frozen stem keeps its BatchNorm in eval) before the amp and
        # compile measurements capture it: a graph captured otherwise fails its guard and compiles again
        self.model.train()
        # the whole dataset lives on the training device as uint8
        self.splits = {name: (split.images.to(self.device), split.labels.to(self.device))
                       for name, split in data.splits().items()}
        self.steps_per_epoch = max(len(data.train) // cfg.batch_size, 1)
        if cfg.amp == "auto" and self.device.type == "cuda" and self.amp_dtype is not None:
            self.amp_dtype, self.amp_report = self.measure_amp()
        weights = class_weight_tensor(data.train.labels, cfg.class_weights)
        self.class_weights = None if weights is None else weights.to(self.device)
        self.augment = BatchAugment.from_config(cfg)
        # mixup's weight: drawn on the training device from the global stream (checkpointed), so no step
        # waits for a host-to-device copy
        self.mixup_weight = None
        if cfg.mixup_alpha > 0:
            alpha = torch.tensor(float(cfg.mixup_alpha), device=self.device)
            self.mixup_weight = torch.distributions.Beta(alpha, alpha)
        # the captured part of a training step (augmentation, forward, loss; backward through the same
        # graph): compiled (torch.compile; reduce-overhead = CUDA graphs) or plain. The model's parameters
        # are shared, so checkpoints and evaluation use the plain module.
        if cfg.compile != "off" and (cfg.compile != "auto" or self.device.type == "cuda"):
            # from Dynamo's state of a new process: the trainers made before in this one (a tuning worker's
            # trials) each left compilations of this step, which past its recompile limit (8) would run eager
            from torch import _dynamo

            _dynamo.reset()
        if cfg.compile == "auto":
            self.forward_loss, self.compile_report = (self.measure_compile() if self.device.type == "cuda" else
                                                      (self.augmented_loss, "auto: off (not CUDA)"))
        else:
            self.forward_loss = (self.augmented_loss if cfg.compile == "off"
                                 else torch.compile(self.augmented_loss, mode=cfg.compile))
            self.compile_report = cfg.compile
        # a stream of its own, apart from the global one that initialises weights and drives dropout
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        # an exponential moving average of the weights (and BatchNorm statistics): what val, test and the
        # logged model use when ema_decay > 0
        self.ema = WeightAverage(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.scheduler, self.schedule_unit = make_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        # selection state, checkpointed so that a resumed run selects exactly as an uninterrupted one
        self.best_value, self.best_epoch, self.stale = None, 0, 0
        self.resumed_from: Path | None = None
        # the wall time of fit, of its epoch loop and of its training steps in earlier parts of the run (a
        # resume goes on from a checkpoint's), and the clocks of this part (see elapsed)
        self.elapsed_before = {"fit": 0.0, "loop": 0.0, "step": 0.0}
        self.fit_started: float | None = None
        self.loop_started: float | None = None
        self.step_seconds = 0.0
        self.should_stop = False  # a callback may set it to end training after the current epoch
        self.created, self.first_step_seconds = time.perf_counter(), None

    def measure_amp(self) -> tuple[torch.dtype | None, str]:
        """fp32 or bf16 autocast, whichever runs this model's training step faster here (cached per
        device, torch, model, input size and batch). Measured on a copy of the model, under a forked RNG:
        the run itself is untouched."""
        import copy

        probe = copy.deepcopy(self.model)
        images, labels = self.splits["train"]
        x = to_float(images[: self.cfg.batch_size]).contiguous(memory_format=self.memory_format)
        y = labels[: self.cfg.batch_size]

        def step(dtype):
            with autocast(self.device, dtype):
                loss = F.cross_entropy(probe(x).float(), y)
            loss.backward()
            probe.zero_grad(set_to_none=True)

        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return measured_amp(self.device, step, self.measurement_key())

    def measure_compile(self) -> tuple[Callable, str]:
        """(the step's forward and loss, what was measured) for ``compile: auto``: :meth:`augmented_loss`
        compiled with CUDA graphs where :func:`measured_compile` finds it pays, else plain. Measured
        (augmentation, forward, loss and backward of one batch, eager and compiled) on the run's own
        model, so the run keeps the compilation made there instead of paying again; the model's weights,
        BatchNorm statistics and random streams are restored afterwards. A compilation that fails leaves
        the run eager and says why."""
        compilations = []

        def compile_step():
            compilations.append(torch.compile(self.augmented_loss, mode=AUTO_COMPILE_MODE))
            return lambda: step(compilations[-1])

        images, labels = self.splits["train"]
        images, labels = images[: self.cfg.batch_size], labels[: self.cfg.batch_size]
        draws = self.augment.draw(images.shape[0], self.device, torch.Generator(self.device).manual_seed(0))
        mixup = ()
        if self.mixup_weight is not None:  # the run's own step: compiled with the same arguments
            mixup = (torch.arange(images.shape[0], device=self.device).flip(0), torch.tensor(0.5, device=self.device))

        def step(forward_loss):
            loss, _ = forward_loss(images, labels, draws, *mixup)
            loss.backward()
            self.model.zero_grad(set_to_none=True)

        # what is captured is part of the key: earlier measurements of the model alone do not count
        key = (f"{self.measurement_key()}|{'bf16' if self.amp_dtype else 'fp32'}"
               f"|augmentation, {'mixup, ' if mixup else ''}forward, loss")
        saved = {k: v.clone() for k, v in self.model.state_dict().items()}
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                pays, report = measured_compile(self.device, lambda: step(self.augmented_loss), compile_step, key,
                                                total_steps=self.cfg.epochs * self.steps_per_epoch)
        except Exception as error:  # noqa: BLE001 - an optional speed-up: never the end of a run
            pays, report = False, f"auto: off (compiling failed: {type(error).__name__}: {str(error)[:200]})"
        finally:
            self.model.load_state_dict(saved)  # in place: a recorded CUDA graph keeps its buffers
        return (compilations[-1] if pays else self.augmented_loss), f"auto: {report}"

    def measurement_key(self) -> str:
        """What a speed measurement of this run's training step depends on (its cache key)."""
        device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else str(self.device)
        return (f"{device}|torch {torch.__version__}|{self.cfg.model}|{self.cfg.input_size}px|batch {self.cfg.batch_size}"
                f"|{'channels_last' if self.cfg.channels_last else 'contiguous'}")

    # -- one pass -------------------------------------------------------------------------------
    def autocast(self):
        return autocast(self.device, self.amp_dtype)

    @property
    def evaluated_in(self) -> dict:
        """The device type and precision the run evaluates in: a loaded model predicts the same way."""
        return evaluation_precision(self.device, self.amp_dtype)

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights that are evaluated, selected and logged: the EMA where there is one."""
        return self.ema.module if self.ema is not None else self.model

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step on a uint8 batch; returns (loss, number correct) as device tensors.
        The random numbers are drawn here, from the run's streams; what they decide runs in
        :attr:`forward_loss` (compiled or plain); then the backward pass and the update."""
        draws = self.augment.draw(images.shape[0], images.device, self.generator)
        if self.mixup_weight is not None:  # the weight from the global stream, the pairing from ours
            lam = self.mixup_weight.sample()
            pair = torch.randperm(images.shape[0], device=images.device, generator=self.generator)
            loss, hits = self.forward_loss(images, labels, draws, pair, lam)
        else:
            loss, hits = self.forward_loss(images, labels, draws)
        self.update(loss)
        return loss.detach(), hits

    def augmented_loss(self, images: torch.Tensor, labels: torch.Tensor, draws: torch.Tensor,
                       pair: torch.Tensor | None = None, lam: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward part of a step, a pure function of tensors (what ``compile`` captures): the
        augmentation that ``draws`` decide, mixup of the batch with its permutation ``pair`` by weight
        ``lam`` (if given), the model, the weighted loss. Returns (loss, number correct)."""
        x = self.augment.apply(images, draws)
        if pair is None:
            return self.model_loss(x, labels)
        return self.model_loss(lam * x + (1 - lam) * x[pair], labels, labels[pair], lam)

    def model_loss(self, x: torch.Tensor, labels: torch.Tensor, mixed_labels: torch.Tensor | None = None,
                   lam: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted loss, number correct) of the model on a float batch. With ``mixed_labels`` (mixup)
        the loss is ``lam`` of the labels' and ``1 - lam`` of theirs."""
        x = x.contiguous(memory_format=self.memory_format)
        with self.autocast():
            logits = self.model(x)
            loss = F.cross_entropy(logits.float(), labels, weight=self.class_weights,
                                   label_smoothing=self.cfg.label_smoothing)
            if mixed_labels is not None:
                loss = lam * loss + (1 - lam) * F.cross_entropy(logits.float(), mixed_labels, weight=self.class_weights,
                                                                label_smoothing=self.cfg.label_smoothing)
        return loss, (logits.argmax(1) == labels).sum()

    def update(self, loss: torch.Tensor) -> None:
        """Backward, AdamW, the EMA and the schedule: the rest of a step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        if self.schedule_unit == "step":
            self.scheduler.step()

    def optimize(self, x: torch.Tensor, labels: torch.Tensor, mixed_labels: torch.Tensor | None = None,
                 lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The model step alone on a float batch, no augmentation (the benchmarks' compute bound)."""
        loss, hits = self.model_loss(x, labels, mixed_labels, lam)
        self.update(loss)
        return loss.detach(), hits

    def train_epoch(self, max_batches: int | None = None) -> dict[str, float]:
        """One epoch (or its first ``max_batches`` batches) over a fresh seeded shuffle of train."""
        self.model.train()
        images, labels = self.splits["train"]
        n = images.shape[0]
        order = torch.randperm(n, device=self.device, generator=self.generator)
        steps = self.steps_per_epoch if max_batches is None else min(max_batches, self.steps_per_epoch)
        batch = min(self.cfg.batch_size, n)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        start = time.perf_counter()
        bar = tqdm(range(steps), desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}", unit="batch",
                   leave=False, disable=not self.progress or None)
        for step in bar:
            raise_if_stop_requested()  # Ctrl-C or SIGTERM (stop_on_signals): stop here, between steps
            index = order[step * batch:(step + 1) * batch]
            loss, hits = self.train_step(images[index], labels[index])
            loss_sum += loss
            correct += hits
            if self.first_step_seconds is None:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.first_step_seconds = time.perf_counter() - self.created
                if self.progress:
                    tqdm.write(f"first training step done {self.first_step_seconds:.2f} s after the trainer was built")
            if self.progress and (step % 20 == 19 or step == steps - 1):  # .item() syncs the device
                bar.set_postfix(loss=f"{loss_sum.item() / (step + 1):.3f}", acc=f"{correct.item() / ((step + 1) * batch):.3f}")
        seen = steps * batch
        train_loss = loss_sum.item() / steps  # waits for the device, so the time below is real
        seconds = time.perf_counter() - start
        return {"train_loss": train_loss, "train_accuracy": correct.item() / seen,
                "epoch_seconds": seconds, "train_images_per_second": seen / seconds}

    def predict(self, split: str, tta: str = "none") -> tuple[float, np.ndarray]:
        """(mean cross-entropy, class probabilities (N, 7)) for one split, in eval mode."""
        images, labels = self.splits[split]
        probabilities, loss = predict_probabilities(self.eval_model, images, batch_size=self.cfg.eval_batch_size,
                                                    tta=tta, amp_dtype=self.amp_dtype, memory_format=self.memory_format,
                                                    labels=labels)
        return loss, probabilities

    def evaluate(self, split: str, tta: str = "none") -> tuple[dict[str, float], np.ndarray]:
        loss, probabilities = self.predict(split, tta)
        metrics = classification_metrics(self.data.splits()[split].labels.numpy(), probabilities.argmax(1), prefix=f"{split}_")
        metrics[f"{split}_loss"] = loss
        return metrics, probabilities

    def choose_tta(self) -> tuple[str, dict[str, float]]:
        """The test-time augmentation of the test evaluation: the config's, or with ``tta: auto`` the one
        whose val ``select_metric`` is best for the weights loaded now (the selected epoch's), with every
        candidate's val value. A tie keeps the cheaper (none, then flip, then tencrop). Test plays no part."""
        if self.cfg.tta != "auto":
            return self.cfg.tta, {}
        scores = {tta: self.evaluate("val", tta)[0][self.cfg.select_metric] for tta in TTA_CHOICES}
        best = min if self.cfg.select_metric == "val_loss" else max
        return best(scores, key=scores.get), scores

    def evaluate_selected(self) -> tuple[dict[str, float], np.ndarray, str, dict[str, float]]:
        """The loaded (selected) weights evaluated once on test, with the TTA :meth:`choose_tta` picks:
        (test metrics, test probabilities, the TTA, each candidate's val value)."""
        tta, tta_val = self.choose_tta()
        metrics, probabilities = self.evaluate("test", tta)
        metrics |= uncopied_metrics(self.data.test.labels.numpy(), probabilities.argmax(1), self.data.copied("test"),
                                  "test_")
        return metrics, probabilities, tta, tta_val

    # -- checkpoints --------------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything an exact resume needs: weights, optimiser, schedule, epoch, selection state,
        history, config, and every random stream (augmentation/shuffle, and the global ones dropout uses)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "epoch": self.epoch, "best_value": self.best_value, "best_epoch": self.best_epoch,
                "stale": self.stale, "history": self.history, "config": self.cfg.to_dict(),
                "rng": self.generator.get_state(), "global_rng": global_rng_state(), "evaluated_in": self.evaluated_in,
                "data_members": self.data_members, "elapsed": self.elapsed()}

    def elapsed(self) -> dict[str, float]:
        """Seconds of fit, of its epoch loop and of its training steps over the whole run so far (the parts
        before a resume included), so a resumed run reports its whole time, not its last part's."""
        now = time.perf_counter()
        return {"fit": self.elapsed_before["fit"] + (now - self.fit_started if self.fit_started else 0.0),
                "loop": self.elapsed_before["loop"] + (now - self.loop_started if self.loop_started else 0.0),
                "step": self.elapsed_before["step"] + self.step_seconds}

    def save(self, name: str, also: str | None = None) -> Path:
        """The state as ``<name>.pt`` (and, the same state, ``<also>.pt``: a link or copy made aside before
        either replaces its old version, so a failure leaves both as they were). ``<name>.pt`` is renamed
        into place first: a stop between the two renames leaves ``best.pt`` behind a ``last.pt`` that is
        the best state, which :meth:`restore` brings level, never ``best.pt`` ahead of ``last.pt`` (an
        epoch that a resumed run, redoing it, may not select, yet whose weights would be tested)."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / f"{name}.pt"
        other = self.checkpoint_dir / f"{also}.pt" if also is not None else None
        other_partial = other.with_suffix(".pt.partial") if other is not None else None

        def same_state_aside(partial: Path) -> None:
            try:
                link_or_copy(partial, other_partial)
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    other_partial.unlink(missing_ok=True)
                if isinstance(exc, (OSError, RuntimeError)):
                    raise write_error(other, exc) from exc
                raise

        write_atomically(path, lambda partial: torch.save(self.state(), partial),
                         before_replace=same_state_aside if other is not None else None)
        if other is not None:
            try:
                os.replace(other_partial, other)
            except OSError as exc:  # the folder's, not the tracking store's
                raise write_error(other, exc) from exc
        return path

    def restore(self, path: str | Path) -> None:
        """Continue from a checkpoint (``last.pt``) of a run with this config: :meth:`fit` then goes
        on with the next epoch, exactly as the uninterrupted run would have."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        missing = {"best_epoch", "stale", "global_rng"} - set(state)
        if missing:
            raise ValueError(f"{path} was written by an older fer-exp without {', '.join(sorted(missing))}: "
                             "it cannot be resumed exactly")
        differ = [name for name, digest in state.get("data_members", self.data_members).items()
                  if self.data_members.get(name) != digest]
        if differ:  # (images added, relabelled or removed, another folder, another hold-out)
            raise ValueError(f"its {', '.join(differ)} split(s) held other faces or labels when it was interrupted than "
                             f"{self.data.source} holds here; resume with the data it trained on (--data)")
        self.load_weights(state)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"].cpu()
        if rng.numel() == self.generator.get_state().numel():
            self.generator.set_state(rng)
        else:  # written on another kind of device (a run begun on a GPU, resumed on a CPU): its stream does not fit
            self.generator.manual_seed((self.cfg.seed + 1) * 1_000_003 + state["epoch"])
            print(f"warning: {path} was written on another kind of device than {self.device.type}: its shuffling and "
                  "augmentation stream cannot go on here, so it is seeded again (from the seed and the epoch) and the "
                  "resumed run will not end exactly as an uninterrupted one would", file=sys.stderr, flush=True)
        set_global_rng_state(state["global_rng"])
        self.epoch, self.history = state["epoch"], list(state["history"])
        self.best_value, self.best_epoch, self.stale = state["best_value"], state["best_epoch"], state["stale"]
        self.elapsed_before = dict(state.get("elapsed") or self.elapsed_before)  # (none in older checkpoints)
        self.resumed_from = Path(path)
        best = self.resumed_from.parent / "best.pt"  # where fit() goes on saving and tests from
        if self.best_epoch and self.best_epoch == self.epoch:
            # this state is the best: best.pt is made from it (a stop between the two renames of its save,
            # or a last.pt downloaded alone, left best.pt behind or missing)
            best.with_suffix(".pt.partial").unlink(missing_ok=True)
            write_atomically(best, lambda other: link_or_copy(self.resumed_from, other))
        elif self.best_epoch and not best.is_file():
            raise ValueError(f"the best epoch's checkpoint ({best}, epoch {self.best_epoch}) is missing beside it: "
                             "the run's test would have no model to evaluate; put best.pt back there (e.g. "
                             "from the run's artifacts, checkpoints/best.pt), or start a new run")

    # -- the run -------------------------------------------------------------------------------------
    def fit(self, evaluate_test: bool = True) -> FitResult:
        """Train for ``cfg.epochs`` (or until early stopping), selecting the best epoch on val; then,
        with ``evaluate_test``, evaluate that epoch once on test. Tuning trials pass False: they
        select on val and never look at the test split."""
        cfg = self.cfg
        if self.resumed_from is None:
            seed_everything(cfg.seed)  # dropout draws from the global generator: same seed, same run
        self.fit_started, self.loop_started, self.step_seconds = time.perf_counter(), None, 0.0
        minimise = cfg.select_metric == "val_loss"
        best_path = self.checkpoint_dir / "best.pt" if self.best_epoch else None
        last_path = self.checkpoint_dir / "last.pt" if self.epoch else None
        for cb in self.callbacks:
            cb.on_fit_start(self)
        self.loop_started = time.perf_counter()
        for epoch in range(self.epoch, cfg.epochs):
            if cfg.early_stopping and self.stale >= cfg.early_stopping:
                break  # resumed after the epoch that stopped it early
            self.epoch = epoch + 1
            epoch_start = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]  # the LR the epoch starts with (per-step schedules move it)
            metrics = self.train_epoch()
            self.step_seconds += metrics["epoch_seconds"]
            val_metrics, _ = self.evaluate("val")
            metrics |= {k: val_metrics[k] for k in ("val_loss", "val_accuracy", "val_macro_f1")}
            for name in ("train_loss", "val_loss"):
                if not math.isfinite(metrics[name]):
                    kept = f"; the checkpoints of epoch {self.epoch - 1} are kept in {self.checkpoint_dir}" if self.epoch > 1 else ""
                    raise TrainingDiverged(f"the {name.replace('_', ' ')} is {metrics[name]} at epoch {self.epoch}: "
                                           f"training diverged (a lower --lr, or --amp off, may help){kept}")
            metrics["lr"] = lr
            value = metrics[cfg.select_metric]
            if self.schedule_unit == "epoch":
                self.scheduler.step(value)
            self.history.append({"epoch": self.epoch, **metrics})
            improved = best_path is None or (value < self.best_value if minimise else value > self.best_value)
            self.stale = 0 if improved else self.stale + 1
            if improved:
                self.best_value, self.best_epoch = value, self.epoch
            try:  # best.pt, when improved, is the same state: linked (or copied) rather than serialised twice
                last_path = self.save("last", also="best" if improved else None)
            except CheckpointWriteError as exc:
                kept = (f"; the checkpoints of epoch {self.epoch - 1} are kept (resume once the folder can be written)"
                        if self.epoch > 1 else " (or start the run with another --output-dir)")
                raise CheckpointWriteError(f"epoch {self.epoch}: {exc}{kept}") from exc.__cause__
            if improved:
                best_path = self.checkpoint_dir / "best.pt"
            # val pass, checks and checkpoints (the callbacks' share shows in FitResult.overhead_fraction)
            metrics["epoch_overhead_seconds"] = time.perf_counter() - epoch_start - metrics["epoch_seconds"]
            self.history[-1]["epoch_overhead_seconds"] = metrics["epoch_overhead_seconds"]  # (not in last.pt's copy)
            if self.progress:
                tqdm.write(f"epoch {self.epoch:3d}/{cfg.epochs}  train_loss {metrics['train_loss']:.4f}  "
                           f"train_acc {metrics['train_accuracy']:.4f}  val_loss {metrics['val_loss']:.4f}  "
                           f"val_acc {metrics['val_accuracy']:.4f}  val_f1 {metrics['val_macro_f1']:.4f}  "
                           f"{metrics['epoch_seconds']:.1f}s{'  *' if improved else ''}")
            for cb in self.callbacks:
                cb.on_epoch_end(self, self.epoch, metrics)
            if cfg.early_stopping and self.stale >= cfg.early_stopping:
                self.should_stop = True
            if self.should_stop:
                break
        loop = self.elapsed()
        self.elapsed_before["loop"], self.loop_started = loop["loop"], None  # the loop's clock stops here
        test_metrics, test_probabilities, tta, tta_val = {}, None, "none", {}
        if evaluate_test:  # the best epoch, evaluated once on test
            self.load_weights(torch.load(best_path, map_location=self.device, weights_only=True))
            test_metrics, test_probabilities, tta, tta_val = self.evaluate_selected()
        result = FitResult(self.best_epoch, self.best_value, self.history, test_metrics, test_probabilities, best_path,
                           last_path, stopped_early=self.epoch < cfg.epochs, seconds=self.elapsed()["fit"],
                           loop_seconds=loop["loop"], step_seconds=loop["step"], tta=tta, tta_val=tta_val)
        for cb in self.callbacks:
            cb.on_fit_end(self, result)
        return result

    def load_weights(self, state: dict) -> None:
        """The weights (and the EMA's, where the run has one) of a checkpoint or an export."""
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    # -- a run finished elsewhere ---------------------------------------------------------------------
    def export(self, result: FitResult, path: str | Path) -> Path:
        """The finished run in one small file, to be tracked on another machine (``fer-exp study
        --import``; e.g. from a GPU machine without MLflow): the best epoch's weights, the whole history,
        the selection, the config, the fingerprint of the splits it used, and where and how it trained. No
        optimiser state or random streams: it is done, not resumable (about the size of the weights)."""
        best = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)
        device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else str(self.device)
        trained = {"device": device, "torch": str(torch.__version__), "amp": str(self.amp_dtype or "off").replace("torch.", ""),
                   "amp_choice": self.amp_report, "compile_choice": self.compile_report, "seconds": result.seconds,
                   "loop_seconds": result.loop_seconds, "step_seconds": result.step_seconds,
                   "stopped_early": result.stopped_early, "test_metrics": {k: float(v) for k, v in result.test_metrics.items()},
                   "test_tta": result.tta}
        state = {"format": EXPORT_FORMAT, "model": best["model"], **({"ema": best["ema"]} if "ema" in best else {}),
                 "epoch": self.epoch, "best_value": self.best_value, "best_epoch": self.best_epoch, "stale": self.stale,
                 "history": self.history, "config": self.cfg.to_dict(), "data": self.data.fingerprint(), "trained": trained,
                 "evaluated_in": self.evaluated_in}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda partial: torch.save(state, partial))
        return path

    def adopt(self, export: dict) -> None:
        """Take over a run that :meth:`export` wrote (trained elsewhere, by this config): its best
        weights, its history and selection. A model that does not fit the weights raises RuntimeError."""
        self.load_weights(export)
        self.epoch, self.history = export["epoch"], list(export["history"])
        self.best_value, self.best_epoch, self.stale = export["best_value"], export["best_epoch"], export["stale"]

    def replay(self, trained: dict, source: Path, evaluate_test: bool = True) -> FitResult:
        """Tell the callbacks about the run :meth:`adopt` took over as :meth:`fit` tells them about one it
        trains: the start (with every epoch of its history), then the end, with its best epoch evaluated
        on test here. ``trained``: the export's account of where and how long it trained. Nothing is trained."""
        for cb in self.callbacks:
            cb.on_fit_start(self)
        test_metrics, test_probabilities, tta, tta_val = self.evaluate_selected() if evaluate_test else ({}, None, "none", {})
        result = FitResult(self.best_epoch, self.best_value, self.history, test_metrics, test_probabilities, Path(source),
                           None, stopped_early=trained["stopped_early"], seconds=trained["seconds"],
                           loop_seconds=trained["loop_seconds"], step_seconds=trained["step_seconds"], tta=tta,
                           tta_val=tta_val)
        for cb in self.callbacks:
            cb.on_fit_end(self, result)
        return result
