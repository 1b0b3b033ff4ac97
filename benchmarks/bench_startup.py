"""The fixed cost of a command against importing torch and torchvision, in one run.

A one-epoch ``tltk finetune --backbone simplecnn --data builtin:digits`` pays for more
than its training: starting Python, imports, reading the data, building the model,
scoring the test split, writing the run directory and drawing its curves. Its fixed cost
is the command's wall time minus the training time the run records itself
(``summary.json``'s ``seconds``: ``fit`` from its start to the last epoch's end). The
baseline is ``python -c "import torch, torchvision"``, which no command that trains can
start faster than. Both are fresh processes; they take turns (interleaved repeats, the
first one rotating), and the difference is the median over the repeats of each repeat's
difference. Goal: at most 1 s more than the baseline.

Run: ``python benchmarks/bench_startup.py`` (about a minute on two quiet cores at the
default 7 repeats). ``--data`` and ``--backbone`` time other runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = [sys.executable, "-c", "import torch, torchvision"]


def wall_seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def one_run(args: argparse.Namespace, out: Path) -> tuple[float, float]:
    """(wall seconds, training seconds) of one ``tltk finetune``."""
    command = [sys.executable, "-m", "tltk.cli", "finetune", "--backbone", args.backbone, "--data", args.data,
               "--epochs", "1", "--device", "cpu", "--quiet", "--overwrite", "--out", str(out)]
    wall = wall_seconds(command)
    training = float(json.loads((out / "summary.json").read_text())["seconds"])
    return wall, training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--data", default="builtin:digits")
    parser.add_argument("--backbone", default="simplecnn")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; tltk from {REPO}")
    baseline, walls, trainings = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        one_run(args, Path(tmp) / "run")  # untimed: file caches warm for both sides
        wall_seconds(BASELINE)
        for repeat in range(args.repeats):
            if repeat % 2 == 0:
                baseline.append(wall_seconds(BASELINE))
                wall, training = one_run(args, Path(tmp) / "run")
            else:
                wall, training = one_run(args, Path(tmp) / "run")
                baseline.append(wall_seconds(BASELINE))
            walls.append(wall)
            trainings.append(training)
            print(f"  repeat {repeat + 1}/{args.repeats}: import torch, torchvision {baseline[-1]:.2f}s; "
                  f"finetune {wall:.2f}s of which training {training:.2f}s, fixed {wall - training:.2f}s", flush=True)
    fixed = [w - t for w, t in zip(walls, trainings)]
    difference = statistics.median(f - b for f, b in zip(fixed, baseline))
    print(f"\nimport torch, torchvision  median {statistics.median(baseline):6.2f} s")
    print(f"tltk finetune (1 epoch)    median {statistics.median(walls):6.2f} s, training {statistics.median(trainings):.2f} s")
    print(f"fixed cost of the command  median {statistics.median(fixed):6.2f} s")
    print(f"fixed cost - baseline      median {difference:+6.2f} s  (goal: at most +1.00 s; "
          f"per-repeat range {min(f - b for f, b in zip(fixed, baseline)):+.2f} to {max(f - b for f, b in zip(fixed, baseline)):+.2f})")


if __name__ == "__main__":
    main()
