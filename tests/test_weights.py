"""Tests for tltk.weights: files, run directories, published weights through real caches, init.

Published weights are never downloaded: each test writes random tensors where
torchvision (``$TORCH_HOME/hub/checkpoints``) or timm (the Hugging Face hub cache) looks
for them, so the libraries' own loading code runs end to end.
"""

from __future__ import annotations

import json
import math
import pickle
import urllib.error
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import tltk.weights
from tltk.backbones import build_backbone
from tltk.errors import TltkError, WeightsError
from tltk.model import ModelSpec, build_model
from tltk.weights import apply_init, load_backbone_weights, read_state_dict

ALEXNET_CACHE_NAME = "alexnet-owt-7be5be79.pth"
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def random_state_of(net: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The net's keys and shapes, filled with values no initialisation would produce."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
        for k, v in net.state_dict().items()
    }


def simplecnn_state(seed: int = 1) -> dict[str, torch.Tensor]:
    return random_state_of(build_backbone("simplecnn").net, seed)


def assert_backbone_holds(backbone, state: dict[str, torch.Tensor], ignored: set[str] = frozenset()) -> None:
    own = backbone.net.state_dict()
    assert set(own) == set(state) - set(ignored)
    for key, tensor in own.items():
        assert torch.equal(tensor, state[key]), key


@pytest.fixture(scope="module")
def torchvision_alexnet_state() -> dict[str, torch.Tensor]:
    """A state dict in torchvision's own AlexNet layout, 1000-way classifier.6 included."""
    from torchvision import models

    return random_state_of(models.alexnet(weights=None), seed=5)


# ----------------------------------------------------------------- weights files


def test_safetensors_file_of_a_simplecnn_backbone_loads_into_the_built_model(tmp_path):
    state = simplecnn_state()
    path = tmp_path / "backbone.safetensors"
    save_file(state, str(path))
    model = build_model(ModelSpec("simplecnn", "linear", 3, weights=str(path)))
    assert_backbone_holds(model.backbone, state)
    assert model.backbone.pretrained_source == f"{len(state)} tensors from {path}"


def test_pth_state_dict_file_loads_with_weights_only(tmp_path):
    state = simplecnn_state()
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    model = build_model(ModelSpec("simplecnn", "linear", 3, weights=str(path)))
    assert_backbone_holds(model.backbone, state)


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict"])
def test_pth_checkpoint_with_the_weights_nested_under_a_key_loads(tmp_path, key):
    state = simplecnn_state()
    path = tmp_path / "checkpoint.pth"
    torch.save({key: state, "epoch": 7, "optimizer": {"lr": 0.1}}, path)
    model = build_model(ModelSpec("simplecnn", "linear", 3, weights=str(path)))
    assert_backbone_holds(model.backbone, state)


def test_weights_saved_from_a_data_parallel_wrapper_load_without_their_module_prefix(tmp_path):
    state = simplecnn_state()
    path = tmp_path / "wrapped.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    model = build_model(ModelSpec("simplecnn", "linear", 3, weights=str(path)))
    assert_backbone_holds(model.backbone, state)


class PickledThing:
    """Anything that is not a tensor or plain container needs unpickling of code."""

    def __init__(self) -> None:
        self.value = 3


def test_pth_holding_a_pickled_custom_object_is_refused_naming_weights_only(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": simplecnn_state(), "extra": PickledThing()}, path)
    with pytest.raises(WeightsError) as info:
        build_model(ModelSpec("simplecnn", "linear", 3, weights=str(path)))
    assert "weights_only" in str(info.value)
    assert str(path) in str(info.value)


def test_plain_pickle_with_a_code_reference_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(PickledThing(), protocol=2))
    with pytest.raises(WeightsError, match="weights_only"):
        read_state_dict(path)


def test_pth_holding_something_other_than_tensors_is_refused(tmp_path):
    path = tmp_path / "numbers.pth"
    torch.save({"a": 1, "b": [1, 2]}, path)
    with pytest.raises(WeightsError, match="does not hold a state_dict of tensors"):
        read_state_dict(path)


def test_truncated_safetensors_file_raises_weights_error(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(simplecnn_state(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        build_model(ModelSpec("simplecnn", "linear", 3, weights=str(path)))


def test_garbage_safetensors_file_raises_weights_error(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x07\x00\x00\x00\x00\x00\x00\x00not json at all" * 3)
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        read_state_dict(path)


def test_missing_weights_file_raises_weights_error_naming_other_ways(tmp_path):
    with pytest.raises(WeightsError, match="does not exist") as info:
        build_model(ModelSpec("simplecnn", "linear", 3, weights=str(tmp_path / "nope.safetensors")))
    assert "--weights none" in str(info.value)


def test_weights_file_of_an_unknown_format_is_refused(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"PK")
    with pytest.raises(WeightsError, match="neither .safetensors nor .pth"):
        read_state_dict(path)


def test_lenet5_weights_for_simplecnn_raise_naming_the_first_misshapen_tensor(tmp_path):
    path = tmp_path / "lenet5.safetensors"
    save_file(random_state_of(build_backbone("lenet5").net, 2), str(path))
    with pytest.raises(WeightsError) as info:
        build_model(ModelSpec("simplecnn", "linear", 3, weights=str(path)))
    message = str(info.value)
    assert "tensor 'features.0.weight'" in message
    assert "(6, 3, 5, 5)" in message and "(32, 3, 5, 5)" in message


def test_one_tensor_of_a_changed_shape_is_named_in_the_error(tmp_path):
    state = simplecnn_state()
    state["fc.0.weight"] = torch.zeros(64, 1024)
    path = tmp_path / "reshaped.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError, match=r"tensor 'fc\.0\.weight' .* has shape \(64, 1024\) but the model needs \(64, 2048\)"):
        build_model(ModelSpec("simplecnn", "linear", 3, weights=str(path)))


def test_a_missing_tensor_is_named_in_the_error(tmp_path):
    state = simplecnn_state()
    del state["features.6.bias"]
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError, match=r"lacks 1 of the model's tensors, the first being 'features\.6\.bias'"):
        build_model(ModelSpec("simplecnn", "linear", 3, weights=str(path)))


def test_weights_with_no_matching_key_name_both_first_keys(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, str(path))
    with pytest.raises(WeightsError, match="no tensor in .* matches") as info:
        build_model(ModelSpec("simplecnn", "linear", 3, weights=str(path)))
    assert "'features.0.weight'" in str(info.value) and "'encoder.weight'" in str(info.value)


def test_torchvision_alexnet_state_dict_loads_into_alexnet_ignoring_the_1000_way_classifier(tmp_path, torchvision_alexnet_state):
    state = torchvision_alexnet_state
    assert state["classifier.6.weight"].shape == (1000, 4096)
    path = tmp_path / "alexnet.safetensors"
    save_file(state, str(path))
    model = build_model(ModelSpec("alexnet", "linear", 3, weights=str(path)))
    assert_backbone_holds(model.backbone, state, ignored={"classifier.6.weight", "classifier.6.bias"})
    assert model.head[0].in_features == 4096


# ----------------------------------------------------------------- run directories


def write_run(run: Path, backbone: str, seed: int) -> dict[str, torch.Tensor]:
    """A minimal tltk run directory: config.json naming the backbone, model.safetensors of the whole model."""
    torch.manual_seed(seed)
    model = build_model(ModelSpec(backbone, "linear", 4, weights="none"))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    run.mkdir(parents=True)
    save_file(state, str(run / "model.safetensors"))
    (run / "config.json").write_text(json.dumps({"model": {"backbone": backbone, "head": "linear", "num_classes": 4}}))
    return state


def test_run_directory_weights_load_the_backbone_and_ignore_the_head(tmp_path):
    state = write_run(tmp_path / "run", "simplecnn", seed=11)
    assert "head.0.weight" in state and "backbone.net.features.0.weight" in state
    torch.manual_seed(99)
    model = build_model(ModelSpec("simplecnn", "linear", 2, weights=str(tmp_path / "run")))
    backbone_state = {k[len("backbone.net."):]: v for k, v in state.items() if k.startswith("backbone.net.")}
    assert_backbone_holds(model.backbone, backbone_state)
    assert model.head[0].out_features == 2  # the new task's head, not the run's 4-way one


def test_run_directory_of_another_backbone_raises_naming_both(tmp_path):
    write_run(tmp_path / "lenet_run", "lenet5", seed=3)
    with pytest.raises(WeightsError) as info:
        build_model(ModelSpec("simplecnn", "linear", 2, weights=str(tmp_path / "lenet_run")))
    assert "'lenet5'" in str(info.value) and "'simplecnn'" in str(info.value)
    assert "--backbone lenet5" in str(info.value)


def test_directory_that_is_not_a_run_raises_weights_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="not a tltk run"):
        load_backbone_weights(build_backbone("simplecnn"), tmp_path / "empty")


# ----------------------------------------------------------------- published weights


def test_torchvision_imagenet_weights_come_from_torch_hub_cache_under_torch_home(tmp_path, monkeypatch, torchvision_alexnet_state):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")  # read at call time
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(torchvision_alexnet_state, checkpoints / ALEXNET_CACHE_NAME)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("download attempted"))

    backbone = build_backbone("alexnet", pretrained=True)

    assert_backbone_holds(backbone, torchvision_alexnet_state, ignored={"classifier.6.weight", "classifier.6.bias"})
    assert backbone.pretrained_source == "torchvision:alexnet:IMAGENET1K_V1"
    assert backbone.feature_dim == 4096


def write_hf_cache_entry(cache: Path, repo_id: str, state: dict[str, torch.Tensor]) -> Path:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    snapshot = repo / "snapshots" / FAKE_COMMIT
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


def test_timm_imagenet_weights_come_from_the_hugging_face_cache_without_the_network(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import timm

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(tltk.weights, "_reachable", lambda host, timeout=3.0: pytest.fail("the cache should suffice"))
    # the cached file goes straight to timm's loader: the hub client is never consulted
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", lambda *a, **k: pytest.fail("hub asked"))
    state = random_state_of(timm.create_model("resnet18"), seed=8)
    assert "fc.weight" in state and state["fc.weight"].shape == (1000, 512)
    write_hf_cache_entry(tmp_path / "hub", "timm/resnet18.a1_in1k", state)

    backbone = build_backbone("resnet18", pretrained=True)

    assert_backbone_holds(backbone, state, ignored={"fc.weight", "fc.bias"})
    assert backbone.pretrained_source == "timm:timm/resnet18.a1_in1k"


def test_offline_timm_miss_raises_naming_weights_none_and_never_builds_random_weights(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    asked: list[str] = []
    monkeypatch.setattr(tltk.weights, "_reachable", lambda host, timeout=3.0: asked.append(host) or False)

    for weights in ("imagenet", "auto"):
        with pytest.raises(WeightsError) as info:
            build_model(ModelSpec("resnet18", "linear", 3, weights=weights))
        message = str(info.value)
        assert "--weights none" in message
        assert "timm/resnet18.a1_in1k" in message and str(tmp_path / "empty_hub") in message
    assert asked == ["huggingface.co", "huggingface.co"]


def test_offline_torchvision_miss_raises_naming_the_cache_path_and_weights_none(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch"))

    def no_network(url, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsError) as info:
        build_model(ModelSpec("alexnet", "linear", 3, weights="imagenet"))
    message = str(info.value)
    assert "--weights none" in message
    assert str(tmp_path / "empty_torch" / "hub" / "checkpoints" / ALEXNET_CACHE_NAME) in message
    assert "Name or service not known" in message


def test_imagenet_weights_for_a_backbone_without_them_are_refused():
    with pytest.raises(TltkError, match="no published pretrained weights"):
        build_model(ModelSpec("lenet5", "linear", 3, weights="imagenet"))


def test_auto_weights_for_a_small_network_train_from_scratch():
    model = build_model(ModelSpec("lenet5", "linear", 3, weights="auto"))
    assert model.backbone.pretrained_source is None


# ----------------------------------------------------------------- random initialisation


def wide_conv() -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(4, 256, 3)  # fan_in 36, fan_out 2304: the schemes' spreads differ


def test_gaussian_init_gives_weights_of_std_0_01_and_zero_bias():
    conv = wide_conv()
    apply_init(conv, "gaussian")
    assert conv.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert abs(conv.weight.mean().item()) < 1e-3
    assert torch.count_nonzero(conv.bias) == 0


def test_xavier_init_is_uniform_within_the_glorot_bound():
    conv = wide_conv()
    apply_init(conv, "xavier")
    bound = math.sqrt(6.0 / (36 + 2304))
    assert conv.weight.abs().max().item() <= bound
    assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(conv.bias) == 0


def test_kaiming_init_is_normal_with_he_std_over_fan_out():
    conv = wide_conv()
    apply_init(conv, "kaiming")
    std = math.sqrt(2.0 / 2304)
    assert conv.weight.std().item() == pytest.approx(std, rel=0.05)
    assert conv.weight.abs().max().item() > math.sqrt(6.0 / (36 + 2304)), "normal, not uniform"
    assert torch.count_nonzero(conv.bias) == 0


def test_default_init_leaves_pytorch_initialisation_untouched():
    conv = wide_conv()
    before = conv.weight.detach().clone()
    apply_init(conv, "default")
    assert torch.equal(conv.weight, before)
    assert conv.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 36), rel=0.05)


def test_init_reaches_convs_and_linears_of_backbone_and_head_when_training_from_scratch():
    model = build_model(ModelSpec("simplecnn", "linear", 3, weights="none", init="gaussian"))
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 5
    for layer in layers:
        if layer.weight.numel() > 1000:
            assert layer.weight.std().item() == pytest.approx(0.01, rel=0.1)
        assert torch.count_nonzero(layer.bias) == 0


def test_init_does_not_overwrite_weights_loaded_from_a_file(tmp_path):
    state = simplecnn_state()
    path = tmp_path / "backbone.safetensors"
    save_file(state, str(path))
    model = build_model(ModelSpec("simplecnn", "linear", 3, weights=str(path), init="gaussian"))
    assert_backbone_holds(model.backbone, state)
    assert model.head[0].weight.std().item() == pytest.approx(0.01, rel=0.3)


def test_unknown_init_scheme_raises_weights_error_listing_the_schemes():
    with pytest.raises(WeightsError, match="unknown --init 'orthogonal'; choose one of default, xavier, kaiming, gaussian"):
        apply_init(nn.Linear(2, 2), "orthogonal")
    with pytest.raises(WeightsError, match="unknown --init"):
        build_model(ModelSpec("simplecnn", "linear", 3, weights="none", init="orthogonal"))
