"""tltk's default intra-op threads and loader workers against the best setting tried, idle and loaded.

Two training workloads, each a short ``tltk.finetune`` on scikit-learn's digits at 32 px
(the decoded-image cache on, as by default, so training has no loader workers):

- ``resnet18``: ResNet-18, batch 64, ``--augment standard``: steps long enough for two
  threads to pay on two free cores;
- ``lenet5``: LeNet-5, batch 16: steps so short that a second thread waiting for a busy
  core costs more than it computes (the "thread cliff").

Each runs with the default (``--threads`` left out: tltk counts the cores that other
processes keep busy when training starts, and takes the rest) and with every fixed
number of threads from 1 to the usable cores. Training images/s is counted from the end
of the first step to the end of the last (``_clock.StepClock``). The whole set runs twice:
with the machine as it is ("idle"), and with a process spinning on one core ("loaded",
``python -c "while True: pass"`` started before the runs and stopped after). For each
workload and condition the script prints default / best (images/s): the goal is at least
0.9 (the default at most 10% slower than the best setting tried).

Cases take turns within each repeat (the first one rotating); figures are medians.

Run: ``python benchmarks/bench_threads.py`` (about 3-4 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from _clock import StepClock
from _common import machine_line

from tltk.runtime import usable_cores
from tltk.train.finetune import DataOptions, FinetuneConfig, finetune
from tltk.train.trainer import TrainConfig

WORKLOADS = {
    "resnet18": {"backbone": "resnet18", "batch_size": 64, "augment": "standard", "steps": 8},
    "lenet5": {"backbone": "lenet5", "batch_size": 16, "augment": "none", "steps": 40},
}


def run(workload: dict, threads: int | None, out: Path) -> tuple[float, int]:
    """Training images/s of one short run, and the threads it trained with."""
    clock = StepClock()
    train = TrainConfig(epochs=1, max_steps=workload["steps"], batch_size=workload["batch_size"],
                        augment=workload["augment"], device="cpu", precision="auto", threads=threads)
    data = DataOptions("builtin:digits", val_split=0.05, test_split=0.0)
    config = FinetuneConfig(backbone=workload["backbone"], data=data, weights="none", input_size=32, train=train)
    result = finetune(config, out, overwrite=True, callbacks=[clock], checkpoint_interval=3600)
    return clock.images_per_second(workload["batch_size"]), int(result.summary["threads"])


@contextmanager
def busy_core(loaded: bool) -> Iterator[None]:
    """A process spinning on one core for the duration (when ``loaded``)."""
    if not loaded:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def measure(workload: dict, settings: list[int | None], repeats: int, out: Path) -> dict[str, tuple[float, list[int]]]:
    speeds: dict[str, list[float]] = {label(s): [] for s in settings}
    chosen: dict[str, list[int]] = {label(s): [] for s in settings}
    run(workload, 1, out)  # warm-up: the decoded images are written once, libraries loaded
    for repeat in range(repeats):
        order = settings[repeat % len(settings):] + settings[:repeat % len(settings)]
        for setting in order:
            speed, threads = run(workload, setting, out)
            speeds[label(setting)].append(speed)
            chosen[label(setting)].append(threads)
    return {name: (statistics.median(values), chosen[name]) for name, values in speeds.items()}


def label(setting: int | None) -> str:
    return "default" if setting is None else f"--threads {setting}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--conditions", nargs="+", default=["idle", "loaded"], choices=["idle", "loaded"])
    args = parser.parse_args()
    os.environ.setdefault("TLTK_CACHE", str(Path(tempfile.gettempdir()) / "tltk-bench-cache"))
    print(machine_line())
    out = Path(tempfile.mkdtemp(prefix="tltk-bench-threads-"))
    try:
        compare(args, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def compare(args: argparse.Namespace, out: Path) -> None:
    settings: list[int | None] = [None, *range(1, usable_cores() + 1)]
    verdicts = []
    for condition in args.conditions:
        with busy_core(condition == "loaded"):
            print(f"{condition} (load average now {os.getloadavg()[0]:.1f})")
            for name in args.workloads:
                results = measure(WORKLOADS[name], settings, args.repeats, out)
                for case, (speed, threads) in results.items():
                    print(f"  {name:<9} {case:<12} {speed:8.1f} images/s   (trained with {sorted(set(threads))} threads)")
                best_case = max((c for c in results if c != "default"), key=lambda c: results[c][0])
                ratio = results["default"][0] / results[best_case][0]
                verdicts.append(f"{name:<9} {condition:<7} default / best ({best_case}): {ratio:.3f}"
                                f"  {'met' if ratio >= 0.9 else 'NOT met'} (goal at least 0.9)")
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
