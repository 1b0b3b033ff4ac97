"""Backbone registry: names people type (``resnet18``, ``timm:convnext_tiny``) to networks.

Built-in families live one per module; each factory is marked with
``tltk.plugin.backbone_factory`` (published weights or not, a description) as a plugin's
is, and declared only as an entry point in tltk's pyproject.toml under the
``tltk.backbones`` group, the group through which other packages add theirs. Nothing here
imports torch: listing names reads package metadata only, and a family's module is
imported when one of its backbones is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tltk.errors import TltkError
from tltk.kinds import BACKBONE
from tltk.registry import BACKBONES, build_from

if TYPE_CHECKING:
    from tltk.backbones.base import Backbone, BackboneInfo, Preprocessing

TIMM_PREFIX = "timm:"


def backbone_info(name: str) -> BackboneInfo:
    if name.startswith(TIMM_PREFIX):
        from tltk.backbones.timm_nets import timm_backbone_info

        return timm_backbone_info(name[len(TIMM_PREFIX):])
    from tltk.backbones.base import BackboneInfo

    factory = BACKBONES.get(name)
    pretrained = bool(getattr(factory, "pretrained_available", False))
    return BackboneInfo(name, factory, pretrained, str(getattr(factory, "description", "") or ""))


def build_backbone(name: str, *, pretrained: bool = False, **options: Any) -> Backbone:
    """Build the named backbone through the one component path (``tltk.registry.build_from``);
    ``pretrained`` asks its library for published weights."""
    info = backbone_info(name)
    if pretrained and not info.pretrained_available:
        raise TltkError(
            f"backbone '{name}' has no published pretrained weights; "
            f"use --weights none, a weights file, or a run directory."
        )
    origin = "timm" if name.startswith(TIMM_PREFIX) else BACKBONES.origin(name)
    backbone = build_from(BACKBONE, name, info.factory, origin, pretrained=pretrained, **options)
    backbone.name = name
    return backbone


_LAZY = {"Backbone", "BackboneInfo", "Preprocessing"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:  # torch comes with them, so they load on first use
        return getattr(importlib.import_module("tltk.backbones.base"), name)
    raise AttributeError(f"module 'tltk.backbones' has no attribute '{name}'")


__all__ = ["BACKBONES", "Backbone", "BackboneInfo", "Preprocessing", "backbone_info", "build_backbone"]
