"""Resumable training: everything a run needs to go on from where it stopped, without pickle.

A checkpoint lives in ``RUN/checkpoint/`` as two files:

- ``state-<id>.safetensors``: every tensor (model weights, the best epoch's weights,
  optimizer buffers, random-generator states), stored once each;
- ``state.json``: the manifest, holding every other value (counters, hyperparameters,
  scheduler and loss-scaler state, the config the run started with) and, in place of each
  tensor, a reference ``{"$tensor": key, "dtype": ..., "shape": [...]}`` into that file,
  together with the tensor file's name, size and SHA-256.

Why a manifest that names its tensor file rather than a fixed pair of names, or a
directory swapped into place: ``state.json`` is the commit point. A save writes the new
tensor file under a fresh name first (itself through a temporary file and a rename), then
replaces ``state.json`` in one atomic rename, and only then deletes the previous tensor
file. A kill at any moment therefore leaves either the old manifest, whose tensor file is
still there, or the new one, whose tensor file is complete; at worst an orphaned tensor
file, which the next save removes. A directory swap cannot do this in one step (POSIX
cannot rename a directory over a non-empty one), so it has a moment with no checkpoint.
The checksum in the manifest catches what a rename cannot: a file truncated or changed
on disk afterwards.

Only the latest checkpoint is kept. The best epoch's weights travel inside it, because
early stopping keeps them in memory and a resumed run must end with the same ones.

Loading checks everything before it changes anything: the manifest's structure, the
tensor file's size, checksum and safetensors header, that every reference names a tensor
of the recorded dtype and shape, and that the model, optimizer, scheduler, loss scaler and
generators have the shapes the checkpoint was written for. A failure is one
``RunDirError`` sentence naming the file and what to do; the objects are left untouched.

Continuing a run bit for bit also needs the random generators (torch's, CUDA's,
NumPy's global, Python's ``random`` and any named ``torch.Generator``) and the position
in the data order; ``TrainingState`` holds the position and counters, and the generator
states are saved and restored here.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from tltk.errors import DiskError, RunDirError, printable
from tltk.fileio import write_json, write_safetensors
from tltk.rundir import METRICS

CHECKPOINT_DIR = "checkpoint"
MANIFEST = "state.json"
FORMAT = "tltk-checkpoint"
FORMAT_VERSION = 1

_TENSOR_FILE = re.compile(r"^state-[0-9a-f]{12}\.safetensors$")
_STALE = re.compile(r"^(state-[0-9a-f]{12}\.safetensors|\.state.*\.tmp)$")
_HASH_CHUNK = 1 << 20
_NUMPY_KEYS = 624
_PYTHON_WORDS = 625
_UINT32 = 1 << 32


# --- what the trainer keeps between steps ----------------------------------------------


@dataclass
class TrainingState:
    """The trainer's counters: where in the data order the run is and what it has seen.

    ``epoch`` is the epoch in progress (0-based); ``batches_done`` how many of its batches
    are trained, so a resumed run skips exactly those (0: the epoch has not started).
    The ``epoch_*`` sums are the running totals of the unfinished epoch, so its
    ``train_loss`` and ``train_accuracy`` come out as if it had never stopped.
    ``metrics_bytes`` is the length of metrics.jsonl when the checkpoint was written:
    rows logged after it are cut on resume, since the resumed run logs them again.
    """

    epoch: int = 0
    batches_done: int = 0
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    epoch_loss_sum: float = 0.0
    epoch_correct: int = 0
    epoch_seen: int = 0
    seconds: float = 0.0
    metrics_bytes: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


# How each TrainingState field is checked when it is read back.
_STATE_KINDS = {
    "epoch": "count", "batches_done": "count", "global_step": "count",
    "best_metric": "number?", "best_epoch": "count?", "epochs_without_improvement": "count",
    "stopped_early": "bool", "epoch_loss_sum": "number", "epoch_correct": "count", "epoch_seen": "count",
    "seconds": "number", "metrics_bytes": "count?", "history": "rows", "extra": "object",
}
assert set(_STATE_KINDS) == {f.name for f in fields(TrainingState)}


@dataclass
class Resumed:
    """What ``load_checkpoint`` hands back besides the objects it restored in place."""

    state: TrainingState
    best_model: dict[str, torch.Tensor] | None  # the best epoch's weights (on the CPU), if any


# --- public functions -------------------------------------------------------------------


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def has_checkpoint(run_dir: Path) -> bool:
    return (checkpoint_dir(run_dir) / MANIFEST).is_file()


def remove_checkpoint(run_dir: Path) -> None:
    """A fresh run in an old run's directory must not be resumable from the old run's state."""
    shutil.rmtree(checkpoint_dir(run_dir), ignore_errors=True)


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """A short hash of the run's settings, the same for equal settings in any key order."""
    canonical = json.dumps(_plain(config), sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    scaler: torch.amp.GradScaler | None,
    state: TrainingState,
    *,
    generators: Mapping[str, torch.Generator] | None = None,
    best_model: Mapping[str, torch.Tensor] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Write the run's complete state to ``RUN/checkpoint`` and return that folder.

    Call it between steps (after ``scheduler.step()``), so that the generator states it
    records are those the next batch would draw from. ``config`` (JSON values) is what a
    resumed run must match; ``generators`` are the trainer's own ``torch.Generator``s by name.
    """
    from tltk import __version__

    directory = checkpoint_dir(run_dir)
    table = _TensorTable()
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tltk_version": __version__,
        "torch_version": torch.__version__,
        "config_fingerprint": config_fingerprint(config) if config is not None else None,
        "config": _plain(config) if config is not None else None,
        "training": _state_record(state),
        "model": table.encode(model.state_dict(), "model"),
        "best_model": table.encode(dict(best_model), "best_model") if best_model is not None else None,
        "optimizer": table.encode(optimizer.state_dict(), "optimizer"),
        "scheduler": table.encode(scheduler.state_dict(), "scheduler") if scheduler is not None else None,
        "scaler": table.encode(scaler.state_dict(), "scaler") if scaler is not None else None,
        "rng": _rng_record(table, generators or {}),
    }
    tensor_name = f"state-{secrets.token_hex(6)}.safetensors"
    try:
        write_safetensors(directory / tensor_name, table.tensors, metadata={"format": "pt", "producer": "tltk"})
        manifest["tensor_file"] = tensor_name
        manifest["tensor_bytes"] = (directory / tensor_name).stat().st_size
        manifest["tensor_sha256"] = _sha256(directory / tensor_name)
        write_json(directory / MANIFEST, manifest)  # the commit: from here on the new pair is the checkpoint
    except DiskError as exc:
        _remove_uncommitted(directory, tensor_name)
        then = (f"continue from the checkpoint before it with `tltk finetune --resume {run_dir}`" if has_checkpoint(run_dir)
                else "no earlier checkpoint exists, so train again")
        raise DiskError(f"{str(exc).rstrip('.')}; {then} once there is space.") from exc
    _fsync_directory(directory)
    _remove_stale_files(directory, keep=tensor_name)
    return directory


def _remove_uncommitted(directory: Path, tensor_name: str) -> None:
    """Remove a tensor file whose save failed, unless the manifest already names it (then it is the checkpoint)."""
    try:
        committed = json.loads((directory / MANIFEST).read_text(encoding="utf-8")).get("tensor_file") == tensor_name
    except (OSError, ValueError, AttributeError):
        committed = False
    if not committed:
        (directory / tensor_name).unlink(missing_ok=True)


def load_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    scaler: torch.amp.GradScaler | None = None,
    *,
    generators: Mapping[str, torch.Generator] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Resumed:
    """Restore ``RUN/checkpoint`` into the given objects and the global random generators.

    The objects must be built as the run built them (same model, parameter groups,
    scheduler kind, loss scaling); ``config``, when given, must equal the one saved.
    Everything is checked before anything is changed, so a ``RunDirError`` leaves the
    objects and generators as they were.
    """
    directory = checkpoint_dir(run_dir)
    manifest = read_manifest(directory)
    _check_compatible(manifest, directory, config)
    tensors = _read_tensors(directory, manifest)
    restore = _Restore.plan(manifest, tensors, directory, model, optimizer, scheduler, scaler, generators or {})
    restore.apply()
    return Resumed(restore.state, restore.best_model)


def read_training_state(run_dir: Path) -> TrainingState:
    """The counters alone (where the run stopped), without reading the tensors."""
    return read_manifest(checkpoint_dir(run_dir)).state


def rewind_metrics_log(run_dir: Path, state: TrainingState) -> None:
    """Cut metrics.jsonl back to its length at the checkpoint: the resumed run writes the
    rows of the steps after it again, and a row must not appear twice."""
    path = Path(run_dir) / METRICS
    if state.metrics_bytes is None or not path.is_file():
        return
    if path.stat().st_size > state.metrics_bytes:
        with open(path, "r+b") as handle:
            handle.truncate(state.metrics_bytes)


# --- saving -------------------------------------------------------------------------------


class _TensorTable:
    """Tensors to write, by key, with the JSON that stands in for them in the manifest.

    A tensor that appears twice (tied weights) is stored once and referenced twice; one
    that overlaps another's memory is copied, since safetensors refuses shared storage.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._views: dict[tuple[Any, ...], str] = {}
        self._storages: set[tuple[str, int]] = set()

    def encode(self, value: Any, path: str) -> Any:
        """``value`` as JSON: tensors become references, int-keyed dicts and tuples are tagged
        so that they come back as what they were (``state_dict`` equality depends on it)."""
        if isinstance(value, torch.Tensor):
            return self._reference(value, path)
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, tuple):
            return {"$tuple": [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            return self._encode_dict(value, path)
        raise TypeError(f"{path} holds a {type(value).__name__}, which a checkpoint cannot store without pickle")

    def _encode_dict(self, value: dict[Any, Any], path: str) -> Any:
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: self.encode(v, f"{path}/{k}") for k, v in value.items()}
        for key in value:
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise TypeError(f"{path} has a key of type {type(key).__name__}; a checkpoint keeps int and str keys")
        return {"$map": [[k, self.encode(v, f"{path}/{k}")] for k, v in value.items()]}

    def _reference(self, tensor: torch.Tensor, path: str) -> dict[str, Any]:
        tensor = tensor.detach()
        view = None
        if tensor.numel() > 0:
            storage = (str(tensor.device), tensor.untyped_storage().data_ptr())
            view = (*storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
            if view in self._views:
                return _tensor_ref(self._views[view], tensor)
            if storage in self._storages:
                tensor = tensor.clone()
            self._storages.add(storage)
        key = path
        while key in self.tensors:
            key += "'"
        self.tensors[key] = tensor
        if view is not None:
            self._views[view] = key
        return _tensor_ref(key, tensor)


def _tensor_ref(key: str, tensor: torch.Tensor) -> dict[str, Any]:
    return {"$tensor": key, "dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape)}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _state_record(state: TrainingState) -> dict[str, Any]:
    record = asdict(state)
    json.dumps(record)  # fail here, before anything is written, on a value JSON cannot hold
    return record


def _rng_record(table: _TensorTable, generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    """Every generator training draws from. CUDA's are saved only once CUDA is in use:
    asking for them would start CUDA on every GPU of a CPU run."""
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [table.encode(s, f"rng/cuda/{i}") for i, s in enumerate(torch.cuda.get_rng_state_all())]
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)  # type: ignore[misc]
    version, internal, gauss_next = random.getstate()
    return {
        "torch": table.encode(torch.get_rng_state(), "rng/torch"),
        "cuda": cuda,
        "numpy": {
            "keys": table.encode(torch.from_numpy(np.asarray(keys, dtype=np.int64)), "rng/numpy"),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian),
        },
        "python": {
            "version": version,
            "internal": table.encode(torch.tensor(internal, dtype=torch.int64), "rng/python"),
            "gauss_next": gauss_next,
        },
        "generators": {name: table.encode(g.get_state(), f"rng/generators/{name}") for name, g in generators.items()},
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_directory(directory: Path) -> None:
    """Make the renames durable too, not only the files' contents (a power cut, not just a kill)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_files(directory: Path, keep: str) -> None:
    """Earlier tensor files and the temporary files of saves that were killed."""
    for path in directory.iterdir():
        if path.name != keep and _STALE.match(path.name):
            path.unlink(missing_ok=True)


def _plain(value: Any) -> Any:
    """JSON's own view of ``value`` (tuples become lists), so saved and given configs compare equal."""
    return json.loads(json.dumps(value, allow_nan=True))


# --- reading the manifest -----------------------------------------------------------------


class _Damaged(Exception):
    """Raised inside the reader with what is wrong; turned into one RunDirError at the edge."""


@dataclass
class Manifest:
    """``state.json`` with its top level checked; the trees in it are checked as they are decoded."""

    raw: dict[str, Any]
    state: TrainingState
    tensor_file: str
    tensor_bytes: int
    tensor_sha256: str


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    if not directory.is_dir():
        raise RunDirError(f"{directory.parent} has no checkpoint to resume from; start the run without --resume.")
    if not path.is_file():
        raise RunDirError(f"{directory} has no {MANIFEST}, so it holds no complete checkpoint; "
                          "start the run again without --resume.")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RunDirError(f"{path} cannot be read ({printable(str(exc))}); check its permissions.") from exc
    return parse_manifest(data, path)


def parse_manifest(data: bytes | str, path: Path) -> Manifest:
    """The manifest in ``data``, or one RunDirError naming ``path``; never another exception."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        raw = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _damaged(path, f"it is not valid JSON ({printable(str(exc))[:120]})") from exc
    try:
        return _manifest_from(raw)
    except _Damaged as exc:
        raise _damaged(path, str(exc)) from exc


def _damaged(path: Path, why: str) -> RunDirError:
    return RunDirError(f"{path} is damaged: {why}; delete {path.parent} and train again without --resume.")


_TOP_LEVEL = {
    "format", "format_version", "tltk_version", "torch_version", "config_fingerprint", "config", "training",
    "model", "best_model", "optimizer", "scheduler", "scaler", "rng", "tensor_file", "tensor_bytes", "tensor_sha256",
}


def _manifest_from(raw: Any) -> Manifest:
    if not isinstance(raw, dict):
        raise _Damaged(f"it holds a JSON {type(raw).__name__}, not an object")
    if raw.get("format") != FORMAT:
        raise _Damaged(f"it is not a {FORMAT} manifest")
    if raw.get("format_version") != FORMAT_VERSION:
        version = _show(raw.get("format_version"))
        raise _Damaged(f"it has format version {version}, and this tltk reads {FORMAT_VERSION}")
    missing = sorted(_TOP_LEVEL - set(raw))
    if missing:
        raise _Damaged(f"it lacks {', '.join(missing)}")
    tensor_file = raw["tensor_file"]
    if not isinstance(tensor_file, str) or not _TENSOR_FILE.match(tensor_file):
        raise _Damaged(f"tensor_file {_show(tensor_file)} is not a checkpoint tensor file name")
    size = raw["tensor_bytes"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise _Damaged(f"tensor_bytes {_show(size)} is not a byte count")
    sha = raw["tensor_sha256"]
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise _Damaged(f"tensor_sha256 {_show(sha)} is not a SHA-256 digest")
    for key in ("tltk_version", "torch_version"):
        if not isinstance(raw[key], str):
            raise _Damaged(f"{key} {_show(raw[key])} is not a version string")
    if raw["config_fingerprint"] is not None and not isinstance(raw["config_fingerprint"], str):
        raise _Damaged("config_fingerprint is not a string")
    return Manifest(raw, _state_from(raw["training"]), tensor_file, size, sha)


def _state_from(record: Any) -> TrainingState:
    if not isinstance(record, dict):
        raise _Damaged("training is not an object")
    if set(record) != set(_STATE_KINDS):
        odd = sorted(set(record) ^ set(_STATE_KINDS))
        raise _Damaged(f"training has missing or unknown fields ({', '.join(printable(str(k)) for k in odd)})")
    for name, kind in _STATE_KINDS.items():
        if not _is_kind(record[name], kind):
            raise _Damaged(f"training.{name} is {_show(record[name])}, not a {kind.rstrip('?')}")
    return TrainingState(**record)


def _is_kind(value: Any, kind: str) -> bool:
    if kind.endswith("?"):
        return value is None or _is_kind(value, kind[:-1])
    if kind == "count":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "rows":
        return isinstance(value, list) and all(isinstance(row, dict) for row in value)
    raise AssertionError(kind)


def _show(value: Any) -> str:
    return printable(repr(value))[:60]


def _check_compatible(manifest: Manifest, directory: Path, config: Mapping[str, Any] | None) -> None:
    """A checkpoint continues the run that wrote it: same tltk, same settings."""
    from tltk import __version__

    saved_version = manifest.raw["tltk_version"]
    if saved_version != __version__:
        raise RunDirError(f"{directory} was written by tltk {printable(saved_version)} and this is tltk {__version__}; "
                          f"finish the run with tltk {printable(saved_version)} or train it again from the start.")
    saved_fingerprint = manifest.raw["config_fingerprint"]
    if config is None or saved_fingerprint is None or saved_fingerprint == config_fingerprint(config):
        return
    where, before, now = _first_difference(manifest.raw["config"], _plain(config), "")
    raise RunDirError(f"{directory} belongs to a run with different settings ({where or 'config'} was {before}, "
                      f"now {now}); resume with the run's own settings or start a new run in another --out.")


def _first_difference(saved: Any, given: Any, where: str) -> tuple[str, str, str]:
    if isinstance(saved, dict) and isinstance(given, dict):
        for key in sorted(set(saved) | set(given), key=str):
            if saved.get(key, _ABSENT) != given.get(key, _ABSENT):
                return _first_difference(saved.get(key, _ABSENT), given.get(key, _ABSENT), f"{where}.{key}".lstrip("."))
    if isinstance(saved, list) and isinstance(given, list) and len(saved) == len(given):
        for i, (a, b) in enumerate(zip(saved, given)):
            if a != b:
                return _first_difference(a, b, f"{where}[{i}]")
    return printable(where), _show(saved), _show(given)


class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()


# --- reading the tensors --------------------------------------------------------------------


def _read_tensors(directory: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    """The tensor file's tensors, once its size, checksum and header agree with the manifest."""
    from safetensors import safe_open

    path = directory / manifest.tensor_file
    redo = f"delete {directory} and train again without --resume"
    if not path.is_file():
        raise RunDirError(f"{path} named by {MANIFEST} is missing; {redo}.")
    size = path.stat().st_size
    if size != manifest.tensor_bytes:
        state = "truncated" if size < manifest.tensor_bytes else "longer than written"
        raise RunDirError(f"{path} is {state} ({size} bytes, {manifest.tensor_bytes} expected); {redo}.")
    if _sha256(path) != manifest.tensor_sha256:
        raise RunDirError(f"{path} is corrupt (its SHA-256 differs from the one recorded when it was written); {redo}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # whatever a damaged file makes the safetensors reader raise
        raise RunDirError(f"{path} is not a readable safetensors file ({printable(str(exc))[:120]}); {redo}.") from exc


class _Decoder:
    """Turns manifest trees back into values, resolving tensor references against the file."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.used: set[str] = set()

    def decode(self, node: Any, where: str) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.decode(v, f"{where}[{i}]") for i, v in enumerate(node)]
        if not isinstance(node, dict):
            raise _Damaged(f"{where} holds a {type(node).__name__}")
        if "$tensor" in node:
            return self._tensor(node, where)
        if "$tuple" in node:
            if set(node) != {"$tuple"} or not isinstance(node["$tuple"], list):
                raise _Damaged(f"{where} is a malformed tuple")
            return tuple(self.decode(v, f"{where}[{i}]") for i, v in enumerate(node["$tuple"]))
        if "$map" in node:
            return self._map(node, where)
        if any(key.startswith("$") for key in node):
            raise _Damaged(f"{where} has an unknown tag")
        return {key: self.decode(v, f"{where}.{key}") for key, v in node.items()}

    def _map(self, node: dict[str, Any], where: str) -> dict[Any, Any]:
        items = node["$map"]
        if set(node) != {"$map"} or not isinstance(items, list):
            raise _Damaged(f"{where} is a malformed mapping")
        result: dict[Any, Any] = {}
        for item in items:
            if not isinstance(item, list) or len(item) != 2:
                raise _Damaged(f"{where} has an entry that is not a [key, value] pair")
            key = item[0]
            if isinstance(key, bool) or not isinstance(key, (int, str)) or key in result:
                raise _Damaged(f"{where} has a key {_show(key)} that is not a unique int or string")
            result[key] = self.decode(item[1], f"{where}[{key!r}]")
        return result

    def _tensor(self, node: dict[str, Any], where: str) -> torch.Tensor:
        key, dtype, shape = node.get("$tensor"), node.get("dtype"), node.get("shape")
        if set(node) != {"$tensor", "dtype", "shape"} or not isinstance(key, str):
            raise _Damaged(f"{where} is a malformed tensor reference")
        if key not in self.tensors:
            raise _Damaged(f"{where} names tensor {_show(key)}, which the tensor file does not hold")
        tensor = self.tensors[key]
        if dtype != _dtype_name(tensor.dtype) or shape != list(tensor.shape):
            raise _Damaged(f"{where} expects a {_show(dtype)} tensor of shape {_show(shape)}, but the tensor file "
                           f"holds {_dtype_name(tensor.dtype)} {list(tensor.shape)}")
        self.used.add(key)
        return tensor

    def check_all_used(self) -> None:
        unused = sorted(set(self.tensors) - self.used)
        if unused:
            raise _Damaged(f"the tensor file holds {len(unused)} tensors the manifest does not mention "
                           f"({_show(unused[0])})")


# --- fitting the checkpoint to the live objects --------------------------------------------


class _Mismatch(Exception):
    """The checkpoint is intact but was written for a differently built run."""


@dataclass
class _Restore:
    """Every value to restore, checked against the live objects, applied only once all fit."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any | None
    scaler: torch.amp.GradScaler | None
    generators: Mapping[str, torch.Generator]
    state: TrainingState
    model_state: dict[str, torch.Tensor]
    best_model: dict[str, torch.Tensor] | None
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any] | None
    scaler_state: dict[str, Any] | None
    rng: "_RngStates"

    @classmethod
    def plan(
        cls,
        manifest: Manifest,
        tensors: dict[str, torch.Tensor],
        directory: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None,
        scaler: torch.amp.GradScaler | None,
        generators: Mapping[str, torch.Generator],
    ) -> "_Restore":
        raw = manifest.raw
        decoder = _Decoder(tensors)
        try:
            decoded = {key: decoder.decode(raw[key], key)
                       for key in ("model", "best_model", "optimizer", "scheduler", "scaler")}
            rng = _RngStates.decode(raw["rng"], decoder)
            decoder.check_all_used()
        except (_Damaged, RecursionError) as exc:
            raise _damaged(directory / MANIFEST, str(exc) or "it is nested too deeply") from exc
        try:
            live_model = model.state_dict()
            _check_model_tensors(decoded["model"], live_model, "model")
            if decoded["best_model"] is not None:
                _check_model_tensors(decoded["best_model"], live_model, "best_model")
            _check_optimizer(decoded["optimizer"], optimizer)
            _check_optional("scheduler", decoded["scheduler"], scheduler)
            _check_optional("scaler", decoded["scaler"], scaler)
            rng.check(generators)
        except _Mismatch as exc:
            raise RunDirError(f"{directory} does not fit this run: {exc}; resume with the settings the run "
                              "was started with, or start a new run in another --out.") from exc
        return cls(model, optimizer, scheduler, scaler, generators, manifest.state, decoded["model"],
                   decoded["best_model"], decoded["optimizer"], decoded["scheduler"], decoded["scaler"], rng)

    def apply(self) -> None:
        self.model.load_state_dict(self.model_state)
        self.optimizer.load_state_dict(self.optimizer_state)
        if self.scheduler is not None and self.scheduler_state is not None:
            self.scheduler.load_state_dict(self.scheduler_state)
        if self.scaler is not None and self.scaler_state is not None:
            self.scaler.load_state_dict(self.scaler_state)
        self.rng.apply(self.generators)


def _check_model_tensors(saved: Any, live: dict[str, torch.Tensor], what: str) -> None:
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise _Mismatch(f"its {what} is not a table of tensors")
    missing = [k for k in live if k not in saved]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise _Mismatch(f"its {what} has no tensor {printable(missing[0])}{more}, which this model has")
    extra = [k for k in saved if k not in live]
    if extra:
        raise _Mismatch(f"its {what} has tensor {printable(str(extra[0]))}, which this model lacks")
    for key, tensor in live.items():
        if saved[key].shape != tensor.shape or saved[key].dtype != tensor.dtype:
            raise _Mismatch(f"{what} tensor {printable(key)} is {_dtype_name(saved[key].dtype)} "
                            f"{list(saved[key].shape)} there and {_dtype_name(tensor.dtype)} {list(tensor.shape)} here")


def _check_optimizer(saved: Any, optimizer: torch.optim.Optimizer) -> None:
    live = optimizer.state_dict()
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
        raise _Mismatch("its optimizer state is not an optimizer state_dict")
    _same_structure(saved["param_groups"], live["param_groups"], "optimizer param_groups")
    parameters: dict[int, torch.Tensor] = {}
    for index, (saved_group, live_group, group) in enumerate(
        zip(saved["param_groups"], live["param_groups"], optimizer.param_groups)
    ):
        if saved_group["params"] != live_group["params"]:
            raise _Mismatch(f"optimizer parameter group {index} holds other parameters there than here")
        parameters.update(zip(live_group["params"], group["params"]))
    if not isinstance(saved["state"], dict):
        raise _Mismatch("its optimizer state is not a table per parameter")
    schema = _state_schema(optimizer)
    for index, entry in saved["state"].items():
        if index not in parameters or not isinstance(entry, dict):
            raise _Mismatch(f"its optimizer has state for a parameter {_show(index)} this optimizer does not have")
        _check_parameter_state(entry, parameters[index], schema, f"optimizer state of parameter {index}")


# The buffers torch's optimizers keep per parameter: "param" is a tensor of the parameter's
# shape, "scalar" a 0-d tensor; a trailing "?" allows None (or, for keys, absence).
_ADAM_STATE = {"step": "scalar", "exp_avg": "param", "exp_avg_sq": "param", "max_exp_avg_sq": "param??"}
_SGD_STATE = {"momentum_buffer": "param?"}


def _state_schema(optimizer: torch.optim.Optimizer) -> dict[str, str] | None:
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return _ADAM_STATE
    if isinstance(optimizer, torch.optim.SGD):
        return _SGD_STATE
    return None  # another optimizer: tensors of the parameter's shape or 0-d, plain numbers


def _check_parameter_state(
    entry: dict[Any, Any], param: torch.Tensor, schema: dict[str, str] | None, where: str
) -> None:
    if schema is not None:
        required = {k for k, kind in schema.items() if not kind.endswith("??")}
        if not required <= set(entry) <= set(schema):
            raise _Mismatch(f"{where} has buffers {printable(str(sorted(map(str, entry))))[:80]}, not those "
                            f"this optimizer keeps ({', '.join(sorted(schema))})")
    for key, value in entry.items():
        kind = schema[key].rstrip("?") if schema is not None else "any"
        nullable = schema is not None and schema[key].endswith("?")
        if value is None and nullable:
            continue
        if kind == "param" and not (isinstance(value, torch.Tensor) and value.shape == param.shape
                                    and value.is_floating_point()):
            raise _Mismatch(f"{where} has {printable(str(key))} {_describe(value)}, not a float tensor of shape "
                            f"{list(param.shape)}")
        if kind == "scalar" and not (isinstance(value, torch.Tensor) and value.dim() == 0
                                     and value.is_floating_point()):
            raise _Mismatch(f"{where} has {printable(str(key))} {_describe(value)}, not a 0-d float tensor")
        if kind == "any" and not _plausible_buffer(value, param):
            raise _Mismatch(f"{where} has {printable(str(key))} {_describe(value)}, which does not fit its parameter")


def _plausible_buffer(value: Any, param: torch.Tensor) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 or value.shape == param.shape
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {_dtype_name(value.dtype)} tensor of shape {list(value.shape)}"
    return _show(value)


def _check_optional(what: str, saved: Any, live_object: Any | None) -> None:
    if live_object is None:
        if saved is not None:
            raise _Mismatch(f"it holds {what} state and this run has no {what}")
        return
    if saved is None:
        raise _Mismatch(f"it holds no {what} state and this run has a {what}")
    live = live_object.state_dict()
    if what == "scaler" and bool(saved) != bool(live):
        raise _Mismatch("its loss scaling is " + ("on" if saved else "off") + " and this run's is " +
                        ("on" if live else "off") + " (a different --precision)")
    _same_structure(saved, live, what)


def _same_structure(saved: Any, live: Any, where: str) -> None:
    """``saved`` has the shape of ``live``: same keys, lengths and kinds of values throughout.

    Schedulers restore by ``__dict__.update``, so a value of the wrong kind would surface
    only later, in the middle of training; checking against the live object's own state
    catches it at load time for any scheduler."""
    if isinstance(live, torch.Tensor):
        if not isinstance(saved, torch.Tensor) or saved.shape != live.shape or saved.dtype != live.dtype:
            raise _Mismatch(f"{where} is {_describe(saved)} there and {_describe(live)} here")
        return
    if isinstance(live, dict):
        if not isinstance(saved, dict) or set(saved) != set(live):
            raise _Mismatch(f"{where} has entries {_keys(saved)} there and {_keys(live)} here")
        for key in live:
            _same_structure(saved[key], live[key], f"{where}.{key}")
        return
    if isinstance(live, (list, tuple)):
        if type(saved) is not type(live) or len(saved) != len(live):
            raise _Mismatch(f"{where} is {_show(saved)} there and a {type(live).__name__} of {len(live)} here")
        for i, (a, b) in enumerate(zip(saved, live)):
            _same_structure(a, b, f"{where}[{i}]")
        return
    if _kind(saved) != _kind(live):
        raise _Mismatch(f"{where} is {_show(saved)} there and {_show(live)} here")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def _keys(value: Any) -> str:
    if not isinstance(value, dict):
        return _show(value)
    return printable(str(sorted(map(str, value))))[:80]


# --- random generators ---------------------------------------------------------------------


@dataclass
class _RngStates:
    """The generator states from the manifest, checked by setting them on throwaway
    generators first, so that restoring the real ones cannot fail halfway."""

    torch_state: torch.Tensor
    cuda_states: list[torch.Tensor]
    numpy_state: tuple[str, np.ndarray, int, int, float]
    python_state: tuple[int, tuple[int, ...], float | None]
    generator_states: dict[str, torch.Tensor]

    @classmethod
    def decode(cls, node: Any, decoder: _Decoder) -> "_RngStates":
        if not isinstance(node, dict) or set(node) != {"torch", "cuda", "numpy", "python", "generators"}:
            raise _Damaged("rng does not list the torch, cuda, numpy, python and generators states")
        torch_state = _byte_state(decoder.decode(node["torch"], "rng.torch"), "rng.torch")
        cuda = node["cuda"]
        if not isinstance(cuda, list):
            raise _Damaged("rng.cuda is not a list")
        cuda_states = [_byte_state(decoder.decode(s, f"rng.cuda[{i}]"), f"rng.cuda[{i}]") for i, s in enumerate(cuda)]
        generators = node["generators"]
        if not isinstance(generators, dict):
            raise _Damaged("rng.generators is not an object")
        generator_states = {name: _byte_state(decoder.decode(s, f"rng.generators.{name}"), f"rng.generators.{name}")
                            for name, s in generators.items()}
        numpy_state = _numpy_state(node["numpy"], decoder)
        python_state = _python_state(node["python"], decoder)
        return cls(torch_state, cuda_states, numpy_state, python_state, generator_states)

    def check(self, generators: Mapping[str, torch.Generator]) -> None:
        _try_state("the torch generator state", lambda: torch.Generator().set_state(self.torch_state))
        _try_state("the NumPy generator state", lambda: np.random.RandomState().set_state(self.numpy_state))
        _try_state("the Python random state", lambda: random.Random().setstate(self.python_state))
        for name, generator in generators.items():
            if name not in self.generator_states:
                raise _Mismatch(f"it has no state for the generator '{printable(name)}'")
            state = self.generator_states[name]
            if state.numel() != generator.get_state().numel():
                raise _Mismatch(f"its state for the generator '{printable(name)}' is for another kind of generator")
            if generator.device.type == "cpu":
                _try_state(f"the state of generator '{printable(name)}'",
                           lambda s=state: torch.Generator().set_state(s))
        if self.cuda_states and torch.cuda.is_available():
            expected = torch.cuda.get_rng_state(0).numel()
            if any(s.numel() != expected for s in self.cuda_states):
                raise _Mismatch("its CUDA generator states are not those of this CUDA build")

    def apply(self, generators: Mapping[str, torch.Generator]) -> None:
        """CUDA states go to the devices this machine has; on a machine without CUDA they are
        dropped, since a run moved to another device cannot be bit-identical anyway."""
        torch.set_rng_state(self.torch_state)
        if self.cuda_states and torch.cuda.is_available():
            for device in range(min(len(self.cuda_states), torch.cuda.device_count())):
                torch.cuda.set_rng_state(self.cuda_states[device], device)
        np.random.set_state(self.numpy_state)
        random.setstate(self.python_state)
        for name, generator in generators.items():
            generator.set_state(self.generator_states[name])


def _byte_state(value: Any, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise _Damaged(f"{where} is not a generator state (a 1-d uint8 tensor)")
    return value


def _numpy_state(node: Any, decoder: _Decoder) -> tuple[str, np.ndarray, int, int, float]:
    if not isinstance(node, dict) or set(node) != {"keys", "pos", "has_gauss", "cached_gaussian"}:
        raise _Damaged("rng.numpy is not a NumPy generator state")
    keys = decoder.decode(node["keys"], "rng.numpy.keys")
    if not (isinstance(keys, torch.Tensor) and keys.dtype == torch.int64 and keys.shape == (_NUMPY_KEYS,)
            and bool(((keys >= 0) & (keys < _UINT32)).all())):
        raise _Damaged(f"rng.numpy.keys is not {_NUMPY_KEYS} 32-bit words")
    pos, has_gauss, cached = node["pos"], node["has_gauss"], node["cached_gaussian"]
    if not (_is_kind(pos, "count") and pos <= _NUMPY_KEYS and has_gauss in (0, 1) and not isinstance(has_gauss, bool)
            and _is_kind(cached, "number")):
        raise _Damaged("rng.numpy has a position, has_gauss or cached_gaussian out of range")
    return "MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, float(cached)


def _python_state(node: Any, decoder: _Decoder) -> tuple[int, tuple[int, ...], float | None]:
    if not isinstance(node, dict) or set(node) != {"version", "internal", "gauss_next"}:
        raise _Damaged("rng.python is not a Python random state")
    internal = decoder.decode(node["internal"], "rng.python.internal")
    if not (isinstance(internal, torch.Tensor) and internal.dtype == torch.int64 and internal.shape == (_PYTHON_WORDS,)
            and bool(((internal >= 0) & (internal < _UINT32)).all())):
        raise _Damaged(f"rng.python.internal is not {_PYTHON_WORDS} 32-bit words")
    version, gauss_next = node["version"], node["gauss_next"]
    if not _is_kind(version, "count") or not _is_kind(gauss_next, "number?"):
        raise _Damaged("rng.python has a version or gauss_next of the wrong kind")
    return version, tuple(internal.tolist()), None if gauss_next is None else float(gauss_next)


def _try_state(what: str, set_state: Any) -> None:
    try:
        set_state()
    except (RuntimeError, ValueError, TypeError, OverflowError) as exc:
        raise _Mismatch(f"{what} is not one this machine's generator accepts ({printable(str(exc))[:80]})") from exc
