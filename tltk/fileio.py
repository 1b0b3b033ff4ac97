"""Writing files so that a kill at any moment leaves the old file or the new one, never half.

Each write goes to a temporary file in the same directory, is flushed to disk, and is
renamed over the target (an atomic step on POSIX file systems).

A write the file system refuses (a full disk, a quota, a failing device) is the same
story: the temporary file is removed, the target keeps its previous contents, and the
error is a ``DiskError`` naming the file and how much space the write needed
(``disk_errors`` turns the OS error into that sentence for every writer of tltk's files).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

# What the OS says when a write cannot land, in the words the message uses.
DISK_ERRNOS = {
    errno.ENOSPC: "no space is left on the device",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file grew past what the file system allows",
    errno.EIO: "the device failed to write (input/output error)",
}
# Libraries written in Rust or C++ (safetensors, FAISS) report the OS error inside their own message.
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)|\((No space left on device|Disk quota exceeded|Input/output error)\)")
_STRERROR = {os.strerror(code): code for code in DISK_ERRNOS}


def _read_umask() -> int:
    """Read once at import: os.umask can only be read by setting it, which races other threads."""
    current = os.umask(0o022)
    os.umask(current)
    return current


_UMASK = _read_umask()


def atomic_write(path: Path, write: Callable[[Path], None], size: int | None = None, *, shown: Path | None = None) -> None:
    """Run ``write(tmp_path)`` and move the finished file onto ``path``.

    ``size``, the bytes the file will hold where the caller knows it, is what a full disk's
    message says was needed (else the bytes written before the disk refused more); the
    message names ``shown`` where the file is written somewhere hidden on its way there.
    """
    named = shown if shown is not None else path
    with disk_errors(named, size):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes files private; give the usual permissions
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with disk_errors(named, size, partial=tmp_path):
            write(tmp_path)
            with open(tmp_path, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def disk_errors(path: Path, needed: int | None = None, *, partial: Path | None = None) -> Iterator[None]:
    """Turn a write the file system refused inside the block into a ``DiskError`` about ``path``.

    ``needed`` is the bytes the write was to put there, where known; otherwise the size of
    ``partial`` (what had been written when the disk refused more) is reported as a floor.
    Any other error passes through unchanged.
    """
    try:
        yield
    except Exception as exc:
        code = disk_errno(exc)
        if code is None:
            raise
        from tltk.errors import DiskError

        raise DiskError(disk_message(path, code, needed, _size_of(partial))) from exc


def disk_errno(exc: BaseException) -> int | None:
    """The full-disk or failing-device errno behind ``exc``, also where a library wrapped it in its own error."""
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in DISK_ERRNOS else None
    if not isinstance(exc, (RuntimeError, ValueError)) and type(exc).__module__.split(".")[0] not in ("safetensors",):
        return None
    found = _OS_ERROR_IN_TEXT.search(str(exc))
    if found is None:
        return None
    code = int(found.group(1)) if found.group(1) else _STRERROR.get(found.group(2))
    return code if code in DISK_ERRNOS else None


def disk_message(path: Path, code: int, needed: int | None, written: int | None = None) -> str:
    """One sentence: which file, what the OS said, how much space the write needed, what is kept."""
    details = []
    if needed is not None:
        details.append(f"the write needed at least {byte_words(needed)}")
    elif written:
        details.append(f"the write had put {byte_words(written)} there and needed more")
    free = _free_bytes(path)
    if code in (errno.ENOSPC, errno.EDQUOT) and free is not None:
        details.append(f"{byte_words(free)} free")
    detail = f" ({'; '.join(details)})" if details else ""
    advice = ("check the device (the system log says more) and run the command again" if code == errno.EIO
              else "free some space there and run the command again")
    return (f"cannot write {path}: {DISK_ERRNOS[code]}{detail}; the partial file was removed and what was there "
            f"before is kept; {advice}.")


def byte_words(count: int) -> str:
    """``12.3 MB (12,345,678 bytes)``: readable, and exact for whoever frees the space."""
    if count < 1000:
        return f"{count} bytes"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit} ({count:,} bytes)"
    return f"{count} bytes"  # not reached


def _size_of(path: Path | None) -> int | None:
    try:
        return path.stat().st_size if path is not None else None
    except OSError:
        return None


def _free_bytes(path: Path) -> int | None:
    for folder in (path.parent, *path.parent.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


def replace_directory(new: Path, target: Path) -> Path | None:
    """Put the directory ``new`` at ``target`` and return where the old ``target`` now is
    (for the caller to remove), or None if there was none.

    On Linux the two directories swap in one atomic step (``renameat2`` with
    ``RENAME_EXCHANGE``), so ``target`` always names a complete directory. Elsewhere, or on
    a file system without the exchange, the old one is renamed aside first, leaving a
    moment without ``target`` that readers retry across.
    """
    if not target.exists():
        os.replace(new, target)
        return None
    if _exchange(new, target):
        return new
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, aside / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside / target.name, target)
        raise
    return aside


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically where the system can; False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def write_text(path: Path, text: str, *, shown: Path | None = None) -> None:
    """UTF-8, except that file names which were not UTF-8 on disk are written back as their
    original bytes (Python holds them as surrogate escapes), so an export names the same files."""
    data = text.encode("utf-8", errors="surrogateescape")
    atomic_write(path, lambda tmp: tmp.write_bytes(data), size=len(data), shown=shown)


def write_json(path: Path, obj: Any, *, shown: Path | None = None) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", shown=shown)


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    payload = sum(t.numel() * t.element_size() for t in contiguous.values())
    atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata), size=payload)


def user_path(text: str) -> Path:
    """``text`` as a path with ``~`` and ``~user`` expanded; an unknown user is a TltkError."""
    from tltk.errors import TltkError

    try:
        return Path(text).expanduser()
    except RuntimeError as exc:  # pathlib's answer to ~nosuchuser
        raise TltkError(f"cannot expand '{text}': {exc.args[0] if exc.args else exc}; write the path out in full.") from exc
