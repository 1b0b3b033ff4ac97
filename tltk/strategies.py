"""How a transfer run treats the backbone: frozen, fine-tuned, or something between.

A strategy decides three things: which parameter groups the optimizer gets (and their
learning rates), what is frozen at the start, and what changes at an epoch boundary.
Other packages add strategies through the ``tltk.strategies`` entry-point group (the
contract is ``TrainingStrategy`` in ``tltk.plugin``); tltk's own factories below are
declared, like a plugin's, as entry points in pyproject.toml, and each takes the options
its signature names and no others. This module imports no torch, so that plugins can
subclass ``Strategy`` in a module that is cheap to import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from tltk.errors import SettingError
from tltk.kinds import option_help
from tltk.registry import STRATEGIES, build  # noqa: F401  (STRATEGIES: where callers look strategies up)

if TYPE_CHECKING:
    from torch import nn

    from tltk.model import TransferModel


class Strategy:
    """Base: every parameter trains at the base learning rate."""

    name = "finetune"

    def param_groups(self, model: TransferModel, lr: float) -> list[dict[str, Any]]:
        return [
            {"params": list(model.backbone.parameters()), "lr": lr, "name": "backbone"},
            {"params": list(model.head.parameters()), "lr": lr, "name": "head"},
        ]

    def prepare(self, model: TransferModel) -> None:
        model.freeze_backbone(False)

    def on_epoch_start(self, model: TransferModel, epoch: int) -> str | None:
        """Called before each epoch (0-based); returns a message when something changed."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


StrategyFactory = Callable[..., Strategy]


def finetune() -> Strategy:
    """Every parameter trains at the base learning rate."""
    return Strategy()


class Freeze(Strategy):
    """Only the head trains; every backbone tensor, BatchNorm statistics included, stays put."""

    name = "freeze"

    def param_groups(self, model: TransferModel, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(model.head.parameters()), "lr": lr, "name": "head"}]

    def prepare(self, model: TransferModel) -> None:
        model.freeze_backbone(True)


def freeze() -> Strategy:
    """Only the head trains; the backbone, BatchNorm statistics included, stays as loaded."""
    return Freeze()


@dataclass
class FreezeUnfreeze(Strategy):
    """Head alone for ``unfreeze_epoch`` epochs, then everything, the backbone at a lower rate."""

    unfreeze_epoch: int = 1
    backbone_lr_mult: float = 0.1
    name = "freeze-unfreeze"

    def param_groups(self, model: TransferModel, lr: float) -> list[dict[str, Any]]:
        return [
            {"params": list(model.backbone.parameters()), "lr": lr * self.backbone_lr_mult, "name": "backbone"},
            {"params": list(model.head.parameters()), "lr": lr, "name": "head"},
        ]

    def prepare(self, model: TransferModel) -> None:
        model.freeze_backbone(self.unfreeze_epoch > 0)

    def on_epoch_start(self, model: TransferModel, epoch: int) -> str | None:
        if epoch == self.unfreeze_epoch and model.backbone_frozen:
            model.freeze_backbone(False)
            return f"epoch {epoch + 1}: backbone unfrozen at {self.backbone_lr_mult}x the head's learning rate"
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "unfreeze_epoch": self.unfreeze_epoch, "backbone_lr_mult": self.backbone_lr_mult}


@option_help(unfreeze_epoch="epochs of head-only training", backbone_lr_mult="backbone lr as a multiple of lr")
def freeze_unfreeze(unfreeze_epoch: int = 1, backbone_lr_mult: float = 0.1) -> Strategy:
    """The head alone for --unfreeze-epoch epochs, then everything, the backbone at --backbone-lr-mult."""
    return FreezeUnfreeze(unfreeze_epoch, backbone_lr_mult)


@dataclass
class Discriminative(Strategy):
    """Layer-wise learning-rate decay: each stage nearer the input learns ``layer_decay`` times slower."""

    layer_decay: float = 0.75
    name = "discriminative"

    def param_groups(self, model: TransferModel, lr: float) -> list[dict[str, Any]]:
        stages = model.backbone.stages()
        groups = [
            {"params": params, "lr": lr * self.layer_decay ** (len(stages) - i), "name": f"backbone.stage{i}"}
            for i, params in enumerate(stages)
        ]
        return groups + [{"params": list(model.head.parameters()), "lr": lr, "name": "head"}]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "layer_decay": self.layer_decay}


@option_help(layer_decay="lr factor per stage towards the input, in (0, 1]")
def discriminative(layer_decay: float = 0.75) -> Strategy:
    """Layer-wise learning rates: each stage nearer the input learns --layer-decay times slower."""
    if not 0 < layer_decay <= 1:
        raise SettingError(f"layer_decay must be in (0, 1], not {layer_decay}.", ["layer_decay"])
    return Discriminative(layer_decay)


def build_strategy(name: str, **options: Any) -> Strategy:
    """The named strategy, built through the one component path (``tltk.registry.build``):
    an option it does not declare is refused, one left None is not given."""
    return build("strategy", name, **options)  # type: ignore[no-any-return]


def trainable_parameters(groups: list[dict[str, Any]]) -> list[nn.Parameter]:
    return [p for g in groups for p in g["params"]]
