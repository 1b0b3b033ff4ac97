"""Settings stated once: every command's options that name a setting take its default,
choices and help from the config dataclass that declares it, and library errors name the
setting while the command line shows the flag."""

from __future__ import annotations

from dataclasses import fields

import click
import pytest

from tltk.cli import main
from tltk.cli.core import finetune_config
from tltk.data.options import DATA_OPTIONS, DataOptions
from tltk.settings import described, flag_of
from tltk.train.config import TrainConfig

TRAINING = {f.name: f for f in described(TrainConfig)}
DATA = {flag_of(f): f for f in described(DataOptions)}
STARTS_A_RUN = {"finetune", "sweep"}  # commands whose training options are the run's settings themselves


def every_option(group: click.Group = main, path: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from every_option(command, (*path, name))
            continue
        for option in command.params:
            if isinstance(option, click.Option):
                yield (*path, name), option


OPTIONS = list(every_option())


def finetune_context(name: str, args: list[str]) -> click.Context:
    """finetune's options parsed as `tltk finetune` parses them: under tltk's own context, whose
    settings (help option names) the command keeps from then on."""
    return main.commands[name].make_context(name, args, parent=click.Context(main, info_name="tltk",
                                                                            **main.context_settings))


def choices_of(option: click.Option) -> tuple[str, ...] | None:
    return tuple(option.type.choices) if isinstance(option.type, click.Choice) else None


def test_the_walk_sees_the_commands_and_the_settings_it_checks() -> None:
    paths = {path for path, _ in OPTIONS}
    assert {("finetune",), ("evaluate",), ("predict",), ("extract",), ("sweep", "lr")} <= paths
    named = {option.name for path, option in OPTIONS if path == ("finetune",)}
    assert set(TRAINING) <= named  # every training setting is an option of finetune


@pytest.mark.parametrize("path,option", [(p, o) for p, o in OPTIONS if o.name in TRAINING],
                         ids=lambda v: " ".join(v) if isinstance(v, tuple) else v.opts[0])
def test_a_training_option_takes_its_default_and_choices_from_train_config(path, option) -> None:
    setting = TRAINING[option.name]
    if path[0] in STARTS_A_RUN:
        assert option.default == setting.default and option.help == setting.metadata["help"]
    else:  # on a command that works on a finished run, "not given" may mean the run's own
        assert option.default in (None, setting.default), (path, option.name)
    if setting.metadata["choices"] and choices_of(option) is not None:
        assert choices_of(option) == setting.metadata["choices"]


@pytest.mark.parametrize("path,option", [(p, o) for p, o in OPTIONS if o.opts[0] in DATA],
                         ids=lambda v: " ".join(v) if isinstance(v, tuple) else v.opts[0])
def test_a_data_option_is_not_given_unless_typed_and_shows_the_default_of_data_options(path, option) -> None:
    setting = DATA[option.opts[0]]
    assert option.default is None  # a run's recorded setting holds; a new run takes DataOptions's default
    assert option.help.startswith(setting.metadata["help"])
    if setting.default not in (None, False):
        assert f"[{setting.default}]" in option.help
    assert choices_of(option) == setting.metadata["choices"]


def test_a_new_run_without_data_options_takes_every_default_of_data_options() -> None:
    context = finetune_context("finetune", ["--backbone", "lenet5", "--data", "builtin:digits",
                                                                  "--out", "x"])
    config = finetune_config(context.params)
    assert config.data == DataOptions("builtin:digits")
    given = finetune_context("finetune", ["--backbone", "lenet5", "--data", "builtin:digits",
                                                                "--out", "x", "--val-split", "0.3", "--classes", "1,2",
                                                                "--voc-difficult", "positive"])
    assert finetune_config(given.params).data == DataOptions("builtin:digits", val_split=0.3, classes=["1", "2"],
                                                             difficult="positive")


def test_every_data_setting_but_the_spec_and_seed_is_offered() -> None:
    assert set(DATA_OPTIONS) == {f.name for f in fields(DataOptions)} - {"spec", "seed", "spec_as_typed"}


def finetune_args(*extra: str):
    context = finetune_context(
        "finetune", ["--backbone", "lenet5", "--data", "builtin:digits", "--out", "x", *extra])
    return finetune_config(context.params)


def test_head_and_strategy_options_come_from_their_opt_flags_and_the_convenience_flags_alike() -> None:
    config = finetune_args("--head", "mlp", "--head-opt", "hidden=32", "--dropout", "0.2",
                           "--strategy", "freeze-unfreeze", "--strategy-opt", "unfreeze_epoch=2")
    assert config.head_options == {"hidden": 32, "dropout": 0.2}
    assert config.strategy_options == {"unfreeze_epoch": 2}
    assert finetune_args().head_options == {} and finetune_args().strategy_options == {}  # nothing given, nothing set


def test_an_option_given_by_both_flags_is_refused_in_one_sentence() -> None:
    from tltk.errors import TltkError

    with pytest.raises(TltkError, match="--hidden and --head-opt hidden=... both set hidden; give it once"):
        finetune_args("--head", "mlp", "--hidden", "16", "--head-opt", "hidden=32")


def test_a_head_option_the_head_does_not_take_is_refused_before_anything_is_written(tmp_path) -> None:
    from click.testing import CliRunner

    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["finetune", "--backbone", "lenet5", "--weights", "none", "--data",
                                       "builtin:digits", "--head", "linear", "--head-opt", "hidden=128",
                                       "--out", str(out)])
    assert result.exit_code == 2 and "head 'linear' has no option 'hidden'" in result.output
    assert not out.exists()


def test_summary_shows_the_head_and_strategy_options_with_the_values_they_are_built_with() -> None:
    import json

    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["summary", "--backbone", "lenet5", "--head", "mlp", "--head-opt", "hidden=32",
                                       "--strategy", "freeze-unfreeze", "--num-classes", "3", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)["options"]
    assert {o["name"]: o["value"] for o in shown["head"]} == {"hidden": 32, "dropout": 0.5}
    assert {o["name"]: o["value"] for o in shown["strategy"]}["unfreeze_epoch"] == 1  # its default
    assert sum(row["params"] for row in json.loads(result.stdout)["layers"]) == json.loads(result.stdout)["total_params"]
