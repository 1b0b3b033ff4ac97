"""The training loop: optimizer, schedule, mixed precision, validation, early stopping.

Readable top to bottom like a reference training script. ``fit`` trains a model in
place and leaves it holding the weights of its best validation epoch (or the last
epoch when there is no validation split); every step and epoch goes to a ``MetricsLog``.
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, ContextManager, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from tltk.errors import TltkError
from tltk.model import TransferModel
from tltk.strategies import Strategy
from tltk.train.callbacks import Callback
from tltk.train.losses import TASKS, build_loss
from tltk.train.metrics import multilabel_report
from tltk.train.rundir import MetricsLog

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "step", "exp", "cosine")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MONITORS = ("auto", "val_accuracy", "val_map", "val_loss")


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    step_epochs: int = 10
    gamma: float = 0.1
    patience: int | None = None
    monitor: str = "auto"
    task: str = "multiclass"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    augment: str = "none"
    clip_grad: float | None = None

    def validate(self) -> None:
        _one_of("--optimizer", self.optimizer, OPTIMIZERS)
        _one_of("--schedule", self.schedule, SCHEDULES)
        _one_of("--precision", self.precision, PRECISIONS)
        _one_of("--monitor", self.monitor, MONITORS)
        _one_of("--task", self.task, TASKS)
        if self.monitor == "val_map" and self.task != "multilabel":
            raise TltkError("--monitor val_map needs a multi-label task; use val_accuracy or val_loss.")
        if self.epochs < 1 and not self.max_steps:
            raise TltkError(f"--epochs must be at least 1, not {self.epochs}.")
        if self.batch_size < 1:
            raise TltkError(f"--batch-size must be at least 1, not {self.batch_size}.")
        if self.lr <= 0:
            raise TltkError(f"--lr must be positive, not {self.lr}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def monitored(self) -> str:
        """The validation figure early stopping and best-epoch selection follow."""
        if self.monitor != "auto":
            return self.monitor
        return "val_map" if self.task == "multilabel" else "val_accuracy"


def _one_of(option: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise TltkError(f"{option} '{value}' is not one of {', '.join(choices)}.")


class Reporter(Protocol):
    """What the loop tells whoever is watching (the CLI's progress bar, or nobody)."""

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


@dataclass
class FitResult:
    epochs_run: int
    steps: int
    best_epoch: int | None
    best_metric: float | None
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


# --- set-up ---------------------------------------------------------------------------


def seed_everything(seed: int) -> torch.Generator:
    """Seed every generator training touches; the returned one orders the data."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TltkError(f"--device {name} was asked for but no CUDA device is available; use --device cpu.")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise TltkError(f"--device '{name}' is not one of auto, cpu, cuda.")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32. ``auto`` is bf16/fp16 on CUDA, fp32 on CPU."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise TltkError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU.")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager[Any]:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def default_workers(num_samples: int) -> int:
    """Worker processes pay off once there is enough data to hide their start-up."""
    if num_samples < 2048:
        return 0
    return max(1, min(8, (os.cpu_count() or 2)))


def make_loader(
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    workers: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=generator,
        worker_init_fn=_WorkerSeeder(seed) if workers > 0 else None,
    )


class _WorkerSeeder:
    """Each worker's random modules get a seed derived from the run's (picklable for workers)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, worker_id: int) -> None:
        worker_seed = (self.seed * 1000 + worker_id) % 2**32
        random.seed(worker_seed)
        np.random.seed(worker_seed)


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
) -> FitResult:
    config.validate()
    reporter = reporter or SilentReporter()
    generator = seed_everything(config.seed)
    device = resolve_device(config.device)
    amp_dtype = resolve_precision(config.precision, device)
    workers = config.workers if config.workers is not None else default_workers(len(train_set))

    model.to(device)
    strategy.prepare(model)
    groups = [g for g in strategy.param_groups(model, config.lr) if g["params"]]
    optimizer = build_optimizer(groups, config)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    train_loader = make_loader(
        train_set, batch_size=config.batch_size, shuffle=True, workers=workers, device=device,
        generator=generator, seed=config.seed,
    )
    val_loader = (
        make_loader(val_set, batch_size=config.batch_size, shuffle=False, workers=workers, device=device)
        if val_set is not None and len(val_set) > 0
        else None
    )
    steps_per_epoch = len(train_loader)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config, steps_per_epoch, total_steps)
    )
    loss_fn = (loss_fn or build_loss(config.task)).to(device)
    stopper = EarlyStopping(config.monitored, config.patience)
    result = FitResult(0, 0, None, None, False)
    started = time.perf_counter()
    reporter.start(total_steps)
    for callback in callbacks:
        callback.on_train_start(model, total_steps)

    step = 0
    for epoch in range(epochs):
        change = strategy.on_epoch_start(model, epoch)
        if change:
            reporter.message(change)
        epoch_started = time.perf_counter()
        train_loss, train_acc, step = _train_epoch(
            model, train_loader, optimizer, scheduler, scaler, loss_fn, device, amp_dtype, config,
            epoch, step, total_steps, log, reporter, callbacks,
        )
        row: dict[str, Any] = {"kind": "epoch", "epoch": epoch + 1, "step": step, "train_loss": train_loss}
        if train_acc is not None:
            row["train_accuracy"] = train_acc
        row["lr"] = optimizer.param_groups[-1]["lr"]
        if val_loader is not None:
            row.update(validation_metrics(model, val_loader, device, amp_dtype, loss_fn, config.task))
        row["seconds"] = round(time.perf_counter() - epoch_started, 3)
        result.history.append(row)
        if log is not None:
            log.write(row)
            log.flush()
        reporter.epoch(row)
        for callback in callbacks:
            callback.on_epoch_end(model, row)
        result.epochs_run = epoch + 1
        if val_loader is not None and stopper.update(row, model):
            result.stopped_early = True
            reporter.message(
                f"early stopping after epoch {epoch + 1}: {config.monitored} did not improve for {config.patience} epochs"
            )
            break
        if step >= total_steps:
            break

    for callback in callbacks:
        callback.on_train_end(model, result.history)
    if stopper.best_state is not None:
        model.load_state_dict(stopper.best_state)
        result.best_epoch, result.best_metric = stopper.best_epoch, stopper.best_value
    result.steps = step
    result.seconds = round(time.perf_counter() - started, 3)
    reporter.finish()
    return result


def _train_epoch(
    model: TransferModel,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    loss_fn: nn.Module,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    config: TrainConfig,
    epoch: int,
    step: int,
    total_steps: int,
    log: MetricsLog | None,
    reporter: Reporter,
    callbacks: Sequence[Callback] = (),
) -> tuple[float, float | None, int]:
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images)
            loss = loss_fn(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[-1]["lr"]
        scheduler.step()
        step += 1
        batch = len(targets)
        loss_value = float(loss.detach())
        loss_sum += loss_value * batch
        if config.task == "multiclass":
            correct += int((logits.detach().argmax(1) == targets).sum())
        seen += batch
        row = {"kind": "step", "step": step, "epoch": epoch + 1, "loss": loss_value, "lr": lr}
        if log is not None:
            log.write(row)
        reporter.step(row)
        for callback in callbacks:
            callback.on_step_end(model, row, images)
        if step >= total_steps:
            break
    accuracy = correct / max(seen, 1) if config.task == "multiclass" else None
    return loss_sum / max(seen, 1), accuracy, step


@dataclass
class EarlyStopping:
    """Tracks the best validation epoch, keeps its weights, and says when to stop."""

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


# --- inference ------------------------------------------------------------------------


def iterate_logits(
    model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, targets) per batch, in loader order, on the CPU in fp32."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for images, targets in loader:
                with autocast(device, amp_dtype):
                    logits = model(images.to(device, non_blocking=True))
                yield logits.float().cpu(), targets
    finally:
        model.train(was_training)


def predict_logits(
    model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    parts = list(iterate_logits(model, loader, device, amp_dtype))
    if not parts:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def validation_metrics(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    loss_fn: nn.Module,
    task: str,
) -> dict[str, float]:
    """val_loss plus val_accuracy (multi-class) or val_map and val_map_voc07 (multi-label)."""
    logits, targets = predict_logits(model, loader, device, amp_dtype)
    loss = float(loss_fn.cpu()(logits, targets))
    loss_fn.to(device)
    if task == "multilabel":
        report = multilabel_report(targets.numpy(), torch.sigmoid(logits).numpy(), [""] * logits.shape[1])
        return {"val_loss": loss, "val_map": report["map"], "val_map_voc07": report["map_voc07"]}
    return {"val_loss": loss, "val_accuracy": float((logits.argmax(1) == targets).float().mean())}
