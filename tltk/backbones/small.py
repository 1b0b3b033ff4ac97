"""Small networks trained from scratch, as in the course assignments.

Each splits into ``features`` (convolutions, the spatial map) and ``fc`` (the dense
layers that make the feature vector); the classifier is the head, never part of the
backbone. Fixed input sizes, because the flatten step fixes them.
"""

from __future__ import annotations

import torch
from torch import nn

from tltk.backbones import register_backbone
from tltk.backbones.base import HALF_MEAN, HALF_STD, Backbone, Preprocessing


class ConvThenDense(Backbone):
    def forward_spatial(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)

    def forward_vector(self, spatial: torch.Tensor) -> torch.Tensor:
        return self.net.fc(torch.flatten(spatial, 1))


def _conv_then_dense(
    name: str, features: nn.Sequential, fc: nn.Sequential, size: int, layers: dict[str, str]
) -> Backbone:
    net = nn.Module()
    net.features = features
    net.fc = fc
    dense = [m for m in fc.modules() if isinstance(m, nn.Linear)]
    convs = [m for m in features.modules() if isinstance(m, nn.Conv2d)]
    return ConvThenDense(
        net,
        name=name,
        feature_dim=dense[-1].out_features,
        spatial_channels=convs[-1].out_channels,
        preprocessing=Preprocessing((size, size), HALF_MEAN, HALF_STD),
        layers=layers,
    )


def _no_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:  # build_backbone checks this first; a direct call gets the same answer
        raise ValueError(f"{name} has no published pretrained weights")


@register_backbone("simplecnn", pretrained=False, description="3 x (5x5 conv + 2x2 max-pool), dense 64; 32x32")
def simplecnn(pretrained: bool = False) -> Backbone:
    _no_pretrained("simplecnn", pretrained)
    blocks: list[nn.Module] = []
    channels = [3, 32, 64, 128]
    for c_in, c_out in zip(channels, channels[1:]):
        blocks += [nn.Conv2d(c_in, c_out, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    fc = nn.Sequential(nn.Linear(128 * 4 * 4, 64), nn.ReLU(inplace=True))
    layers = {"conv1": "features.1", "pool5": "features.8", "fc7": "fc.1"}
    return _conv_then_dense("simplecnn", nn.Sequential(*blocks), fc, 32, layers)


@register_backbone("lenet5", pretrained=False, description="LeNet-5: 6 and 16 5x5 convs, dense 120-84; 32x32")
def lenet5(pretrained: bool = False) -> Backbone:
    _no_pretrained("lenet5", pretrained)
    features = nn.Sequential(
        nn.Conv2d(3, 6, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
    )
    fc = nn.Sequential(nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True), nn.Linear(120, 84), nn.ReLU(inplace=True))
    layers = {"conv1": "features.1", "pool5": "features.5", "fc6": "fc.1", "fc7": "fc.3"}
    return _conv_then_dense("lenet5", features, fc, 32, layers)


@register_backbone("mnist-cnn", pretrained=False, description="TensorFlow-tutorial MNIST CNN: 32, 64 5x5 convs, dense 1024; 28x28")
def mnist_cnn(pretrained: bool = False) -> Backbone:
    _no_pretrained("mnist-cnn", pretrained)
    features = nn.Sequential(
        nn.Conv2d(3, 32, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
    )
    fc = nn.Sequential(nn.Linear(64 * 7 * 7, 1024), nn.ReLU(inplace=True), nn.Dropout(0.4))
    layers = {"conv1": "features.1", "pool5": "features.5", "fc7": "fc.1"}
    return _conv_then_dense("mnist-cnn", features, fc, 28, layers)
