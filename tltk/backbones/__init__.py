"""Backbone registry: names people type (``resnet18``, ``timm:convnext_tiny``) to networks.

Built-in families live one per module and register with ``register_backbone`` next to
their factories; other packages add theirs through the ``tltk.backbones`` entry-point
group. Factories import their library (torchvision, timm) only when called, so listing
names stays fast.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from tltk.backbones.base import Backbone, BackboneInfo, Preprocessing
from tltk.errors import TltkError
from tltk.registry import Registry

BACKBONES: Registry[BackboneInfo] = Registry("backbone", group="tltk.backbones")
TIMM_PREFIX = "timm:"

Factory = Callable[..., Backbone]


def register_backbone(
    name: str, *, pretrained: bool, description: str = ""
) -> Callable[[Factory], Factory]:
    """Decorator for a factory ``(pretrained: bool, **options) -> Backbone``."""

    def decorator(factory: Factory) -> Factory:
        BACKBONES.add(name, BackboneInfo(name, factory, pretrained, description))
        return factory

    return decorator


def backbone_info(name: str) -> BackboneInfo:
    if name.startswith(TIMM_PREFIX):
        from tltk.backbones.timm_nets import timm_backbone_info

        return timm_backbone_info(name[len(TIMM_PREFIX):])
    entry = BACKBONES.get(name)
    if isinstance(entry, BackboneInfo):
        return entry
    if callable(entry):  # a plugin may register a bare factory
        return BackboneInfo(name, entry, bool(getattr(entry, "pretrained_available", False)))
    raise TltkError(f"backbone '{name}' is registered with a {type(entry).__name__}, not a factory.")


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


def _register_builtins() -> None:
    from tltk.backbones import course, sequence, small, timm_nets, torchvision_nets  # noqa: F401


_register_builtins()

__all__ = ["BACKBONES", "Backbone", "BackboneInfo", "Preprocessing", "backbone_info", "build_backbone", "register_backbone"]
