"""A run directory as one `Run`: loading (old directories included), frozen modules, and the
one inference path everything after training uses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tltk
from tltk.data import ImageDataset, Sample
from tltk.errors import DataError, TltkError
from tltk.model import ModelSpec, build_model
from tltk.run import Run, align_to_run_classes, evaluate, load_run, predict
from tltk.runtime import Inference, collect_outputs, stream_outputs
from tltk.train.finetune import DataOptions, FinetuneConfig, finetune
from tltk.train.trainer import TrainConfig

LEGACY_RUN = Path(__file__).parent / "fixtures" / "run-0.1.0"


def test_a_run_directory_from_an_earlier_version_loads_evaluates_and_predicts() -> None:
    # Written by tltk before runs recorded their frozen modules (fixtures/run-0.1.0/HOW.md).
    summary = json.loads((LEGACY_RUN / "summary.json").read_text())
    run = tltk.load_run(LEGACY_RUN)
    assert isinstance(run, Run) and run.class_names == ["0", "1", "2"]
    assert run.frozen == ["backbone"] and run.model.backbone_frozen  # its strategy was "freeze"
    assert run.preprocessing.input_size == (32, 32) and run.task == "multiclass"
    report = evaluate(run, device="cpu")
    assert report["n"] == summary["test"]["n"] == 107
    assert report["accuracy"] == pytest.approx(summary["test"]["accuracy"], abs=1e-9)
    predictions = predict(run, device="cpu")
    truth = [s.target for s in run.split("test")[0].samples]
    assert len(predictions) == 107
    assert float(np.mean(predictions.predicted_index() == np.array(truth))) == pytest.approx(report["accuracy"])


def small_run(tmp_path: Path, strategy: str, **strategy_options: object) -> Run:
    config = FinetuneConfig(
        backbone="lenet5", weights="none", strategy=strategy, strategy_options=dict(strategy_options),
        data=DataOptions("builtin:digits", classes=["0", "1"], train_per_class=4),
        train=TrainConfig(epochs=2, batch_size=4, workers=0, device="cpu", precision="fp32"),
    )
    return load_run(finetune(config, tmp_path / strategy).out)


def test_the_modules_training_left_frozen_are_recorded_and_frozen_again_on_reload(tmp_path: Path) -> None:
    frozen = small_run(tmp_path, "freeze")
    assert frozen.config["frozen"] == ["backbone"] and frozen.model.backbone_frozen
    assert not any(p.requires_grad for p in frozen.model.backbone.parameters())
    # freeze-unfreeze ends with the backbone training: nothing is frozen on reload.
    thawed = small_run(tmp_path, "freeze-unfreeze", unfreeze_epoch=1)
    assert thawed.config["frozen"] == [] and not thawed.model.backbone_frozen


def test_reload_follows_the_recorded_modules_not_the_strategy_name(tmp_path: Path) -> None:
    # A plugin strategy with another name that froze the backbone is honoured; so is a
    # strategy named "freeze" whose run recorded nothing frozen.
    run = small_run(tmp_path, "finetune")
    config = json.loads((run.path / "config.json").read_text())
    (run.path / "config.json").write_text(json.dumps(config | {"frozen": ["backbone"]}))
    assert load_run(run.path).model.backbone_frozen
    config["strategy"]["name"] = "freeze"
    (run.path / "config.json").write_text(json.dumps(config | {"frozen": []}))
    assert not load_run(run.path).model.backbone_frozen


def test_frozen_modules_names_the_outermost_frozen_parts_and_freeze_modules_restores_them() -> None:
    model = build_model(ModelSpec("lenet5", "mlp", 3, {"hidden": 8}, "none"))
    assert model.frozen_modules() == []
    model.backbone.net.features.requires_grad_(False)
    model.head[0].requires_grad_(False)
    names = model.frozen_modules()
    assert names == ["backbone.net.features", "head.0"]
    again = build_model(ModelSpec("lenet5", "mlp", 3, {"hidden": 8}, "none"))
    again.freeze_modules(names)
    assert again.frozen_modules() == names and not again.backbone_frozen


def test_a_run_infers_with_the_precision_and_layout_it_trained_with(tmp_path: Path) -> None:
    model = build_model(ModelSpec("lenet5", "linear", 2, weights="none"))
    run = Run(tmp_path, model, {"train": {"precision": "bf16", "channels_last": "off", "batch_size": 16, "workers": 0}})
    assert run.inference("cpu") == Inference("cpu", "bf16", "off", 16, 0)
    assert run.inference("cpu", batch_size=3, workers=2) == Inference("cpu", "bf16", "off", 3, 2)


class _Shift(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) + 1.0


def _numbers(count: int) -> ImageDataset:
    arrays = np.arange(count * 2 * 2 * 3, dtype=np.uint8).reshape(count, 2, 2, 3)
    return ImageDataset([Sample(i, i % 2, str(i)) for i in range(count)], lambda image: image.float(), arrays)


def test_streamed_outputs_are_the_models_on_each_batch_in_dataset_order() -> None:
    dataset = _numbers(7)
    settings = Inference(device="cpu", precision="fp32", batch_size=3, workers=0)
    batches = list(stream_outputs(_Shift(), dataset, settings))
    assert [len(outputs) for outputs, _ in batches] == [3, 3, 1]
    expected = torch.stack([dataset[i][0] for i in range(7)]).flatten(1) + 1.0
    assert torch.equal(torch.cat([outputs for outputs, _ in batches]), expected)
    assert torch.cat([torch.as_tensor(t) for _, t in batches]).tolist() == [i % 2 for i in range(7)]
    tapped = list(stream_outputs(_Shift(), dataset, settings, forward=lambda images: images.flatten(1) * 2))
    assert torch.equal(torch.cat([outputs for outputs, _ in tapped]), expected.sub(1.0).mul(2))
    outputs, targets = collect_outputs(_Shift(), dataset, settings)
    assert torch.equal(outputs, expected) and targets.tolist() == [i % 2 for i in range(7)]


def test_stream_outputs_refuses_a_batch_size_below_one_in_one_sentence() -> None:
    with pytest.raises(TltkError, match="batch_size must be at least 1, not 0"):
        next(stream_outputs(_Shift(), _numbers(2), Inference(device="cpu", batch_size=0)))


def test_data_labels_are_lined_up_with_the_run_classes_by_name() -> None:
    samples = [Sample("a", 0, "a"), Sample("b", 1, "b")]
    assert [s.target for s in align_to_run_classes(samples, ["cat", "dog"], ["dog", "cat"], "data")] == [1, 0]
    with pytest.raises(DataError, match="classes the run was not trained on \\(dog\\)"):
        align_to_run_classes(samples, ["cat", "dog"], ["cat"], "data")


def test_a_run_evaluates_from_a_copy_of_its_directory(tmp_path: Path) -> None:
    # Nothing but the directory is needed: config.json and model.safetensors.
    copy = tmp_path / "copied"
    shutil.copytree(LEGACY_RUN, copy)
    assert evaluate(copy, device="cpu")["n"] == 107
