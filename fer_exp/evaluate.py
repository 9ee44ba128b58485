"""``fer-exp evaluate``: one or more trained models (an ensemble averages their softmax), with optional
test-time augmentation, on a split of a data source, logged as an MLflow run with the same metrics,
confusion matrix and predictions as a training run, so ``fer-exp compare`` sets it beside them."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fer_exp.config import EVALUATION_SPLITS
from fer_exp.data import DataError, load_data
from fer_exp.errors import first_line
from fer_exp.inference import LoadedModel, ensemble_probabilities
from fer_exp.metrics import classification_metrics, uncopied_metrics


class EvaluateError(ValueError):
    """Models or data that cannot be evaluated together; says why."""


@dataclass
class EvaluationResult:
    metrics: dict[str, float]
    probabilities: np.ndarray
    images_per_second: float
    name: str
    run_id: str | None = None
    experiment_id: str | None = None


def tta_used(models: list[LoadedModel], tta: str) -> str:
    """What ``tta`` means for these models: itself, or with ``model`` each one's own ('flip', or 'flip/none'
    for an ensemble whose members differ)."""
    return "/".join(dict.fromkeys(m.resolve_tta(tta) for m in models))


def evaluation_name(models: list[LoadedModel], tta: str) -> str:
    """What made the predictions, e.g. 'cnn+tta:flip', 'cnn+resnet18', 'cnn:evaluated': the run's ``model``
    tag, so ``fer-exp compare`` (grouped by model) keeps it apart from the training runs' groups."""
    name = "+".join(m.config.model for m in models)
    if tta != "none":
        return f"{name}+tta:{tta}"
    return name if len(models) > 1 else f"{name}:evaluated"


def evaluate(models: list[LoadedModel], data_source: str | None = None, split: str = "test", tta: str = "model",
             log: bool = True, experiment_name: str | None = None, progress: bool = True) -> EvaluationResult:
    if split not in EVALUATION_SPLITS:
        raise EvaluateError(f"split must be one of {', '.join(EVALUATION_SPLITS)}, got {split!r}")
    first = models[0].config
    if split == "val" and len({(m.config.split_seed, m.config.val_fraction) for m in models}) > 1:
        raise EvaluateError("these models were trained on different val hold-outs (other seeds or val fractions): "
                            "evaluate them on test, or one at a time; train ensemble members with one --data-seed "
                            "to share one val split")
    experiment_id = evaluation_experiment(experiment_name or first.experiment_name) if log else None
    # the first model's split seed and val fraction: its own val hold-out, where the source has none; copies
    # counted at the members' lowest correlation (each member's copies are copies), whatever their order
    copy_correlation = min(m.config.copy_correlation for m in models)
    try:
        data = load_data(data_source or first.data, on_bad=first.on_bad, seed=first.split_seed,
                         val_fraction=first.val_fraction, duplicates=first.duplicates, copy_correlation=copy_correlation,
                         train=split != "test")  # labelled faces of one's own, a test/ folder alone, will do
    except DataError as exc:
        if data_source:
            raise
        raise EvaluateError(f"{exc}; that is the data {models[0].source} trained on, as its config names it (read "
                            f"from {Path.cwd()}): run from the folder it trained in, or give --data") from None
    if not data_source and copy_correlation == first.copy_correlation:
        check_own_data(models[0], data, split)
    chosen = data.splits()[split]
    if len(chosen) == 0:
        raise EvaluateError(f"{data.source} has an empty {split} split ({data.split_rule})")
    try:
        used = tta_used(models, tta)
    except ValueError as exc:
        raise EvaluateError(str(exc)) from None
    start = time.perf_counter()
    probabilities, loss = ensemble_probabilities(models, chosen.images, tta, labels=chosen.labels)
    seconds = time.perf_counter() - start
    labels = chosen.labels.numpy()
    metrics = classification_metrics(labels, probabilities.argmax(1), prefix=f"{split}_")
    metrics[f"{split}_loss"] = loss
    metrics |= uncopied_metrics(labels, probabilities.argmax(1), data.copied(split), prefix=f"{split}_")
    name = evaluation_name(models, used)
    result = EvaluationResult(metrics, probabilities, len(chosen) * len(models) / seconds if seconds else 0.0, name)
    if progress:
        print(f"{name}: {len(chosen)} {split} images, {result.images_per_second:,.0f} images/s "
              f"(x{len(models)} model(s), tta {used}{' (each model its own)' if tta == 'model' else ''})")
    if log:
        result.run_id, result.experiment_id = log_evaluation_run(models, data, split, used, result, chosen, experiment_id)
    return result


def check_own_data(model: LoadedModel, data, split: str) -> None:
    """Where no --data was given: the model's own data source, read again here, must hold the faces its run
    was tested (or validated) on, by the digest of the split its run logged. A relative path that names
    other faces from another folder would otherwise be scored, and logged, as the run's own test."""
    if not model.run_id:
        return
    import mlflow

    try:
        inputs = mlflow.MlflowClient().get_run(model.run_id).inputs
    except mlflow.exceptions.MlflowException:
        return  # the run is gone from this store: nothing to check against
    logged = next((d for d in (inputs.dataset_inputs if inputs else []) if d.dataset.name == f"fer2013-{split}"), None)
    if logged is None:
        return
    members = {t.key: t.value for t in logged.tags}.get("members")
    chosen = data.splits()[split]
    where = (f"{data.source}, the data {model.source} trained on as its config names it (read from {Path.cwd()}), "
             f"holds other {split} faces than run {model.run_id} was evaluated on")
    if members is not None and members != chosen.members_digest():  # which faces, which labels
        raise EvaluateError(f"{where} (other images or labels): run from the folder it trained in, or give --data "
                            "to evaluate on this source")
    if members is None and logged.dataset.digest != chosen.digest():  # a run logged before members were: pixels,
        print(f"warning: {where}, or decoded them to other pixels (another image library here); give --data to "
              "say which source is meant", file=sys.stderr)  # which another decoder may change: said, not refused


def evaluation_experiment(name: str) -> str:
    """The id of the experiment the evaluation run goes to (made where missing), checked before any
    image is predicted: a deleted experiment, or an artifact folder that cannot be written, is an
    :class:`EvaluateError` that says what to do."""
    import mlflow

    from fer_exp.experiment import TrackingError, check_artifact_store
    from fer_exp.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    try:
        experiment = mlflow.set_experiment(name)
        check_artifact_store(experiment)
    except mlflow.exceptions.MlflowException as exc:
        raise EvaluateError(f"experiment {name!r}: {first_line(exc)}; choose another with "
                            "--experiment-name, or --no-log") from None
    except TrackingError as exc:
        raise EvaluateError(str(exc)) from None
    return experiment.experiment_id


def log_evaluation_run(models: list[LoadedModel], data, split: str, tta: str, result: EvaluationResult, chosen,
                       experiment_id: str) -> tuple[str, str]:
    import mlflow

    from fer_exp.tracking import killed_on_interrupt, log_data_inputs, log_evaluation

    sources = [m.source for m in models]
    description = (f"Evaluation of {' + '.join(f'{m.name} ({m.source})' for m in models)} on the {split} split of "
                   f"{data.source} ({len(chosen)} images), "
                   + ("softmax averaged over the models" if len(models) > 1 else "one model")
                   + (f", test-time augmentation {tta}." if tta != "none" else ", no test-time augmentation."))
    tags = {"model": result.name, "fer_exp.role": "evaluation", "tta": tta, "split": split,
            "evaluated_models": " ".join(sources)[:5000], "mlflow.note.content": description,
            "data_source": data.source, "split_rule": data.split_rule, f"{split}_size": len(chosen),
            **{f"source_run_{i}": m.run_id for i, m in enumerate(models) if m.run_id}}
    with mlflow.start_run(run_name=f"evaluate {result.name} on {split}", experiment_id=experiment_id,
                          tags=tags) as run, killed_on_interrupt():
        mlflow.log_params({"models": " ".join(sources)[:6000], "tta": tta, "split": split, "data": data.source,
                           "n_models": len(models)})
        for i, m in enumerate(models):  # each member's config, so runs filter on them like training runs
            prefix = "config." if len(models) == 1 else f"model{i}.config."
            mlflow.log_params({f"{prefix}{k}": v for k, v in m.config.to_dict().items()})
        log_data_inputs(data, splits=(split,))  # what it evaluated, not the training run's other splits
        log_evaluation(chosen.labels.numpy(), result.probabilities, chosen.sources, result.metrics,
                       title=f"{result.name} {split}", split=split, copied=data.copied(split),
                       copy_correlation=data.copy_correlation)
        mlflow.log_metric(f"{split}_images_per_second", result.images_per_second)
    return run.info.run_id, experiment_id
