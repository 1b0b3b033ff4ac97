"""Training switches torch to its deterministic algorithms for itself only.

A notebook that calls ``fit`` (or ``tltk.finetune``) and then runs its own code must find
torch as it left it: the switch is process-wide, and it slows some CUDA operations down
and makes others warn.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from tltk.model import ModelSpec, build_model
from tltk.strategies import build_strategy
from tltk.train.callbacks import Callback
from tltk.train.trainer import TrainConfig, fit


class RecordSwitch(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[bool, bool]] = []

    def on_epoch_end(self, model, row) -> None:
        self.seen.append((torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled()))


def _fit(callback: Callback) -> None:
    torch.manual_seed(0)
    images, targets = torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,))
    model = build_model(ModelSpec("lenet5", "linear", 3, weights="none"))
    fit(model, build_strategy("finetune"), TensorDataset(images, targets), TensorDataset(images, targets),
        TrainConfig(epochs=1, batch_size=8, workers=0, device="cpu", precision="fp32"), callbacks=[callback])


@pytest.fixture
def torch_setting():
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_deterministic_while_training_and_the_callers_setting_back_afterwards(torch_setting):
    torch.use_deterministic_algorithms(False)
    switch = RecordSwitch()
    _fit(switch)
    assert switch.seen == [(True, True)]
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_caller_who_asked_for_strict_determinism_keeps_it(torch_setting):
    torch.use_deterministic_algorithms(True)
    switch = RecordSwitch()
    _fit(switch)
    assert switch.seen == [(True, False)]
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
