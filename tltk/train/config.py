"""How a model trains: every training setting with its default, its choices and its help,
stated once. ``tltk finetune``'s options are derived from these fields, and this module
imports no torch, so the command line starts without it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

from tltk.errors import SettingError
from tltk.settings import AUGMENT_PRESETS, CHANNELS_LAST, PRECISIONS, TASKS, setting

if TYPE_CHECKING:
    from tltk.runtime import Inference

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "step", "exp", "cosine")
MONITORS = ("auto", "val_accuracy", "val_map", "val_loss")
FIND_LR = "find"  # --lr find: the learning-rate finder chooses the rate before training


def parse_lr(text: str) -> float | str:
    """``--lr``'s value: a positive number, or ``find`` for the learning-rate finder."""
    if isinstance(text, str) and text.strip().lower() == FIND_LR:
        return FIND_LR
    try:
        lr = float(text)
    except (TypeError, ValueError):
        raise SettingError(f"lr '{text}' is neither a number nor 'find'; give a rate such as 1e-3, or find to "
                           f"let the learning-rate finder choose it.", ["lr"]) from None
    check_lr(lr)
    return lr


def check_lr(lr: float | str) -> None:
    """A learning rate training can take: positive and finite (torch would train with NaN or
    infinity without a word), or ``find``."""
    if lr == FIND_LR:
        return
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise SettingError(f"lr '{lr}' is neither a number nor 'find'; give a rate such as 1e-3.", ["lr"])
    if not math.isfinite(lr) or lr <= 0:
        raise SettingError(f"lr must be a positive finite number, not {lr}; give a rate such as 1e-3, or find.",
                           ["lr"])


@dataclass
class TrainConfig:
    """How a model trains. Each setting's default, choices and help live here, and
    ``tltk finetune``'s options are derived from them."""

    epochs: int = setting(10, "Epochs to train.")
    max_steps: int | None = setting(None, "Stop after this many optimizer steps.")
    batch_size: int = setting(64, "Images per step (per process under torchrun).")
    optimizer: str = setting("adamw", "The optimizer.", choices=OPTIMIZERS)
    lr: float | str = setting(1e-3, "Learning rate (the head's, where a strategy sets others); find: run the "
                                    "learning-rate finder first and train with its suggestion (see `tltk lr-find`).",
                              parse=parse_lr)
    momentum: float = setting(0.9, "SGD momentum (Adam's beta1).")
    nesterov: bool = setting(False, "Nesterov momentum (SGD).")
    weight_decay: float = setting(1e-4, "Weight decay.")
    schedule: str = setting("cosine", "Learning-rate schedule.", choices=SCHEDULES)
    warmup_steps: int = setting(0, "Steps of linear warm-up.")
    step_epochs: int = setting(10, "Epochs between decays of the step schedule.")
    gamma: float = setting(0.1, "Decay factor of the step and exp schedules.")
    patience: int | None = setting(None, "Early stopping: epochs without improvement of --monitor.")
    monitor: str = setting("auto", "auto: val_map for multi-label, val_accuracy for multi-class.", choices=MONITORS)
    task: str = "multiclass"  # what finetune resolved --task to (from the data)
    seed: int = setting(0, "Seed of the split, the initial weights and the data order.")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N.")
    precision: str = setting("auto", "auto: bf16 where the CPU or GPU computes it natively, else fp32.",
                             choices=PRECISIONS)
    workers: int | None = setting(None, "DataLoader workers; default: none for decoded images, else half the free "
                                        "cores once the data is large enough.")
    threads: int | None = setting(None, "torch intra-op threads; default: the cores that neither other processes "
                                        "nor the loader's workers keep busy when training starts.")
    augment: str = setting("none", "Training augmentation.", choices=AUGMENT_PRESETS)
    clip_grad: float | None = setting(None, "Clip the gradient norm to this value.")
    cache: bool = setting(True, "Frozen backbone and no augmentation: compute its features once and train the head "
                                "on them.", flag="--cache/--no-cache")
    cache_mem: str = setting("auto", "Cached features up to this size stay in memory (e.g. 2GB, 0), beyond it they "
                                     "are memory-mapped on disk; auto: a quarter of the free memory.")
    image_cache: bool = setting(True, "Decode the training images once (kept under the user's cache folder for "
                                      "later runs; in memory up to --cache-mem, else memory-mapped) and augment "
                                      "them in batches in the training process.",
                                flag="--image-cache/--no-image-cache")
    channels_last: str = setting("auto", "Channels-last memory layout; auto: for backbones with 2-D convolutions.",
                                 choices=CHANNELS_LAST)
    compile: bool = setting(False, "torch.compile the network (slower start, faster steps).")

    def validate(self) -> None:
        self.validate_settings()
        _one_of("task", self.task, TASKS)
        if self.monitor == "val_map" and self.task != "multilabel":
            raise SettingError("monitor val_map needs a multi-label task; use val_accuracy or val_loss.", ["monitor"])

    def validate_settings(self) -> None:
        """Every check but those that need the task, which ``finetune`` learns from the data:
        a wrong setting is told before the data is read."""
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("schedule", self.schedule, SCHEDULES)
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("channels_last", self.channels_last, CHANNELS_LAST)
        parse_size(self.cache_mem)
        _one_of("monitor", self.monitor, MONITORS)
        if self.epochs < 1 and not self.max_steps:
            raise SettingError(f"epochs must be at least 1, not {self.epochs}.", ["epochs"])
        check_batch_size(self.batch_size)
        check_lr(self.lr)
        if self.workers is not None and self.workers < 0:
            raise SettingError(f"workers must be 0 or more, not {self.workers}.", ["workers"])
        if self.threads is not None and self.threads < 1:
            raise SettingError(f"threads must be at least 1, not {self.threads}; leave it out to choose from the "
                               f"free cores.", ["threads"])
        self._validate_optimizer_and_schedule()

    def _validate_optimizer_and_schedule(self) -> None:
        """Values torch would take without complaint and train wrongly with (a negative
        clip_grad flips every gradient; patience 0 stops after the first epoch), or refuse
        with a traceback (negative weight decay, Nesterov without momentum)."""
        if not 0 <= self.momentum < 1:
            raise SettingError(f"momentum must be in [0, 1), not {self.momentum}.", ["momentum"])
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise SettingError("nesterov needs optimizer sgd and a momentum above 0.", ["nesterov", "optimizer", "momentum"])
        at_least = {"weight_decay": 0, "warmup_steps": 0, "step_epochs": 1}
        for name, least in at_least.items():
            if getattr(self, name) < least:
                wording = "0 or more" if least == 0 else "at least 1"
                raise SettingError(f"{name} must be {wording}, not {getattr(self, name)}.", [name])
        if self.gamma <= 0:
            raise SettingError(f"gamma must be positive, not {self.gamma}.", ["gamma"])
        if self.max_steps is not None and self.max_steps < 1:
            raise SettingError(f"max_steps must be at least 1, not {self.max_steps}; leave it out to train epochs.",
                               ["max_steps", "epochs"])
        if self.patience is not None and self.patience < 1:
            raise SettingError(f"patience must be at least 1, not {self.patience}; leave it out to train every epoch.",
                               ["patience"])
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise SettingError(f"clip_grad must be positive, not {self.clip_grad}; leave it out not to clip.",
                               ["clip_grad"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def inference(self) -> Inference:
        from tltk.runtime import Inference

        """Evaluation during and after training runs the model as training did."""
        return Inference(device=self.device, precision=self.precision, channels_last=self.channels_last,
                         batch_size=self.batch_size, workers=self.workers)

    @property
    def monitored(self) -> str:
        """The validation figure early stopping and best-epoch selection follow."""
        if self.monitor != "auto":
            return self.monitor
        return "val_map" if self.task == "multilabel" else "val_accuracy"


@dataclass(frozen=True)
class LrFinderSettings:
    """The ramp: ``steps`` rates from ``start_lr`` to ``end_lr``, evenly spaced on a log
    scale; the loss is smoothed with weight ``smoothing`` on the past, and the ramp stops
    once the smoothed loss exceeds ``diverge_factor`` times its lowest value."""

    start_lr: float = setting(1e-7, "Learning rate of the first step.")
    end_lr: float = setting(10.0, "Learning rate of the last step.")
    steps: int = setting(100, "Steps of the ramp (at most: it stops once the loss diverges).")
    smoothing: float = setting(0.9, "Weight of the past in the exponentially smoothed loss.")
    diverge_factor: float = setting(4.0, "Stop once the smoothed loss exceeds this many times its lowest value.")

    def check(self) -> None:
        for name in ("start_lr", "end_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise SettingError(f"{name} must be a positive number, not {value}.", [name])
        if self.end_lr <= self.start_lr:
            raise SettingError(f"end_lr ({self.end_lr}) must be above start_lr ({self.start_lr}); the finder ramps "
                               f"the rate up.", ["end_lr", "start_lr"])
        if self.steps < 5:
            raise SettingError(f"steps must be at least 5 for a curve to judge, not {self.steps}.", ["steps"])
        if not 0 <= self.smoothing < 1:
            raise SettingError(f"smoothing must be in [0, 1), not {self.smoothing}.", ["smoothing"])
        if not self.diverge_factor > 1:
            raise SettingError(f"diverge_factor must be above 1, not {self.diverge_factor}.", ["diverge_factor"])

    def rate(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based) of the ramp."""
        return self.start_lr * (self.end_lr / self.start_lr) ** (step / (self.steps - 1))


def _one_of(setting: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise SettingError(f"{setting} '{value}' is not one of {', '.join(choices)}.", [setting])


def parse_size(text: str) -> int | None:
    from tltk.train.cache import parse_size as parse  # torch is loaded by training anyway

    return parse(text)


def check_batch_size(batch_size: int) -> None:
    from tltk.runtime import check_batch_size as check

    check(batch_size)
