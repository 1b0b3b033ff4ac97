"""How a ``--data`` spec becomes train / val / test: the one carrier of the data settings.

A run records these (config.json's "data"), so evaluation, prediction and extraction see
the same split; the command line's data options are derived from the fields here (their
flags, help and defaults), so each default is stated once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from tltk.data.samples import DataSplits
from tltk.data.specs import absolute_path, absolute_spec, load_data
from tltk.settings import described, setting


@dataclass
class DataOptions:
    """How a ``--data`` spec becomes train/val/test: stored so evaluation sees the same split."""

    spec: str
    image_root: str | None = setting(None, "Folder that csv: file names are relative to.")
    val_split: float = setting(0.1, "Fraction of train held out for validation.")
    test_split: float = setting(0.2, "Fraction held out for test where the data has no test split.")
    seed: int = 0  # the split's seed: the run's --seed
    strict: bool = setting(False, "Stop at the first image that cannot be decoded instead of skipping it.")
    classes: list[str] | None = setting(None, "Comma-separated class names to keep, e.g. 0,1,2,3,4.")
    train_per_class: int | None = setting(None, "Keep at most N training images per class.")
    difficult: str = setting("ignore", "VOC objects marked difficult, COCO crowds: ignored when scoring, or counted.",
                              flag="--voc-difficult", choices=("ignore", "positive", "negative"))
    image_column: str | None = setting(None, "hf: the column of images [the one Image column].")
    label_column: str | None = setting(None, "hf: the column of labels [the one ClassLabel column].")
    spec_as_typed: str | None = None  # the --data the user typed, for display; ``spec`` is what loads

    def load(self) -> DataSplits:
        return load_data(
            self.spec, image_root=self.image_root, val_split=self.val_split, test_split=self.test_split,
            seed=self.seed, strict=self.strict, classes=self.classes, train_per_class=self.train_per_class,
            difficult=self.difficult, image_column=self.image_column, label_column=self.label_column,
        )

    def with_absolute_paths(self) -> "DataOptions":
        """These options with the data's path and ``image_root`` absolute, the spec as typed
        kept beside: what a run records, so that it is evaluated, predicted and resumed from
        any working directory."""
        return replace(
            self, spec=absolute_spec(self.spec), spec_as_typed=self.spec_as_typed or self.spec,
            image_root=absolute_path(self.image_root) if self.image_root is not None else None,
        )



# The settings that choose a run's images: every field but the display-only spec_as_typed.
DATA_SETTINGS: tuple[str, ...] = tuple(f.name for f in fields(DataOptions) if f.name != "spec_as_typed")
# The settings the command line offers as options (the spec is --data, the seed is the run's --seed).
DATA_OPTIONS: tuple[str, ...] = tuple(f.name for f in described(DataOptions))
