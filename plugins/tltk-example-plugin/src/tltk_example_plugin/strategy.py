"""``gradual-unfreeze``: the head first, then the backbone from the top down, a stage per epoch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tltk.plugin import Strategy, TltkError, TransferModelLike


@dataclass
class GradualUnfreeze(Strategy):
    """Gradual unfreezing (Howard and Ruder, ULMFiT, 2018): the first epoch trains the head
    alone, and each epoch after it lets ``stages_per_epoch`` more backbone stages train,
    starting next to the head, so the layers that carry the most general features change
    last and least. A stage's BatchNorm statistics stay as they were until that stage thaws."""

    stages_per_epoch: int = 1
    name = "gradual-unfreeze"

    def prepare(self, model: TransferModelLike) -> None:
        model.freeze_backbone(True)

    def param_groups(self, model: TransferModelLike, lr: float) -> list[dict[str, Any]]:
        # Frozen parameters get no gradient, so the optimizer skips them until they thaw.
        return [
            {"params": list(model.backbone.parameters()), "lr": lr, "name": "backbone"},
            {"params": list(model.head.parameters()), "lr": lr, "name": "head"},
        ]

    def on_epoch_start(self, model: TransferModelLike, epoch: int) -> str | None:
        stages = model.backbone.stages()
        thawed = min(len(stages), epoch * self.stages_per_epoch)
        newly = [p for stage in stages[len(stages) - thawed:] for p in stage if not p.requires_grad]
        if not newly:
            return None
        # The backbone leaves the frozen state as a whole, then the stages not yet thawed are
        # frozen again: tltk keeps a BatchNorm whose parameters are frozen in eval mode, so
        # their statistics stay as loaded while the thawed stages' train with them.
        model.freeze_backbone(False)
        for index, stage in enumerate(stages):
            for parameter in stage:
                parameter.requires_grad_(index >= len(stages) - thawed)
        model.train(model.training)
        return f"epoch {epoch + 1}: the top {thawed} of {len(stages)} backbone stages train"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "stages_per_epoch": self.stages_per_epoch}


def gradual_unfreeze(stages_per_epoch: int = 1) -> GradualUnfreeze:
    """Head alone for one epoch, then one more backbone stage per epoch, top down."""
    if isinstance(stages_per_epoch, bool) or not isinstance(stages_per_epoch, int) or stages_per_epoch < 1:
        raise TltkError(f"gradual-unfreeze option stages_per_epoch={stages_per_epoch!r} is not a whole number of at least 1.")
    return GradualUnfreeze(stages_per_epoch)
