"""The torch modules behind ``tinyconv`` and ``cosine``, imported when one is built."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tltk.plugin import HALF_MEAN, HALF_STD, Backbone, Preprocessing

INPUT_SIZE = 32


class TinyConv(Backbone):
    """``features`` give the spatial map (pool5), ``fc`` the 64-d feature vector (fc7)."""

    def forward_spatial(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)

    def forward_vector(self, spatial: torch.Tensor) -> torch.Tensor:
        return self.net.fc(torch.flatten(spatial, 1))


def build_tinyconv(width: int) -> TinyConv:
    channels = [3, width, 2 * width, 4 * width]
    blocks: list[nn.Module] = []
    for c_in, c_out in zip(channels, channels[1:]):
        blocks += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                   nn.MaxPool2d(2)]
    net = nn.Module()
    net.features = nn.Sequential(*blocks)
    side = INPUT_SIZE // 2 ** 3
    net.fc = nn.Sequential(nn.Linear(channels[-1] * side * side, 64), nn.ReLU(inplace=True))
    # The literature's names for the layers people extract features from.
    layers = {"conv1": "features.2", "pool5": "features.11", "fc7": "fc.1"}
    return TinyConv(net, name="tinyconv", feature_dim=64, spatial_channels=channels[-1],
                    preprocessing=Preprocessing((INPUT_SIZE, INPUT_SIZE), HALF_MEAN, HALF_STD), layers=layers)


class CosineHead(nn.Module):
    """logits = s * cos(features, w_c) for each class c, with a learned temperature s."""

    def __init__(self, in_features: int, num_classes: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, in_features) * in_features ** -0.5)
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).t()
