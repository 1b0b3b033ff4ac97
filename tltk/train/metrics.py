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
