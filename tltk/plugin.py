"""Everything a tltk plugin imports: the contracts its components meet, and the API version.

A plugin is a separate package that adds components to tltk through entry points and
imports nothing from tltk but this module, so tltk can move its internals without
breaking extensions. The groups and what their entry points name:

==================  ===================================================================
``tltk.backbones``  a ``BackboneFactory``: ``(pretrained=False, **options)`` -> ``BackboneModule``
``tltk.heads``      a ``HeadFactory``: ``(*, in_features, in_channels, num_classes, **options)`` -> module
``tltk.strategies`` a ``StrategyFactory``: ``(**options)`` -> ``TrainingStrategy``
``tltk.exporters``  an ``Exporter``: ``(predictions, out, **options)``, writes the file ``out``
``tltk.datasets``   a ``FormatReader``: ``(path, *, image_root, strict)`` -> ``RawDataset``
``tltk.callbacks``  a ``CallbackFactory``: ``(**options)`` -> a ``Callback`` (``tltk.plugin.Callback``)
==================  ===================================================================

Each row is a record of ``tltk.kinds.KINDS``. A component's options are its factory's
parameters beyond those tltk passes (or what ``declare_options`` states); one it does not
declare is refused by name, and one given as None counts as not given. A data format
takes no options.

The contracts are typing Protocols: a component meets one by its shape, not by
inheriting from anything. The base classes and helpers at the end (``Backbone``,
``Strategy``, ``RawDataset``, ``write_text``, ...) save a plugin work; they load on first
use, so ``import tltk.plugin`` itself stays cheap (no torch).

A plugin says which plugin API it is written for with a module attribute, best in its
package's ``__init__.py`` before anything else::

    TLTK_PLUGIN_API = "1.0"

tltk refuses, with a message that says what to upgrade, a plugin whose major version
differs from ``PLUGIN_API_VERSION`` or whose minor version is newer. ``tltk.testing``
checks components against these contracts in a plugin's own test suite.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Protocol, TypeVar, runtime_checkable

from tltk.errors import DataError, TltkError, UnknownOptionError
from tltk.kinds import (
    KINDS, Option, backbone_problems, callback_problems, declare_options, head_problems, option_help, strategy_problems,
)

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np
    from torch import Tensor, nn

    from tltk.data.samples import RawDataset

PLUGIN_API_VERSION = "1.0"
API_ATTRIBUTE = "TLTK_PLUGIN_API"

# The kind of component each entry-point group holds, in the words error messages use
# (derived from the one kind table, tltk.kinds).
GROUPS: dict[str, str] = {kind.group: kind.word for kind in KINDS}


# --- the contracts ------------------------------------------------------------------------


class PreprocessingLike(Protocol):
    """The input a backbone expects; it travels with the weights into every run."""

    input_size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]  # per RGB channel, on pixel values scaled to 0..1
    std: tuple[float, float, float]


@runtime_checkable
class BackboneModule(Protocol):
    """What a backbone factory returns: a ``torch.nn.Module`` with these members.

    Images go through two steps so heads can attach at either: ``forward_spatial`` gives
    the last convolutional map (pool5), ``forward_vector`` turns it into the feature vector
    (fc7 on AlexNet/VGG). ``layers`` names feature layers the way the literature does
    (``conv1``, ``pool5``, ``fc6``, ``fc7``) and maps each to a module path inside ``net``;
    ``tltk extract --layer fc7`` and the activation plots read them. Weight files load into
    ``net`` with its own parameter names. ``tltk.plugin.Backbone`` implements all of this
    but the two forward steps.
    """

    net: nn.Module
    feature_dim: int
    spatial_channels: int | None
    layers: Mapping[str, str]
    preprocessing: PreprocessingLike

    def forward_spatial(self, x: Tensor) -> Tensor: ...

    def forward_vector(self, spatial: Tensor) -> Tensor: ...

    def stages(self) -> list[list[nn.Parameter]]:
        """Parameters grouped from input to output, for layer-wise learning rates."""
        ...


class BackboneFactory(Protocol):
    """Entry point in ``tltk.backbones``. ``pretrained=True`` asks for published weights;
    ``pretrained_available`` says beforehand whether there are any (``backbone_factory``
    sets it). Other keyword options come from ``--backbone-opt KEY=VALUE``."""

    pretrained_available: bool

    def __call__(self, pretrained: bool = False, **options: Any) -> BackboneModule: ...


class HeadFactory(Protocol):
    """Entry point in ``tltk.heads``. ``in_features`` is the backbone's vector size,
    ``in_channels`` the channels of its spatial map (None for backbones without one).
    The returned module maps a vector batch (N, in_features) to (N, num_classes), or, if it
    sets ``uses_spatial = True``, the map (N, in_channels, H, W). Options the factory
    declares (``hidden``, ``dropout``) are passed when the user gives them; others are refused."""

    def __call__(self, *, in_features: int, in_channels: int | None, num_classes: int, **options: Any) -> nn.Module: ...


class TransferModelLike(Protocol):
    """What a strategy may use of the model it trains: backbone, head, and the switch that
    freezes the whole backbone (BatchNorm statistics included)."""

    backbone: BackboneModule
    head: nn.Module
    backbone_frozen: bool

    def freeze_backbone(self, frozen: bool = True) -> None: ...


class TrainingStrategy(Protocol):
    """How a run treats the backbone. ``prepare`` runs once before training (freeze what
    starts frozen), ``param_groups`` gives the optimizer its groups (each a dict with
    ``params``, ``lr`` and a ``name``), ``on_epoch_start`` may change things before each
    epoch (0-based) and returns a line for the log when it did, ``describe`` is what the
    run's config.json records (a JSON-able dict with ``name``)."""

    name: str

    def prepare(self, model: TransferModelLike) -> None: ...

    def param_groups(self, model: TransferModelLike, lr: float) -> list[dict[str, Any]]: ...

    def on_epoch_start(self, model: TransferModelLike, epoch: int) -> str | None: ...

    def describe(self) -> dict[str, Any]: ...


class StrategyFactory(Protocol):
    """Entry point in ``tltk.strategies``; options it declares are passed when given, others refused."""

    def __call__(self, **options: Any) -> TrainingStrategy: ...


class PredictionsLike(Protocol):
    """What an exporter receives: one row per image, in input order."""

    ids: list[str]
    paths: list[str]
    probabilities: np.ndarray  # (N, classes)
    class_names: list[str]
    task: str  # "multiclass" or "multilabel"

    def predicted_index(self) -> np.ndarray: ...

    def predicted_sets(self, threshold: float) -> list[list[int]]: ...


class Exporter(Protocol):
    """Entry point in ``tltk.exporters``: writes ``out`` (atomically: see ``write_text``).
    Keyword options it declares (``threshold``, ``id_from``, ...) are passed when given;
    options it does not declare are refused by name."""

    def __call__(self, predictions: PredictionsLike, out: Path, **options: Any) -> None: ...


class FormatReader(Protocol):
    """Entry point in ``tltk.datasets``: ``--data NAME:PATH`` calls it with the path.
    ``image_root`` is ``--image-root``; ``strict`` asks to stop at an unreadable image
    instead of skipping it. Raise ``DataError`` with one sentence for bad data. A reader that
    declares ``image_column`` or ``label_column`` keywords gets ``--image-column`` and
    ``--label-column`` when they are given; for one that does not, they are refused by name.
    A reader marked with ``recognises(check)`` is also chosen for a bare ``--data PATH`` that
    none of tltk's own formats recognises and for which ``check(path)`` is true."""

    def __call__(self, path: Path, *, image_root: Path | None = None, strict: bool = False) -> RawDataset: ...


# --- declaring a backbone -------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


def backbone_factory(*, pretrained: bool = False, description: str = "") -> Callable[[F], F]:
    """Marks a backbone factory with whether published weights exist and a one-line description
    (what ``tltk list backbones --details`` shows). A factory without it has no pretrained weights."""

    def decorator(factory: F) -> F:
        factory.pretrained_available = bool(pretrained)  # type: ignore[attr-defined]
        factory.description = description  # type: ignore[attr-defined]
        return factory

    return decorator


def recognises(check: Callable[[Path], bool]) -> Callable[[F], F]:
    """Marks a data format's reader with how it knows its data from a bare path (say, a
    ``.npz`` suffix), so that ``--data PATH`` finds it without ``NAME:``. ``check`` must be
    cheap and must not raise: it is asked only about paths tltk's own formats do not claim."""

    def decorator(reader: F) -> F:
        reader.recognises = check  # type: ignore[attr-defined]
        return reader

    return decorator


# --- the API version ------------------------------------------------------------------------


def api_incompatibility(declared: object) -> str | None:
    """Why a plugin written for plugin API ``declared`` cannot run here; None when it can.

    Same major version and a minor version no newer than ours: a minor version adds to
    the API, a major version changes it.
    """
    parsed = _parse_api(declared)
    if parsed is None:
        return f"its {API_ATTRIBUTE} = {declared!r} is not a version like \"{PLUGIN_API_VERSION}\""
    major, minor = parsed
    ours_major, ours_minor = _parse_api(PLUGIN_API_VERSION) or (0, 0)
    if major != ours_major or minor > ours_minor:
        return f"it is written for tltk plugin API {declared} and this tltk provides plugin API {PLUGIN_API_VERSION}"
    return None


def _parse_api(value: object) -> tuple[int, int] | None:
    major, dot, minor = str(value).strip().partition(".")
    if not isinstance(value, str) or not major.isdigit() or (dot and not minor.isdigit()):
        return None
    return int(major), int(minor or 0)


# --- what a plugin may use besides the contracts (loaded on first use) -----------------------

_LAZY: dict[str, str] = {
    "Backbone": "tltk.backbones.base",
    "Preprocessing": "tltk.backbones.base",
    "IMAGENET_MEAN": "tltk.backbones.base",
    "IMAGENET_STD": "tltk.backbones.base",
    "HALF_MEAN": "tltk.backbones.base",
    "HALF_STD": "tltk.backbones.base",
    "Strategy": "tltk.strategies",
    "Callback": "tltk.train.callbacks",
    "Predictions": "tltk.predict",
    "RawDataset": "tltk.data.samples",
    "Sample": "tltk.data.samples",
    "write_text": "tltk.fileio",
    "PluginError": "tltk.registry",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tltk.plugin' has no attribute '{name}'")


__all__ = [
    "PLUGIN_API_VERSION", "API_ATTRIBUTE", "GROUPS",
    "BackboneFactory", "BackboneModule", "PreprocessingLike", "HeadFactory", "TransferModelLike",
    "TrainingStrategy", "StrategyFactory", "PredictionsLike", "Exporter", "FormatReader",
    "backbone_factory", "recognises", "backbone_problems", "head_problems", "strategy_problems", "callback_problems",
    "Option", "declare_options", "option_help", "api_incompatibility", "TltkError", "DataError", "UnknownOptionError", *_LAZY,
]
