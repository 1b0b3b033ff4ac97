"""The model that makes a store's vectors: a run directory, or a backbone with weights.

A store records how to build its model again (the run's path, or the backbone's name,
weights, options and seed) and a fingerprint of what was built: a hash of every tensor
of the model and of its preprocessing. Vectors from two models, or from one model fed
differently sized or normalised images, live in different spaces, so a store refuses
queries whose model has another fingerprint, even one rebuilt from the same recipe
(a run directory trained again, a weights file replaced).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tltk import rundir
from tltk.backbones import backbone_info, build_backbone
from tltk.backbones.base import Preprocessing, check_size_option
from tltk.errors import TltkError, UnknownNameError

RUN = "run"
BACKBONE = "backbone"


@dataclass
class FeatureSource:
    """A model ready to tap, what it expects as input, and the recipe to build it again."""

    model: nn.Module
    preprocessing: Preprocessing
    record: dict[str, Any] = field(default_factory=dict)
    run_config: dict[str, Any] | None = None

    @property
    def fingerprint(self) -> str:
        return str(self.record["fingerprint"])

    @property
    def description(self) -> str:
        return str(self.record["description"])

    @property
    def is_run(self) -> bool:
        return self.run_config is not None


def load_source(
    source: str,
    *,
    weights: str | None = None,
    init: str = "default",
    seed: int = 0,
    backbone_options: dict[str, Any] | None = None,
    input_size: int | None = None,
) -> FeatureSource:
    """SOURCE as typed: a run directory, or a backbone name (``--weights`` says which weights)."""
    path = Path(source).expanduser()
    if rundir.is_run(path):
        if weights is not None or backbone_options or input_size is not None:
            raise TltkError(
                f"{source} is a run directory, which brings its own weights, options and input size; "
                f"drop --weights, --backbone-opt and --input-size, or name a backbone instead."
            )
        return load_run_source(path)
    try:
        backbone_info(source)
    except UnknownNameError as exc:
        if path.exists():
            raise TltkError(f"{source} is neither a tltk run directory (no config.json) nor a backbone name; pass a run's --out or a backbone from `tltk list backbones`.") from exc
        raise TltkError(f"SOURCE '{source}' is neither a run directory nor a backbone name ({exc}).") from exc
    return load_backbone_source(source, weights or "auto", init=init, seed=seed, options=backbone_options or {},
                                input_size=input_size)


def load_run_source(path: Path) -> FeatureSource:
    from tltk.run import load_run

    loaded = load_run(path)
    preprocessing = loaded.preprocessing
    record = {"kind": RUN, "path": str(path.resolve()), "backbone": loaded.model.backbone.name}
    record.update(description=f"run {path.resolve()} ({loaded.model.backbone.name})",
                  fingerprint=model_fingerprint(loaded.model, preprocessing))
    return FeatureSource(loaded.model, preprocessing, record, loaded.config)


def load_backbone_source(
    name: str, weights: str, *, init: str = "default", seed: int = 0, options: dict[str, Any] | None = None,
    input_size: int | None = None,
) -> FeatureSource:
    """A backbone alone, with ``weights`` as ``--weights`` takes them: imagenet, none, FILE or RUN_DIR.

    Random weights (``none``) are drawn after seeding with ``seed``, so the same command
    builds the same network, and a store made from it can be queried again.
    """
    from tltk.model import resolve_weights_choice
    from tltk.weights import apply_init, load_backbone_weights

    options = dict(options or {})
    choice = resolve_weights_choice(name, weights)
    torch.manual_seed(seed)
    backbone = build_backbone(name, pretrained=choice == "imagenet", **options)
    if choice == "none":
        apply_init(backbone, init)
    elif choice != "imagenet":
        choice = str(Path(choice).expanduser().resolve())
        backbone.pretrained_source = load_backbone_weights(backbone, Path(choice))
    check_size_option(input_size)
    preprocessing = backbone.preprocessing.resized(input_size)
    backbone.eval()
    record = {"kind": BACKBONE, "name": name, "weights": choice, "init": init, "seed": seed, "options": options,
              "input_size": input_size}
    record.update(description=f"{name} with {_weights_words(choice, init, seed)}",
                  fingerprint=model_fingerprint(backbone, preprocessing))
    return FeatureSource(backbone, preprocessing, record)


def source_from_record(record: dict[str, Any]) -> FeatureSource:
    """Build a store's model again from its manifest; the caller compares fingerprints."""
    if record.get("kind") == RUN:
        path = Path(record["path"])
        if not rundir.is_run(path):
            raise TltkError(f"the run directory {path} that built this store is gone; pass the model again with --model.")
        return load_run_source(path)
    if record.get("kind") == BACKBONE:
        return load_backbone_source(record["name"], record["weights"], init=record.get("init", "default"),
                                    seed=int(record.get("seed", 0)), options=record.get("options") or {},
                                    input_size=record.get("input_size"))
    raise TltkError(f"the store's manifest names an unknown model kind '{record.get('kind')}'; extract the store again.")


def model_fingerprint(model: nn.Module, preprocessing: Preprocessing) -> str:
    """sha256 of every tensor (name, dtype, shape, bytes) and of the preprocessing."""
    digest = hashlib.sha256()
    digest.update(json.dumps(preprocessing.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"\n{name}:{data.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(data.view(torch.uint8).numpy())
    return digest.hexdigest()


def _weights_words(choice: str, init: str, seed: int) -> str:
    if choice == "imagenet":
        return "ImageNet weights"
    if choice == "none":
        return f"random weights (init {init}, seed {seed})"
    return f"weights from {choice}"


__all__ = ["FeatureSource", "load_backbone_source", "load_run_source", "load_source", "model_fingerprint", "source_from_record"]
