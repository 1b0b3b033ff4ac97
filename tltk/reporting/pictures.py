"""Pictures as data URIs, so the page carries every image inside itself.

A figure is rendered straight to PNG bytes in memory; a PNG a run already holds (a filter
snapshot written during training) is read as it is. The page then needs no file beside it
and makes no request to show an image.
"""

from __future__ import annotations

import base64
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Picture:
    """One image of the page: what it shows (the alt text and caption) and its bytes as a data URI."""

    caption: str
    uri: str


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure_picture(figure: Figure, caption: str) -> Picture:
    """A matplotlib figure as a PNG data URI, at the resolution tltk's PNG files have."""
    from tltk.viz.style import DPI

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return Picture(caption, png_uri(buffer.getvalue()))


def file_picture(path: Path, caption: str) -> Picture:
    return Picture(caption, png_uri(path.read_bytes()))


def written_picture(write: Callable[[Path], object], caption: str) -> Picture:
    """The PNG that a ``tltk.viz`` writer saves to a path, taken from a scratch folder into the page."""
    with tempfile.TemporaryDirectory(prefix="tltk-report-") as scratch:
        target = Path(scratch) / "picture.png"
        write(target)
        return file_picture(target, caption)


def per_class_accuracy_figure(names: Sequence[str], accuracy: Sequence[float | None], title: str,
                              limit: int = 40) -> Figure:
    """Per-class accuracy as horizontal bars, hardest class at the top; at most ``limit`` classes
    (the hardest), since the table below the chart holds every class."""
    from tltk.viz.style import new_figure, wrap

    rows = sorted(((value, name) for name, value in zip(names, accuracy) if value is not None))[:limit]
    figure, (ax,) = new_figure(8.0, max(2.5, 0.3 * len(rows) + 1.5))
    ax.barh([name for _, name in rows], [value for value, _ in rows], color="tab:blue")
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    shown = f" (the {len(rows)} hardest)" if len(rows) < len(names) else ""
    ax.set(title=wrap(title + shown, 8.0), xlabel="accuracy (share of the class's test images)",
           ylabel="class (hardest at the top)")
    ax.grid(alpha=0.3, axis="x")
    return figure


def evenly_spaced(items: Sequence[Path], count: int) -> list[Path]:
    """At most ``count`` of ``items``, the first and the last among them, spread evenly."""
    if len(items) <= count:
        return list(items)
    positions = sorted({round(i * (len(items) - 1) / (count - 1)) for i in range(count)})
    return [items[i] for i in positions]
