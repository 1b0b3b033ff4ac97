"""Contract checks for plugin components, to run in the plugin's own test suite.

Each ``check_*`` function builds a component the way tltk does, runs it on a tiny
input, and raises ``ContractViolation`` (an ``AssertionError``, so any test runner
reports it as a failure) naming what is wrong; it returns what it built, for further
checks of the plugin's own. Nothing here needs pytest::

    from tltk.testing import check_backbone, check_head

    def test_my_backbone_meets_the_contract():
        check_backbone(my_backbone_factory, layers=("conv1", "pool5", "fc7"))

The checks go further than what tltk verifies on every build (``tltk.plugin``'s cheap
shape checks): forward passes and their shapes, that each named layer runs, that
gradients reach every parameter, that a strategy's frozen parameters stay put, that an
exporter's file reads back as the predictions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from tltk.data.samples import RawDataset, Sample
from tltk.errors import TltkError
from tltk.plugin import backbone_problems, strategy_problems
from tltk.kinds import kind

DATASET_SPLITS = {"train", "val", "test", "all"}


class ContractViolation(AssertionError):
    """A component that does not do what its tltk.plugin Protocol promises."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ContractViolation(message)


def _callable_as(group: str, component: object) -> None:
    problem = kind(group).call.problem(component)
    _require(problem is None, f"tltk cannot call it: {problem}")


# --- backbones ---------------------------------------------------------------------------------


def check_backbone(
    factory: Callable[..., Any], *, options: dict[str, Any] | None = None, layers: Sequence[str] = (), batch: int = 2
) -> Any:
    """Builds the backbone without weights and checks the ``BackboneModule`` contract: its
    members, the forward shapes at its own input size, that ``forward`` is
    ``forward_vector(forward_spatial(x))``, that every named layer (and each of ``layers``)
    runs in the forward pass, that ``stages`` covers each parameter once, and that
    gradients reach every parameter."""
    _callable_as("tltk.backbones", factory)
    pretrained = getattr(factory, "pretrained_available", False)
    _require(isinstance(pretrained, bool), f"pretrained_available is {pretrained!r}, not True or False")
    torch.manual_seed(0)
    backbone = factory(pretrained=False, **(options or {}))
    problems = backbone_problems(backbone)
    _require(not problems, "; ".join(problems))
    missing = [name for name in layers if name not in backbone.layers]
    _require(not missing, f"layers has no {', '.join(missing)}; it has {', '.join(backbone.layers) or 'none'}")
    images = _images(backbone, batch)
    _check_forward(backbone.eval(), images)
    _check_layers_run(backbone, images)
    _check_stages(backbone)
    _check_gradients(backbone.train(), lambda: backbone(images).square().mean(), "backbone")
    return backbone


def _images(backbone: Any, batch: int) -> torch.Tensor:
    height, width = backbone.preprocessing.input_size
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


def _check_forward(backbone: Any, images: torch.Tensor) -> None:
    batch = images.shape[0]
    with torch.no_grad():
        spatial = backbone.forward_spatial(images)
        vector = backbone.forward_vector(spatial)
        direct = backbone(images)
    if backbone.spatial_channels is not None:
        _require(spatial.dim() == 4 and tuple(spatial.shape[:2]) == (batch, backbone.spatial_channels),
                 f"forward_spatial gives shape {tuple(spatial.shape)}, not ({batch}, spatial_channels="
                 f"{backbone.spatial_channels}, H, W)")
    _require(tuple(vector.shape) == (batch, backbone.feature_dim),
             f"forward_vector gives shape {tuple(vector.shape)}, not ({batch}, feature_dim={backbone.feature_dim})")
    _require(tuple(direct.shape) == tuple(vector.shape) and torch.allclose(direct, vector),
             "forward(x) differs from forward_vector(forward_spatial(x)); tltk calls the two steps separately")
    _require(bool(torch.isfinite(vector).all()), "forward_vector gives non-finite values on random input")


def _check_layers_run(backbone: Any, images: torch.Tensor) -> None:
    """Each named layer's module must run when the backbone does, with the batch first in its output."""
    seen: dict[str, tuple[int, ...]] = {}
    handles = []
    for label, path in backbone.layers.items():
        def hook(_module: nn.Module, _inputs: Any, output: Any, label: str = label) -> None:
            if isinstance(output, torch.Tensor):
                seen.setdefault(label, tuple(output.shape))
        handles.append(backbone.net.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            backbone(images)
    finally:
        for handle in handles:
            handle.remove()
    idle = [f"{label} ({backbone.layers[label]})" for label in backbone.layers if label not in seen]
    _require(not idle, f"named layers that the forward pass never runs: {', '.join(idle)}")
    unbatched = [label for label, shape in seen.items() if not shape or shape[0] != images.shape[0]]
    _require(not unbatched, f"named layers whose output does not start with the batch: {', '.join(unbatched)}")


def _check_stages(backbone: Any) -> None:
    staged = [id(p) for stage in backbone.stages() for p in stage]
    _require(len(staged) == len(set(staged)), "stages() lists a parameter twice")
    everything = {id(p) for p in backbone.parameters()}
    _require(set(staged) == everything,
             f"stages() covers {len(set(staged) & everything)} of the backbone's {len(everything)} parameters"
             f"{' and lists others' if set(staged) - everything else ''}")


def _check_gradients(module: nn.Module, loss: Callable[[], torch.Tensor], what: str) -> None:
    module.zero_grad(set_to_none=True)
    loss().backward()
    starved = [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]
    _require(not starved, f"no gradient reaches the {what}'s {', '.join(starved[:5])}: forward does not use them")
    module.zero_grad(set_to_none=True)


# --- heads -------------------------------------------------------------------------------------


def check_head(
    factory: Callable[..., Any], *, in_features: int = 16, in_channels: int | None = 8, num_classes: int = 3,
    options: dict[str, Any] | None = None, batch: int = 4,
) -> nn.Module:
    """Builds the head the way tltk does and checks that it maps the backbone's output (the
    vector, or the spatial map if it sets ``uses_spatial``) to (batch, num_classes) logits
    that gradients flow through, in train and eval mode; and that on a backbone without a
    spatial map it works or refuses with a TltkError."""
    _callable_as("tltk.heads", factory)
    torch.manual_seed(0)
    head = factory(in_features=in_features, in_channels=in_channels, num_classes=num_classes, **(options or {}))
    _require(isinstance(head, nn.Module), f"the factory returned a {type(head).__name__}, not a torch.nn.Module")
    spatial = bool(getattr(head, "uses_spatial", False))
    inputs = torch.randn(batch, in_channels or 1, 4, 4) if spatial else torch.randn(batch, in_features)
    for mode in (True, False):
        head.train(mode)
        with torch.set_grad_enabled(mode):
            logits = head(inputs)
        _require(tuple(logits.shape) == (batch, num_classes),
                 f"in {'train' if mode else 'eval'} mode the head gives shape {tuple(logits.shape)}, not ({batch}, {num_classes})")
        _require(bool(torch.isfinite(logits).all()), "the head gives non-finite logits on random input")
    _check_gradients(head.train(), lambda: head(inputs).square().mean(), "head")
    _check_without_spatial_map(factory, in_features, num_classes, options)
    return head


def _check_without_spatial_map(factory: Callable[..., Any], in_features: int, num_classes: int,
                               options: dict[str, Any] | None) -> None:
    try:
        factory(in_features=in_features, in_channels=None, num_classes=num_classes, **(options or {}))
    except TltkError:
        pass  # a head that needs the map may refuse, in one sentence
    except Exception as exc:
        raise ContractViolation(
            f"with in_channels=None (a backbone without a spatial map) the factory raised {type(exc).__name__}: {exc}; "
            f"work without it or raise a TltkError that says which heads to use instead"
        ) from exc


# --- strategies --------------------------------------------------------------------------------


def check_strategy(
    factory: Callable[..., Any], *, options: dict[str, Any] | None = None, epochs: int = 3, lr: float = 0.1
) -> list[str | None]:
    """Trains a small model (lenet5 + linear head) for ``epochs`` single steps under the
    strategy and checks the ``TrainingStrategy`` contract: ``describe`` is a JSON-able dict
    with the name, the parameter groups hold the model's parameters once each with a
    positive learning rate, every trainable parameter is in a group, frozen parameters do
    not change, and ``on_epoch_start`` returns None or a line. Returns those lines."""
    from tltk.model import ModelSpec, build_model

    _callable_as("tltk.strategies", factory)
    strategy = factory(**(options or {}))
    problems = strategy_problems(strategy)
    _require(not problems, "; ".join(problems))
    _check_description(strategy.describe())
    torch.manual_seed(0)
    model = build_model(ModelSpec("lenet5", "linear", 3, weights="none"))
    strategy.prepare(model)
    groups = strategy.param_groups(model, lr)
    _check_groups(model, groups)
    optimizer = torch.optim.SGD([g for g in groups if g["params"]], lr=lr)
    messages = []
    for epoch in range(epochs):
        frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
        message = strategy.on_epoch_start(model, epoch)
        _require(message is None or isinstance(message, str),
                 f"on_epoch_start returned a {type(message).__name__} at epoch {epoch}, not a line of text or None")
        messages.append(message)
        _check_trainable_in_groups(model, groups, f"after on_epoch_start({epoch})")
        _train_step(model, optimizer)
        moved = [name for name, p in model.named_parameters()
                 if name in frozen and not p.requires_grad and not torch.equal(p, frozen[name])]
        _require(not moved, f"in epoch {epoch}, frozen parameters changed: {', '.join(moved[:5])}")
    return messages


def _check_description(description: object) -> None:
    _require(isinstance(description, dict) and isinstance(description.get("name"), str),
             f"describe() returned {description!r}, not a dict with the strategy's name")
    try:
        json.dumps(description)
    except TypeError as exc:
        raise ContractViolation(f"describe() is recorded in config.json but is not JSON-able: {exc}") from exc


def _check_groups(model: nn.Module, groups: object) -> None:
    _require(isinstance(groups, list) and all(isinstance(g, dict) and "params" in g for g in groups),
             "param_groups() must return a list of dicts, each with 'params'")
    owned = {id(p) for p in model.parameters()}
    listed = [id(p) for g in groups for p in g["params"]]
    _require(len(listed) == len(set(listed)), "param_groups() puts a parameter in two groups")
    _require(set(listed) <= owned, "param_groups() lists parameters that are not the model's")
    rates = [g.get("lr") for g in groups]
    _require(all(isinstance(r, (int, float)) and r > 0 for r in rates), f"param_groups() learning rates {rates} are not all positive")
    _check_trainable_in_groups(model, groups, "after prepare()")


def _check_trainable_in_groups(model: nn.Module, groups: list[dict[str, Any]], when: str) -> None:
    listed = {id(p) for g in groups for p in g["params"]}
    left_out = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in listed]
    _require(not left_out, f"{when}, trainable parameters are in no optimizer group: {', '.join(left_out[:5])}")


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model.train()
    optimizer.zero_grad(set_to_none=True)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()


# --- callbacks ---------------------------------------------------------------------------------


def check_callback(factory: Callable[..., Any], *, options: dict[str, Any] | None = None, epochs: int = 2) -> Any:
    """Builds the callback and trains a small model (lenet5 + linear head, ``epochs`` epochs
    of two steps on random images, with validation) with it, checking the ``Callback``
    contract: the factory builds a ``tltk.plugin.Callback``, every hook runs inside a real
    loop (so ``self.loop`` is there), ``state_dict`` is a dict of JSON values that
    ``load_state_dict`` takes back, and ``close`` runs. Returns the callback."""
    from torch.utils.data import TensorDataset

    from tltk.model import ModelSpec, build_model
    from tltk.strategies import build_strategy
    from tltk.train.callbacks import Callback
    from tltk.train.trainer import TrainConfig, fit

    _callable_as("tltk.callbacks", factory)
    callback = factory(**(options or {}))
    _require(isinstance(callback, Callback), f"the factory built a {type(callback).__name__}, not a "
                                             f"tltk.plugin.Callback (subclass it)")
    torch.manual_seed(0)
    model = build_model(ModelSpec("lenet5", "linear", 3, weights="none"))
    images = TensorDataset(torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    config = TrainConfig(epochs=epochs, batch_size=4, workers=0, device="cpu", precision="fp32", cache=False)
    try:
        result = fit(model, build_strategy("finetune"), images, images, config, callbacks=[callback])
    except TltkError as exc:
        raise ContractViolation(f"training with the callback stopped: {exc}") from exc
    _require(callback.loop is not None and callback.loop.model is model, "the loop did not bind itself to the callback")
    _require(1 <= result.epochs_run <= epochs, f"the run trained {result.epochs_run} epochs, not 1 to {epochs}")
    state = callback.state_dict()
    _require(isinstance(state, dict), f"state_dict() returned a {type(state).__name__}, not a dict")
    try:
        json.loads(json.dumps(state))
    except (TypeError, ValueError) as exc:
        raise ContractViolation(f"state_dict() holds values a checkpoint cannot store as JSON: {exc}") from exc
    callback.load_state_dict(json.loads(json.dumps(state)))
    return callback


# --- exporters ---------------------------------------------------------------------------------


def sample_predictions(task: str = "multiclass") -> Any:
    """Five images of three classes, as ``tltk predict`` hands them to an exporter; in the
    multi-label case one image has no class at 0.5 and one has two."""
    from tltk.predict import Predictions

    if task == "multiclass":
        probabilities = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.3, 0.3, 0.4]]
    else:
        probabilities = [[0.9, 0.1, 0.2], [0.6, 0.7, 0.1], [0.1, 0.2, 0.3], [0.2, 0.1, 0.8], [0.55, 0.5, 0.45]]
    ids = [f"images/{name}.png" for name in ("ant", "bee", "cat", "dog", "eel")]
    return Predictions(ids, list(ids), np.array(probabilities, dtype=np.float32), ["alpha", "beta", "gamma"], task)


def check_exporter(
    exporter: Callable[..., Any], out: str | Path, *, read: Callable[[Path], Sequence[Any]] | None = None,
    task: str = "multiclass", options: dict[str, Any] | None = None, text: bool = True,
) -> Path:
    """Exports ``sample_predictions(task)`` to ``out`` and checks that the file is there, is
    not empty and (with ``text``) is UTF-8. With ``read`` (the file back to each row's
    predicted label, or list of labels, in row order) it checks that the file says what was
    predicted: the top class, or for multi-label every class at or above the threshold."""
    _callable_as("tltk.exporters", exporter)
    predictions = sample_predictions(task)
    path = Path(out)
    exporter(predictions, path, **(options or {}))
    _require(path.is_file() and path.stat().st_size > 0, f"the exporter wrote nothing at {path}")
    if text:
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ContractViolation(f"{path} is not UTF-8 text ({exc}); pass text=False for a binary format") from exc
    if read is not None:
        threshold = float((options or {}).get("threshold", 0.5))
        _require_same_labels(predictions, [_as_labels(row) for row in read(path)], threshold)
    return path


def _as_labels(row: Any) -> list[str]:
    return [row] if isinstance(row, str) else [str(label) for label in row]


def _require_same_labels(predictions: Any, got: list[list[str]], threshold: float) -> None:
    names = predictions.class_names
    if predictions.task == "multilabel":
        expected = [[names[i] for i in row] for row in predictions.predicted_sets(threshold)]
    else:
        expected = [[names[i]] for i in predictions.predicted_index()]
    _require(len(got) == len(expected), f"the file reads back as {len(got)} rows, not {len(expected)}")
    for row, (read_back, predicted) in enumerate(zip(got, expected)):
        _require(sorted(read_back) == sorted(predicted), f"row {row} reads back as {read_back}, but the prediction is {predicted}")


# --- data formats ------------------------------------------------------------------------------


def check_format(reader: Callable[..., Any], path: str | Path, *, image_root: str | Path | None = None) -> RawDataset:
    """Reads ``path`` and checks the ``RawDataset``: unique class names, known split names,
    samples with unique ids and targets in range, sources that are rows of ``arrays`` (uint8,
    N x H x W x C with C 1 or 3) or existing files; then splits it the way tltk does."""
    from tltk.data.splits import check_classes, make_splits

    _callable_as("tltk.datasets", reader)
    root = Path(image_root) if image_root is not None else None
    raw = reader(Path(path), image_root=root, strict=False)
    _require(isinstance(raw, RawDataset), f"the reader returned a {type(raw).__name__}, not a tltk.plugin.RawDataset")
    names = raw.class_names
    _require(bool(names) and all(isinstance(n, str) for n in names) and len(set(names)) == len(names),
             f"class_names {names!r} is not a list of unique names")
    _require(set(raw.splits) <= DATASET_SPLITS and ("all" not in raw.splits or len(raw.splits) == 1),
             f"splits are named {sorted(raw.splits)}; use train/val/test, or 'all' alone")
    samples = raw.all_samples()
    _require(bool(samples), "the dataset has no samples")
    _require(len({s.id for s in samples}) == len(samples), "two samples share an id")
    if raw.arrays is not None:
        arrays = raw.arrays
        _require(arrays.dtype == np.uint8 and arrays.ndim == 4 and arrays.shape[-1] in (1, 3),
                 f"arrays is {arrays.dtype} of shape {arrays.shape}, not uint8 N x H x W x C with C 1 or 3")
    for sample in samples:
        _check_sample(sample, raw, len(names))
    check_classes(raw)
    make_splits(raw, val_split=0.1, test_split=0.2, seed=0)
    return raw


def _check_sample(sample: Any, raw: RawDataset, num_classes: int) -> None:
    _require(isinstance(sample, Sample), f"a sample is a {type(sample).__name__}, not a tltk.plugin.Sample")
    target = sample.target
    if isinstance(target, tuple):
        _require(len(target) == num_classes and set(target) <= {-1, 0, 1},
                 f"sample {sample.id}: a multi-label target needs one of 1, 0, -1 per class, not {target}")
    else:
        _require(isinstance(target, int) and 0 <= target < num_classes, f"sample {sample.id}: target {target!r} is not a class index")
    if raw.arrays is not None:
        _require(isinstance(sample.source, int) and 0 <= sample.source < len(raw.arrays),
                 f"sample {sample.id}: source {sample.source!r} is not a row of arrays")
    else:
        _require(isinstance(sample.source, str) and Path(sample.source).is_file(),
                 f"sample {sample.id}: source {sample.source!r} is not an existing image file")


__all__ = ["ContractViolation", "check_backbone", "check_callback", "check_exporter", "check_format", "check_head", "check_strategy",
           "sample_predictions"]
