"""The training loop: ``fit`` and the ``Loop`` it runs, step by step and epoch by epoch.

Readable top to bottom like a reference training script. ``fit`` trains a model in
place and leaves it holding the weights of its best validation epoch (or the last
epoch when there is no validation split); every step and epoch goes to a ``MetricsLog``.

Around the loop, each concept has its own module: what it feeds on (``feeds``: loaders,
the decoded-image cache, cached backbone features), the optimizer and learning-rate
schedule (``optimization``), what watches and steers it (``callbacks``, early stopping
included), and saving and resuming (``resume``, over the files of ``checkpoint``).
Device, precision, memory layout and loaders are ``tltk.runtime``'s, shared with
everything that runs a model after training.
"""

from __future__ import annotations

import inspect
import math
import random
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tltk import distributed
from tltk.distributed import DistContext
from tltk.errors import SettingError, TltkError
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
    memory_format,
    plan_cpus,
    precision_name,
    predict_logits,
)
from tltk.strategies import Strategy
from tltk.train import cache
from tltk.train import checkpoint as ckpt
from tltk.train.callbacks import Callback, EarlyStopping, Progress, Reporter, SilentReporter, StrategyHooks
from tltk.train.config import FIND_LR, TrainConfig
from tltk.train.feeds import Feed, LoaderWorkers, Placement, cached_feed, decoded_images, image_feed
from tltk.train.losses import build_loss
from tltk.train.optimization import build_optimizer, lr_factor
from tltk.train.resume import Checkpointing


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
    placement = Placement.resolve(config, model, context)
    device = placement.device
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
        stack.enter_context(memory_format(model, placement.channels_last))
        if use_cache:
            total = len(train_set) + (len(val_set) if val_set is not None else 0)
            store = stack.enter_context(cache.FeatureCache(total, cache.memory_budget(config.cache_mem), cache_dir))
            feed = cached_feed(model, train_set, val_set, config, placement, cpus.workers, store, reporter)
        else:
            feed = image_feed(model, train_set, val_set, config, placement, LoaderWorkers(cpus.workers, val_workers),
                              generator, decoded)
        stack.callback(feed.close)
        stack.enter_context(checkpoints.signals() if checkpoints is not None else nullcontext())
        loop = Loop(model, strategy, feed, config, watchers, placement, log=log, loss_fn=loss_fn,
                    checkpoints=checkpoints)
        result = loop.run()
    stopper = loop.early_stopping
    if stopper.best_state is not None:
        model.load_state_dict(stopper.best_state)
        result.best_epoch, result.best_metric = stopper.best_epoch, stopper.best_value
    result.seconds = round(time.perf_counter() - started, 3)
    result.precision = precision_name(placement.amp_dtype)
    result.feature_cache = feed.feature_cache
    result.image_cache = decoded.where if decoded is not None else None
    result.threads = cpus.threads
    return result


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
                 callbacks: Sequence[Callback], placement: Placement, *, log: MetricsLog | None = None,
                 loss_fn: nn.Module | None = None, checkpoints: Checkpointing | None = None) -> None:
        self.model, self.feed, self.config, self.log, self.placement = model, feed, config, log, placement
        self.context, self.device = placement.context, placement.device
        self.amp_dtype, self.channels_last = placement.amp_dtype, placement.channels_last
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
            row.update(validation_metrics(self.module, self.feed.val, self.placement, self.loss_fn, self.config.task))
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


def validation_metrics(model: nn.Module, loader: Batches, placement: Placement, loss_fn: nn.Module,
                       task: str) -> dict[str, float]:
    """val_loss plus val_accuracy (multi-class) or val_map and val_map_voc07 (multi-label).

    Under data-parallel training ``loader`` holds this rank's shard; the ranks' logits are
    gathered first, so every rank computes the figures of the whole split."""
    device = placement.device
    logits, targets = distributed.gather_outputs(
        *predict_logits(model, loader, device, placement.amp_dtype, placement.channels_last), placement.context, device)
    loss = float(loss_fn.cpu()(logits, targets))
    loss_fn.to(device)
    if task == "multilabel":
        report = multilabel_report(targets.numpy(), torch.sigmoid(logits).numpy(), [""] * logits.shape[1])
        return {"val_loss": loss, "val_map": report["map"], "val_map_voc07": report["map_voc07"]}
    return {"val_loss": loss, "val_accuracy": float((logits.argmax(1) == targets).float().mean())}
