"""Predictions of a trained run on a dataset split or a folder of unlabelled images.

The order of the output is the order of the input listing: the split's order for a
``--data`` spec, file names sorted for a folder of images. Probabilities are softmax
outputs for multi-class runs and per-class sigmoids for multi-label runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tltk.data import ImageDataset, Sample, build_transforms, scan_image_files, validate_images
from tltk.data.images import is_image_file
from tltk.errors import DataError
from tltk.train.evaluate import LoadedRun, load_data_for_run, load_run
from tltk.train.trainer import iterate_logits, make_loader, resolve_device, resolve_precision


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
    **data_overrides: Any,
) -> Predictions:
    loaded = run if isinstance(run, LoadedRun) else load_run(run)
    samples, arrays = _input_samples(loaded, data, split, data_overrides)
    pre = loaded.preprocessing
    transform = build_transforms(tuple(pre["input_size"]), pre["mean"], pre["std"], "none", train=False)
    dev = resolve_device(device)
    loader = make_loader(ImageDataset(samples, transform, arrays), batch_size=batch_size, shuffle=False, workers=0, device=dev)
    task = loaded.config["train"].get("task", "multiclass")
    loaded.model.to(dev)
    amp = resolve_precision(loaded.config["train"].get("precision", "auto"), dev)
    chunks = [_probabilities(logits, task) for logits, _ in iterate_logits(loaded.model, loader, dev, amp)]
    probabilities = np.concatenate(chunks) if chunks else np.zeros((0, len(loaded.class_names)), np.float32)
    paths = [s.source if isinstance(s.source, str) else "" for s in samples]
    return Predictions([s.id for s in samples], paths, probabilities, loaded.class_names, task)


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
