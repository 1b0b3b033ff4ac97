"""Hugging Face datasets (hf:PATH): save_to_disk folders and parquet files, built here with `datasets` itself."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

datasets = pytest.importorskip("datasets")  # a guard only: `make test` installs tltk[hf]

from sklearn.metrics import average_precision_score  # noqa: E402

from tltk.cli import main  # noqa: E402
from tltk.data import load_data  # noqa: E402
from tltk.errors import DataError  # noqa: E402

CLASSES = ["zebra", "ant", "cat"]  # ClassLabel order, not alphabetical: the names keep it
TAGS = ["indoor", "person", "dog"]
TRAIN = ["--backbone", "lenet5", "--weights", "none", "--epochs", "1", "--batch-size", "8", "--workers", "0",
         "--device", "cpu", "--quiet"]


def colour(row: int) -> tuple[int, int, int]:
    return (row * 7 % 256, row * 13 % 256, row * 29 % 256)


def png(rgb: tuple[int, int, int], size: tuple[int, int] = (10, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, rgb).save(buffer, "PNG")
    return buffer.getvalue()


def image_rows(count: int, start: int = 0) -> list[dict]:
    return [{"bytes": png(colour(start + i)), "path": None} for i in range(count)]


def hf_split(count: int, start: int = 0, *, multilabel: bool = False, labels: list | None = None) -> "datasets.Dataset":
    """``count`` rows: an image of a known colour per row, a class (row % 3) or tags per row."""
    if multilabel:
        features = datasets.Features({"image": datasets.Image(),
                                      "tags": datasets.Sequence(datasets.ClassLabel(names=TAGS))})
        tags = labels or [[t for t in range(3) if (start + i) >> t & 1] for i in range(count)]
        return datasets.Dataset.from_dict({"image": image_rows(count, start), "tags": tags}, features=features)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    values = labels if labels is not None else [(start + i) % 3 for i in range(count)]
    return datasets.Dataset.from_dict({"image": image_rows(count, start), "label": values}, features=features)


def write_saved(root: Path, splits: dict[str, int], **options) -> Path:
    """A DatasetDict saved with save_to_disk, rows numbered on across the splits."""
    parts, start = {}, 0
    for name, count in splits.items():
        parts[name] = hf_split(count, start, **options)
        start += count
    datasets.DatasetDict(parts).save_to_disk(str(root))
    return root


def write_parquet(root: Path, splits: dict[str, int], **options) -> Path:
    """Parquet files where the Hub keeps them: data/SPLIT-00000-of-00001.parquet."""
    start = 0
    for name, count in splits.items():
        hf_split(count, start, **options).to_parquet(str(root / "data" / f"{name}-00000-of-00001.parquet"))
        start += count
    return root


def tltk(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.count("error:") == 1, result.output
    return " ".join(result.output.split())


# --- reading ------------------------------------------------------------------------------------


def test_a_saved_dataset_keeps_its_splits_class_label_names_and_pixels(tmp_path: Path) -> None:
    root = write_saved(tmp_path / "saved", {"train": 12, "validation": 6, "test": 9})
    data = load_data(f"hf:{root}")
    assert data.format == "hf" and data.task == "multiclass" and data.class_names == CLASSES
    assert (len(data.train), len(data.val), len(data.test)) == (12, 6, 9)
    assert {s.id.split("/")[0] for s in data.val} == {"validation"}
    sample = next(s for s in data.test if s.id == "test/4")
    assert sample.target == (18 + 4) % 3
    assert np.array_equal(data.arrays[sample.source], np.full((8, 10, 3), colour(22), dtype=np.uint8))


def test_a_bare_path_to_a_saved_dataset_is_recognised_not_read_as_class_folders(tmp_path: Path) -> None:
    root = write_saved(tmp_path / "saved", {"train": 12, "test": 6})
    assert load_data(str(root)).format == "hf"


def test_parquet_files_in_the_hub_layout_split_by_their_names(tmp_path: Path) -> None:
    root = write_parquet(tmp_path / "pq", {"train": 12, "validation": 6, "test": 9})
    data = load_data(str(root))
    assert data.format == "hf" and data.class_names == CLASSES
    assert (len(data.train), len(data.val), len(data.test)) == (12, 6, 9)
    sample = next(s for s in data.val if s.id == "validation/2")
    assert np.array_equal(data.arrays[sample.source][0, 0], colour(14))


def test_a_dataset_saved_without_splits_is_split_the_usual_way(tmp_path: Path) -> None:
    hf_split(30).save_to_disk(str(tmp_path / "one"))
    data = load_data(f"hf:{tmp_path / 'one'}", val_split=0.2, test_split=0.2)
    assert len(data.train) + len(data.val) + len(data.test) == 30 and data.val and data.test


def test_a_sequence_of_class_labels_is_multi_label(tmp_path: Path) -> None:
    root = write_saved(tmp_path / "tags", {"train": 16, "test": 8}, multilabel=True)
    data = load_data(f"hf:{root}")
    assert data.task == "multilabel" and data.class_names == TAGS
    targets = {s.id: s.target for s in data.train + data.val + data.test}
    assert targets["train/5"] == (1, 0, 1) and targets["train/0"] == (0, 0, 0) and targets["test/0"] == (0, 0, 0)


def test_an_integer_label_column_without_class_names_gives_its_values_in_numeric_order(tmp_path: Path) -> None:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    rows = {"image": image_rows(12), "label": [10, 3, 7] * 4}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "d"))
    data = load_data(f"hf:{tmp_path / 'd'}")
    assert data.class_names == ["3", "7", "10"]
    assert {s.id: s.target for s in data.train + data.val + data.test}["all/0"] == 2


def test_splits_other_than_train_validation_test_are_left_out_and_train_is_needed(tmp_path: Path) -> None:
    root = write_saved(tmp_path / "svhn", {"train": 12, "test": 6, "extra": 9})
    data = load_data(f"hf:{root}")
    assert len(data.train) + len(data.val) == 12 and len(data.test) == 6
    root = write_saved(tmp_path / "no-train", {"validation": 6, "test": 6})
    with pytest.raises(DataError, match="has the splits validation, test but no train split; name the training split"):
        load_data(f"hf:{root}")


def test_a_test_split_without_labels_is_left_out_and_test_is_carved_from_train(tmp_path: Path) -> None:
    parts = {"train": hf_split(20), "test": hf_split(6, labels=[-1] * 6)}
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "d"))
    data = load_data(f"hf:{tmp_path / 'd'}", test_split=0.25)
    assert len(data.train) + len(data.val) + len(data.test) == 20
    assert all(s.id.startswith("train/") for s in data.test)


def test_a_row_without_a_label_in_a_labelled_split_is_one_error(tmp_path: Path) -> None:
    datasets.DatasetDict({"train": hf_split(6, labels=[0, 1, 2, -1, 0, 1])}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"Row 3 of the train split of .* has no label; label it"):
        load_data(f"hf:{tmp_path / 'd'}")


def test_columns_are_named_with_options_where_they_cannot_be_told(tmp_path: Path) -> None:
    features = datasets.Features({"photo": datasets.Image(), "thumb": datasets.Image(),
                                  "species": datasets.Value("string"), "note": datasets.Value("string")})
    rows = {"photo": image_rows(12), "thumb": image_rows(12), "species": ["owl", "bee"] * 6, "note": ["x"] * 12}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "d"))
    spec = f"hf:{tmp_path / 'd'}"
    with pytest.raises(DataError, match="several image columns \\(photo, thumb\\); choose one with --image-column"):
        load_data(spec)
    with pytest.raises(DataError, match="no label column .* among its columns photo, thumb, species, note; name"):
        load_data(spec, image_column="thumb")
    with pytest.raises(DataError, match="no column 'kind' for --label-column; its columns are photo, thumb, species"):
        load_data(spec, image_column="thumb", label_column="kind")
    with pytest.raises(DataError, match="Column 'note' of .* not images; give --image-column a column with an Image"):
        load_data(spec, image_column="note", label_column="species")
    data = load_data(spec, image_column="thumb", label_column="species")
    assert data.class_names == ["bee", "owl"]  # a text column's values, sorted


def test_column_options_reach_hf_from_the_command_line_and_are_refused_by_other_formats(tmp_path: Path) -> None:
    root = write_saved(tmp_path / "saved", {"train": 12, "test": 6})
    message = one_line_error(tltk("finetune", *TRAIN, "--data", f"hf:{root}", "--label-column", "kind",
                                  "--out", tmp_path / "run"))
    assert "has no column 'kind' for --label-column" in message
    message = one_line_error(tltk("finetune", *TRAIN, "--data", "builtin:digits", "--image-column", "image",
                                  "--out", tmp_path / "run2"))
    assert message.endswith("--image-column does not apply to builtin: data; drop it.")
    message = one_line_error(tltk("finetune", *TRAIN, "--data", f"hf:{root}", "--image-root", tmp_path,
                                  "--out", tmp_path / "run3"))
    assert message.endswith("--image-root does not apply to hf: data, whose images are stored in the dataset; drop it.")


def test_an_undecodable_image_is_skipped_or_with_strict_an_error(tmp_path: Path) -> None:
    split = hf_split(9)
    rows = split.cast_column("image", datasets.Image(decode=False)).to_dict()
    rows["image"][4] = {"bytes": b"not an image", "path": None}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "d"))
    data = load_data(f"hf:{tmp_path / 'd'}", test_split=0.3)
    assert len(data.train) + len(data.val) + len(data.test) == 8
    assert data.skipped == [f"{tmp_path / 'd'} (all)#4"]
    with pytest.raises(DataError, match=r"Cannot decode the image of row 4 of .*; fix or remove the row, or drop --strict"):
        load_data(f"hf:{tmp_path / 'd'}", strict=True)


@pytest.mark.parametrize("make,message", [
    (lambda p: p.mkdir(), "is neither a dataset saved with save_to_disk .* nor a folder of .parquet files"),
    (lambda p: None, "Hugging Face dataset .* does not exist; check the --data spec"),
])
def test_a_path_that_holds_no_dataset_is_one_error(tmp_path: Path, make, message: str) -> None:
    make(tmp_path / "d")
    with pytest.raises(DataError, match=message):
        load_data(f"hf:{tmp_path / 'd'}")


def test_without_the_datasets_library_hf_says_how_to_install_it(tmp_path: Path, monkeypatch) -> None:
    root = write_saved(tmp_path / "saved", {"train": 6})
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"install it with pip install 'tltk\[hf\]'"):
        load_data(f"hf:{root}")


# --- runs ---------------------------------------------------------------------------------------


def test_train_on_hf_data_evaluate_from_another_folder_and_predict_a_kaggle_csv(tmp_path: Path, monkeypatch) -> None:
    project = tmp_path / "project"
    write_saved(project / "flowers", {"train": 24, "validation": 6, "test": 9})
    monkeypatch.chdir(project)
    result = tltk("finetune", *TRAIN, "--data", "hf:flowers", "--out", "run")
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(tmp_path)
    report = json.loads(tltk("evaluate", "project/run", "--device", "cpu", "--json").stdout)
    assert report["n"] == 9 and report["class_names"] == CLASSES
    result = tltk("predict", "project/run", "--out", "submission.csv", "--id-from", "path", "--device", "cpu")
    assert result.exit_code == 0, result.output
    with open("submission.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["id", "label"] and [r[0] for r in rows[1:]] == [f"test/{i}" for i in range(9)]
    assert {r[1] for r in rows[1:]} <= set(CLASSES)


def test_a_multi_label_hf_run_agrees_with_scikit_learn(tmp_path: Path) -> None:
    root = write_parquet(tmp_path / "tags", {"train": 32, "validation": 8, "test": 16}, multilabel=True)
    out = tmp_path / "run"
    assert tltk("finetune", *TRAIN, "--data", f"hf:{root}", "--out", out).exit_code == 0
    report = json.loads(tltk("evaluate", out, "--device", "cpu", "--json").stdout)
    assert sorted(r["class"] for r in report["per_class"]) == sorted(TAGS)
    predictions = tmp_path / "test.jsonl"
    assert tltk("predict", out, "--format", "jsonl", "--out", predictions, "--device", "cpu").exit_code == 0
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    data = load_data(f"hf:{root}")
    targets = {s.id: s.target for s in data.test}
    labels = np.array([targets[row["id"]] for row in rows])
    scores = np.array([[row["probabilities"][name] for name in TAGS] for row in rows])
    aps = [average_precision_score(labels[:, c] == 1, scores[:, c]) for c in range(3) if (labels[:, c] == 1).any()]
    assert report["map"] == pytest.approx(float(np.mean(aps)), abs=1e-6)
