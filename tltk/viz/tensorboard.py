"""Showing the TensorBoard logs of finished runs: ``tltk tensorboard RUN...``.

Training writes the event files (``tltk.train.tensorboard``, under ``RUN/tensorboard``);
this serves them once the runs are done, as the other consumers of finished runs read
their files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tltk import rundir
from tltk.errors import RunDirError
from tltk.rundir import TENSORBOARD_DIR


def tensorboard_argv(runs: Sequence[str | Path], port: int | None = None, host: str | None = None) -> list[str]:
    """The ``tensorboard`` command line that shows the logs of ``runs``.

    Several runs are named as ``tltk compare`` names them (the shortest path endings that
    tell them apart), so each gets its own colour and a readable name.
    """
    if not runs:
        raise RunDirError("tensorboard needs a run directory; pass the --out of a `tltk finetune --tensorboard` run.")
    dirs = []
    for run in runs:
        path = Path(run).expanduser()
        rundir.read_config(path)  # one sentence when it is not a run
        logs = path / TENSORBOARD_DIR
        if not logs.is_dir():
            raise RunDirError(f"{path} has no {TENSORBOARD_DIR}/ logs; train it with `tltk finetune --tensorboard`.")
        dirs.append((path, logs))
    if len(dirs) == 1:
        argv = ["tensorboard", "--logdir", str(dirs[0][1])]
    else:
        from tltk.viz.compare import run_labels  # matplotlib comes with it: only when several runs are named

        names = run_labels([path for path, _ in dirs])
        argv = ["tensorboard", "--logdir_spec", ",".join(f"{name}:{logs}" for name, (_, logs) in zip(names, dirs))]
    if port is not None:
        argv += ["--port", str(port)]
    if host is not None:
        argv += ["--host", host]
    return argv


def launch_tensorboard(argv: Sequence[str]) -> None:
    """Run TensorBoard's own program with ``argv`` until it is stopped (Ctrl-C)."""
    from tensorboard import default, program

    board = program.TensorBoard(plugins=default.get_plugins())
    board.configure(argv=list(argv))
    board.main()
