"""Writing files so that a kill at any moment leaves the old file or the new one, never half.

Each write goes to a temporary file in the same directory, is flushed to disk, and is
renamed over the target (an atomic step on POSIX file systems).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def _read_umask() -> int:
    """Read once at import: os.umask can only be read by setting it, which races other threads."""
    current = os.umask(0o022)
    os.umask(current)
    return current


_UMASK = _read_umask()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp_path)`` and move the finished file onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes files private; give the usual permissions
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """UTF-8, except that file names which were not UTF-8 on disk are written back as their
    original bytes (Python holds them as surrogate escapes), so an export names the same files."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def user_path(text: str) -> Path:
    """``text`` as a path with ``~`` and ``~user`` expanded; an unknown user is a TltkError."""
    from tltk.errors import TltkError

    try:
        return Path(text).expanduser()
    except RuntimeError as exc:  # pathlib's answer to ~nosuchuser
        raise TltkError(f"cannot expand '{text}': {exc.args[0] if exc.args else exc}; write the path out in full.") from exc
