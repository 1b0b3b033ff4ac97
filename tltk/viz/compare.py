"""Runs side by side: the ablation table of a report, and their curves on shared axes.

A row holds what tells the runs apart (data, backbone, head, strategy, weights and the key
hyperparameters, read from each config.json) and what they achieved (the final epoch's
figures and the test figures, read from each summary.json), so the table is built from
the run directories alone, whatever command line made them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure

from tltk import rundir
from tltk.errors import TltkError
from tltk.viz.curves import family, metric_keys, pretty, read_run_metrics, smooth, smoothing_weight, split_rows
from tltk.viz.style import legend_if_several, new_figure, save_figure, short_labels, wrap

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


def describe_data(data: dict[str, Any]) -> str | None:
    """``builtin:digits [0,1,2], 30/class``: the data spec with the filters that change what was trained on."""
    if not data.get("spec"):
        return None
    text = str(data["spec"])
    if data.get("classes"):
        text += " [" + ",".join(map(str, data["classes"])) + "]"
    if data.get("train_per_class"):
        text += f", {data['train_per_class']}/class"
    return text


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
        "data": describe_data(config.get("data", {})),
    }
    row.update({key: train.get(key) for key in HYPERPARAMETERS})
    row.update(epochs_run=summary.get("epochs_run"), best_epoch=summary.get("best_epoch"))
    row.update(final_metrics(summary))
    return row


def compare_runs(runs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Rows for ``runs`` in the order given, every row with the same keys (None where a run lacks one).

    ``name`` is the shortest ending of each run's path that tells the runs apart.
    """
    if not runs:
        raise TltkError("compare needs at least one run directory; pass the --out of earlier `tltk finetune` runs.")
    rows = [run_row(run) for run in runs]
    for row, label in zip(rows, run_labels([Path(row["run"]) for row in rows])):
        row["name"] = label
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return [{key: row.get(key) for key in keys} for row in rows]


def differing_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Columns whose value is not the same in every row: what the comparison is about."""
    return [key for key in rows[0] if len({repr(row.get(key)) for row in rows}) > 1] if rows else []


# --- tables ---------------------------------------------------------------------------

SETTINGS = ("data", "backbone", "head", "strategy", "weights", *HYPERPARAMETERS)
_LABELS = {"lr": "lr", "epochs_run": "epochs run", "best_epoch": "best epoch", "batch_size": "batch size",
           "weight_decay": "weight decay"}


def metric_columns(rows: Sequence[dict[str, Any]], *, headline: bool = False) -> list[str]:
    """The outcome columns: last-epoch train and validation figures, then test figures.

    ``headline``: only the validation and test figures a report leads with (no train
    figures, no VOC07 variant of mAP), for tables that must fit a terminal.
    """
    keys = [key for key in rows[0] if key.startswith(("final_", "test_"))] if rows else []
    if headline:
        keys = [key for key in keys if not key.startswith("final_train_") and not key.endswith("_voc07")]
    return keys


def column_label(key: str) -> str:
    """Header text: ``final_val_accuracy`` -> ``val accuracy``, ``test_top5_accuracy`` -> ``test top-5 accuracy``."""
    if key.startswith(("final_", "test_")):
        return pretty(key.removeprefix("final_"))
    return _LABELS.get(key, key.replace("_", " "))


def table_layout(rows: Sequence[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """(columns of the side-by-side table, settings every run shares).

    An ablation table shows what was changed and what it gave: the settings that differ
    between runs become columns next to the outcomes, and those that are the same
    everywhere are said once, under the table, instead of repeating in every row.
    """
    differing = set(differing_columns(rows))
    varied = [key for key in (*SETTINGS, "epochs_run") if key in differing]
    shared = {key: rows[0].get(key) for key in (*SETTINGS, "epochs_run") if key not in differing} if rows else {}
    return ["name", *varied, *metric_columns(rows, headline=True)], shared


def full_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every column a report table could want: name, all settings, epochs run and best epoch, outcomes."""
    return ["name", *SETTINGS, "epochs_run", "best_epoch", *metric_columns(rows)]


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """``rows`` as a GitHub-flavoured Markdown table, numbers right-aligned, ready to paste into a report."""
    numeric = [all(_is_number(row.get(c)) or row.get(c) is None for row in rows) for c in columns]
    lines = [
        "| " + " | ".join(column_label(c) for c in columns) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(format_value(row.get(c), metric=is_metric(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def run_labels(paths: Sequence[Path]) -> list[str]:
    """The shortest path endings that tell ``paths`` apart: ``lr_0.001``, or ``a/run`` and ``b/run``."""
    parts = [path.resolve().parts for path in paths]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return short_labels([str(path) for path in paths])  # the same directory given twice


def overlay_keys(histories: Sequence[Sequence[dict[str, Any]]]) -> list[str]:
    """The per-epoch figures drawn: validation loss, then each headline validation metric.

    The VOC07 11-point mAP follows mAP closely and stays in the table only.
    """
    metrics = [key for key in _union_metric_keys(histories) if key.startswith("val_") and not key.endswith("_voc07")]
    return ["val_loss", *metrics]


def compare_figure(runs: Sequence[str | Path], labels: Sequence[str] | None = None) -> Figure:
    """Train loss (smoothed, per step), validation loss and each validation metric (per epoch), runs overlaid.

    Panels go two to a row once there are more than three, so the PNG stays readable.
    """
    paths = [Path(run).expanduser() for run in runs]
    histories = [read_run_metrics(path) for path in paths]
    names = list(labels) if labels else run_labels(paths)
    epoch_keys = overlay_keys(histories)
    panels = 1 + len(epoch_keys)
    cols = panels if panels <= 3 else 2
    rows = -(-panels // cols)
    figure, axes = new_figure(5.5 * cols, 4.2 * rows + 0.6, rows=rows, cols=cols)
    colours = [f"C{i % 10}" for i in range(len(names))]
    for name, colour, history in zip(names, colours, histories):
        steps, epochs = split_rows(history)
        losses = [r["loss"] for r in steps]
        if losses:
            axes[0].plot([r["step"] for r in steps], smooth(losses, smoothing_weight(len(losses))), color=colour,
                         label=name)
        for ax, key in zip(axes[1:], epoch_keys):
            points = [(r["epoch"], r[key]) for r in epochs if _is_number(r.get(key))]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colour, label=name)
    axes[0].set(title="train loss (smoothed, per step)", xlabel="step", ylabel="loss")
    for ax, key in zip(axes[1:], epoch_keys):
        ax.set(title=f"{pretty(key)} per epoch", xlabel="epoch", ylabel=family(key))
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes[:panels]:
        ax.grid(alpha=0.3)
        if len(names) > 1 and ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small")  # even one line: colours alone do not say which run it is
    for ax in axes[panels:]:
        ax.set_visible(False)
    heading = f"Comparison of {len(paths)} run{'s' if len(paths) != 1 else ''}: {', '.join(names)}"
    figure.suptitle(wrap(heading, 5.5 * cols))
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
    """The final validation figures worth plotting against the swept value.

    The headline metric (accuracy, or mAP for multi-label runs; the VOC07 variant stays
    in the table), or the validation loss where a run has no other figure.
    """
    keys = list(dict.fromkeys(k for row in rows for k in row if k.startswith("final_val_") and _is_number(row[k])))
    metrics = [k for k in keys if not k.endswith(("loss", "_voc07"))]
    return metrics or keys or [k for k in rows[0] if k.startswith("final_") and _is_number(rows[0][k])][:1]


def sweep_figure(rows: Sequence[dict[str, Any]], param: str, title: str = "") -> Figure:
    """The final validation metric(s) against the swept value, the best point circled.

    Numbers go on a numeric axis (logarithmic once they span a decade, as learning rates
    do); other values (head names, ...) are evenly spaced in the order swept. A run whose
    figure is NaN (it diverged) has no point.
    """
    keys = sweep_metric_keys(rows)
    if not keys:
        raise TltkError("the sweep's runs have no final metrics to plot; check that each run finished.")
    numeric = all(_is_number(row[param]) for row in rows)
    positions = [float(row[param]) if numeric else float(i) for i, row in enumerate(rows)]
    names = {position: row[param] for position, row in zip(positions, rows)}
    figure, (ax,) = new_figure(8.0, 5.0)
    for key in keys:
        points = sorted((x, row[key]) for x, row in zip(positions, rows) if _is_finite(row.get(key)))
        if not points:
            continue
        label = pretty(key.removeprefix("final_"))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"final {label}")
        best = (min if key.endswith("loss") else max)(points, key=lambda p: p[1])
        ax.scatter([best[0]], [best[1]], s=120, facecolors="none", edgecolors="black", zorder=3,
                   label=f"best {label}: {param}={format_value(names[best[0]])}")
    if numeric and min(positions) > 0 and max(positions) / min(positions) >= 10:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(positions, [str(row[param]) for row in rows])
    families = " / ".join(dict.fromkeys(family(k.removeprefix("final_")) for k in keys))
    validation = "validation " if all(k.startswith("final_val_") for k in keys) else ""
    xlabel = "learning rate (lr)" if param == "lr" else column_label(param)
    ax.set(title=wrap(title or f"Final validation metric against {param}", 8.0), xlabel=xlabel,
           ylabel=f"final {validation}{families}")
    ax.grid(alpha=0.3, which="both")
    legend_if_several(ax)
    return figure


def _is_finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def format_value(value: Any, *, metric: bool = False) -> str:
    """Table text; None as ``-``.

    Settings read as people write them (0.001, 1e-05, 64); ``metric`` figures get four
    decimals each (0.9070), so a column of them lines up on the decimal point.
    """
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if metric:
            return f"{value:.4f}"
        return f"{value:.4g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}".rstrip("0").rstrip(".") or "0"
    return "-" if value is None else str(value)


def is_metric(column: str) -> bool:
    """Outcome columns (``final_*``, ``test_*``), as opposed to settings."""
    return column.startswith(("final_", "test_"))
