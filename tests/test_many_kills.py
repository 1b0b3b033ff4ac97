"""Training and extraction killed with SIGKILL at a hundred random moments end as if never killed.

How the kills are made affordable: every attempt runs in a child forked from this test
process, which has already imported torch and tltk, so an attempt costs reading the data
and building the model, not the seconds a fresh interpreter spends importing torch. The
child is the process doing the work and it receives a real SIGKILL: nothing in it runs
after the signal (no handler, no ``finally``, no flush), exactly as for a killed
``tltk finetune``. The delays come from a seeded generator; each is drawn between zero
and the measured start-up time plus a slice of the remaining work sized so that the run
outlasts the kills still to come, so most kills land in training or saving, some in
start-up (before any checkpoint) and some in the middle of writing a checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import faiss  # noqa: F401 - imported once here, not again in every forked attempt
import pytest
import sklearn.datasets  # noqa: F401 - likewise (builtin:digits)
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from tltk import rundir
from tltk.cli import main
from tltk.errors import RunDirError
from tltk.features import Loading, extract, load_source
from tltk.features.manifest import FEATURES, INDEX, MANIFEST, METADATA, is_store
from tltk.train import checkpoint
from tltk.train.callbacks import Callback
from tltk.train.finetune import DataOptions, FinetuneConfig, config_of_run, finetune
from tltk.train.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAINING_KILLS = 100
EXTRACTION_KILLS = 30
SEED = 20231


def small_run(precision: str) -> FinetuneConfig:
    """simplecnn on 24 digits per class, batches of 8: 30 steps an epoch, 60 in all."""
    data = DataOptions("builtin:digits", train_per_class=24)
    train = TrainConfig(epochs=2, batch_size=8, lr=3e-3, workers=0, device="cpu", precision=precision)
    return FinetuneConfig(backbone="simplecnn", data=data, weights="none", train=train)


def train_attempt(run: Path, precision: str) -> None:
    """What a user does after a kill: ``--resume RUN`` once the run has written its config.json,
    otherwise the first command again (the directory is then empty or holds no run yet)."""
    if rundir.is_run(run):
        finetune(config_of_run(run), run, resume=True, checkpoint_every=1)
    else:
        finetune(small_run(precision), run, checkpoint_every=1)


# --- forking, killing ----------------------------------------------------------------------


def start_child(work: Callable[[], None]) -> int:
    """Fork a child that does ``work`` and exits 0, or prints the error and exits 1."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            work()
        except BaseException:  # noqa: BLE001 - reported through the exit code
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


def wait_or_kill(pid: int, delay: float, until_step: tuple[Path, int | None] = (Path(), None),
                 patience: float = 600.0) -> bool:
    """Whether the child was killed: ``delay`` seconds after it started or, with
    ``until_step=(run, step)``, after its checkpoint in ``run`` reached ``step`` (and at the
    latest when it reaches ``step + 2``, however fast the machine runs just then). A child
    that ends by itself first must have succeeded."""
    run, step = until_step
    give_up = time.monotonic() + patience
    while step is not None and (checkpoint_step(run) or 0) < step:
        if child_ended(pid) or time.monotonic() > give_up:
            return False
        time.sleep(0.002)
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline:
        if child_ended(pid):
            return False
        if step is not None and (checkpoint_step(run) or 0) >= step + 2:
            break
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status):  # it ended between the last look and the signal
        assert os.waitstatus_to_exitcode(status) == 0, "an attempt failed (its traceback is above)"
        return False
    assert os.WTERMSIG(status) == signal.SIGKILL
    return True


def child_ended(pid: int) -> bool:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        assert os.waitstatus_to_exitcode(status) == 0, "an attempt failed (its traceback is above)"
    return bool(done)


def run_to_completion(work: Callable[[], None], timeout: float = 600.0) -> float:
    """Seconds ``work`` took in a forked child that nobody kills."""
    started = time.monotonic()
    assert not wait_or_kill(start_child(work), timeout), f"an uninterrupted attempt did not finish within {timeout} s"
    return time.monotonic() - started


@dataclass
class KillLog:
    """Where each kill landed, so that the test can show they were spread over the run."""

    before_first_checkpoint: int = 0
    after_a_checkpoint: int = 0
    during_a_save: int = 0
    steps_seen: list[int] = field(default_factory=list)

    @property
    def kills(self) -> int:
        return self.before_first_checkpoint + self.after_a_checkpoint

    def record(self, step: int | None, save_cut: bool) -> None:
        self.during_a_save += save_cut
        if step is None:
            self.before_first_checkpoint += 1
        else:
            self.after_a_checkpoint += 1
            self.steps_seen.append(step)

    def describe(self) -> str:
        return (f"{self.kills} kills: {self.before_first_checkpoint} before the first checkpoint, "
                f"{self.during_a_save} in the middle of a save, at {len(set(self.steps_seen))} different "
                f"checkpoint steps ({min(self.steps_seen, default=0)}..{max(self.steps_seen, default=0)})")


def checkpoint_step(run: Path) -> int | None:
    return checkpoint.read_training_state(run).global_step if checkpoint.has_checkpoint(run) else None


def save_was_cut(run: Path) -> bool:
    """A tensor file or a temporary file the manifest does not name: a save was killed midway."""
    directory = checkpoint.checkpoint_dir(run)
    if not directory.is_dir():
        return False
    named = checkpoint.read_manifest(directory).tensor_file if checkpoint.has_checkpoint(run) else None
    return any(path.name not in (checkpoint.MANIFEST, named) for path in directory.iterdir())


# --- comparing results ---------------------------------------------------------------------


def metrics_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / rundir.METRICS).read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def summary_without_times(run: Path) -> dict:
    summary = json.loads((run / rundir.SUMMARY).read_text())
    summary.pop("seconds")
    summary["final"].pop("seconds", None)
    return summary


def assert_same_run(run: Path, reference: Path) -> None:
    weights, expected = load_file(run / rundir.WEIGHTS), load_file(reference / rundir.WEIGHTS)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected), "the weights differ"
    assert metrics_rows(run) == metrics_rows(reference)
    assert summary_without_times(run) == summary_without_times(reference)
    assert not checkpoint.has_checkpoint(run)


# --- the tests -----------------------------------------------------------------------------


@pytest.mark.slow  # not marked `precision`: `make test` would run its hundred kills a second time
def test_training_killed_a_hundred_times_at_random_moments_ends_bit_identical(tmp_path: Path,
                                                                              train_precision: str) -> None:
    """100 SIGKILLs over one run, each followed by a resume (from the start when no
    checkpoint was saved yet): the final weights, metrics.jsonl and summary are those of
    the run nobody killed, in the precision this machine picks (``--precision`` chooses another)."""
    reference = tmp_path / "uninterrupted"
    whole_run = run_to_completion(lambda: finetune(small_run(train_precision), reference, checkpoint_every=1))
    steps = json.loads((reference / rundir.SUMMARY).read_text())["steps"]
    startup = measure_startup(tmp_path / "probe", train_precision)
    step_seconds = max(whole_run - startup, 0.1) / steps

    run, log = tmp_path / "killed", KillLog()
    for moment in kill_moments(random.Random(SEED), steps, startup, step_seconds):
        pid = start_child(lambda: train_attempt(run, train_precision))
        killed = wait_or_kill(pid, moment.delay, until_step=(run, moment.after_step))
        assert killed, f"the run finished after only {log.kills} kills; make it longer"
        log.record(checkpoint_step(run), save_was_cut(run))
    run_to_completion(lambda: train_attempt(run, train_precision))

    assert_same_run(run, reference)
    assert log.kills == TRAINING_KILLS
    assert log.before_first_checkpoint >= 1, f"no kill landed before the first checkpoint: {log}"
    assert len(set(log.steps_seen)) >= steps // 3, f"the kills were not spread over the run: {log}"
    print(f"\n{log.describe()}")


@dataclass
class KillMoment:
    """Kill ``delay`` seconds after the attempt starts, or after its checkpoint reaches
    ``after_step`` when that is given (the delay then falls inside a step or its save)."""

    delay: float
    after_step: int | None = None


def kill_moments(rng: random.Random, steps: int, startup: float, step_seconds: float) -> list[KillMoment]:
    """Five kills of the fresh run early in its start-up (before its config.json or its first
    checkpoint exists); then one in ten at a random moment of an attempt's start-up (reading
    data, building the model, restoring the checkpoint), the others at a random moment
    within a step or two after a checkpoint that moves through the run in order, leaving its
    last steps to the final attempt so that the run cannot end before its last kill."""
    first = [KillMoment(rng.uniform(0.0, startup / 2)) for _ in range(5)]
    targets = sorted(rng.randint(1, steps - 6) for _ in range(TRAINING_KILLS - len(first)))
    return first + [KillMoment(rng.uniform(0.0, startup)) if rng.random() < 0.1
                    else KillMoment(rng.uniform(0.0, 1.5 * step_seconds), target) for target in targets]


def measure_startup(run: Path, precision: str) -> float:
    """Seconds from the fork to the first checkpoint of a fresh run (data, model, one step)."""
    pid = start_child(lambda: finetune(small_run(precision), run, checkpoint_every=1))
    started = time.monotonic()
    while not checkpoint.has_checkpoint(run):
        assert not child_ended(pid), "the probe run ended before its first checkpoint"
        time.sleep(0.002)
    seconds = time.monotonic() - started
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return seconds


def extract_attempt(out: Path) -> None:
    """What a user does after a killed `tltk extract`: run it again (a store already in place
    means the last attempt finished just before its kill)."""
    if is_store(out):
        return
    source = load_source("lenet5", weights="none", seed=0)
    extract(source, "fc7", out, "builtin:digits", loading=Loading(batch_size=16, device="cpu", workers=0),
            classes=["0", "1", "2", "3", "4"])


def store_files(store: Path) -> dict[str, object]:
    manifest = json.loads((store / MANIFEST).read_text())
    for key in ("created", "updated"):
        manifest.pop(key)
    manifest["index"].pop("build_seconds")
    return {"manifest": manifest, **{name: (store / name).read_bytes() for name in (FEATURES, METADATA, INDEX)}}


@pytest.mark.slow
def test_extraction_killed_at_random_moments_and_run_again_gives_the_uninterrupted_store(tmp_path: Path) -> None:
    """Each kill leaves no store or the complete one, never a partial one where readers
    look; running the command again gives the same bytes as an extraction nobody killed,
    and no hidden building directory of a killed attempt is left behind."""
    reference = tmp_path / "reference" / "store"
    whole = run_to_completion(lambda: extract_attempt(reference))
    out, rng, kills = tmp_path / "killed" / "store", random.Random(SEED), 0
    while kills < EXTRACTION_KILLS:
        killed = wait_or_kill(start_child(lambda: extract_attempt(out)), rng.uniform(0.0, whole * 0.9))
        if killed:
            kills += 1
            assert not out.exists() or is_store(out), "a killed extraction left a partial store in place"
        if is_store(out):  # it finished before the kill: start again to keep killing
            shutil.rmtree(out)
    run_to_completion(lambda: extract_attempt(out))
    assert store_files(out) == store_files(reference)
    # The store's empty lock file stays by design (tltk.locking); nothing else may.
    assert sorted(p.name for p in out.parent.iterdir()) == [".store.lock", "store"], \
        "a killed attempt's files were left behind"



# --- the behaviour the kills rely on, pinned fast -----------------------------------------


class CrashAtStep(Callback):
    """Stands in for a kill: raises after a given step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, model, row, images) -> None:
        if row["step"] == self.step:
            raise KeyboardInterrupt


def tiny_run() -> FinetuneConfig:
    data = DataOptions("builtin:digits", classes=["0", "1", "2"], train_per_class=8)
    return FinetuneConfig(backbone="lenet5", data=data, weights="none",
                          train=TrainConfig(epochs=1, batch_size=8, workers=0, device="cpu"))


def test_a_run_interrupted_before_its_first_checkpoint_resumes_from_its_start(tmp_path: Path) -> None:
    """config.json written, no checkpoint yet: ``--resume`` starts the run again with its
    recorded settings and ends where an uninterrupted run ends; other settings are refused."""
    whole = finetune(tiny_run(), tmp_path / "whole")
    run = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_run(), run, callbacks=[CrashAtStep(2)])  # no checkpoint_every: nothing saved
    assert rundir.is_run(run) and not checkpoint.has_checkpoint(run) and (run / rundir.METRICS).exists()
    changed = tiny_run()
    changed.train.lr = 0.5
    with pytest.raises(RunDirError, match="other settings than it started with.*lr"):
        finetune(changed, run, resume=True)
    done = CliRunner().invoke(main, ["finetune", "--resume", str(run), "--quiet"])
    assert done.exit_code == 0, done.output
    assert_same_run(run, whole.out)


def test_resuming_a_directory_without_config_or_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="no checkpoint and no config.json to start again from"):
        config_of_run(tmp_path / "empty")


def test_extraction_removes_building_directories_of_dead_processes_only(tmp_path: Path) -> None:
    """A killed extraction cannot remove its hidden directory; the next one into the same
    place removes it, and leaves those of a live process or of another host alone."""
    dead = start_child(lambda: None)
    os.waitpid(dead, 0)
    host = socket.gethostname()
    leftovers = {name: tmp_path / f".store.building-{name}-abcd1234" for name in
                 (f"{host}-{dead}", f"{host}-{os.getpid()}", f"elsewhere-{dead}")}
    for path in leftovers.values():
        (path / "features.f32").parent.mkdir()
        (path / "features.f32").write_bytes(b"\0" * 64)
    source = load_source("lenet5", weights="none", seed=0)
    extract(source, "fc7", tmp_path / "store", "builtin:digits", split="test", classes=["0", "1"],
            loading=Loading(batch_size=16, device="cpu", workers=0))
    assert not leftovers[f"{host}-{dead}"].exists()
    assert leftovers[f"{host}-{os.getpid()}"].exists() and leftovers[f"elsewhere-{dead}"].exists()
