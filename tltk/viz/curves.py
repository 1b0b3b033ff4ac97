"""Training curves from a run's metrics.jsonl: loss, accuracy (or mAP) and learning rate.

Every optimizer step is its own point: nothing is averaged away before plotting, so a
spike at step 13,402 of a 20,000-step run is still there to be seen. A smoothed line is
drawn over the raw steps because the raw loss of small batches is too noisy to read.
The metrics plotted are whatever the epoch rows hold (``train_*`` and ``val_*`` that
are not losses), so a run that logs ``val_map`` gets an mAP curve without a change here.

matplotlib is imported by the functions that draw, not with this module: the training
code imports ``write_curves`` at start-up, and a process that never gets to drawing (a
run stopped by bad input, the ranks of a data-parallel job other than the first) should
not pay the better part of a second of imports for it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from tltk import rundir
from tltk.errors import RunDirError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOTS = "plots"
# Keys of an epoch row that are bookkeeping, not measurements.
_NOT_METRICS = {"kind", "epoch", "step", "lr", "seconds"}
# Words that read better spelled as people write them.
_PRETTY = {"map": "mAP", "map_voc07": "mAP (VOC07 11-point)", "top5_accuracy": "top-5 accuracy"}


def split_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """metrics.jsonl rows as (step rows, epoch rows)."""
    return [r for r in rows if r.get("kind") == "step"], [r for r in rows if r.get("kind") == "epoch"]


def metric_keys(epochs: Sequence[dict[str, Any]]) -> list[str]:
    """The non-loss ``train_*`` / ``val_*`` figures the epoch rows hold, in a stable order."""
    keys = {
        key
        for row in epochs
        for key, value in row.items()
        if key not in _NOT_METRICS
        and key.startswith(("train_", "val_"))
        and not key.endswith("loss")
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
    }
    return sorted(keys, key=lambda k: (k.split("_", 1)[1], k))


def family(key: str) -> str:
    """What a metric measures, for an axis label: ``val_map_voc07`` -> ``mAP``, ``val_accuracy`` -> ``accuracy``."""
    name = key.partition("_")[2]
    if name.startswith("map"):
        return "mAP"
    if name.endswith("accuracy"):
        return "accuracy"
    return _PRETTY.get(name, name.replace("_", " "))


def pretty(key: str) -> str:
    """``val_map`` -> ``val mAP``: legend and axis text."""
    split, _, name = key.partition("_")
    return f"{split} {_PRETTY.get(name, name.replace('_', ' '))}"


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average with TensorBoard's start-up correction.

    Without the correction the line starts near zero and climbs, which reads as a
    loss that rises at the beginning of training. A NaN or infinite step is left out of
    the average (and drawn as a gap), so one bad batch does not blank the rest of the line.
    """
    smoothed, last, norm = [], 0.0, 0.0
    for value in values:
        if not math.isfinite(value):
            smoothed.append(math.nan)
            continue
        last = weight * last + (1.0 - weight) * value
        norm = weight * norm + (1.0 - weight)
        smoothed.append(last / norm if norm else value)
    return smoothed


def smoothing_weight(points: int) -> float:
    """About 1/50 of the run as the averaging window, so short and long runs look alike.

    Never below TensorBoard's default of 0.6, so that even a short run's line smooths.
    """
    window = max(2.5, points / 50.0)
    return 1.0 - 1.0 / window


def loss_figure(rows: Sequence[dict[str, Any]], title: str) -> Figure | None:
    """Train loss per step (raw and smoothed) and validation loss per epoch, on one step axis."""
    from tltk.viz.style import legend_if_several, new_figure, wrap

    steps, epochs = split_rows(rows)
    if not steps:
        return None
    figure, (ax,) = new_figure()
    x = [r["step"] for r in steps]
    y = [r["loss"] for r in steps]
    ax.plot(x, y, color="tab:blue", alpha=0.3, linewidth=0.8, marker="." if len(x) <= 200 else None,
            markersize=3, label="train loss (per step)")
    ax.plot(x, smooth(y, smoothing_weight(len(y))), color="tab:blue", linewidth=1.8, label="train loss (smoothed)")
    validated = [r for r in epochs if isinstance(r.get("val_loss"), (int, float))]
    if validated:
        ax.plot([r["step"] for r in validated], [r["val_loss"] for r in validated], color="tab:orange",
                marker="o", linewidth=1.5, label="val loss (per epoch)")
    ax.set(title=wrap(f"Loss: {title}", 8.0), xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    legend_if_several(ax)
    return figure


def metric_figure(rows: Sequence[dict[str, Any]], title: str) -> Figure | None:
    """Every non-loss metric per epoch (accuracy, mAP, ...), train and validation."""
    from tltk.viz.style import legend_if_several, new_figure, wrap

    _, epochs = split_rows(rows)
    keys = metric_keys(epochs)
    if not keys:
        return None
    figure, (ax,) = new_figure()
    for key in keys:
        points = [(r["epoch"], r[key]) for r in epochs if isinstance(r.get(key), (int, float))]
        style = "-" if key.startswith("val_") else "--"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=pretty(key))
    names = list(dict.fromkeys(family(k) for k in keys))
    ax.set(title=wrap(f"Per-epoch {' and '.join(names)}: {title}", 8.0), xlabel="epoch", ylabel=" / ".join(names))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    legend_if_several(ax)
    return figure


def lr_figure(rows: Sequence[dict[str, Any]], title: str) -> Figure | None:
    """The learning rate each step used; log scale when much of the run is a decade below its peak.

    Step decay and exponential schedules spend most steps decades below the start and
    need the log scale to be read; a cosine schedule only touches zero at its very end,
    and on a log axis that last plunge would fill the picture.
    """
    from tltk.viz.style import new_figure, wrap

    steps, _ = split_rows(rows)
    points = [(r["step"], r["lr"]) for r in steps if isinstance(r.get("lr"), (int, float))]
    if not points:
        return None
    figure, (ax,) = new_figure(8.0, 4.0)
    values = [p[1] for p in points]
    ax.plot([p[0] for p in points], values, color="tab:green", marker="." if len(points) <= 200 else None,
            markersize=3, label="learning rate")
    if needs_log_scale(values):
        ax.set_yscale("log")
    ax.set(title=wrap(f"Learning rate: {title}", 8.0), xlabel="step", ylabel="learning rate (last parameter group)")
    ax.grid(alpha=0.3)
    return figure


def needs_log_scale(values: Sequence[float]) -> bool:
    """True when over a third of the steps run more than ten times below the peak (all values positive)."""
    if not values or min(values) <= 0:
        return False
    peak = max(values)
    return sum(value < peak / 10 for value in values) > len(values) / 3


def run_title(run: Path) -> str:
    """``name (backbone + head, strategy)``: enough to tell plots of different runs apart."""
    try:
        config = rundir.read_config(run)
    except RunDirError:
        return run.name
    model = config.get("model", {})
    strategy = config.get("strategy", {}).get("name", "")
    return f"{run.name} ({model.get('backbone', '?')} + {model.get('head', '?')}, {strategy})"


def read_run_metrics(run: Path) -> list[dict[str, Any]]:
    """metrics.jsonl of ``run``; a missing run or an empty log is the user's to fix."""
    rundir.read_config(run)  # one clear sentence when RUN is not a run
    rows = rundir.read_metrics(run)
    if not rows:
        raise RunDirError(f"{run} has no {rundir.METRICS} rows yet; there is nothing to plot until training logs a step.")
    return rows


def write_curves(run: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write loss.png, metrics.png and lr.png of ``run`` into ``out_dir`` (default RUN/plots)."""
    from tltk.viz.style import save_figure

    run = Path(run).expanduser()
    rows = read_run_metrics(run)
    target = Path(out_dir) if out_dir is not None else run / PLOTS
    title = run_title(run)
    written = []
    for name, build in (("loss", loss_figure), ("metrics", metric_figure), ("lr", lr_figure)):
        figure = build(rows, title)
        if figure is not None:
            written.append(save_figure(figure, target / f"{name}.png"))
    return written
