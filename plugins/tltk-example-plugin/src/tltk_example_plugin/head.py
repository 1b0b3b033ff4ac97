"""``cosine``: a cosine-similarity classifier head."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tltk.plugin import TltkError

if TYPE_CHECKING:
    from torch import nn


def cosine(*, in_features: int, in_channels: int | None, num_classes: int, scale: float = 10.0) -> nn.Module:
    """Scaled cosine similarity between the feature vector and a learned vector per class.

    Normalising both sides makes the logits depend on the direction of the features, not
    their size, which helps when there are few labelled images per class (Baseline++ in
    Chen et al., "A Closer Look at Few-shot Classification", 2019). ``scale`` is where the
    learned temperature starts.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        raise TltkError(f"cosine head option scale={scale!r} is not a positive number; pass e.g. scale=10.")
    from tltk_example_plugin.networks import CosineHead

    return CosineHead(in_features, num_classes, float(scale))
