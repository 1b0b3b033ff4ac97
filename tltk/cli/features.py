"""Feature-store commands: layers, extract, index, neighbors, evaluate-retrieval, tsne."""

from __future__ import annotations

from typing import Any, Callable

import click
from rich.table import Table

from tltk.cli.app import (
    TltkCommand,
    TltkGroup,
    backbone_opt,
    data_options,
    data_overrides,
    err,
    main,
    out,
    parse_options,
    print_json,
    wait_option,
)
from tltk.errors import TltkError

SPLIT_CHOICES = click.Choice(["all", "train", "val", "test"])


def model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """How a backbone named as SOURCE gets its weights and input."""
    options = [
        click.option("--weights", default=None, help="With a backbone as SOURCE: imagenet, none, FILE or RUN_DIR [auto]."),
        click.option("--init", default="default", show_default=True, help="With --weights none: default, xavier, kaiming, gaussian."),
        click.option("--seed", type=int, default=0, show_default=True, help="With --weights none: seed of the random weights."),
        click.option("--input-size", type=int, default=None, help="With a backbone as SOURCE: square input size [the backbone's]."),
        backbone_opt,
    ]
    for option in reversed(options):
        command = option(command)
    return command


def loading_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--batch-size", type=int, default=64, show_default=True),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N."),
        click.option("--workers", type=int, default=None, help="DataLoader workers [from the number of images]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def index_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--index", "index_kind", default="auto", show_default=True,
                     type=click.Choice(["auto", "flat", "ivf", "hnsw", "ivfpq"]),
                     help="auto: exact (flat) below --auto-threshold rows, ivf above."),
        click.option("--auto-threshold", type=int, default=50_000, show_default=True, help="Rows from which auto builds an approximate index."),
        click.option("--nlist", type=int, default=None, help="ivf/ivfpq: inverted lists [about 2 sqrt(rows)]."),
        click.option("--nprobe", type=int, default=None, help="ivf/ivfpq: lists searched per query [tuned to --target-recall]."),
        click.option("--ef-search", type=int, default=None, help="hnsw: candidate list size per query [tuned to --target-recall]."),
        click.option("--pq-m", type=int, default=None, help="ivfpq: sub-quantizers, a divisor of the dimension."),
        click.option("--target-recall", type=float, default=0.95, show_default=True, help="Recall@10 that tuning aims for."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _index_config(opts: dict[str, Any]) -> Any:
    from tltk.features.faiss_index import IndexOptions

    return IndexOptions(kind=opts["index_kind"], nlist=opts["nlist"], nprobe=opts["nprobe"], ef_search=opts["ef_search"],
                        pq_m=opts["pq_m"], threshold=opts["auto_threshold"], target_recall=opts["target_recall"])


def _loading(opts: dict[str, Any]) -> Any:
    from tltk.features.extract import Loading

    return Loading(batch_size=opts["batch_size"], device=opts["device"], workers=opts["workers"])


def _source(source: str, opts: dict[str, Any]) -> Any:
    from tltk.features.source import load_source

    return load_source(source, weights=opts["weights"], init=opts["init"], seed=opts["seed"],
                       backbone_options=parse_options(opts["backbone_opt"], "--backbone-opt"), input_size=opts["input_size"])


class _ProgressBar:
    """A transient bar on stderr while images stream through the model."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled
        self.progress: Any = None
        self.task: Any = None

    def __enter__(self) -> "_ProgressBar":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn(f"[bold]{self.label}[/]"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=err, transient=True)
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=None)
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, total=total or None)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()


def _print_index(record: dict[str, Any]) -> None:
    from tltk.features.faiss_index import RecallReport

    if record.get("recall"):
        out.print(f"index {record['type']} ({record['factory']}): {RecallReport(**record['recall']).describe()}", soft_wrap=True)
    else:
        out.print(f"index {record['type']} ({record['factory']}): exact search", soft_wrap=True)


# --- tltk layers ----------------------------------------------------------------------


@main.command()
@click.option("--backbone", required=True, help="Backbone name (tltk list backbones), or timm:NAME.")
@click.option("--all", "all_modules", is_flag=True, help="Also list every raw module of the network.")
@click.option("--input-size", type=int, default=None, help="Square input size [the backbone's].")
@click.option("--num-classes", type=int, default=None, help="Attach a linear head of this size, to show logits' shape.")
@backbone_opt
@click.option("--json", "as_json", is_flag=True)
def layers(backbone: str, all_modules: bool, input_size: int | None, num_classes: int | None,
           backbone_opt: tuple[str, ...], as_json: bool) -> None:
    """Named layers (conv1, pool5, fc6, fc7, logits) of a backbone, with output shapes."""
    from tltk.layers import list_layers

    rows = list_layers(backbone, all_modules=all_modules, input_size=input_size, num_classes=num_classes,
                       backbone_options=parse_options(backbone_opt, "--backbone-opt"))
    if as_json:
        print_json(rows)
        return
    table = Table(title=f"layers of {backbone} (output per image; dim: vector length with --pool avg / flatten)")
    for column, justify in (("layer", "left"), ("module", "left"), ("type", "left"), ("shape", "left"),
                            ("dim avg/max", "right"), ("dim flatten", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        shape = "did not run" if row["shape"] is None else " x ".join(str(n) for n in row["shape"])
        table.add_row(row["layer"], row["module"], row["type"], shape, str(row["dim"] or "-"), str(row["flatten_dim"] or "-"))
    out.print(table)


# --- tltk extract ---------------------------------------------------------------------


@main.command()
@click.argument("source")
@click.option("--layer", required=True, help="conv1, pool5, fc6, fc7, logits, or a raw module name (`tltk layers`).")
@click.option("--data", "data_spec", default=None, help="Images to extract; default for a run: its own data.")
@click.option("--split", default="all", show_default=True, type=SPLIT_CHOICES)
@click.option("--out", "out_dir", required=True, help="Directory of the new store.")
@click.option("--overwrite", is_flag=True, help="Replace a store already in --out.")
@click.option("--pool", default="avg", show_default=True, type=click.Choice(["avg", "max", "flatten"]),
              help="How a spatial map becomes one vector.")
@click.option("--metric", default="cosine", show_default=True, type=click.Choice(["cosine", "l2"]),
              help="cosine: inner product of L2-normalised vectors.")
@click.option("--shard", default=None, metavar="I/N",
              help="Write only shard I of N (from 0; e.g. $RANK/$WORLD_SIZE) as a part; join all N with `tltk index merge`.")
@index_options
@model_options
@loading_options
@data_options
@click.option("--json", "as_json", is_flag=True)
@wait_option
def extract(source: str, layer: str, data_spec: str | None, split: str, out_dir: str, overwrite: bool, pool: str,
            metric: str, shard: str | None, as_json: bool, wait: bool, **opts: Any) -> None:
    """Features of one layer of SOURCE (a run directory, or a backbone with --weights) into a FAISS store."""
    from tltk.features.extract import extract as run_extract
    from tltk.features.extract import parse_shard
    from tltk.features.shards import StorePart

    shard_of = parse_shard(shard) if shard is not None else None
    model = _source(source, opts)
    with _ProgressBar("extract", not as_json) as bar:
        store = run_extract(model, layer, out_dir, data_spec, split=split, pool=pool, metric=metric,
                            index=_index_config(opts), loading=_loading(opts), overwrite=overwrite, progress=bar,
                            shard=shard_of, wait=wait, **data_overrides(opts))
    if as_json:
        print_json(store.summary())
        return
    if isinstance(store, StorePart):
        start, stop = store.rows
        out.print(f"wrote shard {store.index}/{store.of}: rows {start}-{stop - 1} of {store.total}, {store.dim}-d "
                  f"{store.layer} features ({store.pool} pool, {store.metric}) from {model.description} to {store.path}; "
                  f"join all {store.of} parts with `tltk index merge PART... --out STORE`", soft_wrap=True)
        return
    out.print(f"wrote {store.count} rows of {store.dim}-d {store.layer} features ({store.pool} pool, {store.metric}) "
              f"from {model.description} to {store.path}", soft_wrap=True)
    _print_index(store.manifest["index"])


# --- tltk index -----------------------------------------------------------------------

STORE_FORM = "__store__"  # the hidden subcommand behind `tltk index STORE ...`; never typed


class _StoreFormContext(click.Context):
    """Named ``tltk index`` in usage lines and hints, not by its hidden subcommand name."""

    @property
    def command_path(self) -> str:
        return self.parent.command_path if self.parent is not None else super().command_path


class _StoreFormCommand(TltkCommand):
    """The store form of ``tltk index``: ``tltk index [OPTIONS] STORE``."""

    context_class = _StoreFormContext


class _IndexGroup(TltkGroup):
    """``tltk index STORE [OPTIONS]`` works on one store; ``tltk index merge PART... --out STORE``
    joins the parts of a sharded extraction.

    Arguments that do not begin with ``merge`` go to the store form, so every ``tltk index
    STORE ...`` written before ``merge`` existed still means what it meant (a store directory
    named ``merge`` is reached as ``./merge``). The help shows both forms in full.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = [STORE_FORM, *args]
        return super().parse_args(ctx, args)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        for name in (STORE_FORM, "merge"):
            command = self.commands[name]
            sub_ctx = command.context_class(command, info_name=name, parent=ctx)
            if name != STORE_FORM:
                formatter.write_paragraph()
            command.format_usage(sub_ctx, formatter)
            command.format_help_text(sub_ctx, formatter)
            command.format_options(sub_ctx, formatter)


@main.group(cls=_IndexGroup, help="Show a STORE and work on its index, or merge the parts of a sharded extraction.")
def index() -> None:
    pass


@index.command(STORE_FORM, cls=_StoreFormCommand, hidden=True)
@click.argument("store_dir", metavar="STORE")
@click.option("--add", is_flag=True, help="Append the images of --data, with the model that built the store.")
@click.option("--data", "data_spec", default=None, help="With --add: the images to append.")
@click.option("--split", default="all", show_default=True, type=SPLIT_CHOICES)
@click.option("--rebuild", is_flag=True, help="Build the index again (with --index and its settings).")
@click.option("--check-recall", is_flag=True, help="Measure the index's recall@k against exact search.")
@click.option("--recall-k", type=int, default=10, show_default=True)
@click.option("--recall-queries", type=int, default=200, show_default=True, help="Stored vectors used as queries.")
@index_options
@loading_options
@data_options
@click.option("--json", "as_json", is_flag=True)
@wait_option
def index_store(store_dir: str, add: bool, data_spec: str | None, split: str, rebuild: bool, check_recall: bool,
                recall_k: int, recall_queries: int, as_json: bool, wait: bool, **opts: Any) -> None:
    """Show STORE; --add images, --rebuild its index, set --nprobe/--ef-search, or --check-recall."""
    from tltk.features.extract import add_images
    from tltk.features.store import FeatureStore

    store = FeatureStore.open(store_dir)
    report: dict[str, Any] = {}
    if add:
        if data_spec is None:
            raise TltkError("--add needs --data SPEC: the images to append.")
        with _ProgressBar("add", not as_json) as bar:
            report["added"] = add_images(store, data_spec, split=split, loading=_loading(opts), progress=bar,
                                         wait=wait, **data_overrides(opts))
    if rebuild:
        store.rebuild(_index_config(opts), wait=wait)
    elif opts["nprobe"] is not None or opts["ef_search"] is not None:
        store.set_search_params(opts["nprobe"], opts["ef_search"], wait=wait)
    if check_recall:
        report["check_recall"] = store.check_recall(recall_k, recall_queries).to_dict()
    if as_json:
        print_json({**store.summary(), **report})
        return
    if "added" in report:
        out.print(f"added {report['added']} rows; the store now holds {store.count}")
    _print_store(store)
    if "check_recall" in report:
        from tltk.features.faiss_index import RecallReport

        out.print(f"check: {RecallReport(**report['check_recall']).describe()}", soft_wrap=True)


@index.command("merge")
@click.argument("parts", nargs=-1, required=True, metavar="PART...")
@click.option("--out", "out_dir", required=True, help="Directory of the merged store.")
@click.option("--overwrite", is_flag=True, help="Replace a store already in --out.")
@click.option("--json", "as_json", is_flag=True)
@wait_option
def merge(parts: tuple[str, ...], out_dir: str, overwrite: bool, as_json: bool, wait: bool) -> None:
    """Join all the parts of `tltk extract --shard I/N` (any order) into the store one extraction writes."""
    from tltk.features.shards import merge_parts

    with _ProgressBar("merge", not as_json) as bar:
        store = merge_parts(parts, out_dir, overwrite=overwrite, progress=bar, wait=wait)
    if as_json:
        print_json(store.summary())
        return
    out.print(f"merged {len(parts)} parts into {store.path}: {store.count} rows of {store.dim}-d {store.layer} features "
              f"({store.pool} pool, {store.metric})", soft_wrap=True)
    _print_index(store.manifest["index"])


def _print_store(store: Any) -> None:
    info = store.summary()
    table = Table(title=f"feature store {info['store']}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for key in ("count", "dim", "layer", "pool", "metric", "source", "fingerprint", "task", "classes", "data"):
        value = info[key]
        table.add_row(key, ", ".join(value) if isinstance(value, list) else str(value))
    out.print(table)
    _print_index(store.manifest["index"])


# --- tltk neighbors -------------------------------------------------------------------


@main.command()
@click.argument("source")
@click.argument("more", nargs=-1, metavar="[IMAGE|N]...")
@click.option("--query", multiple=True, help="Query image file; repeat it, or list more images after the options.")
@click.option("--query-index", multiple=True,
              help="Stored rows as queries, comma-separated or repeated (each leaves itself out).")
@click.option("--k", type=int, default=10, show_default=True)
@click.option("--grid", default=None, help="PNG of each query beside its neighbours.")
@click.option("--layer", default=None, help="With a model as SOURCE: the layer to build the store from.")
@click.option("--data", "data_spec", default=None, help="With a model as SOURCE: the images to search.")
@click.option("--split", default="all", show_default=True, type=SPLIT_CHOICES)
@click.option("--pool", default="avg", show_default=True, type=click.Choice(["avg", "max", "flatten"]))
@click.option("--metric", default="cosine", show_default=True, type=click.Choice(["cosine", "l2"]))
@click.option("--store", "store_dir", default=None, help="With a model as SOURCE: where the store goes [RUN/features/... or the user cache].")
@model_options
@loading_options
@data_options
@click.option("--json", "as_json", is_flag=True)
def neighbors(source: str, more: tuple[str, ...], query: tuple[str, ...], query_index: tuple[str, ...], k: int,
              grid: str | None, layer: str | None, data_spec: str | None, split: str, pool: str, metric: str,
              store_dir: str | None, as_json: bool, **opts: Any) -> None:
    """Nearest stored images to query images or stored rows: rank, path, label, distance.

    SOURCE is a store, or a model (run directory or backbone) with --layer and --data,
    whose store is built first or reused when one with the same fingerprint exists.
    """
    from tltk.features.manifest import is_store
    from tltk.features.neighbors import check_k, neighbours_of_images, neighbours_of_rows
    from tltk.features.store import FeatureStore

    check_k(k)  # before a store is built, which can take minutes
    images, rows = _queries(query, query_index, more)
    model = None
    if is_store(source):
        if layer is not None or data_spec is not None:
            raise TltkError(f"{source} is a store: it already has its layer and data; drop --layer and --data.")
        store = FeatureStore.open(source)
    else:
        store, model = _course_store(source, layer, data_spec, split, pool, metric, store_dir, as_json, opts)
    if images:
        results = neighbours_of_images(store, images, k, source=model, loading=_loading(opts))
    else:
        results = neighbours_of_rows(store, rows, k)
    grid_path = None
    if grid:
        from tltk.viz.neighbors_grid import write_neighbors_grid

        grid_path = str(write_neighbors_grid(store, results, grid))
    if as_json:
        print_json({"store": str(store.path), "layer": store.layer, "metric": store.metric, "k": k, "grid": grid_path,
                    "queries": [r.to_dict() for r in results]})
        return
    for result in results:
        _print_neighbours(result, store.metric)
    if grid_path:
        out.print(f"grid: {grid_path}")


def _queries(query: tuple[str, ...], query_index: tuple[str, ...], more: tuple[str, ...]) -> tuple[list[str], list[int]]:
    """Query images or stored rows; arguments after the options extend whichever was named."""
    if query and query_index:
        raise TltkError("give --query images or --query-index rows, not both.")
    if query or (more and not query_index):
        if not query:
            raise TltkError(f"'{more[0]}' follows SOURCE but no --query or --query-index says what it is; put --query before it.")
        return [*query, *more], []
    if not query_index:
        raise TltkError("name what to search for: --query IMAGE (an image file) or --query-index N (a stored row).")
    parts = [p.strip() for p in [*(row for value in query_index for row in value.split(",")), *more] if p.strip()]
    try:
        return [], [int(p) for p in parts]
    except ValueError as exc:
        raise TltkError(f"--query-index takes row numbers such as 0,5,17, not '{','.join(query_index)}'.") from exc


def _course_store(source: str, layer: str | None, data_spec: str | None, split: str, pool: str, metric: str,
                  store_dir: str | None, quiet: bool, opts: dict[str, Any]) -> tuple[Any, Any]:
    """``tltk neighbors MODEL --layer L --data SPEC``: the matching store, built or reused."""
    from tltk.features.extract import extract_or_reuse

    if layer is None:
        raise TltkError(f"{source} is not a feature store; with a model as SOURCE, name --layer (and --data) to build one.")
    model = _source(source, opts)
    with _ProgressBar("extract", not quiet) as bar:
        store, built = extract_or_reuse(model, layer, data_spec, store_dir=store_dir, split=split, pool=pool, metric=metric,
                                        loading=_loading(opts), progress=bar, **data_overrides(opts))
    if not quiet:
        out.print(f"{'built' if built else 'reused'} store {store.path} ({store.count} rows, {store.layer}, {store.pool} pool)",
                  soft_wrap=True)
    return store, model


def _print_neighbours(result: Any, metric: str) -> None:
    labels = f" ({', '.join(result.labels)})" if result.labels else ""
    row = f" [row {result.row}]" if result.row is not None else ""
    table = Table(title=f"neighbours of {result.query}{row}{labels}")
    for column, justify in (("rank", "right"), ("path", "left"), ("label", "left"),
                            (f"distance ({'1 - cosine' if metric == 'cosine' else 'L2'})", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for n in result.neighbours:
        table.add_row(str(n.rank), n.path, ", ".join(n.labels), f"{n.distance:.4f}")
    out.print(table)


# --- tltk evaluate-retrieval ----------------------------------------------------------


@main.command("evaluate-retrieval")
@click.argument("store_dir", metavar="STORE")
@click.option("--k", type=int, default=10, show_default=True)
@click.option("--sample", type=int, default=None, help="Score this many random stored rows as queries [all].")
@click.option("--exact", is_flag=True, help="Brute-force neighbours even where the store's index is approximate.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def evaluate_retrieval(store_dir: str, k: int, sample: int | None, exact: bool, seed: int, as_json: bool) -> None:
    """Leave-one-out kNN accuracy, precision@k and mAP@k of STORE against its labels."""
    from tltk.features.retrieval import evaluate_retrieval as run_evaluation
    from tltk.features.store import FeatureStore

    report = run_evaluation(FeatureStore.open(store_dir), k, sample=sample, exact=exact, seed=seed)
    if as_json:
        print_json(report.to_dict())
        return
    out.print(f"[bold]{report.store}[/]: {report.layer} ({report.pool} pool, {report.metric}), {report.task}, "
              f"{report.queries} leave-one-out queries, {'exact' if report.exact else 'approximate'} neighbours", soft_wrap=True)
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    if report.knn_accuracy is not None:
        table.add_row(f"kNN accuracy (k={report.k}, majority vote)", f"{report.knn_accuracy:.4f}")
    table.add_row(f"precision@{report.k}", f"{report.precision_at_k:.4f}")
    table.add_row(f"mAP@{report.k}", f"{report.map_at_k:.4f}")
    out.print(table)
    if report.task == "multilabel":
        out.print("a neighbour is relevant when it shares at least one label with the query.")


# --- tltk tsne ------------------------------------------------------------------------


@main.command()
@click.argument("store_dir", metavar="STORE")
@click.option("--out", "out_file", required=True, help="PNG to write.")
@click.option("--sample", type=int, default=3000, show_default=True, help="Random rows to embed (t-SNE is quadratic-ish).")
@click.option("--perplexity", type=float, default=30.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def tsne(store_dir: str, out_file: str, sample: int, perplexity: float, seed: int, as_json: bool) -> None:
    """A t-SNE map of STORE's vectors (scikit-learn), coloured by class."""
    from tltk.features.store import FeatureStore
    from tltk.viz.tsne import write_tsne

    if perplexity <= 0:
        raise TltkError(f"--perplexity must be above 0, not {perplexity}.")
    result = write_tsne(FeatureStore.open(store_dir), out_file, sample=sample, perplexity=perplexity, seed=seed)
    if as_json:
        print_json(result.to_dict())
        return
    out.print(f"t-SNE of {result.points} points, {result.classes} classes (perplexity {result.perplexity:g}): {result.out}",
              soft_wrap=True)


__all__ = ["evaluate_retrieval", "extract", "index", "layers", "neighbors", "tsne"]
