"""The store's search against the FAISS index it holds: the same answer, and the shortcut that
reads back only the candidates that can still be among the k best gives the answer ranking
all of them gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_features_store import clustered, make_store, rows_for

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
from tltk.features.ranking import (
    SHORT_EXTRA,
    faiss_scores_bounded,
    order_by_score,
    recomputed_scores,
    search_in_two_steps,
    within_reach,
)
from tltk.features.store import FeatureStore
from tltk.features.writing import iter_chunks

DIM = 32


def exact_distances(vectors: np.ndarray, queries: np.ndarray, rows: np.ndarray, metric: str) -> np.ndarray:
    """Float64 distances of each query to the given stored rows, computed from scratch."""
    picked, query = vectors[rows].astype(np.float64), queries.astype(np.float64)[:, None, :]
    if metric == "cosine":
        unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
        return 1.0 - (unit(picked) * unit(query)).sum(-1)
    return np.sqrt(((picked - query) ** 2).sum(-1))


def assert_within_rounding(distances: np.ndarray, truth: np.ndarray, metric: str, dim: int) -> None:
    """The store's distances are the true ones up to the rounding its float32 scores may carry
    (score_rounding relative to the squared distance for L2, twice it in all for cosine),
    and float32's own rounding of the result."""
    found = np.isfinite(truth)
    assert np.array_equal(found, np.isfinite(distances))
    got, true = distances[found].astype(np.float64), truth[found]
    spare = 4 * float(np.finfo(np.float32).eps)
    if metric == "cosine":
        assert np.all(np.abs(got - true) <= 2 * score_rounding(dim) + spare * (1 + np.abs(true)))
    else:
        assert np.all(np.abs(got**2 - true**2) <= (score_rounding(dim) + spare) * true**2 + 1e-30)


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
    assert_within_rounding(distances, exact_distances(vectors, queries, rows, metric), metric, DIM)


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


class CountingIndex:
    """A FAISS index that counts the queries it is asked, and for how many neighbours."""

    def __init__(self, index: object) -> None:
        self.index = index
        self.asked: list[tuple[int, int]] = []

    def search(self, queries: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        self.asked.append((len(queries), count))
        return self.index.search(queries, count)


def ranking_every_candidate(store: FeatureStore, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The store's promise computed literally: the index's first k + rerank_extra(k)
    candidates, every one of them ranked by float64 distances from the stored vectors
    (computed from scratch here; equal distances keep the index's order)."""
    count = min(store.count, k + rerank_extra(k))
    _, candidates = store.index.search(prepare_vectors(queries, store.metric), count)
    valid = candidates >= 0
    truth = np.where(valid, exact_distances(np.asarray(store.features()), queries, np.where(valid, candidates, 0),
                                            store.metric), np.inf)
    order = np.argsort(truth, axis=1, kind="stable")[:, :k]
    rows = np.take_along_axis(candidates, order, axis=1)
    return np.take_along_axis(truth, order, axis=1), np.where(rows >= 0, rows, -1)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_the_store_ranks_as_ranking_every_candidate_in_float64(tmp_path: Path, kind: str, metric: str) -> None:
    """Whatever shortcut the store takes (fewer candidates asked for first, float32 scores
    with a bound, float64 only where rounding could swap two), it ranks as the promise says:
    the same rows in the same order as ranking all k + rerank_extra(k) candidates by
    float64 distances, also among exact duplicates and copies a few float32 units apart;
    its distances are the true ones up to the scores' rounding, and equal where the
    vectors are equal (those are measured in float64)."""
    vectors, queries = near_ties(metric)
    store = make_store(tmp_path / "s", vectors, np.zeros(len(vectors), dtype=np.int64), metric=metric,
                       index=IndexOptions(kind=kind, nlist=4))
    for k in (1, 6, 10):
        distances, rows = store.search(queries, k)
        expected_distances, expected_rows = ranking_every_candidate(store, queries, k)
        np.testing.assert_array_equal(rows, expected_rows)
        assert_within_rounding(distances, expected_distances, metric, DIM)
        first, second = np.minimum(rows[:, :-1], rows[:, 1:]), np.maximum(rows[:, :-1], rows[:, 1:])
        twins = (first >= 0) & (first < 100) & (second == first + 300)  # row i and its exact copy 300 + i
        assert k == 1 or twins.any()
        np.testing.assert_array_equal(distances[:, :-1][twins], distances[:, 1:][twins])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_the_store_ranks_512_dimensional_vectors_as_float64_does(tmp_path: Path, kind: str, metric: str) -> None:
    """At 512 dimensions, where float32 sums round most, the store's rows are those of the
    float64 ranking of its candidates and its distances within the rounding allowed."""
    dim = 512
    vectors, labels = clustered(1200, dim)
    queries = clustered(40, dim, seed=7)[0]
    store = make_store(tmp_path / "s", vectors, labels, metric=metric, index=IndexOptions(kind=kind, nlist=8))
    distances, rows = store.search(queries, 10)
    expected_distances, expected_rows = ranking_every_candidate(store, queries, 10)
    np.testing.assert_array_equal(rows, expected_rows)
    assert_within_rounding(distances, expected_distances, metric, dim)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("kind", EXACT_SCORES)
def test_fewer_candidates_are_asked_for_first_and_more_only_where_rounding_could_reach(kind: str, metric: str) -> None:
    """An index with exact-up-to-rounding scores is asked for k + SHORT_EXTRA candidates,
    then for all of them again only for the queries whose last candidate is within
    rounding reach of the k-th (near-duplicates force some); every candidate of the full
    search that could still be among the k best is among those returned, at its place."""
    vectors, queries = near_ties(metric)
    index, _ = make_index(kind, DIM, len(vectors), metric, IndexOptions(kind=kind, nlist=4))
    train_index(index, vectors, metric, 0)
    index.add(prepare_vectors(vectors, metric))
    prepared, k, count = prepare_vectors(queries, metric), 6, 12
    counting = CountingIndex(index)
    scores, rows = search_in_two_steps(counting, prepared, k, count, metric)
    assert counting.asked[0] == (len(queries), k + SHORT_EXTRA)
    assert len(counting.asked) == 2 and 0 < counting.asked[1][0] < len(queries) and counting.asked[1][1] == count
    full_scores, full_rows = index.search(prepared, count)
    needed = within_reach(full_scores, full_rows, k, metric, DIM)
    np.testing.assert_array_equal(np.where(needed, rows, -1), np.where(needed, full_rows, -1))
    np.testing.assert_array_equal(within_reach(scores, rows, k, metric, DIM), needed)


def test_an_hnsw_index_searching_fewer_than_the_candidates_is_not_asked_in_two_steps(tmp_path: Path) -> None:
    """Below efSearch = the number of candidates, FAISS widens an HNSW search to the count
    asked for, so fewer candidates are not a prefix of more: the store asks for all at once
    and scores them again from the rows, and still gives the promised answer."""
    vectors, labels = clustered(800, DIM)
    queries = clustered(30, DIM, seed=4)[0]
    store = make_store(tmp_path / "s", vectors, labels, index=IndexOptions(kind="hnsw", ef_search=8))
    assert not faiss_scores_bounded(store.index, "hnsw", 20) and faiss_scores_bounded(store.index, "hnsw", 8)
    assert faiss_scores_bounded(store.index, "hnsw", 8, "l2") and not faiss_scores_bounded(store.index, "hnsw", 8, "cosine")
    distances, rows = store.search(queries, 10)
    expected_distances, expected_rows = ranking_every_candidate(store, queries, 10)
    np.testing.assert_array_equal(rows, expected_rows)
    assert_within_rounding(distances, expected_distances, "l2", DIM)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_scores_computed_again_from_the_rows_stay_within_the_rounding_allowed(metric: str) -> None:
    """The float32 scores computed straight from stored rows of any length (512-d, where
    rounding adds up most) are within score_rounding of the float64 truth: relative to the
    squared distance for L2, twice it in all for cosine, as ``within_reach`` assumes."""
    dim = 512
    rng = np.random.default_rng(5)
    vectors = clustered(1000, dim)[0] * rng.uniform(0.01, 100.0, size=(1000, 1)).astype(np.float32)
    queries = clustered(30, dim, seed=6)[0]
    candidates = rng.integers(0, len(vectors), size=(len(queries), 20))
    candidates[0, -3:] = -1
    scores = recomputed_scores(vectors, prepare_vectors(queries, metric), candidates, metric)
    valid = candidates >= 0
    exact = exact_distances(vectors, queries, np.where(valid, candidates, 0), metric)
    if metric == "cosine":
        error = np.abs(scores - (1.0 - exact))[valid]
        assert error.max() <= 2 * score_rounding(dim) and np.all(scores[~valid] == -np.inf)
    else:
        error = (np.abs(scores - exact**2) / exact**2)[valid]
        assert error.max() <= score_rounding(dim) and np.all(scores[~valid] == np.inf)


def test_float64_ranking_reads_back_only_candidates_within_reach_of_the_kth() -> None:
    """Candidates whose score is worse than the k-th by more than the rounding are left out
    of the float64 step (the shortcut does something), a tie at the k-th keeps both, and
    with fewer than k candidates found every found one is kept."""
    scores = np.array([[1.0, 2.0, 3.0, 3.0, 50.0, np.inf], [1.0, 2.0, np.inf, np.inf, np.inf, np.inf]], dtype=np.float32)
    rows = np.array([[5, 4, 3, 2, 1, -1], [7, 8, -1, -1, -1, -1]])
    kept = within_reach(scores, rows, 3, "l2", DIM)
    assert kept.tolist() == [[True, True, True, True, False, False], [True, True, False, False, False, False]]


def test_a_search_after_an_append_reads_the_rows_appended(tmp_path: Path) -> None:
    """The store keeps its memory map of the vectors between searches; after rows are
    appended through it, a search finds and ranks the new rows, not a stale map."""
    vectors, labels = clustered(300, DIM)
    store = make_store(tmp_path / "s", vectors, labels)
    opened = FeatureStore.open(tmp_path / "s")
    opened.search(vectors[:5], 3)
    extra = clustered(20, DIM, seed=9)[0] + 50.0
    opened.append(iter_chunks(extra, rows_for(np.zeros(20, dtype=np.int64)), 8), {"spec": "more"}, ["0"])
    distances, rows = opened.search(extra, 1)
    assert rows[:, 0].tolist() == list(range(300, 320))
    np.testing.assert_allclose(distances[:, 0], 0.0, atol=1e-6)
    del store


def test_only_neighbours_rounding_could_swap_are_measured_in_float64() -> None:
    """In score order, a candidate is measured again only where its rounding interval
    overlaps a neighbour's (here the two tied at 3.0 and the k-th's rival at 3.00001);
    candidates out of reach, and the missing ones after them, are not."""
    scores = np.array([[3.0, 1.0, 3.0, 2.0, 50.0, 40.0], [1.0, 2.0, 4.0, np.inf, np.inf, np.inf],
                       [1.0, 2.0, 3.0, 3.00001, 9.0, 9.5]], dtype=np.float32)
    rows = np.array([[5, 4, 3, 2, 1, 0], [7, 8, 9, -1, -1, -1], [0, 1, 2, 3, 4, 5]])
    distances, ordered, unsure = order_by_score(scores, rows, 3, "l2", DIM)
    assert ordered.tolist() == [[4, 2, 5, 3], [7, 8, 9, -1], [0, 1, 2, 3]]
    assert unsure.tolist() == [[False, False, True, True], [False, False, False, False], [False, False, True, True]]
    np.testing.assert_allclose(distances[1, :3], np.sqrt([1.0, 2.0, 4.0]))
