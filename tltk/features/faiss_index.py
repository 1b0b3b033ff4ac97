"""The FAISS side of a feature store: which index to build, how to build, train, grow and
search it, and how well an approximate one finds the true neighbours.

Approximate indexes (IVF, HNSW, IVF-PQ) trade recall for speed, and a badly set one can
return mostly wrong neighbours while looking fine. So whenever one is built or grown, its
recall@k against exact search is measured on a sample of stored vectors held out of the
index (so that the queries are new to it, as real ones are; see ``RecallProbe``), and
unless the user fixed them, ``nprobe`` / ``efSearch`` are raised until the recall reaches
a target.

Building and measuring an index read the stored vectors in passes made once, so they read
a small block at a time and let go of each block's pages of the memory-mapped file once
used: what they hold does not grow with the store, only the index itself does.

Nothing here knows the store's files; ``tltk.features.store`` keeps them. FAISS is
imported inside the functions that need it, so opening this module stays cheap.
"""

from __future__ import annotations

import math
import mmap
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from tltk.errors import TltkError

METRICS = ("cosine", "l2")
INDEX_TYPES = ("auto", "flat", "ivf", "hnsw", "ivfpq")
APPROXIMATE = ("ivf", "hnsw", "ivfpq")
# Indexes that score the uncompressed vectors one dimension at a time, so their scores are
# exact up to a rounding ``score_rounding`` bounds (a flat index's batched products are not).
EXACT_SCORES = ("ivf", "hnsw")
AUTO_THRESHOLD = 50_000  # rows; below it exact search answers in milliseconds anyway
TARGET_RECALL = 0.95
RECALL_K = 10
RECALL_QUERIES = 200
CHUNK_BYTES = 32 << 20  # rows read back from disk per step when searching exactly
# Rows read back per step by a pass made once (building, measuring): small, so that what the
# pass holds besides the index stays the same for a store of any size.
LEAN_CHUNK_BYTES = 1 << 20
# Rows per block of FAISS's matrix products of distances while an IVF index trains and is
# filled (FAISS's own 4,096 by 1,024 centroids is a 16 MB table); see ``small_distance_blocks``.
DISTANCE_BLOCK_ROWS = 512
HNSW_NEIGHBOURS = 32
HNSW_EF_CONSTRUCTION = 80
MAX_EF_SEARCH = 1024
MIN_POINTS_PER_CENTROID = 39  # FAISS's own floor for k-means training


@dataclass
class IndexOptions:
    """How to index a store. ``None`` settings are chosen from the data (and tuned)."""

    kind: str = "auto"
    nlist: int | None = None
    nprobe: int | None = None
    ef_search: int | None = None
    pq_m: int | None = None
    threshold: int = AUTO_THRESHOLD
    target_recall: float = TARGET_RECALL
    recall_k: int = RECALL_K
    recall_queries: int = RECALL_QUERIES
    seed: int = 0

    def validate(self) -> None:
        if self.kind not in INDEX_TYPES:
            raise TltkError(f"--index '{self.kind}' is not one of {', '.join(INDEX_TYPES)}.")
        for name in ("nlist", "nprobe", "ef_search", "pq_m", "recall_k", "recall_queries"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TltkError(f"--{name.replace('_', '-')} must be at least 1, not {value}.")
        if not 0.0 < self.target_recall <= 1.0:
            raise TltkError(f"--target-recall must be in (0, 1], not {self.target_recall}.")


@dataclass
class RecallReport:
    """Recall@k of the store's index against exact search, on ``queries`` stored vectors."""

    k: int
    queries: int
    recall: float
    params: dict[str, int] = field(default_factory=dict)
    target: float | None = None
    seconds: float = 0.0

    @property
    def below_target(self) -> bool:
        return self.target is not None and self.recall < self.target

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.params.items())
        text = f"recall@{self.k} {self.recall:.3f} against exact search on {self.queries} held-out stored vectors"
        text += f" ({settings})" if settings else ""
        if self.below_target:
            text += f", below the target {self.target:.2f}: raise --nprobe / --ef-search or use --index flat"
        return text


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise TltkError(f"--metric '{metric}' is not one of {', '.join(METRICS)}.")
    return metric


@dataclass
class RecallProbe:
    """A sample of stored rows held out of the index, and their exact neighbours among the
    other rows: recall measured on queries the index has not seen.

    Stored vectors searched in their own index are flattering queries (a graph index
    walks straight to the query's own node, whose links are its nearest neighbours): on
    100,000 clustered vectors, an HNSW setting scoring 0.979 that way scored 0.938 on new
    queries.

    An IVF index (``FILTERED_PROBE``) is searched as it is, told to pass over the sample's
    rows: the lists a query visits and each other row's code and place in them are the
    same as in an index built without the sample, so the answers are that index's, and no
    copy of the vectors is made. A graph index is searched through the links its rows make,
    so there ``index`` is a copy holding the other rows only, and ``kept`` says which row
    each of its positions is.
    """

    index: Any
    sample: np.ndarray
    queries: np.ndarray
    truth: np.ndarray
    features: np.ndarray
    metric: str
    count: int
    kept: np.ndarray | None = None

    @property
    def k(self) -> int:
        return int(self.truth.shape[1])

    def recall(self, params: dict[str, int]) -> float:
        """Recall@k of the index at search setting ``params``, candidates re-ranked as in ``search``."""
        queries = prepare_vectors(self.queries, self.metric)
        width = min(self.count - len(self.sample), self.k + rerank_extra(self.k))
        if self.kept is None:
            candidates = search_skipping(self.index, queries, width, params, self.sample)[1]
        else:
            apply_search_params(self.index, params)
            ids = self.index.search(queries, width)[1]
            candidates = np.where(ids >= 0, self.kept[np.maximum(ids, 0)], -1)
        found = rerank_from_disk(self.features, self.queries, candidates, self.k, self.metric)[1]
        return recall_at_k(found, self.truth)


FILTERED_PROBE = ("ivf", "ivfpq")  # indexes whose recall is measured on themselves, the sample filtered out


def search_skipping(index: Any, queries: np.ndarray, k: int, params: dict[str, int],
                    skipped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Search an IVF index at setting ``params`` as if rows ``skipped`` were not in it."""
    import faiss

    selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.ascontiguousarray(skipped, dtype=np.int64)))
    setting = faiss.SearchParametersIVF(sel=selector)
    for name, value in params.items():
        if not hasattr(setting, name):
            raise ValueError(f"an IVF search has no setting {name!r}")
        setattr(setting, name, int(value))
    return index.search(queries, k, params=setting)


def resolve_kind(kind: str, count: int, threshold: int) -> str:
    """``auto``: exact search below ``threshold`` rows, an IVF index above it."""
    if kind != "auto":
        return kind
    return "flat" if count < threshold else "ivf"


def default_nlist(count: int) -> int:
    """About 2 sqrt(n) inverted lists, with at least 39 training points each."""
    return max(1, min(int(round(2 * math.sqrt(count))), count // MIN_POINTS_PER_CENTROID))


def default_pq_m(dim: int) -> int:
    """The most sub-quantizers, at most 64 and at least 4 dimensions each, that divide ``dim``."""
    for m in range(min(64, max(1, dim // 4)), 0, -1):
        if dim % m == 0:
            return m
    return 1


def make_index(kind: str, dim: int, count: int, metric: str, options: IndexOptions) -> tuple[Any, str]:
    """An empty FAISS index of ``kind`` and the factory string that describes it."""
    import faiss

    faiss_metric = faiss_metric_of(metric)
    if kind == "flat":
        return (faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)), "Flat"
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss_metric)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return index, f"HNSW{HNSW_NEIGHBOURS},Flat"
    nlist = options.nlist or default_nlist(count)
    if nlist * MIN_POINTS_PER_CENTROID > count and options.nlist is not None:
        raise TltkError(f"--nlist {nlist} needs at least {nlist * MIN_POINTS_PER_CENTROID} vectors to train; the store has {count}, lower --nlist.")
    if kind == "ivf":
        factory = f"IVF{nlist},Flat"
    else:
        m = options.pq_m or default_pq_m(dim)
        if dim % m:
            raise TltkError(f"--pq-m {m} does not divide the feature dimension {dim}; choose a divisor of {dim}.")
        bits = max(1, min(8, int(math.log2(max(2, count // MIN_POINTS_PER_CENTROID)))))
        factory = f"IVF{nlist},PQ{m}x{bits}"
    index = faiss.index_factory(dim, factory, faiss_metric)
    if kind == "ivfpq":  # polysemous codes only serve Hamming-filtered search, which tltk does not use
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
    return index, factory


def faiss_metric_of(metric: str) -> int:
    import faiss

    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


def train_index(index: Any, features: np.ndarray, metric: str, seed: int) -> None:
    """Train on a random sample of rows: 64 per inverted list is plenty for k-means, and
    10,000 covers the 256 centroids per sub-quantizer that PQ trains."""
    if index.is_trained:
        return
    import faiss

    ivf = faiss.extract_index_ivf(index)
    size = min(len(features), max(64 * ivf.nlist, 10_000))
    rows = np.sort(np.random.default_rng(seed).choice(len(features), size=size, replace=False))
    ivf.cp.seed = seed
    sample = prepare_vectors(read_rows(features, rows), metric, in_place=True)
    with small_distance_blocks():
        index.train(sample)


def add_rows(index: Any, features: np.ndarray, metric: str, start: int) -> None:
    """Add rows ``start:`` of ``features`` to ``index``, a bounded block at a time, letting go
    of each block's file pages once added."""
    step = rows_per_add(index, features.shape[1])
    reserve_codes(index, len(features))
    with small_distance_blocks():
        for begin in range(start, len(features), step):
            index.add(prepare_vectors(features[begin:begin + step], metric))
            let_go_of_pages(features)


def rows_per_add(index: Any, dim: int) -> int:
    """How many rows to add at once. A flat or IVF index stores or assigns each row on its
    own, so a small block (``LEAN_CHUNK_BYTES``) gives the same index. (FAISS scores a few
    rows, fewer than ``distance_compute_blas_threshold / dim``, against the centroids one by
    one instead of by a matrix product, which may round a near-tie between two centroids the
    other way; the last rows of a block may be so few, as may those of FAISS's own blocks of
    65,536.) HNSW links each batch's rows level by level, so its batches stay as they always
    were (``chunk_rows``)."""
    import faiss

    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return chunk_rows(dim)
    return lean_rows(dim)


@contextmanager
def small_distance_blocks() -> Iterator[None]:
    """Have FAISS compute many-to-many distances in blocks of ``DISTANCE_BLOCK_ROWS`` rows.

    k-means (training an IVF index) and assigning rows to its lists compute every row's
    distance to every centroid by matrix products, a block of rows at a time: FAISS's
    4,096 rows by up to 1,024 centroids hold 16 MB, as much as the whole index of 250,000
    16-d vectors. Each distance is one row's products whatever the block, so smaller
    blocks build the same index in an eighth of that: byte for byte on one thread (a test
    pins it); on several, the threads share a product out by its shape, which can move a
    distance's last bit, and a row almost exactly as near two centroids may then go to the
    other one (1 row of 32,768 in that test on two threads), as it may between thread
    counts. The block size is a FAISS setting for the whole process, put back afterwards; a
    search running meanwhile in another thread would only take smaller blocks too.
    """
    import faiss

    before = int(faiss.cvar.distance_compute_blas_query_bs)
    faiss.cvar.distance_compute_blas_query_bs = min(before, DISTANCE_BLOCK_ROWS)
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_query_bs = before


def reserve_codes(index: Any, total: int) -> None:
    """Give a flat index room for ``total`` rows at once: growing it a block at a time would
    otherwise double its buffer, holding the old and the new one while it copies."""
    import faiss

    flat = faiss.downcast_index(index)
    if isinstance(flat, faiss.IndexFlatCodes) and total > flat.ntotal:
        used = flat.ntotal * flat.code_size
        flat.codes.resize(total * flat.code_size)
        flat.codes.resize(used)  # the size back to the rows held; the room stays


def chunk_rows(dim: int) -> int:
    return max(1, CHUNK_BYTES // (4 * dim))


def lean_rows(dim: int) -> int:
    return max(1, LEAN_CHUNK_BYTES // (4 * dim))


def let_go_of_pages(features: np.ndarray) -> None:
    """Drop a memory-mapped file's pages from this process's resident memory. They stay in
    the system's file cache, and reading them again maps them back: rows that a one-off pass
    has read need not stay counted as the process's own memory (an in-memory array: nothing
    to do)."""
    mapping = getattr(features, "_mmap", None)
    if isinstance(mapping, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED") and not mapping.closed:
        mapping.madvise(mmap.MADV_DONTNEED)


def read_rows(features: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``features[rows]`` as an array in memory, gathered a block of the file at a time, each
    block's pages let go of once read (``rows`` need not be sorted)."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), features.shape[1]), dtype=np.float32)
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    step = lean_rows(features.shape[1])
    begin = 0
    while begin < len(ordered):
        end = int(np.searchsorted(ordered, (ordered[begin] // step + 1) * step))
        out[order[begin:end]] = features[ordered[begin:end]]
        let_go_of_pages(features)
        begin = end
    return out


def prepare_vectors(vectors: np.ndarray, metric: str, *, in_place: bool = False) -> np.ndarray:
    """A float32 C-contiguous copy, L2-normalised for cosine (inner product of unit vectors).
    ``in_place``: ``vectors`` is an array of the caller's own, prepared where it is when it
    is already float32 and C-contiguous."""
    import faiss

    prepared = np.array(vectors, dtype=np.float32, order="C", copy=not in_place)
    if prepared.ndim == 1:
        prepared = prepared[None, :]
    if metric == "cosine":
        faiss.normalize_L2(prepared)
    return prepared


def exact_knn(features: np.ndarray, queries: np.ndarray, k: int, metric: str, *,
              lean: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k of prepared ``queries`` over stored ``features``, a chunk at a time.

    Returns FAISS scores (inner products for cosine, squared L2 for l2) and row numbers,
    best first; memory stays at one chunk of rows plus the (queries x k) results. ``lean``,
    for a pass made once: smaller chunks, each one's file pages let go of once searched.
    """
    import faiss

    k = min(k, len(features))
    heap = faiss.ResultHeap(len(queries), k, keep_max=metric == "cosine")
    step = lean_rows(features.shape[1]) if lean else chunk_rows(features.shape[1])
    for begin in range(0, len(features), step):
        block = prepare_vectors(features[begin:begin + step], metric)
        scores, rows = faiss.knn(queries, block, min(k, len(block)), metric=faiss_metric_of(metric))
        heap.add_result(scores, rows + begin)
        del block, scores, rows  # before the next block is read, not after
        if lean:
            let_go_of_pages(features)
    heap.finalize()
    return heap.D, heap.I


def rerank_extra(k: int) -> int:
    """How many more candidates than ``k`` to rank exactly: rounding only swaps near-ties."""
    return max(k, 10)


def rerank(features: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int, metric: str,
           block: int = 32, scores: np.ndarray | None = None, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(distances, rows) of the best ``k`` of each query's ``candidates``, by float64 distances.

    ``scores`` are the index's own float32 scores of the candidates, best first, from an
    index of ``EXACT_SCORES``. With them, a candidate that scores worse than the k-th by
    more than rounding can account for (``contenders``) cannot be among the k best, and
    is not read back from the stored vectors: the answer is the one ranking all
    candidates gives, for about half the reading and arithmetic. Blocks of queries are
    ranked on ``threads`` threads (NumPy lets go of the GIL while it reads and multiplies),
    as many as FAISS searched with, so that this step does not run on one core of several.
    """
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    distances = np.full((len(queries), k), np.inf, dtype=np.float32)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    features = np.asarray(features)  # a memmap's plain view: fancy indexing skips the subclass's bookkeeping
    widths = np.full(len(queries), candidates.shape[1])
    if scores is not None:
        widths = contenders(scores, candidates, k, metric, queries.shape[1])
    by_width = np.argsort(widths, kind="stable")  # queries needing as many candidates share a block

    def rank_block(part: np.ndarray) -> None:
        width = int(widths[part].max())
        chosen = np.where(np.arange(width)[None, :] < widths[part][:, None], candidates[part, :width], -1)
        best, found = _rank_exactly(features, queries[part], chosen, k, metric)
        distances[part, :best.shape[1]] = best
        rows[part, :found.shape[1]] = found

    run_blocks(rank_block, by_width, block, threads)
    return distances, rows


def run_blocks(work: Callable[[np.ndarray], None], order: np.ndarray, block: int, threads: int) -> None:
    """``work`` on consecutive blocks of ``order`` (queries sorted by how much each needs, so
    a block's rows are alike), on up to ``threads`` threads: numpy lets go of the
    interpreter lock in its loops, so the blocks run side by side."""
    parts = [order[begin:begin + block] for begin in range(0, len(order), block)]
    if threads > 1 and len(parts) > 1:
        with ThreadPoolExecutor(min(threads, len(parts))) as pool:
            list(pool.map(work, parts))
    else:
        for part in parts:
            work(part)


def rerank_from_disk(features: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int, metric: str,
                     block: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """``rerank`` for a pass made once: each ``block`` of queries has its candidates read into
    memory (``read_rows``) and ranked there, so the file's pages are not kept. The answer is
    ``rerank``'s: each query's candidates are ranked on their own, in the same order."""
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    distances = np.full((len(queries), k), np.inf, dtype=np.float32)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    for begin in range(0, len(queries), block):
        part = candidates[begin:begin + block]
        wanted = np.unique(part[part >= 0])
        if not len(wanted):
            continue  # no candidates: nothing found
        local = np.where(part >= 0, np.searchsorted(wanted, part), -1)
        best, found = rerank(read_rows(features, wanted), queries[begin:begin + block], local, k, metric)
        distances[begin:begin + block] = best
        rows[begin:begin + block] = np.where(found >= 0, wanted[np.maximum(found, 0)], -1)
    return distances, rows


def contenders(scores: np.ndarray, candidates: np.ndarray, k: int, metric: str, dim: int) -> np.ndarray:
    """How many of each query's candidates, from the first, could still be among its ``k`` best.

    IVF-Flat and HNSW-Flat score a stored vector as a sum over its d dimensions (of squared
    differences for L2, of products of unit vectors for cosine), so float32 rounding moves
    a score by at most ``score_rounding(d)`` times the score (L2) or in all (cosine).
    A candidate scoring worse than the k-th by more than both their roundings together is
    truly worse than k candidates. A query whose first k candidates are not all found
    keeps every candidate.
    """
    total = candidates.shape[1]
    if total <= k or k < 1:
        return np.full(len(candidates), total)
    ordered = np.asarray(scores, dtype=np.float64) * (-1.0 if metric == "cosine" else 1.0)  # smaller is closer
    rounding = score_rounding(dim)
    slack = 2.0 * rounding * np.ones_like(ordered) if metric == "cosine" else rounding * np.abs(ordered)
    with np.errstate(invalid="ignore"):
        within = ordered - slack <= (ordered[:, k - 1] + slack[:, k - 1])[:, None]
    within[:, :k] = True
    width = total - np.argmax(within[:, ::-1], axis=1)  # through the last candidate within reach
    complete = (candidates[:, :k] >= 0).all(axis=1) & np.isfinite(ordered[:, :k]).all(axis=1)
    return np.where(complete, width, total)


def score_rounding(dim: int) -> float:
    """The most float32 rounding moves an IVF-Flat or HNSW-Flat score of ``dim``-dimensional
    vectors, relative to the score: (d + 4) units of rounding, doubled to spare. (A flat
    index scores many queries at once as |x|^2 + |y|^2 - 2x.y, whose rounding scales with
    the vectors' lengths instead; it is not in ``EXACT_SCORES``.)"""
    return 2.0 * (dim + 4) * float(np.finfo(np.float32).eps) / 2.0


def _rank_exactly(features: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int,
                  metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of a few queries' candidates by distances computed in float64.

    The products of float32 numbers are exact in float64 and 512 of them add up with an
    error far below float32's rounding, so the order is the true one."""
    valid = candidates >= 0
    gathered = np.take(features, np.where(valid, candidates, 0).ravel(), axis=0)
    vectors = gathered.astype(np.float64).reshape(*candidates.shape, -1)
    query = queries.astype(np.float64)
    dots = np.matmul(vectors, query[:, :, None])[..., 0]
    vector_norms = _row_dots(vectors)
    query_norms = _row_dots(query)[:, None]
    if metric == "cosine":
        exact = 1.0 - dots / np.maximum(np.sqrt(vector_norms * query_norms), 1e-30)
    else:  # in float64 the expansion of |v - q|^2 loses nothing that matters
        exact = np.sqrt(np.maximum(vector_norms + query_norms - 2.0 * dots, 0.0))
    exact[~valid] = np.inf
    order = np.argsort(exact, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(exact, order, axis=1)
    found = np.take_along_axis(candidates, order, axis=1)
    found[~np.isfinite(best)] = -1
    return best.astype(np.float32), found


def _row_dots(vectors: np.ndarray) -> np.ndarray:
    """Each vector's dot product with itself (NumPy 2's vecdot is several times faster than einsum here)."""
    if hasattr(np, "vecdot"):
        return np.vecdot(vectors, vectors)
    return np.einsum("...d,...d->...", vectors, vectors)


def drop_self(distances: np.ndarray, rows: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` neighbours other than its own row (the last one goes where it is absent)."""
    kept_d = np.full((len(rows), k), np.inf, dtype=np.float32)
    kept_r = np.full((len(rows), k), -1, dtype=np.int64)
    for i, (d, r) in enumerate(zip(distances, rows)):
        keep = (r != own[i]) & (r >= 0)
        d, r = d[keep][:k], r[keep][:k]
        kept_d[i, :len(d)], kept_r[i, :len(r)] = d, r
    return kept_d, kept_r


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k, with k the width of ``truth``."""
    if truth.size == 0:
        return 1.0
    hits = [len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) for f, t in zip(found, truth)]
    return float(np.mean(hits) / truth.shape[1])


def apply_search_params(index: Any, params: dict[str, int]) -> None:
    import faiss

    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, int(value))


def tune_search(index: Any, kind: str, measure: Callable[[dict[str, int]], float], options: IndexOptions,
                start: int | None = None) -> RecallReport:
    """Measure recall at the given setting, or raise it from a cheap start (or ``start``) until
    it reaches the target (or cannot go higher). ``index`` only tells the setting's range."""
    name, fixed, cheapest, ceiling = _search_knob(index, kind, options)
    value = fixed or min(start or cheapest, ceiling)
    started = time.perf_counter()
    while True:
        recall = measure({name: value})
        if fixed or recall >= options.target_recall or value >= ceiling:
            break
        value = min(value * 2, ceiling)
    return RecallReport(0, 0, recall, {name: value}, options.target_recall, round(time.perf_counter() - started, 3))


def _search_knob(index: Any, kind: str, options: IndexOptions) -> tuple[str, int | None, int, int]:
    """(parameter name, user's fixed value, starting value, largest useful value)."""
    import faiss

    if kind == "hnsw":
        return "efSearch", options.ef_search, max(16, options.recall_k), max(MAX_EF_SEARCH, options.recall_k)
    nlist = faiss.extract_index_ivf(index).nlist
    return "nprobe", options.nprobe, min(8, nlist), nlist
