"""AlexNet and VGG in torchvision's layout, so fc6 and fc7 are real Linear layers.

The original 1000-way classifier (``classifier.6``) is replaced by the identity: the
feature vector is fc7 after its ReLU and dropout, 4096-d, which is what transfer-learning
courses mean by "fc7 features".
"""

from __future__ import annotations

import torch
from torch import nn

from tltk.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, Preprocessing
from tltk.plugin import backbone_factory


class ClassifierStackBackbone(Backbone):
    """``features`` → ``avgpool`` → ``classifier`` minus its last layer."""

    def forward_spatial(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)

    def forward_vector(self, spatial: torch.Tensor) -> torch.Tensor:
        return self.net.classifier(torch.flatten(self.net.avgpool(spatial), 1))


def _torchvision_backbone(arch: str, pretrained: bool, input_size: int, layers: dict[str, str]) -> Backbone:
    from torchvision import models

    from tltk.weights import load_torchvision_pretrained

    net = models.get_model(arch, weights=None)
    if pretrained:
        load_torchvision_pretrained(net, arch)
    net.classifier[6] = nn.Identity()
    backbone = ClassifierStackBackbone(
        net,
        name=arch,
        feature_dim=4096,
        spatial_channels=_last_conv_channels(net.features),
        preprocessing=Preprocessing((input_size, input_size), IMAGENET_MEAN, IMAGENET_STD),
        layers=layers,
    )
    if pretrained:
        backbone.pretrained_source = f"torchvision:{arch}:IMAGENET1K_V1"
    return backbone


def _last_conv_channels(features: nn.Module) -> int:
    convs = [m for m in features.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def _vgg_layers(features_len: int, first_relu: int) -> dict[str, str]:
    return {
        "conv1": f"features.{first_relu}",
        "pool5": f"features.{features_len - 1}",
        "fc6": "classifier.1",
        "fc7": "classifier.4",
    }


@backbone_factory(pretrained=True, description="AlexNet (torchvision layout), fc7 = 4096-d")
def alexnet(pretrained: bool = False) -> Backbone:
    layers = {"conv1": "features.1", "pool5": "features.12", "fc6": "classifier.2", "fc7": "classifier.5"}
    return _torchvision_backbone("alexnet", pretrained, 224, layers)


@backbone_factory(pretrained=True, description="VGG-16 (torchvision layout), fc7 = 4096-d")
def vgg16(pretrained: bool = False) -> Backbone:
    return _torchvision_backbone("vgg16", pretrained, 224, _vgg_layers(31, first_relu=1))


@backbone_factory(pretrained=True, description="VGG-16 with BatchNorm (torchvision layout)")
def vgg16_bn(pretrained: bool = False) -> Backbone:
    return _torchvision_backbone("vgg16_bn", pretrained, 224, _vgg_layers(44, first_relu=2))
