"""``register_backbone``: how a built-in family marks and registers its factories.

It sits in its own module, apart from the package's name lookup, so that a family module
(``timm_nets``, ``small``, ...) depends on this and the package depends on the families
it imports on demand, never both ways. Like the package, it imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from tltk.plugin import backbone_factory
from tltk.registry import BACKBONES

if TYPE_CHECKING:  # type-only: the factories return one
    from tltk.backbones.base import Backbone

Factory = Callable[..., "Backbone"]


def register_backbone(
    name: str, *, pretrained: bool, description: str = ""
) -> Callable[[Factory], Factory]:
    """Decorator for a factory ``(pretrained: bool, **options) -> Backbone``: marks it the
    way ``tltk.plugin.backbone_factory`` marks a plugin's, and registers it from code."""

    def decorator(factory: Factory) -> Factory:
        backbone_factory(pretrained=pretrained, description=description)(factory)
        BACKBONES.add(name, factory)
        return factory

    return decorator
