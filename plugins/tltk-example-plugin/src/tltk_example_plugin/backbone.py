"""``tinyconv``: a small convolutional backbone for 32x32 images, trained from scratch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tltk.plugin import TltkError, backbone_factory

if TYPE_CHECKING:
    from tltk.plugin import BackboneModule


@backbone_factory(pretrained=False, description="3 x (3x3 conv + BatchNorm + 2x2 max-pool), dense 64; 32x32; option width")
def tinyconv(pretrained: bool = False, width: int = 16) -> BackboneModule:
    """Three conv blocks of ``width``, 2x and 4x ``width`` channels, then a 64-d dense layer (fc7)."""
    if pretrained:
        raise TltkError("tinyconv has no published pretrained weights; use --weights none.")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise TltkError(f"tinyconv option width={width!r} is not a whole number of at least 1; pass e.g. --backbone-opt width=16.")
    from tltk_example_plugin.networks import build_tinyconv

    return build_tinyconv(width)
