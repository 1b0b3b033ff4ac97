"""An input size the network cannot take is refused in one sentence, before anything is written.

simplecnn ends in a dense layer sized for 32x32 images: at 8x8 its last feature map has
128 values where the layer expects 2,048, which torch reports as a matrix-shape error
inside the first forward pass.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from tltk.backbones import build_backbone
from tltk.cli import main
from tltk.errors import TltkError
from tltk.features.source import load_backbone_source
from tltk.layers import check_input_size
from tltk.model import ModelSpec, build_model
from tltk.summary import summarize
from tltk.train.finetune import DataOptions, FinetuneConfig, finetune
from tltk.train.trainer import TrainConfig

REFUSAL = r"simplecnn cannot run on 8x8 images \(mat1 and mat2 shapes.*\); use its own input size \(32, 32\)\."


def test_finetune_refuses_a_size_the_backbone_cannot_take_before_writing_the_run(tmp_path):
    config = FinetuneConfig(backbone="simplecnn", weights="none", data=DataOptions("builtin:digits"), input_size=8,
                            train=TrainConfig(epochs=1))
    with pytest.raises(TltkError, match=REFUSAL):
        finetune(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_finetune_says_one_line_and_exits_non_zero(tmp_path):
    result = CliRunner().invoke(main, ["finetune", "--backbone", "simplecnn", "--data", "builtin:digits",
                                       "--input-size", "8", "--epochs", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "simplecnn cannot run on 8x8 images" in result.output
    assert not (tmp_path / "run").exists()


def test_summary_refuses_the_size_in_the_same_words():
    model = build_model(ModelSpec("simplecnn", "linear", 10, weights="none"))
    with pytest.raises(TltkError, match=REFUSAL):
        summarize(model, (8, 8))
    assert summarize(model, (32, 32)).rows  # its own size runs


def test_extraction_refuses_a_layer_past_what_the_size_allows_before_writing_a_store(tmp_path):
    """conv1 exists at 8x8 (extraction stops there); fc7, past the dense layer, does not."""
    from tltk.features import Loading, extract

    source = load_backbone_source("simplecnn", "none", input_size=8)
    options = dict(split="test", loading=Loading(batch_size=32, device="cpu", workers=0), classes=["0", "1"])
    assert extract(source, "conv1", tmp_path / "early", "builtin:digits", **options).dim == 32
    with pytest.raises(TltkError, match=REFUSAL):
        extract(source, "fc7", tmp_path / "late", "builtin:digits", **options)
    assert not (tmp_path / "late").exists()


def test_the_check_changes_neither_the_mode_nor_the_batchnorm_statistics():
    backbone = build_backbone("resnet18", pretrained=False)
    backbone.train()
    before = {name: buffer.clone() for name, buffer in backbone.named_buffers()}
    check_input_size(backbone, (32, 32))
    assert backbone.training
    for name, buffer in backbone.named_buffers():
        assert torch.equal(buffer, before[name]), name


@pytest.mark.parametrize("size", [0, -3])
def test_a_size_below_one_is_refused_rather_than_read_as_the_default(size, tmp_path):
    config = FinetuneConfig(backbone="simplecnn", weights="none", data=DataOptions("builtin:digits"), input_size=size,
                            train=TrainConfig(epochs=1))
    with pytest.raises(TltkError, match=rf"--input-size must be at least 1, not {size}"):
        finetune(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [["summary", "--backbone", "resnet18"], ["layers", "--backbone", "resnet18"]])
@pytest.mark.parametrize("size", ["0", "-2"])
def test_summary_and_layers_refuse_a_size_below_one(command, size):
    """summary read 0 as the backbone's own size; layers answered -2 with a traceback."""
    result = CliRunner().invoke(main, [*command, "--input-size", size])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"--input-size must be at least 1, not {size}" in result.output
