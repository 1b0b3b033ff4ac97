"""Small networks trained from scratch, as in the course assignments.

Each splits into ``features`` (convolutions, the spatial map) and ``fc`` (the dense
layers that make the feature vector); the classifier is the head, never part of the
backbone. Fixed input sizes, because the flatten step fixes them.

The option checks at the end are shared with the other course networks
(``tltk.backbones.course``, ``tltk.backbones.sequence``): ``--backbone-opt`` values
arrive typed by guess (``true`` → bool, ``0.1`` → float, else text), so a factory must
refuse a value of the wrong kind rather than let ``batchnorm=yes`` pass as truthy text.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from tltk.backbones.base import HALF_MEAN, HALF_STD, Backbone, Preprocessing
from tltk.plugin import backbone_factory
from tltk.errors import TltkError

ACTIVATIONS = ("relu", "leakyrelu")


class ConvThenDense(Backbone):
    def forward_spatial(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)

    def forward_vector(self, spatial: torch.Tensor) -> torch.Tensor:
        return self.net.fc(torch.flatten(spatial, 1))


def conv_then_dense(
    name: str, features: nn.Sequential, fc: nn.Sequential, size: int, layers: dict[str, str]
) -> Backbone:
    """Wrap ``features`` and ``fc`` as a backbone reading ``size`` x ``size`` images."""
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


def no_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:  # build_backbone checks this first; a direct call gets the same answer
        raise ValueError(f"{name} has no published pretrained weights")


@backbone_factory(pretrained=False, description="3 x (5x5 conv + 2x2 max-pool), dense 64; 32x32")
def simplecnn(pretrained: bool = False) -> Backbone:
    no_pretrained("simplecnn", pretrained)
    blocks: list[nn.Module] = []
    channels = [3, 32, 64, 128]
    for c_in, c_out in zip(channels, channels[1:]):
        blocks += [nn.Conv2d(c_in, c_out, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    fc = nn.Sequential(nn.Linear(128 * 4 * 4, 64), nn.ReLU(inplace=True))
    layers = {"conv1": "features.1", "pool5": "features.8", "fc7": "fc.1"}
    return conv_then_dense("simplecnn", nn.Sequential(*blocks), fc, 32, layers)


@backbone_factory(pretrained=False,
    description="LeNet-5: 6 and 16 5x5 convs, dense 120-84; 32x32; options act, negative_slope, batchnorm",
)
def lenet5(pretrained: bool = False, act: str = "relu", negative_slope: float = 0.01, batchnorm: bool = False) -> Backbone:
    """LeNet-5, optionally with LeakyReLU and BatchNorm: the two changes a CIFAR-10 report credits with +10 points.

    ``batchnorm`` puts a BatchNorm after every conv and hidden dense layer, before its
    activation; the defaults build the plain network, layer for layer.
    """
    no_pretrained("lenet5", pretrained)
    check_choice("lenet5", "act", act, ACTIVATIONS)
    check_number("lenet5", "negative_slope", negative_slope)
    check_flag("lenet5", "batchnorm", batchnorm)
    if act != "leakyrelu" and negative_slope != 0.01:
        raise TltkError(
            f"lenet5 option negative_slope={negative_slope} applies only to act=leakyrelu; "
            f"add --backbone-opt act=leakyrelu or drop negative_slope."
        )
    features = TappedSequence("features")
    for c_in, c_out in ((3, 6), (6, 16)):
        features.add(nn.Conv2d(c_in, c_out, 5), *_batchnorm(batchnorm, nn.BatchNorm2d, c_out))
        features.add(activation(act, negative_slope), tap="conv1")
        features.add(nn.MaxPool2d(2), tap="pool5", last=True)
    fc = TappedSequence("fc")
    for tap, (n_in, n_out) in zip(("fc6", "fc7"), ((16 * 5 * 5, 120), (120, 84))):
        fc.add(nn.Linear(n_in, n_out), *_batchnorm(batchnorm, nn.BatchNorm1d, n_out))
        fc.add(activation(act, negative_slope), tap=tap)
    return conv_then_dense("lenet5", features.build(), fc.build(), 32, features.taps | fc.taps)


def _batchnorm(enabled: bool, kind: type[nn.Module], channels: int) -> list[nn.Module]:
    return [kind(channels)] if enabled else []


@backbone_factory(pretrained=False, description="TensorFlow-tutorial MNIST CNN: 32, 64 5x5 convs, dense 1024; 28x28")
def mnist_cnn(pretrained: bool = False) -> Backbone:
    no_pretrained("mnist-cnn", pretrained)
    features = nn.Sequential(
        nn.Conv2d(3, 32, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
    )
    fc = nn.Sequential(nn.Linear(64 * 7 * 7, 1024), nn.ReLU(inplace=True), nn.Dropout(0.4))
    layers = {"conv1": "features.1", "pool5": "features.5", "fc7": "fc.1"}
    return conv_then_dense("mnist-cnn", features, fc, 28, layers)


# --- building blocks shared with the other course networks ------------------------------


class TappedSequence:
    """Collects modules for an ``nn.Sequential`` and notes where the named layer taps fall.

    Optional layers (BatchNorm, an activation choice) shift every index after them, so
    the taps are recorded as the modules are added instead of written out by hand.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.modules: list[nn.Module] = []
        self.taps: dict[str, str] = {}

    def add(self, *modules: nn.Module, tap: str | None = None, last: bool = False) -> None:
        """Append ``modules``; ``tap`` names the last of them (the first time, or every time with ``last``)."""
        self.modules.extend(modules)
        if tap is not None and (last or tap not in self.taps):
            self.taps[tap] = f"{self.prefix}.{len(self.modules) - 1}"

    def build(self) -> nn.Sequential:
        return nn.Sequential(*self.modules)


def activation(act: str, negative_slope: float = 0.01) -> nn.Module:
    """``relu`` or ``leakyrelu`` (with its slope for negative inputs), in place like the rest."""
    if act == "leakyrelu":
        return nn.LeakyReLU(negative_slope, inplace=True)
    return nn.ReLU(inplace=True)


def check_choice(net: str, option: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise TltkError(
            f"{net} option {option}={value!r} is not one of {', '.join(choices)}; "
            f"pass e.g. --backbone-opt {option}={choices[-1]}."
        )


def check_flag(net: str, option: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TltkError(f"{net} option {option}={value!r} is not true or false; pass --backbone-opt {option}=true.")


def check_number(net: str, option: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TltkError(f"{net} option {option}={value!r} is not a number; pass e.g. --backbone-opt {option}=0.1.")


def check_positive_int(net: str, option: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TltkError(f"{net} option {option}={value!r} is not a whole number of at least 1; pass e.g. --backbone-opt {option}=2.")
