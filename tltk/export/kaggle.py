"""Kaggle submission CSVs, optionally shaped exactly like a competition's sample file.

Multi-class: ``id,label`` with the class name or index. Multi-label: one probability
column per class, or a space-separated label list. With ``--sample-submission`` the
output takes the sample's header, id column name and row order; every sample id must
have a prediction.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import IO

import numpy as np

from tltk.errors import TltkError
from tltk.export import PredictionStream, RowIds, batches, label_sets, output_ids, write_rows, writes_batches
from tltk.fileio import write_text
from tltk.kinds import option_help
from tltk.predict import Predictions

LABEL_AS = ("name", "index")
MULTILABEL_AS = ("probs", "labels")


@writes_batches
@option_help(label_as="multi-class: name or index of the class", multilabel_as="multi-label: probs or labels",
             threshold="multi-label: probability at which a label is predicted",
             sample_submission="match this file's header, id column and row order",
             id_from="row ids: stem, path or index")
def kaggle_exporter(
    predictions: Predictions | PredictionStream,
    out: Path,
    *,
    label_as: str = "name",
    multilabel_as: str = "probs",
    threshold: float = 0.5,
    sample_submission: str | None = None,
    id_from: str = "stem",
) -> None:
    """A submission CSV: ``id,label`` (multi-class) or per-class probabilities / label lists.

    Rows are written as their batches come, in input order, so a submission of any size
    holds one batch in memory; matching a sample file's row order needs every row first."""
    _check_choice("--label-as", label_as, LABEL_AS)
    _check_choice("--multilabel-as", multilabel_as, MULTILABEL_AS)
    if sample_submission is not None:
        whole = predictions.joined() if isinstance(predictions, PredictionStream) else predictions
        _write_in_sample_order(whole, out, label_as, multilabel_as, threshold, Path(sample_submission).expanduser(),
                               id_from)
        return
    ids = RowIds(id_from)

    def write(handle: IO[str]) -> None:
        writer = csv.writer(handle, lineterminator="\n")
        for number, batch in enumerate(batches(predictions)):
            header, values = _columns(batch, label_as, multilabel_as, threshold)
            if number == 0:
                writer.writerow(header)
            writer.writerows([row_id, *row] for row_id, row in zip(ids.of(batch), values))
        if ids.count == 0:
            writer.writerow(_columns(_no_rows(predictions), label_as, multilabel_as, threshold)[0])
        ids.check()

    write_rows(out, write)


def _write_in_sample_order(predictions: Predictions, out: Path, label_as: str, multilabel_as: str, threshold: float,
                           sample: Path, id_from: str) -> None:
    ids = output_ids(predictions, id_from)
    header, values = _columns(predictions, label_as, multilabel_as, threshold)
    rows = dict(zip(ids, values))
    header, order = _match_sample(sample, header, rows, predictions.class_names)
    values_by_column = _reorder_columns(header, rows, predictions, multilabel_as)
    write_text(out, _csv_text(header, {row_id: values_by_column[row_id] for row_id in order}))


def _no_rows(predictions: Predictions | PredictionStream) -> Predictions:
    """An empty ``Predictions`` of the same classes and task: the header of a file without rows."""
    return Predictions([], [], np.zeros((0, len(predictions.class_names)), np.float32), list(predictions.class_names),
                       predictions.task)


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise TltkError(f"{option} '{value}' is not one of {', '.join(choices)}.")


def _columns(
    predictions: Predictions, label_as: str, multilabel_as: str, threshold: float
) -> tuple[list[str], list[list[str]]]:
    if predictions.task == "multilabel" and multilabel_as == "probs":
        return ["id", *predictions.class_names], [[f"{p:.6g}" for p in row] for row in predictions.probabilities]
    if predictions.task == "multilabel":
        return ["id", "labels"], [[" ".join(labels)] for labels in label_sets(predictions, threshold)]
    if label_as == "index":
        return ["id", "label"], [[str(int(i))] for i in predictions.predicted_index()]
    return ["id", "label"], [[labels[0]] for labels in label_sets(predictions, threshold)]


def _match_sample(
    sample: Path, header: list[str], rows: dict[str, list[str]], class_names: list[str]
) -> tuple[list[str], list[str]]:
    """(the sample's header, its ids in order), after checking both fit the predictions."""
    sample_header, sample_ids = _read_sample(sample)
    if len(sample_header) != len(header):
        raise TltkError(
            f"{sample} has {len(sample_header)} columns ({', '.join(sample_header[:6])}) but this export has "
            f"{len(header)}; choose --multilabel-as to match the competition's format."
        )
    if len(header) > 2:
        unknown = [c for c in sample_header[1:] if c not in class_names]
        if unknown:
            raise TltkError(f"{sample} has class column '{unknown[0]}', which the run does not know.")
    missing = [i for i in sample_ids if i not in rows]
    if missing:
        raise TltkError(
            f"{len(missing)} id(s) in {sample} have no prediction (first: {', '.join(missing[:3])}); "
            f"predict on the competition's full test folder, or check --id-from."
        )
    return sample_header, sample_ids


def _read_sample(sample: Path) -> tuple[list[str], list[str]]:
    if not sample.is_file():
        raise TltkError(f"sample submission {sample} does not exist.")
    with open(sample, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header or len(header) < 2:
            raise TltkError(f"{sample} has no header with an id column and at least one value column.")
        ids = [row[0] for row in reader if row]
    return header, ids


def _reorder_columns(
    header: list[str], rows: dict[str, list[str]], predictions: Predictions, multilabel_as: str
) -> dict[str, list[str]]:
    """Per-class probability columns follow the sample's column order."""
    if predictions.task != "multilabel" or multilabel_as != "probs":
        return rows
    order = np.array([predictions.class_names.index(c) for c in header[1:]])
    return {row_id: list(np.array(values, dtype=object)[order]) for row_id, values in rows.items()}


def _csv_text(header: list[str], rows: dict[str, list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row_id, values in rows.items():
        writer.writerow([row_id, *values])
    return buffer.getvalue()
