"""Watching training as it happens: TensorBoard event files and filter snapshots.

``TensorBoardCallback`` writes what a course asks to be shown from TensorBoard: the
training loss and learning rate of every step, the validation figures of every epoch,
histograms of each parameter's weights and gradients, the first batch of training
images as the model sees them (after augmentation), the first convolution's filters,
and the model graph. ``FilterSnapshotCallback`` saves the filter grid as PNGs every N
epochs, so the change of the filters over training can be flipped through.

Watching must never change what is trained: the graph is traced in eval mode without
gradients (no BatchNorm statistics move, no dropout draws a random number) and every
other record only reads tensors.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from tltk.backbones.base import Preprocessing
from tltk.rundir import TENSORBOARD_DIR
from tltk.train.callbacks import Callback

MAX_IMAGES = 64  # training images shown in the grid
# Epoch-row keys that are bookkeeping, not figures worth a chart.
_NOT_SCALARS = {"kind", "epoch", "step", "lr"}


def scalar_tag(key: str) -> str:
    """The TensorBoard tag of an epoch figure: ``val_accuracy`` -> ``val/accuracy``, ``train_loss`` -> ``train/epoch_loss``.

    Step and epoch figures of training are kept apart (``train/loss`` is per step) so
    each chart has one kind of point; validation figures sit under ``val/``.
    """
    split, _, name = key.partition("_")
    if split == "val":
        return f"val/{name}"
    if split == "train":
        return f"train/epoch_{name}"
    return f"time/{key}" if key == "seconds" else f"epoch/{key}"


def warn(message: str) -> None:
    warnings.warn(message, stacklevel=2)


class TensorBoardCallback(Callback):
    """Writes TensorBoard event files into ``log_dir`` while training runs.

    ``histogram_every``: steps between weight and gradient histograms (also at step 1,
    so a short run has one). ``mean``/``std``: the run's normalisation, undone before
    images are shown. ``notify`` hears one line when something optional (the graph)
    cannot be recorded.
    """

    def __init__(
        self,
        log_dir: str | Path,
        histogram_every: int = 100,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        graph: bool = True,
        filters_layer: str | None = "conv1",
        notify: Callable[[str], None] = warn,
    ) -> None:
        if histogram_every < 1:
            from tltk.errors import TltkError

            raise TltkError(f"--histogram-every must be at least 1, not {histogram_every}.")
        self.log_dir = Path(log_dir)
        self.histogram_every = histogram_every
        self.mean, self.std = mean, std
        self.graph = graph
        self.filters_layer = filters_layer
        self.notify = notify
        self.writer: Any = None
        self._first_batch_seen = False

    # --- hooks ----------------------------------------------------------------------

    def on_train_start(self, model: nn.Module, total_steps: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        clear_events(self.log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.writer.add_custom_scalars(
            {"tltk": {"loss": ["Multiline", ["train/loss", "val/loss"]],
                      "metrics": ["Multiline", ["train/epoch_accuracy", "val/accuracy", "val/map"]]}}
        )
        self._first_batch_seen = False
        self._log_filters(model, 0)

    def on_step_end(self, model: nn.Module, row: dict[str, Any], images: torch.Tensor) -> None:
        step = int(row["step"])
        self.writer.add_scalar("train/loss", row["loss"], step)
        self.writer.add_scalar("train/lr", row["lr"], step)
        if not self._first_batch_seen:
            self._first_batch_seen = True
            self.writer.add_image("train/images", self.image_grid(images), step)
            if self.graph:
                self._log_graph(model, images)
        if step == 1 or step % self.histogram_every == 0:
            self._log_histograms(model, step)

    def on_epoch_end(self, model: nn.Module, row: dict[str, Any]) -> None:
        step = int(row["step"])
        for key, value in row.items():
            if key not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(scalar_tag(key), value, step)
        self._log_filters(model, step)
        self.writer.flush()

    def on_train_end(self, model: nn.Module, history: list[dict[str, Any]]) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # --- records --------------------------------------------------------------------

    def image_grid(self, images: torch.Tensor) -> torch.Tensor:
        """The batch as one 3 x H x W image in 0..1, normalisation undone so colours look right."""
        from torchvision.utils import make_grid

        batch = images[:MAX_IMAGES].detach().float().cpu()
        if self.mean is not None and self.std is not None:
            channels = batch.shape[1]
            mean = torch.tensor(list(self.mean)[:channels]).view(1, -1, 1, 1)
            std = torch.tensor(list(self.std)[:channels]).view(1, -1, 1, 1)
            batch = batch * std + mean
        return make_grid(batch.clamp(0, 1), nrow=8, padding=2, pad_value=1.0)

    def _log_histograms(self, model: nn.Module, step: int) -> None:
        for name, param in model.named_parameters():
            self._histogram(f"weights/{name}", param, step)
            if param.grad is not None:
                self._histogram(f"grads/{name}", param.grad, step)

    def _histogram(self, tag: str, tensor: torch.Tensor, step: int) -> None:
        """Histogram of the finite values: a diverging run (NaN weights) keeps training and logging."""
        values = tensor.detach().float().cpu().flatten()
        values = values[torch.isfinite(values)]
        if values.numel():
            self.writer.add_histogram(tag, values, step)

    def _log_graph(self, model: nn.Module, images: torch.Tensor) -> None:
        """Trace the model on one image; a model that cannot be traced costs the graph, not the run."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's deprecation and shape notices are not the user's to act on
                self.writer.add_graph(model, images[:1].detach())
        except Exception as exc:  # tracing fails in many ways (data-dependent control flow, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self.notify(f"TensorBoard graph skipped: the model could not be traced ({type(exc).__name__}: {first[:200]}).")
        finally:
            model.train(was_training)

    def _log_filters(self, model: nn.Module, step: int) -> None:
        """The first convolution's filters as an image, when the model has a conv ``filters_layer``."""
        grid = conv_filter_grid(model, self.filters_layer) if self.filters_layer else None
        if grid is not None:
            self.writer.add_image(f"filters/{self.filters_layer}", grid, step, dataformats="HWC")


def conv_filter_grid(model: nn.Module, layer: str, min_size: int = 256) -> Any:
    """The filter grid of ``layer`` as an H x W x 3 uint8 array, or None when there is no such conv.

    Every grid pixel is repeated into a square block so the grid is at least ``min_size``
    pixels wide: TensorBoard shows an image at its own size, and 32 filters of 5x5 make
    a grid of 37 pixels.
    """
    from tltk.errors import TltkError
    from tltk.viz.filters import MAX_FILTERS, filter_grid, find_conv

    try:
        _, conv = find_conv(model, layer)  # type: ignore[arg-type]
    except (TltkError, AttributeError):
        return None
    grid = filter_grid(conv.weight.detach()[:MAX_FILTERS, :3])
    factor = max(1, -(-min_size // max(grid.shape[:2])))
    return grid.repeat(factor, axis=0).repeat(factor, axis=1)


def clear_events(log_dir: Path) -> None:
    """Remove event files of an earlier run in the same run directory.

    ``--overwrite`` replaces a run; left behind, the old events would be drawn as a
    second curve over the new one.
    """
    if log_dir.is_dir():
        for old in log_dir.glob("events.out.tfevents.*"):
            old.unlink()


class FilterSnapshotCallback(Callback):
    """Saves the filter grid of ``layer`` as ``out_dir/epoch_NNN.png`` before training and every N epochs."""

    def __init__(self, out_dir: str | Path, every_epochs: int, layer: str = "conv1", title: str = "") -> None:
        if every_epochs < 1:
            from tltk.errors import TltkError

            raise TltkError(f"--every must be at least 1 epoch, not {every_epochs}.")
        self.out_dir = Path(out_dir)
        self.every_epochs = every_epochs
        self.layer = layer
        self.title = title

    def on_train_start(self, model: nn.Module, total_steps: int) -> None:
        if self.out_dir.is_dir():
            for old in self.out_dir.glob("epoch_*.png"):
                old.unlink()
        self._save(model, 0)

    def on_epoch_end(self, model: nn.Module, row: dict[str, Any]) -> None:
        epoch = int(row["epoch"])
        if epoch % self.every_epochs == 0:
            self._save(model, epoch)

    def _save(self, model: nn.Module, epoch: int) -> None:
        from tltk.viz.filters import write_filters

        label = f"epoch {epoch}" + (f", {self.title}" if self.title else "")
        write_filters(model, self.out_dir / f"epoch_{epoch:03d}.png", self.layer, label)  # type: ignore[arg-type]


def watch_callbacks(
    out: Path,
    model: nn.Module,
    *,
    tensorboard: bool,
    histogram_every: int,
    filters_every: int | None,
    preprocessing: Preprocessing,
    notify: Callable[[str], None] = warn,
) -> list[Callback]:
    """The callbacks ``tltk finetune --tensorboard / --every N`` asks for, writing into run ``out``.

    Built before the run directory is touched: a model without a conv1 to snapshot is
    an error now, not after the run's config has been written.
    """
    from tltk.errors import TltkError

    if filters_every is not None:
        from tltk.viz.filters import find_conv  # matplotlib comes with it: only when snapshots are asked for

        if filters_every < 1:
            raise TltkError(f"--every must be at least 1 epoch, not {filters_every}.")
        try:
            find_conv(model, "conv1")  # type: ignore[arg-type]
        except TltkError:
            name = getattr(getattr(model, "backbone", None), "name", type(model).__name__)
            raise TltkError(f"--every saves the conv1 filters, but {name} has no convolution named conv1; drop --every.") from None
    callbacks: list[Callback] = []
    if tensorboard:
        callbacks.append(TensorBoardCallback(
            out / TENSORBOARD_DIR, histogram_every, mean=list(preprocessing.mean), std=list(preprocessing.std),
            notify=notify,
        ))
    if filters_every is not None:
        callbacks.append(FilterSnapshotCallback(out / "plots" / "filters", filters_every, title=out.name))
    return callbacks
