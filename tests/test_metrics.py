"""Tests for tltk.metrics: each metric equals scikit-learn's on random inputs.

Inputs are drawn for several seeds and class counts, with scores rounded to few levels so
that ties are common, and predictions that leave some classes out entirely.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from tltk.metrics import (
    accuracy,
    classification_report,
    confusion_matrix,
    per_class_accuracy,
    top_k_accuracy,
)

SEEDS = [0, 1, 2, 3, 4]
CLASS_COUNTS = [3, 6, 10]


def random_case(seed: int, num_classes: int, n: int = 60, tie_levels: int | None = None):
    """Targets, scores and predictions; predictions never use the last class, targets skip class 1."""
    rng = np.random.default_rng(seed)
    present = [c for c in range(num_classes) if c != 1]
    targets = rng.choice(present, size=n)
    if tie_levels:
        scores = rng.integers(0, tie_levels, size=(n, num_classes)).astype(np.float64)
    else:
        scores = rng.normal(size=(n, num_classes))
    predictions = rng.integers(0, num_classes - 1, size=n)
    return targets, scores, predictions


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
def test_confusion_matrix_equals_sklearn_with_all_labels(seed, num_classes):
    targets, _, predictions = random_case(seed, num_classes)
    ours = confusion_matrix(targets, predictions, num_classes)
    expected = skm.confusion_matrix(targets, predictions, labels=list(range(num_classes)))
    assert ours.shape == (num_classes, num_classes)
    np.testing.assert_array_equal(ours, expected)
    assert ours[:, num_classes - 1].sum() == 0 and ours[1].sum() == 0


def test_confusion_matrix_rows_are_true_classes_and_columns_predictions():
    ours = confusion_matrix(np.array([0, 0, 2]), np.array([1, 1, 0]), 3)
    assert ours.tolist() == [[0, 2, 0], [0, 0, 0], [1, 0, 0]]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
def test_accuracy_equals_sklearn(seed, num_classes):
    targets, _, predictions = random_case(seed, num_classes)
    predictions[:10] = targets[:10]  # some right, some wrong
    assert accuracy(targets, predictions) == pytest.approx(skm.accuracy_score(targets, predictions), abs=1e-12)


def test_accuracy_of_nothing_is_nan():
    assert np.isnan(accuracy(np.array([], dtype=int), np.array([], dtype=int)))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("tie_levels", [None, 3], ids=["distinct", "ties"])
def test_top_k_accuracy_equals_sklearn_including_tied_scores(seed, num_classes, k, tie_levels):
    targets, scores, _ = random_case(seed, num_classes, tie_levels=tie_levels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns when k >= number of classes
        expected = skm.top_k_accuracy_score(targets, scores, k=k, labels=list(range(num_classes)))
    assert top_k_accuracy(targets, scores, k) == pytest.approx(expected, abs=1e-12)


def test_top_k_ties_rank_the_higher_class_index_first_as_sklearn_does():
    targets = np.array([0, 2, 1])
    scores = np.ones((3, 4))  # every class tied: top-1 is class 3, top-2 classes 3 and 2
    assert top_k_accuracy(targets, scores, 1) == 0.0
    assert top_k_accuracy(targets, scores, 2) == pytest.approx(1 / 3)
    assert top_k_accuracy(targets, scores, 3) == pytest.approx(2 / 3)
    assert skm.top_k_accuracy_score(targets, scores, k=2, labels=range(4)) == pytest.approx(1 / 3)


def test_top_1_accuracy_equals_accuracy_of_argmax_without_ties():
    targets, scores, _ = random_case(9, 10)
    assert top_k_accuracy(targets, scores, 1) == accuracy(targets, scores.argmax(axis=1))


def test_top_k_of_nothing_is_nan():
    assert np.isnan(top_k_accuracy(np.array([], dtype=int), np.zeros((0, 4)), 3))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
def test_per_class_accuracy_equals_sklearn_recall_with_nan_for_absent_classes(seed, num_classes):
    targets, _, predictions = random_case(seed, num_classes)
    copy = (np.arange(len(targets)) % 3 == 0) & (targets != num_classes - 1)
    predictions[copy] = targets[copy]  # some right answers; the last class stays unpredicted
    ours = per_class_accuracy(confusion_matrix(targets, predictions, num_classes))
    expected = skm.recall_score(
        targets, predictions, labels=list(range(num_classes)), average=None, zero_division=np.nan
    )
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12, equal_nan=True)
    assert np.isnan(ours[1])  # class 1 never occurs in the targets
    assert ours[num_classes - 1] == 0.0  # the last class occurs but is never predicted


def random_scores_case(seed: int, num_classes: int, n: int = 40):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, num_classes, size=n)
    scores = rng.normal(size=(n, num_classes))
    return targets, scores


@pytest.mark.parametrize("num_classes", [2, 5])
def test_classification_report_has_no_top5_with_five_classes_or_fewer(num_classes):
    targets, scores = random_scores_case(0, num_classes)
    report = classification_report(targets, scores, [f"c{i}" for i in range(num_classes)])
    assert "top5_accuracy" not in report


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("num_classes", [6, 12])
def test_classification_report_matches_sklearn_and_has_top5_above_five_classes(seed, num_classes):
    targets, scores = random_scores_case(seed, num_classes)
    names = [f"class_{i}" for i in range(num_classes)]
    report = classification_report(targets, scores, names)
    labels = list(range(num_classes))
    predictions = scores.argmax(axis=1)

    assert report["n"] == len(targets)
    assert report["class_names"] == names
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(targets, predictions))
    assert report["top5_accuracy"] == pytest.approx(skm.top_k_accuracy_score(targets, scores, k=5, labels=labels))
    assert report["confusion_matrix"] == skm.confusion_matrix(targets, predictions, labels=labels).tolist()
    recall = skm.recall_score(targets, predictions, labels=labels, average=None, zero_division=np.nan)
    for name, value in zip(names, recall):
        if np.isnan(value):
            assert report["per_class_accuracy"][name] is None
        else:
            assert report["per_class_accuracy"][name] == pytest.approx(value)
    assert report["support"] == {name: int((targets == i).sum()) for i, name in enumerate(names)}


def test_classification_report_gives_none_for_a_class_with_no_samples():
    targets = np.array([0, 0, 2, 2])
    scores = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 1.0]])
    report = classification_report(targets, scores, ["a", "b", "c"])
    assert report["per_class_accuracy"] == {"a": 0.5, "b": None, "c": 1.0}
    assert report["support"] == {"a": 2, "b": 0, "c": 2}
    assert report["accuracy"] == 0.75
