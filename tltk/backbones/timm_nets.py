"""ResNet-18 and any timm model (``timm:NAME``), through timm's own factory and hub code.

timm gives every model ``forward_features`` (the last map) and ``forward_head(...,
pre_logits=True)`` (the pooled vector), which are exactly our two steps, and a
pretrained config holding input size and normalisation.
"""

from __future__ import annotations

import torch

from tltk.backbones.base import Backbone, BackboneInfo, Preprocessing
from tltk.plugin import backbone_factory
from tltk.errors import UnknownNameError


class TimmBackbone(Backbone):
    def forward_spatial(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)

    def forward_vector(self, spatial: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(spatial, pre_logits=True)

    def stages(self) -> list[list[torch.nn.Parameter]]:
        """timm's own block grouping (stem, layer1.0, layer1.1, ...) where the model has one."""
        if not hasattr(self.net, "group_matcher"):
            return super().stages()
        from timm.models import group_parameters

        named = dict(self.net.named_parameters())
        groups = group_parameters(self.net, self.net.group_matcher(coarse=False))
        return [[named[n] for n in names] for _, names in sorted(groups.items())]


def build_timm_backbone(model_name: str, pretrained: bool) -> Backbone:
    import timm

    from tltk.weights import create_timm_pretrained

    if pretrained:
        net = create_timm_pretrained(model_name)
    else:
        net = timm.create_model(model_name, pretrained=False, num_classes=0)
    cfg = net.pretrained_cfg
    _, height, width = cfg.get("input_size", (3, 224, 224))
    backbone = TimmBackbone(
        net,
        name=model_name,
        feature_dim=getattr(net, "head_hidden_size", None) or net.num_features,
        spatial_channels=net.num_features,
        preprocessing=Preprocessing((height, width), tuple(cfg["mean"]), tuple(cfg["std"])),
        layers=_timm_layers(net),
    )
    if pretrained:
        backbone.pretrained_source = f"timm:{cfg.get('hf_hub_id') or model_name}"
    return backbone


def _timm_layers(net: torch.nn.Module) -> dict[str, str]:
    first_conv = net.pretrained_cfg.get("first_conv")
    layers = {"conv1": first_conv} if isinstance(first_conv, str) else {}
    return layers


def timm_backbone_info(model_name: str) -> BackboneInfo:
    import timm

    if not timm.is_model(model_name):
        close = timm.list_models(f"*{model_name}*")[:5]
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise UnknownNameError(
            f"timm has no model '{model_name}'.{hint} `python -c \"import timm; print(timm.list_models())\"` lists them."
        )

    def factory(pretrained: bool = False) -> Backbone:
        return build_timm_backbone(model_name, pretrained)

    return BackboneInfo(f"timm:{model_name}", factory, timm.is_model_pretrained(model_name), "timm model")


@backbone_factory(pretrained=True, description="ResNet-18 from timm, 512-d pooled features")
def resnet18(pretrained: bool = False) -> Backbone:
    backbone = build_timm_backbone("resnet18", pretrained)
    backbone.layers.update({"pool5": "layer4", "layer4": "layer4"})
    return backbone
