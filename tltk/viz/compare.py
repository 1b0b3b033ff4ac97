"""Runs side by side: the ablation table of a report, and their curves on shared axes.

A row holds what tells the runs apart (backbone, head, strategy, weights and the key
hyperparameters, read from each config.json) and what they achieved (the final epoch's
figures and the test figures, read from each summary.json), so the table is built from
the run directories alone, whatever command line made them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure

from tltk.errors import TltkError
from tltk.train import rundir
from tltk.viz.curves import metric_keys, pretty, read_run_metrics, smooth, smoothing_weight, split_rows
from tltk.viz.style import legend_if_several, new_figure, save_figure, short_labels

HYPERPARAMETERS = ("optimizer", "lr", "batch_size", "epochs", "schedule", "weight_decay", "augment", "seed")


def final_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """``final_<metric>`` for each train/val figure of the last epoch, ``test_<metric>`` for the test split."""
    figures = {
        f"final_{key}": value
        for key, value in summary.get("final", {}).items()
        if key.startswith(("train_", "val_")) and _is_number(value)
    }
    figures.update({f"test_{key}": value for key, value in summary.get("test", {}).items() if key != "n" and _is_number(value)})
    return figures


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run_row(run: str | Path) -> dict[str, Any]:
    """One table row for one run directory."""
    path = Path(run).expanduser()
    config = rundir.read_config(path)
    summary = rundir.read_summary(path)
    model, train = config.get("model", {}), config.get("train", {})
    row: dict[str, Any] = {
        "run": str(path),
        "name": path.name,
        "backbone": model.get("backbone"),
        "head": model.get("head"),
        "strategy": config.get("strategy", {}).get("name"),
        "weights": model.get("weights"),
    }
    row.update({key: train.get(key) for key in HYPERPARAMETERS})
    row.update(epochs_run=summary.get("epochs_run"), best_epoch=summary.get("best_epoch"))
    row.update(final_metrics(summary))
    return row


def compare_runs(runs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Rows for ``runs`` in the order given, every row with the same keys (None where a run lacks one)."""
    if not runs:
        raise TltkError("compare needs at least one run directory; pass the --out of earlier `tltk finetune` runs.")
    rows = [run_row(run) for run in runs]
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return [{key: row.get(key) for key in keys} for row in rows]


def differing_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Columns whose value is not the same in every row: what the comparison is about."""
    return [key for key in rows[0] if len({repr(row.get(key)) for row in rows}) > 1] if rows else []


def compare_figure(runs: Sequence[str | Path], labels: Sequence[str] | None = None) -> Figure:
    """Train loss (smoothed, per step), validation loss and each validation metric (per epoch), runs overlaid."""
    paths = [Path(run).expanduser() for run in runs]
    histories = [read_run_metrics(path) for path in paths]
    names = short_labels(list(labels) if labels else [path.name for path in paths])
    epoch_keys = ["val_loss"] + [key for key in _union_metric_keys(histories) if key.startswith("val_")]
    figure, axes = new_figure(5.0 * (1 + len(epoch_keys)), 4.5, cols=1 + len(epoch_keys))
    for name, rows in zip(names, histories):
        steps, epochs = split_rows(rows)
        losses = [r["loss"] for r in steps]
        axes[0].plot([r["step"] for r in steps], smooth(losses, smoothing_weight(len(losses))), label=name)
        for ax, key in zip(axes[1:], epoch_keys):
            points = [(r["epoch"], r[key]) for r in epochs if _is_number(r.get(key))]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    axes[0].set(title="train loss (smoothed)", xlabel="step", ylabel="loss")
    for ax, key in zip(axes[1:], epoch_keys):
        ax.set(title=f"{pretty(key)} per epoch", xlabel="epoch", ylabel=pretty(key).split(" ", 1)[1])
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes:
        ax.grid(alpha=0.3)
        legend_if_several(ax)
    figure.suptitle(f"Comparison of {len(paths)} run{'s' if len(paths) != 1 else ''}: {', '.join(names)}")
    return figure


def _union_metric_keys(histories: Sequence[Sequence[dict[str, Any]]]) -> list[str]:
    keys: list[str] = []
    for rows in histories:
        keys += [key for key in metric_keys(split_rows(rows)[1]) if key not in keys]
    return keys


def write_comparison(runs: Sequence[str | Path], out: str | Path) -> tuple[list[dict[str, Any]], Path]:
    """The comparison table's rows, and the overlaid curves saved as a PNG at ``out``."""
    rows = compare_runs(runs)
    return rows, save_figure(compare_figure(runs), out)


# --- sweeps ---------------------------------------------------------------------------


def sweep_metric_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The final validation figures worth plotting against the swept value: non-loss first."""
    keys = list(dict.fromkeys(k for row in rows for k in row if k.startswith("final_val_") and _is_number(row[k])))
    metrics = [k for k in keys if not k.endswith("loss")]
    return metrics or keys or [k for k in rows[0] if k.startswith("final_") and _is_number(rows[0][k])][:1]


def sweep_figure(rows: Sequence[dict[str, Any]], param: str, title: str = "") -> Figure:
    """The final validation metric(s) against the swept value, the best point marked."""
    keys = sweep_metric_keys(rows)
    if not keys:
        raise TltkError("the sweep's runs have no final metrics to plot; check that each run finished.")
    values = [float(row[param]) for row in rows]
    figure, (ax,) = new_figure(8.0, 5.0)
    for key in keys:
        points = sorted((v, row[key]) for v, row in zip(values, rows) if _is_number(row.get(key)))
        label = pretty(key.removeprefix("final_"))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"final {label}")
        best = (min if key.endswith("loss") else max)(points, key=lambda p: p[1])
        ax.scatter([best[0]], [best[1]], s=120, facecolors="none", edgecolors="black", zorder=3,
                   label=f"best {label}: {param}={best[0]:g}")
    positive = all(v > 0 for v in values)
    if positive and max(values) / min(values) >= 10:
        ax.set_xscale("log")
    ylabel = " / ".join(dict.fromkeys(pretty(k.removeprefix("final_")).split(" ", 1)[1] for k in keys))
    ax.set(title=title or f"Final validation metric against {param}", xlabel=param, ylabel=f"final {ylabel}")
    ax.grid(alpha=0.3, which="both")
    legend_if_several(ax)
    return figure


def format_value(value: Any) -> str:
    """Table text: floats to 4 significant places in a form people read (1e-04, 0.8333)."""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}".rstrip("0").rstrip(".") or "0"
    return "-" if value is None else str(value)
