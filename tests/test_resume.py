"""Interrupted `tltk finetune` runs: killed, signalled or stopped runs resume to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from tltk.cli import main
from tltk.errors import RunDirError
from tltk.train import checkpoint
from tltk.train.callbacks import Callback
from tltk.train.finetune import DataOptions, FinetuneConfig, config_of_run, finetune
from tltk.train.trainer import TrainConfig

REPO = Path(__file__).resolve().parents[1]
# 10 images per class, 7 steps an epoch: long enough to be interrupted mid-epoch, short to run.
COMMAND = ["finetune", "--backbone", "lenet5", "--weights", "none", "--data", "builtin:digits",
           "--train-per-class", "10", "--batch-size", "16", "--epochs", "6", "--device", "cpu", "--workers", "0",
           "--checkpoint-every", "2", "--quiet", "--json"]
ENV = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tltk(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tltk.cli", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=120)


def start(out: Path, precision: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tltk.cli", *COMMAND, "--precision", precision, "--out", str(out)],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(run: Path, process: subprocess.Popen, mid_epoch: bool) -> checkpoint.TrainingState:
    """Poll until the run has saved a checkpoint (one inside an epoch when ``mid_epoch``)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        if checkpoint.has_checkpoint(run):
            state = checkpoint.read_training_state(run)
            if state.batches_done > 0 or not mid_epoch:
                return state
        time.sleep(0.005)
    raise AssertionError("no checkpoint appeared within 60 s")


def metrics_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def assert_same_run(run: Path, reference: Path) -> None:
    weights, expected = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert metrics_rows(run) == metrics_rows(reference)
    summary, expected_summary = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    for key in ("epochs_run", "steps", "best_epoch", "best_val_accuracy", "test"):
        assert summary[key] == expected_summary[key], key
    assert {k: v for k, v in summary["final"].items() if k != "seconds"} == \
        {k: v for k, v in expected_summary["final"].items() if k != "seconds"}
    assert not checkpoint.has_checkpoint(run), "a finished run keeps no checkpoint"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_precision: str) -> Path:
    out = tmp_path_factory.mktemp("resume") / "uninterrupted"
    # In this process: one start-up less.
    done = CliRunner().invoke(main, [*COMMAND, "--precision", train_precision, "--out", str(out)])
    assert done.exit_code == 0, done.output
    return out


@pytest.mark.precision
def test_run_killed_mid_epoch_and_resumed_ends_bit_identical_to_uninterrupted(reference: Path, tmp_path: Path,
                                                                              train_precision: str) -> None:
    # Bit-identical in every precision: the resumed run repeats the same operations on the same values.
    run = tmp_path / "killed"
    process = start(run, train_precision)
    state = wait_for_checkpoint(run, process, mid_epoch=True)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert not (run / "model.safetensors").exists() and state.batches_done > 0
    resumed = tltk("finetune", "--resume", str(run), "--quiet", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run, reference)


def test_sigterm_saves_a_checkpoint_and_exits_with_how_to_resume(reference: Path, tmp_path: Path,
                                                                 train_precision: str) -> None:
    run = tmp_path / "terminated"
    process = start(run, train_precision)
    wait_for_checkpoint(run, process, mid_epoch=False)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert f"resume with `tltk finetune --resume {run}`" in stderr and "Traceback" not in stderr
    assert not (run / "model.safetensors").exists()
    finetune(config_of_run(run), run, resume=True, checkpoint_every=2)  # the checkpoint loads and the run completes
    assert_same_run(run, reference)


def test_resume_without_a_checkpoint_or_of_a_finished_run_is_one_clear_error(reference: Path, tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="holds no checkpoint"):
        config_of_run(tmp_path)
    with pytest.raises(RunDirError, match="no such run directory"):
        config_of_run(tmp_path / "missing")
    result = CliRunner().invoke(main, ["finetune", "--resume", str(reference)])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "it finished" in result.output
    result = CliRunner().invoke(main, ["finetune", "--resume", str(reference), "--lr", "0.1"])
    assert result.exit_code == 2 and "drop --lr" in result.output


class StopAt(Callback):
    """Stands in for a crash: raises after a given step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, model, row, images) -> None:
        if row["step"] == self.step:
            raise KeyboardInterrupt


def small_config(lr: float = 3e-3, precision: str = "auto") -> FinetuneConfig:
    data = DataOptions("builtin:digits", classes=["0", "1", "2"], train_per_class=12)
    train = TrainConfig(epochs=2, batch_size=8, lr=lr, workers=0, device="cpu", precision=precision)
    return FinetuneConfig(backbone="lenet5", data=data, weights="none", train=train)


def test_resuming_with_different_settings_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        finetune(small_config(), run, checkpoint_every=2, callbacks=[StopAt(3)])
    manifest = (checkpoint.checkpoint_dir(run) / checkpoint.MANIFEST).read_bytes()
    assert checkpoint.read_training_state(run).global_step == 2
    with pytest.raises(RunDirError, match="lr"):
        finetune(small_config(lr=1e-2), run, resume=True)
    assert (checkpoint.checkpoint_dir(run) / checkpoint.MANIFEST).read_bytes() == manifest
    finished = finetune(small_config(), run, resume=True)
    assert finished.summary["steps"] == 10 and not checkpoint.has_checkpoint(run)


def augmented_config(workers: int) -> FinetuneConfig:
    config = small_config()
    config.train.workers, config.train.augment = workers, "light"
    return config


@pytest.mark.slow  # worker processes start torch again: about 30 s
def test_augmented_runs_with_worker_processes_resume_bit_identical_and_match_in_process_loading(tmp_path: Path) -> None:
    """Each sample's augmentation is seeded from (seed, epoch, index): neither the worker
    that loads it nor an interruption changes the images a run trains on."""
    in_process = finetune(augmented_config(workers=0), tmp_path / "in-process")
    with_workers = finetune(augmented_config(workers=2), tmp_path / "workers")
    crashed = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        finetune(augmented_config(workers=2), crashed, checkpoint_every=2, callbacks=[StopAt(7)])
    resumed = finetune(augmented_config(workers=2), crashed, resume=True)
    expected = load_file(in_process.out / "model.safetensors")
    for run in (with_workers, resumed):
        weights = load_file(run.out / "model.safetensors")
        assert all(torch.equal(weights[name], expected[name]) for name in expected), run.out
        assert run.summary["final"]["train_loss"] == in_process.summary["final"]["train_loss"]


@pytest.mark.parametrize("interval,saves", [(0.0, 1), (3600.0, 0)])
def test_epoch_ends_save_once_the_interval_has_passed_and_the_last_epoch_never(monkeypatch, tmp_path: Path,
                                                                              interval: float, saves: int) -> None:
    """Two epochs: with interval 0 the first epoch's end saves; the second (last) never does,
    since the finished run removes its checkpoint a moment later."""
    saved_epochs: list[int] = []
    real_save = checkpoint.save_checkpoint

    def counting_save(run_dir, model, optimizer, scheduler, scaler, state, **kwargs):
        saved_epochs.append(state.epoch)
        return real_save(run_dir, model, optimizer, scheduler, scaler, state, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", counting_save)
    result = finetune(small_config(), tmp_path / "run", checkpoint_interval=interval)
    assert result.summary["epochs_run"] == 2
    assert saved_epochs == [1] * saves


def test_a_negative_checkpoint_interval_is_one_clear_error(tmp_path: Path) -> None:
    done = CliRunner().invoke(main, ["finetune", "--backbone", "lenet5", "--weights", "none", "--data",
                                     "builtin:digits", "--checkpoint-interval", "-1", "--out", str(tmp_path / "run")])
    assert done.exit_code == 2 and "--checkpoint-interval must be 0 or more" in done.output
    assert not (tmp_path / "run").exists()


class CrashAfterEpoch(Callback):
    """Stands in for a crash at an epoch's end, before its checkpoint; it reads no batch
    images, so a frozen backbone's features can still be cached."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, model, row) -> None:
        if row["epoch"] == self.epoch:
            raise KeyboardInterrupt


def varied_config(strategy: str, precision: str, **train: object) -> FinetuneConfig:
    config = small_config(precision=precision)
    config.strategy = strategy
    config.train.epochs = 4
    for name, value in train.items():
        setattr(config.train, name, value)
    return config


@pytest.mark.precision
@pytest.mark.parametrize("strategy,train,feature_cache", [
    ("freeze", {}, "memory"),                         # the head trains on cached backbone features
    ("freeze-unfreeze", {}, None),                    # the backbone joins in at epoch 2: replayed on resume
    # Early stopping: best at epoch 1 (before the crash), stops after epoch 3; the resumed run
    # must carry the best epoch, its weights and the count of epochs without improvement.
    ("finetune", {"patience": 2, "lr": 1.0, "optimizer": "sgd", "epochs": 6}, None),
])
def test_cached_unfrozen_and_early_stopped_runs_resume_to_the_uninterrupted_result(
        tmp_path: Path, strategy: str, train: dict, feature_cache: str | None, train_precision: str) -> None:
    whole = finetune(varied_config(strategy, train_precision, **train), tmp_path / "whole")
    if "patience" in train:
        assert whole.summary["stopped_early"] and whole.summary["best_epoch"] == 1 and whole.summary["epochs_run"] == 3
    crashed = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        finetune(varied_config(strategy, train_precision, **train), crashed, checkpoint_interval=0,
                 callbacks=[CrashAfterEpoch(2)])
    assert checkpoint.read_training_state(crashed).epoch == 1, "the last save was at the end of epoch 1"
    resumed = finetune(varied_config(strategy, train_precision, **train), crashed, resume=True)
    assert resumed.summary["feature_cache"] == whole.summary["feature_cache"] == feature_cache
    assert_same_run(crashed, whole.out)


def test_a_signal_is_acted_on_only_where_the_ranks_agree_on_it() -> None:
    """A signal landing between two agreement points must not make this rank save or stop
    alone: in a data-parallel job the other ranks would wait in the next collective for ever."""
    from tltk.train.resume import BoundCheckpointing, Checkpointing, Interrupted, SavePolicy

    plan = Checkpointing(Path("unused"), {}, SavePolicy(every_steps=None, interval_seconds=0))
    saver = BoundCheckpointing(plan, None, None, None, None, None, None, None)
    plan.signal_received = signal.SIGTERM  # the handler ran; no agreement point since
    assert not saver.due(3) and not saver.due_at_epoch_end(last_epoch=True)
    saver.stop_if_asked(0, 3)  # does not raise yet
    plan.stop_if_signalled(True)
    assert saver.due(3) and saver.due_at_epoch_end(last_epoch=True)
    with pytest.raises(Interrupted) as stopped:
        saver.stop_if_asked(0, 3)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
