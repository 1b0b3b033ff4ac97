"""What the training loop feeds on: images through the whole model, or cached backbone
features through the head.

``fit`` picks one: for a frozen backbone on deterministic images the backbone runs once
over every image and the head trains on its features (``tltk.train.cache``); otherwise
the images go through the whole model every epoch, read by loaders (``tltk.runtime``) or
from the decoded-image cache (``tltk.train.image_cache``). Either way the order of every
epoch comes from one ``EpochOrder``, so a resumed run draws the batches the
uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from tltk import distributed
from tltk.distributed import SINGLE, DistContext, EpochOrder
from tltk.errors import TltkError
from tltk.model import TransferModel
from tltk.runtime import autocast, batch_to, make_loader, resolve_device, resolve_precision, use_channels_last
from tltk.train import cache, image_cache
from tltk.train.callbacks import Reporter
from tltk.train.config import TrainConfig


@dataclass
class Feed:
    """What the loop iterates and calls: images through the whole model, or cached
    backbone features through the head. Both draw their order from ``order``."""

    module: nn.Module
    train: DataLoader | cache.FeatureBatches
    val: DataLoader | cache.FeatureBatches | None
    order: EpochOrder
    feature_cache: str | None = None
    generator: torch.Generator | None = None  # the loader's, saved with a checkpoint
    broadcast_buffers: bool = True  # data-parallel: rank 0's buffers (BatchNorm statistics) sent out every step

    def close(self) -> None:
        """Stop the loaders' worker processes now, when training ends.

        A loader keeps its workers between epochs (``persistent_workers``) and stops them
        only when it is freed. The loop and its callbacks refer to each other, so that
        happens at some later garbage collection, possibly inside an import whose lock the
        workers' shutdown then waits on: each worker was waited for 5 s and killed, 10 s
        added to the end of a run with two validation workers.
        """
        for loader in (self.train, self.val):
            if isinstance(loader, DataLoader) and getattr(loader, "_iterator", None) is not None:
                loader._iterator = None  # the iterator's finaliser stops and joins its workers


@dataclass(frozen=True)
class Placement:
    """Where this process trains, resolved once from the settings for this machine and
    model: its place in a data-parallel job, its device (the rank's own GPU), the autocast
    dtype (None: fp32) and whether images go channels-last."""

    context: DistContext
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool

    @classmethod
    def resolve(cls, config: TrainConfig, model: nn.Module, context: DistContext = SINGLE) -> "Placement":
        device = distributed.device_for(context, resolve_device(config.device))
        return cls(context, device, resolve_precision(config.precision, device),
                   use_channels_last(config.channels_last, model))


@dataclass(frozen=True)
class LoaderWorkers:
    """Worker processes of the training and the validation loader, each planned for its
    split (``runtime.plan_cpus``)."""

    train: int
    val: int


def image_feed(
    model: TransferModel,
    train_set: torch.utils.data.Dataset,
    val_set: torch.utils.data.Dataset | None,
    config: TrainConfig,
    placement: Placement,
    workers: LoaderWorkers,
    generator: torch.Generator,
    decoded: image_cache.DecodedImages | None = None,
) -> Feed:
    """Images through the whole model; under data-parallel training each rank loads its share
    of every epoch's order and its shard of the validation images. With ``decoded`` the
    training batches come from the decoded-image cache, in the order and with the pixels
    the loader would give."""
    context, device = placement.context, placement.device
    val = None
    if val_set is not None:
        val = make_loader(evaluation_part(val_set, context), batch_size=config.batch_size, shuffle=False,
                          workers=workers.val, device=device)
    if decoded is not None:
        augment = image_cache.batch_form(train_set.transform)  # type: ignore[attr-defined]
        assert augment is not None, "decoded images come only with a transform that has a batched form"
        order = EpochOrder(len(train_set), seed=config.seed, rank=context.rank,  # type: ignore[arg-type]
                           world_size=context.world_size, sample_seeds=augment.random, batch_size=config.batch_size)
        batches = image_cache.DecodedBatches(decoded, augment, config.batch_size, order)
        return Feed(model, batches, val, order, feature_cache=None, generator=generator)  # type: ignore[arg-type]
    train = make_loader(train_set, batch_size=config.batch_size, shuffle=True, workers=workers.train, device=device,
                        generator=generator, seed=config.seed, context=context)
    return Feed(model, train, val, train.sampler, generator=generator)  # type: ignore[arg-type]


def evaluation_part(dataset: torch.utils.data.Dataset, context: DistContext) -> torch.utils.data.Dataset:
    """This rank's images of an evaluation split (every N-th): the ranks' outputs are gathered
    before any figure is computed, so each image counts once."""
    if not context.active:
        return dataset
    if len(dataset) < context.world_size:  # type: ignore[arg-type]
        raise TltkError(f"a split of {len(dataset)} images cannot be shared by {context.world_size} "  # type: ignore[arg-type]
                        f"processes; use fewer processes or more images (a larger --val-split for validation).")
    return Subset(dataset, distributed.evaluation_shard(len(dataset), context))  # type: ignore[arg-type]


def cached_feed(
    model: TransferModel,
    train_set: torch.utils.data.Dataset,
    val_set: torch.utils.data.Dataset | None,
    config: TrainConfig,
    placement: Placement,
    workers: int,
    store: cache.FeatureCache,
    reporter: Reporter,
) -> Feed:
    """Run the frozen backbone once over the training and validation images.

    Under data-parallel training each rank runs it over its shard of the images; the
    training features are then gathered so that every rank holds all of them (each epoch's
    order hands a rank different images), while validation stays sharded like the images.
    """
    context, device = placement.context, placement.device

    def to_device(images: torch.Tensor) -> torch.Tensor:
        return batch_to(images, device, placement.channels_last)

    def features_of(dataset: torch.utils.data.Dataset) -> cache.CachedSplit:
        loader = make_loader(dataset, batch_size=config.batch_size, shuffle=False, workers=workers, device=device)
        return store.extract(model, loader, len(dataset), to_device, lambda: autocast(device, placement.amp_dtype))  # type: ignore[arg-type]

    train = features_of(evaluation_part(train_set, context))
    if context.active:
        train = _gathered_split(train, len(train_set), store, context, device)  # type: ignore[arg-type]
    val = features_of(evaluation_part(val_set, context)) if val_set is not None else None
    sizes = {"training": len(train), "validation": len(val_set) if val_set is not None else 0}  # type: ignore[arg-type]
    reporter.message(store.describe(sizes))
    order = EpochOrder(len(train), seed=config.seed, rank=context.rank, world_size=context.world_size,
                       batch_size=config.batch_size)
    return Feed(
        cache.HeadOnFeatures(model),
        cache.FeatureBatches(train, config.batch_size, order),
        cache.FeatureBatches(val, config.batch_size) if val is not None else None,
        order,
        store.where,
        broadcast_buffers=False,  # the backbone does not run again: nothing of it changes
    )


def _gathered_split(shard: cache.CachedSplit, total: int, store: cache.FeatureCache, context: DistContext,
                    device: torch.device) -> cache.CachedSplit:
    """Every rank's features of an ``evaluation_part`` in dataset order, where the cache keeps
    them (in memory, or memory-mapped on disk)."""
    features = store.allocate(total, tuple(shard.features.shape[1:]), shard.features.dtype)
    targets = torch.empty((total, *shard.targets.shape[1:]), dtype=shard.targets.dtype)
    distributed.gather_interleaved(features, shard.features, context, device)
    distributed.gather_interleaved(targets, shard.targets, context, device)
    return cache.CachedSplit(features, targets)


def decoded_images(train_set: torch.utils.data.Dataset, config: TrainConfig, reporter: Reporter, context: DistContext,
                   free: int) -> image_cache.DecodedImages | None:
    """The training images decoded once (``tltk.train.image_cache``), or None where they are
    read by a loader; a sentence to the user when they could have been and are not."""
    plan = image_cache.plan(train_set, enabled=config.image_cache, distributed=context.active)
    if plan.augment is None:
        if plan.reason:
            reporter.message(plan.reason)
        return None
    opened = image_cache.open_images(train_set, plan.augment, cache.memory_budget(config.cache_mem),  # type: ignore[arg-type]
                                     threads=config.threads or free)
    if isinstance(opened, str):
        reporter.message(opened)
        return None
    reporter.message(opened.describe(plan.augment))
    return opened

