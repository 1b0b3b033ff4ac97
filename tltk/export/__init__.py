"""Exporters: predictions to files people hand in or feed to other tools.

An exporter is ``(predictions, out, **options) -> None``; tltk's own are declared only as
entry points in its pyproject.toml under the ``tltk.exporters`` group, where other
packages add theirs (the contract is ``Exporter`` in ``tltk.plugin``). It is called
through the one component path (``tltk.registry.build``), so an option it does not
declare is refused by name: ``sample_submission`` with the ``jsonl`` format is an error
rather than silently ignored. Every exporter writes its file atomically and checks
everything before writing.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path, PurePath
from typing import Any, Callable

from tltk.data.images import IMAGE_EXTENSIONS
from tltk.errors import TltkError
from tltk.fileio import user_path, write_text
from tltk.kinds import option_help
from tltk.predict import Predictions
from tltk.registry import EXPORTERS, PluginError, build

Exporter = Callable[..., None]
ID_SOURCES = ("stem", "path", "index")


def export(predictions: Predictions, out: str | Path, format: str = "csv", **options: Any) -> Path:
    """Write ``predictions`` to ``out`` with the exporter ``format``; options left None are not given."""
    path = user_path(out)
    build("exporter", format, predictions, path, **options)
    if not path.is_file():
        raise PluginError(f"exporter '{format}' from {EXPORTERS.origin(format)} wrote no file at {path}; "
                          f"an exporter must write the file it is given.")
    return path


def output_ids(predictions: Predictions, id_from: str) -> list[str]:
    """Row ids: the image's file stem (Kaggle's usual id), its relative path, or its row index."""
    if id_from not in ID_SOURCES:
        raise TltkError(f"--id-from '{id_from}' is not one of {', '.join(ID_SOURCES)}.")
    if id_from == "index":
        return [str(i) for i in range(len(predictions))]
    ids = [image_stem(i) if id_from == "stem" else i for i in predictions.ids]
    duplicated = sorted(i for i, count in Counter(ids).items() if count > 1)
    if duplicated:
        raise TltkError(
            f"{len(duplicated)} id(s) occur more than once with --id-from {id_from} (first: {duplicated[0]}); "
            f"use --id-from path."
        )
    return ids


def image_stem(path: str) -> str:
    """The file name without its image extension: only a known image extension is cut, so an id such as
    ``scan.v2`` (a CSV name without extension) keeps its dot."""
    name = PurePath(path).name
    suffix = PurePath(name).suffix
    return name[: -len(suffix)] if suffix.lower() in IMAGE_EXTENSIONS else name


def label_sets(predictions: Predictions, threshold: float) -> list[list[str]]:
    names = predictions.class_names
    if predictions.task == "multilabel":
        return [[names[i] for i in row] for row in predictions.predicted_sets(threshold)]
    return [[names[i]] for i in predictions.predicted_index()]


@option_help(threshold="multi-label: probability at which a label is predicted", id_from="row ids: stem, path or index")
def csv_exporter(predictions: Predictions, out: Path, *, threshold: float = 0.5, id_from: str = "path") -> None:
    """id, path, predicted label(s) and one probability column per class."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "path", "predicted", *predictions.class_names])
    rows = zip(output_ids(predictions, id_from), predictions.paths, label_sets(predictions, threshold), predictions.probabilities)
    for row_id, path, labels, probs in rows:
        writer.writerow([row_id, path, " ".join(labels), *(f"{p:.6g}" for p in probs)])
    write_text(out, buffer.getvalue())


@option_help(threshold="multi-label: probability at which a label is predicted", id_from="row ids: stem, path or index")
def jsonl_exporter(predictions: Predictions, out: Path, *, threshold: float = 0.5, id_from: str = "path") -> None:
    """One JSON object per image: id, path, predicted label(s), probabilities by class."""
    lines = []
    rows = zip(output_ids(predictions, id_from), predictions.paths, label_sets(predictions, threshold), predictions.probabilities)
    for row_id, path, labels, probs in rows:
        record = {"id": row_id, "path": path, "predicted": labels,
                  "probabilities": {name: float(p) for name, p in zip(predictions.class_names, probs)}}
        lines.append(json.dumps(record))
    write_text(out, "\n".join(lines) + ("\n" if lines else ""))
