"""A 2-D t-SNE map of a store's vectors, one colour per class.

The vectors are compared as the store compares them (unit length for a cosine store),
reduced to 50 dimensions by PCA first (the usual step: it removes noise and makes
t-SNE's neighbour search cheap), then embedded with scikit-learn's ``TSNE``. A seeded
random sample keeps large stores to a size t-SNE handles in seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from tltk.errors import TltkError
from tltk.viz.style import new_figure, save_figure

DEFAULT_SAMPLE = 3000
PCA_DIMS = 50
MAX_LEGEND_COLUMNS = 3


@dataclass
class TsneResult:
    out: Path
    points: int
    classes: int
    perplexity: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "out": str(self.out)}


def tsne_embedding(vectors: np.ndarray, *, metric: str = "l2", perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """(n, 2) t-SNE coordinates of ``vectors``; perplexity is capped below n / 3 as t-SNE needs."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    data = np.asarray(vectors, dtype=np.float32)
    if len(data) < 3:
        raise TltkError(f"t-SNE needs at least 3 points, the sample has {len(data)}; add images or raise --sample.")
    if metric == "cosine":
        data = data / np.maximum(np.linalg.norm(data, axis=1, keepdims=True), 1e-12)
    if data.shape[1] > PCA_DIMS and len(data) > PCA_DIMS:
        data = PCA(n_components=PCA_DIMS, random_state=seed).fit_transform(data)
    perplexity = float(min(perplexity, (len(data) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed).fit_transform(data)


def tsne_figure(points: np.ndarray, labels: Sequence[str], class_names: Sequence[str], title: str) -> Figure:
    """A scatter of ``points``, one colour and one legend entry per class present."""
    import matplotlib

    present = [name for name in class_names if name in set(labels)] + sorted(set(labels) - set(class_names))
    colours = matplotlib.colormaps["tab10" if len(present) <= 10 else "tab20" if len(present) <= 20 else "turbo"]
    figure, (ax,) = new_figure(9.0, 7.0)
    labels_array = np.asarray(labels)
    for i, name in enumerate(present):
        mask = labels_array == name
        colour = colours(i) if len(present) <= 20 else colours(i / max(len(present) - 1, 1))
        ax.scatter(points[mask, 0], points[mask, 1], s=8, color=colour, label=f"{name} ({int(mask.sum())})", alpha=0.8)
    ax.set(title=title, xlabel="t-SNE dimension 1", ylabel="t-SNE dimension 2")
    ax.legend(title="class (points)", fontsize="small", markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5),
              ncols=min(MAX_LEGEND_COLUMNS, 1 + len(present) // 25))
    return figure


def write_tsne(store, out: str | Path, *, sample: int | None = DEFAULT_SAMPLE, perplexity: float = 30.0,  # type: ignore[no-untyped-def]
               seed: int = 0) -> TsneResult:
    """t-SNE of (a seeded sample of) ``store``'s vectors, coloured by class, written to ``out``.

    Multi-label rows are coloured by their first label.
    """
    if sample is not None and sample < 3:
        raise TltkError(f"--sample must be at least 3, not {sample}.")
    rows = np.arange(store.count)
    if sample is not None and sample < store.count:
        rows = np.sort(np.random.default_rng(seed).choice(store.count, size=sample, replace=False))
    labels = [names[0] if names else "(none)" for names in (store.labels()[i] for i in rows)]
    points = tsne_embedding(np.asarray(store.features()[rows]), metric=store.metric, perplexity=perplexity, seed=seed)
    multi = " (first label)" if store.task == "multilabel" else ""
    title = f"t-SNE of {store.layer} features ({store.pool} pool, {len(rows)} images){multi}"
    path = save_figure(tsne_figure(points, labels, store.class_names, title), out)
    return TsneResult(path, len(rows), len(set(labels)), float(min(perplexity, (len(rows) - 1) / 3)))


__all__ = ["TsneResult", "tsne_embedding", "tsne_figure", "write_tsne"]
