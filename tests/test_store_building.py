"""Building and measuring a store's index without holding more than the index: the recall
probe measures an IVF index on itself instead of on a copy, and gives the figure a copy
without the held-out rows gives; rows are read back in small blocks whose file pages are let
go of; FAISS's smaller distance blocks build the same index byte for byte.

The memory figures themselves come from benchmarks/bench_memory_scale.py, not from a test.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np
import pytest
from test_features_store import clustered, make_store, numpy_neighbours

from tltk.features import faiss_index
from tltk.features import store as store_module
from tltk.features.faiss_index import (
    IndexOptions,
    add_rows,
    apply_search_params,
    lean_rows,
    let_go_of_pages,
    make_index,
    prepare_vectors,
    read_rows,
    recall_at_k,
    rerank,
    rerank_extra,
    rerank_from_disk,
    train_index,
)
from tltk.features.manifest import open_features


class CopyWithoutTheSample:
    """What the probe measured on before it searched the index itself: a copy of the index
    emptied and refilled with every row but the sample, and the sample's exact neighbours
    among the other rows (NumPy, float64)."""

    def __init__(self, store, sample: np.ndarray, queries: np.ndarray, k: int) -> None:
        self.vectors, self.metric, self.queries, self.k = np.asarray(store.features()), store.metric, queries, k
        self.kept = np.setdiff1d(np.arange(store.count), sample)
        self.index = faiss.clone_index(store.index)
        self.index.reset()
        self.index.add(prepare_vectors(self.vectors[self.kept], self.metric))
        self.truth = self.kept[numpy_neighbours(self.vectors[self.kept], queries, k, self.metric)[1]]

    def recall(self, params: dict[str, int]) -> float:
        apply_search_params(self.index, params)
        _, ids = self.index.search(prepare_vectors(self.queries, self.metric), self.k + rerank_extra(self.k))
        candidates = np.where(ids >= 0, self.kept[np.maximum(ids, 0)], -1)
        return recall_at_k(rerank(self.vectors, self.queries, candidates, self.k, self.metric)[1], self.truth)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw"])
def test_the_probe_gives_the_recall_a_copy_without_the_held_out_rows_gives(tmp_path: Path, kind: str, metric: str) -> None:
    """At every setting, the recall the probe measures is exactly the recall of a copy of the
    index holding every row but the sample, and its truth is the sample's exact neighbours
    among the other rows; measuring leaves the store's own index at its saved setting."""
    vectors, labels = clustered(2500, 16, clusters=40)
    store = make_store(tmp_path / "s", vectors, labels, metric=metric, index=IndexOptions(kind=kind, recall_queries=100))
    saved = dict(store.manifest["index"]["params"])
    probe = store._recall_probe(10, 100, seed=3)
    reference = CopyWithoutTheSample(store, probe.sample, probe.queries, 10)
    np.testing.assert_array_equal(probe.truth, reference.truth)
    name = "efSearch" if kind == "hnsw" else "nprobe"
    measured = [probe.recall({name: value}) for value in (1, 4, 16)]
    assert measured == [reference.recall({name: value}) for value in (1, 4, 16)]
    assert measured[0] < measured[-1]  # the settings are told apart
    if kind != "hnsw":
        assert faiss.extract_index_ivf(store.index).nprobe == saved["nprobe"]


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_building_and_checking_an_ivf_index_copies_no_index(tmp_path: Path, kind: str, monkeypatch) -> None:
    """The probe of an IVF index searches the index itself, the held-out rows filtered out:
    no copy of the index (and of its vectors) is made to build, grow or check it."""
    def refuse(index):
        raise AssertionError("an IVF index was copied")

    monkeypatch.setattr(faiss, "clone_index", refuse)
    vectors, labels = clustered(2000, 16, clusters=30)
    store = make_store(tmp_path / "s", vectors, labels, index=IndexOptions(kind=kind, recall_queries=100))
    assert store.manifest["index"]["recall"]["queries"] == 100
    assert store.check_recall(queries=100).recall == store.manifest["index"]["recall"]["recall"]
    store.set_search_params(nprobe=2)


def test_no_pass_over_the_rows_prepares_more_than_a_small_block(tmp_path: Path, monkeypatch) -> None:
    """Building and measuring an IVF index never prepares the stored rows whole: the largest
    array made ready for FAISS is a block of ``lean_rows`` rows or the k-means sample, both
    smaller than the store."""
    largest = [0]
    prepare = faiss_index.prepare_vectors

    def watched(vectors, metric, **options):
        largest[0] = max(largest[0], len(np.atleast_2d(vectors)))
        return prepare(vectors, metric, **options)

    monkeypatch.setattr(faiss_index, "prepare_vectors", watched)
    monkeypatch.setattr(store_module, "prepare_vectors", watched)
    vectors, labels = clustered(40_000, 16, clusters=40)
    store = make_store(tmp_path / "s", vectors, labels, chunk=5000, index=IndexOptions(kind="ivf"))
    k_means_sample = 64 * faiss.extract_index_ivf(store.index).nlist
    assert largest[0] <= max(lean_rows(16), k_means_sample) < 40_000


def index_bytes(index) -> bytes:
    return faiss.serialize_index(index).tobytes()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """FAISS (and the OpenBLAS it brings) on one thread, as it was afterwards: threads share
    a matrix product out differently by its shape, which can move its last bit."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("kind", ["ivf", "flat"])
def test_an_index_built_in_small_blocks_is_the_one_built_in_one_go(kind: str, metric: str, one_thread: None) -> None:
    """k-means and the rows' assignment to lists in FAISS's smaller distance blocks, and rows
    added a block at a time (a flat index given its room first), build the very index that
    training and adding every row at once with FAISS's own block size builds; FAISS's
    setting is put back afterwards."""
    # 2 blocks of lean_rows(16): every block, and the k-means sample, takes FAISS's matrix products
    vectors = clustered(2 * lean_rows(16), 16, clusters=40, seed=5)[0]
    blocks = faiss.cvar.distance_compute_blas_query_bs
    built, _ = make_index(kind, 16, len(vectors), metric, IndexOptions())
    train_index(built, vectors, metric, seed=0)
    add_rows(built, vectors, metric, 0)
    assert faiss.cvar.distance_compute_blas_query_bs == blocks

    reference, _ = make_index(kind, 16, len(vectors), metric, IndexOptions())
    if kind == "ivf":
        ivf = faiss.extract_index_ivf(reference)
        rows = np.sort(np.random.default_rng(0).choice(len(vectors), size=max(64 * ivf.nlist, 10_000), replace=False))
        ivf.cp.seed = 0
        reference.train(prepare_vectors(vectors[rows], metric))
    reference.add(prepare_vectors(vectors, metric))
    assert len(vectors) > lean_rows(16)  # several blocks were added
    assert index_bytes(built) == index_bytes(reference)


def test_rows_read_in_blocks_are_the_rows_and_leave_the_file_unmapped(tmp_path: Path) -> None:
    """``read_rows`` gives ``features[rows]`` for rows in any order, repeated or not; once
    read, the memory-mapped file's pages no longer count as the process's memory."""
    vectors = np.random.default_rng(0).normal(size=(200_000, 16)).astype(np.float32)  # 12.8 MB
    vectors.tofile(tmp_path / "features.f32")
    mapped = open_features(tmp_path, len(vectors), 16)
    rows = np.random.default_rng(1).integers(0, len(vectors), size=5000)
    np.testing.assert_array_equal(read_rows(mapped, rows), vectors[rows])
    np.testing.assert_array_equal(read_rows(mapped, np.array([], dtype=np.int64)), np.empty((0, 16), np.float32))
    if not sys.platform.startswith("linux"):
        return
    np.asarray(mapped).sum()  # every page mapped in
    touched = file_pages_mib()
    let_go_of_pages(mapped)
    assert touched - file_pages_mib() > 10
    read_rows(mapped, np.arange(0, len(vectors), 7))  # every page read, a block at a time
    assert touched - file_pages_mib() > 10
    np.testing.assert_array_equal(mapped[123], vectors[123])  # and read again as before


def file_pages_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_reranking_from_disk_gives_what_reranking_gives(tmp_path: Path, metric: str) -> None:
    """Candidates read in a block of queries at a time rank as ``rerank`` ranks them, with
    missing candidates (-1), repeated ones and a query with none at all."""
    vectors = clustered(3000, 24, seed=2)[0]
    vectors.tofile(tmp_path / "features.f32")
    mapped = open_features(tmp_path, len(vectors), 24)
    queries = clustered(21, 24, seed=3)[0]
    candidates = np.random.default_rng(4).integers(0, len(vectors), size=(21, 30))
    candidates[3, 5:] = -1
    candidates[4, :] = -1
    candidates[7, 10:20] = candidates[7, 0]
    expected = rerank(vectors, queries, candidates, 8, metric)
    got = rerank_from_disk(mapped, queries, candidates, 8, metric)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[0], expected[0])
    assert (got[1][4] == -1).all() and np.isinf(got[0][4]).all()
