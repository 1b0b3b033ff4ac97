"""Writing a store's rows: a new store or part is built whole in a hidden sibling
directory and renamed into place.

Rows stream to disk as they are computed, so building a store holds one chunk of vectors
in memory however many images there are (the FAISS index is built afterwards from the
file, a bounded chunk at a time; an exact index then holds the vectors in memory, as
searching them needs).

Nothing is ever half-written where a reader looks. A new store is built in a hidden
sibling directory and renamed into place once complete. A finished store changes only as
a whole new version (``replace_version``): a hidden sibling holding hard links to its
files, in which the changed files (``manifest.json``, ``index.faiss``, ``metadata.jsonl``)
are written whole, swapped with the store in one rename. A reader that opened the store
keeps the files of the version it opened, so it answers from one version, never a mix.
``features.f32`` is the one file appended in place, since copying gigabytes to add a few
rows would be absurd; every version's manifest says how many of its rows are committed,
and bytes past them (from an append that died) are cut off before the next one.

Only one command writes a store at a time: ``build_atomically`` and the store's own
writes hold its lock (``tltk.locking``). A full disk removes what the write had begun
and leaves the store as it was, with a ``DiskError`` naming the file and the space needed.
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
from tltk.fileio import disk_errors, replace_directory
from tltk.locking import hold


class RowWriter:
    """Appends rows (vectors and their metadata) to two files, one chunk at a time.

    Each chunk is flushed before ``append`` returns, so the caller's next chunk is computed
    only after the last one left memory for the file.
    """

    def __init__(self, features_path: Path, metadata_path: Path, dim: int | None = None, *,
                 progress: Progress | None = None, total: int = 0, store: Path | None = None) -> None:
        self.features_path = features_path
        # Messages name the store's own files, not the hidden directory a new store is built in.
        self.shown = store if store is not None else features_path.parent
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
        data = vectors.tobytes()
        with disk_errors(self.shown / FEATURES, len(data)):
            self._features.write(data)
            self._features.flush()
        text = "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")
        with disk_errors(self.shown / METADATA, len(text)):
            self._metadata.write(text)
            self._metadata.flush()
        self._metadata_bytes = self._metadata.tell()
        self.added += len(vectors)
        self.chunks += 1
        if self.progress is not None:
            self.progress(self.added, self.total)

    def close(self) -> None:
        """Flush both files to disk and close them."""
        if self._closed:
            return
        self._closed = True
        try:
            for name, handle in ((FEATURES, self._features), (METADATA, self._metadata)):
                with disk_errors(self.shown / name):
                    handle.flush()
                    os.fsync(handle.fileno())
        finally:
            self.abort()

    def abort(self) -> None:
        """Close both files without caring what reaches the disk: the caller is discarding the rows."""
        self._closed = True
        for handle in (self._features, self._metadata):
            try:
                handle.close()
            except OSError:
                pass  # a full disk refusing the buffered rest; they are being thrown away

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
                      total: int, progress: Progress | None, finish: Callable[[Path, dict[str, Any]], Built],
                      wait: bool = False) -> Built:
    """Write the rows and manifest in a hidden sibling of ``path``, let ``finish`` complete
    it there (index, manifest), and rename it into place; on any failure remove it.

    The store's lock is held throughout: another command writing ``path`` is refused by
    name, or waited for with ``wait``.
    """
    check_metric(metric)
    with hold(path, wait=wait, what="feature store"):
        return _build(path, chunks, header, metric, overwrite, total, progress, finish)


def _build(path: Path, chunks: Iterable[Chunk], header: dict[str, Any], metric: str, overwrite: bool,
           total: int, progress: Progress | None, finish: Callable[[Path, dict[str, Any]], Built]) -> Built:
    check_store_target(path, overwrite)
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned_builds(path)
        building = Path(tempfile.mkdtemp(prefix=f"{_building_prefix(path)}{_owner(os.getpid())}-", dir=path.parent))
    building.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a store is an ordinary directory
    try:
        writer = RowWriter(building / FEATURES, building / METADATA, progress=progress, total=total, store=path)
        try:
            for vectors, rows in chunks:
                writer.append(vectors, rows)
        except BaseException:
            writer.abort()
            raise
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
        with disk_errors(path):
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
    old = replace_directory(building, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def replace_version(path: Path, write: Callable[[Path], None]) -> None:
    """Change the finished store at ``path`` as one new version.

    A hidden sibling gets hard links to the store's files (so ``features.f32`` is shared,
    not copied), ``write(sibling)`` replaces there the files that change, and the sibling is
    swapped with ``path`` in one rename. Readers that opened the old version keep reading
    it; on any failure the sibling is removed and ``path`` is as it was.
    """
    with disk_errors(path):
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.next-", dir=path.parent))
    try:
        staging.chmod(path.stat().st_mode & 0o7777)
        for entry in sorted(path.iterdir()):
            if entry.is_file() and not entry.name.startswith("."):
                _link_or_copy(entry, staging / entry.name, path)
        write(staging)
        _fsync_directory(staging)
        old = replace_directory(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(source: Path, target: Path, store: Path) -> None:
    """A hard link where the file system has them, else a copy (which a full disk may refuse)."""
    try:
        os.link(source, target)
    except OSError:
        with disk_errors(store / source.name, source.stat().st_size, partial=target):
            shutil.copy2(source, target)


def _fsync_directory(directory: Path) -> None:
    """The new version's directory entries reach the disk before it is swapped in."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the files themselves were synced
    finally:
        os.close(fd)


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
