"""Nothing trusted blindly: files that could run code or lie about their contents are refused.

Each test writes the hostile or damaged file itself, in the real on-disk format, and checks
that tltk answers with its own one-sentence error and never runs what the file names.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from tests.data_fixtures import CIFAR_KNOWN_PIXEL, write_cifar10
from tltk.data import load_data
from tltk.errors import DataError


class _RunsCode:
    """Pickles to a call of ``Path.touch`` on a marker file: proof if loading runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_cifar10_batch_that_names_a_callable_is_refused_and_never_run(tmp_path):
    folder = write_cifar10(tmp_path / "data")
    marker = tmp_path / "ran"
    hostile = {b"data": np.zeros((6, 3072), np.uint8), b"labels": [0, 1, 2, 0, 1, 2], b"x": _RunsCode(marker)}
    (folder / "data_batch_1").write_bytes(pickle.dumps(hostile))
    with pytest.raises(DataError, match="data_batch_1.*refused to load pathlib"):
        load_data(f"cifar10:{folder}")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_batches_in_old_and_new_pickle_protocols_still_load(tmp_path, protocol):
    folder = write_cifar10(tmp_path / "data")
    for path in folder.iterdir():
        path.write_bytes(pickle.dumps(pickle.loads(path.read_bytes()), protocol=protocol))
    data = load_data(f"cifar10:{folder}", val_split=0.0)
    (row, col), rgb = CIFAR_KNOWN_PIXEL
    first = next(s for s in data.train if s.id == "train/0")
    assert data.arrays.shape == (18, 32, 32, 3)
    assert tuple(data.arrays[first.source][row, col]) == rgb


# --- image folders as people actually have them ------------------------------------------


def _two_class_folder(root: Path, per_class: int = 3) -> Path:
    from tests.data_fixtures import write_image_folder

    return write_image_folder(root, {"cat": per_class, "dog": per_class})


def test_symlink_loops_in_an_image_folder_are_skipped_without_hanging(tmp_path):
    root = _two_class_folder(tmp_path / "data")
    (root / "cat" / "loop").symlink_to(root / "cat")  # a folder that contains itself
    (root / "dog" / "a.png").symlink_to(root / "dog" / "b.png")
    (root / "dog" / "b.png").symlink_to(root / "dog" / "a.png")  # a file link cycle
    data = load_data(f"folder:{root}", val_split=0.0, test_split=0.0)
    assert len(data.train) == 6
    assert sorted(Path(p).name for p in data.skipped) == ["a.png", "b.png"]


def test_file_names_that_are_not_utf8_load_and_are_reported_printably(tmp_path):
    import json
    import os

    root = _two_class_folder(tmp_path / "data")
    raw = os.fsencode(root / "cat") + b"/caf\xe9.png"  # Latin-1 bytes, invalid UTF-8
    os.rename(os.fsencode(root / "cat" / os.listdir(root / "cat")[0]), raw)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / "empty.png").write_bytes(b"")
    data = load_data(f"folder:{root}", val_split=0.0, test_split=0.0)
    assert len(data.train) == 6  # the zero-byte file is skipped, the text file is not an image
    assert [Path(p).name for p in data.skipped] == ["empty.png"]
    assert any(os.fsencode(s.source).endswith(b"caf\xe9.png") for s in data.train)
    json.dumps([s.source for s in data.train], ensure_ascii=True)  # the run's records can be written


def test_predictions_for_file_names_that_are_not_utf8_export_with_the_original_bytes(tmp_path):
    import os

    from click.testing import CliRunner

    from tltk.cli import main

    root = _two_class_folder(tmp_path / "data", per_class=4)
    os.rename(os.fsencode(root / "cat" / "cat_0.png"), os.fsencode(root / "cat") + b"/caf\xe9.png")
    run, out = tmp_path / "run", tmp_path / "predictions.csv"
    runner = CliRunner()
    trained = runner.invoke(main, ["finetune", "--backbone", "lenet5", "--data", f"folder:{root}", "--epochs", "1",
                                   "--out", str(run), "--quiet", "--val-split", "0.25", "--test-split", "0.25"])
    assert trained.exit_code == 0, trained.output
    predicted = runner.invoke(main, ["predict", str(run), "--data", str(root), "--out", str(out), "--format", "csv"])
    assert predicted.exit_code == 0, predicted.output
    assert b"caf\xe9.png" in out.read_bytes()


def test_atomically_written_files_get_the_usual_permissions_not_private_ones(tmp_path):
    from tltk import fileio

    fileio.write_text(tmp_path / "summary.json", "{}")
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o666 & ~fileio._UMASK
