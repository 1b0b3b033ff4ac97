"""``tltk cache``: what the decoded-image cache holds, and clearing it."""

from __future__ import annotations

import time

import click

from tltk.cli.app import main, out, print_json


@main.group()
def cache() -> None:
    """The decoded training images kept between runs ($TLTK_CACHE/images, else ~/.cache/tltk/images)."""


@cache.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
def info(as_json: bool) -> None:
    """List the cached image sets, most recently used first, with their sizes."""
    from rich.table import Table

    from tltk.train.cache import human_bytes
    from tltk.train.image_cache import cache_contents

    contents = cache_contents()
    if as_json:
        print_json(contents.to_dict())
        return
    table = Table(title=f"decoded images in {contents.folder}")
    for column in ("file", "images", "size", "on disk", "last used"):
        table.add_column(column, justify="left" if column in ("file", "last used") else "right")
    for entry in contents.entries:
        table.add_row(entry.path.name, f"{entry.images:,}", f"{entry.height}x{entry.width}", human_bytes(entry.bytes),
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used)))
    out.print(table)
    count = len(contents.entries)
    out.print(f"{count} image set{'s' if count != 1 else ''}, {human_bytes(contents.bytes)}; "
              f"`tltk cache clear` removes them.")


@cache.command("clear")
@click.option("--older-than-days", type=float, default=None, metavar="DAYS",
              help="Only the sets no run has used for DAYS days [all].")
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON.")
def clear(older_than_days: float | None, as_json: bool) -> None:
    """Remove cached image sets (the next run on their data decodes again) and the files of
    decodings whose run was killed."""
    from tltk.train.cache import human_bytes
    from tltk.train.image_cache import clear_cache

    cleared = clear_cache(older_than_days=older_than_days)
    if as_json:
        print_json(cleared.to_dict())
        return
    out.print(f"removed {cleared.removed} file{'s' if cleared.removed != 1 else ''} "
              f"({human_bytes(cleared.removed_bytes)}); kept {cleared.kept}.")
