"""Writers for small, real on-disk datasets in the formats tltk reads.

Each writer produces the files exactly as the dataset is distributed (CIFAR-10 python
pickles, MNIST IDX files, image folders, CSV files) with known pixel values, so tests
can check that a reader puts a specific pixel in the right place.
"""

from __future__ import annotations

import csv
import gzip
import pickle
import struct
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from PIL import Image

# CIFAR-10: image 0 of data_batch_1 has this (R, G, B) at row 1, column 2.
CIFAR_KNOWN_PIXEL = ((1, 2), (200, 100, 50))
# MNIST: image 0 of the training set has this value at row 3, column 5, and label 7.
MNIST_KNOWN_PIXEL = ((3, 5), 77)
MNIST_FIRST_LABEL = 7


def write_cifar10(
    root: Path,
    *,
    class_names: Iterable[str] = ("airplane", "cat", "dog"),
    per_class_per_batch: int = 2,
    train_batches: int = 2,
    with_test: bool = True,
) -> Path:
    """``root/cifar-10-batches-py`` with pickled batches; returns that folder."""
    names = list(class_names)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    _pickle(folder / "batches.meta", {b"label_names": [n.encode() for n in names], b"num_vis": 3072})
    for batch in range(1, train_batches + 1):
        data, labels = _cifar_rows(len(names), per_class_per_batch, seed=batch)
        if batch == 1:
            (row, col), rgb = CIFAR_KNOWN_PIXEL
            for channel, value in enumerate(rgb):
                data[0, channel * 1024 + row * 32 + col] = value
        _pickle(folder / f"data_batch_{batch}", {b"batch_label": b"training", b"data": data, b"labels": labels})
    if with_test:
        data, labels = _cifar_rows(len(names), per_class_per_batch, seed=99)
        _pickle(folder / "test_batch", {b"batch_label": b"testing", b"data": data, b"labels": labels})
    return folder


def _cifar_rows(num_classes: int, per_class: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    labels = [c for _ in range(per_class) for c in range(num_classes)]
    data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    return data, labels


def _pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file's bytes for a uint8 array: magic (0, 0, 0x08, ndim), big-endian dims, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_mnist(
    root: Path, *, n_train: int = 30, n_test: int = 10, gz: bool = False, torchvision_layout: bool = False
) -> Path:
    """MNIST IDX files (3 train and 1 test sample per digit at the defaults); returns their folder."""
    folder = root / "MNIST" / "raw" if torchvision_layout else root
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) + MNIST_FIRST_LABEL) % 10
        if prefix == "train":
            (row, col), value = MNIST_KNOWN_PIXEL
            images[0, row, col] = value
        _write_maybe_gz(folder / f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz)
        _write_maybe_gz(folder / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels.astype(np.uint8)), gz)
    return folder


def _write_maybe_gz(path: Path, data: bytes, gz: bool) -> None:
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


CLASS_COLOURS = {"bird": (0, 0, 255), "cat": (255, 0, 0), "dog": (0, 255, 0), "fish": (255, 255, 0)}


def write_image(path: Path, colour: tuple[int, int, int] = (128, 128, 128), size: tuple[int, int] = (8, 8)) -> Path:
    """A small solid-colour image; the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_image_folder(root: Path, layout: Mapping[str, int], *, ext: str = ".png") -> Path:
    """``root/CLASS/CLASS_i.ext`` with ``layout[CLASS]`` images each; returns root."""
    for name, count in layout.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            write_image(root / name / f"{name}_{i}{ext}", CLASS_COLOURS.get(name, (128, 128, 128)))
    return root


def write_csv(path: Path, rows: Iterable[tuple[str, str]], header: tuple[str, str] = ("filename", "label")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in half: the header parses, decoding runs out of data."""
    noise = np.random.default_rng(1).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noise).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_bad_images(folder: Path) -> list[Path]:
    """A zero-byte PNG, a truncated JPEG and a text file named .jpg, in sorted order."""
    folder.mkdir(parents=True, exist_ok=True)
    empty = folder / "a_empty.png"
    empty.write_bytes(b"")
    truncated = write_truncated_jpeg(folder / "b_truncated.jpg")
    fake = folder / "c_not_an_image.jpg"
    fake.write_text("this is not a JPEG")
    return [empty, truncated, fake]


def write_exif_rotated_jpeg(path: Path, size: tuple[int, int] = (40, 20), orientation: int = 6) -> Path:
    """A width x height JPEG whose EXIF Orientation says to rotate it for display."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", size, (10, 200, 10)).save(path, exif=exif)
    return path
