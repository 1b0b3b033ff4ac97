"""The run directory: everything needed to rebuild and judge a trained model.

``config.json`` (model, strategy, training and data settings, class names,
preprocessing, library versions), ``model.safetensors`` (the whole model's weights),
``metrics.jsonl`` (one row per step and per epoch) and ``summary.json`` (final figures).
Commands after training take the directory, never the original command line.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, TextIO

import torch

from tltk.errors import RunDirError
from tltk.fileio import disk_errors, write_json, write_safetensors

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
TENSORBOARD_DIR = "tensorboard"  # the event files of `tltk finetune --tensorboard`


def is_run(path: Path) -> bool:
    return (path / CONFIG).is_file()


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a run directory that is a file, or holds an earlier run that is not to be replaced."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file; name a directory for the run.")
    if is_run(out) and not overwrite:
        raise RunDirError(f"{out} already holds a run; pass --overwrite to replace it or choose another --out.")


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write over an earlier run unless asked; clear its files if asked."""
    check_out_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG, WEIGHTS, METRICS, SUMMARY):
        (out / name).unlink(missing_ok=True)


def library_versions() -> dict[str, str]:
    """The versions a run was made with. timm's is read from its installed metadata, so a
    run that uses no timm backbone does not pay a second or more to import it."""
    import torchvision

    from tltk import __version__

    return {
        "tltk": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": _installed_version("timm"),
        "python": platform.python_version(),
    }


def _installed_version(package: str) -> str:
    """``package.__version__`` where it is imported already, else the version its metadata records."""
    module = sys.modules.get(package)
    if module is not None and isinstance(getattr(module, "__version__", None), str):
        return module.__version__
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def write_config(out: Path, config: dict[str, Any]) -> None:
    write_json(out / CONFIG, config)


def read_config(run: Path) -> dict[str, Any]:
    if not run.is_dir():
        raise RunDirError(f"run directory {run} does not exist; pass the --out of a finished `tltk finetune`.")
    if not is_run(run):
        raise RunDirError(f"{run} is not a tltk run (no {CONFIG}); pass the --out of a finished `tltk finetune`.")
    try:
        return json.loads((run / CONFIG).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RunDirError(f"{run / CONFIG} is not valid JSON ({exc}); the run directory is damaged.") from exc


def save_weights(out: Path, model: torch.nn.Module) -> None:
    write_safetensors(out / WEIGHTS, model.state_dict(), metadata={"format": "pt", "producer": "tltk"})


def load_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = run / WEIGHTS
    if not path.is_file():
        raise RunDirError(f"{run} has no {WEIGHTS}: the run did not finish; train it again.")
    try:
        return load_file(str(path))
    except Exception as exc:
        raise RunDirError(f"{path} cannot be read ({exc}); the run directory is damaged.") from exc


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    write_json(out / SUMMARY, summary)


def read_summary(run: Path) -> dict[str, Any]:
    path = run / SUMMARY
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@dataclass
class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl, flushed per epoch.

    A full disk is a ``DiskError``, and the file is cut back to its last flush, so that it
    never ends in half a row (the checkpoint records how much of it a resumed run keeps).
    """

    handle: TextIO
    path: Path | None = None
    _flushed: int = field(default=0, init=False)
    _failed: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self._flushed = self.handle.tell()

    @classmethod
    def open(cls, out: Path) -> "MetricsLog":
        with disk_errors(out / METRICS):
            return cls((out / METRICS).open("a", encoding="utf-8"), out / METRICS)

    def write(self, row: dict[str, Any]) -> None:
        line = json.dumps(row) + "\n"
        with self._refused(len(line.encode("utf-8"))):
            self.handle.write(line)

    def flush(self) -> None:
        with self._refused():
            self.handle.flush()
        self._flushed = self.handle.tell()

    def close(self) -> None:
        if self._failed:
            self._discard_buffer()
            return
        with self._refused():
            self.handle.close()

    @contextmanager
    def _refused(self, size: int | None = None) -> Iterator[None]:
        """A write the disk refuses: cut the file back to its last flush, then report it."""
        try:
            with disk_errors(self.path or Path(self.handle.name), size):
                yield
        except Exception:
            self._failed = True
            self._discard_buffer()
            raise

    def _discard_buffer(self) -> None:
        try:
            self.handle.close()
        except OSError:
            pass  # the rows still buffered: the disk would not take them
        if self.path is not None and self.path.exists() and self.path.stat().st_size > self._flushed:
            os.truncate(self.path, self._flushed)


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = run / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
