"""The feature-store commands end to end, their figures, and their one-sentence errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tltk.cli import main
from tltk.data import load_data
from tltk.features.neighbors import Neighbour, QueryResult
from tltk.viz.neighbors_grid import neighbors_figure
from tltk.viz.tsne import tsne_figure

MODEL = ["--weights", "none", "--device", "cpu", "--workers", "0", "--batch-size", "16"]


def tltk(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_sentence_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(line for line in result.stderr.splitlines() if line.strip())
    assert text.startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in text, text


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs") / "shapes"
    rng = np.random.default_rng(0)
    for name, shade in (("dark", 40), ("mid", 128), ("light", 215)):
        (root / name).mkdir(parents=True)
        for i in range(8):
            pixels = np.clip(shade + rng.normal(0, 25, size=(10, 10, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.png")
    return root


@pytest.fixture(scope="module")
def store(images: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "fc7"
    result = tltk("extract", "lenet5", "--layer", "fc7", "--data", images, "--split", "train", "--out", out, *MODEL)
    assert result.exit_code == 0, result.output
    assert "index flat (Flat): exact search" in result.stdout
    return out


def test_extract_writes_a_store_that_index_describes(store: Path, images: Path) -> None:
    info = json.loads(tltk("index", store, "--json").stdout)
    assert (info["layer"], info["pool"], info["metric"], info["index"], info["dim"]) == ("fc7", "avg", "cosine", "flat", 84)
    assert info["count"] == len(load_data(str(images)).train) and info["classes"] == 3
    assert {"manifest.json", "index.faiss", "metadata.jsonl", "features.f32"} <= {p.name for p in store.iterdir()}


def test_index_add_appends_images_and_check_recall_reports_against_exact_search(store: Path, images: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    assert tltk("extract", "lenet5", "--layer", "fc7", "--data", images, "--split", "train", "--out", copy, *MODEL).exit_code == 0
    result = tltk("index", copy, "--add", "--data", images, "--split", "test", "--device", "cpu", "--json")
    info = json.loads(result.stdout)
    splits = load_data(str(images))
    assert info["added"] == len(splits.test) and info["count"] == len(splits.train) + len(splits.test)
    check = json.loads(tltk("index", copy, "--check-recall", "--recall-k", "5", "--json").stdout)["check_recall"]
    assert check["recall"] == 1.0 and check["k"] == 5
    rebuilt = tltk("index", copy, "--rebuild", "--index", "hnsw")
    assert "index hnsw (HNSW32,Flat): recall@10" in rebuilt.stdout and f"against exact search on {info['count'] // 2} held-out stored vectors" in rebuilt.stdout


def test_neighbors_of_stored_rows_print_a_table_a_grid_and_json(store: Path, tmp_path: Path) -> None:
    grid = tmp_path / "grid.png"
    result = tltk("neighbors", store, "--query-index", "0,5", "--k", "4", "--grid", grid)
    assert result.exit_code == 0, result.output
    assert "neighbours of" in result.stdout and "distance (1 - cosine)" in result.stdout
    assert Image.open(grid).size[0] > 400
    payload = json.loads(tltk("neighbors", store, "--query-index", "0", "5", "--k", "4", "--json").stdout)
    assert [q["row"] for q in payload["queries"]] == [0, 5]
    first = payload["queries"][0]
    assert len(first["neighbours"]) == 4 and all(n["row"] != 0 for n in first["neighbours"])
    assert [n["rank"] for n in first["neighbours"]] == [1, 2, 3, 4]
    assert first["neighbours"] == sorted(first["neighbours"], key=lambda n: n["distance"])


def test_neighbors_answers_for_every_repeated_query_index_and_query(store: Path) -> None:
    payload = json.loads(tltk("neighbors", store, "--query-index", "0", "--query-index", "7,2", "--k", "2", "--json").stdout)
    assert [q["row"] for q in payload["queries"]] == [0, 7, 2]
    stored = [json.loads(line)["path"] for line in (store / "metadata.jsonl").read_text().splitlines()]
    payload = json.loads(tltk("neighbors", store, "--query", stored[3], "--query", stored[6], "--k", "1", "--json").stdout)
    assert [q["neighbours"][0]["row"] for q in payload["queries"]] == [3, 6]


def test_neighbors_of_an_image_file_rebuild_the_model_from_the_store(store: Path) -> None:
    stored = [json.loads(line) for line in (store / "metadata.jsonl").read_text().splitlines()]
    query = stored[4]["path"]
    payload = json.loads(tltk("neighbors", store, "--query", query, "--k", "3", "--json").stdout)
    nearest = payload["queries"][0]["neighbours"]
    assert nearest[0]["row"] == 4 and nearest[0]["path"] == query and nearest[0]["distance"] < 1e-5
    assert nearest[0]["labels"] == stored[4]["labels"] and len(nearest) == 3


def test_course_work_form_builds_the_store_then_reuses_it(images: Path, tmp_path: Path) -> None:
    args = ["neighbors", "lenet5", "--layer", "pool5", "--data", images, "--store", tmp_path / "cache",
            "--query-index", "1", "--k", "2", *MODEL]
    assert "built store" in tltk(*args).stdout
    assert "reused store" in tltk(*args).stdout


def test_evaluate_retrieval_reports_knn_accuracy_precision_and_map(store: Path, images: Path) -> None:
    report = json.loads(tltk("evaluate-retrieval", store, "--k", "3", "--json").stdout)
    assert report["queries"] == len(load_data(str(images)).train) and report["k"] == 3 and report["task"] == "multiclass"
    for key in ("knn_accuracy", "precision_at_k", "map_at_k"):
        assert 0.0 <= report[key] <= 1.0
    table = tltk("evaluate-retrieval", store, "--k", "3").stdout
    assert "kNN accuracy (k=3, majority vote)" in table and "mAP@3" in table


def test_tsne_writes_a_png(store: Path, tmp_path: Path) -> None:
    result = tltk("tsne", store, "--out", tmp_path / "t.png", "--sample", "15", "--perplexity", "4", "--json")
    info = json.loads(result.stdout)
    assert info["points"] == 15 and info["classes"] == 3
    assert Image.open(tmp_path / "t.png").size[0] > 400


def test_errors_are_one_sentence(store: Path, images: Path, tmp_path: Path) -> None:
    assert_one_sentence_error(tltk("extract", "lenet5", "--layer", "fc7", "--data", images, "--out", store, *MODEL),
                              "already holds a feature store; pass --overwrite")
    assert_one_sentence_error(tltk("neighbors", store, "--layer", "pool5", "--query-index", "0"),
                              "is a store: it already has its layer and data")
    assert_one_sentence_error(tltk("neighbors", store), "--query IMAGE", "--query-index N")
    assert_one_sentence_error(tltk("neighbors", store, "--query-index", "999"), "row 999 is not in the store")
    assert_one_sentence_error(tltk("neighbors", store, "--query", tmp_path / "nope.png"), "query image", "does not exist")
    assert_one_sentence_error(tltk("evaluate-retrieval", tmp_path), "is not a feature store")
    assert_one_sentence_error(tltk("index", store, "--nprobe", "4"), "--nprobe and --ef-search apply to ivf")
    assert_one_sentence_error(tltk("extract", "lenet5", "--layer", "fc8", "--data", images, "--out", tmp_path / "x", *MODEL),
                              "lenet5 has no layer 'fc8'; its named layers are conv1, pool5, fc6, fc7")
    assert not (tmp_path / "x").exists()


def test_neighbors_figure_puts_each_query_beside_its_labelled_neighbours() -> None:
    picture = np.zeros((8, 8, 3), dtype=np.uint8)
    results = [QueryResult("q.png", ["cat"], [Neighbour(1, 4, "a.png", ["cat"], 0.1), Neighbour(2, 7, "b.png", ["dog"], 0.3)]),
               QueryResult("r.png", ["dog"], [Neighbour(1, 2, "c.png", ["dog"], 0.2), Neighbour(2, 9, "d.png", ["dog"], 0.4)])]
    figure = neighbors_figure([picture, picture], [[picture, picture]] * 2, results, "neighbours at fc7")
    axes = figure.axes
    assert len(axes) == 6 and figure._suptitle.get_text() == "neighbours at fc7"
    assert axes[0].get_title() == "query\ncat" and axes[2].get_title() == "#2 dog\nd=0.300"
    assert axes[1].spines["top"].get_edgecolor() != axes[2].spines["top"].get_edgecolor()  # same label vs not
    assert figure.legends and figure._supxlabel.get_text() and figure._supylabel.get_text()


def test_tsne_figure_has_a_legend_entry_per_class_and_labelled_axes() -> None:
    points = np.random.default_rng(0).normal(size=(9, 2))
    figure = tsne_figure(points, ["b", "a", "b", "c", "a", "b", "c", "a", "b"], ["a", "b", "c"], "t-SNE of fc7")
    (ax,) = figure.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a (3)", "b (4)", "c (2)"]
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title() == "t-SNE of fc7"


def test_neighbors_refuses_k_below_one_before_building_a_store(tmp_path: Path) -> None:
    result = tltk("neighbors", "lenet5", "--weights", "none", "--layer", "fc7", "--data", "builtin:digits",
                  "--query-index", "0", "--k", "0", "--store", tmp_path / "store")
    assert result.exit_code != 0 and "--k must be at least 1, not 0." in result.output
    assert not (tmp_path / "store").exists()
