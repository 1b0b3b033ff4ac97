"""Each query beside its nearest neighbours, one row per query, in one PNG.

A neighbour framed green shares a label with its query, red does not (no frame where
the query's label is unknown), so the quality of a layer's neighbours shows at a glance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from tltk.features.neighbors import QueryResult
from tltk.viz.style import new_figure, save_figure

SAME = "#1a9850"
OTHER = "#d73027"


def neighbors_figure(queries: Sequence[np.ndarray], neighbours: Sequence[Sequence[np.ndarray]],
                     results: Sequence[QueryResult], title: str) -> Figure:
    """Rows are queries; column 0 the query, then its neighbours nearest first."""
    columns = 1 + max((len(r.neighbours) for r in results), default=0)
    legend_width = 2.4 if any(r.labels for r in results) else 0.0
    figure, axes = new_figure(max(5.0, 1.35 * columns) + legend_width, max(3.0, 1.65 * len(results) + 1.0),
                              rows=max(len(results), 1), cols=columns)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for i, (result, picture, pictures) in enumerate(zip(results, queries, neighbours)):
        row = axes[i * columns:(i + 1) * columns]
        _tile(row[0], picture, "query\n" + _label_text(result.labels), None)
        for ax, neighbour, image in zip(row[1:], result.neighbours, pictures):
            colour = None if not result.labels else (SAME if set(result.labels) & set(neighbour.labels) else OTHER)
            _tile(ax, image, f"#{neighbour.rank} {_label_text(neighbour.labels)}\nd={neighbour.distance:.3f}", colour)
    figure.suptitle(title)
    figure.supxlabel("query, then its neighbours nearest first (label, distance)")
    figure.supylabel("queries")
    if any(r.labels for r in results):
        figure.legend(handles=[Patch(edgecolor=SAME, facecolor="none", linewidth=2, label="shares a label with the query"),
                               Patch(edgecolor=OTHER, facecolor="none", linewidth=2, label="shares none")],
                      loc="outside right upper", fontsize="small")
    return figure


def _tile(ax, picture: np.ndarray, text: str, colour: str | None) -> None:  # type: ignore[no-untyped-def]
    ax.imshow(picture, interpolation="nearest")
    ax.set_title(text, fontsize="x-small")
    if colour is not None:
        ax.set_frame_on(True)
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(3)


def _label_text(labels: Sequence[str]) -> str:
    text = ",".join(labels) if labels else "?"
    return text if len(text) <= 18 else text[:17] + "…"


def write_neighbors_grid(store, results: Sequence[QueryResult], out: str | Path) -> Path:  # type: ignore[no-untyped-def]
    """Draw ``results`` (from ``neighbours_of_images`` / ``neighbours_of_rows``) of ``store`` to ``out``."""
    from tltk.data import load_image
    from tltk.features.extract import row_pictures

    queries = [row_pictures(store, [r.row])[0] if r.row is not None else np.asarray(load_image(r.query)) for r in results]
    neighbours = [row_pictures(store, [n.row for n in r.neighbours]) for r in results]
    title = f"nearest neighbours at {store.layer} ({store.pool} pool, {store.metric})"
    return save_figure(neighbors_figure(queries, neighbours, results, title), out)


__all__ = ["neighbors_figure", "write_neighbors_grid"]
