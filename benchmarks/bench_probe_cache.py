"""Frozen linear probe, 10 epochs: cached backbone features against the backbone on every batch.

Both sides call ``tltk.finetune`` end to end with the same configuration but for
``cache`` (``--no-cache`` on the command line): reading the data, building the model,
training with validation every epoch, the test evaluation and writing the run
directory. The uncached run pushes the training and validation images through the
backbone every epoch; the cached one does so once. Both evaluate the test split once
with the whole network, which bounds the ratio: with the default 20% test split and
10% validation the backbone work alone shrinks from 10 x 80% + 20% to 80% + 20% of one
pass over the data, at most 8.2 times.

ResNet-18 is built with seeded random weights (nothing is downloaded); the probe's
accuracy is low for that reason and the same on both sides, which the script checks.

Run: ``python benchmarks/bench_probe_cache.py`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from _common import add_common_arguments, interleave, machine_line, median_ratio, ratio_range, set_threads

from tltk.train.finetune import DataOptions, FinetuneConfig, finetune
from tltk.train.rundir import read_metrics
from tltk.train.trainer import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--data", default="builtin:digits")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    add_common_arguments(parser, repeats=3)
    args = parser.parse_args()
    set_threads(args.threads)
    print(machine_line())

    summaries: dict[str, dict[str, Any]] = {}
    fit_seconds: dict[str, list[float]] = {"uncached": [], "cached": []}
    with tempfile.TemporaryDirectory() as tmp:

        def probe(cache: bool) -> None:
            config = FinetuneConfig(
                backbone=args.backbone, weights="none", head="linear", strategy="freeze",
                data=DataOptions(args.data), input_size=args.input_size,
                train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, cache=cache),
            )
            name = "cached" if cache else "uncached"
            summaries[name] = finetune(config, Path(tmp) / name, overwrite=True).summary
            fit_seconds[name].append(summaries[name]["seconds"])

        cases = {"uncached (--no-cache)": lambda: probe(False), "cached (default)": lambda: probe(True)}
        seconds = interleave(cases, args.repeats)
        epochs_of_cached = sum(row["seconds"] for row in read_metrics(Path(tmp) / "cached") if row["kind"] == "epoch")
    uncached, cached = seconds["uncached (--no-cache)"], seconds["cached (default)"]
    fit_uncached, fit_cached = fit_seconds["uncached"][-args.repeats:], fit_seconds["cached"][-args.repeats:]
    cached_summary = summaries["cached"]
    print(f"{args.backbone} at {args.input_size}px, frozen, linear head, {args.epochs} epochs, batch {args.batch_size}, "
          f"{args.data}; feature cache: {cached_summary['feature_cache']}")
    for name, values in seconds.items():
        print(f"  {name:<24} median {statistics.median(values):7.2f} s end to end")
    print(f"  test accuracy: uncached {summaries['uncached']['test']['accuracy']:.4f}, "
          f"cached {cached_summary['test']['accuracy']:.4f}")
    extraction = cached_summary["seconds"] - epochs_of_cached
    print(f"  cached run, last repeat: feature extraction {extraction:.2f} s, {args.epochs} epochs on features "
          f"{epochs_of_cached:.2f} s, everything else (data, model, test evaluation, run directory, plots) "
          f"{cached[-1] - cached_summary['seconds']:.2f} s")
    print(f"speed-up of training alone (fit): {median_ratio(fit_uncached, fit_cached):.2f}x "
          f"({ratio_range(fit_uncached, fit_cached)})")
    print(f"speed-up, end to end: {median_ratio(uncached, cached):.2f}x ({ratio_range(uncached, cached)}; goal: at least 8x)")


if __name__ == "__main__":
    main()
