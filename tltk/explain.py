"""Why a model decided: class activation maps over its input images (Grad-CAM and kin).

A class activation map weighs the channels of one convolutional layer by how much each
pushes the score of one class (the gradient for Grad-CAM and Grad-CAM++, the score of the
channel-masked image for Score-CAM, the first principal component of the channels for
Eigen-CAM, which does not depend on the class) and sums them into one spatial map. The
methods are the ``grad-cam`` package's; what is tltk's is which layer, which classes,
which images, and the map's place over the picture.

The default layer is the backbone's last convolutional map (``pool5``, what the head
reads), unless the run's input size shrinks it to a single pixel, where the map would say
nothing, or the backbone does not name one (a timm CNN); then the last ``Conv2d`` in the
network whose output is still a map. Sequence backbones read an image as rows
of time steps and have no spatial map to weigh, so they are refused.

Maps are returned at each image's own size (the model's input is the image resized to
the run's input size, so the map is resized back) and scaled to 0..1 per map, as the
package scales them: the map says where, not how much.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from tltk.backbones.base import Preprocessing
from tltk.data import load_image
from tltk.errors import DataError, SettingError, TltkError, require
from tltk.layers import available_layers, backbone_of, layer_shapes, resolve_layer
from tltk.runtime import resolve_device
from tltk.tta import probabilities

METHODS = ("gradcam", "gradcam++", "scorecam", "eigencam")
DEFAULT_THRESHOLD = 0.5
# Images (times explained classes) per backward pass: memory holds this many images' activations and gradients.
CAM_BATCH = 16
ImageInput = str | Path | Image.Image


@dataclass
class Explanation:
    """One class's map over one image: ``heatmap`` is H x W in 0..1, the size of ``image``
    (H x W x 3, uint8 RGB as loaded); ``position`` is the image's place in the input."""

    position: int
    source: str
    image: np.ndarray
    class_name: str
    class_index: int
    probability: float
    heatmap: np.ndarray
    layer: str
    method: str

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.source, "class": self.class_name, "probability": self.probability,
                "layer": self.layer, "method": self.method, "size": list(self.heatmap.shape)}


@dataclass(frozen=True)
class MapSettings:
    """Which maps to make: at ``layer`` (None: the default one, see ``default_layer``), for
    ``class_name`` (None: each predicted class, a multi-label model's at ``threshold``), by
    ``method`` (one of ``METHODS``)."""

    layer: str | None = None
    class_name: str | None = None
    method: str = "gradcam"
    threshold: float = DEFAULT_THRESHOLD


def explain_images(
    model: nn.Module,
    images: Sequence[ImageInput],
    class_names: Sequence[str],
    preprocessing: Preprocessing,
    task: str = "multiclass",
    *,
    maps: MapSettings = MapSettings(),
    device: str = "auto",
) -> list[Explanation]:
    """Maps for each image: for ``maps.class_name`` if given, else for the predicted class
    (each predicted label at ``maps.threshold`` for a multi-label model, the most probable
    one where none reaches it). In image order, then class order."""
    method, threshold = maps.method, maps.threshold
    check_method(method)
    layer_name = maps.layer if maps.layer is not None else default_layer(model, preprocessing)
    check_spatial(model, layer_name, preprocessing)
    asked = class_index(maps.class_name, class_names) if maps.class_name is not None else None
    pictures = [(name_of(image), as_rgb(image)) for image in images]
    if not pictures:
        raise DataError("there are no images to explain; pass at least one image file.")
    target = resolve_device(device)
    batch = torch.stack([preprocessing.eval_transform()(picture) for _, picture in pictures]).to(target)
    model.to(target).eval()
    probabilities = predict_probabilities(model, batch, task)
    chosen = [[asked] if asked is not None else explained_classes(row, task, threshold) for row in probabilities]
    rows = [(i, c) for i, classes in enumerate(chosen) for c in classes]
    module = resolve_layer(model, layer_name).module
    heatmaps = np.concatenate([class_activation_maps(model, module, batch[[i for i, _ in part]], [c for _, c in part], method)
                           for part in chunks(rows, CAM_BATCH)])
    explanations = []
    for (i, c), heatmap in zip(rows, heatmaps):
        source, picture = pictures[i]
        explanations.append(Explanation(i, source, np.asarray(picture), class_names[c], c,
                                        float(probabilities[i, c]), resize_map(heatmap, picture.size[::-1]),
                                        layer_name, method))
    return explanations


def chunks(rows: list[tuple[int, int]], size: int) -> list[list[tuple[int, int]]]:
    return [rows[start:start + size] for start in range(0, len(rows), size)]


def check_method(method: str) -> None:
    if method not in METHODS:
        raise SettingError(f"method '{method}' is not one of {', '.join(METHODS)}.", ["method"])


def class_index(name: str, class_names: Sequence[str]) -> int:
    if name not in class_names:
        shown = ", ".join(class_names[:20]) + (", ..." if len(class_names) > 20 else "")
        raise DataError(f"the run has no class '{name}'; its classes are {shown}.")
    return list(class_names).index(name)


def name_of(image: ImageInput) -> str:
    return str(image) if isinstance(image, (str, Path)) else "image"


def as_rgb(image: ImageInput) -> Image.Image:
    """An image file decoded as the data readers decode it (upright, RGB), or a PIL image as RGB."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image).expanduser()
    if not path.is_file():
        raise DataError(f"image {path} does not exist; pass the path of an image file.")
    return load_image(path)


# --- which layer ------------------------------------------------------------------------


def default_layer(model: nn.Module, preprocessing: Preprocessing) -> str:
    """``pool5`` where the backbone names it and its map is more than one pixel at the run's
    input size; otherwise the last ``Conv2d`` of the network whose map is (its path inside the
    network): a 1x1 convolution after global pooling, as MobileNetV3's head has, is no map."""
    backbone = backbone_of(model)
    convolutions = [path for path, module in backbone.net.named_modules() if isinstance(module, nn.Conv2d)]
    if not convolutions:
        raise TltkError(
            f"{backbone.name} reads an image as a sequence of rows and has no convolutional layer, so there is no "
            f"spatial map for a class activation map to weigh; explain a run with a CNN backbone.")
    candidates = (["pool5"] if "pool5" in available_layers(model) else []) + convolutions[::-1]
    infos = layer_shapes(model, candidates, tuple(preprocessing.input_size))
    return next((info.name for info in infos if pixels(info.shape) > 1), candidates[0])


def map_size(model: nn.Module, layer: str, preprocessing: Preprocessing) -> int:
    """Pixels in ``layer``'s output map per channel (0 for an output that is not a map)."""
    return pixels(layer_shapes(model, [layer], tuple(preprocessing.input_size))[0].shape)


def pixels(shape: tuple[int, ...] | None) -> int:
    """Pixels per channel of a per-image (C, H, W) shape; 0 for anything that is not a map."""
    return int(shape[1] * shape[2]) if shape is not None and len(shape) == 3 else 0


def check_spatial(model: nn.Module, layer: str, preprocessing: Preprocessing) -> None:
    """A layer whose output is a vector (fc7, logits) has no place to point at."""
    resolve_layer(model, layer)  # an unknown name lists the named layers
    if map_size(model, layer, preprocessing) == 0:
        raise TltkError(f"layer '{layer}' outputs a vector, not a spatial map, so a class activation map cannot be "
                        f"drawn from it; choose a convolutional layer such as pool5 or leave --layer out.")


# --- which classes ----------------------------------------------------------------------


def predict_probabilities(model: nn.Module, batch: torch.Tensor, task: str) -> np.ndarray:
    with torch.inference_mode():
        return probabilities(model(batch), task).cpu().numpy()


def explained_classes(probabilities: np.ndarray, task: str, threshold: float) -> list[int]:
    """The predicted class; for multi-label, every label at ``threshold`` (the top one if none is)."""
    if task == "multilabel":
        predicted = [int(i) for i in np.flatnonzero(probabilities >= threshold)]
        if predicted:
            return predicted
    return [int(np.argmax(probabilities))]


# --- the maps ---------------------------------------------------------------------------


def cam_class(method: str) -> Callable[..., Any]:
    cams = require("pytorch_grad_cam", "explain")
    return {"gradcam": cams.GradCAM, "gradcam++": cams.GradCAMPlusPlus, "scorecam": cams.ScoreCAM,
            "eigencam": cams.EigenCAM}[method]


def class_activation_maps(model: nn.Module, layer: nn.Module, batch: torch.Tensor, classes: Sequence[int],
                          method: str) -> np.ndarray:
    """(N, H, W) maps in 0..1 at the batch's size, image i for class ``classes[i]``.

    The input carries a gradient so that a frozen backbone (no parameter asks for one) still
    gives its activations one; the package's progress bars (Score-CAM) are kept off the
    terminal.
    """
    target_of = require("pytorch_grad_cam.utils.model_targets", "explain").ClassifierOutputTarget
    cam = cam_class(method)(model=model, target_layers=[layer])
    cam.batch_size = 32  # Score-CAM's masked images per forward pass
    inputs = batch.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad(), contextlib.redirect_stderr(io.StringIO()):
            maps = cam(input_tensor=inputs, targets=[target_of(c) for c in classes])
    finally:
        cam.activations_and_grads.release()
    return np.asarray(maps, dtype=np.float32)


def resize_map(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map resized (bilinear) to ``size`` (height, width), kept within 0..1."""
    tensor = torch.from_numpy(np.ascontiguousarray(heatmap, dtype=np.float32))[None, None]
    resized = torch.nn.functional.interpolate(tensor, size=tuple(int(v) for v in size), mode="bilinear",
                                              align_corners=False)
    return resized[0, 0].clamp(0, 1).numpy()


__all__ = ["METHODS", "Explanation", "class_activation_maps", "default_layer", "explain_images"]
