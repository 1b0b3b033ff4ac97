"""A command imports what it uses and nothing more.

Each heavy package costs from a few tenths of a second to seconds to import, which a small
run pays before it trains a single step; so timm is imported only for timm backbones,
scikit-learn only where a metric or data source needs it, matplotlib only to draw,
tensorboard only with --tensorboard and FAISS only for feature stores. The commands run
in a fresh interpreter that records, for every heavy package, which tltk code imported it
first (a finder at the front of ``sys.meta_path`` sees every import).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import write_image_folder

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("timm", "sklearn", "scipy", "pandas", "matplotlib", "tensorboard", "faiss", "datasets")

# Runs the tltk command line in this interpreter and writes {package: the tltk frames that
# imported it} for every package of HEAVY that got imported, to the file argv[1]. A package
# is looked for until it is imported (libraries also look without importing, to learn
# whether it is installed): the last look before it is in sys.modules is the import.
RECORDER = """
import atexit, json, sys, traceback
heavy, record, looked = set(sys.argv[2].split(",")), sys.argv[1], {}

class LastLook:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in heavy and top not in sys.modules:
            looked[top] = [f"{f.filename.split('/tltk/')[-1]}:{f.name}" for f in traceback.extract_stack() if "/tltk/" in f.filename]
        return None

def write():
    json.dump({name: frames for name, frames in looked.items() if name in sys.modules}, open(record, "w"))

sys.meta_path.insert(0, LastLook())
atexit.register(write)
from tltk.cli import main
main(sys.argv[3:], prog_name="tltk")
"""


def imported_by(command: list[str], tmp_path: Path) -> dict[str, list[str]]:
    """Run ``tltk COMMAND`` in a fresh interpreter: the heavy packages it imported, each with its importer's frames."""
    record = tmp_path / "imports.json"
    proc = subprocess.run([sys.executable, "-c", RECORDER, str(record), ",".join(HEAVY), *command],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(record.read_text())


def test_a_small_finetune_imports_no_heavy_package_it_does_not_use(tmp_path: Path) -> None:
    """simplecnn on an image folder needs neither timm, scikit-learn (with SciPy and pandas),
    tensorboard, FAISS nor Hugging Face datasets; matplotlib comes only to draw the curves."""
    folder = write_image_folder(tmp_path / "shapes", {"circle": 6, "square": 6, "star": 6})
    imports = imported_by(["finetune", "--backbone", "simplecnn", "--data", f"folder:{folder}", "--epochs", "1",
                           "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet",
                           "--out", str(tmp_path / "run")], tmp_path)
    assert (tmp_path / "run" / "summary.json").is_file()
    assert set(imports) == {"matplotlib"}, imports
    assert any(frame.endswith("curves.py:write_curves") for frame in imports["matplotlib"]), imports["matplotlib"]


def test_a_finetune_without_curves_imports_no_heavy_package_and_draws_nothing(tmp_path: Path) -> None:
    """--no-curves leaves the drawing (and matplotlib's import) out: the run is complete, its
    metrics.jsonl holds the curves' data, config.json records the choice, and no PNG is written."""
    folder = write_image_folder(tmp_path / "shapes", {"circle": 6, "square": 6, "star": 6})
    run = tmp_path / "run"
    imports = imported_by(["finetune", "--backbone", "simplecnn", "--data", f"folder:{folder}", "--epochs", "1",
                           "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet", "--no-curves",
                           "--out", str(run)], tmp_path)
    assert imports == {}, imports
    assert (run / "summary.json").is_file() and (run / "metrics.jsonl").stat().st_size > 0
    assert json.loads((run / "config.json").read_text())["finetune"]["curves"] is False
    assert not list(run.rglob("*.png"))


def test_listing_components_imports_no_heavy_package(tmp_path: Path) -> None:
    """``tltk list`` reads names from package metadata: no backbone library is imported to list backbones."""
    assert imported_by(["list", "backbones"], tmp_path) == {}


def test_builtin_digits_are_read_as_scikit_learn_loads_them() -> None:
    """builtin:digits reads scikit-learn's data file directly (importing scikit-learn costs
    seconds): the same pixels, scaled alike, and the same labels as ``load_digits``."""
    from sklearn.datasets import load_digits

    from tltk.data.builtin import _load_digits

    images, labels = _load_digits()
    digits = load_digits()
    expected = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., np.newaxis]
    assert images.dtype == np.uint8 and np.array_equal(images, expected)
    assert labels.dtype == np.int64 and np.array_equal(labels, digits.target)


def test_a_run_records_the_timm_version_without_importing_timm() -> None:
    """config.json's timm version is the installed one, read from its metadata while timm stays unimported."""
    from tltk.rundir import library_versions

    recorded = library_versions()["timm"]
    import timm

    assert recorded == timm.__version__
