"""Multi-label data (VOC, CSV), AP/mAP against scikit-learn and the VOC devkit, training, evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import average_precision_score

from tltk.cli import main
from tltk.data import load_data
from tltk.data.voc import VOC_CLASSES
from tltk.errors import DataError
from tltk.train.losses import MaskedBCEWithLogits, auto_pos_weight
from tltk.metrics import average_precision, multilabel_report, voc07_average_precision
from voc_fixtures import BILLION_LAUGHS, annotation_xml, write_voc


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return write_voc(tmp_path_factory.mktemp("voc"))


# --- reading VOC --------------------------------------------------------------------------


def test_voc_is_detected_and_uses_its_image_sets(voc: Path) -> None:
    data = load_data(str(voc))
    assert data.format == "voc" and data.task == "multilabel"
    assert data.class_names == list(VOC_CLASSES)
    assert (len(data.train), len(data.val), len(data.test)) == (20, 10, 10)
    assert data.train[0].id == "JPEGImages/000001.jpg"


def test_an_image_is_positive_for_each_class_it_shows_and_ignored_where_only_difficult(voc: Path) -> None:
    first = load_data(f"voc:{voc}").train[0]  # image 0: aeroplane, and a difficult cat (index 7)
    assert first.target[VOC_CLASSES.index("aeroplane")] == 1
    assert first.target[VOC_CLASSES.index("cat")] == -1
    assert first.target.count(0) == 18
    second = load_data(f"voc:{voc}").train[1]  # image 1: bicycle and a non-difficult chair
    assert second.target[VOC_CLASSES.index("bicycle")] == 1 and second.target[VOC_CLASSES.index("chair")] == 1


@pytest.mark.parametrize("mode,expected", [("positive", 1), ("negative", 0), ("ignore", -1)])
def test_voc_difficult_option_decides_how_difficult_only_classes_count(voc: Path, mode: str, expected: int) -> None:
    first = load_data(f"voc:{voc}", difficult=mode).train[0]
    assert first.target[VOC_CLASSES.index("cat")] == expected


def test_a_difficult_object_beside_a_normal_one_of_the_same_class_stays_positive(tmp_path: Path) -> None:
    root = write_voc(tmp_path, images=40, objects=lambda i: [(VOC_CLASSES[i % 20], True), (VOC_CLASSES[i % 20], False)])
    assert load_data(f"voc:{root}").train[0].target[0] == 1


def test_the_pascal_classes_are_alphabetical_so_sorting_annotation_names_keeps_their_order() -> None:
    assert list(VOC_CLASSES) == sorted(VOC_CLASSES)


EXPORT_CLASSES = ("vest", "hardhat", "Person")


def export_objects(index: int) -> list[tuple[str, bool]]:
    """An annotation tool's export: image i shows class i % 3 and, every other image, a difficult (i + 1) % 3."""
    first, second = EXPORT_CLASSES[index % 3], EXPORT_CLASSES[(index + 1) % 3]
    return [(first, False)] + ([(second, True)] if index % 2 else [])


def test_a_voc_export_with_its_own_classes_reads_them_sorted_from_the_annotations(tmp_path: Path) -> None:
    data = load_data(f"voc:{write_voc(tmp_path, images=12, objects=export_objects)}")
    assert data.class_names == ["Person", "hardhat", "vest"]
    targets = {s.id: s.target for s in data.train}
    assert targets["JPEGImages/000001.jpg"] == (0, 0, 1)  # image 0: vest
    assert targets["JPEGImages/000002.jpg"] == (-1, 1, 0)  # image 1: hardhat, a difficult Person


def test_a_voc_folder_with_some_pascal_classes_has_just_those(tmp_path: Path) -> None:
    root = write_voc(tmp_path, images=8, objects=lambda i: [(("person", "car")[i % 2], False)])
    assert load_data(f"voc:{root}").class_names == ["car", "person"]


@pytest.mark.parametrize("label_file", ["labels.txt", "classes.txt"])
def test_a_label_file_beside_imagesets_gives_the_classes_and_their_order(tmp_path: Path, label_file: str) -> None:
    root = write_voc(tmp_path, images=12, objects=export_objects)
    (root / "VOC2007" / label_file).write_text("# from labelImg\nvest\nhardhat\n\nPerson\n")
    data = load_data(f"voc:{root}")
    assert data.class_names == list(EXPORT_CLASSES)
    assert {s.id: s.target for s in data.train}["JPEGImages/000002.jpg"] == (0, 1, -1)


def test_annotation_naming_a_class_the_label_file_lacks_names_file_line_and_label_file(tmp_path: Path) -> None:
    root = write_voc(tmp_path)
    (root / "VOC2007" / "labels.txt").write_text("\n".join(VOC_CLASSES))
    xml = root / "VOC2007" / "Annotations" / "000003.xml"
    xml.write_text(annotation_xml("000003", [("person", False), ("unicorn", False)]))
    with pytest.raises(DataError, match=r"000003\.xml:13 names class 'unicorn', which is not listed in .*labels\.txt"):
        load_data(f"voc:{root}")


def test_a_labelled_class_without_objects_can_be_left_out_with_classes(tmp_path: Path) -> None:
    root = write_voc(tmp_path, images=12, objects=export_objects)
    (root / "VOC2007" / "labels.txt").write_text("vest\nhardhat\nPerson\ngloves\n")
    with pytest.raises(DataError, match="Class 'gloves' has no samples .*leave it out with --classes"):
        load_data(f"voc:{root}")
    data = load_data(f"voc:{root}", classes=["vest", "hardhat", "Person"])
    assert data.class_names == list(EXPORT_CLASSES) and {len(s.target) for s in data.train} == {3}


def test_classes_naming_a_class_the_voc_export_lacks_lists_the_known_ones(tmp_path: Path) -> None:
    root = write_voc(tmp_path, images=12, objects=export_objects)
    with pytest.raises(DataError, match="'gloves' in --classes .*known classes: Person, hardhat, vest"):
        load_data(f"voc:{root}", classes=["vest", "gloves"])


@pytest.mark.parametrize("files,message", [
    ({"labels.txt": "vest\nhardhat\n", "classes.txt": "hardhat\nvest\n"}, "list different classes"),
    ({"labels.txt": "vest\nvest\n"}, "lists class 'vest' twice"),
    ({"labels.txt": "\n# nothing yet\n"}, "lists no classes"),
])
def test_a_label_file_that_cannot_be_used_is_one_error(tmp_path: Path, files: dict[str, str], message: str) -> None:
    root = write_voc(tmp_path, images=12, objects=export_objects)
    for name, text in files.items():
        (root / "VOC2007" / name).write_text(text)
    with pytest.raises(DataError, match=message):
        load_data(f"voc:{root}")


def test_an_object_without_a_class_name_is_one_error(tmp_path: Path) -> None:
    root = write_voc(tmp_path)
    (root / "VOC2007" / "Annotations" / "000002.xml").write_text(annotation_xml("000002", [(" ", False)]))
    with pytest.raises(DataError, match=r"000002\.xml:\d+ has an object without a class <name>"):
        load_data(f"voc:{root}")


def test_image_listed_without_its_jpeg_names_the_listing_line(tmp_path: Path) -> None:
    root = write_voc(tmp_path)
    (root / "VOC2007" / "JPEGImages" / "000002.jpg").unlink()
    with pytest.raises(DataError, match=r"train\.txt:2 lists image 000002"):
        load_data(f"voc:{root}")


def test_entity_expansion_bomb_is_refused_not_expanded(tmp_path: Path) -> None:
    root = write_voc(tmp_path)
    (root / "VOC2007" / "Annotations" / "000001.xml").write_text(BILLION_LAUGHS)
    with pytest.raises(DataError, match="refused"):
        load_data(f"voc:{root}")


def test_malformed_annotation_is_one_error(tmp_path: Path) -> None:
    root = write_voc(tmp_path)
    (root / "VOC2007" / "Annotations" / "000001.xml").write_text("<annotation><object>")
    with pytest.raises(DataError, match="not well-formed"):
        load_data(f"voc:{root}")


# --- multi-label CSV ------------------------------------------------------------------------


def _images(folder: Path, names: list[str]) -> None:
    for name in names:
        Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / name)


def test_csv_with_a_space_separated_labels_column_is_multilabel(tmp_path: Path) -> None:
    names = [f"im{i}.png" for i in range(10)]
    _images(tmp_path, names)
    rows = ["cat dog", "dog", "cat", "bird cat", "dog", "bird", "cat dog bird", "dog", "cat", "bird"]
    (tmp_path / "labels.csv").write_text("filename,labels\n" + "".join(f"{n},{r}\n" for n, r in zip(names, rows)))
    data = load_data(str(tmp_path / "labels.csv"), test_split=0.0, val_split=0.0)
    assert data.task == "multilabel" and data.class_names == ["bird", "cat", "dog"]
    assert dict((s.id, s.target) for s in data.train)["im6.png"] == (1, 1, 1)
    assert dict((s.id, s.target) for s in data.train)["im1.png"] == (0, 0, 1)


def test_csv_with_one_indicator_column_per_class_is_multilabel(tmp_path: Path) -> None:
    names = [f"im{i}.png" for i in range(6)]
    _images(tmp_path, names)
    rows = ["1,0", "0,1", "1,1", "1,0", "0,1", "1,1"]
    (tmp_path / "l.csv").write_text("image,sunny,cloudy\n" + "".join(f"{n},{r}\n" for n, r in zip(names, rows)))
    data = load_data(f"csv:{tmp_path / 'l.csv'}", test_split=0.0, val_split=0.0)
    assert data.class_names == ["sunny", "cloudy"]
    assert dict((s.id, s.target) for s in data.train)["im2.png"] == (1, 1)


def test_csv_indicator_value_that_is_not_0_or_1_names_row_and_column(tmp_path: Path) -> None:
    _images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "l.csv").write_text("image,sunny,cloudy\na.png,1,0\nb.png,1,yes\n")
    with pytest.raises(DataError, match="Row 3 .* 'yes' in class column 'cloudy'"):
        load_data(f"csv:{tmp_path / 'l.csv'}")


# --- average precision ------------------------------------------------------------------------


def test_ap_matches_a_hand_computed_value() -> None:
    # ranked: +, -, +, -  -> precision at the hits 1 and 2/3, each half the recall
    assert average_precision(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.6])) == pytest.approx(5 / 6)


def test_tied_scores_form_one_threshold_as_in_scikit_learn() -> None:
    labels, scores = np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.5, 0.1])
    assert average_precision(labels, scores) == pytest.approx(2 / 3)
    assert average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores))


@pytest.mark.parametrize("seed", range(6))
def test_ap_agrees_with_scikit_learn_on_random_scores_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    labels[0] = 1
    scores = rng.integers(0, 6, 60) / 5.0 if seed % 2 else rng.random(60)
    assert average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_voc07_eleven_point_ap_matches_the_worked_example() -> None:
    # precision after each of + - + - +: 1, .5, .667, .5, .6; recall 1/3, 1/3, 2/3, 2/3, 1
    # t = 0..0.3 -> 1 (4 points); t = 0.4..0.6 -> 2/3 (3 points); t = 0.7..1 -> 0.6 (4 points)
    labels, scores = np.array([1, 0, 1, 0, 1]), np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    assert voc07_average_precision(labels, scores) == pytest.approx((4 * 1 + 3 * (2 / 3) + 4 * 0.6) / 11)


def test_ignored_labels_are_left_out_of_the_ranking() -> None:
    with_ignored = average_precision(np.array([1, -1, 0, 1]), np.array([0.9, 0.8, 0.7, 0.6]))
    assert with_ignored == pytest.approx(average_precision(np.array([1, 0, 1]), np.array([0.9, 0.7, 0.6])))


def test_a_class_without_positives_has_no_ap_and_is_left_out_of_map() -> None:
    targets = np.array([[1, 0], [0, 0], [1, 0]])
    scores = np.array([[0.9, 0.2], [0.1, 0.3], [0.8, 0.1]])
    report = multilabel_report(targets, scores, ["a", "b"])
    assert math.isnan(average_precision(targets[:, 1], scores[:, 1]))
    assert report["per_class"][1]["ap"] is None
    assert report["map"] == pytest.approx(1.0)


# --- loss --------------------------------------------------------------------------------------


def test_masked_bce_ignores_minus_one_labels() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    masked = MaskedBCEWithLogits()(logits, torch.tensor([[1.0, -1.0, 0.0]]))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, [0, 2]], torch.tensor([[1.0, 0.0]]))
    assert masked == pytest.approx(float(expected))


def test_auto_pos_weight_is_negatives_over_positives_per_class() -> None:
    weights = auto_pos_weight([(1, 0, -1), (0, 0, 1), (0, 1, 1), (0, 0, 0)])
    assert weights.tolist() == pytest.approx([3.0, 3.0, 0.5])


# --- end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def voc_run(voc: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "voc"
    result = CliRunner().invoke(main, [
        "finetune", "--backbone", "lenet5", "--weights", "none", "--data", f"voc:{voc}", "--out", str(out),
        "--epochs", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet", "--pos-weight", "auto",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_multilabel_run_tracks_validation_map_per_epoch_and_monitors_it(voc_run: Path) -> None:
    epochs = [json.loads(line) for line in (voc_run / "metrics.jsonl").read_text().splitlines() if '"epoch"' in line]
    epochs = [e for e in epochs if e["kind"] == "epoch"]
    assert len(epochs) == 2 and all(0.0 <= e["val_map"] <= 1.0 and "val_map_voc07" in e for e in epochs)
    summary = json.loads((voc_run / "summary.json").read_text())
    assert summary["task"] == "multilabel" and summary["monitor"] == "val_map"
    assert summary["best_val_map"] == max(e["val_map"] for e in epochs)


def test_evaluate_reports_per_class_ap_hardest_first_and_writes_the_chart(voc_run: Path) -> None:
    result = CliRunner().invoke(main, ["evaluate", str(voc_run), "--device", "cpu", "--json"], catch_exceptions=False)
    report = json.loads(result.stdout)
    summary = json.loads((voc_run / "summary.json").read_text())
    assert report["map"] == pytest.approx(summary["test"]["map"])
    assert len(report["per_class"]) == 20
    with Image.open(report["plot"]) as chart:
        assert chart.size[0] >= 400 and chart.size[1] >= 300
    table = CliRunner().invoke(main, ["evaluate", str(voc_run), "--device", "cpu"]).stdout
    scored = [r for r in report["per_class"] if r["ap"] is not None]
    hardest = min(scored, key=lambda r: r["ap"])["class"]
    assert table.index(hardest) < table.index("mAP")


def test_task_multilabel_trains_multiclass_data_as_one_sigmoid_per_class(tmp_path: Path) -> None:
    out = tmp_path / "ml"
    result = CliRunner().invoke(main, [
        "finetune", "--backbone", "lenet5", "--weights", "none", "--data", "builtin:digits", "--classes", "0,1,2",
        "--train-per-class", "8", "--task", "multilabel", "--out", str(out), "--epochs", "1", "--batch-size", "8",
        "--workers", "0", "--device", "cpu", "--quiet", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "map" in json.loads(result.stdout)["test"]


def test_a_voc_export_with_its_own_classes_trains_and_evaluates_per_class(tmp_path: Path) -> None:
    root = write_voc(tmp_path, images=24, objects=export_objects)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "finetune", "--backbone", "lenet5", "--weights", "none", "--data", f"voc:{root}", "--out", str(out),
        "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(CliRunner().invoke(main, ["evaluate", str(out), "--device", "cpu", "--json"],
                                           catch_exceptions=False).stdout)
    assert sorted(r["class"] for r in report["per_class"]) == ["Person", "hardhat", "vest"]
    assert report["map"] == pytest.approx(json.loads((out / "summary.json").read_text())["test"]["map"])


def test_a_voc_folder_with_only_a_test_listing_loads_for_evaluation_and_refuses_training(tmp_path: Path) -> None:
    """The VOC2007 test archive alone lists only test.txt: its images load as the test split (a run is
    evaluated on them), and training on it is one sentence rather than a KeyError."""
    devkit = write_voc(tmp_path, images=20, splits={"test": range(20)})
    data = load_data(f"voc:{devkit}")
    assert len(data.test) == 20 and data.train == [] and data.val == []
    result = CliRunner().invoke(main, ["finetune", "--backbone", "lenet5", "--weights", "none", "--data", f"voc:{devkit}",
                                       "--epochs", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code != 0 and "has no training images" in result.stderr, result.output
    assert not (tmp_path / "run").exists()
