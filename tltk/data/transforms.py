"""Image preprocessing and augmentation, and the Dataset that applies them.

Every image, whether a file or an in-memory array row, becomes a uint8 image tensor
first (``ToImage``), so files and arrays go through exactly the same operations. The
pipelines are built from torchvision ``transforms.v2`` and small module-level classes
(no lambdas) so that they pickle into DataLoader worker processes.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from tltk.data.images import load_image
from tltk.data.samples import Sample
from tltk.errors import DataError

AUGMENT_PRESETS = ("none", "light", "standard")


class ToRGBChannels(v2.Transform):
    """Repeat a single-channel image to three channels (greyscale arrays, pretrained RGB backbones)."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, torch.Tensor) and inpt.ndim >= 3 and inpt.shape[-3] == 1:
            repeated = inpt.repeat_interleave(3, dim=-3)
            return tv_tensors.wrap(repeated, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else repeated
        return inpt


def build_transforms(
    input_size: tuple[int, int] | int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: str,
    train: bool,
) -> Callable[[Any], torch.Tensor]:
    """The preprocessing for one split: image (PIL or uint8 CHW tensor) -> normalised float tensor.

    ``train=False`` or ``augment="none"`` gives the deterministic eval pipeline: resize to
    exactly ``input_size`` (H, W). ``"light"`` adds a reflect-padded random crop and a
    horizontal flip; ``"standard"`` a random resized crop, flip, colour jitter and a small
    rotation.
    """
    if augment not in AUGMENT_PRESETS:
        raise DataError(f"Unknown augmentation '{augment}'; choose one of {', '.join(AUGMENT_PRESETS)}.")
    size = _size_pair(input_size)
    mean3, std3 = _three_channels(mean, "mean"), _three_channels(std, "std")
    steps: list[Callable[..., Any]] = [v2.ToImage(), ToRGBChannels()]
    steps.extend(_geometry(size, augment if train else "none"))
    steps.extend([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean3, std3)])
    return v2.Compose(steps)


def _geometry(size: tuple[int, int], augment: str) -> list[Callable[..., Any]]:
    """The resizing and augmentation steps for a preset, on uint8 images."""
    resize = v2.Resize(size, antialias=True)
    if augment == "none":
        return [resize]
    if augment == "light":
        padding = max(1, min(size) // 8)
        return [resize, v2.RandomCrop(size, padding=padding, padding_mode="reflect"), v2.RandomHorizontalFlip()]
    return [
        v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        v2.RandomRotation(10),
    ]


def _size_pair(input_size: tuple[int, int] | int) -> tuple[int, int]:
    if isinstance(input_size, int):
        return (input_size, input_size)
    height, width = (int(v) for v in input_size)
    if height < 1 or width < 1:
        raise DataError(f"Input size must be positive, got {tuple(input_size)}.")
    return (height, width)


def _three_channels(values: Sequence[float], what: str) -> list[float]:
    """Normalisation statistics per RGB channel; a single value applies to all three."""
    values = [float(v) for v in values]
    if len(values) == 1:
        return values * 3
    if len(values) != 3:
        raise DataError(f"Normalisation {what} must have 1 or 3 values, got {len(values)}.")
    return values


class ImageDataset(Dataset):
    """Samples as (normalised float tensor C x H x W, target) pairs.

    File samples are read with ``load_image`` (always RGB); in-memory samples are rows of
    ``arrays`` (N x H x W x C uint8), handed to the transform as a uint8 CHW image tensor.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[Any], torch.Tensor],
        arrays: np.ndarray | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        sample = self.samples[index]
        target = sample.target
        if isinstance(target, tuple):  # multi-label: 1 / 0 / -1 (ignored) per class
            return self.transform(self._image(sample)), torch.tensor(target, dtype=torch.float32)
        return self.transform(self._image(sample)), target

    def _image(self, sample: Sample) -> Any:
        if isinstance(sample.source, (int, np.integer)):
            if self.arrays is None:
                raise DataError(
                    f"Sample {sample.id} is a row of an in-memory dataset but ImageDataset got no "
                    f"arrays; pass arrays=DataSplits.arrays."
                )
            row = np.ascontiguousarray(self.arrays[int(sample.source)])
            return tv_tensors.Image(torch.from_numpy(row).permute(2, 0, 1))
        return load_image(sample.source)
