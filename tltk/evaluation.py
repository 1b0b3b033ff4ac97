"""The evaluation report of a model on a dataset: accuracy, top-5, per-class figures and the
confusion matrix, or per-class AP and mAP for multi-label data.

Below the run layer: ``Run.evaluate`` (and ``tltk.evaluate``) find a run's split and call
``evaluate_model``; training calls it for the test figures of its summary.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tltk import distributed
from tltk.data import ImageDataset
from tltk.metrics import confusion_matrix, multilabel_report, per_class_accuracy, top_k_accuracy
from tltk.runtime import Inference, collect_outputs, resolve_device, stream_outputs
from tltk.tta import averaged_probabilities, check_tta, tta_inference


def evaluate_model(
    model: torch.nn.Module,
    dataset: ImageDataset,
    class_names: list[str],
    settings: Inference,
    task: str,
    context: distributed.DistContext = distributed.SINGLE,
    tta: str = "none",
) -> dict[str, Any]:
    """The evaluation report of ``model`` on ``dataset`` (already preprocessed as the run's),
    scored on the probabilities averaged over the views of ``tta`` where it is not "none"
    (``tltk.tta``).

    Multi-class figures are tallied batch by batch, so memory does not grow with the
    split; multi-label AP ranks every score of a class, so those are kept (one
    preallocated array, nothing more). In a data-parallel job each rank evaluates every
    N-th sample and the tallies (or scores) are combined, so every rank returns the report
    of the whole split.
    """
    check_tta(tta)
    device = distributed.device_for(context, resolve_device(settings.device))
    if len(dataset) < context.world_size:
        context = distributed.SINGLE  # fewer samples than ranks: each rank evaluates them all
    shard = dataset.subset(distributed.evaluation_shard(len(dataset), context)) if context.active else dataset
    forward = averaged_probabilities(model, task, tta) if tta != "none" else None  # outputs are then probabilities
    settings = tta_inference(settings, tta)
    if task == "multilabel":
        outputs, targets = distributed.gather_outputs(
            *collect_outputs(model, shard, settings, device=device, forward=forward), context, device)
        scores = outputs if forward is not None else torch.sigmoid(outputs)
        return multilabel_report(targets.numpy(), scores.numpy(), class_names)
    tally = ClassificationTally(len(class_names))
    # Softmax keeps the order of the logits, so accuracy and top-5 read either alike.
    for logits, batch_targets in stream_outputs(model, shard, settings, device=device, forward=forward):
        tally.add(torch.as_tensor(batch_targets).numpy(), logits.numpy())
    tally.combine_ranks(context, device)
    return tally.report(class_names)


class ClassificationTally:
    """Multi-class figures accumulated one batch at a time.

    A confusion matrix and a count of top-5 hits hold everything
    ``tltk.metrics.classification_report`` derives from the full arrays, so the
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
