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

from tltk.data import ImageDataset, Sample, build_transforms, scan_image_files, validate_images
from tltk.data.images import is_image_file
from tltk.errors import DataError
from tltk.train.evaluate import LoadedRun, load_data_for_run, load_run
from tltk.train.trainer import (
    TrainConfig,
    check_batch_size,
    default_workers,
    iterate_logits,
    make_loader,
    memory_format,
    resolve_device,
    resolve_precision,
    use_channels_last,
)


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
    run: str | Path | LoadedRun,
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
    loaded = run if isinstance(run, LoadedRun) else load_run(run)
    samples, arrays = _input_samples(loaded, data, split, data_overrides)
    probabilities = np.zeros((len(samples), len(loaded.class_names)), np.float32)
    done = 0
    for chunk in _probability_batches(loaded, samples, arrays, device, batch_size, workers):
        probabilities[done:done + len(chunk)] = chunk
        done += len(chunk)
    paths = [s.source if isinstance(s.source, str) else "" for s in samples]
    return Predictions([s.id for s in samples], paths, probabilities, loaded.class_names, _task(loaded))


def iter_predictions(
    run: str | Path | LoadedRun,
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
    loaded = run if isinstance(run, LoadedRun) else load_run(run)
    samples, arrays = _input_samples(loaded, data, split, data_overrides)
    done = 0
    for chunk in _probability_batches(loaded, samples, arrays, device, batch_size, workers):
        part = samples[done:done + len(chunk)]
        done += len(chunk)
        paths = [s.source if isinstance(s.source, str) else "" for s in part]
        yield Predictions([s.id for s in part], paths, chunk, loaded.class_names, _task(loaded))


def _probability_batches(
    loaded: LoadedRun, samples: list[Sample], arrays: np.ndarray | None, device: str, batch_size: int,
    workers: int | None,
) -> Iterator[np.ndarray]:
    """Probabilities per batch, with the run's precision and training's loader defaults."""
    pre = loaded.preprocessing
    transform = build_transforms(tuple(pre["input_size"]), pre["mean"], pre["std"], "none", train=False)
    dev = resolve_device(device)
    workers = workers if workers is not None else default_workers(len(samples))
    loader = make_loader(ImageDataset(samples, transform, arrays), batch_size=batch_size, shuffle=False,
                         workers=workers, device=dev)
    train = TrainConfig(**loaded.config["train"])
    amp = resolve_precision(train.precision, dev)
    channels_last = use_channels_last(train.channels_last, loaded.model)
    loaded.model.to(dev)
    with memory_format(loaded.model, channels_last):
        for logits, _ in iterate_logits(loaded.model, loader, dev, amp, channels_last):
            yield _probabilities(logits, _task(loaded))


def _task(loaded: LoadedRun) -> str:
    return str(loaded.config["train"].get("task", "multiclass"))


def _probabilities(logits: torch.Tensor, task: str) -> np.ndarray:
    return (torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=1)).numpy()


def _input_samples(
    loaded: LoadedRun, data: str | None, split: str, overrides: dict[str, Any]
) -> tuple[list[Sample], np.ndarray | None]:
    if data is not None and is_unlabelled_folder(Path(data).expanduser()):
        return unlabelled_samples(Path(data).expanduser()), None
    splits = load_data_for_run(loaded, data, overrides)
    return splits.split(split), splits.arrays


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
