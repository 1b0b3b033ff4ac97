"""The learning-rate finder: a short run whose learning rate grows exponentially, step by
step, from a rate too small to change anything to one that makes the loss blow up; the
rate where the loss fell fastest is a good one to train with (L. N. Smith, "Cyclical
learning rates for training neural networks", 2017).

What it records per step is the loss of that step's batch; the curve it judges is an
exponentially smoothed, bias-corrected average of them, since single batches are too
noisy to compare. The ramp stops early once the smoothed loss exceeds ``diverge_factor``
times the lowest seen (or is not finite): the rates beyond are of no use.

**The rule.** The suggestion is a tenth of the rate at which the smoothed loss is lowest
("minimum / 10", the rule fastai suggested for years). The minimum itself is where the
loss stops falling, too high to train with; a tenfold lower rate lies inside the range
where the loss falls, yet high enough to train quickly. The rule reads the curve at its
most stable point, the minimum, rather than at its steepest slope, which one noisy batch
can move by a decade.

The model and optimizer it is given are left exactly as they were: the finder trains deep
copies of them, and puts the random generators training draws from (torch's, CUDA's,
NumPy's, Python's) back as they were, so a run trains the same whether it was preceded
by the finder or not.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from tltk import distributed
from tltk.errors import TltkError
from tltk.fileio import atomic_write, write_json
from tltk.runtime import (
    autocast,
    batch_to,
    default_workers,
    make_loader,
    memory_format,
    resolve_device,
    resolve_precision,
    use_channels_last,
)
from tltk.strategies import Strategy
from tltk.train.config import LrFinderSettings, TrainConfig
from tltk.train.losses import build_loss
from tltk.train.optimization import build_optimizer
from tltk.train.trainer import deterministic_algorithms

SUGGESTION_DIVISOR = 10.0
RULE = "a tenth of the learning rate at the lowest smoothed loss (minimum / 10)"
FINDING_FILE = "lr_find.json"
PLOT_FILE = "lr_find.png"


@dataclass
class LrFinding:
    """What the finder measured and what it suggests: per step the rate, the batch's loss
    and the smoothed loss; the suggested rate, the rule that chose it, and whether the ramp
    stopped early because the loss diverged."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggested_lr: float
    suggested_step: int
    rule: str
    diverged: bool
    settings: LrFinderSettings = field(default_factory=LrFinderSettings)

    @property
    def steps_run(self) -> int:
        return len(self.lrs)

    def summary(self) -> dict[str, Any]:
        """The finding without its curve: what config.json records for ``--lr find``."""
        return {"suggested_lr": self.suggested_lr, "rule": self.rule, "steps_run": self.steps_run,
                "diverged": self.diverged, "min_smoothed_loss_lr": self.lrs[int(np.argmin(self.smoothed))],
                "settings": asdict(self.settings)}

    def to_dict(self) -> dict[str, Any]:
        return self.summary() | {"suggested_step": self.suggested_step, "lrs": self.lrs, "losses": self.losses,
                                 "smoothed": self.smoothed}


def find_lr(
    model: nn.Module,
    train_set: torch.utils.data.Dataset,
    config: TrainConfig,
    *,
    strategy: Strategy | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: nn.Module | None = None,
    settings: LrFinderSettings | None = None,
) -> LrFinding:
    """Ramp the learning rate over copies of ``model`` (and ``optimizer``) on batches of
    ``train_set`` and suggest a rate; ``model``, ``optimizer`` and the random generators
    are as they were afterwards.

    Without an ``optimizer`` one is built as training builds it (``config.optimizer``,
    momentum, weight decay), with ``strategy``'s parameter groups (every trainable
    parameter in one group without a strategy). Every group moves with the ramp, keeping
    its rate relative to the last group's (the head's, whose rate ``--lr`` sets), so the
    suggestion is a value for ``--lr``. The device, precision, memory layout, batch size,
    workers, gradient clipping and seed are ``config``'s; ``settings`` the ramp's (default
    ``LrFinderSettings()``).
    """
    settings = settings or LrFinderSettings()
    settings.check()
    if len(train_set) == 0:  # type: ignore[arg-type]
        raise TltkError("the learning-rate finder needs training images, and the training split is empty.")
    with preserved_random_state():
        return _find(model, train_set, config, strategy, optimizer, loss_fn, settings)


def _find(model: nn.Module, train_set: torch.utils.data.Dataset, config: TrainConfig, strategy: Strategy | None,
          optimizer: torch.optim.Optimizer | None, loss_fn: nn.Module | None,
          settings: LrFinderSettings) -> LrFinding:
    device = resolve_device(config.device)
    amp_dtype = resolve_precision(config.precision, device)
    model_copy, optimizer_copy = copy.deepcopy((model, optimizer))
    model_copy.to(device)
    if optimizer_copy is None:
        optimizer_copy = _fresh_optimizer(model_copy, config, strategy)
    else:
        _move_state(optimizer_copy, device)
    ratios = _relative_rates(optimizer_copy)
    loss_fn = (loss_fn or build_loss(config.task)).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    channels_last = use_channels_last(config.channels_last, model_copy)
    workers = config.workers if config.workers is not None else default_workers(len(train_set))  # type: ignore[arg-type]
    torch.manual_seed(config.seed)  # dropout masks: the same ramp for the same seed
    loader = make_loader(train_set, batch_size=config.batch_size, shuffle=True, workers=workers, device=device,
                         seed=config.seed)
    ramp = Ramp(settings)
    with deterministic_algorithms(), memory_format(model_copy, channels_last):
        model_copy.train()
        for step, (images, targets) in enumerate(_cycled(loader)):
            if step >= settings.steps:
                break
            lr = settings.rate(step)
            for group, ratio in zip(optimizer_copy.param_groups, ratios):
                group["lr"] = lr * ratio
            batch = batch_to(images, device, channels_last), targets.to(device, non_blocking=True)
            loss = _train_step(model_copy, optimizer_copy, scaler, loss_fn, batch, amp_dtype, config.clip_grad)
            if ramp.record(lr, loss):
                break
    return ramp.finding()


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss_fn: nn.Module,
                batch: tuple[torch.Tensor, torch.Tensor], amp_dtype: torch.dtype | None,
                clip_grad: float | None) -> float:
    """One optimizer step as the training loop takes it (autocast, loss scaling, clipping); its loss."""
    images, targets = batch
    with autocast(images.device, amp_dtype):
        loss = loss_fn(model(images).float(), targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())


def _fresh_optimizer(model: nn.Module, config: TrainConfig, strategy: Strategy | None) -> torch.optim.Optimizer:
    """The optimizer training would build, with rates relative to a base of 1 (the ramp sets them)."""
    if strategy is not None:
        strategy.prepare(model)  # type: ignore[arg-type]
        groups = [g for g in strategy.param_groups(model, 1.0) if g["params"]]  # type: ignore[arg-type]
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1.0, "name": "all"}]
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise TltkError("nothing in the model trains (every parameter is frozen), so there is no learning rate "
                        "to find; check --strategy.")
    return build_optimizer(groups, replace(config, lr=1.0))


def _relative_rates(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each group's rate as a multiple of the last group's (the head's)."""
    reference = float(optimizer.param_groups[-1]["lr"])
    if reference <= 0:
        raise TltkError("the optimizer's last parameter group has a learning rate of 0; the finder ramps the rates "
                        "relative to it, so give it a positive one.")
    return [float(g["lr"]) / reference for g in optimizer.param_groups]


def _move_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """An optimizer's per-parameter state (moments, step counts) beside its parameters."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                state[key] = value.to(device)


def _cycled(loader: torch.utils.data.DataLoader) -> Iterator[Any]:
    """Batches for as long as asked: epoch after epoch of the loader, each in a new order."""
    for epoch in itertools.count():
        sampler = loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader


class Ramp:
    """The losses of the ramp so far, smoothed, and when to stop."""

    def __init__(self, settings: LrFinderSettings) -> None:
        self.settings = settings
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.average = 0.0
        self.diverged = False

    def record(self, lr: float, loss: float) -> bool:
        """Add a step; True when the ramp should stop (the loss diverged)."""
        beta = self.settings.smoothing
        self.lrs.append(lr)
        self.losses.append(loss)
        if not math.isfinite(loss):
            self.diverged = True
            self.smoothed.append(math.inf)
            return True
        self.average = beta * self.average + (1 - beta) * loss
        smoothed = self.average / (1 - beta ** len(self.losses))  # bias-corrected: the first steps are not pulled to 0
        self.smoothed.append(smoothed)
        if smoothed > self.settings.diverge_factor * min(self.smoothed):
            self.diverged = True
        return self.diverged

    def finding(self) -> LrFinding:
        suggested, step = suggest(self.lrs, self.smoothed)
        return LrFinding(self.lrs, self.losses, self.smoothed, suggested, step, RULE, self.diverged, self.settings)


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float, int]:
    """The suggested rate (a tenth of the rate at the lowest smoothed loss) and the step of
    the ramp nearest to it; refused when the lowest loss lies within the ramp's first tenfold
    rise, where the loss never fell."""
    finite = [s if math.isfinite(s) else math.inf for s in smoothed]
    lowest = int(np.argmin(finite))
    suggested = lrs[lowest] / SUGGESTION_DIVISOR
    if suggested < lrs[0]:
        raise TltkError(f"the loss did not fall over the learning-rate ramp (lowest after {lowest + 1} of "
                        f"{len(lrs)} steps, at {lrs[lowest]:.3g}); start the ramp lower (--start-lr), or check the "
                        f"data and the model.")
    step = int(np.argmin(np.abs(np.log(np.asarray(lrs[:lowest + 1])) - math.log(suggested))))
    return suggested, step


@contextmanager
def preserved_random_state() -> Iterator[None]:
    """The random generators training draws from, put back as they were: torch's (and every
    CUDA device's, where CUDA is up), NumPy's and Python's."""
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


# --- saving -------------------------------------------------------------------------------


def save_finding(finding: LrFinding, out_dir: str | Path, plot_dir: str | Path | None = None) -> tuple[Path, Path]:
    """lr_find.json (the curve, the suggestion and its rule) in ``out_dir`` and lr_find.png in
    ``plot_dir`` (default: ``out_dir``)."""
    json_path, plot_path = finding_files(out_dir, plot_dir)
    write_json(json_path, finding.to_dict())
    write_plot(finding, plot_path)
    return json_path, plot_path


def finding_files(out_dir: str | Path, plot_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Where ``save_finding`` writes lr_find.json and lr_find.png."""
    out_dir = Path(out_dir).expanduser()
    return out_dir / FINDING_FILE, (Path(plot_dir).expanduser() if plot_dir is not None else out_dir) / PLOT_FILE


def write_plot(finding: LrFinding, path: Path) -> Path:
    """The batch losses and the smoothed loss against the rate (log scale), the suggestion marked.

    matplotlib is imported here, not with the module: training imports the finder, and a
    run that never plots should not pay for it."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    ax = figure.add_subplot()
    lrs, losses, smoothed = np.asarray(finding.lrs), np.asarray(finding.losses), np.asarray(finding.smoothed)
    shown = np.isfinite(losses) & np.isfinite(smoothed)
    ax.plot(lrs[shown], losses[shown], color="0.75", linewidth=1, label="batch loss")
    ax.plot(lrs[shown], smoothed[shown], color="C0", linewidth=2, label="smoothed loss")
    ax.axvline(finding.suggested_lr, color="C3", linestyle="--",
               label=f"suggested lr {finding.suggested_lr:.3g}")
    ax.plot([finding.suggested_lr], [finding.smoothed[finding.suggested_step]], "o", color="C3")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    falling = shown & (np.arange(len(lrs)) <= int(np.argmin(np.where(shown, smoothed, np.inf))))
    if falling.any():  # keep the divergence from squashing the part of the curve that matters
        low = float(min(smoothed[falling].min(), losses[falling].min()))
        high = float(max(smoothed[falling].max(), np.median(losses[falling])))
        margin = 0.1 * (high - low) + 1e-6
        ax.set_ylim(low - margin, high + 3 * margin)
    ax.set_title("learning-rate finder" + (" (stopped: the loss diverged)" if finding.diverged else ""))
    ax.legend(loc="upper left")
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    return path


def check_single_process(context: distributed.DistContext) -> None:
    """The finder runs in one process: ranks that each found their own rate would train apart."""
    if context.active:
        raise TltkError("--lr find runs in a single process; run `tltk lr-find` first and give its suggestion as "
                        "--lr to the data-parallel job.")
