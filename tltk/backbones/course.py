"""The course reports' own CNNs, so each can stand beside a pretrained backbone in one table.

- ``alexnet-bn``: the VOC multi-label report's network, torchvision's AlexNet layout
  (64-192-384-256-256 convs, fc6/fc7 4096) with a BatchNorm after every conv, at 227 px.
- ``cifar-vgg7-bn`` and ``cifar-vgg11-bn``: a CIFAR-10 report's ``GoodModel`` and
  ``GoodestModel``, VGG-style 3x3 conv stacks named, as VGG is, by their weight layers
  counting the 10-way classifier (5 conv + 2 dense, 8 conv + 3 dense).

Module indices inside ``features`` and ``classifier``/``fc`` follow the reports' printed
layer lists, so a layer of the report is found under the same number here. The last
Linear of each report's classifier is the head (``--head linear``), never the backbone.
"""

from __future__ import annotations

from torch import nn

from tltk.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, Preprocessing
from tltk.plugin import backbone_factory
from tltk.backbones.small import conv_then_dense, no_pretrained
from tltk.backbones.torchvision_nets import ClassifierStackBackbone

# --- alexnet-bn -------------------------------------------------------------------------

ALEXNET_CONVS = (  # (out_channels, kernel, stride, padding, max-pool after)
    (64, 11, 4, 2, True),
    (192, 5, 1, 2, True),
    (384, 3, 1, 1, False),
    (256, 3, 1, 1, False),
    (256, 3, 1, 1, True),
)


@backbone_factory(pretrained=False,
    description="AlexNet (torchvision layout) with BatchNorm after every conv, fc7 = 4096-d; 227x227",
)
def alexnet_bn(pretrained: bool = False) -> Backbone:
    """AlexNet with conv → BatchNorm → ReLU blocks, as the VOC report built it from scratch.

    BatchNorm keeps its running statistics (the report's had ``track_running_stats=False``,
    which makes a prediction depend on the rest of its batch); statistics are buffers,
    not parameters, so the parameter count is the report's either way.
    """
    no_pretrained("alexnet-bn", pretrained)
    net = nn.Module()
    net.features = _alexnet_bn_features()
    net.avgpool = nn.AdaptiveAvgPool2d((6, 6))
    net.classifier = nn.Sequential(
        nn.Dropout(0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
        nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
    )
    layers = {"conv1": "features.2", "pool5": "features.17", "fc6": "classifier.2", "fc7": "classifier.5"}
    return ClassifierStackBackbone(
        net,
        name="alexnet-bn",
        feature_dim=4096,
        spatial_channels=256,
        preprocessing=Preprocessing((227, 227), IMAGENET_MEAN, IMAGENET_STD),
        layers=layers,
    )


def _alexnet_bn_features() -> nn.Sequential:
    modules: list[nn.Module] = []
    c_in = 3
    for c_out, kernel, stride, padding, pool in ALEXNET_CONVS:
        modules += [
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]
        if pool:
            modules.append(nn.MaxPool2d(kernel_size=3, stride=2))
        c_in = c_out
    return nn.Sequential(*modules)


# --- the CIFAR-10 report's VGG-style nets -----------------------------------------------


@backbone_factory(pretrained=False,
    description="CIFAR-10 report's GoodModel: 5 3x3 convs (32-32-64-64-128) + BatchNorm, dense 64; 32x32",
)
def cifar_vgg7_bn(pretrained: bool = False) -> Backbone:
    """``GoodModel``: conv → ReLU → BatchNorm blocks (that order, as printed), dense 64 with dropout 0.15.

    The report's classifier also ends in a ``Dropout(0.15)`` after its 10-way Linear, which
    randomly zeroes logits in training; tltk's heads end in their Linear, so that dropout
    is not reproduced (it has no parameters, the count is unchanged).
    """
    no_pretrained("cifar-vgg7-bn", pretrained)
    modules: list[nn.Module] = []
    for c_in, c_out, pool in ((3, 32, False), (32, 32, True), (32, 64, False), (64, 64, True), (64, 128, True)):
        modules += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(c_out)]
        if pool:
            modules.append(nn.MaxPool2d(2))
    fc = nn.Sequential(nn.Linear(128 * 4 * 4, 64), nn.ReLU(), nn.Dropout(0.15))
    layers = {"conv1": "features.1", "pool5": "features.17", "fc7": "fc.1"}
    return conv_then_dense("cifar-vgg7-bn", nn.Sequential(*modules), fc, 32, layers)


@backbone_factory(pretrained=False,
    description="CIFAR-10 report's GoodestModel: 8 3x3 convs (64 to 512) + BatchNorm, dense 1024-1024; 32x32",
)
def cifar_vgg11_bn(pretrained: bool = False) -> Backbone:
    """``GoodestModel``: four pairs of conv → BatchNorm → ReLU, each pair pooled, dropout rising 0.1 → 0.5."""
    no_pretrained("cifar-vgg11-bn", pretrained)
    modules: list[nn.Module] = []
    c_in = 3
    for c_out, dropout in ((64, 0.1), (128, 0.2), (256, 0.3), (512, 0.5)):
        for conv_in in (c_in, c_out):
            modules += [nn.Conv2d(conv_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        modules += [nn.MaxPool2d(2), nn.Dropout(dropout)]
        c_in = c_out
    fc = nn.Sequential(
        nn.Linear(512 * 2 * 2, 1024), nn.BatchNorm1d(1024), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(1024, 1024), nn.BatchNorm1d(1024), nn.ReLU(), nn.Dropout(0.5),
    )
    layers = {"conv1": "features.2", "pool5": "features.30", "fc6": "fc.2", "fc7": "fc.6"}
    return conv_then_dense("cifar-vgg11-bn", nn.Sequential(*modules), fc, 32, layers)


__all__ = ["alexnet_bn", "cifar_vgg7_bn", "cifar_vgg11_bn"]
