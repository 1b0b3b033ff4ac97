"""Class activation maps (tltk.explain, Run.explain, tltk visualize gradcam): where the evidence is."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tltk.cli import main
from tltk.errors import TltkError
from tltk.explain import METHODS
from tltk.run import load_run
from tltk.train.finetune import DataOptions, FinetuneConfig, finetune
from tltk.train.trainer import TrainConfig

SIZE = 32
PATCH = 8
pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUADRANTS = {"top-left": (0, 0), "top-right": (0, 1), "bottom-left": (1, 0), "bottom-right": (1, 1)}


def patch_image(rng: np.random.Generator, quadrant: tuple[int, int] | None) -> Image.Image:
    """Grey noise; with a quadrant, a black-and-white checkerboard patch somewhere inside it."""
    pixels = rng.integers(90, 166, (SIZE, SIZE, 3)).astype(np.uint8)
    if quadrant is not None:
        half = SIZE // 2
        top = quadrant[0] * half + int(rng.integers(0, half - PATCH + 1))
        left = quadrant[1] * half + int(rng.integers(0, half - PATCH + 1))
        checker = (np.indices((PATCH, PATCH)).sum(axis=0) % 2 * 255).astype(np.uint8)
        pixels[top:top + PATCH, left:left + PATCH] = checker[..., None]
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def patch_run(tmp_path_factory) -> Path:
    """A small CNN trained to tell images with a checkerboard patch (in any quadrant) from plain noise."""
    root = tmp_path_factory.mktemp("patches")
    rng = np.random.default_rng(0)
    for name in ("patch", "plain"):
        (root / name).mkdir()
        for i in range(48):
            quadrant = tuple(int(v) for v in rng.integers(0, 2, 2)) if name == "patch" else None
            patch_image(rng, quadrant).save(root / name / f"{i:02d}.png")
    train = TrainConfig(epochs=6, batch_size=16, lr=2e-3, workers=0, device="cpu", seed=0)
    config = FinetuneConfig(backbone="simplecnn", weights="none", train=train, data=DataOptions(f"folder:{root}"))
    return finetune(config, tmp_path_factory.mktemp("runs") / "patches").out


@pytest.fixture(scope="module")
def quadrant_images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("probe")
    rng = np.random.default_rng(123)
    paths = {}
    for name, quadrant in QUADRANTS.items():
        paths[name] = folder / f"{name}.png"
        patch_image(rng, quadrant).save(paths[name])
    return paths


def quadrant_means(heatmap: np.ndarray) -> dict[str, float]:
    half_h, half_w = heatmap.shape[0] // 2, heatmap.shape[1] // 2
    return {name: float(heatmap[r * half_h:(r + 1) * half_h, c * half_w:(c + 1) * half_w].mean())
            for name, (r, c) in QUADRANTS.items()}


def test_the_trained_run_tells_patch_from_plain(patch_run: Path) -> None:
    """The sanity check below means something only if the model learnt the patch."""
    assert load_run(patch_run).evaluate()["accuracy"] >= 0.9


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "scorecam"])
def test_the_map_for_patch_peaks_in_the_quadrant_holding_the_patch(patch_run: Path, quadrant_images, method) -> None:
    """For each quadrant, the class map of 'patch' is highest, on average, over the quadrant
    where the patch is: a map flipped, transposed or placed wrongly fails for some quadrant."""
    run = load_run(patch_run)
    explanations = run.explain(list(quadrant_images.values()), class_name="patch", method=method, device="cpu")
    for (name, _), explanation in zip(QUADRANTS.items(), explanations):
        means = quadrant_means(explanation.heatmap)
        assert max(means, key=means.get) == name, (method, name, means)
        peak = np.unravel_index(np.argmax(explanation.heatmap), explanation.heatmap.shape)
        assert (peak[0] >= SIZE // 2, peak[1] >= SIZE // 2) == tuple(bool(v) for v in QUADRANTS[name]), (name, peak)


@pytest.mark.parametrize("method", METHODS)
def test_maps_have_the_image_size_are_finite_and_not_constant(patch_run: Path, tmp_path: Path, method) -> None:
    """A 48x40 image (not the run's 32x32) gets a 40x48 map over it, in 0..1, with structure."""
    image = tmp_path / "wide.png"
    patch_image(np.random.default_rng(5), (0, 1)).resize((48, 40)).save(image)
    (explanation,) = load_run(patch_run).explain([image], method=method, device="cpu")
    assert explanation.heatmap.shape == (40, 48)
    assert explanation.image.shape == (40, 48, 3)
    assert np.isfinite(explanation.heatmap).all()
    assert explanation.heatmap.min() >= 0 and explanation.heatmap.max() <= 1
    assert explanation.heatmap.std() > 0.05
    assert explanation.layer == "pool5" and explanation.method == method


def test_without_a_class_the_predicted_class_is_explained_with_its_probability(patch_run: Path, quadrant_images) -> None:
    run = load_run(patch_run)
    explanations = run.explain([quadrant_images["top-left"]], device="cpu")
    predictions = run.predict(str(quadrant_images["top-left"].parent), device="cpu")
    row = predictions.ids.index("top-left.png")
    assert [e.class_name for e in explanations] == [run.class_names[int(predictions.predicted_index()[row])]]
    assert explanations[0].probability == pytest.approx(float(predictions.probabilities[row].max()), abs=1e-3)


def test_gradcam_command_writes_one_picture_per_image(patch_run: Path, quadrant_images, tmp_path: Path) -> None:
    images = [str(quadrant_images["top-left"]), str(quadrant_images["bottom-right"])]
    result = CliRunner().invoke(main, ["visualize", "gradcam", str(patch_run), "--image", images[0], "--image",
                                       images[1], "--method", "gradcam++", "--out", str(tmp_path / "cams"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [m["image"] for m in report["maps"]] == images
    assert len(report["pictures"]) == 2
    for picture in report["pictures"]:
        with Image.open(picture) as png:
            assert png.width >= 300 and png.height >= 200
    assert {Path(p).name for p in report["pictures"]} == {"000_top-left_gradcamplusplus.png",
                                                           "001_bottom-right_gradcamplusplus.png"}


@pytest.mark.parametrize("args, sentence", [
    (["--layer", "nosuch"], r"has no layer 'nosuch'; its named layers are conv1, pool5, fc7"),
    (["--layer", "fc7"], r"layer 'fc7' outputs a vector, not a spatial map"),
    (["--class", "zebra"], r"the run has no class 'zebra'; its classes are patch, plain"),
])
def test_bad_layer_or_class_is_one_sentence_and_writes_nothing(patch_run, quadrant_images, tmp_path, args, sentence):
    out = tmp_path / "cams"
    result = CliRunner().invoke(main, ["visualize", "gradcam", str(patch_run), "--image",
                                       str(quadrant_images["top-left"]), *args, "--out", str(out)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert re.search(sentence, " ".join(result.output.split())), result.output
    assert not out.exists()


def test_an_undecodable_image_is_one_sentence(patch_run: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(TltkError, match=r"Cannot decode image .*broken.png"):
        load_run(patch_run).explain([broken], device="cpu")
    with pytest.raises(TltkError, match=r"does not exist"):
        load_run(patch_run).explain([tmp_path / "missing.png"], device="cpu")


def test_a_sequence_backbone_is_refused_with_the_reason(tmp_path: Path) -> None:
    """An LSTM over image rows has no spatial map; the sentence says so rather than drawing noise."""
    from tltk.explain import explain_images
    from tltk.model import ModelSpec, build_model

    model = build_model(ModelSpec("lstm", "linear", 2, weights="none")).eval()
    image = tmp_path / "x.png"
    patch_image(np.random.default_rng(0), None).save(image)
    with pytest.raises(TltkError, match=r"lstm reads an image as a sequence of rows and has no convolutional layer"):
        explain_images(model, [image], ["a", "b"], model.preprocessing)


def test_a_multilabel_model_gets_a_map_per_predicted_label(tmp_path: Path) -> None:
    """Labels at or above the threshold each get a map; below it, none."""
    import torch

    from tltk.explain import explain_images
    from tltk.model import ModelSpec, build_model

    torch.manual_seed(0)
    model = build_model(ModelSpec("simplecnn", "linear", 3, weights="none")).eval()
    linear = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():  # logits about +5, -5, +5 whatever the image: labels a and c are predicted
        linear.weight.mul_(1e-3)
        linear.bias.copy_(torch.tensor([5.0, -5.0, 5.0]))
    image = tmp_path / "x.png"
    patch_image(np.random.default_rng(0), (0, 0)).save(image)
    explanations = explain_images(model, [image], ["a", "b", "c"], model.preprocessing, "multilabel", device="cpu")
    assert [e.class_name for e in explanations] == ["a", "c"]
    assert all(e.probability > 0.99 for e in explanations)


CNN_BACKBONES = ["alexnet", "vgg16", "vgg16_bn", "resnet18", "simplecnn", "lenet5", "mnist-cnn", "alexnet-bn",
                 "cifar-vgg7-bn", "cifar-vgg11-bn", "timm:mobilenetv3_small_050", "tinyconv"]


@pytest.mark.parametrize("backbone", CNN_BACKBONES)
def test_every_builtin_cnn_a_timm_cnn_and_a_plugin_cnn_get_a_map_at_a_spatial_layer(backbone: str, tmp_path: Path):
    """Untrained, at 64 px (or the network's own size where smaller: the small nets are fixed-size):
    the default layer is a map larger than one pixel (pool5, or the last convolution where pool5 is a
    single pixel), and the map comes back at the image's size."""
    from tltk.explain import default_layer, explain_images, map_size
    from tltk.model import ModelSpec, build_model

    model = build_model(ModelSpec(backbone, "linear", 2, weights="none")).eval()
    preprocessing = model.preprocessing.resized(min(64, model.preprocessing.input_size[0]))
    layer = default_layer(model, preprocessing)
    assert map_size(model, layer, preprocessing) > 1
    image = tmp_path / "x.png"
    patch_image(np.random.default_rng(0), (1, 0)).resize((50, 40)).save(image)
    (explanation,) = explain_images(model, [image], ["a", "b"], preprocessing, device="cpu")
    assert explanation.layer == layer
    assert explanation.heatmap.shape == (40, 50) and np.isfinite(explanation.heatmap).all()


@pytest.mark.parametrize("backbone", ["rnn", "lstm", "gru"])
def test_every_sequence_backbone_is_refused(backbone: str) -> None:
    from tltk.explain import default_layer
    from tltk.model import ModelSpec, build_model

    model = build_model(ModelSpec(backbone, "linear", 2, weights="none"))
    with pytest.raises(TltkError, match="has no convolutional layer, so there is no spatial map"):
        default_layer(model, model.preprocessing)


def test_more_images_than_one_backward_pass_takes_give_the_same_map_for_the_same_image(patch_run, quadrant_images):
    """Maps are computed in batches of CAM_BATCH; an image gets the same map whichever batch it fell in."""
    from tltk.explain import CAM_BATCH

    images = [quadrant_images["top-right"]] * (CAM_BATCH + 3)
    explanations = load_run(patch_run).explain(images, class_name="patch", device="cpu")
    assert [e.position for e in explanations] == list(range(len(images)))
    np.testing.assert_allclose(explanations[-1].heatmap, explanations[0].heatmap, atol=1e-5)
