"""Extraction: images through a model, one layer tapped, vectors streamed into a store.

Batches go from the DataLoader through the tapped model straight to the store's files:
each batch's vectors are written before the next batch is read, so memory holds one
batch however many images there are. Every row keeps what a person needs to find the
image again (its path, or its dataset and index), its label(s) and its split.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from tltk.data import DataSplits, Sample, load_data
from tltk.data.samples import positives
from tltk.data.specs import absolute_path, absolute_spec
from tltk.errors import DataError, TltkError
from tltk.features.faiss_index import IndexOptions, check_metric
from tltk.features.manifest import Chunk, is_store
from tltk.features.shards import StorePart, create_part, shard_record
from tltk.features.source import FeatureSource, source_from_record
from tltk.features.store import FeatureStore, create_store
from tltk.layers import check_layer_runs, check_pool, resolve_layer, tap
from tltk.runtime import Inference, check_batch_size, resolve_device, stream_outputs

SPLITS = ("all", "train", "val", "test")
LOAD_DATA_OPTIONS = tuple(name for name in inspect.signature(load_data).parameters if name != "spec")
DEFAULT_BATCH_SIZE = 64

Progress = Callable[[int, int], None]


@dataclass
class Loading:
    """How images are batched and where the model runs."""

    batch_size: int = DEFAULT_BATCH_SIZE
    device: str = "auto"
    workers: int | None = None  # None: from the number of images, as in training

    def check(self) -> None:
        check_batch_size(self.batch_size)
        if self.workers is not None and self.workers < 0:
            raise TltkError(f"--workers must be 0 or more, not {self.workers}.")

    def inference(self) -> Inference:
        """Stores hold fp32 vectors in contiguous layout whatever the machine computes
        natively, so that a store, its fingerprint and a later query agree on every CPU."""
        return Inference(device=self.device, precision="fp32", channels_last="off", batch_size=self.batch_size,
                         workers=self.workers)


@dataclass
class DataSelection:
    """The images of one ``--data`` spec and ``--split``, in the order they become rows."""

    spec: str
    options: dict[str, Any]
    split: str
    splits: DataSplits
    samples: list[Sample]
    split_starts: list[tuple[int, str]]  # (first position, split name) of each split in ``samples``

    def split_at(self, position: int) -> str:
        """The split of the sample at ``position`` (kept as boundaries, not one name per row)."""
        return next(name for start, name in reversed(self.split_starts) if start <= position)

    def entry(self, start: int) -> dict[str, Any]:
        """What the manifest records about this data: enough to load its pixels again."""
        return {"spec": self.spec, "options": self.options, "split": self.split, "fingerprint": self.splits.fingerprint,
                "rows": [start, start + len(self.samples)]}

    def row(self, position: int, data_index: int) -> dict[str, Any]:
        split, sample = self.split_at(position), self.samples[position]
        names = self.splits.class_names
        row: dict[str, Any] = {"id": sample.id, "split": split, "labels": [names[i] for i in positives(sample.target)],
                               "data": data_index}
        if isinstance(sample.source, (int, np.integer)):
            row.update(path=f"{self.spec}#{sample.id}", array_row=int(sample.source))
        else:
            row["path"] = str(sample.source)
        return row


# --- which images --------------------------------------------------------------------


def select_data(source: FeatureSource, data: str | None, split: str = "all", **overrides: Any) -> DataSelection:
    """The images to extract: ``data`` with ``overrides``, or for a run its own data and split settings.

    A run directory's own data keeps the run's seed, fractions and class filter, so
    ``--split test`` means the images its training held out (as ``tltk evaluate`` does).
    """
    if split not in SPLITS:
        raise TltkError(f"--split '{split}' is not one of {', '.join(SPLITS)}.")
    spec, options = _data_settings(source, data, overrides)
    splits = load_data(spec, **options)
    names = ("train", "val", "test") if split == "all" else (split,)
    parts = [getattr(splits, name) if split == "all" else splits.split(name) for name in names]
    samples = [s for part in parts for s in part]
    if not samples:
        raise DataError(f"{spec} holds no images; check the --data spec.")
    starts = [sum(len(p) for p in parts[:i]) for i in range(len(parts))]
    # The manifest records where the data is in absolute form, so a store's pictures load from any folder.
    if options.get("image_root") is not None:
        options = {**options, "image_root": absolute_path(options["image_root"])}
    return DataSelection(absolute_spec(spec), options, split, splits, samples, list(zip(starts, names)))


def _data_settings(source: FeatureSource, data: str | None, overrides: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    unknown = [k for k in overrides if k not in LOAD_DATA_OPTIONS]
    if unknown:
        raise TypeError(f"unknown data option {unknown[0]}; load_data takes {', '.join(LOAD_DATA_OPTIONS)}")
    if source.run_config is not None:
        from tltk.run import recorded_data_options

        recorded = recorded_data_options(Path(source.record["path"]), source.run_config["data"], data, overrides)
        data = recorded.pop("spec")
        options = {k: v for k, v in recorded.items() if k in LOAD_DATA_OPTIONS and v is not None}
    elif data is None:
        raise TltkError("--data is needed with a backbone as SOURCE (e.g. --data builtin:digits); only a run directory knows its own data.")
    else:
        options = {k: v for k, v in overrides.items() if v is not None}
    if options.get("classes") is not None:
        options["classes"] = list(options["classes"])
    return data, options


# --- features ------------------------------------------------------------------------


def feature_chunks(
    source: FeatureSource, layer: str, pool: str, selection: DataSelection, loading: Loading, data_index: int = 0,
    rows: range | None = None,
) -> Iterator[Chunk]:
    """(vectors, metadata rows) per batch, computed only when the caller asks for the next.

    ``rows`` limits them to those positions of the selection (one shard), batched from its start.
    """
    from tltk.data import ImageDataset

    loading.check()
    positions = rows if rows is not None else range(len(selection.samples))
    dataset = ImageDataset(selection.samples[positions.start:positions.stop], source_transform(source), selection.splits.arrays)
    done = positions.start
    with tap(source.model, layer, pool) as features_of:
        for vectors, _ in stream_outputs(source.model, dataset, loading.inference(), forward=features_of):
            metadata = [selection.row(done + i, data_index) for i in range(len(vectors))]
            done += len(vectors)
            yield vectors.numpy(), metadata


def embed_images(source: FeatureSource, layer: str, pool: str, images: Sequence[str | Path], loading: Loading | None = None) -> np.ndarray:
    """(len(images), D) features of image files, as the store's rows were made."""
    loading = loading or Loading()
    loading.check()
    device = resolve_device(loading.device)
    transform = source_transform(source)
    source.model.to(device)
    parts: list[np.ndarray] = []
    with tap(source.model, layer, pool) as features_of:
        for begin in range(0, len(images), loading.batch_size):
            batch = torch.stack([transform(_read_query(path)) for path in images[begin:begin + loading.batch_size]])
            parts.append(features_of(batch.to(device)).cpu().numpy())
    return np.concatenate(parts) if parts else np.empty((0, 0), dtype=np.float32)


def _read_query(path: str | Path) -> Any:
    from tltk.data import load_image

    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"query image {file} does not exist; pass an image file to --query.")
    return load_image(file)


def source_transform(source: FeatureSource) -> Callable[[Any], torch.Tensor]:
    """The deterministic preprocessing the source's model expects (resize and normalise)."""
    return source.preprocessing.eval_transform()


# --- stores --------------------------------------------------------------------------


def extract(
    source: FeatureSource,
    layer: str,
    out: str | Path,
    data: str | None = None,
    *,
    split: str = "all",
    pool: str = "avg",
    metric: str = "cosine",
    index: IndexOptions | None = None,
    loading: Loading | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    shard: tuple[int, int] | None = None,
    wait: bool = False,
    **data_options: Any,
) -> FeatureStore | StorePart:
    """Extract ``layer`` features of ``data`` with ``source`` into a new store at ``out``.

    With ``shard=(i, n)``, only shard ``i`` of ``n`` of those rows (``shard_rows``) go to
    ``out``, as a part that ``tltk.features.shards.merge_parts`` joins with the others into
    the store this call would write without ``shard``. Another command writing ``out`` is
    refused by name, or waited for with ``wait``.
    """
    check_pool(pool)
    check_metric(metric)
    if shard is not None:
        check_shard(shard)
    options = index or IndexOptions()
    options.validate()
    loading = loading or Loading()
    loading.check()
    resolved = resolve_layer(source.model, layer)
    check_layer_runs(source.model, resolved.name, tuple(source.preprocessing.input_size))  # before anything is written
    selection = select_data(source, data, split, **data_options)
    header = {
        "source": source.record,
        "layer": resolved.name,
        "module": resolved.path,
        "pool": pool,
        "preprocessing": source.preprocessing.to_dict(),
        "class_names": list(selection.splits.class_names),
        "task": selection.splits.task,
        "data": [selection.entry(0)],
        "build_key": build_key(source, resolved.name, pool, metric, selection),
    }
    total = len(selection.samples)
    if shard is None:
        chunks = feature_chunks(source, resolved.name, pool, selection, loading)
        return create_store(out, chunks, header, metric=metric, index=options, overwrite=overwrite,
                            total=total, progress=progress, wait=wait)
    rows = shard_rows(total, loading.batch_size, shard)
    recipe = {"extraction": header["build_key"], "batch_size": loading.batch_size, "index": asdict(options),
              "tltk_version": _tltk_version()}
    chunks = feature_chunks(source, resolved.name, pool, selection, loading, rows=rows)
    return create_part(out, chunks, header, shard_record(shard[0], shard[1], rows, total, recipe), metric=metric,
                       overwrite=overwrite, total=len(rows), progress=progress, wait=wait)


def shard_rows(total: int, batch_size: int, shard: tuple[int, int]) -> range:
    """The rows of shard ``i`` of ``n``: the ``i``-th of ``n`` contiguous runs of whole batches.

    A single extraction cuts its rows into batches of ``batch_size`` from row 0; each shard
    takes a run of those very batches, so every image is computed in the same batch as
    there. Cutting at arbitrary rows would batch images differently, and a layer's last
    bits can depend on the batch (lenet5's fc7 of the digits on CPU changes by up to 5e-8
    when the same images are batched from another start), so merged vectors would not be
    the single extraction's bit for bit.
    """
    index, count = check_shard(shard)
    batches = math.ceil(total / batch_size)
    if count > batches:
        raise TltkError(f"--shard {index}/{count}: the {total} images make {batches} batch{'es' if batches > 1 else ''} "
                        f"of --batch-size {batch_size}, too few for {count} shards; use at most {batches} shards or a smaller --batch-size.")
    first, last = index * batches // count, (index + 1) * batches // count
    return range(first * batch_size, min(last * batch_size, total))


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    """(i, n) with 0 <= i < n, or one sentence on why not."""
    try:
        index, count = shard
    except (TypeError, ValueError):
        raise TltkError(f"shard must be (i, n), such as (0, 4), not {shard!r}.") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (index, count)) or count < 1 or not 0 <= index < count:
        raise TltkError(f"--shard {index}/{count} is not a shard: write I/N with 0 <= I < N (shards count from 0), such as 0/4.")
    return index, count


def parse_shard(text: str) -> tuple[int, int]:
    """``--shard I/N`` as (i, n): ``$RANK/$WORLD_SIZE`` under torchrun, ``$SLURM_PROCID/$SLURM_NTASKS`` under SLURM."""
    index, slash, count = text.partition("/")
    try:
        shard = (int(index), int(count))
    except ValueError:
        shard = None
    if not slash or shard is None:
        raise TltkError(f"--shard '{text}' is not I/N; write e.g. --shard 0/4 for the first of four shards "
                        f"(--shard $RANK/$WORLD_SIZE under torchrun).")
    return check_shard(shard)


def _tltk_version() -> str:
    from tltk import __version__

    return __version__


def add_images(
    store: FeatureStore,
    data: str,
    *,
    split: str = "all",
    source: FeatureSource | None = None,
    loading: Loading | None = None,
    progress: Progress | None = None,
    wait: bool = False,
    **data_options: Any,
) -> int:
    """Append the images of ``data`` to ``store`` with the model that built it; returns how many.

    The model is built again from the manifest (or passed as ``source``) and must have
    the store's fingerprint; data already in the store (same images, same split) is refused.
    The store's lock is held throughout (another writer: refused by name, or waited for
    with ``wait``), and the checks read the store as it is once the lock is held.
    """
    with store.writing(wait):
        return _add_images(store, data, split, source, loading, progress, data_options)


def _add_images(store: FeatureStore, data: str, split: str, source: FeatureSource | None, loading: Loading | None,
                progress: Progress | None, data_options: dict[str, Any]) -> int:
    source = source or source_from_record(store.manifest["source"])
    store.check_same_model(source.fingerprint, store.layer, store.pool, source.description)
    selection = select_data(source, data, split, **data_options)
    for entry in store.manifest.get("data", []):
        if entry.get("fingerprint") == selection.splits.fingerprint and entry.get("split") in (split, "all"):
            start, stop = entry.get("rows", [0, 0])
            raise TltkError(f"{data} (split {split}) is already in the store at {store.path} (rows {start}-{stop - 1}); add other images.")
    data_index = len(store.manifest.get("data", []))
    chunks = feature_chunks(source, store.layer, store.pool, selection, loading or Loading(), data_index)
    return store.append(chunks, selection.entry(store.count), selection.splits.class_names,
                        total=len(selection.samples), progress=progress)


def build_key(source: FeatureSource, layer: str, pool: str, metric: str, selection: DataSelection) -> str:
    """What makes two stores interchangeable: model, layer, pooling, metric and the same images."""
    recipe = {"model": source.fingerprint, "layer": layer, "pool": pool, "metric": metric, "spec": selection.spec,
              "options": selection.options, "split": selection.split, "data": selection.splits.fingerprint}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


def extract_or_reuse(
    source: FeatureSource,
    layer: str,
    data: str | None = None,
    *,
    store_dir: str | Path | None = None,
    split: str = "all",
    pool: str = "avg",
    metric: str = "cosine",
    index: IndexOptions | None = None,
    loading: Loading | None = None,
    progress: Progress | None = None,
    **data_options: Any,
) -> tuple[FeatureStore, bool]:
    """The store for (model, layer, pooling, metric, data): reused if one with the same key
    exists at ``store_dir`` (default: a folder named after them), else built there.
    Returns the store and whether it was built now.
    """
    resolved = resolve_layer(source.model, layer)
    selection = select_data(source, data, split, **data_options)
    key = build_key(source, resolved.name, pool, metric, selection)
    path = Path(store_dir).expanduser() if store_dir is not None else default_store_dir(source, resolved.name, pool, metric, selection)
    if is_store(path):
        store = FeatureStore.open(path)
        if store.manifest.get("build_key") == key:
            return store, False
    built = extract(source, resolved.name, path, data, split=split, pool=pool, metric=metric, index=index,
                    loading=loading, overwrite=True, progress=progress, **data_options)
    assert isinstance(built, FeatureStore)  # no shard asked for, so a whole store
    return built, True


def default_store_dir(source: FeatureSource, layer: str, pool: str, metric: str, selection: DataSelection) -> Path:
    """``RUN/features/...`` for a run; the user's cache (``$XDG_CACHE_HOME/tltk/features``) for a backbone."""
    data_tag = hashlib.sha256(json.dumps([selection.spec, selection.options], sort_keys=True, default=str).encode()).hexdigest()[:10]
    name = f"{_safe(layer)}-{pool}-{metric}-{selection.split}-{data_tag}"
    if source.is_run:
        return Path(source.record["path"]) / "features" / name
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tltk" / "features"
    return cache / f"{_safe(source.record['name'])}-{source.fingerprint[:10]}" / name


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


# --- pixels of stored rows -------------------------------------------------------------


def row_pictures(store: FeatureStore, rows: Sequence[int]) -> list[np.ndarray]:
    """H x W x 3 uint8 pictures of stored rows: files read again, in-memory datasets loaded again."""
    from tltk.data import load_image

    metadata = store.metadata()
    arrays: dict[int, np.ndarray | None] = {}
    pictures = []
    for row in rows:
        meta = metadata[int(row)]
        if "array_row" in meta:
            entry_index = int(meta.get("data", 0))
            if entry_index not in arrays:
                entry = store.manifest["data"][entry_index]
                arrays[entry_index] = load_data(entry["spec"], **entry.get("options", {})).arrays
            picture = np.asarray(arrays[entry_index][int(meta["array_row"])])  # type: ignore[index]
        else:
            picture = np.asarray(load_image(meta["path"]))
        pictures.append(picture.repeat(3, axis=-1) if picture.shape[-1] == 1 else picture)
    return pictures


__all__ = [
    "DataSelection",
    "Loading",
    "SPLITS",
    "add_images",
    "build_key",
    "check_shard",
    "default_store_dir",
    "embed_images",
    "extract",
    "extract_or_reuse",
    "feature_chunks",
    "parse_shard",
    "row_pictures",
    "select_data",
    "shard_rows",
    "source_transform",
]
