"""Feature-store search against raw FAISS searching the very same index, in one run.

For each index type (flat, ivf, hnsw, ivfpq) one store is built over the same random
float32 vectors (default 100,000 x 512, metric l2), drawn around 100 cluster centres as
``bench_neighbors.py`` draws them (``--data random``: no clusters; there the approximate
indexes tune themselves to scan a large share of the store, which hides the store's own
work behind FAISS's). The store's ``search(queries, k)`` is
timed against ``store.index.search(queries, k)``: the same FAISS index object with the
same search setting (nprobe, efSearch) the store tuned and recorded, the same queries,
the same FAISS threads. The two take turns (interleaved repeats, the first one rotating);
printed are the median seconds of each, queries per second, and the median of the
per-repeat ratios raw time / store time (1.00x: the store is as fast as raw FAISS;
goal: at least 0.95x for every type).

What the store does on top of raw FAISS is what the ratio prices: preparing the queries
(a float32 copy; unit length for cosine), asking the index for more than k candidates
(k + 2 first for IVF-Flat and HNSW-Flat, 2k for flat and IVF-PQ), scoring flat and IVF-PQ
candidates again from the stored rows, and measuring in float64 the neighbours whose order
float32 rounding could change (``FeatureStore.search``'s docstring says why). ``--profile``
adds a breakdown of the store's time by step and how much of that extra work there was.

Run: ``python benchmarks/bench_store_search.py`` (building the HNSW store takes the
longest: a few minutes on two busy cores; ``--kinds flat ivf`` skips it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleave, median_ratio, ratio_range, time_spent_in  # noqa: E402
from bench_neighbors import clustered_vectors  # noqa: E402

from tltk.features.faiss_index import IndexOptions, contenders, prepare_vectors, rerank_extra  # noqa: E402
from tltk.features.ranking import SHORT_EXTRA, faiss_scores_bounded, order_by_score  # noqa: E402
from tltk.features.store import FeatureStore, create_store  # noqa: E402
from tltk.features.writing import iter_chunks  # noqa: E402

HEADER = {"source": {"fingerprint": "benchmark", "description": "random vectors"}, "layer": "synthetic",
          "pool": "none", "class_names": [], "task": "multiclass", "data": []}
KINDS = ("flat", "ivf", "hnsw", "ivfpq")
STEPS = {  # the store's own steps, timed by --profile
    "prepare queries": "tltk.features.store:FeatureStore._queries",
    "candidates (faiss search and bounded scores)": "tltk.features.store:FeatureStore._candidates",
    "of which float32 scores from the rows": "tltk.features.store:recomputed_scores",
    "float64 ranking": "tltk.features.store:rank_candidates",
}


def build(path: Path, vectors: np.ndarray, kind: str, metric: str, nprobe: int | None = None) -> tuple[FeatureStore, float]:
    rows = [{"id": str(i)} for i in range(len(vectors))]
    started = time.perf_counter()
    options = IndexOptions(kind=kind, nprobe=nprobe)
    store = create_store(path, iter_chunks(vectors, rows, 8192), HEADER, metric=metric, index=options)
    return FeatureStore.open(path), time.perf_counter() - started


def faiss_threads() -> str:
    import faiss

    return str(faiss.omp_get_max_threads())


def compare(store: FeatureStore, queries: np.ndarray, k: int, repeats: int, profile: bool) -> float:
    """Interleaved store and raw searches; prints their medians and returns the median ratio."""
    index = store.index
    raw_queries = np.ascontiguousarray(queries, dtype=np.float32)
    if store.metric == "cosine":
        import faiss

        faiss.normalize_L2(raw_queries)
    cpu: dict[str, list[float]] = {"raw faiss": [], "store": []}

    def with_cpu_time(name: str, search: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            started = time.process_time()
            search()
            cpu[name].append(time.process_time() - started)
        return run

    cases = {"raw faiss": with_cpu_time("raw faiss", lambda: index.search(raw_queries, k)),
             "store": with_cpu_time("store", lambda: store.search(queries, k))}
    refined = refining_index(store, k) if store.index_type == "ivfpq" else None
    if refined is not None:
        cpu["faiss+refine"] = []
        cases["faiss+refine"] = with_cpu_time("faiss+refine", lambda: refined.search(raw_queries, k))
    seconds = interleave(cases, repeats)
    for name, values in seconds.items():
        middle = statistics.median(values)
        print(f"  {name:<10} median {middle * 1000:8.1f} ms  ({len(queries) / middle:9.0f} queries/s)")
    ratio = median_ratio(seconds["raw faiss"], seconds["store"])
    print(f"  store speed / raw faiss speed: {ratio:.3f}x ({ratio_range(seconds['raw faiss'], seconds['store'])})")
    raw_cpu, store_cpu = cpu["raw faiss"][1:], cpu["store"][1:]  # after the untimed round
    print(f"  the same by CPU time of all threads (less swayed by other jobs on a shared machine): "
          f"{median_ratio(raw_cpu, store_cpu):.3f}x ({ratio_range(raw_cpu, store_cpu)})")
    if refined is not None:
        same = median_ratio(seconds["faiss+refine"], seconds["store"])
        print(f"  store speed / FAISS's own re-ranking of the same 2k candidates (IndexRefineFlat over this index, "
              f"float32): {same:.3f}x ({ratio_range(seconds['faiss+refine'], seconds['store'])})")
    if profile:
        with time_spent_in(STEPS) as totals:
            for _ in range(repeats):
                store.search(queries, k)
        print("  store time by step (mean ms): " + ", ".join(f"{n} {t / repeats * 1000:.1f}" for n, t in totals.items()))
        print("  " + extra_work(store, queries, k))
    return ratio


def refining_index(store: FeatureStore, k: int) -> object:
    """FAISS doing what the store adds to an IVF-PQ search itself: the very same index asked for
    k + rerank_extra(k) candidates, which an in-memory flat copy of the vectors re-ranks by
    float32 distances (``IndexRefineFlat``). Not the goal's baseline (that is the index alone):
    it shows what re-ranking the candidates costs wherever it is done."""
    import faiss

    vectors = prepare_vectors(store.features(), store.metric)
    refined = faiss.IndexRefineFlat(store.index, faiss.swig_ptr(vectors))  # copies the vectors; the store keeps the index
    refined.k_factor = (k + rerank_extra(k)) / k
    return refined


def extra_work(store: FeatureStore, queries: np.ndarray, k: int) -> str:
    """What the store asks of FAISS and reads back beyond raw FAISS's k per query."""
    prepared = prepare_vectors(queries, store.metric)
    count = min(store.count, k + rerank_extra(k))
    if faiss_scores_bounded(store.index, store.index_type, count, store.metric):
        first = min(count, k + SHORT_EXTRA)
        scores, rows = store.index.search(prepared, first)
        again = float(np.mean(contenders(scores, rows, k, store.metric, store.dim) == first)) if first < count else 0.0
        asked = f"asked FAISS for {first} per query, then for {count} again for {again:.1%} of the queries"
    elif store.index_type in ("ivf", "hnsw"):
        asked = f"asked FAISS for {count} per query (its scores bounded)"
    else:
        asked = f"asked FAISS for {count} per query and scored them again in float32 from the rows"
    scores, rows = store._candidates(prepared, k, count)
    unsure = order_by_score(scores, rows, k, store.metric, store.dim)[2].sum(axis=1)
    return (f"{asked}; measured in float64 (rounding could swap them with a neighbour) {unsure.mean():.2f} rows per "
            f"query, in {np.mean(unsure > 0):.1%} of the queries")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--metric", default="l2", choices=["l2", "cosine"])
    parser.add_argument("--data", default="clustered", choices=["clustered", "random"])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--ivfpq-nprobe", type=int, default=16,
                        help="IVF-PQ's nprobe, fixed [%(default)s]: PQ codes cannot tell these vectors' neighbours apart "
                             "well, so tuning raises nprobe to every list and the search becomes a full scan")
    parser.add_argument("--profile", action="store_true", help="also time the store's steps")
    args = parser.parse_args()

    import os

    if args.data == "clustered":
        data = clustered_vectors(args.n + args.queries, args.dim, 100, seed=0)
    else:
        data = np.random.default_rng(0).standard_normal((args.n + args.queries, args.dim), dtype=np.float32)
    vectors, queries = data[:args.n], data[args.n:]
    load = os.getloadavg()[0]
    print(f"{args.n} x {args.dim} {args.data} float32 vectors, metric {args.metric}, {args.queries} queries, k={args.k}, "
          f"{os.cpu_count()} cores, load {load:.1f}, FAISS threads {faiss_threads()}")
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:
            store, seconds = build(Path(tmp) / kind, vectors, kind, args.metric,
                                   args.ivfpq_nprobe if kind == "ivfpq" else None)
            record = store.manifest["index"]
            recall = (record.get("recall") or {}).get("recall")
            print(f"\n{kind}: {record['factory']}, params {record['params']}, built in {seconds:.1f}s"
                  + (f", recall@10 {recall:.3f}" if recall is not None else ""))
            ratios[kind] = compare(store, queries, args.k, args.repeats, args.profile)
            del store
    print("\nstore / raw faiss (goal >= 0.95x): " + ", ".join(f"{k} {r:.3f}x" for k, r in ratios.items()))


if __name__ == "__main__":
    main()
