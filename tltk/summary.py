"""A Keras-style model summary: each layer's output shape, parameters and whether they train."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tltk.backbones.base import SIZE_ERRORS, Backbone, unusable_input_size


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...] | None
    params: int
    trainable: bool


@dataclass
class ModelSummary:
    rows: list[LayerRow] = field(default_factory=list)
    total: int = 0
    trainable: int = 0
    input_size: tuple[int, int] = (0, 0)

    @property
    def non_trainable(self) -> int:
        return self.total - self.trainable

    def to_dict(self) -> dict:
        return {
            "input_size": list(self.input_size),
            "layers": [
                {"name": r.name, "type": r.kind, "output_shape": list(r.output_shape) if r.output_shape else None,
                 "params": r.params, "trainable": r.trainable}
                for r in self.rows
            ],
            "total_params": self.total,
            "trainable_params": self.trainable,
            "non_trainable_params": self.non_trainable,
        }


def summarize(model: nn.Module, input_size: tuple[int, int]) -> ModelSummary:
    """Run one image through ``model`` and record every layer that holds parameters or has
    no children, in the order the image reaches it.

    A module that holds parameters itself and also has children (a head with its own
    ``weight`` beside a dropout, a vision transformer's ``cls_token`` and ``pos_embed``)
    gets a row for its own parameters, so the rows add up to the totals. Parameters are
    counted once each, so the totals equal ``sum(p.numel())`` over the model even where
    layers share weights.
    """
    owners = {m: name or type(m).__name__ for name, m in model.named_modules()
              if not list(m.children()) or list(m.parameters(recurse=False))}
    order: list[nn.Module] = []
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def reached(module: nn.Module, _inputs: object) -> None:
        if module not in order:
            order.append(module)

    def record(module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            shapes[module] = tuple(output.shape[1:])

    hooks = [hook for m in owners for hook in (m.register_forward_pre_hook(reached), m.register_forward_hook(record))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, *input_size))
    except SIZE_ERRORS as exc:
        backbone = getattr(model, "backbone", model)
        if isinstance(backbone, Backbone):
            raise unusable_input_size(backbone, input_size, exc) from exc
        raise
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    unseen = [m for m in owners if m not in order and list(m.parameters(recurse=False))]
    summary = ModelSummary(input_size=input_size)
    for module in order + unseen:
        params = list(module.parameters(recurse=False))
        if list(module.children()) and not params:
            continue
        summary.rows.append(
            LayerRow(
                owners[module], type(module).__name__, shapes.get(module),
                sum(p.numel() for p in params), any(p.requires_grad for p in params),
            )
        )
    summary.total = sum(p.numel() for p in model.parameters())
    summary.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return summary
