"""Shipping a run's model: one ONNX or TorchScript file that needs no tltk to run.

Not to be confused with ``tltk.export``, whose exporters write a run's *predictions* (a
Kaggle CSV, JSONL): this package writes the *model* (``tltk export RUN --format onnx``),
checks it against the run before it counts as written, and predicts with an ONNX file
(``tltk predict model.onnx``).
"""

from tltk.deploy.card import ModelCard
from tltk.deploy.files import FORMATS, open_model
from tltk.deploy.predict import export_predictions, predict, predict_onnx
from tltk.deploy.write import PARITY_TOLERANCE, ExportResult, ParityError, export_model

__all__ = ["FORMATS", "PARITY_TOLERANCE", "ExportResult", "ModelCard", "ParityError", "export_model", "open_model",
           "export_predictions", "predict", "predict_onnx"]
