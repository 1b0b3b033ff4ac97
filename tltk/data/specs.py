"""The ``--data`` spec: ``FORMAT:PATH`` or a bare path whose format is recognised, and
``load_data``, which turns a spec into train/val/test ``DataSplits``.

A prefix counts as a format only if it is a registered format name, so paths that
contain ':' still work as bare paths.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from tltk.data.cifar10 import find_cifar10_dir
from tltk.data.coco import find_coco_dir
from tltk.data.formats import DATA_FORMATS
from tltk.data.hf import find_hf_dir
from tltk.data.mnist import find_mnist_dir
from tltk.data.voc import find_voc_dir
from tltk.data.images import is_hidden
from tltk.data.samples import DataSplits
from tltk.data.splits import (
    check_classes,
    check_fraction,
    filter_classes,
    limit_per_class,
    make_splits,
    resolve_ignored,
)
from tltk.errors import DataError
from tltk.fileio import user_path

_FORMAT_HINT = "folder:PATH, cifar10:PATH, mnist:PATH, voc:PATH, coco:PATH, hf:PATH, csv:FILE, builtin:digits"


def parse_spec(spec: str) -> tuple[str | None, str]:
    """(format name, or None to auto-detect; the location after the prefix)."""
    text = spec.strip()
    if not text:
        raise DataError(f"The data spec is empty; give a path or name the format ({_FORMAT_HINT}).")
    prefix, sep, rest = text.partition(":")
    if sep and prefix in DATA_FORMATS:
        if not rest.strip():
            raise DataError(f"The data spec '{spec}' names no path after '{prefix}:'; use e.g. {prefix}:PATH.")
        return prefix, rest.strip()
    name, named, location = rest.partition(":")
    if sep and named and f"{prefix}:{name}" in DATA_FORMATS:  # package:format:PATH, as a run records a plugin's
        return f"{prefix}:{name}", location.strip()
    return None, text


def resolve_spec(spec: str) -> tuple[str, Path]:
    """(format name, path) for a spec, detecting the format when none is named."""
    format_name, location = parse_spec(spec)
    if format_name == "builtin":
        return format_name, Path(location)
    path = user_path(location)
    if format_name is not None:
        return format_name, path
    if not path.exists():
        raise DataError(_missing_path_message(spec, path))
    return detect_format(path), path


def absolute_spec(spec: str) -> str:
    """``spec`` with its path made absolute (``~`` expanded) and its format prefix kept as
    given: what a run directory records, so that the run finds its data from any working
    directory. A builtin name is not a path and stays as it is."""
    format_name, location = parse_spec(spec)
    if format_name == "builtin":
        return f"builtin:{location}"
    path = absolute_path(location)
    return f"{format_name}:{path}" if format_name is not None else path


def absolute_path(text: str) -> str:
    """``text`` as an absolute path (``~`` expanded, relative to the working directory)."""
    return str(user_path(text).absolute())


def spec_location(spec: str) -> Path | None:
    """Where on disk the data of ``spec`` lives, as written (relative stays relative); None for builtin."""
    format_name, location = parse_spec(spec)
    return None if format_name == "builtin" else user_path(location)


def same_data(spec: str, other: str) -> bool:
    """Whether two specs name the same data, however each spelled the path, as seen from here."""
    return absolute_spec(spec) == absolute_spec(other)


def detect_format(path: Path) -> str:
    """Which built-in format the data at ``path`` is in, from what is on disk."""
    if path.is_dir():
        if find_voc_dir(path) is not None:
            return "voc"
        if find_coco_dir(path) is not None:
            return "coco"
        if find_cifar10_dir(path) is not None:
            return "cifar10"
        if find_mnist_dir(path) is not None:
            return "mnist"
        if find_hf_dir(path) is not None:  # before folder: save_to_disk's split folders look like classes
            return "hf"
        if any(child.is_dir() and not is_hidden(child.name) for child in path.iterdir()):
            return "folder"
    elif path.is_file() and path.suffix.lower() == ".csv":
        return "csv"
    elif path.is_file() and path.suffix.lower() == ".parquet":
        return "hf"
    claimed = plugin_format_for(path)
    if claimed is not None:
        return claimed
    raise DataError(
        f"No dataset format recognised at {path}; expected class subfolders, CIFAR-10 batches, "
        f"MNIST IDX files, a VOCdevkit folder, a COCO folder (annotations/instances_*.json), a Hugging Face "
        f"dataset (save_to_disk or parquet files) or a .csv file "
        f"(or name the format: {', '.join(_written(name) for name in DATA_FORMATS.names())})."
    )


def _written(format_name: str) -> str:
    """How a spec of the format is written: ``folder:PATH``, and the two that take no folder."""
    return {"builtin": "builtin:digits", "csv": "csv:FILE"}.get(format_name, f"{format_name}:PATH")


def plugin_format_for(path: Path) -> str | None:
    """The installed plugin format whose reader recognises ``path`` (``tltk.plugin.recognises``),
    asked only after tltk's own formats: a plugin never takes a path from them."""
    for entry in DATA_FORMATS.entries():
        if entry.builtin or DATA_FORMATS.try_load(entry).obj is None:
            continue
        check = getattr(entry.obj, "recognises", None)
        try:
            if check is not None and check(path):
                return DATA_FORMATS.listed_name(entry)
        except Exception:  # a plugin's check that breaks claims nothing; using the format by name will tell why
            continue
    return None


def format_options(reader: Callable[..., Any], format_name: str, **given: Any) -> dict[str, Any]:
    """The format-specific options that were given, for a reader that declares them; one it
    does not declare is refused by name rather than silently ignored."""
    given = {key: value for key, value in given.items() if value is not None}
    try:
        accepted = inspect.signature(reader).parameters
    except (TypeError, ValueError):  # no signature to read: the call will tell
        return given
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return given
    unknown = [key for key in given if key not in accepted]
    if unknown:
        raise DataError(f"--{unknown[0].replace('_', '-')} does not apply to {format_name}: data; drop it.")
    return given


def _missing_path_message(spec: str, path: Path) -> str:
    prefix, sep, _ = spec.strip().partition(":")
    if sep and re.fullmatch(r"[A-Za-z][\w-]*", prefix) and len(prefix) > 1:
        return (
            f"Unknown data format '{prefix}' in '{spec}'; known formats: "
            f"{', '.join(DATA_FORMATS.names())} (or give an existing path)."
        )
    return f"Data path {path} does not exist; check the --data spec."


def load_data(
    spec: str,
    *,
    image_root: str | None = None,
    val_split: float = 0.1,
    test_split: float = 0.2,
    seed: int = 0,
    strict: bool = False,
    classes: Sequence[str] | None = None,
    train_per_class: int | None = None,
    difficult: str = "ignore",
    image_column: str | None = None,
    label_column: str | None = None,
) -> DataSplits:
    """Read the dataset named by ``spec`` and split it into train/val/test.

    The dataset's own splits are kept; a missing test split is carved from the data and a
    missing val split from train (stratified, seeded). ``classes`` keeps only those
    classes, before any check that each class has samples (so a class that has none can be
    left out); ``train_per_class`` then caps the training samples per class. ``image_column``
    and ``label_column`` go to formats that take them (``hf:``) and are refused by the others.
    """
    check_fraction(val_split, "--val-split")
    check_fraction(test_split, "--test-split")
    format_name, path = resolve_spec(spec)
    reader = DATA_FORMATS.get(format_name)
    root = user_path(image_root) if image_root is not None else None
    options = format_options(reader, format_name, image_column=image_column, label_column=label_column)
    raw = reader(path, image_root=root, strict=strict, **options)
    if classes:
        raw = filter_classes(raw, classes)
    check_classes(raw, filtered=bool(classes))
    train, val, test = make_splits(raw, val_split=val_split, test_split=test_split, seed=seed)
    if train_per_class is not None:
        train = limit_per_class(train, train_per_class, seed)
    train, val, test = (resolve_ignored(part, difficult) for part in (train, val, test))
    data = DataSplits(
        spec=spec,
        format=format_name,
        class_names=list(raw.class_names),
        train=train,
        val=val,
        test=test,
        arrays=raw.arrays,
        skipped=list(raw.skipped),
    )
    data.fingerprint = data.compute_fingerprint()
    return data
