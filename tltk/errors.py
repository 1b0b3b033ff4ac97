"""Errors a user can act on.

Every failure that comes from what the user asked for (a name, a path, a file) is a
``TltkError`` whose message is one sentence: what was wrong, where, and what to do
instead. The CLI prints that sentence and exits with ``exit_code``; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence


class TltkError(Exception):
    """A problem with the user's input, reported as one sentence and a non-zero exit.

    Messages quote paths, labels and names from the user's files; any newline or control
    character in those is shown escaped, so the message stays one line.
    """

    exit_code: int = 2

    def __str__(self) -> str:
        return printable(super().__str__())


class UnknownNameError(TltkError, KeyError):
    """A registry lookup for a name nobody registered."""

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return printable(str(self.args[0])) if self.args else ""


class UnknownOptionError(TltkError):
    """An option given to a component (backbone, head, strategy, exporter, callback) that it
    does not declare; the message lists the ones it takes."""


class DataError(TltkError):
    """A data spec, dataset file or image that cannot be used."""


class WeightsError(TltkError):
    """Weights that cannot be found, read, or fitted to the model."""


class RunDirError(TltkError):
    """A run directory that is missing, incomplete, or would be overwritten."""


class DiskError(TltkError):
    """A write the file system refused: the disk is full, a quota is reached, or the device
    failed. The message names the file and the space the write needed; what was there
    before the write is left as it was."""


class SettingError(TltkError):
    """A setting given a value it cannot take.

    The sentence names settings as the Python API spells them (``weight_decay``), since a
    Python user never typed a flag; ``settings`` lists the names it mentions, so that the
    command line can show its own spelling instead (``--weight-decay``, ``with_flags``).
    """

    def __init__(self, message: str, settings: Sequence[str]) -> None:
        super().__init__(message)
        self.settings = tuple(settings)

    def with_flags(self, flags: Mapping[str, str] | None = None) -> str:
        """The sentence with each named setting as its command-line flag (``--`` and dashes
        unless ``flags`` says otherwise)."""
        text = str(self)
        for name in sorted(self.settings, key=len, reverse=True):
            flag = (flags or {}).get(name, "--" + name.replace("_", "-"))
            text = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", flag, text)
        return text


def printable(text: str) -> str:
    """``text`` with newlines and other control characters escaped, so that a message quoting
    a file's contents stays the one line the CLI promises."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def require(module: str, extra: str) -> Any:
    """Import ``module``, a package of one of tltk's extras; missing, it is one sentence naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TltkError(f"this needs the Python package '{module.split('.')[0]}', which is not installed; "
                        f"install it with pip install 'tltk[{extra}]'.") from exc
