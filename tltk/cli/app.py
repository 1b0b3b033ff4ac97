"""The ``tltk`` group, its error handling, and the consoles every command prints to."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from tltk.errors import TltkError
from tltk.registry import set_reporter

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


class TltkGroup(click.Group):
    """Turns a ``TltkError`` into one line on stderr and its exit code; --debug keeps the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TltkError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
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
