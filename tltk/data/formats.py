"""Dataset formats: each reader turns data as distributed into a ``RawDataset``.

Readers only read. They keep the dataset's own splits (``train``/``val``/``test``
folders, CIFAR-10's test batch, MNIST's t10k files) and leave carving, class filtering
and per-class limits to ``tltk.data.splits`` so every format behaves the same way.

A reader is ``(path: Path, *, image_root: Path | None, strict: bool) -> RawDataset``
registered in ``DATA_FORMATS``; plugins add formats through the ``tltk.datasets``
entry-point group.
"""

from __future__ import annotations

import csv
import gzip
import math
import pickle
import re
import struct
from pathlib import Path, PurePath
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np

from tltk.data.images import is_hidden, is_image_file, scan_image_files, validate_images
from tltk.data.samples import RawDataset, Sample, relative_id
from tltk.errors import DataError, printable
from tltk.registry import DATA_FORMATS  # the registry of the tltk.datasets entry-point group


class FormatReader(Protocol):
    def __call__(self, path: Path, *, image_root: Path | None, strict: bool) -> RawDataset: ...



# --------------------------------------------------------------------------- folder

# Folder names that mean "a split of the dataset" rather than "a class".
SPLIT_FOLDER_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@DATA_FORMATS.register("folder")
def read_folder(path: Path, *, image_root: Path | None = None, strict: bool = False) -> RawDataset:
    """Class-named subfolders, optionally inside ``train/``, ``val/`` and ``test/``."""
    root = _existing_dir(path, "folder")
    split_dirs = _folder_split_dirs(root)
    class_dirs = {split: _class_subfolders(folder) for split, folder in split_dirs.items()}
    class_names = _folder_class_names(root, class_dirs)

    listed: list[tuple[str, int, Path]] = []  # (split, target, file)
    problems: dict[str, str] = {}
    for split, classes in class_dirs.items():
        for name, folder in classes.items():
            files = scan_image_files(folder)
            if not files:
                problems.setdefault(name, (
                    f"Class folder {folder} contains no images; add images "
                    f"({', '.join(sorted(_EXTENSIONS_FOR_MESSAGES))}), remove the folder or leave the class out "
                    f"with --classes."
                ))
            listed.extend((split, class_names.index(name), file) for file in files)

    good, bad = validate_images([file for _, _, file in listed], strict=strict)
    decodable = set(good)
    splits: dict[str, list[Sample]] = {split: [] for split in split_dirs}
    for split, target, file in listed:
        if file in decodable:
            splits[split].append(Sample(str(file.absolute()), target, relative_id(file, root)))
    for name, problem in _undecodable_classes(splits, class_names, class_dirs, bad).items():
        problems.setdefault(name, problem)
    return RawDataset(class_names, splits, str(root), skipped=[str(p.absolute()) for p in bad],
                      class_problems=problems)


_EXTENSIONS_FOR_MESSAGES = (".jpg", ".png", ".bmp", ".gif", ".tif", ".webp")


def _folder_split_dirs(root: Path) -> dict[str, Path]:
    """``{"train": ..., "test": ...}`` for a split layout, else ``{"all": root}``."""
    subdirs = _visible_subdirs(root)
    if not subdirs:
        raise DataError(
            f"No class subfolders in {root}; put each class's images in its own folder "
            f"({root}/CLASS/image.jpg)."
        )
    split_like = [d for d in subdirs if d.name.lower() in SPLIT_FOLDER_ALIASES]
    if not split_like:
        return {"all": root}
    if len(split_like) != len(subdirs):
        others = sorted(d.name for d in subdirs if d not in split_like)
        raise DataError(
            f"{root} mixes split folders ({', '.join(d.name for d in split_like)}) with class "
            f"folders ({', '.join(others)}); put the class folders inside {split_like[0].name}/."
        )
    split_dirs: dict[str, Path] = {}
    for folder in split_like:
        split = SPLIT_FOLDER_ALIASES[folder.name.lower()]
        if split in split_dirs:
            raise DataError(
                f"{root} has two {split} folders ({split_dirs[split].name}, {folder.name}); keep one."
            )
        split_dirs[split] = folder
    if "train" not in split_dirs:
        raise DataError(
            f"{root} has {', '.join(d.name for d in split_like)} folders but no train/ folder; "
            f"add {root}/train/CLASS/ folders."
        )
    return dict(sorted(split_dirs.items(), key=lambda item: ("train", "val", "test").index(item[0])))


def _visible_subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p.name))


def _class_subfolders(folder: Path) -> dict[str, Path]:
    return {d.name: d for d in _visible_subdirs(folder)}


def _folder_class_names(root: Path, class_dirs: dict[str, dict[str, Path]]) -> list[str]:
    """Sorted union of class folders over the splits; every class must be in train."""
    names = sorted({name for classes in class_dirs.values() for name in classes})
    if "all" in class_dirs:
        return names
    train = class_dirs["train"]
    if not train:
        raise DataError(f"No class subfolders in {root}/train; add {root}/train/CLASS/ folders.")
    for split, classes in class_dirs.items():
        missing = sorted(set(classes) - set(train))
        if missing:
            raise DataError(
                f"Class folder {root}/{split}/{missing[0]} has no counterpart in "
                f"{root}/train; add {root}/train/{missing[0]}/ with training images or remove it."
            )
    return names


def _undecodable_classes(
    splits: dict[str, list[Sample]],
    class_names: list[str],
    class_dirs: dict[str, dict[str, Path]],
    bad: list[Path],
) -> dict[str, str]:
    """A class folder whose every image was undecodable is as unusable as an empty one; the
    sentence for each such class, raised later only if --classes keeps the class."""
    problems: dict[str, str] = {}
    for split, classes in class_dirs.items():
        present = {sample.target for sample in splits[split]}
        for name, folder in classes.items():
            if class_names.index(name) not in present and any(folder in p.parents for p in bad):
                skipped = sum(1 for p in bad if folder in p.parents)
                problems.setdefault(name, (
                    f"Class folder {folder} has no decodable images ({skipped} could not be "
                    f"decoded); replace them, remove the folder or leave the class out with --classes."
                ))
    return problems


# --------------------------------------------------------------------------- cifar10

CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_DEFAULT_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


@DATA_FORMATS.register("cifar10")
def read_cifar10(path: Path, *, image_root: Path | None = None, strict: bool = False) -> RawDataset:
    """The CIFAR-10 "python version" pickles (``data_batch_1..5``, ``test_batch``).

    The batches are pickles, as distributed; only load them from a source you trust.
    """
    folder = find_cifar10_dir(path)
    if folder is None:
        raise DataError(
            f"No CIFAR-10 batches in {path}; expected {path}/data_batch_1 or "
            f"{path}/{CIFAR10_DIRNAME}/data_batch_1 (the CIFAR-10 python version)."
        )
    class_names = _cifar10_class_names(folder)
    train_files = [folder / name for name in CIFAR10_TRAIN_BATCHES if (folder / name).is_file()]
    parts = {"train": [_read_cifar10_batch(f, len(class_names)) for f in train_files]}
    if (folder / "test_batch").is_file():
        parts["test"] = [_read_cifar10_batch(folder / "test_batch", len(class_names))]
    return _in_memory_dataset(class_names, parts, str(folder))


def find_cifar10_dir(path: Path) -> Path | None:
    """The folder holding ``data_batch_1``: ``path`` itself or its ``cifar-10-batches-py``."""
    for candidate in (path, path / CIFAR10_DIRNAME):
        if (candidate / "data_batch_1").is_file():
            return candidate
    return None


def _cifar10_class_names(folder: Path) -> list[str]:
    """Names from ``batches.meta``; the standard ten if the file is missing."""
    meta_file = folder / "batches.meta"
    if not meta_file.is_file():
        return list(CIFAR10_DEFAULT_NAMES)
    meta = _load_pickle(meta_file)
    names = _pickle_field(meta, "label_names", meta_file)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _read_cifar10_batch(file: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(N x 32 x 32 x 3 uint8 HWC images, N labels) from one batch pickle.

    Rows are stored channel-planar (1024 red, 1024 green, 1024 blue values).
    """
    batch = _load_pickle(file)
    data = np.asarray(_pickle_field(batch, "data", file), dtype=np.uint8)
    labels = np.asarray(_pickle_field(batch, "labels", file), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(
            f"CIFAR-10 batch {file} has data of shape {data.shape} and {len(labels)} labels; "
            f"expected N x 3072 and N labels (the CIFAR-10 python version)."
        )
    _check_label_range(labels, num_classes, file)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and NumPy arrays, and nothing that could run code.

    CIFAR-10's python batches are pickles; a file from an untrusted mirror could name any
    callable in its stream, so only the globals a NumPy array needs to rebuild are allowed.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: CIFAR-10 batches hold only arrays")
        return super().find_class(module, name)


def _load_pickle(file: Path) -> object:
    try:
        with open(file, "rb") as handle:
            return _ArraysOnlyUnpickler(handle, encoding="bytes").load()
    except Exception as exc:
        raise DataError(
            f"Cannot read CIFAR-10 file {file} ({type(exc).__name__}: {exc}); download the "
            f"python version of CIFAR-10 again."
        ) from exc


def _pickle_field(obj: object, key: str, file: Path) -> object:
    if isinstance(obj, dict):
        for candidate in (key.encode(), key):
            if candidate in obj:
                return obj[candidate]
    hint = ""
    if key == "labels" and isinstance(obj, dict) and b"fine_labels" in obj:
        hint = " (this looks like CIFAR-100, which is not supported)"
    raise DataError(
        f"CIFAR-10 file {file} has no '{key}' entry{hint}; expected the CIFAR-10 python version."
    )


# --------------------------------------------------------------------------- mnist

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
MNIST_CLASS_NAMES = [str(i) for i in range(10)]


@DATA_FORMATS.register("mnist")
def read_mnist(path: Path, *, image_root: Path | None = None, strict: bool = False) -> RawDataset:
    """MNIST IDX files (optionally gzipped), flat or in torchvision's ``MNIST/raw/``."""
    folder = find_mnist_dir(path)
    if folder is None:
        raise DataError(
            f"No MNIST files in {path}; expected train-images-idx3-ubyte[.gz] and "
            f"train-labels-idx1-ubyte[.gz] there or in {path}/MNIST/raw."
        )
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for split, (images_name, labels_name) in MNIST_FILES.items():
        images_file = _find_idx_file(folder, images_name)
        labels_file = _find_idx_file(folder, labels_name)
        if images_file is None and labels_file is None and split != "train":
            continue
        if images_file is None or labels_file is None:
            missing = images_name if images_file is None else labels_name
            raise DataError(
                f"MNIST file {folder}/{missing}[.gz] is missing; add it next to the other IDX files."
            )
        parts[split] = [_read_mnist_pair(images_file, labels_file)]
    return _in_memory_dataset(MNIST_CLASS_NAMES, parts, str(folder))


def find_mnist_dir(path: Path) -> Path | None:
    """The folder holding the MNIST training images: ``path``, ``path/raw`` or ``path/MNIST/raw``."""
    for candidate in (path, path / "raw", path / "MNIST" / "raw"):
        if _find_idx_file(candidate, MNIST_FILES["train"][0]) is not None:
            return candidate
    return None


def _find_idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_mnist_pair(images_file: Path, labels_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N x H x W x 1 images, N labels) from matching IDX image and label files."""
    images = read_idx(images_file, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_file, IDX_LABELS_MAGIC).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(
            f"MNIST files disagree: {images_file} has {len(images)} images but {labels_file} "
            f"has {len(labels)} labels; download the pair again."
        )
    _check_label_range(labels, len(MNIST_CLASS_NAMES), labels_file)
    return images[..., np.newaxis], labels


def read_idx(file: Path, expected_magic: int) -> np.ndarray:
    """An unsigned-byte IDX array, checking the magic number and that the size matches the header.

    Header: two zero bytes, a type byte (0x08 = uint8), the number of dimensions, then
    each dimension as a big-endian uint32.
    """
    raw = _read_maybe_gzip(file)
    kind = "images" if expected_magic == IDX_IMAGES_MAGIC else "labels"
    if len(raw) < 4 or struct.unpack(">I", raw[:4])[0] != expected_magic:
        found = f"0x{struct.unpack('>I', raw[:4])[0]:08x}" if len(raw) >= 4 else "nothing"
        raise DataError(
            f"{file} is not an IDX {kind} file (magic number {found}, expected "
            f"0x{expected_magic:08x}); download the MNIST file again."
        )
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"{file} ends inside its IDX header; download the MNIST file again.")
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected_size = header_size + math.prod(dims)
    if len(raw) != expected_size:
        raise DataError(
            f"{file} has {len(raw)} bytes but its IDX header {tuple(dims)} needs {expected_size}; "
            f"the file is truncated or corrupt, download it again."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims)


def _read_maybe_gzip(file: Path) -> bytes:
    try:
        if file.suffix == ".gz":
            with gzip.open(file, "rb") as handle:
                return handle.read()
        return file.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(f"Cannot read {file} ({exc}); download the MNIST file again.") from exc


# --------------------------------------------------------------------------- csv

CSV_FILE_COLUMNS = ("filename", "file", "image", "path", "id")
CSV_LABEL_COLUMNS = ("label", "class", "target")
CSV_LABEL_LIST_COLUMNS = ("labels", "tags")


@DATA_FORMATS.register("csv")
def read_csv(path: Path, *, image_root: Path | None = None, strict: bool = False) -> RawDataset:
    """A ``filename,label`` CSV, or multi-label: ``filename,labels`` (space-separated) or 0/1 columns.

    Files are relative to ``image_root`` (default: the CSV's folder).
    """
    if not path.is_file():
        raise DataError(f"CSV file {path} does not exist; check the --data spec.")
    root = image_root if image_root is not None else path.parent
    if not root.is_dir():
        raise DataError(f"Image root {root} for {path} is not a folder; check --image-root.")
    if _csv_is_multilabel(path):
        class_names, labelled = _read_multilabel_csv(path)
        return _csv_dataset(path, root, class_names, labelled, strict)
    rows = _read_csv_rows(path)
    class_names = _csv_class_names([label for _, label in rows])
    return _csv_dataset(path, root, class_names, [(name, class_names.index(label)) for name, label in rows], strict)


def _csv_dataset(
    path: Path, root: Path, class_names: list[str], rows: list[tuple[str, int | tuple[int, ...]]], strict: bool
) -> RawDataset:
    files = resolve_image_names([name for name, _ in rows], root, path)
    good, bad = validate_images(files, strict=strict)
    if not good:
        raise DataError(
            f"None of the {len(files)} images listed in {path} could be read (first: {files[0]}); "
            f"check that --image-root ({root}) is the folder the file names (or, for names without an "
            f"extension, the images named after them) are in."
        )
    decodable = set(good)
    samples = [
        Sample(str(file.absolute()), target, name) for file, (name, target) in zip(files, rows) if file in decodable
    ]
    return RawDataset(class_names, {"all": samples}, str(path), skipped=[str(p.absolute()) for p in bad])


def resolve_image_names(names: Sequence[str], root: Path, listing: Path) -> list[Path]:
    """The file each name in ``listing`` means, under ``root``.

    A name with an image extension is a path relative to ``root``. A name without one (a
    Kaggle ``id`` column, ``train/{id}.jpg`` on disk) is the one image under ``root``
    whose path, less its extension, ends with that name. The folder is indexed once for
    the whole listing, not once per row: label files run to 100,000 rows. A name that
    matches nothing is returned as ``root/name`` and counts as an unreadable image.
    """
    bare = [name for name in names if not is_image_file(Path(name))]
    if not bare:
        return [root / name for name in names]
    index = _images_by_stem(root)
    resolved = {name: _image_named(name, index, root, listing) for name in dict.fromkeys(bare)}
    return [resolved.get(name, root / name) for name in names]


def _images_by_stem(root: Path) -> dict[str, list[Path]]:
    """Every image under ``root`` (recursively, hidden ones aside), grouped by file stem."""
    index: dict[str, list[Path]] = {}
    for file in scan_image_files(root):
        index.setdefault(file.stem, []).append(file)
    return index


def _image_named(name: str, index: dict[str, list[Path]], root: Path, listing: Path) -> Path:
    """The one image for an extension-less name: the file itself if it exists, else by stem."""
    literal = root / name
    if literal.is_file():
        return literal
    parts = PurePath(name).parts
    if not parts:
        return literal
    matches = [
        file for file in index.get(parts[-1], []) if file.relative_to(root).with_suffix("").parts[-len(parts):] == parts
    ]
    if len(matches) > 1:
        more = f" and {len(matches) - 2} more" if len(matches) > 2 else ""
        raise DataError(
            f"{listing} names image '{printable(name)}' without an extension, and {len(matches)} images match it: "
            f"{matches[0]}, {matches[1]}{more}; "
            f"write the file name with its extension in the CSV or point --image-root at the folder that holds only one."
        )
    return matches[0] if matches else literal


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return [cell.strip().lower() for cell in next(csv.reader(handle), [])]
    except (UnicodeDecodeError, csv.Error):
        return []  # the multi-class reader reports it


def _csv_is_multilabel(path: Path) -> bool:
    """A labels/tags column, or no label column but several 0/1 class columns."""
    header = _csv_header(path)
    if any(c in header for c in CSV_LABEL_LIST_COLUMNS):
        return True
    has_file = any(c in header for c in CSV_FILE_COLUMNS)
    has_label = any(c in header for c in CSV_LABEL_COLUMNS)
    return has_file and not has_label and len(header) >= 3


def _read_multilabel_csv(path: Path) -> tuple[list[str], list[tuple[str, tuple[int, ...]]]]:
    """(class names, (file, per-class 0/1 labels) per row) from either multi-label layout."""
    header, rows = _read_table(path)
    lowered = [cell.lower() for cell in header]
    file_col = next(lowered.index(c) for c in CSV_FILE_COLUMNS if c in lowered)
    if not rows:
        raise DataError(f"CSV file {path} lists no images; add one row per image.")
    list_col = next((lowered.index(c) for c in CSV_LABEL_LIST_COLUMNS if c in lowered), None)
    if list_col is not None:
        return _label_list_rows(path, rows, file_col, list_col)
    return _indicator_rows(path, header, rows, file_col)


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(stripped header cells, (line number, cells) per non-blank row)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [cell.strip() for cell in next(reader, [])]
            rows = [(number, row) for number, row in enumerate(reader, start=2) if any(cell.strip() for cell in row)]
    except UnicodeDecodeError as exc:
        raise DataError(f"CSV file {path} is not UTF-8 text ({exc}); save it as UTF-8.") from exc
    except csv.Error as exc:
        raise DataError(f"CSV file {path} is malformed ({exc}); fix the file.") from exc
    return header, rows


def _label_list_rows(
    path: Path, rows: list[tuple[int, list[str]]], file_col: int, list_col: int
) -> tuple[list[str], list[tuple[str, tuple[int, ...]]]]:
    """Rows of ``file,labels``; an empty label list is an image negative for every class."""
    parsed = []
    for number, row in rows:
        if len(row) <= max(file_col, list_col):
            raise DataError(f"Row {number} of {path} has {len(row)} cells; every row needs a file and its labels.")
        parsed.append((_file_cell(row[file_col], number, path), set(row[list_col].split())))
    class_names = _csv_class_names([label for _, labels in parsed for label in labels])
    if not class_names:
        raise DataError(f"CSV file {path} names no labels in any row; list each image's labels, space-separated.")
    return class_names, [(name, tuple(int(c in labels) for c in class_names)) for name, labels in parsed]


def _file_cell(cell: str, number: int, path: Path) -> str:
    name = _normalise_file_name(cell)
    if not name:
        raise DataError(f"Row {number} of {path} has an empty file name; fill it in or delete the row.")
    return name


def _indicator_rows(
    path: Path, header: list[str], rows: list[tuple[int, list[str]]], file_col: int
) -> tuple[list[str], list[tuple[str, tuple[int, ...]]]]:
    class_cols = [i for i in range(len(header)) if i != file_col]
    parsed = []
    for number, row in rows:
        if len(row) != len(header):
            raise DataError(f"Row {number} of {path} has {len(row)} cells but the header has {len(header)}.")
        values = [row[i].strip() for i in class_cols]
        bad = next((v for v in values if v not in ("0", "1", "-1")), None)
        if bad is not None:
            column = header[class_cols[values.index(bad)]]
            raise DataError(
                f"Row {number} of {path} has '{printable(bad)}' in class column '{printable(column)}'; class columns hold 0, 1 or -1."
            )
        parsed.append((_file_cell(row[file_col], number, path), tuple(int(v) for v in values)))
    return [header[i] for i in class_cols], parsed


def _read_csv_rows(path: Path) -> list[tuple[str, str]]:
    """(file name, label) per data row; duplicates with the same label are dropped."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise DataError(f"CSV file {path} is empty; add a header row 'filename,label' and one row per image.")
            file_col, label_col = _csv_columns(header, path)
            rows = _csv_data_rows(reader, file_col, label_col, path)
    except UnicodeDecodeError as exc:
        raise DataError(f"CSV file {path} is not UTF-8 text ({exc}); save it as UTF-8.") from exc
    except csv.Error as exc:
        raise DataError(f"CSV file {path} is malformed ({exc}); fix the file.") from exc
    if not rows:
        raise DataError(f"CSV file {path} lists no images; add one 'filename,label' row per image.")
    return rows


def _csv_columns(header: list[str], path: Path) -> tuple[int, int]:
    names = [cell.strip().lower() for cell in header]
    file_col = next((names.index(c) for c in CSV_FILE_COLUMNS if c in names), None)
    label_col = next((names.index(c) for c in CSV_LABEL_COLUMNS if c in names), None)
    if file_col is None or label_col is None:
        raise DataError(
            f"CSV file {path} has columns {printable(', '.join(header))}; expected a file column "
            f"({'/'.join(CSV_FILE_COLUMNS)}) and a label column ({'/'.join(CSV_LABEL_COLUMNS)})."
        )
    return file_col, label_col


def _csv_data_rows(reader: Iterable[list[str]], file_col: int, label_col: int, path: Path) -> list[tuple[str, str]]:
    rows: dict[str, str] = {}
    for line_number, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(file_col, label_col):
            raise DataError(f"Row {line_number} of {path} has {len(row)} cells; every row needs a file and a label.")
        name, label = _normalise_file_name(row[file_col]), row[label_col].strip()
        if not name or not label:
            raise DataError(f"Row {line_number} of {path} has an empty file name or label; fill it in or delete the row.")
        if re.search(r"\s", label):
            raise DataError(
                f"Row {line_number} of {path} has label '{printable(label)}' with spaces; give one label per image, "
                f"or name the column 'labels' for a space-separated list of several."
            )
        if rows.get(name, label) != label:
            raise DataError(
                f"{path} lists {printable(name)} twice with labels '{printable(rows[name])}' and '{printable(label)}' "
                f"(row {line_number}); keep one row per image."
            )
        rows[name] = label
    return list(rows.items())


def _normalise_file_name(cell: str) -> str:
    cell = cell.strip()
    return PurePath(cell).as_posix() if cell else ""


def _csv_class_names(labels: list[str]) -> list[str]:
    """Sorted unique labels; numerically when they are all integers ("2" before "10")."""
    unique = set(labels)
    if all(re.fullmatch(r"[+-]?\d+", label) for label in unique):
        return sorted(unique, key=lambda label: (int(label), label))
    return sorted(unique)


# --------------------------------------------------------------------------- builtin


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (no download), scaled from 0..16 to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images[..., np.newaxis], digits.target.astype(np.int64)


# name -> (loader returning (N x H x W x C uint8, labels), class names)
BUILTIN_DATASETS: dict[str, tuple[Callable[[], tuple[np.ndarray, np.ndarray]], list[str]]] = {
    "digits": (_load_digits, [str(i) for i in range(10)]),
}


@DATA_FORMATS.register("builtin")
def read_builtin(path: Path, *, image_root: Path | None = None, strict: bool = False) -> RawDataset:
    """A small dataset that ships with a dependency, for demos and tests (``builtin:digits``)."""
    name = str(path)
    if name not in BUILTIN_DATASETS:
        raise DataError(
            f"Unknown builtin dataset '{printable(name)}'; known builtin datasets: {', '.join(sorted(BUILTIN_DATASETS))}."
        )
    loader, class_names = BUILTIN_DATASETS[name]
    return _in_memory_dataset(class_names, {"all": [loader()]}, f"builtin:{name}")


# --------------------------------------------------------------------------- shared


def _in_memory_dataset(
    class_names: list[str], parts: dict[str, list[tuple[np.ndarray, np.ndarray]]], root: str
) -> RawDataset:
    """Stack each split's arrays into one array; samples point at rows, ids are ``split/i``."""
    arrays: list[np.ndarray] = []
    splits: dict[str, list[Sample]] = {}
    offset = 0
    for split, chunks in parts.items():
        labels = np.concatenate([chunk_labels for _, chunk_labels in chunks])
        arrays.extend(images for images, _ in chunks)
        splits[split] = [Sample(offset + i, int(label), f"{split}/{i}") for i, label in enumerate(labels)]
        offset += len(labels)
    return RawDataset(class_names, splits, root, arrays=np.concatenate(arrays))


def drop_undecodable(labelled: dict[str, list[Sample]], class_names: list[str], root: Path,
                     strict: bool) -> RawDataset:
    """The dataset of file samples whose images decode; the rest are reported as skipped
    (or, with ``strict``, the first is an error). Each file is decoded once, however many
    samples name it."""
    files = [Path(str(s.source)) for samples in labelled.values() for s in samples]
    good, bad = validate_images(list(dict.fromkeys(files)), strict=strict)
    decodable = {str(p.absolute()) for p in good}
    splits = {name: [s for s in samples if s.source in decodable] for name, samples in labelled.items()}
    return RawDataset(class_names, splits, str(root), skipped=[str(p.absolute()) for p in bad])


def _check_label_range(labels: np.ndarray, num_classes: int, file: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{file} has labels {int(labels.min())}..{int(labels.max())} but only {num_classes} "
            f"class names; the file is corrupt or from another dataset."
        )


def _existing_dir(path: Path, format_name: str) -> Path:
    if not path.exists():
        raise DataError(f"Data folder {path} does not exist; check the --data spec.")
    if not path.is_dir():
        raise DataError(f"{format_name}:{path} is not a folder; give the dataset's folder.")
    return path
