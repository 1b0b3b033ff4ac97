"""``tltk finetune`` as a function: data, model and strategy in, a run directory out.

Everything the user gave is checked (data readable, names known, weights loadable)
before the run directory is touched, so bad input leaves nothing half-written.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch

from tltk import distributed, rundir
from tltk.backbones.base import Preprocessing, check_size_option
from tltk.data import DataSplits, ImageDataset
from tltk.data.options import DataOptions
from tltk.errors import DataError, RunDirError
from tltk.evaluation import evaluate_model
from tltk.heads import check_head_options
from tltk.layers import check_input_size
from tltk.locking import hold
from tltk.model import ModelSpec, TransferModel, build_model, resolve_weights_choice
from tltk.registry import provenance
from tltk.runtime import intra_op_threads, resolve_device
from tltk.strategies import Strategy, build_strategy
from tltk.train import checkpoint
from tltk.train.callbacks import Callback, build_callbacks
from tltk.train.config import FIND_LR, LrFinderSettings
from tltk.train.losses import TASKS, auto_pos_weight, build_loss
from tltk.train.lr_find import LrFinding, check_single_process, find_lr, save_finding
from tltk.train.tensorboard import warn, watch_callbacks
from tltk.train.resume import DEFAULT_CHECKPOINT_INTERVAL, Checkpointing, SavePolicy
from tltk.train.trainer import FitResult, Reporter, TrainConfig, fit, seed_everything
from tltk.viz.curves import PLOTS, write_curves


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
    task: str = "auto"
    pos_weight: str = "none"
    train: TrainConfig = field(default_factory=TrainConfig)
    tensorboard: bool = False  # event files in RUN/tensorboard
    histogram_every: int = 100  # steps between weight/gradient histograms
    filters_every: int | None = None  # epochs between conv1 filter snapshots in RUN/plots/filters
    # Draw RUN/plots/{loss,metrics,lr}.png when training ends. Drawing costs about a second
    # (matplotlib's import and three figures): a sweep of many small runs, or a script that reads
    # metrics.jsonl itself, turns it off; `tltk plot` and `tltk report` draw them later.
    curves: bool = True
    # Named callbacks (entry-point group tltk.callbacks): [{"name": ..., "options": {...}}], run on every process.
    callbacks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "FinetuneConfig":
        """The config ``to_dict`` wrote (into RUN/config.json, so that a run can be resumed)."""
        values = dict(record)
        values["data"] = DataOptions(**values["data"])
        values["train"] = TrainConfig(**values["train"])
        return cls(**values)


def check_components(config: FinetuneConfig) -> None:
    """Refuses a head or strategy option the component does not take, before any data is read:
    a sweep checks every run's components before the first one trains."""
    check_head_options(config.head, dict(config.head_options))
    build_strategy(config.strategy, **config.strategy_options)


@dataclass
class RunResult:
    out: Path
    summary: dict[str, Any]
    skipped: list[str]
    model: TransferModel
    is_main: bool = True  # False on the other ranks of a data-parallel job: they wrote nothing


def finetune(
    config: FinetuneConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    callbacks: Sequence[Callback] = (),
    resume: bool = False,
    checkpoint_every: int | None = None,
    checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL,
    wait: bool = False,
) -> RunResult:
    """Train and write the run directory ``out``. A checkpoint is saved there at the end of
    an epoch once ``checkpoint_interval`` seconds have passed since the last one (0: every
    epoch), every ``checkpoint_every`` steps, and on SIGINT/SIGTERM; ``resume`` continues
    from it, with ``config`` equal to the interrupted run's (``config_of_run`` reads it back).

    Launched by torchrun or srun with several processes, this is one rank of a data-parallel
    job (``config.train.batch_size`` per process); rank 0 alone writes ``out`` and reports.

    One command at a time writes a run directory: rank 0 holds ``out``'s lock from start to
    end, and another ``finetune`` into it (a new run or a ``resume``) is refused naming the
    process that holds it, or waits for it with ``wait``."""
    with distributed.session(resolve_device(config.train.device).type) as context:
        if not context.is_main:
            reporter, callbacks = None, ()
        saving = SavePolicy(checkpoint_every, checkpoint_interval)
        out = Path(out).expanduser()
        with hold(out, wait=wait, what="run directory") if context.is_main else nullcontext():
            return _finetune(config, out, overwrite, reporter, callbacks, resume, saving, context)


def _finetune(
    config: FinetuneConfig,
    out: Path,
    overwrite: bool,
    reporter: Reporter | None,
    callbacks: Sequence[Callback],
    resume: bool,
    saving: SavePolicy,
    context: distributed.DistContext,
) -> RunResult:
    main = context.is_main
    if resume:
        check_resumable(out)
    saving.check()
    config.train.validate_settings()
    absolute_paths = not resume or records_absolute_paths(out)
    config, data, loss_fn, spec, model, strategy, preprocessing = _prepare(config, absolute_paths)
    finding = None
    if config.train.lr == FIND_LR:  # resolved before anything is written: the record holds the rate trained with
        if main and not resume:
            rundir.check_out_dir(out, overwrite)  # told now rather than after the finder's steps
        finding = _find_lr(config, model, strategy, data, preprocessing, loss_fn, context)
        config = replace(config, train=replace(config.train, lr=finding.suggested_lr))
        if reporter is not None:
            reporter.message(f"learning-rate finder: lr {finding.suggested_lr:.3g} ({finding.rule})")
    callbacks = [*callbacks, *build_callbacks(config.callbacks)]
    if main:
        callbacks = [*callbacks, *watch_callbacks(
            out, model, tensorboard=config.tensorboard, histogram_every=config.histogram_every,
            filters_every=config.filters_every, preprocessing=preprocessing,
            notify=reporter.message if reporter else warn,
        )]
        _prepare_run_dir(out, resume, overwrite,
                         _config_record(config, spec, strategy, data, preprocessing, model, finding))
        if finding is not None:
            save_finding(finding, out, out / PLOTS)
    distributed.barrier(context)  # the run directory exists before any rank looks for a checkpoint in it

    train_set, val_set = _datasets(data, preprocessing, config.train.augment)
    # A run resumes with the number of processes it started with: the data order depends on it.
    fingerprinted = config.to_dict() | ({"processes": context.world_size} if context.active else {})
    # A run interrupted before its first checkpoint starts again from its beginning.
    checkpoints = Checkpointing(out, fingerprinted, saving, resume and checkpoint.has_checkpoint(out), context=context)
    log = rundir.MetricsLog.open(out) if main else None
    try:
        fitted = fit(model, strategy, train_set, val_set, config.train, log=log, reporter=reporter,
                     callbacks=callbacks, loss_fn=loss_fn, cache_dir=out, checkpoints=checkpoints, context=context)
    finally:
        if log is not None:
            log.close()
    with intra_op_threads(fitted.threads):  # the test split is evaluated on the threads training chose
        summary = _summary(model, data, preprocessing, fitted, config.train, context)
    if main:
        # Which modules training left frozen, whichever strategy froze them: a reloaded run is frozen alike.
        rundir.write_config(out, rundir.read_config(out) | {"frozen": model.frozen_modules()})
        rundir.save_weights(out, model)
        rundir.write_summary(out, summary)
        if config.curves:
            write_curves(out)
        checkpoint.remove_checkpoint(out)  # the run is complete; a checkpoint can be as large as the model twice over
    distributed.barrier(context)
    return RunResult(out, summary, data.skipped, model, main)


class Prepared(NamedTuple):
    """What training and the learning-rate finder start from."""

    config: FinetuneConfig  # resolved: the task from the data, data paths absolute where asked
    data: DataSplits
    loss_fn: torch.nn.Module
    spec: ModelSpec
    model: TransferModel
    strategy: Strategy
    preprocessing: Preprocessing


def _prepare(config: FinetuneConfig, absolute_paths: bool = True) -> Prepared:
    """Data read, task resolved, loss, model (seeded initial weights), strategy and preprocessing,
    every name and setting checked: what training and the learning-rate finder start from.
    The config returned is a resolved copy (task, and data paths made absolute where asked)."""
    data = config.data.load()
    if absolute_paths:
        config = replace(config, data=config.data.with_absolute_paths())
    _check_trainable(data)
    # A resolved copy: the caller's config stays as given (task "auto" follows each dataset).
    config = replace(config, train=replace(config.train, task=resolve_task(config.task, data)))
    if config.train.task == "multilabel":
        data = data.as_multilabel()
    config.train.validate()
    loss_fn = build_loss(config.train.task, _pos_weight(config.pos_weight, data))
    spec = ModelSpec(
        config.backbone, config.head, data.num_classes, dict(config.head_options),
        resolve_weights_choice(config.backbone, config.weights), config.init, dict(config.backbone_options),
    )
    seed_everything(config.train.seed)  # the head's (and a scratch backbone's) initial weights
    model = build_model(spec)
    strategy = build_strategy(config.strategy, **config.strategy_options)
    preprocessing = _preprocessing(model, config.input_size)
    check_input_size(model, preprocessing.input_size)
    return Prepared(config, data, loss_fn, spec, model, strategy, preprocessing)


def find_learning_rate(config: FinetuneConfig, settings: LrFinderSettings | None = None,
                       out: str | Path | None = None) -> LrFinding:
    """``tltk lr-find``: the learning-rate finder on the model, strategy and training data
    that ``finetune(config, ...)`` would train (its ``train.lr`` is not used); with ``out``,
    lr_find.json and lr_find.png are written there. Nothing else is written."""
    settings = settings or LrFinderSettings()
    settings.check()
    config.train.validate_settings()
    if out is not None and Path(out).expanduser().exists() and not Path(out).expanduser().is_dir():
        raise RunDirError(f"--out {out} is a file; name a folder for lr_find.json and lr_find.png.")
    with distributed.session(resolve_device(config.train.device).type) as context:
        check_single_process(context)
        config, data, loss_fn, _, model, strategy, preprocessing = _prepare(config)
        train_set, _ = _datasets(data, preprocessing, config.train.augment)
        finding = find_lr(model, train_set, config.train, strategy=strategy, loss_fn=loss_fn, settings=settings)
    if out is not None:
        save_finding(finding, out)
    return finding


def _prepare_run_dir(out: Path, resume: bool, overwrite: bool, record: dict[str, Any]) -> None:
    if resume and checkpoint.has_checkpoint(out):
        checkpoint.rewind_metrics_log(out, checkpoint.read_training_state(out))
        return
    if resume:
        _restart_from_beginning(out, record)
        return
    rundir.prepare_out_dir(out, overwrite)
    checkpoint.remove_checkpoint(out)
    rundir.write_config(out, record)


def _restart_from_beginning(out: Path, record: dict[str, Any]) -> None:
    """Resume a run that was interrupted before its first checkpoint: nothing it computed
    survives, so it starts again from step 0 with the settings it recorded. config.json
    stays in place throughout (it is replaced, never removed), so a kill during this
    restart leaves a directory that can still be resumed."""
    recorded = rundir.read_config(out).get("finetune")
    if json.loads(json.dumps(recorded)) != json.loads(json.dumps(record["finetune"])):
        changed = _changed_settings(recorded, record["finetune"])
        raise RunDirError(f"cannot resume {out} with other settings than it started with ({changed}); "
                          f"resume with `tltk finetune --resume {out}` alone, or start a new run in another --out.")
    for name in (rundir.METRICS, rundir.WEIGHTS, rundir.SUMMARY):
        (out / name).unlink(missing_ok=True)
    checkpoint.remove_checkpoint(out)  # a save killed before its manifest leaves only temporary files
    rundir.write_config(out, record)


def _changed_settings(recorded: Any, given: dict[str, Any]) -> str:
    if not isinstance(recorded, dict):
        return "config.json records none"
    return "changed: " + ", ".join(_differences(recorded, given)[:5])


def _differences(recorded: dict[str, Any], given: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted names of the settings that differ (``train.lr``)."""
    names = []
    for key in sorted(set(recorded) | set(given)):
        old, new = recorded.get(key), given.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            names += _differences(old, new, f"{prefix}{key}.")
        elif json.dumps(old) != json.dumps(new):
            names.append(prefix + key)
    return names


def check_resumable(run: Path) -> None:
    """A run can be resumed when it holds a checkpoint, or when it was interrupted before
    its first one (config.json written, no checkpoint, no summary): then it starts again
    from its beginning. A finished run has no checkpoint left and cannot be resumed."""
    if not run.is_dir():
        raise RunDirError(f"cannot resume {run}: no such run directory; pass the --out of an interrupted `tltk finetune`.")
    if checkpoint.has_checkpoint(run):
        return
    if (run / rundir.SUMMARY).is_file():
        raise RunDirError(f"cannot resume {run}: it finished (the checkpoint is removed at the end); "
                          "start a new run with `tltk finetune --out`.")
    if not (run / rundir.CONFIG).is_file():
        raise RunDirError(f"cannot resume {run}: it holds no checkpoint and no {rundir.CONFIG} to start again from; "
                          "start a new run with `tltk finetune --out`.")


def records_absolute_paths(run: Path) -> bool:
    """Whether a run records its data paths in absolute form. An interrupted run from before
    tltk did is resumed with its paths as they were written, which its checkpoint compares."""
    return "spec_as_typed" in rundir.read_config(run).get("data", {})


def config_of_run(run: str | Path) -> FinetuneConfig:
    """The settings an interrupted run was started with, read from RUN/config.json."""
    run = Path(run).expanduser()
    check_resumable(run)
    record = rundir.read_config(run).get("finetune")
    if not isinstance(record, dict):
        raise RunDirError(f"{run / rundir.CONFIG} has no 'finetune' settings to resume from; start a new run.")
    try:
        return FinetuneConfig.from_dict(record)
    except TypeError as exc:
        raise RunDirError(f"{run / rundir.CONFIG} has settings this version cannot read ({exc}); start a new run.") from exc


def resolve_task(task: str, data: DataSplits) -> str:
    """``auto`` follows the data. Multi-class data can be trained as multi-label (one sigmoid
    per class); multi-label data cannot be forced into one class per image."""
    if task == "auto":
        return data.task
    if task not in TASKS:
        raise DataError(f"--task '{task}' is not one of auto, {', '.join(TASKS)}.")
    if task == "multiclass" and data.task == "multilabel":
        raise DataError(f"{data.spec} is multi-label (several labels per image); use --task multilabel or auto.")
    return task


def _pos_weight(mode: str, data: DataSplits) -> torch.Tensor | None:
    if mode == "none":
        return None
    if mode != "auto":
        raise DataError(f"--pos-weight '{mode}' is not one of none, auto.")
    if data.task != "multilabel":
        raise DataError("--pos-weight auto applies to multi-label data only; drop it for multi-class data.")
    return auto_pos_weight([s.target for s in data.train])


def _check_trainable(data: DataSplits) -> None:
    if not data.train:
        raise DataError(f"{data.spec} has no training images; check the path or the --classes filter.")


def _preprocessing(model: TransferModel, input_size: int | None) -> Preprocessing:
    check_size_option(input_size)
    return model.preprocessing.resized(input_size)


def _datasets(data: DataSplits, pre: Preprocessing, augment: str) -> tuple[ImageDataset, ImageDataset | None]:
    train_set = ImageDataset(data.train, pre.train_transform(augment), data.arrays)
    val_set = ImageDataset(data.val, pre.eval_transform(), data.arrays) if data.val else None
    return train_set, val_set


def _config_record(
    config: FinetuneConfig,
    spec: ModelSpec,
    strategy: Strategy,
    data: DataSplits,
    preprocessing: Preprocessing,
    model: TransferModel,
    finding: LrFinding | None = None,
) -> dict[str, Any]:
    record = {
        "model": spec.to_dict(),
        "pretrained_source": model.backbone.pretrained_source,
        "components": components_record(config, data),
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
        "preprocessing": preprocessing.to_dict(),
        "versions": rundir.library_versions(),
        "finetune": config.to_dict(),  # everything `tltk finetune --resume` needs to rebuild the run
    }
    if finding is not None:  # --lr find: the rate "train" holds, and how it was chosen
        record["lr_find"] = {"requested": FIND_LR, **finding.summary()}
    return record


def _find_lr(config: FinetuneConfig, model: TransferModel, strategy: Strategy, data: DataSplits,
             preprocessing: Preprocessing, loss_fn: torch.nn.Module, context: distributed.DistContext) -> LrFinding:
    """``--lr find``: the finder's suggestion for this model, strategy and training data,
    found on copies (the model and the random generators training uses are untouched)."""
    check_single_process(context)
    train_set, _ = _datasets(data, preprocessing, config.train.augment)
    return find_lr(model, train_set, config.train, strategy=strategy, loss_fn=loss_fn)


def components_record(config: FinetuneConfig, data: DataSplits) -> dict[str, Any]:
    """Each component of the run with the package and version that provided it (plugins'
    included), so that reloading the run takes the same ones and says what to install when
    one is missing."""
    return {
        "backbone": provenance("backbone", config.backbone),
        "head": provenance("head", config.head),
        "strategy": provenance("strategy", config.strategy),
        "data format": provenance("data format", data.format),
        "callbacks": [provenance("callback", str(spec["name"])) for spec in config.callbacks],
    }


def _summary(
    model: TransferModel, data: DataSplits, pre: Preprocessing, fitted: FitResult, train: TrainConfig,
    context: distributed.DistContext = distributed.SINGLE,
) -> dict[str, Any]:
    last = fitted.history[-1] if fitted.history else {}
    summary: dict[str, Any] = {
        "epochs_run": fitted.epochs_run,
        "steps": fitted.steps,
        "seconds": fitted.seconds,
        "stopped_early": fitted.stopped_early,
        "best_epoch": fitted.best_epoch,
        "precision": fitted.precision,
        "feature_cache": fitted.feature_cache,
        "image_cache": fitted.image_cache,
        "threads": fitted.threads,
        "task": train.task,
        "monitor": train.monitored,
        "best_" + train.monitored: fitted.best_metric,
        "final": {k: v for k, v in last.items() if k not in ("kind",)},
    }
    if data.test:
        test_set = ImageDataset(data.test, pre.eval_transform(), data.arrays)
        report = evaluate_model(model, test_set, data.class_names, train.inference(), train.task, context)
        summary["test"] = {k: report[k] for k in ("n", "accuracy", "top5_accuracy", "map", "map_voc07") if k in report}
    return summary
