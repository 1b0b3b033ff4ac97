"""Per-class average precision as a bar chart, hardest class first."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tltk.viz.style import new_figure, save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def classes_hardest_first(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-class rows sorted by AP ascending; classes without positives (no AP) last."""
    rows = report["per_class"]
    return sorted(rows, key=lambda r: (r["ap"] is None, r["ap"] if r["ap"] is not None else 0.0, r["class"]))


def plot_per_class_ap(report: dict[str, Any], path: str | Path, title: str) -> Path:
    return save_figure(per_class_ap_figure(report, title), path)


def per_class_ap_figure(report: dict[str, Any], title: str) -> Figure:
    """Both APs of each class (bars: area under the PR curve; dots: VOC2007 11-point) and the mAP line."""
    rows = [r for r in classes_hardest_first(report) if r["ap"] is not None]
    figure, (ax,) = new_figure(8.0, max(3.0, 0.3 * len(rows) + 1.5))
    names = [r["class"] for r in rows]
    ax.barh(names, [r["ap"] for r in rows], color="tab:blue", label="AP (area under PR curve)")
    ax.plot([r["ap_voc07"] for r in rows], names, "o", color="tab:orange", label="AP (VOC2007 11-point)")
    ax.axvline(report["map"], color="tab:blue", linestyle="--", linewidth=1, label=f"mAP {report['map']:.3f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("average precision")
    ax.set_ylabel("class (hardest at the top)")
    ax.invert_yaxis()
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    return figure
