"""``tltk visualize gradcam``: one PNG per image, the image beside its class activation map(s).

Each picture shows the image as loaded, then one overlay per explained class (the
predicted class, the one asked for, or each predicted label of a multi-label run) titled
with the class and the model's probability for it, so the map is never read without the
decision it explains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure

from tltk.errors import DataError
from tltk.explain import Explanation
from tltk.fileio import user_path
from tltk.viz.common import safe_name
from tltk.viz.style import hide_ticks, new_figure, save_figure, wrap

OVERLAY_ALPHA = 0.5
PANEL_INCHES = 3.0


@dataclass
class GradcamResult:
    """What was drawn, for ``--json`` and tests."""

    pictures: list[Path]
    explanations: list[Explanation]

    def to_dict(self) -> dict[str, Any]:
        return {"pictures": [str(p) for p in self.pictures], "maps": [e.to_dict() for e in self.explanations]}


def visualize_gradcam(run: Any, images: Sequence[str | Path], out_dir: str | Path, *, layer: str | None = None,
                      class_name: str | None = None, method: str = "gradcam", device: str = "auto") -> GradcamResult:
    """Explain each image with the run (a directory or a loaded ``Run``) and write its picture to ``out_dir``."""
    from tltk.run import as_run

    if not images:
        raise DataError("there are no images to explain; pass one or more --image FILE.")
    loaded = as_run(run)
    explanations = loaded.explain(list(images), layer=layer, class_name=class_name, method=method, device=device)
    folder = user_path(str(out_dir))
    pictures = []
    method_part = safe_name(method.replace("+", "plus"))  # gradcam++ and gradcam must not share a file name
    for group in grouped_by_image(explanations):
        name = f"{group[0].position:03d}_{safe_name(Path(group[0].source).stem)}_{method_part}.png"
        pictures.append(save_figure(explanation_figure(group), folder / name))
    return GradcamResult(pictures, explanations)


def grouped_by_image(explanations: list[Explanation]) -> list[list[Explanation]]:
    """The explanations of each input image together, in input order."""
    groups: dict[int, list[Explanation]] = {}
    for explanation in explanations:
        groups.setdefault(explanation.position, []).append(explanation)
    return list(groups.values())


def explanation_figure(group: list[Explanation]) -> Figure:
    """The image, then an overlay per class: '<class>  p=0.93' above each."""
    first = group[0]
    figure, axes = new_figure(PANEL_INCHES * (1 + len(group)), PANEL_INCHES + 0.6, cols=1 + len(group))
    axes[0].imshow(first.image)
    axes[0].set_title(wrap(Path(first.source).name, PANEL_INCHES), fontsize="small")
    for ax, explanation in zip(axes[1:], group):
        ax.imshow(explanation.image)
        shown = ax.imshow(explanation.heatmap, cmap="jet", alpha=OVERLAY_ALPHA, vmin=0.0, vmax=1.0)
        ax.set_title(wrap(f"{explanation.class_name}  p={explanation.probability:.3f}", PANEL_INCHES),
                     fontsize="small")
    for ax in axes:
        hide_ticks(ax)
    figure.colorbar(shown, ax=axes[1:], shrink=0.8, label=f"{first.method} at {first.layer}")
    figure.suptitle(wrap(f"why: {first.method} at {first.layer}", PANEL_INCHES * (1 + len(group))), fontsize="medium")
    return figure
