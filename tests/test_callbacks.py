"""The training loop as an object with one callback list: what callbacks see, how they stop
training, how their state survives a resume, and callbacks as a plugin kind (--callback)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_resume import StopAt  # stands in for a crash after a given step

import tltk.registry
from tltk.cli import main
from tltk.registry import Registry
from tltk.train import checkpoint
from tltk.train.callbacks import Callback
from tltk.train.finetune import DataOptions, FinetuneConfig, finetune
from tltk.train.trainer import Loop, TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_config(epochs: int = 3, **finetune_options: Any) -> FinetuneConfig:
    data = DataOptions("builtin:digits", classes=["0", "1", "2"], train_per_class=8)  # 24 images: 3 steps an epoch
    train = TrainConfig(epochs=epochs, batch_size=8, workers=0, device="cpu", precision="fp32")
    return FinetuneConfig(backbone="lenet5", weights="none", data=data, train=train, **finetune_options)


class Recorder(Callback):
    """Counts steps (its state) and notes what the loop showed it."""

    def __init__(self) -> None:
        self.steps_seen = 0
        self.events: list[tuple[str, int]] = []
        self.loops: set[int] = set()

    def on_epoch_start(self, model, epoch) -> None:
        self.events.append(("epoch start", epoch))

    def on_step_end(self, model, row, images) -> None:
        self.steps_seen += 1
        self.loops.add(id(self.loop))
        assert self.loop is not None and self.loop.step == row["step"] and self.loop.model is model

    def state_dict(self) -> dict[str, Any]:
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_seen = int(state.get("steps_seen", 0))
        self.events.append(("restored", self.steps_seen))


class StopAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, model, row, images) -> None:
        if row["step"] == self.step:
            self.loop.stop(f"asked to stop at step {self.step}")


def test_callbacks_see_the_loop_and_every_epoch_start(tmp_path: Path) -> None:
    recorder = Recorder()
    result = finetune(small_config(), tmp_path / "run", callbacks=[recorder])
    assert recorder.steps_seen == result.summary["steps"] == 9
    assert len(recorder.loops) == 1 and isinstance(recorder.loop, Loop)
    assert recorder.events == [("epoch start", 0), ("epoch start", 1), ("epoch start", 2)]
    assert recorder.loop.optimizer.param_groups and len(recorder.loop.history) == 3


def test_a_callback_can_stop_training_after_the_step_it_asks_at(tmp_path: Path) -> None:
    messages: list[str] = []

    class Messages:
        def start(self, total_steps): ...
        def step(self, row): ...
        def epoch(self, row): ...
        def message(self, text): messages.append(text)
        def finish(self): ...

    result = finetune(small_config(), tmp_path / "run", reporter=Messages(), callbacks=[StopAtStep(4)])
    assert result.summary["steps"] == 4 and result.summary["epochs_run"] == 2
    assert "asked to stop at step 4" in messages
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "step"] == [1, 2, 3, 4]


def test_a_callbacks_state_is_saved_with_the_checkpoint_and_restored_on_resume(tmp_path: Path) -> None:
    whole = Recorder()
    finetune(small_config(), tmp_path / "whole", callbacks=[whole])
    crashed = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        finetune(small_config(), crashed, checkpoint_every=2, callbacks=[Recorder(), StopAt(5)])
    saved = checkpoint.read_training_state(crashed)
    assert saved.global_step == 4 and saved.extra["callbacks"]["Recorder"] == {"steps_seen": 4}
    resumed = Recorder()
    finetune(small_config(), crashed, resume=True, callbacks=[resumed])
    assert resumed.steps_seen == whole.steps_seen == 9
    # Step 4 was the first of epoch 2: that epoch had started, so it does not start again.
    assert resumed.events == [("restored", 4), ("epoch start", 2)]


@pytest.fixture
def recorder_plugin(monkeypatch) -> None:
    """A callback registered from code under a name, as an entry point would provide it, in
    a registry of this test's own (tltk's stays as the other tests expect it)."""
    registry = Registry("callback", "tltk.callbacks", ships_builtins=False)
    registry.add("test-recorder", lambda every=1: Recorder())
    monkeypatch.setattr(tltk.registry, "CALLBACKS", registry)
    monkeypatch.setitem(tltk.registry.REGISTRIES, "callback", registry)  # what build("callback", ...) reads


def test_named_callbacks_are_built_from_the_command_line_and_recorded_in_config(tmp_path: Path, recorder_plugin) -> None:
    out = tmp_path / "run"
    done = CliRunner().invoke(main, ["finetune", "--backbone", "lenet5", "--weights", "none", "--data", "builtin:digits",
                                     "--classes", "0,1", "--train-per-class", "4", "--epochs", "1", "--device", "cpu",
                                     "--workers", "0", "--callback", "test-recorder", "--callback-opt",
                                     "test-recorder.every=2", "--out", str(out), "--quiet"])
    assert done.exit_code == 0, done.output
    config = json.loads((out / "config.json").read_text())
    assert config["finetune"]["callbacks"] == [{"name": "test-recorder", "options": {"every": 2}}]


@pytest.mark.parametrize("arguments,sentence", [
    (["--callback", "test-recorder", "--callback-opt", "test-recorder.colour=red"],
     "callback 'test-recorder' has no option 'colour'; it takes every=1."),
    (["--callback-opt", "test-recorder.every=2"], "no --callback names; add --callback test-recorder"),
    (["--callback", "test-recorder", "--callback-opt", "every=2"], "is not NAME.KEY=VALUE"),
    (["--callback", "no-such-callback"], "no-such-callback"),
])
def test_a_bad_callback_or_option_is_one_sentence_and_writes_nothing(tmp_path: Path, recorder_plugin, arguments,
                                                                      sentence) -> None:
    out = tmp_path / "run"
    done = CliRunner().invoke(main, ["finetune", "--backbone", "lenet5", "--weights", "none", "--data", "builtin:digits",
                                     "--epochs", "1", "--out", str(out), *arguments])
    assert done.exit_code != 0 and sentence in done.output and "Traceback" not in done.output
    assert not out.exists()


def test_the_example_plugins_time_budget_stops_a_run_from_the_command_line(tmp_path: Path) -> None:
    # An entry point of the installed example plugin (tltk.callbacks).
    out = tmp_path / "run"
    done = CliRunner().invoke(main, ["finetune", "--backbone", "lenet5", "--weights", "none", "--data", "builtin:digits",
                                     "--classes", "0,1", "--train-per-class", "8", "--epochs", "3", "--batch-size", "4",
                                     "--device", "cpu", "--workers", "0", "--callback", "time-budget",
                                     "--callback-opt", "time-budget.seconds=0", "--out", str(out), "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
