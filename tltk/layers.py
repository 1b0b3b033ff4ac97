"""Named layer taps: features from ``conv1``, ``pool5``, ``fc6``, ``fc7``, ``logits`` or any module.

The literature names layers by role (``fc7`` is the second fully-connected layer after its
ReLU), not by where a library happened to put them (``classifier.4`` in torchvision's VGG,
``classifier.5`` in its AlexNet). Each backbone maps those names to module paths inside
``backbone.net`` (``Backbone.layers``); a ``TransferModel`` adds ``logits`` (its head). Any
other module is reachable by its raw path, relative to ``backbone.net`` (``layer3``,
``features.28``) or to the whole model (``backbone.net.layer3``, ``head``).

A tap hooks the module, reduces the output to one vector per image at once (so that a
later in-place operation, such as the ReLU after a BatchNorm, cannot change what was
captured) and stops the forward pass there, since nothing after the tapped layer is needed.

Output shapes are found by running one blank image through the network. ``list_layers``
builds the network on PyTorch's ``meta`` device, where tensors carry shapes but no data,
so listing VGG-16's layers allocates none of its 138M weights and computes nothing.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from tltk.backbones.base import SIZE_ERRORS, Backbone, check_size_option, unusable_input_size
from tltk.errors import SettingError, TltkError

POOLINGS = ("avg", "max", "flatten")
LOGITS = "logits"
HEAD_PATH = "head"


@dataclass(frozen=True)
class ResolvedLayer:
    """A layer name as typed, the module it names, and its path for messages and manifests."""

    name: str
    path: str
    module: nn.Module


@dataclass(frozen=True)
class LayerInfo:
    """One layer: its name, module path, module type and output shape per image (None: it did not run)."""

    name: str
    path: str
    kind: str
    shape: tuple[int, ...] | None

    def dim(self, pool: str = "avg") -> int | None:
        """The length of the vector this layer gives under ``pool``."""
        return pooled_dim(self.shape, pool) if self.shape is not None else None


# --- which layers a model has ----------------------------------------------------------


def backbone_of(model: nn.Module) -> Backbone:
    """The backbone of a TransferModel, or the backbone itself."""
    if isinstance(model, Backbone):
        return model
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, Backbone):
        return backbone
    raise TltkError(f"a {type(model).__name__} has no tltk backbone; pass a Backbone or a TransferModel.")


def available_layers(model: nn.Module) -> dict[str, str]:
    """Named layers to module paths: ``conv1``/``pool5``/``fc6``/``fc7`` as the backbone has
    them (paths relative to ``backbone.net``), plus ``logits`` (``head``) for a model with a head.
    """
    layers = dict(backbone_of(model).layers)
    if _head_of(model) is not None:
        layers[LOGITS] = HEAD_PATH
    return layers


def module_paths(model: nn.Module) -> list[str]:
    """Every raw module path inside ``backbone.net``, in definition order."""
    return [name for name, _ in backbone_of(model).net.named_modules() if name]


def resolve_layer(model: nn.Module, layer: str) -> ResolvedLayer:
    """The module a layer name means; an unknown name is an error listing the named layers."""
    name = layer.strip()
    named = available_layers(model)
    if name in named:
        module = _find_module(model, named[name])
        if module is None:  # a backbone whose ``layers`` points at nothing is a bug in it
            raise TltkError(f"backbone '{backbone_of(model).name}' maps layer '{name}' to '{named[name]}', which it lacks.")
        return ResolvedLayer(name, named[name], module)
    module = _find_module(model, name) if name else None
    if module is None or module is model:
        raise TltkError(_unknown_layer_message(model, layer, named))
    return ResolvedLayer(name, name, module)


def _head_of(model: nn.Module) -> nn.Module | None:
    head = getattr(model, HEAD_PATH, None)
    return head if isinstance(head, nn.Module) and not isinstance(model, Backbone) else None


def _find_module(model: nn.Module, path: str) -> nn.Module | None:
    """``path`` relative to ``backbone.net`` first, then to the model itself."""
    for root in (backbone_of(model).net, model):
        try:
            return root.get_submodule(path)
        except AttributeError:
            continue
    return None


def _unknown_layer_message(model: nn.Module, layer: str, named: dict[str, str]) -> str:
    backbone = backbone_of(model)
    close = difflib.get_close_matches(layer, list(named) + module_paths(model), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    listed = ", ".join(named) if named else "none"
    no_head = "" if LOGITS in named else f" ({LOGITS} needs a head: extract from a run directory)"
    return (
        f"{backbone.name} has no layer '{layer}'; its named layers are {listed}{no_head}, and any module path "
        f"inside the network works too (`tltk layers --backbone {backbone.name} --all` lists them).{hint}"
    )


# --- reducing a layer's output to one vector per image ----------------------------------


def check_pool(pool: str) -> str:
    if pool not in POOLINGS:
        raise SettingError(f"pool '{pool}' is not one of {', '.join(POOLINGS)}.", ["pool"])
    return pool


def pool_features(output: torch.Tensor, pool: str) -> torch.Tensor:
    """(N, ...) layer output -> (N, D) float32, a new tensor that owns its memory.

    A 4-D map (N, C, H, W) is averaged or maxed over H and W, or flattened; a 3-D token map
    (N, T, D) of a vision transformer (or a recurrent net's per-step states) is averaged or
    maxed over its tokens, or flattened; a 2-D output is already one vector per image.
    """
    check_pool(pool)
    if output.ndim <= 2:
        return output.reshape(output.shape[0], -1).float().clone()
    if pool == "flatten":
        return output.flatten(1).float().clone()
    dims = (1,) if output.ndim == 3 else tuple(range(2, output.ndim))
    reduced = output.mean(dim=dims) if pool == "avg" else output.amax(dim=dims)
    return reduced.float()


def pooled_dim(shape: tuple[int, ...], pool: str) -> int:
    """The vector length ``pool_features`` gives for a per-image output ``shape``."""
    if len(shape) <= 1 or pool == "flatten":
        size = 1
        for n in shape:
            size *= n
        return size
    return shape[-1] if len(shape) == 2 else shape[0]


# --- the tap --------------------------------------------------------------------------


class _Captured(Exception):
    """Raised by the hook once it has the features: the rest of the forward pass is not needed."""


class LayerTap:
    """Features of one layer for a batch of images: ``with tap(model, "fc7") as f: f(images)``.

    While open, the model is in eval mode (dropout off, BatchNorm statistics fixed) and
    the tapped module carries a forward hook; both are undone on exit. If the module runs
    more than once in a forward pass (a shared activation), the first call is the one tapped.
    """

    def __init__(self, model: nn.Module, layer: str, pool: str = "avg") -> None:
        self.model = model
        self.layer = resolve_layer(model, layer)
        self.pool = check_pool(pool)
        self._run = _runner_for(model, self.layer.module)
        self._handle: Any = None
        self._was_training = model.training
        self._features: torch.Tensor | None = None

    def __enter__(self) -> "LayerTap":
        self._was_training = self.model.training
        self.model.eval()
        self._handle = self.layer.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.model.train(self._was_training)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, D) float32 features of ``images`` at the tapped layer, without autograd."""
        if self._handle is None:
            raise RuntimeError("LayerTap must be used inside a `with` block")
        self._features = None
        with torch.inference_mode():
            try:
                self._run(images)
            except _Captured:
                pass
        if self._features is None:
            raise TltkError(
                f"layer '{self.layer.name}' ({self.layer.path}) did not run in the forward pass of "
                f"{backbone_of(self.model).name}; choose a layer the network uses."
            )
        return self._features

    def _hook(self, _module: nn.Module, _inputs: object, output: object) -> None:
        if self._features is not None:
            return
        tensor = _first_tensor(output, self.layer)
        self._features = pool_features(tensor, self.pool)
        raise _Captured


def tap(model: nn.Module, layer: str, pool: str = "avg") -> LayerTap:
    """A context manager giving a function from images to that layer's pooled features."""
    return LayerTap(model, layer, pool)


def check_input_size(model: nn.Module, size: Sequence[int]) -> None:
    """One blank image of ``size`` through the whole ``model`` (in eval mode, nothing updated).

    A size the layers cannot take is then refused in one sentence before a run writes
    anything, instead of surfacing as a matrix-shape error inside the first training step.
    """
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(blank_image(model, size))
    except SIZE_ERRORS as exc:
        raise unusable_input_size(backbone_of(model), size, exc) from exc
    finally:
        model.train(was_training)


def check_layer_runs(model: nn.Module, layer: str, size: Sequence[int]) -> None:
    """One blank image of ``size`` through ``model`` up to ``layer``, stopping there as
    extraction does: a size the layers before it cannot take is refused in one sentence,
    while a size that only later layers refuse stays usable for this one."""
    try:
        with tap(model, layer) as features:
            features(blank_image(model, size))
    except SIZE_ERRORS as exc:
        raise unusable_input_size(backbone_of(model), size, exc) from exc


def blank_image(model: nn.Module, size: Sequence[int]) -> torch.Tensor:
    """One all-zero RGB image of ``size`` where ``model``'s weights are (the CPU if it has none)."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    return torch.zeros(1, 3, int(size[0]), int(size[1]), device=device)


def _runner_for(model: nn.Module, module: nn.Module) -> Callable[[torch.Tensor], Any]:
    """Backbone layers run through the backbone alone (so ``fc7`` works whatever the head
    reads); the head's layers need the whole model."""
    backbone = backbone_of(model)
    if any(m is module for m in backbone.modules()):
        return backbone
    return model


def _first_tensor(output: object, layer: ResolvedLayer) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TltkError(
        f"layer '{layer.name}' ({layer.path}) outputs a {type(output).__name__}, not a tensor; "
        f"tap one of its submodules instead."
    )


# --- shapes ---------------------------------------------------------------------------


def layer_shapes(
    model: nn.Module, layers: Iterable[str] | None = None, input_size: tuple[int, int] | None = None
) -> list[LayerInfo]:
    """Each layer's output shape per image, from one forward pass of a blank image.

    ``layers`` defaults to the named layers; ``input_size`` to the backbone's own, since
    spatial shapes (and whether a fixed-size network runs at all) depend on it. A model
    built on the ``meta`` device is run there, which costs no computation.
    """
    names = list(available_layers(model) if layers is None else layers)
    resolved = [resolve_layer(model, name) for name in names]
    size = tuple(input_size or backbone_of(model).preprocessing.input_size)
    shapes: dict[int, tuple[int, ...] | None] = {}
    handles = [r.module.register_forward_hook(_shape_recorder(shapes, i)) for i, r in enumerate(resolved)]
    was_training = model.training
    model.eval()
    try:
        _dry_run(model, resolved, size)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [LayerInfo(r.name, r.path, type(r.module).__name__, shapes.get(i)) for i, r in enumerate(resolved)]


def _shape_recorder(shapes: dict[int, tuple[int, ...] | None], key: int) -> Callable[..., None]:
    def record(_module: nn.Module, _inputs: object, output: object) -> None:
        if key not in shapes:
            tensor = output if isinstance(output, torch.Tensor) else None
            if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
                tensor = output[0]
            shapes[key] = tuple(tensor.shape[1:]) if tensor is not None else None

    return record


def _dry_run(model: nn.Module, resolved: list[ResolvedLayer], size: tuple[int, ...]) -> None:
    images = blank_image(model, size)
    runners = {id(r): r for r in (_runner_for(model, layer.module) for layer in resolved)}
    try:
        with torch.inference_mode():
            for run in runners.values():
                run(images)
    except SIZE_ERRORS as exc:
        raise unusable_input_size(backbone_of(model), size, exc) from exc


# --- the table `tltk layers` prints -----------------------------------------------------


def list_layers(
    backbone: str,
    *,
    all_modules: bool = False,
    input_size: int | tuple[int, int] | None = None,
    backbone_options: dict[str, Any] | None = None,
    num_classes: int | None = None,
) -> list[dict[str, Any]]:
    """The rows of ``tltk layers --backbone NAME``: each named layer with its output shape.

    Each row has ``layer`` (the name to pass to --layer), ``module`` (its path inside the
    network), ``type``, ``shape`` (per image) and ``dim`` (the vector length with the
    default ``--pool avg``; ``flatten_dim`` with ``--pool flatten``). ``logits`` is the
    head's output, so its size is the number of classes of a run; with ``num_classes``
    a linear head of that size is attached and measured. ``all_modules`` adds every raw
    module of the network after the named layers. Built without weights, on the meta
    device where the network allows it.
    """
    if isinstance(input_size, int):
        check_size_option(input_size)
    try:
        with torch.device("meta"):
            return _layer_rows(backbone, all_modules, input_size, backbone_options or {}, num_classes)
    except Exception:  # an operation without a meta kernel, or a real error: the real network says which
        return _layer_rows(backbone, all_modules, input_size, backbone_options or {}, num_classes)


def _layer_rows(
    backbone: str, all_modules: bool, input_size: int | tuple[int, int] | None, options: dict[str, Any],
    num_classes: int | None,
) -> list[dict[str, Any]]:
    model = _bare_model(backbone, options, num_classes)
    size = (input_size, input_size) if isinstance(input_size, int) else input_size
    named = list(available_layers(model))
    raw = [p for p in module_paths(model) if p not in named] if all_modules else []
    rows = [_row(info) for info in layer_shapes(model, named + raw, size)]
    if num_classes is None:
        rows.insert(len(named), {"layer": LOGITS, "module": HEAD_PATH, "type": "head", "shape": ["num_classes"],
                                 "dim": "num_classes", "flatten_dim": "num_classes"})
    return rows


def _row(info: LayerInfo) -> dict[str, Any]:
    return {
        "layer": info.name,
        "module": info.path,
        "type": info.kind,
        "shape": list(info.shape) if info.shape is not None else None,
        "dim": info.dim("avg"),
        "flatten_dim": info.dim("flatten"),
    }


def _bare_model(backbone: str, options: dict[str, Any], num_classes: int | None) -> nn.Module:
    from tltk.backbones import build_backbone

    if num_classes is None:
        return build_backbone(backbone, pretrained=False, **options)
    from tltk.model import ModelSpec, build_model

    return build_model(ModelSpec(backbone, "linear", num_classes, weights="none", backbone_options=options))


__all__ = [
    "POOLINGS",
    "LayerInfo",
    "LayerTap",
    "ResolvedLayer",
    "available_layers",
    "backbone_of",
    "check_pool",
    "layer_shapes",
    "list_layers",
    "module_paths",
    "pool_features",
    "pooled_dim",
    "resolve_layer",
    "tap",
]
