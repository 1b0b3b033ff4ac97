"""Tests for the course reports' networks: alexnet-bn, lenet5's variants, the CIFAR-10
report's VGG-style nets, and the rnn / lstm / gru backbones that read images row by row.

The generic checks (build, forward at the input size, preprocessing, stages) run for every
registered backbone in test_backbones.py; these pin what each course net promises on top:
the reports' layer lists and parameter counts, the options, and training behaviour
(a frozen course net stays bit-identical, --clip-grad bounds an RNN's gradient).
Training runs are two steps on 8 random images on the CPU.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils.data import TensorDataset

from tltk.backbones import build_backbone
from tltk.backbones.base import count_parameters
from tltk.cli import main
from tltk.errors import TltkError
from tltk.model import ModelSpec, build_model
from tltk.strategies import build_strategy
from tltk.summary import summarize
from tltk.train.callbacks import Callback
from tltk.train.trainer import TrainConfig, fit

SEQUENCE_NETS = ("rnn", "lstm", "gru")
TORCH_RNN = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def kinds(module: nn.Sequential) -> list[str]:
    return [type(m).__name__ for m in module]


def images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


# ----------------------------------------------------------------- alexnet-bn

# The VOC report's summary table, parameters of each layer that has any, in order.
VOC_REPORT_LAYER_PARAMS = [
    23_296, 128, 307_392, 384, 663_936, 768, 884_992, 512, 590_080, 512, 37_752_832, 16_781_312, 86_037,
]


def test_alexnet_bn_with_a_21_way_head_at_227_px_totals_the_voc_reports_57092181_parameters():
    torch.manual_seed(0)
    model = build_model(ModelSpec("alexnet-bn", "linear", 21, weights="none"))
    summary = summarize(model, (227, 227))
    assert summary.total == 57_092_181
    assert [row.params for row in summary.rows if row.params] == VOC_REPORT_LAYER_PARAMS
    shapes = {row.name: row.output_shape for row in summary.rows}
    assert shapes["backbone.net.features.0"] == (64, 56, 56), "conv1 at 227 px gives 56x56, as in the report"
    assert shapes["backbone.net.features.17"] == (256, 6, 6)


def test_cli_summary_of_alexnet_bn_with_21_classes_at_227_prints_total_57092181():
    result = cli("summary", "--backbone", "alexnet-bn", "--num-classes", "21", "--input-size", "227")
    assert result.exit_code == 0, result.output
    assert "Total params: 57,092,181" in result.output


def test_alexnet_bn_has_conv_batchnorm_relu_blocks_and_taps_after_the_relus():
    backbone = build_backbone("alexnet-bn")
    features = backbone.net.features
    convs = [i for i, m in enumerate(features) if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5
    for i in convs:
        assert isinstance(features[i + 1], nn.BatchNorm2d) and isinstance(features[i + 2], nn.ReLU)
    assert [features[i].out_channels for i in convs] == [64, 192, 384, 256, 256]
    assert (features[0].kernel_size, features[0].stride, features[0].padding) == ((11, 11), (4, 4), (2, 2))
    assert backbone.feature_dim == 4096 and backbone.preprocessing.input_size == (227, 227)
    expected = {"conv1": nn.ReLU, "pool5": nn.MaxPool2d, "fc6": nn.ReLU, "fc7": nn.ReLU}
    for label, kind in expected.items():
        assert isinstance(backbone.net.get_submodule(backbone.layers[label]), kind), label
    assert not any(isinstance(m, nn.Linear) and m.out_features != 4096 for m in backbone.net.modules())


# ----------------------------------------------------------------- lenet5 options


def test_default_lenet5_is_unchanged_62006_parameters_with_relus_and_no_batchnorm():
    model = build_model(ModelSpec("lenet5", "linear", 10, weights="none"))
    assert count_parameters(model) == 62_006
    backbone = model.backbone
    assert kinds(backbone.net.features) == ["Conv2d", "ReLU", "MaxPool2d"] * 2
    assert kinds(backbone.net.fc) == ["Linear", "ReLU"] * 2
    assert backbone.layers == {"conv1": "features.1", "pool5": "features.5", "fc6": "fc.1", "fc7": "fc.3"}


def test_lenet5_leakyrelu_puts_the_given_slope_in_every_activation_and_keeps_the_parameter_count():
    backbone = build_backbone("lenet5", act="leakyrelu", negative_slope=0.1)
    leaky = [m for m in backbone.net.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(leaky) == 4 and all(m.negative_slope == 0.1 for m in leaky)
    assert not any(type(m) is nn.ReLU for m in backbone.net.modules())
    assert count_parameters(backbone) == 62_006 - 850
    x = torch.full((1, 3, 32, 32), -1.0)
    assert (backbone(x) != 0).any(), "a negative input leaks through LeakyReLU"


def test_lenet5_batchnorm_adds_one_after_each_conv_and_hidden_dense_layer_and_moves_the_taps():
    backbone = build_backbone("lenet5", batchnorm=True)
    assert kinds(backbone.net.features) == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] * 2
    assert kinds(backbone.net.fc) == ["Linear", "BatchNorm1d", "ReLU"] * 2
    assert count_parameters(backbone) == 61_156 + 2 * (6 + 16 + 120 + 84)
    assert backbone.layers == {"conv1": "features.2", "pool5": "features.7", "fc6": "fc.2", "fc7": "fc.5"}
    assert backbone.forward(images(2, 32)).shape == (2, 84)


def test_lenet5_both_changes_together_give_batchnorm_then_leakyrelu():
    backbone = build_backbone("lenet5", act="leakyrelu", negative_slope=0.1, batchnorm=True)
    assert kinds(backbone.net.features) == ["Conv2d", "BatchNorm2d", "LeakyReLU", "MaxPool2d"] * 2


@pytest.mark.parametrize(
    "options, message",
    [
        ({"act": "tanh"}, "act='tanh' is not one of relu, leakyrelu"),
        ({"batchnorm": "yes"}, "batchnorm='yes' is not true or false"),
        ({"act": "leakyrelu", "negative_slope": "steep"}, "negative_slope='steep' is not a number"),
        ({"negative_slope": 0.2}, "applies only to act=leakyrelu"),
    ],
)
def test_lenet5_refuses_bad_options_with_one_sentence_naming_the_option(options, message):
    with pytest.raises(TltkError, match=message):
        build_backbone("lenet5", **options)


def test_cli_lenet5_backbone_opts_reach_the_factory_typed():
    result = cli("summary", "--backbone", "lenet5", "--backbone-opt", "act=leakyrelu",
                 "--backbone-opt", "negative_slope=0.1", "--backbone-opt", "batchnorm=true")
    assert result.exit_code == 0, result.output
    assert "LeakyReLU" in result.output and "BatchNorm2d" in result.output
    assert "Total params: 62,458" in result.output


# ----------------------------------------------------------------- the CIFAR-10 report's VGG-style nets

GOODMODEL_FEATURES = (["Conv2d", "ReLU", "BatchNorm2d"] * 2 + ["MaxPool2d"]) * 2 + ["Conv2d", "ReLU", "BatchNorm2d", "MaxPool2d"]
GOODESTMODEL_FEATURES = (["Conv2d", "BatchNorm2d", "ReLU"] * 2 + ["MaxPool2d", "Dropout"]) * 4
GOODESTMODEL_FC = ["Linear", "BatchNorm1d", "ReLU", "Dropout"] * 2


def test_cifar_vgg7_bn_follows_goodmodel_as_printed_up_to_its_hidden_dense_layer():
    model = build_model(ModelSpec("cifar-vgg7-bn", "linear", 10, weights="none"))
    net = model.backbone.net
    assert kinds(net.features) == GOODMODEL_FEATURES
    assert [m.out_channels for m in net.features if isinstance(m, nn.Conv2d)] == [32, 32, 64, 64, 128]
    assert all(m.kernel_size == (3, 3) and m.padding == (1, 1) for m in net.features if isinstance(m, nn.Conv2d))
    assert kinds(net.fc) == ["Linear", "ReLU", "Dropout"]
    assert (net.fc[0].in_features, net.fc[0].out_features, net.fc[2].p) == (2048, 64, 0.15)
    assert (model.head[-1].in_features, model.head[-1].out_features) == (64, 10)
    assert count_parameters(model) == 271_850


def test_cifar_vgg11_bn_follows_goodestmodel_as_printed_up_to_its_last_hidden_dense_layer():
    model = build_model(ModelSpec("cifar-vgg11-bn", "linear", 10, weights="none"))
    net = model.backbone.net
    assert kinds(net.features) == GOODESTMODEL_FEATURES
    assert [m.out_channels for m in net.features if isinstance(m, nn.Conv2d)] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert [m.p for m in net.features if isinstance(m, nn.Dropout)] == [0.1, 0.2, 0.3, 0.5]
    assert kinds(net.fc) == GOODESTMODEL_FC
    widths = [(m.in_features, m.out_features) for m in net.fc if isinstance(m, nn.Linear)]
    assert widths == [(2048, 1024), (1024, 1024)]
    assert (model.head[-1].in_features, model.head[-1].out_features) == (1024, 10)
    assert count_parameters(model) == 7_851_338


@pytest.mark.parametrize("name, total", [("cifar-vgg7-bn", "271,850"), ("cifar-vgg11-bn", "7,851,338")])
def test_cli_summary_shows_the_vgg_style_nets_layer_table_and_total(name, total):
    result = cli("summary", "--backbone", name, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["input_size"] == [32, 32]
    assert report["layers"][-1]["output_shape"] == [10]
    assert sum(layer["type"] == "BatchNorm2d" for layer in report["layers"]) == (5 if name == "cifar-vgg7-bn" else 8)
    assert f"{report['total_params']:,}" == total


# ----------------------------------------------------------------- sequence backbones


@pytest.mark.parametrize("name", SEQUENCE_NETS)
def test_greyscale_sequence_net_reads_a_28x28_image_as_28_steps_of_28_values(name):
    backbone = build_backbone(name, greyscale=True)
    rnn = backbone.net.rnn
    assert isinstance(rnn, TORCH_RNN[name])
    assert (rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.batch_first) == (28, 128, 1, True)
    x = images(2, 28)
    rows = backbone.net.rows(x)
    assert rows.shape == (2, 28, 28)
    assert torch.allclose(rows[:, 5], x[:, :, 5, :].mean(dim=1)), "step 5 is image row 5, channels averaged"


@pytest.mark.parametrize("name", SEQUENCE_NETS)
def test_colour_sequence_net_reads_each_row_as_every_pixels_rgb_values_in_turn(name):
    backbone = build_backbone(name)
    assert backbone.net.rnn.input_size == 28 * 3
    x = images(2, 28)
    rows = backbone.net.rows(x)
    assert rows.shape == (2, 28, 84)
    n, t, w, c = 1, 7, 13, 2
    assert rows[n, t, 3 * w + c] == x[n, c, t, w]


@pytest.mark.parametrize("name", SEQUENCE_NETS)
def test_sequence_feature_vector_is_the_top_layers_last_hidden_state(name):
    torch.manual_seed(0)
    backbone = build_backbone(name, hidden=16, layers=2).eval()
    x = images(3, 28)
    with torch.no_grad():
        output, state = backbone.net.rnn(backbone.net.rows(x))
        h_n = state[0] if name == "lstm" else state
        vector = backbone(x)
        spatial = backbone.forward_spatial(x)
    assert h_n.shape == (2, 3, 16)
    assert torch.equal(vector, h_n[-1])
    assert not torch.equal(vector, h_n[0]), "the top layer, not the first"
    assert spatial.shape == (3, 16, 28, 1)
    assert torch.equal(spatial[:, :, 9, 0], output[:, 9]), "map row t is the state after image row t"


def test_lstm_vector_matches_a_hand_run_nn_lstm_with_the_same_weights():
    torch.manual_seed(0)
    backbone = build_backbone("lstm", greyscale=True, hidden=32).eval()
    reference = nn.LSTM(28, 32, batch_first=True)
    reference.load_state_dict(backbone.net.rnn.state_dict())
    x = images(2, 28)
    with torch.no_grad():
        _, (h_n, _) = reference(x.mean(dim=1))
        assert torch.allclose(backbone(x), h_n[0])


@pytest.mark.parametrize("name", SEQUENCE_NETS)
def test_sequence_options_set_width_depth_and_input_size(name):
    backbone = build_backbone(name, hidden=40, layers=3, size=16)
    assert (backbone.feature_dim, backbone.spatial_channels) == (40, 40)
    assert backbone.net.rnn.num_layers == 3
    assert backbone.preprocessing.input_size == (16, 16)
    assert backbone(images(2, 16)).shape == (2, 40)


def test_rnn_nonlinearity_option_reaches_torchs_rnn():
    assert build_backbone("rnn").net.rnn.nonlinearity == "tanh"
    assert build_backbone("rnn", nonlinearity="relu").net.rnn.nonlinearity == "relu"


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("lstm", {"hidden": 0}, "hidden=0 is not a whole number of at least 1"),
        ("gru", {"layers": 1.5}, "layers=1.5 is not a whole number"),
        ("rnn", {"nonlinearity": "sigmoid"}, "nonlinearity='sigmoid' is not one of tanh, relu"),
        ("gru", {"greyscale": "yes"}, "greyscale='yes' is not true or false"),
        ("lstm", {"nonlinearity": "relu"}, "backbone 'lstm' has no option 'nonlinearity'"),
    ],
)
def test_sequence_nets_refuse_bad_options_with_one_sentence_naming_the_option(name, options, message):
    with pytest.raises(TltkError, match=message):
        build_backbone(name, **options)


def test_sequence_net_given_images_of_another_width_says_which_size_option_to_pass():
    backbone = build_backbone("gru")
    with pytest.raises(TltkError, match="28 pixels wide.*--backbone-opt size=32"):
        backbone(images(1, 32))


def test_conv_head_on_a_sequence_net_reads_the_per_row_state_map():
    model = build_model(ModelSpec("gru", "conv", 10, {"hidden": 8}, weights="none"))
    assert model.uses_spatial
    assert model(images(2, 28)).shape == (2, 10)


def test_sequence_nets_name_no_conv_or_fc_layers_since_they_have_none():
    for name in SEQUENCE_NETS:
        backbone = build_backbone(name)
        assert backbone.layers == {}
        assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in backbone.net.modules())


# ----------------------------------------------------------------- training behaviour

COURSE_NETS = [
    ("alexnet-bn", {}, 67),  # small input: the adaptive pool keeps the 6x6 map, two steps stay cheap
    ("cifar-vgg7-bn", {}, 32),
    ("cifar-vgg11-bn", {}, 32),
    ("lenet5", {"act": "leakyrelu", "negative_slope": 0.1, "batchnorm": True}, 32),
    ("rnn", {}, 28),
    ("lstm", {"greyscale": True}, 28),
    ("gru", {"layers": 2}, 28),
]


def tiny_set(size: int, n: int = 8) -> TensorDataset:
    generator = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(n, 3, size, size, generator=generator), torch.randint(0, 3, (n,), generator=generator))


def train_config(**overrides: Any) -> TrainConfig:
    base = {"epochs": 1, "batch_size": 4, "device": "cpu", "workers": 0, "precision": "fp32", "schedule": "none"}
    return TrainConfig(**(base | overrides))


@pytest.mark.parametrize("name, options, size", COURSE_NETS, ids=[n for n, _, _ in COURSE_NETS])
def test_freeze_keeps_every_tensor_of_a_course_net_bit_identical_while_the_head_trains(name, options, size):
    torch.manual_seed(0)
    model = build_model(ModelSpec(name, "linear", 3, weights="none", backbone_options=options))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = [p.clone() for p in model.head.parameters()]
    result = fit(model, build_strategy("freeze"), tiny_set(size), None, train_config(lr=1e-2))
    assert result.steps == 2
    after = model.backbone.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], f"frozen {name} changed: {changed}"
    assert any(not torch.equal(a, b) for a, b in zip(head_before, model.head.parameters())), "the head trained"


class GradNorms(Callback):
    """The total gradient norm after each step, read while the step's gradients are still there."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_step_end(self, model: nn.Module, row: dict[str, Any], images: torch.Tensor) -> None:
        grads = [p.grad.detach().flatten() for p in model.parameters() if p.grad is not None]
        self.norms.append(float(torch.cat(grads).norm()))


def rnn_grad_norms(clip_grad: float | None) -> list[float]:
    torch.manual_seed(0)
    model = build_model(ModelSpec("rnn", "linear", 3, weights="none",
                                  backbone_options={"nonlinearity": "relu", "hidden": 32}))
    norms = GradNorms()
    config = train_config(epochs=2, optimizer="sgd", lr=5.0, momentum=0.0, weight_decay=0.0, clip_grad=clip_grad)
    fit(model, build_strategy("finetune"), tiny_set(28), None, config, callbacks=[norms])
    return norms.norms


def test_clip_grad_keeps_a_huge_lr_rnns_gradient_norm_within_the_limit():
    limit = 1.0
    unclipped = rnn_grad_norms(None)
    assert max(n for n in unclipped if math.isfinite(n)) > 10 * limit, "without clipping this run explodes"
    clipped = rnn_grad_norms(limit)
    assert len(clipped) == 4
    assert all(math.isfinite(n) and n <= limit * (1 + 1e-4) for n in clipped), clipped
