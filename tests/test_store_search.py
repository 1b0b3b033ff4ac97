"""The store's search against the FAISS index it holds: the same answer, and the shortcut that
reads back only the candidates that can still be among the k best gives the answer ranking
all of them gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_features_store import clustered, make_store

from tltk.features.faiss_index import (
    EXACT_SCORES,
    IndexOptions,
    contenders,
    make_index,
    prepare_vectors,
    rerank,
    rerank_extra,
    score_rounding,
    train_index,
)

DIM = 32


def exact_distances(vectors: np.ndarray, queries: np.ndarray, rows: np.ndarray, metric: str) -> np.ndarray:
    """Float64 distances of each query to the given stored rows, computed from scratch."""
    picked, query = vectors[rows].astype(np.float64), queries.astype(np.float64)[:, None, :]
    if metric == "cosine":
        unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
        return 1.0 - (unit(picked) * unit(query)).sum(-1)
    return np.sqrt(((picked - query) ** 2).sum(-1))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_the_store_answers_as_the_raw_index_it_holds(tmp_path: Path, kind: str, metric: str) -> None:
    """Searching the store gives the raw FAISS index's own neighbours at the store's search
    setting: the same rows in the same order, at the distances the index's scores stand for
    (an IVF-PQ index's scores are approximate, so there the store's answer is the index's
    candidates ranked by their true distances)."""
    vectors, labels = clustered(2000, DIM)
    queries = clustered(40, DIM, seed=1)[0]
    store = make_store(tmp_path / "s", vectors, labels, metric=metric, index=IndexOptions(kind=kind))
    k = 5
    distances, rows = store.search(queries, k)
    if kind == "ivfpq":
        _, candidates = store.index.search(prepare_vectors(queries, metric), k + rerank_extra(k))
        truth = exact_distances(vectors, queries, candidates, metric)
        order = np.argsort(truth, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(rows, np.take_along_axis(candidates, order, axis=1))
        np.testing.assert_allclose(distances, np.take_along_axis(truth, order, axis=1), rtol=1e-5, atol=1e-6)
        return
    scores, raw_rows = store.index.search(prepare_vectors(queries, metric), k)
    np.testing.assert_array_equal(rows, raw_rows)
    from_scores = 1.0 - scores if metric == "cosine" else np.sqrt(scores)
    np.testing.assert_allclose(distances, from_scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(distances, exact_distances(vectors, queries, rows, metric), rtol=1e-6, atol=1e-6)


def near_ties(metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Stored vectors with exact duplicates and copies moved by a few float32 units, and queries among them."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=(300, DIM)).astype(np.float32)
    nudged = base[:100] * np.float32(1 + 4e-7) if metric == "cosine" else base[:100] + np.float32(1e-6)
    vectors = np.concatenate([base, base[:100], nudged]).astype(np.float32)
    queries = (base[:60] + rng.normal(scale=0.05, size=(60, DIM))).astype(np.float32)
    return vectors, queries


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("kind", EXACT_SCORES)
def test_reading_back_only_contenders_ranks_as_reading_back_every_candidate(kind: str, metric: str) -> None:
    """With duplicates and near-duplicates among the candidates (ties rounding could swap),
    ranking only the candidates within reach of the k-th gives the same rows and the
    same distances, bit for bit, as ranking every candidate; and it does leave some out."""
    vectors, queries = near_ties(metric)
    index, _ = make_index(kind, DIM, len(vectors), metric, IndexOptions(kind=kind, nlist=4))
    train_index(index, vectors, metric, 0)
    index.add(prepare_vectors(vectors, metric))
    scores, candidates = index.search(prepare_vectors(queries, metric), 12)
    k = 6
    with_scores = rerank(vectors, queries, candidates, k, metric, scores=scores)
    every = rerank(vectors, queries, candidates, k, metric)
    np.testing.assert_array_equal(with_scores[1], every[1])
    np.testing.assert_array_equal(with_scores[0], every[0])
    widths = contenders(scores, candidates, k, metric, DIM)
    assert widths.min() == k < widths.max() <= candidates.shape[1]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("kind", EXACT_SCORES)
def test_faiss_scores_stay_within_the_rounding_the_shortcut_allows(kind: str, metric: str) -> None:
    """The shortcut rests on a bound for how far float32 rounding moves an IVF-Flat or
    HNSW-Flat score; FAISS's scores, against float64 ones, keep inside it (with 512-d
    vectors, where rounding adds up most)."""
    dim = 512
    vectors, _ = clustered(1500, dim)
    queries = clustered(30, dim, seed=2)[0]
    index, _ = make_index(kind, dim, len(vectors), metric, IndexOptions(kind=kind, nlist=8))
    train_index(index, vectors, metric, 0)
    index.add(prepare_vectors(vectors, metric))
    scores, rows = index.search(prepare_vectors(queries, metric), 20)
    exact = exact_distances(vectors, queries, rows, metric)
    if metric == "cosine":
        error = np.abs(scores - (1.0 - exact))
    else:
        error = np.abs(scores - exact**2) / exact**2
    assert error.max() <= score_rounding(dim)
