"""Backbone registry: names people type (``resnet18``, ``timm:convnext_tiny``) to networks.

Built-in families live one per module; each factory carries ``register_backbone``
(from ``backbones/register.py``) and is also named in tltk's pyproject.toml under the
``tltk.backbones`` entry-point group, the group through which other packages add theirs. Nothing here imports torch: listing names
reads package metadata only, and a family's module is imported when one of its
backbones is built.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any

from tltk.backbones.register import Factory, register_backbone
from tltk.errors import TltkError
from tltk.plugin import backbone_problems
from tltk.registry import BACKBONES, PluginError

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
    """Build the named backbone; ``pretrained`` asks its library for published weights."""
    info = backbone_info(name)
    if pretrained and not info.pretrained_available:
        raise TltkError(
            f"backbone '{name}' has no published pretrained weights; "
            f"use --weights none, a weights file, or a run directory."
        )
    _check_options(name, info.factory, options)
    backbone = info.factory(pretrained=pretrained, **options)
    problems = backbone_problems(backbone)
    if problems:
        origin = "timm" if name.startswith(TIMM_PREFIX) else BACKBONES.origin(name)
        raise PluginError(
            f"backbone '{name}' from {origin} does not meet the backbone contract: {'; '.join(problems)}; "
            f"see BackboneModule in tltk.plugin."
        )
    backbone.name = name
    return backbone


def _check_options(name: str, factory: Factory, options: dict[str, Any]) -> None:
    """Unknown --backbone-opt keys are an error that lists the ones the factory takes."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p != "pretrained"]
    unknown = [k for k in options if k not in accepted]
    if unknown:
        takes = ", ".join(accepted) if accepted else "no options"
        raise TltkError(f"backbone '{name}' has no option '{unknown[0]}'; it takes: {takes}.")


_LAZY = {"Backbone", "BackboneInfo", "Preprocessing"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:  # torch comes with them, so they load on first use
        return getattr(importlib.import_module("tltk.backbones.base"), name)
    raise AttributeError(f"module 'tltk.backbones' has no attribute '{name}'")


__all__ = ["BACKBONES", "Backbone", "BackboneInfo", "Preprocessing", "backbone_info", "build_backbone", "register_backbone"]
