"""Tables as the page shows them: cells with the text a person reads and the exact value
behind it.

Each numeric cell keeps its exact value (``data-value`` in the page) beside its rounded
text, so sorting orders by the real number and a test can read back what was computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass(frozen=True)
class Cell:
    text: str
    value: float | None = None  # the exact number behind ``text``; None for text cells
    best: bool = False  # the best value of its column (ablation tables)
    link: str | None = None  # an anchor in the page

    @property
    def sort_key(self) -> str:
        return repr(self.value) if self.value is not None else self.text


@dataclass
class Table:
    """``name`` identifies the table in the page (``data-table``); ``numeric`` marks the right-aligned columns."""

    name: str
    columns: list[str]
    rows: list[list[Cell]]
    numeric: list[bool] = field(default_factory=list)
    sortable: bool = True
    caption: str = ""


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def figure_cell(value: Any, digits: int = 4) -> Cell:
    """A measured figure: four decimals (so a column lines up), the exact value kept; None as ``-``."""
    if not is_number(value):
        return Cell("-" if value is None else str(value))
    if isinstance(value, int):
        return Cell(str(value), float(value))
    return Cell(f"{value:.{digits}f}" if math.isfinite(value) else str(value), float(value))


def count_cell(value: Any) -> Cell:
    return Cell(str(value), float(value)) if is_number(value) else Cell("-" if value is None else str(value))


def text_cell(value: Any) -> Cell:
    """A setting as people write it (0.001, 1e-05, 64, a list joined by commas); None as ``-``."""
    from tltk.viz.compare import format_value

    if isinstance(value, (list, tuple)):
        return Cell(", ".join(map(str, value)) if value else "-")
    if isinstance(value, dict):
        return Cell(", ".join(f"{k}={v}" for k, v in value.items()) if value else "-")
    return Cell(format_value(value))


def mark_best(rows: Sequence[list[Cell]], column: int, lower_is_better: bool) -> None:
    """Mark the best finite value of ``column`` (every row that holds it, on a tie)."""
    values = [row[column].value for row in rows]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) < 2:
        return
    best = min(finite) if lower_is_better else max(finite)
    for row in rows:
        if row[column].value == best:
            cell = row[column]
            row[column] = Cell(cell.text, cell.value, True, cell.link)
