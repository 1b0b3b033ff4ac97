"""The report page without a browser: what it refuses, how it escapes, how it marks and how big it gets."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tltk.cli import main
from tltk.errors import TltkError
from tltk.reporting import page, report
from tltk.reporting.contents import false_positives
from tltk.reporting.tables import Cell, mark_best
from tltk.run import load_run
from tltk.train.finetune import DataOptions, FinetuneConfig, finetune
from tltk.train.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


HOSTILE = '<script>alert(1)</script>&"quoted"\'single\''  # a CSV label has no spaces


def write_digit_csv(root: Path) -> Path:
    """scikit-learn's digits 0-2 as PNGs listed in a CSV, the zeros labelled with a name full of markup."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from data_fixtures import write_csv

    digits = load_digits()
    labels = {0: HOSTILE, 1: "one", 2: "two"}
    rows = []
    for index in np.flatnonzero(digits.target < 3):
        name = f"d{index:04d}.png"
        Image.fromarray(np.rint(digits.images[index] * 255 / 16).astype(np.uint8)).save(root / name)
        rows.append((name, labels[int(digits.target[index])]))
    return write_csv(root / "labels.csv", rows)


@pytest.fixture(scope="module")
def many_test_images(tmp_path_factory) -> Path:
    """lenet5 on the digits 0-2 with 80% of the images held out (over 400 test images), from a CSV
    whose labels hold markup."""
    listing = write_digit_csv(tmp_path_factory.mktemp("digits"))
    data = DataOptions(f"csv:{listing}", train_per_class=8, test_split=0.8)
    train = TrainConfig(epochs=1, batch_size=8, lr=3e-3, workers=0, device="cpu", seed=1)
    config = FinetuneConfig(backbone="lenet5", data=data, weights="none", train=train, filters_every=1)
    return finetune(config, tmp_path_factory.mktemp("runs") / "digits").out


@pytest.fixture(scope="module")
def page_file(many_test_images, tmp_path_factory) -> Path:
    return report(many_test_images, tmp_path_factory.mktemp("report") / "digits.html", device="cpu").html


@pytest.fixture(scope="module")
def page_text(page_file) -> str:
    return page_file.read_text(encoding="utf-8")


def tltk(*args: str):
    return CliRunner().invoke(main, list(args))


def test_a_run_with_hundreds_of_test_images_gives_a_small_page_with_a_sample_of_mistakes(many_test_images, page_text) -> None:
    """The grid is a sample (16 mistakes at most, said so) and the page stays well under a few MB."""
    n = load_run(many_test_images).summary["test"]["n"]
    assert n > 400
    assert len(page_text.encode("utf-8")) < 2_000_000
    shown = re.search(r"(\d+) most confident of (\d+) mistakes on test \((\d+) images\)", page_text)
    assert shown is not None and int(shown.group(1)) == min(16, int(shown.group(2))) and int(shown.group(3)) == n


def test_the_page_fetches_nothing_and_allows_only_its_own_script(page_text) -> None:
    """No URL to load anything from; images are data URIs; the policy names the one script's hash."""
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page_text)
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'<img src="([^"]*)"', page_text))
    script = re.search(r"<script>(.*?)</script>", page_text, re.S).group(1)
    assert page_text.count("<script") == 1
    assert f"script-src '{page.script_hash(script)}'" in page_text
    assert "default-src 'none'" in page_text


def test_in_chromium_the_page_loads_offline_and_a_header_click_sorts(page_file, tmp_path) -> None:
    """The quick browser check of every plain test run (the slow module checks the rest): no request
    but the file, no console error, every image decoded, and the per-class table sorted by a click."""
    from report_fixtures import OpenedPage, launched_chromium

    for browser in launched_chromium():
        opened = OpenedPage(browser, page_file)
        assert opened.outside_requests() == [] and opened.errors == [] and opened.dialogs == []
        assert opened.page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        values = 'table[data-table="per-class"] td[data-column="accuracy"]'
        opened.page.click('table[data-table="per-class"] th[data-column="accuracy"] button')
        shown = opened.page.eval_on_selector_all(values, "cells => cells.map(c => parseFloat(c.dataset.value))")
        assert shown == sorted(shown) and len(shown) == 3
        opened.page.screenshot(path=str(tmp_path / "digits-report.png"), full_page=True)
        print(f"\nscreenshot of the digits report: {tmp_path / 'digits-report.png'}")


def test_filter_snapshots_recorded_in_training_are_in_the_page(many_test_images, page_text) -> None:
    snapshots = sorted((many_test_images / "plots" / "filters").glob("epoch_*.png"))
    assert len(snapshots) == 2  # before training and after its one epoch
    assert all(f"snapshot {path.stem.replace('_', ' ')}" in page_text for path in snapshots)


def test_a_class_name_holding_markup_is_written_as_text(many_test_images, page_text) -> None:
    """The CSV label ``<script>alert(1)</script>&"quoted"'single'`` reaches the page escaped, in
    the per-class table and the data facts alike; no markup of it survives."""
    assert load_run(many_test_images).class_names[0] == HOSTILE
    assert "<script>alert(1)" not in page_text
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;&amp;&#34;quoted&#34;&#39;single&#39;"
    assert re.search(rf'data-column="class"><span class="text">{re.escape(escaped)}</span>', page_text)


def test_mark_best_marks_the_highest_figure_or_the_lowest_loss_and_every_tie() -> None:
    rows = [[Cell("a", 0.5), Cell("x", 0.9)], [Cell("b", 0.7), Cell("y", 0.2)], [Cell("c", 0.7), Cell("z", None)]]
    mark_best(rows, 0, lower_is_better=False)
    mark_best(rows, 1, lower_is_better=True)
    assert [row[0].best for row in rows] == [False, True, True]
    assert [row[1].best for row in rows] == [False, True, False]


def test_a_multilabel_mistake_is_the_most_probable_predicted_label_the_image_lacks() -> None:
    """Absent labels at 0.5 or more count, most confident first; a difficult (-1) label never counts."""
    probabilities = np.array([[0.9, 0.8, 0.1], [0.2, 0.4, 0.3], [0.95, 0.1, 0.6], [0.1, 0.99, 0.2]])
    targets = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0], [1, -1, 0]])
    mistakes = false_positives(probabilities, targets, ["a", "b", "c"], ["i0", "i1", "i2", "i3"])
    assert [(m.id, m.true, m.predicted, m.confidence) for m in mistakes] == [
        ("i2", "b", "a", pytest.approx(0.95)), ("i0", "a", "b", pytest.approx(0.8))]


# --- refused in one sentence, nothing written -----------------------------------------------------


def test_no_run_is_refused_in_one_sentence(tmp_path) -> None:
    with pytest.raises(TltkError, match="at least one run directory"):
        report([], tmp_path / "r.html")


def test_a_folder_as_out_is_refused_and_nothing_is_written(many_test_images, tmp_path) -> None:
    result = tltk("report", str(many_test_images), "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "is a folder; name the .html file to write" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_directory_that_is_not_a_run_is_refused(tmp_path) -> None:
    result = tltk("report", str(tmp_path), "--out", str(tmp_path / "r.html"))
    assert result.exit_code == 2 and "is not a tltk run" in result.stderr
    assert not (tmp_path / "r.html").exists()


def test_a_pdf_without_chromium_names_the_package_and_writes_nothing(many_test_images, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv(page.CHROMIUM_VARIABLE, raising=False)
    result = tltk("report", str(many_test_images), "--out", str(tmp_path / "r.html"), "--pdf", str(tmp_path / "r.pdf"))
    assert result.exit_code == 2
    assert "install the `chromium` package" in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "r.pdf").exists()


def test_a_chromium_that_fails_to_print_leaves_no_pdf(tmp_path, monkeypatch) -> None:
    """A browser that exits without writing: one sentence with its last line, no file, no temporary left."""
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\necho 'cannot open display' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv(page.CHROMIUM_VARIABLE, str(fake))
    html = tmp_path / "r.html"
    html.write_text("<html></html>")
    with pytest.raises(TltkError, match=r"could not print .* \(exit 3: cannot open display\); no PDF was written"):
        page.write_pdf(html, tmp_path / "out" / "r.pdf")
    assert list((tmp_path / "out").iterdir()) == []


# --- the optional sections --------------------------------------------------------------------------


def test_a_run_with_a_feature_store_gets_a_neighbour_grid_and_one_without_gets_none(many_test_images) -> None:
    """The section appears once `tltk extract` has written a store under RUN/features."""
    from tltk.reporting.contents import neighbours_part

    run = load_run(many_test_images)
    assert neighbours_part(run) is None
    store = many_test_images / "features" / "fc"
    done = tltk("extract", str(many_test_images), "--layer", "logits", "--split", "test", "--out", str(store),
                "--device", "cpu")
    assert done.exit_code == 0, done.output
    part = neighbours_part(run)
    assert part is not None and not part.note, part
    assert len(part.pictures) == 1 and part.pictures[0].uri.startswith("data:image/png;base64,")
    assert "nearest neighbours at" in part.pictures[0].caption


def test_explanations_show_an_overlay_per_image_and_the_reason_when_the_run_cannot_be_explained(
        many_test_images, monkeypatch) -> None:
    """The section holds Run.explain's overlays of the split's first image files (one picture each for a
    multi-class run); where explaining fails, the page says why instead of leaving a hole."""
    from tltk.reporting.contents import EXPLAINED_IMAGES, explanations_part

    run = load_run(many_test_images)
    dataset, _ = run.split("test")
    part = explanations_part(run, dataset)
    assert not part.note and len(part.pictures) == EXPLAINED_IMAGES
    first = Path(dataset.samples[0].source).name
    assert part.pictures[0].caption.startswith(f"{first}: gradcam at ")
    assert all(picture.uri.startswith("data:image/png;base64,") for picture in part.pictures)

    def cannot(images):
        raise TltkError("backbone 'lstm' reads images as sequences")

    monkeypatch.setattr(run, "explain", cannot)
    assert explanations_part(run, dataset).note == ("the model could not be explained: "
                                                    "backbone 'lstm' reads images as sequences")


# --- the browser tests' own rule ---------------------------------------------------------------------


def test_without_chromium_the_browser_tests_skip_on_a_laptop_and_fail_in_ci(tmp_path, monkeypatch) -> None:
    import report_fixtures

    monkeypatch.setattr(report_fixtures, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no Chromium at"):
        report_fixtures.skip_or_fail_without_browser()
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="CI is set and the report's browser tests cannot run"):
        report_fixtures.skip_or_fail_without_browser()


def test_a_full_disk_while_writing_the_report_keeps_the_previous_page(many_test_images, tmp_path, monkeypatch) -> None:
    """The disk refusing the finished page: the earlier report.html is there as it was, no partial
    file is left beside it, and the sentence names the page."""
    import errno
    import os

    from tltk.errors import DiskError

    out = tmp_path / "report.html"
    out.write_text("the earlier report")
    move = os.replace

    def full_at_the_page(source, target, *args, **kwargs):
        if Path(target) == out:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return move(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_at_the_page)
    with pytest.raises(DiskError, match=re.escape(str(out))):
        report(many_test_images, out)
    assert out.read_text() == "the earlier report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
