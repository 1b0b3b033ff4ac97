"""One short run per value of a hyperparameter, then a table and a plot of the outcome.

Every run starts from the same configuration and seed, so the swept value is the only
thing that differs between them: the first thing to do with a new dataset is to find
the learning rate at which it trains. Each run is an ordinary run directory under
``out_root`` (``lr_0.001``, ...), usable by every other command.
"""

from __future__ import annotations

import copy
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Sequence

from tltk.errors import TltkError
from tltk.fileio import write_json
from tltk.train.finetune import FinetuneConfig, RunResult, check_components, finetune
from tltk.train.trainer import Reporter, TrainConfig

SWEEP_TABLE = "sweep.json"
SWEEP_PLOT = "sweep.png"


def run_name(param: str, value: Any) -> str:
    """The run directory of one value: ``lr_0.001``."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{param}_{text}"


def with_value(base: FinetuneConfig, param: str, value: Any) -> FinetuneConfig:
    """A copy of ``base`` with ``param`` set: a training setting (lr, batch_size, ...) or a model one (head, ...)."""
    config = copy.deepcopy(base)
    if param in {f.name for f in fields(TrainConfig)}:
        setattr(config.train, param, value)
    elif param in {f.name for f in fields(FinetuneConfig)} - {"train", "data"}:
        setattr(config, param, value)
    else:
        names = sorted({f.name for f in fields(TrainConfig)} | {f.name for f in fields(FinetuneConfig)} - {"train", "data"})
        raise TltkError(f"cannot sweep '{param}': it is not a setting of finetune; choose one of {', '.join(names)}.")
    return config


def sweep_row(param: str, value: Any, result: RunResult) -> dict[str, Any]:
    """The table row of one finished run: the value, where the run is, and its final figures."""
    from tltk.viz.compare import final_metrics

    summary = result.summary
    return {param: value, "run": str(result.out), "epochs_run": summary.get("epochs_run"),
            "best_epoch": summary.get("best_epoch"), **final_metrics(summary)}


def sweep(
    base_config: FinetuneConfig,
    param: str,
    values: Sequence[Any],
    out_root: str | Path,
    *,
    overwrite: bool = False,
    reporter: Callable[[int, Any], Reporter | None] | None = None,
) -> list[dict[str, Any]]:
    """Train one run per value under ``out_root``; write sweep.json and sweep.png there; return the rows.

    Every value is checked before the first run starts, so a typo in the last value does
    not cost the time of the runs before it. ``reporter(i, value)`` gives the progress
    reporter of the i-th run.
    """
    if not values:
        raise TltkError("--values is empty; give the values to try, e.g. --values 1e-4,1e-3,1e-2.")
    if len(set(map(repr, values))) != len(values):
        raise TltkError(f"--values repeats a value ({', '.join(map(str, values))}); each value is one run.")
    configs = [with_value(base_config, param, value) for value in values]
    for config in configs:
        config.train.validate()
        check_components(config)
    root = Path(out_root).expanduser()
    rows = []
    for index, (value, config) in enumerate(zip(values, configs)):
        result = finetune(config, root / run_name(param, value), overwrite=overwrite,
                          reporter=reporter(index, value) if reporter else None)
        rows.append(sweep_row(param, value, result))
    write_sweep_outputs(rows, param, root, base_config)
    return rows


def write_sweep_outputs(rows: list[dict[str, Any]], param: str, root: Path, base: FinetuneConfig) -> None:
    """sweep.json (the table) and sweep.png (final validation metric against the value)."""
    from tltk.viz.compare import sweep_figure
    from tltk.viz.style import save_figure

    write_json(root / SWEEP_TABLE, {"param": param, "rows": rows})
    title = (f"Final validation metric against {param}: {base.backbone} + {base.head}, "
             f"{base.train.epochs} epochs, seed {base.train.seed}")
    save_figure(sweep_figure(rows, param, title), root / SWEEP_PLOT)
