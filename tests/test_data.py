"""Tests for tltk.data: formats, spec parsing, splits, image loading and transforms.

Every dataset is written on the fly in tmp_path in its real distributed format.
"""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import (
    CIFAR_KNOWN_PIXEL,
    MNIST_FIRST_LABEL,
    MNIST_KNOWN_PIXEL,
    idx_bytes,
    write_bad_images,
    write_cifar10,
    write_csv,
    write_exif_rotated_jpeg,
    write_image,
    write_image_folder,
    write_mnist,
)
from tltk.data import (
    AUGMENT_PRESETS,
    DATA_FORMATS,
    DataSplits,
    ImageDataset,
    Sample,
    build_transforms,
    load_data,
    load_image,
    validate_images,
)
from tltk.errors import DataError


def all_samples(data: DataSplits) -> list[Sample]:
    return data.train + data.val + data.test


def by_id(data: DataSplits) -> dict[str, Sample]:
    return {s.id: s for s in all_samples(data)}


def split_ids(data: DataSplits) -> tuple[list[str], list[str], list[str]]:
    return [s.id for s in data.train], [s.id for s in data.val], [s.id for s in data.test]


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_data("builtin:digits")


# ----------------------------------------------------------------- formats and detection


def test_registry_has_every_builtin_format():
    assert {"folder", "cifar10", "mnist", "csv", "builtin"} <= set(DATA_FORMATS.names())


def test_folder_without_splits_is_autodetected_and_split_three_ways(tmp_path):
    root = write_image_folder(tmp_path / "pets", {"cat": 10, "dog": 10})
    data = load_data(str(root))
    assert data.format == "folder"
    assert data.class_names == ["cat", "dog"]
    assert (len(data.train), len(data.val), len(data.test)) == (14, 2, 4)
    sample = by_id(data)["cat/cat_3.png"]
    assert Path(sample.source).is_absolute() and Path(sample.source).is_file()
    assert data.class_names[sample.target] == "cat"
    assert data.arrays is None and data.skipped == []


def test_folder_with_train_test_subfolders_keeps_test_and_carves_val_from_train(tmp_path):
    root = tmp_path / "pets"
    write_image_folder(root / "train", {"cat": 6, "dog": 6}, ext=".jpg")
    write_image_folder(root / "test", {"cat": 2, "dog": 2}, ext=".JPEG")
    data = load_data(str(root))
    assert data.format == "folder"
    assert sorted(s.id for s in data.test) == [
        "test/cat/cat_0.JPEG", "test/cat/cat_1.JPEG", "test/dog/dog_0.JPEG", "test/dog/dog_1.JPEG",
    ]
    assert all(s.id.startswith("train/") for s in data.train + data.val)
    assert Counter(s.target for s in data.val) == {0: 1, 1: 1}


def test_folder_with_val_folder_uses_it_instead_of_carving(tmp_path):
    root = tmp_path / "pets"
    write_image_folder(root / "train", {"cat": 4, "dog": 4})
    write_image_folder(root / "val", {"cat": 1, "dog": 1})
    data = load_data(f"folder:{root}", test_split=0.25)
    assert sorted(s.id for s in data.val) == ["val/cat/cat_0.png", "val/dog/dog_0.png"]
    assert len(data.test) == 2 and all(s.id.startswith("train/") for s in data.test)


def test_folder_class_names_are_union_of_splits_and_class_missing_in_train_is_an_error(tmp_path):
    root = tmp_path / "pets"
    write_image_folder(root / "train", {"cat": 3, "dog": 3})
    write_image_folder(root / "test", {"cat": 1, "dog": 1, "fish": 1})
    with pytest.raises(DataError, match="fish.*train"):
        load_data(str(root))


def test_folder_mixing_split_and_class_folders_is_an_error(tmp_path):
    root = tmp_path / "pets"
    write_image_folder(root, {"train": 2, "cat": 2})
    with pytest.raises(DataError, match="mixes split folders"):
        load_data(f"folder:{root}")


def test_hidden_files_and_folders_are_ignored(tmp_path):
    root = write_image_folder(tmp_path / "pets", {"cat": 3, "dog": 3})
    write_image(root / ".thumbnails" / "x.png")
    write_image(root / "cat" / ".hidden.png")
    data = load_data(str(root))
    assert data.class_names == ["cat", "dog"]
    assert not any("hidden" in s.id or "thumbnails" in s.id for s in all_samples(data))
    assert len(all_samples(data)) == 6


def test_cifar10_parent_dir_is_autodetected_and_rows_become_hwc(tmp_path):
    write_cifar10(tmp_path)
    data = load_data(str(tmp_path))
    assert data.format == "cifar10"
    assert data.class_names == ["airplane", "cat", "dog"]
    assert data.arrays.shape == (18, 32, 32, 3) and data.arrays.dtype == np.uint8
    (row, col), rgb = CIFAR_KNOWN_PIXEL
    first = by_id(data)["train/0"]
    assert tuple(data.arrays[first.source][row, col]) == rgb
    assert first.target == 0
    assert sorted(s.id for s in data.test) == [f"test/{i}" for i in range(6)]
    assert {s.source for s in data.test} == set(range(12, 18))
    assert len(data.train) + len(data.val) == 12


def test_cifar10_prefix_accepts_the_batches_dir_itself(tmp_path):
    folder = write_cifar10(tmp_path, with_test=False)
    data = load_data(f"cifar10:{folder}", test_split=0.5, val_split=0.0)
    assert data.format == "cifar10"
    assert (len(data.train), len(data.val), len(data.test)) == (6, 0, 6)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("torchvision_layout", [False, True], ids=["flat", "MNIST-raw"])
def test_mnist_idx_is_autodetected_and_parsed(tmp_path, gz, torchvision_layout):
    write_mnist(tmp_path, gz=gz, torchvision_layout=torchvision_layout)
    data = load_data(str(tmp_path))
    assert data.format == "mnist"
    assert data.class_names == [str(i) for i in range(10)]
    assert data.arrays.shape == (40, 28, 28, 1)
    first = by_id(data)["train/0"]
    (row, col), value = MNIST_KNOWN_PIXEL
    assert data.arrays[first.source][row, col, 0] == value
    assert first.target == MNIST_FIRST_LABEL
    assert len(data.test) == 10 and all(s.id.startswith("test/") for s in data.test)


def test_mnist_with_mismatched_counts_is_an_error(tmp_path):
    folder = write_mnist(tmp_path)
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(29, dtype=np.uint8)))
    with pytest.raises(DataError, match="30 images.*29 labels"):
        load_data(f"mnist:{tmp_path}")


def test_mnist_with_wrong_magic_or_truncated_file_is_an_error(tmp_path):
    folder = write_mnist(tmp_path)
    images = folder / "train-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(idx_bytes(np.zeros(30, dtype=np.uint8)))  # a labels file in the images slot
    with pytest.raises(DataError, match="not an IDX images file"):
        load_data(f"mnist:{tmp_path}")
    images.write_bytes(good[:-100])
    with pytest.raises(DataError, match="truncated"):
        load_data(f"mnist:{tmp_path}")


def test_csv_is_autodetected_with_image_root_and_numeric_labels_sort_numerically(tmp_path):
    images = tmp_path / "images"
    rows = []
    for label in ("10", "2", "1"):
        for i in range(5):
            write_image(images / "sub" / f"{label}_{i}.png")
            rows.append((f"sub/{label}_{i}.png", label))
    csv_path = write_csv(tmp_path / "meta" / "labels.csv", rows, header=("image", "class"))
    data = load_data(str(csv_path), image_root=str(images))
    assert data.format == "csv"
    assert data.class_names == ["1", "2", "10"]
    assert len(all_samples(data)) == 15
    sample = by_id(data)["sub/10_3.png"]
    assert data.class_names[sample.target] == "10"
    assert sample.source == str((images / "sub" / "10_3.png").absolute())


def test_csv_files_default_to_the_csv_folder(tmp_path):
    rows = [(f"{c}{i}.png", c) for c in ("cat", "dog") for i in range(3)]
    for name, _ in rows:
        write_image(tmp_path / name)
    data = load_data(f"csv:{write_csv(tmp_path / 'labels.csv', rows)}")
    assert data.class_names == ["cat", "dog"]
    assert len(all_samples(data)) == 6 and data.skipped == []


def test_csv_ids_without_an_extension_find_the_image_of_that_name_whatever_its_extension(tmp_path):
    ids = {"a1": ".jpg", "b2": ".png", "c3": ".tif", "d4": ".jpg", "e5": ".png", "f6": ".tif"}
    for image_id, ext in ids.items():
        write_image(tmp_path / "kaggle" / "train" / f"{image_id}{ext}")
    rows = [(image_id, "cat" if i % 2 else "dog") for i, image_id in enumerate(ids)]
    csv_path = write_csv(tmp_path / "kaggle" / "train.csv", rows, header=("id", "label"))
    data = load_data(str(csv_path), image_root=str(tmp_path / "kaggle" / "train"))
    assert data.skipped == [] and len(all_samples(data)) == 6
    sample = by_id(data)["c3"]
    assert sample.source == str((tmp_path / "kaggle" / "train" / "c3.tif").absolute())
    assert data.class_names[sample.target] == "dog"


def test_csv_ids_without_an_extension_are_found_in_subfolders_of_the_image_root(tmp_path):
    for i in range(4):
        write_image(tmp_path / "train" / f"im{i}.jpg")
    (tmp_path / "labels.csv").write_text("id,labels\n" + "".join(f"im{i},{'cat dog' if i % 2 else 'dog'}\n" for i in range(4)))
    data = load_data(f"csv:{tmp_path / 'labels.csv'}")
    assert data.task == "multilabel" and data.skipped == []
    assert by_id(data)["im1"].source == str((tmp_path / "train" / "im1.jpg").absolute())


def test_csv_id_matching_two_images_is_an_error_naming_both(tmp_path):
    write_image(tmp_path / "train" / "x7.jpg")
    write_image(tmp_path / "test" / "x7.png")
    write_image(tmp_path / "train" / "y8.jpg")
    csv_path = write_csv(tmp_path / "labels.csv", [("x7", "cat"), ("y8", "dog")], header=("id", "label"))
    with pytest.raises(DataError, match=r"names image 'x7' without an extension, and 2 images match it: .*; "
                                        r"write the file name with its extension") as raised:
        load_data(str(csv_path))
    assert str(tmp_path / "train" / "x7.jpg") in str(raised.value) and str(tmp_path / "test" / "x7.png") in str(raised.value)


def test_csv_id_with_a_folder_matches_only_images_in_that_folder(tmp_path):
    write_image(tmp_path / "train" / "x7.jpg")
    write_image(tmp_path / "test" / "x7.png")
    write_image(tmp_path / "train" / "y8.jpg")
    csv_path = write_csv(tmp_path / "labels.csv", [("train/x7", "cat"), ("train/y8", "dog")])
    assert by_id(load_data(str(csv_path)))["train/x7"].source.endswith("x7.jpg")


def test_csv_ids_are_looked_up_in_one_listing_of_the_image_root_not_one_per_row(tmp_path, monkeypatch):
    import time

    import tltk.data.csvfile as csvfile

    folder = tmp_path / "train"
    folder.mkdir()
    for i in range(2000):
        (folder / f"{i:06d}.jpg").touch()
    scans = []
    real_scan = csvfile.scan_image_files
    monkeypatch.setattr(csvfile, "scan_image_files", lambda root: scans.append(root) or real_scan(root))
    names = [f"{i % 2000:06d}" for i in range(100_000)]
    started = time.perf_counter()
    files = csvfile.resolve_image_names(names, folder, tmp_path / "train.csv")
    assert time.perf_counter() - started < 10
    assert len(scans) == 1 and files[2001] == folder / "000001.jpg"


def test_csv_single_label_column_with_spaces_points_to_the_multilabel_labels_column(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    csv_path = write_csv(tmp_path / "labels.csv", [("a.png", "cat dog"), ("b.png", "dog")])
    with pytest.raises(DataError, match="label 'cat dog' with spaces.*name the column 'labels'"):
        load_data(str(csv_path))


def test_csv_without_known_columns_is_an_error(tmp_path):
    csv_path = write_csv(tmp_path / "labels.csv", [("a.png", "cat")], header=("picture", "kind"))
    with pytest.raises(DataError, match="expected a file column"):
        load_data(str(csv_path))


def test_builtin_digits_has_all_samples_split_three_ways(digits):
    assert digits.format == "builtin"
    assert digits.num_classes == 10 and digits.class_names == [str(i) for i in range(10)]
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert len(set(s.id for s in all_samples(digits))) == 1797
    assert digits.arrays.shape == (1797, 8, 8, 1) and digits.arrays.dtype == np.uint8
    assert digits.arrays.max() == 255


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(DataError, match="known builtin datasets: digits"):
        load_data("builtin:nope")


# ----------------------------------------------------------------- spec errors and paths


def test_unrecognised_directory_names_the_accepted_formats(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="No dataset format recognised at .*builtin:digits"):
        load_data(str(tmp_path))


def test_missing_path_and_unknown_format_prefix_are_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="Unknown data format 'imagenet'.*folder"):
        load_data("imagenet:/somewhere")


def test_path_containing_a_colon_is_a_path_not_a_format(tmp_path):
    root = write_image_folder(tmp_path / "run:1", {"cat": 3, "dog": 3})
    assert load_data(str(root)).format == "folder"
    assert load_data(f"folder:{root}").format == "folder"


def test_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_image_folder(tmp_path / "pets", {"cat": 3, "dog": 3})
    assert load_data("~/pets").class_names == ["cat", "dog"]


# ----------------------------------------------------------------- classes and splits


def test_classes_filter_keeps_original_order_and_reindexes_targets(tmp_path):
    root = write_image_folder(tmp_path / "pets", {"bird": 5, "cat": 5, "dog": 5})
    data = load_data(str(root), classes=["dog", "cat"])
    assert data.class_names == ["cat", "dog"]
    samples = all_samples(data)
    assert len(samples) == 10
    for sample in samples:
        assert sample.id.split("/")[0] == data.class_names[sample.target]


def test_classes_filter_with_unknown_name_lists_known_classes(tmp_path):
    root = write_image_folder(tmp_path / "pets", {"bird": 3, "cat": 3})
    with pytest.raises(DataError, match="'zebra'.*known classes: bird, cat"):
        load_data(str(root), classes=["cat", "zebra"])


def test_classes_filter_leaving_one_class_is_an_error(tmp_path):
    root = write_image_folder(tmp_path / "pets", {"bird": 3, "cat": 3})
    with pytest.raises(DataError, match=r"1 class \(cat\).*at least 2"):
        load_data(str(root), classes=["cat"])


def test_classes_leaves_out_an_empty_class_folder_before_it_is_refused(tmp_path):
    root = write_image_folder(tmp_path / "pets", {"cat": 3, "dog": 3})
    (root / "fish").mkdir()
    with pytest.raises(DataError, match="fish contains no images.*leave the class out with --classes"):
        load_data(str(root))
    data = load_data(str(root), classes=["cat", "dog"])
    assert data.class_names == ["cat", "dog"] and len(all_samples(data)) == 6


def test_classes_leaves_out_a_class_folder_of_undecodable_images(tmp_path):
    root = write_image_folder(tmp_path / "pets", {"cat": 3, "dog": 3})
    write_bad_images(root / "fish")
    assert load_data(str(root), classes=["cat", "dog"]).class_names == ["cat", "dog"]


def test_classes_leaves_out_an_empty_class_folder_of_one_split(tmp_path):
    for split in ("train", "test"):
        write_image_folder(tmp_path / "pets" / split, {"cat": 3, "dog": 3})
    (tmp_path / "pets" / "test" / "fish").mkdir()
    write_image_folder(tmp_path / "pets" / "train", {"fish": 3})
    with pytest.raises(DataError, match="test.fish contains no images"):
        load_data(str(tmp_path / "pets"))
    assert load_data(str(tmp_path / "pets"), classes=["cat", "dog"]).class_names == ["cat", "dog"]


def test_classes_leaves_out_a_multilabel_csv_column_with_no_positives(tmp_path):
    for i in range(6):
        write_image(tmp_path / f"im{i}.png")
    rows = "".join(f"im{i}.png,{i % 2},{1 - i % 2},0\n" for i in range(6))
    (tmp_path / "l.csv").write_text("image,sunny,cloudy,snow\n" + rows)
    with pytest.raises(DataError, match="Class 'snow' has no samples.*leave it out with --classes"):
        load_data(str(tmp_path / "l.csv"))
    data = load_data(str(tmp_path / "l.csv"), classes=["sunny", "cloudy"])
    assert data.class_names == ["sunny", "cloudy"] and {len(s.target) for s in all_samples(data)} == {2}


def test_classes_naming_an_unknown_class_lists_empty_classes_among_the_known(tmp_path):
    root = write_image_folder(tmp_path / "pets", {"cat": 3, "dog": 3})
    (root / "fish").mkdir()
    with pytest.raises(DataError, match="'zebra'.*known classes: cat, dog, fish"):
        load_data(str(root), classes=["cat", "zebra"])


def test_train_per_class_caps_train_only_and_is_seeded(digits):
    small = load_data("builtin:digits", train_per_class=3)
    assert Counter(s.target for s in small.train) == {c: 3 for c in range(10)}
    assert split_ids(small)[1:] == split_ids(digits)[1:]
    assert set(s.id for s in small.train) <= set(s.id for s in digits.train)
    assert split_ids(load_data("builtin:digits", train_per_class=3)) == split_ids(small)
    other = load_data("builtin:digits", train_per_class=3, seed=1)
    assert [s.id for s in other.train] != [s.id for s in small.train]


def test_same_seed_gives_same_splits_and_another_seed_differs(digits):
    assert split_ids(load_data("builtin:digits", seed=0)) == split_ids(digits)
    assert load_data("builtin:digits", seed=0).fingerprint == digits.fingerprint
    other = load_data("builtin:digits", seed=1)
    assert split_ids(other) != split_ids(digits)
    assert other.fingerprint != digits.fingerprint


def test_carved_splits_are_stratified_and_disjoint(digits):
    totals = Counter(s.target for s in all_samples(digits))
    test_counts = Counter(s.target for s in digits.test)
    val_counts = Counter(s.target for s in digits.val)
    for target, total in totals.items():
        assert abs(test_counts[target] / total - 0.2) < 0.01
        assert val_counts[target] >= 1
    train, val, test = (set(ids) for ids in split_ids(digits))
    assert not (train & val or train & test or val & test)


def test_small_classes_still_appear_in_val(tmp_path):
    root = write_image_folder(tmp_path / "pets", {"bird": 4, "cat": 5, "dog": 6})
    data = load_data(str(root), val_split=0.1, test_split=0.0)
    assert {s.target for s in data.val} == {0, 1, 2}
    assert {s.target for s in data.train} == {0, 1, 2}


def test_changing_val_split_leaves_the_test_set_alone(digits):
    wider = load_data("builtin:digits", val_split=0.3)
    assert split_ids(wider)[2] == split_ids(digits)[2]
    assert len(wider.val) > len(digits.val)


def test_zero_val_split_gives_empty_val_and_split_names_the_option(tmp_path):
    root = write_image_folder(tmp_path / "pets", {"cat": 4, "dog": 4})
    data = load_data(str(root), val_split=0.0)
    assert data.val == []
    with pytest.raises(DataError, match="val split.*--val-split"):
        data.split("val")
    assert data.split("train") == data.train
    with pytest.raises(DataError, match="Unknown split 'dev'"):
        data.split("dev")


def test_out_of_range_split_fraction_is_an_error():
    with pytest.raises(DataError, match="--test-split"):
        load_data("builtin:digits", test_split=1.0)


def test_fingerprint_changes_when_one_label_changes(tmp_path):
    rows = [(f"img{i}.png", "cat" if i % 2 else "dog") for i in range(8)]
    for name, _ in rows:
        write_image(tmp_path / name)
    csv_path = write_csv(tmp_path / "labels.csv", rows)
    first = load_data(str(csv_path), val_split=0.0, test_split=0.0)
    assert len(first.fingerprint) == 64
    assert load_data(str(csv_path), val_split=0.0, test_split=0.0).fingerprint == first.fingerprint
    rows[3] = ("img3.png", "dog")
    write_csv(csv_path, rows)
    relabelled = load_data(str(csv_path), val_split=0.0, test_split=0.0)
    assert [s.id for s in relabelled.train] == [s.id for s in first.train]
    assert relabelled.fingerprint != first.fingerprint


# ----------------------------------------------------------------- bad data


def test_undecodable_images_are_skipped_and_reported(tmp_path):
    root = write_image_folder(tmp_path / "pets", {"cat": 5, "dog": 5})
    bad = write_bad_images(root / "cat")
    (root / "cat" / "notes.txt").write_text("not an image, not a problem")
    data = load_data(str(root))
    assert data.skipped == [str(p.absolute()) for p in bad]
    assert len(all_samples(data)) == 10
    ids = set(by_id(data))
    assert not any(p.name in i for p in bad for i in ids)


def test_strict_raises_naming_the_first_bad_file(tmp_path):
    root = write_image_folder(tmp_path / "pets", {"cat": 5, "dog": 5})
    write_bad_images(root / "dog")
    with pytest.raises(DataError, match="a_empty.png.*drop --strict"):
        load_data(str(root), strict=True)


def test_csv_missing_files_are_skipped_and_all_missing_points_at_image_root(tmp_path):
    rows = [(f"{c}{i}.png", c) for c in ("cat", "dog") for i in range(3)]
    for name, _ in rows[1:]:
        write_image(tmp_path / name)
    csv_path = write_csv(tmp_path / "labels.csv", rows)
    assert load_data(str(csv_path)).skipped == [str((tmp_path / "cat0.png").absolute())]
    with pytest.raises(DataError, match="--image-root"):
        load_data(str(csv_path), image_root=str(tmp_path / "elsewhere"))


def test_decompression_bomb_counts_as_undecodable(tmp_path, monkeypatch):
    path = write_image(tmp_path / "big.png", size=(20, 20))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    good, bad = validate_images([path], strict=False)
    assert good == [] and bad == [path]


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = write_image_folder(tmp_path / "pets", {"cat": 3, "dog": 3})
    (root / "fish").mkdir()
    (root / "fish" / "readme.txt").write_text("todo")
    with pytest.raises(DataError, match="fish contains no images"):
        load_data(str(root))


def test_class_folder_with_only_bad_images_is_an_error(tmp_path):
    root = write_image_folder(tmp_path / "pets", {"cat": 3, "dog": 3})
    write_bad_images(root / "fish")
    with pytest.raises(DataError, match="fish has no decodable images"):
        load_data(str(root))


def test_single_class_is_an_error(tmp_path):
    root = write_image_folder(tmp_path / "pets", {"cat": 3})
    with pytest.raises(DataError, match=r"1 class \(cat\) in .*pets; a classifier needs at least 2"):
        load_data(str(root))


# ----------------------------------------------------------------- load_image


def _palette_image(transparent: bool) -> Image.Image:
    img = Image.new("P", (4, 4), 3)
    img.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
    if transparent:
        img.info["transparency"] = 3
    return img


def _cases() -> list[tuple[str, object, str, tuple[int, int, int]]]:
    return [
        ("L", Image.new("L", (4, 4), 77), ".png", (77, 77, 77)),
        ("1", Image.new("1", (4, 4), 1), ".png", (255, 255, 255)),
        ("RGBA-transparent", Image.new("RGBA", (4, 4), (255, 0, 0, 0)), ".png", (255, 255, 255)),
        ("RGBA-half-black", Image.new("RGBA", (4, 4), (0, 0, 0, 128)), ".png", (127, 127, 127)),
        ("LA-transparent", Image.new("LA", (4, 4), (0, 0)), ".png", (255, 255, 255)),
        ("P", _palette_image(False), ".png", (10, 20, 30)),
        ("P-transparent", _palette_image(True), ".png", (255, 255, 255)),
        ("CMYK", Image.new("CMYK", (4, 4), (0, 255, 255, 0)), ".tif", (255, 0, 0)),
    ]


@pytest.mark.parametrize("mode, image, ext, expected", _cases(), ids=[c[0] for c in _cases()])
def test_load_image_converts_mode_to_rgb(tmp_path, mode, image, ext, expected):
    path = tmp_path / f"img{ext}"
    save_kwargs = {"transparency": 3} if mode == "P-transparent" else {}
    image.save(path, **save_kwargs)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (4, 4)
    assert np.abs(np.asarray(loaded)[1, 1].astype(int) - expected).max() <= 1


def test_load_image_scales_16_bit_by_range(tmp_path):
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    pixels = np.asarray(load_image(path))
    assert pixels[0, 0].tolist() == [0, 0, 0]
    assert abs(int(pixels[0, 1, 0]) - 128) <= 1
    assert pixels[0, 2].tolist() == [255, 255, 255]


def test_load_image_applies_exif_orientation(tmp_path):
    path = write_exif_rotated_jpeg(tmp_path / "rotated.jpg", size=(40, 20), orientation=6)
    assert Image.open(path).size == (40, 20)
    assert load_image(path).size == (20, 40)


def test_load_image_on_undecodable_file_names_it(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="broken.png"):
        load_image(path)


# ----------------------------------------------------------------- transforms and dataset


@pytest.mark.parametrize("augment", AUGMENT_PRESETS)
def test_transforms_give_normalised_float_tensors_of_input_size(augment):
    transform = build_transforms((24, 20), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), augment, train=True)
    from_pil = transform(Image.new("RGB", (37, 29), (255, 255, 255)))
    grey = torch.full((1, 11, 13), 128, dtype=torch.uint8)
    from torchvision import tv_tensors

    from_array = transform(tv_tensors.Image(grey))
    for out in (from_pil, from_array):
        assert out.shape == (3, 24, 20) and out.dtype == torch.float32
    # white is (1 - 0.5) / 0.25 = 2; black (rotation fill) is -2; jitter only moves within that
    assert from_pil.min().item() >= -2.0 - 1e-6 and from_pil.max().item() <= 2.0 + 1e-6
    if augment != "standard":
        assert torch.allclose(from_pil, torch.full_like(from_pil, 2.0))


def test_eval_transform_is_deterministic_and_ignores_augment():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8))
    eval_standard = build_transforms((16, 16), (0.0,), (1.0,), "standard", train=False)
    eval_none = build_transforms((16, 16), (0.0,), (1.0,), "none", train=True)
    first = eval_standard(image)
    assert torch.equal(first, eval_standard(image))
    assert torch.equal(first, eval_none(image))
    train_standard = build_transforms((16, 16), (0.0,), (1.0,), "standard", train=True)
    torch.manual_seed(0)
    assert any(not torch.equal(train_standard(image), first) for _ in range(3))


def test_transforms_pickle_for_dataloader_workers():
    transform = build_transforms((8, 8), (0.1, 0.2, 0.3), (0.5, 0.5, 0.5), "light", train=True)
    restored = pickle.loads(pickle.dumps(transform))
    assert restored(Image.new("RGB", (8, 8))).shape == (3, 8, 8)


def test_unknown_augment_lists_presets():
    with pytest.raises(DataError, match="none, light, standard"):
        build_transforms((8, 8), (0.5,), (0.5,), "heavy", train=True)


def test_image_dataset_on_greyscale_arrays_repeats_channels(digits):
    transform = build_transforms((8, 8), (0.0,), (1.0,), "none", train=False)
    dataset = ImageDataset(digits.train, transform, digits.arrays)
    assert len(dataset) == len(digits.train)
    image, target = dataset[0]
    sample = digits.train[0]
    assert target == sample.target
    expected = torch.from_numpy(digits.arrays[sample.source][..., 0] / 255.0).float()
    assert image.shape == (3, 8, 8)
    for channel in range(3):
        assert torch.allclose(image[channel], expected, atol=1e-6)


def test_image_dataset_on_files_loads_rgb(tmp_path):
    root = write_image_folder(tmp_path / "pets", {"cat": 3, "dog": 3})
    data = load_data(str(root), val_split=0.0, test_split=0.0)
    dataset = ImageDataset(data.train, build_transforms((4, 4), (0.0,), (1.0,), "none", train=False))
    for image, target in (dataset[i] for i in range(len(dataset))):
        red_channel = 1.0 if data.class_names[target] == "cat" else 0.0  # cat is red, dog green
        assert image.shape == (3, 4, 4)
        assert torch.allclose(image[0], torch.full((4, 4), red_channel))


def test_image_dataset_without_arrays_for_row_samples_is_an_error(digits):
    dataset = ImageDataset(digits.train, build_transforms((8, 8), (0.0,), (1.0,), "none", train=False))
    with pytest.raises(DataError, match="arrays"):
        dataset[0]


def test_a_seeded_index_gives_the_same_augmentation_and_leaves_the_global_generator_alone():
    from tltk.data import ImageDataset, build_transforms, load_data

    splits = load_data("builtin:digits", classes=["0", "1"], train_per_class=2)
    transform = build_transforms((16, 16), [0.5] * 3, [0.5] * 3, "standard", train=True)
    dataset = ImageDataset(splits.train, transform, splits.arrays)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first, again, other = dataset[(0, 123)][0], dataset[(0, 123)][0], dataset[(0, 124)][0]
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), before)
