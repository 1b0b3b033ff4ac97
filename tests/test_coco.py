"""COCO-format data as image-level multi-label classification: reading, errors, and a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import average_precision_score

from coco_fixtures import CATEGORIES, coco_document, write_coco
from tltk.cli import main
from tltk.data import load_data
from tltk.errors import DataError

PERSON, CAR, DOG = 0, 1, 2  # columns, in COCO id order (1, 3, 18)


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return write_coco(tmp_path_factory.mktemp("coco"))


def targets_by_id(data) -> dict[str, tuple[int, ...]]:
    return {s.id: s.target for s in data.train + data.val + data.test}


def rewrite(file: Path, change) -> None:
    document = json.loads(file.read_text())
    change(document)
    file.write_text(json.dumps(document))


# --- reading -----------------------------------------------------------------------------------


def test_coco_is_detected_with_its_splits_and_categories_in_id_order(coco: Path) -> None:
    data = load_data(str(coco), test_split=0.25)
    assert data.format == "coco" and data.task == "multilabel"
    assert data.class_names == ["person", "car", "dog"]
    assert {s.id.split("/")[0] for s in data.val} == {"val2017"}
    assert {s.id.split("/")[0] for s in data.train + data.test} == {"train2017"}
    assert (len(data.train) + len(data.test), len(data.val)) == (14, 7)


def test_an_image_is_positive_per_category_and_ignored_where_it_has_only_crowds(coco: Path) -> None:
    targets = targets_by_id(load_data(f"coco:{coco}"))
    assert targets["train2017/000000001000.jpg"] == (1, 0, 0)  # image 0: a person
    assert targets["train2017/000000001001.jpg"] == (0, 1, -1)  # image 1: a car and a crowd of dogs
    assert targets["train2017/000000001006.jpg"] == (0, 0, 0)  # image 6: nothing annotated


@pytest.mark.parametrize("mode,expected", [("positive", 1), ("negative", 0), ("ignore", -1)])
def test_voc_difficult_decides_how_crowd_only_categories_count(coco: Path, mode: str, expected: int) -> None:
    assert targets_by_id(load_data(f"coco:{coco}", difficult=mode))["train2017/000000001001.jpg"][DOG] == expected


def test_a_crowd_beside_a_single_instance_of_the_same_category_stays_positive(tmp_path: Path) -> None:
    root = write_coco(tmp_path, instances=lambda i: [(list(CATEGORIES)[i % 3], True), (list(CATEGORIES)[i % 3], False)])
    assert targets_by_id(load_data(f"coco:{root}"))["train2017/000000001000.jpg"] == (1, 0, 0)


def test_a_lone_annotation_file_of_another_name_is_the_whole_dataset_with_images_beside_it(tmp_path: Path) -> None:
    root = write_coco(tmp_path, splits={"default": 20})
    (root / "default").rename(root / "images")  # CVAT's export: annotations/instances_default.json and images/
    data = load_data(f"coco:{root}")
    assert len(data.train) + len(data.val) + len(data.test) == 20
    assert data.train[0].id.startswith("images/")


def test_image_root_points_at_the_images_elsewhere(tmp_path: Path) -> None:
    root = write_coco(tmp_path, splits={"train2017": 12})
    (root / "train2017").rename(tmp_path / "pictures")
    data = load_data(f"coco:{root}", image_root=str(tmp_path / "pictures"))
    assert data.skipped == [] and len(data.train + data.val + data.test) == 12


def test_classes_leaves_out_a_category_without_instances(tmp_path: Path) -> None:
    root = write_coco(tmp_path, instances=lambda i: [((1, 3)[i % 2], False)])
    with pytest.raises(DataError, match="Class 'dog' has no samples .*leave it out with --classes"):
        load_data(f"coco:{root}")
    data = load_data(f"coco:{root}", classes=["person", "car"])
    assert data.class_names == ["person", "car"] and {len(s.target) for s in data.train} == {2}


# --- files that cannot be used -----------------------------------------------------------------

TRAIN = "annotations/instances_train2017.json"


@pytest.mark.parametrize("text,message", [
    ('{"images": [', r"instances_train2017\.json is not valid JSON \(Expecting value at line 1, column 13\)"),
    ("[1, 2]", "holds a JSON list, not the object of a COCO annotation file"),
    ('{"images": [], "annotations": []}', "has no 'categories' list"),
    ("[" * 100_000 + "]" * 100_000, "not the object|nests JSON too deeply"),
    (b"\xff\xfe{}", "is not UTF-8 text"),
])
def test_an_annotation_file_that_is_not_coco_json_is_one_error(tmp_path: Path, text, message: str) -> None:
    root = write_coco(tmp_path)
    file = root / TRAIN
    file.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DataError, match=message):
        load_data(f"coco:{root}")


@pytest.mark.parametrize("change,message", [
    (lambda d: d["annotations"][2].update(category_id=99), r"annotations\[2\] has category_id 99, which categories does not list"),
    (lambda d: d["annotations"][0].update(image_id=5), r"annotations\[0\] is of image 5, which images does not list"),
    (lambda d: d["annotations"][1].update(iscrowd="yes"), r'annotations\[1\] has iscrowd "yes"; COCO writes 0 or 1'),
    (lambda d: d["annotations"][1].pop("category_id"), r"annotations\[1\] has category_id null, not an integer"),
    (lambda d: d["images"][3].update(id=d["images"][2]["id"]), r"images\[3\] repeats image id"),
    (lambda d: d["images"][0].update(file_name="../../etc/passwd"), r"images\[0\] has file_name '../../etc/passwd', which leaves"),
    (lambda d: d["categories"].append({"id": 40, "name": "dog"}), r"categories\[3\] repeats category name 'dog'"),
    (lambda d: d["categories"][0].update(name=""), r"categories\[0\] has name \"\", not a non-empty string"),
    (lambda d: d.update(annotations={"a": 1}), "has a dict for its 'annotations' list"),
    (lambda d: d["annotations"].append(7), r"annotations\[\d+\] is a JSON int, not an object"),
])
def test_a_wrong_entry_names_the_file_and_the_entry(tmp_path: Path, change, message: str) -> None:
    root = write_coco(tmp_path)
    rewrite(root / TRAIN, change)
    with pytest.raises(DataError, match=message):
        load_data(f"coco:{root}")


def test_splits_with_different_categories_are_one_error(tmp_path: Path) -> None:
    root = write_coco(tmp_path)
    rewrite(root / "annotations" / "instances_val2017.json", lambda d: d["categories"][2].update(name="cat"))
    with pytest.raises(DataError, match="instances_train2017.json and .*instances_val2017.json list different categories"):
        load_data(f"coco:{root}")


@pytest.mark.parametrize("extra,message", [
    ("instances_train2014.json", "are both train annotations"),
    ("instances_minival2014.json", "instances_minival2014.json is not a train, val or test file"),
])
def test_annotation_files_that_do_not_make_one_split_each_are_one_error(tmp_path: Path, extra: str, message: str) -> None:
    root = write_coco(tmp_path)
    (root / "annotations" / extra).write_text((root / TRAIN).read_text())
    with pytest.raises(DataError, match=message):
        load_data(f"coco:{root}")


def test_annotations_without_a_train_file_say_so(tmp_path: Path) -> None:
    root = write_coco(tmp_path)
    (root / TRAIN).unlink()
    with pytest.raises(DataError, match="no instances_train\\*.json; add the training annotations"):
        load_data(f"coco:{root}")


def test_an_annotation_file_given_as_the_path_points_at_its_folder(tmp_path: Path) -> None:
    root = write_coco(tmp_path)
    with pytest.raises(DataError, match=f"is a file; give coco: the folder that holds annotations/ \\(coco:{root}\\)"):
        load_data(f"coco:{root / TRAIN}")


def test_images_that_are_nowhere_name_the_folders_looked_in(tmp_path: Path) -> None:
    root = write_coco(tmp_path)
    (root / "val2017").rename(root / "elsewhere")
    with pytest.raises(DataError, match=r"No image folder for .*instances_val2017\.json.*give --image-root"):
        load_data(f"coco:{root}")


def test_an_annotation_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path: Path, monkeypatch) -> None:
    import tltk.data.coco as coco_format

    root = write_coco(tmp_path)
    monkeypatch.setattr(coco_format, "MAX_ANNOTATION_BYTES", 1024)
    monkeypatch.setattr(coco_format.json, "loads", lambda *a, **k: pytest.fail("read a file over the limit"))
    with pytest.raises(DataError, match="instances_.*2017.json is .* GiB, over the .* tltk reads from one annotation file"):
        load_data(f"coco:{root}")


# --- a run ----------------------------------------------------------------------------------


def test_a_coco_run_trains_evaluates_and_its_map_agrees_with_scikit_learn(tmp_path: Path) -> None:
    root = write_coco(tmp_path, splits={"train2017": 24, "val2017": 8, "test2017": 12})
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(main, [
        "finetune", "--backbone", "lenet5", "--weights", "none", "--data", f"coco:{root}", "--out", str(out),
        "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(runner.invoke(main, ["evaluate", str(out), "--device", "cpu", "--json"], catch_exceptions=False).stdout)
    assert sorted(r["class"] for r in report["per_class"]) == ["car", "dog", "person"]
    predictions = tmp_path / "test.jsonl"
    result = runner.invoke(main, ["predict", str(out), "--format", "jsonl", "--out", str(predictions), "--device", "cpu"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    targets = targets_by_id(load_data(f"coco:{root}"))
    labels = np.array([targets[row["id"]] for row in rows])
    scores = np.array([[row["probabilities"][name] for name in ("person", "car", "dog")] for row in rows])
    aps = [average_precision_score(labels[keep, c] == 1, scores[keep, c])
           for c in range(3) for keep in [labels[:, c] != -1] if (labels[keep, c] == 1).any()]
    assert report["map"] == pytest.approx(float(np.mean(aps)), abs=1e-6)
