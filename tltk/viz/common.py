"""What more than one picture of a run needs: the layer a name means, one split of the
run's data, an image as a person sees it, and a name fit for a file.

These live apart from the pictures that use them so that activations, filters and
mistakes each depend on this module and not on one another.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from tltk import layers
from tltk.errors import DataError, TltkError

if TYPE_CHECKING:  # type-only: a run is passed in, never built here
    from tltk.data import ImageDataset, Sample
    from tltk.model import TransferModel
    from tltk.run import Run


def resolve_layer(model: TransferModel, name: str) -> tuple[str, nn.Module]:
    """(full module path in the model, module) for a layer name a person typed: a named
    layer (``conv1``, ``fc7``), ``logits``, or a module path, as ``tltk.layers`` resolves
    them everywhere else; the full path is what figure titles show."""
    module = layers.resolve_layer(model, name).module
    return next(path for path, candidate in model.named_modules() if candidate is module), module


def split_dataset(
    run: Run, data: str | None, split: str, *, per_class: int | None = None, **overrides: Any
) -> tuple[ImageDataset, str]:
    """(eval-transformed dataset of one split with targets in the run's class order, data spec).

    The split settings default to the run's, as ``tltk evaluate`` does, so "test" is the
    same images the run held out. ``per_class`` keeps the first N images of each class.
    """
    if run.task != "multiclass":
        raise TltkError(
            f"{run.path} is a multi-label run, and this picture is for multi-class runs only (one true class per "
            f"image); `tltk evaluate {run.path}` gives its per-class AP and chart instead."
        )
    dataset, splits = run.split(split, data, **overrides)
    if per_class is not None:
        dataset = dataset.subset(_first_per_class(dataset.samples, per_class))
    if not len(dataset):
        raise DataError(f"{splits.spec} has no images in its {split} split; pick another --split.")
    return dataset, splits.spec


def _first_per_class(samples: Sequence[Sample], limit: int) -> list[int]:
    """Positions of the first ``limit`` samples of each class."""
    taken: dict[int, int] = {}
    kept = []
    for position, sample in enumerate(samples):
        if taken.get(sample.target, 0) < limit:
            taken[sample.target] = taken.get(sample.target, 0) + 1
            kept.append(position)
    return kept


def unnormalise(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised C x H x W tensor back to an H x W x 3 array in 0..1, as a person sees it."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (image.float().cpu() * std_t + mean_t).clamp(0, 1).permute(1, 2, 0).numpy()


def safe_name(text: str) -> str:
    """A layer or image name as a file-name part."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "layer"
