"""`tltk finetune` under torchrun: real 2-process gloo jobs on the CPU against one process.

A job of N processes with --batch-size B trains on exactly the samples one process sees
with --batch-size N x B (tltk.distributed.EpochOrder), and DistributedDataParallel averages
the ranks' gradients, so both take the same optimizer steps. What can differ is float
rounding: the gradient of a mean over 2B samples against the average of two means over B,
summed in another order. How much that is depends on the precision the runs trained in,
so each comparison takes its tolerance from the precision both runs recorded
(tests/tolerances.py states and explains the figures). Checked by breaking the code in fp32:
without the gradient average, or with both ranks on the same shard, the logged losses
differ by 5e-3 to 2e-2 and the first test fails. The multi-label run uses SGD.

The comparisons train in the precision of pytest's --precision (tests/conftest.py), so
`make test` runs them in fp32 and in bf16 on every CPU.

The models have no dropout and no BatchNorm, whose per-rank randomness and statistics are
not meant to match one process.
"""

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
from safetensors.torch import load_file

from tltk.model import ModelSpec, build_model
from tltk.train import checkpoint
from tltk.run import evaluate
from tltk.rundir import read_metrics
from tltk.train.trainer import seed_everything
from tolerances import tolerance_for
from voc_fixtures import write_voc

pytestmark = pytest.mark.slow  # torchrun jobs of two processes: about two minutes together on two cores

REPO = Path(__file__).resolve().parents[1]
ENV = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PROCESSES = 2


def tltk_finetune(args: list[str], out: Path, *, processes: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "tltk.cli"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                    "-m", "tltk.cli"]
    return subprocess.run([*launcher, "finetune", *args, "--out", str(out), "--device", "cpu", "--workers", "0",
                           "--quiet", "--json"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)


def run_both(args: list[str], per_process_batch: int, tmp_path: Path) -> tuple[Path, Path, dict, dict]:
    """The same run as one torchrun job of two processes and as one process with twice the batch."""
    job = tltk_finetune([*args, "--batch-size", str(per_process_batch)], tmp_path / "job", processes=PROCESSES)
    assert job.returncode == 0, job.stderr[-3000:]
    single = tltk_finetune([*args, "--batch-size", str(per_process_batch * PROCESSES)], tmp_path / "single")
    assert single.returncode == 0, single.stderr[-3000:]
    return tmp_path / "job", tmp_path / "single", json.loads(job.stdout), json.loads(single.stdout)


TRAINING_FIGURES = ("loss", "train_loss", "train_accuracy", "val_loss", "val_accuracy")


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def assert_same_training(job: Path, single: Path, keys: tuple[str, ...] = TRAINING_FIGURES) -> None:
    tolerance = tolerance_for(job, single)
    job_rows, single_rows = read_metrics(job), read_metrics(single)
    assert [(r["kind"], r["step"]) for r in job_rows] == [(r["kind"], r["step"]) for r in single_rows]
    for job_row, single_row in zip(job_rows, single_rows):
        for key in keys:
            if key in single_row:
                expected = (pytest.approx(single_row[key], abs=tolerance.accuracy) if "accuracy" in key
                            else pytest.approx(single_row[key], rel=tolerance.loss, abs=1e-6))
                assert job_row[key] == expected, (key, job_row)
    job_weights, single_weights = load_file(job / "model.safetensors"), load_file(single / "model.safetensors")
    assert job_weights.keys() == single_weights.keys()
    for name, tensor in single_weights.items():
        assert relative_difference(job_weights[name], tensor) < tolerance.weights, name


DIGITS = ["--data", "builtin:digits", "--train-per-class", "16", "--weights", "none", "--epochs", "2", "--lr", "3e-3"]


@pytest.mark.precision
def test_two_process_torchrun_job_trains_like_one_process_with_the_same_global_batch(
        tmp_path: Path, train_precision: str) -> None:
    # Augmented: each image's augmentation is seeded by (seed, epoch, index), not by the rank loading it.
    args = ["--backbone", "lenet5", *DIGITS, "--augment", "light", "--precision", train_precision]
    job, single, job_summary, single_summary = run_both(args, 8, tmp_path)
    # One metrics row per global step (rank 0 alone writes) and one summary on stdout (json.loads
    # in run_both fails on two).
    assert_same_training(job, single)
    assert json.loads((job / "config.json").read_text())["train"]["batch_size"] == 8  # per process
    # 160 training images, global batch 16: ten steps an epoch on both sides.
    assert job_summary["steps"] == single_summary["steps"] == 20
    assert job_summary["test"]["n"] == single_summary["test"]["n"] == 359  # each test image counted once
    test_tolerance = max(tolerance_for(job, single).accuracy, 1 / 359)  # one flip: the weights are not identical
    assert job_summary["test"]["accuracy"] == pytest.approx(single_summary["test"]["accuracy"], abs=test_tolerance)
    # `tltk evaluate` under torchrun: each rank scores its shard, the report is the whole split's.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}"]
    evaluated = subprocess.run([*launcher, "-m", "tltk.cli", "evaluate", str(job), "--device", "cpu", "--json"],
                               cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    sharded, alone = json.loads(evaluated.stdout), evaluate(job, split="test", device="cpu")
    assert sharded["n"] == alone["n"] == 359
    assert sharded["confusion_matrix"] == alone["confusion_matrix"]
    assert sharded["accuracy"] == alone["accuracy"] == job_summary["test"]["accuracy"]
    # Training moved every weight tensor several times further than the two runs differ, so their
    # agreement says more than that neither left its start (tolerances.Tolerance.moved: bf16 rounding,
    # which Adam spreads into the weights, leaves less room than fp32).
    config = json.loads((single / "config.json").read_text())
    seed_everything(config["train"]["seed"])  # as finetune does before building the model
    initial = build_model(ModelSpec(**config["model"])).state_dict()
    trained, job_trained = load_file(single / "model.safetensors"), load_file(job / "model.safetensors")
    for name, tensor in trained.items():
        moved = tolerance_for(job, single).moved
        assert relative_difference(initial[name], tensor) > moved * relative_difference(job_trained[name], tensor), name


@pytest.mark.precision
def test_frozen_backbone_features_are_cached_per_rank_shard_and_train_the_same_head(
        tmp_path: Path, train_precision: str) -> None:
    # In bf16 the cached features are bf16, which the ranks must gather although gloo cannot carry it.
    args = ["--backbone", "lenet5", "--strategy", "freeze", "--cache-mem", "0", *DIGITS, "--precision", train_precision]
    job, single, job_summary, single_summary = run_both(args, 8, tmp_path)
    assert job_summary["feature_cache"] == single_summary["feature_cache"] == "disk"
    assert_same_training(job, single)
    assert not list(job.glob(".feature-cache-*")), "the memory-mapped cache is removed at the end"


@pytest.mark.precision
def test_freeze_unfreeze_job_shares_the_backbone_gradients_once_the_backbone_joins_in(
        tmp_path: Path, train_precision: str) -> None:
    # Epoch 1 trains the head alone; from epoch 2 the backbone trains too, and the ranks'
    # backbone gradients must be averaged from then on (the wrapper is rebuilt).
    args = ["--backbone", "lenet5", "--strategy", "freeze-unfreeze", *DIGITS, "--precision", train_precision]
    job, single, _, _ = run_both(args, 8, tmp_path)
    assert_same_training(job, single)


@pytest.mark.precision
def test_multilabel_job_gathers_every_rank_scores_for_val_and_test_map(tmp_path: Path, train_precision: str) -> None:
    voc = write_voc(tmp_path / "voc", images=48)  # 24 train, 12 val, 12 test
    args = ["--backbone", "simplecnn", "--input-size", "32", "--data", f"voc:{voc}", "--weights", "none",
            "--epochs", "1", "--optimizer", "sgd", "--lr", "0.05", "--precision", train_precision]
    job, single, job_summary, single_summary = run_both(args, 4, tmp_path)
    assert job_summary["task"] == single_summary["task"] == "multilabel"
    # AP ranks scores; an untrained model's scores are near ties that float rounding reorders,
    # so the two runs' mAP are not compared. The job's own figures are: computed by one process
    # from the job's saved model, they must be what the ranks reported from their gathered shards.
    assert_same_training(job, single, keys=("loss", "train_loss", "val_loss"))
    val_map = next(r["val_map"] for r in read_metrics(job) if r["kind"] == "epoch")
    assert val_map == pytest.approx(evaluate(job, split="val", device="cpu")["map"], abs=1e-6)
    assert job_summary["test"]["map"] == pytest.approx(evaluate(job, split="test", device="cpu")["map"], abs=1e-6)


def test_signalled_job_saves_once_and_resumes_with_as_many_processes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    args = ["--backbone", "lenet5", "--data", "builtin:digits", "--train-per-class", "20", "--weights", "none",
            "--epochs", "40", "--batch-size", "8", "--checkpoint-every", "2"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}",
                "-m", "tltk.cli", "finetune"]
    interrupted = tmp_path / "interrupted"
    job = subprocess.Popen([*launcher, *args, "--device", "cpu", "--workers", "0", "--quiet", "--json", "--out",
                            str(interrupted)], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not checkpoint.has_checkpoint(interrupted) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    # 40 epochs of 13 steps: seconds of training left when the first checkpoint (step 2) appears.
    job.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    _, stderr = job.communicate(timeout=120)
    assert checkpoint.has_checkpoint(interrupted), stderr[-3000:]
    assert "launched with 2 processes again" in stderr

    alone = subprocess.run([sys.executable, "-m", "tltk.cli", "finetune", "--resume", str(interrupted)], cwd=REPO,
                           env=ENV, capture_output=True, text=True, timeout=120)
    assert alone.returncode == 2 and "processes was 2" in alone.stderr and "Traceback" not in alone.stderr
    assert checkpoint.has_checkpoint(interrupted), "a refused resume leaves the checkpoint in place"

    resumed = subprocess.run([*launcher, "--resume", str(interrupted), "--quiet", "--json"], cwd=REPO, env=ENV,
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = tltk_finetune(args, tmp_path / "whole", processes=PROCESSES)  # adds --device cpu --workers 0
    assert whole.returncode == 0, whole.stderr[-3000:]
    finished, reference = load_file(interrupted / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert all(torch.equal(finished[name], reference[name]) for name in reference)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_metrics(interrupted)) == strip(read_metrics(tmp_path / "whole"))
