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
in the data order; ``TrainingState`` holds the position and counters.

This module holds the two files and their checks; the pieces it puts together live
beside it: the JSON form of the states and their tensor references
(``tltk.train.state_json``), the generators' states (``tltk.train.rng_state``), and the
check that the saved states fit the live objects before any is restored
(``tltk.train.restore``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from tltk.errors import DiskError, RunDirError, printable
from tltk.fileio import write_json, write_safetensors
from tltk.rundir import METRICS
from tltk.train.restore import SavedStates
from tltk.train.rng_state import rng_record
from tltk.train.state_json import Damaged, Mismatch, TensorTable, is_kind, show

CHECKPOINT_DIR = "checkpoint"
MANIFEST = "state.json"
FORMAT = "tltk-checkpoint"
FORMAT_VERSION = 1

_TENSOR_FILE = re.compile(r"^state-[0-9a-f]{12}\.safetensors$")
_STALE = re.compile(r"^(state-[0-9a-f]{12}\.safetensors|\.state.*\.tmp)$")
_HASH_CHUNK = 1 << 20


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
    table = TensorTable()
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
        "rng": rng_record(table, generators or {}),
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
    try:
        saved = SavedStates.decode(manifest.raw, tensors)
    except (Damaged, RecursionError) as exc:
        raise _damaged(directory / MANIFEST, str(exc) or "it is nested too deeply") from exc
    live = (model, optimizer, scheduler, scaler, generators or {})
    try:
        saved.check_fit(*live)
    except Mismatch as exc:
        raise RunDirError(f"{directory} does not fit this run: {exc}; resume with the settings the run "
                          "was started with, or start a new run in another --out.") from exc
    saved.restore(*live)
    return Resumed(manifest.state, saved.best_model)


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


# --- writing the files ----------------------------------------------------------------------


def _state_record(state: TrainingState) -> dict[str, Any]:
    record = asdict(state)
    json.dumps(record)  # fail here, before anything is written, on a value JSON cannot hold
    return record


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
    except Damaged as exc:
        raise _damaged(path, str(exc)) from exc


def _damaged(path: Path, why: str) -> RunDirError:
    return RunDirError(f"{path} is damaged: {why}; delete {path.parent} and train again without --resume.")


_TOP_LEVEL = {
    "format", "format_version", "tltk_version", "torch_version", "config_fingerprint", "config", "training",
    "model", "best_model", "optimizer", "scheduler", "scaler", "rng", "tensor_file", "tensor_bytes", "tensor_sha256",
}


def _manifest_from(raw: Any) -> Manifest:
    if not isinstance(raw, dict):
        raise Damaged(f"it holds a JSON {type(raw).__name__}, not an object")
    if raw.get("format") != FORMAT:
        raise Damaged(f"it is not a {FORMAT} manifest")
    if raw.get("format_version") != FORMAT_VERSION:
        version = show(raw.get("format_version"))
        raise Damaged(f"it has format version {version}, and this tltk reads {FORMAT_VERSION}")
    missing = sorted(_TOP_LEVEL - set(raw))
    if missing:
        raise Damaged(f"it lacks {', '.join(missing)}")
    tensor_file = raw["tensor_file"]
    if not isinstance(tensor_file, str) or not _TENSOR_FILE.match(tensor_file):
        raise Damaged(f"tensor_file {show(tensor_file)} is not a checkpoint tensor file name")
    size = raw["tensor_bytes"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise Damaged(f"tensor_bytes {show(size)} is not a byte count")
    sha = raw["tensor_sha256"]
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise Damaged(f"tensor_sha256 {show(sha)} is not a SHA-256 digest")
    for key in ("tltk_version", "torch_version"):
        if not isinstance(raw[key], str):
            raise Damaged(f"{key} {show(raw[key])} is not a version string")
    if raw["config_fingerprint"] is not None and not isinstance(raw["config_fingerprint"], str):
        raise Damaged("config_fingerprint is not a string")
    return Manifest(raw, _state_from(raw["training"]), tensor_file, size, sha)


def _state_from(record: Any) -> TrainingState:
    if not isinstance(record, dict):
        raise Damaged("training is not an object")
    if set(record) != set(_STATE_KINDS):
        odd = sorted(set(record) ^ set(_STATE_KINDS))
        raise Damaged(f"training has missing or unknown fields ({', '.join(printable(str(k)) for k in odd)})")
    for name, kind in _STATE_KINDS.items():
        if not is_kind(record[name], kind):
            raise Damaged(f"training.{name} is {show(record[name])}, not a {kind.rstrip('?')}")
    return TrainingState(**record)


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
    return printable(where), show(saved), show(given)


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
