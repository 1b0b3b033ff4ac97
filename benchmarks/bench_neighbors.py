"""Feature-store search against scikit-learn's brute-force NearestNeighbors, in one run.

The same clustered float32 vectors (default 100,000 x 512) go into a tltk store twice
(an exact ``flat`` index and the approximate index ``--index auto`` picks at this size)
and into ``sklearn.neighbors.NearestNeighbors(algorithm="brute")``. Held-out query
vectors from the same distribution are searched by all three; scikit-learn's answer is
the reference for recall@10. Timings are interleaved (sklearn, exact, approximate, then
again) and the median of the repeats is used. Printed: recall@10 of each store, the
queries per second of each, and their ratios to scikit-learn's.

Run: ``python benchmarks/bench_neighbors.py`` (under a minute on 2 quiet cores).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from tltk.features.faiss_index import IndexOptions, recall_at_k
from tltk.features.store import FeatureStore, create_store
from tltk.features.writing import iter_chunks

HEADER = {"source": {"fingerprint": "benchmark", "description": "clustered vectors"}, "layer": "synthetic",
          "pool": "none", "class_names": [], "task": "multiclass", "data": []}


def clustered_vectors(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Gaussian clusters: centres far apart, points spread around them in every dimension."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32) * 4.0
    members = rng.integers(0, clusters, size=n)
    return centres[members] + rng.normal(size=(n, dim)).astype(np.float32)


def build(path: Path, vectors: np.ndarray, kind: str) -> tuple[FeatureStore, float]:
    rows = [{"id": str(i)} for i in range(len(vectors))]
    started = time.perf_counter()
    store = create_store(path, iter_chunks(vectors, rows, 8192), HEADER, metric="l2", index=IndexOptions(kind=kind))
    return store, time.perf_counter() - started


def timed(search, queries: np.ndarray) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    rows = search(queries)
    return time.perf_counter() - started, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--approximate", default="auto", choices=["auto", "ivf", "hnsw", "ivfpq"],
                        help="the approximate index (auto: what tltk picks at this size)")
    args = parser.parse_args()
    from sklearn.neighbors import NearestNeighbors

    data = clustered_vectors(args.n + args.queries, args.dim, args.clusters, seed=0)
    vectors, queries = data[:args.n], data[args.n:]
    print(f"{args.n} x {args.dim} float32 vectors in {args.clusters} clusters, {args.queries} held-out queries, k={args.k}")

    with tempfile.TemporaryDirectory() as tmp:
        exact, exact_build = build(Path(tmp) / "exact", vectors, "flat")
        approximate, approx_build = build(Path(tmp) / "approx", vectors, args.approximate)
        record = approximate.manifest["index"]
        print(f"built: flat in {exact_build:.1f}s; {args.approximate} -> {record['factory']} in {approx_build:.1f}s, "
              f"tuned to {record['params']} (recall@10 measured on held-out stored vectors: {record['recall']['recall']:.3f})")
        started = time.perf_counter()
        reference = NearestNeighbors(n_neighbors=args.k, algorithm="brute", metric="euclidean").fit(vectors)
        print(f"sklearn fit {time.perf_counter() - started:.1f}s")

        searches = {
            "sklearn brute": lambda q: reference.kneighbors(q, args.k, return_distance=True)[1],
            "store exact (flat)": lambda q: exact.search(q, args.k)[1],
            f"store approximate ({approximate.index_type})": lambda q: approximate.search(q, args.k)[1],
        }
        seconds: dict[str, list[float]] = {name: [] for name in searches}
        answers: dict[str, np.ndarray] = {}
        for _ in range(args.repeats):
            for name, search in searches.items():
                elapsed, rows = timed(search, queries)
                seconds[name].append(elapsed)
                answers[name] = rows

    truth = answers["sklearn brute"]
    baseline_qps = args.queries / statistics.median(seconds["sklearn brute"])
    print(f"\n{'search':<28}{'recall@10':>10}{'median s':>10}{'queries/s':>12}{'vs sklearn':>12}")
    for name in searches:
        qps = args.queries / statistics.median(seconds[name])
        print(f"{name:<28}{recall_at_k(answers[name], truth):>10.4f}{statistics.median(seconds[name]):>10.3f}"
              f"{qps:>12.0f}{qps / baseline_qps:>11.2f}x")


if __name__ == "__main__":
    main()
