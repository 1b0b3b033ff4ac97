"""Nearest neighbours in a store, for new images or for images already in it.

An image from outside goes through the model that built the store (rebuilt from the
manifest, or given) at the store's layer and pooling; a model with another fingerprint
is refused, since its vectors would be compared with vectors of a different space. A
stored row is its own nearest neighbour, so ``--query-index`` leaves the row itself out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tltk.errors import TltkError
from tltk.features.extract import Loading, embed_images
from tltk.features.source import FeatureSource, source_from_record
from tltk.features.store import FeatureStore


@dataclass
class Neighbour:
    rank: int
    row: int
    path: str
    labels: list[str]
    distance: float
    split: str = ""


@dataclass
class QueryResult:
    """One query (an image file, or a stored row) and its neighbours, nearest first."""

    query: str
    labels: list[str]
    neighbours: list[Neighbour] = field(default_factory=list)
    row: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_k(k: int) -> int:
    if k < 1:
        raise TltkError(f"--k must be at least 1, not {k}.")
    return k


def neighbours_of_images(
    store: FeatureStore, images: Sequence[str | Path], k: int = 10, *, source: FeatureSource | None = None,
    loading: Loading | None = None,
) -> list[QueryResult]:
    """The ``k`` nearest stored images to each image file, by the store's model and layer."""
    check_k(k)
    source = source or source_from_record(store.manifest["source"])
    store.check_same_model(source.fingerprint, store.layer, store.pool, source.description)
    vectors = embed_images(source, store.layer, store.pool, list(images), loading)
    distances, rows = store.search(vectors, k)
    return [QueryResult(str(image), [], _neighbours(store, d, r)) for image, d, r in zip(images, distances, rows)]


def neighbours_of_rows(store: FeatureStore, rows: Sequence[int], k: int = 10) -> list[QueryResult]:
    """The ``k`` nearest other stored images to each stored row."""
    check_k(k)
    distances, found = store.search_rows(rows, k)
    metadata = store.metadata()
    return [
        QueryResult(metadata[int(row)]["path"], list(metadata[int(row)].get("labels", [])), _neighbours(store, d, r), int(row))
        for row, d, r in zip(rows, distances, found)
    ]


def _neighbours(store: FeatureStore, distances: np.ndarray, rows: np.ndarray) -> list[Neighbour]:
    metadata = store.metadata()
    found = []
    for rank, (distance, row) in enumerate(zip(distances, rows), start=1):
        if row < 0:
            break
        meta = metadata[int(row)]
        found.append(Neighbour(rank, int(row), meta["path"], list(meta.get("labels", [])), float(distance), meta.get("split", "")))
    return found


__all__ = ["Neighbour", "QueryResult", "check_k", "neighbours_of_images", "neighbours_of_rows"]
