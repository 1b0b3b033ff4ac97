"""What keeps the frozen linear probe fast without changing what it computes: feature
extraction in passes larger than a training batch, and training code that does not
import matplotlib until it draws the curves (which still carry titles, labels, legends).

Tiny on purpose: LeNet-5 (with batch norm, in eval mode) over random 32x32 images, and
a hand-written metrics.jsonl of a few steps for the curves.
"""

from __future__ import annotations

import importlib
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from tltk.model import ModelSpec, TransferModel, build_model
from tltk.train import cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGE_BYTES = 3 * 32 * 32 * 4  # one float32 image of the random sets below


# --- feature extraction in joined passes ---------------------------------------------------


def frozen_lenet(head: str = "linear") -> TransferModel:
    torch.manual_seed(0)
    model = build_model(ModelSpec("lenet5", head, 3, {}, "none", backbone_options={"batchnorm": True}))
    return model.eval()


def random_images(count: int, multilabel: bool = False) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(count, 3, 32, 32, generator=generator)
    targets = (torch.rand(count, 3, generator=generator) > 0.5).float() if multilabel else torch.arange(count) % 3
    return TensorDataset(images, targets)


def extract(model: TransferModel, data: TensorDataset, batch_size: int, pass_bytes: int,
            directory: Path | None = None) -> tuple[cache.CachedSplit, list[int]]:
    """The cached split, and the number of images the backbone saw in each of its passes."""
    passes: list[int] = []
    first_conv = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    hook = first_conv.register_forward_pre_hook(lambda module, inputs: passes.append(len(inputs[0])))
    budget = 0 if directory is not None else 2**40  # 0: memory-mapped on disk
    try:
        with cache.FeatureCache(len(data), budget, directory, pass_bytes=pass_bytes) as store:
            split = store.extract(model, DataLoader(data, batch_size=batch_size), len(data), lambda x: x, nullcontext)
            split = cache.CachedSplit(split.features.clone(), split.targets.clone())  # outlive the files on disk
    finally:
        hook.remove()
    return split, passes


def test_extraction_in_joined_passes_gives_the_features_of_one_image_at_a_time():
    model, data = frozen_lenet(), random_images(37)
    one_by_one, single_passes = extract(model, data, batch_size=1, pass_bytes=0)
    joined, joined_passes = extract(model, data, batch_size=4, pass_bytes=16 * IMAGE_BYTES)

    assert single_passes == [1] * 37
    assert joined_passes == [16, 16, 5]  # four batches of 4 per pass, then what is left
    torch.testing.assert_close(joined.features, one_by_one.features, rtol=1e-5, atol=1e-6)
    assert torch.equal(joined.targets, data.tensors[1])


def test_spatial_features_and_multilabel_rows_stay_together_across_joined_passes(tmp_path):
    model, data = frozen_lenet(head="conv"), random_images(21, multilabel=True)
    per_batch, _ = extract(model, data, batch_size=5, pass_bytes=0)
    joined, passes = extract(model, data, batch_size=5, pass_bytes=10 * IMAGE_BYTES, directory=tmp_path)

    assert passes == [10, 10, 1]
    assert joined.features.dim() == 4  # the conv head reads the spatial map
    torch.testing.assert_close(joined.features, per_batch.features, rtol=1e-5, atol=1e-6)
    assert torch.equal(joined.targets, data.tensors[1])
    assert list(tmp_path.iterdir()) == []  # the memory-mapped files are gone with the cache


def test_a_pass_never_holds_more_than_its_budget_or_one_batch():
    batches = [(torch.zeros(n, 3, 32, 32), torch.full((n,), i)) for i, n in enumerate([4, 4, 4, 10, 2, 2])]
    joined = list(cache.passes(batches, pass_bytes=8 * IMAGE_BYTES))

    assert [len(images) for images, _ in joined] == [8, 4, 10, 4]  # the batch of 10 is over budget: alone
    assert torch.equal(torch.cat([targets for _, targets in joined]), torch.cat([t for _, t in batches]))
    assert all(len(images) == len(targets) for images, targets in joined)


def test_batches_of_different_image_shapes_are_never_joined():
    batches = [(torch.zeros(2, 3, 32, 32), [0, 1]), (torch.zeros(2, 3, 16, 16), [2, 3]), (torch.zeros(2, 3, 16, 16), [4, 5])]
    joined = list(cache.passes(batches, pass_bytes=2**30))

    assert [tuple(images.shape) for images, _ in joined] == [(2, 3, 32, 32), (4, 3, 16, 16)]
    assert [targets.tolist() for _, targets in joined] == [[0, 1], [2, 3, 4, 5]]


def test_the_default_pass_joins_small_images_and_keeps_large_ones_at_the_training_batch():
    def pass_sizes(side: int) -> list[int]:
        batches = [(torch.zeros(64, 3, side, side), torch.zeros(64)) for _ in range(8)]
        return [len(images) for images, _ in cache.passes(batches, cache.PASS_INPUT_BYTES)]

    assert pass_sizes(32) == [256, 256]  # 3 MiB of 32 px images
    assert pass_sizes(224) == [64] * 8  # one batch is already over the budget


# --- curves: matplotlib on demand, pictures as before ----------------------------------------


def test_training_code_imports_without_matplotlib(monkeypatch):
    """Importing the module that finetune imports must not pull matplotlib in; drawing does."""

    class NoMatplotlib:
        def find_spec(self, name, path=None, target=None):
            if name == "matplotlib" or name.startswith("matplotlib."):
                raise ImportError(f"{name} imported at module level")
            return None

    import tltk.viz

    for name in [n for n in sys.modules if n.startswith("matplotlib") or n in ("tltk.viz.curves", "tltk.viz.style")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [NoMatplotlib(), *sys.meta_path])
    monkeypatch.delattr(tltk.viz, "curves", raising=False)
    monkeypatch.delattr(tltk.viz, "style", raising=False)

    curves = importlib.import_module("tltk.viz.curves")

    assert curves.smooth([1.0, 1.0], 0.6) == pytest.approx([1.0, 1.0])  # the helpers work without it
    with pytest.raises(ImportError, match="matplotlib"):
        curves.loss_figure([{"kind": "step", "step": 1, "loss": 1.0, "lr": 0.1}], "drawing needs matplotlib")


def write_tiny_run(run: Path, steps: int = 12, steps_per_epoch: int = 4) -> None:
    run.mkdir()
    config = {"model": {"backbone": "resnet18", "head": "linear"}, "strategy": {"name": "freeze"}}
    (run / "config.json").write_text(json.dumps(config))
    rows = []
    for step in range(1, steps + 1):
        rows.append({"kind": "step", "step": step, "epoch": (step - 1) // steps_per_epoch + 1,
                     "loss": 2.0 / step, "lr": 0.01 * (1 - step / (steps + 1))})
        if step % steps_per_epoch == 0:
            epoch = step // steps_per_epoch
            rows.append({"kind": "epoch", "epoch": epoch, "step": step, "train_loss": 2.0 / step,
                         "train_accuracy": 0.3 * epoch, "val_loss": 2.1 / step, "val_accuracy": 0.25 * epoch,
                         "lr": 0.01, "seconds": 0.1})
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_curve_pngs_are_written_with_titles_labelled_axes_and_legends(tmp_path):
    from tltk.viz import curves

    run = tmp_path / "probe"
    write_tiny_run(run)
    written = curves.write_curves(run)

    assert sorted(p.name for p in written) == ["loss.png", "lr.png", "metrics.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (800, 500 if path.stem != "lr" else 400)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    title = curves.run_title(run)
    assert title == "probe (resnet18 + linear, freeze)"
    expected = {
        curves.loss_figure: ("Loss: ", "step", "loss", 3),
        curves.metric_figure: ("Per-epoch accuracy: ", "epoch", "accuracy", 2),
        curves.lr_figure: ("Learning rate: ", "step", "learning rate (last parameter group)", 0),
    }
    for build, (prefix, xlabel, ylabel, legend_entries) in expected.items():
        ax = build(rows, title).axes[0]
        assert ax.get_title().replace("\n", " ").startswith(prefix + "probe")
        assert (ax.get_xlabel(), ax.get_ylabel()) == (xlabel, ylabel)
        legend = ax.get_legend()
        assert (len(legend.get_texts()) if legend is not None else 0) == legend_entries
