"""What a layer responds to: the feature maps of one image, or their average per class.

Layers are named the way the literature names them (``conv1``, ``pool5``, ``fc7``, the
backbone's ``layers``), or by any raw module name the network has. Maps are drawn on
one colour scale shared by all channels, so a channel that stays silent looks dark
instead of being stretched into noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from tltk.errors import DataError, TltkError
from tltk.viz.common import resolve_layer, safe_name, split_dataset, unnormalise
from tltk.viz.style import grid_shape, new_figure, save_figure, wrap


@dataclass
class ActivationResult:
    """What was drawn, for ``--json`` and for tests."""

    out: Path
    layer: str
    module: str
    channels: int
    size: tuple[int, int]
    images: int
    classes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "layer": self.layer, "module": self.module, "channels": self.channels,
                "size": list(self.size), "images": self.images, "classes": self.classes}


# --- capturing ------------------------------------------------------------------------


def capture(model: nn.Module, module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The output of ``module`` when ``model`` sees ``images`` (eval mode, no gradients).

    The output is cloned inside the hook: a following in-place ReLU would otherwise
    rewrite the captured tensor after the fact.
    """
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        tensor = output[0] if isinstance(output, (tuple, list)) else output
        captured.append(tensor.detach().float().clone())

    handle = module.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
        model.train(was_training)
    return captured[0].cpu()


def feature_maps(output: torch.Tensor, layer: str) -> torch.Tensor:
    """Check the layer gave (N, C, H, W) maps; a vector layer has no maps to draw."""
    if output.ndim != 4:
        width = output.shape[-1] if output.ndim else 1
        raise TltkError(
            f"layer '{layer}' gives a {width}-d vector, not feature maps; choose a convolutional layer such as conv1 or pool5."
        )
    return output


def class_average_maps(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int, layer: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean maps per class as K x C x H x W, image count per class) over ``batches`` of
    (captured maps, targets).

    Sums are kept per class as batches stream by, so memory is one layer's maps per class
    whatever the number of images.
    """
    sums: torch.Tensor | None = None
    counts = torch.zeros(num_classes, dtype=torch.long)
    for captured, targets in batches:
        maps = feature_maps(captured, layer).double()
        if sums is None:
            sums = torch.zeros(num_classes, *maps.shape[1:], dtype=torch.float64)
        sums.index_add_(0, targets.long(), maps)
        counts += torch.bincount(targets.long(), minlength=num_classes)
    if sums is None:
        raise DataError("there are no images to average; check --data, --split and --classes.")
    means = sums / counts.clamp(min=1).view(-1, 1, 1, 1)
    return means.float(), counts


# --- drawing --------------------------------------------------------------------------


def mosaic(tiles: np.ndarray, pad: int = 1) -> np.ndarray:
    """Tiles (rows x columns x h x w) as one 2-D float image, NaN between tiles (drawn blank)."""
    rows, cols, height, width = tiles.shape
    grid = np.full((pad + rows * (height + pad), pad + cols * (width + pad)), np.nan)
    for r in range(rows):
        for c in range(cols):
            top, left = pad + r * (height + pad), pad + c * (width + pad)
            grid[top : top + height, left : left + width] = tiles[r, c]
    return grid


def square_tiles(maps: np.ndarray) -> np.ndarray:
    """C maps (C x h x w) arranged as a near-square rows x columns block, NaN-filled at the end."""
    rows, cols = grid_shape(len(maps))
    block = np.full((rows * cols, *maps.shape[1:]), np.nan)
    block[: len(maps)] = maps
    return block.reshape(rows, cols, *maps.shape[1:])


def image_maps_figure(picture: np.ndarray, maps: np.ndarray, title: str, description: str) -> Figure:
    """The input image on the left, its maps on one shared colour scale on the right."""
    grid = mosaic(square_tiles(maps))
    figure, (left, right) = new_figure(12.0, 6.0, cols=2)
    left.imshow(picture, interpolation="nearest")
    left.set(title="input (as the model sees it)", xlabel="x (pixels)", ylabel="y (pixels)")
    shown = right.imshow(grid, cmap="viridis", interpolation="nearest")
    right.set(title=wrap(title, 4.5), xlabel=wrap(description, 5.5), ylabel="channels, row by row")
    right.set_xticks([])
    right.set_yticks([])
    figure.colorbar(shown, ax=right, label="activation")
    return figure


def class_maps_figure(means: np.ndarray, channels: Sequence[int], class_names: Sequence[str], title: str) -> Figure:
    """Rows are classes, columns channels; ticks name both."""
    tiles = means[:, list(channels)]
    grid = mosaic(tiles)
    rows, cols, height, width = tiles.shape
    figure, (ax,) = new_figure(float(np.clip(2 + cols * 0.9, 6, 16)), float(np.clip(1.5 + rows * 0.9, 4, 14)))
    shown = ax.imshow(grid, cmap="viridis", interpolation="nearest")
    ax.set_xticks([1 + c * (width + 1) + width / 2 - 0.5 for c in range(cols)], [str(c) for c in channels])
    ax.set_yticks([1 + r * (height + 1) + height / 2 - 0.5 for r in range(rows)], list(class_names))
    ax.set(title=wrap(title, figure.get_figwidth()), xlabel="channel (those whose class averages differ most)",
           ylabel="class (images averaged)")
    figure.colorbar(shown, ax=ax, label="mean activation")
    return figure


def most_different_channels(means: torch.Tensor, count: int) -> list[int]:
    """The channels whose class-average maps differ most between classes, in channel order.

    These are the ones worth looking at: a channel that looks the same for every class
    says nothing about what separates them.
    """
    spread = means.double().var(dim=0, unbiased=False).sum(dim=(1, 2)) if len(means) > 1 else means[0].abs().sum(dim=(1, 2))
    top = torch.argsort(spread, descending=True, stable=True)[:count]
    return sorted(int(c) for c in top)


# --- commands -------------------------------------------------------------------------


def _at_least_one(option: str, value: int) -> None:
    if value < 1:
        raise TltkError(f"{option} must be at least 1, not {value}.")


def image_activations(
    run: str | Path, image: str | Path, layer: str, *, out: str | Path | None = None, max_maps: int = 64,
    device: str = "auto",
) -> ActivationResult:
    """Write the feature maps of one image at ``layer`` of a run as a grid PNG."""
    from tltk.data import load_image
    from tltk.run import load_run
    from tltk.runtime import resolve_device
    from tltk.viz.curves import PLOTS, run_title

    _at_least_one("--max-maps", max_maps)
    source = Path(image).expanduser()
    if not source.is_file():
        raise DataError(f"image {source} does not exist; pass the path of an image file.")
    loaded = load_run(run)
    module_path, module = resolve_layer(loaded.model, layer)
    pre = loaded.preprocessing
    tensor = pre.eval_transform()(load_image(source))
    loaded.model.to(resolve_device(device))
    maps = feature_maps(capture(loaded.model, module, tensor.unsqueeze(0).to(resolve_device(device))), layer)[0]
    shown = maps[:max_maps].numpy()
    which = f"first {len(shown)} of {maps.shape[0]}" if len(shown) < maps.shape[0] else str(maps.shape[0])
    figure = image_maps_figure(
        unnormalise(tensor, pre.mean, pre.std), shown,
        f"{layer} activations of {source.name}: {run_title(loaded.path)}",
        f"{module_path}: {which} channels of {maps.shape[1]}x{maps.shape[2]}",
    )
    target = Path(out) if out else loaded.path / PLOTS / f"activations_{safe_name(layer)}_{safe_name(source.stem)}.png"
    save_figure(figure, target)
    return ActivationResult(target, layer, module_path, int(maps.shape[0]), (int(maps.shape[1]), int(maps.shape[2])), 1)


def class_average_activations(
    run: str | Path, layer: str, data: str | None = None, split: str = "test", *, out: str | Path | None = None,
    per_class: int | None = 32, max_maps: int = 16, device: str = "auto", batch_size: int = 64,
    **data_overrides: Any,
) -> ActivationResult:
    """Write the maps at ``layer`` averaged over the images of each class (rows) as a PNG.

    ``per_class`` caps the images per class (the first ones of the split), which keeps
    the average cheap on big datasets while still smoothing away single images.
    """
    from tltk.run import load_run
    from tltk.runtime import stream_outputs
    from tltk.viz.curves import PLOTS, run_title

    _at_least_one("--max-maps", max_maps)
    if per_class is not None:
        _at_least_one("--per-class", per_class)
    loaded = load_run(run)
    module_path, module = resolve_layer(loaded.model, layer)
    dataset, spec = split_dataset(loaded, data, split, per_class=per_class, **data_overrides)
    captured = stream_outputs(loaded.model, dataset, loaded.inference(device, batch_size),
                              forward=lambda images: capture(loaded.model, module, images))
    means, counts = class_average_maps(captured, len(loaded.class_names), layer)
    present = [i for i, n in enumerate(counts.tolist()) if n > 0]
    channels = most_different_channels(means[present], max_maps)
    names = [f"{loaded.class_names[i]} ({int(counts[i])})" for i in present]
    figure = class_maps_figure(
        means[present].numpy(), channels, names,
        f"{layer} ({module_path}) averaged per class on {spec} {split}: {run_title(loaded.path)}",
    )
    target = Path(out) if out else loaded.path / PLOTS / f"activations_{safe_name(layer)}_class_average_{split}.png"
    save_figure(figure, target)
    return ActivationResult(
        target, layer, module_path, int(means.shape[1]), (int(means.shape[2]), int(means.shape[3])),
        int(counts.sum()), [loaded.class_names[i] for i in present],
    )
