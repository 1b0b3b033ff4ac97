"""Tests for tltk.backbones: every registered backbone builds and has the uniform shape.

Parametrised over ``BACKBONES.names()``, so a newly registered backbone is checked without
writing a test for it. Each backbone is built once per module (the large ones take
seconds to initialise on a CPU) and shared by the tests that only read it.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from tltk.backbones import BACKBONES, Backbone, backbone_info, build_backbone
from tltk.backbones.base import count_parameters
from tltk.registry import FAILED, PluginError
from tltk.cli import main
from tltk.errors import TltkError, UnknownNameError
from tltk.model import ModelSpec, build_model
from tltk.summary import summarize

TIMM_EXTRA = "timm:mobilenetv3_small_050"


def registered_backbones() -> list:
    """Every registered backbone as a test parameter; one whose plugin fails to load is
    skipped with the plugin's own sentence: an unrelated broken plugin on the machine is
    that package's problem, and `tltk plugins` reports it."""
    params = []
    for entry in BACKBONES.entries():
        name = BACKBONES.listed_name(entry)
        if BACKBONES.try_load(entry).status == FAILED:
            params.append(pytest.param(name, marks=pytest.mark.skip(reason=entry.error)))
        else:
            params.append(name)
    return params


ALL_BACKBONES = registered_backbones() + [TIMM_EXTRA]


def build_or_skip(name: str) -> Backbone:
    """The backbone without weights, in eval mode; a plugin's that breaks its contract when
    built is skipped with the plugin's sentence (tltk's own never is)."""
    try:
        return build_backbone(name, pretrained=False).eval()
    except PluginError as exc:
        if not name.startswith("timm:") and BACKBONES.find(name).builtin:
            raise
        pytest.skip(str(exc))
# Inputs smaller than the published size where the network allows it, to keep the CPU time low.
SMALL_INPUT = {"resnet18": 64, TIMM_EXTRA: 64}
BIG = {"vgg16", "vgg16_bn"}  # one image at 224 is about a second each on two cores


@pytest.fixture(scope="module")
def built():
    cache: dict[str, Backbone] = {}

    def get(name: str) -> Backbone:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = build_or_skip(name)
        return cache[name]

    return get


def forward_input(name: str, backbone: Backbone) -> torch.Tensor:
    size = SMALL_INPUT.get(name)
    height, width = (size, size) if size else backbone.preprocessing.input_size
    batch = 1 if name in BIG else 2
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


def test_registry_lists_every_builtin_backbone():
    assert {"simplecnn", "lenet5", "mnist-cnn", "alexnet", "vgg16", "vgg16_bn", "resnet18"} <= set(BACKBONES.names())


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_backbone_builds_without_weights_and_gives_vector_and_spatial_map_of_declared_sizes(name, built):
    backbone = built(name)
    assert isinstance(backbone, Backbone)
    assert backbone.name == name
    assert backbone.pretrained_source is None
    x = forward_input(name, backbone)
    with torch.no_grad():
        spatial = backbone.forward_spatial(x)
        vector = backbone.forward_vector(spatial)
        direct = backbone(x)
    assert spatial.dim() == 4
    assert spatial.shape[:2] == (x.shape[0], backbone.spatial_channels)
    assert spatial.shape[2] >= 1 and spatial.shape[3] >= 1
    assert vector.shape == (x.shape[0], backbone.feature_dim)
    assert torch.equal(direct, vector)
    assert torch.isfinite(vector).all()


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_backbone_preprocessing_has_input_size_and_three_channel_mean_and_std(name, built):
    prep = built(name).preprocessing
    height, width = prep.input_size
    assert isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0
    assert len(prep.mean) == 3 and len(prep.std) == 3
    assert all(0.0 <= m <= 1.0 for m in prep.mean)
    assert all(0.0 < s <= 1.0 for s in prep.std)


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_every_named_layer_path_resolves_to_a_module_of_the_wrapped_net(name, built):
    backbone = built(name)
    has_conv = any(isinstance(m, nn.Conv2d) for m in backbone.net.modules())
    assert ("conv1" in backbone.layers) == has_conv  # sequence nets have no conv layer to name
    for label, path in backbone.layers.items():
        module = backbone.net.get_submodule(path)  # raises AttributeError on a stale path
        assert isinstance(module, nn.Module), label


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_backbone_stages_cover_every_parameter_exactly_once(name, built):
    backbone = built(name)
    staged = [id(p) for stage in backbone.stages() for p in stage]
    assert len(staged) == len(set(staged))
    assert set(staged) == {id(p) for p in backbone.parameters()}


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_backbone_info_for_every_name_has_a_factory(name):
    info = backbone_info(name)
    assert callable(info.factory)
    assert isinstance(info.pretrained_available, bool)


def test_small_networks_have_no_published_weights_and_big_ones_do():
    assert not any(backbone_info(n).pretrained_available for n in ("simplecnn", "lenet5", "mnist-cnn"))
    assert all(backbone_info(n).pretrained_available for n in ("alexnet", "vgg16", "vgg16_bn", "resnet18"))


@pytest.mark.parametrize("name", ["alexnet", "vgg16", "vgg16_bn"])
def test_alexnet_and_vgg_feature_vector_is_fc7_with_real_fc6_and_fc7_linear_layers(name, built):
    backbone = built(name)
    assert backbone.feature_dim == 4096
    classifier = backbone.net.classifier
    linear_at = [i for i, m in enumerate(classifier) if isinstance(m, nn.Linear)]
    assert len(linear_at) == 2, "fc6 and fc7 stay; the 1000-way fc8 is gone"
    fc6, fc7 = (classifier[i] for i in linear_at)
    assert fc6.out_features == 4096 and (fc7.in_features, fc7.out_features) == (4096, 4096)
    assert isinstance(classifier[6], nn.Identity)
    # layers['fc6'] / ['fc7'] name modules of classifier that come after their Linear layers
    for label, linear_index, before in (("fc6", linear_at[0], linear_at[1]), ("fc7", linear_at[1], len(classifier))):
        prefix, index = backbone.layers[label].split(".")
        assert prefix == "classifier"
        assert linear_index < int(index) < before, label
    assert isinstance(backbone.net.get_submodule(backbone.layers["pool5"]), nn.MaxPool2d)


def test_resnet18_has_512_features_and_a_512_channel_map():
    backbone = build_backbone("resnet18")
    assert (backbone.feature_dim, backbone.spatial_channels) == (512, 512)
    assert backbone.layers["pool5"] == "layer4"
    assert not any(isinstance(m, nn.Linear) for m in backbone.net.modules()), "no 1000-way classifier"


def test_timm_backbone_keeps_its_name_with_prefix_and_has_no_classifier():
    backbone = build_backbone("timm:resnet10t")
    assert backbone.name == "timm:resnet10t"
    assert not any(isinstance(m, nn.Linear) for m in backbone.net.modules())


# ----------------------------------------------------------------- parameter counts


def test_simplecnn_with_a_ten_way_linear_head_has_390410_parameters():
    model = build_model(ModelSpec("simplecnn", "linear", 10, weights="none"))
    assert count_parameters(model) == 390_410
    summary = summarize(model, (32, 32))
    assert summary.total == 390_410
    assert summary.trainable == 390_410
    assert sum(row.params for row in summary.rows) == 390_410
    last = summary.rows[-1]
    assert (last.name, last.kind, last.output_shape, last.params) == ("head.0", "Linear", (10,), 650)


def test_summary_counts_only_the_head_as_trainable_when_the_backbone_is_frozen():
    model = build_model(ModelSpec("simplecnn", "linear", 10, weights="none"))
    model.freeze_backbone(True)
    summary = summarize(model, (32, 32))
    assert (summary.total, summary.trainable, summary.non_trainable) == (390_410, 650, 389_760)


def test_cli_summary_prints_the_simplecnn_parameter_total():
    result = CliRunner().invoke(main, ["summary", "--backbone", "simplecnn", "--num-classes", "10"])
    assert result.exit_code == 0, result.output
    assert "Total params: 390,410" in result.output
    assert "Trainable params: 390,410" in result.output


def test_cli_summary_with_freeze_reports_only_the_head_trainable():
    result = CliRunner().invoke(main, ["summary", "--backbone", "simplecnn", "--num-classes", "10", "--freeze"])
    assert result.exit_code == 0, result.output
    assert "Trainable params: 650" in result.output
    assert "Non-trainable params: 389,760" in result.output


# ----------------------------------------------------------------- errors


def test_misspelt_backbone_raises_unknown_name_error_suggesting_the_right_one():
    with pytest.raises(UnknownNameError) as info:
        build_backbone("resnet81")
    assert "resnet18" in str(info.value)
    assert "Did you mean" in str(info.value)


def test_unknown_timm_model_raises_unknown_name_error():
    with pytest.raises(UnknownNameError, match="timm has no model 'resnet_that_does_not_exist'"):
        build_backbone("timm:resnet_that_does_not_exist")


def test_pretrained_simplecnn_is_refused_because_it_has_no_published_weights():
    with pytest.raises(TltkError, match="no published pretrained weights") as info:
        build_backbone("simplecnn", pretrained=True)
    assert "--weights none" in str(info.value)


def test_cli_unknown_backbone_exits_with_code_2_and_one_line_error():
    result = CliRunner().invoke(main, ["summary", "--backbone", "resnet81"])
    assert result.exit_code == 2
    assert "resnet18" in result.output
    assert "Traceback" not in result.output


class _CosineLike(nn.Module):
    """A head that holds parameters itself beside a child, as plugin heads do."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, in_features))
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.dropout(x) @ self.weight.t()


def test_summary_rows_add_up_to_the_total_for_modules_that_hold_parameters_beside_children():
    model = build_model(ModelSpec("simplecnn", "linear", 3, weights="none"))
    model.head = _CosineLike(model.backbone.feature_dim, 3)
    summary = summarize(model, (32, 32))
    assert sum(row.params for row in summary.rows) == summary.total
    own = next(row for row in summary.rows if row.name == "head")
    assert own.params == 3 * model.backbone.feature_dim + 1 and own.kind == "_CosineLike"


def test_summary_of_a_vision_transformer_counts_its_class_token_and_position_embedding():
    vit = build_model(ModelSpec("timm:vit_tiny_patch16_224", "linear", 3, weights="none"))
    summary = summarize(vit, (224, 224))
    assert sum(row.params for row in summary.rows) == summary.total
    embedded = {row.name: row.params for row in summary.rows}
    assert embedded["backbone.net"] == vit.backbone.net.cls_token.numel() + vit.backbone.net.pos_embed.numel()
