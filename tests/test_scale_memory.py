"""What keeps memory flat at scale, pinned fast: predictions stream into their file, a sample
costs no per-image dictionary, and synthetic images are made, not stored.

The figures themselves (peak RSS at 10,000 and 200,000 images) come from
benchmarks/bench_memory_scale.py, not from a test.
"""

from __future__ import annotations

import gc
import sys
import weakref
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from tltk.data import load_data
from tltk.data.samples import Sample
from tltk.data.synthetic import SyntheticImages, read_synthetic
from tltk.errors import DataError
from tltk.export import PredictionStream, export
from tltk.predict import Predictions
from tltk.registry import DATA_FORMATS
from tltk.run import load_run
from tltk.train.finetune import DataOptions, FinetuneConfig, finetune
from tltk.train.trainer import TrainConfig

CLASSES = ["a", "b", "c"]


def watched_batches(count: int, size: int, alive: list[weakref.ref] | None = None) -> Iterator[Predictions]:
    """``count`` batches of predictions; given ``alive``, before making batch k it checks that
    batch k - 2 is gone (the exporter may still hold the one it is writing, k - 1, but no
    earlier one)."""
    for k in range(count):
        gc.collect()
        if alive is not None and k >= 2:
            assert alive[k - 2]() is None, f"batch {k - 2} is still in memory while batch {k} is made"
        probabilities = np.random.default_rng(k).dirichlet(np.ones(len(CLASSES)), size=size).astype(np.float32)
        if alive is not None:
            alive.append(weakref.ref(probabilities))
        ids = [f"img/{k}_{i}.png" for i in range(size)]
        yield Predictions(ids, ids, probabilities, CLASSES, "multiclass")


@pytest.mark.parametrize("format,options", [("kaggle", {}), ("kaggle", {"label_as": "index"}), ("csv", {}),
                                            ("jsonl", {})])
def test_exporters_write_a_stream_batch_by_batch_and_the_same_file_as_from_whole_predictions(
        tmp_path: Path, format: str, options: dict) -> None:
    """tltk's exporters let each batch go once written: memory holds one batch of a
    prediction file of any length, and the file is byte for byte the one written from the
    joined predictions."""
    alive: list[weakref.ref] = []
    stream = PredictionStream(watched_batches(6, 5, alive), CLASSES, "multiclass")
    export(stream, tmp_path / "streamed", format, **options)
    assert stream.rows == 30 and len(alive) == 6
    whole = PredictionStream(watched_batches(6, 5), CLASSES, "multiclass").joined()
    export(whole, tmp_path / "whole", format, **options)
    assert (tmp_path / "streamed").read_bytes() == (tmp_path / "whole").read_bytes()


def test_a_stream_with_a_repeated_id_is_refused_and_leaves_no_file(tmp_path: Path) -> None:
    batches = [Predictions([f"x/{name}.png"], [""], np.ones((1, 3), np.float32) / 3, CLASSES, "multiclass")
               for name in ("one", "two", "one")]
    with pytest.raises(Exception, match="1 id\\(s\\) occur more than once with --id-from stem \\(first: one\\)"):
        export(PredictionStream(batches, CLASSES, "multiclass"), tmp_path / "sub.csv", "kaggle")
    assert list(tmp_path.iterdir()) == []


def test_a_plugin_exporter_gets_the_joined_predictions(tmp_path: Path, monkeypatch) -> None:
    """An exporter not marked ``writes_batches`` keeps its contract: one ``Predictions``."""
    from tltk.registry import EXPORTERS

    seen: list[object] = []

    def plain(predictions, out):  # noqa: ANN001 - the exporter contract
        seen.append(predictions)
        Path(out).write_text(str(len(predictions)))

    monkeypatch.setattr(EXPORTERS, "_entries", list(EXPORTERS._entries))  # the name goes with the test
    EXPORTERS.add("count-rows-for-test", plain)
    export(PredictionStream(watched_batches(3, 4), CLASSES, "multiclass"), tmp_path / "n", "count-rows-for-test")
    assert isinstance(seen[0], Predictions) and (tmp_path / "n").read_text() == "12"


def test_export_predictions_of_a_run_writes_what_predict_and_export_write(tmp_path: Path) -> None:
    """``Run.export_predictions`` (what ``tltk predict`` calls) streams, and its file is the
    one a whole ``Run.predict`` exported gives."""
    data = DataOptions("builtin:digits", classes=["3", "5", "8"], train_per_class=6)
    config = FinetuneConfig(backbone="lenet5", weights="none", data=data,
                            train=TrainConfig(epochs=1, batch_size=8, workers=0, device="cpu"))
    run = load_run(finetune(config, tmp_path / "run").out)
    written = run.export_predictions(tmp_path / "streamed.csv", "kaggle", device="cpu", batch_size=7,
                                     exporter_options={"id_from": "path"})
    export(run.predict(device="cpu", batch_size=7), tmp_path / "whole.csv", "kaggle", id_from="path")
    assert written.rows == len(run.split("test")[0]) and written.task == "multiclass"
    assert (tmp_path / "streamed.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()


def test_a_sample_carries_no_per_image_dictionary() -> None:
    """A dataset of 200,000 images holds 200,000 samples; a ``__dict__`` on each would cost
    about 20 MB more."""
    sample = Sample(3, 1, "all/3")
    assert not hasattr(sample, "__dict__")
    assert sys.getsizeof(sample) <= 72


def test_synthetic_images_are_made_again_identically_from_their_row_number(monkeypatch) -> None:
    images = SyntheticImages(50)
    first, again = images[7], SyntheticImages(50)[7]
    assert first.shape == (8, 8, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again) and not np.array_equal(first, images[8])
    with pytest.raises(IndexError):
        images[50]
    monkeypatch.setattr(DATA_FORMATS, "_entries", list(DATA_FORMATS._entries))
    DATA_FORMATS.add("synthetic", read_synthetic)
    splits = load_data("synthetic:200", val_split=0.0)
    assert len(splits.train) + len(splits.test) == 200 and splits.num_classes == 10
    assert all(s.target == int(s.id.split("/")[1]) % 10 for s in splits.train)
    with pytest.raises(DataError, match="synthetic:many names no image count"):
        load_data("synthetic:many")


def test_a_stream_matched_to_a_sample_submission_is_joined_and_written_in_its_order(tmp_path: Path) -> None:
    """The sample's row order needs every row, so the stream is joined first; the file is the
    one the whole predictions give."""
    ids = [f"{k}_{i}" for k in range(3) for i in range(4)]
    sample = tmp_path / "sample.csv"
    sample.write_text("image,label\n" + "".join(f"{i},x\n" for i in reversed(ids)))
    export(PredictionStream(watched_batches(3, 4), CLASSES, "multiclass"), tmp_path / "streamed.csv", "kaggle",
           sample_submission=str(sample))
    whole = PredictionStream(watched_batches(3, 4), CLASSES, "multiclass").joined()
    export(whole, tmp_path / "whole.csv", "kaggle", sample_submission=str(sample))
    lines = (tmp_path / "streamed.csv").read_text().splitlines()
    assert lines[0] == "image,label" and [line.split(",")[0] for line in lines[1:]] == list(reversed(ids))
    assert (tmp_path / "streamed.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()
