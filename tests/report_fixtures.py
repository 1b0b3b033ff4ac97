"""Small real-format datasets and runs for the report tests, and Chromium driven by Playwright.

The browser tests run in CI without exception: where Chromium or Playwright is missing they
skip with the reason on a developer's machine, and fail when the environment variable CI is
set (.ci/run sets it after installing Debian's chromium).
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from voc_fixtures import write_voc

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

# Folder names can hold these (not "/"): each must come back as text in the page.
HOSTILE_FOLDER = "a<b & \"c\" 'd'"
# A label with "/" cannot be a folder; a VOC annotation (XML-escaped) carries it.
HOSTILE_LABEL = "<script>alert(1)</script>"
FOLDER_CLASSES = {"red": (220, 40, 40), "green": (40, 200, 60), HOSTILE_FOLDER: (40, 60, 220)}


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if not CHROMIUM.is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


def skip_or_fail_without_browser() -> None:
    """Skip with the reason on a developer's machine; fail in CI, where these tests must run."""
    missing = browser_missing()
    if missing is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and the report's browser tests cannot run: {missing}")
    pytest.skip(missing)


def launched_chromium() -> Iterator[Any]:
    """A headless system Chromium for one test module (Playwright's own browser download is not used)."""
    skip_or_fail_without_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class OpenedPage:
    """A report opened from disk, with every request, console error and dialog it caused."""

    def __init__(self, browser: Any, path: Path) -> None:
        self.url = path.resolve().as_uri()
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page = browser.new_page(viewport={"width": 1200, "height": 900})
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("console", lambda message: self.errors.append(message.text) if message.type == "error" else None)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("dialog", self._dialog)
        self.page.goto(self.url, wait_until="load")

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def outside_requests(self) -> list[str]:
        """Every request but the page itself (data: URIs are part of the page)."""
        return [url for url in self.requests if url != self.url and not url.startswith("data:")]


def write_colour_folders(root: Path, per_class: int = 20, size: int = 32) -> Path:
    """Class folders of noisy solid-colour PNGs (one colour per class), hostile class name included."""
    rng = np.random.default_rng(0)
    for name, colour in FOLDER_CLASSES.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            noise = rng.normal(0, 110, size=(size, size, 3))  # noisy enough that the runs differ
            pixels = np.clip(np.asarray(colour, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return root


def hostile_voc_objects(index: int) -> list[tuple[str, bool]]:
    """Image i shows one of three classes, the hostile label among them (escaped, as XML must write it)."""
    names = ("car", "person", html.escape(HOSTILE_LABEL))
    return [(names[index % 3], False)] + ([(names[(index + 1) % 3], False)] if index % 4 == 0 else [])


def write_hostile_voc(root: Path) -> Path:
    return write_voc(root, images=36, objects=hostile_voc_objects)
