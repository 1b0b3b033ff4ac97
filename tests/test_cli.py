"""The `tltk` command: what people type, the figures it prints, and one-sentence errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from data_fixtures import write_bad_images, write_image_folder
from tltk.cli import main

FAST = ["--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet"]


def tltk(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("imgs") / "shapes", {"circle": 6, "square": 6, "star": 6})


@pytest.fixture(scope="module")
def run_dir(folder: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "r"
    result = tltk("finetune", "--backbone", "lenet5", "--head", "mlp", "--hidden", "16", "--weights", "none",
                  "--data", str(folder), "--out", str(out), "--json", *FAST)
    assert result.exit_code == 0, result.output
    return out


def assert_one_sentence_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    text = " ".join(lines)
    assert text.startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in text, text


def test_list_shows_each_registry_as_json() -> None:
    backbones = {r["name"] for r in json.loads(tltk("list", "backbones", "--json").stdout)}
    assert {"alexnet", "vgg16", "vgg16_bn", "resnet18", "lenet5", "simplecnn", "mnist-cnn"} <= backbones
    assert {r["name"] for r in json.loads(tltk("list", "heads", "--json").stdout)} >= {"linear", "mlp", "conv"}
    strategies = {r["name"] for r in json.loads(tltk("list", "strategies", "--json").stdout)}
    assert strategies >= {"freeze", "finetune", "freeze-unfreeze", "discriminative"}


def test_summary_of_vgg16_with_mlp_head_counts_the_frozen_backbone_as_non_trainable() -> None:
    result = tltk("summary", "--backbone", "vgg16", "--head", "mlp", "--num-classes", "20", "--freeze",
                  "--input-size", "64", "--json")
    summary = json.loads(result.stdout)
    head = 4096 * 512 + 512 + 512 * 20 + 20
    assert summary["trainable_params"] == head
    assert summary["total_params"] == 138_357_544 - 1000 * 4097 + head  # torchvision VGG-16 (138,357,544) minus its fc8
    assert summary["layers"][0]["output_shape"] == [64, 64, 64]


def test_finetune_json_and_evaluate_json_agree_on_test_accuracy(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    report = json.loads(tltk("evaluate", str(run_dir), "--device", "cpu", "--json").stdout)
    assert report["n"] == summary["test"]["n"]
    assert report["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    assert report["class_names"] == ["circle", "square", "star"]


def test_evaluate_prints_accuracy_per_class_table_and_confusion_matrix(run_dir: Path) -> None:
    text = tltk("evaluate", str(run_dir), "--device", "cpu").stdout
    assert "accuracy:" in text and "per-class accuracy" in text and "confusion matrix" in text
    assert "top-5" not in text  # three classes: top-5 means nothing


@pytest.mark.parametrize("option,value,expected", [
    ("--hidden", "128", "head 'linear' has no option 'hidden'; it takes dropout=0.0."),
    ("--unfreeze-epoch", "2", "strategy 'finetune' has no option 'unfreeze_epoch'; it takes no options."),
])
def test_an_option_the_component_does_not_take_is_refused_before_anything_is_written(
        folder: Path, tmp_path: Path, option, value, expected) -> None:
    result = tltk("finetune", "--backbone", "lenet5", "--weights", "none", "--head", "linear", option, value,
                  "--data", str(folder), "--out", str(tmp_path / "x"), *FAST)
    assert_one_sentence_error(result, expected)
    assert not (tmp_path / "x").exists()


def test_list_details_shows_each_components_options() -> None:
    heads = {r["name"]: r for r in json.loads(tltk("list", "heads", "--details", "--json").stdout)}
    assert [(o["name"], o["default"]) for o in heads["linear"]["options"]] == [("dropout", 0.0)]
    assert [o["name"] for o in heads["mlp"]["options"]] == ["hidden", "dropout"]
    strategies = {r["name"]: r for r in json.loads(tltk("list", "strategies", "--details", "--json").stdout)}
    assert strategies["freeze"]["options"] == []
    assert {o["name"]: o["default"] for o in strategies["freeze-unfreeze"]["options"]} == {
        "unfreeze_epoch": 1, "backbone_lr_mult": 0.1}
    table = tltk("list", "heads", "--details").stdout
    assert "options" in table and "hidden=512" in table
    formats = {r["name"]: r for r in json.loads(tltk("list", "formats", "--details", "--json").stdout)}
    assert formats["folder"]["options"] == []  # a data format is called with its path only


def test_unknown_backbone_names_close_matches(folder: Path, tmp_path: Path) -> None:
    result = tltk("finetune", "--backbone", "resnet81", "--data", str(folder), "--out", str(tmp_path / "x"), *FAST)
    assert_one_sentence_error(result, "Unknown backbone 'resnet81'", "resnet18")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("option,value,expected", [
    ("--head", "mpl", "Did you mean 'mlp'"),
    ("--strategy", "freez", "Did you mean 'freeze'"),
])
def test_unknown_head_or_strategy_names_close_matches(folder: Path, tmp_path: Path, option, value, expected) -> None:
    result = tltk("finetune", "--backbone", "lenet5", "--weights", "none", option, value, "--data", str(folder),
                  "--out", str(tmp_path / "x"), *FAST)
    assert_one_sentence_error(result, expected)


def test_data_path_matching_no_format_is_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    result = tltk("finetune", "--backbone", "lenet5", "--data", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "x"), *FAST)
    assert_one_sentence_error(result, "No dataset format recognised", "notes.txt")


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "d", {"cat": 3, "dog": 3})
    (root / "bird").mkdir()
    result = tltk("finetune", "--backbone", "lenet5", "--data", str(root), "--out", str(tmp_path / "x"), *FAST)
    assert_one_sentence_error(result, "bird")


def test_a_single_class_is_refused(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "d", {"cat": 4})
    result = tltk("finetune", "--backbone", "lenet5", "--data", str(root), "--out", str(tmp_path / "x"), *FAST)
    assert_one_sentence_error(result, "at least 2")


def test_weights_of_the_wrong_shape_name_the_first_tensor(folder: Path, tmp_path: Path) -> None:
    from tltk.backbones import build_backbone

    state = build_backbone("lenet5").net.state_dict()
    state["features.3.weight"] = torch.zeros(16, 6, 3, 3)
    save_file(state, str(tmp_path / "w.safetensors"))
    result = tltk("finetune", "--backbone", "lenet5", "--weights", str(tmp_path / "w.safetensors"),
                  "--data", str(folder), "--out", str(tmp_path / "x"), *FAST)
    assert_one_sentence_error(result, "features.3.weight", "(16, 6, 3, 3)")
    assert not (tmp_path / "x").exists()


def test_out_holding_a_run_needs_overwrite(folder: Path, run_dir: Path) -> None:
    args = ["finetune", "--backbone", "lenet5", "--weights", "none", "--data", str(folder), "--out", str(run_dir), *FAST]
    assert_one_sentence_error(tltk(*args), "already holds a run", "--overwrite")


def test_undecodable_images_are_skipped_with_a_count_or_stop_the_run_under_strict(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "d", {"cat": 5, "dog": 5})
    bad = write_bad_images(root / "cat")
    args = ["finetune", "--backbone", "lenet5", "--weights", "none", "--data", str(root), *FAST]
    skipped = tltk(*args, "--out", str(tmp_path / "ok"))
    assert skipped.exit_code == 0, skipped.output
    assert "skipped 3 image(s)" in skipped.stderr and bad[0].name in skipped.stderr
    strict = tltk(*args, "--strict", "--out", str(tmp_path / "strict"))
    assert_one_sentence_error(strict, bad[0].name)
    assert not (tmp_path / "strict").exists()


def test_console_script_exits_non_zero_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tltk.cli", "evaluate", str(tmp_path / "missing-run")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "does not exist" in proc.stderr


def test_cli_reference_in_docs_matches_the_commands() -> None:
    import runpy

    docs = Path(__file__).resolve().parents[1] / "docs"
    generate = runpy.run_path(str(docs / "make_cli_reference.py"))["reference"]
    assert (docs / "cli.md").read_text() == generate(), "run: python docs/make_cli_reference.py"


def test_a_kaggle_csv_of_ids_without_extensions_trains_and_predicts_to_a_submission(tmp_path: Path) -> None:
    from data_fixtures import write_csv, write_image

    rows = []
    for i in range(18):
        label = ("circle", "square", "star")[i % 3]
        write_image(tmp_path / "comp" / "train" / f"id{i:03d}{('.jpg', '.png')[i % 2]}", CLASS_RGB[label])
        rows.append((f"id{i:03d}", label))
    labels = write_csv(tmp_path / "comp" / "train.csv", rows, header=("id", "label"))
    out = tmp_path / "run"
    result = tltk("finetune", "--backbone", "lenet5", "--weights", "none", "--data", f"csv:{labels}",
                  "--image-root", str(tmp_path / "comp" / "train"), "--out", str(out), *FAST)
    assert result.exit_code == 0, result.output
    result = tltk("predict", str(out), "--out", str(tmp_path / "sub.csv"), "--format", "kaggle", "--device", "cpu")
    assert result.exit_code == 0, result.output
    submitted = (tmp_path / "sub.csv").read_text().splitlines()
    assert submitted[0] == "id,label" and len(submitted) > 1
    assert {line.split(",")[0] for line in submitted[1:]} <= {image_id for image_id, _ in rows}


CLASS_RGB = {"circle": (255, 0, 0), "square": (0, 255, 0), "star": (0, 0, 255)}


# --- options given twice --------------------------------------------------------------------

LIST_OPTIONS = {("neighbors", "--query"), ("neighbors", "--query-index"), ("visualize gradcam", "--image")}


def every_command(group: click.Group, path: tuple[str, ...] = ()):
    """(the words that reach it, the command) for ``tltk`` and every command and group under it."""
    yield path, group
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from every_command(command, (*path, name))
        else:
            yield (*path, name), command


def single_valued_options():
    for path, command in every_command(main):
        for option in command.params:
            if isinstance(option, click.Option) and option.expose_value and not option.count:
                yield path, option


@pytest.mark.parametrize("path,option", list(single_valued_options()),
                         ids=lambda value: " ".join(value) if isinstance(value, tuple) else value.opts[-1])
def test_every_option_given_twice_is_a_list_or_refused_in_one_sentence(path: tuple[str, ...], option) -> None:
    name = option.opts[-1]
    if option.multiple:
        assert (" ".join(path), name) in LIST_OPTIONS | {(" ".join(path), o) for o in option.opts}
        return
    given = [name] if option.is_flag else [name, "1"]
    result = tltk(*path, *given, *given)
    assert_one_sentence_error(result, f"{name}", "is given more than once", "give", "once")


def test_only_the_options_that_take_lists_are_repeatable() -> None:
    repeatable = {(" ".join(path), option.opts[-1]) for path, option in single_valued_options() if option.multiple}
    assert LIST_OPTIONS <= repeatable
    assert {name for _, name in repeatable} == {"--query", "--query-index", "--backbone-opt", "--callback", "--head-opt",
                                              "--strategy-opt",
                                              "--callback-opt", "--image"}, repeatable


@pytest.mark.parametrize("args,fragment", [
    (["finetune", "--cache", "--no-cache"], "--cache/--no-cache is given more than once to `tltk finetune`; give one of them once"),
    (["finetune", "--epochs=3", "--epochs", "4"], "--epochs is given more than once to `tltk finetune`; it takes one value"),
    (["--debug", "--debug", "list"], "--debug is given more than once to `tltk`"),
    (["index", "STORE", "--recall-k", "5", "--recall-k", "6"], "--recall-k is given more than once to `tltk index`"),
])
def test_a_repeated_option_is_named_with_the_command(args: list[str], fragment: str) -> None:
    result = CliRunner().invoke(main, args, prog_name="tltk")
    assert_one_sentence_error(result, fragment)


def test_list_details_shows_the_help_of_tltks_own_options() -> None:
    heads = {r["name"]: r for r in json.loads(tltk("list", "heads", "--details", "--json").stdout)}
    assert heads["mlp"]["options"][0] == {"name": "hidden", "default": 512, "required": False,
                                          "help": "width of the hidden layer"}
    exporters = {r["name"]: r for r in json.loads(tltk("list", "exporters", "--details", "--json").stdout)}
    assert "sample_submission" in {o["name"] for o in exporters["kaggle"]["options"]}
    assert all(o["help"] for name in ("csv", "jsonl", "kaggle") for o in exporters[name]["options"])
