"""The feature store: vectors on disk, a FAISS index over them, and what each row is.

``FeatureStore`` opens, searches, grows and re-indexes a finished store;
``create_store`` streams rows into a new one. The directory's files and manifest are
described in ``manifest.py``, how they are written safely in ``writing.py``, the index in
``faiss_index.py``, and the parts of a sharded extraction in ``shards.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from tltk.errors import TltkError
from tltk.features.faiss_index import (
    APPROXIMATE,
    EXACT_SCORES,
    RECALL_K,
    RECALL_QUERIES,
    TARGET_RECALL,
    IndexOptions,
    RecallProbe,
    RecallReport,
    add_rows,
    apply_search_params,
    chunk_rows,
    drop_self,
    exact_knn,
    make_index,
    prepare_vectors,
    rerank,
    rerank_extra,
    resolve_kind,
    train_index,
    tune_search,
)
from tltk.features.manifest import (
    FEATURES,
    INDEX,
    MANIFEST,
    METADATA,
    METADATA_PART,
    SHARD,
    Chunk,
    ManifestFields,
    Progress,
    check_manifest_fields,
    load_manifest,
    open_features,
    read_metadata,
    shard_words,
)
from tltk.features.writing import RowWriter, build_atomically, timestamp
from tltk.fileio import atomic_write, write_json


def create_store(
    path: str | Path,
    chunks: Iterable[Chunk],
    header: dict[str, Any],
    *,
    metric: str = "cosine",
    index: IndexOptions | None = None,
    overwrite: bool = False,
    total: int = 0,
    progress: Progress | None = None,
) -> "FeatureStore":
    """Stream ``chunks`` of (vectors, metadata rows) into a new store at ``path``.

    ``header`` holds what describes the vectors (source, layer, pool, preprocessing,
    class_names, data); it goes into the manifest. The store appears at ``path`` only
    once complete; if anything fails, nothing is left behind and an old store is kept.
    """
    options = index or IndexOptions()
    options.validate()

    def index_rows(building: Path, manifest: dict[str, Any]) -> FeatureStore:
        return FeatureStore(building, manifest).build_index(options)

    return build_atomically(Path(path).expanduser(), chunks, header, metric, overwrite, total, progress, index_rows)


class FeatureStore(ManifestFields):
    """A finished store: its manifest, its vectors (memory-mapped) and its FAISS index."""

    def __init__(self, path: Path, manifest: dict[str, Any], index: Any = None) -> None:
        self.path = path
        self.manifest = manifest
        self.index = index
        self._metadata: list[dict[str, Any]] | None = None

    @classmethod
    def open(cls, path: str | Path) -> "FeatureStore":
        """Open a complete store; a missing, unfinished or inconsistent one is one clear error."""
        path = Path(path).expanduser()
        manifest = read_manifest(path)
        store = cls(path, manifest, read_index(path, manifest))
        if store.index.ntotal != store.count:
            raise TltkError(
                f"the index of {path} holds {store.index.ntotal} vectors but its manifest {store.count} "
                f"(an interrupted append); run `tltk index {path} --rebuild`."
            )
        return store

    # what the store holds

    @property
    def fingerprint(self) -> str:
        return str(self.manifest.get("source", {}).get("fingerprint", ""))

    @property
    def index_type(self) -> str:
        return str(self.manifest["index"]["type"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.get("class_names", []))

    @property
    def task(self) -> str:
        return str(self.manifest.get("task", "multiclass"))

    def features(self) -> np.ndarray:
        """The stored vectors, memory-mapped read-only (raw, before any normalisation)."""
        return open_features(self.path, self.count, self.dim)

    def metadata(self) -> list[dict[str, Any]]:
        if self._metadata is None:
            self._metadata = read_metadata(self.path, self.count)
        return self._metadata

    def labels(self) -> list[list[str]]:
        """Each row's label names: one for multi-class data, any number for multi-label."""
        return [list(row.get("labels", [])) for row in self.metadata()]

    def summary(self) -> dict[str, Any]:
        """What ``tltk index STORE`` prints: the manifest's essentials."""
        index = self.manifest["index"]
        return {
            "store": str(self.path), "count": self.count, "dim": self.dim, "metric": self.metric,
            "layer": self.layer, "pool": self.pool, "source": self.manifest.get("source", {}).get("description"),
            "fingerprint": self.fingerprint[:16], "index": index["type"], "factory": index.get("factory"),
            "params": index.get("params", {}), "recall": index.get("recall"), "task": self.task,
            "classes": len(self.class_names), "data": [d.get("spec") for d in self.manifest.get("data", [])],
        }

    def check_same_model(self, fingerprint: str, layer: str, pool: str, description: str = "") -> None:
        """Refuse queries made by another model, layer or pooling: their vectors live in another space."""
        if fingerprint != self.fingerprint:
            made_by = self.manifest.get("source", {}).get("description", "another model")
            raise TltkError(
                f"the store at {self.path} was built from {made_by} (fingerprint {self.fingerprint[:12]}), but the "
                f"query model{' ' + description if description else ''} has fingerprint {fingerprint[:12]}; "
                f"query with the model that built it, or extract a new store with this one."
            )
        if (layer, pool) != (self.layer, self.pool):
            raise TltkError(
                f"the store at {self.path} holds layer {self.layer} (--pool {self.pool}), not {layer} (--pool {pool}); "
                f"query at the store's layer, or extract a new store at {layer}."
            )

    # searching

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, rows) of the ``k`` nearest stored vectors to each of ``vectors``.

        Distances are smaller-is-closer in both metrics: 1 - cosine similarity, or the
        Euclidean distance. Where fewer than ``k`` are found, rows are -1.

        The index proposes twice as many candidates as asked for, and they are ranked by
        distances computed again in float64 from the stored vectors: FAISS's float32
        arithmetic (|x|^2 - 2x.y + |y|^2) can swap two neighbours whose distances differ by
        less than its rounding, so an exact index is exact only after this step. Where the
        index's scores are exact up to a known rounding (IVF-Flat, HNSW-Flat), candidates
        too far behind the k-th for rounding to matter are left unread (``rerank``).
        """
        queries = self._queries(vectors)
        k = min(k, self.count)
        scores, candidates = self._candidates(queries, min(self.count, k + rerank_extra(k)))
        exact_scores = scores if self.index_type in EXACT_SCORES else None
        return rerank(self.features(), vectors, candidates, k, self.metric, scores=exact_scores, threads=search_threads())

    def _candidates(self, queries: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The index's scores and rows of the ``count`` stored vectors nearest to each prepared query, best first."""
        return self.index.search(queries, count)

    def exact_search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like ``search`` but by brute force over the stored vectors, whatever the index."""
        k = min(k, self.count)
        _, candidates = exact_knn(self.features(), self._queries(vectors), k + rerank_extra(k), self.metric)
        return rerank(self.features(), vectors, candidates, k, self.metric)

    def search_rows(self, rows: Sequence[int], k: int, *, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest neighbours of stored rows, each row itself left out (leave-one-out)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.count):
            bad = int(rows[(rows < 0) | (rows >= self.count)][0])
            raise TltkError(f"row {bad} is not in the store at {self.path}, which has rows 0..{self.count - 1}.")
        vectors = np.asarray(self.features()[rows]) if len(rows) else np.empty((0, self.dim), dtype=np.float32)
        search = self.exact_search if exact else self.search
        distances, found = search(vectors, min(k + 1, self.count))
        return drop_self(distances, found, rows, k)

    def check_recall(self, k: int = RECALL_K, queries: int = RECALL_QUERIES, seed: int = 0,
                     rows: Sequence[int] | None = None) -> RecallReport:
        """Recall@k of the index, at its current search setting, against exact search.

        The queries are a seeded sample of ``queries`` stored rows (at most half the store),
        or the given ``rows``, held out of a copy of the index (see ``RecallProbe``).
        """
        if k < 1 or queries < 1:
            raise TltkError(f"--recall-k and --recall-queries must be at least 1, not {k} and {queries}.")
        started = time.perf_counter()
        probe = self._recall_probe(k, queries, seed, rows)
        params = dict(self.manifest["index"].get("params", {}))
        recall = probe.recall(params)
        return RecallReport(probe.k, len(probe.sample), recall, params, seconds=round(time.perf_counter() - started, 3))

    def _queries(self, vectors: np.ndarray) -> np.ndarray:
        queries = prepare_vectors(vectors, self.metric)
        if queries.shape[1] != self.dim:
            raise TltkError(f"the store at {self.path} holds {self.dim}-d vectors; the queries are {queries.shape[1]}-d.")
        return queries

    # writing

    def build_index(self, options: IndexOptions) -> "FeatureStore":
        """(Re)build the index from the stored vectors, tune and measure it, save it, then the manifest."""
        options.validate()
        started = time.perf_counter()
        kind = resolve_kind(options.kind, self.count, options.threshold)
        index, factory = make_index(kind, self.dim, self.count, self.metric, options)
        train_index(index, self.features(), self.metric, options.seed)
        add_rows(index, self.features(), self.metric, 0)
        self.index = index
        self.manifest["index"] = {"type": kind, "factory": factory, "params": {}, "recall": None}
        if kind in APPROXIMATE:
            self._tune(kind, options)
        self.manifest["index"]["build_seconds"] = round(time.perf_counter() - started, 3)
        self._save()
        return self

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> RecallReport | None:
        """Fix the approximate index's search setting, measure the recall it gives, and save both."""
        if self.index_type not in APPROXIMATE:
            raise TltkError(f"the store at {self.path} has an exact ({self.index_type}) index; --nprobe and --ef-search apply to ivf, ivfpq and hnsw.")
        options = IndexOptions(kind=self.index_type, nprobe=nprobe, ef_search=ef_search)
        options.validate()
        self._tune(self.index_type, options)
        self._save()
        return RecallReport(**self.manifest["index"]["recall"])

    def append(self, chunks: Iterable[Chunk], data_entry: dict[str, Any], class_names: Sequence[str], *,
               total: int = 0, progress: Progress | None = None) -> int:
        """Add rows to the files and the index (an IVF index keeps its trained centroids).

        On any failure the store is left as it was: the new bytes of ``features.f32`` are
        cut off and ``metadata.jsonl``, ``index.faiss`` and the manifest were not touched.
        """
        self._truncate_to_manifest()
        committed = json.loads(json.dumps(self.manifest))
        part = self.path / METADATA_PART
        part.unlink(missing_ok=True)
        writer = RowWriter(self.path / FEATURES, part, self.dim, progress=progress, total=total)
        try:
            for vectors, rows in chunks:
                writer.append(vectors, rows)
            writer.close()
            if writer.added:
                self._commit_append(writer, part, data_entry, class_names)
        except BaseException:
            writer.close()
            self.manifest, self._metadata = committed, None
            self._truncate_to_manifest()
            self.index = read_index(self.path, self.manifest)
            raise
        finally:
            part.unlink(missing_ok=True)
        return writer.added

    def rebuild(self, options: IndexOptions) -> "FeatureStore":
        """Rebuild the index, after cutting off rows an interrupted append left behind."""
        self._truncate_to_manifest()
        return self.build_index(options)

    def _commit_append(self, writer: RowWriter, part: Path, data_entry: dict[str, Any], class_names: Sequence[str]) -> None:
        count = self.count + writer.added
        metadata_bytes = int(self.manifest["metadata_bytes"]) + writer.metadata_bytes
        atomic_write(self.path / METADATA, lambda tmp: concatenate(self.path / METADATA, int(self.manifest["metadata_bytes"]), part, tmp))
        add_rows(self.index, open_features(self.path, count, self.dim), self.metric, self.count)
        known = self.class_names
        self.manifest.update(
            count=count, metadata_bytes=metadata_bytes, updated=timestamp(),
            data=[*self.manifest.get("data", []), data_entry],
            class_names=known + [c for c in class_names if c not in known],
        )
        self._metadata = None
        if self.index_type in APPROXIMATE:
            self._retune()
        self._save()

    def _tune(self, kind: str, options: IndexOptions, start: int | None = None) -> None:
        probe = self._recall_probe(options.recall_k, options.recall_queries, options.seed)
        report = tune_search(self.index, kind, probe.recall, options, start)
        apply_search_params(self.index, report.params)
        report.k, report.queries = probe.k, len(probe.sample)
        fixed = (options.nprobe or options.ef_search) is not None
        self.manifest["index"].update(params=report.params, recall=report.to_dict(), fixed=fixed)

    def _retune(self) -> None:
        """After an append: measure again, keeping a setting the user fixed, else raising it if recall fell."""
        record = self.manifest["index"]
        params = record.get("params", {})
        previous = record.get("recall") or {}
        options = IndexOptions(kind=self.index_type, target_recall=previous.get("target") or TARGET_RECALL,
                               recall_k=previous.get("k") or RECALL_K)
        if record.get("fixed"):
            options.nprobe, options.ef_search = params.get("nprobe"), params.get("efSearch")
            self._tune(self.index_type, options)
        else:
            self._tune(self.index_type, options, start=params.get("nprobe") or params.get("efSearch"))

    def _recall_probe(self, k: int, queries: int, seed: int, rows: Sequence[int] | None = None) -> "RecallProbe":
        """A seeded sample of stored rows (or ``rows``), held out of a copy of the index."""
        import faiss

        if self.count < 2:
            raise TltkError(f"the store at {self.path} has {self.count} row; measuring recall needs at least 2.")
        if rows is not None:
            sample = np.unique(np.asarray(rows, dtype=np.int64))
        else:
            size = min(queries, self.count // 2)
            sample = np.sort(np.random.default_rng(seed).choice(self.count, size=size, replace=False))
        kept = np.setdiff1d(np.arange(self.count), sample)
        features = self.features()
        index = faiss.clone_index(self.index)
        index.reset()  # keeps what training learnt (IVF centroids, PQ codebooks), drops the vectors
        step = chunk_rows(self.dim)
        for begin in range(0, len(kept), step):
            index.add(prepare_vectors(features[kept[begin:begin + step]], self.metric))
        k = min(k, len(kept))
        vectors = np.asarray(features[sample])
        _, candidates = exact_knn(features, prepare_vectors(vectors, self.metric), k + rerank_extra(k) + len(sample), self.metric)
        candidates[np.isin(candidates, sample)] = -1
        truth = rerank(features, vectors, candidates, k, self.metric)[1]
        return RecallProbe(index, kept, sample, vectors, truth, features, self.metric)

    def _truncate_to_manifest(self) -> None:
        """Cut off what an append that died left past the committed rows."""
        committed = self.count * self.dim * 4
        with open(self.path / FEATURES, "r+b") as handle:
            if handle.seek(0, os.SEEK_END) > committed:
                handle.truncate(committed)
        metadata_bytes = int(self.manifest["metadata_bytes"])
        if (self.path / METADATA).stat().st_size > metadata_bytes:
            source = self.path / METADATA
            atomic_write(source, lambda tmp: concatenate(source, metadata_bytes, None, tmp))

    def _save(self) -> None:
        import faiss

        atomic_write(self.path / INDEX, lambda tmp: faiss.write_index(self.index, str(tmp)))
        write_json(self.path / MANIFEST, self.manifest)


def concatenate(first: Path, first_bytes: int, second: Path | None, out: Path) -> None:
    """``out`` = the first ``first_bytes`` of ``first``, then all of ``second``, copied in blocks."""
    with open(out, "wb") as target:
        with open(first, "rb") as source:
            remaining = first_bytes
            while remaining > 0:
                block = source.read(min(remaining, 1 << 20))
                if not block:
                    break
                target.write(block)
                remaining -= len(block)
        if second is not None:
            with open(second, "rb") as source:
                shutil.copyfileobj(source, target, 1 << 20)


def read_manifest(path: Path) -> dict[str, Any]:
    """A complete store's manifest, checked; a part of a sharded extraction is refused by name."""
    if not path.is_dir():
        raise TltkError(f"feature store {path} does not exist; create one with `tltk extract SOURCE --layer L --data SPEC --out {path}`.")
    if not (path / MANIFEST).is_file():
        raise TltkError(f"{path} is not a feature store (no {MANIFEST}); create one with `tltk extract`.")
    manifest = load_manifest(path)
    if SHARD in manifest:
        raise TltkError(f"{path} is {shard_words(manifest[SHARD])} of a sharded extraction, not a searchable store; "
                        f"merge all its parts first with `tltk index merge PART... --out STORE`.")
    check_manifest_fields(manifest, path)
    return manifest


def search_threads() -> int:
    """The threads FAISS searches with (OpenMP's, which ``OMP_NUM_THREADS`` and
    ``faiss.omp_set_num_threads`` set): the re-ranking after it takes as many."""
    import faiss

    return max(1, int(faiss.omp_get_max_threads()))


def read_index(path: Path, manifest: dict[str, Any]) -> Any:
    """The FAISS index with the search settings (nprobe, efSearch) that ``manifest`` records."""
    import faiss

    if not (path / INDEX).is_file():
        raise TltkError(f"{path} has no {INDEX}; rebuild it with `tltk index {path} --rebuild`.")
    index = faiss.read_index(str(path / INDEX))
    params = manifest["index"].get("params", {})
    apply_search_params(index, params)
    return index
