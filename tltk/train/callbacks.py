"""Hooks into the training loop for whatever watches it (TensorBoard, filter snapshots, ...).

Every method is optional; the loop calls them in order. ``on_step_end`` runs after the
optimizer step, while the gradients of that step are still on the parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Callback:
    def on_train_start(self, model: nn.Module, total_steps: int) -> None:
        """Before the first step."""

    def on_step_end(self, model: nn.Module, row: dict[str, Any], images: torch.Tensor) -> None:
        """After each optimizer step; ``images`` is the batch as the model saw it (augmented, normalised)."""

    def on_epoch_end(self, model: nn.Module, row: dict[str, Any]) -> None:
        """After validation of each epoch; ``row`` is the epoch's metrics.jsonl row."""

    def on_train_end(self, model: nn.Module, history: list[dict[str, Any]]) -> None:
        """After the last epoch, before the best weights are restored."""

    def close(self) -> None:
        """Release files and the like. Called last, also when training stops on an error or
        a signal, so what was written so far is complete on disk."""
