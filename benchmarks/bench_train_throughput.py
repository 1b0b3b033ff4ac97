"""Training images/s of `tltk.finetune` (decoded-image cache) against the compute-only bound.

The bound is the same model doing nothing but training steps on one batch held in memory:
forward, loss, backward and an AdamW step, with the run's precision (``--precision auto``
as resolved here), channels-last memory and batch size, on the same number of threads. No
loading, no augmentation, no logging. tltk's side is a whole ``finetune`` run on a folder
of CIFAR-sized JPEGs (32 x 32, written once under the system's temporary directory) at the
working resolution (64 px by default, ``--augment standard``); its images/s is counted
from the end of its first step to the end of its last (a callback notes the times), so it
holds everything a step costs in the run (gathering and augmenting the batch, the step,
the metrics log) and not the run's fixed costs (listing the data, decoding it once,
validation, the curves). The one-time decode is timed and printed on its own.

Both sides take turns within each repeat; the ratio is the median of per-repeat ratios.

Run: ``python benchmarks/bench_train_throughput.py`` (2,000 images, ResNet-18 at 64 px, batch
64, 2 repeats: about 5 minutes on 2 idle cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _clock import StepClock
from _common import machine_line, write_jpeg_folder

from tltk.model import ModelSpec, build_model
from tltk.runtime import autocast, precision_name, resolve_device, resolve_precision
from tltk.train.finetune import DataOptions, FinetuneConfig, finetune
from tltk.train.trainer import TrainConfig


def tltk_run(root: Path, out: Path, args: argparse.Namespace, threads: int | None) -> tuple[StepClock, dict]:
    clock = StepClock()
    train = TrainConfig(epochs=1, batch_size=args.batch_size, augment=args.augment, device="cpu",
                        precision=args.precision, threads=threads, max_steps=args.steps)
    data = DataOptions(f"folder:{root}", val_split=0.05, test_split=0.0)
    config = FinetuneConfig(backbone=args.backbone, data=data, weights="none", input_size=args.input_size, train=train)
    result = finetune(config, out, overwrite=True, callbacks=[clock], checkpoint_interval=3600)
    return clock, result.summary


def compute_bound(args: argparse.Namespace, steps: int) -> StepClock:
    """Images/s of training steps alone, on one in-memory batch."""
    torch.manual_seed(0)
    model = build_model(ModelSpec(args.backbone, "linear", 10, {}, "none"))
    device = resolve_device("cpu")
    dtype = resolve_precision(args.precision, device)
    model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size).to(memory_format=torch.channels_last)
    targets = torch.randint(0, 10, (args.batch_size,))
    loss_fn = torch.nn.CrossEntropyLoss()
    clock = StepClock()
    for _ in range(steps):
        with autocast(device, dtype):
            loss = loss_fn(model(images).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clock.tick()
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="JPEGs in the folder (10 classes)")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--augment", default="standard", choices=("none", "light", "standard"))
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--steps", type=int, default=None, help="steps per run [one epoch]")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of both sides [tltk's own choice, which the bound then uses]")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--folder", default=None, help="where the JPEGs are made [a folder in the system's temp dir]")
    args = parser.parse_args()
    os.environ.setdefault("TLTK_CACHE", str(Path(tempfile.gettempdir()) / "tltk-bench-cache"))
    print(machine_line())
    root = Path(args.folder or Path(tempfile.gettempdir()) / "tltk-bench-cifar-like")
    write_jpeg_folder(root, classes=10, per_class=args.images // 10, size=(32, 32))
    out = Path(tempfile.mkdtemp(prefix="tltk-bench-run-"))
    try:
        measure(root, out, args)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def measure(root: Path, out: Path, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    _, summary = tltk_run(root, out, args, args.threads)  # decodes the images once (not timed below)
    print(f"first run (decodes {args.images} images once): {time.perf_counter() - started:.1f} s, "
          f"image cache {summary['image_cache']}, threads {summary['threads']}, precision {summary['precision']}")
    threads = args.threads or summary["threads"]
    steps = summary["steps"]
    tltk_clocks: list[StepClock] = []
    bound_clocks: list[StepClock] = []
    for repeat in range(args.repeats):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            cases = [lambda: bound_clocks.append(compute_bound(args, steps)),
                     lambda: tltk_clocks.append(tltk_run(root, out, args, threads)[0])]
            for case in (cases if repeat % 2 == 0 else cases[::-1]):
                case()
        finally:
            torch.set_num_threads(before)
        print(f"  repeat {repeat + 1}/{args.repeats}: tltk {tltk_clocks[-1].images_per_second(args.batch_size):.1f} "
              f"images/s ({tltk_clocks[-1].images_per_cpu_second(args.batch_size):.1f} per CPU-second), compute bound "
              f"{bound_clocks[-1].images_per_second(args.batch_size):.1f} "
              f"({bound_clocks[-1].images_per_cpu_second(args.batch_size):.1f})", flush=True)
    print(f"{args.backbone} at {args.input_size} px, batch {args.batch_size}, --augment {args.augment}, "
          f"{precision_name(resolve_precision(args.precision, torch.device('cpu')))}, channels-last, {threads} thread(s), "
          f"{steps} steps per run")
    for what, measure in (("images/s (wall clock)", StepClock.images_per_second),
                          ("images per CPU-second", StepClock.images_per_cpu_second)):
        ours = [measure(clock, args.batch_size) for clock in tltk_clocks]
        bound = [measure(clock, args.batch_size) for clock in bound_clocks]
        ratios = [a / b for a, b in zip(ours, bound)]
        print(f"  {what}: tltk finetune (decoded-image cache) median {statistics.median(ours):.1f}, compute-only "
              f"bound {statistics.median(bound):.1f}; ratio {statistics.median(ratios):.3f} "
              f"(per-repeat range {min(ratios):.3f}-{max(ratios):.3f}; goal at least 0.9)")


if __name__ == "__main__":
    main()
