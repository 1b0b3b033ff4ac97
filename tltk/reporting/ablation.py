"""The ablation table of a report: one row per run, the settings that differ, the final figures.

Rows come from ``tltk.viz.compare`` (the table ``tltk compare`` prints), read from each
run's config.json and summary.json; settings every run shares are said once under the
table. The best value of each figure column is marked: the lowest for a loss, the highest
for everything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tltk.reporting.pictures import Picture, figure_picture
from tltk.reporting.tables import Cell, Table, figure_cell, mark_best, text_cell
from tltk.run import Run


@dataclass
class Ablation:
    table: Table
    shared: list[tuple[str, str]]  # settings every run has in common, as (name, value)
    curves: Picture


def ablation(runs: Sequence[Run], anchors: Sequence[str]) -> Ablation:
    from tltk.viz.compare import column_label, compare_figure, compare_runs, table_layout

    paths = [run.path for run in runs]
    rows = compare_runs(paths)
    columns, shared = table_layout(rows)
    settings = [key for key in columns if key != "name" and not _is_figure(key)]
    figures = [key for key in rows[0] if _is_figure(key) and not key.startswith("final_train_")]
    cells = [[Cell(row["name"], link=f"#{anchor}"), *(text_cell(row.get(key)) for key in settings),
              *(figure_cell(row.get(key)) for key in figures)] for row, anchor in zip(rows, anchors)]
    for offset, key in enumerate(figures, start=1 + len(settings)):
        mark_best(cells, offset, lower_is_better=key.endswith("loss"))
    table = Table("ablation", ["run", *map(column_label, settings), *map(column_label, figures)], cells,
                  [False] * (1 + len(settings)) + [True] * len(figures))
    curves = figure_picture(compare_figure(paths, [row["name"] for row in rows]), "curves of every run, overlaid")
    return Ablation(table, [(column_label(key), text_cell(value).text) for key, value in shared.items()], curves)


def _is_figure(key: str) -> bool:
    return key.startswith(("final_", "test_"))
