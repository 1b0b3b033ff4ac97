"""Everything that watches or steers training is a callback, in one list the loop calls in order.

The progress display, the strategy's epoch hooks, TensorBoard, filter snapshots, early
stopping, checkpointing and a user's own callbacks all have the same shape. Each hook is
optional. Before ``on_train_start`` the loop binds itself to every callback
(``callback.loop``), so a hook can read the loop's state (optimizer, step, epoch, history)
and ask it to stop (``self.loop.stop(reason)``). ``state_dict`` / ``load_state_dict`` carry
a callback's own state through a checkpoint, so a resumed run resumes its callbacks too.

``on_step_end`` runs after the optimizer step, while the gradients of that step are still
on the parameters. A resumed epoch does not start again: ``on_epoch_start`` is not called
for the epoch a run is resumed in the middle of (the callbacks' state is restored instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

from tltk.errors import TltkError

if TYPE_CHECKING:  # only named in annotations: a plugin's callback module loads without torch (`tltk plugins`)
    import torch
    from torch import nn

    from tltk.strategies import Strategy
    from tltk.train.trainer import Loop


class Callback:
    loop: "Loop | None" = None

    def bind(self, loop: "Loop") -> None:
        """Called by the loop before ``on_train_start``: ``self.loop`` is its state from then on."""
        self.loop = loop

    def on_train_start(self, model: nn.Module, total_steps: int) -> None:
        """Before the first step."""

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Before each epoch's first step (``epoch`` 0-based)."""

    def on_step_end(self, model: nn.Module, row: dict[str, Any], images: torch.Tensor) -> None:
        """After each optimizer step; ``images`` is the batch as the model saw it (augmented, normalised)."""

    def on_epoch_end(self, model: nn.Module, row: dict[str, Any]) -> None:
        """After validation of each epoch; ``row`` is the epoch's metrics.jsonl row."""

    def on_message(self, text: str) -> None:
        """A line for the person watching (a strategy's change, early stopping)."""

    def on_train_end(self, model: nn.Module, history: list[dict[str, Any]]) -> None:
        """After the last epoch, before the best weights are restored."""

    def state_dict(self) -> dict[str, Any]:
        """What this callback must remember across a resume: plain JSON values."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` gave, before training resumes."""

    def close(self) -> None:
        """Release files and the like. Called last, also when training stops on an error or
        a signal, so what was written so far is complete on disk."""


class Reporter(Protocol):
    """What a progress display is told (the CLI's bar, or nobody)."""

    def start(self, total_steps: int) -> None: ...
    def step(self, row: dict[str, Any]) -> None: ...
    def epoch(self, row: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def finish(self) -> None: ...


class SilentReporter:
    def start(self, total_steps: int) -> None: ...
    def step(self, row: dict[str, Any]) -> None: ...
    def epoch(self, row: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def finish(self) -> None: ...


class Progress(Callback):
    """Shows training on a ``Reporter``: first in the list, so the display is up to date
    before any other callback acts on a step or an epoch."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter

    def on_train_start(self, model: nn.Module, total_steps: int) -> None:
        self.reporter.start(total_steps)

    def on_step_end(self, model: nn.Module, row: dict[str, Any], images: torch.Tensor) -> None:
        self.reporter.step(row)

    def on_epoch_end(self, model: nn.Module, row: dict[str, Any]) -> None:
        self.reporter.epoch(row)

    def on_message(self, text: str) -> None:
        self.reporter.message(text)

    def close(self) -> None:
        self.reporter.finish()


class StrategyHooks(Callback):
    """A strategy's epoch hooks (freeze-unfreeze thaws the backbone at an epoch's start).

    Its state is how many epoch starts were applied; a resumed run applies them again
    before the checkpoint's weights are loaded, so the model trains what it trained then.
    A change is announced, and the loop told to share the newly trained parameters'
    gradients between processes."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.epochs_started = 0

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        change = self.strategy.on_epoch_start(model, epoch)  # type: ignore[arg-type]
        self.epochs_started = epoch + 1
        if change and self.loop is not None:
            self.loop.message(change)
            self.loop.trainable_changed()

    def state_dict(self) -> dict[str, Any]:
        return {"epochs_started": self.epochs_started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.loop is not None, "bound to the loop before it resumes"
        # A checkpoint from before callbacks had state: the epochs the loop will not start again.
        started = int(state.get("epochs_started", self.loop.epochs_begun))
        for epoch in range(started):
            self.strategy.on_epoch_start(self.loop.model, epoch)
        self.epochs_started = started


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


def build_callbacks(specs: Sequence[Mapping[str, Any]]) -> list[Callback]:
    """The named callbacks of a run (``{"name": ..., "options": {...}}`` each, as config.json
    records them), built before the run directory is touched so a bad name or option
    leaves nothing half-written."""
    from tltk.registry import CALLBACKS, build

    built = []
    for spec in specs:
        name, options = str(spec["name"]), dict(spec.get("options") or {})
        callback = build("callback", name, **options)  # refuses an option the callback does not declare
        if not isinstance(callback, Callback):
            raise TltkError(f"callback '{name}' ({CALLBACKS.origin(name)}) built a {type(callback).__name__}, "
                            f"not a tltk.plugin.Callback; its factory must return one.")
        built.append(callback)
    return built
