"""A feature store's directory as files, and its manifest as checked data.

A store is a directory::

    features.f32     raw float32 rows, count x dim, written chunk by chunk as they are computed
    metadata.jsonl   one JSON object per row: id, path, labels, split, ...
    index.faiss      the FAISS index (exact or approximate) over the rows
    manifest.json    what made the vectors (model fingerprint, layer, pooling), the metric,
                     the index type and its search settings, counts, tltk version

A part of a sharded extraction has the same files but the index, and a manifest with a
``shard`` record. What both kinds of directory share lives here, so that the store
(``store.py``), its parts (``shards.py``) and the code that writes them (``writing.py``)
each depend on this module rather than on one another.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import numpy as np

from tltk.errors import TltkError, printable

MANIFEST = "manifest.json"
FEATURES = "features.f32"
METADATA = "metadata.jsonl"
INDEX = "index.faiss"
METADATA_PART = ".metadata.jsonl.part"
SHARD = "shard"  # the manifest key that makes a directory one part of a sharded extraction
STORE_FORMAT = 1
Chunk = tuple[np.ndarray, Sequence[dict[str, Any]]]
Progress = Callable[[int, int], None]


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


def load_manifest(path: Path, data: bytes | None = None) -> dict[str, Any]:
    """``manifest.json`` (or its bytes, already read) as a JSON object of this tltk's store
    format, or one sentence on why not."""
    try:
        manifest = json.loads((path / MANIFEST).read_bytes().decode("utf-8") if data is None else data.decode("utf-8"))
    except ValueError as exc:
        raise TltkError(f"{path / MANIFEST} is not valid JSON ({exc}); the store is damaged, extract it again.") from exc
    if not isinstance(manifest, dict):
        raise TltkError(f"{path / MANIFEST} holds no JSON object; the store is damaged, extract it again.")
    if manifest.get("format") != STORE_FORMAT:
        raise TltkError(f"{path} is a feature store of format {printable(str(manifest.get('format')))}; "
                        f"this tltk reads format {STORE_FORMAT}, extract it again.")
    return manifest


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_index_record(value: Any) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("type"), str)
            and isinstance(value.get("params", {}), dict) and isinstance(value.get("recall"), (dict, type(None))))


# What every reader of a manifest relies on; a hand-edited or damaged file is refused up front.
MANIFEST_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "count": (is_count, "a row count"),
    "dim": (lambda v: is_count(v) and v > 0, "a positive vector length"),
    "metric": (lambda v: v in ("cosine", "l2"), "cosine or l2"),
    "layer": (lambda v: isinstance(v, str), "a layer name"),
    "pool": (lambda v: isinstance(v, str), "a pooling name"),
    "class_names": (_is_str_list, "a list of class names"),
    "source": (lambda v: isinstance(v, dict) and isinstance(v.get("fingerprint"), str), "a source record with a fingerprint"),
    "index": (_is_index_record, "an index record"),
    "data": (lambda v: isinstance(v, list) and all(isinstance(d, dict) for d in v), "a list of data records"),
    "metadata_bytes": (is_count, "a byte count"),
}


def check_manifest_fields(manifest: dict[str, Any], path: Path) -> None:
    for key, (valid, meaning) in MANIFEST_FIELDS.items():
        if key not in manifest or not valid(manifest[key]):
            shown = printable(json.dumps(manifest.get(key)))[:60]
            raise TltkError(f"{path / MANIFEST} has {key} = {shown}, not {meaning}; the store is damaged, extract it again.")


def is_store(path: str | Path) -> bool:
    return (Path(path).expanduser() / MANIFEST).is_file()


def open_features(path: Path, count: int, dim: int, handle: BinaryIO | None = None) -> np.ndarray:
    """The ``count`` x ``dim`` rows, memory-mapped read-only from the file (or from ``handle``,
    the file as it was when a store was opened, whatever has been renamed over it since)."""
    expected = count * dim * 4
    if handle is not None:
        size = os.fstat(handle.fileno()).st_size
    else:
        size = (path / FEATURES).stat().st_size if (path / FEATURES).exists() else -1
    if size < expected:
        raise TltkError(f"{path / FEATURES} holds {max(size, 0)} bytes but the manifest needs {expected}; the store is damaged, extract it again.")
    if expected == 0:
        return np.empty((0, dim), dtype=np.float32)
    return np.memmap(handle if handle is not None else path / FEATURES, dtype=np.float32, mode="r", shape=(count, dim))


def read_metadata(path: Path, count: int, handle: BinaryIO | None = None) -> list[dict[str, Any]]:
    """The first ``count`` rows of ``metadata.jsonl`` (read from ``handle`` where given)."""
    rows: list[dict[str, Any]] = []
    source = handle if handle is not None else open(path / METADATA, "rb")
    try:
        source.seek(0)
        for line in source:
            if len(rows) == count:
                break
            rows.append(json.loads(line))
    finally:
        if handle is None:
            source.close()
    if len(rows) != count:
        raise TltkError(f"{path / METADATA} has {len(rows)} rows but the manifest {count}; the store is damaged, extract it again.")
    return rows


def shard_words(record: Any) -> str:
    """'shard 1 of 3 (rows 600-1199 of 1797)', or as much of it as a damaged record allows."""
    try:
        start, stop = record["rows"]
        return f"shard {int(record['index'])} of {int(record['of'])} (rows {int(start)}-{int(stop) - 1} of {int(record['total'])})"
    except (KeyError, TypeError, ValueError):
        return "one shard"
