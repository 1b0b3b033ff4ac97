"""The report page: rendered from the package's Jinja2 templates, written atomically, printed to PDF.

Templates escape every value they show (autoescape), since class names and paths come from
the user's files and may hold ``<``, ``&`` or quotes. The page's Content-Security-Policy
allows images from data URIs and the one inline script whose hash it names, nothing else,
so the page cannot fetch anything even if something in it tried.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tltk import __version__
from tltk.errors import TltkError
from tltk.fileio import atomic_write, user_path, write_text
from tltk.run import Run, as_run

TEMPLATES = Path(__file__).with_name("templates")
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
CHROMIUM_VARIABLE = "TLTK_CHROMIUM"
PRINT_TIMEOUT_S = 180


@dataclass
class ReportResult:
    """Where the page (and its PDF) went, and what it holds."""

    html: Path
    pdf: Path | None
    runs: list[str]
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"html": str(self.html), "pdf": str(self.pdf) if self.pdf else None, "runs": self.runs,
                "bytes": self.bytes}


def report(runs: Run | str | Path | Sequence[Run | str | Path], out: str | Path, *, pdf: str | Path | None = None,
           split: str = "test", device: str = "auto") -> ReportResult:
    """Write the report of ``runs`` (run directories or loaded ``Run`` objects) to ``out`` as one
    HTML page, and its PDF to ``pdf`` when given: ``tltk report RUN... --out FILE [--pdf FILE]``.

    Everything that can be refused is refused before a file is written: no runs, an output that
    is a folder, a PDF asked for where no Chromium is found.
    """
    given = [runs] if isinstance(runs, (Run, str, Path)) else list(runs)
    if not given:
        raise TltkError("report needs at least one run directory; pass the --out of earlier `tltk finetune` runs.")
    html_path = _output_path(out, "--out", ".html")
    pdf_path = _output_path(pdf, "--pdf", ".pdf") if pdf is not None else None
    chromium = find_chromium() if pdf_path is not None else None
    loaded = [as_run(run) for run in given]
    text = render_page(loaded, split=split, device=device)
    write_text(html_path, text)
    if pdf_path is not None and chromium is not None:  # both or neither: chromium is looked up for a PDF
        print_pdf(chromium, html_path, pdf_path)
    return ReportResult(html_path, pdf_path, [str(run.path) for run in loaded], len(text.encode("utf-8")))


def write_pdf(html: str | Path, pdf: str | Path) -> Path:
    """Print a written report page to ``pdf`` with headless Chromium."""
    html_path = Path(html).expanduser()
    if not html_path.is_file():
        raise TltkError(f"{html_path} is not a file; write the report first with `tltk report RUN --out {html_path}`.")
    pdf_path = _output_path(pdf, "--pdf", ".pdf")
    print_pdf(find_chromium(), html_path, pdf_path)
    return pdf_path


def _output_path(path: str | Path, flag: str, suffix: str) -> Path:
    target = user_path(str(path))
    if target.is_dir():
        raise TltkError(f"{flag} {target} is a folder; name the {suffix} file to write, e.g. {target / ('report' + suffix)}.")
    return target


# --- the page ---------------------------------------------------------------------------------


def render_page(runs: Sequence[Run], *, split: str = "test", device: str = "auto") -> str:
    """The whole page as text: one section per part of each run, and the ablation table when
    there are several runs."""
    from tltk.reporting.ablation import ablation
    from tltk.reporting.contents import run_section
    from tltk.viz.compare import run_labels

    labels = run_labels([run.path for run in runs])
    anchors = [f"run-{index}" for index in range(1, len(runs) + 1)]
    sections = [run_section(run, anchor, label, split=split, device=device)
                for run, anchor, label in zip(runs, anchors, labels)]
    title = f"tltk report: {labels[0]}" if len(runs) == 1 else f"tltk report: {len(runs)} runs compared"
    script = (TEMPLATES / "sort.js").read_text(encoding="utf-8")
    return environment().get_template("report.html.j2").render(
        title=title, version=__version__, written=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        split=split, runs=sections, ablation=ablation(runs, anchors) if len(runs) > 1 else None,
        style=_markup((TEMPLATES / "style.css").read_text(encoding="utf-8")),
        script=_markup(script), script_hash=script_hash(script),
    )


def environment() -> Any:
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _markup(text: str) -> Any:
    """The package's own style sheet and script, put in the page as they are (they are not user data)."""
    from markupsafe import Markup

    return Markup(text)


def script_hash(script: str) -> str:
    """The CSP source that allows exactly this inline script."""
    return "sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")


# --- the PDF ----------------------------------------------------------------------------------


def find_chromium() -> Path:
    """The Chromium that prints PDFs: $TLTK_CHROMIUM, else the first Chromium or Chrome on PATH."""
    chosen = os.environ.get(CHROMIUM_VARIABLE)
    if chosen:
        path = Path(chosen).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise TltkError(f"{CHROMIUM_VARIABLE}={chosen} is not an executable file; point it at a Chromium binary "
                            f"or unset it to use the chromium on PATH.")
        return path
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return Path(found)
    raise TltkError("--pdf needs Chromium to print the page and none was found on PATH; install the `chromium` package "
                    f"(apt-get install chromium) or set {CHROMIUM_VARIABLE} to a Chromium binary.")


def chromium_command(chromium: Path, html: Path, pdf: Path, profile: Path) -> list[str]:
    """Headless Chromium printing ``html`` to ``pdf``, with no network, no extensions, no first-run work."""
    return [str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-extensions", "--no-first-run",
            "--no-default-browser-check", f"--user-data-dir={profile}", "--no-pdf-header-footer",
            "--run-all-compositor-stages-before-draw", f"--print-to-pdf={pdf}", html.resolve().as_uri()]


def print_pdf(chromium: Path, html: Path, pdf: Path) -> None:
    """Print the page to ``pdf`` atomically: a failed print leaves no PDF, or the old one."""
    def printed(target: Path) -> None:
        target.unlink(missing_ok=True)  # Chromium's own write is how we know it printed
        with tempfile.TemporaryDirectory(prefix="tltk-chromium-") as profile:
            try:
                done = subprocess.run(chromium_command(chromium, html, target, Path(profile)), capture_output=True,
                                      text=True, timeout=PRINT_TIMEOUT_S)
            except subprocess.TimeoutExpired as exc:
                raise TltkError(f"{chromium} did not finish printing {html} within {PRINT_TIMEOUT_S} s; "
                                f"no PDF was written.") from exc
        if done.returncode != 0 or not target.is_file() or target.stat().st_size == 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise TltkError(f"{chromium} could not print {html} to PDF (exit {done.returncode}: {last}); "
                            f"no PDF was written.")

    atomic_write(pdf, printed)
