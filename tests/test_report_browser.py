"""The report page opened in a real Chromium: offline, every image decoding, the numbers the
run computes, sortable tables, hostile class names shown as text, and its PDF.

Two reports are built once for the module: a ResNet-18 (no pretrained weights, 32 px images)
frozen against fine-tuned on a folder dataset whose class folder names hold ``<``, ``&`` and
quotes, and a multi-label VOC run whose classes include ``<script>alert(1)</script>``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pdf_text import page_objects, pdf_pages
from report_fixtures import (
    HOSTILE_FOLDER,
    HOSTILE_LABEL,
    OpenedPage,
    launched_chromium,
    skip_or_fail_without_browser,
    write_colour_folders,
    write_hostile_voc,
)
from tltk.cli import main
from tltk.reporting import report
from tltk.run import load_run
from tltk.train.finetune import DataOptions, FinetuneConfig, finetune
from tltk.train.trainer import TrainConfig

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def browser():
    yield from launched_chromium()


def _train(out: Path, backbone: str, data: str, **options) -> Path:
    strategy = options.pop("strategy", "finetune")
    train = TrainConfig(epochs=2, batch_size=8, workers=0, device="cpu", **options)
    config = FinetuneConfig(backbone=backbone, data=DataOptions(data), strategy=strategy, weights="none",
                            input_size=32, train=train)
    return finetune(config, out).out


@pytest.fixture(scope="module")
def comparison(tmp_path_factory) -> dict:
    """ResNet-18 frozen vs fine-tuned on the same folder data, reported together (HTML and PDF)."""
    skip_or_fail_without_browser()
    root = tmp_path_factory.mktemp("comparison")
    data = f"folder:{write_colour_folders(root / 'data')}"
    runs = [_train(root / "frozen", "resnet18", data, strategy="freeze", lr=1e-2),
            _train(root / "fine-tuned", "resnet18", data, lr=1e-3)]
    result = report(runs, root / "report.html", pdf=root / "report.pdf", device="cpu")
    return {"runs": runs, "html": result.html, "pdf": result.pdf}


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> dict:
    """A multi-label VOC run whose classes include a script tag, reported through the command line."""
    skip_or_fail_without_browser()
    root = tmp_path_factory.mktemp("voc")
    run = _train(root / "voc-run", "simplecnn", f"voc:{write_hostile_voc(root / 'data')}", lr=3e-3)
    done = CliRunner().invoke(main, ["report", str(run), "--out", str(root / "voc.html"), "--pdf",
                                     str(root / "voc.pdf"), "--device", "cpu", "--json"], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    written = json.loads(done.stdout)
    evaluated = CliRunner().invoke(main, ["evaluate", str(run), "--device", "cpu", "--json"], catch_exceptions=False)
    return {"run": run, "html": Path(written["html"]), "pdf": Path(written["pdf"]),
            "evaluate": json.loads(evaluated.stdout)}


@pytest.fixture(scope="module")
def comparison_page(browser, comparison, tmp_path_factory) -> OpenedPage:
    opened = OpenedPage(browser, comparison["html"])
    shot = tmp_path_factory.mktemp("screenshots") / "report-comparison.png"
    opened.page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot of the comparison report: {shot}")
    return opened


@pytest.fixture(scope="module")
def voc_page(browser, voc) -> OpenedPage:
    return OpenedPage(browser, voc["html"])


def cells(page, table: str, column: str, run: str | None = None) -> list[dict]:
    """Text and exact value of one column's cells of a table (within one run's sections if given)."""
    scope = f'[data-run="{run}"] ' if run else ""
    return page.eval_on_selector_all(
        f'{scope}table[data-table="{table}"] tbody td[data-column="{column}"]',
        "cells => cells.map(c => ({text: c.querySelector('.text, a').textContent, value: c.dataset.value,"
        " best: c.classList.contains('best')}))")


def figure_value(page, run: str, label: str) -> dict:
    rows = page.eval_on_selector_all(
        f'[data-run="{run}"] table[data-table="figures"] tbody tr',
        "rows => rows.map(r => ({label: r.cells[0].textContent, text: r.cells[1].textContent.trim(),"
        " value: r.cells[1].dataset.value}))")
    return next(row for row in rows if row["label"] == label)


# --- offline, whole --------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["comparison_page", "voc_page"])
def test_the_page_opens_offline_with_no_request_no_console_error_and_every_image_decoded(which, request) -> None:
    """Nothing but the file itself is requested (images are data URIs), nothing logs an error,
    and every image decodes to a picture with width."""
    opened: OpenedPage = request.getfixturevalue(which)
    assert opened.outside_requests() == []
    assert opened.errors == []
    widths = opened.page.eval_on_selector_all("img", "images => images.map(i => [i.complete, i.naturalWidth])")
    assert len(widths) >= 6  # curves, per-class chart, mistakes, filters at the least
    assert all(complete and width > 0 for complete, width in widths)
    sources = opened.page.eval_on_selector_all("img", "images => images.map(i => i.getAttribute('src'))")
    assert all(src.startswith("data:image/png;base64,") for src in sources)


# --- numbers read back ---------------------------------------------------------------------------


def test_the_ablation_table_shows_each_runs_summary_figures_and_marks_the_best(comparison, comparison_page) -> None:
    """Per run: its test accuracy and final validation figures as summary.json holds them, the
    strategy that tells the runs apart, and the best value of each figure column marked."""
    page = comparison_page.page
    summaries = [json.loads((run / "summary.json").read_text()) for run in comparison["runs"]]
    names = [cell["text"] for cell in cells(page, "ablation", "run")]
    assert names == ["frozen", "fine-tuned"]
    assert [cell["text"] for cell in cells(page, "ablation", "strategy")] == ["freeze", "finetune"]
    for column, read in (("test accuracy", lambda s: s["test"]["accuracy"]),
                         ("val accuracy", lambda s: s["final"]["val_accuracy"]),
                         ("val loss", lambda s: s["final"]["val_loss"])):
        shown = cells(page, "ablation", column)
        expected = [read(summary) for summary in summaries]
        assert [float(cell["value"]) for cell in shown] == expected
        assert [cell["text"] for cell in shown] == [f"{value:.4f}" for value in expected]
        best = (min if column.endswith("loss") else max)(expected)
        assert [cell["best"] for cell in shown] == [value == best for value in expected]


def test_each_runs_test_figures_and_per_class_accuracy_equal_run_evaluate(comparison, comparison_page) -> None:
    page = comparison_page.page
    for anchor, run in zip(("run-1", "run-2"), comparison["runs"]):
        evaluated = load_run(run).evaluate(device="cpu")
        accuracy = figure_value(page, anchor, "test accuracy")
        assert float(accuracy["value"]) == evaluated["accuracy"]
        assert accuracy["text"] == f"{evaluated['accuracy']:.4f}"
        assert int(float(figure_value(page, anchor, "test images")["value"])) == evaluated["n"]
        classes = [cell["text"] for cell in cells(page, "per-class", "class", anchor)]
        shown = dict(zip(classes, cells(page, "per-class", "accuracy", anchor)))
        assert set(shown) == set(evaluated["per_class_accuracy"])
        for name, value in evaluated["per_class_accuracy"].items():
            assert float(shown[name]["value"]) == value and shown[name]["text"] == f"{value:.4f}"


def test_the_multilabel_page_shows_both_maps_and_per_class_ap_as_tltk_evaluate_json(voc, voc_page) -> None:
    page, evaluated = voc_page.page, voc["evaluate"]
    for label, key in (("test mAP", "map"), ("test mAP (VOC07 11-point)", "map_voc07")):
        shown = figure_value(page, "run-1", label)
        assert float(shown["value"]) == pytest.approx(evaluated[key], abs=1e-12)
        assert shown["text"] == f"{evaluated[key]:.4f}"
    classes = [cell["text"] for cell in cells(page, "per-class", "class")]
    for column, key in (("AP", "ap"), ("AP (VOC07 11-point)", "ap_voc07"), ("positives", "positives")):
        shown = dict(zip(classes, cells(page, "per-class", column)))
        for row in evaluated["per_class"]:
            if row[key] is None:
                assert shown[row["class"]]["text"] == "-"
            else:
                assert float(shown[row["class"]]["value"]) == pytest.approx(row[key], abs=1e-12)


# --- behaviour ----------------------------------------------------------------------------------


def test_clicking_a_header_sorts_the_rows_by_that_column_and_again_reverses_them(comparison_page) -> None:
    page = comparison_page.page
    table = '[data-run="run-2"] table[data-table="per-class"]'

    def column(name: str) -> list[str]:
        return page.eval_on_selector_all(f'{table} tbody td[data-column="{name}"]',
                                         "cells => cells.map(c => c.dataset.value ?? c.textContent)")

    before = column("class")
    page.click(f'{table} thead th[data-column="class"] button')
    ascending = column("class")
    page.click(f'{table} thead th[data-column="class"] button')
    assert column("class") == ascending[::-1]
    assert sorted(ascending) == sorted(before)
    page.click(f'{table} thead th[data-column="images"] button')
    counts = [float(v) for v in column("images")]
    assert counts == sorted(counts)
    assert page.get_attribute(f'{table} thead th[data-column="images"]', "aria-sort") == "ascending"
    page.click(f'{table} thead th[data-column="images"] button')
    assert [float(v) for v in column("images")] == sorted(counts, reverse=True)


@pytest.mark.parametrize("which, name", [("comparison_page", HOSTILE_FOLDER), ("voc_page", HOSTILE_LABEL)])
def test_a_hostile_class_name_is_shown_as_text_and_runs_nothing(which, name, request) -> None:
    """The class name is the text of its table cell, no element came from it, and no script but
    the page's own ran (no dialog opened)."""
    opened: OpenedPage = request.getfixturevalue(which)
    assert name in [cell["text"] for cell in cells(opened.page, "per-class", "class")]
    assert opened.page.evaluate("document.scripts.length") == 1
    assert opened.page.evaluate("document.querySelectorAll('b, d, c').length") == 0
    assert opened.dialogs == []
    assert opened.errors == []


# --- the PDF ----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["comparison", "voc"])
def test_the_pdf_starts_each_section_on_a_new_page_with_its_heading(which, request) -> None:
    """Chromium's PDF: each section of the page starts a page of its own with its heading (a long
    section, such as every setting of a run, continues on the next pages, which start no other
    section), pages counted in the page tree and as /Type /Page objects; the figures the page
    shows are in the text."""
    built = request.getfixturevalue(which)
    page = request.getfixturevalue(f"{which}_page").page
    headings = [_squeezed(h) for h in page.eval_on_selector_all("section.sheet h2", "hs => hs.map(h => h.textContent)")]
    pages = pdf_pages(built["pdf"])
    assert len(pages) == page_objects(built["pdf"]) >= len(headings)
    title = page.eval_on_selector("h1", "h => h.textContent")
    assert pages[0].startswith(title) and headings[0] in pages[0]
    opening = [next((h for h in headings[1:] if text.startswith(h)), None) for text in pages[1:]]
    assert [h for h in opening if h is not None] == headings[1:], opening
    for text, heading in zip(pages, [headings[0], *opening]):
        others = [h for h in headings if h != heading and h in text]
        assert not others, (text[:80], others)  # no section begins in the middle of a page
    figures = page.eval_on_selector_all('table[data-table="figures"] td.num .text', "ts => ts.map(t => t.textContent)")
    whole = " ".join(pages)
    assert figures and all(figure in whole for figure in figures)


def _squeezed(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def test_a_screenshot_can_be_copied_for_the_docs(comparison_page, tmp_path) -> None:
    """The screenshot the module wrote is a real PNG of the page (docs/report-screenshot.png is made
    from such a page by docs/make_report_screenshot.py)."""
    from PIL import Image

    shot = tmp_path / "top.png"
    comparison_page.page.screenshot(path=str(shot))
    with Image.open(shot) as image:
        assert image.size == (1200, 900)
        assert len(image.convert("L").getcolors(maxcolors=1 << 16) or []) > 16  # not a blank page
    shutil.copy(shot, tmp_path / "copy.png")
