"""The first convolution's kernels as one picture: what the network looks for in pixels.

Each filter is scaled to its own minimum..maximum before it is drawn. One shared scale
would let the few filters with large weights wash out all the others, and the question
these pictures answer is the *shape* of each filter (edges, colour blobs, noise), not its
size. Kernels with three input channels are drawn in colour, the way they meet an RGB
image; others as one grey tile per input channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from tltk.errors import TltkError
from tltk.model import TransferModel
from tltk.viz.common import resolve_layer, safe_name
from tltk.viz.style import DPI, grid_shape, hide_ticks, new_figure, save_figure, wrap

PAD_VALUE = 255  # white lines between tiles: a black kernel pixel stays distinguishable
MAX_FILTERS = 64
MAX_GREY_FILTERS = 32  # a non-RGB layer draws one row per filter: 32 rows of up to 16 tiles
MAX_CHANNELS = 16


def find_conv(model: TransferModel, layer: str = "conv1") -> tuple[str, nn.Conv2d]:
    """The convolution whose kernels ``layer`` shows: (its module path, the module).

    Named layers point at activations (``conv1`` is the ReLU after the first conv on
    AlexNet, VGG and LeNet, ``pool5`` a max-pool), so a layer without kernels of its own
    shows those of the convolution that feeds it, found by walking back over modules
    without weights (activations, pooling, dropout) and BatchNorm. A block (``layer4``)
    shows its last convolution. A fully-connected layer has no kernels to draw: asking
    for ``fc7`` is an error, never the kernels of some earlier convolution.
    """
    path, module = resolve_layer(model, layer)
    if isinstance(module, nn.Conv2d):
        return path, module
    inside = [(f"{path}.{name}", m) for name, m in module.named_modules() if name and isinstance(m, nn.Conv2d)]
    if inside:
        return inside[-1]
    is_leaf = not any(True for _ in module.children())
    if is_leaf and not any(True for _ in module.parameters(recurse=False)):
        feeding = _conv_feeding(model, module)
        if feeding is not None:
            return feeding
    raise TltkError(
        f"layer '{layer}' ({path}, {type(module).__name__}) holds no convolution and follows none directly, so it has no kernels to draw; "
        "pick a convolutional layer such as conv1."
    )


def _conv_feeding(model: nn.Module, target: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The convolution just before ``target`` in definition order, if only weightless or BatchNorm layers lie between."""
    before: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if module is target:
            break
        before.append((name, module))
    for name, module in reversed(before):
        if isinstance(module, nn.Conv2d):
            return name, module
        has_weights = any(True for _ in module.parameters(recurse=False))
        if has_weights and not isinstance(module, nn.modules.batchnorm._BatchNorm):
            return None
    return None


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
    """The grid drawn pixel for pixel (no smoothing), at a few screen pixels per kernel pixel.

    The figure is at least 7 inches wide so that the title and the description below
    the grid fit whatever the grid's shape (a tall grid of 64 filters x 16 channels, or
    six tiles of 5x5).
    """
    scale = float(np.clip(700.0 / max(grid.shape[:2]), 1.0, 12.0))  # screen pixels per grid pixel
    width_in = max(7.0, grid.shape[1] * scale / DPI + 1.0)
    height_in = grid.shape[0] * scale / DPI + 1.8
    figure, (ax,) = new_figure(width_in, height_in)
    ax.imshow(grid, interpolation="nearest")
    hide_ticks(ax)
    ax.set(title=wrap(title, width_in), xlabel=wrap(description, width_in * 1.2), ylabel="filters, row by row")
    return figure


@dataclass
class FiltersResult:
    """What was drawn, for ``--json`` and for tests."""

    out: Path
    layer: str
    module: str
    shape: tuple[int, ...]  # the whole weight: (out, in, height, width)
    shown: int  # filters in the picture

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "layer": self.layer, "module": self.module, "shape": list(self.shape),
                "shown": self.shown}


def describe(path: str, weight: torch.Tensor, shown: int) -> str:
    """The line under the grid: which module, how many filters, how they are coloured and scaled."""
    out_channels, in_channels, height, width = weight.shape
    which = f"first {shown} of {out_channels}" if shown < out_channels else str(out_channels)
    if in_channels == 3:
        colour = "RGB"
    elif in_channels > MAX_CHANNELS:
        colour = f"first {MAX_CHANNELS} of {in_channels} input channels as grey tiles, one filter per row"
    else:
        colour = f"{in_channels} input channel{'s' if in_channels > 1 else ''} as grey tiles" + (
            ", one filter per row" if in_channels > 1 else "")
    return f"{path}: {which} filters of {height}x{width}, {colour}; each filter scaled to its own min..max"


def write_filters(model: TransferModel, path: str | Path, layer: str = "conv1", title: str = "") -> FiltersResult:
    """Save the filter grid of ``layer`` of ``model`` as a PNG at ``path``.

    At most 64 filters of an RGB layer (32 filters of 16 input channels of another) are
    drawn: beyond that the tiles become too small to read.
    """
    module_path, conv = find_conv(model, layer)
    weight = conv.weight.detach()
    shown = weight[:MAX_FILTERS] if weight.shape[1] == 3 else weight[:MAX_GREY_FILTERS, :MAX_CHANNELS]
    heading = f"{layer} filters" + (f": {title}" if title else "")
    figure = filters_figure(filter_grid(shown), heading, describe(module_path, weight, len(shown)))
    saved = save_figure(figure, path)
    return FiltersResult(saved, layer, module_path, tuple(weight.shape), len(shown))


def visualize_filters(run: str | Path, layer: str = "conv1", out: str | Path | None = None) -> FiltersResult:
    """Write RUN/plots/filters_LAYER.png (or ``out``) from the run's trained weights."""
    from tltk.run import load_run
    from tltk.viz.curves import PLOTS, run_title

    loaded = load_run(run)
    target = Path(out) if out is not None else loaded.path / PLOTS / f"filters_{safe_name(layer)}.png"
    return write_filters(loaded.model, target, layer, run_title(loaded.path))
