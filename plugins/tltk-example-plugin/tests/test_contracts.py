"""The example plugin's components against tltk's contracts, with the kit tltk ships for it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tltk.testing import check_backbone, check_callback, check_exporter, check_format, check_head, check_strategy
from tltk_example_plugin.backbone import tinyconv
from tltk_example_plugin.budget import time_budget
from tltk_example_plugin.head import cosine
from tltk_example_plugin.markdown import markdown_exporter, read_markdown_table
from tltk_example_plugin.npz import read_npz
from tltk_example_plugin.strategy import gradual_unfreeze


def test_tinyconv_meets_the_backbone_contract() -> None:
    backbone = check_backbone(tinyconv, layers=("conv1", "pool5", "fc7"))
    assert backbone.feature_dim == 64


def test_tinyconv_width_option_changes_the_spatial_channels() -> None:
    assert check_backbone(tinyconv, options={"width": 4}).spatial_channels == 16


def test_cosine_head_meets_the_head_contract() -> None:
    check_head(cosine)


def test_gradual_unfreeze_meets_the_strategy_contract_and_thaws_one_stage_per_epoch() -> None:
    messages = check_strategy(gradual_unfreeze, epochs=3)
    assert messages[0] is None
    assert messages[1] is not None and messages[1].startswith("epoch 2: the top 1 of")


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_markdown_exporter_writes_a_table_that_reads_back_as_the_predictions(tmp_path: Path, task: str) -> None:
    check_exporter(markdown_exporter, tmp_path / "predictions.md", read=read_markdown_table, task=task)


def test_npz_reader_meets_the_format_contract(tmp_path: Path) -> None:
    file = tmp_path / "tiny.npz"
    images = np.random.default_rng(0).integers(0, 256, (12, 8, 8), dtype=np.uint8)
    np.savez(file, images=images, labels=np.arange(12) % 3, class_names=np.array(["a", "b", "c"]))
    raw = check_format(read_npz, file)
    assert raw.class_names == ["a", "b", "c"]


def test_time_budget_meets_the_callback_contract_and_stops_a_spent_run_after_one_step() -> None:
    unlimited = check_callback(time_budget, options={"seconds": 3600})
    assert unlimited.loop.result.epochs_run == 2 and unlimited.loop.stop_reason is None
    spent = check_callback(time_budget, options={"seconds": 0})
    assert spent.loop.step == 1 and "time budget of 0 s used up at step 1" in spent.loop.stop_reason


def test_time_budget_carries_the_seconds_spent_across_a_resume() -> None:
    budget = time_budget(seconds=100)
    budget.load_state_dict({"spent": 99.5})
    assert 99.5 <= budget.state_dict()["spent"] < 100
