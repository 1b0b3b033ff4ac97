"""tltk export (ONNX, TorchScript) with its parity check, and tltk predict with an exported ONNX file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tltk.cli import main
from tltk.deploy import PARITY_TOLERANCE, ParityError, export_model, open_model, predict_onnx
from tltk.errors import TltkError
from tltk.run import load_run
from tltk.train.finetune import DataOptions, FinetuneConfig, finetune
from tltk.train.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIGITS = DataOptions("builtin:digits", classes=["3", "5", "8"], train_per_class=10)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Callable[[str], Path]:
    """A run of a backbone on three digit classes (made once per backbone): the plugin's
    tinyconv trained whole, the big torchvision/timm nets with a frozen backbone at 32 px.
    In fp32, the precision of an exported file: a run in bf16 predicts in bf16, and on a
    near tie its top class may differ from the fp32 file's."""
    runs: dict[str, Path] = {}

    def run_of(backbone: str) -> Path:
        if backbone not in runs:
            frozen = backbone in ("resnet18", "vgg16")
            config = FinetuneConfig(backbone=backbone, weights="none", data=DIGITS, input_size=32,
                                    strategy="freeze" if frozen else "finetune",
                                    train=TrainConfig(epochs=2, batch_size=8, lr=3e-3, workers=0, device="cpu",
                                                      precision="fp32"))
            runs[backbone] = finetune(config, tmp_path_factory.mktemp("runs") / backbone).out
        return runs[backbone]

    return run_of


@pytest.fixture(scope="module")
def tinyconv_onnx(trained, tmp_path_factory) -> Path:
    """The tinyconv run exported to ONNX once, for the tests that only read the file."""
    out = tmp_path_factory.mktemp("exported") / "tinyconv.onnx"
    export_model(trained("tinyconv"), "onnx", out)
    return out


def exported_labels(model_file: Path, fmt: str, run_dir: Path) -> np.ndarray:
    """The exported file's top class for each test image, fed as the run feeds its model."""
    forward, _ = open_model(model_file, fmt)
    dataset, _ = load_run(run_dir).split("test")
    images = np.stack([dataset[i][0].numpy() for i in range(len(dataset))])
    return forward(images).argmax(axis=1)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("backbone", ["tinyconv", pytest.param("resnet18", marks=pytest.mark.slow),
                                      pytest.param("vgg16", marks=pytest.mark.slow)])
def test_export_passes_parity_and_predicts_the_run_labels_on_the_test_split(trained, tmp_path, backbone, fmt):
    """The whole model (plugin, timm and torchvision backbones) exported, checked on every test
    image within 1e-4, and the file picks the run's class for every test image."""
    run_dir = trained(backbone)
    out = tmp_path / f"model.{fmt}"
    result = export_model(run_dir, fmt, out)
    test_size = len(load_run(run_dir).split("test")[0])
    assert out.is_file()
    assert result.parity.images == test_size > 16  # more than one batch of 16: the batch axis varies
    assert result.parity.max_difference <= PARITY_TOLERANCE
    assert result.parity.same_labels == test_size
    run_labels = load_run(run_dir).predict(device="cpu").predicted_index()
    assert (exported_labels(out, fmt, run_dir) == run_labels).all()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_the_card_carries_classes_preprocessing_task_and_a_dynamic_batch_axis(trained, tinyconv_onnx, tmp_path):
    import onnx
    import torch

    run = load_run(trained("tinyconv"))
    proto = onnx.load(str(tinyconv_onnx))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["class_names"]) == run.class_names == ["3", "5", "8"]
    assert json.loads(props["preprocessing"]) == run.preprocessing.to_dict()
    assert props["task"] == "multiclass" and props["output"] == "probabilities"
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    export_model(run, "torchscript", tmp_path / "m.pt")
    extra = {"tltk.json": ""}
    torch.jit.load(str(tmp_path / "m.pt"), _extra_files=extra)
    assert json.loads(json.loads(extra["tltk.json"])["class_names"]) == run.class_names


def test_a_failed_parity_check_writes_nothing_and_says_by_how_much(trained, tmp_path, monkeypatch) -> None:
    """An exported model off by 1e-3 is refused: no file, no temporary left, the difference named."""
    import tltk.deploy.write as write

    def off_by_a_little(path, fmt, device="cpu"):
        forward, card = open_model(path, fmt, device)
        return (lambda images: forward(images) + 1e-3), card

    monkeypatch.setattr(write, "open_model", off_by_a_little)
    out = tmp_path / "out" / "m.onnx"
    with pytest.raises(ParityError, match=r"differs from the PyTorch model by up to 0\.001 in probability on \d+ "
                                          r"test images \(allowed: 0\.0001\), so .*m\.onnx was not written"):
        export_model(trained("tinyconv"), "onnx", out)
    assert list(out.parent.iterdir()) == []


def test_predict_with_the_onnx_file_writes_the_same_kaggle_csv_as_the_run(trained, tmp_path) -> None:
    """Same exporter, same rows in the same order: only the engine differs."""
    run_dir = str(trained("tinyconv"))
    runner = CliRunner()
    exported = runner.invoke(main, ["export", run_dir, "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert exported.exit_code == 0, exported.output
    assert "parity on" in exported.output
    for source, name in ((run_dir, "run.csv"), (str(tmp_path / "m.onnx"), "onnx.csv")):
        result = runner.invoke(main, ["predict", source, "--format", "kaggle", "--id-from", "path", "--device", "cpu",
                                      "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    run_rows = (tmp_path / "run.csv").read_text().splitlines()
    assert len(run_rows) > 20
    assert (tmp_path / "onnx.csv").read_text().splitlines() == run_rows


def test_predict_with_the_onnx_file_on_a_folder_of_unlabelled_images_keeps_the_run_order(trained, tinyconv_onnx,
                                                                                          tmp_path) -> None:
    run = load_run(trained("tinyconv"))
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("b", "a", "c"):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    from_onnx = predict_onnx(tinyconv_onnx, str(folder))
    from_run = run.predict(str(folder), device="cpu")
    assert from_onnx.ids == from_run.ids == ["a.png", "b.png", "c.png"]
    assert from_onnx.class_names == run.class_names
    np.testing.assert_allclose(from_onnx.probabilities, from_run.probabilities, atol=1e-3)


def test_predict_with_the_onnx_file_averages_the_same_test_time_views_as_the_run(trained, tinyconv_onnx) -> None:
    """--tta with an ONNX file: the same views, averaged the same way, as predicting with the run."""
    run = load_run(trained("tinyconv"))
    from_onnx = predict_onnx(tinyconv_onnx, tta="flip+crops", batch_size=20)
    from_run = run.predict(tta="flip+crops", device="cpu")
    plain = predict_onnx(tinyconv_onnx)
    assert from_onnx.tta == from_run.tta == "flip+crops" and from_onnx.ids == from_run.ids
    np.testing.assert_allclose(from_onnx.probabilities, from_run.probabilities, atol=1e-4)
    assert np.abs(from_onnx.probabilities - plain.probabilities).max() > 1e-3  # the views made a difference


def test_a_file_that_is_not_onnx_is_refused_in_one_sentence(trained, tmp_path) -> None:
    text = tmp_path / "model.onnx"
    text.write_text("hello")
    runner = CliRunner()
    result = runner.invoke(main, ["predict", str(text), "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 2
    assert "is not an ONNX model file" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "p.csv").exists()
    export_model(trained("tinyconv"), "torchscript", tmp_path / "m.pt")
    with pytest.raises(TltkError, match="m.pt is not an ONNX model file"):
        predict_onnx(tmp_path / "m.pt")


def test_an_onnx_file_without_tltk_metadata_is_refused(tinyconv_onnx, tmp_path) -> None:
    import onnx

    proto = onnx.load(str(tinyconv_onnx))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    with pytest.raises(TltkError, match=r"bare.onnx carries no class_names in its metadata, so it was not written by"):
        predict_onnx(tmp_path / "bare.onnx")


def test_an_unknown_format_and_a_folder_as_out_are_refused(trained, tmp_path) -> None:
    with pytest.raises(TltkError, match="format 'tflite' is not one of onnx, torchscript"):
        export_model(trained("tinyconv"), "tflite", tmp_path / "m.tflite")
    with pytest.raises(TltkError, match="is a folder; give the path of the model file"):
        export_model(trained("tinyconv"), "onnx", tmp_path)


def test_a_missing_optional_package_names_the_extra_to_install() -> None:
    from tltk.errors import require

    with pytest.raises(TltkError, match=r"package 'no_such_package_here', which is not installed; install it with "
                                        r"pip install 'tltk\[deploy\]'"):
        require("no_such_package_here.sub", "deploy")


def test_a_multilabel_run_exports_sigmoids_and_its_onnx_file_predicts_the_run_rows(tmp_path) -> None:
    """VOC (multi-label): the file's outputs are per-class sigmoids, its card says multilabel, and
    predicting with it on the run's own test split gives the run's rows and probabilities."""
    from voc_fixtures import write_voc

    voc = write_voc(tmp_path / "voc", images=24)
    config = FinetuneConfig(backbone="simplecnn", input_size=32, weights="none", data=DataOptions(f"voc:{voc}"),
                            train=TrainConfig(epochs=1, batch_size=4, workers=0, device="cpu", precision="fp32",
                                              monitor="val_map"))
    run = load_run(finetune(config, tmp_path / "run").out)
    assert run.task == "multilabel"
    result = export_model(run, "onnx", tmp_path / "voc.onnx")
    assert result.parity.max_difference <= PARITY_TOLERANCE
    from_onnx = predict_onnx(tmp_path / "voc.onnx")
    from_run = run.predict(device="cpu")
    assert from_onnx.task == "multilabel" and from_onnx.ids == from_run.ids and len(from_run) == 6
    np.testing.assert_allclose(from_onnx.probabilities, from_run.probabilities, atol=PARITY_TOLERANCE)
    assert not np.allclose(from_onnx.probabilities.sum(axis=1), 1.0)  # sigmoids, not a softmax
