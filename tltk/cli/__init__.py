"""The ``tltk`` command: parse options, call the library, print for people or as --json.

No logic lives here that a Python user could not reach: each command is a thin wrapper
over a function in ``tltk``. Commands are grouped by area, one module each; importing
this package registers them all on ``main``.
"""

from tltk.cli.app import main
from tltk.cli import core  # noqa: F401  (registers the commands)
from tltk.cli import predict  # noqa: F401
from tltk.cli import plugins  # noqa: F401
from tltk.cli import viz  # noqa: F401
from tltk.cli import features  # noqa: F401
from tltk.cli import report  # noqa: F401
from tltk.cli import cache  # noqa: F401

__all__ = ["main"]
