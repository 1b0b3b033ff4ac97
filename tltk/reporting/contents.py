"""What a report says about one run, gathered from the ``Run`` object.

Every figure comes from the run itself: what was trained from its config.json, the curves
from its metrics.jsonl, the final figures from its summary.json, and the test figures,
per-class table and confusion matrix from ``Run.evaluate`` (the numbers ``tltk evaluate``
prints). The mistakes need each image's probabilities, which one pass of the run's model
over the split gives, through the one inference path (``tltk.runtime.collect_outputs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from tltk import rundir
from tltk.data import ImageDataset
from tltk.errors import TltkError
from tltk.explain import Explanation
from tltk.reporting.pictures import (
    Picture,
    evenly_spaced,
    figure_picture,
    file_picture,
    per_class_accuracy_figure,
    written_picture,
)
from tltk.reporting.tables import Cell, Table, count_cell, figure_cell, is_number, text_cell
from tltk.run import Run
from tltk.runtime import collect_outputs

MISTAKES_SHOWN = 16  # a sample: the page stays small however many images the split has
SNAPSHOTS_SHOWN = 6
NEIGHBOUR_QUERIES = 4
NEIGHBOURS = 5
EXPLAINED_IMAGES = 4


@dataclass
class Facts:
    """One group of the "what was trained" list: (name, value as text) pairs."""

    title: str
    rows: list[tuple[str, str]]


@dataclass
class Part:
    """A picture (or a sentence saying why there is none) with its heading."""

    title: str
    pictures: list[Picture] = field(default_factory=list)
    note: str = ""


@dataclass
class RunSection:
    anchor: str
    label: str
    path: str
    task: str
    split: str
    facts: list[Facts]
    curves: Part
    figures: Table
    notes: list[str]
    per_class: Table
    per_class_chart: Part
    confusion: Part | None
    mistakes: Part
    filters: Part
    neighbours: Part | None
    explanations: Part | None


def run_section(run: Run, anchor: str, label: str, *, split: str = "test", device: str = "auto",
                mistakes: int = MISTAKES_SHOWN) -> RunSection:
    """Everything the page shows about ``run``: one evaluation of ``split`` and one pass for its mistakes."""
    report = run.evaluate(split, device=device)
    dataset, _ = run.split(split)
    return RunSection(
        anchor=anchor, label=label, path=str(run.path), task=run.task, split=split,
        facts=trained_facts(run),
        curves=curve_part(run),
        figures=figures_table(run, report, split),
        notes=summary_disagreements(run, report, split),
        per_class=per_class_table(run, report),
        per_class_chart=per_class_chart(run, report, split),
        confusion=confusion_part(run, report, split),
        mistakes=mistakes_part(run, dataset, split, device, mistakes),
        filters=filters_part(run),
        neighbours=neighbours_part(run),
        explanations=explanations_part(run, dataset),
    )


# --- what was trained -------------------------------------------------------------------------


def trained_facts(run: Run) -> list[Facts]:
    """Model, data, every training setting, how the run went, and the versions that made it."""
    config, summary = run.config, run.summary
    model, data, train = config.get("model", {}), config.get("data", {}), config.get("train", {})
    strategy = config.get("strategy", {})
    model_rows = [
        ("backbone", model.get("backbone")),
        ("backbone weights", model.get("weights")),
        ("weights came from", config.get("pretrained_source") or _weights_origin(model.get("weights"))),
        ("backbone options", model.get("backbone_options")),
        ("head", model.get("head")),
        ("head options", model.get("head_options")),
        ("strategy", strategy.get("name")),
        ("strategy options", {k: v for k, v in strategy.items() if k != "name"}),
        ("frozen modules", run.frozen or "none"),
        ("task", run.task),
        ("input size", "x".join(map(str, run.preprocessing.input_size))),
    ]
    sizes = data.get("sizes") or {}
    data_rows = [
        ("data", data.get("spec_as_typed") or data.get("spec")),
        ("format", data.get("format")),
        ("classes", len(run.class_names)),
        ("class filter", data.get("classes")),
        ("training images per class", data.get("train_per_class")),
        *((f"{name} images", count) for name, count in sizes.items()),
        ("unreadable images skipped", data.get("skipped")),
        ("split seed", data.get("seed")),
    ]
    outcome_rows = [
        ("seed", train.get("seed")),
        ("device", train.get("device")),
        ("precision", summary.get("precision")),
        ("epochs run", summary.get("epochs_run")),
        ("steps", summary.get("steps")),
        ("best epoch", summary.get("best_epoch")),
        ("stopped early", summary.get("stopped_early")),
        ("wall time (s)", summary.get("seconds")),
        ("frozen-backbone feature cache", summary.get("feature_cache")),
    ]
    components = config.get("components", {})
    version_rows = [*config.get("versions", {}).items()] + [
        (f"{kind}: {record.get('name')}", f"{record.get('package')} {record.get('version')}")
        for kind, record in components.items() if isinstance(record, dict)
    ] + [(f"callback: {c.get('name')}", f"{c.get('package')} {c.get('version')}")
         for c in components.get("callbacks", []) if isinstance(c, dict)]
    return [
        Facts("Model", _texts(model_rows)),
        Facts("Data", _texts(data_rows)),
        Facts("Hyperparameters", _texts(train.items())),
        Facts("The run", _texts(outcome_rows)),
        Facts("Versions (libraries and the packages that provided each component)", _texts(version_rows)),
    ]


def _weights_origin(weights: Any) -> str:
    return "random initialisation (no pretrained weights)" if weights in (None, "none") else str(weights)


def _texts(rows: Any) -> list[tuple[str, str]]:
    return [(str(name), text_cell(value).text) for name, value in rows]


# --- curves and figures -----------------------------------------------------------------------


def curve_part(run: Run) -> Part:
    """Loss, accuracy (or mAP) and learning rate over training, from metrics.jsonl."""
    from tltk.viz.curves import loss_figure, lr_figure, metric_figure, run_title

    rows = rundir.read_metrics(run.path)
    if not rows:
        return Part("Training curves", note=f"{run.path / rundir.METRICS} holds no rows, so there are no curves.")
    title = run_title(run.path)
    pictures = []
    for build, caption in ((loss_figure, "loss"), (metric_figure, "accuracy or mAP per epoch"),
                           (lr_figure, "learning rate")):
        figure = build(rows, title)
        if figure is not None:
            pictures.append(figure_picture(figure, f"{caption}: {title}"))
    return Part("Training curves", pictures)


HEADLINE = {"multiclass": ("accuracy", "top5_accuracy"), "multilabel": ("map", "map_voc07")}


def figures_table(run: Run, report: dict[str, Any], split: str) -> Table:
    """The last epoch's validation figures and the best one (summary.json), then ``split``'s
    figures as ``Run.evaluate`` gives them now."""
    from tltk.viz.curves import pretty

    summary = run.summary
    rows: list[list[Cell]] = []
    for key, value in summary.get("final", {}).items():
        if key.startswith("val_") and is_number(value):
            rows.append([Cell(f"final {pretty(key)}"), figure_cell(value)])
    monitor = summary.get("monitor")
    best_key = f"best_{monitor}" if monitor else None
    if best_key and is_number(summary.get(best_key)):
        rows.append([Cell(f"best {pretty(monitor)} (epoch {summary.get('best_epoch')})"), figure_cell(summary[best_key])])
    for key in HEADLINE[run.task]:
        if is_number(report.get(key)):
            rows.append([Cell(pretty(f"{split}_{key}")), figure_cell(report[key])])
    rows.append([Cell(f"{split} images"), count_cell(report.get("n"))])
    return Table("figures", ["figure", "value"], rows, [False, True], sortable=False)


def summary_disagreements(run: Run, report: dict[str, Any], split: str) -> list[str]:
    """Sentences for any test figure that summary.json recorded at training and evaluating now changes
    (data that moved or changed since): the page shows the figures of now and says so."""
    if split != "test":
        return []
    recorded = run.summary.get("test", {})
    notes = []
    for key, value in recorded.items():
        now = report.get(key)
        if is_number(value) and is_number(now) and abs(float(value) - float(now)) > 1e-9:
            notes.append(f"summary.json recorded test {key} {value:.4f} at the end of training; evaluated now it is "
                         f"{now:.4f}, the figure this page shows.")
    return notes


def per_class_table(run: Run, report: dict[str, Any]) -> Table:
    """Per-class accuracy and test images, or per-class AP in both definitions with positives."""
    if run.task == "multilabel":
        rows = [[Cell(row["class"]), figure_cell(row["ap"]), figure_cell(row["ap_voc07"]), count_cell(row["positives"]),
                 count_cell(row["ignored"])] for row in report["per_class"]]
        return Table("per-class", ["class", "AP", "AP (VOC07 11-point)", "positives", "ignored (difficult)"], rows,
                     [False, True, True, True, True])
    accuracy, support = report["per_class_accuracy"], report["support"]
    rows = [[Cell(name), figure_cell(accuracy[name]), count_cell(support[name])] for name in run.class_names]
    return Table("per-class", ["class", "accuracy", "images"], rows, [False, True, True])


def per_class_chart(run: Run, report: dict[str, Any], split: str) -> Part:
    from tltk.viz.ap_chart import per_class_ap_figure

    title = f"Per-class {'AP' if run.task == 'multilabel' else 'accuracy'} on {split}"
    if run.task == "multilabel":
        figure = per_class_ap_figure(report, title)
    else:
        accuracy = report["per_class_accuracy"]
        figure = per_class_accuracy_figure(run.class_names, [accuracy[n] for n in run.class_names], title)
    return Part(title, [figure_picture(figure, title)])


def confusion_part(run: Run, report: dict[str, Any], split: str) -> Part | None:
    """The confusion matrix ``Run.evaluate`` counted, with class names (multi-class runs only)."""
    if run.task == "multilabel":
        return None
    from tltk.viz.misclassified import confusion_figure

    matrix = np.asarray(report["confusion_matrix"])
    title = f"Confusion matrix on {split} ({report['n']} images, accuracy {report['accuracy']:.4f})"
    return Part("Confusion matrix", [figure_picture(confusion_figure(matrix, run.class_names, title), title)])


# --- mistakes ---------------------------------------------------------------------------------


def mistakes_part(run: Run, dataset: ImageDataset, split: str, device: str, shown: int) -> Part:
    """The ``shown`` most confident mistakes: for a multi-class run the wrong predictions; for a
    multi-label run the labels predicted (probability 0.5 or more) that the image does not have."""
    from tltk.viz.common import unnormalise
    from tltk.viz.misclassified import find_mistakes, mistakes_figure

    title = "Most confident mistakes"
    if not len(dataset):
        return Part(title, note=f"the {split} split holds no images.")
    logits, targets = collect_outputs(run.model, dataset, run.inference(device))
    ids = [sample.id for sample in dataset.samples]
    if run.task == "multilabel":
        mistakes = false_positives(torch.sigmoid(logits).numpy(), targets.numpy(), run.class_names, ids)
    else:
        mistakes = find_mistakes(torch.softmax(logits, dim=1).numpy(), targets.numpy(), run.class_names, ids)
    if not mistakes:
        return Part(title, note=f"no image of the {split} split is misclassified.")
    chosen = mistakes[:shown]
    pre = run.preprocessing
    pictures = [unnormalise(dataset[m.index][0], pre.mean, pre.std) for m in chosen]
    heading = f"{len(chosen)} most confident of {len(mistakes)} mistakes on {split} ({len(dataset)} images)"
    return Part(title, [figure_picture(mistakes_figure(pictures, chosen, heading), heading)])


def false_positives(probabilities: np.ndarray, targets: np.ndarray, class_names: Sequence[str],
                    ids: Sequence[str], threshold: float = 0.5) -> list[Any]:
    """For each image, its most probable label that it does not have, where that label is predicted
    (``threshold`` or more); most confident first, ties in split order. Targets of -1 (difficult) are
    not counted as absent."""
    from tltk.viz.misclassified import Mistake

    absent = np.where(targets == 0, probabilities, -np.inf)
    worst = absent.argmax(axis=1)
    confidence = absent[np.arange(len(worst)), worst]
    wrong = np.flatnonzero(confidence >= threshold)
    order = wrong[np.argsort(-confidence[wrong], kind="stable")]
    return [Mistake(int(i), ids[i], ",".join(class_names[c] for c in np.flatnonzero(targets[i] == 1)) or "(none)",
                    class_names[int(worst[i])], float(confidence[i])) for i in order]


# --- inside the model -------------------------------------------------------------------------


def filters_part(run: Run) -> Part:
    """conv1's kernels as trained, then the snapshots training recorded (``--filters-every``), if any."""
    from tltk.viz.curves import run_title
    from tltk.viz.filters import write_filters

    title = "conv1 filters"
    try:
        trained = written_picture(lambda target: write_filters(run.model, target, "conv1", run_title(run.path)),
                                  "conv1 filters of the trained model")
    except TltkError as exc:
        return Part(title, note=f"no filters to draw: {exc}")
    snapshots = sorted((run.path / "plots" / "filters").glob("epoch_*.png"))
    shown = evenly_spaced(snapshots, SNAPSHOTS_SHOWN)
    pictures = [trained, *(file_picture(path, f"snapshot {path.stem.replace('_', ' ')}") for path in shown)]
    note = "" if snapshots else "no snapshots over training were recorded (finetune --filters-every N records them)."
    if len(shown) < len(snapshots):
        note = f"{len(shown)} of {len(snapshots)} snapshots recorded over training."
    return Part(title, pictures, note)


def neighbours_part(run: Run) -> Part | None:
    """A few stored images beside their nearest neighbours, from the run's first feature store
    (``tltk extract`` writes them under RUN/features); None when the run has none."""
    from tltk.features.neighbors import neighbours_of_rows
    from tltk.features.store import FeatureStore
    from tltk.viz.neighbors_grid import write_neighbors_grid

    stores = sorted(path.parent for path in (run.path / "features").glob("*/manifest.json"))
    if not stores:
        return None
    title = "Nearest neighbours"
    try:
        store = FeatureStore.open(stores[0])
        rows = sorted({round(i * (store.count - 1) / max(NEIGHBOUR_QUERIES - 1, 1)) for i in range(NEIGHBOUR_QUERIES)})
        results = neighbours_of_rows(store, rows, min(NEIGHBOURS, max(store.count - 1, 1)))
        caption = f"nearest neighbours at {store.layer} ({stores[0].name})"
        picture = written_picture(lambda target: write_neighbors_grid(store, results, target), caption)
    except TltkError as exc:
        return Part(title, note=f"the feature store {stores[0]} could not be shown: {exc}")
    return Part(title, [picture])


def explanations_part(run: Run, dataset: ImageDataset) -> Part:
    """Class-activation overlays (``Run.explain``) for the first few image files of the split:
    where the model found the evidence for what it predicted. A run that cannot be explained
    (a sequence backbone, the explain extra not installed) gets the reason instead."""
    from tltk.viz.gradcam import explanation_figure, grouped_by_image

    title = "Explanations (class activation maps)"
    images = [sample.source for sample in dataset.samples if isinstance(sample.source, str)][:EXPLAINED_IMAGES]
    if not images:
        return Part(title, note="the split's images are held in memory, not as files to explain.")
    try:
        explanations = run.explain(images)
    except TltkError as exc:
        return Part(title, note=f"the model could not be explained: {exc}")
    return Part(title, [figure_picture(explanation_figure(group), explanation_caption(group))
                        for group in grouped_by_image(explanations)])


def explanation_caption(group: list[Explanation]) -> str:
    first = group[0]
    return f"{Path(first.source).name}: {first.method} at {first.layer}, heat map over the image for each class shown"
