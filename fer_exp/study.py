"""Reproducible studies: a study file lists the runs to make (arms x seeds); ``fer-exp study`` makes
the ones the tracking store does not hold yet, then compares them all.

    # experiments/reference.yaml
    experiment_name: reference
    seeds: [42, 1, 2]
    arms:
      cnn: {config: cnn.yaml}
      resnet18: {config: resnet18.yaml}
      cnn-unweighted: {config: cnn.yaml, set: {class_weights: none}}
    compare: {group_by: arm}

A run counts as made when a FINISHED run in the study's experiment carries the same study, arm
and seed tags and the same resolved configuration (where and how it ran aside).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fer_exp.config import EXECUTION_FIELDS, Config, ConfigError, build_config, coerce, read_experiment, read_yaml
STUDY_KEYS = ("experiment_name", "seeds", "arms", "compare")


@dataclass
class PlannedRun:
    arm: str
    seed: int
    config: Config


@dataclass
class StudyFile:
    path: Path
    name: str
    experiment_name: str
    runs: list[PlannedRun]
    group_by: str


def read_study(path: str | Path, overrides: dict | None = None, seeds: list[int] | None = None,
               arms: list[str] | None = None) -> StudyFile:
    """The runs of a study file, each config resolved: defaults, the arm's experiment file, its
    ``set:`` values, the command-line ``overrides``, then the seed and the study's experiment."""
    path = Path(path)
    raw = read_yaml(path)
    unknown = sorted(set(raw) - set(STUDY_KEYS))
    if unknown:
        hint = " (a tuning study? run it with fer-exp tune --config)" if {"study", "search_space"} & set(unknown) else ""
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; a study file has {', '.join(STUDY_KEYS)}{hint}")
    if not isinstance(raw.get("arms"), dict) or not raw["arms"]:
        raise ConfigError(f"{path}: arms must map arm names to {{config: FILE, set: {{...}}}}, e.g. cnn: {{config: cnn.yaml}}")
    study_seeds = seeds or raw.get("seeds") or [42]
    if not isinstance(study_seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in study_seeds):
        raise ConfigError(f"{path}: seeds must be a list of integers, got {study_seeds!r}")
    chosen = arms or list(raw["arms"])
    missing = [a for a in chosen if a not in raw["arms"]]
    if missing:
        raise ConfigError(f"{path}: no arm {', '.join(missing)} (arms: {', '.join(raw['arms'])})")
    experiment = str(raw.get("experiment_name") or path.stem)
    runs = []
    for arm in chosen:
        spec = raw["arms"][arm]
        if not isinstance(spec, dict) or set(spec) - {"config", "set"}:
            raise ConfigError(f"{path}: arm {arm} must be {{config: FILE, set: {{...}}}}, got {spec!r}")
        values, sections = read_experiment(path.parent / spec["config"]) if spec.get("config") else ({}, {})
        if sections:
            raise ConfigError(f"{path}: arm {arm}'s config {spec['config']} is a tuning study file")
        extra = spec.get("set") or {}
        if not isinstance(extra, dict):
            raise ConfigError(f"{path}: arm {arm}: set must be a mapping of config fields, got {extra!r}")
        extra = {k: coerce(k, v, f"{path}: arm {arm}: set") for k, v in extra.items()}
        for seed in study_seeds:
            layered = {**values, **extra}
            cli = {k: v for k, v in (overrides or {}).items() if v is not None}
            try:
                cfg = build_config(layered, {**cli, "seed": seed, "experiment_name": experiment})
            except ConfigError as exc:
                raise ConfigError(f"{path}: arm {arm}: {exc}") from None
            runs.append(PlannedRun(arm, seed, cfg))
    group_by = str((raw.get("compare") or {}).get("group_by", "arm"))
    return StudyFile(path, path.stem, experiment, runs, group_by)


def same_config(params: dict, cfg: Config) -> bool:
    wanted = {f"config.{k}": str(v) for k, v in cfg.to_dict().items() if k not in EXECUTION_FIELDS}
    return all(params.get(k) == v for k, v in wanted.items())


def find_made_run(client, experiment_id: str | None, study: StudyFile, planned: PlannedRun) -> str | None:
    """The id of a FINISHED run already made for this arm and seed with this config, if any."""
    if experiment_id is None:
        return None
    runs = client.search_runs([experiment_id], filter_string=(
        f"tags.study_file = '{study.name}' and tags.arm = '{planned.arm}' and attributes.status = 'FINISHED'"))
    for run in runs:
        if same_config(run.data.params, planned.config):
            return run.info.run_id
    return None


def run_study(study: StudyFile, dry_run: bool = False, progress: bool = True) -> tuple[list[str], list[str]]:
    """Make the runs the store lacks; returns (all run ids of the study, the ids made now)."""
    import mlflow

    from fer_exp.experiment import load_run_data, run_experiment
    from fer_exp.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    existing = client.get_experiment_by_name(study.experiment_name)
    experiment_id = existing.experiment_id if existing else None
    plan = [(planned, find_made_run(client, experiment_id, study, planned)) for planned in study.runs]
    todo = [p for p, made in plan if made is None]
    print(f"study {study.name}: {len(study.runs)} run(s) in experiment {study.experiment_name}, "
          f"{len(study.runs) - len(todo)} already made, {len(todo)} to make", flush=True)
    for planned, made in plan:
        print(f"  {planned.arm:20s} seed {planned.seed:<6d} {'made: ' + made if made else 'to make'}")
    if dry_run:
        return [made for _, made in plan if made], []
    data_cache: dict = {}
    ids, new = [], []
    for index, (planned, made) in enumerate(plan):
        if made:
            ids.append(made)
            continue
        cfg = planned.config
        key = (cfg.data, cfg.on_bad, cfg.seed, cfg.val_fraction)
        if key not in data_cache:
            data_cache = {key: load_run_data(cfg)}  # one data set in memory at a time
        print(f"\n[{index + 1}/{len(plan)}] {planned.arm} seed {planned.seed}", flush=True)
        summary = run_experiment(cfg, progress=progress, data=data_cache[key],
                                 tags={"study_file": study.name, "arm": planned.arm})
        ids.append(summary.run_id)
        new.append(summary.run_id)
    return ids, new
