"""``tltk finetune`` as a function: data, model and strategy in, a run directory out.

Everything the user gave is checked (data readable, names known, weights loadable)
before the run directory is touched, so bad input leaves nothing half-written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tltk.data import DataSplits, ImageDataset, build_transforms, load_data
from tltk.errors import DataError
from tltk.model import ModelSpec, TransferModel, build_model, resolve_weights_choice
from tltk.strategies import Strategy, build_strategy
from tltk.train import rundir
from tltk.train.callbacks import Callback
from tltk.train.evaluate import evaluate_model
from tltk.train.trainer import FitResult, Reporter, TrainConfig, fit, seed_everything


@dataclass
class DataOptions:
    """How a ``--data`` spec becomes train/val/test: stored so evaluation sees the same split."""

    spec: str
    image_root: str | None = None
    val_split: float = 0.1
    test_split: float = 0.2
    seed: int = 0
    strict: bool = False
    classes: list[str] | None = None
    train_per_class: int | None = None

    def load(self) -> DataSplits:
        return load_data(
            self.spec, image_root=self.image_root, val_split=self.val_split, test_split=self.test_split,
            seed=self.seed, strict=self.strict, classes=self.classes, train_per_class=self.train_per_class,
        )


@dataclass
class FinetuneConfig:
    backbone: str
    data: DataOptions
    head: str = "linear"
    strategy: str = "finetune"
    weights: str = "auto"
    init: str = "default"
    head_options: dict[str, Any] = field(default_factory=dict)
    backbone_options: dict[str, Any] = field(default_factory=dict)
    strategy_options: dict[str, Any] = field(default_factory=dict)
    input_size: int | None = None
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class RunResult:
    out: Path
    summary: dict[str, Any]
    skipped: list[str]
    model: TransferModel


def finetune(
    config: FinetuneConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    callbacks: Sequence[Callback] = (),
) -> RunResult:
    out = Path(out).expanduser()
    config.train.validate()
    data = config.data.load()
    _check_trainable(data)
    spec = ModelSpec(
        config.backbone, config.head, data.num_classes, dict(config.head_options),
        resolve_weights_choice(config.backbone, config.weights), config.init, dict(config.backbone_options),
    )
    seed_everything(config.train.seed)  # the head's (and a scratch backbone's) initial weights
    model = build_model(spec)
    strategy = build_strategy(config.strategy, **config.strategy_options)
    preprocessing = _preprocessing(model, config.input_size)
    rundir.prepare_out_dir(out, overwrite)
    rundir.write_config(out, _config_record(config, spec, strategy, data, preprocessing, model))

    train_set, val_set = _datasets(data, preprocessing, config.train.augment)
    log = rundir.MetricsLog.open(out)
    try:
        fitted = fit(model, strategy, train_set, val_set, config.train, log=log, reporter=reporter, callbacks=callbacks)
    finally:
        log.close()
    rundir.save_weights(out, model)
    summary = _summary(model, data, preprocessing, fitted, config.train)
    rundir.write_summary(out, summary)
    return RunResult(out, summary, data.skipped, model)


def _check_trainable(data: DataSplits) -> None:
    if not data.train:
        raise DataError(f"{data.spec} has no training images; check the path or the --classes filter.")


def _preprocessing(model: TransferModel, input_size: int | None) -> dict[str, Any]:
    pre = model.preprocessing
    size = (input_size, input_size) if input_size else tuple(pre.input_size)
    return {"input_size": list(size), "mean": list(pre.mean), "std": list(pre.std)}


def _datasets(data: DataSplits, pre: dict[str, Any], augment: str) -> tuple[ImageDataset, ImageDataset | None]:
    size = tuple(pre["input_size"])
    train_tf = build_transforms(size, pre["mean"], pre["std"], augment, train=True)
    eval_tf = build_transforms(size, pre["mean"], pre["std"], "none", train=False)
    train_set = ImageDataset(data.train, train_tf, data.arrays)
    val_set = ImageDataset(data.val, eval_tf, data.arrays) if data.val else None
    return train_set, val_set


def _config_record(
    config: FinetuneConfig,
    spec: ModelSpec,
    strategy: Strategy,
    data: DataSplits,
    preprocessing: dict[str, Any],
    model: TransferModel,
) -> dict[str, Any]:
    return {
        "model": spec.to_dict(),
        "pretrained_source": model.backbone.pretrained_source,
        "strategy": strategy.describe(),
        "train": config.train.to_dict(),
        "data": asdict(config.data)
        | {
            "format": data.format,
            "fingerprint": data.fingerprint,
            "sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
            "skipped": len(data.skipped),
        },
        "class_names": list(data.class_names),
        "preprocessing": preprocessing,
        "versions": rundir.library_versions(),
    }


def _summary(
    model: TransferModel, data: DataSplits, pre: dict[str, Any], fitted: FitResult, train: TrainConfig
) -> dict[str, Any]:
    last = fitted.history[-1] if fitted.history else {}
    summary: dict[str, Any] = {
        "epochs_run": fitted.epochs_run,
        "steps": fitted.steps,
        "seconds": fitted.seconds,
        "stopped_early": fitted.stopped_early,
        "best_epoch": fitted.best_epoch,
        "best_" + train.monitor: fitted.best_metric,
        "final": {k: v for k, v in last.items() if k not in ("kind",)},
    }
    if data.test:
        report = evaluate_model(model, data.test, data.arrays, data.class_names, pre, train)
        summary["test"] = {k: report[k] for k in ("n", "accuracy", "top5_accuracy") if k in report}
    return summary
