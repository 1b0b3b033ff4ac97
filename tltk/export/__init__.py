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
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import IO, Any, Callable, Iterable, Iterator

import numpy as np

from tltk.data.images import IMAGE_EXTENSIONS
from tltk.errors import TltkError
from tltk.fileio import atomic_write, user_path
from tltk.kinds import option_help
from tltk.predict import Predictions
from tltk.registry import EXPORTERS, PluginError, build

Exporter = Callable[..., None]
ID_SOURCES = ("stem", "path", "index")


@dataclass
class PredictionStream:
    """Predictions that arrive one batch at a time (``Run.iter_predictions``), so that a file
    of any number of rows is written while memory holds one batch.

    tltk's own exporters write each batch as it comes (they are marked with
    ``writes_batches``); another exporter is given the batches joined into one
    ``Predictions``, as its contract says. ``rows`` counts the rows handed out so far.
    """

    batches: Iterable[Predictions]
    class_names: list[str]
    task: str
    tta: str = "none"  # the test-time augmentation the probabilities were averaged over (tltk.tta)
    rows: int = 0

    def __iter__(self) -> Iterator[Predictions]:
        for batch in self.batches:
            self.rows += len(batch)
            yield batch

    def joined(self) -> Predictions:
        """Every batch in one ``Predictions``: for what needs all rows at once."""
        parts = list(self)
        probabilities = (np.concatenate([p.probabilities for p in parts]) if parts
                         else np.zeros((0, len(self.class_names)), np.float32))
        return Predictions([i for p in parts for i in p.ids], [x for p in parts for x in p.paths], probabilities,
                           list(self.class_names), self.task, self.tta)


def writes_batches(exporter: Exporter) -> Exporter:
    """Mark an exporter that takes a ``PredictionStream`` as well as ``Predictions``."""
    exporter.writes_batches = True  # type: ignore[attr-defined]
    return exporter


def export(predictions: Predictions | PredictionStream, out: str | Path, format: str = "csv", **options: Any) -> Path:
    """Write ``predictions`` to ``out`` with the exporter ``format``; options left None are not given."""
    path = user_path(out)
    if isinstance(predictions, PredictionStream) and not getattr(EXPORTERS.get(format), "writes_batches", False):
        predictions = predictions.joined()
    build("exporter", format, predictions, path, **options)
    if not path.is_file():
        raise PluginError(f"exporter '{format}' from {EXPORTERS.origin(format)} wrote no file at {path}; "
                          f"an exporter must write the file it is given.")
    return path


def batches(predictions: Predictions | PredictionStream) -> Iterable[Predictions]:
    return [predictions] if isinstance(predictions, Predictions) else predictions


@dataclass
class RowIds:
    """Row ids batch after batch: the image's file stem (Kaggle's usual id), its relative
    path, or its row index. An id given twice is collected and refused by ``check``, once
    every row is seen (the file being written is then dropped)."""

    id_from: str
    count: int = 0
    seen: set[str] = field(default_factory=set)
    repeated: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.id_from not in ID_SOURCES:
            raise TltkError(f"--id-from '{self.id_from}' is not one of {', '.join(ID_SOURCES)}.")

    def of(self, predictions: Predictions) -> list[str]:
        start, self.count = self.count, self.count + len(predictions)
        if self.id_from == "index":
            return [str(i) for i in range(start, self.count)]
        ids = [image_stem(i) if self.id_from == "stem" else i for i in predictions.ids]
        for row_id in ids:
            if row_id in self.seen:
                self.repeated.add(row_id)
            self.seen.add(row_id)
        return ids

    def check(self) -> None:
        if self.repeated:
            duplicated = sorted(self.repeated)
            raise TltkError(
                f"{len(duplicated)} id(s) occur more than once with --id-from {self.id_from} (first: {duplicated[0]}); "
                f"use --id-from path."
            )


def output_ids(predictions: Predictions, id_from: str) -> list[str]:
    """Every row's id (see ``RowIds``); ids given twice are one error."""
    ids = RowIds(id_from)
    rows = ids.of(predictions)
    ids.check()
    return rows


def write_rows(out: Path, write: Callable[[IO[str]], None]) -> None:
    """Write a text file row by row into a temporary file renamed over ``out`` at the end (see
    ``tltk.fileio``); file names that were not UTF-8 on disk are written back as their bytes."""

    def to_file(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as handle:
            write(handle)

    atomic_write(out, to_file)


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


@writes_batches
@option_help(threshold="multi-label: probability at which a label is predicted", id_from="row ids: stem, path or index")
def csv_exporter(predictions: Predictions | PredictionStream, out: Path, *, threshold: float = 0.5,
                 id_from: str = "path") -> None:
    """id, path, predicted label(s) and one probability column per class."""
    import csv

    ids = RowIds(id_from)

    def write(handle: IO[str]) -> None:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["id", "path", "predicted", *predictions.class_names])
        for batch in batches(predictions):
            rows = zip(ids.of(batch), batch.paths, label_sets(batch, threshold), batch.probabilities)
            for row_id, path, labels, probs in rows:
                writer.writerow([row_id, path, " ".join(labels), *(f"{p:.6g}" for p in probs)])
        ids.check()

    write_rows(out, write)


@writes_batches
@option_help(threshold="multi-label: probability at which a label is predicted", id_from="row ids: stem, path or index")
def jsonl_exporter(predictions: Predictions | PredictionStream, out: Path, *, threshold: float = 0.5,
                   id_from: str = "path") -> None:
    """One JSON object per image: id, path, predicted label(s), probabilities by class."""
    ids = RowIds(id_from)

    def write(handle: IO[str]) -> None:
        for batch in batches(predictions):
            rows = zip(ids.of(batch), batch.paths, label_sets(batch, threshold), batch.probabilities)
            for row_id, path, labels, probs in rows:
                record = {"id": row_id, "path": path, "predicted": labels,
                          "probabilities": {name: float(p) for name, p in zip(batch.class_names, probs)}}
                handle.write(json.dumps(record) + "\n")
        ids.check()

    write_rows(out, write)
