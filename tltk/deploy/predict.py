"""Predictions from an exported ONNX file with onnxruntime alone: no run directory, no torch model.

The images are found and ordered exactly as ``Run.predict`` finds them (a folder of
unlabelled images in path order, or a split of a ``--data`` spec under the run's recorded
split settings, which the file carries), preprocessed as its metadata says, and handed on
as the same ``Predictions`` record, so every exporter (the Kaggle CSV among them) writes an
ONNX model's predictions exactly as it writes a run's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tltk.data import DataSplits, ImageDataset, load_data
from tltk.deploy.card import ModelCard
from tltk.deploy.files import open_onnx
from tltk.predict import Predictions, as_predictions
from tltk.export import export
from tltk.run import WrittenPredictions
from tltk.run import export_predictions as run_export_predictions
from tltk.run import predict as run_predict
from tltk.run import prediction_images, recorded_data_options
from tltk.runtime import check_batch_size, default_workers, make_loader, resolve_device
from tltk.tta import view_count, views


def predict(target: str | Path, data: str | None = None, split: str = "test", **options: Any) -> Predictions:
    """What ``tltk predict`` writes: a run directory predicts with its PyTorch model, a model
    file with onnxruntime."""
    path = Path(target).expanduser()
    if path.is_file():
        return predict_onnx(path, data, split, **options)
    return run_predict(target, data, split, **options)


def export_predictions(target: str | Path, out: str | Path, format: str = "kaggle", data: str | None = None,
                       split: str = "test", *, exporter_options: dict[str, Any] | None = None,
                       **options: Any) -> WrittenPredictions:
    """What ``tltk predict`` does: predict with a run directory (streamed batch by batch into the
    exporter) or a model file (onnxruntime), and write ``out`` with the exporter ``format``."""
    path = Path(target).expanduser()
    if not path.is_file():
        return run_export_predictions(target, out, format, data, split, exporter_options=exporter_options, **options)
    predictions = predict_onnx(path, data, split, **options)
    written = export(predictions, out, format, **(exporter_options or {}))
    return WrittenPredictions(written, len(predictions), predictions.task, predictions.tta)


def predict_onnx(model_file: str | Path, data: str | None = None, split: str = "test", *, device: str = "auto",
                 batch_size: int = 64, workers: int | None = None, tta: str = "none",
                 **data_overrides: Any) -> Predictions:
    """Every image's probabilities from the ONNX file, in the order of the input listing; averaged
    over the views of ``tta`` as ``Run.predict`` averages them (the file outputs probabilities)."""
    check_batch_size(batch_size)
    count = view_count(tta)
    path = Path(model_file).expanduser()
    forward, card = open_onnx(path, device)
    dataset = prediction_input(path, card, data, split, data_overrides)
    loader = make_loader(dataset, batch_size=max(1, batch_size // count), shuffle=False, device=resolve_device("cpu"),
                         workers=workers if workers is not None else default_workers(len(dataset)))
    probabilities = np.zeros((len(dataset), len(card.class_names)), np.float32)
    done = 0
    for images, _ in loader:
        outputs = forward(views(images, tta).numpy())
        probabilities[done:done + len(images)] = outputs.reshape(count, len(images), -1).mean(axis=0)
        done += len(images)
    return as_predictions(dataset.samples, probabilities, card.class_names, card.task, tta)


def prediction_input(model_file: Path, card: ModelCard, data: str | None, split: str,
                     overrides: dict[str, Any]) -> ImageDataset:
    """The images ``Run.predict`` would read for the same ``data`` and ``split``: the recorded
    data and split settings come from the card instead of config.json."""

    def recorded_splits() -> DataSplits:
        options = recorded_data_options(model_file, card.data, data, overrides)
        splits = load_data(options.pop("spec"), **options)
        return splits.as_multilabel() if card.task == "multilabel" else splits

    return prediction_images(data, split, card.preprocessing.eval_transform(), recorded_splits)
