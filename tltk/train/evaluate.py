"""Reloading a run and measuring it on a split of any dataset with the same classes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from tltk import distributed
from tltk.data import DataSplits, ImageDataset, Sample, build_transforms, load_data
from tltk.errors import DataError, RunDirError
from tltk.model import ModelSpec, TransferModel, build_model
from tltk.strategies import build_strategy
from tltk.train import rundir
from tltk.train.metrics import confusion_matrix, multilabel_report, per_class_accuracy, top_k_accuracy
from tltk.train.trainer import (
    TrainConfig,
    check_batch_size,
    default_workers,
    iterate_logits,
    make_loader,
    memory_format,
    predict_logits,
    resolve_device,
    resolve_precision,
    use_channels_last,
)


@dataclass
class LoadedRun:
    path: Path
    model: TransferModel
    config: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return list(self.config["class_names"])

    @property
    def preprocessing(self) -> dict[str, Any]:
        return dict(self.config["preprocessing"])


def load_run(path: str | Path) -> LoadedRun:
    """Rebuild a run's model from config.json and model.safetensors alone."""
    path = Path(path).expanduser()
    config = rundir.read_config(path)
    spec = ModelSpec(**config["model"])
    model = build_model(spec, load_weights=False)
    state = rundir.load_weights(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise RunDirError(f"{path / rundir.WEIGHTS} does not match the model in its config.json (first odd tensor: '{first}').")
    if config["strategy"]["name"] == "freeze":
        build_strategy("freeze").prepare(model)
    model.eval()
    return LoadedRun(path, model, config)


def evaluate(
    run: str | Path | LoadedRun,
    data: str | None = None,
    split: str = "test",
    *,
    device: str = "auto",
    batch_size: int | None = None,
    **data_overrides: Any,
) -> dict[str, Any]:
    """Accuracy, top-5, per-class accuracy and confusion matrix of a run on one split.

    Without ``data`` the run's own dataset is used; either way the split settings
    (seed, fractions, class filter) default to the run's, so "test" means the same images
    training held out. Launched by torchrun or srun with several processes, each evaluates
    its shard of the split and every one returns the report of the whole split.
    """
    if batch_size is not None:
        check_batch_size(batch_size)
    loaded = run if isinstance(run, LoadedRun) else load_run(run)
    splits = load_data_for_run(loaded, data, data_overrides)
    train = TrainConfig(**loaded.config["train"])
    if train.task == "multilabel":
        splits = splits.as_multilabel()
    samples = _samples_for_run(splits.split(split), splits.class_names, loaded.class_names, splits.spec)
    train.device = device
    if batch_size is not None:
        train.batch_size = batch_size
    with distributed.session(resolve_device(device).type) as context:
        report = evaluate_model(loaded.model, samples, splits.arrays, loaded.class_names, loaded.preprocessing, train,
                                context)
    report.update(run=str(loaded.path), data=splits.spec, split=split, skipped=len(splits.skipped))
    return report


_DATA_KEYS = ("spec", "image_root", "val_split", "test_split", "seed", "strict", "classes", "train_per_class", "difficult")


def load_data_for_run(loaded: LoadedRun, data: str | None, overrides: dict[str, Any]) -> DataSplits:
    """The run's own data settings, with another spec or explicit options on top."""
    options = {k: v for k, v in loaded.config["data"].items() if k in _DATA_KEYS}
    if data is not None and data != options["spec"]:
        options.update(spec=data, classes=None, train_per_class=None)
    options.update({k: v for k, v in overrides.items() if v is not None})
    return load_data(options.pop("spec"), **options)


def _samples_for_run(samples: Sequence[Sample], data_classes: list[str], run_classes: list[str], where: str) -> list[Sample]:
    """Re-index targets from the data's class list to the run's.

    Multi-class: a sample of a class the run never saw is an error. Multi-label: the
    run's classes must all be in the data (columns are matched by name; extra data
    classes are dropped).
    """
    index = {name: i for i, name in enumerate(run_classes)}
    if samples and isinstance(samples[0].target, tuple):
        missing = [name for name in run_classes if name not in data_classes]
        if missing:
            raise DataError(f"{where} lacks the run's classes {', '.join(missing[:5])}; evaluate on data labelled with them.")
        columns = [data_classes.index(name) for name in run_classes]
        return [Sample(s.source, tuple(s.target[c] for c in columns), s.id) for s in samples]
    unknown = sorted({data_classes[s.target] for s in samples} - set(index))
    if unknown:
        raise DataError(
            f"{where} has classes the run was not trained on ({', '.join(unknown[:5])}); "
            f"pass --classes with the run's classes ({', '.join(run_classes[:10])})."
        )
    return [Sample(s.source, index[data_classes[s.target]], s.id) for s in samples]


def evaluate_model(
    model: TransferModel,
    samples: Sequence[Sample],
    arrays: np.ndarray | None,
    class_names: list[str],
    preprocessing: dict[str, Any],
    train: TrainConfig,
    context: distributed.DistContext = distributed.SINGLE,
) -> dict[str, Any]:
    """The evaluation report of ``model`` on ``samples``, with the run's precision and the
    loader defaults of training (workers from the CPU count, channels-last for conv nets).

    Multi-class figures are tallied batch by batch, so memory does not grow with the
    split; multi-label AP ranks every score of a class, so those are kept (one
    preallocated array, nothing more). In a data-parallel job each rank evaluates every
    N-th sample and the tallies (or scores) are combined, so every rank returns the report
    of the whole split.
    """
    device = distributed.device_for(context, resolve_device(train.device))
    transform = build_transforms(
        tuple(preprocessing["input_size"]), preprocessing["mean"], preprocessing["std"], "none", train=False
    )
    if len(samples) < context.world_size:
        context = distributed.SINGLE  # fewer samples than ranks: each rank evaluates them all
    shard = [samples[i] for i in distributed.evaluation_shard(len(samples), context)] if context.active else samples
    dataset = ImageDataset(list(shard), transform, arrays)
    workers = train.workers if train.workers is not None else default_workers(len(dataset))
    loader = make_loader(dataset, batch_size=train.batch_size, shuffle=False, workers=workers, device=device)
    amp_dtype = resolve_precision(train.precision, device)
    channels_last = use_channels_last(train.channels_last, model)
    model.to(device)
    with memory_format(model, channels_last):
        if train.task == "multilabel":
            logits, targets = distributed.gather_outputs(
                *predict_logits(model, loader, device, amp_dtype, channels_last), context, device)
            return multilabel_report(targets.numpy(), torch.sigmoid(logits).numpy(), class_names)
        tally = ClassificationTally(len(class_names))
        for logits, batch_targets in iterate_logits(model, loader, device, amp_dtype, channels_last):
            tally.add(torch.as_tensor(batch_targets).numpy(), logits.numpy())
    tally.combine_ranks(context, device)
    return tally.report(class_names)


class ClassificationTally:
    """Multi-class figures accumulated one batch at a time.

    A confusion matrix and a count of top-5 hits hold everything
    ``tltk.train.metrics.classification_report`` derives from the full arrays, so the
    report is the same (the tests compare them) while memory stays at classes x classes.
    """

    TOP_K = 5

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.top_k_hits = 0

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    def add(self, targets: np.ndarray, scores: np.ndarray) -> None:
        if not len(targets):
            return
        self.confusion += confusion_matrix(targets, scores.argmax(axis=1), self.num_classes)
        if self.num_classes > self.TOP_K:
            self.top_k_hits += int(round(top_k_accuracy(targets, scores, self.TOP_K) * len(targets)))

    def combine_ranks(self, context: distributed.DistContext, device: torch.device) -> None:
        """Add up every rank's tallies (each counted a different shard of the split)."""
        if not context.active:
            return
        counts = torch.from_numpy(np.append(self.confusion.ravel(), self.top_k_hits)).to(device)
        torch.distributed.all_reduce(counts)
        counts = counts.cpu().numpy()
        self.confusion = counts[:-1].reshape(self.confusion.shape)
        self.top_k_hits = int(counts[-1])

    def report(self, class_names: list[str]) -> dict[str, Any]:
        n = self.n
        report: dict[str, Any] = {
            "n": n,
            "task": "multiclass",
            "accuracy": float(np.trace(self.confusion) / n) if n else float("nan"),
            "per_class_accuracy": {
                name: (None if np.isnan(v) else float(v)) for name, v in zip(class_names, per_class_accuracy(self.confusion))
            },
            "support": {name: int(count) for name, count in zip(class_names, self.confusion.sum(axis=1))},
            "confusion_matrix": self.confusion.tolist(),
            "class_names": list(class_names),
        }
        if self.num_classes > self.TOP_K:
            report["top5_accuracy"] = self.top_k_hits / n if n else float("nan")
        return report
