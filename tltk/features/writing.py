"""Writing a store's rows: a new store or part is built whole in a hidden sibling
directory and renamed into place.

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
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence, TypeVar

import numpy as np

from tltk.errors import TltkError
from tltk.features.faiss_index import check_metric
from tltk.features.manifest import FEATURES, METADATA, STORE_FORMAT, Chunk, Progress, is_store


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


class Placed(Protocol):
    """What ``build_atomically`` finishes: a store or a part, told its final path once it is there."""

    path: Path


Built = TypeVar("Built", bound=Placed)


def build_atomically(path: Path, chunks: Iterable[Chunk], header: dict[str, Any], metric: str, overwrite: bool,
                      total: int, progress: Progress | None, finish: Callable[[Path, dict[str, Any]], Built]) -> Built:
    """Write the rows and manifest in a hidden sibling of ``path``, let ``finish`` complete
    it there (index, manifest), and rename it into place; on any failure remove it."""
    check_metric(metric)
    check_store_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_builds(path)
    building = Path(tempfile.mkdtemp(prefix=f"{_building_prefix(path)}{_owner(os.getpid())}-", dir=path.parent))
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
        now = timestamp()
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


def _building_prefix(path: Path) -> str:
    return f".{path.name}.building-"


def _owner(pid: int) -> str:
    """Which process builds a directory, as its name records it: host and process id."""
    return f"{socket.gethostname()}-{pid}"


def remove_abandoned_builds(path: Path) -> None:
    """Delete the hidden building directories of ``path`` left by killed processes of this host.

    A build that is killed (SIGKILL, power cut) cannot remove its own directory, and a
    store re-extracted after many kills would otherwise pile them up beside it. A directory
    is abandoned when the process its name records is gone; one of a live process (a
    concurrent build) or of another host (a shared file system) is left alone.
    """
    prefix = _building_prefix(path)
    for candidate in path.parent.glob(f"{glob.escape(prefix)}*"):
        owner = candidate.name[len(prefix):].rsplit("-", 1)[0]
        pid = owner.rpartition("-")[2]
        if candidate.is_dir() and pid.isdigit() and owner == _owner(int(pid)) and not _alive(int(pid)):
            shutil.rmtree(candidate, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _tltk_version() -> str:
    from tltk import __version__

    return __version__


def iter_chunks(features: np.ndarray, rows: Sequence[dict[str, Any]], size: int) -> Iterator[Chunk]:
    """(vectors, metadata) chunks of in-memory arrays, for stores built from vectors directly."""
    for begin in range(0, len(features), size):
        yield features[begin:begin + size], rows[begin:begin + size]
