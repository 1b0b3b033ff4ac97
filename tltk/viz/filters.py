"""The first convolution's kernels as one picture: what the network looks for in pixels.

Each filter is scaled to its own minimum..maximum before it is drawn. One shared scale
would let the few filters with large weights wash out all the others, and the question
these pictures answer is the *shape* of each filter (edges, colour blobs, noise), not its
size. Kernels with three input channels are drawn in colour, the way they meet an RGB
image; others as one grey tile per input channel.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from tltk.errors import TltkError
from tltk.model import TransferModel
from tltk.viz.activations import resolve_layer
from tltk.viz.style import grid_shape, hide_ticks, new_figure, save_figure

PAD_VALUE = 255  # white lines between tiles: a black kernel pixel stays distinguishable
MAX_FILTERS = 64
MAX_CHANNELS = 16


def find_conv(model: TransferModel, layer: str = "conv1") -> tuple[str, nn.Conv2d]:
    """The convolution behind ``layer``: the layer itself, or the last one before it.

    Named layers point at activations (``conv1`` is the ReLU after the first conv on
    AlexNet, VGG and LeNet), so the kernels are those of the nearest convolution that
    feeds it.
    """
    path, module = resolve_layer(model, layer)
    if isinstance(module, nn.Conv2d):
        return path, module
    last: tuple[str, nn.Conv2d] | None = None
    for name, candidate in model.named_modules():
        if isinstance(candidate, nn.Conv2d):
            last = (name, candidate)
        if candidate is module:
            break
    if last is None:
        raise TltkError(f"layer '{layer}' ({path}) has no convolution at or before it; pick a convolutional layer such as conv1.")
    return last


def normalise_each(weight: np.ndarray) -> np.ndarray:
    """Scale every filter (axis 0) to 0..255 on its own min..max; a constant filter becomes mid-grey."""
    flat = weight.reshape(len(weight), -1).astype(np.float64)
    low = flat.min(axis=1, keepdims=True)
    span = flat.max(axis=1, keepdims=True) - low
    scaled = np.where(span > 0, (flat - low) / np.where(span > 0, span, 1.0) * 255.0, 127.5)
    return np.rint(scaled).astype(np.uint8).reshape(weight.shape)


def filter_tiles(weight: torch.Tensor | np.ndarray) -> tuple[np.ndarray, int | None]:
    """(tiles as N x h x w x 3 uint8, columns): RGB tiles, or one grey tile per input channel.

    For grey tiles ``columns`` is the number of input channels, so each row of the grid
    is one filter; for RGB tiles it is None (a square-ish grid).
    """
    array = weight.detach().float().cpu().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight)
    if array.ndim != 4:
        raise TltkError(f"a convolution's weight has 4 dimensions (out, in, height, width), not shape {tuple(array.shape)}.")
    scaled = normalise_each(array)  # (out, in, h, w)
    if scaled.shape[1] == 3:
        return scaled.transpose(0, 2, 3, 1), None
    grey = scaled.reshape(-1, *scaled.shape[2:])
    return np.repeat(grey[..., None], 3, axis=-1), (scaled.shape[1] if scaled.shape[1] > 1 else None)


def tile_grid(tiles: np.ndarray, columns: int | None = None, pad: int = 1) -> np.ndarray:
    """Tiles (N x h x w x 3) laid row by row into one image, ``pad`` pixels of white around each."""
    count, height, width = tiles.shape[:3]
    rows, cols = grid_shape(count, columns)
    grid = np.full((pad + rows * (height + pad), pad + cols * (width + pad), 3), PAD_VALUE, dtype=np.uint8)
    for index, tile in enumerate(tiles):
        top = pad + (index // cols) * (height + pad)
        left = pad + (index % cols) * (width + pad)
        grid[top : top + height, left : left + width] = tile
    return grid


def filter_grid(weight: torch.Tensor | np.ndarray, pad: int = 1) -> np.ndarray:
    """A conv weight (out, in, h, w) as one H x W x 3 uint8 image, each filter normalised on its own.

    Filter ``i`` of an RGB layer sits in row ``i // columns``, column ``i % columns`` of a
    square-ish grid; its pixel (y, x) is at ``(pad + row*(h+pad) + y, pad + col*(w+pad) + x)``.
    """
    tiles, columns = filter_tiles(weight)
    return tile_grid(tiles, columns, pad)


def filters_figure(grid: np.ndarray, title: str, description: str) -> Figure:
    """The grid drawn pixel for pixel (no smoothing), sized to the number of filters."""
    aspect = grid.shape[1] / grid.shape[0]
    height = float(np.clip(grid.shape[0] / 12.0, 4.0, 10.0))
    figure, (ax,) = new_figure(float(np.clip(height * aspect, 4.0, 14.0)), height + 0.8)
    ax.imshow(grid, interpolation="nearest")
    hide_ticks(ax)
    ax.set(title=title, xlabel=description, ylabel="filters, row by row")
    return figure


def describe(path: str, weight: torch.Tensor, shown: int) -> str:
    out_channels, in_channels, height, width = weight.shape
    which = f"{shown} of {out_channels}" if shown < out_channels else str(out_channels)
    colour = "RGB" if in_channels == 3 else f"{min(in_channels, MAX_CHANNELS)} input channels as grey tiles"
    return f"{path}: {which} filters, {height}x{width}, {colour}; each scaled to its own min..max"


def write_filters(model: TransferModel, path: str | Path, layer: str = "conv1", title: str = "") -> Path:
    """Save the filter grid of ``layer`` of ``model`` as a PNG at ``path``.

    At most 64 filters (and 16 input channels of a non-RGB layer) are drawn: beyond that
    the tiles become too small to read.
    """
    module_path, conv = find_conv(model, layer)
    weight = conv.weight.detach()
    shown = weight[:MAX_FILTERS, :MAX_CHANNELS]
    heading = f"{layer} filters" + (f": {title}" if title else "")
    figure = filters_figure(filter_grid(shown), heading, describe(module_path, weight, len(shown)))
    return save_figure(figure, path)


def safe_name(text: str) -> str:
    """A layer or image name as a file-name part."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "layer"


def visualize_filters(run: str | Path, layer: str = "conv1", out: str | Path | None = None) -> Path:
    """Write RUN/plots/filters_LAYER.png (or ``out``) from the run's trained weights."""
    from tltk.train.evaluate import load_run
    from tltk.viz.curves import PLOTS, run_title

    loaded = load_run(run)
    target = Path(out) if out is not None else loaded.path / PLOTS / f"filters_{safe_name(layer)}.png"
    return write_filters(loaded.model, target, layer, run_title(loaded.path))
