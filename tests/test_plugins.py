"""Plugins end to end: the installed example plugin through the CLI, broken and clashing
plugins, TLTK_PLUGINS and the autoload switch, and the tltk.testing contract kit.

The example plugin (plugins/tltk-example-plugin) is really installed (the Makefile does
it). Broken and clashing plugins are real distributions too, written on the fly: a
``NAME-VERSION.dist-info`` folder with METADATA and entry_points.txt, next to the
plugin's modules, in a folder put on the Python path.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import traceback
from importlib import metadata
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from tltk import registry as reg
from tltk.backbones import BACKBONES, build_backbone
from tltk.cli import main
from tltk.heads import HEADS, build_head
from tltk.model import ModelSpec, build_model
from tltk.registry import DATA_FORMATS, PluginError, refresh
from tltk.strategies import Strategy, build_strategy
from tltk.run import load_run
from tltk.testing import (
    ContractViolation, check_backbone, check_callback, check_exporter, check_format, check_head, check_strategy,
    sample_predictions,
)
from tltk_example_plugin.backbone import tinyconv
from tltk_example_plugin.budget import time_budget
from tltk_example_plugin.head import cosine
from tltk_example_plugin.markdown import markdown_exporter, read_markdown_table
from tltk_example_plugin.npz import read_npz
from tltk_example_plugin.strategy import gradual_unfreeze

EXAMPLE = "tltk-example-plugin"
EXAMPLE_SOURCE = f"{EXAMPLE}=={metadata.version(EXAMPLE)}"
EXAMPLE_COMPONENTS = {"backbones": "tinyconv", "heads": "cosine", "strategies": "gradual-unfreeze",
                      "exporters": "markdown", "formats": "npz", "callbacks": "time-budget"}
FAST = ["--epochs", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet"]


def tltk(*args: str):
    return CliRunner().invoke(main, list(args))


def tltk_process(*args: str, pythonpath: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh interpreter, for what only a fresh process shows (what got imported)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("TLTK_PLUGINS", "TLTK_DISABLE_PLUGIN_AUTOLOAD")}
    environ.update(env)
    if pythonpath is not None:
        environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True, env=environ, timeout=120)


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit code 2 and one error on stderr (after any warnings), with no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    stderr = result.stderr
    assert stderr.count("error:") == 1, stderr
    text = " ".join(stderr[stderr.index("error:"):].split())  # rich wraps long lines for the terminal
    for fragment in fragments:
        assert fragment in text, text


@pytest.fixture(autouse=True)
def fresh_registries(monkeypatch) -> Iterator[list[str]]:
    """Entry points read afresh for each test and again after it; reports collected, not printed."""
    reported: list[str] = []
    monkeypatch.setattr(reg, "_reported", set())
    previous = reg.set_reporter(reported.append)
    for name in ("TLTK_PLUGINS", "TLTK_DISABLE_PLUGIN_AUTOLOAD"):
        monkeypatch.delenv(name, raising=False)
    refresh()
    yield reported
    reg.set_reporter(previous)
    refresh()


# --- writing plugin distributions on the fly ---------------------------------------------------


def write_distribution(site: Path, name: str, version: str, entry_points: dict[str, dict[str, str]],
                       modules: dict[str, str]) -> None:
    """An installed distribution as importlib.metadata finds it: dist-info plus its modules."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    groups = [f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()) for group, points in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(groups))
    for module, source in modules.items():
        path = site / Path(*module.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))


BROKEN_MODULES = {
    "tltk_broken/__init__.py": "",
    "tltk_broken/missing.py": "import a_module_that_is_not_installed\n",
    "tltk_broken/parts.py": """
        from tltk.plugin import backbone_factory

        NOT_A_FACTORY = 42

        def exploding_head(*, in_features, in_channels, num_classes):
            raise RuntimeError("weights file is corrupt")

        def head_without_num_classes(*, in_features, in_channels):
            raise AssertionError("never called: it cannot take num_classes")

        @backbone_factory(pretrained=False)
        def not_a_backbone(pretrained=False):
            import torch
            return torch.nn.Linear(2, 2)
    """,
    "tltk_future/__init__.py": 'TLTK_PLUGIN_API = "2.0"\n',
    "tltk_future/heads.py": "from tltk.plugin import FeatureHookFromTheFuture\n",
}


@pytest.fixture
def plugin_site(tmp_path: Path) -> Iterator[Path]:
    """A folder on sys.path holding a broken plugin, one for a future plugin API, and one whose
    names clash with tltk's own and with the example plugin's."""
    site = tmp_path / "site"
    write_distribution(site, "tltk-broken", "0.3", {
        "tltk.heads": {"missing": "tltk_broken.missing:head", "exploding": "tltk_broken.parts:exploding_head",
                       "narrow": "tltk_broken.parts:head_without_num_classes", "constant": "tltk_broken.parts:NOT_A_FACTORY"},
        "tltk.backbones": {"linear-only": "tltk_broken.parts:not_a_backbone"},
    }, {k.removesuffix(".py").replace("/", "."): v for k, v in BROKEN_MODULES.items() if k.startswith("tltk_broken")})
    write_distribution(site, "tltk-future", "7.0", {"tltk.heads": {"hooked": "tltk_future.heads:head"}},
                       {k.removesuffix(".py").replace("/", "."): v for k, v in BROKEN_MODULES.items() if k.startswith("tltk_future")})
    write_distribution(site, "tltk-clash", "1.1", {
        "tltk.backbones": {"simplecnn": "tltk_clash:impostor"},
        "tltk.heads": {"cosine": "tltk_clash:other_cosine"},
    }, {"tltk_clash": """
        from tltk.plugin import backbone_factory

        @backbone_factory(pretrained=False, description="not tltk's simplecnn")
        def impostor(pretrained=False):
            from tltk_example_plugin.backbone import tinyconv
            return tinyconv(width=2)

        def other_cosine(*, in_features, in_channels, num_classes):
            import torch
            return torch.nn.Linear(in_features, num_classes)
    """})
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    refresh()
    yield site
    sys.path.remove(str(site))
    for module in [m for m in sys.modules if m.split(".")[0] in ("tltk_broken", "tltk_future", "tltk_clash")]:
        del sys.modules[module]
    importlib.invalidate_caches()
    refresh()


# --- the example plugin, installed ------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(EXAMPLE_COMPONENTS))
def test_tltk_list_shows_each_example_component_with_its_package_and_version(kind: str) -> None:
    result = tltk("list", kind, "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows[EXAMPLE_COMPONENTS[kind]]["source"] == EXAMPLE_SOURCE
    assert all(row["source"].startswith("tltk==") for name, row in rows.items()
               if name not in (EXAMPLE_COMPONENTS[kind], "timm:NAME"))


def test_tltk_list_table_names_the_plugin_package() -> None:
    result = tltk("list", "heads")
    assert result.exit_code == 0
    assert "cosine" in result.stdout and EXAMPLE_SOURCE in result.stdout


def test_tltk_list_details_describes_the_example_backbone() -> None:
    rows = {r["name"]: r for r in json.loads(tltk("list", "backbones", "--details", "--json").stdout)}
    assert rows["tinyconv"]["status"] == "ok" and rows["tinyconv"]["pretrained"] == "no"
    assert rows["tinyconv"]["description"].startswith("3 x (3x3 conv + BatchNorm")
    assert rows["resnet18"]["pretrained"] == "yes"


def test_listing_and_tltk_plugins_import_neither_torch_nor_any_component() -> None:
    probe = ("import sys; from click.testing import CliRunner; from tltk.cli import main; "
             "r1 = CliRunner().invoke(main, ['list', 'backbones']); r2 = CliRunner().invoke(main, ['list', 'heads']); "
             "listed = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('tltk_example_plugin', "
             "'tltk.backbones.', 'tltk.heads', 'tltk.strategies', 'tltk.export.'))); "
             "r3 = CliRunner().invoke(main, ['plugins']); "
             "print(r1.exit_code, r2.exit_code, r3.exit_code, listed, 'torch' in sys.modules, 'tinyconv' in r1.output)")
    result = tltk_process(probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "0", "0", "[]", "False", "True"]


def test_tltk_plugins_lists_every_example_component_ok_and_hides_tltks_own_unless_all() -> None:
    rows = json.loads(tltk("plugins", "--json").stdout)["plugins"]
    mine = {(r["group"], r["name"]): r for r in rows if r["package"] == EXAMPLE}
    assert set(mine) == {("tltk.backbones", "tinyconv"), ("tltk.heads", "cosine"), ("tltk.strategies", "gradual-unfreeze"),
                         ("tltk.exporters", "markdown"), ("tltk.datasets", "npz"), ("tltk.callbacks", "time-budget")}
    assert {(r["status"], r["source"], r["detail"]) for r in mine.values()} == {("ok", EXAMPLE_SOURCE, "")}
    assert not any(r["package"] == "tltk" for r in rows)
    everything = json.loads(tltk("plugins", "--all", "--json").stdout)["plugins"]
    own = [r for r in everything if r["package"] == "tltk"]
    assert {r["name"] for r in own} >= {"simplecnn", "linear", "freeze", "kaggle", "folder"}
    assert {r["status"] for r in own} == {"ok"}


def write_npz(path: Path, per_class: int = 8, size: int = 32) -> Path:
    """Three classes of 32x32 images that differ in brightness, so that two epochs learn something."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), per_class)
    images = (rng.integers(0, 60, (len(labels), size, size, 3)) + labels[:, None, None, None] * 90).astype(np.uint8)
    np.savez(path, images=images, labels=labels, class_names=np.array(["dark", "mid", "bright"]))
    return path


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("plugin-run")
    data = write_npz(folder / "shades.npz")
    out = folder / "run"
    result = CliRunner().invoke(main, [
        "finetune", "--backbone", "tinyconv", "--head", "cosine", "--strategy", "gradual-unfreeze", "--weights", "none",
        "--data", f"npz:{data}", "--test-split", "0.25", "--out", str(out), "--json", *FAST,
    ])
    assert result.exit_code == 0, result.output
    return out, data


def test_finetune_runs_end_to_end_with_the_example_backbone_head_strategy_and_data_format(plugin_run) -> None:
    out, _ = plugin_run
    config = json.loads((out / "config.json").read_text())
    assert (config["model"]["backbone"], config["model"]["head"]) == ("tinyconv", "cosine")
    assert config["strategy"] == {"name": "gradual-unfreeze", "stages_per_epoch": 1}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["test"]["n"] == 6
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0


def test_evaluate_agrees_with_the_markdown_predictions_of_a_run_made_of_plugin_components(plugin_run, tmp_path) -> None:
    out, data = plugin_run
    report = json.loads(tltk("evaluate", str(out), "--device", "cpu", "--json").stdout)
    target = tmp_path / "predictions.md"
    result = tltk("predict", str(out), "--format", "markdown", "--out", str(target), "--device", "cpu")
    assert result.exit_code == 0, result.output
    predicted = [label for (label,) in read_markdown_table(target)]
    ids = [line.split("|")[1].strip() for line in target.read_text().splitlines()[2:]]
    with np.load(data) as arrays:
        truth = [str(arrays["class_names"][arrays["labels"][int(i)]]) for i in ids]  # npz ids are row numbers
    assert len(predicted) == report["n"] == 6
    assert report["accuracy"] == pytest.approx(np.mean([p == t for p, t in zip(predicted, truth)]))


def test_the_gradual_unfreeze_strategy_thaws_the_backbone_from_the_top() -> None:
    model = build_model(ModelSpec("tinyconv", "cosine", 3, weights="none"))
    strategy = build_strategy("gradual-unfreeze")
    strategy.prepare(model)
    stages = model.backbone.stages()
    trains = lambda: [all(p.requires_grad for p in stage) for stage in stages]  # noqa: E731
    assert trains() == [False, False, False, False] and model.backbone_frozen
    assert strategy.on_epoch_start(model, 0) is None
    assert strategy.on_epoch_start(model, 1) == "epoch 2: the top 1 of 4 backbone stages train"
    assert trains() == [False, False, False, True]
    strategy.on_epoch_start(model, 4)
    assert trains() == [True] * 4 and not model.backbone_frozen


# --- the example plugin passes tltk.testing ----------------------------------------------------


def test_example_backbone_passes_the_contract_kit() -> None:
    backbone = check_backbone(tinyconv, layers=("conv1", "pool5", "fc7"))
    assert (backbone.feature_dim, backbone.spatial_channels) == (64, 64)


def test_example_head_passes_the_contract_kit() -> None:
    head = check_head(cosine)
    assert sum(p.numel() for p in head.parameters()) == 3 * 16 + 1  # a vector per class and the temperature


def test_example_callback_passes_the_contract_kit_and_stops_a_spent_run() -> None:
    assert check_callback(time_budget, options={"seconds": 3600}).loop.result.epochs_run == 2
    assert check_callback(time_budget, options={"seconds": 0}).loop.step == 1


def test_the_contract_kit_rejects_a_callback_factory_that_builds_something_else() -> None:
    with pytest.raises(ContractViolation, match="not a tltk.plugin.Callback"):
        check_callback(lambda: object())


def test_example_strategy_passes_the_contract_kit() -> None:
    assert check_strategy(gradual_unfreeze, epochs=3) == [None, "epoch 2: the top 1 of 4 backbone stages train",
                                                           "epoch 3: the top 2 of 4 backbone stages train"]


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_example_exporter_passes_the_contract_kit(tmp_path, task) -> None:
    path = check_exporter(markdown_exporter, tmp_path / "p.md", read=read_markdown_table, task=task)
    assert path.read_text().splitlines()[0] == "| id | predicted | probability |"


def test_example_format_passes_the_contract_kit(tmp_path) -> None:
    raw = check_format(read_npz, write_npz(tmp_path / "d.npz", per_class=3, size=8))
    assert raw.class_names == ["dark", "mid", "bright"] and len(raw.all_samples()) == 9


# --- tltk.testing catches what is wrong ----------------------------------------------------------


def _tinyconv_with(change) -> object:
    def factory(pretrained: bool = False):
        backbone = tinyconv(width=2)
        change(backbone)
        return backbone
    return factory


def _wrong_feature_dim(backbone) -> None:
    backbone.feature_dim = 65


def _stale_layer_path(backbone) -> None:
    backbone.layers["fc8"] = "fc.7"


def _unused_parameters(backbone) -> None:
    backbone.net.unused = nn.Linear(3, 3)


def _idle_named_layer(backbone) -> None:
    backbone.net.unused = nn.Identity()
    backbone.layers["extra"] = "unused"


def _no_preprocessing(backbone) -> None:
    backbone.preprocessing = None


@pytest.mark.parametrize("change, complaint", [
    (_wrong_feature_dim, r"forward_vector gives shape \(2, 64\), not \(2, feature_dim=65\)"),
    (_stale_layer_path, r"layers\['fc8'\] = 'fc.7' names no module inside .net"),
    (_unused_parameters, r"no gradient reaches the backbone's net.unused.weight"),
    (_idle_named_layer, r"named layers that the forward pass never runs: extra \(unused\)"),
    (_no_preprocessing, r"preprocessing.input_size is None"),
])
def test_the_contract_kit_rejects_a_backbone_that_breaks_its_contract(change, complaint) -> None:
    with pytest.raises(ContractViolation, match=complaint):
        check_backbone(_tinyconv_with(change))


def test_the_contract_kit_rejects_a_head_with_the_wrong_output_size() -> None:
    def off_by_one(*, in_features: int, in_channels: int | None, num_classes: int) -> nn.Module:
        return nn.Linear(in_features, num_classes + 1)

    with pytest.raises(ContractViolation, match=r"gives shape \(4, 4\), not \(4, 3\)"):
        check_head(off_by_one)


class _MapHead(nn.Sequential):
    uses_spatial = True


def test_the_contract_kit_rejects_a_head_that_crashes_without_a_spatial_map() -> None:
    def needs_map(*, in_features: int, in_channels: int | None, num_classes: int) -> nn.Module:
        return _MapHead(nn.Conv2d(in_channels, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # type: ignore[arg-type]

    with pytest.raises(ContractViolation, match="with in_channels=None .* raised TypeError"):
        check_head(needs_map)


class _Careless(Strategy):
    """Freezes the backbone but still gives the optimizer its parameters twice."""

    name = "careless"

    def prepare(self, model) -> None:
        model.freeze_backbone(True)

    def param_groups(self, model, lr):
        return [{"params": list(model.parameters()), "lr": lr}, {"params": list(model.head.parameters()), "lr": lr}]


class _Leaky(_Careless):
    """Freezes the backbone, but its frozen parameters still move (weight decay applied by hand)."""

    def param_groups(self, model, lr):
        return [{"params": list(model.head.parameters()), "lr": lr}]

    def on_epoch_start(self, model, epoch):
        with torch.no_grad():
            next(model.backbone.parameters()).mul_(0.5)
        return None


@pytest.mark.parametrize("strategy, complaint", [
    (_Careless, "param_groups\\(\\) puts a parameter in two groups"),
    (_Leaky, "in epoch 0, frozen parameters changed: backbone.net"),
])
def test_the_contract_kit_rejects_a_strategy_that_breaks_its_contract(strategy, complaint) -> None:
    with pytest.raises(ContractViolation, match=complaint):
        check_strategy(strategy)


def test_the_contract_kit_rejects_an_exporter_whose_file_says_something_else(tmp_path) -> None:
    def last_class(predictions, out: Path) -> None:
        out.write_text("\n".join(predictions.class_names[-1] for _ in predictions.ids))

    def nothing(predictions, out: Path) -> None:
        pass

    read = lambda path: path.read_text().splitlines()  # noqa: E731
    with pytest.raises(ContractViolation, match=r"row 0 reads back as \['gamma'\], but the prediction is \['alpha'\]"):
        check_exporter(last_class, tmp_path / "a.txt", read=read)
    with pytest.raises(ContractViolation, match="the exporter wrote nothing"):
        check_exporter(nothing, tmp_path / "b.txt")


def test_the_contract_kit_rejects_a_format_with_a_target_out_of_range(tmp_path) -> None:
    from tltk.plugin import RawDataset, Sample

    def off_by_one(path: Path, *, image_root=None, strict=False):
        images = np.zeros((4, 8, 8, 3), np.uint8)
        return RawDataset(["a", "b"], {"all": [Sample(i, i % 2 + 1, str(i)) for i in range(4)]}, str(path), arrays=images)

    with pytest.raises(ContractViolation, match="sample 1: target 2 is not a class index"):
        check_format(off_by_one, tmp_path)


def test_sample_predictions_have_an_empty_and_a_double_multilabel_row() -> None:
    sets = sample_predictions("multilabel").predicted_sets(0.5)
    assert [] in sets and any(len(s) == 2 for s in sets)


# --- broken plugins never break tltk ------------------------------------------------------------


def test_a_broken_plugin_leaves_every_other_component_working(plugin_site) -> None:
    assert {"linear", "mlp", "conv", "tltk-example-plugin:cosine", "missing", "exploding"} <= set(HEADS.names())
    head = build_head("linear", 8, None, 3)
    assert isinstance(head, nn.Module)
    result = tltk("summary", "--backbone", "lenet5", "--head", "mlp", "--num-classes", "3", "--json")
    assert result.exit_code == 0, result.output
    listing = tltk("list", "heads", "--json")
    assert listing.exit_code == 0 and "exploding" in listing.stdout


def test_tltk_plugins_reports_each_broken_component_in_one_line_with_package_version_and_error(plugin_site) -> None:
    rows = {r["name"]: r for r in json.loads(tltk("plugins", "--json").stdout)["plugins"]}
    assert rows["missing"]["status"] == "failed"
    assert rows["missing"]["detail"] == (
        "head 'missing' from tltk-broken 0.3 failed to load (ModuleNotFoundError: No module named "
        "'a_module_that_is_not_installed'); fix or uninstall tltk-broken, or leave it out with TLTK_PLUGINS.")
    assert rows["narrow"]["detail"].startswith("head 'narrow' from tltk-broken 0.3 does not meet the head contract: "
                                               "it cannot be called as f(in_features=..., in_channels=..., num_classes=...)")
    assert rows["constant"]["detail"].startswith("head 'constant' from tltk-broken 0.3 does not meet the head contract: "
                                                 "it names a int, not a callable")
    assert rows["hooked"]["detail"].startswith("head 'hooked' from tltk-future 7.0 cannot be used: it is written for "
                                               "tltk plugin API 2.0 and this tltk provides plugin API 1.0;")
    assert rows["exploding"]["status"] == "ok"  # it loads; it fails only when it builds
    assert rows["tinyconv"]["status"] == "ok"
    assert all("\n" not in r["detail"] for r in rows.values())
    table = tltk("plugins")
    assert table.exit_code == 1 and "tltk-broken==0.3" in table.stdout  # the table still shows, then it fails


@pytest.mark.parametrize("args, fragments", [
    (["--head", "missing"], ["head 'missing' from tltk-broken 0.3 failed to load", "a_module_that_is_not_installed"]),
    (["--head", "exploding"], ["head 'exploding' from tltk-broken 0.3 raised RuntimeError: weights file is corrupt"]),
    (["--head", "hooked"], ["head 'hooked' from tltk-future 7.0 cannot be used", "plugin API 2.0"]),
    (["--backbone", "linear-only"], ["backbone 'linear-only' from tltk-broken 0.3 does not meet the backbone contract",
                                     "it has no net, feature_dim"]),
])
def test_using_a_broken_plugin_by_name_exits_2_with_one_line_naming_the_package(plugin_site, args, fragments) -> None:
    options = {"--backbone": "lenet5", "--head": "linear"}
    options[args[0]] = args[1]
    result = tltk("summary", *[x for pair in options.items() for x in pair], "--num-classes", "3")
    assert_one_line_error(result, *fragments)


def test_debug_shows_the_plugins_own_traceback(plugin_site) -> None:
    result = CliRunner().invoke(main, ["--debug", "summary", "--backbone", "lenet5", "--head", "exploding"])
    assert isinstance(result.exception, PluginError)
    cause = result.exception.__cause__
    assert isinstance(cause, RuntimeError)
    assert any(frame.filename.endswith("tltk_broken/parts.py") for frame in traceback.extract_tb(cause.__traceback__))


# --- name clashes --------------------------------------------------------------------------------


def test_a_clashing_plugin_never_replaces_a_builtin_and_is_picked_by_package(plugin_site, fresh_registries) -> None:
    assert type(build_backbone("simplecnn")).__module__ == "tltk.backbones.small"
    explicit = build_backbone("tltk-clash:simplecnn")
    assert type(explicit).__module__ == "tltk_example_plugin.networks" and explicit.name == "tltk-clash:simplecnn"
    assert fresh_registries.count(
        "backbone 'simplecnn' from tltk-clash 1.1 clashes with the one from tltk 0.1.0, which keeps the name; "
        "use tltk-clash:simplecnn to pick the other.") == 1
    assert "tltk-clash:simplecnn" in BACKBONES.names()


def test_two_plugins_claiming_one_name_make_the_user_pick(plugin_site) -> None:
    result = tltk("summary", "--backbone", "lenet5", "--head", "cosine", "--num-classes", "3")
    assert_one_line_error(result, "head 'cosine' is provided by tltk-clash 1.1 and tltk-example-plugin",
                          "pick one as tltk-clash:cosine or tltk-example-plugin:cosine")
    assert "warning:" not in result.stderr  # the error is the report
    picked = tltk("summary", "--backbone", "lenet5", "--head", "tltk-example-plugin:cosine", "--num-classes", "3", "--json")
    assert picked.exit_code == 0, picked.output
    assert json.loads(picked.stdout)["layers"][-1]["params"] == 84 * 3 + 1  # a vector per class and the temperature


def test_the_cli_reports_a_clash_once_on_stderr_and_carries_on(plugin_site) -> None:
    reg.set_reporter(lambda message: None)  # the CLI installs its own
    result = tltk("list", "backbones")
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "backbone 'simplecnn' from tltk-clash 1.1 clashes" in warnings[0]
    assert "tltk-clash:simplecnn" in result.stdout


def test_tltk_plugins_marks_the_losing_side_of_a_clash_failed_with_how_to_pick_it(plugin_site) -> None:
    listed = tltk("plugins", "--json")
    assert listed.exit_code == 1  # a failed component fails the command, so a plugin's CI notices
    rows = {(r["package"], r["name"]): r for r in json.loads(listed.stdout)["plugins"]}
    clash = rows[("tltk-clash", "simplecnn")]
    assert (clash["status"], clash["source"]) == ("failed", "tltk-clash==1.1")
    assert "use tltk-clash:simplecnn to pick the other" in clash["detail"]


# --- TLTK_PLUGINS and TLTK_DISABLE_PLUGIN_AUTOLOAD -----------------------------------------------


def test_tltk_plugins_env_blocks_unlisted_packages_and_says_how_to_allow_them(plugin_site, monkeypatch) -> None:
    monkeypatch.setenv("TLTK_PLUGINS", EXAMPLE)
    refresh()
    listed = tltk("plugins", "--json")
    assert listed.exit_code == 0  # blocked on purpose is not a failure
    rows = json.loads(listed.stdout)
    status = {(r["package"], r["name"]): r["status"] for r in rows["plugins"]}
    assert status[(EXAMPLE, "tinyconv")] == "ok" and status[("tltk-broken", "missing")] == "blocked"
    assert status[("tltk-clash", "simplecnn")] == "blocked"
    assert rows["policy"] == f"TLTK_PLUGINS={EXAMPLE}: only these packages' components load (and tltk's own)."
    assert "cosine" in HEADS.names() and "missing" not in HEADS.names()  # no clash once tltk-clash is left out
    result = tltk("summary", "--backbone", "lenet5", "--head", "exploding")
    assert_one_line_error(result, f"TLTK_PLUGINS={EXAMPLE} does not list tltk-broken; add it there")


def test_disabling_autoload_loads_no_plugin_but_every_builtin(monkeypatch) -> None:
    monkeypatch.setenv("TLTK_DISABLE_PLUGIN_AUTOLOAD", "1")
    refresh()
    names = {r["name"] for r in json.loads(tltk("list", "backbones", "--json").stdout)}
    assert "tinyconv" not in names and {"simplecnn", "resnet18", "lenet5"} <= names
    result = tltk("summary", "--backbone", "tinyconv")
    assert_one_line_error(result, "backbone 'tinyconv' from tltk-example-plugin", "TLTK_DISABLE_PLUGIN_AUTOLOAD is set")
    rows = json.loads(tltk("plugins", "--json").stdout)
    assert {r["status"] for r in rows["plugins"]} == {"blocked"}


def test_the_environment_switches_work_in_a_fresh_process(plugin_site) -> None:
    listing = ("from click.testing import CliRunner; from tltk.cli import main; "
               "print(CliRunner().invoke(main, ['list', 'heads', '--json']).stdout)")

    def heads(**env: str) -> set[str]:
        result = tltk_process(listing, pythonpath=plugin_site, **env)
        assert result.returncode == 0, result.stderr
        return {row["name"] for row in json.loads(result.stdout)}

    everything = heads()
    assert {"tltk-clash:cosine", "tltk-example-plugin:cosine", "missing"} <= everything and "cosine" not in everything
    assert heads(TLTK_PLUGINS=f"tltk-broken,{EXAMPLE}") == {"linear", "mlp", "conv", "cosine", "missing", "exploding",
                                                            "narrow", "constant"}
    assert heads(TLTK_DISABLE_PLUGIN_AUTOLOAD="1") == {"linear", "mlp", "conv"}


# --- registering twice --------------------------------------------------------------------------


def test_importing_a_builtin_module_again_registers_nothing_new_and_breaks_nothing() -> None:
    from tltk.export import EXPORTERS

    before = EXPORTERS.names()
    kaggle = EXPORTERS.get("kaggle")
    importlib.reload(importlib.import_module("tltk.export.kaggle"))  # its decorator runs a second time
    assert EXPORTERS.names() == before and EXPORTERS.get("kaggle") is kaggle


def test_a_bare_path_is_recognised_by_a_plugin_format_that_declares_how(tmp_path: Path) -> None:
    from tltk.data import load_data

    file = write_npz(tmp_path / "shades.npz")
    data = load_data(str(file), val_split=0.0, test_split=0.0)
    assert data.format == "npz" and data.class_names == ["dark", "mid", "bright"]


def test_the_no_format_sentence_lists_every_installed_format_plugins_included(tmp_path: Path) -> None:
    from tltk.data import load_data
    from tltk.errors import DataError

    odd = tmp_path / "notes.txt"
    odd.write_text("not images")
    with pytest.raises(DataError, match="No dataset format recognised") as refused:
        load_data(str(odd))
    assert "npz:PATH" in str(refused.value) and "folder:PATH" in str(refused.value)


def test_tltks_walk_over_the_backbones_skips_a_broken_plugin_and_says_why(plugin_site) -> None:
    from test_backbones import build_or_skip, registered_backbones

    walked = [param if isinstance(param, str) else param.values[0] for param in registered_backbones()]
    assert {"simplecnn", "tinyconv", "linear-only"} <= set(walked)
    with pytest.raises(pytest.skip.Exception, match="backbone 'linear-only' from tltk-broken 0.3 does not meet"):
        build_or_skip("linear-only")  # it loads, and breaks the contract only when built
    assert build_or_skip("lenet5").name == "lenet5"


# --- provenance: a run remembers which package built each of its parts ---------------------------

LATE_HEAD = {"tltk_late": """
    def head(*, in_features, in_channels, num_classes):
        import torch
        return torch.nn.Linear(in_features, num_classes)
"""}


def install_late(tmp_path: Path, version: str, heads: dict[str, str]) -> Path:
    """Install the distribution tltk-late (a head or two) on sys.path, as pip would leave it."""
    site = tmp_path / f"late-{version}"
    write_distribution(site, "tltk-late", version, {"tltk.heads": heads}, LATE_HEAD)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    refresh()
    return site


def uninstall(site: Path) -> None:
    sys.path.remove(str(site))
    for module in [m for m in sys.modules if m.split(".")[0] == "tltk_late"]:
        del sys.modules[module]
    importlib.invalidate_caches()
    refresh()


def train_with_head(head: str, out: Path) -> Path:
    done = tltk("finetune", "--backbone", "lenet5", "--weights", "none", "--data", "builtin:digits", "--classes", "0,1",
                "--train-per-class", "4", "--head", head, "--out", str(out), *FAST)
    assert done.exit_code == 0, done.output
    return out


def test_a_run_keeps_its_plugin_head_when_another_package_later_provides_the_same_name(tmp_path: Path) -> None:
    run = train_with_head("cosine", tmp_path / "run")
    recorded = json.loads((run / "config.json").read_text())["components"]["head"]
    assert recorded == {"name": "cosine", "package": EXAMPLE, "version": metadata.version(EXAMPLE)}
    site = install_late(tmp_path, "1.0", {"cosine": "tltk_late:head"})
    try:
        assert "cosine" not in HEADS.names()  # contested now: a plain --head cosine would be refused
        assert type(load_run(run).model.head).__name__ == "CosineHead"
        evaluated = tltk("evaluate", str(run), "--device", "cpu", "--json")
        assert evaluated.exit_code == 0, evaluated.output
        predicted = tltk("predict", str(run), "--out", str(tmp_path / "p.csv"), "--device", "cpu")
        assert predicted.exit_code == 0, predicted.output
    finally:
        uninstall(site)


def test_a_run_whose_plugin_is_gone_or_at_another_major_version_says_what_to_install(tmp_path: Path) -> None:
    site = install_late(tmp_path, "1.0", {"late-head": "tltk_late:head"})
    run = train_with_head("late-head", tmp_path / "run")
    uninstall(site)
    result = tltk("evaluate", str(run), "--device", "cpu")
    assert_one_line_error(result, "this run was trained with head 'late-head' from tltk-late 1.0, which is not "
                                  "installed; install it (pip install 'tltk-late==1.0')")
    site = install_late(tmp_path, "2.0", {"late-head": "tltk_late:head"})
    try:
        assert_one_line_error(tltk("evaluate", str(run), "--device", "cpu"),
                              "from tltk-late 1.0, and tltk-late 2.0 is installed, another major version")
    finally:
        uninstall(site)
    site = install_late(tmp_path, "1.1", {"late-head": "tltk_late:head"})
    try:
        evaluated = tltk("evaluate", str(run), "--device", "cpu")
        assert evaluated.exit_code == 0  # a minor version loads, with a note on stderr
        assert "trained with head 'late-head' from tltk-late 1.0; 1.1 is installed" in " ".join(evaluated.stderr.split())
    finally:
        uninstall(site)


def test_a_run_reads_its_data_with_the_plugin_format_that_read_it_in_training(tmp_path: Path) -> None:
    file = write_npz(tmp_path / "shades.npz")
    done = tltk("finetune", "--backbone", "lenet5", "--weights", "none", "--data", f"npz:{file}",
                "--out", str(tmp_path / "run"), *FAST)
    assert done.exit_code == 0, done.output
    site = tmp_path / "late-format"
    write_distribution(site, "tltk-late", "1.0", {"tltk.datasets": {"npz": "tltk_late:reader"}},
                       {"tltk_late": "def reader(path, *, image_root=None, strict=False):\n    raise AssertionError\n"})
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    refresh()
    try:
        assert "npz" not in DATA_FORMATS.names()  # contested now
        evaluated = tltk("evaluate", str(tmp_path / "run"), "--device", "cpu", "--json")
        assert evaluated.exit_code == 0, evaluated.output
    finally:
        uninstall(site)
