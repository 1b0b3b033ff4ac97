"""The write-up of one or several finished runs: one self-contained HTML page, and its PDF.

A report gathers what a person would otherwise paste together by hand (what was trained,
the curves, the test figures, the per-class table, the confusion matrix, the mistakes, the
filters, the neighbours, and an ablation table across runs) into one file that opens
offline: images are data URIs, styles and the one small script are inline, and nothing is
fetched. It is a consumer of finished runs like ``tltk.viz``: it takes ``Run`` objects,
evaluates them with ``Run.evaluate`` and draws them with ``tltk.viz``'s figures.
"""

from tltk.reporting.page import ReportResult, report, write_pdf

__all__ = ["ReportResult", "report", "write_pdf"]
