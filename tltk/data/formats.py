"""What every data format shares: the reader's contract, the registry readers are found in,
and the helpers more than one reader uses.

Each format is a module of its own (``folder``, ``cifar10``, ``mnist``, ``csvfile``,
``builtin``, ``voc``, ``coco``). Readers only read. They keep the dataset's own splits
(``train``/``val``/``test`` folders, CIFAR-10's test batch, MNIST's t10k files) and leave
carving, class filtering and per-class limits to ``tltk.data.splits`` so every format
behaves the same way.

A data format is read by a ``FormatReader`` (``tltk.plugin``'s contract, ``(path, *,
image_root, strict) -> RawDataset``) found in ``DATA_FORMATS``, the registry of the
``tltk.datasets`` entry-point group, where tltk declares its own readers in pyproject.toml
and plugins add theirs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tltk.data.images import validate_images
from tltk.data.samples import RawDataset, Sample
from tltk.errors import DataError
from tltk.plugin import FormatReader
from tltk.registry import DATA_FORMATS


def in_memory_dataset(
    class_names: list[str], parts: dict[str, list[tuple[np.ndarray, np.ndarray]]], root: str
) -> RawDataset:
    """Stack each split's arrays into one array; samples point at rows, ids are ``split/i``."""
    arrays: list[np.ndarray] = []
    splits: dict[str, list[Sample]] = {}
    offset = 0
    for split, chunks in parts.items():
        labels = np.concatenate([chunk_labels for _, chunk_labels in chunks])
        arrays.extend(images for images, _ in chunks)
        splits[split] = [Sample(offset + i, int(label), f"{split}/{i}") for i, label in enumerate(labels)]
        offset += len(labels)
    return RawDataset(class_names, splits, root, arrays=np.concatenate(arrays))


def drop_undecodable(labelled: dict[str, list[Sample]], class_names: list[str], root: Path,
                     strict: bool) -> RawDataset:
    """The dataset of file samples whose images decode; the rest are reported as skipped
    (or, with ``strict``, the first is an error). Each file is decoded once, however many
    samples name it."""
    files = [Path(str(s.source)) for samples in labelled.values() for s in samples]
    good, bad = validate_images(list(dict.fromkeys(files)), strict=strict)
    decodable = {str(p.absolute()) for p in good}
    splits = {name: [s for s in samples if s.source in decodable] for name, samples in labelled.items()}
    return RawDataset(class_names, splits, str(root), skipped=[str(p.absolute()) for p in bad])


def check_label_range(labels: np.ndarray, num_classes: int, file: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{file} has labels {int(labels.min())}..{int(labels.max())} but only {num_classes} "
            f"class names; the file is corrupt or from another dataset."
        )


__all__ = ["DATA_FORMATS", "FormatReader", "check_label_range", "drop_undecodable", "in_memory_dataset"]
