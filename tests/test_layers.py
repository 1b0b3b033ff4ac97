"""Named layer taps: every built-in backbone's layers and shapes, pooling, and the tap itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from tltk.backbones import BACKBONES, build_backbone
from tltk.cli import main
from tltk.errors import TltkError
from tltk.layers import available_layers, layer_shapes, list_layers, pool_features, pooled_dim, resolve_layer, tap
from tltk.model import ModelSpec, build_model

BUILTIN = sorted(e.name for e in BACKBONES.entries())
SEQUENCE_NETS = {"rnn", "lstm", "gru"}  # image rows as time steps: no conv or fc layers to name
WITH_FC6 = {"alexnet", "alexnet-bn", "vgg16", "vgg16_bn", "lenet5", "cifar-vgg11-bn"}

# (layer -> output shape per image) at each network's own input size, from the papers' and libraries' layouts
KNOWN_SHAPES = {
    "alexnet": {"conv1": (64, 55, 55), "pool5": (256, 6, 6), "fc6": (4096,), "fc7": (4096,)},
    "vgg16": {"conv1": (64, 224, 224), "pool5": (512, 7, 7), "fc6": (4096,), "fc7": (4096,)},
    "vgg16_bn": {"conv1": (64, 224, 224), "pool5": (512, 7, 7), "fc6": (4096,), "fc7": (4096,)},
    "resnet18": {"conv1": (64, 112, 112), "pool5": (512, 7, 7)},
    "lenet5": {"conv1": (6, 28, 28), "pool5": (16, 5, 5), "fc6": (120,), "fc7": (84,)},
    "simplecnn": {"conv1": (32, 32, 32), "pool5": (128, 4, 4), "fc7": (64,)},
}


@pytest.mark.parametrize("name", BUILTIN)
def test_every_builtin_backbone_gives_the_shape_of_each_named_layer(name: str) -> None:
    rows = {row["layer"]: row for row in list_layers(name)}
    expected = set() if name in SEQUENCE_NETS else {"conv1", "pool5", "fc7"} - ({"fc7"} if name == "resnet18" else set())
    expected |= {"fc6"} if name in WITH_FC6 else set()
    assert expected <= set(rows) and "logits" in rows
    for layer in expected:
        shape = tuple(rows[layer]["shape"])
        assert shape and all(n > 0 for n in shape), (layer, shape)
        assert rows[layer]["dim"] == (shape[0] if len(shape) == 3 else shape[-1])
        assert rows[layer]["flatten_dim"] == int(np.prod(shape))
    for layer, shape in KNOWN_SHAPES.get(name, {}).items():
        assert tuple(rows[layer]["shape"]) == shape, layer


def test_alexnet_and_vgg_fc7_is_the_4096_d_feature_vector_after_the_second_relu() -> None:
    for name, path in (("alexnet", "classifier.5"), ("vgg16", "classifier.4")):
        rows = {row["layer"]: row for row in list_layers(name)}
        assert (rows["fc7"]["module"], rows["fc7"]["type"], rows["fc7"]["shape"]) == (path, "ReLU", [4096])


def test_shapes_listed_without_weights_equal_those_of_a_real_forward_pass() -> None:
    torch.manual_seed(0)
    model = build_backbone("lenet5")
    images = torch.randn(2, 3, 32, 32)
    for row in list_layers("lenet5"):
        if row["layer"] == "logits":
            continue
        with tap(model, row["layer"], "flatten") as features_of:
            assert features_of(images).shape == (2, row["flatten_dim"])


def test_logits_are_listed_with_the_head_size_when_a_head_is_attached() -> None:
    rows = {row["layer"]: row for row in list_layers("resnet18", num_classes=7)}
    assert rows["logits"]["shape"] == [7]
    assert "fc7" not in rows


def test_all_modules_lists_raw_module_names_after_the_named_layers() -> None:
    rows = list_layers("simplecnn", all_modules=True)
    names = [row["layer"] for row in rows]
    assert names[:4] == ["conv1", "pool5", "fc7", "logits"]
    assert {"features.0", "features.3", "fc.0"} <= set(names)
    assert next(r for r in rows if r["layer"] == "features.3")["shape"] == [64, 16, 16]


def test_a_layer_the_backbone_lacks_is_an_error_listing_the_ones_it_has() -> None:
    model = build_backbone("lenet5")
    with pytest.raises(TltkError, match="lenet5 has no layer 'fc8'; its named layers are conv1, pool5, fc6, fc7"):
        resolve_layer(model, "fc8")


def test_resnet18_has_no_fc7_and_says_which_layers_it_has() -> None:
    result = CliRunner().invoke(main, ["extract", "resnet18", "--weights", "none", "--layer", "fc7",
                                       "--data", "builtin:digits", "--out", "unused"])
    assert result.exit_code == 2
    assert "resnet18 has no layer 'fc7'; its named layers are conv1, pool5" in result.stderr
    assert "Traceback" not in result.output


def test_raw_module_names_resolve_inside_the_network_and_from_the_model_root() -> None:
    model = build_model(ModelSpec("lenet5", "linear", 3, weights="none"))
    assert resolve_layer(model, "features.3").module is model.backbone.net.features[3]
    assert resolve_layer(model, "backbone.net.fc.0").module is model.backbone.net.fc[0]
    assert resolve_layer(model, "logits").module is model.head
    assert available_layers(model)["logits"] == "head"


def test_fc7_tap_equals_the_backbone_feature_vector_and_logits_the_model_output() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec("lenet5", "linear", 3, weights="none")).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        vector, logits = model.backbone(images), model(images)
    with tap(model, "fc7") as features_of:
        assert torch.equal(features_of(images), vector)
    with tap(model, "logits") as features_of:
        assert torch.allclose(features_of(images), logits)


def test_alexnet_fc7_tap_equals_the_backbone_feature_vector_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = build_backbone("alexnet")
    images = torch.randn(2, 3, 64, 64)  # the adaptive pool lets AlexNet run small, which keeps this cheap
    with torch.no_grad():
        expected = model.eval()(images)
    model.train()
    with tap(model, "fc7") as features_of:
        assert torch.equal(features_of(images), expected)
    assert model.training  # the tap's eval mode ends with the tap


@pytest.mark.parametrize("pool", ["avg", "max", "flatten"])
def test_pooling_reduces_a_spatial_map_as_numpy_would(pool: str) -> None:
    maps = torch.randn(3, 5, 4, 6)
    expected = {"avg": maps.numpy().mean(axis=(2, 3)), "max": maps.numpy().max(axis=(2, 3)),
                "flatten": maps.numpy().reshape(3, -1)}[pool]
    pooled = pool_features(maps, pool)
    np.testing.assert_allclose(pooled.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert pooled.shape[1] == pooled_dim((5, 4, 6), pool)


def test_pooling_a_token_sequence_averages_over_tokens() -> None:
    tokens = torch.randn(2, 7, 3)
    np.testing.assert_allclose(pool_features(tokens, "avg").numpy(), tokens.numpy().mean(axis=1), rtol=1e-6)
    assert pooled_dim((7, 3), "avg") == 3 and pooled_dim((7, 3), "flatten") == 21


def test_unknown_pooling_is_an_error() -> None:
    with pytest.raises(TltkError, match="^pool 'median' is not one of avg, max, flatten"):
        pool_features(torch.zeros(1, 2, 2, 2), "median")


def test_tap_stops_the_forward_pass_at_the_tapped_layer_and_removes_its_hook() -> None:
    model = build_backbone("lenet5")
    later = model.net.fc[0]
    calls: list[int] = []
    later.register_forward_hook(lambda *_: calls.append(1))
    with tap(model, "pool5") as features_of:
        features_of(torch.randn(1, 3, 32, 32))
    assert calls == []
    assert not model.net.features[5]._forward_hooks


def test_layer_shapes_at_the_wrong_input_size_is_an_error_naming_the_right_one() -> None:
    model = build_backbone("lenet5")
    with pytest.raises(TltkError, match=r"use its own input size \(32, 32\)"):
        layer_shapes(model, ["fc7"], (64, 64))


def test_layers_command_prints_each_named_layer_with_its_shape_as_json() -> None:
    result = CliRunner().invoke(main, ["layers", "--backbone", "vgg16", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["layer"]: row for row in json.loads(result.stdout)}
    assert rows["pool5"]["shape"] == [512, 7, 7] and rows["fc7"]["shape"] == [4096]


def test_layers_command_with_an_unknown_backbone_is_a_one_line_error() -> None:
    result = CliRunner().invoke(main, ["layers", "--backbone", "vgg17"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error:") and "Traceback" not in result.output


def test_a_module_that_never_runs_is_listed_without_a_shape() -> None:
    model = build_backbone("lenet5")
    model.net.unused = nn.Linear(2, 2)
    info = {i.name: i for i in layer_shapes(model, ["unused", "fc7"])}
    assert info["unused"].shape is None and info["fc7"].shape == (84,)


def test_cli_list_layers_shows_the_same_rows_as_tltk_layers():
    import json

    from click.testing import CliRunner

    from tltk.cli import main

    runner = CliRunner()
    listed = runner.invoke(main, ["list", "layers", "--backbone", "lenet5", "--json"])
    direct = runner.invoke(main, ["layers", "--backbone", "lenet5", "--json"])
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.output) == json.loads(direct.output)
    assert {"conv1", "fc7"} <= {row["layer"] for row in json.loads(listed.output)}
    missing = runner.invoke(main, ["list", "layers"])
    assert missing.exit_code == 2 and "needs --backbone" in missing.output
