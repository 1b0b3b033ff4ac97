"""``markdown``: predictions as a Markdown table, to paste into a report or a README."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from tltk.plugin import TltkError, write_text

if TYPE_CHECKING:
    from tltk.plugin import PredictionsLike

HEADER = ("id", "predicted", "probability")
LABEL_SEPARATOR = ", "


def markdown_exporter(predictions: PredictionsLike, out: Path, *, threshold: float = 0.5) -> None:
    """One row per image: its id, the predicted class (multi-label: every class at or above
    ``threshold``, or "(none)") and the probability of each predicted class."""
    if not 0.0 < threshold < 1.0:
        raise TltkError(f"--threshold {threshold} is not between 0 and 1; pass e.g. --threshold 0.5.")
    names = predictions.class_names
    if predictions.task == "multilabel":
        chosen = predictions.predicted_sets(threshold)
    else:
        chosen = [[int(i)] for i in predictions.predicted_index()]
    lines = [_row(HEADER), _row(("---",) * len(HEADER))]
    for row_id, classes, probabilities in zip(predictions.ids, chosen, predictions.probabilities):
        labels = LABEL_SEPARATOR.join(names[i] for i in classes) or "(none)"
        values = LABEL_SEPARATOR.join(f"{probabilities[i]:.3f}" for i in classes) or "-"
        lines.append(_row((row_id, labels, values)))
    write_text(out, "\n".join(lines) + "\n")


def read_markdown_table(path: Path) -> list[list[str]]:
    """The predicted labels of each row of a table ``markdown_exporter`` wrote, in row order."""
    rows = [_cells(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    if not rows or tuple(rows[0]) != HEADER:
        raise ValueError(f"{path} does not start with the header {' | '.join(HEADER)}")
    return [[] if row[1] == "(none)" else row[1].split(LABEL_SEPARATOR) for row in rows[2:]]


def _row(cells: tuple[str, ...]) -> str:
    return "| " + " | ".join(_escape(cell) for cell in cells) + " |"


def _escape(text: str) -> str:
    return " ".join(text.replace("\\", "\\\\").replace("|", "\\|").split())


def _cells(line: str) -> list[str]:
    inner = line.strip()[1:-1]
    return [re.sub(r"\\(.)", r"\1", cell.strip()) for cell in re.split(r"(?<!\\)\|", inner)]
