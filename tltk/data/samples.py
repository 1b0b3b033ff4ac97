"""The data structures every format produces and the trainer consumes.

A dataset is reduced to lists of ``Sample`` (where the pixels are, which class, a stable
id) so that splitting, filtering and fingerprinting work the same way for image folders,
CSV files and in-memory arrays (CIFAR-10, MNIST, scikit-learn digits).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tltk.errors import DataError

SPLIT_NAMES = ("train", "val", "test")

# Which command-line option controls the size of a carved split, for error messages.
_SPLIT_OPTIONS = {"val": "--val-split", "test": "--test-split"}


@dataclass(frozen=True, slots=True)
class Sample:
    """One labelled image (slotted: a dataset holds one per image, and without a
    ``__dict__`` each costs about 100 bytes less).

    ``source`` is an absolute file path, or a row index into ``DataSplits.arrays`` for
    in-memory formats. ``id`` is stable across machines (a path relative to the dataset
    root, or ``"{split}/{index}"``) so predictions and fingerprints can refer to it.
    ``target`` is a class index (multi-class), or one label per class (multi-label):
    1 positive, 0 negative, -1 ignored (VOC's "difficult").
    """

    source: str | int
    target: int | tuple[int, ...]
    id: str


def is_multilabel_target(target: int | tuple[int, ...]) -> bool:
    return isinstance(target, tuple)


def positives(target: int | tuple[int, ...]) -> list[int]:
    """The classes a sample belongs to, whichever the task."""
    if isinstance(target, tuple):
        return [i for i, label in enumerate(target) if label == 1]
    return [target]


@dataclass
class RawDataset:
    """What a format reader returns: the dataset as distributed, before any splitting.

    ``splits`` maps the dataset's own split names (``"train"``, ``"val"``, ``"test"``)
    to samples, or holds the single key ``"all"`` when the dataset has no splits of its
    own. ``root`` is where the data was read from, for error messages.

    ``class_problems`` holds, by class name, the sentence a reader would have raised about
    that class (an empty class folder). Readers record it instead of raising so that
    ``--classes`` can leave a broken class out; ``check_classes`` raises it for a class
    that is kept.
    """

    class_names: list[str]
    splits: dict[str, list[Sample]]
    root: str
    arrays: np.ndarray | None = None
    skipped: list[str] = field(default_factory=list)
    class_problems: dict[str, str] = field(default_factory=dict)

    def all_samples(self) -> list[Sample]:
        return [sample for samples in self.splits.values() for sample in samples]


@dataclass
class DataSplits:
    """A dataset ready for training: class names plus train/val/test samples."""

    spec: str
    format: str
    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    arrays: np.ndarray | None = None
    skipped: list[str] = field(default_factory=list)
    fingerprint: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def task(self) -> str:
        """"multilabel" when samples carry one label per class, else "multiclass"."""
        samples = self.train or self.val or self.test
        return "multilabel" if samples and is_multilabel_target(samples[0].target) else "multiclass"

    def as_multilabel(self) -> "DataSplits":
        """One-hot labels for multi-class data (one sigmoid per class); multi-label data unchanged."""
        if self.task == "multilabel":
            return self
        width = len(self.class_names)

        def one_hot(samples: list[Sample]) -> list[Sample]:
            return [Sample(s.source, tuple(int(i == s.target) for i in range(width)), s.id) for s in samples]

        return DataSplits(
            self.spec, self.format, list(self.class_names), one_hot(self.train), one_hot(self.val),
            one_hot(self.test), self.arrays, list(self.skipped), self.fingerprint,
        )

    def split(self, name: str) -> list[Sample]:
        """The samples of one split; an empty or unknown split is the user's to fix."""
        if name not in SPLIT_NAMES:
            raise DataError(
                f"Unknown split '{name}' for data '{self.spec}'; choose one of {', '.join(SPLIT_NAMES)}."
            )
        samples: list[Sample] = getattr(self, name)
        if not samples:
            raise DataError(_empty_split_message(name, self.spec))
        return samples

    def compute_fingerprint(self) -> str:
        """sha256 of the format, class names and every (split, id, target).

        Any relabelled, added, removed or renamed sample, or a different split, changes it.
        """
        digest = hashlib.sha256()
        digest.update(json.dumps({"format": self.format, "class_names": self.class_names}).encode())
        for split_name in SPLIT_NAMES:
            for sample in getattr(self, split_name):
                digest.update(b"\n")
                digest.update(json.dumps([split_name, sample.id, sample.target]).encode())
        return digest.hexdigest()


def _empty_split_message(name: str, spec: str) -> str:
    if name == "train":
        return (
            f"The train split of '{spec}' is empty; lower --val-split/--test-split "
            f"or add training images."
        )
    option = _SPLIT_OPTIONS[name]
    return (
        f"The {name} split of '{spec}' is empty; set {option} to a fraction above 0 "
        f"(e.g. {option} 0.1) or provide a {name}/ folder."
    )


def relative_id(path: Path, root: Path) -> str:
    """A file's id: its path relative to the dataset root, with forward slashes."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
