"""End to end through the Python API: a run directory that is complete, reproducible and reloadable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tltk.data import ImageDataset, build_transforms, load_data
from tltk.errors import DataError, RunDirError, TltkError
from tltk.run import evaluate, load_run
from tltk.train.finetune import DataOptions, FinetuneConfig, RunResult, finetune
from tltk.train.trainer import TrainConfig

DIGITS_SMALL = dict(classes=["0", "1", "2"], train_per_class=12)


def small_config(**overrides) -> FinetuneConfig:
    data = DataOptions("builtin:digits", **DIGITS_SMALL)
    train = TrainConfig(epochs=2, batch_size=8, lr=3e-3, workers=0, device="cpu")
    config = FinetuneConfig(backbone="lenet5", data=data, weights="none", train=train)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> RunResult:
    return finetune(small_config(), tmp_path_factory.mktemp("runs") / "lenet")


def test_run_directory_holds_config_weights_metrics_and_summary(trained: RunResult) -> None:
    out = trained.out
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["backbone"] == "lenet5"
    assert config["class_names"] == ["0", "1", "2"]
    assert config["preprocessing"]["input_size"] == [32, 32]
    assert config["data"]["fingerprint"] and config["data"]["sizes"]["train"] == 36
    assert {"torch", "torchvision", "timm", "tltk"} <= set(config["versions"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 2 and len(steps) == trained.summary["steps"] == 2 * 5  # 36 images / batch 8
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert {"train_loss", "val_loss", "val_accuracy"} <= set(epochs[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0 and summary["test"]["n"] > 0
    assert set(load_file(str(out / "model.safetensors"))) == set(trained.model.state_dict())


def test_same_config_twice_gives_identical_metrics_and_weights(trained: RunResult, tmp_path: Path) -> None:
    again = finetune(small_config(), tmp_path / "again")

    def without_timing(path: Path) -> list[dict]:
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert without_timing(again.out) == without_timing(trained.out)
    first, second = trained.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_reloaded_run_predicts_exactly_as_the_trained_model(trained: RunResult) -> None:
    data = load_data("builtin:digits", **DIGITS_SMALL)
    transform = build_transforms((32, 32), [0.5] * 3, [0.5] * 3, "none", train=False)
    images = torch.stack([ImageDataset(data.test, transform, data.arrays)[i][0] for i in range(8)])
    loaded = load_run(trained.out)
    trained.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.model(images), trained.model(images))


def test_evaluate_reuses_the_runs_split_and_matches_its_summary(trained: RunResult) -> None:
    report = evaluate(trained.out, device="cpu")
    assert report["n"] == trained.summary["test"]["n"]
    assert report["accuracy"] == pytest.approx(trained.summary["test"]["accuracy"])
    assert sum(map(sum, report["confusion_matrix"])) == report["n"]


def test_evaluate_on_data_with_classes_the_run_never_saw_is_refused(trained: RunResult) -> None:
    with pytest.raises(DataError, match="not trained on"):
        evaluate(trained.out, "builtin:digits", device="cpu", classes=["0", "1", "7"])


def test_transfer_from_run_directory_starts_from_its_backbone(trained: RunResult, tmp_path: Path) -> None:
    config = small_config(weights=str(trained.out), strategy="freeze")
    config.data = DataOptions("builtin:digits", classes=["5", "6"], train_per_class=8)
    target = finetune(config, tmp_path / "target")
    source_backbone = {k: v for k, v in trained.model.state_dict().items() if k.startswith("backbone.")}
    target_state = target.model.state_dict()
    assert all(torch.equal(target_state[k], v) for k, v in source_backbone.items())
    assert target.model.head[-1].out_features == 2


def test_out_holding_a_run_is_refused_without_overwrite(trained: RunResult) -> None:
    before = (trained.out / "model.safetensors").read_bytes()
    with pytest.raises(RunDirError, match="--overwrite"):
        finetune(small_config(), trained.out)
    assert (trained.out / "model.safetensors").read_bytes() == before


def test_bad_input_leaves_no_run_directory_behind(tmp_path: Path) -> None:
    with pytest.raises(TltkError):
        finetune(small_config(backbone="lenet55"), tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_finetune_leaves_the_callers_config_as_given_and_monitors_map_on_data_it_finds_multilabel(tmp_path) -> None:
    # task "auto" is resolved on a copy; monitor val_map is judged against the resolved task,
    # not against the TrainConfig default (which refused it before any data was read).
    import copy

    from voc_fixtures import write_voc

    voc = write_voc(tmp_path / "voc", images=24)
    config = FinetuneConfig(backbone="simplecnn", input_size=32, weights="none", data=DataOptions(f"voc:{voc}"),
                            train=TrainConfig(epochs=1, batch_size=4, workers=0, device="cpu", precision="fp32",
                                              monitor="val_map"))
    given = copy.deepcopy(config)
    result = finetune(config, tmp_path / "run")
    assert config == given
    assert result.summary["task"] == "multilabel" and result.summary["monitor"] == "val_map"


def test_a_batchnorm_network_trains_when_the_last_batch_would_hold_one_image(tmp_path: Path) -> None:
    """18 training images in batches of 17: the lone 18th image of each epoch is left out, so
    ResNet-18's BatchNorm never sees a batch of one (which stopped training with a torch error)."""
    config = FinetuneConfig(backbone="resnet18", weights="none", input_size=32,
                            data=DataOptions("builtin:digits", classes=["0", "1"], train_per_class=9),
                            train=TrainConfig(epochs=2, batch_size=17, workers=0, device="cpu", precision="fp32"))
    result = finetune(config, tmp_path / "run")
    assert result.summary["epochs_run"] == 2
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "step"]
    assert len(steps) == 2  # one batch of 17 per epoch
