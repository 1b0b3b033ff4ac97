"""`tltk finetune --tensorboard / --every N`: what the event file holds, filter snapshots, and that watching changes nothing."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from tltk.cli import main
from tltk.errors import RunDirError
from tltk.train.callbacks import Callback
from tltk.train.finetune import DataOptions, FinetuneConfig, RunResult, finetune
from tltk.train.tensorboard import TensorBoardCallback
from tltk.viz.tensorboard import tensorboard_argv
from tltk.train.trainer import TrainConfig

# 3 classes x 12 training images, batches of 8: 5 steps an epoch, 10 in all.
STEPS, STEPS_PER_EPOCH = 10, 5
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(*, watch: bool) -> FinetuneConfig:
    data = DataOptions("builtin:digits", classes=["0", "1", "2"], train_per_class=12)
    train = TrainConfig(epochs=2, batch_size=8, lr=3e-3, workers=0, device="cpu")
    return FinetuneConfig(backbone="lenet5", data=data, weights="none", train=train,
                          tensorboard=watch, histogram_every=4, filters_every=1 if watch else None)


@pytest.fixture(scope="module")
def watched(tmp_path_factory) -> RunResult:
    return finetune(tiny_config(watch=True), tmp_path_factory.mktemp("runs") / "watched")


@pytest.fixture(scope="module")
def events(watched: RunResult) -> EventAccumulator:
    accumulator = EventAccumulator(str(watched.out / "tensorboard"),
                                   size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_loss_and_learning_rate_are_logged_at_every_step(watched: RunResult, events) -> None:
    steps = [r for r in metrics(watched.out) if r["kind"] == "step"]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, STEPS + 1))
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([r["lr"] for r in steps], rel=1e-6)


def test_validation_loss_and_accuracy_are_logged_once_per_epoch(watched: RunResult, events) -> None:
    epochs = [r for r in metrics(watched.out) if r["kind"] == "epoch"]
    for tag, key in (("val/loss", "val_loss"), ("val/accuracy", "val_accuracy"), ("train/epoch_loss", "train_loss")):
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [STEPS_PER_EPOCH, STEPS]
        assert [e.value for e in logged] == pytest.approx([r[key] for r in epochs], rel=1e-6)


def test_weight_and_gradient_histograms_cover_every_layer_every_n_steps(watched: RunResult, events) -> None:
    names = [name for name, _ in watched.model.named_parameters()]
    tags = set(events.Tags()["histograms"])
    assert {f"weights/{n}" for n in names} <= tags and {f"grads/{n}" for n in names} <= tags
    assert "weights/backbone.net.features.0.weight" in tags
    for tag in ("weights/head.0.weight", "grads/backbone.net.features.0.weight"):
        assert [h.step for h in events.Histograms(tag)] == [1, 4, 8]  # step 1, then every 4th
    last = events.Histograms("weights/head.0.weight")[-1].histogram_value
    assert last.num == watched.model.head[0].weight.numel()


def test_training_images_are_logged_as_the_model_sees_them(events) -> None:
    (record,) = events.Images("train/images")
    assert record.step == 1
    assert (record.width, record.height) == (2 + 8 * (32 + 2), 2 + 32 + 2)  # one row of 8 images, 2-pixel lines
    pixels = np.asarray(Image.open(io.BytesIO(record.encoded_image_string)).convert("L"))
    assert pixels.min() < 30 and pixels.max() > 200  # digits: dark background, bright strokes, normalisation undone


def test_image_grid_undoes_the_normalisation() -> None:
    original = torch.rand(2, 3, 4, 4)
    normalised = (original - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    grid = TensorBoardCallback("unused", mean=MEAN, std=STD).image_grid(normalised)
    assert torch.allclose(grid[:, 2:6, 2:6], original[0], atol=1e-6)
    assert torch.allclose(grid[:, 2:6, 8:12], original[1], atol=1e-6)


def test_model_graph_and_conv1_filters_are_logged(watched: RunResult, events) -> None:
    assert events.Tags()["graph"] is True
    filters = events.Images("filters/conv1")
    assert [f.step for f in filters] == [0, STEPS_PER_EPOCH, STEPS]  # before training and after each epoch
    assert filters[0].width >= 256  # enlarged: 6 filters of 5x5 are 19 pixels wide
    assert filters[0].encoded_image_string != filters[-1].encoded_image_string


def test_every_n_epochs_saves_the_filter_grid_so_its_change_can_be_seen(watched: RunResult) -> None:
    snapshots = sorted((watched.out / "plots" / "filters").glob("*.png"))
    assert [p.name for p in snapshots] == ["epoch_000.png", "epoch_001.png", "epoch_002.png"]
    first, last = (np.asarray(Image.open(p).convert("RGB")) for p in (snapshots[0], snapshots[-1]))
    assert first.shape == last.shape and first.shape[1] >= 600
    assert (first != last).any()


def test_watching_does_not_change_what_is_trained(watched: RunResult, tmp_path: Path) -> None:
    plain = finetune(tiny_config(watch=False), tmp_path / "plain")
    assert not (plain.out / "tensorboard").exists()

    def figures(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in metrics(run)]

    assert figures(plain.out) == figures(watched.out)
    ours, theirs = load_file(str(watched.out / "model.safetensors")), load_file(str(plain.out / "model.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_new_run_in_the_same_directory_replaces_the_old_events(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    for _ in range(2):
        callback = TensorBoardCallback(tmp_path, graph=False, filters_layer=None)
        callback.on_train_start(model, 1)
        callback.on_step_end(model, {"step": 1, "loss": 1.0, "lr": 0.1}, torch.zeros(2, 3, 8, 8))
        callback.on_train_end(model, [])
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # tensorboard's vendored html5lib, on import
def test_tensorboard_command_line_names_each_run_and_tensorboard_accepts_it(watched: RunResult, tmp_path: Path) -> None:
    from tensorboard import default, program

    assert tensorboard_argv([watched.out]) == ["tensorboard", "--logdir", str(watched.out / "tensorboard")]
    twin = tmp_path / "elsewhere" / "watched"
    shutil.copytree(watched.out, twin)
    argv = tensorboard_argv([watched.out, twin], port=6123)
    spec = f"{watched.out.parent.name}/watched:{watched.out / 'tensorboard'},elsewhere/watched:{twin / 'tensorboard'}"
    assert argv == ["tensorboard", "--logdir_spec", spec, "--port", "6123"]
    board = program.TensorBoard(plugins=default.get_plugins())
    board.configure(argv=argv)
    assert board.flags.port == 6123 and board.flags.logdir_spec == spec


def test_tensorboard_of_a_run_trained_without_it_says_how_to_get_logs(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RunDirError, match="finetune --tensorboard"):
        tensorboard_argv([tmp_path])


def test_every_on_a_backbone_without_conv1_is_refused_before_the_run_starts(tmp_path: Path) -> None:
    out = tmp_path / "rnn"
    result = CliRunner().invoke(main, [
        "finetune", "--backbone", "rnn", "--weights", "none", "--data", "builtin:digits", "--classes", "0,1",
        "--train-per-class", "4", "--out", str(out), "--every", "1", "--epochs", "1", "--quiet"])
    assert result.exit_code == 2 and "has no convolution named conv1; drop --every" in result.stderr
    assert not out.exists()


def test_zero_steps_or_epochs_between_records_is_refused(tmp_path: Path) -> None:
    from tltk.errors import TltkError
    from tltk.train.tensorboard import watch_callbacks

    with pytest.raises(TltkError, match="--every must be at least 1 epoch, not 0"):
        watch_callbacks(tmp_path, nn.Conv2d(3, 2, 3), tensorboard=False, histogram_every=100, filters_every=0,
                        preprocessing={})
    with pytest.raises(TltkError, match="--histogram-every must be at least 1, not 0"):
        TensorBoardCallback(tmp_path, histogram_every=0)


def test_a_run_that_fails_mid_training_closes_its_event_file_with_every_step_so_far(tmp_path: Path) -> None:
    class FailsAtStepThree(Callback):
        def on_step_end(self, model, row, images) -> None:
            if row["step"] == 3:
                raise RuntimeError("stopped on purpose")

    watcher = TensorBoardCallback(tmp_path / "tensorboard", graph=False, filters_layer=None)
    config = tiny_config(watch=False)
    with pytest.raises(RuntimeError, match="on purpose"):
        finetune(config, tmp_path / "run", callbacks=[watcher, FailsAtStepThree()])
    assert watcher.writer is None, "the writer is closed although training raised"
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    assert [event.step for event in accumulator.Scalars("train/loss")] == [1, 2, 3]
