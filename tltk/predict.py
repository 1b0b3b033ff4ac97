"""Predictions of a model on a dataset split or a folder of unlabelled images.

Below the run layer: ``Run.predict`` finds the images and calls ``probability_batches``.

The order of the output is the order of the input listing: the split's order for a
``--data`` spec, file names sorted for a folder of images. Probabilities are softmax
outputs for multi-class runs and per-class sigmoids for multi-label runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from tltk.data import ImageDataset, Sample, scan_image_files, validate_images
from tltk.data.images import is_image_file
from tltk.errors import DataError
from tltk.runtime import Inference, stream_outputs
from tltk.tta import averaged_probabilities, check_tta, probabilities, tta_inference


@dataclass
class Predictions:
    ids: list[str]
    paths: list[str]
    probabilities: np.ndarray
    class_names: list[str]
    task: str
    tta: str = "none"  # the test-time augmentation the probabilities were averaged over (tltk.tta)

    def __len__(self) -> int:
        return len(self.ids)

    def predicted_index(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    def predicted_sets(self, threshold: float) -> list[list[int]]:
        """Multi-label: every class at or above ``threshold``, in class order."""
        return [list(np.flatnonzero(row >= threshold)) for row in self.probabilities]


def probability_batches(model: torch.nn.Module, dataset: ImageDataset, settings: Inference,
                        task: str, tta: str = "none") -> Iterator[np.ndarray]:
    """Probabilities per batch of ``dataset``, in its order: softmax for multi-class runs,
    per-class sigmoids for multi-label ones; averaged over the views of ``tta`` where it is
    not "none" (``tltk.tta``: the views of a batch in one pass)."""
    check_tta(tta)
    if tta != "none":
        for averaged, _ in stream_outputs(model, dataset, tta_inference(settings, tta),
                                          forward=averaged_probabilities(model, task, tta)):
            yield averaged.numpy()
        return
    for logits, _ in stream_outputs(model, dataset, settings):
        yield probabilities(logits, task).numpy()


def as_predictions(samples: list[Sample], probabilities: np.ndarray, class_names: list[str], task: str,
                   tta: str = "none") -> Predictions:
    paths = [s.source if isinstance(s.source, str) else "" for s in samples]
    return Predictions([s.id for s in samples], paths, probabilities, list(class_names), task, tta)




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
