"""Test-time augmentation: the averaged probabilities equal an average computed by hand over
views made by hand, the views of a batch go through the model together, and the setting is
recorded in what evaluate and predict hand back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.nn import functional
from torch.utils.data import TensorDataset

from tltk.cli import main
from tltk.errors import SettingError
from tltk.evaluation import evaluate_model
from tltk.metrics import multilabel_report
from tltk.run import Run, load_run
from tltk.runtime import Inference
from tltk.train.finetune import DataOptions, FinetuneConfig, finetune
from tltk.train.trainer import TrainConfig
from tltk.tta import averaged_probabilities, views

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hand_views(images: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The views as the docs define them, written out one by one."""
    def mirror(x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, dims=[3])

    if tta == "flip":
        return [images, mirror(images)]
    h, w = images.shape[-2:]
    ch, cw = round(h * 7 / 8), round(w * 7 / 8)
    crops = [images[:, :, :ch, :cw], images[:, :, :ch, w - cw:], images[:, :, h - ch:, :cw], images[:, :, h - ch:, w - cw:]]
    resized = [functional.interpolate(c, size=(h, w), mode="bilinear", align_corners=False) for c in crops]
    return [view for base in [images, *resized] for view in (base, mirror(base))]


def hand_average(model: nn.Module, images: torch.Tensor, tta: str, task: str) -> torch.Tensor:
    """Each view through the model on its own, its probabilities, then their mean."""
    model.eval()
    with torch.no_grad():
        outputs = [model(view.contiguous()).float() for view in hand_views(images, tta)]
    probabilities = [torch.sigmoid(o) if task == "multilabel" else torch.softmax(o, dim=1) for o in outputs]
    return torch.stack(probabilities).mean(dim=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    config = FinetuneConfig(
        backbone="lenet5", weights="none",
        data=DataOptions("builtin:digits", classes=["0", "1", "7"], train_per_class=10, test_split=0.1),
        train=TrainConfig(epochs=2, batch_size=8, workers=0, device="cpu", precision="fp32"),
    )
    return load_run(finetune(config, tmp_path_factory.mktemp("tta") / "run").out)


def test_views_are_the_image_its_mirror_and_four_corner_crops_each_mirrored() -> None:
    """The stacked views equal the hand-made ones, view by view (2 for flip, 10 for flip+crops)."""
    images = torch.randn(3, 3, 16, 12)
    for tta, count in (("flip", 2), ("flip+crops", 10)):
        stacked = views(images, tta)
        assert stacked.shape == (count * 3, 3, 16, 12)
        assert torch.allclose(stacked, torch.cat(hand_views(images, tta)), atol=1e-6)
    assert torch.equal(views(images, "none"), images)


@pytest.mark.parametrize("tta", ["flip", "flip+crops"])
def test_run_predict_equals_the_hand_computed_average_over_views(run: Run, tta: str) -> None:
    """Run.predict(tta=...) holds, for every test image, the mean of the softmax of the
    model on each hand-made view, in the split's order; evaluate's accuracy is that of the
    same averages."""
    dataset, _ = run.split("test")
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    targets = np.array([dataset[i][1] for i in range(len(dataset))])
    expected = hand_average(run.model, images, tta, "multiclass").numpy()

    predictions = run.predict(tta=tta, device="cpu", batch_size=10)
    assert predictions.tta == tta
    np.testing.assert_allclose(predictions.probabilities, expected, atol=1e-5)
    plain = run.predict(device="cpu", batch_size=10).probabilities
    assert not np.allclose(plain, expected, atol=1e-4)  # the views did change something

    report = run.evaluate(tta=tta, device="cpu", batch_size=10)
    assert report["tta"] == tta and report["n"] == len(targets)
    assert report["accuracy"] == pytest.approx(float(np.mean(expected.argmax(1) == targets)))


def test_multilabel_evaluation_averages_sigmoids_over_the_views() -> None:
    """For a multi-label model the averaged scores are per-class sigmoids, and the AP report
    is the one computed from the hand-made average."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    images = torch.randn(12, 3, 16, 16)
    targets = torch.randint(0, 2, (12, 3)).float()
    expected = hand_average(model, images, "flip+crops", "multilabel")
    settings = Inference(device="cpu", precision="fp32", batch_size=20, workers=0)
    report = evaluate_model(model, TensorDataset(images, targets), ["a", "b", "c"], settings, "multilabel",
                            tta="flip+crops")
    assert report["map"] == pytest.approx(multilabel_report(targets.numpy(), expected.numpy(), ["a", "b", "c"])["map"])
    with torch.no_grad():
        assert torch.allclose(averaged_probabilities(model, "multilabel", "flip+crops")(images), expected, atol=1e-6)


def test_the_views_of_a_batch_go_through_the_model_in_one_pass(run: Run) -> None:
    """With --batch-size 20 and 10 views the loader reads 2 images a batch and the model sees
    20 at once: one forward per batch, never one per view."""
    seen: list[int] = []
    handle = run.model.register_forward_hook(lambda module, args, output: seen.append(len(args[0])))
    try:
        predictions = run.predict(tta="flip+crops", device="cpu", batch_size=20)
    finally:
        handle.remove()
    images = len(predictions)
    assert len(seen) == -(-images // 2) and seen[0] == 20 and sum(seen) == 10 * images


def test_a_bad_tta_is_one_sentence_naming_the_setting(run: Run) -> None:
    with pytest.raises(SettingError, match="tta 'rotate' is not one of none, flip, flip[+]crops"):
        run.predict(tta="rotate")
    with pytest.raises(SettingError, match="tta 'rotate'"):
        run.evaluate(tta="rotate")


def test_the_command_line_records_tta_in_its_output(run: Run, tmp_path: Path) -> None:
    """`tltk evaluate --tta flip --json` and `tltk predict --tta flip --json` say which views
    were averaged; the predicted file's probabilities are the library's."""
    runner = CliRunner()
    result = runner.invoke(main, ["evaluate", str(run.path), "--tta", "flip", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["tta"] == "flip"
    text = runner.invoke(main, ["evaluate", str(run.path), "--tta", "flip", "--device", "cpu"]).output
    assert "test-time augmentation: flip" in text
    out = tmp_path / "predictions.csv"
    result = runner.invoke(main, ["predict", str(run.path), "--tta", "flip", "--format", "csv", "--out", str(out),
                                  "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["tta"] == "flip"
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    written = np.array([[float(v) for v in row[3:]] for row in rows])
    np.testing.assert_allclose(written, run.predict(tta="flip", device="cpu").probabilities, rtol=1e-5, atol=1e-6)
