"""Tests for tltk.heads, tltk.strategies and the training loop's schedule and stopping.

Training runs are tiny: 32 random images, 3 classes, batch 8, one or two epochs on the
CPU. BatchNorm behaviour is checked on a real timm network (``timm:resnet10t``) and on a
small hand-made backbone with BatchNorm and dropout.
"""

from __future__ import annotations

import copy
import math
import sys
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tltk.train.trainer as trainer
from tltk.backbones import Backbone, Preprocessing
from tltk.backbones.base import HALF_MEAN, HALF_STD
from tltk.errors import TltkError, UnknownNameError, UnknownOptionError
from tltk.heads import HEADS, build_head
from tltk.model import ModelSpec, TransferModel, build_model
from tltk.registry import PluginError
from tltk.strategies import STRATEGIES, Strategy, build_strategy, trainable_parameters
from tltk.train.trainer import FitResult, TrainConfig, fit, lr_factor

NUM_CLASSES = 3


# ----------------------------------------------------------------- helpers


class TinyBNBackbone(Backbone):
    """Two conv + BatchNorm blocks, average pool and dropout: 16x16 in, 16 features out."""

    def __init__(self) -> None:
        net = nn.Module()
        net.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        )
        net.pool = nn.AdaptiveAvgPool2d(1)
        net.drop = nn.Dropout(0.5)
        super().__init__(
            net, name="tiny-bn", feature_dim=16, spatial_channels=16,
            preprocessing=Preprocessing((16, 16), HALF_MEAN, HALF_STD), layers={"conv1": "features.2"},
        )

    def forward_spatial(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)

    def forward_vector(self, spatial: torch.Tensor) -> torch.Tensor:
        return self.net.drop(self.net.pool(spatial).flatten(1))


def tiny_model(seed: int = 0, head: str = "linear") -> TransferModel:
    torch.manual_seed(seed)
    backbone = TinyBNBackbone()
    options = {} if head == "linear" else {"hidden": 8}  # linear has no hidden layer, and says so
    head_module = build_head(head, backbone.feature_dim, backbone.spatial_channels, NUM_CLASSES, **options)
    return TransferModel(backbone, head_module, ModelSpec("tiny-bn", head, NUM_CLASSES, weights="none"))


def resnet10t_model(seed: int = 0) -> TransferModel:
    torch.manual_seed(seed)
    return build_model(ModelSpec("timm:resnet10t", "linear", NUM_CLASSES, weights="none"))


def random_images(n: int = 32, size: int = 16, seed: int = 123) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g))


def config(**overrides: Any) -> TrainConfig:
    base = dict(epochs=2, batch_size=8, lr=1e-2, workers=0, device="cpu", precision="fp32", schedule="none", seed=0)
    return TrainConfig(**(base | overrides))


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed_keys(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in before if not torch.equal(before[k], after[k])]


class Recorder:
    """A Reporter that keeps every row and message, and the model's weights at each epoch end."""

    def __init__(self, model: nn.Module | None = None) -> None:
        self.model = model
        self.steps: list[dict[str, Any]] = []
        self.epochs: list[dict[str, Any]] = []
        self.messages: list[str] = []
        self.states: list[dict[str, torch.Tensor]] = []

    def start(self, total_steps: int) -> None:
        self.total_steps = total_steps

    def step(self, row: dict[str, Any]) -> None:
        self.steps.append(row)

    def epoch(self, row: dict[str, Any]) -> None:
        self.epochs.append(row)
        if self.model is not None:
            self.states.append(snapshot(self.model))

    def message(self, text: str) -> None:
        self.messages.append(text)

    def finish(self) -> None:
        pass


@pytest.fixture
def captured_optimizer(monkeypatch):
    """The optimizer ``fit`` builds, caught on its way out of build_optimizer."""
    made: list[torch.optim.Optimizer] = []
    original = trainer.build_optimizer

    def spy(groups, cfg):  # type: ignore[no-untyped-def]
        optimizer = original(groups, cfg)
        made.append(optimizer)
        return optimizer

    monkeypatch.setattr(trainer, "build_optimizer", spy)
    return made


def without_timing(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


# ----------------------------------------------------------------- heads


@pytest.mark.parametrize("head", ["linear", "mlp", "conv"])
def test_builtin_head_on_simplecnn_gives_one_logit_per_class(head):
    torch.manual_seed(0)
    model = build_model(ModelSpec("simplecnn", head, 7, {} if head == "linear" else {"hidden": 16}, weights="none")).eval()
    with torch.no_grad():
        logits = model(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 7)


@pytest.mark.parametrize("head, options, message", [
    ("linear", {"hidden": 128}, "head 'linear' has no option 'hidden'; it takes dropout=0.0."),
    ("mlp", {"width": 3, "depth": 2}, "head 'mlp' has no options 'width', 'depth'; it takes hidden=512, dropout=0.5."),
])
def test_a_head_refuses_an_option_it_does_not_declare_in_one_sentence_naming_the_ones_it_takes(head, options, message):
    with pytest.raises(UnknownOptionError) as info:
        build_head(head, 64, 128, 3, **options)
    assert str(info.value) == message


def test_an_option_given_as_none_is_not_given_and_the_default_applies():
    head = build_head("linear", 64, 128, 3, hidden=None, dropout=None)
    assert not any(isinstance(m, nn.Dropout) for m in head.modules())
    assert build_strategy("freeze", unfreeze_epoch=None, layer_decay=None).describe() == {"name": "freeze"}


@pytest.mark.parametrize("strategy, options, message", [
    ("freeze", {"unfreeze_epoch": 2}, "strategy 'freeze' has no option 'unfreeze_epoch'; it takes no options."),
    ("discriminative", {"unfreeze_epoch": 2},
     "strategy 'discriminative' has no option 'unfreeze_epoch'; it takes layer_decay=0.75."),
])
def test_a_strategy_refuses_an_option_it_does_not_declare(strategy, options, message):
    with pytest.raises(UnknownOptionError) as info:
        build_strategy(strategy, **options)
    assert str(info.value) == message


def test_a_head_and_a_strategy_that_break_their_contract_raise_what_a_backbone_raises(monkeypatch):
    # One error class for a broken contract, whatever the kind.
    import tltk.registry

    heads = tltk.registry.Registry(tltk.registry.HEADS.record)
    heads.add("stringy", lambda in_features, in_channels, num_classes: "not a module")
    strategies = tltk.registry.Registry(tltk.registry.STRATEGIES.record)
    strategies.add("hollow", lambda: object())
    monkeypatch.setitem(tltk.registry.REGISTRIES, "head", heads)
    monkeypatch.setitem(tltk.registry.REGISTRIES, "strategy", strategies)
    with pytest.raises(PluginError, match="head 'stringy' from .* does not meet the head contract: the factory returned "
                                          "a str, not a torch.nn.Module; see HeadFactory in tltk.plugin."):
        tltk.registry.build("head", "stringy", in_features=4, in_channels=None, num_classes=2)
    with pytest.raises(PluginError, match="strategy 'hollow' from .* does not meet the strategy contract: it has no "
                                          "prepare, param_groups, on_epoch_start, describe method"):
        build_strategy("hollow")


def test_a_recorded_run_rebuilds_without_the_head_options_it_ignored_when_it_trained():
    # Runs from before the options rule may record `hidden` on a linear head: it played no part.
    spec = ModelSpec("simplecnn", "linear", 3, {"hidden": 128, "dropout": 0.2}, weights="none")
    model = build_model(spec, load_weights=False)
    assert [type(m).__name__ for m in model.head] == ["Dropout", "Linear"]
    with pytest.raises(UnknownOptionError):
        build_model(spec)


def test_registry_has_the_builtin_heads_and_strategies():
    assert {"linear", "mlp", "conv"} <= set(HEADS.names())
    assert {"finetune", "freeze", "freeze-unfreeze", "discriminative"} <= set(STRATEGIES.names())


def test_linear_head_is_one_linear_layer_on_the_feature_vector():
    model = build_model(ModelSpec("simplecnn", "linear", 5, weights="none"))
    linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 5)]
    assert model.uses_spatial is False


def test_linear_head_dropout_option_adds_a_dropout_layer():
    head = build_head("linear", 64, 128, 5, dropout=0.3)
    assert isinstance(head[0], nn.Dropout) and head[0].p == 0.3


def test_mlp_head_hidden_option_sets_its_width():
    model = build_model(ModelSpec("simplecnn", "mlp", 5, {"hidden": 16, "dropout": 0.0}, weights="none"))
    linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 16), (16, 5)]


def test_conv_head_reads_the_spatial_map_and_never_the_feature_vector(monkeypatch):
    torch.manual_seed(0)
    model = build_model(ModelSpec("simplecnn", "conv", 4, {"hidden": 8}, weights="none")).eval()
    assert model.uses_spatial is True
    assert model.head.conv[0].in_channels == model.backbone.spatial_channels == 128

    def no_vector(spatial: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the conv head must not go through forward_vector")

    monkeypatch.setattr(model.backbone, "forward_vector", no_vector)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        expected = model.head(model.backbone.forward_spatial(x))
    assert torch.equal(logits, expected)


def test_linear_head_reads_the_feature_vector():
    torch.manual_seed(0)
    model = build_model(ModelSpec("simplecnn", "linear", 4, weights="none")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model.head(model.backbone(x)))


def test_conv_head_on_a_flat_input_raises_an_error_suggesting_another_head():
    head = build_head("conv", 64, 128, 3, hidden=8)
    with pytest.raises(TltkError, match="--head linear"):
        head(torch.randn(2, 128))


def test_conv_head_without_spatial_channels_is_refused():
    with pytest.raises(TltkError, match="spatial map"):
        build_head("conv", 64, None, 3)


def test_unknown_head_name_suggests_the_close_one():
    with pytest.raises(UnknownNameError, match="Did you mean 'linear'"):
        build_head("linaer", 64, 128, 3)


CUSTOM_HEAD_SOURCE = """
from torch import nn

def make_head(in_features, in_channels, num_classes, width=4):
    return nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, num_classes))

class SpatialHead(nn.Module):
    uses_spatial = True

    def __init__(self, in_features, in_channels, num_classes, **options):
        super().__init__()
        self.options = options
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, spatial):
        return self.fc(spatial.mean(dim=(2, 3)))

def not_a_module(in_features, in_channels, num_classes):
    return "a string"
"""


def test_custom_head_from_a_file_path_gets_the_options_it_declares_and_refuses_others(tmp_path):
    path = tmp_path / "myhead.py"
    path.write_text(CUSTOM_HEAD_SOURCE)
    with pytest.raises(UnknownOptionError, match=r"has no option 'hidden'; it takes width=4\.$"):
        build_model(ModelSpec("simplecnn", f"{path}:make_head", 3, {"width": 7, "hidden": 99}, weights="none"))
    model = build_model(ModelSpec("simplecnn", f"{path}:make_head", 3, {"width": 7, "hidden": None}, weights="none"))
    assert [m.out_features for m in model.head.modules() if isinstance(m, nn.Linear)] == [7, 3]
    assert model.head[0].in_features == 64
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_custom_head_class_from_an_importable_module_can_read_the_spatial_map(tmp_path, monkeypatch):
    module_name = "tltk_test_custom_heads_mod"
    (tmp_path / f"{module_name}.py").write_text(CUSTOM_HEAD_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        model = build_model(ModelSpec("simplecnn", f"{module_name}:SpatialHead", 5, {"hidden": 3}, weights="none"))
        assert type(model.head).__name__ == "SpatialHead"
        assert model.uses_spatial is True
        assert model.head.fc.in_features == 128  # simplecnn's spatial channels
        assert model.head.options == {"hidden": 3}  # a **kwargs factory gets every option set
        with torch.no_grad():
            assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    finally:
        sys.modules.pop(module_name, None)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tltk_no_such_module_anywhere:make_head", "could not import head module"),
        ("{tmp}/missing_head.py:make_head", "could not import head module"),
        ("tltk.heads:no_such_factory", "has no callable 'no_such_factory'"),
        ("{tmp}/myhead.py:no_such_factory", "has no callable 'no_such_factory'"),
    ],
)
def test_bad_head_import_path_raises_a_tltk_error(tmp_path, spec, message):
    (tmp_path / "myhead.py").write_text(CUSTOM_HEAD_SOURCE)
    with pytest.raises(TltkError, match=message):
        build_head(spec.format(tmp=tmp_path), 64, 128, 3)


def test_custom_head_that_returns_something_other_than_a_module_is_refused(tmp_path):
    path = tmp_path / "myhead.py"
    path.write_text(CUSTOM_HEAD_SOURCE)
    with pytest.raises(PluginError, match="does not meet the head contract: the factory returned a str, not a torch.nn.Module"):
        build_head(f"{path}:not_a_module", 64, 128, 3)


# ----------------------------------------------------------------- freeze


@pytest.mark.parametrize("make_model", [tiny_model, resnet10t_model], ids=["tiny-bn", "timm-resnet10t"])
def test_freeze_keeps_every_backbone_tensor_bit_identical_including_batchnorm_statistics(make_model):
    model = make_model()
    size = 16 if make_model is tiny_model else 32
    backbone_before, head_before = snapshot(model.backbone), snapshot(model.head)
    assert any(k.endswith("running_mean") for k in backbone_before)
    assert any(k.endswith("num_batches_tracked") for k in backbone_before)

    result = fit(model, build_strategy("freeze"), random_images(size=size), None, config())

    assert result.epochs_run == 2 and result.steps == 8
    assert changed_keys(backbone_before, snapshot(model.backbone)) == []
    assert set(changed_keys(head_before, snapshot(model.head))) == set(head_before)
    assert model.training and not model.backbone.training and model.head.training
    assert all(not p.requires_grad for p in model.backbone.parameters())


class RequiresGradOnly(Strategy):
    """The common mistake: backbone parameters marked frozen, the backbone left in train mode."""

    name = "requires-grad-only"

    def param_groups(self, model: TransferModel, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(model.head.parameters()), "lr": lr, "name": "head"}]

    def prepare(self, model: TransferModel) -> None:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        model.train()


def test_frozen_parameters_hold_their_batchnorm_statistics_as_freeze_does():
    # A BatchNorm in train mode moves its running statistics even without gradients; tltk keeps
    # one whose parameters are frozen in eval mode, so requires_grad alone holds it, as freeze does.
    model = tiny_model()
    before = snapshot(model.backbone)
    fit(model, RequiresGradOnly(), random_images(), None, config())
    assert changed_keys(before, snapshot(model.backbone)) == []

    frozen = tiny_model()
    fit(frozen, build_strategy("freeze"), random_images(), None, config())
    assert changed_keys(before, snapshot(frozen.backbone)) == []

    trained = tiny_model()  # and the statistics of a backbone that trains do move
    fit(trained, build_strategy("finetune"), random_images(), None, config())
    assert any(k.endswith("running_mean") for k in changed_keys(before, snapshot(trained.backbone)))


def test_freeze_optimizer_holds_only_head_parameters(captured_optimizer):
    model = tiny_model()
    fit(model, build_strategy("freeze"), random_images(), None, config(epochs=1))
    (optimizer,) = captured_optimizer
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.head.parameters()}


def test_freeze_then_train_mode_keeps_a_frozen_backbone_in_eval_mode():
    model = tiny_model()
    model.freeze_backbone(True)
    model.train()
    assert model.training and model.head.training
    assert not any(m.training for m in model.backbone.modules())
    model.freeze_backbone(False)
    assert all(m.training for m in model.backbone.modules())
    assert all(p.requires_grad for p in model.backbone.parameters())


# ----------------------------------------------------------------- finetune


def test_finetune_changes_every_backbone_parameter_and_batchnorm_statistics():
    model = tiny_model()
    params_before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    buffers_before = {n: b.clone() for n, b in model.backbone.named_buffers()}
    fit(model, build_strategy("finetune"), random_images(), None, config())
    assert all(not torch.equal(params_before[n], p) for n, p in model.backbone.named_parameters())
    assert all(not torch.equal(buffers_before[n], b) for n, b in model.backbone.named_buffers())
    assert model.backbone.training


def test_finetune_gives_backbone_and_head_the_base_learning_rate(captured_optimizer):
    model = tiny_model()
    fit(model, build_strategy("finetune"), random_images(), None, config(epochs=1, lr=0.02))
    (optimizer,) = captured_optimizer
    assert [g["lr"] for g in optimizer.param_groups] == [0.02, 0.02]


# ----------------------------------------------------------------- freeze-unfreeze


def test_freeze_unfreeze_keeps_backbone_fixed_for_the_first_epoch_then_trains_it_at_a_lower_rate(captured_optimizer):
    model = tiny_model()
    initial = snapshot(model.backbone)
    recorder = Recorder(model)
    strategy = build_strategy("freeze-unfreeze", unfreeze_epoch=1, backbone_lr_mult=0.25)
    fit(model, strategy, random_images(), None, config(epochs=2, lr=0.02), reporter=recorder)

    after_epoch = [{k[len("backbone."):]: v for k, v in s.items() if k.startswith("backbone.")} for s in recorder.states]
    assert changed_keys(initial, after_epoch[0]) == []
    assert set(changed_keys(initial, after_epoch[1])) == set(initial)  # weights and BN buffers all move
    assert recorder.messages == ["epoch 2: backbone unfrozen at 0.25x the head's learning rate"]

    (optimizer,) = captured_optimizer
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs == pytest.approx([0.02 * 0.25, 0.02])
    backbone_group = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert backbone_group == {id(p) for p in model.backbone.parameters()}


def test_freeze_unfreeze_with_one_epoch_never_touches_the_backbone():
    model = tiny_model()
    initial = snapshot(model.backbone)
    head_before = snapshot(model.head)
    fit(model, build_strategy("freeze-unfreeze", unfreeze_epoch=1), random_images(), None, config(epochs=1))
    assert changed_keys(initial, snapshot(model.backbone)) == []
    assert changed_keys(head_before, snapshot(model.head)) != []
    assert model.backbone_frozen


def test_freeze_unfreeze_at_epoch_zero_trains_the_backbone_from_the_start():
    model = tiny_model()
    strategy = build_strategy("freeze-unfreeze", unfreeze_epoch=0)
    strategy.prepare(model)
    assert not model.backbone_frozen
    assert all(p.requires_grad for p in model.backbone.parameters())


# ----------------------------------------------------------------- discriminative


def test_layer_decay_out_of_range_names_the_setting_in_python_and_the_flag_on_the_command_line() -> None:
    from click.testing import CliRunner

    from tltk.cli import main

    with pytest.raises(TltkError, match=r"^layer_decay must be in \(0, 1\], not 1.5\.$"):
        build_strategy("discriminative", layer_decay=1.5)
    result = CliRunner().invoke(main, ["finetune", "--backbone", "lenet5", "--weights", "none", "--data", "builtin:digits",
                                       "--strategy", "discriminative", "--layer-decay", "1.5", "--out", "unused"])
    assert result.exit_code != 0 and "--layer-decay must be in (0, 1], not 1.5." in result.stderr, result.output


@pytest.mark.parametrize("make_model", [tiny_model, resnet10t_model], ids=["tiny-bn", "timm-resnet10t"])
def test_discriminative_rates_rise_from_input_to_head_and_cover_every_parameter_once(make_model):
    model = make_model()
    groups = build_strategy("discriminative", layer_decay=0.5).param_groups(model, 0.1)
    lrs = [g["lr"] for g in groups]
    assert all(a < b for a, b in zip(lrs, lrs[1:]))
    assert groups[-1]["name"] == "head" and lrs[-1] == 0.1
    assert lrs[-2] == pytest.approx(0.05) and lrs[0] == pytest.approx(0.1 * 0.5 ** (len(groups) - 1))
    ids = [id(p) for p in trainable_parameters(groups)]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    head_ids = {id(p) for p in groups[-1]["params"]}
    assert head_ids == {id(p) for p in model.head.parameters()}


def test_discriminative_puts_batchnorm_in_the_stage_of_the_conv_before_it():
    model = tiny_model()
    stages = model.backbone.stages()
    features = model.backbone.net.features
    assert [{id(p) for p in s} for s in stages] == [
        {id(p) for p in (*features[0].parameters(), *features[1].parameters())},
        {id(p) for p in (*features[4].parameters(), *features[5].parameters())},
    ]


def test_discriminative_optimizer_gets_the_rising_rates(captured_optimizer):
    model = tiny_model()
    fit(model, build_strategy("discriminative", layer_decay=0.5), random_images(), None, config(epochs=1, lr=0.08))
    (optimizer,) = captured_optimizer
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.02, 0.04, 0.08])


@pytest.mark.parametrize("decay", [0.0, -0.5, 1.5])
def test_discriminative_layer_decay_outside_zero_one_is_refused(decay):
    with pytest.raises(TltkError, match=r"^layer_decay must be in \(0, 1\]"):
        build_strategy("discriminative", layer_decay=decay)


# ----------------------------------------------------------------- determinism


def test_two_fits_with_the_same_seed_give_bit_identical_weights_and_history():
    start = tiny_model()
    runs = []
    for _ in range(2):
        model = copy.deepcopy(start)
        result = fit(model, build_strategy("finetune"), random_images(), random_images(8, seed=9), config(seed=7))
        runs.append((snapshot(model), without_timing(result.history)))
    (state_a, history_a), (state_b, history_b) = runs
    assert changed_keys(state_a, state_b) == []
    assert history_a == history_b
    assert changed_keys(snapshot(start), state_a) != []


def test_a_different_seed_gives_different_weights_and_history():
    start = tiny_model()
    states, histories = [], []
    for seed in (7, 8):
        model = copy.deepcopy(start)
        result = fit(model, build_strategy("finetune"), random_images(), random_images(8, seed=9), config(seed=seed))
        states.append(snapshot(model))
        histories.append(without_timing(result.history))
    assert changed_keys(states[0], states[1]) != []
    assert histories[0] != histories[1]


# ----------------------------------------------------------------- learning-rate schedule


def test_cosine_schedule_starts_at_one_and_ends_near_zero():
    cfg = TrainConfig(schedule="cosine")
    factors = [lr_factor(s, cfg, 10, 100) for s in range(101)]
    assert factors[0] == 1.0
    assert factors[50] == pytest.approx(0.5)
    assert factors[99] < 1e-3 and factors[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(factors, factors[1:]))


def test_warmup_ramps_linearly_to_the_base_rate():
    cfg = TrainConfig(schedule="none", warmup_steps=4)
    assert [lr_factor(s, cfg, 10, 100) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_cosine_after_warmup_starts_its_decay_at_the_end_of_the_warmup():
    cfg = TrainConfig(schedule="cosine", warmup_steps=10)
    assert lr_factor(0, cfg, 10, 110) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 10, 110) == pytest.approx(1.0)
    assert lr_factor(10, cfg, 10, 110) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 10, 110) == pytest.approx(0.5)
    assert lr_factor(110, cfg, 10, 110) == pytest.approx(0.0, abs=1e-12)


def test_step_schedule_multiplies_by_gamma_at_each_step_epochs_boundary():
    cfg = TrainConfig(schedule="step", step_epochs=2, gamma=0.1)
    per_epoch = 5
    assert [lr_factor(s, cfg, per_epoch, 100) for s in (0, 9)] == [1.0, 1.0]
    assert [lr_factor(s, cfg, per_epoch, 100) for s in (10, 19)] == pytest.approx([0.1, 0.1])
    assert lr_factor(20, cfg, per_epoch, 100) == pytest.approx(0.01)


def test_exp_schedule_decays_by_gamma_per_epoch_continuously():
    cfg = TrainConfig(schedule="exp", gamma=0.5)
    assert lr_factor(0, cfg, 4, 100) == 1.0
    assert lr_factor(2, cfg, 4, 100) == pytest.approx(math.sqrt(0.5))
    assert lr_factor(4, cfg, 4, 100) == pytest.approx(0.5)
    assert lr_factor(12, cfg, 4, 100) == pytest.approx(0.125)


def test_fit_applies_the_schedule_to_every_step():
    model = tiny_model()
    recorder = Recorder()
    cfg = config(epochs=2, lr=0.1, schedule="cosine", warmup_steps=2)
    fit(model, build_strategy("finetune"), random_images(), None, cfg, reporter=recorder)
    assert recorder.total_steps == 8
    expected = [0.1 * lr_factor(s, cfg, 4, 8) for s in range(8)]
    assert [row["lr"] for row in recorder.steps] == pytest.approx(expected)


def test_max_steps_stops_training_mid_epoch():
    model = tiny_model()
    result = fit(model, build_strategy("finetune"), random_images(), None, config(epochs=5, max_steps=6))
    assert (result.steps, result.epochs_run) == (6, 2)


# ----------------------------------------------------------------- early stopping


def constant_accuracy_val_set() -> TensorDataset:
    """Identical images with labels spread evenly: accuracy is 1/3 whatever the weights."""
    labels = torch.arange(6) % NUM_CLASSES
    return TensorDataset(torch.zeros(6, 3, 16, 16), labels)


def test_early_stopping_stops_when_the_monitor_cannot_improve_and_restores_the_best_epoch():
    model = tiny_model()
    recorder = Recorder(model)
    result = fit(
        model, build_strategy("finetune"), random_images(), constant_accuracy_val_set(),
        config(epochs=5, patience=1, monitor="val_accuracy"), reporter=recorder,
    )
    assert isinstance(result, FitResult)
    assert result.stopped_early is True
    assert result.epochs_run == 2 < 5
    assert result.best_epoch == 1
    assert result.best_metric == pytest.approx(1 / 3)
    assert [row["val_accuracy"] for row in result.history] == pytest.approx([1 / 3, 1 / 3])
    epoch1, epoch2 = recorder.states
    assert changed_keys(epoch1, epoch2) != [], "weights moved in epoch 2"
    assert changed_keys(epoch1, snapshot(model)) == [], "the model holds epoch 1's weights"


def test_without_patience_training_runs_every_epoch_and_keeps_the_best_validation_epoch():
    model = tiny_model()
    result = fit(
        model, build_strategy("finetune"), random_images(), constant_accuracy_val_set(),
        config(epochs=3, monitor="val_loss"),
    )
    assert result.stopped_early is False and result.epochs_run == 3
    losses = [row["val_loss"] for row in result.history]
    assert result.best_epoch == losses.index(min(losses)) + 1
    assert result.best_metric == min(losses)


# --- partial freezing --------------------------------------------------------------------------


class ThawLastStage(Strategy):
    """Trains ResNet-18's last stage and the head; the stages before it stay as loaded."""

    name = "thaw-last-stage"

    def prepare(self, model) -> None:
        model.freeze_backbone(False)
        for name, parameter in model.backbone.net.named_parameters():
            parameter.requires_grad_(name.startswith("layer4."))
        model.train(model.training)

    def param_groups(self, model, lr):
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr, "name": "trainable"}]


def test_a_partly_frozen_backbone_keeps_its_frozen_stages_and_their_statistics_while_the_thawed_stage_trains():
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet18", "linear", 3, weights="none"))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    images = TensorDataset(torch.randn(16, 3, 32, 32), torch.arange(16) % 3)
    fit(model, ThawLastStage(), images, None, TrainConfig(epochs=2, batch_size=8, workers=0, device="cpu",
                                                         precision="fp32", cache=False, lr=1e-2))
    after = model.state_dict()
    frozen = [name for name in before if name.startswith("backbone.net.") and not name.startswith("backbone.net.layer4.")]
    assert any(name.endswith("running_mean") for name in frozen)
    assert all(torch.equal(before[name], after[name]) for name in frozen), "a frozen stage changed"
    assert not torch.equal(before["backbone.net.layer4.0.bn1.running_mean"], after["backbone.net.layer4.0.bn1.running_mean"])
    assert not torch.equal(before["backbone.net.layer4.1.conv2.weight"], after["backbone.net.layer4.1.conv2.weight"])
    # Recorded as the run would record it, and frozen alike when reloaded.
    names = model.frozen_modules()
    assert "backbone.net.layer1" in names and not any(name.startswith("backbone.net.layer4") for name in names)
    again = build_model(ModelSpec("resnet18", "linear", 3, weights="none"))
    again.freeze_modules(names)
    again.train()
    assert not again.backbone.net.layer1[0].bn1.training and again.backbone.net.layer4[0].bn1.training
