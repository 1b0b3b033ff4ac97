"""The feature store: vectors on disk, a FAISS index over them, and what each row is.

``FeatureStore`` opens, searches, grows and re-indexes a finished store;
``create_store`` streams rows into a new one. The directory's files and manifest are
described in ``manifest.py``, how they are written safely in ``writing.py``, the index in
``faiss_index.py``, and the parts of a sharded extraction in ``shards.py``.

An opened store keeps the files of the version it opened (the manifest and index read,
the vectors and metadata held open), so that a command replacing the store meanwhile
(``extract --overwrite``, ``index --add``) never gives it rows of one version and an index
of another. Its own writes hold the store's lock and start from the store as it is on
disk then, not as it was when opened.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

import numpy as np

from tltk.errors import TltkError
from tltk.features.faiss_index import (
    APPROXIMATE,
    EXACT_SCORES,
    FILTERED_PROBE,
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
    read_rows,
    rerank,
    rerank_extra,
    rerank_from_disk,
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
from tltk.features.ranking import faiss_scores_bounded, rank_candidates, recomputed_scores, search_in_two_steps
from tltk.features.writing import RowWriter, build_atomically, replace_version, timestamp
from tltk.fileio import atomic_write, write_json
from tltk.locking import hold

OPEN_ATTEMPTS = 20  # versions a reader lets go by while opening a store that is being replaced


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
    wait: bool = False,
) -> "FeatureStore":
    """Stream ``chunks`` of (vectors, metadata rows) into a new store at ``path``.

    ``header`` holds what describes the vectors (source, layer, pool, preprocessing,
    class_names, data); it goes into the manifest. The store appears at ``path`` only
    once complete; if anything fails, nothing is left behind and an old store is kept.
    Another command writing ``path`` is refused by name, or waited for with ``wait``.
    """
    options = index or IndexOptions()
    options.validate()
    target = Path(path).expanduser()

    def index_rows(building: Path, manifest: dict[str, Any]) -> FeatureStore:
        return FeatureStore(building, manifest, home=target).build_index(options)

    return build_atomically(target, chunks, header, metric, overwrite, total, progress, index_rows, wait=wait)


class _Replaced(Exception):
    """The store was replaced by another command while it was being opened: open it again."""


class _Version:
    """The vectors and metadata files of one version of a store, held open together."""

    def __init__(self, features: BinaryIO | None, metadata: BinaryIO | None) -> None:
        self.features = features
        self.metadata = metadata
        self.rows: np.ndarray | None = None  # the vectors mapped once, for searching (``FeatureStore._rows``)

    @classmethod
    def at(cls, path: Path, opener: Callable[[str, int], int] | None = None) -> "_Version":
        return cls(_open_or_none(path / FEATURES, opener), _open_or_none(path / METADATA, opener))

    def close(self) -> None:
        for handle in (self.features, self.metadata):
            if handle is not None:
                handle.close()


def _open_or_none(path: Path, opener: Callable[[str, int], int] | None) -> BinaryIO | None:
    try:
        return open(path.name if opener else path, "rb", opener=opener)
    except FileNotFoundError:
        return None


class FeatureStore(ManifestFields):
    """A finished store: its manifest, its vectors (memory-mapped) and its FAISS index."""

    def __init__(self, path: Path, manifest: dict[str, Any], index: Any = None, *, home: Path | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self.index = index
        # Where the store lives (and is locked): ``path`` itself, except while it is built beside it.
        self.home = home if home is not None else path
        self._metadata: list[dict[str, Any]] | None = None
        self._version: _Version | None = None

    @classmethod
    def open(cls, path: str | Path) -> "FeatureStore":
        """Open a complete store; a missing, unfinished or inconsistent one is one clear error.

        A store being replaced by another command meanwhile is opened as one whole version,
        the old or the new.
        """
        path = Path(path).expanduser()
        for attempt in range(OPEN_ATTEMPTS):
            try:
                return cls._open_version(path)
            except _Replaced:
                time.sleep(0.005 * (attempt + 1))
        raise TltkError(f"{path} was replaced {OPEN_ATTEMPTS} times while it was being opened; "
                        f"open it again once the command writing it has finished.")

    @classmethod
    def _open_version(cls, path: Path) -> "FeatureStore":
        """Every file read through one handle on the directory: one version, whatever is renamed over it."""
        try:
            folder = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            if _being_replaced(path):
                raise _Replaced from None
            read_manifest(path)  # the sentence for a missing path, a file, or no store
            raise

        def opener(name: str, flags: int) -> int:
            return os.open(name, flags, dir_fd=folder)

        try:
            try:
                with open(MANIFEST, "rb", opener=opener) as handle:
                    data = handle.read()
            except FileNotFoundError:
                _check_same_version(path, folder)
                read_manifest(path)  # says it is not a store
                raise
            manifest = read_manifest(path, data)
            try:
                index = read_index(path, manifest, opener)
            except TltkError:
                _check_same_version(path, folder)  # no index because the version was removed: open again
                raise
            version = _Version.at(path, opener)
            if version.features is None or version.metadata is None:
                _check_same_version(path, folder)
        finally:
            os.close(folder)
        store = cls(path, manifest, index)
        store._version = version
        if store.index.ntotal != store.count:
            raise TltkError(
                f"the index of {path} holds {store.index.ntotal} vectors but its manifest {store.count} "
                f"(an interrupted append); run `tltk index {path} --rebuild`."
            )
        return store

    def close(self) -> None:
        """Let go of the files of the version this store opened."""
        if self._version is not None:
            self._version.close()
            self._version = None

    @contextmanager
    def writing(self, wait: bool = False) -> Iterator["FeatureStore"]:
        """Hold the store's lock for the block (another writer: refused by name, or waited for
        with ``wait``), starting from the store as it is on disk now, since another command
        may have changed it after this one opened it."""
        with hold(self.home, wait=wait, what="feature store") as taken:
            if taken and self.path == self.home:
                self._read_again()
            yield self

    def _read_again(self) -> None:
        current = FeatureStore.open(self.path)
        self.close()
        self.manifest, self.index, self._version, self._metadata = current.manifest, current.index, current._version, None

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
        handle = self._version.features if self._version is not None else None
        return open_features(self.path, self.count, self.dim, handle)

    def metadata(self) -> list[dict[str, Any]]:
        if self._metadata is None:
            handle = self._version.metadata if self._version is not None else None
            self._metadata = read_metadata(self.path, self.count, handle)
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

        The rows are the best ``k`` of the index's first ``k + rerank_extra(k)`` candidates
        (twice as many as asked for, at least 10 more), in the order of their distances
        computed in float64 from the stored vectors: FAISS's float32 arithmetic can swap two
        neighbours whose distances differ by less than its rounding (an exact index is exact
        only after this step), and an IVF-PQ index's scores are estimates from compressed
        codes. Each distance is within ``score_rounding`` of the true one (a float32 sum
        over the vector's dimensions), and is the float64 one wherever rounding could have
        swapped it with a neighbour's. ``ranking`` reaches this answer for little more than
        the FAISS search costs: candidates that cannot be among the ``k`` best whatever the
        rounding are not fetched (IVF-Flat, HNSW-Flat, l2), and only those whose order rounding
        could change are read back in float64.
        """
        queries = self._queries(vectors)
        k = min(k, self.count)
        scores, candidates = self._candidates(queries, k, min(self.count, k + rerank_extra(k)))
        return rank_candidates(self._rows(), vectors, scores, candidates, k, self.metric, threads=search_threads())

    def _candidates(self, queries: np.ndarray, k: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and rows of the ``count`` stored vectors the index finds nearest to each
        prepared query, in the index's order, as far as they can be among the ``k`` best:
        scores exact up to ``score_rounding``, the index's own or computed again from the rows."""
        if faiss_scores_bounded(self.index, self.index_type, count, self.metric):
            return search_in_two_steps(self.index, queries, k, count, self.metric)
        scores, candidates = self.index.search(queries, count)
        if self.index_type in EXACT_SCORES:  # the index's own scores are bounded; only asked in one step
            return scores, candidates
        return recomputed_scores(self._rows(), queries, candidates, self.metric), candidates

    def _rows(self) -> np.ndarray:
        """The stored vectors as a plain array over one memory map kept for the version
        opened: a fresh map per search would fault in every page it reads again."""
        if self._version is None:
            return np.asarray(self.features())
        if self._version.rows is None or len(self._version.rows) != self.count:
            self._version.rows = np.asarray(self.features())
        return self._version.rows

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
        or the given ``rows``, held out of the index (see ``RecallProbe``).
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

    def build_index(self, options: IndexOptions, wait: bool = False) -> "FeatureStore":
        """(Re)build the index from the stored vectors, tune and measure it, save it, then the manifest."""
        options.validate()
        with self.writing(wait):
            return self._build_index(options)

    def _build_index(self, options: IndexOptions) -> "FeatureStore":
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

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None, *,
                          wait: bool = False) -> RecallReport | None:
        """Fix the approximate index's search setting, measure the recall it gives, and save both."""
        with self.writing(wait):
            return self._set_search_params(nprobe, ef_search)

    def _set_search_params(self, nprobe: int | None, ef_search: int | None) -> RecallReport | None:
        if self.index_type not in APPROXIMATE:
            raise TltkError(f"the store at {self.path} has an exact ({self.index_type}) index; --nprobe and --ef-search apply to ivf, ivfpq and hnsw.")
        options = IndexOptions(kind=self.index_type, nprobe=nprobe, ef_search=ef_search)
        options.validate()
        self._tune(self.index_type, options)
        self._save()
        return RecallReport(**self.manifest["index"]["recall"])

    def append(self, chunks: Iterable[Chunk], data_entry: dict[str, Any], class_names: Sequence[str], *,
               total: int = 0, progress: Progress | None = None, wait: bool = False) -> int:
        """Add rows to the files and the index (an IVF index keeps its trained centroids).

        On any failure the store is left as it was: the new bytes of ``features.f32`` are
        cut off and ``metadata.jsonl``, ``index.faiss`` and the manifest were not touched.
        """
        with self.writing(wait):
            return self._append(chunks, data_entry, class_names, total, progress)

    def _append(self, chunks: Iterable[Chunk], data_entry: dict[str, Any], class_names: Sequence[str],
                total: int, progress: Progress | None) -> int:
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
            writer.abort()
            self.manifest, self._metadata = committed, None
            self._truncate_to_manifest()
            self.index = read_index(self.path, self.manifest)
            raise
        finally:
            part.unlink(missing_ok=True)
        return writer.added

    def rebuild(self, options: IndexOptions, wait: bool = False) -> "FeatureStore":
        """Rebuild the index, after cutting off rows an interrupted append left behind."""
        with self.writing(wait):
            self._truncate_to_manifest()
            return self.build_index(options)

    def _commit_append(self, writer: RowWriter, part: Path, data_entry: dict[str, Any], class_names: Sequence[str]) -> None:
        count = self.count + writer.added
        committed_bytes = int(self.manifest["metadata_bytes"])
        metadata_bytes = committed_bytes + writer.metadata_bytes
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

        def write_metadata(folder: Path) -> None:
            atomic_write(folder / METADATA, lambda tmp: concatenate(self.path / METADATA, committed_bytes, part, tmp),
                         size=metadata_bytes, shown=self.home / METADATA)

        self._save(write_metadata)

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
        """A seeded sample of stored rows (or ``rows``), held out of the index (see ``RecallProbe``),
        and their exact neighbours among the other rows, found a block of the file at a time."""
        if self.count < 2:
            raise TltkError(f"the store at {self.path} has {self.count} row; measuring recall needs at least 2.")
        if rows is not None:
            sample = np.unique(np.asarray(rows, dtype=np.int64))
        else:
            size = min(queries, self.count // 2)
            sample = np.sort(np.random.default_rng(seed).choice(self.count, size=size, replace=False))
        features = self.features()
        k = min(k, self.count - len(sample))
        vectors = read_rows(features, sample)
        wanted = k + rerank_extra(k) + len(sample)
        _, candidates = exact_knn(features, prepare_vectors(vectors, self.metric), wanted, self.metric, lean=True)
        candidates[np.isin(candidates, sample)] = -1
        truth = rerank_from_disk(features, vectors, candidates, k, self.metric)[1]
        if self.index_type in FILTERED_PROBE:
            return RecallProbe(self.index, sample, vectors, truth, features, self.metric, self.count)
        kept = np.setdiff1d(np.arange(self.count), sample)
        return RecallProbe(self._copy_without(kept, features), sample, vectors, truth, features, self.metric,
                           self.count, kept)

    def _copy_without(self, kept: np.ndarray, features: np.ndarray) -> Any:
        """A copy of the index holding the ``kept`` rows only (for a graph index, whose answers
        depend on the links the held-out rows would make)."""
        import faiss

        index = faiss.clone_index(self.index)
        index.reset()  # keeps what training learnt, drops the vectors
        step = chunk_rows(self.dim)
        for begin in range(0, len(kept), step):
            index.add(prepare_vectors(read_rows(features, kept[begin:begin + step]), self.metric, in_place=True))
        return index

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

    def _save(self, write_more: Callable[[Path], None] | None = None) -> None:
        """Write the index and the manifest (and what ``write_more`` writes): in place while the
        store is being built, else as a new version swapped in whole (``replace_version``)."""

        def write(folder: Path) -> None:
            if write_more is not None:
                write_more(folder)
            write_index(self.index, folder / INDEX, shown=self.home / INDEX)
            write_json(folder / MANIFEST, self.manifest, shown=self.home / MANIFEST)

        if self.path != self.home:
            write(self.path)
            return
        replace_version(self.path, write)
        if self._version is not None:  # from now on, read the version just written
            self._version.close()
            self._version = _Version.at(self.path)


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


def read_manifest(path: Path, data: bytes | None = None) -> dict[str, Any]:
    """A complete store's manifest (read from ``path``, or its bytes already read), checked;
    a part of a sharded extraction is refused by name."""
    if data is None and not path.is_dir():
        raise TltkError(f"feature store {path} does not exist; create one with `tltk extract SOURCE --layer L --data SPEC --out {path}`.")
    if data is None and not (path / MANIFEST).is_file():
        raise TltkError(f"{path} is not a feature store (no {MANIFEST}); create one with `tltk extract`.")
    manifest = load_manifest(path, data)
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


def read_index(path: Path, manifest: dict[str, Any], opener: Callable[[str, int], int] | None = None) -> Any:
    """The FAISS index with the search settings (nprobe, efSearch) that ``manifest`` records
    (``opener`` opens the file relative to a directory handle, as ``open`` takes it)."""
    import faiss

    try:
        handle = open(INDEX if opener else path / INDEX, "rb", opener=opener)
    except FileNotFoundError:
        raise TltkError(f"{path} has no {INDEX}; rebuild it with `tltk index {path} --rebuild`.") from None
    with handle:
        index = faiss.read_index(faiss.PyCallbackIOReader(handle.read))
    params = manifest["index"].get("params", {})
    apply_search_params(index, params)
    return index


def write_index(index: Any, path: Path, *, shown: Path) -> None:
    """Save ``index`` atomically, through Python's file writes so that a full disk is an OSError like any other."""
    import faiss

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            faiss.write_index(index, faiss.PyCallbackIOWriter(handle.write))

    atomic_write(path, write, shown=shown)


def _being_replaced(path: Path) -> bool:
    """Whether ``path`` is missing only for the moment a replacement without an atomic swap takes."""
    return path.parent.is_dir() and any(path.parent.glob(f".{path.name}.old-*"))


def _check_same_version(path: Path, folder: int) -> None:
    """A file missing from a version that is no longer at ``path`` was removed with it: open again."""
    try:
        replaced = os.stat(path).st_ino != os.fstat(folder).st_ino
    except FileNotFoundError:
        replaced = True
    if replaced:
        raise _Replaced
