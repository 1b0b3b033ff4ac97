"""The ``tltk`` group, its error handling, and the consoles every command prints to."""

from __future__ import annotations

import json
from typing import Any, Callable, NoReturn

import click
from rich.console import Console
from rich.markup import escape

from tltk.errors import SettingError, TltkError
from tltk.registry import set_reporter

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


class RefusesRepeatedOptions(click.Command):
    """Refuses a single-valued option given more than once, in one sentence.

    click keeps the last value of a repeated option silently, so ``--k 5 --k 7`` would
    search with 7 and never say so. Options that take a list are declared ``multiple``
    and are not affected. Shared by every tltk command and group, so no command can
    forget it.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not ctx.resilient_parsing:
            refuse_repeated_options(self, ctx, args)
        return super().parse_args(ctx, args)


def refuse_repeated_options(command: click.Command, ctx: click.Context, args: list[str]) -> None:
    """Raise a ``TltkError`` naming the first single-valued option that ``args`` repeats.

    The command's own parser reads a copy of ``args`` first, so that ``--opt=value``, short
    names and values that look like options are understood exactly as click will.
    """
    try:
        _, _, order = command.make_parser(ctx).parse_args(args=list(args))
    except click.UsageError:
        return  # click reports it, in the same words, when it parses for real
    seen: set[str] = set()
    for param in order:
        if not isinstance(param, click.Option) or not is_single_valued(param) or param.name is None:
            continue
        if param.name in seen:
            raise TltkError(repeated_option_message(param, ctx.command_path))
        seen.add(param.name)


def repeated_option_message(option: click.Option, command_path: str) -> str:
    names = "/".join([*option.opts, *option.secondary_opts])
    advice = "give one of them once" if option.secondary_opts else "give it once" if option.is_flag else (
        "it takes one value, so give it once")
    return f"{names} is given more than once to `{command_path}`; {advice}."


def is_single_valued(option: click.Option) -> bool:
    """Whether repeating ``option`` would silently replace its value (not a list, not a
    counter, not --help/--version, which act at once and set nothing)."""
    return not option.multiple and not option.count and option.expose_value


class TltkCommand(RefusesRepeatedOptions):
    """Every tltk command: refuses repeated single-valued options."""


class TltkGroup(RefusesRepeatedOptions, click.Group):
    """Turns a ``TltkError`` into one line on stderr and its exit code; --debug keeps the traceback.

    Its commands are ``TltkCommand`` and its subgroups ``TltkGroup`` (``group_class = type``),
    so every command under ``tltk`` refuses repeated single-valued options.
    """

    command_class = TltkCommand
    group_class = type

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except TltkError as exc:
            if ctx.parent is not None:
                raise  # the group above reports it
            report_error(ctx, exc)  # ``tltk``'s own options are parsed before any invoke

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TltkError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            report_error(ctx, exc)


def report_error(ctx: click.Context, exc: TltkError) -> NoReturn:
    """The error's one sentence on stderr, then exit with its code."""
    sentence = exc.with_flags() if isinstance(exc, SettingError) else str(exc)  # the flags the user typed
    err.print(f"[bold red]error:[/] {escape(sentence)}", soft_wrap=True)
    ctx.exit(exc.exit_code)


@click.group(cls=TltkGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="tltk")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Transfer learning for image classification: fine-tune, evaluate, look inside."""
    ctx.obj = {"debug": debug}
    set_reporter(report_plugin_problem)


def report_plugin_problem(message: str) -> None:
    """A broken plugin found on the way (a name clash): one line on stderr, and tltk carries on."""
    err.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


def print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def parse_options(pairs: tuple[str, ...], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs to a dict; values read as int, float, true/false, else text."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise TltkError(f"{flag} '{pair}' is not KEY=VALUE; write e.g. {flag} hidden=128.")
        options[key.strip().replace("-", "_")] = _typed(value.strip())
    return options


def _typed(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


backbone_opt = click.option(
    "--backbone-opt", multiple=True, metavar="KEY=VALUE", help="Backbone option, repeatable (e.g. act=leakyrelu)."
)


def data_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options that turn a --data spec into splits; shared by the commands that read data."""
    options = [
        click.option("--image-root", default=None, help="Folder that csv: file names are relative to."),
        click.option("--val-split", type=float, default=None, help="Fraction of train held out for validation [0.1]."),
        click.option("--test-split", type=float, default=None, help="Fraction held out for test where the data has no test split [0.2]."),
        click.option("--classes", default=None, help="Comma-separated class names to keep, e.g. 0,1,2,3,4."),
        click.option("--train-per-class", type=int, default=None, help="Keep at most N training images per class."),
        click.option("--strict", is_flag=True, help="Stop at the first image that cannot be decoded instead of skipping it."),
        click.option("--voc-difficult", default=None, type=click.Choice(["ignore", "positive", "negative"]),
                     help="VOC objects marked difficult, COCO crowds: ignored when scoring (default), or counted."),
        click.option("--image-column", default=None, help="hf: the column of images [the one Image column]."),
        click.option("--label-column", default=None, help="hf: the column of labels [the one ClassLabel column]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def split_classes(classes: str | None) -> list[str] | None:
    """--classes as a list of names; None where it was not given."""
    return [c.strip() for c in classes.split(",") if c.strip()] if classes else None
