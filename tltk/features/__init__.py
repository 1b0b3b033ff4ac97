"""Feature stores: a layer's vectors for a dataset, searchable by FAISS, with their labels.

- ``load_source`` (``source.py``): the model, from a run directory or a backbone with weights,
  and its fingerprint.
- ``extract`` / ``add_images`` / ``extract_or_reuse`` (``extract.py``): images through a
  tapped layer (``tltk.layers``), streamed into a store.
- ``FeatureStore`` (``store.py``): the directory, its FAISS index, exact and approximate
  search, recall checks; ``merge_parts`` joins the parts of a sharded extraction
  (``extract(..., shard=(i, n))``, each a ``StorePart``) into one store.
- ``neighbours_of_images`` / ``neighbours_of_rows`` (``neighbors.py``) and
  ``evaluate_retrieval`` (``retrieval.py``).
"""

from tltk.features.extract import Loading, add_images, extract, extract_or_reuse
from tltk.features.neighbors import QueryResult, neighbours_of_images, neighbours_of_rows
from tltk.features.retrieval import RetrievalReport, evaluate_retrieval
from tltk.features.source import FeatureSource, load_source
from tltk.features.store import FeatureStore, IndexOptions, RecallReport, StorePart, create_store, is_store, merge_parts

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
