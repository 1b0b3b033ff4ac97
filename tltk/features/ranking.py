"""The store's answer for little more than the FAISS search it rests on.

``FeatureStore.search`` promises one answer: of the first ``k + rerank_extra(k)``
candidates the index returns, the ``k`` best by distances computed in float64 from the
stored vectors (``faiss_index.rerank``). Computing that answer literally costs a FAISS
search for twice the neighbours and a float64 pass over all of them, about a fifth on
top of an IVF search. Two shortcuts reach the very same answer for less:

- **Asking for fewer candidates first.** An index whose scores are exact up to bounded
  rounding (``EXACT_SCORES``: IVF-Flat, and HNSW-Flat while its efSearch is at least the
  number of candidates) returns for ``m`` candidates the first ``m`` of what it returns
  for more: which vectors it scores does not depend on how many it keeps. So it is asked
  for ``k + SHORT_EXTRA`` first; where even the last of those is within rounding reach of
  the k-th (so that later candidates might be too), the query is asked again for all.
  A candidate beyond reach of the k-th is worse than k others whatever the rounding, so
  the candidates never fetched could not have been in the answer.
- **A float32 distance with a bound before the float64 one.** Where the index's scores are
  estimates (IVF-PQ) or come from batched products whose rounding is not bounded by the
  score (flat), each candidate's score is computed again straight from its stored row
  with FAISS's one-vector kernels (``fvec_L2sqr_by_idx``: one pass, nothing copied), the
  same sum an IVF-Flat index computes, with the same bound (``recomputed_scores``). Then
  only the candidates within reach of the k-th are read again for float64.

Both leave the float64 step (``faiss_index.rerank`` with ``scores``) to rank exactly the
candidates that can still be among the k best, so the answer is the one ranking every
candidate gives, row for row.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from tltk.features.faiss_index import EXACT_SCORES, contenders, score_rounding

SHORT_EXTRA = 2  # candidates past the k-th asked for first from an index with exact-up-to-rounding scores
BLOCK = 16  # queries measured together in float64: their candidates' rows stay in the core's cache


def faiss_scores_bounded(index: Any, kind: str, count: int) -> bool:
    """Whether the index's own scores of ``count`` candidates are exact up to ``score_rounding``
    and their first ones the same whatever ``count`` is: IVF-Flat, HNSW-Flat while efSearch
    is at least ``count`` (below it FAISS widens its search to ``count`` and finds others)."""
    if kind not in EXACT_SCORES:
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
    """(distances, rows) of the best ``k`` of each query's ``candidates`` by float64 distances:
    the answer ranking every candidate gives, with equal distances in the candidates' order.

    ``scores`` (FAISS's convention, in any order) are exact up to ``score_rounding``: a
    candidate whose score is worse than the k-th best by more than both roundings is truly
    worse than k others, so it is not read back (``within_reach``). The others move to the
    front, in their order, and are measured in float64 (``float64_distances``).
    """
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    kept = within_reach(scores, candidates, k, metric, vectors.shape[1])
    front = np.argsort(~kept, axis=1, kind="stable")
    chosen = np.where(np.take_along_axis(kept, front, axis=1), np.take_along_axis(candidates, front, axis=1), -1)
    width = max(int(kept.sum(axis=1).max(initial=0)), 1)
    exact = float64_distances(features, vectors, chosen[:, :width], metric, threads)
    order = np.argsort(exact, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(exact, order, axis=1)
    rows = np.where(np.isfinite(best), np.take_along_axis(chosen, order, axis=1), -1)
    return best.astype(np.float32), rows


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

    by_width = np.argsort(widths, kind="stable")
    parts = [by_width[begin:begin + BLOCK] for begin in range(0, len(by_width), BLOCK)]
    if threads > 1 and len(parts) > 1:
        with ThreadPoolExecutor(min(threads, len(parts))) as pool:
            list(pool.map(measure, parts))
    else:
        for part in parts:
            measure(part)
    return exact


def _dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-by-row dot products over the last axis (NumPy 2's vecdot is several times faster than einsum)."""
    if hasattr(np, "vecdot"):
        return np.vecdot(a, b)
    return np.einsum("...d,...d->...", a, b)


def within_reach(scores: np.ndarray, candidates: np.ndarray, k: int, metric: str, dim: int) -> np.ndarray:
    """(queries, candidates) booleans: could this candidate be among its query's ``k`` best?

    A score is within ``score_rounding(dim)`` of the truth relative to it (L2), or within
    twice that in all (cosine, as ``contenders`` allows); so each candidate's true distance
    lies in [score - slack, score + slack]. One whose lowest possible distance is above the
    k-th smallest highest possible one is worse than k candidates whatever the rounding.
    Missing candidates (-1) are never kept; with fewer than k found, every found one is.
    """
    found = candidates >= 0
    ordered = np.asarray(scores, dtype=np.float64) * (-1.0 if metric == "cosine" else 1.0)  # smaller is closer
    ordered[~found] = np.inf
    rounding = score_rounding(dim)
    slack = np.full_like(ordered, 2.0 * rounding) if metric == "cosine" else rounding * np.abs(ordered)
    highest = ordered + slack
    if k < ordered.shape[1]:
        kth = np.partition(highest, k - 1, axis=1)[:, k - 1:k]
    else:
        kth = np.full((len(ordered), 1), np.inf)
    with np.errstate(invalid="ignore"):
        return found & (ordered - slack <= kth)


__all__ = ["SHORT_EXTRA", "faiss_scores_bounded", "float64_distances", "rank_candidates", "recomputed_scores", "search_in_two_steps", "within_reach"]
