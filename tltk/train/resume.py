"""Resuming an interrupted run: when its state is saved, how a signal stops it, and the
callback that saves and restores everything the loop holds.

``Checkpointing`` is the plan (where, how often, whether this run resumes);
``BoundCheckpointing`` is that plan bound to the loop's objects, the last callback in the
loop's list, so what it saves is the state every other callback has acted on. The files
themselves are ``tltk.train.checkpoint``'s. SIGINT and SIGTERM only set a flag: the step
in progress finishes, the ranks agree to stop, a checkpoint is written and
``Interrupted`` tells the user how to resume.
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from tltk import distributed
from tltk.distributed import SINGLE, DistContext
from tltk.errors import RunDirError, TltkError
from tltk.rundir import MetricsLog
from tltk.train import checkpoint as ckpt
from tltk.train.callbacks import Callback, EarlyStopping
from tltk.train.feeds import Feed


# Seconds of training an interrupted run may lose by default: an epoch's end saves a
# checkpoint once this long has passed since the last one.
DEFAULT_CHECKPOINT_INTERVAL = 60.0


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

