"""The core commands: list, summary, finetune, evaluate."""

from __future__ import annotations

from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from tltk.catalog import LISTABLE as KIND_WORDS  # reads package metadata only: no torch
from tltk.cli.app import (
    backbone_opt,
    data_options,
    data_overrides,
    err,
    main,
    out,
    parse_options,
    print_json,
    setting_options,
    train_options,
    tta_option,
    wait_option,
)
from tltk.errors import TltkError
from tltk.settings import described
from tltk.train.config import LrFinderSettings

# --- tltk list ------------------------------------------------------------------------

LISTABLE = (*KIND_WORDS, "layers")


@main.command("list")
@click.argument("what", type=click.Choice(LISTABLE), default="backbones")
@click.option("--details", is_flag=True,
              help="Import each component to show its status, description and options (slower: loads torch).")
@click.option("--backbone", default=None, help="list layers: the backbone whose layers to show (as `tltk layers`).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def list_command(ctx: click.Context, what: str, details: bool, backbone: str | None, as_json: bool) -> None:
    """List registered backbones, heads, strategies, exporters or data formats, each with the
    package and version it came from. Reads package metadata only, unless --details.
    `tltk list layers --backbone NAME` lists a backbone's named layers with their shapes."""
    from tltk.catalog import catalog, options_text

    if what == "layers":
        if backbone is None:
            raise TltkError("`tltk list layers` needs --backbone NAME (e.g. --backbone vgg16).")
        from tltk.cli.features import layers

        ctx.invoke(layers, backbone=backbone, as_json=as_json)
        return
    rows = catalog(what, details=details)
    if as_json:
        print_json(rows)
        return
    columns = ["name", "source", *(["status", "pretrained", "description", "options"] if details else [])]
    for row in rows if details else []:
        row["options"] = options_text(row["options"])
    table = Table(title=what)
    for column in columns:
        if not rows or column in rows[0]:
            table.add_column("package" if column == "source" else column, no_wrap=column != "description")
    for row in rows:
        table.add_row(*(escape(str(row[c])) for c in columns if c in row))
    out.print(table)


# --- tltk summary ---------------------------------------------------------------------


@main.command()
@click.option("--backbone", required=True, help="Backbone name (tltk list backbones), or timm:NAME.")
@click.option("--head", default="linear", show_default=True, help="Head name or pkg.mod:factory / file.py:Factory.")
@click.option("--num-classes", type=int, default=10, show_default=True)
@click.option("--strategy", default="finetune", show_default=True, help="Marks which layers train.")
@click.option("--freeze", is_flag=True, help="Alias for --strategy freeze.")
@click.option("--input-size", type=int, default=None, help="Square input size; default: the backbone's.")
@click.option("--hidden", type=int, default=None, help="Hidden width of the mlp/conv head.")
@backbone_opt
@click.option("--head-opt", multiple=True, metavar="KEY=VALUE", help="Head option, repeatable (e.g. hidden=256).")
@click.option("--strategy-opt", multiple=True, metavar="KEY=VALUE", help="Strategy option, repeatable.")
@click.option("--json", "as_json", is_flag=True)
def summary(backbone: str, head: str, num_classes: int, strategy: str, freeze: bool, input_size: int | None,
            hidden: int | None, backbone_opt: tuple[str, ...], head_opt: tuple[str, ...], strategy_opt: tuple[str, ...],
            as_json: bool) -> None:
    """Layer-by-layer table: output shape, parameters, trainable, and totals; then the head's
    and the strategy's options with the values they are built with."""
    from tltk.backbones.base import check_size_option
    from tltk.catalog import declared_options
    from tltk.model import ModelSpec, build_model
    from tltk.strategies import build_strategy
    from tltk.summary import summarize

    check_size_option(input_size)
    options = parse_options(backbone_opt, "--backbone-opt")
    head_options = component_options({"hidden": hidden, "head_opt": head_opt}, "--head-opt", ("hidden",))
    strategy_name = "freeze" if freeze else strategy
    strategy_options = parse_options(strategy_opt, "--strategy-opt")
    model = build_model(ModelSpec(backbone, head, num_classes, head_options, "none", backbone_options=options))
    build_strategy(strategy_name, **strategy_options).prepare(model)
    size = (input_size, input_size) if input_size is not None else tuple(model.preprocessing.input_size)
    result = summarize(model, size)
    settings = {"head": declared_options("head", head, head_options),
                "strategy": declared_options("strategy", strategy_name, strategy_options)}
    if as_json:
        print_json(result.to_dict() | {"options": settings})
        return
    table = Table(title=f"{backbone} + {head} head, {num_classes} classes, input {size[0]}x{size[1]}")
    for column, justify in (("layer", "left"), ("type", "left"), ("output shape", "left"), ("params", "right"), ("trainable", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in result.rows:
        shape = "(None, " + ", ".join(map(str, row.output_shape)) + ")" if row.output_shape else "-"
        table.add_row(row.name.replace("backbone.net.", "backbone."), row.kind, shape, f"{row.params:,}", ("yes" if row.trainable else "no") if row.params else "")
    out.print(table)
    out.print(f"Total params: {result.total:,}")
    out.print(f"Trainable params: {result.trainable:,}")
    out.print(f"Non-trainable params: {result.non_trainable:,}")
    for part, name in (("head", head), ("strategy", strategy_name)):
        shown = ", ".join(f"{o['name']}={o['value']!r}" for o in settings[part] or []) or "none"
        out.print(f"{part} {escape(name)} options: {escape(shown) if settings[part] is not None else 'any'}")


# --- tltk finetune --------------------------------------------------------------------


@main.command()
@click.option("--backbone", help="Backbone name (tltk list backbones), or timm:NAME.  [required]")
@click.option("--head", default="linear", show_default=True, help="linear, mlp, conv, or pkg.mod:factory / file.py:Factory.")
@click.option("--strategy", default="finetune", show_default=True, help="finetune, freeze, freeze-unfreeze, discriminative.")
@click.option("--freeze", is_flag=True, help="Alias for --strategy freeze.")
@click.option("--weights", default="auto", show_default=True,
              help="imagenet, none, FILE (.safetensors/.pth) or RUN_DIR; auto = imagenet where published, else none.")
@click.option("--init", "init", default="default", show_default=True, help="Random init: default, xavier, kaiming, gaussian.")
@click.option("--data", "data_spec", help="folder:PATH, cifar10:PATH, mnist:PATH, voc:PATH, coco:PATH, hf:PATH, csv:FILE, "
              "builtin:digits, or a path.  [required]")
@click.option("--out", help="Run directory to create.  [required]")
@click.option("--overwrite", is_flag=True, help="Replace a run already in --out.")
@click.option("--resume", metavar="RUN", default=None,
              help="Continue the interrupted run in RUN from its checkpoint, with the settings it started with.")
@click.option("--checkpoint-every", type=int, default=None, metavar="N",
              help="Also save a checkpoint every N steps.")
@click.option("--checkpoint-interval", type=float, default=60.0, show_default=True, metavar="SECONDS",
              help="Save a checkpoint at an epoch's end once this long has passed since the last one "
                   "(0: after every epoch). SIGINT/SIGTERM always save.")
@data_options
@train_options
@click.option("--task", default="auto", show_default=True, type=click.Choice(["auto", "multiclass", "multilabel"]),
              help="auto follows the data; multilabel trains one sigmoid per class with BCE.")
@click.option("--pos-weight", default="none", show_default=True, type=click.Choice(["none", "auto"]),
              help="Multi-label: weight positives by negatives/positives per class.")
@click.option("--input-size", type=int, default=None, help="Square input size; default: the backbone's.")
@backbone_opt
@click.option("--head-opt", multiple=True, metavar="KEY=VALUE",
              help="Head option, repeatable (tltk list heads --details lists them; e.g. hidden=256).")
@click.option("--strategy-opt", multiple=True, metavar="KEY=VALUE",
              help="Strategy option, repeatable (tltk list strategies --details; e.g. unfreeze_epoch=2).")
@click.option("--hidden", type=int, default=None, help="Hidden width of the mlp/conv head.")
@click.option("--dropout", type=float, default=None, help="Dropout of the head.")
@click.option("--unfreeze-epoch", type=int, default=None, help="freeze-unfreeze: epochs of head-only training [1].")
@click.option("--backbone-lr-mult", type=float, default=None, help="freeze-unfreeze: backbone lr as a multiple of lr [0.1].")
@click.option("--layer-decay", type=float, default=None, help="discriminative: lr factor per stage towards the input [0.75].")
@click.option("--tensorboard", is_flag=True, help="Write TensorBoard logs to RUN/tensorboard (open with `tltk tensorboard RUN`).")
@click.option("--histogram-every", type=int, default=100, show_default=True,
              help="With --tensorboard: steps between weight and gradient histograms.")
@click.option("--every", "filters_every", type=int, default=None, metavar="N",
              help="Save the conv1 filter grid every N epochs into RUN/plots/filters/.")
@click.option("--curves/--no-curves", default=True, show_default=True,
              help="Draw the loss, metric and learning-rate curves into RUN/plots when training ends "
                   "(--no-curves saves about a second; `tltk plot RUN` draws them later).")
@click.option("--callback", "callback_names", multiple=True, metavar="NAME",
              help="Train with this callback (tltk list callbacks), repeatable; it runs on every process.")
@click.option("--callback-opt", multiple=True, metavar="NAME.KEY=VALUE",
              help="Option of a --callback, repeatable (e.g. time-budget.seconds=600).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@wait_option
def finetune(**opts: Any) -> None:
    """Train a backbone + head on --data and write a run directory to --out.

    Under `torchrun --nproc_per_node N -m tltk.cli finetune ...` (or srun) it trains
    data-parallel, --batch-size per process; see docs/scaling.md.
    """
    from tltk.progress import RichReporter
    from tltk.train.finetune import finetune as run_finetune

    config, out = _config_and_out(opts)
    reporter = RichReporter(err, enabled=not (opts["quiet"] or opts["as_json"]))
    result = run_finetune(config, out, overwrite=opts["overwrite"], reporter=reporter, resume=opts["resume"] is not None,
                          checkpoint_every=opts["checkpoint_every"], checkpoint_interval=opts["checkpoint_interval"],
                          wait=opts["wait"])
    if not result.is_main:
        return  # one report per data-parallel job, from rank 0
    if result.skipped:
        err.print(skipped_message(result.skipped))
    if opts["as_json"]:
        print_json({"out": str(result.out), **result.summary})
        return
    print_run_summary(str(result.out), result.summary)


# Options that may accompany --resume: they change how the run is shown or saved, not what it computes.
RESUME_OPTIONS = {"resume", "checkpoint_every", "checkpoint_interval", "quiet", "as_json", "wait"}


def _config_and_out(opts: dict[str, Any]) -> tuple[Any, str]:
    """A new run's settings from the options, or an interrupted run's from its config.json."""
    from tltk.train.finetune import config_of_run

    if opts["resume"] is None:
        for name, option in (("backbone", "--backbone"), ("data_spec", "--data"), ("out", "--out")):
            if opts[name] is None:
                raise TltkError(f"`tltk finetune` needs {option}, or --resume RUN to continue an interrupted run.")
        return finetune_config(opts), opts["out"]
    context = click.get_current_context()
    given = sorted(name for name in opts if name not in RESUME_OPTIONS
                   and context.get_parameter_source(name) != click.core.ParameterSource.DEFAULT)
    if given:
        option = next(p.opts[0] for p in context.command.params if p.name == given[0])
        raise TltkError(f"--resume continues a run with the settings it started with; drop {option} "
                        "(or start a new run with --out).")
    return config_of_run(opts["resume"]), opts["resume"]


def finetune_config(opts: dict[str, Any]) -> Any:
    """The FinetuneConfig that finetune's options describe (`tltk sweep` builds its runs from it too)."""
    from tltk.train.finetune import DataOptions, FinetuneConfig
    from tltk.train.trainer import TrainConfig

    given = {name: value for name, value in data_overrides(opts).items() if value is not None}
    data = DataOptions(opts["data_spec"], seed=opts["seed"], **given)  # what is not given keeps DataOptions's default
    train_fields = TrainConfig.__dataclass_fields__
    config = FinetuneConfig(
        backbone=opts["backbone"], data=data, head=opts["head"],
        strategy="freeze" if opts["freeze"] else opts["strategy"],
        weights=opts["weights"], init=opts["init"],
        head_options=component_options(opts, "--head-opt", ("hidden", "dropout")),
        backbone_options=parse_options(opts["backbone_opt"], "--backbone-opt"),
        strategy_options=component_options(opts, "--strategy-opt", ("unfreeze_epoch", "backbone_lr_mult", "layer_decay")),
        input_size=opts["input_size"],
        task=opts["task"],
        pos_weight=opts["pos_weight"],
        train=TrainConfig(**{k: opts[k] for k in train_fields if k in opts and k != "task"}),
        tensorboard=opts["tensorboard"], histogram_every=opts["histogram_every"], filters_every=opts["filters_every"],
        curves=opts["curves"], callbacks=callback_specs(opts.get("callback_names", ()), opts.get("callback_opt", ())),
    )
    return config


def component_options(opts: dict[str, Any], flag: str, conveniences: tuple[str, ...]) -> dict[str, Any]:
    """A head's or strategy's options: ``--head-opt KEY=VALUE`` pairs, and the convenience flags
    (``--hidden``, ``--unfreeze-epoch``, ...) that are the same options under their own names.
    None is "not given"; an option given both ways is refused rather than one silently winning."""
    given = parse_options(opts.get(flag.lstrip("-").replace("-", "_"), ()), flag)
    for name in conveniences:
        if opts.get(name) is None:
            continue
        if name in given:
            raise TltkError(f"--{name.replace('_', '-')} and {flag} {name}=... both set {name}; give it once.")
        given[name] = opts[name]
    return given


def callback_specs(names: tuple[str, ...], pairs: tuple[str, ...]) -> list[dict[str, Any]]:
    """``--callback NAME`` and ``--callback-opt NAME.KEY=VALUE`` as the records config.json keeps."""
    options: dict[str, list[str]] = {name: [] for name in names}
    for pair in pairs:
        name, dot, setting = pair.partition(".")
        if not dot or "=" not in setting:
            raise TltkError(f"--callback-opt '{pair}' is not NAME.KEY=VALUE; write e.g. --callback-opt "
                            f"time-budget.seconds=600.")
        if name not in options:
            raise TltkError(f"--callback-opt '{pair}' is for callback '{name}', which no --callback names; "
                            f"add --callback {name} or drop the option.")
        options[name].append(setting)
    return [{"name": name, "options": parse_options(tuple(settings), "--callback-opt")}
            for name, settings in options.items()]


def skipped_message(skipped: list[str]) -> str:
    first = ", ".join(skipped[:3])
    return f"[yellow]skipped {len(skipped)} image(s) that could not be decoded[/] (first: {first}); --strict stops instead."


def print_run_summary(run: str, summary: dict[str, Any]) -> None:
    table = Table(title=f"run {run}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    final = summary.get("final", {})
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_map", "val_map_voc07"):
        if key in final:
            table.add_row(f"final {key}", _fmt(final[key]))
    if summary.get("best_epoch") is not None:
        table.add_row("best epoch", str(summary["best_epoch"]))
    for key, value in summary.get("test", {}).items():
        table.add_row(f"test {key}", _fmt(value))
    table.add_row("epochs / steps", f"{summary['epochs_run']} / {summary['steps']}")
    table.add_row("seconds", _fmt(summary["seconds"]))
    out.print(table)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# --- tltk lr-find ---------------------------------------------------------------------

# finetune's options that say how long and how a run trains or what it writes, which a
# learning-rate ramp of --steps does not use; every other option of finetune is lr-find's too.
NOT_FOR_LR_FIND = {"out", "overwrite", "resume", "checkpoint_every", "checkpoint_interval", "epochs", "max_steps", "lr",
                   "schedule", "warmup_steps", "step_epochs", "gamma", "patience", "monitor", "cache", "cache_mem",
                   "compile", "tensorboard", "histogram_every", "filters_every", "curves", "callback_names", "callback_opt"}


@main.command("lr-find")
@click.option("--out", required=True, help="Folder to write lr_find.json and lr_find.png into.")
@setting_options(LrFinderSettings)
def lr_find(**opts: Any) -> None:
    """Suggest a learning rate for finetune: train copies of the model for a few steps while
    the learning rate grows exponentially, and suggest a tenth of the rate at the lowest
    smoothed loss. Takes finetune's options for the model, strategy, optimizer and data; the
    suggestion is a value for finetune's --lr (or run finetune with --lr find)."""
    from tltk.train.finetune import find_learning_rate
    from tltk.train.lr_find import finding_files

    settings = LrFinderSettings(**{f.name: opts[f.name] for f in described(LrFinderSettings)})
    for name, option in (("backbone", "--backbone"), ("data_spec", "--data")):
        if opts[name] is None:
            raise TltkError(f"`tltk lr-find` needs {option}.")
    config = finetune_config(finetune_defaults() | {k: v for k, v in opts.items() if k not in NOT_FOR_LR_FIND})
    finding = find_learning_rate(config, settings, opts["out"])
    json_path, plot_path = finding_files(opts["out"])
    if opts["as_json"]:
        print_json(finding.to_dict())
        return
    ended = "stopped when the loss diverged" if finding.diverged else "ran every step"
    out.print(f"suggested lr: {finding.suggested_lr:.3g}", soft_wrap=True)
    out.print(f"chosen by: {finding.rule}", soft_wrap=True)
    out.print(f"ramp: {finding.steps_run} steps from {finding.lrs[0]:.3g} to {finding.lrs[-1]:.3g}, {ended}",
              soft_wrap=True)
    out.print(f"wrote {escape(str(json_path))} and {escape(str(plot_path))}; train with `tltk finetune ... "
              f"--lr {finding.suggested_lr:.3g}` or `--lr find`", soft_wrap=True)


def finetune_defaults() -> dict[str, Any]:
    """Every option of finetune at its default: lr-find leaves those it does not take there
    (they change neither the model nor the ramp)."""
    return finetune.make_context("finetune", [], parent=click.get_current_context(), resilient_parsing=True).params


lr_find.params.extend(param for param in finetune.params if param.name not in NOT_FOR_LR_FIND)


# --- tltk evaluate --------------------------------------------------------------------


@main.command()
@click.argument("run")
@click.option("--data", "data_spec", default=None, help="Data to evaluate on; default: the run's own.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@data_options
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", type=int, default=None)
@click.option("--plot", default=None, help="Multi-label: where to write the per-class AP chart [RUN/plots/per_class_ap_SPLIT.png].")
@tta_option
@click.option("--json", "as_json", is_flag=True)
def evaluate(run: str, data_spec: str | None, split: str, device: str, batch_size: int | None, plot: str | None,
             tta: str, as_json: bool, **data: Any) -> None:
    """Multi-class: accuracy, top-5, per-class accuracy, confusion matrix. Multi-label: per-class AP and mAP."""
    from tltk.distributed import launched_rank
    from tltk.run import evaluate as run_evaluate

    report = run_evaluate(run, data_spec, split, device=device, batch_size=batch_size, tta=tta, **data_overrides(data))
    if launched_rank() != 0:
        return  # under torchrun every rank holds the whole report; rank 0 shows it
    if report["task"] == "multilabel":
        from pathlib import Path

        from tltk.viz.ap_chart import plot_per_class_ap

        target = plot or Path(run) / "plots" / f"per_class_ap_{split}.png"
        report["plot"] = str(plot_per_class_ap(report, target, f"per-class AP: {Path(run).name}, {split} split"))
    if as_json:
        print_json(report)
        return
    if report["task"] == "multilabel":
        print_ap_table(report)
        return
    print_evaluation(report)


def print_ap_table(report: dict[str, Any]) -> None:
    from tltk.viz.ap_chart import classes_hardest_first

    out.print(f"[bold]{report['run']}[/] on {report['data']} ({report['split']}, {report['n']} images)")
    print_tta(report)
    table = Table(title="per-class average precision, hardest first")
    for column, justify in (("class", "left"), ("AP", "right"), ("AP (VOC07 11-pt)", "right"),
                            ("positives", "right"), ("ignored", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in classes_hardest_first(report):
        ap = "-" if row["ap"] is None else f"{row['ap']:.4f}"
        ap07 = "-" if row["ap_voc07"] is None else f"{row['ap_voc07']:.4f}"
        table.add_row(row["class"], ap, ap07, str(row["positives"]), str(row["ignored"]))
    table.add_section()
    table.add_row("mAP", f"{report['map']:.4f}", f"{report['map_voc07']:.4f}", "", "")
    out.print(table)
    out.print("AP: area under the precision-recall curve (scikit-learn's average_precision_score); "
              "classes without positives have no AP and are left out of mAP.")
    out.print(f"chart: {report['plot']}")


def print_evaluation(report: dict[str, Any]) -> None:
    out.print(f"[bold]{report['run']}[/] on {report['data']} ({report['split']}, {report['n']} images)")
    print_tta(report)
    out.print(f"accuracy: {report['accuracy']:.4f}")
    if "top5_accuracy" in report:
        out.print(f"top-5 accuracy: {report['top5_accuracy']:.4f}")
    names = report["class_names"]
    per_class = Table(title="per-class accuracy")
    per_class.add_column("class")
    per_class.add_column("accuracy", justify="right")
    per_class.add_column("images", justify="right")
    for name in names:
        value = report["per_class_accuracy"][name]
        per_class.add_row(name, "-" if value is None else f"{value:.4f}", str(report["support"][name]))
    out.print(per_class)
    confusion = Table(title="confusion matrix (rows: true, columns: predicted)")
    confusion.add_column("")
    for name in names:
        confusion.add_column(name, justify="right")
    for name, row in zip(names, report["confusion_matrix"]):
        confusion.add_row(name, *(str(v) for v in row))
    out.print(confusion)


def print_tta(report: dict[str, Any]) -> None:
    if report.get("tta", "none") != "none":
        out.print(f"test-time augmentation: {report['tta']} (probabilities averaged over its views)")
