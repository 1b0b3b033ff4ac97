"""What a deployed model file says about itself: classes, preprocessing, task, data settings.

A model file is useful without tltk only if it carries what the run directory's
config.json would have told: which output column is which class, how images are resized
and normalised, whether the outputs are softmax or per-class sigmoid probabilities. Those
travel as string key/value pairs, the form both ONNX (``metadata_props``) and TorchScript
(an extra file in the archive) can hold, each value JSON where it is not a plain word.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from tltk import __version__
from tltk.backbones.base import Preprocessing
from tltk.data.options import DATA_SETTINGS
from tltk.errors import DataError

# The name of the extra file a TorchScript archive carries the card in.
TORCHSCRIPT_CARD = "tltk.json"
# The output is probabilities, not logits: what a deployment compares against a threshold.
OUTPUT = "probabilities"
INPUT = "images"
REQUIRED_KEYS = ("class_names", "preprocessing", "task")


@dataclass(frozen=True)
class ModelCard:
    """A deployed model's own description, read back exactly as written."""

    class_names: list[str]
    preprocessing: Preprocessing
    task: str
    backbone: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def to_strings(self) -> dict[str, str]:
        """The card as the string pairs a model file stores."""
        return {
            "class_names": json.dumps(self.class_names),
            "preprocessing": json.dumps(self.preprocessing.to_dict()),
            "task": self.task,
            "output": OUTPUT,
            "backbone": self.backbone,
            "data": json.dumps(self.data),
            "tltk_version": __version__,
        }

    @classmethod
    def from_strings(cls, pairs: Mapping[str, str], where: str) -> ModelCard:
        """Read a card back; a file without one was not written by ``tltk export``."""
        missing = [key for key in REQUIRED_KEYS if key not in pairs]
        if missing:
            raise DataError(f"{where} carries no {missing[0]} in its metadata, so it was not written by tltk export; "
                            f"export the run again with `tltk export RUN --format onnx --out FILE`.")
        try:
            return cls(
                class_names=[str(name) for name in json.loads(pairs["class_names"])],
                preprocessing=Preprocessing.from_dict(json.loads(pairs["preprocessing"])),
                task=str(pairs["task"]),
                backbone=str(pairs.get("backbone", "")),
                data=dict(json.loads(pairs.get("data", "{}"))),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{where} has unreadable tltk metadata ({type(exc).__name__}: {exc}); "
                            f"export the run again.") from exc

    @classmethod
    def of_run(cls, config: Mapping[str, Any]) -> ModelCard:
        """The card of a run, from its config.json: the data settings (seed, fractions, class
        filter) come along so that a split of the same data gives the same images."""
        data = {key: value for key, value in config.get("data", {}).items() if key in DATA_SETTINGS}
        return cls(
            class_names=list(config["class_names"]),
            preprocessing=Preprocessing.from_dict(config["preprocessing"]),
            task=str(config.get("train", {}).get("task", "multiclass")),
            backbone=str(config.get("model", {}).get("backbone", "")),
            data=data,
        )
