"""Classification metrics (scikit-learn) and the confusion-matrix figure.

scikit-learn is imported where it is used, not at module import: the first evaluation pays its
~2 s import, a training start does not."""

from __future__ import annotations

import math

import numpy as np

from fer_exp.classes import CLASS_NAMES, NUM_CLASSES

LABELS = list(range(NUM_CLASSES))
# an evaluation's scores on the faces that have no copy in an earlier split of the source (FER2013's
# cross-split copies left out): the honest number beside the benchmark's, e.g. test_accuracy_uncopied
UNCOPIED_SUFFIX = "_uncopied"
UNCOPIED_METRICS = ("accuracy", "macro_f1")


def classification_metrics(labels, predictions, prefix: str = "") -> dict[str, float]:
    """Accuracy, macro/weighted precision, recall and F1, and per-class accuracy (= recall) and F1.

    A class with no face in ``labels`` has no accuracy or F1 (NaN, printed "n/a") and is left out of
    the macro averages, which average over the classes evaluated: a folder of three emotions is not
    marked down for the four it lacks. Where every class has faces (FER2013's splits) this is
    scikit-learn's macro average over the seven."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    labels, predictions = np.asarray(labels), np.asarray(predictions)
    evaluated = present_classes(labels)
    out = {"accuracy": accuracy_score(labels, predictions)}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, predictions, labels=evaluated, average=average, zero_division=0)
        out |= {f"{average}_precision": p, f"{average}_recall": r, f"{average}_f1": f}
    _, recall, f1, support = precision_recall_fscore_support(labels, predictions, labels=LABELS, average=None, zero_division=0)
    out |= {f"acc_{name}": recall[i] if support[i] else math.nan for i, name in enumerate(CLASS_NAMES)}
    out |= {f"f1_{name}": f1[i] if support[i] else math.nan for i, name in enumerate(CLASS_NAMES)}
    return {f"{prefix}{k}": float(v) for k, v in out.items()}


def present_classes(labels) -> list[int]:
    """The class indices ``labels`` has faces of (all seven where there are none, so nothing divides by 0)."""
    present = sorted(set(np.asarray(labels).tolist()))
    return present or LABELS


def score_text(value: float, digits: int = 3) -> str:
    """A score as printed: ``n/a`` for a class with no faces (NaN)."""
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def uncopied_metrics(labels, predictions, copied, prefix: str) -> dict[str, float]:
    """``<prefix>accuracy_uncopied`` and ``<prefix>macro_f1_uncopied``: the scores on the faces that are
    not ``copied`` (a boolean per face); none where no face or every face is a copy."""
    copied = np.asarray(copied, dtype=bool)
    if not copied.any() or copied.all():
        return {}
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    scores = classification_metrics(labels[~copied], predictions[~copied])
    return {f"{prefix}{name}{UNCOPIED_SUFFIX}": scores[name] for name in UNCOPIED_METRICS}


def per_class_table(labels, predictions) -> dict[str, list]:
    """Per-class precision, recall, F1, support and accuracy, as columns (for ``mlflow.log_table``); a class
    with no faces (support 0) has no recall, F1 or accuracy (None), and no precision either where nothing
    was predicted as it."""
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(labels, predictions, labels=LABELS, average=None, zero_division=0)
    defined = s > 0
    predicted = np.bincount(np.asarray(predictions, dtype=np.int64), minlength=NUM_CLASSES) > 0
    recall = [float(v) if d else None for v, d in zip(r, defined)]
    return {"class": list(CLASS_NAMES), "precision": [float(v) if d else None for v, d in zip(p, defined | predicted)],
            "recall": recall,
            "f1": [float(v) if d else None for v, d in zip(f, defined)], "support": s.tolist(), "accuracy": recall}


def report_text(labels, predictions) -> str:
    """scikit-learn's classification report over the classes evaluated (as the macro averages), and a
    line naming the classes with no faces."""
    from sklearn.metrics import classification_report

    labels, predictions = np.asarray(labels), np.asarray(predictions)
    evaluated = present_classes(labels)
    names = [CLASS_NAMES[i] for i in evaluated]
    text = classification_report(labels, predictions, labels=evaluated, target_names=names, digits=4, zero_division=0)
    absent = [name for i, name in enumerate(CLASS_NAMES) if i not in evaluated]
    if absent:
        # scikit-learn writes a micro average in place of accuracy where faces are predicted as an absent class
        width = max(len(n) for n in [*names, "weighted avg"])
        accuracy = f"{'accuracy':>{width}}  {'':>9} {'':>9} {float((labels == predictions).mean()):>9.4f} {len(labels):>9}"
        text = "\n".join(accuracy if line.strip().startswith("micro avg") else line for line in text.split("\n"))
        text += f"\nno faces of {', '.join(absent)}: left out of the averages\n"
    return text


def confusion_figure(labels, predictions, title: str = "Confusion matrix"):
    """Side-by-side counts and row-normalised (recall) confusion matrices, as a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from sklearn.metrics import confusion_matrix

    counts = confusion_matrix(labels, predictions, labels=LABELS)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    absent = rows[:, 0] == 0  # a class with no faces: its normalised row reads n/a
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5), constrained_layout=True)
    for ax, matrix, name, fmt in ((axes[0], counts, "counts", "d"), (axes[1], normalised, "row-normalised", ".2f")):
        image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=matrix.max() or 1)
        ax.set(xticks=LABELS, yticks=LABELS, xticklabels=CLASS_NAMES, yticklabels=CLASS_NAMES,
               xlabel="predicted", ylabel="true", title=f"{title} ({name})")
        ax.tick_params(axis="x", rotation=45)
        threshold = matrix.max() / 2 if matrix.max() else 1
        for i in LABELS:
            for j in LABELS:
                shown = "n/a" if matrix is normalised and absent[i] else format(matrix[i, j], fmt)
                ax.text(j, i, shown, ha="center", va="center", fontsize=9,
                        color="white" if matrix[i, j] > threshold else "black")
        fig.colorbar(image, ax=ax, shrink=0.8)
    return fig
