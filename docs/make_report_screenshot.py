"""Writes docs/report-screenshot.png: the top of a report page as Chromium shows it.

    python docs/make_report_screenshot.py runs/demo/report.html

(``make demo`` writes runs/demo/report.html.) It drives the system Chromium with Playwright,
as the report's browser tests do; ``--height`` sets how much of the page is shown.
"""

from __future__ import annotations

import argparse
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="A report page written by `tltk report`.")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("report-screenshot.png"))
    parser.add_argument("--height", type=int, default=1500, help="Pixels of the page's top to show.")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": args.height})
        page.goto(args.report.resolve().as_uri(), wait_until="load")
        page.screenshot(path=str(args.out))
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
