"""The ``fer-exp`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from fer_exp.classes import CLASS_NAMES
from fer_exp.config import CHOICES, EVALUATION_SPLITS, TTA_OPTIONS
from fer_exp.errors import counted


class UserError(click.ClickException):
    """A problem with the user's input: printed without a traceback, exit status 2."""

    exit_code = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fer-exp")
def main() -> None:
    """fer-exp: tracked, reproducible facial emotion recognition experiments on FER2013."""


@main.group()
def data() -> None:
    """Inspect FER2013 data sources."""


def format_summary(summary: dict) -> str:
    """The per-split x per-class table and the facts a user checks before training."""
    lines = [
        f"source:      {summary['source']}",
        f"format:      {summary['format']}",
        f"split rule:  {summary['split_rule']}",
        f"image size:  {'x'.join(map(str, summary['image_size']))} uint8 grayscale",
        "",
    ]
    width = max(len(n) for n in CLASS_NAMES) + 1
    lines.append("split".ljust(7) + "".join(n.rjust(width) for n in CLASS_NAMES) + "total".rjust(8))
    for split, counts in summary["class_counts"].items():
        lines.append(split.ljust(7) + "".join(str(counts[n]).rjust(width) for n in CLASS_NAMES)
                     + str(summary["sizes"][split]).rjust(8))
    lines += ["", f"class imbalance (train, largest/smallest class): {summary['imbalance_ratio']}"]
    if summary["missing_train_classes"]:
        from fer_exp.data.dataset import missing_classes_warning

        lines.append(f"WARNING: {missing_classes_warning(summary['missing_train_classes'], summary['format'])}")
    for pair, found in summary["duplicates_across_splits"].items():
        lines.append(f"{pair}: {found['images']} image(s) with pixels identical to one there ({found['other_label']} "
                     f"labelled otherwise), e.g. {found['examples'][0]}")
    copies = summary["faces_with_copies"]
    if copies["test"]:
        share = 100 * copies["test"] / summary["sizes"]["test"]
        where = "the source's train or val (dropped from them)" if summary["duplicates_dropped"] else "train or val"
        kind = "a copy" if summary["copy_correlation"] >= 1 else \
            f"a copy (identical, or correlating >= {summary['copy_correlation']:g})"
        lines.append(f"test: {copies['test']} of {summary['sizes']['test']} faces ({share:.1f}%) have {kind} in {where} "
                     "(runs score the others apart: test_accuracy_uncopied)")
    earlier = {"val": "train", "test": "train or val"}
    for split, found in summary.get("near_copies", {}).items():  # --copy-correlation below 1
        if found["images"]:
            where = f"the source's {earlier[split]} (dropped from it)" if summary["duplicates_dropped"] else earlier[split]
            lines.append(f"{split}: {found['images']} face(s) nearly copy one of {where} (pixel correlation >= "
                         f"{summary['copy_correlation']:g}, not identical; counted as copies), e.g. {found['examples'][0]}")
    if not summary["duplicates_dropped"] and (summary["duplicates_across_splits"]
                                              or any(f["images"] for f in summary.get("near_copies", {}).values())):
        lines.append("  (--duplicates drop removes such copies from train and val; test stays whole)")
    if summary["duplicates_dropped"]:
        lines.append("dropped as copies of a later split's faces (--duplicates drop): "
                     + ", ".join(f"{n} from {split}" for split, n in summary["duplicates_dropped"].items()))
    lines.append(f"converted to grayscale: {summary['converted_to_gray']}; resized to 48x48: {summary['resized']}")
    if summary["ignored"]:
        lines.append(f"ignored {len(summary['ignored'])} hidden file(s), e.g. {summary['ignored'][0]}")
    if summary["skipped"]:
        lines.append(f"skipped {len(summary['skipped'])} bad sample(s) (--on-bad skip):")
        lines += [f"  {s['where']}: {s['why']}" for s in summary["skipped"][:20]]
        if len(summary["skipped"]) > 20:
            lines.append(f"  ... and {len(summary['skipped']) - 20} more (see --json)")
    lines.append(f"loaded in {summary['load_seconds']:.2f} s ({'cache' if summary['from_cache'] else 'decoded'})")
    return "\n".join(lines)


@data.command("inspect")
@click.argument("source")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--on-bad", type=click.Choice(CHOICES["on_bad"]), default="error", show_default=True,
              help="Stop at the first bad sample, or skip bad samples and report them.")
@click.option("--duplicates", type=click.Choice(CHOICES["duplicates"]), default="report", show_default=True,
              help="Faces copied across splits: count them, or drop them from train and val as training's --duplicates drop does.")
@click.option("--seed", type=int, default=42, show_default=True,
              help="Seed of the val hold-out, where one is made (training's default, so both show the same split).")
@click.option("--val-fraction", type=float, default=0.1, show_default=True, help="Size of the val hold-out.")
@click.option("--no-cache", is_flag=True, help="Decode again instead of reading the cache.")
@click.option("--copy-correlation", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              metavar="R", help="Count as copies also the faces that correlate with an earlier split's face at R or "
                                "more (0.95: the same photo cropped or recompressed), as training's --copy-correlation "
                                "does; 1: identical pixels only.")
def data_inspect(source: str, as_json: bool, on_bad: str, duplicates: str, seed: int, val_fraction: float,
                 no_cache: bool, copy_correlation: float) -> None:
    """Show the format, split rule and per-class counts of SOURCE (a path or 'synthetic')."""
    from fer_exp.data import DataError, load_data

    try:
        loaded = load_data(source, on_bad=on_bad, seed=seed, val_fraction=val_fraction, use_cache=not no_cache,
                           duplicates=duplicates, copy_correlation=copy_correlation)
    except DataError as exc:
        raise UserError(str(exc)) from None
    summary = loaded.summary()
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))



def per_class_line(metrics: dict, split: str) -> str:
    """Each class's accuracy on ``split``; n/a for a class it has no faces of."""
    from fer_exp.metrics import score_text

    return "per class accuracy: " + "  ".join(f"{c} {score_text(metrics[f'{split}_acc_{c}'])}" for c in CLASS_NAMES)


def uncopied_line(metrics: dict, split: str, copy_correlation: float = 1.0, dropped: bool = False) -> str:
    """The scores on the faces of ``split`` that have no copy in an earlier split, where some have
    (``dropped``: the run trained without the copies)."""
    if f"{split}_accuracy_uncopied" not in metrics:
        return ""
    earlier = "train or val" if split == "test" else "train"
    near = f" (identical, or correlating >= {copy_correlation:g})" if copy_correlation < 1 else ""
    why = "this run dropped the copies from train" if dropped else "--duplicates drop trains without them"
    return (f"on the {split} faces with no copy{near} in {earlier} (FER2013 has copies; {why}): "
            f"accuracy {metrics[f'{split}_accuracy_uncopied']:.4f}  macro-F1 "
            f"{metrics[f'{split}_macro_f1_uncopied']:.4f}\n")


def stop_on_signals() -> None:
    from fer_exp.train import stop_on_signals as install

    install()


def ui_hint(run_id: str, experiment_id: str, uri: str) -> str:
    """Where to look: the command that serves the UI (for a local store), the runs table, the run."""
    from fer_exp.tracking import run_page_url, runs_page_url
    from fer_exp.tune_report import mask_url

    shown = mask_url(uri)  # a password in the URL is never printed
    serve = "" if uri.startswith(("http://", "https://")) else f"open the UI: mlflow ui --backend-store-uri {shown}\n"
    return (f"{serve}runs page: {mask_url(runs_page_url(experiment_id, uri))}\n"
            f"this run:  {mask_url(run_page_url(run_id, experiment_id, uri))}")


class _Optional(click.ParamType):
    """A config value from the command line; an empty string means 'not given' (MLproject defaults)."""

    def __init__(self, name: str):
        self.name = name  # shown as the option's metavar

    def convert(self, value, param, ctx):
        return None if value == "" else value  # typed and checked by fer_exp.config.coerce


def dataclass_options(schema):
    """A decorator adding one ``--option`` per field of the dataclass ``schema`` (:class:`Config` or
    :class:`StudyConfig`), none of them with a default: an option not given leaves the value to the
    experiment file, then the defaults."""
    import dataclasses

    from fer_exp.config import CHOICES

    def decorate(command):
        import typing

        types = typing.get_type_hints(schema)
        for f in reversed(dataclasses.fields(schema)):
            kind = types[f.name]
            choices = f" [{'|'.join(map(str, CHOICES[f.name]))}]" if f.name in CHOICES else ""
            help_text = f"{f.metadata['help']}{choices} (default: {f.default!r})"
            # `mlflow run -P early_stopping=5` passes undeclared params as --early_stopping: accept both
            spellings = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
            extra = {"is_flag": False, "flag_value": "true"} if kind is bool else {}  # `--retrain-best` alone: true
            command = click.option(*spellings, f.name, type=_Optional(kind.__name__), default=None, help=help_text,
                                   **extra)(command)
        return command

    return decorate


def config_options(command):
    """One ``--option`` per field of :class:`fer_exp.config.Config`."""
    from fer_exp.config import Config

    return dataclass_options(Config)(command)


def study_options(command):
    """One ``--option`` per field of :class:`fer_exp.config.StudyConfig`."""
    from fer_exp.config import StudyConfig

    return dataclass_options(StudyConfig)(command)


@main.command()
@click.option("--config", "config_path", default=None, help="Experiment YAML (e.g. experiments/cnn.yaml); CLI options override it.")
@click.option("--resume", default=None, type=_Optional("RUN_ID"),
              help="Continue this interrupted run from its last.pt, in the same MLflow run and with its config "
                   "(options may change only how it runs: device, output dir, eval batch size, run name, register; "
                   "--data may name its faces at another path).")
@config_options
def train(config_path: str | None, resume: str | None, **options) -> None:
    """Train a model and track the run in MLflow (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."""
    from fer_exp.config import ConfigError, load_config
    from fer_exp.data import DataError
    from fer_exp.experiment import TrackingError, resume_config, run_experiment
    from fer_exp.models import PretrainedWeightsError
    from fer_exp.train import RunFailed
    from fer_exp.tune_report import mask_url

    try:
        if resume and config_path:
            raise ConfigError("--resume takes the run's own config; leave out --config")
        cfg = resume_config(resume, options) if resume else load_config(config_path or None, options)
    except (ConfigError, TrackingError) as exc:
        raise UserError(str(exc)) from None
    source = f"resuming run {resume}" if resume else f"config: {config_path or 'defaults'}"
    click.echo(f"fer-exp train: {cfg.model} on {cfg.data}, {counted(cfg.epochs, 'epoch')} ({source})")
    if not resume and not config_path and cfg.model == "resnet18" and cfg.pretrained == "none":
        click.echo("note: no --config, so resnet18 trains from random weights (pretrained none), with the defaults "
                   "for what no option sets; the ImageNet-pretrained ResNet18 of the README is --config "
                   "experiments/resnet18.yaml (or -P config=experiments/resnet18.yaml)")
    stop_on_signals()  # Ctrl-C or a `kill` ends the run cleanly at the next training step
    try:
        summary = run_experiment(cfg, resume_run_id=resume)
    except DataError as exc:
        # (its own path, not one --data gave: that one is said missing as it is)
        moved = resume and options.get("data") is None and not cfg.data.startswith("synthetic") and not Path(cfg.data).exists()
        raise UserError(f"{exc}\nrun {resume} trained on {cfg.data}: if its data moved, resume with --data NEW_PATH "
                        "(the same faces are checked)" if moved else str(exc)) from None
    except (PretrainedWeightsError, ConfigError, TrackingError) as exc:
        raise UserError(str(exc)) from None
    except RunFailed as exc:  # diverged, or a checkpoint could not be written
        raise click.ClickException(f"{exc} (run marked FAILED)") from None
    except KeyboardInterrupt:
        sys.exit(130)
    r = summary.result
    t = r.test_metrics
    click.echo(
        f"\nrun {summary.run_id} finished: best epoch {r.best_epoch} ({cfg.select_metric} {r.best_value:.4f}), "
        f"{r.seconds:.0f} s\n"
        + (f"test-time augmentation chosen on val: {r.tta} ("
           + ", ".join(f"{k} {v:.4f}" for k, v in r.tta_val.items()) + ")\n" if r.tta_val else "")
        + f"test{f' ({r.tta} TTA)' if r.tta != 'none' else ''}: accuracy {t['test_accuracy']:.4f}  macro-F1 {t['test_macro_f1']:.4f}  weighted-F1 {t['test_weighted_f1']:.4f}\n"
        + per_class_line(t, "test") + "\n"
        + uncopied_line(t, "test", cfg.copy_correlation, cfg.duplicates == "drop") +
        f"tracking: {mask_url(summary.tracking_uri)} (experiment id {summary.experiment_id})\n"
        + ui_hint(summary.run_id, summary.experiment_id, summary.tracking_uri)
    )



@main.command()
@click.option("--config", "config_path", default=None,
              help="Study file: a training config with study and search_space blocks (default: experiments/tune_<model>.yaml).")
@study_options
@config_options
def tune(config_path: str | None, **options) -> None:
    """Tune hyper-parameters with an Optuna study; every trial is a child MLflow run of the study's run.

    Every `fer-exp train` option is accepted too: it fixes that field for all trials (and takes it out
    of the search space). The same --study-name resumes a study; --workers runs several processes."""
    from fer_exp.config import STUDY_FIELDS, ConfigError
    from fer_exp.data import DataError
    from fer_exp.experiment import TrackingError
    from fer_exp.models import PretrainedWeightsError
    from fer_exp.tune import StudyError, plan_study
    from fer_exp.tune import tune as run_study

    study_options = {k: v for k, v in options.items() if k in STUDY_FIELDS}
    config_values = {k: v for k, v in options.items() if k not in STUDY_FIELDS}
    try:
        plan = plan_study(config_path, config_values, study_options)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    stop_on_signals()
    try:
        result = run_study(plan)
    except (DataError, PretrainedWeightsError, ConfigError, StudyError, TrackingError) as exc:
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:
        sys.exit(130)
    if result.parent_run_id:
        from fer_exp.tracking import tracking_uri

        click.echo(f"study run {result.parent_run_id} (expand it in the runs table to see its trials)\n"
                   + ui_hint(result.parent_run_id, result.experiment_id, tracking_uri()))


def _split_ids(values) -> list[str]:
    """--runs A --runs B, or --runs A,B (MLproject passes one string)."""
    return [part for value in values for part in value.replace(",", " ").split() if part]


@main.command()
@click.option("--experiment", "experiments", multiple=True, help="Experiment name(s) to search (default: fer2013).")
@click.option("--filter", "filter_string", default="", help="MLflow search filter, e.g. \"tags.model = 'cnn'\".")
@click.option("--runs", "run_ids", multiple=True, help="Compare these run ids instead of searching (repeat, or comma-separated).")
@click.option("--group-by", "--group_by", "group_by", default="",
              help="Group runs (seeds) by a tag or config field: model, arm, class_weights, tags.X, params.X, or run "
                   "(each run a row of its own). Default: model; with --runs, run.")
@click.option("--output", default="", help="Folder for tables, figures and report.html (default: reports/compare-<time>).")
@click.option("--log/--no-log", default=True, show_default=True, help="Log the comparison as an MLflow run of its own.")
@click.option("--register", default="", metavar="NAME",
              help="Register the model val chooses (the run of the best val score) as a version of NAME in MLflow's "
                   "model registry, with the alias best (models:/NAME@best).")
def compare(experiments, filter_string, run_ids, group_by, output, log, register) -> None:
    """Compare finished runs: overall and per-class tables, figures, McNemar tests, an HTML page."""
    from fer_exp.compare import CompareError
    from fer_exp.compare import compare as run_compare

    from fer_exp.experiment import TrackingError, check_tracking_store
    from fer_exp.tracking import tracking_uri

    experiments = [e for e in experiments if e] or ["fer2013"]
    _interrupt_on_sigterm()
    try:
        check_tracking_store(tracking_uri(), write=log or bool(register))  # --no-log alone only reads the store
        run_ids = _split_ids(run_ids)
        if run_ids and filter_string:
            raise CompareError("--runs names the runs to compare and --filter searches for them: give one or the other")
        result = run_compare(experiments, filter_string, run_ids, group_by or ("run" if run_ids else "model"),
                             output or None, log, register)
    except (CompareError, TrackingError) as exc:
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:
        _interrupted("the comparison; --output keeps the comparison it held before, whole")
    _print_comparison(result)
    if result.register_error:
        raise UserError(result.register_error)


def _interrupt_on_sigterm() -> None:
    """SIGTERM (a `kill`, a scheduler's stop) ends a short command as Ctrl-C does: its run, if it was
    logging one, marked KILLED rather than left RUNNING by a process killed outright."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)


def _interrupted(what: str) -> None:
    click.echo(f"\ninterrupted: {what}", err=True)
    sys.exit(130)


def _print_comparison(result) -> None:
    """The tables, where the report is, the model registered, and the comparison run's place in the UI."""
    from fer_exp.compare import CHOSEN_ALIAS
    from fer_exp.tracking import tracking_uri

    click.echo(result.markdown)
    click.echo(f"\ntables, figures and report.html in {result.output}/")
    if result.registered:
        name, version, new = result.registered
        click.echo(f"the model val chose (run {result.comparison.chosen.run.run_id}) is {name} version {version}"
                   f"{'' if new else ' (registered before)'}, alias {CHOSEN_ALIAS}: "
                   f"fer-exp predict --model models:/{name}@{CHOSEN_ALIAS} IMAGES")
    if result.run_id:
        click.echo(f"comparison run {result.run_id}\n" + ui_hint(result.run_id, result.experiment_id, tracking_uri()))


@main.command()
@click.argument("study_file")
@click.option("--seeds", default="", help="Comma-separated seeds instead of the file's (e.g. 42 for a quick pass).")
@click.option("--arms", default="", help="Comma-separated arms to make (default: all).")
@click.option("--dry-run", is_flag=True, help="List the runs and which exist; make nothing.")
@click.option("--import", "imports", multiple=True, metavar="PATH",
              help="Track runs trained elsewhere instead of making them: exports (benchmarks/full_training.py "
                   "--export, gpu_check.sh's accuracy step) or folders of them, matched to arms and seeds by "
                   "their config; trains nothing (repeatable).")
@click.option("--output", default="", help="Folder for the comparison (default: reports/<study>-<time>).")
@config_options
def study(study_file: str, seeds: str, arms: str, dry_run: bool, imports: tuple[str, ...], output: str, **options) -> None:
    """Make the runs a study file lists (arms x seeds) that are not tracked yet, then compare them.

    Every `fer-exp train` option fixes that field for all runs (e.g. --data, --epochs). With --import,
    runs trained elsewhere (on a GPU machine without MLflow, say) are tracked instead: their test split
    is evaluated here, on the same faces (checked: the same splits' members)."""
    import time

    from fer_exp.config import ConfigError
    from fer_exp.study import read_study

    try:
        seed_list = [int(s) for s in seeds.replace(",", " ").split()] or None
    except ValueError:
        raise UserError(f"--seeds takes comma-separated integers, got {seeds!r}") from None
    try:
        plan = read_study(study_file, options, seed_list, [a for a in arms.replace(",", " ").split()] or None)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    output = Path(output or f"reports/{plan.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    made_here = [folder for folder in [output, *output.parents] if not folder.exists()]  # innermost first
    try:
        _make_and_compare(plan, output, dry_run, imports)
    finally:  # a study that stops before its comparison leaves no empty report folders behind
        for folder in made_here:
            if not folder.is_dir() or any(folder.iterdir()):
                break
            folder.rmdir()


def _make_and_compare(plan, output, dry_run: bool, imports) -> None:
    from fer_exp.compare import CompareError, check_output, compare
    from fer_exp.config import ConfigError
    from fer_exp.data import DataError
    from fer_exp.experiment import TrackingError
    from fer_exp.models import PretrainedWeightsError
    from fer_exp.study import run_study

    stop_on_signals()
    try:
        if not dry_run:
            check_output(output)  # now, not after the last run has trained
        run_ids, made = run_study(plan, dry_run=dry_run, imports=list(imports))
    except (DataError, PretrainedWeightsError, ConfigError, TrackingError, CompareError) as exc:
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("interrupted: the finished runs are kept; the same command resumes the interrupted one and "
                   "makes the rest", err=True)
        sys.exit(130)
    if dry_run:
        return
    if not run_ids:
        click.echo("\nnothing finished to compare yet: the same command compares the runs once they are made")
        return
    from fer_exp.train import stop_requested

    if stop_requested():  # a signal after the last step of the last run: its runs are made, the comparison is not
        _interrupted("the runs are made; the same command compares them")
    click.echo(f"\n{'imported' if imports else 'made'} {len(made)} run(s); comparing all {len(run_ids)} by {plan.group_by}\n")
    _interrupt_on_sigterm()
    try:
        result = compare([plan.experiment_name], run_ids=run_ids, group_by=plan.group_by, output=output)
    except CompareError as exc:
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:
        _interrupted("the comparison; the runs are made, and the same command compares them")
    _print_comparison(result)


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--model", "model_uris", multiple=True, required=True,
              help="runs:/<run id>/model, models:/<name>/<version>, models:/<name>@<alias>, or a checkpoint "
                   "(best.pt) or weights file; repeat it to average several models.")
@click.option("--detect-faces", is_flag=True, help="Find faces with OpenCV's Haar cascade and classify each one.")
@click.option("--tta", type=click.Choice(TTA_OPTIONS), default="model", show_default=True,
              help="Test-time augmentation: average over the mirror image (flip) or ten crops and their mirrors; "
                   "model: the one each model's run was tested with (its tag test_tta; none for a checkpoint file of a tta-auto run).")
@click.option("--output", default="", help="Write the predictions to this .csv or .json file.")
@click.option("--show", "show_dir", default="", help="Save the images with boxes and labels drawn into this folder.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--batch-size", type=click.IntRange(min=0), default=0,
              help="Images per forward pass (0: the model's eval_batch_size); lower it where memory is short.")
def predict(images, model_uris, detect_faces, tta, output, show_dir, device, batch_size) -> None:
    """Predict the emotion of each image (or of each face in it) in IMAGES: files or folders, any size,
    colour or format. One row per face or image, with the emotion and all seven probabilities."""
    from fer_exp.config import ConfigError
    from fer_exp.faces import FaceDetectorError
    from fer_exp.inference import ModelLoadError, load_model
    from fer_exp.predict import PredictError, check_output, check_paths, format_predictions, predict_images, write_predictions

    try:
        check_paths(list(images))
        check_output(output or None, show_dir or None)
        models = [load_model(uri, device, batch_size) for uri in model_uris]
        result = predict_images(models, list(images), detect_faces=detect_faces, tta=tta, show_dir=show_dir or None)
        written = write_predictions(result.frame, output) if output else None
    except (ModelLoadError, PredictError, FaceDetectorError, ConfigError) as exc:
        raise UserError(str(exc)) from None
    click.echo(format_predictions(result.frame))
    for where, why in result.skipped:
        click.echo(f"skipped {where}: {why}", err=True)
    for where in result.no_face:
        click.echo(f"no face found in {where}", err=True)
    read = result.frame["source"].nunique() + len(result.no_face)  # images read, with or without a face
    faces = (f", {len(result.frame)} face(s)" + (f" ({len(result.no_face)} without a face)" if result.no_face else "")
             if detect_faces else "")
    click.echo(f"\n{read} image(s){faces} in {result.seconds:.1f} s"
               + (f"; {len(result.skipped)} skipped" if result.skipped else "")
               + (f"; predictions in {written}" if written else "")
               + (f"; drawn images in {Path(show_dir)}/" if show_dir else ""))
    if detect_faces and result.frame.empty and result.no_face:
        click.echo("no face was found in any image: if they are faces already cropped (as FER2013's are), "
                   "predict without --detect-faces", err=True)


@main.command()
@click.option("--model", "model_uris", multiple=True, required=True,
              help="A model URI or checkpoint (see fer-exp predict); repeat it for an ensemble (softmax averaged).")
@click.option("--data", "data_source", default="", help="Data source (default: the first model's training data).")
@click.option("--split", type=click.Choice(EVALUATION_SPLITS), default="test", show_default=True, help="Split to evaluate.")
@click.option("--tta", type=click.Choice(TTA_OPTIONS), default="model", show_default=True,
              help="Test-time augmentation (see fer-exp predict); to choose one, compare them on --split val.")
@click.option("--experiment-name", default="", help="MLflow experiment of the evaluation run (default: the first model's).")
@click.option("--log/--no-log", default=True, show_default=True, help="Log the evaluation as an MLflow run.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--batch-size", type=click.IntRange(min=0), default=0,
              help="Images per forward pass (0: each model's eval_batch_size); lower it where memory is short.")
def evaluate(model_uris, data_source, split, tta, experiment_name, log, device, batch_size) -> None:
    """Evaluate one model or an ensemble, with optional test-time augmentation, and log it as a run with
    the same metrics, confusion matrix and predictions as a training run (fer-exp compare sets them side by side)."""
    from fer_exp.config import ConfigError
    from fer_exp.data import DataError
    from fer_exp.evaluate import EvaluateError
    from fer_exp.evaluate import evaluate as run_evaluation
    from fer_exp.experiment import TrackingError, check_tracking_store
    from fer_exp.inference import ModelLoadError, load_model
    from fer_exp.tracking import tracking_uri

    _interrupt_on_sigterm()
    try:
        models = [load_model(uri, device, batch_size) for uri in model_uris]  # first: a URI where no store is says so
        if log:
            check_tracking_store(tracking_uri())
        result = run_evaluation(models, data_source or None, split, tta, log, experiment_name or None)
    except (ModelLoadError, EvaluateError, DataError, ConfigError, TrackingError) as exc:
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:
        _interrupted("the evaluation" + ("; its run, if it had begun, is marked KILLED" if log else ""))
    m = result.metrics
    uncopied = uncopied_line(m, split, min(model.config.copy_correlation for model in models)).rstrip()
    click.echo(f"{result.name} on {split}: accuracy {m[f'{split}_accuracy']:.4f}  macro-F1 {m[f'{split}_macro_f1']:.4f}  "
               f"weighted-F1 {m[f'{split}_weighted_f1']:.4f}\n" + per_class_line(m, split)
               + (f"\n{uncopied}" if uncopied else ""))
    if result.run_id:
        click.echo(f"evaluation run {result.run_id}\n" + ui_hint(result.run_id, result.experiment_id, tracking_uri()))


if __name__ == "__main__":
    sys.exit(main())
