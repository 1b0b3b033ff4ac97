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
