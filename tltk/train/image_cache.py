"""Decoded-image cache: decode the training images once, augment them as batches.

Decoding a JPEG and resizing it costs more than a small network's step on it, and a
loader does it again every epoch, in worker processes that take the cores the model
needs. Training images at the working resolution are usually small: 2,000 images at
72 x 72 are 31 MB. So they are decoded once (``BatchAugment.decode``) into one uint8
array, kept in a file under the user's cache folder whose name is a key of the images'
sources and the decoding recipe, so that the next run on the same data reads it back
instead of decoding again. The array is read into memory when it fits ``--cache-mem``,
else memory-mapped. Each batch is then gathered from it and augmented by ``BatchAugment``
in the training process, with each image's seed from the same ``EpochOrder`` a loader
would use: the batches are the uncached loader's, to the bit (``SeededAugment`` is the
same operations on one image).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: decodings in progress cannot be told from abandoned ones
    fcntl = None  # type: ignore[assignment]

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset

from tltk.data.augment import BatchAugment, SeededAugment
from tltk.data.transforms import FixedPreprocess, ImageDataset
from tltk.distributed import EpochOrder
from tltk.errors import SettingError
from tltk.train.cache import human_bytes

FORMAT_VERSION = 1
_DECODING = ".decoding-"  # the prefix of a file being decoded into, renamed when complete
_REFUSAL = "not caching the decoded training images: "
# The cache takes at most this share of the free space on its disk: it is a convenience,
# and must not fill the disk that run directories and checkpoints are written to.
DISK_SHARE = 0.5
_DECODE_CHUNK = 64


def cache_root() -> Path:
    """Where decoded images are kept between runs: ``$TLTK_CACHE/images``, else the user's cache folder."""
    base = os.environ.get("TLTK_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tltk"
    return Path(base) / "images"


# --- whether to cache ------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePlan:
    """How a training set's images would be cached; ``reason`` says why they are not."""

    augment: BatchAugment | None
    reason: str | None = None


def plan(dataset: Dataset, *, enabled: bool, distributed: bool) -> ImagePlan:
    """Cache the images of an ``ImageDataset`` whose transform has a batched form."""
    if not enabled:
        return ImagePlan(None)
    if not isinstance(dataset, ImageDataset):
        return ImagePlan(None)  # a dataset of the caller's own: nothing to say about it
    augment = batch_form(dataset.transform)
    if augment is None:
        return ImagePlan(None, _REFUSAL + f"the training transform {dataset.transform!r} has no batched form.")
    if distributed:
        return ImagePlan(None, _REFUSAL + "data-parallel training reads its images with loaders.")
    return ImagePlan(augment)


def batch_form(transform: Any) -> BatchAugment | None:
    """The batched operations a per-image transform stands for, where it has them."""
    if isinstance(transform, SeededAugment):
        return transform.batch
    if isinstance(transform, FixedPreprocess):
        return BatchAugment((transform.size[0], transform.size[1]), transform.mean_values,  # type: ignore[arg-type]
                            transform.std_values, "none")  # type: ignore[arg-type]
    return None


# --- the key ---------------------------------------------------------------------------


def cache_key(dataset: ImageDataset, augment: BatchAugment) -> str:
    """A hash of where every image's pixels come from (a file's path, size and modification
    time, or the in-memory arrays' bytes) and how they are decoded: editing, adding or
    reordering an image, or another size, gives another key."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": FORMAT_VERSION, "recipe": augment.recipe(),
                              "torchvision": torchvision.__version__}, sort_keys=True).encode())
    if dataset.arrays is not None:
        arrays = np.ascontiguousarray(dataset.arrays)
        digest.update(json.dumps([list(arrays.shape), str(arrays.dtype)]).encode())
        digest.update(hashlib.blake2b(memoryview(arrays).cast("B"), digest_size=32).digest())
    for sample in dataset.samples:
        digest.update(b"\n")
        digest.update(json.dumps(_source_identity(sample.source)).encode())
    return digest.hexdigest()[:32]


def _source_identity(source: str | int) -> list[Any]:
    if isinstance(source, (int, np.integer)):
        return ["row", int(source)]
    try:
        stat = os.stat(source)
    except OSError:
        return ["file", str(source)]
    return ["file", str(source), stat.st_size, stat.st_mtime_ns]


# --- the store -------------------------------------------------------------------------


@dataclass
class DecodedImages:
    """Every training image, decoded, as one N x 3 x h x w uint8 array; ``where`` is
    "memory" or "disk" (memory-mapped), ``reused`` whether an earlier run decoded them."""

    pixels: np.ndarray
    targets: torch.Tensor
    where: str
    reused: bool
    path: Path | None

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes)

    def describe(self, augment: BatchAugment) -> str:
        height, width = augment.stored_size
        how = "read back from an earlier run" if self.reused else "decoded once"
        where = "in memory" if self.where == "memory" else "memory-mapped on disk (more than --cache-mem)"
        return (f"decoded images: {len(self.pixels):,} training images at {height}x{width} {how}, "
                f"{human_bytes(self.nbytes)} {where}; augmented in batches in this process")


def open_images(dataset: ImageDataset, augment: BatchAugment, budget_bytes: int,
                root: Path | None = None, threads: int = 1) -> DecodedImages | str:
    """The dataset's decoded images, from an earlier run's file when there is one; else
    decoded now into a new file (or into memory alone where the disk has no room). A
    sentence saying why not when they fit neither."""
    root = root if root is not None else cache_root()
    height, width = augment.stored_size
    shape = (len(dataset), 3, height, width)
    needed = math.prod(shape)
    targets = _targets(dataset)
    path = root / f"{cache_key(dataset, augment)}.npy"
    if _readable(path, shape):
        _mark_used(path)
        return _opened(path, needed, budget_bytes, targets, reused=True)
    if needed <= _disk_room(root) * DISK_SHARE:
        _decode_to_file(dataset, augment, path, shape, threads)
        return _opened(path, needed, budget_bytes, targets, reused=False)
    if needed <= budget_bytes:
        pixels = np.empty(shape, dtype=np.uint8)
        _decode_into(pixels, dataset, augment, threads)
        return DecodedImages(pixels, targets, "memory", False, None)
    return (_REFUSAL + f"{len(dataset):,} images at {height}x{width} take {human_bytes(needed)}, more than "
            f"--cache-mem {human_bytes(budget_bytes)} and than half the {human_bytes(_disk_room(root))} free in {root}; "
            f"they are decoded every epoch.")


def _targets(dataset: ImageDataset) -> torch.Tensor:
    """The targets as a loader's batches hold them: class indices, or one float per class."""
    targets = [sample.target for sample in dataset.samples]
    if targets and isinstance(targets[0], tuple):
        return torch.tensor(targets, dtype=torch.float32)
    return torch.tensor(targets, dtype=torch.int64)


def _readable(path: Path, shape: tuple[int, ...]) -> bool:
    try:
        stored = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return stored.shape == shape and stored.dtype == np.uint8


def _opened(path: Path, needed: int, budget_bytes: int, targets: torch.Tensor, *, reused: bool) -> DecodedImages:
    if needed <= budget_bytes:
        return DecodedImages(np.load(path), targets, "memory", reused, path)
    return DecodedImages(np.load(path, mmap_mode="r"), targets, "disk", reused, path)


def _disk_room(folder: Path) -> int:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return 0


def _decode_to_file(dataset: ImageDataset, augment: BatchAugment, path: Path, shape: tuple[int, ...],
                    threads: int) -> None:
    """Decode into a temporary file beside ``path`` and rename it into place when complete:
    an interrupted run, or two runs at once, never leave a half-written cache behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(path.parent)
    handle, temporary = tempfile.mkstemp(prefix=_DECODING, suffix=".npy", dir=path.parent)
    try:
        _claim(handle)  # held until the file is complete: a killed run's file is then known abandoned
        pixels = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=shape)
        _decode_into(pixels, dataset, augment, threads)
        pixels.flush()
        del pixels
        os.replace(temporary, path)
    finally:
        os.close(handle)
        if os.path.exists(temporary):
            os.unlink(temporary)


def _decode_into(pixels: np.ndarray, dataset: ImageDataset, augment: BatchAugment, threads: int) -> None:
    """Each image decoded and resized into its row; files decode on a few threads (PIL and
    the resize let go of the interpreter lock)."""

    def chunk(start: int) -> None:
        for index in range(start, min(start + _DECODE_CHUNK, len(dataset))):
            pixels[index] = augment.decode(dataset.image_of(dataset.samples[index])).numpy()

    starts = range(0, len(dataset), _DECODE_CHUNK)
    if threads <= 1 or len(starts) <= 1:
        for start in starts:
            chunk(start)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(chunk, starts))


# --- batches ---------------------------------------------------------------------------


class DecodedBatches:
    """The training batches a loader over the images would give, from the decoded array:
    the same order (``order``, the trainer's), the same per-image seeds, the same pixels."""

    def __init__(self, images: DecodedImages, augment: BatchAugment, batch_size: int, order: EpochOrder) -> None:
        self.images = images
        self.augment = augment
        self.batch_size = batch_size
        self.order = order

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        listing = list(self.order)
        for start in range(0, len(listing), self.batch_size):
            part = listing[start:start + self.batch_size]
            if self.order.sample_seeds:
                indices, seeds = [i for i, _ in part], [s for _, s in part]
            else:
                indices, seeds = part, None
            index = np.asarray(indices, dtype=np.int64)
            stored = torch.from_numpy(np.take(self.images.pixels, index, axis=0))
            yield self.augment(stored, seeds), self.images.targets[torch.from_numpy(index)]


# --- the cache folder ------------------------------------------------------------------


@dataclass(frozen=True)
class CacheEntry:
    """One data set's decoded images in the cache folder. ``last_used``: when a run last
    decoded or read them (the file's modification time, which each reuse renews)."""

    path: Path
    bytes: int
    images: int
    height: int
    width: int
    last_used: float

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "bytes": self.bytes, "images": self.images, "height": self.height,
                "width": self.width, "last_used": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.last_used))}


@dataclass(frozen=True)
class Cleared:
    """What ``clear_cache`` removed and what it left."""

    removed: int
    removed_bytes: int
    kept: int

    def to_dict(self) -> dict[str, int]:
        return {"removed": self.removed, "removed_bytes": self.removed_bytes, "kept": self.kept}


@dataclass(frozen=True)
class CacheContents:
    """The cache folder and the image sets it holds (``cache_entries``), with their total size."""

    folder: Path
    entries: list[CacheEntry]

    @property
    def bytes(self) -> int:
        return sum(entry.bytes for entry in self.entries)

    def to_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "entries": [entry.to_dict() for entry in self.entries], "bytes": self.bytes}


def cache_contents(root: Path | None = None) -> CacheContents:
    """What ``tltk cache info`` shows: the folder (default ``cache_root()``) and its image sets."""
    root = root if root is not None else cache_root()
    return CacheContents(root, cache_entries(root))


def cache_entries(root: Path | None = None) -> list[CacheEntry]:
    """The decoded image sets kept in ``root`` (default ``cache_root()``), most recently used first.

    The cache never empties itself (a later run on the same data is what it is for), so
    this is how a user sees what it holds before clearing it."""
    root = root if root is not None else cache_root()
    entries = []
    for path in root.glob("*.npy") if root.is_dir() else ():
        try:
            stored = np.load(path, mmap_mode="r")
            stat = path.stat()
        except (OSError, ValueError):
            continue  # not one of ours, or removed meanwhile
        if stored.ndim != 4:
            continue
        entries.append(CacheEntry(path, stat.st_size, stored.shape[0], stored.shape[2], stored.shape[3], stat.st_mtime))
    return sorted(entries, key=lambda entry: entry.last_used, reverse=True)


def clear_cache(root: Path | None = None, *, older_than_days: float | None = None) -> Cleared:
    """Remove the decoded image sets not used for ``older_than_days`` (all of them when None),
    and the files of decodings whose run was killed. A run reading a removed set keeps
    reading it (the disk frees it when that run lets go); the next run decodes again."""
    if older_than_days is not None and older_than_days < 0:
        raise SettingError(f"older_than_days must be 0 or more, not {older_than_days}.", ["older_than_days"])
    root = root if root is not None else cache_root()
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    removed = removed_bytes = kept = 0
    for entry in cache_entries(root):
        if cutoff is not None and entry.last_used >= cutoff:
            kept += 1
            continue
        entry.path.unlink(missing_ok=True)
        removed += 1
        removed_bytes += entry.bytes
    abandoned, abandoned_bytes = remove_abandoned(root)
    return Cleared(removed + abandoned, removed_bytes + abandoned_bytes, kept)


def remove_abandoned(root: Path) -> tuple[int, int]:
    """Remove the half-decoded files of runs killed while decoding: (files, bytes).

    A decoding run holds a lock on its file until the file is complete and renamed; a file
    whose lock can be taken has no live writer. Without file locks nothing is removed."""
    if fcntl is None or not root.is_dir():
        return 0, 0
    count = size = 0
    for path in root.glob(f"{_DECODING}*.npy"):
        try:
            handle = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live run is decoding into it
        finally:
            os.close(handle)
        try:
            size += path.stat().st_size
            path.unlink()
            count += 1
        except OSError:
            continue
    return count, size


def _claim(handle: int) -> None:
    if fcntl is not None:
        fcntl.flock(handle, fcntl.LOCK_EX)


def _mark_used(path: Path) -> None:
    """Renew ``path``'s modification time: ``clear_cache(older_than_days=...)`` keeps what runs still read."""
    try:
        os.utime(path)
    except OSError:
        pass  # a read-only cache folder is still a cache
