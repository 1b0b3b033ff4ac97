"""The feature store: vectors on disk, a FAISS index over them, and what each row is.

A store is a directory::

    features.f32     raw float32 rows, count x dim, written chunk by chunk as they are computed
    metadata.jsonl   one JSON object per row: id, path, labels, split, ...
    index.faiss      the FAISS index (exact or approximate) over the rows
    manifest.json    what made the vectors (model fingerprint, layer, pooling), the metric,
                     the index type and its search settings, counts, tltk version

Rows stream to disk as they are computed, so building a store holds one chunk of vectors
in memory however many images there are (the FAISS index is built afterwards from the
file, a bounded chunk at a time; an exact index then holds the vectors in memory, as
searching them needs).

Nothing is ever half-written where a reader looks. A new store is built in a hidden
sibling directory and renamed into place once complete. ``manifest.json``,
``index.faiss`` and ``metadata.jsonl`` are only ever replaced whole (temporary file, then
rename). ``features.f32`` is the one file appended in place, since copying gigabytes to
add a few rows would be absurd; the manifest's row count says how much of it is
committed, and bytes past it (from an append that died) are cut off before the next one.

Approximate indexes (IVF, HNSW, IVF-PQ) trade recall for speed, and a badly set one can
return mostly wrong neighbours while looking fine. So whenever one is built or grown, its
recall@k against exact search is measured on a sample of stored vectors held out of a copy
of the index (so that the queries are new to it, as real ones are), and unless the user
fixed them, ``nprobe`` / ``efSearch`` are raised until the recall reaches a target.

An extraction spread over processes (``tltk extract --shard I/N``) writes parts: the same
files without an index, and a manifest that says which shard they are. A part is refused
where a store is expected; ``merge_parts`` joins all of them into the store one
extraction writes (see "shards" below).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from tltk.errors import TltkError, printable
from tltk.fileio import atomic_write, write_json

MANIFEST = "manifest.json"
FEATURES = "features.f32"
METADATA = "metadata.jsonl"
INDEX = "index.faiss"
METADATA_PART = ".metadata.jsonl.part"
SHARD = "shard"  # the manifest key that makes a directory one part of a sharded extraction
STORE_FORMAT = 1

METRICS = ("cosine", "l2")
INDEX_TYPES = ("auto", "flat", "ivf", "hnsw", "ivfpq")
APPROXIMATE = ("ivf", "hnsw", "ivfpq")
AUTO_THRESHOLD = 50_000  # rows; below it exact search answers in milliseconds anyway
TARGET_RECALL = 0.95
RECALL_K = 10
RECALL_QUERIES = 200
CHUNK_BYTES = 32 << 20  # rows read back from disk per step when indexing or searching exactly
HNSW_NEIGHBOURS = 32
HNSW_EF_CONSTRUCTION = 80
MAX_EF_SEARCH = 1024
MIN_POINTS_PER_CENTROID = 39  # FAISS's own floor for k-means training

Chunk = tuple[np.ndarray, Sequence[dict[str, Any]]]
Progress = Callable[[int, int], None]


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


# --- writing --------------------------------------------------------------------------


class RowWriter:
    """Appends rows (vectors and their metadata) to two files, one chunk at a time.

    Each chunk is flushed before ``append`` returns, so the caller's next chunk is computed
    only after the last one left memory for the file.
    """

    def __init__(self, features_path: Path, metadata_path: Path, dim: int | None = None, *,
                 progress: Progress | None = None, total: int = 0) -> None:
        self.features_path = features_path
        self.dim = dim
        self.added = 0
        self.chunks = 0
        self.progress = progress
        self.total = total
        self._features = open(features_path, "ab")
        self._metadata = open(metadata_path, "ab")
        self._closed = False
        self._metadata_bytes = 0

    def append(self, features: np.ndarray, rows: Sequence[dict[str, Any]]) -> None:
        vectors = np.ascontiguousarray(features, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(rows):
            raise ValueError(f"a chunk needs (n, dim) features and n metadata rows, got {vectors.shape} and {len(rows)}")
        self._check_dim(vectors.shape[1])
        finite = np.isfinite(vectors).all(axis=1)
        if not finite.all():
            bad = rows[int(np.flatnonzero(~finite)[0])]
            raise TltkError(f"the features of {bad.get('path') or bad.get('id')} are not finite (NaN or inf); check the model's weights.")
        self._features.write(vectors.tobytes())
        self._metadata.write("".join(json.dumps(row) + "\n" for row in rows).encode("utf-8"))
        self._features.flush()
        self._metadata.flush()
        self._metadata_bytes = self._metadata.tell()
        self.added += len(vectors)
        self.chunks += 1
        if self.progress is not None:
            self.progress(self.added, self.total)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handle in (self._features, self._metadata):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()

    @property
    def metadata_bytes(self) -> int:
        """Bytes of metadata this writer has written (the file's size, for a file it created)."""
        return self._metadata_bytes

    def _check_dim(self, dim: int) -> None:
        if self.dim is None:
            self.dim = dim
        elif dim != self.dim:
            raise TltkError(f"the store at {self.features_path.parent} holds {self.dim}-d vectors; these are {dim}-d.")


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

    return _build_atomically(Path(path).expanduser(), chunks, header, metric, overwrite, total, progress, index_rows)


def create_part(
    path: str | Path,
    chunks: Iterable[Chunk],
    header: dict[str, Any],
    shard: dict[str, Any],
    *,
    metric: str = "cosine",
    overwrite: bool = False,
    total: int = 0,
    progress: Progress | None = None,
) -> "StorePart":
    """Like ``create_store``, for one shard of an extraction: the rows and a manifest that
    says which shard they are (``shard_record``), and no index, which only the merged
    store gets. It appears at ``path`` only once complete, as a store does.
    """

    def record_shard(building: Path, manifest: dict[str, Any]) -> StorePart:
        manifest[SHARD] = shard
        write_json(building / MANIFEST, manifest)
        return StorePart(building, manifest)

    return _build_atomically(Path(path).expanduser(), chunks, header, metric, overwrite, total, progress, record_shard)


Built = TypeVar("Built", "FeatureStore", "StorePart")


def _build_atomically(path: Path, chunks: Iterable[Chunk], header: dict[str, Any], metric: str, overwrite: bool,
                      total: int, progress: Progress | None, finish: Callable[[Path, dict[str, Any]], Built]) -> Built:
    """Write the rows and manifest in a hidden sibling of ``path``, let ``finish`` complete
    it there (index, manifest), and rename it into place; on any failure remove it."""
    check_metric(metric)
    check_store_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
    building.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a store is an ordinary directory
    try:
        writer = RowWriter(building / FEATURES, building / METADATA, progress=progress, total=total)
        try:
            for vectors, rows in chunks:
                writer.append(vectors, rows)
        finally:
            writer.close()
        if writer.added == 0:
            raise TltkError("no images to extract features from; check the --data spec and --split.")
        now = _now()
        manifest = {
            "format": STORE_FORMAT,
            "tltk_version": _tltk_version(),
            **header,
            "dim": writer.dim,
            "metric": metric,
            "count": writer.added,
            "dtype": "float32",
            "metadata_bytes": writer.metadata_bytes,
            "created": now,
            "updated": now,
        }
        built = finish(building, manifest)
        _move_into_place(building, path)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    built.path = path
    return built


def check_store_target(path: Path, overwrite: bool) -> None:
    """``path`` may become a store: it is new, empty, or a store the user asked to replace."""
    if path.exists() and not path.is_dir():
        raise TltkError(f"--out {path} is a file; name a directory for the feature store.")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if is_store(path) or (path / FEATURES).exists():
        if not overwrite:
            raise TltkError(
                f"{path} already holds a feature store; pass --overwrite to replace it, or add images "
                f"with `tltk index {path} --add --data SPEC`."
            )
        return
    raise TltkError(f"{path} is a directory with other files in it, not a feature store; name a new or empty directory.")


def _move_into_place(building: Path, path: Path) -> None:
    """Rename the finished store onto ``path``; an old store there goes only once the new one is in."""
    if not path.exists():
        os.replace(building, path)
        return
    if not any(path.iterdir()):
        path.rmdir()
        os.replace(building, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, old / "store")
    os.replace(building, path)
    shutil.rmtree(old, ignore_errors=True)


# --- reading --------------------------------------------------------------------------


class ManifestFields:
    """What a manifest says about the vectors, for a finished store and a shard's part alike."""

    manifest: dict[str, Any]

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def metric(self) -> str:
        return str(self.manifest["metric"])

    @property
    def layer(self) -> str:
        return str(self.manifest.get("layer", ""))

    @property
    def pool(self) -> str:
        return str(self.manifest.get("pool", ""))


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
        less than its rounding, so an exact index is exact only after this step.
        """
        queries = self._queries(vectors)
        k = min(k, self.count)
        _, candidates = self.index.search(queries, min(self.count, k + rerank_extra(k)))
        return rerank(self.features(), vectors, candidates, k, self.metric)

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
        atomic_write(self.path / METADATA, lambda tmp: _concatenate(self.path / METADATA, int(self.manifest["metadata_bytes"]), part, tmp))
        add_rows(self.index, open_features(self.path, count, self.dim), self.metric, self.count)
        known = self.class_names
        self.manifest.update(
            count=count, metadata_bytes=metadata_bytes, updated=_now(),
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
            atomic_write(source, lambda tmp: _concatenate(source, metadata_bytes, None, tmp))

    def _save(self) -> None:
        import faiss

        atomic_write(self.path / INDEX, lambda tmp: faiss.write_index(self.index, str(tmp)))
        write_json(self.path / MANIFEST, self.manifest)


@dataclass
class RecallProbe:
    """A copy of the store's index without a sample of its rows, and those rows' exact
    neighbours among the rest: recall measured on queries the index has not seen.

    Stored vectors searched in their own index are flattering queries (a graph index
    walks straight to the query's own node, whose links are its nearest neighbours): on
    100,000 clustered vectors, an HNSW setting scoring 0.979 that way scored 0.938 on new
    queries. Holding the sample out costs one more pass of adding vectors.
    """

    index: Any
    kept: np.ndarray
    sample: np.ndarray
    queries: np.ndarray
    truth: np.ndarray
    features: np.ndarray
    metric: str

    @property
    def k(self) -> int:
        return int(self.truth.shape[1])

    def recall(self, params: dict[str, int]) -> float:
        """Recall@k of the index copy at search setting ``params``, candidates re-ranked as in ``search``."""
        apply_search_params(self.index, params)
        _, ids = self.index.search(prepare_vectors(self.queries, self.metric), min(len(self.kept), self.k + rerank_extra(self.k)))
        candidates = np.where(ids >= 0, self.kept[np.maximum(ids, 0)], -1)
        found = rerank(self.features, self.queries, candidates, self.k, self.metric)[1]
        return recall_at_k(found, self.truth)


def _concatenate(first: Path, first_bytes: int, second: Path | None, out: Path) -> None:
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
    manifest = _load_manifest(path)
    if SHARD in manifest:
        raise TltkError(f"{path} is {_shard_words(manifest[SHARD])} of a sharded extraction, not a searchable store; "
                        f"merge all its parts first with `tltk index merge PART... --out STORE`.")
    _check_manifest_fields(manifest, path)
    return manifest


def _load_manifest(path: Path) -> dict[str, Any]:
    """``manifest.json`` as a JSON object of this tltk's store format, or one sentence on why not."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise TltkError(f"{path / MANIFEST} is not valid JSON ({exc}); the store is damaged, extract it again.") from exc
    if not isinstance(manifest, dict):
        raise TltkError(f"{path / MANIFEST} holds no JSON object; the store is damaged, extract it again.")
    if manifest.get("format") != STORE_FORMAT:
        raise TltkError(f"{path} is a feature store of format {printable(str(manifest.get('format')))}; "
                        f"this tltk reads format {STORE_FORMAT}, extract it again.")
    return manifest


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_index_record(value: Any) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("type"), str)
            and isinstance(value.get("params", {}), dict) and isinstance(value.get("recall"), (dict, type(None))))


# What every reader of a manifest relies on; a hand-edited or damaged file is refused up front.
_MANIFEST_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "count": (_is_count, "a row count"),
    "dim": (lambda v: _is_count(v) and v > 0, "a positive vector length"),
    "metric": (lambda v: v in ("cosine", "l2"), "cosine or l2"),
    "layer": (lambda v: isinstance(v, str), "a layer name"),
    "pool": (lambda v: isinstance(v, str), "a pooling name"),
    "class_names": (_is_str_list, "a list of class names"),
    "source": (lambda v: isinstance(v, dict) and isinstance(v.get("fingerprint"), str), "a source record with a fingerprint"),
    "index": (_is_index_record, "an index record"),
    "data": (lambda v: isinstance(v, list) and all(isinstance(d, dict) for d in v), "a list of data records"),
    "metadata_bytes": (_is_count, "a byte count"),
}


def _check_manifest_fields(manifest: dict[str, Any], path: Path) -> None:
    for key, (valid, meaning) in _MANIFEST_FIELDS.items():
        if key not in manifest or not valid(manifest[key]):
            shown = printable(json.dumps(manifest.get(key)))[:60]
            raise TltkError(f"{path / MANIFEST} has {key} = {shown}, not {meaning}; the store is damaged, extract it again.")


def read_index(path: Path, manifest: dict[str, Any]) -> Any:
    """The FAISS index with the search settings (nprobe, efSearch) that ``manifest`` records."""
    import faiss

    if not (path / INDEX).is_file():
        raise TltkError(f"{path} has no {INDEX}; rebuild it with `tltk index {path} --rebuild`.")
    index = faiss.read_index(str(path / INDEX))
    params = manifest["index"].get("params", {})
    apply_search_params(index, params)
    return index


def is_store(path: str | Path) -> bool:
    return (Path(path).expanduser() / MANIFEST).is_file()


def open_features(path: Path, count: int, dim: int) -> np.ndarray:
    expected = count * dim * 4
    size = (path / FEATURES).stat().st_size if (path / FEATURES).exists() else -1
    if size < expected:
        raise TltkError(f"{path / FEATURES} holds {max(size, 0)} bytes but the manifest needs {expected}; the store is damaged, extract it again.")
    return np.memmap(path / FEATURES, dtype=np.float32, mode="r", shape=(count, dim))


def read_metadata(path: Path, count: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with open(path / METADATA, encoding="utf-8") as handle:
        for line in handle:
            if len(rows) == count:
                break
            rows.append(json.loads(line))
    if len(rows) != count:
        raise TltkError(f"{path / METADATA} has {len(rows)} rows but the manifest {count}; the store is damaged, extract it again.")
    return rows


# --- shards ---------------------------------------------------------------------------
#
# ``tltk extract --shard I/N`` writes part I of N: a directory laid out like a store, whose
# manifest says which rows of the whole extraction it holds and fingerprints the recipe
# that made them, and which has no index. ``merge_parts`` checks that the parts belong
# together and are all there, and streams them in shard order into ``create_store``, so the
# merged store is the one a single extraction writes: same rows, same bytes, same manifest
# (times aside), its index built and tuned by the same code.

# What ``_build_atomically`` and the index add to a header; the rest of a part's manifest is the header.
_WRITTEN_BY_STORE = ("format", "tltk_version", "dim", "metric", "count", "dtype", "metadata_bytes", "created", "updated",
                     "index", SHARD)

# How a person names each field of a shard recipe when two parts disagree on it.
_RECIPE_WORDS = {"extraction": "model, layer, pooling, metric or data", "of": "shard count", "total": "image count",
                 "batch_size": "--batch-size", "index": "index settings", "tltk_version": "tltk version"}


def shard_record(index: int, of: int, rows: range, total: int, recipe: dict[str, Any]) -> dict[str, Any]:
    """What a part's manifest says about it: shard ``index`` of ``of``, holding ``rows`` of
    ``total``, made by ``recipe``, which must be equal for all parts of one extraction and
    whose ``index`` entry holds the ``IndexOptions`` fields the merged store is indexed with."""
    recipe = {**recipe, "of": of, "total": total}
    fingerprint = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()
    return {"index": index, "of": of, "rows": [rows.start, rows.stop], "total": total, "fingerprint": fingerprint,
            "recipe": recipe}


@dataclass
class StorePart(ManifestFields):
    """One part of a sharded extraction: its rows, vectors and metadata, and no index.

    It is not a store to search: neighbours among a fraction of the images would look
    plausible and be wrong, so ``FeatureStore.open`` refuses it and ``merge_parts`` joins
    all the parts into one store.
    """

    path: Path
    manifest: dict[str, Any]

    @property
    def shard(self) -> dict[str, Any]:
        return dict(self.manifest[SHARD])

    @property
    def index(self) -> int:
        return int(self.shard["index"])

    @property
    def of(self) -> int:
        return int(self.shard["of"])

    @property
    def rows(self) -> tuple[int, int]:
        start, stop = self.shard["rows"]
        return int(start), int(stop)

    @property
    def total(self) -> int:
        return int(self.shard["total"])

    @property
    def fingerprint(self) -> str:
        return str(self.shard["fingerprint"])

    @property
    def name(self) -> str:
        return f"{self.path} (shard {self.index}/{self.of})"

    def features(self) -> np.ndarray:
        return open_features(self.path, self.count, self.dim)

    def metadata_rows(self) -> Iterator[dict[str, Any]]:
        """The part's metadata rows one at a time, so merging holds one chunk of them."""
        read = 0
        with open(self.path / METADATA, encoding="utf-8") as handle:
            for line in handle:
                if read == self.count:
                    return
                read += 1
                yield json.loads(line)
        if read < self.count:
            raise TltkError(f"{self.path / METADATA} has {read} rows but the manifest {self.count}; "
                            f"the part is damaged, run shard {self.index}/{self.of} again.")

    def summary(self) -> dict[str, Any]:
        """What ``tltk extract --shard`` prints with --json."""
        return {"part": str(self.path), "shard": [self.index, self.of], "rows": list(self.rows), "total": self.total,
                "count": self.count, "dim": self.dim, "layer": self.layer, "pool": self.pool, "metric": self.metric,
                "fingerprint": self.fingerprint[:16]}


def open_part(path: str | Path) -> StorePart:
    """A finished part of a sharded extraction, or one sentence on what ``path`` is instead."""
    path = Path(path).expanduser()
    if not path.exists():
        raise TltkError(_missing_part(path))
    if not (path / MANIFEST).is_file():
        if (path / FEATURES).exists():
            raise TltkError(f"{path} holds an extraction that never finished (rows but no {MANIFEST}: it was "
                            f"interrupted); run its `tltk extract ... --shard I/N` again.")
        raise TltkError(f"{path} is not a part of a sharded extraction (no {MANIFEST}); pass the --out directories "
                        f"of `tltk extract ... --shard I/N`.")
    manifest = _load_manifest(path)
    if SHARD not in manifest:
        raise TltkError(f"{path} is a complete feature store, not a part of one; `tltk index merge` joins the parts "
                        f"that `tltk extract ... --shard I/N` writes.")
    _check_part_manifest(manifest, path)
    part = StorePart(path, manifest)
    _check_part_files(part)
    return part


def _missing_part(path: Path) -> str:
    unfinished = sorted(path.parent.glob(f".{path.name}.building-*")) if path.parent.is_dir() else []
    if unfinished:
        return (f"part {path} does not exist: its extraction was interrupted ({unfinished[0].name} beside it is what "
                f"it left); run that `tltk extract ... --shard I/N` again.")
    return f"part {path} does not exist; pass the --out directory of each `tltk extract ... --shard I/N`."


def _check_part_manifest(manifest: dict[str, Any], path: Path) -> None:
    for key, (valid, meaning) in _MANIFEST_FIELDS.items():
        if key != "index" and (key not in manifest or not valid(manifest[key])):
            shown = printable(json.dumps(manifest.get(key)))[:60]
            raise TltkError(f"{path / MANIFEST} has {key} = {shown}, not {meaning}; the part is damaged, extract it again.")
    record = manifest[SHARD]
    rows = record.get("rows") if isinstance(record, dict) else None
    valid = (isinstance(record, dict) and all(_is_count(record.get(k)) for k in ("index", "of", "total"))
             and record["index"] < record["of"] and isinstance(rows, list) and len(rows) == 2
             and all(_is_count(r) for r in rows) and rows[0] <= rows[1] <= record["total"]
             and isinstance(record.get("fingerprint"), str) and isinstance(record.get("recipe"), dict)
             and isinstance(record["recipe"].get("index"), dict))
    if not valid:
        raise TltkError(f"{path / MANIFEST} has a damaged shard record ({printable(json.dumps(record))[:60]}); "
                        f"extract that part again.")


def _check_part_files(part: StorePart) -> None:
    """A part's files hold what its manifest promises (they are renamed into place only whole,
    so a shortfall means damage after the fact)."""
    start, stop = part.rows
    if part.count != stop - start:
        raise TltkError(f"{part.name} says it holds rows {start}-{stop - 1} but counts {part.count}; "
                        f"the part is damaged, extract it again.")
    features = (part.path / FEATURES).stat().st_size if (part.path / FEATURES).is_file() else 0
    metadata = (part.path / METADATA).stat().st_size if (part.path / METADATA).is_file() else 0
    if features < part.count * part.dim * 4 or metadata < int(part.manifest["metadata_bytes"]):
        raise TltkError(f"{part.name} is incomplete ({FEATURES} or {METADATA} is shorter than its manifest says); "
                        f"run that shard again.")


def _shard_words(record: Any) -> str:
    """'shard 1 of 3 (rows 600-1199 of 1797)', or as much of it as a damaged record allows."""
    try:
        start, stop = record["rows"]
        return f"shard {int(record['index'])} of {int(record['of'])} (rows {int(start)}-{int(stop) - 1} of {int(record['total'])})"
    except (KeyError, TypeError, ValueError):
        return "one shard"


def merge_parts(parts: Sequence[str | Path], out: str | Path, *, overwrite: bool = False,
                progress: Progress | None = None) -> "FeatureStore":
    """The store a single extraction would have written, from all the parts of a sharded one.

    The parts may come in any order. Parts of different extractions, a shard given twice
    or missing, anything that is not a finished part, and an existing ``out`` (unless
    ``overwrite``) are refused before anything is written; the store appears at ``out``
    only once whole, as ``create_store`` builds it.
    """
    if not parts:
        raise TltkError("name the parts to merge: `tltk index merge PART... --out STORE`.")
    ordered = parts_in_shard_order([open_part(p) for p in parts])
    target = Path(out).expanduser()
    _check_merge_target(target, ordered, overwrite)
    first = ordered[0]
    header = {key: value for key, value in first.manifest.items() if key not in _WRITTEN_BY_STORE}
    options = IndexOptions(**first.shard["recipe"]["index"])
    return create_store(target, _part_chunks(ordered), header, metric=first.metric, index=options, overwrite=overwrite,
                        total=first.total, progress=progress)


def parts_in_shard_order(parts: Sequence[StorePart]) -> list[StorePart]:
    """``parts`` sorted by shard, once each checked to be all N parts of one extraction."""
    first = parts[0]
    for part in parts[1:]:
        if part.fingerprint != first.fingerprint:
            raise TltkError(f"{first.name} and {part.name} are parts of different extractions "
                            f"({_recipe_difference(first, part)}); merge the parts of one `tltk extract ... --shard I/N` command.")
    by_index: dict[int, StorePart] = {}
    for part in parts:
        if part.index in by_index:
            raise TltkError(f"shard {part.index}/{part.of} is given twice ({by_index[part.index].path} and {part.path}); "
                            f"name each part once.")
        by_index[part.index] = part
    missing = [f"{i}/{first.of}" for i in range(first.of) if i not in by_index]
    if missing:
        raise TltkError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} {'are' if len(missing) > 1 else 'is'} "
                        f"missing; the merge needs all {first.of} parts of the extraction.")
    ordered = [by_index[i] for i in range(first.of)]
    _check_rows_join_up(ordered)
    return ordered


def _recipe_difference(a: StorePart, b: StorePart) -> str:
    recipe_a, recipe_b = a.shard["recipe"], b.shard["recipe"]
    for key in sorted(set(recipe_a) | set(recipe_b), key=lambda k: list(_RECIPE_WORDS).index(k) if k in _RECIPE_WORDS else 99):
        if recipe_a.get(key) != recipe_b.get(key):
            words = _RECIPE_WORDS.get(key, key)
            if key in ("extraction", "index"):
                return f"their {words} differ"
            return f"their {words} differs: {recipe_a.get(key)} and {recipe_b.get(key)}"
    return "their recipes differ"


def _check_rows_join_up(ordered: Sequence[StorePart]) -> None:
    """Shard by shard, each part's rows begin where the last one's ended, and the last ends at the total."""
    end = 0
    for part in ordered:
        start, stop = part.rows
        if start != end:
            raise TltkError(f"{part.name} holds rows from {start}, but the shards before it end at row {end}; "
                            f"the parts are damaged, extract them again.")
        end = stop
    if end != ordered[0].total:
        raise TltkError(f"the {len(ordered)} parts hold rows up to {end} of {ordered[0].total}; the parts are damaged, extract them again.")


def _check_merge_target(target: Path, parts: Sequence[StorePart], overwrite: bool) -> None:
    for part in parts:
        if target.resolve() == part.path.resolve():
            raise TltkError(f"--out {target} is one of the parts being merged; name a new directory for the store.")
    if is_store(target) and not overwrite:
        raise TltkError(f"--out {target} already holds a feature store; pass --overwrite to replace it, or name a new directory.")
    check_store_target(target, overwrite)


def _part_chunks(parts: Sequence[StorePart]) -> Iterator[Chunk]:
    """Each part's vectors and metadata rows, a bounded chunk at a time, in shard order."""
    for part in parts:
        features = part.features()
        rows = part.metadata_rows()
        step = chunk_rows(part.dim)
        for begin in range(0, part.count, step):
            vectors = features[begin:begin + step]
            yield vectors, [next(rows) for _ in range(len(vectors))]


# --- FAISS ----------------------------------------------------------------------------


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
    index.train(prepare_vectors(features[rows], metric))


def add_rows(index: Any, features: np.ndarray, metric: str, start: int) -> None:
    """Add rows ``start:`` of ``features`` to ``index``, a bounded chunk at a time."""
    step = chunk_rows(features.shape[1])
    for begin in range(start, len(features), step):
        index.add(prepare_vectors(features[begin:begin + step], metric))


def chunk_rows(dim: int) -> int:
    return max(1, CHUNK_BYTES // (4 * dim))


def prepare_vectors(vectors: np.ndarray, metric: str) -> np.ndarray:
    """A float32 C-contiguous copy, L2-normalised for cosine (inner product of unit vectors)."""
    import faiss

    prepared = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if prepared.ndim == 1:
        prepared = prepared[None, :]
    if metric == "cosine":
        faiss.normalize_L2(prepared)
    return prepared


def exact_knn(features: np.ndarray, queries: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k of prepared ``queries`` over stored ``features``, a chunk at a time.

    Returns FAISS scores (inner products for cosine, squared L2 for l2) and row numbers,
    best first; memory stays at one chunk of rows plus the (queries x k) results.
    """
    import faiss

    k = min(k, len(features))
    heap = faiss.ResultHeap(len(queries), k, keep_max=metric == "cosine")
    step = chunk_rows(features.shape[1])
    for begin in range(0, len(features), step):
        block = prepare_vectors(features[begin:begin + step], metric)
        scores, rows = faiss.knn(queries, block, min(k, len(block)), metric=faiss_metric_of(metric))
        heap.add_result(scores, rows + begin)
    heap.finalize()
    return heap.D, heap.I


def rerank_extra(k: int) -> int:
    """How many more candidates than ``k`` to rank exactly: rounding only swaps near-ties."""
    return max(k, 10)


def rerank(features: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int, metric: str,
           block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(distances, rows) of the best ``k`` of each query's ``candidates``, by float64 distances."""
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    distances = np.full((len(queries), k), np.inf, dtype=np.float32)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    for begin in range(0, len(queries), block):
        cand = candidates[begin:begin + block]
        valid = cand >= 0
        vectors = np.asarray(features[np.where(valid, cand, 0).ravel()], dtype=np.float32).reshape(*cand.shape, -1)
        query = queries[begin:begin + block]
        dots = np.einsum("qcd,qd->qc", vectors, query, dtype=np.float64)
        vector_norms = np.einsum("qcd,qcd->qc", vectors, vectors, dtype=np.float64)
        query_norms = np.einsum("qd,qd->q", query, query, dtype=np.float64)[:, None]
        if metric == "cosine":
            exact = 1.0 - dots / np.maximum(np.sqrt(vector_norms * query_norms), 1e-30)
        else:  # in float64 the expansion of |v - q|^2 loses nothing that matters
            exact = np.sqrt(np.maximum(vector_norms + query_norms - 2.0 * dots, 0.0))
        exact[~valid] = np.inf
        order = np.argsort(exact, axis=1, kind="stable")[:, :k]
        best = np.take_along_axis(exact, order, axis=1)
        found = np.take_along_axis(cand, order, axis=1)
        found[~np.isfinite(best)] = -1
        distances[begin:begin + block, :order.shape[1]] = best
        rows[begin:begin + block, :order.shape[1]] = found
    return distances, rows


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


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _tltk_version() -> str:
    from tltk import __version__

    return __version__


def iter_chunks(features: np.ndarray, rows: Sequence[dict[str, Any]], size: int) -> Iterator[Chunk]:
    """(vectors, metadata) chunks of in-memory arrays, for stores built from vectors directly."""
    for begin in range(0, len(features), size):
        yield features[begin:begin + size], rows[begin:begin + size]


__all__ = [
    "AUTO_THRESHOLD",
    "FeatureStore",
    "INDEX_TYPES",
    "IndexOptions",
    "METRICS",
    "RecallReport",
    "RowWriter",
    "StorePart",
    "create_part",
    "create_store",
    "exact_knn",
    "is_store",
    "iter_chunks",
    "merge_parts",
    "open_part",
    "parts_in_shard_order",
    "recall_at_k",
    "shard_record",
]
