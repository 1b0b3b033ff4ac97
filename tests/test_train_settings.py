"""Training settings that torch would take and train wrongly with, or refuse with a traceback,
are refused in one sentence that names the option (and nothing is written)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tltk.cli import main
from tltk.errors import TltkError
from tltk.train.trainer import TrainConfig

REFUSED = [
    (dict(momentum=-0.1), "--momentum must be in [0, 1)"),
    (dict(momentum=1.5), "--momentum must be in [0, 1)"),
    (dict(optimizer="sgd", momentum=0.0, nesterov=True), "--nesterov needs --optimizer sgd"),
    (dict(optimizer="adamw", nesterov=True), "--nesterov needs --optimizer sgd"),
    (dict(weight_decay=-1.0), "--weight-decay must be 0 or more"),
    (dict(warmup_steps=-5), "--warmup-steps must be 0 or more"),
    (dict(step_epochs=0), "--step-epochs must be at least 1"),
    (dict(gamma=0.0), "--gamma must be positive"),
    (dict(max_steps=0), "--max-steps must be at least 1"),
    (dict(max_steps=-1), "--max-steps must be at least 1"),
    (dict(patience=0), "--patience must be at least 1"),
    (dict(clip_grad=-1.0), "--clip-grad must be positive"),
    (dict(clip_grad=0.0), "--clip-grad must be positive"),
]


@pytest.mark.parametrize("settings, sentence", REFUSED, ids=[s for _, s in REFUSED])
def test_a_setting_that_would_train_wrongly_is_refused(settings, sentence):
    with pytest.raises(TltkError) as refused:
        TrainConfig(**settings).validate()
    assert str(refused.value).startswith(sentence)


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
