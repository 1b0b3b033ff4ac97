"""Frozen linear probe, 10 epochs: cached backbone features against the backbone on every batch.

Both sides call ``tltk.finetune`` end to end with the same configuration but for
``cache`` (``--no-cache`` on the command line): reading the data, building the model,
training with validation every epoch, a checkpoint after every epoch, the test
evaluation and writing the run directory. The uncached run pushes the training and
validation images through the backbone every epoch; the cached one does so once. Both
evaluate the test split once with the whole network, which bounds the ratio: with the
default 20% test split and 10% validation the backbone work alone shrinks from
10 x 80% + 20% to 80% + 20% of one pass over the data, at most 8.2 times.

Where each run's time goes is printed too: the functions that do each part are timed
in place (``_common.time_spent_in``), the epochs from the run's ``metrics.jsonl``, and
what remains (reading the data, building the model, writing the run directory) is the
run's wall time less all of those.

ResNet-18 is built with seeded random weights (nothing is downloaded); the probe's
accuracy is low for that reason and the same on both sides, which the script checks.

``--test-split 0`` measures the probe alone: no images are held out for a test
evaluation, so the bound from backbone passes is the number of epochs (10x).

``--without-checkpoints`` is a what-if, not a tltk setting: both sides skip the
checkpoint written after every epoch, to show what the runs would cost if checkpoints
were written less often.

``--extraction`` measures one part alone: the cache's extraction of the training and
validation features in passes of ``tltk.train.cache.PASS_INPUT_BYTES`` of images
(the default) against one pass per training batch, on the same model and loader.

A warm-up round runs both sides for one epoch (imports and first-call costs), untimed.

Goal: 95% of that bound (the end-to-end speed-up divided by the bound from backbone
passes) at every input size. ``--input-size`` takes several sizes (``--input-size 32 64
128``): each is measured in turn, and a table of the speed-up, the bound and the share
of it reached at every size ends the output.

Run: ``python benchmarks/bench_probe_cache.py`` (about 3 minutes on 2 cores; with
``--input-size 64`` about 7, 128 about 25);
``python benchmarks/bench_probe_cache.py --extraction --repeats 7`` (about a minute).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    add_common_arguments, interleave, machine_line, median_ratio, ratio_range, set_threads, time_spent_in,
)

from tltk.train.finetune import DataOptions, FinetuneConfig, finetune
from tltk.rundir import read_config, read_metrics
from tltk.train.trainer import TrainConfig

EXTRACTION = "feature extraction (backbone, once)"
TEST = "test evaluation (whole network)"
# The parts of a run timed where they are done, in the order a run does them.
TIMED = {
    EXTRACTION: "tltk.train.cache:FeatureCache.extract",
    "checkpoints (one per epoch)": "tltk.train.checkpoint:save_checkpoint",
    TEST: "tltk.train.finetune:evaluate_model",
    "curves (loss, metrics, lr PNGs)": "tltk.train.finetune:write_curves",
}
EPOCHS = "epochs: training + validation"
REST = "everything else (data, model, run dir)"
TOTAL = "end to end"
CASES = {"uncached": "uncached (--no-cache)", "cached": "cached (default)"}
GOAL_SHARE = 0.95  # of the bound that the backbone passes a run must still make set on the speed-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--input-size", type=int, nargs="+", default=[32],
                        help="input size(s) in pixels, each measured in turn [%(default)s]")
    parser.add_argument("--data", default="builtin:digits")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--test-split", type=float, default=0.2,
                        help="share held out as the test split [%(default)s, tltk's default]; 0: the probe alone, "
                             "without the test evaluation both sides make")
    parser.add_argument("--extraction", action="store_true",
                        help="time only the feature extraction: joined passes vs one pass per batch")
    parser.add_argument("--without-checkpoints", action="store_true",
                        help="what-if, not a tltk setting: both sides skip writing the per-epoch checkpoints")
    add_common_arguments(parser, repeats=3)
    args = parser.parse_args()
    set_threads(args.threads)
    print(machine_line())
    if args.without_checkpoints:
        skip_checkpoints()
    reached: dict[int, tuple[float, float, float, float]] = {}
    for size in args.input_size:
        if args.extraction:
            compare_extraction_passes(args, size)
        else:
            reached[size] = measure_probe(args, size)
    if len(reached) > 1:
        print_reached(reached)


def measure_probe(args: argparse.Namespace, input_size: int) -> tuple[float, float, float, float]:
    """Both sides at one input size; (end-to-end speed-up, bound from backbone passes, machine load at the
    start, speed-up in CPU time)."""
    load = os.getloadavg()[0]
    summaries: dict[str, dict[str, Any]] = {}
    fit_seconds: dict[str, list[float]] = {name: [] for name in CASES}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in CASES}  # of this process: one thread, no workers
    parts: dict[str, list[dict[str, float]]] = {name: [] for name in CASES}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:

        def probe(name: str, epochs: int = args.epochs) -> None:
            config = FinetuneConfig(
                backbone=args.backbone, weights="none", head="linear", strategy="freeze",
                data=DataOptions(args.data, test_split=args.test_split), input_size=input_size,
                train=TrainConfig(epochs=epochs, batch_size=args.batch_size, cache=name == "cached"),
            )
            out = Path(tmp) / name
            started, cpu_started = time.perf_counter(), time.process_time()
            with time_spent_in(TIMED) as spent:
                summaries[name] = finetune(config, out, overwrite=True).summary
            total = time.perf_counter() - started
            cpu_seconds[name].append(time.process_time() - cpu_started)
            fit_seconds[name].append(summaries[name]["seconds"])
            parts[name].append(breakdown(spent, out, total))
            sizes.update(read_config(out)["data"]["sizes"])

        for name in CASES:  # warm-up: imports, first-call costs and the data, at one epoch (not timed)
            probe(name, epochs=1)
        seconds = interleave({CASES[name]: (lambda n=name: probe(n)) for name in CASES}, args.repeats, warmup=False)
    uncached, cached = seconds[CASES["uncached"]], seconds[CASES["cached"]]
    fit_uncached, fit_cached = fit_seconds["uncached"][-args.repeats:], fit_seconds["cached"][-args.repeats:]
    check_same_accuracy(summaries)

    print(f"{args.backbone} at {input_size}px, frozen, linear head, {args.epochs} epochs, batch {args.batch_size}, "
          f"{args.data} ({sizes['train']} train / {sizes['val']} val / {sizes['test']} test images); "
          f"feature cache: {summaries['cached']['feature_cache']}")
    for name, values in seconds.items():
        print(f"  {name:<24} median {statistics.median(values):7.2f} s end to end")
    for split, accuracy in compared_accuracies(summaries).items():
        print(f"  {split} accuracy: uncached {accuracy['uncached']:.4f}, cached {accuracy['cached']:.4f}")
    medians = {name: median_parts(parts[name][-args.repeats:]) for name in CASES}
    print_breakdown(medians)
    print(f"speed-up of training alone (fit, extraction and checkpoints included): "
          f"{median_ratio(fit_uncached, fit_cached):.2f}x ({ratio_range(fit_uncached, fit_cached)})")
    speed_up = median_ratio(uncached, cached)
    print(f"speed-up, end to end: {speed_up:.2f}x ({ratio_range(uncached, cached)}; goal: at least 8x)")
    cpu_uncached, cpu_cached = cpu_seconds["uncached"][-args.repeats:], cpu_seconds["cached"][-args.repeats:]
    cpu_speed_up = median_ratio(cpu_uncached, cpu_cached)
    print(f"the same in CPU time of this process (one thread, no worker processes; less moved by other jobs): "
          f"{cpu_speed_up:.2f}x ({ratio_range(cpu_uncached, cpu_cached)}; medians {statistics.median(cpu_uncached):.2f} "
          f"and {statistics.median(cpu_cached):.2f} CPU-s)")
    bound = print_bounds(medians, sizes, args.epochs)
    print(f"share of the bound reached: {speed_up / bound:.1%}, in CPU time {cpu_speed_up / bound:.1%} "
          f"(goal: at least {GOAL_SHARE:.0%}; load {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)")
    return speed_up, bound, load, cpu_speed_up


def print_reached(reached: dict[int, tuple[float, float, float, float]]) -> None:
    print(f"{'input size':>10} {'speed-up':>9} {'bound':>7} {'share':>7}  met ({GOAL_SHARE:.0%} of the bound)  load  "
          f"share in CPU time")
    for size, (speed_up, bound, load, cpu_speed_up) in reached.items():
        share = speed_up / bound
        print(f"{size:>8}px {speed_up:8.2f}x {bound:6.2f}x {share:7.1%}  {'yes' if share >= GOAL_SHARE else 'no':<26} "
              f"{load:4.1f}  {cpu_speed_up / bound:7.1%}")


def breakdown(spent: dict[str, float], out: Path, total: float) -> dict[str, float]:
    """One run's seconds by part; the parts add up to ``total``."""
    epochs = sum(row["seconds"] for row in read_metrics(out) if row["kind"] == "epoch")
    row = dict(spent) | {EPOCHS: epochs}
    row[REST] = total - sum(row.values())
    row[TOTAL] = total
    return row


def median_parts(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each part's median over the repeats (medians of parts need not add up to the median total)."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def print_breakdown(medians: dict[str, dict[str, float]]) -> None:
    print(f"  {'where the time goes (medians, s)':<42} {'uncached':>9} {'cached':>9}")
    for key in [*TIMED, EPOCHS, REST, TOTAL]:
        print(f"    {key:<40} {medians['uncached'][key]:9.2f} {medians['cached'][key]:9.2f}")


def print_bounds(medians: dict[str, dict[str, float]], sizes: dict[str, int], epochs: int) -> float:
    """What keeps the end-to-end ratio where it is, in arithmetic on the figures above;
    returns the bound that backbone passes alone set."""
    seen = sizes["train"] + sizes["val"]
    ceiling = (epochs * seen + sizes["test"]) / (seen + sizes["test"])
    print(f"ceiling from backbone passes alone: ({epochs} x {seen} + {sizes['test']}) / ({seen} + {sizes['test']}) "
          f"images = {ceiling:.2f}x")
    shared = [key for key in TIMED if key != EXTRACTION] + [REST]
    target = medians["uncached"][TOTAL] / 8
    fixed = sum(medians["cached"][key] for key in shared)
    print(f"8x needs the cached run within {medians['uncached'][TOTAL]:.2f} / 8 = {target:.2f} s; it spent {fixed:.2f} s "
          f"on work the uncached run does alike (checkpoints, test evaluation, curves, the rest) and "
          f"{medians['cached'][EXTRACTION]:.2f} s extracting")
    print_gap(medians, seen, epochs, ceiling)
    return ceiling


def print_gap(medians: dict[str, dict[str, float]], seen: int, epochs: int, ceiling: float) -> None:
    """The share of the bound split in two: how close the backbone passes themselves come
    to it (the extraction's speed per image against an uncached epoch's), and what the
    work outside the backbone passes, which the bound leaves out, costs each side."""
    uncached, cached = medians["uncached"], medians["cached"]
    passes_uncached = uncached[EPOCHS] + uncached[TEST]
    passes_cached = cached[EXTRACTION] + cached[TEST]
    print(f"backbone passes alone: uncached {passes_uncached:.2f} s (epochs and test evaluation), cached "
          f"{passes_cached:.2f} s (extraction and test evaluation): {passes_uncached / passes_cached:.2f}x, "
          f"{passes_uncached / passes_cached / ceiling:.1%} of the bound; per image seen in training an uncached "
          f"epoch took {1000 * uncached[EPOCHS] / (epochs * seen):.2f} ms, the extraction "
          f"{1000 * cached[EXTRACTION] / seen:.2f} ms")
    print(f"outside the backbone passes: uncached {uncached[TOTAL] - passes_uncached:.2f} s, cached "
          f"{cached[TOTAL] - passes_cached:.2f} s (of which the head's {epochs} epochs {cached[EPOCHS]:.2f} s); "
          f"{GOAL_SHARE:.0%} of the bound needs the cached run within "
          f"{uncached[TOTAL] / (GOAL_SHARE * ceiling):.2f} s, it took {cached[TOTAL]:.2f} s")


def skip_checkpoints() -> None:
    """Both sides write no per-epoch checkpoint: what the runs would cost if checkpoints
    were written less often. tltk itself has no such setting; the figures are labelled."""
    import tltk.train.checkpoint

    tltk.train.checkpoint.save_checkpoint = lambda run_dir, *args, **kwargs: Path(run_dir)
    print("WHAT-IF: per-epoch checkpoints are not written on either side (not how tltk runs)")


def compare_extraction_passes(args: argparse.Namespace, input_size: int) -> None:
    """FeatureCache.extract over the run's training and validation images, the way the
    trainer calls it (loader at the training batch size, channels-last, inference mode)."""
    from contextlib import nullcontext

    import torch

    from tltk.data import ImageDataset, build_transforms
    from tltk.model import ModelSpec, build_model
    from tltk.train.cache import PASS_INPUT_BYTES, FeatureCache
    from tltk.runtime import batch_to, make_loader

    data = DataOptions(args.data).load()
    torch.manual_seed(0)
    model = build_model(ModelSpec(args.backbone, "linear", data.num_classes, weights="none")).eval()
    model.to(memory_format=torch.channels_last)
    pre = model.preprocessing
    size = (input_size, input_size)
    images = ImageDataset(data.train + data.val, build_transforms(size, pre.mean, pre.std, "none", train=False),
                          data.arrays)
    cpu = torch.device("cpu")
    outputs: dict[str, torch.Tensor] = {}
    cpu_seconds: dict[str, list[float]] = {}

    def extract(name: str, pass_bytes: int) -> None:
        started = time.process_time()  # one thread: the CPU time it took, whatever the neighbours did
        loader = make_loader(images, batch_size=args.batch_size, shuffle=False, workers=0, device=cpu)
        with FeatureCache(len(images), 2**40, pass_bytes=pass_bytes) as store:
            split = store.extract(model, loader, len(images), lambda x: batch_to(x, cpu, True), nullcontext)
        outputs[name] = split.features
        cpu_seconds.setdefault(name, []).append(time.process_time() - started)

    per_batch = f"one pass per batch of {args.batch_size}"
    joined = f"passes of {PASS_INPUT_BYTES / 2**20:g} MiB (default)"
    seconds = interleave({per_batch: lambda: extract(per_batch, 0), joined: lambda: extract(joined, PASS_INPUT_BYTES)},
                         args.repeats)
    print(f"{args.backbone} at {input_size}px, {len(images)} images ({args.data} train + val), "
          f"loader batch {args.batch_size}")
    for name, values in seconds.items():
        print(f"  {name:<34} median {statistics.median(values):6.2f} s ({len(images) / statistics.median(values):6.0f} images/s)")
    difference = float((outputs[per_batch] - outputs[joined]).abs().max())
    print(f"  largest difference between the two sets of features: {difference:.2g} "
          f"(largest feature {float(outputs[per_batch].abs().max()):.3g})")
    print(f"speed-up of extraction: {median_ratio(seconds[per_batch], seconds[joined]):.2f}x "
          f"({ratio_range(seconds[per_batch], seconds[joined])})")
    cpu_per_batch, cpu_joined = cpu_seconds[per_batch][-args.repeats:], cpu_seconds[joined][-args.repeats:]
    print(f"  the same in CPU time of the process: {median_ratio(cpu_per_batch, cpu_joined):.2f}x "
          f"({ratio_range(cpu_per_batch, cpu_joined)})")


def compared_accuracies(summaries: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The last epoch's validation accuracy and, where there is a test split, the test accuracy of both runs."""
    compared = {"validation": {name: summary["final"]["val_accuracy"] for name, summary in summaries.items()}}
    if all("test" in summary for summary in summaries.values()):
        compared["test"] = {name: summary["test"]["accuracy"] for name, summary in summaries.items()}
    return compared


def check_same_accuracy(summaries: dict[str, dict[str, Any]]) -> None:
    """The cache must not change results; a benchmark of a broken cache is no benchmark."""
    for split, accuracy in compared_accuracies(summaries).items():
        if abs(accuracy["uncached"] - accuracy["cached"]) > 1e-6:
            raise SystemExit(f"cached and uncached runs disagree on {split} accuracy: {accuracy}")


if __name__ == "__main__":
    main()
