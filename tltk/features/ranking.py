"""The store's answer for little more than the FAISS search it rests on.

``FeatureStore.search`` promises: of the first ``k + rerank_extra(k)`` candidates the
index returns, the ``k`` best in the order of their float64 distances from the stored
vectors, each with its distance within ``score_rounding`` of the true one (the float64 one
wherever rounding could swap two). Computing it literally (``faiss_index.rerank``: a FAISS
search for twice the neighbours, then every candidate read back and measured in float64)
adds about a fifth to an IVF search. Here the same rows, in the same order, cost little more:

- **Fewer candidates asked for first** (l2; see ``faiss_scores_bounded`` for cosine). An
  index whose scores are exact up to bounded rounding (``EXACT_SCORES``: IVF-Flat, and
  HNSW-Flat while its efSearch is at least the number of candidates) returns for ``m`` candidates the first ``m`` of what it returns for
  more: which vectors it scores does not depend on how many it keeps. So it is asked for
  ``k + SHORT_EXTRA`` first, and for all again only for the queries whose last candidate
  is still within rounding reach of the k-th (``search_in_two_steps``).
- **Float32 scores with a bound where the index's are not.** An IVF-PQ index's scores are
  estimates and a flat index's come from batched products whose rounding the score does
  not bound; their candidates are scored again straight from the stored rows with FAISS's
  one-vector kernels (``recomputed_scores``: one pass, nothing copied), the sum an IVF-Flat
  index computes, with the same bound.
- **Float64 only where rounding could decide.** Each score puts its candidate's true
  distance in a small interval. A candidate whose interval lies after the k-th best one's
  is out; one whose interval overlaps no other's has its place fixed. Only candidates
  whose intervals overlap a neighbour's are read back and measured in float64
  (``order_by_score``, ``float64_distances``): on 100,000 clustered 512-d vectors, 0.64
  of the 10 returned per query (IVF-PQ: 0.33).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tltk.features.faiss_index import EXACT_SCORES, contenders, run_blocks, score_rounding

SHORT_EXTRA = 2  # candidates past the k-th asked for first from an index with exact-up-to-rounding scores
BLOCK = 16  # queries measured together in float64: their candidates' rows stay in the core's cache
PARALLEL_PAIRS = 2048  # fewer candidates to measure in float64 than this take less time on one thread than to start more


def faiss_scores_bounded(index: Any, kind: str, count: int, metric: str = "l2") -> bool:
    """Whether to ask the index in two steps: its own scores of ``count`` candidates are exact
    up to ``score_rounding`` and their first ones the same whatever ``count`` is (IVF-Flat,
    HNSW-Flat while efSearch is at least ``count``: below it FAISS widens its search to
    ``count`` and finds others), and the metric is l2. A cosine score's bound is absolute
    (2 x score_rounding): on 100,000 clustered 512-d vectors the 12th candidate was within
    it of the 10th for 70% of the queries, and asking those again cost more than asking
    every query for all candidates at once."""
    if kind not in EXACT_SCORES or metric != "l2":
        return False
    if kind == "hnsw":
        return int(index.hnsw.efSearch) >= count
    return True


def search_in_two_steps(index: Any, queries: np.ndarray, k: int, count: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The index's scores and rows of ``count`` candidates per query, as far as they can matter.

    Asks for ``k + SHORT_EXTRA`` first, and again for all ``count`` only for the queries
    whose last candidate is still within rounding reach of the k-th (``contenders``), or
    whose first k are not all found. Columns not fetched hold row -1 and the worst score,
    which ``contenders`` never counts in. Only for an index where ``faiss_scores_bounded``.
    """
    first = min(count, k + SHORT_EXTRA)
    scores, rows = index.search(queries, first)
    if first == count:
        return scores, rows
    again = np.flatnonzero(contenders(scores, rows, k, metric, queries.shape[1]) == first)
    worst = -np.inf if metric == "cosine" else np.inf
    all_scores = np.full((len(queries), count), worst, dtype=np.float32)
    all_rows = np.full((len(queries), count), -1, dtype=np.int64)
    all_scores[:, :first], all_rows[:, :first] = scores, rows
    if len(again):
        all_scores[again], all_rows[again] = index.search(np.ascontiguousarray(queries[again]), count)
    return all_scores, all_rows


def recomputed_scores(features: np.ndarray, queries: np.ndarray, candidates: np.ndarray, metric: str) -> np.ndarray:
    """Each candidate's score as an IVF-Flat index scores it, computed from its stored row.

    ``queries`` are prepared (unit length for cosine); ``features`` are the raw stored rows.
    L2: the sum of squared differences over the d dimensions, in float32 (FAISS's
    ``fvec_L2sqr``), within ``score_rounding(d)`` of the true squared distance relative to
    it. Cosine: the inner product with the unit query over the row's length, each a float32
    sum of d products; their roundings together stay within that same bound absolutely, as
    ``contenders`` allows a cosine score. A missing candidate (-1) gets the worst score.
    """
    import faiss

    features = np.ascontiguousarray(features, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    rows = np.ascontiguousarray(candidates, dtype=np.int64)
    nq, width, dim = len(rows), rows.shape[1], queries.shape[1]
    if metric == "l2":
        scores = np.full((nq, width), np.inf, dtype=np.float32)
        faiss.fvec_L2sqr_by_idx(faiss.swig_ptr(scores), faiss.swig_ptr(queries), faiss.swig_ptr(features),
                                faiss.swig_ptr(rows), dim, nq, width)
        scores[rows < 0] = np.inf
        return scores
    dots = np.zeros((nq, width), dtype=np.float32)
    faiss.fvec_inner_products_by_idx(faiss.swig_ptr(dots), faiss.swig_ptr(queries), faiss.swig_ptr(features),
                                     faiss.swig_ptr(rows), dim, nq, width)
    lengths = np.zeros((nq, width), dtype=np.float32)
    origin = np.zeros_like(queries)
    faiss.fvec_L2sqr_by_idx(faiss.swig_ptr(lengths), faiss.swig_ptr(origin), faiss.swig_ptr(features),
                            faiss.swig_ptr(rows), dim, nq, width)
    np.sqrt(lengths, out=lengths)
    found = rows >= 0
    scores = np.divide(dots, lengths, out=np.zeros_like(dots), where=found & (lengths > 0))
    scores[~found] = -np.inf
    return scores


def rank_candidates(features: np.ndarray, vectors: np.ndarray, scores: np.ndarray, candidates: np.ndarray, k: int,
                    metric: str, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(distances, rows) of the best ``k`` of each query's ``candidates``, ranked as their
    float64 distances rank them (equal distances in the candidates' order).

    ``scores`` (FAISS's convention, in any order) are exact up to ``score_rounding``, so each
    candidate's true distance lies in an interval around its score (``_intervals``). Where
    scores alone fix the order they decide it (``order_by_score``); only candidates that
    rounding could swap with a neighbour are read back and measured in float64
    (``float64_distances``), and ranked by that. A distance is the float64 one where it was
    measured, else the one the score gives (within the same rounding of the truth).
    """
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    distances, rows, unsure = order_by_score(scores, candidates, k, metric, vectors.shape[1])
    queries = np.flatnonzero(unsure.any(axis=1))
    if len(queries):
        front = np.argsort(~unsure[queries], axis=1, kind="stable")  # the unsure ones first, in score order
        width = int(unsure[queries].sum(axis=1).max())
        front = front[:, :width]
        measured = np.take_along_axis(unsure[queries], front, axis=1)
        chosen = np.where(measured, np.take_along_axis(rows[queries], front, axis=1), -1)
        workers = threads if measured.sum() >= PARALLEL_PAIRS else 1
        exact = float64_distances(features, vectors[queries], chosen, metric, workers)
        settled = np.take_along_axis(distances[queries], front, axis=1)
        part = distances[queries]
        np.put_along_axis(part, front, np.where(measured, exact, settled), axis=1)
        distances[queries] = part
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(distances, order, axis=1)
    found = np.where(np.isfinite(best), np.take_along_axis(rows, order, axis=1), -1)
    return best.astype(np.float32), found


def order_by_score(scores: np.ndarray, candidates: np.ndarray, k: int, metric: str,
                   dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The candidates that can still be among the k best, best score first: their distances
    as the scores give them (inf past the last), their rows (-1 past it), and which of them
    rounding could swap with a neighbour (their intervals overlap), to be measured again.

    A candidate whose interval lies wholly after the k-th best one's cannot be among the k
    best (``within_reach``); one whose interval overlaps no other's has its place fixed by
    its score alone. Intervals grow with the score, so overlapping ones are neighbours in
    score order.
    """
    closeness, slack = _intervals(scores, candidates, metric, dim)
    closeness[~_within_reach(closeness, slack, k)] = np.inf
    width = max(k, int(np.isfinite(closeness).sum(axis=1).max(initial=0)), 1)
    by_score = np.argsort(closeness, axis=1, kind="stable")[:, :width]
    closeness = np.take_along_axis(closeness, by_score, axis=1)
    slack = np.take_along_axis(slack, by_score, axis=1)
    rows = np.where(np.isfinite(closeness), np.take_along_axis(candidates, by_score, axis=1), -1)
    with np.errstate(invalid="ignore"):
        overlap = np.isfinite(closeness[:, 1:]) & (closeness[:, 1:] - slack[:, 1:] <= closeness[:, :-1] + slack[:, :-1])
    unsure = np.zeros(rows.shape, dtype=bool)
    unsure[:, 1:] |= overlap
    unsure[:, :-1] |= overlap
    return _distance_of(closeness, metric), rows, unsure


def _intervals(scores: np.ndarray, candidates: np.ndarray, metric: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Each candidate's closeness (the score, smaller is closer; inf when missing) and how far
    rounding may have moved it: ``score_rounding(dim)`` relative to it for L2 (the score is a
    sum of d squares), twice it in all for cosine (products of unit vectors, and their units)."""
    closeness = np.asarray(scores, dtype=np.float64) * (-1.0 if metric == "cosine" else 1.0)
    closeness[candidates < 0] = np.inf
    rounding = score_rounding(dim)
    slack = np.full_like(closeness, 2.0 * rounding) if metric == "cosine" else rounding * np.abs(closeness)
    return closeness, slack


def _distance_of(closeness: np.ndarray, metric: str) -> np.ndarray:
    """The distance a score stands for: 1 - cosine similarity, or the root of a squared L2 distance."""
    if metric == "cosine":
        return 1.0 + closeness
    return np.sqrt(np.maximum(closeness, 0.0))


def float64_distances(features: np.ndarray, queries: np.ndarray, candidates: np.ndarray, metric: str,
                      threads: int = 1) -> np.ndarray:
    """Each candidate's distance to its query in float64 (inf for -1), a block of queries at a time.

    Float32 coordinates subtract and multiply exactly in float64, and 512 squares add up
    with an error far below float32's rounding, so the order is the true one. Each distance
    is a sum over its own row (no matrix product, whose rounding can depend on where a row
    stands in a block), so equal vectors get equal distances. Queries needing as many rows
    share a block; rows are gathered in float32 and widened as they are subtracted; blocks
    run on ``threads`` threads (NumPy lets go of the GIL while it gathers and multiplies).
    """
    exact = np.full(candidates.shape, np.inf)
    valid = candidates >= 0
    widths = valid.sum(axis=1)  # valid candidates come first
    queries = np.ascontiguousarray(queries, dtype=np.float32)

    def measure(part: np.ndarray) -> None:
        width = int(widths[part].max())
        if width == 0:
            return
        rows = candidates[part, :width]
        stored = np.take(features, np.maximum(rows, 0).ravel(), axis=0).reshape(len(part), width, -1)
        query = queries[part][:, None, :]
        if metric == "cosine":
            stored64, query64 = stored.astype(np.float64), query.astype(np.float64)
            lengths = np.sqrt(_dots(stored64, stored64) * _dots(query64, query64))
            distances = 1.0 - _dots(stored64, query64) / np.maximum(lengths, 1e-30)
        else:
            differences = np.subtract(stored, query, dtype=np.float64)
            distances = np.sqrt(_dots(differences, differences))
        exact[part, :width] = np.where(rows >= 0, distances, np.inf)

    run_blocks(measure, np.argsort(widths, kind="stable"), BLOCK, threads)
    return exact


def _dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-by-row dot products over the last axis (NumPy 2's vecdot is several times faster than einsum)."""
    if hasattr(np, "vecdot"):
        return np.vecdot(a, b)
    return np.einsum("...d,...d->...", a, b)


def within_reach(scores: np.ndarray, candidates: np.ndarray, k: int, metric: str, dim: int) -> np.ndarray:
    """(queries, candidates) booleans: could this candidate be among its query's ``k`` best?

    Each candidate's true closeness lies within its slack of its score (``_intervals``).
    One whose lowest possible closeness is above the k-th smallest highest possible one is
    worse than k candidates whatever the rounding. Missing candidates (-1) are never kept;
    with fewer than k found, every found one is.
    """
    return _within_reach(*_intervals(scores, candidates, metric, dim), k)


def _within_reach(closeness: np.ndarray, slack: np.ndarray, k: int) -> np.ndarray:
    highest = closeness + slack
    if k < closeness.shape[1]:
        kth = np.partition(highest, k - 1, axis=1)[:, k - 1:k]
    else:
        kth = np.full((len(closeness), 1), np.inf)
    with np.errstate(invalid="ignore"):
        return np.isfinite(closeness) & (closeness - slack <= kth)


__all__ = ["SHORT_EXTRA", "faiss_scores_bounded", "float64_distances", "order_by_score", "rank_candidates", "recomputed_scores", "search_in_two_steps", "within_reach"]
