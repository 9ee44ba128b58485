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
and seed tags and the same resolved configuration (where and how it ran aside). An interrupted one
(KILLED, or RUNNING after a SIGKILL) is resumed from its last epoch; one that another command is
training now is left to it.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import socket
from dataclasses import dataclass
from pathlib import Path

from fer_exp.config import (
    EXECUTION_FIELDS,
    FIELDS,
    Config,
    ConfigError,
    build_config,
    coerce,
    read_experiment,
    read_yaml,
    recorded_config,
)
from fer_exp.errors import first_line

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
    study_seeds = seeds or raw.get("seeds")
    study_seeds = [42] if study_seeds is None else study_seeds  # a bare `seeds:` too; `seeds: []` is a mistake
    origin = "--seeds" if seeds else f"{path}: seeds"
    if not isinstance(study_seeds, list) or not study_seeds or \
            not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in study_seeds):
        raise ConfigError(f"{origin} must be a non-empty list of seeds (integers from 0), got {study_seeds!r}")
    if len(set(study_seeds)) < len(study_seeds):
        raise ConfigError(f"{origin} {study_seeds} name a seed twice; each seed makes one run of each arm")
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
        if "seed" in extra or "experiment_name" in extra:
            raise ConfigError(f"{path}: arm {arm}: set may not fix seed or experiment_name: the study's seeds and "
                              "experiment_name decide them")
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
    if group_by not in (*FIELDS, "arm", "study") and not group_by.startswith(("tags.", "params.")):
        # checked now: the comparison comes after every run has trained
        close = difflib.get_close_matches(group_by, [*FIELDS, "arm"], n=2, cutoff=0.6)
        raise ConfigError(f"{path}: compare.group_by {group_by!r} is not arm, a config field"
                          f"{' (did you mean ' + ' or '.join(close) + '?)' if close else ''}, tags.NAME or params.NAME")
    return StudyFile(path, path.stem, experiment, runs, group_by)


def same_config(params: dict, cfg: Config) -> bool:
    """Whether a run's params (``config.*``) are ``cfg``, where and how it ran aside."""
    made = recorded_config({k[len("config."):]: v for k, v in params.items() if k.startswith("config.")})
    return all(str(made[k]) == str(v) for k, v in cfg.to_dict().items() if k not in EXECUTION_FIELDS)


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


def find_interrupted_run(client, experiment_id: str | None, study: StudyFile, planned: PlannedRun):
    """The newest run of this arm and seed with this config that was interrupted (KILLED by Ctrl-C or
    SIGTERM; RUNNING after a SIGKILL, or training now in another process), to resume, if any."""
    if experiment_id is None:
        return None
    runs = client.search_runs([experiment_id], filter_string=f"tags.study_file = '{study.name}' and tags.arm = '{planned.arm}'",
                              order_by=["attributes.start_time DESC"])
    return next((run for run in runs if run.info.status in ("KILLED", "RUNNING")
                 and same_config(run.data.params, planned.config)), None)


def experiment_of(client, study: StudyFile) -> str | None:
    """The id of the study's experiment, None before its first run."""
    existing = client.get_experiment_by_name(study.experiment_name)
    return existing.experiment_id if existing else None


class RunTaken(Exception):
    """Another command made or started a run between this command's last look and its start."""

    def __init__(self, message: str, run_id: str, finished: bool):
        super().__init__(message)
        self.run_id, self.finished = run_id, finished


def claim_run(claim: contextlib.ExitStack, client, study: StudyFile, planned: PlannedRun | None, known) -> None:
    """Takes the tracking store's :func:`~fer_exp.experiment.database_lock` into ``claim`` (released by the
    caller once its run has started, with its host and config logged, when others can see it) and looks a
    last time. Resuming ``known`` (an interrupted run; ``planned`` None): :class:`RunTaken` where another command has resumed
    it since (its status or host changed; on one machine its checkpoint folder's lock says so too). Making
    a new run (``known``: the interrupted run this command could not resume, or None): :class:`RunTaken`
    where another command has made this run, or started or resumed one, since. So commands on one study,
    in several terminals or on several machines sharing a store, make and resume each run once."""
    import mlflow

    from fer_exp.experiment import HOST_TAG, TrackingError, database_lock
    from fer_exp.tracking import tracking_uri

    claim.enter_context(database_lock(tracking_uri()))
    try:
        if planned is None:  # resuming known
            now = client.get_run(known.info.run_id)
            host = now.data.tags.get(HOST_TAG)
            if now.info.status != known.info.status or host != known.data.tags.get(HOST_TAG):
                raise RunTaken(f"skipped: run {known.info.run_id} was resumed meanwhile by another command ({now.info.status}"
                               + (f" on {host}" if host else "") + "); the same command compares it once it has finished",
                               known.info.run_id, now.info.status == "FINISHED")
            return
        experiment_id = experiment_of(client, study)
        made = find_made_run(client, experiment_id, study, planned)
        if made:
            raise RunTaken(f"made meanwhile by another command: {made}", made, True)
        started = find_interrupted_run(client, experiment_id, study, planned)
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"tracking store {tracking_uri()}: {first_line(exc)}") from None
    if started is not None and (known is None or (started.info.run_id, started.info.status)
                                != (known.info.run_id, known.info.status)):
        raise RunTaken(f"skipped: run {started.info.run_id} was started or resumed meanwhile by another command; the same "
                       "command compares it once it has finished", started.info.run_id, False)


def start_claimed(start, client, study: StudyFile, planned: PlannedRun | None, known, ids: list[str]):
    """``start(before_start=..., on_run_start=...)`` (run_experiment or resume_experiment with their other
    arguments) under :func:`claim_run`: its summary, or None where another command took the run (said so,
    and a finished one's id added to ``ids``)."""
    with contextlib.ExitStack() as claim:  # the store's lock, from the last look until the run has started
        try:
            return start(before_start=lambda: claim_run(claim, client, study, planned, known),
                         on_run_start=lambda _: claim.close())
        except RunTaken as taken:
            print(taken, flush=True)
            if taken.finished:
                ids.append(taken.run_id)
            return None


def config_differences(config: dict, planned: PlannedRun) -> list[str]:
    """How an exported run's config differs from a planned run's, where and how it ran aside, and its
    data too (the same images under another path: the splits' fingerprints decide)."""
    wanted, config = planned.config.to_dict(), recorded_config(config)
    return [f"{k}: {config.get(k)!r} there, {v!r} here" for k, v in wanted.items()
            if k not in EXECUTION_FIELDS and k != "data" and str(config.get(k)) != str(v)]


def export_files(paths: list[str]) -> list[Path]:
    """The .pt files named, and those in the folders named."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files += sorted(path.glob("*.pt"))
        elif path.exists():
            files.append(path)
        else:
            raise ConfigError(f"--import {name}: no such file or folder")
    if not files:
        raise ConfigError(f"--import {' '.join(paths)}: no .pt files there")
    return files


def match_exports(study: StudyFile, paths: list[str]) -> tuple[list[tuple[PlannedRun, Path, dict]], list[str]]:
    """Each export (``Trainer.export``) paired with the planned run whose config it has; and, for the
    files that are not, a line that says why (not an export; or the closest planned run and the fields
    that differ)."""
    from fer_exp.experiment import read_export

    matched, unmatched = [], []
    for path in export_files(paths):
        try:
            export = read_export(path)
        except ConfigError as exc:
            unmatched.append(str(exc))
            continue
        unknown = sorted(set(export["config"]) - set(FIELDS))
        if unknown:
            unmatched.append(f"{path}: written by another fer-exp version (config field(s) {', '.join(unknown)} "
                             "unknown here)")
            continue
        differences = {id(p): config_differences(export["config"], p) for p in study.runs}
        planned = min(study.runs, key=lambda p: len(differences[id(p)]))
        if differences[id(planned)]:
            unmatched.append(f"{path}: no run of the study has its config; the closest, {planned.arm} seed "
                             f"{planned.seed}, differs in {'; '.join(differences[id(planned)])}")
        else:
            matched.append((planned, path, export))
    return matched, unmatched


def import_study_runs(study: StudyFile, paths: list[str], client, dry_run: bool = False) -> list[str]:
    """Track the study's runs that were trained elsewhere (exports, matched to arms and seeds by their
    config) and are not in the store yet; returns the ids imported. Files of no planned run are
    listed; if none matches, that is an error. Every export's data is checked (its splits' members)
    before any is imported, so a wrong --data imports nothing."""
    from fer_exp.experiment import check_same_data, import_run, load_run_data

    matched, unmatched = match_exports(study, paths)
    for line in unmatched:
        print(f"not imported: {line}", flush=True)
    if not matched:
        raise ConfigError(f"none of the files is an export of a run of {study.path} as configured here: pass the "
                          "options they were trained with (e.g. --epochs, --amp), and --arms/--seeds for the runs they are")
    existing = client.get_experiment_by_name(study.experiment_name)
    todo, taken, fingerprints = [], set(), {}
    for planned, path, export in matched:
        made = find_made_run(client, existing.experiment_id if existing else None, study, planned)
        if made or (planned.arm, planned.seed) in taken:
            print(f"  {planned.arm:20s} seed {planned.seed:<6d} made already ({made or 'by another export'}): "
                  f"{path} not imported")
            continue
        taken.add((planned.arm, planned.seed))
        here = planned.config  # the exported config, tracked here: this data, device, experiment; not compiled
        cfg = build_config(export["config"], {"data": here.data, "device": here.device, "output_dir": here.output_dir,
                                              "experiment_name": study.experiment_name, "register": here.register,
                                              "system_metrics": False, "compile": "off"})
        key = cfg.data_key()
        if key not in fingerprints:  # one data set in memory at a time
            fingerprints[key] = load_run_data(cfg).fingerprint()
        if not check_same_data(export, fingerprints[key], path, cfg.data):
            print(f"  {path}: the same faces, labels and splits, but decoded to other pixels (another image "
                  "decoder where it trained); test is evaluated on the pixels here", flush=True)
        todo.append((planned, path, export, cfg))
    imported, data_cache = [], {}
    for planned, path, export, cfg in todo:
        if dry_run:
            print(f"  {planned.arm:20s} seed {planned.seed:<6d} would be imported from {path}")
            continue
        key = cfg.data_key()
        if key not in data_cache:
            data_cache = {key: load_run_data(cfg)}
        summary = import_run(export, path, cfg, data_cache[key], tags={"study_file": study.name, "arm": planned.arm})
        print(f"  {planned.arm:20s} seed {planned.seed:<6d} imported from {path}: run {summary.run_id}", flush=True)
        imported.append(summary.run_id)
    return imported


def check_pretrained_weights(runs: list[PlannedRun]) -> None:
    """Loads once each pretrained source the new runs start from (ImageNet weights through timm's hub or
    cache, a local file), so weights that cannot be had (offline, a wrong path) stop the study before its
    first run, not after hours of other arms' training at the first run that needs them."""
    from fer_exp.models import PretrainedWeightsError, check_pretrained

    checked = set()
    for planned in runs:
        cfg = planned.config
        if (cfg.model, cfg.pretrained) in checked:
            continue
        checked.add((cfg.model, cfg.pretrained))
        try:
            check_pretrained(cfg.model, cfg.pretrained)
        except PretrainedWeightsError as exc:
            raise PretrainedWeightsError(f"arm {planned.arm} starts from pretrained={cfg.pretrained}, which cannot be "
                                         f"loaded, so no run was started: {exc}") from None


def run_study(study: StudyFile, dry_run: bool = False, progress: bool = True,
              imports: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Make the runs the store lacks; returns (all run ids of the study, the ids made now). With
    ``imports`` (exports of runs trained elsewhere, or folders of them), track those instead and train
    nothing: the runs still missing are listed, for the same command without them to make."""
    import mlflow

    from fer_exp.experiment import (HOST_TAG, RunBusy, TrackingError, check_tracking_store, load_run_data,
                                    resume_experiment, run_experiment)
    from fer_exp.tracking import tracking_uri

    check_tracking_store(tracking_uri(), write=not dry_run)  # a dry run only reads the store
    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    new = import_study_runs(study, imports, client, dry_run) if imports else []
    experiment_id = experiment_of(client, study)
    plan = [(planned, find_made_run(client, experiment_id, study, planned)) for planned in study.runs]
    todo = [p for p, made in plan if made is None]
    interrupted = {id(p): find_interrupted_run(client, experiment_id, study, p) for p in todo}
    print(f"study {study.name}: {len(study.runs)} run(s) in experiment {study.experiment_name}, "
          f"{len(study.runs) - len(todo)} already made, {len(todo)} to make", flush=True)
    for planned, made in plan:
        left = interrupted.get(id(planned))
        print(f"  {planned.arm:20s} seed {planned.seed:<6d} " + (
            f"made: {made}" if made else f"to resume: {left.info.run_id} ({left.info.status})" if left else "to make"))
    if dry_run or imports:
        if imports and todo and not dry_run:
            print(f"{len(todo)} run(s) still to make: the same command without --import makes them", flush=True)
        return [made for _, made in plan if made], new
    check_pretrained_weights(todo)  # (a resumed run has its weights, but one that cannot resume starts anew)
    data_cache: dict = {}
    ids, new = [], []
    for index, (planned, made) in enumerate(plan):
        if made:
            ids.append(made)
            continue
        cfg = planned.config
        key = cfg.data_key()
        if key not in data_cache:
            data_cache = {key: load_run_data(cfg)}  # one data set in memory at a time
        print(f"\n[{index + 1}/{len(plan)}] {planned.arm} seed {planned.seed}", flush=True)
        # looked at again now: another command on this study (another terminal, another machine on the
        # same store) may have made or started the run since the plan above
        experiment_id = experiment_of(client, study)
        made = find_made_run(client, experiment_id, study, planned)
        if made:
            print(f"made meanwhile by another command: {made}", flush=True)
            ids.append(made)
            continue
        left = find_interrupted_run(client, experiment_id, study, planned)
        summary = None
        if left is not None:  # an interrupted run of this study: go on from its last epoch, not from scratch
            host = left.data.tags.get(HOST_TAG)
            if left.info.status == "RUNNING" and host not in (None, socket.gethostname()):
                print(f"skipped: run {left.info.run_id} is RUNNING on {host}, where it may still train; the same command "
                      "there resumes it if its command is gone, and here compares it once it has finished", flush=True)
                continue
            try:
                summary = start_claimed(functools.partial(resume_experiment, left.info.run_id, cfg, progress=progress,
                                                          data=data_cache[key]), client, study, None, left, ids)
                if summary is None:  # resumed meanwhile by another command
                    continue
            except RunBusy as busy:  # another command makes it now: not twice
                print(f"skipped: run {left.info.run_id} is still training in process {busy.holder} (another command); "
                      "the same command compares it once it has finished", flush=True)
                continue
            except (TrackingError, ConfigError) as exc:
                print(f"run {left.info.run_id} cannot be resumed ({exc}); making a new one", flush=True)
        if summary is None:
            summary = start_claimed(functools.partial(run_experiment, cfg, progress=progress, data=data_cache[key],
                                                      tags={"study_file": study.name, "arm": planned.arm}),
                                    client, study, planned, left, ids)
            if summary is None:  # made or started meanwhile by another command
                continue
        ids.append(summary.run_id)
        new.append(summary.run_id)
    return ids, new
