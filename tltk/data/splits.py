"""Turning a ``RawDataset`` into train/val/test: class filtering, seeded stratified carves,
and per-class limits.

Every random choice comes from a numpy Generator seeded from ``seed`` and a fixed
purpose number, so the same seed gives the same splits, and changing ``val_split`` does
not change which samples are in the test set. Candidates are ordered by id before
shuffling, so the splits do not depend on file-system listing or CSV row order.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from tltk.data.samples import RawDataset, Sample, positives
from tltk.errors import DataError

# Fixed offsets mixed into the seed, one per random decision.
_TEST_CARVE, _VAL_CARVE, _PER_CLASS = 1, 2, 3


def filter_classes(raw: RawDataset, classes: Sequence[str]) -> RawDataset:
    """Keep only ``classes``; targets are re-indexed in the dataset's original class order."""
    wanted = list(dict.fromkeys(classes))
    unknown = [name for name in wanted if name not in raw.class_names]
    if unknown:
        raise DataError(
            f"Unknown class{'es' if len(unknown) > 1 else ''} {', '.join(repr(n) for n in unknown)} "
            f"in --classes for {raw.root}; known classes: {', '.join(raw.class_names)}."
        )
    kept = [name for name in raw.class_names if name in wanted]
    new_index = {raw.class_names.index(name): i for i, name in enumerate(kept)}
    splits = {split: _kept_samples(samples, new_index) for split, samples in raw.splits.items()}
    problems = {name: problem for name, problem in raw.class_problems.items() if name in kept}
    return RawDataset(kept, splits, raw.root, arrays=raw.arrays, skipped=list(raw.skipped), class_problems=problems)


def _kept_samples(samples: Sequence[Sample], new_index: dict[int, int]) -> list[Sample]:
    """Multi-class: samples of kept classes, re-indexed. Multi-label: every sample, kept columns."""
    kept: list[Sample] = []
    columns = sorted(new_index, key=new_index.__getitem__)
    for s in samples:
        if isinstance(s.target, tuple):
            kept.append(Sample(s.source, tuple(s.target[c] for c in columns), s.id))
        elif s.target in new_index:
            kept.append(Sample(s.source, new_index[s.target], s.id))
    return kept


def check_classes(raw: RawDataset, *, filtered: bool = False) -> None:
    """At least two classes, each with at least one sample and no problem its reader found;
    otherwise nothing can be learnt. Run after ``filter_classes``, so that a class left out
    with ``--classes`` is never held against the data."""
    samples = raw.all_samples()
    if not samples:
        raise DataError(f"No images found in {raw.root}; check the --data path and format.")
    if len(raw.class_names) < 2:
        found = f"found {len(raw.class_names)} class{'' if len(raw.class_names) == 1 else 'es'}"
        listed = f" ({', '.join(raw.class_names)})" if raw.class_names else ""
        where = " after --classes" if filtered else ""
        raise DataError(
            f"{found[0].upper()}{found[1:]}{listed} in {raw.root}{where}; a classifier needs at least 2."
        )
    for name in raw.class_names:
        if name in raw.class_problems:
            raise DataError(raw.class_problems[name])
    present = {index for sample in samples for index in positives(sample.target)}
    empty = [name for i, name in enumerate(raw.class_names) if i not in present]
    if empty:
        raise DataError(
            f"Class '{empty[0]}' has no samples in {raw.root}; add samples or leave it out with --classes."
        )


def make_splits(
    raw: RawDataset, *, val_split: float, test_split: float, seed: int
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(train, val, test): the dataset's own splits, carving whichever are missing.

    Test is carved first from the data (``all``, or ``train`` when only that exists),
    then val from what is left for training. Both carves are stratified by class. A
    dataset without training samples (the VOC test set alone, say) has an empty train
    split: it can still be evaluated and predicted, and training on it says so.
    """
    check_fraction(val_split, "--val-split")
    check_fraction(test_split, "--test-split")
    if "all" in raw.splits:
        train = raw.splits["all"]
        val, test = None, None
    else:
        train = raw.splits.get("train", [])
        val, test = raw.splits.get("val"), raw.splits.get("test")
    if test is None:
        train, test = stratified_carve(train, test_split, _rng(seed, _TEST_CARVE))
    if val is None:
        train, val = stratified_carve(train, val_split, _rng(seed, _VAL_CARVE))
    return train, val, test


def stratified_carve(
    samples: Sequence[Sample], fraction: float, rng: np.random.Generator
) -> tuple[list[Sample], list[Sample]]:
    """(kept, carved) with about ``fraction`` of each class carved out, at random.

    Each class with at least two samples gives at least one sample and keeps at least
    one, so small classes are still represented on both sides (a plain rounding would
    leave them out of val entirely). Both lists keep the input order.
    """
    if fraction <= 0:
        return list(samples), []
    carved_ids: set[str] = set()
    for members in _by_class(samples).values():
        count = len(members)
        if count < 2:
            continue
        n = min(count - 1, max(1, int(np.floor(fraction * count + 0.5))))
        order = rng.permutation(count)
        carved_ids.update(members[i].id for i in order[:n])
    kept = [s for s in samples if s.id not in carved_ids]
    carved = [s for s in samples if s.id in carved_ids]
    return kept, carved


def limit_per_class(samples: Sequence[Sample], limit: int, seed: int) -> list[Sample]:
    """At most ``limit`` randomly chosen samples per class (the small labelled set)."""
    if limit < 1:
        raise DataError(f"--train-per-class must be at least 1, got {limit}.")
    rng = _rng(seed, _PER_CLASS)
    chosen: set[str] = set()
    for members in _by_class(samples).values():
        order = rng.permutation(len(members))
        chosen.update(members[i].id for i in order[:limit])
    return [s for s in samples if s.id in chosen]


def _by_class(samples: Sequence[Sample]) -> dict[int, list[Sample]]:
    """Samples grouped by target, classes in index order, members sorted by id."""
    groups: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        groups[stratum(sample.target)].append(sample)
    return {target: sorted(groups[target], key=lambda s: s.id) for target in sorted(groups)}


def stratum(target: int | tuple[int, ...]) -> int:
    """The group a sample is stratified in: its class, or its first positive class (-1: none)."""
    if isinstance(target, tuple):
        return next((i for i, label in enumerate(target) if label == 1), -1)
    return target


def resolve_ignored(samples: Sequence[Sample], mode: str) -> list[Sample]:
    """Multi-label labels of -1 (VOC difficult): kept as ignored, or counted positive / negative."""
    if mode == "ignore":
        return list(samples)
    if mode not in ("positive", "negative"):
        raise DataError(f"--voc-difficult '{mode}' is not one of ignore, positive, negative.")
    value = 1 if mode == "positive" else 0
    return [
        Sample(s.source, tuple(value if v == -1 else v for v in s.target), s.id) if isinstance(s.target, tuple) else s
        for s in samples
    ]


def _rng(seed: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([purpose, int(seed) % 2**64])


def check_fraction(value: float, option: str) -> None:
    """A split size is a fraction of the data; 1.0 would leave nothing to train on."""
    if not 0.0 <= value < 1.0:
        raise DataError(f"{option} must be a fraction in [0, 1), got {value}.")
