"""Hugging Face datasets (``hf:PATH``): a dataset saved with ``save_to_disk``, or a folder of
parquet files as the Hub serves them, read with the ``datasets`` library (``tltk[hf]``).

The splits are the dataset's own: ``train``, ``validation`` (or ``valid``, ``val``, ``dev``)
and ``test``, found for parquet files by the same file-name rules ``datasets`` applies; a
dataset without split names is one whole dataset, split the usual way. Other splits (SVHN's
``extra``) are left out, and so is a split whose labels are all missing (-1, as in many
published test splits). One column holds the images (an ``Image`` feature) and one the
labels: a ``ClassLabel`` gives the class names in its order, a list of ``ClassLabel`` makes
the data multi-label, and a plain integer or text column gives its sorted values as names.
Both columns are found from the features, or named with ``--image-column`` and
``--label-column``.

Images stay encoded in the dataset's own files (memory-mapped for ``save_to_disk``, read
into memory for parquet) and are decoded one at a time when a batch needs them, as image
files are. Every image is checked to decode when the data is read, so an undecodable one
is skipped (or, with ``--strict``, an error) up front, as for image folders.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from tltk.data.images import decode_error, load_image_bytes
from tltk.data.samples import RawDataset, Sample
from tltk.errors import DataError, printable

# The dataset's split names tltk reads, and which of its splits each becomes (the names
# ``datasets`` itself recognises in parquet file and folder names).
SPLIT_OF = {"train": "train", "training": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val",
            "test": "test", "testing": "test", "eval": "test", "evaluation": "test"}
MISSING_LABEL = -1  # ClassLabel's "no label"
_CHECK_BLOCK = 512  # images decoded per block when checking them, so memory holds one block


@dataclass(frozen=True)
class HfSplit:
    """One split as read: its arrow table (``column(name)`` gives a ChunkedArray) and features."""

    name: str
    table: Any
    features: Any


class EncodedImages:
    """The encoded images of a dataset's rows, decoded to H x W x 3 uint8 one row at a time:
    what ``ImageDataset`` indexes as ``arrays``, without holding every decoded image."""

    def __init__(self, chunks: list[Any], root: str) -> None:
        import pyarrow as pa

        self.images = pa.chunked_array(chunks, type=pa.large_binary())
        self.root = root

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, row: int) -> np.ndarray:
        # A copy: torch refuses to wrap the read-only array np.asarray would give.
        return np.array(load_image_bytes(self.images[int(row)].as_py(), f"{self.root}#{int(row)}"))


def read_hf(path: Path, *, image_root: Path | None = None, strict: bool = False, image_column: str | None = None,
            label_column: str | None = None) -> RawDataset:
    """``hf:PATH``: a ``save_to_disk`` folder or a folder of parquet files, as image classification."""
    if image_root is not None:
        raise DataError("--image-root does not apply to hf: data, whose images are stored in the dataset; drop it.")
    splits = kept_splits(open_splits(path), path)
    features = _shared_features(splits, path)
    image = image_column or find_image_column(features, path)
    label = label_column or find_label_column(features, path)
    _check_columns(features, path, image, label)
    labels = {tltk_split: split.table.column(label).to_pylist() for tltk_split, split in splits.items()}
    class_names, targets = label_targets(features[label], labels, path, label)
    return _dataset(splits, targets, class_names, image, path, strict)


# --- finding the data ---------------------------------------------------------------------------


def find_hf_dir(path: Path) -> Path | None:
    """``path`` when it holds a ``save_to_disk`` dataset or parquet files where the Hub puts them."""
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return path
    folders = [path, path / "data", *(path / name for name in SPLIT_OF)]
    return path if any(any(folder.glob("*.parquet")) for folder in folders if folder.is_dir()) else None


def open_splits(path: Path) -> dict[str, HfSplit]:
    """The dataset's splits by their own names (``all`` for a dataset saved without splits)."""
    if not path.exists():
        raise DataError(f"Hugging Face dataset {path} does not exist; check the --data spec.")
    datasets = _datasets_library()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        try:
            saved = datasets.load_from_disk(str(path))
        except Exception as exc:  # datasets raises many kinds for a damaged folder
            raise DataError(f"{path} cannot be read as a dataset saved with save_to_disk ({type(exc).__name__}: "
                            f"{exc}); save it again.") from exc
        if isinstance(saved, datasets.DatasetDict):
            return {name: HfSplit(name, part.data, part.features) for name, part in saved.items()}
        return {"all": HfSplit("all", saved.data, saved.features)}
    files = parquet_files(path)
    if not files:
        raise DataError(
            f"{path} is neither a dataset saved with save_to_disk (dataset_dict.json or state.json) nor a folder of "
            f".parquet files; give hf: one of those, e.g. the folder a dataset was saved to."
        )
    return {name: _read_parquet(name, found) for name, found in files.items()}


def parquet_files(path: Path) -> dict[str, list[Path]]:
    """The parquet files of each split, split by their names as ``datasets`` splits them
    (``data/train-00000-of-00002.parquet``, ``test/part.parquet``, ...); a lone file is the whole dataset."""
    if path.is_file():
        return {"all": [path]} if path.suffix.lower() == ".parquet" else {}
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    try:
        patterns = get_data_patterns(str(path))
    except EmptyDatasetError:
        return {}
    found: dict[str, list[Path]] = {}
    for name, split_patterns in patterns.items():
        try:
            files = DataFilesDict.from_patterns({name: split_patterns}, base_path=str(path),
                                                allowed_extensions=[".parquet"])[name]
        except FileNotFoundError:  # this split has files, but none of them parquet
            continue
        if files:
            found[str(name)] = sorted(Path(file) for file in files)
    return found


def _read_parquet(name: str, files: list[Path]) -> HfSplit:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Features

    try:
        tables = [pq.read_table(file, memory_map=True) for file in files]
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"The {name} split's parquet files ({files[0]}, ...) cannot be read together ({exc}); "
                        f"export them again from one dataset.") from exc
    return HfSplit(name, table, Features.from_arrow_schema(tables[0].schema))


def kept_splits(parts: dict[str, HfSplit], path: Path) -> dict[str, HfSplit]:
    """tltk's splits (train, val, test; or ``all``) from the dataset's, by name."""
    if "all" in parts or (len(parts) == 1 and next(iter(parts)).lower() not in SPLIT_OF):
        return {"all": next(iter(parts.values()))}
    kept: dict[str, HfSplit] = {}
    for name, part in parts.items():
        split = SPLIT_OF.get(name.lower())
        if split is None:
            continue
        if split in kept:
            raise DataError(f"{path} has both a '{kept[split].name}' and a '{name}' split, which would both be "
                            f"tltk's {split} split; keep one of them.")
        kept[split] = part
    if "train" not in kept:
        raise DataError(f"{path} has the splits {', '.join(parts)} but no train split; name the training split "
                        f"'train', or save the dataset without splits.")
    return kept


def _datasets_library() -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise DataError("hf: data is read with the datasets library, which is not installed; install it with "
                        "pip install 'tltk[hf]'.") from exc
    return datasets


# --- columns and labels --------------------------------------------------------------------------


def find_image_column(features: Any, path: Path) -> str:
    """The one column with an ``Image`` feature."""
    from datasets import Image

    found = [name for name, feature in features.items() if isinstance(feature, Image)]
    if len(found) == 1:
        return found[0]
    if found:
        raise DataError(f"{path} has several image columns ({', '.join(found)}); choose one with --image-column.")
    raise DataError(f"{path} has no image column (an Image feature) among its columns {_names(features)}; "
                    f"name the column of images with --image-column.")


def find_label_column(features: Any, path: Path) -> str:
    """The one ``ClassLabel`` (or list of ``ClassLabel``) column, else one named label or labels."""
    from datasets import ClassLabel

    found = [name for name, feature in features.items() if isinstance(_element(feature), ClassLabel)]
    if not found:
        found = [name for name in features if name.lower() in ("label", "labels")]
    if len(found) == 1:
        return found[0]
    if found:
        raise DataError(f"{path} has several label columns ({', '.join(found)}); choose one with --label-column.")
    raise DataError(f"{path} has no label column (a ClassLabel, a list of ClassLabel, or one named label) among "
                    f"its columns {_names(features)}; name the column of labels with --label-column.")


def _check_columns(features: Any, path: Path, image: str, label: str) -> None:
    from datasets import Image

    for option, column in (("--image-column", image), ("--label-column", label)):
        if column not in features:
            raise DataError(f"{path} has no column '{printable(column)}' for {option}; its columns are "
                            f"{_names(features)}.")
    if not isinstance(features[image], Image):
        raise DataError(f"Column '{printable(image)}' of {path} holds {features[image]}, not images; give "
                        f"--image-column a column with an Image feature.")


def label_targets(feature: Any, labels: dict[str, list[Any]], path: Path,
                  column: str) -> tuple[list[str], dict[str, list[int | tuple[int, ...] | None]]]:
    """(class names, each row's target per split: a class index, one 1/0 per class for a list
    column, or None where the row has no label)."""
    from datasets import ClassLabel, Value

    element, multilabel = _element(feature), _is_list(feature)
    if isinstance(element, ClassLabel):
        names = [str(name) for name in element.names]
        index = {i: i for i in range(len(names))}
    elif isinstance(element, Value) and element.dtype.startswith(("int", "uint", "string", "large_string")):
        rows = [row for split_rows in labels.values() for row in split_rows]
        values = {value for row in rows for value in ((row or []) if multilabel else [row])}
        ordered = sorted(values - {None, MISSING_LABEL})  # -1 is "no label" in integer columns too
        names, index = [str(value) for value in ordered], {value: i for i, value in enumerate(ordered)}
    else:
        raise DataError(f"Column '{printable(column)}' of {path} holds {feature}, not class labels; give "
                        f"--label-column a ClassLabel column, a list of ClassLabel, or an integer or text column.")
    targets = {split: [_target(row, index, multilabel, len(names)) for row in rows] for split, rows in labels.items()}
    for split, rows in targets.items():
        for number, (raw, target) in enumerate(zip(labels[split], rows)):
            if target is None and raw not in (None, MISSING_LABEL):
                raise DataError(f"Row {number} of the {split} split of {path} has label {printable(repr(raw))} in "
                                f"column '{printable(column)}', outside its {len(names)} classes; fix the row.")
    return names, targets


def _target(row: Any, index: dict[Any, int], multilabel: bool, width: int) -> int | tuple[int, ...] | None:
    if row is None or row == MISSING_LABEL:
        return None
    if not multilabel:
        return index.get(row)
    if any(value not in index for value in row):
        return None
    positive = {index[value] for value in row}
    return tuple(int(i in positive) for i in range(width))


def _element(feature: Any) -> Any:
    """The feature of a list column's items (``Sequence``/``List``/``LargeList`` or ``[feature]``), else itself."""
    if isinstance(feature, list) and len(feature) == 1:
        return feature[0]
    return feature.feature if _is_list(feature) else feature


def _is_list(feature: Any) -> bool:
    """A list column, however this version of ``datasets`` spells it (``Sequence`` became ``List``)."""
    import datasets

    names = ("List", "LargeList", "Sequence")
    kinds = tuple(kind for kind in (getattr(datasets, name, None) for name in names) if isinstance(kind, type))
    if isinstance(feature, list):
        return len(feature) == 1
    return isinstance(feature, kinds) and hasattr(feature, "feature")


def _shared_features(splits: dict[str, HfSplit], path: Path) -> Any:
    """The features, which every split must give alike (the same columns and class names)."""
    first, *others = splits.values()
    for split in others:
        if split.features != first.features:
            raise DataError(f"The {first.name} and {split.name} splits of {path} have different columns or classes; "
                            f"save the splits from one dataset.")
    return first.features


def _names(features: Any) -> str:
    return ", ".join(printable(str(name)) for name in features) or "(none)"


# --- samples ----------------------------------------------------------------------------------------


def _dataset(splits: dict[str, HfSplit], targets: dict[str, list[Any]], class_names: list[str], column: str,
             path: Path, strict: bool) -> RawDataset:
    """Samples for the labelled rows of each split, each pointing at its row of one
    ``EncodedImages``. A split without any label is left out; a row without a label in a
    labelled split is an error."""
    import pyarrow.compute as pc

    chunks: list[Any] = []
    samples: dict[str, list[Sample]] = {}
    skipped: list[str] = []
    for name, split in splits.items():
        rows = targets[name]
        if all(target is None for target in rows):
            continue
        unlabelled = next((i for i, target in enumerate(rows) if target is None), None)
        if unlabelled is not None:
            raise DataError(f"Row {unlabelled} of the {split.name} split of {path} has no label; label it, or remove "
                            f"the unlabelled rows.")
        encoded = pc.struct_field(split.table.column(column), "bytes").cast("large_binary")
        offset = sum(len(chunk) for chunk in chunks)
        good, bad = _check_rows(encoded, f"{path} ({split.name})", strict)
        skipped.extend(bad)
        samples[name] = [Sample(offset + row, rows[row], f"{split.name}/{row}") for row in good]
        chunks.extend(encoded.chunks)
    if not samples:
        raise DataError(f"{path} has no labelled rows in any split; label the training split.")
    return RawDataset(class_names, samples, str(path), arrays=EncodedImages(chunks, str(path)),  # type: ignore[arg-type]
                      skipped=skipped)


def _check_rows(encoded: Any, where: str, strict: bool) -> tuple[list[int], list[str]]:
    """(rows whose image decodes, ``PATH (split)#row`` of each one that does not). An image
    stored only as a path to a file elsewhere counts as missing: tltk reads images stored in
    the dataset, as ``save_to_disk`` and ``push_to_hub`` store them."""
    held = encoded.is_valid().to_pylist()
    errors = dict(_decode_errors(encoded, [row for row, stored in enumerate(held) if stored]))
    errors.update({row: "no image bytes stored" for row, stored in enumerate(held) if not stored})
    failed = sorted(row for row, error in errors.items() if error)
    if strict and failed:
        raise DataError(f"Cannot decode the image of row {failed[0]} of {where} ({errors[failed[0]]}); fix or remove "
                        f"the row, or drop --strict to skip undecodable images.")
    return [row for row in range(len(held)) if not errors[row]], [f"{where}#{row}" for row in failed]


def _decode_errors(encoded: Any, rows: list[int]) -> Iterator[tuple[int, str | None]]:
    """Why each row's image does not decode (None where it does), a block of rows at a time."""
    workers = min(8, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(rows), _CHECK_BLOCK):
            block = rows[start:start + _CHECK_BLOCK]
            yield from zip(block, pool.map(decode_error, [encoded[row].as_py() for row in block]))
