"""One writer at a time for a run directory or a feature store.

Two commands writing the same run (two ``tltk finetune --out R``, or ``--resume R`` while R
still trains) or the same store (two ``tltk index STORE --add``, an ``extract --overwrite``
into it) would interleave their files. Each writer therefore holds an advisory lock for
the whole command: an OS-level ``flock`` (through the ``filelock`` package) on a hidden
file beside the target, ``.NAME.lock``. The lock lives beside the target rather than in it
because a store is replaced by renaming a new directory over it, and a new run directory
should not be created before its command has checked its settings.

The kernel drops an ``flock`` when its process dies, however it dies, so a lock left by a
killed command never blocks the next one. Beside the lock, ``.NAME.lock.json`` records who
holds it (process id, command line, start time), so that a second writer can refuse in one
sentence naming the holder; that file is only a label, never the lock itself.

Readers take no lock: a store is only ever changed by renaming a complete new directory
over it (``tltk.features.writing``), so a reader sees one whole version or the other.
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tltk.errors import DiskError, TltkError, printable
from tltk.fileio import disk_errors

WAIT_HELP = "If another command is writing the same directory, wait for it to finish instead of stopping."


class BusyError(TltkError):
    """Another process is writing the run directory or store this command would write."""


def lock_path(target: Path) -> Path:
    """The lock file of ``target``: a hidden sibling, which survives ``target`` being replaced."""
    return target.parent / f".{target.name}.lock"


def info_path(target: Path) -> Path:
    """The label beside the lock saying which process holds it."""
    return target.parent / f".{target.name}.lock.json"


class _Held:
    """A lock this process holds, with how many nested ``hold`` calls hold it."""

    def __init__(self, lock: Any) -> None:
        self.lock = lock
        self.depth = 0


_held: dict[tuple[int, Path], _Held] = {}  # by thread: another thread of this process is another writer
_registry_guard = threading.Lock()


@contextmanager
def hold(target: str | Path, *, wait: bool = False, what: str = "directory") -> Iterator[bool]:
    """Hold the writer's lock of ``target`` for the block; yield whether this call took it
    (False when an enclosing ``hold`` in this thread already holds it).

    Another process holding it is a ``BusyError`` naming that process, or with ``wait``
    a wait until it lets go. ``what`` names the target in the sentence ("run directory").
    """
    target = _absolute(Path(target).expanduser())
    key = (threading.get_ident(), target)
    with _registry_guard:
        held = _held.get(key)
        if held is not None:
            held.depth += 1
    if held is not None:
        try:
            yield False
        finally:
            with _registry_guard:
                held.depth -= 1
        return
    held = _Held(_acquire(target, wait, what))
    held.depth = 1
    with _registry_guard:
        _held[key] = held
    try:
        _remove_stale_labels(target)
        _write_info(target)
        yield True
    finally:
        with _registry_guard:
            del _held[key]
        info_path(target).unlink(missing_ok=True)
        held.lock.release()


def holder(target: str | Path) -> dict[str, Any] | None:
    """What the label beside ``target``'s lock says about its holder, or None if there is none."""
    try:
        record = json.loads(info_path(_absolute(Path(target).expanduser())).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _acquire(target: Path, wait: bool, what: str) -> Any:
    from filelock import FileLock, Timeout

    target.parent.mkdir(parents=True, exist_ok=True)
    # Never a "soft" lock (a file whose existence is the lock): one left by a killed holder would block for good.
    no_soft = {"fallback_to_soft": False} if "fallback_to_soft" in inspect.signature(FileLock).parameters else {}
    lock = FileLock(str(lock_path(target)), **no_soft)
    try:
        with disk_errors(lock_path(target)):  # a disk too full for even the empty lock file
            lock.acquire(timeout=-1 if wait else 0, poll_interval=0.1)
    except Timeout:
        raise BusyError(busy_message(target, what)) from None
    except DiskError:
        raise
    except (OSError, NotImplementedError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise TltkError(f"cannot lock {target} ({reason}): its file system does not support file locks; "
                        f"write the {what} on a local disk.") from exc
    return lock


def busy_message(target: Path, what: str) -> str:
    """One sentence naming the process that holds ``target``'s lock, and what to do."""
    record = holder(target) or {}
    pid = record.get("pid")
    who = f"process {pid}" if isinstance(pid, int) else "another process"
    if record.get("host") not in (None, socket.gethostname()):
        who += f" on {printable(str(record['host']))}"
    command = record.get("command")
    if isinstance(command, str) and command:
        who += f" (`{printable(command)[:200]}`)"
    since = record.get("started")
    when = f" since {printable(str(since))}" if since else ""
    return (f"the {what} {target} is being written by {who}{when}; wait for it to finish, "
            f"pass --wait to wait for it, or choose another {what}.")


def _write_info(target: Path) -> None:
    """Label the lock with this process (atomically, so that a reader never sees half a label)."""
    from tltk.fileio import write_json

    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        write_json(info_path(target), record)
    except (OSError, TltkError):
        pass  # the label is a courtesy; the lock holds without it


def _remove_stale_labels(target: Path) -> None:
    """Remove half-written labels left by a holder killed while writing its own.

    Only the lock's holder writes the label, so once this process holds the lock, every
    temporary label file beside it belongs to a dead writer and would otherwise stay forever.
    """
    label = info_path(target)
    for leftover in label.parent.glob(f".{label.name}.*.tmp"):
        leftover.unlink(missing_ok=True)


def _command_line() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if name == "__main__.py":  # python -m tltk.cli
        name = "tltk"
    elif name == "-c":
        name = "python -c ..."
    return " ".join([name, *sys.argv[1:]])


def _absolute(path: Path) -> Path:
    """``path`` made absolute without resolving its last part, so two spellings of one target share a lock."""
    return path.parent.resolve() / path.name
