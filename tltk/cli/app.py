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


def wait_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--wait``: every command that writes a run directory or store offers it in the same words."""
    from tltk.locking import WAIT_HELP

    return click.option("--wait", is_flag=True, help=WAIT_HELP)(command)


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


def tta_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """--tta of evaluate and predict: the views whose probabilities are averaged (tltk.tta)."""
    from tltk.settings import TTA_MODES

    return click.option("--tta", default="none", show_default=True, type=click.Choice(list(TTA_MODES)),
                        help="Test-time augmentation: average the probabilities over the image and its mirror "
                             "(flip), or also its four corner crops at 7/8 size, each mirrored (flip+crops: 10 "
                             "views).")(command)


backbone_opt = click.option(
    "--backbone-opt", multiple=True, metavar="KEY=VALUE", help="Backbone option, repeatable (e.g. act=leakyrelu)."
)


def data_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options that turn a --data spec into splits, shared by the commands that read data:
    one per ``DataOptions`` setting, with its help and its default from there. Each option's
    own default is None, "not given": a run's recorded setting then holds, and a new run
    takes ``DataOptions``'s default."""
    for setting in reversed(data_settings()):
        command = _data_option(setting)(command)
    return command


def data_settings() -> list[Any]:
    from tltk.data.options import DataOptions
    from tltk.settings import described

    return described(DataOptions)


def _data_option(setting: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    from tltk.settings import flag_of

    help_text = setting.metadata["help"]
    if setting.default not in (None, False) and "[" not in help_text:
        help_text = f"{help_text} [{setting.default}]"
    if str(setting.type) == "bool":
        return click.option(flag_of(setting), is_flag=True, default=None, help=help_text)
    return click.option(flag_of(setting), default=None, help=help_text, type=_click_type(setting))


def _click_type(setting: Any) -> Any:
    """The click type of a setting: its choices, else a number type read from its annotation
    (text otherwise; the annotations are strings under ``from __future__ import annotations``)."""
    choices = setting.metadata.get("choices")
    if choices:
        return click.Choice(list(choices))
    if setting.metadata.get("parse") is not None:
        return ParsedSetting(setting.metadata["parse"])
    return {"int": int, "float": float}.get(str(setting.type).removesuffix(" | None"))


class ParsedSetting(click.ParamType):
    """A setting read by its own parser (``tltk.settings.setting(parse=...)``), whose
    ``SettingError`` reaches the user as its one sentence, with the flag as typed."""

    name = "text"

    def __init__(self, parse: Callable[[str], Any]) -> None:
        self.parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return value if not isinstance(value, str) else self.parse(value)


def data_overrides(opts: dict[str, Any]) -> dict[str, Any]:
    """The data options given on the command line, as ``DataOptions`` settings (None: not given)."""
    from tltk.settings import flag_of

    given = {}
    for setting in data_settings():
        value = opts.get(flag_of(setting).lstrip("-").replace("-", "_"))
        if setting.name == "classes":
            value = split_classes(value)
        given[setting.name] = value if value is not False else None
    return given


def split_classes(classes: str | None) -> list[str] | None:
    """--classes as a list of names; None where it was not given."""
    return [c.strip() for c in classes.split(",") if c.strip()] if classes else None


def train_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """One option per ``TrainConfig`` setting, with its default, choices and help from there
    (the task is ``--task`` of finetune, resolved from the data)."""
    from tltk.settings import described, flag_of
    from tltk.train.config import TrainConfig

    for setting in reversed(described(TrainConfig)):
        command = _train_option(setting, flag_of(setting))(command)
    return command


def setting_options(config: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One option per setting of ``config`` (a dataclass of ``tltk.settings.setting`` fields),
    with its default, choices and help from there, as ``train_options`` for ``TrainConfig``."""
    from tltk.settings import described, flag_of

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for setting in reversed(described(config)):
            command = _train_option(setting, flag_of(setting))(command)
        return command

    return decorate


def _train_option(setting: Any, flag: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    if "/" in flag:  # a switch: --cache/--no-cache
        return click.option(flag, setting.name, default=setting.default, show_default=True, help=setting.metadata["help"])
    if str(setting.type) == "bool":
        return click.option(flag, setting.name, is_flag=True, default=setting.default, help=setting.metadata["help"])
    return click.option(flag, setting.name, default=setting.default, show_default=setting.default is not None,
                        type=_click_type(setting), help=setting.metadata["help"])
