"""Training augmentation as batched tensor operations on decoded uint8 images.

Every training image goes through two stages:

1. ``BatchAugment.decode``: one image (PIL, array row or tensor) to a uint8 3 x h x w
   tensor at the *stored size*: the input size for ``none`` and ``light``, a little above
   it for ``standard`` so that random crops have room. Nothing random happens here, so
   the result can be computed once and kept (``tltk.train.image_cache``).
2. ``BatchAugment.__call__``: a batch of stored images and one seed per image to the
   normalised float batch the model reads. Each image's random parameters come from its
   seed alone (``EpochOrder`` draws it from (seed, epoch, index)), and every operation
   treats the images of a batch independently, element by element or by exact integer
   arithmetic, so an image comes out the same in a batch of one as in a batch of 64.

``SeededAugment`` applies the two stages to one image at a time (the uncached loader's
transform), which is why a run trains on the very same pixels with or without the
decoded-image cache. Without augmentation the second stage is exactly ``FixedPreprocess``'s
arithmetic.

The presets, on the stored image:

- ``light``: reflect-pad by an eighth of the side, crop back to the input size at a random
  offset, flip horizontally with probability 0.5 (integer indexing: exact).
- ``standard``: one affine resampling per image (bilinear) that takes a random crop of
  60-100% of the area with aspect ratio 3/4-4/3, flips it with probability 0.5 and rotates
  it by up to 10 degrees, then brightness, contrast and saturation each scaled by a factor
  in [0.8, 1.2], in that order. Where the rotated crop leaves the stored image it is black.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch.nn import functional as nnf
from torchvision.transforms.v2 import functional as F

from tltk.errors import DataError

# ``standard`` stores images this much larger than the input size: a crop of the whole
# stored image is then resampled down a little, never up from a smaller one.
STANDARD_HEADROOM = 9 / 8
CROP_AREA = (0.6, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
MAX_ROTATION_DEGREES = 10.0
JITTER = 0.2  # brightness, contrast and saturation factors in [1 - JITTER, 1 + JITTER]
_GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
_DRAWS = 9  # uniform numbers drawn per image, whatever the preset uses of them
PRESETS = ("none", "light", "standard")


@dataclass(frozen=True)
class BatchAugment:
    """Decoding to the stored size, and a preset's augmentation and normalisation on batches."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augment: str = "none"
    _scale: torch.Tensor = field(init=False, repr=False, compare=False)
    _shift: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.augment not in PRESETS:
            raise DataError(f"Unknown augmentation '{self.augment}'; choose one of {', '.join(PRESETS)}.")
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        inv_std = 1.0 / std
        # The same tensors and the same two operations as FixedPreprocess: equal to the bit.
        object.__setattr__(self, "_scale", inv_std / 255.0)
        object.__setattr__(self, "_shift", torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1) / std)

    @property
    def random(self) -> bool:
        return self.augment != "none"

    @property
    def stored_size(self) -> tuple[int, int]:
        if self.augment != "standard":
            return self.size
        return (math.ceil(self.size[0] * STANDARD_HEADROOM), math.ceil(self.size[1] * STANDARD_HEADROOM))

    def recipe(self) -> dict[str, Any]:
        """What the stored pixels depend on (part of the decoded-image cache's key)."""
        return {"stored_size": list(self.stored_size), "channels": 3, "resize": "bilinear-antialias"}

    def decode(self, image: Any) -> torch.Tensor:
        """One image as uint8 3 x h x w at the stored size. A single-channel image is
        resized first and repeated to three channels after, which gives the same pixels."""
        pixels = image_pixels(image)
        if pixels.dtype != torch.uint8:
            raise DataError(f"Expected 8-bit images, got {pixels.dtype}; convert the arrays to uint8.")
        if list(pixels.shape[-2:]) != list(self.stored_size):
            pixels = F.resize(pixels, list(self.stored_size), antialias=True)
        if pixels.shape[-3] == 1:
            pixels = pixels.expand(3, *pixels.shape[-2:])
        return pixels.contiguous()

    def draws(self, seeds: Sequence[int]) -> torch.Tensor:
        """``_DRAWS`` uniform numbers in [0, 1) per image, from its seed alone (float64)."""
        return torch.from_numpy(np.stack([np.random.default_rng(int(seed)).random(_DRAWS) for seed in seeds]))

    def __call__(self, stored: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """A batch of stored uint8 images (B x 3 x h x w) to normalised float32 (B x 3 x H x W)."""
        if self.augment == "light":
            values = self._light(stored, self.draws(_seeds(seeds, len(stored))))
        elif self.augment == "standard":
            values = self._standard(stored, self.draws(_seeds(seeds, len(stored))))
        else:
            values = stored.to(torch.float32)
        return values.mul(self._scale).sub_(self._shift)

    def _light(self, stored: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Reflect-padded random crop and flip: whole pixels copied, so exact. The padding is
        the same for every image, so it is one operation; each crop is then a view of it."""
        height, width = self.size
        pad = max(1, min(self.size) // 8)
        padded = nnf.pad(stored.to(torch.float32), (pad, pad, pad, pad), mode="reflect")
        top = (u[:, 0] * (2 * pad + 1)).floor().long().tolist()
        left = (u[:, 1] * (2 * pad + 1)).floor().long().tolist()
        out = torch.stack([padded[i, :, t:t + height, l:l + width] for i, (t, l) in enumerate(zip(top, left))])
        flip = u[:, 2] < 0.5
        out[flip] = out[flip].flip(-1)
        return out

    def _standard(self, stored: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        grid = self._crop_grid(u, stored.shape[-2], stored.shape[-1])
        values = nnf.grid_sample(stored.to(torch.float32), grid, mode="bilinear", padding_mode="zeros",
                                 align_corners=False)
        return _jitter(values.clamp_(0, 255), 1 + JITTER * (2 * u[:, 6:9].to(torch.float32) - 1))

    def _crop_grid(self, u: torch.Tensor, stored_h: int, stored_w: int) -> torch.Tensor:
        """Where each output pixel samples the stored image, in grid_sample's -1..1 units:
        a random crop, flipped and rotated about its centre.

        The map is affine, so each source coordinate is a per-row term plus a per-column
        term: two small tables per image (worked out one image at a time in float64: exp,
        sin and cos must not depend on how many images share a vector register) and one
        elementwise sum per coordinate."""
        rows = [_crop_numbers(draw.tolist(), stored_h, stored_w) for draw in u]
        centre_x, centre_y, half_w, half_h, cos, sin = (
            torch.tensor(column, dtype=torch.float64)[:, None] for column in zip(*rows))
        height, width = self.size
        # Output pixel centres in -1..1, then in the crop's pixels from its centre.
        xs = ((torch.arange(width, dtype=torch.float64) + 0.5) * 2 / width - 1)[None, :] * half_w
        ys = ((torch.arange(height, dtype=torch.float64) + 0.5) * 2 / height - 1)[None, :] * half_h
        to_x, to_y = 2 / stored_w, 2 / stored_h
        # source_x = centre_x + cos * x - sin * y and source_y = centre_y + sin * x + cos * y,
        # scaled to -1..1: the column terms carry the centre and the -1.
        x_by_column = ((centre_x + cos * xs) * to_x - 1).to(torch.float32)
        x_by_row = ((-sin * ys) * to_x).to(torch.float32)
        y_by_column = ((centre_y + sin * xs) * to_y - 1).to(torch.float32)
        y_by_row = ((cos * ys) * to_y).to(torch.float32)
        grid = torch.empty(len(u), height, width, 2, dtype=torch.float32)
        torch.add(x_by_row[:, :, None], x_by_column[:, None, :], out=grid[..., 0])
        torch.add(y_by_row[:, :, None], y_by_column[:, None, :], out=grid[..., 1])
        return grid


def _crop_numbers(u: list[float], stored_h: int, stored_w: int) -> tuple[float, ...]:
    """One image's crop centre, signed half sizes (negative width: flipped) and rotation."""
    area = stored_h * stored_w * (CROP_AREA[0] + (CROP_AREA[1] - CROP_AREA[0]) * u[0])
    ratio = math.exp(math.log(CROP_RATIO[0]) + (math.log(CROP_RATIO[1]) - math.log(CROP_RATIO[0])) * u[1])
    crop_w = min(math.sqrt(area * ratio), stored_w)
    crop_h = min(math.sqrt(area / ratio), stored_h)
    centre_x = crop_w / 2 + (stored_w - crop_w) * u[2]
    centre_y = crop_h / 2 + (stored_h - crop_h) * u[3]
    flip = -1.0 if u[4] < 0.5 else 1.0
    angle = math.radians(MAX_ROTATION_DEGREES * (2 * u[5] - 1))
    return centre_x, centre_y, flip * crop_w / 2, crop_h / 2, math.cos(angle), math.sin(angle)


def image_pixels(image: Any) -> torch.Tensor:
    """A PIL image or an array-row tensor as a plain C x H x W tensor (what ``ToImage`` gives)."""
    if isinstance(image, torch.Tensor):
        pixels = image.as_subclass(torch.Tensor)
    elif isinstance(image, np.ndarray):
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1) if image.ndim == 3 else torch.from_numpy(image)
    else:
        pixels = F.pil_to_tensor(image)
    return pixels.unsqueeze(0) if pixels.ndim == 2 else pixels



def _seeds(seeds: Sequence[int] | None, count: int) -> Sequence[int]:
    """The images' seeds; without them (a dataset read outside training's order), fresh
    ones from torch's generator, so that seeding torch still reproduces the batch."""
    if seeds is not None:
        if len(seeds) != count:
            raise ValueError(f"{len(seeds)} seeds for {count} images")
        return seeds
    return torch.randint(0, 2**62, (count,)).tolist()


def _reflect(index: torch.Tensor, length: int) -> torch.Tensor:
    """Indices outside 0..length-1 mirrored back in, without repeating the edge (reflect padding)."""
    index = index.abs()
    return torch.where(index > length - 1, 2 * (length - 1) - index, index)


def _jitter(values: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation on 0..255 floats, per image. The contrast's mean
    grey level is summed as integers, so it is exact in any batch and thread layout."""
    b, c, s = (factors[:, i].view(-1, 1, 1, 1) for i in range(3))
    values = values.mul(b).clamp_(0, 255)
    grey = _grey(values)
    pixels = grey.shape[-1] * grey.shape[-2]
    mean = grey.round().to(torch.int64).sum(dim=(1, 2, 3), keepdim=True).to(torch.float32) / pixels
    values = values.mul(c).add_(mean * (1 - c)).clamp_(0, 255)
    return values.mul(s).add_(_grey(values) * (1 - s)).clamp_(0, 255)


def _grey(values: torch.Tensor) -> torch.Tensor:
    """Luma per pixel, B x 1 x H x W, as three explicit multiply-adds (no reduction order)."""
    red, green, blue = _GREY_WEIGHTS
    return (values[:, 0:1] * red).add_(values[:, 1:2] * green).add_(values[:, 2:3] * blue)


class SeededAugment:
    """One image's decoding and augmentation, with its seed: ``BatchAugment`` on a batch
    of one, so a loader that decodes every image each epoch gives the cached path's pixels."""

    takes_seed = True

    def __init__(self, batch: BatchAugment) -> None:
        self.batch = batch

    def __call__(self, image: Any, seed: int | None = None) -> torch.Tensor:
        return self.batch(self.batch.decode(image)[None], None if seed is None else [seed])[0]

    def __repr__(self) -> str:
        return f"SeededAugment({self.batch.augment}, size={self.batch.size})"
