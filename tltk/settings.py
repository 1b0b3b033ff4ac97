"""Settings stated once: a config dataclass field carries its default, its choices and the
help text the command line shows, so the options of a command are derived from it rather
than written out again beside it (and drifting from it)."""

from __future__ import annotations

from dataclasses import Field, field, fields
from typing import Any, Callable, Sequence

# Choice lists more than one layer checks against, kept free of torch so the command line can offer them.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CHANNELS_LAST = ("auto", "on", "off")
TASKS = ("multiclass", "multilabel")
AUGMENT_PRESETS = ("none", "light", "standard")
TTA_MODES = ("none", "flip", "flip+crops")  # test-time augmentation (tltk.tta)


def setting(default: Any, help: str = "", *, choices: Sequence[str] | None = None, flag: str | None = None,
            parse: Callable[[str], Any] | None = None) -> Any:
    """A dataclass field with what the command line needs to offer it: ``flag`` when it is
    not ``--`` and the name with dashes (``--cache/--no-cache`` for a switch); ``parse`` reads
    the typed text where the annotation alone cannot (a number or a word), raising
    ``SettingError`` for a value it cannot take."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None,
                                            "flag": flag, "parse": parse})


def described(config: type) -> list[Field[Any]]:
    """The fields of ``config`` that are offered as settings (declared with ``setting``)."""
    return [f for f in fields(config) if "help" in f.metadata]


def flag_of(setting_field: Field[Any]) -> str:
    """The command-line flag of a setting: its own, or ``--`` and its name with dashes."""
    return setting_field.metadata.get("flag") or "--" + setting_field.name.replace("_", "-")
