"""Heads: what sits on the backbone and is trained for the new task.

A head factory receives the backbone's feature-vector size, the channels of its last
spatial map, the number of outputs and its own options, and returns a module. A head
that reads the spatial map instead of the vector says so with ``uses_spatial = True``.
Custom heads come from the ``tltk.heads`` entry-point group (``package:name`` picks one
explicitly) or an import path (``pkg.mod:factory`` or ``path/to/file.py:Factory``).
tltk's own heads below are declared, like a plugin's, as entry points in pyproject.toml;
each takes the options its signature names (``hidden``, ``dropout``) and no others.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Callable

from torch import nn

from tltk.errors import TltkError
from tltk.fileio import user_path
from tltk.kinds import HEAD, option_help, options_of
from tltk.registry import HEADS, build_from

HeadFactory = Callable[..., nn.Module]


@option_help(dropout="dropout before the Linear layer (0: none)")
def linear_head(in_features: int, in_channels: int | None, num_classes: int, dropout: float = 0.0) -> nn.Module:
    """One Linear layer: softmax regression (multi-class) or per-class sigmoids (multi-label)."""
    layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
    return nn.Sequential(*layers, nn.Linear(in_features, num_classes))


@option_help(hidden="width of the hidden layer", dropout="dropout before the last layer")
def mlp_head(
    in_features: int, in_channels: int | None, num_classes: int, hidden: int = 512, dropout: float = 0.5
) -> nn.Module:
    """Two layers with a ReLU and dropout between them."""
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
    )


class ConvHead(nn.Module):
    """3x3 conv + BatchNorm + ReLU on the spatial map, global average pool, then Linear."""

    uses_spatial = True

    def __init__(self, in_channels: int, num_classes: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, spatial):  # type: ignore[no-untyped-def]
        if spatial.dim() != 4:
            raise TltkError(
                f"the conv head needs a spatial map (N, C, H, W) but the backbone gives shape {tuple(spatial.shape)}; "
                f"use --head linear or --head mlp with this backbone."
            )
        return self.fc(self.dropout(self.pool(self.conv(spatial)).flatten(1)))


@option_help(hidden="channels of the 3x3 conv", dropout="dropout before the Linear layer")
def conv_head(
    in_features: int, in_channels: int | None, num_classes: int, hidden: int = 256, dropout: float = 0.0
) -> nn.Module:
    """A conv layer on the backbone's spatial map (pool5), then global pooling and Linear."""
    if in_channels is None:
        raise TltkError("the conv head needs a backbone with a spatial map; use --head linear or --head mlp.")
    return ConvHead(in_channels, num_classes, hidden, dropout)


def resolve_head(name: str) -> HeadFactory:
    """A registered head (``name`` or ``package:name``), or one named by import path:
    ``pkg.mod:factory``, ``file.py:Factory``."""
    if ":" in name and name not in HEADS:
        return _import_factory(name)
    return HEADS.get(name)


def build_head(name: str, in_features: int, in_channels: int | None, num_classes: int, **options: Any) -> nn.Module:
    """The head ``name`` built through the one component path (``tltk.registry.build_from``):
    an option it does not declare is refused, a non-module result breaks the head contract."""
    factory = resolve_head(name)
    origin = HEADS.origin(name) if name in HEADS else name.rpartition(":")[0]
    return build_from(HEAD, name, factory, origin, in_features=in_features, in_channels=in_channels,
                      num_classes=num_classes, **options)


def check_head_options(name: str, options: dict[str, Any]) -> None:
    """Refuses an option the head does not declare (or a required one left out) without building
    it: a head needs the backbone's sizes to be built, and a check must not wait for them."""
    HEAD.check_options(name, resolve_head(name), options)


def recorded_head_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options of a recorded run that its head takes. Runs trained before tltk refused
    undeclared options may record some their head ignored (``hidden`` on ``linear``); they
    played no part in the model, so rebuilding it without them gives the model it trained."""
    declared = options_of(resolve_head(name), HEAD.call)
    if declared is None:
        return dict(options)
    return {key: value for key, value in options.items() if key in {o.name for o in declared}}


def head_uses_spatial(head: nn.Module) -> bool:
    return bool(getattr(head, "uses_spatial", False))


def _import_factory(spec: str) -> HeadFactory:
    location, _, attr = spec.rpartition(":")
    try:
        module = _load_module(location)
    except Exception as exc:
        raise TltkError(f"could not import head module '{location}' ({exc}); check the path in --head {spec}.") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise TltkError(f"'{location}' has no callable '{attr}'; check the name after ':' in --head {spec}.")
    return factory


def _load_module(location: str):  # type: ignore[no-untyped-def]
    if location.endswith(".py"):
        path = user_path(location)
        spec = importlib.util.spec_from_file_location(f"tltk_custom_head_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"{path} is not a Python file")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(location)
