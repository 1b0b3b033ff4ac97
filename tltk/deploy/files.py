"""The two file formats a model is shipped in, written and opened again.

ONNX goes through ``torch.onnx.export`` with ``dynamo=True``: the exporter built on
``torch.export`` and onnxscript, which is PyTorch's default and maintained path (the
TorchScript-based one warns that it will be removed). It needs nothing from the network:
onnxscript ships the operator translations, so it works offline. The graph is saved as a
single file (no external weights), which ONNX allows up to 2 GB.

TorchScript is ``torch.jit.trace``: every tltk backbone's forward pass is the same
sequence of operations for every batch, which is what tracing records, and a traced module
needs none of tltk's Python code to run.

Both files hold the whole model (backbone and head) followed by the softmax (or the
per-class sigmoid of a multi-label run), take a batch of any size, and carry the
``ModelCard``.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from tltk.deploy.card import INPUT, OUTPUT, TORCHSCRIPT_CARD, ModelCard
from tltk.errors import DataError, SettingError, require

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 18
# Forward of an opened model file: a (N, 3, H, W) float32 batch to (N, classes) probabilities.
NumpyForward = Callable[[np.ndarray], np.ndarray]


class ProbabilityModel(nn.Module):
    """A run's model with its output turned into probabilities, as predictions report them."""

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.model = model
        self.multilabel = task == "multilabel"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(images)
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)


def example_batch(card: ModelCard) -> torch.Tensor:
    """Two images of the model's input size: more than one, so nothing specialises the
    batch axis to a single image."""
    height, width = card.preprocessing.input_size
    return torch.zeros(2, 3, int(height), int(width))


def write_model(module: ProbabilityModel, card: ModelCard, format: str, path: Path) -> None:
    """Write ``module`` with ``card`` to ``path`` in ``format`` (onnx or torchscript)."""
    if format == "onnx":
        write_onnx(module, card, path)
    else:
        write_torchscript(module, card, path)


def write_onnx(module: ProbabilityModel, card: ModelCard, path: Path) -> None:
    onnx = require("onnx", "deploy")
    require("onnxscript", "deploy")  # what torch's exporter translates operators with

    batch = torch.export.Dim("batch")
    quiet = io.StringIO()  # the exporter prints its progress; tltk reports the outcome itself
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), torch.no_grad():
        program = torch.onnx.export(module, (example_batch(card),), None, dynamo=True, verbose=False,
                                    input_names=[INPUT], output_names=[OUTPUT], opset_version=ONNX_OPSET,
                                    dynamic_shapes=({0: batch},))
    proto = program.model_proto
    for key, value in card.to_strings().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


@contextlib.contextmanager
def torchscript_quietly() -> Iterator[None]:
    """PyTorch marks ``torch.jit`` as deprecated in favour of ``torch.export``, on every call;
    TorchScript files are still what many servers load, so tltk writes them without the noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        yield


def write_torchscript(module: ProbabilityModel, card: ModelCard, path: Path) -> None:
    with torch.no_grad(), torchscript_quietly():
        traced = torch.jit.trace(module, example_batch(card), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_CARD: json.dumps(card.to_strings())})


def open_model(path: Path, format: str, device: str = "cpu") -> tuple[NumpyForward, ModelCard]:
    """A model file as a numpy forward function and its card."""
    return open_onnx(path, device) if format == "onnx" else open_torchscript(path)


def open_onnx(path: Path, device: str = "cpu") -> tuple[NumpyForward, ModelCard]:
    """An ONNX file in onnxruntime; a file that is not ONNX is one sentence."""
    onnxruntime = require("onnxruntime", "deploy")

    try:
        session = onnxruntime.InferenceSession(str(path), providers=onnx_providers(device))
    except Exception as exc:  # onnxruntime raises its own types for an unreadable graph
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise DataError(f"{path} is not an ONNX model file ({first}); pass a file written by "
                        f"`tltk export RUN --format onnx`, or a run directory.") from exc
    card = ModelCard.from_strings(session.get_modelmeta().custom_metadata_map, str(path))
    input_name = session.get_inputs()[0].name

    def forward(images: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: np.ascontiguousarray(images, dtype=np.float32)})[0]

    return forward, card


def onnx_providers(device: str) -> list[str]:
    """onnxruntime's execution providers for a tltk device: CUDA where asked for (or, with
    auto, where the installed onnxruntime has it), the CPU otherwise."""
    onnxruntime = require("onnxruntime", "deploy")

    available = onnxruntime.get_available_providers()
    if device == "cpu" or (device == "auto" and "CUDAExecutionProvider" not in available):
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise SettingError(f"device {device} was asked for but this onnxruntime has no CUDA provider; use device cpu.",
                           ["device"])
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def open_torchscript(path: Path) -> tuple[NumpyForward, ModelCard]:
    extra = {TORCHSCRIPT_CARD: ""}
    try:
        with torchscript_quietly():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise DataError(f"{path} is not a TorchScript model file ({type(exc).__name__}); pass a file written by "
                        f"`tltk export RUN --format torchscript`.") from exc
    card = ModelCard.from_strings(json.loads(extra[TORCHSCRIPT_CARD] or "{}"), str(path))
    module.eval()

    def forward(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))).numpy()

    return forward, card
