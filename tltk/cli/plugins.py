"""``tltk plugins``: every installed plugin component, the package it came from, and whether it loads."""

from __future__ import annotations

import click
from rich.markup import escape
from rich.table import Table

from tltk.cli.app import main, out, print_json

STATUS_STYLE = {"ok": "green", "failed": "bold red", "blocked": "yellow"}


@main.command("plugins")
@click.option("--all", "include_builtin", is_flag=True, help="Include tltk's own components (imports them: slower).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def plugins_command(include_builtin: bool, as_json: bool) -> None:
    """Plugin components by entry-point group, with package==version and status: ok, failed
    (with the reason) or blocked (by TLTK_PLUGINS or TLTK_DISABLE_PLUGIN_AUTOLOAD). Imports
    each plugin component's module, nothing else. Exits with 1 when a component failed."""
    from tltk.catalog import plugin_rows, policy_note

    rows = plugin_rows(include_builtin=include_builtin)
    note = policy_note()
    if as_json:
        print_json({"plugins": rows, "policy": note})
    else:
        out.print(_table(rows) if rows else "No plugins installed. docs/plugins.md shows how to write one.")
        if note:
            out.print(note)
    failed = [row for row in rows if row["status"] == "failed"]
    if failed:  # a plugin's CI notices without reading the table (blocked is a choice, not a failure)
        raise click.exceptions.Exit(1)


def _table(rows: list[dict[str, str]]) -> Table:
    table = Table(title="plugins")
    for column in ("group", "name", "package==version", "status"):
        table.add_column(column, no_wrap=True)
    table.add_column("detail", overflow="fold")
    for row in rows:
        style = STATUS_STYLE.get(row["status"], "")
        status = f"[{style}]{row['status']}[/]" if style else row["status"]
        table.add_row(row["group"], escape(row["name"]), escape(row["source"]), status, escape(row["detail"]))
    return table
