"""Test-time augmentation: a model's probabilities averaged over several views of each image.

The views are made from the preprocessed batch (after the run's resize, centre crop and
normalization), on the device, so they cost no extra decoding:

- ``none``: the image as preprocessed (1 view);
- ``flip``: the image and its mirror image, flipped left to right (2 views);
- ``flip+crops``: the image and its four corner crops, each also mirrored (10 views).
  A corner crop keeps ``CROP_SCALE`` (7/8) of the height and width, taken at the top-left,
  top-right, bottom-left or bottom-right corner, and is resized back to the input size
  (bilinear, ``align_corners=False``) so the model sees the size it was trained on.

The probabilities averaged are the run's own: softmax over classes for multi-class runs,
a sigmoid per class for multi-label ones (logits are not averaged, so a view that is very
sure cannot outvote the others by its scale alone). All views of a batch go through the
model as one stacked batch; to keep memory where it is without augmentation, the loader
then reads ``batch_size // views`` images per batch (at least one), so a forward pass
holds at most ``batch_size`` images as before.

Mirroring suits most photographs; it does not suit images whose meaning changes in a
mirror (digits, text, left/right classes), which should keep ``none``.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch.nn import functional

from tltk.errors import SettingError, TltkError
from tltk.runtime import Forward, Inference
from tltk.settings import TTA_MODES

CROP_SCALE = 7 / 8
VIEWS = {"none": 1, "flip": 2, "flip+crops": 10}


def check_tta(tta: str) -> None:
    if tta not in TTA_MODES:
        raise SettingError(f"tta '{tta}' is not one of {', '.join(TTA_MODES)}.", ["tta"])


def view_count(tta: str) -> int:
    check_tta(tta)
    return VIEWS[tta]


def views(images: torch.Tensor, tta: str) -> torch.Tensor:
    """The views of a batch (N, C, H, W) stacked view by view: (views * N, C, H, W), the
    first N rows the images themselves."""
    check_tta(tta)
    if images.dim() != 4:
        raise TltkError(f"test-time augmentation needs image batches (N, C, H, W); this model's input has "
                        f"{images.dim()} dimensions, so use --tta none.")
    if tta == "none":
        return images
    bases = [images] if tta == "flip" else [images, *corner_crops(images)]
    stacked = torch.cat([view for base in bases for view in (base, torch.flip(base, dims=[3]))])
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        return stacked.contiguous(memory_format=torch.channels_last)
    return stacked


def corner_crops(images: torch.Tensor, scale: float = CROP_SCALE) -> list[torch.Tensor]:
    """The top-left, top-right, bottom-left and bottom-right crops of ``scale`` of each side,
    resized back to the batch's height and width."""
    height, width = images.shape[-2:]
    crop_h, crop_w = max(1, round(height * scale)), max(1, round(width * scale))
    crops = [images[..., :crop_h, :crop_w], images[..., :crop_h, width - crop_w:],
             images[..., height - crop_h:, :crop_w], images[..., height - crop_h:, width - crop_w:]]
    return [functional.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False) for crop in crops]


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Softmax over classes (multi-class) or a sigmoid per class (multi-label), in fp32."""
    logits = logits.float()
    return torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=1)


def averaged_probabilities(model: nn.Module, task: str, tta: str) -> Forward:
    """A forward for ``runtime.stream_outputs`` that returns each image's probabilities
    averaged over the views of ``tta``, with every view of a batch in one pass."""
    count = view_count(tta)

    def forward(images: torch.Tensor) -> torch.Tensor:
        outputs = probabilities(model(views(images, tta)), task)
        return outputs.reshape(count, len(images), *outputs.shape[1:]).mean(dim=0)

    return forward


def tta_inference(settings: Inference, tta: str) -> Inference:
    """The settings with the loader's batch shrunk so that the stacked views of a batch hold
    at most ``settings.batch_size`` images."""
    return replace(settings, batch_size=max(1, settings.batch_size // view_count(tta)))
