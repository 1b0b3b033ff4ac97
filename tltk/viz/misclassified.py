"""The images a run gets wrong, most confident mistakes first, and its confusion matrix.

Confident mistakes are where to look first: they are the mislabelled images, the
classes the model confuses systematically, and the shortcuts it learned. The split
defaults to the run's own held-out test images, chosen exactly as training chose them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from tltk.data import ImageDataset
from tltk.errors import TltkError
from tltk.metrics import confusion_matrix
from tltk.run import Run, load_run
from tltk.runtime import collect_outputs
from tltk.viz.common import split_dataset, unnormalise
from tltk.viz.style import grid_shape, new_figure, save_figure, wrap

MAX_ANNOTATED_CLASSES = 30  # above this the count in each cell is unreadable


@dataclass
class Mistake:
    index: int  # position in the split
    id: str
    true: str
    predicted: str
    confidence: float  # the probability the model gave its (wrong) prediction

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "true": self.true, "predicted": self.predicted, "confidence": self.confidence}


@dataclass
class MisclassifiedResult:
    n: int
    mistakes: list[Mistake]
    confusion: list[list[int]]
    grid: Path
    confusion_png: Path

    def to_dict(self, limit: int | None = None) -> dict[str, Any]:
        return {"n": self.n, "wrong": len(self.mistakes), "grid": str(self.grid),
                "confusion_png": str(self.confusion_png), "confusion_matrix": self.confusion,
                "mistakes": [m.to_dict() for m in self.mistakes[:limit]]}


def find_mistakes(
    probabilities: np.ndarray, targets: np.ndarray, class_names: Sequence[str], ids: Sequence[str]
) -> list[Mistake]:
    """Every wrongly classified sample, the most confident (highest predicted probability) first.

    Ties keep split order, so the list is the same on every run.
    """
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities[np.arange(len(predicted)), predicted]
    wrong = np.flatnonzero(predicted != targets)
    order = wrong[np.argsort(-confidence[wrong], kind="stable")]
    return [
        Mistake(int(i), ids[i], class_names[int(targets[i])], class_names[int(predicted[i])], float(confidence[i]))
        for i in order
    ]


def mistakes_figure(pictures: Sequence[np.ndarray], mistakes: Sequence[Mistake], title: str) -> Figure:
    """One tile per mistake, titled ``true / predicted (confidence)``; a note where there is none."""
    rows, cols = grid_shape(max(len(mistakes), 1))
    width = max(6.0, 1.6 * cols)
    figure, axes = new_figure(width, max(3.0, 1.7 * rows + 1.2), rows=rows, cols=cols)
    for ax in axes:
        ax.axis("off")
    for ax, picture, mistake in zip(axes, pictures, mistakes):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(f"{mistake.true} / {mistake.predicted}\n({mistake.confidence:.2f})", fontsize="small")
    if not mistakes:
        axes[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    figure.suptitle(wrap(title, width))
    figure.supxlabel("each image: true class / predicted class (probability of the prediction)")
    figure.supylabel("most confident mistakes first, row by row")
    return figure


def confusion_figure(confusion: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
    """Counts with true classes as rows and predictions as columns (scikit-learn's layout)."""
    size = float(np.clip(2.5 + 0.45 * len(class_names), 5.0, 16.0))
    figure, (ax,) = new_figure(size + 1.0, size)
    shown = ax.imshow(confusion, cmap="Blues", interpolation="nearest")
    ticks = list(range(len(class_names)))
    ax.set_xticks(ticks, list(class_names), rotation=90 if len(class_names) > 8 else 0)
    ax.set_yticks(ticks, list(class_names))
    if len(class_names) <= MAX_ANNOTATED_CLASSES:
        threshold = confusion.max() / 2 if confusion.size else 0
        for (r, c), count in np.ndenumerate(confusion):
            ax.text(c, r, str(count), ha="center", va="center", fontsize="small",
                    color="white" if count > threshold else "black")
    ax.set(title=wrap(title, size), xlabel="predicted class", ylabel="true class")
    figure.colorbar(shown, ax=ax, label="images")
    return figure


def predict_probabilities(run: Run, dataset: ImageDataset, device: str, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(softmax probabilities N x K, targets N) of the run's model on ``dataset``."""
    logits, targets = collect_outputs(run.model, dataset, run.inference(device, batch_size))
    return torch.softmax(logits, dim=1).numpy(), targets.numpy()


def visualize_misclassified(
    run: str | Path, data: str | None = None, split: str = "test", *, n: int = 64,
    out_dir: str | Path | None = None, device: str = "auto", batch_size: int = 64, **data_overrides: Any,
) -> MisclassifiedResult:
    """Write misclassified_SPLIT.png (the ``n`` most confident mistakes) and confusion_SPLIT.png.

    Files go to RUN/plots unless ``out_dir`` is given; the result lists every mistake.
    Multi-class runs only: a multi-label run is refused with a pointer to ``tltk evaluate``.
    """
    if n < 1:
        raise TltkError(f"--n must be at least 1 (the mistakes to show), not {n}.")
    from tltk.viz.curves import PLOTS, run_title

    loaded = load_run(run)
    dataset, spec = split_dataset(loaded, data, split, **data_overrides)
    probabilities, targets = predict_probabilities(loaded, dataset, device, batch_size)
    names = loaded.class_names
    mistakes = find_mistakes(probabilities, targets, names, [s.id for s in dataset.samples])
    confusion = confusion_matrix(targets, probabilities.argmax(axis=1), len(names))
    pre = loaded.preprocessing
    shown = mistakes[:n]
    pictures = [unnormalise(dataset[m.index][0], pre.mean, pre.std) for m in shown]
    target = Path(out_dir) if out_dir is not None else loaded.path / PLOTS
    label = f"{spec} {split}, {len(targets)} images"
    grid = save_figure(
        mistakes_figure(pictures, shown, f"{len(shown)} of {len(mistakes)} mistakes on {label}: {run_title(loaded.path)}"),
        target / f"misclassified_{split}.png",
    )
    accuracy = float(np.trace(confusion) / max(confusion.sum(), 1))
    matrix = save_figure(
        confusion_figure(confusion, names, f"Confusion matrix on {label} (accuracy {accuracy:.3f})"),
        target / f"confusion_{split}.png",
    )
    return MisclassifiedResult(len(targets), mistakes, confusion.tolist(), grid, matrix)
