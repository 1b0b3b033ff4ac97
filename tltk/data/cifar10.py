"""The ``cifar10`` format: CIFAR-10's "python version" batches, read without running pickle code."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from tltk.data.formats import check_label_range, in_memory_dataset
from tltk.data.samples import RawDataset
from tltk.errors import DataError

CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_DEFAULT_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


def read_cifar10(path: Path, *, image_root: Path | None = None, strict: bool = False) -> RawDataset:
    """The CIFAR-10 "python version" pickles (``data_batch_1..5``, ``test_batch``).

    The batches are pickles, as distributed; only load them from a source you trust.
    """
    folder = find_cifar10_dir(path)
    if folder is None:
        raise DataError(
            f"No CIFAR-10 batches in {path}; expected {path}/data_batch_1 or "
            f"{path}/{CIFAR10_DIRNAME}/data_batch_1 (the CIFAR-10 python version)."
        )
    class_names = _cifar10_class_names(folder)
    train_files = [folder / name for name in CIFAR10_TRAIN_BATCHES if (folder / name).is_file()]
    parts = {"train": [_read_cifar10_batch(f, len(class_names)) for f in train_files]}
    if (folder / "test_batch").is_file():
        parts["test"] = [_read_cifar10_batch(folder / "test_batch", len(class_names))]
    return in_memory_dataset(class_names, parts, str(folder))


def find_cifar10_dir(path: Path) -> Path | None:
    """The folder holding ``data_batch_1``: ``path`` itself or its ``cifar-10-batches-py``."""
    for candidate in (path, path / CIFAR10_DIRNAME):
        if (candidate / "data_batch_1").is_file():
            return candidate
    return None


def _cifar10_class_names(folder: Path) -> list[str]:
    """Names from ``batches.meta``; the standard ten if the file is missing."""
    meta_file = folder / "batches.meta"
    if not meta_file.is_file():
        return list(CIFAR10_DEFAULT_NAMES)
    meta = _load_pickle(meta_file)
    names = _pickle_field(meta, "label_names", meta_file)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _read_cifar10_batch(file: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(N x 32 x 32 x 3 uint8 HWC images, N labels) from one batch pickle.

    Rows are stored channel-planar (1024 red, 1024 green, 1024 blue values).
    """
    batch = _load_pickle(file)
    data = np.asarray(_pickle_field(batch, "data", file), dtype=np.uint8)
    labels = np.asarray(_pickle_field(batch, "labels", file), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(
            f"CIFAR-10 batch {file} has data of shape {data.shape} and {len(labels)} labels; "
            f"expected N x 3072 and N labels (the CIFAR-10 python version)."
        )
    check_label_range(labels, num_classes, file)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and NumPy arrays, and nothing that could run code.

    CIFAR-10's python batches are pickles; a file from an untrusted mirror could name any
    callable in its stream, so only the globals a NumPy array needs to rebuild are allowed.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: CIFAR-10 batches hold only arrays")
        return super().find_class(module, name)


def _load_pickle(file: Path) -> object:
    try:
        with open(file, "rb") as handle:
            return _ArraysOnlyUnpickler(handle, encoding="bytes").load()
    except Exception as exc:
        raise DataError(
            f"Cannot read CIFAR-10 file {file} ({type(exc).__name__}: {exc}); download the "
            f"python version of CIFAR-10 again."
        ) from exc


def _pickle_field(obj: object, key: str, file: Path) -> object:
    if isinstance(obj, dict):
        for candidate in (key.encode(), key):
            if candidate in obj:
                return obj[candidate]
    hint = ""
    if key == "labels" and isinstance(obj, dict) and b"fine_labels" in obj:
        hint = " (this looks like CIFAR-100, which is not supported)"
    raise DataError(
        f"CIFAR-10 file {file} has no '{key}' entry{hint}; expected the CIFAR-10 python version."
    )
