"""Retrieval figures agree with scikit-learn: leave-one-out kNN accuracy, precision@k, mAP@k."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score
from sklearn.model_selection import LeaveOneOut, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

from tltk.errors import TltkError
from tltk.features.faiss_index import IndexOptions
from tltk.features.retrieval import average_precision_at_k, evaluate_retrieval, knn_vote, precision_at_k
from tltk.features.store import FeatureStore, create_store
from tltk.features.writing import iter_chunks

CLASSES = ["ant", "bee", "cat", "dog"]


def labelled_store(path: Path, vectors: np.ndarray, labels: list[list[str]], metric: str, task: str,
                   index: IndexOptions | None = None) -> FeatureStore:
    rows = [{"id": str(i), "path": f"{i}.png", "labels": names, "split": "train"} for i, names in enumerate(labels)]
    header = {"source": {"fingerprint": "0" * 64, "description": "vectors"}, "layer": "fc7", "pool": "avg",
              "class_names": CLASSES, "task": task, "data": []}
    return create_store(path, iter_chunks(vectors, rows, 50), header, metric=metric, index=index)


def overlapping_classes(n: int = 160, dim: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four classes close enough together that neighbours often disagree."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 4, size=n)
    centres = rng.normal(size=(4, dim))
    return (centres[classes] + 1.5 * rng.normal(size=(n, dim))).astype(np.float32), classes


@pytest.mark.parametrize("metric, sklearn_metric", [("l2", "euclidean"), ("cosine", "cosine")])
def test_knn_accuracy_equals_scikit_learn_leave_one_out(tmp_path: Path, metric: str, sklearn_metric: str) -> None:
    vectors, classes = overlapping_classes()
    store = labelled_store(tmp_path / "s", vectors, [[CLASSES[c]] for c in classes], metric, "multiclass")
    report = evaluate_retrieval(store, k=7)
    knn = KNeighborsClassifier(n_neighbors=7, algorithm="brute", metric=sklearn_metric)
    predicted = cross_val_predict(knn, vectors.astype(np.float64), classes, cv=LeaveOneOut())
    expected = float(np.mean(predicted == classes))
    assert 0.3 < expected < 0.95  # a case where the figure says something
    assert report.knn_accuracy == pytest.approx(expected)
    assert (report.k, report.queries, report.exact) == (7, 160, True)


def test_precision_and_map_at_k_equal_numpy_and_scikit_learn_references(tmp_path: Path) -> None:
    vectors, classes = overlapping_classes(seed=3)
    store = labelled_store(tmp_path / "s", vectors, [[CLASSES[c]] for c in classes], "l2", "multiclass")
    report = evaluate_retrieval(store, k=10)
    _, neighbours = NearestNeighbors(n_neighbors=10, algorithm="brute").fit(vectors.astype(np.float64)).kneighbors()
    relevant = classes[neighbours] == classes[:, None]
    assert report.precision_at_k == pytest.approx(relevant.sum(axis=1).mean() / 10)
    scores = -np.arange(10, dtype=float)  # nearest first
    ap = [average_precision_score(r, scores) if r.any() else 0.0 for r in relevant]
    assert report.map_at_k == pytest.approx(float(np.mean(ap)))


def test_multi_label_neighbours_count_as_relevant_when_they_share_a_label(tmp_path: Path) -> None:
    vectors = np.array([[0.0], [1.0], [2.1], [3.5], [10.0]], dtype=np.float32)
    labels = [["ant", "bee"], ["bee"], ["cat"], ["ant", "cat"], ["dog"]]
    store = labelled_store(tmp_path / "s", vectors, labels, "l2", "multilabel")
    report = evaluate_retrieval(store, k=2)
    # neighbours (k=2), nearest first: 0 -> 1 (bee) ✓, 2 ✗ | 1 -> 0 ✓, 2 ✗ | 2 -> 1 ✗, 3 (cat) ✓
    # | 3 -> 2 ✓, 1 ✗ | 4 -> 3 ✗, 2 ✗
    relevant = np.array([[1, 0], [1, 0], [0, 1], [1, 0], [0, 0]], dtype=bool)
    assert report.knn_accuracy is None and report.task == "multilabel"
    assert report.precision_at_k == pytest.approx(relevant.mean())
    assert report.map_at_k == pytest.approx((1 + 1 + 0.5 + 1 + 0) / 5)


def test_average_precision_at_k_counts_precision_at_each_relevant_rank() -> None:
    relevant = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=bool)
    expected = [(1 + 2 / 3) / 2, 0.0, (1 / 2 + 2 / 3 + 3 / 4) / 3]
    np.testing.assert_allclose(average_precision_at_k(relevant), expected)
    assert precision_at_k(relevant) == pytest.approx((2 / 4 + 0 + 3 / 4) / 3)


def test_knn_vote_breaks_ties_toward_the_first_class_as_scikit_learn_does() -> None:
    assert knn_vote(np.array([[2, 1, 1, 2], [3, 3, 0, -1]]), 4).tolist() == [1, 3]


def test_sampled_queries_and_approximate_indexes_are_reported_as_such(tmp_path: Path) -> None:
    vectors, classes = overlapping_classes(n=1200)
    store = labelled_store(tmp_path / "s", vectors, [[CLASSES[c]] for c in classes], "l2", "multiclass",
                           IndexOptions(kind="hnsw"))
    sampled = evaluate_retrieval(store, k=5, sample=100)
    exact = evaluate_retrieval(store, k=5, sample=100, exact=True)
    assert sampled.queries == 100 and not sampled.exact and exact.exact
    assert abs(sampled.precision_at_k - exact.precision_at_k) < 0.05


def test_retrieval_needs_labels_and_a_sensible_k(tmp_path: Path) -> None:
    vectors, _ = overlapping_classes(n=10)
    store = labelled_store(tmp_path / "s", vectors, [[] for _ in range(10)], "l2", "multilabel")
    with pytest.raises(TltkError, match="no row of the store .* has a label"):
        evaluate_retrieval(store)
    with pytest.raises(TltkError, match="--k must be at least 1"):
        evaluate_retrieval(store, k=0)
