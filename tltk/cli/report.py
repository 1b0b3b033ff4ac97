"""``tltk report``: the write-up of one or several runs as one HTML page, and its PDF."""

from __future__ import annotations

import click

from tltk.cli.app import main, out, print_json


@main.command()
@click.argument("runs", nargs=-1, required=True, metavar="RUN [RUN ...]")
@click.option("--out", "out_file", required=True, help="HTML file to write (one self-contained page).")
@click.option("--pdf", default=None, help="Also print the page to this PDF with headless Chromium.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]),
              help="The split each run is evaluated on.")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print where the files went, as JSON.")
def report(runs: tuple[str, ...], out_file: str, pdf: str | None, split: str, device: str, as_json: bool) -> None:
    """One page on RUNs: what was trained, curves, figures, per-class table, confusion matrix,
    mistakes, filters, neighbours; with several runs, an ablation table first."""
    from tltk.reporting import report as write_report

    result = write_report(list(runs), out_file, pdf=pdf, split=split, device=device)
    if as_json:
        print_json(result.to_dict())
        return
    out.print(f"wrote the report of {len(result.runs)} run{'s' if len(result.runs) != 1 else ''} to {result.html} "
              f"({result.bytes / 1e6:.1f} MB)")
    if result.pdf is not None:
        out.print(f"printed it to {result.pdf}")
