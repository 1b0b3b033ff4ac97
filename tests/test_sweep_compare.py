"""`tltk sweep lr` and `tltk compare`: tables and plots whose numbers are read back from the runs themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from tltk.cli import main
from tltk.errors import TltkError
from tltk.sweep import sweep, with_value
from tltk.train.finetune import DataOptions, FinetuneConfig
from tltk.viz import compare
from tltk.viz.curves import metric_figure, read_run_metrics

TINY = ["--backbone", "lenet5", "--weights", "none", "--data", "builtin:digits", "--classes", "0,1,2",
        "--train-per-class", "8", "--epochs", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu"]
VALUES = [1e-3, 3e-2]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tltk(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def epoch_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"epoch"' in line
            and json.loads(line)["kind"] == "epoch"]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def assert_png(path: str | Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 400 and image.size[1] >= 300, image.size


def run_sweep(root: Path, *extra: str) -> dict:
    result = tltk("sweep", "lr", *TINY, *extra, "--values", ",".join(map(str, VALUES)), "--out-root", str(root),
                  "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def multiclass_sweep(tmp_path_factory) -> dict:
    return run_sweep(tmp_path_factory.mktemp("sweeps") / "mc")


@pytest.fixture(scope="module")
def multilabel_sweep(tmp_path_factory) -> dict:
    return run_sweep(tmp_path_factory.mktemp("sweeps") / "ml", "--task", "multilabel")


# --- sweep ---------------------------------------------------------------------------------


def test_sweep_trains_one_run_per_value_with_that_learning_rate_and_the_same_seed(multiclass_sweep: dict) -> None:
    runs = [Path(row["run"]) for row in multiclass_sweep["rows"]]
    assert [r.name for r in runs] == ["lr_0.001", "lr_0.03"]
    configs = [json.loads((r / "config.json").read_text()) for r in runs]
    assert [c["train"]["lr"] for c in configs] == VALUES
    assert {c["train"]["seed"] for c in configs} == {0}
    first_losses = [json.loads((r / "metrics.jsonl").read_text().splitlines()[0])["loss"] for r in runs]
    assert first_losses[0] == first_losses[1]  # same initial weights and first batch: the lr acts only after step 1


def test_sweep_table_holds_each_runs_final_validation_and_test_figures(multiclass_sweep: dict) -> None:
    for row, value in zip(multiclass_sweep["rows"], VALUES):
        run = Path(row["run"])
        last = epoch_rows(run)[-1]
        assert row["lr"] == value
        assert row["final_val_accuracy"] == last["val_accuracy"] and row["final_val_loss"] == last["val_loss"]
        assert row["test_accuracy"] == summary(run)["test"]["accuracy"]
        assert row["best_epoch"] == summary(run)["best_epoch"]
    written = json.loads((Path(multiclass_sweep["out_root"]) / "sweep.json").read_text())
    assert written == {"param": "lr", "rows": multiclass_sweep["rows"]}


def test_sweep_plot_draws_the_final_validation_metric_against_the_learning_rate(multiclass_sweep: dict) -> None:
    rows = multiclass_sweep["rows"]
    figure = compare.sweep_figure(rows, "lr")
    ax = figure.axes[0]
    (curve,) = [ln for ln in ax.get_lines() if ln.get_label() == "final val accuracy"]
    assert list(curve.get_xdata()) == VALUES
    assert list(curve.get_ydata()) == [epoch_rows(Path(r["run"]))[-1]["val_accuracy"] for r in rows]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "learning rate (lr)"
    assert ax.get_ylabel() == "final validation accuracy" and ax.get_legend() is not None and ax.get_title()
    assert_png(Path(multiclass_sweep["out_root"]) / "sweep.png")


def test_multilabel_sweep_plots_validation_map(multilabel_sweep: dict) -> None:
    rows = multilabel_sweep["rows"]
    for row in rows:
        assert row["final_val_map"] == epoch_rows(Path(row["run"]))[-1]["val_map"]
        assert row["test_map"] == summary(Path(row["run"]))["test"]["map"]
    ax = compare.sweep_figure(rows, "lr").axes[0]
    (curve,) = [ln for ln in ax.get_lines() if ln.get_label() == "final val mAP"]
    assert list(curve.get_ydata()) == [r["final_val_map"] for r in rows]
    assert ax.get_ylabel() == "final validation mAP"
    assert_png(Path(multilabel_sweep["out_root"]) / "sweep.png")


def test_sweep_prints_a_table_people_can_read(tmp_path: Path, multiclass_sweep: dict) -> None:
    from tltk.cli.viz import print_table

    rows = multiclass_sweep["rows"]
    runner = CliRunner()
    with runner.isolation() as (stdout, _, _):
        print_table("sweep", rows, ["lr", *compare.metric_columns(rows)])
        text = stdout.getvalue().decode()
    assert "val accuracy" in text and f"{rows[1]['final_val_accuracy']:.4f}" in text and "0.03" in text


def test_sweep_values_that_are_not_numbers_are_one_sentence(tmp_path: Path) -> None:
    result = tltk("sweep", "lr", *TINY, "--values", "1e-3,fast", "--out-root", str(tmp_path / "s"))
    assert result.exit_code == 2 and "must be numbers separated by commas" in result.stderr
    assert not (tmp_path / "s").exists()


def test_sweep_of_an_unknown_setting_names_the_ones_there_are() -> None:
    base = FinetuneConfig(backbone="lenet5", data=DataOptions("builtin:digits"))
    assert with_value(base, "lr", 0.5).train.lr == 0.5 and base.train.lr != 0.5
    with pytest.raises(TltkError, match="cannot sweep 'learning_rate'.*choose one of"):
        with_value(base, "learning_rate", 0.5)


def test_sweep_checks_every_runs_head_options_before_the_first_run(tmp_path: Path) -> None:
    """`hidden` suits the mlp head but not the linear one: the sweep refuses before training anything."""
    base = FinetuneConfig(backbone="lenet5", data=DataOptions("builtin:digits"), head_options={"hidden": 16})
    with pytest.raises(TltkError, match=r"^head 'linear' has no option 'hidden'"):
        sweep(base, "head", ["mlp", "linear"], tmp_path / "s")
    assert not (tmp_path / "s").exists()


# --- compare ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def all_runs(multiclass_sweep: dict, multilabel_sweep: dict) -> list[Path]:
    return [Path(row["run"]) for row in multiclass_sweep["rows"] + multilabel_sweep["rows"]]


def test_compare_table_reads_settings_and_final_figures_from_each_run(all_runs: list[Path], tmp_path: Path) -> None:
    result = tltk("compare", *map(str, all_runs), "--out", str(tmp_path / "c.png"), "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [row["name"] for row in rows] == ["mc/lr_0.001", "mc/lr_0.03", "ml/lr_0.001", "ml/lr_0.03"]
    for row, run in zip(rows, all_runs):
        config, last, final = json.loads((run / "config.json").read_text()), epoch_rows(run)[-1], summary(run)
        assert (row["backbone"], row["head"], row["strategy"]) == ("lenet5", "linear", "finetune")
        assert row["lr"] == config["train"]["lr"] and row["batch_size"] == 8 and row["seed"] == 0
        assert row["data"] == "builtin:digits [0,1,2], 8/class"
        assert row["final_val_loss"] == last["val_loss"]
        metric = "accuracy" if "val_accuracy" in last else "map"
        assert row[f"final_val_{metric}"] == last[f"val_{metric}"]
        assert row[f"test_{metric}"] == final["test"][metric]
    assert rows[0]["final_val_map"] is None and rows[2]["final_val_accuracy"] is None
    assert_png(tmp_path / "c.png")


def test_compare_table_shows_what_differs_and_says_once_what_is_shared(all_runs: list[Path]) -> None:
    rows = compare.compare_runs(all_runs)
    columns, shared = compare.table_layout(rows)
    assert columns[:2] == ["name", "lr"]
    assert {"final_val_accuracy", "final_val_map", "test_accuracy", "test_map"} <= set(columns)
    assert shared["backbone"] == "lenet5" and shared["seed"] == 0 and "lr" not in shared
    table = compare.markdown_table(rows, ["name", "lr", "final_val_accuracy"])
    lines = table.splitlines()
    assert lines[0] == "| name | lr | val accuracy |" and lines[1] == "|---|---:|---:|"
    assert lines[2] == f"| mc/lr_0.001 | 0.001 | {rows[0]['final_val_accuracy']:.4f} |"
    assert lines[4].endswith("| - |")  # a multi-label run has no accuracy


def test_compare_overlays_each_runs_curves_and_gives_mAP_its_own_panel(all_runs: list[Path]) -> None:
    figure = compare.compare_figure(all_runs)
    panels = {ax.get_title(): ax for ax in figure.axes if ax.get_visible()}
    assert set(panels) == {"train loss (smoothed, per step)", "val loss per epoch", "val accuracy per epoch",
                           "val mAP per epoch"}
    accuracy = {ln.get_label(): list(ln.get_ydata()) for ln in panels["val accuracy per epoch"].get_lines()}
    assert accuracy == {f"mc/{r.name}": [e["val_accuracy"] for e in epoch_rows(r)] for r in all_runs[:2]}
    mean_ap = {ln.get_label(): list(ln.get_ydata()) for ln in panels["val mAP per epoch"].get_lines()}
    assert mean_ap == {f"ml/{r.name}": [e["val_map"] for e in epoch_rows(r)] for r in all_runs[2:]}
    for ax in panels.values():
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_legend() is not None
    assert figure._suptitle.get_text().startswith("Comparison of 4 runs")


def test_multilabel_run_gets_an_mAP_curve_from_tltk_plot(all_runs: list[Path], tmp_path: Path) -> None:
    run = all_runs[2]
    result = tltk("plot", str(run), "--out", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    assert sorted(Path(p).name for p in json.loads(result.stdout)["plots"]) == ["loss.png", "lr.png", "metrics.png"]
    ax = metric_figure(read_run_metrics(run), "ml").axes[0]
    (curve,) = [ln for ln in ax.get_lines() if ln.get_label() == "val mAP"]
    assert list(curve.get_ydata()) == [e["val_map"] for e in epoch_rows(run)]


def test_runs_with_the_same_directory_name_are_told_apart_by_their_parents(tmp_path: Path) -> None:
    assert compare.run_labels([tmp_path / "a" / "run", tmp_path / "b" / "run"]) == ["a/run", "b/run"]
    assert compare.run_labels([tmp_path / "x", tmp_path / "y"]) == ["x", "y"]


def test_compare_of_a_missing_run_is_one_sentence(all_runs: list[Path], tmp_path: Path) -> None:
    result = tltk("compare", str(all_runs[0]), str(tmp_path / "nope"), "--out", str(tmp_path / "c.png"))
    assert result.exit_code == 2 and "does not exist" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "c.png").exists()


def test_table_numbers_read_as_people_write_them() -> None:
    assert compare.format_value(0.001) == "0.001" and compare.format_value(1e-5) == "1e-05"
    assert compare.format_value(0.907, metric=True) == "0.9070" and compare.format_value(None) == "-"
