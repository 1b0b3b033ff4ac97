"""Commands that look inside training: plot, visualize, sweep, compare, tensorboard."""

from __future__ import annotations

from typing import Any, Callable

import click
from rich.table import Table

from tltk.cli.app import TltkCommand, data_options, data_overrides, err, main, out, print_json
from tltk.cli.core import finetune_config
from tltk.errors import TltkError


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def _print_paths(title: str, paths: list[str]) -> None:
    out.print(f"[bold]{title}[/]")
    for path in paths:
        out.print(f"  {path}")


# --- tltk plot ------------------------------------------------------------------------


@main.command()
@click.argument("run")
@click.option("--out", "out_dir", default=None, help="Folder for the PNGs [RUN/plots].")
@click.option("--json", "as_json", is_flag=True)
def plot(run: str, out_dir: str | None, as_json: bool) -> None:
    """Loss, accuracy (or mAP) and learning-rate curves of RUN as PNGs."""
    from tltk.viz.curves import write_curves

    written = [str(p) for p in write_curves(run, out_dir)]
    if as_json:
        print_json({"plots": written})
        return
    _print_paths(f"curves of {run}", written)


# --- tltk visualize -------------------------------------------------------------------


@main.group()
def visualize() -> None:
    """Pictures of a trained run: filters, activations, misclassified images, class activation maps."""


@visualize.command()
@click.argument("run")
@click.option("--layer", default="conv1", show_default=True, help="A conv layer: conv1, or a raw module name.")
@click.option("--out", default=None, help="PNG to write [RUN/plots/filters_LAYER.png].")
@click.option("--json", "as_json", is_flag=True)
def filters(run: str, layer: str, out: str | None, as_json: bool) -> None:
    """The kernels of a convolution of RUN as one grid, each filter scaled on its own."""
    from tltk.viz.filters import visualize_filters

    result = visualize_filters(run, layer, out)
    if as_json:
        print_json(result.to_dict())
        return
    filters, channels, height, width = result.shape
    _print_paths(f"{layer} ({result.module}): {result.shown} of {filters} filters, {channels} x {height}x{width}",
                 [str(result.out)])


@visualize.command()
@click.argument("run")
@click.option("--layer", required=True, help="conv1, pool5, ... or a raw module name (an unknown name lists them).")
@click.option("--image", default=None, help="The image whose feature maps to draw.")
@click.option("--class-average", is_flag=True, help="Average the maps over the images of each class instead.")
@click.option("--data", "data_spec", default=None, help="With --class-average: data to average over; default: the run's own.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@data_options
@click.option("--per-class", type=int, default=32, show_default=True, help="With --class-average: images per class.")
@click.option("--max-maps", type=int, default=None, help="Channels to draw [64 for one image, 16 per class].")
@click.option("--out", default=None, help="PNG to write [RUN/plots/activations_LAYER_....png].")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def activations(**opts: Any) -> None:
    """Feature maps of one image at a layer of RUN, or their average per class."""
    from tltk.viz.activations import class_average_activations, image_activations

    if opts["class_average"] == bool(opts["image"]):
        raise TltkError("give either --image IMG or --class-average (with --data SPEC), not both or neither.")
    if opts["class_average"]:
        result = class_average_activations(
            opts["run"], opts["layer"], opts["data_spec"], opts["split"], out=opts["out"],
            per_class=opts["per_class"], max_maps=_or(opts["max_maps"], 16), device=opts["device"],
            **data_overrides(opts),
        )
    else:
        result = image_activations(opts["run"], opts["image"], opts["layer"], out=opts["out"],
                                   max_maps=_or(opts["max_maps"], 64), device=opts["device"])
    if opts["as_json"]:
        print_json(result.to_dict())
        return
    _print_paths(f"{result.layer} ({result.module}): {result.channels} channels of "
                 f"{result.size[0]}x{result.size[1]}, {result.images} image(s)", [str(result.out)])


@visualize.command()
@click.argument("run")
@click.option("--data", "data_spec", default=None, help="Data to look at; default: the run's own.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@data_options
@click.option("--n", "count", type=int, default=64, show_default=True, help="Mistakes in the grid, most confident first.")
@click.option("--out-dir", default=None, help="Folder for the PNGs [RUN/plots].")
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def misclassified(**opts: Any) -> None:
    """Grid of the images RUN gets wrong (true / predicted) and its confusion matrix."""
    from tltk.viz.misclassified import visualize_misclassified

    result = visualize_misclassified(
        opts["run"], opts["data_spec"], opts["split"], n=opts["count"], out_dir=opts["out_dir"],
        device=opts["device"], batch_size=opts["batch_size"], **data_overrides(opts),
    )
    if opts["as_json"]:
        print_json(result.to_dict(limit=opts["count"]))
        return
    table = Table(title=f"{len(result.mistakes)} of {result.n} images misclassified, most confident first")
    for column in ("id", "true", "predicted", "confidence"):
        table.add_column(column, justify="right" if column == "confidence" else "left")
    for mistake in result.mistakes[:10]:
        table.add_row(mistake.id, mistake.true, mistake.predicted, f"{mistake.confidence:.3f}")
    out.print(table)
    _print_paths("pictures", [str(result.grid), str(result.confusion_png)])


@visualize.command()
@click.argument("run")
@click.option("--image", "images", multiple=True, required=True, help="An image to explain; repeat for more.")
@click.option("--layer", default=None, help="A conv layer by name or module path [the last convolutional map].")
@click.option("--class", "class_name", default=None, help="Explain this class [the predicted one, or each predicted label].")
@click.option("--method", default="gradcam", show_default=True, type=click.Choice(["gradcam", "gradcam++", "scorecam", "eigencam"]))
@click.option("--out", "out_dir", required=True, help="Folder for the PNGs (one per image).")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def gradcam(run: str, images: tuple[str, ...], layer: str | None, class_name: str | None, method: str, out_dir: str,
            device: str, as_json: bool) -> None:
    """Where in each image RUN found the evidence for its decision: a class activation map over the image."""
    from tltk.viz.gradcam import visualize_gradcam

    result = visualize_gradcam(run, list(images), out_dir, layer=layer, class_name=class_name, method=method,
                               device=device)
    if as_json:
        print_json(result.to_dict())
        return
    for explanation in result.explanations:
        out.print(f"{explanation.source}: {explanation.class_name} p={explanation.probability:.3f}")
    first = result.explanations[0]
    _print_paths(f"{first.method} at {first.layer}", [str(p) for p in result.pictures])


# --- tltk compare ---------------------------------------------------------------------


@main.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", "out_png", default="compare.png", show_default=True, help="PNG of the runs' curves overlaid.")
@click.option("--markdown", is_flag=True, help="Print the whole table (every setting and figure) as Markdown, for a report.")
@click.option("--json", "as_json", is_flag=True)
def compare(runs: tuple[str, ...], out_png: str, markdown: bool, as_json: bool) -> None:
    """Side-by-side table of RUNS (settings and final figures) and their curves in one PNG."""
    from tltk.viz.compare import column_label, format_value, full_columns, markdown_table, table_layout, write_comparison

    rows, path = write_comparison(list(runs), out_png)
    if as_json:
        print_json({"plot": str(path), "rows": rows})
        return
    if markdown:
        click.echo(markdown_table(rows, full_columns(rows)), nl=False)
        return
    columns, shared = table_layout(rows)
    print_table(f"{len(rows)} runs", rows, columns)
    if shared:
        out.print("same in every run: " + ", ".join(f"{column_label(k)} {format_value(v)}" for k, v in shared.items()))
    _print_paths("curves", [str(path)])


def _longest_word(text: str) -> int:
    """The narrowest a cell can be: rich wraps text at spaces."""
    return max((len(word) for word in text.split()), default=0)


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Rows as a table, numbers right-aligned; turned on its side (one column per row) when even
    with every cell wrapped at its spaces it would not fit the terminal."""
    from tltk.viz.compare import column_label, format_value, is_metric

    cells = [[format_value(row.get(column), metric=is_metric(column)) for column in columns] for row in rows]
    labels = [column_label(column) for column in columns]
    width = sum(max(_longest_word(label), *(_longest_word(r[i]) for r in cells)) + 3 for i, label in enumerate(labels))
    table = Table(title=title)
    if width <= out.width or len(rows) * 12 > out.width:
        for index, column in enumerate(columns):
            numeric = all(isinstance(row.get(column), (int, float)) or row.get(column) is None for row in rows)
            table.add_column(labels[index], justify="right" if numeric else "left", overflow="fold")
        for line in cells:
            table.add_row(*line)
    else:
        table.add_column(labels[0])
        for line in cells:
            table.add_column(line[0], justify="right", overflow="fold")
        for index, label in enumerate(labels[1:], start=1):
            table.add_row(label, *(line[index] for line in cells))
    out.print(table)


# --- tltk sweep -----------------------------------------------------------------------


@main.group()
def sweep() -> None:
    """One short run per value of a hyperparameter, same seed; a table and a plot."""


def parse_values(text: str) -> list[float]:
    """``1e-4,1e-3,1e-2`` -> [0.0001, 0.001, 0.01]."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise TltkError(f"--values '{text}' must be numbers separated by commas, e.g. 1e-4,1e-3,1e-2.") from None
    if not values:
        raise TltkError("--values is empty; give the values to try, e.g. --values 1e-4,1e-3,1e-2.")
    return values


def sweep_command(param: str, option: str, help_text: str) -> Callable[..., Any]:
    """A ``tltk sweep PARAM`` command: finetune's options except --out and the swept one."""

    def run(**opts: Any) -> None:
        from tltk.progress import RichReporter
        from tltk.sweep import sweep as run_sweep

        values = parse_values(opts.pop("values"))
        quiet = opts["quiet"] or opts["as_json"]

        def reporter(index: int, value: float) -> RichReporter:
            if not quiet:
                err.print(f"[bold]run {index + 1}/{len(values)}: {param} = {value:g}[/]")
            return RichReporter(err, enabled=not quiet)

        rows = run_sweep(finetune_config(opts), param, values, opts["out_root"], overwrite=opts["overwrite"],
                         reporter=reporter)
        if opts["as_json"]:
            print_json({"param": param, "out_root": opts["out_root"], "rows": rows})
            return
        from tltk.viz.compare import metric_columns

        print_table(f"sweep of {param}: one run per value under {opts['out_root']}", rows,
                    [param, *metric_columns(rows, headline=True), "best_epoch"])
        _print_paths("table and plot", [f"{opts['out_root']}/sweep.json", f"{opts['out_root']}/sweep.png"])

    skipped = {"out", param}
    params = [p for p in main.commands["finetune"].params if p.name not in skipped]
    params += [
        click.Option(["--values"], required=True, help=f"Comma-separated values of {option}, e.g. 1e-4,1e-3,1e-2."),
        click.Option(["--out-root"], required=True, help="Folder that gets one run directory per value."),
    ]
    return TltkCommand(param.replace("_", "-"), callback=run, params=params, help=help_text)


sweep.add_command(sweep_command(
    "lr", "--lr", "Train once per learning rate in --values (finetune's options otherwise) and plot the final "
                  "validation metric against it."
))


# --- tltk tensorboard -----------------------------------------------------------------


@main.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("--port", type=int, default=None, help="Port to serve on [6006].")
@click.option("--host", default=None, help="Address to listen on [localhost].")
def tensorboard(runs: tuple[str, ...], port: int | None, host: str | None) -> None:
    """Serve the TensorBoard logs of RUNS (trained with `tltk finetune --tensorboard`)."""
    from tltk.viz.tensorboard import launch_tensorboard, tensorboard_argv

    launch_tensorboard(tensorboard_argv(list(runs), port, host))
