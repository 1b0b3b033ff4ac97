"""The loss for each task: softmax cross-entropy, or per-class sigmoid BCE for multi-label.

Multi-label targets carry -1 for labels to ignore (VOC's "difficult"); those entries
contribute nothing to the loss and the mean is over the labels that count.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from tltk.errors import TltkError
from tltk.settings import TASKS


class MaskedBCEWithLogits(nn.Module):
    def __init__(self, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else None)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        counted = targets >= 0
        losses = nn.functional.binary_cross_entropy_with_logits(
            logits, targets.clamp(min=0).to(logits.dtype), pos_weight=self.pos_weight, reduction="none"
        )
        return (losses * counted).sum() / counted.sum().clamp(min=1)


def build_loss(task: str, pos_weight: torch.Tensor | None = None) -> nn.Module:
    if task == "multilabel":
        return MaskedBCEWithLogits(pos_weight)
    if task == "multiclass":
        return nn.CrossEntropyLoss()
    raise TltkError(f"--task '{task}' is not one of {', '.join(TASKS)}.")


def auto_pos_weight(targets: Sequence[Sequence[int]]) -> torch.Tensor:
    """negatives / positives per class (1 where a class has no positives), for imbalanced labels."""
    labels = torch.tensor([list(t) for t in targets], dtype=torch.float64)
    positives = (labels == 1).sum(0)
    negatives = (labels == 0).sum(0)
    return torch.where(positives > 0, negatives / positives.clamp(min=1), torch.ones_like(positives)).float()
