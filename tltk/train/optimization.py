"""The optimizer and the learning-rate schedule a run trains with, both from its ``TrainConfig``.

The strategy decides the parameter groups and their base rates (discriminative rates,
a frozen backbone's absence); this module turns them into torch's optimizer and gives
the multiplier every group's base rate follows, step by step.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tltk.train.config import TrainConfig


def build_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    groups = [{k: v for k, v in g.items() if k != "name"} | {"initial_lr": g["lr"]} for g in groups]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(step: int, config: TrainConfig, steps_per_epoch: int, total_steps: int) -> float:
    """The multiplier of every group's base learning rate at ``step`` (0-based)."""
    warmup = 1.0
    if config.warmup_steps > 0 and step < config.warmup_steps:
        warmup = (step + 1) / config.warmup_steps
    epoch_float = step / max(steps_per_epoch, 1)
    if config.schedule == "step":
        return warmup * config.gamma ** math.floor(epoch_float / max(config.step_epochs, 1))
    if config.schedule == "exp":
        return warmup * config.gamma ** epoch_float
    if config.schedule == "cosine":
        after = max(step - config.warmup_steps, 0)
        span = max(total_steps - config.warmup_steps, 1)
        return warmup * 0.5 * (1.0 + math.cos(math.pi * min(after / span, 1.0)))
    return warmup

