"""One way to make and save figures, so every PNG tltk writes looks and behaves alike.

Figures are built as ``matplotlib.figure.Figure`` objects on the Agg canvas rather than
through ``pyplot``: no display is needed (training machines have none), no global figure
list grows over a long sweep, and importing tltk never switches the backend of a
notebook the user is plotting in.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tltk.fileio import atomic_write

DPI = 100


def new_figure(width: float = 8.0, height: float = 5.0, *, rows: int = 1, cols: int = 1) -> tuple[Figure, list[Axes]]:
    """A figure on the Agg canvas and its axes as a flat list (row by row)."""
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, [ax for row in axes for ax in row]


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` atomically, so a reader never sees half a file."""
    target = Path(path)
    atomic_write(target, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI))
    return target


def wrap(text: str, inches: float) -> str:
    """``text`` on as many lines as it needs to fit ``inches`` of figure width.

    Agg clips text that runs past the figure's edge, and titles here carry run names
    and module paths of any length. About 10 pixels per character of a title font.
    """
    width = max(20, int(inches * DPI / 10))
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False)) or text


def legend_if_several(ax: Axes) -> None:
    """A legend only where there is more than one labelled series to tell apart."""
    labelled = [h for h, label in zip(*ax.get_legend_handles_labels()) if not label.startswith("_")]
    if len(labelled) > 1:
        ax.legend(loc="best", fontsize="small")


def hide_ticks(ax: Axes) -> None:
    """For image panels: pixel coordinates mean nothing to the reader, the axis labels do."""
    ax.set_xticks([])
    ax.set_yticks([])


def grid_shape(count: int, columns: int | None = None) -> tuple[int, int]:
    """(rows, columns) of a near-square grid holding ``count`` tiles."""
    if count <= 0:
        return (0, 0)
    cols = min(columns or math.ceil(math.sqrt(count)), count)
    return ((count + cols - 1) // cols, cols)


def short_labels(names: Sequence[str]) -> list[str]:
    """Labels for a legend: the names as given, numbered where two are the same."""
    seen: dict[str, int] = {}
    labels = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return labels
