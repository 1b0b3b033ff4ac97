"""Image preprocessing and augmentation, and the Dataset that applies them.

Every image, whether a file or an in-memory array row, becomes a uint8 image tensor
first (``ToImage``), so files and arrays go through exactly the same operations. The
augmenting pipelines are ``tltk.data.augment``'s batched tensor operations applied to one
image with its own seed; the deterministic one (evaluation, and training without
augmentation) is one step, ``FixedPreprocess``, which does the same arithmetic without
five transforms' worth of per-image dispatch. All are module-level classes (no lambdas)
so that they pickle into DataLoader worker processes.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from tltk.data.augment import BatchAugment, SeededAugment, image_pixels
from tltk.data.images import load_image
from tltk.data.samples import Sample
from tltk.errors import DataError
from tltk.settings import AUGMENT_PRESETS


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
    horizontal flip; ``"standard"`` a random resized crop, flip, small rotation and colour
    jitter. The random presets are ``tltk.data.augment``'s batched operations applied to
    one image (``SeededAugment``), so the decoded-image cache trains on the same pixels.
    """
    if augment not in AUGMENT_PRESETS:
        raise DataError(f"Unknown augmentation '{augment}'; choose one of {', '.join(AUGMENT_PRESETS)}.")
    size = _size_pair(input_size)
    mean3, std3 = _three_channels(mean, "mean"), _three_channels(std, "std")
    if augment == "none" or not train:
        return FixedPreprocess(size, mean3, std3)
    return SeededAugment(BatchAugment(size, tuple(mean3), tuple(std3), augment))  # type: ignore[arg-type]


class FixedPreprocess:
    """Resize, three channels, scale to 0..1 and normalise, as one step.

    The same result as ``v2.Compose([ToImage(), ToRGBChannels(), Resize(size),
    ToDtype(float32, scale=True), Normalize(mean, std)])`` (to float rounding: the scaling
    and normalisation are one multiply-subtract), at a fraction of the cost where images
    are small: five transforms' dispatch is most of the time for an 8x8 digit. A
    single-channel image is resized before it is repeated to three channels, which is
    the same as repeating first, with a third of the work.
    """

    def __init__(self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = [int(size[0]), int(size[1])]
        self.mean_values, self.std_values = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.inv_std = 1.0 / std_t
        self.shift = self.mean / std_t

    def __call__(self, image: Any) -> torch.Tensor:
        pixels = image_pixels(image)
        if list(pixels.shape[-2:]) != self.size:
            pixels = F.resize(pixels, self.size, antialias=True)
        scale = self.inv_std / 255.0 if pixels.dtype == torch.uint8 else self.inv_std
        values = pixels.to(torch.float32)
        if values.shape[-3] == 1:  # broadcast to three channels in the multiply below
            values = values.expand(*values.shape[:-3], 3, *values.shape[-2:])
        return values.mul(scale).sub_(self.shift)

    def __repr__(self) -> str:
        return f"FixedPreprocess(size={tuple(self.size)})"


# Steps that map an image to the same output every time they see it.
_DETERMINISTIC_STEPS: tuple[type, ...] = (
    FixedPreprocess, v2.ToImage, ToRGBChannels, v2.Resize, v2.CenterCrop, v2.ToDtype, v2.Normalize, v2.Identity,
    v2.ToPureTensor, v2.Grayscale, v2.Pad,
)


def is_deterministic(transform: Callable[..., Any] | None) -> bool:
    """Whether ``transform`` gives the same output for the same image every time.

    Only what is known to be fixed counts (an allow-list): an unknown callable might draw
    random numbers, and treating it as fixed would silently freeze one augmentation.
    """
    if transform is None:
        return True
    if isinstance(transform, v2.Compose):
        return all(is_deterministic(step) for step in transform.transforms)
    return isinstance(transform, _DETERMINISTIC_STEPS)


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

    An index may come as ``(index, seed)`` (``EpochOrder(sample_seeds=True)``): the
    transform then draws its random numbers from a generator seeded with ``seed`` alone,
    leaving the process's own untouched, so the augmentation of a sample in an epoch does
    not depend on which worker process loads it or on what ran before.
    """

    takes_sample_seeds = True

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

    def subset(self, indices: Sequence[int]) -> ImageDataset:
        """The samples at ``indices`` with the same transform and pixels (a rank's shard,
        the first images of each class)."""
        return ImageDataset([self.samples[i] for i in indices], self.transform, self.arrays)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, int | torch.Tensor]:
        seed = None
        if isinstance(index, tuple):
            index, seed = index
        sample = self.samples[index]
        image = self._transformed(self._image(sample), seed)
        target = sample.target
        if isinstance(target, tuple):  # multi-label: 1 / 0 / -1 (ignored) per class
            return image, torch.tensor(target, dtype=torch.float32)
        return image, target

    def _transformed(self, image: Any, seed: int | None) -> torch.Tensor:
        if getattr(self.transform, "takes_seed", False):  # it draws its numbers from the seed itself
            return self.transform(image, seed)  # type: ignore[call-arg]
        if seed is None:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image)

    def image_of(self, sample: Sample) -> Any:
        """A sample's image before any transform: a PIL image from a file, or an array row as
        a uint8 image tensor (what the decoded-image cache decodes once)."""
        return self._image(sample)

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


def dataset_is_deterministic(dataset: Dataset) -> bool | None:
    """True/False where the dataset's transform says so; None where it cannot be told."""
    if isinstance(dataset, TensorDataset):
        return True
    if isinstance(dataset, Subset):
        return dataset_is_deterministic(dataset.dataset)
    if not hasattr(dataset, "transform"):
        return None
    return is_deterministic(dataset.transform)
