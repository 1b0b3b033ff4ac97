"""Predictions of a trained run on a dataset split or a folder of unlabelled images.

The order of the output is the order of the input listing: the split's order for a
``--data`` spec, file names sorted for a folder of images. Probabilities are softmax
outputs for multi-class runs and per-class sigmoids for multi-label runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from tltk.data import ImageDataset, Sample, scan_image_files, validate_images
from tltk.data.images import is_image_file
from tltk.errors import DataError
from tltk.run import Run, as_run
from tltk.runtime import check_batch_size, stream_outputs


@dataclass
class Predictions:
    ids: list[str]
    paths: list[str]
    probabilities: np.ndarray
    class_names: list[str]
    task: str

    def __len__(self) -> int:
        return len(self.ids)

    def predicted_index(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    def predicted_sets(self, threshold: float) -> list[list[int]]:
        """Multi-label: every class at or above ``threshold``, in class order."""
        return [list(np.flatnonzero(row >= threshold)) for row in self.probabilities]


def predict(
    run: str | Path | Run,
    data: str | None = None,
    split: str = "test",
    *,
    device: str = "auto",
    batch_size: int = 64,
    workers: int | None = None,
    **data_overrides: Any,
) -> Predictions:
    """Every image's probabilities, filled batch by batch into one preallocated array."""
    check_batch_size(batch_size)
    run = as_run(run)
    dataset = _input_dataset(run, data, split, data_overrides)
    probabilities = np.zeros((len(dataset), len(run.class_names)), np.float32)
    done = 0
    for chunk in _probability_batches(run, dataset, device, batch_size, workers):
        probabilities[done:done + len(chunk)] = chunk
        done += len(chunk)
    samples = dataset.samples
    paths = [s.source if isinstance(s.source, str) else "" for s in samples]
    return Predictions([s.id for s in samples], paths, probabilities, run.class_names, run.task)


def iter_predictions(
    run: str | Path | Run,
    data: str | None = None,
    split: str = "test",
    *,
    device: str = "auto",
    batch_size: int = 64,
    workers: int | None = None,
    **data_overrides: Any,
) -> Iterator[Predictions]:
    """The same predictions as ``predict``, one batch at a time, in the same order.

    For writing predictions out as they come: memory holds one batch, however many
    images there are.
    """
    check_batch_size(batch_size)
    run = as_run(run)
    dataset = _input_dataset(run, data, split, data_overrides)
    done = 0
    for chunk in _probability_batches(run, dataset, device, batch_size, workers):
        part = dataset.samples[done:done + len(chunk)]
        done += len(chunk)
        paths = [s.source if isinstance(s.source, str) else "" for s in part]
        yield Predictions([s.id for s in part], paths, chunk, run.class_names, run.task)


def _probability_batches(run: Run, dataset: ImageDataset, device: str, batch_size: int,
                         workers: int | None) -> Iterator[np.ndarray]:
    """Probabilities per batch, run as the run's model trained (precision, memory layout)."""
    for logits, _ in stream_outputs(run.model, dataset, run.inference(device, batch_size, workers)):
        yield _probabilities(logits, run.task)


def _probabilities(logits: torch.Tensor, task: str) -> np.ndarray:
    return (torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=1)).numpy()


def _input_dataset(run: Run, data: str | None, split: str, overrides: dict[str, Any]) -> ImageDataset:
    """A folder of unlabelled images (a competition's test/ folder), or a split of labelled data."""
    if data is not None and is_unlabelled_folder(Path(data).expanduser()):
        return ImageDataset(unlabelled_samples(Path(data).expanduser()), run.preprocessing.eval_transform())
    splits = run.data(data, **overrides)
    return ImageDataset(splits.split(split), run.preprocessing.eval_transform(), splits.arrays)


def is_unlabelled_folder(path: Path) -> bool:
    """A folder holding image files directly (a competition's test/ folder), not class folders."""
    return path.is_dir() and any(is_image_file(child) for child in path.iterdir())


def unlabelled_samples(folder: Path) -> list[Sample]:
    """Every image under ``folder`` in path order; an undecodable one is an error, since a
    submission needs a row for every image."""
    files = scan_image_files(folder)
    if not files:
        raise DataError(f"{folder} holds no images to predict; check the path.")
    good, bad = validate_images(files, strict=False)
    if bad:
        raise DataError(
            f"{len(bad)} image(s) in {folder} cannot be decoded (first: {bad[0]}); a prediction file needs "
            f"every image, so replace or remove them."
        )
    return [Sample(str(p.absolute()), 0, p.relative_to(folder).as_posix()) for p in good]
