"""Where backbone weights come from: a library's published weights, a file, or an earlier run.

``--weights`` takes ``imagenet``, ``none``, a ``.safetensors`` / ``.pth`` file, or a run
directory. Published weights go through timm's and torchvision's own loading code and
caches; with no internet and nothing cached, that is one clear sentence naming the other
ways, never a silent fall-back to random weights.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from tltk.backbones.base import Backbone
from tltk.errors import WeightsError

OTHER_WAYS = (
    "use --weights none to train from scratch, --weights FILE (.safetensors or .pth), "
    "or --weights RUN_DIR to start from an earlier run"
)
RUN_PREFIXES = ("backbone.net.",)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
INIT_SCHEMES = ("default", "xavier", "kaiming", "gaussian")


# --- published weights -----------------------------------------------------------------


def load_torchvision_pretrained(net: nn.Module, arch: str) -> None:
    """torchvision's ImageNet weights for ``arch``, from torch hub's cache or its download."""
    from torchvision import models

    weights = models.get_model_weights(arch).IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        state = weights.get_state_dict(progress=False, weights_only=True)
    except Exception as exc:  # URLError, OSError, corrupt cache: all one answer
        raise WeightsError(
            f"ImageNet weights for {arch} are not cached at {cached} and could not be downloaded "
            f"({_short(exc)}); {OTHER_WAYS}."
        ) from exc
    net.load_state_dict(state)


def create_timm_pretrained(model_name: str) -> nn.Module:
    """A timm model with its published weights, from the Hugging Face cache or the hub.

    A cached file is handed to timm's own loader directly; otherwise the hub is asked
    only if it can be reached, since an offline ``hf_hub_download`` retries for a minute.
    """
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    cached = _cached_hf_file(hub_id) if hub_id else None
    overlay = {"file": cached} if cached else None
    if cached is None and not _reachable("huggingface.co"):
        where = f"the Hugging Face cache ({_hf_cache_dir()}) under {hub_id}" if hub_id else "the local cache"
        raise WeightsError(
            f"pretrained weights for timm model '{model_name}' are not in {where} and the hub "
            f"cannot be reached; {OTHER_WAYS}."
        )
    try:
        return timm.create_model(model_name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
    except Exception as exc:
        raise WeightsError(
            f"pretrained weights for timm model '{model_name}' could not be loaded ({_short(exc)}); {OTHER_WAYS}."
        ) from exc


def _cached_hf_file(hub_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename, cache_dir=_hf_cache_dir())
        if isinstance(found, str):
            return found
    return None


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


# --- files and run directories ---------------------------------------------------------


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors or .pth file; a .pth that needs pickled code is refused."""
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; {OTHER_WAYS}.")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return _read_torch_file(path)
    raise WeightsError(f"weights file {path} is neither .safetensors nor .pth; convert it or {OTHER_WAYS}.")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise WeightsError(f"weights file {path} is not a readable safetensors file ({_short(exc)}).") from exc


def _read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"weights file {path} could not be read with torch.load(weights_only=True) ({_short(exc)}); "
            f"tltk does not unpickle code: save a plain state_dict or a .safetensors file instead."
        ) from exc
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Training scripts nest the weights under 'state_dict' or 'model'; accept both."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {path} does not hold a state_dict of tensors.")
    return dict(obj)


def run_weights_file(run_dir: Path) -> Path:
    return run_dir / "model.safetensors"


def backbone_name_of_run(run_dir: Path) -> str | None:
    config = run_dir / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text())["model"]["backbone"]
    except (ValueError, KeyError, TypeError):
        return None


def load_backbone_weights(backbone: Backbone, source: Path) -> str:
    """Load a file or run directory into ``backbone.net``; returns a description of what loaded."""
    if source.is_dir():
        trained_with = backbone_name_of_run(source)
        if trained_with is None or not run_weights_file(source).is_file():
            raise WeightsError(f"{source} is a directory but not a tltk run (no config.json and model.safetensors); {OTHER_WAYS}.")
        if trained_with != backbone.name:
            raise WeightsError(
                f"run {source} was trained with backbone '{trained_with}', not '{backbone.name}'; "
                f"use --backbone {trained_with} to transfer from it."
            )
        state = read_state_dict(run_weights_file(source))
    else:
        state = read_state_dict(source)
    state = _backbone_keys(state)
    loaded = fit_state_dict(backbone.net, state, str(source))
    return f"{loaded} tensors from {source}"


def _backbone_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip run-directory and wrapper prefixes so keys read as the library's own names."""
    if any(k.startswith(RUN_PREFIXES) for k in state):
        state = {k[len(p):]: v for k, v in state.items() for p in RUN_PREFIXES if k.startswith(p)}
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def fit_state_dict(net: nn.Module, state: dict[str, torch.Tensor], where: str) -> int:
    """Copy matching tensors in; a missing or misshapen tensor is an error naming the first one.

    Tensors the network does not have (a source classifier, say) are ignored, since a
    backbone is a network without its head.
    """
    own = net.state_dict()
    matched = [k for k in own if k in state]
    if not matched:
        raise WeightsError(
            f"no tensor in {where} matches the model (the model's first is '{next(iter(own))}', "
            f"the file's first is '{next(iter(state), '(none)')}'); check that the weights are for this backbone."
        )
    for key in own:
        if key not in state:
            missing = [k for k in own if k not in state]
            raise WeightsError(
                f"{where} lacks {len(missing)} of the model's tensors, the first being '{key}'; "
                f"check that the weights are for this backbone."
            )
        if tuple(state[key].shape) != tuple(own[key].shape):
            raise WeightsError(
                f"tensor '{key}' in {where} has shape {tuple(state[key].shape)} but the model needs "
                f"{tuple(own[key].shape)}; check that the weights are for this backbone and input."
            )
    net.load_state_dict({k: state[k] for k in own}, strict=True)
    return len(own)


# --- random initialisation -------------------------------------------------------------


def apply_init(module: nn.Module, scheme: str) -> None:
    """Re-initialise conv and linear layers; 'default' keeps PyTorch's own initialisation."""
    if scheme not in INIT_SCHEMES:
        raise WeightsError(f"unknown --init '{scheme}'; choose one of {', '.join(INIT_SCHEMES)}.")
    if scheme == "default":
        return
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            _init_layer(layer, scheme)


def _init_layer(layer: nn.Conv2d | nn.Linear, scheme: str) -> None:
    if scheme == "xavier":
        nn.init.xavier_uniform_(layer.weight)
    elif scheme == "kaiming":
        nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    elif scheme == "gaussian":
        nn.init.normal_(layer.weight, mean=0.0, std=0.01)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
