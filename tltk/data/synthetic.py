"""``synthetic:N``: N small images made on the fly from their row number, for scale tests.

Nothing is stored: image ``i`` is drawn from a generator seeded with ``i`` each time it is
read, so a dataset of any size costs its sample list and no pixels, and reading the same
row twice gives the same pixels (as a file would). Each image is 8 x 8 RGB noise with a
class-dependent brightness, so a model can learn something from it; the label of row
``i`` is ``i % 10``.

It is not declared as an entry point: code that wants it (the memory benchmark, tests)
registers it for its own process with ``DATA_FORMATS.add("synthetic", read_synthetic)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tltk.data.samples import RawDataset, Sample
from tltk.errors import DataError, printable

CLASSES = [f"c{i}" for i in range(10)]
SIZE = 8


class SyntheticImages:
    """What ``ImageDataset`` indexes as ``arrays``: row ``i`` is made when it is read."""

    def __init__(self, count: int, size: int = SIZE) -> None:
        self.count = count
        self.size = size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, row: int) -> np.ndarray:
        row = int(row)
        if not 0 <= row < self.count:
            raise IndexError(f"row {row} of a synthetic dataset of {self.count}")
        noise = np.random.default_rng(row).integers(0, 128, size=(self.size, self.size, 3), dtype=np.uint8)
        return noise + np.uint8(12 * (row % len(CLASSES)))


def read_synthetic(path: Path, *, image_root: Path | None = None, strict: bool = False) -> RawDataset:
    """``synthetic:N`` (N a positive whole number; the last part of the path is read, since
    specs are made absolute when a run or store records them)."""
    if image_root is not None:
        raise DataError("--image-root does not apply to synthetic: data, which has no files; drop it.")
    count = _count(Path(path).name)
    samples = [Sample(i, i % len(CLASSES), f"all/{i}") for i in range(count)]
    return RawDataset(list(CLASSES), {"all": samples}, f"synthetic:{count}", arrays=SyntheticImages(count))  # type: ignore[arg-type]


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise DataError(f"synthetic:{printable(text)} names no image count; write synthetic:N with N a whole number "
                        "of images, such as synthetic:10000.")
    return int(text)
