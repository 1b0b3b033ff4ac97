"""The trainable model: a backbone and a head, with what is needed to rebuild them.

``TransferModel`` keeps a frozen backbone in eval mode even when the model is put in
train mode: ``requires_grad=False`` alone leaves BatchNorm running statistics drifting
and dropout active, the common bug this prevents.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tltk.backbones import Backbone, backbone_info, build_backbone
from tltk.errors import TltkError
from tltk.fileio import user_path
from tltk.heads import build_head, head_uses_spatial, recorded_head_options
from tltk.weights import apply_init, load_backbone_weights


@dataclass
class ModelSpec:
    """Everything needed to rebuild the network's shape (weights come separately)."""

    backbone: str
    head: str
    num_classes: int
    head_options: dict[str, Any] = field(default_factory=dict)
    weights: str = "auto"
    init: str = "default"
    backbone_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TransferModel(nn.Module):
    def __init__(self, backbone: Backbone, head: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.spec = spec
        self.uses_spatial = head_uses_spatial(head)
        self.backbone_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = self.backbone.forward_spatial(x)
        if self.uses_spatial:
            return self.head(spatial)
        return self.head(self.backbone.forward_vector(spatial))

    def freeze_backbone(self, frozen: bool = True) -> None:
        self.backbone_frozen = frozen
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def frozen_modules(self) -> list[str]:
        """The outermost modules whose every parameter is frozen ("backbone" when all of it
        is): recorded in config.json at the end of training, so a reloaded run is frozen
        where its strategy left it, whichever strategy that was."""
        found: list[str] = []

        def visit(name: str, module: nn.Module) -> None:
            parameters = list(module.parameters())
            if parameters and not any(p.requires_grad for p in parameters):
                found.append(name)
                return
            for child_name, child in module.named_children():
                visit(f"{name}.{child_name}", child)

        for name, child in self.named_children():
            visit(name, child)
        return found

    def freeze_modules(self, names: Sequence[str]) -> None:
        """Freeze what ``frozen_modules`` named; the whole backbone through ``freeze_backbone``.
        The BatchNorm statistics of what is frozen then hold (see ``train``)."""
        for name in names:
            if name == "backbone":
                self.freeze_backbone(True)
            else:
                self.get_submodule(name).requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "TransferModel":
        """Train mode, except where training must not change anything: a frozen backbone
        stays in eval mode as a whole, and so does every BatchNorm whose own parameters are
        frozen, so a strategy that thaws only some stages trains those stages' statistics and
        keeps the others' as loaded."""
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        for module in self.modules():
            if isinstance(module, _BatchNorm) and _all_frozen(module):
                module.eval()
        return self

    @property
    def preprocessing(self):  # type: ignore[no-untyped-def]
        return self.backbone.preprocessing


def _all_frozen(module: nn.Module) -> bool:
    """Whether the module holds parameters of its own and none of them trains."""
    own = list(module.parameters(recurse=False))
    return bool(own) and not any(p.requires_grad for p in own)


def resolve_weights_choice(backbone: str, weights: str) -> str:
    """``auto`` means ImageNet where the backbone has published weights, else none."""
    if weights != "auto":
        return weights
    return "imagenet" if backbone_info(backbone).pretrained_available else "none"


def build_model(spec: ModelSpec, *, load_weights: bool = True) -> TransferModel:
    """Build backbone and head; with ``load_weights`` the backbone gets ``spec.weights``.

    ``load_weights=False`` builds the bare shape, for reloading a run's own weights.
    """
    choice = resolve_weights_choice(spec.backbone, spec.weights)
    backbone = build_backbone(
        spec.backbone, pretrained=load_weights and choice == "imagenet", **spec.backbone_options
    )
    if load_weights and choice not in ("imagenet", "none"):
        backbone.pretrained_source = load_backbone_weights(backbone, user_path(choice))
    # A recorded run is rebuilt as it trained, without options its head ignored back then.
    head_options = spec.head_options if load_weights else recorded_head_options(spec.head, spec.head_options)
    head = build_head(
        spec.head, backbone.feature_dim, backbone.spatial_channels, spec.num_classes, **head_options
    )
    if load_weights and choice == "none":
        apply_init(backbone, spec.init)
    if spec.init != "default":
        apply_init(head, spec.init)
    if spec.num_classes < 1:
        raise TltkError(f"num_classes must be at least 1, not {spec.num_classes}.")
    return TransferModel(backbone, head, spec)
