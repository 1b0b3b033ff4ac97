"""Frozen-backbone feature cache: run the backbone once, train the head on what it gave.

Under ``freeze`` the backbone is a fixed function (eval mode, no gradients), so with
deterministic training transforms every epoch hands the head exactly the same inputs.
Computing them once turns a ten-epoch linear probe from ten backbone passes over the
data into one. The features stay in memory when they fit within the budget
(``--cache-mem``); otherwise they go to memory-mapped files that the operating system
pages in as batches ask for them, so a cache larger than memory still works.

The cache decides nothing about training itself: the trainer draws the same sample order
and runs the same head, optimizer and schedule either way, which is why a cached run
and an uncached one reach the same metrics (to float rounding).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from tltk.data.transforms import dataset_is_deterministic
from tltk.errors import DiskError, TltkError
from tltk.fileio import disk_errors
from tltk.model import TransferModel
from tltk.strategies import Freeze, Strategy

# ``--cache-mem auto``: this share of the memory available when training starts.
AUTO_SHARE_OF_AVAILABLE = 0.25
_FALLBACK_AVAILABLE = 4 * 2**30

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")

_REFUSAL = "not caching the frozen backbone's features: "

# Input bytes per backbone pass while extracting features. Inference keeps no activations
# for a backward pass, so it need not run at the training batch size. On one CPU thread,
# ResNet-18 at 32 px extracted about 1.1x as many images per second in passes of 256
# images (3 MiB of input) as in passes of 64 (benchmarks/bench_probe_cache.py
# --extraction); much larger passes outgrow the CPU's caches and slow down again, and at
# 64 px a batch of 64 already is 3 MiB. A pass is never smaller than one loader batch.
PASS_INPUT_BYTES = 3 * 2**20


# --- whether to cache ------------------------------------------------------------------


@dataclass(frozen=True)
class CacheDecision:
    use: bool
    reason: str | None = None  # one line for the user when caching was possible in principle but is off


def decide(
    strategy: Strategy, train_set: Dataset, *, enabled: bool, augment: str, callbacks: Sequence[Any] = ()
) -> CacheDecision:
    """Cache only what is certain to be the same every epoch: a frozen backbone's output
    on images that no random transform touches, with nobody watching the raw batches."""
    if not isinstance(strategy, Freeze) or not enabled:
        return CacheDecision(False)
    varies = _why_images_vary(train_set, augment)
    if varies:
        return CacheDecision(False, _REFUSAL + varies)
    watcher = next((c for c in callbacks if _reads_batch_images(c)), None)
    if watcher is not None:
        return CacheDecision(False, _REFUSAL + f"{type(watcher).__name__} looks at the images of every training batch.")
    return CacheDecision(True)


def _why_images_vary(dataset: Dataset, augment: str) -> str | None:
    verdict = dataset_is_deterministic(dataset)
    if verdict is True:
        return None
    if verdict is False:
        cause = f"--augment {augment} changes the training images" if augment != "none" else (
            "the training transforms are random and change the images")
        return f"{cause} every epoch, so the backbone must see each batch anew."
    return f"cannot tell whether {type(dataset).__name__} gives the same images every epoch."


def _reads_batch_images(callback: Any) -> bool:
    """A callback that overrides ``on_step_end`` is handed each batch's images; cached
    training has only features to give it."""
    from tltk.train.callbacks import Callback

    hook = getattr(type(callback), "on_step_end", None)
    return hook is not None and hook is not Callback.on_step_end


# --- how much memory it may take -------------------------------------------------------


def parse_size(text: str) -> int | None:
    """Bytes in ``text`` ("512MB", "4G", "1.5GiB", "0"); None for "auto". Units are binary."""
    if text.strip().lower() == "auto":
        return None
    match = _SIZE.match(text.lower())
    if not match or match.group(2) not in _UNITS:
        raise TltkError(f"--cache-mem '{text}' is not a size; use e.g. 512MB, 4GB, 0 (always on disk) or auto.")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def memory_budget(text: str) -> int:
    """The bytes of features to hold in memory before going to disk."""
    size = parse_size(text)
    return size if size is not None else int(available_memory() * AUTO_SHARE_OF_AVAILABLE)


def available_memory() -> int:
    """Memory the system can hand out now without swapping (Linux MemAvailable)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return _FALLBACK_AVAILABLE


def human_bytes(count: int) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


# --- the cache -------------------------------------------------------------------------


@dataclass
class CachedSplit:
    """What the head reads for each image of a split, and the images' targets, by index."""

    features: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)


class FeatureBatches:
    """Batches of a cached split in the order a loader over the images would give them.

    ``order`` is the trainer's sampler (re-drawn each epoch), or None for dataset order.
    """

    def __init__(self, split: CachedSplit, batch_size: int, order: Iterable[int] | None = None) -> None:
        self.split = split
        self.batch_size = batch_size
        self.order = order

    def __len__(self) -> int:
        count = len(self.order) if self.order is not None else len(self.split)  # type: ignore[arg-type]
        return math.ceil(count / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        count = len(self.split)
        if self.order is None:
            for start in range(0, count, self.batch_size):
                yield self.split.features[start:start + self.batch_size], self.split.targets[start:start + self.batch_size]
            return
        order = torch.as_tensor(list(self.order), dtype=torch.long)  # shorter than the split on a resumed epoch
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            yield self.split.features[index], self.split.targets[index]


class HeadOnFeatures(nn.Module):
    """The model as the cached loop sees it: the head, reading cached backbone outputs.

    Holding the whole model keeps ``train()``/``eval()`` and the frozen backbone's mode
    exactly as in uncached training.
    """

    def __init__(self, model: TransferModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.head(features)


def passes(batches: Iterable[tuple[torch.Tensor, Any]], pass_bytes: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive ``(images, targets)`` batches joined into passes of at most ``pass_bytes``
    of images, in order; a batch larger than that on its own is a pass of its own.

    Memory stays bounded by the larger of ``pass_bytes`` and one batch. Batches whose
    images differ in shape are never joined.
    """
    images: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    held = 0
    for batch_images, batch_targets in batches:
        size = batch_images.numel() * batch_images.element_size()
        if images and (held + size > pass_bytes or batch_images.shape[1:] != images[0].shape[1:]):
            yield _joined(images), _joined(targets)
            images, targets, held = [], [], 0
        images.append(batch_images)
        targets.append(torch.as_tensor(batch_targets))
        held += size
    if images:
        yield _joined(images), _joined(targets)


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def head_input(model: TransferModel, images: torch.Tensor) -> torch.Tensor:
    """What the head reads: the spatial map for a spatial head, else the feature vector."""
    spatial = model.backbone.forward_spatial(images)
    return spatial if model.uses_spatial else model.backbone.forward_vector(spatial)


class FeatureCache:
    """Backbone outputs for every split it is given, in memory or memory-mapped on disk.

    Where they live is decided once, from the first batch's size and ``total_images``,
    so the splits of one run all live in the same place. Use as a context manager: files
    on disk are removed on exit.
    """

    def __init__(
        self, total_images: int, budget_bytes: int, directory: Path | None = None, *, pass_bytes: int = PASS_INPUT_BYTES
    ) -> None:
        self.total_images = total_images
        self.budget_bytes = budget_bytes
        self.directory = directory
        self.pass_bytes = pass_bytes  # images per backbone pass while extracting, in bytes (at least one batch)
        self.where: str | None = None  # "memory" or "disk", once the first batch is seen
        self.bytes_needed = 0
        self._folder: Path | None = None
        self._files = 0

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def extract(
        self,
        model: TransferModel,
        batches: Iterable[tuple[torch.Tensor, Any]],
        count: int,
        to_device: Callable[[torch.Tensor], torch.Tensor],
        autocast: Callable[[], ContextManager[Any]],
    ) -> CachedSplit:
        """Run the backbone over ``batches`` (``count`` images, in order) and keep its outputs.

        Consecutive batches are joined into passes of up to ``pass_bytes`` of images
        (``passes``): the features are the same, computed in fewer, larger passes.
        """
        features: torch.Tensor | None = None
        targets: torch.Tensor | None = None
        done = 0
        with torch.inference_mode():
            for images, batch_targets in passes(batches, self.pass_bytes):
                with autocast():
                    output = head_input(model, to_device(images))
                output = output.detach().to("cpu").contiguous()
                if features is None:
                    features = self._allocate(count, tuple(output.shape[1:]), output.dtype)
                    targets = torch.empty((count, *batch_targets.shape[1:]), dtype=batch_targets.dtype)
                features[done:done + len(output)] = output
                targets[done:done + len(output)] = batch_targets  # type: ignore[index]
                done += len(output)
        if features is None or targets is None:
            return CachedSplit(torch.empty(0), torch.empty(0, dtype=torch.long))
        return CachedSplit(features[:done], targets[:done])

    def allocate(self, count: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Room for ``count`` features where this cache keeps them, for rows that arrive from
        other processes rather than from the backbone here."""
        return self._allocate(count, shape, dtype)

    def _allocate(self, count: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        per_image = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if self.where is None:
            self.bytes_needed = per_image * self.total_images
            self.where = "memory" if self.bytes_needed <= self.budget_bytes else "disk"
        if self.where == "memory":
            return torch.empty((count, *shape), dtype=dtype)
        return self._memory_mapped((count, *shape), dtype)

    def _memory_mapped(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor whose storage is a file: numpy memory-maps it, torch shares the mapping.

        numpy has no bfloat16, so a bf16 cache is stored as its 16-bit patterns and viewed back.
        """
        if self._folder is None:
            if self.directory is not None:
                self.directory.mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix=".feature-cache-", dir=self.directory))
        self._files += 1
        stored = np.uint16 if dtype == torch.bfloat16 else torch.empty((), dtype=dtype).numpy().dtype
        path = self._folder / f"features-{self._files}.npy"
        mapped = np.lib.format.open_memmap(str(path), mode="w+", dtype=stored, shape=shape)
        _reserve(path)
        tensor = torch.from_numpy(mapped)
        return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor

    def describe(self, sizes: dict[str, int]) -> str:
        """One line for the user: what was cached, where, and how big."""
        counts = " and ".join(f"{n:,} {name}" for name, n in sizes.items() if n)
        where = "in memory" if self.where == "memory" else (
            f"memory-mapped on disk (more than --cache-mem {human_bytes(self.budget_bytes)})"
        )
        return (f"frozen backbone: its features of {counts} images are computed once and cached {where}, "
                f"{human_bytes(self.bytes_needed)}; the head trains on them every epoch")


def _reserve(path: Path) -> None:
    """Give the memory-mapped file its disk blocks now. It is created sparse, and a full disk
    met while writing through the mapping kills the process (SIGBUS) rather than raising; met
    here, it is a ``DiskError`` naming the file and its size, and the file is removed."""
    if not hasattr(os, "posix_fallocate"):
        return
    size = path.stat().st_size
    try:
        with disk_errors(path, size), open(path, "r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, size)
    except DiskError:
        path.unlink(missing_ok=True)
        raise
