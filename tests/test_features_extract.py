"""Extraction into a store: rows match a plain forward pass, stream to disk, append, and refuse other models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import write_mnist
from PIL import Image
from safetensors.torch import load_file, save_file
from voc_fixtures import write_voc

from tltk.data import ImageDataset, build_transforms, load_data
from tltk.errors import TltkError
from tltk.features import FeatureStore, Loading, add_images, extract, extract_or_reuse, load_source
from tltk.features.extract import row_pictures
from tltk.features.manifest import FEATURES
from tltk.features.neighbors import neighbours_of_images, neighbours_of_rows
from tltk.features.source import source_from_record

CPU = Loading(batch_size=32, device="cpu", workers=0)


@pytest.fixture(scope="module")
def lenet():
    return load_source("lenet5", weights="none", seed=0)


def write_noise_folder(root: Path, classes: dict[str, int], seed: int = 0) -> Path:
    """``root/CLASS/i.png``: random pixels, so no two images give the same features."""
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)).save(root / name / f"{name}_{i}.png")
    return root


def test_stored_rows_equal_a_plain_forward_pass_of_the_same_images(tmp_path: Path, lenet) -> None:
    store = extract(lenet, "fc7", tmp_path / "s", "builtin:digits", split="test", loading=CPU, classes=["0", "1"])
    splits = load_data("builtin:digits", classes=["0", "1"])
    transform = build_transforms((32, 32), (0.5,) * 3, (0.5,) * 3, "none", train=False)
    images = torch.stack([ImageDataset(splits.test, transform, splits.arrays)[i][0] for i in range(len(splits.test))])
    with torch.no_grad():
        expected = lenet.model.eval()(images).numpy()
    np.testing.assert_allclose(store.features(), expected, rtol=1e-5, atol=1e-6)
    metadata = store.metadata()
    assert [row["id"] for row in metadata] == [s.id for s in splits.test]
    assert [row["labels"] for row in metadata] == [[splits.class_names[s.target]] for s in splits.test]
    assert {row["split"] for row in metadata} == {"test"}
    assert store.manifest["source"]["fingerprint"] == lenet.fingerprint and store.dim == 84


def test_features_go_to_disk_batch_by_batch_while_images_are_read(tmp_path: Path, lenet, monkeypatch) -> None:
    mnist = write_mnist(tmp_path / "mnist", n_train=2000, n_test=8)
    loaded = [0]
    original = ImageDataset.__getitem__

    def counting(self, index):  # type: ignore[no-untyped-def]
        loaded[0] += 1
        return original(self, index)

    monkeypatch.setattr(ImageDataset, "__getitem__", counting)
    snapshots: list[tuple[int, int, int]] = []

    def progress(done: int, total: int) -> None:
        features = next((tmp_path / "out").glob(".s.building-*")) / FEATURES
        snapshots.append((done, features.stat().st_size, loaded[0]))

    (tmp_path / "out").mkdir()
    store = extract(lenet, "pool5", tmp_path / "out" / "s", f"mnist:{mnist}", split="train", pool="flatten",
                    loading=Loading(batch_size=100, device="cpu", workers=0), progress=progress)
    assert store.count == 1800 and store.dim == 400  # 2000 training images less the carved validation split
    assert len(snapshots) == 18
    for done, size, read in snapshots:
        assert size == done * 400 * 4  # every finished batch is already in the file
        assert read == done  # and no image beyond it has been read: nothing piles up in memory


def test_add_images_appends_with_the_model_that_built_the_store(tmp_path: Path, lenet) -> None:
    store = extract(lenet, "fc7", tmp_path / "s", "builtin:digits", split="test", loading=CPU, classes=["0", "1"])
    added = add_images(store, "builtin:digits", split="test", loading=CPU, classes=["2", "3"])
    reopened = FeatureStore.open(tmp_path / "s")
    assert reopened.count == store.count == 72 + added and added > 60
    assert reopened.class_names == ["0", "1", "2", "3"]
    assert [entry["rows"] for entry in reopened.manifest["data"]] == [[0, 72], [72, 72 + added]]
    assert {labels[0] for labels in reopened.labels()[72:]} == {"2", "3"}
    last = reopened.count - 1
    assert reopened.search(reopened.features()[[last]], 1)[1][0, 0] == last  # the index holds the new rows


def test_adding_the_same_images_twice_is_refused(tmp_path: Path, lenet) -> None:
    store = extract(lenet, "fc7", tmp_path / "s", "builtin:digits", split="test", loading=CPU, classes=["0", "1"])
    with pytest.raises(TltkError, match=r"already in the store .* \(rows 0-71\)"):
        add_images(store, "builtin:digits", split="test", loading=CPU, classes=["0", "1"])


def test_querying_with_another_model_is_refused(tmp_path: Path, lenet) -> None:
    folder = write_noise_folder(tmp_path / "imgs", {"a": 4, "b": 4})
    store = extract(lenet, "fc7", tmp_path / "s", str(folder), loading=CPU)
    other = load_source("lenet5", weights="none", seed=1)
    query = [folder / "a" / "a_0.png"]
    with pytest.raises(TltkError, match="was built from lenet5 with random weights .* query with the model that built it"):
        neighbours_of_images(store, query, 3, source=other, loading=CPU)
    with pytest.raises(TltkError, match="holds layer fc7 \\(--pool avg\\), not pool5"):
        store.check_same_model(lenet.fingerprint, "pool5", "avg")
    with pytest.raises(TltkError, match="fingerprint"):
        add_images(store, str(folder), source=other, loading=CPU)


def test_an_image_already_in_the_store_is_its_own_nearest_neighbour(tmp_path: Path, lenet) -> None:
    folder = write_noise_folder(tmp_path / "imgs", {"a": 5, "b": 5})
    store = extract(lenet, "fc7", tmp_path / "s", str(folder), loading=CPU)
    query = folder / "b" / "b_3.png"
    (result,) = neighbours_of_images(store, [query], 3, loading=CPU)  # the model is rebuilt from the manifest
    assert result.neighbours[0].path == str(query) and result.neighbours[0].labels == ["b"]
    assert result.neighbours[0].distance == pytest.approx(0.0, abs=1e-5)
    (again,) = neighbours_of_rows(store, [result.neighbours[0].row], 3)
    assert again.query == str(query) and all(n.path != str(query) for n in again.neighbours)
    assert [n.row for n in again.neighbours] == [n.row for n in result.neighbours[1:3]] + [again.neighbours[2].row]


def test_the_same_seed_rebuilds_the_same_random_model() -> None:
    first, second = (load_source("lenet5", weights="none", seed=5) for _ in range(2))
    assert first.fingerprint == second.fingerprint
    assert source_from_record(first.record).fingerprint == first.fingerprint
    assert load_source("lenet5", weights="none", seed=6).fingerprint != first.fingerprint
    assert load_source("lenet5", weights="none", seed=5, input_size=36).fingerprint != first.fingerprint


def test_a_run_directory_gives_logits_and_its_own_data_and_refuses_queries_once_its_weights_change(tmp_path: Path) -> None:
    import tltk
    from tltk.train.finetune import DataOptions, FinetuneConfig
    from tltk.train.trainer import TrainConfig

    folder = write_noise_folder(tmp_path / "imgs", {"a": 6, "b": 6, "c": 6})
    config = FinetuneConfig(backbone="lenet5", weights="none", data=DataOptions(str(folder)),
                            train=TrainConfig(epochs=1, batch_size=8, workers=0, device="cpu"))
    tltk.finetune(config, tmp_path / "run")
    source = load_source(str(tmp_path / "run"))
    store = extract(source, "logits", tmp_path / "s", split="test", loading=CPU)  # the run's own data and split
    assert store.dim == 3 and store.count == len(load_data(str(folder)).test)
    with torch.no_grad():
        images = torch.stack([build_transforms((32, 32), (0.5,) * 3, (0.5,) * 3, "none", False)(Image.open(m["path"]).convert("RGB"))
                              for m in store.metadata()])
        np.testing.assert_allclose(store.features(), source.model.eval()(images).numpy(), rtol=1e-4, atol=1e-5)
    weights = load_file(tmp_path / "run" / "model.safetensors")  # the run trained again: other weights
    weights["head.0.bias"] += 1.0
    save_file(weights, tmp_path / "run" / "model.safetensors")
    with pytest.raises(TltkError, match="fingerprint"):
        neighbours_of_images(store, [store.metadata()[0]["path"]], 2, loading=CPU)


def test_multi_label_rows_keep_every_positive_label(tmp_path: Path, lenet) -> None:
    voc = write_voc(tmp_path / "voc")
    store = extract(lenet, "pool5", tmp_path / "s", f"voc:{voc}", split="train", loading=CPU)
    splits = load_data(f"voc:{voc}")
    assert store.task == "multilabel"
    expected = [[splits.class_names[i] for i, v in enumerate(s.target) if v == 1] for s in splits.train]
    assert store.labels() == expected and any(len(labels) > 1 for labels in expected)


def test_course_work_form_builds_a_store_once_and_then_reuses_it(tmp_path: Path, lenet) -> None:
    folder = write_noise_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    first, built = extract_or_reuse(lenet, "fc7", str(folder), store_dir=tmp_path / "cache", loading=CPU)
    second, built_again = extract_or_reuse(lenet, "fc7", str(folder), store_dir=tmp_path / "cache", loading=CPU)
    assert built and not built_again and second.count == first.count == 6
    other = load_source("lenet5", weights="none", seed=2)
    third, rebuilt = extract_or_reuse(other, "fc7", str(folder), store_dir=tmp_path / "cache", loading=CPU)
    assert rebuilt and third.fingerprint == other.fingerprint


def test_pictures_of_in_memory_rows_are_the_dataset_pixels(tmp_path: Path, lenet) -> None:
    store = extract(lenet, "fc7", tmp_path / "s", "builtin:digits", split="test", loading=CPU, classes=["3", "4"])
    splits = load_data("builtin:digits", classes=["3", "4"])
    picture = row_pictures(store, [2])[0]
    assert picture.shape == (8, 8, 3)
    np.testing.assert_array_equal(picture[..., 0], splits.arrays[splits.test[2].source][..., 0])


def test_bad_sources_and_splits_are_one_sentence_errors(tmp_path: Path, lenet) -> None:
    with pytest.raises(TltkError, match="neither a run directory nor a backbone name"):
        load_source("lenet6")
    with pytest.raises(TltkError, match="--data is needed with a backbone"):
        extract(lenet, "fc7", tmp_path / "s", None, loading=CPU)
    with pytest.raises(TltkError, match="--split 'dev' is not one of all, train, val, test"):
        extract(lenet, "fc7", tmp_path / "s", "builtin:digits", split="dev", loading=CPU)
    assert not (tmp_path / "s").exists()
