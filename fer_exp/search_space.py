"""The ``search_space:`` block of a study file: which config fields an Optuna study tunes, and how.

    search_space:
      lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
      freeze_depth: {type: int, low: 0, high: 5}
      input_size: {type: categorical, choices: [112, 224]}

Every name is a :class:`~fer_exp.config.Config` field; every bound and choice must be a value the
config accepts for the study's base configuration, so a wrong space fails before the first trial.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from fer_exp.config import EXECUTION_FIELDS, FIELDS, TYPES, Config, ConfigError, coerce, did_you_mean, validate

PARAM_TYPES = ("float", "int", "categorical")
# what a trial may not change, and why: the study's identity and data, its objective (each trial's value
# is its select_metric, compared under one direction), what trials never do (test: tta), where and how runs run
NOT_SEARCHABLE = {
    **dict.fromkeys(("model", "data", "on_bad", "val_fraction", "data_seed", "duplicates", "copy_correlation", "seed"), "what the study is of"),
    "select_metric": "the study's objective: trials scored on different metrics cannot be compared",
    "tta": "trials never see the test split (tta is test-time augmentation)",
    **dict.fromkeys(EXECUTION_FIELDS, "where and how runs run, not what they train"),
}


@dataclass(frozen=True)
class Param:
    """One searched config field."""

    name: str
    type: str  # float | int | categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial):
        """The value of this parameter for an Optuna trial."""
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.name, list(self.choices))

    def contains(self, value) -> bool:
        if self.type == "categorical":
            return value in self.choices
        return self.low <= value <= self.high

    def corners(self) -> list:
        """The values that must all be valid configs: every choice, every integer of an int range (a field that
        takes listed values, input_size say, rejects those between them; up to 10,000 checked), else both bounds."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int" and (self.high - self.low) // (self.step or 1) < 10_000:  # the bounds first
            return [self.low, self.high, *range(int(self.low) + int(self.step or 1), int(self.high), int(self.step or 1))]
        return [self.low, self.high]

    def describe(self) -> str:
        if self.type == "categorical":
            return f"one of {', '.join(map(str, self.choices))}"
        scale = "log" if self.log else "linear"
        step = f", step {self.step}" if self.step else ""
        return f"{self.type} {scale} {self.low:g}..{self.high:g}{step}"

    def to_spec(self) -> dict:
        if self.type == "categorical":
            return {"type": "categorical", "choices": list(self.choices)}
        spec = {"type": self.type, "low": self.low, "high": self.high, "log": self.log}
        if self.step:
            spec["step"] = self.step
        return spec


def _number(name: str, key: str, value, kind: str, origin: str):
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)  # YAML reads 1e-5 (no dot) as a string
        if not math.isfinite(number):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: search_space.{name}.{key} must be a number, got {value!r}") from None
    if kind == "int":
        if not number.is_integer():
            raise ConfigError(f"{origin}: search_space.{name}.{key} must be a whole number for type int, got {value!r}")
        return int(number)
    return number


def parse_param(name, spec, origin: str) -> Param:
    if not isinstance(name, str) or name not in FIELDS:
        raise ConfigError(f"{origin}: search_space: unknown config field {name!r}.{did_you_mean(str(name), FIELDS)}")
    if name in NOT_SEARCHABLE:
        raise ConfigError(f"{origin}: search_space.{name}: {name} is fixed for a whole study ({NOT_SEARCHABLE[name]}), not searched "
                          f"(searchable: {', '.join(f for f in FIELDS if f not in NOT_SEARCHABLE)})")
    if not isinstance(spec, dict):
        raise ConfigError(f"{origin}: search_space.{name} must be a mapping such as "
                          "{type: float, low: 1.0e-5, high: 1.0e-2, log: true}, got " + repr(spec))
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise ConfigError(f"{origin}: search_space.{name}.type must be one of {', '.join(PARAM_TYPES)}, got {kind!r}")
    allowed = {"categorical": {"type", "choices"}, "float": {"type", "low", "high", "log", "step"},
               "int": {"type", "low", "high", "log", "step"}}[kind]
    extra = sorted(set(spec) - allowed)
    if extra:
        raise ConfigError(f"{origin}: search_space.{name}: unknown key(s) {', '.join(map(str, extra))} for type {kind} "
                          f"(allowed: {', '.join(sorted(allowed))})")
    field_type = TYPES[name]
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{origin}: search_space.{name}.choices must be a non-empty list")
        typed = tuple(coerce(name, c, f"{origin}: search_space.{name}.choices") for c in choices)
        if len(set(typed)) != len(typed):
            raise ConfigError(f"{origin}: search_space.{name}.choices has duplicates: {list(choices)}")
        return Param(name, kind, choices=typed)
    if field_type is not (float if kind == "float" else int) and not (kind == "int" and field_type is float):
        raise ConfigError(f"{origin}: search_space.{name}: {name} is a {field_type.__name__} field; "
                          f"use type {'categorical' if field_type in (str, bool) else field_type.__name__}")
    for key in ("low", "high"):
        if key not in spec:
            raise ConfigError(f"{origin}: search_space.{name} needs low and high")
    low, high = (_number(name, k, spec[k], kind, origin) for k in ("low", "high"))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{origin}: search_space.{name}.log must be true or false, got {log!r}")
    step = _number(name, "step", spec["step"], kind, origin) if spec.get("step") is not None else None
    if not low < high:
        raise ConfigError(f"{origin}: search_space.{name}: empty range, low {low} must be below high {high}")
    if log and low <= 0:
        raise ConfigError(f"{origin}: search_space.{name}: a log range needs low > 0, got {low}")
    if step is not None and (step <= 0 or log):
        raise ConfigError(f"{origin}: search_space.{name}: step must be positive and cannot go with log")
    if step is not None and not math.isclose((high - low) / step, round((high - low) / step), abs_tol=1e-9):
        last = low + math.floor((high - low) / step + 1e-9) * step
        raise ConfigError(f"{origin}: search_space.{name}: step {step:g} does not divide the range {low:g}..{high:g}, "
                          f"so {high:g} would never be tried; make high {last:g} or choose another step")
    return Param(name, kind, low, high, log, step)


def parse_space(block, origin: str, base: Config) -> tuple[Param, ...]:
    """The searched parameters, each checked against ``base``: every bound and choice must make a
    valid config (an unknown field, an empty range or a value the config rejects is a ConfigError)."""
    if not isinstance(block, dict) or not block:
        raise ConfigError(f"{origin}: search_space must be a non-empty mapping of config fields to ranges")
    params = tuple(parse_param(name, spec, origin) for name, spec in block.items())
    for param in params:
        for value in param.corners():
            try:
                validate(dataclasses.replace(base, **{param.name: coerce(param.name, value, "")}))
            except ConfigError as exc:
                listed = " (it takes listed values: search them with type: categorical, choices: [...])" \
                    if param.type != "categorical" and value not in (param.low, param.high) else ""
                raise ConfigError(f"{origin}: search_space.{param.name}: the value {value!r} is not valid for this "
                                  f"study's {base.model} config: {str(exc).lstrip(': ')}{listed}") from None
    return params


def space_spec(params) -> dict:
    """The space as plain data (stored with the study, logged with its parent run)."""
    return {p.name: p.to_spec() for p in params}


def parse_enqueue(text: str, params, origin: str = "option --enqueue", fixed=()) -> list[dict]:
    """'lr=0.001,weight_decay=0.0001; lr=0.003' -> [{'lr': 0.001, 'weight_decay': 0.0001}, {'lr': 0.003}].
    'none' (or '') enqueues nothing. Names in ``fixed`` (taken out of the space by the command line) are dropped."""
    by_name = {p.name: p for p in params}
    trials = []
    if text.strip().lower() == "none":
        return trials
    for chunk in filter(None, (c.strip() for c in text.split(";"))):
        values = {}
        for pair in filter(None, (p.strip() for p in chunk.split(","))):
            name, sep, raw = pair.partition("=")
            name = name.strip()
            if name in fixed:
                continue
            if not sep or name not in by_name:
                raise ConfigError(f"{origin}: {pair!r} must be NAME=VALUE with NAME one of the searched fields "
                                  f"({', '.join(by_name)})")
            value = coerce(name, raw.strip(), origin)
            if by_name[name].type == "float":
                value = float(value)
            if not by_name[name].contains(value):
                raise ConfigError(f"{origin}: {name}={raw.strip()} is outside the search space ({by_name[name].describe()})")
            values[name] = value
        if values:
            trials.append(values)
    return trials
