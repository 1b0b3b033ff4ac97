"""``tltk export``: a run's whole model as one ONNX or TorchScript file, proven equal first.

A model file that gives other probabilities than the run is worse than none, and the
difference would surface only in production. So the file is written to a temporary name,
opened again with the runtime that will serve it (onnxruntime, or ``torch.jit.load``), fed
the run's own test images next to the PyTorch model, and moved into place only when no
probability differs by more than ``PARITY_TOLERANCE``; otherwise nothing is written and the
sentence says by how much they differed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tltk.data import ImageDataset
from tltk.deploy.card import ModelCard
from tltk.deploy.files import FORMATS, NumpyForward, ProbabilityModel, open_model, write_model
from tltk.errors import DataError, SettingError, TltkError
from tltk.fileio import atomic_write, user_path
from tltk.run import Run, as_run
from tltk.runtime import Inference, check_batch_size, stream_outputs

# Largest allowed |p_exported - p_pytorch| over every class of every checked image, in fp32.
PARITY_TOLERANCE = 1e-4
DEFAULT_CHECK_IMAGES = 256


class ParityError(TltkError):
    """The exported model does not give the run's probabilities; nothing was written."""


@dataclass(frozen=True)
class Parity:
    """How the exported file compared with the PyTorch model on the same batches."""

    images: int
    max_difference: float
    same_labels: int


@dataclass(frozen=True)
class ExportResult:
    out: Path
    format: str
    split: str
    parity: Parity
    tolerance: float

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "format": self.format, "split": self.split, "images": self.parity.images,
                "max_difference": self.parity.max_difference, "same_labels": self.parity.same_labels,
                "tolerance": self.tolerance}


def export_model(run: str | Path | Run, format: str, out: str | Path, *, split: str = "test",
                 data: str | None = None, check_images: int = DEFAULT_CHECK_IMAGES, batch_size: int = 16,
                 tolerance: float = PARITY_TOLERANCE, **data_overrides: Any) -> ExportResult:
    """Write the run's model (backbone, head, softmax or sigmoid) to ``out`` as ``format``, with
    its class names and preprocessing inside, after the parity check on ``check_images`` images
    of ``split`` (the run's own data unless ``data`` is given) has passed."""
    check_format(format)
    check_batch_size(batch_size)
    if check_images < 1:
        raise SettingError(f"check_images must be at least 1, not {check_images}.", ["check_images"])
    target = user_path(str(out))
    if target.is_dir():
        raise DataError(f"--out {target} is a folder; give the path of the model file to write.")
    loaded = as_run(run)
    card = ModelCard.of_run(loaded.config)
    module = ProbabilityModel(loaded.model.float().cpu(), card.task).eval()
    images = parity_images(loaded, split, data, check_images, data_overrides)
    checked: list[Parity] = []

    def write_and_check(temporary: Path) -> None:
        write_model(module, card, format, temporary)
        forward, _ = open_model(temporary, format, device="cpu")
        parity = compare(module, forward, images, batch_size)
        if not parity.max_difference <= tolerance:  # NaN fails too
            raise ParityError(
                f"the {format} model of {loaded.path} differs from the PyTorch model by up to "
                f"{parity.max_difference:.3g} in probability on {parity.images} {split} images (allowed: "
                f"{tolerance:g}), so {target} was not written; try the other --format.")
        checked.append(parity)

    atomic_write(target, write_and_check)
    return ExportResult(target, format, split, checked[0], tolerance)


def check_format(format: str) -> None:
    if format not in FORMATS:
        raise SettingError(f"format '{format}' is not one of {', '.join(FORMATS)}.", ["format"])


def parity_images(run: Run, split: str, data: str | None, count: int, overrides: dict[str, Any]) -> ImageDataset:
    """The first ``count`` images of a split of the run's data, preprocessed as the run does."""
    dataset, splits = run.split(split, data, **overrides)
    if not len(dataset):
        raise DataError(f"{splits.spec} has no images in its {split} split to check the exported model on; "
                        f"choose another split.")
    return dataset.subset(range(min(count, len(dataset))))


def compare(module: ProbabilityModel, exported: NumpyForward, images: ImageDataset, batch_size: int) -> Parity:
    """Both models on the same fp32 batches, through the one inference path: each image's
    largest probability difference and whether both pick the same top class."""

    def both(batch: torch.Tensor) -> torch.Tensor:
        reference = module(batch).float()
        other = torch.from_numpy(np.asarray(exported(batch.cpu().numpy()), dtype=np.float32))
        difference = (reference - other).abs().amax(dim=1)
        same = (reference.argmax(dim=1) == other.argmax(dim=1)).float()
        return torch.stack([difference, same], dim=1)

    settings = Inference(device="cpu", precision="fp32", channels_last="off", batch_size=batch_size, workers=0)
    rows = torch.cat([outputs for outputs, _ in stream_outputs(module, images, settings, forward=both)])
    return Parity(len(rows), float(rows[:, 0].max()), int(rows[:, 1].sum()))
