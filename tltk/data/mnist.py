"""The ``mnist`` format: MNIST's IDX files, gzipped or not, flat or in torchvision's layout."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np

from tltk.data.formats import check_label_range, in_memory_dataset
from tltk.data.samples import RawDataset
from tltk.errors import DataError

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
MNIST_CLASS_NAMES = [str(i) for i in range(10)]


def read_mnist(path: Path, *, image_root: Path | None = None, strict: bool = False) -> RawDataset:
    """MNIST IDX files (optionally gzipped), flat or in torchvision's ``MNIST/raw/``."""
    folder = find_mnist_dir(path)
    if folder is None:
        raise DataError(
            f"No MNIST files in {path}; expected train-images-idx3-ubyte[.gz] and "
            f"train-labels-idx1-ubyte[.gz] there or in {path}/MNIST/raw."
        )
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for split, (images_name, labels_name) in MNIST_FILES.items():
        images_file = _find_idx_file(folder, images_name)
        labels_file = _find_idx_file(folder, labels_name)
        if images_file is None and labels_file is None and split != "train":
            continue
        if images_file is None or labels_file is None:
            missing = images_name if images_file is None else labels_name
            raise DataError(
                f"MNIST file {folder}/{missing}[.gz] is missing; add it next to the other IDX files."
            )
        parts[split] = [_read_mnist_pair(images_file, labels_file)]
    return in_memory_dataset(MNIST_CLASS_NAMES, parts, str(folder))


def find_mnist_dir(path: Path) -> Path | None:
    """The folder holding the MNIST training images: ``path``, ``path/raw`` or ``path/MNIST/raw``."""
    for candidate in (path, path / "raw", path / "MNIST" / "raw"):
        if _find_idx_file(candidate, MNIST_FILES["train"][0]) is not None:
            return candidate
    return None


def _find_idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_mnist_pair(images_file: Path, labels_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N x H x W x 1 images, N labels) from matching IDX image and label files."""
    images = read_idx(images_file, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_file, IDX_LABELS_MAGIC).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(
            f"MNIST files disagree: {images_file} has {len(images)} images but {labels_file} "
            f"has {len(labels)} labels; download the pair again."
        )
    check_label_range(labels, len(MNIST_CLASS_NAMES), labels_file)
    return images[..., np.newaxis], labels


def read_idx(file: Path, expected_magic: int) -> np.ndarray:
    """An unsigned-byte IDX array, checking the magic number and that the size matches the header.

    Header: two zero bytes, a type byte (0x08 = uint8), the number of dimensions, then
    each dimension as a big-endian uint32.
    """
    raw = _read_maybe_gzip(file)
    kind = "images" if expected_magic == IDX_IMAGES_MAGIC else "labels"
    if len(raw) < 4 or struct.unpack(">I", raw[:4])[0] != expected_magic:
        found = f"0x{struct.unpack('>I', raw[:4])[0]:08x}" if len(raw) >= 4 else "nothing"
        raise DataError(
            f"{file} is not an IDX {kind} file (magic number {found}, expected "
            f"0x{expected_magic:08x}); download the MNIST file again."
        )
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"{file} ends inside its IDX header; download the MNIST file again.")
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected_size = header_size + math.prod(dims)
    if len(raw) != expected_size:
        raise DataError(
            f"{file} has {len(raw)} bytes but its IDX header {tuple(dims)} needs {expected_size}; "
            f"the file is truncated or corrupt, download it again."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims)


def _read_maybe_gzip(file: Path) -> bytes:
    try:
        if file.suffix == ".gz":
            with gzip.open(file, "rb") as handle:
                return handle.read()
        return file.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(f"Cannot read {file} ({exc}); download the MNIST file again.") from exc
