"""Predictions in input order, and exporters: Kaggle CSVs (matched to a sample file), CSV, JSONL."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tltk.cli import main
from tltk.errors import TltkError
from tltk.export import export
from tltk.predict import Predictions
from tltk.run import predict
from tltk.train.finetune import DataOptions, FinetuneConfig, finetune
from tltk.train.trainer import TrainConfig

FAST = TrainConfig(epochs=1, batch_size=8, workers=0, device="cpu")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    config = FinetuneConfig(backbone="lenet5", weights="none", train=FAST,
                            data=DataOptions("builtin:digits", classes=["3", "5", "8"], train_per_class=10))
    return finetune(config, tmp_path_factory.mktemp("runs") / "digits").out


@pytest.fixture(scope="module")
def test_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("kaggle_test")
    rng = np.random.default_rng(0)
    for name in ("b", "a", "c", "e", "d"):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_predictions_on_a_split_follow_its_order_and_probabilities_sum_to_one(digits_run: Path) -> None:
    from tltk.run import load_run

    loaded = load_run(digits_run)
    predictions = predict(loaded, device="cpu")
    assert predictions.ids == [s.id for s in loaded.data().test]
    assert np.allclose(predictions.probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert predictions.class_names == ["3", "5", "8"]


def test_folder_of_unlabelled_images_is_predicted_in_name_order(digits_run: Path, test_folder: Path) -> None:
    predictions = predict(digits_run, str(test_folder), device="cpu")
    assert predictions.ids == ["a.png", "b.png", "c.png", "d.png", "e.png"]


def test_kaggle_multiclass_writes_id_and_class_name(digits_run: Path, test_folder: Path, tmp_path: Path) -> None:
    predictions = predict(digits_run, str(test_folder), device="cpu")
    rows = read_csv(export(predictions, tmp_path / "sub.csv", "kaggle"))
    assert rows[0] == ["id", "label"]
    assert [r[0] for r in rows[1:]] == ["a", "b", "c", "d", "e"]
    expected = [predictions.class_names[i] for i in predictions.predicted_index()]
    assert [r[1] for r in rows[1:]] == expected
    by_index = read_csv(export(predictions, tmp_path / "idx.csv", "kaggle", label_as="index"))
    assert [r[1] for r in by_index[1:]] == [str(i) for i in predictions.predicted_index()]


def test_sample_submission_decides_header_id_column_and_row_order(digits_run: Path, test_folder: Path, tmp_path: Path) -> None:
    ids = ["a", "b", "c", "d", "e"]
    random.Random(3).shuffle(ids)
    sample = tmp_path / "sample_submission.csv"
    sample.write_text("ImageId,Label\n" + "".join(f"{i},0\n" for i in ids))
    predictions = predict(digits_run, str(test_folder), device="cpu")
    rows = read_csv(export(predictions, tmp_path / "sub.csv", "kaggle", sample_submission=str(sample)))
    assert rows[0] == ["ImageId", "Label"]
    assert [r[0] for r in rows[1:]] == ids
    label_of = {Path(i).stem: predictions.class_names[k] for i, k in zip(predictions.ids, predictions.predicted_index())}
    assert all(r[1] == label_of[r[0]] for r in rows[1:])


def test_sample_ids_without_predictions_are_counted_and_nothing_is_written(digits_run: Path, test_folder: Path, tmp_path: Path) -> None:
    sample = tmp_path / "sample.csv"
    sample.write_text("id,label\na,0\nzz1,0\nzz2,0\n")
    predictions = predict(digits_run, str(test_folder), device="cpu")
    with pytest.raises(TltkError, match=r"2 id\(s\) .* no prediction \(first: zz1, zz2\)"):
        export(predictions, tmp_path / "sub.csv", "kaggle", sample_submission=str(sample))
    assert not (tmp_path / "sub.csv").exists()


def multilabel_predictions() -> Predictions:
    probs = np.array([[0.9, 0.2, 0.6], [0.1, 0.7, 0.4], [0.5, 0.5, 0.95]], dtype=np.float32)
    return Predictions(["x/p.jpg", "x/q.jpg", "x/r.jpg"], ["", "", ""], probs, ["cat", "dog", "bird"], "multilabel")


def test_kaggle_multilabel_probabilities_follow_the_sample_columns(tmp_path: Path) -> None:
    sample = tmp_path / "s.csv"
    sample.write_text("image,bird,cat,dog\nr,0,0,0\np,0,0,0\nq,0,0,0\n")
    rows = read_csv(export(multilabel_predictions(), tmp_path / "o.csv", "kaggle", sample_submission=str(sample)))
    assert rows[0] == ["image", "bird", "cat", "dog"]
    assert rows[1] == ["r", "0.95", "0.5", "0.5"]
    assert rows[2] == ["p", "0.6", "0.9", "0.2"]


def test_kaggle_multilabel_labels_use_the_threshold(tmp_path: Path) -> None:
    rows = read_csv(export(multilabel_predictions(), tmp_path / "o.csv", "kaggle", multilabel_as="labels", threshold=0.55))
    assert rows == [["id", "labels"], ["p", "cat bird"], ["q", "dog"], ["r", "bird"]]


def test_jsonl_and_csv_exporters_hold_every_probability(tmp_path: Path) -> None:
    predictions = multilabel_predictions()
    records = [json.loads(line) for line in export(predictions, tmp_path / "o.jsonl", "jsonl").read_text().splitlines()]
    assert records[2] == {"id": "x/r.jpg", "path": "", "predicted": ["cat", "dog", "bird"],
                          "probabilities": {"cat": 0.5, "dog": 0.5, "bird": pytest.approx(0.95)}}
    rows = read_csv(export(predictions, tmp_path / "o.csv", "csv"))
    assert rows[0] == ["id", "path", "predicted", "cat", "dog", "bird"] and rows[1][2] == "cat bird"


def test_option_of_another_exporter_is_refused(tmp_path: Path) -> None:
    # The rule every kind follows: the option named as the library knows it, with the ones the exporter takes.
    with pytest.raises(TltkError, match=r"^exporter 'jsonl' has no option 'sample_submission'; it takes threshold=0\.5, "
                                        r"id_from='path'\.$"):
        export(multilabel_predictions(), tmp_path / "o.jsonl", "jsonl", sample_submission="s.csv")
    assert not (tmp_path / "o.jsonl").exists()


def test_duplicate_stems_are_refused_with_the_fix(tmp_path: Path) -> None:
    predictions = Predictions(["a/x.jpg", "b/x.jpg"], ["", ""], np.array([[0.3, 0.7], [0.6, 0.4]]), ["n", "p"], "multiclass")
    with pytest.raises(TltkError, match="--id-from path"):
        export(predictions, tmp_path / "o.csv", "kaggle")


def test_stem_ids_cut_only_an_image_extension(tmp_path: Path) -> None:
    """A name with a dot of its own (a CSV name without extension, a versioned file) keeps it in the id."""
    predictions = Predictions(["x/scan.v2", "x/img.2.JPG", "x/plain.png"], ["", "", ""],
                              np.array([[0.3, 0.7], [0.6, 0.4], [0.2, 0.8]]), ["n", "p"], "multiclass")
    rows = read_csv(export(predictions, tmp_path / "o.csv", "kaggle"))
    assert [row[0] for row in rows[1:]] == ["scan.v2", "img.2", "plain"]


def test_predict_command_writes_the_file_and_reports_rows(digits_run: Path, test_folder: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["predict", str(digits_run), "--data", str(test_folder), "--out",
                                       str(tmp_path / "sub.csv"), "--device", "cpu", "--json"], catch_exceptions=False)
    assert json.loads(result.stdout)["rows"] == 5
    assert len(read_csv(tmp_path / "sub.csv")) == 6
