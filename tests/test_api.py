"""The Python API in the command line's words: tltk.finetune(...) gives a Run that evaluates
and predicts itself and shows as a table in a notebook."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tltk
from tltk.errors import TltkError
from tltk.run import Run
from tltk.train.finetune import DataOptions, FinetuneConfig
from tltk.train.trainer import TrainConfig

FAST = dict(epochs=1, batch_size=8, device="cpu", workers=0, precision="fp32")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("api") / "lenet"
    return tltk.finetune("lenet5", data="builtin:digits", classes=["0", "1", "2"], train_per_class=8, weights="none",
                         freeze=True, head="mlp", head_options={"hidden": 16}, out=out, **FAST)


def test_flat_settings_go_to_the_dataclass_that_declares_them(run: Run) -> None:
    recorded = json.loads((run.path / "config.json").read_text())["finetune"]
    assert recorded["strategy"] == "freeze" and recorded["head"] == "mlp" and recorded["head_options"] == {"hidden": 16}
    assert recorded["data"]["classes"] == ["0", "1", "2"] and recorded["data"]["train_per_class"] == 8
    assert recorded["train"]["epochs"] == 1 and recorded["train"]["batch_size"] == 8
    assert run.frozen == ["backbone"] and run.model.backbone_frozen


def test_the_run_evaluates_and_predicts_itself_as_its_summary_says(run: Run) -> None:
    report = run.evaluate(device="cpu")
    assert report["n"] == run.summary["test"]["n"] and report["accuracy"] == pytest.approx(run.summary["test"]["accuracy"])
    predictions = run.predict(device="cpu")
    assert len(predictions) == report["n"] and predictions.class_names == ["0", "1", "2"]
    assert tltk.evaluate(run.path, device="cpu")["confusion_matrix"] == report["confusion_matrix"]


def test_a_run_shows_as_a_table_in_a_notebook_and_as_lines_in_a_terminal(run: Run) -> None:
    page = run._repr_html_()
    assert page.startswith("<table>") and "lenet5" in page and "test accuracy" in page
    assert f"run: {run.path}" in str(run) and "strategy: freeze" in str(run)


def test_values_in_the_notebook_table_are_escaped(tmp_path: Path, run: Run) -> None:
    odd = Run(tmp_path, run.model, run.config | {"data": {"spec": "folder:<b>&\"x\""}})
    assert "<b>" not in odd._repr_html_() and "&lt;b&gt;&amp;&quot;x&quot;" in odd._repr_html_()


def test_an_unknown_setting_is_one_sentence_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(TltkError, match="finetune takes no setting 'epoch'; the settings are .*epochs"):
        tltk.finetune("lenet5", data="builtin:digits", epoch=3, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_finetune_config_is_taken_as_it_is(tmp_path: Path) -> None:
    config = FinetuneConfig(backbone="lenet5", weights="none", data=DataOptions("builtin:digits", classes=["0", "1"],
                                                                                  train_per_class=4),
                            train=TrainConfig(**FAST))
    run = tltk.finetune(config, tmp_path / "run")
    assert isinstance(run, Run) and run.class_names == ["0", "1"] and run.summary["epochs_run"] == 1
    with pytest.raises(TltkError, match="takes a FinetuneConfig as it is"):
        tltk.finetune(config, tmp_path / "again", epochs=3)


def test_run_features_are_the_rows_tltk_extract_stores_for_the_same_layer_and_split(run: Run, tmp_path: Path) -> None:
    from tltk.features.extract import Loading, extract
    from tltk.features.source import load_source

    store = extract(load_source(str(run.path)), "pool5", tmp_path / "store", split="test",
                    loading=Loading(device="cpu", workers=0))
    vectors = run.features("pool5", device="cpu")
    assert vectors.shape == (store.count, store.dim) and vectors.dtype == np.float32
    assert np.array_equal(vectors, store.features())
    logits = run.features("logits", device="cpu")
    assert logits.shape == (store.count, 3)
    assert np.array_equal(logits.argmax(1), run.predict(device="cpu").predicted_index())


def test_run_features_refuse_a_layer_the_backbone_has_not_in_one_sentence(run: Run) -> None:
    with pytest.raises(TltkError, match="lenet5 has no layer 'fc9'"):
        run.features("fc9")
