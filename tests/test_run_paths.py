"""A run directory finds its data from any working directory, and says where the data was when it has moved."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from data_fixtures import write_csv, write_image_folder
from test_resume import StopAt  # stands in for a crash after a given step

from tltk.cli import main
from tltk.train.finetune import DataOptions, FinetuneConfig, finetune
from tltk.train.trainer import TrainConfig

LAYOUT = {"cat": 10, "dog": 10, "bird": 10}
TRAIN = ["--backbone", "lenet5", "--weights", "none", "--epochs", "1", "--batch-size", "8", "--workers", "0",
         "--device", "cpu", "--quiet"]


def tltk(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def trained(tmp_path: Path, monkeypatch) -> Path:
    """A run trained from ``tmp_path/project`` on ``folder:data/photos``, a path relative to it."""
    project = tmp_path / "project"
    write_image_folder(project / "data" / "photos", LAYOUT)
    monkeypatch.chdir(project)
    result = tltk("finetune", *TRAIN, "--data", "folder:data/photos", "--out", "runs/a")
    assert result.exit_code == 0, result.output
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return project / "runs" / "a"


def config_data(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())["data"]


def test_the_run_records_the_data_path_absolute_and_the_spec_as_typed(trained: Path) -> None:
    photos = trained.parent.parent / "data" / "photos"
    config = json.loads((trained / "config.json").read_text())
    assert config["data"]["spec"] == f"folder:{photos}"
    assert config["data"]["spec_as_typed"] == "folder:data/photos"
    assert config["finetune"]["data"]["spec"] == f"folder:{photos}"  # what --resume rebuilds the run from


def test_a_run_evaluates_and_predicts_from_another_working_directory(trained: Path) -> None:
    result = tltk("evaluate", trained, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n"] == config_data(trained)["sizes"]["test"]
    result = tltk("predict", trained, "--out", "submission.csv", "--device", "cpu")
    assert result.exit_code == 0, result.output
    with open("submission.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert len(rows) == 1 + report["n"]


def test_the_pictures_of_a_run_read_its_data_from_another_working_directory(trained: Path) -> None:
    result = tltk("visualize", "misclassified", trained, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    result = tltk("visualize", "activations", trained, "--layer", "conv1", "--class-average", "--per-class", "2",
                  "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == 6


def test_the_runs_own_spec_typed_again_from_its_folder_keeps_its_class_filter(tmp_path: Path, monkeypatch) -> None:
    project = tmp_path / "project"
    write_image_folder(project / "data" / "photos", LAYOUT)
    monkeypatch.chdir(project)
    assert tltk("finetune", *TRAIN, "--data", "folder:data/photos", "--classes", "cat,dog", "--out", "run").exit_code == 0
    result = tltk("evaluate", "run", "--data", "folder:data/photos", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n"] == config_data(project / "run")["sizes"]["test"]


def test_extract_with_a_run_as_source_reads_its_data_from_another_working_directory(trained: Path) -> None:
    result = tltk("extract", trained, "--layer", "fc7", "--split", "test", "--out", "store", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads((Path("store") / "manifest.json").read_text())
    assert manifest["data"][0]["spec"] == config_data(trained)["spec"]


def test_moved_data_is_one_sentence_naming_the_recorded_path_and_how_to_give_the_new_place(trained: Path) -> None:
    photos = trained.parent.parent / "data" / "photos"
    moved = trained.parent.parent / "moved"
    photos.rename(moved)
    for command in (["evaluate", trained], ["predict", trained, "--out", "p.csv"],
                    ["extract", trained, "--layer", "fc7", "--out", "store"]):
        result = tltk(*command, "--device", "cpu")
        assert result.exit_code == 2, result.output
        message = " ".join(result.output.split())
        assert f"at {photos}" in message and "(--data folder:data/photos)" in message, message
        assert "give its new place with --data folder:NEW_PATH" in message, message
        assert "Traceback" not in result.output and result.output.count("error:") == 1
    result = tltk("evaluate", trained, "--data", f"folder:{moved}", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n"] == config_data(trained)["sizes"]["test"]


def test_the_advice_for_moved_data_carries_the_runs_class_filter(tmp_path: Path, monkeypatch) -> None:
    write_image_folder(tmp_path / "photos", LAYOUT)
    monkeypatch.chdir(tmp_path)
    assert tltk("finetune", *TRAIN, "--data", "photos", "--classes", "cat,dog", "--out", "run").exit_code == 0
    shutil.rmtree(tmp_path / "photos")
    result = tltk("evaluate", "run", "--device", "cpu")
    assert result.exit_code == 2
    assert "--data folder:NEW_PATH --classes cat,dog" in " ".join(result.output.split())


def test_a_relative_image_root_is_recorded_absolute(tmp_path: Path, monkeypatch) -> None:
    project = tmp_path / "project"
    write_image_folder(project / "images", LAYOUT)
    write_csv(project / "labels.csv", [(f"{c}/{c}_{i}.png", c) for c, n in LAYOUT.items() for i in range(n)])
    monkeypatch.chdir(project)
    result = tltk("finetune", *TRAIN, "--data", "csv:labels.csv", "--image-root", "images", "--out", "run")
    assert result.exit_code == 0, result.output
    assert config_data(project / "run")["image_root"] == str(project / "images")
    monkeypatch.chdir(tmp_path)
    result = tltk("evaluate", "project/run", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    (project / "images").rename(project / "pictures")
    result = tltk("evaluate", "project/run", "--device", "cpu")
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert f"--image-root {project / 'images'}" in message and "--image-root NEW_PATH" in message, message
    result = tltk("evaluate", "project/run", "--image-root", "project/pictures", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output


def test_a_run_that_recorded_a_relative_path_loads_from_its_folder_and_says_so_elsewhere(trained: Path,
                                                                                       monkeypatch) -> None:
    # Runs written before paths were recorded absolute hold the spec as typed, relative to where they trained.
    config = json.loads((trained / "config.json").read_text())
    config["data"]["spec"] = config["finetune"]["data"]["spec"] = "folder:data/photos"
    del config["data"]["spec_as_typed"], config["finetune"]["data"]["spec_as_typed"]
    (trained / "config.json").write_text(json.dumps(config))
    result = tltk("evaluate", trained, "--device", "cpu")
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "records its data as folder:data/photos, a path relative to the folder it was trained in" in message
    assert "run the command from that folder" in message
    monkeypatch.chdir(trained.parent.parent)
    result = tltk("evaluate", trained, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output


def test_an_interrupted_run_resumes_from_another_working_directory(tmp_path: Path, monkeypatch) -> None:
    write_image_folder(tmp_path / "project" / "photos", LAYOUT)
    monkeypatch.chdir(tmp_path / "project")
    train = TrainConfig(epochs=2, batch_size=8, workers=0, device="cpu")
    config = FinetuneConfig(backbone="lenet5", weights="none", data=DataOptions("folder:photos"), train=train)
    with pytest.raises(KeyboardInterrupt):
        finetune(config, "run", checkpoint_every=1, callbacks=[StopAt(2)])
    monkeypatch.chdir(tmp_path)
    result = tltk("finetune", "--resume", "project/run", "--quiet")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "project" / "run" / "summary.json").is_file()
