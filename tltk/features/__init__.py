"""Feature stores: a layer's vectors for a dataset, searchable by FAISS, with their labels.

- ``load_source`` (``source.py``): the model, from a run directory or a backbone with weights,
  and its fingerprint.
- ``extract`` / ``add_images`` / ``extract_or_reuse`` (``extract.py``): images through a
  tapped layer (``tltk.layers``), streamed into a store.
- ``FeatureStore`` / ``create_store`` (``store.py``): a finished store, exact and
  approximate search, growing it, recall checks. Its files and manifest are in
  ``manifest.py``, how they are written whole in ``writing.py``, the FAISS index (building,
  tuning, ``IndexOptions``, ``RecallReport``) in ``faiss_index.py``.
- ``merge_parts`` (``shards.py``) joins the parts of a sharded extraction
  (``extract(..., shard=(i, n))``, each a ``StorePart``) into one store.
- ``neighbours_of_images`` / ``neighbours_of_rows`` (``neighbors.py``) and
  ``evaluate_retrieval`` (``retrieval.py``).
"""

from tltk.features.extract import Loading, add_images, extract, extract_or_reuse
from tltk.features.faiss_index import IndexOptions, RecallReport
from tltk.features.manifest import is_store
from tltk.features.neighbors import QueryResult, neighbours_of_images, neighbours_of_rows
from tltk.features.retrieval import RetrievalReport, evaluate_retrieval
from tltk.features.shards import StorePart, merge_parts
from tltk.features.source import FeatureSource, load_source
from tltk.features.store import FeatureStore, create_store

__all__ = [
    "FeatureSource",
    "FeatureStore",
    "IndexOptions",
    "Loading",
    "QueryResult",
    "RecallReport",
    "RetrievalReport",
    "StorePart",
    "add_images",
    "create_store",
    "evaluate_retrieval",
    "extract",
    "extract_or_reuse",
    "is_store",
    "load_source",
    "merge_parts",
    "neighbours_of_images",
    "neighbours_of_rows",
]
