"""The ``csv`` format: a list of image files and their labels, multi-class or multi-label.

(The module is not called ``csv`` so that it never stands in for the standard library's.)
"""

from __future__ import annotations

import csv
import re
from pathlib import Path, PurePath
from typing import Iterable, Sequence

from tltk.data.images import is_image_file, scan_image_files, validate_images
from tltk.data.samples import RawDataset, Sample
from tltk.errors import DataError, printable

CSV_FILE_COLUMNS = ("filename", "file", "image", "path", "id")
CSV_LABEL_COLUMNS = ("label", "class", "target")
CSV_LABEL_LIST_COLUMNS = ("labels", "tags")


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
