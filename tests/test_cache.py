"""The frozen-backbone feature cache: same results as the uncached loop, one backbone pass,
memory or disk, and a refusal (in one line) where it would be wrong.

Runs are tiny: scikit-learn's digits (three classes, a dozen images each) or random
16x16 tensors, a LeNet-5 or a two-layer conv backbone, two or three epochs on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from tltk.cli import main
from tltk.data import ImageDataset, build_transforms, load_data
from tltk.data.transforms import is_deterministic
from tltk.distributed import EpochOrder
from tltk.errors import TltkError
from tltk.model import ModelSpec, TransferModel, build_model
from tltk.runtime import make_loader
from tltk.strategies import build_strategy
from tltk.train import cache
from tltk.train.callbacks import Callback
from tltk.train.trainer import FitResult, TrainConfig, fit

DIGITS = dict(classes=["0", "1", "2"], train_per_class=12)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Recorder:
    """A Reporter that keeps the messages the loop sends."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def start(self, total_steps: int) -> None: ...
    def step(self, row: dict[str, Any]) -> None: ...
    def epoch(self, row: dict[str, Any]) -> None: ...
    def finish(self) -> None: ...

    def message(self, text: str) -> None:
        self.messages.append(text)


def digits_sets(augment: str = "none") -> tuple[ImageDataset, ImageDataset]:
    data = load_data("builtin:digits", **DIGITS)
    train_tf = build_transforms((32, 32), [0.5], [0.5], augment, train=True)
    eval_tf = build_transforms((32, 32), [0.5], [0.5], "none", train=False)
    return ImageDataset(data.train, train_tf, data.arrays), ImageDataset(data.val, eval_tf, data.arrays)


def lenet(head: str = "mlp") -> TransferModel:
    torch.manual_seed(0)
    return build_model(ModelSpec("lenet5", head, 3, {} if head == "linear" else {"hidden": 16}, "none"))


def probe(head: str = "mlp", reporter: Recorder | None = None, cache_dir: Path | None = None, **train: Any) -> tuple[TransferModel, FitResult]:
    model = lenet(head)
    train_set, val_set = digits_sets(train.get("augment", "none"))
    config = TrainConfig(**({"epochs": 3, "batch_size": 8, "lr": 1e-2, "workers": 0, "device": "cpu",
                             "precision": "fp32"} | train))
    return model, fit(model, build_strategy("freeze"), train_set, val_set, config, reporter=reporter, cache_dir=cache_dir)


def figures(result: FitResult) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]


def assert_same_figures(a: FitResult, b: FitResult) -> None:
    assert len(a.history) == len(b.history)
    for row_a, row_b in zip(figures(a), figures(b)):
        assert row_a.keys() == row_b.keys()
        for key, value in row_a.items():
            expected = pytest.approx(row_b[key], rel=1e-5, abs=1e-6) if isinstance(value, float) else row_b[key]
            assert value == expected, key


# --- same results ---------------------------------------------------------------------


@pytest.mark.precision
@pytest.mark.parametrize("head", ["mlp", "conv"])
def test_cached_probe_gives_the_same_metrics_and_head_weights_as_the_uncached_loop(head, train_precision):
    # mlp: dropout draws random numbers each step, so the two loops must also agree on RNG use;
    # conv: the cache holds spatial maps instead of vectors. Both loops run the backbone on the
    # same batches, so bf16 rounds alike in both (measured: identical) and fp32's tolerances hold.
    cached_model, cached = probe(head, precision=train_precision)
    plain_model, plain = probe(head, cache=False, precision=train_precision)

    assert cached.feature_cache == "memory" and plain.feature_cache is None
    assert_same_figures(cached, plain)
    assert cached.history[-1]["train_loss"] < cached.history[0]["train_loss"]  # it did train
    for name, tensor in plain_model.head.state_dict().items():
        torch.testing.assert_close(cached_model.head.state_dict()[name], tensor, rtol=1e-4, atol=1e-5)


@pytest.mark.precision
def test_features_on_disk_give_the_same_metrics_and_their_files_are_removed(tmp_path, train_precision):
    _, in_memory = probe(precision=train_precision)
    _, on_disk = probe(cache_mem="0", cache_dir=tmp_path, precision=train_precision)

    assert on_disk.feature_cache == "disk"
    assert_same_figures(on_disk, in_memory)
    assert list(tmp_path.iterdir()) == []


def test_bf16_features_on_disk_match_bf16_features_in_memory(tmp_path):
    _, in_memory = probe(precision="bf16", epochs=1)
    _, on_disk = probe(precision="bf16", epochs=1, cache_mem="0", cache_dir=tmp_path)
    assert in_memory.precision == on_disk.precision == "bf16"
    assert_same_figures(on_disk, in_memory)


def test_backbone_runs_once_over_the_data_when_cached_and_every_epoch_when_not():
    def backbone_images(use_cache: bool) -> int:
        model = lenet()
        seen = []
        model.backbone.net.features.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
        train_set, val_set = digits_sets()
        config = TrainConfig(epochs=3, batch_size=8, workers=0, device="cpu", cache=use_cache)
        fit(model, build_strategy("freeze"), train_set, val_set, config)
        return sum(seen)

    images_per_pass = sum(len(s) for s in digits_sets())
    assert backbone_images(True) == images_per_pass
    assert backbone_images(False) == 3 * images_per_pass


def test_multilabel_targets_are_cached_with_their_rows():
    torch.manual_seed(0)
    images = torch.randn(24, 3, 32, 32)
    targets = (torch.rand(24, 3) > 0.5).float()
    targets[0, 1] = -1  # an ignored label stays ignored
    config = dict(epochs=2, batch_size=8, workers=0, device="cpu", precision="fp32", task="multilabel")
    results = []
    for use_cache in (True, False):
        model = lenet("linear")
        results.append(fit(model, build_strategy("freeze"), TensorDataset(images, targets), TensorDataset(images, targets),
                           TrainConfig(**config, cache=use_cache)))
    assert results[0].feature_cache == "memory"
    assert_same_figures(results[0], results[1])


# --- when it is refused ---------------------------------------------------------------


def test_cache_is_refused_under_augmentation_and_says_why_in_one_line():
    reporter = Recorder()
    _, result = probe(augment="light", epochs=1, reporter=reporter)

    assert result.feature_cache is None
    refusals = [m for m in reporter.messages if m.startswith("not caching")]
    assert len(refusals) == 1 and "\n" not in refusals[0]
    assert "--augment light" in refusals[0]


def test_no_cache_option_trains_on_images_without_a_word():
    reporter = Recorder()
    _, result = probe(cache=False, epochs=1, reporter=reporter)
    # The one line there is says the images were decoded once (tltk.train.image_cache), not a word on features.
    assert result.feature_cache is None and [m for m in reporter.messages if not m.startswith("decoded images:")] == []


def test_strategies_that_train_the_backbone_never_cache():
    model = lenet()
    train_set, val_set = digits_sets()
    reporter = Recorder()
    result = fit(model, build_strategy("freeze-unfreeze", unfreeze_epoch=1), train_set, val_set,
                 TrainConfig(epochs=2, batch_size=8, workers=0, device="cpu"), reporter=reporter)
    assert result.feature_cache is None
    assert not any("cach" in m for m in reporter.messages)


class ImageWatcher(Callback):
    def on_step_end(self, model: nn.Module, row: dict[str, Any], images: torch.Tensor) -> None:
        assert images.shape[1:] == (3, 32, 32)  # the raw batch, never features


class EpochWatcher(Callback):
    def on_epoch_end(self, model: nn.Module, row: dict[str, Any]) -> None: ...


def test_cache_is_refused_when_a_callback_reads_the_batch_images():
    model = lenet()
    train_set, val_set = digits_sets()
    reporter = Recorder()
    result = fit(model, build_strategy("freeze"), train_set, val_set, TrainConfig(epochs=1, batch_size=8, workers=0, device="cpu"),
                 reporter=reporter, callbacks=[ImageWatcher()])
    assert result.feature_cache is None
    assert reporter.messages[0].startswith("not caching") and "ImageWatcher" in reporter.messages[0]


def test_callbacks_that_only_watch_epochs_keep_the_cache():
    model = lenet()
    train_set, val_set = digits_sets()
    result = fit(model, build_strategy("freeze"), train_set, val_set, TrainConfig(epochs=1, batch_size=8, workers=0, device="cpu"),
                 callbacks=[EpochWatcher()])
    assert result.feature_cache == "memory"


class IndexImages(Dataset):
    """Image i is filled with i; no transform attribute, so nobody can tell it is fixed."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.full((3, 32, 32), float(index)), index % 3


def test_cache_is_refused_for_a_dataset_whose_images_may_vary():
    decision = cache.decide(build_strategy("freeze"), IndexImages(), enabled=True, augment="none")
    assert not decision.use and "IndexImages" in decision.reason


@pytest.mark.parametrize("augment, fixed", [("none", True), ("light", False), ("standard", False)])
def test_training_transforms_are_deterministic_only_without_augmentation(augment, fixed):
    assert is_deterministic(build_transforms((32, 32), [0.5], [0.5], augment, train=True)) is fixed
    assert is_deterministic(build_transforms((32, 32), [0.5], [0.5], augment, train=False))


def test_unknown_transform_counts_as_random():
    assert not is_deterministic(lambda image: image)


# --- sample order ---------------------------------------------------------------------


def test_sample_order_depends_on_seed_and_epoch_only_not_on_worker_processes():
    def order(workers: int, epoch: int) -> list[int]:
        loader = make_loader(IndexImages(), batch_size=4, shuffle=True, workers=workers, device=torch.device("cpu"), seed=3)
        loader.sampler.set_epoch(epoch)
        return [int(t) for _, targets in loader for t in targets]

    first = EpochOrder(16, seed=3)
    expected = list(first)
    first.set_epoch(1)
    assert list(first) != expected  # a new order each epoch
    targets = [i % 3 for i in expected]
    assert order(0, 0) == targets
    assert order(2, 0) == targets


# --- the memory budget ----------------------------------------------------------------


@pytest.mark.parametrize("text, size", [("0", 0), ("512MB", 512 * 2**20), ("4g", 4 * 2**30), ("1.5GiB", int(1.5 * 2**30)),
                                        ("2048", 2048), ("auto", None)])
def test_cache_mem_sizes_are_read_in_binary_units(text, size):
    assert cache.parse_size(text) == size


def test_auto_budget_is_a_share_of_available_memory(monkeypatch):
    monkeypatch.setattr(cache, "available_memory", lambda: 8 * 2**30)
    assert cache.memory_budget("auto") == 2 * 2**30


def test_a_cache_mem_that_is_not_a_size_is_one_sentence(tmp_path):
    result = CliRunner().invoke(main, ["finetune", "--backbone", "lenet5", "--weights", "none", "--freeze", "--data",
                                       "builtin:digits", "--out", str(tmp_path / "r"), "--cache-mem", "lots"])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: --cache-mem 'lots' is not a size; use e.g. 512MB, 4GB, 0 (always on disk) "
                                     "or auto.")
    assert not (tmp_path / "r").exists()
    with pytest.raises(TltkError):
        TrainConfig(cache_mem="-1GB").validate()


def test_cli_caches_by_default_and_no_cache_turns_it_off(tmp_path):
    common = ["finetune", "--backbone", "lenet5", "--weights", "none", "--freeze", "--data", "builtin:digits",
              "--classes", "0,1,2", "--train-per-class", "12", "--epochs", "2", "--batch-size", "8", "--workers", "0",
              "--device", "cpu", "--json"]
    runs = {}
    for name, extra in (("cached", []), ("plain", ["--no-cache"])):
        result = CliRunner().invoke(main, [*common, "--out", str(tmp_path / name), *extra], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        runs[name] = json.loads(result.output)
    assert runs["cached"]["feature_cache"] == "memory" and runs["plain"]["feature_cache"] is None
    assert runs["cached"]["test"]["accuracy"] == pytest.approx(runs["plain"]["test"]["accuracy"])
    assert runs["cached"]["final"]["val_loss"] == pytest.approx(runs["plain"]["final"]["val_loss"], rel=1e-5)
