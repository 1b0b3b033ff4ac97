"""The learning-rate finder: its suggestion on a problem whose good rates are known, its stop
on divergence, the state it leaves untouched, and `--lr find` / `tltk lr-find` end to end."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from tltk.cli import main
from tltk.errors import SettingError, TltkError
from tltk.train.config import LrFinderSettings, TrainConfig, parse_lr
from tltk.train.finetune import DataOptions, FinetuneConfig, finetune
from tltk.train.lr_find import RULE, find_lr, suggest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SGD = TrainConfig(optimizer="sgd", momentum=0.0, weight_decay=0.0, batch_size=64, device="cpu", precision="fp32",
                  workers=0)


def regression_problem(scale: float = 3.0) -> tuple[nn.Linear, TensorDataset]:
    """Linear regression whose inputs have standard deviation ``scale``: plain gradient
    descent on the mean squared error falls for rates below 2 / (largest Hessian eigenvalue),
    about 1 / scale**2, and blows up above it."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(512, 8, generator=generator) * scale
    targets = inputs @ torch.randn(8, 1, generator=generator) + 0.1 * torch.randn(512, 1, generator=generator)
    torch.manual_seed(0)
    return nn.Linear(8, 1), TensorDataset(inputs, targets)


def falling_range(model: nn.Module, data: TensorDataset, steps: int = 20) -> tuple[float, float]:
    """The rates (on a grid) at which ``steps`` full-batch gradient steps from the model's
    weights at least halve the loss: measured directly, independently of the finder."""
    inputs, targets = data.tensors
    falling = []
    for lr in np.logspace(-5, 1, 31):
        trained = copy.deepcopy(model)
        optimizer = torch.optim.SGD(trained.parameters(), lr=float(lr))
        before = float(nn.functional.mse_loss(trained(inputs), targets).detach())
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.mse_loss(trained(inputs), targets).backward()
            optimizer.step()
        after = float(nn.functional.mse_loss(trained(inputs), targets).detach())
        if after < before / 2:
            falling.append(float(lr))
    return min(falling), max(falling)


def test_the_suggestion_lies_where_the_loss_falls_on_a_problem_with_known_good_rates() -> None:
    """On linear regression the finder's suggestion is a rate at which training measurably
    lowers the loss, and below the rate where gradient descent diverges (2 / largest eigenvalue)."""
    model, data = regression_problem()
    low, high = falling_range(model, data)
    inputs = torch.cat([data.tensors[0], torch.ones(len(data), 1)], dim=1)
    unstable_above = 2 / float(torch.linalg.eigvalsh(2 * inputs.T @ inputs / len(data)).max())
    assert high < unstable_above  # the measured range agrees with the theory
    finding = find_lr(model, data, SGD, loss_fn=nn.MSELoss())
    assert low <= finding.suggested_lr <= high, (low, finding.suggested_lr, high)
    assert finding.rule == RULE
    lowest = int(np.argmin(finding.smoothed))
    assert finding.suggested_lr == pytest.approx(finding.lrs[lowest] / 10)


def test_the_ramp_stops_once_the_smoothed_loss_diverges() -> None:
    """Rates up to 10 blow the regression up: the ramp stops early, at the first step whose
    smoothed loss exceeds four times the lowest, and a ramp kept low runs every step."""
    model, data = regression_problem()
    finding = find_lr(model, data, SGD, loss_fn=nn.MSELoss())
    assert finding.diverged and finding.steps_run < 100
    smoothed = finding.smoothed
    assert smoothed[-1] > 4 * min(smoothed)
    assert all(s <= 4 * min(smoothed[:i + 1]) for i, s in enumerate(smoothed[:-1]))
    assert finding.lrs[0] == pytest.approx(1e-7) and finding.lrs[1] / finding.lrs[0] == pytest.approx(10 ** (8 / 99))
    low = find_lr(model, data, SGD, loss_fn=nn.MSELoss(), settings=LrFinderSettings(end_lr=0.05, steps=30))
    assert not low.diverged and low.steps_run == 30 and low.lrs[-1] == pytest.approx(0.05)


def test_the_smoothed_loss_is_the_bias_corrected_exponential_average() -> None:
    """smoothed[i] = (1 - b) * sum_j b**(i - j) * loss[j] / (1 - b**(i + 1)), by hand."""
    model, data = regression_problem()
    finding = find_lr(model, data, SGD, loss_fn=nn.MSELoss(), settings=LrFinderSettings(1e-4, 0.05, 20))
    beta, losses = 0.9, np.asarray(finding.losses)
    for i in range(len(losses)):
        weights = (1 - beta) * beta ** np.arange(i, -1, -1)
        assert finding.smoothed[i] == pytest.approx(float(weights @ losses[: i + 1]) / (1 - beta ** (i + 1)), rel=1e-9)


class WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_model_optimizer_and_random_generators_are_untouched(optimizer_name: str) -> None:
    """Parameters, BatchNorm statistics, the optimizer's state (after real steps, so there is
    state) and the generators training draws from are bit-identical after the finder."""
    torch.manual_seed(0)
    model = WithBatchNorm()
    data = TensorDataset(torch.randn(96, 8), torch.randint(0, 3, (96,)))
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer_name == "sgd"
                 else torch.optim.AdamW(model.parameters(), lr=1e-3))
    for start in range(0, 96, 32):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(data.tensors[0][start:start + 32]), data.tensors[1][start:start + 32]).backward()
        optimizer.step()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    torch.manual_seed(123), np.random.seed(7), random.seed(5)
    expected = (torch.rand(4), np.random.rand(2), random.random())
    torch.manual_seed(123), np.random.seed(7), random.seed(5)
    model.eval()

    finding = find_lr(model, data, TrainConfig(batch_size=16, device="cpu", precision="fp32", workers=0),
                      optimizer=optimizer, settings=LrFinderSettings(steps=30))

    assert finding.steps_run > 5
    drawn = (torch.rand(4), np.random.rand(2), random.random())
    assert torch.equal(drawn[0], expected[0]) and np.array_equal(drawn[1], expected[1]) and drawn[2] == expected[2]
    assert not model.training  # its mode too
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, params[name]), name
    assert model.body[1].num_batches_tracked.item() == 3
    after = optimizer.state_dict()
    assert after["param_groups"] == optimizer_state["param_groups"]
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(after["state"][index][key]), torch.as_tensor(value)), (index, key)
    for group, parameter in zip(optimizer.param_groups[0]["params"], model.parameters()):
        assert group is parameter  # the optimizer still drives the model's own parameters


def test_the_random_generators_draw_on_as_if_the_finder_had_not_run() -> None:
    """Numbers drawn after the finder (torch, NumPy, Python) are those drawn without it."""
    model, data = regression_problem()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    without = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    find_lr(model, data, SGD, loss_fn=nn.MSELoss(), settings=LrFinderSettings(1e-4, 0.05, 10))
    assert torch.equal(torch.rand(3), without[0])
    assert np.array_equal(np.random.rand(3), without[1])
    assert [random.random() for _ in range(3)] == without[2]


def test_a_loss_that_never_falls_is_told_in_one_sentence() -> None:
    """A curve whose lowest point lies in the ramp's first tenfold rise has nothing to suggest."""
    lrs = list(np.logspace(-7, 1, 20))
    rising = [1.0 + 0.1 * i for i in range(20)]
    with pytest.raises(TltkError, match="the loss did not fall"):
        suggest(lrs, rising)
    assert suggest(lrs, [5.0 - 0.2 * i for i in range(15)] + [9.0] * 5)[0] == pytest.approx(lrs[14] / 10)


@pytest.mark.parametrize("text, fragment", [("fast", "neither a number nor 'find'"), ("-1e-3", "positive finite"),
                                            ("0", "positive finite"), ("nan", "positive finite"),
                                            ("inf", "positive finite")])
def test_bad_values_of_lr_name_the_setting(text: str, fragment: str) -> None:
    """Each is one SettingError naming lr; `find` and numbers parse."""
    with pytest.raises(SettingError, match=fragment) as caught:
        parse_lr(text)
    assert caught.value.settings == ("lr",)
    assert parse_lr("find") == "find" and parse_lr("3e-4") == pytest.approx(3e-4)


def test_bad_lr_on_the_command_line_is_one_sentence_naming_the_flag(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["finetune", "--backbone", "lenet5", "--data", "builtin:digits", "--lr", "fast",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--lr 'fast' is neither a number nor 'find'" in lines[0]
    assert not (tmp_path / "run").exists()


def tiny_config(lr: float | str, **train: object) -> FinetuneConfig:
    return FinetuneConfig(
        backbone="lenet5", weights="none",
        data=DataOptions("builtin:digits", classes=["0", "1", "2"], train_per_class=12),
        train=TrainConfig(epochs=1, batch_size=8, workers=0, device="cpu", precision="fp32", lr=lr,
                          optimizer="sgd", **train),  # type: ignore[arg-type]
    )


def test_finetune_lr_find_records_the_finding_and_trains_as_with_the_rate_given(tmp_path: Path) -> None:
    """`--lr find`: config.json's train.lr is the suggestion and lr_find says how it was found;
    lr_find.json and the plot are written; the weights are bit-identical to a run given that
    rate directly (the finder changed nothing training draws on)."""
    found = finetune(tiny_config("find"), tmp_path / "found")
    config = json.loads((found.out / "config.json").read_text())
    record = config["lr_find"]
    assert record["requested"] == "find" and record["rule"] == RULE
    assert config["train"]["lr"] == record["suggested_lr"] == config["finetune"]["train"]["lr"]
    saved = json.loads((found.out / "lr_find.json").read_text())
    assert saved["suggested_lr"] == record["suggested_lr"] and len(saved["lrs"]) == record["steps_run"]
    assert (found.out / "plots" / "lr_find.png").stat().st_size > 1000
    given = finetune(tiny_config(record["suggested_lr"]), tmp_path / "given")
    assert "lr_find" not in json.loads((given.out / "config.json").read_text())
    found_weights = load_file(found.out / "model.safetensors")
    given_weights = load_file(given.out / "model.safetensors")
    assert found_weights.keys() == given_weights.keys()
    assert all(torch.equal(found_weights[k], given_weights[k]) for k in found_weights)


def test_lr_find_command_prints_and_saves_the_suggestion(tmp_path: Path) -> None:
    """`tltk lr-find` takes finetune's model and data options, prints the suggestion with its
    rule, and writes the JSON and the plot; the JSON's suggestion is the library's."""
    out = tmp_path / "finder"
    args = ["lr-find", "--backbone", "lenet5", "--weights", "none", "--data", "builtin:digits", "--classes", "0,1,2",
            "--train-per-class", "12", "--batch-size", "8", "--optimizer", "sgd", "--device", "cpu",
            "--precision", "fp32", "--workers", "0", "--steps", "40", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "lr_find.json").read_text())
    assert f"suggested lr: {saved['suggested_lr']:.3g}" in result.output and "minimum / 10" in result.output
    assert (out / "lr_find.png").stat().st_size > 1000
    assert saved["settings"]["steps"] == 40 and saved["steps_run"] <= 40
    again = CliRunner().invoke(main, [*args, "--json"])
    assert json.loads(again.output)["suggested_lr"] == saved["suggested_lr"]  # the same seed, the same ramp


def test_lr_find_refuses_training_only_options_and_bad_ramps(tmp_path: Path) -> None:
    """Options that only shape a full run (epochs, schedule) are not lr-find's; a ramp that
    goes down is one sentence naming both flags."""
    runner = CliRunner()
    result = runner.invoke(main, ["lr-find", "--backbone", "lenet5", "--data", "builtin:digits", "--epochs", "3",
                                  "--out", str(tmp_path)])
    assert result.exit_code != 0 and "No such option '--epochs'" in result.output
    result = runner.invoke(main, ["lr-find", "--backbone", "lenet5", "--data", "builtin:digits", "--start-lr", "1",
                                  "--end-lr", "0.1", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "--end-lr (0.1) must be above --start-lr (1.0)" in result.output
    assert not (tmp_path / "x").exists()
