"""The ``builtin`` format: small datasets that ship with a dependency (``builtin:digits``),
for demos and tests that must not download anything."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import numpy as np

from tltk.data.formats import in_memory_dataset
from tltk.data.samples import RawDataset
from tltk.errors import DataError, printable


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (no download), scaled from 0..16 to 0..255."""
    table = _digits_table()
    images = np.rint(table[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images[..., np.newaxis], table[:, -1].astype(np.int64)


def _digits_table() -> np.ndarray:
    """The digits as scikit-learn ships them: one row per image, 64 pixels (0..16) then the digit.

    Read from the data file itself where it lies in the installed package: importing
    scikit-learn to reach it takes seconds (it brings SciPy and pandas along), several
    times what a small run spends training. ``load_digits`` is the fallback should the
    file ever move.
    """
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return np.loadtxt(path, delimiter=",", ndmin=2)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.column_stack([digits.data, digits.target])


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
