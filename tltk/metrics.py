"""Classification metrics, computed the way scikit-learn defines them.

Plain NumPy so they run on whatever the model produced; the tests compare each one
against scikit-learn on random inputs.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(targets: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted ones (scikit-learn's convention)."""
    flat = targets.astype(np.int64) * num_classes + predictions.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(targets: np.ndarray, predictions: np.ndarray) -> float:
    return float(np.mean(targets == predictions)) if len(targets) else float("nan")


def top_k_accuracy(targets: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Share of samples whose true class is among the k highest scores.

    Ties are broken as scikit-learn's ``top_k_accuracy_score`` does: a stable ascending
    sort read backwards, so among equal scores the higher class index ranks first.
    """
    if not len(targets):
        return float("nan")
    top = np.argsort(scores, axis=1, kind="stable")[:, ::-1][:, :k]
    return float(np.mean(np.any(top == targets[:, None], axis=1)))


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Recall of each class: correct / samples of that class (NaN where a class has none)."""
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)


def classification_report(targets: np.ndarray, scores: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, top-5 where there are more than 5 classes, per-class accuracy, confusion matrix."""
    num_classes = len(class_names)
    predictions = scores.argmax(axis=1)
    confusion = confusion_matrix(targets, predictions, num_classes)
    report: dict = {
        "n": int(len(targets)),
        "task": "multiclass",
        "accuracy": accuracy(targets, predictions),
        "per_class_accuracy": {
            name: (None if np.isnan(v) else float(v)) for name, v in zip(class_names, per_class_accuracy(confusion))
        },
        "support": {name: int(n) for name, n in zip(class_names, confusion.sum(axis=1))},
        "confusion_matrix": confusion.tolist(),
        "class_names": list(class_names),
    }
    if num_classes > 5:
        report["top5_accuracy"] = top_k_accuracy(targets, scores, 5)
    return report


# --- multi-label: average precision -----------------------------------------------------
#
# Labels are 1 (positive), 0 (negative) or -1 (ignored: VOC's "difficult"); ignored
# samples are left out of that class's ranking, as the VOC devkit does. A class with no
# positive sample has no defined AP: it is NaN and left out of the mean (scikit-learn
# would warn and return 0, which would drag mAP down for a class that cannot be scored).


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as scikit-learn's ``average_precision_score``.

    AP = sum over distinct score thresholds of (R_n - R_{n-1}) * P_n; tied scores form
    one threshold, so their order does not matter.
    """
    labels, scores = _scored(labels, scores)
    positives_total = int(labels.sum())
    if positives_total == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, hits = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    true_pos = np.cumsum(hits)[last_of_tie]
    precision = true_pos / (last_of_tie + 1)
    recall = true_pos / positives_total
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def voc07_average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """The VOC2007 devkit's 11-point interpolated AP (VOCevalcls.m).

    Samples are ranked by score (a stable sort, as MATLAB's), precision and recall are
    taken after each sample, and AP is the mean over t = 0, 0.1, ..., 1 of the highest
    precision at a recall of at least t.
    """
    labels, scores = _scored(labels, scores)
    positives_total = int(labels.sum())
    if positives_total == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    true_pos = np.cumsum(labels[order])
    precision = true_pos / np.arange(1, len(order) + 1)
    recall = true_pos / positives_total
    points = [precision[recall >= t].max() if np.any(recall >= t) else 0.0 for t in np.linspace(0, 1, 11)]
    return float(np.mean(points))


def _scored(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    keep = labels >= 0
    return (labels[keep] == 1).astype(np.int64), scores[keep]


def mean_ignoring_nan(values: list[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def multilabel_report(targets: np.ndarray, scores: np.ndarray, class_names: list[str]) -> dict:
    """Per-class AP in both definitions, mAP of each, and counts, for a (N, C) label matrix."""
    ap = [average_precision(targets[:, c], scores[:, c]) for c in range(len(class_names))]
    ap07 = [voc07_average_precision(targets[:, c], scores[:, c]) for c in range(len(class_names))]
    return {
        "n": int(len(targets)),
        "task": "multilabel",
        "map": mean_ignoring_nan(ap),
        "map_voc07": mean_ignoring_nan(ap07),
        "per_class": [
            {"class": name, "ap": _none_if_nan(a), "ap_voc07": _none_if_nan(b),
             "positives": int((targets[:, c] == 1).sum()), "ignored": int((targets[:, c] == -1).sum())}
            for c, (name, a, b) in enumerate(zip(class_names, ap, ap07))
        ],
        "class_names": list(class_names),
    }


def _none_if_nan(value: float) -> float | None:
    return None if np.isnan(value) else float(value)
