"""One typed configuration object for a training run: defaults, then an experiment YAML, then CLI.

Every field is a CLI option of ``fer-exp train`` (``--batch-size`` for ``batch_size``) and is logged
with every run. ``load_config`` validates names, types and choices and says what is wrong.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fer_exp.errors import first_line

# fer-exp predict / evaluate: test-time augmentation, and the splits an evaluation may use
TTA_CHOICES = ("none", "flip", "tencrop")
TTA_OPTIONS = ("model", *TTA_CHOICES)  # predict / evaluate / serve: "model" = each model's own, the one its run tested with
EVALUATION_SPLITS = ("test", "val")
CHOICES: dict[str, tuple] = {
    "model": ("cnn", "resnet18"),
    "scheduler": ("cosine", "onecycle", "plateau", "none"),
    "class_weights": ("balanced", "none"),
    "amp": ("auto", "bf16", "off"),
    "compile": ("auto", "off", "default", "reduce-overhead", "max-autotune"),
    "select_metric": ("val_accuracy", "val_macro_f1", "val_loss"),
    "tta": (*TTA_CHOICES, "auto"),  # a run's test evaluation: auto chooses one of TTA_CHOICES on val
    "on_bad": ("error", "skip"),
    "duplicates": ("report", "drop"),
    # StudyConfig (fer-exp tune)
    "sampler": ("tpe", "random", "gp"),
    "pruner": ("median", "hyperband", "none"),
    "freeze_depth": (0, 1, 2, 3, 4, 5),
}
# Input sizes each model accepts (faces are resized on the batch); the first is its default, which
# ``input_size: 0`` stands for. The CNN ends in global average pooling, so larger inputs are valid.
INPUT_SIZES: dict[str, tuple[int, ...]] = {"cnn": (48, 64, 96), "resnet18": (112, 224)}
CHOICES["input_size"] = (0, *sorted({size for sizes in INPUT_SIZES.values() for size in sizes}))


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class Config:
    # what to train on what
    model: str = _f("cnn", "Model: cnn (the custom 584,807-parameter CNN) or resnet18 (timm).")
    data: str = _f("data/fer2013", "FER2013 source: fer2013.csv, the Kaggle image folders, or 'synthetic[:TRAIN,VAL,TEST]'.")
    val_fraction: float = _f(0.1, "Size of the stratified val hold-out of train, where the source has no val split.")
    data_seed: int = _f(-1, "Seed of the val hold-out of train (and of synthetic faces); -1: the run's seed. Runs with one data_seed share one val split, so a seed ensemble of them can be evaluated and chosen on val.")
    on_bad: str = _f("error", "Bad samples in the source: 'error' stops, 'skip' skips and reports them.")
    duplicates: str = _f("report", "Faces whose pixels are in two splits (in the Kaggle folders 280 of the 3,589 test faces have a copy in Training): 'report' counts them (tags duplicates_*), 'drop' removes from train every face identical to a val or test face, and from val every face identical to a test face (or correlating at copy_correlation or more), so no test face is trained on or selects the epoch (test stays whole).")
    copy_correlation: float = _f(1.0, "What counts as a copy across splits: identical pixels (1), or also a face whose pixels correlate with an earlier split's face at least this much (0.95: the same photo cropped, recompressed or watermarked; 93 more test faces in the Kaggle folders). Applies to the copies' counts, the uncopied scores (test_accuracy_uncopied) and duplicates: drop.")
    # model
    input_size: int = _f(0, "Input size in pixels, faces resized on the batch: cnn 48, 64 or 96; resnet18 112 or 224; 0: the model's default (cnn 48, resnet18 112).")
    freeze_depth: int = _f(0, "resnet18: freeze the first k of stem, layer1, layer2, layer3, layer4 (0-5).")
    pretrained: str = _f("none", "resnet18 weights: 'imagenet' (timm hub), 'none', or a PATH to a .safetensors/.pth state dict.")
    dropout: float = _f(0.3, "Dropout before the classifier (the CNN's block 4, ResNet18's head).")
    # optimisation
    epochs: int = _f(60, "Maximum number of epochs.")
    batch_size: int = _f(128, "Training batch size.")
    lr: float = _f(1e-3, "Peak learning rate of AdamW.")
    weight_decay: float = _f(1e-4, "AdamW weight decay.")
    scheduler: str = _f("cosine", "LR schedule: cosine (with warmup), onecycle, plateau, none.")
    warmup_epochs: float = _f(1.0, "Linear warmup length for the cosine schedule, in epochs.")
    class_weights: str = _f("balanced", "Cross-entropy class weights: balanced (n / (classes * count)) or none.")
    label_smoothing: float = _f(0.0, "Cross-entropy label smoothing.")
    early_stopping: int = _f(15, "Stop after this many epochs without improvement of select_metric (0: never).")
    select_metric: str = _f("val_accuracy", "Validation metric that picks the best epoch: val_accuracy, val_macro_f1, val_loss.")
    tta: str = _f("none", "Test-time augmentation of the run's test evaluation: none, flip (the face and its mirror), tencrop, or auto (whichever scores the best select_metric on val at the selected epoch; the per-epoch val pass has none).")
    # augmentation, applied to whole batches on the training device
    aug_flip: float = _f(0.5, "Probability of a horizontal flip.")
    aug_rotation: float = _f(10.0, "Maximum rotation in degrees (uniform in [-r, r]).")
    aug_brightness: float = _f(0.2, "Brightness jitter: factor uniform in [1-b, 1+b].")
    aug_contrast: float = _f(0.2, "Contrast jitter: factor uniform in [1-c, 1+c].")
    aug_erasing: float = _f(0.25, "Probability of random erasing (a rectangle of 2-33% of the image).")
    aug_shift: float = _f(0.0, "Maximum random shift as a fraction of the side (0.1: up to 4.8 px each way at 48 px).")
    aug_scale: float = _f(0.0, "Random zoom: factor uniform in [1-s, 1+s] (0: none).")
    mixup_alpha: float = _f(0.0, "Mixup: mix each batch with a shuffled copy, weight ~ Beta(a, a) (0: off).")
    ema_decay: float = _f(0.0, "Exponential moving average of the weights (e.g. 0.999; warmed up as min(d, (1+t)/(10+t)) over update t), used for val, test and the model (0: off).")
    # execution
    seed: int = _f(42, "Seed for initialisation, shuffling, augmentation and (unless data_seed is set) the data hold-out.")
    device: str = _f("auto", "Device: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps.")
    amp: str = _f("auto", "bf16 autocast: auto (CUDA: whichever of bf16 and fp32 measures faster; CPU: where it runs bf16 natively), bf16, off.")
    compile: str = _f("auto", "torch.compile the training step's augmentation, forward and loss (and so its backward): auto (CUDA: reduce-overhead where the measured saving over the run exceeds the compile time; CPU: off), off, default, reduce-overhead (CUDA graphs), max-autotune.")
    channels_last: bool = _f(True, "Use the channels_last memory format for the model and batches (faster convolutions on CPU and GPU).")
    eval_batch_size: int = _f(1024, "Batch size for validation and test.")
    # tracking
    experiment_name: str = _f("fer2013", "MLflow experiment name.")
    run_name: str = _f("", "MLflow run name (empty: one that says what the run is, e.g. 'cnn 48px lr=0.001 wd=0.0001 seed42').")
    system_metrics: bool = _f(True, "Log system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) to MLflow during training.")
    output_dir: str = _f("outputs", "Local folder for checkpoints (also logged to MLflow).")
    register: str = _f("", "Register the logged model in MLflow's model registry under this name (empty: do not register).")

    @property
    def split_seed(self) -> int:
        """The seed of the run's data: its val hold-out of train, or its synthetic faces."""
        return self.seed if self.data_seed < 0 else self.data_seed

    def data_key(self) -> tuple:
        """What the run's data depends on: (source, on_bad, split seed, val fraction, duplicates, copy correlation)."""
        return self.data, self.on_bad, self.split_seed, self.val_fraction, self.duplicates, self.copy_correlation

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


@dataclass
class StudyConfig:
    """How an Optuna study runs: the ``study:`` block of a study file (experiments/tune_*.yaml),
    then ``fer-exp tune`` options. The trials' training config is a :class:`Config`."""

    study_name: str = _f("", "Optuna study name; the same name resumes the study ('': the study file's name, e.g. tune_cnn).")
    storage: str = _f("", "Optuna storage URL ('': sqlite optuna.db beside the MLflow sqlite store, else in the working directory; postgresql://USER:PASSWORD@HOST/DB for several machines).")
    n_trials: int = _f(20, "Trials this command adds to the study (finished: complete or pruned; a failed one is retried or replaced).")
    total_trials: int = _f(0, "Instead of n_trials: run until the study holds this many finished trials, counting every process on every machine (0: off).")
    timeout: float = _f(0.0, "Start no trial after this many seconds (0: no limit); running trials finish.")
    sampler: str = _f("tpe", "Optuna sampler: tpe, random or gp, seeded by --seed.")
    sampler_startup_trials: int = _f(5, "Random trials before tpe or gp model the results.")
    pruner: str = _f("median", "Pruner on the per-epoch val metric: median, hyperband or none.")
    pruner_startup_trials: int = _f(3, "median: finished trials before any trial may be pruned.")
    pruner_warmup_epochs: int = _f(1, "median: epochs a trial always runs before it may be pruned.")
    workers: int = _f(1, "Worker processes on this machine on the study (several share one GPU well).")
    heartbeat: int = _f(30, "Seconds between a running trial's heartbeats; a trial silent for 3 times this (its worker killed) is failed and retried.")
    enqueue: str = _f("", "Trials to run first, as 'lr=0.001,weight_decay=0.0001; lr=0.003' (e.g. the known recipe); a resumed study queues those it holds no trial of.")
    retrain_best: bool = _f(False, "After the trials, train the best configuration for retrain_epochs, test it once and log the model.")
    retrain_epochs: int = _f(0, "Epochs of the --retrain-best run (0: as many as a trial).")
    tracking: bool = _f(True, "Track the study and its trials in MLflow (false: the Optuna storage only, e.g. where MLflow is not installed).")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Fields that say where and how a run ran, not what it trained: runs (and resumed studies) that
# differ only in these count as the same.
EXECUTION_FIELDS = ("device", "output_dir", "run_name", "experiment_name", "eval_batch_size", "channels_last",
                    "system_metrics", "register", "compile")
# What a resumed run or study may change: how it runs, and where its data is (the same faces at another
# path: a folder moved; the faces themselves are checked by their member digests)
RESUMABLE_FIELDS = (*EXECUTION_FIELDS, "data")


def recorded_config(values: dict) -> dict:
    """A config as a run, export or study recorded it, with the fields it lacks at their defaults: a field
    added to :class:`Config` later defaults to what fer-exp did before it (``tta: none``), so a run made
    before it trained and was tested as that default says."""
    return {**Config().to_dict(), **values}


class ConfigError(ValueError):
    """An unknown key, a wrong type or a value out of range in a configuration."""


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
TYPES = typing.get_type_hints(Config)
STUDY_FIELDS = {f.name: f for f in dataclasses.fields(StudyConfig)}
_SCHEMAS = {Config: (FIELDS, TYPES, "config key"),
            StudyConfig: (STUDY_FIELDS, typing.get_type_hints(StudyConfig), "study setting")}


# what other tools call some fields (for "did you mean"; spelling mistakes are found by similarity)
COMMON_NAMES = {"learning_rate": "lr", "wd": "weight_decay", "bs": "batch_size", "num_epochs": "epochs",
                "n_epochs": "epochs", "max_epochs": "epochs", "lr_scheduler": "scheduler", "patience": "early_stopping",
                "smoothing": "label_smoothing", "img_size": "input_size", "image_size": "input_size",
                "mixup": "mixup_alpha", "ema": "ema_decay", "precision": "amp", "n_jobs": "workers"}


def did_you_mean(name: str, fields) -> str:
    """' Did you mean lr?' for a name that is another tool's (learning_rate) or a misspelling of a field; else ''."""
    close = [COMMON_NAMES[name]] if COMMON_NAMES.get(name) in fields else \
        difflib.get_close_matches(name, fields, n=3, cutoff=0.6)
    return f" Did you mean {', '.join(close)}?" if close else ""


def coerce(name: str, value, origin: str, schema: type = Config):
    """Check and convert one value to the field's type; ``origin`` says where it came from.
    ``schema`` is the dataclass the field belongs to (:class:`Config` or :class:`StudyConfig`)."""
    fields, types, what = _SCHEMAS[schema]
    if not isinstance(name, str):
        raise ConfigError(f"{origin}: {what}s must be names, got {name!r} (quote it in YAML)")
    if name not in fields:
        raise ConfigError(f"{origin}: unknown {what} {name!r}.{did_you_mean(name, fields)} Valid {what}s: {', '.join(fields)}")
    kind = types[name]
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                value = value.lower() in ("true", "1", "yes")
            elif not isinstance(value, bool):
                raise TypeError
        elif kind is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, str):  # "3" or "3.0" (MLproject passes numbers as floats)
                value = float(value) if value.strip().replace(".", "", 1).isdigit() else value
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            value = int(value)
        elif kind is float:
            if isinstance(value, bool):
                raise TypeError
            value = float(value)
            if not math.isfinite(value):
                raise ValueError
        elif kind is str:
            if isinstance(value, (dict, list, tuple, set)):  # a YAML mapping or list where a word belongs
                raise TypeError
            value = "" if value is None else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: {name} must be {kind.__name__}, got {value!r}") from None
    if name in CHOICES and value not in CHOICES[name]:
        raise ConfigError(f"{origin}: {name} must be one of {', '.join(map(str, CHOICES[name]))}, got {value!r}")
    return value


def build_study_config(values: dict | None = None, origin: str = "study", overrides: dict | None = None) -> StudyConfig:
    """Defaults, then a study file's ``study:`` block (``values``), then ``overrides`` (CLI; None = not given)."""
    if not isinstance(values or {}, dict):
        raise ConfigError(f"{origin}: the study block must be a mapping of study settings, got {type(values).__name__}")
    typed = {k: coerce(k, v, origin, StudyConfig) for k, v in (values or {}).items()}
    for key, value in (overrides or {}).items():
        if value is not None:
            typed[key] = coerce(key, value, f"option --{key.replace('_', '-')}", StudyConfig)
    sc = StudyConfig(**typed)
    for name in ("n_trials", "total_trials", "timeout", "sampler_startup_trials", "pruner_startup_trials",
                 "pruner_warmup_epochs", "retrain_epochs"):
        if getattr(sc, name) < 0:
            raise ConfigError(f"{name} must not be negative, got {getattr(sc, name)}")
    for name in ("workers", "heartbeat"):
        if getattr(sc, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(sc, name)}")
    return sc


def valid_registered_name(name: str) -> bool:
    """MLflow's rules for a registered model's name (``mlflow.utils.validation``), without importing MLflow."""
    import posixpath

    norm = posixpath.normpath(name)
    return bool(name.strip()) and not any(c in name for c in "/:") and norm == name and norm != "." \
        and not norm.startswith("..")


def validate(cfg: Config) -> Config:
    """Cross-field and range checks."""
    positive = ("epochs", "batch_size", "eval_batch_size", "lr")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in ("aug_flip", "aug_erasing", "dropout", "label_smoothing"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"{name} must be between 0 and 1, got {getattr(cfg, name)}")
    for name in ("aug_brightness", "aug_contrast", "ema_decay"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {getattr(cfg, name)}")
    for name in ("aug_shift", "aug_scale"):
        if not 0.0 <= getattr(cfg, name) <= 0.5:
            raise ConfigError(f"{name} must be between 0 and 0.5, got {getattr(cfg, name)}")
    if not 0.0 < cfg.copy_correlation <= 1.0:
        raise ConfigError(f"copy_correlation must be above 0 and at most 1 (1: identical pixels only), got {cfg.copy_correlation}")
    if not 0 <= cfg.seed < 2**32:  # numpy's and scikit-learn's seeds (torch's stop at 2**64)
        raise ConfigError(f"seed must be an integer from 0 to 2**32 - 1, got {cfg.seed}")
    if not -1 <= cfg.data_seed < 2**32:
        raise ConfigError(f"data_seed must be -1 (the run's seed) or a seed from 0 to 2**32 - 1, got {cfg.data_seed}")
    if cfg.mixup_alpha < 0:
        raise ConfigError(f"mixup_alpha must not be negative, got {cfg.mixup_alpha}")
    if cfg.register and not valid_registered_name(cfg.register):  # checked before training, not after it
        raise ConfigError(f"register: {cfg.register!r} is not a valid registered model name (no '/' or ':', not '.' "
                          "and not starting with '..'), e.g. fer-cnn")
    for name in ("weight_decay", "aug_rotation", "warmup_epochs", "early_stopping"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must not be negative, got {getattr(cfg, name)}")
    if cfg.device != "auto":
        check_device(cfg.device)
    if cfg.model == "cnn" and (cfg.pretrained != "none" or cfg.freeze_depth != 0):
        raise ConfigError("pretrained and freeze_depth apply to resnet18 only; for model cnn leave them at none and 0")
    sizes = INPUT_SIZES[cfg.model]
    if cfg.input_size == 0:
        cfg = dataclasses.replace(cfg, input_size=sizes[0])
    elif cfg.input_size not in sizes:
        raise ConfigError(f"input_size for model {cfg.model} must be one of {', '.join(map(str, sizes))} "
                          f"(0: {sizes[0]}), got {cfg.input_size}")
    return cfg


def check_device(name: str) -> None:
    """A device the config may name: cpu, cuda, cuda:N (N present here) or mps (where available)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {name!r} asked for, but CUDA is not available here; use --device auto or cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {name!r} asked for, but this machine has {count} CUDA device(s)")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device {name!r} asked for, but MPS is not available here; use --device auto or cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (plain YAML keeps the last,
    silently). Checked as the document is composed, before merge keys (``<<: *anchor``) are flattened, so
    a merged key that the mapping overrides is not a duplicate."""

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return node


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (experiment files live in experiments/, e.g. experiments/cnn.yaml)")
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:  # said with the file's line and column, not PyYAML's "<unicode string>"
        mark = getattr(exc, "problem_mark", None)
        what = "; ".join(filter(None, (getattr(exc, "context", None), getattr(exc, "problem", None)))) or first_line(exc)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {what}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (saved as UTF-16, say): save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys to values, got {type(loaded).__name__}")
    return loaded


# Blocks of a study file (experiments/tune_*.yaml) that `fer-exp tune` reads beside the config keys.
STUDY_SECTIONS = ("study", "search_space")


def read_experiment(path: str | Path, _chain: tuple[Path, ...] = ()) -> tuple[dict, dict]:
    """(config values, study sections) of an experiment file, checked and typed.

    ``base: OTHER.yaml`` (a path relative to the file) starts from another experiment file's values,
    which the file's own keys then override, so a study or a variant restates only what it changes.
    """
    path = Path(path)
    if path.resolve() in _chain:
        raise ConfigError(f"{path}: `base:` files form a cycle ({' -> '.join(str(p) for p in (*_chain, path.resolve()))})")
    raw = read_yaml(path)
    if "arms" in raw:  # experiments/reference.yaml given to train or tune
        raise ConfigError(f"{path}: a study file of arms and seeds, not an experiment file: run it with "
                          f"`fer-exp study {path}`")
    sections = {name: raw.pop(name) for name in STUDY_SECTIONS if name in raw}
    values: dict = {}
    base = raw.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{path}: base must be the path of another experiment file, got {base!r}")
        if not (path.parent / base).is_file():
            raise ConfigError(f"{path}: its base {base} is not found ({path.parent / base}: a base is named relative to "
                              "the file that names it)")
        values, base_sections = read_experiment(path.parent / base, (*_chain, path.resolve()))
        if base_sections:
            raise ConfigError(f"{path}: its base {base} is a study file ({', '.join(base_sections)}); "
                              "a base holds config keys only")
    values.update({k: coerce(k, v, str(path)) for k, v in raw.items()})
    return values, sections


def build_config(values: dict | None = None, overrides: dict | None = None) -> Config:
    """Defaults, then ``values`` (typed, from an experiment file), then ``overrides`` (CLI options; None = not given)."""
    values = dict(values or {})
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = coerce(key, value, f"option --{key.replace('_', '-')}")
    return validate(Config(**values))


def load_config(yaml_path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Defaults, then the experiment YAML (if any), then ``overrides`` (CLI options; None = not given)."""
    values: dict = {}
    if yaml_path:
        values, sections = read_experiment(yaml_path)
        if sections:
            raise ConfigError(f"{yaml_path} is a study file (it has {' and '.join(sections)}): "
                              f"run it with `fer-exp tune --config {yaml_path}`")
    return build_config(values, overrides)
