"""Checkpoints: a resumed run continues bit for bit, a killed save leaves a loadable
checkpoint behind, and a damaged one is refused with one sentence.

The training loop here is a miniature of tltk's: a seeded per-epoch permutation as the data
order (the position in it is ``TrainingState.epoch`` / ``batches_done``), dropout drawing
from torch's global generator, noise from a named ``torch.Generator``, NumPy's and Python's
global generators, two parameter groups at different rates, a LambdaLR and a GradScaler.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F

import tltk
from tltk.errors import RunDirError
from tltk.train import checkpoint as ck
from tltk.train.checkpoint import TrainingState, load_checkpoint, save_checkpoint

SAMPLES, BATCH = 24, 6
BATCHES_PER_EPOCH = SAMPLES // BATCH
_data = torch.Generator().manual_seed(1234)
INPUTS = torch.randn(SAMPLES, 5, generator=_data)
TARGETS = torch.randint(0, 3, (SAMPLES,), generator=_data)
CONFIG = {"train": {"lr": 0.05, "optimizer": "sgd", "epochs": 4}, "model": {"backbone": "tiny"}}
REPO = Path(__file__).resolve().parents[1]


# --- a miniature training run -----------------------------------------------------------------


@dataclass
class Run:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    noise: torch.Generator
    state: TrainingState = field(default_factory=TrainingState)

    def save(self, run_dir: Path, **extra: Any) -> Path:
        return save_checkpoint(run_dir, self.model, self.optimizer, self.scheduler, self.scaler, self.state,
                               generators={"noise": self.noise}, config=CONFIG, **extra)

    def load(self, run_dir: Path, **extra: Any) -> ck.Resumed:
        resumed = load_checkpoint(run_dir, self.model, self.optimizer, self.scheduler, self.scaler,
                                  generators={"noise": self.noise}, config=CONFIG, **extra)
        self.state = resumed.state
        return resumed


def tiny_model(classes: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.25), nn.Linear(16, classes))


def make_run(optimizer: str = "sgd", seed: int = 0, classes: int = 3) -> Run:
    """A freshly built run; ``seed`` sets its initial weights and noise generator."""
    torch.manual_seed(seed)
    model = tiny_model(classes)
    base_lr = 0.05 if optimizer == "sgd" else 0.01
    groups = [
        {"params": [*model[0].parameters(), *model[1].parameters()], "lr": base_lr * 0.1, "initial_lr": base_lr * 0.1},
        {"params": list(model[4].parameters()), "lr": base_lr, "initial_lr": base_lr},
    ]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=base_lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    elif optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=base_lr, weight_decay=1e-4)
    else:
        opt = torch.optim.AdamW(groups, lr=base_lr, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.9 ** step)
    scaler = torch.amp.GradScaler("cpu", growth_interval=2)
    return Run(model, opt, scheduler, scaler, torch.Generator().manual_seed(seed + 1))


def epoch_order(epoch: int) -> np.ndarray:
    """A permutation that depends on the epoch alone, as the trainer's EpochOrder."""
    return np.random.default_rng([7, epoch, 0]).permutation(SAMPLES)


def train_steps(run: Run, count: int) -> list[float]:
    """``count`` steps from ``run.state``'s position; the losses they gave."""
    losses = []
    for _ in range(count):
        state = run.state
        index = torch.as_tensor(epoch_order(state.epoch)[state.batches_done * BATCH:(state.batches_done + 1) * BATCH])
        inputs = INPUTS[index] + 0.05 * torch.randn(len(index), 5, generator=run.noise)
        inputs = inputs * (1 + 0.01 * float(np.random.rand())) + 0.01 * random.random()
        run.model.train()
        loss = F.cross_entropy(run.model(inputs), TARGETS[index])
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        losses.append(loss.item())
        _advance(state, loss.item(), len(index))
    return losses


def _advance(state: TrainingState, loss: float, batch: int) -> None:
    state.global_step += 1
    state.batches_done += 1
    state.epoch_loss_sum += loss * batch
    state.epoch_seen += batch
    if state.batches_done == BATCHES_PER_EPOCH:
        state.history.append({"epoch": state.epoch + 1, "train_loss": state.epoch_loss_sum / state.epoch_seen})
        state.epoch, state.batches_done, state.epoch_loss_sum, state.epoch_seen = state.epoch + 1, 0, 0.0, 0


def scramble_global_generators(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Equal values, tensors bit for bit (same dtype, torch.equal), containers of the same type."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def tensor_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoint").glob("state-*.safetensors"))


def one_sentence(error: pytest.ExceptionInfo[RunDirError]) -> str:
    message = str(error.value)
    assert "\n" not in message and message.endswith(".")
    return message


# --- resuming reproduces the run -----------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_training_resumed_from_a_checkpoint_matches_uninterrupted_training_bit_for_bit(tmp_path, optimizer):
    scramble_global_generators(0)
    first = make_run(optimizer, seed=0)
    train_steps(first, 6)  # half way through the second epoch
    first.save(tmp_path)
    expected_losses = train_steps(first, 7)  # through the end of the second epoch and into the fourth

    scramble_global_generators(123)
    second = make_run(optimizer, seed=99)
    assert not torch.equal(second.model[0].weight, first.model[0].weight)
    second.load(tmp_path)
    assert (second.state.epoch, second.state.batches_done, second.state.global_step) == (1, 2, 6)
    losses = train_steps(second, 7)

    assert losses == expected_losses
    assert_identical(second.model.state_dict(), first.model.state_dict(), "model")
    assert_identical(second.optimizer.state_dict(), first.optimizer.state_dict(), "optimizer")
    assert_identical(second.scheduler.state_dict(), first.scheduler.state_dict(), "scheduler")
    assert_identical(second.scaler.state_dict(), first.scaler.state_dict(), "scaler")
    assert second.state == first.state  # counters, the unfinished epoch's sums and the epoch history


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_optimizer_state_dict_after_loading_equals_the_saved_one(tmp_path, optimizer):
    run = make_run(optimizer)
    for parameter in run.model[0].parameters():  # a frozen layer: its parameters get no optimizer state
        parameter.requires_grad_(False)
    train_steps(run, 3)
    saved = copy.deepcopy(run.optimizer.state_dict())
    assert saved["param_groups"][1]["lr"] != saved["param_groups"][1]["initial_lr"]  # the schedule moved it
    run.save(tmp_path)

    fresh = make_run(optimizer, seed=5)
    fresh.load(tmp_path)
    assert_identical(fresh.optimizer.state_dict(), saved, "optimizer")


SCHEDULERS = {
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "exponential": lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6, eta_min=1e-4),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (step + 1)),
    "warmup-then-cosine": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt,
        [torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3),
         torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)],
        milestones=[3],
    ),
}


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_scheduler_state_round_trips_and_gives_the_same_later_rates(tmp_path, kind):
    def build() -> Run:
        run = make_run("sgd")
        run.scheduler = SCHEDULERS[kind](run.optimizer)
        return run

    first = build()
    train_steps(first, 4)
    first.save(tmp_path)
    second = build()
    second.load(tmp_path)
    assert_identical(second.scheduler.state_dict(), first.scheduler.state_dict(), "scheduler")
    rates = []
    for run in (first, second):
        train_steps(run, 4)
        rates.append([group["lr"] for group in run.optimizer.param_groups])
    assert rates[0] == rates[1]


def test_every_random_generator_continues_where_the_checkpoint_left_it(tmp_path):
    run = make_run()
    np.random.normal()  # leaves NumPy holding a cached Gaussian
    random.gauss(0, 1)  # and Python's random a gauss_next
    run.save(tmp_path)

    def draws() -> list[Any]:
        return [torch.rand(3).tolist(), np.random.normal(size=3).tolist(), random.gauss(0, 1), random.random(),
                torch.rand(3, generator=run.noise).tolist()]

    expected = draws()
    scramble_global_generators(77)
    run.noise.manual_seed(77)
    run.load(tmp_path)
    assert draws() == expected


def test_counters_history_and_best_weights_come_back(tmp_path):
    run = make_run()
    train_steps(run, 5)
    run.state.best_metric, run.state.best_epoch, run.state.epochs_without_improvement = 0.75, 1, 0
    run.state.metrics_bytes, run.state.seconds, run.state.extra = 1234, 3.5, {"note": ["a", 1, None]}
    best = {key: value.clone() + 1 for key, value in run.model.state_dict().items()}
    run.save(tmp_path, best_model=best)
    saved_state = copy.deepcopy(run.state)

    resumed = make_run(seed=3).load(tmp_path)
    assert resumed.state == saved_state
    assert resumed.best_model is not None
    assert_identical(resumed.best_model, best, "best_model")

    run.save(tmp_path)  # without best weights
    assert make_run(seed=3).load(tmp_path).best_model is None


def test_tied_weights_are_stored_once_and_restored_to_both_names(tmp_path):
    def tied() -> nn.Sequential:
        model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
        model[1].weight = model[0].weight
        return model

    model = tied()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path, model, optimizer, None, None, TrainingState())
    with safe_open(str(tmp_path / "checkpoint" / tensor_files(tmp_path)[0]), framework="pt") as handle:
        assert [k for k in handle.keys() if k.startswith("model/")] == ["model/0.weight"]
    fresh = tied()
    load_checkpoint(tmp_path, fresh, torch.optim.SGD(fresh.parameters(), lr=0.1))
    assert torch.equal(fresh[0].weight, model[0].weight) and torch.equal(fresh[1].weight, model[0].weight)


# --- a save cut short leaves the previous checkpoint ---------------------------------------


class SimulatedCrash(Exception):
    pass


def test_a_save_that_dies_after_writing_its_tensors_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    run = make_run()
    train_steps(run, 2)
    run.save(tmp_path)
    weights_at_step_2 = copy.deepcopy(run.model.state_dict())
    train_steps(run, 3)

    def dies_half_way_through(path: Path, obj: Any) -> None:
        text = json.dumps(obj)
        (path.parent / f".{path.name}.crash.tmp").write_text(text[: len(text) // 2])
        raise SimulatedCrash

    monkeypatch.setattr(ck, "write_json", dies_half_way_through)
    with pytest.raises(SimulatedCrash):
        run.save(tmp_path)
    monkeypatch.undo()
    assert len(tensor_files(tmp_path)) == 2  # the new tensor file was complete; its manifest never was

    fresh = make_run(seed=9)
    fresh.load(tmp_path)
    assert fresh.state.global_step == 2
    assert_identical(fresh.model.state_dict(), weights_at_step_2, "model")

    run.save(tmp_path)  # the next save clears what the dead one left behind
    names = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert names == [*tensor_files(tmp_path), "state.json"] and len(tensor_files(tmp_path)) == 1


KILLED_SAVER = """
import sys
from pathlib import Path
import torch
from tltk.train.checkpoint import TrainingState, save_checkpoint
model = torch.nn.Linear(256, 512)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
step = 0
while True:
    step += 1
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(step)
    save_checkpoint(Path(sys.argv[1]), model, optimizer, None, None, TrainingState(global_step=step))
    print(step, flush=True)
"""


def test_a_process_killed_while_saving_leaves_a_consistent_checkpoint(tmp_path):
    saver = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, str(tmp_path)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert saver.stdout is not None and saver.stdout.readline()  # a first checkpoint is complete
        time.sleep(0.4)  # then SIGKILL lands somewhere in a later save
    finally:
        saver.kill()
        saver.wait()
    model = torch.nn.Linear(256, 512)
    resumed = load_checkpoint(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = resumed.state.global_step
    assert step >= 1
    assert all(torch.all(p == step) for p in model.parameters())  # the weights belong to the same save as the counters


def test_only_the_latest_checkpoint_is_kept(tmp_path):
    run = make_run()
    for _ in range(3):
        train_steps(run, 1)
        run.save(tmp_path)
    assert len(tensor_files(tmp_path)) == 1
    assert ck.read_training_state(tmp_path).global_step == 3


def test_removing_the_checkpoint_leaves_nothing_to_resume(tmp_path):
    make_run().save(tmp_path)
    assert ck.has_checkpoint(tmp_path)
    ck.remove_checkpoint(tmp_path)
    assert not ck.has_checkpoint(tmp_path)
    with pytest.raises(RunDirError, match="has no checkpoint to resume from"):
        make_run().load(tmp_path)


def test_rewinding_the_metrics_log_drops_rows_written_after_the_checkpoint(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n')
    state = TrainingState(metrics_bytes=len('{"step": 1}\n'))
    log.write_text(log.read_text() + '{"step": 3}\n')
    ck.rewind_metrics_log(tmp_path, state)
    assert log.read_text() == '{"step": 1}\n'


# --- damaged checkpoints and mismatched runs: one sentence each --------------------------------


@pytest.fixture
def saved(tmp_path) -> Path:
    run = make_run()
    train_steps(run, 2)
    run.save(tmp_path)
    return tmp_path


def tensor_path(run_dir: Path) -> Path:
    return run_dir / "checkpoint" / tensor_files(run_dir)[0]


def rewrite_manifest(run_dir: Path, change: Any) -> None:
    path = run_dir / "checkpoint" / "state.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_a_truncated_tensor_file_is_one_sentence_naming_it(saved):
    path = tensor_path(saved)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(RunDirError) as error:
        make_run().load(saved)
    assert str(path) in one_sentence(error) and "is truncated" in str(error.value)


def test_a_changed_byte_in_the_tensor_file_is_caught_by_its_checksum(saved):
    path = tensor_path(saved)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(RunDirError) as error:
        make_run().load(saved)
    assert str(path) in one_sentence(error) and "is corrupt" in str(error.value)


def test_a_tensor_file_safetensors_cannot_read_is_one_sentence(saved):
    path = tensor_path(saved)
    garbage = b"\xff" * 64
    path.write_bytes(garbage)
    rewrite_manifest(saved, lambda m: m.update(tensor_bytes=len(garbage), tensor_sha256=ck._sha256(path)))
    with pytest.raises(RunDirError) as error:
        make_run().load(saved)
    assert str(path) in one_sentence(error) and "not a readable safetensors file" in str(error.value)


def test_a_missing_tensor_file_is_one_sentence(saved):
    tensor_path(saved).unlink()
    with pytest.raises(RunDirError) as error:
        make_run().load(saved)
    assert "is missing" in one_sentence(error)


def test_a_checkpoint_folder_without_its_manifest_is_refused(saved):
    (saved / "checkpoint" / "state.json").unlink()
    with pytest.raises(RunDirError) as error:
        make_run().load(saved)
    assert "holds no complete checkpoint" in one_sentence(error)


def test_a_manifest_naming_a_tensor_the_file_lacks_is_refused(saved):
    rewrite_manifest(saved, lambda m: m["model"]["0.weight"].update({"$tensor": "model/nowhere"}))
    with pytest.raises(RunDirError) as error:
        make_run().load(saved)
    assert "state.json is damaged: model.0.weight names tensor 'model/nowhere'" in one_sentence(error)


def test_a_manifest_whose_shapes_disagree_with_the_tensor_file_is_refused(saved):
    rewrite_manifest(saved, lambda m: m["model"]["0.weight"].update(shape=[5, 16]))
    with pytest.raises(RunDirError) as error:
        make_run().load(saved)
    assert "model.0.weight expects a 'float32' tensor of shape [5, 16]" in one_sentence(error)


def test_a_model_of_another_shape_is_refused_naming_the_tensor(saved):
    with pytest.raises(RunDirError) as error:
        make_run(classes=4).load(saved)
    assert "model tensor 4.weight is float32 [3, 16] there and float32 [4, 16] here" in one_sentence(error)


def test_a_different_optimizer_is_refused(saved):
    with pytest.raises(RunDirError) as error:
        make_run("adamw").load(saved)
    assert "does not fit this run: optimizer param_groups[0]" in one_sentence(error)


def test_resuming_with_different_settings_is_refused_naming_the_setting(saved):
    run = make_run()
    with pytest.raises(RunDirError) as error:
        load_checkpoint(saved, run.model, run.optimizer, run.scheduler, run.scaler, generators={"noise": run.noise},
                        config={**CONFIG, "train": {**CONFIG["train"], "lr": 0.5}})
    assert "different settings (train.lr was 0.05, now 0.5)" in one_sentence(error)


def test_a_checkpoint_from_another_tltk_version_is_refused(saved, monkeypatch):
    monkeypatch.setattr(tltk, "__version__", "9.9.9")
    with pytest.raises(RunDirError) as error:
        make_run().load(saved)
    assert "written by tltk 0.1.0 and this is tltk 9.9.9" in one_sentence(error)


def test_resuming_with_loss_scaling_switched_off_is_refused(saved):
    run = make_run()
    run.scaler = torch.amp.GradScaler("cpu", enabled=False)
    with pytest.raises(RunDirError) as error:
        run.load(saved)
    assert "its loss scaling is on and this run's is off" in one_sentence(error)


def test_a_refused_load_changes_neither_the_objects_nor_the_generators(saved):
    run = make_run(seed=4)
    before = copy.deepcopy(run.model.state_dict())
    torch_state = torch.get_rng_state()
    with pytest.raises(RunDirError, match="no state for the generator 'sampler'"):
        load_checkpoint(saved, run.model, run.optimizer, run.scheduler, run.scaler,
                        generators={"noise": run.noise, "sampler": torch.Generator()})
    assert_identical(run.model.state_dict(), before, "model")
    assert run.optimizer.state_dict()["state"] == {}
    assert torch.equal(torch.get_rng_state(), torch_state)


# --- fuzzing the reader ------------------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def pristine():
    """A valid checkpoint and its manifest, which each example mutates and then puts back."""
    with tempfile.TemporaryDirectory() as name:
        run_dir = Path(name)
        run = make_run("adamw")
        train_steps(run, 2)
        run.save(run_dir, best_model=run.model.state_dict())
        manifest_path = run_dir / "checkpoint" / "state.json"
        yield run_dir, json.loads(manifest_path.read_text()), manifest_path.read_bytes()


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _paths(value, (*prefix, i))
    return found


json_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 2**40), st.floats(allow_nan=True), st.text(max_size=12),
    st.sampled_from(["$tensor", "float32", "uint8", "int64", "model/0.weight"]),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
        st.fixed_dictionaries({"$tensor": st.sampled_from(["model/0.weight", "rng/torch", "optimizer/state/0/step"]),
                               "dtype": st.sampled_from(["float32", "uint8", "int64"]),
                               "shape": st.lists(st.integers(0, 16), max_size=2)}),
        st.fixed_dictionaries({"$tuple": st.lists(inner, max_size=3)}),
        st.fixed_dictionaries({"$map": st.lists(st.tuples(st.integers(-1, 6) | st.text(max_size=3), inner)
                                                .map(list), max_size=3)}),
    ),
    max_leaves=12,
)


def _replace(tree: Any, path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    if not path:
        return value
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return tree


@FUZZ
@given(data=st.data(), value=json_values, delete=st.booleans())
def test_a_mutated_manifest_loads_or_is_refused_with_a_tltk_error(pristine, data, value, delete):
    run_dir, manifest, original = pristine
    path = data.draw(st.sampled_from(_paths(manifest)))
    mutated = _replace(copy.deepcopy(manifest), path, value, delete and bool(path))
    manifest_path = run_dir / "checkpoint" / "state.json"
    manifest_path.write_text(json.dumps(mutated))
    try:
        make_run("adamw").load(run_dir)
    except RunDirError as error:
        assert "\n" not in str(error)
    finally:
        manifest_path.write_bytes(original)


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                      json_values.map(json.dumps)))
def test_the_manifest_parser_gives_a_manifest_or_a_tltk_error_on_any_text(text):
    try:
        manifest = ck.parse_manifest(text, Path("state.json"))
    except RunDirError as error:
        assert "\n" not in str(error)
    else:
        assert isinstance(manifest.state, TrainingState)


@FUZZ
@given(fraction=st.floats(0, 1, exclude_max=True), which=st.sampled_from(["tensors", "manifest"]))
def test_a_truncated_checkpoint_file_is_refused_with_a_tltk_error(pristine, fraction, which):
    run_dir, _, manifest_bytes = pristine
    path = tensor_path(run_dir) if which == "tensors" else run_dir / "checkpoint" / "state.json"
    original = path.read_bytes()
    path.write_bytes(original[: int(len(original.rstrip()) * fraction)])  # a trailing newline is not content
    try:
        with pytest.raises(RunDirError):
            make_run("adamw").load(run_dir)
    finally:
        path.write_bytes(original)
        assert (run_dir / "checkpoint" / "state.json").read_bytes() == manifest_bytes


def test_checkpoint_files_copied_elsewhere_still_load(saved, tmp_path_factory):
    """Nothing in a checkpoint depends on where it was written (the manifest names its file, not a path)."""
    elsewhere = tmp_path_factory.mktemp("moved")
    shutil.copytree(saved / "checkpoint", elsewhere / "checkpoint")
    assert make_run(seed=8).load(elsewhere).state.global_step == 2
