"""The one shape every backbone has, whatever library built it.

A backbone maps images to features in two steps, so that heads can attach at either:
``forward_spatial`` gives the last convolutional map (what a ``conv`` head reads, and
``pool5`` in the literature's words), ``forward_vector`` turns that map into the feature
vector that ``linear`` and ``mlp`` heads read (fc7 on AlexNet/VGG, the pooled map on
ResNet). The wrapped network lives in ``.net`` with its library's own parameter names,
so weight files written by that library load without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from tltk.errors import TltkError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneInfo:
    """What a registered backbone name promises before anything is built."""

    name: str
    factory: Callable[..., "Backbone"]
    pretrained_available: bool
    description: str = ""


@dataclass
class Preprocessing:
    """Input size and normalisation: they travel with the weights into every run
    (config.json's "preprocessing"), so whatever uses a model later feeds it images the way
    it was trained on them."""

    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Preprocessing:
        size, mean, std = (tuple(record[key]) for key in ("input_size", "mean", "std"))
        return cls((int(size[0]), int(size[1])), tuple(float(v) for v in mean),  # type: ignore[arg-type]
                   tuple(float(v) for v in std))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, list[Any]]:
        """The JSON form written into config.json and store manifests (and fingerprinted)."""
        return {"input_size": [int(v) for v in self.input_size], "mean": [float(v) for v in self.mean],
                "std": [float(v) for v in self.std]}

    def resized(self, input_size: int | None) -> Preprocessing:
        """The same normalisation at ``input_size`` x ``input_size`` (unchanged for None)."""
        if input_size is None:
            return Preprocessing(tuple(self.input_size), tuple(self.mean), tuple(self.std))  # type: ignore[arg-type]
        return Preprocessing((input_size, input_size), tuple(self.mean), tuple(self.std))  # type: ignore[arg-type]

    def train_transform(self, augment: str) -> Callable[[Any], torch.Tensor]:
        from tltk.data.transforms import build_transforms

        return build_transforms(tuple(self.input_size), self.mean, self.std, augment, train=True)

    def eval_transform(self) -> Callable[[Any], torch.Tensor]:
        """Resize and normalise, nothing random: what evaluation, prediction and extraction feed."""
        from tltk.data.transforms import build_transforms

        return build_transforms(tuple(self.input_size), self.mean, self.std, "none", train=False)


class Backbone(nn.Module):
    """A feature extractor with a uniform interface over torchvision, timm and our own nets."""

    def __init__(
        self,
        net: nn.Module,
        *,
        name: str,
        feature_dim: int,
        spatial_channels: int | None,
        preprocessing: Preprocessing,
        layers: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.name = name
        self.feature_dim = feature_dim
        self.spatial_channels = spatial_channels
        self.preprocessing = preprocessing
        self.layers = dict(layers or {})
        self.pretrained_source: str | None = None

    def forward_spatial(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define forward_spatial")

    def forward_vector(self, spatial: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define forward_vector")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_vector(self.forward_spatial(x))

    def stages(self) -> list[list[nn.Parameter]]:
        """Parameters grouped from input to output, for layer-wise learning rates.

        Each layer with weights is a stage; a normalisation layer joins the layer
        before it, since the two act as one.
        """
        stages: list[list[nn.Parameter]] = []
        for module in self.net.modules():
            own = list(module.parameters(recurse=False))
            if not own:
                continue
            if stages and isinstance(module, _NORM_TYPES):
                stages[-1].extend(own)
            else:
                stages.append(own)
        return stages


_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


# What a forward pass raises when the input size does not fit the layers: a dense layer
# sized for another input (RuntimeError), a map pooled below one pixel (RuntimeError or
# ValueError), a transformer's fixed patch grid (timm asserts).
SIZE_ERRORS = (RuntimeError, ValueError, AssertionError)


def unusable_input_size(backbone: Backbone, size: Sequence[int], error: BaseException) -> TltkError:
    """The one sentence for an input size the network's layers cannot take."""
    reason = (str(error).splitlines() or [type(error).__name__])[0][:120]
    return TltkError(f"{backbone.name} cannot run on {size[0]}x{size[1]} images ({reason}); "
                     f"use its own input size {tuple(backbone.preprocessing.input_size)}.")


def check_size_option(input_size: int | None) -> None:
    """``--input-size`` as given: None means the backbone's own size; a number must be a
    pixel count, so 0 is refused rather than read as "no size given"."""
    if input_size is not None and input_size < 1:
        raise TltkError(f"--input-size must be at least 1, not {input_size}; leave it out for the backbone's own.")


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "Backbone",
    "BackboneInfo",
    "Preprocessing",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "HALF_MEAN",
    "HALF_STD",
    "SIZE_ERRORS",
    "check_size_option",
    "count_parameters",
    "unusable_input_size",
]
