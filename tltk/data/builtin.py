"""The ``builtin`` format: small datasets that ship with a dependency (``builtin:digits``),
for demos and tests that must not download anything."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from tltk.data.formats import in_memory_dataset
from tltk.data.samples import RawDataset
from tltk.errors import DataError, printable


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (no download), scaled from 0..16 to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images[..., np.newaxis], digits.target.astype(np.int64)


# name -> (loader returning (N x H x W x C uint8, labels), class names)
BUILTIN_DATASETS: dict[str, tuple[Callable[[], tuple[np.ndarray, np.ndarray]], list[str]]] = {
    "digits": (_load_digits, [str(i) for i in range(10)]),
}


def read_builtin(path: Path, *, image_root: Path | None = None, strict: bool = False) -> RawDataset:
    """A small dataset that ships with a dependency, for demos and tests (``builtin:digits``)."""
    name = str(path)
    if name not in BUILTIN_DATASETS:
        raise DataError(
            f"Unknown builtin dataset '{printable(name)}'; known builtin datasets: {', '.join(sorted(BUILTIN_DATASETS))}."
        )
    loader, class_names = BUILTIN_DATASETS[name]
    return in_memory_dataset(class_names, {"all": [loader()]}, f"builtin:{name}")
