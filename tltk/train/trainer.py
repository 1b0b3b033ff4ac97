"""The training loop: optimizer, schedule, mixed precision, validation, early stopping.

Readable top to bottom like a reference training script. ``fit`` trains a model in
place and leaves it holding the weights of its best validation epoch (or the last
epoch when there is no validation split); every step and epoch goes to a ``MetricsLog``.

Device, precision, memory layout and loaders are ``tltk.runtime``'s, shared with
everything that runs a model after training; for a frozen backbone on deterministic
images the head trains on cached backbone features (``tltk.train.cache``).
"""

from __future__ import annotations

import inspect
import math
import random
import signal
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from tltk import distributed
from tltk.distributed import SINGLE, DistContext, EpochOrder
from tltk.errors import RunDirError, SettingError, TltkError
from tltk.metrics import multilabel_report
from tltk.model import TransferModel
from tltk.rundir import MetricsLog
from tltk.runtime import (
    Batches,
    CpuPlan,
    autocast,
    batch_to,
    free_cores,
    intra_op_threads,
    make_loader,
    memory_format,
    plan_cpus,
    precision_name,
    predict_logits,
    resolve_device,
    resolve_precision,
    use_channels_last,
)
from tltk.strategies import Strategy
from tltk.train import cache, image_cache
from tltk.train import checkpoint as ckpt
from tltk.train.callbacks import Callback, Progress, Reporter, SilentReporter, StrategyHooks
from tltk.train.config import FIND_LR, TrainConfig
from tltk.train.losses import build_loss


@dataclass
class FitResult:
    epochs_run: int
    steps: int
    best_epoch: int | None
    best_metric: float | None
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    precision: str = "fp32"  # what --precision resolved to on this machine
    feature_cache: str | None = None  # "memory" or "disk" when the head trained on cached features
    image_cache: str | None = None  # "memory" or "disk" when training read decoded images (tltk.train.image_cache)
    threads: int = 0  # torch intra-op threads training ran with


# --- set-up ---------------------------------------------------------------------------


def seed_everything(seed: int) -> torch.Generator:
    """Seed every generator training touches; the returned one seeds DataLoader workers."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """torch's deterministic algorithms while training (a warning where an operation has none),
    and the caller's own setting back afterwards: a notebook that trains with tltk and then
    runs its own code is not left switched to them. A caller who already asked for them,
    strictly or not, keeps exactly that."""
    if torch.are_deterministic_algorithms_enabled():
        yield
        return
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


# Seconds of training an interrupted run may lose by default: an epoch's end saves a
# checkpoint once this long has passed since the last one.
DEFAULT_CHECKPOINT_INTERVAL = 60.0

def build_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    groups = [{k: v for k, v in g.items() if k != "name"} | {"initial_lr": g["lr"]} for g in groups]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(step: int, config: TrainConfig, steps_per_epoch: int, total_steps: int) -> float:
    """The multiplier of every group's base learning rate at ``step`` (0-based)."""
    warmup = 1.0
    if config.warmup_steps > 0 and step < config.warmup_steps:
        warmup = (step + 1) / config.warmup_steps
    epoch_float = step / max(steps_per_epoch, 1)
    if config.schedule == "step":
        return warmup * config.gamma ** math.floor(epoch_float / max(config.step_epochs, 1))
    if config.schedule == "exp":
        return warmup * config.gamma ** epoch_float
    if config.schedule == "cosine":
        after = max(step - config.warmup_steps, 0)
        span = max(total_steps - config.warmup_steps, 1)
        return warmup * 0.5 * (1.0 + math.cos(math.pi * min(after / span, 1.0)))
    return warmup


# --- what the loop feeds on -----------------------------------------------------------


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


def image_feed(
    model: TransferModel,
    train_set: torch.utils.data.Dataset,
    val_set: torch.utils.data.Dataset | None,
    config: TrainConfig,
    workers: int,
    device: torch.device,
    generator: torch.Generator,
    context: DistContext = SINGLE,
    decoded: image_cache.DecodedImages | None = None,
    val_workers: int | None = None,
) -> Feed:
    """Images through the whole model; under data-parallel training each rank loads its share
    of every epoch's order and its shard of the validation images. With ``decoded`` the
    training batches come from the decoded-image cache, in the order and with the pixels
    the loader would give."""
    val = None
    if val_set is not None:
        val = make_loader(evaluation_part(val_set, context), batch_size=config.batch_size, shuffle=False,
                          workers=workers if val_workers is None else val_workers, device=device)
    if decoded is not None:
        augment = image_cache.batch_form(train_set.transform)  # type: ignore[attr-defined]
        assert augment is not None, "decoded images come only with a transform that has a batched form"
        order = EpochOrder(len(train_set), seed=config.seed, rank=context.rank,  # type: ignore[arg-type]
                           world_size=context.world_size, sample_seeds=augment.random, batch_size=config.batch_size)
        batches = image_cache.DecodedBatches(decoded, augment, config.batch_size, order)
        return Feed(model, batches, val, order, feature_cache=None, generator=generator)  # type: ignore[arg-type]
    train = make_loader(train_set, batch_size=config.batch_size, shuffle=True, workers=workers, device=device,
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
    workers: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    store: cache.FeatureCache,
    reporter: Reporter,
    context: DistContext = SINGLE,
) -> Feed:
    """Run the frozen backbone once over the training and validation images.

    Under data-parallel training each rank runs it over its shard of the images; the
    training features are then gathered so that every rank holds all of them (each epoch's
    order hands a rank different images), while validation stays sharded like the images.
    """

    def to_device(images: torch.Tensor) -> torch.Tensor:
        return batch_to(images, device, channels_last)

    def features_of(dataset: torch.utils.data.Dataset) -> cache.CachedSplit:
        loader = make_loader(dataset, batch_size=config.batch_size, shuffle=False, workers=workers, device=device)
        return store.extract(model, loader, len(dataset), to_device, lambda: autocast(device, amp_dtype))  # type: ignore[arg-type]

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


# --- the loop -------------------------------------------------------------------------


def fit(
    model: TransferModel,
    strategy: Strategy,
    train_set: torch.utils.data.Dataset,
    val_set: torch.utils.data.Dataset | None,
    config: TrainConfig,
    log: MetricsLog | None = None,
    reporter: Reporter | None = None,
    callbacks: Sequence[Callback] = (),
    loss_fn: nn.Module | None = None,
    cache_dir: Path | None = None,
    checkpoints: "Checkpointing | None" = None,
    context: DistContext | None = None,
) -> FitResult:
    """Train ``model`` in place. ``cache_dir``: where features go when they are cached on
    disk (a temporary folder inside it, removed at the end; default: the system's).
    ``checkpoints``: where and how often the run's state is saved, and whether to resume.
    ``context``: this process's place in a data-parallel job (default: the process group
    it has joined, if any; see ``tltk.distributed.session``). ``config.batch_size`` is then
    per process, and every rank returns the same model and figures."""
    config.validate()
    if config.lr == FIND_LR:
        raise SettingError("lr find is resolved by finetune, which runs the learning-rate finder first; give fit a "
                           "number (tltk.train.lr_find.find_lr suggests one).", ["lr"])
    context = context or distributed.current_context()
    reporter = reporter or SilentReporter()
    generator = seed_everything(config.seed + context.rank)  # ranks draw different dropout masks
    device = distributed.device_for(context, resolve_device(config.device))
    amp_dtype = resolve_precision(config.precision, device)
    channels_last = use_channels_last(config.channels_last, model)
    val_set = val_set if val_set is not None and len(val_set) > 0 else None
    started = time.perf_counter()

    model.to(device)
    strategy.prepare(model)
    decision = cache.decide(strategy, train_set, enabled=config.cache, augment=config.augment, callbacks=callbacks)
    if decision.reason:
        reporter.message(decision.reason)
    use_cache = distributed.all_ranks(decision.use, context, device)  # only rank 0 has the run's watchers
    free = free_cores() if config.threads is None or config.workers is None else 1
    decoded = None if use_cache else decoded_images(train_set, config, reporter, context, free)
    cpus = training_cpus(train_set, config, decoded is not None, free, checkpoints)
    val_workers = plan_cpus(len(val_set), decoded=False, threads=cpus.threads, workers=config.workers,  # type: ignore[arg-type]
                            free=free).workers if val_set is not None else 0
    watchers = [Progress(reporter), StrategyHooks(strategy), *callbacks]
    with ExitStack() as stack:
        for callback in watchers:
            stack.callback(callback.close)
        stack.enter_context(intra_op_threads(cpus.threads))
        stack.enter_context(deterministic_algorithms())
        stack.enter_context(memory_format(model, channels_last))
        if use_cache:
            total = len(train_set) + (len(val_set) if val_set is not None else 0)
            store = stack.enter_context(cache.FeatureCache(total, cache.memory_budget(config.cache_mem), cache_dir))
            feed = cached_feed(model, train_set, val_set, config, cpus.workers, device, amp_dtype, channels_last, store,
                               reporter, context)
        else:
            feed = image_feed(model, train_set, val_set, config, cpus.workers, device, generator, context, decoded,
                              val_workers)
        stack.enter_context(checkpoints.signals() if checkpoints is not None else nullcontext())
        loop = Loop(model, strategy, feed, config, watchers, log=log, loss_fn=loss_fn, checkpoints=checkpoints,
                    context=context)
        result = loop.run()
    stopper = loop.early_stopping
    if stopper.best_state is not None:
        model.load_state_dict(stopper.best_state)
        result.best_epoch, result.best_metric = stopper.best_epoch, stopper.best_value
    result.seconds = round(time.perf_counter() - started, 3)
    result.precision = precision_name(amp_dtype)
    result.feature_cache = feed.feature_cache
    result.image_cache = decoded.where if decoded is not None else None
    result.threads = cpus.threads
    return result


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


def training_cpus(train_set: torch.utils.data.Dataset, config: TrainConfig, decoded: bool, free: int,
                  checkpoints: Checkpointing | None) -> CpuPlan:
    """Threads and workers for the run (``runtime.plan_cpus``; ``summary.json`` records the
    threads). The number of threads changes the last bits of sums, and so the weights a run
    ends with: a resumed run takes the threads it started with, to end where the
    uninterrupted one would."""
    threads = config.threads
    if threads is None and checkpoints is not None and checkpoints.resume:
        saved = ckpt.read_training_state(checkpoints.run_dir).extra.get("threads")
        threads = int(saved) if isinstance(saved, int) and saved > 0 else None
    plan = plan_cpus(len(train_set), decoded=decoded, threads=threads, workers=config.workers, free=free)  # type: ignore[arg-type]
    if checkpoints is not None:
        checkpoints.threads = plan.threads
    return plan


class Loop:
    """One training run's state on one object: the model and what trains it, where in the
    run it is, and what it has logged. Callbacks are bound to it (``callback.loop``), so
    each hook sees all of it; the loop itself only trains, validates and logs, and leaves
    progress, strategy hooks, early stopping and checkpointing to its callbacks.
    """

    def __init__(self, model: TransferModel, strategy: Strategy, feed: Feed, config: TrainConfig,
                 callbacks: Sequence[Callback], *, log: MetricsLog | None = None, loss_fn: nn.Module | None = None,
                 checkpoints: Checkpointing | None = None, context: DistContext = SINGLE) -> None:
        self.model, self.feed, self.config, self.log, self.context = model, feed, config, log, context
        self.device = distributed.device_for(context, resolve_device(config.device))
        self.amp_dtype = resolve_precision(config.precision, self.device)
        self.channels_last = use_channels_last(config.channels_last, model)
        groups = [g for g in strategy.param_groups(model, config.lr) if g["params"]]
        self.optimizer = build_optimizer(groups, config)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.module = torch.compile(feed.module) if config.compile else feed.module
        self.steps_per_epoch = len(feed.train)  # type: ignore[arg-type]
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config, self.steps_per_epoch, self.total_steps))
        self.loss_fn = (loss_fn or build_loss(config.task)).to(self.device)
        self.result = FitResult(0, 0, None, None, False)
        self.trainer: nn.Module = self.module  # under DDP when several processes train
        self.position = ckpt.TrainingState()  # where the run is: epoch, batches done, running sums
        self.step = 0
        self.mid_epoch = False  # whether the step just taken leaves batches of its epoch to train
        self.stop_reason: str | None = None
        self._rewrap = False
        # Early stopping and checkpointing come last: they act on an epoch once everything else has seen it.
        self.early_stopping = EarlyStopping(config.monitored, config.patience)
        self.checkpointing = (checkpoints.bind(model, self.optimizer, self.scheduler, self.scaler, self.early_stopping,
                                               feed, log) if checkpoints is not None else None)
        self.callbacks = [*callbacks, self.early_stopping, *([self.checkpointing] if self.checkpointing else [])]

    # --- what callbacks may call ---------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The epoch in progress, 0-based."""
        return self.position.epoch

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.result.history

    @property
    def epochs_begun(self) -> int:
        """Epochs whose start the loop has passed (a resumed mid-epoch one included)."""
        return self.position.epoch + (1 if self.position.batches_done else 0)

    def stop(self, reason: str) -> None:
        """Stop after the current step (within an epoch) or epoch; ``reason`` is shown."""
        if self.stop_reason is None:
            self.stop_reason = reason
            self.message(reason)

    def message(self, text: str) -> None:
        for callback in self.callbacks:
            callback.on_message(text)

    def trainable_changed(self) -> None:
        """What trains has changed (a strategy thawed the backbone): a data-parallel job must
        share the newly trained parameters' gradients too, so the wrapper is rebuilt."""
        self._rewrap = True

    def checkpoint_state(self) -> dict[str, dict[str, Any]]:
        """Every callback's ``state_dict``, keyed by its class (numbered when repeated)."""
        return {key: callback.state_dict() for key, callback in self._keyed_callbacks()}

    def restore_callbacks(self, states: dict[str, dict[str, Any]]) -> None:
        for key, callback in self._keyed_callbacks():
            callback.load_state_dict(states.get(key, {}))

    def _keyed_callbacks(self) -> list[tuple[str, Callback]]:
        seen: dict[str, int] = {}
        keyed = []
        for callback in self.callbacks:
            name = type(callback).__qualname__
            seen[name] = seen.get(name, 0) + 1
            keyed.append((name if seen[name] == 1 else f"{name}#{seen[name]}", callback))
        return keyed

    # --- the run --------------------------------------------------------------------------

    def run(self) -> FitResult:
        """Epochs of training and validation; the best epoch is left to the caller."""
        for callback in self.callbacks:
            callback.bind(self)
        for callback in self.callbacks:
            callback.on_train_start(self.model, self.total_steps)
        resumed = self.position  # a checkpoint callback has moved it on resume
        self.step = resumed.global_step
        # Wrapped after a resume has replayed the strategy's epochs: DDP syncs what trains at wrap time.
        self.trainer = data_parallel(self.module, self.context, self.device, self.feed.broadcast_buffers)
        last_epoch = self.epochs if not resumed.stopped_early else resumed.epoch
        for epoch in range(resumed.epoch, last_epoch):
            if not (epoch == resumed.epoch and resumed.batches_done):
                self.position = ckpt.TrainingState(epoch=epoch)
                self._start_epoch(epoch)
            self.feed.order.set_epoch(epoch, self.position.batches_done * self.config.batch_size)
            row = self._run_epoch(epoch)
            for callback in self.callbacks:
                callback.on_epoch_end(self.model, row)
            self._agree_on_stop(distributed.any_rank(self.stop_reason is not None, self.context, self.device))
            if self.stop_reason is not None or self.step >= self.total_steps:
                break
        for callback in self.callbacks:
            callback.on_train_end(self.model, self.result.history)
        self.result.steps = self.step
        return self.result

    def _start_epoch(self, epoch: int) -> None:
        for callback in self.callbacks:
            callback.on_epoch_start(self.model, epoch)
        if self._rewrap:
            self.trainer = data_parallel(self.module, self.context, self.device, self.feed.broadcast_buffers)
            self._rewrap = False

    def _run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch, validate, log the epoch's row and return it."""
        epoch_started = time.perf_counter()
        train_loss, train_acc = self._train_epoch(epoch)
        row: dict[str, Any] = {"kind": "epoch", "epoch": epoch + 1, "step": self.step, "train_loss": train_loss}
        if train_acc is not None:
            row["train_accuracy"] = train_acc
        row["lr"] = self.optimizer.param_groups[-1]["lr"]
        if self.feed.val is not None:
            row.update(validation_metrics(self.module, self.feed.val, self.device, self.amp_dtype, self.loss_fn,
                                          self.config.task, self.channels_last, self.context))
        row["seconds"] = round(time.perf_counter() - epoch_started, 3)
        self.result.history.append(row)
        if self.log is not None:
            self.log.write(row)
            self.log.flush()
        self.result.epochs_run = epoch + 1
        return row

    def _train_epoch(self, epoch: int) -> tuple[float, float | None]:
        """One pass over the epoch's batches (those not yet trained when resumed). Under
        data-parallel training the step's loss and counts are summed over the ranks, so
        every rank logs and returns the figures of the global batch."""
        self.trainer.train()
        position, config = self.position, self.config
        batches = self.feed.train
        batches_per_epoch = position.batches_done + len(batches)  # type: ignore[arg-type]
        for batch_index, (images, targets) in enumerate(batches, start=position.batches_done):
            images = batch_to(images, self.device, self.channels_last)
            targets = targets.to(self.device, non_blocking=True)
            with autocast(self.device, self.amp_dtype):
                logits = self.trainer(images)
                loss = self.loss_fn(logits.float(), targets)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if config.clip_grad:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), config.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            lr = self.optimizer.param_groups[-1]["lr"]
            self.scheduler.step()
            self.step += 1
            hits = int((logits.detach().argmax(1) == targets).sum()) if config.task == "multiclass" else 0
            totals = StepTotals(float(loss.detach()), len(targets), hits, self._signalled(),
                                self.stop_reason is not None).summed(self.context, self.device)
            self._agree_on_signal(totals.signalled)
            self._agree_on_stop(totals.stopping)
            position.epoch_loss_sum += totals.loss * totals.samples
            position.epoch_correct += totals.hits
            position.epoch_seen += totals.samples
            position.batches_done = batch_index + 1
            position.global_step = self.step
            row = {"kind": "step", "step": self.step, "epoch": epoch + 1, "loss": totals.loss, "lr": lr}
            if self.log is not None:
                self.log.write(row)
            self.mid_epoch = batch_index + 1 < batches_per_epoch
            for callback in self.callbacks:
                callback.on_step_end(self.model, row, images)
            if self.step >= self.total_steps or self.stop_reason is not None:
                break
        accuracy = position.epoch_correct / max(position.epoch_seen, 1) if config.task == "multiclass" else None
        return position.epoch_loss_sum / max(position.epoch_seen, 1), accuracy

    def _signalled(self) -> bool:
        """Whether this process received SIGINT or SIGTERM (summed over the ranks with the step's figures)."""
        return self.checkpointing is not None and self.checkpointing.plan.signal_received is not None

    def _agree_on_stop(self, stopping_anywhere: bool) -> None:
        """Every process stops where one was asked to (a callback's clock differs between
        them): one rank going on alone would wait in the next collective for ever."""
        if stopping_anywhere and self.stop_reason is None:
            self.stop_reason = "another process stopped training"

    def _agree_on_signal(self, signalled_anywhere: bool) -> None:
        if self.checkpointing is not None:
            self.checkpointing.plan.stop_if_signalled(signalled_anywhere)


@dataclass
class StepTotals:
    """One step's figures on one rank; ``summed`` makes them the global batch's on every rank."""

    loss: float  # the mean over this rank's batch
    samples: int
    hits: int
    signalled: bool
    stopping: bool = False  # a callback asked this rank's loop to stop

    def summed(self, context: DistContext, device: torch.device) -> "StepTotals":
        if not context.active:
            return self
        values = distributed.all_reduce_sums({"loss_sum": self.loss * self.samples, "samples": self.samples,
                                              "hits": self.hits, "signalled": float(self.signalled),
                                              "stopping": float(self.stopping)}, context, device)
        samples = int(values["samples"])
        return StepTotals(values["loss_sum"] / max(samples, 1), samples, int(values["hits"]), values["signalled"] > 0,
                          values["stopping"] > 0)


def data_parallel(module: nn.Module, context: DistContext, device: torch.device, broadcast_buffers: bool) -> nn.Module:
    """``module`` under DistributedDataParallel when several processes train it: gradients
    are averaged over the ranks in every backward pass, so they all take the same step."""
    if not context.active:
        return module
    if not any(p.requires_grad for p in module.parameters()):
        raise TltkError("nothing in the model trains (every parameter is frozen); data-parallel training has no "
                        "gradients to share; check --strategy.")
    device_ids = [device.index] if device.type == "cuda" and device.index is not None else None
    return DistributedDataParallel(module, device_ids=device_ids, **{_BUFFER_SYNC_OPTION: broadcast_buffers})


# Newer torch names the per-forward buffer broadcast ``forward_sync_buffers`` (buffers are synced
# at wrap time either way); older versions call it ``broadcast_buffers``.
_BUFFER_SYNC_OPTION = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                       else "broadcast_buffers")


class Interrupted(TltkError):
    """SIGINT or SIGTERM stopped the run between two steps, after a checkpoint was saved."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class SavePolicy:
    """When a run saves its checkpoint, besides on a signal: every ``every_steps`` steps, and
    at an epoch's end once ``interval_seconds`` passed since the last save (0: every epoch)."""

    every_steps: int | None = None
    interval_seconds: float = DEFAULT_CHECKPOINT_INTERVAL

    def check(self) -> None:
        if self.every_steps is not None and self.every_steps < 1:
            raise RunDirError(f"--checkpoint-every must be at least 1, not {self.every_steps}.")
        if not self.interval_seconds >= 0:
            raise RunDirError(f"--checkpoint-interval must be 0 or more seconds, not {self.interval_seconds}.")


@dataclass
class Checkpointing:
    """Where a run saves its state and when (``saving``), and whether it starts from the
    state saved there. ``config`` is what a resumed run must match."""

    run_dir: Path
    config: dict[str, Any]
    saving: SavePolicy = field(default_factory=SavePolicy)
    resume: bool = False
    signal_received: int | None = None  # set by the handler, whenever the signal lands
    stopping: int | None = None  # the signal the ranks agreed to stop on (see ``stop_if_signalled``)
    context: DistContext = SINGLE  # in a data-parallel job every rank restores, rank 0 alone writes
    threads: int | None = None  # the intra-op threads the run trains with, saved for its resumption

    def stop_if_signalled(self, signalled_anywhere: bool) -> None:
        """Act on a signal only at points where every rank decides alike: ``signalled_anywhere``
        is this rank's ``signal_received`` combined over the ranks at such a point. A signal
        that lands in between waits for the next one, so no rank saves or stops while another
        goes on into the next collective."""
        if signalled_anywhere:
            self.stopping = self.signal_received or signal.SIGTERM  # SIGTERM: another rank was told

    @contextmanager
    def signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM only set a flag while training: the step in progress
        finishes, a checkpoint is written, and ``Interrupted`` is raised."""

        def note(signum: int, frame: Any) -> None:
            self.signal_received = signum

        previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def bind(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
             stopper: "EarlyStopping", feed: Feed, log: MetricsLog | None) -> "BoundCheckpointing":
        return BoundCheckpointing(self, model, optimizer, scheduler, scaler, stopper, feed, log)


@dataclass
class BoundCheckpointing(Callback):
    """``Checkpointing`` together with the objects whose state it saves and restores: the
    callback that restores a run at its start, and saves it inside epochs (every N steps,
    or on a signal) and at their ends. It comes last in the loop's list, so the state it
    saves is the one every other callback has acted on."""

    plan: Checkpointing
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    stopper: "EarlyStopping"
    feed: Feed
    log: MetricsLog | None
    history: list[dict[str, Any]] = field(default_factory=list)
    last_saved: float = field(default_factory=time.monotonic)

    @property
    def generators(self) -> dict[str, torch.Generator]:
        return {"loader": self.feed.generator} if self.feed.generator is not None else {}

    def on_train_start(self, model: nn.Module, total_steps: int) -> None:
        """Restore the saved state into the model, optimizer, scheduler, scaler, generators,
        early stopper and the other callbacks, and move the loop to where it stopped.
        Nothing may draw a random number between this and the first batch."""
        loop = self.loop
        assert loop is not None, "bound to the loop before training starts"
        self.history = loop.result.history
        if not self.plan.resume:
            return
        loop.position = saved = ckpt.read_training_state(self.plan.run_dir)
        loop.restore_callbacks(saved.extra.get("callbacks", {}))  # a strategy's epochs replay before the weights load
        resumed = ckpt.load_checkpoint(self.plan.run_dir, self.model, self.optimizer, self.scheduler, self.scaler,
                                       generators=self.generators, config=self.plan.config)
        state = resumed.state
        self.stopper.best_value, self.stopper.best_epoch = state.best_metric, state.best_epoch
        self.stopper.bad_epochs = state.epochs_without_improvement
        self.stopper.best_state = resumed.best_model
        loop.result.history[:] = state.history
        loop.result.epochs_run, loop.result.stopped_early = state.epoch, state.stopped_early
        loop.position = state

    def on_step_end(self, model: nn.Module, row: dict[str, Any], images: torch.Tensor) -> None:
        loop = self.loop
        assert loop is not None
        if loop.step >= loop.total_steps or not loop.mid_epoch or not self.due(loop.step):
            return  # the epoch's end saves anyway; the run's end needs no checkpoint
        self.save(replace(loop.position))
        self.stop_if_asked(loop.epoch, loop.step)

    def on_epoch_end(self, model: nn.Module, row: dict[str, Any]) -> None:
        loop = self.loop
        assert loop is not None
        self.agree_on_signal(loop.device)
        stopped = loop.result.stopped_early
        if self.due_at_epoch_end(last_epoch=stopped or loop.step >= loop.total_steps):
            self.save(ckpt.TrainingState(epoch=loop.epoch + 1, global_step=loop.step, stopped_early=stopped),
                      loop.result.history)
        self.stop_if_asked(loop.epoch, loop.step)

    def due(self, step: int) -> bool:
        every = self.plan.saving.every_steps
        return self.plan.stopping is not None or bool(every and step % every == 0)

    def due_at_epoch_end(self, last_epoch: bool) -> bool:
        """A signal always saves. Otherwise the last epoch does not (the finished run needs no
        checkpoint), and another does once ``interval`` seconds passed since the last save:
        a save costs about a second for a ResNet-18, which epochs of a few seconds should
        not pay every time, while a long run keeps at most that much work at risk."""
        if self.plan.stopping is not None:
            return True
        return not last_epoch and time.monotonic() - self.last_saved >= self.plan.saving.interval_seconds

    def agree_on_signal(self, device: torch.device) -> None:
        """Every rank stops where one was told to (a signal may reach them at different times)."""
        signalled = self.plan.signal_received is not None
        self.plan.stop_if_signalled(distributed.any_rank(signalled, self.plan.context, device))

    def save(self, state: ckpt.TrainingState, history: list[dict[str, Any]] | None = None) -> None:
        if not self.plan.context.is_main:
            return
        if self.log is not None:
            self.log.flush()
            state.metrics_bytes = self.log.handle.tell()
        state.best_metric, state.best_epoch = self.stopper.best_value, self.stopper.best_epoch
        state.epochs_without_improvement = self.stopper.bad_epochs
        state.history = list(history if history is not None else self.history)
        if self.loop is not None:
            state.extra = {**state.extra, "callbacks": self.loop.checkpoint_state()}
        if self.plan.threads is not None:
            state.extra = {**state.extra, "threads": self.plan.threads}
        ckpt.save_checkpoint(self.plan.run_dir, self.model, self.optimizer, self.scheduler, self.scaler, state,
                             generators=self.generators, best_model=self.stopper.best_state, config=self.plan.config)
        self.last_saved = time.monotonic()

    def stop_if_asked(self, epoch: int, step: int) -> None:
        signum = self.plan.stopping
        if signum is None:
            return
        distributed.barrier(self.plan.context)  # no rank leaves while rank 0 is still writing
        context = self.plan.context
        launch = f", launched with {context.world_size} processes again" if context.active else ""
        raise Interrupted(
            f"interrupted at epoch {epoch + 1} step {step}; checkpoint saved; "
            f"resume with `tltk finetune --resume {self.plan.run_dir}`{launch}.",
            130 if signum == signal.SIGINT else 128 + int(signum),
        )


@dataclass
class EarlyStopping(Callback):
    """Tracks the best validation epoch, keeps its weights, and stops the loop when the
    monitored figure has not improved for ``patience`` epochs. Its state travels in the
    checkpoint's own fields (best value and epoch, epochs without improvement) and its
    best weights beside the model's."""

    monitor: str
    patience: int | None
    best_value: float | None = None
    best_epoch: int | None = None
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0

    def update(self, row: dict[str, Any], model: nn.Module) -> bool:
        value = row[self.monitor]
        better = self.best_value is None or (
            value < self.best_value if self.monitor == "val_loss" else value > self.best_value
        )
        if better:
            self.best_value, self.best_epoch, self.bad_epochs = value, row["epoch"], 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1
        return self.patience is not None and self.bad_epochs >= self.patience

    def on_epoch_end(self, model: nn.Module, row: dict[str, Any]) -> None:
        loop = self.loop
        if loop is None or loop.feed.val is None:
            return
        if self.update(row, model):
            loop.result.stopped_early = True
            loop.stop(f"early stopping after epoch {row['epoch']}: {self.monitor} did not improve for "
                      f"{self.patience} epochs")


def validation_metrics(
    model: nn.Module,
    loader: Batches,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    loss_fn: nn.Module,
    task: str,
    channels_last: bool = False,
    context: DistContext = SINGLE,
) -> dict[str, float]:
    """val_loss plus val_accuracy (multi-class) or val_map and val_map_voc07 (multi-label).

    Under data-parallel training ``loader`` holds this rank's shard; the ranks' logits are
    gathered first, so every rank computes the figures of the whole split."""
    logits, targets = distributed.gather_outputs(*predict_logits(model, loader, device, amp_dtype, channels_last),
                                                 context, device)
    loss = float(loss_fn.cpu()(logits, targets))
    loss_fn.to(device)
    if task == "multilabel":
        report = multilabel_report(targets.numpy(), torch.sigmoid(logits).numpy(), [""] * logits.shape[1])
        return {"val_loss": loss, "val_map": report["map"], "val_map_voc07": report["map_voc07"]}
    return {"val_loss": loss, "val_accuracy": float((logits.argmax(1) == targets).float().mean())}
