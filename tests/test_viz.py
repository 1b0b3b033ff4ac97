"""Pictures of runs: training curves, filter grids, activations, mistakes; and the commands that write them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from matplotlib.figure import Figure
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from torch import nn

from tltk.cli import main
from tltk.errors import TltkError
from tltk.model import ModelSpec, build_model
from tltk.run import Run, evaluate
from tltk.train.finetune import DataOptions, FinetuneConfig, finetune
from tltk.train.trainer import TrainConfig
from tltk.viz import activations, common, curves, filters, misclassified

# --- helpers ------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tltk(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def assert_png(path: str | Path, min_width: int = 300, min_height: int = 200) -> tuple[int, int]:
    """The file opens as a PNG of at least the given size; returns (width, height)."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        assert image.size[0] >= min_width and image.size[1] >= min_height, image.size
        return image.size


def assert_readable(figure: Figure) -> None:
    """Every plot has a title (its own or the figure's), labelled axes, and a legend where several series share it."""
    suptitle = figure._suptitle.get_text() if figure._suptitle else ""
    plots = [ax for ax in figure.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    assert plots
    for ax in plots:
        assert ax.get_title() or suptitle, "an axes without a title"
        if ax.axison:
            assert ax.get_xlabel() and ax.get_ylabel(), (ax.get_title(), ax.get_xlabel(), ax.get_ylabel())
        labelled = [label for label in ax.get_legend_handles_labels()[1] if not label.startswith("_")]
        if len(labelled) > 1:
            assert ax.get_legend() is not None, f"{ax.get_title()}: {len(labelled)} series and no legend"
    if not any(ax.axison for ax in plots):  # image tiles: the figure-level labels say what they are
        assert suptitle and figure._supxlabel and figure._supylabel


def line(ax, label: str):
    matches = [ln for ln in ax.get_lines() if ln.get_label() == label]
    assert len(matches) == 1, [ln.get_label() for ln in ax.get_lines()]
    return matches[0]


def synthetic_history(steps: int, steps_per_epoch: int, *, multilabel: bool = False) -> list[dict]:
    """metrics.jsonl rows of a run of ``steps`` steps: a decaying noisy loss and a step-decay learning rate."""
    rng = np.random.default_rng(0)
    rows: list[dict] = []
    for step in range(1, steps + 1):
        lr = 0.1 * 0.1 ** ((step - 1) // (steps // 4))
        rows.append({"kind": "step", "step": step, "epoch": (step - 1) // steps_per_epoch + 1,
                     "loss": 2.0 * math.exp(-step / steps) + float(rng.normal(0, 0.1)), "lr": lr})
        if step % steps_per_epoch == 0:
            epoch = step // steps_per_epoch
            row = {"kind": "epoch", "epoch": epoch, "step": step, "train_loss": 1.0 / epoch, "lr": lr,
                   "val_loss": 1.2 / epoch, "seconds": 1.0}
            if multilabel:
                row.update(val_map=1 - 0.5 / epoch, val_map_voc07=1 - 0.6 / epoch)
            else:
                row.update(train_accuracy=1 - 0.4 / epoch, val_accuracy=1 - 0.5 / epoch)
            rows.append(row)
    return rows


# --- training curves ------------------------------------------------------------------------


def test_loss_curve_draws_every_step_of_a_20000_step_run_and_validation_per_epoch() -> None:
    rows = synthetic_history(20_000, 1_000)
    figure = curves.loss_figure(rows, "long run")
    ax = figure.axes[0]
    raw, smoothed = line(ax, "train loss (per step)"), line(ax, "train loss (smoothed)")
    assert list(raw.get_xdata()) == list(range(1, 20_001))
    assert len(smoothed.get_xdata()) == 20_000
    val = line(ax, "val loss (per epoch)")
    assert list(val.get_xdata()) == list(range(1_000, 20_001, 1_000))
    assert list(val.get_ydata()) == [1.2 / e for e in range(1, 21)]
    assert_readable(figure)


def test_learning_rate_curve_has_one_point_per_step_and_a_log_axis_for_step_decay() -> None:
    rows = synthetic_history(20_000, 1_000)
    figure = curves.lr_figure(rows, "long run")
    ax = figure.axes[0]
    assert len(line(ax, "learning rate").get_xdata()) == 20_000
    assert ax.get_yscale() == "log"
    assert_readable(figure)


def test_cosine_learning_rate_keeps_a_linear_axis_although_it_ends_near_zero() -> None:
    cosine = [0.5 * (1 + math.cos(math.pi * s / 1000)) * 1e-3 for s in range(1000)]
    assert not curves.needs_log_scale(cosine)
    assert curves.needs_log_scale([1e-1] * 100 + [1e-2] * 300 + [1e-3] * 300)
    assert not curves.needs_log_scale([1e-3] * 10 + [0.0])  # zero has no place on a log axis


def test_metric_curve_plots_accuracy_per_epoch_for_multiclass_and_map_for_multilabel() -> None:
    figure = curves.metric_figure(synthetic_history(40, 10), "multi-class")
    ax = figure.axes[0]
    assert list(line(ax, "val accuracy").get_ydata()) == [1 - 0.5 / e for e in range(1, 5)]
    assert ax.get_ylabel() == "accuracy"
    assert_readable(figure)

    figure = curves.metric_figure(synthetic_history(40, 10, multilabel=True), "multi-label")
    ax = figure.axes[0]
    assert list(line(ax, "val mAP").get_ydata()) == [1 - 0.5 / e for e in range(1, 5)]
    assert list(line(ax, "val mAP (VOC07 11-point)").get_xdata()) == [1, 2, 3, 4]
    assert ax.get_ylabel() == "mAP"
    assert_readable(figure)


def test_smoothing_starts_at_the_first_value_and_skips_a_nan_step() -> None:
    assert curves.smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards zero
    smoothed = curves.smooth([1.0, float("nan"), 1.0], 0.6)
    assert smoothed[0] == smoothed[2] == pytest.approx(1.0) and math.isnan(smoothed[1])


def test_plot_of_a_directory_that_is_not_a_run_is_one_sentence(tmp_path: Path) -> None:
    result = tltk("plot", str(tmp_path))
    assert result.exit_code == 2 and "is not a tltk run" in result.stderr and "Traceback" not in result.output


# --- filter grids ---------------------------------------------------------------------------


def test_filter_grid_puts_each_kernel_pixel_at_its_documented_place() -> None:
    # Five RGB filters of 2x2; filter i is zero except one pixel of one channel.
    weight = torch.zeros(5, 3, 2, 2)
    hot = {0: (0, 0, 0), 1: (1, 0, 1), 2: (2, 1, 1), 3: (0, 1, 0), 4: (1, 1, 1)}  # filter: (channel, y, x)
    for index, (channel, y, x) in hot.items():
        weight[index, channel, y, x] = 3.0
    grid = filters.filter_grid(weight, pad=1)
    # ceil(sqrt(5)) = 3 columns, 2 rows of 2x2 tiles with 1-pixel white lines around them.
    assert grid.shape == (1 + 2 * 3, 1 + 3 * 3, 3) and grid.dtype == np.uint8
    for index, (channel, y, x) in hot.items():
        top, left = 1 + (index // 3) * 3, 1 + (index % 3) * 3
        tile = grid[top : top + 2, left : left + 2]
        expected = np.zeros((2, 2, 3), dtype=np.uint8)
        expected[y, x, channel] = 255
        assert np.array_equal(tile, expected), (index, tile)
    assert (grid[0] == 255).all() and (grid[:, 0] == 255).all() and (grid[:, 3] == 255).all()
    assert (grid[4:6, 7:9] == 255).all()  # the empty sixth place stays white


def test_each_filter_is_scaled_on_its_own_range() -> None:
    weight = torch.stack([
        torch.linspace(0.0, 0.01, 12).view(3, 2, 2),    # a tiny filter
        torch.linspace(-50.0, 50.0, 12).view(3, 2, 2),  # a huge one
        torch.full((3, 2, 2), 7.0),                     # a constant one
    ])
    tiles, _ = filters.filter_tiles(weight)
    for tile in tiles[:2]:
        assert tile.min() == 0 and tile.max() == 255
    assert np.array_equal(tiles[0], tiles[1])  # same shape, very different sizes: the same picture
    assert (tiles[2] == 128).all()


def test_non_rgb_layer_draws_one_row_of_grey_tiles_per_filter() -> None:
    weight = torch.zeros(2, 4, 3, 3)
    weight[1, 2, 0, 0] = 1.0  # filter 1, input channel 2, top-left pixel
    grid = filters.filter_grid(weight, pad=1)
    assert grid.shape == (1 + 2 * 4, 1 + 4 * 4, 3)
    top, left = 1 + 1 * 4, 1 + 2 * 4
    assert (grid[top, left] == 255).all() and (grid[top + 1 : top + 3, left : left + 3] == 0).all()
    assert (grid[..., 0] == grid[..., 1]).all()  # grey


@pytest.fixture(scope="module")
def lenet() -> nn.Module:
    return build_model(ModelSpec("lenet5", "linear", 3, {}, "none"))


def test_a_named_activation_layer_shows_the_kernels_of_the_convolution_feeding_it(lenet) -> None:
    assert filters.find_conv(lenet, "conv1") == ("backbone.net.features.0", lenet.backbone.net.features[0])
    assert filters.find_conv(lenet, "pool5")[0] == "backbone.net.features.3"  # through ReLU and max-pool
    assert filters.find_conv(lenet, "features")[0] == "backbone.net.features.3"  # a block: its last conv


def test_a_fully_connected_layer_has_no_kernels_to_draw(lenet) -> None:
    with pytest.raises(TltkError, match="no kernels to draw"):
        filters.find_conv(lenet, "fc7")


def test_filters_figure_is_titled_and_fits_a_tall_grid(lenet, tmp_path: Path) -> None:
    result = filters.write_filters(lenet, tmp_path / "f.png", "features.3", "a run")
    assert result.module == "backbone.net.features.3" and result.shape == (16, 6, 5, 5) and result.shown == 16
    width, height = assert_png(result.out)
    assert width >= 700
    grid = filters.filter_grid(lenet.backbone.net.features[3].weight.detach())
    assert_readable(filters.filters_figure(grid, "features.3 filters", "description"))


# --- activations ------------------------------------------------------------------------------


class _Doubler(nn.Module):
    """A 'network' whose tapped layer outputs 2 x the image: averages are known by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Conv2d(1, 1, 1, bias=False)
        with torch.no_grad():
            self.scale.weight.fill_(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(x).relu_()  # in place: the tap must have copied the map first


def test_class_average_maps_are_the_mean_map_of_each_class() -> None:
    model = _Doubler()
    images = torch.arange(4 * 2 * 2, dtype=torch.float32).view(4, 1, 2, 2) - 6.0
    targets = torch.tensor([0, 1, 0, 1])
    batches = [(images[:3], targets[:3]), (images[3:], targets[3:])]
    captured = ((activations.capture(model, model.scale, batch), batch_targets) for batch, batch_targets in batches)
    means, counts = activations.class_average_maps(captured, num_classes=3)
    assert counts.tolist() == [2, 2, 0]
    assert torch.allclose(means[0], (2 * images[0] + 2 * images[2]) / 2)  # before the in-place ReLU
    assert torch.allclose(means[1], (2 * images[1] + 2 * images[3]) / 2)
    assert (means[2] == 0).all()


def test_channels_that_differ_most_between_classes_are_chosen() -> None:
    means = torch.zeros(2, 4, 2, 2)
    means[0, 2] = 5.0  # only channel 2 tells the two classes apart
    means[1, 0] = 1.0
    assert activations.most_different_channels(means, 2) == [0, 2]


def test_unknown_layer_lists_the_layers_there_are(lenet) -> None:
    with pytest.raises(TltkError, match="named layers are conv1, pool5, fc6, fc7, logits"):
        common.resolve_layer(lenet, "conv9")


# --- mistakes ----------------------------------------------------------------------------------


def test_mistakes_are_listed_most_confident_first_and_the_confusion_matches_scikit_learn() -> None:
    probabilities = np.array([
        [0.9, 0.1, 0.0],  # true 0: right
        [0.2, 0.7, 0.1],  # true 0: wrong, 0.7
        [0.1, 0.1, 0.8],  # true 1: wrong, 0.8
        [0.3, 0.6, 0.1],  # true 1: right
        [0.55, 0.0, 0.45],  # true 2: wrong, 0.55
    ])
    targets = np.array([0, 0, 1, 1, 2])
    names = ["cat", "dog", "fish"]
    mistakes = misclassified.find_mistakes(probabilities, targets, names, [f"img{i}" for i in range(5)])
    assert [(m.id, m.true, m.predicted) for m in mistakes] == [
        ("img2", "dog", "fish"), ("img1", "cat", "dog"), ("img4", "fish", "cat")]
    assert [m.confidence for m in mistakes] == [0.8, 0.7, 0.55]
    from tltk.metrics import confusion_matrix

    ours = confusion_matrix(targets, probabilities.argmax(axis=1), 3)
    assert np.array_equal(ours, sk_confusion_matrix(targets, probabilities.argmax(axis=1), labels=[0, 1, 2]))
    assert_readable(misclassified.confusion_figure(ours, names, "confusion"))
    pictures = [np.zeros((4, 4, 3)) for _ in mistakes]
    assert_readable(misclassified.mistakes_figure(pictures, mistakes, "mistakes"))


def test_misclassified_refuses_a_multilabel_run_with_a_pointer_to_evaluate(lenet, tmp_path: Path) -> None:
    loaded = Run(tmp_path, lenet, {"train": {"task": "multilabel"}, "class_names": ["a", "b", "c"]})
    with pytest.raises(TltkError, match="multi-class runs only.*tltk evaluate"):
        common.split_dataset(loaded, None, "test")


# --- commands on a trained run ------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    data = DataOptions("builtin:digits", classes=["0", "1", "2"], train_per_class=12)
    train = TrainConfig(epochs=2, batch_size=8, lr=3e-3, workers=0, device="cpu")
    config = FinetuneConfig(backbone="lenet5", data=data, weights="none", train=train)
    return finetune(config, tmp_path_factory.mktemp("runs") / "digits").out


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory) -> Path:
    digits = load_digits()
    path = tmp_path_factory.mktemp("img") / "two.png"
    Image.fromarray((digits.images[2] * 16).clip(0, 255).astype(np.uint8)).save(path)
    return path


def test_finetune_writes_loss_metric_and_lr_plots_and_plot_rewrites_them(run: Path, tmp_path: Path) -> None:
    for name in ("loss", "metrics", "lr"):
        assert_png(run / "plots" / f"{name}.png")
    result = tltk("plot", str(run), "--out", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)["plots"]
    assert sorted(Path(p).name for p in written) == ["loss.png", "lr.png", "metrics.png"]
    for path in written:
        assert_png(path)


def test_visualize_filters_draws_conv1_of_the_trained_run(run: Path) -> None:
    result = tltk("visualize", "filters", str(run), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["module"] == "backbone.net.features.0" and report["shape"] == [6, 3, 5, 5]
    assert_png(report["out"])


def test_visualize_activations_of_one_image_gives_the_maps_of_the_layer(run: Path, digit_png: Path) -> None:
    result = tltk("visualize", "activations", str(run), "--image", str(digit_png), "--layer", "conv1",
                  "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["channels"] == 6 and report["size"] == [28, 28] and report["images"] == 1  # 5x5 conv on 32x32
    assert_png(report["out"], 600, 300)


def test_visualize_activations_averaged_per_class_uses_each_class_of_the_split(run: Path) -> None:
    result = tltk("visualize", "activations", str(run), "--class-average", "--data", "builtin:digits",
                  "--classes", "0,1,2", "--layer", "pool5", "--per-class", "5", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["classes"] == ["0", "1", "2"] and report["images"] == 15 and report["channels"] == 16
    assert_png(report["out"])


def test_visualize_activations_of_a_vector_layer_is_one_sentence(run: Path, digit_png: Path) -> None:
    result = tltk("visualize", "activations", str(run), "--image", str(digit_png), "--layer", "fc7")
    assert result.exit_code == 2 and "gives a 84-d vector, not feature maps" in result.stderr


def test_visualize_misclassified_agrees_with_evaluate_and_writes_both_pictures(run: Path) -> None:
    result = tltk("visualize", "misclassified", str(run), "--split", "test", "--n", "4", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    reference = evaluate(run, split="test", device="cpu")
    assert report["confusion_matrix"] == reference["confusion_matrix"]
    confusion = np.array(report["confusion_matrix"])
    assert report["n"] == reference["n"] and report["wrong"] == confusion.sum() - np.trace(confusion)
    shown = report["mistakes"]
    assert len(shown) == min(4, report["wrong"])
    assert all(m["true"] != m["predicted"] for m in shown)
    assert [m["confidence"] for m in shown] == sorted((m["confidence"] for m in shown), reverse=True)
    assert_png(report["grid"], 300, 200)
    assert_png(report["confusion_png"])


def test_visualize_misclassified_with_n_zero_is_refused(run: Path) -> None:
    result = tltk("visualize", "misclassified", str(run), "--n", "0")
    assert result.exit_code == 2 and "--n must be at least 1" in result.stderr
