"""One tracked training run: data -> model -> train/evaluate -> MLflow."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from fer_exp.config import Config, ConfigError
from fer_exp.data import FerData, load_data
from fer_exp.errors import first_line
from fer_exp.train import FitResult, RunFailed, StopTraining, Trainer, stop_requested


class TrackingError(RuntimeError):
    """The run cannot be tracked as asked (a deleted experiment, a store that refuses it); found
    before any training, with what to do about it."""


class RunBusy(TrackingError):
    """The run is training now in another process (``holder``, its pid), which holds its checkpoint folder."""

    def __init__(self, message: str, holder: str):
        super().__init__(message)
        self.holder = holder


class TrackingFailed(RunFailed):
    """The tracking or artifact store failed during the run (a full disk, a lost server): the run stops,
    FAILED where the store can still say so, its checkpoints kept for a resume."""


def _database_errors() -> tuple[type[BaseException], ...]:
    """The errors a SQL tracking store raises through MLflow unwrapped (sqlite's "database or disk is full")."""
    import sqlite3

    try:
        import sqlalchemy.exc
    except ImportError:
        return (sqlite3.Error,)
    return (sqlite3.Error, sqlalchemy.exc.SQLAlchemyError)


def check_tracking_store(uri: str, timeout: float = 10.0, write: bool = True) -> None:
    """A tracking store that cannot take runs is reported now, with what to do, rather than as MLflow's
    traceback or after the first epoch: an http(s) server that does not answer (in seconds, not after
    MLflow's minutes of retries); a sqlite store in memory (every run lost at exit), in a file that is
    not a database, or (unless only reading: ``write=False``) where the file or its folder cannot be written.
    A sqlite store is then opened, its tables made if new and it is to be written (:func:`open_sqlite_store`)."""
    if uri.startswith("sqlite:"):
        check_sqlite_store(uri, write=write)
        if write or sqlite_file(uri).exists():
            open_sqlite_store(uri)
    check_database_answers(uri, timeout)
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    from fer_exp.tune_report import mask_url

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered (an auth proxy, a server without /health): MLflow's own calls will say more
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(f"the tracking server {mask_url(uri)} does not answer ({reason}); start it "
                            "(mlflow server ...) or point MLFLOW_TRACKING_URI at a reachable one") from None


DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}  # their servers' default ports


def check_database_answers(uri: str, timeout: float = 10.0, what: str = "the tracking store",
                           fix: str = "point MLFLOW_TRACKING_URI at a reachable one") -> None:
    """A database server (PostgreSQL, MySQL, SQL Server) at ``uri`` that does not take connections is said in
    seconds: SQLAlchemy under MLflow retried for about two minutes, then printed a traceback. A URL
    without a host (a local socket) or of another kind is left to the store to open."""
    from fer_exp.tune_report import mask_url

    try:
        from sqlalchemy.engine import make_url

        url = make_url(uri)
    except Exception:  # not a URL SQLAlchemy reads (a file): not this check's to say
        return
    if url.get_backend_name() not in DATABASE_PORTS or not url.host:  # http, sqlite; a local socket
        return
    if "unix_socket" in url.query or "host" in url.query or (url.get_backend_name() == "mysql" and url.host == "localhost"):
        return  # through a socket (MySQL's drivers take "localhost" to mean theirs), not TCP
    port = url.port or DATABASE_PORTS[url.get_backend_name()]
    try:
        socket.create_connection((url.host, port), timeout=timeout).close()
    except OSError as exc:
        raise TrackingError(f"{what} {mask_url(uri)} does not answer ({exc.strerror or exc}); start its database "
                            f"server or {fix}") from None


def check_sqlite_store(uri: str, what: str = "the tracking store",
                       fix: str = "point MLFLOW_TRACKING_URI at a sqlite file you can write, e.g. sqlite:///mlflow.db",
                       write: bool = True) -> None:
    """A sqlite store (``what``) that cannot keep what is written to it; see :func:`check_tracking_store`."""
    from fer_exp.tune_report import mask_url

    file = sqlite_file(uri)
    if file is None:
        raise TrackingError(f"{what} {mask_url(uri)} is in memory: what it keeps would be lost when the "
                            f"command ends; {fix}")
    if file.is_dir():
        raise TrackingError(f"{what} {mask_url(uri)} names a folder, {file}; {fix}")
    if file.exists():
        try:
            with open(file, "rb") as handle:
                head = handle.read(16)
        except OSError as exc:
            raise TrackingError(f"{what} {file} cannot be read ({exc.strerror or exc}); {fix}") from None
        if head and head != b"SQLite format 3\x00":
            raise TrackingError(f"{what} {file} is not an SQLite database (a file of another kind is "
                                f"there); {fix}")
        if write and not (os.access(file, os.W_OK) and os.access(file.parent, os.W_OK)):  # and a journal beside it
            raise TrackingError(f"{what} {file} (or its folder) cannot be written; fix the permissions "
                                f"or {fix}")
        return
    folder = next(p for p in (file.absolute(), *file.absolute().parents) if p.exists() or p == p.parent)
    if folder != file.absolute() and not folder.is_dir():
        raise TrackingError(f"{what} {file} cannot be made: {folder} is a file, not a folder; {fix}")
    if not os.access(folder, os.W_OK):
        raise TrackingError(f"{what} {file} cannot be made: {folder} cannot be written; {fix}")


def sqlite_file(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URL as SQLAlchemy opens it (relative to the working directory, no ~
    expansion); None for a database in memory."""
    path = uri[len("sqlite:///"):].split("?")[0] if uri.startswith("sqlite:///") else ""
    return None if path in ("", ":memory:") else Path(path)


def database_url(url: str) -> str:
    """``url`` as SQLAlchemy is to open it: ``postgres(ql)://`` with psycopg 3 (the ``postgres`` extra)."""
    return re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", url)


@contextlib.contextmanager
def database_lock(url: str):
    """Held by one process at a time per database, around what two processes must not do at once to it.
    MLflow and Optuna make a new database's tables (MLflow by ~50 migrations, seconds) in whichever
    process opens it first; two doing so at once (two runs started together on a new store, two ``fer-exp
    tune`` on a new storage, on one machine or several) break each other's migration and all but one die
    with a SQL traceback. The study's commands also hold it (on the study's storage) to make the study
    and its parent run once, and to write the parent run's summary. sqlite: ``flock`` on the database's
    folder (no file is left beside it), made here if missing; PostgreSQL: an advisory lock, held by a
    connection of its own. Other URLs, a server that cannot be reached (opening the database then says
    why) and file systems or platforms without locks go unlocked. Reentrant: a thread that holds it
    may take it again (``fer-exp study`` holds it while a run starts, which opens the store)."""
    file = sqlite_file(url) if url.startswith("sqlite:") else None
    key = str(file.absolute().parent) if file is not None else url
    held = _held_database_locks.setdefault(threading.get_ident(), set())
    if key in held:  # a second flock (or advisory lock) of its own would wait for this one forever
        yield
        return
    held.add(key)
    try:
        with _database_lock(url, file):
            yield
    finally:
        held.discard(key)


_held_database_locks: dict[int, set[str]] = {}  # thread -> the database_lock keys it holds


@contextlib.contextmanager
def _database_lock(url: str, file: Path | None):
    if re.match(r"^postgres(ql)?(\+\w+)?://", url):
        with _advisory_lock(database_url(url)):
            yield
        return
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if file is None or fcntl is None:
        yield
        return
    folder = file.absolute().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # the database's own open says what is wrong with the folder
        yield
        return
    try:
        with contextlib.suppress(OSError):  # no locks here (some network file systems): open unlocked
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


HOST_TAG = "fer_exp.host"  # the machine a run was started on
DATABASE_LOCK_KEY = 0x6665722D657870  # "fer-exp": the PostgreSQL advisory lock of database_lock


@contextlib.contextmanager
def _advisory_lock(url: str):
    import sqlalchemy

    try:
        # autocommit: the lock is the session's, and no transaction stays open while it is held (one left
        # idle would meet idle_in_transaction_session_timeout, or a transaction-pooling proxy)
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, isolation_level="AUTOCOMMIT")
        connection = engine.connect()
    except Exception:  # no driver, no server, refused: opening the database itself reports it
        yield
        return
    try:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": DATABASE_LOCK_KEY})
        yield
    finally:
        connection.close()  # the session ends, and its lock with it
        engine.dispose()


def open_sqlite_store(uri: str) -> None:
    """The MLflow store at ``uri`` (sqlite) opened once, its tables made if it is new, under
    :func:`database_lock`. A store MLflow cannot use (made by an older MLflow, whose schema this one
    would have to migrate; a database of something else) is a :class:`TrackingError` saying so."""
    import mlflow

    from fer_exp.tune_report import mask_url

    with database_lock(uri):
        try:
            mlflow.MlflowClient(uri).search_experiments(max_results=1)  # opening the store makes its tables
        except Exception as exc:  # MlflowException, SQLAlchemy's errors: MLflow's first line says what
            raise TrackingError(f"the tracking store {mask_url(uri)} cannot be used: "
                                f"{first_line(exc).replace('<database_uri>', mask_url(uri))}") from None


@contextlib.contextmanager
def run_lock(checkpoint_dir: str | Path):
    """Held while a run trains into ``checkpoint_dir``: a second process that would resume the same
    run is refused while the first lives (both would log into one run and write one folder). The lock
    is the kernel's (``flock`` on ``.lock`` there), so it goes with its process however that ends, even
    by SIGKILL, after which the run resumes. Where ``fcntl`` is missing (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = Path(checkpoint_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / ".lock", "a+")
    except OSError:  # a read-only folder (a probe of a finished machine's run): nothing to lock there
        yield
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise RunBusy(f"the run is still training in process {holder}, which holds {folder / '.lock'}: stop "
                      f"it first (Ctrl-C there, or kill {holder}; it keeps its last epoch), then resume", holder) from None
    except OSError as exc:  # a file system without locks (NFS without lockd, some FUSE mounts): train unlocked
        handle.close()
        print(f"warning: {folder} cannot be locked ({exc.strerror or exc}); a second resume of this run would not "
              "be refused while it trains", file=sys.stderr)
        yield
        return
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield
    finally:
        handle.close()  # releases the lock


def check_artifact_store(experiment) -> None:
    """A local artifact folder that cannot be written fails now, not when the first artifact is logged."""
    location = experiment.artifact_location or ""
    if location.startswith("file://"):
        location = location[len("file://"):]
    if "://" in location or not location:
        return  # a remote artifact store: MLflow's own calls report on it
    try:
        check_output_dir(location)
    except ConfigError:
        raise TrackingError(f"experiment {experiment.name!r} keeps its artifacts in {location}, which cannot be "
                            "written; fix its permissions or use another --experiment-name") from None


def check_output_dir(folder: str | Path, what: str = "checkpoints", option: str = "--output-dir") -> None:
    """Fail now, not after the first epoch (or the last run of a study), when ``what`` cannot be
    written under ``folder`` (made where missing)."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a folder" if blocker else exc.strerror or exc
        raise ConfigError(f"{option.lstrip('-').replace('-', '_')} {folder}: {what} cannot be written there "
                          f"({reason}); choose another folder with {option}") from None


@dataclass
class RunSummary:
    run_id: str
    experiment_id: str
    tracking_uri: str
    result: FitResult


_said: set = set()


def say_once(key, text: str) -> None:
    """``text`` on stderr, once in a process for ``key`` (a study loads its data and builds a run per seed)."""
    if key not in _said:
        _said.add(key)
        print(text, file=sys.stderr)


def load_run_data(cfg: Config) -> FerData:
    """The data a config trains on (decoded once, then read from the cache); bad samples skipped by
    ``on_bad: skip`` are said on stderr (all of them are in the run's data_summary.json)."""
    source, on_bad, seed, val_fraction, duplicates, copy_correlation = cfg.data_key()
    data = load_data(source, on_bad=on_bad, seed=seed, val_fraction=val_fraction, duplicates=duplicates,
                     copy_correlation=copy_correlation)
    skipped = data.report.skipped
    if skipped:
        say_once(("skipped", cfg.data_key()), f"skipped {len(skipped)} bad sample(s) (--on-bad skip): "
                 + "; ".join(f"{where}: {why}" for where, why in skipped[:3])
                 + (f"; ... and {len(skipped) - 3} more (the run's data_summary.json lists them)" if len(skipped) > 3 else ""))
    return data


def resume_config(run_id: str, overrides: dict | None = None, trial: bool = False) -> Config:
    """The config a run was made with (its ``config.yaml``), with command-line ``overrides`` that may
    only change how it runs (device, output folder, ...): a resumed run must train what it trained. A
    tuning trial's run is resumed by its study only (``trial``): resumed as a run, it would be tested."""
    import mlflow

    from fer_exp.config import RESUMABLE_FIELDS, build_config, load_config
    from fer_exp.tracking import tracking_uri

    check_tracking_store(tracking_uri())
    client = mlflow.MlflowClient(tracking_uri())
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise TrackingError(f"no run {run_id} in the tracking store {tracking_uri()}; check MLFLOW_TRACKING_URI") from None
    if run.info.status == "FINISHED":
        raise TrackingError(f"run {run_id} is FINISHED: there is nothing to resume")
    if run.info.lifecycle_stage == "deleted":
        raise TrackingError(f"run {run_id} is deleted; restore it first (mlflow runs restore --run-id {run_id}), "
                            "then resume it")
    if run.data.tags.get("fer_exp.role") == "trial" and not trial:
        study = run.data.tags.get("study", "?")
        raise TrackingError(f"run {run_id} is trial {run.data.tags.get('trial', '?')} of the tuning study {study}: "
                            "a trial is resumed by its study (it selects on val and is never tested): run the same "
                            f"fer-exp tune command again (--study-name {study}), which goes on with it from its last epoch")
    recorded = run.data.tags.get("checkpoint_dir")
    if recorded and Path(recorded).is_dir():
        with run_lock(recorded):  # a run still training here is refused now, before its data is loaded
            pass
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "config.yaml", tmp)
        except Exception:
            raise TrackingError(f"run {run_id} has no config.yaml: it was not made by fer-exp train") from None
        original = load_config(path)
    cfg = build_config(original.to_dict(), overrides)
    changed = [f"{k}: {getattr(original, k)!r} -> {getattr(cfg, k)!r}" for k in original.to_dict()
               if k not in RESUMABLE_FIELDS and getattr(original, k) != getattr(cfg, k)]
    if changed:
        raise ConfigError(f"run {run_id} cannot resume with another config ({'; '.join(changed)}): MLflow keeps its "
                          "params and the schedules are sized by them. Resume it unchanged, or start a new run.")
    experiment = client.get_experiment(run.info.experiment_id).name
    if (overrides or {}).get("experiment_name") not in (None, experiment):
        raise ConfigError(f"run {run_id} is in experiment {experiment!r}: a run cannot move to another experiment "
                          "(leave out --experiment-name, or start a new run there)")
    # where it is and what it is called now (renamed in the UI, say): a --run-name renames it
    named = (overrides or {}).get("run_name") or run.info.run_name
    return replace(cfg, experiment_name=experiment, run_name=named)


def resume_experiment(run_id: str, like: Config, trial: bool = False, **kwargs) -> RunSummary:
    """Run ``run_id`` resumed from its last epoch with its own config, run where and how ``like`` runs
    (device, output folder, ...); ``kwargs`` as for :func:`run_experiment`. Before any training a run
    that cannot resume (no checkpoint, another config, still training elsewhere) is a TrackingError or
    ConfigError that says why."""
    from fer_exp.config import EXECUTION_FIELDS

    where = {k: getattr(like, k) for k in EXECUTION_FIELDS if k not in ("run_name", "experiment_name")}
    return run_experiment(resume_config(run_id, where, trial), resume_run_id=run_id, **kwargs)


def find_last_checkpoint(run_id: str, cfg: Config) -> Path:
    """The run's ``last.pt``: in the output folder, else among its logged artifacts."""
    import mlflow

    recorded = mlflow.MlflowClient().get_run(run_id).data.tags.get("checkpoint_dir")  # absolute, wherever it ran
    for folder in filter(None, (recorded, Path(cfg.output_dir) / run_id / "checkpoints")):
        if (Path(folder) / "last.pt").is_file():
            return Path(folder) / "last.pt"
    local = Path(cfg.output_dir) / run_id / "checkpoints" / "last.pt"
    try:
        last = Path(mlflow.MlflowClient().download_artifacts(run_id, "checkpoints/last.pt", str(local.parent.parent)))
        with contextlib.suppress(Exception):  # the best epoch's, which the test evaluates (restore says if it is missing)
            mlflow.MlflowClient().download_artifacts(run_id, "checkpoints/best.pt", str(local.parent.parent))
        return last
    except Exception:
        epochs = len(mlflow.MlflowClient().get_metric_history(run_id, "val_loss"))
        if epochs:  # it trained: its checkpoints were moved or deleted, not never written
            where = " or ".join(str(f) for f in dict.fromkeys(filter(None, (recorded, local.parent))))
            raise TrackingError(f"run {run_id} logged {epochs} epoch(s) but its last.pt is not in {where}, and none "
                                "was logged: if its output folder was moved, pass the folder that now holds "
                                f"{run_id}/checkpoints as --output-dir; if it is gone, start a new run") from None
        raise TrackingError(f"run {run_id} has no checkpoint to resume from ({local} is missing and none was logged); "
                            "it stopped before its first epoch ended: start a new run") from None


def run_experiment(cfg: Config, callbacks=(), progress: bool = True, log_model: bool = True, *,
                   data: FerData | None = None, parent_run_id: str | None = None, experiment_id: str | None = None,
                   tags: dict | None = None, evaluate_test: bool = True, log_checkpoints: bool = True,
                   on_run_start: Callable[[str], None] | None = None, resume_run_id: str | None = None,
                   before_start: Callable[[], None] | None = None) -> RunSummary:
    """Load the data (unless given), build the trainer, and train inside an MLflow run.

    The run's experiment is, in this order: ``experiment_id``; the parent run's (``parent_run_id``,
    which also nests the run under it, across processes); the run that ``mlflow run`` started
    (``MLFLOW_RUN_ID``, adopted as this run); ``cfg.experiment_name``. Extra ``callbacks`` (an Optuna
    pruner, say) ride along with tracking. A callback's :class:`StopTraining` ends the run KILLED with
    its reason as the ``stop_reason`` tag, Ctrl-C or SIGTERM likewise; any other error ends it FAILED.
    Tuning trials pass ``evaluate_test=False`` (select on val, never touch test) and no model.
    ``resume_run_id`` continues that (interrupted) run from its ``last.pt``, in the same MLflow run
    (``cfg`` from :func:`resume_config`). ``before_start`` is called once the trainer is built, just
    before the run starts (an exception from it starts nothing); ``on_run_start(run_id)`` once the run has
    started, holds its checkpoint folder's :func:`run_lock` and has its ``config.*`` params (a new run is
    known by its config from then on), before the first epoch.
    """
    import mlflow

    from fer_exp.tracking import MLflowCallback, describe_run, log_config_params, tracking_uri

    check_tracking_store(tracking_uri())  # seconds, before the data is decoded or a step is taken
    if data is None:
        data = load_run_data(cfg)
        if data.missing_train_classes():
            from fer_exp.data.dataset import missing_classes_warning

            print(f"warning: {missing_classes_warning(data.missing_train_classes(), data.format)}", file=sys.stderr)
    check_output_dir(cfg.output_dir)
    if stop_requested():  # a Ctrl-C while the data loaded: no run is made
        print("interrupted before the run started: no run was made", file=sys.stderr)
        raise KeyboardInterrupt
    if cfg.model == "resnet18" and cfg.pretrained == "none" and cfg.freeze_depth > 0:
        say_once(("frozen at random", cfg.freeze_depth), f"note: freeze_depth {cfg.freeze_depth} with pretrained none "
                 "freezes randomly initialised layers for the whole run; --freeze-depth 0 trains them")
    trainer = Trainer(cfg, data, checkpoint_dir=cfg.output_dir, progress=progress, load_pretrained=not resume_run_id,
                      callbacks=[MLflowCallback(log_model and evaluate_test, log_checkpoints, tested=evaluate_test), *callbacks])
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    lock = contextlib.ExitStack()
    try:  # a refusal before the run starts must not keep the lock
        if resume_run_id:
            checkpoint = find_last_checkpoint(resume_run_id, cfg)
            lock.enter_context(run_lock(checkpoint.parent))  # held from before the run is reopened until it ends
            try:
                trainer.restore(checkpoint)
            except (ValueError, RuntimeError, KeyError) as exc:
                raise TrackingError(f"cannot resume run {resume_run_id} from {checkpoint}: {exc}") from None
            launch = os.environ.pop("MLFLOW_RUN_ID", None)  # `mlflow run -P resume=...` made a run of its own
            if launch and launch != resume_run_id:
                client = mlflow.MlflowClient()
                client.set_tag(launch, "mlflow.parentRunId", resume_run_id)
                client.set_tag(launch, "fer_exp.role", "launch")
                client.set_tag(launch, "mlflow.runName", f"resume of {cfg.run_name or describe_run(cfg)}")
                client.set_tag(launch, "mlflow.note.content", f"Resumed run {resume_run_id}; its metrics are there.")
                resumed_in = client.get_run(resume_run_id).info.experiment_id
                launched_in = client.get_run(launch).info.experiment_id
                if launched_in != resumed_in:  # mlflow run chose the experiment before fer-exp knew the run
                    name = client.get_experiment(resumed_in).name
                    print(f"note: mlflow run made its own run {launch} in experiment "
                          f"{client.get_experiment(launched_in).name!r}, not beside the resumed run in {name!r}; "
                          f"pass --experiment-name {name} to mlflow run to keep them together", file=sys.stderr)
        try:
            if experiment_id is None and parent_run_id is not None:  # a child lives where its parent does
                experiment_id = mlflow.MlflowClient().get_run(parent_run_id).info.experiment_id
            if experiment_id is None and not resume_run_id and not os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run` made the run and chose its experiment
                experiment_id = mlflow.set_experiment(cfg.experiment_name).experiment_id
            if experiment_id is not None:
                check_artifact_store(mlflow.MlflowClient().get_experiment(experiment_id))
        except mlflow.exceptions.MlflowException as exc:
            raise TrackingError(f"tracking store {uri}: {first_line(exc)}") from None
        if before_start is not None:
            before_start()
        if resume_run_id:
            print(f"resuming run {resume_run_id} after epoch {trainer.epoch} (from {checkpoint})", file=sys.stderr)
    except BaseException:
        lock.close()
        raise
    if resume_run_id:
        start = dict(run_id=resume_run_id, log_system_metrics=cfg.system_metrics)
    else:
        start = dict(run_name=cfg.run_name or describe_run(cfg), experiment_id=experiment_id, parent_run_id=parent_run_id,
                     tags=tags, log_system_metrics=cfg.system_metrics)
    with lock, mlflow.start_run(**start) as run:
        trainer.checkpoint_dir = Path(cfg.output_dir) / run.info.run_id / "checkpoints"
        if resume_run_id and trainer.resumed_from is not None:
            trainer.checkpoint_dir = trainer.resumed_from.parent  # go on writing where it was
        else:
            lock.enter_context(run_lock(trainer.checkpoint_dir))
        try:
            # where it trains, set again by a resume: whether a RUNNING run still trains is known on its host alone
            mlflow.set_tags({"checkpoint_dir": str(trainer.checkpoint_dir.resolve()), HOST_TAG: socket.gethostname()})
            if not resume_run_id:
                log_config_params(cfg)  # again with the run's description at its first epoch: the same values
            else:  # why it stopped before is no longer so: a resumed run that finishes is not "interrupted"
                with contextlib.suppress(mlflow.exceptions.MlflowException):
                    mlflow.delete_tag("stop_reason")
                if cfg.run_name and cfg.run_name != run.info.run_name:  # --run-name on a resume renames the run
                    mlflow.set_tag("mlflow.runName", cfg.run_name)
            if on_run_start is not None:
                on_run_start(run.info.run_id)
            result = trainer.fit(evaluate_test=evaluate_test)
        except StopTraining as stop:
            mlflow.set_tag("stop_reason", stop.reason)
            mlflow.end_run(status="KILLED")
            raise
        except RunFailed as failed:  # diverged, or a checkpoint could not be written
            mlflow.set_tag("stop_reason", str(failed))
            mlflow.end_run(status="FAILED")
            raise
        except (OSError, mlflow.exceptions.MlflowException, *_database_errors()) as exc:
            # the tracking or artifact store failed under the run (a full disk, a lost server): mark the run
            # FAILED where the store still lets us, and say what is kept and how to go on
            reason = first_line(exc)
            with contextlib.suppress(Exception):
                mlflow.set_tag("stop_reason", f"tracking failed: {reason}")
            with contextlib.suppress(Exception):
                mlflow.end_run(status="FAILED")
            kept = trainer.checkpoint_dir / "last.pt"
            raise TrackingFailed(
                f"run {run.info.run_id} could not be tracked after {len(trainer.history)} complete epoch(s): {reason}"
                + (f"; its checkpoints are in {trainer.checkpoint_dir}: once the store can be written again (free "
                   f"space there), resume it with: fer-exp train --resume {run.info.run_id}" if kept.is_file() else "")
            ) from exc
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the run is KILLED, last.pt of the last epoch stays
            mlflow.set_tag("stop_reason", "interrupted (Ctrl-C or SIGTERM)")
            mlflow.end_run(status="KILLED")
            resumable = evaluate_test and (trainer.checkpoint_dir / "last.pt").is_file()  # trials are not resumed
            print(f"\ninterrupted: run {run.info.run_id} marked KILLED after {len(trainer.history)} complete epoch(s)"
                  + (f"; checkpoints in {trainer.checkpoint_dir}\nresume it with: fer-exp train --resume {run.info.run_id}"
                     if resumable else "; no epoch finished to resume from" if evaluate_test else ""),
                  file=sys.stderr)
            raise
    return RunSummary(run.info.run_id, run.info.experiment_id, uri, result)


def read_export(path: str | Path) -> dict:
    """A finished run's export (:meth:`~fer_exp.train.Trainer.export`), or a ConfigError that says what
    the file is instead and how to make one."""
    import torch

    from fer_exp.train import EXPORT_FORMAT

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever the file holds, the answer is the same
        reason = first_line(exc)
        raise ConfigError(f"{path}: cannot be read as a fer-exp run export ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != EXPORT_FORMAT:
        what = " It is a training checkpoint: a tracked run's is in MLflow already, and an interrupted one resumes " \
               "with fer-exp train --resume." if isinstance(state, dict) and "optimizer" in state else ""
        raise ConfigError(f"{path}: not a fer-exp run export.{what} Write exports with "
                          "benchmarks/full_training.py --export PATH (gpu_check.sh's accuracy step does).")
    return state


def check_same_data(export: dict, fingerprint: dict, source: Path, data_source: str) -> bool:
    """The data here (its :meth:`~fer_exp.data.FerData.fingerprint`) holds the very faces, labels and
    splits the exported run trained, selected and was tested on; returns whether the pixels are
    identical too (another machine's image decoder may differ by a grey level)."""
    theirs = export.get("data", {})
    differ = [name for name, digest in fingerprint["members"].items() if theirs.get("members", {}).get(name) != digest]
    if differ:
        raise ConfigError(f"{source} was trained on other data than {data_source}: its {', '.join(differ)} split(s) "
                          "hold other faces or labels (other images, another on_bad, or a hold-out drawn otherwise). "
                          "Pass the --data it was trained on, a copy of the same images.")
    return theirs.get("pixels") == fingerprint["pixels"]


def import_run(export: dict, source: Path, cfg: Config, data: FerData, *, tags: dict | None = None) -> RunSummary:
    """Track a run trained elsewhere without MLflow (its :meth:`~fer_exp.train.Trainer.export`, from a GPU
    machine, say) as a new FINISHED run of ``cfg.experiment_name``: its config, every epoch's metrics,
    its best epoch evaluated on test here (the same faces in the same splits: the fingerprints' members
    must match; tag ``same_pixels_where_trained`` says whether the decoded pixels did too), the figure,
    tables and predictions, the export as its checkpoint and the model, as ``fer-exp train`` logs a run.
    Tags say where it trained (device, torch, amp and compile choices) and where test was evaluated."""
    import mlflow

    from fer_exp.tracking import MLflowCallback, describe_run, tracking_uri

    check_tracking_store(tracking_uri())
    same_pixels = check_same_data(export, data.fingerprint(), source, data.source)
    check_output_dir(cfg.output_dir)
    trainer = Trainer(cfg, data, checkpoint_dir=cfg.output_dir, progress=False, callbacks=[MLflowCallback()],
                      load_pretrained=False)
    try:
        trainer.adopt(export)
    except (RuntimeError, KeyError) as exc:
        raise ConfigError(f"{source}: its weights do not fit the {cfg.model} built from its config "
                          f"({first_line(exc)}); was it written by another "
                          "fer-exp version?") from None
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.set_experiment(cfg.experiment_name)
        check_artifact_store(experiment)
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"tracking store {uri}: {first_line(exc)}") from None
    trained = export["trained"]
    with mlflow.start_run(run_name=cfg.run_name or describe_run(cfg), experiment_id=experiment.experiment_id,
                         tags={**(tags or {}), "imported_from": str(source)}, log_system_metrics=False) as run:
        result = trainer.replay(trained, source)
        where = {"device": trained["device"], "torch_version": trained["torch"], "amp": trained["amp"],
                 "amp_choice": trained["amp_choice"], "compile_choice": trained["compile_choice"]}
        mlflow.set_tags({**where, "test_evaluated_on": str(trainer.device),
                         "test_amp": str(trainer.amp_dtype or "off").replace("torch.", ""),
                         "same_pixels_where_trained": same_pixels,
                         **({"test_accuracy_where_trained": trained["test_metrics"]["test_accuracy"]}
                            if "test_accuracy" in trained["test_metrics"] else {}),
                         **({"test_tta_where_trained": trained["test_tta"]} if "test_tta" in trained else {})})
        note = mlflow.get_run(run.info.run_id).data.tags.get("mlflow.note.content", "")
        mlflow.set_tag("mlflow.note.content", f"{note}\n\nTrained on {trained['device']} (torch {trained['torch']}) "
                       f"without tracking and imported from {source.name}; test evaluated here, on {trainer.device}.")
    return RunSummary(run.info.run_id, run.info.experiment_id, uri, result)
