"""Training settings that torch would take and train wrongly with, or refuse with a traceback,
are refused in one sentence that names the option (and nothing is written)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tltk.cli import main
from tltk.errors import SettingError
from tltk.train.trainer import TrainConfig

# (settings, the sentence from Python, the same sentence on the command line)
REFUSED = [
    (dict(momentum=-0.1), "momentum must be in [0, 1)", "--momentum must be in [0, 1)"),
    (dict(momentum=1.5), "momentum must be in [0, 1)", "--momentum must be in [0, 1)"),
    (dict(optimizer="sgd", momentum=0.0, nesterov=True), "nesterov needs optimizer sgd",
     "--nesterov needs --optimizer sgd and a --momentum above 0"),
    (dict(optimizer="adamw", nesterov=True), "nesterov needs optimizer sgd", "--nesterov needs --optimizer sgd"),
    (dict(weight_decay=-1.0), "weight_decay must be 0 or more", "--weight-decay must be 0 or more"),
    (dict(warmup_steps=-5), "warmup_steps must be 0 or more", "--warmup-steps must be 0 or more"),
    (dict(step_epochs=0), "step_epochs must be at least 1", "--step-epochs must be at least 1"),
    (dict(gamma=0.0), "gamma must be positive", "--gamma must be positive"),
    (dict(max_steps=0), "max_steps must be at least 1", "--max-steps must be at least 1, not 0; leave it out to train --epochs"),
    (dict(max_steps=-1), "max_steps must be at least 1", "--max-steps must be at least 1"),
    (dict(patience=0), "patience must be at least 1", "--patience must be at least 1"),
    (dict(clip_grad=-1.0), "clip_grad must be positive", "--clip-grad must be positive"),
    (dict(clip_grad=0.0), "clip_grad must be positive", "--clip-grad must be positive"),
]


@pytest.mark.parametrize("settings, sentence, flags", REFUSED, ids=[s for _, s, _ in REFUSED])
def test_a_setting_that_would_train_wrongly_is_refused_in_the_words_of_whoever_gave_it(settings, sentence, flags):
    # Python is told about the setting it passed, the command line about the flag it typed.
    with pytest.raises(SettingError) as refused:
        TrainConfig(**settings).validate()
    assert str(refused.value).startswith(sentence) and "--" not in str(refused.value)
    assert refused.value.with_flags().startswith(flags)


def test_the_defaults_and_the_usual_sgd_recipe_pass():
    TrainConfig().validate()
    TrainConfig(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="step", step_epochs=30,
                gamma=0.1, patience=5, clip_grad=1.0, warmup_steps=100, max_steps=1000).validate()


def test_the_cli_says_one_line_and_writes_no_run(tmp_path):
    result = CliRunner().invoke(main, ["finetune", "--backbone", "lenet5", "--data", "builtin:digits", "--epochs", "1",
                                       "--clip-grad", "-1", "--out", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "--clip-grad must be positive, not -1.0" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [
    ["predict", "{run}", "--data", "builtin:digits", "--out", "{tmp}/p.csv", "--batch-size", "0"],
    ["evaluate", "{run}", "--batch-size", "-1"],
    ["evaluate", "{run}", "--batch-size", "0"],
])
def test_prediction_and_evaluation_refuse_a_batch_size_below_one(command, tmp_path):
    """torch's DataLoader answers these with a traceback; 0 used to mean the run's own batch size in evaluate."""
    from tltk.train.finetune import DataOptions, FinetuneConfig, finetune

    run = tmp_path / "run"
    finetune(FinetuneConfig(backbone="lenet5", weights="none", data=DataOptions("builtin:digits", classes=["0", "1"]),
                            train=TrainConfig(epochs=1, workers=0)), run)
    args = [part.format(run=run, tmp=tmp_path) for part in command]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "--batch-size must be at least 1" in result.output
    assert not (tmp_path / "p.csv").exists()
