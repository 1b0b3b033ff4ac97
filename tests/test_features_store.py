"""The feature store on its own: exact and approximate search, metrics, saving, appending, failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tltk.errors import TltkError
from tltk.features.faiss_index import IndexOptions, apply_search_params, recall_at_k
from tltk.features.manifest import FEATURES, METADATA
from tltk.features.store import FeatureStore, create_store
from tltk.features.writing import iter_chunks

HEADER = {"source": {"fingerprint": "f" * 64, "description": "test vectors"}, "layer": "fc7", "pool": "avg",
          "class_names": ["a", "b", "c"], "task": "multiclass", "data": []}


def clustered(n: int, dim: int, clusters: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)) * 3
    labels = rng.integers(0, clusters, size=n)
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


def rows_for(labels: np.ndarray, names: list[str] | None = None) -> list[dict]:
    names = names or [str(i) for i in range(int(labels.max()) + 1)]
    return [{"id": str(i), "path": f"img{i}.png", "labels": [names[int(c)]], "split": "train"} for i, c in enumerate(labels)]


def make_store(path: Path, vectors: np.ndarray, labels: np.ndarray, *, metric: str = "l2", chunk: int = 64,
               index: IndexOptions | None = None) -> FeatureStore:
    return create_store(path, iter_chunks(vectors, rows_for(labels), chunk), HEADER, metric=metric, index=index)


def numpy_neighbours(base: np.ndarray, queries: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    base64, queries64 = base.astype(np.float64), queries.astype(np.float64)
    if metric == "cosine":
        unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
        distances = 1.0 - unit(queries64) @ unit(base64).T
    else:
        distances = np.sqrt(((queries64[:, None, :] - base64[None, :, :]) ** 2).sum(-1))
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, order, axis=1), order


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_exact_search_equals_a_numpy_brute_force_answer(tmp_path: Path, metric: str) -> None:
    vectors, labels = clustered(600, 24)
    queries = clustered(25, 24, seed=1)[0]
    store = make_store(tmp_path / "s", vectors, labels, metric=metric)
    distances, rows = store.search(queries, 8)
    expected_d, expected_rows = numpy_neighbours(vectors, queries, 8, metric)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(distances, expected_d, rtol=1e-4, atol=1e-4)
    exact_d, exact_rows = store.exact_search(queries, 8)
    np.testing.assert_array_equal(exact_rows, expected_rows)
    np.testing.assert_allclose(exact_d, expected_d, rtol=1e-4, atol=1e-4)


def test_cosine_ignores_vector_length_where_l2_does_not(tmp_path: Path) -> None:
    vectors = np.array([[10.0, 1.0], [0.6, 0.5], [-1.0, 0.2]], dtype=np.float32)  # row 0: same direction, far away
    labels = np.array([0, 1, 2])
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    cosine = make_store(tmp_path / "cos", vectors, labels, metric="cosine")
    l2 = make_store(tmp_path / "l2", vectors, labels, metric="l2")
    cos_d, cos_rows = cosine.search(query, 3)
    l2_d, l2_rows = l2.search(query, 3)
    assert cos_rows[0].tolist() == [0, 1, 2] and l2_rows[0].tolist() == [1, 2, 0]
    np.testing.assert_allclose(cos_d[0, 0], 1 - 10 / np.sqrt(101), atol=1e-6)
    np.testing.assert_allclose(l2_d[0, 0], np.hypot(0.4, 0.5), atol=1e-6)


def test_a_store_saved_and_reopened_answers_as_before(tmp_path: Path) -> None:
    vectors, labels = clustered(300, 16)
    queries = clustered(10, 16, seed=2)[0]
    built = make_store(tmp_path / "s", vectors, labels, metric="cosine")
    before = built.search(queries, 5)
    reopened = FeatureStore.open(tmp_path / "s")
    after = reopened.search(queries, 5)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(reopened.features(), vectors)
    assert reopened.metadata()[7] == rows_for(labels)[7]
    assert reopened.labels()[7] == [str(labels[7])]
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert (manifest["count"], manifest["dim"], manifest["metric"], manifest["index"]["type"]) == (300, 16, "cosine", "flat")
    assert manifest["layer"] == "fc7" and manifest["tltk_version"]


def test_rows_are_written_to_disk_in_chunks_as_they_arrive(tmp_path: Path) -> None:
    vectors, labels = clustered(200, 8)
    seen: list[int] = []

    def chunks():
        for begin in range(0, 200, 50):
            building = next(tmp_path.glob(".s.building-*"))
            seen.append((building / FEATURES).stat().st_size if (building / FEATURES).exists() else 0)
            yield vectors[begin:begin + 50], rows_for(labels)[begin:begin + 50]

    create_store(tmp_path / "s", chunks(), HEADER)
    assert seen == [0, 50 * 8 * 4, 100 * 8 * 4, 150 * 8 * 4]


def test_search_rows_leaves_each_query_row_out(tmp_path: Path) -> None:
    vectors, labels = clustered(100, 8)
    store = make_store(tmp_path / "s", vectors, labels)
    _, rows = store.search_rows([3, 40], 5)
    expected = numpy_neighbours(vectors, vectors[[3, 40]], 6, "l2")[1][:, 1:]
    np.testing.assert_array_equal(rows, expected)


def test_append_adds_rows_that_are_found_after_reopening(tmp_path: Path) -> None:
    vectors, labels = clustered(300, 16)
    store = make_store(tmp_path / "s", vectors[:200], labels[:200])
    added = store.append(iter_chunks(vectors[200:], rows_for(labels)[200:], 30), {"spec": "more"}, ["a", "z"])
    assert added == 100
    reopened = FeatureStore.open(tmp_path / "s")
    assert reopened.count == 300 and reopened.index.ntotal == 300
    assert reopened.class_names == ["a", "b", "c", "z"]
    assert reopened.metadata()[250]["path"] == "img250.png"
    _, rows = reopened.search(vectors[[250]], 1)
    assert rows[0, 0] == 250
    np.testing.assert_array_equal(reopened.search(vectors[:20], 4)[1], numpy_neighbours(vectors, vectors[:20], 4, "l2")[1])


def test_a_failed_append_leaves_the_store_as_it_was(tmp_path: Path) -> None:
    vectors, labels = clustered(120, 8)
    store = make_store(tmp_path / "s", vectors[:100], labels[:100])
    files = {name: (tmp_path / "s" / name).read_bytes() for name in (FEATURES, METADATA, "index.faiss", "manifest.json")}

    def failing():
        yield vectors[100:110], rows_for(labels)[100:110]
        raise TltkError("image 111 cannot be read")

    with pytest.raises(TltkError, match="image 111"):
        store.append(failing(), {"spec": "more"}, ["a"])
    assert {name: (tmp_path / "s" / name).read_bytes() for name in files} == files
    assert store.count == 100 and store.index.ntotal == 100
    assert FeatureStore.open(tmp_path / "s").search(vectors[:3], 1)[1][:, 0].tolist() == [0, 1, 2]


def test_bytes_left_by_a_killed_append_are_cut_off_before_the_next(tmp_path: Path) -> None:
    vectors, labels = clustered(60, 8)
    store = make_store(tmp_path / "s", vectors[:50], labels[:50])
    with open(tmp_path / "s" / FEATURES, "ab") as handle:
        handle.write(b"\x00" * 100)
    with open(tmp_path / "s" / METADATA, "ab") as handle:
        handle.write(b'{"id": "half')
    reopened = FeatureStore.open(tmp_path / "s")
    assert reopened.count == 50 and len(reopened.metadata()) == 50
    reopened.append(iter_chunks(vectors[50:], rows_for(labels)[50:], 5), {"spec": "more"}, [])
    again = FeatureStore.open(tmp_path / "s")
    np.testing.assert_array_equal(again.features(), vectors)
    assert [row["id"] for row in again.metadata()] == [str(i) for i in range(60)]


def test_a_failed_build_leaves_nothing_behind_and_keeps_an_old_store(tmp_path: Path) -> None:
    vectors, labels = clustered(50, 8)

    def failing():
        yield vectors[:10], rows_for(labels)[:10]
        raise TltkError("boom")

    with pytest.raises(TltkError, match="boom"):
        create_store(tmp_path / "new", failing(), HEADER)
    # Only the writers' lock file stays (an empty file beside the store, see tltk.locking).
    assert [p.name for p in tmp_path.iterdir()] == [".new.lock"]
    make_store(tmp_path / "old", vectors, labels)
    with pytest.raises(TltkError, match="boom"):
        create_store(tmp_path / "old", failing(), HEADER, overwrite=True)
    assert FeatureStore.open(tmp_path / "old").count == 50
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["old"]


def test_an_existing_store_is_replaced_only_with_overwrite(tmp_path: Path) -> None:
    vectors, labels = clustered(50, 8)
    make_store(tmp_path / "s", vectors, labels)
    with pytest.raises(TltkError, match="already holds a feature store; pass --overwrite"):
        make_store(tmp_path / "s", vectors[:10], labels[:10])
    create_store(tmp_path / "s", iter_chunks(vectors[:10], rows_for(labels)[:10], 5), HEADER, overwrite=True)
    assert FeatureStore.open(tmp_path / "s").count == 10


def test_a_directory_of_other_files_is_never_used_as_a_store(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    vectors, labels = clustered(10, 4)
    with pytest.raises(TltkError, match="not a feature store; name a new or empty directory"):
        create_store(tmp_path / "docs", iter_chunks(vectors, rows_for(labels), 5), HEADER, overwrite=True)
    assert (tmp_path / "docs" / "notes.txt").read_text() == "mine"


def test_opening_something_that_is_not_a_store_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TltkError, match="does not exist; create one with `tltk extract"):
        FeatureStore.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TltkError, match="is not a feature store"):
        FeatureStore.open(tmp_path / "empty")


def test_auto_index_is_exact_below_the_threshold_and_ivf_above(tmp_path: Path) -> None:
    vectors, labels = clustered(2000, 16)
    small = make_store(tmp_path / "small", vectors, labels, index=IndexOptions(threshold=5000))
    large = make_store(tmp_path / "large", vectors, labels, index=IndexOptions(threshold=1000))
    assert small.index_type == "flat" and small.manifest["index"]["recall"] is None
    assert large.index_type == "ivf" and large.manifest["index"]["factory"].startswith("IVF")


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_an_approximate_index_is_measured_against_exact_search_when_built(tmp_path: Path, kind: str) -> None:
    data, labels = clustered(3300, 16, clusters=30)
    vectors, new = data[:3000], data[3000:]
    store = make_store(tmp_path / kind, vectors, labels[:3000], index=IndexOptions(kind=kind, recall_queries=100))
    recall = store.manifest["index"]["recall"]
    assert recall["k"] == 10 and recall["queries"] == 100
    on_new_queries = recall_at_k(store.search(new, 10)[1], numpy_neighbours(vectors, new, 10, "l2")[1])
    assert abs(recall["recall"] - on_new_queries) < 0.05
    assert store.check_recall(queries=100).recall == pytest.approx(recall["recall"])  # the same sample, again
    if kind != "ivfpq":  # product quantisation is lossy: its recall is reported, not promised
        assert on_new_queries >= 0.95


def test_recall_is_measured_on_held_out_vectors_as_new_queries_would_see_it(tmp_path: Path) -> None:
    data, labels = clustered(3300, 64, clusters=10, seed=1)
    vectors, new = data[:3000], data[3000:]
    store = make_store(tmp_path / "s", vectors, labels[:3000], index=IndexOptions(kind="hnsw", ef_search=16))
    measured = store.manifest["index"]["recall"]["recall"]
    on_new_queries = recall_at_k(store.search(new, 10)[1], numpy_neighbours(vectors, new, 10, "l2")[1])
    sample = np.arange(0, 3000, 15)
    on_stored_rows = recall_at_k(store.search_rows(sample, 10)[1], numpy_neighbours(vectors, vectors[sample], 11, "l2")[1][:, 1:])
    assert on_stored_rows - on_new_queries > 0.025  # stored vectors flatter a graph index
    assert abs(measured - on_new_queries) < 0.02


def test_tuning_raises_nprobe_until_the_target_recall_is_met(tmp_path: Path) -> None:
    vectors, labels = clustered(4000, 32, clusters=50)
    fixed = make_store(tmp_path / "fixed", vectors, labels, index=IndexOptions(kind="ivf", nprobe=1))
    tuned = make_store(tmp_path / "tuned", vectors, labels, index=IndexOptions(kind="ivf", target_recall=0.99))
    assert fixed.manifest["index"]["params"] == {"nprobe": 1}
    assert fixed.manifest["index"]["recall"]["recall"] < 0.99
    assert tuned.manifest["index"]["params"]["nprobe"] > 1
    assert tuned.manifest["index"]["recall"]["recall"] >= 0.99
    reopened = FeatureStore.open(tmp_path / "tuned")
    assert reopened.check_recall().recall == pytest.approx(tuned.check_recall().recall)


def test_a_fixed_nprobe_is_kept_and_measured_again_after_an_append(tmp_path: Path) -> None:
    vectors, labels = clustered(4000, 32, clusters=50)
    store = make_store(tmp_path / "s", vectors[:3000], labels[:3000], index=IndexOptions(kind="ivf"))
    report = store.set_search_params(nprobe=2)
    assert store.manifest["index"]["params"] == {"nprobe": 2} and report.recall < 1.0
    store.append(iter_chunks(vectors[3000:], rows_for(labels)[3000:], 500), {"spec": "more"}, [])
    reopened = FeatureStore.open(tmp_path / "s")
    assert reopened.manifest["index"]["params"] == {"nprobe": 2} and reopened.index.ntotal == 4000
    assert reopened.manifest["index"]["recall"]["recall"] == pytest.approx(reopened.check_recall().recall)


def test_an_append_raises_a_tuned_setting_that_no_longer_meets_the_target(tmp_path: Path) -> None:
    vectors, labels = clustered(6000, 32, clusters=60)
    store = make_store(tmp_path / "s", vectors[:2000], labels[:2000], index=IndexOptions(kind="ivf", target_recall=0.99))
    apply_search_params(store.index, {"nprobe": 1})  # as if tuning had stopped at a setting too low for the grown store
    store.manifest["index"]["params"] = {"nprobe": 1}
    store.append(iter_chunks(vectors[2000:], rows_for(labels)[2000:], 1000), {"spec": "more"}, [])
    reopened = FeatureStore.open(tmp_path / "s")
    index = reopened.manifest["index"]
    assert index["params"]["nprobe"] > 1 and index["recall"]["recall"] >= 0.99
    assert index["recall"]["recall"] == pytest.approx(reopened.check_recall().recall)  # measured on all 6000 rows


def test_an_exact_index_checks_at_full_recall(tmp_path: Path) -> None:
    vectors, labels = clustered(300, 8)
    assert make_store(tmp_path / "s", vectors, labels).check_recall(k=5).recall == 1.0


def test_recall_at_k_counts_the_share_of_true_neighbours_found() -> None:
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, -1], [5, 6, 7, 8]])
    assert recall_at_k(found, truth) == pytest.approx((2 / 4 + 4 / 4) / 2)


def test_bad_index_settings_are_one_sentence_errors(tmp_path: Path) -> None:
    vectors, labels = clustered(100, 10)
    with pytest.raises(TltkError, match="--index 'annoy' is not one of"):
        make_store(tmp_path / "a", vectors, labels, index=IndexOptions(kind="annoy"))
    with pytest.raises(TltkError, match="--pq-m 3 does not divide the feature dimension 10"):
        make_store(tmp_path / "b", vectors, labels, index=IndexOptions(kind="ivfpq", pq_m=3))
    with pytest.raises(TltkError, match="--metric 'dot' is not one of cosine, l2"):
        make_store(tmp_path / "c", vectors, labels, metric="dot")
    assert not any(p for p in tmp_path.iterdir() if p.suffix != ".lock")  # a writer's empty lock file may stay


def test_vectors_that_are_not_finite_are_refused(tmp_path: Path) -> None:
    vectors, labels = clustered(10, 4)
    vectors[3, 1] = np.nan
    with pytest.raises(TltkError, match="features of img3.png are not finite"):
        make_store(tmp_path / "s", vectors, labels)
