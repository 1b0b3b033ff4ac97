"""How well a store's neighbours agree with its labels: leave-one-out kNN accuracy,
precision@k and mAP@k, so that layers (pool5 vs fc7) or models compare in one number each.

Every stored row is a query against all the others (itself left out). A neighbour is
relevant when it shares a label with the query: the same class for multi-class data,
at least one common positive label for multi-label data.

- precision@k: relevant neighbours among the k nearest, divided by k, averaged over queries.
- AP@k of one query: the mean of precision@i over the ranks i <= k that hold a relevant
  neighbour (sum of precision@i x rel_i, divided by the number of relevant neighbours in
  the top k; 0 when there is none), which is scikit-learn's ``average_precision_score``
  of the top-k list. mAP@k is its mean over queries.
- kNN accuracy (multi-class only): the majority class of the k nearest neighbours equals
  the query's class; a tie goes to the class listed first, as in scikit-learn's
  ``KNeighborsClassifier``.

Queries without any label (a multi-label image whose objects are all ignored) are left out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from tltk.errors import TltkError
from tltk.features.store import FeatureStore


@dataclass
class RetrievalReport:
    store: str
    layer: str
    pool: str
    metric: str
    task: str
    k: int
    queries: int
    exact: bool
    precision_at_k: float
    map_at_k: float
    knn_accuracy: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_retrieval(store: FeatureStore, k: int = 10, *, sample: int | None = None, exact: bool = False,
                       seed: int = 0) -> RetrievalReport:
    """Leave-one-out retrieval figures of ``store`` against its stored labels.

    ``sample`` takes that many random queries (seeded) instead of every row; the gallery
    is always the whole store. The store's own index answers unless ``exact`` asks for
    brute force (the same thing for an exact index).
    """
    if k < 1:
        raise TltkError(f"--k must be at least 1, not {k}.")
    if store.count < 2:
        raise TltkError(f"the store at {store.path} has {store.count} row; leave-one-out needs at least 2.")
    labels = store.labels()
    queries = np.array([i for i, names in enumerate(labels) if names], dtype=np.int64)
    if len(queries) == 0:
        raise TltkError(f"no row of the store at {store.path} has a label; retrieval is scored against labels.")
    if sample is not None:
        if sample < 1:
            raise TltkError(f"--sample must be at least 1, not {sample}.")
        rng = np.random.default_rng(seed)
        queries = np.sort(rng.choice(queries, size=min(sample, len(queries)), replace=False))
    k = min(k, store.count - 1)
    _, found = store.search_rows(queries, k, exact=exact)
    relevant = relevance([labels[q] for q in queries], [[labels[r] if r >= 0 else [] for r in row] for row in found])
    accuracy = None
    if store.task == "multiclass":
        index = {name: i for i, name in enumerate(store.class_names)}
        classes = np.array([[index[labels[r][0]] if r >= 0 else -1 for r in row] for row in found], dtype=np.int64)
        own = np.array([index[labels[q][0]] for q in queries], dtype=np.int64)
        accuracy = float(np.mean(knn_vote(classes, len(store.class_names)) == own))
    return RetrievalReport(
        str(store.path), store.layer, store.pool, store.metric, store.task, k, len(queries),
        exact or store.index_type == "flat", precision_at_k(relevant), float(np.mean(average_precision_at_k(relevant))),
        accuracy,
    )


def relevance(query_labels: Sequence[Sequence[str]], neighbour_labels: Sequence[Sequence[Sequence[str]]]) -> np.ndarray:
    """(queries, k) booleans: does neighbour j share a label with query i."""
    return np.array([[bool(set(q) & set(n)) for n in row] for q, row in zip(query_labels, neighbour_labels)], dtype=bool)


def precision_at_k(relevant: np.ndarray) -> float:
    """Mean over queries of (relevant among the k) / k."""
    return float(relevant.mean(axis=1).mean())


def average_precision_at_k(relevant: np.ndarray) -> np.ndarray:
    """Per query: sum over relevant ranks i of precision@i, over the number relevant (0 if none)."""
    hits = np.cumsum(relevant, axis=1)
    ranks = np.arange(1, relevant.shape[1] + 1)
    found = relevant.sum(axis=1)
    return np.where(found > 0, (hits / ranks * relevant).sum(axis=1) / np.maximum(found, 1), 0.0)


def knn_vote(neighbour_classes: np.ndarray, num_classes: int) -> np.ndarray:
    """The most frequent class in each row (-1 entries ignored); ties go to the lowest class index."""
    votes = np.zeros((len(neighbour_classes), num_classes), dtype=np.int64)
    for i, row in enumerate(neighbour_classes):
        np.add.at(votes[i], row[row >= 0], 1)
    return votes.argmax(axis=1)


__all__ = ["RetrievalReport", "average_precision_at_k", "evaluate_retrieval", "knn_vote", "precision_at_k", "relevance"]
