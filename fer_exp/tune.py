"""Optuna studies over the training configuration, each trial a nested MLflow run.

A study file (``experiments/tune_<model>.yaml``) holds a training config (optionally on top of a
``base:`` experiment file), a ``study:`` block (:class:`~fer_exp.config.StudyConfig`) and a
``search_space:`` block (:mod:`fer_exp.search_space`). :func:`tune` then:

- opens the study in an Optuna RDB storage (sqlite beside the MLflow store by default, PostgreSQL
  for many machines), with heartbeats: a trial whose worker was killed is failed and queued again
  (an interrupted one is queued again at once);
- creates one parent MLflow run per study (its id kept in the study, so a resumed study reopens it);
- runs trials in ``workers`` processes; each trial is a normal training run (``run_experiment``)
  nested under the parent with ``parent_run_id``, selecting on val and never touching test; an
  Optuna pruner stops bad trials through a training-loop callback (the run ends KILLED);
- counts trials exactly: a worker claims a trial only while the study holds fewer finished-or-running
  trials than the target, so ``n_trials`` finished trials are added, none twice;
- logs best value, best params, the trials table and Optuna's figures to the parent run, and with
  ``retrain_best`` trains the best configuration, tests it once and logs the model.

MLflow is imported only when ``tracking`` is on, so studies also run where it is not installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from fer_exp.config import (
    CHOICES,
    RESUMABLE_FIELDS,
    Config,
    ConfigError,
    StudyConfig,
    build_config,
    build_study_config,
    read_experiment,
    recorded_config,
    validate,
)
from fer_exp.errors import counted, first_line
from fer_exp.models import PretrainedWeightsError, check_pretrained
from fer_exp.search_space import Param, parse_enqueue, parse_space, space_spec
from fer_exp.train import Callback, StopTraining, raise_if_stop_requested, stop_on_signals, stop_requested
from fer_exp.tune_report import ParentRun, StudyError, format_params, format_table, mask_url, study_summary

MAX_RETRIES = 2  # a trial whose worker dies is run again at most this often
STALE_AFTER = 3  # heartbeats missed before a running trial counts as lost
FINISHED = ("COMPLETE", "PRUNED")
CLAIMED = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")
ACTIVE = ("COMPLETE", "PRUNED", "RUNNING")
# config fields that may differ when a study is resumed: how it runs, and the data's path (the same
# data sits at different paths on different machines)
REPO_EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _optuna():
    import optuna
    from optuna.exceptions import ExperimentalWarning

    warnings.filterwarnings("ignore", category=ExperimentalWarning)
    # fer-exp runs the heartbeat itself around ask/tell (Heartbeat, fail_stale_trials in Worker.claim)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


# ================================================================== the study file


@dataclass
class StudyPlan:
    """Everything a study needs, resolved and checked before any trial starts."""

    path: str
    config: Config  # the trials' config before the searched values
    space: tuple[Param, ...]
    study: StudyConfig
    fixed_by_cli: tuple[str, ...] = ()
    enqueued: tuple[dict, ...] = ()

    @property
    def direction(self) -> str:
        return "minimize" if self.config.select_metric == "val_loss" else "maximize"

    def trial_config(self, params: dict) -> Config:
        return validate(dataclasses.replace(self.config, **params))


def find_study_file(model: str | None) -> Path:
    """experiments/tune_<model>.yaml, in the working directory or beside the package (a checkout)."""
    if model is not None and model not in CHOICES["model"]:
        raise ConfigError(f"model must be one of {', '.join(CHOICES['model'])}, got {model!r}")
    name = f"tune_{model or 'cnn'}.yaml"
    for folder in (Path("experiments"), REPO_EXPERIMENTS):
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(f"no study file given and no experiments/{name} found; pass --config FILE, a study file "
                      "with a search_space block (see experiments/tune_cnn.yaml in the fer-exp repository)")


def plan_study(path: str | Path | None, config_overrides: dict | None = None,
               study_overrides: dict | None = None) -> StudyPlan:
    """Read a study file and the command-line values: the base config, the space, the study settings.

    A config field given on the command line is fixed for every trial and leaves the space."""
    config_overrides = {k: v for k, v in (config_overrides or {}).items() if v is not None}
    path = Path(path) if path else find_study_file(config_overrides.get("model"))
    values, sections = read_experiment(path)
    if "search_space" not in sections:
        raise ConfigError(f"{path}: a study file needs a search_space block (see experiments/tune_cnn.yaml)")
    config = build_config(values, config_overrides)
    study = build_study_config(sections.get("study"), f"{path}: study", study_overrides)
    if not study.study_name:
        study = dataclasses.replace(study, study_name=path.stem)
    block = dict(sections["search_space"]) if isinstance(sections["search_space"], dict) else sections["search_space"]
    fixed = tuple(name for name in (block if isinstance(block, dict) else {}) if name in config_overrides)
    for name in fixed:
        del block[name]
    if fixed and not block:
        raise ConfigError(f"{path}: the options {', '.join('--' + n.replace('_', '-') for n in fixed)} fix every field "
                          "the study searches, leaving nothing to tune; drop one of them (or train the configuration "
                          "with fer-exp train)")
    space = parse_space(block, str(path), config)
    enqueued = tuple(parse_enqueue(study.enqueue, space, fixed=fixed)) if study.enqueue else ()
    return StudyPlan(str(path), config, space, study, fixed, enqueued)


# ================================================================== storage


def default_storage_url(tracking: bool) -> str:
    """sqlite optuna.db beside the MLflow sqlite store, else in the working directory."""
    if tracking:
        from fer_exp.experiment import sqlite_file
        from fer_exp.tracking import tracking_uri

        store = sqlite_file(tracking_uri())
        if store is not None:
            return "sqlite:///" + str(store.parent / "optuna.db")
    return "sqlite:///optuna.db"


def make_storage(url: str, heartbeat: int, on_stale=None):
    """An Optuna RDB storage with heartbeats, so killed workers' trials are failed and retried."""
    optuna = _optuna()
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    from fer_exp.experiment import TrackingError, check_database_answers, database_url

    try:
        check_database_answers(url, what="the Optuna storage", fix="pass --storage a reachable one")
    except TrackingError as exc:
        raise StudyError(str(exc)) from None

    try:
        return optuna.storages.RDBStorage(database_url(url), engine_kwargs=engine, heartbeat_interval=heartbeat,
                                          grace_period=STALE_AFTER * heartbeat, heartbeat_stale_trial_callback=on_stale)
    except Exception as exc:  # bad URL, server down, missing driver: say which storage and why
        hint = " (install the driver: pip install 'fer-exp[postgres]')" if isinstance(exc, ImportError) else ""
        raise StudyError(f"cannot open the Optuna storage {mask_url(url)}: {type(exc).__name__}: "
                         f"{mask_url(first_line(exc))}{hint}") from None


def make_sampler(sc: StudyConfig, seed: int):
    optuna = _optuna()
    if sc.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sc.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=sc.sampler_startup_trials)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=sc.sampler_startup_trials, multivariate=True)


def trial_seeded_sampler(make, seed: int):
    """The study's sampler (``make(seed)``), seeded afresh for each trial from ``seed`` and the trial's
    number. Trial numbers are the study's own, so every process proposing into one study (workers,
    commands started together, machines) draws from a stream of its own, where one seed for a whole
    command made commands started together propose the same trials; the same seed still makes the same
    study, and a resumed study does not replay its first proposals."""
    optuna = _optuna()

    class _TrialSeeded(optuna.samplers.BaseSampler):
        def __init__(self):
            self.sampler = make(seed)

        def before_trial(self, study, trial):
            self.sampler = make((seed * 1_000_003 + trial.number) % 2**32)
            self.sampler.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self.sampler.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self.sampler.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.sampler.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values):
            self.sampler.after_trial(study, trial, state, values)

        def reseed_rng(self):
            self.sampler.reseed_rng()

    return _TrialSeeded()


def make_pruner(sc: StudyConfig, epochs: int):
    optuna = _optuna()
    if sc.pruner == "median":
        # trials report epoch 1, 2, ... and Optuna may prune at step == n_warmup_steps: +1, so that
        # `pruner_warmup_epochs` epochs always run in full (1: never pruned inside the LR warm-up epoch)
        return optuna.pruners.MedianPruner(n_startup_trials=sc.pruner_startup_trials,
                                           n_warmup_steps=sc.pruner_warmup_epochs + 1)
    if sc.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1), reduction_factor=3)
    return optuna.pruners.NopPruner()


def count_states(study, states) -> int:
    return sum(t.state.name in states for t in study.get_trials(deepcopy=False))


# ================================================================== tracking of trials


def _client():
    import mlflow

    return mlflow.MlflowClient()


class LostTrialHandler:
    """Heartbeat-stale trial callback: the dead worker's MLflow run becomes FAILED (never left
    RUNNING), then the trial is queued again (at most ``MAX_RETRIES`` times)."""

    def __init__(self, tracking: bool):
        self.tracking = tracking

    def __call__(self, study, trial) -> None:
        optuna = _optuna()
        run_id = trial.user_attrs.get("mlflow_run_id")
        if self.tracking and run_id:
            with contextlib.suppress(Exception):  # the store may be briefly busy: the trial must still be retried
                client = _client()
                client.set_tag(run_id, "trial_state", "FAIL")
                client.set_tag(run_id, "stop_reason", "its worker stopped sending heartbeats (killed or lost)")
                client.set_terminated(run_id, "FAILED")
        retries = len(trial.system_attrs.get("retry_history", []))
        queued = retries < MAX_RETRIES
        print(f"trial {trial.number}: its worker is gone (no heartbeat); marked FAIL"
              + (", queued again" if queued else f", not retried ({MAX_RETRIES} retries used)"), flush=True)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(study, trial)


class PruningCallback(Callback):
    """Reports the selection metric to Optuna after each epoch; a pruned trial stops at once."""

    def __init__(self, trial, metric: str):
        self.trial, self.metric, self.epochs, self.last_value = trial, metric, 0, float("nan")
        self.resumed_after = 0  # a retry that goes on from its interrupted trial's last epoch: that epoch

    def on_fit_start(self, trainer) -> None:
        """A resumed trial reports the epochs it goes on from (its own trial number's first report), so
        the pruner sees the whole curve; they are counted as the interrupted trial's epochs."""
        if trainer.resumed_from is None:
            return
        self.resumed_after = self.epochs = trainer.epoch
        for row in trainer.history:
            self.trial.report(row[self.metric], row["epoch"])

    def on_epoch_end(self, trainer, epoch, metrics) -> None:
        value = metrics[self.metric]
        self.epochs, self.last_value = epoch, value
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            raise StopTraining(f"pruned by Optuna at epoch {epoch} ({self.metric} {value:.4f})")


class Heartbeat:
    """Records a running trial's heartbeat every ``interval`` seconds in a thread."""

    def __init__(self, storage, trial_id: int, interval: int):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # one missed beat is not fatal; three are (STALE_AFTER)
                self.storage.record_heartbeat(self.trial_id)
            if self.stop.wait(self.interval):
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


# ================================================================== workers


@dataclass
class WorkerSpec:
    """What a worker process needs (picklable: the spawn start method sends it)."""

    plan: StudyPlan
    storage_url: str
    target: int  # finished trials the study must hold when the workers are done
    deadline: float | None  # time.time() after which no trial starts
    sampler_seed: int
    worker: int
    workers: int
    parent_run_id: str | None = None
    experiment_id: str | None = None
    tracking_uri: str | None = None


class Worker:
    """Claims trials of the study until it holds ``target`` finished ones, and runs them."""

    def __init__(self, spec: WorkerSpec, lock=None, data=None, on_trial_end=None):
        optuna = _optuna()
        self.spec, self.plan, self.lock = spec, spec.plan, lock or contextlib.nullcontext()
        self.tracking = spec.plan.study.tracking
        self.storage = make_storage(spec.storage_url, spec.plan.study.heartbeat, LostTrialHandler(self.tracking))
        self.study = optuna.load_study(study_name=spec.plan.study.study_name, storage=self.storage,
                                       sampler=trial_seeded_sampler(lambda seed: make_sampler(spec.plan.study, seed),
                                                                  spec.sampler_seed),
                                       pruner=make_pruner(spec.plan.study, spec.plan.config.epochs))
        self.data = {} if data is None else {spec.plan.config.data_key(): data}
        self.on_trial_end = on_trial_end
        self.prefix = f"[worker {spec.worker}] " if spec.workers > 1 else ""
        self.run_folders: dict[str, Path] = {}  # trial run id -> its folder, as the run recorded it
        self.failures_in_a_row = 0

    def load(self, cfg: Config):
        key = cfg.data_key()
        if key not in self.data:  # decoded once per worker (and read from the cache after the first)
            from fer_exp.experiment import load_run_data

            self.data[key] = load_run_data(cfg)
        return self.data[key]

    def say(self, text: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.prefix + text)
        sys.stdout.flush()

    # -- claiming ------------------------------------------------------------------------------
    def claim(self):
        """The next trial to run, or None when the study has its target of finished trials (or the
        deadline passed). Waits while the remaining trials run elsewhere: one may still fail."""
        optuna = _optuna()
        poll = min(self.plan.study.heartbeat, 5)
        waiting_on = None  # the running trials this worker said it waits for
        while True:
            if self.spec.deadline is not None and time.time() >= self.spec.deadline:
                return None
            optuna.storages.fail_stale_trials(self.study)  # a killed worker's trial: FAIL, queued again
            with self.lock:
                trials = self.study.get_trials(deepcopy=False)
                finished = sum(t.state.name in FINISHED for t in trials)
                if finished >= self.spec.target:
                    return None
                # a trial is asked for (a queued one first) only while fewer than the target are finished
                # or running: one asked beyond it would be dropped as surplus, a queued one's parameters with it
                active = sum(t.state.name in ACTIVE for t in trials)
                if active < self.spec.target:
                    raise_if_stop_requested()  # a stop that came after a trial's last step starts no new one
                    trial = self.study.ask()
                    # a heartbeat at once: a process killed before its trial's heartbeats start leaves a trial
                    # that is still found stale (Optuna skips RUNNING trials that never had one)
                    self.storage.record_heartbeat(trial._trial_id)
                    # another machine may have asked at the same moment: the lower trial numbers win
                    ahead = sum(t.state.name in CLAIMED and t.number < trial.number
                                for t in self.study.get_trials(deepcopy=False))
                    if ahead < self.spec.target:
                        return trial
                    trial.set_user_attr("surplus", True)
                    self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    continue
                running = [t.number for t in trials if t.state.name == "RUNNING"]
            if running and running != waiting_on:  # (silence here could last a lost worker's heartbeats)
                waiting_on = running
                self.say(f"waiting for trial(s) {', '.join(map(str, running))}, running in another process (one whose "
                         f"worker is gone is failed and run again after {STALE_AFTER} missed heartbeats, "
                         f"{STALE_AFTER * self.plan.study.heartbeat} s)")
            time.sleep(poll)
            raise_if_stop_requested()

    def run(self) -> None:
        while self.failures_in_a_row < 3:
            trial = self.claim()
            if trial is None:
                return
            self.run_trial(trial)
        self.say("3 trials failed in a row: this worker stops (see the errors above)")

    # -- one trial -------------------------------------------------------------------------------
    def run_trial(self, trial) -> None:
        plan, started = self.plan, time.perf_counter()
        params = {p.name: p.suggest(trial) for p in plan.space}
        attrs = self.storage.get_trial(trial._trial_id).system_attrs
        retry_of, resume_run_id = attrs.get("failed_trial"), attrs.get("resume_run_id")
        trial.set_user_attr("worker", self.spec.worker)
        pruning = PruningCallback(trial, plan.config.select_metric)
        run_ids: list[str] = []
        state, value, error = "FAIL", None, None
        with Heartbeat(self.storage, trial._trial_id, plan.study.heartbeat):
            try:
                cfg = plan.trial_config(params)
                cfg = dataclasses.replace(cfg, run_name=f"{plan.study.study_name} #{trial.number}")
                data = self.load(cfg)
                self.say(f"trial {trial.number} started: {format_params(params)}"
                         + (f" (retry of trial {retry_of})" if retry_of is not None else ""))
                result = self.fit(cfg, data, trial, pruning, run_ids, retry_of, resume_run_id)
                value = result.best_value
                state = "COMPLETE" if math.isfinite(value) else "FAIL"
                if state == "FAIL":
                    error = f"{cfg.select_metric} is {value}"
            except StopTraining as stop:
                state, error = "PRUNED", stop.reason
            except KeyboardInterrupt:
                try:
                    if self.finish(trial, "FAIL", None, run_ids, "interrupted (Ctrl-C or SIGTERM)", pruning):
                        self.queue_again(trial, run_ids)
                except Exception as exc:  # the stop goes on: the study is resumed as it is
                    self.say(f"trial {trial.number}: its interruption could not be recorded ({first_line(exc)})")
                raise
            except Exception as exc:  # a config that breaks training fails its trial, not the study
                error = f"{type(exc).__name__}: {exc}"
        self.finish(trial, state, value, run_ids, error, pruning)
        seconds = time.perf_counter() - started
        self.failures_in_a_row = self.failures_in_a_row + 1 if state == "FAIL" else 0
        try:
            best = self.study.best_trial
            best_text = f"best {best.value:.4f} (#{best.number})"
        except ValueError:
            best, best_text = None, "no complete trial yet"
        shown = f"{value:.4f}" if value is not None and math.isfinite(value) else "-"
        if state == "PRUNED":
            shown = f"{pruning.last_value:.4f}"
        self.say(f"trial {trial.number} {state:8s} {plan.config.select_metric} {shown}  {best_text}  "
                 f"{format_params(params)}  [{counted(pruning.epochs, 'epoch')}, {seconds:.0f} s]"
                 + (f"  ({error})" if error and state != "PRUNED" else ""))
        if self.tracking and best is not None and self.spec.parent_run_id:
            with contextlib.suppress(Exception):
                from fer_exp.tracking import SELECTED_METRIC

                _client().log_metric(self.spec.parent_run_id, SELECTED_METRIC, best.value,
                                     step=trial.number)
        if self.on_trial_end is not None:
            self.on_trial_end(state)

    def fit(self, cfg: Config, data, trial, pruning: PruningCallback, run_ids: list, retry_of, resume_run_id=None):
        """Train one trial: a nested MLflow run when tracking, else the bare training loop. The retry of
        an interrupted trial goes on in that trial's run from its last epoch where its checkpoint is here."""
        if not self.tracking:
            from fer_exp.train import Trainer

            with tempfile.TemporaryDirectory(prefix="fer-trial-") as folder:
                return Trainer(cfg, data, folder, callbacks=[pruning], progress=False).fit(evaluate_test=False)
        import mlflow

        from fer_exp.experiment import resume_experiment, run_experiment

        tags = {"study": self.plan.study.study_name, "trial": str(trial.number), "trial_state": "RUNNING",
                "fer_exp.role": "trial", "worker": str(self.spec.worker)}
        if retry_of is not None:
            tags["retry_of_trial"] = str(retry_of)

        def started(run_id: str) -> None:
            run_ids.append(run_id)
            self.run_folders[run_id] = Path(mlflow.get_run(run_id).data.tags["checkpoint_dir"]).parent
            trial.set_user_attr("mlflow_run_id", run_id)
            if run_id == resume_run_id:  # the interrupted trial's run is this trial's now
                mlflow.set_tags({**tags, "mlflow.runName": cfg.run_name})
                with contextlib.suppress(Exception):  # (run_experiment clears its stop_reason)
                    mlflow.delete_tag("error")

        interrupted = False
        options = dict(progress=False, log_model=False, data=data, evaluate_test=False, log_checkpoints=False,
                       on_run_start=started)
        try:
            if resume_run_id is not None:
                try:
                    return resume_experiment(resume_run_id, cfg, trial=True, callbacks=[pruning], **options).result
                except Exception as exc:  # not reopened (another machine, a deleted run, a broken last.pt)
                    if run_ids:
                        raise
                    self.say(f"trial {trial.number}: run {resume_run_id} cannot go on here ({first_line(exc)}); "
                             "training from the start")
            return run_experiment(cfg, [pruning], parent_run_id=self.spec.parent_run_id,
                                  experiment_id=self.spec.experiment_id, tags=tags, **options).result
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:  # trials keep no weights (--retrain-best trains the chosen configuration again), but an
            # interrupted one keeps its last epoch for the retry that the resuming command runs
            for run_id in run_ids:
                if not (interrupted and self.last_checkpoint(run_id)):
                    shutil.rmtree(self.run_folder(run_id), ignore_errors=True)

    def run_folder(self, run_id: str) -> Path:
        """Where a trial's run keeps its checkpoints (``checkpoints/`` in it): as its run recorded it."""
        return self.run_folders.get(run_id) or Path(self.plan.config.output_dir) / run_id

    def last_checkpoint(self, run_id: str | None) -> bool:
        return run_id is not None and (self.run_folder(run_id) / "checkpoints" / "last.pt").is_file()

    def finish(self, trial, state: str, value, run_ids: list, error: str | None, pruning: PruningCallback) -> bool:
        """Tell Optuna the outcome and make the MLflow run say the same. False where the study had
        already declared the trial lost (and queued it again itself)."""
        optuna = _optuna()
        told = True
        try:
            trial.set_user_attr("epochs_run", pruning.epochs)
            if pruning.resumed_after:  # trained by the interrupted trial it goes on from, counted there
                trial.set_user_attr("epochs_resumed", pruning.resumed_after)
            if error:
                trial.set_user_attr("error", error[:500])
            if state == "COMPLETE":
                self.study.tell(trial, value)
            else:
                self.study.tell(trial, state=getattr(optuna.trial.TrialState, state))
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):  # ValueError: "Cannot tell a FAIL trial"
            told, state, error = False, "FAIL", "declared lost (no heartbeat) while it still ran; its result is dropped"
            self.say(f"trial {trial.number}: {error}")
        if self.tracking and run_ids:
            client = _client()
            client.set_tag(run_ids[0], "trial_state", state)
            if error:
                client.set_tag(run_ids[0], "stop_reason" if state == "PRUNED" else "error", error[:5000])
            if state == "FAIL" and client.get_run(run_ids[0]).info.status in ("RUNNING", "FINISHED"):
                client.set_terminated(run_ids[0], "FAILED")
        return told

    def queue_again(self, trial, run_ids: list) -> None:
        """An interrupted trial (Ctrl-C, SIGTERM, its command killed) is queued again with its
        parameters, as a killed worker's is, so the command that resumes the study runs it rather than
        a new proposal (an enqueued recipe is not lost to an interruption). Where an epoch of it finished
        (tracking on), the retry goes on from there in the same run (and reports that run's epochs so
        far for the pruner). Interruptions are not failures: they do not count towards MAX_RETRIES."""
        optuna = _optuna()
        frozen = self.storage.get_trial(trial._trial_id)
        # its origin, not the pruner's records: SuccessiveHalving and Hyperband skip the rungs a trial holds
        # (completed_rung_N), so a retry would pass them unjudged; one that goes on reports its epochs again
        attrs = {key: value for key, value in frozen.system_attrs.items() if not key.startswith("completed_rung_")}
        attrs["failed_trial"] = attrs.get("failed_trial", frozen.number)
        source = run_ids[0] if run_ids else attrs.pop("resume_run_id", None)  # (a retry stopped before it went on)
        attrs.pop("resume_run_id", None)
        if self.last_checkpoint(source):
            attrs["resume_run_id"] = source
        self.study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING, params=frozen.params, distributions=frozen.distributions,
            system_attrs=attrs))
        self.say(f"trial {trial.number}: interrupted; queued again for the command that resumes the study"
                 + (" (it goes on from its last epoch)" if "resume_run_id" in attrs else ""))


def worker_main(spec: WorkerSpec, lock) -> None:
    """Entry point of a worker process."""
    stop_on_signals(second_stops_at_once=False)  # the main process may forward a Ctrl-C the worker also got
    _stop_with_parent()
    if spec.tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(spec.tracking_uri)
    _share_cpu(spec.workers)
    try:
        Worker(spec, lock).run()
    except KeyboardInterrupt:
        sys.exit(130)


def _stop_with_parent(poll: float = 1.0) -> None:
    """A worker whose command dies without a word (SIGKILL, a lost terminal) stops as its command's
    SIGTERM would stop it (its trial's run KILLED, at the next step), instead of running on unseen and
    taking new trials: a watch thread sends this process SIGTERM once its parent is gone."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="fer-exp parent watch", daemon=True).start()


def _share_cpu(workers: int) -> None:
    """Workers on one CPU split its cores rather than each taking all of them."""
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


# ================================================================== the command


@dataclass
class TuneResult:
    study_name: str
    storage: str
    summary: dict
    parent_run_id: str | None
    experiment_id: str | None = None
    retrain_run_id: str | None = None
    retrain_test: dict | None = None


def open_study(plan: StudyPlan, storage_url: str, data_members: dict | None = None):
    """Create the study, or load it and check it is the same study (config and space, and the same faces:
    ``data_members``, the digests of the splits' members, where the study recorded them)."""
    optuna = _optuna()
    storage = make_storage(storage_url, plan.study.heartbeat)
    name = plan.study.study_name
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        study = None
    definition = {"config": plan.config.to_dict(), "search_space": space_spec(plan.space),
                  "select_metric": plan.config.select_metric}
    if study is None:
        study = optuna.create_study(study_name=name, storage=storage, direction=plan.direction, load_if_exists=True)
        if "definition" not in study.user_attrs:
            study.set_user_attr("definition", definition)
            if data_members:
                study.set_user_attr("data_members", data_members)
            for params in plan.enqueued:
                study.enqueue_trial(params)
        return study, False
    known = study.user_attrs.get("definition")
    if known:
        known = {**known, "config": recorded_config(known["config"])}  # fields added since: their defaults
        changed = [k for k in definition["config"] if k not in RESUMABLE_FIELDS
                   and known["config"].get(k) != definition["config"][k]]
        if known["search_space"] != definition["search_space"]:
            changed.append("search_space")
        if changed:
            detail = ", ".join(f"{k}: {known['config'].get(k)!r} -> {definition['config'][k]!r}" if k != "search_space"
                               else "search_space" for k in changed)
            raise StudyError(f"study {name!r} in {mask_url(storage_url)} was made with another configuration "
                             f"({detail}); its trials would not compare. Resume it unchanged, or use a new --study-name.")
    made_on = study.user_attrs.get("data_members")
    if data_members and not made_on:  # a study made before they were kept: from now on
        study.set_user_attr("data_members", data_members)
    seen = ("train", "val")  # what trials train and select on (test is the retraining's, not the trials')
    if made_on and data_members and any(made_on.get(k) != data_members.get(k) for k in seen):
        other = ", ".join(split for split in seen if made_on.get(split) != data_members.get(split))
        raise StudyError(f"study {name!r} in {mask_url(storage_url)} was made on other faces than --data "
                         f"{plan.config.data} holds (its {other} split(s) differ: other images or labels); its trials "
                         "would not compare. Resume it on the data it was made on, or use a new --study-name.")
    enqueue_missing(study, plan.enqueued)
    return study, True


def enqueue_missing(study, enqueued: tuple[dict, ...]) -> None:
    """A resumed study's enqueue: the parameter sets it holds no trial of yet are queued to run first, those
    it holds (the study file's recipe, run when the study was new) are not run twice; both are said. Called
    under the storage's lock, so commands resuming together queue each once."""
    waiting = (_optuna().trial.TrialState.WAITING,)
    queued, held = [], []
    for params in enqueued:
        before = len(study.get_trials(deepcopy=False, states=waiting))
        study.enqueue_trial(params, skip_if_exists=True)
        (queued if len(study.get_trials(deepcopy=False, states=waiting)) > before else held).append(params)
    if queued:
        print("enqueue: queued to run first: " + "; ".join(format_params(p) for p in queued), flush=True)
    if held:
        print("enqueue: already trials of the study, not queued again: " + "; ".join(format_params(p) for p in held),
              flush=True)


def join_study(plan: StudyPlan, storage_url: str, data_members: dict | None = None):
    """The study, whether it was resumed, and its parent MLflow run (None without tracking), under the
    storage's :func:`~fer_exp.experiment.database_lock`: of commands starting one study together (on one
    machine or several), one makes the study and its parent run, the others find them."""
    from fer_exp.experiment import database_lock

    with database_lock(storage_url):
        study, resumed = open_study(plan, storage_url, data_members)
        return study, resumed, ParentRun(plan, study, storage_url) if plan.study.tracking else None


def tune(plan: StudyPlan, progress: bool = True) -> TuneResult:
    """Run (or resume) the study of ``plan``; see the module docstring."""
    from tqdm.auto import tqdm

    from fer_exp.experiment import check_output_dir, check_sqlite_store, check_tracking_store, load_run_data

    sc = plan.study
    if sc.tracking:
        from fer_exp.tracking import tracking_uri

        check_tracking_store(tracking_uri())
    storage_url = sc.storage or default_storage_url(sc.tracking)
    if storage_url.startswith("sqlite:"):
        check_sqlite_store(storage_url, "the Optuna storage", "pass --storage a sqlite file you can write, e.g. "
                           "sqlite:///optuna.db, or a database URL")
    data = load_run_data(plan.config)  # bad data fails here, once, and the decode cache is warm for the workers
    check_output_dir(plan.config.output_dir)
    if sc.retrain_best and not sc.n_trials and not sc.total_trials:  # only retraining: the study must be there
        names = _optuna().get_all_study_names(make_storage(storage_url, sc.heartbeat))
        if sc.study_name not in names:
            raise StudyError(f"--n-trials 0 --retrain-best: no study {sc.study_name!r} in {mask_url(storage_url)} to retrain "
                             f"the best trial of (studies there: {', '.join(names) or 'none'}); give its --study-name")
    if not any(p.name in ("model", "pretrained") for p in plan.space):  # (else each trial's run loads its own)
        try:  # weights that cannot be had (offline, a wrong path) stop the study before any trial fails on them
            check_pretrained(plan.config.model, plan.config.pretrained)
        except PretrainedWeightsError as exc:
            raise PretrainedWeightsError(f"{exc} No study or trial was started.") from None
    if stop_requested():  # a Ctrl-C while the data loaded: no study or parent run is made
        print("interrupted before the study started: no study or run was made", file=sys.stderr)
        raise KeyboardInterrupt
    study, resumed, parent = join_study(plan, storage_url, data.members())
    finished_before = count_states(study, FINISHED)
    target = sc.total_trials or finished_before + sc.n_trials
    print(f"study {sc.study_name} ({'resumed, ' + str(finished_before) + ' finished trials' if resumed else 'new'}) "
          f"in {mask_url(storage_url)}: {plan.config.model}, {plan.direction} {plan.config.select_metric}, "
          f"sampler {sc.sampler}, pruner {sc.pruner}, {counted(plan.config.epochs, 'epoch')} a trial, "
          f"{max(target - finished_before, 0)} trial(s) to run on {sc.workers} worker(s)")
    print("searching: " + "; ".join(f"{p.name} {p.describe()}" for p in plan.space)
          + (f" (fixed by the command line: {', '.join(plan.fixed_by_cli)})" if plan.fixed_by_cli else ""))
    retries = [t for t in study.get_trials(deepcopy=False, states=[_optuna().trial.TrialState.WAITING])
               if "failed_trial" in t.system_attrs]
    if retries:  # run first: queued again when their trials were interrupted or their workers lost
        print("queued again: " + "; ".join(
            f"trial {t.system_attrs['failed_trial']} ({format_params(t.params)})"
            + (" from its last epoch" if "resume_run_id" in t.system_attrs else "") for t in retries))
    if parent:
        print(f"parent run {parent.run_id} (experiment {parent.experiment_id}) in {mask_url(parent.uri)}")
    sys.stdout.flush()
    deadline = time.time() + sc.timeout if sc.timeout else None
    specs = [WorkerSpec(plan, storage_url, target, deadline, plan.config.seed, w, sc.workers,
                        parent.run_id if parent else None, parent.experiment_id if parent else None,
                        parent.uri if parent else None) for w in range(sc.workers)]
    bar = tqdm(total=target, initial=min(finished_before, target), desc=f"study {sc.study_name}", unit="trial",
               disable=not progress or None, dynamic_ncols=True)
    interrupted = False
    try:
        if sc.workers == 1:
            Worker(specs[0], data=data, on_trial_end=lambda state: bar.update(int(state in FINISHED))).run()
        else:
            run_worker_processes(specs, study, bar)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    interrupted = interrupted or stop_requested()  # one that came as the last trial finished starts no retraining
    summary = study_summary(study, plan)
    print("\n" + format_table(study, plan))
    result = TuneResult(sc.study_name, mask_url(storage_url), summary, parent.run_id if parent else None,
                        parent.experiment_id if parent else None)
    if "best" in summary:
        best = summary["best"]
        print(f"\nbest trial #{best['number']}: {summary['metric']} {best['value']:.4f}  {format_params(best['params'])}"
              + (f"  run {best['mlflow_run_id']}" if best["mlflow_run_id"] else ""))
    finished, possible, spent = summary["epochs_finished"], summary["epochs_possible"], summary["epochs_spent"]
    if possible:  # the saving over the finished trials; failed or interrupted ones said apart
        print(f"epochs spent: {finished} of {possible} ({100 * (1 - finished / possible):.0f}% saved by pruning and "
              "early stopping)" + (f", and {spent - finished} in failed or interrupted trials" if spent > finished else ""))
    if interrupted:
        if parent:
            parent.summarise("KILLED")
        done = count_states(study, FINISHED)
        # --n-trials adds to what the study holds when the command starts: the same command would add them again
        if sc.total_trials:
            exact = ""
        elif done < target:
            exact = f", with --total-trials {target} for the {target - done} trial(s) of this one still to run " \
                    f"(as it is, it adds {sc.n_trials} more)"
        else:
            exact = f", with --total-trials {target}: its trials are done" + (", so it only retrains the best" if sc.retrain_best else "")
        print(f"interrupted: resume with the same command{exact} (study {sc.study_name}, storage {mask_url(storage_url)}; "
              f"{done} of {target} trials finished)", file=sys.stderr)
        raise KeyboardInterrupt
    finished = count_states(study, FINISHED)
    if finished < target and deadline and time.time() >= deadline:
        print(f"--timeout {sc.timeout:g} s: no trial was started after it, {finished} of {target} trials finished; "
              f"the same command{'' if sc.total_trials else f' with --total-trials {target}'} runs the rest", file=sys.stderr)
    if finished < target and not (deadline and time.time() >= deadline):
        if parent:
            parent.summarise("FAILED")
        raise StudyError(f"the study stopped with {finished} of {target} finished trials: its workers gave up "
                         "(see the errors above); the same command resumes it")
    if sc.retrain_best and "best" in summary:
        try:
            result.retrain_run_id, result.retrain_test = retrain_best(plan, summary["best"], data, parent)
        except KeyboardInterrupt:
            if parent:
                parent.summarise("KILLED")
            raise
    elif sc.retrain_best:
        if parent:
            parent.summarise("FINISHED")
        done = count_states(study, FINISHED)
        raise StudyError(f"--retrain-best: study {sc.study_name} has no complete trial to retrain "
                         f"({f'{done} finished, all pruned' if done else 'no trial finished'}); run more trials (--n-trials N)")
    if parent:
        parent.summarise("FINISHED", retrain=(result.retrain_run_id, result.retrain_test))
    return result


def run_worker_processes(specs: list[WorkerSpec], study, bar) -> None:
    """``len(specs)`` spawned worker processes; the bar follows the study's finished trials."""
    context = multiprocessing.get_context("spawn")  # no fork: torch and its threads do not survive one
    lock = context.Lock()
    processes = [context.Process(target=worker_main, args=(spec, lock), name=f"fer-exp worker {spec.worker}")
                 for spec in specs]
    for process in processes:
        process.start()
        print(f"worker {process.name.split()[-1]} started (pid {process.pid})", flush=True)
    reported, forwarded = set(), None
    while any(p.is_alive() for p in processes):
        time.sleep(1)
        if stop_requested():  # Ctrl-C or SIGTERM here: workers stop at their next step, runs KILLED
            if forwarded is None:
                forwarded = time.time()
                for p in processes:
                    if p.is_alive():
                        p.terminate()  # SIGTERM: the worker's own safe stop
            elif time.time() - forwarded > 120:
                for p in processes:
                    if p.is_alive():
                        p.kill()  # stuck: its trial is failed and retried through the heartbeat
            continue
        bar.n = min(count_states(study, FINISHED), bar.total)
        bar.refresh()
        for i, p in enumerate(processes):
            if not p.is_alive() and p.exitcode not in (0, None) and i not in reported:
                reported.add(i)
                print(f"worker {i} (pid {p.pid}) ended with exit code {p.exitcode}; a trial it was running is "
                      f"failed and retried by the others after {STALE_AFTER * specs[0].plan.study.heartbeat} s "
                      "without heartbeat", flush=True)
    if stop_requested():
        raise KeyboardInterrupt
    bar.n = min(count_states(study, FINISHED), bar.total)
    bar.refresh()


def earlier_retrain(parent: ParentRun, trial_number: int, cfg: Config):
    """The study's earlier retraining of this trial with this config: (a FINISHED one, an interrupted
    one: KILLED, or RUNNING after a SIGKILL), each None where there is none."""
    from fer_exp.study import same_config

    runs = parent.client.search_runs([parent.experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent.run_id}' and tags.`fer_exp.role` = 'retrain' "
        f"and tags.best_trial = '{trial_number}'"), order_by=["attributes.start_time DESC"])
    runs = [r for r in runs if same_config(r.data.params, cfg)]
    done = next((r for r in runs if r.info.status == "FINISHED" and "test_accuracy" in r.data.metrics), None)
    left = next((r for r in runs if r.info.status in ("KILLED", "RUNNING")), None)
    return done, left


def retrain_best(plan: StudyPlan, best: dict, data, parent: ParentRun | None):
    """The best configuration trained with the full budget, tested once, its model logged."""
    cfg = plan.trial_config(best["params"])
    epochs = plan.study.retrain_epochs or cfg.epochs
    cfg = dataclasses.replace(cfg, epochs=epochs, run_name=f"{plan.study.study_name} best (trial #{best['number']})")
    print(f"\nretraining trial #{best['number']}'s configuration for {counted(epochs, 'epoch')}, then testing it once")
    if parent is None:
        from fer_exp.train import Trainer

        with tempfile.TemporaryDirectory(prefix="fer-retrain-") as folder:
            result = Trainer(cfg, data, folder).fit()
        run_id = None
    else:
        from fer_exp.experiment import run_experiment

        done, left = earlier_retrain(parent, best["number"], cfg)
        if done is not None:  # the same command again, on a study that has not changed its best
            print(f"already retrained: run {done.info.run_id} (the study's best is the same trial)")
            t = {k: v for k, v in done.data.metrics.items() if k.startswith("test_")}
            return done.info.run_id, t
        if left is not None:  # interrupted (Ctrl-C, SIGTERM, SIGKILL): go on from its last epoch
            from fer_exp.experiment import resume_experiment

            print(f"resuming the interrupted retraining, run {left.info.run_id} ({left.info.status})")
            summary = resume_experiment(left.info.run_id, cfg, data=data)
        else:
            tags = {"study": plan.study.study_name, "fer_exp.role": "retrain", "study_result": "true",
                    "best_trial": str(best["number"])}
            summary = run_experiment(cfg, data=data, parent_run_id=parent.run_id, experiment_id=parent.experiment_id,
                                     tags=tags)
        result, run_id = summary.result, summary.run_id
    t = result.test_metrics
    print(f"retrained{' run ' + run_id if run_id else ''}: best epoch {result.best_epoch}, test accuracy "
          f"{t['test_accuracy']:.4f}, macro-F1 {t['test_macro_f1']:.4f}"
          + (f" (on the test faces with no copy in train or val: {t['test_accuracy_uncopied']:.4f}, "
             f"{t['test_macro_f1_uncopied']:.4f})" if "test_accuracy_uncopied" in t else ""))
    return run_id, t
