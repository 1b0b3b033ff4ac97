"""The parts of a sharded extraction, and merging them into one store.

``tltk extract --shard I/N`` writes part I of N: a directory laid out like a store, whose
manifest says which rows of the whole extraction it holds and fingerprints the recipe
that made them, and which has no index. A part is refused where a store is expected.
``merge_parts`` checks that the parts belong together and are all there, and streams them
in shard order into ``create_store``, so the merged store is the one a single extraction
writes: same rows, same bytes, same manifest (times aside), its index built and tuned by
the same code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from tltk.errors import TltkError, printable
from tltk.features.faiss_index import IndexOptions, chunk_rows
from tltk.features.manifest import (
    FEATURES,
    MANIFEST,
    MANIFEST_FIELDS,
    METADATA,
    SHARD,
    Chunk,
    ManifestFields,
    Progress,
    is_count,
    is_store,
    load_manifest,
    open_features,
)
from tltk.features.store import FeatureStore, create_store
from tltk.features.writing import build_atomically, check_store_target
from tltk.fileio import write_json

# What ``build_atomically`` and the index add to a header; the rest of a part's manifest is the header.
_WRITTEN_BY_STORE = ("format", "tltk_version", "dim", "metric", "count", "dtype", "metadata_bytes", "created", "updated",
                     "index", SHARD)
# How a person names each field of a shard recipe when two parts disagree on it.
_RECIPE_WORDS = {"extraction": "model, layer, pooling, metric or data", "of": "shard count", "total": "image count",
                 "batch_size": "--batch-size", "index": "index settings", "tltk_version": "tltk version"}


def shard_record(index: int, of: int, rows: range, total: int, recipe: dict[str, Any]) -> dict[str, Any]:
    """What a part's manifest says about it: shard ``index`` of ``of``, holding ``rows`` of
    ``total``, made by ``recipe``, which must be equal for all parts of one extraction and
    whose ``index`` entry holds the ``IndexOptions`` fields the merged store is indexed with."""
    recipe = {**recipe, "of": of, "total": total}
    fingerprint = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()
    return {"index": index, "of": of, "rows": [rows.start, rows.stop], "total": total, "fingerprint": fingerprint,
            "recipe": recipe}


@dataclass
class StorePart(ManifestFields):
    """One part of a sharded extraction: its rows, vectors and metadata, and no index.

    It is not a store to search: neighbours among a fraction of the images would look
    plausible and be wrong, so ``FeatureStore.open`` refuses it and ``merge_parts`` joins
    all the parts into one store.
    """

    path: Path
    manifest: dict[str, Any]

    @property
    def shard(self) -> dict[str, Any]:
        return dict(self.manifest[SHARD])

    @property
    def index(self) -> int:
        return int(self.shard["index"])

    @property
    def of(self) -> int:
        return int(self.shard["of"])

    @property
    def rows(self) -> tuple[int, int]:
        start, stop = self.shard["rows"]
        return int(start), int(stop)

    @property
    def total(self) -> int:
        return int(self.shard["total"])

    @property
    def fingerprint(self) -> str:
        return str(self.shard["fingerprint"])

    @property
    def name(self) -> str:
        return f"{self.path} (shard {self.index}/{self.of})"

    def features(self) -> np.ndarray:
        return open_features(self.path, self.count, self.dim)

    def metadata_rows(self) -> Iterator[dict[str, Any]]:
        """The part's metadata rows one at a time, so merging holds one chunk of them."""
        read = 0
        with open(self.path / METADATA, encoding="utf-8") as handle:
            for line in handle:
                if read == self.count:
                    return
                read += 1
                yield json.loads(line)
        if read < self.count:
            raise TltkError(f"{self.path / METADATA} has {read} rows but the manifest {self.count}; "
                            f"the part is damaged, run shard {self.index}/{self.of} again.")

    def summary(self) -> dict[str, Any]:
        """What ``tltk extract --shard`` prints with --json."""
        return {"part": str(self.path), "shard": [self.index, self.of], "rows": list(self.rows), "total": self.total,
                "count": self.count, "dim": self.dim, "layer": self.layer, "pool": self.pool, "metric": self.metric,
                "fingerprint": self.fingerprint[:16]}


def create_part(
    path: str | Path,
    chunks: Iterable[Chunk],
    header: dict[str, Any],
    shard: dict[str, Any],
    *,
    metric: str = "cosine",
    overwrite: bool = False,
    total: int = 0,
    progress: Progress | None = None,
    wait: bool = False,
) -> "StorePart":
    """Like ``create_store``, for one shard of an extraction: the rows and a manifest that
    says which shard they are (``shard_record``), and no index, which only the merged
    store gets. It appears at ``path`` only once complete, as a store does.
    """

    target = Path(path).expanduser()

    def record_shard(building: Path, manifest: dict[str, Any]) -> StorePart:
        manifest[SHARD] = shard
        write_json(building / MANIFEST, manifest, shown=target / MANIFEST)
        return StorePart(building, manifest)

    return build_atomically(target, chunks, header, metric, overwrite, total, progress, record_shard,
                            wait=wait)


def open_part(path: str | Path) -> StorePart:
    """A finished part of a sharded extraction, or one sentence on what ``path`` is instead."""
    path = Path(path).expanduser()
    if not path.exists():
        raise TltkError(_missing_part(path))
    if not (path / MANIFEST).is_file():
        if (path / FEATURES).exists():
            raise TltkError(f"{path} holds an extraction that never finished (rows but no {MANIFEST}: it was "
                            f"interrupted); run its `tltk extract ... --shard I/N` again.")
        raise TltkError(f"{path} is not a part of a sharded extraction (no {MANIFEST}); pass the --out directories "
                        f"of `tltk extract ... --shard I/N`.")
    manifest = load_manifest(path)
    if SHARD not in manifest:
        raise TltkError(f"{path} is a complete feature store, not a part of one; `tltk index merge` joins the parts "
                        f"that `tltk extract ... --shard I/N` writes.")
    _check_part_manifest(manifest, path)
    part = StorePart(path, manifest)
    _check_part_files(part)
    return part


def _missing_part(path: Path) -> str:
    unfinished = sorted(path.parent.glob(f".{path.name}.building-*")) if path.parent.is_dir() else []
    if unfinished:
        return (f"part {path} does not exist: its extraction was interrupted ({unfinished[0].name} beside it is what "
                f"it left); run that `tltk extract ... --shard I/N` again.")
    return f"part {path} does not exist; pass the --out directory of each `tltk extract ... --shard I/N`."


def _check_part_manifest(manifest: dict[str, Any], path: Path) -> None:
    for key, (valid, meaning) in MANIFEST_FIELDS.items():
        if key != "index" and (key not in manifest or not valid(manifest[key])):
            shown = printable(json.dumps(manifest.get(key)))[:60]
            raise TltkError(f"{path / MANIFEST} has {key} = {shown}, not {meaning}; the part is damaged, extract it again.")
    record = manifest[SHARD]
    rows = record.get("rows") if isinstance(record, dict) else None
    valid = (isinstance(record, dict) and all(is_count(record.get(k)) for k in ("index", "of", "total"))
             and record["index"] < record["of"] and isinstance(rows, list) and len(rows) == 2
             and all(is_count(r) for r in rows) and rows[0] <= rows[1] <= record["total"]
             and isinstance(record.get("fingerprint"), str) and isinstance(record.get("recipe"), dict)
             and isinstance(record["recipe"].get("index"), dict))
    if not valid:
        raise TltkError(f"{path / MANIFEST} has a damaged shard record ({printable(json.dumps(record))[:60]}); "
                        f"extract that part again.")


def _check_part_files(part: StorePart) -> None:
    """A part's files hold what its manifest promises (they are renamed into place only whole,
    so a shortfall means damage after the fact)."""
    start, stop = part.rows
    if part.count != stop - start:
        raise TltkError(f"{part.name} says it holds rows {start}-{stop - 1} but counts {part.count}; "
                        f"the part is damaged, extract it again.")
    features = (part.path / FEATURES).stat().st_size if (part.path / FEATURES).is_file() else 0
    metadata = (part.path / METADATA).stat().st_size if (part.path / METADATA).is_file() else 0
    if features < part.count * part.dim * 4 or metadata < int(part.manifest["metadata_bytes"]):
        raise TltkError(f"{part.name} is incomplete ({FEATURES} or {METADATA} is shorter than its manifest says); "
                        f"run that shard again.")


def merge_parts(parts: Sequence[str | Path], out: str | Path, *, overwrite: bool = False,
                progress: Progress | None = None, wait: bool = False) -> "FeatureStore":
    """The store a single extraction would have written, from all the parts of a sharded one.

    The parts may come in any order. Parts of different extractions, a shard given twice
    or missing, anything that is not a finished part, and an existing ``out`` (unless
    ``overwrite``) are refused before anything is written; the store appears at ``out``
    only once whole, as ``create_store`` builds it; another command writing ``out`` is
    refused by name, or waited for with ``wait``.
    """
    if not parts:
        raise TltkError("name the parts to merge: `tltk index merge PART... --out STORE`.")
    ordered = parts_in_shard_order([open_part(p) for p in parts])
    target = Path(out).expanduser()
    _check_merge_target(target, ordered, overwrite)
    first = ordered[0]
    header = {key: value for key, value in first.manifest.items() if key not in _WRITTEN_BY_STORE}
    options = IndexOptions(**first.shard["recipe"]["index"])
    return create_store(target, _part_chunks(ordered), header, metric=first.metric, index=options, overwrite=overwrite,
                        total=first.total, progress=progress, wait=wait)


def parts_in_shard_order(parts: Sequence[StorePart]) -> list[StorePart]:
    """``parts`` sorted by shard, once each checked to be all N parts of one extraction."""
    first = parts[0]
    for part in parts[1:]:
        if part.fingerprint != first.fingerprint:
            raise TltkError(f"{first.name} and {part.name} are parts of different extractions "
                            f"({_recipe_difference(first, part)}); merge the parts of one `tltk extract ... --shard I/N` command.")
    by_index: dict[int, StorePart] = {}
    for part in parts:
        if part.index in by_index:
            raise TltkError(f"shard {part.index}/{part.of} is given twice ({by_index[part.index].path} and {part.path}); "
                            f"name each part once.")
        by_index[part.index] = part
    missing = [f"{i}/{first.of}" for i in range(first.of) if i not in by_index]
    if missing:
        raise TltkError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} {'are' if len(missing) > 1 else 'is'} "
                        f"missing; the merge needs all {first.of} parts of the extraction.")
    ordered = [by_index[i] for i in range(first.of)]
    _check_rows_join_up(ordered)
    return ordered


def _recipe_difference(a: StorePart, b: StorePart) -> str:
    recipe_a, recipe_b = a.shard["recipe"], b.shard["recipe"]
    for key in sorted(set(recipe_a) | set(recipe_b), key=lambda k: list(_RECIPE_WORDS).index(k) if k in _RECIPE_WORDS else 99):
        if recipe_a.get(key) != recipe_b.get(key):
            words = _RECIPE_WORDS.get(key, key)
            if key in ("extraction", "index"):
                return f"their {words} differ"
            return f"their {words} differs: {recipe_a.get(key)} and {recipe_b.get(key)}"
    return "their recipes differ"


def _check_rows_join_up(ordered: Sequence[StorePart]) -> None:
    """Shard by shard, each part's rows begin where the last one's ended, and the last ends at the total."""
    end = 0
    for part in ordered:
        start, stop = part.rows
        if start != end:
            raise TltkError(f"{part.name} holds rows from {start}, but the shards before it end at row {end}; "
                            f"the parts are damaged, extract them again.")
        end = stop
    if end != ordered[0].total:
        raise TltkError(f"the {len(ordered)} parts hold rows up to {end} of {ordered[0].total}; the parts are damaged, extract them again.")


def _check_merge_target(target: Path, parts: Sequence[StorePart], overwrite: bool) -> None:
    for part in parts:
        if target.resolve() == part.path.resolve():
            raise TltkError(f"--out {target} is one of the parts being merged; name a new directory for the store.")
    if is_store(target) and not overwrite:
        raise TltkError(f"--out {target} already holds a feature store; pass --overwrite to replace it, or name a new directory.")
    check_store_target(target, overwrite)


def _part_chunks(parts: Sequence[StorePart]) -> Iterator[Chunk]:
    """Each part's vectors and metadata rows, a bounded chunk at a time, in shard order."""
    for part in parts:
        features = part.features()
        rows = part.metadata_rows()
        step = chunk_rows(part.dim)
        for begin in range(0, part.count, step):
            vectors = features[begin:begin + step]
            yield vectors, [next(rows) for _ in range(len(vectors))]
